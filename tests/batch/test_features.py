"""Batch state rules and features on hand-made archives; every expectation is worked out here from
docs/patient-state.md and the feature semantics, never by calling the code under test."""

from __future__ import annotations

import polars as pl
import pytest

from batch.features import classify_events, features_as_of_issued, features_at, final_facts, scoring_points
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES, FEATURES

MIN = 60_000
HOUR = 60 * MIN
T0 = 1_700_000_000_000
LATENESS = HOUR
TOL = 0.05
HORIZON = 48 * HOUR  # the dedupe horizon (settings.dedupe_horizon_s's default)
RULES = {"allowed_lateness_ms": LATENESS, "cross_source_tolerance": TOL, "dedupe_horizon_ms": HORIZON}


def spec(code: str, agg: str):
    """The first spec of (code, agg): tests read windows from the specs instead of repeating them."""
    return next(s for s in FEATURES if s.code == code and s.agg == agg)


HR_LAST, HR_MAX, HR_MEAN = spec(codes.HEART_RATE, "last"), spec(codes.HEART_RATE, "max"), spec(codes.HEART_RATE, "mean")
HR_SINCE, HR_COUNT = spec(codes.HEART_RATE, "time_since_last_s"), spec(codes.HEART_RATE, "count")


def event(fact_id: str, value: float | None, effective_ms: int, *, code: str = codes.HEART_RATE, version: int = 1,
          status: Status = Status.FINAL, source: Source = Source.CDC, patient: str = "p1",
          issued_ms: int | None = None) -> dict:
    e = CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=effective_ms,
                       issued_ms=effective_ms if issued_ms is None else issued_ms, status=status, source=source,
                       fact_id=fact_id, version=version)
    d = e.to_dict()
    del d["provenance"]
    return d


def retraction(fact_id: str, effective_ms: int, version: int, **kw) -> dict:
    return event(fact_id, None, effective_ms, version=version, status=Status.ENTERED_IN_ERROR, **kw)


class Archive:
    """Events as the canonical topic delivered them: each send() is one micro-batch message."""

    def __init__(self, partition: int = 0):
        self.partition, self.next_offset, self.rows = partition, 0, []

    def send(self, *events: dict) -> int:
        offset = self.next_offset
        for idx, e in enumerate(events):
            self.rows.append({**e, "partition": self.partition, "offset": offset, "idx": idx})
        self.next_offset += 1
        return offset

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema_overrides={"value": pl.Float64})

    def point(self, scoring_ms: int, offset: int, patient: str = "p1") -> dict:
        return {"patient_id": patient, "scoring_ms": scoring_ms, "partition": self.partition, "offset": offset}


def outcomes(archive: Archive) -> list[tuple[str, int, str, int | None]]:
    out = classify_events(archive.frame(), **RULES)
    return list(out.select("fact_id", "version", "outcome", "late_by_ms").iter_rows())


def features(archive: Archive, *points: dict) -> list[dict]:
    return features_at(archive.frame(), pl.DataFrame(list(points)), **RULES).to_dicts()


# --- state rules ---------------------------------------------------------------------------------


def test_in_order_events_are_accepted():
    a = Archive()
    a.send(event("f1", 80, T0), event("f2", 82, T0 + 5 * MIN))
    a.send(event("f3", 84, T0 + 10 * MIN))
    assert outcomes(a) == [("f1", 1, "accepted", None), ("f2", 1, "accepted", None), ("f3", 1, "accepted", None)]


def test_out_of_order_within_lateness_is_accepted_and_the_bound_is_inclusive():
    a = Archive()
    a.send(event("f1", 80, T0 + 3 * HOUR))
    a.send(event("f2", 81, T0 + 3 * HOUR - 30 * MIN))  # 30 min behind the clock
    a.send(event("f3", 82, T0 + 3 * HOUR - LATENESS))  # exactly at clock - lateness: not late
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted", "accepted"]


def test_beyond_lateness_is_late_with_exact_late_by_and_never_enters_state():
    a = Archive()
    a.send(event("f1", 80, T0 + 10 * HOUR))
    a.send(event("old", 60, T0 + 8 * HOUR + 45 * MIN))  # clock 10:00 - 1 h lateness = 9:00; 15 min before
    a.send(event("old", 60, T0 + 8 * HOUR + 45 * MIN))  # its redelivery: still unknown, so late again
    a.send(event("f2", 81, T0 + 9 * HOUR + 30 * MIN))  # the late event did not move the clock back or forward
    assert outcomes(a) == [("f1", 1, "accepted", None), ("old", 1, "late", 15 * MIN), ("old", 1, "late", 15 * MIN),
                           ("f2", 1, "accepted", None)]


def test_late_by_is_measured_against_the_clock_of_accepted_events_only():
    a = Archive()
    a.send(event("f1", 80, T0 + 10 * HOUR))
    a.send(event("f1", 99, T0 + 20 * HOUR, version=2))  # a correction moving time forward: not the clock
    a.send(event("f2", 70, T0 + 8 * HOUR))
    assert outcomes(a)[2] == ("f2", 1, "late", 10 * HOUR - LATENESS - 8 * HOUR)


