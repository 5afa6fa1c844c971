"""Archiver: records -> Parquet rows (pure), crash-safe files, and the consumer-group worker on the
real broker (nothing lost across restarts, duplicates only of the kind the rebuild removes)."""

from __future__ import annotations


import orjson
import polars as pl
import pytest

from batch import rebuild
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, encode_batch
from schemas.deadletter import Reason, Rejection, Stage, deadletter_headers
from streams.archiver import Archiver, RawRecord, part_files, rows_for, utc_date, write_part
from streams.topics import ensure_topics, topics_for
from wardwatch.settings import Settings

T0 = 1_718_000_000_000  # 2024-06-10 06:13:20 UTC
DAY_MS = 24 * 3600 * 1000
NOT_UTF8 = b"\xff\xfe{not json"


def event(fact: str, effective_ms: int = T0, patient: str = "p1", value: float = 88.0) -> CanonicalEvent:
    return CanonicalEvent(patient_id=patient, code=codes.HEART_RATE, value=value, unit="/min",
                          effective_ms=effective_ms, issued_ms=effective_ms + 5, status=Status.FINAL,
                          source=Source.FHIR, fact_id=fact, version=1, encounter_id="enc1",
                          provenance={"resource": "Observation/1"})


def record(value: bytes, *, topic="t.canonical", partition=2, offset=7, timestamp_ms=T0 + 3 * DAY_MS,
           headers=()) -> RawRecord:
    return RawRecord(topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms, key=b"p1",
                     value=value, headers=tuple(headers))


def snapshot(snapshot_id: str, scoring_ms: int = T0, offset: int = 0) -> dict:
    return {"snapshot_id": snapshot_id, "patient_id": "p1", "scoring_ms": scoring_ms, "partition": 0,
            "offset": offset, "features": {"heart_rate_last_24h": 88.0, "spo2_min_6h": None}}


def score(snapshot_id: str) -> dict:
    return {"snapshot_id": snapshot_id, "patient_id": "p1", "scoring_ms": T0, "partition": 0, "offset": 0,
            "model_version": "m1", "path": "rule", "probability": None, "news2": 6, "tier": "medium",
            "rationale": [{"feature": "news2", "value": 6}]}


ALERT = {"header": {"alert_id": "a1", "kind": "open", "tier": "high", "patient_id": "p1", "encounter_id": "enc1",
                    "scoring_ms": T0, "model_version": "m1", "path": "model"},
         "resource": {"resourceType": "RiskAssessment", "status": "final"}}


# --- pure: rows ----------------------------------------------------------------------------------


def test_canonical_batch_becomes_one_row_per_event_with_its_arrival_position():
    e1, e2 = event("f1"), event("f2", effective_ms=T0 - DAY_MS)
    rows = rows_for("canonical", record(encode_batch([e1, e2])))
    assert [(r.kind, r.date) for r in rows] == [("canonical", "2024-06-10"), ("canonical", "2024-06-09")]
    first = rows[0].values
    assert (first["partition"], first["offset"], first["idx"]) == (2, 7, 0)
    assert rows[1].values["idx"] == 1
    assert first["event_id"] == e1.event_id
    assert (first["status"], first["source"], first["encounter_id"]) == ("final", "fhir", "enc1")
    assert orjson.loads(first["provenance"]) == {"resource": "Observation/1"}


def test_deadletter_keeps_original_bytes_and_headers_as_columns():
    headers = deadletter_headers(Rejection(Reason.MALFORMED_JSON, "not UTF-8", "UnicodeDecodeError"),
                                 Stage.INGEST_FHIR, "t.fhir.notifications", 3, 99)
    [row] = rows_for("deadletter", record(NOT_UTF8, topic="t.deadletter", headers=headers))
    v = row.values
    assert v["value"] == NOT_UTF8
    assert (v["reason"], v["stage"], v["exception"]) == ("malformed_json", "ingest.fhir", "UnicodeDecodeError")
    assert (v["source_topic"], v["source_partition"], v["source_offset"]) == ("t.fhir.notifications", 3, 99)
    assert row.date == utc_date(T0 + 3 * DAY_MS)  # no clinical time: the Kafka timestamp decides


