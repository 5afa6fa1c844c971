"""The two independent implementations of one spec agree: the stream's incremental state
(streams/state.py + streams/features.py) and the batch's vectorized recomputation
(batch/features.py), on random event sequences with duplicates (both kinds), reordering inside and
beyond the lateness bound, amendments, retractions, restatements (a higher version with the same
content: a re-snapshot, a retraction repeated), preliminary results made final (through the same
source, or only through the other one: a final twin, perhaps of another value, perhaps long after the
lateness bound; both sources' preliminary versions apart in value, made final through one; the other
source's preliminary version arriving after the final result), facts sharing a time (slope and delta edge cases) and context facts (which must never
reach a feature).

Every feature of FEATURE_NAMES must agree to the last bit: schemas/features.py fixes the float
arithmetic and its order, so any difference (even the 1e-15 a different summation order gives) means
one plane strays from the spec. The parity report's 1e-9 tolerance is a margin, not the target."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from batch.features import classify_events, features_at, scoring_points
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, encode_batch
from schemas.features import AGGREGATIONS, FEATURE_NAMES, FEATURES
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed
from streams.features import compute_features
from streams.patient_agent import CanonicalMessage, PatientProcessor
from streams.scoring import Scorer
from streams.state import apply_batch
from tests.fixtures.ingest.corpus import fhir_bundle, gcs_bundle
from wardwatch.settings import Settings

LATENESS_MS = 2 * 3600 * 1000
HORIZON_MS = 48 * 3600 * 1000
TOL = 0.05
MIN = 60_000
T0 = 1_700_000_000_000
MIN_INTERVAL_MS = 30 * MIN  # steps are 20 min apart: some vitals sets fall inside it

VITALS = [codes.HEART_RATE, codes.RESP_RATE, codes.SPO2, codes.SYSTOLIC_BP, codes.TEMPERATURE,
          codes.CONSCIOUSNESS, codes.O2_FLOW, codes.FIO2, codes.SUPPLEMENTAL_O2, codes.LACTATE, codes.WBC,
          codes.CREATININE]
VALUES = {codes.HEART_RATE: (40, 160), codes.RESP_RATE: (6, 35), codes.SPO2: (85, 100),
          codes.SYSTOLIC_BP: (80, 200), codes.TEMPERATURE: (34, 41), codes.CONSCIOUSNESS: (0, 4),
          codes.O2_FLOW: (0, 6), codes.FIO2: (21, 40),  # room air (21 %: not oxygen) up to a venturi mask
          codes.SUPPLEMENTAL_O2: (1, 1),  # on oxygen, flow not charted (a CDC row's flag)
          codes.LACTATE: (0, 8), codes.WBC: (1, 30), codes.CREATININE: (0, 6)}
# decimals as the EHR sends them (37.4 C, 1.35 mg/dL), so sums carry rounding error
DECIMALS = [0.0, 0.0, 0.1, 0.35, 0.04]


def test_the_generator_covers_every_aggregation():
    assert {s.agg for s in FEATURES} == set(AGGREGATIONS)
    assert {s.code for s in FEATURES} <= set(VITALS)


@st.composite
def patient_events(draw):
    """Events of 1-2 patients, in arrival order."""
    events: list[CanonicalEvent] = []
    later: list[CanonicalEvent] = []  # new versions held back to arrive in a later message (their own run)
    at_end: list[CanonicalEvent] = []  # held back to the end: hours after the lateness bound has passed
    n = draw(st.integers(5, 40))
    for i in range(n):
        if later and draw(st.booleans()):
            events += later
            later = []
        patient = draw(st.sampled_from(["p1", "p2"]))
        code = draw(st.sampled_from(VITALS))
        lo, hi = VALUES[code]
        value = min(hi, draw(st.integers(lo, hi)) + draw(st.sampled_from(DECIMALS)))
        # mostly forward in time, sometimes back (inside or beyond the lateness bound); -3 h lands on
        # an earlier step's time (facts sharing a time: slope and delta tie-breaks)
        t = (T0 + i * 20 * MIN + draw(st.sampled_from([0, 0, 0, -30 * MIN, -3 * 3600_000, -30 * 3600_000]))
             + draw(st.sampled_from([0, 0, 0, 1000, 7 * MIN])))
        if draw(st.integers(0, 9)) == 0:  # a context fact (e.g. a transfer) of this patient, at this time
            events.append(CanonicalEvent(patient_id=patient, code=codes.LOCATION, value=None, unit=None,
                                         effective_ms=t + draw(st.sampled_from([0, 5 * 3600_000])), issued_ms=t,
                                         status=Status.FINAL, source=Source.CDC, fact_id=f"ctx:{i}", version=1,
                                         code_system=codes.CONTEXT, value_text="ward-7"))
        source = draw(st.sampled_from([Source.CDC, Source.FHIR]))
        kind = draw(st.sampled_from(["none"] * 5 + ["redeliver", "cross", "amend", "retract", "restate", "finalise",
                                                    "twin_final", "twin_preliminary", "prelim_apart",
                                                    "prelim_after_final", "drop_code", "correct_code",
                                                    "unmap_code"]))
        status = (Status.PRELIMINARY if kind.startswith("twin") or kind == "prelim_apart"
                  else Status.FINAL if kind == "prelim_after_final"
                  else draw(st.sampled_from([Status.FINAL] * 3 + [Status.PRELIMINARY])))
        ev = CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                            status=status, source=source, fact_id=f"{source}:{i}:{code}", version=1)
        events.append(ev)
        new_versions = [events, later, at_end][draw(st.integers(0, 2))]
        other = Source.FHIR if source is Source.CDC else Source.CDC
        if kind == "redeliver":
            events.append(ev)
        elif kind == "cross":
            events.append(CanonicalEvent(patient_id=patient, code=code, value=value + draw(st.sampled_from([0, 0.01, 1])),
                                         unit=None, effective_ms=t, issued_ms=t, status=Status.FINAL, source=other,
                                         fact_id=f"{other}:x{i}:{code}", version=1))
            if draw(st.booleans()):  # a new version of the twin (of an alias: never used)
                new_versions.append(dataclasses.replace(events[-1], version=2, value=min(hi, value + 3)))
        elif kind in ("amend", "retract"):
            new_versions.append(CanonicalEvent(
                patient_id=patient, code=code, value=None if kind == "retract" else min(hi, value + 3), unit=None,
                effective_ms=t, issued_ms=t + MIN, fact_id=ev.fact_id, version=2, source=source,
                status=Status.ENTERED_IN_ERROR if kind == "retract" else Status.AMENDED))
            if draw(st.booleans()):  # the same version's content again, at a higher version
                new_versions.append(dataclasses.replace(new_versions[-1], version=3, issued_ms=t + 2 * MIN))
        elif kind == "restate":  # a re-snapshot, or a FHIR versionId bump for a note: the same content
            new_versions.append(dataclasses.replace(ev, version=2, issued_ms=t + MIN))
        elif kind == "finalise":  # the same value, final: a change only if it was preliminary
            new_versions.append(dataclasses.replace(ev, version=2, issued_ms=t + MIN, status=Status.FINAL))
        elif kind.startswith("twin"):  # the final result comes through the other source only
            twin = CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                                  status=Status.PRELIMINARY, source=other, fact_id=f"{other}:t{i}:{code}", version=1)
            if kind == "twin_preliminary":  # both sources sent the preliminary result: the twin is its alias
                events.append(twin)
            final_value = min(hi, value + draw(st.sampled_from([0, 0.01, 3])))  # the same value, or a correction
            new_versions.append(dataclasses.replace(twin, value=final_value, status=Status.FINAL, issued_ms=t + MIN,
                                                    version=2 if kind == "twin_preliminary" else 1))
            if draw(st.booleans()):  # the first source's own final version comes too (of an alias now: unused)
                new_versions.append(dataclasses.replace(ev, version=2, issued_ms=t + 2 * MIN, status=Status.FINAL))
        elif kind == "prelim_apart":  # both sources sent the preliminary result, too far apart to be one fact;
            # the final version comes through one of them only (perhaps the other's later, unused)
            twin = CanonicalEvent(patient_id=patient, code=code, value=max(lo, value - 2), unit=None, effective_ms=t,
                                  issued_ms=t, status=Status.PRELIMINARY, source=other, fact_id=f"{other}:a{i}:{code}",
                                  version=1)
            events.append(twin)
            first, second = draw(st.permutations([ev, twin]))
            new_versions.append(dataclasses.replace(first, version=2, issued_ms=t + MIN, status=Status.FINAL,
                                                    value=min(hi, value + draw(st.sampled_from([0, 1])))))
            if draw(st.booleans()):
                new_versions.append(dataclasses.replace(second, version=2, issued_ms=t + 2 * MIN, status=Status.FINAL))
        elif kind in ("drop_code", "correct_code", "unmap_code"):
            # a FHIR Observation of two codes (fact ids "fhir:<i>:<code>": its resource "fhir:<i>") whose next
            # version drops one (a component removed), names another code (the code corrected) or carries no
            # mapped code (recoded to an unmapped one, its values absent: its version marker): it replaces
            # all of the resource's facts (rule 6), perhaps arriving first (out of order), perhaps twice
            second = draw(st.sampled_from([c for c in VITALS if c != code]))
            third = draw(st.sampled_from([c for c in VITALS if c not in (code, second)]))
            first_codes = tuple(sorted({code, second}))
            ev = dataclasses.replace(ev, source=Source.FHIR, fact_id=f"fhir:{i}:{code}", version_codes=first_codes)
            events[-1] = ev
            lo2, hi2 = VALUES[second]
            events.append(dataclasses.replace(ev, code=second, value=float(lo2), fact_id=f"fhir:{i}:{second}"))
            next_code = code if kind == "drop_code" else third
            lo3, _ = VALUES[next_code]
            v2 = dataclasses.replace(ev, code=next_code, value=ev.value if kind == "drop_code" else float(lo3),
                                     fact_id=f"fhir:{i}:{next_code}", version=2, issued_ms=t + MIN,
                                     version_codes=(next_code,))
            if kind == "unmap_code":
                v2 = dataclasses.replace(v2, code=codes.VERSION_MARK, value=None, status=Status.ENTERED_IN_ERROR,
                                         fact_id=f"fhir:{i}:{codes.VERSION_MARK}", code_system=codes.VERSION_MARKS,
                                         version_codes=())
            if draw(st.booleans()):  # the new version arrives first: the older one must change nothing
                events.insert(len(events) - 2, v2)
            else:
                new_versions.append(v2)
            if draw(st.booleans()):
                new_versions.append(v2)
        elif kind == "prelim_after_final":  # the other source's preliminary version lags the final result
            prelim = CanonicalEvent(patient_id=patient, code=code, value=value + draw(st.sampled_from([0, 2])),
                                    unit=None, effective_ms=t, issued_ms=t - MIN, status=Status.PRELIMINARY,
                                    source=other, fact_id=f"{other}:l{i}:{code}", version=1)
            new_versions.append(prelim)
            if draw(st.booleans()):
                new_versions.append(dataclasses.replace(prelim, version=2, issued_ms=t + MIN, status=Status.FINAL,
                                                        value=value))
    # consciousness is an ACVPU ordinal (A=0 ... U=4, schemas/codes.py): the decoder dead-letters any
    # other value, so the generator's decimals and twin offsets are cut to the ordinal below them
    return [dataclasses.replace(e, value=float(min(4, int(e.value))))
            if e.code == codes.CONSCIOUSNESS and e.value is not None else e for e in events + later + at_end]


def split(draw, events: list[CanonicalEvent]) -> list[list[CanonicalEvent]]:
    """Cut each patient's events (arrival order kept) into micro-batch messages at random places;
    never inside a run of one effective time (schemas/cadence.py: the ingest worker keeps one raw
    record's events in one message). Messages are in the order of their first event."""
    messages: dict[int, list[CanonicalEvent]] = {}
    open_message: dict[str, int] = {}
    last_time: dict[str, int] = {}
    for i, e in enumerate(events):
        p = e.patient_id
        measurement = not codes.is_context(e.code_system)
        may_cut = p not in open_message or (measurement and last_time.get(p) != e.effective_ms)
        if p not in open_message or (may_cut and draw(st.booleans())):
            open_message[p] = i
            messages[i] = []
        messages[open_message[p]].append(e)
        if measurement:
            last_time[p] = e.effective_ms
    return [messages[i] for i in sorted(messages)]


@st.composite
def patient_streams(draw):
    """A list of micro-batches (lists of events of one patient), in arrival order."""
    return split(draw, draw(patient_events()))


@st.composite
def two_splits(draw):
    events = draw(patient_events())
    return split(draw, events), split(draw, events)


def online(batches, min_interval_ms: int = MIN_INTERVAL_MS):
    """Stream side: the patient agent over the micro-batches (partition 0, offset = message index),
    one worker batch per message. Returns the snapshots (features flattened in), the late events and
    the alert ids, as published."""
    s = Settings(model_dir=Path("/nonexistent/wardwatch-models"), allowed_lateness_s=LATENESS_MS // 1000,
                 dedupe_horizon_s=HORIZON_MS // 1000, cross_source_tolerance=TOL,
                 scoring_min_interval_s=min_interval_ms // 1000)
    processor = PatientProcessor(s, Scorer(s.model_dir, s))  # no registry: the NEWS2 rule scores
    records: dict = {}
    rows, late, alerts = [], set(), []
    for offset, batch in enumerate(batches):
        new, out = processor.process([CanonicalMessage(0, offset, encode_batch(batch))], records.get)
        records.update(new)
        for _, value, _ in out.features:
            d = orjson.loads(value)
            rows.append({k: v for k, v in d.items() if k != "features"} | d["features"])
        for _, value, _ in out.late:
            d = orjson.loads(value)
            late.add((d["event"]["event_id"], d["offset"], d["late_by_ms"]))
        alerts += [orjson.loads(value)["header"]["alert_id"] for _, value, _ in out.alerts]
    return rows, late, alerts


def offline_frame(batches) -> pl.DataFrame:
    rows = []
    for offset, batch in enumerate(batches):
        for idx, e in enumerate(batch):
            d = e.to_dict()
            d.pop("provenance")
            codes_ = d.get("version_codes")
            rows.append({**d, "version_codes": None if codes_ is None else list(codes_),
                         "partition": 0, "offset": offset, "idx": idx})
    return pl.DataFrame(rows, infer_schema_length=None, schema_overrides={"version_codes": pl.List(pl.String)})


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return float(a) == float(b)


RULES = {"allowed_lateness_ms": LATENESS_MS, "cross_source_tolerance": TOL, "dedupe_horizon_ms": HORIZON_MS}
POINT = ["patient_id", "snapshot_id", "scoring_ms", "partition", "offset", "idx", "trigger"]


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patient_streams(), st.sampled_from([0, MIN_INTERVAL_MS]))
def test_online_points_and_features_equal_offline_recomputation(batches, min_interval_ms):
    assert_planes_agree(batches, min_interval_ms)


def assert_planes_agree(batches, min_interval_ms: int) -> set:
    """The late events, the scoring points and every feature at them agree; returns the late events
    (event_id, offset, late_by_ms)."""
    rows, late_online, _ = online(batches, min_interval_ms)
    events = offline_frame(batches)
    classified = classify_events(events, **RULES)
    late_offline = {(r["event_id"], r["offset"], r["late_by_ms"])
                    for r in classified.filter(pl.col("outcome") == "late").iter_rows(named=True)}
    assert late_online == late_offline
    # the batch derives the scoring points itself: the same points, at the same arrival positions
    points = scoring_points(events, **RULES, min_interval_ms=min_interval_ms)
    assert [tuple(r[k] for k in POINT) for r in rows] == list(points.select(POINT).iter_rows())
    if rows:
        offline = features_at(events, points, **RULES)
        for on, off in zip(rows, offline.iter_rows(named=True), strict=True):
            diffs = {f: (on[f], off[f]) for f in FEATURE_NAMES if not same(on[f], off[f])}
            assert not diffs, f"point {on['patient_id']}@{on['offset']}.{on['idx']}: {diffs}"
    return late_online


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_splits(), st.sampled_from([0, MIN_INTERVAL_MS]))
def test_cutting_the_same_events_into_other_messages_changes_no_point_snapshot_or_alert(splits, min_interval_ms):
    (rows_a, _, alerts_a), (rows_b, _, alerts_b) = (online(batches, min_interval_ms) for batches in splits)

    def by_patient(rows):  # offsets differ between the two cuts; what was scored must not
        return sorted((r["patient_id"], r["snapshot_id"], r["scoring_ms"], r["trigger"],
                       tuple(r[f] for f in FEATURE_NAMES)) for r in rows)

    assert by_patient(rows_a) == by_patient(rows_b)
    assert sorted(alerts_a) == sorted(alerts_b)


