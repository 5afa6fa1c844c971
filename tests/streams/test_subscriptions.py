"""The per-subscription tracker on sequences of notification statuses, and the watcher's catch-up clock
(no Kafka)."""

from __future__ import annotations

import orjson
import pytest

from schemas.fhir import NotificationStatus, read_status
from streams.subscriptions import CatchUpClock, SubscriptionState, SubscriptionTracker
from tests.fixtures.ingest.corpus import fhir_bundle

SUB = "https://ehr.example.org/fhir/Subscription/ww-vitals"
T0 = 1_718_460_000_000
GRACE_MS = 60_000
MINUTE = 60_000
STALL_MS = 3 * MINUTE  # the watcher's: one heartbeat-missed timeout


def event(*numbers: int, at: int, since: int | None = None, sub: str = SUB) -> NotificationStatus:
    return NotificationStatus(type="event-notification", subscription=sub, events_since_start=since,
                              event_numbers=list(numbers), focus=[], fhir_version="R4B", timestamp_ms=at)


def control(kind: str, since: int, at: int) -> NotificationStatus:
    return NotificationStatus(type=kind, subscription=SUB, events_since_start=since, event_numbers=[], focus=[],
                              fhir_version="R4B", timestamp_ms=at)


def tracker(**kw) -> SubscriptionTracker:
    return SubscriptionTracker(**{"grace_ms": GRACE_MS, "heartbeat_period_ms": MINUTE, "missed_periods": 3, **kw})


def feed(t: SubscriptionTracker, statuses) -> list[dict]:
    records = []
    for s in statuses:
        records += t.observe(s, arrival_ms=s.timestamp_ms)
    return records


def gaps(records):
    return [(r["first_missing"], r["last_missing"]) for r in records if r["kind"] == "gap"]


def test_in_order_notifications_report_nothing():
    t = tracker()
    assert feed(t, [event(n, at=T0 + n * 1000) for n in range(1, 6)]) == []
    assert t.states[SUB].high == 5 and t.stats()["events"] == 5


def test_a_resent_notification_is_a_duplicate():
    t = tracker()
    feed(t, [event(1, at=T0), event(2, at=T0 + 1), event(2, at=T0 + 1), event(1, 2, at=T0 + 2)])
    assert t.stats()["duplicates"] == 2 and t.stats()["events"] == 2


def test_a_gap_is_reported_once_after_the_grace_in_event_time():
    t = tracker()
    assert feed(t, [event(1, at=T0), event(2, at=T0 + 1000), event(5, at=T0 + 2000)]) == []  # noticed at +2 s
    assert feed(t, [event(6, at=T0 + 2000 + GRACE_MS - 1)]) == []  # 1 ms short of the grace
    (record,) = feed(t, [event(7, at=T0 + 2000 + GRACE_MS)])
    assert record["subscription"] == SUB and record["kind"] == "gap"
    assert (record["first_missing"], record["last_missing"]) == (3, 4)
    assert record["detected_at_ms"] == T0 + 2000 + GRACE_MS and record["last_seen_event_number"] == 7
    assert feed(t, [event(8, at=T0 + 10 * GRACE_MS)]) == []  # never twice


def test_a_late_arrival_inside_the_grace_closes_the_gap_silently():
    t = tracker()
    feed(t, [event(1, at=T0), event(3, at=T0 + 1000), event(2, at=T0 + 2000)])
    assert feed(t, [event(4, at=T0 + 10 * GRACE_MS)]) == []
    assert t.states[SUB].gaps == [] and t.stats().get("duplicates", 0) == 0


def test_a_partly_filled_gap_reports_the_pieces_still_missing():
    t = tracker()
    feed(t, [event(1, at=T0), event(7, at=T0), event(4, at=T0 + 1000)])
    assert gaps(feed(t, [event(8, at=T0 + GRACE_MS)])) == [(2, 3), (5, 6)]


