"""The nightly: rebuild every table from the archive into a new DuckDB file, run parity, swap it in.

    run_nightly(settings) -> summary dict

Steps (each timed, each announced to `progress(step)`):
    read        archive Parquet -> deduplicated frames (batch/rebuild.py)
    classify    batch.features.classify_events over canonical events in arrival order
    offline     batch.features.features_at at every online scoring point
    parity      batch/parity.py: online vs offline features, published vs recomputed late events
    write       a new DuckDB file next to settings.duckdb_path, then os.replace over the old one

Readers of the old file keep a consistent view until they reopen; a crash mid-build leaves the old
file untouched. Every table except `runs` is a pure function of the archive (same archive, same
tables); `runs` is carried over from the previous file and gains one row per run.

`full=False` rebuilds every table but recomputes offline features (and checks parity) only for the
scoring points of the last two scoring days: the cheap nightly check. `full=True` covers all points.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb
import orjson
import polars as pl

from batch import rebuild
from batch.parity import PARITY_ROW_SCHEMA, parity_ok, parity_report
from schemas.features import FEATURE_NAMES
from streams.archiver import ARCHIVE_SCHEMAS, part_files
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

FeaturesAt = Callable[..., pl.DataFrame]
ClassifyEvents = Callable[..., pl.DataFrame]
DAY_MS = 24 * 3600 * 1000


def _default_recompute() -> tuple[FeaturesAt, ClassifyEvents]:
    from batch.features import classify_events, features_at

    return features_at, classify_events


def recent_points(points: pl.DataFrame, days: int = 2) -> pl.DataFrame:
    """Scoring points on the last `days` UTC days that have any point."""
    if points.is_empty():
        return points
    last_day_start = points["scoring_ms"].max() // DAY_MS * DAY_MS
    return points.filter(pl.col("scoring_ms") >= last_day_start - (days - 1) * DAY_MS)


def _no_null_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Give all-null untyped columns a type DuckDB can store (features are numbers, the rest text)."""
    return frame.with_columns([pl.col(c).cast(pl.Float64 if c in FEATURE_NAMES else pl.String)
                               for c, t in frame.schema.items() if t == pl.Null])


