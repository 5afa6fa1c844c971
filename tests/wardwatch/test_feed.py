"""wardwatch/feed.py: a (tiny, hand-written) clinosim-shaped cohort into the EHR database and FHIR."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
import pytest
from fhir.resources.R4B.bundle import Bundle

from schemas.fhir import mrn_of, parse_notification
from streams import replay
from tests.deploy.conftest import ehr_database, postgres_server  # noqa: F401  (fixtures)
from tests.schemas.test_ingest_golden import _bundle as notification
from wardwatch.feed import ehr_changes, fhir_resources, transaction_bundles, write_changes

MRN = "http://hospital.example.org/identifiers/mrn"
ENC_KEY = "urn:clinosim:identifier:encounter-key"


def write_cohort(root: Path) -> Path:
    """One patient, one stay (admitted 08:00, discharged next day 10:00), two vitals rows, one lactate."""
    (root / "csv").mkdir(parents=True)
    (root / "fhir_r4").mkdir()
    (root / "csv" / "encounters.csv").write_text(
        "encounter_id,patient_id,encounter_type,status,department_id,admission_datetime,discharge_datetime,"
        "chief_complaint,ward_id,bed_number,is_readmission,prior_encounter_id,readmission_number\n"
        "ENC-1,MRN-1,inpatient,completed,im,2024-06-15T08:00:00,2024-06-16T10:00:00,fever,4E,4E-01,False,,0\n")
    (root / "csv" / "vital_signs.csv").write_text(
        "patient_id,timestamp,temperature,heart_rate,systolic_bp,diastolic_bp,respiratory_rate,spo2,pain_score,"
        "consciousness_level,on_supplemental_oxygen,oxygen_flow_rate_lpm,nursing_note,data_source,news2_score,gcs_score\n"
        "MRN-1,2024-06-15T09:00:00.250000,38.46,112,95,50,22,93.04,3,A,True,2.0,note,manual,,\n"
        "MRN-1,2024-06-15T13:00:00,37.9,,,,,,,,False,,,manual,,\n")
    (root / "fhir_r4" / "Patient.ndjson").write_text(json.dumps({
        "resourceType": "Patient", "id": "pt-1", "identifier": [{"system": MRN, "value": "MRN-1"}],
        "name": [{"family": "Test"}], "gender": "female", "birthDate": "1950-03-04"}) + "\n")
    (root / "fhir_r4" / "Encounter.ndjson").write_text(json.dumps({
        "resourceType": "Encounter", "id": "enc-1", "identifier": [{"system": ENC_KEY, "value": "ENC-1"}],
        "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": "Patient/pt-1"}, "serviceProvider": {"reference": "Organization/x"},
        "period": {"start": "2024-06-15T08:00:00Z", "end": "2024-06-16T10:00:00Z"}}) + "\n")
    (root / "fhir_r4" / "Observation.ndjson").write_text(json.dumps({
        "resourceType": "Observation", "id": "lac-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2524-7"}]},
        "subject": {"reference": "Patient/pt-1"}, "encounter": {"reference": "Encounter/enc-1"},
        "performer": [{"reference": "Practitioner/p"}],
        "effectiveDateTime": "2024-06-15T09:30:00Z", "issued": "2024-06-15T10:15:00Z",
        "valueQuantity": {"value": 3.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}) + "\n")
    return root


@pytest.fixture
def cohort(tmp_path) -> Path:
    return write_cohort(tmp_path / "cohort")


def test_changes_come_in_clinical_time_order_with_the_discharge_last(cohort):
    changes = ehr_changes(cohort)

    assert [(c.table, c.is_update) for c in changes] == [
        ("patients", False),      # 08:00, before anything about the patient
        ("encounters", False),    # 08:00 admission, still in progress
        ("vital_signs", False),   # 09:00
        ("lab_results", False),   # resulted 10:15
        ("vital_signs", False),   # 13:00
        ("encounters", True),     # next day 10:00: discharged
    ]
    admission, discharge = changes[1], changes[-1]
    assert admission.row["status"] == "in-progress" and "discharged_at" not in admission.row
    assert discharge.key == {"encounter_id": "ENC-1"}
    assert discharge.row["status"] == "finished" and discharge.row["discharged_at"] == datetime(2024, 6, 16, 10)
    assert changes[0].row == {"patient_id": "MRN-1", "birth_date": "1950-03-04", "sex": "female",
                              "updated_at": datetime(2024, 6, 15, 8)}


def test_fhir_resources_are_ordered_trimmed_and_valid_transactions(cohort):
    resources = fhir_resources(cohort)

    assert [(r["resourceType"], r.get("status")) for r in resources] == [
        ("Patient", None), ("Encounter", "in-progress"), ("Observation", "final"), ("Encounter", "finished")]
    patient, observation = resources[0], resources[2]
    # typed MR: without it wardwatch would not take it for the MRN (missing_patient), nor key the subjects
    # that name this Patient by its id alone
    assert "name" not in patient and patient["identifier"] == [
        {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
         "system": MRN, "value": "MRN-1"}]
    assert mrn_of(patient) == "MRN-1"
    # of the system docker-compose.yml sets WARDWATCH_MRN_SYSTEM to by default: the demo keeps its MRNs
    assert MRN == replay.MRN_SYSTEM and mrn_of(patient, replay.MRN_SYSTEM) == "MRN-1"
    # the Encounters and the lab name their Patient by MRN too: without a FHIR server to read the Patient from,
    # a subject with only `Patient/pt-1` would be dead-lettered (no_fhir_server) under the compose defaults
    for resource in resources[1:]:
        assert resource["subject"] == {"reference": "Patient/pt-1", "identifier": patient["identifier"][0]}
    assert "performer" not in observation  # references that would not resolve on an empty server
    # the lab names its stay by the visit number too, as the Encounter and the CDC rows do: by the reference
    # alone it would be keyed "fhir:Encounter/enc-1", a second encounter of the patient in the analysts' tables
    assert observation["encounter"] == {"reference": "Encounter/enc-1", "identifier": {"system": ENC_KEY, "value": "ENC-1"}}
    assert {e.encounter_id for r in resources if r["resourceType"] != "Patient"
            for e in parse_notification(orjson.dumps(notification(r)), topic="t", partition=0, offset=0).events} == {"ENC-1"}
    assert "serviceProvider" not in resources[1]
    bundles = transaction_bundles(resources, size=3)
    assert [len(b["entry"]) for b in bundles] == [3, 1]
    for b in bundles:
        Bundle.model_validate(b)
    assert bundles[0]["entry"][0]["request"] == {"method": "PUT", "url": "Patient/pt-1"}


@pytest.mark.timeout(120)
def test_rows_land_in_the_ehr_schema(postgres_server, ehr_database, cohort):  # noqa: F811
    with psycopg.connect(postgres_server.dsn(ehr_database), autocommit=True) as conn:
        written = write_changes(conn, ehr_changes(cohort))
        vitals = conn.execute("SELECT measured_at, spo2, temperature, on_supplemental_oxygen, heart_rate "
                              "FROM vital_signs ORDER BY measured_at").fetchall()
        encounter = conn.execute("SELECT status, ward, discharged_at FROM encounters").fetchone()
        lab = conn.execute("SELECT loinc_code, value, unit, collected_at, resulted_at FROM lab_results").fetchone()

    assert written == {"patients": 1, "encounters": 2, "vital_signs": 2, "lab_results": 1}
    assert vitals[0] == (datetime(2024, 6, 15, 9, 0, 0, 250000), Decimal("93.0"), Decimal("38.5"), True, 112)
    assert vitals[1][3] is False and vitals[1][4] is None
    assert encounter == ("finished", "4E", datetime(2024, 6, 16, 10))
    assert lab == ("2524-7", Decimal("3.4000"), "mmol/L", datetime(2024, 6, 15, 9, 30), datetime(2024, 6, 15, 10, 15))
