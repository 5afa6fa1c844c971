"""Feature values at a scoring point, worked out by hand on small sequences of facts."""

from __future__ import annotations

import itertools

from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES, FEATURES
from streams.features import compute_features
from streams.state import PatientState, apply_batch

T = 1_700_000_000_000  # the scoring time in every test, ms
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN

_ids = itertools.count()


def fact(code: str, value: float, eff: int, fact_id: str | None = None) -> CanonicalEvent:
    return CanonicalEvent(
        patient_id="p1", code=code, value=value, unit=None, effective_ms=eff, issued_ms=eff,
        status=Status.FINAL, source=Source.CDC, fact_id=fact_id or f"f{next(_ids)}", version=1,
    )


def features_at(T: int, *facts: CanonicalEvent) -> dict:
    """Features at T of a patient whose facts all arrived (in time order, so none is late)."""
    events = sorted(facts, key=lambda e: e.effective_ms)
    result = apply_batch(None, events, allowed_lateness_ms=HOUR, dedupe_horizon_ms=48 * HOUR,
                         cross_source_tolerance=0.05)
    assert all(o.kind == "accepted" for o in result.outcomes)
    return compute_features(result.state, T)


HR = codes.HEART_RATE


def test_every_feature_is_present_and_an_empty_state_is_missing_except_counts():
    f = compute_features(PatientState(), T)
    assert set(f) == set(FEATURE_NAMES)
    for spec in FEATURES:
        assert f[spec.name] == (0 if spec.agg == "count" else None), spec.name


# --- mean ---------------------------------------------------------------------------------------


def test_mean_of_80_and_100_within_6h_is_90():
    f = features_at(T, fact(HR, 80.0, T - 30 * MIN), fact(HR, 100.0, T - 5 * HOUR))
    assert f["heart_rate_mean_6h"] == 90.0


def test_mean_window_excludes_a_fact_exactly_w_ago_and_includes_one_exactly_at_t():
    f = features_at(T, fact(HR, 200.0, T - 6 * HOUR), fact(HR, 80.0, T - 6 * HOUR + 1), fact(HR, 100.0, T))
    assert f["heart_rate_mean_6h"] == 90.0  # (80 + 100) / 2; the 200 is exactly 6 h old
    assert f["vitals_count_6h"] == 2


def test_resp_rate_mean_1h_uses_only_the_last_hour():
    rr = codes.RESP_RATE
    f = features_at(T, fact(rr, 30.0, T - 2 * HOUR), fact(rr, 16.0, T - 50 * MIN), fact(rr, 20.0, T - 10 * MIN))
    assert f["resp_rate_mean_1h"] == 18.0  # (16 + 20) / 2
    assert f["resp_rate_max_6h"] == 30.0


# --- min / max ----------------------------------------------------------------------------------


def test_max_1h_edges():
    f = features_at(T, fact(HR, 150.0, T - HOUR), fact(HR, 95.0, T - HOUR + 1), fact(HR, 90.0, T))
    assert f["heart_rate_max_1h"] == 95.0  # 150 is exactly 1 h old: outside


def test_min_6h_of_spo2_and_systolic_bp():
    f = features_at(T, fact(codes.SPO2, 88.0, T - 7 * HOUR), fact(codes.SPO2, 93.0, T - 3 * HOUR),
                    fact(codes.SPO2, 97.0, T - 1 * HOUR),
                    fact(codes.SYSTOLIC_BP, 105.0, T - 5 * HOUR), fact(codes.SYSTOLIC_BP, 120.0, T))
    assert f["spo2_min_6h"] == 93.0  # 88 is 7 h old
    assert f["spo2_last_24h"] == 97.0
    assert f["systolic_bp_min_6h"] == 105.0


def test_temperature_max_24h_and_last():
    temp = codes.TEMPERATURE
    f = features_at(T, fact(temp, 39.2, T - 20 * HOUR), fact(temp, 37.1, T - 1 * HOUR))
    assert f["temperature_max_24h"] == 39.2
    assert f["temperature_last_24h"] == 37.1


# --- last and time since last -------------------------------------------------------------------


def test_last_is_the_latest_by_effective_time_and_time_since_last_counts_from_t():
    f = features_at(T, fact(HR, 70.0, T - 3 * HOUR), fact(HR, 110.0, T - 30 * MIN))
    assert f["heart_rate_last_24h"] == 110.0
    assert f["heart_rate_time_since_last_s_24h"] == 1800.0


def test_last_breaks_a_tie_on_effective_time_by_the_greater_fact_id():
    f = features_at(T, fact(HR, 70.0, T - MIN, fact_id="b"), fact(HR, 90.0, T - MIN, fact_id="a"))
    assert f["heart_rate_last_24h"] == 70.0


