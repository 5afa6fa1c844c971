"""A live, partition-preserving copy of one topic into another (`wardwatch soak` feeds its chaos
worker the very canonical stream the reference worker reads).

Each record goes to the same partition of the target, in the source's order, with its key, value,
headers (`ww.produced_ns` and the rest) and timestamp. One produce request in flight: a retry may
repeat a record but never reorder two (no idempotent producer: the embedded broker has no
transactions, and the worker's own producer runs without it too). The delivery reports tell
whether the copy is exact: into a fresh target that nobody else writes to, every record must land
at its source offset (`shifted` counts those that did not).
"""

from __future__ import annotations

import logging
import threading
import time

from wardwatch.settings import Settings

log = logging.getLogger(__name__)


class TopicMirror:
    """Copies `source` to `target` in a background thread until stop()."""

    def __init__(self, settings: Settings, source: str, target: str, partitions: int):
        self.settings, self.source, self.target, self.partitions = settings, source, target, partitions
        self.read: dict[int, int] = {}  # partition -> source offset after the last record read
        self.copied: dict[int, int] = {}  # partition -> source offset after the last record the target acked
        self.shifted = 0  # records acked at another offset than their source's
        self.last_read_at = time.monotonic()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TopicMirror":
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.target}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def check(self) -> None:
        """Raise the copy thread's error, if it had one."""
        if self.error is not None:
            raise self.error

    def quiet_for(self) -> float:
        """Seconds since a record was last read from the source."""
        return time.monotonic() - self.last_read_at

    def caught_up(self, ends: dict[int, int]) -> bool:
        """Every source record before `ends` (partition -> offset) is acked on the target."""
        return all(self.copied.get(p, 0) >= n for p, n in ends.items())

    def _delivered(self, err, msg, source_offset: int) -> None:
        if err is not None:
            self.error = RuntimeError(f"mirror: a record could not be copied to {self.target}: {err}")
            return
        if msg.offset() != source_offset:
            self.shifted += 1
        self.copied[msg.partition()] = max(self.copied.get(msg.partition(), 0), source_offset + 1)

    def _run(self) -> None:
        from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, Producer,
                                     TopicPartition)

        config = self.settings.kafka_client_config()
        consumer = Consumer({**config, "group.id": f"{self.settings.group_prefix}-mirror",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        producer = Producer({**config, "acks": "all", "linger.ms": 5, "enable.idempotence": False,
                             "max.in.flight.requests.per.connection": 1})
        consumer.assign([TopicPartition(self.source, p, OFFSET_BEGINNING) for p in range(self.partitions)])
        try:
            while not self._stop.is_set() and self.error is None:
                for msg in consumer.consume(500, timeout=0.1):
                    if msg.error():
                        if msg.error().fatal():
                            raise KafkaException(msg.error())
                        continue  # partition EOF, transient errors
                    p, offset = msg.partition(), msg.offset()
                    ts_type, ts = msg.timestamp()
                    while True:
                        try:
                            producer.produce(self.target, key=msg.key(), value=msg.value(), partition=p,
                                             headers=msg.headers() or [],
                                             timestamp=0 if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                                             on_delivery=lambda err, m, src=offset: self._delivered(err, m, src))
                            break
                        except BufferError:  # local queue full: let deliveries drain it
                            producer.poll(0.1)
                    self.read[p] = offset + 1
                    self.last_read_at = time.monotonic()
                producer.poll(0)
            if producer.flush(30.0) != 0:
                raise TimeoutError(f"mirror: records to {self.target} still unacknowledged after 30 s")
        except BaseException as exc:  # handed to the soak by check()
            self.error = exc
        finally:
            consumer.close()
