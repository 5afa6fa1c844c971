"""The subscription watcher (`wardwatch subscriptions`): gaps and missed heartbeats per FHIR subscription.

Event notifications are keyed by patient (streams/receiver.py; heartbeats and handshakes by subscription), so
one subscription's notifications spread over every partition and no per-partition ingest worker can see its
gaps. This one small service reads them all:

    <prefix>.fhir.notifications   every partition, assigned (one instance); offsets committed under
        |                         group <group_prefix>-subscriptions
        |  schemas.fhir.read_status: the status entry only (resources are the ingest worker's job)
        |  streams.subscriptions.SubscriptionTracker: dedupe, gaps after a grace, missed heartbeats
        v
    <prefix>.fhir.gaps                 key: subscription  value: gap / heartbeat-missed record (JSON)
    <prefix>.fhir.subscription-state   (compacted) key: subscription  value: SubscriptionState JSON
        |  flush (every ack), then commit the offsets
        v
    a SIGKILL before the commit re-reads the batch from the state saved with the previous one: the
    re-read numbers count as duplicates and any record is republished identically (deterministic id)

Gaps and missed heartbeats come due against a catch-up clock (streams.subscriptions.CatchUpClock): while
a backlog is read (after an outage), the arrival time up to which *every* partition has been read, a
partition at its end (the consumer's partition-EOF events) not holding it back; once all are at their
end, the watcher's own clock. The consumer hands a backlog over a partition at a time, so the newest
arrival read alone would race ahead and report numbers, and channels, still waiting on a partition not
read yet. A partition that delivers neither a message nor its end for one heartbeat-missed timeout
(no leader, a persistent fetch error) stops holding the clock back, with a warning: a stuck partition
must not silence the alarms. The stats say whether the watcher is caught up and how many partitions
are stalled: gauges, like the open gaps and the subscriptions tracked (streams/stats.py never sums
them); the per-kind counts restored with the state are published as what this instance counted.

On start the state topic is read to its true end (a marker is written to each partition and read
back: end-offset queries can answer too low on some brokers) before any notification is consumed.
Unreadable notifications are counted, not dead-lettered: the ingest worker dead-letters them.

Recovery (`wardwatch subscriptions recover`, `recover_gaps`): for each reported gap still open in the
saved state, ask the FHIR server for the missing notifications with the `$events` operation and
republish its answer (a query-event Bundle) to the notifications topic: the ingest worker turns it into
canonical events (dedupe makes a repeat harmless) and the watcher sees the gap fill (late_fills). An
answer without some of the gap's numbers (a server capping the range, or keeping events only so long) says
which are still missing; one without any is not republished. Once a `$events` read failed every retry,
the client's unavailable pause skips the remaining gaps: their results say to run recover again once the
server answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException,
                             Message, Producer, TopicPartition)

from schemas.fhir import read_status, relative_reference
from streams.commits import AckedProducer, skip_consumer_error
from streams.fhir_fetch import FetchError, FhirClient, Paused
from streams.stats import StatsPublisher
from streams.subscriptions import CatchUpClock, SubscriptionState, SubscriptionTracker
from streams.topics import Topics, ensure_topics, topics_for
from streams.watchdog import watching
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

RESTORE_MARKER = b"__wardwatch_restore_marker__"  # a tombstone key: compaction removes it
RECORD_ID_HEADER = "ww.record.id"


def group_id(settings: Settings) -> str:
    return f"{settings.group_prefix}-subscriptions"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SubscriptionWatcher:
    def __init__(self, settings: Settings, topics: Topics, *, poll_timeout_s: float = 0.1,
                 wall_clock_ms: Callable[[], int] = _wall_ms, batch_size: int = 500):
        self.settings, self.topics = settings, topics
        self.poll_timeout_s, self.batch_size = poll_timeout_s, batch_size
        self._wall_ms = wall_clock_ms
        self.messages = 0
        self.unreadable = 0
        self._producer = Producer({**settings.kafka_client_config(), "acks": "all",
                                   "partitioner": "murmur2_random"})  # same key -> partition as Java clients
        self._acked = AckedProducer(self._producer, "subscription watcher")
        self.tracker = SubscriptionTracker(
            grace_ms=int(settings.fhir_gap_grace_s * 1000),
            heartbeat_period_ms=int(settings.fhir_heartbeat_period_s * 1000),
            missed_periods=settings.fhir_heartbeat_missed_periods,
            states=restore_states(settings, topics, self._producer),
            read_to_ms=0,  # nothing read yet: no gap is reported before the clock moves
        )
        self._consumer = Consumer({
            **settings.kafka_client_config(), "group.id": group_id(settings), "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # the catch-up clock needs to know when a partition is read to its end
            "fetch.wait.max.ms": 10,  # Tansu answers a fetch only when this expires
        })
        start = self._start_positions()
        # a partition stuck this long would delay a missed-heartbeat alarm by as much again: release it
        self.clock = CatchUpClock([tp.partition for tp in start], stall_ms=self.tracker.heartbeat_timeout_ms)
        self._consumer.assign(start)
        self.partitions = frozenset((tp.topic, tp.partition) for tp in start)  # all of them, for its watchdog
        self.stats = StatsPublisher("subscriptions", self.snapshot, self._producer, topics.stats,
                                    gauges=self.gauges, interval_s=settings.stats_interval_s)

    def run(self, stop: threading.Event) -> None:
        log.info("subscription watcher started: %d subscriptions restored", len(self.tracker.states))
        try:
            while not stop.is_set():
                self.poll_once()
                self.stats.maybe_publish()
        finally:
            self.close()
        log.info("subscription watcher stopped: %s %s", self.snapshot(), self.gauges())

    def poll_once(self) -> int:
        """Consume a batch, track it, publish records and state, flush, commit. Returns messages consumed."""
        messages: list[Message] = []
        records: list[dict[str, Any]] = []
        changed: set[str] = set()
        for msg in self._consumer.consume(self.batch_size, timeout=self.poll_timeout_s):
            if self._is_partition_end(msg):  # in order: a partition's end follows its last message
                self.clock.reached_end(msg.partition())
                continue
            if self._is_error(msg):
                continue
            messages.append(msg)
            self.messages += 1
            arrival_ms = self._arrival_ms(msg)
            self.clock.read(msg.partition(), arrival_ms)
            status = read_status(msg.value())
            if status is None:
                self.unreadable += 1
                continue
            records += self.tracker.observe(status, arrival_ms)
            if status.subscription:
                changed.add(status.subscription)
        # gaps held back and missed heartbeats: as of the time up to which every partition has been
        # read (the watcher's own clock once caught up), not the newest arrival on the partition read first
        stalled_before = self.clock.stalled
        due = self.tracker.advance(self.clock.now_ms(self._wall_ms()))
        self._log_stalls(stalled_before)
        records += due
        changed |= {r["subscription"] for r in due}
        if not messages and not due:
            return 0
        for record in records:
            self._produce(self.topics.gaps, record["subscription"].encode(), orjson.dumps(record),
                          [(RECORD_ID_HEADER, record["id"].encode())])
        for subscription in changed:  # the state goes out before the commit: a restart resumes from it
            state = self.tracker.states[subscription]
            self._produce(self.topics.subscription_state, subscription.encode(), orjson.dumps(state.to_dict()), [])
        self._flush()
        if messages:
            self._commit(messages)
        for record in records:
            log.warning("subscription %s: %s %s..%s", record["kind"], record["subscription"],
                        record["first_missing"], record["last_missing"])
        return len(messages)

    @property
    def caught_up(self) -> bool:
        """Every partition read to its end (the watcher's own clock is in charge)."""
        return self.clock.caught_up

    def snapshot(self) -> dict[str, Any]:
        """Counters of this instance (streams/stats.py sums them over the instances)."""
        return {"subscriptions": {"messages": self.messages, "unreadable": self.unreadable,
                                  "unattributed": self.tracker.unattributed, **self.tracker.counted_here()}}

    def gauges(self) -> dict[str, Any]:
        """Current values (never summed): subscriptions tracked, open gaps, caught_up (0/1), stalled partitions."""
        return {"subscriptions": {**self.tracker.gauges(), "caught_up": int(self.clock.caught_up),
                                  "stalled_partitions": len(self.clock.stalled)}}

    def close(self) -> None:
        try:
            self.stats.publish(final=True)
            self._producer.flush(10)
        finally:
            self._consumer.close()

    # --- wiring details ------------------------------------------------------------------------

    def _start_positions(self) -> list[TopicPartition]:
        topic = self.topics.fhir
        metadata = self._consumer.list_topics(topic, timeout=30).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise RuntimeError(f"topic {topic} does not exist: create the topics first (wardwatch creates them "
                               f"on start, or run deploy's topic init)")
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        committed = self._consumer.committed(partitions, timeout=30)
        return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                for tp in committed]

    def _log_stalls(self, before: frozenset[int]) -> None:
        for partition in sorted(self.clock.stalled - before):
            log.warning("notifications partition %d: no message and no end of partition for %.0f s; it no longer "
                        "holds back gap and heartbeat-missed checks (alarms for numbers on it may be false)",
                        partition, self.clock.stall_ms / 1000)
        for partition in sorted(before - self.clock.stalled):
            log.info("notifications partition %d: progressing again", partition)

    def _arrival_ms(self, msg: Message) -> int:
        kind, ts = msg.timestamp()
        return ts if kind != TIMESTAMP_NOT_AVAILABLE and ts > 0 else self._wall_ms()

    @staticmethod
    def _is_partition_end(msg: Message) -> bool:
        err = msg.error()
        return err is not None and err.code() == KafkaError._PARTITION_EOF

    def _is_error(self, msg: Message) -> bool:
        return skip_consumer_error(msg, log)

    def _produce(self, topic: str, key: bytes, value: bytes, headers: list) -> None:
        self._acked.produce(topic, key, value, headers)

    def _flush(self) -> None:
        self._acked.flush_or_raise()

    def _commit(self, messages: list[Message]) -> None:
        offsets: dict[int, int] = {}
        for msg in messages:
            offsets[msg.partition()] = max(offsets.get(msg.partition(), -1), msg.offset() + 1)
        self._consumer.commit(offsets=[TopicPartition(self.topics.fhir, p, o) for p, o in offsets.items()],
                              asynchronous=False)


