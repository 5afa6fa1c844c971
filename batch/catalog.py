"""The analyst-facing catalog of the DuckDB file: a comment on every table and column (`COMMENT ON`),
the views in batch/views.sql, and the read-only helpers behind `wardwatch query`.

Column comments are looked up per table first, then by column name (a column means the same thing
in every table that has it), then from the feature specs. A column nobody documented gets a comment
saying so, and tests/batch/test_nightly.py fails on it: document new columns here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb

from schemas import codes
from schemas.features import DERIVED, FEATURES

VIEWS_SQL = Path(__file__).with_name("views.sql")
LABEL_HORIZON_MS = 12 * 3600 * 1000  # batch.train.make_labels' default horizon
UNDOCUMENTED = "undocumented column: describe it in batch/catalog.py"
# the file's own columns: duckdb_columns() alone also lists ~700 of DuckDB's catalog columns
COLUMN_COMMENTS_SQL = ("SELECT table_name, column_name, data_type, comment FROM duckdb_columns() "
                       "WHERE NOT internal ORDER BY table_name, column_index")

TABLES: dict[str, str] = {
    "canonical_events": "Every canonical event as it arrived (deduplicated archive copies), in arrival order, "
                        "with the outcome the patient-state rules give it (docs/patient-state.md).",
    "observation_versions": "Every version of every measured fact (context facts excluded), once, with how it "
                            "first arrived and how often.",
    "observations": "The current (highest) version of each measured fact; retracted facts, context facts and "
                    "preliminary results replaced by the other source's final one excluded.",
    "patients": "One row per patient: sex and birth year from context facts (no names, no birth dates).",
    "encounters": "One row per patient and encounter id (an encounter id names a stay only within its patient: join "
                  "on patient_id and encounter_id): class, admission/discharge times and the latest ward from "
                  "context facts.",
    "late_events": "Events the stream published as too late (beyond the lateness bound); they never entered state.",
    "dead_letters": "Input the pipeline rejected, with the reason and where it came from.",
    "unreadable_records": "Output records the archiver could not decode, kept as raw bytes.",
    "features_online": "The feature snapshots the stream published, one column per feature.",
    "features_offline": "The same features recomputed by the batch from the archive at every online scoring point "
                        "(one row per snapshot_id of features_online: join on snapshot_id).",
    "scores": "Every score the stream published (model or NEWS2 rule path).",
    "scores_shadow": "Scores of the shadow (candidate) model; they never alert.",
    "alerts": "Alerts the stream published, with the FHIR RiskAssessment JSON.",
    "gaps": "FHIR subscription gaps and missed heartbeats detected by the subscription watcher.",
    "labels": "The first-onset training label at every online scoring point (batch/train.py LABEL_DEFINITION; "
              "one row per snapshot_id of features_online and scores: join on snapshot_id); rows with at_risk = "
              "false (already deteriorated) are not evaluated.",
    "parity_report": "Online vs offline disagreements, and scoring points still pending (match = true; "
                     "checked again by the next run); empty when the planes agree and nothing is pending.",
    "archive_parts": "The archive part files the DuckDB file was built from (what incremental runs skip).",
    "runs": "One row per nightly run: counts, timings, parity and the promotion gate's decision.",
}

_MS = " (ms since epoch, UTC)"
COLUMNS: dict[str, str] = {
    "patient_id": "Patient identifier from the EHR",
    "encounter_id": ("Encounter (hospital stay) identifier: the EHR's visit number (CDC rows; a FHIR Encounter's "
                     "identifier), else fhir:Encounter/<FHIR server id>; unique only within a patient"),
    "code": ("Canonical code: LOINC for measurements, a schemas.codes CONTEXT code for context facts, "
             f"{codes.VERSION_MARK!r} for a FHIR version marker (a version carrying no mapped code: no reading)"),
    "code_system": f"Code system of `code`: http://loinc.org, {codes.CONTEXT} or {codes.VERSION_MARKS} (version markers)",
    "value": "Value in canonical units; null for retractions and text-valued context facts",
    "unit": "UCUM unit of `value`",
    "value_text": "Text value: ACVPU letter, encounter class, ward, sex",
    "effective_ms": "Clinical time of the fact (when measured)" + _MS,
    "issued_ms": ("When this version became available (FHIR issued, CDC commit or a lab's result time; a version "
                  "after the first never before its source stored it: FHIR meta.lastUpdated, CDC commit)" + _MS),
    "status": "final, preliminary, amended, corrected or entered-in-error (a retraction)",
    "source": "Input the event came from: cdc or fhir",
    "fact_id": "Names one clinical fact across its versions",
    "version": "Orders the versions of one fact (CDC lsn, FHIR versionId)",
    "event_id": "Names one version of one fact (hash of fact_id and version)",
    "provenance": "Where the event came from in its source, as JSON (a consciousness fact charted as a GCS "
                  "keeps the total: gcs_total; a version marker why its version carries no mapped code: "
                  "version_marker, unmapped_code or no_value)",
    "version_codes": "FHIR Observation events: every code of the event's version (a version replaces its "
                     "resource's facts, docs/patient-state.md rule 6); empty on a version marker (a later version "
                     "carrying none of the mapped codes: it retracts them all); null on CDC events and older archives",
    "partition": "Partition of the canonical message the event/point belongs to",
    "offset": "Offset of the canonical message the event/point belongs to",
    "idx": "Position of the event inside its canonical micro-batch",
    "kafka_timestamp_ms": "Kafka timestamp of the archived record" + _MS,
    "kafka_partition": "Partition of the archived record on its own topic",
    "kafka_offset": "Offset of the archived record on its own topic",
    "outcome": "accepted, corrected, duplicate or late (docs/patient-state.md); context for context facts",
    "late_by_ms": "How far beyond the lateness bound a late event was (ms)",
    "supersedes": "On the final result of the other source's preliminary one: the fact_id of that preliminary "
                  "fact, which it replaced (docs/patient-state.md rule 4); null otherwise",
    "arrivals": "How many times this version arrived",
    "versions": "How many versions of the fact were seen",
    "sex": "Administrative sex: male, female, other or unknown",
    "birth_year": "Year of birth (the only date of birth kept)",
    "encounters": "Number of distinct encounter ids of the patient (a stay seen by CDC and by a FHIR Encounter "
                  "without identifier counts twice)",
    "first_effective_ms": "Earliest clinical time seen" + _MS,
    "last_effective_ms": "Latest clinical time seen" + _MS,
    "encounter_class": "Encounter class from the admission fact (e.g. inpatient)",
    "admitted_ms": "Admission time" + _MS,
    "discharged_ms": "Discharge time, null while admitted" + _MS,
    "ward": "The latest ward the patient moved to",
    "ward_moves": "Number of location facts (admission and transfers)",
    "key": "Kafka key of the record, raw bytes",
    "reason": "Dead-letter reason (schemas/deadletter.py)",
    "detail": "Human-readable detail of the reason or disagreement",
    "exception": "Exception class that rejected the record",
    "stage": "Pipeline stage that rejected the record",
    "source_topic": "Topic the rejected record was read from",
    "source_partition": "Partition the rejected record was read from",
    "source_offset": "Offset the rejected record was read from",
    "other_headers_json": "Other Kafka headers of the record, as JSON",
    "topic": "Topic of the unreadable record",
    "error": "Why the archiver could not decode the record",
    "snapshot_id": "Deterministic id of the feature snapshot / score",
    "scoring_ms": "Scoring time T: the patient clock after the scored message" + _MS,
    "model_version": "Model version that scored; null when no model did (no model current, or a NEWS2 input "
                     "missing: the rule path without a probability)",
    "path": "model (the ONNX model's tier); rule (NEWS2's tier: no model scored, or NEWS2's tier was above the "
            "model's, which keeps its probability and model_version); shadow (scores_shadow: the candidate model)",
    "probability": "Predicted probability of deterioration; null when no model scored (rule path without a model)",
    "news2": "NEWS2 aggregate score at the scoring point",
    "tier": "Risk tier: none, low (model probability at/above WARDWATCH_ALERT_RESET, below the alert threshold), "
            "medium or high (streams/scoring.py); alerts open at medium",
    "rationale_json": "Top contributing features, as JSON",
    "alert_id": "Deterministic alert id (consumers drop duplicates by it)",
    "kind": "Alert kind: open, escalate, resolve or correction (streams/alerting.py)",
    "resource": "The FHIR RiskAssessment resource, JSON",
    "subscription": "FHIR Subscription the gap belongs to",
    "gap_kind": "Kind of the gap record (gap, missed heartbeat, ...)",
    "record_json": "The gap record, JSON",
    "label": "1 when the patient is at risk at T and the first onset of deterioration falls in (T, T + 12 h] "
             "(NEWS2 >= 7, systolic BP <= 90 or lactate >= 4), else 0",
    "at_risk": "Not deteriorated at T or any earlier scoring point, as known then (NEWS2 < 7, latest systolic BP "
               "of 24 h > 90, latest lactate of 24 h < 4, as of issued); only these rows are evaluated",
    "onset_ms": "Time of the first deterioration event in (T, T + 12 h] when label = 1, else null" + _MS,
    "label_news2_high": "A later scoring point with NEWS2 >= 7 in (T, T + 12 h], at risk or not",
    "label_low_sbp": "A systolic BP <= 90 mm[Hg] effective in (T, T + 12 h], at risk or not",
    "label_high_lactate": "A lactate >= 4 mmol/L effective in (T, T + 12 h], at risk or not",
    "trigger": "What made the scoring point: vitals (a new vitals set) or correction (a re-score after one)",
    "trigger_event_id": "event_id of the run's first event that triggered the point (part of snapshot_id)",
    "features_hash": "blake2b of the snapshot's features, to tie a score to the exact snapshot it scored",
    "input_watermark": "Input the stream had consumed when it scored: partition, offset, idx, and event_ms "
                       "(the patient clock)",
    "original_alert_id": "The alert a correction corrects; null for other kinds",
    "check": "feature (a feature value), late (a late-event cross-check), point (a scoring point only one "
             "side has, or taken at another arrival position: see detail) or copies (a snapshot published "
             "again with another value of `feature`; online is the first copy's)",
    "feature": "Feature name",
    "online": "Value the stream published",
    "offline": "Value the batch recomputed",
    "abs_diff": "Absolute difference online - offline",
    "match": "Whether online and offline agree (true only on a pending point: not judged yet)",
    "bytes": "Size of the part file",
}
_POINT_IDX = ("Position in the canonical message of the last event of the run that made the point "
              "(null in archive parts from before the stream sent it)")
# patient, scoring_ms, partition and offset do not name a point: one message can hold two points of a
# patient at one time (schemas/cadence.py), apart only in idx and snapshot_id
_POINT_ID = {"snapshot_id": "The scoring point: the snapshot_id of its features_online row and score (the key to "
                            "join on; patient, scoring_ms, partition and offset can be shared by two points of one "
                            "message)",
             "idx": _POINT_IDX + "; as the stream published it in features_online"}
PER_TABLE: dict[str, dict[str, str]] = {
    "archive_parts": {"kind": "Archive kind (canonical, features, scores, ...)",
                      "path": "Part file path relative to the archive directory"},
    "parity_report": {"event_id": "The late event disagreed on (check = late)",
                      "scoring_ms": "Scoring time of the point (check = feature)" + _MS},
    "observations": {"outcome": "How the fact first entered the system: accepted, late, duplicate (a "
                                "cross-source copy) or corrected (the final result of the other source's "
                                "preliminary one, which it replaced)"},
    "labels": _POINT_ID | {"news2": "NEWS2 at the scoring point from the facts issued by T (what training sees; "
                                    "two points of one message and time see the same facts)"},
    "alerts": {"tier": "open/escalate: the tier alerted, medium or high; resolve: the tier at resolution (none "
                       "or low), or the patient's latest tier on a resolve by discharge (streams/alerting.py)",
               "ward": "The patient's ward when the alert was raised (routing header; null when unknown)",
               "status": "Status of the RiskAssessment: final, amended or entered-in-error (corrections)",
               "reason": "Why the alert was resolved: discharge; null otherwise",
               "preliminary_basis": "LOINC codes of the readings the alert rests on that are preliminary results "
                                    "(the RiskAssessment says so too); empty when all are final, null in archive "
                                    "parts from before the stream sent it. Filter: len(preliminary_basis) > 0",
               "incomplete_news2": "On a resolve: the NEWS2 inputs not charted in the 24 h before it (the episode "
                                   "ended on an incomplete NEWS2, its note says so); empty otherwise, null in "
                                   "archive parts from before the stream sent it"},
    **{table: {"idx": _POINT_IDX,
               "preliminary_basis": "LOINC codes of the readings the score rests on that are preliminary results; "
                                    "empty when all are final, null in archive parts from before the stream sent "
                                    "it. Filter: len(preliminary_basis) > 0"}
       for table in ("scores", "scores_shadow")},
    "features_online": {"idx": _POINT_IDX},
    "features_offline": _POINT_ID,
    # the raw bytes, not a canonical value (the column name is shared with canonical_events)
    "dead_letters": {"value": "The rejected record's value as it arrived, raw bytes (the CDC message, the FHIR "
                              "notification; from the receiver, the POST body); it may hold patient data"},
    "unreadable_records": {"value": "The record's value as it arrived, raw bytes"},
    "patients": {"first_effective_ms": "Earliest time of a measurement that stood (the observations the "
                                       "patient_timeline view shows: retracted readings, cross-source copies and "
                                       "context facts such as the admission left out)" + _MS,
                 "last_effective_ms": "Latest time of a measurement that stood (the observations the "
                                      "patient_timeline view shows: retracted readings, cross-source copies and "
                                      "context facts such as the discharge left out)" + _MS},
    "encounters": {"first_effective_ms": "Earliest clinical time of an event of the encounter that stood (the "
                                         "admission included; retracted readings, superseded versions and "
                                         "cross-source copies left out)" + _MS,
                   "last_effective_ms": "Latest clinical time of an event of the encounter that stood (the "
                                        "discharge included; retracted readings, superseded versions and "
                                        "cross-source copies left out)" + _MS},
    # the views' own columns (batch/views.sql); the others keep their tables' comments
    "patient_timeline": {
        "time_ms": "When: an observation's effective time, a score's or alert's scoring time" + _MS,
        "time_utc": "time_ms as a UTC timestamp (no time zone attached)",
        "kind": "observation, score or alert",
        "item": "observation: its LOINC code; score: the model version (news2-rule when no model scored); "
                "alert: its kind (open, escalate, resolve, correction)",
        "value": "observation: the value in canonical units (canonical_events.unit); score: the model's "
                 "probability (null on the rule path without a model); alert: null",
        "detail": "observation: the text value (ACVPU letter), and 'late: never in the stream''s state' on a late "
                  "one (beyond the lateness bound: no score or alert saw it); score: news2=<NEWS2> tier=<tier> (? "
                  "when missing); alert: its tier",
        "encounter_id": ("Encounter (hospital stay) identifier: the EHR's visit number, else fhir:Encounter/<FHIR "
                         "server id>; unique only within a patient; null on score rows"),
    },
    "label_events": {
        "onset_ms": "Time of the first deterioration event (the onset)" + _MS,
        "onset_utc": "onset_ms as a UTC timestamp (no time zone attached)",
        "criterion": "Criteria met at the onset time: systolic BP <= 90, lactate >= 4, NEWS2 >= 7 (comma-separated)",
        "positive_points": "At-risk scoring points labelled 1 for this onset (in the 12 h before it)",
        "first_positive_ms": "The earliest of those points: the longest possible lead time" + _MS,
    },
    "alert_outcomes": {
        "status": "Status of the RiskAssessment: final, amended or entered-in-error (corrections)",
        "withdrawn": "A correction later withdrew this alert (its latest correction is entered-in-error: the "
                     "basis was wrong); null on correction records",
        "at_risk": "The patient was not yet deteriorated at the alert's scoring point (labels.at_risk); null "
                   "when the alert is at no labelled point",
        "outcome_ms": "The first onset within 12 h after the alert, when at risk" + _MS,
        "outcome_criterion": "Criteria met at that onset (label_events.criterion)",
        "outcome_followed": "An onset followed within 12 h; null when not evaluable (not at risk)",
        "lead_time_h": "Hours from the alert to that onset",
    },
    "model_performance_daily": {
        "day": "UTC day of the scoring time",
        "model_version": "Model version that scored; news2-rule when none did (a NEWS2 input missing, no model)",
        "scored_points": "Scores the stream published that day",
        "patients": "Distinct patients scored that day",
        "at_risk_points": "Labelled at-risk scoring points with a risk and a NEWS2 (the AUROCs' rows)",
        "positives": "Those labelled 1: an onset followed within 12 h",
        "positive_rate": "positives / at_risk_points",
        "auroc": "AUROC of the served risk (the model's probability) on the at-risk points; null with one class",
        "news2_auroc": "AUROC of NEWS2 on the same points; null with one class",
        "alerts_opened": "Alerts of kind open that day",
        "alerts_per_100_patients": "100 * alerts_opened / patients",
    },
    "runs": {
        "run_id": "Id of the nightly run", "started_at": "When the run started (UTC)",
        "finished_at": "When the run finished writing (UTC)",
        "full": 'True for a full rebuild (FULL is an SQL keyword: write "full" in quotes)',
        "archive_files": "Archive part files in the archive", "new_parts": "Part files this run processed first",
        "recomputed_patients": "Patients whose state this run recomputed",
        "quarantined_parts": "Unreadable archive part files this run moved to <archive>/quarantine/ "
                             "(batch nightly --quarantine-unreadable); their rows are in no table",
        "quarantine_files": "Files held in <archive>/quarantine/ at this run: their rows are in no table",
        "counts_json": "Rows per table, JSON", "timings_json": "Seconds per step, JSON",
        "points_checked": "Scoring points parity checked in this run", "values_checked": "Feature values compared",
        "mismatched": "Feature values that disagreed", "match_rate": "Share of values that agreed",
        "max_abs_diff": "Largest absolute online/offline difference",
        "late_published": "Late events the stream published", "late_recomputed": "Late events the batch found",
        "late_mismatched": "Late events found by one side only or with another late_by_ms",
        "parity_ok": "Whether the unexplained mismatch rate was within bound", "parity_json": "Parity summary, JSON",
        "model_version": "Version trained after this run", "gate_decision": "promote or candidate",
        "gate_reasons_json": "Why the gate decided so, JSON",
        "model_metrics_json": "Held-out metrics of the new model and NEWS2 with 95 % intervals, and the paired gains "
                              "over NEWS2 and the current model (model_vs_current), JSON",
    },
}


def _feature_docs() -> dict[str, str]:
    docs = {}
    for spec in FEATURES:
        name = codes.CODES[spec.code].name
        docs[spec.name] = (f"Feature: {spec.agg} of {name} ({spec.code}) over the {spec.window_s // 3600} h "
                           "window ending at scoring_ms; null when the window is empty")
    for d in DERIVED:
        docs[d.name] = (f"Derived feature {d.name} from {', '.join(d.inputs + d.optional)}; null when "
                        + ("an input is missing" if d.inputs else "its function says so (schemas/features.py)"))
    return docs


FEATURE_DOCS = _feature_docs()


def column_comment(table: str, column: str) -> str:
    return PER_TABLE.get(table, {}).get(column) or COLUMNS.get(column) or FEATURE_DOCS.get(column) or UNDOCUMENTED


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def apply_comments(con: duckdb.DuckDBPyConnection) -> None:
    """COMMENT ON every table and column of the main schema, and every view's column (the views carry
    their own comment from views.sql)."""
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()]
    views = [r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'").fetchall()]
    for table in tables:
        con.execute(f'COMMENT ON TABLE "{table}" IS {_quote(TABLES.get(table, "undocumented table"))}')
    for table in tables + views:
        for (column,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = ?", [table]).fetchall():
            con.execute(f'COMMENT ON COLUMN "{table}"."{column}" IS {_quote(column_comment(table, column))}')


def views_sql() -> str:
    from string import Template

    from batch import train

    return Template(VIEWS_SQL.read_text()).substitute(
        SYSTOLIC_BP=codes.SYSTOLIC_BP, LACTATE=codes.LACTATE, LOW_SBP=f"{train.LOW_SYSTOLIC_BP:g}",
        HIGH_LACTATE=f"{train.HIGH_LACTATE:g}", NEWS2_HIGH=train.NEWS2_EMERGENCY)


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(views_sql())


def schema_summary(path: Path) -> str:
    """Tables and views with their comments and row counts, and how to open the file elsewhere."""
    lines = [f"{path} (open read-only)", ""]
    with duckdb.connect(str(path), read_only=True) as con:
        for name, comment in con.execute(
                "SELECT table_name, comment FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY 1").fetchall():
            rows = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
            lines.append(f"  table {name} ({rows} rows): {comment or ''}")
        for name, comment in con.execute(
                "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
                "ORDER BY 1").fetchall():
            lines.append(f"  view  {name}: {comment or ''}")
    lines += ["", f"Column comments: {COLUMN_COMMENTS_SQL};",
              f"duckdb CLI:  duckdb -readonly {path}",
              f"Python:      import duckdb; con = duckdb.connect('{path}', read_only=True); con.sql('FROM patients')",
              "Here:        wardwatch query \"SELECT * FROM alert_outcomes\" [--csv]"]
    return "\n".join(lines)


def query_csv(path: Path, sql: str) -> str:
    """Run SQL on a read-only connection and return the result as DuckDB writes CSV: a header line, NULL
    empty and an empty string quoted (""), booleans true/false, lists [1, 2], timestamps ISO. Python's
    csv module would print NULL and '' alike, True/False and a list's repr. Empty for a statement
    without a result."""
    with duckdb.connect(str(path), read_only=True) as con, tempfile.TemporaryDirectory() as tmp:
        relation = con.sql(sql)
        if relation is None:
            return ""
        out = Path(tmp) / "result.csv"
        relation.to_csv(str(out))
        return out.read_text()


def query_result(path: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run SQL on a read-only connection (writes fail): column names and rows; none of either when the
    text holds no statement (empty, blank or only a comment: DuckDB then returns no cursor)."""
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(sql)
        if cursor is None:
            return [], []
        columns = [d[0] for d in cursor.description or []]
        return columns, cursor.fetchall()
