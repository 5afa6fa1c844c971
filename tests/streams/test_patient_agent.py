"""The per-patient step without Kafka: dead-lettering, scoring points, late output, alerts, and
idempotence when a batch is reprocessed after a restart."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timezone

import orjson
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, encode_batch, make_event_id
from schemas.deadletter import Reason
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed
from streams.patient_agent import CanonicalMessage, PatientProcessor, PatientRecord
from streams.alerting import NAMESPACE
from streams.scoring import Scorer, ScoreResult
from tests.fixtures.ingest.corpus import fhir_bundle, gcs_bundle
from wardwatch.settings import Settings

T0 = 1_718_000_000_000
MIN = 60_000


@pytest.fixture
def settings(tmp_path):  # no broker: the rule path (no model registry) is real scoring
    return Settings(model_dir=tmp_path / "no-models", allowed_lateness_s=3600)


@pytest.fixture
def processor(settings):
    return PatientProcessor(settings, Scorer(settings.model_dir, settings))


def vitals(patient: str, t: int, row: int, *, rr=26, spo2=90, flow=2.0, sbp=88, hr=135, acvpu=3, temp=39.5):
    """One wide vitals row: every NEWS2 parameter (defaults score high: NEWS2 >= 7)."""
    values = {codes.RESP_RATE: rr, codes.SPO2: spo2, codes.O2_FLOW: flow, codes.SYSTOLIC_BP: sbp,
              codes.HEART_RATE: hr, codes.CONSCIOUSNESS: acvpu, codes.TEMPERATURE: temp}
    return [CanonicalEvent(patient_id=patient, code=code, value=float(v), unit=None, effective_ms=t, issued_ms=t,
                           status=Status.FINAL, source=Source.CDC, fact_id=f"cdc:vital_signs:{row}:{code}", version=row)
            for code, v in values.items()]


def msg(offset: int, events, partition: int = 0) -> CanonicalMessage:
    return CanonicalMessage(partition, offset, encode_batch(events), key=events[0].patient_id.encode())


def run(processor, messages, store: dict):
    records, out = processor.process(messages, store.get)
    store.update(records)
    return out


def test_a_changed_message_is_one_scoring_point_and_a_high_news2_opens_one_alert(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, vitals("p1", T0, 1)), msg(1, vitals("p1", T0 + 15 * MIN, 2))], store)
    snapshots = [orjson.loads(v) for _, v, _ in out.features]
    assert [(s["offset"], s["scoring_ms"]) for s in snapshots] == [(0, T0), (1, T0 + 15 * MIN)]
    assert snapshots[0]["features"]["news2"] >= 7
    alerts = [orjson.loads(v) for _, v, _ in out.alerts]
    assert [a["header"]["kind"] for a in alerts] == ["open"]  # a rising edge, not every tick
    # the basis names the latest fact of each parameter at the scoring time
    basis = {b["identifier"]["value"] for b in alerts[0]["resource"]["basis"]}
    assert make_event_id(f"cdc:vital_signs:1:{codes.HEART_RATE}", 1) in basis


def test_an_alert_carries_the_raw_produce_time_of_the_message_that_triggered_it(processor):
    # the bench's event-to-alert latency (benchmarks/pipeline.py) reads ww.produced_ns on the alert
    # record: the raw produce time of the message that raised it, not of an earlier one in the batch
    store: dict[str, PatientRecord] = {}
    calm = dataclasses.replace(msg(0, vitals("p2", T0, 1, rr=16, spo2=97, flow=0.0, sbp=120, hr=70, acvpu=0,
                                                 temp=37.0)), produced_ns=111)
    high = dataclasses.replace(msg(1, vitals("p2", T0 + 15 * MIN, 2)), produced_ns=222)
    out = run(processor, [calm, high], store)
    [(_, value, headers)] = out.alerts
    assert orjson.loads(value)["header"]["kind"] == "open"
    assert headers == [("ww.produced_ns", b"222")]
    scores = {orjson.loads(v)["offset"]: h for _, v, h in out.scores}
    assert scores[1] == headers  # as on the score record of the same point


def test_an_alert_names_its_patient_by_mrn_not_as_the_fhir_servers_patient_of_that_id(tmp_path):
    """The key is the MRN (the CDC rows' patient key): "Patient/<MRN>" would be the server's Patient of that
    id, another patient's on a HAPI server numbering 1, 2, 3... A facade's Patient ids are the MRNs."""
    for facade in (False, True):
        settings = Settings(model_dir=tmp_path / "no-models", mrn_system="urn:oid:1.2.3", fhir_patient_ids_are_mrns=facade)
        out = run(PatientProcessor(settings, Scorer(settings.model_dir, settings)), [msg(0, vitals("4711", T0, 1))], {})
        [alert] = [orjson.loads(v) for _, v, _ in out.alerts]
        if facade:
            assert alert["resource"]["subject"] == {"reference": "Patient/4711"}
        else:
            assert alert["resource"]["subject"]["identifier"]["system"] == "urn:oid:1.2.3"
            assert alert["resource"]["subject"]["identifier"]["value"] == "4711"
            assert "reference" not in alert["resource"]["subject"]


def test_a_single_news2_parameter_scoring_3_opens_an_alert_and_keeps_it_open(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "sbp": 85}))], store)
    alerts = [orjson.loads(v) for _, v, _ in out.alerts]
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in alerts] == [("open", "medium")]
    # still SBP 85 on the next two sets: not calm, so the episode is not resolved
    out = run(processor, [msg(1, vitals("p1", T0 + 15 * MIN, 2, **{**NORMAL, "sbp": 85})),
                          msg(2, vitals("p1", T0 + 30 * MIN, 3, **{**NORMAL, "sbp": 85}))], store)
    assert out.alerts == []
    assert store["p1"].alert["open"]


def test_reprocessing_after_a_restart_adds_no_point_and_no_alert(processor):
    store: dict[str, PatientRecord] = {}
    batch = [msg(0, vitals("p1", T0, 1))]
    run(processor, batch, store)
    persisted = {p: PatientRecord.from_bytes(r.to_bytes()) for p, r in store.items()}  # the table round trip
    again = run(processor, batch, persisted)
    assert again.features == [] and again.alerts == []  # every event is a redelivery


# a record as the release before state format 4 wrote it (format 3: every dedupe key written), after
# msg(0, vitals("p1", T0, 1, **NORMAL)); a changelog written before the upgrade holds such records
FORMAT_3_RECORD = (
    b'{"s":{"format":3,"clock":1718000000000,"known":{"cdc:vital_signs:1:9279-1":[1,1718000000000,false],'
    b'"cdc:vital_signs:1:59408-5":[1,1718000000000,false],"cdc:vital_signs:1:3151-8":[1,1718000000000,false],'
    b'"cdc:vital_signs:1:8480-6":[1,1718000000000,false],"cdc:vital_signs:1:8867-4":[1,1718000000000,false],'
    b'"cdc:vital_signs:1:80288-4":[1,1718000000000,false],"cdc:vital_signs:1:8310-5":[1,1718000000000,false]},'
    b'"facts":{"9279-1":[[1718000000000,"cdc:vital_signs:1:9279-1",16.0,"cdc",1]],'
    b'"59408-5":[[1718000000000,"cdc:vital_signs:1:59408-5",97.0,"cdc",1]],'
    b'"3151-8":[[1718000000000,"cdc:vital_signs:1:3151-8",0.0,"cdc",1]],'
    b'"8480-6":[[1718000000000,"cdc:vital_signs:1:8480-6",125.0,"cdc",1]],'
    b'"8867-4":[[1718000000000,"cdc:vital_signs:1:8867-4",72.0,"cdc",1]],'
    b'"80288-4":[[1718000000000,"cdc:vital_signs:1:80288-4",0.0,"cdc",1]],'
    b'"8310-5":[[1718000000000,"cdc:vital_signs:1:8310-5",37.0,"cdc",1]]}},'
    b'"a":{"episode":0,"open":false,"alerted_tier":null,"calm_points":0,"last_not_calm_ms":null,"last_alert_ms":null,'
    b'"last_resolve_ms":null,"last_scoring_ms":1718000000000,"tier":"none","probability":null,"news2":0,"path":"rule",'
    b'"model_version":null,"alerts":[],"revision":0,"closed":[]},"e":null,"c":{},"v":1718000000000,"n":{}}')


def test_a_record_written_in_state_format_3_loads_as_the_record_it_was(processor):
    store: dict[str, PatientRecord] = {}
    batch = [msg(0, vitals("p1", T0, 1, **NORMAL))]
    run(processor, batch, store)
    old = PatientRecord.from_bytes(FORMAT_3_RECORD)
    assert old == store["p1"]
    # written back in the current format without the keys (every one implied here), the same record again
    assert b'"known":{}' in old.to_bytes() and len(old.to_bytes()) < len(FORMAT_3_RECORD) * 0.75
    assert PatientRecord.from_bytes(old.to_bytes()) == old and old.to_bytes() == store["p1"].to_bytes()
    again = run(processor, batch, {"p1": old})
    assert again.features == [] and processor.counters["duplicate_redelivery"] == 7  # its dedupe keys hold


def test_state_write_format_3_writes_the_record_the_release_before_format_4_wrote(processor):
    """WARDWATCH_STATE_WRITE_FORMAT=3, for an upgrade that may be rolled back: the bytes are the ones a
    format-3 release wrote (so it reads them), and this release reads them back as the same record."""
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    assert store["p1"].to_bytes(3) == FORMAT_3_RECORD
    assert PatientRecord.from_bytes(store["p1"].to_bytes(3)) == store["p1"]


def test_late_events_are_output_with_late_by_and_not_scored(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0 + 3 * 3600_000, 1))], store)
    out = run(processor, [msg(1, vitals("p1", T0, 2))], store)  # 2 h beyond the 1 h bound
    late = [orjson.loads(v) for _, v, _ in out.late]
    assert len(late) == 7 and {r["late_by_ms"] for r in late} == {2 * 3600_000}
    assert out.features == []


def raw_msg(offset: int, patient: str, **change) -> CanonicalMessage:
    """A message of one vitals event with fields replaced as a faulty producer might write them."""
    return CanonicalMessage(0, offset, orjson.dumps([{**vitals(patient, T0, offset)[0].to_dict(), **change}]),
                            key=str(patient).encode())


def test_bad_messages_are_rejected_and_the_rest_of_the_batch_goes_on(processor):
    store: dict[str, PatientRecord] = {}
    two_patients = vitals("p1", T0, 1)[:1] + vitals("p2", T0, 2)[:1]
    messages = [CanonicalMessage(0, 0, b"{not json", key=b"p9"), msg(1, two_patients),
                raw_msg(2, "p3", value="high"), raw_msg(3, "p5", patient_id=42),
                raw_msg(4, "p6", effective_ms=1e20),  # decodes to an int beyond int64
                raw_msg(5, "__wardwatch_next_offset__:0"),  # the table key of partition 0's next offset
                raw_msg(6, "p7", provenance=["not", "a", "dict"]),
                raw_msg(7, "p8", code=codes.CONSCIOUSNESS, value=5.0),  # no ACVPU level: NEWS2 would index past U
                msg(8, vitals("p4", T0, 4))]
    out = run(processor, messages, store)
    assert [(m.offset, r.reason) for m, r in out.rejected] == [(n, Reason.INVALID_STRUCTURE) for n in range(8)]
    assert [m.value for m, _ in out.rejected][0] == b"{not json"  # original bytes, untouched
    assert [orjson.loads(v)["patient_id"] for _, v, _ in out.features] == ["p4"]
    assert list(store) == ["p4"]
    assert all(r.to_bytes() for r in store.values())  # the table write of the batch goes through


def test_an_event_the_rules_cannot_take_is_an_internal_error_and_the_batch_goes_on(processor, monkeypatch):
    from streams import patient_agent

    def apply_batch(state, events, **kwargs):
        if events[0].patient_id == "p3":
            raise RuntimeError("a bug in the rules")
        return real_apply_batch(state, events, **kwargs)

    real_apply_batch = patient_agent.apply_batch
    monkeypatch.setattr(patient_agent, "apply_batch", apply_batch)
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, vitals("p3", T0, 3)), msg(1, vitals("p4", T0, 4))], store)
    assert [(m.offset, r.reason) for m, r in out.rejected] == [(0, Reason.INTERNAL_ERROR)]
    assert list(store) == ["p4"]



def test_a_scoring_point_the_alert_cannot_express_dead_letters_its_message_not_the_batch(processor):
    """Vitals at 9999-12-31 20:00 fit the canonical contract (times up to 2**53 ms) but their alert's
    12-hour window ends past what a FHIR dateTime (or Python) can write. That one message is dead-lettered;
    the batch's other patients keep their outputs (the whole batch raised: the worker exited and failed on
    it again at every restart, for every patient of its partitions)."""
    far = int(datetime(9999, 12, 31, 20, tzinfo=timezone.utc).timestamp() * 1000)
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, vitals("p1", T0, 1)), msg(1, vitals("p2", far, 1)), msg(2, vitals("p3", T0, 1))],
              store)
    assert [(m.offset, r.reason) for m, r in out.rejected] == [(1, Reason.INTERNAL_ERROR)]
    assert [orjson.loads(v)["header"]["patient_id"] for _, v, _ in out.alerts] == ["p1", "p3"]
    assert [orjson.loads(v)["patient_id"] for _, v, _ in out.scores] == ["p1", "p3"]
    assert [orjson.loads(v)["patient_id"] for _, v, _ in out.features] == ["p1", "p3"]
    assert store["p1"].alert["open"] and store["p3"].alert["open"]
    assert not store["p2"].alert.get("open")  # no alert state for an alert never published
    assert processor.counters["alerts_open"] == 2 and processor.counters["scores"] == 2

# --- corrections of an open alert ------------------------------------------------------------------

NORMAL = dict(rr=16, spo2=97, flow=0.0, sbp=125, hr=72, acvpu=0, temp=37.0)


def retraction(patient: str, t: int, row: int, code: str, version: int):
    return CanonicalEvent(patient_id=patient, code=code, value=None, unit=None, effective_ms=t, issued_ms=t,
                          status=Status.ENTERED_IN_ERROR, source=Source.CDC,
                          fact_id=f"cdc:vital_signs:{row}:{code}", version=version)


def amendment(patient: str, t: int, row: int, code: str, version: int, value: float):
    return CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                          status=Status.AMENDED, source=Source.CDC, fact_id=f"cdc:vital_signs:{row}:{code}",
                          version=version)


def alerts_of(out):
    return [orjson.loads(v) for _, v, _ in out.alerts]


def test_a_resolution_on_vitals_never_charting_a_news2_parameter_says_so_and_names_it(processor):
    """No respiratory rate in 24 h: the rule path scores the parameters charted (streams/scoring.py), so normal
    rounds resolve the episode, and the resolution must say it ended on an incomplete NEWS2, naming the
    parameter (never a value), not that the risk is back below the alerting line."""
    def without_rr(*args, **kw):
        return [e for e in vitals(*args, **kw) if e.code != codes.RESP_RATE]

    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, without_rr("p1", T0, 1)), msg(1, without_rr("p1", T0 + 15 * MIN, 2, **NORMAL)),
                          msg(2, without_rr("p1", T0 + 30 * MIN, 3, **NORMAL))], store)
    alerts = alerts_of(out)
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in alerts] == [("open", "high"), ("resolve", "none")]
    resource = alerts[-1]["resource"]
    RiskAssessment.model_validate(resource)
    [note] = resource["note"]
    assert "ended on an incomplete NEWS2 (not charted in the last 24 h: respiratory rate)" in note["text"]
    assert "the risk is back below the alerting line, so" not in note["text"]


def test_an_app_routing_on_the_alert_header_tells_a_resolution_on_an_incomplete_news2(processor):
    """The resolution's note said it rested on an incomplete NEWS2, but an app routing on the message's header
    (without parsing the resource) saw the same kind, tier and status as a resolution on complete scores. The
    header's incomplete_news2 names the inputs not charted; [] on the open alert and on a complete resolution."""
    def without_rr(*args, **kw):
        return [e for e in vitals(*args, **kw) if e.code != codes.RESP_RATE]

    incomplete = alerts_of(run(processor, [msg(0, without_rr("p1", T0, 1)),
                                           msg(1, without_rr("p1", T0 + 15 * MIN, 2, **NORMAL)),
                                           msg(2, without_rr("p1", T0 + 30 * MIN, 3, **NORMAL))], {}))
    assert [(a["header"]["kind"], a["header"]["incomplete_news2"]) for a in incomplete] == [
        ("open", []), ("resolve", ["resp_rate_last_24h"])]
    complete = alerts_of(run(processor, [msg(0, vitals("p2", T0, 1)), msg(1, vitals("p2", T0 + 15 * MIN, 2, **NORMAL)),
                                         msg(2, vitals("p2", T0 + 30 * MIN, 3, **NORMAL))], {}))
    assert [(a["header"]["kind"], a["header"]["incomplete_news2"]) for a in complete] == [
        ("open", []), ("resolve", [])]


