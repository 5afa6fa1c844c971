"""Two patient workers in one consumer group split the patients; when one is SIGKILLed mid-stream the
survivor takes over its partitions, and the results equal a single worker's (issues #4, #8)."""

from __future__ import annotations

import time

import pytest

from streams.topics import ensure_topics, topics_for
from tests.streams.worker_runs import (Publisher, canonical_messages, collect_results, recovery_seconds,
                                      wait_for_assignment, wait_for_progress)
from wardwatch.procs import (check_alive, committed_offsets, kill_service, start_service, stop_service,
                             wait_for_commits, wait_for_group)
from wardwatch.worker_results import wait_for_applied

PATIENTS, ROWS = 16, 40  # 640 canonical messages over 4 partitions
RATE = 15.0  # messages/s until the takeover is done; then the rest at once
COMMIT_FOLLOWS_S = 15.0  # once applied, the commit lands with the next batch or the retry after 1 s


def _sibling(settings, suffix: str):
    return settings.model_copy(update={"topic_prefix": settings.topic_prefix + suffix,
                                       "cdc_topic_prefix": settings.cdc_topic_prefix + suffix,
                                       "group_prefix": settings.group_prefix + suffix})


@pytest.mark.timeout(200)
def test_survivor_takes_over_a_killed_workers_partitions_and_ends_like_a_single_worker(settings, tmp_path):
    messages = canonical_messages(PATIENTS, ROWS)
    ref_settings, pair_settings = _sibling(settings, "s"), _sibling(settings, "p")
    ref_topics, topics = topics_for(ref_settings), topics_for(pair_settings)
    assert topics.partitions == 4
    ensure_topics(ref_settings, ref_topics)
    ensure_topics(pair_settings, topics)
    group, ref_group = f"{pair_settings.group_prefix}-worker", f"{ref_settings.group_prefix}-worker"
    canonical_tps = [(topics.canonical, p) for p in range(topics.partitions)]
    deadline = time.monotonic() + 170
    logs = tmp_path

    everything = set(range(topics.partitions))
    ref_worker = start_service(["worker", "--loglevel", "INFO"], ref_settings, logs / "single.log")
    survivor = start_service(["worker", "--loglevel", "INFO"], pair_settings, logs / "survivor.log")
    victim = start_service(["worker", "--loglevel", "INFO"], pair_settings, logs / "victim.log")
    try:
        wait_for_group(ref_settings, ref_group, alive=ref_worker)
        # both joined: the patients are split between them
        held = wait_for_assignment(logs / "victim.log", topics.canonical, lambda ps: 0 < len(ps) < len(everything),
                                   deadline=deadline, alive=victim)
        wait_for_assignment(logs / "survivor.log", topics.canonical, lambda ps: ps == everything - held,
                            deadline=deadline, alive=survivor)
        ref_pub = Publisher(ref_settings, ref_topics.canonical, messages).start()
        pub = Publisher(pair_settings, topics.canonical, messages, rate=RATE).start()

        # let both process for a while, then crash one of them
        progress = wait_for_progress(pair_settings, group, topics.canonical, topics.partitions, 40,
                                     deadline=deadline, alive=survivor)
        check_alive({"victim": victim}, logs)
        at_kill = committed_offsets(pair_settings, group, canonical_tps)
        kill_service(victim)
        killed = time.monotonic()
        # the takeover is done when every partition (the victim's too) is applied past where it stood
        wait_for_assignment(logs / "survivor.log", topics.canonical, lambda ps: ps == everything,
                            deadline=deadline, alive=survivor)
        rebalanced = time.monotonic() - killed
        wait_for_applied(pair_settings, topics, {tp: at_kill[tp] + 1 for tp in canonical_tps}, deadline=deadline,
                         on_wait=lambda: check_alive({"survivor": survivor}, logs))
        takeover = time.monotonic() - killed
        assert not pub.done, "the stream ended before the takeover: lower RATE or raise ROWS"
        pub.rate = None

        ends = pub.join(deadline - time.monotonic())
        ref_ends = ref_pub.join(deadline - time.monotonic())
        procs = {"survivor": survivor, "single worker": ref_worker}
        wait_for_applied(pair_settings, topics, ends, deadline=deadline, on_wait=lambda: check_alive(procs, logs))
        wait_for_applied(ref_settings, ref_topics, ref_ends, deadline=deadline,
                         on_wait=lambda: check_alive(procs, logs))
        # and the group's commit follows what the table applied (faust's own commit could stall behind
        # an offset it never saw acked, so a restart re-read everything after it)
        wait_for_commits(pair_settings, group, ends, on_wait=lambda: check_alive(procs, logs),
                         deadline=min(deadline, time.monotonic() + COMMIT_FOLLOWS_S))
    finally:
        for proc in (victim, survivor, ref_worker):
            stop_service(proc)
    print(f"\nkilled the worker holding canonical partitions {sorted(held)} after {progress} commits; the "
          f"survivor was assigned them {rebalanced:.1f}s later and applied on every partition "
          f"{takeover:.1f}s after the kill; its recovery took {recovery_seconds(logs / 'survivor.log')[-1]:.2f}s")

    ref = collect_results(ref_settings, ref_topics)
    got = collect_results(pair_settings, topics)
    all_facts = set().union(*(facts for _, _, facts in messages))
    assert ref.known_fact_ids() == all_facts
    assert got.known_fact_ids() == all_facts  # nothing the victim held was lost
    assert got.state == ref.state
    # rows are 15 min apart, more than the scoring cadence (scoring_min_interval_s): each one is a point
    assert got.snapshot_points == {(p, o) for (_, p), end in ends.items() for o in range(end)} == ref.snapshot_points
    assert set(got.features) == set(ref.features) and set(got.scores) == set(ref.scores)
    assert got.alerts == ref.alerts and ref.alerts
    assert got.differing_repeats() == []


