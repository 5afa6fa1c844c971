"""The replayer: a clinosim cohort turned into the raw messages a live hospital would emit.

Vital signs arrive as Debezium PostgreSQL change events for a `vital_signs` table (JSON converter,
schemas.enable=true, decimal.handling.mode=precise, REPLICA IDENTITY FULL); labs arrive as FHIR R4B
subscription notifications (a `history` Bundle: SubscriptionStatus, then the full Observation).
Both are merged by availability time (vitals when charted, labs when issued), then realistic faults
are injected and recorded in a manifest so tests and the demo can check that every one was handled
(with them, as labs do, a few results are reported preliminary first and final minutes later).
Last, the context tables are merged in by commit time, without faults: a `patients` row per patient
(at registration, before the first admission) and an `encounters` insert per stay (in progress, at
admission, before any of its vitals), updated to finished when the discharge falls within the replay.

    generate_cohort(cache, patients=8, seed=7)        -> cohort dir (csv/, fhir_r4/, cohort.json)
    build_replay(cohort_dir, faults=True, seed=0)     -> Replay(messages, manifest)
    publish(replay, settings, topics)                 -> counts   (the only part that needs Kafka)

Fact ids in the manifest follow the canonical convention (schemas/canonical.py):
    CDC   "cdc:vital_signs:<row id>:<canonical code>"   one per non-null mapped column
    FHIR  "fhir:Observation/<id>:<canonical code>"
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from bisect import bisect_right
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable

import orjson

from schemas import codes

MRN_SYSTEM = "http://hospital.example.org/identifiers/mrn"
ENCOUNTER_KEY_SYSTEM = "urn:clinosim:identifier:encounter-key"
FHIR_BASE = "https://ehr.example.org/fhir"
LAB_CODES = (codes.LACTATE, codes.WBC, codes.CREATININE, codes.PLATELETS)

# A mix: severe sepsis deteriorates; moderate pneumonia / heart failure may; mild cellulitis and
# UTI mostly do not. "name:severity" is passed to `clinosim test-disease --severity`.
DEFAULT_DISEASES = (
    "sepsis:severe",
    "bacterial_pneumonia:moderate",
    "heart_failure_exacerbation:moderate",
    "cellulitis:mild",
    "urinary_tract_infection:mild",
)


@dataclass(frozen=True, slots=True)
class RawMessage:
    kind: str  # "cdc" | "fhir"
    table: str | None  # CDC table, None for FHIR
    key: bytes | None
    value: bytes | None  # None is a Debezium tombstone


@dataclass(slots=True)
class Replay:
    messages: list[RawMessage]
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """How many of each fault to inject (when faults are on). A handful each, by default."""

    redeliveries: int = 2
    cross_source_duplicates: int = 2
    duplicated_notifications: int = 2
    reorders: int = 2
    late: int = 3
    fhir_amendments: int = 1
    cdc_amendments: int = 1
    fhir_retractions: int = 1
    cdc_retractions: int = 1
    bad_messages: int = 4
    # realism rather than a fault: labs reported preliminary first, final minutes later (one with the
    # same value, one corrected); an alert resting on one says so until the final amends it
    preliminary_results: int = 2
    reorder_within_s: int = 1800  # well inside the default allowed lateness (3600 s)


# ================================================================================================
# 1. cohort generation (clinosim, cached)
# ================================================================================================


def clinosim_timeout_s(patients: int) -> float:
    """How long a clinosim worker may run before it is taken as hung: 300 s, more for bigger cohorts, and
    growing faster than the cohort, as its time does (measured on 2 shared cores: 300 patients 95 s, half
    of it loading its configuration; 1,000 patients 761 s; a fixed 300 s stopped every 1,000-patient run):
    3,000 s for 1,000 patients, 15,000 s for 3,000."""
    return max(300.0, 2.0 * patients + patients ** 2 / 1000)


def generate_cohort(cache_dir: Path, *, patients: int, seed: int,
                    diseases: tuple[str, ...] = DEFAULT_DISEASES, timeout_s: float | None = None) -> Path:
    """Run clinosim once per disease and merge the runs into one cohort directory (cached).

    Patients are spread round-robin over `diseases` ("name" or "name:severity"). clinosim names
    every run's patients FORCED-0001.., so each run's ids are rewritten to be unique (C<run>-0001).
    timeout_s: per clinosim worker, clinosim_timeout_s(patients) unless given.
    """
    if patients < 1:  # an empty cohort would be cached under its parameters, and every replay of it fail
        raise ValueError(f"a cohort needs at least one patient, not {patients}")
    params = {"patients": patients, "seed": seed, "diseases": list(diseases), "clinosim": package_version("clinosim")}
    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=6).hexdigest()
    target = Path(cache_dir) / f"cohort-p{patients}-s{seed}-{digest}"
    if (target / "cohort.json").exists():
        return target

    counts = [patients // len(diseases) + (1 if i < patients % len(diseases) else 0) for i in range(len(diseases))]
    runs = [(i, spec, n) for i, (spec, n) in enumerate(zip(diseases, counts)) if n > 0]
    work = Path(cache_dir) / f".tmp-{digest}-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    try:
        # two worker processes (one per core); each runs its share in one interpreter, because
        # clinosim spends half a run loading its YAML configuration
        jobs = [[(work / f"run{i}", spec, n, seed + i) for i, spec, n in runs[k::2]] for k in range(2)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            limit = clinosim_timeout_s(patients) if timeout_s is None else timeout_s
            list(pool.map(lambda job: _run_clinosim(job, limit), [j for j in jobs if j]))
        merged = work / "cohort"
        patients_by_disease = _merge_runs(merged, [(work / f"run{i}", f"C{i}-", spec) for i, spec, _ in runs])
        (merged / "cohort.json").write_text(json.dumps({**params, "patients_by_disease": patients_by_disease}, indent=1))
        if not (target / "cohort.json").exists():  # a concurrent builder may have won
            shutil.rmtree(target, ignore_errors=True)
            merged.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_CLINOSIM_WORKER = """
import json, sys
from clinosim.simulator.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["clinosim", *argv]
    main()
"""


def _run_clinosim(runs: list[tuple[Path, str, int, int]], timeout_s: float) -> None:
    """Run `clinosim test-disease` for each (out dir, "disease[:severity]", count, seed) in one process."""
    argvs = []
    for out, spec, n, seed in runs:
        disease, _, severity = spec.partition(":")
        argv = ["test-disease", disease, "-n", str(n), "-s", str(seed), "--format", "fhir-r4", "csv", "-o", str(out)]
        argvs.append(argv + (["--severity", severity] if severity else []))
    done = subprocess.run([sys.executable, "-c", _CLINOSIM_WORKER, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=timeout_s)
    missing = [str(out) for out, *_ in runs if not (out / "csv" / "vital_signs.csv").exists()]
    if done.returncode != 0 or missing:
        raise RuntimeError(f"clinosim failed (exit {done.returncode}, missing {missing}): {done.stderr[-2000:]}")


def _merge_runs(merged: Path, runs: list[tuple[Path, str, str]]) -> dict[str, list[str]]:
    """Concatenate the runs' CSV tables and NDJSON files, renaming ids so runs cannot collide."""
    (merged / "csv").mkdir(parents=True)
    (merged / "fhir_r4").mkdir()
    patients_by_disease: dict[str, list[str]] = {}
    for run_dir, prefix, spec in runs:
        # clinosim derives Patient resource ids from the MRN, so they collide across runs too
        patient_ids = [json.loads(line)["id"] for line in (run_dir / "fhir_r4" / "Patient.ndjson").open()]
        renames = {pid: "pt-" + hashlib.blake2b(f"{prefix}{pid}".encode(), digest_size=6).hexdigest()
                   for pid in patient_ids}
        pattern = re.compile("|".join([r"\bFORCED-", *(re.escape(p) + r"\b" for p in renames)]))

        def rename(text: str) -> str:
            return pattern.sub(lambda m: prefix if m.group(0) == "FORCED-" else renames[m.group(0)], text)

        for src in sorted((run_dir / "csv").glob("*.csv")):
            lines = rename(src.read_text()).splitlines(keepends=True)
            dst = merged / "csv" / src.name
            with dst.open("a") as out:
                out.writelines(lines if not dst.stat().st_size else lines[1:])
        for src in sorted((run_dir / "fhir_r4").glob("*.ndjson")):
            with (merged / "fhir_r4" / src.name).open("a") as out:
                out.write(rename(src.read_text()))
        with (run_dir / "csv" / "patients.csv").open() as f:
            patients_by_disease.setdefault(spec, []).extend(rename(r["patient_id"]) for r in csv.DictReader(f))
    return patients_by_disease


