"""Per-subscription notification tracking: dedupe, gaps, missed heartbeats. Pure (no I/O).

A FHIR server numbers each subscription's notifications 1, 2, 3, ... (`eventNumber`) and delivers them
best effort: some are lost, some re-sent. Per subscription the tracker keeps

    high      the highest event number accounted for: every number <= high was seen or is in a gap
    gaps      missing ranges below `high`, each with the event time it was noticed at
    clock_ms  the server's clock: the latest notification timestamp seen (event time)

and for each notification:

- a number <= high outside every gap is a **duplicate** (a re-sent notification; counted, not an error);
- a number > high + 1 opens a gap (high+1 .. number-1); so does a status whose
  `eventsSinceSubscriptionStart` is ahead of `high` (a heartbeat announcing events we never got);
- a number inside a gap fills it (splitting the range); a late arrival within the grace closes the gap
  silently, after it was reported it is counted as a late fill;
- a gap still open `grace` after it was noticed, **in the server's event time**, is reported once.
  Event time, not the watcher's clock: re-reading a backlog (or restarting) gives the same reports.
- handshake and heartbeat consume no event numbers (DOMAIN.md sec. 2); they advance the clock. One
  newer than anything seen whose `eventsSinceSubscriptionStart` is below `high` is a counter reset (the
  server restarted or recreated the subscription): tracking starts again from its counter. A heartbeat
  only when it carries the server's timestamp: by arrival time alone, a heartbeat overtaken in delivery
  by the next event looks the same, and a false reset would drop the open gaps unreported.

The baseline: tracking starts at the lowest number seen (`low`), or at 1 after a handshake (it says 0
events so far). Because partitions interleave, a lower number can be read after a higher one: during
the first grace period of a subscription a number below `low` moves `low` down (opening a gap when it
skips numbers); after that, numbers below `low` are history from before the watcher ("before_baseline").

**Missed heartbeats use wall clocks**, necessarily: a silent channel sends nothing, so no event time can
ever reveal it. `last_arrival_ms` is the Kafka timestamp of the subscription's latest message (the
receiver's clock when it arrived); `check_heartbeats(now_ms)` compares it with `now_ms`, the watcher's
`CatchUpClock`: its own clock once every partition is read to its end, and while it reads a backlog the
arrival time up to which *every* partition has been read (so a restart after downtime reports neither
channels that were in fact alive nor numbers still waiting on a partition not read yet).

**Read before reported:** one subscription's notifications spread over every partition, and a backlog
is read a partition at a time, so one partition's notifications can take a subscription's event time
far past a gap whose numbers wait, unread, on another. The tracker is told how far every partition has
been read (`advance(read_to_ms)`, arrival time) and reports a gap only once that has reached the
subscription's latest arrival: anything that could still fill it has been read. Without `read_to_ms`
(a single ordered feed) a gap is reported as soon as it is due in event time.

Records (value of `<prefix>.fhir.gaps`, key = subscription), deterministic so a re-run republishes
identical ones:
    {"id", "subscription", "kind": "gap" | "heartbeat-missed", "first_missing", "last_missing",
     "detected_at_ms", "last_seen_event_number"}
`detected_at_ms` is when the grace (or the k-th heartbeat period) expired: noticed_at + grace for a gap,
last arrival + k * period for a heartbeat; `first/last_missing` are null for heartbeat-missed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from schemas.fhir import CONTROL_TYPES, NotificationStatus

GAP, HEARTBEAT_MISSED = "gap", "heartbeat-missed"
MAX_REPORTED_GAPS = 1000  # per subscription; older reported gaps that never filled are forgotten


@dataclass
class Gap:
    first: int
    last: int
    noticed_at_ms: int
    reported: bool = False


@dataclass
class SubscriptionState:
    subscription: str
    high: int | None = None  # None until the first message sets the baseline
    low: int | None = None  # the lowest number tracked (see the baseline in the module docstring)
    settle_until_ms: int | None = None  # event time until which `low` may still move down
    gaps: list[Gap] = field(default_factory=list)  # ascending, disjoint, all below `high`
    clock_ms: int | None = None
    last_arrival_ms: int | None = None
    heartbeat_reported_for: int | None = None  # the last_arrival_ms a heartbeat-missed was reported for
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"subscription": self.subscription, "high": self.high, "low": self.low,
                "settle_until_ms": self.settle_until_ms, "clock_ms": self.clock_ms,
                "gaps": [[g.first, g.last, g.noticed_at_ms, g.reported] for g in self.gaps],
                "last_arrival_ms": self.last_arrival_ms, "heartbeat_reported_for": self.heartbeat_reported_for,
                "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubscriptionState":
        return cls(subscription=d["subscription"], high=d.get("high"), low=d.get("low"),
                   settle_until_ms=d.get("settle_until_ms"), clock_ms=d.get("clock_ms"),
                   gaps=[Gap(int(f), int(last), int(t), bool(r)) for f, last, t, r in d.get("gaps") or []],
                   last_arrival_ms=d.get("last_arrival_ms"), heartbeat_reported_for=d.get("heartbeat_reported_for"),
                   counts={k: int(v) for k, v in (d.get("counts") or {}).items()})


def record_id(subscription: str, kind: str, *parts: int | None) -> str:
    return hashlib.blake2b("|".join(map(str, (subscription, kind, *parts))).encode(), digest_size=12).hexdigest()


def gap_record(state: SubscriptionState, gap: Gap, grace_ms: int) -> dict[str, Any]:
    return {"id": record_id(state.subscription, GAP, gap.first, gap.last), "subscription": state.subscription,
            "kind": GAP, "first_missing": gap.first, "last_missing": gap.last,
            "detected_at_ms": gap.noticed_at_ms + grace_ms, "last_seen_event_number": state.high}


class SubscriptionTracker:
    """Tracks every subscription seen; `observe`, `advance` and `check_heartbeats` return the records to
    publish. read_to_ms: the arrival time up to which every partition has been read (None: all of it)."""

    def __init__(self, *, grace_ms: int, heartbeat_period_ms: int, missed_periods: int,
                 states: dict[str, SubscriptionState] | None = None, read_to_ms: int | None = None):
        self.grace_ms = grace_ms
        self.heartbeat_timeout_ms = heartbeat_period_ms * missed_periods
        self.states: dict[str, SubscriptionState] = states if states is not None else {}
        self.read_to_ms = read_to_ms
        self.unattributed = 0  # notifications without a subscription reference
        # the per-kind counts restored with the states were counted by earlier instances
        self._restored_counts = self._counts()

    def observe(self, status: NotificationStatus, arrival_ms: int) -> list[dict[str, Any]]:
        """One notification's status (arrival_ms: its Kafka timestamp) -> gap records now due."""
        if not status.subscription:
            self.unattributed += 1
            return []
        state = self.states.setdefault(status.subscription, SubscriptionState(status.subscription))
        state.last_arrival_ms = max(state.last_arrival_ms or arrival_ms, arrival_ms)
        event_time = status.timestamp_ms if status.timestamp_ms is not None else arrival_ms
        newest = state.clock_ms is None or event_time > state.clock_ms  # not read late from another partition
        state.clock_ms = max(state.clock_ms or event_time, event_time)
        if state.settle_until_ms is None:
            state.settle_until_ms = state.clock_ms + self.grace_ms

        if status.type in CONTROL_TYPES:
            state.count(status.type)
            went_back = (state.high is not None and status.events_since_start is not None
                         and status.events_since_start < state.high and newest)
            # a heartbeat only with the server's own time (Bundle.timestamp): by arrival time, a heartbeat whose
            # delivery was overtaken by the next event's (concurrent POSTs, a retried heartbeat) also reads as
            # newest with a counter below that event's, and a false reset would drop the open gaps unreported
            if went_back and (status.type == "handshake"
                              or (status.type == "heartbeat" and status.timestamp_ms is not None)):
                # the counter went back in a handshake or heartbeat newer than anything seen: the server
                # restarted (a restart need not handshake again: its next heartbeat carries the reset
                # counter) or recreated the subscription, and reuses numbers from here; an older one read
                # late from another partition is not a reset. Without this every renumbered event would
                # be a "duplicate" and no gap among them found until the counter passed the old high.
                state.count("counter_resets")
                state.high, state.low, state.gaps = None, None, []
                _track_from(state, status.events_since_start + 1)  # nothing before it
            elif status.type == "handshake" and status.events_since_start is not None:
                _track_from(state, status.events_since_start + 1)  # nothing before it
            elif state.high is None and status.events_since_start is not None:
                state.high = status.events_since_start  # baseline: that many events happened before
                state.low = state.high + 1
        else:
            state.count("notifications")
            _apply_numbers(state, sorted(set(status.event_numbers)))
        if state.high is not None and status.events_since_start is not None and status.events_since_start > state.high:
            _open_gap(state, status.events_since_start)  # the server says it sent more than we got
        return self._due_gaps(state)

    def advance(self, read_to_ms: int) -> list[dict[str, Any]]:
        """Every partition has been read up to arrival time `read_to_ms`: the gaps that were due but held
        back for a partition not read yet, and the missed heartbeats, as of then."""
        self.read_to_ms = max(self.read_to_ms or read_to_ms, read_to_ms)
        records = [r for state in self.states.values() for r in self._due_gaps(state)]
        return records + self.check_heartbeats(self.read_to_ms)

    def check_heartbeats(self, now_ms: int) -> list[dict[str, Any]]:
        """A heartbeat-missed record for each subscription silent for k heartbeat periods (once per silence)."""
        records = []
        for state in self.states.values():
            last = state.last_arrival_ms
            if last is None or state.heartbeat_reported_for == last or now_ms - last < self.heartbeat_timeout_ms:
                continue
            state.heartbeat_reported_for = last
            state.count(HEARTBEAT_MISSED)
            records.append({"id": record_id(state.subscription, HEARTBEAT_MISSED, last),
                            "subscription": state.subscription, "kind": HEARTBEAT_MISSED,
                            "first_missing": None, "last_missing": None,
                            "detected_at_ms": last + self.heartbeat_timeout_ms,
                            "last_seen_event_number": state.high})
        return records

    def _counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for state in self.states.values():
            for k, v in state.counts.items():
                totals[k] = totals.get(k, 0) + v
        return totals

    def stats(self) -> dict[str, Any]:
        """Every subscription's per-kind counts since it was first seen (across restarts), with the gauges."""
        return {**self.gauges(), "unattributed": self.unattributed, **self._counts()}

    def counted_here(self) -> dict[str, int]:
        """The per-kind counts of this tracker alone (the restored ones left out): counters that add
        up across the instances of the watcher, as the stats topic needs."""
        restored = self._restored_counts
        return {k: v - restored.get(k, 0) for k, v in self._counts().items()}

    def gauges(self) -> dict[str, int]:
        """Current values: never added across instances (a restart tracks the same subscriptions and gaps)."""
        return {"subscriptions": len(self.states), "open_gaps": sum(len(s.gaps) for s in self.states.values())}

    def _due_gaps(self, state: SubscriptionState) -> list[dict[str, Any]]:
        if self.read_to_ms is not None and (state.last_arrival_ms or 0) > self.read_to_ms:
            return []  # a partition not read that far may still hold the missing numbers
        records = []
        for gap in state.gaps:
            if not gap.reported and state.clock_ms - gap.noticed_at_ms >= self.grace_ms:
                gap.reported = True
                state.count("gaps_reported")
                records.append(gap_record(state, gap, self.grace_ms))
        reported = [g for g in state.gaps if g.reported]
        if len(reported) > MAX_REPORTED_GAPS:  # bounded state: forget the oldest unfilled reported gaps
            forget = {id(g) for g in reported[: len(reported) - MAX_REPORTED_GAPS]}
            state.gaps = [g for g in state.gaps if id(g) not in forget]
        return records


