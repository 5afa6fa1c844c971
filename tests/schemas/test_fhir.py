"""FHIR subscription notifications -> canonical events, over tests/fixtures/ingest/fhir.

Expected values are worked out by hand from the fixture text, not taken from the parser's output.
"""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status, make_event_id
from schemas.deadletter import Reason
from schemas.fhir import (complete_notification, gone_delete_entry, gone_version_delete, history_decides,
                          parse_notification, read_status,
                          relative_reference, version_before_delete)
from schemas.ingest_outcome import Control, Ignored, NeedsFetch, Parsed, Rejected
from tests.fixtures.ingest.corpus import fhir_bundle, fhir_names, gcs_bundle, raw_file, replace_nth_value

SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/ww-vitals"
EFFECTIVE_MS = 1_718_460_396_537  # 2024-06-15T14:06:36.537419Z, floored to ms
OUTCOMES = (Parsed, Rejected, Control, Ignored)


def parse(raw: bytes | None, offset: int = 0):
    return parse_notification(raw, topic="ww.fhir.notifications", partition=1, offset=offset)


def parsed(name: str) -> Parsed:
    outcome = parse(fhir_bundle(name))
    assert isinstance(outcome, Parsed), outcome
    return outcome


def by_code(outcome: Parsed):
    result = {e.code: e for e in outcome.events}
    assert len(result) == len(outcome.events), "one event per code"
    return result


def rejection(name: str):
    return rejection_of(fhir_bundle(name))


def rejection_of(body: bytes):
    outcome = parse(body)
    assert isinstance(outcome, Rejected), outcome
    return outcome.rejection


# --- status entry: R4 Parameters, R4B / R5 SubscriptionStatus ------------------------------------


def test_r4_parameters_status_with_one_heart_rate():
    outcome = parsed("r4_parameters_event")
    assert outcome.subscription == SUBSCRIPTION and outcome.event_numbers == [12]  # "12" as valueString
    (hr,) = outcome.events
    assert (hr.patient_id, hr.code, hr.value, hr.unit) == ("MRN-0001", codes.HEART_RATE, 80, "/min")
    assert hr.encounter_id == "fhir:Encounter/enc-4d8ac7e31e96"  # no identifier: the server's id, namespaced
    assert hr.effective_ms == EFFECTIVE_MS
    # version 2 (meta.versionId "2"), issued 14:06:40Z, stored 14:07:00Z: a version after the first is known
    # from max(issued, meta.lastUpdated), as servers keep the first release's `issued` on later versions
    assert hr.issued_ms == 1_718_460_420_000
    assert hr.fact_id == "fhir:Observation/vs-hr-1:8867-4" and hr.version == 2  # meta.versionId "2"
    assert hr.status is Status.FINAL and hr.source is Source.FHIR
    assert hr.provenance["resource"] == "Observation/vs-hr-1" and hr.provenance["offset"] == 0


def test_r4b_subscription_status_bundle_of_vitals():
    outcome = parsed("r4b_status_event")
    assert outcome.event_numbers == [28, 29, 30, 31]
    events = by_code(outcome)
    assert {c: e.value for c, e in events.items()} == {
        codes.SYSTOLIC_BP: 96, codes.DIASTOLIC_BP: 68,  # BP panel components
        codes.SPO2: 93,  # one event although both 2708-6 and 59408-5 are coded
        codes.O2_FLOW: 2,  # the pulse-ox Observation's flow component
        codes.FIO2: 28,  # and its inhaled oxygen concentration component (3150-0): oxygen for NEWS2 too
        codes.TEMPERATURE: 38.5,  # 101.3 [degF]
        codes.CONSCIOUSNESS: 3,  # SNOMED 450847001 responds to pain
    }
    assert events[codes.CONSCIOUSNESS].value_text == "P"
    assert events[codes.FIO2].fact_id == "fhir:Observation/vs-spo2-1:3150-0" and events[codes.FIO2].unit == "%"
    assert events[codes.FIO2].effective_ms == events[codes.SPO2].effective_ms  # the same observation round
    assert events[codes.SYSTOLIC_BP].fact_id == "fhir:Observation/vs-bp-1:8480-6"
    assert events[codes.DIASTOLIC_BP].fact_id == "fhir:Observation/vs-bp-1:8462-4"
    assert events[codes.TEMPERATURE].unit == "Cel"
    # no `issued`: meta.lastUpdated 14:07:00Z is when the value became available
    assert events[codes.SPO2].issued_ms == 1_718_460_420_000



@pytest.mark.parametrize("name", ["r4b_status_event", "r4b_encounter_transferred"])
def test_fhir_events_are_frozen_canonical_events_with_their_own_ids(name):
    # built with schemas.canonical.new_event (unfrozen, then made a CanonicalEvent): still one, and frozen
    for event in parsed(name).events:
        assert type(event) is CanonicalEvent
        assert event == CanonicalEvent(**{f.name: getattr(event, f.name) for f in dataclasses.fields(event)
                                          if f.init})
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.value = 0.0
        assert event.event_id == make_event_id(event.fact_id, event.version)

def with_fio2(quantity: dict) -> bytes:
    """The r4b bundle with the pulse-ox Observation's FiO2 component holding `quantity`."""
    doc = json.loads(fhir_bundle("r4b_status_event"))
    [component] = [c for e in doc["entry"] for c in e.get("resource", {}).get("component", [])
                   if c["code"]["coding"][0]["code"] == codes.FIO2]
    component["valueQuantity"] = quantity
    return json.dumps(doc).encode()


@pytest.mark.parametrize("unit", ["1", "L/L", "{fraction}"])
def test_fio2_sent_as_a_fraction_is_a_percentage(unit):
    # 0.28 * 100 is 28.000000000000004 in floats: the conversion gives 28.0 exactly
    events = by_code(parsed_body(with_fio2({"value": 0.28, "system": "http://unitsofmeasure.org", "code": unit})))
    assert events[codes.FIO2].value == 28.0 and events[codes.FIO2].unit == "%"


def test_fio2_below_room_air_is_implausible():
    # a fraction sent under "%" (0.28 %) is no concentration anyone breathes: dead-lettered, not read as air
    body = with_fio2({"value": 0.28, "system": "http://unitsofmeasure.org", "code": "%"})
    assert rejection_of(body).reason is Reason.IMPLAUSIBLE_VALUE


def with_temperature(quantity: dict) -> bytes:
    """The r4b bundle with the temperature Observation's valueQuantity replaced by `quantity`."""
    doc = json.loads(fhir_bundle("r4b_status_event"))
    [obs] = [e["resource"] for e in doc["entry"][1:] if e["resource"]["code"]["coding"][0]["code"] == codes.TEMPERATURE]
    obs["valueQuantity"] = quantity
    return json.dumps(doc).encode()


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_value_with_a_comparator_is_dead_lettered_not_scored_as_the_bound(comparator):
    # ">38.0 Cel" is 38.1 or more (NEWS2 1 point): read as 38.0 it scored 0, silently
    body = with_temperature({"value": 38.0, "comparator": comparator, "unit": "Cel",
                             "system": "http://unitsofmeasure.org", "code": "Cel"})
    r = rejection_of(body)
    assert r.reason is Reason.BAD_VALUE and "comparator" in r.detail and "38" not in r.detail


@pytest.mark.parametrize("unit", ["Cel", "degC", "°C", "C"])
def test_a_celsius_temperature_is_read_in_each_spelling_of_the_unit(unit):
    # "degC" was dead-lettered as an unknown unit while "degF" was converted: a fever lost from NEWS2
    events = by_code(parsed_body(with_temperature({"value": 38.2, "unit": unit, "code": unit})))
    assert events[codes.TEMPERATURE].value == 38.2 and events[codes.TEMPERATURE].unit == "Cel"


def test_r5_labs_with_unit_conversion_and_integer64_counters():
    outcome = parsed("r5_labs_event")
    assert outcome.event_numbers == [9007199254740993, 9007199254740994]  # > 2**53, exact
    events = by_code(outcome)
    assert events[codes.LACTATE].value == 4.2  # coded 32693-4, an alias of 2524-7
    assert events[codes.WBC].value == 15.3 and events[codes.WBC].unit == "10*3/uL"  # 15300 /uL
    assert events[codes.CREATININE].value == 1.9
    # labs: collected 06:25, resulted 08:35:53.426799 -> the as-of time is the result time
    assert events[codes.LACTATE].effective_ms == 1_719_210_300_000
    assert events[codes.LACTATE].issued_ms == 1_719_218_153_426
    assert events[codes.CREATININE].issued_ms == 1_719_219_600_000  # meta.lastUpdated 09:00Z


def with_lab_value(obs_id: str, value: dict) -> bytes:
    """r5_labs_event with the value[x] of Observation `obs_id` replaced by `value` (e.g. {"valueQuantity": ...})."""
    doc = json.loads(fhir_bundle("r5_labs_event"))
    [obs] = [e["resource"] for e in doc["entry"][1:] if e["resource"].get("id") == obs_id]
    obs.pop("valueQuantity")
    obs.update(value)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("value", [
    {"valueQuantity": {"value": 18}},
    {"valueQuantity": {"value": 18, "system": "http://unitsofmeasure.org"}},
    {"valueInteger": 18},
])
def test_a_lactate_without_a_unit_is_dead_lettered_not_read_as_mmol_per_litre(value):
    # 18 with no unit may be mg/dL (~2 mmol/L): it was read as a critical 18 mmol/L, into qSOFA and the model
    r = rejection_of(with_lab_value("lab-lac-1", value))
    assert r.reason is Reason.UNKNOWN_UNIT
    assert "lactate" in r.detail and "without a unit" in r.detail and "more than one unit" in r.detail
    assert "18" not in r.detail and "MRN" not in r.detail


def test_a_lactate_in_milligrams_per_decilitre_is_converted_to_mmol_per_litre():
    # some US labs report lactate in mg/dL: it was dead-lettered unknown_unit, so qSOFA and the model never saw it
    body = with_lab_value("lab-lac-1", {"valueQuantity": {"value": 36, "system": "http://unitsofmeasure.org",
                                                          "code": "mg/dL", "unit": "mg/dL"}})
    (lactate,) = [e for e in parsed_body(body).events if e.code == codes.LACTATE]
    assert (lactate.value, lactate.unit) == (4.0, "mmol/L")  # 36 / 9.008 mg/dL per mmol/L


def test_a_temperature_without_a_unit_is_dead_lettered_as_celsius_and_fahrenheit_are_both_sent():
    r = rejection_of(with_temperature({"value": 38.2}))
    assert r.reason is Reason.UNKNOWN_UNIT and "temperature" in r.detail and "without a unit" in r.detail
    assert "38" not in r.detail


def test_a_heart_rate_without_a_unit_is_still_read_per_minute():
    # only one unit is in use for a heart rate: no unit is the canonical /min, the common case for vitals
    doc = json.loads(fhir_bundle("r4b_full_resource_hr9"))
    [obs] = [e["resource"] for e in doc["entry"][1:]]
    obs["valueQuantity"] = {"value": 112}
    (hr,) = parsed_body(json.dumps(doc).encode()).events
    assert (hr.code, hr.value, hr.unit) == (codes.HEART_RATE, 112, "/min")


