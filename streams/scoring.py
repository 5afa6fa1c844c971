"""In-process scoring: feature snapshots -> risk (model path) or NEWS2 (rule path).

    scorer = Scorer(settings.model_dir, settings)
    results = scorer.score([snapshot, ...])      # one session.run per snapshot: bit-identical whatever the batch
    scorer.reload_if_changed()                   # cheap: re-reads the registry's `current` pointer

A snapshot is a dict of feature name -> value|None (schemas.features); derived features (NEWS2,
qSOFA) are recomputed here from the base features, so a snapshot may carry them or not.

Paths
- model: the registry's current model is loaded and every NEWS2 input is present. Other missing
  features take the card's imputation value.
- rule: no model (no registry, no `current`, or the current model was refused), or any NEWS2
  input is missing (`missing` lists them). Probability is None; the tier comes from NEWS2 and its
  triggers (RCP 2017): >= 7 high (emergency response), 5-6 medium (urgent response), a single
  parameter scoring 3 also medium (its own trigger: urgent ward-based response), else none.
  Missing NEWS2 (an input not charted in 24 h): the charted parameters still trigger, a single 3
  and the sum of their points (NEWS2 is at least that); nothing charted -> none. Such a point's none
  is not known to be calm: it still counts towards resolving an episode, but the resolution names the
  inputs not charted and does not say the risk is below the line (streams/alerting.py, schemas/alert.py).
- NEWS2 is the floor of the model path: a point whose NEWS2 tier is above the model's takes the
  NEWS2 tier, with path "rule" and the NEWS2 rationale (the probability stays on the record). The
  model adds earlier warnings; it never silences the national escalation standard, and it is
  trained only on patients not yet deteriorated (NEWS2 >= 7 is part of its label).

Model input (model_input, model_probabilities): the card's feature order, a missing feature at the card's
imputation value (the graph never sees a NaN, whether or not it has an Imputer), float32, one run per row.
The promotion gate and the directional check (batch/retrain.py, batch/directional.py) feed a model the same
way, so a model is judged on what the worker serves.

Model tiers (probability p): p >= max(high_threshold (0.7), alert_threshold) high; p >= settings.alert_threshold medium;
p >= settings.alert_reset low (elevated, below the alerting line); else none.

Rationale (top 3 features pushing towards deterioration; imputed features are never listed):
- model path, linear model (a LinearClassifier, optionally after a Scaler, read from the ONNX node
  attributes with the `onnx` package): contribution = coefficient * scaled value, in log-odds.
- model path, any other model (or `onnx` not installed): the features furthest from their
  imputation values, contribution = |value - imputation| / max(|imputation|, 1).
- rule path: the NEWS2 parameters, contribution = their NEWS2 sub-score.

Shadow (candidate) model: `scorer.shadow` is a second Scorer that scores the same snapshots with a
candidate version (settings.shadow_model_dir's `current` pointer, else the main registry's
`candidate` pointer, see batch/registry.py). Its results carry path "shadow" and go to the
scores.shadow topic only, never to the alert policy. It yields results only for the snapshots its
model scored (no rule fallback: the rule path is the same as the main scorer's). A shadow that
fails its checks is disabled with a log line and retried when its pointer changes; it never stops
the worker and never changes the main scores. reload_if_changed() reloads both.

Model problems:
- no registry or no `current` pointer: rule path (logged once at startup).
- at startup, `current` names a model that fails its checks (sha256, input contract against the
  card and schemas.features, onnxruntime load): ContractError stops the worker with the reason. A
  wrong model is an operator error to fix (`wardwatch model rollback`), not something to paper
  over with the rule path while clinicians believe the model is scoring.
- on reload, a promoted model that fails its checks is refused (logged once) and the scorer keeps
  the model it had, so a bad promotion never takes a running worker down.
Logs never carry patient data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence, TypedDict

import numpy as np
import onnxruntime as ort

from schemas.features import DERIVED, NEWS2_INPUTS, derive, news2_charted_parts
from schemas.model_contract import ContractError, ModelContract, check_contract
from schemas.scores import news2_risk
from streams.alerting import TIER_RANK
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

Tier = Literal["none", "low", "medium", "high"]
ScoringPath = Literal["model", "rule", "shadow"]
CURRENT_POINTER = "current"
CANDIDATE_POINTER = "candidate"  # batch/registry.py CANDIDATE_FILE

DEFAULT_HIGH_THRESHOLD = 0.7
TOP_REASONS = 3

# NEWS2 and its sub-scores are derived from the same inputs, in the same order (schemas.features)
_NEWS2_PARTS: tuple[str, ...] = tuple(d.name for d in DERIVED if d.name.startswith("news2_"))
NEWS2_PART_INPUT: dict[str, str] = dict(zip(_NEWS2_PARTS, NEWS2_INPUTS, strict=True))

# NEWS2 risk band -> tier: a single parameter scoring 3 ("low-medium") is a trigger of its own, so it alerts
_RULE_TIER: dict[str, Tier] = {"high": "high", "medium": "medium", "low-medium": "medium", "low": "none"}


class Reason(TypedDict):
    feature: str
    value: float
    contribution: float


@dataclass(frozen=True, slots=True)
class ScoreResult:
    probability: float | None
    path: ScoringPath
    model_version: str | None
    news2: int | None
    tier: Tier
    rationale: list[Reason] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # NEWS2 inputs absent from the snapshot


# --- tiers (pure) --------------------------------------------------------------------------------


def model_tier(probability: float, *, alert_threshold: float, high_threshold: float, alert_reset: float) -> Tier:
    # nothing below the alert threshold alerts: a threshold raised above the high cut-off raises it too
    if probability >= max(high_threshold, alert_threshold):
        return "high"
    if probability >= alert_threshold:
        return "medium"
    if probability >= alert_reset:
        return "low"
    return "none"


def rule_tier(features: dict) -> Tier:
    """Tier from NEWS2 (features as returned by schemas.features.derive). With an input missing, the
    parameters charted still trigger: a single one scoring 3 is a trigger of its own, and NEWS2 is at
    least the sum of their points (sub-scores are >= 0), so the tier that sum reaches holds whatever the
    missing ones score. Nothing charted -> none."""
    parts = news2_charted_parts(features)
    return _RULE_TIER[news2_risk(sum(parts.values()), 3 in parts.values())] if parts else "none"


def with_news2_floor(result: ScoreResult, features: dict) -> ScoreResult:
    """A model result, or the NEWS2 rule's when NEWS2 puts the point in a higher tier."""
    tier = rule_tier(features)
    if TIER_RANK[tier] <= TIER_RANK[result.tier]:
        return result
    return dataclasses.replace(result, path="rule", tier=tier, rationale=rule_rationale(features))


