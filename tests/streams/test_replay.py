"""The replayer: realistic Debezium and FHIR messages from a clinosim cohort, faults as announced.

Messages are decoded here independently of the ingest parsers (schemas/cdc.py, schemas/fhir.py).
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from schemas.codes import is_context
from streams.replay import RawMessage, build_replay, generate_cohort

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MRN_SYSTEM = "http://hospital.example.org/identifiers/mrn"
DISEASES = ("sepsis:severe", "bacterial_pneumonia:moderate", "cellulitis:mild")


# --- independent decoding ------------------------------------------------------------------------


def micros(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - EPOCH) // timedelta(microseconds=1)


def decode_row(row_schema: dict, row: dict | None) -> dict | None:
    """Undo the JSON converter: Decimal bytes -> Decimal (scale from the schema)."""
    if row is None:
        return None
    out = dict(row)
    for f in row_schema["fields"]:
        if f.get("name") == "org.apache.kafka.connect.data.Decimal" and row[f["field"]] is not None:
            unscaled = int.from_bytes(base64.b64decode(row[f["field"]]), "big", signed=True)
            out[f["field"]] = Decimal(unscaled).scaleb(-int(f["parameters"]["scale"]))
    return out


def decode_cdc(m: RawMessage) -> dict:
    key = json.loads(m.key)
    value = json.loads(m.value)
    fields = {f["field"]: f for f in value["schema"]["fields"]}
    p = value["payload"]
    return {"key": key["payload"], "op": p["op"], "source": p["source"],
            "before": decode_row(fields["before"], p["before"]), "after": decode_row(fields["after"], p["after"])}


def parse_json(m: RawMessage) -> dict | None:
    try:
        return json.loads(m.value)
    except (TypeError, ValueError):
        return None


def is_cdc_change(m: RawMessage) -> bool:
    v = parse_json(m) if m.kind == "cdc" else None
    return isinstance(v, dict) and "payload" in v


def is_vital_change(m: RawMessage) -> bool:
    return m.table == "vital_signs" and is_cdc_change(m)


def notification(m: RawMessage) -> dict | None:
    b = parse_json(m) if m.kind == "fhir" else None
    return b if isinstance(b, dict) and b.get("resourceType") == "Bundle" else None


def observation(bundle: dict) -> dict | None:
    return bundle["entry"][1]["resource"] if len(bundle["entry"]) > 1 else None


def observation_id(fact_id: str) -> str:
    """The Observation id of a FHIR fact id, "fhir:Observation/<id>:<code>"."""
    return fact_id.split("/", 1)[1].rsplit(":", 1)[0]


def bad_positions(replay) -> set[int]:
    return {b["position"] for b in replay.manifest["bad_messages"]}


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cohorts")


@pytest.fixture(scope="module")
def cohort(cache) -> Path:
    return generate_cohort(cache, patients=3, seed=7, diseases=DISEASES)


@pytest.fixture(scope="module")
def replay(cohort):
    return build_replay(cohort, seed=3)


@pytest.fixture(scope="module")
def csv_vitals(cohort) -> dict[tuple[str, int], dict]:
    with (cohort / "csv" / "vital_signs.csv").open() as f:
        return {(r["patient_id"], micros(r["timestamp"])): r for r in csv.DictReader(f)}


# --- the cohort -----------------------------------------------------------------------------------


def test_a_big_cohorts_clinosim_gets_time_in_proportion_to_its_patients(tmp_path, monkeypatch):
    """`batch dataset --patients 1000` (the README's bigger training set) was killed at a fixed 300 s
    per clinosim worker; it takes ~761 s on this machine."""
    timeouts = []

    def clinosim_stopped(args, *, timeout, **_):
        timeouts.append(timeout)
        return subprocess.CompletedProcess(args, 1, "", "stopped by the test")

    monkeypatch.setattr(subprocess, "run", clinosim_stopped)
    given = {}
    for patients in (1000, 8):
        timeouts.clear()
        with pytest.raises(RuntimeError, match="clinosim failed"):
            generate_cohort(tmp_path / "cache", patients=patients, seed=11)
        given[patients] = set(timeouts)
    assert min(given[1000]) >= 2 * 761 and given[8] == {300.0}  # 761 s measured for 1,000 patients


def test_cohort_is_cached_and_patients_of_different_runs_do_not_collide(cache, cohort, monkeypatch):
    def no_clinosim(*a, **k):
        raise AssertionError("clinosim ran again for a cached cohort")

    monkeypatch.setattr(subprocess, "run", no_clinosim)
    assert generate_cohort(cache, patients=3, seed=7, diseases=DISEASES) == cohort

    with (cohort / "csv" / "vital_signs.csv").open() as f:
        csv_patients = {r["patient_id"] for r in csv.DictReader(f)}
    patients = [json.loads(line) for line in (cohort / "fhir_r4" / "Patient.ndjson").open()]
    mrns = {i["value"] for p in patients for i in p["identifier"] if i["system"] == MRN_SYSTEM}
    assert len(csv_patients) == 3 and mrns == csv_patients
    assert len({p["id"] for p in patients}) == 3
    by_disease = json.loads((cohort / "cohort.json").read_text())["patients_by_disease"]
    assert sorted(by_disease) == sorted(DISEASES)


# --- CDC ------------------------------------------------------------------------------------------


def test_cdc_inserts_are_debezium_envelopes_whose_values_decode_to_the_csv(replay, csv_vitals):
    bad = bad_positions(replay)
    inserts = [decode_cdc(m) for p, m in enumerate(replay.messages)
               if is_vital_change(m) and p not in bad and json.loads(m.value)["payload"]["op"] == "c"]
    assert len({e["after"]["id"] for e in inserts}) == len(csv_vitals)  # every CSV row, once (plus redeliveries)
    for e in inserts:
        row, src = e["after"], e["source"]
        assert e["before"] is None and e["key"] == {"patient_id": row["patient_id"]}  # keyed by patient
        assert src["connector"] == "postgresql" and src["snapshot"] == "false" and src["table"] == "vital_signs"
        assert src["schema"] == "public" and src["xmin"] is None and isinstance(src["txId"], int)
        assert json.loads(src["sequence"])[1] == str(src["lsn"])
        csv_row = csv_vitals[(row["patient_id"], row["measured_at"])]
        for column in ("spo2", "temperature", "oxygen_flow_rate_lpm"):
            assert row[column] == (Decimal(csv_row[column]) if csv_row[column] else None), column
        for column in ("heart_rate", "respiratory_rate", "systolic_bp", "diastolic_bp"):
            assert row[column] == (int(csv_row[column]) if csv_row[column] else None), column
        assert row["on_supplemental_oxygen"] == (csv_row["on_supplemental_oxygen"] == "True")
        assert row["consciousness_level"] == (csv_row["consciousness_level"] or None)
        assert row["encounter_id"] is None or row["encounter_id"].startswith(f"ENC-{row['patient_id']}-")
    assert any(e["after"]["encounter_id"] for e in inserts)


def test_every_later_change_of_a_row_has_a_higher_lsn(replay):
    lsns_by_row = defaultdict(list)
    pk = {"vital_signs": "id", "encounters": "encounter_id", "patients": "patient_id"}
    for m in replay.messages:
        if is_cdc_change(m):
            e = decode_cdc(m)
            row = e["after"] or e["before"]
            lsns_by_row[(m.table, row[pk[m.table]])].append((e["source"]["lsn"], e["op"]))
    changed = [v for v in lsns_by_row.values() if {op for _, op in v} - {"c"}]
    assert changed
    for changes in changed:
        ops_by_lsn = [op for _, op in sorted(set(changes))]
        assert ops_by_lsn[0] == "c" and ops_by_lsn[1:] in (["u"], ["d"])


# --- the context tables: patients and encounters ---------------------------------------------------


@pytest.fixture(scope="module")
def csv_encounters(cohort) -> dict[str, dict]:
    with (cohort / "csv" / "encounters.csv").open() as f:
        return {r["encounter_id"]: r for r in csv.DictReader(f)}


def context_changes(replay, table: str) -> list[tuple[int, dict]]:
    """(position, decoded change) of every change of a context table, in delivery order."""
    return [(p, decode_cdc(m)) for p, m in enumerate(replay.messages) if m.table == table]


def days_to_year(days: int) -> int:
    return (datetime(1970, 1, 1) + timedelta(days=days)).year


def test_each_patient_has_one_patients_row_with_sex_and_the_birth_year_from_age(replay, cohort, csv_encounters):
    with (cohort / "csv" / "patients.csv").open() as f:
        csv_patients = {r["patient_id"]: r for r in csv.DictReader(f)}
    rows = context_changes(replay, "patients")
    assert sorted(e["after"]["patient_id"] for _, e in rows) == sorted(replay.manifest["patients"])
    for _, e in rows:
        row, source = e["after"], e["source"]
        assert e["op"] == "c" and e["key"] == {"patient_id": row["patient_id"]} and source["table"] == "patients"
        patient = csv_patients[row["patient_id"]]
        assert row["sex"] == {"M": "male", "F": "female"}[patient["sex"]]
        first_admission = min(r["admission_datetime"] for r in csv_encounters.values()
                               if r["patient_id"] == row["patient_id"])
        assert days_to_year(row["birth_date"]) == int(first_admission[:4]) - int(patient["age"])


def test_each_stay_is_admitted_in_progress_on_its_ward(replay, csv_encounters):
    inserts = [e for _, e in context_changes(replay, "encounters") if e["op"] == "c"]
    kept = set(replay.manifest["patients"])
    assert sorted(e["after"]["encounter_id"] for e in inserts) == sorted(
        k for k, r in csv_encounters.items() if r["patient_id"] in kept)
    for e in inserts:
        row = e["after"]
        stay = csv_encounters[row["encounter_id"]]
        assert e["key"] == {"patient_id": stay["patient_id"]} == {"patient_id": row["patient_id"]}
        assert (row["ward"], row["bed"], row["encounter_class"]) == (stay["ward_id"], stay["bed_number"],
                                                                     stay["encounter_type"])
        assert row["status"] == "in-progress" and row["discharged_at"] is None
        assert row["admitted_at"] == row["updated_at"] == micros(stay["admission_datetime"])


def test_a_stay_is_finished_only_when_its_discharge_falls_within_the_replay(replay, csv_encounters):
    times = [t for t in map(availability_us, replay.messages) if t is not None]
    updates = {e["after"]["encounter_id"]: e for _, e in context_changes(replay, "encounters") if e["op"] == "u"}
    inserted = {e["after"]["encounter_id"]: e["after"] for _, e in context_changes(replay, "encounters")
                if e["op"] == "c"}
    assert updates, "the test cohort has stays discharged within the replay"
    for encounter_id, admitted in inserted.items():
        discharge = micros(csv_encounters[encounter_id]["discharge_datetime"])
        if not min(times) <= discharge <= max(times):
            assert encounter_id not in updates  # still in hospital when the replay ends
            continue
        u = updates[encounter_id]
        assert u["before"] == admitted  # REPLICA IDENTITY FULL
        assert {c for c in u["after"] if u["after"][c] != admitted[c]} == {"status", "discharged_at", "updated_at"}
        assert u["after"]["status"] == "finished" and u["after"]["discharged_at"] == discharge
        assert u["source"]["ts_us"] >= discharge


def test_a_patient_is_registered_and_admitted_before_any_of_their_vitals_or_labs(replay):
    first = {}  # (table or "fhir", patient) -> first position
    for p, m in enumerate(replay.messages):
        if is_cdc_change(m):
            patient = json.loads(m.key)["payload"]["patient_id"]
            first.setdefault((m.table, patient), p)
        elif m.kind == "fhir" and m.key:
            first.setdefault(("fhir", m.key.decode()), p)
    for patient in replay.manifest["patients"]:
        assert first[("patients", patient)] < first[("encounters", patient)] < first[("vital_signs", patient)]
        assert first[("encounters", patient)] < first.get(("fhir", patient), len(replay.messages))


def test_context_tables_do_not_change_the_faults(replay):
    """The manifest's positions still point at the messages they describe once context rows are merged in."""
    man = replay.manifest
    assert man["counts"]["cdc_patient_insert"] == len(man["patients"])
    for r in man["reordered"]:
        assert all(replay.messages[p].table == "vital_signs" for p in r["positions"])
    for r in man["redelivered"]:
        assert replay.messages[r["position"]].table == "vital_signs"


# --- FHIR -----------------------------------------------------------------------------------------


def test_notifications_are_valid_r4b_history_bundles_keyed_by_the_cdc_patient_id(replay, csv_vitals):
    patients = {p for p, _ in csv_vitals}
    bad = bad_positions(replay)
    kinds = defaultdict(int)
    last_event = {}
    for p, m in enumerate(replay.messages):
        if m.kind != "fhir" or p in bad:
            continue
        Bundle.model_validate_json(m.value)  # raises if not a valid R4B Bundle
        bundle = json.loads(m.value)
        status = bundle["entry"][0]["resource"]
        assert bundle["type"] == "history" and status["resourceType"] == "SubscriptionStatus"
        assert status["status"] == "active"
        kinds[status["type"]] += 1
        if status["type"] != "event-notification":
            assert len(bundle["entry"]) == 1 and "notificationEvent" not in status
            continue
        obs = observation(bundle)
        event = status["notificationEvent"][0]
        assert event["focus"]["reference"] == f"Observation/{obs['id']}"
        assert event["eventNumber"] == status["eventsSinceSubscriptionStart"]
        mrn = obs["subject"]["identifier"]
        assert mrn["system"] == MRN_SYSTEM and mrn["value"] in patients and m.key == mrn["value"].encode()
        assert obs["meta"]["versionId"] in ("1", "2")
        if obs["category"][0]["coding"][0]["code"] == "laboratory":
            assert micros(obs["issued"]) > micros(obs["effectiveDateTime"])
        number, subscription = int(event["eventNumber"]), status["subscription"]["reference"]
        if m.value not in last_event.get(subscription, {}).get("seen", ()):  # duplicates repeat their number
            assert number == last_event.get(subscription, {}).get("number", 0) + 1
            last_event.setdefault(subscription, {"seen": set()}).update(number=number)
            last_event[subscription]["seen"].add(m.value)
    assert kinds["handshake"] >= 1 and kinds["heartbeat"] >= 1 and kinds["event-notification"] > 10


def availability_us(m: RawMessage) -> int | None:
    if is_cdc_change(m):
        return json.loads(m.value)["payload"]["source"]["ts_us"]
    bundle = notification(m)
    return micros(bundle["timestamp"]) if bundle else None


def test_messages_are_delivered_in_availability_order_apart_from_injected_faults(replay):
    man = replay.manifest
    faulted = bad_positions(replay) | {r["position"] for r in man["redelivered"] + man["duplicated_notifications"]}
    faulted |= {p for r in man["reordered"] for p in r["positions"]}
    times = [availability_us(m) for p, m in enumerate(replay.messages) if p not in faulted]
    times = [t for t in times if t is not None]
    assert times == sorted(times)
    # a live EHR interleaves its patients rather than sending one patient's stay after another's
    cdc_patients = [json.loads(m.key)["payload"]["patient_id"] for m in replay.messages if is_cdc_change(m)]
    switches = sum(a != b for a, b in zip(cdc_patients, cdc_patients[1:]))
    assert switches > 10 * len(set(cdc_patients))


# --- faults ---------------------------------------------------------------------------------------


def test_redeliveries_and_duplicated_notifications_are_byte_identical_later_copies(replay):
    man = replay.manifest
    assert len(man["redelivered"]) == man["fault_counts"]["redelivered"] > 0
    assert len(man["duplicated_notifications"]) == man["fault_counts"]["duplicated_notifications"] > 0
    for dup, kind in [(r, "cdc") for r in man["redelivered"]] + [(r, "fhir") for r in man["duplicated_notifications"]]:
        copy, original = replay.messages[dup["position"]], replay.messages[dup["original_position"]]
        assert dup["position"] > dup["original_position"] and copy == original and copy.kind == kind
        # re-sent minutes later, as after a connector restart: not days later, past the dedupe horizon
        before_copy = availability_us(replay.messages[dup["position"] - 1])
        assert before_copy - availability_us(original) <= 30 * 60 * 1_000_000


def test_lab_corrections_and_duplicates_target_labs_that_arrive_within_the_lateness_bound(replay):
    """Labs take hours; a correction of a lab the stream already dropped as late would test nothing."""
    man = replay.manifest
    targets = {f.split(":")[1] for f in man["amended_fact_ids"] + man["retracted_fact_ids"] if f.startswith("fhir:")}
    targets |= {f.split(":")[1] for d in man["duplicated_notifications"] for f in d["fact_ids"]}
    targets |= {r["fact_id"].split(":")[1] for r in man["preliminary_results"]}
    firsts = {f"Observation/{o['id']}": o for b in map(notification, replay.messages) if b and (o := observation(b))
              and o["meta"]["versionId"] == "1"}
    assert len(targets) >= 3
    for t in targets:
        assert micros(firsts[t]["issued"]) - micros(firsts[t]["effectiveDateTime"]) < 3600 * 1_000_000


def test_preliminary_results_come_first_then_their_final_version_as_announced(replay):
    """A lab reported preliminary, then final minutes later: once with the same value (only the flag
    goes), once with a changed value (a real correction)."""
    man = replay.manifest
    prelim = man["preliminary_results"]
    assert len(prelim) == man["fault_counts"]["preliminary"] == 2
    assert sorted(r["final_value"] == r["preliminary_value"] for r in prelim) == [False, True]
    for r in prelim:
        first, final = (observation(notification(replay.messages[p])) for p in (r["position"], r["final_position"]))
        assert r["position"] < r["final_position"] and first["id"] == final["id"] == observation_id(r["fact_id"])
        assert (first["status"], first["meta"]["versionId"], first["valueQuantity"]["value"]) == \
            ("preliminary", "1", r["preliminary_value"])
        assert (final["status"], final["meta"]["versionId"], final["valueQuantity"]["value"]) == \
            ("final", "2", r["final_value"])
        assert final["effectiveDateTime"] == first["effectiveDateTime"]
        # made available minutes later, not days: the dedupe horizon still knows the preliminary version
        assert 0 < micros(final["issued"]) - micros(first["issued"]) <= 2 * 3600 * 1_000_000
        assert replay.messages[r["final_position"]].key == replay.messages[r["position"]].key  # same patient
    # every preliminary Observation is announced, and takes part in no other fault: delivered exactly
    # twice (preliminary, final), never duplicated, amended or retracted
    deliveries = defaultdict(list)
    for b in map(notification, replay.messages):
        if b and (obs := observation(b)):
            deliveries[obs["id"]].append(obs["status"])
    announced = {observation_id(r["fact_id"]) for r in prelim}
    assert {i for i, statuses in deliveries.items() if "preliminary" in statuses} == announced
    assert all(deliveries[i] == ["preliminary", "final"] for i in announced)
    others = man["amended_fact_ids"] + man["retracted_fact_ids"] + [f for d in man["duplicated_notifications"]
                                                                   for f in d["fact_ids"]]
    assert not {r["fact_id"] for r in prelim} & set(others)


def test_the_ingest_reads_a_preliminary_result_then_its_final_version(replay):
    events = defaultdict(list)  # fact id -> (status, version, value), in delivery order
    for e in _canonical_events(replay):
        events[e.fact_id].append((e.status.value, e.version, e.value))
    for r in replay.manifest["preliminary_results"]:
        assert events[r["fact_id"]] == [("preliminary", 1, r["preliminary_value"]), ("final", 2, r["final_value"])]


def test_late_rows_must_be_later_than_the_allowed_lateness(cohort):
    with pytest.raises(ValueError):
        build_replay(cohort, late_by_s=1800, allowed_lateness_s=3600)


def test_amendments_carry_a_higher_version_and_the_announced_value(replay):
    man = replay.manifest
    fhir_v2 = [observation(b) for b in map(notification, replay.messages) if b and observation(b)
               and observation(b)["meta"]["versionId"] == "2" and observation(b)["status"] == "amended"]
    assert fhir_v2
    for obs in fhir_v2:
        fact = next(f for f in man["amended_fact_ids"] if f.startswith(f"fhir:Observation/{obs['id']}:"))
        assert obs["valueQuantity"]["value"] == man["amended_values"][fact]
    updates = [decode_cdc(m) for m in replay.messages if is_vital_change(m) and json.loads(m.value)["payload"]["op"] == "u"]
    assert updates
    for u in updates:
        changed = {c for c in u["after"] if u["after"][c] != u["before"][c]}
        assert changed == {"heart_rate"}
        fact = f"cdc:vital_signs:{u['after']['id']}:8867-4"
        assert fact in man["amended_fact_ids"] and man["amended_values"][fact] == u["after"]["heart_rate"]


def test_retractions_are_entered_in_error_versions_and_full_row_deletes_with_tombstones(replay):
    man = replay.manifest
    retracted = [observation(b) for b in map(notification, replay.messages) if b and observation(b)
                 and observation(b)["status"] == "entered-in-error"]
    assert retracted and all(o["meta"]["versionId"] == "2" for o in retracted)
    assert all(any(f.startswith(f"fhir:Observation/{o['id']}:") for f in man["retracted_fact_ids"]) for o in retracted)

    inserted = {}
    deletes = 0
    for p, m in enumerate(replay.messages):
        if not is_vital_change(m):
            continue
        e = decode_cdc(m)
        if e["op"] == "c":
            inserted[e["after"]["id"]] = e["after"]
        if e["op"] == "d":
            deletes += 1
            assert e["after"] is None and e["before"] == inserted[e["before"]["id"]]  # REPLICA IDENTITY FULL
            tombstone = replay.messages[p + 1]
            assert tombstone.key == m.key and tombstone.value is None
            assert f"cdc:vital_signs:{e['before']['id']}:8867-4" in man["retracted_fact_ids"] or \
                not e["before"]["heart_rate"]
    assert deletes == sum(1 for f in {f.rsplit(":", 1)[0] for f in man["retracted_fact_ids"]} if f.startswith("cdc:"))


def test_late_rows_arrive_long_after_newer_vitals_of_the_same_patient(replay):
    man = replay.manifest
    late_rows = {int(f.split(":")[2]) for f in man["late_fact_ids"]}
    assert len(late_rows) == man["fault_counts"]["late"] > 0
    newest = {}  # patient -> newest measured_at delivered so far
    for m in replay.messages:
        if not is_vital_change(m) or json.loads(m.value)["payload"]["op"] != "c":
            continue
        row = decode_cdc(m)["after"]
        if row["id"] in late_rows:
            assert newest[row["patient_id"]] - row["measured_at"] > man["late_by_s"] * 1_000_000
        newest[row["patient_id"]] = max(newest.get(row["patient_id"], 0), row["measured_at"])


def test_cross_source_duplicates_repeat_an_earlier_cdc_vital_exactly(replay):
    man = replay.manifest
    assert len(man["cross_source_duplicate_fact_ids"]) == man["fault_counts"]["cross_source_duplicate"] > 0
    seen_rows = {}
    found = 0
    for m in replay.messages:
        if is_vital_change(m):
            row = decode_cdc(m)["after"]
            if row:
                seen_rows[(row["patient_id"], row["measured_at"])] = row
        elif (b := notification(m)) and (obs := observation(b)):
            fact = f"fhir:Observation/{obs['id']}:"
            if not any(f.startswith(fact) for f in man["cross_source_duplicate_fact_ids"]):
                continue
            found += 1
            row = seen_rows[(obs["subject"]["identifier"]["value"], micros(obs["effectiveDateTime"]))]
            codings = {c["code"] for c in obs["code"]["coding"]}
            column = "spo2" if codings == {"59408-5", "2708-6"} else "heart_rate" if codings == {"8867-4"} else None
            assert column and Decimal(str(obs["valueQuantity"]["value"])) == row[column]
    assert found == man["fault_counts"]["cross_source_duplicate"]


def test_reordered_pairs_deliver_the_newer_of_two_close_measurements_first(replay):
    man = replay.manifest
    assert len(man["reordered"]) == man["fault_counts"]["reordered"] > 0
    for r in man["reordered"]:
        first, second = (decode_cdc(replay.messages[p])["after"] for p in r["positions"])
        assert first["patient_id"] == second["patient_id"]
        assert 0 <= first["measured_at"] - second["measured_at"] < 3600 * 1_000_000  # default allowed lateness


def test_bad_messages_are_malformed_as_announced(replay):
    bad = replay.manifest["bad_messages"]
    assert {b["kind"] for b in bad} == {"bad_json", "bad_cdc_json", "bad_resource", "bad_heart_rate"}
    for b in bad:
        m = replay.messages[b["position"]]
        assert m.kind == b["topic_kind"]
        if b["kind"] in ("bad_json", "bad_cdc_json"):
            assert parse_json(m) is None
        elif b["kind"] == "bad_resource":
            assert parse_json(m)["resourceType"] != "Bundle"
        else:
            assert decode_cdc(m)["after"]["heart_rate"] > 300


# --- switches -------------------------------------------------------------------------------------


def test_without_faults_every_message_is_a_clean_first_delivery(cohort, csv_vitals):
    clean = build_replay(cohort, faults=False, seed=3)
    man = clean.manifest
    assert set(man["fault_counts"].values()) == {0}
    assert not (man["late_fact_ids"] or man["amended_fact_ids"] or man["retracted_fact_ids"]
                or man["cross_source_duplicate_fact_ids"] or man["redelivered"] or man["reordered"]
                or man["preliminary_results"])
    assert len(set(clean.messages)) == len(clean.messages)
    ops = {json.loads(m.value)["payload"]["op"] for m in clean.messages if m.table == "vital_signs"}
    assert ops == {"c"} and man["counts"]["cdc_insert"] == len(csv_vitals)
    for m in clean.messages:
        if m.kind == "fhir":
            Bundle.model_validate_json(m.value)
            obs = observation(json.loads(m.value))
            assert obs is None or (obs["meta"]["versionId"] == "1" and obs["status"] == "final")
    times = [availability_us(m) for m in clean.messages]
    assert times == sorted(times)


def test_the_build_is_deterministic_for_a_seed(cohort, replay):
    again = build_replay(cohort, seed=3)
    assert again.messages == replay.messages and again.manifest == replay.manifest
    other = build_replay(cohort, seed=4)
    assert other.manifest["late_fact_ids"] != replay.manifest["late_fact_ids"]


def test_max_patients_keeps_only_that_many_patients(cohort):
    small = build_replay(cohort, seed=3, max_patients=1)
    assert len(small.manifest["patients"]) == 1
    keys = {json.loads(m.key)["payload"]["patient_id"] for m in small.messages if m.kind == "cdc" and m.key}
    keys |= {m.key.decode() for m in small.messages if m.kind == "fhir" and m.key}
    assert keys == set(small.manifest["patients"])


def _canonical_events(replay) -> list:
    """Every canonical event the ingest parsers make of the replay, in delivery order."""
    from streams.topics import topics_for
    from wardwatch.settings import Settings
    from wardwatch.soak import parsed_events

    settings = Settings()
    return parsed_events(replay.messages, topics_for(settings), settings)


def test_a_shifted_replay_is_the_same_facts_moved_in_time_by_the_shift(cohort):
    day_ms = 86_400_000
    plain = build_replay(cohort, faults=False, seed=3)
    shifted = build_replay(cohort, faults=False, seed=3, shift_s=20 * 86_400)
    before, after = _canonical_events(plain), _canonical_events(shifted)
    assert len(before) == len(after) > 100
    for a, b in zip(before, after, strict=True):
        assert (b.patient_id, b.code, b.value, b.value_text, b.source, b.status) == \
            (a.patient_id, a.code, a.value, a.value_text, a.source, a.status)
        if not is_context(a.code_system):  # every measurement moves, under its own fact id
            assert b.fact_id == a.fact_id and b.effective_ms - a.effective_ms == 20 * day_ms
        elif a.effective_ms > 0:  # context: stays move (a location fact is named by its time); birth years stay
            assert b.effective_ms - a.effective_ms in (0, 20 * day_ms)
    moved = sum(b.effective_ms - a.effective_ms == 20 * day_ms for a, b in zip(before, after))
    assert moved >= 0.9 * len(before)  # every measurement and stay; not the birth years
    start, end = plain.manifest["time_span_us"]
    assert shifted.manifest["time_span_us"] == [start + 20 * day_ms * 1000, end + 20 * day_ms * 1000]
    assert start < end


# --- publishing (real broker) ---------------------------------------------------------------------


@pytest.mark.integration
def test_publish_delivers_every_message_to_its_topic_with_a_produce_timestamp(cohort, settings):
    from confluent_kafka import Consumer, TopicPartition

    from streams.replay import publish
    from streams.topics import ensure_topics, topics_for

    small = build_replay(cohort, seed=3, max_patients=1)
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    done = []
    counts = publish(small, settings, topics, progress=done.append)
    expected = {topics.cdc[table]: [m for m in small.messages if m.table == table]
                for table in ("vital_signs", "encounters", "patients")}
    expected[topics.fhir] = [m for m in small.messages if m.kind == "fhir"]
    assert all(expected.values())
    assert counts["messages"] == len(small.messages) and done[-1] == len(small.messages)

    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-replay",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(t, p, 0) for t in expected for p in range(topics.partitions)])
    received = defaultdict(list)
    deadline = datetime.now() + timedelta(seconds=60)
    try:
        while sum(map(len, received.values())) < len(small.messages) and datetime.now() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                received[msg.topic()].append(msg)
    finally:
        consumer.close()
    for topic, sent in expected.items():
        got = received[topic]
        assert sorted((m.key() or b"", m.value() or b"") for m in got) == sorted((m.key or b"", m.value or b"") for m in sent)
        assert all(int(dict(m.headers())["ww.produced_ns"]) > 0 for m in got)