def _heart_rate_version(meta: dict, status: str = "final", value: float = 80) -> CanonicalEvent:
    """r4_parameters_event's heart rate (issued 14:06:40Z) as the version `meta` describes."""
    doc = json.loads(fhir_bundle("r4_parameters_event"))
    [obs] = [e["resource"] for e in doc["entry"] if e.get("resource", {}).get("resourceType") == "Observation"]
    obs.update(meta=meta, status=status)
    obs["valueQuantity"]["value"] = value
    (hr,) = parsed_body(json.dumps(doc).encode()).events
    return hr


ISSUED_MS = 1_718_460_400_000  # the fixture's `issued`, 14:06:40Z


def test_an_amendment_under_the_first_release_issued_time_is_known_from_when_the_server_stored_it():
    """FHIR R4 `issued`: when "this version" was made available; servers often keep the first release's on
    version 2+. Taken as it stood, the amended value (120 for 80) was visible to training's as-of joins from
    14:06:40, three hours before it existed (DOMAIN.md section 3)."""
    first = _heart_rate_version({"versionId": "1", "lastUpdated": "2024-06-15T14:07:00Z"})
    assert first.issued_ms == ISSUED_MS  # version 1: its own release time (stored 20 s later)
    amended = _heart_rate_version({"versionId": "2", "lastUpdated": "2024-06-15T17:06:40Z"}, "amended", 120)
    assert amended.issued_ms == ISSUED_MS + 3 * 3_600_000
    retracted = _heart_rate_version({"versionId": "3", "lastUpdated": "2024-06-15T18:06:40Z"}, "entered-in-error")
    assert retracted.status.retracts and retracted.issued_ms == ISSUED_MS + 4 * 3_600_000
    # without a versionId the version cannot be told: lastUpdated still bounds when it was known
    unversioned = _heart_rate_version({"lastUpdated": "2024-06-15T17:06:40Z"}, "amended", 120)
    assert unversioned.issued_ms == ISSUED_MS + 3 * 3_600_000


def test_an_observation_without_version_id_is_ordered_by_last_updated():
    """versionId is optional in FHIR: without it, an amendment must still be a newer version, or the
    worker drops it as a redelivery of the first (DOMAIN.md section 3: versionId / lastUpdated)."""
    doc = json.loads(fhir_bundle("r4_parameters_event"))

    def version_at(last_updated: str, status: str) -> int:
        for entry in doc["entry"]:
            resource = entry.get("resource", {})
            if resource.get("resourceType") == "Observation":
                resource["meta"] = {"lastUpdated": last_updated}
                resource["status"] = status
        (hr,) = parsed_body(json.dumps(doc).encode()).events
        return hr.version

    first = version_at("2024-06-15T14:07:00Z", "final")
    amended = version_at("2024-06-15T15:00:00Z", "amended")
    assert amended > first > 1


@pytest.mark.parametrize("snomed, letter", [
    ("248234008", "A"), ("130987000", "C"), ("300202002", "V"), ("450847001", "P"), ("422768004", "U"),
    ("248236005", "V"), ("248237001", "P"),  # clinosim's codes for voice and pain
])
def test_each_acvpu_snomed_code_is_its_level(snomed, letter):
    body = fhir_bundle("r4b_status_event").replace(b'"450847001"', f'"{snomed}"'.encode())
    loc = by_code(parsed_body(body))[codes.CONSCIOUSNESS]
    assert (loc.value_text, loc.value) == (letter, float(codes.ACVPU_ORDINAL[letter]))


def test_a_snomed_code_outside_acvpu_is_a_bad_value():
    body = fhir_bundle("r4b_status_event").replace(b'"450847001"', b'"284592002"')
    assert rejection_of(body).reason is Reason.BAD_VALUE


# --- Glasgow Coma Scale total (9269-2): the consciousness input on EHRs that chart no ACVPU -----------

GCS_AT = "2024-06-15T14:06:36Z"


def gcs(value: dict, status: str = "final") -> bytes:
    return gcs_bundle("MRN-0001", GCS_AT, value, status=status)


@pytest.mark.parametrize("total, letter", [
    (15, "A"), (14, "C"), (13, "V"), (11, "V"), (10, "P"), (7, "P"), (6, "U"), (3, "U"),
])
@pytest.mark.parametrize("form", ["valueInteger", "valueQuantity"])
def test_a_gcs_total_is_consciousness_at_the_acvpu_level_it_stands_for(total, letter, form):
    # before, 9269-2 was an unmapped code: skipped, so NEWS2 never had its consciousness input
    value = ({"valueInteger": total} if form == "valueInteger" else
             {"valueQuantity": {"value": total, "system": "http://unitsofmeasure.org", "code": "{score}"}})
    (loc,) = parsed_body(gcs(value)).events
    assert (loc.code, loc.value, loc.value_text) == (codes.CONSCIOUSNESS, float(codes.ACVPU_ORDINAL[letter]), letter)
    assert loc.fact_id == f"fhir:Observation/gcs-1:{codes.CONSCIOUSNESS}" and loc.unit == "{score}"
    assert loc.provenance["gcs_total"] == total  # the charted score is kept beside the level it maps to


def test_an_entered_in_error_gcs_retracts_its_consciousness_fact():
    (loc,) = parsed_body(gcs({"valueInteger": 3}, status="entered-in-error")).events
    assert (loc.code, loc.value, loc.status) == (codes.CONSCIOUSNESS, None, Status.ENTERED_IN_ERROR)
    assert loc.fact_id == f"fhir:Observation/gcs-1:{codes.CONSCIOUSNESS}"


@pytest.mark.parametrize("value, reason", [
    ({"valueInteger": 0}, Reason.IMPLAUSIBLE_VALUE),
    ({"valueInteger": 2}, Reason.IMPLAUSIBLE_VALUE),
    ({"valueInteger": 16}, Reason.IMPLAUSIBLE_VALUE),
    ({"valueQuantity": {"value": 99}}, Reason.IMPLAUSIBLE_VALUE),
    ({"valueQuantity": {"value": 14.5}}, Reason.BAD_VALUE),  # a total is a sum of integers
    ({"valueQuantity": {"value": 8, "comparator": "<"}}, Reason.BAD_VALUE),  # a bound, not a score
    ({"valueQuantity": {"value": 8, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}, Reason.UNKNOWN_UNIT),
    ({"valueString": "E4V5M6"}, Reason.BAD_VALUE),
])
def test_a_gcs_outside_3_to_15_or_not_an_integer_is_dead_lettered_without_its_value(value, reason):
    r = rejection_of(gcs(value))
    assert r.reason is reason and r.detail.startswith("GCS total")
    charted = value["valueQuantity"]["value"] if "valueQuantity" in value else next(iter(value.values()))
    assert str(charted) not in r.detail


def gcs_part(code: str, value: dict) -> dict:
    return {"code": {"coding": [{"system": "http://loinc.org", "code": code}]}, **value}


EYE, VERBAL, MOTOR = codes.GCS_EYE, codes.GCS_VERBAL, codes.GCS_MOTOR


@pytest.mark.parametrize("parts, total, letter", [
    ({EYE: {"valueInteger": 3}, VERBAL: {"valueInteger": 4}, MOTOR: {"valueInteger": 6}}, 13, "V"),
    ({EYE: {"valueInteger": 1}, VERBAL: {"valueInteger": 1}, MOTOR: {"valueInteger": 1}}, 3, "U"),
    ({EYE: {"valueQuantity": {"value": 4, "code": "{score}"}}, VERBAL: {"valueInteger": 5},
      MOTOR: {"valueInteger": 6}}, 15, "A"),
    # LOINC answers: eyes open spontaneously (4), confused (4), obeys commands (6)
    ({EYE: {"valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA6556-0"}]}},
      VERBAL: {"valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA6560-2"}]}},
      MOTOR: {"valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA6567-7"}]}}}, 14, "C"),
])
def test_a_gcs_panel_charted_as_its_three_components_is_their_sum(parts, total, letter):
    """Many EHRs chart a 9269-2 panel with the eye, verbal and motor scores as components and no total. It
    was skipped as "no value": the patient's consciousness, a NEWS2 input worth 3 points, was missing."""
    (loc,) = parsed_body(gcs({"component": [gcs_part(c, v) for c, v in parts.items()]})).events
    assert (loc.code, loc.value_text, loc.provenance["gcs_total"]) == (codes.CONSCIOUSNESS, letter, total)
    assert loc.value == float(codes.ACVPU_ORDINAL[letter])


def test_a_gcs_total_that_disagrees_with_its_components_is_dead_lettered():
    parts = [gcs_part(code, {"valueInteger": score}) for code, score in ((EYE, 4), (VERBAL, 5), (MOTOR, 6))]
    (loc,) = parsed_body(gcs({"valueInteger": 15, "component": parts})).events
    assert loc.provenance["gcs_total"] == 15  # they agree: the total
    r = rejection_of(gcs({"valueInteger": 9, "component": parts}))
    assert r.reason is Reason.BAD_VALUE and "disagrees" in r.detail


@pytest.mark.parametrize("eye", [
    {"valueString": "E4"},
    {"valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "281395000"}]}},
    {"valueInteger": 9},  # off its scale
])
def test_a_gcs_total_with_components_coded_another_way_is_the_total(eye):
    """Components wardwatch cannot read are no cross-check, not a reason to dead-letter the charted total
    (and with it every other vital sign of the notification)."""
    parts = [gcs_part(EYE, eye), gcs_part(VERBAL, {"valueInteger": 5}), gcs_part(MOTOR, {"valueInteger": 6})]
    (loc,) = parsed_body(gcs({"valueInteger": 15, "component": parts})).events
    assert (loc.value_text, loc.provenance["gcs_total"]) == ("A", 15)


def test_a_gcs_panel_without_its_total_and_a_component_is_skipped_and_counted():
    # intubated: the verbal response is not testable, so there is no total to map (guessing one would be wrong)
    parts = [gcs_part(EYE, {"valueInteger": 2}), gcs_part(MOTOR, {"valueInteger": 5}),
             gcs_part(VERBAL, {"dataAbsentReason": {"coding": [{
                 "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed"}]}})]
    outcome = parse(gcs({"component": parts}))
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"gcs_incomplete": 1}
    outcome = parse(gcs({"component": parts[:2]}))  # verbal not charted at all
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"gcs_incomplete": 1}


def test_gcs_components_charted_as_their_own_observations_are_not_summed_but_counted():
    """Three Observations may be charted minutes apart: summing them across resources would make a total
    nobody assessed. Each is skipped, counted apart from unmapped codes so an operator can see them."""
    doc = json.loads(gcs({"valueInteger": 4}))
    doc["entry"][1]["resource"]["code"] = {"coding": [{"system": "http://loinc.org", "code": EYE}]}
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"gcs_components": 1}