def _apply_numbers(state: SubscriptionState, numbers: list[int]) -> None:
    if not numbers:
        return
    if state.high is None:
        state.high, state.low = numbers[0] - 1, numbers[0]  # baseline: earlier numbers are history
    new = 0
    for n in numbers:
        if n < state.low:
            if state.clock_ms > state.settle_until_ms:
                state.count("before_baseline")
                continue
            _track_from(state, n + 1)  # read late from another partition: move the baseline down
            state.low = n
            new += 1
        elif n > state.high:
            _open_gap(state, n - 1)
            state.high = n
            new += 1
        elif _fill(state, n):
            new += 1
        else:
            state.count("duplicate_events")
    state.count("events", new)
    if new == 0:
        state.count("duplicates")  # the whole notification was a re-send


def _track_from(state: SubscriptionState, first: int) -> None:
    """Numbers from `first` on are expected: those below `low` become a gap (or the baseline, if new)."""
    if state.high is None:
        state.high, state.low = first - 1, first
    elif first < state.low:
        state.gaps.insert(0, Gap(first, state.low - 1, state.clock_ms))
        state.low = first


def _open_gap(state: SubscriptionState, last_missing: int) -> None:
    """Numbers high+1 .. last_missing are missing as of now (the subscription's clock)."""
    if last_missing > state.high:
        state.gaps.append(Gap(state.high + 1, last_missing, state.clock_ms))
        state.high = last_missing