def test_redelivery_and_stale_version_are_duplicates():
    a = Archive()
    a.send(event("f1", 80, T0, version=1))
    a.send(event("f1", 80, T0, version=1))  # redelivery
    a.send(event("f1", 85, T0, version=3))  # amendment
    a.send(event("f1", 82, T0, version=2))  # stale version arriving after a newer one
    assert [o[2] for o in outcomes(a)] == ["accepted", "duplicate", "corrected", "duplicate"]


def test_correction_is_never_late():
    a = Archive()
    a.send(event("f1", 80, T0))
    a.send(event("f2", 81, T0 + 10 * HOUR))
    a.send(event("f1", 90, T0, version=2))
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted", "corrected"]


def test_fact_whose_first_arrival_was_late_is_new_again_when_a_later_version_arrives():
    a = Archive()
    a.send(event("f1", 80, T0 + 10 * HOUR))
    a.send(event("f2", 60, T0 + 5 * HOUR, version=1))  # late: never known
    a.send(event("f2", 62, T0 + 9 * HOUR + 30 * MIN, version=2))  # new fact again, now within lateness
    a.send(event("f2", 62, T0 + 9 * HOUR + 30 * MIN, version=2))  # and now known: a redelivery
    assert outcomes(a) == [("f1", 1, "accepted", None), ("f2", 1, "late", 4 * HOUR), ("f2", 2, "accepted", None),
                           ("f2", 2, "duplicate", None)]


def test_a_new_version_of_a_fact_past_the_dedupe_horizon_is_late_as_the_stream_forgot_the_fact():
    """The stream forgets a fact once its effective time is older than clock - horizon: a lab amended 5 days
    later, or version 1 redelivered then, is a new fact to it, and late (rule 3). The batch must say the same,
    not corrected / a duplicate (parity would report the late events as published only)."""
    a = Archive()
    a.send(event("f1", 80, T0))
    a.send(event("f2", 81, T0 + 120 * HOUR))
    a.send(event("f1", 90, T0, version=2, status=Status.AMENDED))
    a.send(event("f1", 80, T0))
    late_by = 120 * HOUR - LATENESS
    assert outcomes(a) == [("f1", 1, "accepted", None), ("f2", 1, "accepted", None), ("f1", 2, "late", late_by),
                           ("f1", 1, "late", late_by)]
    # the late amendment changes nothing: no correction point
    assert scoring_points(a.frame(), **RULES).select("offset", "trigger").rows() == [(0, "vitals"), (1, "vitals")]


def test_the_dedupe_horizon_bound_is_inclusive_and_counts_from_the_facts_latest_version():
    a = Archive()
    a.send(event("f1", 80, T0))
    a.send(event("f2", 81, T0 + HORIZON))
    a.send(event("f1", 90, T0, version=2, status=Status.AMENDED))  # exactly at clock - horizon: still known
    a.send(event("f3", 82, T0 + HORIZON + 1))
    a.send(event("f1", 95, T0, version=3, status=Status.AMENDED))  # 1 ms past it: forgotten, late
    assert outcomes(a) == [("f1", 1, "accepted", None), ("f2", 1, "accepted", None), ("f1", 2, "corrected", None),
                           ("f3", 1, "accepted", None), ("f1", 3, "late", HORIZON + 1 - LATENESS)]


def test_a_forgotten_fact_whose_new_version_is_recent_is_accepted_as_new():
    a = Archive()
    a.send(event("f1", 80, T0))
    a.send(event("f2", 81, T0 + 120 * HOUR))
    a.send(event("f1", 90, T0 + 120 * HOUR, version=2, status=Status.AMENDED))  # a new fact to the stream
    a.send(event("f1", 90, T0 + 120 * HOUR, version=2, status=Status.AMENDED))  # now known again: a redelivery
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted", "accepted", "duplicate"]


def test_cross_source_duplicate_within_tolerance_but_not_outside_or_same_source():
    a = Archive()
    a.send(event("cdc:1", 80.0, T0, source=Source.CDC))
    a.send(event("fhir:1", 80.04, T0, source=Source.FHIR))  # same code, time, value within 0.05: alias
    a.send(event("fhir:2", 80.06, T0, source=Source.FHIR))  # outside tolerance: its own fact
    a.send(event("cdc:2", 80.0, T0, source=Source.CDC))  # same source as the live fact: its own fact
    a.send(event("fhir:3", 80.0, T0 + MIN, source=Source.FHIR))  # another time: its own fact
    a.send(event("fhir:4", 80.0, T0, code=codes.RESP_RATE, source=Source.FHIR))  # another code
    assert [o[2] for o in outcomes(a)] == ["accepted", "duplicate", "accepted", "accepted", "accepted", "accepted"]


