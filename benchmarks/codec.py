"""Per-message CPU cost of the codec, without Kafka: ingest parse + encode, worker decode.

    python -m benchmarks.codec [--patients 8] [--seed 7] [--repeat 10]    (~3 s, the cohort cached)

On the replay of a clinosim cohort (streams/replay.py, no faults; the cohort is cached in
data/cache), single-threaded, in this process:

- ingest: each raw message through the ingest worker's pure path (schemas.cdc.parse_cdc or
  schemas.fhir.parse_notification, then streams.ingest.encode_events), grouped per patient into
  canonical message values (streams.ingest.batch_values) per poll of settings.ingest_batch_size
  records, as IngestWorker.poll_once does; also for the CDC and the FHIR messages alone.
- worker: schemas.canonical.decode_batch of every canonical value, as PatientProcessor.process does.
- baselines, measured in the same run: orjson.loads + orjson.dumps of the same raw values (the least
  any relay that reads JSON does), and orjson.loads of the same canonical values.

Each figure is the best of `repeat` passes (the least disturbed by other processes), as events/s
(canonical events out of / into the stage), raw messages/s and µs per raw message. Caches the parsers
keep across messages (a CDC topic's schema, FHIR elements already validated) are warm after the first
pass, as in a running ingest.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from schemas.canonical import decode_batch
from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed, Rejected
from streams.ingest import batch_values, encode_events
from streams.replay import build_replay, generate_cohort
from streams.topics import topics_for
from wardwatch.settings import Settings


@dataclass(frozen=True)
class RawRecord:
    """What the ingest worker reads off a raw topic."""

    topic: str
    key: bytes | None
    value: bytes | None
    offset: int
    is_cdc: bool


def replay_records(cohort_dir: Path, settings: Settings, seed: int) -> list[RawRecord]:
    replay = build_replay(cohort_dir, faults=False, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                          late_by_s=settings.allowed_lateness_s + 3600)
    topics = topics_for(settings)
    return [RawRecord(topics.cdc[m.table] if m.kind == "cdc" else topics.fhir, m.key, m.value, offset,
                      m.kind == "cdc")
            for offset, m in enumerate(replay.messages)]


def ingest_pass(records: list[RawRecord], prefix: str, max_bytes: int, poll_size: int) -> list[bytes]:
    """Parse + encode every record, one poll of `poll_size` records at a time; the canonical values."""
    values: list[bytes] = []
    for start in range(0, len(records), poll_size):
        by_patient: dict[str, list[bytes]] = defaultdict(list)
        for r in records[start:start + poll_size]:
            if r.is_cdc:
                outcome = parse_cdc(r.topic, r.key, r.value, partition=0, offset=r.offset, cdc_topic_prefix=prefix)
            else:
                outcome = parse_notification(r.value, topic=r.topic, partition=0, offset=r.offset)
            encoded = encode_events(outcome) if isinstance(outcome, Parsed) else []
            if isinstance(encoded, Rejected):
                continue
            for patient, event in encoded:
                by_patient[patient].append(event)
        for events in by_patient.values():
            values += batch_values(events, max_bytes)
    return values


def worker_pass(values: list[bytes]) -> int:
    return sum(len(decode_batch(v)) for v in values)


def raw_baseline_pass(records: list[RawRecord]) -> None:
    for r in records:
        if r.value is not None:
            orjson.dumps(orjson.loads(r.value))


def canonical_baseline_pass(values: list[bytes]) -> None:
    for v in values:
        orjson.loads(v)


def best_seconds(run: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """The shortest of `repeat` runs, timed by `clock` (wall time; time.process_time for CPU time)."""
    best = float("inf")
    for _ in range(repeat):
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


STAGES = ("ingest parse+encode", "  of which CDC messages", "  of which FHIR messages",
          "raw baseline (orjson loads+dumps)", "worker decode", "canonical baseline (orjson loads)")


def measure(records: list[RawRecord], settings: Settings, repeat: int) -> dict[str, float]:
    """events/s and raw messages/s of each of STAGES, plus the corpus sizes."""
    def ingest(subset: list[RawRecord]) -> list[bytes]:
        return ingest_pass(subset, settings.cdc_topic_prefix, settings.canonical_max_message_bytes,
                           settings.ingest_batch_size)

    cdc, fhir = [r for r in records if r.is_cdc], [r for r in records if not r.is_cdc]
    values = ingest(records)
    n_events = worker_pass(values)
    stages = [  # (one pass, its raw messages, its canonical events), in the order of STAGES
        (lambda: ingest(records), records, n_events),
        (lambda: ingest(cdc), cdc, worker_pass(ingest(cdc))),
        (lambda: ingest(fhir), fhir, worker_pass(ingest(fhir))),
        (lambda: raw_baseline_pass(records), records, n_events),
        (lambda: worker_pass(values), records, n_events),
        (lambda: canonical_baseline_pass(values), records, n_events),
    ]
    figures: dict[str, float] = {"messages": len(records), "events": n_events, "canonical_values": len(values)}
    for name, (run, messages, events) in zip(STAGES, stages, strict=True):
        seconds = best_seconds(run, repeat)
        figures[f"{name} events/s"] = events / seconds
        figures[f"{name} messages/s"] = len(messages) / seconds
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=8, help="clinosim patients in the cohort (cached)")
    parser.add_argument("--seed", type=int, default=7, help="cohort and replay seed")
    parser.add_argument("--repeat", type=int, default=10, help="passes per stage; the best counts")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="clinosim cohort cache")
    args = parser.parse_args(argv)
    if args.patients < 1 or args.repeat < 1:
        parser.error("--patients and --repeat must be at least 1")

    settings = Settings()
    cohort = generate_cohort(args.cache_dir.resolve(), patients=args.patients, seed=args.seed)
    figures = measure(replay_records(cohort, settings, args.seed), settings, args.repeat)
    print(f"{figures['messages']} raw messages -> {figures['events']} canonical events "
          f"in {figures['canonical_values']} canonical messages (best of {args.repeat})")
    for stage in STAGES:
        print(f"  {stage:<36} {figures[f'{stage} events/s']:>12,.0f} events/s "
              f"{figures[f'{stage} messages/s']:>12,.0f} raw messages/s "
              f"{1e6 / figures[f'{stage} messages/s']:>8.1f} µs/raw message")
    return figures


if __name__ == "__main__":
    main()