# ================================================================================================
# 2. loading the cohort
# ================================================================================================

# the vital_signs table, in column order: (name, postgres type, numeric precision, numeric scale)
VITAL_COLUMNS: tuple[tuple[str, str, int, int], ...] = (
    ("id", "bigint", 0, 0),
    ("patient_id", "text", 0, 0),
    ("encounter_id", "text", 0, 0),
    ("measured_at", "timestamp", 0, 0),
    ("heart_rate", "int4", 0, 0),
    ("respiratory_rate", "int4", 0, 0),
    ("spo2", "numeric", 5, 1),
    ("oxygen_flow_rate_lpm", "numeric", 4, 1),
    ("on_supplemental_oxygen", "boolean", 0, 0),
    ("systolic_bp", "int4", 0, 0),
    ("diastolic_bp", "int4", 0, 0),
    ("temperature", "numeric", 4, 1),
    ("consciousness_level", "text", 0, 0),
)
_MEASUREMENT_COLUMNS = VITAL_COLUMNS[4:]  # the ones clinosim's CSV fills
# the context tables of deploy/postgres/ehr-schema.sql, in column order
PATIENT_COLUMNS: tuple[tuple[str, str, int, int], ...] = (
    ("patient_id", "text", 0, 0),
    ("birth_date", "date", 0, 0),
    ("sex", "text", 0, 0),
    ("updated_at", "timestamp", 0, 0),
)
ENCOUNTER_COLUMNS: tuple[tuple[str, str, int, int], ...] = (
    ("encounter_id", "text", 0, 0),
    ("patient_id", "text", 0, 0),
    ("encounter_class", "text", 0, 0),
    ("status", "text", 0, 0),
    ("ward", "text", 0, 0),
    ("bed", "text", 0, 0),
    ("admitted_at", "timestamp", 0, 0),
    ("discharged_at", "timestamp", 0, 0),
    ("updated_at", "timestamp", 0, 0),
)
# table -> (columns, NOT NULL columns)
TABLE_COLUMNS = {
    "vital_signs": (VITAL_COLUMNS, ("id", "patient_id", "measured_at")),
    "patients": (PATIENT_COLUMNS, ("patient_id", "updated_at")),
    "encounters": (ENCOUNTER_COLUMNS, ("encounter_id", "patient_id", "encounter_class", "status", "admitted_at",
                                       "updated_at")),
}
_VITAL_MAPPING = codes.CDC_TABLES["vital_signs"]


@dataclass(frozen=True, slots=True)
class VitalRow:
    patient_id: str
    encounter_id: str | None
    measured_at_us: int
    values: dict[str, Any]  # measurement column -> int | Decimal | bool | str | None


@dataclass(frozen=True, slots=True)
class LabResult:
    patient_id: str  # the MRN, as in the CSV tables
    code: str  # canonical LOINC
    effective_us: int
    issued_us: int
    resource: dict[str, Any]  # the Observation, subject/meta already rewritten


def parse_time_us(text: str) -> int:
    """Microseconds since the epoch; naive CSV timestamps are UTC."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_time_us(us: int) -> str:
    """FHIR instant with microseconds, e.g. 2024-06-15T14:06:36.123275Z."""
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _csv_value(pg_type: str, scale: int, text: str) -> Any:
    if text == "":
        return None
    if pg_type == "int4":
        return int(Decimal(text))
    if pg_type == "numeric":  # postgres rounds half away from zero to the column's scale
        return Decimal(text).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    if pg_type == "boolean":
        return text.strip().lower() in ("true", "t", "1")
    return text


def patient_sort_key(patient_id: str) -> tuple[int, str]:
    """Interleave runs (C0-0001, C1-0001, ..., C0-0002) so max_patients keeps the disease mix."""
    digits = re.search(r"(\d+)$", patient_id)
    return (int(digits.group(1)) if digits else 0, patient_id)


def load_vitals(cohort_dir: Path) -> list[VitalRow]:
    encounters = defaultdict(list)  # patient -> [(start_us, end_us, encounter_id)]
    with (cohort_dir / "csv" / "encounters.csv").open() as f:
        for r in csv.DictReader(f):
            end = parse_time_us(r["discharge_datetime"]) if r.get("discharge_datetime") else 2**62
            encounters[r["patient_id"]].append((parse_time_us(r["admission_datetime"]), end, r["encounter_id"]))

    def encounter_at(patient: str, t_us: int) -> str | None:
        return next((e for start, end, e in sorted(encounters[patient]) if start <= t_us <= end), None)

    rows = []
    with (cohort_dir / "csv" / "vital_signs.csv").open() as f:
        for r in csv.DictReader(f):
            t = parse_time_us(r["timestamp"])
            values = {name: _csv_value(pg, scale, r.get(name, "")) for name, pg, _, scale in _MEASUREMENT_COLUMNS}
            rows.append(VitalRow(r["patient_id"], encounter_at(r["patient_id"], t), t, values))
    return rows


def load_patient_refs(cohort_dir: Path) -> dict[str, str]:
    """MRN (the CSV patient_id) -> FHIR reference "Patient/<id>"."""
    refs = {}
    for line in (cohort_dir / "fhir_r4" / "Patient.ndjson").open():
        p = json.loads(line)
        mrn = next((i["value"] for i in p.get("identifier", []) if i.get("system") == MRN_SYSTEM), None)
        if mrn:
            refs[mrn] = f"Patient/{p['id']}"
    return refs


def load_labs(cohort_dir: Path) -> list[LabResult]:
    """The lab Observations wardwatch uses, rewritten to carry the MRN and a versionId."""
    fhir = cohort_dir / "fhir_r4"
    mrn_of = {ref.removeprefix("Patient/"): mrn for mrn, ref in load_patient_refs(cohort_dir).items()}
    encounter_key = {}
    if (fhir / "Encounter.ndjson").exists():
        for line in (fhir / "Encounter.ndjson").open():
            e = json.loads(line)
            key = next((i["value"] for i in e.get("identifier", []) if i.get("system") == ENCOUNTER_KEY_SYSTEM), None)
            encounter_key[e["id"]] = key

    labs = []
    for line in (fhir / "Observation.ndjson").open():
        obs = json.loads(line)
        code = next((codes.canonical_code(c["code"]) for c in obs["code"].get("coding", [])
                     if codes.canonical_code(c.get("code", "")) in LAB_CODES), None)
        if code is None or "valueQuantity" not in obs or "effectiveDateTime" not in obs:
            continue
        mrn = mrn_of[obs["subject"]["reference"].removeprefix("Patient/")]
        obs["subject"] = {**obs["subject"], "identifier": {"system": MRN_SYSTEM, "value": mrn}}
        enc = obs.get("encounter", {}).get("reference", "").removeprefix("Encounter/")
        if encounter_key.get(enc):
            obs["encounter"] = {**obs["encounter"],
                                "identifier": {"system": ENCOUNTER_KEY_SYSTEM, "value": encounter_key[enc]}}
        effective = parse_time_us(obs["effectiveDateTime"])
        issued = parse_time_us(obs["issued"]) if obs.get("issued") else effective
        obs["meta"] = {**obs.get("meta", {}), "versionId": "1", "lastUpdated": format_time_us(issued)}
        labs.append(LabResult(mrn, code, effective, issued, obs))
    return labs


@dataclass(frozen=True, slots=True)
class PatientRow:
    patient_id: str
    birth_year: int  # clinosim gives the age only: the year of the first admission minus the age
    sex: str  # administrative gender: male | female | other | unknown


@dataclass(frozen=True, slots=True)
class EncounterRow:
    encounter_id: str
    patient_id: str
    encounter_class: str
    ward: str | None
    bed: str | None
    admitted_us: int
    discharged_us: int | None


CLINOSIM_SEX = {"M": "male", "F": "female", "O": "other", "U": "unknown"}


def load_context(cohort_dir: Path) -> tuple[list[PatientRow], list[EncounterRow]]:
    """The patients and encounters tables, from clinosim's patients.csv and encounters.csv."""
    encounters = []
    with (Path(cohort_dir) / "csv" / "encounters.csv").open() as f:
        for r in csv.DictReader(f):
            discharged = parse_time_us(r["discharge_datetime"]) if r.get("discharge_datetime") else None
            encounters.append(EncounterRow(r["encounter_id"], r["patient_id"], r.get("encounter_type") or "inpatient",
                                           r.get("ward_id") or None, r.get("bed_number") or None,
                                           parse_time_us(r["admission_datetime"]), discharged))
    first_admission: dict[str, int] = {}
    for e in encounters:
        first_admission[e.patient_id] = min(e.admitted_us, first_admission.get(e.patient_id, e.admitted_us))
    patients = []
    with (Path(cohort_dir) / "csv" / "patients.csv").open() as f:
        for r in csv.DictReader(f):
            admitted = first_admission.get(r["patient_id"])
            if admitted is None:  # never admitted: nothing of theirs is replayed
                continue
            year = datetime.fromtimestamp(admitted // 1_000_000, UTC).year - int(r["age"])
            patients.append(PatientRow(r["patient_id"], year, CLINOSIM_SEX.get(r.get("sex", "").upper(), "unknown")))
    return patients, encounters


def cdc_fact_ids(row_id: int, values: dict[str, Any]) -> list[str]:
    """The facts schemas.cdc makes of a vitals row: one per non-null mapped column, plus the O2 flow
    of 0.0 that an empty flow column with the on-oxygen flag false stands for (on air is a fact), or
    the supplemental-oxygen fact it stands for with the flag true (on oxygen, flow not charted)."""
    flow, flag = _VITAL_MAPPING.on_air or (None, None)
    on_air = flow is not None and values.get(flow) is None and values.get(flag) is False
    on_oxygen = flow is not None and values.get(flow) is None and values.get(flag) is True
    return [f"cdc:vital_signs:{row_id}:{code}" for column, (code, _) in _VITAL_MAPPING.columns.items()
            if values.get(column) is not None or (on_air and column == flow)] + (
        [f"cdc:vital_signs:{row_id}:{codes.SUPPLEMENTAL_O2}"] if on_oxygen else [])


def fhir_fact_id(observation: dict[str, Any], code: str) -> str:
    return f"fhir:Observation/{observation['id']}:{code}"


# ================================================================================================
# 3. Debezium encoding
# ================================================================================================

SERVER_NAME = "ehr"  # Debezium topic.prefix
DEBEZIUM_VERSION = "2.7.3.Final"
DATABASE = "hospital"


def encode_decimal(value: Decimal, scale: int) -> str:
    """Kafka Connect Decimal: the unscaled integer as minimal big-endian two's complement, base64."""
    unscaled = int(value.scaleb(scale).to_integral_value(rounding=ROUND_HALF_UP))
    magnitude = unscaled if unscaled >= 0 else ~unscaled
    return base64.b64encode(unscaled.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True)).decode()


