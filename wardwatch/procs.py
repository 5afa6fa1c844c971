"""Child processes of the demo, tests and benchmarks: wardwatch services started with the same
settings (passed as WARDWATCH_* environment variables) and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from wardwatch.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly these settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):  # the comma-separated form the setting reads (str() would be "['a']")
            value = ",".join(value)
        env[f"WARDWATCH_{name.upper()}"] = str(value)
    return env


def start_service(command: list[str], settings: Settings, log_path: Path | None = None) -> subprocess.Popen:
    """Start `wardwatch <command>` as a child with `settings`; stdout/stderr go to log_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDWATCH_")}
    env.update(settings_env(settings))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "wardwatch", *command], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log_path:
            out.close()


def start_http_service(command: list[str], settings: Settings, log_path: Path, *, timeout_s: float = 60.0
                       ) -> tuple[subprocess.Popen, int]:
    """Start an HTTP service (`receiver`, `cds`) as start_service does and wait until it listens;
    returns the process and its port. Give the service port 0 in `settings`: it binds a free port
    itself, so no other process can take it between a pick and the bind (wardwatch/listen.py)."""
    from wardwatch.listen import wait_for_listening

    offset = log_path.stat().st_size if log_path.exists() else 0  # a log appended to by an earlier run
    proc = start_service(command, settings, log_path)
    try:
        return proc, wait_for_listening(proc, log_path, offset=offset, timeout_s=timeout_s)
    except BaseException:
        stop_service(proc)
        raise


def stop_service(proc: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
    return proc.returncode


def kill_service(proc: subprocess.Popen) -> None:
    """SIGKILL (crash simulation)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def check_alive(procs: dict[str, subprocess.Popen], logs: Path) -> None:
    """Raise a clear error naming the service and its log when a child service has exited."""
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} service exited with code {proc.returncode}: see {logs / name}.log")


def wait_for_group(settings: Settings, group_id: str, timeout_s: float = 60.0,
                   alive: subprocess.Popen | None = None) -> None:
    """Block until consumer group `group_id` is Stable (its members joined and got partitions)."""
    import time

    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the process for consumer group {group_id} exited with code {alive.returncode}")
        try:
            state = admin.describe_consumer_groups([group_id])[group_id].result(timeout=5).state
            if state == ConsumerGroupState.STABLE:
                return
        except Exception:  # group not known yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"consumer group {group_id} did not become stable within {timeout_s:.0f}s")


def committed_offsets(settings: Settings, group_id: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The group's committed offsets (OffsetFetch answers exactly on Tansu, unlike end-offset queries)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    request = ConsumerGroupTopicPartitions(group_id, [TopicPartition(t, p) for t, p in partitions])
    result = admin.list_consumer_group_offsets([request])[group_id].result(timeout=10)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}


def wait_for_commits(settings: Settings, group_id: str, targets: dict[tuple[str, int], int], *,
                     deadline: float, on_wait=None) -> None:
    """Block until `group_id` has committed at least `targets` (offset after the last message) on
    every partition: every message up to there is processed and its outputs acknowledged.
    `on_wait()` runs between checks (e.g. keep consuming outputs, check children are alive)."""
    import time

    if not targets:  # nothing to wait for (the admin API refuses an empty partition list)
        return
    while True:
        done = committed_offsets(settings, group_id, list(targets))
        behind = {tp: n for tp, n in targets.items() if done.get(tp, -1) < n}
        if not behind:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"consumer group {group_id} has not processed everything: {len(behind)} "
                               f"partitions behind, e.g. {next(iter(behind))}")
        if on_wait is not None:
            on_wait()
        else:
            time.sleep(0.2)


END_MARKER_KEY = b"__wardwatch_end_marker__"


def read_to_end(settings: Settings, topic: str, partitions: int,
                timeout_s: float = 60.0) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of `topic` as (partition, offset, key, value), in offset order per partition.

    The embedded broker reports end offsets too low (the base offset of the last record batch + 1),
    so an end offset cannot say when a read is complete. Instead this appends an end marker (a
    tombstone keyed END_MARKER_KEY, left out of the result) to every partition and reads up to it.
    For topics nobody else consumes afterwards (tests, benchmarks), and only once their writers stopped."""
    import time

    from confluent_kafka import Consumer, Producer, TopicPartition

    marks: dict[int, int] = {}

    def delivered(err, msg) -> None:
        if err is None:
            marks[msg.partition()] = msg.offset()

    producer = Producer({**settings.kafka_client_config(), "linger.ms": 0, "acks": "all"})
    for p in range(partitions):
        producer.produce(topic, key=END_MARKER_KEY, value=None, partition=p, on_delivery=delivered)
    if producer.flush(timeout_s) != 0 or len(marks) != partitions:
        raise TimeoutError(f"could not append end markers to {topic} within {timeout_s:.0f}s")
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: list[tuple[int, int, bytes | None, bytes | None]] = []
    reached: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(reached) < partitions:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{topic}: read {len(records)} records but not up to the end markers of "
                                   f"partitions {sorted(set(marks) - reached)} within {timeout_s:.0f}s")
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error():
                    continue
                p, offset = msg.partition(), msg.offset()
                if p in reached or offset > marks[p]:
                    continue
                if offset == marks[p]:
                    reached.add(p)
                elif msg.key() != END_MARKER_KEY:
                    records.append((p, offset, msg.key(), msg.value()))
    finally:
        consumer.close()
    return records


def total_committed(settings: Settings, group_id: str, topic: str, partitions: int) -> int:
    """The sum of a group's committed offsets on `topic` (0 where it has committed nothing): a
    progress gauge for waiting on a consumer without reading its outputs."""
    done = committed_offsets(settings, group_id, [(topic, p) for p in range(partitions)])
    return sum(max(n, 0) for n in done.values())

