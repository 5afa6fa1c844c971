"""The ingest worker: accounting and routing without a broker, then end to end through the real one."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter, defaultdict

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from schemas.canonical import Source, Status, decode_batch, encode_batch
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.fhir import parse_notification
from streams import ingest
from streams.ingest import PRODUCED_NS_HEADER, IngestCounters, IngestWorker, group_id
from streams.topics import ensure_topics, topics_for
from wardwatch.settings import Settings
from tests.fixtures.ingest.corpus import CDC_PREFIX, cdc_message, cdc_messages, fhir_bundle, raw_file

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
    def __init__(self, topic, key, value, *, partition=0, offset=0, headers=None):
        self._topic, self._key, self._value = topic, key, value
        self._partition, self._offset, self._headers = partition, offset, headers

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

    def subscribe(self, topics):
        pass

    def consume(self, num_messages, timeout):
        batch, self.batch = self.batch, []
        return batch

    def commit(self, offsets, asynchronous):
        self.calls.append(("commit", {(tp.topic, tp.partition): tp.offset for tp in offsets}))

    def produce(self, topic, value, key, headers, on_delivery):
        self.pending.append((on_delivery, FakeMessage(topic, key, value, headers=headers)))

    def poll(self, timeout):
        return 0

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

    def make(batch, delivery_error=None):
        fake = FakeBroker(batch, delivery_error)
        monkeypatch.setattr(ingest, "Consumer", lambda conf: fake)
        monkeypatch.setattr(ingest, "Producer", lambda conf: fake)
        return IngestWorker(FAKE_SETTINGS, topics_for(FAKE_SETTINGS)), fake

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


def test_an_lsn_wider_than_int64_is_dead_lettered_by_the_parser(fake_worker):
    doc = json.loads(cdc_message("create_bare").value)
    doc["source"]["lsn"] = "123456789012345678901234567890"
    poison = _cdc("create_bare", 0, value=json.dumps(doc).encode())
    worker, fake = fake_worker([poison])
    assert worker.poll_once() == 1
    (dead,) = fake.on(worker.topics.deadletter)
    assert dict(dead.headers())["ww.reason"] == Reason.BAD_VALUE.value.encode()
    assert dead.value() == poison.value()


def test_a_message_whose_events_cannot_be_encoded_is_dead_lettered_not_fatal(fake_worker, monkeypatch):
    # defence in depth: if a parser ever lets through an event no JSON encoder writes (here a value
    # wider than 64 bits), it must not stop the worker on every restart
    poison = _cdc("create_bare", 0)
    good = _cdc("create_schema_wrapped", 1)
    worker, fake = fake_worker([poison, good])
    topics = worker.topics
    real_parse = worker.parse

    def parse(msg):
        source, outcome = real_parse(msg)
        if msg is poison:
            outcome = ingest.Parsed([dataclasses.replace(outcome.events[0], value=2**70)])
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
    # by hand: 8 + 8 events (two creates) + 8 retractions (delete) + 6 (FHIR vitals bundle)
    expected_events, expected_dead = 30, 4  # heart rate 5000, malformed CDC, negative SpO2, invalid UTF-8

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
    assert {p: len(e) for p, e in events_by_patient.items()} == {"MRN-0001": 14, "MRN-0002": 16}
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