def _field_schema(name: str, pg_type: str, precision: int, scale: int,
                  required: tuple[str, ...] = ("id", "patient_id", "measured_at")) -> dict[str, Any]:
    optional = name not in required
    if pg_type == "numeric":
        return {"type": "bytes", "optional": optional, "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
                "parameters": {"scale": str(scale), "connect.decimal.precision": str(precision)}, "field": name}
    if pg_type == "timestamp":
        return {"type": "int64", "optional": optional, "name": "io.debezium.time.MicroTimestamp", "version": 1,
                "field": name}
    if pg_type == "date":
        return {"type": "int32", "optional": optional, "name": "io.debezium.time.Date", "version": 1, "field": name}
    kafka_type = {"bigint": "int64", "int4": "int32", "boolean": "boolean", "text": "string"}[pg_type]
    return {"type": kafka_type, "optional": optional, "field": name}


def _debezium_schemas(table: str) -> tuple[dict, dict]:
    prefix = f"{SERVER_NAME}.public.{table}"
    columns, required = TABLE_COLUMNS[table]
    row_fields = [_field_schema(*c, required=required) for c in columns]
    key_schema = {"type": "struct", "fields": [f for f in row_fields if f["field"] == "patient_id"],
                  "optional": False, "name": f"{prefix}.Key"}
    row = {"type": "struct", "fields": row_fields, "optional": True, "name": f"{prefix}.Value"}
    source = {"type": "struct", "optional": False, "name": "io.debezium.connector.postgresql.Source", "field": "source",
              "fields": [
                  {"type": "string", "optional": False, "field": "version"},
                  {"type": "string", "optional": False, "field": "connector"},
                  {"type": "string", "optional": False, "field": "name"},
                  {"type": "int64", "optional": False, "field": "ts_ms"},
                  {"type": "string", "optional": True, "name": "io.debezium.data.Enum", "version": 1,
                   "parameters": {"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
                   "default": "false", "field": "snapshot"},
                  {"type": "string", "optional": False, "field": "db"},
                  {"type": "string", "optional": True, "field": "sequence"},
                  {"type": "int64", "optional": True, "field": "ts_us"},
                  {"type": "int64", "optional": True, "field": "ts_ns"},
                  {"type": "string", "optional": False, "field": "schema"},
                  {"type": "string", "optional": False, "field": "table"},
                  {"type": "int64", "optional": True, "field": "txId"},
                  {"type": "int64", "optional": True, "field": "lsn"},
                  {"type": "int64", "optional": True, "field": "xmin"},
              ]}
    transaction = {"type": "struct", "optional": True, "name": "event.block", "version": 1, "field": "transaction",
                   "fields": [{"type": "string", "optional": False, "field": "id"},
                              {"type": "int64", "optional": False, "field": "total_order"},
                              {"type": "int64", "optional": False, "field": "data_collection_order"}]}
    value_schema = {"type": "struct", "optional": False, "name": f"{prefix}.Envelope", "version": 2, "fields": [
        {**row, "field": "before"}, {**row, "field": "after"}, source, transaction,
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
        {"type": "int64", "optional": True, "field": "ts_us"},
        {"type": "int64", "optional": True, "field": "ts_ns"},
    ]}
    return key_schema, value_schema


_SCHEMAS = {table: _debezium_schemas(table) for table in TABLE_COLUMNS}  # table -> (key schema, value schema)


def row_payload(row_id: int, row: VitalRow, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row as Debezium's JSON converter writes it (decimals base64, timestamp in µs)."""
    values = row.values if values is None else values
    out: dict[str, Any] = {"id": row_id, "patient_id": row.patient_id, "encounter_id": row.encounter_id,
                           "measured_at": row.measured_at_us}
    for name, pg_type, _, scale in _MEASUREMENT_COLUMNS:
        v = values.get(name)
        out[name] = encode_decimal(v, scale) if (pg_type == "numeric" and v is not None) else v
    return out


@dataclass(frozen=True, slots=True)
class CommitInfo:
    lsn: int
    last_commit_lsn: int
    tx_id: int
    commit_us: int
    emitted_ms: int  # when the connector processed it


def debezium_key(row_id: int, patient_id: str, table: str = "vital_signs") -> bytes:
    """Keyed by patient (message.key.columns=public.<table>:patient_id) so every change of one
    patient lands in one partition, in commit order; the row id stays in the value."""
    return orjson.dumps({"schema": _SCHEMAS[table][0], "payload": {"patient_id": patient_id}})


def debezium_value(op: str, before: dict | None, after: dict | None, commit: CommitInfo, table: str) -> bytes:
    source = {
        "version": DEBEZIUM_VERSION, "connector": "postgresql", "name": SERVER_NAME,
        "ts_ms": commit.commit_us // 1000, "snapshot": "false", "db": DATABASE,
        "sequence": json.dumps([str(commit.last_commit_lsn), str(commit.lsn)], separators=(",", ":")),
        "ts_us": commit.commit_us, "ts_ns": commit.commit_us * 1000,
        "schema": "public", "table": table, "txId": commit.tx_id, "lsn": commit.lsn, "xmin": None,
    }
    payload = {"before": before, "after": after, "source": source, "transaction": None, "op": op,
               "ts_ms": commit.emitted_ms, "ts_us": commit.emitted_ms * 1000, "ts_ns": commit.emitted_ms * 1_000_000}
    return orjson.dumps({"schema": _SCHEMAS[table][1], "payload": payload})


# ================================================================================================
# 4. FHIR R4B subscription notifications
# ================================================================================================

LAB_SUBSCRIPTION = "Subscription/ww-lab-results"
VITALS_SUBSCRIPTION = "Subscription/ww-vital-signs"
TOPIC_URL = {
    LAB_SUBSCRIPTION: "http://hospital.example.org/fhir/SubscriptionTopic/lab-result",
    VITALS_SUBSCRIPTION: "http://hospital.example.org/fhir/SubscriptionTopic/vital-signs",
}


def _stable_uuid(*parts: Any) -> str:
    return str(uuid.UUID(bytes=hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).digest()))


def notification_bundle(subscription: str, kind: str, events_since_start: int, at_us: int,
                        event_number: int | None = None, resource: dict | None = None) -> dict[str, Any]:
    """A `history` Bundle as the R4B backport sends it; `kind` is the SubscriptionStatus type."""
    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus", "id": _stable_uuid(subscription, kind, events_since_start, at_us),
        "status": "active", "type": kind, "eventsSinceSubscriptionStart": str(events_since_start),
    }
    if resource is not None:
        focus = f"{resource['resourceType']}/{resource['id']}"
        status["notificationEvent"] = [{"eventNumber": str(event_number), "timestamp": format_time_us(at_us),
                                        "focus": {"reference": focus}}]
    status["subscription"] = {"reference": subscription}
    status["topic"] = TOPIC_URL[subscription]
    entries = [{"fullUrl": f"urn:uuid:{status['id']}", "resource": status,
                "request": {"method": "GET", "url": f"{FHIR_BASE}/{subscription}/$status"},
                "response": {"status": "200"}}]
    if resource is not None:
        rid = f"{resource['resourceType']}/{resource['id']}"
        entries.append({"fullUrl": f"{FHIR_BASE}/{rid}", "resource": resource,
                        "request": {"method": "PUT", "url": rid},
                        "response": {"status": "201" if resource["meta"]["versionId"] == "1" else "200"}})
    return {"resourceType": "Bundle", "id": _stable_uuid("bundle", status["id"]), "type": "history",
            "timestamp": format_time_us(at_us), "entry": entries}