@pytest.mark.parametrize("code, value, reason", [
    (MOTOR, {"valueInteger": 7}, Reason.IMPLAUSIBLE_VALUE),  # motor is 1..6
    (EYE, {"valueInteger": 0}, Reason.IMPLAUSIBLE_VALUE),
    (VERBAL, {"valueQuantity": {"value": 4.5}}, Reason.BAD_VALUE),
    (VERBAL, {"valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA6567-7"}]}},
     Reason.BAD_VALUE),  # a motor answer on the verbal scale
    (EYE, {"valueString": "E4"}, Reason.BAD_VALUE),
])
def test_a_gcs_component_outside_its_scale_is_dead_lettered_without_its_value(code, value, reason):
    parts = {EYE: {"valueInteger": 3}, VERBAL: {"valueInteger": 4}, MOTOR: {"valueInteger": 5}} | {code: value}
    r = rejection_of(gcs({"component": [gcs_part(c, v) for c, v in parts.items()]}))
    assert r.reason is reason and r.detail.startswith("GCS ")
    assert "7" not in r.detail and "4.5" not in r.detail and "LA6567" not in r.detail


def parsed_body(body: bytes) -> Parsed:
    outcome = parse(body)
    assert isinstance(outcome, Parsed), outcome
    return outcome


@pytest.mark.parametrize(("name", "kind", "since"), [("r4b_handshake", "handshake", 0),
                                                       ("r4_heartbeat", "heartbeat", 12)])
def test_handshake_and_heartbeat_are_control(name, kind, since):
    outcome = parse(fhir_bundle(name))
    assert isinstance(outcome, Control) and outcome.kind == kind
    assert outcome.detail["events_since_start"] == since and outcome.detail["subscription"] == SUBSCRIPTION


# --- versions, retractions, references -----------------------------------------------------------


def test_entered_in_error_panel_without_components_retracts_both_pressures():
    events = parsed("r4b_entered_in_error").events
    assert {e.fact_id for e in events} == {"fhir:Observation/vs-bp-1:8480-6", "fhir:Observation/vs-bp-1:8462-4"}
    assert all(e.status is Status.ENTERED_IN_ERROR and e.value is None and e.version == 3 for e in events)


def test_entered_in_error_observations_stripped_of_some_components_retract_all_of_them():
    # sent with the diastolic only, the panel left its systolic live (NEWS2 kept scoring it); a pulse
    # oximetry sent without its components left its oxygen flow live (+2 NEWS2 points for oxygen)
    doc = json.loads(fhir_bundle("r4b_status_event"))
    bp, spo2 = (e["resource"] for e in doc["entry"][1:3])
    assert (bp["id"], spo2["id"]) == ("vs-bp-1", "vs-spo2-1")
    bp["component"] = bp["component"][1:]  # diastolic only
    del spo2["component"]
    bp["status"] = spo2["status"] = "entered-in-error"
    retracted = {e.fact_id for e in parsed_body(json.dumps(doc).encode()).events if e.status is Status.ENTERED_IN_ERROR}
    assert retracted == {"fhir:Observation/vs-bp-1:8480-6", "fhir:Observation/vs-bp-1:8462-4",
                         "fhir:Observation/vs-spo2-1:59408-5", "fhir:Observation/vs-spo2-1:3151-8",
                         "fhir:Observation/vs-spo2-1:3150-0"}


def cancelled(version: str, **changes) -> bytes:
    """fhir/cancelled_status (a heart rate of 80, status cancelled) as version `version`, with `changes`."""
    doc = json.loads(fhir_bundle("cancelled_status"))
    obs = doc["entry"][1]["resource"]
    obs["meta"]["versionId"] = version
    obs.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del obs[key]
    return json.dumps(doc).encode()


def test_a_cancelled_observation_retracts_what_its_earlier_version_said():
    """`cancelled`: not started or not completed (FHIR R4 ObservationStatus). Its preliminary version 1
    (a heart rate) must stop counting. It used to dead-letter the whole notification (BAD_VALUE), so the
    preliminary value stayed live and an operator had to triage a legitimate clinical state."""
    (hr,) = parsed_body(cancelled("2")).events
    assert (hr.fact_id, hr.version) == ("fhir:Observation/vs-hr-c:8867-4", 2)
    assert hr.status is Status.ENTERED_IN_ERROR and hr.value is None  # downstream retracts it as entered-in-error
    assert hr.provenance["fhir_status"] == "cancelled" and hr.effective_ms == EFFECTIVE_MS


def test_a_cancelled_observation_without_an_effective_time_is_retracted_at_its_issued_time():
    # a measurement never taken may have no clinical time: the retraction is dated when it was issued
    (hr,) = parsed_body(cancelled("2", effectiveDateTime=None)).events
    assert hr.status.retracts and hr.effective_ms == hr.issued_ms == 1_718_460_420_000  # lastUpdated 14:07:00Z


def test_a_cancelled_panel_retracts_both_pressures_it_may_have_given():
    doc = json.loads(fhir_bundle("r4b_entered_in_error"))
    doc["entry"][1]["resource"]["status"] = "cancelled"
    events = parsed_body(json.dumps(doc).encode()).events
    assert {e.fact_id for e in events} == {"fhir:Observation/vs-bp-1:8480-6", "fhir:Observation/vs-bp-1:8462-4"}
    assert all(e.status.retracts and e.value is None for e in events)


def test_a_cancelled_first_version_is_skipped_and_counted_and_the_rest_is_read():
    # version 1: no earlier version gave a value, nothing to retract: accounted as skipped, not dead-lettered
    outcome = parse(fhir_bundle("cancelled_status"))
    assert isinstance(outcome, Ignored) and outcome.kind == "cancelled"
    assert outcome.detail["skipped"] == {"cancelled": 1} and outcome.detail["event_numbers"] == [52]
    doc = json.loads(fhir_bundle("r4b_status_event"))
    doc["entry"].append(json.loads(fhir_bundle("cancelled_status"))["entry"][1])
    outcome = parsed_body(json.dumps(doc).encode())
    assert codes.SYSTOLIC_BP in by_code(outcome) and outcome.skipped.get("cancelled") == 1


def test_an_unknown_status_is_dead_lettered_saying_why():
    """`unknown`: "one of the listed statuses is presumed to apply, but the source does not know which":
    the value may be final or entered-in-error, so it is neither scored nor retracted."""
    r = rejection_of(cancelled("2", status="unknown"))
    assert r.reason is Reason.BAD_VALUE and "'unknown'" in r.detail and "80" not in r.detail
    assert rejection_of(cancelled("2", status="withdrawn")).reason is Reason.BAD_VALUE  # not a FHIR status


def test_amended_observation_with_reference_only_subject():
    # keyed by the Patient id only where the operator says the server's Patient ids are the MRNs (a facade)
    outcome = parse_notification(fhir_bundle("r4b_amended_reference_only"), topic="t", partition=0, offset=0,
                                 fhir_patient_ids_are_mrns=True)
    (hr,) = outcome.events
    assert hr.patient_id == "pt-e4f5d6254795"  # from "Patient/pt-e4f5d6254795"
    assert hr.status is Status.AMENDED and hr.version == 4 and hr.value == 84
    assert hr.issued_ms == hr.effective_ms  # neither issued nor lastUpdated: effective stands in


def test_a_subject_named_by_the_server_id_alone_asks_for_its_patients_mrn():
    """A FHIR server's Patient id is its own (HAPI: 1, 2, 3...): keyed by it, a reading could join another
    patient whose MRN is that number. Without the operator's word that the ids are the MRNs, the MRN is read
    from the server (NeedsFetch `patients`); without a server it is a rejection saying what to set."""
    outcome = parse(fhir_bundle("r4b_amended_reference_only"))
    assert isinstance(outcome, NeedsFetch) and outcome.patients == ("Patient/pt-e4f5d6254795",)
    assert outcome.references == ()  # the Observation itself is here: only the MRN is wanted
    r = outcome.rejection
    assert r.reason is Reason.FHIR_SERVER_NOT_CONFIGURED
    assert "WARDWATCH_FHIR_SERVER_URL" in r.detail and "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS" in r.detail
    assert "pt-e4f5d6254795" not in r.detail
    # the MRN the fetch read: the reading is that patient's
    outcome = parse_notification(fhir_bundle("r4b_amended_reference_only"), topic="t", partition=0, offset=0,
                                 patient_mrns={"Patient/pt-e4f5d6254795": "MRN-0001"})
    assert [e.patient_id for e in outcome.events] == ["MRN-0001"]


@pytest.mark.parametrize("reference", ["Patient/123?_format=xml", "Patient/..", "Patient/a b", "Patient/" + "9" * 65])
def test_a_subject_reference_that_is_no_fhir_id_is_dead_lettered_not_read_from_the_server(reference):
    # was: NeedsFetch of "Patient/123?_format=xml" (or "Patient/.."), which the ingest would GET with its token
    doc = json.loads(fhir_bundle("r4b_amended_reference_only"))
    doc["entry"][1]["resource"]["subject"] = {"reference": reference}
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Rejected) and not isinstance(outcome, NeedsFetch), outcome
    assert outcome.rejection.reason is Reason.MISSING_PATIENT and "123" not in outcome.rejection.detail


def test_an_encounter_subject_named_by_the_server_id_alone_asks_for_its_patients_mrn():
    outcome = parse(fhir_bundle("r5_encounter_discharged"))
    assert isinstance(outcome, NeedsFetch) and outcome.patients == ("Patient/pt-e4f5d6254795",)


def test_an_observation_dated_decades_ahead_without_an_issued_time_is_dead_lettered():
    """Neither `issued` nor meta.lastUpdated: the effective time stands in for the issued time, so only
    the notification's timestamp (the server's clock, 2024) shows that 2099 is a wrong clock. Accepted, it
    would move the patient's clock 75 years ahead and every later reading would be late."""
    body = with_patient("r4b_amended_reference_only")  # whose: the Patient it carries
    outcome = parse(body.replace(b'"effectiveDateTime": "2024-06-15T14:06:36Z"',
                                 b'"effectiveDateTime": "2099-06-15T14:06:36Z"'))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.FUTURE_TIME
    # half an hour after the notification: a clock off by a little, still taken (MAX_FUTURE_SKEW_MS)
    assert isinstance(parse(body.replace(b'"effectiveDateTime": "2024-06-15T14:06:36Z"',
                                         b'"effectiveDateTime": "2024-06-15T14:37:00Z"')), Parsed)


def _without_server_time(effective: str) -> bytes:
    """r4b_amended_reference_only with no clock of the server at all: neither `issued`, meta.lastUpdated,
    a notificationEvent timestamp nor a Bundle timestamp."""
    doc = json.loads(with_patient("r4b_amended_reference_only"))  # whose: the Patient it carries
    doc.pop("timestamp")
    for event in doc["entry"][0]["resource"]["notificationEvent"]:
        event.pop("timestamp")
    doc["entry"][1]["resource"]["effectiveDateTime"] = effective
    return json.dumps(doc).encode()


