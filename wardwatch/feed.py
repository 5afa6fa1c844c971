"""The demo feeder: a clinosim cohort written into the EHR the way a hospital's systems would.

Rows go into the EHR database (deploy/postgres/ehr-schema.sql), where Debezium picks them up;
Patients, Encounters and lab Observations go into the FHIR server, which notifies the receiver.
Everything is written in clinical-time order, and an encounter is written as in progress at
admission and finished at discharge: a discharged encounter written up front would carry its
discharge time ahead of every vital sign of the stay, and event time would jump past them.

    load_ehr_cohort(cache, patients, seed) -> EhrCohort   (runs clinosim, cached)
    ehr_changes(cohort_dir) / fhir_resources(cohort_dir)   pure: what to write, in order
    feed_database(db_url, cohort) / feed_fhir(fhir_url, cohort)   the writers
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from streams import replay

FHIR_BATCH = 100  # entries per transaction Bundle
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types: MR = medical record number
EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class Change:
    """One row written to the EHR database: an insert, or an update of the row whose `key` matches."""
    at_us: int  # clinical time: the order changes are written in
    table: str
    row: dict[str, Any]
    key: dict[str, Any] = field(default_factory=dict)  # empty: insert

    @property
    def is_update(self) -> bool:
        return bool(self.key)


@dataclass(frozen=True, slots=True)
class EhrCohort:
    changes: list[Change]
    fhir: list[dict[str, Any]]


def _ts(us: int) -> datetime:
    """A naive UTC datetime for `timestamp` columns."""
    return EPOCH + timedelta(microseconds=us)  # exact: no float rounding of microseconds


def _encounters(cohort_dir: Path) -> list[dict[str, str]]:
    with (cohort_dir / "csv" / "encounters.csv").open() as f:
        return list(csv.DictReader(f))


def _patients_fhir(cohort_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (cohort_dir / "fhir_r4" / "Patient.ndjson").open() if line.strip()]


def _mrn(patient: dict[str, Any]) -> str | None:
    return next((i["value"] for i in patient.get("identifier", []) if i.get("system") == replay.MRN_SYSTEM), None)


def ehr_changes(cohort_dir: Path) -> list[Change]:
    """Every row of the four EHR tables, in clinical-time order (patients first at equal times)."""
    vitals = replay.load_vitals(cohort_dir)
    labs = replay.load_labs(cohort_dir)
    encounters = _encounters(cohort_dir)
    changes: list[Change] = []

    for e in encounters:
        admitted = replay.parse_time_us(e["admission_datetime"])
        changes.append(Change(admitted, "encounters", {
            "encounter_id": e["encounter_id"], "patient_id": e["patient_id"],
            "encounter_class": e.get("encounter_type") or "inpatient", "status": "in-progress",
            "ward": e.get("ward_id") or None, "bed": e.get("bed_number") or None,
            "admitted_at": _ts(admitted), "updated_at": _ts(admitted)}))
        if e.get("discharge_datetime"):
            discharged = replay.parse_time_us(e["discharge_datetime"])
            changes.append(Change(discharged, "encounters",
                                  {"status": "finished", "discharged_at": _ts(discharged), "updated_at": _ts(discharged)},
                                  key={"encounter_id": e["encounter_id"]}))
    for v in vitals:
        changes.append(Change(v.measured_at_us, "vital_signs", {
            "patient_id": v.patient_id, "encounter_id": v.encounter_id, "measured_at": _ts(v.measured_at_us),
            **v.values}))
    for lab in labs:
        quantity = lab.resource.get("valueQuantity", {})
        changes.append(Change(lab.issued_us, "lab_results", {
            "patient_id": lab.patient_id,
            "encounter_id": lab.resource.get("encounter", {}).get("identifier", {}).get("value"),
            "loinc_code": lab.code, "value": quantity.get("value"), "unit": quantity.get("code") or quantity.get("unit"),
            "status": lab.resource.get("status", "final"),
            "collected_at": _ts(lab.effective_us), "resulted_at": _ts(lab.issued_us)}))

    # a patient row precedes everything about that patient
    first_seen: dict[str, int] = {}
    for c in changes:
        pid = c.row.get("patient_id")
        if pid is not None:
            first_seen[pid] = min(first_seen.get(pid, c.at_us), c.at_us)
    for p in _patients_fhir(cohort_dir):
        mrn = _mrn(p)
        if mrn in first_seen:
            changes.append(Change(first_seen[mrn], "patients", {
                "patient_id": mrn, "birth_date": p.get("birthDate"), "sex": p.get("gender"),
                "updated_at": _ts(first_seen[mrn])}))
    table_order = {"patients": 0, "encounters": 1, "vital_signs": 2, "lab_results": 3}
    return sorted(changes, key=lambda c: (c.at_us, table_order[c.table], c.is_update))


def fhir_resources(cohort_dir: Path) -> list[dict[str, Any]]:
    """Patients, Encounters and the lab Observations wardwatch uses, in clinical-time order, trimmed
    to what references resolve on an empty server (no practitioners, locations, organisations)."""
    out: list[tuple[int, int, dict[str, Any]]] = []
    labs = replay.load_labs(cohort_dir)
    patients = _patients_fhir(cohort_dir)
    # subjects name their Patient by id and by MRN, as EHR interfaces that know the MRN do: wardwatch keys
    # patients by MRN and takes a server's Patient id for one only if told to (WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS)
    mrn_by_ref = {f"Patient/{p['id']}": _mrn(p) for p in patients}

    def subject(ref: str) -> dict[str, Any]:
        mrn = mrn_by_ref.get(ref)
        return {"reference": ref, **({"identifier": _mr_identifier(mrn)} if mrn else {})}

    patient_first: dict[str, int] = {}
    encounters = [json.loads(line) for line in (cohort_dir / "fhir_r4" / "Encounter.ndjson").open() if line.strip()]
    for e in encounters:
        start = replay.parse_time_us(e["period"]["start"])
        ref = e["subject"]["reference"]
        patient_first[ref] = min(patient_first.get(ref, start), start)
        base = {k: e[k] for k in ("resourceType", "id", "identifier", "class") if k in e} | {"subject": subject(ref)}
        out.append((start, 1, {**base, "status": "in-progress", "period": {"start": e["period"]["start"]}}))
        if e.get("period", {}).get("end"):
            out.append((replay.parse_time_us(e["period"]["end"]), 1, {**base, "status": "finished", "period": e["period"]}))
    for lab in labs:
        r = lab.resource
        ref = r["subject"]["reference"]
        patient_first[ref] = min(patient_first.get(ref, lab.effective_us), lab.effective_us)
        keep = ("resourceType", "id", "status", "category", "code", "subject", "encounter", "effectiveDateTime",
                "issued", "valueQuantity", "interpretation", "referenceRange")
        obs = {k: r[k] for k in keep if k in r}
        obs["subject"] = subject(ref)
        if "encounter" in obs:  # with the visit number load_labs put there: the key the CDC rows and Encounter use
            obs["encounter"] = {k: obs["encounter"][k] for k in ("reference", "identifier") if k in obs["encounter"]}
        out.append((lab.issued_us, 2, obs))
    for p in patients:
        ref = f"Patient/{p['id']}"
        if ref in patient_first:
            trimmed = {k: p[k] for k in ("resourceType", "id", "gender", "birthDate") if k in p}
            # typed MR: the MRN wardwatch keys the Patient (and subjects naming it by id alone) by
            trimmed["identifier"] = [_mr_identifier(_mrn(p))]
            out.append((patient_first[ref], 0, trimmed))
    return [r for _, _, r in sorted(out, key=lambda item: (item[0], item[1]))]


def _mr_identifier(mrn: str | None) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": replay.MRN_SYSTEM, "value": mrn}


def transaction_bundles(resources: list[dict[str, Any]], size: int = FHIR_BATCH) -> list[dict[str, Any]]:
    """PUT-by-id transaction Bundles (idempotent: a rerun updates the same resources)."""
    return [{"resourceType": "Bundle", "type": "transaction",
             "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                       for r in resources[i:i + size]]}
            for i in range(0, len(resources), size)]


def load_ehr_cohort(cache_dir: Path, *, patients: int, seed: int) -> EhrCohort:
    cohort_dir = replay.generate_cohort(cache_dir, patients=patients, seed=seed)
    return EhrCohort(ehr_changes(cohort_dir), fhir_resources(cohort_dir))


# --- writers -------------------------------------------------------------------------------------


def write_changes(conn, changes: list[Change]) -> dict[str, int]:
    """Apply the changes in order, one transaction per change (Debezium sees each as its own
    commit, as it would from a live EHR); returns rows written per table."""
    from psycopg import sql

    written: dict[str, int] = {}
    for c in changes:
        if c.is_update:
            statement = sql.SQL("UPDATE {} SET {} WHERE {}").format(
                sql.Identifier(c.table),
                sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in c.row),
                sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in c.key))
            params = [*c.row.values(), *c.key.values()]
        else:
            statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(c.table), sql.SQL(", ").join(map(sql.Identifier, c.row)),
                sql.SQL(", ").join(sql.Placeholder() * len(c.row)))
            params = list(c.row.values())
        with conn.transaction():
            conn.execute(statement, params)
        written[c.table] = written.get(c.table, 0) + 1
    return written


def feed_database(db_url: str, cohort: EhrCohort) -> dict[str, int]:
    import psycopg

    from wardwatch.deploy import DeployError

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return write_changes(conn, cohort.changes)
    except psycopg.OperationalError as exc:
        raise DeployError(f"cannot write to the EHR database: {exc}; check EHR_DB_URL and PGPASSWORD") from exc


def feed_fhir(fhir_url: str, cohort: EhrCohort, timeout_s: float = 300.0) -> int:
    """POST the transaction Bundles in order; returns the resources written."""
    import time

    import httpx

    from wardwatch.deploy import send_until_success

    base = fhir_url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    bundles = transaction_bundles(cohort.fhir)
    with httpx.Client(timeout=60.0, headers={"Content-Type": "application/fhir+json"}) as http:
        for bundle in bundles:
            send_until_success(deadline, lambda b=bundle: http.post(base, json=b),
                         what=f"POST a transaction Bundle to the FHIR server at {base}")
    return sum(len(b["entry"]) for b in bundles)
