"""The feature specs as data: what the model's input contract and both planes rely on."""

from __future__ import annotations

import re

import pytest

from schemas import codes
from schemas.features import (AGGREGATIONS, DERIVED, FEATURE_NAMES, FEATURES, HOUR, MAX_WINDOW_S,
                              SAME_ROUND_S, FeatureSpec, _on_oxygen, derive)


def test_names_are_unique():
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_every_base_name_says_its_parameter_aggregation_and_window():
    for s in FEATURES:
        if s.agg == "count":
            continue  # vitals_count_6h counts the observation rounds via heart rate
        hours = s.window_s // HOUR
        assert s.window_s % HOUR == 0, s.name
        assert s.name == f"{codes.CODES[s.code].name}_{s.agg}_{hours}h", s.name


def test_every_spec_reads_a_known_code_and_a_window_the_state_keeps():
    assert all(s.code in codes.CODES for s in FEATURES)
    assert MAX_WINDOW_S == 24 * HOUR  # streams/state.py prunes live facts at this age
    assert all(0 < s.window_s <= MAX_WINDOW_S for s in FEATURES)
    assert not any(s.code in codes.CONTEXT_CODES for s in FEATURES)


def test_the_issue_list_is_covered():
    by_param = {}
    for s in FEATURES:
        by_param.setdefault(codes.CODES[s.code].name, set()).add((s.agg, s.window_s // HOUR))
    for param in ("heart_rate", "resp_rate", "spo2", "o2_flow", "fio2", "systolic_bp", "temperature",
                  "consciousness", "lactate", "wbc", "creatinine"):
        assert ("last", 24) in by_param[param], param  # the last known value of every parameter
    assert {("slope", 6), ("delta", 24)} <= by_param["heart_rate"]
    assert {("min", 1), ("min", 6), ("slope", 6)} <= by_param["spo2"]
    assert {("min", 6), ("slope", 6), ("delta", 24)} <= by_param["systolic_bp"]
    assert {("max", 24), ("delta", 24), ("time_since_last_s", 24)} <= by_param["lactate"]
    assert {("delta", 24), ("time_since_last_s", 24)} <= by_param["creatinine"]
    assert {1, 6, 24} == {w for aggs in by_param.values() for _, w in aggs}
    assert {s.agg for s in FEATURES} == set(AGGREGATIONS)
    assert {"news2", "qsofa", "on_oxygen", "news2_spo2"} <= {d.name for d in DERIVED}
    assert 40 <= len(FEATURE_NAMES) <= 55  # a reasonable model input


def test_derived_inputs_are_base_features_or_derived_before():
    known = {s.name for s in FEATURES}
    for d in DERIVED:
        assert set(d.inputs) | set(d.optional) <= known, d.name
        known.add(d.name)


VITALS_ON_AIR = {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "systolic_bp_last_24h": 125.0,
                 "heart_rate_last_24h": 72.0, "consciousness_last_24h": 0, "temperature_last_24h": 37.0,
                 "spo2_time_since_last_s_24h": 0.0}


@pytest.mark.parametrize("oxygen, on_oxygen", [
    ({}, 0),  # SpO2 charted, oxygen never: air (a FHIR feed charts oxygen only while it is given)
    ({"o2_flow_last_24h": 2.0, "o2_flow_time_since_last_s_24h": 20 * 3600.0}, 0),  # a flow from an earlier round
    ({"o2_flow_last_24h": 2.0, "o2_flow_time_since_last_s_24h": 5.0}, 1),  # charted 5 s before the SpO2
    ({"o2_flow_last_24h": 2.0, "o2_flow_time_since_last_s_24h": 0.0}, 1),  # one CDC row: SpO2 and flow
    ({"o2_flow_last_24h": 0.0, "o2_flow_time_since_last_s_24h": 0.0}, 0),  # a CDC row that charts air
    # oxygen charted as an inhaled concentration (venturi mask, high flow), with no flow
    ({"fio2_last_24h": 28.0, "fio2_time_since_last_s_24h": 0.0}, 1),  # FiO2 28 % in the SpO2's round
    ({"fio2_last_24h": 21.0, "fio2_time_since_last_s_24h": 0.0}, 0),  # 21 % is room air
    ({"fio2_last_24h": 28.0, "fio2_time_since_last_s_24h": 20 * 3600.0}, 0),  # an FiO2 from an earlier round
    ({"o2_flow_last_24h": 0.0, "o2_flow_time_since_last_s_24h": 0.0,  # a flow of 0 but FiO2 40 %: oxygen
      "fio2_last_24h": 40.0, "fio2_time_since_last_s_24h": 0.0}, 1),
    ({"o2_flow_last_24h": 2.0, "o2_flow_time_since_last_s_24h": 0.0,  # FiO2 21 % does not undo a flow
      "fio2_last_24h": 21.0, "fio2_time_since_last_s_24h": 0.0}, 1),
])
def test_air_or_oxygen_is_read_at_the_latest_spo2(oxygen, on_oxygen):
    features = derive({**VITALS_ON_AIR, **oxygen})
    assert features["on_oxygen"] == on_oxygen
    assert (features["news2_air_or_oxygen"], features["news2"]) == (2 * on_oxygen, 2 * on_oxygen)


def test_without_spo2_or_oxygen_there_is_no_news2_and_without_times_the_latest_flow_decides():
    no_spo2 = {k: v for k, v in VITALS_ON_AIR.items() if not k.startswith("spo2")}
    assert derive(no_spo2)["on_oxygen"] is None and derive(no_spo2)["news2"] is None
    archived = {k: v for k, v in VITALS_ON_AIR.items() if k != "spo2_time_since_last_s_24h"}  # before the times
    assert derive({**archived, "o2_flow_last_24h": 2.0})["news2_air_or_oxygen"] == 2


def test_fio2_in_the_round_is_oxygen_on_its_own():
    # (flow, its age, SpO2's age, FiO2, its age): no flow, FiO2 28 % charted 5 s before the SpO2
    assert _on_oxygen(None, None, 0.0, 28.0, 5.0) == 1
    assert _on_oxygen(None, None, 0.0, 28.0, SAME_ROUND_S + 1.0) == 0  # just before the round: a past episode
    assert _on_oxygen(None, None, 0.0, 21.0, 0.0) == 0
    assert _on_oxygen(0.0, 0.0, 0.0, 40.0, 0.0) == 1
    assert _on_oxygen(None, None, None, 28.0, 0.0) == 1  # no SpO2 in 24 h: the latest FiO2 decides, like a flow
    assert _on_oxygen(None, None, None, None, None) is None


def _on_oxygen_before_fio2(flow, o2_age_s, spo2_age_s):
    """The rule as it was before FiO2 was read (commit 7fbf741), for snapshots archived then."""
    if flow is None:
        return None if spo2_age_s is None else 0
    if o2_age_s is None or spo2_age_s is None:
        return int(flow > 0)
    return int(flow > 0 and o2_age_s <= spo2_age_s + SAME_ROUND_S)


@pytest.mark.parametrize("flow", [None, 0.0, 2.0])
@pytest.mark.parametrize("o2_age_s", [None, 0.0, 5.0, SAME_ROUND_S + 1.0, 20 * 3600.0])
@pytest.mark.parametrize("spo2_age_s", [None, 0.0, 3600.0])
def test_a_snapshot_archived_before_fio2_scores_as_it_did(flow, o2_age_s, spo2_age_s):
    """Parity over old archives: a snapshot without the fio2 keys gives the on_oxygen and NEWS2 it gave."""
    old = {**VITALS_ON_AIR, "spo2_time_since_last_s_24h": spo2_age_s, "o2_flow_last_24h": flow,
           "o2_flow_time_since_last_s_24h": o2_age_s}
    old = {k: v for k, v in old.items() if v is not None}
    assert not any(k.startswith("fio2") for k in old)
    expected = _on_oxygen_before_fio2(flow, o2_age_s, spo2_age_s)
    features = derive(old)
    assert features["on_oxygen"] == expected
    assert features["news2_air_or_oxygen"] == (None if expected is None else 2 * expected)


def test_a_spec_with_an_unknown_aggregation_or_no_window_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        FeatureSpec("heart_rate_median_6h", codes.HEART_RATE, "median", 6 * HOUR)
    with pytest.raises(ValueError, match="window_s must be a positive"):
        FeatureSpec("heart_rate_last_0h", codes.HEART_RATE, "last", 0)


def test_names_are_plain_identifiers():
    # they become DuckDB column names and ONNX card entries
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in FEATURE_NAMES)