def test_an_observation_with_no_server_time_is_bounded_by_when_the_message_reached_kafka():
    """Without any server time, the effective time was checked against itself: a 2099 typo was taken
    and moved the patient's clock 75 years ahead (every later reading late). The Kafka record's
    timestamp (when the receiver wrote it) bounds it; with no record time either, nothing can tell a
    typo from a measurement: dead-lettered as having no time to check against, never scored."""
    received_ms = EFFECTIVE_MS + 60_000  # the receiver wrote it a minute after the measurement
    future = _without_server_time("2099-06-15T14:06:36Z")
    outcome = parse_notification(future, topic="t", partition=0, offset=0, received_ms=received_ms)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.FUTURE_TIME
    good = _without_server_time("2024-06-15T14:06:36Z")
    assert isinstance(parse_notification(good, topic="t", partition=0, offset=0, received_ms=received_ms), Parsed)
    for body in (future, good):  # offline (wardwatch check without a record timestamp): no clock at all
        r = rejection_of(body)
        assert r.reason is Reason.MISSING_TIME and "2099" not in r.detail and "2024" not in r.detail
    # a server time still comes first: the notification's timestamp (2024) rejects 2099 whatever Kafka says
    doc = json.loads(future)
    doc["timestamp"] = "2024-06-15T14:07:01Z"
    outcome = parse_notification(json.dumps(doc).encode(), topic="t", partition=0, offset=0,
                                 received_ms=4_000_000_000_000)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.FUTURE_TIME


@pytest.mark.parametrize("effective", ["2024-06-15", "2024-06", "2024"])
def test_a_vital_sign_dated_without_a_time_of_day_is_dead_lettered_not_scored_at_midnight(effective):
    """FHIR R4 dateTime allows year, year-month and date precision. A date-only effectiveDateTime was
    read as midnight UTC (a year-month was a bad value saying only "not an ISO-8601 date-time"): a
    reading that cannot be placed in an hourly window is dead-lettered, saying why, without the date."""
    body = fhir_bundle("r4b_status_event")
    doc = json.loads(body)
    for entry in doc["entry"][1:]:
        if entry.get("resource", {}).get("resourceType") == "Observation":
            entry["resource"]["effectiveDateTime"] = effective
    r = rejection_of(json.dumps(doc).encode())
    assert r.reason is Reason.MISSING_TIME and "time of day" in r.detail and "2024" not in r.detail
    for entry in doc["entry"][1:]:
        if entry.get("resource", {}).get("resourceType") == "Observation":
            entry["resource"].pop("effectiveDateTime", None)
            entry["resource"]["effectivePeriod"] = {"start": effective}
    assert rejection_of(json.dumps(doc).encode()).reason is Reason.MISSING_TIME


def test_redelivered_notification_has_the_same_event_ids():
    first, again = parse(fhir_bundle("r4b_status_event"), 1), parse(fhir_bundle("r4b_status_event"), 99)
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]


# --- Encounter and Patient -> CONTEXT facts -------------------------------------------------------

ENCOUNTER = "enc-4d8ac7e31e96"
DAY_2024_06_15_MS = 1_718_409_600_000  # 2024-06-15T00:00:00Z


def context_facts(name: str) -> dict[str, object]:
    events = parsed(name).events
    assert all(e.code_system == codes.CONTEXT and e.source is Source.FHIR for e in events)
    return {e.code: e for e in events}


def test_transferred_encounter_gives_admission_and_the_active_ward():
    facts = context_facts("r4b_encounter_transferred")
    assert set(facts) == {codes.ADMISSION, codes.LOCATION}  # still in progress: no discharge
    admission, location = facts[codes.ADMISSION], facts[codes.LOCATION]
    assert admission.value_text == "inpatient"  # v3 ActCode IMP, as the CDC encounter_class column says it
    assert admission.effective_ms == DAY_2024_06_15_MS + (9 * 60 + 24) * 60_000  # period.start 09:24Z
    assert admission.fact_id == f"fhir:Encounter:{ENCOUNTER}:admission"
    # the active location (not the completed ED stay, not the planned ICU bed), since its own start 12:54Z
    assert location.value_text == "Ward 5B"
    assert location.effective_ms == DAY_2024_06_15_MS + (12 * 60 + 54) * 60_000
    assert location.fact_id == f"fhir:Encounter:{ENCOUNTER}:location:{location.effective_ms}"
    for fact in (admission, location):
        assert (fact.patient_id, fact.encounter_id, fact.version) == ("MRN-0001", f"fhir:Encounter/{ENCOUNTER}", 3)
        assert fact.value is None and fact.status is Status.FINAL
        assert fact.issued_ms == DAY_2024_06_15_MS + 16 * 3_600_000  # meta.lastUpdated 16:00Z


def test_r5_completed_encounter_gives_discharge_and_versions_by_last_updated():
    facts = {e.code: e for e in parse(with_patient("r5_encounter_discharged")).events if e.code_system == codes.CONTEXT
             and e.code in (codes.ADMISSION, codes.LOCATION, codes.DISCHARGE)}
    assert set(facts) == {codes.ADMISSION, codes.LOCATION, codes.DISCHARGE}
    admitted_ms = 1_718_827_800_000  # actualPeriod.start 2024-06-19T22:10+02:00 = 20:10Z
    assert facts[codes.ADMISSION].effective_ms == admitted_ms
    assert facts[codes.ADMISSION].value_text == "emergency"  # R5 class: a list of CodeableConcepts, EMER
    # a completed location without display or period: the Location id, since the admission
    assert (facts[codes.LOCATION].value_text, facts[codes.LOCATION].effective_ms) == ("ward-7a", admitted_ms)
    assert facts[codes.DISCHARGE].effective_ms == 1_718_878_500_000  # 2024-06-20T10:15Z
    assert facts[codes.DISCHARGE].value_text is None
    assert facts[codes.DISCHARGE].fact_id == "fhir:Encounter:enc-77aa01:discharge"
    # no versionId: meta.lastUpdated 2024-06-20T10:30Z in ms orders the versions
    assert {e.version for e in facts.values()} == {1_718_879_400_000}
    # a reference-only subject: the MRN of the Patient read for it (here given as a fetch would)
    outcome = parse_notification(fhir_bundle("r5_encounter_discharged"), topic="t", partition=0, offset=0,
                                 patient_mrns={"Patient/pt-e4f5d6254795": "MRN-0001"})
    assert {e.patient_id for e in outcome.events} == {"MRN-0001"}


def test_entered_in_error_encounter_retracts_the_same_facts():
    before = context_facts("r4b_encounter_transferred")
    retracted = context_facts("r4b_encounter_entered_in_error")
    assert {e.fact_id for e in retracted.values()} == {e.fact_id for e in before.values()}
    assert all(e.status is Status.ENTERED_IN_ERROR and e.version == 4 and e.value_text is None
               for e in retracted.values())


def test_planned_encounter_gives_no_facts():
    bundle = json.loads(fhir_bundle("r4b_encounter_transferred"))
    bundle["entry"][1]["resource"]["status"] = "planned"
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"Encounter": 1}


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_a_cancelled_booking_without_a_start_gives_no_facts_and_is_not_dead_lettered(status):
    # it was never admitted (an admission needs period.start), so there is nothing to retract
    bundle = json.loads(fhir_bundle("r4b_encounter_transferred"))
    enc = bundle["entry"][1]["resource"]
    enc["status"] = status
    enc.pop("period", None)
    enc.pop("location", None)
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"Encounter": 1}, outcome


def test_patient_gives_sex_and_birth_year_under_the_mrn():
    facts = context_facts("r4b_patient")
    assert set(facts) == {codes.SEX, codes.BIRTH_YEAR}
    sex, year = facts[codes.SEX], facts[codes.BIRTH_YEAR]
    assert (sex.patient_id, sex.value_text, sex.value) == ("MRN-0001", "female", None)  # the MR identifier
    assert (year.patient_id, year.value, year.value_text) == ("MRN-0001", 1943.0, None)  # the year, no more
    assert sex.fact_id == "fhir:Patient:pt-e4f5d6254795:sex"
    assert year.fact_id == "fhir:Patient:pt-e4f5d6254795:birth-year"
    assert {e.effective_ms for e in facts.values()} == {DAY_2024_06_15_MS + 8 * 3_600_000}  # lastUpdated
    assert {e.version for e in facts.values()} == {2}


def test_patient_without_an_mrn_is_dead_lettered_unless_its_id_is_the_mrn():
    """Keyed by its FHIR id, a Patient's sex and birth year could land on another patient whose MRN that id
    is; only where the operator says the server's Patient ids are the MRNs is the id its key."""
    bundle = json.loads(fhir_bundle("r4b_patient"))
    del bundle["entry"][1]["resource"]["identifier"][1]["type"]
    body = json.dumps(bundle).encode()
    r = rejection_of(body)
    assert r.reason is Reason.MISSING_PATIENT and "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS" in r.detail
    assert "pt-e4f5d6254795" not in r.detail
    events = parse_notification(body, topic="t", partition=0, offset=0, fhir_patient_ids_are_mrns=True).events
    assert {e.patient_id for e in events} == {"pt-e4f5d6254795"}


def test_invalid_encounter_is_rejected_naming_the_field():
    bundle = json.loads(fhir_bundle("r4b_encounter_transferred"))
    bundle["entry"][1]["resource"]["period"]["start"] = "after lunch"
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.INVALID_RESOURCE
    assert "period" in outcome.rejection.detail and "lunch" not in outcome.rejection.detail


def with_patient(name: str, *, full_url: str | None = None, reference: str | None = None) -> bytes:
    """Notification `name` with the Patient of r4b_patient (id pt-e4f5d6254795, MRN MRN-0001) added."""
    bundle = json.loads(fhir_bundle(name))
    patient = json.loads(fhir_bundle("r4b_patient"))["entry"][1]["resource"]
    bundle["entry"].append({"fullUrl": full_url or "https://ehr.example.org/fhir/Patient/pt-e4f5d6254795",
                            "resource": patient})
    if reference is not None:
        bundle["entry"][1]["resource"]["subject"] = {"reference": reference}
    return json.dumps(bundle).encode()


def test_a_reference_only_subject_takes_the_mrn_of_the_patient_in_the_same_notification():
    """A FHIR server's Patient id is its own (HAPI: 1, 2, 3...) and may equal another patient's MRN: keyed
    by it, this reading would join that other patient's state. The Patient the notification carries says
    whose it is."""
    hr = next(e for e in parse(with_patient("r4b_amended_reference_only")).events if e.code == codes.HEART_RATE)
    assert hr.patient_id == "MRN-0001"
    # an absolute reference names the same Patient
    hr = next(e for e in parse(with_patient("r4b_amended_reference_only",
                                            reference="https://ehr.example.org/fhir/Patient/pt-e4f5d6254795"))
              .events if e.code == codes.HEART_RATE)
    assert hr.patient_id == "MRN-0001"
    # a transaction-style urn:uuid reference resolves through the Patient entry's fullUrl
    hr = next(e for e in parse(with_patient("r4b_amended_reference_only", full_url="urn:uuid:7f1c",
                                            reference="urn:uuid:7f1c")).events if e.code == codes.HEART_RATE)
    assert hr.patient_id == "MRN-0001"


