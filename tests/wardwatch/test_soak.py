"""The pure checks of `wardwatch soak` (wardwatch/soak.py): what counts as a lost, extra or
differing alert, a scoring difference, an unapplied offset or an inexact mirror."""

from __future__ import annotations

import orjson

from streams.app import NEXT_OFFSET_PREFIX
from streams.patient_agent import PatientRecord
from streams.state import PatientState
from wardwatch.soak import (canonical_accounting, compare, is_recovery_barrier, kill_moments,
                            mirror_accounting, next_offset_marker, raw_accounting, soak_checks)
from wardwatch.worker_results import Results, recovery_seconds


def _alert(alert_id: str, tier: str = "high") -> bytes:
    return orjson.dumps({"header": {"alert_id": alert_id, "tier": tier}})


def _point(features: dict, offset: int = 1) -> bytes:
    return orjson.dumps({"features": features, "partition": 0, "offset": offset})


def _score(probability: float = 0.1) -> bytes:
    return orjson.dumps({"probability": probability, "tier": "low"})


def _patient(vitals_scored_ms: int | None = None) -> dict:
    return orjson.loads(PatientRecord(PatientState(), {}, vitals_scored_ms=vitals_scored_ms).to_bytes())


def _results(alerts: dict[str, list[bytes]], points: dict[str, dict] | None = None, *,
             scores: dict[str, bytes] | None = None, state: dict[str, dict] | None = None) -> Results:
    points = points if points is not None else {"s1": {"hr_last": 80.0}}
    scores = scores or {}
    return Results(state=state if state is not None else {"p1": _patient()}, next_offsets={},
                   features={s: {_point(f)} for s, f in points.items()},
                   scores={s: {scores.get(s, _score())} for s in points},
                   alerts={i: set(records) for i, records in alerts.items()},
                   records_per_id={i: len(records) for i, records in alerts.items()})


def test_identical_runs_compare_clean_and_a_redelivery_is_a_duplicate_not_a_difference():
    ref = _results({"a1": [_alert("a1")], "a2": [_alert("a2")]})
    got = _results({"a1": [_alert("a1"), _alert("a1")], "a2": [_alert("a2")]})  # a1 re-published after a kill

    cmp = compare(ref, got)

    assert cmp["alerts"] == cmp["alerts_compared"] == 2
    assert cmp["alerts_lost"] == 0 and cmp["alerts_extra_ids"] == [] and cmp["alerts_differing_ids"] == []
    assert cmp["duplicates_delivered"] == 1 and cmp["duplicate_alert_ids"] == 1
    assert cmp["duplicates_differing_ids"] == []
    assert cmp["feature_values_compared"] == 1 and cmp["feature_mismatch_ids"] == []


def test_lost_extra_and_changed_alerts_are_named():
    ref = _results({"a1": [_alert("a1")], "a2": [_alert("a2")], "a3": [_alert("a3")]})
    got = _results({"a1": [_alert("a1")], "a3": [_alert("a3", tier="medium")], "a9": [_alert("a9")]})

    cmp = compare(ref, got)

    assert (cmp["alerts_lost"], cmp["alerts_missing_ids"]) == (1, ["a2"])
    assert cmp["alerts_extra_ids"] == ["a9"]
    assert cmp["alerts_differing_ids"] == ["a3"]


def test_a_duplicate_with_other_contents_is_reported():
    ref = _results({"a1": [_alert("a1")]})
    got = _results({"a1": [_alert("a1"), _alert("a1", tier="medium")]})

    cmp = compare(ref, got)
    assert cmp["duplicates_differing_ids"] == ["a1"] and cmp["reference_duplicates_differing_ids"] == []
    assert compare(got, ref)["reference_duplicates_differing_ids"] == ["a1"]


def test_scoring_differences_are_named_by_snapshot_id():
    ref = _results({}, {"s1": {"hr_last": 80.0}, "s2": {"hr_last": 90.0}, "s3": {"hr_last": 70.0}})
    got = _results({}, {"s1": {"hr_last": 80.0}, "s2": {"hr_last": 91.0}, "s4": {"hr_last": 60.0}})

    cmp = compare(ref, got)

    assert cmp["feature_mismatch_ids"] == ["s2"]
    assert cmp["snapshots_missing_ids"] == ["s3"] and cmp["snapshots_extra_ids"] == ["s4"]
    assert cmp["scores_missing_ids"] == ["s3"] and cmp["scores_extra_ids"] == ["s4"]


