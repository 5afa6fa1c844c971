"""The nightly's new tables (patients, encounters, labels, shadow scores, gaps), the catalog
(comments, views) and true incremental runs (only new archive parts; the same tables as --full)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import duckdb
import orjson
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from batch.catalog import column_comment
from batch.features import scoring_points
from batch.nightly import QUARANTINE, UnreadableParts, run_nightly
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from streams import alerting, scoring
from streams.features import compute_features
from streams.state import apply_batch
from tests.batch.test_rebuild import A1, A2, B1, B2, C1, D1, STANDINS, T0, frame, hr, kafka, tables, write
from wardwatch.settings import Settings

HOUR_MS = 3600 * 1000


def ctx(fact: str, code: str, effective_ms: int, *, text: str | None = None, value: float | None = None,
        patient="p1", encounter: str | None = "e1", version=1, status=Status.FINAL) -> CanonicalEvent:
    return CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=effective_ms,
                          issued_ms=effective_ms, status=status, source=Source.CDC, fact_id=fact, version=version,
                          encounter_id=encounter, code_system=codes.CONTEXT, value_text=text)


ADMIT = ctx("adm", codes.ADMISSION, T0 - HOUR_MS, text="inpatient")
WARD7 = ctx("loc1", codes.LOCATION, T0 - HOUR_MS, text="ward 7")
SEX_F = ctx("sex1", codes.SEX, T0 - HOUR_MS, text="female", encounter=None)
BORN = ctx("by1", codes.BIRTH_YEAR, T0 - HOUR_MS, value=1950.0, encounter=None)
ICU = ctx("loc2", codes.LOCATION, T0 + 5 * 60_000, text="ICU")
DISCHARGED = ctx("dis", codes.DISCHARGE, T0 + 10 * 60_000)
P2_BORN = ctx("by2", codes.BIRTH_YEAR, T0, value=1980.0, patient="p2", encounter="e2")
P2_BORN_RETRACTED = ctx("by2", codes.BIRTH_YEAR, T0, patient="p2", encounter="e2", version=2,
                        status=Status.ENTERED_IN_ERROR)

# (partition, offset) -> micro-batch; stage 1 is what the archive held at the first night
STAGE1 = {(0, 0): [A1, ADMIT, WARD7, SEX_F, BORN], (0, 1): [B1, A1]}
STAGE2 = {(0, 2): [A2, ICU], (0, 3): [C1], (0, 4): [B2, DISCHARGED], (1, 0): [D1, P2_BORN], (1, 1): [P2_BORN_RETRACTED]}
POINTS = {(0, 0): ("p1", T0), (0, 1): ("p1", B1.effective_ms), (0, 2): ("p1", B1.effective_ms),
          (0, 4): ("p1", B1.effective_ms), (1, 0): ("p2", T0), (1, 1): ("p2", T0)}


def canonical(messages: dict) -> list[dict]:
    rows = []
    for (partition, offset), events in sorted(messages.items()):
        for idx, e in enumerate(events):
            d = e.to_dict() | {"status": e.status.value, "source": e.source.value,
                               "provenance": orjson.dumps(e.provenance).decode()}
            rows.append(d | {"partition": partition, "offset": offset, "idx": idx, "kafka_timestamp_ms": T0})
    return rows


def point_rows(positions) -> tuple[list[dict], list[dict]]:
    features, scores = [], []
    for i, pos in enumerate(positions):
        patient, scoring_ms = POINTS[pos]
        point = {"snapshot_id": f"s{pos[0]}-{pos[1]}", "patient_id": patient, "scoring_ms": scoring_ms,
                 "partition": pos[0], "offset": pos[1]}
        features.append(point | {"features_json": orjson.dumps({"heart_rate_last_24h": 80.0}).decode()} | kafka(0, i))
        scores.append(point | {"model_version": "m1", "path": "model", "probability": 0.1 * (i + 1), "news2": i,
                               "tier": "low", "rationale_json": "[]"} | kafka(0, i))
    return features, scores


def stage1(archive: Path) -> None:
    write(archive, "canonical", "s1", canonical(STAGE1))
    features, scores = point_rows([(0, 0), (0, 1)])
    write(archive, "features", "s1", features)
    write(archive, "scores", "s1", scores)


def stage2(archive: Path) -> None:
    write(archive, "canonical", "s2", canonical(STAGE2 | {(0, 1): STAGE1[(0, 1)]}))  # (0, 1) re-archived
    features, scores = point_rows([(0, 1), (0, 2), (0, 4), (1, 0), (1, 1)])
    write(archive, "features", "s2", features)
    write(archive, "scores", "s2", scores)
    write(archive, "scores_shadow", "s2", [s | {"model_version": "cand"} for s in scores])
    late = {k: v for k, v in canonical({(0, 3): [C1]})[0].items() if k not in ("idx", "kafka_timestamp_ms")}
    write(archive, "late", "s2", [late | {"late_by_ms": 70 * 60_000} | kafka(0, 0)])
    write(archive, "gaps", "s2", [{"subscription": "sub-1", "gap_kind": "gap",
                                   "record_json": '{"last_seen": 4, "arrived": 7}'} | kafka(0, 0)])
    alert = {"alert_id": "al1", "kind": "open", "tier": "high", "patient_id": "p1", "encounter_id": "e1",
             "scoring_ms": T0, "model_version": "m1", "path": "model", "resource_json": "{}"}
    write(archive, "alerts", "s2", [alert | kafka(0, 0)])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_lateness_s=3600)


def twin(settings: Settings) -> Settings:
    """Another data dir with a copy of the archive (for the full rebuild to compare with)."""
    other = Settings(data_dir=settings.data_dir.parent / "full", allowed_lateness_s=settings.allowed_lateness_s,
                     scoring_min_interval_s=settings.scoring_min_interval_s)
    shutil.copytree(settings.archive_dir, other.archive_dir)
    return other


def assert_same_tables(a: Path, b: Path, float_tolerance: float = 0.0) -> None:
    """Every table but `runs` equal; floats within `float_tolerance` (means and slopes sum in an
    order DuckDB chooses, so a recomputation over another set of rows may differ in the last bit)."""
    first, second = tables(a), tables(b)
    assert set(first) == set(second)
    for name in first:
        if name == "runs":
            continue
        if float_tolerance == 0.0:
            assert first[name].equals(second[name]), name
            continue
        left, right = pl.from_arrow(first[name]), pl.from_arrow(second[name])
        assert left.schema == right.schema and left.height == right.height, name
        for column, dtype in left.schema.items():
            if dtype.is_float():
                diff = (left[column] - right[column]).abs().fill_nan(0.0).max()
                assert left[column].is_null().equals(right[column].is_null()), (name, column)
                assert diff is None or diff <= float_tolerance, (name, column, diff)
            else:
                assert left[column].equals(right[column]), (name, column)


# --- new tables ----------------------------------------------------------------------------------


def test_patients_and_encounters_come_from_context_facts(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    assert frame(db, "SELECT patient_id, sex, birth_year, encounters FROM patients").rows() == [
        ("p1", "female", 1950, 1), ("p2", None, None, 1)]  # p2's birth year was entered in error
    encounters = frame(db, "SELECT encounter_id, patient_id, encounter_class, admitted_ms, discharged_ms, ward, "
                           "ward_moves FROM encounters")
    assert encounters.rows() == [("e1", "p1", "inpatient", T0 - HOUR_MS, T0 + 10 * 60_000, "ICU", 2),
                                 ("e2", "p2", None, None, None, None, 0)]


def test_two_patients_encounters_sharing_an_id_stay_two_rows_each_with_its_own_stay(settings):
    """Encounter ids are unique only within a patient: p1's CDC visit number "45" and p2's FHIR Encounter
    whose identifier (of another system, say an account number) is also "45". Keyed by encounter id alone,
    one row said p1 (the first sorted) with p2's later admission, p2's discharge and p2's ward."""
    def stay(patient, source, admitted_ms, ward, discharged_ms):
        events = [ctx(f"{patient}:adm", codes.ADMISSION, admitted_ms, text="inpatient", patient=patient,
                      encounter="45"),
                  ctx(f"{patient}:loc", codes.LOCATION, admitted_ms, text=ward, patient=patient, encounter="45")]
        if discharged_ms is not None:
            events.append(ctx(f"{patient}:dis", codes.DISCHARGE, discharged_ms, patient=patient, encounter="45"))
        return [dataclasses.replace(e, source=source) for e in events]
    p1 = stay("p1", Source.CDC, T0 - 2 * HOUR_MS, "ward 7", None)  # still admitted
    p2 = stay("p2", Source.FHIR, T0 - HOUR_MS, "ICU", T0 + HOUR_MS)
    write(settings.archive_dir, "canonical", "s1", canonical({(0, 0): [A1, *p1], (1, 0): [D1, *p2]}))
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    rows = frame(db, "SELECT encounter_id, patient_id, admitted_ms, discharged_ms, ward, ward_moves, "
                     "first_effective_ms, last_effective_ms FROM encounters").rows()
    assert rows == [("45", "p1", T0 - 2 * HOUR_MS, None, "ward 7", 1, T0 - 2 * HOUR_MS, T0 - 2 * HOUR_MS),
                    ("45", "p2", T0 - HOUR_MS, T0 + HOUR_MS, "ICU", 1, T0 - HOUR_MS, T0 + HOUR_MS)]
    assert frame(db, "SELECT patient_id, encounters FROM patients").rows() == [("p1", 1), ("p2", 1)]