def test_an_encounter_subject_takes_the_mrn_of_the_patient_in_the_same_notification():
    events = parse(with_patient("r5_encounter_discharged")).events
    assert {e.patient_id for e in events} == {"MRN-0001"}


def test_a_subject_identifier_wins_over_a_patient_in_the_notification():
    bundle = json.loads(with_patient("r4b_amended_reference_only"))
    bundle["entry"][1]["resource"]["subject"]["identifier"] = {"value": "MRN-0042"}
    hr = next(e for e in parse(json.dumps(bundle).encode()).events if e.code == codes.HEART_RATE)
    assert hr.patient_id == "MRN-0042"


MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"  # the fixtures' MRN namespace (settings.mrn_system in production)
NATIONAL_ID = {"system": "urn:oid:2.16.840.1.113883.4.1", "value": "MRN-0042"}  # another namespace, same value


def parse_in(body: bytes, mrn_system: str | None = MRN_SYSTEM, **kwargs):
    return parse_notification(body, topic="t", partition=0, offset=0, mrn_system=mrn_system, **kwargs)


def with_subject(name: str, subject: dict, *, carry_patient: bool = False) -> bytes:
    bundle = json.loads(with_patient(name) if carry_patient else fhir_bundle(name))
    bundle["entry"][1]["resource"]["subject"] = subject
    return json.dumps(bundle).encode()


@pytest.mark.parametrize("name", ["r4b_amended_reference_only", "r5_encounter_discharged"])
def test_with_an_mrn_system_a_subject_identifier_of_another_system_is_not_the_mrn(name):
    """A national number (or an insurer's id) whose value is another patient's MRN merged the two patients: with
    WARDWATCH_MRN_SYSTEM it is no identifier at all, and the subject's Patient reference says whose it is."""
    subject = {"reference": "Patient/pt-e4f5d6254795", "identifier": NATIONAL_ID}
    # unset: taken for the MRN whatever its system (today's behaviour, documented)
    assert {e.patient_id for e in parse_in(with_subject(name, subject), None).events} == {"MRN-0042"}
    # set: the Patient the notification carries (MRN-0001 of MRN_SYSTEM) decides
    events = parse_in(with_subject(name, subject, carry_patient=True)).events
    assert events and {e.patient_id for e in events} == {"MRN-0001"}
    # ... else the FHIR server's read of that Patient, as for a subject without an identifier
    outcome = parse_in(with_subject(name, subject))
    assert isinstance(outcome, NeedsFetch) and outcome.patients == ("Patient/pt-e4f5d6254795",)
    assert outcome.rejection.reason is Reason.FHIR_SERVER_NOT_CONFIGURED
    # an identifier of the MRN's system is the MRN
    mrn = {"reference": "Patient/pt-e4f5d6254795", "identifier": {"system": MRN_SYSTEM, "value": "MRN-0042"}}
    assert {e.patient_id for e in parse_in(with_subject(name, mrn)).events} == {"MRN-0042"}


def test_with_an_mrn_system_a_subject_with_only_another_systems_identifier_is_missing_patient():
    r = parse_in(with_subject("r4b_amended_reference_only", {"identifier": NATIONAL_ID})).rejection
    assert r.reason is Reason.MISSING_PATIENT and "WARDWATCH_MRN_SYSTEM" in r.detail
    assert "MRN-0042" not in r.detail and "2.16.840.1.113883.4.1" not in r.detail
    # an identifier without a system is not of the MRN's system either
    r = parse_in(with_subject("r4b_amended_reference_only", {"identifier": {"value": "MRN-0042"}})).rejection
    assert r.reason is Reason.MISSING_PATIENT
    # with the operator's word that the server's Patient ids are the MRNs, the reference's id
    events = parse_in(with_subject("r4b_amended_reference_only", {"reference": "Patient/pt-9", "identifier": NATIONAL_ID}),
                      fhir_patient_ids_are_mrns=True).events
    assert {e.patient_id for e in events} == {"pt-9"}


def test_with_an_mrn_system_a_patients_mrn_is_its_identifier_typed_mr_of_that_system():
    """A Patient may carry several identifiers typed MR (one per facility or registry): the MRN is the one
    of the EHR's system, for its own facts and for the subjects it resolves."""
    bundle = json.loads(fhir_bundle("r4b_patient"))
    identifiers = bundle["entry"][1]["resource"]["identifier"]
    other_mr = {**identifiers[1], "system": "urn:oid:1.2.3.4.5", "value": "MRN-0042"}
    identifiers.insert(0, other_mr)  # first: without the setting, it is the MRN
    body = json.dumps(bundle).encode()
    assert {e.patient_id for e in parse_in(body, None).events} == {"MRN-0042"}
    assert {e.patient_id for e in parse_in(body).events} == {"MRN-0001"}
    # a reference-only subject resolved through that Patient in the same notification
    obs = json.loads(fhir_bundle("r4b_amended_reference_only"))
    obs["entry"].append({"fullUrl": "urn:uuid:7f1c", "resource": bundle["entry"][1]["resource"]})
    obs["entry"][1]["resource"]["subject"] = {"reference": "urn:uuid:7f1c"}
    assert {e.patient_id for e in parse_in(json.dumps(obs).encode()).events} == {"MRN-0001"}
    # typed MR of another system only: no MRN, dead-lettered saying which setting decides
    del identifiers[2]
    r = parse_in(json.dumps(bundle).encode()).rejection
    assert r.reason is Reason.MISSING_PATIENT and "WARDWATCH_MRN_SYSTEM" in r.detail and "MRN-0042" not in r.detail
    assert {e.patient_id for e in parse_in(json.dumps(bundle).encode(), None).events} == {"MRN-0042"}



# --- id-only payloads ----------------------------------------------------------------------------


def test_id_only_notification_asks_for_its_focus_resources():
    outcome = parse(fhir_bundle("r4b_id_only"))
    assert isinstance(outcome, NeedsFetch) and outcome.references == ("Observation/vs-hr-9",)
    # without a server it is simply a rejection that says what to set
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.FHIR_SERVER_NOT_CONFIGURED
    assert "WARDWATCH_FHIR_SERVER_URL" in outcome.rejection.detail


def test_r4_id_only_references_are_made_relative_in_focus_order():
    outcome = parse(fhir_bundle("r4_id_only_parameters"))
    assert isinstance(outcome, NeedsFetch)
    assert outcome.references == ("Encounter/enc-4d8ac7e31e96", "Patient/pt-e4f5d6254795")


def test_completed_id_only_notification_parses_like_the_full_resource_one():
    with_resource = complete_notification(fhir_bundle("r4b_id_only"),
                                          {"Observation/vs-hr-9": json.loads(fhir_bundle("server/Observation/vs-hr-9"))})
    assert parse(with_resource) == parse(fhir_bundle("r4b_full_resource_hr9"))
    (hr,) = parse(with_resource).events
    assert (hr.patient_id, hr.value, hr.fact_id) == ("MRN-0001", 112, "fhir:Observation/vs-hr-9:8867-4")


# --- deletes (a history entry DELETE without a resource) -----------------------------------------

DELETED_MS = 1_718_461_200_000  # 2024-06-15T14:20:00Z, the DELETE entries' response.lastModified
BP_SERVED = "server/Observation/vs-bp-1/_history"


def without_etag(name: str) -> bytes:
    bundle = json.loads(fhir_bundle(name))
    for entry in bundle["entry"]:
        entry.get("response", {}).pop("etag", None)
    return json.dumps(bundle).encode()


def deleting(reference: str) -> bytes:
    """r4b_delete_bp deleting `reference` instead (its focus too)."""
    bundle = json.loads(fhir_bundle("r4b_delete_bp"))
    bundle["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"] = reference
    bundle["entry"][1]["request"]["url"] = bundle["entry"][1]["fullUrl"] = reference
    return json.dumps(bundle).encode()


def test_a_delete_asks_for_the_version_before_it_not_for_the_gone_resource():
    outcome = parse(fhir_bundle("r4b_delete_bp"))  # deleted as version 2 (response.etag W/"2")
    assert isinstance(outcome, NeedsFetch) and outcome.references == ("Observation/vs-bp-1/_history/1",)
    assert outcome.priors == outcome.references  # a 410 for it is a failed read, not a delete of version 1
    assert outcome.rejection.reason is Reason.FHIR_SERVER_NOT_CONFIGURED  # without a server: dead-lettered
    # the delete's version unknown: the instance history, where fhir_fetch finds the version before it
    assert parse(without_etag("r4b_delete_bp")).references == ("Observation/vs-bp-1/_history",)


def test_a_completed_delete_retracts_exactly_the_facts_the_delivered_version_gave():
    delivered = [e for e in parsed("r4b_status_event").events if e.fact_id.startswith("fhir:Observation/vs-bp-1:")]
    completed = complete_notification(fhir_bundle("r4b_delete_bp"), {
        "Observation/vs-bp-1/_history/1": json.loads(fhir_bundle(f"{BP_SERVED}/1"))})
    outcome = parse(completed)
    assert isinstance(outcome, Parsed) and outcome.event_numbers == [40]
    retracted = {e.fact_id: e for e in outcome.events}
    assert set(retracted) == {e.fact_id for e in delivered} and len(delivered) == 2  # systolic and diastolic
    for fact in delivered:
        r = retracted[fact.fact_id]
        assert (r.status, r.value, r.value_text) == (Status.ENTERED_IN_ERROR, None, None)
        assert r.version == 2 > fact.version  # the delete's version: it supersedes the delivered one
        assert (r.patient_id, r.code, r.effective_ms, r.encounter_id) == (
            fact.patient_id, fact.code, fact.effective_ms, fact.encounter_id)
        assert r.issued_ms == DELETED_MS  # it became known when it was deleted


def test_update_and_delete_of_one_observation_in_one_notification_ends_retracted():
    # full-resource: the updated version 2 is carried, so the delete (version 3) needs no server
    outcome = parse(fhir_bundle("r4b_update_and_delete_bp"))
    assert isinstance(outcome, Parsed), outcome  # was internal_error (a KeyError on the DELETE entry)
    versions = {(e.code, e.version): e for e in outcome.events}
    assert sorted(versions) == [(codes.DIASTOLIC_BP, 2), (codes.DIASTOLIC_BP, 3),
                                (codes.SYSTOLIC_BP, 2), (codes.SYSTOLIC_BP, 3)]
    assert versions[codes.SYSTOLIC_BP, 2].value == 104  # the update ...
    assert all(e.status.retracts and e.value is None for (_, v), e in versions.items() if v == 3)  # ... retracted


