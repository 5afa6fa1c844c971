"""The per-patient step without Kafka: dead-lettering, scoring points, late output, alerts, and
idempotence when a batch is reprocessed after a restart."""

from __future__ import annotations

import orjson
import pytest

from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, encode_batch, make_event_id
from schemas.deadletter import Reason
from streams.patient_agent import CanonicalMessage, PatientProcessor, PatientRecord
from streams.scoring import Scorer
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
    basis = {b["reference"] for b in alerts[0]["resource"]["basis"]}
    assert f"Observation/{make_event_id(f'cdc:vital_signs:1:{codes.HEART_RATE}', 1)}" in basis


def test_reprocessing_after_a_restart_adds_no_point_and_no_alert(processor):
    store: dict[str, PatientRecord] = {}
    batch = [msg(0, vitals("p1", T0, 1))]
    run(processor, batch, store)
    persisted = {p: PatientRecord.from_bytes(r.to_bytes()) for p, r in store.items()}  # the table round trip
    again = run(processor, batch, persisted)
    assert again.features == [] and again.alerts == []  # every event is a redelivery


def test_late_events_are_output_with_late_by_and_not_scored(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0 + 3 * 3600_000, 1))], store)
    out = run(processor, [msg(1, vitals("p1", T0, 2))], store)  # 2 h beyond the 1 h bound
    late = [orjson.loads(v) for _, v, _ in out.late]
    assert len(late) == 7 and {r["late_by_ms"] for r in late} == {2 * 3600_000}
    assert out.features == []


def test_bad_messages_are_rejected_and_the_rest_of_the_batch_goes_on(processor):
    store: dict[str, PatientRecord] = {}
    two_patients = vitals("p1", T0, 1)[:1] + vitals("p2", T0, 2)[:1]
    not_a_number = [CanonicalEvent.from_dict({**vitals("p3", T0, 3)[0].to_dict(), "value": "high"})]
    messages = [CanonicalMessage(0, 0, b"{not json", key=b"p9"), msg(1, two_patients), msg(2, not_a_number),
                msg(3, vitals("p4", T0, 4))]
    out = run(processor, messages, store)
    reasons = [(m.offset, r.reason) for m, r in out.rejected]
    assert reasons == [(0, Reason.INVALID_STRUCTURE), (1, Reason.INVALID_STRUCTURE), (2, Reason.INTERNAL_ERROR)]
    assert [m.value for m, _ in out.rejected][0] == b"{not json"  # original bytes, untouched
    assert [orjson.loads(v)["patient_id"] for _, v, _ in out.features] == ["p4"]
    assert "p3" not in store