def test_alias_later_versions_are_restatements_without_effect():
    a = Archive()
    a.send(event("cdc:1", 80.0, T0, source=Source.CDC))
    a.send(event("fhir:1", 80.0, T0, source=Source.FHIR))
    a.send(event("fhir:1", 120.0, T0, source=Source.FHIR, version=2))
    a.send(event("fhir:1", None, T0, source=Source.FHIR, version=3, status=Status.ENTERED_IN_ERROR))
    assert [o[2] for o in outcomes(a)] == ["accepted", "duplicate", "duplicate", "duplicate"]
    assert points_of(a, min_interval_ms=0) == [(T0, 0, 0, "vitals")]  # no content-free correction point
    [after] = features(a, a.point(T0, offset=3))
    assert after[HR_LAST.name] == 80.0  # the CDC value, untouched by the alias's versions
    assert after[HR_COUNT.name] == 1


def test_no_alias_of_a_retracted_fact_and_alias_follows_an_amended_value():
    a = Archive()
    a.send(event("cdc:1", 80.0, T0, source=Source.CDC))
    a.send(retraction("cdc:1", T0, version=2))
    a.send(event("fhir:1", 80.0, T0, source=Source.FHIR))  # the CDC fact is not live any more
    a.send(event("cdc:2", 90.0, T0 + MIN, source=Source.CDC))
    a.send(event("cdc:2", 95.0, T0 + MIN, source=Source.CDC, version=2))
    a.send(event("fhir:2", 90.0, T0 + MIN, source=Source.FHIR))  # compares with the amended 95: not an alias
    a.send(event("fhir:3", 95.0, T0 + MIN, source=Source.FHIR))  # matches the amended value: alias
    assert [o[2] for o in outcomes(a)] == ["accepted", "corrected", "accepted", "accepted", "corrected",
                                           "accepted", "duplicate"]


def test_patients_have_their_own_clock():
    a = Archive()
    a.send(event("a1", 80, T0 + 10 * HOUR, patient="a"))
    a.send(event("b1", 80, T0, patient="b"))  # far behind a's clock, but b has no clock yet
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted"]


def points_of(archive: Archive, **rules) -> list[tuple[int, int, int, str]]:
    """(scoring_ms, offset, idx, trigger) of each scoring point the batch derives."""
    points = scoring_points(archive.frame(), **{**RULES, **rules})
    return list(points.select("scoring_ms", "offset", "idx", "trigger").iter_rows())


def test_scoring_points_follow_vitals_sets_and_corrections():
    a = Archive()
    a.send(event("f1", 80, T0), event("f2", 82, T0 + 10 * MIN))  # offset 0: two vitals sets, 10 min apart
    a.send(event("f1", 80, T0))  # offset 1: only a duplicate, no point
    a.send(event("f1", 85, T0, version=2))  # offset 2: a correction re-scores at the clock
    a.send(event("old", 60, T0 - 2 * HOUR))  # offset 3: late only, no point
    a.send(event("lab", 2.0, T0 + 20 * MIN, code=codes.LACTATE))  # offset 4: a lab alone, no point
    a.send(event("f3", 90, T0 + 12 * MIN))  # offset 5: within the minimum interval of the last point
    assert points_of(a, min_interval_ms=5 * MIN) == [(T0, 0, 0, "vitals"), (T0 + 10 * MIN, 0, 1, "vitals"),
                                                     (T0 + 10 * MIN, 2, 0, "correction")]
    # with no minimum interval every newer vitals set scores, at its own time (not the lab's clock)
    assert points_of(a, min_interval_ms=0)[-1] == (T0 + 12 * MIN, 5, 0, "vitals")
    # inside the interval a reading that scores NEWS2 points is scored anyway (schemas.cadence.news2_points)
    a.send(event("f4", 135, T0 + 13 * MIN))  # offset 6: pulse >= 131 scores 3
    a.send(event("f5", 135, T0 + 14 * MIN, status=Status.ENTERED_IN_ERROR))  # offset 7: an error scores nothing
    assert points_of(a, min_interval_ms=5 * MIN)[-1] == (T0 + 13 * MIN, 6, 0, "vitals")


def test_the_rest_of_a_round_sent_in_other_messages_at_the_same_time_is_scored_when_abnormal():
    # one Observation per message (FHIR notifications), all at T: the first makes the point at T; an abnormal
    # one at T == the last point's time is a point too (SBP 80, RR 26: 3 points each), a normal one waits
    T = T0 + 4 * HOUR
    a = Archive()
    a.send(event("fhir:Observation/hr:hr", 72, T))  # offset 0
    a.send(event("fhir:Observation/sbp:sbp", 80, T, code=codes.SYSTOLIC_BP, source=Source.FHIR))  # offset 1
    a.send(event("fhir:Observation/rr:rr", 26, T, code=codes.RESP_RATE, source=Source.FHIR))  # offset 2
    a.send(event("fhir:Observation/t:t", 37.0, T, code=codes.TEMPERATURE, source=Source.FHIR))  # offset 3
    assert points_of(a, min_interval_ms=5 * MIN) == [(T, 0, 0, "vitals"), (T, 1, 0, "vitals"), (T, 2, 0, "vitals")]
    points = scoring_points(a.frame(), **RULES, min_interval_ms=5 * MIN)
    assert points["snapshot_id"].n_unique() == 3  # three scores, none replacing another
    # the as-of joins tell points at one T apart by their arrival position: each sees what came before it
    seen = features_at(a.frame(), points, **RULES).select("systolic_bp_last_24h", "resp_rate_last_24h").rows()
    assert seen == [(None, None), (80.0, None), (80.0, 26.0)]