def test_retracting_the_value_that_raised_the_alert_publishes_entered_in_error(processor):
    store: dict[str, PatientRecord] = {}
    # RR 26 scores 3 and SpO2 93 scores 2: NEWS2 5, medium, on these two values
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store))
    assert opened["header"]["kind"] == "open" and opened["header"]["tier"] == "medium"

    out = run(processor, [msg(1, [retraction("p1", T0, 1, codes.RESP_RATE, 2)])], store)

    [correction] = alerts_of(out)
    assert correction["header"]["kind"] == "correction"
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["id"] == opened["resource"]["id"]
    assert correction["resource"]["status"] == "entered-in-error"
    assert correction["header"]["alert_id"] not in {opened["header"]["alert_id"]}
    # reprocessing the same input after a restart repeats the correction's id exactly
    fresh: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], fresh)
    [again] = alerts_of(run(processor, [msg(1, [retraction("p1", T0, 1, codes.RESP_RATE, 2)])], fresh))
    assert again == correction


def test_a_deleted_vitals_row_is_no_vitals_set_and_the_next_round_is_still_scored(processor):
    # A Debezium delete of a vitals row under REPLICA IDENTITY DEFAULT (PostgreSQL's default): `before` holds only
    # the key, so schemas/cdc.py retracts every column's fact, dated at the delete's commit time. The columns the
    # row charted are corrections; one it left null (here the temperature) is a retraction of a fact never seen,
    # accepted but never live. It is no reading: before, it made a "vitals" point at the commit time, and the next
    # round, minutes after it, fell inside the minimum interval of that point and was never scored (no score, no
    # model risk, the CDS card stale)
    store: dict[str, PatientRecord] = {}
    row1 = [e for e in vitals("p1", T0, 1, **NORMAL) if e.code != codes.TEMPERATURE]
    assert len(run(processor, [msg(0, row1)], store).scores) == 1
    deleted = [retraction("p1", T0 + 30 * MIN, 1, code, 2) for code in (*(e.code for e in row1), codes.TEMPERATURE)]
    out = run(processor, [msg(1, deleted)], store)
    assert [orjson.loads(v)["trigger"] for _, v, _ in out.scores] == ["correction"]
    out = run(processor, [msg(2, vitals("p1", T0 + 32 * MIN, 3, **NORMAL))], store)
    assert [(s["trigger"], s["scoring_ms"]) for s in map(orjson.loads, (v for _, v, _ in out.scores))] == [
        ("vitals", T0 + 32 * MIN)]


def test_a_round_older_than_a_correction_point_at_the_clock_still_opens_its_alert(processor):
    # A correction is re-scored at the patient clock, which a lab collected after the last round has moved on.
    # A vitals round taken before that clock but charted after the correction is a vitals point older than it
    # (schemas/cadence.py): before, the alert policy took it for a replay ("stale") and dropped it, so a NEWS2
    # of 19 opened no alert at all
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    lactate = CanonicalEvent(patient_id="p1", code=codes.LACTATE, value=1.1, unit=None, effective_ms=T0 + 20 * MIN,
                             issued_ms=T0 + 60 * MIN, status=Status.FINAL, source=Source.CDC,
                             fact_id=f"cdc:lab_results:9:{codes.LACTATE}", version=9)
    run(processor, [msg(1, [lactate])], store)
    out = run(processor, [msg(2, [amendment("p1", T0, 1, codes.HEART_RATE, 2, 75.0)])], store)
    assert [orjson.loads(v)["scoring_ms"] for _, v, _ in out.scores] == [T0 + 20 * MIN]  # at the clock
    out = run(processor, [msg(3, vitals("p1", T0 + 15 * MIN, 3))], store)  # NEWS2 19, taken at 10:15
    assert [orjson.loads(v)["scoring_ms"] for _, v, _ in out.scores] == [T0 + 15 * MIN]
    [opened] = alerts_of(out)
    assert (opened["header"]["kind"], opened["header"]["tier"], opened["header"]["scoring_ms"]) == (
        "open", "high", T0 + 15 * MIN)
    # the latest risk stays the newest point's; calm points resolve the episode as usual afterwards
    assert store["p1"].alert["last_scoring_ms"] == T0 + 20 * MIN and store["p1"].alert["open"]


