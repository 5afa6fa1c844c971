import pytest

from benchmarks.batch import canonical_polls, renamed, run_batch_bench
from schemas.canonical import CanonicalEvent, Source, Status


def event(patient: str, fact: str, t: int) -> CanonicalEvent:
    return CanonicalEvent(patient_id=patient, code="8867-4", value=80.0, unit="/min", effective_ms=t, issued_ms=t,
                          status=Status.FINAL, source=Source.CDC, fact_id=fact, version=1, encounter_id="ENC-1")


def test_copies_are_new_patients_with_new_facts_and_the_same_content():
    [copy] = renamed([event("P1", "cdc:vital_signs:1:8867-4", 5)], 3)
    assert (copy.patient_id, copy.fact_id, copy.encounter_id) == ("P1-b3", "cdc:vital_signs:1:8867-4-b3", "ENC-1-b3")
    assert (copy.value, copy.effective_ms, copy.code) == (80.0, 5, "8867-4")


def test_polls_group_each_patient_in_arrival_order_until_the_event_count():
    messages = [[event("P1", "a", 1)], [event("P2", "b", 2)], [event("P1", "c", 3)]]
    polls = list(canonical_polls(messages, n_events=5, raw_per_poll=2))
    flat = [(p, e.fact_id) for poll in polls for p, events in poll.items() for e in events]
    assert flat == [("P1-b0", "a-b0"), ("P2-b0", "b-b0"), ("P1-b0", "c-b0"), ("P1-b1", "a-b1"), ("P2-b1", "b-b1")]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_small_batch_bench_rebuilds_and_passes_parity(tmp_path):
    r = run_batch_bench(events=6000, patients=2, data_dir=tmp_path / "bench", cache_dir=tmp_path / "cache")
    assert r["events"] >= 6000 and r["scan_events"] == r["events"]  # the baseline read the same archive
    assert r["nightly_parity_ok"] and r["parity_points"] > 0 and r["parity_mismatched"] == 0
    assert r["nightly_events_per_s"] > 0 and r["scan_events_per_s"] > 0
    assert r["archive_rows"]["canonical"] == r["events"] and r["archive_rows"]["features"] == r["parity_points"]
