"""wardwatch/listen.py: services bind port 0 themselves and say which port they got; the parent reads it back."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson
import pytest

from wardwatch import observability
from wardwatch.listen import listening_port, log_listening, wait_for_listening


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _line(json_logs: bool, host: str, port: int) -> str:
    """The line the services log (wardwatch.listen.log_listening), as either log format writes it."""
    log, captured = logging.getLogger("test_listen.receiver"), _Records()
    log.addHandler(captured)
    try:
        log_listening(log, "rest-hook receiver", host, port, "/fhir/notifications -> t.fhir")
    finally:
        log.removeHandler(captured)
    (record,) = captured.records
    formatter = (observability.JsonFormatter("receiver") if json_logs else
                 logging.Formatter("%(asctime)s %(levelname)s receiver %(name)s: %(message)s"))
    return formatter.format(record)


@pytest.mark.parametrize("json_logs", [True, False])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_port_is_read_from_the_listening_line_in_either_log_format(json_logs, host):
    line = _line(json_logs, host, 43817)
    if json_logs:
        assert orjson.loads(line)["msg"].startswith("rest-hook receiver listening on")
    assert listening_port(f"librdkafka noise 127.0.0.1:9092\n{line}\n") == 43817
    assert listening_port("metrics and health endpoints listening\n127.0.0.1:9092") is None


def test_the_port_of_this_run_is_read_not_an_earlier_run_in_the_same_log(tmp_path):
    log = tmp_path / "cds.log"
    log.write_text(_line(True, "127.0.0.1", 40001) + "\n")  # the previous run, on another port
    offset = log.stat().st_size
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(TimeoutError):
            wait_for_listening(proc, log, offset=offset, timeout_s=0.3)
        with log.open("a") as f:
            f.write(_line(True, "127.0.0.1", 40002) + "\n")
        assert wait_for_listening(proc, log, offset=offset, timeout_s=5) == 40002
    finally:
        proc.kill()
        proc.wait()


def test_a_service_that_exits_before_listening_is_reported_at_once(tmp_path):
    log = tmp_path / "receiver.log"
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with code 3 before listening"):
        wait_for_listening(proc, log, timeout_s=30)