def vital_observation(row: VitalRow, column: str, row_id: int, at_us: int,
                      patient_ref: str | None = None) -> tuple[dict[str, Any], str]:
    """The same measurement a CDC row carries, as the monitor integration posts it to FHIR."""
    value = row.values[column]
    if column == "spo2":  # US Core puts both codings on the pulse-ox Observation
        coding = [{"system": "http://loinc.org", "code": "59408-5", "display": "Oxygen saturation by Pulse oximetry"},
                  {"system": "http://loinc.org", "code": "2708-6", "display": "Oxygen saturation in Arterial blood"}]
        unit, code = "%", codes.SPO2
    else:
        coding = [{"system": "http://loinc.org", "code": codes.HEART_RATE, "display": "Heart rate"}]
        unit, code = "/min", codes.HEART_RATE
    obs = {
        "resourceType": "Observation", "id": "vs-mon-" + hashlib.blake2b(f"{row_id}:{column}".encode(), digest_size=6).hexdigest(),
        "meta": {"versionId": "1", "lastUpdated": format_time_us(at_us)},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": coding},
        "subject": {**({"reference": patient_ref} if patient_ref else {}),
                    "identifier": {"system": MRN_SYSTEM, "value": row.patient_id}},
        "effectiveDateTime": format_time_us(row.measured_at_us),
        "issued": format_time_us(at_us),
        "valueQuantity": {"value": float(value) if isinstance(value, Decimal) else value, "unit": unit,
                          "system": "http://unitsofmeasure.org", "code": unit},
    }
    if row.encounter_id:
        obs["encounter"] = {"identifier": {"system": ENCOUNTER_KEY_SYSTEM, "value": row.encounter_id}}
    return obs, code


def next_version(obs: dict[str, Any], at_us: int, status: str, value: float | None = None) -> dict[str, Any]:
    """The next version of an Observation: amended (new value), entered-in-error, or final (of a preliminary)."""
    new = json.loads(json.dumps(obs))
    new["meta"] = {**new["meta"], "versionId": str(int(new["meta"]["versionId"]) + 1), "lastUpdated": format_time_us(at_us)}
    new["status"] = status
    if value is not None:
        new["valueQuantity"]["value"] = value
    return new


# ================================================================================================
# 5. planning: what happens when (availability time), faults that change content
# ================================================================================================


@dataclass(slots=True, eq=False)
class Item:
    """One change in the source systems, before ids, lsns and event numbers are assigned."""

    at_us: int  # availability time: commit (CDC) or notification time (FHIR)
    action: str  # insert | update | delete | fhir | handshake | heartbeat | one of BAD_KINDS
    patient_id: str | None = None
    row: VitalRow | None = None
    target: "Item | None" = None  # for update/delete: the insert it changes
    new_values: dict[str, Any] | None = None  # for update
    resource: dict[str, Any] | None = None  # for fhir
    code: str | None = None  # canonical code of a FHIR Observation
    column: str | None = None  # for a cross-source duplicate: the CDC column it repeats
    subscription: str = LAB_SUBSCRIPTION
    fault: str | None = None
    context: tuple[str, dict | None, dict] | None = None  # patients / encounters change: (table, before, after)
    # filled by commit()
    row_id: int | None = None
    messages: list["Delivered"] = field(default_factory=list)

    def fact_ids(self) -> list[str]:
        if self.action in ("insert", "update", "delete"):
            row_id = self.row_id if self.target is None else self.target.row_id
            values = self.new_values if self.action == "update" else self.row.values
            return cdc_fact_ids(row_id, values)
        if self.action == "fhir":
            return [fhir_fact_id(self.resource, self.code)]
        return []


@dataclass(slots=True, eq=False)
class Delivered:
    message: RawMessage
    item: Item
    copy_of: "Delivered | None" = None  # set on redeliveries and duplicated notifications


