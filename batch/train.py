"""Labels and the deterioration model: logistic regression exported to ONNX with a model card.

The label is an *onset*: will a patient who is not deteriorated now become so within the horizon?
(Asking "will this patient be deteriorated" mostly asks "is NEWS2 already high", which a ward
already knows.) Horizon H = 12 h by default; for a scoring point of patient p at time T:

    deteriorated state     NEWS2 >= 7 (the emergency-response trigger), or systolic BP <= 90 mm[Hg],
                           or lactate >= 4 mmol/L
    at_risk                p has not been in that state at T or at any earlier scoring point, by what
                           was known then: NEWS2, the latest systolic BP and the latest lactate of the
                           last 24 h, as of `issued` (the model's own features news2,
                           systolic_bp_last_24h, lactate_last_24h)
    onset_ms               the first deterioration event in (T, T + H]: a later scoring point of p with
                           NEWS2 >= 7, or a systolic BP <= 90 / lactate >= 4 effective in the window
                           (the facts in hindsight: latest versions, retractions removed)
    label                  1 when at_risk and there is an onset in (T, T + H]; otherwise 0

So the label predicts the *first* onset of a patient. Rows that are not at_risk keep label 0 (there
is no new onset to predict) and are excluded from training and from every discrimination and
calibration metric; they still count for the alert burden. Later episodes are not labelled: with
vitals hovering at a threshold (NEWS2 6, 7, 6, 7) "onset" would again mean "NEWS2 is already
almost 7". ICU transfer and death are not in the canonical events, so they are not part of the
label. A fact effective before T but issued after the point was scored neither excludes the point
(it was not known) nor counts as its onset (it is not after T).

The features come from batch.features.features_as_of_issued, so training never sees the future: what
was issued by the time the point was scored (known_at_ms), which includes the point's own vitals
round (committed a minute or two after it was charted at T), as the served model sees it. An amended
version is issued no earlier than its source stored it, though sources often keep the first result's
time on it (schemas/fhir.py, schemas/cdc.py; docs/patient-state.md, "Issued time").

The model (impute missing with training medians -> standardize -> logistic regression) is trained on
the at-risk rows of the training patients where the worker serves it (every NEWS2 input charted, as
the evaluation below). Each coefficient keeps the clinical direction its feature declares
(schemas/features.py: a worse SpO2, consciousness level, NEWS2... never lowers the risk): an
unconstrained fit gave correlated features of one parameter opposite signs where the data is thin (no
C, 23 V rows), and the model answered an unresponsive patient with a risk of 0.000, a confused one
with 0.99 (batch/directional.py checks whole rounds). It is exported with skl2onnx: input "features"
float32 [None, n_features] in the card's feature order, NaN meaning missing (the graph imputes it
with the card's `imputation` values); output "probabilities" float32 [N, 2] (column 1 = onset of
deterioration within the horizon).

Evaluation (held-out patients; the model and NEWS2 on the same rows): AUROC, AUPRC, Brier, a
reliability table, and at the operating threshold (settings.alert_threshold for the model, NEWS2 >=
5 for the rule) the alert rate per 100 patient-days, the sensitivity for onset episodes and the
median lead time (operating_metrics). The rows are those where the worker serves the model: every
NEWS2 input charted (streams/scoring.py); a point missing one takes the NEWS2 rule path, so the model
never scores it and never alerts there. `metrics.all_rows` repeats AUROC/AUPRC/Brier on every at-risk
row, rule-path rows included (the figures of cards before this), for comparison.

Uncertainty: 95 % percentile intervals (`ci95`) of AUROC, AUPRC, sensitivity and alerts per 100
patient-days, for the model and NEWS2, and of the model's gain over NEWS2 (`model_vs_news2`), from a
patient-level (cluster) bootstrap: the held-out patients are drawn with replacement and every row of a
drawn patient is taken (rows of one patient are not independent), BOOTSTRAP_RESAMPLES draws with a fixed
seed, so the same data gives the same card. The draws are shared, so the gain's interval is paired.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from batch import registry
from batch.features import (DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_CROSS_SOURCE_TOLERANCE, DEFAULT_DEDUPE_HORIZON_MS,
                            END_OF_MESSAGE,
                            features_as_of_issued, final_facts)
from schemas import codes
from schemas.features import FEATURE_DIRECTIONS, FEATURE_NAMES, NEWS2_INPUTS
from schemas.model_contract import (CONTRACT_METADATA_KEY, FEATURE_DEFINITIONS_KEY, contract_metadata,
                                    feature_definitions)

# Every feature is numeric (consciousness is its ACVPU ordinal); the NEWS2 sub-scores give a
# linear model the clinical band edges it cannot learn itself.
MODEL_FEATURES: tuple[str, ...] = FEATURE_NAMES
# the sign each coefficient must keep (schemas/features.py: +1 higher is worse, -1 lower is worse, None free)
MODEL_DIRECTIONS: tuple[int | None, ...] = tuple(FEATURE_DIRECTIONS[f] for f in MODEL_FEATURES)
INPUT_NAME = "features"
GRAPH_NAME = "wardwatch_deterioration"
OUTPUT_NAME = "probabilities"

NEWS2_EMERGENCY = 7
LOW_SYSTOLIC_BP = 90.0
HIGH_LACTATE = 4.0
HORIZON_H = 12.0
NEWS2_ALERT = 5  # the rule's operating point: "urgent review" (RCP 2017)
DEFAULT_ALERT_THRESHOLD = 0.5  # settings.alert_threshold's default; retrain passes the setting
# what is known at T about the deteriorated state: features as of `issued`
STATE_FEATURES = ("news2", "systolic_bp_last_24h", "lactate_last_24h")
LABEL_DEFINITION = (f"first onset of deterioration within (T, T+horizon]: the patient has not been deteriorated "
                    f"at T or any earlier scoring point, as known then (NEWS2 < {NEWS2_EMERGENCY}, latest systolic BP of 24 h > {LOW_SYSTOLIC_BP:g} mm[Hg], latest "
                    f"lactate of 24 h < {HIGH_LACTATE:g} mmol/L, as of issued) and then has a later scoring point with "
                    f"NEWS2 >= {NEWS2_EMERGENCY}, or a systolic BP <= {LOW_SYSTOLIC_BP:g} / lactate >= "
                    f"{HIGH_LACTATE:g} effective in the window (facts in hindsight); rows of patients already "
                    "deteriorated are excluded (at_risk = false); ICU transfer and death are not in the data")

# a point: where it was taken and its snapshot_id (two points of one message can share the rest)
_KEYS = ("patient_id", "scoring_ms", "partition", "offset", "snapshot_id")
# the worker serves the model only where every NEWS2 input is charted; elsewhere it takes the NEWS2
# rule path whatever the model would say (streams/scoring.py Scorer.score)
SERVED = pl.all_horizontal(pl.col(c).is_not_null() for c in NEWS2_INPUTS).alias("_served")
BOOTSTRAP_RESAMPLES = 500  # ~2 s of `batch train` on 75 held-out patients
BOOTSTRAP_SEED = 0
CI_METRICS = ("auroc", "auprc", "sensitivity", "alerts_per_100_patient_days")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Floors below which held-out figures say nothing about a model (not sizes that suffice: validation
# guidance asks for 100+ events, Collins et al. 2016). AUROC/AUPRC rank the patients with an onset
# against the others: with fewer than 10 of them one patient can move AUROC by a tenth or more; and
# a patient-level bootstrap of fewer than 20 patients redraws the same few, so its percentile intervals
# come out too narrow, not merely wide.
MIN_JUDGED_PATIENTS = 20
MIN_JUDGED_ONSET_PATIENTS = 10


# --- labels --------------------------------------------------------------------------------------


def make_labels(events_df: pl.DataFrame, points_df: pl.DataFrame, horizon_h: float = HORIZON_H, *,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """The points (input order and columns) plus `label` (0/1), `at_risk`, `onset_ms` (the onset
    time when label = 1, else null) and one boolean per criterion met in (T, T + H]:
    label_news2_high, label_low_sbp, label_high_lactate.

    The state at T comes from points_df's STATE_FEATURES columns when present (e.g. the features
    frame); the missing ones are computed as of issue time at each point.
    """
    horizon_ms = int(horizon_h * HOUR_MS)
    rules = {"allowed_lateness_ms": allowed_lateness_ms, "cross_source_tolerance": cross_source_tolerance,
             "dedupe_horizon_ms": dedupe_horizon_ms}
    points = points_df.with_columns(pl.col("scoring_ms").cast(pl.Int64))
    known = _known_at(events_df, points, rules)
    deteriorated = ((known["news2"] >= NEWS2_EMERGENCY) | (known["systolic_bp_last_24h"] <= LOW_SYSTOLIC_BP)
                    | (known["lactate_last_24h"] >= HIGH_LACTATE)).fill_null(False)
    facts = final_facts(events_df, **rules)
    criteria = {
        "label_news2_high": points.select("patient_id", t=pl.col("scoring_ms")).filter(known["news2"] >= NEWS2_EMERGENCY),
        "label_low_sbp": facts.filter((pl.col("code") == codes.SYSTOLIC_BP) & (pl.col("value") <= LOW_SYSTOLIC_BP))
                              .select("patient_id", t=pl.col("effective_ms")),
        "label_high_lactate": facts.filter((pl.col("code") == codes.LACTATE) & (pl.col("value") >= HIGH_LACTATE))
                                   .select("patient_id", t=pl.col("effective_ms")),
    }
    firsts = {name: _first_within(points, times, horizon_ms) for name, times in criteria.items()}
    out = points.with_columns(pl.Series(name, first.is_not_null()) for name, first in firsts.items())
    first_event = pl.DataFrame(firsts).select(pl.min_horizontal(list(firsts)).alias("t"))["t"]
    at_risk = ~_ever(points, deteriorated)
    label = at_risk & first_event.is_not_null()
    return out.with_columns(
        label=label.cast(pl.Int8),
        at_risk=at_risk,
        onset_ms=pl.when(label).then(first_event).otherwise(None).cast(pl.Int64),
    )


def _known_at(events_df: pl.DataFrame, points: pl.DataFrame, rules: dict) -> pl.DataFrame:
    """STATE_FEATURES per point (input order): taken from `points` when there, else as of issue time."""
    missing = [c for c in STATE_FEATURES if c not in points.columns]
    if missing:  # (a select of no column has no rows: add the computed ones to the points instead)
        position = [c for c in ("patient_id", "scoring_ms", "partition", "offset", "idx") if c in points.columns]
        computed = features_as_of_issued(events_df, points.select(position), **rules)
        points = points.with_columns(computed.select(missing).get_columns())
    return points.select(pl.col(c).cast(pl.Float64) for c in STATE_FEATURES)


def _ever(points: pl.DataFrame, state: pl.Series) -> pl.Series:
    """Per point (input order): was `state` true at this or any earlier point of the patient? Points
    at the same time share one answer, except two of one message (partition, offset): the stream's
    point at idx saw its message's events up to idx only, so one later in the message (a higher idx)
    does not answer for it (without idx: the whole message, one answer)."""
    if not {"partition", "offset"} <= set(points.columns):
        frame = points.select("patient_id", "scoring_ms").with_columns(_s=state)
        per_time = (frame.group_by("patient_id", "scoring_ms").agg(pl.col("_s").any()).sort("scoring_ms")
                    .with_columns(_ever=pl.col("_s").cum_max().over("patient_id")))
        return frame.join(per_time, on=["patient_id", "scoring_ms"], how="left", maintain_order="left")["_ever"]
    time, message = ["patient_id", "scoring_ms"], ["patient_id", "scoring_ms", "partition", "offset"]
    point_idx = pl.col("idx").cast(pl.Int64).fill_null(END_OF_MESSAGE) if "idx" in points.columns else pl.lit(END_OF_MESSAGE)
    frame = points.select(*time, pl.col("partition", "offset").cast(pl.Int64), idx=point_idx).with_columns(_s=state)
    # at an earlier time of the patient
    per_time = (frame.group_by(time).agg(pl.col("_s").any()).sort("scoring_ms")
                .with_columns(_before=pl.col("_s").cum_max().shift(1).over("patient_id").fill_null(False))
                .drop("_s"))
    # at this time in another message, or in this one up to the point's idx
    per_message = frame.group_by(message).agg(_m=pl.col("_s").any()).with_columns(
        _others=(pl.col("_m").cast(pl.Int64).sum().over(time) - pl.col("_m").cast(pl.Int64)) > 0).drop("_m")
    up_to_idx = (frame.group_by(*message, "idx").agg(pl.col("_s").any()).sort("idx")
                 .with_columns(_upto=pl.col("_s").cum_max().over(message)).drop("_s"))
    return (frame.join(per_time, on=time, how="left", maintain_order="left")
            .join(per_message, on=message, how="left", maintain_order="left")
            .join(up_to_idx, on=[*message, "idx"], how="left", maintain_order="left")
            .select(_ever=pl.col("_before") | pl.col("_others") | pl.col("_upto"))["_ever"])


def _first_within(points: pl.DataFrame, times: pl.DataFrame, horizon_ms: int) -> pl.Series:
    """Per point (input order): the patient's first time in (scoring_ms, scoring_ms + horizon], or
    null. The next time strictly after T is an as-of join looking forward."""
    left = points.select("patient_id", "scoring_ms").with_row_index("_point").sort("scoring_ms")
    right = times.with_columns(pl.col("t").cast(pl.Int64)).sort("t")
    nxt = left.join_asof(right, left_on="scoring_ms", right_on="t", by="patient_id",
                         strategy="forward", allow_exact_matches=False, check_sortedness=False)  # sorted above
    within = pl.when(pl.col("t") - pl.col("scoring_ms") <= horizon_ms).then(pl.col("t")).alias("t")
    return nxt.sort("_point").select(within)["t"]


def published_points(con) -> pl.DataFrame:
    """The scoring points training pairs rows with, from a nightly DuckDB file (`con`): one per point the
    stream published (features_online; two of one message can share patient, time and position: its
    snapshot_id names it), with the point's idx, the position in its message of the last event it saw.
    The features and labels are cut there, as the stream's point saw its message (batch.features
    known_at_ms, _ever): without idx, events later in the same message leak into the point. A file whose
    features_online has no idx column (none in any release that writes snapshot_id) gives null: the
    whole message."""
    columns = {row[0] for row in con.execute("DESCRIBE features_online").fetchall()}
    idx = '"idx"' if "idx" in columns else "NULL::BIGINT AS idx"
    return con.sql(f'SELECT patient_id, scoring_ms, "partition", "offset", {idx}, snapshot_id FROM features_online '
                   "ORDER BY ALL").pl()


def labelled_rows(events_df: pl.DataFrame, points_df: pl.DataFrame, *, horizon_h: float = HORIZON_H,
                  allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                  cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                  dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """Features as of `issued` at every point, with their labels (the training table)."""
    rules = {"allowed_lateness_ms": allowed_lateness_ms, "cross_source_tolerance": cross_source_tolerance,
             "dedupe_horizon_ms": dedupe_horizon_ms}
    features = features_as_of_issued(events_df, points_df, **rules)
    return make_labels(events_df, features, horizon_h, **rules)


# --- training ------------------------------------------------------------------------------------


SPLIT_METHOD = "patient_id_hash"


def split_rule(test_fraction: float = 0.25, seed: int = 0) -> dict:
    """What identifies split_patients' rule, recorded in the card (`split`): two models whose cards hold the
    same rule hold out the same patients of a cohort. A card without it (before 2026-11-27) was split by a
    permutation of the sorted ids, which depended on the whole cohort: not reproducible."""
    return {"method": SPLIT_METHOD, "hash": "blake2b, 8-byte digest of '<seed>|<patient_id>' over 2**64",
            "held_out_fraction": test_fraction, "seed": seed}


def split_patients(patient_ids, test_fraction: float = 0.25, seed: int = 0) -> tuple[set[str], set[str]]:
    """A reproducible patient-level split: no patient has rows on both sides.

    Each patient's side follows from its id alone (a blake2b hash of seed and id, held out below
    `test_fraction`), not from who else is in the cohort: a patient keeps its side as the nightly file
    grows, so a model trained last night is never judged on patients it was trained on (the gate's
    comparison with `current`, batch/retrain.py). A random permutation of the sorted ids, as before,
    reshuffled the sides with every patient added: one more patient in 300 moved 35 of the 75 held-out
    patients to the side the model before had trained on. The held-out count is about `test_fraction`
    of the patients, not exactly; a side left empty takes the patient nearest the threshold."""
    patients = sorted(set(patient_ids))
    if len(patients) < 2:
        raise ValueError("need at least two patients for a patient-level split")

    def position(patient: str) -> float:  # uniform in [0, 1), fixed per (seed, patient)
        digest = hashlib.blake2b(f"{seed}|{patient}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    ranked = sorted(patients, key=lambda p: (position(p), p))
    test = {p for p in ranked if position(p) < test_fraction}
    if not test:
        test = {ranked[0]}
    elif len(test) == len(patients):
        test.discard(ranked[-1])
    return set(patients) - test, test


def train_model(features_df: pl.DataFrame, labels_df: pl.DataFrame, out_dir: Path | str, version: str, *,
                test_fraction: float = 0.25, seed: int = 0,
                alert_threshold: float = DEFAULT_ALERT_THRESHOLD) -> dict:
    """Train on the at-risk, served rows of the training patients, evaluate on the held-out patients, export
    model.onnx + card.json under out_dir/version.

    Rows are matched on the point keys both frames share; labels without `at_risk` count as all at
    risk. Returns the card. Refuses to overwrite an existing version (published versions are immutable).
    """
    registry.check_version_name(version)
    target = Path(out_dir) / version
    if target.exists():
        raise FileExistsError(f"model version {version!r} already exists in {out_dir}")

    data = features_with_labels(features_df, labels_df)
    # split on every patient (retrain._held_out does the same), then keep the rows at risk
    train_ids, test_ids = split_patients(data["patient_id"].to_list(), test_fraction, seed)
    train_all = data.filter(pl.col("patient_id").is_in(list(train_ids)))
    test_all = data.filter(pl.col("patient_id").is_in(list(test_ids)))
    train_at_risk, test = train_all.filter(pl.col("at_risk")), test_all.filter(pl.col("at_risk"))
    # trained on what it will serve: a rule-path row's missing NEWS2 inputs, imputed, never reach the model
    train = train_at_risk.filter(SERVED)
    x_train, y_train = _matrix(train), train["label"].to_numpy().astype(int)
    if len(set(y_train)) < 2:
        raise ValueError("training rows hold a single label class; cannot fit a classifier")

    pipeline = fit_pipeline(x_train, y_train)
    imputation = dict(zip(MODEL_FEATURES, (float(v) for v in pipeline.named_steps["impute"].statistics_)))

    # every held-out row (at risk or not) is scored, for the alert burden; the rest use the at-risk rows.
    # `_score` is what the worker serves: none on the rule path (a missing score never alerts)
    scored = test_all.with_columns(_all=pl.Series(pipeline.predict_proba(_matrix(test_all))[:, 1]),
                                   _served=SERVED).with_columns(_score=pl.when(pl.col("_served")).then(pl.col("_all")))
    evaluated = scored.filter(pl.col("at_risk") & pl.col("_served"))
    y_test, probability = evaluated["label"].to_numpy().astype(int), evaluated["_score"].to_numpy()
    metrics = {"model": _metrics(y_test, probability)
               | {"reliability": reliability_table(y_test, probability),
                  "operating": operating_metrics(scored, threshold=alert_threshold)}}
    fill = imputation.get("news2")
    metrics["news2"] = _news2_metrics(train, scored, fill)
    news2_score, _ = _news2_scores(train, evaluated, fill)
    intervals = bootstrap_intervals(
        sorted(test_ids), evaluated["patient_id"].to_list(), y_test, {"model": probability, "news2": news2_score},
        {"model": operating_per_patient(scored, threshold=alert_threshold),
         "news2": operating_per_patient(scored, threshold=NEWS2_ALERT, score="news2")})
    for name in ("model", "news2"):
        metrics[name]["ci95"] = intervals[name]
    metrics["model_vs_news2"] = {
        f"{m}_gain": {"estimate": None if None in (metrics["model"][m], metrics["news2"][m])
                      else metrics["model"][m] - metrics["news2"][m], "ci95": intervals["gain"][m]}
        for m in ("auroc", "auprc")}
    metrics["bootstrap"] = {
        "method": "patient-level (cluster) percentile bootstrap: held-out patients drawn with replacement, every "
                  "row of a drawn patient taken; the same draws for the model and NEWS2 (the gain is paired)",
        "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "patients": len(test_ids),
        # those with a row the AUROC/AUPRC rest on (a patient deteriorated at every point, or never served,
        # has none: drawn, it adds nothing to them), what too_few_to_judge counts
        "patients_evaluated": evaluated["patient_id"].n_unique(),
        # the events the figures rest on (too_few_to_judge): patients, not rows, are independent
        "patients_with_onset": evaluated.filter(pl.col("label") == 1)["patient_id"].n_unique(),
        "skipped_one_class": intervals["skipped"]}
    at_risk = scored.filter(pl.col("at_risk"))
    y_all = at_risk["label"].to_numpy().astype(int)
    metrics["all_rows"] = {"model": _metrics(y_all, at_risk["_all"].to_numpy()),
                           "news2": _metrics(y_all, *_news2_scores(train, at_risk, fill))}
    metrics["evaluation"] = {
        "rows": "held-out patients' scoring points at risk (not already deteriorated at T) where the worker serves "
                "the model: every NEWS2 input charted in 24 h",
        "excluded_rows_already_deteriorated": test_all.height - test.height,
        "excluded_rows_rule_path": test.height - evaluated.height,
        "rule_path": "a point missing a NEWS2 input takes the NEWS2 rule path: the model never scores it, so it is "
                     "left out of the model's and NEWS2's metrics and the model never alerts there",
        "all_rows": "metrics.all_rows: AUROC/AUPRC/Brier on every held-out at-risk row, rule-path rows included "
                    "(the model imputing their missing inputs, NEWS2 the training median): not what is served",
        "operating_rows": "every held-out scoring point, at risk or not (the alert burden a ward would see)",
        "training_rows": "the training patients' at-risk rows the worker would serve the model (every NEWS2 input "
                         "charted), as evaluated",
    }

    onnx_bytes = to_onnx(pipeline, imputation)
    card = {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": "StandardScaler + LogisticRegression (scikit-learn), median imputation, coefficients sign-constrained "
                 "to the clinical directions (schemas/features.py)",
        "coefficient_directions": {f: d for f, d in zip(MODEL_FEATURES, MODEL_DIRECTIONS) if d is not None},
        "features": list(MODEL_FEATURES),
        # what each was computed from: a worker whose specs differ refuses the model (schemas/model_contract.py)
        FEATURE_DEFINITIONS_KEY: feature_definitions(MODEL_FEATURES),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "positive_class_index": 1,
        "imputation": imputation,
        "label": LABEL_DEFINITION,
        "horizon_h": HORIZON_H,
        "training_range": {"min_scoring_ms": int(train["scoring_ms"].min()),
                           "max_scoring_ms": int(train["scoring_ms"].max())},
        "split": split_rule(test_fraction, seed),  # how the held-out patients were chosen (the gate compares)
        "n_train_patients": len(train_ids),
        "n_test_patients": len(test_ids),
        "n_train_rows": train.height,
        "n_test_rows": test.height,
        "n_test_rows_served": evaluated.height,
        "n_train_rows_rule_path": train_at_risk.height - train.height,
        "n_excluded_rows": data.height - train_at_risk.height - test.height,
        "train_positive_fraction": round(float(y_train.mean()), 4),
        "metrics": metrics,
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    _publish(target, onnx_bytes, card)
    return card


def fit_pipeline(x: np.ndarray, y: np.ndarray, directions: tuple[int | None, ...] | None = MODEL_DIRECTIONS
                 ) -> Pipeline:
    """Median imputation (NaN = missing) -> standardization -> logistic regression whose coefficients
    keep the declared clinical directions (sign_constrained_logistic; None: unconstrained, scikit-learn's
    own fit). A scaler divides by a positive scale, so a sign on a standardized feature is its sign on
    the raw one."""
    if directions is None:
        return Pipeline([
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("classify", LogisticRegression(max_iter=2000)),
        ]).fit(x, y)
    impute = SimpleImputer(strategy="median", keep_empty_features=True).fit(x)
    scale = StandardScaler().fit(impute.transform(x))
    classify = sign_constrained_logistic(scale.transform(impute.transform(x)), y, directions)
    return Pipeline([("impute", impute), ("scale", scale), ("classify", classify)])


def sign_constrained_logistic(z: np.ndarray, y: np.ndarray, directions: tuple[int | None, ...], *,
                              c: float = 1.0) -> LogisticRegression:
    """A fitted LogisticRegression (binary, classes 0/1) with coefficient j >= 0 where directions[j] is +1,
    <= 0 where it is -1, free where None: scikit-learn's own objective (L2 penalty 1/(2C) |w|^2, the
    intercept not penalized, C = 1.0 its default), minimized by L-BFGS-B with those bounds.

    Why: features derived from one parameter (the consciousness ordinals, NEWS2's consciousness points,
    NEWS2, qSOFA) are correlated, and where the data is thin (few V/P/U rows, no C) an unconstrained fit
    gives them opposite signs, so a worse level can lower the risk. The result is set on a plain
    LogisticRegression, so the ONNX export (skl2onnx) and the scorer's rationale are unchanged.
    Deterministic: a fixed start (zeros) and no randomness."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, k = z.shape
    if len(directions) != k:
        raise ValueError(f"{len(directions)} directions for {k} features")
    l2 = 1.0 / (c * n)  # the objective divided by n: the same minimum, better scaled for the optimizer

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k]
        margin = z @ w + b
        loss = float(np.mean(np.logaddexp(0.0, margin) - y * margin) + 0.5 * l2 * (w @ w))
        residual = (expit(margin) - y) / n
        return loss, np.r_[z.T @ residual + l2 * w, residual.sum()]

    bounds = [(0.0, None) if d == 1 else (None, 0.0) if d == -1 else (None, None) for d in directions]
    result = minimize(objective, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=[*bounds, (None, None)],
                      options={"maxiter": 15000, "maxfun": 30000, "ftol": 1e-13, "gtol": 1e-9})
    if not result.success:
        raise RuntimeError(f"sign-constrained logistic regression did not converge: {result.message}")
    model = LogisticRegression()  # C = 1.0, the penalty minimized above
    model.classes_ = np.array([0, 1])
    model.coef_ = result.x[None, :k].copy()
    model.intercept_ = result.x[k:].copy()
    model.n_features_in_ = k
    model.n_iter_ = np.array([result.nit], dtype=np.int32)
    return model


