"""FHIR subscription notifications -> canonical events. Pure; never raises.

Input: one notification Bundle as a FHIR server POSTed it (`history` in the R4/R4B backport,
`subscription-notification` in R5; other bundle types are accepted when entry[0] is a status).
entry[0] is the status: an R4 `Parameters` or an R4B/R5 `SubscriptionStatus`.

- `handshake`, `heartbeat`, `query-status` -> Control (they carry no clinical facts).
- Event notifications with full resources: each Observation whose code (or a component's code) is a
  wardwatch code becomes one event per code: a BP panel gives systolic and diastolic, a pulse-oximetry
  Observation gives SpO2 (2708-6 and 59408-5 are one fact) and its O2-flow and FiO2 (3150-0) components.
  Units go to the canonical unit (degF -> Cel, WBC /uL -> 10*3/uL); a value without a unit is in the canonical
  unit only for a code reported in one unit (else UNKNOWN_UNIT: codes.MULTI_UNIT_CODES); ACVPU SNOMED codes ->
  ordinal + letter.
  A GCS total (9269-2, valueInteger or valueQuantity 3..15) is a consciousness fact (80288-4): the ACVPU
  level it stands for (schemas.codes.gcs_acvpu), the total kept in provenance `gcs_total`. Without a total,
  the sum of its eye, verbal and motor components (9267-6, 9270-0, 9268-4: integers, or LOINC answers)
  when all three are there, else skipped as `gcs_incomplete`; a total its components contradict is
  dead-lettered. Components in Observations of their own are not summed across resources (charted at
  other times): skipped as `gcs_components`.
  fact_id = "fhir:Observation/<id>:<code>", version = meta.versionId (else meta.lastUpdated in ms, else 1).
  Each event carries `version_codes`, the codes of all the version's events: the version replaces the
  resource's earlier facts, so the patient state retracts a code it no longer carries (docs/patient-state.md
  rule 6). A version after the first holding none of the mapped codes (its code unmapped, or every value
  absent) gives one event, its version marker (schemas.codes.VERSION_MARK, `version_codes` empty), which
  retracts them all; version 1 gives nothing, as before.
  issued = `issued` (when "this version" was made available, FHIR R4), else meta.lastUpdated, else the
  effective time (then checked for a future date against the notification's timestamp, else the Kafka
  record's; with neither, dead-lettered as missing_time: nothing can tell a typo from a reading). A version after the first (versionId above 1, or none: which one it is cannot be told) is
  issued at max(issued, meta.lastUpdated): servers often keep the first release's `issued` on an amended,
  corrected or entered-in-error version, which would date the new value back to the first result and let
  the offline as-of joins (training) see it hours before it existed. Version 1 keeps its `issued`: it is its
  own release time, and its lastUpdated (when the server stored it) only seconds later, as a CDC lab row
  created is issued at its result time, not its commit. The online plane never reads a measurement's issued_ms.
- Encounter -> CONTEXT facts (schemas/codes.py, the same semantics as the CDC `encounters` table):
  ADMISSION (period.start; value_text the encounter class: "IMP" -> "inpatient", ...), LOCATION (the
  active location's display, else its Location id; effective its period.start, else period.start),
  DISCHARGE (period.end, once the status is finished/completed). fact ids
  "fhir:Encounter:<id>:admission" / ":location:<effective_ms>" / ":discharge"; version = meta.versionId,
  else meta.lastUpdated in ms. A `planned` Encounter is skipped (nobody was admitted yet); status
  `entered-in-error` or `cancelled` retracts those facts (one without a period.start never gave any: a
  cancelled booking is skipped like a planned one).
- Encounter key (encounter_id) of an Encounter: its first identifier's value (the EHR's visit number, what the
  CDC rows carry); of an Observation: encounter.identifier.value. Without one, the FHIR server's Encounter id,
  namespaced "fhir:Encounter/<id>" (FHIR_ENCOUNTER_PREFIX): the server's ids are its own and may equal a visit
  number of another stay, of another patient. The same stay by CDC and by FHIR without identifier has two keys.
- Patient -> SEX (gender) and BIRTH_YEAR (the year of birthDate, nothing finer), effective
  meta.lastUpdated; the patient id is the MRN (the identifier typed `MR`, and of system `mrn_system` when
  that is given), the same ids Observation subjects resolve to; without one, the Patient id when
  `fhir_patient_ids_are_mrns`, else missing_patient. fact ids "fhir:Patient:<id>:sex" / ":birth-year".
- Patient key of an Observation / Encounter: subject.identifier.value (the MRN) when present (and, when
  `mrn_system` is given (settings.mrn_system), only when the identifier's system is that one: an identifier
  of another namespace, a national number or an insurer's id, may equal another patient's MRN, so it is
  taken for no identifier at all and the rules below apply; without `mrn_system` any identifier is), else the MRN
  of a contained Patient the subject names ("#id": its identifier typed MR, of `mrn_system` when given; without
  one missing_patient, its local id never a key), else the MRN of the Patient the subject references when the
  notification carries it (matched by "Patient/<id>", an absolute reference to it, or the entry's fullUrl; a
  urn:uuid reference that names none is missing_patient, saying so), or when streams/fhir_fetch.py read it (`patient_mrns`);
  else, with `fhir_patient_ids_are_mrns` (settings: a facade whose Patient.id is the EHR's key), the id of
  the Patient reference; else NeedsFetch with `patients` (the FHIR server's id is its own, HAPI's 1, 2, 3...,
  and may equal another patient's MRN: keyed by it, two patients' facts would merge), which without a server
  is dead-lettered no_fhir_server saying what to set.
- Observations of unused codes and other resources are skipped and counted (by resource type; a type
  FHIR does not define as "other"); a notification with nothing usable is Ignored (still carrying its
  event numbers for gap detection).
- `id-only` payloads (focus references, or entries without a resource) -> NeedsFetch: a Rejected
  (FHIR_SERVER_NOT_CONFIGURED) carrying the references, which streams/fhir_fetch.py GETs from the FHIR
  server before running `complete_notification()` back through this parser, so id-only and
  full-resource notifications give identical canonical events.
- A DELETE entry (`request.method` DELETE, no resource) retracts what the resource's version before the
  delete said, as a CDC delete does: each of its facts entered-in-error, value None, issued at the
  delete (response.lastModified, else the notification's timestamp), version the delete's own
  (response.etag W/"n"), else one past the version before (lastUpdated ms: the delete's time or 1 ms
  later), so it orders after every earlier version. That version is the resource the notification
  carries as version n-1, else a NeedsFetch reference: `Type/id/_history/<n-1>` (vread), or
  `Type/id/_history` when n is unknown. A delete of a type wardwatch does not map is skipped and
  counted like its updates; id-only references to a deleted resource are not fetched (gone: 410).
- An id-only reference the server answers 410 Gone (a notification of a delete without a DELETE entry)
  is completed by streams/fhir_fetch.py with the DELETE entry `gone_delete_entry()` builds from the
  instance history (read page by page until `history_decides()`), so it is retracted exactly as a DELETE
  entry is; a version reference `Type/id/_history/n` answered 410 (the version the delete created) with
  the DELETE entry of version n `gone_version_delete()` describes, holding the vread of version n-1.

Observation status (FHIR R4 ObservationStatus): `final`, `amended`, `corrected` and `preliminary` are read;
`entered-in-error` retracts the resource's facts (every code it can carry, value None). `cancelled` ("not
started or not completed") is a clinical state, not bad input: it retracts exactly as entered-in-error does
(the event's status is entered-in-error, provenance `fhir_status` says cancelled; without effective[x] its
issued time dates the retraction), since whatever an earlier (preliminary) version said must stop counting;
version 1 (`meta.versionId` "1") had no earlier version, so it is skipped and counted as `cancelled`, as a
`registered` one (ordered, not yet resulted) is as `not_yet_resulted`. `unknown` ("one of the listed statuses
is presumed to apply, but the source does not know which") is dead-lettered: it may be final or
entered-in-error, so neither scoring nor retracting its value is safe without a person.

**One bad resource (Observation, Encounter, Patient) rejects the whole notification** (invalid
resource, status `unknown` or not a FHIR status, bad or implausible value, a value with a comparator
(`<35`: a bound, not a measurement), unknown unit, no patient or time; an effective[x] of date, year-month or
year precision, which FHIR R4 dateTime allows, is no time either: missing_time, as a reading without a time
of day cannot be placed in an hourly window; an effectivePeriod is read at its start, and one with an end only
is missing_time too: FHIR's Period says a missing start is not known): the dead-lettered original can
be replayed whole, and its event numbers are not half-consumed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import orjson

from schemas.canonical import LOINC, CanonicalEvent, Source, Status, new_event
from schemas.codes import (ACVPU_ORDINAL, ADMISSION, BIRTH_YEAR, BP_PANEL, CODES, CONSCIOUSNESS, CONTEXT,
                           DIASTOLIC_BP, DISCHARGE, FIO2, GCS_ANSWERS, GCS_COMPONENTS, GCS_RANGE, GCS_TOTAL,
                           LOCATION, O2_FLOW, SEX, SNOMED_ACVPU, SPO2, SYSTOLIC_BP, VERSION_MARK, VERSION_MARKS,
                           canonical_code, gcs_acvpu, missing_unit_detail, to_canonical_unit)
from schemas.deadletter import Reason, Rejection
from schemas.ingest_outcome import Control, Ignored, NeedsFetch, Outcome, Parsed, Reject, rejected
from schemas.ingest_values import (INTEGER_TEXT, reject_future_measurements, acvpu_letter, finite_number, gcs_total,
                                   iso_to_ms, measurement_time_ms, plausible, undecodable_json)

SNOMED = "http://snomed.info/sct"
CONTROL_TYPES = ("handshake", "heartbeat", "query-status")
EVENT_TYPES = ("event-notification", "query-event")
COMPARATORS = ("<", "<=", ">=", ">", "ad")  # Quantity.comparator (R5 adds "ad")
USED_STATUSES = {s.value: s for s in Status}  # final, preliminary, amended, corrected, entered-in-error
# "not started or not completed" (FHIR R4 ObservationStatus): a valid state, not bad input. Whatever an
# earlier version of the resource said no longer counts, so it is retracted as entered-in-error is
CANCELLED = "cancelled"
# FHIR R4 ObservationStatus `unknown`: "one of the listed statuses is presumed to apply, but the
# authoring/source system does not know which" -- final, or entered-in-error, or cancelled. Neither
# scoring the value nor retracting it is safe to decide here: it is dead-lettered for a person
UNKNOWN_STATUS_DETAIL = ("Observation status 'unknown': the source does not know whether the value stands "
                         "(final, cancelled or entered-in-error); neither scored nor retracted")
R4B, R5 = "R4B", "R5"
# the resource types of FHIR R4B and R5 (as fhir.resources defines them): a skipped resource of any
# other type is counted as OTHER_TYPE, so input cannot add counter keys (stats, /metrics, logs)
RESOURCE_TYPES = frozenset("""
    Account ActivityDefinition ActorDefinition AdministrableProductDefinition AdverseEvent AllergyIntolerance
    Appointment AppointmentResponse ArtifactAssessment AuditEvent Basic Binary BiologicallyDerivedProduct
    BiologicallyDerivedProductDispense BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry
    ChargeItem ChargeItemDefinition Citation Claim ClaimResponse ClinicalImpression ClinicalUseDefinition
    CodeSystem Communication CommunicationRequest CompartmentDefinition Composition ConceptMap Condition
    ConditionDefinition Consent Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse
    DetectedIssue Device DeviceAssociation DeviceDefinition DeviceDispense DeviceMetric DeviceRequest
    DeviceUsage DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference Encounter
    EncounterHistory Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceReport EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag FormularyItem
    GenomicStudy Goal GraphDefinition Group GuidanceResponse HealthcareService ImagingSelection ImagingStudy
    Immunization ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide Ingredient InsurancePlan
    InventoryItem InventoryReport Invoice Library Linkage List Location ManufacturedItemDefinition Measure
    MeasureReport Media Medication MedicationAdministration MedicationDispense MedicationKnowledge
    MedicationRequest MedicationStatement MedicinalProductDefinition MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionIntake NutritionOrder NutritionProduct Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    PackagedProductDefinition Parameters Patient PaymentNotice PaymentReconciliation Permission Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse
    RegulatedAuthorization RelatedPerson RequestGroup RequestOrchestration Requirements ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment Schedule SearchParameter
    ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap Subscription
    SubscriptionStatus SubscriptionTopic Substance SubstanceDefinition SubstanceNucleicAcid SubstancePolymer
    SubstanceProtein SubstanceReferenceInformation SubstanceSourceMaterial SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestPlan TestReport TestScript Transport ValueSet VerificationResult
    VisionPrescription
