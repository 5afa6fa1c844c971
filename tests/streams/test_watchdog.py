"""The consumption watchdogs on the real embedded broker: they read the broker's watermarks and a
group's commits with a client of their own, say the service is not ready and exit it when messages
wait and nothing is applied for the window; a real worker whose fetcher stops, and a real ingest
whose consumer stops, exit and their restarts apply everything."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from streams.topics import ensure_topics, topics_for
from streams.watchdog import STALL_EXIT_CODE, OffsetsProbe, StallWatchdog
from tests.streams.worker_runs import Publisher, canonical_messages, collect_results
from wardwatch.procs import start_service, stop_service, wait_for_commits, wait_for_group
from wardwatch.worker_results import wait_for_applied


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _produce(settings, topic: str, partition: int, n: int) -> None:
    producer = Producer(settings.kafka_client_config())
    for i in range(n):
        producer.produce(topic, value=b"x", key=b"k", partition=partition)
    assert producer.flush(30) == 0


def _worker_like(settings, topic, applied, **kwargs):
    """A watchdog looking at `applied` (partition -> next offset) of `topic`, as the worker's does."""
    probe = OffsetsProbe(settings, "test")

    def look():
        current = {(topic, p): offset for p, offset in applied().items()}
        return current, probe.watermarks(current)

    return StallWatchdog(30.0, look, service="worker", close=probe.close, **kwargs), probe