def test_observations_exclude_context_facts(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    for table in ("observations", "observation_versions"):
        systems = frame(db, f"SELECT DISTINCT code_system FROM {table}")["code_system"].to_list()
        assert systems == ["http://loinc.org"], table
    assert frame(db, "SELECT count(*) AS n FROM canonical_events WHERE code_system = "
                     f"'{codes.CONTEXT}'")["n"][0] == 8  # kept in the raw event table


def test_a_gap_the_subscription_watcher_published_again_after_a_kill_is_one_row_incremental_or_full(settings):
    """The watcher, SIGKILLed after publishing a gap but before its commit, publishes the same record (same
    deterministic id) again at a later offset. The gaps table kept both (deduplicated by Kafka position only):
    the analyst saw two gaps where the FHIR server lost one run of notifications."""
    from streams.archiver import rows_for
    from streams.archiver import RawRecord
    from streams.subscriptions import record_id

    gap = {"id": record_id("sub-1", "gap", 5, 6), "subscription": "sub-1", "kind": "gap", "first_missing": 5,
           "last_missing": 6, "detected_at_ms": T0, "last_seen_event_number": 7}
    other = gap | {"id": record_id("sub-1", "gap", 9, 9), "first_missing": 9, "last_missing": 9}

    def gap_rows(*records: tuple[int, dict]) -> list[dict]:
        return [row.values for offset, value in records for row in rows_for("gaps", RawRecord(
            "t.fhir.gaps", 0, offset, T0, b"sub-1", orjson.dumps(value)))]

    stage1(settings.archive_dir)
    write(settings.archive_dir, "gaps", "g1", gap_rows((0, gap)))
    run_nightly(settings, **STANDINS)  # the first night saw the first copy
    write(settings.archive_dir, "gaps", "g2", gap_rows((1, gap), (2, other)))  # the copy after the kill
    full = twin(settings)
    incremental = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    rebuilt = Path(run_nightly(full, full=True, **STANDINS)["duckdb_path"])
    for db in (incremental, rebuilt):
        assert frame(db, 'SELECT kafka_offset, json_extract_string(record_json, \'$.first_missing\') AS first '
                         'FROM gaps ORDER BY kafka_offset').rows() == [(0, "5"), (2, "9")]


def test_shadow_scores_gaps_and_labels_are_tables(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    assert frame(db, "SELECT DISTINCT model_version FROM scores_shadow").rows() == [("cand",)]
    assert frame(db, "SELECT subscription, gap_kind FROM gaps").rows() == [("sub-1", "gap")]
    labels = frame(db, 'SELECT patient_id, "offset", label FROM labels ORDER BY "partition", "offset"')
    assert labels.height == len(POINTS)
    assert set(labels["label"].to_list()) == {0}  # nothing in the scenario deteriorates


# --- catalog -------------------------------------------------------------------------------------


def test_every_table_and_column_is_documented(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    with duckdb.connect(str(db), read_only=True) as con:
        undocumented_tables = con.execute("SELECT table_name FROM duckdb_tables() WHERE comment IS NULL "
                                          "OR comment LIKE 'undocumented%'").fetchall()
        undocumented = con.execute("SELECT c.table_name, c.column_name FROM duckdb_columns() c "
                                   "WHERE c.schema_name = 'main' AND NOT c.internal "
                                   "AND (c.comment IS NULL OR c.comment LIKE 'undocumented%')").fetchall()
        values = dict(con.execute("SELECT table_name, comment FROM duckdb_columns() "
                                  "WHERE column_name = 'value' AND schema_name = 'main'").fetchall())
        tables_seen = con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0]
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert undocumented_tables == []
    assert undocumented == []  # the views' columns too (before, none had a comment)
    assert "raw bytes" in values["dead_letters"] and "raw bytes" in values["unreadable_records"]  # not a canonical value
    assert "probability" in values["patient_timeline"]
    assert tables_seen == 18
    assert {"patient_timeline", "alert_outcomes", "model_performance_daily"} <= views


def test_the_patient_timeline_shows_a_measurement_both_feeds_carried_once(settings):
    """The same heart rate through CDC and FHIR is one measurement: `observations` keeps both rows (the
    copy with outcome duplicate, documented), but the timeline an analyst reads shows it once."""
    twin = dataclasses.replace(B1, source=Source.FHIR, fact_id="fhir:Observation/b:8867-4",
                               provenance={"resource": "Observation/b"})
    write(settings.archive_dir, "canonical", "s1", canonical(STAGE1 | {(0, 2): [twin]}))
    run_nightly(settings)  # the real rules (the stand-ins know no cross-source copy)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        copies = con.execute("SELECT outcome FROM observations WHERE effective_ms = ? ORDER BY outcome",
                             [B1.effective_ms]).fetchall()
        shown = con.execute("SELECT count(*) FROM patient_timeline WHERE kind = 'observation' AND time_ms = ?",
                            [B1.effective_ms]).fetchone()[0]
    assert copies == [("accepted",), ("duplicate",)]
    assert shown == 1


def test_the_patient_timeline_marks_a_late_measurement(settings):
    """A late event (beyond the lateness bound) stays in observations, at its clinical time, but the stream
    never used it: the timeline an analyst reads around an alert must not pass it for what the scores saw."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)  # C1: 70 min beyond the bound once B1 is in
    run_nightly(settings)
    db = settings.duckdb_path
    late = frame(db, f"SELECT item, value, detail FROM patient_timeline WHERE time_ms = {C1.effective_ms}")
    assert late.rows() == [(codes.HEART_RATE, 70.0, "late: never in the stream's state")]
    assert frame(db, "SELECT count(*) FROM patient_timeline WHERE detail LIKE '%late%'").item() == 1


@pytest.mark.parametrize("table, column, values", [
    ("scores", "tier", get_args(scoring.Tier)), ("scores_shadow", "path", get_args(scoring.ScoringPath)),
    ("scores", "path", get_args(scoring.ScoringPath)), ("alerts", "kind", get_args(alerting.Kind)),
    ("alerts", "status", get_args(alerting.Status)), ("canonical_events", "status", [s.value for s in Status]),
])
def test_an_enumerated_column_comment_names_every_value_the_stream_writes(table, column, values):
    comment = column_comment(table, column)  # what an analyst reads in duckdb_columns()
    assert [v for v in values if not re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", comment)] == [], comment


LOW_BP = CanonicalEvent(patient_id="p1", code=codes.SYSTOLIC_BP, value=85.0, unit="mm[Hg]",
                        effective_ms=T0 + 3 * HOUR_MS, issued_ms=T0 + 3 * HOUR_MS, status=Status.FINAL,
                        source=Source.CDC, fact_id="sbp", version=1)
ALERT = {"alert_id": "al1", "kind": "open", "tier": "high", "patient_id": "p1", "encounter_id": "e1",
         "scoring_ms": T0, "model_version": "m1", "path": "model", "resource_json": "{}"}


def deteriorate(archive: Path) -> None:
    """p1's systolic BP drops to 85 three hours after T0; the stream scores and alerts right then."""
    write(archive, "canonical", "s3", canonical({(0, 5): [LOW_BP]}))
    point = {"snapshot_id": "s0-5", "patient_id": "p1", "scoring_ms": LOW_BP.effective_ms, "partition": 0,
             "offset": 5, "idx": 0, "trigger": "vitals"}
    write(archive, "features", "s3", [point | {"features_json": "{}"} | kafka(0, 9)])
    write(archive, "scores", "s3", [point | {"model_version": "m1", "path": "model", "probability": 0.9,
                                             "news2": 5, "tier": "high", "rationale_json": "[]"} | kafka(0, 9)])
    write(archive, "alerts", "s3", [ALERT | {"alert_id": "al2", "scoring_ms": LOW_BP.effective_ms} | kafka(0, 1)])


def nightly_after_deterioration(settings) -> Path:
    """The rebuilt file of both stages plus p1's deterioration (a low BP after alert al1)."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)
    return Path(run_nightly(settings, **STANDINS)["duckdb_path"])


def test_labels_predict_the_first_onset_and_exclude_the_already_deteriorated(settings):
    db = nightly_after_deterioration(settings)
    p1 = frame(db, "SELECT scoring_ms, label, at_risk, onset_ms FROM labels WHERE patient_id = 'p1' "
                   'ORDER BY "partition", "offset"')
    before = [(T0, 1, True, LOW_BP.effective_ms)] + [(B1.effective_ms, 1, True, LOW_BP.effective_ms)] * 3
    # once the low BP is known the patient is deteriorated: no onset left to predict
    assert p1.rows() == before + [(LOW_BP.effective_ms, 0, False, None)]
    p2 = frame(db, "SELECT DISTINCT label, at_risk, onset_ms FROM labels WHERE patient_id = 'p2'")
    assert p2.rows() == [(0, True, None)]
    onsets = frame(db, "SELECT patient_id, onset_ms, criterion, positive_points FROM label_events")
    assert onsets.rows() == [("p1", LOW_BP.effective_ms, "systolic BP <= 90", 4)]


def test_alert_outcomes_are_judged_against_the_onset_label(settings):
    db = nightly_after_deterioration(settings)
    outcome = frame(db, "SELECT alert_id, at_risk, outcome_followed, outcome_criterion, lead_time_h "
                        "FROM alert_outcomes ORDER BY alert_id")
    assert outcome.rows() == [
        ("al1", True, True, "systolic BP <= 90", 3.0),  # 3 h before the onset
        ("al2", False, None, None, None),  # raised at the onset itself: nothing left to predict
    ]


def test_alert_outcomes_say_which_alerts_a_correction_withdrew(settings):
    """An alert later withdrawn (entered-in-error: its basis was wrong) did not stand: counting opened
    alerts that stood needs it marked. Before, the view had no status, original_alert_id or withdrawn,
    so a withdrawn open looked like any other (the corrections were only in the alerts table)."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)
    fix = {"kind": "correction", "tier": "high", "patient_id": "p1", "encounter_id": "e1", "model_version": "m1",
           "path": "model", "resource_json": "{}"}
    write(settings.archive_dir, "alerts", "s5", [
        fix | {"alert_id": "c1", "original_alert_id": "al1", "status": "entered-in-error", "scoring_ms": T0} | kafka(0, 3),
        fix | {"alert_id": "c2", "original_alert_id": "al2", "status": "amended",
               "scoring_ms": LOW_BP.effective_ms} | kafka(0, 4)])
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    rows = frame(db, "SELECT alert_id, status, original_alert_id, withdrawn FROM alert_outcomes ORDER BY alert_id")
    assert rows.rows() == [("al1", None, None, True), ("al2", None, None, False),
                           ("c1", "entered-in-error", "al1", None), ("c2", "amended", "al2", None)]
    stood = frame(db, "SELECT alert_id FROM alert_outcomes WHERE kind = 'open' AND NOT withdrawn")
    assert stood.rows() == [("al2",)]


def test_daily_performance_counts_only_at_risk_points(settings):
    db = nightly_after_deterioration(settings)
    day = frame(db, "SELECT scored_points, at_risk_points, positives, alerts_opened FROM model_performance_daily")
    # 7 scored points, the one after the low BP is not at risk; p1's 4 earlier points precede the onset
    assert day.rows() == [(7, 6, 4, 2)]


def test_daily_performance_counts_every_score_and_alert_opened(settings):
    """A rule-path point without NEWS2 (an input not charted: no model version, no probability) and the
    alert opened there are in the day's volume and alert burden, under news2-rule. Before, the view counted
    only points with NEWS2, so those alerts vanished from alerts_opened (3 of the demo's 17 opened)."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)
    _, scores = point_rows([(0, 1), (0, 2), (0, 4), (1, 0), (1, 1)])
    rule_path = {"model_version": None, "path": "rule", "probability": None, "news2": None, "tier": "high"}
    write(settings.archive_dir, "scores", "s2", [s | rule_path if s["patient_id"] == "p2" else s for s in scores])
    write(settings.archive_dir, "alerts", "s4", [ALERT | {"alert_id": "al3", "patient_id": "p2", "encounter_id": "e2",
                                                          "model_version": None, "path": "rule"} | kafka(0, 2)])
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    days = frame(db, "SELECT model_version, scored_points, patients, at_risk_points, alerts_opened, "
                     "alerts_per_100_patients, auroc FROM model_performance_daily ORDER BY model_version")
    assert days.rows() == [("m1", 5, 1, 4, 2, 200.0, None), ("news2-rule", 2, 1, 0, 1, 100.0, None)]
    totals = frame(db, "SELECT (SELECT count(*) FROM scores), (SELECT count(*) FROM alerts WHERE kind = 'open')")
    assert totals.rows() == [(7, 3)]


def test_daily_auroc_matches_sklearn(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    # a mix of classes so AUROC is defined, and one point already deteriorated (left out of the AUROC)
    with duckdb.connect(str(db)) as con:
        con.execute('UPDATE labels SET label = CASE WHEN "offset" IN (1, 4) THEN 1 ELSE 0 END, '
                    'at_risk = NOT ("partition" = 0 AND "offset" = 2)')
        rows = con.execute('SELECT s.probability, l.label FROM scores s JOIN labels l '
                           'USING (patient_id, scoring_ms, "partition", "offset") WHERE l.at_risk').fetchall()
        (auroc,) = con.execute("SELECT auroc FROM model_performance_daily").fetchone()
    assert len(rows) == len(POINTS) - 1
    assert auroc == pytest.approx(roc_auc_score([r[1] for r in rows], [r[0] for r in rows]))


# --- the swap ------------------------------------------------------------------------------------


def test_a_session_killed_before_its_checkpoint_does_not_break_the_next_file(settings):
    """A write to the live file (batch/retrain.py record_in_runs) killed before DuckDB checkpoints
    leaves <file>.wal behind; the next nightly replaces the file, and the new file must open."""
    stage1(settings.archive_dir)
    run_nightly(settings, **STANDINS)
    killed = f"""
import duckdb, os
con = duckdb.connect({str(settings.duckdb_path)!r})
con.execute("SET checkpoint_threshold = '1GB'")
con.execute("UPDATE runs SET model_version = 'v-killed'")
os._exit(9)
"""
    subprocess.run([sys.executable, "-c", killed], check=False)
    assert settings.duckdb_path.with_name(settings.duckdb_path.name + ".wal").exists()
    run_nightly(settings, full=False, **STANDINS)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        versions = con.execute("SELECT model_version FROM runs ORDER BY started_at").fetchall()
    assert versions == [("v-killed",), (None,)]  # the killed session's committed update is carried over


def test_a_second_nightly_started_while_one_runs_stops_instead_of_racing_it(settings):
    """The scheduler's run and one started by hand (`docker compose run --rm nightly`) must not both
    build and swap the file: the second stops at once and says why; the first completes."""
    import threading

    from batch.nightly import NightlyBusy

    stage1(settings.archive_dir)
    inside, release = threading.Event(), threading.Event()

    def slow_features_at(*args, **kwargs):
        inside.set()
        assert release.wait(60), "the test never let the first run go on"
        return STANDINS["features_at"](*args, **kwargs)

    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(
        run_nightly(settings, features_at=slow_features_at, classify_events=STANDINS["classify_events"])))
    runner.start()
    try:
        assert inside.wait(60)
        with pytest.raises(NightlyBusy, match="another nightly run"):
            run_nightly(settings, **STANDINS)
    finally:
        release.set()
        runner.join(60)
    assert not runner.is_alive(), "the first run did not finish within 60 s of its release"
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:  # the first run completed, alone
        assert con.execute("SELECT run_id FROM runs").fetchall() == [(first["run_id"],)]
    run_nightly(settings, **STANDINS)  # and once it is done, the next run goes ahead


def test_a_nightly_started_while_a_train_records_its_decision_waits_for_it(settings):
    """`batch train` holds the file's lock for the seconds it takes to record its gate decision; the
    scheduler's nightly starting then must not fail for the night, as it does for another nightly."""
    import threading
    import time

    from batch.nightly import TRAIN, writer_lock

    stage1(settings.archive_dir)
    holding, release = threading.Event(), threading.Event()
    released_at: list[float] = []
    steps: list[float] = []

    def train_records():
        with writer_lock(settings.duckdb_path, TRAIN):
            holding.set()
            release.wait(60)
            released_at.append(time.monotonic())  # still held: the nightly's steps must all come later

    recorder = threading.Thread(target=train_records)
    recorder.start()
    try:
        assert holding.wait(60)
        threading.Timer(1.0, release.set).start()
        result = run_nightly(settings, report=False, progress=lambda step: steps.append(time.monotonic()),
                             **STANDINS)
    finally:
        release.set()
        recorder.join(60)
    # it waited for the train's lock (a nightly that took no lock, or another file's, also gets its row)
    assert released_at and steps and steps[0] > released_at[0]
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [(result["run_id"],)]


def test_the_build_file_of_a_killed_run_is_removed_by_the_next_run(settings):
    """A nightly killed mid-write (its container stopped) leaves a whole new DuckDB file next to the
    live one; on the shared data volume it would stay for good."""
    stage1(settings.archive_dir)
    target = settings.duckdb_path
    target.parent.mkdir(parents=True, exist_ok=True)
    killed = [target.with_name(f".{target.name}.deadbeef.building"),
              target.with_name(f".{target.name}.deadbeef.building.wal")]
    for path in killed:
        path.write_bytes(b"half a database")
    run_nightly(settings, **STANDINS)
    assert sorted(p.name for p in target.parent.iterdir() if "building" in p.name) == []
    assert target.exists()


# --- incremental ---------------------------------------------------------------------------------


def test_incremental_after_new_parts_equals_full_rebuild(settings):
    stage1(settings.archive_dir)
    first = run_nightly(settings, full=False, **STANDINS)
    assert first["new_parts"] == 3
    stage2(settings.archive_dir)
    second = run_nightly(settings, full=False, **STANDINS)
    assert second["new_parts"] == 7
    assert second["recomputed_patients"] == 2
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def test_incremental_only_recomputes_touched_patients(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    more = CanonicalEvent(patient_id="p2", code=codes.SPO2, value=91.0, unit="%", effective_ms=T0 + HOUR_MS,
                          issued_ms=T0 + HOUR_MS, status=Status.FINAL, source=Source.FHIR, fact_id="E", version=1)
    write(settings.archive_dir, "canonical", "s3", canonical({(1, 2): [more]}))
    result = run_nightly(settings, full=False, **STANDINS)
    assert (result["new_parts"], result["recomputed_patients"]) == (1, 1)
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def test_a_differing_copy_archived_on_a_later_night_fails_that_night(settings):
    stage1(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    features, _ = point_rows([(0, 0)])
    changed = features[0] | {"features_json": orjson.dumps({"heart_rate_last_24h": 999.0}).decode()} | kafka(0, 9)
    write(settings.archive_dir, "features", "restart", [changed])
    second = run_nightly(settings, full=False, **STANDINS)
    assert (second["parity"]["points_checked"], second["parity_ok"]) == (0, False)  # nothing else checked
    copies = 'SELECT "offset", feature, online FROM parity_report WHERE "check" = \'copies\''
    assert frame(settings.duckdb_path, copies).rows() == [(0, "heart_rate_last_24h", 80.0)]
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def test_an_earlier_copy_of_a_snapshot_archived_on_a_later_night_is_kept_as_in_full(settings):
    """A restart re-emitted snapshot s0-0 (Kafka offset 5, another value) and that copy reached the
    archive first; the original (offset 0) lands the next night. A full build keeps the first copy in
    Kafka order and checks it against the offline features; the incremental run kept the copy it had,
    so features_online and parity_report said 80 where --full says 999 (a mismatch it never reported)."""
    stage1(settings.archive_dir)
    features, _ = point_rows([(0, 0)])
    def copy(value: float, position: int) -> dict:
        return features[0] | {"features_json": orjson.dumps({"heart_rate_last_24h": value}).decode()} | kafka(0, position)
    write(settings.archive_dir, "features", "restart", [copy(80.0, 5)])
    run_nightly(settings, full=False, **STANDINS)
    write(settings.archive_dir, "features", "original", [copy(999.0, 0)])
    later = run_nightly(settings, full=False, **STANDINS)
    assert later["parity"]["per_feature_mismatches"] == {"heart_rate_last_24h": 1}  # s0-0 checked again: 999 vs 80
    query = 'SELECT heart_rate_last_24h FROM features_online WHERE snapshot_id = \'s0-0\''
    assert frame(settings.duckdb_path, query).item() == 999.0
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def test_running_incremental_twice_is_idempotent(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    before = tables(settings.duckdb_path)
    again = run_nightly(settings, full=False, **STANDINS)
    assert (again["new_parts"], again["recomputed_patients"]) == (0, 0)
    after = tables(settings.duckdb_path)
    for name in before:
        if name != "runs":
            assert before[name].equals(after[name]), name
    runs = frame(settings.duckdb_path, "SELECT \"full\", new_parts FROM runs ORDER BY started_at")
    assert runs.rows() == [(True, 10), (False, 0)]


def test_incremental_with_the_real_recomputation_equals_full(settings):
    stage1(settings.archive_dir)
    run_nightly(settings, full=False)
    stage2(settings.archive_dir)
    run_nightly(settings, full=False)
    full = twin(settings)
    run_nightly(full, full=True)
    assert_same_tables(settings.duckdb_path, full.duckdb_path, float_tolerance=1e-9)


def test_events_archived_after_the_points_that_saw_them_are_recomputed(settings):
    """The archiver may land a features part before the canonical part its point saw."""
    stage1(settings.archive_dir)
    newer = hr("E", 1, B1.effective_ms, 100.0)  # ties with B on time; the greater fact id is "last"
    features, scores = point_rows([(0, 2)])
    write(settings.archive_dir, "features", "early", features)
    write(settings.archive_dir, "scores", "early", scores)
    run_nightly(settings, full=False, **STANDINS)
    query = 'SELECT heart_rate_last_24h FROM features_offline WHERE "offset" = 2'
    assert frame(settings.duckdb_path, query).item() == 90.0  # E is not in the archive yet
    write(settings.archive_dir, "canonical", "late", canonical({(0, 2): [newer]}))
    later = run_nightly(settings, full=False, **STANDINS)
    assert later["parity"]["points_checked"] == 1  # only the point at (0, 2) is checked again
    assert frame(settings.duckdb_path, query).item() == 100.0
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def test_offline_features_are_taken_at_the_snapshots_own_position(settings):
    """A snapshot's archived idx is used as is, even for a point the batch's rule does not derive."""
    first = hr("X", 1, T0, 80.0, patient="p3")
    later = hr("Z", 1, T0 + 10 * 60_000, 70.0, patient="p3")
    corrected = hr("X", 2, T0, 90.0, Status.CORRECTED, patient="p3")  # later in the same message
    write(settings.archive_dir, "canonical", "p3", canonical({(2, 0): [first, later, corrected]}))
    point = {"snapshot_id": "not-derived", "patient_id": "p3", "scoring_ms": T0, "partition": 2, "offset": 0,
             "idx": 0, "trigger": "vitals"}
    write(settings.archive_dir, "features", "p3",
          [point | {"features_json": orjson.dumps({"heart_rate_last_24h": 80.0}).decode()} | kafka(0, 0)])
    result = run_nightly(settings)  # the real recomputation
    offline = frame(settings.duckdb_path, "SELECT heart_rate_last_24h FROM features_offline")
    assert offline.rows() == [(80.0,)]  # before the correction, as the stream saw it
    assert "heart_rate_last_24h" not in result["parity"]["per_feature_mismatches"]
    assert result["parity"]["points_online_only"] == 1  # the point itself is what parity blames


def snapshot_row(settings: Settings, point: dict, seen: list[CanonicalEvent], position: int) -> dict:
    """An archived snapshot of `point` with the features the stream computes after `seen`."""
    state = apply_batch(None, seen, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
                        dedupe_horizon_ms=settings.dedupe_horizon_s * 1000,
                        cross_source_tolerance=settings.cross_source_tolerance).state
    features = compute_features(state, point["scoring_ms"])
    return point | {"features_json": orjson.dumps(features).decode()} | kafka(0, position)


# one CDC row at T0: heart rate and SpO2, one run of two events, so one scoring point after both
HR_P3 = hr("HR1", 1, T0, 80.0, patient="p3")
SPO2_P3 = hr("SP1", 1, T0, 97.0, patient="p3", code=codes.SPO2)


def derived_point(settings: Settings, messages: dict) -> dict:
    events = pl.DataFrame(canonical(messages))
    [point] = scoring_points(events, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
                             min_interval_ms=settings.scoring_min_interval_s * 1000).to_dicts()
    return point


def test_a_snapshot_taken_mid_run_fails_parity_even_with_the_right_id(settings):
    """The stream scores after the heart rate but before the SpO2 of the same run, and says so."""
    messages = {(2, 0): [HR_P3, SPO2_P3]}
    write(settings.archive_dir, "canonical", "p3", canonical(messages))
    point = derived_point(settings, messages)
    assert (point["offset"], point["idx"]) == (0, 1)  # the rule scores after the whole run
    early = point | {"idx": 0}
    write(settings.archive_dir, "features", "p3", [snapshot_row(settings, early, [HR_P3], 0)])
    result = run_nightly(settings, report=False)  # the real recomputation
    assert not result["parity_ok"]
    # the batch recomputes at its own position (SpO2 seen), not where the stream claims it scored
    assert frame(settings.duckdb_path, "SELECT spo2_last_24h FROM features_offline").item() == 97.0
    report = frame(settings.duckdb_path, "SELECT feature, online, offline, detail FROM parity_report "
                                         "WHERE \"check\" = 'point' OR feature = 'spo2_last_24h' ORDER BY \"check\"")
    assert report.rows() == [
        ("spo2_last_24h", None, 97.0, None),
        (None, None, None, "moved: the stream scored at (partition, offset, idx) (2, 0, 0), the rule at (2, 0, 1)")]


# p's point at (0, 0), which the stream never published; q's at (0, 1), which it did
P_AT_0 = hr("P1", 1, T0, 80.0, patient="p")
Q_AT_1 = hr("Q1", 1, T0 + 60_000, 70.0, patient="q")


def archive_q(settings: Settings, name: str) -> None:
    write(settings.archive_dir, "canonical", name, canonical({(0, 1): [Q_AT_1]}))
    write(settings.archive_dir, "features", name,
          [snapshot_row(settings, derived_point(settings, {(0, 1): [Q_AT_1]}), [Q_AT_1], 0)])


def assert_offline_only_as_in_full(settings: Settings) -> None:
    full = twin(settings)
    run_nightly(full, full=True, report=False)
    query = 'SELECT "check", patient_id, detail FROM parity_report'
    assert frame(settings.duckdb_path, query).rows() == [
        ("point", "p", "offline only: the rule scores here, the stream did not")]
    assert_same_tables(settings.duckdb_path, full.duckdb_path, float_tolerance=1e-9)


def test_a_point_the_stream_never_published_stops_being_pending_in_incremental_runs(tmp_path):
    """Night 1: p's point is pending (no snapshot archived yet). Night 2: a snapshot after it on the
    same partition is archived, of another patient: p's point is now 'offline only', as in --full."""
    settings = Settings(data_dir=tmp_path / "data", allowed_lateness_s=3600, scoring_min_interval_s=0)
    write(settings.archive_dir, "canonical", "n1", canonical({(0, 0): [P_AT_0]}))
    first = run_nightly(settings, full=False, report=False)
    assert (first["parity"]["points_pending"], first["parity_ok"]) == (1, True)
    archive_q(settings, "n2")
    assert not run_nightly(settings, full=False, report=False)["parity_ok"]
    assert_offline_only_as_in_full(settings)


def test_a_point_behind_another_patients_snapshot_is_not_pending(tmp_path):
    """Night 2 recomputes only p (its event's part landed late): q's snapshot of night 1, after p's
    point on the same partition, still shows the stream went past it."""
    settings = Settings(data_dir=tmp_path / "data", allowed_lateness_s=3600, scoring_min_interval_s=0)
    archive_q(settings, "n1")
    run_nightly(settings, full=False, report=False)
    write(settings.archive_dir, "canonical", "n2", canonical({(0, 0): [P_AT_0]}))
    second = run_nightly(settings, full=False, report=False)
    assert (second["recomputed_patients"], second["parity_ok"]) == (1, False)
    assert_offline_only_as_in_full(settings)


def test_a_file_from_before_the_onset_label_is_rebuilt_in_full(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    with duckdb.connect(str(settings.duckdb_path)) as con:  # the shape an older version wrote
        con.execute("ALTER TABLE labels DROP COLUMN at_risk")
        con.execute("ALTER TABLE labels DROP COLUMN onset_ms")
        con.execute("ALTER TABLE features_online DROP COLUMN idx")
        con.execute("ALTER TABLE canonical_events DROP COLUMN supersedes")
    again = run_nightly(settings, full=False, **STANDINS)
    assert again["recomputed_patients"] == 2
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


# columns an older version's file lacks: a feature appended to schemas/features.py is a new column of
# both feature tables; points named by snapshot_id (one message's two points at one time were not told
# apart) added snapshot_id and idx to features_offline and labels
FIO2_FEATURES = ("fio2_last_24h", "fio2_time_since_last_s_24h")
POINT_NAME = ("snapshot_id", "idx")


@pytest.mark.parametrize("table, columns", [("features_offline", FIO2_FEATURES), ("features_online", FIO2_FEATURES),
                                            ("features_offline", POINT_NAME), ("labels", POINT_NAME)])
def test_a_file_an_older_version_wrote_is_rebuilt_in_full(settings, table, columns):
    """An incremental run on a file without columns this version writes rebuilds everything, or
    features_offline and labels would keep the old file's rows and columns for ever (and features_online
    would get a new feature after the others)."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    with duckdb.connect(str(settings.duckdb_path)) as con:  # the shape the older version wrote
        for column in columns:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    again = run_nightly(settings, full=False, **STANDINS)
    assert again["recomputed_patients"] == 2
    full = twin(settings)
    run_nightly(full, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, full.duckdb_path)


def column_types(path: Path, table: str) -> dict[str, str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ?",
                                [table]).fetchall())


def test_every_feature_has_the_same_sql_type_online_and_offline_the_one_its_spec_declares(settings):
    """An analyst comparing the planes met features_online.news2 DOUBLE next to features_offline.news2
    BIGINT (and so for the counts, the NEWS2 sub-scores, on_oxygen and qSOFA): a type mismatch in a UNION
    or a silent cast in a join. Every feature column now has its spec's type in both tables, after a first
    run and after an incremental one that appends to what the first stored; labels.news2 too, like
    scores.news2."""
    from schemas.features import FEATURE_NAMES, FEATURE_TYPES

    declared = {name: {"integer": "BIGINT", "real": "DOUBLE"}[FEATURE_TYPES[name]] for name in FEATURE_NAMES}
    assert {"news2", "qsofa", "vitals_count_6h", "on_oxygen"} <= {n for n, t in declared.items() if t == "BIGINT"}

    def assert_declared_types() -> None:
        online = column_types(settings.duckdb_path, "features_online")
        offline = column_types(settings.duckdb_path, "features_offline")
        assert {n: online[n] for n in FEATURE_NAMES} == declared
        assert {n: offline[n] for n in FEATURE_NAMES} == declared
        assert column_types(settings.duckdb_path, "labels")["news2"] == declared["news2"]
        assert column_types(settings.duckdb_path, "scores")["news2"] == declared["news2"]

    stage1(settings.archive_dir)
    run_nightly(settings, report=False)  # the real recomputation
    assert_declared_types()
    stage2(settings.archive_dir)
    run_nightly(settings, full=False, report=False)  # the first run's rows read back, the new ones appended
    assert_declared_types()
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:  # what an analyst writes
        both = con.execute("SELECT typeof(news2) FROM (SELECT news2 FROM features_online "
                           "UNION ALL SELECT news2 FROM features_offline) GROUP BY ALL").fetchall()
    assert both == [("BIGINT",)]


def test_a_fraction_in_a_whole_number_feature_is_refused_not_truncated():
    """Storing NEWS2 as BIGINT must not turn a published 6.5 (a plane computing it wrongly) into 6."""
    from batch.rebuild import with_feature_types

    typed = with_feature_types(pl.DataFrame({"news2": [7.0, None], "spo2_last_24h": [97, 95]}), "features_online")
    assert typed.schema == {"news2": pl.Int64, "spo2_last_24h": pl.Float64}
    assert typed["news2"].to_list() == [7, None]
    with pytest.raises(ValueError, match=r"features_online\.news2 holds a fraction"):
        with_feature_types(pl.DataFrame({"news2": [6.5]}), "features_online")


# --- two scoring points of one message at one time -----------------------------------------------


def archive_the_stream(settings: Settings, messages: list[list[CanonicalEvent]]) -> None:
    """The real patient worker over `messages` (partition 0, one per offset) and what the archiver
    would store of its input and outputs."""
    from streams.archiver import RawRecord, rows_for, write_part
    from streams.patient_agent import CanonicalMessage, PatientProcessor
    from streams.scoring import Scorer
    from schemas.canonical import encode_batch

    processor = PatientProcessor(settings, Scorer(settings.model_dir, settings))  # no model: the NEWS2 rule
    records, rows = {}, {"canonical": [], "features": [], "scores": [], "alerts": []}
    for offset, batch in enumerate(messages):
        value = encode_batch(batch)
        rows["canonical"] += [r.values for r in rows_for("canonical", RawRecord("c", 0, offset, T0, b"p", value))]
        new, out = processor.process([CanonicalMessage(0, offset, value)], records.get)
        records.update(new)
        for kind, published in (("features", out.features), ("scores", out.scores), ("alerts", out.alerts)):
            for _, record, *_ in published:
                rows[kind] += [r.values for r in rows_for(kind, RawRecord(kind, 0, len(rows[kind]), T0, b"p", record))]
    for kind, kind_rows in rows.items():
        write_part(settings.archive_dir, kind, "2024-06-10", kind_rows)


def test_two_points_of_one_message_at_one_time_are_two_rows_in_every_table_and_the_export(tmp_path):
    """One FHIR bundle: the 10:00 round, then a BP of 80 taken at 09:58 (back-charted, re-scored at the
    clock: schemas/cadence.py). The worker scores twice at 10:00 in that one message, a NEWS2 of 0 and
    then a medium alert: the two points share patient, time, partition and offset and differ in idx
    and snapshot_id. features_offline and labels held one row per (patient, time, partition, offset)
    point or two rows no column told apart, so every join to features_online or scores on them
    doubled rows, and the export's point_id was the same for both points."""
    from pydantic import SecretStr

    from batch.dataset import label_summary
    from batch.export import export_deidentified

    settings = Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "no-models", allowed_lateness_s=3600,
                        deid_secret=SecretStr("wardwatch-test-secret-7Qx2"))
    normal = [hr(f, 1, T0, v, code=c) for f, v, c in (("hr", 80.0, codes.HEART_RATE), ("rr", 16.0, codes.RESP_RATE))]
    low_bp = hr("sbp", 1, T0 - 2 * 60_000, 80.0, code=codes.SYSTOLIC_BP)
    later = [hr("hr2", 1, T0 + 4 * HOUR_MS, 90.0), hr("sbp2", 1, T0 + 4 * HOUR_MS, 120.0, code=codes.SYSTOLIC_BP)]
    archive_the_stream(settings, [[*normal, low_bp], later])
    result = run_nightly(settings, report=False)  # the real recomputation
    assert result["parity_ok"]
    online = frame(settings.duckdb_path, 'SELECT snapshot_id, idx, trigger FROM features_online WHERE "offset" = 0 '
                                         "ORDER BY idx")
    assert online.select("idx", "trigger").rows() == [(1, "vitals"), (2, "correction")]  # one key, two points

    out = tmp_path / "export"
    export_deidentified(settings, out)
    exported = {name: pl.read_parquet(out / f"{name}.parquet") for name in ("features_offline", "labels", "scores")}
    assert [exported[name]["point_id"].n_unique() for name in exported] == [3, 3, 3]
    assert exported["labels"].join(exported["features_offline"], on="point_id").height == 3
    assert exported["labels"].join(exported["scores"], on="point_id").height == 3
    # the training set (batch dataset's label counts, as batch train reads the points): one row per point
    assert label_summary(settings.duckdb_path, settings)["scoring_points"] == 3

    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        def rows(sql: str) -> list[tuple]:
            return con.execute(sql).fetchall()

        # each online point has its own offline row: the SBP of 80 only at the point that saw it
        assert rows("SELECT o.idx, f.idx, f.systolic_bp_last_24h FROM features_online o JOIN features_offline f "
                    'USING (snapshot_id) WHERE o."offset" = 0 ORDER BY o.idx') == [(1, 1, None), (2, 2, 80.0)]
        assert rows("SELECT count(*) FROM features_offline") == [(3,)]
        # one label per score, joined by the point's snapshot
        assert rows("SELECT count(*), count(DISTINCT snapshot_id) FROM labels") == [(3, 3)]
        assert rows("SELECT s.tier, l.idx FROM scores s JOIN labels l USING (snapshot_id) "
                    'WHERE s."offset" = 0 ORDER BY l.idx') == [("none", 1), ("medium", 2)]


# --- unreadable archive part files ---------------------------------------------------------------

DAY = "date=2024-06-10"


def damage_stage2(archive: Path) -> dict[str, bytes]:
    """Two of night 2's part files unreadable: one truncated (copied before it was complete), one
    garbage under the name (a disk error). Their bytes, by path relative to the archive."""
    truncated, garbage = f"canonical/{DAY}/part-s2.parquet", f"features/{DAY}/part-s2.parquet"
    whole = (archive / truncated).read_bytes()
    (archive / truncated).write_bytes(whole[: len(whole) // 2])
    (archive / garbage).write_bytes(b"\x00not parquet at all\x17" * 40)
    return {p: (archive / p).read_bytes() for p in (truncated, garbage)}


def test_an_unreadable_part_stops_the_nightly_naming_it_and_moves_nothing(settings):
    """Before, the night failed with polars' 'File out of specification' and no file name, every night."""
    stage1(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    stage2(settings.archive_dir)
    damaged = damage_stage2(settings.archive_dir)
    before = tables(settings.duckdb_path)

    with pytest.raises(UnreadableParts) as failed:
        run_nightly(settings, full=False, **STANDINS)

    message = str(failed.value)
    assert set(failed.value.parts) == set(damaged)
    for path in damaged:
        assert path in message and str(settings.archive_dir) not in message  # relative to the archive
    assert "--quarantine-unreadable" in message and "Nothing was written" in message
    assert not re.search(r"\bp[12]\b|\be[12]\b", message)  # no patient or encounter id
    assert {p: (settings.archive_dir / p).read_bytes() for p in damaged} == damaged  # nothing moved
    assert not (settings.archive_dir / QUARANTINE).exists()
    assert tables(settings.duckdb_path)["runs"].num_rows == before["runs"].num_rows == 1  # old file kept


def test_quarantine_sets_unreadable_parts_aside_and_later_nights_go_on_without_them(settings):
    stage1(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    stage2(settings.archive_dir)
    damaged = damage_stage2(settings.archive_dir)

    night2 = run_nightly(settings, full=False, quarantine=True, **STANDINS)

    assert (night2["quarantined_parts"], night2["quarantine_files"]) == (2, 2)
    assert night2["new_parts"] == 5  # stage 2's seven parts but the two set aside
    for path, content in damaged.items():  # kept byte for byte, at the same path under quarantine/
        assert not (settings.archive_dir / path).exists()
        assert (settings.archive_dir / QUARANTINE / path).read_bytes() == content
    # the same tables as a full build of the archive without them
    without = twin(settings)
    shutil.rmtree(without.archive_dir / QUARANTINE)
    run_nightly(without, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, without.duckdb_path)
    # the next nights, without the option, neither read nor trip on them; a full one counts them
    night3 = run_nightly(settings, full=False, **STANDINS)
    assert (night3["new_parts"], night3["quarantined_parts"], night3["quarantine_files"]) == (0, 0, 2)
    full = run_nightly(settings, full=True, **STANDINS)
    assert (full["quarantined_parts"], full["quarantine_files"]) == (0, 2)
    assert_same_tables(settings.duckdb_path, without.duckdb_path)
    runs = frame(settings.duckdb_path, 'SELECT "full", quarantined_parts, quarantine_files FROM runs '
                                       "ORDER BY started_at")
    assert runs.rows() == [(True, 0, 0), (False, 2, 2), (False, 0, 2), (True, 0, 2)]  # the first night: no file yet


def test_a_readable_copy_put_back_is_read_by_the_next_incremental_night(settings):
    stage1(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    stage2(settings.archive_dir)
    good = twin(settings)  # the copy a backup holds
    damage_stage2(settings.archive_dir)
    run_nightly(settings, full=False, quarantine=True, **STANDINS)

    for path in (f"canonical/{DAY}/part-s2.parquet", f"features/{DAY}/part-s2.parquet"):
        shutil.copy(good.archive_dir / path, settings.archive_dir / path)
    restored = run_nightly(settings, full=False, **STANDINS)

    assert restored["new_parts"] == 2
    run_nightly(good, full=True, **STANDINS)
    assert_same_tables(settings.duckdb_path, good.duckdb_path)


def test_quarantine_moves_no_part_whose_read_failed_for_a_passing_reason(settings, monkeypatch):
    """A read that fails once (EIO on a network volume) or with an OS error says nothing of the file:
    before, --quarantine-unreadable moved the readable part and every later table lacked its rows."""
    stage1(settings.archive_dir)
    run_nightly(settings, full=False, **STANDINS)
    stage2(settings.archive_dir)
    healthy = f"canonical/{DAY}/part-s2.parquet"
    content = (settings.archive_dir / healthy).read_bytes()
    read, failed = pl.read_parquet, []

    def flaky(source, *args, **kwargs):
        if str(source).endswith(healthy) and not failed:
            failed.append(source)
            raise OSError(5, "Input/output error")
        return read(source, *args, **kwargs)

    monkeypatch.setattr(pl, "read_parquet", flaky)
    with pytest.raises(UnreadableParts) as stopped:
        run_nightly(settings, full=False, quarantine=True, **STANDINS)

    assert set(stopped.value.parts) == {healthy} and "not moved" in str(stopped.value)
    assert (settings.archive_dir / healthy).read_bytes() == content  # still read by the next night
    assert not (settings.archive_dir / QUARANTINE).exists()
    assert run_nightly(settings, full=False, quarantine=True, **STANDINS)["quarantined_parts"] == 0