def test_amending_a_basis_value_that_keeps_the_risk_high_publishes_amended(processor):
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1))], store))  # NEWS2 >= 7: high
    assert opened["header"]["tier"] == "high"

    out = run(processor, [msg(1, [amendment("p1", T0, 1, codes.RESP_RATE, 2, 30.0)])], store)

    [correction] = alerts_of(out)
    assert correction["header"]["kind"] == "correction" and correction["resource"]["status"] == "amended"
    assert correction["resource"]["id"] == opened["header"]["alert_id"]
    basis = {b["identifier"]["value"] for b in correction["resource"]["basis"]}
    assert make_event_id(f"cdc:vital_signs:1:{codes.RESP_RATE}", 2) in basis
    assert make_event_id(f"cdc:vital_signs:1:{codes.RESP_RATE}", 1) not in basis
    assert "resp_rate_last_24h=30" in correction["resource"]["prediction"][0]["rationale"]

def test_a_correction_is_judged_at_the_alert_time_not_after_the_patient_improved(processor):
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1))], store))  # NEWS2 19: high
    # an hour later the patient is better (SBP 85 alone: medium), still in the episode: nothing new
    assert run(processor, [msg(1, vitals("p1", T0 + 60 * MIN, 2, **{**NORMAL, "sbp": 85}))], store).alerts == []

    # the alert's temperature is amended 39.5 -> 39.4: the same NEWS2 band, the same risk at T0
    out = run(processor, [msg(2, [amendment("p1", T0, 1, codes.TEMPERATURE, 5, 39.4)])], store)

    # the high alert is amended, not withdrawn as entered-in-error (it was right), and no new episode opens
    [correction] = alerts_of(out)
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "amended")
    assert correction["resource"]["id"] == opened["header"]["alert_id"]
    assert correction["header"]["tier"] == "high" and correction["header"]["scoring_ms"] == T0
    assert correction["resource"]["occurrenceDateTime"] == opened["resource"]["occurrenceDateTime"]
    assert correction["resource"]["prediction"][0]["rationale"].endswith("NEWS2 19")
    basis = {b["identifier"]["value"] for b in correction["resource"]["basis"]}
    assert make_event_id(f"cdc:vital_signs:1:{codes.TEMPERATURE}", 5) in basis
    # the correction's own scoring point, at the patient clock, is published as every point is
    [score] = [orjson.loads(v) for _, v, _ in out.scores]
    assert (score["scoring_ms"], score["tier"]) == (T0 + 60 * MIN, "medium")



def test_an_error_in_the_open_alerts_basis_withdraws_it_under_an_escalation_that_stands(processor):
    """The open alert and its escalation both stand (README, consuming alerts): an amended reading that
    only the open alert rested on must withdraw it, not leave it standing on an error."""
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store))
    assert (opened["header"]["kind"], opened["header"]["tier"]) == ("open", "medium")  # NEWS2 5
    [escalated] = alerts_of(run(processor, [msg(1, vitals("p1", T0 + 60 * MIN, 2))], store))
    assert (escalated["header"]["kind"], escalated["header"]["tier"]) == ("escalate", "high")

    # the first row's RR was 16, not 26: at T0 the patient scored NEWS2 2, no alert
    out = run(processor, [msg(2, [amendment("p1", T0, 1, codes.RESP_RATE, 5, 16.0)])], store)
    [correction, amended] = alerts_of(out)
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["status"] == "entered-in-error"
    assert correction["resource"]["occurrenceDateTime"] == opened["resource"]["occurrenceDateTime"]
    # the escalation's NEWS2 rests on the second row, but its 6 h RR features (max, slope) read the first row's
    # RR too: re-scored at its own time it is still high, so it is amended, and stands with the episode
    assert (amended["header"]["original_alert_id"], amended["resource"]["status"]) == (
        escalated["header"]["alert_id"], "amended")
    assert amended["resource"]["occurrenceDateTime"] == escalated["resource"]["occurrenceDateTime"]
    alert_state = store["p1"].alert
    assert alert_state["open"] and [a["alert_id"] for a in alert_state["alerts"]] == [escalated["header"]["alert_id"]]


def test_the_worker_resolves_an_episode_by_the_calm_rule_its_settings_set(tmp_path):
    """WARDWATCH_ALERT_RESOLVE_AFTER reaches the worker's policy: with 3, two calm rounds (which resolve by
    default, the test below) leave the episode open and the third resolves it."""
    settings = Settings(model_dir=tmp_path / "no-models", allowed_lateness_s=3600, alert_resolve_after=3)
    processor = PatientProcessor(settings, Scorer(settings.model_dir, settings))
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store))
    assert opened["header"]["kind"] == "open"
    calm = run(processor, [msg(1, vitals("p1", T0 + 10 * MIN, 2, **NORMAL)),
                           msg(2, vitals("p1", T0 + 20 * MIN, 3, **NORMAL))], store)
    assert alerts_of(calm) == [] and store["p1"].alert["open"]
    third = run(processor, [msg(3, vitals("p1", T0 + 30 * MIN, 4, **NORMAL))], store)
    assert [a["header"]["kind"] for a in alerts_of(third)] == ["resolve"]


def test_an_error_behind_an_alert_whose_episode_resolved_withdraws_it(processor):
    """The patient recovered and the episode resolved; then the reading the alert rested on is entered
    in error. The alert is history now, but it rested on an error: it is withdrawn (DOMAIN.md: if an
    alert depended on it, publish a correcting alert), once, and the patient's next episode is untouched."""
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store))
    assert (opened["header"]["kind"], opened["header"]["tier"]) == ("open", "medium")
    calm = run(processor, [msg(1, vitals("p1", T0 + 10 * MIN, 2, **NORMAL)),
                           msg(2, vitals("p1", T0 + 20 * MIN, 3, **NORMAL))], store)
    assert [a["header"]["kind"] for a in alerts_of(calm)] == ["resolve"]

    out = run(processor, [msg(3, [retraction("p1", T0, 1, codes.RESP_RATE, 2)])], store)

    [correction] = alerts_of(out)
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "entered-in-error")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["id"] == opened["resource"]["id"]
    assert correction["resource"]["occurrenceDateTime"] == opened["resource"]["occurrenceDateTime"]
    assert correction["resource"]["basis"] == opened["resource"]["basis"]  # the alert as it was published
    assert not store["p1"].alert["open"] and store["p1"].alert["closed"] == []
    # an amendment of the same reading later withdraws nothing more
    assert alerts_of(run(processor, [msg(4, [amendment("p1", T0, 1, codes.RESP_RATE, 3, 27.0)])], store)) == []


def test_an_error_behind_an_alert_of_a_patient_discharged_before_the_next_round_withdraws_it(processor):
    """Alerted, then discharged (to intensive care, say) before any other reading; then the reading the
    alert rested on is entered in error. The patient clock has not moved since the alert, so the
    correction's own point is the alert's time: it was judged nowhere and the alert stood on an error."""
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.ADMISSION, T0 - 60 * MIN, text="inpatient")])], store)
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store))
    assert (opened["header"]["kind"], opened["header"]["tier"]) == ("open", "medium")
    [resolved] = alerts_of(run(processor, [msg(2, [context("p1", codes.DISCHARGE, T0 + 5 * MIN)])], store))
    assert resolved["header"]["reason"] == "discharge"

    out = run(processor, [msg(3, [retraction("p1", T0, 1, codes.RESP_RATE, 2)])], store)

    [correction] = alerts_of(out)
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "entered-in-error")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["occurrenceDateTime"] == opened["resource"]["occurrenceDateTime"]
    assert store["p1"].alert["closed"] == []


def test_correcting_a_value_outside_the_basis_publishes_nothing(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1))], store)
    run(processor, [msg(1, vitals("p1", T0 + 5 * MIN, 2))], store)  # the alert's basis is row 1; row 2 is later
    out = run(processor, [msg(2, [amendment("p1", T0 + 5 * MIN, 2, codes.RESP_RATE, 3, 30.0)])], store)
    assert out.alerts == [] and len(out.scores) == 1



# --- corrections of a reading a window feature read, not the latest (the alert's basis) ------------------


class SlopeScorer:
    """A model whose risk is the heart rate's 6 h trend alone (heart_rate_slope_6h, per hour / 100): an alert
    it raises rests on every heart rate of those 6 h, while its basis names only the latest."""

    def score(self, snapshots):
        return [self._one(features) for features in snapshots]

    @staticmethod
    def _one(features):
        slope = features["heart_rate_slope_6h"]
        p = 0.05 if slope is None else min(0.99, max(0.01, slope / 100))
        tier = "high" if p >= 0.7 else "medium" if p >= 0.5 else "low" if p >= 0.4 else "none"
        rationale = [] if slope is None else [{"feature": "heart_rate_slope_6h", "value": slope, "contribution": 1.0}]
        return ScoreResult(probability=p, path="model", model_version="slope-1", news2=features["news2"], tier=tier,
                           rationale=rationale)


@pytest.fixture
def trend(settings):
    return PatientProcessor(settings, SlopeScorer())


def rising(processor, store):
    """HR 80 at T0, then 120 at T0+30 min (80/h: high, alerted at T0+30 on both), then 160 at T0+60 (still
    high, nothing new). The open alert's basis names the T0+30 heart rate only."""
    assert alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "hr": 80}))], store)) == []
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0 + 30 * MIN, 2, **{**NORMAL, "hr": 120}))], store))
    assert (opened["header"]["kind"], opened["header"]["tier"], opened["header"]["scoring_ms"]) == (
        "open", "high", T0 + 30 * MIN)
    assert make_event_id(f"cdc:vital_signs:1:{codes.HEART_RATE}", 1) not in {
        b["identifier"]["value"] for b in opened["resource"]["basis"]}
    assert alerts_of(run(processor, [msg(2, vitals("p1", T0 + 60 * MIN, 3, **{**NORMAL, "hr": 160}))], store)) == []
    return opened


