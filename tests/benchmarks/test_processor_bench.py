"""benchmarks/processor.py on the stored golden corpus (no clinosim cohort, no broker): it runs and
its counts agree with what the processor published. Speed is measured by the benchmark, never here."""

from __future__ import annotations

import subprocess
import sys

import orjson

from benchmarks.processor import bench_settings, measure, processor_pass, worker_batches
from streams.scoring import Scorer
from tests.streams.test_processor_golden import load_corpus


def test_counts_are_those_of_the_corpus_and_of_the_processor_outputs(tmp_path):
    settings = bench_settings(tmp_path / "models")
    messages = load_corpus()
    events = sum(len(orjson.loads(m.value)) for m in messages[:-2])  # the last two are undecodable on purpose
    figures = measure(settings, messages[:-2], batch_messages=50, repeat=1)
    assert figures["messages"] == len(messages) - 2
    assert figures["batches"] == -(-figures["messages"] // 50)
    assert figures["events"] == events

    result = processor_pass(settings, Scorer(settings.model_dir, settings), worker_batches(messages[:-2], 50))
    assert figures["points"] == len(result.outputs.scores) == len(result.outputs.features) == result.counters["scores"]
    assert figures["patients"] == len(result.records) == len({m.key for m in messages[:-2]})
    assert figures["alerts"] == len(result.outputs.alerts) > 0
    assert figures["late"] == len(result.outputs.late) == result.counters["late"]
    for name in ("worker_us_per_point", "worker_us_per_event", "worker_events_per_s", "baseline_events_per_s"):
        assert figures[name] > 0


def test_worker_batches_keep_every_message_in_arrival_order():
    messages = load_corpus()[:-2]
    assert [m for batch in worker_batches(messages, 7) for m in batch] == messages


def test_runs_as_a_module_with_help():
    result = subprocess.run([sys.executable, "-m", "benchmarks.processor", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "--patients" in result.stdout and "--repeat" in result.stdout and "--profile" in result.stdout
