"""FHIR subscription notifications -> canonical events. Pure; never raises.

Input: one notification Bundle as a FHIR server POSTed it (`history` in the R4/R4B backport,
`subscription-notification` in R5; other bundle types are accepted when entry[0] is a status).
entry[0] is the status: an R4 `Parameters` or an R4B/R5 `SubscriptionStatus`.

- `handshake`, `heartbeat`, `query-status` -> Control (they carry no clinical facts).
- Event notifications with full resources: each Observation whose code (or a component's code) is a
  wardwatch code becomes one event per code: a BP panel gives systolic and diastolic, a pulse-oximetry
  Observation gives SpO2 (2708-6 and 59408-5 are one fact) and its O2-flow component.
  Units go to the canonical unit (degF -> Cel, WBC /uL -> 10*3/uL); ACVPU SNOMED codes -> ordinal + letter.
  fact_id = "fhir:Observation/<id>:<code>", version = meta.versionId (default 1).
- Observations of unused codes, Encounters, Patients and other resources are skipped and counted;
  a notification with nothing usable is Ignored (still carrying its event numbers for gap detection).
- `empty` / `id-only` payloads need a FHIR server to fetch the resources: Rejected NO_FHIR_SERVER.

**One bad Observation rejects the whole notification** (invalid resource, unusable status, bad or
implausible value, unknown unit, no patient or time): the dead-lettered original can be replayed
whole, and its event numbers are not half-consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import orjson

from schemas.canonical import LOINC, CanonicalEvent, Source, Status
from schemas.codes import (ACVPU_ORDINAL, BP_PANEL, CODES, CONSCIOUSNESS, DIASTOLIC_BP, SNOMED_ACVPU,
                           SYSTOLIC_BP, canonical_code, to_canonical_unit)
from schemas.deadletter import Reason
from schemas.ingest_outcome import Control, Ignored, Outcome, Parsed, Reject, rejected
from schemas.ingest_values import acvpu_letter, finite_number, iso_to_ms, plausible

SNOMED = "http://snomed.info/sct"
CONTROL_TYPES = ("handshake", "heartbeat", "query-status")
EVENT_TYPES = ("event-notification", "query-event")
USED_STATUSES = {s.value: s for s in Status}  # final, preliminary, amended, corrected, entered-in-error
R4B, R5 = "R4B", "R5"


def parse_notification(value: bytes | None, *, topic: str, partition: int, offset: int) -> Outcome:
    try:
        return _parse(value, topic, partition, offset)
    except Reject as r:
        return rejected(r.reason, r.detail, r.exception)
    except orjson.JSONDecodeError as exc:
        return rejected(Reason.MALFORMED_JSON, "notification is not UTF-8 JSON", type(exc).__name__)
    except Exception as exc:  # a bug: keep the message for replay after the fix
        return rejected(Reason.INTERNAL_ERROR, "unexpected error parsing a FHIR notification", type(exc).__name__)


@dataclass(frozen=True)
class NotificationStatus:
    type: str
    subscription: str | None
    events_since_start: int | None
    event_numbers: list[int]
    focus: list[str]
    fhir_version: str  # which fhir.resources model set validates the resources

    def detail(self) -> dict[str, Any]:
        return {"subscription": self.subscription, "events_since_start": self.events_since_start,
                "event_numbers": self.event_numbers}


@dataclass
class _Context:
    status: NotificationStatus
    topic: str
    partition: int
    offset: int
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, kind: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1


def _parse(value: bytes | None, topic: str, partition: int, offset: int) -> Outcome:
    if value is None:
        raise Reject(Reason.INVALID_STRUCTURE, "notification message has no value")
    bundle = orjson.loads(value)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise Reject(Reason.INVALID_STRUCTURE, f"expected a notification Bundle, got {str(kind)[:40]}")
    entries = _dicts(bundle.get("entry"))
    if not entries:
        raise Reject(Reason.INVALID_STRUCTURE, "notification Bundle has no entries")
    status = parse_status(entries[0].get("resource"), bundle.get("type"))
    if status.type in CONTROL_TYPES:
        return Control(status.type, status.detail())
    if status.type not in EVENT_TYPES:
        raise Reject(Reason.INVALID_STRUCTURE, f"unknown notification type {status.type[:40]!r}")

    resources = [e.get("resource") for e in entries[1:]]
    if any(not isinstance(r, dict) for r in resources) or (not resources and status.focus):
        raise Reject(Reason.NO_FHIR_SERVER, "empty or id-only notification: resources must be fetched "
                                            "from the FHIR server, which is not configured")
    ctx = _Context(status, topic, partition, offset)
    events = []
    for resource in resources:
        if resource.get("resourceType") == "Observation":
            events += observation_events(resource, ctx)
        else:
            ctx.skip(str(resource.get("resourceType"))[:40])
    if not events:
        kind = max(ctx.skipped, key=ctx.skipped.get) if ctx.skipped else "empty"
        return Ignored(kind, {**status.detail(), "skipped": ctx.skipped})
    return Parsed(events, subscription=status.subscription, event_numbers=status.event_numbers,
                  skipped=ctx.skipped)


# --- the status entry ----------------------------------------------------------------------------


def parse_status(resource: Any, bundle_type: Any) -> NotificationStatus:
    """R4 Parameters or R4B/R5 SubscriptionStatus -> NotificationStatus."""
    if not isinstance(resource, dict):
        raise Reject(Reason.INVALID_STRUCTURE, "entry[0] holds no status resource")
    version = R5 if bundle_type == "subscription-notification" else R4B  # R4 resources validate as R4B
    kind = resource.get("resourceType")
    try:
        if kind == "SubscriptionStatus":
            events = _dicts(resource.get("notificationEvent"))
            return NotificationStatus(
                type=_required_text(resource.get("type"), "type"),
                subscription=_reference(resource.get("subscription")),
                events_since_start=_counter(resource.get("eventsSinceSubscriptionStart")),
                event_numbers=[n for n in (_counter(e.get("eventNumber")) for e in events) if n is not None],
                focus=[f for f in (_reference(e.get("focus")) for e in events) if f],
                fhir_version=version,
            )
        if kind == "Parameters":
            params = _dicts(resource.get("parameter"))
            events = [_parts(p) for p in params if p.get("name") == "notification-event"]
            top = _parts({"part": params})
            return NotificationStatus(
                type=_required_text(top.get("type"), "type"),
                subscription=_reference(top.get("subscription")),
                events_since_start=_counter(top.get("events-since-subscription-start")),
                event_numbers=[n for n in (_counter(e.get("event-number")) for e in events) if n is not None],
                focus=[f for f in (_reference(e.get("focus")) for e in events) if f],
                fhir_version=version,
            )
    except (ValueError, TypeError) as exc:
        raise Reject(Reason.INVALID_STRUCTURE, "unreadable notification status counters") from exc
    raise Reject(Reason.INVALID_STRUCTURE, f"entry[0] is {str(kind)[:40]}, not a subscription status")


def _parts(param: dict) -> dict[str, Any]:
    """Parameters parts by name -> their value[x] (first one wins)."""
    out: dict[str, Any] = {}
    for part in _dicts(param.get("part")):
        if isinstance(part.get("name"), str):
            value = next((v for k, v in part.items() if k.startswith("value")), None)
            out.setdefault(part["name"], value)
    return out


def _dicts(raw: Any) -> list[dict]:
    """The objects of a JSON array; anything else is an empty list."""
    return [item for item in raw if isinstance(item, dict)] if isinstance(raw, list) else []


def _counter(raw: Any) -> int | None:
    """integer64 counters are strings in R4/R4B and may still be strings in R5 JSON."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ValueError("boolean counter")
    return int(str(raw).strip())