def test_an_error_in_an_earlier_heart_rate_a_model_alerts_trend_rested_on_withdraws_it(trend):
    """The T0 heart rate is not the alert's latest reading, but its trend feature read it: entered in error, the
    alert at T0+30 had one heart rate and no trend, so no risk. Before, only the basis was matched: the alert
    stood. Judged at the clock (T0+60: 120 -> 160 is still a steep trend) it would have been amended."""
    store: dict[str, PatientRecord] = {}
    opened = rising(trend, store)

    out = run(trend, [msg(3, [retraction("p1", T0, 1, codes.HEART_RATE, 2)])], store)

    [correction, reopened] = alerts_of(out)
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "entered-in-error")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["occurrenceDateTime"] == opened["resource"]["occurrenceDateTime"]
    # the correction's own point, at the clock, is still high: with its only alert withdrawn, a new episode
    # opens there (no suppression window: an error is no recovery)
    [score] = [orjson.loads(v) for _, v, _ in out.scores]
    assert (score["scoring_ms"], score["tier"]) == (T0 + 60 * MIN, "high")
    assert (reopened["header"]["kind"], reopened["header"]["scoring_ms"]) == ("open", T0 + 60 * MIN)
    assert reopened["header"]["alert_id"] != opened["header"]["alert_id"]
    # a restart that replays the input repeats the correction's id
    fresh: dict[str, PatientRecord] = {}
    rising(trend, fresh)
    assert alerts_of(run(trend, [msg(3, [retraction("p1", T0, 1, codes.HEART_RATE, 2)])], fresh)) == [
        correction, reopened]


def test_an_amended_earlier_heart_rate_that_keeps_the_trend_high_amends_the_model_alert(trend):
    store: dict[str, PatientRecord] = {}
    opened = rising(trend, store)
    assert opened["resource"]["prediction"][0]["probabilityDecimal"] == 0.8

    out = run(trend, [msg(3, [amendment("p1", T0, 1, codes.HEART_RATE, 2, 70.0)])], store)

    [correction] = alerts_of(out)  # 70 -> 120 in 30 min: still high, a steeper trend
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "amended")
    assert correction["resource"]["id"] == opened["header"]["alert_id"]
    assert correction["header"]["tier"] == "high" and correction["header"]["scoring_ms"] == T0 + 30 * MIN
    assert correction["resource"]["prediction"][0]["probabilityDecimal"] == 0.99
    assert correction["resource"]["basis"] == opened["resource"]["basis"]  # still the latest readings
    assert store["p1"].alert["open"] and store["p1"].alert["alerts"][0]["probability"] == 0.99


def test_an_amended_earlier_reading_amends_a_news2_alert_whose_tier_still_holds(processor):
    """NEWS2 reads the latest readings only, but the score's window features (HR mean and max) read the
    earlier heart rate too: the alert is re-scored at its time and amended (its NEWS2 tier holds)."""
    store: dict[str, PatientRecord] = {}
    assert alerts_of(run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)) == []
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0 + 30 * MIN, 2))], store))  # NEWS2 19: high
    assert run(processor, [msg(2, vitals("p1", T0 + 60 * MIN, 3, **{**NORMAL, "sbp": 85}))], store).alerts == []

    out = run(processor, [msg(3, [amendment("p1", T0, 1, codes.HEART_RATE, 2, 75.0)])], store)

    [correction] = alerts_of(out)
    assert (correction["header"]["kind"], correction["resource"]["status"]) == ("correction", "amended")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["header"]["tier"] == "high" and correction["header"]["scoring_ms"] == T0 + 30 * MIN
    assert correction["resource"]["basis"] == opened["resource"]["basis"]


def test_a_reading_outside_every_window_of_the_alert_does_not_touch_it(trend):
    """A heart rate from 25 h before the alert (beyond every 24 h window) is corrected: nothing is published.
    A deleted vitals row dated at its commit time (REPLICA IDENTITY DEFAULT, after the alert) is matched at
    the time its readings were taken, and its correction names the readings the alert's features read: not
    the O2 flow (only its latest reading is read, the next row's), nor the old heart rate deleted with it."""
    store: dict[str, PatientRecord] = {}
    old_hr = [e for e in vitals("p1", T0 - 25 * 60 * MIN, 0, hr=70) if e.code == codes.HEART_RATE]
    run(trend, [msg(0, old_hr)], store)
    opened = rising(trend, store)

    out = run(trend, [msg(3, [amendment("p1", T0 - 25 * 60 * MIN, 0, codes.HEART_RATE, 2, 75.0)])], store)
    assert out.alerts == [] and len(out.scores) == 1 and store["p1"].alert["open"]

    commit = T0 + 61 * MIN
    deleted = [retraction("p1", commit, 1, e.code, 2) for e in vitals("p1", T0, 1)]
    out = run(trend, [msg(4, [retraction("p1", commit, 0, codes.HEART_RATE, 3), *deleted])], store)

    correction, *_ = alerts_of(out)  # (then the still steep trend at the clock opens a new episode)
    assert (correction["header"]["original_alert_id"], correction["resource"]["status"]) == (
        opened["header"]["alert_id"], "entered-in-error")
    read = sorted(f"cdc:vital_signs:1:{code}@2" for code in (
        codes.RESP_RATE, codes.SPO2, codes.SYSTOLIC_BP, codes.HEART_RATE, codes.CONSCIOUSNESS, codes.TEMPERATURE))
    assert correction["header"]["alert_id"] == str(uuid.uuid5(
        NAMESPACE, f"{opened['header']['alert_id']}|correction|{','.join(read)}"))


def resnapshot(events, lsn: int):
    """The same rows read again by a Debezium snapshot (op r): identical content, the snapshot's lsn."""
    return [dataclasses.replace(e, version=lsn) for e in events]


def test_a_resnapshot_of_a_basis_row_makes_no_scoring_point_and_no_correction_alert(processor):
    store: dict[str, PatientRecord] = {}
    [opened] = alerts_of(run(processor, [msg(0, vitals("p1", T0, 1))], store))
    assert opened["header"]["kind"] == "open"
    before = dict(processor.counters)

    snapshot = resnapshot(vitals("p1", T0, 1), 9000)
    out = run(processor, [msg(1, snapshot)], store)

    assert out.alerts == [] and out.scores == [] and out.features == []  # no content-free "amended"
    assert processor.counters["duplicate_restatement"] - before.get("duplicate_restatement", 0) == len(snapshot)
    assert processor.counters["corrected"] == before.get("corrected", 0)
    # its redelivery is a plain duplicate, and a real amendment after it still corrects the alert
    out = run(processor, [msg(2, snapshot)], store)
    assert out.scores == [] and processor.counters["duplicate_redelivery"] - before.get("duplicate_redelivery", 0) \
        == len(snapshot)
    [correction] = alerts_of(run(processor, [msg(3, [amendment("p1", T0, 1, codes.RESP_RATE, 9001, 30.0)])], store))
    assert correction["header"]["kind"] == "correction" and correction["resource"]["status"] == "amended"


def test_retracting_a_retracted_basis_value_again_publishes_nothing_more(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93}))], store)
    [withdrawn] = alerts_of(run(processor, [msg(1, [retraction("p1", T0, 1, codes.RESP_RATE, 2)])], store))
    assert withdrawn["resource"]["status"] == "entered-in-error"
    out = run(processor, [msg(2, [retraction("p1", T0, 1, codes.RESP_RATE, 3)])], store)  # e.g. a re-snapshot
    assert out.alerts == [] and out.scores == []
    assert processor.counters["duplicate_restatement"] == 1


def test_a_restated_context_fact_changes_nothing_and_does_not_resolve_again(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.ADMISSION, T0 - 60 * MIN, text="inpatient")])], store)
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0, 1))], store))
    assert opened["header"]["kind"] == "open"
    discharge = context("p1", codes.DISCHARGE, T0 + 60 * MIN, fact="cdc:encounters:1:discharge")
    [resolved] = alerts_of(run(processor, [msg(2, [discharge])], store))
    assert resolved["header"]["kind"] == "resolve"
    before = processor.counters["context_applied"]
    # a re-snapshot re-reads the discharge row: a higher version, the same content
    out = run(processor, [msg(3, [dataclasses.replace(discharge, version=9000)])], store)
    assert out.alerts == []  # not resolved again by a discharge it has already seen
    assert processor.counters["context_applied"] == before and processor.counters["context_unchanged"] == 1


# --- preliminary results: an alert that rests on one says so ---------------------------------------------


def lactate(patient: str, t: int, value: float, status: Status, version: int = 1):
    """A lab result from the FHIR feed: a new Observation version per status change."""
    return CanonicalEvent(patient_id=patient, code=codes.LACTATE, value=value, unit="mmol/L", effective_ms=t,
                          issued_ms=t, status=status, source=Source.FHIR,
                          fact_id=f"fhir:Observation/lac-1:{codes.LACTATE}", version=version)


def test_the_alert_basis_names_only_readings_the_score_could_use(processor):
    """DOMAIN.md: the basis references the score's input Observations. A code no feature reads (diastolic
    BP, platelets) and a reading older than every window of its code (a preliminary lactate 24.5 h
    before: still held in the state, which keeps the lateness bound beyond the 24 h windows) are not
    inputs: they are not in the basis, the alert is not flagged as resting on a preliminary result,
    and an amendment of one publishes no correction of the alert."""
    store: dict[str, PatientRecord] = {}
    old_lactate = lactate("p1", T0 - 24 * 60 * MIN - 30 * MIN, 4.2, Status.PRELIMINARY)
    platelets = CanonicalEvent(patient_id="p1", code=codes.PLATELETS, value=120.0, unit=None,
                               effective_ms=T0 - 30 * MIN, issued_ms=T0 - 30 * MIN, status=Status.FINAL,
                               source=Source.CDC, fact_id=f"cdc:lab_results:7:{codes.PLATELETS}", version=1)
    diastolic = dataclasses.replace(vitals("p1", T0, 1)[0], code=codes.DIASTOLIC_BP, value=60.0,
                                    fact_id=f"cdc:vital_signs:1:{codes.DIASTOLIC_BP}")
    out = run(processor, [msg(0, [old_lactate]), msg(1, [platelets]), msg(2, vitals("p1", T0, 1) + [diastolic])],
              store)
    [opened] = alerts_of(out)
    basis = {b["identifier"]["value"] for b in opened["resource"]["basis"]}
    assert basis == {make_event_id(f"cdc:vital_signs:1:{code}", 1) for code in (
        codes.RESP_RATE, codes.SPO2, codes.O2_FLOW, codes.SYSTOLIC_BP, codes.HEART_RATE, codes.CONSCIOUSNESS,
        codes.TEMPERATURE)}
    assert opened["header"]["preliminary_basis"] == [] and "note" not in opened["resource"]
    assert [orjson.loads(v)["preliminary_basis"] for _, v, _ in out.scores][-1] == []

    amended = dataclasses.replace(platelets, value=90.0, status=Status.AMENDED, version=2)
    out = run(processor, [msg(3, [amended])], store)
    assert len(out.scores) == 1 and alerts_of(out) == []