def features_with_labels(features_df: pl.DataFrame, labels_df: pl.DataFrame) -> pl.DataFrame:
    """Each scoring point's features joined with its label (on patient_id, scoring_ms and the point keys both carry)."""
    keys = [k for k in _KEYS if k in features_df.columns and k in labels_df.columns]
    if "patient_id" not in keys or "scoring_ms" not in keys:
        raise ValueError("features and labels must both carry patient_id and scoring_ms")
    missing = [f for f in MODEL_FEATURES if f not in features_df.columns]
    if missing:
        raise ValueError(f"features frame lacks model inputs: {missing}")
    labels = labels_df.with_columns(
        at_risk=pl.col("at_risk") if "at_risk" in labels_df.columns else pl.lit(True),
        onset_ms=pl.col("onset_ms") if "onset_ms" in labels_df.columns else pl.lit(None, pl.Int64),
    ).select(*keys, "label", "at_risk", "onset_ms").unique(subset=keys, keep="first")
    features = features_df.drop("label", "at_risk", "onset_ms", strict=False)
    # in key order: polars' unique and join give rows in no set order, and the fit's float sums
    # follow the row order, so the same data would give other model bytes and metrics each run
    return (features.join(labels, on=keys, how="inner").filter(pl.col("label").is_not_null())
            .sort(keys, maintain_order=True))


