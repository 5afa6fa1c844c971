"""The worker's log as a container log shipper reads it: JSON lines only, each once."""

from __future__ import annotations

import re

import orjson
import pytest

from tests.streams.worker_runs import assigned_partitions
from wardwatch.procs import start_service, stop_service, wait_for_group


@pytest.mark.timeout(120)
def test_the_worker_logs_faust_lines_once_and_as_json(settings, tmp_path):
    log = tmp_path / "worker.log"
    proc = start_service(["worker"], settings.model_copy(update={"log_level": "INFO"}), log)  # compose's level
    try:
        wait_for_group(settings, f"{settings.group_prefix}-worker", alive=proc)
    finally:
        assert stop_service(proc) == 0, log.read_text()

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    # librdkafka writes its own '%N|...' lines (broker addresses only); everything else must be JSON.
    # faust's own set-up added a plain-text handler on stdout next to the JSON one: each of its lines twice
    plain = [line for line in lines if not line.startswith(("{", "%"))]
    assert not plain, f"{len(plain)} lines are not JSON, e.g. {plain[0]!r}"
    entries = [orjson.loads(line) for line in lines if line.startswith("{")]
    starting = [e for e in entries if e["msg"] == "[^Worker]: Starting..."]
    assert len(starting) == 1 and starting[0]["service"] == "worker" and starting[0]["level"] == "info"


@pytest.mark.timeout(120)
def test_in_plain_text_the_worker_logs_through_wardwatchs_scrubbing_formatter_once(settings, tmp_path):
    """WARDWATCH_JSON_LOGS=false (a developer's terminal): the worker's lines go through wardwatch's
    plain formatter, which scrubs identifiers from tracebacks (wardwatch/observability.py), not faust's
    own set-up, which printed them as they were."""
    log = tmp_path / "worker.log"
    proc = start_service(["worker"], settings.model_copy(update={"log_level": "INFO", "json_logs": False}), log)
    try:
        wait_for_group(settings, f"{settings.group_prefix}-worker", alive=proc)
    finally:
        assert stop_service(proc) == 0, log.read_text()

    lines = log.read_text().splitlines()
    ours = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO worker [\w.]+: ")
    faust_own = [line for line in lines if re.match(r"^\[\d{4}-\d\d-\d\d ", line)]  # [2026-.. ..] [pid] [INFO]
    assert not faust_own, f"{len(faust_own)} lines from faust's own handler, e.g. {faust_own[0]!r}"
    starting = [line for line in lines if line.endswith("[^Worker]: Starting...")]
    assert len(starting) == 1 and ours.match(starting[0]), starting


def test_the_assignment_read_from_the_log_is_the_latest_even_when_it_is_empty(tmp_path):
    """The rebalance tests wait on the partitions a worker holds, read from aiokafka's line (JSON by
    default, plain text with WARDWATCH_JSON_LOGS=false). A worker left with no partition logs
    'set()': reading the assignment before it would let a wait pass on partitions it no longer holds."""
    def line(partitions: str) -> str:
        return orjson.dumps({"ts": "2026-11-26T12:59:38.141Z", "level": "info", "service": "worker",
                             "logger": "aiokafka.consumer.group_coordinator",
                             "msg": f"Setting newly assigned partitions {partitions} for group g-worker"}).decode()

    log = tmp_path / "worker.log"
    assert assigned_partitions(log, "t.canonical") is None  # no log yet
    log.write_text(line("{TopicPartition(topic='t.canonical', partition=2), TopicPartition(topic='t.leader', "
                        "partition=0), TopicPartition(topic='t.canonical', partition=0)}") + "\n")
    assert assigned_partitions(log, "t.canonical") == {0, 2}
    assert assigned_partitions(log, "t.leader") == {0}
    with log.open("a") as f:
        f.write(line("set()") + "\n")
    assert assigned_partitions(log, "t.canonical") == set()
    with log.open("a") as f:  # faust's own logging set-up writes plain text
        f.write("[2026-11-26 13:00:01,002] [7] [INFO] Setting newly assigned partitions "
                "{TopicPartition(topic='t.canonical', partition=1)} for group g-worker \n")
    assert assigned_partitions(log, "t.canonical") == {1}
