"""streams.commits: asynchronous commits whose failures are not lost, and the ingest worker's use of
them: the commit leaves the latency path, but a failure still stops the worker and a clean stop
leaves every processed message committed."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from streams.commits import CommitResults, commit_offsets
from streams.ingest import IngestWorker
from streams.topics import ensure_topics, topics_for
from tests.fixtures.ingest.corpus import cdc_messages
from wardwatch.procs import committed_offsets

log = logging.getLogger("test")


def test_a_commit_lost_to_a_rebalance_is_logged_not_raised(caplog):
    results = CommitResults(log)
    results(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), None)
    results.raise_failure()  # nothing to raise: the records are re-read by the new owner
    assert "lost to a rebalance" in caplog.text


def test_any_other_commit_failure_is_raised_once_before_the_next_batch():
    results = CommitResults(log)
    results(KafkaError(KafkaError._AUTHENTICATION), None)
    with pytest.raises(KafkaException):
        results.raise_failure()
    results.raise_failure()  # raised once: a restarted loop does not fail on the old error


def test_a_failure_on_one_partition_counts_like_a_request_failure():
    # librdkafka reports per-partition results as TopicPartitions whose .error is read-only here
    failed = SimpleNamespace(topic="t", partition=0, offset=5, error=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    results = CommitResults(log)
    results(None, [TopicPartition("t", 1, 3), failed])
    with pytest.raises(KafkaException):
        results.raise_failure()


class PartlyFailingConsumer:
    """A synchronous commit as librdkafka answers it when only some partitions failed: no exception,
    each partition with its own .error (read-only on a real TopicPartition, hence SimpleNamespace)."""

    def __init__(self, errors: dict[int, KafkaError]):
        self.errors = errors  # partition -> its commit error

    def commit(self, offsets, asynchronous):
        return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=tp.offset,
                                error=self.errors.get(tp.partition)) for tp in offsets]


OFFSETS = {("raw", 0): 10, ("raw", 1): 20}


def test_a_sync_commit_that_failed_on_one_partition_raises():
    consumer = PartlyFailingConsumer({1: KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)})
    with pytest.raises(KafkaException):
        commit_offsets(consumer, OFFSETS, log)


def test_a_sync_commit_lost_to_a_rebalance_on_one_partition_returns_false(caplog):
    consumer = PartlyFailingConsumer({1: KafkaError(KafkaError.ILLEGAL_GENERATION)})
    assert commit_offsets(consumer, OFFSETS, log) is False
    assert "lost to a rebalance" in caplog.text


@pytest.mark.integration
def test_ingest_commits_without_waiting_and_a_clean_stop_leaves_everything_committed(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    messages = [m for name in ("create_bare", "create_schema_wrapped", "delete_full")
                for m in cdc_messages(name, prefix=settings.cdc_topic_prefix)]
    producer = Producer(settings.kafka_client_config())
    for m in messages:
        producer.produce(m.topic, key=m.key, value=m.value)
    assert producer.flush(30) == 0

    worker = IngestWorker(settings, topics)
    consumed, deadline = 0, time.monotonic() + 60
    try:
        while consumed < len(messages) and time.monotonic() < deadline:
            consumed += worker.poll_once()
        assert consumed == len(messages)
        assigned = worker._consumer.assignment()
    finally:
        worker.close()

    positions = {(tp.topic, tp.partition) for tp in assigned}
    done = committed_offsets(settings, f"{settings.group_prefix}-ingest", sorted(positions))
    assert sum(max(0, done.get(tp, 0)) for tp in positions) == len(messages)  # every consumed message committed