def _matrix(frame: pl.DataFrame) -> np.ndarray:
    """Model inputs in card order, float32, missing as NaN (exactly what the ONNX model receives)."""
    return frame.select(pl.col(f).cast(pl.Float64) for f in MODEL_FEATURES).to_numpy().astype(np.float32)


# --- evaluation ----------------------------------------------------------------------------------


def too_few_to_judge(patients: int, onset_patients: int | None) -> str | None:
    """Why figures from `patients` patients, `onset_patients` of them with an onset among the rows
    evaluated (None: not known), are too few to judge a model by (one sentence); None when enough."""
    if patients >= MIN_JUDGED_PATIENTS and (onset_patients is None or onset_patients >= MIN_JUDGED_ONSET_PATIENTS):
        return None
    counted = f"{patients} patients" + ("" if onset_patients is None else f", {onset_patients} of them with an onset")
    return (f"{counted}: too few to judge a model by (at least {MIN_JUDGED_PATIENTS} patients and "
            f"{MIN_JUDGED_ONSET_PATIENTS} with an onset are needed); these AUROC/AUPRC figures and their 95 % "
            "intervals are noise, not evidence")


def held_out_too_small(metrics: dict) -> str | None:
    """too_few_to_judge for a card's held-out figures (card["metrics"], or a runs row's model_metrics_json);
    None without a bootstrap block (no intervals to judge). The patients counted are those with a row the
    figures are computed on (`patients_evaluated`; cards from before it: every held-out patient): 25 held out
    of whom 13 were deteriorated at every point give AUROC/AUPRC and intervals from 12."""
    bootstrap = metrics.get("bootstrap") or {}
    if bootstrap.get("patients") is None:
        return None
    # cards from before patients_with_onset: their positive rows, at least as many as those patients
    onset = bootstrap.get("patients_with_onset", (metrics.get("model") or {}).get("positives"))
    return too_few_to_judge(bootstrap.get("patients_evaluated", bootstrap["patients"]), onset)