@pytest.mark.timeout(300)
def test_a_rolling_restart_of_a_dynamic_group_loses_nothing_and_stops_no_worker(settings, tmp_path):
    """Two workers without static membership, restarted one after the other (SIGTERM, then start
    again) while the stream is quiet, as a rolling upgrade does: each rebalance moves partitions to the
    other worker and back, and a worker may keep a standby copy across it (the race in which faust's
    standby check stopped a worker on the embedded broker is tested in tests/streams/test_app.py). Then
    the rest of the stream: the results equal a single undisturbed worker's."""
    messages = canonical_messages(PATIENTS, ROWS)
    before, after = messages[:len(messages) // 2], messages[len(messages) // 2:]
    ref_settings, pair_settings = _sibling(settings, "rs"), _sibling(settings, "rp")
    ref_topics, topics = topics_for(ref_settings), topics_for(pair_settings)
    ensure_topics(ref_settings, ref_topics)
    ensure_topics(pair_settings, topics)
    everything = set(range(topics.partitions))
    split = lambda ps: 0 < len(ps) < len(everything)  # noqa: E731
    deadline = time.monotonic() + 270
    logs = tmp_path

    def start(name: str):
        return start_service(["worker", "--loglevel", "INFO"], pair_settings, logs / f"{name}.log")

    ref_worker = start_service(["worker", "--loglevel", "INFO"], ref_settings, logs / "single.log")
    workers = {"a": start("a-1"), "b": start("b-1")}
    workers_log = {name: logs / f"{name}-1.log" for name in workers}
    procs = {"single worker": ref_worker, **workers}
    try:
        wait_for_group(ref_settings, f"{ref_settings.group_prefix}-worker", alive=ref_worker)
        wait_for_assignment(workers_log["b"], topics.canonical, split, deadline=deadline, alive=workers["b"])
        ref_pub = Publisher(ref_settings, ref_topics.canonical, messages).start()
        ends = Publisher(pair_settings, topics.canonical, before).start().join(deadline - time.monotonic())
        wait_for_applied(pair_settings, topics, ends, deadline=deadline, on_wait=lambda: check_alive(procs, logs))
        for name, other in (("b", "a"), ("a", "b")):
            assert stop_service(workers[name]) == 0  # SIGTERM: a graceful stop
            del procs[name]
            wait_for_assignment(workers_log[other], topics.canonical, lambda ps: ps == everything,
                                deadline=deadline, alive=workers[other])
            workers[name] = procs[name] = start(f"{name}-2")
            workers_log[name] = logs / f"{name}-2.log"
            wait_for_assignment(workers_log[name], topics.canonical, split, deadline=deadline, alive=workers[name])
            wait_for_assignment(workers_log[other], topics.canonical, split, deadline=deadline, alive=workers[other])
        rest = Publisher(pair_settings, topics.canonical, after).start().join(deadline - time.monotonic())
        ends = {tp: max(ends.get(tp, 0), end) for tp, end in rest.items()}
        ref_ends = ref_pub.join(deadline - time.monotonic())
        wait_for_applied(pair_settings, topics, ends, deadline=deadline, on_wait=lambda: check_alive(procs, logs))
        wait_for_applied(ref_settings, ref_topics, ref_ends, deadline=deadline,
                         on_wait=lambda: check_alive(procs, logs))
        check_alive(procs, logs)
    finally:
        for proc in (*workers.values(), ref_worker):
            stop_service(proc)

    ref = collect_results(ref_settings, ref_topics)
    got = collect_results(pair_settings, topics)
    assert got.known_fact_ids() == ref.known_fact_ids() == set().union(*(facts for _, _, facts in messages))
    assert got.state == ref.state
    assert set(got.scores) == set(ref.scores)
    assert got.alerts == ref.alerts and ref.alerts
    assert got.differing_repeats() == []