def test_a_score_or_snapshot_record_that_differs_under_the_same_id_is_named():
    """Same snapshot ids and feature values, but the chaos worker scored one point otherwise (a
    re-emission after a restart that differed in its probability) and put another at another offset."""
    ref = _results({}, {"s1": {"hr_last": 80.0}, "s2": {"hr_last": 90.0}})
    got = _results({}, {"s1": {"hr_last": 80.0}, "s2": {"hr_last": 90.0}}, scores={"s2": _score(0.1000001)})
    got.features["s1"] = {_point({"hr_last": 80.0}, offset=7)}

    cmp = compare(ref, got)

    assert cmp["feature_mismatch_ids"] == []  # the feature values alone are the same
    assert cmp["scores_differing_ids"] == ["s2"] and cmp["snapshots_differing_ids"] == ["s1"]
    assert not soak_checks(_kills(), cmp, _acct(), _nightly(), _calm())["same_scoring"]


def test_a_patient_table_that_ends_differently_is_named():
    ref = _results({}, state={"p1": _patient(), "p2": _patient(1_000), "p3": _patient()})
    got = _results({}, state={"p1": _patient(), "p2": _patient(2_000), "p4": _patient()})

    cmp = compare(ref, got)

    assert cmp["patients"] == 3
    assert (cmp["state_missing_ids"], cmp["state_extra_ids"], cmp["state_differing_ids"]) == (["p3"], ["p4"], ["p2"])
    assert not soak_checks(_kills(), cmp, _acct(), _nightly(), _calm())["same_scoring"]


def _kills(n: int = 2, **over) -> list[dict]:
    return [{"kill": k + 1, "services": ["worker"], "mid_stream": True, "sigkilled": True, "restarted": True, **over}
            for k in range(n)]


def _acct(messages: int = 10) -> dict:
    worker = {"canonical_messages": messages, "canonical_unapplied": {}, "canonical_uncommitted": {}}
    return {"raw": {"balanced": True, "all_read": True}, "mirror": {"exact": True},
            "reference": worker, "chaos": dict(worker)}


def _nightly(points: int = 5) -> dict:
    return {"parity_ok": True, "parity": {"points_checked": points}}


def _calm() -> dict:
    return {"reference": {}, "chaos": {}}


def _clean_cmp() -> dict:
    return compare(_results({"a1": [_alert("a1")]}), _results({"a1": [_alert("a1")]}))


def test_a_clean_soak_passes_every_check():
    assert all(soak_checks(_kills(), _clean_cmp(), _acct(), _nightly(), _calm()).values())


def test_a_soak_that_compared_nothing_fails():
    """An empty feed, a worker that scored nothing, or a nightly that checked no point: both sides
    agree on nothing, which must not read as "nothing lost"."""
    nothing = compare(_results({}, {}, state={}), _results({}, {}, state={}))
    checks = soak_checks(_kills(), nothing, _acct(messages=0), _nightly(points=0), _calm())

    assert not checks["no_alert_lost"] and not checks["same_scoring"]
    assert not checks["accounting"] and not checks["parity"]
    # and each on its own
    no_points = compare(_results({"a1": [_alert("a1")]}, {}), _results({"a1": [_alert("a1")]}, {}))
    assert not soak_checks(_kills(), no_points, _acct(), _nightly(), _calm())["same_scoring"]
    assert not soak_checks(_kills(), _clean_cmp(), _acct(), _nightly(points=0), _calm())["parity"]


def test_a_kill_that_did_not_happen_or_a_disturbed_reference_fails():
    cmp, acct, nightly = _clean_cmp(), _acct(), _nightly()
    assert not soak_checks([], cmp, acct, nightly, _calm())["kills_mid_stream"]
    # the worker had already exited when the SIGKILL came (a crash, not the kill), or was not replaced
    assert not soak_checks(_kills(sigkilled=False), cmp, acct, nightly, _calm())["kills_mid_stream"]
    assert not soak_checks(_kills(restarted=False), cmp, acct, nightly, _calm())["kills_mid_stream"]
    assert not soak_checks(_kills(mid_stream=False), cmp, acct, nightly, _calm())["kills_mid_stream"]
    # the reference worker exited on its own and was restarted: it is no undisturbed reference
    checks = soak_checks(_kills(), cmp, acct, nightly, {"reference": {"worker": 1}, "chaos": {}})
    assert not checks["reference_undisturbed"]
    # an ingest restart is shared by both workers, a chaos worker's own exit is part of the chaos
    assert soak_checks(_kills(), cmp, acct, nightly, {"reference": {"ingest": 1}, "chaos": {"worker": 1}})[
        "reference_undisturbed"]


def test_canonical_accounting_names_partitions_not_applied_or_not_committed():
    ends = {0: 100, 1: 50, 2: 0}
    acct = canonical_accounting(ends, applied={0: 100, 1: 48}, committed={0: 90, 1: 50, 2: -1001})

    assert acct["canonical_messages"] == 150
    assert acct["canonical_unapplied"] == {"1": 2}
    assert acct["canonical_uncommitted"] == {"0": 10}  # an empty partition with no commit is not behind


