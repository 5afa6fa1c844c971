"""The two independent implementations of one spec agree: the stream's incremental state
(streams/state.py + streams/features.py) and the batch's vectorized recomputation
(batch/features.py), on random event sequences with duplicates (both kinds), reordering inside and
beyond the lateness bound, amendments and retractions."""

from __future__ import annotations

import math

import polars as pl
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from batch.features import classify_events, features_at
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES
from streams.features import compute_features
from streams.state import apply_batch

LATENESS_MS = 2 * 3600 * 1000
HORIZON_MS = 48 * 3600 * 1000
TOL = 0.05
MIN = 60_000
T0 = 1_700_000_000_000

VITALS = [codes.HEART_RATE, codes.RESP_RATE, codes.SPO2, codes.SYSTOLIC_BP, codes.TEMPERATURE,
          codes.CONSCIOUSNESS, codes.O2_FLOW, codes.LACTATE]
VALUES = {codes.HEART_RATE: (40, 160), codes.RESP_RATE: (6, 35), codes.SPO2: (85, 100),
          codes.SYSTOLIC_BP: (80, 200), codes.TEMPERATURE: (34, 41), codes.CONSCIOUSNESS: (0, 4),
          codes.O2_FLOW: (0, 6), codes.LACTATE: (0, 8)}


@st.composite
def patient_streams(draw):
    """A list of micro-batches (lists of events) for 1-2 patients, in arrival order."""
    events: list[CanonicalEvent] = []
    n = draw(st.integers(5, 40))
    for i in range(n):
        patient = draw(st.sampled_from(["p1", "p2"]))
        code = draw(st.sampled_from(VITALS))
        lo, hi = VALUES[code]
        value = float(draw(st.integers(lo, hi)))
        # mostly forward in time, sometimes back (inside or beyond the lateness bound)
        t = T0 + i * 20 * MIN + draw(st.sampled_from([0, 0, 0, -30 * MIN, -3 * 3600_000, -30 * 3600_000]))
        source = draw(st.sampled_from([Source.CDC, Source.FHIR]))
        ev = CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                            status=Status.FINAL, source=source, fact_id=f"{source}:{i}:{code}", version=1)
        events.append(ev)
        kind = draw(st.sampled_from(["none"] * 5 + ["redeliver", "cross", "amend", "retract"]))
        if kind == "redeliver":
            events.append(ev)
        elif kind == "cross":
            other = Source.FHIR if source is Source.CDC else Source.CDC
            events.append(CanonicalEvent(patient_id=patient, code=code, value=value + draw(st.sampled_from([0, 0.01, 1])),
                                         unit=None, effective_ms=t, issued_ms=t, status=Status.FINAL, source=other,
                                         fact_id=f"{other}:x{i}:{code}", version=1))
        elif kind in ("amend", "retract"):
            events.append(CanonicalEvent(
                patient_id=patient, code=code, value=None if kind == "retract" else min(hi, value + 3), unit=None,
                effective_ms=t, issued_ms=t + MIN, fact_id=ev.fact_id, version=2, source=source,
                status=Status.ENTERED_IN_ERROR if kind == "retract" else Status.AMENDED))
    # cut into micro-batches of one patient each, keeping arrival order
    batches, sizes = [], draw(st.lists(st.integers(1, 4), min_size=len(events), max_size=len(events)))
    i = 0
    for size in sizes:
        if i >= len(events):
            break
        chunk = events[i:i + size]
        i += size
        for p in ("p1", "p2"):
            mine = [e for e in chunk if e.patient_id == p]
            if mine:
                batches.append(mine)
    return batches


def online(batches):
    """Stream side: apply each micro-batch (one Kafka message) and snapshot where it changed."""
    states, rows, late = {}, [], set()
    for offset, batch in enumerate(batches):
        p = batch[0].patient_id
        r = apply_batch(states.get(p), batch, allowed_lateness_ms=LATENESS_MS, dedupe_horizon_ms=HORIZON_MS,
                        cross_source_tolerance=TOL)
        states[p] = r.state
        late |= {(o.event.event_id, offset, o.late_by_ms) for o in r.late}
        if r.changed:
            rows.append({"patient_id": p, "scoring_ms": r.state.clock, "partition": 0, "offset": offset,
                         **compute_features(r.state, r.state.clock)})
    return rows, late


def offline_frame(batches) -> pl.DataFrame:
    rows = []
    for offset, batch in enumerate(batches):
        for idx, e in enumerate(batch):
            d = e.to_dict()
            d.pop("provenance")
            rows.append({**d, "partition": 0, "offset": offset, "idx": idx})
    return pl.DataFrame(rows, infer_schema_length=None)


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patient_streams())
def test_online_features_equal_offline_recomputation(batches):
    rows, late_online = online(batches)
    events = offline_frame(batches)
    classified = classify_events(events, allowed_lateness_ms=LATENESS_MS, cross_source_tolerance=TOL)
    late_offline = {(r["event_id"], r["offset"], r["late_by_ms"])
                    for r in classified.filter(pl.col("outcome") == "late").iter_rows(named=True)}
    assert late_online == late_offline
    if not rows:
        return
    points = pl.DataFrame([{k: r[k] for k in ("patient_id", "scoring_ms", "partition", "offset")} for r in rows])
    offline = features_at(events, points, allowed_lateness_ms=LATENESS_MS, cross_source_tolerance=TOL)
    assert offline.height == len(rows)
    for on, off in zip(rows, offline.iter_rows(named=True)):
        assert (on["patient_id"], on["offset"]) == (off["patient_id"], off["offset"])
        diffs = {f: (on[f], off[f]) for f in FEATURE_NAMES if not same(on[f], off[f])}
        assert not diffs, f"point {on['patient_id']}@{on['offset']}: {diffs}"
