"""Counters and gauges snapshots on the compacted stats topic: how services publish them, how `wardwatch stats` reads them.

Record format on `<prefix>.stats` (compacted: the latest record per key is the instance's current state):

    key    "<service>:<hostname>:<pid>:<start ms>"   one key per running instance, e.g. "ingest:host1:4242:1764065869000"
    value  {"service": "ingest",                     which service wrote it
            "instance": <the key>,
            "started_at_ms": int, "updated_at_ms": int,   wall clock (only says how fresh the snapshot is)
            "interval_ms": int,                      how often the instance publishes
            "counters": {...},                       the service's cumulative counters since it started
            "gauges": {...},                         its current values (may be absent: none)
            "stopped": true}                         only on the final snapshot of a clean shutdown

Two kinds of values, two rules:

- Counters are cumulative per instance (since *this* instance started), so the totals of a service
  are the sum over its instances' latest snapshots (an instance that stopped keeps its final
  snapshot: totals cover every run since the topic began). `counters` is a nested JSON object whose
  leaves are integers; summing merges objects key by key and adds the integers, so any service can
  publish any counters without a change here.
- Gauges are values as of the snapshot (the subscription watcher's `open_gaps`, `caught_up`,
  `stalled_partitions`, the subscriptions it tracks). They are never summed: a stopped instance's
  last `open_gaps` says nothing about now, and after a restart the new instance reports the same
  gaps again. `summarize` keeps the gauges of the *live* instances only, one entry per instance:
  live = its latest snapshot is not marked `stopped` and is at most LIVE_WINDOW_MS (or 5 publishing
  intervals, if longer) older than the reader's clock. A killed instance (no final snapshot) thus
  drops out after that window.

Records written before gauges existed (no `gauges` object) are read too: their counters are summed
as before, except the subscription watcher's values that are gauges now (LEGACY_GAUGES), which are
moved to its gauges.

The ingest worker publishes IngestCounters.snapshot():

    {"cdc":  {"messages_in", "messages_parsed", "events_out", "dead_lettered": {reason: n},
              "control": {kind: n}, "ignored": {kind: n}, "skipped": {kind: n}},
     "fhir": {... the same ...}, "canonical_messages": n, "batches": n}

A nested object with `messages_in` is a *source*: `wardwatch stats` checks its accounting equation
messages_in == messages_parsed + dead_lettered + control + ignored.

Hook for other services (e.g. the patient worker in streams/app.py): create a
`StatsPublisher("worker", snapshot_fn, producer, topics.stats, gauges=gauges_fn)` next to the
service's producer, call `maybe_publish()` from its loop (after its outputs are flushed) and
`publish(final=True)` at shutdown, with counters such as {"dedupe": {"duplicates": n, ...},
"late": {"events": n}}. A value that can go down belongs in the gauges; a count a restarted
instance restores from a state topic is published as the part this instance counted (as the
subscription watcher does), so that it still sums.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any, Callable

import orjson

from wardwatch import observability

log = logging.getLogger(__name__)

Counters = dict[str, Any]  # nested JSON object, integer leaves (gauges have the same shape)

LIVE_WINDOW_MS = 30_000  # a snapshot older than this (or 5 publishing intervals) is of a gone instance
DEFAULT_INTERVAL_MS = 2_000  # records written before `interval_ms` existed: the default stats_interval_s
# records written before `gauges` existed: per service, the counters objects that held gauges, and the
# keys in them that are counters (every other key there was a gauge)
LEGACY_GAUGES = {"subscriptions": {"subscriptions": {"messages", "unreadable", "unattributed"}}}


def instance_key(service: str, started_at_ms: int) -> str:
    return f"{service}:{socket.gethostname()}:{os.getpid()}:{started_at_ms}"


def stats_record(service: str, instance: str, started_at_ms: int, updated_at_ms: int, counters: Counters,
                 gauges: Counters | None = None, *, interval_ms: int = DEFAULT_INTERVAL_MS,
                 stopped: bool = False) -> bytes:
    record = {"service": service, "instance": instance, "started_at_ms": started_at_ms,
              "updated_at_ms": updated_at_ms, "interval_ms": interval_ms, "counters": counters,
              "gauges": gauges or {}}
    if stopped:
        record["stopped"] = True
    return orjson.dumps(record)


class StatsPublisher:
    """Publishes `snapshot()` (counters) and `gauges()` under this instance's key, at most every
    `interval_s` and at shutdown (`publish(final=True)`: marks the instance stopped).

    Uses the service's own producer (so the record goes out with its next flush). A failed delivery
    is logged, not raised: the counters are about the data path, not part of it. `not_sent` counts
    the snapshots the producer did not take (queue full, or refused at once, e.g. a missing topic)."""

    def __init__(self, service: str, snapshot: Callable[[], Counters], producer, topic: str, *,
                 gauges: Callable[[], Counters] | None = None, interval_s: float = 2.0,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000):
        self.service = service
        self.topic = topic
        self.interval_s = interval_s
        self._snapshot = snapshot
        self._gauges = gauges or dict
        self._producer = producer
        self._clock_ms = clock_ms
        self.started_at_ms = clock_ms()
        self.key = instance_key(service, self.started_at_ms)
        self._last_publish = float("-inf")
        self.not_sent = 0
        observability.expose_counters(service, snapshot)  # the same counters and gauges on /metrics
        if gauges is not None:
            observability.expose_gauges(service, gauges)

    def maybe_publish(self, now_s: float | None = None) -> bool:
        """Publish when interval_s has passed since the last one (monotonic clock). True if it did."""
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_publish < self.interval_s:
            return False
        self.publish()
        self._last_publish = now_s
        return True

    def publish(self, *, final: bool = False) -> None:
        """Send a snapshot now; `final` (at a clean shutdown) marks the instance stopped, so its
        gauges stop counting as current at once."""
        from confluent_kafka import KafkaException

        from streams.commits import kafka_error

        value = stats_record(self.service, self.key, self.started_at_ms, self._clock_ms(), self._snapshot(),
                             self._gauges(), interval_ms=int(self.interval_s * 1000), stopped=final)
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
            latest[key.decode(errors="replace")] = record  # summarize() reads it in the current format
    return latest


def _current_format(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the current format has it: an old one (no `gauges`) gets its gauges moved out of
    its counters (LEGACY_GAUGES); a `gauges` that is not an object counts as none."""
    if "gauges" in record:
        return record if isinstance(record["gauges"], dict) else {**record, "gauges": {}}
    counters, gauges = dict(record["counters"]), {}
    for name, counter_keys in LEGACY_GAUGES.get(record["service"], {}).items():
        values = counters.get(name)
        if isinstance(values, dict):
            counters[name] = {k: v for k, v in values.items() if k in counter_keys}
            gauges[name] = {k: v for k, v in values.items() if k not in counter_keys}
    return {**record, "counters": counters, "gauges": gauges}