def test_a_fill_after_the_report_is_counted_as_late():
    t = tracker()
    feed(t, [event(1, at=T0), event(3, at=T0), event(4, at=T0 + GRACE_MS)])
    feed(t, [event(2, at=T0 + GRACE_MS + 1)])
    assert t.stats()["late_fills"] == 1 and t.states[SUB].gaps == []


def test_out_of_order_arrival_across_partitions_is_not_a_gap():
    t = tracker()
    assert feed(t, [event(1, at=T0), event(4, at=T0 + 3), event(2, at=T0 + 1), event(3, at=T0 + 2),
                    event(5, at=T0 + GRACE_MS * 2)]) == []


def test_handshake_and_heartbeat_consume_no_numbers_but_move_the_clock():
    t = tracker()
    feed(t, [control("handshake", 0, T0), event(1, at=T0 + 1), event(3, at=T0 + 2)])
    assert t.states[SUB].high == 3
    # a quiet subscription: only its heartbeats move event time past the grace
    (record,) = feed(t, [control("heartbeat", 3, T0 + 2 + GRACE_MS)])
    assert (record["first_missing"], record["last_missing"]) == (2, 2)
    assert t.stats()["heartbeat"] == 1 and t.stats()["events"] == 2


def test_a_handshake_that_resets_the_counter_starts_the_numbering_again():
    """A server that restarts or recreates the subscription counts from 0 again: the renumbered events
    are new, not duplicates, and a gap among them is still found."""
    t = tracker()
    feed(t, [event(n, at=T0 + n) for n in range(1, 51)])
    assert feed(t, [control("handshake", 0, T0 + 100), event(1, at=T0 + 101), event(3, at=T0 + 102)]) == []
    assert gaps(feed(t, [event(4, at=T0 + 102 + GRACE_MS)])) == [(2, 2)]
    assert t.states[SUB].counts.get("counter_resets") == 1 and t.states[SUB].counts.get("duplicate_events", 0) == 0


def test_a_heartbeat_whose_counter_went_back_is_a_reset_too():
    """A FHIR server restarted without a new handshake: its next heartbeat carries the reset counter. The
    events after it are new (not duplicates) and a gap among them is found; was: every renumbered event a
    duplicate, no gap until the counter passed the old high."""
    t = tracker()
    feed(t, [control("handshake", 0, T0), *(event(n, at=T0 + n) for n in range(1, 51))])
    assert feed(t, [control("heartbeat", 0, T0 + 100), event(1, at=T0 + 101), event(3, at=T0 + 102)]) == []
    assert gaps(feed(t, [event(4, at=T0 + 102 + GRACE_MS)])) == [(2, 2)]
    counts = t.states[SUB].counts
    assert counts.get("counter_resets") == 1 and counts.get("duplicate_events", 0) == 0 and t.stats()["events"] == 53


def test_an_older_heartbeat_read_late_is_not_a_reset():
    t = tracker()
    feed(t, [control("handshake", 0, T0), control("heartbeat", 0, T0 + 1)])
    feed(t, [event(n, at=T0 + 10 + n) for n in range(1, 6)])
    feed(t, [control("heartbeat", 0, T0 + 2)])  # sent before event 1, read late from another partition
    assert t.states[SUB].high == 5 and t.states[SUB].counts.get("counter_resets", 0) == 0
    feed(t, [event(5, at=T0 + 20)])
    assert t.stats()["duplicates"] == 1