# --- hand-written sequences through both planes --------------------------------------------------
# Each case: (the patient clock in hours after T0 after the last message, micro-batches in arrival
# order, the values both planes must give at that time after the last message). Expected values are
# worked out by hand in the comments.

HOUR = 3600_000
HR, LACTATE, TEMP = codes.HEART_RATE, codes.LACTATE, codes.TEMPERATURE
# a round scoring NEWS2 0 on air: RR 16, SpO2 97, SBP 125, HR 72, alert, 37.0 C
ROUND_ON_AIR = {codes.RESP_RATE: 16, codes.SPO2: 97, codes.SYSTOLIC_BP: 125, codes.HEART_RATE: 72,
                codes.CONSCIOUSNESS: 0, codes.TEMPERATURE: 37.0}


def hr(fact_id: str, value: float | None, hours: float, *, code: str = HR, version: int = 1,
       source: Source = Source.CDC, status: Status = Status.FINAL) -> CanonicalEvent:
    t = T0 + int(hours * HOUR)
    return CanonicalEvent(patient_id="p1", code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                          status=status, source=source, fact_id=fact_id, version=version)


def context(fact_id: str, hours: float) -> CanonicalEvent:
    t = T0 + int(hours * HOUR)
    return CanonicalEvent(patient_id="p1", code=codes.LOCATION, value=None, unit=None, effective_ms=t, issued_ms=t,
                          status=Status.FINAL, source=Source.CDC, fact_id=fact_id, version=1,
                          code_system=codes.CONTEXT, value_text="ward-7")