def test_mirror_is_exact_only_when_everything_landed_at_its_own_offset():
    ends = {0: 10, 1: 5}
    assert mirror_accounting(ends, {0: 10, 1: 5}, {0: 10, 1: 5}, shifted=0)["exact"]

    uncopied = mirror_accounting(ends, {0: 10, 1: 4}, {0: 10, 1: 4}, shifted=0)
    assert not uncopied["exact"] and uncopied["uncopied"] == {"1": 1}
    assert not mirror_accounting(ends, {0: 10, 1: 5}, {0: 11, 1: 5}, shifted=1)["exact"]  # a retry's repeat
    assert mirror_accounting(ends, {0: 10, 1: 5}, {0: 10}, shifted=0)["chaos_topic_ends_differing"] == {"1": 0}


def test_raw_accounting_needs_every_raw_offset_committed_and_counted_once_unless_ingest_was_killed():
    stats = {"balanced": True, "services": {"ingest": {"counters": {
        "cdc": {"messages_in": 12, "events_out": 40, "dead_lettered": {"malformed_json": 1, "internal_error": 2}},
        "fhir": {"messages_in": 5, "events_out": 9}}}}}
    published = {"cdc": 10, "fhir": 5}

    assert not raw_accounting(stats, published, {}, ingest_killed=False)["all_read"]  # 2 counted twice
    assert raw_accounting(stats, {"cdc": 12, "fhir": 5}, {}, ingest_killed=False)["all_read"]
    # a SIGKILLed ingest: its counters are as of its last snapshot; the committed offsets decide
    killed = raw_accounting(stats, published, {}, ingest_killed=True)
    assert killed["all_read"] and killed["canonical_events"] == 49
    assert killed["dead_lettered"] == {"cdc": 3, "fhir": 0}
    not_committed = raw_accounting(stats, published, {"ehr.public.vital_signs:2": 7}, ingest_killed=True)
    assert not not_committed["all_read"] and not_committed["raw_uncommitted"] == {"ehr.public.vital_signs:2": 7}


def test_next_offset_markers_are_told_apart_from_patients_and_barriers():
    assert next_offset_marker(orjson.dumps(f"{NEXT_OFFSET_PREFIX}3"), b"1234") == (3, 1234)
    assert next_offset_marker(orjson.dumps("patient-1"), b'{"s": {}}') is None
    assert next_offset_marker(orjson.dumps("__wardwatch_recovery_barrier__"), None) is None
    assert is_recovery_barrier(orjson.dumps("__wardwatch_recovery_barrier__"), None)
    assert not is_recovery_barrier(orjson.dumps("patient-1"), None)  # a deleted patient
    assert not is_recovery_barrier(orjson.dumps(f"{NEXT_OFFSET_PREFIX}3"), b"1234")


def test_kill_moments_fall_one_per_slice_before_the_tail_and_follow_the_seed():
    moments = kill_moments(5, seed=7)
    assert [int(m * 6) for m in moments] == [0, 1, 2, 3, 4]  # slice k of 6; the 6th is the tail
    assert moments == kill_moments(5, seed=7) != kill_moments(5, seed=8)



def test_recovery_seconds_reads_the_workers_json_log_and_faust_plain_text(tmp_path):
    """The soak's and the restart tests' 'assignment to ready' figures: the worker logs JSON lines by
    default (faust's own set-up, plain text, only with WARDWATCH_JSON_LOGS=false)."""
    json_log = tmp_path / "worker.log"
    json_log.write_text(
        '{"ts":"2026-11-26T12:59:38.141Z","level":"info","logger":"faust.app.base",'
        '"msg":"Executing _on_partitions_assigned"}\n'
        '%3|1795697843.714|FAIL|librdkafka noise\n'
        '{"ts":"2026-11-26T12:59:40.391Z","level":"info","logger":"streams.app",'
        '"msg":"[^---ExactEndRecovery]: Worker ready"}\n')
    assert recovery_seconds(json_log) == [2.25]
    plain = tmp_path / "plain.log"
    plain.write_text("[2026-11-26 12:59:38,141] [7] [INFO] Executing _on_partitions_assigned \n"
                     "[2026-11-26 12:59:38,641] [7] [INFO] [^---ExactEndRecovery]: Worker ready \n")
    assert recovery_seconds(plain) == [0.5]
    ours = tmp_path / "ours.log"  # WARDWATCH_JSON_LOGS=false: wardwatch's plain text
    ours.write_text("2026-11-26 12:59:38,141 INFO worker faust.app.base: Executing _on_partitions_assigned\n"
                    "2026-11-26 12:59:39,391 INFO worker streams.app: [^---ExactEndRecovery]: Worker ready\n")
    assert recovery_seconds(ours) == [1.25]
