"""De-identified export: Parquet copies of the analyst tables for use outside the clinical perimeter.

    export_deidentified(settings, out_dir) -> {table: rows}

Every exported table has an explicit column policy (POLICY); a column not listed is not exported,
so a column added to the DuckDB file later stays inside until someone decides how to export it.

    hash       identifiers (patient, encounter, fact, event, snapshot, alert ids) are replaced by
               HMAC-SHA256(settings.deid_secret, "<kind>|<id>") in hex: stable across tables and
               exports with the same secret (analysts can join), not reversible without it. An
               encounter's <id> is "<patient_id>|<encounter_id>" (a visit number is unique within its
               patient only; before 2026-11-27 it was the encounter id alone)
    point_id   features_offline, labels, scores and scores_shadow: the scoring point (its
               snapshot_id) hashed the same way, the key that joins them one to one (a correction
               re-scores a patient at the time of an earlier point, so patient_id + scoring_ms is
               not unique, and one canonical message can hold two points of a patient at one time,
               so neither is patient, time, partition and offset). A file written before
               features_offline and labels carried snapshot_id: those four columns, in every table
    shift      times (ms since epoch) move by the patient's offset: a whole number of days in
               -365..-1 or +1..+365 derived from the patient's HMAC, the same in every table, so
               intervals within a patient are exact
    keep       codes, values, units, statuses, scores, labels, model versions, an alert's status and
               whether a correction withdrew it
    age_band   birth year becomes a 10-year age band at the patient's first measurement (90+ capped)

Never exported: names (wardwatch stores none), free text (value_text, rationale, provenance, dead
letters), the RiskAssessment JSON, wards, Kafka positions, and a fact's `version` (for CDC rows the
database's log sequence number, one clock shared by every patient: it would undo the date shifts).
For the same reason rows are written sorted by their de-identified values (patient hash, shifted
times, hashes), never in the database's order, which follows real time across patients.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from schemas.features import FEATURE_NAMES
from wardwatch.settings import Settings

DAY_MS = 24 * 3600 * 1000
MAX_SHIFT_DAYS = 365
MIN_SECRET_CHARS = 16
MIN_DISTINCT_CHARS = 8


class ExportRefused(ValueError):
    """The export cannot run safely (no secret, no database, a directory holding other files)."""


@dataclass(frozen=True)
class TablePolicy:
    hash: dict[str, str] = field(default_factory=dict)  # column -> id kind (the HMAC domain)
    shift: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    age_band: bool = False  # patients only: birth_year -> age_band
    point_id: bool = False  # a hashed scoring-point key: snapshot_id (POINT_POSITION in older files)


_PATIENT = {"patient_id": "patient"}
# the point key of a file from before features_offline and labels carried snapshot_id (not unique)
POINT_POSITION = ("patient_id", "scoring_ms", "partition", "offset")
_ALERT_IDS = _PATIENT | {"encounter_id": "encounter", "alert_id": "alert", "original_alert_id": "alert"}
_SCORE_KEEP = ("model_version", "path", "probability", "news2", "tier", "preliminary_basis")
POLICY: dict[str, TablePolicy] = {
    "patients": TablePolicy(_PATIENT, ("first_effective_ms", "last_effective_ms"), ("sex", "encounters"),
                            age_band=True),
    "encounters": TablePolicy(_PATIENT | {"encounter_id": "encounter"},
                              ("admitted_ms", "discharged_ms", "first_effective_ms", "last_effective_ms"),
                              ("encounter_class", "ward_moves")),
    "observations": TablePolicy(_PATIENT | {"encounter_id": "encounter", "fact_id": "fact", "event_id": "event"},
                                ("effective_ms", "issued_ms"),
                                ("code", "code_system", "value", "unit", "status", "source", "outcome",
                                 "versions", "late_by_ms")),
    "features_offline": TablePolicy(_PATIENT, ("scoring_ms",), FEATURE_NAMES, point_id=True),
    # at_risk: rows already deteriorated are left out of training and evaluation (batch/train.py)
    "labels": TablePolicy(_PATIENT, ("scoring_ms", "onset_ms"),
                          ("news2", "label", "at_risk", "label_news2_high", "label_low_sbp", "label_high_lactate"),
                          point_id=True),
    "scores": TablePolicy(_PATIENT | {"snapshot_id": "snapshot"}, ("scoring_ms",), _SCORE_KEEP, point_id=True),
    "scores_shadow": TablePolicy(_PATIENT | {"snapshot_id": "snapshot"}, ("scoring_ms",), _SCORE_KEEP,
                                 point_id=True),
    # status and original_alert_id (hashed like alert_id): which alert a correction amends or withdraws
    "alerts": TablePolicy(_ALERT_IDS, ("scoring_ms",),
                          ("kind", "tier", "status", "reason", "model_version", "path", "preliminary_basis")),
    "alert_outcomes": TablePolicy(_ALERT_IDS, ("scoring_ms", "outcome_ms"),
                                  ("kind", "tier", "status", "withdrawn", "model_version", "path", "outcome_criterion",
                                   "outcome_followed", "lead_time_h")),
}


# --- pure: keyed hashes, shifts, bands -----------------------------------------------------------


def keyed_hash(secret: bytes, kind: str, value: str) -> str:
    return hmac.new(secret, f"{kind}|{value}".encode(), hashlib.sha256).hexdigest()


def shift_days(secret: bytes, patient_id: str) -> int:
    """The patient's date shift in whole days: -365..-1 or 1..365, never 0 (a shift must move dates)."""
    digest = hmac.new(secret, f"shift|{patient_id}".encode(), hashlib.sha256).digest()
    n = int.from_bytes(digest[:8], "big") % (2 * MAX_SHIFT_DAYS)  # 0 .. 729
    return n - MAX_SHIFT_DAYS if n < MAX_SHIFT_DAYS else n - MAX_SHIFT_DAYS + 1


