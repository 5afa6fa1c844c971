"""NEWS2 (Royal College of Physicians, 2017; SpO2 scale 1) and qSOFA (Sepsis-3) as plain functions.

    from schemas.scores import news2, qsofa
    news2(resp_rate, spo2, on_oxygen, systolic_bp, pulse, consciousness, temperature) -> int
    qsofa(resp_rate, systolic_bp, altered_mentation) -> int

Band edges follow the published charts. Charted values are integers except temperature (one
decimal); a fractional value between two bands (e.g. SpO2 95.5) takes the band of the value rounded
half-up to the chart's precision, which is how a nurse charts it.

The same charts are declared a second time below as data (NEWS2_BANDS, NEWS2_DECIMALS,
NEWS2_OXYGEN_POINTS, NEWS2_CONSCIOUSNESS_POINTS, QSOFA_CRITERIA, QSOFA_ALTERED_MENTATION). The two
encodings are the two planes' computations: the stream calls the functions (schemas/features.py
DERIVED), the batch builds Polars expressions from the tables (batch/features.py), so parity compares
two independent encodings of one chart; tests/schemas/test_scores.py checks both against the
published chart and against each other at every charted value.
"""

from __future__ import annotations

import math

CONSCIOUSNESS_LEVELS = ("A", "C", "V", "P", "U")


# NEWS2 (RCP 2017, SpO2 scale 1) as data. Per measured parameter, its bands in ascending order as
# (inclusive upper bound, points): the value charted to NEWS2_DECIMALS[parameter] decimals (rounded half
# up: floor(x * 10**d + 0.5) / 10**d) takes the points of the first band whose bound it does not exceed.
NEWS2_BANDS: dict[str, tuple[tuple[float, int], ...]] = {
    "resp_rate": ((8, 3), (11, 1), (20, 0), (24, 2), (math.inf, 3)),
    "spo2": ((91, 3), (93, 2), (95, 1), (math.inf, 0)),
    "systolic_bp": ((90, 3), (100, 2), (110, 1), (219, 0), (math.inf, 3)),
    "pulse": ((40, 3), (50, 1), (90, 0), (110, 1), (130, 2), (math.inf, 3)),
    "temperature": ((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1), (math.inf, 2)),
}
NEWS2_DECIMALS: dict[str, int] = {"resp_rate": 0, "spo2": 0, "systolic_bp": 0, "pulse": 0, "temperature": 1}
NEWS2_OXYGEN_POINTS = 2  # air_or_oxygen: on supplemental oxygen; air scores 0
NEWS2_CONSCIOUSNESS_POINTS: dict[str, int] = {"A": 0, "C": 3, "V": 3, "P": 3, "U": 3}
# the seven parameters, in the order news2_subscores (and schemas.features NEWS2_INPUTS) lists them
NEWS2_PARTS: tuple[str, ...] = ("resp_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness",
                                "temperature")
# qSOFA (Sepsis-3): a criterion is met when the charted integer lies in its inclusive range (RR >= 22,
# SBP <= 100); the third is altered mentation, a consciousness level other than alert
QSOFA_CRITERIA: dict[str, tuple[float, float]] = {"resp_rate": (22, math.inf), "systolic_bp": (-math.inf, 100)}
QSOFA_ALTERED_MENTATION: frozenset[str] = frozenset({"C", "V", "P", "U"})


def _chart_int(x: float) -> int:
    return math.floor(x + 0.5)


def _chart_1dp(x: float) -> float:
    return math.floor(x * 10 + 0.5) / 10


def resp_rate_score(rr: float) -> int:
    rr = _chart_int(rr)
    if rr <= 8:
        return 3
    if rr <= 11:
        return 1
    if rr <= 20:
        return 0
    if rr <= 24:
        return 2
    return 3


def spo2_scale1_score(spo2: float) -> int:
    spo2 = _chart_int(spo2)
    if spo2 <= 91:
        return 3
    if spo2 <= 93:
        return 2
    if spo2 <= 95:
        return 1
    return 0


def air_or_oxygen_score(on_oxygen: bool) -> int:
    return 2 if on_oxygen else 0


def systolic_bp_score(sbp: float) -> int:
    sbp = _chart_int(sbp)
    if sbp <= 90:
        return 3
    if sbp <= 100:
        return 2
    if sbp <= 110:
        return 1
    if sbp <= 219:
        return 0
    return 3


def pulse_score(pulse: float) -> int:
    pulse = _chart_int(pulse)
    if pulse <= 40:
        return 3
    if pulse <= 50:
        return 1
    if pulse <= 90:
        return 0
    if pulse <= 110:
        return 1
    if pulse <= 130:
        return 2
    return 3


def consciousness_score(level: str) -> int:
    if level not in CONSCIOUSNESS_LEVELS:
        raise ValueError(f"consciousness must be one of {CONSCIOUSNESS_LEVELS}, got {level!r}")
    return 0 if level == "A" else 3


def temperature_score(temp_c: float) -> int:
    t = _chart_1dp(temp_c)
    if t <= 35.0:
        return 3
    if t <= 36.0:
        return 1
    if t <= 38.0:
        return 0
    if t <= 39.0:
        return 1
    return 2


def news2_subscores(resp_rate, spo2, on_oxygen, systolic_bp, pulse, consciousness, temperature) -> dict[str, int]:
    return {
        "resp_rate": resp_rate_score(resp_rate),
        "spo2": spo2_scale1_score(spo2),
        "air_or_oxygen": air_or_oxygen_score(on_oxygen),
        "systolic_bp": systolic_bp_score(systolic_bp),
        "pulse": pulse_score(pulse),
        "consciousness": consciousness_score(consciousness),
        "temperature": temperature_score(temperature),
    }


def news2(resp_rate: float, spo2: float, on_oxygen: bool, systolic_bp: float, pulse: float,
          consciousness: str, temperature: float) -> int:
    """Aggregate NEWS2 score (0-20)."""
    return sum(news2_subscores(resp_rate, spo2, on_oxygen, systolic_bp, pulse, consciousness, temperature).values())


def news2_risk(total: int, any_three: bool) -> str:
    """Clinical risk band: 'low', 'low-medium' (a single parameter scoring 3), 'medium', 'high'."""
    if total >= 7:
        return "high"
    if total >= 5:
        return "medium"
    if any_three:
        return "low-medium"
    return "low"


def qsofa(resp_rate: float, systolic_bp: float, altered_mentation: bool) -> int:
    """qSOFA (0-3): RR >= 22, SBP <= 100, altered mentation. Positive at >= 2. RR and SBP are charted
    as integers, as for NEWS2: an RR of 21.6 is charted 22 and counts for both scores alike."""
    return (int(_chart_int(resp_rate) >= 22) + int(_chart_int(systolic_bp) <= 100)
            + int(bool(altered_mentation)))