def _metrics(y: np.ndarray, score: np.ndarray, probability: np.ndarray | None = None) -> dict:
    """AUROC/AUPRC of a ranking score and Brier of a probability (the score itself by default).
    AUROC and AUPRC are None when the rows hold one class only, Brier too when there are no rows (every
    held-out patient already deteriorated at each point): not computable, which the gate refuses."""
    probability = score if probability is None else probability
    two_classes = len(set(y.tolist())) == 2
    return {
        "auroc": float(roc_auc_score(y, score)) if two_classes else None,
        "auprc": float(average_precision_score(y, score)) if two_classes else None,
        "brier": float(brier_score_loss(y, probability, labels=[0, 1])) if len(y) else None,
        "n_rows": int(len(y)),
        "positives": int(y.sum()),
    }


def reliability_table(y: np.ndarray, probability: np.ndarray, bins: int = 10) -> list[dict]:
    """Calibration by deciles of the predicted probability: per bin the rows, the mean predicted
    and the observed positive fraction. Tied predictions stay in one bin, so a coarse score (NEWS2
    mapped to a probability) gives fewer, larger bins."""
    y, probability = np.asarray(y, dtype=float), np.asarray(probability, dtype=float)
    if len(y) == 0:
        return []
    edges = np.unique(np.quantile(probability, np.linspace(0, 1, bins + 1)[1:-1]))
    which = np.searchsorted(edges, probability, side="left")  # bin i holds p <= edges[i]
    table = []
    for b in np.unique(which):
        inside = which == b
        table.append({"bin": int(len(table) + 1), "n": int(inside.sum()),
                      "min_predicted": float(probability[inside].min()),
                      "max_predicted": float(probability[inside].max()),
                      "mean_predicted": float(probability[inside].mean()),
                      "observed": float(y[inside].mean())})
    return table


