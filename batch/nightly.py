"""The nightly: rebuild every table from the archive into a new DuckDB file, run parity, swap it in.

    run_nightly(settings, full=...) -> summary dict

Steps (each timed, each announced to `progress(step)`):
    read        archive part files -> deduplicated frames (batch/rebuild.py)
    classify    batch.features.classify_events over canonical events in arrival order
    offline     batch.features.scoring_points derives the scoring points (schemas/cadence.py) of the
                recomputed patients; batch.features.features_at at every new online scoring point, at
                the arrival position (partition, offset, idx) the rule derives for its snapshot_id,
                never the position the stream claims (a snapshot the rule does not derive: its own)
    labels      batch.train.make_labels: the first-onset label (label, at_risk, onset_ms), the state
                at T from batch.train.STATE_FEATURES as of `issued`, outcomes strictly after T
    parity      batch/parity.py: online vs offline features, published vs recomputed late events,
                online vs derived scoring points (of the recomputed patients)
    write       a new DuckDB file next to settings.duckdb_path (tables, comments, views), then
                os.replace over the old one (removing the old one's stale WAL first); then the HTML
                report (batch/report.py)

Readers of the old file keep a consistent view until they reopen; a crash mid-build leaves the old
file untouched. One writer at a time per file (a lock next to it, writer_lock): a second run started
meanwhile (the scheduler's and one by hand) stops with NightlyBusy, a run started while `batch train`
records its decision (batch/retrain.py) waits for it, and the writer holding the lock removes the build
and record copies a killed writer left behind. `runs` is carried over from the previous file and
gains one row per run; every other table is a pure function of the archive.

Incremental (`full=False`, the CLI default): the `archive_parts` table lists the part files the
file was built from; a run reads only the other ones and takes everything else from the previous
file (a previous file missing a column this version writes is rebuilt in full). The unit of
recomputation is the patient: a patient with an event in a new part (or a new scoring point, or a
point parity left pending) has their events reclassified and their labels recomputed from their
whole history (an event's outcome depends on every earlier event of the patient, the dedupe horizon's
expiry included, and a label looks 12 h ahead, so an old point's label can change); offline features and parity are computed for new scoring points and for
points at or after a newly archived event of the patient (the archiver can land a features part
before the canonical part that point saw). A snapshot a new part archives again (a restart re-emits
snapshots; the archiver may land the re-emitted copy first) is taken from every copy in the archive, old
parts included, so the copy kept is the first in Kafka order (its point checked again when that is
another copy), as in a full build. Everyone else's rows are copied. Same archive, same tables as `full=True`: tests/batch/test_nightly.py checks it. A part
file deleted from the archive stays in an incremental build until the next full one.

A part file that cannot be read (truncated, not Parquet, a disk error) stops the run with UnreadableParts,
which names every such file by its path in the archive, before anything is written. With
`quarantine=True` they are moved to <archive>/quarantine/<same path> instead (only files not Parquet on a
second read: an OSError or a passing failure stops the run, moving nothing; kept, never deleted; no
longer a part file, so no later run reads them) and the run goes on without their rows; the run's
`quarantined_parts` counts them, `quarantine_files` every file held there (a full build lacks their rows).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb
import orjson
import polars as pl

from batch import rebuild
from batch.catalog import apply_comments, create_views
from batch.parity import PARITY_ROW_SCHEMA, last_online_offsets, parity_ok, parity_report
from schemas.features import FEATURE_NAMES
from streams.archiver import ARCHIVE_SCHEMAS, part_files
from wardwatch.settings import Settings

log = logging.getLogger(__name__)


class NightlyBusy(RuntimeError):
    """Another writer (a nightly run, a `batch train` recording its decision) holds the DuckDB file's lock."""


class UnreadableParts(RuntimeError):
    """Archive part files the nightly cannot read: {path relative to the archive: the reader's error}."""

    def __init__(self, parts: dict[str, str]):
        self.parts = parts
        listing = "; ".join(f"{path} ({why})" for path, why in sorted(parts.items()))
        super().__init__(
            f"{len(parts)} archive part file(s) cannot be read: {listing}. Nothing was written (the previous "
            f"tables stay). Put back a readable copy if you have one (a backup), or set the file(s) aside with "
            f"`wardwatch batch nightly --quarantine-unreadable`: it moves them to {QUARANTINE}/ in the archive "
            f"(kept, never deleted) and builds without their rows")


QUARANTINE = "quarantine"  # <archive>/quarantine/<kind>/date=.../part-*.parquet: set aside, never read

FeaturesAt = Callable[..., pl.DataFrame]
ClassifyEvents = Callable[..., pl.DataFrame]
MakeLabels = Callable[..., pl.DataFrame]