def rule_rationale(features: dict) -> list[Reason]:
    """The NEWS2 parameters with the highest non-zero sub-scores."""
    reasons = [Reason(feature=NEWS2_PART_INPUT[part], value=float(features[NEWS2_PART_INPUT[part]]),
                      contribution=float(points))
               for part, points in news2_charted_parts(features).items() if points]
    return sorted(reasons, key=lambda r: -r["contribution"])[:TOP_REASONS]


# --- the model artifact --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinearTerms:
    """Per-feature log-odds contribution = coef * (x - offset) * scale (a Scaler then a LinearClassifier)."""

    offset: np.ndarray
    scale: np.ndarray
    coef: np.ndarray


@dataclass(frozen=True, slots=True)
class LoadedModel:
    contract: ModelContract
    session: ort.InferenceSession
    linear: LinearTerms | None  # None: the model is not a recognisable linear model


def read_current(model_dir: Path, pointer: str = CURRENT_POINTER) -> str | None:
    """The version a registry pointer names, or None when there is no registry or no pointer."""
    try:
        version = (Path(model_dir) / pointer).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return version or None


def load_model(model_dir: Path, version: str) -> LoadedModel:
    """Load and verify one registered version; raises ContractError on any mismatch."""
    if not version or Path(version).name != version or version in (".", ".."):
        raise ContractError(f"registry pointer {version!r} is not a version directory name")
    version_dir = Path(model_dir) / version
    card = _read_card(version_dir / "card.json")
    contract = ModelContract.from_card(card)
    if contract.version != version:
        raise ContractError(f"{version_dir}/card.json says version {contract.version!r}; "
                            f"the registry pointer says {version!r}")
    try:
        model_bytes = (version_dir / "model.onnx").read_bytes()
    except OSError as e:
        raise ContractError(f"cannot read {version_dir}/model.onnx: {e}") from e
    digest = hashlib.sha256(model_bytes).hexdigest()
    if not contract.sha256:
        raise ContractError(f"{version_dir}/card.json has no sha256: refusing an unverifiable model")
    if digest != contract.sha256:
        raise ContractError(f"{version_dir}/model.onnx has sha256 {digest}, the card says {contract.sha256}: "
                            "the file was modified after registration; re-register it or restore it")
    session = inference_session(model_bytes, version_dir)
    check_contract(contract, session.get_inputs(), session.get_outputs(),
                   session.get_modelmeta().custom_metadata_map)
    return LoadedModel(contract, session, _linear_terms(model_bytes, len(contract.features)))


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ContractError(f"cannot read model card {path}: {e}") from e
    if not isinstance(card, dict):
        raise ContractError(f"model card {path} is not a JSON object")
    return card