def test_an_alert_resting_on_a_preliminary_lactate_is_flagged_in_header_resource_and_score(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, [lactate("p1", T0 - 30 * MIN, 4.2, Status.PRELIMINARY)]),
                          msg(1, vitals("p1", T0, 1))], store)
    [opened] = alerts_of(out)
    assert opened["header"]["kind"] == "open" and opened["header"]["preliminary_basis"] == [codes.LACTATE]
    [flagged] = [b for b in opened["resource"]["basis"] if "preliminary" in b.get("display", "")]
    assert flagged["reference"] == "Observation/lac-1/_history/1"
    assert opened["resource"]["note"] == [{"text": "Based on preliminary results, which may change when final: "
                                                   "lactate (LOINC 2524-7)."}]
    assert "4.2" not in opened["resource"]["note"][0]["text"]  # names the parameter, never the value
    [score] = [orjson.loads(v) for _, v, _ in out.scores]
    assert score["preliminary_basis"] == [codes.LACTATE]  # what the CDS card says it from


def test_the_same_alert_on_a_final_lactate_is_not_flagged(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, [lactate("p1", T0 - 30 * MIN, 4.2, Status.FINAL)]),
                          msg(1, vitals("p1", T0, 1))], store)
    [opened] = alerts_of(out)
    assert opened["header"]["preliminary_basis"] == [] and "note" not in opened["resource"]
    assert not any("preliminary" in b.get("display", "") for b in opened["resource"]["basis"])
    assert [orjson.loads(v)["preliminary_basis"] for _, v, _ in out.scores] == [[]]


def test_a_preliminary_basis_result_made_final_with_the_same_value_amends_the_alert_and_clears_the_flag(processor):
    def replay(store):
        opened = alerts_of(run(processor, [msg(0, [lactate("p1", T0 - 30 * MIN, 4.2, Status.PRELIMINARY)]),
                                           msg(1, vitals("p1", T0, 1))], store))
        return opened + alerts_of(run(processor, [msg(2, [lactate("p1", T0 - 30 * MIN, 4.2, Status.FINAL,
                                                                  version=2)])], store))

    store: dict[str, PatientRecord] = {}
    [opened, correction] = replay(store)
    assert opened["header"]["preliminary_basis"] == [codes.LACTATE]
    opened_id = opened["header"]["alert_id"]
    assert (correction["header"]["kind"], correction["header"]["status"]) == ("correction", "amended")
    assert correction["header"]["original_alert_id"] == opened_id and correction["resource"]["id"] == opened_id
    assert correction["header"]["preliminary_basis"] == [] and "note" not in correction["resource"]
    assert {"reference": "Observation/lac-1/_history/2",
            "identifier": {"system": "urn:wardwatch:canonical-event",
                           "value": make_event_id(f"fhir:Observation/lac-1:{codes.LACTATE}", 2)},
            "display": "lactate (LOINC 2524-7), taken 2024-06-10T05:43:20Z, 30 min before this assessment"} \
        in correction["resource"]["basis"]
    assert correction["header"]["tier"] == "high"  # the same value: the same risk
    assert replay({}) == [opened, correction]  # a replay from scratch repeats them, ids included
    # a redelivery of the final version changes nothing more
    assert alerts_of(run(processor, [msg(3, [lactate("p1", T0 - 30 * MIN, 4.2, Status.FINAL, version=2)])],
                         store)) == []


def medium_alert_on_a_preliminary_rr(processor, store: dict) -> tuple[list, dict]:
    """RR 26 (preliminary, CDC) scores 3 and SpO2 93 scores 2: NEWS2 5, a medium alert resting on the
    preliminary RR. Returns the vitals row and the alert."""
    row = vitals("p1", T0, 1, **{**NORMAL, "rr": 26, "spo2": 93})
    row = [dataclasses.replace(e, status=Status.PRELIMINARY) if e.code == codes.RESP_RATE else e for e in row]
    [opened] = alerts_of(run(processor, [msg(0, row)], store))
    assert opened["header"]["tier"] == "medium" and opened["header"]["preliminary_basis"] == [codes.RESP_RATE]
    return row, opened


def test_a_preliminary_vital_made_final_with_another_value_corrects_the_alert_as_any_amendment(processor):
    store: dict[str, PatientRecord] = {}
    row, opened = medium_alert_on_a_preliminary_rr(processor, store)
    final = dataclasses.replace(row[0], value=16.0, status=Status.FINAL, version=2)  # RR 16 scores 0
    assert final.code == codes.RESP_RATE
    [correction] = alerts_of(run(processor, [msg(1, [final])], store))
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["status"] == "entered-in-error"  # the final value no longer supports it


def cdc_lactate(patient: str, t: int, value: float, status: Status, version: int = 1):
    """The same lab result from the CDC feed (a row of the lab results table)."""
    return dataclasses.replace(lactate(patient, t, value, status, version), source=Source.CDC,
                               fact_id=f"cdc:lab_results:7:{codes.LACTATE}")


@pytest.mark.parametrize("preliminary_from", ["cdc", "fhir"])
def test_a_preliminary_basis_result_made_final_only_through_the_other_source_amends_the_alert(processor,
                                                                                              preliminary_from):
    """The preliminary lactate comes through one source, its final version through the other only
    (its cross-source twin): the alert is amended with the flag removed, as for the same source."""
    first, then = (cdc_lactate, lactate) if preliminary_from == "cdc" else (lactate, cdc_lactate)

    def replay(store):
        opened = alerts_of(run(processor, [msg(0, [first("p1", T0 - 30 * MIN, 4.2, Status.PRELIMINARY)]),
                                           msg(1, vitals("p1", T0, 1))], store))
        return opened + alerts_of(run(processor, [msg(2, [then("p1", T0 - 30 * MIN, 4.2, Status.FINAL)])], store))

    store: dict[str, PatientRecord] = {}
    [opened, correction] = replay(store)
    assert opened["header"]["preliminary_basis"] == [codes.LACTATE]
    assert (correction["header"]["kind"], correction["header"]["status"]) == ("correction", "amended")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["header"]["preliminary_basis"] == [] and "note" not in correction["resource"]
    final_id = then("p1", T0 - 30 * MIN, 4.2, Status.FINAL).event_id  # the basis names the final result
    assert final_id in {b["identifier"]["value"] for b in correction["resource"]["basis"]}
    assert not any("preliminary" in b.get("display", "") for b in correction["resource"]["basis"])
    assert correction["header"]["tier"] == "high"
    assert replay({}) == [opened, correction]  # a replay from scratch repeats them, ids included
    # the first source's own final version comes too: nothing more to correct
    assert alerts_of(run(processor, [msg(3, [first("p1", T0 - 30 * MIN, 4.2, Status.FINAL, version=2)])],
                         store)) == []


def test_when_both_sources_sent_the_preliminary_result_apart_in_value_its_final_version_clears_the_flag(processor):
    """Both feeds carried the preliminary lactate, at values too far apart to be one fact; the final
    version comes through the CDC row only. Both preliminary facts leave the basis: the alert is
    amended unflagged, and the FHIR preliminary reading no longer counts."""
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, [cdc_lactate("p1", T0 - 30 * MIN, 4.2, Status.PRELIMINARY),
                                  lactate("p1", T0 - 30 * MIN, 2.4, Status.PRELIMINARY)]),
                          msg(1, vitals("p1", T0, 1))], store)
    [opened] = alerts_of(out)
    assert opened["header"]["preliminary_basis"] == [codes.LACTATE]
    final = cdc_lactate("p1", T0 - 30 * MIN, 4.2, Status.FINAL, version=2)
    [correction] = alerts_of(run(processor, [msg(2, [final])], store))
    assert (correction["header"]["kind"], correction["header"]["status"]) == ("correction", "amended")
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["header"]["preliminary_basis"] == [] and "note" not in correction["resource"]
    basis = {b["identifier"]["value"] for b in correction["resource"]["basis"]}
    assert final.event_id in basis
    assert lactate("p1", T0 - 30 * MIN, 2.4, Status.PRELIMINARY).event_id not in basis
    assert [f[2] for f in store["p1"].state.live(codes.LACTATE)] == [4.2]


def test_a_final_twin_with_another_value_corrects_the_alert_as_any_amendment(processor):
    store: dict[str, PatientRecord] = {}
    row, opened = medium_alert_on_a_preliminary_rr(processor, store)
    # the final RR through FHIR says 16 (scores 0): the alert no longer holds
    final = dataclasses.replace(row[0], value=16.0, status=Status.FINAL, source=Source.FHIR,
                                fact_id=f"fhir:Observation/rr-1:{codes.RESP_RATE}")
    out = run(processor, [msg(1, [final])], store)
    [correction] = alerts_of(out)
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["status"] == "entered-in-error"
    # the re-score counts the final value only (not both), unflagged
    [score] = [orjson.loads(v) for _, v, _ in out.scores]
    assert (score["news2"], score["preliminary_basis"]) == (2, [])


# --- patient context -----------------------------------------------------------------------------------


def context(patient: str, code: str, t: int, *, text=None, encounter="enc-1", fact=None, version=1):
    return CanonicalEvent(patient_id=patient, code=code, value=None, unit=None, effective_ms=t, issued_ms=t,
                          status=Status.FINAL, source=Source.CDC, fact_id=fact or f"cdc:encounters:{code}:{t}",
                          version=version, encounter_id=encounter, code_system=codes.CONTEXT, value_text=text)