def operating_metrics(rows: pl.DataFrame, *, threshold: float, score: str = "_score",
                      horizon_h: float = HORIZON_H) -> dict:
    """What a ward would live with at one threshold. `rows`: patient_id, scoring_ms, the score,
    label and onset_ms (the onset when label = 1), ideally every scoring point of each patient.

    alerts                    rising edges: a point at/above the threshold whose previous point of
                              the patient was below it (or absent); a simplification of the stream's
                              policy (hysteresis, suppression, the NEWS2 floor: streams/alerting.py),
                              whose real alerts `wardwatch batch report` counts
    patient_days              per patient, first to last scoring point
    onset episodes            distinct (patient, onset_ms) of the positive rows
    sensitivity               episodes with a point at/above the threshold in [onset - H, onset)
    median_lead_time_h        onset minus the first such point, over the detected episodes
    A missing score never alerts.
    """
    per_patient, first_alert = _operating(rows, threshold=threshold, score=score, horizon_h=horizon_h)
    alerts, episodes = int(per_patient["alerts"].sum()), int(per_patient["episodes"].sum())
    patient_days = float(per_patient["span_ms"].sum() or 0) / DAY_MS
    lead_h = ((first_alert["onset_ms"] - first_alert["t"]) / HOUR_MS).to_numpy()
    return {
        "threshold": threshold,
        "alerts": alerts,
        "patient_days": round(patient_days, 3),
        "alerts_per_100_patient_days": round(100 * alerts / patient_days, 3) if patient_days else None,
        "onset_episodes": episodes,
        "episodes_detected": first_alert.height,
        "sensitivity": first_alert.height / episodes if episodes else None,
        "median_lead_time_h": float(np.median(lead_h)) if len(lead_h) else None,
    }


