import random

import orjson
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from schemas.alert import (MRN_TYPE, STALE_AFTER_MS, VISIT_NUMBER_TYPE, build_alert, fhir_datetime, format_age, iso_utc,
                          stale_readings)
from schemas.canonical import make_event_id
from streams.alerting import AlertDecision

T = 1_704_096_000_000  # 2024-01-01T08:00:00Z
MIN, HOUR = 60_000, 3_600_000
# [fact_id, version, preliminary code or None, taken_ms] (streams.patient_agent._basis)
BASIS = [["fhir:Observation/vs-bp-1:8480-6", 2, None, T - 14 * HOUR - 44 * MIN], ["cdc:vital_signs:42:8867-4", 7, None, T]]
RATIONALE = [{"feature": "resp_rate_last_24h", "value": 26.0, "contribution": 1.4},
             {"feature": "spo2_last_24h", "value": 91.0, "contribution": 0.9}]


def decision(kind="open", tier="high", scoring_ms=T):
    return AlertDecision(alert_id="3f2c9a52-6a3e-5d7e-8a1b-0c4d5e6f7a8b", kind=kind, tier=tier, episode=1,
                         scoring_ms=scoring_ms)


def model_alert(**changes):
    args = dict(patient_id="p-17", encounter_id="enc-9", probability=0.8123, news2=6, model_version="2024-01-01.1",
                path="model", rationale=RATIONALE, basis=BASIS)
    args.update(changes)
    return build_alert(decision(), **args)


def test_model_alert_is_a_valid_risk_assessment():
    alert = model_alert()
    resource = alert["resource"]
    RiskAssessment.model_validate(resource)
    assert resource["resourceType"] == "RiskAssessment"
    assert resource["id"] == "3f2c9a52-6a3e-5d7e-8a1b-0c4d5e6f7a8b"  # the alert id: consumers upsert by it
    assert resource["status"] == "final"
    assert resource["subject"] == {"type": "Patient", "identifier": {"type": MRN_TYPE, "value": "p-17"}}
    assert resource["encounter"] == {"type": "Encounter", "identifier": {"type": VISIT_NUMBER_TYPE, "value": "enc-9"}}
    assert resource["occurrenceDateTime"] == "2024-01-01T08:00:00Z"
    assert resource["method"] == {"text": "wardwatch model 2024-01-01.1"}
    # the FHIR reading's Observation version; the database reading's table row; both the canonical event id;
    # each says when it was taken, and how long before this assessment
    assert resource["basis"] == [
        {"reference": "Observation/vs-bp-1/_history/2",
         "identifier": {"system": "urn:wardwatch:canonical-event",
                        "value": make_event_id("fhir:Observation/vs-bp-1:8480-6", 2)},
         "display": "systolic BP (LOINC 8480-6), taken 2023-12-31T17:16:00Z, 14 h 44 min before this assessment"},
        {"identifier": {"system": "urn:wardwatch:canonical-event", "value": make_event_id("cdc:vital_signs:42:8867-4", 7)},
         "display": "EHR vital_signs row 42, LOINC 8867-4 (heart rate), taken 2024-01-01T08:00:00Z, "
                    "less than 1 min before this assessment"}]


