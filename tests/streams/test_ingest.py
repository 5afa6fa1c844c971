"""The ingest worker: accounting and routing without a broker, then end to end through the real one."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError,
                             KafkaException, Producer, TopicPartition)

from schemas.canonical import Source, Status, decode_batch, encode_batch
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.fhir import parse_notification
from streams import ingest
from streams.ingest import PRODUCED_NS_HEADER, IngestCounters, IngestWorker, consumer_config, group_id
from streams.topics import ensure_topics, topics_for
from wardwatch.settings import Settings
from tests.fixtures.ingest.corpus import (CDC_PREFIX, cdc_message, cdc_messages, fhir_bundle,
                                         nested_too_deep_to_write, raw_file)

# --- without a broker ----------------------------------------------------------------------------


def test_counters_account_for_every_message_once():
    counters = IngestCounters()

    def cdc(name):
        return parse_cdc(*_fields(cdc_message(name)), partition=0, offset=0, cdc_topic_prefix=CDC_PREFIX)

    def fhir(name):
        return parse_notification(fhir_bundle(name), topic="f", partition=0, offset=0)

    for outcome in (cdc("create_bare"), cdc("heart_rate_5000"), cdc("truncate"), cdc("nan_spo2")):
        counters.record("cdc", outcome)
    for outcome in (fhir("r4b_mixed"), fhir("r4b_handshake"), fhir("r4b_unmapped_only")):
        counters.record("fhir", outcome)

    snap = counters.snapshot()
    assert snap["cdc"]["messages_in"] == 4 and snap["cdc"]["messages_parsed"] == 1
    assert snap["cdc"]["events_out"] == 8
    assert snap["cdc"]["dead_lettered"] == {"implausible_value": 1, "bad_value": 1}
    assert snap["cdc"]["ignored"] == {"truncate": 1}
    assert snap["fhir"]["control"] == {"handshake": 1}
    assert snap["fhir"]["ignored"] == {"unmapped_code": 1}
    assert snap["fhir"]["skipped"] == {"unmapped_code": 2, "Encounter": 2}  # one of each in both bundles
    assert counters.balanced()


def _fields(msg):
    return msg.topic, msg.key, msg.value


class FakeMessage:
    def __init__(self, topic, key, value, *, partition=0, offset=0, headers=None, timestamp_ms=None):
        self._topic, self._key, self._value = topic, key, value
        self._partition, self._offset, self._headers = partition, offset, headers
        # a producer's CreateTime, as a real record carries (the receiver's clock when it wrote it)
        self._timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms

    def timestamp(self):
        if self._timestamp_ms < 0:
            return TIMESTAMP_NOT_AVAILABLE, -1
        return TIMESTAMP_CREATE_TIME, self._timestamp_ms

    def topic(self):
        return self._topic

    def key(self):
        return self._key

    def value(self):
        return self._value

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def headers(self):
        return self._headers

    def error(self):
        return None


class FakeBroker:
    """Stands in for the worker's consumer and producer: hands out one batch, delivers on flush
    (with `delivery_error`, if set), and logs flushes and commits in the order they happen."""

    def __init__(self, batch, delivery_error=None):
        self.batch, self.delivery_error = batch, delivery_error
        self.pending, self.produced, self.calls = [], [], []
        self.commit_errors = {}  # partition -> the error a synchronous commit reports for it

    def subscribe(self, topics, on_assign=None, on_revoke=None):
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def pause(self, partitions):
        self.calls.append(("pause", [(tp.topic, tp.partition) for tp in partitions]))

    def seek(self, tp):
        self.calls.append(("seek", (tp.topic, tp.partition, tp.offset)))

    def resume(self, partitions):
        self.calls.append(("resume", [(tp.topic, tp.partition) for tp in partitions]))

    def consume(self, num_messages, timeout):
        batch, self.batch = self.batch, []
        return batch

    def commit(self, offsets, asynchronous):
        self.calls.append(("commit", {(tp.topic, tp.partition): tp.offset for tp in offsets}))
        if not asynchronous:  # librdkafka answers per partition; .error is read-only on a real TopicPartition
            return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=tp.offset,
                                    error=self.commit_errors.get(tp.partition)) for tp in offsets]

    def produce(self, topic, value, key, headers, on_delivery):
        self.pending.append((on_delivery, FakeMessage(topic, key, value, headers=headers)))

    def poll(self, timeout):
        return 0

    def close(self):
        self.calls.append(("close",))

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]  # nothing fetched yet

    def get_watermark_offsets(self, partition, cached):
        return -1001, -1001

    def flush(self, timeout):
        for on_delivery, msg in self.pending:
            on_delivery(self.delivery_error, msg)
            if self.delivery_error is None:
                self.produced.append(msg)
        self.pending = []
        self.calls.append(("flush",))
        return 0

    def on(self, topic):
        return [m for m in self.produced if m.topic() == topic]


FAKE_SETTINGS = Settings(topic_prefix="ww", cdc_topic_prefix=CDC_PREFIX)


@pytest.fixture
def fake_worker(monkeypatch):
    """An IngestWorker wired to a FakeBroker holding `batch`: the worker's own code, no broker."""

    def make(batch, delivery_error=None, settings=FAKE_SETTINGS):
        fake = FakeBroker(batch, delivery_error)
        monkeypatch.setattr(ingest, "Consumer", lambda conf: fake)
        monkeypatch.setattr(ingest, "Producer", lambda conf: fake)
        return IngestWorker(settings, topics_for(settings)), fake

    return make


def _cdc(name, offset, value=None):
    m = cdc_message(name)
    return FakeMessage(m.topic, m.key, m.value if value is None else value, offset=offset)


def _events(msg):
    if msg.topic().startswith(CDC_PREFIX + "."):
        return parse_cdc(msg.topic(), msg.key(), msg.value(), partition=0, offset=msg.offset(),
                         cdc_topic_prefix=CDC_PREFIX).events
    return parse_notification(msg.value(), topic=msg.topic(), partition=0, offset=msg.offset()).events


def test_worker_publishes_one_message_per_patient_in_arrival_order_then_commits(fake_worker):
    a, b = _cdc("create_schema_wrapped", 0), _cdc("create_bare", 1)  # MRN-0001, MRN-0002
    f = FakeMessage(topics_for(FAKE_SETTINGS).fhir, b"MRN-0001", fhir_bundle("r4b_status_event"),
                    headers=[(PRODUCED_NS_HEADER, b"123")])
    worker, fake = fake_worker([a, b, f])
    topics = worker.topics

    assert worker.poll_once() == 3

    canonical = {m.key(): m for m in fake.on(topics.canonical)}
    assert set(canonical) == {b"MRN-0001", b"MRN-0002"} and len(fake.on(topics.canonical)) == 2
    expected = {b"MRN-0001": _events(a) + _events(f), b"MRN-0002": _events(b)}
    for key, events in expected.items():
        assert canonical[key].value() == encode_batch(events)  # byte for byte the canonical contract
        assert decode_batch(canonical[key].value()) == events
    assert dict(canonical[b"MRN-0001"].headers())[PRODUCED_NS_HEADER] == b"123"  # forwarded from the raw message
    assert fake.on(topics.deadletter) == []
    assert fake.calls == [("flush",), ("commit", {(a.topic(), 0): 2, (f.topic(), 0): 1})]


