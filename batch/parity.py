"""Online/offline parity: the features the stream published vs the features recomputed from the archive.

Both frames have one row per scoring point (patient_id, scoring_ms, partition, offset; two points of
one message can share those, so they are matched by snapshot_id when both frames have it) and one
column per feature. Every online point is compared, feature by feature:

    match  both missing, or both present and |online - offline| <= tolerance

A point the offline side lacks compares as all-missing offline, so it shows up as mismatches. When
both frames carry `snapshot_id` (schemas/cadence.py), points are matched by it.

The scoring-point check (`offline_points` given): the batch derives the scoring points itself from
the cadence rule, and every online point must be one of them and vice versa, matched by snapshot_id
(a function of patient, trigger, T and the triggering event, never of offsets). A point only one side
has is a failure with its reason ("online only": the stream scored where the rule does not;
"offline only": the rule scores where the stream did not), and so is a point both have at different
arrival positions (partition, offset, idx) ("moved": the stream scored before or after the events
the rule says the point sees). An offline point beyond the last archived online snapshot of its
partition is "pending" (the archiver has not landed it yet), not a failure.

The copies check (`online_copies` given): a restart makes the stream publish some snapshots again,
under the same snapshot_id. Identical copies are at-least-once delivery; copies with different
feature values mean the stream's state after the restart was not the state before it (what parity
exists to catch), so they fail even when the first copy matches the offline side.

The late-events cross-check compares the late events the stream published with those the batch
finds by applying the same lateness rule; a late event is identified by (event_id, partition,
offset) and must agree on late_by_ms.

The nightly stores only the mismatch rows and the pending points (`parity_report` table: it stays
small when the planes agree, and empty when they agree fully and nothing is pending) and puts the
summary in the `runs` table. An incremental run checks the patients of stored pending points again,
so a snapshot the stream never published ends as "offline only", as a full run reports it.
"""

from __future__ import annotations

from typing import Iterable

import polars as pl

from schemas.features import FEATURE_NAMES

POINT_KEYS = ("patient_id", "scoring_ms", "partition", "offset")
LATE_KEYS = ("event_id", "partition", "offset")

PARITY_ROW_SCHEMA = {
    "check": pl.String,  # "feature", "late", "point" or "copies"
    "patient_id": pl.String, "scoring_ms": pl.Int64, "partition": pl.Int64, "offset": pl.Int64,
    "feature": pl.String, "event_id": pl.String,
    "online": pl.Float64, "offline": pl.Float64, "abs_diff": pl.Float64, "match": pl.Boolean,
    "detail": pl.String,
}


_OFF = "\x00offline"  # suffix of the offline copy of a feature column while comparing
_DIFFERS = "\x00differs"  # suffix of "this snapshot's copies disagree on the feature"


def feature_parity(online: pl.DataFrame, offline: pl.DataFrame, *, tolerance: float = 1e-9,
                   features: Iterable[str] = FEATURE_NAMES) -> tuple[pl.DataFrame, dict]:
    """Compare every (online point, feature) with the offline value; returns (the disagreeing
    values as long rows: online, offline, abs_diff, match=False; stats).

    Compared wide (one row per point, two columns per feature) and only the disagreements are made
    long: memory grows with points x features floats, not with a string-keyed row per value (which
    took tens of GB on a 5M-event archive).
    stats: values_checked, mismatched, per_feature_mismatches, max_abs_diff."""
    features = [f for f in features if f in online.columns]  # what the stream published is what is checked
    by_id = "snapshot_id" in online.columns and "snapshot_id" in offline.columns
    keys = ["snapshot_id", *POINT_KEYS] if by_id else list(POINT_KEYS)

    def values(frame: pl.DataFrame, suffix: str) -> list[pl.Expr]:
        return [(pl.col(f).cast(pl.Float64) if f in frame.columns else pl.lit(None, pl.Float64)).alias(f + suffix)
                for f in features]

    key_cols = [pl.col(k).cast(PARITY_ROW_SCHEMA.get(k, pl.String)) for k in keys]
    on = online.select(key_cols + values(online, "")).with_row_index("_point")
    off = offline.select(key_cols + values(offline, _OFF)).unique(subset=keys, keep="first")
    both = on.join(off, on=keys, how="left", nulls_equal=True)

    def agrees(f: str) -> pl.Expr:
        a, b = pl.col(f), pl.col(f + _OFF)
        return (pl.when(a.is_null() & b.is_null()).then(True)
                .when(a.is_null() | b.is_null()).then(False)
                .otherwise((a.is_nan() & b.is_nan()) | ((a - b).abs() <= tolerance)))

    verdicts = both.select(*[agrees(f).alias(f) for f in features])
    diffs = both.select(*[(pl.col(f) - pl.col(f + _OFF)).abs().alias(f) for f in features])
    per_feature = {f: n for f in features if (n := int((~verdicts[f]).sum())) > 0}
    max_abs = diffs.select(pl.max_horizontal(pl.all().fill_nan(None).max())).item() if features else None

    disagreeing = both.filter(~pl.all_horizontal(verdicts.get_columns()) if features else pl.lit(False))
    rows = [] if disagreeing.is_empty() else [
        disagreeing.select("_point", *keys, feature=pl.lit(f), online=pl.col(f), offline=pl.col(f + _OFF))
        for f in per_feature]
    if rows:
        long = pl.concat(rows).with_columns(abs_diff=(pl.col("online") - pl.col("offline")).abs())
        long = long.filter(~agrees_long(tolerance)).sort("_point", "feature")
    else:
        long = pl.DataFrame(schema={"_point": pl.UInt32, **{k: PARITY_ROW_SCHEMA.get(k, pl.String) for k in keys},
                                    "feature": pl.String, "online": pl.Float64, "offline": pl.Float64,
                                    "abs_diff": pl.Float64})
    long = long.with_columns(match=pl.lit(False)).drop("_point", *(["snapshot_id"] if by_id else []))
    stats = {"values_checked": both.height * len(features), "mismatched": long.height,
             "per_feature_mismatches": dict(sorted(per_feature.items())),
             "max_abs_diff": float(max_abs) if max_abs is not None else 0.0}
    return long, stats