def gcs(total: int | dict, hours: float, obs_id: str) -> list[CanonicalEvent]:
    """The events the FHIR parser makes of a GCS total (LOINC 9269-2) of p1 charted `hours` after T0 (a
    dict: the panel's value[x] / components instead)."""
    effective = datetime.fromtimestamp((T0 + int(hours * HOUR)) / 1000, timezone.utc).isoformat()
    value = total if isinstance(total, dict) else {"valueInteger": total}
    outcome = parse_notification(gcs_bundle("p1", effective, value, obs_id=obs_id),
                                 topic="ww.fhir.notifications", partition=0, offset=0)
    return outcome.events if isinstance(outcome, Parsed) else []  # before 9269-2 was read: Ignored, no event


def fhir_hr(value: float, hours: float, status: str, version: int) -> list[CanonicalEvent]:
    """The events the FHIR parser makes of version `version` of one heart-rate Observation of p1
    (fhir/cancelled_status) charted `hours` after T0 with `status`."""
    doc = orjson.loads(fhir_bundle("cancelled_status"))
    obs = doc["entry"][1]["resource"]
    effective = datetime.fromtimestamp((T0 + int(hours * HOUR)) / 1000, timezone.utc).isoformat()
    obs.update(status=status, effectiveDateTime=effective, meta={"versionId": str(version), "lastUpdated": effective})
    obs["valueQuantity"]["value"] = value
    obs["subject"]["identifier"]["value"] = "p1"
    doc["entry"][0]["resource"]["notificationEvent"][0]["timestamp"] = effective
    outcome = parse_notification(orjson.dumps(doc), topic="ww.fhir.notifications", partition=0, offset=0)
    return outcome.events if isinstance(outcome, Parsed) else []  # before cancelled was read: dead-lettered


