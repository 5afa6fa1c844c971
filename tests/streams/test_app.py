"""The worker's bookkeeping that keeps the table and the canonical stream in step, without Kafka."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest

from streams.app import AppliedOnlyConsumer, ChangelogConfirmations, PendingRewinds, sequence_batch
from streams.patient_agent import CanonicalMessage


def msg(partition: int, offset: int) -> CanonicalMessage:
    return CanonicalMessage(partition, offset, b"[]", key=b"p1")


def offsets(msgs) -> list[tuple[int, int]]:
    return [(m.partition, m.offset) for m in msgs]


def test_messages_in_step_are_applied_and_advance_the_next_offset():
    keep, advanced, rewind = sequence_batch([msg(0, 5), msg(1, 2), msg(0, 6)], {0: 5, 1: 2})
    assert offsets(keep) == [(0, 5), (1, 2), (0, 6)]
    assert advanced == {0: 7, 1: 3}
    assert rewind == {}


def test_a_replay_of_applied_messages_is_dropped():
    # after a restart the consumer resumes from the committed offset, which may lag the table
    keep, advanced, rewind = sequence_batch([msg(0, 3), msg(0, 4), msg(0, 5)], {0: 5})
    assert offsets(keep) == [(0, 5)]
    assert advanced == {0: 6} and rewind == {}


def test_a_skipped_message_rewinds_its_partition_and_holds_back_the_rest_of_it():
    batch = [msg(0, 7), msg(1, 0), msg(0, 8), msg(1, 1)]
    keep, advanced, rewind = sequence_batch(batch, {0: 5, 1: 0})
    assert offsets(keep) == [(1, 0), (1, 1)]  # the other partition is unaffected
    assert rewind == {0: 5}  # offsets 5 and 6 were never applied: read again from 5
    assert advanced == {1: 2}


def test_a_partition_without_a_next_offset_takes_what_comes():
    keep, advanced, rewind = sequence_batch([msg(2, 40), msg(2, 41)], {2: None})
    assert offsets(keep) == [(2, 40), (2, 41)]
    assert advanced == {2: 42} and rewind == {}


def test_a_partition_already_rewound_drops_the_stale_messages_without_seeking_again():
    # fetched before the seek took effect: 7 and 8 arrive again after the rewind to 5 was issued
    keep, advanced, rewind = sequence_batch([msg(0, 7), msg(0, 8)], {0: 5}, awaiting={0})
    assert keep == [] and rewind == {} and advanced == {}
    # then the seek shows: 5 arrives and the partition moves on from there, in order
    keep, advanced, rewind = sequence_batch([msg(0, 9), msg(0, 5), msg(0, 6)], {0: 5}, awaiting={0})
    assert offsets(keep) == [(0, 5), (0, 6)] and advanced == {0: 7} and rewind == {}


def test_a_rewind_is_awaited_until_its_partition_advances_or_for_a_while_only():
    rewinds = PendingRewinds(retry_s=5.0)
    rewinds.issued(0, now=100.0)
    rewinds.issued(1, now=100.0)
    assert rewinds.awaiting(now=101.0) == {0, 1}
    rewinds.settled({0: 6})  # partition 0 applied the message it was rewound to
    assert rewinds.awaiting(now=101.0) == {1}
    assert rewinds.awaiting(now=105.5) == set()  # a lost seek: the next gap seeks again
    rewinds.issued(2, now=200.0)
    rewinds.clear()  # a rebalance re-seeks everything
    assert rewinds.awaiting(now=200.1) == set()


def test_a_rewind_whose_re_read_never_shows_is_due_again_without_new_messages():
    rewinds = PendingRewinds(retry_s=5.0)
    rewinds.issued(0, now=100.0)
    rewinds.issued(3, now=102.0)
    assert rewinds.overdue(now=104.9) == []  # the seek may still be on its way
    assert rewinds.overdue(now=105.0) == [0]
    rewinds.settled({3: 12})
    assert rewinds.overdue(now=200.0) == [0]  # the settled one is not sought again
    rewinds.issued(0, now=200.0)  # sought again: awaited afresh
    assert rewinds.overdue(now=201.0) == [] and rewinds.awaiting(now=201.0) == {0}


def test_faust_never_commits_and_its_ack_records_do_not_pile_up():
    # faust's ack bookkeeping, as its consumer keeps it: one entry per acked message until its commit
    consumer = SimpleNamespace(_acked=defaultdict(list, {"tp0": [5, 6, 7], "tp1": [2]}),
                               _acked_index=defaultdict(set, {"tp0": {5, 6, 7}, "tp1": {2}}),
                               _gap=defaultdict(list, {"tp0": ["3-4"]}))
    assert AppliedOnlyConsumer._filter_committable_offsets(consumer, ["tp0"]) == {}  # nothing of faust's
    assert "tp0" not in consumer._acked and "tp0" not in consumer._acked_index and "tp0" not in consumer._gap
    assert consumer._acked["tp1"] == [2]  # a partition not asked about is left alone


def test_recent_cache_keeps_only_the_most_recently_used_patients():
    from streams.app import RecentCache

    cache = RecentCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # a is now the most recent
    cache["c"] = 3
    assert list(cache) == ["a", "c"] and cache.get("b") is None


def test_the_worker_joins_as_a_static_member_only_when_settings_say_so(settings, tmp_path):
    import faust

    from streams.app import create_app
    from streams.topics import topics_for
    from wardwatch.demo import seed_models

    seed_models(tmp_path / "models")
    for static, expected in ((False, None), (True, "worker-7")):
        s = settings.model_copy(update={"data_dir": tmp_path, "model_dir": tmp_path / "models",
                                        "static_membership": static, "instance_id": "worker-7"})
        app = create_app(s, topics_for(s))  # builds the faust app; its consumer joins only when it starts
        assert isinstance(app, faust.App) and app.conf.consumer_group_instance_id == expected


def test_a_changelog_request_carries_many_patient_records_yet_fits_a_default_kafka_message(settings):
    from streams.app import changelog_producer_config

    config = changelog_producer_config(settings)
    # a patient record with a day of facts is ~17 KB (README, live state): at 16 KB batches every record
    # was a produce request of its own, and the changelog fell seconds behind at 1k msg/s
    assert config["batch.size"] >= 50 * 17_000
    assert config["batch.size"] <= 1_048_588  # Kafka's default max.message.bytes: a batch the broker accepts
    # records land in produce order per partition: a batch's next-offset marker never before its patients
    assert config["enable.idempotence"] is True and config["acks"] == "all"


def test_faust_recovery_can_read_the_compressed_changelog_the_worker_writes(settings):
    from aiokafka import codec

    from streams.app import changelog_producer_config

    # without the codec, recovery fails on the first record batch after every restart and rebalance
    # (the real-broker restart tests read it back end to end)
    readable = {"lz4": codec.has_lz4, "zstd": codec.has_zstd, "snappy": codec.has_snappy,
                "gzip": codec.has_gzip, "none": lambda: True}
    assert readable[changelog_producer_config(settings)["compression.type"]]()


class _ChangelogAwaitingAck:
    """A table whose changelog acknowledgement arrives when the test says so."""

    def __init__(self, fails: bool = False):
        self.acknowledged = asyncio.Event()
        self.fails = fails

    async def confirm_changelog(self) -> None:
        await self.acknowledged.wait()
        if self.fails:
            raise RuntimeError("the table changelog was not acknowledged")


class _Committer:
    def __init__(self):
        self.committable: list[dict[int, int]] = []

    def applied(self, next_offsets: dict[int, int]) -> None:
        self.committable.append(next_offsets)


def test_a_batch_becomes_committable_only_once_its_changelog_is_acknowledged():
    async def scenario():
        table, committer = _ChangelogAwaitingAck(), _Committer()
        confirmations = ChangelogConfirmations(table, committer)
        confirmations.start({0: 10, 3: 7})
        await asyncio.sleep(0.01)  # the next batch is processed meanwhile
        unacknowledged = list(committer.committable)
        waiting = asyncio.ensure_future(confirmations.wait())
        await asyncio.sleep(0.01)
        waited_before_ack = not waiting.done()
        table.acknowledged.set()
        await asyncio.wait_for(waiting, 5)
        return unacknowledged, waited_before_ack, committer.committable

    unacknowledged, waited_before_ack, committable = asyncio.run(scenario())
    assert unacknowledged == []
    assert waited_before_ack  # the next batch's flush (and a revocation) waits for it
    assert committable == [{0: 10, 3: 7}]


def test_a_cancelled_wait_leaves_the_confirmation_running():
    async def scenario():
        table, committer = _ChangelogAwaitingAck(), _Committer()
        confirmations = ChangelogConfirmations(table, committer)
        confirmations.start({1: 5})
        waiting = asyncio.ensure_future(confirmations.wait())
        await asyncio.sleep(0.01)
        waiting.cancel()  # a shutdown cancels the agent while it waits
        table.acknowledged.set()
        await asyncio.wait_for(confirmations.wait(), 5)
        return committer.committable

    assert asyncio.run(scenario()) == [{1: 5}]


def test_a_changelog_that_is_not_acknowledged_ends_the_worker_without_committing(monkeypatch):
    exits: list[int] = []

    class Exited(Exception):  # os._exit never returns; SystemExit would escape the event loop
        pass

    def exit_(code: int) -> None:
        exits.append(code)
        raise Exited(code)

    monkeypatch.setattr("streams.app.os._exit", exit_)
    monkeypatch.setattr("streams.app.logging.shutdown", lambda: None)

    async def scenario():
        table, committer = _ChangelogAwaitingAck(fails=True), _Committer()
        confirmations = ChangelogConfirmations(table, committer)
        confirmations.start({2: 9})
        table.acknowledged.set()
        with pytest.raises(Exited):
            await asyncio.wait_for(confirmations.wait(), 5)
        return committer.committable

    assert asyncio.run(scenario()) == []
    assert exits == [70]  # the supervisor restarts it; the batch is applied again


def test_a_graceful_stop_commits_the_applied_offsets_the_interval_held_back():
    from faust.types import TP

    from streams.app import AppliedOffsetCommitter

    class _Consumer:
        def __init__(self):
            self.commits: list[dict] = []

        async def _commit_offsets(self, offsets):
            self.commits.append(dict(offsets))
            return True

    class _App:
        consumer = _Consumer()

    async def scenario():
        committer = AppliedOffsetCommitter(_App(), "canonical", interval_s=3600.0)
        committer.applied({0: 5})
        committer.applied({0: 7, 2: 3})  # newer offsets win
        await committer.flush()
        await committer.flush()  # nothing pending: no commit request
        return _App.consumer.commits

    assert asyncio.run(scenario()) == [{TP("canonical", 0): 7, TP("canonical", 2): 3}]


class _CommittingConsumer:
    """faust's consumer as the committer sees it: `_commit_offsets` answers from `answers` (then True),
    `owned` is the assignment."""

    def __init__(self, answers=(), owned=(0, 1, 2, 3), hang: bool = False):
        self.answers, self.owned, self.hang = list(answers), owned, hang
        self.commits: list[dict] = []

    async def _commit_offsets(self, offsets):
        self.commits.append({tp.partition: o for tp, o in offsets.items()})
        if self.hang:  # a broker that never answers
            await asyncio.Event().wait()
        return self.answers.pop(0) if self.answers else True

    def assignment(self):
        from faust.types import TP
        return {TP("canonical", p) for p in self.owned}


def _committer(consumer, interval_s: float = 0.0):
    from streams.app import AppliedOffsetCommitter

    class _App:
        pass

    app = _App()
    app.consumer = consumer
    return AppliedOffsetCommitter(app, "canonical", interval_s=interval_s)


def test_a_commit_lost_to_a_rebalance_is_made_again_for_the_partitions_the_worker_kept(monkeypatch):
    monkeypatch.setattr("streams.app.COMMIT_RETRY_S", 0.01)
    consumer = _CommittingConsumer(answers=[False], owned=(0,))  # faust: "already rebalanced", no exception

    async def scenario():
        committer = _committer(consumer)
        running = asyncio.ensure_future(committer.run())
        committer.applied({0: 7, 3: 2})  # the last batch of the stream: nothing else will commit partition 0
        deadline = asyncio.get_running_loop().time() + 5
        while len(consumer.commits) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # no third commit follows: the retried one was made
        running.cancel()

    asyncio.run(scenario())
    # partition 3 went to another worker in the rebalance: its new owner commits it
    assert consumer.commits == [{0: 7, 3: 2}, {0: 7}]


def test_a_graceful_stop_waits_for_the_commit_in_flight_and_a_silent_broker_cannot_hold_it():
    async def stop_while_committing(consumer, timeout_s):
        committer = _committer(consumer, interval_s=3600.0)
        running = asyncio.ensure_future(committer.run())
        committer.applied({1: 4})
        await asyncio.sleep(0.01)  # the commit is in flight
        committer.applied({1: 9})  # held back by the interval
        running.cancel()  # the stop cancels the committer's task...
        return await committer.flush(timeout_s=timeout_s)  # ...and the stop's own commit follows

    answering = _CommittingConsumer()
    assert asyncio.run(stop_while_committing(answering, 5.0)) is True
    assert answering.commits == [{1: 4}, {1: 9}]

    silent = _CommittingConsumer(hang=True)
    with pytest.raises(asyncio.TimeoutError):  # the shutdown handler logs it and the stop goes on
        asyncio.run(asyncio.wait_for(stop_while_committing(silent, 0.2), 5))


class _TansuHighwaters:
    """What the embedded broker answers for a changelog partition whose last record batch holds several
    records (a worker batch's patient records and its next-offset marker): the batch's base offset + 1."""

    def __init__(self, answers):
        self.answers = answers

    async def highwaters(self, *tps):
        return {tp: self.answers[tp] for tp in tps}


def test_a_standby_copy_read_past_the_brokers_high_watermark_estimate_is_not_taken_for_corrupt():
    from faust.types import TP as FaustTP

    from streams.app import ExactEndRecovery

    kept, fresh = FaustTP("w-patient_state-changelog", 0), FaustTP("w-patient_state-changelog", 1)
    recovery = ExactEndRecovery.__new__(ExactEndRecovery)  # its highwater step only; no app needed
    recovery.log = logging.getLogger("test-recovery")
    recovery.standby_offsets = Counter({kept: 34, fresh: None})  # kept across the rebalance, read to its end
    highwaters = Counter()
    asyncio.run(recovery._build_highwaters(_TansuHighwaters({kept: 34, fresh: 12}), {kept, fresh}, highwaters,
                                           "standby"))
    # faust's check (recovery_consistency_check) stops the worker when a standby offset exceeds this
    assert highwaters[kept] >= recovery.standby_offsets[kept]
    assert highwaters[fresh] == 11  # a copy not read yet keeps the broker's estimate (faust's last-record convention)