def test_a_back_charted_abnormal_reading_is_a_point_at_the_clock():
    # a reading older than the last vitals point (charted after it) makes a point at the clock when it scores
    # NEWS2 points (SBP 80: 3), as the stream does; a normal one (HR 72) waits for the next round
    a = Archive()
    a.send(event("hr1", 72, T0))  # offset 0: the round's point
    a.send(event("sbp", 80, T0 - 2 * MIN, code=codes.SYSTOLIC_BP))  # 1: back-charted, abnormal
    a.send(event("hr0", 72, T0 - MIN))  # 2: back-charted, normal
    assert points_of(a, min_interval_ms=5 * MIN) == [(T0, 0, 0, "vitals"), (T0, 1, 0, "correction")]
    points = scoring_points(a.frame(), **RULES, min_interval_ms=5 * MIN)
    assert features_at(a.frame(), points, **RULES)["systolic_bp_last_24h"].to_list() == [None, 80.0]


def test_a_retraction_of_a_fact_never_seen_is_no_vitals_set():
    # a CDC delete under REPLICA IDENTITY DEFAULT retracts every column at the commit time, the null ones too
    # (facts never seen: accepted, never live); as in the stream, that is no reading, so no "vitals" point: the
    # delete is a correction, and the round taken before its commit, charted after it, is still scored
    a = Archive()
    a.send(event("cdc:vital_signs:1:hr", 72, T0))  # offset 0
    a.send(retraction("cdc:vital_signs:1:hr", T0 + 30 * MIN, 2),
           retraction("cdc:vital_signs:1:t", T0 + 30 * MIN, 2, code=codes.TEMPERATURE))  # 1: the delete
    a.send(event("cdc:vital_signs:3:hr", 74, T0 + 25 * MIN))  # 2
    assert points_of(a, min_interval_ms=5 * MIN) == [(T0, 0, 0, "vitals"), (T0 + 30 * MIN, 1, 1, "correction"),
                                                     (T0 + 25 * MIN, 2, 0, "vitals")]


def test_a_restatement_is_a_duplicate_and_makes_no_correction_point():
    a = Archive()
    a.send(event("f1", 80, T0), event("f2", 82, T0 + 10 * MIN, status=Status.PRELIMINARY))  # offset 0
    a.send(event("f1", 80, T0, version=900), event("f2", 82, T0 + 10 * MIN, version=900,
                                                  status=Status.PRELIMINARY))  # 1: a re-snapshot
    a.send(event("f1", 80, T0, version=900))  # 2: its redelivery
    a.send(event("f2", 82, T0 + 10 * MIN, version=901))  # 3: the preliminary result made final: a change
    a.send(retraction("f1", T0, version=901))  # 4
    a.send(retraction("f1", T0, version=902))  # 5: retracted again
    a.send(event("f1", 80, T0 + MIN, version=903))  # 6: back, at another time
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted", "duplicate", "duplicate", "duplicate",
                                           "corrected", "corrected", "duplicate", "corrected"]
    assert [p[1:] for p in points_of(a, min_interval_ms=0)] == [
        (0, 0, "vitals"), (0, 1, "vitals"), (3, 0, "correction"), (4, 0, "correction"), (6, 0, "correction")]
    # the facts keep the version that set their content
    assert final_facts(a.frame(), **RULES).select("fact_id", "version").rows() == [("f2", 901), ("f1", 903)]


def test_final_facts_hold_latest_versions_without_retractions_aliases_or_late_events():
    a = Archive()
    a.send(event("f1", 80, T0 + 10 * HOUR), event("f2", 70, T0 + 10 * HOUR, code=codes.RESP_RATE))
    a.send(event("f1", 88, T0 + 10 * HOUR, version=2), retraction("f2", T0 + 10 * HOUR, version=2, code=codes.RESP_RATE))
    a.send(event("fhir:1", 88, T0 + 10 * HOUR, source=Source.FHIR), event("late", 50, T0))
    facts = final_facts(a.frame(), **RULES)
    assert facts.select("fact_id", "value").rows() == [("f1", 88.0)]


# --- features ------------------------------------------------------------------------------------


def test_window_edges_exactly_w_ago_is_outside_and_t_is_inside():
    t = T0 + 30 * HOUR
    w = HR_MAX.window_s * 1000
    a = Archive()
    a.send(event("edge", 150, t - w), event("inside", 90, t - w + 1), event("now", 100, t))
    [row] = features(a, a.point(t, 0))
    assert row[HR_MAX.name] == 100  # 150 sits exactly W before T: outside the window
    assert row[HR_LAST.name] == 100