@pytest.mark.parametrize("by", ["versionId", "lastUpdated"])
def test_an_update_and_a_delete_without_an_etag_retract_the_newest_carried_version_without_a_server(by):
    plain = parse(without_etag("r4b_update_and_delete_bp"))  # the delete's version unknown
    assert isinstance(plain, Parsed) and plain.events[-1].status.retracts, plain  # was no_fhir_server
    bundle = json.loads(without_etag("r4b_update_and_delete_bp"))
    older = json.loads(fhir_bundle(f"{BP_SERVED}/1"))  # also carried, listed last: the order does not decide
    bundle["entry"].append({"fullUrl": "https://ehr.example.org/fhir/Observation/vs-bp-1", "resource": older})
    if by == "lastUpdated":  # no versionIds: versions are lastUpdated ms
        for entry in bundle["entry"][1:]:
            entry.get("resource", {}).get("meta", {}).pop("versionId", None)
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Parsed), outcome  # was NeedsFetch: no_fhir_server without a server
    newest = max(e.version for e in outcome.events if not e.status.retracts)
    retracted = [e for e in outcome.events if e.status.retracts]
    assert sorted(e.code for e in retracted) == [codes.DIASTOLIC_BP, codes.SYSTOLIC_BP]
    assert all(e.value is None and e.version > newest for e in retracted)  # after the update: it ends retracted
    assert {e.version for e in retracted} == ({3} if by == "versionId" else {DELETED_MS})


def test_a_delete_whose_previous_version_is_not_carried_is_fetched_even_with_an_update():
    bundle = json.loads(fhir_bundle("r4b_update_and_delete_bp"))
    bundle["entry"][2]["response"]["etag"] = 'W/"4"'  # version 3 happened in between: it must be read
    assert parse(json.dumps(bundle).encode()).references == ("Observation/vs-bp-1/_history/3",)


def planned_encounter(period: dict | None) -> dict:
    """The served Encounter as it was before admission: planned, usually without a period.start yet."""
    enc = json.loads(fhir_bundle("server/Encounter/enc-4d8ac7e31e96"))
    planned = {k: v for k, v in enc.items() if k not in ("period", "location")}
    return {**planned, "status": "planned", "meta": {"versionId": "1", "lastUpdated": "2024-06-15T08:00:00Z"},
            **({"period": period} if period else {})}


@pytest.mark.parametrize("period", [None, {"start": "2024-06-16T09:00:00Z"}], ids=["no-start", "planned-start"])
def test_a_deleted_planned_encounter_is_skipped_like_its_updates_and_the_rest_is_read(period):
    bundle = json.loads(deleting("Encounter/enc-4d8ac7e31e96"))  # deleted as version 2
    hr = json.loads(fhir_bundle("server/Observation/vs-hr-9"))
    bundle["entry"].append({"fullUrl": "Observation/vs-hr-9", "resource": hr})
    completed = complete_notification(json.dumps(bundle).encode(),
                                      {"Encounter/enc-4d8ac7e31e96/_history/1": planned_encounter(period)})
    outcome = parse(completed)
    # was missing_time (no period.start), or retractions of an admission that never happened
    assert isinstance(outcome, Parsed), outcome
    assert [(e.code, e.value) for e in outcome.events] == [(codes.HEART_RATE, 112)]
    assert outcome.skipped == {"Encounter": 1}  # nobody was admitted: nothing to retract, counted as its updates


@pytest.mark.parametrize(("reference", "kind"), [("Condition/c-1", "Condition"), ("Widget/w-1", "other")])
def test_a_delete_of_a_type_wardwatch_does_not_map_is_skipped_and_counted_like_its_updates(reference, kind):
    outcome = parse(deleting(reference))
    assert isinstance(outcome, Ignored) and outcome.kind == kind  # nothing to fetch, nothing dead-lettered
    assert outcome.detail["skipped"] == {kind: 1} and outcome.detail["event_numbers"] == [40]


def test_a_delete_of_a_resource_versioned_by_last_updated_orders_after_it():
    prior = json.loads(fhir_bundle(f"{BP_SERVED}/1"))
    prior["meta"] = {"lastUpdated": "2024-06-15T14:07:00Z"}  # no versionId: versions are lastUpdated ms
    outcome = parse(complete_notification(without_etag("r4b_delete_bp"), {"Observation/vs-bp-1/_history": prior}))
    assert {e.version for e in outcome.events} == {DELETED_MS}  # the delete's time, after 14:07:00


def test_the_version_before_the_newest_delete_is_picked_from_the_history():
    v1, v2 = json.loads(fhir_bundle(f"{BP_SERVED}/1")), json.loads(fhir_bundle(f"{BP_SERVED}/2"))
    recreated = {**v2, "meta": {"versionId": "4"}}
    gone = {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"etag": 'W/"3"'}}
    history = {"resourceType": "Bundle", "type": "history",
               "entry": [{"resource": recreated}, gone, {"resource": v1}, {"resource": v2}]}
    assert version_before_delete(history, "Observation/vs-bp-1/_history") == v2  # not the re-created 4
    assert version_before_delete({**history, "entry": [{"resource": v1}, {"resource": v2}]},
                                 "Observation/vs-bp-1/_history") == v2
    assert version_before_delete({**history, "entry": [gone]}, "Observation/vs-bp-1/_history") is None


@pytest.mark.parametrize("delete", [
    {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"status": "204"}},
    {"fullUrl": "Observation/vs-bp-1", "response": {"status": "410 Gone"}},  # listed by its status only
], ids=["delete-request", "status-only"])
def test_without_delete_versions_the_version_listed_after_the_newest_delete_is_taken_not_a_re_creation(delete):
    v1, v2 = json.loads(fhir_bundle(f"{BP_SERVED}/1")), json.loads(fhir_bundle(f"{BP_SERVED}/2"))
    recreated = {**v2, "meta": {"versionId": "4"}}
    # newest first, as FHIR history is sorted: re-created as 4 after a delete that names no version
    history = {"resourceType": "Bundle", "type": "history",
               "entry": [{"resource": recreated}, delete, {"resource": v2}, {"resource": v1}]}
    assert version_before_delete(history, "Observation/vs-bp-1/_history") == v2  # was the live version 4
    assert gone_delete_entry("Observation/vs-bp-1", history)["resource"] == v2
    # deleted twice: the newest delete (the first listed) is the one
    older = [{"resource": {**v1, "meta": {"versionId": "1"}}}]
    twice = {**history, "entry": [delete, {"resource": recreated}, delete, {"resource": v2}, *older]}
    assert version_before_delete(twice, "Observation/vs-bp-1/_history") == recreated
    assert version_before_delete({**history, "entry": [{"resource": recreated}, delete]},
                                 "Observation/vs-bp-1/_history") is None  # nothing listed before the delete


@pytest.mark.parametrize("delete", [
    {"request": {"method": "DELETE", "url": "Observation/vs-bp-1/_history/3"},
     "response": {"status": "204", "etag": 'W/"3"', "lastModified": "2024-06-15T14:20:00Z"}},
    {"fullUrl": "Observation/vs-bp-1", "response": {"status": "410 Gone", "etag": 'W/"3"',
                                                    "lastModified": "2024-06-15T14:20:00Z"}},  # no request
], ids=["delete-request", "status-only"])
def test_a_gone_resource_becomes_the_delete_entry_of_the_version_before_its_newest_delete(delete):
    v1, v2 = json.loads(fhir_bundle(f"{BP_SERVED}/1")), json.loads(fhir_bundle(f"{BP_SERVED}/2"))
    history = {"resourceType": "Bundle", "type": "history", "entry": [delete, {"resource": v2}, {"resource": v1}]}
    entry = gone_delete_entry("Observation/vs-bp-1", history)
    assert entry == {"fullUrl": "Observation/vs-bp-1", "request": {"method": "DELETE", "url": "Observation/vs-bp-1"},
                     "response": {"etag": 'W/"3"', "lastModified": "2024-06-15T14:20:00Z"}, "resource": v2}
    # completed into an id-only notification, it retracts v2's facts at version 3, issued when deleted
    focus_only = json.loads(fhir_bundle("r4b_delete_bp"))  # its status entry: focus Observation/vs-bp-1
    focus_only["entry"] = focus_only["entry"][:1]
    assert parse(json.dumps(focus_only).encode()).references == ("Observation/vs-bp-1",)
    outcome = parse(complete_notification(json.dumps(focus_only).encode(), {}, {"Observation/vs-bp-1": entry}))
    assert sorted((e.code, e.version, e.issued_ms, e.status) for e in outcome.events) == [
        (codes.DIASTOLIC_BP, 3, DELETED_MS, Status.ENTERED_IN_ERROR), (codes.SYSTOLIC_BP, 3, DELETED_MS,
                                                                      Status.ENTERED_IN_ERROR)]
    assert gone_delete_entry("Observation/vs-bp-1", {**history, "entry": [delete]}) is None  # nothing before it


def test_a_version_read_answered_410_becomes_the_delete_entry_of_that_version():
    entry, prior = gone_version_delete("Observation/vs-bp-1/_history/3")
    assert prior == "Observation/vs-bp-1/_history/2"  # the vread of the version before the delete
    assert entry == {"fullUrl": "Observation/vs-bp-1", "response": {"etag": 'W/"3"'},
                     "request": {"method": "DELETE", "url": "Observation/vs-bp-1/_history/3"}}
    focus_only = json.loads(fhir_bundle("r4b_delete_bp"))
    focus_only["entry"] = focus_only["entry"][:1]
    focus_only["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"] = "Observation/vs-bp-1/_history/3"
    raw = json.dumps(focus_only).encode()
    assert parse(raw).references == ("Observation/vs-bp-1/_history/3",) and parse(raw).priors == ()
    v2 = json.loads(fhir_bundle(f"{BP_SERVED}/2"))
    outcome = parse(complete_notification(raw, {}, {"Observation/vs-bp-1/_history/3": {**entry, "resource": v2}}))
    notified_ms = DELETED_MS + 1_000  # no lastModified: issued at the notification's timestamp (14:20:01)
    assert sorted((e.code, e.version, e.issued_ms, e.status, e.value) for e in outcome.events) == [
        (codes.DIASTOLIC_BP, 3, notified_ms, Status.ENTERED_IN_ERROR, None),
        (codes.SYSTOLIC_BP, 3, notified_ms, Status.ENTERED_IN_ERROR, None)]
    # a version that is no number: read as a 410 of the resource itself (its history); unmapped: nothing read
    assert gone_version_delete("Observation/vs-bp-1/_history/v3")[1] == "Observation/vs-bp-1/_history"
    assert gone_version_delete("Condition/c-1/_history/2")[1] is None


def test_a_history_decides_once_it_lists_a_delete_and_a_version_before_it():
    v1, v2 = json.loads(fhir_bundle(f"{BP_SERVED}/1")), json.loads(fhir_bundle(f"{BP_SERVED}/2"))
    recreated = {"resource": {**v2, "meta": {"versionId": "4"}}}
    delete = {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"etag": 'W/"3"'}}
    untyped = {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"status": "204"}}

    def decides(*entries) -> bool:
        return history_decides({"resourceType": "Bundle", "entry": list(entries)}, "Observation/vs-bp-1/_history")

    assert not decides(delete)  # the version before it is on a later page
    assert decides(delete, {"resource": v2})
    assert not decides(recreated)  # the newest delete may be behind the re-created versions
    assert not decides(recreated, untyped)
    assert decides(recreated, untyped, {"resource": v2}) and decides(recreated, delete, {"resource": v1})
    assert not decides({"resource": v1}, {"resource": v2})  # no delete listed yet: read on


