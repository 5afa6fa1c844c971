"""The de-identified export: no original identifier anywhere, intervals within a patient preserved."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import duckdb
import polars as pl
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from batch.export import ExportRefused, age_band, export_deidentified, shift_days
from batch.nightly import run_nightly
from schemas import codes
from schemas.canonical import LOINC, CanonicalEvent, Source, Status
from tests.batch.test_nightly import canonical
from tests.batch.test_rebuild import STANDINS, T0, kafka, write
from wardwatch.cli import app
from wardwatch.settings import Settings

HOUR_MS = 3600 * 1000
PATIENTS = ("MRN-0012345678", "MRN-0087654321")
ENCOUNTERS = ("ENC-5550001111", "ENC-5550002222")
SECRET = "correct horse battery staple 42"


def event(patient: int, n: int, code: str, value, effective_ms: int, system=LOINC, text=None) -> CanonicalEvent:
    return CanonicalEvent(patient_id=PATIENTS[patient], code=code, value=value, unit=None, effective_ms=effective_ms,
                          issued_ms=effective_ms + 60_000, status=Status.FINAL, source=Source.CDC,
                          fact_id=f"cdc:vital_signs:98765{patient}{n}:{code}", version=1,
                          encounter_id=ENCOUNTERS[patient], code_system=system, value_text=text,
                          provenance={"table": "vital_signs", "row": f"98765{patient}{n}"})


def build(settings: Settings) -> None:
    messages = {}
    for p in (0, 1):
        messages[(p, 0)] = [
            event(p, 0, codes.ADMISSION, None, T0 - 5 * HOUR_MS, codes.CONTEXT, "inpatient"),
            event(p, 1, codes.LOCATION, None, T0 - 5 * HOUR_MS, codes.CONTEXT, "Ward Nightingale"),
            event(p, 2, codes.BIRTH_YEAR, 1941.0 + 40 * p, T0 - 5 * HOUR_MS, codes.CONTEXT),
            event(p, 3, codes.HEART_RATE, 80.0, T0),
            event(p, 4, codes.HEART_RATE, 95.0, T0 + 2 * HOUR_MS),
        ]
    write(settings.archive_dir, "canonical", "a", canonical(messages))
    features, scores = [], []
    for p in (0, 1):
        point = {"snapshot_id": f"snap-{PATIENTS[p]}", "patient_id": PATIENTS[p], "scoring_ms": T0 + 2 * HOUR_MS,
                 "partition": p, "offset": 0}
        features.append(point | {"features_json": "{}"} | kafka(0, p))
        scores.append(point | {"model_version": "m1", "path": "model", "probability": 0.7, "news2": 3,
                               "tier": "high", "rationale_json": f'[{{"patient": "{PATIENTS[p]}"}}]'} | kafka(0, p))
    write(settings.archive_dir, "features", "a", features)
    write(settings.archive_dir, "scores", "a", scores)
    alert = {"alert_id": f"alert-for-{PATIENTS[0]}", "kind": "open", "tier": "high", "patient_id": PATIENTS[0],
             "encounter_id": ENCOUNTERS[0], "scoring_ms": T0 + 2 * HOUR_MS, "model_version": "m1", "path": "model",
             "resource_json": f'{{"subject": {{"reference": "Patient/{PATIENTS[0]}"}}}}'}
    write(settings.archive_dir, "alerts", "a", [alert | kafka(0, 0)])
    run_nightly(settings, **STANDINS)


def built(tmp_path: Path, build_archive) -> Settings:
    """Settings with the export secret, over a nightly file of the archive `build_archive` writes."""
    s = Settings(data_dir=tmp_path / "data", deid_secret=SecretStr(SECRET))
    build_archive(s)
    return s


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return built(tmp_path, build)


ORIGINALS = [*PATIENTS, *ENCOUNTERS, "98765", "Nightingale", "snap-", "alert-for", "1941", "1981"]


def test_export_holds_no_original_identifier_in_any_cell_or_byte(settings, tmp_path):
    out = tmp_path / "export"
    written = export_deidentified(settings, out, compression="uncompressed")
    assert written["observations"] == 4 and written["patients"] == 2 and written["alerts"] == 1
    for path in out.iterdir():
        raw = path.read_bytes()
        for original in ORIGINALS:
            assert original.encode() not in raw, (path.name, original)
        if path.suffix != ".parquet":
            continue
        table = pl.read_parquet(path)
        for column, dtype in table.schema.items():
            if dtype == pl.String:
                for cell in table[column].drop_nulls().to_list():
                    assert not any(o in cell for o in ORIGINALS), (path.name, column, cell)
    assert "resource" not in pl.read_parquet(out / "alerts.parquet").columns


def test_intervals_within_a_patient_are_kept_and_dates_move_by_whole_days(settings, tmp_path):
    out = tmp_path / "export"
    export_deidentified(settings, out)
    observations = pl.read_parquet(out / "observations.parquet").sort("patient_id", "effective_ms")
    encounters = pl.read_parquet(out / "encounters.parquet")
    scores = pl.read_parquet(out / "scores.parquet")
    for patient, rows in observations.group_by("patient_id"):
        times = rows["effective_ms"].to_list()
        assert times[1] - times[0] == 2 * HOUR_MS  # the two heart rates, 2 h apart
        shift = times[0] - T0
        assert shift % (24 * HOUR_MS) == 0 and 0 < abs(shift) <= 365 * 24 * HOUR_MS
        admitted = encounters.filter(pl.col("patient_id") == patient[0])["admitted_ms"][0]
        assert times[0] - admitted == 5 * HOUR_MS  # same shift in another table
        assert scores.filter(pl.col("patient_id") == patient[0])["scoring_ms"][0] == times[1]


def test_ids_are_stable_keyed_hashes_and_birth_year_becomes_an_age_band(settings, tmp_path):
    export_deidentified(settings, tmp_path / "one")
    export_deidentified(settings, tmp_path / "two")
    one = pl.read_parquet(tmp_path / "one" / "patients.parquet").sort("patient_id")
    two = pl.read_parquet(tmp_path / "two" / "patients.parquet").sort("patient_id")
    assert one.equals(two)
    assert "birth_year" not in one.columns
    assert sorted(one["age_band"].to_list()) == ["40-49", "80-89"]  # born 1941 and 1981, measured in 2024
    other = Settings(data_dir=settings.data_dir, deid_secret=SecretStr("another secret, 16+ chars"))
    export_deidentified(other, tmp_path / "three")
    three = pl.read_parquet(tmp_path / "three" / "patients.parquet")
    assert set(three["patient_id"]).isdisjoint(set(one["patient_id"]))


def build_withdrawn(settings: Settings) -> None:
    """build's alert, then withdrawn by a correction (its basis was entered in error)."""
    correction = {"alert_id": "correction-1", "kind": "correction", "tier": "high", "status": "entered-in-error",
                  "original_alert_id": f"alert-for-{PATIENTS[0]}", "patient_id": PATIENTS[0],
                  "encounter_id": ENCOUNTERS[0], "scoring_ms": T0 + 2 * HOUR_MS, "model_version": "m1",
                  "path": "model", "resource_json": "{}"}
    write(settings.archive_dir, "alerts", "b", [correction | kafka(0, 1)])
    build(settings)


