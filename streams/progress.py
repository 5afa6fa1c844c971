"""Is a consumer making progress? The logic of the consumption watchdogs (streams/watchdog.py).

A worker can be up, in its group, "ready" in faust's sense, and still apply nothing: a fetcher that
stopped fetching, an event loop stuck in an await. Nothing crashes, so nothing restarts it, and
every alert behind it waits. The watch compares, per assigned partition, the offset the consumer
has applied with the partition's end offset, read by an independent client:

    lag = end - applied      (applied: the next offset not yet applied; nothing applied: the low watermark)

A partition is *stalled* when it had lag and its applied offset did not move across successful
observations spanning `stall_after_s`. A partition with no lag is idle, not stalled, however long.
An observation that could not be made (the broker did not answer, the assignment could not be
read) starts every partition's clock again: a broker outage is not the worker's stall, and once the
broker is back the worker gets the whole window to move again.

The embedded broker (Tansu) reports the end offset as the base offset of the partition's last record
batch + 1, which can be below the true end: the lag is then underestimated, never overestimated, so
a stall of a whole last batch is still seen and a caught-up partition is never called stalled.

Pure: the caller gives the time (monotonic seconds) and the offsets; no Kafka here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Track:
    applied: int
    since: float  # when `applied` last moved, messages were first seen waiting, or tracking (re)started


class ConsumptionWatch:
    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._tracks: dict[int, _Track] = {}
        self.lag: dict[int, int] = {}

    def observe(self, now: float, applied: dict[int, int | None], watermarks: dict[int, tuple[int, int]]) -> None:
        """One observation of every assigned partition: applied (next offset, None if nothing applied
        yet) and its (low, high) watermarks. Partitions no longer assigned are forgotten."""
        lag: dict[int, int] = {}
        for partition, (low, high) in watermarks.items():
            position = applied.get(partition)
            position = low if position is None else max(position, low)  # retention may have moved past it
            lag[partition] = max(0, high - position)
            track = self._tracks.get(partition)
            waiting_before = self.lag.get(partition, 0) > 0  # the clock starts when messages are first seen waiting
            if track is None or track.applied != position or not lag[partition] or not waiting_before:
                self._tracks[partition] = _Track(position, now)
        for partition in set(self._tracks) - set(watermarks):
            del self._tracks[partition]
        self.lag = lag

    def unobservable(self) -> None:
        """An observation failed: nothing is known, every clock starts again at the next one."""
        self._tracks.clear()
        self.lag = {}

    def stalled(self, now: float) -> dict[int, float]:
        """Partitions with lag and no progress for `stall_after_s`: partition -> seconds without progress."""
        return {p: now - t.since for p, t in self._tracks.items()
                if self.lag.get(p, 0) > 0 and now - t.since >= self.stall_after_s}

    def seconds_without_progress(self, now: float) -> float:
        """The longest time any partition with lag has gone without progress (0: none has lag)."""
        return max((now - t.since for p, t in self._tracks.items() if self.lag.get(p, 0) > 0), default=0.0)


class BusyWatch:
    """Is a rebalance or table recovery moving? Neither counts towards a stall while it moves (a large
    table takes minutes to recover, and exiting in the middle would only start it again), but one that
    moves nothing for `stall_after_s` is a stuck worker, not a busy one (a rebalance waiting for a batch
    that never ends, a recovery waiting for records that never come): without a bound it would be
    exempt for ever, and every alert behind it would wait.

    `token` is anything that changes when the rebalance or recovery makes progress (the phase, the
    changelog offsets read, the offsets applied); None: not busy."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._token: object = None
        self._since: float | None = None

    def observe(self, now: float, token: object) -> None:
        if token is None:
            self._token, self._since = None, None
        elif self._since is None or token != self._token:
            self._token, self._since = token, now

    def stuck(self, now: float) -> float | None:
        """Seconds busy without progress, once they reach `stall_after_s`; else None."""
        if self._since is None or now - self._since < self.stall_after_s:
            return None
        return now - self._since


ALL_ASSIGNED = "all assigned partitions"


def as_one(applied: dict, watermarks: dict[object, tuple[int, int]]) -> tuple[dict, dict]:
    """Every partition as one (key ALL_ASSIGNED), for a consumer that holds partitions back on purpose
    (the ingest's event-time alignment pauses those ahead while the ones behind move): it is stalled
    only when none moves while any has messages waiting. Each partition's lag is clipped at 0 before
    the sum: the embedded broker's end offset can be below a partition's position, and that surplus
    must not hide another partition's lag."""
    position, lag = 0, 0
    for key, (low, high) in watermarks.items():
        at = applied.get(key)
        at = low if at is None else max(at, low)
        position += at
        lag += max(0, high - at)
    return {ALL_ASSIGNED: position}, {ALL_ASSIGNED: (0, position + lag)}