def test_an_observation_with_no_server_time_is_checked_against_the_kafka_record_time(fake_worker):
    """A FHIR Observation with no issued, meta.lastUpdated or notification timestamp, dated 2099 by a
    typo: the ingest bounds it by the raw record's timestamp and dead-letters it as future-dated,
    instead of publishing it and moving the patient's clock to 2099."""
    doc = json.loads(fhir_bundle("r4b_amended_reference_only"))
    doc.pop("timestamp")
    for event in doc["entry"][0]["resource"]["notificationEvent"]:
        event.pop("timestamp")
    doc["entry"][1]["resource"]["effectiveDateTime"] = "2099-06-15T14:06:36Z"
    # whose reading it is (the fixture's subject is the FHIR server's id alone, which is not the MRN)
    doc["entry"][1]["resource"]["subject"]["identifier"] = {"value": "MRN-0001"}
    topic = topics_for(FAKE_SETTINGS).fhir
    typo = FakeMessage(topic, b"MRN-0001", json.dumps(doc).encode(), offset=0, timestamp_ms=1_718_460_456_000)
    doc["entry"][1]["resource"]["effectiveDateTime"] = "2024-06-15T14:06:36Z"
    good = FakeMessage(topic, b"MRN-0001", json.dumps(doc).encode(), offset=1, timestamp_ms=1_718_460_456_000)
    worker, fake = fake_worker([typo, good])
    assert worker.poll_once() == 2
    (dead,) = fake.on(worker.topics.deadletter)
    assert dict(dead.headers())["ww.reason"] == Reason.FUTURE_TIME.value.encode() and dead.value() == typo.value()
    (published,) = fake.on(worker.topics.canonical)
    assert [e.effective_ms for e in decode_batch(published.value())] == [1_718_460_396_000]


def test_a_reading_whose_subject_is_the_fhir_servers_patient_id_alone_is_not_keyed_by_that_id(fake_worker):
    """The FHIR server's Patient id (HAPI: 1, 2, 3...) may be another patient's MRN: published under it, this
    heart rate would join that patient's state and alerts. With no server to read the MRN from, it is
    dead-lettered saying what to set; only WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS keys it by the id."""
    topic = topics_for(FAKE_SETTINGS).fhir
    msg = FakeMessage(topic, None, fhir_bundle("r4b_amended_reference_only"), offset=0, timestamp_ms=1_718_460_456_000)
    worker, fake = fake_worker([msg])
    assert worker.poll_once() == 1
    assert fake.on(worker.topics.canonical) == []
    (dead,) = fake.on(worker.topics.deadletter)
    headers = dict(dead.headers())
    assert headers["ww.reason"] == Reason.FHIR_SERVER_NOT_CONFIGURED.value.encode()
    assert b"WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS" in headers["ww.detail"] and b"pt-e4f5" not in headers["ww.detail"]
    facade = FAKE_SETTINGS.model_copy(update={"fhir_patient_ids_are_mrns": True})
    worker, fake = fake_worker([msg], settings=facade)
    assert worker.poll_once() == 1
    (published,) = fake.on(worker.topics.canonical)
    assert [e.patient_id for e in decode_batch(published.value())] == ["pt-e4f5d6254795"]


def test_with_an_mrn_system_the_ingest_does_not_key_a_reading_by_another_systems_identifier(fake_worker):
    """WARDWATCH_MRN_SYSTEM reaches the parser: a subject identifier of another namespace (a national number equal
    to patient MRN-0042's MRN) was published as MRN-0042's heart rate; with the setting it is no MRN, and with no
    FHIR server to read the subject's Patient the reading is dead-lettered saying what to set."""
    bundle = json.loads(fhir_bundle("r4b_amended_reference_only"))
    bundle["entry"][1]["resource"]["subject"]["identifier"] = {"system": "urn:oid:2.16.840.1.113883.4.1",
                                                               "value": "MRN-0042"}
    msg = FakeMessage(topics_for(FAKE_SETTINGS).fhir, None, json.dumps(bundle).encode(), offset=0,
                      timestamp_ms=1_718_460_456_000)
    worker, fake = fake_worker([msg])
    assert worker.poll_once() == 1
    (published,) = fake.on(worker.topics.canonical)  # unset: any system, as before
    assert [e.patient_id for e in decode_batch(published.value())] == ["MRN-0042"]
    settings = FAKE_SETTINGS.model_copy(update={"mrn_system": "urn:oid:2.16.840.1.113883.19.5"})
    worker, fake = fake_worker([msg], settings=settings)
    assert worker.poll_once() == 1
    assert fake.on(worker.topics.canonical) == []
    (dead,) = fake.on(worker.topics.deadletter)
    assert dict(dead.headers())["ww.reason"] == Reason.FHIR_SERVER_NOT_CONFIGURED.value.encode()


def test_the_ingest_reads_naive_cdc_timestamps_in_the_configured_database_zone(fake_worker):
    """WARDWATCH_CDC_TIMEZONE reaches the CDC parser: a vitals row whose `timestamp` column holds
    14:06:36.123 Berlin time (CEST) is published at 12:06:36.123Z, not two hours late."""
    berlin = FAKE_SETTINGS.model_copy(update={"cdc_timezone": "Europe/Berlin"})
    worker, fake = fake_worker([_cdc("create_bare", 0)], settings=berlin)
    assert worker.poll_once() == 1
    (published,) = fake.on(worker.topics.canonical)
    assert {e.effective_ms for e in decode_batch(published.value())} == {1_718_460_396_123 - 2 * 3_600_000}


def test_an_lsn_wider_than_int64_is_dead_lettered_by_the_parser(fake_worker):
    doc = json.loads(cdc_message("create_bare").value)
    doc["source"]["lsn"] = "123456789012345678901234567890"
    poison = _cdc("create_bare", 0, value=json.dumps(doc).encode())
    worker, fake = fake_worker([poison])
    assert worker.poll_once() == 1
    (dead,) = fake.on(worker.topics.deadletter)
    assert dict(dead.headers())["ww.reason"] == Reason.BAD_VALUE.value.encode()
    assert dead.value() == poison.value()


