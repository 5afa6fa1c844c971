"""The canonical clinical event that both inputs (Debezium CDC and FHIR) map into.

One event is one clinical fact: a single coded measurement of one patient at one clinical time.
A wide `vital_signs` CDC row becomes several events; a FHIR BP panel becomes one event per component.

Times are integer milliseconds since the Unix epoch, UTC:
- `effective_ms`: the clinical time (FHIR effective[x], the row's measurement time). Windows and
  ordering use it.
- `issued_ms`: when this version of the value became available (FHIR issued; CDC commit time, a lab's
  result time). A version after the first is never issued before its source stored it (FHIR
  meta.lastUpdated, CDC commit): sources keep the first result's time on an amendment. Offline as-of
  joins use it so training never sees the future; the online plane does not read it.

Identity (the dedupe rule: docs/patient-state.md, rules 1 and 2, applied in streams/state.py):
- `fact_id` names the clinical fact across its versions: an amendment or a retraction carries the
  same fact_id with a higher `version`.
- `event_id` names one version of that fact: fact_id + version. A redelivery has the same event_id.

A FHIR Observation version carries several facts (one per code, each its own event) and replaces all of
the resource's earlier facts (docs/patient-state.md, rule 6): each of its events carries
`version_codes`, every code that version carries (the codes of all its events), so the patient state
can retract a code an earlier version had and this one dropped, whichever of its events arrives first.
None on every other event (CDC rows retract a dropped code themselves: the update's `before`), and on
FHIR events archived before the field existed: the rule then does not apply to them.
"""

from __future__ import annotations

import hashlib
import dataclasses
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import orjson

from schemas.codes import ACVPU, CONSCIOUSNESS


class Source(StrEnum):
    CDC = "cdc"
    FHIR = "fhir"


class Status(StrEnum):
    FINAL = "final"
    PRELIMINARY = "preliminary"
    AMENDED = "amended"
    CORRECTED = "corrected"
    ENTERED_IN_ERROR = "entered-in-error"  # a retraction: the fact must be removed

    @property
    def retracts(self) -> bool:
        return self is Status.ENTERED_IN_ERROR