def agrees_long(tolerance: float) -> pl.Expr:
    a, b = pl.col("online"), pl.col("offline")
    return (pl.when(a.is_null() & b.is_null()).then(True)
            .when(a.is_null() | b.is_null()).then(False)
            .otherwise((a.is_nan() & b.is_nan()) | ((a - b).abs() <= tolerance)))


def last_online_offsets(online: pl.DataFrame) -> pl.DataFrame:
    """Per partition, the offset of the last archived online snapshot (`_reached`)."""
    return online.group_by(pl.col("partition").cast(pl.Int64)).agg(
        pl.col("offset").cast(pl.Int64).max().alias("_reached"))


def point_parity(online: pl.DataFrame, offline_points: pl.DataFrame,
                 reached: pl.DataFrame | None = None) -> pl.DataFrame:
    """Scoring points only one side has, or placed differently, by snapshot_id: one row each with
    `detail` online only / offline only / pending / moved (see the module docstring). `reached`
    (last_online_offsets of every archived snapshot, not only `online`'s) defaults to `online`'s."""
    cols = ["snapshot_id", *POINT_KEYS]

    def keyed(frame: pl.DataFrame) -> pl.DataFrame:
        idx = pl.col("idx") if "idx" in frame.columns else pl.lit(None)
        return frame.select(*[pl.col(c).cast(PARITY_ROW_SCHEMA.get(c, pl.String)) for c in cols],
                            idx.cast(pl.Int64).alias("idx"))

    on, off = keyed(online).unique("snapshot_id"), keyed(offline_points)
    both = on.join(off, on="snapshot_id", suffix="_rule")
    # the same point taken at another arrival position saw other events; an online idx is null in
    # part files from before snapshots carried it, and then only partition and offset can be checked
    moved = (both.filter((pl.col("partition") != pl.col("partition_rule")) | (pl.col("offset") != pl.col("offset_rule"))
                         | (pl.col("idx") != pl.col("idx_rule")).fill_null(False))
             .with_columns(detail=pl.format("moved: the stream scored at (partition, offset, idx) ({}, {}, {}), "
                                            "the rule at ({}, {}, {})", "partition", "offset",
                                            pl.col("idx").cast(pl.String).fill_null("?"), "partition_rule", "offset_rule", "idx_rule"))
             .select(*cols, "idx", "detail"))
    reached = last_online_offsets(on) if reached is None else reached
    offline_only = (off.join(on, on="snapshot_id", how="anti")
                    .join(reached, on="partition", how="left")
                    .with_columns(detail=pl.when(pl.col("_reached").is_not_null() & (pl.col("offset") <= pl.col("_reached")))
                                  .then(pl.lit("offline only: the rule scores here, the stream did not"))
                                  .otherwise(pl.lit("pending: after the last archived online snapshot")))
                    .drop("_reached"))
    online_only = (on.join(off, on="snapshot_id", how="anti")
                   .with_columns(detail=pl.lit("online only: the stream scored where the rule does not")))
    return (pl.concat([online_only, offline_only, moved]).drop("idx")
            .sort("partition", "offset", "patient_id", "scoring_ms", "detail"))


