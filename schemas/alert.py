"""The alert a downstream app receives: a routing header plus a FHIR R4B RiskAssessment.

    build_alert(decision, patient_id=..., encounter_id=..., probability=..., news2=...,
                model_version=..., path=..., rationale=[...], basis=[[fact_id, version], ...], ward=...) ->
    {"header": {alert_id, kind, tier, patient_id, encounter_id, ward, scoring_ms, model_version, path,
                status, original_alert_id, reason, preliminary_basis, incomplete_news2},
     "resource": <RiskAssessment as a JSON dict>}

Header (routing without parsing the resource): `kind` open | escalate | resolve | correction;
`encounter_id` the patient's current stay: the EHR's visit number, or "fhir:Encounter/<id>" when only the FHIR
server's Encounter id is known (schemas.fhir: a bare server id may equal another stay's visit number), which
the resource references as "Encounter/<id>"; a visit number it names by identifier (type VN), never as
"Encounter/<visit number>", the server's Encounter of that id, which may be another patient's stay;
`ward` the patient's current ward (None when no LOCATION is known); `status` the resource status;
`original_alert_id` the alert a correction corrects (else None); `reason` "discharge" for a
resolution by discharge (else None); `preliminary_basis` the LOINC codes of the basis readings that
are preliminary results, in basis order ([] when every reading is final: filter on it); `incomplete_news2`
the NEWS2 inputs (schemas.features names, e.g. "resp_rate_last_24h", "on_oxygen") not charted in 24 h that
a resolution's calm rested on (its note is then RESOLVED_INCOMPLETE; [] for a resolution on a complete
NEWS2, by discharge, and for every other kind: filter on it). Every header
alert_id is unique per message and deterministic (see streams/alerting.py), so a consumer drops
duplicates by it.

`basis` names the readings the score was based on (the latest fact of each parameter): a fact that
came from FHIR references its Observation version (`Observation/<id>/_history/<versionId>`, resolvable
on the EHR's FHIR server); every entry carries the canonical event's id as an identifier (system
CANONICAL_EVENT_SYSTEM: the archive's `event_id`, for analysts), and a fact from the EHR database
(CDC) says its table, row and LOINC code, as it has no Observation to point to.

A preliminary result in the basis (an entry [fact_id, version, code]; FHIR Observation.status or the
CDC status column `preliminary`) is used like a final one, but the alert says so: its basis entry's
display names it a preliminary result, and a RiskAssessment.note lists those parameters and their
LOINC codes (never their values). When the result becomes final the alert is amended without the
flag (streams/alerting.py).

The resource id is the alert id; a correction (kind "correction") is published under the id of the
alert it corrects, with status "amended" (new probability, basis, rationale) or "entered-in-error",
so a consumer that upserts resources by id always holds the latest word on each alert. A resolution
(kind "resolve") is a resource of its own id carrying the last score, and a note (RESOLVED,
RESOLVED_BY_DISCHARGE) that says it ends the episode: a reader of the resource alone, without the
header, must not take it for one more alert. A resolution whose calm rested on an incomplete NEWS2 (a
NEWS2 input not charted in 24 h at the resolving point or a calm point counted towards it: the rule path
then scores the parameters charted, streams/scoring.py) says so instead (RESOLVED_INCOMPLETE): the episode
ended on an incomplete NEWS2, the parameters not charted (names, never values), and not that the risk is
back below the alerting line, which is not known. `subject` names
the patient by MRN (an identifier typed MR, of WARDWATCH_MRN_SYSTEM when set), the key wardwatch has: a
literal "Patient/<MRN>" would be the FHIR server's Patient of that id (HAPI numbers patients 1, 2, 3...),
which may be another patient, and a ward app resolving it would show this alert under that patient's
name. Only when the server is a facade whose Patient ids are the MRNs (WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS)
is it the reference "Patient/<id>". Minimum
necessary PHI: the patient and encounter ids only, never names, birth dates or the ward (the ward
is in the header for routing only).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Sequence

from schemas import codes
from schemas.canonical import make_event_id
from schemas.codes import DERIVED_CODES, parameter_name
from schemas.features import DERIVED, FEATURES, NEWS2_INPUTS, news2_charted_parts
from schemas.fhir import fhir_encounter_server_id

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
# wardwatch tier -> risk-probability code and display
QUALITATIVE_RISK: dict[str, tuple[str, str]] = {
    "none": ("negligible", "Negligible likelihood"),
    "low": ("low", "Low likelihood"),
    "medium": ("moderate", "Moderate likelihood"),
    "high": ("high", "High likelihood"),
}
CANONICAL_EVENT_SYSTEM = "urn:wardwatch:canonical-event"  # identifier values: schemas.canonical.make_event_id
# identifier types (HL7 v2 table 0203): the patient's MRN, the stay's visit number
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
MRN_TYPE = {"coding": [{"system": IDENTIFIER_TYPE, "code": "MR", "display": "Medical record number"}]}
VISIT_NUMBER_TYPE = {"coding": [{"system": IDENTIFIER_TYPE, "code": "VN", "display": "Visit number"}]}
OUTCOME = "clinical deterioration"
HOUR_MS = 3_600_000
# the rationale of a rule-path resource without a NEWS2 (an input not charted within 24 h): its tier comes
# from the parameters charted (a single 3, or the sum of their points, which NEWS2 is at least)
NEWS2_INCOMPLETE = ("NEWS2 incomplete (not every parameter charted in the last 24 h): "
                    "tier from the parameters charted, NEWS2 is at least their sum")
# the note of a resolution (kind "resolve"): its resource carries the last score like any other, so the
# resource itself must say it ends the episode (a consumer that stores resources, not headers)
RESOLVED = ("Resolution, not a new alert: the risk is back below the alerting line, so this patient's earlier "
            "wardwatch alerts no longer stand. The risk shown is the score that resolved them.")
# the note of a resolution whose calm rested on an incomplete NEWS2 (AlertDecision.missing: an input not charted
# in 24 h at the resolving point or a calm point counted towards it): the parameters charted scored below the
# alerting line, the missing ones are unknown, so it must not say the risk is back below the line
RESOLVED_INCOMPLETE = ("Resolution, not a new alert: this episode ended on an incomplete NEWS2 (not charted in "
                       "the last 24 h: {missing}), so whether the risk is back below the alerting line is not "
                       "known, only that the parameters charted scored below it. This patient's earlier wardwatch "
                       "alerts no longer stand; a new deterioration pages as a new alert. The risk shown is the "
                       "score that resolved them.")
RESOLVED_BY_DISCHARGE = ("Resolution, not a new alert: the patient was discharged, so this patient's earlier "
                         "wardwatch alerts no longer stand. The risk shown is the last score when the discharge was "
                         "received, which may postdate the discharge.")


# A reading older than this at the scoring time is named in the rationale as not rechecked. RCP 2017's
# clinical response chart asks for observations at least every 4-6 h at a NEWS2 of 1-4 (hourly at 5-6):
# past 4 h even a low-scoring patient is due a new round, so the alert may rest on an old value.
STALE_AFTER_MS = 4 * HOUR_MS
MINUTE_MS = 60_000
# a parameter in a nurse's words, and its unit after a value (the reading of a feature: READING_CODE)
WORDS: dict[str, tuple[str, str]] = {
    codes.HEART_RATE: ("heart rate", "/min"), codes.RESP_RATE: ("respiratory rate", "/min"),
    codes.SPO2: ("SpO2", " %"), codes.O2_FLOW: ("O2 flow", " L/min"), codes.FIO2: ("FiO2", " %"),
    codes.SYSTOLIC_BP: ("systolic BP", " mmHg"), codes.TEMPERATURE: ("temperature", " °C"),
    codes.CONSCIOUSNESS: ("level of consciousness", ""), codes.LACTATE: ("lactate", " mmol/L"),
    codes.WBC: ("WBC", " x10^3/uL"), codes.CREATININE: ("creatinine", " mg/dL"),
}
# the one reading a feature's value rests on: a parameter's latest value, a NEWS2 sub-score's input;
# NEWS2's air or oxygen is read at the latest SpO2's round (schemas.features._on_oxygen). Trends, means,
# counts and NEWS2 itself rest on several readings (their basis entries carry each one's time).
READING_CODE: dict[str, str] = {f.name: f.code for f in FEATURES if f.agg == "last"} | {"on_oxygen": codes.SPO2}
_NEWS2_PART_INPUT = dict(zip((d.name for d in DERIVED if d.name.startswith("news2_")), NEWS2_INPUTS, strict=True))
READING_CODE |= {part: READING_CODE[name] for part, name in _NEWS2_PART_INPUT.items()}


def news2_input_words(name: str) -> str:
    """A NEWS2 input (schemas.features.NEWS2_INPUTS) in a nurse's words: "respiratory rate", "air or oxygen"."""
    if name == "on_oxygen":  # read at the SpO2 round (schemas.features._on_oxygen), not a reading of its own
        return "air or oxygen"
    code = READING_CODE.get(name)
    return WORDS[code][0] if code in WORDS else name