def test_prediction_carries_probability_risk_horizon_and_rationale():
    [prediction] = model_alert()["resource"]["prediction"]
    assert prediction["outcome"] == {"text": "clinical deterioration"}
    assert prediction["probabilityDecimal"] == pytest.approx(0.8123)
    assert prediction["qualitativeRisk"]["coding"][0]["system"] == \
        "http://terminology.hl7.org/CodeSystem/risk-probability"
    assert prediction["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert prediction["whenPeriod"] == {"start": "2024-01-01T08:00:00Z", "end": "2024-01-01T20:00:00Z"}
    assert "resp_rate_last_24h=26" in prediction["rationale"] and "spo2_last_24h=91" in prediction["rationale"]
    assert "NEWS2 6" in prediction["rationale"]


def test_horizon_is_configurable():
    alert = build_alert(decision(), patient_id="p", encounter_id=None, probability=0.6, news2=None, model_version="v",
                        path="model", rationale=[], basis=[], horizon_h=4)
    assert alert["resource"]["prediction"][0]["whenPeriod"]["end"] == "2024-01-01T12:00:00Z"


def test_header_routes_without_parsing_the_resource():
    assert model_alert(ward="ICU-3")["header"] == {
        "alert_id": "3f2c9a52-6a3e-5d7e-8a1b-0c4d5e6f7a8b", "kind": "open", "tier": "high", "patient_id": "p-17",
        "encounter_id": "enc-9", "ward": "ICU-3", "scoring_ms": T, "model_version": "2024-01-01.1", "path": "model",
        "status": "final", "original_alert_id": None, "reason": None, "preliminary_basis": [],
        "incomplete_news2": []}


# a preliminary reading's basis entry adds its code (streams.patient_agent._basis)
PRELIMINARY_BASIS = [["fhir:Observation/lab-7:2524-7", 1, "2524-7", T - 2 * HOUR], ["cdc:lab_results:9:2160-0", 4, "2160-0",
                                                                                   T - 90 * MIN],
                     ["cdc:vital_signs:42:8867-4", 7, None, T - 5 * MIN]]


def test_an_alert_on_preliminary_results_says_so_in_header_basis_and_note():
    alert = model_alert(basis=PRELIMINARY_BASIS)
    assert alert["header"]["preliminary_basis"] == ["2524-7", "2160-0"]  # routing: filter without the resource
    resource = alert["resource"]
    RiskAssessment.model_validate(resource)
    assert [b.get("display") for b in resource["basis"]] == [
        "lactate (LOINC 2524-7), preliminary result, taken 2024-01-01T06:00:00Z, 2 h before this assessment",
        "EHR lab_results row 9, LOINC 2160-0 (creatinine, preliminary result), taken 2024-01-01T06:30:00Z, "
        "1 h 30 min before this assessment",
        "EHR vital_signs row 42, LOINC 8867-4 (heart rate), taken 2024-01-01T07:55:00Z, "
        "5 min before this assessment"]  # the final reading is not flagged
    assert resource["basis"][0]["reference"] == "Observation/lab-7/_history/1"
    assert resource["note"] == [{"text": "Based on preliminary results, which may change when final: "
                                         "lactate (LOINC 2524-7), creatinine (LOINC 2160-0)."}]


def test_an_alert_on_final_results_is_not_flagged():
    alert = model_alert(basis=[[fact_id, version, None, taken] for fact_id, version, _, taken in PRELIMINARY_BASIS])
    assert alert["header"]["preliminary_basis"] == []
    assert "note" not in alert["resource"]
    assert "preliminary" not in orjson.dumps(alert["resource"]).decode()


def test_ward_routes_in_the_header_and_stays_out_of_the_resource():
    alert = model_alert(ward="Ward 7B")
    assert "Ward 7B" not in str(alert["resource"])


@pytest.mark.parametrize("status", ["amended", "entered-in-error"])
def test_a_correction_is_published_under_the_corrected_alerts_id(status):
    original = "3f2c9a52-6a3e-5d7e-8a1b-0c4d5e6f7a8b"
    correction = AlertDecision(alert_id="0e0e0e0e-1111-5222-8333-444444444444", kind="correction", tier="high",
                               episode=1, scoring_ms=T, status=status, original_alert_id=original)
    alert = build_alert(correction, patient_id="p-17", encounter_id="enc-9", probability=0.75, news2=None,
                        model_version="v2", path="model", rationale=RATIONALE, basis=[["fhir:Observation/vs-hr-1:8867-4", 3]])
    RiskAssessment.model_validate(alert["resource"])
    assert alert["resource"]["id"] == original  # consumers upserting by id see the alert change status
    assert alert["resource"]["status"] == status
    assert alert["header"]["alert_id"] == correction.alert_id  # the message's own id, for dedupe
    assert (alert["header"]["kind"], alert["header"]["original_alert_id"]) == ("correction", original)


def test_rule_alert_has_no_probability():
    alert = build_alert(decision(tier="medium"), patient_id="p-17", encounter_id=None, probability=None, news2=5,
                        model_version=None, path="rule", rationale=[], basis=[])
    resource = alert["resource"]
    RiskAssessment.model_validate(resource)
    assert resource["method"] == {"text": "NEWS2 rule"}
    assert "probabilityDecimal" not in resource["prediction"][0]
    assert resource["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "moderate"
    assert resource["prediction"][0]["rationale"] == "NEWS2 5"
    assert "encounter" not in resource and "basis" not in resource


def test_a_rule_alert_without_a_full_news2_says_its_tier_is_not_a_complete_news2():
    """The rule path alerts on the parameters charted when one was not (a single 3, or their sum): the
    resource must not read as a full NEWS2 whose value was merely left out."""
    reasons = [{"feature": "spo2_last_24h", "value": 91.1, "contribution": 3.0}]
    partial = build_alert(decision(tier="high"), patient_id="p-17", encounter_id=None, probability=None, news2=None,
                          model_version=None, path="rule", rationale=reasons, basis=[])["resource"]
    assert partial["prediction"][0]["rationale"] == (
        "top contributing features: spo2_last_24h=91.1; NEWS2 incomplete (not every parameter charted in the last "
        "24 h): tier from the parameters charted, NEWS2 is at least their sum")
    assert orjson.dumps(partial) == fhir_dump(partial)
    full = build_alert(decision(tier="high"), patient_id="p-17", encounter_id=None, probability=None, news2=7,
                       model_version=None, path="rule", rationale=reasons, basis=[])["resource"]
    assert "incomplete" not in full["prediction"][0]["rationale"]
    assert "incomplete" not in model_alert(news2=None)["resource"]["prediction"][0]["rationale"]


@pytest.mark.parametrize("tier, code", [("none", "negligible"), ("low", "low"), ("medium", "moderate"),
                                        ("high", "high")])
def test_tier_maps_to_risk_probability(tier, code):
    alert = build_alert(decision(kind="resolve", tier=tier), patient_id="p", encounter_id="e", probability=0.1,
                        news2=0, model_version="v", path="model", rationale=[], basis=[])
    assert alert["resource"]["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == code
    assert alert["header"]["kind"] == "resolve"


@pytest.mark.parametrize("reason, says", [(None, "back below the alerting line"), ("discharge", "discharged")])
def test_a_resolution_says_in_the_resource_that_it_ends_the_episode_not_that_the_risk_is_high(reason, says):
    """A consumer that stores the resources (upsert by id) and never reads the header must not see a
    resolution, which carries the last score (here high), as one more high-risk assessment."""
    resolve = AlertDecision(alert_id="9d9d9d9d-1111-5222-8333-444444444444", kind="resolve", tier="high",
                            episode=1, scoring_ms=T, reason=reason)
    resource = build_alert(resolve, patient_id="p", encounter_id="e", probability=0.93, news2=8,
                           model_version="v", path="model", rationale=[], basis=[])["resource"]
    RiskAssessment.model_validate(resource)
    [note] = resource["note"]
    assert note["text"].startswith("Resolution, not a new alert") and says in note["text"]
    assert "earlier wardwatch alerts no longer stand" in note["text"]
    assert orjson.dumps(resource) == fhir_dump(resource)
    # an alert has no such note
    assert "note" not in model_alert()["resource"]


@pytest.mark.parametrize("probability", [1.5, -0.1, float("nan")])
def test_impossible_probability_is_refused(probability):
    with pytest.raises(ValueError):
        model_alert(probability=probability)


def test_no_names_or_other_identifiers_beyond_the_ids():
    resource = model_alert()["resource"]

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    # the patient and the stay by the ids the header carries (MRN, visit number), nothing else of the person
    assert resource["subject"]["identifier"]["value"] == "p-17" and "display" not in resource["subject"]
    assert resource["encounter"]["identifier"]["value"] == "enc-9" and "display" not in resource["encounter"]
    assert not {"name", "birthDate", "identifier", "contained"} & set(
        keys({**resource, "basis": None, "subject": None, "encounter": None}))
    # the basis identifies readings, not people: canonical event ids only
    assert {b["identifier"]["system"] for b in resource["basis"]} == {"urn:wardwatch:canonical-event"}
    assert not {"name", "birthDate", "contained"} & set(keys(resource["basis"]))


# --- the resource is published exactly as the FHIR model serialises it ----------------------------


def fhir_dump(resource: dict) -> bytes:
    """What publishing the model's own serialisation would write (what build_alert did before it built
    the serialised form directly)."""
    return orjson.dumps(RiskAssessment.model_validate(resource).model_dump(mode="json", exclude_none=True))


@pytest.mark.parametrize("status, original", [("final", None), ("amended", "orig-1"), ("entered-in-error", "orig-1")])
@pytest.mark.parametrize("path, probability", [("model", 0.0), ("model", 0.8123), ("model", 0.123456789),
                                               ("model", 1.0), ("model", 1 / 3), ("rule", None)])
@pytest.mark.parametrize("encounter_id, basis, rationale, news2", [
    ("enc-9", BASIS, RATIONALE, 6), (None, [], [], None), ("", [["fhir:Observation/o:8867-4", 1]], [], 0),
    ("e", [], RATIONALE, None), ("enc-9", PRELIMINARY_BASIS, RATIONALE, 6), ("fhir:Encounter/45", [], [], 6)])
@pytest.mark.parametrize("scoring_ms", [T, T + 1, T + 10, T + 250, T + 999, 1_718_417_760_123])
def test_the_resource_is_byte_for_byte_the_fhir_models_own_serialisation(status, original, path, probability,
                                                                          encounter_id, basis, rationale, news2,
                                                                          scoring_ms):
    d = AlertDecision(alert_id="3f2c9a52-6a3e-5d7e-8a1b-0c4d5e6f7a8b", kind="correction" if original else "open",
                      tier="high", episode=1, scoring_ms=scoring_ms, status=status, original_alert_id=original)
    resource = build_alert(d, patient_id="p-17", encounter_id=encounter_id, probability=probability, news2=news2,
                           model_version="v2", path=path, rationale=rationale, basis=basis)["resource"]
    assert orjson.dumps(resource) == fhir_dump(resource)


def test_an_encounter_keyed_by_the_fhir_servers_id_is_named_so_and_referenced_as_that_encounter():
    """schemas.fhir keys an Encounter sent without an identifier "fhir:Encounter/<server id>": the header says
    so (a consumer must not look "45" up as a visit number: another patient's stay may have it), and the
    resource references the server's Encounter itself; "Encounter/fhir:Encounter/45" would be no FHIR id."""
    alert = model_alert(encounter_id="fhir:Encounter/45")
    assert alert["header"]["encounter_id"] == "fhir:Encounter/45"
    assert alert["resource"]["encounter"] == {"reference": "Encounter/45"}
    RiskAssessment.model_validate(alert["resource"])


def test_the_patient_and_a_visit_number_are_named_by_identifier_not_as_the_fhir_servers_resources_of_that_id():
    """wardwatch keys a patient by MRN and a stay by the EHR's visit number (schemas.fhir): neither is the FHIR
    server's resource id (HAPI numbers them 1, 2, 3...). "Patient/<MRN>" is the server's Patient of that id,
    maybe another patient: a ward app resolving the subject would show this high risk under that one's name.
    So both are logical references (identifier typed MR / VN, of WARDWATCH_MRN_SYSTEM when set)."""
    alert = model_alert(patient_id="12", encounter_id="7", mrn_system="urn:oid:2.16.840.1.113883.19.5")
    resource = alert["resource"]
    RiskAssessment.model_validate(resource)
    assert "reference" not in resource["subject"] and "reference" not in resource["encounter"]
    assert resource["subject"] == {"type": "Patient", "identifier": {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                             "display": "Medical record number"}]},
        "system": "urn:oid:2.16.840.1.113883.19.5", "value": "12"}}
    assert resource["encounter"]["identifier"]["value"] == "7"
    assert resource["encounter"]["identifier"]["type"]["coding"][0]["code"] == "VN"
    assert orjson.dumps(resource) == fhir_dump(resource)
    # a facade whose Patient ids are the MRNs (WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS): that Patient is the patient
    facade = model_alert(patient_id="12", patient_ids_are_fhir_ids=True)["resource"]
    assert facade["subject"] == {"reference": "Patient/12"}