def inference_session(model_bytes: bytes, version_dir: Path) -> ort.InferenceSession:
    """An onnxruntime session as the worker opens one (the promotion gate's too)."""
    # one thread, in-process: the worker scores small micro-batches and shares the host
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad graph
        raise ContractError(f"onnxruntime cannot load {version_dir}/model.onnx: {e}") from e


def _linear_terms(model_bytes: bytes, n_features: int) -> LinearTerms | None:
    """Coefficients of [Imputer ->] [Scaler ->] LinearClassifier, read from the node attributes; else
    None. (The Imputer does not change a contribution: the scorer fills missing features with the
    card's imputation values before the model sees them, and never lists imputed features.)"""
    try:
        import onnx  # optional (the `train` extra); without it the rationale falls back to distances
        from onnx import helper
    except ImportError:
        return None
    graph = onnx.load_from_string(model_bytes).graph
    ops = [n.op_type for n in graph.node]
    if ops and ops[0] == "Imputer":
        ops = ops[1:]
    if ops not in (["LinearClassifier"], ["Scaler", "LinearClassifier"]):
        return None
    attrs = {n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in graph.node}
    coef = np.asarray(attrs["LinearClassifier"].get("coefficients", []), dtype=np.float64)
    if coef.size == 0 or coef.size % n_features:
        return None
    coef = coef.reshape(-1, n_features)[-1]  # the last row is the positive (deterioration) class
    scaler = attrs.get("Scaler", {})
    offset = np.broadcast_to(np.asarray(scaler.get("offset", [0.0]), dtype=np.float64), (n_features,))
    scale = np.broadcast_to(np.asarray(scaler.get("scale", [1.0]), dtype=np.float64), (n_features,))
    return LinearTerms(offset=offset, scale=scale, coef=coef)


# --- the scorer ----------------------------------------------------------------------------------