def test_aggregations_from_first_principles():
    t = T0 + 30 * HOUR
    values = {t - 50 * MIN: 90.0, t - 20 * MIN: 70.0, t - 5 * MIN: 110.0, t - 7 * HOUR: 60.0, t - 23 * HOUR: 50.0}
    a = Archive()
    a.send(*(event(f"f{i}", v, eff) for i, (eff, v) in enumerate(values.items())))
    [row] = features(a, a.point(t, 0))

    def window(s):
        return [v for eff, v in values.items() if t - s.window_s * 1000 < eff <= t]

    assert row[HR_MAX.name] == max(window(HR_MAX))
    assert row[HR_MEAN.name] == pytest.approx(sum(window(HR_MEAN)) / len(window(HR_MEAN)))
    assert row[HR_COUNT.name] == len(window(HR_COUNT))
    assert row[HR_LAST.name] == 110.0
    assert row[HR_SINCE.name] == pytest.approx(5 * 60)


def test_last_breaks_a_time_tie_by_greatest_fact_id():
    a = Archive()
    a.send(event("b", 70, T0), event("c", 90, T0), event("a", 80, T0))
    [row] = features(a, a.point(T0, 0))
    assert row[HR_LAST.name] == 90


def test_missing_is_none_and_count_is_zero():
    a = Archive()
    a.send(event("temp", 37.0, T0, code=codes.TEMPERATURE))
    [row] = features(a, a.point(T0, 0))
    assert list(row) == ["patient_id", "scoring_ms", "partition", "offset", *FEATURE_NAMES]
    for s in FEATURES:
        if s.code == codes.HEART_RATE:
            assert row[s.name] == (0 if s.agg == "count" else None), s.name
    assert row["news2"] is None  # an input is missing
    assert row[spec(codes.TEMPERATURE, "last").name] == 37.0


def test_point_sees_only_messages_up_to_its_offset():
    a = Archive()
    first = a.send(event("f1", 80, T0))
    second = a.send(event("f1", 95, T0, version=2), event("f2", 100, T0 + MIN))
    third = a.send(retraction("f2", T0 + MIN, version=2))
    rows = features(a, a.point(T0, first), a.point(T0 + MIN, second), a.point(T0 + MIN, third))
    assert [(r[HR_LAST.name], r[HR_COUNT.name]) for r in rows] == [(80, 1), (100, 2), (95, 1)]


def test_redelivered_and_stale_versions_do_not_change_features():
    a = Archive()
    a.send(event("f1", 80, T0, version=2))
    a.send(event("f1", 70, T0, version=1), event("f1", 80, T0, version=2))
    rows = features(a, a.point(T0, 0), a.point(T0, 1))
    assert [(r[HR_MEAN.name], r[HR_COUNT.name]) for r in rows] == [(80, 1), (80, 1)]


def test_late_events_do_not_reach_features():
    a = Archive()
    a.send(event("f1", 80, T0 + 2 * HOUR))
    a.send(event("old", 200, T0 + 30 * MIN))  # 30 min beyond the lateness bound, yet inside 6 h
    [row] = features(a, a.point(T0 + 2 * HOUR, 1))
    assert row[HR_MEAN.name] == 80 and row[HR_COUNT.name] == 1


def test_derived_news2_and_qsofa_from_the_chart():
    # RR 26 -> 3, SpO2 91 -> 3, on oxygen -> 2, SBP 95 -> 2, pulse 115 -> 2, V -> 3, 38.5 C -> 1: NEWS2 16.
    # qSOFA: RR >= 22, SBP <= 100, altered mentation -> 3.
    vitals = {codes.RESP_RATE: 26, codes.SPO2: 91, codes.O2_FLOW: 2, codes.SYSTOLIC_BP: 95, codes.HEART_RATE: 115,
              codes.CONSCIOUSNESS: codes.ACVPU_ORDINAL["V"], codes.TEMPERATURE: 38.5}
    a = Archive()
    a.send(*(event(f"v{i}", value, T0, code=code) for i, (code, value) in enumerate(vitals.items())))
    [row] = features(a, a.point(T0, 0))
    assert row["news2"] == 16
    assert (row["news2_resp_rate"], row["news2_consciousness"], row["news2_temperature"]) == (3, 3, 1)
    assert row["qsofa"] == 3
    assert row["on_oxygen"] == 1


def test_points_keep_input_order_and_patients_stay_apart():
    a = Archive()
    a.send(event("a1", 80, T0, patient="a"))
    a.send(event("b1", 120, T0, patient="b"))
    rows = features(a, a.point(T0, 1, patient="b"), a.point(T0, 0, patient="a"))
    assert [(r["patient_id"], r[HR_LAST.name]) for r in rows] == [("b", 120), ("a", 80)]


