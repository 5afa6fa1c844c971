"""Consumption watchdogs: a thread per service that notices a consumer which applies nothing.

Every `interval_s` it looks at the service's assigned input partitions: what the service has applied
(the worker: its table's next-offset markers; the ingest, archiver and subscription watcher: their
group's committed offsets, which each commits only once its outputs are durable) and those partitions' watermarks,
asked of the broker by a client of its own. A `ConsumptionWatch` (streams/progress.py, the logic)
decides. When messages have waited for `stall_after_s` and nothing was applied, the service logs
one critical line (partitions, lag, seconds; never message content) and exits: in compose
(`restart: unless-stopped`) the restart re-joins the group and starts again from what was
committed, and exiting at any moment loses nothing (at-least-once: nothing unapplied is committed).

A thread, not a timer of the service's own loop, and its own confluent-kafka client: the stall it
looks for may be the loop itself (a faust event loop stuck in an await, a poll loop that never
returns), and a timer on a stuck loop never fires.

The worker watches each canonical partition on its own. The ingest watches its raw partitions as
one: its event-time alignment holds partitions that ran ahead on purpose, sometimes for long in a
backlog, while the ones behind move (streams/alignment.py). The archiver and the subscription
watcher likewise, as one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from confluent_kafka import Consumer, TopicPartition

from streams.progress import BusyWatch, ConsumptionWatch, as_one
from wardwatch import observability
from wardwatch.settings import Settings

log = logging.getLogger("wardwatch.watchdog")

BROKER_TIMEOUT_S = 5.0
STALL_EXIT_CODE = 70  # as a worker batch that could not be completed: the supervisor restarts the service

TP = tuple[str, int]  # (topic, partition)
Offsets = dict[TP, "int | None"]
Watermarks = dict[TP, tuple[int, int]]


def check_interval(stall_after_s: float) -> float:
    return max(0.5, min(10.0, stall_after_s / 6))


class OffsetsProbe:
    """Watermarks of partitions and, given a group, its committed offsets: from a client of its own,
    which never joins, subscribes or commits (group.id only names the group whose commits it reads)."""

    def __init__(self, settings: Settings, service: str, group_id: str | None = None) -> None:
        self._settings, self._service = settings, service
        self._group_id = group_id or f"{settings.group_prefix}-{service}-watchdog"
        self._client: Consumer | None = None  # created at the first look: an app built and never run has none

    def _consumer(self) -> Consumer:
        if self._client is None:
            self._client = Consumer({**self._settings.kafka_client_config(f"{self._service}-watchdog"),
                                     "group.id": self._group_id, "enable.auto.commit": False})
        return self._client

    def watermarks(self, partitions: Iterable[TP]) -> Watermarks:
        client = self._consumer()
        return {(t, p): client.get_watermark_offsets(TopicPartition(t, p), timeout=BROKER_TIMEOUT_S, cached=False)
                for t, p in partitions}

    def committed(self, partitions: Iterable[TP]) -> Offsets:
        """The group's committed offsets (None: nothing committed there)."""
        partitions = list(partitions)
        if not partitions:
            return {}
        got = self._consumer().committed([TopicPartition(t, p) for t, p in partitions], timeout=BROKER_TIMEOUT_S)
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in got}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class StallWatchdog:
    """Runs the watch in a daemon thread; `ready()` is the service's /readyz.

    `look()` returns (applied, watermarks) of the assigned partitions, and raises when it cannot tell
    (the broker does not answer, the consumer is not started): nothing is known that round, and
    every window starts again. `busy()` is True while the service rebalances or recovers its state:
    it is not ready then, and that time does not count towards a stall: recovering a large table
    takes minutes, and exiting in the middle would only start it again, for ever. `together`: the
    partitions are watched as one (streams.progress.as_one). `busy_progress()`, when given, returns
    something that changes whenever that rebalance or recovery makes progress: busy without progress
    for the window is a stall too (streams.progress.BusyWatch; `on_busy_stall`, by default an exit)."""

    def __init__(self, stall_after_s: float, look: Callable[[], tuple[Offsets, Watermarks]], *,
                 service: str, busy: Callable[[], bool] = lambda: False, together: bool = False,
                 on_stall: Callable[[dict, dict], None] | None = None, close: Callable[[], None] = lambda: None,
                 busy_progress: Callable[[], object] | None = None,
                 on_busy_stall: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watch = ConsumptionWatch(stall_after_s)
        self.busy_watch = BusyWatch(stall_after_s)
        self.busy_progress = busy_progress
        self.on_busy_stall = on_busy_stall or (lambda seconds: exit_on_busy_stall(service, seconds))
        self._unobservable_since: float | None = None
        self._warned_unobservable = False
        self.interval_s = check_interval(stall_after_s)
        self.look, self.busy, self.together, self.clock, self._close = look, busy, together, clock, close
        self.service = service
        self.on_stall = on_stall or (lambda stalled, lag: exit_on_stall(service, stalled, lag))
        self._last_observed: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the watch is read by the metrics server's threads too
        self._thread = threading.Thread(target=self._run, name=f"{service}-stall-watchdog", daemon=True)

    def start(self) -> None:
        """Start watching (once: later calls do nothing)."""
        if self._thread.ident is not None or self._stop.is_set():  # a thread starts once, even one that ended
            return
        observability.expose_gauges(self.service, self.gauges, part="consumption")  # next to the service's own
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """One observation; calls `on_stall` if something is stalled."""
        now = self.clock()
        if self.busy():  # rebalancing or recovering: every window starts again afterwards
            self._unobservable()
            self._unobservable_since, self._warned_unobservable = None, False
            if self.busy_progress is not None:
                self.busy_watch.observe(now, self._progress_token())
                seconds = self.busy_watch.stuck(now)
                if seconds is not None:
                    self.on_busy_stall(seconds)
            return
        self.busy_watch.observe(now, None)
        try:
            applied, watermarks = self.look()
        except Exception as exc:  # broker away, consumer not started, assignment changing
            log.info("%s consumption watchdog: no observation this round (%s)", self.service, type(exc).__name__)
            self._unobservable()
            self._note_unobservable(now, exc)
            return
        self._unobservable_since, self._warned_unobservable = None, False
        if self.together:
            applied, watermarks = as_one(applied, watermarks)
        with self._lock:
            self.watch.observe(now, applied, watermarks)
            self._last_observed = now
            stalled = self.watch.stalled(now)
            lag = {key: self.watch.lag[key] for key in stalled}
        if stalled:
            self.on_stall(stalled, lag)

    def _progress_token(self) -> object:
        try:
            return self.busy_progress()
        except Exception:  # read from this thread while the service's loop changes it: count as progress
            return object()

    def _note_unobservable(self, now: float, exc: Exception) -> None:
        """A watchdog that cannot look for a whole window says so once (it does not exit: a broker away
        is not this service's stall, and it is not ready meanwhile)."""
        if self._unobservable_since is None:
            self._unobservable_since = now
        elif not self._warned_unobservable and now - self._unobservable_since >= self.watch.stall_after_s:
            self._warned_unobservable = True
            log.warning("%s consumption watchdog: no observation for %.0f s (%s); not ready until it can look "
                        "again", self.service, now - self._unobservable_since, type(exc).__name__)

    def _unobservable(self) -> None:
        with self._lock:
            self.watch.unobservable()
            self._last_observed = None

    def ready(self) -> bool:
        """Observed recently, not rebalancing or recovering, and nothing stalled."""
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
            try:
                self.check()
            except Exception as exc:  # a bug here must not end the watch for good: say it, and look again
                log.error("%s consumption watchdog: a check failed (%s); looking again in %.0f s", self.service,
                          type(exc).__name__, self.interval_s)
                self._unobservable()
        self._close()


def exit_on_stall(service: str, stalled: dict, lag: dict) -> None:
    parts = ", ".join(f"{_name(key)} (lag {lag[key]}, {seconds:.0f} s)" for key, seconds in sorted(stalled.items()))
    log.critical("%s: no progress on %s: messages waiting and none applied; exiting so that the restart "
                 "re-joins the group and resumes (nothing is lost: unapplied offsets are not committed)",
                 service, parts)
    logging.shutdown()
    os._exit(STALL_EXIT_CODE)


def exit_on_busy_stall(service: str, seconds: float) -> None:
    log.critical("%s: rebalancing or recovering its state for %.0f s without any progress; exiting so that "
                 "the restart re-joins the group and recovers again (nothing is lost: unapplied offsets are "
                 "not committed)", service, seconds)
    logging.shutdown()
    os._exit(STALL_EXIT_CODE)


def _name(key) -> str:
    if isinstance(key, tuple):
        return f"partition {key[0]}[{key[1]}]"
    return str(key)


def group_watchdog(settings: Settings, service: str, group_id: str,
                   assigned: Callable[[], Iterable[TP]]) -> StallWatchdog | None:
    """The watchdog of a confluent-kafka service (ingest, archiver, subscriptions): its group's commits on
    the partitions it holds, watched as one. None when settings turn watchdogs off."""
    if not settings.stall_timeout_s:
        return None
    probe = OffsetsProbe(settings, service, group_id)

    def look() -> tuple[Offsets, Watermarks]:
        partitions = sorted(assigned())
        return probe.committed(partitions), probe.watermarks(partitions)

    return StallWatchdog(settings.stall_timeout_s, look, service=service, together=True, close=probe.close)


@contextmanager
def watching(settings: Settings, service: str, group_id: str, assigned: Callable[[], Iterable[TP]]
             ) -> Iterator[StallWatchdog | None]:
    """Run a confluent-kafka service's watchdog (group_watchdog) while the block runs; its /readyz
    answers from it."""
    watchdog = group_watchdog(settings, service, group_id, assigned)
    if watchdog is None:
        yield None
        return
    observability.set_readiness(watchdog.ready)
    watchdog.start()
    try:
        yield watchdog
    finally:
        watchdog.stop()  # a stop is not a stall, however long it takes
