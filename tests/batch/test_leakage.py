"""No leakage: features at a scoring time T depend only on what was issued by T (or, for a point given
with its message, by when that message was issued: the stream scored it then), and labels only on what
happens strictly after T.

The oracle is the truncated archive itself: cutting every event issued after T (or effective after
T) must not change any feature at T. Events arrive in issue order (as they would from the EHR), so
the truncated archive is a prefix of the full one.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import polars as pl
import pytest

from batch.features import features_as_of_issued, features_at
from batch.train import labelled_rows, make_labels
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES

HOUR = 3_600_000
T0 = 1_718_000_000_000


def _event(patient: str, n: int, code: str, value, effective_ms: int, issued_ms: int, version=1,
           status=Status.FINAL, fact=None) -> CanonicalEvent:
    return CanonicalEvent(patient_id=patient, code=code, value=value, unit=None, effective_ms=effective_ms,
                          issued_ms=issued_ms, status=status, source=Source.FHIR, fact_id=fact or f"{patient}-{n}",
                          version=version)


def history(patient: str, seed: int) -> list[CanonicalEvent]:
    """36 h of hourly vitals, labs issued hours after collection, an amendment and a retraction
    issued later than the values they change."""
    rng = np.random.default_rng(seed)
    events = []
    for h in range(36):
        t = T0 + h * HOUR
        for code, mean, sd in ((codes.HEART_RATE, 90, 15), (codes.RESP_RATE, 18, 4), (codes.SPO2, 95, 2),
                               (codes.SYSTOLIC_BP, 115, 20), (codes.TEMPERATURE, 37.2, 0.6)):
            events.append(_event(patient, len(events), code, round(float(rng.normal(mean, sd)), 1), t, t + 60_000))
        events.append(_event(patient, len(events), codes.O2_FLOW, float(h % 3), t, t + 60_000))
        events.append(_event(patient, len(events), codes.CONSCIOUSNESS, 0.0, t, t + 60_000))
        if h % 8 == 2:  # a lab drawn now, resulted 3 h later
            events.append(_event(patient, len(events), codes.LACTATE, round(float(rng.uniform(0.5, 5)), 2), t,
                                 t + 3 * HOUR))
    def at(code: str, hour: int) -> CanonicalEvent:
        return next(e for e in events if e.code == code and e.effective_ms == T0 + hour * HOUR)

    amended = at(codes.HEART_RATE, 5)  # corrected 5 h after it was issued
    events.append(_event(patient, 0, amended.code, amended.value + 30, amended.effective_ms,
                         amended.issued_ms + 5 * HOUR, version=2, status=Status.AMENDED, fact=amended.fact_id))
    retracted = at(codes.RESP_RATE, 12)  # entered in error 2 h later
    events.append(_event(patient, 0, retracted.code, None, retracted.effective_ms, retracted.issued_ms + 2 * HOUR,
                         version=2, status=Status.ENTERED_IN_ERROR, fact=retracted.fact_id))
    return events


def frame(events: list[CanonicalEvent]) -> pl.DataFrame:
    """Events in arrival order = issue order; one message per issue time and patient."""
    events = sorted(events, key=lambda e: (e.issued_ms, e.patient_id, e.fact_id, e.version))
    rows, offsets = [], {}
    for e in events:
        key = (e.patient_id, e.issued_ms)
        offset = offsets.setdefault(key, len(offsets))
        idx = sum(1 for r in rows if r["offset"] == offset)
        rows.append(e.to_dict() | {"status": e.status.value, "source": e.source.value, "provenance": None,
                                   "partition": 0, "offset": offset, "idx": idx})
    return pl.DataFrame(rows).drop("provenance")


EVENTS = history("p1", 1) + history("p2", 2)
ALL = frame(EVENTS)
# sampled scoring points: every 2.5 h across the stay, both patients, including the amendment window
POINTS = pl.DataFrame([{"patient_id": p, "scoring_ms": T0 + k * 150 * 60_000} for p in ("p1", "p2")
                       for k in range(1, 14)])


def values(features: pl.DataFrame) -> dict:
    return features.select(FEATURE_NAMES).row(0, named=True)


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)


@pytest.mark.parametrize("point", list(POINTS.iter_rows(named=True)), ids=lambda p: f"{p['patient_id']}@{p['scoring_ms']}")
def test_features_at_t_do_not_change_when_the_future_is_cut_off(point):
    t = point["scoring_ms"]
    full = values(features_as_of_issued(ALL, pl.DataFrame([point])))
    past = frame([e for e in EVENTS if e.issued_ms <= t and e.effective_ms <= t])
    truncated = values(features_as_of_issued(past, pl.DataFrame([point])))
    differing = {name: (full[name], truncated[name]) for name in FEATURE_NAMES if not same(full[name], truncated[name])}
    assert differing == {}


def test_the_amendment_is_invisible_until_it_is_issued():
    amended = next(e for e in EVENTS if e.version == 2 and e.status == Status.AMENDED and e.patient_id == "p1")
    original_issued = amended.issued_ms - 5 * HOUR
    point = {"patient_id": "p1", "scoring_ms": original_issued}  # the original is live, the fix not yet issued
    before = values(features_as_of_issued(ALL, pl.DataFrame([point])))
    t = amended.issued_ms
    after = values(features_as_of_issued(ALL, pl.DataFrame([{"patient_id": "p1", "scoring_ms": t}])))
    assert before["heart_rate_last_24h"] == amended.value - 30  # the original value
    in_window = [e.value for e in EVENTS if e.patient_id == "p1" and e.code == codes.HEART_RATE and e.version == 1
                 and t - 6 * HOUR < e.effective_ms <= t and e.fact_id != amended.fact_id]
    assert after["heart_rate_max_6h"] == max([*in_window, amended.value])


def test_labels_look_only_strictly_after_t():
    t = T0 + 10 * HOUR
    point = pl.DataFrame({"patient_id": ["p9"] * 4, "scoring_ms": [t, t, t, t], "partition": [0, 1, 2, 3],
                          "offset": [0, 0, 0, 0], "news2": [0, 0, 0, 0]})

    def label_with_low_bp_at(effective_ms: int) -> int:
        events = frame([_event("p9", 1, codes.HEART_RATE, 80.0, t - HOUR, t - HOUR),
                        _event("p9", 2, codes.SYSTOLIC_BP, 85.0, effective_ms, effective_ms)])
        return make_labels(events, point.head(1))["label"][0]

    assert label_with_low_bp_at(t - HOUR) == 0  # known at T: a feature, never the label
    assert label_with_low_bp_at(t) == 0  # at T itself: not the future
    assert label_with_low_bp_at(t + 1) == 1
    assert label_with_low_bp_at(t + 12 * HOUR) == 1
    assert label_with_low_bp_at(t + 12 * HOUR + 1) == 0  # beyond the horizon


def _vitals_points(events: pl.DataFrame) -> pl.DataFrame:
    """The scoring point of every vitals round as the stream takes it: at the charting time T, on the
    arrival of the message that carries the round (issued, i.e. committed, a minute after T)."""
    return (events.filter(pl.col("code") == codes.HEART_RATE)
            .join(events.group_by("patient_id", "partition", "offset").agg(pl.col("idx").max().alias("last")),
                  on=["patient_id", "partition", "offset"])
            .select("patient_id", scoring_ms="effective_ms", partition="partition", offset="offset", idx="last")
            .unique().sort("patient_id", "scoring_ms"))


def test_a_vitals_point_is_trained_on_its_own_round_as_the_served_model_sees_it():
    """The stream scores a vitals round when its message arrives, with the round in the features. Its
    readings are issued (committed) a minute after they were charted at T: training must see them too,
    or every training row is one round stale (time since the last heart rate an hour, not 0 s) and the
    held-out metrics describe another model than the one served. Labs resulted hours later stay out."""
    points = _vitals_points(ALL)
    trained = features_as_of_issued(ALL, points)
    served = features_at(ALL, points)  # by arrival position: what the online scorer sees
    differing = {(row["patient_id"], row["scoring_ms"], name)
                 for row, online in zip(trained.iter_rows(named=True), served.iter_rows(named=True))
                 for name in FEATURE_NAMES if not same(row[name], online[name])}
    assert differing == set()
    assert trained["heart_rate_time_since_last_s_24h"].to_list() == [0.0] * points.height
    drawn_at_t2 = T0 + 2 * HOUR  # a lactate drawn with the round at hour 2, resulted 3 h later
    at_t2 = trained.filter(pl.col("scoring_ms") == drawn_at_t2)
    assert at_t2["lactate_last_24h"].to_list() == [None, None]


# --- an amendment under the first release's result time, as the ingest parses it ------------------

DRAWN = T0 + 8 * HOUR  # a lactate drawn at 08:00
RELEASED = T0 + 9 * HOUR  # resulted 2.1 mmol/L at 09:00
AMENDED = T0 + 13 * HOUR  # amended to 4.6 (>= 4: deteriorated) at 13:00, under the 09:00 result time


def _fhir_lactate() -> list[CanonicalEvent]:
    """Versions 1 and 2 of a lab Observation as the replay writes them (streams.replay.next_version keeps
    `issued`, as servers often do; meta.lastUpdated is when the server stored each version)."""
    from schemas.fhir import parse_notification
    from streams.replay import LAB_SUBSCRIPTION, format_time_us, next_version, notification_bundle

    first = {"resourceType": "Observation", "id": "lab-lac-7", "status": "final",
             "meta": {"versionId": "1", "lastUpdated": format_time_us(RELEASED * 1000 + 2_000_000)},
             "code": {"coding": [{"system": "http://loinc.org", "code": codes.LACTATE}]},
             "subject": {"reference": "Patient/p7", "identifier": {"value": "p7"}},  # as the replay: the MRN
             "effectiveDateTime": format_time_us(DRAWN * 1000),
             "issued": format_time_us(RELEASED * 1000),
             "valueQuantity": {"value": 2.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}
    amended = next_version(first, AMENDED * 1000, "amended", 4.6)
    events = []
    for n, (resource, at_ms) in enumerate([(first, RELEASED), (amended, AMENDED)], start=1):
        bundle = notification_bundle(LAB_SUBSCRIPTION, "event-notification", n, at_ms * 1000, n, resource)
        events += parse_notification(orjson.dumps(bundle), topic="ww.fhir.notifications", partition=0, offset=n).events
    return events


def _cdc_lactate() -> list[CanonicalEvent]:
    """The same result through CDC: created, then amended by an update under REPLICA IDENTITY DEFAULT (`before`
    null, so it cannot show the result time was kept)."""
    from schemas.cdc import parse_cdc

    row = {"id": 77, "patient_id": "p7", "encounter_id": None, "loinc_code": codes.LACTATE, "value": 2.1,
           "unit": "mmol/L", "status": "final", "collected_at": DRAWN * 1000, "resulted_at": RELEASED * 1000}
    changes = [("c", None, row, RELEASED + 1_000),
               ("u", None, {**row, "value": 4.6, "status": "amended"}, AMENDED)]
    events = []
    for lsn, (op, before, after, commit_ms) in enumerate(changes, start=1):
        value = {"before": before, "after": after, "op": op, "ts_ms": commit_ms,
                 "source": {"ts_ms": commit_ms, "lsn": lsn, "table": "lab_results"}}
        events += parse_cdc("ehr.public.lab_results", orjson.dumps({"id": 77}), orjson.dumps(value), partition=0,
                            offset=lsn, cdc_topic_prefix="ehr.public").events
    return events


@pytest.mark.parametrize("source", ["fhir", "cdc"])
def test_an_amendment_under_the_first_result_time_is_invisible_to_training_until_it_was_stored(source):
    """FHIR servers often keep the first release's `issued` on an amended version, and a CDC update may keep the
    old resulted_at (under REPLICA IDENTITY DEFAULT it cannot show it): taken as they stood, the amended 4.6
    was known from 09:00, hours before it existed. Training then read it at 10:00 and 12:00 and dropped those
    points as already deteriorated, which the stream, scoring them with 2.1, never saw."""
    events = frame(_fhir_lactate() if source == "fhir" else _cdc_lactate())
    points = pl.DataFrame({"patient_id": ["p7"] * 4, "scoring_ms": [T0 + h * HOUR for h in (10, 12, 13, 14)]})
    rows = labelled_rows(events, points)
    assert rows["lactate_last_24h"].to_list() == [2.1, 2.1, 4.6, 4.6]
    assert rows["at_risk"].to_list() == [True, True, False, False]
    # the correction point the stream makes when the amendment arrives (T = the patient's clock, 08:00) is
    # known when its message was issued: it sees the amendment it applies, as the stream does
    amendment = events.filter(pl.col("version") == pl.col("version").max())
    correction = amendment.select("patient_id", "partition", "offset", "idx", scoring_ms=pl.lit(DRAWN))
    assert features_as_of_issued(events, correction)["lactate_last_24h"].to_list() == [4.6]


# --- a point sees its message up to its idx ------------------------------------------------------

POINT_T = T0 + 10 * HOUR
ROUND = ((codes.RESP_RATE, 16.0), (codes.SPO2, 97.0), (codes.O2_FLOW, 0.0), (codes.SYSTOLIC_BP, 120.0),
         (codes.HEART_RATE, 80.0), (codes.CONSCIOUSNESS, 0.0), (codes.TEMPERATURE, 37.0))


def _message_with_a_lactate_after_the_point() -> pl.DataFrame:
    """One canonical message of p1 (partition 0, offset 3): a calm vitals round charted at T and committed a
    minute later (idx 0-6, NEWS2 0), then at idx 7 a lactate of 4.6 drawn 2 h before T and resulted 20 min
    after it, which ingest put into the same micro-batch. The stream's point of the round is taken at idx 6,
    before the lactate: it scored a patient not known to be deteriorated."""
    events = [_event("p1", n, code, value, POINT_T, POINT_T + 60_000) for n, (code, value) in enumerate(ROUND)]
    events.append(_event("p1", 7, codes.LACTATE, 4.6, POINT_T - 2 * HOUR, POINT_T + 20 * 60_000))
    return pl.DataFrame([e.to_dict() | {"status": e.status.value, "source": e.source.value, "partition": 0,
                                        "offset": 3, "idx": idx} for idx, e in enumerate(events)]).drop("provenance")


LATER_IN_MESSAGE = _message_with_a_lactate_after_the_point()
PUBLISHED = pl.DataFrame({"patient_id": ["p1"], "scoring_ms": [POINT_T], "partition": [0], "offset": [3], "idx": [6],
                          "snapshot_id": ["s-round"]})


def _nightly_file(path) -> None:
    """The two tables training reads, as a nightly writes them (features_online: only the point's keys)."""
    import duckdb

    events, points = LATER_IN_MESSAGE, PUBLISHED  # noqa: F841 (read by DuckDB below)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE canonical_events AS SELECT * FROM events")
        con.execute("CREATE TABLE features_online AS SELECT * FROM points")


def test_batch_train_cuts_a_points_features_and_label_at_its_idx_not_at_the_end_of_its_message(tmp_path, monkeypatch):
    """`batch train` read the points without their idx, so each saw its whole message: the lactate issued 20 min
    after T, later in the message than the point, was known at T (4.6, deteriorated), and the point, which the
    stream scored at NEWS2 0 with no lactate, was dropped from training as already deteriorated."""
    from batch import retrain
    from wardwatch.settings import Settings

    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    _nightly_file(settings.duckdb_path)
    trained_on = {}

    class Captured(Exception):
        pass

    def capture(features, labels, *args, **kwargs):
        trained_on.update(features=features, labels=labels)
        raise Captured

    monkeypatch.setattr(retrain, "train_model", capture)
    with pytest.raises(Captured):
        retrain.retrain(settings, version="v1")
    row = trained_on["features"].row(0, named=True)
    assert (row["lactate_last_24h"], row["news2"], row["heart_rate_time_since_last_s_24h"]) == (None, 0, 0.0)
    assert trained_on["labels"]["at_risk"].to_list() == [True]
    # the same row as the stream's features at that position (by arrival, not issue time)
    served = features_at(LATER_IN_MESSAGE, PUBLISHED)
    assert all(same(row[f], served[f][0]) for f in FEATURE_NAMES)

    # `batch dataset`'s label counts read the points as `batch train` does
    from batch.dataset import label_summary

    assert label_summary(settings.duckdb_path, settings)["at_risk_points"] == 1


def test_the_nightlys_labels_table_cuts_a_point_at_its_idx():
    """The `labels` table (batch/nightly.py default_labels) took the state at T from the end of the point's
    message too: the same point was stored as not at risk."""
    from batch.nightly import default_labels

    labels = default_labels(LATER_IN_MESSAGE, PUBLISHED.with_columns(pl.col("partition", "offset", "idx").cast(pl.Int64)),
                            allowed_lateness_ms=12 * HOUR, cross_source_tolerance=0.0)
    assert labels.select("snapshot_id", "at_risk", "news2").rows() == [("s-round", True, 0)]
    # the whole message (a point archived before the stream sent idx) still sees the lactate
    whole = default_labels(LATER_IN_MESSAGE, PUBLISHED.with_columns(idx=pl.lit(None, pl.Int64),
                                                                    partition=pl.lit(0, pl.Int64), offset=pl.lit(3, pl.Int64)),
                           allowed_lateness_ms=12 * HOUR, cross_source_tolerance=0.0)
    assert whole["at_risk"].to_list() == [False]


def test_a_point_is_not_excluded_by_a_later_point_of_its_own_message_at_the_same_time():
    """Two points of one message at one time (schemas/cadence.py: a run at the last vitals time, then an abnormal
    reading re-scored), apart only in idx: the first scored a patient not deteriorated (NEWS2 2), the second
    one deteriorated (NEWS2 8). 'Deteriorated at T or before, by what was known then' is not known at the first."""
    events = frame([_event("p1", 1, codes.HEART_RATE, 80.0, POINT_T, POINT_T)])
    points = pl.DataFrame({"patient_id": ["p1"] * 3, "scoring_ms": [POINT_T, POINT_T, POINT_T + HOUR],
                           "partition": [0, 0, 0], "offset": [3, 3, 4], "idx": [6, 8, 6], "news2": [2, 8, 2],
                           "systolic_bp_last_24h": [120.0] * 3, "lactate_last_24h": [None] * 3},
                          schema_overrides={"lactate_last_24h": pl.Float64})
    assert make_labels(events, points)["at_risk"].to_list() == [True, False, False]
    # without idx each sees the whole message: one answer for both, as for points of two messages at one time
    assert make_labels(events, points.drop("idx"))["at_risk"].to_list() == [False, False, False]