def test_snapshot_kinds_are_dated_by_scoring_time_and_keep_nested_values_as_json():
    [f] = rows_for("features", record(orjson.dumps(snapshot("s1")), topic="t.features"))
    assert f.date == "2024-06-10"
    assert orjson.loads(f.values["features_json"]) == {"heart_rate_last_24h": 88.0, "spo2_min_6h": None}
    [s] = rows_for("scores", record(orjson.dumps(score("s1")), topic="t.scores"))
    assert (s.values["path"], s.values["news2"], s.values["probability"]) == ("rule", 6, None)
    assert orjson.loads(s.values["rationale_json"]) == [{"feature": "news2", "value": 6}]
    [a] = rows_for("alerts", record(orjson.dumps(ALERT), topic="t.alerts"))
    assert (a.values["alert_id"], a.values["kind"], a.date) == ("a1", "open", "2024-06-10")
    assert orjson.loads(a.values["resource_json"])["resourceType"] == "RiskAssessment"


def test_late_record_keeps_its_canonical_position_and_lateness():
    value = orjson.dumps({"event": event("f9").to_dict(), "late_by_ms": 1234, "partition": 1, "offset": 40})
    [row] = rows_for("late", record(value, topic="t.late", partition=1, offset=3))
    v = row.values
    assert (v["late_by_ms"], v["partition"], v["offset"], v["kafka_offset"]) == (1234, 1, 40, 3)
    assert v["event_id"] == event("f9").event_id


@pytest.mark.parametrize("kind,value", [("canonical", NOT_UTF8), ("canonical", b'{"not": "an array"}'),
                                        ("features", b'{"snapshot_id": "s"}'), ("alerts", b"[]")])
def test_undecodable_output_record_is_kept_as_unreadable(kind, value):
    [row] = rows_for(kind, record(value))
    assert row.kind == "unreadable"
    assert row.values["value"] == value
    assert row.values["error"]


GOOD_EVENT = event("f1").to_dict()
BIG = 10**20  # beyond int64: orjson reads it as a float, the row makers' int() makes it a big int again


@pytest.mark.parametrize("kind,value,column", [
    ("canonical", orjson.dumps([GOOD_EVENT, GOOD_EVENT | {"fact_id": "f2", "value": "80"}]), "value"),
    ("canonical", orjson.dumps([GOOD_EVENT | {"patient_id": 123}]), "patient_id"),
    ("canonical", orjson.dumps([GOOD_EVENT | {"value": 2**53 + 1}]), "value"),  # no exact float64
    ("canonical", orjson.dumps([GOOD_EVENT | {"version": 2**63}]), "version"),
    ("late", orjson.dumps({"event": GOOD_EVENT, "late_by_ms": float(BIG)}), "late_by_ms"),
    ("features", orjson.dumps(snapshot("s1") | {"idx": float(BIG)}), "idx"),
    ("scores", orjson.dumps(score("s1") | {"news2": float(BIG)}), "news2"),
    ("scores", orjson.dumps(score("s1") | {"input_watermark": {"offset": float(BIG)}}), "input_watermark"),
])
def test_record_that_decodes_but_does_not_fit_its_columns_is_kept_as_unreadable(tmp_path, kind, value, column):
    [row] = rows_for(kind, record(value))
    assert row.kind == "unreadable" and row.values["value"] == value
    # the archive's column, or the canonical event's field (a canonical event is checked as it decodes)
    assert f"column {column}:" in row.values["error"] or f"field {column}:" in row.values["error"]
    assert "80" not in row.values["error"]  # names the type, not the (clinical) value
    write_part(tmp_path, "unreadable", row.date, [row.values])


class StandInConsumer:
    """confluent_kafka.Consumer for the archiver without a broker: hands out `messages` once."""

    def __init__(self, config):
        self.messages, self.commits = [], []

    def subscribe(self, topics, on_assign, on_revoke):
        pass

    def consume(self, num_messages, timeout):
        messages, self.messages = self.messages, []
        return messages

    def commit(self, offsets, asynchronous):
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def close(self):
        pass


class Message:
    def __init__(self, topic: str, offset: int, value: bytes):
        self._topic, self._offset, self._value = topic, offset, value

    def error(self):
        return None

    def timestamp(self):
        from confluent_kafka import TIMESTAMP_CREATE_TIME

        return TIMESTAMP_CREATE_TIME, T0

    def topic(self):
        return self._topic

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return b"p1"

    def value(self):
        return self._value

    def headers(self):
        return None