def test_a_heartbeat_without_a_timestamp_overtaken_by_an_event_is_not_a_reset():
    """A heartbeat (no Bundle.timestamp: its time is its arrival) sent when the counter was 3, delivered after
    event 4 (concurrent POSTs): its counter is below the high and it is the newest by arrival. Was: a counter
    reset that dropped the open gap 3..3, never reported."""
    t = tracker()
    feed(t, [control("handshake", 0, T0), event(1, at=T0 + 1), event(2, at=T0 + 2), event(4, at=T0 + 4)])
    heartbeat = NotificationStatus(type="heartbeat", subscription=SUB, events_since_start=3, event_numbers=[],
                                   focus=[], fhir_version="R4B", timestamp_ms=None)
    t.observe(heartbeat, arrival_ms=T0 + 5)
    assert t.states[SUB].counts.get("counter_resets", 0) == 0
    assert gaps(feed(t, [event(5, at=T0 + 4 + GRACE_MS)])) == [(3, 3)]


def test_the_first_notification_seen_sets_the_baseline():
    t = tracker()
    assert feed(t, [event(40, at=T0), event(41, at=T0 + GRACE_MS * 2)]) == []  # 1..39 came before us


def test_lower_numbers_read_late_from_other_partitions_move_the_baseline_down():
    t = tracker()
    feed(t, [event(3, at=T0 + 3), control("handshake", 0, T0), event(1, at=T0 + 1)])
    assert [(g.first, g.last) for g in t.states[SUB].gaps] == [(2, 2)]  # the handshake says 1 and 2 exist
    feed(t, [event(2, at=T0 + 2)])
    assert t.states[SUB].gaps == [] and t.stats()["events"] == 3 and t.stats().get("duplicates", 0) == 0


def test_numbers_below_the_settled_baseline_are_history_not_gaps():
    t = tracker()
    feed(t, [event(40, at=T0), event(41, at=T0 + GRACE_MS + 1)])
    assert feed(t, [event(7, at=T0 + GRACE_MS + 2), event(42, at=T0 + 5 * GRACE_MS)]) == []
    assert t.stats()["before_baseline"] == 1 and t.states[SUB].gaps == []


def test_a_heartbeat_ahead_of_the_last_event_reveals_lost_notifications():
    t = tracker()
    feed(t, [event(1, at=T0), control("heartbeat", 3, T0 + 1000)])
    assert gaps(feed(t, [control("heartbeat", 3, T0 + 1000 + GRACE_MS)])) == [(2, 3)]


def test_subscriptions_are_tracked_separately():
    t = tracker()
    other = "https://ehr.example.org/fhir/Subscription/ww-labs"
    feed(t, [event(1, at=T0), event(1, at=T0, sub=other), event(2, at=T0 + 1, sub=other)])
    assert t.states[SUB].high == 1 and t.states[other].high == 2 and t.stats().get("duplicates", 0) == 0


def test_a_notification_without_subscription_is_counted():
    t = tracker()
    assert t.observe(event(1, at=T0, sub=None), arrival_ms=T0) == [] and t.unattributed == 1


def test_missed_heartbeats_are_reported_once_per_silence():
    t = tracker()
    t.observe(event(1, at=T0), arrival_ms=T0)
    assert t.check_heartbeats(T0 + 3 * MINUTE - 1) == []
    (record,) = t.check_heartbeats(T0 + 3 * MINUTE)
    assert record["kind"] == "heartbeat-missed" and record["detected_at_ms"] == T0 + 3 * MINUTE
    assert record["first_missing"] is None and record["last_seen_event_number"] == 1
    assert t.check_heartbeats(T0 + 10 * MINUTE) == []  # still the same silence
    t.observe(control("heartbeat", 1, T0 + 11 * MINUTE), arrival_ms=T0 + 11 * MINUTE)
    assert t.check_heartbeats(T0 + 12 * MINUTE) == []  # the channel is back
    assert len(t.check_heartbeats(T0 + 14 * MINUTE)) == 1  # and silent again


