"""The patient worker loses nothing when it is SIGKILLed mid-stream and restarted (issues #4, #8).

Two `wardwatch worker` processes on the real embedded broker, each with its own topics and group:
a reference that runs undisturbed, and one that is killed (SIGKILL, no shutdown at all) several times
while it processes a paced canonical stream, plus one clean SIGTERM restart; its restarts switch the state
format they write (WARDWATCH_STATE_WRITE_FORMAT 3 and 4, as an upgrade and a rollback would). Afterwards both must hold
the same patient state in the table changelog, have scored every canonical message, and published the
same alerts; anything published twice must be byte-identical."""

from __future__ import annotations

import random
import time

import pytest

from streams.stats import read_stats, summarize
from streams.topics import ensure_topics, topics_for
from tests.streams.worker_runs import (Publisher, canonical_messages, collect_results, recovery_seconds,
                                      wait_for_progress)
from wardwatch.procs import (check_alive, committed_offsets, kill_service, start_service, stop_service,
                             total_committed, wait_for_commits, wait_for_group)
from wardwatch.worker_results import wait_for_applied

PATIENTS, ROWS = 16, 60  # 960 canonical messages, 6,720 events
RATE = 10.0  # messages/s while the kills go on (a restart after SIGKILL takes ~15 s: session timeout)
KILLS = 3


def _sibling(settings, suffix: str):
    return settings.model_copy(update={"topic_prefix": settings.topic_prefix + suffix,
                                       "cdc_topic_prefix": settings.cdc_topic_prefix + suffix,
                                       "group_prefix": settings.group_prefix + suffix})


@pytest.mark.timeout(240)
def test_sigkilled_worker_ends_with_the_same_state_and_alerts_as_an_undisturbed_one(settings, tmp_path):
    messages = canonical_messages(PATIENTS, ROWS)
    ref_settings = _sibling(settings, "r")
    # a static member, as compose runs it: each restart takes the partitions back without a rebalance
    chaos_settings = _sibling(settings, "k").model_copy(update={"static_membership": True, "instance_id": "worker-k"})
    ref_topics, topics = topics_for(ref_settings), topics_for(chaos_settings)
    ensure_topics(ref_settings, ref_topics)
    ensure_topics(chaos_settings, topics)
    group, ref_group = f"{chaos_settings.group_prefix}-worker", f"{ref_settings.group_prefix}-worker"
    deadline = time.monotonic() + 200
    logs = tmp_path
    rng = random.Random(4)

    ref_worker = start_service(["worker", "--loglevel", "INFO"], ref_settings, logs / "ref.log")
    worker = start_service(["worker", "--loglevel", "INFO"], chaos_settings, logs / "worker-0.log")
    try:
        wait_for_group(ref_settings, ref_group, alive=ref_worker)
        wait_for_group(chaos_settings, group, alive=worker)
        ref_pub = Publisher(ref_settings, ref_topics.canonical, messages).start()
        pub = Publisher(chaos_settings, topics.canonical, messages, rate=RATE).start()

        # kill the worker right after it committed something new, with a jitter that lands inside
        # the processing of a later batch; restart it each time and measure how long until it commits again
        kills, recoveries, restarts = 0, [], 0
        committed = wait_for_progress(chaos_settings, group, topics.canonical, topics.partitions, 0,
                                      deadline=deadline, alive=worker)
        while kills < KILLS + 1:
            time.sleep(rng.uniform(0.05, 0.6))  # deliberately untimed: the kill moment is the fault
            if kills == 1:  # one clean stop among the crashes: the changelog must also survive SIGTERM
                stop_service(worker)
            else:
                kill_service(worker)
            kills += 1
            at_kill = total_committed(chaos_settings, group, topics.canonical, topics.partitions)
            restarts += 1
            started = time.monotonic()
            # an upgrade and its rollback path: the first and the last restart write state format 3 (what a
            # release before format 4 reads), the others 4, so each restart recovers records of the other
            restart_settings = chaos_settings.model_copy(
                update={"state_write_format": 3 if restarts in (1, KILLS + 1) else 4})
            worker = start_service(["worker", "--loglevel", "INFO"], restart_settings, logs / f"worker-{restarts}.log")
            committed = wait_for_progress(chaos_settings, group, topics.canonical, topics.partitions, at_kill,
                                          deadline=deadline, alive=worker)
            recoveries.append(time.monotonic() - started)
            print(f"stop {kills}: {at_kill} committed at the stop, {committed} after restart "
                  f"({recoveries[-1]:.1f}s), {pub.delivered} published")
        assert not pub.done, "the stream ended before the last kill: lower RATE or raise ROWS"
        pub.rate = None  # the rest of the stream at once

        ends = pub.join(deadline - time.monotonic())
        ref_ends = ref_pub.join(deadline - time.monotonic())
        procs = {"worker": worker, "reference worker": ref_worker}
        wait_for_commits(chaos_settings, group, ends, deadline=deadline, on_wait=lambda: check_alive(procs, logs))
        wait_for_commits(ref_settings, ref_group, ref_ends, deadline=deadline,
                         on_wait=lambda: check_alive(procs, logs))
    finally:
        stop_service(worker)
        stop_service(ref_worker)
    recovered = [s for n in range(1, restarts + 1) for s in recovery_seconds(logs / f"worker-{n}.log")]
    print(f"\n{kills} stops ({kills - 1} SIGKILL, 1 SIGTERM); restart to first new commit: "
          + ", ".join(f"{s:.1f}s" for s in recoveries)
          + "; assignment to ready (changelog recovery): " + ", ".join(f"{s:.2f}s" for s in recovered))

    ref = collect_results(ref_settings, ref_topics)
    got = collect_results(chaos_settings, topics)
    all_facts = set().union(*(facts for _, _, facts in messages))
    canonical_points = {(p, o) for (_, p), end in ends.items() for o in range(end)}

    assert ref.known_fact_ids() == all_facts  # the oracle itself is sound: every event reached the state
    assert got.known_fact_ids() == all_facts  # no canonical event lost across the kills
    assert got.records() == ref.records()  # read back whatever format each record was written in
    # the last run wrote format 3 after recovering format 4, the reference format 4 throughout
    assert {rec["s"]["format"] for rec in got.state.values()} == {3}
    assert {rec["s"]["format"] for rec in ref.state.values()} == {4}
    assert got.next_offsets == {p: end for (_, p), end in ends.items()}
    # rows are 15 min apart, more than the scoring cadence (scoring_min_interval_s): each one is a point
    assert got.snapshot_points == canonical_points == ref.snapshot_points
    assert set(got.features) == set(ref.features) and set(got.scores) == set(ref.scores)
    assert set(got.alerts) == set(ref.alerts) and ref.alerts
    assert got.differing_repeats() == []  # a repeat after a restart is the same record, same id
    assert {i: vs for i, vs in got.alerts.items()} == ref.alerts