def test_a_fact_exactly_24h_old_is_outside_the_last_window():
    f = features_at(T, fact(HR, 70.0, T - 24 * HOUR))
    assert f["heart_rate_last_24h"] is None
    assert f["heart_rate_time_since_last_s_24h"] is None
    f = features_at(T, fact(HR, 70.0, T - 24 * HOUR + 1))
    assert f["heart_rate_last_24h"] == 70.0
    assert f["heart_rate_time_since_last_s_24h"] == 86_399.999


def test_facts_after_t_are_not_visible_at_t():
    f = features_at(T, fact(HR, 80.0, T - HOUR), fact(HR, 140.0, T + 1))
    assert f["heart_rate_last_24h"] == 80.0
    assert f["heart_rate_max_1h"] is None  # the only fact in (T - 1 h, T] would be the future one
    assert f["vitals_count_6h"] == 1


# --- count and missing values -------------------------------------------------------------------


def test_count_is_zero_not_missing_when_the_window_is_empty():
    f = features_at(T, fact(HR, 80.0, T - 7 * HOUR))
    assert f["vitals_count_6h"] == 0
    assert f["heart_rate_mean_6h"] is None
    assert f["heart_rate_last_24h"] == 80.0


def test_facts_of_one_code_do_not_leak_into_another():
    f = features_at(T, fact(codes.LACTATE, 4.1, T - HOUR), fact(codes.CREATININE, 1.3, T - HOUR),
                    fact(codes.WBC, 14.0, T - 2 * HOUR))
    assert (f["lactate_last_24h"], f["creatinine_last_24h"], f["wbc_last_24h"]) == (4.1, 1.3, 14.0)
    assert f["heart_rate_last_24h"] is None
    assert f["vitals_count_6h"] == 0


# --- derived scores -----------------------------------------------------------------------------


def _full_set(t: int, **overrides: float | None) -> list[CanonicalEvent]:
    """A deteriorating patient: NEWS2 subscores RR 24 -> 2, SpO2 93 -> 2, oxygen -> 2, SBP 95 -> 2,
    HR 115 -> 2, consciousness V -> 3, temp 38.5 -> 1 (total 14); qSOFA RR>=22, SBP<=100, V (3)."""
    values = {codes.RESP_RATE: 24.0, codes.SPO2: 93.0, codes.O2_FLOW: 2.0, codes.SYSTOLIC_BP: 95.0,
              HR: 115.0, codes.CONSCIOUSNESS: float(codes.ACVPU_ORDINAL["V"]), codes.TEMPERATURE: 38.5}
    for name, value in overrides.items():
        values[getattr(codes, name)] = value
    return [fact(code, v, t) for code, v in values.items() if v is not None]


def test_news2_and_qsofa_from_the_latest_values():
    f = features_at(T, *_full_set(T - 10 * MIN))
    assert f["news2"] == 14
    assert f["news2_consciousness"] == 3
    assert f["news2_temperature"] == 1
    assert f["on_oxygen"] == 1
    assert f["qsofa"] == 3


def test_a_calm_patient_on_air_scores_zero():
    f = features_at(T, *_full_set(T - 10 * MIN, RESP_RATE=16.0, SPO2=97.0, O2_FLOW=0.0, SYSTOLIC_BP=125.0,
                                  HEART_RATE=72.0, CONSCIOUSNESS=0.0, TEMPERATURE=36.8))
    assert f["news2"] == 0
    assert f["on_oxygen"] == 0
    assert f["qsofa"] == 0


def test_derived_scores_are_missing_when_an_input_is_missing():
    no_temp = features_at(T, *_full_set(T - 10 * MIN, TEMPERATURE=None))
    assert no_temp["news2"] is None
    assert no_temp["news2_pulse"] is None
    assert no_temp["qsofa"] == 3  # qSOFA does not use temperature
    no_sbp = features_at(T, *_full_set(T - 10 * MIN, SYSTOLIC_BP=None))
    assert no_sbp["news2"] is None
    assert no_sbp["qsofa"] is None
    no_spo2_nor_flow = features_at(T, *_full_set(T - 10 * MIN, SPO2=None, O2_FLOW=None))
    assert no_spo2_nor_flow["on_oxygen"] is None and no_spo2_nor_flow["news2"] is None


def test_oxygen_counts_only_in_the_round_of_the_latest_spo2():
    """A FHIR feed charts a flow only while oxygen is given: an earlier round's flow is a past episode."""
    no_flow = features_at(T, *_full_set(T - 10 * MIN, O2_FLOW=None))
    assert (no_flow["on_oxygen"], no_flow["news2_air_or_oxygen"], no_flow["news2"]) == (0, 0, 12)
    earlier = features_at(T, fact(codes.O2_FLOW, 2.0, T - 20 * HOUR), *_full_set(T - 10 * MIN, O2_FLOW=None))
    assert (earlier["o2_flow_last_24h"], earlier["on_oxygen"], earlier["news2"]) == (2.0, 0, 12)
    same_round = features_at(T, fact(codes.O2_FLOW, 2.0, T - 10 * MIN - 5_000), *_full_set(T - 10 * MIN, O2_FLOW=None))
    assert (same_round["on_oxygen"], same_round["news2"]) == (1, 14)


