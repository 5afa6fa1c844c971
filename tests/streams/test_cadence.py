"""Scoring cadence in the patient agent (schemas/cadence.py): when a patient is scored, on sequences,
and that cutting the same events into other messages changes no point, snapshot or alert."""

from __future__ import annotations

import orjson
import pytest

from schemas import codes
from schemas.cadence import news2_points
from schemas.canonical import CanonicalEvent, Source, Status
from streams.patient_agent import PatientProcessor, PatientRecord
from tests.schemas import test_scores as chart
from streams.scoring import Scorer
from tests.streams.test_patient_agent import NORMAL, T0, MIN, amendment, msg, run, vitals
from wardwatch.settings import Settings

INTERVAL_S = 300


@pytest.fixture
def processor(tmp_path):
    s = Settings(model_dir=tmp_path / "no-models", allowed_lateness_s=3600, scoring_min_interval_s=INTERVAL_S)
    return PatientProcessor(s, Scorer(s.model_dir, s))


def lab(t: int, row: int, value: float = 4.5) -> CanonicalEvent:
    return CanonicalEvent(patient_id="p1", code=codes.LACTATE, value=value, unit=None, effective_ms=t, issued_ms=t,
                          status=Status.FINAL, source=Source.CDC, fact_id=f"cdc:lab_results:{row}", version=1)


def points(out) -> list[tuple[int, str, int]]:
    """(scoring_ms, trigger, idx) of each published snapshot."""
    return [(d["scoring_ms"], d["trigger"], d["idx"]) for d in (orjson.loads(v) for _, v, _ in out.features)]


def test_a_vitals_row_is_one_point_after_its_last_event(processor):
    row = vitals("p1", T0, 1)
    assert points(run(processor, [msg(0, row)], {})) == [(T0, "vitals", len(row) - 1)]


def test_a_lab_alone_does_not_score_and_the_next_vitals_set_picks_it_up(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    assert points(run(processor, [msg(1, [lab(T0 + 10 * MIN, 1)])], store)) == []
    out = run(processor, [msg(2, vitals("p1", T0 + 20 * MIN, 2, **NORMAL))], store)
    [snapshot] = [orjson.loads(v) for _, v, _ in out.features]
    assert snapshot["scoring_ms"] == T0 + 20 * MIN and snapshot["features"]["lactate_last_24h"] == 4.5


def test_normal_vitals_sets_within_the_minimum_interval_are_not_scored(processor):
    store: dict[str, PatientRecord] = {}
    out = run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL) + vitals("p1", T0 + 2 * MIN, 2, **NORMAL)),
                          msg(1, vitals("p1", T0 + INTERVAL_S * 1000, 3, **NORMAL))], store)
    assert [p[0] for p in points(out)] == [T0, T0 + INTERVAL_S * 1000]


def one_reading(t: int, row: int, code: str, value: float) -> list[CanonicalEvent]:
    """One vital charted on its own (a FHIR Observation, or a row with one column charted)."""
    return [CanonicalEvent(patient_id="p1", code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                           status=Status.FINAL, source=Source.CDC, fact_id=f"cdc:vital_signs:{row}:{code}",
                           version=row)]


@pytest.mark.parametrize("code, value", [
    (codes.SYSTOLIC_BP, 80.0),  # SBP <= 90: 3 points, a trigger on its own (RCP 2017)
    (codes.RESP_RATE, 26.0),  # RR >= 25: 3
    (codes.CONSCIOUSNESS, 2.0),  # responds to voice: 3
    (codes.HEART_RATE, 135.0),  # pulse >= 131: 3
])
def test_an_abnormal_reading_inside_the_minimum_interval_is_scored_and_alerts_at_once(processor, code, value):
    # A normal round, then one reading charted 2 min later (the BP cuff after the monitor, a repeat check):
    # held back by the interval, it waited for the next round, hours away, and was never scored if that
    # round's reading was normal again. NEWS2 (RCP 2017): a single parameter scoring 3 needs an urgent review.
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    out = run(processor, [msg(1, one_reading(T0 + 2 * MIN, 2, code, value))], store)
    assert points(out) == [(T0 + 2 * MIN, "vitals", 0)]
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in map(orjson.loads, (v for _, v, _ in out.alerts))] \
        == [("open", "medium")]
    # a normal reading inside the interval still waits (it can lower NEWS2, never raise it)
    assert points(run(processor, [msg(2, one_reading(T0 + 3 * MIN, 3, codes.HEART_RATE, 72.0))], store)) == []


def test_a_deteriorated_repeat_set_inside_the_minimum_interval_raises_the_high_alert(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    out = run(processor, [msg(1, vitals("p1", T0 + 4 * MIN, 2))], store)  # the defaults score NEWS2 >= 7
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in map(orjson.loads, (v for _, v, _ in out.alerts))] \
        == [("open", "high")]


