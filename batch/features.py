"""Offline recomputation of patient state and features from the archive, vectorized.

An independent implementation of docs/patient-state.md (the state rules) and schemas/features.py
(the feature semantics): it shares the specs (FEATURES, DERIVED) with the stream, never its code.
Polars applies the state rules; DuckDB computes the window aggregations; NEWS2, its sub-scores and
qSOFA are Polars expressions built from the charts as data (schemas/scores.py NEWS2_BANDS ...), not the
stream's scoring functions. Shared with the stream, by design: on_oxygen's function and the scoring
cadence's (see "derived features" below).

Shapes
    events  one row per canonical event: the CanonicalEvent fields (patient_id, code, value, unit,
            effective_ms, issued_ms, status, source, fact_id, version, encounter_id, value_text,
            event_id) plus its arrival position (partition, offset, idx).
    points  one row per scoring point: patient_id, scoring_ms, partition, offset, and idx (the
            index in the message of the last event the point saw; without it, the whole message).

    classify_events(events, ...)           events in arrival order + outcome, late_by_ms
    scoring_points(events, ...)            the scoring points schemas/cadence.py gives, with idx,
                                           trigger and snapshot_id
    final_facts(events, ...)               the live facts in hindsight (latest versions)
    features_at(events, points, ...)       points + every FEATURE_NAMES column, as of arrival
    features_as_of_issued(events, points)  the same, from what was issued when the point was scored

Context events (code_system == schemas.codes.CONTEXT: encounter and patient facts) are not
measurements: every function here leaves them out before applying the state rules, as the patient
agent keeps them out of the patient's state, so they neither move the clock nor enter a feature.
"""

from __future__ import annotations

import duckdb
import polars as pl

from schemas import codes
from schemas.cadence import VITAL_SIGN_CODES, Trigger, news2_points, raises_news2, scored_news2, snapshot_id
from schemas.canonical import LOINC, Status, make_event_id
from schemas.features import (DERIVED, FEATURE_NAMES, FEATURES, MAX_WINDOW_S, NEWS2_INPUTS, FeatureSpec,
                              news2_charted_parts)
from schemas.scores import (NEWS2_BANDS, NEWS2_CONSCIOUSNESS_POINTS, NEWS2_DECIMALS, NEWS2_OXYGEN_POINTS, NEWS2_PARTS,
                            QSOFA_ALTERED_MENTATION, QSOFA_CRITERIA)
from wardwatch.settings import Settings

ACCEPTED, CORRECTED, DUPLICATE, LATE = "accepted", "corrected", "duplicate", "late"
# Internally the kinds of duplicate stay apart: an alias's later versions must be ignored, and a
# restatement (a higher version, the same content) sets no version of a fact.
_REDELIVERED, _RESTATED, _ALIAS = "redelivered", "restated", "alias"
# rule 6: a retraction the rules add after a FHIR version's row that has nothing to retract (its fact not live
# at a lower version): it is no event, and is dropped once the rules are applied
_VOID = "void"
# rule 6: a new fact of a resource known at a higher version (a stale version): a duplicate that, unlike a
# redelivery, leaves its fact unknown
_STALE = "stale"
_OUTCOME = {ACCEPTED: ACCEPTED, CORRECTED: CORRECTED, LATE: LATE, _REDELIVERED: DUPLICATE, _RESTATED: DUPLICATE,
            _ALIAS: DUPLICATE, _STALE: DUPLICATE}

RETRACTED = Status.ENTERED_IN_ERROR.value
PRELIMINARY = Status.PRELIMINARY.value

# defaults come from the one settings object's declared defaults (no environment read here)
DEFAULT_ALLOWED_LATENESS_MS: int = Settings.model_fields["allowed_lateness_s"].default * 1000
DEFAULT_CROSS_SOURCE_TOLERANCE: float = Settings.model_fields["cross_source_tolerance"].default
DEFAULT_DEDUPE_HORIZON_MS: int = Settings.model_fields["dedupe_horizon_s"].default * 1000
DEFAULT_MIN_INTERVAL_MS: int = Settings.model_fields["scoring_min_interval_s"].default * 1000
END_OF_MESSAGE = 2**62  # the idx of a point given without one: it sees its whole message

_FACT = ["patient_id", "fact_id"]
_ARRIVAL = ["patient_id", "partition", "offset", "idx"]


# --- state rules ---------------------------------------------------------------------------------


