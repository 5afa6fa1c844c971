"""Wiring: the faust worker that owns per-patient state. Logic lives in streams/patient_agent.py.

    canonical (key patient, value JSON array of events of that patient)
        -> agent `patients` (take_events batches; one table write per patient per batch)
        -> late / features / scores / alerts (confluent-kafka producer, flushed before the batch is acked)
        -> deadletter (undecodable canonical messages)

State: table `patient_state` (changelog-backed) holds PatientRecord bytes per patient, plus one
`__wardwatch_next_offset__:<p>` record per canonical partition. Every record is written to the
changelog partition of the canonical partition it came from (explicitly, not by the partitioner), so
a partition's state moves with it between workers.

Durability (docs/patient-state.md, "Durability"): a batch's offsets are committed only after its
outputs and its changelog writes are acknowledged (the changelog's while the next batch is processed,
ChangelogConfirmations), so a committed offset never runs ahead of the state; recovery reads
each changelog partition up to a barrier record it writes itself, because the embedded broker reports
the high watermark too low.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict

import faust
from confluent_kafka import KafkaException, Producer
from faust.tables.manager import TableManager
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.tables.recovery import Recovery
from faust.serializers import codecs
from faust.types import TP

from schemas.deadletter import Stage, deadletter_headers
from streams.alerting import AlertPolicy
from streams.commits import AckedProducer
from streams.patient_agent import RESERVED_KEY_PREFIX, CanonicalMessage, PatientProcessor, PatientRecord
from streams.scoring import Scorer
from streams.faust_tuning import broker_credentials, set_fetch_max_wait_ms
from streams.gc_tuning import freeze_startup_heap
from streams.stats import StatsPublisher
from streams.topics import Topics, ensure_topics, topics_for
from streams.watchdog import OffsetsProbe, StallWatchdog
from wardwatch import observability
from wardwatch.settings import Settings

log = logging.getLogger("wardwatch.worker")

MODEL_RELOAD_CHECK_S = 2.0  # how often the worker looks for a promoted model
REWIND_CHECK_S = 1.0  # how often the worker looks for rewinds whose re-read did not show


def _produced_ns(headers) -> int | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for k, v in items:
        if k == "ww.produced_ns" and v:
            try:
                return int(v)
            except ValueError:
                return None
    return None


RECOVERY_BARRIER_KEY = f"{RESERVED_KEY_PREFIX}recovery_barrier__"  # never a patient id; written as a tombstone
NEXT_OFFSET_PREFIX = f"{RESERVED_KEY_PREFIX}next_offset__:"  # + source partition; never a patient id
CHANGELOG_CONFIRM_TIMEOUT_S = 30.0
COMMIT_RETRY_S = 1.0
SHUTDOWN_COMMIT_TIMEOUT_S = 10.0


class DurableTable(faust.Table):
    """A faust Table whose changelog is written by a confluent-kafka producer, and confirmed.

    faust's own changelog writes go through aiokafka, in Python: batch building, CRCs and request
    encoding cost the worker about a tenth of its CPU at full load (py-spy), and its buffer flush
    can return while records are still queued. The worker writes the changelog itself instead
    (`put`, into librdkafka, whose work runs off the GIL) and calls `confirm_changelog()` before a
    batch's offsets are committed, so a committed source offset always has its table writes durable.
    faust still reads the changelog back on recovery: same topic, same key and value encoding.

    The changelog producer is idempotent: per partition its records land in the order they were
    produced, so a batch's next-offset marker (written last) is never durable before the patient
    records it vouches for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._changelog: AckedProducer | None = None

    def write_changelog_with(self, settings: Settings) -> None:
        self._changelog = AckedProducer(Producer(changelog_producer_config(settings)), "table changelog")

    def _send(self, partition: int | None, key: str, value: bytes) -> None:
        if self._changelog is None:
            raise RuntimeError("DurableTable.write_changelog_with() was not called")
        self._changelog.produce(self.changelog_topic.get_topic_name(),
                                codecs.dumps(self.key_serializer, key), value, partition=partition)

    async def confirm_changelog(self, timeout_s: float = CHANGELOG_CONFIRM_TIMEOUT_S) -> None:
        if self._changelog is None:
            return
        # in a thread: the flush blocks, and faust's timers and commits go on meanwhile
        try:
            await asyncio.to_thread(self._changelog.flush_or_raise, timeout_s)
        except KafkaException as exc:
            raise RuntimeError(f"the table changelog was not acknowledged ({exc}): is the broker up?") from None

    def next_offset(self, partition: int) -> int | None:
        raw = self.get(next_offset_key(partition))
        return int(raw) if raw is not None else None

    def applied_offset(self, partition: int) -> int | None:
        """next_offset() for another thread (the stall watchdog): a plain read of the store, without
        faust's per-read sensors."""
        raw = self.data.get(next_offset_key(partition))
        return int(raw) if raw is not None else None

    def put(self, partition: int | None, key: str, value: bytes) -> None:
        """Set `key` and write its changelog record to `partition` (the source partition it belongs
        to), whatever the partitioner would pick for the key: the partitioner hashes the JSON-encoded
        key, which lands a patient in another partition than its canonical messages, so a second
        worker recovering that partition would not find the patient. None: the partitioner's choice."""
        self.data[key] = value  # the store directly; the changelog record follows
        self._send(partition, key, value)

    def set_next_offset(self, partition: int, offset: int) -> None:
        self.put(partition, next_offset_key(partition), str(offset).encode())

    async def write_barrier(self, partition: int) -> int:
        """Append a tombstone to one changelog partition; returns its offset, which the produce
        response gives exactly (unlike the broker's high watermark)."""
        fut = faust.Table.send_changelog(self, partition, RECOVERY_BARRIER_KEY, None, value_serializer="raw")
        metadata = await asyncio.wait_for(fut, CHANGELOG_CONFIRM_TIMEOUT_S)
        return metadata.offset


