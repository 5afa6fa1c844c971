"""Archive -> tables: read the Parquet archive and turn each kind into a clean, deduplicated table.

Pure functions over Polars frames (the nightly, batch/nightly.py, wires them to DuckDB). Every
table is sorted on a unique key, so the same archive always gives identical tables.

Duplicates come from the archiver's at-least-once delivery (and from upstream redeliveries of the
same record); each kind has one dedupe key, the first archived row wins:

    canonical   event_id + arrival position (partition, offset, idx); idx keeps two copies inside
                one micro-batch apart, since those are a real redelivery the rules must see
    late        event_id + partition + offset of the canonical message
    deadletter  source topic/partition/offset + reason (else the dead-letter record's own position)
    features    snapshot_id (copies that differ are a parity failure, not a duplicate)
    scores      snapshot_id
    alerts      alert_id + kind
    scores_shadow  snapshot_id (+ model_version: a shadow score is per candidate model)
    gaps        the gap record's id (a watcher restart republishes it identically), else its Kafka position

Context facts (code_system schemas.codes.CONTEXT: admission, location, discharge, sex, birth year)
are not observations: they become the `patients` and `encounters` tables instead.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from schemas import codes
from schemas.canonical import Status
from schemas.features import FEATURE_NAMES, FEATURE_TYPES
from streams.archiver import ARCHIVE_SCHEMAS, part_files

ARRIVAL = ("partition", "offset", "idx")
POINT_KEYS = ("patient_id", "scoring_ms", "partition", "offset")
# A point's identity is its snapshot_id, not POINT_KEYS: one message can make two points of a patient
# at one time (a run at the last vitals time holding an abnormal reading, a correction or back-charted
# abnormal reading re-scored at the clock), told apart only by idx and snapshot_id. POINT is the columns
# each point row carries in features_offline and labels, so they join features_online and scores one to one.
POINT = ("snapshot_id", *POINT_KEYS, "idx")
_KAFKA_POSITION = ("kafka_partition", "kafka_offset")
# each feature's column type in the DuckDB file, from its spec (schemas.features.FEATURE_TYPES): the same in
# features_online (decoded from JSON, where 7 and 7.0 look alike), features_offline and labels.news2, so an
# analyst compares or unions them without a cast (BIGINT as scores.news2 is; DOUBLE)
FEATURE_DTYPES: dict[str, pl.DataType] = {name: {"integer": pl.Int64, "real": pl.Float64}[value_type]
                                          for name, value_type in FEATURE_TYPES.items()}


def empty_archive_frame(kind: str) -> pl.DataFrame:
    return pl.from_arrow(ARCHIVE_SCHEMAS[kind].empty_table())


def read_archive(archive_dir: Path, kind: str) -> pl.DataFrame:
    """Every finished part file of a kind as one frame (hidden temp files are never read)."""
    files = part_files(archive_dir, kind)
    if not files:
        return empty_archive_frame(kind)
    frames = [pl.read_parquet(f, hive_partitioning=False) for f in files]
    return pl.concat([empty_archive_frame(kind), *frames], how="diagonal_relaxed")


def _first_per_key(frame: pl.DataFrame, key: list[str], order: list[str]) -> pl.DataFrame:
    """The first row per key in `order`, deterministic whatever order the files were read in."""
    return frame.sort([*key, *order], nulls_last=True).unique(subset=key, keep="first", maintain_order=True)


def canonical_events(raw: pl.DataFrame) -> pl.DataFrame:
    """Deduplicated canonical events in arrival order (partition, offset, idx)."""
    return _first_per_key(raw, ["event_id", *ARRIVAL], ["kafka_timestamp_ms"]).sort(*ARRIVAL)


def late_events(raw: pl.DataFrame) -> pl.DataFrame:
    return (_first_per_key(raw, ["event_id", "partition", "offset"], list(_KAFKA_POSITION))
            .sort("partition", "offset", "event_id"))


def dead_letters(raw: pl.DataFrame) -> pl.DataFrame:
    has_source = pl.col("source_topic").is_not_null() & pl.col("source_offset").is_not_null()
    dedupe_key = (pl.when(has_source)
                  .then(pl.concat_str([pl.lit("source"), "source_topic", "source_partition", "source_offset",
                                       pl.col("reason").fill_null("")], separator="|"))
                  .otherwise(pl.concat_str([pl.lit("kafka"), *_KAFKA_POSITION], separator="|")))
    return (_first_per_key(raw.with_columns(_dedupe_key=dedupe_key), ["_dedupe_key"], list(_KAFKA_POSITION))
            .drop("_dedupe_key")
            .sort("source_topic", "source_partition", "source_offset", *_KAFKA_POSITION, nulls_last=True))


def features_online(raw: pl.DataFrame) -> pl.DataFrame:
    """One row per published snapshot: the point (idx and trigger null in part files from before
    the stream sent them), features_json expanded to one Float64 column per feature."""
    return (_expanded(_first_per_key(raw, ["snapshot_id"], list(_KAFKA_POSITION)))
            .sort("partition", "offset", "patient_id", "scoring_ms", "snapshot_id"))


def snapshot_copies(raw: pl.DataFrame) -> pl.DataFrame:
    """Every archived copy of each snapshot, expanded as in features_online, each snapshot's copies
    in Kafka order (the first is the one features_online keeps). A restart re-emits snapshots: the
    copies must agree, and batch/parity.py checks that they do."""
    return _expanded(raw.sort("snapshot_id", *_KAFKA_POSITION, nulls_last=True))


def _expanded(snapshots: pl.DataFrame) -> pl.DataFrame:
    feature_struct = pl.Struct({name: pl.Float64 for name in FEATURE_NAMES})
    return (snapshots.with_columns(pl.col("features_json").str.json_decode(dtype=feature_struct).alias("_features"))
            .select("snapshot_id", *POINT_KEYS, "idx", "trigger", pl.col("_features").struct.unnest()))


def with_feature_types(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """`frame` with every feature column it has cast to FEATURE_DTYPES (what the nightly stores; parity
    compares the values as decoded). A fraction in an integer feature (both planes compute those with
    the same integer scoring rules) is refused, ValueError naming `table` and the column, not truncated."""
    present = [c for c in frame.columns if c in FEATURE_DTYPES]
    for name in present:
        if FEATURE_DTYPES[name] == pl.Int64 and frame.schema[name].is_float() and frame.select(
                (pl.col(name) != pl.col(name).round()).any()).item():
            raise ValueError(f"{table}.{name} holds a fraction, but its spec declares whole numbers "
                             "(schemas/features.py): one plane computes it differently")
    return frame.with_columns(pl.col(c).cast(FEATURE_DTYPES[c]) for c in present)


def scoring_points(online: pl.DataFrame) -> pl.DataFrame:
    """The scoring points of the online snapshots (POINT columns), one per snapshot, in arrival order."""
    return (online.select(*POINT).unique(subset=["snapshot_id"], keep="first")
            .sort("partition", "offset", "idx", "patient_id", "scoring_ms", "snapshot_id", nulls_last=True))


def scores(raw: pl.DataFrame) -> pl.DataFrame:
    return (_first_per_key(raw, ["snapshot_id"], list(_KAFKA_POSITION))
            .sort("partition", "offset", "patient_id", "scoring_ms", "snapshot_id"))


def alerts(raw: pl.DataFrame) -> pl.DataFrame:
    return (_first_per_key(raw, ["alert_id", "kind"], list(_KAFKA_POSITION))
            .rename({"resource_json": "resource"})
            .sort("scoring_ms", "alert_id", "kind", nulls_last=True))


def unreadable(raw: pl.DataFrame) -> pl.DataFrame:
    return _first_per_key(raw, ["topic", *_KAFKA_POSITION], []).sort("topic", *_KAFKA_POSITION)


def scores_shadow(raw: pl.DataFrame) -> pl.DataFrame:
    return (_first_per_key(raw, ["snapshot_id", "model_version"], list(_KAFKA_POSITION))
            .sort("partition", "offset", "patient_id", "scoring_ms", "snapshot_id", "model_version", nulls_last=True))


def gaps(raw: pl.DataFrame) -> pl.DataFrame:
    """One row per gap record: by its id (streams/subscriptions.py record_id, deterministic: the watcher
    killed before its commit publishes the same record again at a later offset), the first in Kafka
    order; a record without an id by its own Kafka position."""
    record_id = pl.col("record_json").str.json_path_match("$.id")
    dedupe_key = (pl.when(record_id.is_not_null()).then(pl.concat_str([pl.lit("id"), record_id], separator="|"))
                  .otherwise(pl.concat_str([pl.lit("kafka"), *_KAFKA_POSITION], separator="|")))
    return (_first_per_key(raw.with_columns(_dedupe_key=dedupe_key), ["_dedupe_key"], list(_KAFKA_POSITION))
            .drop("_dedupe_key").sort(*_KAFKA_POSITION))


_IS_CONTEXT = pl.col("code_system") == codes.CONTEXT


def observation_versions(classified: pl.DataFrame) -> pl.DataFrame:
    """Every version of every measured fact (context facts excluded), once: its first arrival, that
    arrival's outcome and how often it arrived."""
    classified = classified.filter(~_IS_CONTEXT.fill_null(False))
    # per patient: a row moved to another patient keeps its fact id, so the old patient's retraction
    # and the new patient's fact share an event id (each patient's state is separate, as in the stream)
    arrivals = classified.group_by("patient_id", "event_id").len("arrivals")
    return (classified.sort(*ARRIVAL)
            .unique(subset=["patient_id", "event_id"], keep="first", maintain_order=True)
            .join(arrivals, on=["patient_id", "event_id"], how="left")
            .sort("fact_id", "version", "event_id", "patient_id"))