def test_a_due_gap_waits_until_every_partition_is_read_up_to_the_subscription():
    """A backlog read a partition at a time: the numbers read first make the gap due in event time, but
    the partition holding the missing ones has not been read that far yet."""
    t = tracker(read_to_ms=0)
    # one partition's share: 2 and 4 are missing, and due in event time once 6 is read
    assert feed(t, [event(1, at=T0), event(3, at=T0 + 1000), event(5, at=T0 + 2000),
                    event(6, at=T0 + 2000 + GRACE_MS)]) == []
    assert t.advance(T0 + 1000) == []  # every partition read only up to there
    feed(t, [event(2, at=T0 + 500)])  # the other partition's share: 4 never came
    assert gaps(t.advance(T0 + 2000 + GRACE_MS)) == [(4, 4)]
    assert t.advance(T0 + 2001 + GRACE_MS) == [] and t.stats().get("late_fills", 0) == 0  # once, nothing late


def test_the_catch_up_clock_is_the_slowest_partition_still_behind():
    clock = CatchUpClock([0, 1, 2], stall_ms=STALL_MS)
    clock.reached_end(2)  # idle: nothing to read there, it must not hold the clock
    clock.read(0, T0 + 100)
    clock.read(0, T0 + 500)
    assert clock.now_ms(wall_ms=T0 + 9_000) == 0  # partition 1 not read at all: anything in it may be older
    clock.read(1, T0 + 200)
    assert clock.now_ms(wall_ms=T0 + 9_000) == T0 + 200
    clock.reached_end(1)
    assert clock.now_ms(wall_ms=T0 + 9_000) == T0 + 500 and not clock.caught_up
    clock.reached_end(0)
    assert clock.now_ms(wall_ms=T0 + 9_000) == T0 + 9_000 and clock.caught_up  # the wall clock takes over


def test_the_catch_up_clock_never_goes_back():
    clock = CatchUpClock([0, 1], stall_ms=STALL_MS)
    clock.read(0, T0 + 500)
    clock.reached_end(0)
    clock.reached_end(1)
    assert clock.now_ms(wall_ms=T0 + 1_000) == T0 + 1_000
    clock.read(1, T0 + 300)  # a new message stamped by a receiver whose clock is behind
    assert not clock.caught_up and clock.now_ms(wall_ms=T0 + 2_000) == T0 + 1_000
    clock.reached_end(1)
    assert clock.now_ms(wall_ms=T0 + 900) == T0 + 1_000  # nor with the wall clock set back


def test_a_partition_stuck_without_message_or_end_stops_holding_the_clock_after_the_stall_time():
    """No leader, a persistent fetch error: neither a message nor an EOF ever comes. The clock (and every
    gap and heartbeat-missed alarm with it) must not stay frozen for ever."""
    clock = CatchUpClock([0, 1], stall_ms=STALL_MS)
    clock.read(0, T0 + 500)
    clock.reached_end(0)
    assert clock.now_ms(wall_ms=T0 + 1_000) == 0  # partition 1 may still deliver older notifications
    assert clock.now_ms(wall_ms=T0 + 1_000 + STALL_MS - 1) == 0 and clock.stalled == frozenset()
    assert clock.now_ms(wall_ms=T0 + 1_000 + STALL_MS) == T0 + 1_000 + STALL_MS  # released: the wall clock
    assert clock.stalled == {1} and not clock.caught_up  # caught up it is not: partition 1 was never read
    assert clock.now_ms(wall_ms=T0 + 10 * STALL_MS) == T0 + 10 * STALL_MS


def test_a_stuck_partition_releases_the_clock_to_the_slowest_partition_still_progressing():
    clock = CatchUpClock([0, 1, 2], stall_ms=STALL_MS)
    clock.read(0, T0 + 100)
    clock.read(2, T0 + 900)
    assert clock.now_ms(wall_ms=T0) == 0  # partition 1 not read yet
    clock.read(0, T0 + 300)  # partition 0 keeps delivering: only 1 is stuck
    clock.read(2, T0 + 950)
    assert clock.now_ms(wall_ms=T0 + STALL_MS) == T0 + 300 and clock.stalled == {1}