def test_context_events_are_not_measurements_and_do_not_score(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, [context("p1", codes.ADMISSION, T0, text="inpatient"),
                                  context("p1", codes.LOCATION, T0, text="Ward 7B")])], store)
    assert out.features == [] and out.scores == [] and out.rejected == []
    rec = store["p1"]
    assert rec.state.clock is None and rec.state.known == {}  # the measurement state never saw them
    assert (rec.current_encounter, processor_ward(rec)) == ("enc-1", "Ward 7B")


def processor_ward(rec):
    from streams.patient_agent import context_view
    return context_view(rec.context).ward


def test_the_alert_header_names_the_current_ward_and_an_older_transfer_does_not_regress_it(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.LOCATION, T0 - 60 * MIN, text="ED"),
                            context("p1", codes.LOCATION, T0 - 10 * MIN, text="Ward 7B")])], store)
    # arriving later but effective earlier: an old transfer, and a redelivery of the current one
    run(processor, [msg(1, [context("p1", codes.LOCATION, T0 - 30 * MIN, text="Ward 2A"),
                            context("p1", codes.LOCATION, T0 - 10 * MIN, text="Ward 7B")])], store)
    [alert] = alerts_of(run(processor, [msg(2, vitals("p1", T0, 1))], store))
    assert alert["header"]["ward"] == "Ward 7B"
    assert "Ward 7B" not in orjson.dumps(alert["resource"]).decode()  # routing only, not in the resource


def test_discharge_resolves_the_open_alert_once(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.ADMISSION, T0 - 60 * MIN, text="inpatient")])], store)
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0, 1))], store))
    discharge = context("p1", codes.DISCHARGE, T0 + 60 * MIN)

    [resolved] = alerts_of(run(processor, [msg(2, [discharge])], store))
    assert resolved["header"]["kind"] == "resolve" and resolved["header"]["reason"] == "discharge"
    assert resolved["header"]["encounter_id"] == "enc-1"
    assert resolved["header"]["alert_id"] != opened["header"]["alert_id"]
    assert alerts_of(run(processor, [msg(3, [discharge])], store)) == []  # redelivered: nothing more


def test_a_patient_is_not_paged_after_discharge_and_is_again_once_readmitted(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.ADMISSION, T0 - 60 * MIN, text="inpatient")]),
                    msg(1, [context("p1", codes.DISCHARGE, T0)])], store)
    # vitals charted late for the stay, then a monitor still sending an hour after the discharge
    out = run(processor, [msg(2, vitals("p1", T0 - 10 * MIN, 1)), msg(3, vitals("p1", T0 + 60 * MIN, 2))], store)
    assert alerts_of(out) == []
    assert [orjson.loads(v)["tier"] for _, v, _ in out.scores] == ["high", "high"]  # still scored (CDS, audit)
    # readmitted: the same vitals page again
    run(processor, [msg(4, [context("p1", codes.ADMISSION, T0 + 2 * 60 * MIN, text="inpatient",
                                    encounter="enc-2")])], store)
    [opened] = alerts_of(run(processor, [msg(5, vitals("p1", T0 + 3 * 60 * MIN, 3))], store))
    assert (opened["header"]["kind"], opened["header"]["encounter_id"]) == ("open", "enc-2")


def test_a_discharge_that_arrives_after_vitals_sent_after_it_resolves_their_alert(processor):
    """The discharge is charted (dated back to 10:00) after a monitor still attached sent a high set at
    10:10: that set, arriving first, pages. The discharge must resolve it; before, being dated before
    the alert, it was taken for an earlier stay's and the alert stood on the old ward's board for good
    (the discharged patient's later points escalate and open nothing)."""
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [context("p1", codes.ADMISSION, T0 - 60 * MIN, text="inpatient")])], store)
    [opened] = alerts_of(run(processor, [msg(1, vitals("p1", T0 + 10 * MIN, 1))], store))
    [resolved] = alerts_of(run(processor, [msg(2, [context("p1", codes.DISCHARGE, T0)])], store))
    assert (resolved["header"]["kind"], resolved["header"]["reason"]) == ("resolve", "discharge")
    RiskAssessment.model_validate(resolved["resource"])
    assert resolved["resource"]["note"][0]["text"].startswith("Resolution, not a new alert")
    # the risk it shows is the 10:10 score: the note must not date it before the 10:00 discharge
    assert "before the discharge" not in resolved["resource"]["note"][0]["text"]
    assert not store["p1"].alert["open"]
    assert alerts_of(run(processor, [msg(3, vitals("p1", T0 + 20 * MIN, 2))], store)) == []  # still discharged


def test_records_written_before_context_existed_still_load():
    old = orjson.dumps({"s": {"format": 1, "clock": T0, "known": {}, "facts": {}},
                        "a": {"episode": 1, "open": True, "alerted_tier": "high", "calm_points": 0,
                              "last_alert_ms": T0, "last_resolve_ms": None, "last_scoring_ms": T0, "tier": "high",
                              "probability": None, "news2": 8, "path": "rule", "model_version": None},
                        "e": "enc-0"})
    rec = PatientRecord.from_bytes(old)
    assert rec.context == {} and rec.current_encounter == "enc-0"
    assert PatientRecord.from_bytes(rec.to_bytes()) == rec


# --- audit trail of score records ---------------------------------------------------------------------


def test_every_score_record_names_its_path_version_snapshot_and_watermark(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(5, vitals("p1", T0, 1), partition=2),
                          msg(6, vitals("p1", T0 + 15 * MIN, 2), partition=2)], store)
    scores = [orjson.loads(v) for _, v, _ in out.scores]
    snapshots = [orjson.loads(v) for _, v, _ in out.features]
    for score, snap in zip(scores, snapshots, strict=True):
        assert score["path"] == "rule" and score["model_version"] is None  # no registry here
        assert score["snapshot_id"] == snap["snapshot_id"]
        assert len(score["features_hash"]) == 32
    last_idx = len(vitals("p1", T0, 1)) - 1  # a vitals row is scored after its last event
    assert [s["input_watermark"] for s in scores] == [
        {"partition": 2, "offset": 5, "idx": last_idx, "event_ms": T0},
        {"partition": 2, "offset": 6, "idx": last_idx, "event_ms": T0 + 15 * MIN}]
    assert scores[0]["features_hash"] != scores[1]["features_hash"]  # different snapshots


# --- shadow model -----------------------------------------------------------------------------------------


def registry_with(tmp_path, versions: dict[str, dict] | None = None):
    """The shipped model copied into a registry, once per version name (card edits per version)."""
    import json
    import shutil
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "wardwatch" / "models" / "v0001"
    root = tmp_path / "models"
    for version, card_changes in (versions or {"v0001": {}}).items():
        shutil.copytree(shipped, root / version)
        card = json.loads((root / version / "card.json").read_text())
        (root / version / "card.json").write_text(json.dumps({**card, "version": version, **card_changes}))
    return root


def test_a_candidate_model_shadow_scores_to_its_own_output_and_never_alerts(tmp_path):
    root = registry_with(tmp_path, {"v0001": {}, "v0002-cand": {}})
    (root / "current").write_text("v0001")
    (root / "candidate").write_text("v0002-cand")
    s = Settings(model_dir=root)
    processor = PatientProcessor(s, Scorer(root, s))
    store: dict[str, PatientRecord] = {}

    out = run(processor, [msg(0, vitals("p1", T0, 1)), msg(1, vitals("p2", T0, 2))], store)

    main = [orjson.loads(v) for _, v, _ in out.scores]
    shadow = [orjson.loads(v) for _, v, _ in out.shadow]
    assert {(r["path"], r["model_version"]) for r in main} == {("model", "v0001")}
    assert {(r["path"], r["model_version"]) for r in shadow} == {("shadow", "v0002-cand")}
    assert [r["snapshot_id"] for r in shadow] == [r["snapshot_id"] for r in main]
    assert {a["header"]["model_version"] for a in alerts_of(out)} <= {"v0001"}  # alerts come from current only


def test_a_shadow_that_breaks_its_contract_is_disabled_and_the_worker_goes_on(tmp_path, caplog):
    root = registry_with(tmp_path, {"v0001": {}, "bad": {"features": ["no_such_feature"]}})
    (root / "current").write_text("v0001")
    (root / "candidate").write_text("bad")
    s = Settings(model_dir=root)
    with caplog.at_level("ERROR", logger="streams.scoring"):
        processor = PatientProcessor(s, Scorer(root, s))
    assert any("shadow model bad refused" in r.getMessage() for r in caplog.records)

    out = run(processor, [msg(0, vitals("p1", T0, 1))], {})
    assert out.shadow == [] and [orjson.loads(v)["path"] for _, v, _ in out.scores] == ["model"]


def test_a_resolution_describes_the_point_that_resolved_it(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1))], store)  # high
    run(processor, [msg(1, vitals("p1", T0 + 5 * MIN, 2, **{**NORMAL, "hr": 95}))], store)  # calm, NEWS2 1
    [resolved] = alerts_of(run(processor, [msg(2, vitals("p1", T0 + 10 * MIN, 3, **NORMAL))], store))  # NEWS2 0
    assert resolved["header"]["kind"] == "resolve" and resolved["header"]["reason"] is None
    assert resolved["resource"]["prediction"][0]["rationale"] == "NEWS2 0"
    assert resolved["header"]["scoring_ms"] == T0 + 10 * MIN


def fhir_round(patient: str, t: int, n: int, *, fio2: float | None = None, rr=22, spo2=95, hr=95):
    """One FHIR observation round without a flow: RR 22 (2), SpO2 95 (1), pulse 95 (1), the rest
    normal: NEWS2 4 on air. `fio2` adds the pulse-ox Observation's FiO2 component (venturi mask)."""
    values = {codes.RESP_RATE: rr, codes.SPO2: spo2, codes.SYSTOLIC_BP: 125, codes.HEART_RATE: hr,
              codes.CONSCIOUSNESS: 0, codes.TEMPERATURE: 37.0, **({codes.FIO2: fio2} if fio2 is not None else {})}
    resource = {codes.FIO2: "spo2"}  # FiO2 is a component of the pulse-ox Observation
    return [CanonicalEvent(patient_id=patient, code=code, value=float(v), unit=None, effective_ms=t, issued_ms=t,
                           status=Status.FINAL, source=Source.FHIR,
                           fact_id=f"fhir:Observation/{resource.get(code, code)}-{n}:{code}", version=1)
            for code, v in values.items()]