def observations(versions: pl.DataFrame) -> pl.DataFrame:
    """The current (highest) version of each fact, retracted facts excluded, and so are preliminary
    results that the other source's final one replaced (rule 4: the stream no longer uses them; their
    versions stay in observation_versions).

    `outcome` is how the fact first entered the system (accepted, late, duplicate = a
    cross-source copy of another fact, or corrected = the final result of the other source's
    preliminary one, which it replaced); `versions` counts its versions seen.
    """
    key = ["patient_id", "fact_id"]  # (see observation_versions: a moved row's fact leaves one patient)
    first_arrival = (versions.sort(*ARRIVAL).unique(subset=key, keep="first", maintain_order=True)
                     .select(*key, first_outcome="outcome"))
    version_count = versions.group_by(key).len("versions")
    current = versions.sort("fact_id", "version", descending=[False, True]).unique(
        subset=key, keep="first", maintain_order=True)
    replaced = (versions.filter(pl.col("supersedes").is_not_null())
                .select("patient_id", fact_id=pl.col("supersedes").cast(pl.String)))
    return (current.filter(pl.col("status") != Status.ENTERED_IN_ERROR.value)
            .join(replaced, on=key, how="anti")
            .drop("outcome", "arrivals", "supersedes")
            .join(first_arrival, on=key, how="left")
            .join(version_count, on=key, how="left")
            .rename({"first_outcome": "outcome"})
            .sort("fact_id", "patient_id"))


