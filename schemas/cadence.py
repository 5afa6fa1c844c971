"""Scoring cadence, declared once as data: when a patient is scored. Both planes implement it (the
stream in streams/patient_agent.py, the batch in batch/features.py); docs/patient-state.md has the
rule in full.

A scoring point depends only on the patient's events and their arrival order, never on how the
ingest worker happened to cut them into canonical messages (within the limit below), so a replay, a
restart or a rebuild finds the same points, snapshots and alerts.

- A *run* is a maximal sequence of adjacent measurement events of one canonical message (context
  facts left out) sharing one effective time: the events of one wide CDC row or one FHIR panel.
  The point of a run is taken after its last event, position (partition, offset, idx of that event).
- Trigger "vitals": the run holds an *accepted* event of a VITAL_SIGN_CODES code, its time T is
  newer than the patient's last vitals point, and at least `scoring_min_interval_s` of event time
  after it (0: every newer vitals set). Point at T. Labs and other codes never trigger by themselves:
  the next vitals set picks them up. Late events never trigger (they are not accepted).
- Trigger "correction": otherwise, the run holds a *corrected* event (an amendment or a retraction
  of a known fact; not a restatement, a new version with the same content, which is a duplicate) and
  the patient has a vitals point already. Point at T = the patient clock after
  the run (a re-score "now" with the corrected facts), never rate-limited: an open alert whose basis
  changed must be corrected at once. It does not move the last vitals point.
- At most one point per run; "vitals" wins when both apply.

Limit: a run never spans two messages. The ingest worker writes the events of one raw record into
one message (unless a message reaches canonical_max_message_bytes), so cutting a stream of raw records
into messages differently changes nothing unless two raw records with the same effective time end up
adjacent (a CDC row and its FHIR twin): then the point is at the same T with the same snapshot id,
and sees the twin or not.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from schemas import codes

# the NEWS2 parameters: a new measurement of any of them is a new vitals set (air or oxygen is
# charted as a flow or as an inhaled concentration, FiO2)
VITAL_SIGN_CODES: frozenset[str] = frozenset({
    codes.RESP_RATE, codes.SPO2, codes.O2_FLOW, codes.FIO2, codes.SYSTOLIC_BP, codes.HEART_RATE,
    codes.CONSCIOUSNESS, codes.TEMPERATURE,
})


class Trigger(StrEnum):
    VITALS = "vitals"
    CORRECTION = "correction"


def snapshot_id(patient_id: str, trigger: str, scoring_ms: int, trigger_event_id: str) -> str:
    """The id of a scoring point's snapshot (and score). `trigger_event_id` is the event_id of the
    run's first event that triggered it (first accepted vital sign, or first correction): independent
    of Kafka offsets, so a restart's re-emission and a differently cut replay give the same id."""
    name = f"{patient_id}|{trigger}|{scoring_ms}|{trigger_event_id}"
    return hashlib.blake2b(name.encode(), digest_size=12).hexdigest()
