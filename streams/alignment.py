"""Event-time aligned consumption: no raw partition runs more than `max_skew_ms` of event time ahead
of the slowest active one (Flink's watermark alignment, applied per consumed batch).

Why: in a backlog each fetch returns what each partition has, so a small raw topic (labs) is read
days of event time ahead of a big one (vital signs); patients' clocks jump ahead on the labs and
their vital signs then arrive late downstream and are not scored.

The rules, per assigned raw (topic, partition):
- frontier: the greatest event time (effective_ms) the partition has published. Messages without
  events (control, ignored, dead-lettered) never move it.
- position: how far the partition has got in event time: its frontier, or the event time of its
  next message when that is known (a held-back message, or the head of its part of a batch):
  a partition whose next message is at t has nothing older to publish.
- active: unpaused partitions that delivered something within `idle_s` of wall clock (assignment
  and resumption start that clock) and are not caught up (read to the high watermark of their last
  fetch), and paused ones (they are known to hold data). Idle partitions (caught up, quiet, empty)
  hold nobody back, as Flink's `withIdleness`: live, every partition is caught up and nothing waits.
- bound = min(position of the active partitions) + max_skew_ms. A partition without a position
  (nothing published, nothing known of its next message) does not hold others back.
- a partition just assigned has delivered nothing yet: its data may be older than anything seen. Until
  it delivers or goes idle, the bound is also capped at the low water mark of the assignment (the
  earliest event time delivered since, or the slowest position at the assignment): so the first
  fetch to arrive (the small labs topic's, say) cannot publish days before the vitals' has arrived.
- take(): a batch is merged across partitions in event-time order; a message is published only if
  its event time is within the bound, which rises as the slowest partition publishes. The first
  message beyond it ends its partition's prefix: the caller pauses the partition and keeps its
  messages from that one on until the resume (beyond a batch of them, it seeks the partition back to
  that one instead). The partition at the minimum position can always publish its next message, so
  the slowest partition is never paused.
- resume(): a paused partition resumes once the bound reaches its held-back message, or when no
  unpaused partition is active (the bound then comes from the paused ones alone, so the lowest of
  them resumes: no deadlock). A partition just assigned that has not delivered yet may bring older
  data: that escape waits for it to deliver or go idle (idle_s at most).

Event time alone drives the bound; wall clock (the `now` arguments) only drives idleness.
Pure: no Kafka here. The ingest worker feeds it event times and does what it returns.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

TopicPartition = tuple[str, int]
M = TypeVar("M")


@dataclass
class PartitionClock:
    frontier: int | None = None  # greatest event time published
    next_at: int | None = None  # event time of the next message, when known (held back)
    paused: bool = False
    fresh: bool = False  # assigned, has delivered nothing since
    seen_s: float = 0.0  # wall clock of the last delivery, assignment or resumption
    caught_up: bool = False  # read to its high watermark at its last fetch: nothing older waits in it

    @property
    def position(self) -> int | None:
        if self.frontier is None:
            return self.next_at
        return self.frontier if self.next_at is None else max(self.frontier, self.next_at)


@dataclass
class Plan(Generic[M]):
    taken: list[M] = field(default_factory=list)  # to publish, in this order (event-time merge)
    held: dict[TopicPartition, M] = field(default_factory=dict)  # first held-back message: pause


@dataclass
class AlignmentCounters:
    pauses: int = 0
    resumes: int = 0
    held_messages: int = 0  # delivered but not taken (kept by the caller until the resume)


class Aligner:
    """Per-partition event-time clocks and the take / pause / resume decisions."""

    def __init__(self, max_skew_ms: int, idle_s: float):
        if max_skew_ms < 0 or idle_s <= 0:
            raise ValueError("max_skew_ms must be >= 0 and idle_s > 0")
        self.max_skew_ms = max_skew_ms
        self.idle_s = idle_s
        self.clocks: dict[TopicPartition, PartitionClock] = {}
        self.counters = AlignmentCounters()
        self._paused: set[TopicPartition] = set()
        self._fresh: set[TopicPartition] = set()
        self._low_water: int | None = None  # see _cap()

    # --- assignment ----------------------------------------------------------------------------

    def assign(self, tps: Iterable[TopicPartition], now: float) -> None:
        """Fresh clocks: a (re)assigned partition restarts from its committed offset, unpaused."""
        tps = list(tps)
        self.revoke(tps)
        self._low_water = self.bound(now)
        if self._low_water is not None:
            self._low_water -= self.max_skew_ms
        for tp in tps:
            self.clocks[tp] = PartitionClock(seen_s=now, fresh=True)
            self._fresh.add(tp)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.clocks.pop(tp, None)
            self._paused.discard(tp)
            self._fresh.discard(tp)

    @property
    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(self._paused)

    def is_idle(self, clock: PartitionClock, now: float) -> bool:
        """Holds nobody back: caught up with its log, or quiet for idle_s. A paused partition is neither."""
        return not clock.paused and (clock.caught_up or now - clock.seen_s >= self.idle_s)

    def set_caught_up(self, caught_up: Mapping[TopicPartition, bool]) -> None:
        """Which partitions have been read to their high watermark. Live, every partition is: a lab
        result whose collection time is hours behind the vital signs then holds nothing back (waiting
        for its partition could only add latency: it has nothing older to deliver)."""
        for tp, up in caught_up.items():
            if (clock := self.clocks.get(tp)) is not None:
                clock.caught_up = up

    def _cap(self, now: float) -> int | None:
        """The low water mark while an assigned partition has delivered nothing and is not idle yet:
        its data may be as old as anything seen since the assignment. None: no such partition."""
        if self._fresh:
            self._fresh = {tp for tp in self._fresh if not self.is_idle(self.clocks[tp], now)}
        return self._low_water if self._fresh else None

    def _lower(self, t: int) -> None:
        if self._fresh and (self._low_water is None or t < self._low_water):
            self._low_water = t

    # --- the decisions -------------------------------------------------------------------------

    def take(self, batch: Mapping[TopicPartition, Sequence[M]], event_time: Callable[[M], int | None],
             now: float) -> Plan[M]:
        """Which messages of a consumed batch to publish, in which order, and which partitions to
        pause. `batch`: each partition's messages in offset order. `event_time(m)`: the greatest
        effective_ms of m's events, None when m publishes no event; called at most once per message,
        and never for messages after a partition's first held-back one (they are not parsed)."""
        plan: Plan[M] = Plan()
        skew = self.max_skew_ms
        floor: int | None = None  # min position of the active partitions not (or no longer) in the heap
        for tp, clock in self.clocks.items():
            if tp not in batch and not self.is_idle(clock, now) and clock.position is not None:
                floor = clock.position if floor is None else min(floor, clock.position)

        heads: list[tuple[int, int, TopicPartition]] = []  # (head event time, arrival, tp)
        index: dict[TopicPartition, int] = {}
        positions: dict[TopicPartition, int] = {}  # of the partitions in the heap
        live: dict[TopicPartition, tuple[Sequence[M], PartitionClock]] = {}
        arrival = 0
        for tp, messages in batch.items():
            clock = self.clocks.get(tp)
            if clock is None:  # delivered before its assignment was seen: track it from here
                clock = self.clocks[tp] = PartitionClock()
            if clock.paused:
                # stale: fetched before the pause; the caller keeps it with the held-back ones, or, if it
                # sought the partition back, reads it again after the resume
                continue
            clock.seen_s, clock.next_at, clock.fresh = now, None, False
            self._fresh.discard(tp)
            live[tp] = (messages, clock)
            index[tp] = 0
            arrival = self._push_head(tp, messages, clock, event_time, index, heads, positions, plan, arrival)
            if tp not in positions and clock.frontier is not None and not clock.caught_up:
                floor = clock.frontier if floor is None else min(floor, clock.frontier)

        for t, _, _ in heads:
            self._lower(t)
        cap = self._cap(now)
        if cap is not None:
            floor = cap if floor is None else min(floor, cap)

        bound: int | None = None
        while heads:
            t, _, tp = heads[0]
            if bound is None or t > bound:  # bound only rises: recompute only when needed
                low = min(positions.values())
                bound = (low if floor is None else min(low, floor)) + skew
                if t > bound:
                    break  # the earliest head is beyond the bound: so is every other
            heapq.heappop(heads)
            messages, clock = live[tp]
            plan.taken.append(messages[index[tp]])
            clock.frontier = t if clock.frontier is None else max(clock.frontier, t)
            index[tp] += 1
            del positions[tp]
            arrival = self._push_head(tp, messages, clock, event_time, index, heads, positions, plan, arrival)
            if tp not in positions and not clock.caught_up:  # exhausted, more to read: it holds the others
                floor = clock.frontier if floor is None else min(floor, clock.frontier)

        for t, _, tp in heads:  # held back from its head on
            messages, clock = live[tp]
            plan.held[tp] = messages[index[tp]]
            clock.next_at, clock.paused = t, True
            self._paused.add(tp)
            self.counters.pauses += 1
            self.counters.held_messages += len(messages) - index[tp]
        return plan

    def resume(self, now: float) -> list[TopicPartition]:
        """The paused partitions to resume now (their clocks are marked resumed)."""
        if not self._paused:
            return []
        low: int | None = self._cap(now)
        if self._fresh and low is None:
            return []  # a fresh partition may bring older data than anything seen: wait for it or its idleness
        for clock in self.clocks.values():
            if not clock.paused and not self.is_idle(clock, now) and clock.position is not None:
                low = clock.position if low is None else min(low, clock.position)
        held = [self.clocks[tp].next_at for tp in self._paused]
        low = min(held) if low is None else min(low, *held)
        bound = low + self.max_skew_ms
        resumed = sorted(tp for tp in self._paused if self.clocks[tp].next_at <= bound)
        for tp in resumed:
            clock = self.clocks[tp]
            clock.paused, clock.seen_s = False, now  # next_at stays: its position until it delivers
            self._paused.discard(tp)
            self.counters.resumes += 1
        return resumed

    def bound(self, now: float) -> int | None:
        """The current bound (for tests and diagnostics): min position of the active partitions + skew."""
        positions = [c.position for c in self.clocks.values()
                     if not self.is_idle(c, now) and c.position is not None]
        return min(positions) + self.max_skew_ms if positions else None

    @staticmethod
    def _push_head(tp, messages, clock, event_time, index, heads, positions, plan, arrival) -> int:
        """Take the partition's leading messages without events (they move no clock), then put its
        next evented message on the heap; the partition is then at max(frontier, that time)."""
        i = index[tp]
        while i < len(messages):
            t = event_time(messages[i])
            if t is None:
                plan.taken.append(messages[i])
                i += 1
                continue
            index[tp] = i
            heapq.heappush(heads, (t, arrival, tp))
            positions[tp] = t if clock.frontier is None else max(clock.frontier, t)
            return arrival + 1
        index[tp] = i
        return arrival
