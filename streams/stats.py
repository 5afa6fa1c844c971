"""Counters snapshots on the compacted stats topic: how services publish them, how `wardwatch stats` reads them.

Record format on `<prefix>.stats` (compacted: the latest record per key is the instance's current state):

    key    "<service>:<hostname>:<pid>:<start ms>"   one key per running instance, e.g. "ingest:host1:4242:1764065869000"
    value  {"service": "ingest",                     which service wrote it
            "instance": <the key>,
            "started_at_ms": int, "updated_at_ms": int,   wall clock (only says how fresh the snapshot is)
            "counters": {...}}                       the service's cumulative counters since it started

Counters are cumulative per instance, so the totals of a service are the sum over its instances'
latest snapshots (an instance that stopped keeps its final snapshot: totals cover every run since
the topic began). `counters` is a nested JSON object whose leaves are integers; summing merges
objects key by key and adds the integers, so any service can publish any counters without a change
here. The ingest worker publishes IngestCounters.snapshot():

    {"cdc":  {"messages_in", "messages_parsed", "events_out", "dead_lettered": {reason: n},
              "control": {kind: n}, "ignored": {kind: n}, "skipped": {kind: n}},
     "fhir": {... the same ...}, "canonical_messages": n, "batches": n}

A nested object with `messages_in` is a *source*: `wardwatch stats` checks its accounting equation
messages_in == messages_parsed + dead_lettered + control + ignored.

Hook for other services (e.g. the patient worker in streams/app.py): create a
`StatsPublisher("worker", snapshot_fn, producer, topics.stats)` next to the service's producer,
call `maybe_publish()` from its loop (after its outputs are flushed) and `publish()` at shutdown,
with counters such as {"dedupe": {"duplicates": n, ...}, "late": {"events": n}}.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable

import orjson

from wardwatch import observability

log = logging.getLogger(__name__)

Counters = dict[str, Any]  # nested JSON object, integer leaves


def instance_key(service: str, started_at_ms: int) -> str:
    return f"{service}:{socket.gethostname()}:{os.getpid()}:{started_at_ms}"


def stats_record(service: str, instance: str, started_at_ms: int, updated_at_ms: int, counters: Counters) -> bytes:
    return orjson.dumps({"service": service, "instance": instance, "started_at_ms": started_at_ms,
                         "updated_at_ms": updated_at_ms, "counters": counters})


class StatsPublisher:
    """Publishes `snapshot()` under this instance's key, at most every `interval_s` and at shutdown.

    Uses the service's own producer (so the record goes out with its next flush). A failed delivery
    is logged, not raised: the counters are about the data path, not part of it. `not_sent` counts
    the snapshots the producer did not take (queue full, or refused at once, e.g. a missing topic)."""

    def __init__(self, service: str, snapshot: Callable[[], Counters], producer, topic: str, *,
                 interval_s: float = 2.0, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000):
        self.service = service
        self.topic = topic
        self.interval_s = interval_s
        self._snapshot = snapshot
        self._producer = producer
        self._clock_ms = clock_ms
        self.started_at_ms = clock_ms()
        self.key = instance_key(service, self.started_at_ms)
        self._last_publish = float("-inf")
        self.not_sent = 0
        observability.expose_counters(service, snapshot)  # the same counters on /metrics

    def maybe_publish(self, now_s: float | None = None) -> bool:
        """Publish when interval_s has passed since the last one (monotonic clock). True if it did."""
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_publish < self.interval_s:
            return False
        self.publish()
        self._last_publish = now_s
        return True

    def publish(self) -> None:
        from confluent_kafka import KafkaException

        from streams.commits import kafka_error

        value = stats_record(self.service, self.key, self.started_at_ms, self._clock_ms(), self._snapshot())
        try:
            self._producer.produce(self.topic, key=self.key.encode(), value=value, headers=[],
                                   on_delivery=_log_failure)
        except BufferError:  # local queue full: skip this snapshot, the next one carries the same totals
            self.not_sent += 1
            log.warning("stats snapshot skipped: producer queue full")
        except KafkaException as exc:  # e.g. the stats topic is missing: never stop the service for it
            self.not_sent += 1
            error = kafka_error(exc)
            reason = error.name() if error is not None else "KafkaException"  # never the snapshot itself
            log.warning("stats snapshot not sent to %s: %s", self.topic, reason)


def _log_failure(err, msg) -> None:
    if err is not None:
        log.warning("stats snapshot not delivered to %s: %s", msg.topic(), err)


# --- reading and summing (pure) ------------------------------------------------------------------


def latest_per_instance(records: list[tuple[bytes | None, bytes | None]]) -> dict[str, dict[str, Any]]:
    """(key, value) in topic order -> the last readable record per key. Unreadable values are skipped
    (the stats topic is diagnostics: one bad record must not hide the others)."""
    latest: dict[str, dict[str, Any]] = {}
    for key, value in records:
        if key is None:
            continue
        if value is None:  # a tombstone removes the instance
            latest.pop(key.decode(errors="replace"), None)
            continue
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("unreadable stats record skipped")
            continue
        if isinstance(record, dict) and isinstance(record.get("service"), str) and isinstance(record.get("counters"), dict):
            latest[key.decode(errors="replace")] = record
    return latest


def add_counters(total: Counters, more: Counters) -> Counters:
    """Merge nested counters: objects key by key, integers added. Returns a new dict."""
    out = dict(total)
    for name, value in more.items():
        mine = out.get(name)
        if isinstance(value, dict):
            out[name] = add_counters(mine if isinstance(mine, dict) else {}, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = (mine if isinstance(mine, (int, float)) else 0) + value
    return out


def source_balanced(source: Counters) -> bool:
    """The accounting equation of one source: every message in is accounted for exactly once."""
    return source.get("messages_in", 0) == (source.get("messages_parsed", 0) + _total(source.get("dead_lettered"))
                                            + _total(source.get("control")) + _total(source.get("ignored")))


def _total(counts: Any) -> int:
    return sum(v for v in counts.values() if isinstance(v, int)) if isinstance(counts, dict) else 0


def summarize(latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sum the latest snapshot of every instance per service; check each source's accounting.

    {"services": {service: {"instances": n, "updated_at_ms": newest, "counters": summed,
                            "balanced": {source: bool}}},
     "balanced": bool}   (true when every source of every service balances)"""
    services: dict[str, dict[str, Any]] = {}
    for record in latest.values():
        s = services.setdefault(record["service"], {"instances": 0, "updated_at_ms": 0, "counters": {}})
        s["instances"] += 1
        s["updated_at_ms"] = max(s["updated_at_ms"], int(record.get("updated_at_ms") or 0))
        s["counters"] = add_counters(s["counters"], record["counters"])
    for s in services.values():
        s["balanced"] = {name: source_balanced(c) for name, c in s["counters"].items()
                         if isinstance(c, dict) and "messages_in" in c}
    return {"services": dict(sorted(services.items())),
            "balanced": all(ok for s in services.values() for ok in s["balanced"].values())}