def test_fhir_datetime_is_how_the_model_writes_an_iso_utc_time():
    rng = random.Random(5)
    times = [0, 1, T, T + 1, T + 999] + [rng.randrange(946_684_800_000, 4_102_444_800_000) for _ in range(2000)]
    for ms in times:  # 2000-01-01 .. 2100-01-01, any millisecond
        dumped = RiskAssessment.model_validate({"resourceType": "RiskAssessment", "status": "final",
                                                "subject": {"reference": "Patient/p"},
                                                "occurrenceDateTime": iso_utc(ms)}).model_dump(mode="json")
        assert fhir_datetime(ms) == dumped["occurrenceDateTime"], ms


# --- how old the readings are (a nurse must tell a fresh deterioration from a value never rechecked) -------


@pytest.mark.parametrize("ms, words", [(0, "less than 1 min"), (59_999, "less than 1 min"), (MIN, "1 min"),
                                       (59 * MIN + 59_999, "59 min"), (4 * HOUR, "4 h"),
                                       (14 * HOUR + 44 * MIN + 30_000, "14 h 44 min"), (25 * HOUR + MIN, "25 h 1 min")])
def test_format_age(ms, words):
    assert format_age(ms) == words


# NEWS2 inputs (schemas.features) of a rule-path point: SBP 85 (3), RR 22 (2), on oxygen (2), HR 95 (1), 37 degC (0)
FEATURES = {"resp_rate_last_24h": 22.0, "spo2_last_24h": 96.0, "on_oxygen": 1, "systolic_bp_last_24h": 85.0,
            "heart_rate_last_24h": 95.0, "consciousness_last_24h": 0.0, "temperature_last_24h": 37.0,
            "lactate_last_24h": 4.1, "heart_rate_max_6h": 120.0, "news2": 8, "news2_resp_rate": 2, "news2_spo2": 0,
            "news2_air_or_oxygen": 2, "news2_systolic_bp": 3, "news2_pulse": 1, "news2_consciousness": 0,
            "news2_temperature": 0}