def copy_parity(copies: pl.DataFrame, features: Iterable[str] = FEATURE_NAMES) -> pl.DataFrame:
    """Snapshots the stream published more than once with different values (`copies`: every copy,
    each snapshot's first copy first). One row per (snapshot, feature) whose copies differ, with the
    first copy's value: the one features_online keeps. Identical copies (at-least-once delivery) pass."""
    features = [f for f in features if f in copies.columns]
    per_snapshot = copies.group_by("snapshot_id", maintain_order=True).agg(
        *[pl.col(k).first() for k in POINT_KEYS], *[pl.col(f).first() for f in features],
        *[(pl.col(f).n_unique() > 1).alias(f + _DIFFERS) for f in features])
    rows = [per_snapshot.filter(pl.col(f + _DIFFERS)).select("snapshot_id", *POINT_KEYS, feature=pl.lit(f),
                                                             online=pl.col(f))
            for f in features]
    empty = pl.DataFrame(schema={"snapshot_id": pl.String, **{k: PARITY_ROW_SCHEMA[k] for k in POINT_KEYS},
                                 "feature": pl.String, "online": pl.Float64})
    return pl.concat([empty, *[r.cast(empty.schema) for r in rows]]).sort(*POINT_KEYS, "snapshot_id", "feature")


def late_parity(published: pl.DataFrame, recomputed: pl.DataFrame) -> pl.DataFrame:
    """Late events found by only one side, or with a different late_by_ms; one row each."""
    def keyed(frame: pl.DataFrame, name: str) -> pl.DataFrame:
        return (frame.select(pl.col("event_id").cast(pl.String), pl.col("partition").cast(pl.Int64),
                             pl.col("offset").cast(pl.Int64), pl.col("patient_id").cast(pl.String),
                             pl.col("late_by_ms").cast(pl.Int64).alias(name))
                .unique(subset=list(LATE_KEYS), keep="first"))

    pub, rec = keyed(published, "published_late_by_ms"), keyed(recomputed, "recomputed_late_by_ms")
    both = pub.join(rec, on=list(LATE_KEYS), how="full", coalesce=True, suffix="_rec")
    detail = (pl.when(pl.col("recomputed_late_by_ms").is_null()).then(pl.lit("published only"))
              .when(pl.col("published_late_by_ms").is_null()).then(pl.lit("recomputed only"))
              .when(pl.col("published_late_by_ms") != pl.col("recomputed_late_by_ms")).then(pl.lit("late_by_ms differs"))
              .otherwise(None))
    return (both.with_columns(detail=detail, patient_id=pl.coalesce("patient_id", "patient_id_rec"))
            .filter(pl.col("detail").is_not_null())
            .sort(*LATE_KEYS)
            .select(*LATE_KEYS, "patient_id", "published_late_by_ms", "recomputed_late_by_ms", "detail"))


def _empty_late() -> pl.DataFrame:
    return pl.DataFrame(schema={"event_id": pl.String, "partition": pl.Int64, "offset": pl.Int64,
                                "patient_id": pl.String, "late_by_ms": pl.Int64})


