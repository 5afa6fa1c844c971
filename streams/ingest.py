"""The ingest worker: raw CDC and FHIR messages -> canonical micro-batches. Stateless, at-least-once.

    raw topics (CDC per table, FHIR notifications)
        |  consume a batch (up to settings.ingest_batch_size messages)
        |  parse each: schemas.cdc / schemas.fhir -> Parsed | Rejected | Control | Ignored
        |  encode each parsed message's events (one that cannot be encoded is Rejected: INTERNAL_ERROR)
        v
    canonical   key: patient id  value: JSON array of that patient's events from this batch
    deadletter  key: original key  value: original bytes  headers: reason, stage, origin
        |  flush (wait for every ack), then commit the batch's offsets synchronously
        v
    a crash before the commit re-reads the batch: duplicates, never loss (dedupe is downstream)

Event-time alignment (streams/alignment.py): of each batch only the messages within max_skew of event
time of the slowest active raw partition are published (merged in event-time order); a partition that
ran ahead is paused from its first held-back message on until the others catch up. In a backlog
(restart after an outage, first load) the small raw topics would otherwise be read days of event time
ahead of vital signs, whose events would then all be late downstream. Held-back messages are kept in
memory (up to a batch per paused partition; beyond, it is sought back to the first) and published
first once their partition resumes: librdkafka resumes a paused partition after the last message it
delivered. They are neither counted, dead-lettered nor committed until then; a crash or a rebalance
re-reads them from the committed offset.

A plain confluent-kafka consumer-group worker rather than a faust agent: the hop is stateless, and
batching the consume and the produce is what makes it fast. Data errors are dead-lettered and
counted; broker errors (fatal client errors, failed deliveries) raise and stop the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, Producer, TopicPartition

from schemas.cdc import parse_cdc
from schemas.codes import is_context
from schemas.deadletter import VALUE_OMITTED_HEADER, Reason, Rejection, Stage, deadletter_headers
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Control, Ignored, NeedsFetch, Outcome, Parsed, Rejected, rejected
from streams.alignment import Aligner
from streams.fhir_fetch import FhirClient, resolve
from streams.gc_tuning import freeze_startup_heap
from streams.stats import StatsPublisher
from streams.commits import AckedProducer, CommitResults, commit_offsets, skip_consumer_error
from streams.topics import Topics, topics_for
from streams.watchdog import watching
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

PRODUCED_NS_HEADER = "ww.produced_ns"  # wall clock of the earliest raw produce (else ours): latency benchmarks
SOURCES = ("cdc", "fhir")
_STAGES = {"cdc": Stage.INGEST_CDC, "fhir": Stage.INGEST_FHIR}


# --- counters ------------------------------------------------------------------------------------


@dataclass
class SourceCounters:
    messages_in: int = 0
    messages_parsed: int = 0
    events_out: int = 0
    dead_lettered: Counter = field(default_factory=Counter)  # by reason
    control: Counter = field(default_factory=Counter)  # by kind
    ignored: Counter = field(default_factory=Counter)  # whole messages, by kind
    skipped: Counter = field(default_factory=Counter)  # resources inside messages left unused, by kind

    def balanced(self) -> bool:
        """Every message in is accounted for exactly once."""
        return self.messages_in == (self.messages_parsed + sum(self.dead_lettered.values())
                                    + sum(self.control.values()) + sum(self.ignored.values()))

    def snapshot(self) -> dict[str, Any]:
        return {
            "messages_in": self.messages_in, "messages_parsed": self.messages_parsed,
            "events_out": self.events_out, "dead_lettered": dict(self.dead_lettered),
            "control": dict(self.control), "ignored": dict(self.ignored), "skipped": dict(self.skipped),
        }


@dataclass
class IngestCounters:
    """Per-source counts; updated by the worker thread, read from any thread via snapshot()."""

    sources: dict[str, SourceCounters] = field(default_factory=lambda: {s: SourceCounters() for s in SOURCES})
    canonical_messages: int = 0
    batches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, source: str, outcome: Outcome) -> None:
        with self._lock:
            c = self.sources[source]
            c.messages_in += 1
            match outcome:
                case Parsed(events=events, skipped=skipped):
                    c.messages_parsed += 1
                    c.events_out += len(events)
                    c.skipped.update(skipped)
                case Rejected(rejection=rejection):
                    c.dead_lettered[rejection.reason.value] += 1
                case Control(kind=kind):
                    c.control[kind] += 1
                case Ignored(kind=kind, detail=detail):
                    c.ignored[kind] += 1
                    c.skipped.update(detail.get("skipped") or {})

    def record_batch(self, canonical_messages: int) -> None:
        with self._lock:
            self.batches += 1
            self.canonical_messages += canonical_messages

    def balanced(self) -> bool:
        with self._lock:
            return all(c.balanced() for c in self.sources.values())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**{s: c.snapshot() for s, c in self.sources.items()},
                    "canonical_messages": self.canonical_messages, "batches": self.batches}


# --- routing (pure) ------------------------------------------------------------------------------


def encode_events(parsed: Parsed) -> list[tuple[str, bytes]] | Rejected:
    """(patient, event JSON) per event, or a rejection of the whole message when an event cannot be
    written (e.g. an integer beyond 64 bits) or would not be read back: found per message, it cannot
    poison the batch. The worker decodes a canonical message whole and dead-letters it whole when one
    event does not fit (CanonicalEvent.from_dict), so an event the parsers let through with, say, a
    negative Debezium lsn as its version took the patient's valid events of the batch with it."""
    for e in parsed.events:
        if not e.fits():
            return rejected(Reason.BAD_VALUE, f"canonical event field {e.misfit()}: of the wrong type or out of "
                                              "range (e.g. a negative version)", "ValueError")
    try:
        return [(e.patient_id, e.to_json()) for e in parsed.events]
    except orjson.JSONEncodeError as exc:
        return rejected(Reason.INTERNAL_ERROR, "parsed event is not JSON-encodable", type(exc).__name__)