class Scorer:
    def __init__(self, model_dir: Path, settings: Settings, *, high_threshold: float = DEFAULT_HIGH_THRESHOLD,
                 pointer: str = CURRENT_POINTER, with_shadow: bool = True, strict: bool = True):
        self.model_dir = Path(model_dir)
        self.pointer_name = pointer
        self.alert_threshold = settings.alert_threshold
        self.alert_reset = settings.alert_reset
        self.high_threshold = high_threshold
        self.model: LoadedModel | None = None
        self.model_error: str | None = None  # why the last load was refused, for health checks
        self._pointer = read_current(self.model_dir, pointer)
        if self._pointer is None:
            self._no_model_at_start()
        elif not self._load(self._pointer) and strict:
            raise ContractError(f"the current model {self._pointer!r} in {self.model_dir} cannot be used: "
                                f"{self.model_error}. Fix or roll back the registry (`wardwatch model list`, "
                                f"`wardwatch model rollback`) and start the worker again.")
        self.shadow: ShadowScorer | None = ShadowScorer.from_settings(settings, high_threshold) if with_shadow else None

    def _no_model_at_start(self) -> None:
        log.warning("no current model in %s: scoring with the NEWS2 rule only", self.model_dir)

    @property
    def model_version(self) -> str | None:
        return self.model.contract.version if self.model else None

    def reload_if_changed(self) -> bool:
        """Load the version `current` points at if it changed; True when a new model is now in use.

        A refused version is logged once and not retried until the pointer changes again; the
        scorer keeps the model it had. A removed pointer also keeps the model in use.
        """
        if self.shadow is not None:
            self.shadow.reload_if_changed()
        pointer = read_current(self.model_dir, self.pointer_name)
        if pointer == self._pointer:
            return False
        self._pointer = pointer
        if pointer is None:
            log.warning("registry pointer %s/current disappeared; keeping model %s", self.model_dir, self.model_version)
            return False
        return self._load(pointer)

    def _load(self, version: str) -> bool:
        try:
            model = load_model(self.model_dir, version)
        except ContractError as e:
            self.model_error = str(e)
            log.error("refusing model %s; still using %s: %s", version, self.model_version or "the NEWS2 rule", e)
            return False
        self.model, self.model_error = model, None
        log.info("scoring with model %s (%d features, rationale: %s)", version, len(model.contract.features),
                 "linear" if model.linear else "distance from imputation")
        return True

    def score(self, snapshots: Sequence[dict]) -> list[ScoreResult]:
        # stream snapshots already carry the derived scores; derive only what arrives without them
        features = [s if "news2" in s else derive(s) for s in snapshots]
        missing = [[name for name in NEWS2_INPUTS if f.get(name) is None] for f in features]
        model = self.model  # one model for the whole call, even if a reload races it
        on_model = [i for i, m in enumerate(missing) if model is not None and not m]

        results: list[ScoreResult | None] = [None] * len(features)
        if on_model:
            for i, result in zip(on_model, self._score_model(model, [features[i] for i in on_model])):
                results[i] = with_news2_floor(result, features[i])
        for i, f in enumerate(features):
            if results[i] is None:
                results[i] = ScoreResult(probability=None, path="rule", model_version=None, news2=f.get("news2"),
                                         tier=rule_tier(f), rationale=rule_rationale(f), missing=missing[i])
        return results

    def _score_model(self, model: LoadedModel, rows: list[dict]) -> list[ScoreResult]:
        contract = model.contract
        x, observed = model_input(contract, feature_matrix(contract.features, rows))
        probability = model_probabilities(model.session, contract, x)
        if model.linear is not None:
            weights = model.linear.coef * (x - model.linear.offset) * model.linear.scale
        else:
            imputation = _imputation(contract)
            weights = np.abs(x - imputation) / np.maximum(np.abs(imputation), 1.0)
        weights = np.where(observed, weights, 0.0)  # an imputed value is not a reason

        results = []
        for p, reasons, r in zip(probability.tolist(), _top_reasons(contract.features, x, weights), rows):
            results.append(ScoreResult(
                probability=p, path="model", model_version=contract.version, news2=r.get("news2"),
                tier=model_tier(p, alert_threshold=self.alert_threshold, high_threshold=self.high_threshold,
                                alert_reset=self.alert_reset),
                rationale=reasons, missing=[]))
        return results


def feature_matrix(features: Sequence[str], rows: Sequence[Mapping]) -> np.ndarray:
    """rows (feature name -> value | None) as float64 columns in `features` order; a feature a row lacks, or
    holds as None, is NaN (missing)."""
    return np.array([list(map(r.get, features)) for r in rows], dtype=np.float64).reshape(len(rows), len(features))


def _imputation(contract: ModelContract) -> np.ndarray:
    # a feature without a value is refused by check_contract before the worker scores; NaN here only
    # reaches the graph for a card the worker would not serve (the gate still scores it, it does not crash)
    return np.array([contract.imputation.get(name, np.nan) for name in contract.features], dtype=np.float64)