def test_an_event_the_worker_could_not_decode_is_dead_lettered_by_the_ingest_alone(fake_worker):
    """A negative Debezium lsn fits int64, so the parser took it as the facts' version; the worker refuses
    negative versions and dead-letters the whole canonical message, so the patient's valid events of
    the same batch went with it (found by the 10k bad-input test). The ingest now refuses it alone."""
    doc = json.loads(cdc_message("create_bare").value)
    doc["source"]["lsn"] = -64147295770
    poison = _cdc("create_bare", 0, value=json.dumps(doc).encode())
    good = _cdc("create_schema_wrapped", 1)  # the same patient, MRN-0001
    worker, fake = fake_worker([poison, good])
    assert worker.poll_once() == 2
    (dead,) = fake.on(worker.topics.deadletter)
    headers = dict(dead.headers())
    assert headers["ww.reason"] == Reason.BAD_VALUE.value.encode() and b"version" in headers["ww.detail"]
    assert dead.value() == poison.value()
    (canonical,) = fake.on(worker.topics.canonical)
    assert decode_batch(canonical.value()) == _events(good)  # readable by the worker, and only the good events
    assert worker.counters.balanced()


def test_a_message_whose_events_cannot_be_encoded_is_dead_lettered_not_fatal(fake_worker, monkeypatch):
    # defence in depth: if a parser ever lets through an event no JSON encoder writes (here a set in
    # its provenance), it must not stop the worker on every restart
    poison = _cdc("create_bare", 0)
    good = _cdc("create_schema_wrapped", 1)
    worker, fake = fake_worker([poison, good])
    topics = worker.topics
    real_parse = worker.parse

    def parse(msg):
        source, outcome = real_parse(msg)
        if msg is poison:
            outcome = ingest.Parsed([dataclasses.replace(outcome.events[0], provenance={"seen": {1, 2}})])
        return source, outcome

    monkeypatch.setattr(worker, "parse", parse)
    assert worker.poll_once() == 2

    (dead,) = fake.on(topics.deadletter)
    headers = dict(dead.headers())
    assert (dead.key(), dead.value()) == (poison.key(), poison.value())
    assert headers["ww.reason"] == Reason.INTERNAL_ERROR.value.encode() and headers["ww.exception"] == b"TypeError"
    assert [m.key() for m in fake.on(topics.canonical)] == [b"MRN-0001"]
    snap = worker.counters.snapshot()["cdc"]
    assert snap["dead_lettered"] == {"internal_error": 1} and snap["messages_parsed"] == 1
    assert snap["events_out"] == len(_events(good))
    assert worker.counters.balanced()
    assert fake.calls == [("flush",), ("commit", {(good.topic(), 0): 2})]


class ServedResources:
    """A FHIR client answering every read with a minimal resource of the referenced type and id."""

    def read(self, reference):
        kind, rid = reference.split("/")[:2]
        return {"resourceType": kind, "id": rid}

    def close(self):
        pass


def test_an_id_only_notification_too_deep_to_complete_is_dead_lettered_and_committed(fake_worker):
    # legal JSON that orjson reads but cannot write back: completing it from the FHIR server fails
    poison = FakeMessage(topics_for(FAKE_SETTINGS).fhir, b"k", nested_too_deep_to_write("r4b_id_only"), offset=5)
    worker, fake = fake_worker([poison])
    worker._fhir = ServedResources()

    assert worker.poll_once() == 1

    (dead,) = fake.on(worker.topics.deadletter)
    assert dict(dead.headers())["ww.reason"] == Reason.INTERNAL_ERROR.value.encode()
    assert dead.value() == poison.value()
    assert worker.counters.snapshot()["fhir"]["dead_lettered"] == {"internal_error": 1}
    assert fake.calls == [("flush",), ("commit", {(poison.topic(), 0): 6})]


def test_a_parser_that_raises_dead_letters_its_message_and_the_batch_goes_on(fake_worker, monkeypatch):
    # defence in depth: parsers return outcomes, but an exception escaping one must not stop the
    # worker on the same message at every restart
    poison, good = _cdc("create_bare", 0), _cdc("create_schema_wrapped", 1)
    worker, fake = fake_worker([poison, good])
    real_parse = worker.parse

    def parse(msg):
        if msg is poison:
            raise RecursionError("a bug")
        return real_parse(msg)

    monkeypatch.setattr(worker, "parse", parse)
    assert worker.poll_once() == 2

    (dead,) = fake.on(worker.topics.deadletter)
    headers = dict(dead.headers())
    assert dead.value() == poison.value()
    assert headers["ww.reason"] == Reason.INTERNAL_ERROR.value.encode() and headers["ww.exception"] == b"RecursionError"
    assert headers["ww.stage"] == b"ingest.cdc"
    assert [m.key() for m in fake.on(worker.topics.canonical)] == [b"MRN-0001"]
    assert worker.counters.balanced()
    assert fake.calls == [("flush",), ("commit", {(good.topic(), 0): 2})]


