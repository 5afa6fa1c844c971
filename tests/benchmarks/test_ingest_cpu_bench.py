"""benchmarks/ingest_cpu.py's pure parts: the per-stage CPU accounting and the thread grouping."""

import os
import sys
from types import SimpleNamespace

from benchmarks.ingest_cpu import Stages, _group, child


def test_a_stage_excludes_the_stages_timed_inside_it():
    # the breakdown sums to the main thread's CPU only if nothing is counted twice (poll_once contains
    # _align, which contains _prepare); a clock the test advances, so no timing is asserted
    now = [0.0]
    stages = Stages(clock=lambda: now[0])

    def spend(seconds: float) -> None:
        now[0] += seconds

    inner = stages.wrap("inner", lambda: spend(0.05))

    def outer_body():
        spend(0.02)
        inner()
        spend(0.01)

    stages.wrap("outer", outer_body)()
    assert stages.seconds["inner"] == 0.05
    assert round(stages.seconds["outer"], 9) == 0.03  # its own 30 ms, not the inner 50 ms
    assert stages.calls == {"inner": 1, "outer": 1}


def test_threads_are_grouped_main_librdkafka_other():
    assert _group(os.getpid(), "python") == "main (python loop)"
    assert _group(os.getpid() + 1, "rdk:broker3") == "rdk:broker (fetch/produce I/O)"
    assert _group(os.getpid() + 1, "rdk:main") == "rdk:main"
    assert _group(os.getpid() + 1, "python") == "other (python)"


class _Counted:
    """A stand-in IngestWorker that is assigned and has counted every message at once (no broker)."""

    def __init__(self, settings, topics):
        self.assigned = True
        self.counters = SimpleNamespace(sources={"raw": SimpleNamespace(messages_in=3)})
        self.stats = SimpleNamespace(maybe_publish=lambda: None)

    def poll_once(self):
        pass

    def stats_snapshot(self):
        return {"canonical_messages": 3, "batches": 1}

    def close(self):
        pass


def test_the_child_runs_the_code_of_a_tree_from_before_the_gc_set_up(monkeypatch):
    # `--tree` A/Bs against another checkout, e.g. a base from before streams/gc_tuning.py existed: its
    # child must run that tree's ingest as it ran then (CPython's collector defaults), not fail to import
    import streams.ingest

    monkeypatch.setattr(streams.ingest, "IngestWorker", _Counted)
    monkeypatch.setitem(sys.modules, "streams.gc_tuning", None)  # `import` raises ImportError, as in that tree
    result = child(3, {}, {}, profile=False, timeout_s=5.0)
    assert result["messages"] == 3 and result["canonical_messages"] == 3