def test_one_badly_typed_record_does_not_stop_the_archive(monkeypatch, tmp_path):
    monkeypatch.setattr("confluent_kafka.Consumer", StandInConsumer)
    settings = Settings(topic_prefix="t", data_dir=tmp_path)
    topics = topics_for(settings)
    archiver = Archiver(settings, topics, flush_rows=1)
    bad = orjson.dumps([event("f2").to_dict() | {"value": "80"}])  # decodes, but no float64 column holds it
    archiver._consumer.messages = [Message(topics.canonical, 0, encode_batch([event("f1")])),
                                   Message(topics.canonical, 1, bad)]

    assert archiver.poll_once() == 2
    assert rebuild.read_archive(settings.archive_dir, "canonical")["fact_id"].to_list() == ["f1"]
    unreadable = rebuild.read_archive(settings.archive_dir, "unreadable")
    assert unreadable.select("value", "kafka_offset").rows() == [(bad, 1)]
    assert archiver._consumer.commits == [{(topics.canonical, 0): 2}]


class StampedMessage(Message):
    def __init__(self, topic: str, offset: int, value: bytes, timestamp_ms: int):
        super().__init__(topic, offset, value)
        self._timestamp_ms = timestamp_ms

    def timestamp(self):
        from confluent_kafka import TIMESTAMP_CREATE_TIME

        return TIMESTAMP_CREATE_TIME, self._timestamp_ms


def test_a_record_with_a_timestamp_beyond_year_9999_is_archived_and_does_not_stop_the_archiver(monkeypatch, tmp_path):
    """A producer that set its Kafka timestamps in microseconds (the broker accepts any int64): dating the
    dead letter, or the unreadable row of a bad record, raised outside every row maker, so the archiver
    stopped on that record at every restart and archived no topic any more."""
    monkeypatch.setattr("confluent_kafka.Consumer", StandInConsumer)
    settings = Settings(topic_prefix="t", data_dir=tmp_path)
    topics = topics_for(settings)
    archiver = Archiver(settings, topics, flush_rows=1)
    micros = T0 * 1000
    archiver._consumer.messages = [StampedMessage(topics.deadletter, 0, NOT_UTF8, micros),
                                   StampedMessage(topics.canonical, 0, b"not json", micros),
                                   StampedMessage(topics.canonical, 1, encode_batch([event("f1")]), -micros)]

    assert archiver.poll_once() == 3
    assert rebuild.read_archive(settings.archive_dir, "deadletter")["value"].to_list() == [NOT_UTF8]
    assert rebuild.read_archive(settings.archive_dir, "unreadable")["value"].to_list() == [b"not json"]
    assert rebuild.read_archive(settings.archive_dir, "canonical")["fact_id"].to_list() == ["f1"]
    assert archiver._consumer.commits == [{(topics.deadletter, 0): 1, (topics.canonical, 0): 2}]


def test_a_record_kept_as_unreadable_moves_a_counter_on_metrics(monkeypatch, tmp_path):
    """The archiver kept a bad record as an `unreadable` row, and nothing on /metrics said so (it exposed
    no counters at all): an operator learned of it only by reading the archive."""
    from prometheus_client import REGISTRY, generate_latest

    monkeypatch.setattr("confluent_kafka.Consumer", StandInConsumer)
    settings = Settings(topic_prefix="t", data_dir=tmp_path)
    topics = topics_for(settings)
    archiver = Archiver(settings, topics, flush_rows=1)
    archiver._consumer.messages = [Message(topics.canonical, 0, encode_batch([event("f1")])),
                                   Message(topics.canonical, 1, b"not json")]
    assert archiver.poll_once() == 2

    metrics = generate_latest(REGISTRY).decode()
    assert 'wardwatch_counter_total{counter="unreadable.canonical",service="archiver"} 1.0' in metrics
    assert 'wardwatch_counter_total{counter="consumed.canonical",service="archiver"} 2.0' in metrics