@pytest.mark.parametrize(("reference", "relative"), [
    ("Observation/vs-hr-9", "Observation/vs-hr-9"),
    ("https://ehr.example.org/fhir/Encounter/enc-1", "Encounter/enc-1"),
    ("https://ehr.example.org/fhir/Observation/o.1/_history/3", "Observation/o.1/_history/3"),
    ("urn:uuid:9a1c0e5e-0000-4000-8000-000000000001", None),
    ("#contained", None),
    ("Observation/../../admin", None),
    ("https://ehr.example.org/fhir/Observation/..", None),
])
def test_relative_reference(reference, relative):
    assert relative_reference(reference) == relative


# --- status only (the subscription watcher) -------------------------------------------------------


def test_read_status_gives_the_counters_and_the_servers_clock():
    status = read_status(fhir_bundle("r4_id_only_parameters"))
    assert status.subscription == SUBSCRIPTION and status.event_numbers == [48, 49]
    assert status.timestamp_ms == DAY_2024_06_15_MS + 16 * 3_600_000 + 2_000  # the later event, 16:00:02Z
    heartbeat = read_status(fhir_bundle("r4_heartbeat"))
    assert heartbeat.type == "heartbeat" and heartbeat.event_numbers == []


@pytest.mark.parametrize("raw", [None, b"", b"{", b"[]", b'{"resourceType": "Patient"}', b'{"resourceType": "Bundle"}'])
def test_read_status_of_unreadable_messages_is_none(raw):
    assert read_status(raw) is None


def with_counter(name: str, field: bytes, value: str) -> bytes:
    """The fixture with the first `field` counter (an R4B string) replaced by `value`."""
    body, before = fhir_bundle(name), b'"' + field + b'": "'
    start = body.index(before) + len(before)
    return body[:start] + value.encode() + body[body.index(b'"', start):]


@pytest.mark.parametrize(("name", "field", "value"), [
    ("r4b_handshake", b"eventsSinceSubscriptionStart", "100000000000000000000"),
    ("r4b_handshake", b"eventsSinceSubscriptionStart", "-1"),
    ("r4b_status_event", b"eventNumber", str(2**63)),
])
def test_counters_outside_the_int64_range_make_the_status_unreadable(name, field, value):
    body = with_counter(name, field, value)
    assert rejection_of(body).reason is Reason.INVALID_STRUCTURE
    assert read_status(body) is None  # the watcher counts it as unreadable
    largest = with_counter(name, field, str(2**63 - 1))
    assert not isinstance(parse(largest), Rejected) and read_status(largest) is not None


# --- skipped, ignored ----------------------------------------------------------------------------


def test_unused_codes_and_planned_encounters_are_skipped_but_counted():
    outcome = parsed("r4b_mixed")
    assert [e.code for e in outcome.events] == [codes.HEART_RATE]
    assert outcome.skipped == {"unmapped_code": 1, "Encounter": 1}


def test_a_registered_observation_is_skipped_and_counted_and_the_rest_is_read():
    """`registered`: ordered, no result yet. The subscriptions filter `Observation?`, so every lab order
    arrives so: nothing to score and nothing wrong. It used to dead-letter the whole notification, the
    vital signs in it included."""
    doc = json.loads(fhir_bundle("r4b_mixed"))
    [hr] = [e["resource"] for e in doc["entry"] if e.get("resource", {}).get("resourceType") == "Observation"
            and e["resource"]["code"]["coding"][0]["code"] == codes.HEART_RATE]
    ordered = {k: v for k, v in hr.items() if k != "valueQuantity"} | {
        "id": "lab-order-1", "status": "registered",
        "code": {"coding": [{"system": "http://loinc.org", "code": codes.LACTATE}]}}
    doc["entry"].append({"fullUrl": "Observation/lab-order-1", "resource": ordered})
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Parsed) and [e.code for e in outcome.events] == [codes.HEART_RATE]
    assert outcome.skipped == {"unmapped_code": 1, "Encounter": 1, "not_yet_resulted": 1}
    # with the heart rate only ordered too, it publishes nothing and is accounted for as ignored
    hr["status"] = "registered"
    del hr["valueQuantity"]
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"]["not_yet_resulted"] == 2


def test_notification_with_nothing_usable_is_ignored_but_keeps_its_event_numbers():
    outcome = parse(fhir_bundle("r4b_unmapped_only"))
    assert isinstance(outcome, Ignored)
    assert outcome.detail["event_numbers"] == [39, 40] and outcome.detail["subscription"] == SUBSCRIPTION


def test_resource_types_fhir_does_not_define_are_counted_as_other_so_counter_keys_stay_bounded():
    # skipped kinds become the ingest's counter keys (stats, /metrics, the stop log line)
    doc = json.loads(fhir_bundle("r4b_unmapped_only"))
    made_up = [{"fullUrl": f"urn:uuid:{i}", "resource": {"resourceType": f"Zz{i}", "id": "a"}} for i in range(1000)]
    known = {"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Condition", "id": "c"}}
    doc["entry"] += [*made_up, known]
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Ignored) and outcome.kind == "other"
    assert outcome.detail["skipped"] == {"unmapped_code": 1, "Encounter": 1, "Condition": 1, "other": 1000}


def test_a_resource_whose_type_is_not_a_string_is_counted_as_other_and_the_rest_is_read():
    # a list or object resourceType was an unhashable lookup key: an internal error for the whole bundle
    doc = json.loads(fhir_bundle("r4b_unmapped_only"))
    doc["entry"] += [{"fullUrl": "urn:uuid:x", "resource": {"resourceType": ["Observation"], "id": "a"}},
                     {"fullUrl": "urn:uuid:y", "resource": {"resourceType": {"x": 1}, "id": "b"}}]
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Ignored) and outcome.kind == "other"
    assert outcome.detail["skipped"] == {"unmapped_code": 1, "Encounter": 1, "other": 2}


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reason"), [
    ("heart_rate_5000", Reason.IMPLAUSIBLE_VALUE),
    ("negative_spo2", Reason.IMPLAUSIBLE_VALUE),
    ("invalid_resource", Reason.INVALID_RESOURCE),
    ("unknown_unit", Reason.UNKNOWN_UNIT),
    ("subject_not_patient", Reason.MISSING_PATIENT),
    ("missing_effective", Reason.MISSING_TIME),
    ("encounter_without_start", Reason.MISSING_TIME),
    ("r4b_id_only", Reason.NO_FHIR_SERVER),
    ("wrong_resource_type", Reason.INVALID_STRUCTURE),
    ("status_not_first", Reason.INVALID_STRUCTURE),
])
def test_bad_notifications_are_rejected_with_a_reason(name, reason):
    assert rejection(name).reason is reason


def test_invalid_resource_detail_names_the_field_not_the_value():
    r = rejection("invalid_resource")
    assert "effectiveDateTime" in r.detail and "yesterday" not in r.detail
    assert r.exception == "ValidationError"


def test_one_bad_observation_rejects_the_whole_notification():
    bundle = json.loads(fhir_bundle("r4b_status_event"))
    bundle["entry"][1]["resource"]["component"][0]["valueQuantity"]["value"] = 5000  # systolic
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.IMPLAUSIBLE_VALUE


@pytest.mark.parametrize("name", ["malformed.txt", "invalid_utf8.bin"])
def test_undecodable_bytes_are_malformed_json(name):
    outcome = parse(raw_file("fhir", name))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MALFORMED_JSON


def test_null_value_is_rejected():
    outcome = parse(None)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.INVALID_STRUCTURE


def test_every_fixture_yields_exactly_one_outcome():
    for name in fhir_names():
        assert isinstance(parse(fhir_bundle(name)), OUTCOMES), name


# --- never raises --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=15,
)


def _mutations():
    """Fixture bundles with one field replaced by arbitrary JSON: reaches the deep code paths."""
    names = [n for n in fhir_names() if n.startswith("r4")]
    return st.tuples(st.sampled_from(names), st.integers(0, 10_000), json_values)


@settings(max_examples=300, deadline=None)
@given(raw=st.none() | st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw):
    assert isinstance(parse(raw), OUTCOMES)


@settings(max_examples=300, deadline=None)
@given(mutation=_mutations())
def test_mutated_bundles_never_raise_and_never_hit_internal_errors(mutation):
    name, n, new = mutation
    doc = replace_nth_value(json.loads(fhir_bundle(name)), n, new)
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, OUTCOMES)
    if isinstance(outcome, Rejected):
        assert outcome.rejection.reason is not Reason.INTERNAL_ERROR, outcome


def test_an_encounter_known_only_by_the_servers_id_never_takes_a_visit_number():
    """HAPI numbers its Encounters 1, 2, 3...: Encounter/45 of patient MRN-0001, sent without an identifier,
    must not be keyed "45", the visit number the EHR (and so a CDC encounters row) gave another patient's stay,
    or its ward and discharge would be shown under that visit (the alert header, the encounters table)."""
    bundle = orjson.loads(fhir_bundle("r4b_encounter_transferred").replace(ENCOUNTER.encode(), b"45"))
    enc = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    assert enc["id"] == "45" and "identifier" not in enc
    events = parse(orjson.dumps(bundle), 1).events
    assert events and {e.encounter_id for e in events} == {"fhir:Encounter/45"}
    assert all(e.fact_id.startswith("fhir:Encounter:45:") for e in events)  # fact ids unchanged

    bundle = orjson.loads(fhir_bundle("r4b_status_event"))
    for entry in bundle["entry"][1:]:  # the reference alone, relative or absolute
        entry["resource"]["encounter"] = {"reference": "https://ehr.example.org/fhir/Encounter/45/_history/3"}
    observations = parse(orjson.dumps(bundle), 1).events
    assert observations and {e.encounter_id for e in observations} == {"fhir:Encounter/45"}


def test_the_ehr_visit_number_names_the_encounter_when_the_server_sends_it():
    """A FHIR server's resource ids are its own; the CDC rows carry the EHR's visit number. Both
    planes must agree on one encounter key, so an identifier wins over the resource id."""
    bundle = orjson.loads(fhir_bundle("r4b_encounter_transferred"))
    enc = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    enc["identifier"] = [{"system": "urn:hospital:visit-number", "value": "ENC-MRN-0001-77"}]
    events = parse(orjson.dumps(bundle), 1).events
    assert {e.encounter_id for e in events} == {"ENC-MRN-0001-77"}
    assert all(e.fact_id.startswith(f"fhir:Encounter:{ENCOUNTER}:") for e in events)  # the fact stays the resource's

    bundle = orjson.loads(fhir_bundle("r4b_status_event"))
    for entry in bundle["entry"][1:]:
        entry["resource"]["encounter"] = {"reference": "Encounter/enc-server-id",
                                          "identifier": {"value": "ENC-MRN-0001-77"}}
    observations = parse(orjson.dumps(bundle), 1).events
    assert observations and {e.encounter_id for e in observations} == {"ENC-MRN-0001-77"}