def parity_report(online: pl.DataFrame, offline: pl.DataFrame, *, tolerance: float = 1e-9,
                  late_published: pl.DataFrame | None = None, late_recomputed: pl.DataFrame | None = None,
                  features: Iterable[str] = FEATURE_NAMES, online_points: pl.DataFrame | None = None,
                  offline_points: pl.DataFrame | None = None,
                  online_copies: pl.DataFrame | None = None,
                  reached: pl.DataFrame | None = None) -> tuple[pl.DataFrame, dict]:
    """Compare per (point, feature); returns (rows, summary).

    rows: every disagreement, in the PARITY_ROW_SCHEMA shape (`check` says which: a feature value,
    a late event, a scoring point, copies of a snapshot); `match` is False except for pending points.
    With `offline_points`, the online points (`online_points`, default `online`) are checked against
    them too (check "point"; a pending point is reported with match = True; `reached`: see
    point_parity). With `online_copies` (every archived copy of the snapshots published more than
    once), copies that differ are reported (check "copies", see copy_parity).
    """
    values, stats = feature_parity(online, offline, tolerance=tolerance, features=features)
    late = late_parity(late_published if late_published is not None else _empty_late(),
                       late_recomputed if late_recomputed is not None else _empty_late())

    feature_rows = values.with_columns(check=pl.lit("feature"), event_id=pl.lit(None, pl.String),
                                       detail=pl.lit(None, pl.String))
    late_rows = late.select(
        check=pl.lit("late"), patient_id="patient_id", scoring_ms=pl.lit(None, pl.Int64), partition="partition",
        offset="offset", feature=pl.lit(None, pl.String), event_id="event_id",
        online=pl.col("published_late_by_ms").cast(pl.Float64),
        offline=pl.col("recomputed_late_by_ms").cast(pl.Float64),
        abs_diff=(pl.col("published_late_by_ms") - pl.col("recomputed_late_by_ms")).abs().cast(pl.Float64),
        match=pl.lit(False), detail="detail")
    points = point_parity(online if online_points is None else online_points,
                          offline_points, reached) if offline_points is not None else None
    point_rows = [] if points is None else [points.select(
        check=pl.lit("point"), patient_id="patient_id", scoring_ms="scoring_ms", partition="partition",
        offset="offset", feature=pl.lit(None, pl.String), event_id=pl.lit(None, pl.String),
        online=pl.lit(None, pl.Float64), offline=pl.lit(None, pl.Float64), abs_diff=pl.lit(None, pl.Float64),
        match=pl.col("detail").str.starts_with("pending"), detail="detail").cast(PARITY_ROW_SCHEMA)]
    copies = copy_parity(online_copies, features) if online_copies is not None else None
    copy_rows = [] if copies is None else [copies.select(
        check=pl.lit("copies"), patient_id="patient_id", scoring_ms="scoring_ms", partition="partition",
        offset="offset", feature="feature", event_id=pl.lit(None, pl.String), online="online",
        offline=pl.lit(None, pl.Float64), abs_diff=pl.lit(None, pl.Float64), match=pl.lit(False),
        detail=pl.lit("the stream published this snapshot more than once, with different values")
    ).cast(PARITY_ROW_SCHEMA)]
    rows = pl.concat([feature_rows.select(list(PARITY_ROW_SCHEMA)).cast(PARITY_ROW_SCHEMA),
                      late_rows.select(list(PARITY_ROW_SCHEMA)).cast(PARITY_ROW_SCHEMA), *point_rows, *copy_rows])

    checked = stats["values_checked"]
    summary = {
        "points_checked": online.height,
        "values_checked": checked,
        "mismatched": stats["mismatched"],
        "match_rate": 1.0 if checked == 0 else (checked - stats["mismatched"]) / checked,
        "per_feature_mismatches": stats["per_feature_mismatches"],
        "max_abs_diff": stats["max_abs_diff"],
        "late_published": 0 if late_published is None else late_published.unique(subset=list(LATE_KEYS)).height,
        "late_recomputed": 0 if late_recomputed is None else late_recomputed.unique(subset=list(LATE_KEYS)).height,
        "late_mismatched": late.height,
    }
    if points is not None:
        def count(prefix: str) -> int:
            return points.filter(pl.col("detail").str.starts_with(prefix)).height
        summary |= {"points_offline": offline_points.height, "points_online_only": count("online only"),
                    "points_offline_only": count("offline only"), "points_moved": count("moved"),
                    "points_pending": count("pending")}
    if copies is not None:
        summary["snapshots_with_differing_copies"] = copies["snapshot_id"].n_unique()
    return rows, summary


def parity_ok(summary: dict, max_unexplained_rate: float = 0.0) -> bool:
    """True when the feature mismatch rate, the late-event disagreement rate and the rate of scoring
    points only one side has are all within bound."""
    values_checked = summary["values_checked"]
    feature_rate = summary["mismatched"] / values_checked if values_checked else 0.0
    late_seen = max(summary["late_published"], summary["late_recomputed"])
    late_rate = summary["late_mismatched"] / late_seen if late_seen else 0.0
    unmatched = sum(summary.get(k, 0) for k in ("points_online_only", "points_offline_only", "points_moved",
                                                 "snapshots_with_differing_copies"))
    # a failure in a run that checked nothing else (a re-emitted copy of an old snapshot) still fails
    points_seen = max(summary["points_checked"], summary.get("points_offline", 0), unmatched)
    point_rate = unmatched / points_seen if points_seen else 0.0
    return feature_rate <= max_unexplained_rate and late_rate <= max_unexplained_rate and point_rate <= max_unexplained_rate