def model_input(contract: ModelContract, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's input as the worker serves it, for both planes (the promotion gate and the directional
    check call it too, so a model is judged on what it is served): `raw` rows x contract.features (float64,
    card order, NaN = missing) -> (x, observed), x with every missing feature at the card's imputation value.
    The graph never sees a NaN, so a model with or without an Imputer of its own scores the same."""
    observed = ~np.isnan(raw)
    return np.where(observed, raw, _imputation(contract)), observed


def model_probabilities(session: ort.InferenceSession, contract: ModelContract, x: np.ndarray) -> np.ndarray:
    """P(deterioration) (output column 1) for each row of `x` (model_input's), as float32, one run per row."""
    # one run per row: onnxruntime's kernels differ by batch size (a row alone and the same row in
    # a batch of 64 can differ in the 7th digit), so a snapshot re-scored after a restart, in
    # another batch, must take the same path to get the same probability and the same decision.
    # A run of one row costs ~5 us here, of ~130 us of CPU per scoring point (benchmarks/processor.py).
    x32 = x.astype(np.float32)
    if not len(x32):
        return np.empty(0, dtype=np.float32)
    return np.vstack([session.run([contract.output_name], {contract.input_name: x32[i:i + 1]})[0]
                      for i in range(len(x32))])[:, 1]


def _top_reasons(names: Sequence[str], values: np.ndarray, weights: np.ndarray) -> list[list[Reason]]:
    """Per row of `values` (rows x features): the features with the greatest positive weights, greatest
    first (a stable sort: ties keep the features' order). One sort for all rows, then plain floats."""
    order = np.argsort(-weights, axis=1, kind="stable")[:, :TOP_REASONS]
    top_values = np.take_along_axis(values, order, axis=1).tolist()
    top_weights = np.take_along_axis(weights, order, axis=1).tolist()
    # dict displays, not Reason(...) calls: a TypedDict call is a dict(**kwargs) call, 3 per row
    return [[{"feature": names[i], "value": v, "contribution": w} for i, v, w in zip(row, vs, ws) if w > 0]
            for row, vs, ws in zip(order.tolist(), top_values, top_weights)]


class ShadowScorer(Scorer):
    """The candidate model: same loading and checks, path "shadow", no rule fallback, never fatal."""

    @classmethod
    def from_settings(cls, settings: Settings, high_threshold: float = DEFAULT_HIGH_THRESHOLD) -> ShadowScorer:
        if settings.shadow_model_dir is not None:
            return cls(settings.shadow_model_dir, settings, high_threshold=high_threshold, pointer=CURRENT_POINTER,
                       with_shadow=False, strict=False)
        return cls(settings.model_dir, settings, high_threshold=high_threshold, pointer=CANDIDATE_POINTER,
                   with_shadow=False, strict=False)

    def _no_model_at_start(self) -> None:
        pass  # no candidate is the normal case: nothing to say

    def reload_if_changed(self) -> bool:
        pointer = read_current(self.model_dir, self.pointer_name)
        if pointer == self._pointer:
            return False
        self._pointer = pointer
        if pointer is None:  # candidate withdrawn (or promoted): stop shadow-scoring
            if self.model is not None:
                log.info("shadow pointer %s/%s removed: shadow scoring off", self.model_dir, self.pointer_name)
            self.model = None
            return False
        return self._load(pointer)

    def _load(self, version: str) -> bool:
        try:
            model = load_model(self.model_dir, version)
        except ContractError as e:
            self.model, self.model_error = None, str(e)
            log.error("shadow model %s refused, shadow scoring disabled (the worker goes on; point %s/%s at a "
                      "valid version to retry): %s", version, self.model_dir, self.pointer_name, e)
            return False
        self.model, self.model_error = model, None
        log.info("shadow-scoring with candidate model %s", version)
        return True

    def score_shadow(self, snapshots: Sequence[dict]) -> list[tuple[int, ScoreResult]]:
        """(index into snapshots, result) for each snapshot the candidate model could score."""
        model = self.model
        if model is None or not snapshots:
            return []
        features = [s if "news2" in s else derive(s) for s in snapshots]
        scorable = [i for i, f in enumerate(features) if all(f.get(name) is not None for name in NEWS2_INPUTS)]
        if not scorable:
            return []
        results = self._score_model(model, [features[i] for i in scorable])
        return [(i, dataclasses.replace(r, path="shadow")) for i, r in zip(scorable, results, strict=True)]
