"""Shared by the worker restart and rebalance tests: a synthetic canonical stream, publishing it, and
reading back everything the `wardwatch worker` processes produced (table changelog and outputs: the
readers live in wardwatch/worker_results.py, which `wardwatch soak` uses too)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable

from confluent_kafka import Producer

from batch.directional import CALM  # NEWS2 0
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, encode_batch
from wardwatch.settings import Settings
from wardwatch.worker_results import collect_results, recovery_seconds, wait_for_progress  # noqa: F401 (re-exported)

T0 = 1_718_000_000_000
ROW_MS = 15 * 60_000
SICK = {codes.RESP_RATE: 27, codes.SPO2: 90, codes.O2_FLOW: 2.0, codes.SYSTOLIC_BP: 88, codes.HEART_RATE: 135,
        codes.CONSCIOUSNESS: 3, codes.TEMPERATURE: 39.5}  # NEWS2 well above 7


def canonical_messages(patients: int, rows: int) -> list[tuple[bytes, bytes, set[str]]]:
    """(key, value, fact ids) of canonical messages, one vitals row (7 events) each, patients
    interleaved in event-time order. Each patient swings between calm and sick, so alerts open and
    resolve several times."""
    out = []
    for r in range(rows):
        for i in range(patients):
            patient = f"p{i:03d}"
            row_id = i * 10_000 + r
            values = SICK if (r // 6 + i) % 3 == 0 else CALM
            t = T0 + r * ROW_MS + i * 1000
            events = [CanonicalEvent(patient_id=patient, code=code, value=float(v), unit=None, effective_ms=t,
                                     issued_ms=t, status=Status.FINAL, source=Source.CDC,
                                     fact_id=f"cdc:vital_signs:{row_id}:{code}", version=1)
                      for code, v in values.items()]
            out.append((patient.encode(), encode_batch(events), {e.fact_id for e in events}))
    return out


class Publisher:
    """Publishes canonical messages keyed by patient with murmur2 (what the worker's changelog
    partitioning requires), optionally paced, in a background thread; records where each landed."""

    def __init__(self, settings: Settings, topic: str, messages, rate: float | None = None):
        self.settings, self.topic, self.messages, self.rate = settings, topic, messages, rate
        self.end_offsets: dict[tuple[str, int], int] = {}
        self.delivered = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="canonical-publisher", daemon=True)

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.error = RuntimeError(f"publish failed: {err}")
            return
        tp = (msg.topic(), msg.partition())
        self.end_offsets[tp] = max(self.end_offsets.get(tp, 0), msg.offset() + 1)
        self.delivered += 1

    def _run(self) -> None:
        try:
            producer = Producer({**self.settings.kafka_client_config(), "partitioner": "murmur2_random",
                                 "linger.ms": 5, "acks": "all"})
            started = time.monotonic()
            for n, (key, value, _) in enumerate(self.messages):
                if self.rate:  # pace: message n goes out at n / rate seconds
                    ahead = n / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        producer.poll(0)
                        time.sleep(ahead)
                producer.produce(self.topic, key=key, value=value, on_delivery=self._delivered)
                producer.poll(0)
            if producer.flush(30) != 0:
                raise RuntimeError("the canonical publisher could not deliver within 30 s")
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> "Publisher":
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout_s: float) -> dict[tuple[str, int], int]:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"publishing {len(self.messages)} canonical messages took over {timeout_s:.0f}s")
        if self.error:
            raise self.error
        return self.end_offsets


def assigned_partitions(log_path: Path, topic: str) -> set[int] | None:
    """The partitions of `topic` a worker was assigned last, read from its INFO log: the embedded
    broker lists no members in DescribeGroups, so the worker's own account is the only one. aiokafka
    logs the whole assignment at each rebalance (in JSON lines or plain text alike)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    # an empty assignment is logged as 'set()': it must read as no partitions, not as the one before
    assigned = re.findall(r"Setting newly assigned partitions (set\(\)|\{.*?\}) for group", text)
    if not assigned:
        return None
    return {int(p) for p in re.findall(r"topic='" + re.escape(topic) + r"', partition=(\d+)", assigned[-1])}


def wait_for_assignment(log_path: Path, topic: str, want: Callable[[set[int]], bool], *, deadline: float,
                        alive=None) -> set[int]:
    """Block until the worker logging to `log_path` holds partitions of `topic` that satisfy `want`."""
    while True:
        got = assigned_partitions(log_path, topic)
        if got is not None and want(got):
            return got
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the worker exited with code {alive.returncode}: see {log_path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{log_path.name}: assigned {got} of {topic}, not what the test waits for")
        time.sleep(0.1)