def test_stale_readings_are_the_scoring_parameters_and_top_features_on_readings_over_4_h_old():
    taken = {"8480-6": T - 14 * HOUR, "9279-1": T - 10 * MIN, "59408-5": T - 5 * HOUR, "8867-4": T - STALE_AFTER_MS,
             "8310-5": T - 20 * HOUR, "2524-7": T - 9 * HOUR, "80288-4": T - 20 * HOUR}
    rationale = [{"feature": "systolic_bp_last_24h", "value": 85.0, "contribution": 3.0},
                 {"feature": "lactate_last_24h", "value": 4.1, "contribution": 0.8},
                 {"feature": "heart_rate_max_6h", "value": 120.0, "contribution": 0.5}]
    assert stale_readings(FEATURES, rationale, taken.get, T) == [
        ["on_oxygen", 1.0, T - 5 * HOUR],  # air or oxygen is read at the SpO2's round, 5 h old
        ["systolic_bp_last_24h", 85.0, T - 14 * HOUR],
        ["lactate_last_24h", 4.1, T - 9 * HOUR]]  # a top feature, though no NEWS2 input
    # not said: RR (fresh), HR (exactly 4 h: not older), temperature and consciousness (old, but 0 points),
    # the 6 h maximum (several readings: their basis entries carry each one's time)