def operating_per_patient(rows: pl.DataFrame, *, threshold: float, score: str = "_score",
                          horizon_h: float = HORIZON_H) -> pl.DataFrame:
    """operating_metrics' counts per patient (patient_id, alerts, span_ms, episodes, detected): the
    totals are their sums, so a draw of patients (the bootstrap) sums its own."""
    return _operating(rows, threshold=threshold, score=score, horizon_h=horizon_h)[0]


def _operating(rows: pl.DataFrame, *, threshold: float, score: str, horizon_h: float
               ) -> tuple[pl.DataFrame, pl.DataFrame]:
    horizon_ms = int(horizon_h * HOUR_MS)
    ordered = rows.sort("patient_id", "scoring_ms").with_columns(
        _high=(pl.col(score).cast(pl.Float64) >= threshold).fill_null(False))
    edges = ordered.with_columns(_prev=pl.col("_high").shift(1).over("patient_id").fill_null(False)).filter(
        pl.col("_high") & ~pl.col("_prev"))
    episodes = ordered.filter((pl.col("label") == 1) & pl.col("onset_ms").is_not_null()).select(
        "patient_id", "onset_ms").unique()
    high = ordered.filter(pl.col("_high")).select("patient_id", t=pl.col("scoring_ms"))
    first_alert = (episodes.join(high, on="patient_id", how="inner")
                   .filter((pl.col("t") >= pl.col("onset_ms") - horizon_ms) & (pl.col("t") < pl.col("onset_ms")))
                   .group_by("patient_id", "onset_ms").agg(pl.col("t").min()))
    per_patient = (ordered.group_by("patient_id").agg(span_ms=pl.col("scoring_ms").max() - pl.col("scoring_ms").min())
                   .join(edges.group_by("patient_id").len("alerts"), on="patient_id", how="left")
                   .join(episodes.group_by("patient_id").len("episodes"), on="patient_id", how="left")
                   .join(first_alert.group_by("patient_id").len("detected"), on="patient_id", how="left")
                   .with_columns(pl.col("alerts", "episodes", "detected").fill_null(0))
                   .sort("patient_id"))
    return per_patient, first_alert


