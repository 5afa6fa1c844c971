"""Directional sanity check of a model: a worse vital sign must never lower the risk.

    table = directional_table(model_scorer(model_dir, version))   # the probability at each step
    violations = directional_violations(table)                     # [] when the model passes

It does not read the coefficients (a model with constrained signs can still respond the wrong way
through a free feature, a trend or the imputation): it scores whole observation rounds. A calm
patient's round (CALM: NEWS2 0; the worker tests' calm rounds too) has one parameter worsened step by step,
the others kept calm, and the features are computed by the stream's own code (streams/state.py and
streams/features.py on canonical events), so the model sees what the worker would send it. Each
parameter is checked twice: as a patient's first round (no trend, windows of one value) and as the
next round after CALM_HISTORY calm hourly rounds (slopes, deltas, 6 h min/max and counts move too).

The probability must not decrease from one step to the next (TOLERANCE absorbs float32 noise).
The promotion gate (batch/retrain.py) keeps a model that fails as a candidate, the violating parameter
in its reasons; tests/wardwatch/test_models.py checks the shipped model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from streams.features import compute_features
from streams.state import apply_batch

# NEWS2 0: every parameter in its normal band, on air, alert
CALM: dict[str, float] = {codes.RESP_RATE: 16, codes.SPO2: 97, codes.O2_FLOW: 0.0, codes.SYSTOLIC_BP: 125,
                          codes.HEART_RATE: 75, codes.CONSCIOUSNESS: 0, codes.TEMPERATURE: 37.0}
# parameter -> (code, steps from calm to worse as (label, value)); each worse by the clinical scales
WORSENING: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "consciousness": (codes.CONSCIOUSNESS, tuple((level, float(i)) for i, level in enumerate(codes.ACVPU))),
    "resp_rate": (codes.RESP_RATE, tuple((f"{v:g}/min", float(v)) for v in (16, 24, 30, 35))),
    "spo2": (codes.SPO2, tuple((f"{v:g} %", float(v)) for v in (97, 94, 92, 88))),
    "systolic_bp": (codes.SYSTOLIC_BP, tuple((f"{v:g} mm[Hg]", float(v)) for v in (125, 110, 100, 90, 80))),
    "o2_flow": (codes.O2_FLOW, tuple((f"{v:g} L/min", float(v)) for v in (0, 2, 6))),
}
CALM_HISTORY = 3  # calm rounds, an hour apart, before the worsened one (the "after calm rounds" context)
TOLERANCE = 1e-6
_T0 = 1_767_225_600_000  # 2026-01-01T00:00Z: any time works, the features only see differences
_HOUR_MS = 3_600_000

# features of rows -> probability of deterioration per row
Score = Callable[[Sequence[dict]], np.ndarray]


def round_features(values: dict[str, float], history: int = 0) -> dict:
    """The stream's features at the time of a round of `values`, after `history` calm hourly rounds."""
    rounds = [(_T0 - (history - i) * _HOUR_MS, CALM) for i in range(history)] + [(_T0, values)]
    events = [CanonicalEvent(patient_id="directional", code=code, value=float(v), unit=None, effective_ms=t,
                             issued_ms=t, status=Status.FINAL, source=Source.CDC,
                             fact_id=f"directional:{t}:{code}", version=1)
              for t, row in rounds for code, v in row.items()]
    state = apply_batch(None, events, allowed_lateness_ms=_HOUR_MS, dedupe_horizon_ms=48 * _HOUR_MS,
                        cross_source_tolerance=0.05).state
    return compute_features(state, _T0)


def directional_table(score: Score) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """{parameter: {"first round" | "after calm rounds": [(step label, probability), ...]}}."""
    table: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for parameter, (code, steps) in WORSENING.items():
        table[parameter] = {}
        for context, history in (("first round", 0), ("after calm rounds", CALM_HISTORY)):
            rows = [round_features(CALM | {code: value}, history) for _, value in steps]
            table[parameter][context] = [(label, float(p)) for (label, _), p in zip(steps, score(rows))]
    return table


def directional_violations(table: dict[str, dict[str, list[tuple[str, float]]]]) -> list[str]:
    """One line per parameter and context of a directional_table where a worse step lowers the probability
    (the first such step), e.g. "consciousness (first round): risk falls from 0.995 at C to 0.630 at V"."""
    out = []
    for parameter, contexts in table.items():
        for context, steps in contexts.items():
            for (before, p0), (after, p1) in zip(steps, steps[1:]):
                if p1 < p0 - TOLERANCE:
                    out.append(f"{parameter} ({context}): risk falls from {p0:.3f} at {before} to {p1:.3f} at {after}")
                    break
    return out


def registered_model(model_dir, version: str):
    """(contract, session) of a registered version, opened as the worker opens it (without its checks: the
    gate reports a broken contract as a reason, it does not crash on it)."""
    from batch import registry
    from schemas.model_contract import ModelContract
    from streams.scoring import inference_session

    path = registry.model_path(model_dir, version)
    return ModelContract.from_card(registry.load_card(model_dir, version)), inference_session(path.read_bytes(),
                                                                                              path.parent)


def model_scorer(model_dir, version: str) -> Score:
    """A registered model as a Score, fed as the worker feeds it (streams/scoring.py model_input: the card's
    feature order, its imputation values for missing features, float32, one run per row)."""
    from streams.scoring import feature_matrix, model_input, model_probabilities

    contract, session = registered_model(model_dir, version)

    def score(rows: Sequence[dict]) -> np.ndarray:
        x, _ = model_input(contract, feature_matrix(contract.features, rows))
        return model_probabilities(session, contract, x)

    return score