def fhir_reading(t: int, observation: str, code: str, value: float) -> list[CanonicalEvent]:
    """One FHIR Observation of a vitals round: a notification of its own, so a canonical message of its own."""
    return [CanonicalEvent(patient_id="p1", code=code, value=value, unit=None, effective_ms=t, issued_ms=t,
                           status=Status.FINAL, source=Source.FHIR, fact_id=f"fhir:Observation/{observation}:{code}",
                           version=1)]


def test_the_rest_of_a_vitals_round_sent_as_separate_observations_is_scored_at_the_same_time(processor):
    # One round at T charted as one Observation per parameter (DOMAIN.md 2-3: one notification each). The
    # first one makes the point at T; the rest arrive at T == the last point's time, which the trigger
    # required to be exceeded: SBP 80 (3 points: an urgent review on its own, RCP 2017) was never scored.
    store: dict[str, PatientRecord] = {}
    T = T0 + 4 * 60 * MIN
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    first = run(processor, [msg(1, fhir_reading(T, "hr", codes.HEART_RATE, 72.0))], store)
    assert points(first) == [(T, "vitals", 0)] and first.alerts == []
    second = run(processor, [msg(2, fhir_reading(T, "sbp", codes.SYSTOLIC_BP, 80.0)),
                             msg(3, fhir_reading(T, "rr", codes.RESP_RATE, 26.0)),
                             msg(4, fhir_reading(T, "spo2", codes.SPO2, 91.0))], store)
    snapshots = [orjson.loads(v) for _, v, _ in second.features]
    # a new point per abnormal Observation, each its own snapshot (the trigger event is in the id)
    assert [(s["scoring_ms"], s["trigger"], s["offset"]) for s in snapshots] == [(T, "vitals", o) for o in (2, 3, 4)]
    assert len({s["snapshot_id"] for s in snapshots} | {orjson.loads(first.features[0][1])["snapshot_id"]}) == 4
    assert [s["features"]["news2"] for s in snapshots] == [3, 6, 9]  # SBP 3, + RR 3, + SpO2 3
    # two points at one event time are not out of order: the second escalates (NEWS2 9 >= 7 is high)
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in map(orjson.loads, (v for _, v, _ in second.alerts))] \
        == [("open", "medium"), ("escalate", "high")]
    # a 0-point reading at T can only lower NEWS2: it waits, as inside the interval
    assert points(run(processor, [msg(5, fhir_reading(T, "temp", codes.TEMPERATURE, 37.0))], store)) == []


def test_two_vitals_sets_in_one_message_are_two_points_each_seeing_only_what_came_before(processor):
    first, second = vitals("p1", T0, 1, hr=80), vitals("p1", T0 + 30 * MIN, 2, hr=120)
    out = run(processor, [msg(0, first + second)], {})
    snapshots = [orjson.loads(v) for _, v, _ in out.features]
    assert [(s["scoring_ms"], s["idx"]) for s in snapshots] == [(T0, len(first) - 1),
                                                                 (T0 + 30 * MIN, len(first) + len(second) - 1)]
    assert [s["features"]["heart_rate_last_24h"] for s in snapshots] == [80, 120]


def test_out_of_order_normal_vitals_within_lateness_update_state_but_do_not_score(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1))], store)
    assert points(run(processor, [msg(1, vitals("p1", T0 - 20 * MIN, 2, **NORMAL))], store)) == []
    out = run(processor, [msg(2, vitals("p1", T0 + 20 * MIN, 3))], store)
    [snapshot] = [orjson.loads(v) for _, v, _ in out.features]
    assert snapshot["features"]["vitals_count_6h"] == 3  # the out-of-order set counts at the next point


def test_a_back_charted_abnormal_reading_is_scored_at_once_at_the_clock(processor):
    # A round at 10:00 without a BP, then a BP of 80 taken at 09:58 and charted after it (back-charting): older
    # than the last vitals point, it never triggered, and waited for the next round (hours), never scored at all
    # if that round's BP was normal. SBP <= 90 scores 3, an urgent review on its own (RCP 2017).
    store: dict[str, PatientRecord] = {}
    round_without_bp = [e for e in vitals("p1", T0, 1, **NORMAL) if e.code != codes.SYSTOLIC_BP]
    run(processor, [msg(0, round_without_bp)], store)
    out = run(processor, [msg(1, one_reading(T0 - 2 * MIN, 2, codes.SYSTOLIC_BP, 80.0))], store)
    assert points(out) == [(T0, "correction", 0)]  # re-scored "now", as a correction is: the clock
    [snapshot] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    assert snapshot["systolic_bp_last_24h"] == 80.0 and snapshot["news2_systolic_bp"] == 3
    assert [(a["header"]["kind"], a["header"]["tier"]) for a in map(orjson.loads, (v for _, v, _ in out.alerts))] \
        == [("open", "medium")]
    # a normal back-charted reading still waits (it can lower NEWS2, never raise it)
    assert points(run(processor, [msg(2, one_reading(T0 - MIN, 3, codes.HEART_RATE, 72.0))], store)) == []