def late_recomputed(classified: pl.DataFrame) -> pl.DataFrame:
    """The events the batch finds late, in the shape of the late_events table's key columns."""
    return (classified.filter(pl.col("outcome") == "late")
            .select("event_id", "partition", "offset", "patient_id", "late_by_ms")
            .sort("partition", "offset", "event_id"))


# --- context facts -> patients and encounters ----------------------------------------------------


def context_facts(events: pl.DataFrame) -> pl.DataFrame:
    """The current version of every context fact (highest version), retracted facts removed."""
    return (events.filter(_IS_CONTEXT.fill_null(False))
            .sort("fact_id", "version", "event_id", descending=[False, True, False])
            .unique(subset=["patient_id", "fact_id"], keep="first", maintain_order=True)
            .filter(pl.col("status") != Status.ENTERED_IN_ERROR.value))


def _latest(facts: pl.DataFrame, code: str, key: str | tuple[str, ...], value: pl.Expr, name: str) -> pl.DataFrame:
    """Per key, the value of the latest fact of `code` by (effective_ms, issued_ms, fact_id)."""
    keys = (key,) if isinstance(key, str) else key
    return (facts.filter(pl.col("code") == code)
            .sort(*keys, "effective_ms", "issued_ms", "fact_id")
            .group_by(*keys, maintain_order=True).agg(value.last().alias(name)))