DEADLETTER_HEADROOM = 64 * 1024  # key and headers of a dead letter


def too_large(encoded_events: list[tuple[str, bytes]], max_bytes: int) -> Rejected | None:
    """A message whose single event could never be written as a canonical message (e.g. a huge text
    column) is dead-lettered; producing it would fail the batch on every restart."""
    biggest = max((len(event) for _, event in encoded_events), default=0)
    if biggest + 2 > max_bytes:
        return rejected(Reason.TOO_LARGE, f"an event of {biggest} bytes exceeds the canonical message limit "
                                          f"of {max_bytes} bytes")
    return None


def batch_value(encoded_events: list[bytes]) -> bytes:
    """One canonical message value from events encoded one by one: the bytes of encode_batch()."""
    return b"[" + b",".join(encoded_events) + b"]"


def batch_values(encoded_events: list[bytes], max_bytes: int) -> list[bytes]:
    """The events as few canonical message values as fit under max_bytes each, in order.

    A backlog can hold thousands of one patient's events in one poll; one message for all of them
    would exceed the broker's message size limit, and a worker that fails on it would fail again on
    every restart. An event larger than max_bytes on its own still gets its own message."""
    values: list[bytes] = []
    chunk: list[bytes] = []
    size = 2  # the brackets
    for event in encoded_events:
        if chunk and size + len(event) + 1 > max_bytes:
            values.append(batch_value(chunk))
            chunk, size = [], 2
        chunk.append(event)
        size += len(event) + 1
    if chunk:
        values.append(batch_value(chunk))
    return values


# --- the worker ----------------------------------------------------------------------------------