def test_full_disk_stops_the_archiver_without_a_commit_or_a_left_over_file_and_a_restart_loses_nothing(
        monkeypatch, tmp_path, caplog):
    import errno
    import threading

    import pyarrow.parquet as pq

    monkeypatch.setattr("confluent_kafka.Consumer", StandInConsumer)
    settings = Settings(topic_prefix="t", data_dir=tmp_path)
    topics = topics_for(settings)
    batch = [Message(topics.canonical, 0, encode_batch([event("f1")]))]
    write_table = pq.write_table

    def disk_full(table, where, **kwargs):
        where.write(b"PAR1 half a file")  # what fitted before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    archiver = Archiver(settings, topics, flush_rows=1)
    archiver._consumer.messages = list(batch)
    with pytest.raises(OSError, match="No space left"):
        archiver.run(threading.Event())
    assert archiver._consumer.commits == []  # not durable, so not committed: re-read after the restart
    assert [p for p in settings.archive_dir.rglob("*") if p.is_file()] == []  # no half file holds the space
    assert any(r.levelname == "CRITICAL" and "No space left" in r.getMessage() for r in caplog.records)

    def unconvertible(table, where, **kwargs):  # an error quoting a row's value, as pyarrow's do
        raise ValueError("could not convert 'C0-0001' for column patient_id")

    monkeypatch.setattr(pq, "write_table", unconvertible)
    caplog.clear()
    failing = Archiver(settings, topics, flush_rows=1)
    failing._consumer.messages = list(batch)
    with pytest.raises(ValueError):
        failing.run(threading.Event())
    [stopped] = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert "C0-0001" not in stopped and "<redacted>" in stopped  # no patient id in the log

    monkeypatch.setattr(pq, "write_table", write_table)  # space freed; compose restarts the archiver
    restarted = Archiver(settings, topics, flush_rows=1)
    restarted._consumer.messages = list(batch)  # the uncommitted record is delivered again
    assert restarted.poll_once() == 1
    assert rebuild.read_archive(settings.archive_dir, "canonical")["fact_id"].to_list() == ["f1"]
    assert restarted._consumer.commits == [{(topics.canonical, 0): 1}]
    assert not list(settings.archive_dir.rglob("*.tmp"))


# --- files ---------------------------------------------------------------------------------------


def test_part_file_is_complete_and_no_temp_file_remains(tmp_path):
    rows = [r.values for r in rows_for("canonical", record(encode_batch([event("f1"), event("f2")])))]
    path = write_part(tmp_path, "canonical", "2024-06-10", rows)
    assert path.parent == tmp_path / "canonical" / "date=2024-06-10"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert pl.read_parquet(path)["fact_id"].to_list() == ["f1", "f2"]


def test_a_new_date_directory_is_made_durable_before_the_part_file_counts_as_written(monkeypatch, tmp_path):
    """The part file and its directory were fsynced, but not the entry of a newly made date= (or kind)
    directory in its parent: the offsets were then committed, and a power cut could take the whole new
    day's directory, with the rows the broker no longer re-delivers."""
    import os

    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    archive = tmp_path / "archive"
    archive.mkdir()
    rows = [r.values for r in rows_for("canonical", record(encode_batch([event("f1")])))]
    path = write_part(archive, "canonical", "2024-06-10", rows)
    assert {str(archive), str(archive / "canonical"), str(path.parent)} <= set(synced)

    synced.clear()  # the next part of that day: its directory exists, only the file and it are synced
    write_part(archive, "canonical", "2024-06-10", rows)
    assert str(archive / "canonical") not in synced and str(path.parent) in synced


def test_left_over_temp_file_is_never_read(tmp_path):
    rows = [r.values for r in rows_for("canonical", record(encode_batch([event("f1")])))]
    path = write_part(tmp_path, "canonical", "2024-06-10", rows)
    (path.parent / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half written")
    assert part_files(tmp_path, "canonical") == [path]
    assert rebuild.read_archive(tmp_path, "canonical")["fact_id"].to_list() == ["f1"]


def test_a_restarted_archiver_removes_the_temp_file_a_kill_mid_write_left_but_not_a_live_one(monkeypatch, tmp_path):
    """SIGKILLed mid-write, no `except` runs: the hidden temp file stayed on the archive volume for ever,
    one per kill, and nothing ever removed it."""
    import os
    import time

    monkeypatch.setattr("confluent_kafka.Consumer", StandInConsumer)
    settings = Settings(topic_prefix="t", data_dir=tmp_path)
    rows = [r.values for r in rows_for("canonical", record(encode_batch([event("f1")])))]
    path = write_part(settings.archive_dir, "canonical", "2024-06-10", rows)
    killed = path.parent / ".part-killed.parquet.tmp"
    killed.write_bytes(b"PAR1 half written")
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    live = path.parent / ".part-being-written.parquet.tmp"  # another archiver on the volume, writing now
    live.write_bytes(b"PAR1 being written")

    Archiver(settings, topics_for(settings))
    assert not killed.exists()
    assert live.exists() and path.exists()


# --- the worker on the real broker ---------------------------------------------------------------


def produce(settings, messages: list[tuple[str, bytes, list]]) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_client_config())
    for topic, value, headers in messages:
        producer.produce(topic, key=b"p1", value=value, headers=headers)
    assert producer.flush(30) == 0


class KilledBeforeWriting(Archiver):
    """Dies with rows still in memory: nothing written, nothing committed."""

    def flush(self) -> None:
        pass