def _plan(vitals: list[VitalRow], labs: list[LabResult], rng: random.Random, faults: bool,
          plan: FaultPlan, late_by_s: int, allowed_lateness_s: int, seed: int = 0) -> list[Item]:
    # vitals are committed a little after measurement (charting delay); labs are available when issued
    inserts = [Item(v.measured_at_us + rng.randint(20, 180) * 1_000_000, "insert", v.patient_id, row=v)
               for v in vitals]
    results = [Item(lab.issued_us, "fhir", lab.patient_id, resource=lab.resource, code=lab.code) for lab in labs]
    start = min(i.at_us for i in inserts + results)
    end = max(i.at_us for i in inserts + results)
    # the protocol, not faults: a handshake per subscription at the start, a heartbeat mid-stream
    protocol = [Item(start - 60_000_000, "handshake", subscription=s) for s in (LAB_SUBSCRIPTION, VITALS_SUBSCRIPTION)]
    protocol.append(Item((start + end) // 2, "heartbeat", subscription=LAB_SUBSCRIPTION))
    if not faults:
        return [*inserts, *results, *protocol]

    pick = _Picker(rng)
    _make_late(inserts, pick, plan.late, late_by_s)  # moves rows in place: no new items
    labs_on_time = on_time_labs(results, allowed_lateness_s)
    added = [
        *_cross_source_duplicates(inserts, pick, plan.cross_source_duplicates),
        *_cdc_corrections(inserts, pick, plan),
        *_fhir_corrections(labs_on_time, pick, plan),
        *_bad_messages(inserts, start, end, plan.bad_messages),
        # with an rng of its own, after every other pick: a seed's other faults, row ids and lsns stay
        # as they were before preliminary results existed
        *_preliminary_results(labs_on_time, pick.sharing(random.Random(f"preliminary-{seed}")),
                              plan.preliminary_results),
    ]
    return [*inserts, *results, *protocol, *added]


class _Picker:
    """Deterministic choice of items for faults; an item takes part in at most one fault."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[int] = set()

    def free(self, item: Item) -> bool:
        return id(item) not in self.used

    def sharing(self, rng: random.Random) -> _Picker:
        """A picker drawing from rng that takes part in the same one-fault-per-item bookkeeping."""
        other = _Picker(rng)
        other.used = self.used
        return other

    def take(self, *items: Item) -> None:
        self.used.update(id(i) for i in items)

    def pick(self, candidates: list[Item], n: int) -> list[Item]:
        free = [c for c in candidates if self.free(c)]
        chosen = self.rng.sample(free, min(n, len(free)))
        self.take(*chosen)
        return chosen


def _make_late(inserts: list[Item], pick: _Picker, n: int, late_by_s: int) -> None:
    """Rows charted long after newer rows of the same patient were committed (back-charting)."""
    by_patient: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(inserts, key=lambda i: i.row.measured_at_us):
        by_patient[it.patient_id].append(it)
    candidates = []  # (row, the first newer row more than late_by_s after it)
    for rows in by_patient.values():
        times = [r.row.measured_at_us for r in rows]
        for r in rows:
            j = bisect_right(times, r.row.measured_at_us + late_by_s * 1_000_000)
            if j < len(rows):
                candidates.append((r, rows[j]))
    made = 0
    for row, anchor in pick.rng.sample(candidates, len(candidates)):
        if made == n:
            break
        if pick.free(row) and pick.free(anchor):
            pick.take(row, anchor)  # the anchor stays plain so it surely advances the patient clock
            row.at_us, row.fault = anchor.at_us + 1_000_000, "late"
            made += 1


def _cross_source_duplicates(inserts: list[Item], pick: _Picker, n: int) -> list[Item]:
    """The monitor also posts heart rate / SpO2 to FHIR: the same measurement via both sources."""

    def clean_time(i: Item) -> bool:  # µs remainders where ms rounding and ms flooring agree
        return 100 <= i.row.measured_at_us % 1000 <= 400

    out = []
    for k in range(n):
        column = ("heart_rate", "spo2")[k % 2]
        for src in pick.pick([i for i in inserts if i.row.values.get(column) is not None and clean_time(i)], 1):
            out.append(Item(src.at_us + pick.rng.randint(60, 600) * 1_000_000, "fhir", src.patient_id, row=src.row,
                            target=src, column=column, subscription=VITALS_SUBSCRIPTION, fault="cross_source_duplicate"))
    return out


def _cdc_corrections(inserts: list[Item], pick: _Picker, plan: FaultPlan) -> list[Item]:
    """An update (op u) changing a heart rate, and a delete (op d, then a tombstone)."""
    out = []
    for src in pick.pick([i for i in inserts if i.row.values.get("heart_rate") is not None], plan.cdc_amendments):
        hr = src.row.values["heart_rate"]
        changed = {**src.row.values, "heart_rate": hr - 12 if hr > 150 else hr + 12}
        out.append(Item(src.at_us + pick.rng.randint(15, 90) * 60_000_000, "update", src.patient_id, row=src.row,
                        target=src, new_values=changed, fault="amended"))
    for src in pick.pick(inserts, plan.cdc_retractions):
        out.append(Item(src.at_us + pick.rng.randint(15, 90) * 60_000_000, "delete", src.patient_id, row=src.row,
                        target=src, fault="retracted"))
    return out


def on_time_labs(results: list[Item], allowed_lateness_s: int) -> list[Item]:
    """Labs the stream will accept (turnaround within the lateness bound), else the five fastest.

    Most labs take hours, so they reach the stream after newer vitals and are late; a correction
    of a late lab would never exercise the correction path.
    """
    def turnaround_us(i: Item) -> int:
        return i.at_us - parse_time_us(i.resource["effectiveDateTime"])

    fastest = sorted(results, key=turnaround_us)
    on_time = [i for i in fastest if turnaround_us(i) < allowed_lateness_s * 1_000_000]
    return on_time or fastest[:5]


def _fhir_corrections(results: list[Item], pick: _Picker, plan: FaultPlan) -> list[Item]:
    """Version 2 of a lab: amended with a new value (a lactate: it matters most), or entered-in-error."""
    lactates = [i for i in results if i.code == codes.LACTATE] or results
    out = []
    for src in pick.pick(lactates, plan.fhir_amendments):
        old = src.resource["valueQuantity"]["value"]
        at = src.at_us + pick.rng.randint(30, 120) * 60_000_000
        new = next_version(src.resource, at, "amended", round(old * 1.25 + 0.3, 2))
        out.append(Item(at, "fhir", src.patient_id, resource=new, code=src.code, target=src, fault="amended"))
    for src in pick.pick(results, plan.fhir_retractions):
        at = src.at_us + pick.rng.randint(30, 120) * 60_000_000
        out.append(Item(at, "fhir", src.patient_id, resource=next_version(src.resource, at, "entered-in-error"),
                        code=src.code, target=src, fault="retracted"))
    return out


def _preliminary_results(results: list[Item], pick: _Picker, n: int) -> list[Item]:
    """Labs first reported preliminary, then final (version 2) some minutes later. Preferably the first
    lactate of a stay: drawn when sepsis is first suspected, so close to when an alert opens, whose
    basis then holds a preliminary reading; then other lactates, then other labs. The first keeps its
    value (an alert resting on it is amended only to drop the flag), the others change it (a real
    correction). The preliminary item itself is rewritten."""
    lactates = [i for i in results if i.code == codes.LACTATE]
    first: dict[tuple[str, str], Item] = {}  # (patient, encounter) -> its first on-time lactate
    for i in sorted(lactates, key=lambda i: parse_time_us(i.resource["effectiveDateTime"])):
        first.setdefault((i.patient_id, json.dumps(i.resource.get("encounter"), sort_keys=True)), i)
    chosen = pick.pick(list(first.values()), n)
    chosen += pick.pick(lactates, n - len(chosen))
    chosen += pick.pick(results, n - len(chosen))  # too few on-time lactates: other labs
    out = []
    for k, src in enumerate(chosen):
        src.resource = {**src.resource, "status": "preliminary"}  # a copy: the cohort's LabResult stays final
        src.fault = "preliminary"
        old = src.resource["valueQuantity"]["value"]
        at = src.at_us + pick.rng.randint(20, 90) * 60_000_000
        final = next_version(src.resource, at, "final", None if k == 0 else round(old * 1.2 + 0.2, 2))
        final["issued"] = format_time_us(at)  # issued: when this version was made available
        out.append(Item(at, "fhir", src.patient_id, resource=final, code=src.code, target=src,
                        fault="finalised"))
    return out


BAD_KINDS = ("bad_json", "bad_heart_rate", "bad_resource", "bad_cdc_json")


def _bad_messages(inserts: list[Item], start: int, end: int, n: int) -> list[Item]:
    """Malformed messages for the dead-letter path, spread evenly over the stream."""
    patients = sorted({i.patient_id for i in inserts}, key=patient_sort_key)
    out = []
    for k in range(n):
        at = start + (end - start) * (k + 1) // (n + 1)
        patient, kind = patients[k % len(patients)], BAD_KINDS[k % len(BAD_KINDS)]
        if kind == "bad_heart_rate":  # a well-formed row whose only measurement is impossible
            values = {name: None for name, *_ in _MEASUREMENT_COLUMNS} | {"heart_rate": 999, "on_supplemental_oxygen": False}
            out.append(Item(at, "insert", patient, row=VitalRow(patient, None, at - 60_000_000, values), fault="bad"))
        else:
            out.append(Item(at, kind, patient, fault="bad"))
    return out


# ================================================================================================
# 6. committing: ids, lsns, event numbers, serialized messages (in availability order)
# ================================================================================================


_OPS = {"insert": "c", "update": "u", "delete": "d"}


def _commit(items: list[Item], rng: random.Random, patient_refs: dict[str, str]) -> list[Delivered]:
    ordered = sorted(enumerate(items), key=lambda p: (p[1].at_us, p[0]))
    next_row_id = 1
    lsn, last_commit_lsn, tx_id = 24_023_928, 24_023_744, 7_312
    events: Counter[str] = Counter()  # per subscription
    out: list[Delivered] = []
    for _, it in ordered:
        if it.action in ("insert", "update", "delete"):
            if it.action == "insert":
                it.row_id, next_row_id = next_row_id, next_row_id + rng.randint(1, 3)
            row_id = it.row_id if it.target is None else it.target.row_id
            lsn += rng.randint(56, 480)
            tx_id += rng.randint(1, 3)
            commit = CommitInfo(lsn, last_commit_lsn, tx_id, it.at_us, it.at_us // 1000 + rng.randint(3, 40))
            last_commit_lsn = lsn + 48
            full = row_payload(row_id, it.row)  # REPLICA IDENTITY FULL: `before` is the whole row
            before, after = {"insert": (None, full), "delete": (full, None),
                             "update": (full, row_payload(row_id, it.row, it.new_values))}[it.action]
            key = debezium_key(row_id, it.patient_id)
            value = debezium_value(_OPS[it.action], before, after, commit, "vital_signs")
            it.messages.append(Delivered(RawMessage("cdc", "vital_signs", key, value), it))
            if it.action == "delete":
                it.messages.append(Delivered(RawMessage("cdc", "vital_signs", key, None), it))
        elif it.action == "fhir":
            if it.fault == "cross_source_duplicate":
                it.resource, it.code = vital_observation(it.row, it.column, it.target.row_id, it.at_us,
                                                         patient_refs.get(it.patient_id))
            events[it.subscription] += 1
            n = events[it.subscription]
            bundle = notification_bundle(it.subscription, "event-notification", n, it.at_us, n, it.resource)
            it.messages.append(Delivered(RawMessage("fhir", None, it.patient_id.encode(), orjson.dumps(bundle)), it))
        elif it.action in ("handshake", "heartbeat"):
            bundle = notification_bundle(it.subscription, it.action, events[it.subscription], it.at_us)
            it.messages.append(Delivered(RawMessage("fhir", None, None, orjson.dumps(bundle)), it))
        elif it.action == "bad_json":
            it.messages.append(Delivered(RawMessage("fhir", None, it.patient_id.encode(),
                                                    b'{"resourceType": "Bundle", "type": "history", "entry": [{'), it))
        elif it.action == "bad_cdc_json":
            it.messages.append(Delivered(RawMessage("cdc", "vital_signs", None, b'{"schema": {"type": "struct"'), it))
        elif it.action == "bad_resource":  # a bare resource where a notification Bundle belongs
            patient = {"resourceType": "Patient", "id": "pt-misrouted",
                       "identifier": [{"system": MRN_SYSTEM, "value": it.patient_id}]}
            it.messages.append(Delivered(RawMessage("fhir", None, it.patient_id.encode(), orjson.dumps(patient)), it))
        out.extend(it.messages)
    return out


# ================================================================================================
# 7. delivery faults: redelivery, duplicated notifications, reordering
# ================================================================================================


def _plain_insert(d: Delivered) -> bool:
    return d.item.action == "insert" and d.item.fault is None and d.copy_of is None


def _deliver(stream: list[Delivered], rng: random.Random, plan: FaultPlan, involved: set[int],
             allowed_lateness_s: int) -> tuple[list[Delivered], list[tuple[Delivered, Delivered]]]:
    """The stream with delivery faults applied, and the swapped pairs."""
    stream = list(stream)

    def free(d: Delivered) -> bool:
        return id(d.item) not in involved and (d.item.target is None or id(d.item.target) not in involved)

    # reorder: swap two nearby inserts of one patient measured close together (within lateness)
    within_us = min(plan.reorder_within_s, allowed_lateness_s // 2) * 1_000_000
    last_seen: dict[str, int] = {}
    pairs = []
    for pos, d in enumerate(stream):
        if d.item.action != "insert":
            continue
        prev = last_seen.get(d.item.patient_id)
        last_seen[d.item.patient_id] = pos
        if prev is None or pos - prev > 50 or not (_plain_insert(d) and _plain_insert(stream[prev])):
            continue
        a, b = stream[prev].item, d.item
        if b.row.measured_at_us - a.row.measured_at_us <= within_us:
            pairs.append((prev, pos))
    swaps: list[tuple[Delivered, Delivered]] = []
    for i, j in rng.sample(pairs, len(pairs)):
        if len(swaps) == plan.reorders:
            break
        if not (free(stream[i]) and free(stream[j])):
            continue
        involved.update((id(stream[i].item), id(stream[j].item)))
        stream[i].item.fault = stream[j].item.fault = "reordered"
        swaps.append((stream[i], stream[j]))
        stream[i], stream[j] = stream[j], stream[i]

    # redelivery (Debezium after a connector restart) and duplicated notifications (FHIR server):
    # a byte-identical copy of an earlier message, some minutes later (in availability time)
    def duplicate(candidates: list[Delivered], n: int, minutes: tuple[int, int]) -> None:
        for original in rng.sample(candidates, min(n, len(candidates))):
            involved.add(id(original.item))
            resend_us = original.item.at_us + rng.randint(*minutes) * 60_000_000
            at = stream.index(original) + 1
            while at < len(stream) and (stream[at].item.at_us <= resend_us or stream[at].message.value is None):
                at += 1  # (and keep a delete next to its tombstone)
            stream.insert(at, Delivered(original.message, original.item, copy_of=original))

    duplicate([d for d in stream if _plain_insert(d) and free(d)], plan.redeliveries, (2, 30))
    labs = set(map(id, on_time_labs([d.item for d in stream if d.item.action == "fhir" and d.item.fault is None],
                                    allowed_lateness_s)))
    duplicate([d for d in stream if id(d.item) in labs and d.copy_of is None and free(d)],
              plan.duplicated_notifications, (1, 30))
    return stream, swaps


# ================================================================================================
# 7b. the context tables: patients and encounters, merged in by commit time
# ================================================================================================

REGISTRATION_LEAD_US = 10 * 60 * 1_000_000  # a patient is registered before the first admission
ENCOUNTER_STATUS = ("in-progress", "finished")


def _context_items(cohort_dir: Path, keep: set[str], stream: list[Delivered], shift_us: int = 0) -> list[Item]:
    """Each kept patient's row (at registration), each encounter's insert (at admission, before any of
    its vitals) and, when the discharge falls within the replay's time span, the update that finishes it.
    An encounter discharged after the span stays in progress, as it would be in a live EHR."""
    patients, encounters = load_context(cohort_dir)
    encounters = [shifted_encounter(e, shift_us) for e in encounters]
    start, end = min(d.item.at_us for d in stream), max(d.item.at_us for d in stream)
    first_seen: dict[str, int] = {}  # patient -> availability of their first message
    for d in stream:
        if d.item.patient_id in keep:
            first_seen[d.item.patient_id] = min(d.item.at_us, first_seen.get(d.item.patient_id, d.item.at_us))
    items = []
    first_encounter: dict[str, int] = {}
    for e in sorted((e for e in encounters if e.patient_id in keep), key=lambda e: (e.admitted_us, e.encounter_id)):
        committed = e.admitted_us
        if e.patient_id not in first_encounter:  # charted vitals may predate the admission's record
            committed = min(committed, first_seen.get(e.patient_id, committed) - 1_000_000)
            first_encounter[e.patient_id] = committed
        admitted = encounter_payload(e, discharged=False)
        items.append(Item(committed, "encounter_insert", e.patient_id, context=("encounters", None, admitted)))
        if e.discharged_us is not None and start <= e.discharged_us <= end:
            items.append(Item(e.discharged_us, "encounter_update", e.patient_id,
                              context=("encounters", admitted, encounter_payload(e, discharged=True))))
    for p in patients:
        if p.patient_id in first_encounter:
            registered = first_encounter[p.patient_id] - REGISTRATION_LEAD_US
            row = {"patient_id": p.patient_id, "birth_date": _mid_year_days(p.birth_year), "sex": p.sex,
                   "updated_at": registered}
            items.append(Item(registered, "patient_insert", p.patient_id, context=("patients", None, row)))
    return items


def encounter_payload(e: EncounterRow, *, discharged: bool) -> dict[str, Any]:
    """The encounters row as Debezium writes it (timestamps in µs): in progress, or finished."""
    return {"encounter_id": e.encounter_id, "patient_id": e.patient_id, "encounter_class": e.encounter_class,
            "status": ENCOUNTER_STATUS[discharged], "ward": e.ward, "bed": e.bed, "admitted_at": e.admitted_us,
            "discharged_at": e.discharged_us if discharged else None,
            "updated_at": e.discharged_us if discharged else e.admitted_us}


def _mid_year_days(year: int) -> int:
    """A birth_date for a birth year (days since the epoch, io.debezium.time.Date): clinosim has the age only."""
    return (datetime(year, 7, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).days


def _with_context(stream: list[Delivered], context: list[Item], rng: random.Random) -> list[Delivered]:
    """The stream with the context changes merged in by commit time. The other messages keep their
    relative order (and so their faults and manifest); a context change takes an lsn just after the
    last change committed before it, as PostgreSQL's lsns are global."""
    pending = sorted(context, key=lambda i: (i.at_us, i.action != "patient_insert"))
    out: list[Delivered] = []
    lsn, tx_id, k = 24_020_000, 7_200, 0  # below the first change _commit numbers

    def emit(it: Item) -> None:
        nonlocal lsn, tx_id
        last_commit_lsn, lsn = lsn + 48, lsn + rng.randint(8, 40)
        tx_id += 1
        table, before, after = it.context
        commit = CommitInfo(lsn, last_commit_lsn, tx_id, it.at_us, it.at_us // 1000 + rng.randint(3, 40))
        op = "u" if before is not None else "c"
        message = RawMessage("cdc", table, debezium_key(0, it.patient_id, table),
                             debezium_value(op, before, after, commit, table))
        it.messages.append(Delivered(message, it))
        out.append(it.messages[-1])

    for d in stream:
        while k < len(pending) and pending[k].at_us <= d.item.at_us:
            emit(pending[k])
            k += 1
        if d.message.kind == "cdc" and d.message.value is not None and d.item.action in _OPS:
            source = orjson.loads(d.message.value)["payload"]["source"]
            lsn, tx_id = max(lsn, source["lsn"]), max(tx_id, source["txId"])
        out.append(d)
    for it in pending[k:]:
        emit(it)
    return out


# ================================================================================================
# 8. the public entry point and its manifest
# ================================================================================================


def build_replay(cohort_dir: Path, *, faults: bool = True, seed: int = 0, max_patients: int | None = None,
                 late_by_s: int = 8 * 3600, allowed_lateness_s: int = 3600, plan: FaultPlan = FaultPlan(),
                 shift_s: int = 0) -> Replay:
    """The cohort as raw CDC and FHIR messages in delivery order, with faults and their manifest.

    `late_by_s`: how far behind newer rows of the same patient a late row is delivered; it must
    exceed `allowed_lateness_s` (pass settings.allowed_lateness_s) so the stream routes those rows
    to the late topic. The other faults target facts that are on time under that bound, so they
    exercise dedupe and corrections rather than the late path.
    `shift_s`: every clinical and commit time moved this far (birth years stay): a replay that follows
    another in one stream without its event time going back (the manifest's `time_span_us` says where
    a replay's times lie).
    """
    if late_by_s <= allowed_lateness_s:
        raise ValueError("late_by_s must exceed allowed_lateness_s, or the 'late' rows are not late")
    cohort_dir = Path(cohort_dir)
    shift_us = shift_s * 1_000_000
    vitals = [replace(v, measured_at_us=v.measured_at_us + shift_us) if shift_us else v for v in load_vitals(cohort_dir)]
    labs = [shifted_lab(lab, shift_us) for lab in load_labs(cohort_dir)]
    patients = sorted({v.patient_id for v in vitals}, key=patient_sort_key)[:max_patients]
    keep = set(patients)
    vitals = [v for v in vitals if v.patient_id in keep]
    labs = [lab for lab in labs if lab.patient_id in keep]

    rng = random.Random(seed)
    items = _plan(vitals, labs, rng, faults, plan, late_by_s, allowed_lateness_s, seed)
    stream = _commit(items, rng, load_patient_refs(cohort_dir))
    involved = {id(i) for i in items if i.fault is not None} | {id(i.target) for i in items if i.target is not None}
    swaps: list[tuple[Delivered, Delivered]] = []
    if faults:
        stream, swaps = _deliver(stream, rng, plan, involved, allowed_lateness_s)
    stream = _with_context(stream, _context_items(cohort_dir, keep, stream, shift_us), random.Random(f"context-{seed}"))
    return Replay([d.message for d in stream], _manifest(stream, items, swaps, patients, faults, seed, late_by_s))


def shifted_lab(lab: LabResult, shift_us: int) -> LabResult:
    """The lab result with its effective and issued times (and the Observation's) moved by shift_us."""
    if not shift_us:
        return lab
    effective, issued = lab.effective_us + shift_us, lab.issued_us + shift_us
    obs = {**lab.resource, "effectiveDateTime": format_time_us(effective),
           "meta": {**lab.resource.get("meta", {}), "lastUpdated": format_time_us(issued)}}
    if "issued" in obs:
        obs["issued"] = format_time_us(issued)
    return replace(lab, effective_us=effective, issued_us=issued, resource=obs)


def shifted_encounter(e: EncounterRow, shift_us: int) -> EncounterRow:
    if not shift_us:
        return e
    return replace(e, admitted_us=e.admitted_us + shift_us,
                   discharged_us=None if e.discharged_us is None else e.discharged_us + shift_us)


def _manifest(stream: list[Delivered], items: list[Item], swaps: list[tuple[Delivered, Delivered]],
              patients: list[str], faults: bool, seed: int, late_by_s: int) -> dict[str, Any]:
    position = {id(d): p for p, d in enumerate(stream)}
    first_position = {}
    for p, d in enumerate(stream):
        first_position.setdefault(id(d.item), p)

    def kind_of(d: Delivered) -> str:
        if d.message.kind == "cdc":
            return "cdc_tombstone" if d.message.value is None else f"cdc_{d.item.action}"
        return "fhir_event" if d.item.action == "fhir" else f"fhir_{d.item.action}"

    counts = Counter(d.message.kind for d in stream)
    counts.update(kind_of(d) for d in stream)

    def facts(fault: str) -> list[str]:
        return sorted(f for i in items if i.fault == fault for f in i.fact_ids())

    copies = [d for d in stream if d.copy_of is not None]
    redelivered = [{"position": position[id(d)], "original_position": position[id(d.copy_of)],
                    "fact_ids": d.item.fact_ids()} for d in copies if d.message.kind == "cdc"]
    duplicated = [{"position": position[id(d)], "original_position": position[id(d.copy_of)],
                   "fact_ids": d.item.fact_ids()} for d in copies if d.message.kind == "fhir"]
    reordered = sorted(({"positions": sorted((position[id(a)], position[id(b)])),
                         "fact_ids": [*a.item.fact_ids(), *b.item.fact_ids()]} for a, b in swaps),
                       key=lambda r: r["positions"])
    amended = [i for i in items if i.fault == "amended"]
    # each preliminary result and its final version (the final's target), once each in the stream
    preliminary = [{"fact_id": fhir_fact_id(i.resource, i.code), "position": first_position[id(i.target)],
                    "final_position": first_position[id(i)],
                    "preliminary_value": i.target.resource["valueQuantity"]["value"],
                    "final_value": i.resource["valueQuantity"]["value"]}
                   for i in items if i.fault == "finalised"]
    bad = [{"position": first_position[id(i)], "kind": i.action if i.action != "insert" else "bad_heart_rate",
            "topic_kind": i.messages[0].message.kind, "fact_ids": i.fact_ids()}
           for i in items if i.fault == "bad"]

    fault_counts = {
        "late": sum(1 for i in items if i.fault == "late"),
        "cross_source_duplicate": sum(1 for i in items if i.fault == "cross_source_duplicate"),
        "amended": len(amended),
        "retracted": sum(1 for i in items if i.fault == "retracted"),
        "redelivered": len(redelivered),
        "duplicated_notifications": len(duplicated),
        "reordered": len(reordered),
        "bad_messages": len(bad),
        "preliminary": len(preliminary),
    }
    return {
        "seed": seed,
        "faults": faults,
        "late_by_s": late_by_s,
        # first and last commit (CDC) or notification (FHIR) time; clinical times lie at or before them
        "time_span_us": [min(d.item.at_us for d in stream), max(d.item.at_us for d in stream)],
        "patients": patients,
        "messages": len(stream),
        "counts": dict(sorted(counts.items())),
        "fault_counts": fault_counts,
        "late_fact_ids": facts("late"),
        "cross_source_duplicate_fact_ids": facts("cross_source_duplicate"),
        # every fact a correction re-versions (a CDC update re-sends the whole row)
        "amended_fact_ids": facts("amended"),
        "amended_values": {f: v for i in amended for f, v in _changed_values(i).items()},
        "retracted_fact_ids": facts("retracted"),
        "redelivered": sorted(redelivered, key=lambda r: r["position"]),
        "duplicated_notifications": sorted(duplicated, key=lambda r: r["position"]),
        "reordered": reordered,
        "bad_messages": sorted(bad, key=lambda r: r["position"]),
        # labs delivered preliminary (version 1), then final (version 2) with the same or a changed value
        "preliminary_results": sorted(preliminary, key=lambda r: r["position"]),
    }


def _changed_values(item: Item) -> dict[str, float]:
    """fact id -> new value, for the facts an amendment actually changes."""
    if item.action == "fhir":
        return {fhir_fact_id(item.resource, item.code): item.resource["valueQuantity"]["value"]}
    old, new = item.row.values, item.new_values
    row_id = item.target.row_id
    return {f"cdc:vital_signs:{row_id}:{code}": float(new[c]) for c, (code, _) in _VITAL_MAPPING.columns.items()
            if new.get(c) is not None and new[c] != old.get(c)}


# ================================================================================================
# 9. publishing (the only part that talks to Kafka)
# ================================================================================================


MAX_PACING_LAG_S = 0.02  # how far a paced publish may fall behind its schedule before it shifts it
# a paced publish sends what falls due within this much at once: one message at a time, each raw
# partition's batch left in a produce request of its own (450 requests/s at 1k msg/s, a third of
# everything the embedded broker served in the bench's paced phase)
PACING_TICK_S = 0.005


def publish(replay: Replay, settings, topics, *, rate: float | None = None,
            progress: Callable[[int], None] | None = None, flush_timeout_s: float = 60.0,
            post_fhir: Callable[[bytes], tuple[int, int] | None] | None = None) -> dict[str, int]:
    """Produce the replay in order; CDC to topics.cdc[table], FHIR to topics.fhir.

    Each message carries header `ww.produced_ns` (time.time_ns() at produce) for latency metrics.
    `rate` paces production to that many messages per second. Raises if anything is undelivered.
    `post_fhir(body) -> (partition, offset) | None`: send FHIR notifications this way instead (e.g.
    POST them to the rest-hook receiver, as a FHIR server does; streams.receiver.post_notification);
    None means refused as invalid (dead-lettered by the receiver, never on the notifications topic).
    """
    from confluent_kafka import KafkaException, Producer

    producer = Producer({**settings.kafka_client_config("replay"), "linger.ms": 5, "acks": "all",
                         "partitioner": "murmur2_random"})  # the Java client's partitioner, as Debezium uses
    failures: list[str] = []

    end_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset after the last delivered

    def on_delivery(err, msg) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            tp = (msg.topic(), msg.partition())
            end_offsets[tp] = max(end_offsets.get(tp, 0), msg.offset() + 1)

    counts: Counter[str] = Counter()
    started = schedule_start = time.monotonic()
    for n, m in enumerate(replay.messages, start=1):
        if rate:  # pacing, not synchronisation: hold each message until its slot
            delay = schedule_start + n / rate - time.monotonic()
            if delay > PACING_TICK_S:  # in ticks: the messages of one tick leave in one produce request
                time.sleep(delay)
            elif delay < -MAX_PACING_LAG_S:
                # behind (a slow POST, a loaded machine): move the schedule instead of catching up in a
                # burst. A replay compresses days into seconds, so a burst of a few hundred
                # milliseconds is hours of event time arriving at once, out of step across topics.
                schedule_start -= delay + MAX_PACING_LAG_S
        topic = topics.cdc[m.table] if m.kind == "cdc" else topics.fhir
        if m.kind == "fhir" and post_fhir is not None:
            stored = post_fhir(m.value)
            if stored is not None:  # None: refused as invalid (the receiver dead-lettered it)
                partition, offset = stored
                end_offsets[(topic, partition)] = max(end_offsets.get((topic, partition), 0), offset + 1)
            counts[m.kind] += 1
            if progress is not None:
                progress(n)
            continue
        while True:
            try:
                producer.produce(topic, key=m.key, value=m.value, on_delivery=on_delivery,
                                 headers=[("ww.produced_ns", str(time.time_ns()).encode())])
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
        producer.poll(0)
        counts[m.kind] += 1
        if progress is not None:
            progress(n)
    remaining = producer.flush(flush_timeout_s)
    if remaining or failures:
        raise KafkaException(f"replay publish incomplete: {remaining} undelivered, {len(failures)} failed"
                             + (f" (first: {failures[0]})" if failures else ""))
    return {"messages": sum(counts.values()), "cdc": counts["cdc"], "fhir": counts["fhir"],
            "seconds": round(time.monotonic() - started, 3), "end_offsets": end_offsets}