def test_the_rationale_says_each_old_reading_in_plain_words_for_every_kind_of_alert():
    stale = [["systolic_bp_last_24h", 85.0, T - 14 * HOUR - 44 * MIN], ["on_oxygen", 1.0, T - 5 * HOUR],
             ["consciousness_last_24h", 2.0, T - 6 * HOUR]]
    for kind in ("open", "escalate", "resolve", "correction"):
        d = AlertDecision(alert_id="a", kind=kind, tier="medium", episode=1, scoring_ms=T,
                          status="amended" if kind == "correction" else "final",
                          original_alert_id="o" if kind == "correction" else None)
        resource = build_alert(d, patient_id="p", encounter_id=None, probability=None, news2=6, model_version=None,
                               path="rule", rationale=[], basis=BASIS, stale=stale)["resource"]
        assert orjson.dumps(resource) == fhir_dump(resource)  # valid, and as the FHIR model writes it
        assert resource["prediction"][0]["rationale"] == (
            "NEWS2 6; systolic BP 85 mmHg taken 14 h 44 min before this assessment, not rechecked; "
            "on oxygen at the SpO2 round taken 5 h before this assessment, not rechecked; "
            "level of consciousness V taken 6 h before this assessment, not rechecked"), kind


def test_nothing_old_nothing_said():
    assert "not rechecked" not in model_alert()["resource"]["prediction"][0]["rationale"]


def test_a_basis_stored_before_reading_times_were_kept_still_builds_without_a_time():
    """An open alert in a changelog written by the previous version: [fact_id, version] and, preliminary,
    [fact_id, version, code]. It is corrected and published after the upgrade."""
    alert = model_alert(basis=[["fhir:Observation/lab-7:2524-7", 1, "2524-7"], ["cdc:vital_signs:42:8867-4", 7],
                               ["fhir:Observation/o:8867-4", 3]])
    assert alert["header"]["preliminary_basis"] == ["2524-7"]
    assert [b["display"] for b in alert["resource"]["basis"]] == [
        "lactate (LOINC 2524-7), preliminary result", "EHR vital_signs row 42, LOINC 8867-4 (heart rate)",
        "heart rate (LOINC 8867-4)"]
