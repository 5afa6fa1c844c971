"""The ingest worker: accounting and routing without a broker, then end to end through the real one."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas.canonical import Source, Status, decode_batch
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.fhir import parse_notification
from streams.ingest import PRODUCED_NS_HEADER, IngestCounters, IngestWorker, group_by_patient, group_id
from streams.topics import ensure_topics, topics_for
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


def test_group_by_patient_keeps_arrival_order_within_each_patient():
    a = parse_cdc(*_fields(cdc_message("create_schema_wrapped")), partition=0, offset=0, cdc_topic_prefix=CDC_PREFIX)
    b = parse_cdc(*_fields(cdc_message("create_bare")), partition=0, offset=1, cdc_topic_prefix=CDC_PREFIX)
    interleaved = [e for pair in zip(a.events, b.events) for e in pair]
    groups = group_by_patient(interleaved)
    assert groups == {"MRN-0001": a.events, "MRN-0002": b.events}


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