def test_a_partition_making_progress_is_never_released():
    """A backlog read slowly: every poll brings something, so the partition holds the clock however long
    the catch-up takes (the wall clock passes many stall times)."""
    clock = CatchUpClock([0, 1], stall_ms=STALL_MS)
    clock.reached_end(0)
    wall = T0
    for k in range(1, 11):
        clock.read(1, T0 + k * 1_000)
        wall += STALL_MS - 1
        assert clock.now_ms(wall_ms=wall) == T0 + k * 1_000 and clock.stalled == frozenset()
    clock.reached_end(1)  # an EOF is progress too: read to its end, the wall clock takes over
    assert clock.now_ms(wall_ms=wall + STALL_MS) == wall + STALL_MS and clock.caught_up


def test_a_released_partition_that_delivers_again_holds_the_clock_but_never_sends_it_back():
    clock = CatchUpClock([0, 1], stall_ms=STALL_MS)
    clock.reached_end(0)
    clock.now_ms(wall_ms=T0)
    assert clock.now_ms(wall_ms=T0 + STALL_MS) == T0 + STALL_MS and clock.stalled == {1}
    clock.read(1, T0 + 5_000)  # its leader is back: an old notification, far behind the clock
    assert clock.now_ms(wall_ms=T0 + STALL_MS + 1_000) == T0 + STALL_MS  # held, not sent back
    assert clock.stalled == frozenset()
    clock.read(1, T0 + STALL_MS + 500)
    assert clock.now_ms(wall_ms=T0 + STALL_MS + 2_000) == T0 + STALL_MS + 500


def test_state_round_trips_through_json_and_keeps_reported_gaps_reported():
    t = tracker()
    feed(t, [event(1, at=T0), event(4, at=T0), event(5, at=T0 + GRACE_MS), event(5, at=T0 + GRACE_MS)])
    saved = {s: orjson.loads(orjson.dumps(st.to_dict())) for s, st in t.states.items()}
    restored = tracker(states={s: SubscriptionState.from_dict(d) for s, d in saved.items()})
    assert restored.states[SUB] == t.states[SUB]
    assert feed(restored, [event(6, at=T0 + 5 * GRACE_MS)]) == []  # the gap 2..3 was reported before
    assert restored.stats()["duplicates"] == 1


def test_gap_records_are_deterministic():
    def run():
        t = tracker()
        return feed(t, [event(1, at=T0), event(4, at=T0 + 5), event(5, at=T0 + 5 + GRACE_MS)])

    first, second = run(), run()
    assert first == second and first[0]["id"]


@pytest.mark.parametrize(("name", "numbers"), [("r4_parameters_event", [12]),  # counters as strings
                                               ("r5_labs_event", [9007199254740993, 9007199254740994])])
def test_real_status_shapes_feed_the_tracker(name, numbers):
    t = tracker()
    status = read_status(fhir_bundle(name))
    t.observe(status, arrival_ms=T0)
    assert t.states[status.subscription].high == numbers[-1]


def test_a_restored_tracker_counts_only_what_it_saw_itself_and_reports_its_gaps_as_gauges():
    # the stats topic sums counters over the watcher's instances: a restored count would be summed twice
    t = tracker()
    feed(t, [event(1, at=T0), event(4, at=T0), event(4, at=T0)])
    restored = tracker(states={s: SubscriptionState.from_dict(orjson.loads(orjson.dumps(st.to_dict())))
                               for s, st in t.states.items()})
    assert restored.counted_here() == {k: 0 for k in t.counted_here()}
    feed(restored, [event(5, at=T0), event(5, at=T0)])
    assert restored.counted_here()["events"] == 1 and restored.counted_here()["duplicates"] == 1
    assert t.counted_here()["events"] + restored.counted_here()["events"] == restored.stats()["events"] == 3
    assert restored.gauges() == {"subscriptions": 1, "open_gaps": 1}  # 2..3, still open after the restart