def _write_table(con: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> None:
    arrow = _no_null_columns(frame).to_arrow()
    con.register("_incoming", arrow)
    try:
        con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _incoming')
    finally:
        con.unregister("_incoming")


def previous_runs(duckdb_path: Path) -> pl.DataFrame | None:
    if not duckdb_path.exists():
        return None
    with duckdb.connect(str(duckdb_path), read_only=True) as con:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "runs" not in tables:
            return None
        old = pl.from_arrow(con.sql("SELECT * FROM runs ORDER BY started_at, run_id").to_arrow_table())
    # DuckDB hands TIMESTAMPTZ back in its session zone; compare and append in UTC
    return old.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC"))


def build_tables(archive_dir: Path, *, allowed_lateness_ms: int, cross_source_tolerance: float, full: bool,
                 features_at: FeaturesAt, classify_events: ClassifyEvents,
                 step: Callable[[str], None]) -> tuple[dict[str, pl.DataFrame], dict]:
    """Every table except `runs`, plus the parity summary. Pure given the archive."""
    step("read")
    raw = {kind: rebuild.read_archive(archive_dir, kind) for kind in ARCHIVE_SCHEMAS}
    events = rebuild.canonical_events(raw["canonical"])
    online = rebuild.features_online(raw["features"])
    late_published = rebuild.late_events(raw["late"])

    step("classify")
    classified = classify_events(events, allowed_lateness_ms=allowed_lateness_ms,
                                 cross_source_tolerance=cross_source_tolerance).sort(*rebuild.ARRIVAL)
    versions = rebuild.observation_versions(classified)

    step("offline")
    points = rebuild.scoring_points(online)
    if not full:
        points = recent_points(points)
    offline = features_at(events, points, allowed_lateness_ms=allowed_lateness_ms,
                          cross_source_tolerance=cross_source_tolerance)
    offline = offline.sort("partition", "offset", "patient_id", "scoring_ms")

    step("parity")
    checked_online = online.join(points, on=list(rebuild.POINT_KEYS), how="semi")
    rows, summary = parity_report(checked_online, offline, late_published=late_published,
                                  late_recomputed=rebuild.late_recomputed(classified))

    tables = {
        "canonical_events": classified,
        "observation_versions": versions,
        "observations": rebuild.observations(versions),
        "late_events": late_published,
        "dead_letters": rebuild.dead_letters(raw["deadletter"]),
        "unreadable_records": rebuild.unreadable(raw["unreadable"]),
        "features_online": online,
        "features_offline": offline,
        "scores": rebuild.scores(raw["scores"]),
        "alerts": rebuild.alerts(raw["alerts"]),
        # mismatches only: empty when the planes agree, and small when they nearly do
        "parity_report": rows.filter(~pl.col("match")).cast(PARITY_ROW_SCHEMA),
    }
    return tables, summary


def _run_row(run_id: str, started: datetime, finished: datetime, full: bool, archive_files: int,
             counts: dict[str, int], timings: dict[str, float], summary: dict, ok: bool) -> pl.DataFrame:
    return pl.DataFrame([{
        "run_id": run_id, "started_at": started, "finished_at": finished, "full": full,
        "archive_files": archive_files,
        "counts_json": orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode(),
        "timings_json": orjson.dumps(timings, option=orjson.OPT_SORT_KEYS).decode(),
        "points_checked": summary["points_checked"], "values_checked": summary["values_checked"],
        "mismatched": summary["mismatched"], "match_rate": float(summary["match_rate"]),
        "max_abs_diff": float(summary["max_abs_diff"]),
        "late_published": summary["late_published"], "late_recomputed": summary["late_recomputed"],
        "late_mismatched": summary["late_mismatched"], "parity_ok": ok,
        "parity_json": orjson.dumps(summary, option=orjson.OPT_SORT_KEYS).decode(),
    }], schema_overrides={"started_at": pl.Datetime("us", "UTC"), "finished_at": pl.Datetime("us", "UTC")})


def run_nightly(settings: Settings, *, full: bool = True, progress: Callable[[str], None] | None = None,
                features_at: FeaturesAt | None = None, classify_events: ClassifyEvents | None = None) -> dict:
    """Rebuild the DuckDB file from the archive and swap it in; returns counts, parity and the path.

    `features_at` / `classify_events` default to batch.features (parameters so tests can stand in).
    """
    if features_at is None or classify_events is None:
        default_features_at, default_classify = _default_recompute()
        features_at = features_at or default_features_at
        classify_events = classify_events or default_classify

    run_id = uuid.uuid4().hex
    started = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    clock = {"step": None, "t": time.perf_counter()}

    def step(name: str | None) -> None:
        now = time.perf_counter()
        if clock["step"] is not None:
            timings[clock["step"]] = round(now - clock["t"], 3)
        clock["step"], clock["t"] = name, now
        if name is not None and progress is not None:
            progress(name)

    archive_dir, target = settings.archive_dir, settings.duckdb_path
    tables, summary = build_tables(
        archive_dir, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
        cross_source_tolerance=settings.cross_source_tolerance, full=full,
        features_at=features_at, classify_events=classify_events, step=step)
    ok = parity_ok(summary)
    counts = {name: frame.height for name, frame in tables.items()}
    archive_files = sum(len(part_files(archive_dir, kind)) for kind in ARCHIVE_SCHEMAS)

    step("write")
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.with_name(f".{target.name}.{run_id}.building")
    try:
        with duckdb.connect(str(building)) as con:
            for name, frame in tables.items():
                _write_table(con, name, frame)
            step(None)
            run = _run_row(run_id, started, datetime.now(timezone.utc), full, archive_files, counts, timings,
                           summary, ok)
            old = previous_runs(target)
            runs = run if old is None else pl.concat([old, run], how="diagonal_relaxed")
            _write_table(con, "runs", runs)
            con.execute("CHECKPOINT")
        os.replace(building, target)
    finally:
        for leftover in (building, building.with_name(building.name + ".wal")):
            leftover.unlink(missing_ok=True)

    log.info("nightly run %s: %d tables, parity ok=%s, mismatched=%d", run_id, len(tables) + 1, ok,
             summary["mismatched"])
    return {"run_id": run_id, "duckdb_path": str(target), "counts": counts | {"runs": runs.height},
            "parity": summary, "parity_ok": ok, "timings": timings}
