"""The per-patient step of the online plane, without Kafka: one batch of canonical messages in,
the new patient records and every output record out. streams/app.py binds it to faust.

For each canonical message (all events of one patient, in arrival order):
  apply_batch (dedupe, lateness, corrections) -> late records
  if anything changed: a scoring point at T = patient clock, features as of T
After the whole batch: one batched scoring call, then the alert policy per patient in order.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import orjson

from schemas.alert import build_alert
from schemas.canonical import decode_batch, make_event_id
from schemas.codes import CODES
from schemas.deadletter import Reason, Rejection
from streams import alerting
from streams.features import compute_features
from streams.state import EFFECTIVE_MS, FACT_ID, VERSION, PatientState, apply_batch
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


@dataclass(slots=True)
class PatientRecord:
    state: PatientState
    alert: dict
    encounter_id: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({"s": self.state.to_dict(), "a": self.alert, "e": self.encounter_id})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PatientRecord":
        d = orjson.loads(raw)
        return cls(PatientState.from_dict(d["s"]), d["a"], d.get("e"))


Output = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


@dataclass
class Outputs:
    late: list[Output] = field(default_factory=list)
    features: list[Output] = field(default_factory=list)
    scores: list[Output] = field(default_factory=list)
    alerts: list[Output] = field(default_factory=list)
    rejected: list[tuple[CanonicalMessage, Rejection]] = field(default_factory=list)


def snapshot_id(patient_id: str, partition: int, offset: int) -> str:
    return hashlib.blake2b(f"{patient_id}|{partition}|{offset}".encode(), digest_size=12).hexdigest()


def _basis(state: PatientState, T: int) -> list[str]:
    """Event ids of the latest fact of each code at T: what the score was based on.
    Live facts are sorted by (effective_ms, fact_id), so the latest at T is one bisect away."""
    ids = []
    for code in _BASIS_CODES:
        facts = state.live(code)
        i = bisect_right(facts, T, key=lambda f: f[EFFECTIVE_MS])
        if i:
            ids.append(make_event_id(facts[i - 1][FACT_ID], facts[i - 1][VERSION]))
    return ids


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
        points = []  # (patient, T, message, features, basis)
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
            try:
                result = apply_batch(rec.state, events, allowed_lateness_ms=self.lateness_ms,
                                     dedupe_horizon_ms=self.horizon_ms,
                                     cross_source_tolerance=self.settings.cross_source_tolerance)
                T = result.state.clock
                features = compute_features(result.state, T) if result.changed and T is not None else None
            except Exception as exc:  # a bug or an event the rules cannot take: keep it for replay after a fix
                self._reject(out, msg, Reason.INTERNAL_ERROR, "patient state could not apply the batch", exc)
                continue
            encounter = next((e.encounter_id for e in reversed(events) if e.encounter_id), rec.encounter_id)
            records[patient] = PatientRecord(result.state, rec.alert, encounter)
            for o in result.outcomes:
                self.counters[o.kind.value if o.duplicate_kind is None else f"duplicate_{o.duplicate_kind.value}"] += 1
            for o in result.late:
                out.late.append((patient.encode(), orjson.dumps(
                    {"event": o.event.to_dict(), "late_by_ms": o.late_by_ms,
                     "partition": msg.partition, "offset": msg.offset}), []))
            if features is not None:
                points.append((patient, T, msg, features, result.state))

        if points:
            scores = self.scorer.score([p[3] for p in points])
            for (patient, T, msg, feats, state), score in zip(points, scores, strict=True):
                self._emit_point(patient, T, msg, feats, state, score, records, out)
        return records, out

    def _reject(self, out: Outputs, msg: CanonicalMessage, reason: Reason, detail: str, exc: Exception) -> None:
        out.rejected.append((msg, Rejection(reason, detail, type(exc).__name__)))
        self.counters[f"rejected_{reason.value}"] += 1

    def _emit_point(self, patient, T, msg, feats, state, score, records, out: Outputs) -> None:
        sid = snapshot_id(patient, msg.partition, msg.offset)
        key = patient.encode()
        headers = [("ww.produced_ns", str(msg.produced_ns).encode())] if msg.produced_ns else []
        out.features.append((key, orjson.dumps({"snapshot_id": sid, "patient_id": patient, "scoring_ms": T,
                                                "partition": msg.partition, "offset": msg.offset,
                                                "features": feats}), headers))
        out.scores.append((key, orjson.dumps({
            "snapshot_id": sid, "patient_id": patient, "scoring_ms": T, "partition": msg.partition,
            "offset": msg.offset, "model_version": score.model_version, "path": score.path,
            "probability": score.probability, "news2": score.news2, "tier": score.tier,
            "rationale": score.rationale, "missing": score.missing}), headers))
        self.counters["scores"] += 1
        rec = records[patient]
        alert_state, decisions = alerting.step(rec.alert, patient_id=patient, scoring_ms=T, tier=score.tier,
                                               probability=score.probability, news2=score.news2, path=score.path,
                                               model_version=score.model_version, policy=self.policy)
        records[patient] = PatientRecord(rec.state, dict(alert_state), rec.encounter_id)
        for d in decisions:
            alert = build_alert(d, patient_id=patient, encounter_id=rec.encounter_id, probability=score.probability,
                                news2=score.news2, model_version=score.model_version, path=score.path,
                                rationale=score.rationale, basis_event_ids=_basis(state, T))
            out.alerts.append((key, orjson.dumps(alert), headers))
            self.counters[f"alerts_{d.kind}"] += 1