def is_live(record: dict[str, Any], now_ms: int) -> bool:
    """Whether the instance that wrote `record` (its latest snapshot) is still running, as far as
    the topic can say: not stopped cleanly, and heard from recently."""
    if record.get("stopped") is True:
        return False
    interval_ms = record.get("interval_ms")
    interval_ms = interval_ms if isinstance(interval_ms, int) and interval_ms > 0 else DEFAULT_INTERVAL_MS
    updated = record.get("updated_at_ms")
    return isinstance(updated, int) and now_ms - updated <= max(LIVE_WINDOW_MS, 5 * interval_ms)


def _updated_ms(record: dict[str, Any]) -> int:
    """Its updated_at_ms, 0 when it is no finite number: one record of another shape must not stop
    `wardwatch stats` from showing the others."""
    updated = record.get("updated_at_ms")
    if isinstance(updated, float) and math.isfinite(updated):
        return int(updated)
    return updated if isinstance(updated, int) and not isinstance(updated, bool) else 0


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


def summarize(latest: dict[str, dict[str, Any]], now_ms: int | None = None) -> dict[str, Any]:
    """Sum the counters of the latest snapshot of every instance per service; check each source's
    accounting; keep the gauges of the live instances (is_live at now_ms, default the wall clock),
    per instance, never summed.

    {"services": {service: {"instances": n, "live_instances": n, "updated_at_ms": newest,
                            "counters": summed over every instance,
                            "gauges": {instance key: {"updated_at_ms": ms, "values": gauges}},  (live only)
                            "gauges_left_out": n,   (instances with gauges, stopped or silent: not shown)
                            "balanced": {source: bool}}},
     "balanced": bool}   (true when every source of every service balances)"""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    services: dict[str, dict[str, Any]] = {}
    for key, record in sorted(latest.items()):
        record = _current_format(record)
        s = services.setdefault(record["service"], {"instances": 0, "live_instances": 0, "updated_at_ms": 0,
                                                    "counters": {}, "gauges": {}, "gauges_left_out": 0})
        s["instances"] += 1
        s["updated_at_ms"] = max(s["updated_at_ms"], _updated_ms(record))
        s["counters"] = add_counters(s["counters"], record["counters"])
        if is_live(record, now_ms):
            s["live_instances"] += 1
            if record["gauges"]:
                s["gauges"][key] = {"updated_at_ms": _updated_ms(record), "values": record["gauges"]}
        elif record["gauges"]:
            s["gauges_left_out"] += 1
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

    table = Table(title="wardwatch counters (latest snapshot of every instance, summed) and gauges "
                        "(current values of each live instance, never summed)")
    for name, justify in (("service", "left"), ("counter", "left"), ("source / kind", "left"), ("count", "right")):
        table.add_column(name, justify=justify)
    for service, s in summary["services"].items():
        rows = _service_rows(s) + _gauge_rows(s)
        label = (f"{service} ({s['instances']} instance{'s' if s['instances'] != 1 else ''}, "
                 f"{s.get('live_instances', 0)} live)")
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


def _gauge_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Gauges per live instance, named by host:pid (the key without the service and start time)."""
    rows = []
    for key, entry in s.get("gauges", {}).items():
        parts = key.split(":")
        instance = ":".join(parts[1:3]) if len(parts) >= 4 else key
        rows += [(f"gauge {path}", f"now, {instance}", str(n))
                 for name, values in entry["values"].items() for path, n in _flatten(name, values)]
    if s.get("gauges_left_out"):
        rows.append(("gauges not shown", "stopped or silent instances", str(s["gauges_left_out"])))
    return rows


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in sorted(value.items()) for row in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]