def test_a_retraction_of_an_input_makes_news2_missing():
    events = _full_set(T - 10 * MIN)
    state = apply_batch(None, events, allowed_lateness_ms=HOUR, dedupe_horizon_ms=48 * HOUR,
                        cross_source_tolerance=0.05).state
    temp = next(e for e in events if e.code == codes.TEMPERATURE)
    retraction = CanonicalEvent(
        patient_id="p1", code=temp.code, value=None, unit=None, effective_ms=temp.effective_ms,
        issued_ms=T, status=Status.ENTERED_IN_ERROR, source=temp.source, fact_id=temp.fact_id, version=2,
    )
    after = apply_batch(state, [retraction], allowed_lateness_ms=HOUR, dedupe_horizon_ms=48 * HOUR,
                        cross_source_tolerance=0.05)
    assert [o.kind for o in after.outcomes] == ["corrected"]
    assert compute_features(state, T)["news2"] == 14
    assert compute_features(after.state, T)["news2"] is None


# --- delta and slope ----------------------------------------------------------------------------


def test_delta_is_last_minus_first_and_slope_is_per_hour():
    f = features_at(T, fact(HR, 80.0, T - 2 * HOUR), fact(HR, 92.0, T))
    assert f["heart_rate_delta_24h"] == 12.0
    assert f["heart_rate_slope_6h"] == 6.0  # 12 beats/min over 2 h


def test_slope_is_the_least_squares_fit_not_the_end_to_end_change():
    # t = 0, 1, 2 h, v = 80, 100, 84: mean t 1, mean v 88; sxy = (-1)(-8) + 0 + (1)(-4) = 4; sxx = 2
    f = features_at(T, fact(HR, 80.0, T - 2 * HOUR), fact(HR, 100.0, T - HOUR), fact(HR, 84.0, T))
    assert f["heart_rate_slope_6h"] == 2.0
    assert f["heart_rate_delta_24h"] == 4.0


def test_a_falling_blood_pressure_has_a_negative_slope_and_delta():
    sbp = codes.SYSTOLIC_BP
    f = features_at(T, fact(sbp, 130.0, T - 4 * HOUR), fact(sbp, 100.0, T - HOUR))
    assert f["systolic_bp_slope_6h"] == -10.0  # -30 mm[Hg] over 3 h
    assert f["systolic_bp_delta_24h"] == -30.0


def test_slope_and_delta_need_two_facts_and_slope_two_distinct_times():
    one = features_at(T, fact(HR, 80.0, T - HOUR))
    assert one["heart_rate_slope_6h"] is None and one["heart_rate_delta_24h"] is None
    same_time = features_at(T, fact(HR, 80.0, T - HOUR, fact_id="a"), fact(HR, 95.0, T - HOUR, fact_id="b"))
    assert same_time["heart_rate_slope_6h"] is None  # no time span to fit over
    assert same_time["heart_rate_delta_24h"] == 15.0  # ordered by fact_id at equal times: b - a


def test_slope_window_and_delta_window_differ():
    # the 50 is 7 h old: outside the 6 h slope window, inside the 24 h delta window
    f = features_at(T, fact(HR, 50.0, T - 7 * HOUR), fact(HR, 80.0, T - 2 * HOUR), fact(HR, 92.0, T))
    assert f["heart_rate_slope_6h"] == 6.0
    assert f["heart_rate_delta_24h"] == 42.0


def test_lab_delta_and_time_since_last():
    f = features_at(T, fact(codes.CREATININE, 1.0, T - 20 * HOUR), fact(codes.CREATININE, 1.5, T - 2 * HOUR))
    assert f["creatinine_delta_24h"] == 0.5
    assert f["creatinine_time_since_last_s_24h"] == 7200.0
    assert f["lactate_time_since_last_s_24h"] is None  # never measured: missing, not zero


# --- robustness ---------------------------------------------------------------------------------


def test_facts_of_codes_no_feature_reads_are_ignored():
    context = CanonicalEvent(patient_id="p1", code=codes.LOCATION, value=None, unit=None, effective_ms=T - HOUR,
                             issued_ms=T - HOUR, status=Status.FINAL, source=Source.CDC, fact_id="ctx:1", version=1,
                             code_system=codes.CONTEXT, value_text="ward-7")
    platelets = fact(codes.PLATELETS, 150.0, T - HOUR)
    with_them = features_at(T, fact(HR, 80.0, T - HOUR), context, platelets)
    assert with_them == features_at(T, fact(HR, 80.0, T - HOUR))


def test_a_live_fact_without_a_value_is_not_a_measurement():
    # the state keeps whatever it was given; a value-less fact must not crash or count
    f = features_at(T, fact(HR, 80.0, T - 2 * HOUR), fact(HR, None, T - HOUR), fact(HR, 92.0, T))
    assert f["vitals_count_6h"] == 2
    assert f["heart_rate_mean_6h"] == 86.0
    assert f["heart_rate_slope_6h"] == 6.0