def _required_text(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise Reject(Reason.INVALID_STRUCTURE, f"notification status has no {what}")
    return raw


def _reference(raw: Any) -> str | None:
    if isinstance(raw, dict):
        raw = raw.get("reference")
    return raw if isinstance(raw, str) and raw else None


# --- Observations --------------------------------------------------------------------------------


def observation_events(obs: dict, ctx: _Context) -> list[CanonicalEvent]:
    measured = _measured_codes(obs)
    if not measured and _loinc(obs.get("code")) != BP_PANEL:
        ctx.skip("unmapped_code")
        return []
    validate_observation(obs, ctx.status.fhir_version)

    obs_id = obs.get("id")
    if not isinstance(obs_id, str) or not obs_id:
        raise Reject(Reason.INVALID_STRUCTURE, "Observation without id")
    status = USED_STATUSES.get(obs.get("status"))
    if status is None:
        raise Reject(Reason.BAD_VALUE, f"Observation status {str(obs.get('status'))[:20]!r} is not ingested")
    patient = _patient_id(obs.get("subject"))
    if patient is None:
        raise Reject(Reason.MISSING_PATIENT, "Observation subject is not a Patient")
    effective_ms = _effective_ms(obs)
    meta = obs.get("meta") if isinstance(obs.get("meta"), dict) else {}
    issued = obs.get("issued") or meta.get("lastUpdated")
    issued_ms = iso_to_ms(issued, "issued") if issued else effective_ms
    version = _version(meta.get("versionId"))
    encounter = _reference_id(_reference(obs.get("encounter")), "Encounter")
    provenance = {"resource": f"Observation/{obs_id}", "subscription": ctx.status.subscription,
                  "topic": ctx.topic, "partition": ctx.partition, "offset": ctx.offset,
                  "fhir_version": ctx.status.fhir_version}

    if status.retracts:
        # a retracted panel may arrive stripped of its components: retract both pressures
        codes = [code for code, _ in measured] or [SYSTOLIC_BP, DIASTOLIC_BP]
        values = {code: (None, None) for code in codes}
    else:
        values = {}
        for code, holder in measured:
            value = _value(code, holder)
            if value is None:
                ctx.skip("no_value")
            else:
                values.setdefault(code, value)
    return [
        CanonicalEvent(
            patient_id=patient, code=code, value=value, unit=CODES[code].unit,
            effective_ms=effective_ms, issued_ms=issued_ms, status=status, source=Source.FHIR,
            fact_id=f"fhir:Observation/{obs_id}:{code}", version=version, encounter_id=encounter,
            value_text=text, provenance=provenance,
        )
        for code, (value, text) in values.items()
    ]


@cache
def _observation_model(fhir_version: str):
    if fhir_version == R5:
        from fhir.resources.observation import Observation
    else:
        from fhir.resources.R4B.observation import Observation
    return Observation


def validate_observation(obs: dict, fhir_version: str) -> None:
    """Structural FHIR validation (fhir.resources); the one place to swap for a faster check."""
    try:
        _observation_model(fhir_version).model_validate(obs)
    except ValueError as exc:  # pydantic ValidationError; its message would echo patient values
        errors = exc.errors(include_input=False) if hasattr(exc, "errors") else []
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in errors[:5])
        raise Reject(Reason.INVALID_RESOURCE, f"invalid {fhir_version} Observation: {where}",
                     type(exc).__name__) from exc


