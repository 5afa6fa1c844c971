"""At-least-once plumbing shared by the confluent-kafka services: producing with every delivery
checked before a commit, and committing consumer offsets when a rebalance may already have taken
the partitions away.

A synchronous commit after the group moved on (the broker paused past the session timeout, a slow
batch) fails with one of REBALANCE_ERRORS. That is not data loss: the uncommitted records are read
again by whoever owns the partitions now, and every wardwatch output is idempotent by id. So those
errors are logged and swallowed; anything else is raised.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, TopicPartition

REBALANCE_ERRORS = {KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
                    KafkaError.REBALANCE_IN_PROGRESS, KafkaError._NO_OFFSET}


def commit_offsets(consumer, offsets: dict[tuple[str, int], int], log: logging.Logger, *,
                   asynchronous: bool = False) -> bool:
    """Commit `offsets` ((topic, partition) -> next offset); False when a rebalance took any of them
    (those records will be re-read elsewhere); any other failure, of even one partition, raises.
    asynchronous: send the commit and return at once; its result reaches the consumer's `on_commit`
    callback (see CommitResults)."""
    if not offsets:
        return True
    try:
        results = consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())],
                                  asynchronous=asynchronous)
    except KafkaException as exc:  # every partition failed
        errors = [kafka_error(exc)]
    else:  # librdkafka raises only when every partition failed: the others report one by one (asynchronous: None)
        errors = [tp.error for tp in results or () if tp.error is not None]
    for error in errors:
        if error is None or error.code() not in REBALANCE_ERRORS:
            raise KafkaException(error) if error is not None else KafkaException("commit failed")
    if errors:
        log.warning("commit lost to a rebalance; those records will be re-read: %s", errors[0].name())
        return False
    return True


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a confluent-kafka exception carries, if any (its code says what to do)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


class CommitResults:
    """The `on_commit` callback for asynchronous commits, and what it saw.

    A commit lost to a rebalance is logged (the records are re-read elsewhere); any other failure is
    kept and raised by raise_failure(), which the service calls before its next batch: it stops
    instead of running on with offsets it cannot commit."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.failure: KafkaError | None = None

    def __call__(self, err, partitions) -> None:
        errors = [err] if err is not None else [tp.error for tp in partitions or () if tp.error is not None]
        for error in errors:
            if error.code() in REBALANCE_ERRORS:
                self.log.warning("commit lost to a rebalance; those records will be re-read: %s", error.name())
            elif self.failure is None:
                self.failure = error

    def raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise KafkaException(failure)


class AckedProducer:
    """A producer whose writes are all acknowledged, or an error raised, before the caller commits:
    produce() waits out a full local queue; flush_or_raise() waits for every delivery and raises if
    any failed (the caller then does not commit, so its input is re-read after the restart)."""

    def __init__(self, producer, name: str):
        self.producer = producer
        self.name = name
        self._errors: list[str] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list | None = None,
                partition: int | None = None) -> None:
        """partition None: the producer's partitioner picks it from the key."""
        where = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=self._on_delivery,
                                      **where)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.1)

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def flush_or_raise(self, timeout_s: float = 30.0) -> None:
        remaining = self.producer.flush(timeout_s)
        if self._errors or remaining:
            errors, self._errors = self._errors[:3], []
            raise KafkaException(f"{self.name} produce failed ({remaining} unacknowledged): {errors}")


def skip_consumer_error(msg, log: logging.Logger) -> bool:
    """True when `msg` is an error event rather than a record: fatal client errors raise (the
    service stops and is restarted), partition EOF is silent, anything else is logged (the client
    retries by itself)."""
    err = msg.error()
    if err is None:
        return False
    if err.fatal():
        raise KafkaException(err)
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error (retrying): %s", err)
    return True