def test_late_vitals_never_score(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0 + 3 * 3600_000, 1))], store)
    out = run(processor, [msg(1, vitals("p1", T0, 2))], store)
    assert out.late and points(out) == []


def test_a_correction_rescores_at_the_clock_even_inside_the_minimum_interval(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1))], store)
    out = run(processor, [msg(1, [amendment("p1", T0, 1, codes.RESP_RATE, 2, 30.0)])], store)
    assert points(out) == [(T0, "correction", 0)]
    assert [orjson.loads(v)["header"]["kind"] for _, v, _ in out.alerts] == ["correction"]


def test_a_correction_before_any_point_does_not_score(processor):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, [lab(T0, 1)])], store)
    corrected = CanonicalEvent.from_dict({**lab(T0, 1, 5.0).to_dict(), "version": 2, "status": "amended"})
    assert points(run(processor, [msg(1, [corrected])], store)) == []


def test_the_same_events_cut_into_other_messages_give_the_same_points_snapshots_and_alerts(processor):
    # raw records in arrival order: high (HR 112), a lab, higher inside the interval (HR 135), calm, calm, a
    # correction raising the calm row 3 again (its own time, not adjacent to that row), calm
    rows = [vitals("p1", T0, 1, hr=112), [lab(T0 + 5 * MIN, 1)], vitals("p1", T0 + 2 * MIN, 2),
            vitals("p1", T0 + 15 * MIN, 3, **NORMAL), vitals("p1", T0 + 30 * MIN, 4, **NORMAL),
            [amendment("p1", T0 + 15 * MIN, 3, codes.RESP_RATE, 4, 26.0)], vitals("p1", T0 + 45 * MIN, 5, **NORMAL)]

    def published(cut: list[int]):
        """The raw records in order, cut into messages of the given numbers of records."""
        messages, i = [], 0
        for n in cut:
            messages.append(msg(len(messages), [e for r in rows[i:i + n] for e in r]))
            i += n
        out = run(processor, messages, {})
        snapshots = [(d["snapshot_id"], d["scoring_ms"], d["trigger"], d["features"])
                     for d in (orjson.loads(v) for _, v, _ in out.features)]
        return snapshots, [orjson.loads(v)["header"]["alert_id"] for _, v, _ in out.alerts]

    one_by_one = published([1] * len(rows))
    assert one_by_one == published([len(rows)]) == published([2, 3, 2]) == published([3, 1, 3])
    # points and alerts to compare (the row inside the interval is a point: its HR raises the pulse's points 2 -> 3)
    assert len(one_by_one[0]) == 6 and len(one_by_one[1]) >= 2


@pytest.mark.parametrize("code, table", [
    (codes.RESP_RATE, chart.RESP_RATE), (codes.SPO2, chart.SPO2_SCALE1), (codes.SYSTOLIC_BP, chart.SYSTOLIC_BP),
    (codes.HEART_RATE, chart.PULSE), (codes.TEMPERATURE, chart.TEMPERATURE),
    (codes.CONSCIOUSNESS, [(codes.ACVPU_ORDINAL[level], points) for level, points in chart.CONSCIOUSNESS]),
    (codes.O2_FLOW, [(0.0, 0), (0.5, 2), (15.0, 2)]), (codes.FIO2, [(21.0, 0), (21.5, 2), (60.0, 2)]),
    (codes.SUPPLEMENTAL_O2, [(1.0, 2)]),  # on oxygen, flow not charted
])
def test_a_readings_own_news2_points_follow_the_chart_on_every_band_edge(code, table):
    # what lets a reading be scored inside the minimum interval: the RCP 2017 chart's points, edge by edge
    assert [news2_points(code, float(value)) for value, _ in table] == [points for _, points in table]
    assert news2_points(code, None) == 0 and news2_points(code, float(table[0][0]), retracts=True) == 0
    assert news2_points(codes.LACTATE, 9.0) == 0  # labs never score a point by themselves


# --- inside the interval only a rise of a parameter's points scores -----------------------------


def test_a_monitor_charting_a_mildly_abnormal_heart_rate_every_minute_is_scored_at_the_regular_cadence(processor):
    # A round with HR 95 (1 NEWS2 point), then the monitor charting HR 95 every minute for an hour: each reading
    # scored 1 point on its own and made a point every minute (60 scores for nothing: NEWS2 cannot rise when
    # every parameter scores what it scored at the last point). Now only the interval's cadence scores.
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "hr": 95}))], store)
    scored = [p[0] for k in range(1, 61)
              for p in points(run(processor, [msg(k, one_reading(T0 + k * MIN, k + 1, codes.HEART_RATE, 95.0))],
                                  store))]
    assert scored == [T0 + k * INTERVAL_S * 1000 for k in range(1, 13)]
    assert store["p1"].scored_news2 == {"news2_pulse": 1}  # what the last point scored, kept in the record


