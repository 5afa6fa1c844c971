"""The per-patient rules of docs/patient-state.md, one behaviour per test, on hand-made sequences."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from schemas import codes
from schemas.canonical import LOINC, CanonicalEvent, Source, Status
from streams.features import compute_features
from streams.state import STATE_FORMAT, VALUE, DuplicateKind, Kind, PatientState, apply_batch, is_preliminary

T0 = 1_700_000_000_000  # 2023-11-14, ms
MIN = 60_000
HOUR = 60 * MIN
LATENESS = 1 * HOUR
HORIZON = 48 * HOUR
TOLERANCE = 0.05


def ev(fact_id: str, value: float | None = 80.0, eff: int = T0, *, version: int = 1,
       code: str = codes.HEART_RATE, source: Source = Source.CDC, status: Status = Status.FINAL) -> CanonicalEvent:
    return CanonicalEvent(
        patient_id="p1", code=code, value=value, unit=None, effective_ms=eff, issued_ms=eff,
        status=status, source=source, fact_id=fact_id, version=version,
    )


def apply(state, *events, lateness=LATENESS, horizon=HORIZON, tolerance=TOLERANCE):
    return apply_batch(state, list(events), allowed_lateness_ms=lateness, dedupe_horizon_ms=horizon,
                       cross_source_tolerance=tolerance)


def kinds(result) -> list[str]:
    return [o.kind for o in result.outcomes]


def hr_values(state: PatientState) -> list[float]:
    return [f[VALUE] for f in state.live(codes.HEART_RATE)]


# --- rule 5: accepted ---------------------------------------------------------------------------


def test_new_facts_are_accepted_become_live_and_advance_the_clock():
    r = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN))
    assert kinds(r) == ["accepted", "accepted"]
    assert r.changed
    assert r.state.clock == T0 + 10 * MIN
    assert hr_values(r.state) == [80.0, 100.0]


# --- rule 1: redelivery / stale version ---------------------------------------------------------


def test_redelivery_with_the_same_version_is_a_duplicate_and_changes_nothing():
    first = apply(None, ev("a", 80.0))
    again = apply(first.state, ev("a", 80.0))
    assert kinds(again) == ["duplicate"]
    assert again.outcomes[0].duplicate_kind == DuplicateKind.REDELIVERY
    assert not again.changed
    assert again.state.to_dict() == first.state.to_dict()


def test_a_stale_lower_version_is_a_duplicate_and_keeps_the_newer_value():
    r = apply(None, ev("a", 90.0, version=5), ev("a", 80.0, version=3))
    assert kinds(r) == ["accepted", "duplicate"]
    assert r.outcomes[1].duplicate_kind == "redelivery"
    assert hr_values(r.state) == [90.0]


def test_arrival_order_decides_which_version_is_a_correction():
    newest_first = apply(None, ev("a", 90.0, version=2), ev("a", 80.0, version=1))
    oldest_first = apply(None, ev("a", 80.0, version=1), ev("a", 90.0, version=2))
    assert kinds(newest_first) == ["accepted", "duplicate"]
    assert kinds(oldest_first) == ["accepted", "corrected"]
    assert hr_values(newest_first.state) == hr_values(oldest_first.state) == [90.0]


# --- rule 2: corrections ------------------------------------------------------------------------


def test_an_amendment_replaces_the_value_and_the_features_follow():
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN)).state
    T = s.clock
    assert compute_features(s, T)["heart_rate_mean_6h"] == 90.0  # (80 + 100) / 2
    r = apply(s, ev("a", 120.0, T0, version=2, status=Status.AMENDED))
    assert kinds(r) == ["corrected"]
    assert r.changed
    assert compute_features(r.state, T)["heart_rate_mean_6h"] == 110.0  # (120 + 100) / 2


def test_an_amendment_can_move_the_effective_time():
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN)).state
    r = apply(s, ev("a", 80.0, T0 + 20 * MIN, version=2, status=Status.CORRECTED))
    assert kinds(r) == ["corrected"]
    # "a" is now the latest fact, and there is still exactly one copy of it
    assert hr_values(r.state) == [100.0, 80.0]
    assert compute_features(r.state, T0 + 20 * MIN)["heart_rate_last_24h"] == 80.0


def test_entered_in_error_retracts_the_fact_and_the_features_change():
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN)).state
    T = s.clock
    r = apply(s, ev("b", None, T0 + 10 * MIN, version=2, status=Status.ENTERED_IN_ERROR))
    assert kinds(r) == ["corrected"]
    f = compute_features(r.state, T)
    assert f["heart_rate_last_24h"] == 80.0
    assert f["heart_rate_mean_6h"] == 80.0
    assert f["vitals_count_6h"] == 1


def test_retracting_the_only_fact_makes_its_features_missing():
    s = apply(None, ev("a", 80.0, T0)).state
    r = apply(s, ev("a", None, T0, version=2, status=Status.ENTERED_IN_ERROR))
    f = compute_features(r.state, T0)
    assert f["heart_rate_last_24h"] is None
    assert f["heart_rate_mean_6h"] is None
    assert f["vitals_count_6h"] == 0
    # the retraction is remembered: a redelivery of the original does not bring it back
    again = apply(r.state, ev("a", 80.0, T0, version=1))
    assert kinds(again) == ["duplicate"]
    assert hr_values(again.state) == []


def test_a_later_version_after_a_retraction_makes_the_fact_visible_again():
    r = apply(None, ev("a", 80.0), ev("a", None, version=2, status=Status.ENTERED_IN_ERROR),
              ev("a", 85.0, version=3, status=Status.AMENDED))
    assert kinds(r) == ["accepted", "corrected", "corrected"]
    assert hr_values(r.state) == [85.0]



def restated(result) -> list:
    return [(o.kind, o.duplicate_kind) for o in result.outcomes]


RESTATEMENT = (Kind.DUPLICATE, DuplicateKind.RESTATEMENT)


def test_a_higher_version_with_the_same_content_is_a_restatement_not_a_correction():
    # a Debezium re-snapshot (op r) re-reads the row with the snapshot's lsn; a FHIR server bumps
    # meta.versionId for a note: the same value, time and status
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN)).state
    r = apply(s, ev("a", 80.0, T0, version=900), ev("b", 100.0, T0 + 10 * MIN, version=900, status=Status.AMENDED))
    assert restated(r) == [RESTATEMENT, RESTATEMENT]
    assert not r.changed
    assert r.state.facts == s.facts and r.state.clock == s.clock  # no live fact changed
    # `known` moved on: the restatement's redelivery is a plain duplicate, an older version stale
    again = apply(r.state, ev("a", 80.0, T0, version=900), ev("a", 80.0, T0, version=800))
    assert [o.duplicate_kind for o in again.outcomes] == [DuplicateKind.REDELIVERY] * 2
    # a real change after it is still a correction
    for changed in (ev("a", 81.0, T0, version=901), ev("a", 80.0, T0 + 1, version=901),
                    ev("a", 80.0, T0, version=901, status=Status.PRELIMINARY),
                    ev("a", 80.0, T0, version=901, code=codes.RESP_RATE),
                    ev("a", None, T0, version=901, status=Status.ENTERED_IN_ERROR)):
        assert kinds(apply(r.state, changed)) == ["corrected"], changed


def test_a_retraction_of_a_retracted_fact_is_a_restatement():
    s = apply(None, ev("a", 80.0), ev("a", None, version=2, status=Status.ENTERED_IN_ERROR)).state
    r = apply(s, ev("a", None, version=3, status=Status.ENTERED_IN_ERROR))
    assert restated(r) == [RESTATEMENT] and not r.changed
    # a new fact that arrives retracted is retracted too; a value brings either back
    s = apply(s, ev("b", None, status=Status.ENTERED_IN_ERROR)).state
    assert restated(apply(s, ev("b", None, version=2, status=Status.ENTERED_IN_ERROR))) == [RESTATEMENT]
    assert kinds(apply(s, ev("a", 80.0, version=3), ev("b", 80.0, version=2))) == ["corrected", "corrected"]


def test_a_pruned_fact_is_still_recognised_when_restated_however_it_was_batched():
    # "a" leaves the live facts (older than clock - lateness - 24 h) but stays within the 48 h dedupe
    # horizon: its content moves to its `known` entry, which survives the changelog round trip
    s = apply(None, ev("a", 80.0, T0, status=Status.PRELIMINARY), ev("b", 90.0, T0 + 30 * HOUR)).state
    assert hr_values(s) == [90.0]
    s = PatientState.from_dict(orjson.loads(orjson.dumps(s.to_dict())))
    assert restated(apply(s, ev("a", 80.0, T0, version=2, status=Status.PRELIMINARY))) == [RESTATEMENT]
    assert kinds(apply(s, ev("a", 80.0, T0, version=2))) == ["corrected"]  # made final
    assert kinds(apply(s, ev("a", 70.0, T0, version=2, status=Status.PRELIMINARY))) == ["corrected"]
    # the same in one batch, where "a" is still physically live when restated
    one = apply(None, ev("a", 80.0, T0, status=Status.PRELIMINARY), ev("b", 90.0, T0 + 30 * HOUR),
                ev("a", 80.0, T0, version=2, status=Status.PRELIMINARY))
    assert restated(one)[2] == RESTATEMENT


def test_a_state_written_in_format_2_keeps_todays_corrections_for_facts_without_a_live_copy():
    """Format 2 did not keep the content of a retracted or pruned fact: unknown, so any higher version
    of one is a correction (a retraction of a retracted fact re-scores once more, as before)."""
    old = {"format": 2, "clock": T0, "known": {"a": [2, T0, False], "b": [1, T0, False]},
           "facts": {codes.HEART_RATE: [[T0, "b", 80.0, "cdc", 1]]}}
    s = PatientState.from_dict(orjson.loads(orjson.dumps(old)))
    assert kinds(apply(s, ev("a", None, version=3, status=Status.ENTERED_IN_ERROR))) == ["corrected"]
    assert restated(apply(s, ev("b", 80.0, version=2))) == [RESTATEMENT]  # live: its copy is the content


def test_corrections_are_never_late():
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 5 * HOUR)).state
    r = apply(s, ev("a", 60.0, T0, version=2, status=Status.AMENDED))
    assert kinds(r) == ["corrected"]
    assert compute_features(r.state, T0 + 5 * HOUR)["heart_rate_mean_6h"] == 80.0  # (60 + 100) / 2


def test_a_correction_of_an_unknown_fact_is_a_new_fact():
    r = apply(None, ev("a", 95.0, version=4, status=Status.AMENDED))
    assert kinds(r) == ["accepted"]
    assert hr_values(r.state) == [95.0]


def test_a_retraction_of_an_unknown_fact_is_known_but_never_live():
    r = apply(None, ev("a", None, version=2, status=Status.ENTERED_IN_ERROR))
    assert kinds(r) == ["accepted"]
    assert hr_values(r.state) == []
    # the original arriving after its own retraction is a stale version
    later = apply(r.state, ev("a", 80.0, version=1))
    assert kinds(later) == ["duplicate"]
    assert hr_values(later.state) == []


# --- rule 3: lateness ---------------------------------------------------------------------------


def test_an_event_beyond_the_lateness_bound_is_late_with_exact_late_by():
    s = apply(None, ev("a", 80.0, T0 + 3 * HOUR)).state  # clock = T0 + 3 h, bound = T0 + 2 h
    r = apply(s, ev("b", 90.0, T0 + 2 * HOUR - 5 * MIN))
    assert kinds(r) == ["late"]
    assert r.outcomes[0].late_by_ms == 5 * MIN
    assert [o.event.fact_id for o in r.late] == ["b"]
    assert not r.changed
    assert r.state.to_dict() == s.to_dict()  # a late event never enters state
    # ... not even its key: a redelivery is late again, not a duplicate
    assert kinds(apply(r.state, ev("b", 90.0, T0 + 2 * HOUR - 5 * MIN))) == ["late"]


def test_an_event_exactly_at_the_lateness_bound_is_accepted():
    s = apply(None, ev("a", 80.0, T0 + 3 * HOUR)).state
    r = apply(s, ev("b", 90.0, T0 + 2 * HOUR))
    assert kinds(r) == ["accepted"]


def test_an_out_of_order_event_inside_the_bound_is_accepted_and_shows_in_windows():
    s = apply(None, ev("a", 80.0, T0 + 60 * MIN)).state
    r = apply(s, ev("b", 100.0, T0 + 30 * MIN))
    assert kinds(r) == ["accepted"]
    assert r.state.clock == T0 + 60 * MIN  # the clock never goes back
    f = compute_features(r.state, r.state.clock)
    assert f["heart_rate_max_1h"] == 100.0
    assert f["heart_rate_mean_6h"] == 90.0
    assert f["heart_rate_last_24h"] == 80.0  # last is by effective time, not arrival


def test_lateness_uses_the_clock_as_it_advances_inside_a_batch():
    r = apply(None, ev("a", 80.0, T0 + 3 * HOUR), ev("b", 90.0, T0 + 1 * HOUR))
    assert kinds(r) == ["accepted", "late"]
    assert r.outcomes[1].late_by_ms == 1 * HOUR  # (3 h - 1 h) - 1 h
    r = apply(None, ev("b", 90.0, T0 + 1 * HOUR), ev("a", 80.0, T0 + 3 * HOUR))
    assert kinds(r) == ["accepted", "accepted"]


# --- rule 4: cross-source duplicates --------------------------------------------------------------


def test_the_same_measurement_from_the_other_source_within_tolerance_is_dropped():
    r = apply(None, ev("cdc:1", 80.0), ev("fhir:1", 80.03, source=Source.FHIR))
    assert kinds(r) == ["accepted", "duplicate"]
    assert r.outcomes[1].duplicate_kind == DuplicateKind.CROSS_SOURCE
    assert hr_values(r.state) == [80.0]


def test_a_cross_source_value_outside_tolerance_is_a_separate_fact():
    r = apply(None, ev("cdc:1", 80.0), ev("fhir:1", 80.5, source=Source.FHIR))
    assert kinds(r) == ["accepted", "accepted"]
    assert sorted(hr_values(r.state)) == [80.0, 80.5]


def test_a_cross_source_value_exactly_the_tolerance_apart_is_the_same_measurement():
    """docs/patient-state.md rule 4: |value - other.value| <= tolerance (the batch plane's bound too): a
    difference of exactly the tolerance is one measurement, not a second fact doubling a mean or count."""
    r = apply(None, ev("cdc:1", 80.0), ev("fhir:1", 80.5, source=Source.FHIR), tolerance=0.5)
    assert kinds(r) == ["accepted", "duplicate"] and hr_values(r.state) == [80.0]

def test_cross_source_needs_another_source_the_same_code_and_the_same_time():
    base = apply(None, ev("cdc:1", 80.0)).state
    same_source = ev("cdc:2", 80.0)
    other_time = ev("fhir:1", 80.0, T0 + 1, source=Source.FHIR)
    other_code = ev("fhir:2", 80.0, code=codes.RESP_RATE, source=Source.FHIR)
    for event in (same_source, other_time, other_code):
        assert kinds(apply(base, event)) == ["accepted"], event.fact_id


def test_new_versions_of_an_alias_are_recognised_and_ignored_as_restatements():
    # an alias's content is never used (rule 4), so whatever a new version says changes nothing:
    # a restatement, never a correction (which would make a content-free correction point)
    s = apply(None, ev("cdc:1", 80.0), ev("fhir:1", 80.0, source=Source.FHIR)).state
    amended = apply(s, ev("fhir:1", 140.0, version=2, source=Source.FHIR, status=Status.AMENDED))
    assert [(o.kind, o.duplicate_kind) for o in amended.outcomes] == [("duplicate", DuplicateKind.RESTATEMENT)]
    assert not amended.changed
    assert hr_values(amended.state) == [80.0]
    retracted = apply(amended.state, ev("fhir:1", None, version=3, source=Source.FHIR,
                                        status=Status.ENTERED_IN_ERROR))
    assert retracted.outcomes[0].duplicate_kind == DuplicateKind.RESTATEMENT
    assert hr_values(retracted.state) == [80.0]
    restored = apply(retracted.state, ev("fhir:1", 140.0, version=4, source=Source.FHIR, status=Status.AMENDED))
    assert restored.outcomes[0].duplicate_kind == DuplicateKind.RESTATEMENT
    assert hr_values(restored.state) == [80.0]
    redelivered = apply(restored.state, ev("fhir:1", 80.0, version=1, source=Source.FHIR))
    assert kinds(redelivered) == ["duplicate"]
    assert redelivered.outcomes[0].duplicate_kind == DuplicateKind.REDELIVERY


def test_a_twin_that_is_not_late_still_matches_however_the_events_are_batched():
    # a lateness longer than the 24 h window: the twin is 25 h behind the clock but not late, so the
    # state keeps its fact (pruning leaves clock - lateness - 24 h) and finds it after a restart too
    events = [ev("cdc:1", 80.0, T0), ev("x", 80.0, T0 + 25 * HOUR), ev("fhir:1", 80.0, T0, source=Source.FHIR)]
    whole = apply(None, *events, lateness=30 * HOUR)
    first = apply(None, *events[:2], lateness=30 * HOUR)
    split = apply(PatientState.from_dict(orjson.loads(orjson.dumps(first.state.to_dict()))), events[2],
                  lateness=30 * HOUR)
    assert kinds(whole)[2] == kinds(split)[0] == "duplicate"


# --- pruning and expiry (event time only) -------------------------------------------------------


def hourly_vitals(hours: int, start: int = T0):
    """One batch per hour: heart rate and resp rate, each its own fact."""
    for h in range(hours):
        t = start + h * HOUR
        yield [ev(f"hr:{h}", 80.0, t), ev(f"rr:{h}", 16.0, t, code=codes.RESP_RATE)]


def test_pruning_bounds_the_state_as_the_clock_advances_over_days():
    state = None
    for batch in hourly_vitals(10 * 24):
        state = apply(state, *batch).state
    # live: facts in (clock - lateness - 24 h, clock], hourly -> exactly 24 + 1 per code (a vitals
    # point can be at clock - lateness, and its windows reach 24 h back from there)
    assert len(state.live(codes.HEART_RATE)) == 24 + LATENESS // HOUR
    assert len(state.live(codes.RESP_RATE)) == 24 + LATENESS // HOUR
    # known: about the 48 h dedupe horizon of keys, far below the 480 keys fed
    assert 2 * 48 <= len(state.known) <= 2 * 60
    assert len(orjson.dumps(state.to_dict())) < 20_000


def test_a_dedupe_key_expires_on_event_time_so_an_old_redelivery_is_late():
    s = apply(None, ev("old", 80.0, T0)).state
    s = apply(s, ev("new", 80.0, T0 + 48 * HOUR + 1)).state  # "old" is now beyond the horizon
    r = apply(s, ev("old", 80.0, T0))
    assert kinds(r) == ["late"]
    assert r.outcomes[0].late_by_ms == 47 * HOUR + 1
    assert not r.changed


def test_a_dedupe_key_expires_within_a_single_batch_too():
    r = apply(None, ev("old", 80.0, T0), ev("new", 80.0, T0 + 48 * HOUR + 1), ev("old", 80.0, T0))
    assert kinds(r) == ["accepted", "accepted", "late"]


def test_a_dedupe_key_inside_the_horizon_is_still_a_duplicate_even_when_late():
    s = apply(None, ev("old", 80.0, T0)).state
    s = apply(s, ev("new", 80.0, T0 + 47 * HOUR)).state
    assert kinds(apply(s, ev("old", 80.0, T0))) == ["duplicate"]


def test_a_dedupe_key_exactly_at_the_horizon_has_not_expired():
    """docs/patient-state.md: a key expires when effective_ms < clock - horizon, as in the batch plane
    (batch.features): a redelivery exactly at the edge is a duplicate, not a record on the late topic."""
    s = apply(None, ev("old", 80.0, T0)).state
    s = apply(s, ev("new", 80.0, T0 + 48 * HOUR)).state
    r = apply(s, ev("old", 80.0, T0))
    assert kinds(r) == ["duplicate"] and not r.late

def test_dedupe_keys_do_not_expire_on_wall_clock_time():
    long_ago = 978_307_200_000  # 2001-01-01: decades of wall time ago
    s = apply(None, ev("a", 80.0, long_ago)).state
    r = apply(s, ev("a", 80.0, long_ago))
    assert kinds(r) == ["duplicate"]


def test_a_horizon_not_longer_than_the_lateness_is_refused():
    with pytest.raises(ValueError):
        apply(None, ev("a"), lateness=2 * HOUR, horizon=2 * HOUR)


# --- purity and serialisation -------------------------------------------------------------------


def test_apply_batch_does_not_mutate_its_input_state():
    s = apply(None, ev("a", 80.0, T0), ev("b", 100.0, T0 + 10 * MIN), ev("c", 16.0, code=codes.RESP_RATE)).state
    before = orjson.dumps(s.to_dict())  # a snapshot: to_dict shares the state's containers
    apply(s, ev("a", 120.0, version=2, status=Status.AMENDED),
          ev("b", None, T0 + 10 * MIN, version=2, status=Status.ENTERED_IN_ERROR),
          ev("d", 90.0, T0 + 30 * HOUR), ev("e", 70.0, T0 + 30 * HOUR + 1))
    assert orjson.dumps(s.to_dict()) == before


def test_to_dict_from_dict_round_trip_through_json_preserves_behaviour():
    s = apply(None, ev("cdc:1", 80.0, T0), ev("fhir:1", 80.0, T0, source=Source.FHIR),
              ev("x", None, T0, status=Status.ENTERED_IN_ERROR), ev("b", 100.0, T0 + 20 * MIN)).state
    restored = PatientState.from_dict(orjson.loads(orjson.dumps(s.to_dict())))
    assert restored.to_dict() == s.to_dict()
    follow_up = [
        ev("cdc:1", 80.0, T0),  # redelivery
        ev("fhir:1", 99.0, T0, version=2, source=Source.FHIR, status=Status.AMENDED),  # alias: a restatement
        ev("x", 70.0, T0, version=1),  # stale version of a retracted fact
        ev("x", None, T0, version=2, status=Status.ENTERED_IN_ERROR),  # retracted again: a restatement
        ev("b", 110.0, T0 + 20 * MIN, version=2, status=Status.AMENDED),
        ev("late", 1.0, T0 - 2 * HOUR),
        ev("c", 120.0, T0 + 30 * MIN),
    ]
    a, b = apply(s, *follow_up), apply(restored, *follow_up)
    assert a.outcomes == b.outcomes
    assert kinds(a) == ["duplicate", "duplicate", "duplicate", "duplicate", "corrected", "late", "accepted"]
    assert compute_features(a.state, a.state.clock) == compute_features(b.state, b.state.clock)


def test_from_dict_refuses_an_unknown_format():
    with pytest.raises(ValueError):
        PatientState.from_dict({"format": 999, "clock": None, "known": {}, "facts": {}})


# --- preliminary results: carried with the live fact, so an alert can say so ---------------------


def preliminary_flags(state: PatientState) -> list[bool]:
    return [is_preliminary(f) for f in state.live(codes.HEART_RATE)]


def test_a_preliminary_result_is_marked_live_and_its_final_version_clears_the_mark():
    r = apply(None, ev("a", 80.0, T0, status=Status.PRELIMINARY), ev("b", 90.0, T0 + 10 * MIN))
    assert preliminary_flags(r.state) == [True, False]
    restored = PatientState.from_dict(orjson.loads(orjson.dumps(r.state.to_dict())))  # the changelog round trip
    assert preliminary_flags(restored) == [True, False]
    final = apply(restored, ev("a", 80.0, T0, version=2, status=Status.FINAL))
    assert kinds(final) == ["corrected"]
    assert preliminary_flags(final.state) == [False, False] and hr_values(final.state) == [80.0, 90.0]
    # features use the value only: the mark changes none of them
    assert compute_features(r.state, T0 + 10 * MIN) == compute_features(final.state, T0 + 10 * MIN)


OTHER = {Source.CDC: Source.FHIR, Source.FHIR: Source.CDC}


@pytest.mark.parametrize("source", [Source.CDC, Source.FHIR])
@pytest.mark.parametrize("final_value", [80.0, 80.03, 95.0])
def test_a_preliminary_result_made_final_only_through_the_other_source_is_corrected_by_it(source, final_value):
    """The final version of a preliminary result may arrive through the other source only (its twin):
    it replaces the preliminary one, mark and value (the same value within tolerance, or a correction),
    so an alert resting on it is amended instead of saying "preliminary" for ever."""
    other = OTHER[source]
    prelim = ev(f"{source}:1", 80.0, status=Status.PRELIMINARY, source=source)
    s = apply(None, prelim, ev("b", 90.0, T0 + 10 * MIN)).state
    final = apply(s, ev(f"{other}:1", final_value, source=other))
    assert kinds(final) == ["corrected"] and final.changed
    assert final.outcomes[0].supersedes == f"{source}:1"
    assert preliminary_flags(final.state) == [False, False] and hr_values(final.state) == [final_value, 90.0]
    assert final.state.clock == T0 + 10 * MIN
    # the preliminary fact is now the alias: its own final version (or any other) changes nothing more
    later = apply(final.state, ev(f"{source}:1", 80.0, version=2, source=source))
    assert [(o.kind, o.duplicate_kind) for o in later.outcomes] == [RESTATEMENT]
    assert hr_values(later.state) == [final_value, 90.0]


def test_a_preliminary_twin_made_final_through_the_alias_replaces_the_live_preliminary_one_and_only_then():
    # both sources sent the preliminary result (the second is an alias); the final one comes through
    # the alias only
    s = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY),
              ev("fhir:1", 80.0, source=Source.FHIR, status=Status.PRELIMINARY)).state
    assert preliminary_flags(s) == [True]
    final = apply(s, ev("fhir:1", 80.0, version=2, source=Source.FHIR))
    assert kinds(final) == ["corrected"] and final.outcomes[0].supersedes == "cdc:1"
    assert preliminary_flags(final.state) == [False]
    assert [f[1] for f in final.state.live(codes.HEART_RATE)] == ["fhir:1"]
    # a preliminary version of the alias is still a restatement: only a final result replaces
    again = apply(s, ev("fhir:1", 80.0, version=2, source=Source.FHIR, status=Status.PRELIMINARY))
    assert [(o.kind, o.duplicate_kind) for o in again.outcomes] == [RESTATEMENT]
    # and only a final result of a live preliminary one through the other source replaces anything:
    # a final live result: the other source's final one is its alias (rule 4), whatever the order
    assert kinds(apply(None, ev("cdc:1", 80.0), ev("fhir:1", 80.0, source=Source.FHIR))) == ["accepted", "duplicate"]
    # a preliminary result from the other source finalises nothing (another value: another fact, as before)
    r = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY),
              ev("fhir:1", 95.0, source=Source.FHIR, status=Status.PRELIMINARY))
    assert kinds(r) == ["accepted", "accepted"] and preliminary_flags(r.state) == [True, True]
    # the same source, another time or another code: another measurement
    base = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY)).state
    for event in (ev("cdc:2", 80.0), ev("fhir:1", 80.0, T0 + 1, source=Source.FHIR),
                  ev("fhir:2", 80.0, code=codes.RESP_RATE, source=Source.FHIR)):
        assert kinds(apply(base, event)) == ["accepted"], event.fact_id
    # a retraction through the other source retracts nothing it does not know
    gone = apply(base, ev("fhir:1", None, source=Source.FHIR, status=Status.ENTERED_IN_ERROR))
    assert kinds(gone) == ["accepted"] and preliminary_flags(gone.state) == [True]


@pytest.mark.parametrize("final_source", [Source.CDC, Source.FHIR])
def test_when_both_sources_sent_a_preliminary_result_apart_in_value_its_final_version_replaces_both(final_source):
    """Both sources sent the preliminary result with values too far apart to be one fact (two facts);
    its final version comes through one source only, as a new version of its own fact. The other
    source's preliminary fact leaves the live facts too, or it would count as a second reading and
    keep its alert "preliminary" for ever."""
    s = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY),
              ev("fhir:1", 95.0, source=Source.FHIR, status=Status.PRELIMINARY)).state
    assert preliminary_flags(s) == [True, True]
    own, other = (("cdc:1", "fhir:1") if final_source is Source.CDC else ("fhir:1", "cdc:1"))
    final = apply(s, ev(own, 88.0, version=2, source=final_source, status=Status.FINAL))
    assert kinds(final) == ["corrected"] and final.outcomes[0].supersedes == other
    assert [f[1] for f in final.state.live(codes.HEART_RATE)] == [own]
    assert hr_values(final.state) == [88.0] and preliminary_flags(final.state) == [False]
    # the replaced fact is the alias: its own final version changes nothing more
    later = apply(final.state, ev(other, 91.0, version=2, source=OTHER[final_source], status=Status.FINAL))
    assert [(o.kind, o.duplicate_kind) for o in later.outcomes] == [RESTATEMENT]
    assert hr_values(later.state) == [88.0]
    # a preliminary new version replaces nothing; neither does a final one with no other preliminary
    assert kinds(apply(s, ev(own, 88.0, version=2, source=final_source, status=Status.PRELIMINARY))) == ["corrected"]
    alone = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY)).state
    assert apply(alone, ev("cdc:1", 88.0, version=2)).outcomes[0].supersedes is None


@pytest.mark.parametrize("value", [80.0, 95.0])
def test_a_preliminary_result_arriving_after_the_other_sources_final_one_is_its_alias(value):
    """The final result came first through one source; the other source's preliminary version of it
    arrives after (a lagging feed). Whatever its value it is that result's earlier version, not a
    second reading: it never goes live, and its own later final version is a restatement."""
    s = apply(None, ev("cdc:1", 80.0), ev("b", 90.0, T0 + 10 * MIN)).state
    late_prelim = apply(s, ev("fhir:1", value, source=Source.FHIR, status=Status.PRELIMINARY))
    assert [(o.kind, o.duplicate_kind) for o in late_prelim.outcomes] == [(Kind.DUPLICATE, DuplicateKind.CROSS_SOURCE)]
    assert hr_values(late_prelim.state) == [80.0, 90.0] and preliminary_flags(late_prelim.state) == [False, False]
    final = apply(late_prelim.state, ev("fhir:1", 80.0, version=2, source=Source.FHIR))
    assert [(o.kind, o.duplicate_kind) for o in final.outcomes] == [RESTATEMENT]
    # a final result of the other source at another value is still another fact (as before)
    assert kinds(apply(s, ev("fhir:2", 95.0, source=Source.FHIR))) == ["accepted"]


def test_a_final_twin_at_the_pruning_floor_is_late_however_the_events_are_batched():
    """A preliminary result at exactly clock - lateness - the longest window is pruned at the batch's end:
    its final version from the other source must be late inside that batch too, not a correction that
    only a batch cut at another place would have made (outcomes never depend on micro-batches)."""
    prelim = ev("fhir:1", 80.0, T0, source=Source.FHIR, status=Status.PRELIMINARY)
    clock = ev("b", 70.0, T0 + LATENESS + 24 * HOUR)
    final = ev("cdc:1", 95.0, T0)
    whole = apply(None, prelim, clock, final)
    cut = apply(apply(None, prelim, clock).state, final)
    assert kinds(whole)[-1] == kinds(cut)[-1] == "late"

def test_a_final_twin_is_never_late_while_its_preliminary_result_is_live():
    # like a correction (rule 2): the 1 h lateness bound has long passed, the fact is still live
    s = apply(None, ev("cdc:1", 80.0, status=Status.PRELIMINARY), ev("b", 90.0, T0 + 5 * HOUR)).state
    final = apply(s, ev("fhir:1", 80.0, source=Source.FHIR))
    assert kinds(final) == ["corrected"] and preliminary_flags(final.state) == [False, False]
    # once pruned (beyond lateness + 24 h) nothing is live to correct: late, as before
    s = apply(s, ev("c", 90.0, T0 + 30 * HOUR)).state
    assert kinds(apply(s, ev("fhir:1", 80.0, source=Source.FHIR))) == ["late"]


def test_a_state_written_in_format_1_loads_with_its_facts_taken_as_final():
    """Format 1 (before the preliminary mark) kept no status: its facts load as final ones, unchanged,
    and the state is written back in the current format."""
    old = {"format": 1, "clock": T0, "known": {"a": [1, T0, False]},
           "facts": {codes.HEART_RATE: [[T0, "a", 80.0, "cdc", 1]]}}
    s = PatientState.from_dict(orjson.loads(orjson.dumps(old)))
    assert preliminary_flags(s) == [False] and hr_values(s) == [80.0]
    assert s.to_dict()["format"] == STATE_FORMAT
    assert kinds(apply(s, ev("a", 80.0, T0))) == ["duplicate"]  # its dedupe memory still holds


# --- batching does not matter: outcomes depend on arrival order only ------------------------------

_event = st.builds(
    ev,
    fact_id=st.sampled_from(["a", "b", "c", "d"]),
    value=st.sampled_from([80.0, 80.02, 81.0]),
    # few distinct times (around the 24 h window and 48 h horizon) so twins and expiries happen
    eff=st.sampled_from([0, 1, 2, 23, 25, 26, 49, 50, 51, 75]).map(lambda h: T0 + h * HOUR),
    version=st.integers(1, 3),
    source=st.sampled_from(list(Source)),
    status=st.sampled_from([Status.FINAL, Status.AMENDED, Status.ENTERED_IN_ERROR, Status.PRELIMINARY]),
)


def test_a_swept_key_whose_fact_is_still_live_still_drops_its_stale_copy_whatever_the_batches():
    """With a lateness of 30 h, facts stay live longer than the 48 h dedupe horizon: the sweep at a
    batch's end dropped such a fact's key, so a later new version of it no longer dropped the stale live
    copy, and a final result then 'corrected' that copy (supersedes 'a') only when the batch had been cut
    there (found by the property test below in CI)."""
    lateness = 30 * HOUR
    first = [ev("a", 80.0, T0, source=Source.FHIR, status=Status.PRELIMINARY), ev("b", 80.0, T0 + 49 * HOUR)]
    then = [ev("a", 80.0, T0 + 23 * HOUR), ev("a", 80.0, T0, version=2)]
    whole = apply(None, *first, *then, lateness=lateness)
    cut = apply(None, *first, lateness=lateness)
    restored = PatientState.from_dict(orjson.loads(orjson.dumps(cut.state.to_dict())))
    assert cut.outcomes + apply(restored, *then, lateness=lateness).outcomes == whole.outcomes
    assert whole.outcomes[-1].supersedes is None


@hyp_settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=25), cuts=st.sets(st.integers(1, 24)),
       lateness=st.sampled_from([1 * HOUR, 30 * HOUR]))
def test_splitting_into_micro_batches_and_restoring_from_json_changes_no_outcome(events, cuts, lateness):
    whole = apply(None, *events, lateness=lateness)
    state, outcomes, bounds = None, [], [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    for lo, hi in zip(bounds, bounds[1:]):
        if state is not None:
            state = PatientState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
        r = apply(state, *events[lo:hi], lateness=lateness)
        state, outcomes = r.state, outcomes + r.outcomes
    assert outcomes == whole.outcomes
    if whole.state.clock is not None:
        T = whole.state.clock
        assert compute_features(state, T) == compute_features(whole.state, T)


# --- the table codec: what format 4 leaves out comes back ------------------------------------------


def round_trip(state: PatientState) -> PatientState:
    return PatientState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))


@hyp_settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=25), cuts=st.sets(st.integers(1, 24)),
       lateness=st.sampled_from([1 * HOUR, 30 * HOUR]), horizon=st.sampled_from([2 * HOUR, 48 * HOUR]))
def test_a_state_read_back_from_its_json_is_the_state_it_was(events, cuts, lateness, horizon):
    """Keys implied by a live fact, not implied (restated, aliases, retracted, pruned with their content),
    swept keys, both sources, preliminary marks: after each micro-batch the state read back from JSON is
    equal to it (tuples as tuples), writes the same JSON again, and the keys it left out are exactly those
    a live fact implies (the shortcut apply_batch keeps agrees with working it out)."""
    if horizon <= lateness:
        horizon = lateness + HOUR
    state, bounds = None, [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    for lo, hi in zip(bounds, bounds[1:]):
        state = apply(state, *events[lo:hi], lateness=lateness, horizon=horizon).state
        restored = round_trip(state)
        assert restored == state
        assert restored.to_dict() == state.to_dict()
        assert state.to_dict()["known"] == PatientState(state.known, state.facts, state.clock).to_dict()["known"]
        state = restored if lo % 2 else state  # continue from either


def test_format_4_leaves_out_the_keys_live_facts_imply_and_keeps_the_others():
    s = apply(None, ev("a", 80.0, T0), ev("b", 90.0, T0 + MIN), ev("fhir:b", 90.0, T0 + MIN, source=Source.FHIR),
              ev("x", None, T0, status=Status.ENTERED_IN_ERROR)).state
    s = apply(s, ev("b", 90.0, T0 + MIN, version=2)).state  # restated: its key's version is above its live copy's
    written = s.to_dict()["known"]
    assert set(written) == {"b", "fhir:b", "x"}  # "a": its live copy says version 1 at T0, not an alias
    assert written["b"] == (2, T0 + MIN, False) and written["fhir:b"] == (1, T0 + MIN, True)
    assert round_trip(s).known == s.known


def test_a_live_fact_without_a_key_stays_without_one():
    """Not made by apply_batch (a state from before the sweep kept live facts' keys): no key is made up."""
    s = PatientState({}, {codes.HEART_RATE: [(T0, "a", 80.0, "cdc", 1)]}, T0)
    assert s.to_dict()["known"] == {"a": None}
    assert round_trip(s) == s and round_trip(round_trip(s)) == s
    then = apply(round_trip(s), ev("b", 81.0, T0 + MIN)).state
    assert "a" not in then.known and round_trip(then) == then  # (written in full: a null for "a")


def test_a_state_written_in_format_3_keeps_every_key_and_reads_back_the_same():
    """settings.state_write_format 3: what a release before format 4 reads (it derives no key)."""
    s = apply(None, ev("a", 80.0, T0), ev("b", 90.0, T0 + MIN), ev("x", None, T0, status=Status.ENTERED_IN_ERROR)).state
    written = s.to_dict(3)
    assert written["format"] == 3 and written["known"] == s.known and set(written["known"]) == {"a", "b", "x"}
    assert PatientState.from_dict(orjson.loads(orjson.dumps(written))) == s


def test_a_state_written_in_format_3_loads_as_the_same_state():
    """Format 3 wrote every key: the state is the same, and is written back in format 4."""
    raw = (b'{"format":3,"clock":1700000060000,"known":{"a":[1,1700000000000,false],"b":[2,1700000060000,false],'
           b'"fhir:b":[1,1700000060000,true],"x":[1,1700000000000,false,null],'
           b'"p":[1,1699900000000,false,["8867-4",70.0,true]]},"facts":{"8867-4":[[1700000000000,"a",80.0,"cdc",1],'
           b'[1700000060000,"b",90.0,"cdc",1,true]]}}')
    s = PatientState.from_dict(orjson.loads(raw))
    assert s == PatientState({"a": (1, T0, False), "b": (2, T0 + MIN, False), "fhir:b": (1, T0 + MIN, True),
                              "x": (1, T0, False, None), "p": (1, T0 - 100_000_000, False, ("8867-4", 70.0, True))},
                             {codes.HEART_RATE: [(T0, "a", 80.0, "cdc", 1), (T0 + MIN, "b", 90.0, "cdc", 1, True)]},
                             T0 + MIN)
    assert s.to_dict()["format"] == STATE_FORMAT == 4 and "a" not in s.to_dict()["known"]
    assert round_trip(s) == s
    assert restated(apply(s, ev("p", 70.0, T0 - 100_000_000, version=2, status=Status.PRELIMINARY))) == [RESTATEMENT]
    assert kinds(apply(s, ev("a", 80.0, T0), ev("b", 90.0, T0 + MIN, version=2))) == ["duplicate", "duplicate"]


# --- rule 6: a FHIR Observation version replaces all of its resource's facts -----------------------

SPO2, FLOW, RR = codes.SPO2, codes.O2_FLOW, codes.RESP_RATE


def obs(code: str, value: float | None, version: int, version_codes: tuple[str, ...], *, eff: int = T0,
        status: Status = Status.FINAL) -> CanonicalEvent:
    """An event of version `version` of FHIR Observation/o1, which carries `version_codes`."""
    return CanonicalEvent(patient_id="p1", code=code, value=value, unit=None, effective_ms=eff, issued_ms=eff,
                          status=status, source=Source.FHIR, fact_id=f"fhir:Observation/o1:{code}", version=version,
                          version_codes=tuple(sorted(version_codes)))


def live_codes(state: PatientState) -> dict[str, list[float]]:
    return {code: [f[VALUE] for f in rows] for code, rows in state.facts.items() if rows}


def test_a_version_dropping_a_component_retracts_the_earlier_versions_fact_of_it():
    # an O2 flow of 2 L/min charted on an SpO2 by mistake; version 2 has the SpO2 alone
    first = apply(None, obs(SPO2, 95.0, 1, (SPO2, FLOW)), obs(FLOW, 2.0, 1, (SPO2, FLOW)))
    r = apply(first.state, obs(SPO2, 95.0, 2, (SPO2,)))
    assert [(o.event.fact_id, o.kind, o.event.status) for o in r.outcomes] == [
        ("fhir:Observation/o1:59408-5", "duplicate", Status.FINAL),  # the SpO2 restated
        ("fhir:Observation/o1:3151-8", "corrected", Status.ENTERED_IN_ERROR)]  # the flow retracted at version 2
    assert r.outcomes[1].replaced_by == "fhir:Observation/o1:59408-5" and r.outcomes[1].event.version == 2
    assert r.changed
    assert live_codes(r.state) == {SPO2: [95.0]}
    assert compute_features(r.state, T0)["on_oxygen"] == 0
    # idempotent: the same version again, or version 1 redelivered, changes nothing
    again = apply(r.state, obs(SPO2, 95.0, 2, (SPO2,)), obs(FLOW, 2.0, 1, (SPO2, FLOW)))
    assert kinds(again) == ["duplicate", "duplicate"] and not again.changed
    assert live_codes(again.state) == {SPO2: [95.0]}


def test_a_version_correcting_the_code_retracts_the_old_codes_fact():
    first = apply(None, obs(codes.HEART_RATE, 18.0, 1, (codes.HEART_RATE,)))
    r = apply(first.state, obs(RR, 18.0, 2, (RR,)))
    assert [(o.event.fact_id, o.kind) for o in r.outcomes] == [
        ("fhir:Observation/o1:9279-1", "accepted"), ("fhir:Observation/o1:8867-4", "corrected")]
    assert live_codes(r.state) == {RR: [18.0]}


def test_an_older_version_arriving_after_the_newer_one_neither_resurrects_nor_retracts():
    newer = apply(None, obs(SPO2, 96.0, 2, (SPO2,)))
    r = apply(newer.state, obs(SPO2, 95.0, 1, (SPO2, FLOW)), obs(FLOW, 2.0, 1, (SPO2, FLOW)))
    assert [(o.kind, o.duplicate_kind) for o in r.outcomes] == [("duplicate", "redelivery")] * 2
    assert not r.changed
    assert live_codes(r.state) == {SPO2: [96.0]}


def test_an_entered_in_error_version_retracts_every_fact_of_the_resource():
    first = apply(None, obs(SPO2, 95.0, 1, (SPO2, FLOW)), obs(FLOW, 2.0, 1, (SPO2, FLOW)))
    # the retracted version arrives stripped of its flow component: the flow goes too
    r = apply(first.state, obs(SPO2, None, 2, (SPO2,), status=Status.ENTERED_IN_ERROR))
    assert kinds(r) == ["corrected", "corrected"]
    assert live_codes(r.state) == {}


def test_events_without_version_codes_keep_the_old_behaviour():
    # a FHIR event archived before version_codes existed: the rule does not apply
    first = apply(None, ev("fhir:Observation/o1:59408-5", 95.0, code=SPO2, source=Source.FHIR),
                  ev("fhir:Observation/o1:3151-8", 2.0, code=FLOW, source=Source.FHIR))
    r = apply(first.state, ev("fhir:Observation/o1:59408-5", 95.0, code=SPO2, source=Source.FHIR, version=2))
    assert kinds(r) == ["duplicate"]
    assert live_codes(r.state) == {SPO2: [95.0], FLOW: [2.0]}


def marker(version: int, *, eff: int = T0) -> CanonicalEvent:
    """Version `version` of FHIR Observation/o1 carrying none of the mapped codes (recoded to a code wardwatch
    does not map, or its value absent): its version marker, as schemas/fhir.py gives it."""
    return CanonicalEvent(patient_id="p1", code=codes.VERSION_MARK, value=None, unit=None, effective_ms=eff,
                          issued_ms=eff, status=Status.ENTERED_IN_ERROR, source=Source.FHIR,
                          fact_id=f"fhir:Observation/o1:{codes.VERSION_MARK}", version=version,
                          code_system=codes.VERSION_MARKS, version_codes=())


HR = codes.HEART_RATE
MARK_ID, HR_ID = f"fhir:Observation/o1:{codes.VERSION_MARK}", f"fhir:Observation/o1:{codes.HEART_RATE}"


def test_a_version_carrying_no_mapped_code_retracts_the_earlier_versions_facts():
    """v1 a heart rate of 140; v2 recoded to a code wardwatch does not map (or its value withdrawn: a
    dataAbsentReason). Before, v2 gave no event and the 140 stayed live: features and alerts rested on a
    reading the EHR had withdrawn."""
    first = apply(None, obs(HR, 140.0, 1, (HR,)))
    assert live_codes(first.state) == {HR: [140.0]} and compute_features(first.state, T0)["heart_rate_last_24h"] == 140
    r = apply(first.state, marker(2))
    assert [(o.event.fact_id, o.kind, o.event.status, o.replaced_by) for o in r.outcomes] == [
        (MARK_ID, "accepted", Status.ENTERED_IN_ERROR, None),  # the marker: a retraction of a fact never live
        (HR_ID, "corrected", Status.ENTERED_IN_ERROR, MARK_ID)]  # the heart rate retracted at version 2
    assert r.outcomes[1].event.version == 2 and r.outcomes[1].event.code_system == LOINC
    assert r.changed and live_codes(r.state) == {}
    assert compute_features(r.state, T0)["heart_rate_last_24h"] is None
    # its redelivery, and version 1 arriving again after it, change nothing
    again = apply(r.state, marker(2), obs(HR, 140.0, 1, (HR,)))
    assert [(o.kind, o.duplicate_kind) for o in again.outcomes] == [("duplicate", "redelivery")] * 2
    assert not again.changed and live_codes(again.state) == {}
    assert round_trip(r.state) == r.state  # the marker's known entry is a retracted fact's (format unchanged)
    # a later version with a mapped code makes the resource's fact live again; the marker is never retracted
    back = apply(r.state, obs(HR, 90.0, 3, (HR,)))
    assert [(o.event.fact_id, o.kind) for o in back.outcomes] == [(HR_ID, "corrected")]
    assert live_codes(back.state) == {HR: [90.0]}


def test_a_version_marker_arriving_first_makes_the_older_version_stale():
    r = apply(None, marker(2))
    assert kinds(r) == ["accepted"] and live_codes(r.state) == {} and not any(o.replaced_by for o in r.outcomes)
    older = apply(r.state, obs(HR, 140.0, 1, (HR,)))
    assert [(o.kind, o.duplicate_kind) for o in older.outcomes] == [("duplicate", "redelivery")]
    assert live_codes(older.state) == {}
    # and a marker older than a known version is stale too: it retracts nothing
    newer = apply(None, obs(HR, 90.0, 3, (HR,)))
    late_marker = apply(newer.state, marker(2))
    assert [(o.kind, o.duplicate_kind) for o in late_marker.outcomes] == [("duplicate", "redelivery")]
    assert live_codes(late_marker.state) == {HR: [90.0]}


def test_a_second_version_marker_is_a_restatement_and_an_entered_in_error_one_retracts_alike():
    first = apply(None, obs(SPO2, 95.0, 1, (SPO2, FLOW)), obs(FLOW, 2.0, 1, (SPO2, FLOW)))
    r = apply(first.state, marker(2), marker(3))
    assert [(o.event.fact_id, o.kind, o.duplicate_kind) for o in r.outcomes] == [
        (MARK_ID, "accepted", None), ("fhir:Observation/o1:3151-8", "corrected", None),
        ("fhir:Observation/o1:59408-5", "corrected", None), (MARK_ID, "duplicate", "restatement")]
    assert live_codes(r.state) == {}


_version_event = st.builds(
    lambda code, others, version, value, hours, status: obs(
        code, None if status is Status.ENTERED_IN_ERROR else value, version, (code, *others),
        eff=T0 + hours * HOUR, status=status),
    code=st.sampled_from([SPO2, FLOW, RR]), others=st.sets(st.sampled_from([SPO2, FLOW, RR])),
    version=st.integers(1, 3), value=st.sampled_from([95.0, 2.0]), hours=st.sampled_from([0, 1, 25, 50]),
    status=st.sampled_from([Status.FINAL, Status.AMENDED, Status.ENTERED_IN_ERROR, Status.PRELIMINARY]))


_marker_event = st.builds(lambda version, hours: marker(version, eff=T0 + hours * HOUR),
                          version=st.integers(1, 3), hours=st.sampled_from([0, 1, 25, 50]))


@hyp_settings(max_examples=300, deadline=None)
@given(events=st.lists(st.one_of(_version_event, _marker_event, _event), max_size=25), cuts=st.sets(st.integers(1, 24)),
       lateness=st.sampled_from([1 * HOUR, 30 * HOUR]))
def test_rule_6_outcomes_do_not_depend_on_micro_batches_and_its_state_reads_back_from_json(events, cuts, lateness):
    """Versions dropping and adding codes, out of order, retracted, mixed with other facts: the outcomes
    (the retractions rule 6 adds among them) are the same however the stream is cut into micro-batches
    and whether each batch starts from the state read back from the table's JSON, which is the state it was."""
    whole = apply(None, *events, lateness=lateness)
    state, outcomes, bounds = None, [], [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    for lo, hi in zip(bounds, bounds[1:]):
        if state is not None:
            restored = round_trip(state)
            assert restored == state and restored.to_dict() == state.to_dict()
            state = restored
        r = apply(state, *events[lo:hi], lateness=lateness)
        state, outcomes = r.state, outcomes + r.outcomes
    assert outcomes == whole.outcomes
    assert round_trip(whole.state) == whole.state


def test_an_event_of_a_code_outside_the_mapping_is_no_fact_of_a_resource():
    """A foreign producer's event carrying version_codes, of a code wardwatch does not map (or none, with
    an empty fact_id): applied like any fact, as the batch plane does (its `_resource` is null), never
    retracting the resource's facts nor an error that dead-letters the patient's message."""
    first = apply(None, obs(SPO2, 95.0, 1, (SPO2,)))
    foreign = dataclasses.replace(obs(SPO2, 1.0, 2, ("zzz",)), code="zzz", fact_id="fhir:Observation/o1:zzz")
    r = apply(first.state, foreign)
    assert kinds(r) == ["accepted"] and live_codes(r.state) == {SPO2: [95.0], "zzz": [1.0]}
    empty = dataclasses.replace(obs(SPO2, 1.0, 2, ()), code="", fact_id="")
    assert kinds(apply(first.state, empty)) == ["accepted"]