def test_as_of_issued_uses_only_what_was_issued_by_the_scoring_time():
    lactate = spec(codes.LACTATE, "last")
    a = Archive()
    a.send(event("lab", 2.0, T0, code=codes.LACTATE, issued_ms=T0 + 2 * HOUR))
    a.send(event("lab", 5.0, T0, code=codes.LACTATE, version=2, issued_ms=T0 + 4 * HOUR))
    points = pl.DataFrame({"patient_id": ["p1"] * 4,
                           "scoring_ms": [T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR, T0 + 4 * HOUR]})
    out = features_as_of_issued(a.frame(), points, **RULES)
    assert out[lactate.name].to_list() == [None, 2.0, 2.0, 5.0]
    assert out["scoring_ms"].to_list() == points["scoring_ms"].to_list()


def test_as_of_issued_drops_a_retraction_once_issued():
    a = Archive()
    a.send(event("f1", 80, T0, issued_ms=T0))
    a.send(retraction("f1", T0, version=2, issued_ms=T0 + HOUR))
    points = pl.DataFrame({"patient_id": ["p1", "p1"], "scoring_ms": [T0 + 30 * MIN, T0 + HOUR]})
    out = features_as_of_issued(a.frame(), points, **RULES)
    assert out[HR_COUNT.name].to_list() == [1, 0]


# --- delta and slope ------------------------------------------------------------------------------

HR_SLOPE, HR_DELTA = spec(codes.HEART_RATE, "slope"), spec(codes.HEART_RATE, "delta")


def test_slope_per_hour_and_delta_on_an_out_of_order_sequence():
    a = Archive()
    a.send(event("c", 98, T0 + HOUR))
    a.send(event("b", 86, T0 + 20 * MIN), event("a", 80, T0))  # behind the clock, within lateness
    [row] = features(a, a.point(T0 + HOUR, 1))
    # t = 0, 1/3, 1 h, v = 80, 86, 98: mean t 4/9, mean v 88; sxy = 32/9 + 2/9 + 50/9 = 84/9;
    # sxx = 16/81 + 1/81 + 25/81 = 42/81; slope = 18 per hour; delta by effective time: 98 - 80
    assert row[HR_SLOPE.name] == pytest.approx(18.0, abs=1e-9)
    assert row[HR_DELTA.name] == 18.0


def test_slope_and_delta_follow_amendments_and_retractions():
    a = Archive()
    a.send(event("a", 80, T0), event("b", 92, T0 + 2 * HOUR))
    a.send(event("b", 104, T0 + 2 * HOUR, version=2, status=Status.AMENDED))
    a.send(event("c", 200, T0 + 2 * HOUR + 30 * MIN))
    a.send(retraction("c", T0 + 2 * HOUR + 30 * MIN, version=2))
    rows = features(a, *(a.point(T0 + 2 * HOUR, o) for o in range(2)),
                    *(a.point(T0 + 2 * HOUR + 30 * MIN, o) for o in (2, 3)))
    assert [r[HR_SLOPE.name] for r in rows][:2] == [6.0, 12.0]  # 12 / 2 h, then 24 / 2 h
    assert [r[HR_DELTA.name] for r in rows] == [12.0, 24.0, 120.0, 24.0]
    assert rows[3][HR_SLOPE.name] == pytest.approx(12.0)  # the 200 is gone again


def test_slope_is_missing_without_two_distinct_times_and_delta_without_two_facts():
    a = Archive()
    a.send(event("a", 80, T0))
    a.send(event("b", 95, T0))
    rows = features(a, a.point(T0, 0), a.point(T0, 1))
    assert [(r[HR_SLOPE.name], r[HR_DELTA.name]) for r in rows] == [(None, None), (None, 15.0)]


def test_duplicates_do_not_weigh_twice_in_the_slope():
    a = Archive()
    a.send(event("cdc:1", 80.0, T0, source=Source.CDC), event("cdc:2", 98.0, T0 + HOUR, source=Source.CDC),
           event("cdc:3", 110.0, T0 + 2 * HOUR, source=Source.CDC))
    a.send(event("cdc:3", 110.0, T0 + 2 * HOUR, source=Source.CDC),
           event("fhir:3", 110.0, T0 + 2 * HOUR, source=Source.FHIR))
    [row] = features(a, a.point(T0 + 2 * HOUR, 1))
    # 80, 98, 110 at 0, 1, 2 h: mean t 1, mean v 96; sxy = 16 + 14 = 30; sxx = 2; slope 15
    # (110 counted twice would give 40.5 / 2.75 = 14.73)
    assert row[HR_SLOPE.name] == pytest.approx(15.0, abs=1e-9)
    assert row[HR_DELTA.name] == 30.0
    assert row[HR_COUNT.name] == 3


# --- context facts --------------------------------------------------------------------------------


def context_event(fact_id: str, effective_ms: int, code: str = codes.LOCATION, **kw) -> dict:
    e = CanonicalEvent(patient_id="p1", code=code, value=None, unit=None, effective_ms=effective_ms,
                       issued_ms=effective_ms, status=Status.FINAL, source=Source.CDC, fact_id=fact_id, version=1,
                       code_system=codes.CONTEXT, value_text="ward-7", **kw)
    d = e.to_dict()
    del d["provenance"]
    return d