@pytest.mark.parametrize("code, value, same, higher, news2", [
    (codes.HEART_RATE, "hr", 95.0, 112.0, 2),  # pulse 91-110: 1 point, 111-130: 2
    (codes.SPO2, "spo2", 94.0, 91.0, 3),  # SpO2 scale 1 94-95: 1 point, <= 91: 3 (an urgent review on its own)
])
def test_a_reading_raising_its_parameters_points_inside_the_interval_is_scored(processor, code, value, same, higher,
                                                                                news2):
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, value: same}))], store)
    # the same points again a minute later: nothing new (before, a point: the reading scored points on its own)
    assert points(run(processor, [msg(1, one_reading(T0 + MIN, 2, code, same))], store)) == []
    out = run(processor, [msg(2, one_reading(T0 + 2 * MIN, 3, code, higher))], store)
    assert points(out) == [(T0 + 2 * MIN, "vitals", 0)]
    [snapshot] = [orjson.loads(v)["features"] for _, v, _ in out.features]
    assert snapshot["news2"] == news2
    # back to fewer points inside the interval: waits for the cadence (a fall can only lower NEWS2)
    assert points(run(processor, [msg(3, one_reading(T0 + 3 * MIN, 4, code, same))], store)) == []


def test_a_reading_at_the_last_points_time_scores_only_when_it_raises_its_parameter(processor):
    # The split round (one FHIR Observation per message): a normal round at T, then SBP 80 at T in a message
    # of its own still scores (SBP not charted in the round: 0 -> 3); a second SBP 80 at T (another
    # Observation of the same round) scores 3 again, as the point before: no new score.
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **NORMAL))], store)
    out = run(processor, [msg(1, fhir_reading(T0, "sbp", codes.SYSTOLIC_BP, 80.0))], store)
    assert points(out) == [(T0, "vitals", 0)]
    assert [orjson.loads(v)["header"]["kind"] for _, v, _ in out.alerts] == ["open"]
    assert points(run(processor, [msg(2, fhir_reading(T0, "sbp-2", codes.SYSTOLIC_BP, 85.0))], store)) == []


def test_a_back_charted_reading_is_re_scored_only_when_it_raises_its_parameter(processor):
    store: dict[str, PatientRecord] = {}
    round_without_bp = [e for e in vitals("p1", T0, 1, **NORMAL) if e.code != codes.SYSTOLIC_BP]
    run(processor, [msg(0, round_without_bp)], store)
    # SBP 80 taken at 09:58, charted after the 10:00 round: 0 -> 3, re-scored at the clock
    assert points(run(processor, [msg(1, one_reading(T0 - 2 * MIN, 2, codes.SYSTOLIC_BP, 80.0))], store)) \
        == [(T0, "correction", 0)]
    # SBP 85 taken at 09:59: 3 points, as SBP gave at that re-score: the picture now is the same
    assert points(run(processor, [msg(2, one_reading(T0 - MIN, 3, codes.SYSTOLIC_BP, 85.0))], store)) == []
    # HR 95 taken at 09:59: 1 point where the pulse gave 0 (HR 72 at 10:00 is the latest: the re-score
    # sees 72 in NEWS2, the 95 in the model's windows), re-scored as before
    assert points(run(processor, [msg(3, one_reading(T0 - MIN, 4, codes.HEART_RATE, 95.0))], store)) \
        == [(T0, "correction", 0)]


def test_a_record_written_before_the_points_were_kept_scores_any_reading_scoring_points(processor):
    # A record of the release before (no "n"): every parameter counts 0 until its next point, so a reading
    # scoring points scores inside the interval as it did then, rather than being held back on a guess
    store: dict[str, PatientRecord] = {}
    run(processor, [msg(0, vitals("p1", T0, 1, **{**NORMAL, "hr": 95}))], store)
    current = store["p1"].to_bytes()
    old = {k: v for k, v in orjson.loads(current).items() if k != "n"}
    reading = [msg(1, one_reading(T0 + MIN, 2, codes.HEART_RATE, 95.0))]
    assert points(run(processor, reading, {"p1": PatientRecord.from_bytes(current)})) == []
    upgraded: dict[str, PatientRecord] = {"p1": PatientRecord.from_bytes(orjson.dumps(old))}
    assert points(run(processor, reading, upgraded)) == [(T0 + MIN, "vitals", 0)]
    assert upgraded["p1"].scored_news2 == {"news2_pulse": 1}  # from then on, as a record of this release
