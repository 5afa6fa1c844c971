"""Feature specs, declared once as data. The stream (streams/features.py) computes them incrementally
per patient; the batch (batch/features.py) computes them vectorized from the archive. Both iterate
over FEATURES and DERIVED below; neither hard-codes a code or a window.

Semantics of one feature at a scoring point (patient p, scoring time T in ms):

- The *visible facts* are p's accepted facts (see docs/patient-state.md: dedupe, lateness,
  corrections) as known at that scoring point, each at its latest version; retracted facts are
  not visible.
- The window of a spec with `window_s = W` holds the visible facts of `spec.code` with
  `T - W*1000 < effective_ms <= T`.
- Aggregations over the window's values:
    last   value of the fact with the greatest (effective_ms, fact_id)
    mean   arithmetic mean
    min    minimum
    max    maximum
    count  number of facts (0 when empty, never missing)
    time_since_last_s   (T - greatest effective_ms) / 1000
  An empty window gives None (missing) for every aggregation except count. Missing is explicit,
  never zero.
- Derived features are functions of base features at the same scoring point; if any input is
  missing the derived feature is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from schemas import codes
from schemas.scores import news2, news2_subscores, qsofa

Aggregation = Literal["last", "mean", "min", "max", "count", "time_since_last_s"]
AGGREGATIONS: tuple[str, ...] = ("last", "mean", "min", "max", "count", "time_since_last_s")

HOUR = 3600


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    code: str  # canonical code (schemas.codes)
    agg: Aggregation
    window_s: int


@dataclass(frozen=True, slots=True)
class DerivedSpec:
    name: str
    inputs: tuple[str, ...]  # names of base features, in the order `fn` takes them
    fn: Callable[..., float | int]


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("heart_rate_last_24h", codes.HEART_RATE, "last", 24 * HOUR),
    FeatureSpec("heart_rate_max_1h", codes.HEART_RATE, "max", 1 * HOUR),
    FeatureSpec("heart_rate_mean_6h", codes.HEART_RATE, "mean", 6 * HOUR),
    FeatureSpec("heart_rate_time_since_last_s_24h", codes.HEART_RATE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("resp_rate_last_24h", codes.RESP_RATE, "last", 24 * HOUR),
    FeatureSpec("resp_rate_mean_1h", codes.RESP_RATE, "mean", 1 * HOUR),
    FeatureSpec("resp_rate_max_6h", codes.RESP_RATE, "max", 6 * HOUR),
    FeatureSpec("spo2_last_24h", codes.SPO2, "last", 24 * HOUR),
    FeatureSpec("spo2_min_6h", codes.SPO2, "min", 6 * HOUR),
    FeatureSpec("o2_flow_last_24h", codes.O2_FLOW, "last", 24 * HOUR),
    FeatureSpec("systolic_bp_last_24h", codes.SYSTOLIC_BP, "last", 24 * HOUR),
    FeatureSpec("systolic_bp_min_6h", codes.SYSTOLIC_BP, "min", 6 * HOUR),
    FeatureSpec("temperature_last_24h", codes.TEMPERATURE, "last", 24 * HOUR),
    FeatureSpec("temperature_max_24h", codes.TEMPERATURE, "max", 24 * HOUR),
    FeatureSpec("consciousness_last_24h", codes.CONSCIOUSNESS, "last", 24 * HOUR),
    FeatureSpec("lactate_last_24h", codes.LACTATE, "last", 24 * HOUR),
    FeatureSpec("wbc_last_24h", codes.WBC, "last", 24 * HOUR),
    FeatureSpec("creatinine_last_24h", codes.CREATININE, "last", 24 * HOUR),
    FeatureSpec("vitals_count_6h", codes.HEART_RATE, "count", 6 * HOUR),
)

MAX_WINDOW_S = max(f.window_s for f in FEATURES)

_NEWS2_INPUTS = (
    "resp_rate_last_24h",
    "spo2_last_24h",
    "o2_flow_last_24h",
    "systolic_bp_last_24h",
    "heart_rate_last_24h",
    "consciousness_last_24h",
    "temperature_last_24h",
)


def _news2(rr, spo2, o2_flow, sbp, hr, acvpu, temp) -> int:
    return news2(rr, spo2, o2_flow > 0, sbp, hr, codes.ACVPU[int(acvpu)], temp)


def _news2_sub(part: str):
    def fn(rr, spo2, o2_flow, sbp, hr, acvpu, temp) -> int:
        return news2_subscores(rr, spo2, o2_flow > 0, sbp, hr, codes.ACVPU[int(acvpu)], temp)[part]

    return fn


def _qsofa(rr, sbp, acvpu) -> int:
    return qsofa(rr, sbp, int(acvpu) > 0)


DERIVED: tuple[DerivedSpec, ...] = (
    DerivedSpec("on_oxygen", ("o2_flow_last_24h",), lambda flow: int(flow > 0)),
    DerivedSpec("news2", _NEWS2_INPUTS, _news2),
    *(DerivedSpec(f"news2_{part}", _NEWS2_INPUTS, _news2_sub(part))
      for part in ("resp_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness", "temperature")),
    DerivedSpec("qsofa", ("resp_rate_last_24h", "systolic_bp_last_24h", "consciousness_last_24h"), _qsofa),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES) + tuple(d.name for d in DERIVED)


def derive(base: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """Add the derived features to a dict of base features (shared by both planes: pure scoring rules)."""
    out = dict(base)
    for d in DERIVED:
        args = [out.get(n) for n in d.inputs]
        out[d.name] = None if any(a is None for a in args) else d.fn(*args)
    return out
