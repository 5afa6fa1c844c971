"""Size and CPU cost of the patient record's table codec (PatientRecord.to_bytes / from_bytes), without Kafka.

    python -m benchmarks.record_codec [--repeat 9] [--batch-messages 1] [--patients N --seed 7]    (~10 s)

The records are the ones the worker writes to its table: the canonical messages of a replay go through
streams.patient_agent.PatientProcessor, `batch_messages` per batch (1: a backlog of interleaved
patients, about one record write per message), and every record a batch returns is kept, so the set
holds each patient's record at every size it had in the replay. By default the messages are the
stored corpus of tests/fixtures/processor (the 8-patient clinosim cohort, seed 7, with its faults, as
benchmarks/processor.py cuts it, plus three made-up patients), so no clinosim run is needed;
`--patients N` builds them from a clinosim cohort instead (benchmarks.processor.canonical_messages,
cached in data/cache).

Two codecs, measured in the same run on the same records:
- previous: the record as the release before state format 4 wrote and read it (format 3, every dedupe
  key written), kept here as it was;
- current: PatientRecord.to_bytes / from_bytes.
For each: mean and median bytes per record, and µs per record of to_bytes and from_bytes (CPU time of a
pass over every record / records, the median of `repeat` passes; the two codecs' passes alternate). A
from_bytes pass reads the bytes its own codec wrote.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from streams.patient_agent import CanonicalMessage, PatientProcessor, PatientRecord, _output_json
from streams.scoring import Scorer
from streams.state import PatientState

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "processor" / "corpus.jsonl.gz"


# --- the previous codec (state format 3), as it was --------------------------------------------------


def previous_to_bytes(rec: PatientRecord) -> bytes:
    s = rec.state
    return _output_json({"s": {"format": 3, "clock": s.clock, "known": s.known, "facts": s.facts}, "a": rec.alert,
                         "e": rec.encounter_id, "c": rec.context, "v": rec.vitals_scored_ms, "n": rec.scored_news2})


def previous_from_bytes(raw: bytes) -> PatientRecord:
    d = orjson.loads(raw)
    s = d["s"]
    state = PatientState(known=dict(zip(s["known"], map(tuple, s["known"].values()))),
                         facts={code: list(map(tuple, rows)) for code, rows in s["facts"].items()}, clock=s["clock"])
    return PatientRecord(state, d["a"], d.get("e"), d.get("c") or {}, d.get("v"), d.get("n") or {})


# --- the records ---------------------------------------------------------------------------------------


def corpus_messages() -> list[CanonicalMessage]:
    rows = [orjson.loads(line) for line in gzip.decompress(CORPUS.read_bytes()).splitlines()]
    return [CanonicalMessage(p, offset, value.encode(), None, key.encode()) for p, offset, key, value in rows]


def cohort_messages(patients: int, seed: int, cache_dir: Path, model_dir: Path) -> list[CanonicalMessage]:
    from benchmarks.processor import bench_settings, canonical_messages
    from streams.replay import generate_cohort

    cohort = generate_cohort(cache_dir.resolve(), patients=patients, seed=seed)
    return canonical_messages(cohort, bench_settings(model_dir), seed=seed, faults=True)


def written_records(messages: list[CanonicalMessage], model_dir: Path, batch_messages: int) -> list[PatientRecord]:
    """Every record the processor returns for the table, batch after batch."""
    from benchmarks.processor import bench_settings

    settings = bench_settings(model_dir)
    processor = PatientProcessor(settings, Scorer(settings.model_dir, settings))
    table: dict[str, PatientRecord] = {}
    written: list[PatientRecord] = []
    for i in range(0, len(messages), batch_messages):
        records, _ = processor.process(messages[i:i + batch_messages], table.get)
        table.update(records)
        written += records.values()
    return written


# --- measuring -----------------------------------------------------------------------------------------


def pass_us(fn: Callable, items: list) -> float:
    """µs per item of one pass of fn over every item, in CPU time."""
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e6


def measure(records: list[PatientRecord], repeat: int) -> dict[str, dict[str, float]]:
    codecs = {"previous": (previous_to_bytes, previous_from_bytes),
              "current": (PatientRecord.to_bytes, PatientRecord.from_bytes)}
    raw = {name: [to_bytes(r) for r in records] for name, (to_bytes, _) in codecs.items()}
    passes: dict[str, dict[str, list[float]]] = {name: {"to": [], "from": []} for name in codecs}
    for _ in range(repeat):  # the codecs' passes alternate, so that other processes disturb both alike
        for name, (to_bytes, from_bytes) in codecs.items():
            passes[name]["to"].append(pass_us(to_bytes, records))
            passes[name]["from"].append(pass_us(from_bytes, raw[name]))
    return {name: {"mean_bytes": statistics.mean(map(len, raw[name])),
                   "median_bytes": statistics.median(map(len, raw[name])),
                   "to_bytes_us": statistics.median(passes[name]["to"]),
                   "from_bytes_us": statistics.median(passes[name]["from"])} for name in codecs}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.record_codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="passes per measurement; the median counts")
    parser.add_argument("--batch-messages", type=int, default=1, help="canonical messages per worker batch")
    parser.add_argument("--patients", type=int, default=0, help="a clinosim cohort of N patients instead of the corpus")
    parser.add_argument("--seed", type=int, default=7, help="cohort and replay seed (with --patients)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="clinosim cohort cache")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-record-codec-") as tmp:
        model_dir = Path(tmp) / "models"
        messages = (cohort_messages(args.patients, args.seed, args.cache_dir, model_dir) if args.patients
                    else corpus_messages())
        records = written_records(messages, model_dir, args.batch_messages)
    for rec in records:  # the codec must give back what it was given
        if PatientRecord.from_bytes(rec.to_bytes()) != rec:
            raise AssertionError("a record does not survive PatientRecord's round trip")
    figures = measure(records, args.repeat)
    source = f"clinosim cohort of {args.patients} (seed {args.seed})" if args.patients else "the processor corpus"
    print(f"{len(records):,} records written ({source}, {args.batch_messages} message(s) per batch); "
          f"median of {args.repeat} passes, CPU time")
    print(f"  {'codec':<9} {'mean B':>9} {'median B':>9} {'to_bytes µs':>12} {'from_bytes µs':>14}")
    for name, f in figures.items():
        print(f"  {name:<9} {f['mean_bytes']:>9,.0f} {f['median_bytes']:>9,.0f} {f['to_bytes_us']:>12,.1f} "
              f"{f['from_bytes_us']:>14,.1f}")
    return figures


if __name__ == "__main__":
    main()
