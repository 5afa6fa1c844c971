"""Scoring cadence, declared once as data: when a patient is scored. Both planes implement it (the
stream in streams/patient_agent.py, the batch in batch/features.py); docs/patient-state.md has the
rule in full.

A scoring point depends only on the patient's events and their arrival order, never on how the
ingest worker happened to cut them into canonical messages (within the limit below), so a replay, a
restart or a rebuild finds the same points, snapshots and alerts.

- A *run* is a maximal sequence of adjacent measurement events of one canonical message (context
  facts left out) sharing one effective time: the events of one wide CDC row or one FHIR panel.
  The point of a run is taken after its last event, position (partition, offset, idx of that event).
- A reading *rises* when it scores more NEWS2 points on its own (news2_points) than its parameter
  (NEWS2_PARAMETER: air/oxygen for a flow, an FiO2 or oxygen without a flow) gave at the patient's
  last scoring point of either trigger (scored_news2 of that point's features: the sub-scores of
  schemas.features.news2_charted_parts; a parameter not charted there counts 0): raises_news2.
- Trigger "vitals": the run holds an *accepted* reading (a retraction of a fact never seen is no reading) of a
  VITAL_SIGN_CODES code, its time T is
  newer than the patient's last vitals point, and at least `scoring_min_interval_s` of event time
  after it (0: every newer vitals set), or sooner when one of those accepted readings rises (a
  repeat set taken minutes after a normal one, a BP charted two minutes after the rest of the round,
  HR 95 -> 112). Point at T. Labs and other codes never trigger by themselves: the next vitals set
  picks them up. Late events never trigger (they are not accepted).
  The interval bounds the points of a patient; it must never hold back a rise, which would otherwise
  wait for the next round (hours) or, replaced by then, never be scored. A reading that does not
  rise leaves its parameter at or below the points it gave at the last point, so the NEWS2 tier of a
  point skipped by the interval is never above the last point's (the model's may be: it waits for
  the next point; an older reading that rises is re-scored at the clock: trigger "correction"
  below). A monitor charting HR 95 (1 point) every minute is scored at the interval's cadence, not
  every minute; a fall, or the same points again, waits for the cadence too.
  For the same reason a run at T *equal* to the last vitals point's time is a point when one of its
  accepted vitals rises: the rest of that round sent in other messages (one FHIR Observation per
  notification; the ingest writes each raw record into its own message). Its snapshot id differs
  (its trigger event is in it), so it is a new score at T, not a replacement of the first.
- Trigger "correction": otherwise, the run holds a *corrected* event (an amendment or a retraction
  of a known fact; not a restatement, a new version with the same content, which is a duplicate) and
  the patient has a vitals point already. Point at T = the patient clock after
  the run (a re-score "now" with the corrected facts), never rate-limited: an open alert whose basis
  changed must be corrected at once. It does not move the last vitals point (but it is the last
  scoring point a rise is measured from). A run older than the last vitals point (back-charted: a BP
  taken at 09:58 charted after the 10:00 round) holding an accepted vital that rises is such a point
  too, its first accepted vital the trigger event: it changes the picture now, and would otherwise
  wait for the next round (never scored if that round charts the parameter again).
- At most one point per run; "vitals" wins when both apply.

Limit: a run never spans two messages. The ingest worker writes the events of one raw record into
one message (unless a message reaches canonical_max_message_bytes), so cutting a stream of raw records
into messages differently changes nothing unless two raw records with the same effective time end up
adjacent: one run then, separate runs when cut apart. For a CDC row and its FHIR twin the point is at
the same T with the same snapshot id and sees the twin or not (the twin is a duplicate). For the
Observations of one round (HR in one, SBP in the next) one message gives one point at T seeing all of
them, separate messages a point per run holding a reading that rises, each seeing the readings before
it: extra scores at T under other snapshot ids, the last of them seeing every reading that rose (one
after it that does not rise waits for the next point: it cannot raise NEWS2).

State: the stream keeps the last scoring point's scored_news2 in the patient record (streams/
patient_agent.py PatientRecord.scored_news2); a record written before it was kept has none, every
parameter counts 0 until the next point, and any reading scoring points rises, as the rule was then.
The batch computes it from the facts: the features at each candidate point (batch/features.py).
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from schemas import codes
from schemas.features import ROOM_AIR_FIO2
from schemas.scores import (pulse_score, resp_rate_score, spo2_scale1_score, systolic_bp_score,
                            temperature_score)

# the NEWS2 parameters: a new measurement of any of them is a new vitals set (air or oxygen is
# charted as a flow, as an inhaled concentration, FiO2, or as oxygen without a flow)
VITAL_SIGN_CODES: frozenset[str] = frozenset({
    codes.RESP_RATE, codes.SPO2, codes.O2_FLOW, codes.FIO2, codes.SUPPLEMENTAL_O2, codes.SYSTOLIC_BP,
    codes.HEART_RATE, codes.CONSCIOUSNESS, codes.TEMPERATURE,
})


# a reading's NEWS2 points on its own (RCP 2017 chart, SpO2 scale 1); air or oxygen: any oxygen scores 2
_READING_POINTS = {
    codes.RESP_RATE: resp_rate_score,
    codes.SPO2: spo2_scale1_score,
    codes.O2_FLOW: lambda flow: 2 if flow > 0 else 0,
    codes.FIO2: lambda fio2: 2 if fio2 > ROOM_AIR_FIO2 else 0,
    codes.SUPPLEMENTAL_O2: lambda given: 2 if given > 0 else 0,  # on oxygen, flow not charted
    codes.SYSTOLIC_BP: systolic_bp_score,
    codes.HEART_RATE: pulse_score,
    codes.CONSCIOUSNESS: lambda ordinal: 0 if ordinal == 0 else 3,  # A scores 0; C, V, P, U score 3
    codes.TEMPERATURE: temperature_score,
}


def news2_points(code: str, value: float | None, retracts: bool = False) -> int:
    """The NEWS2 points one vital-sign reading scores on its own. 0 for another code, a reading without
    a value or a retraction."""
    score = _READING_POINTS.get(code)
    return 0 if score is None or value is None or retracts else score(value)


# the NEWS2 parameter a vital sign's reading scores in: its key in schemas.features.news2_charted_parts
# (a flow, an FiO2 and oxygen without a flow are all the air/oxygen parameter)
NEWS2_PARAMETER: dict[str, str] = {
    codes.RESP_RATE: "news2_resp_rate", codes.SPO2: "news2_spo2", codes.O2_FLOW: "news2_air_or_oxygen",
    codes.FIO2: "news2_air_or_oxygen", codes.SUPPLEMENTAL_O2: "news2_air_or_oxygen",
    codes.SYSTOLIC_BP: "news2_systolic_bp", codes.HEART_RATE: "news2_pulse",
    codes.CONSCIOUSNESS: "news2_consciousness", codes.TEMPERATURE: "news2_temperature",
}
assert NEWS2_PARAMETER.keys() == VITAL_SIGN_CODES


def scored_news2(charted_parts: dict[str, int]) -> dict[str, int]:
    """What a scoring point leaves for the cadence: the points of each parameter of its NEWS2
    (schemas.features.news2_charted_parts of its features), the non-zero ones only (a parameter not
    charted at the point, or scoring 0, counts as 0)."""
    return {part: points for part, points in charted_parts.items() if points}


def raises_news2(code: str, value: float | None, retracts: bool, scored: dict[str, int]) -> bool:
    """Whether one accepted reading scores more NEWS2 points than its parameter gave at the patient's
    last scoring point (`scored`: scored_news2 of that point; empty: every parameter 0). What lets a
    run be scored inside the minimum interval."""
    points = news2_points(code, value, retracts)
    return points > 0 and points > scored.get(NEWS2_PARAMETER[code], 0)


class Trigger(StrEnum):
    VITALS = "vitals"
    CORRECTION = "correction"


def snapshot_id(patient_id: str, trigger: str, scoring_ms: int, trigger_event_id: str) -> str:
    """The id of a scoring point's snapshot (and score). `trigger_event_id` is the event_id of the
    run's first event that triggered it (first accepted vital sign, or first correction): independent
    of Kafka offsets, so a restart's re-emission and a differently cut replay give the same id."""
    name = f"{patient_id}|{trigger}|{scoring_ms}|{trigger_event_id}"
    return hashlib.blake2b(name.encode(), digest_size=12).hexdigest()
