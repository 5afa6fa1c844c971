"""Features of one patient at scoring time T, computed from the live facts of its PatientState.

Iterates over schemas.features.FEATURES (never a hard-coded code or window); the semantics are
documented there. Facts per code are sorted by (effective_ms, fact_id), so each window is two
bisects, `last` is the window's final element and `first` (for delta) its first one. Only codes
some spec reads are looked at: anything else in the state (e.g. a context fact) is never touched.

Floats follow the spec's arithmetic to the letter (sums as left folds in window order, slope times
in hours from the window's first fact), because the batch reproduces them to the last bit.

Cost per scoring point (not per event: a patient is scored once per micro-batch): two bisects and
one pass over the window per distinct (code, window), plus a pass for mean, min, max and slope.
State is pruned at MAX_WINDOW_S (streams/state.py), so a window holds at most a day of one code's
facts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from schemas.features import FEATURES, derive
from streams.state import EFFECTIVE_MS, VALUE, LiveFact, PatientState

MS_PER_HOUR = 3_600_000


def compute_features(state: PatientState, T: int) -> dict[str, float | int | None]:
    """Every base feature (in FEATURES order), then the derived ones (schemas.features.derive)."""
    windows: dict[tuple[str, int], _Window] = {}  # specs often share (code, window): slice once
    base: dict[str, float | int | None] = {}
    for spec in FEATURES:
        key = (spec.code, spec.window_s)
        window = windows.get(key)
        if window is None:
            window = windows[key] = _window(state.live(spec.code), T, spec.window_s * 1000)
        base[spec.name] = _aggregate(spec.agg, window, T)
    return derive(base)


# a window's facts and their values, index for index
_Window = tuple[Sequence[LiveFact], list[float]]


def _window(facts: list[LiveFact], T: int, width_ms: int) -> _Window:
    """Facts with T - width < effective_ms <= T (times are integer ms) that carry a value."""
    lo = bisect_left(facts, (T - width_ms + 1,))
    hi = bisect_left(facts, (T + 1,))
    window = facts[lo:hi]
    values = [f[VALUE] for f in window]
    if None in values:  # not a measurement (the batch drops these too); never expected, so check cheaply
        window = [f for f in window if f[VALUE] is not None]
        values = [f[VALUE] for f in window]
    return window, values


def _aggregate(agg: str, window: _Window, T: int) -> float | int | None:
    facts, values = window
    if agg == "count":
        return len(facts)
    if not facts:
        return None  # missing is explicit, never zero
    if agg == "last":
        return values[-1]
    if agg == "time_since_last_s":
        return (T - facts[-1][EFFECTIVE_MS]) / 1000
    if agg == "delta":
        return values[-1] - values[0] if len(values) >= 2 else None
    if agg == "slope":
        return _slope_per_hour(facts, values)
    if agg == "mean":
        return _left_sum(values) / len(values)
    if agg == "min":
        return min(values)
    if agg == "max":
        return max(values)
    raise ValueError(f"unknown aggregation {agg!r}")


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
