"""streams.alignment: the event-time alignment rules, without a broker.

A message here is (tp, offset, event time or None); times are in ms, the skew is 100 ms.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from streams.alignment import Aligner

pytestmark = pytest.mark.timeout(60)

SKEW, IDLE = 100, 2.0
A, B, C, D = ("vitals", 0), ("labs", 0), ("encounters", 0), ("fhir", 0)


def msgs(tp, *times, start=0):
    return [(tp, start + i, t) for i, t in enumerate(times)]


def event_time(m):
    return m[2]


def aligner(*assigned, now=0.0):
    a = Aligner(SKEW, IDLE)
    a.assign(assigned, now)
    return a


def times(plan):
    return [(m[0], m[2]) for m in plan.taken]


# --- take: the prefix within the bound ------------------------------------------------------------


def test_a_partition_ahead_is_cut_at_the_bound_of_the_slowest_and_paused():
    a = aligner(A, B)
    plan = a.take({A: msgs(A, 0, 50, 100, 150), B: msgs(B, 0, 300, 400)}, event_time, now=0.0)
    # merged in event time; the labs stop where they would run more than SKEW ahead of the vitals (150)
    assert times(plan) == [(A, 0), (B, 0), (A, 50), (A, 100), (A, 150)]
    assert plan.held == {B: (B, 1, 300)}  # seek to offset 1, pause
    assert a.paused == {B} and a.clocks[A].frontier == 150 and a.clocks[B].frontier == 0
    assert a.counters.pauses == 1 and a.counters.held_messages == 2


def test_the_bound_rises_as_the_slowest_partition_publishes_within_the_batch():
    a = aligner(A, B)
    plan = a.take({B: msgs(B, 0, 120, 240), A: msgs(A, 0, 100, 200, 300)}, event_time, now=0.0)
    assert [t for _, t in times(plan)] == [0, 0, 100, 120, 200, 240, 300]  # one merge, nothing held
    assert not plan.held and not a.paused


def test_the_slowest_partition_is_never_paused_even_across_a_gap():
    a = aligner(A)
    plan = a.take({A: msgs(A, 0, 5_000)}, event_time, now=0.0)  # alone: nobody to wait for
    assert [t for _, t in times(plan)] == [0, 5_000] and not plan.held


def test_an_active_partition_outside_the_batch_holds_the_others_back():
    a = aligner(A, B)
    a.take({A: msgs(A, 0)}, event_time, now=0.0)
    plan = a.take({B: msgs(B, 10, 90, 150)}, event_time, now=0.5)  # vitals (at 0) still active
    assert [t for _, t in times(plan)] == [10, 90] and plan.held == {B: (B, 2, 150)}


def test_an_idle_partition_holds_nobody_back():
    a = aligner(A, B)
    a.take({A: msgs(A, 0)}, event_time, now=0.0)
    plan = a.take({B: msgs(B, 10, 90, 150)}, event_time, now=IDLE + 0.1)  # vitals delivered nothing since
    assert [t for _, t in times(plan)] == [10, 90, 150] and not plan.held


def test_a_caught_up_partition_holds_nobody_back_however_far_behind_its_last_event():
    """Live, a lab result collected hours before the current vitals must not make them wait: its
    partition has nothing older to deliver."""
    a = aligner(A, B)
    a.take({B: msgs(B, 0)}, event_time, now=0.0)  # the lab, collected long before
    a.set_caught_up({A: True, B: True})
    plan = a.take({A: msgs(A, 500, 600)}, event_time, now=0.1)
    assert [t for _, t in times(plan)] == [500, 600] and not plan.held
    # the same lab partition with more to read (a backlog) holds the vitals at its frontier + SKEW
    a = aligner(A, B)
    a.take({B: msgs(B, 0)}, event_time, now=0.0)
    a.set_caught_up({A: True, B: False})
    plan = a.take({A: msgs(A, 50, 500)}, event_time, now=0.1)
    assert [t for _, t in times(plan)] == [50] and plan.held == {A: (A, 1, 500)}


def test_caught_up_partitions_in_the_batch_are_still_merged_and_cut_at_the_bound():
    a = aligner(A, B)
    a.set_caught_up({A: False, B: True})  # the small labs topic, read whole in one fetch
    plan = a.take({A: msgs(A, 0, 50), B: msgs(B, 0, 40, 400)}, event_time, now=0.0)
    assert times(plan) == [(A, 0), (B, 0), (B, 40), (A, 50)] and plan.held == {B: (B, 2, 400)}


def test_a_partition_without_a_frontier_holds_nobody_back():
    a = aligner(A, B, C)
    a.take({C: msgs(C, None)}, event_time, now=0.0)  # C delivered only a control message: no position
    plan = a.take({A: msgs(A, 0, 1000), B: msgs(B, 50, 1050)}, event_time, now=0.1)
    assert len(plan.taken) == 4 and not plan.held


def test_a_just_assigned_partition_caps_the_bound_at_the_low_water_mark_until_it_delivers_or_idles():
    # C assigned and silent: its data may be as old as anything seen, so the first fetches to arrive
    # may not run more than SKEW past the earliest event time delivered since the assignment
    a = aligner(A, B, C)
    plan = a.take({A: msgs(A, 0, 100), B: msgs(B, 50, 150)}, event_time, now=0.0)
    assert [t for _, t in times(plan)] == [0, 50, 100] and plan.held == {B: (B, 1, 150)}
    assert a.resume(1.0) == []
    assert a.resume(IDLE + 0.1) == [B]  # C idle (empty): the cap is gone


def test_a_partition_whose_next_message_is_known_is_at_that_time_not_at_its_frontier():
    # vitals has published 0 and its next message is at 1000: it has nothing older to publish, so
    # the labs are not held at 0 + SKEW but go on up to 1000 + SKEW, merged with it
    a = aligner(A, B)
    a.take({A: msgs(A, 0), B: msgs(B, 0)}, event_time, now=0.0)
    plan = a.take({A: msgs(A, 1000, start=1), B: msgs(B, 500, 900, 1050, 1200, start=1)}, event_time, now=0.1)
    assert times(plan) == [(B, 500), (B, 900), (A, 1000), (B, 1050)]
    assert plan.held == {B: (B, 4, 1200)}


def test_messages_without_events_are_taken_in_their_prefix_and_move_no_clock():
    a = aligner(A, B)
    plan = a.take({A: msgs(A, None, 0, None, 50), B: msgs(B, None, 0, 400, None)}, event_time, now=0.0)
    assert [(m[0], m[1]) for m in plan.taken if m[2] is None] == [(A, 0), (B, 0), (A, 2)]
    assert plan.held == {B: (B, 2, 400)}  # the control message after it is not taken: prefixes only
    assert a.clocks[A].frontier == 50 and a.clocks[B].frontier == 0


def test_messages_after_a_held_back_one_are_not_parsed():
    a = aligner(A, B)
    asked = []

    def timed(m):
        asked.append(m)
        return m[2]

    a.take({A: msgs(A, 0), B: msgs(B, 0, 500, 600, 700)}, timed, now=0.0)
    assert (B, 2, 600) not in asked and (B, 3, 700) not in asked


def test_messages_of_a_paused_partition_still_in_the_batch_are_stale_and_skipped():
    a = aligner(A, B)
    a.take({A: msgs(A, 0), B: msgs(B, 0, 500)}, event_time, now=0.0)
    plan = a.take({A: msgs(A, 50, start=1), B: msgs(B, 600, start=2)}, event_time, now=0.1)
    assert times(plan) == [(A, 50)] and not plan.held and a.paused == {B}


# --- resume ---------------------------------------------------------------------------------------


def test_a_paused_partition_resumes_once_the_bound_reaches_its_held_message():
    a = aligner(A, B)
    a.take({A: msgs(A, 0, 150), B: msgs(B, 0, 300)}, event_time, now=0.0)
    assert a.paused == {B} and a.resume(0.1) == []  # bound 150 + 100 < 300
    a.take({A: msgs(A, 199, start=2)}, event_time, now=0.2)
    assert a.resume(0.3) == []
    a.take({A: msgs(A, 200, start=3)}, event_time, now=0.4)
    assert a.resume(0.5) == [B] and not a.paused and a.counters.resumes == 1
    # resumed, it is at its held message until it delivers: it does not drag the bound down to 0
    assert a.bound(0.5) == 200 + SKEW


def test_when_nothing_else_is_active_the_lowest_paused_partition_resumes_no_deadlock():
    a = aligner(A, B, C)
    a.take({A: msgs(A, 0), B: msgs(B, 0, 300), C: msgs(C, 0, 900)}, event_time, now=0.0)
    assert a.paused == {B, C}
    assert a.resume(1.0) == []  # vitals (at 0) may still deliver
    assert a.resume(IDLE + 0.1) == [B]  # vitals idle: the lowest paused goes on, C still waits for it
    assert a.paused == {C}


def test_the_escape_waits_for_a_just_assigned_partition_to_deliver_or_go_idle():
    a = aligner(A, B, now=0.0)
    a.take({B: msgs(B, 0, 300)}, event_time, now=0.0)  # the labs' fetch came first
    assert a.paused == {B}
    # vitals just assigned, no data yet: it may hold older events, so the labs wait (no frontier: no bound)
    assert a.resume(1.0) == []
    a.take({A: msgs(A, 0, 220)}, event_time, now=1.5)
    assert a.resume(1.6) == [B]  # 220 + 100 >= 300
    b = aligner(A, B, now=0.0)
    b.take({B: msgs(B, 0, 300)}, event_time, now=0.0)
    assert b.resume(IDLE + 0.1) == [B]  # vitals never delivered: idle, the labs go on


def test_with_nothing_paused_nothing_resumes():
    # (and the ingest does not even ask while nothing is paused: the live fake-broker tests in
    # tests/streams/test_ingest.py see no pause, seek or resume call)
    a = aligner(A)
    a.take({A: msgs(A, 0, 5_000)}, event_time, now=0.0)
    assert a.resume(10.0) == [] and not a.paused


# --- rebalance ------------------------------------------------------------------------------------


def test_a_revoke_forgets_the_partition_and_a_reassignment_starts_it_fresh():
    a = aligner(A, B)
    a.take({A: msgs(A, 0), B: msgs(B, 0, 300)}, event_time, now=0.0)
    assert a.paused == {B}
    a.revoke([B])
    assert a.paused == set() and B not in a.clocks
    a.assign([B], now=0.5)  # librdkafka does not keep the pause: neither do we
    assert a.clocks[B].frontier is None and not a.clocks[B].paused
    # and a revoked slowest partition no longer holds anyone
    a.take({B: msgs(B, 0, 300)}, event_time, now=0.6)
    assert a.paused == {B}
    a.revoke([A])
    assert a.resume(0.7) == [B]


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Aligner(-1, IDLE)
    with pytest.raises(ValueError):
        Aligner(SKEW, 0)


# --- the rules as a whole, against a simulated consumer -------------------------------------------


def run_consumer(logs: dict, aligner: Aligner | None, rng: random.Random, max_batch: int):
    """A toy consumer over in-memory partition logs: each poll delivers a random chunk from every
    unpaused partition with data left, applies the plan (seek = rewind, pause), then resumes what
    the aligner says; wall clock advances 0.1 s per poll. Returns the published messages in order."""
    position = {tp: 0 for tp in logs}
    published, now = [], 0.0
    for _ in range(10_000):
        if all(position[tp] == len(log) for tp, log in logs.items()):
            return published
        paused = aligner.paused if aligner else frozenset()
        batch = {}
        for tp, log in logs.items():
            if tp not in paused and position[tp] < len(log):
                n = rng.randint(1, max_batch)
                batch[tp] = log[position[tp]:position[tp] + n]
                position[tp] += len(batch[tp])
        if aligner is None:
            published += [m for chunk in batch.values() for m in chunk]
        else:
            plan = aligner.take(batch, event_time, now)
            published += plan.taken
            for tp, held in plan.held.items():
                position[tp] = held[1]  # seek
                assert held[2] > aligner.bound(now)  # the slowest is never paused
            aligner.resume(now + 0.05)
        now += 0.1
    raise AssertionError("the consumer never finished: a deadlock")


@st.composite
def backlogs(draw):
    """2-4 partitions of sorted event times over the same span, of very different densities."""
    n = draw(st.integers(2, 4))
    logs = {}
    for p in range(n):
        k = draw(st.integers(1, 60))
        ts = sorted(draw(st.lists(st.integers(0, 2_000), min_size=k, max_size=k)))
        # some messages without events (control, dead letters) after the first: a partition that has
        # delivered only those has no position, and by the rules holds nobody back
        logs[("t", p)] = [(("t", p), i, None if i and draw(st.integers(0, 9)) == 0 else t) for i, t in enumerate(ts)]
    return logs


@given(logs=backlogs(), seed=st.integers(0, 2**16), max_batch=st.integers(1, 40))
@hsettings(max_examples=150, deadline=None)
def test_aligned_consumption_publishes_everything_once_in_bounded_event_time_order(logs, seed, max_batch):
    published = run_consumer(logs, Aligner(SKEW, IDLE), random.Random(seed), max_batch)
    # nothing lost, nothing twice, each partition in offset order
    for tp, log in logs.items():
        assert [m for m in published if m[0] == tp] == log
    # nothing published more than SKEW behind the greatest event time already published
    greatest = None
    for _, _, t in published:
        if t is None:
            continue
        if greatest is not None:
            assert t >= greatest - SKEW
        greatest = t if greatest is None else max(greatest, t)


def test_without_alignment_the_same_backlog_comes_out_far_out_of_order():
    rng = random.Random(7)
    logs = {A: msgs(A, *range(0, 2_000, 2)), B: msgs(B, *range(0, 2_000, 100))}  # dense vitals, sparse labs

    def worst_behind(published):
        greatest, worst = 0, 0
        for _, _, t in published:
            worst, greatest = max(worst, greatest - t), max(greatest, t)
        return worst

    assert worst_behind(run_consumer(logs, None, rng, 40)) > 10 * SKEW
    assert worst_behind(run_consumer(logs, Aligner(SKEW, IDLE), rng, 40)) <= SKEW