def restore_states(settings: Settings, topics: Topics, producer: Producer,
                   timeout_s: float = 60.0) -> dict[str, SubscriptionState]:
    """The latest state per subscription from the compacted state topic, read to its true end."""
    topic = topics.subscription_state
    markers: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            markers[msg.partition()] = msg.offset()

    for partition in range(topics.partitions):
        producer.produce(topic, key=RESTORE_MARKER, value=None, partition=partition, on_delivery=delivered)
    if producer.flush(timeout_s) or errors or len(markers) != topics.partitions:
        raise KafkaException(f"could not write restore markers to {topic}: {errors[:3]}")

    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{group_id(settings)}-restore",
                         "enable.auto.commit": False, "enable.partition.eof": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in markers])
    states: dict[str, SubscriptionState] = {}
    pending = dict(markers)
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f}s")
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is not None:
                    continue
                if msg.offset() >= pending.get(msg.partition(), float("inf")):
                    pending.pop(msg.partition())
                if msg.key() == RESTORE_MARKER or msg.key() is None:
                    continue
                if msg.value() is None:  # a tombstone: the subscription's state was deleted
                    states.pop(msg.key().decode(errors="replace"), None)
                    continue
                try:
                    state = SubscriptionState.from_dict(orjson.loads(msg.value()))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("unreadable subscription state record skipped (partition %d offset %d)",
                                msg.partition(), msg.offset())
                    continue
                states[state.subscription] = state
    finally:
        consumer.close()
    return states


