"""Hot reload through the real broker: the running worker switches to a promoted model mid-stream
and back on rollback, every score names its model version, and no canonical message goes unscored."""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from batch import registry
from schemas.canonical import encode_batch
from streams.topics import ensure_topics, topics_for
from tests.streams.test_patient_agent import vitals
from wardwatch.demo import seed_models
from wardwatch.procs import start_service, stop_service, wait_for_group

T0 = 1_718_000_000_000
MIN = 60_000
PATIENTS = ("hr-1", "hr-2")


class Feed:
    """Sends one vitals row per message (each one is a scoring point) and reads the scores topic."""

    def __init__(self, settings, proc):
        self.topics = topics_for(settings)
        self.proc = proc
        self.producer = Producer({**settings.kafka_client_config(), "linger.ms": 1, "partitioner": "murmur2_random"})
        self.consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        parts = self.consumer.list_topics(self.topics.scores, timeout=30).topics[self.topics.scores].partitions
        self.consumer.assign([TopicPartition(self.topics.scores, p, OFFSET_BEGINNING) for p in parts])
        self.sent: list[tuple[int, int]] = []  # (partition, offset) of every canonical message
        self.scores: dict[tuple[int, int], dict] = {}  # (partition, offset) of the scored message -> record
        self.row = 0

    def send(self, n: int) -> list[tuple[int, int]]:
        batch = []

        def delivered(err, message):
            assert err is None, err
            batch.append((message.partition(), message.offset()))

        for _ in range(n):
            self.row += 1
            patient = PATIENTS[self.row % len(PATIENTS)]
            events = vitals(patient, T0 + self.row * 5 * MIN, self.row)
            self.producer.produce(self.topics.canonical, key=patient.encode(), value=encode_batch(events),
                                  on_delivery=delivered)
        assert self.producer.flush(30) == 0
        self.sent += batch
        return batch

    def wait_scored(self, positions: list[tuple[int, int]], timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while not all(p in self.scores for p in positions):
            if time.monotonic() > deadline:
                missing = [p for p in positions if p not in self.scores]
                raise TimeoutError(f"no score for canonical messages {missing} within {timeout_s}s")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.proc.returncode}")
            for message in self.consumer.consume(num_messages=200, timeout=0.2):
                if message.error() is None:
                    record = orjson.loads(message.value())
                    self.scores.setdefault((record["partition"], record["offset"]), record)
        return [self.scores[p] for p in positions]

    def send_until_version(self, version: str, timeout_s: float = 60.0) -> None:
        """One message at a time until one is scored by `version` (the worker looks every 2 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            [record] = self.wait_scored(self.send(1))
            if record["model_version"] == version:
                return
        raise TimeoutError(f"the worker did not switch to model {version} within {timeout_s}s")


def read_until(settings, topic: str, positions, proc, timeout_s: float = 60.0) -> list[dict]:
    """Records of `topic` for the canonical positions given (in that order), read from the beginning."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-shadow-reader",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        found: dict[tuple[int, int], dict] = {}
        deadline = time.monotonic() + timeout_s
        while not all(p in found for p in positions):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(f"{topic}: records for {[p for p in positions if p not in found]} not seen")
            for message in consumer.consume(num_messages=200, timeout=0.2):
                if message.error() is None:
                    record = orjson.loads(message.value())
                    found.setdefault((record["partition"], record["offset"]), record)
        return [found[p] for p in positions]
    finally:
        consumer.close()


@pytest.mark.integration
def test_promote_and_rollback_switch_the_model_mid_stream_without_losing_events(settings, tmp_path):
    seed_models(settings.model_dir)  # the shipped v0001, current
    # a second registered version: the same verified model under a new name
    import shutil

    shutil.copytree(settings.model_dir / "v0001", settings.model_dir / "v0002")
    card = registry.load_card(settings.model_dir, "v0001")
    registry.write_card(settings.model_dir, "v0002", {**card, "version": "v0002"})
    registry.set_candidate(settings.model_dir, "v0002")  # shadow-scored until it is promoted
    ensure_topics(settings, topics_for(settings))

    proc = start_service(["worker"], settings, log_path=tmp_path / "worker.log")
    try:
        wait_for_group(settings, f"{settings.group_prefix}-worker", alive=proc)
        feed = Feed(settings, proc)

        first = feed.send(4)
        before = feed.wait_scored(first)
        assert {(r["path"], r["model_version"]) for r in before} == {("model", "v0001")}
        shadow = read_until(settings, feed.topics.scores_shadow, first, proc)
        assert {(r["path"], r["model_version"]) for r in shadow} == {("shadow", "v0002")}
        assert [r["snapshot_id"] for r in shadow] == [r["snapshot_id"] for r in before]

        registry.promote(settings.model_dir, "v0002", why="hot reload test")
        feed.send_until_version("v0002")
        promoted = feed.wait_scored(feed.send(4))
        assert {r["model_version"] for r in promoted} == {"v0002"}

        registry.rollback(settings.model_dir, why="hot reload test")
        feed.send_until_version("v0001")
        rolled_back = feed.wait_scored(feed.send(4))
        assert {r["model_version"] for r in rolled_back} == {"v0001"}

        # no canonical message was lost: every one sent has its score record, each naming a version
        scored = feed.wait_scored(feed.sent)
        assert len(scored) == len(feed.sent) == len(set(feed.sent))
        assert all(r["path"] == "model" and r["model_version"] for r in scored)
        # in arrival order the version switches exactly twice: v0001... v0002... v0001...
        versions = [feed.scores[p]["model_version"] for p in feed.sent]
        switches = [b for a, b in zip(versions, versions[1:]) if a != b]
        assert switches == ["v0002", "v0001"]
    finally:
        stop_service(proc)
