"""deploy/create-topics.sh against a stand-in kafka-topics.sh that records its calls."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "create-topics.sh"

# records every call; answers --describe with the file DESCRIBE points to (kafka-topics' format)
FAKE_KAFKA_TOPICS = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ " $* " == *" --describe "* ]]; then cat "$DESCRIBE"; fi
"""


def describe_output(counts: dict[str, int]) -> str:
    lines = []
    for topic, count in counts.items():
        lines.append(f"Topic: {topic}\tTopicId: abc\tPartitionCount: {count}\tReplicationFactor: 1\tConfigs: ")
        lines += [f"\tTopic: {topic}\tPartition: {p}\tLeader: 1\tReplicas: 1\tIsr: 1" for p in range(count)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def run(tmp_path):
    fake = tmp_path / "kafka-topics.sh"
    fake.write_text(FAKE_KAFKA_TOPICS)
    fake.chmod(0o755)
    calls, describe = tmp_path / "calls", tmp_path / "describe"
    calls.touch()

    def run(env: dict[str, str], broker_state: dict[str, int]):
        describe.write_text(describe_output(broker_state))
        full_env = {"PATH": os.environ["PATH"], "KAFKA_TOPICS": str(fake), "CALLS": str(calls),
                    "DESCRIBE": str(describe), **env}
        result = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=30)
        return result, calls.read_text().splitlines()

    return run


def test_creates_every_topic_with_the_partition_count(run):
    result, calls = run({"TOPICS": "a.raw\n  b.out", "PARTITIONS": "6", "BOOTSTRAP": "k:1"},
                        broker_state={"a.raw": 6, "b.out": 6, "other": 1})

    assert result.returncode == 0, result.stderr
    creates = [c for c in calls if "--create" in c]
    assert len(creates) == 2
    for topic, call in zip(["a.raw", "b.out"], creates):
        assert f"--topic {topic} " in call and "--partitions 6 " in call and "--if-not-exists" in call
        assert "--bootstrap-server k:1" in call


def test_fails_when_an_existing_topic_has_another_partition_count(run):
    result, _ = run({"TOPICS": "a.raw b.out", "PARTITIONS": "6"}, broker_state={"a.raw": 6, "b.out": 4})

    assert result.returncode != 0
    assert "b.out has 4 partitions, expected 6" in result.stderr
    assert "a.raw" not in result.stderr


def test_fails_when_a_topic_is_missing_after_creation(run):
    result, _ = run({"TOPICS": "a.raw b.out", "PARTITIONS": "6"}, broker_state={"a.raw": 6})

    assert result.returncode != 0
    assert "b.out has no partitions" in result.stderr


def test_refuses_to_run_without_a_topic_list(run):
    result, calls = run({"PARTITIONS": "6"}, broker_state={})

    assert result.returncode != 0
    assert "TOPICS" in result.stderr
    assert calls == []