class KilledBeforeCommitting(Archiver):
    """Dies after its files are durable but before the offsets are committed."""

    def _commit(self) -> None:
        pass


@pytest.mark.integration
def test_archiver_lands_every_kind_and_restarts_without_loss(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    dl_headers = deadletter_headers(Rejection(Reason.MALFORMED_JSON, "not UTF-8"), Stage.INGEST_FHIR,
                                    topics.fhir, 0, 5)
    produce(settings, [
        (topics.canonical, encode_batch([event("f1"), event("f2")]), []),
        (topics.canonical, encode_batch([event("f3")]), []),
        (topics.late, orjson.dumps({"event": event("f0").to_dict(), "late_by_ms": 10, "partition": 0,
                                    "offset": 1}), []),
        (topics.deadletter, NOT_UTF8, dl_headers),
        (topics.features, orjson.dumps(snapshot("s1")), []),
        (topics.features, orjson.dumps(snapshot("s2", offset=1)), []),
        (topics.scores, orjson.dumps(score("s1")), []),
        (topics.alerts, orjson.dumps(ALERT), []),
    ])
    first_batch = {"canonical": 2, "late": 1, "deadletter": 1, "features": 2, "scores": 1, "alerts": 1,
                   "scores_shadow": 0, "gaps": 0}

    # 1. killed before writing: the next member of the group must see everything again
    killed = KilledBeforeWriting(settings, topics)
    assert killed.drain(first_batch, deadline_s=60) == first_batch
    killed.close()
    assert not list(settings.archive_dir.rglob("part-*.parquet"))

    # 2. killed after writing, before committing: everything is archived, and will be re-read
    archiver = KilledBeforeCommitting(settings, topics)
    assert archiver.drain(first_batch, deadline_s=60) == first_batch
    archiver.close()

    # 3. a healthy restart re-reads the uncommitted records, plus one new one
    produce(settings, [(topics.canonical, encode_batch([event("f4")]), [])])
    archiver = Archiver(settings, topics)
    again = first_batch | {"canonical": 3}
    assert archiver.drain(again, deadline_s=60) == again
    archiver.close()

    # 4. and commits them: a further restart finds nothing new
    archiver = Archiver(settings, topics)
    assert sum(archiver.drain(None, idle_s=2, deadline_s=60).values()) == 0
    archiver.close()

    archive = settings.archive_dir
    raw = rebuild.read_archive(archive, "canonical")
    assert raw.height == 7  # f1 f2 f3 twice (step 2 and 3), f4 once
    events = rebuild.canonical_events(raw)
    assert events["fact_id"].to_list() == ["f1", "f2", "f3", "f4"]
    assert events.select("partition", "offset").unique().height == 3
    assert events.filter(pl.col("fact_id") == "f2")["idx"].to_list() == [1]

    dead = rebuild.dead_letters(rebuild.read_archive(archive, "deadletter"))
    assert dead.select("value", "reason", "source_topic", "source_offset").rows() == [
        (NOT_UTF8, "malformed_json", topics.fhir, 5)]
    online = rebuild.features_online(rebuild.read_archive(archive, "features"))
    assert online.sort("snapshot_id")["heart_rate_last_24h"].to_list() == [88.0, 88.0]
    assert rebuild.scores(rebuild.read_archive(archive, "scores"))["snapshot_id"].to_list() == ["s1"]
    assert rebuild.alerts(rebuild.read_archive(archive, "alerts"))["alert_id"].to_list() == ["a1"]
    late = rebuild.late_events(rebuild.read_archive(archive, "late"))
    assert late.select("fact_id", "late_by_ms").rows() == [("f0", 10)]
    assert sorted(p.name for p in (archive / "canonical").iterdir()) == ["date=2024-06-10"]
    assert not list(archive.rglob("*.tmp"))


@pytest.mark.timeout(60)
def test_a_consumer_close_that_blocks_does_not_hang_the_caller():
    """librdkafka's close blocked for ever when the demo was interrupted while the archiver's group was still
    joining; the demo closes the archiver first, so its services and broker were never stopped (orphans).
    close() now returns after its bound, whatever the consumer does."""
    import threading

    release = threading.Event()

    class StuckConsumer:
        def close(self):
            release.wait()  # as librdkafka did: never returns

    archiver = Archiver.__new__(Archiver)  # only the consumer matters to close()
    archiver._consumer = StuckConsumer()
    try:
        archiver.close(timeout_s=0.5)  # without the bound this never returns (the test's timeout fails it)
    finally:
        release.set()
