"""Parity: online vs offline features per (point, feature), and the late-events cross-check."""

from __future__ import annotations

import polars as pl
import pytest

from batch.parity import parity_ok, parity_report
from schemas.features import FEATURE_NAMES

FEATURES = ["heart_rate_last_24h", "spo2_min_6h", "vitals_count_6h"]


def snapshots(values: list[dict]) -> pl.DataFrame:
    """Two scoring points of two patients; `values` holds each point's features."""
    points = [{"patient_id": "p1", "scoring_ms": 1_000, "partition": 0, "offset": 5},
              {"patient_id": "p2", "scoring_ms": 2_000, "partition": 1, "offset": 7}]
    return pl.DataFrame([p | v for p, v in zip(points, values)],
                        schema_overrides={f: pl.Float64 for f in FEATURES})


ONLINE = [{"heart_rate_last_24h": 88.0, "spo2_min_6h": None, "vitals_count_6h": 3.0},
          {"heart_rate_last_24h": 101.5, "spo2_min_6h": 93.0, "vitals_count_6h": 1.0}]


def late(rows: list[tuple[str, int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame([{"event_id": e, "partition": p, "offset": o, "patient_id": "p1", "late_by_ms": by}
                         for e, p, o, by in rows],
                        schema={"event_id": pl.String, "partition": pl.Int64, "offset": pl.Int64,
                                "patient_id": pl.String, "late_by_ms": pl.Int64})


def test_equal_features_pass():
    rows, summary = parity_report(snapshots(ONLINE), snapshots(ONLINE), features=FEATURES)
    assert summary["points_checked"] == 2
    assert summary["values_checked"] == 6
    assert summary["mismatched"] == 0
    assert summary["match_rate"] == 1.0
    assert rows.is_empty()  # the report lists disagreements only
    assert parity_ok(summary)


def test_skewed_online_value_is_caught_and_named():
    skewed = [ONLINE[0], ONLINE[1] | {"spo2_min_6h": 92.0}]
    rows, summary = parity_report(snapshots(skewed), snapshots(ONLINE), features=FEATURES)
    assert summary["mismatched"] == 1
    assert summary["per_feature_mismatches"] == {"spo2_min_6h": 1}
    assert summary["max_abs_diff"] == pytest.approx(1.0)
    bad = rows.filter(~pl.col("match")).to_dicts()
    assert [(r["patient_id"], r["feature"], r["online"], r["offline"]) for r in bad] == [("p2", "spo2_min_6h", 92.0, 93.0)]
    assert not parity_ok(summary)
    assert parity_ok(summary, max_unexplained_rate=1 / 6)


def test_missing_on_one_side_only_is_a_mismatch_never_a_zero():
    offline = [ONLINE[0] | {"spo2_min_6h": 0.0}, ONLINE[1]]
    _, summary = parity_report(snapshots(ONLINE), snapshots(offline), features=FEATURES)
    assert summary["per_feature_mismatches"] == {"spo2_min_6h": 1}


def test_difference_within_tolerance_matches():
    offline = [ONLINE[0], ONLINE[1] | {"heart_rate_last_24h": 101.5 + 1e-12}]
    _, summary = parity_report(snapshots(ONLINE), snapshots(offline), features=FEATURES)
    assert summary["mismatched"] == 0
    _, strict = parity_report(snapshots(ONLINE), snapshots(offline), features=FEATURES, tolerance=0.0)
    assert strict["per_feature_mismatches"] == {"heart_rate_last_24h": 1}


def test_point_missing_offline_shows_as_mismatches():
    _, summary = parity_report(snapshots(ONLINE), snapshots(ONLINE).head(1), features=FEATURES)
    # p2's three present online values have no offline counterpart
    assert summary["mismatched"] == 3


def test_default_compares_every_feature_name():
    online = snapshots(ONLINE)
    _, summary = parity_report(online, online)
    # only the features present in the frames are compared, all of them
    assert summary["values_checked"] == 2 * len([f for f in FEATURE_NAMES if f in online.columns])


def test_late_cross_check():
    published = late([("e1", 0, 3, 500), ("e2", 0, 4, 100)])
    same_rows, same = parity_report(snapshots(ONLINE), snapshots(ONLINE), features=FEATURES,
                                    late_published=published, late_recomputed=published)
    assert (same["late_published"], same["late_recomputed"], same["late_mismatched"]) == (2, 2, 0)
    assert same_rows.filter(pl.col("check") == "late").is_empty()
    assert parity_ok(same)

    recomputed = late([("e2", 0, 4, 120), ("e3", 1, 9, 10)])
    rows, summary = parity_report(snapshots(ONLINE), snapshots(ONLINE), features=FEATURES,
                                  late_published=published, late_recomputed=recomputed)
    assert summary["late_mismatched"] == 3
    details = {r["event_id"]: r["detail"] for r in rows.filter(pl.col("check") == "late").to_dicts()}
    assert details == {"e1": "published only", "e2": "late_by_ms differs", "e3": "recomputed only"}
    assert not parity_ok(summary)