def _measured_codes(obs: dict) -> list[tuple[str, dict]]:
    """(canonical code, element holding value[x]) for the Observation itself and its components."""
    measured = []
    code = _loinc(obs.get("code"))
    if code in CODES:
        measured.append((code, obs))
    for component in _dicts(obs.get("component")):
        if (code := _loinc(component.get("code"))) in CODES:
            measured.append((code, component))
    return measured


def _loinc(concept: Any) -> str | None:
    """The first LOINC coding that is a wardwatch code (or the BP panel)."""
    if not isinstance(concept, dict):
        return None
    for coding in _dicts(concept.get("coding")):
        if coding.get("system") in (LOINC, None) and isinstance(coding.get("code"), str):
            code = coding["code"]
            if code == BP_PANEL:
                return code
            if canonical := canonical_code(code):
                return canonical
    return None


def _value(code: str, holder: dict) -> tuple[float, str | None] | None:
    """Canonical (value, text) from value[x], or None when the element has no value."""
    if code == CONSCIOUSNESS:
        return _consciousness(holder)
    quantity = holder.get("valueQuantity")
    if quantity is None:
        if "valueInteger" in holder:
            return plausible(code, finite_number(holder["valueInteger"], CODES[code].name), CODES[code].name), None
        if any(k.startswith("value") for k in holder):
            raise Reject(Reason.BAD_VALUE, f"{CODES[code].name}: value is not a Quantity")
        return None
    what = CODES[code].name
    if not isinstance(quantity, dict):
        raise Reject(Reason.BAD_VALUE, f"{what}: valueQuantity is not an object")
    number = finite_number(quantity.get("value"), what)
    # the UCUM code first, then the display unit; no unit at all means the canonical unit
    for unit in [u for u in (quantity.get("code"), quantity.get("unit")) if u] or [None]:
        converted = to_canonical_unit(code, number, unit)
        if converted is not None:
            return plausible(code, converted, what), None
    raise Reject(Reason.UNKNOWN_UNIT, f"{what}: no conversion to {CODES[code].unit}")


def _consciousness(holder: dict) -> tuple[float, str] | None:
    if "valueString" in holder:
        letter = acvpu_letter(holder["valueString"], "consciousness")
        return float(ACVPU_ORDINAL[letter]), letter
    concept = holder.get("valueCodeableConcept")
    if concept is None:
        return None
    for coding in _dicts(concept.get("coding") if isinstance(concept, dict) else None):
        if coding.get("system") == SNOMED and coding.get("code") in SNOMED_ACVPU:
            letter = SNOMED_ACVPU[coding["code"]]
            return float(ACVPU_ORDINAL[letter]), letter
    raise Reject(Reason.BAD_VALUE, "consciousness: no ACVPU SNOMED coding")


def _patient_id(subject: Any) -> str | None:
    """The MRN (subject.identifier.value) when present, else the id of a Patient reference."""
    if not isinstance(subject, dict):
        return None
    identifier = subject.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"].strip():
        return identifier["value"].strip()
    return _reference_id(_reference(subject), "Patient")


def _reference_id(reference: str | None, resource_type: str) -> str | None:
    """'Patient/123', 'https://host/fhir/Patient/123/_history/2' -> '123'."""
    if not reference:
        return None
    parts = reference.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == resource_type and parts[i + 1]:
            return parts[i + 1]
    return None


def _effective_ms(obs: dict) -> int:
    period = obs.get("effectivePeriod") if isinstance(obs.get("effectivePeriod"), dict) else {}
    effective = obs.get("effectiveDateTime") or obs.get("effectiveInstant") or period.get("start")
    if not isinstance(effective, str):
        raise Reject(Reason.MISSING_TIME, "Observation has no effective time")
    return iso_to_ms(effective, "effective")


def _version(raw: Any) -> int:
    if raw is None:
        return 1
    try:
        version = int(str(raw))
    except ValueError as exc:
        raise Reject(Reason.BAD_VALUE, "meta.versionId is not an integer") from exc
    if not 0 <= version < 2**63:  # the version orders facts as an int64 downstream
        raise Reject(Reason.BAD_VALUE, "meta.versionId is outside the int64 range")
    return version