def test_context_facts_never_reach_state_rules_scoring_points_or_features():
    a = Archive()
    a.send(event("f1", 80, T0))
    a.send(context_event("ctx:1", T0 + 10 * HOUR))  # would move the clock 10 h ahead if it counted
    a.send(event("f2", 70, T0 - 30 * MIN))  # so this stays within lateness
    assert outcomes(a) == [("f1", 1, "accepted", None), ("f2", 1, "accepted", None)]
    # f2 is older than the point at T0: it waits for the next vitals set; the context fact scores nothing
    assert points_of(a) == [(T0, 0, 0, "vitals")]
    [row] = features(a, a.point(T0, 2))
    assert row[HR_COUNT.name] == 2 and row[HR_LAST.name] == 80
    assert final_facts(a.frame(), **RULES)["fact_id"].to_list() == ["f1", "f2"]


def test_an_archive_without_code_system_is_all_measurements():
    a = Archive()
    a.send(event("f1", 80, T0))
    [row] = features_at(a.frame().drop("code_system"), pl.DataFrame([a.point(T0, 0)]), **RULES).to_dicts()
    assert row[HR_LAST.name] == 80


# --- rule 6: a FHIR Observation version replaces all of its resource's facts -----------------------


def obs(code: str, value: float | None, version: int, version_codes: tuple[str, ...], *, eff: int = T0,
        status: Status = Status.FINAL) -> dict:
    """An event of version `version` of FHIR Observation/o1, which carries `version_codes`."""
    d = event(f"fhir:Observation/o1:{code}", value, eff, code=code, version=version, status=status,
              source=Source.FHIR)
    return {**d, "version_codes": sorted(version_codes)}


def live(archive: Archive) -> dict[str, float]:
    return dict(final_facts(archive.frame(), **RULES).select("code", "value").iter_rows())


def test_a_version_dropping_a_component_retracts_the_earlier_versions_fact_of_it():
    a = Archive()
    a.send(obs(codes.SPO2, 95, 1, (codes.SPO2, codes.O2_FLOW)), obs(codes.O2_FLOW, 2, 1, (codes.SPO2, codes.O2_FLOW)))
    a.send(obs(codes.SPO2, 95, 2, (codes.SPO2,)))
    a.send(obs(codes.O2_FLOW, 2, 1, (codes.SPO2, codes.O2_FLOW)))  # version 1 redelivered
    assert outcomes(a) == [("fhir:Observation/o1:59408-5", 1, "accepted", None),
                           ("fhir:Observation/o1:3151-8", 1, "accepted", None),
                           ("fhir:Observation/o1:59408-5", 2, "duplicate", None),
                           ("fhir:Observation/o1:3151-8", 2, "corrected", None),  # retracted by version 2
                           ("fhir:Observation/o1:3151-8", 1, "duplicate", None)]
    assert live(a) == {codes.SPO2: 95.0}
    # the retraction is a correction: a point at the clock after it, without the flow
    points = scoring_points(a.frame(), **RULES)
    assert points.select("offset", "trigger").rows() == [(0, "vitals"), (1, "correction")]
    assert features_at(a.frame(), points, **RULES)["o2_flow_last_24h"].to_list() == [2.0, None]


def test_a_version_correcting_the_code_retracts_the_old_codes_fact():
    a = Archive()
    a.send(obs(codes.HEART_RATE, 18, 1, (codes.HEART_RATE,)))
    a.send(obs(codes.RESP_RATE, 18, 2, (codes.RESP_RATE,)))
    assert [o[2] for o in outcomes(a)] == ["accepted", "accepted", "corrected"]
    assert live(a) == {codes.RESP_RATE: 18.0}


def test_an_older_version_arriving_after_the_newer_one_neither_resurrects_nor_retracts():
    a = Archive()
    a.send(obs(codes.SPO2, 96, 2, (codes.SPO2,)))
    a.send(obs(codes.SPO2, 95, 1, (codes.SPO2, codes.O2_FLOW)), obs(codes.O2_FLOW, 2, 1, (codes.SPO2, codes.O2_FLOW)))
    assert [o[2] for o in outcomes(a)] == ["accepted", "duplicate", "duplicate"]
    assert live(a) == {codes.SPO2: 96.0}


def test_a_resources_newer_version_past_the_dedupe_horizon_no_longer_makes_an_older_one_stale():
    """Rule 6 reads only known entries not expired (the stream's _superseded): version 1 of a resource
    redelivered 3 days after version 2 is a new fact, late, not a stale version (a duplicate)."""
    a = Archive()
    a.send(obs(codes.SPO2, 96, 2, (codes.SPO2,)))
    a.send(event("f2", 81, T0 + 72 * HOUR))
    a.send(obs(codes.SPO2, 95, 1, (codes.SPO2, codes.O2_FLOW)), obs(codes.O2_FLOW, 2, 1, (codes.SPO2, codes.O2_FLOW)))
    late_by = 72 * HOUR - LATENESS
    assert [o[2:] for o in outcomes(a)] == [("accepted", None), ("accepted", None), ("late", late_by),
                                            ("late", late_by)]