class RankedRows:
    """One score's evaluation rows sorted once (highest first) with their runs of tied scores, so the
    AUROC and average precision of any weighting of the rows (a bootstrap draw: each row weighted by how
    many times its patient was drawn) cost a pass over the rows, not a sort of a copy of them."""

    def __init__(self, y: np.ndarray, score: np.ndarray):
        self.order = np.argsort(-score, kind="mergesort")
        self.y = y[self.order].astype(np.float64)
        self.run = np.r_[0, np.cumsum(np.diff(score[self.order]) != 0)]  # tied run of each sorted row
        self.runs = int(self.run[-1]) + 1 if len(self.run) else 0

    def metrics(self, weight: np.ndarray) -> tuple[float, float]:
        """(AUROC, average precision) of the rows weighted by `weight` (in the rows' own order), as
        scikit-learn's roc_auc_score / average_precision_score give for the rows repeated that many
        times, without their input checks (which would cost each draw more than the sums). Both classes
        must have weight."""
        w = weight[self.order]
        pos = np.bincount(self.run, w * self.y, self.runs)
        neg = np.bincount(self.run, w * (1.0 - self.y), self.runs)
        positives, negatives = pos.sum(), neg.sum()
        below = negatives - np.cumsum(neg)  # negative weight scored lower than each run
        auroc = float((pos * (below + 0.5 * neg)).sum() / (positives * negatives))  # ties count half
        seen = np.cumsum(pos + neg)
        precision = np.divide(np.cumsum(pos), seen, out=np.zeros(self.runs), where=seen > 0)
        return auroc, float((pos / positives * precision).sum())