class IngestWorker:
    # consume() holds a batch until it is full or this runs out: it is latency on every raw message
    # (20 ms gave an ingest hop of 36 ms p50 at 1k msg/s, 5 ms gives 18 ms, at the same throughput)
    def __init__(self, settings: Settings, topics: Topics, *, poll_timeout_s: float = 0.005):
        self.settings = settings
        self.topics = topics
        self.poll_timeout_s = poll_timeout_s
        self.counters = IngestCounters()
        self._cdc_topics = set(topics.cdc.values())
        # commits are sent without waiting for the answer (a broker round trip per batch off the
        # latency path); a failure other than a rebalance stops the worker before its next batch
        self._commits = CommitResults(log)
        self._last_commit: dict[tuple[str, int], int] = {}  # every owned partition's published offset
        self._uncommitted: dict[tuple[str, int], int] = {}  # published since the last commit
        self._next_commit_at = 0.0  # monotonic; commits at most every settings.commit_interval_s
        self._consumer = Consumer({**consumer_config(settings), "on_commit": self._commits})
        self._producer = Producer(producer_config(settings))
        self._acked = AckedProducer(self._producer, "ingest")
        # id-only FHIR notifications are completed from the FHIR server; without one they are dead-lettered
        self._fhir = FhirClient(settings) if settings.fhir_server_url else None
        max_skew_s = settings.ingest_max_skew()
        if max_skew_s and max_skew_s >= settings.allowed_lateness_s:
            raise ValueError(f"WARDWATCH_INGEST_MAX_SKEW_S ({max_skew_s:g}) must stay below "
                             f"WARDWATCH_ALLOWED_LATENESS_S ({settings.allowed_lateness_s}): an event may come out "
                             "that far behind its patient's clock, and beyond the allowed lateness it is late")
        # max skew 0: no alignment (every consumed message is published at once)
        self.aligner = Aligner(int(max_skew_s * 1000), settings.ingest_idle_s) if max_skew_s else None
        # counters snapshot on the stats topic (`wardwatch stats`), sent with the next batch's flush
        self.stats = StatsPublisher("ingest", self.stats_snapshot, self._producer, topics.stats,
                                    interval_s=settings.stats_interval_s)
        # (topic, partition, offset) -> parse, this batch and a held-back partition's first message: never
        # id(msg), which a message read after a rebalance dropped the held ones may reuse (lost messages)
        self._prepared: dict[tuple[str, int, int], tuple[str, Outcome, list[tuple[str, bytes]]]] = {}
        # alignment: the delivered messages of each paused partition, from its first held-back one, in
        # offset order; then those of the partitions resumed, published first with the next batch.
        # Reading them again instead (a seek back) fetched each raw message about 3 times in a backlog.
        self._held: dict[tuple[str, int], list[Message]] = {}
        self._released: dict[tuple[str, int], list[Message]] = {}
        # the raw partitions this worker holds, for its consumption watchdog's thread (replaced, never mutated)
        self.assigned: frozenset[tuple[str, int]] = frozenset()
        # a reassignment resets the clocks and resumes the partitions in librdkafka too (_on_assign)
        self._consumer.subscribe(topics.raw, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def run(self, stop: threading.Event) -> None:
        log.info("ingest worker started: group %s, %d raw topics", self.group_id, len(self.topics.raw))
        try:
            while not stop.is_set():
                self.poll_once()
                self.stats.maybe_publish()  # after the batch flush: the counts are of acknowledged outputs
        finally:
            self.close()
        log.info("ingest worker stopped: %s", self.counters.snapshot())
        if self.aligner is not None:
            log.info("ingest alignment: %s", self.aligner.counters)

    def stats_snapshot(self) -> dict[str, Any]:
        """The counters, and what alignment cost: pauses, resumes, messages delivered but held back
        (kept until their partition resumes)."""
        snapshot = self.counters.snapshot()
        if self.aligner is not None:
            snapshot["alignment"] = dataclasses.asdict(self.aligner.counters)
        return snapshot

    @property
    def group_id(self) -> str:
        return group_id(self.settings)

    def poll_once(self) -> int:
        """Consume one batch, publish it (with alignment: the part within the event-time bound, after
        the held-back messages of partitions resumed now), wait for the acks, commit what was
        published. Returns the messages published (held-back ones are not, until their partition
        resumes)."""
        self._commits.raise_failure()  # an earlier asynchronous commit failed: stop, re-read after restart
        if self.aligner is not None and self.aligner.paused:  # nothing paused (live): no call at all
            self._resume_due()
        messages = self._consumer.consume(num_messages=self.settings.ingest_batch_size, timeout=self.poll_timeout_s)
        records = [m for m in messages if not self._is_error(m)]
        if not records and not self._released:
            if self._uncommitted and time.monotonic() >= self._next_commit_at:  # idle: commit the rest
                self._commit_uncommitted()
            return 0
        try:
            records = self._align(records) if self.aligner is not None else records
            return self._publish(records) if records else 0
        finally:
            # a held-back partition's first message was parsed already (its event time): keep that
            kept = (_position(held[0]) for held in self._held.values())
            self._prepared = {k: self._prepared[k] for k in kept if k in self._prepared}

    def _publish(self, records: list[Message]) -> int:
        by_patient: dict[str, list[bytes]] = defaultdict(list)  # patient -> encoded events, publish order
        first_produced: dict[str, bytes] = {}  # patient -> earliest raw produce stamp (end-to-end latency)
        for msg in records:
            source, outcome, encoded = self._prepared.get(_position(msg)) or self._prepare(msg)
            self.counters.record(source, outcome)
            if isinstance(outcome, Rejected):
                self._dead_letter(msg, outcome.rejection, _STAGES[source])
            stamp = _produced_ns(msg) if encoded else None
            for patient, event in encoded:
                by_patient[patient].append(event)
                if stamp:
                    first_produced.setdefault(patient, stamp)
        canonical_messages = 0
        for patient, events in by_patient.items():
            stamp = first_produced.get(patient) or str(time.time_ns()).encode()
            for value in batch_values(events, self.settings.canonical_max_message_bytes):
                self._produce(self.topics.canonical, patient.encode(), value, [(PRODUCED_NS_HEADER, stamp)])
                canonical_messages += 1
        self._flush()
        self._commit(records)
        self.counters.record_batch(canonical_messages)
        return len(records)

    def _prepare(self, msg: Message) -> tuple[str, Outcome, list[tuple[str, bytes]]]:
        """Parse and encode one message: (source, outcome, encoded events); an outcome whose events
        cannot be written becomes Rejected with no events."""
        try:
            source, outcome = self.parse(msg)
        except Exception as exc:  # parsers never raise; if one does, its message must not fail every restart
            source = "cdc" if msg.topic() in self._cdc_topics else "fhir"
            outcome = rejected(Reason.INTERNAL_ERROR, f"unexpected error parsing a {source} message",
                               type(exc).__name__)
        encoded = encode_events(outcome) if isinstance(outcome, Parsed) else []
        if not isinstance(encoded, Rejected):
            encoded = too_large(encoded, self.settings.canonical_max_message_bytes) or encoded
        if isinstance(encoded, Rejected):
            outcome, encoded = encoded, []
        return source, outcome, encoded

    def _event_time(self, msg: Message) -> int | None:
        """The greatest effective_ms the message would publish (None: it publishes no event); a context
        fact counts at most from when it was recorded. A context fact may be dated ahead (an admission
        booked for next week, exempt from the future-time check): at its own time its partition would stay
        paused until every other partition had read that far, in a backlog to its end, and the transfers
        and discharges behind it with it. Live, it is published at once anyway (nothing holds it)."""
        key = _position(msg)
        prepared = self._prepared.get(key)  # a held-back message was parsed when it was held
        if prepared is None:
            prepared = self._prepared[key] = self._prepare(msg)
        _, outcome, encoded = prepared
        if not encoded:
            return None
        return max(min(e.effective_ms, e.issued_ms) if is_context(e.code_system) else e.effective_ms
                   for e in outcome.events)

    def _align(self, records: list[Message]) -> list[Message]:
        """The messages to publish now (those held back of the partitions just resumed, then the
        batch's), in event-time order; pause the partitions whose next message is beyond the bound,
        keeping their messages from it on."""
        batch: dict[tuple[str, int], list[Message]] = defaultdict(list, self._released)
        self._released = {}
        for msg in records:
            tp = (msg.topic(), msg.partition())
            if tp in self._held:  # paused: librdkafka drops what it fetched; in case one still came, keep it
                self._held[tp].append(msg)
            else:
                batch[tp].append(msg)
        self.aligner.set_caught_up(self._caught_up())
        plan = self.aligner.take(batch, self._event_time, time.monotonic())
        read_again = []
        for tp, first in plan.held.items():
            messages = batch[tp]
            start = next(i for i, msg in enumerate(messages) if msg is first)
            if len(messages) - start <= self.settings.ingest_batch_size:
                self._held[tp] = messages[start:]  # resumed, it is fetched from after the last one delivered
            else:  # memory stays bounded: more than a batch is read again from the first (a seek back)
                read_again.append(TopicPartition(tp[0], tp[1], first.offset()))
        if plan.held:
            self._consumer.pause([TopicPartition(t, p) for t, p in plan.held])
            for tp in read_again:  # after the pause: no fetch may start between the seek and the pause
                self._consumer.seek(tp)
            log.debug("alignment: paused %d raw partitions ahead in event time", len(plan.held))
        return plan.taken

    def _caught_up(self) -> dict[tuple[str, int], bool]:
        """Per tracked partition: read to the high watermark of its last fetch (local calls, no broker
        request). Unknown (no fetch yet) counts as not caught up. The embedded broker can report the
        watermark low, which can only make a partition look caught up a little early."""
        tps = [TopicPartition(t, p) for t, p in self.aligner.clocks]
        status = {}
        for tp in self._consumer.position(tps) if tps else ():
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            status[(tp.topic, tp.partition)] = high >= 0 and tp.offset >= high
        return status

    def _resume_due(self) -> None:
        self.aligner.set_caught_up(self._caught_up())
        resumed = self.aligner.resume(time.monotonic())
        for tp in resumed:
            if (held := self._held.pop(tp, None)) is not None:  # else sought back: fetched again
                self._released[tp] = held
        if resumed:
            self._consumer.resume([TopicPartition(t, p) for t, p in resumed])

    def _on_assign(self, consumer, partitions) -> None:
        log.info("ingest: %d raw partitions assigned", len(partitions))
        self.assigned = self.assigned | {(tp.topic, tp.partition) for tp in partitions}
        self._forget_held({(tp.topic, tp.partition) for tp in partitions})  # read from the committed offset
        if self.aligner is not None:
            # librdkafka keeps a pause() through a rebalance that hands the partition back (even after
            # it was another member's meanwhile), while the aligner starts it afresh, unpaused: nothing
            # would ever resume it (a session timeout on a slow broker left the raw topics full, unread)
            consumer.resume(partitions)
            self.aligner.assign([(tp.topic, tp.partition) for tp in partitions], time.monotonic())

    def _on_revoke(self, consumer, partitions) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        log.info("ingest: %d raw partitions revoked (%d paused by alignment)", len(revoked),
                 len(revoked & self.aligner.paused) if self.aligner is not None else 0)
        self.assigned = self.assigned - revoked
        # what was published from them is committed now, while they are still ours; and never again
        # later (at close), which would move the next owner's committed offset back: forgotten first,
        # so a commit that raises (the worker stops) leaves nothing of them for close() to commit.
        # All of it, not only what no commit was sent for: the last asynchronous commit may be the one
        # the rebalance made fail (REBALANCE_IN_PROGRESS, only logged), and the next owner would read
        # and count those messages again
        uncommitted = {tp: o for tp, o in self._last_commit.items() if tp in revoked}
        for tp in revoked:
            self._uncommitted.pop(tp, None)
            self._last_commit.pop(tp, None)
        self._forget_held(revoked)  # never published, never committed: the next owner reads them
        if self.aligner is not None:
            self.aligner.revoke(list(revoked))
        commit_offsets(self._consumer, uncommitted, log)

    def _forget_held(self, tps: set[tuple[str, int]]) -> None:
        for tp in tps:
            for held in (self._held.pop(tp, None), self._released.pop(tp, None)):
                if held:  # and its parse (harmless, as the same offset is the same message, but memory)
                    self._prepared.pop(_position(held[0]), None)

    def parse(self, msg: Message) -> tuple[str, Outcome]:
        topic = msg.topic()
        if topic in self._cdc_topics:
            return "cdc", parse_cdc(topic, msg.key(), msg.value(), partition=msg.partition(), offset=msg.offset(),
                                    cdc_topic_prefix=self.settings.cdc_topic_prefix,
                                    cdc_timezone=self.settings.cdc_timezone)
        received_ms = _record_ms(msg)
        ids_are_mrns, mrn_system = self.settings.fhir_patient_ids_are_mrns, self.settings.mrn_system
        outcome = parse_notification(msg.value(), topic=topic, partition=msg.partition(), offset=msg.offset(),
                                     received_ms=received_ms, fhir_patient_ids_are_mrns=ids_are_mrns,
                                     mrn_system=mrn_system)
        if isinstance(outcome, NeedsFetch):  # id-only, or subjects' MRNs: the only path that talks to the FHIR server
            outcome = resolve(outcome, msg.value(), self._fhir, topic=topic, partition=msg.partition(),
                              offset=msg.offset(), received_ms=received_ms, fhir_patient_ids_are_mrns=ids_are_mrns,
                              mrn_system=mrn_system)
        return "fhir", outcome

    def close(self) -> None:
        try:
            self.stats.publish(final=True)  # the final counts
            self._producer.flush(10)
            # the last asynchronous commit may still be in flight: make it certain before leaving
            commit_offsets(self._consumer, self._last_commit, log)
            self._uncommitted.clear()
        finally:
            self._consumer.close()  # leaves the group at once, so a restart rejoins quickly
            if self._fhir is not None:
                self._fhir.close()

    # --- wiring details ------------------------------------------------------------------------

    def _is_error(self, msg: Message) -> bool:
        return skip_consumer_error(msg, log)

    def _dead_letter(self, msg: Message, rejection: Rejection, stage: Stage) -> None:
        headers = deadletter_headers(rejection, stage, msg.topic(), msg.partition(), msg.offset())
        value = msg.value()
        if value is not None and len(value) > self.settings.max_message_bytes - DEADLETTER_HEADROOM:
            # larger than anything we may write: the dead letter points at the original on its raw
            # topic (partition and offset are in the headers) instead of failing on every restart
            headers.append((VALUE_OMITTED_HEADER, str(len(value)).encode()))
            value = None
        self._produce(self.topics.deadletter, msg.key(), value, headers)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> None:
        self._acked.produce(topic, key, value, headers)

    def _flush(self) -> None:
        self._acked.flush_or_raise()  # raising means not committing: the batch is re-read after a restart

    def _commit(self, records: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for msg in records:
            tp = (msg.topic(), msg.partition())
            offsets[tp] = max(offsets.get(tp, -1), msg.offset() + 1)
        self._last_commit.update(offsets)
        self._uncommitted.update(offsets)
        # each commit is a broker request: at most one per commit interval (Kafka Streams' commit.interval.ms)
        if time.monotonic() >= self._next_commit_at:
            self._commit_uncommitted()

    def _commit_uncommitted(self) -> None:
        offsets, self._uncommitted = self._uncommitted, {}
        # the outputs are acknowledged already (flush): the commit need not be awaited
        commit_offsets(self._consumer, offsets, log, asynchronous=True)
        self._next_commit_at = time.monotonic() + self.settings.commit_interval_s


def _position(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()


def _record_ms(msg: Message) -> int | None:
    """The raw record's timestamp (the receiver's CreateTime, or the broker's LogAppendTime) in epoch ms;
    None when the record has none."""
    kind, ms = msg.timestamp()
    return ms if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else None


def _produced_ns(msg: Message) -> bytes | None:
    """The raw message's `ww.produced_ns` header (set by the replayer and benchmarks), if any."""
    for k, v in msg.headers() or ():
        if k == PRODUCED_NS_HEADER and v:
            return v
    return None


def group_id(settings: Settings) -> str:
    return f"{settings.group_prefix}-ingest"


def consumer_config(settings: Settings) -> dict[str, Any]:
    instance_id = settings.group_instance_id()  # None: dynamic membership
    static = {"group.instance.id": instance_id} if instance_id else {}
    return {
        **settings.kafka_client_config("ingest"),
        **static,
        "group.id": group_id(settings),
        "session.timeout.ms": int(settings.session_timeout_s * 1000),
        "heartbeat.interval.ms": int(settings.heartbeat_interval_s * 1000),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,  # commit only after the outputs are acknowledged
        "enable.partition.eof": False,
        # Tansu answers a fetch only when fetch.wait.max.ms expires: keep it short, or every
        # poll batch spans 0.5 s of input (and that much latency)
        "fetch.wait.max.ms": 10,
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        **settings.kafka_client_config("ingest"),
        "acks": "all",
        "linger.ms": settings.ingest_linger_ms,
        "message.max.bytes": settings.max_message_bytes,  # a large raw message can still be dead-lettered whole
        # Java-compatible hashing, so patient keys land where the faust (Java-partitioned) side expects
        "partitioner": "murmur2_random",
    }


def run_ingest(settings: Settings, stop: threading.Event) -> IngestCounters:
    """CLI entry point: run one ingest worker until `stop` is set; returns the final counters."""
    worker = IngestWorker(settings, topics_for(settings))
    freeze_startup_heap()  # imports (the FHIR models) and the clients
    with watching(settings, "ingest", worker.group_id, lambda: worker.assigned):
        worker.run(stop)
    return worker.counters
