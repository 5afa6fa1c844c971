"""`wardwatch worker` with one interleaving forced that otherwise happens by chance (test only; run it
as `python -m tests.streams.recovery_race_worker` with the worker's WARDWATCH_* environment).

The interleaving (seen as a stalled worker in CI): at the end of a recovery, faust's fetcher asks for a
fetch while the changelog partitions are still its only active ones; the consumer thread runs that fetch
only after recovery has paused them and before it resumes the canonical partitions, with canonical
messages already prefetched by aiokafka. Three holds, each bounded by HOLD_S, make it happen every time:
recovery waits, once its changelogs are read, until the fetcher's next fetch is in the consumer thread;
that fetch waits there until recovery has paused the changelogs and canonical messages are prefetched;
recovery waits, before resuming the canonical partitions, until the fetch has run and its records were
handed to faust. See streams.app.AppliedOnlyConsumer._getmany."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

import streams.app
from streams.topics import topics_for
from wardwatch.settings import Settings

HOLD_S = 10.0
FORCED = "recovery race forced: a fetch asked for during recovery ran after recovery paused its changelogs"

log = logging.getLogger("wardwatch.test.recovery_race")
end_signalled = threading.Event()  # recovery has read its changelogs to the barriers
held = threading.Event()  # the fetcher's next fetch is in the consumer thread, held
paused = threading.Event()  # recovery has paused the changelogs; the canonical partitions are not resumed
fetched = threading.Event()  # the held fetch has run
canonical: list[str] = []  # the canonical topic's name, set by install()


async def _until(done, timeout_s: float = HOLD_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.001)
    return True


class _HeldEnd(asyncio.Event):
    """faust's signal_recovery_end: recovery goes on to pause its changelogs only once the next fetch is held."""

    def set(self) -> None:
        super().set()
        end_signalled.set()

    async def wait(self) -> bool:
        await super().wait()
        await _until(held.is_set)
        return True


class RaceRecovery(streams.app.ExactEndRecovery):
    @property
    def signal_recovery_end(self) -> asyncio.Event:
        if self._signal_recovery_end is None:
            self._signal_recovery_end = _HeldEnd()
        return self._signal_recovery_end


_fetch_records = AIOKafkaConsumerThread._fetch_records


async def _held_fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
    if not end_signalled.is_set() or held.is_set():
        return await _fetch_records(self, consumer, active_partitions, timeout=timeout, max_records=max_records)
    held.set()  # runs in the consumer thread: the wait below leaves faust's recovery going on in its own
    await _until(paused.is_set)
    await _until(lambda: any(tp.topic in canonical for tp in consumer._fetcher._records))
    try:
        return await _fetch_records(self, consumer, active_partitions, timeout=timeout, max_records=max_records)
    finally:
        fetched.set()


_create_app = streams.app.create_app


def create_app(*args, **kwargs):
    app = _create_app(*args, **kwargs)

    @app.on_rebalance_complete.connect  # sent after recovery paused its changelogs, before it resumes the rest
    async def _hold_resume(sender, **kw):
        if held.is_set() and not paused.is_set():
            paused.set()
            if await _until(fetched.is_set):
                await asyncio.sleep(0.2)  # faust's fetcher handles what the fetch returned
                log.warning(FORCED)

    return app


def install() -> None:
    """Patch this process's worker (only here: importing the module for FORCED changes nothing)."""
    canonical.append(topics_for(Settings()).canonical)
    AIOKafkaConsumerThread._fetch_records = _held_fetch_records
    streams.app.ExactEndRecovery = RaceRecovery
    streams.app.create_app = create_app


if __name__ == "__main__":
    from wardwatch.cli import app

    install()
    sys.argv = ["wardwatch", "worker", "--loglevel", "INFO"]
    app()