POINT_KEYS = list(rebuild.POINT_KEYS)
POINT = list(rebuild.POINT)  # a point's row: its snapshot_id (the identity) and where it was taken
LABELS_SCHEMA = {"snapshot_id": pl.String, "patient_id": pl.String, "scoring_ms": pl.Int64, "partition": pl.Int64,
                 "offset": pl.Int64, "idx": pl.Int64,
                 "news2": rebuild.FEATURE_DTYPES["news2"], "label": pl.Int8, "at_risk": pl.Boolean, "onset_ms": pl.Int64,
                 "label_news2_high": pl.Boolean, "label_low_sbp": pl.Boolean, "label_high_lactate": pl.Boolean}
# rows of features_offline and labels: arrival order, then the point (two points can share a message and time)
_POINT_ORDER = ["partition", "offset", "idx", "patient_id", "scoring_ms", "snapshot_id"]
PARITY_ORDER = ["check", "partition", "offset", "patient_id", "scoring_ms", "feature", "event_id"]
_PENDING = (pl.col("check") == "point") & pl.col("detail").str.starts_with("pending")

# table -> (archive kind, clean-up function); incremental runs append new parts to the previous table
_ARCHIVE_TABLES = {
    "late_events": ("late", rebuild.late_events),
    "dead_letters": ("deadletter", rebuild.dead_letters),
    "unreadable_records": ("unreadable", rebuild.unreadable),
    "scores": ("scores", rebuild.scores),
    "scores_shadow": ("scores_shadow", rebuild.scores_shadow),
    "alerts": ("alerts", rebuild.alerts),
    "gaps": ("gaps", rebuild.gaps),
}


def _default_recompute() -> tuple[FeaturesAt, ClassifyEvents]:
    from batch.features import classify_events, features_at

    return features_at, classify_events


def _default_scoring_points() -> Callable[..., pl.DataFrame]:
    from batch.features import scoring_points

    return scoring_points


def default_labels(events: pl.DataFrame, points: pl.DataFrame, *, allowed_lateness_ms: int,
                   cross_source_tolerance: float,
                   dedupe_horizon_ms: int = Settings.model_fields["dedupe_horizon_s"].default * 1000) -> pl.DataFrame:
    """Training labels at `points`: the state at T as of issue time, outcomes in hindsight (batch/train.py)."""
    from batch.features import features_as_of_issued
    from batch.train import STATE_FEATURES, make_labels

    if points.is_empty():
        return pl.DataFrame(schema=LABELS_SCHEMA)
    rules = {"allowed_lateness_ms": allowed_lateness_ms, "cross_source_tolerance": cross_source_tolerance,
             "dedupe_horizon_ms": dedupe_horizon_ms}
    # every state feature make_labels needs, so it does not compute the features a second time; as of
    # what was issued by the point's idx in its message, as the stream's point saw it and training takes
    # it (batch/retrain.py): events later in the message are not the point's to know
    state = features_as_of_issued(events, points.select(POINT), **rules).select(*STATE_FEATURES)
    return make_labels(events, points.select(POINT).hstack(state), **rules)


