"""The per-patient step of the online plane, without Kafka: one batch of canonical messages in,
the new patient records and every output record out. streams/app.py binds it to faust.

For each canonical message (all events of one patient, in arrival order):
  context events (code_system CONTEXT: admission, location, discharge, sex, birth year) -> the
    patient's context in the record; never the measurement state, never a scoring point
  measurement events, run by run (adjacent events of one effective time: one CDC row or FHIR
    panel) -> apply_batch (dedupe, lateness, corrections) -> late records
  after each run: a scoring point if schemas/cadence.py says so ("vitals": a new vitals set, at
    most once per scoring_min_interval_s unless it holds a reading scoring more NEWS2 points than its
    parameter gave at the last point (the record keeps those), which also scores at the last point's own
    time; "correction": a re-score after a correction or a back-charted reading raising its parameter so),
    features as of its T over the facts visible after the run's last event
  if a discharge advanced the context: a discharge step (resolves an open alert episode); while the
    context says discharged, scoring points still score but open no alert (streams/alerting.py)
After the whole batch: one scoring call (and one for the shadow model), then per patient in
arrival order: alert corrections (a corrected fact an alert read: in its basis, or in a window a feature
read at its time, read_at), the alert policy, and discharges. A message whose state step raises is
dead-lettered (internal_error) before it changes the record; one whose point or discharge raises there is
dead-lettered too, that step's outputs and alert state dropped (its events stay applied): never the batch.

Context rule (event time): per context code the record holds the event with the greatest
(effective_ms, version); a newer version of the held fact replaces it whatever its time, and its
retraction removes it. A redelivered or older event changes nothing, nor does a newer version of the
held fact with the same content (a restatement: its version is kept, no change is reported). The
current ward is the LOCATION with the greatest effective time; the current encounter is the
ADMISSION's; the patient is discharged when the DISCHARGE is at or after that ADMISSION.

Score record (scores and scores.shadow topics), one per scoring point:
  {snapshot_id, patient_id, scoring_ms, partition, offset, idx, the point (idx: its run's last event
   trigger, trigger_event_id,                                   in the message) and what triggered it
   features_hash,                                               blake2b of the snapshot's features
   input_watermark: {partition, offset, idx, event_ms},         input consumed up to, patient clock
   model_version, path (model | rule | shadow), probability, news2, tier, rationale, missing,
   preliminary_basis,                                           codes whose latest reading at T is preliminary
   stale_readings}                                              [feature, value, taken_ms] of readings it rests on
                                                                older than schemas.alert.STALE_AFTER_MS at T
The snapshot itself is on the features topic under the same snapshot_id, which is
schemas.cadence.snapshot_id(patient, trigger, T, trigger_event_id): no Kafka offset in it, so a
restart's re-emission or a replay cut into other messages repeats it.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import orjson

from schemas.alert import build_alert, stale_readings
from schemas.cadence import VITAL_SIGN_CODES, Trigger, raises_news2, scored_news2, snapshot_id
from schemas.canonical import decode_batch
from schemas.codes import ADMISSION, CODES, DISCHARGE, LOCATION, is_context
from schemas.deadletter import Reason, Rejection
from schemas.features import FEATURES, news2_charted_parts
from streams import alerting
from streams.features import compute_features
from streams.state import (EFFECTIVE_MS, FACT_ID, STATE_FORMAT, VERSION, DuplicateKind, Kind, PatientState,
                           apply_batch, is_preliminary)
from wardwatch.settings import Settings

# table keys the worker writes besides patient records (streams/app.py) begin with this: never a patient id
RESERVED_KEY_PREFIX = "__wardwatch_"
# an alert's basis: the latest fact of each code a feature reads, if it lies within that code's longest
# feature window at T (the readings the score could use): never a code no feature reads (diastolic BP,
# platelets), nor a reading older than every window (a lactate from last week)
_LATEST_ONLY = ("last", "time_since_last_s")
_BASIS_WINDOW_MS = {code: max(f.window_s for f in FEATURES if f.code == code) * 1000
                    for code in CODES if any(f.code == code for f in FEATURES)}
_BASIS_CODES = tuple(_BASIS_WINDOW_MS)
# per code, the widest window of a feature reading every reading in it, not only the latest (`last`,
# time_since_last_s): a correction of any reading there reaches an alert scored at its end (read_at)
_READ_ALL_MS = {code: max(f.window_s for f in FEATURES if f.code == code and f.agg not in _LATEST_ONLY) * 1000
                for code in _BASIS_WINDOW_MS
                if any(f.code == code and f.agg not in _LATEST_ONLY for f in FEATURES)}
# counter name of each outcome: its kind, or duplicate_<kind of duplicate>
_OUTCOME_COUNTER = {(kind, None): kind.value for kind in Kind} | {
    (Kind.DUPLICATE, duplicate): f"duplicate_{duplicate.value}" for duplicate in DuplicateKind}


@dataclass(frozen=True, slots=True)
class CanonicalMessage:
    partition: int
    offset: int
    value: bytes
    produced_ns: int | None = None  # when the raw input was produced (latency measurement)
    key: bytes | None = None


# --- patient context (pure) ------------------------------------------------------------------------

# context entry: [effective_ms, version, fact_id, value_text, value, encounter_id]
CTX_EFFECTIVE, CTX_VERSION, CTX_FACT, CTX_TEXT, CTX_VALUE, CTX_ENCOUNTER = range(6)


class PatientContext(NamedTuple):
    encounter_id: str | None
    ward: str | None
    admitted_ms: int | None
    discharged_ms: int | None  # None while admitted (or never discharged)


def apply_context(context: dict, events: list) -> tuple[dict, list[str]]:
    """Apply context events in arrival order; returns the new context (the input is not modified)
    and the codes whose entry changed."""
    ctx = dict(context)
    changed: list[str] = []
    for e in events:
        held = ctx.get(e.code)
        same_fact_newer = held is not None and held[CTX_FACT] == e.fact_id and e.version > held[CTX_VERSION]
        if e.status.retracts:
            if same_fact_newer:
                del ctx[e.code]
                changed.append(e.code)
            continue
        entry = [e.effective_ms, e.version, e.fact_id, e.value_text, e.value, e.encounter_id]
        if same_fact_newer and _ctx_content(entry) == _ctx_content(held):
            ctx[e.code] = entry  # a restatement (e.g. a re-snapshot): nothing changed
            continue
        if held is None or same_fact_newer or (e.effective_ms, e.version) > (held[CTX_EFFECTIVE], held[CTX_VERSION]):
            ctx[e.code] = entry
            changed.append(e.code)
    return ctx, changed


def _ctx_content(entry: list) -> list:
    """A context entry without its version: what the patient's context uses."""
    return [*entry[:CTX_VERSION], *entry[CTX_VERSION + 1:]]


