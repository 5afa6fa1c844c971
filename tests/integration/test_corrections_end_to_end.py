"""Today's correction rules through the real services on the real broker: raw Debezium messages ->
`wardwatch ingest` -> `wardwatch worker` -> the alerts topic, read as a clinician's app reads it.

One patient, on the NEWS2 rule path (no model), in phases, each waited on until the worker committed it:
1. a preliminary lactate, then a vitals row with NEWS2 >= 7: an "open" high alert flagged as resting on
   a preliminary result; the lactate row updated to final with the same value: a correction (amended,
   same RiskAssessment id) with the flag cleared.
2. a Debezium re-snapshot (op r, higher lsn) of both rows with identical content: no alert record of
   any kind; the worker's duplicate_restatement counter moves by the snapshot's events.
3. the lab row deleted (op d + tombstone): the alert's basis fact is retracted; the vitals still give
   high, so streams.alerting.correct() amends the alert (same id, the lactate gone from its basis).
"""

from __future__ import annotations

import json
import time
from decimal import Decimal

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from schemas import codes
from schemas.ingest_outcome import Parsed
from streams.replay import CommitInfo, RawMessage, VitalRow, debezium_key, debezium_value, encode_decimal, row_payload
from streams.stats import read_stats, summarize
from tests.fixtures.ingest.corpus import HERE as FIXTURES
from tests.integration.pipeline import Pipeline, parse_offline, publish_messages

DEADLINE_S = 60
PATIENT, ENCOUNTER = "MRN-E2E-0001", "ENC-E2E-0001"
VITALS_ROW, LAB_ROW = 9001, 7001
T_VITALS_MS = 1_718_460_000_000  # 2024-06-15 14:00 UTC
T_LAB_MS = T_VITALS_MS - 20 * 60_000  # collected 20 min before the vitals: the latest lactate at the point
LACTATE = "4.2"
# NEWS2 well above 7 (RR 27: 3, SpO2 90: 3, on O2: 2, SBP 88: 3, HR 135: 3, V: 3, 39.5: 2): the rule gives high
SICK = {"heart_rate": 135, "respiratory_rate": 27, "spo2": Decimal("90.0"), "oxygen_flow_rate_lpm": Decimal("2.0"),
        "on_supplemental_oxygen": True, "systolic_bp": 88, "diastolic_bp": 55, "temperature": Decimal("39.5"),
        "consciousness_level": "V"}


def _commit(lsn: int, at_ms: int) -> CommitInfo:
    return CommitInfo(lsn=lsn, last_commit_lsn=lsn - 400, tx_id=lsn // 1000, commit_us=at_ms * 1000,
                      emitted_ms=at_ms + 12)


def _as_snapshot(value: bytes) -> bytes:
    """A Debezium snapshot read (op r): snapshot flag set, no commit lsn in the sequence."""
    doc = orjson.loads(value)
    doc["payload"]["op"] = "r"
    source = doc["payload"]["source"]
    source.update(snapshot="true", sequence=json.dumps([None, str(source["lsn"])]))
    return orjson.dumps(doc)


def vitals(op: str, lsn: int, at_ms: int) -> RawMessage:
    row = row_payload(VITALS_ROW, VitalRow(PATIENT, ENCOUNTER, T_VITALS_MS * 1000, SICK))
    value = debezium_value("c" if op == "r" else op, None, row, _commit(lsn, at_ms), "vital_signs")
    if op == "r":
        value = _as_snapshot(value)
    return RawMessage("cdc", "vital_signs", debezium_key(VITALS_ROW, PATIENT), value)


def lab_row(status: str) -> dict:
    return {"id": LAB_ROW, "patient_id": PATIENT, "encounter_id": ENCOUNTER, "loinc_code": codes.LACTATE,
            "value": encode_decimal(Decimal(LACTATE), 4), "unit": "mmol/L", "status": status,
            "collected_at": T_LAB_MS * 1000, "resulted_at": (T_LAB_MS + 10 * 60_000) * 1000}