def test_a_withdrawn_alert_is_exported_as_withdrawn_and_linked_to_its_correction(tmp_path):
    """Outside the perimeter an analyst must tell an alert that stood from one withdrawn (entered in
    error): before, the export dropped status and original_alert_id, so a withdrawn open counted as an
    alert that stood and its correction named no alert."""
    settings = built(tmp_path, build_withdrawn)
    out = tmp_path / "export"
    export_deidentified(settings, out)
    alerts = pl.read_parquet(out / "alerts.parquet")
    opened = alerts.filter(pl.col("kind") == "open")
    correction = alerts.filter(pl.col("kind") == "correction")
    assert correction["status"].to_list() == ["entered-in-error"]
    assert correction["original_alert_id"].to_list() == opened["alert_id"].to_list()  # same keyed hash
    outcomes = pl.read_parquet(out / "alert_outcomes.parquet").sort("kind")
    assert outcomes.select("kind", "withdrawn").rows() == [("correction", None), ("open", True)]
    assert outcomes["status"][0] == "entered-in-error"
    assert outcomes["original_alert_id"].to_list() == [opened["alert_id"][0], None]


def test_a_file_whose_views_predate_the_withdrawn_columns_still_exports(settings, tmp_path):
    """A DuckDB file written before alert_outcomes had status, original_alert_id and withdrawn (the
    export reads the file's views as they are): the export leaves out what the file lacks. Before, it
    skipped hashing the missing original_alert_id, then sorted on it and failed (ColumnNotFoundError)."""
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE outcomes_before AS "
                    "SELECT * EXCLUDE (status, original_alert_id, withdrawn) FROM alert_outcomes")
        con.execute("CREATE OR REPLACE VIEW alert_outcomes AS SELECT * FROM outcomes_before")
    out = tmp_path / "export"
    assert export_deidentified(settings, out)["alert_outcomes"] == 1
    outcomes = pl.read_parquet(out / "alert_outcomes.parquet")
    assert outcomes["kind"].to_list() == ["open"] and "original_alert_id" not in outcomes.columns