def bootstrap_intervals(patients: list[str], row_patients: list[str], y: np.ndarray, scores: dict[str, np.ndarray],
                        operating: dict[str, pl.DataFrame], *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict:
    """95 % percentile intervals from a patient-level bootstrap: each draw takes len(patients) patients
    with replacement and every evaluation row (`row_patients`, `y`, `scores`) and operating count
    (operating_per_patient frames, none for a score absent from `operating`) of each drawn patient, once
    per time drawn.

    Returns {name: {metric: [low, high] | None} for each score, "gain": {"auroc"|"auprc": [low, high] |
    None} (the first score minus the second, in the same draws), "skipped": draws whose rows held one
    class (no AUROC/AUPRC; their operating counts still count)}. None: no draw could compute it."""
    index = {p: i for i, p in enumerate(patients)}
    codes_ = np.array([index[p] for p in row_patients], dtype=np.int64)
    ranked = {name: RankedRows(y, score) for name, score in scores.items()}
    y_float = y.astype(np.float64)
    counts = {}
    for name, frame in operating.items():
        by = dict(zip(frame["patient_id"].to_list(), frame.select("alerts", "span_ms", "episodes", "detected").rows()))
        counts[name] = np.array([by.get(p, (0, 0, 0, 0)) for p in patients], dtype=np.float64)
    names = list(scores)
    draws: dict[str, dict[str, list[float]]] = {n: {m: [] for m in CI_METRICS} for n in [*names, "gain"]}
    skipped = 0
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = rng.integers(0, len(patients), len(patients))
        for name in counts:  # a score without operating counts (a ranking compared only) has none
            alerts, span_ms, episodes, detected = counts[name][drawn].sum(axis=0)
            if span_ms:
                draws[name]["alerts_per_100_patient_days"].append(100 * alerts / (span_ms / DAY_MS))
            if episodes:
                draws[name]["sensitivity"].append(detected / episodes)
        weight = np.bincount(drawn, minlength=len(patients))[codes_].astype(np.float64)  # rows once per draw
        positive = float(weight @ y_float)
        if positive == 0 or positive == weight.sum():  # the drawn rows hold one class (or none)
            skipped += 1
            continue
        values = [ranked[name].metrics(weight) for name in names]
        for k, metric in enumerate(("auroc", "auprc")):
            for name, value in zip(names, values):
                draws[name][metric].append(value[k])
            if len(values) == 2:
                draws["gain"][metric].append(values[0][k] - values[1][k])

    def interval(values: list[float]) -> list[float] | None:
        return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])] if values else None

    out = {name: {m: interval(draws[name][m]) for m in CI_METRICS} for name in names}
    out["gain"] = {m: interval(draws["gain"][m]) for m in ("auroc", "auprc")}
    out["skipped"] = skipped
    return out


def _news2_scores(train: pl.DataFrame, rows: pl.DataFrame, fill: float | None) -> tuple[np.ndarray, np.ndarray]:
    """NEWS2 of `rows` as a ranking score, and mapped to a probability by a one-feature logistic fit on
    the training rows. Missing NEWS2 (rule-path rows, in metrics.all_rows only) takes the training median,
    as the model's input does."""
    def news2(frame: pl.DataFrame) -> np.ndarray:
        return frame["news2"].cast(pl.Float64).fill_null(fill if fill is not None else 0.0).to_numpy()

    calibration = LogisticRegression().fit(news2(train).reshape(-1, 1), train["label"].to_numpy().astype(int))
    score = news2(rows)
    return score, calibration.predict_proba(score.reshape(-1, 1))[:, 1] if len(score) else score


def _news2_metrics(train: pl.DataFrame, scored: pl.DataFrame, fill: float | None) -> dict:
    """NEWS2 on the model's evaluation rows (held-out, at risk, served: `_served`): the score ranks for
    AUROC/AUPRC, its calibrated probability gives Brier and the reliability table. The operating point
    (NEWS2 >= 5) counts every held-out point, where a missing NEWS2 never alerts."""
    test = scored.filter(pl.col("at_risk") & pl.col("_served"))
    score, probability = _news2_scores(train, test, fill)
    y = test["label"].to_numpy().astype(int)
    return _metrics(y, score, probability) | {
        "reliability": reliability_table(y, probability),
        "operating": operating_metrics(scored, threshold=NEWS2_ALERT, score="news2")}


def to_onnx(pipeline: Pipeline, imputation: dict[str, float] | None = None) -> bytes:
    """The fitted pipeline as an ONNX model: input INPUT_NAME float32 [None, n], output OUTPUT_NAME [N, 2].
    With `imputation` (the card's), the contract is embedded in the model's metadata, so that an edit of
    the card after registration is caught when the model is loaded (schemas/model_contract.py)."""
    onx = convert_sklearn(
        pipeline,
        name=GRAPH_NAME,  # skl2onnx names the graph with a random uuid otherwise: other bytes every export
        initial_types=[(INPUT_NAME, FloatTensorType([None, pipeline.n_features_in_]))],
        options={id(pipeline.named_steps["classify"]): {"zipmap": False}},  # a plain [N, 2] tensor
    )
    outputs = [o.name for o in onx.graph.output]
    if OUTPUT_NAME not in outputs:
        raise RuntimeError(f"ONNX export has outputs {outputs}, expected {OUTPUT_NAME!r}")
    if imputation is not None:
        entry = onx.metadata_props.add()
        entry.key = CONTRACT_METADATA_KEY
        entry.value = contract_metadata(MODEL_FEATURES, imputation, INPUT_NAME, OUTPUT_NAME,
                                        feature_definitions(MODEL_FEATURES))
    return onx.SerializeToString()


def _publish(target: Path, onnx_bytes: bytes, card: dict) -> None:
    """Write model + card into a temporary directory, then rename it into place in one step.

    Files, directory and rename are fsynced before returning: a `current` pointer written next
    must never survive a power loss that the model it names did not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        registry.write_synced(staging / registry.MODEL_FILE, onnx_bytes)
        registry.write_synced(staging / registry.CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
        registry.fsync_directory(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    registry.fsync_directory(target.parent)
