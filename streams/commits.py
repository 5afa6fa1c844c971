"""Committing consumer offsets when a rebalance may already have taken the partitions away.

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


def commit_offsets(consumer, offsets: dict[tuple[str, int], int], log: logging.Logger) -> bool:
    """Commit `offsets` ((topic, partition) -> next offset) synchronously; False when a rebalance
    took them (the records will be re-read elsewhere)."""
    if not offsets:
        return True
    try:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())],
                        asynchronous=False)
        return True
    except KafkaException as exc:
        if exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].code() in REBALANCE_ERRORS:
            log.warning("commit lost to a rebalance; those records will be re-read: %s", exc.args[0].name())
            return False
        raise