# --- a version carrying no mapped code still replaces its resource's facts (rule 6) ----------------

ABSENT = {"dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                           "code": "error"}]}}
UNMAPPED = {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}]}


def heart_rate_observation(version: str | None, **changes) -> bytes:
    """r4_parameters_event's heart rate (Observation/vs-hr-1) as version `version` (None: no versionId), with
    `changes` (a key set to None is removed)."""
    doc = json.loads(fhir_bundle("r4_parameters_event"))
    obs = doc["entry"][1]["resource"]
    obs["meta"] = {"lastUpdated": "2024-06-15T15:00:00Z", **({"versionId": version} if version else {})}
    obs.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del obs[key]
    return json.dumps(doc).encode()


def assert_marker(outcome, version: int, why: str, status: Status = Status.ENTERED_IN_ERROR):
    assert isinstance(outcome, Parsed), outcome
    (m,) = outcome.events
    assert (m.code, m.code_system, m.fact_id) == (codes.VERSION_MARK, codes.VERSION_MARKS,
                                                   f"fhir:Observation/vs-hr-1:{codes.VERSION_MARK}")
    assert (m.version, m.value, m.status, m.version_codes) == (version, None, status, ())
    assert m.patient_id == "MRN-0001" and m.effective_ms == EFFECTIVE_MS
    assert m.issued_ms == 1_718_463_600_000  # a later version: known from when the server stored it (15:00Z)
    assert m.provenance["version_marker"] == why and m.provenance["resource"] == "Observation/vs-hr-1"
    return m


def test_a_later_version_recoded_to_an_unmapped_code_is_a_version_marker():
    """v1 a heart rate, v2 the same resource recoded (the nurse picked the wrong code and the EHR corrected it)
    to a code wardwatch does not map. It gave no event, so the heart rate stayed live; now its marker carries
    'version 2 holds none of the mapped codes', which retracts it downstream (docs/patient-state.md rule 6)."""
    outcome = parse(heart_rate_observation("2", code=UNMAPPED))
    assert_marker(outcome, 2, "unmapped_code")
    assert outcome.skipped == {"unmapped_code": 1}  # still counted as an unmapped Observation
    # cancelled as well as recoded: the same marker (the cancelled status only retracts)
    m = assert_marker(parse(heart_rate_observation("3", code=UNMAPPED, status="cancelled")), 3, "unmapped_code")
    assert m.provenance["fhir_status"] == "cancelled"
    # without a versionId the version cannot be told: it may replace one, by lastUpdated
    assert_marker(parse(heart_rate_observation(None, code=UNMAPPED)), 1_718_463_600_000, "unmapped_code")
    # version 1 (most unmapped labs): no earlier version to replace, so nothing new on the canonical topic
    outcome = parse(heart_rate_observation("1", code=UNMAPPED))
    assert isinstance(outcome, Ignored) and outcome.kind == "unmapped_code"
    assert outcome.detail["skipped"] == {"unmapped_code": 1}
    # an unmapped Observation is no reason to dead-letter a notification: one that is not valid gives no
    # marker, and is skipped as before
    for broken in ({"status": "unknown"}, {"subject": None}, {"effectiveDateTime": None}):
        outcome = parse(heart_rate_observation("2", code=UNMAPPED, **broken))
        assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"unmapped_code": 1}, broken


def test_a_later_version_whose_value_is_absent_is_a_version_marker():
    # v2 amended with a dataAbsentReason "error" instead of the value: the value stands withdrawn
    outcome = parse(heart_rate_observation("2", status="amended", valueQuantity=None, **ABSENT))
    assert_marker(outcome, 2, "no_value")
    assert outcome.skipped == {"no_value": 1}
    # version 1 without a value: nothing, as before
    assert isinstance(parse(heart_rate_observation("1", valueQuantity=None, **ABSENT)), Ignored)


def test_a_later_gcs_version_without_a_total_or_its_three_components_is_a_version_marker():
    doc = json.loads(gcs({"component": [gcs_part(EYE, {"valueInteger": 2}), gcs_part(MOTOR, {"valueInteger": 5})]}))
    doc["entry"][1]["resource"]["meta"]["versionId"] = "2"
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Parsed) and outcome.skipped == {"gcs_incomplete": 1}
    (m,) = outcome.events
    assert (m.code, m.fact_id, m.version, m.version_codes) == (
        codes.VERSION_MARK, f"fhir:Observation/gcs-1:{codes.VERSION_MARK}", 2, ())
    assert m.provenance["version_marker"] == "no_value"


def test_a_later_bp_panel_version_without_its_pressures_is_a_no_value_marker():
    # the panel's code is mapped (its components carry the values): a version without them holds no value,
    # which its marker says (not "unmapped_code", which would send an operator looking at the coding)
    doc = json.loads(fhir_bundle("r4b_status_event"))
    bp = doc["entry"][1]["resource"]
    bp["meta"]["versionId"] = "2"
    del bp["component"]
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Parsed), outcome
    (m,) = [e for e in outcome.events if e.fact_id.startswith("fhir:Observation/vs-bp-1:")]
    assert (m.code, m.fact_id, m.version) == (codes.VERSION_MARK, f"fhir:Observation/vs-bp-1:{codes.VERSION_MARK}", 2)
    assert m.provenance["version_marker"] == "no_value"


def test_a_version_marker_with_no_time_to_check_against_is_not_made():
    """A later unmapped version with neither `issued`, meta.lastUpdated, a notification timestamp nor a record
    time: its effective time was checked against itself, so a 2099 typo gave a marker, accepted downstream as a
    new fact, moving the patient's clock 75 years ahead (every later reading late). A mapped version is
    dead-lettered missing_time there; an unmapped one gives no marker and is skipped, as before."""
    for effective in ("2099-06-15T14:06:36Z", "2024-06-15T14:06:36Z"):
        doc = json.loads(_without_server_time(effective))
        obs = doc["entry"][1]["resource"]
        obs.update(meta={"versionId": "2"}, code=UNMAPPED)
        outcome = parse(json.dumps(doc).encode())
        assert isinstance(outcome, Parsed) and outcome.skipped == {"unmapped_code": 1}
        assert not [e for e in outcome.events if e.code == codes.VERSION_MARK], effective
        # with the record's time (the ingest worker's usual case) the 2024 version still gives its marker
        received = parse_notification(json.dumps(doc).encode(), topic="t", partition=0, offset=0,
                                      received_ms=EFFECTIVE_MS + 60_000)
        assert [e.code for e in received.events if e.code == codes.VERSION_MARK] == (
            [] if effective.startswith("2099") else [codes.VERSION_MARK])


def test_a_reading_taken_in_a_leap_second_is_ingested_as_second_59():
    """FHIR dateTime and instant allow seconds 60 (2016-12-31T23:59:60Z happened); it was dead-lettered as
    not an ISO-8601 date-time. Read as 23:59:59, as java.time's ISO_INSTANT parses it."""
    doc = json.loads(fhir_bundle("r4b_full_resource_hr9"))
    obs = doc["entry"][1]["resource"]
    obs["effectiveDateTime"] = "2016-12-31T23:59:60.5Z"
    obs["issued"] = obs["meta"]["lastUpdated"] = "2017-01-01T00:00:10Z"
    outcome = parse(json.dumps(doc).encode())
    assert isinstance(outcome, Parsed), outcome
    (event,) = outcome.events
    assert event.effective_ms == 1_483_228_799_500 and event.value == 112  # 2016-12-31T23:59:59.5Z


# --- subjects a reviewer's hostile inputs read wrongly ---------------------------------------------

MR_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def heart_rate_with(**changes) -> bytes:
    bundle = json.loads(fhir_bundle("r4b_full_resource_hr9"))
    observation = bundle["entry"][1]["resource"]
    for key, value in changes.items():
        if value is None:
            observation.pop(key, None)
        else:
            observation[key] = value
    return json.dumps(bundle).encode()


def test_a_contained_patient_subject_is_keyed_by_its_mrn():
    """subject "#p" names the Patient the Observation contains: its MRN is the patient, as a Patient the
    notification carries is read (the identifier typed MR, of WARDWATCH_MRN_SYSTEM when that is set)."""
    contained = [{"resourceType": "Patient", "id": "p", "identifier": [
        {"system": "urn:oid:other", "type": MR_TYPE, "value": "MRN-OTHER"},
        {"system": MRN_SYSTEM, "type": MR_TYPE, "value": "MRN-0077"}]}]
    body = heart_rate_with(subject={"reference": "#p"}, contained=contained)
    assert {e.patient_id for e in parse(body).events} == {"MRN-OTHER"}  # no mrn_system: the first typed MR
    assert {e.patient_id for e in parse_in(body).events} == {"MRN-0077"}  # of the MRN system
    # without an MRN: missing_patient saying so; its local id is never a patient key, whatever the setting
    without = heart_rate_with(subject={"reference": "#p"}, contained=[{"resourceType": "Patient", "id": "p"}])
    outcome = parse_in(without, fhir_patient_ids_are_mrns=True)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_PATIENT
    assert "contained Patient without an identifier typed MR" in outcome.rejection.detail
    # "#q" that the Observation does not contain
    outcome = parse(heart_rate_with(subject={"reference": "#q"}, contained=contained))
    assert isinstance(outcome, Rejected) and "does not contain" in outcome.rejection.detail


def test_a_urn_uuid_subject_not_in_the_notification_says_so():
    outcome = parse(heart_rate_with(subject={"reference": "urn:uuid:9a1c0e5e-0000-4000-8000-000000000001"}))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_PATIENT
    assert "in the notification" in outcome.rejection.detail and "not a Patient" not in outcome.rejection.detail


def test_an_effective_period_without_a_start_is_missing_time_saying_so():
    """FHIR Period: a missing start is not known; the end alone would place a reading that may span hours
    in another window than the same reading sent with its start. Dead-lettered, with a detail that says why."""
    outcome = parse(heart_rate_with(effectiveDateTime=None, effectivePeriod={"end": "2024-06-15T14:06:00Z"}))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_TIME
    assert "effectivePeriod has no start" in outcome.rejection.detail


def test_a_number_beyond_64_bits_is_a_bad_value_not_undecodable_bytes():
    """Valid JSON that orjson cannot hold (a number past a 64-bit float) is not "not UTF-8 JSON"."""
    body = heart_rate_with().replace(b'"value": 112', b'"value": 1' + b"0" * 400)
    outcome = parse(body)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.BAD_VALUE
    assert "64-bit" in outcome.rejection.detail and "UTF-8" not in outcome.rejection.detail


@pytest.mark.parametrize("number", ["٣٢", "3_2", "+32"])
def test_an_event_number_in_other_digits_is_not_read(number):
    """int() reads "3_2" and any script's digits as 32: a counter the watcher would take for event 32.
    (A resource's numbers never get that far: FHIR validation refuses such a value or versionId.)"""
    bundle = json.loads(fhir_bundle("r4b_full_resource_hr9"))
    bundle["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"] = number
    outcome = parse(json.dumps(bundle).encode())
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.INVALID_STRUCTURE
