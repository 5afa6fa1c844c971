"""Reading back what a `wardwatch worker` group left on Kafka: its table changelog and its outputs.

Shared by the worker restart and rebalance tests (tests/streams/worker_runs.py) and `wardwatch soak`
(wardwatch/soak.py), which compare a disturbed run with an undisturbed one."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import orjson

from streams.app import NEXT_OFFSET_PREFIX
from streams.patient_agent import PatientRecord
from streams.state import PatientState
from streams.topics import Topics
from wardwatch.procs import read_to_end, total_committed
from wardwatch.settings import Settings


@dataclass
class Results:
    """What a worker group left behind, read back from Kafka."""

    state: dict[str, dict]  # patient -> latest PatientRecord (decoded) in the table changelog
    next_offsets: dict[int, int]  # canonical partition -> next offset the table has not applied
    features: dict[str, set[bytes]] = field(default_factory=dict)  # snapshot id -> distinct values seen
    scores: dict[str, set[bytes]] = field(default_factory=dict)
    alerts: dict[str, set[bytes]] = field(default_factory=dict)  # alert id -> distinct values seen
    snapshot_points: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset) scored
    output_records: int = 0
    records_per_id: dict[str, int] = field(default_factory=dict)  # alert id -> times delivered

    def known_fact_ids(self) -> set[str]:
        # read as the worker reads them: a record leaves out the keys its live facts imply (state format 4)
        return {fact for rec in self.state.values() for fact in PatientState.from_dict(rec["s"]).known}

    def records(self) -> dict[str, PatientRecord]:
        """The patient records as the worker reads them, whatever state format each was written in."""
        return {patient: PatientRecord.from_dict(rec) for patient, rec in self.state.items()}

    def differing_repeats(self) -> list[str]:
        """Ids published more than once with different contents (must be none)."""
        return [i for kind in (self.features, self.scores, self.alerts) for i, vs in kind.items() if len(vs) > 1]


def changelog_topic(settings: Settings) -> str:
    return f"{settings.group_prefix}-worker-patient_state-changelog"


def collect_results(settings: Settings, topics: Topics, timeout_s: float = 60.0) -> Results:
    latest: dict[str, bytes | None] = {}
    for _, _, key, value in read_to_end(settings, changelog_topic(settings), topics.partitions, timeout_s):
        latest[orjson.loads(key)] = value  # in offset order per partition; a key lives in one partition
    state = {k: orjson.loads(v) for k, v in latest.items() if v is not None and not k.startswith("__wardwatch")}
    next_offsets = {int(k.removeprefix(NEXT_OFFSET_PREFIX)): int(v) for k, v in latest.items()
                    if k.startswith(NEXT_OFFSET_PREFIX)}
    res = Results(state, next_offsets)
    by_kind = {topics.features: (res.features, lambda d: d["snapshot_id"]),
               topics.scores: (res.scores, lambda d: d["snapshot_id"]),
               topics.alerts: (res.alerts, lambda d: d["header"]["alert_id"])}
    delivered: dict[str, int] = defaultdict(int)
    for topic, (seen, id_of) in by_kind.items():
        grouped: dict[str, set[bytes]] = defaultdict(set)
        for _, _, _, value in read_to_end(settings, topic, topics.partitions, timeout_s):
            d = orjson.loads(value)
            grouped[id_of(d)].add(value)
            res.output_records += 1
            if topic == topics.features:
                res.snapshot_points.add((d["partition"], d["offset"]))
            elif topic == topics.alerts:
                delivered[id_of(d)] += 1
        seen.update(grouped)
    res.records_per_id = dict(delivered)
    return res


def wait_for_progress(settings: Settings, group: str, topic: str, partitions: int, beyond: int, *,
                      deadline: float, alive=None, on_wait=None) -> int:
    """Block until `group` has committed more than `beyond` messages of `topic` in total; returns the
    new total. `on_wait()` runs between checks (default: a 0.1 s sleep)."""
    while True:
        done = total_committed(settings, group, topic, partitions)
        if done > beyond:
            return done
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the worker exited with code {alive.returncode} before committing")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"group {group} committed nothing beyond {beyond} messages in time")
        if on_wait is not None:
            on_wait()
        else:
            time.sleep(0.1)


def recovery_seconds(log_path: Path) -> list[float]:
    """From a worker's INFO log: for each assignment, seconds from being assigned partitions to
    "Worker ready" (changelog recovery included). Reads JSON lines (the default), wardwatch's plain
    text (WARDWATCH_JSON_LOGS=false) and faust's own (workers before it was replaced)."""
    out, assigned = [], None
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):  # {"ts": "2026-11-26T12:59:38.141Z", ..., "msg": ...}
            try:
                entry = orjson.loads(line)
                at, msg = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ"), str(entry["msg"])
            except (ValueError, KeyError, TypeError):
                continue
        elif line.startswith("["):  # faust's: [2026-11-26 12:59:38,141] [pid] [INFO] ...
            try:
                at, msg = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"), line
            except ValueError:
                continue
        elif line[:1].isdigit():  # wardwatch's plain text: 2026-11-26 12:59:38,141 INFO worker ...
            try:
                at, msg = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line
            except ValueError:
                continue
        else:
            continue
        if "Executing _on_partitions_assigned" in msg:
            assigned = at
        elif "Recovery]: Worker ready" in msg and assigned is not None:
            out.append((at - assigned).total_seconds())
            assigned = None
    return out


def wait_for_applied(settings: Settings, topics: Topics, ends: dict, *, deadline: float, on_wait=None) -> None:
    """Block until the worker's table has applied every canonical message up to `ends` ((topic,
    partition) -> offset after the last message), by the table's own next-offset markers in its
    changelog. Correctness rests on those markers; the worker commits them once durable
    (streams.app.AppliedOffsetCommitter), but a commit lost to a rebalance only lands with the next
    batch, so this does not wait on commits.

    Read-only: it tails the changelog with a client of its own (assigned, never in a group) and writes
    nothing. `collect_results` appends end markers to every topic it reads, which must not land in the
    changelog of a worker that is still running: the worker reads them back (as a standby, or in its
    next recovery) as records it cannot decode. `on_wait()` runs between polls (e.g. to check that the
    workers are alive)."""
    from confluent_kafka import Consumer, TopicPartition

    wanted = {p: n for (_, p), n in ends.items()}
    applied: dict[int, int] = {}
    marker_prefix = orjson.dumps(NEXT_OFFSET_PREFIX)[:-1]  # the JSON-encoded key without its closing quote
    reader = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-applied-reader",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    reader.assign([TopicPartition(changelog_topic(settings), p, 0) for p in range(topics.partitions)])
    try:
        while True:
            for msg in reader.consume(1000, timeout=0.2):
                key, value = msg.key(), msg.value()
                if msg.error() or value is None or not key or not key.startswith(marker_prefix):
                    continue
                # in offset order per partition: the last marker read is the table's latest
                applied[int(orjson.loads(key).removeprefix(NEXT_OFFSET_PREFIX))] = int(value)
            behind = {p: n for p, n in wanted.items() if applied.get(p, 0) < n}
            if not behind:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the worker has not applied everything: partitions behind {sorted(behind)} "
                                   f"(applied {dict(sorted(applied.items()))}, wanted {dict(sorted(wanted.items()))})")
            if on_wait is not None:
                on_wait()
    finally:
        reader.close()
