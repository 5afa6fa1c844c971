"""The soak's topic mirror (wardwatch/mirror.py) on the real embedded broker: the copy is the same
stream, record for record (partition, offset, key, value, headers, timestamp), also for records
written while it runs."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from wardwatch.mirror import TopicMirror

PARTITIONS = 3


def _create(settings, *names: str) -> None:
    admin = AdminClient(settings.kafka_client_config())
    for future in admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names]).values():
        future.result(timeout=10)


def _produce(settings, topic: str, first: int, count: int) -> None:
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 2})
    for i in range(first, first + count):
        producer.produce(topic, key=f"patient-{i % 7}".encode(), value=f"batch-{i}".encode(), partition=i % PARTITIONS,
                         headers=[("ww.produced_ns", str(1000 + i).encode())], timestamp=1_700_000_000_000 + i)
    assert producer.flush(10) == 0


def _read(settings, topic: str, expected: int, deadline_s: float = 20.0) -> list[tuple]:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-check",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out, deadline = [], time.monotonic() + deadline_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            out += [(m.partition(), m.offset(), m.key(), m.value(), m.headers(), m.timestamp()[1])
                    for m in consumer.consume(500, timeout=0.1) if not m.error()]
    finally:
        consumer.close()
    return sorted(out)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_mirror_copies_a_live_topic_record_for_record(settings):
    source, target = f"{settings.topic_prefix}.src", f"{settings.topic_prefix}.dst"
    _create(settings, source, target)
    _produce(settings, source, 0, 300)  # before the mirror starts: it copies from the beginning
    mirror = TopicMirror(settings, source, target, PARTITIONS).start()
    try:
        _produce(settings, source, 300, 300)  # while it runs
        ends = {p: 200 for p in range(PARTITIONS)}
        deadline = time.monotonic() + 20
        while not mirror.caught_up(ends):
            mirror.check()
            assert time.monotonic() < deadline, f"mirror stuck at {mirror.copied}"
            time.sleep(0.05)
    finally:
        mirror.stop()
    mirror.check()

    copied, original = _read(settings, target, 600), _read(settings, source, 600)
    assert len(copied) == 600 and copied == original
    assert mirror.shifted == 0 and mirror.read == mirror.copied == ends
