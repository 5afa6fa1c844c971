"""`wardwatch bench --batch`: the nightly rebuild + parity on a large archive, next to a plain DuckDB
scan of the same Parquet, in one run.

    clinosim cohort -> replay (no faults) -> parsed once by schemas.cdc / schemas.fhir
      -> copies with fresh patient and fact ids until `events` canonical events
      -> micro-batches per patient (as the ingest worker makes them)
      -> the online plane in-process (streams.patient_agent.PatientProcessor: state, features,
         scoring, alerts; no Kafka) -> archive rows by the archiver's own row makers -> Parquet
    then, timed:
      1. baseline  one DuckDB query that reads every canonical event of the archive (a scan, a
                   group-by patient and code: what any rebuild must at least do)
      2. nightly   batch.nightly.run_nightly(full=True): rebuild, offline features at every online
                   scoring point, parity, labels (no report, no training)

    events/s = canonical events in the archive / wall seconds of the step

The online plane runs first to produce the archive the nightly job reads in production; its time is
reported too (it is the worker's CPU cost per event without Kafka), but it is not the batch figure.
Parity at this scale is a real check: the two planes are independent implementations.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import duckdb
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.pipeline import machine_facts
from schemas.canonical import CanonicalEvent
from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed
from streams.app import RecentCache
from streams.archiver import RawRecord, rows_for, write_part
from streams.patient_agent import CanonicalMessage, PatientProcessor
from streams.replay import build_replay, generate_cohort
from streams.scoring import Scorer
from streams.topics import topics_for
from wardwatch.demo import seed_models
from wardwatch.settings import Settings

RAW_PER_POLL = 64  # raw messages per simulated ingest poll: one canonical message per patient per poll
ROWS_PER_PART = 250_000  # archive rows per Parquet file, per kind


# --- pure: the synthetic canonical stream ----------------------------------------------------------


def parsed_replay(cohort_dir: Path, settings: Settings, seed: int) -> list[list[CanonicalEvent]]:
    """The replay's raw messages parsed once, in replay order: the events of each raw message."""
    replay = build_replay(cohort_dir, faults=False, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                          late_by_s=settings.allowed_lateness_s + 3600)
    topics = topics_for(settings)
    out = []
    for offset, m in enumerate(replay.messages):
        if m.kind == "cdc":
            outcome = parse_cdc(topics.cdc[m.table], m.key, m.value, partition=0, offset=offset,
                                cdc_topic_prefix=settings.cdc_topic_prefix)
        else:
            outcome = parse_notification(m.value, topic=topics.fhir, partition=0, offset=offset)
        if isinstance(outcome, Parsed) and outcome.events:
            out.append(outcome.events)
    return out


def renamed(events: list[CanonicalEvent], copy: int) -> list[CanonicalEvent]:
    """The same clinical content for a new patient: fresh patient, encounter and fact ids."""
    suffix = f"-b{copy}"
    return [dataclasses.replace(e, patient_id=e.patient_id + suffix, fact_id=e.fact_id + suffix,
                                encounter_id=e.encounter_id + suffix if e.encounter_id else None)
            for e in events]


def canonical_polls(messages: list[list[CanonicalEvent]], n_events: int, raw_per_poll: int = RAW_PER_POLL
                    ) -> Iterator[dict[str, list[CanonicalEvent]]]:
    """Copies of the parsed replay until n_events, as ingest polls: per poll, each patient's events
    in arrival order (one canonical message each). Copies run back to back, like new admissions."""
    emitted, copy = 0, 0
    while emitted < n_events:
        for start in range(0, len(messages), raw_per_poll):
            poll: dict[str, list[CanonicalEvent]] = defaultdict(list)
            for events in messages[start:start + raw_per_poll]:
                for e in renamed(events, copy):
                    poll[e.patient_id].append(e)
                    emitted += 1
            yield poll
            if emitted >= n_events:
                return
        copy += 1


def partition_of(patient_id: str, partitions: int) -> int:
    return zlib.crc32(patient_id.encode()) % partitions  # a stable spread; nothing reads it back by key


# --- the archive, written by the online plane in-process ---------------------------------------------


class ArchiveWriter:
    """Buffers archive rows per (kind, date) and writes bounded Parquet parts, as the archiver does."""

    def __init__(self, archive_dir: Path):
        self.archive_dir = archive_dir
        self.buffer: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.rows = defaultdict(int)

    def add(self, kind: str, rec: RawRecord) -> None:
        for row in rows_for(kind, rec):
            rows = self.buffer[(row.kind, row.date)]
            rows.append(row.values)
            self.rows[row.kind] += 1
            if len(rows) >= ROWS_PER_PART:
                self._write(row.kind, row.date)

    def _write(self, kind: str, date: str) -> None:
        rows = self.buffer.pop((kind, date), [])
        if rows:
            write_part(self.archive_dir, kind, date, rows)

    def close(self) -> None:
        for kind, date in list(self.buffer):
            self._write(kind, date)