def test_oxygen_charted_as_fio2_without_a_flow_scores_news2_and_raises_the_missed_medium_alert(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, fhir_round("p1", T0, 1))], store)  # on air: NEWS2 4, no alert
    [on_air] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    assert (on_air["news2"], on_air["on_oxygen"], alerts_of(out)) == (4, 0, [])

    # the next round on a venturi mask: FiO2 28 % charted with the SpO2, no flow anywhere
    out = run(processor, [msg(1, fhir_round("p1", T0 + 30 * MIN, 2, fio2=28.0))], store)
    [snapshot] = [orjson.loads(v) for _, v, _ in out.features]
    features = snapshot["features"]
    # before, the FiO2 was never read: air, NEWS2 4 and no alert
    assert (features["on_oxygen"], features["news2_air_or_oxygen"], features["news2"]) == (1, 2, 6)
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in alerts_of(out)] == [("open", "medium")]
    assert features["fio2_last_24h"] == 28.0 and features["o2_flow_last_24h"] is None
    [opened] = alerts_of(out)
    basis = {b["identifier"]["value"] for b in opened["resource"]["basis"]}
    assert make_event_id(f"fhir:Observation/spo2-2:{codes.FIO2}", 1) in basis  # the FiO2 it rests on


def test_an_fio2_charted_on_its_own_is_a_new_vitals_set(processor):
    # oxygen started after the round (FiO2 35 % charted alone, 10 min later): a NEWS2 parameter
    # changed, so it is a scoring point like a flow charted alone (schemas/cadence.py VITAL_SIGN_CODES)
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, fhir_round("p1", T0, 1))], store)  # NEWS2 4
    started = CanonicalEvent(patient_id="p1", code=codes.FIO2, value=35.0, unit="%", effective_ms=T0 + 10 * MIN,
                             issued_ms=T0 + 10 * MIN, status=Status.FINAL, source=Source.FHIR,
                             fact_id=f"fhir:Observation/fio2-1:{codes.FIO2}", version=1)
    out = run(processor, [msg(1, [started])], store)
    [snapshot] = [orjson.loads(v) for _, v, _ in out.features]
    assert (snapshot["trigger"], snapshot["scoring_ms"], snapshot["features"]["news2"]) == ("vitals", T0 + 10 * MIN, 6)
    assert [a["header"]["tier"] for a in alerts_of(out)] == ["medium"]


# --- consciousness charted as a Glasgow Coma Scale total (FHIR 9269-2) ---------------------------------


def gcs(patient: str, t: int, total: int, obs_id: str) -> list[CanonicalEvent]:
    """The canonical events the FHIR parser makes of a GCS total charted at t (ms)."""
    effective = datetime.fromtimestamp(t / 1000, timezone.utc).isoformat()
    outcome = parse_notification(gcs_bundle(patient, effective, {"valueInteger": total}, obs_id=obs_id),
                                 topic="ww.fhir.notifications", partition=0, offset=0)
    return outcome.events if isinstance(outcome, Parsed) else []  # before 9269-2 was read: Ignored, no event


def six_normal(patient: str, t: int, n: int) -> list[CanonicalEvent]:
    """A FHIR round charting every NEWS2 input but consciousness, each scoring 0 (air: no flow, no FiO2)."""
    return [e for e in fhir_round(patient, t, n, rr=16, spo2=97, hr=72) if e.code != codes.CONSCIOUSNESS]


def test_a_gcs_of_3_scores_consciousness_3_and_the_model_scores_the_point(tmp_path):
    root = registry_with(tmp_path)
    (root / "current").write_text("v0001")
    s = Settings(model_dir=root, allowed_lateness_s=3600)
    processor = PatientProcessor(s, Scorer(root, s))
    store: dict[str, PatientRecord] = {}

    out = run(processor, [msg(0, six_normal("p1", T0, 1) + gcs("p1", T0, 3, "gcs-1"))], store)

    [snapshot] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    # GCS 3 is U: NEWS2 consciousness 3. Before, 9269-2 was skipped: no consciousness, no NEWS2, and the
    # point fell to the rule path with nothing charted scoring (tier none for an unresponsive patient)
    assert (snapshot["consciousness_last_24h"], snapshot["news2_consciousness"], snapshot["news2"]) == (4, 3, 3)
    [score] = [orjson.loads(v) for _, v, _ in out.scores]
    assert score["missing"] == [] and score["model_version"] == "v0001" and score["probability"] is not None
    # a single parameter scoring 3 is its own NEWS2 trigger, whatever the model says
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in alerts_of(out)] == [("open", "medium")]


def test_a_gcs_of_15_is_alert_and_scores_0(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, six_normal("p1", T0, 1) + gcs("p1", T0, 15, "gcs-1"))], store)
    [snapshot] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    assert (snapshot["consciousness_last_24h"], snapshot["news2_consciousness"], snapshot["news2"]) == (0, 0, 0)
    assert alerts_of(out) == []


def test_the_most_recent_consciousness_observation_wins_whichever_scale_it_is_on(processor):
    store: dict[str, PatientRecord] = {}

    def consciousness(out) -> list[tuple[float, int]]:
        return [(f["consciousness_last_24h"], f["news2_consciousness"])
                for f in (orjson.loads(v)["features"] for _, v, _ in out.features)]

    def worst_of_24h(out) -> list[float]:
        return [orjson.loads(v)["features"]["consciousness_max_24h"] for _, v, _ in out.features]

    # ACVPU A (a CDC row), then a GCS of 7 half an hour later: P, 3 points, a medium alert
    assert consciousness(run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)) == [(0, 0)]
    out = run(processor, [msg(1, six_normal("p1", T0 + 30 * MIN, 2) + gcs("p1", T0 + 30 * MIN, 7, "gcs-2"))], store)
    assert consciousness(out) == [(3, 3)]
    assert [a["header"]["tier"] for a in alerts_of(out)] == ["medium"]
    # charted alert on ACVPU at 60 min: A again
    assert consciousness(run(processor, [msg(2, vitals("p1", T0 + 60 * MIN, 3, **NORMAL))], store)) == [(0, 0)]
    # a GCS of 3 charted at 45 min arrives after it: older by event time, so the next round (without a
    # consciousness observation) still reads the A of 60 min, not the U that arrived last
    late_u = gcs("p1", T0 + 45 * MIN, 3, "gcs-3")
    assert [(e.code, e.value) for e in late_u] == [(codes.CONSCIOUSNESS, 4.0)]  # the parser made the U
    run(processor, [msg(3, late_u)], store)
    out = run(processor, [msg(4, six_normal("p1", T0 + 90 * MIN, 4))], store)
    assert consciousness(out) == [(0, 0)]
    # the late U is in the patient's state (the worst of 24 h), only not the latest: without this, a GCS
    # never parsed or a late event dropped would pass the check above as well
    assert worst_of_24h(out) == [4.0]


def test_a_cdc_row_on_oxygen_with_the_flow_not_charted_scores_oxygen_and_opens_the_medium_alert(processor):
    # on_supplemental_oxygen true, oxygen_flow_rate_lpm NULL: the row gave no oxygen fact, so NEWS2 scored
    # the patient as on air. RR 21 (2) + SpO2 95 (1) + oxygen (2) = 5: medium, an urgent review (RCP 2017);
    # scored on air it was 3, low, and no alert.
    from schemas.cdc import parse_cdc
    from tests.fixtures.ingest.corpus import CDC_PREFIX, cdc_message
    raw = cdc_message("create_bare")
    doc = orjson.loads(raw.value)
    doc["after"].update(respiratory_rate=21, oxygen_flow_rate_lpm=None, on_supplemental_oxygen=True)
    outcome = parse_cdc(raw.topic, raw.key, orjson.dumps(doc), partition=0, offset=0, cdc_topic_prefix=CDC_PREFIX)
    assert isinstance(outcome, Parsed)
    out = run(processor, [msg(0, outcome.events)], {})
    [snapshot] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    assert snapshot["o2_flow_last_24h"] is None  # no flow value invented
    assert (snapshot["on_oxygen"], snapshot["news2_air_or_oxygen"], snapshot["news2"]) == (1, 2, 5)
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in alerts_of(out)] == [("open", "medium")]


# --- how old the readings an alert rests on are (schemas.alert: basis display, stale readings) ---------

HOUR = 60 * MIN
# NEWS2 inputs at 0 points; a row leaves out the ones not charted in that round
CALM = {codes.RESP_RATE: 16, codes.SPO2: 97, codes.O2_FLOW: 0.0, codes.SYSTOLIC_BP: 125, codes.HEART_RATE: 75,
        codes.CONSCIOUSNESS: 0, codes.TEMPERATURE: 37.0}


def round_of(patient: str, t: int, row: int, **values: float):
    """One vitals round charting only `values` (by CALM's code names below)."""
    names = {"rr": codes.RESP_RATE, "spo2": codes.SPO2, "flow": codes.O2_FLOW, "sbp": codes.SYSTOLIC_BP,
             "hr": codes.HEART_RATE, "acvpu": codes.CONSCIOUSNESS, "temp": codes.TEMPERATURE}
    return [CanonicalEvent(patient_id=patient, code=names[n], value=float(v), unit=None, effective_ms=t, issued_ms=t,
                           status=Status.FINAL, source=Source.CDC, fact_id=f"cdc:vital_signs:{row}:{names[n]}",
                           version=1) for n, v in values.items()]


def sbp_85_never_rechecked(processor, store: dict) -> tuple[dict, dict, dict]:
    """Row 1 at T0: SBP 85 (3 points) and 38.5 degC (1 point), the rest calm: a medium alert on fresh readings.
    Row 2, 14 h 44 min later, rechecks all but SBP and temperature: RR 25 (3), SpO2 93 (2) on top of the old
    SBP (3) and temperature (1) make NEWS2 9, an escalation resting on an SBP nobody took again. Returns
    both alerts and the escalating point's score record."""
    [opened] = alerts_of(run(processor, [msg(0, round_of("p1", T0, 1, rr=16, spo2=97, flow=0, sbp=85, hr=75, acvpu=0,
                                                         temp=38.5))], store))
    out = run(processor, [msg(1, round_of("p1", T0 + 14 * HOUR + 44 * MIN, 2, rr=25, spo2=93, flow=0, hr=75,
                                          acvpu=0))], store)
    [escalated], [score] = alerts_of(out), [orjson.loads(v) for _, v, _ in out.scores]
    return opened, escalated, score


STALE_SBP = "systolic BP 85 mmHg taken 14 h 44 min before this assessment, not rechecked"
STALE_TEMP = "temperature 38.5 °C taken 14 h 44 min before this assessment, not rechecked"


