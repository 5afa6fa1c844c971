"""What a platform engineer sees when a long command is stopped (SIGTERM from `timeout`, a cancelled CI job,
`kill`): the embedded broker and child services it started are stopped too, and the exit code is not 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the command's long run is replaced by "start the embedded broker, say its pid, wait": what every long
# command (demo, batch dataset, bench, soak) does first
SCRIPT = textwrap.dedent("""
    import sys, time
    import {module} as target
    from wardwatch.broker import EmbeddedBroker
    from wardwatch.cli import app

    def long_run(*args, **kwargs):
        with EmbeddedBroker.start() as broker:
            print(broker.pid, flush=True)
            time.sleep(120)

    target.{function} = long_run
    app(sys.argv[1:])
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for the user; ps says Z
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module, function, args", [
    ("wardwatch.demo", "run_demo", ["demo", "--data-dir", "{tmp}/run"]),
    ("batch.dataset", "build_dataset", ["batch", "dataset", "--out", "{tmp}/run"]),
    ("benchmarks.pipeline", "run_bench", ["bench"]),
    ("wardwatch.soak", "run_soak", ["soak", "--data-dir", "{tmp}/run"]),
])
def test_sigterm_stops_the_embedded_broker_the_command_started(module, function, args, tmp_path, clean_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDWATCH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(module=module, function=function),
                             *(a.format(tmp=tmp_path) for a in args)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.poll() is not None else line
        broker_pid = int(line)
        assert _alive(broker_pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 5
    while _alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(broker_pid)
    if left:  # do not leave it to the next tests
        os.killpg(broker_pid, signal.SIGKILL)
    assert not left, "the embedded broker outlived the command"
    assert code != 0