def classify_events(events: pl.DataFrame, *, allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                    cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """The measurement events (context facts left out) in arrival order (patient, partition, offset,
    idx) with three added columns:
    `outcome` (accepted / corrected / duplicate / late), `late_by_ms` (null unless late) and
    `supersedes` (on the final result of the other source's preliminary one, rule 4: the fact_id of the
    preliminary fact it replaced, which the stream no longer uses; else null).

    The rules are sequential by nature (the clock depends on which events were accepted, which
    depends on the clock; an alias depends on which facts are live). They are applied exactly by a
    vectorized fixpoint: given a guess of every row's outcome, one pass recomputes each row's
    outcome from the outcomes of the rows *before* it (cumulative maxima per fact and per patient,
    and an equality join for aliases). Each row depends only on earlier rows, so the k-th row of a
    patient is right after k passes and the fixpoint is the sequential result; in practice it is
    reached in 2-3 passes (a pass changes something only after a late first arrival of a fact or
    an alias).

    A restatement (rule 2: a higher version whose content equals the fact's current one) compares
    the row with the fact's last accepted or corrected row before it; every new version of an alias
    is one.

    Readings of the rules where docs/patient-state.md leaves room:
    - a new fact with status entered-in-error is accepted: it enters `known` and moves the clock
      like any accepted fact, but is never live;
    - the latest version wins: a retracted fact corrected again with another status is live again;
    - rule 6 (a FHIR Observation version replaces its resource's facts): after each row carrying
      `version_codes`, a retraction at its version, effective and issued time of each code an earlier
      row of its resource had and that version does not carry (in code order), kept only where it is a
      correction (the fact live at a lower version); outcome corrected, `replaced_by` the row's fact_id.
      A new fact of a resource known at a higher version is a redelivery (a duplicate). A version carrying
      none of the mapped codes is one row, its version marker (code schemas.codes.VERSION_MARK, empty
      `version_codes`, a retraction of a fact never live): every code an earlier row had is dropped;
    - a fact's `known` entry expires as the stream's does (`dedupe_horizon_ms`): the entry is the
      version and effective time of the fact's last row that set it (accepted, corrected, restated or
      an alias), and once that effective time is before (the clock before the row) - horizon the row
      is a new fact (rule 3: late when before clock - lateness; a redelivery of an old version too).
      Rule 6 reads only unexpired entries of the resource's facts. Live facts are not pruned here: no
      window reaches them, except for the final result of a preliminary one through the other source
      (rule 4): it is checked before lateness, so the stream's pruning bound (clock - lateness -
      MAX_WINDOW) is applied to it.
    """
    classified = _classified(events, allowed_lateness_ms, cross_source_tolerance, dedupe_horizon_ms)
    return (classified
            .with_columns(outcome=pl.col("_kind").replace_strict(_OUTCOME, return_dtype=pl.String),
                          late_by_ms=pl.when(pl.col("_kind") == LATE)
                          .then(pl.col("_clock") - allowed_lateness_ms - pl.col("effective_ms")))
            .rename({"_supersedes": "supersedes"})
            .drop("_row", "_fact_repeats", "_key_shared", "_kind", "_clock", *_RULE6_COLUMNS))


POINTS_SCHEMA = {"patient_id": pl.String, "scoring_ms": pl.Int64, "partition": pl.Int64, "offset": pl.Int64,
                 "idx": pl.Int64, "trigger": pl.String, "snapshot_id": pl.String}


def scoring_points(events: pl.DataFrame, *, allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                   cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                   min_interval_ms: int = DEFAULT_MIN_INTERVAL_MS,
                   dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """The scoring points of schemas/cadence.py, in arrival order (POINTS_SCHEMA).

    Runs (adjacent measurement events of one message sharing an effective time) and what each could
    trigger are vectorized; which runs do trigger is one pass over the candidate runs in arrival
    order, because the minimum interval counts from the last point actually taken, and a run inside it
    (or at the last point's own time, or back-charted) scores only when one of its accepted vitals scores
    more NEWS2 points than its parameter gave at the last point taken (schemas.cadence.raises_news2).
    Those per-parameter points are the NEWS2 sub-scores of the features at that point, computed
    beforehand at every candidate point a later rise could be compared with (_candidate_news2)."""
    classified = _classified(events, allowed_lateness_ms, cross_source_tolerance, dedupe_horizon_ms)
    message = pl.struct("patient_id", "partition", "offset")
    new_run = ((message != message.shift(1)) | (pl.col("effective_ms") != pl.col("effective_ms").shift(1))).fill_null(True)
    clock_after = (pl.when(pl.col("_kind") == ACCEPTED).then(pl.col("effective_ms"))
                   .cum_max().forward_fill().over("patient_id"))
    # a retraction of a fact never seen is accepted but is no reading (schemas/cadence.py)
    vital = (pl.col("_kind") == ACCEPTED) & pl.col("code").is_in(list(VITAL_SIGN_CODES)) & (pl.col("status") != RETRACTED)
    runs = (classified
            .with_columns(_run=new_run.cum_sum(), _clock_after=clock_after)
            .group_by("_run", maintain_order=True)
            .agg(pl.col("patient_id", "partition", "offset").first(), pl.col("idx").last(),
                 pl.col("effective_ms").first(), pl.col("_clock_after").last(),
                 _vital=pl.col("event_id").filter(vital).first(),
                 _vital_readings=pl.struct("code", "value", "status").filter(vital),
                 _correction=pl.col("event_id").filter(pl.col("_kind") == CORRECTED).first())
            .filter(pl.col("_vital").is_not_null() | pl.col("_correction").is_not_null()))
    rows = runs.select("patient_id", "partition", "offset", "idx", "effective_ms", "_clock_after", "_vital",
                       "_vital_readings", "_correction").rows()
    news2_at = _candidate_news2(classified, runs, [r[7] for r in rows])
    points, vitals_scored_ms, last_news2 = [], {}, {}
    for patient, partition, offset, idx, T, clock, vital_event, readings, correction_event in rows:
        last = vitals_scored_ms.get(patient)
        # a reading scoring more points than its parameter gave at the last point taken (any trigger)
        scored = last_news2.get(patient, {})
        raises = any(raises_news2(r["code"], r["value"], r["status"] == RETRACTED, scored) for r in readings)
        if vital_event is not None and (
                last is None or (T > last and T - last >= min_interval_ms)
                # a rise is scored inside the interval too, and at the last point's own time
                or (T >= last and raises)):
            vitals_scored_ms[patient] = T
            last_news2[patient] = news2_at.get((patient, T, partition, offset, idx))
            points.append((patient, T, partition, offset, idx, Trigger.VITALS.value, vital_event))
        elif (correction_event is not None or raises) and last is not None:
            # (a rise older than the last vitals point, back-charted: re-scored at the clock)
            last_news2[patient] = news2_at.get((patient, clock, partition, offset, idx))
            points.append((patient, clock, partition, offset, idx, Trigger.CORRECTION.value,
                           correction_event or vital_event))
    return (pl.DataFrame([(*p[:6], snapshot_id(p[0], p[5], p[1], p[6])) for p in points],
                         schema=POINTS_SCHEMA, orient="row")
            .sort("partition", "offset", "idx", maintain_order=True))


# the base features NEWS2's sub-scores are derived from (DERIVED's inputs): what _candidate_news2 computes
_NEWS2_BASE = tuple(s for s in FEATURES if any(s.name in (*d.inputs, *d.optional) for d in DERIVED))


def _candidate_news2(classified: pl.DataFrame, runs: pl.DataFrame,
                     readings: list[list[dict]]) -> dict[tuple, dict[str, int]]:
    """schemas.cadence.scored_news2 of the features at each point a candidate run (`runs`, with its
    accepted vitals' `readings`) could make, keyed by (patient, T, partition, offset, idx): at its
    effective time (vitals) and at the clock after it (correction). Only for the runs before a patient's
    last run holding a reading scoring NEWS2 points, the only kind a rise needs: a later point's is
    never read (absent)."""
    abnormal = [any(news2_points(r["code"], r["value"], r["status"] == RETRACTED) for r in run) for run in readings]
    position = pl.col("patient_id", "partition", "offset", "idx")
    frame = (runs.select(position, "effective_ms", "_clock_after", _abnormal=pl.Series(abnormal, dtype=pl.Boolean))
             .with_row_index("_i")
             .filter(pl.col("_i") < pl.col("_i").filter("_abnormal").max().over("patient_id")))
    candidates = pl.concat([frame.select(position, scoring_ms="effective_ms"),
                            frame.select(position, scoring_ms="_clock_after")]).unique()
    if candidates.is_empty():
        return {}
    at = _features_at_arrival(_fact_versions(classified), candidates, _NEWS2_BASE)
    return {(r["patient_id"], r["scoring_ms"], r["partition"], r["offset"], r["idx"]):
            scored_news2(news2_charted_parts(r)) for r in at.iter_rows(named=True)}


def _classified(events: pl.DataFrame, lateness_ms: int, tolerance: float,
                horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """Rows in arrival order with `_row`, `_kind` (internal outcome), `_supersedes` (the fact_id of the
    preliminary result a final twin replaces, on that corrected row) and `_clock` (clock before the row)."""
    rows = (_with_replacements(measurements(events)
                               .with_columns(pl.col("effective_ms", "issued_ms", "version", "partition", "offset",
                                                    "idx").cast(pl.Int64),
                                             pl.col("value").cast(pl.Float64)))
            # a rule 6 retraction right after its row, in code order
            .sort([*_ARRIVAL, pl.when(pl.col("replaced_by").is_not_null()).then(pl.col("code"))], maintain_order=True)
            .with_row_index("_row")
            # only a fact with several rows has a history; only a row sharing (patient, code,
            # effective time) with another row can be or meet an alias: later steps skip the rest
            .with_columns(_fact_repeats=pl.struct(_FACT).is_duplicated(),
                          _key_shared=pl.struct("patient_id", "code", "effective_ms").is_duplicated()))
    guess = pl.DataFrame({"_kind": pl.repeat(ACCEPTED, rows.height, dtype=pl.String, eager=True),
                          "_supersedes": pl.repeat(None, rows.height, dtype=pl.String, eager=True)})
    for _ in range(rows.height + 1):  # converges within (longest patient history + 1) passes
        step = _one_pass(rows, guess, lateness_ms, tolerance, horizon_ms)
        if step.select(guess.columns).equals(guess):
            return rows.hstack(step).filter(pl.col("_kind") != _VOID)
        guess = step.select(guess.columns)
    raise AssertionError("state rules did not converge")  # impossible: each row depends only on earlier rows


_RULE6_COLUMNS = ("replaced_by", "_resource", "_resource_repeats")
# the codes of a resource's facts, and its version marker's (a version carrying none of them: never live, so
# its candidate retraction is always void; it makes an older version arriving after it stale)
_ALL_CODES = sorted((*codes.CODES, codes.VERSION_MARK))


def _with_replacements(rows: pl.DataFrame) -> pl.DataFrame:
    """Rule 6's candidate retractions: after each row carrying `version_codes` (a FHIR Observation version),
    one per code that an earlier row of the same resource (its fact_id up to ":<code>") had and the version
    does not carry. Adds `replaced_by` (a candidate's: the row's fact_id; else null), `_resource` and
    `_resource_repeats` (the row's resource has several rows, one carrying version_codes: only those rows
    can meet rule 6). Candidates are placed by _classified's sort, right after their row, in code order."""
    if "version_codes" not in rows.columns:  # an archive or frame from before the field: no rule 6
        rows = rows.with_columns(version_codes=pl.lit(None, pl.List(pl.String)))
    fact_id, code = pl.col("fact_id"), pl.col("code")
    resource = (pl.when(code.is_in(_ALL_CODES) & fact_id.str.ends_with(pl.lit(":") + code))
                .then(fact_id.str.head(fact_id.str.len_chars() - code.str.len_chars() - 1)))
    group = ["patient_id", "_resource"]
    rows = (rows.with_columns(_resource=resource, replaced_by=pl.lit(None, pl.String))
            .sort(_ARRIVAL, maintain_order=True).with_row_index("_seq")
            .with_columns(_resource_repeats=(pl.col("_resource").is_not_null()
                                             & pl.col("version_codes").is_not_null().any().over(group)
                                             & (pl.len().over(group) > 1))))
    if not rows["_resource_repeats"].any():  # nearly always: no FHIR resource with two rows
        return rows.drop("_seq")
    members = rows.filter("_resource_repeats")
    first_seen = members.group_by(*group, "code").agg(_first=pl.col("_seq").min())
    versions = members.filter(pl.col("version_codes").is_not_null()).drop("code")
    candidates = (versions.join(first_seen, on=group)
                  .filter(pl.col("_first") < pl.col("_seq"), ~pl.col("version_codes").list.contains(pl.col("code")))
                  .unique(subset=["_seq", "code"], keep="first")
                  .with_columns(replaced_by=pl.col("fact_id"), fact_id=pl.col("_resource") + ":" + pl.col("code"),
                                value=pl.lit(None, pl.Float64), unit=pl.lit(None, pl.String),
                                status=pl.lit(RETRACTED), value_text=pl.lit(None, pl.String),
                                # a fact of a mapped code, whichever row retracts it (a version marker too)
                                **({"code_system": pl.lit(LOINC)} if "code_system" in versions.columns else {}))
                  .drop("_first"))
    if candidates.is_empty():
        return rows.drop("_seq")
    candidates = candidates.with_columns(event_id=pl.struct("fact_id", "version").map_elements(
        lambda r: make_event_id(r["fact_id"], r["version"]), return_dtype=pl.String))
    return pl.concat([rows, candidates.select(rows.columns)], how="vertical_relaxed").drop("_seq")


def _one_pass(rows: pl.DataFrame, guess: pl.DataFrame, lateness_ms: int, tolerance: float,
              horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """Each row's outcome given the guessed outcomes of the rows before it (rules 1-6)."""
    r = rows.hstack(guess)
    # the patient clock before this row: max effective time of accepted new facts
    r = r.with_columns(_clock=pl.when(pl.col("_kind") == ACCEPTED).then(pl.col("effective_ms"))
                       .shift(1).cum_max().forward_fill().over("patient_id"))
    # rules 1-2: the fact's `known` entry before this row, as the stream's: the version and effective time
    # of its last row that set it (accepted, corrected, restated or an alias; a redelivery, a late or a
    # stale row leaves it). Each such row has a higher version than the one before (or the entry had
    # expired), so the version is the highest known
    sets_known = pl.col("_kind").is_in([ACCEPTED, CORRECTED, _RESTATED, _ALIAS])
    repeated = r.filter("_fact_repeats").select(
        "_row", *(pl.when(sets_known).then(pl.col(c)).shift(1).forward_fill().over(_FACT).alias(f"_known_{c}")
                  for c in ("version", "effective_ms")))
    r = r.join(repeated, on="_row", how="left", maintain_order="left")
    # the entry expires once its effective time is older than clock - dedupe horizon (the stream forgets
    # it): the row is then a new fact (rule 3 may make it late)
    expired = (pl.col("_known_effective_ms") < pl.col("_clock") - horizon_ms).fill_null(False)
    r = r.with_columns(_known_version=pl.when(expired).then(None).otherwise(pl.col("_known_version")))
    r = _with_resource_version(r, sets_known, horizon_ms)
    is_new = pl.col("_known_version").is_null()
    is_late = (is_new & (pl.col("effective_ms") < pl.col("_clock") - lateness_ms)).fill_null(False)
    candidates = r.filter(is_new & ~is_late & pl.col("value").is_not_null() & pl.col("_key_shared"))
    versions = _live_versions(r)
    alias_rows = _alias_rows(versions, candidates, tolerance)
    r = _with_current_content(r)
    # rule 4, a final result of a live preliminary one through the other source: a new fact (before
    # rule 3: never late) or a new version of an alias
    is_alias = pl.col("_cur__kind") == _ALIAS
    final = ((pl.col("status") != PRELIMINARY) & (pl.col("status") != RETRACTED) & pl.col("value").is_not_null()
             & pl.col("_key_shared"))
    # ... or a new version of the fact itself made final that is not a restatement (rule 2 then 4)
    newer = pl.col("version") > pl.col("_known_version")
    finals = r.filter(final & (is_new | (newer & (is_alias.fill_null(False) | ~_restates))).fill_null(False))
    r = r.drop("_supersedes").join(_finalising_rows(versions, finals, lateness_ms), on="_row", how="left",
                                   maintain_order="left")
    # rule 6: a new fact of a resource known at a higher version is a stale version (before rules 3 and 4)
    stale = (is_new & pl.col("replaced_by").is_null() & pl.col("version_codes").is_not_null()
             & (pl.col("_resource_version") > pl.col("version"))).fill_null(False)
    r = r.with_columns(_supersedes=pl.when(stale).then(None).otherwise(pl.col("_supersedes")))
    finalises = pl.col("_supersedes").is_not_null()
    kind = (pl.when(stale).then(pl.lit(_STALE))
            .when(~is_new).then(pl.when(pl.col("version") <= pl.col("_known_version")).then(pl.lit(_REDELIVERED))
                                  .when(finalises).then(pl.lit(CORRECTED))
                                  .when(_restates).then(pl.lit(_RESTATED))
                                  .otherwise(pl.lit(CORRECTED)))
            .when(finalises).then(pl.lit(CORRECTED))
            .when(is_late).then(pl.lit(LATE))
            .when(pl.col("_row").is_in(alias_rows.implode())).then(pl.lit(_ALIAS))
            .otherwise(pl.lit(ACCEPTED)))
    # a rule 6 retraction is one only where it corrects (its fact live at a lower version): else it is void
    kind = pl.when(pl.col("replaced_by").is_not_null() & (kind != CORRECTED)).then(pl.lit(_VOID)).otherwise(kind)
    return r.select(kind.alias("_kind"), pl.col("_supersedes"), pl.col("_clock"))


def _with_resource_version(r: pl.DataFrame, sets_known: pl.Expr, horizon_ms: int) -> pl.DataFrame:
    """Rule 6: add `_resource_version`, the highest version of the `known` entries of the row's resource's
    facts before it that have not expired (effective time >= clock - horizon, as the stream's
    _superseded); null for rows of a resource without rule 6 (not `_resource_repeats`)."""
    members = r.filter("_resource_repeats")
    if members.is_empty():  # nearly always: no FHIR resource with two rows
        return r.with_columns(_resource_version=pl.lit(None, pl.Int64))
    group = ["patient_id", "_resource"]
    setters = members.filter(sets_known).select(*group, "fact_id", _set_row="_row", _set_version="version",
                                                _set_effective_ms="effective_ms")
    # each fact's entry before the row: its last setting row before it
    entries = (members.select("_row", *group, "_clock").join(setters, on=group)
               .filter(pl.col("_set_row") < pl.col("_row"))
               .filter(pl.col("_set_row") == pl.col("_set_row").max().over("_row", "fact_id")))
    live = pl.col("_clock").is_null() | (pl.col("_set_effective_ms") >= pl.col("_clock") - horizon_ms)
    versions = entries.filter(live).group_by("_row").agg(_resource_version=pl.col("_set_version").max())
    return r.join(versions, on="_row", how="left", maintain_order="left")


def _with_current_content(r: pl.DataFrame) -> pl.DataFrame:
    """Add the fact's current content before each row (`_cur_*`: the columns of its last accepted,
    corrected or alias row; null for a row with no such row before it). A preliminary result replaced
    by its final twin since that row is an alias (`_cur__kind`)."""
    sets_content = pl.col("_kind").is_in([ACCEPTED, CORRECTED, _ALIAS])
    r = _over_repeated_facts(r, "_content_row", pl.when(sets_content).then(pl.col("_row")).shift(1).forward_fill())
    current = r.filter("_fact_repeats").select(
        pl.col("_row").alias("_content_row"),
        *(pl.col(c).alias(f"_cur_{c}") for c in ("_kind", "code", "value", "effective_ms", "status")))
    r = r.join(current, on="_content_row", how="left", maintain_order="left")
    replaced = r.filter(pl.col("_supersedes").is_not_null()).select("patient_id", fact_id="_supersedes",
                                                                    _replaced_row="_row")
    if replaced.is_empty():  # nearly always: no preliminary result was made final through the other source
        return r
    # only a later row of the replaced fact can see it: those facts repeat
    later = (r.filter("_fact_repeats").select("_row", "patient_id", "fact_id").sort("_row")
             .join_asof(replaced.sort("_replaced_row"), left_on="_row", right_on="_replaced_row",
                        by=["patient_id", "fact_id"], strategy="backward", allow_exact_matches=False,
                        check_sortedness=False)
             .select("_row", "_replaced_row"))
    alias_since = pl.col("_replaced_row").is_not_null() & (pl.col("_content_row").is_null()
                                                            | (pl.col("_replaced_row") > pl.col("_content_row")))
    return (r.join(later, on="_row", how="left", maintain_order="left")
            .with_columns(_cur__kind=pl.when(alias_since).then(pl.lit(_ALIAS)).otherwise(pl.col("_cur__kind")))
            .drop("_replaced_row"))


# rule 2: the row restates the fact's current content: an alias (its content is never used); a
# retraction of a retracted fact; or the same code, value, effective time and preliminary mark
_restates = ((pl.col("_cur__kind") == _ALIAS)
             | ((pl.col("_cur_status") == RETRACTED) & (pl.col("status") == RETRACTED))
             | ((pl.col("_cur_status") != RETRACTED) & (pl.col("status") != RETRACTED)
                & (pl.col("code") == pl.col("_cur_code")) & (pl.col("effective_ms") == pl.col("_cur_effective_ms"))
                & pl.col("value").eq_missing(pl.col("_cur_value"))
                & ((pl.col("status") == PRELIMINARY) == (pl.col("_cur_status") == PRELIMINARY)))).fill_null(False)


def _live_versions(r: pl.DataFrame) -> pl.DataFrame:
    """The versions a candidate row of rules 4 can match, with `_next_version_row` (the fact's next
    version row, or the row of the final twin that replaced it).

    A fact is live at row i when it entered as accepted or as a final twin (not as an alias) and its
    current version (its last accepted/corrected row before i) is not a retraction, nor replaced
    before i by a final twin; the current version holds the code, effective time, value and status
    to compare. A row does not end the fact it replaces for itself (`>=`), so that it still finds it.
    """
    versions = _over_repeated_facts(_fact_versions(r), "_next_version_row", pl.col("_row").shift(-1), "_vrow")
    return (versions.filter((pl.col("status") != RETRACTED) & pl.col("value").is_not_null() & pl.col("_key_shared"))
            .select("_row", "_next_version_row", "patient_id", "fact_id", "code", "effective_ms", "source", "value",
                    "status"))


def _live_at(candidates: pl.DataFrame, versions: pl.DataFrame) -> pl.DataFrame:
    """Each candidate row joined with the versions live at it with the same (patient, code, effective
    time) from the other source (`*_live` columns)."""
    return (candidates.join(versions, on=["patient_id", "code", "effective_ms"], suffix="_live")
            .filter(pl.col("_row_live") < pl.col("_row"),
                    pl.col("_next_version_row").is_null() | (pl.col("_next_version_row") >= pl.col("_row")),
                    pl.col("source_live") != pl.col("source")))


def _alias_rows(versions: pl.DataFrame, candidates: pl.DataFrame, tolerance: float) -> pl.Series:
    """Rule 4: candidate rows (new, not late) matching a live fact of another source within tolerance,
    or preliminary ones matching a final one."""
    matches = (_live_at(candidates.select("_row", "patient_id", "code", "effective_ms", "source", "value", "status"),
                        versions)
               .filter(((pl.col("value_live") - pl.col("value")).abs() <= tolerance)
                       # a preliminary result of one already final through the other source, whatever its value
                       | ((pl.col("status") == PRELIMINARY) & (pl.col("status_live") != PRELIMINARY))))
    return matches["_row"].unique()


def _finalising_rows(versions: pl.DataFrame, finals: pl.DataFrame, lateness_ms: int) -> pl.DataFrame:
    """Rule 4, a final result of a preliminary one: `finals` rows (final results, new or of an alias)
    matching a live preliminary fact of another source, whatever its value, that is not logically
    pruned (the stream's state drops facts at or before clock - lateness - MAX_WINDOW); per row the
    first such fact by fact_id (`_supersedes`)."""
    not_pruned = pl.col("_clock").is_null() | (pl.col("effective_ms") > pl.col("_clock") - lateness_ms
                                                - MAX_WINDOW_S * 1000)
    return (_live_at(finals.filter(not_pruned).select("_row", "patient_id", "code", "effective_ms", "source"),
                     versions.filter(pl.col("status") == PRELIMINARY))
            .group_by("_row").agg(_supersedes=pl.col("fact_id").min()))


def _fact_versions(classified: pl.DataFrame) -> pl.DataFrame:
    """The rows that set a live-eligible fact's state (its entry, accepted or as a final twin, then
    corrections), in arrival order. Retractions are kept: they end the previous version's visibility;
    so does a final twin replacing a preliminary fact (rule 4): a retraction of that fact is added at
    the twin's row. An alias's rows are left out. `_vrow` numbers the rows (an added one shares `_row`)."""
    enters = (pl.col("_kind") == ACCEPTED) | pl.col("_supersedes").is_not_null()
    entered = _over_repeated_facts(classified, "_entered", enters.any())
    versions = (entered.filter(pl.col("_kind").is_in([ACCEPTED, CORRECTED]) & pl.coalesce("_entered", enters))
                .drop("_entered"))
    replaced = versions.filter(pl.col("_supersedes").is_not_null())
    if replaced.is_empty():  # nearly always: no preliminary result was made final through the other source
        return versions.with_row_index("_vrow")
    ends = replaced.with_columns(fact_id=pl.col("_supersedes"), status=pl.lit(RETRACTED),
                                 value=pl.lit(None, pl.Float64), _supersedes=pl.lit(None, pl.String))
    # a replaced fact has a row more now: _fact_repeats must say so (_over_repeated_facts relies on it)
    return (pl.concat([versions, ends]).sort("_row", maintain_order=True)
            .with_columns(_fact_repeats=pl.struct(_FACT).is_duplicated()).with_row_index("_vrow"))


def _over_repeated_facts(frame: pl.DataFrame, name: str, expr: pl.Expr, key: str = "_row") -> pl.DataFrame:
    """Add `expr` evaluated per fact over the rows of facts seen more than once, null for the others.

    Callers pass expressions about a fact's *other* rows, which a fact seen once does not have.
    Skipping the one-row facts matters: a window over millions of tiny groups is slow. `key`: a
    column unique in `frame` (_fact_versions' frames have `_vrow`: an added row shares `_row`).
    """
    repeated = frame.filter("_fact_repeats").select(key, expr.over(_FACT).alias(name))
    return frame.join(repeated, on=key, how="left", maintain_order="left")


def final_facts(events: pl.DataFrame, *, allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """The live facts once everything has arrived (hindsight, e.g. for labels): each accepted fact at
    its latest version, retracted facts removed; the event columns of that version."""
    versions = _fact_versions(_classified(events, allowed_lateness_ms, cross_source_tolerance,
                                          dedupe_horizon_ms))
    return (versions.unique(subset=_FACT, keep="last", maintain_order=True)
            .filter((pl.col("status") != RETRACTED) & pl.col("value").is_not_null())
            .drop("_row", "_vrow", "_fact_repeats", "_key_shared", "_kind", "_supersedes", "_clock",
                  *_RULE6_COLUMNS))


# --- features ------------------------------------------------------------------------------------


def features_at(events: pl.DataFrame, points: pl.DataFrame, *,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """Every feature at each point, over the facts visible at the point's arrival position: each
    fact at its latest version with arrival position <= (partition, offset, idx) of the point (a
    point without idx sees its whole message); retracted facts excluded.

    Returns the points (input order, input columns) plus one column per FEATURE_NAMES entry.
    """
    classified = _classified(events, allowed_lateness_ms, cross_source_tolerance, dedupe_horizon_ms)
    return _features_at_arrival(_fact_versions(classified), points)


def _features_at_arrival(versions: pl.DataFrame, points: pl.DataFrame,
                         specs: tuple[FeatureSpec, ...] = FEATURES) -> pl.DataFrame:
    """features_at from the fact versions (_fact_versions), of `specs` and the derived features."""
    points = points.with_columns(pl.col("scoring_ms", "partition", "offset").cast(pl.Int64))
    point_idx = pl.col("idx").cast(pl.Int64).fill_null(END_OF_MESSAGE) if "idx" in points.columns else pl.lit(END_OF_MESSAGE)
    at_position = points.select("partition", "offset", idx=point_idx)
    # one global order of arrival positions, so events and points compare by a single integer
    positions = (pl.concat([versions.select("partition", "offset", "idx"), at_position])
                 .unique().sort("partition", "offset", "idx").with_row_index("_pos")
                 .with_columns(pl.col("_pos").cast(pl.Int64)))
    versions = _over_repeated_facts(
        versions.join(positions, on=["partition", "offset", "idx"], how="left", maintain_order="left"),
        "_until", pl.col("_pos").shift(-1), "_vrow").with_columns(_from=pl.col("_pos"))
    at = at_position.join(positions, on=["partition", "offset", "idx"], how="left", maintain_order="left")["_pos"]
    return _features(versions, points, at, specs)


def features_as_of_issued(events: pl.DataFrame, points: pl.DataFrame, *,
                          allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                          cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE,
                dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> pl.DataFrame:
    """Every feature at each point from what could be known when it was scored: each fact at its
    highest version issued by then (known_at_ms), effective in the windows ending at scoring_ms
    (training without leakage). The state rules (dedupe, lateness, aliases) are the same as online;
    points need only patient_id, scoring_ms (then known at scoring_ms); with partition and offset
    (and idx) the issue time of the message that triggered the point counts too.
    """
    versions = _fact_versions(_classified(events, allowed_lateness_ms, cross_source_tolerance,
                                          dedupe_horizon_ms))
    # version v is the visible one from its issue time until a later version has been issued
    issued_later = pl.col("issued_ms").reverse().cum_min().reverse().shift(-1)
    versions = _over_repeated_facts(versions, "_until", issued_later, "_vrow").with_columns(_from=pl.col("issued_ms"))
    points = points.with_columns(pl.col("scoring_ms").cast(pl.Int64))
    return _features(versions, points, known_at_ms(events, points))


def known_at_ms(events: pl.DataFrame, points: pl.DataFrame) -> pl.Series:
    """Per point (input order): the issue time up to which it could know facts. The scoring time, or
    later when the readings of the message that triggered it (up to the point's idx) were issued later:
    the stream scores a point when that message arrives, with its readings in the features. A CDC
    vitals row is committed (issued) a minute or two after it was charted at T, so `issued <= T`
    would train every vitals point on the round before it, while the served model sees the round
    itself (time since the last heart rate 0 s, not an hour). Points without partition and offset:
    the scoring time."""
    scoring = points["scoring_ms"].cast(pl.Int64)
    if not {"partition", "offset"} <= set(points.columns) or events.is_empty():
        return scoring
    message = ["patient_id", "partition", "offset"]
    point_idx = pl.col("idx").cast(pl.Int64).fill_null(END_OF_MESSAGE) if "idx" in points.columns else pl.lit(END_OF_MESSAGE)
    position = [pl.col("patient_id"), pl.col("partition", "offset").cast(pl.Int64)]
    issued = (events.select(*position, pl.col("idx").cast(pl.Int64), pl.col("issued_ms").cast(pl.Int64))
              .sort("idx").with_columns(_issued=pl.col("issued_ms").cum_max().over(message)))
    seen = (points.select(*position, idx=point_idx)
            .with_row_index("_point").sort("idx")
            .join_asof(issued.select(*message, "idx", "_issued"), on="idx", by=message, strategy="backward",
                       check_sortedness=False)  # sorted above
            .sort("_point"))
    # a point whose message has no event of its patient (none in `events`) knows what was issued by T
    return pl.DataFrame({"t": scoring, "i": seen["_issued"]}).select(known_at_ms=pl.max_horizontal("t", "i"))["known_at_ms"]


def _features(versions: pl.DataFrame, points: pl.DataFrame, at: pl.Series,
              specs: tuple[FeatureSpec, ...] = FEATURES) -> pl.DataFrame:
    """Window aggregations of every spec (of `specs`: they must hold the derived features' inputs), then
    the derived features.

    `versions` carry a visibility interval [_from, _until) in the same units as `at` (one value per
    point): arrival positions or issue times. Intervals of one fact never overlap, so a point sees
    at most one version of each fact.
    """
    facts = (versions.filter((pl.col("status") != RETRACTED) & pl.col("value").is_not_null())
             .select("patient_id", "fact_id", "code", "effective_ms", "value", "_from", "_until"))
    keyed = points.with_row_index("_point").with_columns(_at=at.cast(pl.Int64))
    out = keyed
    for code, of_code in _specs_by_code(specs).items():
        aggregated = _window_aggregates(facts.filter(pl.col("code") == code), keyed, of_code)
        out = out.join(aggregated, on="_point", how="left", maintain_order="left")
    counts = [s.name for s in specs if s.agg == "count"]
    out = out.with_columns(pl.col(counts).fill_null(0))
    names = FEATURE_NAMES if specs is FEATURES else (*(s.name for s in specs), *(d.name for d in DERIVED))
    return _with_derived(out).select(*points.columns, *names)


def measurements(events: pl.DataFrame) -> pl.DataFrame:
    """The events without context facts (code_system CONTEXT); an archive without a code_system
    column predates context facts and holds measurements only."""
    if "code_system" not in events.columns:
        return events
    return events.filter(pl.col("code_system").is_null() | (pl.col("code_system") != codes.CONTEXT))


def _specs_by_code(specs: tuple[FeatureSpec, ...] = FEATURES) -> dict[str, list[FeatureSpec]]:
    by_code: dict[str, list[FeatureSpec]] = {}
    for spec in specs:
        by_code.setdefault(spec.code, []).append(spec)
    return by_code


def _aggregate_sql(spec: FeatureSpec) -> str:
    in_window = f"FILTER (WHERE f.effective_ms > p.scoring_ms - {int(spec.window_s) * 1000})"
    # the greatest / least (effective_ms, fact_id): a struct compares field by field
    last = f"arg_max(f.value, struct_pack(e := f.effective_ms, i := f.fact_id)) {in_window}"
    first = f"arg_min(f.value, struct_pack(e := f.effective_ms, i := f.fact_id)) {in_window}"
    expr = {
        "last": last,
        # a left fold in (effective_ms, fact_id) order, as the spec sums (avg's order is the join's)
        "mean": f"list_reduce(list(f.value ORDER BY f.effective_ms, f.fact_id) {in_window}, lambda a, b: a + b) "
                f"/ count(*) {in_window}",
        "min": f"min(f.value) {in_window}",
        "max": f"max(f.value) {in_window}",
        "count": f"count(*) {in_window}",
        "time_since_last_s": f"CAST(p.scoring_ms - max(f.effective_ms) {in_window} AS DOUBLE) / 1000",
        "delta": f"CASE WHEN count(*) {in_window} >= 2 THEN {last} - {first} END",
        # the window's facts in (effective_ms, fact_id) order; _SLOPE_STAGES fits the line
        "slope": f"list(struct_pack(e := f.effective_ms, v := f.value) ORDER BY f.effective_ms, f.fact_id) {in_window}",
    }[spec.agg]
    return f'{expr} AS "{spec.name}"'


# The slope from a window's ordered facts, in the spec's arithmetic and summation order (hours from
# the window's first fact, centred sums added first to last), so it is the stream's result to the
# last bit. A stage per step: a lambda may read a column, but an aggregate inside a lambda would be
# recomputed per element. {c} is the column; list_reduce is a left fold.
_SLOPE_STAGES = (
    # times: only when the window spans two distinct times (else the slope is missing); a window
    # without facts gives a NULL list, never an empty one (list_reduce refuses those)
    """CASE WHEN len("{c}") >= 2 AND "{c}"[-1].e > "{c}"[1].e
         THEN list_transform("{c}", lambda x: CAST(x.e - "{c}"[1].e AS DOUBLE) / 3600000.0) END AS "{c}:t",
       list_transform("{c}", lambda x: x.v) AS "{c}:v" """,
    """list_reduce("{c}:t", lambda a, b: a + b) / len("{c}:t") AS "{c}:mean_t",
       CASE WHEN "{c}:t" IS NOT NULL THEN list_reduce("{c}:v", lambda a, b: a + b) / len("{c}:v") END
         AS "{c}:mean_v" """,
    """list_reduce(list_transform("{c}:t", lambda t, i: (t - "{c}:mean_t") * ("{c}:v"[i] - "{c}:mean_v")),
                   lambda a, b: a + b)
       / list_reduce(list_transform("{c}:t", lambda t: (t - "{c}:mean_t") * (t - "{c}:mean_t")), lambda a, b: a + b)
       AS "{c}:slope" """,
)


def _with_slopes(select_sql: str, slope_columns: list[str]) -> str:
    """Wrap the aggregating query so each slope column (ordered facts) becomes its slope per hour."""
    sql = select_sql
    for stage in _SLOPE_STAGES:
        sql = f"SELECT *, {', '.join(stage.format(c=c) for c in slope_columns)} FROM ({sql})"
    helpers = [f'"{c}{suffix}"' for c in slope_columns for suffix in (":t", ":v", ":mean_t", ":mean_v", ":slope")]
    replaced = ", ".join(f'"{c}:slope" AS "{c}"' for c in slope_columns)
    return f"SELECT * EXCLUDE ({', '.join(helpers)}) REPLACE ({replaced}) FROM ({sql})"


def _window_aggregates(facts: pl.DataFrame, points: pl.DataFrame, specs: list[FeatureSpec]) -> pl.DataFrame:
    """The specs of one code at every point, via one band join in DuckDB.

    The join is an equality join on (patient, day bucket): a fact is copied into its own bucket and
    the next, and a point looks only in its own bucket, so it meets every fact of (T - MAX_WINDOW, T]
    exactly once and nothing older. The join stays linear in the data (points x facts of two buckets)
    instead of points x a patient's whole history.
    """
    bucket_ms = MAX_WINDOW_S * 1000
    widest_ms = max(s.window_s for s in specs) * 1000
    facts = facts.with_columns(_bucket=pl.col("effective_ms") // bucket_ms)
    facts = pl.concat([facts, facts.with_columns(pl.col("_bucket") + 1)])
    points = points.select("_point", "patient_id", "scoring_ms", "_at", _bucket=pl.col("scoring_ms") // bucket_ms)
    sql = f"""
        SELECT p._point, {", ".join(_aggregate_sql(s) for s in specs)}
        FROM points p JOIN facts f ON f.patient_id = p.patient_id AND f._bucket = p._bucket
        WHERE f.effective_ms <= p.scoring_ms AND f.effective_ms > p.scoring_ms - {widest_ms}
          AND f._from <= p._at AND (f._until IS NULL OR f._until > p._at)
        GROUP BY p._point, p.scoring_ms
    """
    slopes = [s.name for s in specs if s.agg == "slope"]
    if slopes:
        sql = _with_slopes(sql, slopes)
    with duckdb.connect() as con:
        con.register("facts", facts.to_arrow())
        con.register("points", points.to_arrow())
        result = con.sql(sql).pl()
    return result.with_columns(pl.col("_point").cast(points.schema["_point"]))


# --- derived features: NEWS2 and qSOFA from the charts as data -----------------------------------
# The stream scores with the if-chains of schemas/scores.py; the batch builds Polars expressions from the
# same charts declared as data there (NEWS2_BANDS, QSOFA_CRITERIA, ...), so parity compares two encodings of
# the chart: a band edge or a rounding wrong in either shows as a mismatch. Charting uses the functions'
# float operations (floor(x * 10**d + 0.5) / 10**d), so the charted values, and the points, are identical.
# Two derived rules stay shared, as Python functions both planes call:
# - on_oxygen (schemas.features._on_oxygen): which flow, FiO2 or unmetered-oxygen fact belongs to the latest
#   SpO2's round is a rule of the patient state (times since, the same-round tolerance), not a chart; its
#   inputs are the windowed features both planes compute independently, which parity does compare;
# - the scoring cadence (schemas/cadence.py raises_news2, scored_news2, news2_points via
#   schemas.features.news2_charted_parts), which decides when a point is taken: parity compares the points
#   the two planes take, not a second encoding of the rule.

# the feature each NEWS2 parameter reads (schemas.features NEWS2_INPUTS lists them in NEWS2_PARTS order)
_NEWS2_INPUT = dict(zip(NEWS2_PARTS, NEWS2_INPUTS, strict=True))
_QSOFA_INPUT = {"resp_rate": _NEWS2_INPUT["resp_rate"], "systolic_bp": _NEWS2_INPUT["systolic_bp"],
                "consciousness": _NEWS2_INPUT["consciousness"]}


def _charted(part: str) -> pl.Expr:
    """The parameter's input charted to the chart's precision, rounded half up."""
    x = pl.col(_NEWS2_INPUT[part]).cast(pl.Float64)
    scale = 10 ** NEWS2_DECIMALS[part]
    return (x + 0.5).floor() if scale == 1 else (x * scale + 0.5).floor() / scale


def _acvpu_level() -> pl.Expr:
    """The ACVPU letter of the consciousness ordinal (truncated to a whole number, as int() does)."""
    return (pl.col(_NEWS2_INPUT["consciousness"]).cast(pl.Int64)
            .replace_strict(dict(enumerate(codes.ACVPU)), return_dtype=pl.String))


def _news2_part(part: str) -> pl.Expr:
    if part == "air_or_oxygen":
        return pl.when(pl.col(_NEWS2_INPUT[part]) == 1).then(NEWS2_OXYGEN_POINTS).otherwise(0)
    if part == "consciousness":
        return _acvpu_level().replace_strict(NEWS2_CONSCIOUSNESS_POINTS, return_dtype=pl.Int64)
    charted = _charted(part)
    (upper, points), *rest = NEWS2_BANDS[part]
    chain = pl.when(charted <= upper).then(points)
    for upper, points in rest:
        chain = chain.when(charted <= upper).then(points)
    return chain


def _qsofa() -> pl.Expr:
    met = []
    for part, (lo, hi) in QSOFA_CRITERIA.items():
        charted = (pl.col(_QSOFA_INPUT[part]).cast(pl.Float64) + 0.5).floor()
        met.append(((charted >= lo) & (charted <= hi)).cast(pl.Int64))
    met.append(_acvpu_level().is_in(sorted(QSOFA_ALTERED_MENTATION)).cast(pl.Int64))
    return pl.sum_horizontal(met)


def _derived_expressions() -> dict[str, pl.Expr]:
    parts = {f"news2_{part}": _news2_part(part) for part in NEWS2_PARTS}
    return {**parts, "news2": pl.sum_horizontal(list(parts.values())), "qsofa": _qsofa()}


_DERIVED_EXPRESSIONS = _derived_expressions()
_SHARED_DERIVED = frozenset({"on_oxygen"})  # see above: computed with the shared function
_unplanned = {d.name for d in DERIVED} - set(_DERIVED_EXPRESSIONS) - _SHARED_DERIVED
if _unplanned:  # a new derived feature needs its batch computation decided, not a silent default
    raise ImportError(f"batch/features.py computes no derived feature {sorted(_unplanned)}")


def _with_derived(frame: pl.DataFrame) -> pl.DataFrame:
    """Apply DERIVED in order: NEWS2, its sub-scores and qSOFA as expressions built from the charts'
    tables (_DERIVED_EXPRESSIONS), missing when a required input is; on_oxygen with its shared function,
    once per distinct input tuple (far fewer than points), joined back."""
    for d in DERIVED:
        if d.name in _DERIVED_EXPRESSIONS:
            complete = pl.all_horizontal(pl.col(list(d.inputs)).is_not_null())
            frame = frame.with_columns(pl.when(complete).then(_DERIVED_EXPRESSIONS[d.name])
                                       .cast(pl.Int64).alias(d.name))
            continue
        inputs = [*d.inputs, *d.optional]
        combos = frame.select(inputs).unique()
        if d.inputs:  # a missing required input gives missing; an optional one is passed as None
            combos = combos.drop_nulls(list(d.inputs))
        result = pl.Series(d.name, [d.fn(*args) for args in combos.iter_rows()], strict=False)
        if result.dtype == pl.Null:  # no complete input: every derived feature is an integer score or flag
            result = result.cast(pl.Int64)
        frame = frame.join(combos.with_columns(result), on=inputs, how="left", maintain_order="left",
                           nulls_equal=True)
    return frame
