"""The per-patient step of the online plane, without Kafka: one batch of canonical messages in,
the new patient records and every output record out. streams/app.py binds it to faust.

For each canonical message (all events of one patient, in arrival order):
  context events (code_system CONTEXT: admission, location, discharge, sex, birth year) -> the
    patient's context in the record; never the measurement state, never a scoring point
  measurement events -> apply_batch (dedupe, lateness, corrections) -> late records
  if a measurement changed: a scoring point at T = patient clock, features as of T
  if a discharge advanced the context: a discharge step (resolves an open alert episode)
After the whole batch: one batched scoring call (and one for the shadow model), then per patient in
arrival order: alert corrections (a corrected fact in the open alert's basis), the alert policy, and
discharges.

Context rule (event time): per context code the record holds the event with the greatest
(effective_ms, version); a newer version of the held fact replaces it whatever its time, and its
retraction removes it. A redelivered or older event changes nothing. The current ward is the
LOCATION with the greatest effective time; the current encounter is the ADMISSION's; the patient
is discharged when the DISCHARGE is at or after that ADMISSION.

Score record (scores and scores.shadow topics), one per scoring point:
  {snapshot_id, patient_id, scoring_ms, partition, offset,      the point and its feature snapshot
   features_hash,                                               blake2b of the snapshot's features
   input_watermark: {partition, offset, event_ms},              input consumed up to, patient clock
   model_version, path (model | rule | shadow), probability, news2, tier, rationale, missing}
The snapshot itself is on the features topic under the same snapshot_id.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import orjson

from schemas.alert import build_alert
from schemas.canonical import decode_batch, make_event_id
from schemas.codes import ADMISSION, CODES, DISCHARGE, LOCATION, is_context
from schemas.deadletter import Reason, Rejection
from streams import alerting
from streams.features import compute_features
from streams.state import EFFECTIVE_MS, FACT_ID, VERSION, Kind, PatientState, apply_batch
from wardwatch.settings import Settings

# the codes whose latest facts are the basis of an alert
_BASIS_CODES = tuple(CODES)


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
        if held is None or same_fact_newer or (e.effective_ms, e.version) > (held[CTX_EFFECTIVE], held[CTX_VERSION]):
            ctx[e.code] = [e.effective_ms, e.version, e.fact_id, e.value_text, e.value, e.encounter_id]
            changed.append(e.code)
    return ctx, changed


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

    def to_bytes(self) -> bytes:
        return orjson.dumps({"s": self.state.to_dict(), "a": self.alert, "e": self.encounter_id, "c": self.context})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PatientRecord":
        d = orjson.loads(raw)  # records written before issue #5 have no "c"
        return cls(PatientState.from_dict(d["s"]), d["a"], d.get("e"), d.get("c") or {})

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


def snapshot_id(patient_id: str, partition: int, offset: int) -> str:
    return hashlib.blake2b(f"{patient_id}|{partition}|{offset}".encode(), digest_size=12).hexdigest()


def features_hash(features: dict) -> str:
    return hashlib.blake2b(orjson.dumps(features, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()


def _basis(state: PatientState, T: int) -> list[list]:
    """[fact_id, version] of the latest fact of each code at T: what the score was based on.
    Live facts are sorted by (effective_ms, fact_id), so the latest at T is one bisect away."""
    basis = []
    for code in _BASIS_CODES:
        facts = state.live(code)
        i = bisect_right(facts, T, key=lambda f: f[EFFECTIVE_MS])
        if i:
            basis.append([facts[i - 1][FACT_ID], facts[i - 1][VERSION]])
    return basis


class _Point(NamedTuple):
    patient: str
    T: int
    msg: CanonicalMessage
    features: dict
    state: PatientState
    corrected: dict  # fact_id -> version of the corrections this message applied
    context: PatientContext  # as of this message (ward and encounter of its alerts)


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
            except Exception as exc:  # data error: dead-letter, keep going
                self._reject(out, msg, Reason.INVALID_STRUCTURE, "undecodable canonical batch", exc)
                continue
            patient = events[0].patient_id
            rec = records.get(patient) or load(patient) or PatientRecord(PatientState(), alerting.initial_state())
            context_events = [e for e in events if is_context(e.code_system)]
            measurements = [e for e in events if not is_context(e.code_system)] if context_events else events
            state, features, T, corrected = rec.state, None, None, {}
            try:
                context, context_changed = apply_context(rec.context, context_events)
                if measurements:
                    result = apply_batch(rec.state, measurements, allowed_lateness_ms=self.lateness_ms,
                                         dedupe_horizon_ms=self.horizon_ms,
                                         cross_source_tolerance=self.settings.cross_source_tolerance)
                    state, T = result.state, result.state.clock
                    features = compute_features(state, T) if result.changed and T is not None else None
            except Exception as exc:  # a bug or an event the rules cannot take: keep it for replay after a fix
                self._reject(out, msg, Reason.INTERNAL_ERROR, "patient state could not apply the batch", exc)
                continue
            self.counters["context_applied"] += len(context_changed)
            self.counters["context_unchanged"] += len(context_events) - len(context_changed)
            encounter = next((e.encounter_id for e in reversed(measurements) if e.encounter_id), rec.encounter_id)
            records[patient] = PatientRecord(state, rec.alert, encounter, context)
            if measurements:
                for o in result.outcomes:
                    self.counters[o.kind.value if o.duplicate_kind is None
                                  else f"duplicate_{o.duplicate_kind.value}"] += 1
                    if o.kind is Kind.CORRECTED:
                        corrected[o.event.fact_id] = o.event.version
                for o in result.late:
                    out.late.append((patient.encode(), orjson.dumps(
                        {"event": o.event.to_dict(), "late_by_ms": o.late_by_ms,
                         "partition": msg.partition, "offset": msg.offset}), []))
            view = context_view(context)
            view = view._replace(encounter_id=view.encounter_id or encounter)
            if features is not None:
                steps.append(_Point(patient, T, msg, features, state, corrected, view))
            if DISCHARGE in context_changed and view.discharged_ms is not None:
                steps.append(_Discharge(patient, view.discharged_ms, msg, view))

        points = [s for s in steps if isinstance(s, _Point)]
        if points:
            snapshots = [p.features for p in points]
            scores = iter(self.scorer.score(snapshots))
            shadow_scorer = getattr(self.scorer, "shadow", None)
            if shadow_scorer is not None:
                for i, shadow in shadow_scorer.score_shadow(snapshots):
                    p = points[i]
                    out.shadow.append((p.patient.encode(), orjson.dumps(self._score_record(p, shadow)),
                                       _headers(p.msg)))
                    self.counters["shadow_scores"] += 1
        for s in steps:
            if isinstance(s, _Point):
                self._emit_point(s, next(scores), records, out)
            else:
                self._emit_discharge(s, records, out)
        return records, out

    def _reject(self, out: Outputs, msg: CanonicalMessage, reason: Reason, detail: str, exc: Exception) -> None:
        out.rejected.append((msg, Rejection(reason, detail, type(exc).__name__)))
        self.counters[f"rejected_{reason.value}"] += 1

    @staticmethod
    def _score_record(p: _Point, score) -> dict:
        return {"snapshot_id": snapshot_id(p.patient, p.msg.partition, p.msg.offset), "patient_id": p.patient,
                "scoring_ms": p.T, "partition": p.msg.partition, "offset": p.msg.offset,
                "features_hash": features_hash(p.features),
                "input_watermark": {"partition": p.msg.partition, "offset": p.msg.offset, "event_ms": p.T},
                "model_version": score.model_version, "path": score.path, "probability": score.probability,
                "news2": score.news2, "tier": score.tier, "rationale": score.rationale, "missing": score.missing}

    def _emit_point(self, p: _Point, score, records, out: Outputs) -> None:
        patient, T = p.patient, p.T
        key, headers = patient.encode(), _headers(p.msg)
        out.features.append((key, orjson.dumps({"snapshot_id": snapshot_id(patient, p.msg.partition, p.msg.offset),
                                                "patient_id": patient, "scoring_ms": T,
                                                "partition": p.msg.partition, "offset": p.msg.offset,
                                                "features": p.features}), headers))
        out.scores.append((key, orjson.dumps(self._score_record(p, score)), headers))
        self.counters["scores"] += 1
        rec = records[patient]
        point = dict(scoring_ms=T, tier=score.tier, probability=score.probability, news2=score.news2,
                     path=score.path, model_version=score.model_version, rationale=score.rationale,
                     basis=lambda: _basis(p.state, T))
        alert_state, decisions = alerting.correct(rec.alert, corrected=p.corrected, **point)
        alert_state, raised = alerting.step(alert_state, patient_id=patient, policy=self.policy, **point)
        records[patient] = PatientRecord(rec.state, dict(alert_state), rec.encounter_id, rec.context)
        before = {a["alert_id"]: a for a in rec.alert.get("alerts", [])}
        after = {a["alert_id"]: a for a in alert_state["alerts"]}
        for d in decisions + raised:
            # the alert the resource describes: a raised one, an amended one, or a withdrawn one as it was
            described = after.get(d.original_alert_id or d.alert_id) or before.get(d.original_alert_id)
            self._publish(patient, d, described or alert_state, p.context, out, headers)

    def _emit_discharge(self, s: _Discharge, records, out: Outputs) -> None:
        rec = records[s.patient]
        alert_state, decisions = alerting.discharge(rec.alert, patient_id=s.patient, discharged_ms=s.discharged_ms)
        records[s.patient] = PatientRecord(rec.state, dict(alert_state), rec.encounter_id, rec.context)
        for d in decisions:
            self._publish(s.patient, d, alert_state, s.context, out, _headers(s.msg))

    def _publish(self, patient: str, d: alerting.AlertDecision, described: dict, context: PatientContext,
                 out: Outputs, headers) -> None:
        """One alert message. `described` is the episode alert it is about (an EpisodeAlert, with its
        basis and rationale) or, for a resolution, the alert state after the resolving point."""
        alert = build_alert(d, patient_id=patient, encounter_id=context.encounter_id,
                            probability=described.get("probability"), news2=described.get("news2"),
                            model_version=described.get("model_version"), path=described.get("path") or "rule",
                            rationale=described.get("rationale") or [],
                            basis_event_ids=[make_event_id(f, v) for f, v in described.get("basis", [])],
                            ward=context.ward)
        out.alerts.append((patient.encode(), orjson.dumps(alert), headers))
        self.counters[f"alerts_{d.kind}" if d.kind != "correction" else f"alerts_correction_{d.status}"] += 1


def _headers(msg: CanonicalMessage) -> list[tuple[str, bytes]]:
    return [("ww.produced_ns", str(msg.produced_ns).encode())] if msg.produced_ns else []
