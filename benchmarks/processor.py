"""CPU cost of the worker's per-batch step per scoring point, without Kafka.

    python -m benchmarks.processor [--patients 8] [--seed 7] [--repeat 5]    (~15 s, the cohort cached)

On the replay of a clinosim cohort (streams/replay.py, with its realistic faults by default; the
cohort is cached in data/cache), single-threaded, in this process:

- corpus: each raw message parsed by the ingest worker's pure path (schemas.cdc.parse_cdc or
  schemas.fhir.parse_notification, then streams.ingest.encode_events), `raw_per_poll` raw messages
  per ingest poll, grouped per patient into canonical message values (streams.ingest.batch_values),
  each on its patient's partition with that partition's next offset: what `wardwatch ingest` writes
  under a steady load of many small polls.
- worker: streams.patient_agent.PatientProcessor.process over those messages in arrival order, in
  batches of up to `batch_messages` (settings.worker_batch_size: what faust hands the agent under
  full load), with the patient table a plain dict (the worker's parsed cache), a fresh processor and
  table per pass. Scoring uses the model shipped in wardwatch/models (wardwatch.demo.seed_models).
- baseline, measured in the same run: orjson.loads of the same canonical values (the least any
  consumer of them does).

Each figure is the best of `repeat` passes (the least disturbed by other processes), in CPU time of
this process (time.process_time), as µs per scoring point, µs per canonical event and events/s.
`--profile N` runs one pass under cProfile instead; for a sampling profile without its overhead:

    .venv/bin/py-spy record -o processor.svg -- .venv/bin/python -m benchmarks.processor --repeat 20
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchmarks.codec import best_seconds
from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed, Rejected
from streams.gc_tuning import freeze_startup_heap
from streams.ingest import batch_values, encode_events
from streams.patient_agent import CanonicalMessage, Outputs, PatientProcessor, PatientRecord
from streams.replay import build_replay, generate_cohort
from streams.scoring import Scorer
from streams.topics import topics_for
from wardwatch.settings import Settings

RAW_PER_POLL = 64  # raw messages per simulated ingest poll (as benchmarks/batch.py)


# --- the corpus: canonical messages as the ingest worker writes them ----------------------------------


def canonical_messages(cohort_dir: Path, settings: Settings, *, seed: int, faults: bool,
                       raw_per_poll: int = RAW_PER_POLL) -> list[CanonicalMessage]:
    """The replay parsed and cut into canonical messages, in the order the ingest produces them."""
    replay = build_replay(cohort_dir, faults=faults, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                          late_by_s=settings.allowed_lateness_s + 3600)
    topics = topics_for(settings)
    next_offset = [0] * settings.partitions
    messages: list[CanonicalMessage] = []
    for start in range(0, len(replay.messages), raw_per_poll):
        by_patient: dict[str, list[bytes]] = defaultdict(list)
        for offset, m in enumerate(replay.messages[start:start + raw_per_poll], start):
            if m.kind == "cdc":
                outcome = parse_cdc(topics.cdc[m.table], m.key, m.value, partition=0, offset=offset,
                                    cdc_topic_prefix=settings.cdc_topic_prefix)
            else:
                outcome = parse_notification(m.value, topic=topics.fhir, partition=0, offset=offset)
            encoded = encode_events(outcome) if isinstance(outcome, Parsed) else []
            if isinstance(encoded, Rejected):
                continue
            for patient, event in encoded:
                by_patient[patient].append(event)
        for patient, events in by_patient.items():
            partition = zlib.crc32(patient.encode()) % settings.partitions  # a stable spread, like a key hash
            for value in batch_values(events, settings.canonical_max_message_bytes):
                messages.append(CanonicalMessage(partition, next_offset[partition], value, None, patient.encode()))
                next_offset[partition] += 1
    return messages


def worker_batches(messages: list[CanonicalMessage], batch_messages: int) -> list[list[CanonicalMessage]]:
    return [messages[i:i + batch_messages] for i in range(0, len(messages), batch_messages)]


# --- one pass ------------------------------------------------------------------------------------------


@dataclass
class PassResult:
    records: dict[str, PatientRecord]  # the table after the pass
    outputs: Outputs  # every output of every batch, in order
    counters: dict[str, int]


def processor_pass(settings: Settings, scorer: Scorer, batches: list[list[CanonicalMessage]]) -> PassResult:
    """Every batch through a fresh PatientProcessor and an empty table, as a fresh worker would."""
    processor = PatientProcessor(settings, scorer)
    table: dict[str, PatientRecord] = {}
    outputs = Outputs()
    for batch in batches:
        records, out = processor.process(batch, table.get)
        table.update(records)
        for name in ("late", "features", "scores", "alerts", "shadow", "rejected"):
            getattr(outputs, name).extend(getattr(out, name))
    return PassResult(table, outputs, dict(processor.counters))


def baseline_pass(messages: list[CanonicalMessage]) -> None:
    for m in messages:
        orjson.loads(m.value)


def measure(settings: Settings, messages: list[CanonicalMessage], *, batch_messages: int,
            repeat: int) -> dict[str, float]:
    scorer = Scorer(settings.model_dir, settings)
    batches = worker_batches(messages, batch_messages)
    result = processor_pass(settings, scorer, batches)  # also warms up onnxruntime and the imports
    events = sum(len(orjson.loads(m.value)) for m in messages)
    points = len(result.outputs.scores)
    worker_s = best_seconds(lambda: processor_pass(settings, scorer, batches), repeat, time.process_time)
    baseline_s = best_seconds(lambda: baseline_pass(messages), repeat, time.process_time)
    return {
        "messages": len(messages), "batches": len(batches), "events": events, "points": points,
        "patients": len(result.records), "alerts": len(result.outputs.alerts), "late": len(result.outputs.late),
        "worker_cpu_s": worker_s,
        "worker_us_per_point": worker_s / points * 1e6 if points else float("nan"),
        "worker_us_per_event": worker_s / events * 1e6,
        "worker_events_per_s": events / worker_s,
        "baseline_cpu_s": baseline_s,
        "baseline_us_per_event": baseline_s / events * 1e6,
        "baseline_events_per_s": events / baseline_s,
    }


def profile(settings: Settings, messages: list[CanonicalMessage], *, batch_messages: int, top: int) -> None:
    """One pass under cProfile, the `top` functions by their own time (what to optimise first)."""
    scorer = Scorer(settings.model_dir, settings)
    batches = worker_batches(messages, batch_messages)
    processor_pass(settings, scorer, batches)
    profiler = cProfile.Profile()
    profiler.runcall(processor_pass, settings, scorer, batches)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def bench_settings(model_dir: Path) -> Settings:
    from wardwatch.demo import seed_models

    seed_models(model_dir)
    return Settings(model_dir=model_dir)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.processor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=8, help="clinosim patients in the cohort (cached)")
    parser.add_argument("--seed", type=int, default=7, help="cohort and replay seed")
    parser.add_argument("--repeat", type=int, default=5, help="passes per measurement; the best one counts")
    parser.add_argument("--no-faults", action="store_true", help="replay without injected faults")
    parser.add_argument("--raw-per-poll", type=int, default=RAW_PER_POLL, help="raw messages per ingest poll")
    parser.add_argument("--batch-messages", type=int, default=None,
                        help="canonical messages per worker batch (default: settings.worker_batch_size)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="clinosim cohort cache")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of timing, one pass under cProfile: print the N costliest functions")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep CPython's default collector thresholds (the worker freezes its start-up heap and "
                             "collects young objects per 100,000: streams/gc_tuning.py, as this bench does otherwise)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-processor-") as tmp:
        settings = bench_settings(Path(tmp) / "models")
        batch_messages = args.batch_messages or settings.worker_batch_size
        cohort = generate_cohort(args.cache_dir.resolve(), patients=args.patients, seed=args.seed)
        messages = canonical_messages(cohort, settings, seed=args.seed, faults=not args.no_faults,
                                      raw_per_poll=args.raw_per_poll)
        if not args.default_gc:
            # as the worker does after start-up: with CPython's defaults collections are 7-13% of a pass here,
            # which the worker does not pay, and a change that allocates less would look faster than it is
            freeze_startup_heap()
        if args.profile:
            profile(settings, messages, batch_messages=batch_messages, top=args.profile)
            return {}
        f = measure(settings, messages, batch_messages=batch_messages, repeat=args.repeat)
    print(f"{args.patients} patients, seed {args.seed}, faults {'off' if args.no_faults else 'on'}: "
          f"{f['messages']:,} canonical messages ({f['events']:,} events) in {f['batches']:,} worker batches")
    print(f"{f['points']:,} scoring points, {f['alerts']:,} alerts, {f['late']:,} late; "
          f"best of {args.repeat} passes, CPU time, {'default' if args.default_gc else 'the worker’s'} GC set-up")
    print(f"  worker PatientProcessor.process  {f['worker_us_per_point']:>8,.1f} µs/point "
          f"{f['worker_us_per_event']:>7,.2f} µs/event {f['worker_events_per_s']:>10,.0f} events/s")
    print(f"  baseline orjson.loads            {'':>18} {f['baseline_us_per_event']:>7,.2f} µs/event "
          f"{f['baseline_events_per_s']:>10,.0f} events/s")
    return f


if __name__ == "__main__":
    main()