def _storable(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Feature columns typed by their specs (rebuild.with_feature_types: the same SQL type in every table),
    other all-null untyped columns as text: types DuckDB can store."""
    frame = rebuild.with_feature_types(frame, table)
    return frame.with_columns([pl.col(c).cast(pl.String) for c, t in frame.schema.items() if t == pl.Null])


def _write_table(con: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> None:
    arrow = _storable(frame, name).to_arrow()
    con.register("_incoming", arrow)
    try:
        con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _incoming')
    finally:
        con.unregister("_incoming")


def _read_tables(duckdb_path: Path, names: list[str] | None = None) -> dict[str, pl.DataFrame]:
    """Tables of an existing DuckDB file as frames (TIMESTAMPTZ handed back in UTC)."""
    if not duckdb_path.exists():
        return {}
    with duckdb.connect(str(duckdb_path), read_only=True) as con:
        present = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()]
        wanted = [t for t in present if names is None or t in names]
        out = {t: pl.from_arrow(con.sql(f'SELECT * FROM "{t}"').to_arrow_table()) for t in wanted}
    return {t: f.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC")) for t, f in out.items()}


def previous_runs(duckdb_path: Path) -> pl.DataFrame | None:
    runs = _read_tables(duckdb_path, ["runs"]).get("runs")
    return None if runs is None else runs.sort("started_at", "run_id")


# --- archive parts -------------------------------------------------------------------------------


def archive_parts(archive_dir: Path) -> pl.DataFrame:
    """Every finished part file: kind, path relative to the archive, size."""
    rows = [{"kind": kind, "path": str(f.relative_to(archive_dir)), "bytes": f.stat().st_size}
            for kind in ARCHIVE_SCHEMAS for f in part_files(archive_dir, kind)]
    return pl.DataFrame(rows, schema={"kind": pl.String, "path": pl.String, "bytes": pl.Int64}).sort("kind", "path")


def read_parts(archive_dir: Path, kind: str, paths: list[str], unreadable: dict[str, str] | None = None,
               where: pl.Expr | None = None) -> pl.DataFrame:
    """The part files `paths` as one frame (rows matching `where`). A file that cannot be read raises
    UnreadableParts, or, given `unreadable`, is skipped and recorded there (path -> the reader's error)."""
    frames = []
    for p in paths:
        try:
            frames.append(pl.read_parquet(archive_dir / p, hive_partitioning=False) if where is None else
                          pl.scan_parquet(archive_dir / p, hive_partitioning=False).filter(where).collect())
        except (pl.exceptions.PolarsError, OSError) as exc:
            why = _why(exc)
            if unreadable is None:
                raise UnreadableParts({p: why}) from exc
            unreadable[p] = why
    return pl.concat([rebuild.empty_archive_frame(kind), *frames], how="diagonal_relaxed")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def _read_error(file: Path) -> Exception | None:
    """None when `file` reads as Parquet now, else the reader's error."""
    try:
        pl.read_parquet(file, hive_partitioning=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        return exc
    return None


def quarantined_files(archive_dir: Path) -> list[str]:
    """Files set aside in <archive>/quarantine/, relative to it."""
    folder = archive_dir / QUARANTINE
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []


def _set_aside(archive_dir: Path, unreadable: dict[str, str], quarantine: bool) -> None:
    """Stop on unreadable part files, or (`quarantine`) move each to <archive>/quarantine/<its path>
    (a name already there gets a number: nothing is overwritten)."""
    if not unreadable:
        return
    if not quarantine:
        raise UnreadableParts(unreadable)
    # only a file whose bytes are not Parquet, twice, is moved: an OS error (permissions, EIO on a network
    # volume, too many open files) or a failure the second read does not repeat says nothing of the file,
    # and moving a readable part would drop its rows from every later table. Then nothing is moved.
    kept = {}
    for path, why in sorted(unreadable.items()):
        again = _read_error(archive_dir / path)
        if again is None:
            kept[path] = f"{why}; read on a second attempt: not moved, rerun the night"
        elif isinstance(again, OSError):
            kept[path] = f"{_why(again)}; an error of the system, not of the file: not moved, fix it and rerun"
    if kept:
        raise UnreadableParts(kept)
    for path, why in sorted(unreadable.items()):
        source, dest = archive_dir / path, archive_dir / QUARANTINE / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{Path(path).stem}.{n}{Path(path).suffix}")
        os.replace(source, dest)
        log.warning("archive part %s cannot be read (%s): moved to %s", path, why,
                    dest.relative_to(archive_dir))


def _previous_state(target: Path, full: bool) -> dict[str, pl.DataFrame]:
    """The previous file's tables when an incremental run can build on them, else {}."""
    if full:
        return {}
    previous = _read_tables(target)
    needed = {"archive_parts", "canonical_events", "features_online", "features_offline", "labels",
              "parity_report", *_ARCHIVE_TABLES}
    if not needed <= set(previous):
        return {}  # first run, or a file from before incremental runs existed: build everything
    if any(not set(columns) <= set(previous[name].columns) for name, columns in _current_columns().items()):
        return {}  # a file from before a column was added: its rows lack it, so build everything
    return previous


def _current_columns() -> dict[str, list[str]]:
    """Columns this version writes into the tables an incremental run builds on."""
    columns = {name: [("resource" if c == "resource_json" else c) for c in ARCHIVE_SCHEMAS[kind].names]
               for name, (kind, _) in _ARCHIVE_TABLES.items()}
    # every feature is a column of both feature tables: a feature appended to schemas/features.py is
    # a new column, which an incremental run would not add to the previous file's features_offline
    return columns | {"canonical_events": [*ARCHIVE_SCHEMAS["canonical"].names, "supersedes"],
                      "features_online": ["snapshot_id", *POINT_KEYS, "idx", "trigger", *FEATURE_NAMES],
                      "features_offline": [*POINT, *FEATURE_NAMES],
                      "labels": list(LABELS_SCHEMA)}


def _as_raw(kind: str, table: pl.DataFrame) -> pl.DataFrame:
    """A previous table back in its archive shape, so it merges with new rows by the same rule."""
    if kind == "alerts":
        table = table.rename({"resource": "resource_json"})
    return table.select(list(ARCHIVE_SCHEMAS[kind].names)).cast(
        dict(rebuild.empty_archive_frame(kind).schema))


def _merged(kind: str, previous: pl.DataFrame | None, new_raw: pl.DataFrame) -> pl.DataFrame:
    if previous is None:
        return new_raw
    return pl.concat([_as_raw(kind, previous), new_raw], how="diagonal_relaxed")


def _patients(frame: pl.DataFrame) -> pl.Series:
    return frame["patient_id"].unique()


# --- the build -----------------------------------------------------------------------------------


def build_tables(archive_dir: Path, *, allowed_lateness_ms: int, cross_source_tolerance: float,
                 dedupe_horizon_ms: int,
                 features_at: FeaturesAt, classify_events: ClassifyEvents, make_labels: MakeLabels,
                 step: Callable[[str], None], previous: dict[str, pl.DataFrame] | None = None,
                 scoring_points: Callable[..., pl.DataFrame] | None = None, min_interval_ms: int = 0,
                 quarantine: bool = False) -> tuple[dict[str, pl.DataFrame], dict, dict]:
    """Every table except `runs`, the parity summary of this run, and run facts. Pure given the
    archive and the previous tables (`previous` empty or None: a full build), except that with
    `quarantine` unreadable part files are moved aside (else they raise UnreadableParts). Without
    `scoring_points` the online points are taken as given (no point check; features at each
    snapshot's idx, or after its whole message when the snapshot has none)."""
    previous = previous or {}
    rules = {"allowed_lateness_ms": allowed_lateness_ms, "cross_source_tolerance": cross_source_tolerance,
             "dedupe_horizon_ms": dedupe_horizon_ms}

    step("read")
    parts = archive_parts(archive_dir)
    done = set(previous["archive_parts"]["path"].to_list()) if previous else set()
    new_parts = parts.filter(~pl.col("path").is_in(sorted(done)))
    unreadable: dict[str, str] = {}
    new_raw = {kind: read_parts(archive_dir, kind, new_parts.filter(pl.col("kind") == kind)["path"].to_list(),
                                unreadable)
               for kind in ARCHIVE_SCHEMAS}
    _set_aside(archive_dir, unreadable, quarantine)

    prev_events = previous.get("canonical_events")
    raw_events = (new_raw["canonical"] if prev_events is None else pl.concat(
        [_as_raw("canonical", prev_events.drop("outcome", "late_by_ms")), new_raw["canonical"]],
        how="diagonal_relaxed"))
    events = rebuild.canonical_events(raw_events)
    prev_online = previous.get("features_online")
    # snapshots a new part repeats, or at their points: every archived copy of them, old parts too, so
    # the copy kept (the first in Kafka order) and the copies check are the full build's
    again = _snapshots_again(prev_online, new_raw["features"])
    old_unreadable: dict[str, str] = {}  # an old part damaged since an earlier run read it (a disk error)
    features_raw = pl.concat([new_raw["features"], _old_copies(archive_dir, parts, done, again, old_unreadable)],
                             how="diagonal_relaxed")
    _set_aside(archive_dir, old_unreadable, quarantine)
    unreadable |= old_unreadable
    parts = parts.filter(~pl.col("path").is_in(sorted(unreadable)))
    new_parts = new_parts.filter(~pl.col("path").is_in(sorted(unreadable)))
    new_online = rebuild.features_online(features_raw)
    copies = _repeated_snapshots(features_raw)
    online = (new_online if prev_online is None else
              pl.concat([prev_online.filter(~pl.col("snapshot_id").is_in(again.implode())), new_online],
                        how="diagonal_relaxed")
              .unique(subset=["snapshot_id"], keep="first")
              .sort("partition", "offset", "patient_id", "scoring_ms", "snapshot_id"))
    points = rebuild.scoring_points(online)
    prev_offline = previous.get("features_offline")
    # a snapshot whose kept copy is now another (an earlier one in Kafka order) is checked again
    def kept(frame: pl.DataFrame) -> pl.DataFrame:  # (values as decoded, whatever type they were stored in)
        return frame.filter(pl.col("snapshot_id").is_in(again.implode())).select(
            *[pl.col(c).cast(pl.Float64) if c in FEATURE_NAMES else pl.col(c) for c in new_online.columns])
    kept_another = (None if prev_online is None else
                    kept(new_online).join(kept(prev_online), on=new_online.columns, how="anti",
                                          nulls_equal=True)["snapshot_id"])
    new_points = points if prev_offline is None else pl.concat([
        _points_to_redo(points, prev_offline, new_raw["canonical"]),
        points.filter(pl.col("snapshot_id").is_in(kept_another.implode()))]).unique().sort(*_POINT_ORDER,
                                                                                          nulls_last=True)
    # the patients whose state this run recomputes: new events or new scoring points, or a point
    # still pending (the stream's snapshot may have been archived since, or will never be)
    recompute = (events["patient_id"].unique() if not previous else
                 pl.concat([_patients(new_raw["canonical"]), _patients(new_points),
                            _patients(previous["parity_report"].filter(_PENDING))]).unique())
    their_events = events.filter(pl.col("patient_id").is_in(recompute.implode()))

    step("classify")
    classified = _with_outcomes(their_events, classify_events(their_events, **rules))
    if prev_events is not None:
        kept = prev_events.filter(~pl.col("patient_id").is_in(recompute.implode()))
        classified = pl.concat([kept, classified.select(kept.columns)], how="vertical_relaxed")
    classified = classified.sort(*rebuild.ARRIVAL)
    versions = rebuild.observation_versions(classified)

    step("offline")
    checked_online = online.join(new_points, on="snapshot_id", how="semi")
    feature_points = checked_online.select(*POINT)
    derived = None
    if scoring_points is not None:
        derived = scoring_points(their_events, **rules, min_interval_ms=min_interval_ms)
        feature_points = _at_derived_positions(feature_points, derived)
    offline_new = features_at(their_events, feature_points, **rules)
    if derived is not None:  # stored and compared under the point the stream published
        offline_new = offline_new.with_columns(partition=pl.col("_online_partition").cast(pl.Int64),
                                               offset=pl.col("_online_offset").cast(pl.Int64),
                                               idx=pl.col("_online_idx").cast(pl.Int64)).drop(
            "_online_partition", "_online_offset", "_online_idx")
    stored_new = offline_new.select(*POINT, *FEATURE_NAMES)
    offline = stored_new if prev_offline is None else pl.concat(
        [prev_offline.join(new_points, on="snapshot_id", how="anti"), stored_new.select(prev_offline.columns)],
        how="vertical_relaxed")
    offline = offline.sort(*_POINT_ORDER, nulls_last=True)

    step("labels")
    their_points = points.filter(pl.col("patient_id").is_in(recompute.implode()))
    labels = _labels(make_labels(their_events, their_points, **rules))
    if "labels" in previous:
        kept = previous["labels"].filter(~pl.col("patient_id").is_in(recompute.implode()))
        labels = pl.concat([kept.cast(LABELS_SCHEMA), labels], how="vertical_relaxed")
    labels = labels.sort(*_POINT_ORDER, nulls_last=True)

    step("parity")
    late_published = rebuild.late_events(_merged("late", previous.get("late_events"), new_raw["late"]))
    their_online = None if derived is None else online.filter(pl.col("patient_id").is_in(recompute.implode()))
    rows, summary = parity_report(checked_online, offline_new, late_published=late_published,
                                  late_recomputed=rebuild.late_recomputed(classified),
                                  online_points=their_online, offline_points=derived, online_copies=copies,
                                  reached=last_online_offsets(online))
    # the disagreements, and the pending points: the next run checks those again
    mismatches = rows.filter(~pl.col("match") | _PENDING).cast(PARITY_ROW_SCHEMA)
    if "parity_report" in previous:  # other points keep their verdict; late checks are redone in full
        earlier = (previous["parity_report"].filter(pl.col("check") == "feature").cast(PARITY_ROW_SCHEMA)
                   .join(new_points.cast({k: PARITY_ROW_SCHEMA[k] for k in POINT_KEYS}), on=POINT_KEYS, how="anti"))
        # point checks are redone for the recomputed patients (their whole history)
        earlier_points = (previous["parity_report"].filter(pl.col("check") == "point").cast(PARITY_ROW_SCHEMA)
                          .filter(~pl.col("patient_id").is_in(recompute.implode())))
        # copies that differed stay reported; a later copy that differs again gives the same row
        # (those at the points of snapshots archived again are redone from every copy)
        is_copies = pl.col("check") == "copies"
        redone = prev_online.filter(pl.col("snapshot_id").is_in(again.implode())).select(
            [pl.col(k).cast(PARITY_ROW_SCHEMA[k]) for k in POINT_KEYS])
        copy_rows = pl.concat([previous["parity_report"].filter(is_copies).cast(PARITY_ROW_SCHEMA)
                               .join(redone, on=POINT_KEYS, how="anti", nulls_equal=True),
                               mismatches.filter(is_copies)]).unique(maintain_order=True)
        mismatches = pl.concat([earlier, earlier_points, mismatches.filter(~is_copies), copy_rows])

    observations = rebuild.observations(versions)
    tables = {
        "canonical_events": classified,
        "observation_versions": versions,
        "observations": observations,
        "patients": rebuild.patients(events, observations),
        "encounters": rebuild.encounters(events, observations),
        "features_online": online,
        "features_offline": offline,
        "labels": labels,
        # disagreements and pending points only: empty when the planes agree, small when they nearly do
        "parity_report": mismatches.sort(PARITY_ORDER, nulls_last=True),
        "archive_parts": parts,
    }
    for name, (kind, clean) in _ARCHIVE_TABLES.items():
        tables[name] = late_published if name == "late_events" else clean(
            _merged(kind, previous.get(name), new_raw[kind]))
    facts = {"new_parts": new_parts.height, "recomputed_patients": recompute.len(),
             "quarantined_parts": len(unreadable), "quarantine_files": len(quarantined_files(archive_dir))}
    return tables, summary, facts


def _snapshots_again(kept: pl.DataFrame | None, raw: pl.DataFrame) -> pl.Series:
    """The snapshots an earlier run kept that the new parts archive again, and the others it kept at
    their points (the parity rows of copies name a point, not a snapshot)."""
    if kept is None:
        return pl.Series("snapshot_id", [], pl.String)
    repeated = kept.filter(pl.col("snapshot_id").is_in(raw["snapshot_id"].unique().implode()))
    keys = [pl.col(k).cast(pl.String) for k in POINT_KEYS]
    at_their_points = pl.concat_str(keys, separator="|", ignore_nulls=True)
    return kept.filter(at_their_points.is_in(repeated.select(at_their_points.alias("_p"))["_p"].implode()))[
        "snapshot_id"].unique()


def _old_copies(archive_dir: Path, parts: pl.DataFrame, done: set[str], ids: pl.Series,
                unreadable: dict[str, str]) -> pl.DataFrame:
    """Every copy of `ids` in the part files an earlier run read (only when a new part repeats one: a
    restart re-emits snapshots, and the copy a full build keeps is the first in Kafka order)."""
    if ids.is_empty():
        return rebuild.empty_archive_frame("features")
    old = parts.filter((pl.col("kind") == "features") & pl.col("path").is_in(sorted(done)))["path"].to_list()
    return read_parts(archive_dir, "features", old, unreadable, where=pl.col("snapshot_id").is_in(ids.implode()))


def _repeated_snapshots(raw: pl.DataFrame) -> pl.DataFrame:
    """Every copy of the snapshots archived more than once, in Kafka order, for the parity check of
    copies (`raw` holds every copy of the snapshots an earlier run kept and a new part repeats)."""
    ids = raw["snapshot_id"]
    repeated = ids.filter(ids.is_duplicated()).unique().implode()
    return rebuild.snapshot_copies(raw.filter(pl.col("snapshot_id").is_in(repeated)))


def _with_outcomes(events: pl.DataFrame, classified: pl.DataFrame) -> pl.DataFrame:
    """Every event with the outcome the rules gave it; context facts (which the feature rules skip)
    get outcome "context", so canonical_events keeps every event the archive holds."""
    outcomes = classified.select(*rebuild.ARRIVAL, "outcome", "late_by_ms", "supersedes").cast(
        {c: pl.Int64 for c in (*rebuild.ARRIVAL, "late_by_ms")})
    return (events.join(outcomes, on=list(rebuild.ARRIVAL), how="left", maintain_order="left")
            .with_columns(outcome=pl.col("outcome").fill_null(pl.lit("context"))))


def _at_derived_positions(points: pl.DataFrame, derived: pl.DataFrame) -> pl.DataFrame:
    """The online points placed where the batch's own rule puts them, so the offline features never
    take the stream's word for where it scored (the point check reports a point the stream placed
    elsewhere). A snapshot the rule does not derive keeps its own position (the point check blames
    it as online only); one without idx (archived before snapshots carried it) sees its whole
    message. The online partition, offset and idx are kept aside as _online_partition/_online_offset/
    _online_idx."""
    rule = derived.unique("snapshot_id", keep="first").select(
        "snapshot_id", _partition="partition", _offset="offset", _idx="idx")
    found = pl.col("_partition").is_not_null()
    return (points.join(rule, on="snapshot_id", how="left", maintain_order="left")
            .with_columns(_online_partition="partition", _online_offset="offset", _online_idx="idx")
            .with_columns(partition=pl.when(found).then("_partition").otherwise("partition").cast(pl.Int64),
                          offset=pl.when(found).then("_offset").otherwise("offset").cast(pl.Int64),
                          idx=pl.when(found).then("_idx").otherwise("idx").cast(pl.Int64))
            .drop("_partition", "_offset", "_idx"))


def _points_to_redo(points: pl.DataFrame, done: pl.DataFrame, new_events: pl.DataFrame) -> pl.DataFrame:
    """Points without offline features yet, plus points at or after a newly archived event of the
    same patient: the archiver may land a features part before the canonical part it depends on,
    so an event can arrive in the archive after points that already saw it on the stream."""
    first_new = (new_events.group_by("patient_id", "partition").agg(pl.col("offset").min().alias("_first_new"))
                 .cast({"partition": pl.Int64}))
    stale = (points.join(first_new, on=["patient_id", "partition"])
             .filter(pl.col("offset") >= pl.col("_first_new")).select(POINT))
    missing = points.join(done.select("snapshot_id"), on="snapshot_id", how="anti").select(POINT)
    return pl.concat([missing, stale]).unique().sort(*_POINT_ORDER, nulls_last=True)


def _labels(frame: pl.DataFrame) -> pl.DataFrame:
    """The labels table's columns; a labeller without the onset columns counts every row at risk
    (as batch.train does)."""
    defaults = {"news2": pl.lit(None, LABELS_SCHEMA["news2"]), "at_risk": pl.lit(True), "onset_ms": pl.lit(None, pl.Int64)}
    frame = frame.with_columns(**{c: v for c, v in defaults.items() if c not in frame.columns})
    return rebuild.with_feature_types(frame.select(list(LABELS_SCHEMA)), "labels").cast(LABELS_SCHEMA)


def _wal(database: Path) -> Path:
    return database.with_name(database.name + ".wal")


def _run_row(run_id: str, started: datetime, finished: datetime, full: bool, archive_files: int, facts: dict,
             counts: dict[str, int], timings: dict[str, float], summary: dict, ok: bool) -> pl.DataFrame:
    return pl.DataFrame([{
        "run_id": run_id, "started_at": started, "finished_at": finished, "full": full,
        "archive_files": archive_files, "new_parts": facts["new_parts"],
        "recomputed_patients": facts["recomputed_patients"],
        "quarantined_parts": facts["quarantined_parts"], "quarantine_files": facts["quarantine_files"],
        "counts_json": orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode(),
        "timings_json": orjson.dumps(timings, option=orjson.OPT_SORT_KEYS).decode(),
        "points_checked": summary["points_checked"], "values_checked": summary["values_checked"],
        "mismatched": summary["mismatched"], "match_rate": float(summary["match_rate"]),
        "max_abs_diff": float(summary["max_abs_diff"]),
        "late_published": summary["late_published"], "late_recomputed": summary["late_recomputed"],
        "late_mismatched": summary["late_mismatched"], "parity_ok": ok,
        "parity_json": orjson.dumps(summary, option=orjson.OPT_SORT_KEYS).decode(),
        # filled in by batch/retrain.py when a model is trained after this run
        "model_version": None, "gate_decision": None, "gate_reasons_json": None, "model_metrics_json": None,
    }], schema_overrides={"started_at": pl.Datetime("us", "UTC"), "finished_at": pl.Datetime("us", "UTC"),
                          "model_version": pl.String, "gate_decision": pl.String, "gate_reasons_json": pl.String,
                          "model_metrics_json": pl.String})


LOCK_POLL_S = 0.2
# how long a nightly waits for a `batch train` recording its decision (an UPDATE, or a copy of the
# file when an analyst has it open): seconds, so the scheduler's run does not fail on it
NIGHTLY_WAITS_FOR_RECORD_S = 300.0
NIGHTLY = "nightly"
TRAIN = "batch train"


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _holder(lock) -> str:
    lock.seek(0)
    return lock.read().split(" since ")[0].strip()


@contextmanager
def writer_lock(target: Path, who: str, *, patience: Callable[[str], float] = lambda holder: 0.0,
                on_wait: Callable[[str], None] | None = None):
    """Hold the lock every writer of `target` takes (the nightly's build and swap, `batch train`'s
    decision), waiting up to `patience(holder)` seconds for it, else raise NightlyBusy. flock: the
    kernel drops it when the process dies, so a killed run never leaves the next one locked out.
    The lock file names its holder, so a waiter can tell a nightly (minutes) from a train's record
    (seconds). Whoever holds it removes what killed writers left: no other writer is running."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(target), "a+") as lock:
        started, tries = time.monotonic(), 0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder, waited = _holder(lock), time.monotonic() - started
                # never before a second try: the label may still be the previous holder's
                if tries and waited >= patience(holder):
                    raise NightlyBusy(_busy(target, who, holder, waited)) from None
                if on_wait is not None and tries == 1:
                    on_wait(holder)
                tries += 1
                time.sleep(LOCK_POLL_S)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{who} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        lock.flush()
        # a nightly killed mid-write (the scheduler's container stopped) left its whole new file
        # behind, a train killed while recording beside a reader its copy of the file (retrain.py)
        for pattern in (f".{target.name}.*.building*", f".{target.name}.*.recording*"):
            for stale in target.parent.glob(pattern):
                stale.unlink(missing_ok=True)
        yield


def _busy(target: Path, who: str, holder: str, waited: float) -> str:
    if holder == NIGHTLY and who == NIGHTLY:
        return f"another nightly run is building {target}; wait for it to finish"
    return (f"{holder or 'another writer'} still holds {lock_path(target)} after {waited:.0f} s of waiting "
            f"({who} writes {target} only while no other writer does)")


def run_nightly(settings: Settings, *, full: bool = True, progress: Callable[[str], None] | None = None,
                features_at: FeaturesAt | None = None, classify_events: ClassifyEvents | None = None,
                make_labels: MakeLabels | None = None, report: bool = True, quarantine: bool = False) -> dict:
    """Rebuild the DuckDB file from the archive and swap it in; returns counts, parity and the path.

    `full=False` builds on the previous file (only new archive parts; same result). `features_at` /
    `classify_events` / `make_labels` default to batch.features / batch.train (parameters so tests
    can stand in). `report` writes the HTML report of the run next to the database. An archive part
    file that cannot be read raises UnreadableParts before anything is written; with `quarantine` it is
    moved to <archive>/quarantine/ and the run goes on without it (`quarantined_parts` in the result)."""
    # the point check needs the real recomputation (stand-ins of features_at don't take idx)
    scoring_points = _default_scoring_points() if features_at is None and classify_events is None else None
    if features_at is None or classify_events is None:
        default_features_at, default_classify = _default_recompute()
        features_at = features_at or default_features_at
        classify_events = classify_events or default_classify
    make_labels = make_labels or default_labels

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
    # refuse at once when another nightly builds the file; wait a while for a train's record
    patience = lambda holder: 0.0 if holder == NIGHTLY else NIGHTLY_WAITS_FOR_RECORD_S  # noqa: E731
    with writer_lock(target, NIGHTLY, patience=patience):  # held until the new file is in place
        previous = _previous_state(target, full)
        tables, summary, facts = build_tables(
            archive_dir, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
            cross_source_tolerance=settings.cross_source_tolerance,
            dedupe_horizon_ms=settings.dedupe_horizon_s * 1000, features_at=features_at,
            classify_events=classify_events, make_labels=make_labels, step=step, previous=previous,
            scoring_points=scoring_points, min_interval_ms=settings.scoring_min_interval_s * 1000,
            quarantine=quarantine)
        ok = parity_ok(summary)
        counts = {name: frame.height for name, frame in tables.items()}

        step("write")
        target.parent.mkdir(parents=True, exist_ok=True)
        building = target.with_name(f".{target.name}.{run_id}.building")
        try:
            with duckdb.connect(str(building)) as con:
                for name, frame in tables.items():
                    _write_table(con, name, frame)
                step(None)
                run = _run_row(run_id, started, datetime.now(timezone.utc), full or not previous,
                               tables["archive_parts"].height, facts, counts, timings, summary, ok)
                old = previous_runs(target)
                runs = run if old is None else pl.concat([old, run], how="diagonal_relaxed")
                _write_table(con, "runs", runs)
                create_views(con)
                apply_comments(con)
                con.execute("CHECKPOINT")
            # a read-write session on the old file killed before its checkpoint leaves <file>.wal: DuckDB
            # would replay it into the new file and refuse to open it. Its changes were read with the
            # old file above (a read-only open replays the WAL); the file it belongs to is replaced whole.
            _wal(target).unlink(missing_ok=True)
            os.replace(building, target)
        finally:
            for leftover in (building, _wal(building)):
                leftover.unlink(missing_ok=True)

    log.info("nightly run %s: %d tables, %d new parts, parity ok=%s, mismatched=%d", run_id, len(tables) + 1,
             facts["new_parts"], ok, summary["mismatched"])
    if facts["quarantine_files"]:
        log.warning("%d file(s) in %s/%s are not read: the tables lack their rows (docs/operations.md)",
                    facts["quarantine_files"], archive_dir, QUARANTINE)
    result = {"run_id": run_id, "duckdb_path": str(target), "counts": counts | {"runs": runs.height},
              "parity": summary, "parity_ok": ok, "timings": timings, **facts}
    if report:
        from batch.report import write_report

        result["report_path"] = str(write_report(settings))
    return result