""".split())
OTHER_TYPE = "other"
UNKNOWN_PATIENT = ""  # the key of a subject whose MRN must be read first (never in an outcome: see _patient_id)


def parse_notification(value: bytes | None, *, topic: str, partition: int, offset: int,
                       received_ms: int | None = None, fhir_patient_ids_are_mrns: bool = False,
                       patient_mrns: Mapping[str, str] | None = None, mrn_system: str | None = None) -> Outcome:
    """received_ms: when the message reached Kafka (the raw record's timestamp), None when unknown
    (offline checks): the bound of last resort for the future-time check (see _observation_events).
    fhir_patient_ids_are_mrns: settings.fhir_patient_ids_are_mrns (the server's Patient ids are the EHR's
    patient keys); patient_mrns: "Patient/<id>" -> MRN of subjects the notification does not identify,
    as streams/fhir_fetch.py read them after a NeedsFetch with `patients`; mrn_system: settings.mrn_system
    (the identifier system of the MRN; None: a subject's identifier is the MRN whatever its system)."""
    try:
        return _parse(value, topic, partition, offset, received_ms, fhir_patient_ids_are_mrns, patient_mrns,
                      mrn_system)
    except Reject as r:
        return rejected(r.reason, r.detail, r.exception)
    except orjson.JSONDecodeError as exc:
        return rejected(*undecodable_json(exc, "notification"), type(exc).__name__)
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
    # the server's clock: the latest notificationEvent timestamp, else the Bundle timestamp (event time
    # of the notification itself, for gap grace periods); None when neither is readable
    timestamp_ms: int | None = None

    def detail(self) -> dict[str, Any]:
        return {"subscription": self.subscription, "events_since_start": self.events_since_start,
                "event_numbers": self.event_numbers}


@dataclass
class _Context:
    status: NotificationStatus
    topic: str
    partition: int
    offset: int
    received_ms: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    # "Patient/<id>" and Patient entries' fullUrls -> MRN, of the Patients this notification carries
    # (and of the ones streams/fhir_fetch.py read for it)
    patients: dict[str, str] = field(default_factory=dict)
    ids_are_mrns: bool = False  # settings.fhir_patient_ids_are_mrns
    mrn_system: str | None = None  # settings.mrn_system
    unknown_patients: list[str] = field(default_factory=list)  # "Patient/<id>" whose MRN must be read

    def skip(self, kind: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1


def _parse(value: bytes | None, topic: str, partition: int, offset: int, received_ms: int | None = None,
           ids_are_mrns: bool = False, patient_mrns: Mapping[str, str] | None = None,
           mrn_system: str | None = None) -> Outcome:
    if value is None:
        raise Reject(Reason.INVALID_STRUCTURE, "notification message has no value")
    bundle = orjson.loads(value)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise Reject(Reason.INVALID_STRUCTURE, f"expected a notification Bundle, got {str(kind)[:40]}")
    entries = _dicts(bundle.get("entry"))
    if not entries:
        raise Reject(Reason.INVALID_STRUCTURE, "notification Bundle has no entries")
    status = parse_status(entries[0].get("resource"), bundle.get("type"), bundle.get("timestamp"))
    if status.type in CONTROL_TYPES:
        return Control(status.type, status.detail())
    if status.type not in EVENT_TYPES:
        raise Reject(Reason.INVALID_STRUCTURE, f"unknown notification type {status.type[:40]!r}")

    references, priors = _to_fetch(entries[1:], status)
    if references:
        return NeedsFetch(Rejection(Reason.FHIR_SERVER_NOT_CONFIGURED, NOT_CONFIGURED_DETAIL),
                          references=tuple(references), priors=tuple(priors))
    ctx = _Context(status, topic, partition, offset, received_ms,
                   patients={**(patient_mrns or {}), **_carried_mrns(entries[1:], mrn_system)},
                   ids_are_mrns=ids_are_mrns, mrn_system=mrn_system)
    carried = None  # read only when the notification deletes something (nearly none do)
    events = []
    for entry in entries[1:]:
        resource = entry.get("resource")
        if (deleted := _delete_of(entry)) is not None:
            if not isinstance(resource, dict) and carried is None:
                carried = _carried_versions(entries[1:])
            prior = resource if isinstance(resource, dict) else carried.get(deleted.prior_reference)
            events += deleted_events(deleted, prior, ctx)
        elif isinstance(resource, dict):
            events += _resource_events(resource, ctx)
        # else: an id-only entry of a resource this notification also deletes: the delete supersedes it
    if ctx.unknown_patients:  # whose they are is known only once their Patients are read
        return NeedsFetch(Rejection(Reason.FHIR_SERVER_NOT_CONFIGURED, UNKNOWN_PATIENT_DETAIL),
                          patients=tuple(dict.fromkeys(ctx.unknown_patients)))
    if not events:
        kind = max(ctx.skipped, key=ctx.skipped.get) if ctx.skipped else "empty"
        return Ignored(kind, {**status.detail(), "skipped": ctx.skipped})
    reject_future_measurements(events)
    return Parsed(events, subscription=status.subscription, event_numbers=status.event_numbers,
                  skipped=ctx.skipped)


def _resource_events(resource: dict, ctx: _Context) -> list[CanonicalEvent]:
    kind = resource.get("resourceType")
    if not isinstance(kind, str):  # e.g. a list: unhashable, and no type wardwatch maps
        kind = OTHER_TYPE
    mapper = _MAPPERS.get(kind)
    if mapper is None:
        ctx.skip(kind if kind in RESOURCE_TYPES else OTHER_TYPE)
        return []
    return mapper(resource, ctx)


# --- the status entry ----------------------------------------------------------------------------


def parse_status(resource: Any, bundle_type: Any, bundle_timestamp: Any = None) -> NotificationStatus:
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
                timestamp_ms=_server_time([e.get("timestamp") for e in events], bundle_timestamp),
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
                timestamp_ms=_server_time([e.get("timestamp") for e in events], bundle_timestamp),
            )
    except (ValueError, TypeError) as exc:
        raise Reject(Reason.INVALID_STRUCTURE, "unreadable notification status counters") from exc
    raise Reject(Reason.INVALID_STRUCTURE, f"entry[0] is {str(kind)[:40]}, not a subscription status")


def read_status(value: bytes | None) -> NotificationStatus | None:
    """Only the status of a notification (for the subscription watcher); None when unreadable.

    Never raises: the ingest worker dead-letters unreadable notifications, the watcher just counts them."""
    try:
        bundle = orjson.loads(value) if value is not None else None
        entries = _dicts(bundle.get("entry")) if isinstance(bundle, dict) else []
        if not entries or bundle.get("resourceType") != "Bundle":
            return None
        return parse_status(entries[0].get("resource"), bundle.get("type"), bundle.get("timestamp"))
    except Exception:  # Reject, JSONDecodeError, anything: unreadable is an answer here
        return None


def _server_time(event_timestamps: list[Any], bundle_timestamp: Any) -> int | None:
    """The latest readable notification-event timestamp, else the Bundle timestamp, else None."""
    times = [t for t in (_lenient_ms(raw) for raw in event_timestamps) if t is not None]
    return max(times) if times else _lenient_ms(bundle_timestamp)


def _lenient_ms(raw: Any) -> int | None:
    if not isinstance(raw, str):
        return None
    try:
        return iso_to_ms(raw, "timestamp")
    except Reject:
        return None


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
    text = str(raw).strip()
    if not INTEGER_TEXT.fullmatch(text):  # int() would read "8_8" and any script's digits
        raise ValueError("counter is not an integer")
    counter = int(text)
    if not 0 <= counter < 2**63:  # kept and serialised as an int64 downstream (the watcher's state)
        raise ValueError("counter outside the int64 range")
    return counter


def _required_text(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise Reject(Reason.INVALID_STRUCTURE, f"notification status has no {what}")
    return raw


def _reference(raw: Any) -> str | None:
    if isinstance(raw, dict):
        raw = raw.get("reference")
    return raw if isinstance(raw, str) and raw else None


# --- id-only payloads ----------------------------------------------------------------------------

UNKNOWN_PATIENT_DETAIL = ("a subject names its Patient by the FHIR server's id only (no identifier, no Patient "
                          "in the notification): whose MRN it is must be read from the FHIR server; set "
                          "WARDWATCH_FHIR_SERVER_URL, or WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS=true if that server's "
                          "Patient ids are the EHR's patient keys, then replay this message from the dead-letter topic")
NO_MRN_DETAIL = ("{what} has no identifier typed MR{of_system} (the MRN the EHR keys patients by) and "
                 "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS is not set: its FHIR id may be another patient's MRN")
OF_MRN_SYSTEM = " of the system WARDWATCH_MRN_SYSTEM names"  # NO_MRN_DETAIL's of_system when that is set
OTHER_SYSTEM_DETAIL = ("{what} subject's identifier is not of the system WARDWATCH_MRN_SYSTEM names (another "
                       "namespace's value may be another patient's MRN) and it names no Patient by reference")
CONTAINED_NO_MRN_DETAIL = ("{what} subject is a contained Patient without an identifier typed MR{of_system} (the MRN "
                           "the EHR keys patients by; a contained resource's id is local to it, never a patient key)")
CONTAINED_MISSING_DETAIL = "{what} subject references a contained resource ('#...') that the {what} does not contain"
UNRESOLVED_URN_DETAIL = ("{what} subject references a Patient by a urn: reference that names no Patient with an MRN "
                         "in the notification (a urn:uuid is resolved within its Bundle only)")
NOT_CONFIGURED_DETAIL = ("id-only notification: its resources must be fetched from the FHIR server; "
                         "set WARDWATCH_FHIR_SERVER_URL (and WARDWATCH_FHIR_AUTH_TOKEN if it needs one), "
                         "then replay this message from the dead-letter topic")


def no_mrn_detail(what: str, mrn_system: str | None) -> str:
    """NO_MRN_DETAIL for `what`: the dead-letter detail of a Patient without an MRN (never its id)."""
    return NO_MRN_DETAIL.format(what=what, of_system=OF_MRN_SYSTEM if mrn_system else "")


# a resource reference, relative or absolute: .../<Type>/<id>[/_history/<version>]
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?/?$")


def relative_reference(reference: str | None) -> str | None:
    """'https://host/fhir/Observation/1/_history/2' -> 'Observation/1/_history/2'; None if not a
    fetchable resource reference (urn:uuid:..., contained '#x', garbage)."""
    match = _REFERENCE.search(reference.strip()) if isinstance(reference, str) else None
    if not match or set(match[2]) == {"."}:  # "." / ".." would walk the server's URL tree
        return None
    return f"{match[1]}/{match[2]}{match[3] or ''}"


def references_to_fetch(entries: list[dict], status: NotificationStatus) -> list[str]:
    """Resources the notification names but does not carry: the focus references and the fullUrls of
    entries without a resource, minus the resources present and the ones it deletes (gone: 410); then
    for each DELETE of a mapped type, the version before the delete (`_Delete.prior_reference`) unless
    the notification carries it. Empty for full-resource payloads."""
    return _to_fetch(entries, status)[0]


def _to_fetch(entries: list[dict], status: NotificationStatus) -> tuple[list[str], list[str]]:
    """(references_to_fetch, the ones among them that are the version before a DELETE entry: a 410 for
    one of those means it cannot be read, not that it is itself a delete)."""
    present = {f"{r.get('resourceType')}/{r.get('id')}" for e in entries if isinstance(r := e.get("resource"), dict)}
    carried = None  # read only when the notification deletes something (nearly none do)
    wanted = [relative_reference(f) for f in status.focus]
    deleted, priors = set(), []
    for entry in entries:
        if (delete := _delete_of(entry)) is not None:
            deleted.add(delete.reference)
            if not isinstance(entry.get("resource"), dict) and delete.kind in _MAPPERS:
                if carried is None:
                    carried = _carried_versions(entries)
                if delete.prior_reference not in carried:
                    priors.append(delete.prior_reference)
        elif not isinstance(entry.get("resource"), dict):
            request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
            ref = relative_reference(entry.get("fullUrl")) or relative_reference(request.get("url"))
            if ref is None:
                raise Reject(Reason.INVALID_STRUCTURE, "notification entry has neither a resource nor a "
                                                       "resource reference to fetch")
            wanted.append(ref)
    known = present | deleted
    missing = [ref for ref in wanted if ref and _unversioned(ref) not in known]
    # de-duplicated, focus order, then the deletes'; a focus of a deleted resource was dropped above
    return list(dict.fromkeys(missing + priors)), list(dict.fromkeys(priors))


def complete_notification(value: bytes, fetched: dict[str, dict], gone: dict[str, dict] | None = None) -> bytes:
    """The full-resource equivalent of an id-only notification: the same status entry, the resources
    it carried, its DELETE entries (each with the version before the delete as its resource, when it
    was fetched), then the other fetched resources (reference -> resource) in reference order, then a
    DELETE entry for each reference the server answered 410 Gone (`gone`: reference -> gone_delete_entry)."""
    bundle = orjson.loads(value)
    entries = _dicts(bundle.get("entry"))
    kept, priors = [], set()
    for entry in entries[1:]:
        if (delete := _delete_of(entry)) is not None and delete.prior_reference in fetched \
                and not isinstance(entry.get("resource"), dict):
            kept.append({**entry, "resource": fetched[delete.prior_reference]})
            priors.add(delete.prior_reference)
        elif delete is not None or isinstance(entry.get("resource"), dict):
            kept.append(entry)
    added = [{"fullUrl": ref, "resource": resource} for ref, resource in fetched.items() if ref not in priors]
    return orjson.dumps({**bundle, "entry": [entries[0], *kept, *added, *(gone or {}).values()]})


def _unversioned(reference: str) -> str:
    return reference.split("/_history")[0]


# --- deletes -------------------------------------------------------------------------------------

HISTORY = "_history"
_ETAG = re.compile(r'^(?:W/)?"?([0-9]{1,18})"?$')  # W/"3": the version the delete created


@dataclass(frozen=True)
class _Delete:
    """A DELETE entry: `request.method` DELETE, no resource (the server no longer has one)."""

    reference: str  # "Type/id"
    version: int | None  # the version the delete created (response.etag), when readable
    deleted_ms: int | None  # when (response.lastModified), when readable

    @property
    def kind(self) -> str:
        return self.reference.split("/")[0]

    @property
    def prior_reference(self) -> str:
        """What to read for the version before the delete: a vread of version n-1 when the delete's
        version n is known, else the instance history (`Type/id/_history`: its newest version before
        the delete, see version_before_delete)."""
        if self.version is not None and self.version > 1:
            return f"{self.reference}/{HISTORY}/{self.version - 1}"
        return f"{self.reference}/{HISTORY}"


def _delete_of(entry: dict) -> _Delete | None:
    """The DELETE an entry records, else None."""
    request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
    method = request.get("method")
    if not isinstance(method, str) or method.upper() != "DELETE":
        return None
    ref = relative_reference(request.get("url")) or relative_reference(entry.get("fullUrl"))
    if ref is None:  # e.g. a conditional delete "Observation?identifier=..." without a fullUrl
        raise Reject(Reason.INVALID_STRUCTURE, "DELETE entry names no resource")
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    return _Delete(_unversioned(ref), _etag_version(response.get("etag")), _lenient_ms(response.get("lastModified")))


def _etag_version(raw: Any) -> int | None:
    match = _ETAG.match(raw.strip()) if isinstance(raw, str) else None
    return int(match[1]) if match else None


def _carried_versions(entries: list[dict]) -> dict[str, dict]:
    """The versioned resources the notification carries, by "Type/id/_history/<versionId>", and the newest
    of each resource (by versionId, else lastUpdated) by "Type/id/_history", the version a delete without
    an etag needs: the version before a delete, when it is one of them (an update and a delete in one
    notification), is not read."""
    carried, newest = {}, {}
    for entry in entries:
        resource = entry.get("resource")
        meta = resource.get("meta") if isinstance(resource, dict) else None
        if not isinstance(meta, dict) or _delete_of(entry) is not None:
            continue
        ref = f"{resource.get('resourceType')}/{resource.get('id')}/{HISTORY}"
        if isinstance(meta.get("versionId"), str):
            carried[f"{ref}/{meta['versionId']}"] = resource
        try:
            version = _resource_version(meta)
        except Reject:  # an unreadable version: not a candidate (its own mapping rejects it)
            continue
        if ref not in newest or version > newest[ref][0]:
            newest[ref] = (version, resource)
    return {**carried, **{ref: resource for ref, (_, resource) in newest.items()}}


def version_before_delete(history: Any, reference: str) -> dict | None:
    """From an instance history Bundle (`GET Type/id/_history`), the version of `reference` its newest
    delete deleted (or the newest version when the history lists no delete); None if there is none. The
    newest delete is the one with the highest etag version, else the first listed (FHIR lists history
    newest first); the version before it is the newest one older than its version, else (no version) the
    first listed after it, so a re-creation after the delete is never taken for it. A DELETE without an
    etag means the newest delete when the history is read. Pure: streams/fhir_fetch.py reads the history."""
    kind, rid = reference.split("/")[:2]
    versions = []  # (position in the history, version, resource)
    for at, entry in enumerate(_dicts(history.get("entry") if isinstance(history, dict) else None)):
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == kind and resource.get("id") == rid:
            meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
            try:
                versions.append((at, _resource_version(meta), resource))
            except Reject:  # an unreadable version: not a candidate
                continue
    if (newest := _newest_delete(history, reference)) is not None:
        delete, _, delete_at = newest
        if delete.version is None:  # by position: the first version listed after the delete
            return next((r for at, _, r in versions if at > delete_at), None)
        versions = [(at, v, r) for at, v, r in versions if v < delete.version]
    return max(versions, key=lambda avr: avr[1])[2] if versions else None


def gone_delete_entry(reference: str, history: Any) -> dict | None:
    """For a resource ("Type/id") the server answers 410 Gone: an id-only notification of its delete
    carries no DELETE entry, so build the one a notification would have carried, from the instance
    history (`GET Type/id/_history`): the newest delete's response (etag, lastModified) and the version
    before it as its resource; the parser then retracts that version's facts as for a DELETE entry.
    None when the history has no version before the delete. A type wardwatch does not map needs no
    history (history None): its DELETE entry has no resource and is skipped and counted."""
    entry = {"fullUrl": reference, "request": {"method": "DELETE", "url": reference}}
    if not maps_type(reference):
        return entry
    prior = version_before_delete(history, reference)
    if prior is None:
        return None
    newest = _newest_delete(history, reference)
    response = newest[1] if newest is not None else {}
    kept = {k: response[k] for k in ("etag", "lastModified") if isinstance(response.get(k), str)}
    return {**entry, "response": kept, "resource": prior}


def gone_version_delete(reference: str) -> tuple[dict, str | None]:
    """For a version read ("Type/id/_history/n") the server answers 410 Gone: servers answer so for the
    version a delete created, so it is handled as a DELETE entry whose etag is W/"n" would be. Returns
    that DELETE entry without its resource, and what to read for the version before it (the vread of
    `_history/<n-1>`, or the instance history when n is not a number: `_Delete.prior_reference`), to put
    as its resource; None for a type wardwatch does not map (skipped and counted like its updates). No
    lastModified: its retractions are issued at the notification's timestamp, as such a DELETE's are."""
    resource, version = reference.split(f"/{HISTORY}/")
    entry = {"fullUrl": resource, "request": {"method": "DELETE", "url": reference}}
    delete = _Delete(resource, _etag_version(version), None)
    if delete.version is not None:
        entry["response"] = {"etag": f'W/"{delete.version}"'}
    return entry, delete.prior_reference if maps_type(reference) else None


def history_decides(history: Any, reference: str) -> bool:
    """Whether the instance history read so far (its first pages, newest first as FHIR lists it) already
    holds what version_before_delete needs: a delete and a version before it. Older pages list only older
    versions, so streams/fhir_fetch.py stops paging there; without a delete it reads on, as the newest
    delete may lie behind a re-created resource's later versions."""
    return _newest_delete(history, reference) is not None and version_before_delete(history, reference) is not None


def maps_type(reference: str) -> bool:
    """Whether wardwatch maps the type of a reference ("Type/id..."): only those have facts to retract."""
    return reference.split("/")[0] in _MAPPERS


def _newest_delete(history: Any, reference: str) -> tuple[_Delete, dict, int] | None:
    """The newest delete an instance history lists, its response and its position: the highest etag
    version, else (no versions) the first listed (histories list the newest first); None when it lists none."""
    deletes = []
    for at, entry in enumerate(_dicts(history.get("entry") if isinstance(history, dict) else None)):
        try:
            if (delete := _history_delete(entry, reference)) is not None:
                response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
                deletes.append((delete, response, at))
        except Reject:  # an unreadable entry: not a delete
            continue
    versioned = [d for d in deletes if d[0].version is not None]
    return max(versioned, key=lambda d: d[0].version) if versioned else next(iter(deletes), None)


_DELETED_STATUSES = ("204", "410")


def _history_delete(entry: dict, reference: str) -> _Delete | None:
    """A delete in an instance history: an entry without a resource that is a DELETE request, or (servers
    that omit the request) whose response.status is 204 or 410."""
    if isinstance(entry.get("resource"), dict):
        return None
    if (delete := _delete_of(entry)) is not None:
        return delete
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    status = response.get("status")
    if isinstance(status, str) and status.strip()[:3] in _DELETED_STATUSES:
        return _Delete(_unversioned(reference), _etag_version(response.get("etag")),
                       _lenient_ms(response.get("lastModified")))
    return None


def deleted_events(deleted: _Delete, prior: dict | None, ctx: _Context) -> list[CanonicalEvent]:
    """The retractions of a delete: each fact the version before it gave, entered-in-error, with no
    value, issued when it was deleted, at a version after every earlier one of the resource (the CDC
    delete's shape: downstream applies both alike). A type wardwatch does not map, or a version its updates
    would skip (a planned Encounter), is skipped and counted, as its updates are."""
    if deleted.kind not in _MAPPERS:
        ctx.skip(deleted.kind if deleted.kind in RESOURCE_TYPES else OTHER_TYPE)
        return []
    if not isinstance(prior, dict):  # references_to_fetch asked for it: only a bug gets here
        raise Reject(Reason.RESOURCE_NOT_FOUND, f"{deleted.kind} DELETE without the version before it")
    if f"{prior.get('resourceType')}/{prior.get('id')}" != deleted.reference:
        raise Reject(Reason.INVALID_STRUCTURE, f"{deleted.kind} DELETE entry carries a different resource")
    if deleted.kind == "Encounter" and prior.get("status") in NOT_ADMITTED:
        # its updates gave no facts (encounter_events): nothing to retract; marking it entered-in-error would
        # map an admission that never happened (or, without period.start, reject the notification)
        ctx.skip("Encounter")
        return []
    # mapped as if it had been marked entered-in-error: no value is read, so a retraction needs only
    # what identifies the facts (patient, codes, times)
    marked = {**prior, "status": "entered-in-error"} if "status" in prior else prior  # Patient has none
    meta = prior.get("meta") if isinstance(prior.get("meta"), dict) else {}
    version = _version_after(meta, deleted)
    issued_ms = deleted.deleted_ms or ctx.status.timestamp_ms
    return [dataclasses.replace(e, status=Status.ENTERED_IN_ERROR, value=None, value_text=None, version=version,
                                issued_ms=e.issued_ms if issued_ms is None else issued_ms)
            for e in _MAPPERS[deleted.kind](marked, ctx)]


def _version_after(meta: dict, deleted: _Delete) -> int:
    """A version ordering after the one before the delete: the delete's own (etag) version, else the next.
    Without versionIds, versions are lastUpdated ms: the delete's time, else the next ms."""
    before = _resource_version(meta)
    after = deleted.version if meta.get("versionId") is not None else deleted.deleted_ms
    return max(before + 1, after or 0)


# --- Observations --------------------------------------------------------------------------------


def observation_events(obs: dict, ctx: _Context) -> list[CanonicalEvent]:
    measured = _measured_codes(obs)
    if not measured and _loinc(obs.get("code")) != BP_PANEL:
        # GCS components without a total to hold them (their own Observations, or another panel): not summed
        # across resources, which may be charted at different times; counted apart so an operator sees them
        ctx.skip(GCS_COMPONENTS_ONLY if _gcs_components(obs) else "unmapped_code")
        return _unmapped_version(obs, ctx)
    return _observation_events(obs, measured, ctx)


def _unmapped_version(obs: dict, ctx: _Context) -> list[CanonicalEvent]:
    """An Observation of no code wardwatch maps: nothing, unless it is a version after the first (meta.versionId
    above 1, or none), whose earlier version may have carried a mapped code (a code corrected to another):
    then its version marker (_version_marker), when it is otherwise valid. It never rejects the notification
    (an unmapped Observation is no reason to), and its skips are counted once, as `unmapped_code` (above)."""
    meta = obs.get("meta") if isinstance(obs.get("meta"), dict) else {}
    quiet = dataclasses.replace(ctx, skipped={}, unknown_patients=[])
    try:
        if not _after_first_version(meta):  # version 1 (most unmapped labs): nothing to replace
            return []
        events = _observation_events(obs, [], quiet)
    except Reject:  # invalid, of a status not ingested, without a patient or a time: skipped as before
        return []
    ctx.unknown_patients += quiet.unknown_patients  # its subject's MRN must be read, as a mapped one's
    return events


def _observation_events(obs: dict, measured: list, ctx: _Context) -> list[CanonicalEvent]:
    """The events of an Observation (`measured`: _measured_codes(obs), empty for a code wardwatch does not map)."""
    validate_observation(obs, ctx.status.fhir_version)

    obs_id = obs.get("id")
    if not isinstance(obs_id, str) or not obs_id:
        raise Reject(Reason.INVALID_STRUCTURE, "Observation without id")
    raw_status = obs.get("status")
    meta = obs.get("meta") if isinstance(obs.get("meta"), dict) else {}
    if raw_status == "registered":  # ordered, no result yet (a lab order): nothing to score, nothing wrong
        ctx.skip("not_yet_resulted")
        return []
    if raw_status == CANCELLED and str(meta.get("versionId")).strip() == "1":
        # never started or not completed, and no earlier version can have given a value: nothing to retract
        ctx.skip(CANCELLED)
        return []
    status = Status.ENTERED_IN_ERROR if raw_status == CANCELLED else USED_STATUSES.get(raw_status)
    if status is None:
        if raw_status == "unknown":
            raise Reject(Reason.BAD_VALUE, UNKNOWN_STATUS_DETAIL)
        raise Reject(Reason.BAD_VALUE, f"Observation status {str(raw_status)[:20]!r} is not ingested")
    patient = _patient_id(obs.get("subject"), ctx, "Observation", obs)
    if patient is None:
        raise Reject(Reason.MISSING_PATIENT, "Observation subject is not a Patient")
    issued = obs.get("issued") or meta.get("lastUpdated")
    effective_ms = _effective_ms(obs, None if raw_status != CANCELLED else issued)
    issued_ms = iso_to_ms(issued, "issued") if issued else effective_ms
    version = _resource_version(meta)  # an Observation without versionId: lastUpdated orders its versions
    if obs.get("issued") and _after_first_version(meta) and isinstance(meta.get("lastUpdated"), str):
        # servers often keep the first release's `issued` on an amended / corrected / entered-in-error version:
        # this version did not exist before the server stored it, so training's as-of joins must not see it earlier
        issued_ms = max(issued_ms, iso_to_ms(meta["lastUpdated"], "meta.lastUpdated"))
    encounter = _encounter_key(obs.get("encounter"))
    provenance = {"resource": f"Observation/{obs_id}", "subscription": ctx.status.subscription,
                  "topic": ctx.topic, "partition": ctx.partition, "offset": ctx.offset,
                  "fhir_version": ctx.status.fhir_version}
    if raw_status == CANCELLED:  # retracted as entered-in-error is; the archive keeps why
        provenance["fhir_status"] = CANCELLED

    if status.retracts:
        # a retracted Observation may arrive stripped of some or all of its components: retract every
        # component it can carry (both pressures of a panel; a pulse oximetry's oxygen, else still
        # "on oxygen" for NEWS2). A retraction of a fact never seen changes nothing.
        codes = [code for code, _, _ in measured]
        codes += [c for c in RETRACTED_WITH.get(_loinc(obs.get("code")), ()) if c not in codes]
        values = {code: (None, None) for code in codes}
    else:
        values = {}
        for code, holder, sent_as in measured:
            value = _gcs(holder, obs) if sent_as == GCS_TOTAL else _value(code, holder)
            if value is None:
                ctx.skip(GCS_INCOMPLETE if sent_as == GCS_TOTAL and _gcs_components(obs) else "no_value")
            else:
                values.setdefault(code, value)
    # every code this version carries, on each of its events: the version replaces the resource's earlier facts,
    # and the patient state retracts a code an earlier version had and this one has not (docs/patient-state.md)
    version_codes = tuple(sorted(values))
    events = [  # new_event: CanonicalEvent(...) with its fields in order, without the frozen dataclass's cost
        new_event(patient, code, value, CODES[code].unit, effective_ms, issued_ms, status, Source.FHIR,
                  f"fhir:Observation/{obs_id}:{code}", version, encounter, LOINC, text,
                  {**provenance, "gcs_total": gcs[0]} if gcs else provenance, version_codes)
        for code, (value, text, *gcs) in values.items()  # a GCS: its ACVPU level, the total in provenance
    ]
    if not events:
        # version 1 (or, without versionId, one whose lastUpdated is missing too: 1) has no earlier one to replace
        if version <= 1 or not _after_first_version(meta):
            return []
        # a later version holding none of the mapped codes (recoded to an unmapped one, every value absent)
        # still replaces the resource's earlier facts: its marker, when its times can be trusted
        marker = _version_marker(obs_id, patient, effective_ms, issued_ms, version, encounter, provenance,
                                 # a BP panel has no value of its own: without components it holds none
                                 "no_value" if measured or _loinc(obs.get("code")) == BP_PANEL else "unmapped_code")
        bound = None if issued else _clock_bound(ctx)
        if not issued and bound is None:  # nothing bounds its time (checked against itself, 2099 would pass)
            return []
        try:
            reject_future_measurements([marker], bound)
        except Reject:  # its time lies in the future: no marker (it would move the clock)
            return []
        return [marker]
    if not issued:
        # the effective time stands in for the issued time, so it bounds nothing (_parse checks every event
        # against its issued time). The server's clock does: the notification's timestamp; else when the
        # message reached Kafka (the record's timestamp: the receiver wrote it on delivery, so nothing in it
        # was measured later; a record holds one even in a backlog). With no clock at all a 2099 typo cannot
        # be told from a reading, and taking it would move the patient's clock for good: dead-lettered, as a
        # consumer that cannot check a time does not trust it (replayable once a time is known)
        bound = _clock_bound(ctx)
        if bound is None:
            raise Reject(Reason.MISSING_TIME, "Observation has no issued, meta.lastUpdated or notification "
                                              "timestamp, and no record time: its effective time cannot be checked")
        reject_future_measurements(events, bound)
    return events


def _clock_bound(ctx: _Context) -> int | None:
    """What bounds an effective time standing in for a missing issued time: the notification's timestamp,
    else the Kafka record's; None with neither."""
    return ctx.status.timestamp_ms if ctx.status.timestamp_ms is not None else ctx.received_ms


def _version_marker(obs_id: str, patient: str, effective_ms: int, issued_ms: int, version: int,
                    encounter: str | None, provenance: dict, why: str) -> CanonicalEvent:
    """A version that carries none of the mapped codes (schemas.codes.VERSION_MARK): the retraction of a fact
    that is never live, with empty `version_codes`, so that the patient state retracts every fact the
    resource's earlier versions gave (docs/patient-state.md, rule 6). `why` (provenance `version_marker`):
    unmapped_code (its code is none wardwatch maps) or no_value (every value absent)."""
    return new_event(patient, VERSION_MARK, None, None, effective_ms, issued_ms, Status.ENTERED_IN_ERROR,
                     Source.FHIR, f"fhir:Observation/{obs_id}:{VERSION_MARK}", version, encounter, VERSION_MARKS,
                     None, {**provenance, "version_marker": why}, ())


@cache
def _resource_model(resource_type: str, fhir_version: str):
    import importlib

    package = "fhir.resources" if fhir_version == R5 else "fhir.resources.R4B"
    return getattr(importlib.import_module(f"{package}.{resource_type.lower()}"), resource_type)


def validate_resource(resource: dict, fhir_version: str) -> None:
    """Structural FHIR validation (fhir.resources). Only called for the mapped types (Observation,
    Encounter, Patient).

    fhir.resources checks each element of a resource on its own, except for the choice ([x]) elements
    and required primitives, which it checks together. So the other elements can be checked apart
    from the rest: those that repeat across messages (a lab's code, a patient's subject) are checked
    once per distinct value (_element_is_valid, cached) and the rest of the resource without them
    (a required one replaced by a valid stand-in), for about half the cost. Anything that fails there
    is validated whole again, so a rejection and its detail are exactly fhir.resources' own
    (tests/schemas/test_ingest_golden.py)."""
    kind = resource["resourceType"]
    model = _resource_model(kind, fhir_version)
    apart = [name for name in _validated_apart(kind, fhir_version) if name in resource]
    if apart and _parts_are_valid(model, resource, apart, fhir_version):
        return
    try:
        model.model_validate(resource)
    except ValueError as exc:  # pydantic ValidationError; its message would echo patient values
        errors = exc.errors(include_input=False) if hasattr(exc, "errors") else []
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in errors[:5])
        raise Reject(Reason.INVALID_RESOURCE, f"invalid {fhir_version} {kind}: {where}",
                     type(exc).__name__) from exc


# Elements whose values recur across messages (the same patient, encounter, lab test, performer):
# validated once per distinct value. Elements fhir.resources checks together with others are left
# out by _validated_apart, whatever this lists.
REPEATING_ELEMENTS = {
    "Observation": ("code", "subject", "encounter", "category", "performer", "referenceRange", "interpretation",
                    "method"),
    "Encounter": ("subject", "type", "serviceProvider"),
}
# the smallest valid resource of each type, to validate one element in; its elements stand in for
# required ones in the rest
_MINIMAL = {
    ("Observation", R4B): {"resourceType": "Observation", "status": "final", "code": {"text": "-"}},
    ("Observation", R5): {"resourceType": "Observation", "status": "final", "code": {"text": "-"}},
    ("Encounter", R4B): {"resourceType": "Encounter", "status": "planned", "class": {"code": "IMP"}},
    ("Encounter", R5): {"resourceType": "Encounter", "status": "planned"},
}


@cache
def _validated_apart(kind: str, fhir_version: str) -> tuple[str, ...]:
    """REPEATING_ELEMENTS of `kind` that fhir.resources validates on their own: neither a choice ([x])
    element nor a required primitive (those are checked across elements)."""
    if (kind, fhir_version) not in _MINIMAL:
        return ()
    model = _resource_model(kind, fhir_version)
    blank = model.model_construct()
    checked_together = {name for names in blank.get_one_of_many_fields().values() for name in names}
    checked_together |= {name for pair in blank.get_required_fields() for name in pair if name}
    stand_ins = _MINIMAL[kind, fhir_version]
    separable = {
        name for name, f in model.model_fields.items()
        if name not in checked_together
        and f.alias in (None, name)  # not aliased: its Python name (`class_fhir`) would be a second key for it
        and (not f.is_required() or name in stand_ins)  # a required one stays present in the rest, as its stand-in
    }
    return tuple(name for name in REPEATING_ELEMENTS.get(kind, ()) if name in separable)


def _parts_are_valid(model, resource: dict, apart: list[str], fhir_version: str) -> bool:
    """Whether fhir.resources accepts the resource, checked as its `apart` elements and the rest."""
    kind = resource["resourceType"]
    try:
        if not all(_element_is_valid(kind, fhir_version, name, orjson.dumps(resource[name])) for name in apart):
            return False
        stand_ins = _MINIMAL[kind, fhir_version]
        rest = {k: v for k, v in resource.items() if k not in apart}
        rest.update((name, stand_ins[name]) for name in apart if name in stand_ins)  # required: still present
        model.model_validate(rest)
    except Exception:  # invalid, or not even encodable (an integer beyond 64 bits): the whole resource decides
        return False
    return True


@lru_cache(maxsize=16_384)  # bounded: values are per patient / encounter; a few MB at most
def _element_is_valid(kind: str, fhir_version: str, name: str, value_json: bytes) -> bool:
    try:
        _resource_model(kind, fhir_version).model_validate({**_MINIMAL[kind, fhir_version],
                                                            name: orjson.loads(value_json)})
    except Exception:  # not only ValidationError: whatever it is, validating the whole resource decides
        return False
    return True


validate_observation = validate_resource  # the name earlier callers use


# an Observation's code -> the components an entered-in-error version of it retracts, sent or not
RETRACTED_WITH: dict[str, tuple[str, ...]] = {BP_PANEL: (SYSTOLIC_BP, DIASTOLIC_BP), SPO2: (O2_FLOW, FIO2)}


def _measured_codes(obs: dict) -> list[tuple[str, dict, str]]:
    """(canonical code, element holding value[x], the code it was sent as) for the Observation itself
    and its components. A GCS total is sent as 9269-2 and measures consciousness (80288-4)."""
    measured = []
    for holder in (obs, *_dicts(obs.get("component"))):
        code = _loinc(holder.get("code"))
        if code in CODES:
            measured.append((code, holder, code))
        elif code == GCS_TOTAL:
            measured.append((CONSCIOUSNESS, holder, code))
    return measured


def _loinc(concept: Any) -> str | None:
    """The first LOINC coding that is a wardwatch code (or the BP panel, or a GCS total)."""
    if not isinstance(concept, dict):
        return None
    for coding in _dicts(concept.get("coding")):
        if coding.get("system") in (LOINC, None) and isinstance(coding.get("code"), str):
            code = coding["code"]
            if code in (BP_PANEL, GCS_TOTAL) or code in GCS_COMPONENTS:
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
        if "valueInteger" in holder:  # a bare number: no unit (see _value's Quantity without a unit below)
            number = finite_number(holder["valueInteger"], CODES[code].name)
            if to_canonical_unit(code, number, None) is None:
                raise Reject(Reason.UNKNOWN_UNIT, missing_unit_detail(code))
            return plausible(code, number, CODES[code].name), None
        if any(k.startswith("value") for k in holder):
            raise Reject(Reason.BAD_VALUE, f"{CODES[code].name}: value is not a Quantity")
        return None
    what = CODES[code].name
    if not isinstance(quantity, dict):
        raise Reject(Reason.BAD_VALUE, f"{what}: valueQuantity is not an object")
    if (comparator := quantity.get("comparator")) is not None:
        # "<35" or ">38.0" is a bound, not a reading: scored as the bound it could fall in the wrong
        # NEWS2 band (>38.0 is 38.1 or more: 1 point, not 0). Which value to read it as is a clinical call.
        named = comparator if comparator in COMPARATORS else "unrecognised"  # the validator lets any string by
        raise Reject(Reason.BAD_VALUE, f"{what}: value has a comparator ({named}), a bound and not a measurement")
    number = finite_number(quantity.get("value"), what)
    # the UCUM code first, then the display unit; no unit at all means the canonical unit, except for a code
    # reported in more than one unit (lactate mmol/L or mg/dL, ...: schemas.codes.MULTI_UNIT_CODES)
    units = [u for u in (quantity.get("code"), quantity.get("unit")) if u]
    for unit in units or [None]:
        converted = to_canonical_unit(code, number, unit)
        if converted is not None:
            return plausible(code, converted, what), None
    if not units:
        raise Reject(Reason.UNKNOWN_UNIT, missing_unit_detail(code))
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


GCS_INCOMPLETE = "gcs_incomplete"  # skip kind: a GCS panel without a total and without all three components
GCS_COMPONENTS_ONLY = "gcs_components"  # skip kind: GCS components with no 9269-2 total to sum them into


def _gcs(holder: dict, obs: dict) -> tuple[float, str, int] | None:
    """(ACVPU ordinal, letter, GCS total) of a GCS total in valueInteger or a unitless valueQuantity; without
    a value, the sum of the eye, verbal and motor components of its Observation when all three have one
    (None otherwise: nothing to map). A total and its three components that disagree are dead-lettered:
    which one is right is not for wardwatch to guess; a total whose components it cannot read (coded
    another way) is the total."""
    what = "GCS total"
    components = _gcs_components(obs)
    total = _gcs_score(holder, what, GCS_RANGE)
    summed = None
    if len(components) == len(GCS_COMPONENTS):
        try:
            scores = [_gcs_score(components[code], *GCS_COMPONENTS[code], answers=GCS_ANSWERS[code])
                      for code in GCS_COMPONENTS]
        except Reject:
            if total is None:  # the components are the value: a bad one is a bad value
                raise
            scores = [None]  # a charted total stands; components coded otherwise (SNOMED, "E4") are no cross-check
        summed = None if None in scores else sum(scores)
    if total is not None and summed is not None and total != summed:
        raise Reject(Reason.BAD_VALUE, f"{what}: disagrees with the sum of its eye, verbal and motor components")
    total = summed if total is None else total
    if total is None:
        return None
    letter = gcs_acvpu(total)
    return float(ACVPU_ORDINAL[letter]), letter, total


def _gcs_components(obs: dict) -> dict[str, dict]:
    """The GCS eye / verbal / motor elements of an Observation (its components, or itself), by LOINC code;
    the first of each."""
    found: dict[str, dict] = {}
    for holder in (obs, *_dicts(obs.get("component"))):
        code = _loinc(holder.get("code"))
        if code in GCS_COMPONENTS:
            found.setdefault(code, holder)
    return found


def _gcs_score(holder: dict, what: str, bounds: tuple[int, int], answers: dict[str, int] | None = None) -> int | None:
    """An integer GCS score (a total or one component) in valueInteger, a unitless valueQuantity or (a
    component) a LOINC answer code of its scale; None without a value (e.g. dataAbsentReason: not testable).
    The detail never echoes the value."""
    if "valueInteger" in holder:
        return gcs_total(holder["valueInteger"], what, bounds)
    if (quantity := holder.get("valueQuantity")) is not None:
        if not isinstance(quantity, dict):
            raise Reject(Reason.BAD_VALUE, f"{what}: valueQuantity is not an object")
        if quantity.get("comparator") is not None:  # "<8": a bound, not a score
            raise Reject(Reason.BAD_VALUE, f"{what}: value has a comparator, a bound and not a measurement")
        ucum = quantity.get("code")
        if ucum is not None and not (ucum == "1" or (isinstance(ucum, str) and ucum.startswith("{"))):
            raise Reject(Reason.UNKNOWN_UNIT, f"{what}: a score has no unit")  # "1" or an annotation: {score}
        return gcs_total(quantity.get("value"), what, bounds)
    if answers is not None and (concept := holder.get("valueCodeableConcept")) is not None:
        for coding in _dicts(concept.get("coding") if isinstance(concept, dict) else None):
            if coding.get("system") in (LOINC, None) and coding.get("code") in answers:
                return answers[coding["code"]]
        raise Reject(Reason.BAD_VALUE, f"{what}: no LOINC answer code of its scale")
    if any(k.startswith("value") for k in holder):
        raise Reject(Reason.BAD_VALUE, f"{what}: value is neither an integer nor a Quantity"
                     + (" nor a LOINC answer" if answers is not None else ""))
    return None


def _patient_id(subject: Any, ctx: _Context, what: str, resource: dict | None = None) -> str | None:
    """The MRN (subject.identifier.value, of system ctx.mrn_system when that is set) when present; else the MRN
    of the referenced Patient when `resource` contains it ("#id": its identifier typed MR, as a Patient in the
    notification is read) or the notification carries it (a FHIR server's Patient id is its own, and may
    equal another patient's MRN); else the id of a Patient reference. With ctx.mrn_system, an identifier of
    another system is no identifier: a subject naming no Patient by reference besides is missing_patient.
    None: the subject is not a Patient."""
    if not isinstance(subject, dict):
        return None
    if mrn := _subject_mrn(subject, ctx.mrn_system):
        return mrn
    reference = _reference(subject)
    if reference is not None and reference.startswith("#"):
        return _contained_patient_mrn(reference[1:], resource, ctx, what)
    rid = _reference_id(reference, "Patient")
    mrn = ctx.patients.get(reference) or (ctx.patients.get(f"Patient/{rid}") if rid else None)
    if mrn:
        return mrn
    if rid is None and reference is not None and reference.startswith("urn:"):  # urn:uuid / urn:oid: no entry
        raise Reject(Reason.MISSING_PATIENT, UNRESOLVED_URN_DETAIL.format(what=what))
    if rid and not ctx.ids_are_mrns:
        # the server's own id, not the EHR's key: keying by it could merge two patients. Its MRN is read
        # from the server (NeedsFetch); the placeholder never leaves this parse
        fetchable = relative_reference(f"Patient/{rid}")
        if fetchable is None:  # not a FHIR id ("123?_format=xml", ".."): no GET of whatever path it names
            raise Reject(Reason.MISSING_PATIENT, "subject names its Patient by a reference that is not a FHIR "
                                                 "resource id, and has no identifier")
        ctx.unknown_patients.append(fetchable)
        return UNKNOWN_PATIENT
    if rid is None and _identifier_value(subject):  # an identifier of another system than mrn_system, only
        raise Reject(Reason.MISSING_PATIENT, OTHER_SYSTEM_DETAIL.format(what=what))
    return rid


def _contained_patient_mrn(local_id: str, resource: dict | None, ctx: _Context, what: str) -> str | None:
    """The MRN of the Patient `resource` contains as `local_id` (a subject "#<local_id>"); None when the
    contained resource is not a Patient. Its id is local to the resource, so without an MRN it is
    missing_patient, whatever ctx.ids_are_mrns says."""
    contained = resource.get("contained") if isinstance(resource, dict) else None
    target = next((r for r in _dicts(contained) if r.get("id") == local_id), None)
    if target is None:
        raise Reject(Reason.MISSING_PATIENT, CONTAINED_MISSING_DETAIL.format(what=what))
    if target.get("resourceType") != "Patient":
        return None
    if mrn := mrn_of(target, ctx.mrn_system):
        return mrn
    raise Reject(Reason.MISSING_PATIENT, CONTAINED_NO_MRN_DETAIL.format(
        what=what, of_system=OF_MRN_SYSTEM if ctx.mrn_system else ""))


def _subject_mrn(subject: dict, mrn_system: str | None) -> str | None:
    """subject.identifier.value when it is the MRN: of system `mrn_system` when that is set, else any."""
    value = _identifier_value(subject)
    if value is None or mrn_system is None:
        return value
    return value if subject["identifier"].get("system") == mrn_system else None


def mrn_of(patient: Any, mrn_system: str | None = None) -> str | None:
    """The MRN of a Patient resource (its identifier typed MR, of system `mrn_system` when that is set: settings.
    mrn_system), as patient_events keys it."""
    return _mrn(patient.get("identifier"), mrn_system) if isinstance(patient, dict) else None


def _carried_mrns(entries: list[dict], mrn_system: str | None = None) -> dict[str, str]:
    """"Patient/<id>" (and the entry's fullUrl, e.g. urn:uuid:...) -> MRN of each Patient resource in the
    notification that has one (the identifier typed MR, of `mrn_system` if set, as patient_events keys it)."""
    mrns = {}
    for entry in entries:
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient" \
                and (mrn := _mrn(resource.get("identifier"), mrn_system)):
            if isinstance(resource.get("id"), str) and resource["id"]:
                mrns[f"Patient/{resource['id']}"] = mrn
            if isinstance(entry.get("fullUrl"), str) and entry["fullUrl"]:
                mrns[entry["fullUrl"]] = mrn
    return mrns


def _identifier_value(reference: dict) -> str | None:
    identifier = reference.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"].strip():
        return identifier["value"].strip()
    return None


def _own_identifier(resource: dict) -> str | None:
    """A resource's first identifier value (e.g. an Encounter's visit number), if any."""
    identifiers = resource.get("identifier")
    for identifier in identifiers if isinstance(identifiers, list) else ():
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"].strip():
            return identifier["value"].strip()
    return None


# An encounter known only by the FHIR server's own id is keyed "fhir:Encounter/<id>": the server numbers its
# resources (HAPI's 1, 2, 3...), so a bare id may equal a visit number the EHR (and the CDC rows) gave another
# stay, of this patient or of another, and be shown in an alert header or the analysts' tables as that visit.
FHIR_ENCOUNTER_PREFIX = "fhir:Encounter/"


def fhir_encounter_key(server_id: str) -> str:
    return FHIR_ENCOUNTER_PREFIX + server_id


def fhir_encounter_server_id(encounter_id: str) -> str | None:
    """The FHIR server's Encounter id an encounter key derived from it names (None for a visit number)."""
    return encounter_id.removeprefix(FHIR_ENCOUNTER_PREFIX) if encounter_id.startswith(FHIR_ENCOUNTER_PREFIX) else None


def _encounter_key(reference: Any) -> str | None:
    """The encounter key of a reference to an Encounter: reference.identifier.value (the visit number:
    what the EHR database and so the CDC rows use) when present, else "fhir:Encounter/<id>" from the
    resource id of the reference. A FHIR server's resource ids are its own, not the database keys."""
    if not isinstance(reference, dict):
        return None
    if value := _identifier_value(reference):
        return value
    server_id = _reference_id(_reference(reference), "Encounter")
    return None if server_id is None else fhir_encounter_key(server_id)


def _reference_id(reference: str | None, resource_type: str) -> str | None:
    """'Patient/123', 'https://host/fhir/Patient/123/_history/2' -> '123'."""
    if not reference:
        return None
    parts = reference.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == resource_type and parts[i + 1]:
            return parts[i + 1]
    return None


def _effective_ms(obs: dict, fallback: Any = None) -> int:
    """effective[x]; `fallback` (a cancelled Observation's issued time: a measurement never taken may
    have no clinical time) when it has none. An effectivePeriod is read at its start, when the measurement
    began; one with an end only is not read at its end: FHIR's Period says a missing start is not known (the
    reading may span any time before the end: an averaged or accumulated value), and placing it at the end
    would put the same measurement in another window than when its start is sent. Dead-lettered, saying so."""
    period = obs.get("effectivePeriod") if isinstance(obs.get("effectivePeriod"), dict) else {}
    effective = obs.get("effectiveDateTime") or obs.get("effectiveInstant") or period.get("start") or fallback
    if not isinstance(effective, str):
        if period.get("end"):
            raise Reject(Reason.MISSING_TIME, "Observation effectivePeriod has no start (FHIR: a missing start is "
                                              "not known), so when it was measured is not known")
        raise Reject(Reason.MISSING_TIME, "Observation has no effective time")
    return measurement_time_ms(effective, "effective")  # a date alone: dead-lettered, not read as midnight


def _version(raw: Any) -> int:
    if raw is None:
        return 1
    text = str(raw).strip()
    if not INTEGER_TEXT.fullmatch(text):  # int() would read "8_8" and any script's digits
        raise Reject(Reason.BAD_VALUE, "meta.versionId is not an integer")
    version = int(text)
    if not 0 <= version < 2**63:  # the version orders facts as an int64 downstream
        raise Reject(Reason.BAD_VALUE, "meta.versionId is outside the int64 range")
    return version


# --- Encounter and Patient -> CONTEXT facts ------------------------------------------------------

# HL7 v3 ActCode encounter classes -> the vocabulary of the CDC `encounters.encounter_class` column
ENCOUNTER_CLASSES = {
    "IMP": "inpatient", "ACUTE": "inpatient", "NONAC": "inpatient", "EMER": "emergency", "AMB": "ambulatory",
    "OBSENC": "observation", "SS": "short-stay", "HH": "home-health", "VR": "virtual", "PRENC": "pre-admission",
}
NOT_ADMITTED = {"planned"}  # nobody is on a ward yet: no facts
RETRACTING = {"entered-in-error", "cancelled"}  # the encounter never happened: retract its facts
ENDED = {"finished", "completed", "discharged"}  # R4B finished; R5 completed / discharged
_INACTIVE_LOCATIONS = {"planned", "reserved"}
ADMINISTRATIVE_GENDERS = {"male", "female", "other", "unknown"}
BIRTH_YEARS = (1880, 2100)  # the same bound as the CDC patients table: outside is a data error
MRN_TYPE = "MR"  # HL7 v2-0203 identifier type "Medical record number"


def encounter_events(enc: dict, ctx: _Context) -> list[CanonicalEvent]:
    validate_resource(enc, ctx.status.fhir_version)
    enc_id = _resource_id(enc)
    # the visit number the EHR rows (and CDC) use; without one, the server's id, namespaced (FHIR_ENCOUNTER_PREFIX)
    encounter_key = _own_identifier(enc) or fhir_encounter_key(enc_id)
    status = enc.get("status")
    if status in NOT_ADMITTED:
        ctx.skip("Encounter")
        return []
    patient = _patient_id(enc.get("subject"), ctx, "Encounter", enc)
    if patient is None:
        raise Reject(Reason.MISSING_PATIENT, "Encounter subject is not a Patient")
    period = _period(enc.get("period") or enc.get("actualPeriod"))  # R5 renamed it actualPeriod
    if period[0] is None and status in RETRACTING:  # a cancelled booking: without a start it never gave facts
        ctx.skip("Encounter")
        return []
    if period[0] is None:
        raise Reject(Reason.MISSING_TIME, "Encounter has no period.start (the admission time)")
    admitted_ms, discharged_ms = period
    meta = enc.get("meta") if isinstance(enc.get("meta"), dict) else {}
    version = _resource_version(meta)
    issued_ms = iso_to_ms(meta["lastUpdated"], "meta.lastUpdated") if meta.get("lastUpdated") else admitted_ms
    event_status = Status.ENTERED_IN_ERROR if status in RETRACTING else Status.FINAL
    provenance = _provenance(f"Encounter/{enc_id}", ctx)

    def fact(code: str, effective_ms: int, suffix: str, text: str | None) -> CanonicalEvent:
        return new_event(patient, code, None, None, effective_ms, issued_ms, event_status, Source.FHIR,
                         f"fhir:Encounter:{enc_id}:{suffix}", version, encounter_key, CONTEXT,
                         None if event_status.retracts else text, provenance)

    events = [fact(ADMISSION, admitted_ms, ADMISSION, _encounter_class(enc.get("class")))]
    location = _current_location(enc.get("location"))
    if location is None:
        ctx.skip("no_location")
    else:
        ward, arrived_ms = location
        arrived_ms = admitted_ms if arrived_ms is None else arrived_ms
        events.append(fact(LOCATION, arrived_ms, f"{LOCATION}:{arrived_ms}", ward))
    if discharged_ms is not None and (status in ENDED or event_status.retracts):
        events.append(fact(DISCHARGE, discharged_ms, DISCHARGE, None))
    return events


def patient_events(pat: dict, ctx: _Context) -> list[CanonicalEvent]:
    validate_resource(pat, ctx.status.fhir_version)
    pat_id = _resource_id(pat)
    meta = pat.get("meta") if isinstance(pat.get("meta"), dict) else {}
    if not meta.get("lastUpdated"):
        raise Reject(Reason.MISSING_TIME, "Patient has no meta.lastUpdated (the record's update time)")
    updated_ms = iso_to_ms(meta["lastUpdated"], "meta.lastUpdated")
    patient = _mrn(pat.get("identifier"), ctx.mrn_system) or (pat_id if ctx.ids_are_mrns else None)
    if patient is None:
        raise Reject(Reason.MISSING_PATIENT, no_mrn_detail("Patient", ctx.mrn_system))
    common = dict(patient_id=patient, unit=None, effective_ms=updated_ms, issued_ms=updated_ms, status=Status.FINAL,
                  source=Source.FHIR, version=_resource_version(meta), code_system=CONTEXT,
                  provenance=_provenance(f"Patient/{pat_id}", ctx))
    events = []
    if pat.get("gender") in ADMINISTRATIVE_GENDERS:
        events.append(CanonicalEvent(code=SEX, value=None, value_text=pat["gender"],
                                     fact_id=f"fhir:Patient:{pat_id}:{SEX}", **common))
    if isinstance(pat.get("birthDate"), str):
        year = int(pat["birthDate"][:4])  # validated above as a FHIR date: YYYY[-MM[-DD]]
        if not BIRTH_YEARS[0] <= year <= BIRTH_YEARS[1]:
            raise Reject(Reason.BAD_VALUE, f"birthDate: year outside {BIRTH_YEARS[0]}-{BIRTH_YEARS[1]}")
        events.append(CanonicalEvent(code=BIRTH_YEAR, value=float(year),
                                     fact_id=f"fhir:Patient:{pat_id}:{BIRTH_YEAR}", **common))
    if not events:
        ctx.skip("Patient")
    return events


def _resource_id(resource: dict) -> str:
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        raise Reject(Reason.INVALID_STRUCTURE, f"{resource.get('resourceType')} without id")
    return rid


def _after_first_version(meta: dict) -> bool:
    """Whether an Observation may be a version after its first: meta.versionId above 1, or no versionId (which
    version it is cannot be told). Its `issued` may then be the first release's: FHIR R4 defines it as when
    "this version" was made available, but servers often carry it over unchanged to later versions."""
    return meta.get("versionId") is None or _version(meta.get("versionId")) > 1


def _resource_version(meta: dict) -> int:
    """meta.versionId; without one, meta.lastUpdated in ms still orders the versions of a resource."""
    if meta.get("versionId") is None and isinstance(meta.get("lastUpdated"), str):
        return iso_to_ms(meta["lastUpdated"], "meta.lastUpdated")
    return _version(meta.get("versionId"))


def _provenance(resource: str, ctx: _Context) -> dict[str, Any]:
    return {"resource": resource, "subscription": ctx.status.subscription, "topic": ctx.topic,
            "partition": ctx.partition, "offset": ctx.offset, "fhir_version": ctx.status.fhir_version}


def _period(raw: Any) -> tuple[int | None, int | None]:
    period = raw if isinstance(raw, dict) else {}
    start, end = period.get("start"), period.get("end")
    return (iso_to_ms(start, "period.start") if isinstance(start, str) else None,
            iso_to_ms(end, "period.end") if isinstance(end, str) else None)


def _encounter_class(raw: Any) -> str | None:
    """R4/R4B class is a Coding, R5 a list of CodeableConcepts -> "inpatient", "emergency", ..."""
    codings = [raw] if isinstance(raw, dict) and "code" in raw else []
    for concept in raw if isinstance(raw, list) else []:
        codings += _dicts(concept.get("coding")) if isinstance(concept, dict) else []
    for coding in codings:
        code = coding.get("code")
        if isinstance(code, str) and code.strip():
            code = code.strip()
            return ENCOUNTER_CLASSES.get(code.upper(), code.lower())
    return None


def _current_location(raw: Any) -> tuple[str, int | None] | None:
    """(ward, arrived at) of the active location, else of the last one that is not planned/reserved."""
    candidates = [loc for loc in _dicts(raw) if loc.get("status") not in _INACTIVE_LOCATIONS]
    active = [loc for loc in candidates if loc.get("status") == "active"]
    for loc in (active or candidates)[-1:]:
        ref = loc.get("location") if isinstance(loc.get("location"), dict) else {}
        display = ref.get("display").strip() if isinstance(ref.get("display"), str) else ""
        ward = display or _reference_id(_reference(ref), "Location")
        if ward:
            return ward, _period(loc.get("period"))[0]
    return None


def _mrn(identifiers: Any, mrn_system: str | None = None) -> str | None:
    """The value of the identifier typed MR (medical record number), as Observation subjects carry it; with
    `mrn_system`, the one typed MR and of that system (a Patient may have several typed MR: one per facility)."""
    for identifier in _dicts(identifiers):
        if mrn_system is not None and identifier.get("system") != mrn_system:
            continue
        concept = identifier.get("type") if isinstance(identifier.get("type"), dict) else {}
        if any(c.get("code") == MRN_TYPE for c in _dicts(concept.get("coding"))):
            value = identifier.get("value")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


_MAPPERS = {"Observation": observation_events, "Encounter": encounter_events, "Patient": patient_events}