def _holding_commits(settings, suffix: str):
    """Settings, topics and group of a worker whose commit interval (600 s) outlasts the test, so after
    its first commit only a stop can commit what it applies."""
    held = _sibling(settings, suffix).model_copy(update={"commit_interval_s": 600.0})
    topics = topics_for(held)
    ensure_topics(held, topics)
    return held, topics, f"{held.group_prefix}-worker"


def _two_bursts(held, topics, group, worker, *, deadline: float, logs) -> dict:
    """A first burst, committed; then a second one, applied with its commit held back. Its ends."""
    messages = canonical_messages(8, 10)
    wait_for_group(held, group, alive=worker)
    Publisher(held, topics.canonical, messages[:8]).start().join(30)
    wait_for_progress(held, group, topics.canonical, topics.partitions, 0, deadline=deadline, alive=worker)
    ends = Publisher(held, topics.canonical, messages[8:]).start().join(30)
    wait_for_applied(held, topics, ends, deadline=deadline, on_wait=lambda: check_alive({"worker": worker}, logs))
    return ends


@pytest.mark.timeout(120)
def test_a_sigterm_commits_everything_the_worker_applied(settings, tmp_path):
    """A deploy restarts workers with SIGTERM: the restart must not re-read what was applied. With a
    commit interval longer than the test, only the stop itself can commit the second burst."""
    stopping, topics, group = _holding_commits(settings, "t")
    worker = start_service(["worker", "--loglevel", "INFO"], stopping, tmp_path / "worker.log")
    try:
        ends = _two_bursts(stopping, topics, group, worker, deadline=time.monotonic() + 100, logs=tmp_path)
        held_back = committed_offsets(stopping, group, list(ends))
    finally:
        exit_code = stop_service(worker)  # asserted below, so a failure above is not masked
    assert exit_code == 0
    committed = committed_offsets(stopping, group, list(ends))
    assert held_back != ends  # the interval held the second burst's commit back while the worker ran
    assert committed == ends
    # and its last counters say it stopped, so `wardwatch stats` no longer lists it as live
    workers = [r for r in read_stats(stopping, topics).values() if r["service"] == "worker"]
    assert len(workers) == 1 and workers[0].get("stopped") is True
    assert summarize(read_stats(stopping, topics))["services"]["worker"]["live_instances"] == 0


@pytest.mark.timeout(150)
def test_a_restart_commits_what_was_applied_before_it_even_with_no_new_input(settings, tmp_path):
    """A worker killed before its commit leaves the group's offset behind the table. The restart
    re-reads those messages and drops them as applied; it must also commit past them, or the
    partitions show lag (and are re-read at every restart) until new input arrives."""
    crashing, topics, group = _holding_commits(settings, "k")
    deadline = time.monotonic() + 130
    worker = start_service(["worker", "--loglevel", "INFO"], crashing, tmp_path / "worker-0.log")
    try:
        ends = _two_bursts(crashing, topics, group, worker, deadline=deadline, logs=tmp_path)
    finally:
        kill_service(worker)
    behind = committed_offsets(crashing, group, list(ends))
    assert behind != ends  # the kill left applied messages uncommitted

    restarted = crashing.model_copy(update={"commit_interval_s": 0.1})
    worker = start_service(["worker", "--loglevel", "INFO"], restarted, tmp_path / "worker-1.log")
    try:  # no new input: only the re-read of applied messages can move the commit
        wait_for_commits(restarted, group, ends, deadline=deadline,
                         on_wait=lambda: check_alive({"worker": worker}, tmp_path))
    finally:
        exit_code = stop_service(worker)
    assert exit_code == 0
    assert committed_offsets(restarted, group, list(ends)) == ends