def _fill(state: SubscriptionState, n: int) -> bool:
    """Remove n from the gap holding it; False when no gap holds it (a duplicate)."""
    for i, gap in enumerate(state.gaps):
        if gap.first <= n <= gap.last:
            pieces = [Gap(a, b, gap.noticed_at_ms, gap.reported) for a, b in ((gap.first, n - 1), (n + 1, gap.last))
                      if a <= b]
            state.gaps[i:i + 1] = pieces
            if gap.reported:
                state.count("late_fills")  # arrived after its gap was reported
            return True
    return False


class CatchUpClock:
    """The subscription watcher's clock: the arrival time up to which every partition has been read.

    While a backlog is read, the consumer hands it over a partition (a fetch) at a time, so the newest
    arrival read races ahead on one partition while another is unread. The clock is the minimum over
    the partitions still behind of the newest arrival read on each; a partition read to its end (EOF)
    does not hold it back (it may stay idle for ever), one not read at all holds it where it is. Once
    every partition is at its end the watcher's own clock (`wall_ms`) takes over. It never goes back.

    A partition that makes no progress (no message, no EOF) for `stall_ms` of wall clock is *stalled*
    (no leader, a persistent fetch error) and stops holding the clock back: otherwise one stuck
    partition would silence every gap and heartbeat-missed alarm for ever. Progress is timed with the
    `wall_ms` of the `now_ms` call that follows it (one per poll), so the clock stays pure. A stalled
    partition that delivers again holds the clock again (from where it is: never back).
    """

    def __init__(self, partitions: list[int], stall_ms: int):
        if stall_ms <= 0:
            raise ValueError("stall_ms must be > 0")
        self.stall_ms = stall_ms
        self._newest: dict[int, int | None] = dict.fromkeys(partitions)
        self._at_end: set[int] = set()
        self._progress_wall: dict[int, int | None] = dict.fromkeys(partitions)  # None: progress not timed yet
        self._stalled: set[int] = set()
        self._now_ms = 0

    def read(self, partition: int, arrival_ms: int) -> None:
        newest = self._newest.get(partition)
        self._newest[partition] = arrival_ms if newest is None else max(newest, arrival_ms)
        self._at_end.discard(partition)  # more was written: behind again until its next EOF
        self._progress_wall[partition] = None

    def reached_end(self, partition: int) -> None:
        self._at_end.add(partition)
        self._progress_wall[partition] = None

    @property
    def caught_up(self) -> bool:
        return self._at_end.issuperset(self._newest)

    @property
    def stalled(self) -> frozenset[int]:
        """Partitions behind that made no progress for stall_ms (as of the last now_ms)."""
        return frozenset(self._stalled)

    def now_ms(self, wall_ms: int) -> int:
        for p, since in self._progress_wall.items():
            if since is None:  # progress since the last call (or the first call): start its timer now
                self._progress_wall[p] = wall_ms
        self._stalled = {p for p in self._newest if p not in self._at_end
                         and wall_ms - self._progress_wall[p] >= self.stall_ms}
        behind = [self._newest[p] for p in self._newest if p not in self._at_end and p not in self._stalled]
        if not behind:
            candidate = wall_ms
        elif None in behind:
            candidate = self._now_ms  # a partition not read yet: anything in it may be older
        else:
            candidate = min(behind)
        self._now_ms = max(self._now_ms, candidate)
        return self._now_ms