def marker(version: int, *, eff: int = T0) -> dict:
    """Version `version` of FHIR Observation/o1 carrying none of the mapped codes: its version marker, as
    schemas/fhir.py gives it (recoded to a code wardwatch does not map, or its value absent)."""
    d = event(f"fhir:Observation/o1:{codes.VERSION_MARK}", None, eff, code=codes.VERSION_MARK, version=version,
              status=Status.ENTERED_IN_ERROR, source=Source.FHIR)
    return {**d, "code_system": codes.VERSION_MARKS, "version_codes": []}


def test_a_version_carrying_no_mapped_code_retracts_the_earlier_versions_facts():
    """v1 a heart rate of 140; v2 recoded to a code wardwatch does not map: the 140 is retracted offline too,
    a correction point re-scoring without it, and neither the marker's redelivery nor v1 again brings it back."""
    a = Archive()
    a.send(obs(codes.HEART_RATE, 140, 1, (codes.HEART_RATE,)))
    a.send(marker(2))
    a.send(marker(2), obs(codes.HEART_RATE, 140, 1, (codes.HEART_RATE,)))
    mark, hr = f"fhir:Observation/o1:{codes.VERSION_MARK}", f"fhir:Observation/o1:{codes.HEART_RATE}"
    assert outcomes(a) == [(hr, 1, "accepted", None), (mark, 2, "accepted", None),
                           (hr, 2, "corrected", None),  # retracted by the marker
                           (mark, 2, "duplicate", None), (hr, 1, "duplicate", None)]
    assert live(a) == {}
    points = scoring_points(a.frame(), **RULES)
    assert points.select("offset", "trigger").rows() == [(0, "vitals"), (1, "correction")]
    assert features_at(a.frame(), points, **RULES)["heart_rate_last_24h"].to_list() == [140.0, None]


def test_a_version_marker_arriving_first_makes_the_older_version_stale():
    a = Archive()
    a.send(marker(2))
    a.send(obs(codes.HEART_RATE, 140, 1, (codes.HEART_RATE,)))
    a.send(obs(codes.HEART_RATE, 90, 3, (codes.HEART_RATE,)))
    assert [o[2] for o in outcomes(a)] == ["accepted", "duplicate", "accepted"]
    assert live(a) == {codes.HEART_RATE: 90.0}


# --- NEWS2 and qSOFA: the batch's expressions from the charts' tables vs the stream's functions -------


def test_batch_news2_and_qsofa_equal_the_streams_functions_at_every_charted_value():
    """The batch scores from schemas/scores.py's tables, the stream with its if-chains: at every integer
    (temperature: 0.1 C) value of each parameter and the half-steps between (where charting rounds up),
    on air and on oxygen, at each ACVPU level, with an input missing, both give the same NEWS2, sub-scores
    and qSOFA. Deterministic, where the random parity test (test_parity_planes) may miss a band edge."""
    from batch.features import _with_derived
    from schemas.features import DERIVED, derive

    normal = {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "systolic_bp_last_24h": 125.0,
              "heart_rate_last_24h": 72.0, "consciousness_last_24h": 0.0, "temperature_last_24h": 37.0}
    sweeps = {"resp_rate_last_24h": [i / 2 for i in range(0, 121)], "spo2_last_24h": [i / 2 for i in range(140, 201)],
              "systolic_bp_last_24h": [i / 2 for i in range(120, 601)],
              "heart_rate_last_24h": [i / 2 for i in range(40, 501)],
              "temperature_last_24h": [i / 20 for i in range(600, 901)],
              "consciousness_last_24h": [0.0, 1.0, 2.0, 3.0, 4.0]}
    rows = [{**normal, name: v} for name, values in sweeps.items() for v in values]
    rows += [{**normal, name: None} for name in normal]  # a missing input: every score missing
    oxygen = {"o2_flow_last_24h": None, "o2_flow_time_since_last_s_24h": None, "spo2_time_since_last_s_24h": 0.0,
              "fio2_last_24h": None, "fio2_time_since_last_s_24h": None,
              "supplemental_oxygen_time_since_last_s_24h": None}
    rows = [{**r, **oxygen, "o2_flow_last_24h": flow, "o2_flow_time_since_last_s_24h": 0.0} for r in rows
            for flow in (0.0, 2.0)]
    frame = pl.DataFrame(rows, schema={name: pl.Float64 for name in rows[0]})
    batch = _with_derived(frame)
    names = [d.name for d in DERIVED]
    assert {batch.schema[n] for n in names} == {pl.Int64}
    online = [derive(r) for r in rows]
    differ = [(r, {n: (b[n], o[n]) for n in names if b[n] != o[n]})
              for r, o, b in zip(rows, online, batch.iter_rows(named=True), strict=True)
              if any(b[n] != o[n] for n in names)]
    assert not differ, differ[:3]
