"""The worker's consumption watchdog: a thread that notices a worker which applies nothing.

Every `interval_s` it reads the worker's assigned canonical partitions and the offsets its table has
applied, asks the broker for those partitions' watermarks with its own client, and feeds both to a
`ConsumptionWatch` (streams/progress.py, the logic). When a partition has had messages waiting and
none was applied for `stall_after_s`, the worker logs one critical line (partitions, lag, seconds;
never message content) and exits: in compose (`restart: unless-stopped`) the restart re-joins the
group and recovers, and exiting at any moment loses nothing (docs/patient-state.md, "Durability").

A thread, not a faust timer, and its own confluent-kafka client, not faust's: the stall it looks
for may be faust's fetcher or the event loop itself, and a timer on a stuck loop never fires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from confluent_kafka import Consumer, TopicPartition

from streams.progress import ConsumptionWatch
from wardwatch import observability
from wardwatch.settings import Settings

log = logging.getLogger("wardwatch.worker")

WATERMARK_TIMEOUT_S = 5.0
STALL_EXIT_CODE = 70  # as a batch that could not be completed: the supervisor restarts the worker


def check_interval(stall_after_s: float) -> float:
    return max(0.5, min(10.0, stall_after_s / 6))


class WatermarkProbe:
    """(low, high) watermarks of partitions of one topic, from a client of its own (no group)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic, self._settings = topic, settings
        self._client: Consumer | None = None  # created at the first look: an app built and never run has none

    def watermarks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        if self._client is None:
            # group.id only because librdkafka asks for one; this client never joins, subscribes or commits
            self._client = Consumer({**self._settings.kafka_client_config("worker-watchdog"),
                                     "group.id": f"{self._settings.group_prefix}-worker-watchdog",
                                     "enable.auto.commit": False})
        return {p: self._client.get_watermark_offsets(TopicPartition(self.topic, p), timeout=WATERMARK_TIMEOUT_S,
                                                      cached=False) for p in partitions}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class StallWatchdog:
    """Runs the watch in a daemon thread; `ready()` is the worker's /readyz.

    `read_applied()` returns {assigned partition: next offset applied, or None}, and raises when it
    cannot tell (the consumer is not started, or mid-rebalance). `busy()` is True while the worker
    rebalances or recovers its table: it is not ready then, and that time does not count towards a
    stall: recovering a large table takes minutes, and exiting in the middle would only start it
    again, for ever."""

    def __init__(self, stall_after_s: float, probe: WatermarkProbe, read_applied: Callable[[], dict[int, int | None]],
                 busy: Callable[[], bool], on_stall: Callable[[dict[int, float], dict[int, int]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watch = ConsumptionWatch(stall_after_s)
        self.interval_s = check_interval(stall_after_s)
        self.probe, self.read_applied, self.busy, self.clock = probe, read_applied, busy, clock
        self.on_stall = on_stall or exit_on_stall
        self._last_observed: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the watch is read by the metrics server's threads too
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> None:
        observability.expose_gauges("worker", self.gauges)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """One observation; calls `on_stall` if a partition is stalled."""
        if self.busy():  # rebalancing or recovering: every window starts again afterwards
            with self._lock:
                self.watch.unobservable()
                self._last_observed = None
            return
        try:
            applied = self.read_applied()
            watermarks = self.probe.watermarks(sorted(applied))
        except Exception as exc:  # broker away, consumer not started, assignment changing
            log.info("consumption watchdog: no observation this round (%s)", type(exc).__name__)
            with self._lock:
                self.watch.unobservable()
                self._last_observed = None
            return
        now = self.clock()
        with self._lock:
            self.watch.observe(now, applied, watermarks)
            self._last_observed = now
            stalled = self.watch.stalled(now)
            lag = {p: self.watch.lag[p] for p in stalled}
        if stalled:
            self.on_stall(stalled, lag)

    def ready(self) -> bool:
        """Observed recently, not rebalancing or recovering, and no partition stalled."""
        now = self.clock()
        with self._lock:
            observed = self._last_observed is not None and now - self._last_observed <= 3 * self.interval_s
            stalled = self.watch.stalled(now)
        return observed and not stalled and not self.busy()

    def gauges(self) -> dict:
        with self._lock:
            return {"consumption": {"lag": sum(self.watch.lag.values()),
                                    "seconds_without_progress": int(self.watch.seconds_without_progress(self.clock()))}}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
        self.probe.close()


def exit_on_stall(stalled: dict[int, float], lag: dict[int, int]) -> None:
    parts = ", ".join(f"{p} (lag {lag[p]}, {seconds:.0f} s)" for p, seconds in sorted(stalled.items()))
    log.critical("canonical partitions %s have messages waiting and none was applied; exiting so that the "
                 "restart re-joins the group and recovers (nothing is lost: unapplied offsets are not "
                 "committed)", parts)
    logging.shutdown()
    os._exit(STALL_EXIT_CODE)
