"""NEWS2 and qSOFA against the published tables (DOMAIN.md section 4): every band edge, both sides."""

import pytest

from schemas import scores

# NEWS2 (RCP 2017), SpO2 scale 1: (value, points) on each side of every band edge
RESP_RATE = [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)]
SPO2_SCALE1 = [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0)]
SYSTOLIC_BP = [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)]
PULSE = [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]
TEMPERATURE = [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2)]
# a measured temperature takes its charted value, to 0.1 C (schemas.scores._chart_1dp) before the bands: 35.04 charts 35.0
# (3 points), 38.04 charts 38.0 (0), 38.06 charts 38.1 (1). Both planes read this function (schemas/features.py
# DERIVED): parity cannot catch a change to it, only these cases
TEMPERATURE += [(35.04, 3), (36.04, 1), (38.04, 0), (38.06, 1), (39.04, 1)]
CONSCIOUSNESS = [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)]


@pytest.mark.parametrize("rr, points", RESP_RATE)
def test_resp_rate_bands(rr, points):
    assert scores.resp_rate_score(rr) == points


@pytest.mark.parametrize("spo2, points", SPO2_SCALE1)
def test_spo2_scale1_bands(spo2, points):
    assert scores.spo2_scale1_score(spo2) == points


@pytest.mark.parametrize("on_oxygen, points", [(True, 2), (False, 0)])
def test_air_or_oxygen(on_oxygen, points):
    assert scores.air_or_oxygen_score(on_oxygen) == points


@pytest.mark.parametrize("sbp, points", SYSTOLIC_BP)
def test_systolic_bp_bands(sbp, points):
    assert scores.systolic_bp_score(sbp) == points


@pytest.mark.parametrize("pulse, points", PULSE)
def test_pulse_bands(pulse, points):
    assert scores.pulse_score(pulse) == points


@pytest.mark.parametrize("temp, points", TEMPERATURE)
def test_temperature_bands(temp, points):
    assert scores.temperature_score(temp) == points


@pytest.mark.parametrize("level, points", CONSCIOUSNESS)
def test_consciousness(level, points):
    assert scores.consciousness_score(level) == points


def test_unknown_consciousness_level_is_rejected():
    with pytest.raises(ValueError):
        scores.consciousness_score("X")


def test_aggregate_is_the_sum_of_the_parameters():
    # RR 22 -> 2, SpO2 93 -> 2, oxygen -> 2, SBP 105 -> 1, pulse 115 -> 2, alert -> 0, 38.5 C -> 1
    assert scores.news2(22, 93, True, 105, 115, "A", 38.5) == 10
    # a healthy adult on air scores 0
    assert scores.news2(16, 98, False, 125, 72, "A", 36.8) == 0
    # the worst value of every parameter: 3 + 3 + 2 + 3 + 3 + 3 + 3
    assert scores.news2(6, 85, True, 80, 35, "U", 34.0) == 20


@pytest.mark.parametrize("total, any_three, band", [
    (0, False, "low"), (4, False, "low"), (3, True, "low-medium"), (4, True, "low-medium"),
    (5, False, "medium"), (6, True, "medium"), (7, False, "high"), (20, True, "high"),
])
def test_news2_trigger_bands(total, any_three, band):
    assert scores.news2_risk(total, any_three) == band


@pytest.mark.parametrize("rr, sbp, altered, expected", [
    (21, 101, False, 0),
    (22, 101, False, 1),  # RR >= 22 counts at 22 exactly
    (21, 100, False, 1),  # SBP <= 100 counts at 100 exactly
    (22, 100, False, 2),
    (21, 101, True, 1),
    (22, 100, True, 3),
    # fractional values take the charted integer, as NEWS2 does (RR 21.6 scores NEWS2's 21-24 band)
    (21.5, 101, False, 1), (21.49, 101, False, 0),
    (22, 100.4, False, 2), (22, 100.5, False, 1),
])
def test_qsofa_boundaries(rr, sbp, altered, expected):
    assert scores.qsofa(rr, sbp, altered) == expected
