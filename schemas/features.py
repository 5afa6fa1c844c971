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
    delta  value of the last fact minus value of the first, both by (effective_ms, fact_id);
           needs >= 2 facts (one subtraction of two stored values: both planes agree exactly)
    slope  ordinary least-squares slope of value over effective time, in value units per hour:
               t_i = (effective_ms_i - effective_ms of the window's first fact) / 3_600_000
               slope = sum((t_i - mean(t)) * (v_i - mean(v))) / sum((t_i - mean(t))^2)
           (centred sums: no cancellation between large sums); needs >= 2 facts at >= 2
           distinct effective times (otherwise the denominator is 0).
  An empty window gives None (missing) for every aggregation except count; delta and slope are
  also missing when the window lacks what they need. Missing is explicit, never zero.
- Facts whose value is None never enter a window; events of another code system
  (schemas.codes.CONTEXT: encounter and patient facts) never enter features at all.
- Floats: both planes compute in IEEE double with the same operations in the same order, so they
  agree to the last bit: every sum (mean, and slope's means and centred sums) adds the window's
  facts one at a time in (effective_ms, fact_id) order, starting from the first; slope measures t
  in hours from the window's first fact, t_i = (effective_ms_i - effective_ms_first) / 3_600_000.
  last, min, max, count, time_since_last_s and delta are exact copies or one operation on the same
  inputs. Outputs are not rounded. (The parity report still allows |online - offline| <= 1e-9,
  batch/parity.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

from schemas import codes
from schemas.scores import (air_or_oxygen_score, consciousness_score, news2_subscores, pulse_score, qsofa,
                            resp_rate_score, spo2_scale1_score, systolic_bp_score, temperature_score)

# The clinically expected direction of a feature's effect on the risk of deterioration: +1 higher is worse,
# -1 lower is worse, None either way or unknown. Training constrains the sign of each coefficient to it
# (batch/train.py) and the promotion gate checks it on whole rounds (batch/directional.py). Declared only
# where it is clinically unambiguous within the ranges the training data holds; None is never wrong.
Direction = Literal[1, -1, None]

Aggregation = Literal["last", "mean", "min", "max", "count", "time_since_last_s", "delta", "slope"]
AGGREGATIONS: tuple[str, ...] = ("last", "mean", "min", "max", "count", "time_since_last_s", "delta", "slope")

# What a feature's values are: whole numbers (a count, a score, a flag) or real numbers. Stored with this
# type wherever a feature is stored (the DuckDB file's features_online, features_offline, labels.news2:
# batch/rebuild.py FEATURE_DTYPES), so the stream's and the batch's copies compare without a cast.
ValueType = Literal["integer", "real"]
# an aggregation of measured values keeps their type (real: canonical values are doubles); a count is whole;
# times since are seconds from milliseconds, so fractions
AGGREGATION_TYPES: dict[str, ValueType] = {
    "last": "real", "mean": "real", "min": "real", "max": "real", "count": "integer",
    "time_since_last_s": "real", "delta": "real", "slope": "real"}

HOUR = 3600


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    code: str  # canonical code (schemas.codes)
    agg: Aggregation
    window_s: int
    direction: Direction = None

    def __post_init__(self) -> None:
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"feature {self.name!r}: unknown aggregation {self.agg!r}; use one of {AGGREGATIONS}")
        if self.direction not in (1, -1, None):
            raise ValueError(f"feature {self.name!r}: direction must be +1, -1 or None")
        if self.window_s <= 0:
            raise ValueError(f"feature {self.name!r}: window_s must be a positive number of seconds")

    @property
    def value_type(self) -> ValueType:
        return AGGREGATION_TYPES[self.agg]


@dataclass(frozen=True, slots=True)
class DerivedSpec:
    name: str
    inputs: tuple[str, ...]  # names of features (base, or derived earlier), in the order `fn` takes them
    fn: Callable[..., float | int | None]
    # inputs `fn` takes after `inputs`, possibly None (the rest: a missing input makes the feature missing)
    optional: tuple[str, ...] = ()
    direction: Direction = None
    value_type: ValueType = "integer"  # `fn`'s values: every derived feature so far is a score or a flag
    # Which function computes it from `inputs`: bump it whenever `fn` (or what it calls, schemas/scores.py)
    # gives another value for the same inputs (a NEWS2 band moved, a new rule). The model contract records it
    # (schemas/model_contract.py feature_definitions), so a model trained on the old function is refused, as
    # it is for a changed input: the inputs alone do not show a change of what is computed from them.
    definition_version: int = 1

    def __post_init__(self) -> None:
        if self.value_type not in ("integer", "real"):
            raise ValueError(f"feature {self.name!r}: value_type must be 'integer' or 'real'")
        if type(self.definition_version) is not int or self.definition_version < 1:
            raise ValueError(f"feature {self.name!r}: definition_version must be a whole number from 1")


# Names carry the aggregation and the window (heart_rate_slope_6h). Short windows (1 h) catch an
# acute change in frequently charted vitals, 6 h a trend across a few observation rounds, 24 h the
# labs (drawn once or twice a day) and the last known value of anything. The order is the model's
# input order (schemas/model_contract.py): retrain when it changes.
# Directions (the last field, see Direction): +1 the worst values a window keeps (HR/RR max, consciousness
# ordinals, oxygen, lactate), -1 SpO2 and systolic BP, its fall too (slope, delta: the training data
# holds no SBP above 153, so the hypertensive end NEWS2 also scores is out of range, and a falling BP is
# the way to shock). None: what is bad both ways in the data (heart rate last/mean: 57-140; respiratory
# rate last/mean: 8-33, 314 points at <= 11 score in NEWS2 too; temperature), the other trends, counts,
# times since, WBC and creatinine (not a deterioration criterion here).
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("heart_rate_last_24h", codes.HEART_RATE, "last", 24 * HOUR),
    FeatureSpec("heart_rate_mean_1h", codes.HEART_RATE, "mean", 1 * HOUR),
    FeatureSpec("heart_rate_max_1h", codes.HEART_RATE, "max", 1 * HOUR, +1),
    FeatureSpec("heart_rate_mean_6h", codes.HEART_RATE, "mean", 6 * HOUR),
    FeatureSpec("heart_rate_max_6h", codes.HEART_RATE, "max", 6 * HOUR, +1),
    FeatureSpec("heart_rate_slope_6h", codes.HEART_RATE, "slope", 6 * HOUR),
    FeatureSpec("heart_rate_delta_24h", codes.HEART_RATE, "delta", 24 * HOUR),
    FeatureSpec("heart_rate_time_since_last_s_24h", codes.HEART_RATE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("resp_rate_last_24h", codes.RESP_RATE, "last", 24 * HOUR),
    FeatureSpec("resp_rate_mean_1h", codes.RESP_RATE, "mean", 1 * HOUR),
    FeatureSpec("resp_rate_max_6h", codes.RESP_RATE, "max", 6 * HOUR, +1),
    FeatureSpec("resp_rate_slope_6h", codes.RESP_RATE, "slope", 6 * HOUR),
    FeatureSpec("resp_rate_time_since_last_s_24h", codes.RESP_RATE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("spo2_last_24h", codes.SPO2, "last", 24 * HOUR, -1),
    FeatureSpec("spo2_min_1h", codes.SPO2, "min", 1 * HOUR, -1),
    FeatureSpec("spo2_min_6h", codes.SPO2, "min", 6 * HOUR, -1),
    FeatureSpec("spo2_slope_6h", codes.SPO2, "slope", 6 * HOUR),
    FeatureSpec("o2_flow_last_24h", codes.O2_FLOW, "last", 24 * HOUR, +1),
    FeatureSpec("systolic_bp_last_24h", codes.SYSTOLIC_BP, "last", 24 * HOUR, -1),
    FeatureSpec("systolic_bp_min_6h", codes.SYSTOLIC_BP, "min", 6 * HOUR, -1),
    FeatureSpec("systolic_bp_slope_6h", codes.SYSTOLIC_BP, "slope", 6 * HOUR, -1),
    FeatureSpec("systolic_bp_delta_24h", codes.SYSTOLIC_BP, "delta", 24 * HOUR, -1),
    FeatureSpec("temperature_last_24h", codes.TEMPERATURE, "last", 24 * HOUR),
    FeatureSpec("temperature_max_24h", codes.TEMPERATURE, "max", 24 * HOUR),
    FeatureSpec("temperature_slope_6h", codes.TEMPERATURE, "slope", 6 * HOUR),
    FeatureSpec("temperature_time_since_last_s_24h", codes.TEMPERATURE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("consciousness_last_24h", codes.CONSCIOUSNESS, "last", 24 * HOUR, +1),
    FeatureSpec("consciousness_max_24h", codes.CONSCIOUSNESS, "max", 24 * HOUR, +1),  # worst ACVPU level
    FeatureSpec("lactate_last_24h", codes.LACTATE, "last", 24 * HOUR, +1),
    FeatureSpec("lactate_max_24h", codes.LACTATE, "max", 24 * HOUR, +1),
    FeatureSpec("lactate_delta_24h", codes.LACTATE, "delta", 24 * HOUR),
    FeatureSpec("lactate_time_since_last_s_24h", codes.LACTATE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("wbc_last_24h", codes.WBC, "last", 24 * HOUR),
    FeatureSpec("wbc_max_24h", codes.WBC, "max", 24 * HOUR),
    FeatureSpec("wbc_time_since_last_s_24h", codes.WBC, "time_since_last_s", 24 * HOUR),
    FeatureSpec("creatinine_last_24h", codes.CREATININE, "last", 24 * HOUR),
    FeatureSpec("creatinine_delta_24h", codes.CREATININE, "delta", 24 * HOUR),
    FeatureSpec("creatinine_time_since_last_s_24h", codes.CREATININE, "time_since_last_s", 24 * HOUR),
    FeatureSpec("vitals_count_6h", codes.HEART_RATE, "count", 6 * HOUR),
    # when SpO2 and oxygen were last charted: NEWS2's air/oxygen is read at the latest SpO2 (on_oxygen)
    FeatureSpec("spo2_time_since_last_s_24h", codes.SPO2, "time_since_last_s", 24 * HOUR),
    FeatureSpec("o2_flow_time_since_last_s_24h", codes.O2_FLOW, "time_since_last_s", 24 * HOUR),
    # oxygen charted as an inhaled concentration (venturi mask, high flow) instead of a flow. Appended:
    # a model reads its inputs by name from its card, so one trained before these ignores them
    FeatureSpec("fio2_last_24h", codes.FIO2, "last", 24 * HOUR, +1),
    FeatureSpec("fio2_time_since_last_s_24h", codes.FIO2, "time_since_last_s", 24 * HOUR),
    # on oxygen with the flow not charted (schemas.codes.SUPPLEMENTAL_O2): when, for on_oxygen (appended)
    FeatureSpec("supplemental_oxygen_time_since_last_s_24h", codes.SUPPLEMENTAL_O2, "time_since_last_s", 24 * HOUR),
)

MAX_WINDOW_S = max(f.window_s for f in FEATURES)

# oxygen charted this long before the latest SpO2 still belongs to its observation round (clinosim
# charts the flow 5 s before the saturation)
SAME_ROUND_S = 10 * 60
ROOM_AIR_FIO2 = 21.0  # % oxygen in room air: an FiO2 above it is supplemental oxygen


def _on_oxygen(flow: float | None, o2_age_s: float | None, spo2_age_s: float | None,
               fio2: float | None = None, fio2_age_s: float | None = None,
               unmetered_age_s: float | None = None) -> int | None:
    """NEWS2's "air or oxygen" at the latest SpO2 reading: 1 when a flow above 0 or an FiO2 above 21 %
    (room air) was charted in that observation round, or oxygen without a flow (`unmetered_age_s`: a
    SUPPLEMENTAL_O2 fact) that no later flow or FiO2 contradicts. A round without any is air: FHIR feeds
    chart oxygen only while it is given, so an older flow or FiO2 is a past episode, not the present one
    (a CDC row charts air as flow 0). None when neither SpO2 nor oxygen was charted in 24 h; without the
    times (a snapshot archived before they existed) the latest flow and FiO2 decide, as the flow used
    to. A snapshot archived before FiO2 was read has no FiO2 keys: the flow alone decides, as before."""
    if flow is None and fio2 is None and unmetered_age_s is None:
        return None if spo2_age_s is None else 0
    unmetered = (unmetered_age_s is not None
                 and (spo2_age_s is None or unmetered_age_s <= spo2_age_s + SAME_ROUND_S)
                 and all(age is None or unmetered_age_s <= age for age in (o2_age_s, fio2_age_s)))
    return int(unmetered or _given(flow, 0.0, o2_age_s, spo2_age_s)
               or _given(fio2, ROOM_AIR_FIO2, fio2_age_s, spo2_age_s))


def _given(value: float | None, air: float, age_s: float | None, spo2_age_s: float | None) -> bool:
    """Oxygen charted as `value` (air at `air` or below) in the latest SpO2's round."""
    if value is None or value <= air:
        return False
    return age_s is None or spo2_age_s is None or age_s <= spo2_age_s + SAME_ROUND_S


_NEWS2_INPUTS = (
    "resp_rate_last_24h",
    "spo2_last_24h",
    "on_oxygen",
    "systolic_bp_last_24h",
    "heart_rate_last_24h",
    "consciousness_last_24h",
    "temperature_last_24h",
)


@lru_cache(maxsize=1)
def _news2_parts(rr, spo2, on_oxygen, sbp, hr, acvpu, temp) -> dict[str, int]:
    """The sub-scores of one set of inputs. news2 and its seven sub-scores are derived one after the
    other from the same inputs: they share one evaluation (a pure function; the result is only read).
    Not typed: equal inputs of another type (1 and 1.0) score the same, and the typed key, twice as
    long, cost ~1 us per scoring point in the cache's lookups."""
    return news2_subscores(rr, spo2, on_oxygen == 1, sbp, hr, codes.ACVPU[int(acvpu)], temp)


def _news2(rr, spo2, on_oxygen, sbp, hr, acvpu, temp) -> int:
    return sum(_news2_parts(rr, spo2, on_oxygen, sbp, hr, acvpu, temp).values())  # schemas.scores.news2


def _news2_sub(part: str):
    def fn(rr, spo2, on_oxygen, sbp, hr, acvpu, temp) -> int:
        return _news2_parts(rr, spo2, on_oxygen, sbp, hr, acvpu, temp)[part]

    return fn


_NEWS2_PART_SCORES = {"resp_rate": resp_rate_score, "spo2": spo2_scale1_score,
                      "air_or_oxygen": lambda on_oxygen: air_or_oxygen_score(on_oxygen == 1),
                      "systolic_bp": systolic_bp_score, "pulse": pulse_score,
                      "consciousness": lambda acvpu: consciousness_score(codes.ACVPU[int(acvpu)]),
                      "temperature": temperature_score}

_NEWS2_PART_NAMES = tuple(f"news2_{part}" for part in _NEWS2_PART_SCORES)  # built once: read at every scoring point
_NEWS2_PART_INPUTS = tuple(zip(_NEWS2_PART_NAMES, _NEWS2_PART_SCORES.values(), _NEWS2_INPUTS, strict=True))


def news2_charted_parts(features: dict) -> dict[str, int]:
    """The NEWS2 sub-scores ("news2_<part>" -> points) of the parameters charted: all seven when NEWS2 is
    known, else those whose input is present, each scored on its own (a sub-score needs only its input).
    For the rule's triggers, not a feature: NEWS2 and its sub-score features stay missing then."""
    if features.get("news2") is not None:
        return {name: features[name] for name in _NEWS2_PART_NAMES}
    return {part: score(features[name]) for part, score, name in _NEWS2_PART_INPUTS if features.get(name) is not None}


def _qsofa(rr, sbp, acvpu) -> int:
    return qsofa(rr, sbp, int(acvpu) > 0)


# every score point is worse: NEWS2, each of its sub-scores (temperature's too: points both ways), qSOFA
DERIVED: tuple[DerivedSpec, ...] = (
    DerivedSpec("on_oxygen", (), _on_oxygen,
                optional=("o2_flow_last_24h", "o2_flow_time_since_last_s_24h", "spo2_time_since_last_s_24h",
                          "fio2_last_24h", "fio2_time_since_last_s_24h",
                          "supplemental_oxygen_time_since_last_s_24h"), direction=+1),
    DerivedSpec("news2", _NEWS2_INPUTS, _news2, direction=+1),
    *(DerivedSpec(f"news2_{part}", _NEWS2_INPUTS, _news2_sub(part), direction=+1)
      for part in ("resp_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness", "temperature")),
    DerivedSpec("qsofa", ("resp_rate_last_24h", "systolic_bp_last_24h", "consciousness_last_24h"), _qsofa,
                direction=+1),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES) + tuple(d.name for d in DERIVED)
# what NEWS2 reads: the worker serves the model only where all are charted (streams/scoring.py), and the
# offline evaluation and training take the same rows (batch/train.py SERVED)
NEWS2_INPUTS: tuple[str, ...] = _NEWS2_INPUTS
# name -> direction, in FEATURE_NAMES order
FEATURE_DIRECTIONS: dict[str, Direction] = {s.name: s.direction for s in (*FEATURES, *DERIVED)}
# name -> value type, in FEATURE_NAMES order
FEATURE_TYPES: dict[str, ValueType] = {s.name: s.value_type for s in (*FEATURES, *DERIVED)}


def derive(base: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """Add the derived features to a dict of base features: the stream's computation (streams/features.py,
    streams/scoring.py). The batch computes NEWS2, its sub-scores and qSOFA itself, from the charts as data
    (batch/features.py _with_derived); only on_oxygen's function is shared."""
    out = dict(base)
    add_derived(out)
    return out


def add_derived(features: dict[str, float | int | None]) -> None:
    """derive() in place, in DERIVED order (a derived feature may read an earlier one)."""
    inputs: tuple[str, ...] | None = None
    args: list = []
    for d in DERIVED:
        if d.inputs is not inputs:  # NEWS2 and its sub-scores share one inputs tuple: look it up once
            inputs, args = d.inputs, list(map(features.get, d.inputs))
        if None in args:
            features[d.name] = None
        elif d.optional:
            features[d.name] = d.fn(*args, *map(features.get, d.optional))
        else:
            features[d.name] = d.fn(*args)
