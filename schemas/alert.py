"""The alert a downstream app receives: a routing header plus a FHIR R4B RiskAssessment.

    build_alert(decision, patient_id=..., encounter_id=..., probability=..., news2=...,
                model_version=..., path=..., rationale=[...], basis=[[fact_id, version], ...], ward=...) ->
    {"header": {alert_id, kind, tier, patient_id, encounter_id, ward, scoring_ms, model_version, path,
                status, original_alert_id, reason, preliminary_basis},
     "resource": <RiskAssessment as a JSON dict>}

Header (routing without parsing the resource): `kind` open | escalate | resolve | correction;
`ward` the patient's current ward (None when no LOCATION is known); `status` the resource status;
`original_alert_id` the alert a correction corrects (else None); `reason` "discharge" for a
resolution by discharge (else None); `preliminary_basis` the LOINC codes of the basis readings that
are preliminary results, in basis order ([] when every reading is final: filter on it). Every header
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
header, must not take it for one more alert. Minimum
necessary PHI: the patient and encounter ids only, never names, birth dates or the ward (the ward
is in the header for routing only).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

from fhir.resources.R4B.riskassessment import RiskAssessment

from schemas.canonical import make_event_id
from schemas.codes import DERIVED_CODES, parameter_name

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
# wardwatch tier -> risk-probability code and display
QUALITATIVE_RISK: dict[str, tuple[str, str]] = {
    "none": ("negligible", "Negligible likelihood"),
    "low": ("low", "Low likelihood"),
    "medium": ("moderate", "Moderate likelihood"),
    "high": ("high", "High likelihood"),
}
CANONICAL_EVENT_SYSTEM = "urn:wardwatch:canonical-event"  # identifier values: schemas.canonical.make_event_id
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
RESOLVED_BY_DISCHARGE = ("Resolution, not a new alert: the patient was discharged, so this patient's earlier "
                         "wardwatch alerts no longer stand. The risk shown is the last score when the discharge was "
                         "received, which may postdate the discharge.")


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
                basis: Sequence[Sequence], horizon_h: int = 12, ward: str | None = None) -> dict[str, Any]:
    """`decision` is a streams.alerting.AlertDecision; `rationale` items carry feature, value, contribution."""
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
        "preliminary_basis": [entry[2] for entry in basis if len(entry) > 2],
    }
    # Built directly in the form the FHIR model serialises (its field order, its dateTime format, no
    # nulls): the same bytes as RiskAssessment.model_validate(...).model_dump(mode="json",
    # exclude_none=True), which tests/schemas/test_alert.py checks, without the dump (~2/3 of the cost).
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": original or decision.alert_id,
        "status": status,
        "method": {"text": f"wardwatch model {model_version}" if path == "model" else "NEWS2 rule"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    resource["occurrenceDateTime"] = fhir_datetime(decision.scoring_ms)
    if basis:
        resource["basis"] = [basis_reference(*entry) for entry in basis]
    resource["prediction"] = [_prediction(decision, probability if path == "model" else None, news2, rationale,
                                          horizon_h, incomplete_news2=path == "rule" and news2 is None)]
    notes = []
    if header["preliminary_basis"]:
        names = ", ".join(parameter_name(code) for code in header["preliminary_basis"])
        notes.append({"text": f"Based on preliminary results, which may change when final: {names}."})
    if decision.kind == "resolve":  # else a FHIR reader sees one more (say "high") risk, not an end
        notes.append({"text": RESOLVED_BY_DISCHARGE if header["reason"] == "discharge" else RESOLVED})
    if notes:
        resource["note"] = notes

    # our own output: an invalid resource is a bug here, never something to publish
    RiskAssessment.model_validate(resource)
    return {"header": header, "resource": resource}


_FHIR_OBSERVATION = "fhir:Observation/"  # schemas/fhir.py: fact_id = fhir:Observation/<id>:<code>


def basis_reference(fact_id: str, version: int, preliminary_code: str | None = None) -> dict[str, Any]:
    """One basis entry, in the field order the FHIR model serialises (reference, identifier, display).
    `preliminary_code`: the reading's code when it is a preliminary result (None: final)."""
    entry: dict[str, Any] = {}
    if fact_id.startswith(_FHIR_OBSERVATION):
        observation_id = fact_id[len(_FHIR_OBSERVATION):].rsplit(":", 1)[0]  # FHIR ids have no ":"
        entry["reference"] = f"Observation/{observation_id}/_history/{version}"
    entry["identifier"] = {"system": CANONICAL_EVENT_SYSTEM, "value": make_event_id(fact_id, version)}
    if fact_id.startswith("cdc:") and fact_id.count(":") >= 3:  # schemas/cdc.py: cdc:<table>:<pk>:<code>
        _, table, rest = fact_id.split(":", 2)
        row, code = rest.rsplit(":", 1)
        entry["display"] = f"EHR {table} row {row}, " + (parameter_name(code) if code in DERIVED_CODES else f"LOINC {code}")
        if preliminary_code is not None:
            entry["display"] += " (preliminary result)"
    elif preliminary_code is not None:
        entry["display"] = f"{parameter_name(preliminary_code)}, preliminary result"
    return entry


def _prediction(decision, probability: float | None, news2: int | None, rationale: Sequence[Mapping[str, Any]],
                horizon_h: int, incomplete_news2: bool = False) -> dict[str, Any]:
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