def patients(events: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
    """One row per patient with any canonical event: sex, birth year (no names, no birth dates) and
    the span of their measurements that stood: the `observations` rows the patient_timeline view shows
    (current versions; retracted facts, preliminary results the other source's final one replaced and
    cross-source copies left out). Over every event, a reading entered in error days after the stay
    stretched the span, and the report's patient-days with it. No such measurement: null span."""
    facts = context_facts(events)
    stood = observations.filter(pl.col("outcome").ne_missing("duplicate"))
    base = (events.select("patient_id").unique()
            .join(stood.group_by("patient_id").agg(first_effective_ms=pl.col("effective_ms").min(),
                                                   last_effective_ms=pl.col("effective_ms").max()),
                  on="patient_id", how="left"))
    encounter_count = (events.filter(pl.col("encounter_id").is_not_null())
                       .group_by("patient_id").agg(encounters=pl.col("encounter_id").n_unique()))
    return (base
            .join(_latest(facts, codes.SEX, "patient_id", pl.col("value_text"), "sex"), on="patient_id", how="left")
            .join(_latest(facts, codes.BIRTH_YEAR, "patient_id", pl.col("value").cast(pl.Int64), "birth_year"),
                  on="patient_id", how="left")
            .join(encounter_count, on="patient_id", how="left")
            .with_columns(pl.col("encounters").fill_null(0).cast(pl.Int64))
            .select("patient_id", "sex", "birth_year", "encounters", "first_effective_ms", "last_effective_ms")
            .sort("patient_id"))


# An encounter id names a stay only within its patient: CDC rows carry the EHR's visit number, FHIR the
# Encounter's identifier (of any system) or, without one, the server's own id (schemas/fhir.py), so two
# patients' encounters can share an id. Keyed by encounter id alone, one patient's admission, discharge and
# ward would be shown as another's.
ENCOUNTER_KEY = ("patient_id", "encounter_id")


def encounters(events: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
    """One row per patient and encounter id seen on any event of that patient: class, admission/discharge
    times, the latest ward. Never merges two patients' encounters that share an id.

    The span (first/last_effective_ms) is over the events of the encounter that stood, as the patients'
    span: the `observations` rows the patient_timeline view shows (retracted readings, superseded
    versions, preliminary results the other source's final one replaced and cross-source copies left
    out) and the current context facts (the admission and discharge included, retracted ones left out).
    Over every event, a reading entered in error days after the stay stretched it. None stood: null span."""
    facts = context_facts(events).filter(pl.col("encounter_id").is_not_null())
    stood = pl.concat([observations.filter(pl.col("outcome").ne_missing("duplicate")).select(*ENCOUNTER_KEY,
                                                                                             "effective_ms"),
                       facts.select(*ENCOUNTER_KEY, "effective_ms")], how="vertical_relaxed")
    seen = (events.filter(pl.col("encounter_id").is_not_null()).select(*ENCOUNTER_KEY).unique()
            .join(stood.filter(pl.col("encounter_id").is_not_null())
                  .group_by(*ENCOUNTER_KEY).agg(first_effective_ms=pl.col("effective_ms").min(),
                                                last_effective_ms=pl.col("effective_ms").max()),
                  on=ENCOUNTER_KEY, how="left"))
    admissions = (facts.filter(pl.col("code") == codes.ADMISSION).sort(*ENCOUNTER_KEY, "effective_ms", "fact_id")
                  .group_by(*ENCOUNTER_KEY, maintain_order=True)
                  .agg(admitted_ms=pl.col("effective_ms").first(), encounter_class=pl.col("value_text").last()))
    discharges = (facts.filter(pl.col("code") == codes.DISCHARGE)
                  .group_by(*ENCOUNTER_KEY).agg(discharged_ms=pl.col("effective_ms").max()))
    locations = facts.filter(pl.col("code") == codes.LOCATION).group_by(*ENCOUNTER_KEY).agg(
        ward_moves=pl.len().cast(pl.Int64))
    ward = _latest(facts, codes.LOCATION, ENCOUNTER_KEY, pl.col("value_text"), "ward")
    out = seen
    for part in (admissions, discharges, ward, locations):
        out = out.join(part, on=ENCOUNTER_KEY, how="left")
    return (out.with_columns(pl.col("ward_moves").fill_null(0))
            .select("encounter_id", "patient_id", "encounter_class", "admitted_ms", "discharged_ms", "ward",
                    "ward_moves", "first_effective_ms", "last_effective_ms")
            .sort("encounter_id", "patient_id"))
