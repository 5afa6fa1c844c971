"""Features of one patient at scoring time T, computed from the live facts of its PatientState.

Iterates over schemas.features.FEATURES (never a hard-coded code or window); the semantics are
documented there. Facts per code are sorted by (effective_ms, fact_id), so each window is two
bisects and `last` is the window's final element.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from schemas.features import FEATURES, derive
from streams.state import EFFECTIVE_MS, VALUE, LiveFact, PatientState


def compute_features(state: PatientState, T: int) -> dict[str, float | int | None]:
    """Every base feature (in FEATURES order), then the derived ones (schemas.features.derive)."""
    windows: dict[tuple[str, int], Sequence[LiveFact]] = {}  # specs often share (code, window)
    base: dict[str, float | int | None] = {}
    for spec in FEATURES:
        key = (spec.code, spec.window_s)
        window = windows.get(key)
        if window is None:
            window = windows[key] = _window(state.live(spec.code), T, spec.window_s * 1000)
        base[spec.name] = _aggregate(spec.agg, window, T)
    return derive(base)


def _window(facts: list[LiveFact], T: int, width_ms: int) -> list[LiveFact]:
    """Facts with T - width < effective_ms <= T (times are integer ms)."""
    lo = bisect_left(facts, (T - width_ms + 1,))
    hi = bisect_left(facts, (T + 1,))
    return facts[lo:hi]


def _aggregate(agg: str, window: Sequence[LiveFact], T: int) -> float | int | None:
    if agg == "count":
        return len(window)
    if not window:
        return None  # missing is explicit, never zero
    if agg == "last":
        return window[-1][VALUE]
    if agg == "time_since_last_s":
        return (T - window[-1][EFFECTIVE_MS]) / 1000
    values = [f[VALUE] for f in window]
    if agg == "mean":
        return sum(values) / len(values)
    if agg == "min":
        return min(values)
    if agg == "max":
        return max(values)
    raise ValueError(f"unknown aggregation {agg!r}")