def context_view(context: dict) -> PatientContext:
    admission, location, discharge = context.get(ADMISSION), context.get(LOCATION), context.get(DISCHARGE)
    admitted = admission[CTX_EFFECTIVE] if admission else None
    discharged = discharge[CTX_EFFECTIVE] if discharge else None
    if discharged is not None and admitted is not None and discharged < admitted:
        discharged = None  # readmitted since
    encounter = (admission or location or discharge or [None] * 6)[CTX_ENCOUNTER]
    return PatientContext(encounter, location[CTX_TEXT] if location else None, admitted, discharged)


@dataclass(slots=True)
class PatientRecord:
    state: PatientState
    alert: dict
    encounter_id: str | None = None  # from measurement events; the context's encounter wins
    context: dict = field(default_factory=dict)  # context code -> entry (see apply_context)
    vitals_scored_ms: int | None = None  # T of the patient's last "vitals" scoring point (cadence)
    # the non-zero NEWS2 points per parameter at the patient's last scoring point, of either trigger
    # (schemas.cadence.scored_news2): inside the interval only a reading raising its parameter above them scores
    scored_news2: dict = field(default_factory=dict)

    def to_bytes(self, state_format: int = STATE_FORMAT) -> bytes:
        # held by the table and the parsed cache: an exact-size copy (_output_json). state_format:
        # settings.state_write_format (state.WRITABLE_FORMATS)
        return _output_json({"s": self.state.to_dict(state_format), "a": self.alert, "e": self.encounter_id, "c": self.context,
                             "v": self.vitals_scored_ms, "n": self.scored_news2})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PatientRecord":
        # records written before issue #5 have no "c" (nor "v": the next vitals set scores); before "n" was
        # kept, none: every parameter counts 0 until the next point, so any reading scoring points scores, as it did
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, d: dict) -> "PatientRecord":
        return cls(PatientState.from_dict(d["s"]), d["a"], d.get("e"), d.get("c") or {}, d.get("v"), d.get("n") or {})

    @property
    def current_encounter(self) -> str | None:
        return context_view(self.context).encounter_id or self.encounter_id


