"""NEWS2 and qSOFA against the published tables (DOMAIN.md section 4): every band edge, both sides.
Both encodings of schemas/scores.py (the functions the stream calls, the tables the batch builds its
expressions from) are checked against the chart, and against each other at every charted value."""

import math

import pytest

from schemas import scores

# NEWS2 (RCP 2017), SpO2 scale 1: (value, points) on each side of every band edge
RESP_RATE = [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)]
SPO2_SCALE1 = [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0)]
SYSTOLIC_BP = [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)]
PULSE = [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]
TEMPERATURE = [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2)]
# a measured temperature takes its charted value, to 0.1 C (schemas.scores._chart_1dp) before the bands: 35.04 charts 35.0
# (3 points), 38.04 charts 38.0 (0), 38.06 charts 38.1 (1). The batch charts with its own expression (from
# NEWS2_DECIMALS): parity compares the two, these cases fix both to the chart
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


# --- the tables (NEWS2_BANDS ...): the batch's encoding of the same charts ------------------------


def table_points(part: str, x: float) -> int:
    """Points of a measured parameter read off NEWS2_BANDS, charted to NEWS2_DECIMALS."""
    scale = 10 ** scores.NEWS2_DECIMALS[part]
    charted = math.floor(x * scale + 0.5) / scale
    return next(points for upper, points in scores.NEWS2_BANDS[part] if charted <= upper)


def table_qsofa(rr: float, sbp: float, level: str) -> int:
    charted = {"resp_rate": math.floor(rr + 0.5), "systolic_bp": math.floor(sbp + 0.5)}
    return (sum(lo <= charted[part] <= hi for part, (lo, hi) in scores.QSOFA_CRITERIA.items())
            + int(level in scores.QSOFA_ALTERED_MENTATION))


CHART = {"resp_rate": RESP_RATE, "spo2": SPO2_SCALE1, "systolic_bp": SYSTOLIC_BP, "pulse": PULSE,
         "temperature": TEMPERATURE}
FUNCTIONS = {"resp_rate": scores.resp_rate_score, "spo2": scores.spo2_scale1_score,
             "systolic_bp": scores.systolic_bp_score, "pulse": scores.pulse_score,
             "temperature": scores.temperature_score}
# every charted value in a range wider than any patient: integers, temperature in 0.1 C steps, and the
# half-steps between (where charting rounds up)
SWEEP = {"resp_rate": range(0, 81), "spo2": range(50, 101), "systolic_bp": range(30, 301),
         "pulse": range(0, 251), "temperature": range(300, 451)}


@pytest.mark.parametrize("part", sorted(CHART))
def test_the_bands_table_gives_the_published_chart_at_every_edge(part):
    assert [table_points(part, x) for x, _ in CHART[part]] == [points for _, points in CHART[part]]


def test_the_tables_cover_the_seven_parameters_and_the_other_three_rows_of_the_chart():
    assert set(scores.NEWS2_BANDS) | {"air_or_oxygen", "consciousness"} == set(scores.NEWS2_PARTS)
    assert tuple(scores.news2_subscores(16, 97, False, 120, 70, "A", 37.0)) == scores.NEWS2_PARTS
    assert scores.NEWS2_OXYGEN_POINTS == scores.air_or_oxygen_score(True) == 2
    assert scores.NEWS2_CONSCIOUSNESS_POINTS == {level: points for level, points in CONSCIOUSNESS}
    assert set(scores.NEWS2_CONSCIOUSNESS_POINTS) == set(scores.CONSCIOUSNESS_LEVELS)


@pytest.mark.parametrize("part", sorted(SWEEP))
def test_the_bands_table_and_the_functions_agree_at_every_charted_value(part):
    scale = 10 ** scores.NEWS2_DECIMALS[part]
    values = [i / scale for i in SWEEP[part]] + [(i + 0.5) / scale for i in SWEEP[part]]
    differ = {x: (table_points(part, x), FUNCTIONS[part](x)) for x in values
              if table_points(part, x) != FUNCTIONS[part](x)}
    assert not differ, f"{part}: value -> (table, function) {differ}"


@pytest.mark.parametrize("rr, sbp, altered, expected", [
    (21, 101, False, 0), (22, 101, False, 1), (21, 100, False, 1), (22, 100, True, 3),
    (21.5, 101, False, 1), (21.49, 101, False, 0), (22, 100.4, False, 2), (22, 100.5, False, 1)])
def test_the_qsofa_table_gives_the_published_criteria(rr, sbp, altered, expected):
    assert table_qsofa(rr, sbp, "V" if altered else "A") == expected


def test_the_qsofa_table_and_function_agree_at_every_charted_value():
    differ = [(rr / 2, sbp / 2, level) for rr in range(0, 121) for sbp in range(120, 401, 1)
              for level in scores.CONSCIOUSNESS_LEVELS
              if table_qsofa(rr / 2, sbp / 2, level) != scores.qsofa(rr / 2, sbp / 2, level != "A")]
    assert not differ