def build_archive(settings: Settings, messages: list[list[CanonicalEvent]], n_events: int,
                  progress: Progress | None = None) -> dict:
    """Run the online plane over n_events canonical events and archive everything it publishes."""
    topics = topics_for(settings)
    processor = PatientProcessor(settings, Scorer(settings.model_dir, settings))
    # copies run back to back, so a finished copy's patients never come back: keep the recent ones
    # only (as the worker's parsed cache does), or 5M events would hold every record in memory
    table = RecentCache(1000)
    writer = ArchiveWriter(settings.archive_dir)
    next_offset = [0] * settings.partitions
    output_offset: dict[str, int] = defaultdict(int)  # one offset sequence per output topic
    task = progress.add_task("online plane in-process -> archive", total=n_events) if progress else None
    started = time.perf_counter()
    events = 0
    patients: set[str] = set()
    for poll in canonical_polls(messages, n_events):
        batch = []
        for patient, patient_events in poll.items():
            partition = partition_of(patient, settings.partitions)
            value = orjson.dumps([e.to_dict() for e in patient_events])
            offset = next_offset[partition]
            next_offset[partition] += 1
            batch.append(CanonicalMessage(partition, offset, value, None, patient.encode()))
            writer.add("canonical", RawRecord(topics.canonical, partition, offset, 0, patient.encode(), value))
            events += len(patient_events)
        records, out = processor.process(batch, table.get)
        for patient, record in records.items():
            table[patient] = record
        patients.update(records)
        for kind, outputs in (("late", out.late), ("features", out.features), ("scores", out.scores),
                              ("alerts", out.alerts)):
            for key, value, headers in outputs:
                writer.add(kind, RawRecord(kind, 0, output_offset[kind], 0, key, value, tuple(headers or ())))
                output_offset[kind] += 1
        if progress is not None:
            progress.update(task, completed=events)
    writer.close()
    seconds = time.perf_counter() - started
    return {"events": events, "patients": len(patients), "online_seconds": round(seconds, 2),
            "online_events_per_s": round(events / seconds, 1) if seconds else None,
            "archive_rows": dict(writer.rows),
            "archive_mb": round(sum(f.stat().st_size for f in settings.archive_dir.rglob("*.parquet")) / 2**20, 1)}


# --- the timed steps ----------------------------------------------------------------------------------


def duckdb_scan(archive_dir: Path) -> dict:
    """The baseline: one pass over every archived canonical event, grouped as a rebuild groups them."""
    glob = str(archive_dir / "canonical" / "*" / "*.parquet")
    started = time.perf_counter()
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT patient_id, code, count(*), max(effective_ms), sum(value) "
                           f"FROM read_parquet('{glob}') GROUP BY ALL").fetchall()
        events = con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0]
    seconds = time.perf_counter() - started
    return {"scan_seconds": round(seconds, 3), "scan_events_per_s": round(events / seconds, 1),
            "scan_groups": len(rows), "scan_events": events}


def nightly(settings: Settings) -> dict:
    from batch.nightly import run_nightly

    started = time.perf_counter()
    result = run_nightly(settings, full=True, report=False)
    seconds = time.perf_counter() - started
    parity = result.get("parity", {})
    return {"nightly_seconds": round(seconds, 2), "nightly_parity_ok": bool(result.get("parity_ok")),
            "parity_points": int(parity.get("points_checked", 0)), "parity_values": int(parity.get("values_checked", 0)),
            "parity_mismatched": int(parity.get("mismatched", 0)), "nightly_timings": result.get("timings", {})}


def run_batch_bench(*, events: int = 5_000_000, patients: int = 8, seed: int = 7, data_dir: Path = Path("data/bench-batch"),
                    cache_dir: Path = Path("data/cache"), console: Console | None = None) -> dict:
    console = console or Console()
    data_dir = data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    settings = Settings(data_dir=data_dir, model_dir=data_dir / "models", topic_prefix="benchbatch",
                        cdc_topic_prefix="benchbatch.ehr.public", group_prefix="benchbatch")
    seed_models(settings.model_dir)
    with console.status(f"generating {patients} patients with clinosim (cached) and parsing their replay"):
        cohort = generate_cohort(cache_dir.resolve(), patients=patients, seed=seed)
        messages = parsed_replay(cohort, settings, seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        archive = build_archive(settings, messages, events, progress)
    console.log(f"archive: {archive['events']:,} canonical events of {archive['patients']:,} patients, "
                f"{archive['archive_mb']} MB Parquet")
    with console.status("baseline: a plain DuckDB scan of the canonical archive"):
        scan = duckdb_scan(settings.archive_dir)
    with console.status("nightly rebuild + offline features + parity (full)"):
        run = nightly(settings)
    n = archive["events"]
    result = {**archive, **scan, **run,
              "nightly_events_per_s": round(n / run["nightly_seconds"], 1) if run["nightly_seconds"] else None,
              "ratio_to_scan": round(scan["scan_seconds"] / run["nightly_seconds"], 4) if run["nightly_seconds"] else None,
              **machine_facts()}
    print_batch_table(console, result)
    return result


def print_batch_table(console: Console, r: dict) -> None:
    t = Table(title="wardwatch bench --batch")
    t.add_column("")
    t.add_column("seconds", justify="right")
    t.add_column("events/s", justify="right")
    t.add_row("plain DuckDB scan (baseline)", f"{r['scan_seconds']:,.2f}", f"{r['scan_events_per_s']:,.0f}")
    t.add_row("nightly rebuild + parity", f"{r['nightly_seconds']:,.2f}", f"{r['nightly_events_per_s']:,.0f}")
    t.add_row("online plane in-process (for reference)", f"{r['online_seconds']:,.2f}",
              f"{r['online_events_per_s']:,.0f}")
    console.print(t)
    verdict = "[green]parity OK[/]" if r["nightly_parity_ok"] else "[red]parity FAILED[/]"
    console.print(f"{verdict}: {r['parity_points']:,} scoring points, {r['parity_values']:,} values, "
                  f"{r['parity_mismatched']:,} mismatched; {r['events']:,} events, {r['patients']:,} patients")