@pytest.mark.timeout(120)
def test_the_watchdog_sees_waiting_messages_on_the_broker_and_calls_a_partition_that_never_moves_stalled(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    _produce(settings, topics.canonical, 1, 12)
    applied: dict[int, int | None] = {0: None, 1: None}
    stalls = []
    clock, busy = _Clock(), [False]
    dog, probe = _worker_like(settings, topics.canonical, lambda: dict(applied), busy=lambda: busy[0],
                              on_stall=lambda s, lag: stalls.append((s, lag)), clock=clock)
    one, zero = (topics.canonical, 1), (topics.canonical, 0)
    try:
        assert not dog.ready()  # nothing observed yet
        dog.check()
        assert dog.watch.lag[one] >= 1 and dog.watch.lag[zero] == 0  # partition 1's messages wait, 0 is empty
        assert dog.ready() and not stalls
        busy[0] = True
        assert not dog.ready()  # rebalancing or recovering
        clock.now += 30.0
        dog.check()  # a recovery as long as the window is no stall: the window starts again after it
        assert not stalls and not dog.ready()
        busy[0] = False
        dog.check()
        assert dog.ready() and not stalls

        clock.now += 30.0
        dog.check()
        assert [set(s) for s, _ in stalls] == [{one}] and stalls[0][1][one] >= 1
        assert not dog.ready()
        assert dog.gauges()["consumption"]["seconds_without_progress"] == 30

        applied[1] = 12  # the worker applied everything: ready again, nothing waits
        stalls.clear()
        clock.now += 30.0
        dog.check()
        assert dog.watch.lag == {zero: 0, one: 0} and dog.ready() and not stalls
    finally:
        probe.close()


@pytest.mark.timeout(60)
def test_a_round_that_cannot_be_observed_is_not_ready_and_restarts_the_window(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    _produce(settings, topics.canonical, 0, 3)
    clock, failing = _Clock(), [False]
    stalls = []

    def applied():
        if failing[0]:
            raise RuntimeError("the consumer is not started")
        return {0: None}

    dog, probe = _worker_like(settings, topics.canonical, applied, on_stall=lambda s, lag: stalls.append(s),
                              clock=clock)
    try:
        dog.check()
        failing[0] = True
        clock.now += 20.0
        dog.check()
        assert not dog.ready()
        failing[0] = False
        clock.now += 20.0
        dog.check()  # 40 s since the first look, but the failed round restarted the window
        assert not stalls and dog.ready()
        clock.now += 30.0
        dog.check()
        assert [set(s) for s in stalls] == [{(topics.canonical, 0)}]
    finally:
        probe.close()


# Loaded into the worker through PYTHONPATH: once the marker file exists, faust's fetcher returns no
# records any more, as the stalled worker of a CI run did (joined, ready, and then fetched nothing).
# Its first empty answer writes `<marker>.seen`: a fetch already waiting when the marker appeared may
# still return what arrives meanwhile.
STALLING_FETCHER = '''
import asyncio, os
from faust.transport.drivers import aiokafka as _driver

_fetch = _driver.AIOKafkaConsumerThread._fetch_records

async def _stalling_fetch(self, consumer, active_partitions, timeout=None, max_records=None):
    marker = os.environ["WW_TEST_STALL_MARKER"]
    if os.path.exists(marker):
        open(marker + ".seen", "w").close()
        await asyncio.sleep(timeout or 0.1)
        return {}
    return await _fetch(self, consumer, active_partitions, timeout=timeout, max_records=max_records)

_driver.AIOKafkaConsumerThread._fetch_records = _stalling_fetch
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readyz(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return None


def _injected(settings, tmp_path, monkeypatch, sitecustomize: str):
    """Settings of a service started with `sitecustomize` loaded (PYTHONPATH), a 6 s stall window and
    a metrics port; returns them, the marker file that starts the stall, and the port."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(sitecustomize)
    marker = tmp_path / "stall"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("WW_TEST_STALL_MARKER", str(marker))
    port = _free_port()
    return settings.model_copy(update={"stall_timeout_s": 6.0, "metrics_port": port, "log_level": "INFO"}), marker, port


def _stall_exit_line(code: int, log) -> str:
    """The watchdog's one critical exit line, after the process exited 70, not before the 6 s window
    (by the seconds without progress it reports for every partition it names)."""
    text = log.read_text()
    assert code == STALL_EXIT_CODE, text[-3000:]
    (line,) = [line for line in text.splitlines() if "messages waiting and none applied" in line]
    seconds = [int(s) for s in re.findall(r"\(lag \d+, (\d+) s\)", line)]
    assert '"level":"critical"' in line and seconds and min(seconds) >= 6, line
    return line


def _applied(settings, topics, ends, proc, log, deadline: float) -> None:
    """wait_for_applied, failing at once with the worker's log if it exits, and with the log on a
    timeout too (a worker that idles says why only there)."""
    def alive() -> None:
        assert proc.poll() is None, log.read_text()[-3000:]

    try:
        wait_for_applied(settings, topics, ends, deadline=deadline, on_wait=alive)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- worker log (last 6000 characters) ---\n{log.read_text()[-6000:]}") from None


def _restart_applies_everything(settings, topics, ends, messages, tmp_path, deadline: float) -> None:
    """The restart (a supervisor's job; compose's `restart: unless-stopped`) applies every message up
    to `ends`: its table holds every fact of `messages`."""
    log = tmp_path / "worker-1.log"
    worker = start_service(["worker"], settings, log)
    try:
        _applied(settings, topics, ends, worker, log, deadline)
    finally:
        assert stop_service(worker) == 0
    results = collect_results(settings, topics)
    assert results.known_fact_ids() == set().union(*(facts for _, _, facts in messages))


def _until(done, proc, log, deadline: float) -> None:
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_a_worker_whose_fetcher_stops_exits_and_its_restart_applies_everything(settings, tmp_path, monkeypatch):
    stalling, marker, port = _injected(settings, tmp_path, monkeypatch, STALLING_FETCHER)
    topics = topics_for(stalling)
    ensure_topics(stalling, topics)
    messages = canonical_messages(4, 6)
    first, rest = messages[:8], messages[8:]
    deadline = time.monotonic() + 200

    log = tmp_path / "worker-0.log"
    worker = start_service(["worker"], stalling, log)
    try:
        wait_for_group(stalling, f"{stalling.group_prefix}-worker", alive=worker)
        ends = Publisher(stalling, topics.canonical, first).start().join(60)
        _applied(stalling, topics, ends, worker, log, deadline)
        _until(lambda: _readyz(port) == 200, worker, log, deadline)  # consuming, caught up: ready

        marker.touch()  # from now on the worker fetches nothing
        _until(Path(f"{marker}.seen").exists, worker, log, deadline)  # the stall took hold
        rest_ends = Publisher(stalling, topics.canonical, rest).start().join(60)
        code = worker.wait(timeout=60)
    finally:
        stop_service(worker)
    line = _stall_exit_line(code, log)
    assert "p0" not in line  # partitions and counts, never a patient id

    # the restart (a supervisor's job; compose's `restart: unless-stopped`) applies what waited
    marker.unlink()
    applied_before = collect_results(stalling, topics).next_offsets
    assert sum(applied_before.values()) == len(first)  # the stall held: nothing of the rest was applied
    _restart_applies_everything(stalling, topics, {**ends, **rest_ends}, messages, tmp_path, deadline)


# Loaded into the worker through PYTHONPATH: while the marker file exists, faust's table recovery
# never finds itself done (it reads the changelog to its end and then waits for ever), as a recovery
# waiting for records that never come would.
STUCK_RECOVERY = '''
import os
from faust.tables import recovery as _recovery

_need = _recovery.Recovery.need_recovery

def _never_done(self):
    return True if os.path.exists(os.environ["WW_TEST_STALL_MARKER"]) else _need(self)

_recovery.Recovery.need_recovery = _never_done
'''


@pytest.mark.timeout(240)
def test_a_worker_whose_recovery_never_ends_exits_and_its_restart_applies_everything(settings, tmp_path, monkeypatch):
    stuck, marker, port = _injected(settings, tmp_path, monkeypatch, STUCK_RECOVERY)
    topics = topics_for(stuck)
    ensure_topics(stuck, topics)
    messages = canonical_messages(4, 6)
    ends = Publisher(stuck, topics.canonical, messages).start().join(60)
    deadline = time.monotonic() + 200

    marker.touch()
    log = tmp_path / "worker-0.log"
    started = time.monotonic()
    worker = start_service(["worker"], stuck, log)
    answers = set()  # /readyz while it is stuck: never ready
    try:
        while worker.poll() is None and time.monotonic() - started < 90:
            answers.add(_readyz(port))
            time.sleep(0.2)
        code = worker.wait(timeout=5)
    finally:
        stop_service(worker)
    text = log.read_text()
    assert code == STALL_EXIT_CODE, text[-3000:]
    assert 503 in answers and 200 not in answers, answers
    (line,) = [line for line in text.splitlines() if "without any progress" in line]
    seconds = int(re.search(r"state for (\d+) s", line).group(1))
    assert '"level":"critical"' in line and 6 <= seconds < time.monotonic() - started, line

    marker.unlink()  # the restart recovers normally and applies what waited
    _restart_applies_everything(stuck, topics, ends, messages, tmp_path, deadline)


@pytest.mark.timeout(60)
def test_the_probe_reads_a_groups_commits_without_joining_it(settings):
    from confluent_kafka import Consumer, TopicPartition

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    _produce(settings, topics.canonical, 2, 5)
    group = f"{settings.group_prefix}-probe-check"
    owner = Consumer({**settings.kafka_client_config(), "group.id": group, "enable.auto.commit": False})
    probe = OffsetsProbe(settings, "test", group)
    try:
        owner.commit(offsets=[TopicPartition(topics.canonical, 2, 4)], asynchronous=False)
        got = probe.committed([(topics.canonical, 2), (topics.canonical, 0)])
        assert got == {(topics.canonical, 2): 4, (topics.canonical, 0): None}
    finally:
        probe.close()
        owner.close()


# Loaded into the ingest, archiver or subscription watcher through PYTHONPATH (before any imports
# confluent_kafka's Consumer):
# once the marker file exists, their consumer returns nothing.
STALLING_CONSUMER = '''
import os, time
import confluent_kafka


class _StallingConsumer(confluent_kafka.Consumer):
    def consume(self, num_messages=1, timeout=-1):
        marker = os.environ["WW_TEST_STALL_MARKER"]
        if os.path.exists(marker):
            open(marker + ".seen", "w").close()
            time.sleep(max(timeout, 0.01))
            return []
        return super().consume(num_messages=num_messages, timeout=timeout)


confluent_kafka.Consumer = _StallingConsumer
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("service", ["ingest", "archiver", "subscriptions"])
def test_a_service_whose_consumer_stops_exits_and_its_restart_processes_everything(settings, tmp_path, monkeypatch,
                                                                                   service):
    stalling, marker, port = _injected(settings, tmp_path, monkeypatch, STALLING_CONSUMER)
    topics = topics_for(stalling)
    ensure_topics(stalling, topics)
    # not what any of them expects: the ingest dead-letters them, the archiver keeps them as unreadable
    # rows, the subscription watcher counts them unreadable; each counts as processed, and is committed
    source, group = {"ingest": (topics.cdc["vital_signs"], f"{stalling.group_prefix}-ingest"),
                     "archiver": (topics.scores, f"{stalling.group_prefix}.archiver"),
                     "subscriptions": (topics.fhir, f"{stalling.group_prefix}-subscriptions")}[service]
    deadline = time.monotonic() + 200

    log = tmp_path / f"{service}-0.log"
    proc = start_service([service], stalling, log)
    try:
        if service != "subscriptions":  # the watcher assigns itself every partition: no group to join
            wait_for_group(stalling, group, alive=proc)
        _produce(stalling, source, 0, 5)
        wait_for_commits(stalling, group, {(source, 0): 5}, deadline=deadline)
        _until(lambda: _readyz(port) == 200, proc, log, deadline)  # consuming, caught up: ready

        marker.touch()  # from now on its consumer returns nothing
        _until(Path(f"{marker}.seen").exists, proc, log, deadline)  # the stall took hold
        _produce(stalling, source, 0, 5)
        code = proc.wait(timeout=60)
    finally:
        stop_service(proc)
    line = _stall_exit_line(code, log)
    assert f"{service}: no progress on all assigned partitions" in line

    marker.unlink()
    proc = start_service([service], stalling, tmp_path / f"{service}-1.log")
    try:
        wait_for_commits(stalling, group, {(source, 0): 10}, deadline=deadline)  # what waited, processed
    finally:
        assert stop_service(proc) == 0


def _fake_dog(busy, progress, clock, **kwargs):
    """A watchdog over no partitions, with a busy flag and a progress token under the test's control."""
    return StallWatchdog(30.0, lambda: ({}, {}), service="worker", busy=lambda: busy[0],
                         busy_progress=lambda: progress[0], clock=clock, **kwargs)


def test_a_rebalance_or_recovery_without_progress_for_the_window_exits_and_one_that_moves_does_not():
    clock, busy, progress, stuck = _Clock(), [True], [0], []
    dog = _fake_dog(busy, progress, clock, on_busy_stall=stuck.append)
    for _ in range(10):  # five minutes of a recovery that keeps reading: exempt, not ready
        dog.check()
        clock.now += 30.0
        progress[0] += 100
    assert not stuck and not dog.ready()
    dog.check()
    clock.now += 29.0
    dog.check()
    assert not stuck  # 29 s without progress
    clock.now += 1.0
    dog.check()
    assert stuck == [30.0]


def test_without_a_progress_reading_a_rebalance_or_recovery_is_exempt_however_long():
    clock, stuck = _Clock(), []
    dog = StallWatchdog(30.0, lambda: ({}, {}), service="ingest", busy=lambda: True, clock=clock,
                        on_stall=lambda s, lag: stuck.append(s))
    for _ in range(20):
        dog.check()
        clock.now += 30.0
    assert not stuck and not dog.ready()


def test_a_watchdog_that_cannot_look_for_a_whole_window_warns_once(caplog):
    clock, stalls = _Clock(), []

    def look():
        raise RuntimeError("the broker does not answer")

    dog = StallWatchdog(30.0, look, service="worker", clock=clock, on_stall=lambda s, lag: stalls.append(s))
    with caplog.at_level("WARNING", logger="wardwatch.watchdog"):
        for _ in range(6):
            dog.check()
            clock.now += 15.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no observation for 30 s (RuntimeError)" in warnings[0]
    assert not stalls and not dog.ready()  # a broker away is not this service's stall


def test_a_watchdog_whose_check_fails_keeps_watching_and_starting_it_again_does_not_raise(caplog):
    # the worker calls start() at each assignment (faust's on_partitions_assigned): a later rebalance must
    # neither raise (a thread starts once; raising there would crash the worker) nor start a second watch;
    # and a check that raises (a bug) must not end the watch for good
    calls = []

    def busy():
        calls.append(1)
        raise RuntimeError("a bug in the busy check")

    dog = StallWatchdog(0.1, lambda: ({}, {}), service="worker-start-twice", busy=busy)
    with caplog.at_level("ERROR", logger="wardwatch.watchdog"):
        dog.start()
        first = dog._thread
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        dog.start()
        assert dog._thread is first and first.is_alive() and len(calls) >= 3
        assert not dog.ready()
        dog.stop()
        first.join(timeout=10)
        dog.start()  # after a stop too
    assert any("a check failed (RuntimeError)" in r.getMessage() for r in caplog.records)