def resolved_note(decision) -> str:
    """The note of a resolution: by discharge, on an incomplete NEWS2 (naming the inputs, never values), or calm."""
    if getattr(decision, "reason", None) == "discharge":
        return RESOLVED_BY_DISCHARGE
    if missing := getattr(decision, "missing", ()):
        return RESOLVED_INCOMPLETE.format(missing=", ".join(news2_input_words(name) for name in missing))
    return RESOLVED


def format_age(ms: int) -> str:
    """A duration for a human: "14 h 44 min", "35 min", "3 h", "less than 1 min"."""
    hours, minutes = divmod(abs(ms) // MINUTE_MS, 60)
    if not hours:
        return f"{minutes} min" if minutes else "less than 1 min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def age_before(taken_ms: int, at_ms: int, what: str = "this assessment") -> str:
    """How long before `at_ms` (the assessment) a reading was taken, e.g. "14 h 44 min before this assessment"."""
    return f"{format_age(at_ms - taken_ms)} {'before' if taken_ms <= at_ms else 'after'} {what}"


def taken_words(taken_ms: int, at_ms: int) -> str:
    """ "taken 2024-06-15T03:10:00Z, 14 h 44 min before this assessment" (a basis entry's display)."""
    return f"taken {_iso_seconds(taken_ms)}, {age_before(taken_ms, at_ms)}"


def stale_readings(features: Mapping[str, Any], rationale: Sequence[Mapping[str, Any]],
                   taken_ms: Callable[[str], int | None], scoring_ms: int,
                   stale_after_ms: int = STALE_AFTER_MS, every_part: bool = False) -> list[list]:
    """[feature, value, taken_ms] for each NEWS2 parameter scoring points (`every_part`: each charted, for a
    resolution, whose calm rests on the parameters scoring 0 too) and each rationale feature whose
    one reading (READING_CODE) was taken more than `stale_after_ms` before `scoring_ms`: in NEWS2 input
    order, then the rationale's. `taken_ms(code)`: when the reading the score used was taken (None: none)."""
    names = [_NEWS2_PART_INPUT[part] for part, points in news2_charted_parts(features).items() if points or every_part]
    stale = []
    for name in dict.fromkeys([*names, *(r["feature"] for r in rationale)]):
        code, value = READING_CODE.get(name), features.get(name)
        if code is None or value is None or (taken := taken_ms(code)) is None:
            continue
        if scoring_ms - taken > stale_after_ms:
            stale.append([name, float(value), taken])
    return stale


def stale_words(stale: Sequence[Sequence], at_ms: int, what: str = "this assessment") -> list[str]:
    """Each stale reading in plain words: "systolic BP 85 mmHg taken 14 h 44 min before this assessment,
    not rechecked" (its value is the clinician's, as in the rationale; never in a log)."""
    return [f"{reading_value(name, value)} taken {age_before(taken, at_ms, what)}, not rechecked"
            for name, value, taken in stale]


def reading_value(feature: str, value: float) -> str:
    """A feature's reading in words: "systolic BP 85 mmHg", "level of consciousness V", "on oxygen at the
    SpO2 round", a NEWS2 sub-score "systolic BP (NEWS2 3 points)"."""
    if (part_of := _NEWS2_PART_INPUT.get(feature)) is not None:  # its points, not the reading's value
        words = "air or oxygen" if part_of == "on_oxygen" else WORDS[READING_CODE[part_of]][0]
        return f"{words} (NEWS2 {_number(value)} points)"
    if feature == "on_oxygen":  # a flag read at the latest SpO2 (schemas.features._on_oxygen)
        return ("on oxygen" if value else "on air") + " at the SpO2 round"
    code = READING_CODE[feature]
    words, unit = WORDS.get(code, (f"LOINC {code}", ""))
    return f"{words} {codes.ACVPU[int(value)]}" if code == codes.CONSCIOUSNESS else f"{words} {_number(value)}{unit}"


def _iso_seconds(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def iso_utc(ms: int) -> str:
    """Epoch milliseconds -> ISO-8601 UTC with millisecond precision, e.g. 2024-01-01T08:00:00.000Z."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def fhir_datetime(ms: int) -> str:
    """Epoch milliseconds -> a FHIR dateTime as the RiskAssessment model serialises one: ISO-8601 UTC
    with "Z", fractional seconds (six digits) only when not zero, e.g. 2024-01-01T08:00:00Z,
    2024-01-01T08:00:00.250000Z. Integer arithmetic: exact."""
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")


def build_alert(decision, *, patient_id: str, encounter_id: str | None, probability: float | None,
                news2: int | None, model_version: str | None, path: str, rationale: Sequence[Mapping[str, Any]],
                basis: Sequence[Sequence], horizon_h: int = 12, ward: str | None = None,
                stale: Sequence[Sequence] = (), mrn_system: str | None = None,
                patient_ids_are_fhir_ids: bool = False) -> dict[str, Any]:
    """`decision` is a streams.alerting.AlertDecision; `rationale` items carry feature, value, contribution;
    `stale` the old readings it rests on (stale_readings(), module docstring). `mrn_system` (settings.mrn_system)
    and `patient_ids_are_fhir_ids` (settings.fhir_patient_ids_are_mrns) say how `subject` names the patient."""
    status = getattr(decision, "status", "final")
    original = getattr(decision, "original_alert_id", None)
    header = {
        "alert_id": decision.alert_id,
        "kind": decision.kind,
        "tier": decision.tier,
        "patient_id": patient_id,
        "encounter_id": encounter_id,
        "ward": ward,
        "scoring_ms": decision.scoring_ms,
        "model_version": model_version,
        "path": path,
        "status": status,
        "original_alert_id": original,
        "reason": getattr(decision, "reason", None),
        "preliminary_basis": [entry[2] for entry in basis if len(entry) > 2 and entry[2]],
        # a resolution resting on an incomplete NEWS2 (its note says so): the inputs not charted
        "incomplete_news2": list(getattr(decision, "missing", ())) if decision.kind == "resolve" else [],
    }
    # Built directly in the form the FHIR model serialises (its field order, its dateTime format, no
    # nulls): the same bytes as RiskAssessment.model_validate(...).model_dump(mode="json",
    # exclude_none=True). tests/schemas/test_alert.py checks that and the validity over the combinations
    # of fields; no validation here: what comes from input (ids, times, probability) cannot make it
    # invalid, and pydantic's checks were ~6% of the worker's step (benchmarks/processor.py).
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": original or decision.alert_id,
        "status": status,
        "method": {"text": f"wardwatch model {model_version}" if path == "model" else "NEWS2 rule"},
        "subject": patient_reference(patient_id, mrn_system, patient_ids_are_fhir_ids),
    }
    if encounter_id:
        resource["encounter"] = encounter_reference(encounter_id)
    resource["occurrenceDateTime"] = fhir_datetime(decision.scoring_ms)
    if basis:
        resource["basis"] = [basis_reference(*entry, at_ms=decision.scoring_ms) for entry in basis]
    resource["prediction"] = [_prediction(decision, probability if path == "model" else None, news2, rationale,
                                          horizon_h, incomplete_news2=path == "rule" and news2 is None, stale=stale)]
    notes = []
    if header["preliminary_basis"]:
        names = ", ".join(parameter_name(code) for code in header["preliminary_basis"])
        notes.append({"text": f"Based on preliminary results, which may change when final: {names}."})
    if decision.kind == "resolve":  # else a FHIR reader sees one more (say "high") risk, not an end
        notes.append({"text": resolved_note(decision)})
    if notes:
        resource["note"] = notes
    return {"header": header, "resource": resource}


def patient_reference(patient_id: str, mrn_system: str | None = None,
                      patient_ids_are_fhir_ids: bool = False) -> dict[str, Any]:
    """The RiskAssessment's subject: the patient by MRN (module docstring), or "Patient/<id>" on a facade."""
    if patient_ids_are_fhir_ids:
        return {"reference": f"Patient/{patient_id}"}
    return {"type": "Patient", "identifier": {"type": MRN_TYPE, **({"system": mrn_system} if mrn_system else {}),
                                              "value": patient_id}}


def encounter_reference(encounter_id: str) -> dict[str, Any]:
    """A key from the FHIR server's id (schemas.fhir) references that Encounter; a visit number is an identifier."""
    if (server_id := fhir_encounter_server_id(encounter_id)) is not None:
        return {"reference": f"Encounter/{server_id}"}
    return {"type": "Encounter", "identifier": {"type": VISIT_NUMBER_TYPE, "value": encounter_id}}


_FHIR_OBSERVATION = "fhir:Observation/"  # schemas/fhir.py: fact_id = fhir:Observation/<id>:<code>


def basis_reference(fact_id: str, version: int, preliminary_code: str | None = None, taken_ms: int | None = None,
                    *, at_ms: int | None = None) -> dict[str, Any]:
    """One basis entry, in the field order the FHIR model serialises (reference, identifier, display).
    `preliminary_code`: the reading's code when it is a preliminary result (None: final); `taken_ms` its
    effective time, said in the display with its age at `at_ms` (the occurrence time)."""
    entry: dict[str, Any] = {}
    observation_code = None  # the code of a FHIR reading (its fact_id ends ":<code>")
    taken = f", {taken_words(taken_ms, at_ms)}" if taken_ms is not None and at_ms is not None else ""
    if fact_id.startswith(_FHIR_OBSERVATION):
        rest = fact_id[len(_FHIR_OBSERVATION):]  # FHIR ids have no ":"
        observation_id, _, observation_code = rest.rpartition(":") if ":" in rest else (rest, "", None)
        entry["reference"] = f"Observation/{observation_id}/_history/{version}"
    entry["identifier"] = {"system": CANONICAL_EVENT_SYSTEM, "value": make_event_id(fact_id, version)}
    if fact_id.startswith("cdc:") and fact_id.count(":") >= 3:  # schemas/cdc.py: cdc:<table>:<pk>:<code>
        _, table, rest = fact_id.split(":", 2)
        row, code = rest.rsplit(":", 1)
        said = [WORDS[code][0]] if code in WORDS else []
        said += ["preliminary result"] if preliminary_code else []
        entry["display"] = (f"EHR {table} row {row}, "
                            + (parameter_name(code) if code in DERIVED_CODES else f"LOINC {code}")
                            + (f" ({', '.join(said)})" if said else "") + taken)
    elif observation_code:
        code = observation_code
        name = f"{WORDS[code][0]} (LOINC {code})" if code in WORDS else parameter_name(code)
        entry["display"] = name + (", preliminary result" if preliminary_code else "") + taken
    elif preliminary_code:
        entry["display"] = f"{parameter_name(preliminary_code)}, preliminary result{taken}"
    return entry


def _prediction(decision, probability: float | None, news2: int | None, rationale: Sequence[Mapping[str, Any]],
                horizon_h: int, incomplete_news2: bool = False, stale: Sequence[Sequence] = ()) -> dict[str, Any]:
    code, display = QUALITATIVE_RISK[decision.tier]
    start, end = decision.scoring_ms, decision.scoring_ms + horizon_h * HOUR_MS
    prediction: dict[str, Any] = {"outcome": {"text": OUTCOME}}
    if probability is not None:
        if not 0.0 <= probability <= 1.0:  # FHIR only bounds it by 100 (ras-2); ours is a fraction
            raise ValueError(f"probability must be within [0, 1], got {probability}")
        prediction["probabilityDecimal"] = round(float(probability), 4)
    prediction["qualitativeRisk"] = {"coding": [{"system": RISK_PROBABILITY, "code": code, "display": display}]}
    prediction["whenPeriod"] = {"start": fhir_datetime(start), "end": fhir_datetime(end)}
    reason_text = _rationale_text(rationale, news2)
    if incomplete_news2:  # else a reader takes the tier for a full NEWS2 (streams/scoring.py rule_tier)
        reason_text = f"{reason_text}; {NEWS2_INCOMPLETE}" if reason_text else NEWS2_INCOMPLETE
    if stale:  # else "NEWS2 6" reads as a fresh deterioration, whatever the age of what it rests on
        reason_text = "; ".join([*([reason_text] if reason_text else []), *stale_words(stale, decision.scoring_ms)])
    if reason_text:
        prediction["rationale"] = reason_text
    return prediction


def _rationale_text(rationale: Sequence[Mapping[str, Any]], news2: int | None) -> str:
    parts = [f"{r['feature']}={_number(r['value'])}" for r in rationale]
    text = f"top contributing features: {', '.join(parts)}" if parts else ""
    if news2 is not None:
        text = f"{text}; NEWS2 {news2}" if text else f"NEWS2 {news2}"
    return text


def _number(x: Any) -> str:
    return f"{float(x):g}"