def _lab_fixture() -> dict:
    return json.loads((FIXTURES / "cdc" / "lab_create_schema_wrapped.json").read_text())["messages"][0]


def _lab_key() -> bytes:
    """Keyed by patient, as Debezium is configured (message.key.columns)."""
    return orjson.dumps({**_lab_fixture()["key"], "payload": {"patient_id": PATIENT}})


def lab(op: str, before: dict | None, after: dict | None, lsn: int, at_ms: int) -> RawMessage:
    """A lab_results change event in the schema-wrapped shape of the ingest fixtures."""
    fixture = _lab_fixture()
    source = {**fixture["value"]["payload"]["source"], "ts_ms": at_ms, "ts_us": at_ms * 1000,
              "ts_ns": at_ms * 1_000_000, "lsn": lsn, "txId": lsn // 1000,
              "sequence": json.dumps([str(lsn - 400), str(lsn)]), "snapshot": "false"}
    if op == "r":
        source.update(snapshot="true", sequence=json.dumps([None, str(lsn)]))
    payload = {"before": before, "after": after, "source": source, "op": op, "ts_ms": at_ms + 12}
    value = {"schema": fixture["value"]["schema"], "payload": payload}
    return RawMessage("cdc", "lab_results", _lab_key(), orjson.dumps(value))


def tombstone() -> RawMessage:
    return RawMessage("cdc", "lab_results", _lab_key(), None)


class AlertsReader:
    """The alerts topic from its beginning, as a downstream app reads it."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.topic = pipe.topics.alerts
        self.position: dict[int, int] = {}
        self.consumer = Consumer({**pipe.settings.kafka_client_config(), "enable.auto.commit": False,
                                  "group.id": f"{pipe.settings.group_prefix}-app", "fetch.wait.max.ms": 10})
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(pipe.topics.partitions)])

    def new(self, deadline: float) -> list[dict]:
        """The alerts written since the last call: up to where the pipeline's archiver read the topic
        (Pipeline.wait_processed returns once the worker committed its input and the archiver its outputs)."""
        ends = {p: n for (t, p), n in self.pipe.archiver.seen_offsets.items() if t == self.topic}
        out = []
        while any(self.position.get(p, 0) < n for p, n in ends.items()):
            assert time.monotonic() < deadline, f"alerts topic not read to {ends}"
            for msg in self.consumer.consume(100, timeout=0.2):
                if msg.error() is None:
                    self.position[msg.partition()] = msg.offset() + 1
                    out.append(orjson.loads(msg.value()))
        return out

    def close(self) -> None:
        self.consumer.close()


def worker_counters(pipe: Pipeline) -> dict:
    """The worker's published counters, as `wardwatch stats` sums them. A short quiet time (read past the
    watermarks for 0.05 s, not read_stats' 0.3 s): each call is one poll of wait_for_counter, and a read
    that stops short only returns older counters, which the caller's condition waits out."""
    latest = read_stats(pipe.settings, pipe.topics, timeout_s=10, quiet_s=0.05)
    services = summarize(latest)["services"]
    return services.get("worker", {}).get("counters", {})


def wait_for_counter(pipe: Pipeline, name: str, at_least: int, deadline: float) -> dict:
    """The worker's published counters once `name` reached `at_least` (it publishes every stats_interval_s)."""
    while True:
        counters = worker_counters(pipe)
        if counters.get(name, 0) >= at_least:
            return counters
        assert time.monotonic() < deadline, f"worker {name} = {counters.get(name, 0)}, waited for {at_least}"
        pipe.poll()