def test_export_refuses_to_run_without_a_secret(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ExportRefused, match="WARDWATCH_DEID_SECRET"):
        export_deidentified(settings, tmp_path / "out")
    result = CliRunner().invoke(app, ["batch", "export", "--deidentify", str(tmp_path / "out")],
                                env={"WARDWATCH_DATA_DIR": str(tmp_path / "data"), "WARDWATCH_DEID_SECRET": ""})
    assert result.exit_code == 2 and "WARDWATCH_DEID_SECRET" in result.output
    assert not (tmp_path / "out").exists()


def test_shift_is_never_zero_and_bands_cap_at_90():
    shifts = {shift_days(b"k" * 16, f"p{i}") for i in range(2000)}
    assert 0 not in shifts and min(shifts) >= -365 and max(shifts) <= 365 and len(shifts) > 500
    assert age_band(1930, T0) == "90+"
    assert age_band(2000, T0) == "20-29"
    assert age_band(None, T0) is None


# --- a ward of interleaved patients: what the database's order would give away ------------------

WARD = tuple(f"MRN-77{p:08d}" for p in range(6))
LSN0 = 7_700_000_000  # CDC versions are the database's log sequence numbers: one clock for every patient
TEN_MIN = 10 * 60_000
ROUNDS = 3
CHARTED = len(WARD) * ROUNDS  # heart rates, one scoring point each
POINTS = CHARTED + 1  # and the correction's point, at the time of the reading it corrects


def ward_event(patient: int, k: int, code: str, value: float, effective_ms: int, fact: int | None = None,
               status=Status.FINAL) -> CanonicalEvent:
    return CanonicalEvent(patient_id=WARD[patient], code=code, value=value, unit=None, effective_ms=effective_ms,
                          issued_ms=effective_ms + 60_000, status=status, source=Source.CDC,
                          fact_id=f"cdc:vital_signs:{4000 + (k if fact is None else fact)}:{code}",
                          version=LSN0 + 1000 * k, encounter_id=f"ENC-{WARD[patient]}",
                          provenance={"table": "vital_signs"})