def test_a_failed_delivery_stops_the_worker_without_committing(fake_worker):
    worker, fake = fake_worker([_cdc("create_bare", 0)], delivery_error=KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(KafkaException, match="ingest produce failed"):
        worker.poll_once()
    assert fake.calls == [("flush",)]  # never committed: the batch is re-read after the restart


# --- through the real broker ---------------------------------------------------------------------

DEADLINE_S = 90


def _raw_corpus(settings, topics):
    """(topic, key, value) of a mix of good and bad raw messages."""
    mix = []
    for name in ("create_schema_wrapped", "create_bare", "delete_full", "heart_rate_5000", "truncate"):
        mix += [(m.topic, m.key, m.value) for m in cdc_messages(name, prefix=settings.cdc_topic_prefix)]
    cdc_topic = topics.cdc["vital_signs"]
    mix.append((cdc_topic, b'{"id": 99}', raw_file("cdc", "malformed.txt")))
    for name in ("r4b_status_event", "r4b_handshake", "r4b_unmapped_only", "negative_spo2"):
        mix.append((topics.fhir, b"MRN-0001", fhir_bundle(name)))
    mix.append((topics.fhir, b"MRN-0001", raw_file("fhir", "invalid_utf8.bin")))
    return mix


def _produce(settings, messages):
    producer = Producer(settings.kafka_client_config())
    for topic, key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _reader(settings, topics):
    """Reads canonical + deadletter from the beginning by assignment (no group join to wait for)."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                     for t in (topics.canonical, topics.deadletter) for p in range(topics.partitions)])
    return consumer


@pytest.mark.integration
def test_worker_publishes_canonical_batches_and_dead_letters_bad_messages(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    raw = _raw_corpus(settings, topics)
    _produce(settings, raw)
    # by hand: 8 + 8 events (two creates) + 8 retractions (delete) + 7 (FHIR vitals bundle: BP 2, SpO2,
    # its O2 flow and FiO2 components, temperature, consciousness)
    expected_events, expected_dead = 31, 4  # heart rate 5000, malformed CDC, negative SpO2, invalid UTF-8

    worker = IngestWorker(settings, topics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    reader = _reader(settings, topics)
    canonical, dead = [], []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while (sum(len(decode_batch(m.value())) for m in canonical) < expected_events
               or len(dead) < expected_dead):
            assert time.monotonic() < deadline, f"timed out: {worker.counters.snapshot()}"
            assert thread.is_alive(), "ingest worker died"
            for msg in reader.consume(num_messages=100, timeout=0.5):
                assert msg.error() is None, msg.error()
                (canonical if msg.topic() == topics.canonical else dead).append(msg)
    finally:
        stop.set()
        thread.join(30)
        reader.close()
    assert not thread.is_alive()

    # accounting: every raw message is parsed, dead-lettered, control or ignored, exactly once
    snap = worker.counters.snapshot()
    assert snap["cdc"]["messages_in"] + snap["fhir"]["messages_in"] == len(raw)
    assert worker.counters.balanced()
    assert snap["cdc"]["control"] == {"tombstone": 1} and snap["fhir"]["control"] == {"handshake": 1}
    assert snap["cdc"]["ignored"] == {"truncate": 1} and snap["fhir"]["ignored"] == {"unmapped_code": 1}
    assert snap["cdc"]["events_out"] + snap["fhir"]["events_out"] == expected_events

    # canonical: keyed by patient, one patient per message, produce time stamped
    events_by_patient = defaultdict(list)
    for msg in canonical:
        events = decode_batch(msg.value())
        assert {e.patient_id for e in events} == {msg.key().decode()}
        assert int(dict(msg.headers())[PRODUCED_NS_HEADER]) > 0
        events_by_patient[msg.key().decode()] += events
    assert {p: len(e) for p, e in events_by_patient.items()} == {"MRN-0001": 15, "MRN-0002": 16}  # 8 + 7 FHIR
    retractions = [e for e in events_by_patient["MRN-0002"] if e.status is Status.ENTERED_IN_ERROR]
    assert len(retractions) == 8 and all(e.source is Source.CDC for e in retractions)

    # dead letters: original key and bytes untouched, reason and origin in the headers
    originals = {(t, k, v) for t, k, v in raw}
    reasons = {}
    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers()}
        assert (headers["ww.source.topic"], msg.key(), msg.value()) in originals
        assert headers["ww.stage"] == ("ingest.cdc" if headers["ww.source.topic"] == topics.cdc["vital_signs"]
                                       else "ingest.fhir")
        assert int(headers["ww.source.offset"]) >= 0 and int(headers["ww.source.partition"]) >= 0
        reasons[msg.value()] = headers["ww.reason"]
    assert sorted(reasons.values()) == sorted([Reason.IMPLAUSIBLE_VALUE, Reason.MALFORMED_JSON,
                                               Reason.IMPLAUSIBLE_VALUE, Reason.MALFORMED_JSON])
    assert reasons[raw_file("fhir", "invalid_utf8.bin")] == Reason.MALFORMED_JSON
    assert Counter(snap["cdc"]["dead_lettered"]) + Counter(snap["fhir"]["dead_lettered"]) == Counter(reasons.values())

    # at-least-once: everything consumed was committed, so a restart would not re-read it
    committed = _committed_counts(settings, topics)
    produced = defaultdict(int)
    for topic, _key, _value in raw:
        produced[topic] += 1
    assert committed == dict(produced)


def _committed_counts(settings, topics) -> dict[str, int]:
    """Sum of committed offsets per raw topic for the ingest group (= messages consumed and committed)."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": group_id(settings)})
    try:
        parts = [TopicPartition(t, p) for t in topics.raw for p in range(topics.partitions)]
        result = defaultdict(int)
        for tp in consumer.committed(parts, timeout=10):
            result[tp.topic] += max(tp.offset, 0)
        return {t: n for t, n in result.items() if n}
    finally:
        consumer.close()



# --- a backlog: many events of one patient in one poll ------------------------------------------


def test_batch_values_split_under_the_byte_cap_in_order():
    events = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * 40) for i in range(100)]
    values = ingest.batch_values(events, max_bytes=1024)
    assert len(values) > 1 and all(len(v) <= 1024 for v in values)
    # concatenated, the chunks are exactly the events in arrival order
    assert [e for v in values for e in json.loads(v)] == [json.loads(e) for e in events]
    assert ingest.batch_values(events, max_bytes=10**9) == [ingest.batch_value(events)]
    huge = b'{"pad":"%s"}' % (b"y" * 5000)
    assert ingest.batch_values([huge], max_bytes=1024) == [b"[" + huge + b"]"]  # alone, not dropped


