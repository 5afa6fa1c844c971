"""The worker's log as a container log shipper reads it: JSON lines only, each once."""

from __future__ import annotations

import orjson
import pytest

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