class ExactEndRecovery(Recovery):
    """faust recovery that reads each active changelog partition to its real end.

    faust stops recovery at the changelog's high watermark (ListOffsets). The embedded broker (Tansu)
    answers it with the base offset of the *last record batch* + 1, not the log end: recovery then
    misses the rest of that batch on every restart and rebalance, and for a partition a worker keeps
    it can even roll an in-memory value back. Instead, on assignment the worker appends a barrier
    record to each of its changelog partitions (the source partitions are paused, so nothing follows
    it) and recovers up to the barrier's own offset, which the produce response gives exactly. Standby
    partitions keep faust's estimate, raised to what the standby copy has read already: they are only a
    warm start, and take-over recovers them again."""

    async def _build_highwaters(self, consumer, tps, destination, title: str) -> None:
        if title == "standby":
            await super()._build_highwaters(consumer, tps, destination, title)
            # a standby kept across a rebalance may have read that low estimate's batch to its end
            # already (before the active owner's barrier lands): faust's consistency check then took
            # the copy for corrupt and stopped the worker. The copy reads on to the real end anyway.
            for tp in tps:
                read = self.standby_offsets.get(tp)
                if read is not None and read > destination.get(tp, -1):
                    destination[tp] = read
            return
        if title != "active" or not tps:
            return await super()._build_highwaters(consumer, tps, destination, title)
        started = time.monotonic()
        tps = list(tps)
        offsets = await asyncio.gather(*(self.tp_to_table[tp].write_barrier(tp.partition) for tp in tps))
        destination.clear()
        destination.update(dict(zip(tps, offsets)))  # faust's convention: the offset of the last record
        log.info("recovery barriers written to %d changelog partitions in %.2f s", len(tps),
                 time.monotonic() - started)


def next_offset_key(partition: int) -> str:
    """Table key of the next canonical offset the table has not applied, for one source partition.
    Its changelog record is written to that partition explicitly, so it moves with the partition."""
    return f"{NEXT_OFFSET_PREFIX}{partition}"