def build_ward(settings: Settings) -> None:
    """Six patients whose heart rates are charted in turns, 10 min apart, 3 rounds: row ids, log
    positions, canonical offsets and scoring times all follow real time across the patients. Then a
    correction of patient 0's last heart rate re-scores it at that reading's time (a second point at
    the same patient and scoring_ms), a low systolic BP of patient 1 after its points (an onset) and
    one of patient 2 known before its last point (no longer at risk)."""
    messages, points = {}, []
    for k in range(CHARTED):
        patient, t = k % len(WARD), T0 + k * TEN_MIN
        messages[(0, k)] = [ward_event(patient, k, codes.HEART_RATE, 80.0 + k, t)]
        points.append((patient, t, k))
    last = CHARTED - len(WARD)  # patient 0's last heart rate
    last0 = T0 + last * TEN_MIN
    k = CHARTED
    messages[(0, k)] = [ward_event(0, k, codes.HEART_RATE, 120.0, last0, fact=last, status=Status.AMENDED)]
    points.append((0, last0, k))
    messages[(0, k + 1)] = [ward_event(1, k + 1, codes.SYSTOLIC_BP, 85.0, T0 + (k + 1) * TEN_MIN)]
    messages[(0, k + 2)] = [ward_event(2, k + 2, codes.SYSTOLIC_BP, 85.0, last0 + TEN_MIN)]  # patient 2's: +2
    write(settings.archive_dir, "canonical", "a", canonical(messages))
    features, scores, alerts = [], [], []
    for i, (patient, t, offset) in enumerate(points):
        point = {"snapshot_id": f"snap-{offset}", "patient_id": WARD[patient], "scoring_ms": t, "partition": 0,
                 "offset": offset}
        features.append(point | {"features_json": "{}"} | kafka(0, i))
        scores.append(point | {"model_version": "m1", "path": "model", "probability": 0.1, "news2": 1, "tier": "none",
                               "rationale_json": "[]"} | kafka(0, i))
        if offset < len(WARD):  # each patient's first point opens an alert
            alerts.append({"alert_id": f"alert-{offset}", "kind": "open", "tier": "medium", "patient_id": WARD[patient],
                           "encounter_id": f"ENC-{WARD[patient]}", "scoring_ms": t, "model_version": "m1",
                           "path": "model", "resource_json": "{}"} | kafka(0, i))
    write(settings.archive_dir, "features", "a", features)
    write(settings.archive_dir, "scores", "a", scores)
    write(settings.archive_dir, "alerts", "a", alerts)
    run_nightly(settings, **STANDINS)


@pytest.fixture
def ward(tmp_path: Path) -> Settings:
    return built(tmp_path, build_ward)


def test_nothing_in_the_export_orders_patients_in_real_time(ward, tmp_path):
    """The date shift hides when each patient was in hospital only if nothing else keeps a clock
    shared by all patients: not the CDC log sequence numbers (`version`), and not the row order,
    which in the database follows row ids, canonical offsets or scoring times across patients."""
    out = tmp_path / "export"
    export_deidentified(ward, out)
    with duckdb.connect(str(ward.duckdb_path), read_only=True) as con:  # every log position the file holds
        log_positions = {v for (v,) in con.execute("SELECT version FROM canonical_events").fetchall()}
    assert log_positions and min(log_positions) >= LSN0  # all CDC rows: LSNs
    for path in sorted(out.glob("*.parquet")):
        table = pl.read_parquet(path)
        for column, dtype in table.schema.items():
            if dtype.is_integer():
                assert log_positions.isdisjoint(table[column].drop_nulls().to_list()), (path.name, column)
        times = [c for c in ("effective_ms", "admitted_ms", "scoring_ms", "first_effective_ms") if c in table.columns]
        key = ["patient_id", times[0]]
        assert table.select(key).equals(table.select(key).sort(key, nulls_last=True)), path.name
    assert "version" not in pl.read_parquet(out / "observations.parquet").columns


def test_exported_labels_say_which_rows_count_and_join_their_features_one_to_one(ward, tmp_path):
    """Training or evaluating outside the perimeter needs what batch.train uses: at_risk (rows of
    patients already deteriorated are left out), the onset time, and a key joining each label to
    its own point's features and score (a correction re-scores a patient at an earlier point's
    time, so patient_id + scoring_ms is not one point)."""
    out = tmp_path / "export"
    export_deidentified(ward, out)
    labels = pl.read_parquet(out / "labels.parquet")
    features = pl.read_parquet(out / "features_offline.parquet")
    scores = pl.read_parquet(out / "scores.parquet")
    with duckdb.connect(str(ward.duckdb_path), read_only=True) as con:
        inside = con.sql("SELECT at_risk, label, onset_ms - scoring_ms AS lead FROM labels").pl()
    assert labels.height == inside.height == POINTS
    assert sorted(labels.select("at_risk", "label", lead=pl.col("onset_ms") - pl.col("scoring_ms")).rows(),
                  key=str) == sorted(inside.rows(), key=str)
    assert labels["at_risk"].to_list().count(False) >= 1 and labels["label"].sum() >= 1  # both kinds of row
    assert features.select("patient_id", "scoring_ms").n_unique() == POINTS - 1  # the correction shares a time
    assert labels["point_id"].n_unique() == features["point_id"].n_unique() == scores["point_id"].n_unique() == POINTS
    assert labels.join(features, on="point_id").height == POINTS
    assert labels.join(scores, on="point_id").height == POINTS


