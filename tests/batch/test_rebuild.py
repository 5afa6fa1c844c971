"""The nightly rebuild over a hand-built archive: dedupe, tables, idempotency, parity, atomic swap.

batch.features (owned elsewhere) is replaced by small stand-ins implementing docs/patient-state.md
rules 1-3 and 5 and one feature (heart_rate_last_24h), so these tests exercise the nightly itself.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.nightly import run_nightly
from schemas import codes
from schemas.cadence import snapshot_id
from schemas.canonical import LOINC, CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES
from streams.archiver import ARCHIVE_SCHEMAS
from wardwatch.settings import Settings

HOUR_MS = 3600 * 1000
T0 = 1_718_000_000_000  # 2024-06-10, some time of day
ARRIVAL = ["partition", "offset", "idx"]


# --- stand-ins for batch.features ----------------------------------------------------------------


def classify_standin(events: pl.DataFrame, *, allowed_lateness_ms: int, cross_source_tolerance: float,
                     dedupe_horizon_ms: int) -> pl.DataFrame:
    events = events.sort(ARRIVAL)
    known: dict[str, int] = {}
    clock: dict[str, int] = {}
    outcomes, late_by = [], []
    for e in events.iter_rows(named=True):
        fact, patient = e["fact_id"], e["patient_id"]
        by = None
        if fact in known:
            outcome = "duplicate" if e["version"] <= known[fact] else "corrected"
            known[fact] = max(known[fact], e["version"])
        elif patient in clock and e["effective_ms"] < clock[patient] - allowed_lateness_ms:
            outcome, by = "late", clock[patient] - allowed_lateness_ms - e["effective_ms"]
        else:
            outcome = "accepted"
            known[fact] = e["version"]
            clock[patient] = max(clock.get(patient, e["effective_ms"]), e["effective_ms"])
        outcomes.append(outcome)
        late_by.append(by)
    return events.with_columns(outcome=pl.Series(outcomes, dtype=pl.String),
                               late_by_ms=pl.Series(late_by, dtype=pl.Int64),
                               supersedes=pl.lit(None, pl.String))  # (no cross-source rule 4 here)


def features_at_standin(events: pl.DataFrame, points: pl.DataFrame, **rules) -> pl.DataFrame:
    classified = classify_standin(events, **rules).filter(pl.col("outcome").is_in(["accepted", "corrected"]))
    rows = []
    for point in points.iter_rows(named=True):
        seen = classified.filter((pl.col("patient_id") == point["patient_id"])
                                 & (pl.col("partition") == point["partition"])
                                 & (pl.col("offset") <= point["offset"]))
        live: dict[str, dict] = {}
        for e in seen.iter_rows(named=True):
            if e["status"] == Status.ENTERED_IN_ERROR.value:
                live.pop(e["fact_id"], None)
            else:
                live[e["fact_id"]] = e
        window = [e for e in live.values() if e["code"] == codes.HEART_RATE
                  and point["scoring_ms"] - 24 * HOUR_MS < e["effective_ms"] <= point["scoring_ms"]]
        last = max(window, key=lambda e: (e["effective_ms"], e["fact_id"]))["value"] if window else None
        rows.append(point | {name: None for name in FEATURE_NAMES} | {"heart_rate_last_24h": last})
    return pl.DataFrame(rows, schema={**points.schema, **{name: pl.Float64 for name in FEATURE_NAMES}})


STANDINS = {"features_at": features_at_standin, "classify_events": classify_standin}


# --- a hand-built archive ------------------------------------------------------------------------


def hr(fact: str, version: int, effective_ms: int, value: float | None, status=Status.FINAL, patient="p1",
       code=codes.HEART_RATE) -> CanonicalEvent:
    return CanonicalEvent(patient_id=patient, code=code, value=value, unit="/min", effective_ms=effective_ms,
                          issued_ms=effective_ms + 1000, status=status, source=Source.CDC, fact_id=fact,
                          version=version, provenance={"table": "vital_signs"})


A1 = hr("A", 1, T0, 80.0)
A2 = hr("A", 2, T0, 85.0, Status.CORRECTED)
B1 = hr("B", 1, T0 + 10 * 60_000, 90.0)
B2 = hr("B", 2, T0 + 10 * 60_000, None, Status.ENTERED_IN_ERROR)
C1 = hr("C", 1, T0 - 2 * HOUR_MS, 70.0)  # 70 min beyond the 1 h lateness bound once B is in
D1 = hr("D", 1, T0, 95.0, patient="p2", code=codes.SPO2)

# (partition, offset) -> micro-batch; p1 on partition 0, p2 on partition 1
MESSAGES = {(0, 0): [A1], (0, 1): [B1, A1], (0, 2): [A2], (0, 3): [C1], (0, 4): [B2], (1, 0): [D1]}
# the scoring points the stream published, with the heart_rate_last_24h it computed
ONLINE = {(0, 0): ("p1", T0, 80.0), (0, 1): ("p1", B1.effective_ms, 90.0), (0, 2): ("p1", B1.effective_ms, 90.0),
          (0, 4): ("p1", B1.effective_ms, 85.0), (1, 0): ("p2", T0, None)}
# what made each point (schemas/cadence.py): a new vitals set, or a correction; its snapshot id follows
TRIGGERS = {(0, 0): ("vitals", A1), (0, 1): ("vitals", B1), (0, 2): ("correction", A2),
            (0, 4): ("correction", B2), (1, 0): ("vitals", D1)}


def online_snapshot_id(position: tuple[int, int]) -> str:
    patient, scoring_ms, _ = ONLINE[position]
    trigger, event = TRIGGERS[position]
    return snapshot_id(patient, trigger, scoring_ms, event.event_id)
DEADLETTER_BYTES = b"\xff\xfe not json"


def canonical_rows(positions) -> list[dict]:
    rows = []
    for partition, offset in positions:
        for idx, e in enumerate(MESSAGES[(partition, offset)]):
            d = e.to_dict() | {"status": e.status.value, "source": e.source.value,
                               "provenance": orjson.dumps(e.provenance).decode()}
            rows.append(d | {"partition": partition, "offset": offset, "idx": idx, "kafka_timestamp_ms": T0})
    return rows


def kafka(partition: int, offset: int) -> dict:
    return {"kafka_partition": partition, "kafka_offset": offset, "kafka_timestamp_ms": T0}


def feature_rows(skew: dict[tuple[int, int], float] | None = None,
                 published: dict[tuple[int, int], dict] | None = None) -> list[dict]:
    """The published snapshots: heart_rate_last_24h from ONLINE (or every feature from `published`)."""
    rows = []
    for i, ((partition, offset), (patient, scoring_ms, hr_last)) in enumerate(sorted(ONLINE.items())):
        features = {name: None for name in FEATURE_NAMES} | {"heart_rate_last_24h": (skew or {}).get((partition, offset), hr_last)}
        if published is not None:
            features = {name: None for name in FEATURE_NAMES} | published[(partition, offset)]
        rows.append({"snapshot_id": online_snapshot_id((partition, offset)), "patient_id": patient, "scoring_ms": scoring_ms,
                     "partition": partition, "offset": offset, "features_json": orjson.dumps(features).decode()}
                    | kafka(0, i))
    return rows


def write(archive: Path, kind: str, name: str, rows: list[dict], date: str = "2024-06-10") -> None:
    directory = archive / kind / f"date={date}"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ARCHIVE_SCHEMAS[kind]), directory / f"part-{name}.parquet")


def build_archive(archive: Path, skew: dict[tuple[int, int], float] | None = None,
                  published: dict[tuple[int, int], dict] | None = None) -> None:
    # the archiver re-read offset (0, 2) after a crash: it sits in two files
    write(archive, "canonical", "a", canonical_rows([(0, 0), (0, 1), (0, 2)]))
    write(archive, "canonical", "b", canonical_rows([(0, 2), (0, 3), (0, 4), (1, 0)]))
    # a crash mid-write leaves a hidden temp file: it must never be read
    (archive / "canonical" / "date=2024-06-10" / ".part-c.parquet.tmp").write_bytes(b"half a parquet file")
    late = {k: v for k, v in canonical_rows([(0, 3)])[0].items() if k not in ("idx", "kafka_timestamp_ms")}
    write(archive, "late", "a", [late | {"late_by_ms": 70 * 60_000} | kafka(0, 0)])
    dead = {"key": b"p9", "value": DEADLETTER_BYTES, "reason": "malformed_json", "detail": "not UTF-8",
            "exception": "UnicodeDecodeError", "stage": "ingest.fhir", "source_topic": "x.fhir.notifications",
            "source_partition": 2, "source_offset": 41, "other_headers_json": None}
    write(archive, "deadletter", "a", [dead | kafka(0, 0)])
    write(archive, "deadletter", "b", [dead | kafka(0, 0)])
    features = feature_rows(skew, published)
    write(archive, "features", "a", features)
    write(archive, "features", "b", features[:2])
    scores = [{"snapshot_id": f["snapshot_id"], "patient_id": f["patient_id"], "scoring_ms": f["scoring_ms"],
               "partition": f["partition"], "offset": f["offset"], "model_version": "m1", "path": "model",
               "probability": 0.1, "news2": 1, "tier": "low", "rationale_json": "[]"} | kafka(0, i)
              for i, f in enumerate(features)]
    write(archive, "scores", "a", scores)
    alert = {"alert_id": "al1", "kind": "open", "tier": "high", "patient_id": "p1", "encounter_id": "e1",
             "scoring_ms": T0, "model_version": "m1", "path": "model",
             "resource_json": orjson.dumps({"resourceType": "RiskAssessment", "status": "final"}).decode()}
    write(archive, "alerts", "a", [alert | kafka(0, 0)])
    write(archive, "alerts", "b", [alert | kafka(0, 0)])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:  # no broker needed: overrides the broker-backed fixture
    return Settings(data_dir=tmp_path / "data", allowed_lateness_s=3600)


def tables(path: Path) -> dict[str, pa.Table]:
    with duckdb.connect(str(path), read_only=True) as con:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        return {n: con.sql(f'SELECT * FROM "{n}"').to_arrow_table() for n in names}


def frame(path: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(path), read_only=True) as con:
        return pl.from_arrow(con.sql(sql).to_arrow_table())


# --- tests ---------------------------------------------------------------------------------------


def test_tables_are_deduplicated_and_keep_arrival_positions(settings):
    build_archive(settings.archive_dir)
    summary = run_nightly(settings, **STANDINS)
    db = Path(summary["duckdb_path"])

    events = frame(db, "SELECT fact_id, version, partition, \"offset\", idx, outcome FROM canonical_events")
    assert events.rows() == [("A", 1, 0, 0, 0, "accepted"), ("B", 1, 0, 1, 0, "accepted"),
                             ("A", 1, 0, 1, 1, "duplicate"), ("A", 2, 0, 2, 0, "corrected"),
                             ("C", 1, 0, 3, 0, "late"), ("B", 2, 0, 4, 0, "corrected"), ("D", 1, 1, 0, 0, "accepted")]
    versions = frame(db, "SELECT fact_id, version, arrivals FROM observation_versions")
    assert versions.rows() == [("A", 1, 2), ("A", 2, 1), ("B", 1, 1), ("B", 2, 1), ("C", 1, 1), ("D", 1, 1)]
    current = frame(db, "SELECT fact_id, version, value, outcome FROM observations")
    assert current.rows() == [("A", 2, 85.0, "accepted"), ("C", 1, 70.0, "late"), ("D", 1, 95.0, "accepted")]

    dead = frame(db, "SELECT reason, stage, source_topic, source_partition, source_offset, value FROM dead_letters")
    assert dead.rows() == [("malformed_json", "ingest.fhir", "x.fhir.notifications", 2, 41, DEADLETTER_BYTES)]
    assert frame(db, "SELECT count(*) AS n FROM features_online")["n"][0] == len(ONLINE)
    assert frame(db, "SELECT count(*) AS n FROM scores")["n"][0] == len(ONLINE)
    alerts = frame(db, "SELECT alert_id, resource FROM alerts")
    assert alerts["alert_id"].to_list() == ["al1"]
    assert orjson.loads(alerts["resource"][0])["resourceType"] == "RiskAssessment"
    assert summary["counts"]["late_events"] == 1


def test_features_online_are_expanded_one_column_per_feature(settings):
    build_archive(settings.archive_dir)
    db = Path(run_nightly(settings, **STANDINS)["duckdb_path"])
    online = frame(db, "SELECT * FROM features_online")
    assert set(FEATURE_NAMES) <= set(online.columns)
    assert online.sort("partition", "offset")["heart_rate_last_24h"].to_list() == [80.0, 90.0, 90.0, 85.0, None]


def test_running_twice_gives_identical_tables_and_one_more_run(settings):
    build_archive(settings.archive_dir)
    first = tables(Path(run_nightly(settings, **STANDINS)["duckdb_path"]))
    second = tables(Path(run_nightly(settings, **STANDINS)["duckdb_path"]))
    assert set(first) == set(second)
    for name in first:
        if name != "runs":
            assert first[name].equals(second[name]), name
    assert first["runs"].num_rows == 1
    assert second["runs"].num_rows == 2
    assert second["runs"].column("run_id")[0] == first["runs"].column("run_id")[0]
    # nothing left behind next to the database but the lock the next run takes (86a1504: a lock file
    # stays; removing it would let two runs lock two different files)
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [".wardwatch.duckdb.lock", "archive", "reports",
                                                                   "wardwatch.duckdb"]


def test_parity_passes_when_the_planes_agree(settings):
    build_archive(settings.archive_dir)
    summary = run_nightly(settings, **STANDINS)
    assert summary["parity"]["points_checked"] == len(ONLINE)
    assert summary["parity"]["mismatched"] == 0
    assert (summary["parity"]["late_published"], summary["parity"]["late_recomputed"],
            summary["parity"]["late_mismatched"]) == (1, 1, 0)
    assert summary["parity_ok"]
    db = Path(summary["duckdb_path"])
    assert frame(db, "SELECT count(*) AS n FROM parity_report")["n"][0] == 0
    runs = frame(db, "SELECT mismatched, parity_ok FROM runs")
    assert runs.rows() == [(0, True)]


def test_parity_names_a_skewed_online_feature(settings):
    build_archive(settings.archive_dir, skew={(0, 2): 91.0})
    summary = run_nightly(settings, **STANDINS)
    assert summary["parity"]["mismatched"] == 1
    assert summary["parity"]["per_feature_mismatches"] == {"heart_rate_last_24h": 1}
    assert not summary["parity_ok"]
    report = frame(Path(summary["duckdb_path"]),
                   "SELECT \"check\", patient_id, \"offset\", feature, online, offline FROM parity_report")
    assert report.rows() == [("feature", "p1", 2, "heart_rate_last_24h", 91.0, 90.0)]


def test_a_snapshot_re_emitted_with_other_values_fails_parity(settings):
    """A restart re-emits snapshots under the same id: copies that differ mean the stream's state
    changed across the restart, even when the first copy agrees with the batch."""
    build_archive(settings.archive_dir)  # identical copies of two snapshots already: those pass
    first = feature_rows()[0]
    changed = orjson.loads(first["features_json"]) | {"heart_rate_last_24h": 999.0}
    write(settings.archive_dir, "features", "c",
          [first | {"features_json": orjson.dumps(changed).decode()} | kafka(0, 7)])
    summary = run_nightly(settings, **STANDINS)
    assert summary["parity"]["mismatched"] == 0  # the first copy is the one compared with the batch
    assert not summary["parity_ok"]
    report = frame(Path(summary["duckdb_path"]),
                   "SELECT \"check\", patient_id, \"offset\", feature, online FROM parity_report")
    assert report.rows() == [("copies", "p1", 0, "heart_rate_last_24h", 80.0)]


def test_missing_late_record_is_flagged(settings):
    build_archive(settings.archive_dir)
    for f in (settings.archive_dir / "late").rglob("*.parquet"):
        f.unlink()
    summary = run_nightly(settings, **STANDINS)
    assert summary["parity"]["late_mismatched"] == 1
    assert not summary["parity_ok"]


def test_empty_archive_builds_empty_tables(settings):
    summary = run_nightly(settings, **STANDINS)
    assert all(n == 0 for name, n in summary["counts"].items() if name != "runs")
    assert summary["parity_ok"]


def hr_features(last, max_1h, mean_6h, since_s, count_6h) -> dict:
    return {"heart_rate_last_24h": last, "heart_rate_max_1h": max_1h, "heart_rate_mean_6h": mean_6h,
            "heart_rate_time_since_last_s_24h": since_s, "vitals_count_6h": count_6h}


def hr_trend(mean_1h, max_6h, slope_6h, delta_24h) -> dict:
    return {"heart_rate_mean_1h": mean_1h, "heart_rate_max_6h": max_6h, "heart_rate_slope_6h": slope_6h,
            "heart_rate_delta_24h": delta_24h}


# every feature of the scenario, worked out by hand from schemas/features.py and docs/patient-state.md
HAND_FEATURES = {
    (0, 0): hr_features(80.0, 80.0, 80.0, 0.0, 1) | hr_trend(80.0, 80.0, None, None),
    # B is the latest; the redelivered A changes nothing; slope: +10 over 10 min = 60 per hour
    (0, 1): hr_features(90.0, 90.0, 85.0, 0.0, 2) | hr_trend(85.0, 90.0, 60.0, 10.0),
    (0, 2): hr_features(90.0, 90.0, 87.5, 0.0, 2) | hr_trend(87.5, 90.0, 30.0, 5.0),  # A corrected to 85
    # B retracted: A is all that is left, 10 min old
    (0, 4): hr_features(85.0, 85.0, 85.0, 600.0, 1) | hr_trend(85.0, 85.0, None, None),
    # an SpO2 charted without oxygen: air at that reading
    (1, 0): {"spo2_last_24h": 95.0, "spo2_min_6h": 95.0, "spo2_min_1h": 95.0, "vitals_count_6h": 0,
             "spo2_time_since_last_s_24h": 0.0, "on_oxygen": 0},
}


def test_nightly_with_the_real_recomputation_agrees_with_hand_computed_features(settings):
    pytest.importorskip("batch.features")
    build_archive(settings.archive_dir, published=HAND_FEATURES)
    summary = run_nightly(settings)  # the default: batch.features
    assert summary["parity"]["values_checked"] == len(ONLINE) * len(FEATURE_NAMES)
    assert summary["parity"]["mismatched"] == 0, summary["parity"]["per_feature_mismatches"]
    assert summary["parity"]["late_mismatched"] == 0
    assert summary["parity_ok"]


def test_a_row_moved_to_another_patient_leaves_its_fact_with_the_new_patient():
    """A CDC update that moves a vitals row to another patient retracts the fact from the old one and
    states it for the new one, both as version 2 of one fact id (so one event id): the analysts'
    observations must keep it for the new patient, whichever arrived first."""
    from batch.rebuild import observation_versions, observations
    from schemas.canonical import make_event_id

    fact = f"cdc:vital_signs:7:{codes.HEART_RATE}"

    def version(patient, v, status, value, offset):
        return {"patient_id": patient, "fact_id": fact, "version": v, "event_id": make_event_id(fact, v),
                "status": status, "value": value, "code": codes.HEART_RATE, "code_system": "http://loinc.org",
                "outcome": "accepted" if value is not None else "corrected", "supersedes": None, "partition": 0,
                "offset": offset, "idx": 0}

    first = version("MRN-0002", 1, "final", 80.0, 0)
    for moved in ([version("MRN-0009", 2, "final", 80.0, 1), version("MRN-0002", 2, "entered-in-error", None, 2)],
                  [version("MRN-0002", 2, "entered-in-error", None, 1), version("MRN-0009", 2, "final", 80.0, 2)]):
        current = observations(observation_versions(pl.DataFrame([first, *moved])))
        assert current.select("patient_id", "value").rows() == [("MRN-0009", 80.0)]


def test_a_preliminary_result_replaced_by_the_other_sources_final_one_is_no_current_observation():
    """A lab sent a lactate preliminary through CDC (4.5) and its final only through FHIR (1.5, same
    time): the stream uses 1.5 alone (rule 4), so an analyst's max lactate from `observations` must be
    1.5 too; the preliminary version stays in observation_versions, pointing at nothing current."""
    from batch.features import classify_events
    from batch.rebuild import observation_versions, observations
    from schemas.canonical import CanonicalEvent, Source

    t = 1_800_000_000_000

    def event(fact, source, value, status, offset):
        e = CanonicalEvent("MRN-0001", codes.LACTATE, value, "mmol/L", t, t, status, source, fact, 1)
        return {**{k: v for k, v in e.to_dict().items() if k != "provenance"}, "partition": 0, "offset": offset, "idx": 0}

    events = pl.DataFrame([event("cdc:labs:1:2524-7", Source.CDC, 4.5, Status.PRELIMINARY, 0),
                           event("fhir:Observation/9:2524-7", Source.FHIR, 1.5, Status.FINAL, 1)],
                          infer_schema_length=None)
    classified = classify_events(events, allowed_lateness_ms=3_600_000, cross_source_tolerance=0.05)
    assert classified["supersedes"].to_list() == [None, "cdc:labs:1:2524-7"]
    versions = observation_versions(classified)
    current = observations(versions)
    assert current.select("fact_id", "value", "outcome").rows() == [("fhir:Observation/9:2524-7", 1.5, "corrected")]
    assert "supersedes" not in current.columns  # (holds a fact id: observations are exported de-identified)
    assert sorted(versions["fact_id"].to_list()) == ["cdc:labs:1:2524-7", "fhir:Observation/9:2524-7"]


def archived_event(fact, version, at, value, status, offset, source=Source.CDC, code=codes.HEART_RATE,
                   system=LOINC, text=None, encounter_id=None) -> dict:
    """A canonical event of MRN-0001 as an archived row (partition 0, `offset`), without its provenance."""
    e = CanonicalEvent("MRN-0001", code, value, "/min", at, at, status, source, fact, version,
                       encounter_id=encounter_id, code_system=system, value_text=text)
    return {**{k: v for k, v in e.to_dict().items() if k != "provenance"}, "partition": 0, "offset": offset, "idx": 0}


def two_readings_and_a_withdrawn_stray(event, t: int, stray: int, *, first_offset: int) -> list[dict]:
    """Heart rates at t and t + 1 h that stand, and one at `stray` (with its FHIR copy) entered in error."""
    o = first_offset
    return [event("cdc:vital_signs:1", 1, t, 80.0, Status.FINAL, o),
            event("cdc:vital_signs:2", 1, t + HOUR_MS, 84.0, Status.FINAL, o + 1),
            event("cdc:vital_signs:3", 1, stray, 150.0, Status.FINAL, o + 2),
            event("fhir:Observation/3", 1, stray, 150.0, Status.FINAL, o + 3, Source.FHIR),
            event("cdc:vital_signs:3", 2, stray, None, Status.ENTERED_IN_ERROR, o + 4)]


def test_a_retracted_reading_after_the_stay_does_not_stretch_the_patients_span():
    """A heart rate charted 3 days after the patient's last real reading, then entered in error (and its FHIR
    copy, an alias that never counted): patients.last_effective_ms was the withdrawn reading's time, so the
    report's patient-days (last - first) counted 3 days of a stay that had ended. The span is over the
    readings that stood, the observations the patient_timeline view shows."""
    from batch.features import classify_events
    from batch.rebuild import observation_versions, observations, patients

    t = 1_800_000_000_000
    stray = t + HOUR_MS + 3 * 24 * HOUR_MS
    events = pl.DataFrame(two_readings_and_a_withdrawn_stray(archived_event, t, stray, first_offset=0),
                          infer_schema_length=None)
    classified = classify_events(events, allowed_lateness_ms=3_600_000, cross_source_tolerance=0.05)
    assert classified["outcome"].to_list()[3] == "duplicate"  # the FHIR copy: an alias of the CDC reading
    current = observations(observation_versions(classified))
    span = patients(events, current).select("patient_id", "first_effective_ms", "last_effective_ms").rows()
    assert span == [("MRN-0001", t, t + HOUR_MS)]  # 1 h, not 3 days and 1 h


def test_a_retracted_reading_after_the_stay_does_not_stretch_the_encounters_span():
    """The encounter's span, as the patient's: a heart rate charted 3 days after the stay's last reading
    (and its FHIR copy), then entered in error, kept encounters.last_effective_ms at the withdrawn reading's
    time, a stay 3 days longer than it was. The span is over what stood: the admission and the readings the
    patient_timeline view shows; a retracted admission does not start it."""
    from batch.features import classify_events
    from batch.rebuild import encounters, observation_versions, observations

    t = 1_800_000_000_000
    stray = t + HOUR_MS + 3 * 24 * HOUR_MS

    def event(*args, **kwargs):
        return archived_event(*args, **kwargs, encounter_id="V-1")

    admit = dict(code=codes.ADMISSION, system=codes.CONTEXT)
    events = pl.DataFrame([event("cdc:encounters:0:admission", 1, t - 2 * 24 * HOUR_MS, None, Status.FINAL, 0,
                                 text="inpatient", **admit),
                           event("cdc:encounters:0:admission", 2, t - 2 * 24 * HOUR_MS, None,
                                 Status.ENTERED_IN_ERROR, 1, **admit),
                           event("cdc:encounters:1:admission", 1, t - HOUR_MS, None, Status.FINAL, 2,
                                 text="inpatient", **admit),
                           *two_readings_and_a_withdrawn_stray(event, t, stray, first_offset=3)],
                          infer_schema_length=None)
    classified = classify_events(events, allowed_lateness_ms=3_600_000, cross_source_tolerance=0.05)
    current = observations(observation_versions(classified))
    span = encounters(events, current).select("encounter_id", "admitted_ms", "first_effective_ms",
                                              "last_effective_ms").rows()
    assert span == [("V-1", t - HOUR_MS, t - HOUR_MS, t + HOUR_MS)]  # admission to last reading, not 3 days more