def sequence_batch(msgs: list[CanonicalMessage], next_offsets: dict[int, int | None],
                   awaiting: frozenset[int] | set[int] = frozenset()
                   ) -> tuple[list[CanonicalMessage], dict[int, int], dict[int, int]]:
    """Keep a batch in step with the table, per source partition:
    - a message below the partition's next offset was applied already (a replay after a restart or a
      rewind): dropped;
    - a message above it means messages in between were never applied (the committed offset ran
      ahead of the table, or the consumer skipped them): that partition's rest of the batch is
      dropped and the partition is rewound to the next offset;
    - a partition in `awaiting` was rewound already and its seek has not shown yet: messages above
      the next offset are the ones fetched before the seek, dropped without another rewind (one
      seek per gap, not one per batch until the fetch buffer drains);
    - no next offset yet (a partition the table has never seen): anything goes.
    Returns (messages to apply, partition -> new next offset, partition -> offset to rewind to)."""
    expected = dict(next_offsets)
    keep: list[CanonicalMessage] = []
    advanced: dict[int, int] = {}
    rewind: dict[int, int] = {}
    for m in msgs:
        p, want = m.partition, expected.get(m.partition)
        if p in rewind or (want is not None and m.offset < want):
            continue
        if want is not None and m.offset > want:
            if p not in awaiting:
                rewind[p] = want
            continue
        keep.append(m)
        expected[p] = advanced[p] = m.offset + 1
    return keep, advanced, rewind


class PendingRewinds:
    """Partitions the worker has rewound (sought back) whose first re-read message has not arrived.

    A rewind is settled when its partition advances (the message at the sought offset was applied).
    One not settled within `retry_s` is no longer awaited, so the next gap seeks again: a seek can be
    lost to a rebalance."""

    def __init__(self, retry_s: float = 5.0):
        self.retry_s = retry_s
        self._issued: dict[int, float] = {}  # partition -> monotonic time of its seek

    def awaiting(self, now: float) -> set[int]:
        return {p for p, at in self._issued.items() if now - at < self.retry_s}

    def overdue(self, now: float) -> list[int]:
        """Partitions whose re-read has not shown within `retry_s`: seek them again even if no new
        message arrives (at the end of a stream none does, and a lost seek stranded a partition)."""
        return sorted(p for p, at in self._issued.items() if now - at >= self.retry_s)

    def issued(self, partition: int, now: float) -> None:
        self._issued[partition] = now

    def settled(self, partitions) -> None:
        for p in partitions:
            self._issued.pop(p, None)

    def clear(self) -> None:  # a rebalance: faust seeks every assigned partition itself
        self._issued.clear()


def _exit_unacked(batch: asyncio.Future) -> None:
    """End the process at once, so faust cannot ack (and later commit) a batch that did not complete:
    after a restart it is processed again. Only infrastructure errors and bugs get here (bad data is
    dead-lettered per message), and both must stop the worker loudly."""
    exc = batch.exception() if batch.done() and not batch.cancelled() else None
    log.critical("a batch could not be completed (%s); exiting without acking it, it is reprocessed "
                 "after the restart", type(exc).__name__ if exc else "cancelled", exc_info=exc)
    logging.shutdown()
    os._exit(70)


async def _finish_or_exit(batch: asyncio.Future) -> None:
    """At shutdown: finish the batch in progress (outputs and changelog durable) before faust acks it."""
    try:
        await batch
    except BaseException:  # failed, or cancelled again while finishing
        _exit_unacked(batch)