def age_band(birth_year: int | None, at_ms: int | None) -> str | None:
    if birth_year is None or at_ms is None:
        return None
    age = datetime.fromtimestamp(at_ms / 1000, tz=timezone.utc).year - birth_year
    if age >= 90:
        return "90+"
    low = max(age, 0) // 10 * 10
    return f"{low}-{low + 9}"


def deidentify(name: str, frame: pl.DataFrame, secret: bytes, *, point_by_snapshot: bool = True) -> pl.DataFrame:
    """One table through its policy: hashed ids, shifted times, kept columns; nothing else. Rows in
    the order of those values, so the row order says nothing the columns do not. `point_by_snapshot`:
    point_id from snapshot_id (else from POINT_POSITION: every table of the export must agree)."""
    policy = POLICY[name]
    patients = frame["patient_id"].unique().drop_nulls().to_list()
    offsets = pl.DataFrame({"patient_id": patients,
                            "_shift_ms": [shift_days(secret, p) * DAY_MS for p in patients]},
                           schema={"patient_id": pl.String, "_shift_ms": pl.Int64})
    out = frame.join(offsets, on="patient_id", how="left", maintain_order="left")
    hashed = dict(policy.hash)
    if "encounter_id" in hashed and "encounter_id" in out.columns:
        # a visit number is unique within its patient only (encounters are keyed (patient_id, encounter_id)):
        # hashed alone, two patients' visit "45" would share one hash, joining one's stay to the other's rows
        out = out.with_columns(pl.concat_str([pl.col("patient_id"), pl.col("encounter_id").cast(pl.String)],
                                             separator="|").alias("encounter_id"))
    if policy.point_id:
        point = (pl.col("snapshot_id") if point_by_snapshot else
                 pl.concat_str([pl.col(c).cast(pl.String) for c in POINT_POSITION], separator="|"))
        out, hashed = out.with_columns(point_id=point), {"point_id": "point", **hashed}
    columns = []
    for column, kind in hashed.items():
        if column not in out.columns:  # a file from before the column existed
            continue
        values = out[column].unique().drop_nulls().to_list()
        mapping = {v: keyed_hash(secret, kind, str(v)) for v in values}
        columns.append(pl.col(column).cast(pl.String).replace_strict(mapping, default=None, return_dtype=pl.String))
    columns += [(pl.col(c) + pl.col("_shift_ms")).alias(c) for c in policy.shift if c in out.columns]
    columns += [pl.col(c) for c in policy.keep if c in out.columns]
    if policy.age_band:
        columns.append(pl.struct("birth_year", "first_effective_ms")
                       .map_elements(lambda r: age_band(r["birth_year"], r["first_effective_ms"]),
                                     return_dtype=pl.String).alias("age_band"))
    order = ["patient_id", *(c for c in (*policy.shift, *hashed) if c != "patient_id" and c in out.columns)]
    return out.select(columns).sort(order, nulls_last=True, maintain_order=True)


# --- wiring --------------------------------------------------------------------------------------


def _secret(settings: Settings) -> bytes:
    """The HMAC key, refused when missing, short or obviously weak (`"s" * 32`, `"12345678..."`): a key
    a guess finds re-identifies every id and undoes every date shift of every export made with it."""
    secret = settings.deid_secret.get_secret_value() if settings.deid_secret else ""
    kinds = {"lower" if ch.islower() else "upper" if ch.isupper() else "digit" if ch.isdigit() else "other"
             for ch in secret}
    if len(secret) < MIN_SECRET_CHARS:
        problem = f"needs WARDWATCH_DEID_SECRET (at least {MIN_SECRET_CHARS} characters)"
    elif len(set(secret)) < MIN_DISTINCT_CHARS or len(kinds) < 2:
        problem = (f"refuses a weak WARDWATCH_DEID_SECRET (fewer than {MIN_DISTINCT_CHARS} distinct characters, "
                   "or only letters of one case, only digits or only symbols)")
    else:
        return secret.encode()
    raise ExportRefused(
        f"the de-identified export {problem}: generate one with "
        "`export WARDWATCH_DEID_SECRET=$(python -c \"import secrets; print(secrets.token_urlsafe(32))\")`; "
        "keep it out of the export: whoever holds it can re-identify the ids")