Output = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


@dataclass
class Outputs:
    late: list[Output] = field(default_factory=list)
    features: list[Output] = field(default_factory=list)
    scores: list[Output] = field(default_factory=list)
    alerts: list[Output] = field(default_factory=list)
    shadow: list[Output] = field(default_factory=list)  # -> topics.scores_shadow, never alerts
    rejected: list[tuple[CanonicalMessage, Rejection]] = field(default_factory=list)


def features_hash(features: dict) -> str:
    return hashlib.blake2b(orjson.dumps(features, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def _latest(facts: list, T: int):
    """The latest of a code's live facts at T, or None. They are sorted by (effective_ms, fact_id), so
    it is one bisect away, and mostly the last one (T is mostly the clock)."""
    if facts and facts[-1][EFFECTIVE_MS] <= T:
        return facts[-1]
    i = bisect_right(facts, T, key=lambda f: f[EFFECTIVE_MS])
    return facts[i - 1] if i else None


def _reading(state: PatientState, code: str, T: int):
    """The fact of `code` the score at T used (its latest at T within the code's window), or None."""
    fact = _latest(state.live(code), T)
    return fact if fact is not None and fact[EFFECTIVE_MS] > T - _BASIS_WINDOW_MS[code] else None


def _basis(state: PatientState, T: int) -> list[list]:
    """[fact_id, version, code or None, effective_ms] of the latest fact of each code at T in its window
    (_BASIS_WINDOW_MS): what the score was based on, and when each reading was taken (schemas/alert.py
    says it); the code is there only for a preliminary reading (schemas/alert.py flags it)."""
    return [[fact[FACT_ID], fact[VERSION], code if is_preliminary(fact) else None, fact[EFFECTIVE_MS]]
            for code in _BASIS_CODES if (fact := _reading(state, code, T)) is not None]


def _live_copy(state: PatientState, fact_id: str, code: str) -> tuple[str, int] | None:
    """(code, effective_ms) of a fact's live copy in `state`, or None (retracted, pruned, never seen). It sits
    at the time its known entry records, under `code` unless a correction changed its code."""
    entry = state.known.get(fact_id)
    if entry is None:
        return None
    key = (entry[1], fact_id)

    def holds(facts: list) -> bool:
        return (i := bisect_left(facts, key)) < len(facts) and facts[i][:2] == key

    if holds(state.live(code)):  # nearly always: the other codes are searched only for a changed code
        return code, entry[1]
    return next(((c, entry[1]) for c, facts in state.facts.items() if c != code and holds(facts)), None)


def corrected_readings(before: PatientState, outcomes: list) -> dict[str, tuple[tuple[str, int, bool], ...]]:
    """fact_id -> (code, effective_ms, new) of each reading a run's corrections changed: its live copy before
    the run (new False; a retraction's own time may be a commit time, not the reading's) and the one after
    (new True; none for a retraction); for a final result replacing its preliminary twin (rule 4), the twin's."""
    readings: dict[str, tuple[tuple[str, int, bool], ...]] = {}
    for o in outcomes:
        if o.kind is not Kind.CORRECTED:
            continue
        e = o.event
        was = [_live_copy(before, fact_id, e.code) for fact_id in (e.fact_id, o.supersedes) if fact_id]
        spots = [(*spot, False) for spot in was if spot is not None]
        if not e.status.retracts:
            spots.append((e.code, e.effective_ms, True))
        readings[e.fact_id] = (*readings.get(e.fact_id, ()), *spots)
    return readings


def read_at(readings: dict[str, tuple[tuple[str, int, bool], ...]], state: PatientState, T: int) -> list[str]:
    """The facts of `readings` (corrected_readings) a feature read at scoring time T, before or after their
    correction: a reading within the window of a feature of its code that reads every reading in it (mean,
    min, max, count, slope; delta, its first) (_READ_ALL_MS), or, after the correction, the latest of its code
    at T (what `last` and time_since_last_s read: `state` is after it). Before the correction the latest was
    the alert's basis, matched by streams.alerting. A reading after T, older than every window, or of a code
    no feature reads is none."""
    def read(fact_id: str, code: str, effective_ms: int, new: bool) -> bool:
        if code in _READ_ALL_MS and T - _READ_ALL_MS[code] < effective_ms <= T:
            return True
        return new and code in _BASIS_WINDOW_MS and (latest := _reading(state, code, T)) is not None \
            and latest[FACT_ID] == fact_id

    return [fact_id for fact_id, spots in readings.items() if any(read(fact_id, *spot) for spot in spots)]


def _stale(state: PatientState, T: int, features: dict, rationale: list, every_part: bool = False) -> list[list]:
    """The readings the score at T rests on that are too old to be taken as today's (schemas.alert);
    `every_part`: every NEWS2 parameter charted, not only those scoring points (a resolution's calm rests on
    the readings scoring 0 too)."""
    def taken(code: str) -> int | None:
        fact = _reading(state, code, T) if code in _BASIS_WINDOW_MS else None
        return None if fact is None else fact[EFFECTIVE_MS]
    return stale_readings(features, rationale, taken, T, every_part=every_part)


def preliminary_codes(state: PatientState, T: int) -> list[str]:
    """The codes whose latest fact at T (a basis entry) is a preliminary result, in basis order.
    Runs at every scoring point: _latest inlined (a third of the cost)."""
    found = []
    for code in _BASIS_CODES:
        facts = state.facts.get(code)
        if not facts:
            continue
        fact = facts[-1]
        if fact[EFFECTIVE_MS] > T:  # a point before the code's latest fact (out-of-order vitals): bisect
            i = bisect_right(facts, T, key=lambda f: f[EFFECTIVE_MS])
            if not i:
                continue
            fact = facts[i - 1]
        if is_preliminary(fact) and fact[EFFECTIVE_MS] > T - _BASIS_WINDOW_MS[code]:
            found.append(code)
    return found


# --- scoring cadence (pure; the rule is schemas/cadence.py) ----------------------------------------


def measurement_runs(events: list) -> list[tuple[list[int], list]]:
    """The message's measurement events cut into runs: adjacent events sharing one effective time
    (one CDC row, one FHIR panel), each with the events' indices in the message. Context events are
    left out and do not cut a run."""
    runs: list[tuple[list[int], list]] = []
    for i, e in enumerate(events):
        if is_context(e.code_system):
            continue
        if runs and runs[-1][1][-1].effective_ms == e.effective_ms:
            runs[-1][0].append(i)
            runs[-1][1].append(e)
        else:
            runs.append(([i], [e]))
    return runs


def _positioned(indices: list[int], outcomes: list) -> list[tuple[int, object]]:
    """Each outcome of an applied run with its event's index in the message. A retraction the state made
    (rule 6: a FHIR version dropped a code) follows its version's event and shares its index."""
    if len(indices) == len(outcomes):  # nearly always: no version dropped a code
        return list(zip(indices, outcomes))
    positioned, position = [], iter(indices)
    idx = None
    for o in outcomes:
        if o.replaced_by is None:
            idx = next(position)
        positioned.append((idx, o))
    return positioned


def scoring_trigger(outcomes: list, *, vitals_scored_ms: int | None, min_interval_ms: int,
                    last_news2: dict[str, int] | None = None) -> tuple[Trigger, str] | None:
    """Whether one applied run makes a scoring point: (trigger, event_id of the triggering event) or None.
    `last_news2`: the NEWS2 points per parameter at the patient's last point (PatientRecord.scored_news2)."""
    T = outcomes[0].event.effective_ms  # a run shares one effective time
    # a retraction of a fact never seen (a CDC delete's null columns, at its commit time) is accepted but is no reading
    vitals = [o.event for o in outcomes
              if o.kind is Kind.ACCEPTED and o.event.code in VITAL_SIGN_CODES and not o.event.status.retracts]
    if vitals and (vitals_scored_ms is None or (T > vitals_scored_ms and T - vitals_scored_ms >= min_interval_ms)):
        return Trigger.VITALS, vitals[0].event_id  # most runs: their readings' points need not be looked at
    # a reading scoring more points than its parameter gave at the last point; one scoring as many or fewer
    # cannot raise the NEWS2 the last point scored (a monitor charting HR 95 every minute: 1 point each time)
    raises = any(raises_news2(e.code, e.value, e.status.retracts, last_news2 or {}) for e in vitals)
    # a rise never waits: inside the interval, nor at the last point's own time (the rest of its round in
    # other messages: one FHIR Observation per notification)
    if raises and T >= vitals_scored_ms:
        return Trigger.VITALS, vitals[0].event_id
    correction = next((o.event for o in outcomes if o.kind is Kind.CORRECTED), None)
    if vitals_scored_ms is not None:  # nothing scored yet: nothing to correct
        if correction is not None:
            return Trigger.CORRECTION, correction.event_id
        if raises:  # older than the last vitals point (back-charted): it changes the picture now, as a correction
            return Trigger.CORRECTION, vitals[0].event_id
    return None


class _Point(NamedTuple):
    patient: str
    T: int
    msg: CanonicalMessage
    idx: int  # index in the message of the run's last event
    trigger: Trigger
    trigger_event_id: str
    features: dict
    state: PatientState  # as of the point
    corrected: dict  # fact_id -> version of the corrections the point's run applied
    readings: dict  # fact_id in corrected -> where its readings were, before and after (corrected_readings)
    superseded: dict  # fact_id of a preliminary result -> fact_id of its final cross-source twin (in corrected)
    context: PatientContext  # as of this message (ward and encounter of its alerts)
    snapshot_id: str  # schemas.cadence.snapshot_id of the point
    features_hash: str  # features_hash(features), in its score and shadow records
    preliminary: list[str]  # preliminary_codes(state, T), in its score and shadow records


def _point(patient: str, T: int, msg: CanonicalMessage, idx: int, trigger: Trigger, trigger_event_id: str,
           features: dict, state: PatientState, corrected: dict, readings: dict, superseded: dict,
           context: PatientContext) -> _Point:
    """A point with its two hashes and preliminary codes, computed once (the features, score and shadow
    records share them)."""
    return _Point(patient, T, msg, idx, trigger, trigger_event_id, features, state, corrected, readings, superseded,
                  context,
                  snapshot_id(patient, trigger, T, trigger_event_id), features_hash(features),
                  preliminary_codes(state, T))


class _Discharge(NamedTuple):
    patient: str
    discharged_ms: int
    msg: CanonicalMessage
    context: PatientContext


class PatientProcessor:
    def __init__(self, settings: Settings, scorer, policy: alerting.AlertPolicy | None = None):
        self.settings = settings
        self.scorer = scorer
        self.policy = policy or alerting.AlertPolicy.from_settings(settings)
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.horizon_ms = settings.dedupe_horizon_s * 1000
        self.min_interval_ms = settings.scoring_min_interval_s * 1000
        self.counters: Counter[str] = Counter()

    def process(self, messages: list[CanonicalMessage],
                load: Callable[[str], PatientRecord | None]) -> tuple[dict[str, PatientRecord], Outputs]:
        out = Outputs()
        records: dict[str, PatientRecord] = {}
        steps: list[_Point | _Discharge] = []  # in arrival order
        for msg in messages:
            try:
                events = decode_batch(msg.value)
                patients = {e.patient_id for e in events}
                if len(patients) != 1:
                    raise ValueError(f"a canonical message must hold one patient, found {len(patients)}")
                patient = events[0].patient_id
                if patient.startswith(RESERVED_KEY_PREFIX):  # would read or overwrite the worker's own table rows
                    raise ValueError("a patient id may not begin with the worker's reserved table key prefix")
            except Exception as exc:  # data error: dead-letter, keep going
                self._reject(out, msg, Reason.INVALID_STRUCTURE, "undecodable canonical batch", exc)
                continue
            rec = records.get(patient) or load(patient) or PatientRecord(PatientState(), alerting.initial_state())
            context_events = [e for e in events if is_context(e.code_system)]
            state, scored, news2, points, outcomes = rec.state, rec.vitals_scored_ms, rec.scored_news2, [], []
            try:
                context, context_changed = apply_context(rec.context, context_events)
                for indices, run in measurement_runs(events):
                    before = state
                    result = apply_batch(state, run, allowed_lateness_ms=self.lateness_ms,
                                         dedupe_horizon_ms=self.horizon_ms,
                                         cross_source_tolerance=self.settings.cross_source_tolerance)
                    state = result.state
                    outcomes += _positioned(indices, result.outcomes)
                    trigger = scoring_trigger(result.outcomes, vitals_scored_ms=scored,
                                              min_interval_ms=self.min_interval_ms, last_news2=news2)
                    if trigger is None:
                        continue
                    T = run[0].effective_ms if trigger[0] is Trigger.VITALS else state.clock
                    scored = T if trigger[0] is Trigger.VITALS else scored
                    features = compute_features(state, T)
                    news2 = scored_news2(news2_charted_parts(features))
                    corrected = {o.event.fact_id: o.event.version for o in result.outcomes if o.kind is Kind.CORRECTED}
                    readings = corrected_readings(before, result.outcomes) if corrected else {}
                    superseded = {o.supersedes: o.event.fact_id for o in result.outcomes if o.supersedes}
                    points.append((T, indices[-1], *trigger, features, state, corrected, readings, superseded))
            except Exception as exc:  # a bug or an event the rules cannot take: keep it for replay after a fix
                self._reject(out, msg, Reason.INTERNAL_ERROR, "patient state could not apply the batch", exc)
                continue
            self.counters["context_applied"] += len(context_changed)
            self.counters["context_unchanged"] += len(context_events) - len(context_changed)
            encounter = next((e.encounter_id for _, o in reversed(outcomes) if (e := o.event).encounter_id),
                             rec.encounter_id)
            records[patient] = PatientRecord(state, rec.alert, encounter, context, scored, news2)
            for idx, o in outcomes:
                # a retraction the state made (rule 6) is no canonical event: counted apart, so the outcome
                # counters still add up to the events applied
                self.counters["replaced" if o.replaced_by else _OUTCOME_COUNTER[o.kind, o.duplicate_kind]] += 1
                if o.kind is Kind.LATE:
                    out.late.append((patient.encode(), _output_json(
                        {"event": o.event.to_dict(), "late_by_ms": o.late_by_ms,
                         "partition": msg.partition, "offset": msg.offset, "idx": idx}), []))
            view = context_view(context)
            view = view._replace(encounter_id=view.encounter_id or encounter)
            steps += (_point(patient, T, msg, idx, trigger, trigger_event, features, at, corrected, readings,
                             superseded, view)
                      for T, idx, trigger, trigger_event, features, at, corrected, readings, superseded in points)
            if DISCHARGE in context_changed and view.discharged_ms is not None:
                steps.append(_Discharge(patient, view.discharged_ms, msg, view))

        points = [s for s in steps if isinstance(s, _Point)]
        shadow_of: dict[int, object] = {}  # a point's index in `points` -> its shadow score
        if points:
            snapshots = [p.features for p in points]
            scores = iter(self.scorer.score(snapshots))
            shadow_scorer = getattr(self.scorer, "shadow", None)
            if shadow_scorer is not None:
                shadow_of = dict(shadow_scorer.score_shadow(snapshots))
        failed: set[tuple[int, int]] = set()  # (partition, offset) of the messages dead-lettered below
        point_index = -1
        for s in steps:
            # one step's outputs and counts are kept apart until it completes: a step that raises (a bug, or
            # an input the alert cannot express, e.g. a time beyond what a FHIR dateTime holds) must not
            # take the batch down with it (the worker would exit and fail on it again at every restart,
            # for every patient), nor leave half of its outputs or its alert state behind
            rec, staged, counts = records[s.patient], Outputs(), Counter()
            try:
                if isinstance(s, _Point):
                    point_index += 1
                    self._emit_point(s, next(scores), records, staged, counts)
                    if (shadow := shadow_of.get(point_index)) is not None:  # with its point, or not at all
                        staged.shadow.append((s.patient.encode(), _output_json(self._score_record(s, shadow)),
                                              _headers(s.msg)))
                        counts["shadow_scores"] += 1
                else:
                    self._emit_discharge(s, records, staged, counts)
            except Exception as exc:
                records[s.patient] = rec
                if (s.msg.partition, s.msg.offset) not in failed:
                    failed.add((s.msg.partition, s.msg.offset))
                    self._reject(out, s.msg, Reason.INTERNAL_ERROR,
                                 "the alert policy could not take the message's scoring point or discharge "
                                 "(its events were applied: a replay is a redelivery)", exc)
                continue
            out.features += staged.features
            out.scores += staged.scores
            out.alerts += staged.alerts
            out.shadow += staged.shadow
            self.counters.update(counts)
        return records, out

    def _reject(self, out: Outputs, msg: CanonicalMessage, reason: Reason, detail: str, exc: Exception) -> None:
        out.rejected.append((msg, Rejection(reason, detail, type(exc).__name__)))
        self.counters[f"rejected_{reason.value}"] += 1

    @staticmethod
    def _score_record(p: _Point, score, stale: list | None = None) -> dict:
        return {"snapshot_id": p.snapshot_id, "patient_id": p.patient,
                "scoring_ms": p.T, "partition": p.msg.partition, "offset": p.msg.offset, "idx": p.idx,
                "trigger": p.trigger.value, "trigger_event_id": p.trigger_event_id,
                "features_hash": p.features_hash,
                "input_watermark": {"partition": p.msg.partition, "offset": p.msg.offset, "idx": p.idx,
                                    "event_ms": p.state.clock},
                "model_version": score.model_version, "path": score.path, "probability": score.probability,
                "news2": score.news2, "tier": score.tier, "rationale": score.rationale, "missing": score.missing,
                "preliminary_basis": p.preliminary,
                "stale_readings": _stale(p.state, p.T, p.features, score.rationale) if stale is None else stale}

    def _emit_point(self, p: _Point, score, records, out: Outputs, counts: Counter) -> None:
        patient, T = p.patient, p.T
        key, headers = patient.encode(), _headers(p.msg)
        out.features.append((key, _output_json({"snapshot_id": p.snapshot_id, "patient_id": patient, "scoring_ms": T,
                                                "partition": p.msg.partition, "offset": p.msg.offset, "idx": p.idx,
                                                "trigger": p.trigger.value, "features": p.features}), headers))
        stale = _stale(p.state, T, p.features, score.rationale)
        out.scores.append((key, _output_json(self._score_record(p, score, stale)), headers))
        counts["scores"] += 1
        rec = records[patient]
        point = dict(scoring_ms=T, tier=score.tier, probability=score.probability, news2=score.news2,
                     path=score.path, model_version=score.model_version, rationale=score.rationale,
                     basis=lambda: _basis(p.state, T), stale=stale)
        alert_state, decisions = rec.alert, []
        if p.corrected:  # (without corrections, correct() changes nothing: step() fills in the same defaults)
            alert_state, decisions = alerting.correct(rec.alert, corrected=p.corrected, superseded=p.superseded,
                                                      read_at=lambda at: self._read_at(p, at),
                                                      rescore=lambda alert: self._at_alert_time(p, alert), **point)
        alert_state, raised = alerting.step(alert_state, patient_id=patient, policy=self.policy,
                                            discharged=p.context.discharged_ms is not None, missing=score.missing,
                                            **point)
        # step() returns a new dict: the record owns it
        records[patient] = PatientRecord(rec.state, alert_state, rec.encounter_id, rec.context, rec.vitals_scored_ms,
                                         rec.scored_news2)
        if not decisions and not raised:
            return  # most points: nothing to publish
        before = {a["alert_id"]: a for a in (*rec.alert.get("alerts", []), *rec.alert.get("closed", []))}
        after = {a["alert_id"]: a for a in alert_state["alerts"]}
        for d in decisions + raised:
            # the alert the resource describes: a raised one, an amended one, or a withdrawn one as it was
            described = after.get(d.original_alert_id or d.alert_id) or before.get(d.original_alert_id)
            # a resolution: the resolving point's score, and its old readings: "calm" rests on every NEWS2
            # parameter, a 20 h old normal blood pressure as much as one scoring points
            if described is None:
                described = {**alert_state, "stale": _stale(p.state, T, p.features, score.rationale, every_part=True)}
            self._publish(patient, d, described, p.context, out, headers, counts)

    def _read_at(self, p: _Point, at: int) -> list[str]:
        """The facts p's corrections changed that a feature read at an alert's time `at` (read_at): a
        correction of one reaches the alert even when it is not the latest reading (its basis), e.g. the
        heart rate that set heart_rate_max_6h. Only for an alert within the lateness bound, the one judged at
        its own time (_at_alert_time): beyond it only its basis is matched, and judged at the clock, as before."""
        if at < p.state.clock - self.lateness_ms:
            return []
        return read_at(p.readings, p.state, at)

    def _at_alert_time(self, p: _Point, alert: alerting.EpisodeAlert) -> dict | None:
        """The point a correction of an alert is judged on: the alert re-scored at its own time with the
        corrected facts (streams/alerting.py), not the correction's point at the clock, where the patient
        may have improved or worsened since. Within the lateness bound the state holds every reading of
        the alert's windows; an older alert is judged at the clock (None: the correction's own point)."""
        at = alert["scoring_ms"]
        if at == p.T or at < p.state.clock - self.lateness_ms:
            return None
        features = compute_features(p.state, at)
        [score] = self.scorer.score([features])
        return dict(scoring_ms=at, tier=score.tier, probability=score.probability, news2=score.news2,
                    path=score.path, model_version=score.model_version, rationale=score.rationale,
                    basis=lambda: _basis(p.state, at), stale=_stale(p.state, at, features, score.rationale))

    def _emit_discharge(self, s: _Discharge, records, out: Outputs, counts: Counter) -> None:
        rec = records[s.patient]
        alert_state, decisions = alerting.discharge(rec.alert, patient_id=s.patient, discharged_ms=s.discharged_ms,
                                                    admitted_ms=s.context.admitted_ms)
        records[s.patient] = PatientRecord(rec.state, dict(alert_state), rec.encounter_id, rec.context,
                                           rec.vitals_scored_ms, rec.scored_news2)
        if decisions:  # the last score's old readings, as of its time (its rationale is not kept: NEWS2's)
            last_ms = rec.alert.get("last_scoring_ms")
            stale = [] if last_ms is None else _stale(rec.state, last_ms, compute_features(rec.state, last_ms), [])
        for d in decisions:
            self._publish(s.patient, d, {**alert_state, "stale": stale}, s.context, out, _headers(s.msg), counts)

    def _publish(self, patient: str, d: alerting.AlertDecision, described: dict, context: PatientContext,
                 out: Outputs, headers, counts: Counter) -> None:
        """One alert message. `described` is the episode alert it is about (an EpisodeAlert, with its
        basis and rationale) or, for a resolution, the alert state after the resolving point."""
        alert = build_alert(d, patient_id=patient, encounter_id=context.encounter_id,
                            probability=described.get("probability"), news2=described.get("news2"),
                            model_version=described.get("model_version"), path=described.get("path") or "rule",
                            rationale=described.get("rationale") or [],
                            basis=described.get("basis", []),
                            ward=context.ward, stale=described.get("stale") or [],
                            mrn_system=self.settings.mrn_system,
                            patient_ids_are_fhir_ids=self.settings.fhir_patient_ids_are_mrns)
        out.alerts.append((patient.encode(), _output_json(alert), headers))
        counts[f"alerts_{d.kind}" if d.kind != "correction" else f"alerts_correction_{d.status}"] += 1


def _output_json(value) -> bytes:
    """orjson.dumps(value) as an exact-size copy, for bytes held past the call. orjson's result is an
    over-allocated buffer shrunk in place, and holding many costs in malloc: a batch's outputs (held
    until it is produced) ~10 us per scoring point, the copies ~0.2 us (as CanonicalEvent.to_json); a
    ~20 KB patient record 30 us to serialise when held, 25 us with the copy."""
    return memoryview(orjson.dumps(value)).tobytes()


def _headers(msg: CanonicalMessage) -> list[tuple[str, bytes]]:
    return [("ww.produced_ns", str(msg.produced_ns).encode())] if msg.produced_ns else []