LOINC = "http://loinc.org"


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    patient_id: str
    code: str  # LOINC code (code_system says which system)
    value: float | None  # canonical units; None only for retractions
    unit: str | None  # UCUM code
    effective_ms: int
    issued_ms: int
    status: Status
    source: Source
    fact_id: str  # stable across versions of one fact, e.g. "cdc:vital_signs:42:8867-4"
    version: int  # orders versions of one fact (CDC lsn, FHIR versionId)
    encounter_id: str | None = None
    code_system: str = LOINC
    value_text: str | None = None  # e.g. ACVPU letter for consciousness (value holds its ordinal)
    provenance: dict[str, Any] = field(default_factory=dict)
    # FHIR Observation events only: the codes of every event of this version of the resource, sorted (rule 6)
    version_codes: tuple[str, ...] | None = None
    # event_id, hashed on first use and kept (a hash per access was a hot spot, and the worker reads
    # few of them); not compared: equal facts and versions give equal ids
    _event_id: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def event_id(self) -> str:
        if self._event_id is None:
            object.__setattr__(self, "_event_id", make_event_id(self.fact_id, self.version))
        return self._event_id

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict (dataclasses.asdict deep-copies provenance: 20x slower on the ingest hot path).
        It shares `provenance` with the event: serialise it, don't mutate it. `version_codes` only when set
        (a CDC event's JSON is as it was before the field existed)."""
        if self.version_codes is not None:
            return {**self._dict(), "version_codes": self.version_codes}
        return self._dict()

    def _dict(self) -> dict[str, Any]:
        return {"patient_id": self.patient_id, "code": self.code, "value": self.value, "unit": self.unit,
                "effective_ms": self.effective_ms, "issued_ms": self.issued_ms, "status": self.status,
                "source": self.source, "fact_id": self.fact_id, "version": self.version,
                "encounter_id": self.encounter_id, "code_system": self.code_system,
                "value_text": self.value_text, "provenance": self.provenance, "event_id": self.event_id}

    def to_json(self) -> bytes:
        """The JSON of to_dict(), as an exact-size copy: the ingest keeps a poll's worth of these alive,
        and keeping orjson's own result (an over-allocated buffer shrunk in place) costs 1-4 µs each in
        malloc; the copy costs 0.1-0.3 µs. (A dict serialises faster than the dataclass itself.)"""
        return memoryview(orjson.dumps(self.to_dict())).tobytes()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CanonicalEvent":
        """An event from to_dict() output (or its JSON). Its event_id is recomputed, never trusted."""
        try:  # a dict lookup rather than Status(...): an Enum call is a Python call per event
            status, source = _STATUSES[d["status"]], _SOURCES[d["source"]]
        except (KeyError, TypeError):  # missing, unknown or unhashable: the Enum's own error
            status, source = Status(d["status"]), Source(d["source"])
        event = new_event(d["patient_id"], d["code"], d.get("value"), d.get("unit"), int(d["effective_ms"]),
                          int(d["issued_ms"]), status, source, d["fact_id"], int(d["version"]), d.get("encounter_id"),
                          d.get("code_system", LOINC), d.get("value_text"), d.get("provenance") or {},
                          _codes(d.get("version_codes")))
        if not event.fits():  # a record that decodes but would fail further on: name, table key, Arrow
            field_name = event.misfit()  # the field and its type only: the value may be clinical
            raise ValueError(f"canonical event field {field_name}: a {type(getattr(event, field_name)).__name__} "
                             "of the wrong type or out of range")
        return event

    def misfit(self) -> str:
        """The first field fits() refuses (the slow path, for the error message)."""
        for name in _FIELD_NAMES:
            if name != "_event_id" and not dataclasses.replace(_VALID, **{name: getattr(self, name)}).fits():
                return name
        return "value" if self.code == CONSCIOUSNESS else "?"  # fits alone, not as a consciousness

    def fits(self) -> bool:
        """The types and ranges every consumer of a decoded event relies on (the worker's table keys
        and outputs, the archive's Arrow columns): the types the ingest writes, times and integer values
        exact as doubles (so sums of times still fit int64; JSON gives Python any size), versions that
        fit int64, a non-empty patient id, and a consciousness value that is an ACVPU ordinal (NEWS2
        indexes ACVPU with it)."""
        value = self.value
        return (type(self.patient_id) is str and self.patient_id != "" and type(self.code) is str
                and type(self.fact_id) is str and type(self.code_system) is str
                and (value is None or type(value) is float
                     or (type(value) is int and -_MAX_EXACT <= value <= _MAX_EXACT))
                and -_MAX_EXACT <= self.effective_ms <= _MAX_EXACT and -_MAX_EXACT <= self.issued_ms <= _MAX_EXACT
                and 0 <= self.version <= _MAX_INT64
                and (self.code != CONSCIOUSNESS or value is None or value in _ACVPU_ORDINALS)
                and (self.unit is None or type(self.unit) is str)
                and (self.encounter_id is None or type(self.encounter_id) is str)
                and (self.value_text is None or type(self.value_text) is str)
                and type(self.provenance) is dict
                and (self.version_codes is None
                     or (type(self.version_codes) is tuple and all(type(c) is str for c in self.version_codes))))


_FIELD_NAMES = tuple(f.name for f in fields(CanonicalEvent))
# CanonicalEvent's fields as a plain dataclass: the same slots, so an instance can become a CanonicalEvent.
# A frozen dataclass sets each field through object.__setattr__ (1.5 µs per event for its 15 fields,
# for every event the ingest parses and the worker decodes); a plain one in 0.2 µs.
_Unfrozen = dataclasses.make_dataclass(
    "_Unfrozen", [(f.name, f.type, field(default=f.default, default_factory=f.default_factory, init=f.init))
                  for f in fields(CanonicalEvent)], slots=True, eq=False, repr=False, match_args=False)


def _codes(raw: Any) -> Any:
    """version_codes as decoded: a JSON list becomes the tuple the field holds (anything else stays, for fits())."""
    return tuple(raw) if type(raw) is list else raw


def new_event(*args) -> CanonicalEvent:
    """CanonicalEvent(*fields), the first 14 (or 15, with version_codes) given in field order, for the hot paths
    (the worker's decode, the CDC
    parser): built unfrozen, then made a CanonicalEvent (frozen from then on)."""
    event = _Unfrozen(*args)
    event.__class__ = CanonicalEvent
    return event


_VALID = CanonicalEvent("p", "c", 0.0, None, 0, 0, Status.FINAL, Source.CDC, "f", 1)  # every field fits
_MAX_EXACT = 2**53  # ms: the year 287,396
_ACVPU_ORDINALS = frozenset(range(len(ACVPU)))  # 0 .. 4 (2.0 == 2: a float ordinal fits)
_MAX_INT64 = 2**63 - 1
_STATUSES = {s.value: s for s in Status}
_SOURCES = {s.value: s for s in Source}


def make_event_id(fact_id: str, version: int) -> str:
    return hashlib.blake2b(f"{fact_id}|{version}".encode(), digest_size=12).hexdigest()


# --- micro-batches: one Kafka message carries many events of one patient -----------------------


def encode_batch(events: list[CanonicalEvent]) -> bytes:
    """Value of one canonical-topic message: a JSON array of event dicts, all of one patient."""
    return orjson.dumps([e.to_dict() for e in events])


def decode_batch(raw: bytes) -> list[CanonicalEvent]:
    from_dict = CanonicalEvent.from_dict
    return [from_dict(d) for d in orjson.loads(raw)]
