"""The archiver lands the shadow scores and the FHIR subscription gaps too, and the scoring-point and
alert header fields added after the first archives (older part files still read)."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batch import rebuild
from streams.archiver import ARCHIVE_SCHEMAS, RawRecord, kinds_by_topic, rows_for, write_part
from streams.topics import topics_for
from wardwatch.settings import Settings

T = 1_718_000_000_000


def record(topic: str, value: dict | bytes, key: bytes | None = b"p1") -> RawRecord:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return RawRecord(topic=topic, partition=0, offset=7, timestamp_ms=T, key=key, value=raw)


def test_new_topics_are_archived_as_their_own_kinds():
    topics = topics_for(Settings(topic_prefix="x"))
    kinds = kinds_by_topic(topics)
    assert kinds[topics.scores_shadow] == "scores_shadow"
    assert kinds[topics.gaps] == "gaps"
    assert set(kinds.values()) <= set(ARCHIVE_SCHEMAS)


def test_shadow_score_has_the_scores_shape():
    score = {"snapshot_id": "s1", "patient_id": "p1", "scoring_ms": T, "partition": 1, "offset": 2,
             "model_version": "cand", "path": "model", "probability": 0.3, "news2": 4, "tier": "low", "rationale": []}
    [row] = rows_for("scores_shadow", record("x.scores.shadow", score))
    assert row.kind == "scores_shadow" and row.date == "2024-06-10"
    assert row.values["model_version"] == "cand" and row.values["probability"] == 0.3
    assert set(row.values) == set(ARCHIVE_SCHEMAS["scores_shadow"].names)


def test_gap_record_keeps_its_json_and_subscription():
    [row] = rows_for("gaps", record("x.fhir.gaps", {"kind": "gap", "last_seen": 4, "arrived": 7}, key=b"sub-1"))
    assert (row.kind, row.values["subscription"], row.values["gap_kind"]) == ("gaps", "sub-1", "gap")
    assert orjson.loads(row.values["record_json"])["arrived"] == 7


def test_undecodable_gap_is_kept_as_unreadable():
    [row] = rows_for("gaps", record("x.fhir.gaps", b"not json"))
    assert row.kind == "unreadable" and row.values["value"] == b"not json"


POINT = {"snapshot_id": "s1", "patient_id": "p1", "scoring_ms": T, "partition": 1, "offset": 2, "idx": 3,
         "trigger": "correction"}


def test_scoring_point_keeps_its_position_in_the_message_and_its_trigger(tmp_path):
    [f] = rows_for("features", record("x.features", POINT | {"features": {"heart_rate_last_24h": 88.0}}))
    score = POINT | {"trigger_event_id": "ev9", "features_hash": "abc123",
                     "input_watermark": {"partition": 1, "offset": 2, "idx": 3, "event_ms": T + 60_000},
                     "model_version": "m1", "path": "model", "probability": 0.3, "news2": 4, "tier": "low",
                     "rationale": []}
    [s] = rows_for("scores", record("x.scores", score))
    assert (f.values["idx"], f.values["trigger"]) == (3, "correction")
    write_part(tmp_path, "features", f.date, [f.values])
    write_part(tmp_path, "scores", s.date, [s.values])
    # what the nightly reads back from the files
    features = rebuild.read_archive(tmp_path, "features")
    assert features.select("idx", "trigger").rows() == [(3, "correction")]
    scores = rebuild.read_archive(tmp_path, "scores")
    assert scores.select("idx", "trigger", "trigger_event_id", "features_hash").rows() == [
        (3, "correction", "ev9", "abc123")]
    assert scores["input_watermark"].struct.field("event_ms").to_list() == [T + 60_000]


def test_a_scores_preliminary_basis_is_a_list_column_analysts_filter_on(tmp_path):
    score = POINT | {"trigger_event_id": "ev9", "features_hash": "abc123", "input_watermark": None,
                     "model_version": "m1", "path": "model", "probability": 0.8, "news2": 4, "tier": "high",
                     "rationale": []}
    rows = [r for i, basis in enumerate((["2524-7"], [], None))
            for r in rows_for("scores", record("x.scores", score | {"snapshot_id": f"s{i}"} |
                                               ({} if basis is None else {"preliminary_basis": basis})))]
    assert [r.values["preliminary_basis"] for r in rows] == [["2524-7"], [], None]  # null: sent before it existed
    write_part(tmp_path, "scores", rows[0].date, [r.values for r in rows])
    scores = rebuild.scores(rebuild.read_archive(tmp_path, "scores"))
    assert scores.filter(scores["preliminary_basis"].list.len() > 0)["snapshot_id"].to_list() == ["s0"]
    [bad] = rows_for("scores", record("x.scores", score | {"preliminary_basis": "2524-7"}))
    assert bad.kind == "unreadable" and "preliminary_basis" in bad.values["error"]


def test_part_files_from_before_the_new_point_columns_still_read(tmp_path):
    old_schema = pa.schema([(n, ARCHIVE_SCHEMAS["features"].field(n).type) for n in ARCHIVE_SCHEMAS["features"].names
                            if n not in ("idx", "trigger")])
    directory = tmp_path / "features" / "date=2024-06-10"
    directory.mkdir(parents=True)
    row = {k: v for k, v in POINT.items() if k not in ("idx", "trigger")} | {
        "features_json": '{"heart_rate_last_24h": 88.0}', "kafka_partition": 0, "kafka_offset": 7,
        "kafka_timestamp_ms": T}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), directory / "part-old.parquet")
    online = rebuild.features_online(rebuild.read_archive(tmp_path, "features"))
    assert online.select("snapshot_id", "idx", "trigger", "heart_rate_last_24h").rows() == [("s1", None, None, 88.0)]


def test_alert_header_routing_fields_become_columns():
    correction = {"header": {"alert_id": "a2", "kind": "correction", "tier": "low", "patient_id": "p1",
                             "encounter_id": "e1", "ward": "ward 7", "scoring_ms": T, "model_version": "m1",
                             "path": "model", "status": "entered-in-error", "original_alert_id": "a1",
                             "reason": None},
                  "resource": {"resourceType": "RiskAssessment", "status": "entered-in-error"}}
    [row] = rows_for("alerts", record("x.alerts", correction))
    assert (row.values["ward"], row.values["status"], row.values["original_alert_id"], row.values["reason"]) == (
        "ward 7", "entered-in-error", "a1", None)
    resolved = {"header": correction["header"] | {"kind": "resolve", "status": "final", "original_alert_id": None,
                                                  "reason": "discharge"}, "resource": {}}
    [row] = rows_for("alerts", record("x.alerts", resolved))
    assert (row.values["kind"], row.values["reason"]) == ("resolve", "discharge")


def test_a_resolution_on_an_incomplete_news2_reaches_the_analysts_alerts_table(tmp_path):
    # the live alert's header names the NEWS2 inputs not charted; the archived row dropped them
    header = {"alert_id": "a1", "kind": "resolve", "tier": "none", "patient_id": "p1", "encounter_id": "e1",
              "ward": None, "scoring_ms": T, "model_version": None, "path": "rule", "status": "final",
              "original_alert_id": None, "reason": None, "preliminary_basis": []}
    rows = [r.values for h in (header | {"incomplete_news2": ["resp_rate_last_24h"]},
                                header | {"alert_id": "a2", "incomplete_news2": []},
                                header | {"alert_id": "a3"})
            for r in rows_for("alerts", record("x.alerts", {"header": h, "resource": {}}))]
    assert [r["incomplete_news2"] for r in rows] == [["resp_rate_last_24h"], [], None]  # null: sent before it
    write_part(tmp_path, "alerts", "2026-01-01", rows)
    alerts = rebuild.alerts(rebuild.read_archive(tmp_path, "alerts"))
    assert alerts.filter(alerts["incomplete_news2"].list.len() > 0)["alert_id"].to_list() == ["a1"]


def test_an_alerts_preliminary_basis_is_a_list_column_analysts_filter_on(tmp_path):
    header = {"alert_id": "a1", "kind": "open", "tier": "high", "patient_id": "p1", "encounter_id": "e1",
              "ward": None, "scoring_ms": T, "model_version": None, "path": "rule", "status": "final",
              "original_alert_id": None, "reason": None}
    flagged = rows_for("alerts", record("x.alerts", {"header": header | {"preliminary_basis": ["2524-7"]},
                                                     "resource": {}}))
    final = rows_for("alerts", record("x.alerts", {"header": header | {"alert_id": "a2", "preliminary_basis": []},
                                                   "resource": {}}))
    before = rows_for("alerts", record("x.alerts", {"header": header | {"alert_id": "a3"}, "resource": {}}))
    rows = [r.values for r in flagged + final + before]
    assert [r["preliminary_basis"] for r in rows] == [["2524-7"], [], None]  # null: sent before the field existed
    write_part(tmp_path, "alerts", flagged[0].date, rows)
    alerts = rebuild.alerts(rebuild.read_archive(tmp_path, "alerts"))
    assert alerts.filter(alerts["preliminary_basis"].list.len() > 0)["alert_id"].to_list() == ["a1"]
    # not a list of codes: the record is kept as unreadable, never a failed part file
    [bad] = rows_for("alerts", record("x.alerts", {"header": header | {"preliminary_basis": "2524-7"},
                                                   "resource": {}}))
    assert bad.kind == "unreadable" and "preliminary_basis" in bad.values["error"]