def events_in(messages: list[RawMessage], pipe: Pipeline) -> int:
    return sum(len(o.events) for m in messages
               if isinstance(o := parse_offline(m, pipe.topics, pipe.settings), Parsed))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_preliminary_final_resnapshot_and_delete_reach_the_app_as_the_correction_rules_say(settings, tmp_path):
    settings = settings.model_copy(update={"stats_interval_s": 0.5})
    with Pipeline(settings, tmp_path / "logs") as pipe:
        app = AlertsReader(pipe)
        deadline = time.monotonic() + DEADLINE_S * 2

        def feed(*messages: RawMessage) -> list[dict]:
            published = publish_messages(settings, pipe.topics, list(messages))
            pipe.wait_processed(published["end_offsets"], deadline)
            return app.new(deadline)

        try:
            # 1. preliminary lactate, then deteriorating vitals: an open high alert flagged preliminary
            assert feed(lab("c", None, lab_row("preliminary"), 30_000_000, T_LAB_MS + 10 * 60_000)) == []
            (opened,) = feed(vitals("c", 30_100_000, T_VITALS_MS + 60_000))
            header, resource = opened["header"], opened["resource"]
            assert (header["kind"], header["tier"], header["status"]) == ("open", "high", "final")
            assert header["path"] == "rule"  # no model: the NEWS2 rule decides
            assert header["preliminary_basis"] == [codes.LACTATE]
            lab_basis = [b for b in resource["basis"] if f"row {LAB_ROW}," in b.get("display", "")]
            # ... and when it was collected: the display a nurse reads, through the broker
            assert [b["display"] for b in lab_basis] == [f"EHR lab_results row {LAB_ROW}, LOINC {codes.LACTATE} "
                                                         "(lactate, preliminary result), taken 2024-06-15T13:40:00Z, "
                                                         "20 min before this assessment"]
            assert "preliminary" in resource["note"][0]["text"]

            # ... the lactate made final with the same value: the alert amended, the flag cleared
            (final,) = feed(lab("u", lab_row("preliminary"), lab_row("final"), 30_200_000, T_VITALS_MS + 5 * 60_000))
            assert (final["header"]["kind"], final["header"]["status"]) == ("correction", "amended")
            assert final["header"]["original_alert_id"] == header["alert_id"]
            assert final["resource"]["id"] == resource["id"] == header["alert_id"]
            assert final["resource"]["status"] == "amended"
            assert final["header"]["preliminary_basis"] == []
            assert "note" not in final["resource"]
            assert not any("preliminary" in b.get("display", "") for b in final["resource"]["basis"])
            assert any(f"row {LAB_ROW}," in b.get("display", "") for b in final["resource"]["basis"])

            # 2. a re-snapshot of both rows, identical content at higher lsns: nothing for the app
            before = wait_for_counter(pipe, "alerts_correction_amended", 1, deadline)
            snapshot = [vitals("r", 31_000_000, T_VITALS_MS + 3600_000),
                        lab("r", None, lab_row("final"), 31_000_100, T_VITALS_MS + 3600_000)]
            assert feed(*snapshot) == []
            restated = events_in(snapshot, pipe)
            assert restated >= 2
            after = wait_for_counter(pipe, "duplicate_restatement", before.get("duplicate_restatement", 0) + restated,
                                     deadline)
            assert after["duplicate_restatement"] - before.get("duplicate_restatement", 0) == restated
            assert after.get("corrected", 0) == before.get("corrected", 0)
            assert after.get("scores", 0) == before.get("scores", 0)

            # 3. the lab row deleted: its fact retracted from the open alert's basis; the vitals still give
            # high, so the alert is amended (correct(): tier still met), not withdrawn
            (retracted,) = feed(lab("d", lab_row("final"), None, 31_100_000, T_VITALS_MS + 2 * 3600_000),
                                tombstone())
            h, r = retracted["header"], retracted["resource"]
            assert (h["kind"], h["status"], h["tier"]) == ("correction", "amended", "high")
            assert h["original_alert_id"] == header["alert_id"] and r["id"] == header["alert_id"]
            assert h["alert_id"] not in (header["alert_id"], final["header"]["alert_id"])
            assert h["preliminary_basis"] == []
            assert not any(f"row {LAB_ROW}," in b.get("display", "") for b in r["basis"])
            assert r["basis"]  # the vitals it still rests on
        finally:
            app.close()
        codes_ = pipe.stop()
    assert codes_ == {"ingest": 0, "worker": 0}, (pipe.log_tail("ingest"), pipe.log_tail("worker"))