class ExactEndTableManager(TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = ExactEndRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


CHANGELOG_BATCH_BYTES = 1_000_000  # within Kafka's default max.message.bytes (1,048,588)
CHANGELOG_COMPRESSION = "lz4"
# linger of the producers the worker flushes explicitly every batch. Each produce request costs the
# embedded broker 150-450 µs of CPU whatever its size; with 1-2 ms a batch's records left in several
# requests, as each partition's linger ran out while the rest were still being serialised
FLUSHED_LINGER_MS = 100


def changelog_producer_config(settings: Settings) -> dict:
    """The table changelog's producer. A batch writes one whole patient record (~17 KB with a day of
    facts) per patient it touched: with 16 KB batches (aiokafka's default) each record was a produce
    request of its own, and with many patients in flight the changelog fell behind (1k msg/s over 72
    concurrent patients: 1.6 s per worker batch, against 72 ms with room for many records per batch).
    Idempotent, so that records land in produce order per partition (see DurableTable).

    lz4-compressed: a live patient's record is rewritten whole at nearly every raw message, so the
    changelog carried about 10x the raw input's bytes (1k msg/s: 19 MB/s). JSON records with repeated
    ids compress ~5x with lz4 (zstd ~8x at 3.6x the CPU), in librdkafka's thread, off the GIL; faust's
    recovery decompresses through aiokafka, which needs cramjam (a dependency)."""
    return {**settings.kafka_client_config("worker-changelog"), "acks": "all", "enable.idempotence": True,
            "linger.ms": FLUSHED_LINGER_MS, "compression.type": CHANGELOG_COMPRESSION,
            "batch.size": CHANGELOG_BATCH_BYTES, "partitioner": "murmur2_random"}


def create_app(settings: Settings, topics: Topics | None = None) -> faust.App:
    topics = topics or topics_for(settings)
    set_fetch_max_wait_ms(settings.worker_fetch_wait_ms)
    app = faust.App(
        f"{settings.group_prefix}-worker",
        broker=f"kafka://{settings.bootstrap_servers}",
        broker_credentials=broker_credentials(settings),
        broker_client_id="wardwatch-worker-faust",
        store="memory://",  # the changelog topic is the durable copy
        datadir=str(settings.data_dir / "faust"),  # faust's own files; its default litters the cwd
        topic_partitions=topics.partitions,
        topic_replication_factor=settings.replication_factor,  # the changelog, like every other topic
        topic_allow_declare=True,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        consumer_group_instance_id=settings.group_instance_id(),
        web_enabled=settings.worker_web_port is not None,
        web_port=settings.worker_web_port or 6066,
        web_bind="127.0.0.1",
        producer_linger_ms=1,  # faust's own producer writes only the recovery barriers
        # a rebalance waits for the batch in progress to finish (outputs and changelog acknowledged), so
        # a revoked partition's last table writes land before its new owner's recovery barrier
        stream_wait_empty=True,
        table_cleanup_interval=3600.0,
        consumer_auto_offset_reset="earliest",
        Table=DurableTable,
        TableManager=ExactEndTableManager,
    )
    app.transport.Consumer = AppliedOnlyConsumer  # before faust creates its consumer
    canonical = app.topic(topics.canonical, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=topics.partitions)
    table = app.Table("patient_state", default=None, partitions=topics.partitions, use_partitioner=True,
                      key_type=str, value_type=bytes)
    table.write_changelog_with(settings)

    scorer = Scorer(settings.model_dir, settings)
    processor = PatientProcessor(settings, scorer, AlertPolicy.from_settings(settings))
    # flushed at the end of every batch (flush sends at once, whatever the linger): a long linger only
    # keeps a batch's records in one produce request instead of one per partition as each fills
    producer = Producer({**settings.kafka_client_config("worker"), "linger.ms": FLUSHED_LINGER_MS, "partitioner": "murmur2_random",
                         "enable.idempotence": False, "acks": "all"})
    stats = StatsPublisher("worker", lambda: dict(processor.counters), producer, topics.stats,
                           interval_s=settings.stats_interval_s)  # also on /metrics (wardwatch.observability)
    next_reload_check = [0.0]  # monotonic time of the next look at the registry's `current` pointer
    # read-through cache: table bytes -> parsed record, for the recently active patients only (parsed
    # records are several times the size of their bytes; the table keeps every patient anyway)
    parsed = RecentCache(settings.worker_parsed_cache_patients)
    rewinds = PendingRewinds()

    def load(patient: str) -> PatientRecord | None:
        raw = table.get(patient)
        if raw is None:
            return None
        hit = parsed.get(patient)
        if hit is not None and hit[0] is raw:  # same bytes object the table holds: still valid
            return hit[1]
        rec = PatientRecord.from_bytes(raw)
        parsed[patient] = (raw, rec)
        return rec

    outputs = AckedProducer(producer, "worker outputs")  # a failed delivery raises at the flush

    def send(topic: str, records) -> None:
        for key, value, headers in records:
            outputs.produce(topic, key, value, headers)

    async def process_batch(events) -> None:
        """One taken batch: state, outputs and table; returns once outputs and changelog are durable."""
        if time.monotonic() >= next_reload_check[0]:  # a file read, not per batch on the hot path
            scorer.reload_if_changed()
            observability.set_model(scorer.model_version or "none", "model" if scorer.model_version else "rule")
            next_reload_check[0] = time.monotonic() + MODEL_RELOAD_CHECK_S
        msgs = [CanonicalMessage(ev.message.partition, ev.message.offset, ev.value,
                                 _produced_ns(ev.message.headers), ev.key) for ev in events]
        next_offsets = {p: table.next_offset(p) for p in {m.partition for m in msgs}}
        applied_before = {p: n for p, n in next_offsets.items() if n is not None}
        if unseen := [TP(topics.canonical, p) for p, n in next_offsets.items() if n is None]:
            # nothing applied from these partitions yet: they start at their first message (faust can
            # drop messages fetched during a rebalance and not re-read them when nothing is committed)
            for tp, first in (await app.consumer.earliest_offsets(*unseen)).items():
                next_offsets[tp.partition] = first
        msgs, advanced, rewind = sequence_batch(msgs, next_offsets, rewinds.awaiting(time.monotonic()))
        rewinds.settled(advanced)
        started = time.perf_counter()
        records, out = processor.process(msgs, load)
        send(topics.late, out.late)
        send(topics.features, out.features)
        send(topics.scores, out.scores)
        send(topics.alerts, out.alerts)
        send(topics.scores_shadow, out.shadow)  # candidate model's scores; never alerts
        stats.maybe_publish()  # goes out with this flush
        observe_latency(msgs, len(out.scores))
        for msg, rejection in out.rejected:
            outputs.produce(topics.deadletter, msg.key, msg.value, deadletter_headers(
                rejection, Stage.PATIENT_STATE, topics.canonical, msg.partition, msg.offset))
        # outputs are durable before the table records that the batch was applied (at-least-once; ids
        # make repeats idempotent); in a thread, so faust's timers and commits go on meanwhile
        processed = time.perf_counter()
        try:  # with the previous batch's changelog confirmation, which ran while this batch was processed
            await asyncio.gather(asyncio.to_thread(outputs.flush_or_raise, 30.0), confirmations.wait())
        except KafkaException as exc:
            raise RuntimeError(f"the worker's outputs were not delivered ({exc}): is the broker up?") from None
        flushed = time.perf_counter()
        partition_of = {m.key: m.partition for m in msgs}  # canonical messages are keyed by patient id
        for patient, rec in records.items():
            raw = rec.to_bytes(settings.state_write_format)
            partition = partition_of.get(patient.encode())
            if partition is None:  # a producer broke the key contract: keep the state, say so
                log.warning("a canonical message's key is not its patient id; its state goes where the "
                            "partitioner puts it, which another worker may not recover")
            table.put(partition, patient, raw)
            parsed[patient] = (raw, rec)
        for partition, offset in advanced.items():  # after the patients: same changelog partition, in order
            table.set_next_offset(partition, offset)
        # its offsets become committable only once its state is durable (a restart then finds every
        # committed message in the recovered table); confirmed while the next batch is processed.
        # Partitions it only re-read are committed at the table's offset again: their re-read follows
        # a restart or rebalance whose commit was lost, and nothing else would commit them
        confirmations.start({**applied_before, **advanced})
        observability.observe_batch(len(msgs), process=processed - started, outputs=flushed - processed)
        for partition, offset in rewind.items():  # messages were skipped: read them again, in order
            log.warning("canonical partition %d: messages from offset %d were not applied; rewinding to it",
                        partition, offset)
            await seek_back(partition, offset)

    async def seek_back(partition: int, offset: int) -> None:
        # seek_wait, not seek: faust's seek calls the aiokafka consumer from this thread while it runs
        # in its own, and the fetcher then never re-reads the partition (seen in the chaos soak: one
        # partition stuck at the same offset across five restarts)
        await app.consumer.seek_wait({TP(topics.canonical, partition): offset})
        rewinds.issued(partition, time.monotonic())

    committer = AppliedOffsetCommitter(app, topics.canonical, settings.commit_interval_s)
    confirmations = ChangelogConfirmations(table, committer)

    @app.task
    async def _commit_applied() -> None:
        await committer.run()

    app.consumption_watchdog = None  # run_worker's /readyz: always ready without a watchdog
    if settings.stall_timeout_s:
        probe = OffsetsProbe(settings, "worker")

        def look_at_consumption():
            assigned = [(tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic == topics.canonical]
            return {tp: table.applied_offset(tp[1]) for tp in assigned}, probe.watermarks(assigned)

        def rebalance_or_recovery_progress():
            # what moves while a rebalance or recovery makes progress: its phase, the changelog offsets
            # recovery has read, and the canonical offsets applied (a rebalance waits for the batch in
            # progress). Copies: the loop changes them while this thread reads
            recovery = app.tables.recovery
            return (app.rebalancing, app.in_recovery, dict(recovery.active_offsets), dict(recovery.standby_offsets),
                    [table.applied_offset(p) for p in range(topics.partitions)])

        watchdog = app.consumption_watchdog = StallWatchdog(
            settings.stall_timeout_s, look_at_consumption, service="worker",
            busy=lambda: bool(app.rebalancing or app.in_recovery), busy_progress=rebalance_or_recovery_progress,
            close=probe.close)

        # at the first assignment, once faust's consumer exists and while its first table recovery runs:
        # faust starts an app's tasks and timers only after that recovery, so one stuck in it (or in the
        # rebalance before it) would never be watched
        @app.on_partitions_assigned.connect
        async def _watch_consumption(sender, assigned, **kwargs) -> None:
            watchdog.start()

    @app.agent(canonical, name="patients")
    async def patients(stream):
        async for events in stream.take_events(settings.worker_batch_size, within=settings.worker_batch_within_s):
            # faust acks a taken batch as soon as this loop body is left, even by an exception or by the
            # cancellation at shutdown: let the batch finish first, or end the process before the ack
            batch = asyncio.ensure_future(process_batch(events))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                await _finish_or_exit(batch)
                await confirmations.wait()  # so a restart need not apply it again
                raise
            except Exception:
                _exit_unacked(batch)

    @app.timer(REWIND_CHECK_S)
    async def _retry_rewinds() -> None:
        for partition in rewinds.overdue(time.monotonic()):
            offset = table.next_offset(partition)
            if offset is None:  # nothing applied there yet: no gap to close
                rewinds.settled([partition])
                continue
            log.warning("canonical partition %d: the rewind to offset %d was not re-read; seeking again",
                        partition, offset)
            await seek_back(partition, offset)

    @app.timer(settings.stats_interval_s)
    async def _publish_stats() -> None:  # also while idle, so `wardwatch stats` is never stale
        stats.publish()
        producer.poll(0)

    @app.on_rebalance_complete.connect
    async def _forget_cache(sender, **kwargs):  # another worker may have changed a patient we held
        parsed.clear()

    @app.on_before_shutdown.connect
    async def _confirm_last_batch(sender, **kwargs):
        if app.consumption_watchdog:  # a stop is not a stall, however long it takes
            app.consumption_watchdog.stop()
        # durable and committed, so a restart re-reads nothing this worker applied
        await confirmations.wait()
        try:
            committed = await committer.flush()
        except Exception as exc:  # (a timeout too) the batch is durable: a restart finds it applied and skips it
            committed, reason = False, type(exc).__name__
        else:
            reason = "the group rebalanced"
        if not committed:
            log.warning("the last applied offsets were not committed at shutdown (%s)", reason)
        # the final counters, marked stopped: `wardwatch stats` stops counting this instance as live at once
        stats.publish(final=True)
        if producer.flush(5.0):
            log.warning("the final stats snapshot was not delivered at shutdown")

    @app.on_partitions_revoked.connect
    async def _forget_pending_commits(sender, revoked, **kwargs):  # another worker may commit beyond them now
        # the last batch's changelog is durable before a new owner writes its recovery barrier
        await confirmations.wait()
        committer.forget()
        rewinds.clear()

    return app


class AppliedOffsetCommitter:
    """Commits, per canonical partition, the next offset the table has durably applied.

    faust commits only a contiguous run of acked offsets, and stops at the first offset it never saw
    acked: after a restart or a rewind that can be forever (its acked list then also grows without
    bound), so a worker that has applied everything keeps an old committed offset and a restart
    re-reads hours of input; and it can run ahead of the table (see AppliedOnlyConsumer, which turns
    faust's own commits off). The table's next-offset markers are the truth; this commits them once
    their batch is durable, at most one commit in flight and one per interval, newest offsets winning."""

    def __init__(self, app: faust.App, topic: str, interval_s: float = 0.0) -> None:
        self.app, self.topic, self.interval_s = app, topic, interval_s
        self._pending: dict[int, int] = {}
        self._wanted = asyncio.Event()
        self._in_flight: asyncio.Future | None = None

    def applied(self, next_offsets: dict[int, int]) -> None:
        """A batch is durable: these partitions may be committed up to these offsets."""
        if next_offsets:
            self._pending.update(next_offsets)
            self._wanted.set()

    def forget(self) -> None:
        self._pending.clear()

    async def flush(self, timeout_s: float = SHUTDOWN_COMMIT_TIMEOUT_S) -> bool:
        """Commit what is pending now, whatever the interval (a graceful stop), after the commit in
        flight. Bounded: an unreachable broker must not hold the stop (the batch is durable anyway).
        True if everything pending was committed."""
        if self._in_flight is not None:
            await asyncio.wait({self._in_flight}, timeout=timeout_s)
        if not self._pending:
            return True
        offsets, self._pending = self._pending, {}
        return not await asyncio.wait_for(self._commit(offsets), timeout_s)

    async def _commit(self, offsets: dict[int, int]) -> dict[int, int]:
        """Commit through faust's path (it drops revoked partitions and records the commit as its own).
        Returns the offsets it did not commit of partitions this worker still owns."""
        if await self.app.consumer._commit_offsets({TP(self.topic, p): o for p, o in offsets.items()}):
            return {}
        # faust answers False, without raising, when the group rebalanced since ("already rebalanced")
        # or nothing is assigned any more: a partition that stayed with this worker must still be
        # committed, or its committed offset stays behind what the table applied
        owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}
        return {p: o for p, o in offsets.items() if p in owned}

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            offsets, self._pending = self._pending, {}
            self._in_flight = asyncio.ensure_future(self._commit(offsets))
            try:  # shielded: a stop cancels this task, and flush() then waits for the commit instead
                missed = await asyncio.shield(self._in_flight)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. a rebalance in progress
                log.info("commit of applied offsets failed (%s); retrying", type(exc).__name__)
                missed = offsets
            if missed:  # try again shortly, unless a newer batch superseded them
                for p, o in missed.items():
                    self._pending.setdefault(p, o)
                await asyncio.sleep(COMMIT_RETRY_S)
                self._wanted.set()
                continue
            # each commit is a broker request: at most one per interval, newer offsets pile up meanwhile
            await asyncio.sleep(self.interval_s)


class ChangelogConfirmations:
    """Confirms a batch's changelog in the background, then lets its offsets be committed.

    A batch's outputs are durable before its changelog is written (docs/patient-state.md, rule 1), and
    its offsets are committed only once the changelog is durable. Waiting for that acknowledgement
    before the next batch left the worker idle for a broker round trip per batch (13% of a backlog,
    and at 1k msg/s on the embedded broker as long as processing the batch). Instead the next batch is
    processed meanwhile and waits for the confirmation with its own outputs' flush: one confirmation
    in flight at most, so commits stay in batch order. A revocation waits for it too, so a new owner's
    recovery barrier follows every record of the last batch. A failed confirmation ends the process
    like a failed batch: nothing of it was committed, and it is applied again after the restart."""

    def __init__(self, table: DurableTable, committer: "AppliedOffsetCommitter") -> None:
        self.table, self.committer = table, committer
        self._pending: asyncio.Future | None = None

    def start(self, advanced: dict[int, int]) -> None:
        """The batch's changelog records are produced: confirm them, then commit `advanced`. The
        previous confirmation was waited for (the batch's output flush did)."""
        self._pending = asyncio.ensure_future(self._confirm(advanced, time.perf_counter()))

    async def wait(self) -> None:
        if self._pending is not None:
            await asyncio.shield(self._pending)  # a cancelled waiter leaves the confirmation running

    async def _confirm(self, advanced: dict[int, int], started: float) -> None:
        try:
            await self.table.confirm_changelog()
        except Exception as exc:
            log.critical("a batch's table changelog was not confirmed (%s); exiting without committing "
                         "it, it is applied again after the restart", exc)
            logging.shutdown()
            os._exit(70)
        self.committer.applied(advanced)
        observability.observe_phase("changelog", time.perf_counter() - started)


class AppliedOnlyConsumer(AIOKafkaConsumer):
    """faust's consumer without faust's own offset commits: the worker commits only what its table
    applied (AppliedOffsetCommitter). faust counts as committable every offset it saw a jump over
    (its "gaps": messages it dropped in a rebalance, or the re-read after a rewind) and the messages
    a batch dropped as out of step, so its commits ran ahead of the table; each restart then began
    past unapplied messages and had to rewind (in the chaos soak, for tens of seconds per restart).

    faust still records every ack and gap for its commit; only its commit trims those records, so
    they are dropped here, where its commit would have read them (else one entry per message, forever).

    Each fetch also gets a copy of the active partitions, not faust's live set (`_getmany`)."""

    async def _getmany(self, active_partitions, timeout: float):
        # faust hands its live set of active partitions to the consumer thread, which reads it when the
        # fetch runs there. At the end of recovery faust pauses the changelog partitions before it
        # resumes the canonical ones, so the set can be empty by then, and aiokafka reads an empty set as
        # "every partition" (fetcher.fetched_records: `if partitions and tp not in partitions`). It
        # returned the canonical messages it had prefetched, faust dropped them as not active, and
        # aiokafka's position was already past them: with no committed offset to seek back to, they
        # were never read (the worker idled after "Worker ready" with its input unread). A copy holds
        # the partitions faust checked were active when it asked for the fetch
        return await super()._getmany(None if active_partitions is None else set(active_partitions), timeout)

    def _filter_committable_offsets(self, tps) -> dict:
        for tp in tps:
            self._acked.pop(tp, None)
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)
        return {}