def test_an_escalation_resting_on_an_old_sbp_says_when_it_was_taken_and_that_it_was_not_rechecked(processor):
    store: dict[str, PatientRecord] = {}
    opened, escalated, score = sbp_85_never_rechecked(processor, store)
    assert (opened["header"]["kind"], opened["header"]["tier"]) == ("open", "medium")
    assert "not rechecked" not in opened["resource"]["prediction"][0]["rationale"]  # fresh readings: nothing said
    assert (escalated["header"]["kind"], escalated["header"]["tier"]) == ("escalate", "high")
    resource = escalated["resource"]
    RiskAssessment.model_validate(resource)
    rationale = resource["prediction"][0]["rationale"]
    # the top 3 are SBP, RR, SpO2: the temperature's 1 point is not among them, but rests on an old reading too
    assert rationale.endswith(f"NEWS2 9; {STALE_SBP}; {STALE_TEMP}"), rationale
    assert "respiratory rate" not in rationale  # rechecked: nothing to say
    displays = {b["identifier"]["value"]: b["display"] for b in resource["basis"]}
    assert displays[make_event_id(f"cdc:vital_signs:1:{codes.SYSTOLIC_BP}", 1)] == (
        "EHR vital_signs row 1, LOINC 8480-6 (systolic BP), taken 2024-06-10T06:13:20Z, "
        "14 h 44 min before this assessment")
    assert displays[make_event_id(f"cdc:vital_signs:2:{codes.RESP_RATE}", 1)] == (
        "EHR vital_signs row 2, LOINC 9279-1 (respiratory rate), taken 2024-06-10T20:57:20Z, "
        "less than 1 min before this assessment")
    # the CDS card of that score says it too, in its summary and detail
    from streams.cds import card
    shown = card(score)
    assert shown["summary"] == "Deterioration risk HIGH (NEWS2 9); readings over 4 h old"
    assert (f"- {STALE_SBP}".replace("this assessment", "this score")) in shown["detail"].splitlines()


def test_an_amendment_of_the_old_sbp_says_its_age_in_the_amended_alerts(processor):
    store: dict[str, PatientRecord] = {}
    opened, escalated, _ = sbp_85_never_rechecked(processor, store)
    corrections = alerts_of(run(processor, [msg(2, [amendment("p1", T0, 1, codes.SYSTOLIC_BP, 2, 80.0)])], store))
    assert [(c["header"]["status"], c["header"]["original_alert_id"]) for c in corrections] == [
        ("amended", opened["header"]["alert_id"]), ("amended", escalated["header"]["alert_id"])]
    for c in corrections:
        RiskAssessment.model_validate(c["resource"])
        assert c["resource"]["prediction"][0]["rationale"].endswith(
            f"NEWS2 9; {STALE_SBP.replace('85', '80')}; {STALE_TEMP}")
        sbp = next(b for b in c["resource"]["basis"] if f"LOINC {codes.SYSTOLIC_BP}" in b["display"])
        assert sbp["display"].endswith("taken 2024-06-10T06:13:20Z, 14 h 44 min before this assessment")


def test_a_resolution_on_an_old_reading_does_not_read_as_a_fresh_calm_round(processor):
    store: dict[str, PatientRecord] = {}
    sbp_85_never_rechecked(processor, store)
    # two calm rounds recheck everything but the temperature: 38.5 degC from row 1 still scores its 1 point
    calm = dict(rr=16, spo2=97, flow=0, sbp=125, hr=75, acvpu=0)
    run(processor, [msg(2, round_of("p1", T0 + 15 * HOUR, 3, **calm))], store)
    [resolved] = alerts_of(run(processor, [msg(3, round_of("p1", T0 + 15 * HOUR + 30 * MIN, 4, **calm))], store))
    assert resolved["header"]["kind"] == "resolve"
    RiskAssessment.model_validate(resolved["resource"])
    assert resolved["resource"]["prediction"][0]["rationale"] == (
        "NEWS2 1; temperature 38.5 °C taken 15 h 30 min before this assessment, not rechecked")


def test_a_resolution_says_which_calm_readings_are_old_even_those_scoring_0(processor):
    """The calm rounds recheck everything but the level of consciousness: its A scores 0 points, but the
    resolution's "back below the alerting line" rests on it as much as on the rest, and it is over 4 h old.
    Only readings scoring points were named, so the resolution read as a fully rechecked calm patient."""
    store: dict[str, PatientRecord] = {}
    sbp_85_never_rechecked(processor, store)  # consciousness A last charted at T0 + 14 h 44 min
    calm = dict(rr=16, spo2=97, flow=0, sbp=125, hr=75, temp=37.0)  # no consciousness charted
    run(processor, [msg(2, round_of("p1", T0 + 19 * HOUR, 3, **calm))], store)
    [resolved] = alerts_of(run(processor, [msg(3, round_of("p1", T0 + 19 * HOUR + 30 * MIN, 4, **calm))], store))
    assert resolved["header"]["kind"] == "resolve"
    RiskAssessment.model_validate(resolved["resource"])
    assert resolved["resource"]["prediction"][0]["rationale"] == (
        "NEWS2 0; level of consciousness A taken 4 h 46 min before this assessment, not rechecked")


def test_a_resolution_by_discharge_says_the_last_score_rested_on_old_readings(processor):
    store: dict[str, PatientRecord] = {}
    sbp_85_never_rechecked(processor, store)
    [resolved] = alerts_of(run(processor, [msg(2, [context("p1", codes.DISCHARGE, T0 + 15 * HOUR)])], store))
    assert (resolved["header"]["kind"], resolved["header"]["reason"]) == ("resolve", "discharge")
    RiskAssessment.model_validate(resolved["resource"])
    # said at the resource's time (the discharge), 16 min after the last score; NEWS2 is the last score's
    assert resolved["resource"]["prediction"][0]["rationale"] == (
        "NEWS2 9; systolic BP 85 mmHg taken 15 h before this assessment, not rechecked; "
        "temperature 38.5 °C taken 15 h before this assessment, not rechecked")


# --- a FHIR version carrying no mapped code replaces its resource's earlier facts (rule 6) ---------------


def fhir_heart_rate(patient: str, t: int, version: str, **changes) -> list[CanonicalEvent]:
    """The canonical events the FHIR parser makes of Observation/vs-hr-1 (fixture r4_parameters_event: a heart
    rate) charted at t (ms) for `patient`, as version `version`, with `changes` (a key set to None is removed)."""
    doc = orjson.loads(fhir_bundle("r4_parameters_event"))
    obs = doc["entry"][1]["resource"]
    at = datetime.fromtimestamp(t / 1000, timezone.utc).isoformat()
    obs.update(effectiveDateTime=at, issued=at, meta={"versionId": version, "lastUpdated": at})
    obs["subject"]["identifier"]["value"] = patient
    obs.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del obs[key]
    outcome = parse_notification(orjson.dumps(doc), topic="ww.fhir.notifications", partition=0, offset=0)
    return outcome.events if isinstance(outcome, Parsed) else []  # before the version marker: Ignored, no event


@pytest.mark.parametrize("v2", [
    {"code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}},  # recoded to an unmapped code
    {"status": "amended", "valueQuantity": None,  # the value withdrawn: "absent: error"
     "dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                      "code": "error"}]}},
], ids=["recoded", "value_absent"])
def test_an_alert_resting_on_a_heart_rate_its_next_version_withdraws_is_withdrawn(processor, v2):
    """HR 140 (NEWS2 3 on its own: a medium alert), then its Observation's version 2 re-codes it to a code
    wardwatch does not map, or amends it to "value absent: error". Version 2 gave no event: the 140 stayed live,
    and the alert (and every later score) kept resting on a reading the EHR had withdrawn."""
    store: dict[str, PatientRecord] = {}
    others = [e for e in vitals("p1", T0, 1, **NORMAL) if e.code != codes.HEART_RATE]
    [hr] = fhir_heart_rate("p1", T0, "1", valueQuantity={"value": 140, "unit": "/min",
                                                         "system": "http://unitsofmeasure.org", "code": "/min"})
    [opened] = alerts_of(run(processor, [msg(0, [*others, hr])], store))
    assert (opened["header"]["kind"], opened["header"]["tier"]) == ("open", "medium")

    [marker] = fhir_heart_rate("p1", T0, "2", **v2)
    out = run(processor, [msg(1, [marker])], store)
    [snapshot] = [orjson.loads(v) for _, v, _ in out.features]
    assert snapshot["trigger"] == "correction" and snapshot["features"]["heart_rate_last_24h"] is None
    assert snapshot["features"]["news2"] is None  # no heart rate left to score: NEWS2 incomplete
    [correction] = alerts_of(out)
    assert correction["header"]["kind"] == "correction"
    assert correction["header"]["original_alert_id"] == opened["header"]["alert_id"]
    assert correction["resource"]["status"] == "entered-in-error"  # withdrawn: nothing else supports it
    assert processor.counters["replaced"] == 1 and store["p1"].state.facts.get(codes.HEART_RATE, []) == []
    # the marker redelivered, or version 1 again: nothing more
    again = run(processor, [msg(2, [marker]), msg(3, [hr])], store)
    assert again.features == [] and again.alerts == []


def test_a_point_dead_lettered_by_the_alert_policy_publishes_no_shadow_score_either(tmp_path):
    """The message whose point the alert cannot express is dead-lettered with its features and score dropped:
    its shadow score went out all the same, a candidate's score for a point the served model never scored."""
    from datetime import datetime, timezone
    root = registry_with(tmp_path, {"v0001": {}, "v0002-cand": {}})
    (root / "current").write_text("v0001")
    (root / "candidate").write_text("v0002-cand")
    s = Settings(model_dir=root)
    processor = PatientProcessor(s, Scorer(root, s))
    far = int(datetime(9999, 12, 31, 20, tzinfo=timezone.utc).timestamp() * 1000)

    out = run(processor, [msg(0, vitals("p1", T0, 1)), msg(1, vitals("p2", far, 1)), msg(2, vitals("p3", T0, 1))], {})

    assert [(m.offset, r.reason) for m, r in out.rejected] == [(1, Reason.INTERNAL_ERROR)]
    assert [orjson.loads(v)["patient_id"] for _, v, _ in out.shadow] == ["p1", "p3"]
    assert processor.counters["shadow_scores"] == 2

