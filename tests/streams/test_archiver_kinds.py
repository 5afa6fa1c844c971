"""The archiver lands the shadow scores and the FHIR subscription gaps too."""

from __future__ import annotations

import orjson

from streams.archiver import ARCHIVE_SCHEMAS, RawRecord, kinds_by_topic, rows_for
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
