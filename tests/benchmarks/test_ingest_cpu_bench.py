"""benchmarks/ingest_cpu.py's pure parts: the per-stage CPU accounting and the thread grouping."""

import os
import time

from benchmarks.ingest_cpu import Stages, _group


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_stage_excludes_the_stages_timed_inside_it():
    # the breakdown sums to the main thread's CPU only if nothing is counted twice (poll_once contains
    # _align, which contains _prepare)
    stages = Stages()
    inner = stages.wrap("inner", lambda: _burn(0.05))

    def outer_body():
        _burn(0.02)
        inner()

    stages.wrap("outer", outer_body)()
    assert 0.05 <= stages.seconds["inner"] < 0.07
    assert 0.02 <= stages.seconds["outer"] < 0.04  # its own 20 ms, not the inner 50 ms
    assert stages.calls == {"inner": 1, "outer": 1}


def test_threads_are_grouped_main_librdkafka_other():
    assert _group(os.getpid(), "python") == "main (python loop)"
    assert _group(os.getpid() + 1, "rdk:broker3") == "rdk:broker (fetch/produce I/O)"
    assert _group(os.getpid() + 1, "rdk:main") == "rdk:main"
    assert _group(os.getpid() + 1, "python") == "other (python)"