MANIFEST = "manifest.json"
# pseudonymous, not anonymous (whoever holds the secret, or links enough kept values, re-identifies a row):
# readable by the exporting user only until someone decides to hand it on
DIR_MODE, FILE_MODE = 0o700, 0o600
ACCESS = (f"pseudonymous, not anonymous: still personal health data, to be handled as such; written readable "
          f"by its owner only (directory {DIR_MODE:o} when the export created it, files {FILE_MODE:o})")


def _private(path: Path):
    """PATH opened for writing, created FILE_MODE (never readable by others, not even for a moment)."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")


def _previous_export(out_dir: Path) -> list[Path]:
    """The files an earlier export left in OUT_DIR (its manifest's tables, the manifest, `.tmp` files of
    a run that stopped), refused when OUT_DIR holds anything else: a table no manifest lists may come
    from another run or another secret, and its hashes and shifts would join these rows wrongly."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise ExportRefused(f"{out_dir} is a file: give a new or empty directory for the export")
    present = sorted(out_dir.iterdir())
    if not present:
        return []
    try:
        tables = json.loads((out_dir / MANIFEST).read_text())["tables"]
        listed = {MANIFEST, *(f"{name}.parquet" for name in tables if name in POLICY)}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()  # no manifest (or not ours): not a previous export
    temps = {f".{name}.parquet.tmp" for name in POLICY}  # what _write leaves when it is killed (SIGKILL, OOM)
    ours = [p for p in present if p.name in listed or p.name in temps]
    others = [p.name for p in present if p not in ours]
    if not others:  # a previous export, or a run killed writing its first table (its manifest already gone)
        return ours
    what = (f"is not a previous export (no {MANIFEST})" if MANIFEST not in listed
            else "holds files its manifest does not list")
    raise ExportRefused(f"{out_dir} {what}: {len(others)} file(s) such as {others[0]!r}; an export leaves only its "
                        "own files, so give a new or empty directory, or empty this one")


def export_deidentified(settings: Settings, out_dir: Path, *, compression: str = "zstd") -> dict[str, int]:
    """Write OUT_DIR/<table>.parquet for every table in POLICY present in the DuckDB file, plus
    manifest.json (tables, rows, the policy; never the secret). Returns rows per table.

    OUT_DIR ends holding this run's files only: a previous export there is removed first (the files its
    manifest lists), any other content is refused, and a run that fails removes what it wrote."""
    secret = _secret(settings)
    if not settings.duckdb_path.exists():
        raise ExportRefused(f"{settings.duckdb_path} does not exist: run `wardwatch batch nightly` first")
    stale = _previous_export(out_dir)
    out_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)  # an existing directory keeps its mode
    for path in stale:  # the manifest last: a run stopped here is still recognised as a previous export
        if path.name != MANIFEST:
            path.unlink(missing_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    try:
        return _write(settings, secret, out_dir, compression)
    except BaseException:
        for path in out_dir.iterdir():  # only this run's files are left there (checked above)
            path.unlink(missing_ok=True)
        raise


def _write(settings: Settings, secret: bytes, out_dir: Path, compression: str) -> dict[str, int]:
    written: dict[str, int] = {}
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        present = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() UNION SELECT view_name FROM duckdb_views() "
            "WHERE NOT internal").fetchall()}
        with_snapshot = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_columns() WHERE column_name = 'snapshot_id'").fetchall()}
        # point ids must join across tables: from snapshot_id only when every point table has it
        by_snapshot = all(name in with_snapshot for name, p in POLICY.items() if p.point_id and name in present)
        for name in POLICY:
            if name not in present:
                continue
            frame = pl.from_arrow(con.sql(f'SELECT * FROM "{name}"').to_arrow_table())
            clean = deidentify(name, frame, secret, point_by_snapshot=by_snapshot)
            tmp = out_dir / f".{name}.parquet.tmp"
            with _private(tmp) as f:
                clean.write_parquet(f, compression=compression)
            tmp.replace(out_dir / f"{name}.parquet")
            written[name] = clean.height
    manifest = {"tables": written, "policy": {n: {"hashed": sorted([*p.hash, *(["point_id"] if p.point_id else [])]),
                                                  "shifted": list(p.shift),
                                                  "kept": list(p.keep), "age_band": p.age_band}
                                              for n, p in POLICY.items() if n in written},
                "access": ACCESS,
                "date_shift": f"whole days, per patient, within +-{MAX_SHIFT_DAYS}, never 0",
                # what an export's hashes join with: an export from before 2026-11-27 hashed encounter_id alone
                "hash": {"function": "HMAC-SHA256(secret, '<kind>|<id>')",
                         "encounter_id": "<id> is '<patient_id>|<encounter_id>' (since 2026-11-27; the encounter "
                                         "id alone before: those exports' encounter hashes do not join these)"}}
    with _private(out_dir / MANIFEST) as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    return written