class RecentCache(OrderedDict):
    """A dict that keeps only the `capacity` most recently set or read keys."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)


def observe_latency(msgs: list[CanonicalMessage], scores: int) -> None:
    """Raw produce -> scored, for the batch's earliest input (the metrics histogram)."""
    if not scores:
        return
    stamps = [m.produced_ns for m in msgs if m.produced_ns]
    if stamps:
        observability.SCORE_LATENCY.observe(max(0.0, (time.time_ns() - min(stamps)) / 1e9))


def run_worker(settings: Settings, loglevel: str = "WARN") -> None:
    """Blocking: run the faust worker until SIGTERM/SIGINT."""
    # wardwatch's handler (JSON lines, or plain text scrubbed of identifiers as every service's), set up
    # here, before the app logs (the model it loads), and faust's own set-up skipped: it adds its
    # plain-text handler on stdout next to any handler given (every line twice, once not as JSON), and
    # its tracebacks are not scrubbed
    observability.configure_logging("worker", loglevel, json_logs=settings.json_logs)
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates its datadir inside, not parents
    app = create_app(settings, topics)
    freeze_startup_heap()  # imports and the loaded model
    watchdog = app.consumption_watchdog
    observability.serve(settings.metrics_port, host=settings.metrics_host,
                        ready=watchdog.ready if watchdog else (lambda: True))
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None  # faust's terminal progress spinner: escape codes on stdout, in a service's log
    worker.execute_from_commandline()