def run_subscription_watch(settings: Settings, stop: threading.Event) -> SubscriptionWatcher:
    """CLI entry point: create the topics, run the watcher until `stop` is set."""
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    watcher = SubscriptionWatcher(settings, topics)
    with watching(settings, "subscriptions", group_id(settings), lambda: watcher.partitions):
        watcher.run(stop)
    return watcher


def recover_gaps(settings: Settings, topics: Topics, client: FhirClient) -> list[dict[str, Any]]:
    """Republish the missing notifications of every reported, still open gap from the server's `$events`.
    Returns one result per gap: {"subscription", "first_missing", "last_missing", "republished", "error"}; an
    answer holding none of the gap's numbers is not republished, one holding only some is, and its error names
    the numbers still missing (a server may cap or trim the range: the gap stays open for the rest)."""
    producer = Producer({**settings.kafka_client_config(), "acks": "all", "partitioner": "murmur2_random"})
    results, errors = [], []
    for state in restore_states(settings, topics, producer).values():
        subscription = relative_reference(state.subscription)
        for gap in (g for g in state.gaps if g.reported):  # unreported gaps may still arrive by themselves
            result = {"subscription": state.subscription, "first_missing": gap.first, "last_missing": gap.last,
                      "republished": False, "error": None}
            results.append(result)
            if subscription is None or not subscription.startswith("Subscription/"):
                result["error"] = "the subscription is not a Subscription reference the server can be asked about"
                continue
            try:
                bundle = client.subscription_events(subscription, gap.first, gap.last)
            except Paused:  # (its detail advises the ingest's redrive, which does not ask $events again)
                result["error"] = ("$events not asked: the FHIR server failed every retry moments ago; run "
                                   "`wardwatch subscriptions recover` again once it answers")
                continue
            except FetchError as exc:
                result["error"] = exc.detail
                continue
            status = read_status(bundle)
            numbers = sorted({n for n in (status.event_numbers if status else ()) if gap.first <= n <= gap.last})
            if not numbers:  # nothing to fill the gap with (a server that keeps no events, or another answer)
                result["error"] = "the server's $events answer holds none of the missing event numbers"
                continue
            producer.produce(topics.fhir, key=state.subscription.encode(), value=bundle,
                             on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
            result["republished"] = True
            if still := _missing_ranges(gap.first, gap.last, numbers):  # a server capping or trimming the range
                result["error"] = f"the server's $events answer lacks event numbers {', '.join(still)}"
    if producer.flush(30) or errors:
        raise KafkaException(f"could not republish recovered notifications to {topics.fhir}: {errors[:3]}")
    return results


def _missing_ranges(first: int, last: int, numbers: list[int]) -> list[str]:
    """The ranges "a..b" of first..last not in `numbers` (sorted, all within first..last)."""
    ranges, expected = [], first
    for n in [*numbers, last + 1]:
        if n > expected:
            ranges.append(f"{expected}..{n - 1}")
        expected = n + 1
    return ranges