def build_same_visit_number(settings: Settings) -> None:
    messages = {(p, 0): [dataclasses.replace(e, encounter_id="45") for e in (
        event(p, 0, codes.ADMISSION, None, T0 - 5 * HOUR_MS, codes.CONTEXT, "inpatient"),
        event(p, 3, codes.HEART_RATE, 80.0 + p, T0))] for p in (0, 1)}
    write(settings.archive_dir, "canonical", "a", canonical(messages))
    run_nightly(settings, **STANDINS)


def test_two_patients_with_the_same_visit_number_get_different_encounter_hashes(tmp_path):
    """Encounters are keyed (patient_id, encounter_id): one hospital's visit "45" and a FHIR server's
    Encounter 45 of another patient are two stays, and an analyst joining on the hashed encounter alone
    must not join one patient's stay to the other's rows. Within a patient the hash joins every table."""
    settings = built(tmp_path / "db", build_same_visit_number)
    export_deidentified(settings, tmp_path / "out")
    encounters = pl.read_parquet(tmp_path / "out" / "encounters.parquet")
    observations = pl.read_parquet(tmp_path / "out" / "observations.parquet")
    assert encounters.height == 2 and encounters["encounter_id"].n_unique() == 2
    joined = observations.join(encounters, on="encounter_id", how="inner")
    assert joined.height == 2 and (joined["patient_id"] == joined["patient_id_right"]).all()



def test_the_manifest_says_an_encounter_hash_is_of_patient_and_encounter(tmp_path):
    # an analyst holding an export from before the change finds its encounter hashes join nothing here:
    # the manifest says why (the hash's input), not only that the column is hashed
    settings = built(tmp_path / "db", build_same_visit_number)
    export_deidentified(settings, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "'<patient_id>|<encounter_id>'" in manifest["hash"]["encounter_id"]


def test_the_export_command_says_why_it_refuses_on_stderr_in_one_line(tmp_path):
    """Its refusals went to stdout (the list of files written) and a file that is not a nightly file
    ended in duckdb's traceback; now one line on stderr, exit code 2, nothing on stdout."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "wardwatch.duckdb").write_bytes(b"not a duckdb file, " * 100)
    env = {"WARDWATCH_DATA_DIR": str(data), "WARDWATCH_DEID_SECRET": SECRET}
    for args, says in ((["--deidentify"], f"cannot read {data / 'wardwatch.duckdb'}"),
                       ([], "pass --deidentify")):
        result = CliRunner().invoke(app, ["batch", "export", *args, str(tmp_path / "out")], env=env)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert result.stdout == "" and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["batch", "export", "--deidentify", str(tmp_path / "out")],
                                env=env | {"WARDWATCH_DEID_SECRET": "short"})
    assert result.exit_code == 2 and result.stdout == "" and "WARDWATCH_DEID_SECRET" in result.stderr


# --- the export directory holds one run's files only ---------------------------------------------


def test_a_re_export_leaves_no_table_of_the_earlier_run(settings, tmp_path):
    """A researcher reads every table in the directory: a table an earlier run wrote and this one did
    not (its pseudonyms from another run, perhaps another secret) was left there, unlisted in the
    manifest, and joined wrongly. Now the earlier export's files (and a stopped run's .tmp) go first."""
    out = tmp_path / "export"
    export_deidentified(settings, out)
    assert (out / "alert_outcomes.parquet").exists()
    (out / ".labels.parquet.tmp").write_bytes(b"half a table of a run that stopped")
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("DROP VIEW alert_outcomes")  # this run writes no alert_outcomes
    written = export_deidentified(settings, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "alert_outcomes" not in written
    listed = ["manifest.json", *(f"{n}.parquet" for n in manifest["tables"])]
    assert sorted(p.name for p in out.iterdir()) == sorted(listed)


def test_the_export_refuses_a_directory_that_is_not_a_previous_export(settings, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "scores.parquet").write_bytes(b"someone else's table")
    result = CliRunner().invoke(app, ["batch", "export", "--deidentify", str(out)],
                                env={"WARDWATCH_DATA_DIR": str(settings.data_dir), "WARDWATCH_DEID_SECRET": SECRET})
    assert result.exit_code == 2 and result.stdout == ""
    assert "not a previous export" in result.stderr and "new or empty directory" in result.stderr
    assert (out / "scores.parquet").read_bytes() == b"someone else's table"
    export_deidentified(settings, tmp_path / "export")
    (tmp_path / "export" / "notes.txt").write_text("my notes")  # a previous export, plus a file it did not write
    with pytest.raises(ExportRefused, match="does not list"):
        export_deidentified(settings, tmp_path / "export")
    assert (tmp_path / "export" / "notes.txt").exists() and (tmp_path / "export" / "manifest.json").exists()


def test_a_failed_export_leaves_no_table_behind(settings, tmp_path, monkeypatch):
    import batch.export

    real = batch.export.deidentify

    def fails_on_labels(name, *args, **kwargs):
        if name == "labels":
            raise RuntimeError("disk full")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(batch.export, "deidentify", fails_on_labels)
    with pytest.raises(RuntimeError):
        export_deidentified(settings, tmp_path / "export")
    assert list((tmp_path / "export").iterdir()) == []


def test_the_export_is_readable_by_its_owner_only_and_says_it_is_pseudonymous(settings, tmp_path):
    """Pseudonymous rows are still personal data: they were written with the umask's modes (0644 files
    in a 0755 directory, readable by every account on the host). Now 0700 and 0600, and the manifest
    tells the researcher what the files are."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "export"
        export_deidentified(settings, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o600 for p in out.iterdir()}
    assert json.loads((out / "manifest.json").read_text())["access"].startswith("pseudonymous, not anonymous")