# --- wiring: read the topic ----------------------------------------------------------------------


def read_stats(settings, topics, *, timeout_s: float = 10.0, quiet_s: float = 0.3) -> dict[str, dict[str, Any]]:
    """Read the stats topic from the beginning to its end: the latest record per instance.

    The end is where the high watermarks were when we started, plus quiet_s more of reading (the
    embedded broker may report watermarks too low, so they alone do not prove the end). The quiet_s
    counts from reaching those watermarks, not from the last record: services keep publishing, and
    with a few instances a gap of quiet_s between records may never come.
    Raises TimeoutError when the end is not reached within timeout_s."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-stats-reader",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10, "enable.partition.eof": False})
    deadline = time.monotonic() + timeout_s
    try:
        metadata = consumer.list_topics(topics.stats, timeout=timeout_s)
        topic_md = metadata.topics.get(topics.stats)
        if topic_md is None or topic_md.error is not None or not topic_md.partitions:
            raise KafkaException(f"stats topic {topics.stats} not found: is WARDWATCH_TOPIC_PREFIX right, "
                                 "and were the topics created (any wardwatch service creates them)?")
        partitions = sorted(topic_md.partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topics.stats, p), timeout=timeout_s)[1]
                for p in partitions}
        consumer.assign([TopicPartition(topics.stats, p, OFFSET_BEGINNING) for p in partitions])
        records: list[tuple[bytes | None, bytes | None]] = []
        position = {p: 0 for p in partitions}
        reached_ends_at = None
        while True:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"could not read the stats topic {topics.stats} to its end within {timeout_s:.0f}s")
            batch = consumer.consume(num_messages=500, timeout=0.1)
            for msg in batch:
                if msg.error() is None:
                    records.append((msg.key(), msg.value()))
                    position[msg.partition()] = msg.offset() + 1
            if reached_ends_at is None and all(position[p] >= ends[p] for p in partitions):
                reached_ends_at = time.monotonic()
            if reached_ends_at is not None and time.monotonic() - reached_ends_at >= quiet_s:
                return latest_per_instance(records)
    finally:
        consumer.close()


# --- presentation --------------------------------------------------------------------------------

_SOURCE_ROWS = (("messages in", "messages_in"), ("canonical-producing messages", "messages_parsed"),
                ("canonical events", "events_out"), ("dead-lettered", "dead_lettered"), ("control", "control"),
                ("ignored", "ignored"), ("skipped inside messages", "skipped"))


def stats_table(summary: dict[str, Any]):
    """A rich Table of summarize()'s result: per service, each source's counts with by-kind detail."""
    from rich.table import Table

    table = Table(title="wardwatch counters (latest snapshot of every instance, summed)")
    for name, justify in (("service", "left"), ("counter", "left"), ("source / kind", "left"), ("count", "right")):
        table.add_column(name, justify=justify)
    for service, s in summary["services"].items():
        rows = _service_rows(s)
        label = f"{service} ({s['instances']} instance{'s' if s['instances'] != 1 else ''})"
        for i, row in enumerate(rows):
            table.add_row(label if i == 0 else "", *row)
        table.add_section()
    return table


def _service_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for source, counters in s["counters"].items():
        if source not in s["balanced"]:  # not a source: any other counters, by their path
            rows += [(path, "", str(n)) for path, n in _flatten(source, counters)]
            continue
        for title, name in _SOURCE_ROWS:
            value = counters.get(name, 0)
            rows.append((title, source, str(_total(value) if isinstance(value, dict) else value)))
            if isinstance(value, dict):
                rows += [("", f"  {kind}", str(n)) for kind, n in sorted(value.items())]
        ok = s["balanced"][source]
        rows.append(("accounting equation", source, "[green]holds[/]" if ok else "[red]BROKEN[/]"))
    return rows


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in sorted(value.items()) for row in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]
