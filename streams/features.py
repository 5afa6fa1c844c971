"""Features of one patient at scoring time T, computed from the live facts of its PatientState.

Iterates over schemas.features.FEATURES (never a hard-coded code or window), grouped once at import
by code and window with each aggregation a direct function (_PLAN); the semantics are documented
there. Facts per code are sorted by (effective_ms, fact_id), so each window is two
bisects, `last` is the window's final element and `first` (for delta) its first one. Only codes
some spec reads are looked at: anything else in the state (e.g. a context fact) is never touched.

Floats follow the spec's arithmetic to the letter (sums as left folds in window order, slope times
in hours from the window's first fact), because the batch reproduces them to the last bit.

Cost per scoring point: per code with facts a bisect for T, a bisect for its widest window and one
pass over it (its values); each narrower window (until one is empty) is a bisect in the widest and a
slice of its facts and values; plus a pass for mean, min, max and slope.
State is pruned at MAX_WINDOW_S (streams/state.py), so a window holds at most a day of one code's
facts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from operator import itemgetter

from schemas.features import FEATURES, add_derived
from streams.state import EFFECTIVE_MS, VALUE, LiveFact, PatientState

MS_PER_HOUR = 3_600_000

# an aggregation over a non-empty window: (facts, their values, T) -> feature value
Aggregate = Callable[[Sequence[LiveFact], list[float], int], float | int | None]


def compute_features(state: PatientState, T: int) -> dict[str, float | int | None]:
    """Every base feature (in FEATURES order), then the derived ones (schemas.features.derive)."""
    values = list(_EMPTY_WINDOW)  # what an empty window gives: missing, or 0 for a count
    for code, (width_ms, aggregations), narrower in _PLAN:
        facts = state.facts.get(code)
        if not facts:
            continue
        hi = bisect_left(facts, (T + 1,))  # every window of a code ends at T
        lo = bisect_left(facts, (T - width_ms + 1,), 0, hi)
        window, window_values = _with_values(facts[lo:hi])
        if not window:
            continue  # the narrower windows are empty too
        for i, aggregate in aggregations:
            values[i] = aggregate(window, window_values, T)
        for width_ms, aggregations in narrower:  # each a tail of the widest: its facts and values sliced
            lo = bisect_left(window, (T - width_ms + 1,))
            if lo == len(window):
                break  # the narrower windows are empty too
            narrow, narrow_values = window[lo:], window_values[lo:]
            for i, aggregate in aggregations:
                values[i] = aggregate(narrow, narrow_values, T)
    features = dict(zip(_BASE_NAMES, values))
    add_derived(features)
    return features


_value = itemgetter(VALUE)


def _with_values(window: list[LiveFact]) -> tuple[list[LiveFact], list[float]]:
    """The window's facts that carry a value, and their values, index for index."""
    values = list(map(_value, window))
    if None in values:  # not a measurement (the batch drops these too); never expected, so check cheaply
        window = [f for f in window if f[VALUE] is not None]
        values = list(map(_value, window))
    return window, values


# --- the aggregations, over a window that is not empty (schemas/features.py has their semantics) ----


def _last(facts: Sequence[LiveFact], values: list[float], T: int) -> float:
    return values[-1]


def _mean(facts: Sequence[LiveFact], values: list[float], T: int) -> float:
    return _left_sum(values) / len(values)


def _min(facts: Sequence[LiveFact], values: list[float], T: int) -> float:
    return min(values)


def _max(facts: Sequence[LiveFact], values: list[float], T: int) -> float:
    return max(values)


def _count(facts: Sequence[LiveFact], values: list[float], T: int) -> int:
    return len(facts)


def _time_since_last_s(facts: Sequence[LiveFact], values: list[float], T: int) -> float:
    return (T - facts[-1][EFFECTIVE_MS]) / 1000


def _delta(facts: Sequence[LiveFact], values: list[float], T: int) -> float | None:
    return values[-1] - values[0] if len(values) >= 2 else None


def _slope(facts: Sequence[LiveFact], values: list[float], T: int) -> float | None:
    return _slope_per_hour(facts, values)


AGGREGATES: dict[str, Aggregate] = {"last": _last, "mean": _mean, "min": _min, "max": _max, "count": _count,
                                    "time_since_last_s": _time_since_last_s, "delta": _delta, "slope": _slope}


def _left_sum(xs: list[float]) -> float:
    """First to last, one addition at a time: the summation order schemas/features.py fixes (the
    built-in sum() compensates rounding from Python 3.12 on, which would differ in the last bit)."""
    total = 0.0
    for x in xs:
        total += x
    return total


def _slope_per_hour(facts: Sequence[LiveFact], values: list[float]) -> float | None:
    """Least-squares slope of value over time in hours, centred (two passes: no cancellation of
    large sums); None unless the window spans two distinct times (it is sorted by time)."""
    first_ms = facts[0][EFFECTIVE_MS]
    if facts[-1][EFFECTIVE_MS] == first_ms:
        return None
    hours = [(f[EFFECTIVE_MS] - first_ms) / MS_PER_HOUR for f in facts]
    n = len(values)
    mean_t = _left_sum(hours) / n
    mean_v = _left_sum(values) / n
    sxy = sxx = 0.0
    for t, v in zip(hours, values):
        dt = t - mean_t
        sxy += dt * (v - mean_v)
        sxx += dt * dt
    return sxy / sxx


# --- the specs as a plan, made once at import ----------------------------------------------------


# a window of a code: (width_ms, ((position of the spec in FEATURES, its aggregation), ...))
_WindowPlan = tuple[int, tuple[tuple[int, Aggregate], ...]]
# code -> its widest window, then the narrower ones, widest first
_CodePlan = tuple[str, _WindowPlan, tuple[_WindowPlan, ...]]


def _plan() -> tuple[_CodePlan, ...]:
    """FEATURES grouped by code, then by window (widest first), so that a code's facts are sliced and
    their values listed once per scoring point: a narrower window is a tail of the widest. A window
    holds the facts with T - width < effective_ms <= T (integer ms)."""
    grouped: dict[str, dict[int, list[tuple[int, Aggregate]]]] = {}
    for i, spec in enumerate(FEATURES):
        if spec.agg not in AGGREGATES:
            raise ValueError(f"feature {spec.name!r}: no stream implementation of aggregation {spec.agg!r}")
        grouped.setdefault(spec.code, {}).setdefault(spec.window_s * 1000, []).append((i, AGGREGATES[spec.agg]))
    plan = []
    for code, windows in grouped.items():
        widest, *narrower = ((width_ms, tuple(aggs)) for width_ms, aggs in sorted(windows.items(), reverse=True))
        plan.append((code, widest, tuple(narrower)))
    return tuple(plan)


_PLAN = _plan()
_BASE_NAMES = tuple(spec.name for spec in FEATURES)
_EMPTY_WINDOW = tuple(0 if spec.agg == "count" else None for spec in FEATURES)