@pytest.mark.parametrize("weak", ["s" * 32, "abcdefghijklmnopqrstuvwxyz", "20260101202601012026",
                                  "abababababcdcdcd1212"])
def test_the_export_refuses_an_obviously_weak_secret_and_says_how_to_make_one(weak, settings, tmp_path):
    """The secret was checked for length only: "s" * 32 keyed every hash and date shift, and a guess
    re-identifies the whole export. Refused now, in one line saying how to generate a key."""
    env = {"WARDWATCH_DATA_DIR": str(settings.data_dir), "WARDWATCH_DEID_SECRET": weak}
    result = CliRunner().invoke(app, ["batch", "export", "--deidentify", str(tmp_path / "out")], env=env)
    assert result.exit_code == 2 and result.stdout == "" and not (tmp_path / "out").exists()
    assert "weak WARDWATCH_DEID_SECRET" in result.stderr and "secrets.token_urlsafe(32)" in result.stderr
    assert weak not in result.stderr
    strong = env | {"WARDWATCH_DEID_SECRET": "Tr0ub4dor&3-wardwatch"}
    result = CliRunner().invoke(app, ["batch", "export", "--deidentify", str(tmp_path / "out")], env=strong)
    assert result.exit_code == 0, result.output


def test_an_export_killed_while_writing_its_first_table_is_exported_again(settings, tmp_path):
    """Killed (SIGKILL, OOM) while writing its first table, an export leaves only that table's hidden
    `.tmp` file (the earlier export's files and manifest are removed first). Running it again stopped on
    an IndexError traceback (the refusal named `others[0]` of an empty list): no way on but by hand."""
    out = tmp_path / "export"
    out.mkdir()
    (out / ".patients.parquet.tmp").write_bytes(b"half a table of a run that was killed")
    written = export_deidentified(settings, out)
    listed = ["manifest.json", *(f"{n}.parquet" for n in written)]
    assert sorted(p.name for p in out.iterdir()) == sorted(listed)