def round_without_consciousness(prefix: str, hours: float) -> list[CanonicalEvent]:
    return [hr(f"{prefix}:{c}", v, hours, code=c) for c, v in ROUND_ON_AIR.items() if c != codes.CONSCIOUSNESS]


HAND_CASES = {
    # slope = 12 / 2 h = 6.0 per hour; delta = 92 - 80 = 12
    "two readings 2 h apart": (2, [[hr("a", 80, 0)], [hr("b", 92, 2)]],
                               {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 12.0}),
    # the later reading arrives first (80 is exactly at clock - lateness: not late); delta is by
    # effective time, not arrival: still 92 - 80
    "out of order": (2, [[hr("b", 92, 2)], [hr("a", 80, 0)]],
                     {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 12.0, "heart_rate_last_24h": 92.0}),
    # t = 0, 1, 3 h, v = 80, 86, 98: mean t 4/3, mean v 88; sxy = 32/3 + 2/3 + 50/3 = 28;
    # sxx = 16/9 + 1/9 + 25/9 = 14/3; slope = 6.0; delta = 18
    "three readings": (3, [[hr("a", 80, 0), hr("b", 86, 1)], [hr("c", 98, 3)]],
                       {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 18.0, "heart_rate_mean_6h": 88.0}),
    # a redelivery and the same measurement via FHIR count once
    "duplicates of both kinds": (2, [[hr("a", 80, 0)], [hr("b", 92, 2)], [hr("b", 92, 2)],
                                  [hr("fhir:b", 92.01, 2, source=Source.FHIR)], [hr("c", 92, 2)]],
                                 # c is its own fact (same source as b): 80@0, 92@2, 92@2 -> mean t 4/3,
                                 # mean v 88; sxy = 32/3 + 8/3 + 8/3 = 16; sxx = 16/9 + 4/9 + 4/9 = 8/3
                                 {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 12.0, "vitals_count_6h": 3}),
    # the same lactate via FHIR exactly the cross-source tolerance (0.05) away is the same reading: one lab,
    # no delta. (0.1 - 0.05 is 0.05 to the bit; the generator's offsets never land on the bound)
    "a cross-source copy at exactly the tolerance": (
        0, [[hr("l1", 0.05, 0, code=LACTATE)], [hr("fhir:l1", 0.1, 0, code=LACTATE, source=Source.FHIR)]],
        {"lactate_last_24h": 0.05, "lactate_max_24h": 0.05, "lactate_delta_24h": None}),
    # 110 at 3 h is retracted: back to 80@0, 92@2 (clock stays at 3 h)
    "retraction": (3, [[hr("a", 80, 0), hr("b", 92, 2)], [hr("c", 110, 3)],
                    [hr("c", None, 3, version=2, status=Status.ENTERED_IN_ERROR)]],
                   {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 12.0, "heart_rate_last_24h": 92.0}),
    # 92 amended to 104: slope 24 / 2 h = 12, delta 24
    "amendment": (2, [[hr("a", 80, 0)], [hr("b", 92, 2)], [hr("b", 104, 2, version=2, status=Status.AMENDED)]],
                  {"heart_rate_slope_6h": 12.0, "heart_rate_delta_24h": 24.0}),
    # a preliminary 80 whose final version comes through FHIR only, as 86: it replaces the 80 (not a
    # second reading): 86@0, 92@2 -> slope 6 / 2 h = 3, delta 6, two readings
    "a final twin corrects a preliminary result": (
        2, [[hr("a", 80, 0, status=Status.PRELIMINARY)], [hr("b", 92, 2)], [hr("fhir:a", 86, 0, source=Source.FHIR)]],
        {"heart_rate_slope_6h": 3.0, "heart_rate_delta_24h": 6.0, "vitals_count_6h": 2}),
    # two readings at one time: no slope; delta orders them by fact_id: "b" (90) - "a" (80)
    "one time only": (0, [[hr("b", 90, 0), hr("a", 80, 0)]],
                      {"heart_rate_slope_6h": None, "heart_rate_delta_24h": 10.0, "vitals_count_6h": 2}),
    "a single reading": (0, [[hr("a", 80, 0)]], {"heart_rate_slope_6h": None, "heart_rate_delta_24h": None,
                                               "heart_rate_last_24h": 80.0}),
    # 60 sits exactly 6 h before T: outside the 6 h slope (80 -> 92 over 2 h = 6), inside the 24 h delta
    "window edges": (6, [[hr("a", 60, 0), hr("b", 80, 4), hr("c", 92, 6)]],
                     {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 32.0, "heart_rate_max_6h": 92.0}),
    # the same edge of the widest window (24 h: the stream slices it first, the batch bounds its join by
    # it): 60 and lactate 5.0 sit exactly 24 h before T, outside; delta 92 - 80, lactate max 2.0 and no
    # delta (one lab). The generator never makes a visible fact exactly 24 h old (a day back is late)
    "24 h window edge": (24, [[hr("a", 60, 0), hr("l1", 5.0, 0, code=LACTATE)], [hr("b", 80, 23)],
                              [hr("c", 92, 24), hr("l2", 2.0, 24, code=LACTATE)]],
                         {"heart_rate_delta_24h": 12.0, "heart_rate_last_24h": 92.0, "lactate_max_24h": 2.0,
                          "lactate_delta_24h": None, "lactate_time_since_last_s_24h": 0.0}),
    # a transfer 5 h ahead neither moves the clock (T stays 2 h) nor enters any window
    "context facts are not measurements": (2, [[hr("a", 80, 0), context("ctx:1", 5)], [hr("b", 92, 2)]],
                                           {"heart_rate_slope_6h": 6.0, "heart_rate_delta_24h": 12.0}),
    # temperature 37.0 -> 38.0 over 30 min: +2.0 C per hour; lactate 2.1 -> 4.3: delta 2.2, max 4.3
    "minutes and labs": (6, [[hr("l1", 2.1, 0, code=LACTATE), hr("t1", 37.0, 5.5, code=TEMP)],
                          [hr("l2", 4.3, 6, code=LACTATE), hr("t2", 38.0, 6, code=TEMP)]],
                         {"temperature_slope_6h": 2.0, "lactate_delta_24h": 2.2, "lactate_max_24h": 4.3,
                          "lactate_time_since_last_s_24h": 0.0, "heart_rate_slope_6h": None}),
    # oxygen charted as FiO2 28 % (a venturi mask: the pulse-ox Observation's component, at the SpO2's
    # time), no flow at all: on oxygen, NEWS2 air/oxygen 2, the rest 0. The round an hour before was
    # on air. Before FiO2 was read: 0 and NEWS2 0
    "FiO2 without a flow is oxygen": (
        1, [[hr(f"r1:{c}", v, 0, code=c) for c, v in ROUND_ON_AIR.items()],
            [hr("r2:fio2", 28, 1, code=codes.FIO2)] + [hr(f"r2:{c}", v, 1, code=c) for c, v in ROUND_ON_AIR.items()]],
        {"fio2_last_24h": 28.0, "fio2_time_since_last_s_24h": 0.0, "o2_flow_last_24h": None,
         "on_oxygen": 1, "news2_air_or_oxygen": 2, "news2": 2}),
    # the next round an hour later charts no FiO2: back on air (a past FiO2 is a past episode)
    "an FiO2 of an earlier round is not oxygen now": (
        2, [[hr("r1:fio2", 28, 1, code=codes.FIO2)] + [hr(f"r1:{c}", v, 1, code=c) for c, v in ROUND_ON_AIR.items()],
            [hr(f"r2:{c}", v, 2, code=c) for c, v in ROUND_ON_AIR.items()]],
        {"fio2_last_24h": 28.0, "fio2_time_since_last_s_24h": 3600.0, "on_oxygen": 0, "news2": 0}),
    # a CDC row flagged on oxygen with its flow column empty (schemas.codes.SUPPLEMENTAL_O2), the round an
    # hour before on air: on oxygen, NEWS2 air/oxygen 2 (the rest 0), and the flow stays missing (never
    # invented). Before the flag was read the row gave no oxygen fact: on air, NEWS2 0
    "oxygen with the flow not charted is oxygen": (
        1, [[hr(f"r1:{c}", v, 0, code=c) for c, v in ROUND_ON_AIR.items()],
            [hr(f"r2:{c}", v, 1, code=c) for c, v in ROUND_ON_AIR.items()] + [hr("r2:o2", 1.0, 1, code=codes.SUPPLEMENTAL_O2)]],
        {"supplemental_oxygen_time_since_last_s_24h": 0.0, "o2_flow_last_24h": None, "on_oxygen": 1,
         "news2_air_or_oxygen": 2, "news2": 2}),
    # a flow of 0 (air) charted after it in the same round (within SAME_ROUND_S of the SpO2) says air now
    "air charted after oxygen without a flow is air": (
        2, [[hr(f"r1:{c}", v, 1.9, code=c) for c, v in ROUND_ON_AIR.items()] + [hr("r1:o2", 1.0, 1.9, code=codes.SUPPLEMENTAL_O2)],
            [hr("r2:flow", 0.0, 2, code=codes.O2_FLOW), hr("r2:spo2", 97, 2, code=codes.SPO2)]],
        {"supplemental_oxygen_time_since_last_s_24h": 360.0, "o2_flow_last_24h": 0.0, "on_oxygen": 0, "news2": 0}),
    # consciousness charted as a GCS total is the same parameter as ACVPU: an A, then a GCS of 7 an hour
    # later (P, ordinal 3): the latest wins, NEWS2 consciousness 3, qSOFA altered mentation 1. Before GCS was
    # read: A, NEWS2 0
    "a GCS after an ACVPU: the latest wins": (
        1, [[hr(f"r1:{c}", v, 0, code=c) for c, v in ROUND_ON_AIR.items()],
            round_without_consciousness("r2", 1) + gcs(7, 1, "gcs-1")],
        {"consciousness_last_24h": 3.0, "consciousness_max_24h": 3.0, "news2_consciousness": 3, "news2": 3,
         "qsofa": 1}),
    # a GCS of 3 (U), then an ACVPU A an hour later: A now (NEWS2 0), the U still the worst of 24 h
    "an ACVPU after a GCS: the latest wins": (
        1, [round_without_consciousness("r1", 0) + gcs(3, 0, "gcs-1"),
            [hr(f"r2:{c}", v, 1, code=c) for c, v in ROUND_ON_AIR.items()]],
        {"consciousness_last_24h": 0.0, "consciousness_max_24h": 4.0, "news2_consciousness": 0, "news2": 0}),
    # a GCS panel charted as its components only, eye 2 + verbal 2 + motor 4 = 8 (P, ordinal 3), an hour after an
    # A: NEWS2 consciousness 3, qSOFA 1. Before components were summed: skipped (no value), A still, NEWS2 0
    "a GCS charted as its three components": (
        1, [[hr(f"r1:{c}", v, 0, code=c) for c, v in ROUND_ON_AIR.items()],
            round_without_consciousness("r2", 1) + gcs({"component": [
                {"code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "valueInteger": score}
                for code, score in ((codes.GCS_EYE, 2), (codes.GCS_VERBAL, 2), (codes.GCS_MOTOR, 4))]}, 1, "gcs-2")],
        {"consciousness_last_24h": 3.0, "news2_consciousness": 3, "news2": 3, "qsofa": 1}),
    # a preliminary FHIR heart rate of 130 at 2 h, then its version 2 cancelled (never completed): it stops
    # counting in both planes, back to the 80 at 0 h (the clock stays at 2 h). Before cancelled was read,
    # the notification was dead-lettered and the 130 stayed live: last 130, max 130
    "a cancelled observation retracts its preliminary value": (
        2, [[hr("a", 80, 0)], fhir_hr(130, 2, "preliminary", 1), fhir_hr(130, 2, "cancelled", 2)],
        {"heart_rate_last_24h": 80.0, "heart_rate_max_6h": 80.0, "vitals_count_6h": 1}),
}

@pytest.mark.parametrize("case", list(HAND_CASES))
def test_both_planes_give_the_hand_computed_values(case):
    hours, batches, expected = HAND_CASES[case]
    state = None
    for batch in batches:
        state = apply_batch(state, [e for e in batch if not codes.is_context(e.code_system)],
                            allowed_lateness_ms=LATENESS_MS, dedupe_horizon_ms=HORIZON_MS,
                            cross_source_tolerance=TOL).state
    assert state.clock == T0 + hours * HOUR
    last = compute_features(state, state.clock)
    # a point without idx sees its whole message: here the last one
    point = pl.DataFrame([{"patient_id": "p1", "scoring_ms": state.clock, "partition": 0, "offset": len(batches) - 1}])
    [offline] = features_at(offline_frame(batches), point, **RULES).to_dicts()
    for name, value in expected.items():
        for plane, got in (("stream", last[name]), ("batch", offline[name])):
            if value is None:
                assert got is None, f"{plane} {name}: expected missing, got {got}"
            else:
                assert got == pytest.approx(value, abs=1e-12), f"{plane} {name}"


# --- past the dedupe horizon: the stream has forgotten the fact, and so must the batch ---------------
# Each case: micro-batches in arrival order, then the (fact_id, version, late_by in hours) both planes must
# report late (dedupe horizon 48 h, lateness 2 h). In production labs are amended days later.


def obs_hr(code: str, value: float | None, hours: float, version: int, version_codes: tuple[str, ...]) -> CanonicalEvent:
    """Version `version` of FHIR Observation/o1 of p1, carrying `version_codes` (rule 6)."""
    return dataclasses.replace(hr(f"fhir:Observation/o1:{code}", value, hours, code=code, version=version,
                                  source=Source.FHIR), version_codes=tuple(sorted(version_codes)))


EXPIRY_CASES = {
    # the reading's known entry expired 3 days before the amendment: a new fact to the stream, late by
    # 120 - 2 - 0 = 118 h; never a correction (no correction point, the 92 stays live)
    "a lab amended 5 days after the reading": (
        [[hr("a", 92, 0)], [hr("b", 80, 120)], [hr("a", 104, 0, version=2, status=Status.AMENDED)]],
        {("a", 2, 118)}),
    "an entered-in-error 3 days after the reading": (
        [[hr("a", 92, 0)], [hr("b", 80, 72)], [hr("a", None, 0, version=2, status=Status.ENTERED_IN_ERROR)]],
        {("a", 2, 70)}),
    "version 1 redelivered 3 days later": (
        [[hr("a", 92, 0)], [hr("b", 80, 72)], [hr("a", 92, 0)]],
        {("a", 1, 70)}),
    # rule 6 reads the resource's unexpired entries only: version 1 after version 2 expired is late, not stale
    "a resource's version 1 redelivered 3 days after version 2": (
        [[obs_hr(codes.SPO2, 96, 0, 2, (codes.SPO2,))], [hr("b", 80, 72)],
         [obs_hr(codes.SPO2, 95, 0, 1, (codes.SPO2, codes.O2_FLOW)),
          obs_hr(codes.O2_FLOW, 2, 0, 1, (codes.SPO2, codes.O2_FLOW))]],
        {(f"fhir:Observation/o1:{codes.SPO2}", 1, 70), (f"fhir:Observation/o1:{codes.O2_FLOW}", 1, 70)}),
}


@pytest.mark.parametrize("case", list(EXPIRY_CASES))
def test_both_planes_treat_a_fact_past_the_dedupe_horizon_as_new(case):
    batches, expected = EXPIRY_CASES[case]
    late = assert_planes_agree(batches, MIN_INTERVAL_MS)
    by_id = {e.event_id: (e.fact_id, e.version) for batch in batches for e in batch}
    assert {(*by_id[event_id], late_by // HOUR) for event_id, _, late_by in late} == expected


# --- cadence: inside the interval only a rise of a parameter's points scores, on both planes -------
# Each case: micro-batches in arrival order and the points both planes must derive, (minutes after T0, trigger),
# with a 5 min interval. A monitor charting every minute: one HR reading a message.


def reading(fact_id: str, code: str, value: float, minutes: float) -> CanonicalEvent:
    return hr(fact_id, value, minutes / 60, code=code)


def round_at(prefix: str, minutes: float, **changed: float) -> list[CanonicalEvent]:
    """One round on air (NEWS2 0) charted at `minutes`, with some parameters changed (by code)."""
    return [reading(f"{prefix}:{c}", c, changed.get(c, v), minutes) for c, v in ROUND_ON_AIR.items()]


SPO2, SBP = codes.SPO2, codes.SYSTOLIC_BP
CADENCE_CASES = {
    # HR 95 (1 point) in the round and every minute after it: the interval's cadence only
    "HR 95 every minute for an hour": (
        [round_at("r", 0, **{HR: 95})] + [[reading(f"m{k}", HR, 95, k)] for k in range(1, 61)],
        [(m, "vitals") for m in range(0, 61, 5)]),
    # 1 -> 2 points at 2 min: scored; HR 95 at 1 min and HR 100 at 3 min (1 point, fewer than 2): not
    "HR 95 then HR 112 inside the interval": (
        [round_at("r", 0, **{HR: 95}), [reading("m1", HR, 95, 1)], [reading("m2", HR, 112, 2)],
         [reading("m3", HR, 100, 3)], [reading("m4", HR, 112, 4)]],
        [(0, "vitals"), (2, "vitals")]),
    "SpO2 94 then 91 inside the interval": (
        [round_at("r", 0, **{SPO2: 94}), [reading("m1", SPO2, 94, 1)], [reading("m2", SPO2, 91, 2)]],
        [(0, "vitals"), (2, "vitals")]),
    # a normal round, then SBP 80 in a message of its own at the round's time (0 -> 3): a second point at 0;
    # a second SBP 80 at that time (3, as the point before): none
    "the rest of a round in another message": (
        [[r for r in round_at("r", 0) if r.code != SBP], [reading("o1", SBP, 80, 0)], [reading("o2", SBP, 80, 0)]],
        [(0, "vitals"), (0, "vitals")]),
    # SBP 80 taken 2 min before the round, charted after it: re-scored at the clock; SBP 85 a minute before it:
    # 3 points, as SBP gave at that re-score: not
    "back-charted readings": (
        [[r for r in round_at("r", 10) if r.code != SBP], [reading("b1", SBP, 80, 8)], [reading("b2", SBP, 85, 9)]],
        [(10, "vitals"), (10, "correction")]),
    # air/oxygen and consciousness are parameters too: on oxygen (2) and responding to voice (3) in the round,
    # then a flow, a V and an FiO2 of 28 % (2) inside the interval: nothing new
    "oxygen and consciousness as charted at the last point": (
        [round_at("r", 0, **{codes.CONSCIOUSNESS: 2}) + [reading("r:flow", codes.O2_FLOW, 2, 0)],
         [reading("m1", codes.O2_FLOW, 2, 1)], [reading("m2", codes.CONSCIOUSNESS, 2, 2)],
         [reading("m3", codes.FIO2, 28, 3)]],
        [(0, "vitals")]),
    # ... and each scores as it rises: oxygen started (0 -> 2), new confusion (0 -> 3)
    "oxygen started, new confusion": (
        [round_at("r", 0), [reading("m1", codes.O2_FLOW, 2, 1)], [reading("m2", codes.CONSCIOUSNESS, 1, 2)],
         [reading("m3", codes.SUPPLEMENTAL_O2, 1, 3)]],
        [(0, "vitals"), (1, "vitals"), (2, "vitals")]),
    # an amendment's re-score is the last point too: SBP amended to 85 (3), then SBP 88 (3) and 150 (0) inside
    # the interval: not; HR 112 (0 -> 2): scored
    "a correction's re-score is the last point": (
        [round_at("r", 0), [hr("r:" + SBP, 85, 0, code=SBP, version=2, status=Status.AMENDED)],
         [reading("m1", SBP, 88, 1)], [reading("m2", SBP, 150, 2)], [reading("m3", HR, 112, 3)]],
        [(0, "vitals"), (0, "correction"), (3, "vitals")]),
    # a retraction is a correction (re-scored at the clock); the same retraction again at a higher version
    # restates it (rule 2): no second point
    "a retraction repeated at a higher version": (
        [round_at("r", 0), [reading("m1", HR, 95, 10)], [hr("m1", None, 10 / 60, version=2, status=Status.ENTERED_IN_ERROR)],
         [hr("m1", None, 10 / 60, version=3, status=Status.ENTERED_IN_ERROR)]],
        [(0, "vitals"), (10, "vitals"), (10, "correction")]),
}


@pytest.mark.parametrize("case", list(CADENCE_CASES))
def test_both_planes_score_inside_the_interval_only_a_rise_of_a_parameters_points(case):
    batches, expected = CADENCE_CASES[case]
    interval = 5 * MIN
    rows, _, _ = online(batches, interval)
    events = offline_frame(batches)
    points = scoring_points(events, **RULES, min_interval_ms=interval)
    assert [tuple(r[k] for k in POINT) for r in rows] == list(points.select(POINT).iter_rows())
    assert [((r["scoring_ms"] - T0) / MIN, r["trigger"]) for r in rows] == expected
    offline = features_at(events, points, **RULES)
    for on, off in zip(rows, offline.iter_rows(named=True), strict=True):
        assert {f: on[f] for f in FEATURE_NAMES} == {f: off[f] for f in FEATURE_NAMES}