@pytest.mark.integration
def test_a_backlog_of_one_patient_beyond_the_message_limit_is_split_not_fatal(settings):
    """Thousands of one patient's rows waiting when ingest starts (a restart after an outage)."""
    settings = settings.model_copy(update={"canonical_max_message_bytes": 64 * 1024})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    create = next(m for m in cdc_messages("create_bare", prefix=settings.cdc_topic_prefix))
    row = json.loads(create.value)
    backlog = []
    for i in range(3000):  # ~8 events each: far beyond 64 KiB as one message
        after = {**row["after"], "id": 10_000 + i}
        value = json.dumps({**row, "after": after, "source": {**row["source"], "lsn": 1_000_000 + i}}).encode()
        backlog.append((create.topic, create.key, value))
    _produce(settings, backlog)

    worker = IngestWorker(settings, topics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    reader = _reader(settings, topics)
    sizes, events = [], 0
    try:
        deadline = time.monotonic() + DEADLINE_S
        def done() -> bool:  # ingest has read the whole backlog and we have read all it wrote
            snap = worker.counters.snapshot()["cdc"]
            return snap["messages_in"] == len(backlog) and events == snap["events_out"]

        while not done():
            assert time.monotonic() < deadline, f"timed out: {worker.counters.snapshot()}"
            assert thread.is_alive(), "ingest worker died on the backlog"
            for msg in reader.consume(num_messages=500, timeout=0.5):
                assert msg.error() is None, msg.error()
                if msg.topic() == topics.canonical:
                    sizes.append(len(msg.value()))
                    events += len(decode_batch(msg.value()))
    finally:
        stop.set()
        thread.join(30)
        reader.close()
    snap = worker.counters.snapshot()
    assert snap["cdc"]["messages_in"] == len(backlog) and not snap["cdc"]["dead_lettered"]
    assert events == snap["cdc"]["events_out"] > 3000
    assert max(sizes) <= 64 * 1024 and len(sizes) == snap["canonical_messages"]


def test_a_static_ingest_joins_with_its_instance_id_and_a_dynamic_one_without(settings):
    static = settings.model_copy(update={"static_membership": True, "instance_id": "ingest-1"})
    assert ingest.consumer_config(static)["group.instance.id"] == "ingest-1"
    assert "group.instance.id" not in ingest.consumer_config(settings)


# --- a backlog across raw topics: event-time aligned consumption ---------------------------------

DAY_MS, HOUR_MS = 86_400_000, 3_600_000
BACKLOG_T0_MS = 1_718_409_600_000  # 2024-06-15T00:00Z


def _backlog(settings, topics, *, patients=4, days=3, vitals_every_min=2, labs_every_h=4):
    """(topic, key, value) of a backlog: the same patients' vital signs (a big topic: a row every
    `vitals_every_min`) and lab results (a small one: every `labs_every_h`) over the same `days`, each
    topic in event-time order, keyed by patient as Debezium's message.key.columns does. The labs also
    carry one malformed message and one tombstone, so held-back messages that are no events are seen too."""
    vitals = json.loads(cdc_message("create_bare").value)
    lab = json.loads(cdc_message("lab_creatinine_umol_bare").value)
    mrns = [f"MRN-B{i:03d}" for i in range(patients)]
    raw, lsn, row_id = {"vitals": [], "labs": []}, 10_000, 0

    def add(kind, topic, mrn, doc, after, commit_ms):
        nonlocal lsn, row_id
        lsn, row_id = lsn + 100, row_id + 1
        source = {k: v for k, v in doc["source"].items() if k not in ("ts_us", "ts_ns")}
        value = {**doc, "after": {**doc["after"], **after, "id": row_id, "patient_id": mrn},
                 "source": {**source, "lsn": lsn, "ts_ms": commit_ms}, "ts_ms": commit_ms + 10}
        value.pop("ts_us", None), value.pop("ts_ns", None)
        raw[kind].append((topic, json.dumps({"patient_id": mrn}).encode(), json.dumps(value).encode()))

    for step in range(days * 24 * 60 // vitals_every_min):
        t_ms = BACKLOG_T0_MS + step * vitals_every_min * 60_000
        for mrn in mrns:
            add("vitals", topics.cdc["vital_signs"], mrn, vitals, {"measured_at": t_ms * 1000}, t_ms + 30_000)
    for step in range(days * 24 // labs_every_h):
        t_ms = BACKLOG_T0_MS + step * labs_every_h * HOUR_MS
        for mrn in mrns:
            add("labs", topics.cdc["lab_results"], mrn, lab,
                {"collected_at": t_ms * 1000, "resulted_at": (t_ms + HOUR_MS) * 1000}, t_ms + HOUR_MS)
        if step == days * 24 // labs_every_h // 2:  # mid-way: read ahead, held back, published at the resume
            raw["labs"].append((topics.cdc["lab_results"], json.dumps({"patient_id": mrns[0]}).encode(),
                                raw_file("cdc", "malformed.txt")))
            raw["labs"].append((topics.cdc["lab_results"], json.dumps({"patient_id": mrns[1]}).encode(), None))
    return raw["vitals"] + raw["labs"]


def _expected_events(settings, raw) -> tuple[Counter, int]:
    """The events the parsers make of `raw` (event id -> count) and the widest event-time span of
    one raw message's events."""
    events, span = Counter(), 0
    for topic, key, value in raw:
        outcome = parse_cdc(topic, key, value, partition=0, offset=0, cdc_topic_prefix=settings.cdc_topic_prefix)
        found = getattr(outcome, "events", [])  # dead letters and control messages have none
        times = [e.effective_ms for e in found]
        events.update(e.event_id for e in found)
        span = max(span, max(times) - min(times)) if times else span
    return events, span


def _run_backlog(settings, max_skew_s):
    """Pre-fill the backlog, run the ingest over it until every raw message is accounted for and
    every canonical event read back; returns the worker, the raw messages, each patient's events in
    canonical order, the dead letters and the seconds the ingest took."""
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    raw = _backlog(settings, topics)
    _produce(settings, raw)

    worker = IngestWorker(settings.model_copy(update={"ingest_max_skew_s": max_skew_s or 0}), topics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    reader = _reader(settings, topics)
    by_patient, dead, read_events = defaultdict(list), [], 0
    started = time.monotonic()
    thread.start()
    try:
        deadline = started + DEADLINE_S

        def done() -> bool:
            snap = worker.counters.snapshot()["cdc"]
            return (snap["messages_in"] == len(raw) and read_events == snap["events_out"]
                    and len(dead) == sum(snap["dead_lettered"].values()))

        while not done():
            assert time.monotonic() < deadline, f"timed out: {worker.counters.snapshot()}"
            assert thread.is_alive(), "ingest worker died"
            for msg in reader.consume(num_messages=1000, timeout=0.2):
                assert msg.error() is None, msg.error()
                if msg.topic() == topics.canonical:
                    events = decode_batch(msg.value())
                    by_patient[msg.key().decode()] += events  # one patient per key: per partition, in order
                    read_events += len(events)
                else:
                    dead.append(msg)
        elapsed = time.monotonic() - started
        for msg in reader.consume(num_messages=1000, timeout=1.0):  # nothing more may come
            assert msg.topic() != topics.canonical and msg.topic() != topics.deadletter, "published twice"
    finally:
        stop.set()
        thread.join(30)
        reader.close()
    assert not thread.is_alive()
    return worker, raw, by_patient, dead, elapsed


def _behind_ms(by_patient) -> list[int]:
    """For each canonical event, how far behind its patient's event-time clock (the greatest
    effective_ms published before it for that patient) it came: what the worker's lateness rule sees."""
    behind = []
    for events in by_patient.values():
        clock = None
        for e in events:
            behind.append(0 if clock is None else max(0, clock - e.effective_ms))
            clock = e.effective_ms if clock is None else max(clock, e.effective_ms)
    return behind


def _assert_every_message_once(settings, worker, raw, by_patient, dead):
    snap = worker.counters.snapshot()["cdc"]
    assert snap["messages_in"] == len(raw) and worker.counters.balanced()  # each raw message counted once
    assert snap["dead_lettered"] == {"malformed_json": 1} and snap["control"] == {"tombstone": 1}
    expected, _ = _expected_events(settings, raw)
    published = Counter(e.event_id for events in by_patient.values() for e in events)
    assert published == expected  # nothing lost, nothing twice
    assert len(dead) == 1 and dead[0].value() == raw_file("cdc", "malformed.txt")  # one dead letter, not one per holding back
    committed = _committed_counts(settings, topics_for(settings))
    assert committed == dict(Counter(topic for topic, _, _ in raw))  # commits cover exactly what was published


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_backlog_across_raw_topics_comes_out_in_event_time_order_within_the_skew(settings):
    """Three days of four patients' vital signs (8,640 rows) and lab results (72) waiting when the
    ingest starts: the labs topic fits in one fetch, the vitals take many. Aligned, no patient's event
    is published more than max_skew (+ one raw message's own event-time span) behind an event of that
    patient already published: downstream (12 h allowed lateness) none is late."""
    max_skew_s = 3600
    worker, raw, by_patient, dead, elapsed = _run_backlog(settings, max_skew_s)
    _assert_every_message_once(settings, worker, raw, by_patient, dead)
    _, span = _expected_events(settings, raw)
    behind = _behind_ms(by_patient)
    print(f"aligned: {len(raw)} raw messages in {elapsed:.1f} s, worst {max(behind) / HOUR_MS:.2f} h behind, "
          f"{worker.aligner.counters}")
    assert max(behind) <= max_skew_s * 1000 + span
    assert worker.aligner.counters.pauses > 0  # the labs did run ahead: the bound was what kept them back
    assert not worker.aligner.paused  # nothing left waiting
    # what alignment cost is on the stats topic with the counters (`wardwatch stats`)
    assert worker.stats_snapshot()["alignment"] == dataclasses.asdict(worker.aligner.counters)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_same_backlog_without_alignment_comes_out_days_out_of_order(settings):
    """The control of the test above: with alignment off, the labs are published days ahead of the
    vitals, which then come far behind their patients' clocks (downstream: late, unscored)."""
    worker, raw, by_patient, dead, elapsed = _run_backlog(settings, None)
    _assert_every_message_once(settings, worker, raw, by_patient, dead)
    behind = _behind_ms(by_patient)
    late = sum(b > settings.allowed_lateness_s * 1000 for b in behind)
    print(f"unaligned: {len(raw)} raw messages in {elapsed:.1f} s, worst {max(behind) / HOUR_MS:.2f} h behind, "
          f"{late} of {len(behind)} events beyond the allowed lateness")
    assert worker.aligner is None and "alignment" not in worker.stats_snapshot()
    assert max(behind) > settings.allowed_lateness_s * 1000 and late > 0


def _aligned_backlog(settings):
    """The backlog produced, an ingest worker aligning it to 1 h of skew, and a reader of its outputs."""
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    raw = _backlog(settings, topics)
    _produce(settings, raw)
    worker = IngestWorker(settings.model_copy(update={"ingest_max_skew_s": 3600}), topics)
    return topics, raw, worker, _reader(settings, topics)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_partition_paused_by_alignment_is_read_again_after_a_rebalance(settings):
    """librdkafka keeps a partition's pause() through a rebalance that hands it back to the same
    consumer, while the aligner starts it afresh, unpaused: nothing would ever resume it. With a
    broker slow enough to miss the 6 s session timeout (a 1000-patient `batch dataset` replay), the
    ingest then stopped applying anything with its raw partitions still full, until its watchdog exited."""
    topics, raw, worker, reader = _aligned_backlog(settings)
    by_patient, dead, read_events = defaultdict(list), [], 0

    def read() -> None:
        nonlocal read_events
        for msg in reader.consume(num_messages=1000, timeout=0.05):
            assert msg.error() is None, msg.error()
            if msg.topic() == topics.canonical:
                events = decode_batch(msg.value())
                by_patient[msg.key().decode()] += events
                read_events += len(events)
            else:
                dead.append(msg)

    deadline = time.monotonic() + DEADLINE_S
    other = None
    try:
        while not worker.aligner.paused:  # the labs run ahead of the vitals and are held back
            assert time.monotonic() < deadline, "alignment never paused a partition"
            worker.poll_once()
        # a second member joins and leaves: two rebalances hand the ingest every partition back. Meanwhile
        # its consumer is only served (what it returns is dropped: never committed, so read again after
        # the reassignment), so the aligner cannot resume the labs first
        all_raw = len(topics.raw) * topics.partitions
        other = Consumer(consumer_config(settings))
        other.subscribe(topics.raw)
        while not other.assignment():
            assert time.monotonic() < deadline, "the second member got no partition"
            worker._consumer.consume(num_messages=100, timeout=0.05)
            other.consume(num_messages=1, timeout=0.05)
        other.close()
        other = None
        while len(worker._consumer.assignment()) < all_raw:
            assert time.monotonic() < deadline, "the ingest did not get its partitions back"
            worker._consumer.consume(num_messages=100, timeout=0.05)
        # what was dropped above from a partition the ingest kept through both rebalances is past its
        # position: back to the committed offsets, as a reassignment would have it
        for tp in worker._consumer.committed(list(worker._consumer.assignment()), timeout=10):
            worker._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
        while True:
            snap = worker.counters.snapshot()["cdc"]
            if (snap["messages_in"] == len(raw) and read_events == snap["events_out"]
                    and len(dead) == sum(snap["dead_lettered"].values())):
                break
            assert time.monotonic() < deadline, f"the ingest stopped with raw messages waiting: {snap}"
            worker.poll_once()
            read()
    finally:
        if other is not None:
            other.close()
        worker.close()
        reader.close()
    expected, _ = _expected_events(settings, raw)
    assert set(e.event_id for events in by_patient.values() for e in events) == set(expected)  # nothing lost
    assert not worker.aligner.paused


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_member_joining_and_leaving_while_messages_are_held_back_loses_none_of_them(settings, monkeypatch):
    """Twice in a backlog, while alignment holds messages back in memory, a second member joins and
    leaves: each time the ingest's partitions are revoked and handed back inside its own consume().
    The held messages were freed there while their parse stayed keyed by id(): the next messages read,
    reusing those addresses, were published as the held ones (a vital signs row lost, a lab twice) and
    committed (9 of 69,192 events lost in a run). Every event must come out, no commit may pass an
    offset not published, and each raw partition is published in offset order (after a rebalance it
    may start again from its committed offset: at least once)."""
    topics, raw, worker, reader = _aligned_backlog(settings)
    by_patient, dead = defaultdict(list), []
    published: dict[tuple[str, int], list[int]] = defaultdict(list)  # raw offsets, in publish order
    passed: list[tuple[tuple[str, int], int]] = []  # commits beyond an unpublished offset

    publish = worker._publish

    def recording_publish(records):
        for msg in records:
            published[(msg.topic(), msg.partition())].append(msg.offset())
        return publish(records)

    commit = ingest.commit_offsets

    def checked_commit(consumer, offsets, log, **kwargs):
        for tp, offset in offsets.items():
            if set(range(offset)) - set(published[tp]):
                passed.append((tp, offset))
        return commit(consumer, offsets, log, **kwargs)

    monkeypatch.setattr(worker, "_publish", recording_publish)
    monkeypatch.setattr(ingest, "commit_offsets", checked_commit)

    def read(timeout_s: float) -> int:
        messages = reader.consume(num_messages=1000, timeout=timeout_s)
        for msg in messages:
            assert msg.error() is None, msg.error()
            if msg.topic() == topics.canonical:
                by_patient[msg.key().decode()] += decode_batch(msg.value())
            else:
                dead.append(msg)
        return len(messages)

    def poll() -> None:
        worker.poll_once()
        read(0.01)

    deadline = time.monotonic() + DEADLINE_S
    all_raw = len(topics.raw) * topics.partitions
    expected, _ = _expected_events(settings, raw)

    def missing() -> set[str]:
        return set(expected) - {e.event_id for events in by_patient.values() for e in events}

    try:
        for _ in range(2):
            while not worker._held:  # messages held back in memory (not only sought back)
                assert time.monotonic() < deadline, "alignment never held a message back"
                poll()
            other = Consumer(consumer_config(settings))
            try:
                other.subscribe(topics.raw)
                while not other.assignment():  # the ingest's own polls serve its revoke and assign
                    assert time.monotonic() < deadline, "the second member got no partition"
                    poll()
                    other.consume(num_messages=1, timeout=0.01)  # never committed: the ingest reads it again
            finally:
                other.close()
            while len(worker._consumer.assignment()) < all_raw:
                assert time.monotonic() < deadline, "the ingest did not get its partitions back"
                poll()
        end = dict(Counter(topic for topic, _, _ in raw))
        while _committed_counts(settings, topics) != end or worker.aligner.paused:
            assert time.monotonic() < deadline, f"the ingest stopped with raw messages waiting: {worker.counters.snapshot()}"
            for _ in range(20):
                poll()
        worker.close()
        worker = None
        quiet_until = time.monotonic() + 2  # the rest of the outputs: until all read, or 2 s without any
        while (missing() or not dead) and time.monotonic() < quiet_until:
            if read(0.2):
                quiet_until = time.monotonic() + 2
    finally:
        if worker is not None:  # failed before its close
            worker.close()
        reader.close()
    assert not missing(), f"{len(missing())} of {len(expected)} events never published"
    assert any(d.value() == raw_file("cdc", "malformed.txt") for d in dead)
    assert not passed, f"committed past unpublished offsets: {passed[:3]}"
    for tp, offsets in published.items():  # in order: the next offset, or back to the committed one
        assert offsets[0] == 0, tp
        assert all(b == a + 1 or b <= a for a, b in zip(offsets, offsets[1:])), tp


def _lab_ahead(offset, hours):
    """A creatinine result of MRN-0002 collected `hours` after the bare vitals' measurement."""
    lab = json.loads(cdc_message("lab_creatinine_umol_bare").value)
    ahead_us = lab["after"]["collected_at"] + hours * HOUR_MS * 1000
    lab["after"].update(collected_at=ahead_us, resulted_at=ahead_us)
    lab["source"].update(ts_ms=ahead_us // 1000)
    topic = cdc_message("lab_creatinine_umol_bare").topic
    return FakeMessage(topic, b'{"patient_id": "MRN-0002"}', json.dumps(lab).encode(), offset=offset)


@pytest.mark.timeout(30)
def test_a_partition_ahead_in_event_time_is_paused_and_its_messages_are_published_once_at_the_resume(
        fake_worker, monkeypatch):
    """The held-back messages stay in memory: librdkafka resumes a paused partition after the last message
    it delivered, so nothing of them is read again (no seek) and nothing is lost, even a message that
    arrives while its partition is paused."""
    now = [1000.0]
    monkeypatch.setattr(ingest.time, "monotonic", lambda: now[0])
    vitals = _cdc("create_bare", 0)  # measured 2024-06-15T14:06Z
    held = _lab_ahead(0, 8)  # beyond the default max skew (6 h: half of 12 h)
    lab_topic = held.topic()
    malformed = FakeMessage(lab_topic, b'{"patient_id": "MRN-0002"}', raw_file("cdc", "malformed.txt"), offset=1)
    worker, fake = fake_worker([held, malformed, vitals])

    assert worker.poll_once() == 1  # only the vitals: the labs are 8 h ahead of them
    assert fake.calls == [("pause", [(lab_topic, 0)]), ("flush",), ("commit", {(vitals.topic(), 0): 1})]
    assert fake.on(worker.topics.deadletter) == []  # the malformed lab is dead-lettered once, when published
    assert worker.counters.snapshot()["cdc"]["messages_in"] == 1 and worker.counters.balanced()
    assert worker.aligner.paused == {(lab_topic, 0)}

    fake.calls.clear()
    fake.batch = [_lab_ahead(2, 9)]  # fetched before the pause took effect: kept behind the other two
    assert worker.poll_once() == 0 and fake.calls == []

    now[0] += worker.settings.ingest_idle_s  # the vitals went quiet: they hold the labs back no longer
    assert worker.poll_once() == 3
    assert fake.calls == [("resume", [(lab_topic, 0)]), ("flush",), ("commit", {(lab_topic, 0): 3})]
    published = [e for m in fake.on(worker.topics.canonical) for e in decode_batch(m.value())]
    labs = [e.effective_ms for e in published if e.patient_id == "MRN-0002" and e.code_system == "http://loinc.org"
            and e.source is Source.CDC and e.effective_ms > _events(vitals)[0].effective_ms]
    assert labs == [e.effective_ms for e in _events(held) + _events(_lab_ahead(2, 9))]  # each once, in order
    assert len(fake.on(worker.topics.deadletter)) == 1
    assert worker.counters.snapshot()["cdc"]["messages_in"] == 4 and worker.counters.balanced()
    assert not worker.aligner.paused


def test_more_held_back_messages_than_a_batch_are_read_again_instead_of_kept(fake_worker, monkeypatch):
    """Memory stays bounded: a paused partition keeps at most a batch of messages; beyond, it is sought
    back to its first held-back one and fetched again at the resume."""
    now = [1000.0]
    monkeypatch.setattr(ingest.time, "monotonic", lambda: now[0])
    vitals = _cdc("create_bare", 0)
    labs = [_lab_ahead(0, 8), _lab_ahead(1, 9)]
    worker, fake = fake_worker([*labs, vitals], settings=FAKE_SETTINGS.model_copy(update={"ingest_batch_size": 1}))

    assert worker.poll_once() == 1
    assert fake.calls[:2] == [("pause", [(labs[0].topic(), 0)]), ("seek", (labs[0].topic(), 0, 0))]
    now[0] += worker.settings.ingest_idle_s
    fake.calls.clear()
    fake.batch = [_lab_ahead(0, 8)]  # the seek: fetched again from the first held-back one
    assert worker.poll_once() == 1
    assert fake.calls == [("resume", [(labs[0].topic(), 0)]), ("flush",), ("commit", {(labs[0].topic(), 0): 1})]


def test_held_back_messages_of_a_revoked_partition_are_dropped_and_read_from_the_committed_offset(fake_worker):
    """A partition revoked while paused is read from its committed offset by whoever gets it, this
    worker too: what was held of it must not be published besides (twice) or keep it paused."""
    vitals = _cdc("create_bare", 0)
    held = _lab_ahead(0, 8)
    tp = TopicPartition(held.topic(), 0)
    worker, fake = fake_worker([held, vitals])
    assert worker.poll_once() == 1 and worker.aligner.paused == {(held.topic(), 0)}

    fake.on_revoke(fake, [tp, TopicPartition(vitals.topic(), 0)])
    fake.on_assign(fake, [tp])  # handed back: librdkafka fetches it from the committed offset (0)
    fake.batch = [_lab_ahead(0, 8)]
    assert worker.poll_once() == 1
    labs = [m for m in fake.on(worker.topics.canonical) if m.key() == b"MRN-0002"
            and any(e.effective_ms > _events(vitals)[0].effective_ms for e in decode_batch(m.value()))]
    assert len(labs) == 1 and not worker.aligner.paused


@pytest.mark.timeout(30)
def test_an_admission_booked_ahead_does_not_pause_its_partition_and_the_discharges_behind_it(fake_worker):
    """An encounter row created today for an admission in two days: its context facts are dated then,
    but known now. Held at their own time, in a backlog the encounters partition would stay paused
    until the vitals had been read to their end, and every admission, transfer and discharge behind it
    with it."""
    vitals = _cdc("create_bare", 0)  # measured 2024-06-15T14:06Z; its partition has more to read
    booked_msg = cdc_messages("encounter_lifecycle")[0]  # created 2024-06-15T12:55Z
    booked = json.loads(booked_msg.value)
    planned_us = booked["payload"]["after"]["admitted_at"] + 48 * HOUR_MS * 1000
    booked["payload"]["after"].update(encounter_id="ENC-BOOKED", admitted_at=planned_us, updated_at=planned_us)
    booking = FakeMessage(booked_msg.topic, booked_msg.key, json.dumps(booked).encode(), offset=0)
    behind = FakeMessage(booked_msg.topic, booked_msg.key, booked_msg.value, offset=1)  # an admission at 12:54Z
    worker, fake = fake_worker([booking, behind, vitals])

    assert worker.poll_once() == 3
    assert not worker.aligner.paused and not [c for c in fake.calls if c[0] in ("pause", "seek")]
    published = [e for m in fake.on(worker.topics.canonical) for e in decode_batch(m.value())]
    assert [e.encounter_id for e in published if e.code == "admission"] == ["ENC-BOOKED", "ENC-0001"]


@pytest.mark.timeout(30)
def test_commits_go_out_at_most_once_per_interval_and_the_rest_when_idle_or_revoked(fake_worker, monkeypatch):
    """Each commit is a broker request: one per batch was hundreds a second at 1k msg/s."""
    now = [1000.0]
    monkeypatch.setattr(ingest.time, "monotonic", lambda: now[0])
    first = _cdc("create_bare", 0)
    tp = (first.topic(), 0)
    worker, fake = fake_worker([first])
    interval = worker.settings.commit_interval_s

    worker.poll_once()
    assert fake.calls[-1] == ("commit", {tp: 1})  # the first batch commits at once

    fake.calls.clear()
    fake.batch, now[0] = [_cdc("create_bare", 1)], now[0] + interval / 2
    worker.poll_once()
    assert fake.calls == [("flush",)]  # published and acknowledged, commit deferred
    worker.poll_once()  # idle, the interval not over yet
    assert fake.calls == [("flush",)]
    now[0] += interval
    worker.poll_once()  # idle and due: what was deferred goes out
    assert fake.calls == [("flush",), ("commit", {tp: 2})]

    fake.calls.clear()
    fake.batch, now[0] = [_cdc("create_bare", 2)], now[0] + interval / 10
    worker.poll_once()
    fake.on_revoke(fake, [TopicPartition(*tp)])  # the partition goes to another ingest
    assert fake.calls == [("flush",), ("commit", {tp: 3})]  # committed while still ours
    worker.close()  # and never again: that would move the next owner's committed offset back
    assert ("commit", {tp: 3}) not in fake.calls[2:]


@pytest.mark.timeout(30)
def test_a_revoke_commits_what_an_asynchronous_commit_lost_to_the_rebalance_did_not(fake_worker, monkeypatch):
    """The batch's asynchronous commit failed with REBALANCE_IN_PROGRESS (only logged); the revoke then
    committed nothing, as nothing was left uncommitted: the next owner read the batch again, and the
    summed counters counted its messages twice (messages_in above what was published)."""
    monkeypatch.setattr(ingest.time, "monotonic", lambda: 1000.0)
    first = _cdc("create_bare", 0)
    tp = (first.topic(), 0)
    worker, fake = fake_worker([first])
    worker.poll_once()
    assert fake.calls[-1] == ("commit", {tp: 1})  # sent asynchronously...
    worker._commits(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [TopicPartition(*tp, 1)])  # ...and lost

    fake.calls.clear()
    fake.on_revoke(fake, [TopicPartition(*tp)])
    assert fake.calls == [("commit", {tp: 1})]  # committed while still ours


def test_a_stop_whose_last_commit_failed_on_a_partition_raises_and_still_closes(fake_worker):
    worker, fake = fake_worker([_cdc("create_bare", 0)])
    worker.poll_once()
    fake.commit_errors = {0: KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)}
    with pytest.raises(KafkaException):
        worker.close()  # not a clean stop: those records are re-read after the restart
    assert fake.calls[-1] == ("close",)


def test_a_revoke_whose_commit_failed_stops_the_worker_and_close_never_commits_those_partitions(
        fake_worker, monkeypatch):
    monkeypatch.setattr(ingest.time, "monotonic", lambda: 1000.0)  # the commit interval never runs out
    first = _cdc("create_bare", 0)
    tp = (first.topic(), 0)
    worker, fake = fake_worker([first])
    worker.poll_once()  # the first batch commits at once
    fake.batch = [_cdc("create_bare", 1)]
    worker.poll_once()  # this one waits for the commit interval
    fake.commit_errors = {0: KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)}
    with pytest.raises(KafkaException):
        fake.on_revoke(fake, [TopicPartition(*tp)])
    fake.commit_errors = {}
    worker.close()  # the partition may be another ingest's by now: committing it would move its offset back
    assert [c for c in fake.calls if c[0] == "commit"] == [("commit", {tp: 1}), ("commit", {tp: 2})]


def test_a_max_skew_at_or_beyond_the_allowed_lateness_is_refused_at_start(monkeypatch):
    fake = FakeBroker([])
    monkeypatch.setattr(ingest, "Consumer", lambda conf: fake)
    monkeypatch.setattr(ingest, "Producer", lambda conf: fake)
    too_wide = FAKE_SETTINGS.model_copy(update={"ingest_max_skew_s": 12 * 3600, "allowed_lateness_s": 12 * 3600})
    with pytest.raises(ValueError, match="INGEST_MAX_SKEW_S"):
        IngestWorker(too_wide, topics_for(too_wide))
    off = too_wide.model_copy(update={"ingest_max_skew_s": 0})  # alignment off: nothing to check
    assert IngestWorker(off, topics_for(off)).aligner is None
    # unset, the bound follows the allowed lateness: half of it
    short = FAKE_SETTINGS.model_copy(update={"allowed_lateness_s": 3600})
    assert IngestWorker(short, topics_for(short)).aligner.max_skew_ms == 1800 * 1000
