"""Debezium change events -> canonical events, over the fixture corpus in tests/fixtures/ingest/cdc.

Expected values are worked out by hand from the fixture text (see the comments), not from the parser.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from schemas import codes
from schemas.canonical import Source, Status
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.ingest_outcome import Control, Ignored, Parsed, Rejected
from tests.fixtures.ingest.corpus import (CDC_PREFIX, RawMessage, cdc_message, cdc_messages, cdc_names, raw_file,
                                          replace_nth_value)

MEASURED_MS = 1_718_460_396_123  # 2024-06-15T14:06:36.123275Z (fixture µs 1718460396123275)
COMMIT_MS = 1_718_460_400_500
ALL_VITAL_CODES = {codes.HEART_RATE, codes.RESP_RATE, codes.SPO2, codes.O2_FLOW, codes.SYSTOLIC_BP,
                   codes.DIASTOLIC_BP, codes.TEMPERATURE, codes.CONSCIOUSNESS}
# what a removed vitals row whose `before` cannot tell retracts: every code, oxygen without a flow too
ROW_CODES = ALL_VITAL_CODES | {codes.SUPPLEMENTAL_O2}


def parse(msg: RawMessage, offset: int = 0):
    return parse_cdc(msg.topic, msg.key, msg.value, partition=3, offset=offset, cdc_topic_prefix=CDC_PREFIX)


def parsed(name: str) -> Parsed:
    outcome = parse(cdc_message(name))
    assert isinstance(outcome, Parsed), outcome
    return outcome


def by_code(outcome: Parsed):
    result = {e.code: e for e in outcome.events}
    assert len(result) == len(outcome.events), "one event per code"
    return result


def rejection(name: str):
    outcome = parse(cdc_message(name))
    assert isinstance(outcome, Rejected), outcome
    return outcome.rejection


# --- creates and snapshot reads ------------------------------------------------------------------


def test_schema_wrapped_row_becomes_one_event_per_column():
    events = by_code(parsed("create_schema_wrapped"))
    assert {c: e.value for c, e in events.items()} == {
        codes.HEART_RATE: 116, codes.RESP_RATE: 21,
        codes.SPO2: 97.5,  # base64 "A88=" = 0x03CF = 975, scale 1
        codes.O2_FLOW: 2.0,  # "FA==" = 20
        codes.SYSTOLIC_BP: 91, codes.DIASTOLIC_BP: 45,
        codes.TEMPERATURE: 38.4,  # "AYA=" = 384
        codes.CONSCIOUSNESS: 2.0,  # V
    }
    hr = events[codes.HEART_RATE]
    assert hr.patient_id == "MRN-0001" and hr.encounter_id == "ENC-0001"
    assert hr.effective_ms == MEASURED_MS and hr.issued_ms == COMMIT_MS
    assert hr.fact_id == "cdc:vital_signs:42:8867-4" and hr.version == 24023128
    assert hr.status is Status.FINAL and hr.source is Source.CDC and hr.unit == "/min"
    assert events[codes.CONSCIOUSNESS].value_text == "V"
    assert hr.provenance == {
        "table": "vital_signs", "pk": "42", "lsn": 24023128, "txId": 767, "source_ts_ms": COMMIT_MS,
        "topic": "ehr.public.vital_signs", "partition": 3, "offset": 0, "op": "c", "snapshot": False,
        "commit_lsn": 24022728,  # first element of the string-encoded source.sequence
    }


def test_bare_row_without_schemas_and_on_air_is_zero_oxygen_flow():
    events = by_code(parsed("create_bare"))
    assert events[codes.SPO2].value == 95.0 and events[codes.TEMPERATURE].value == 36.9
    assert events[codes.CONSCIOUSNESS].value == 0.0 and events[codes.CONSCIOUSNESS].value_text == "A"
    # flow column is null but on_supplemental_oxygen is false: breathing air is a fact
    assert events[codes.O2_FLOW].value == 0.0 and events[codes.O2_FLOW].status is Status.FINAL
    assert events[codes.HEART_RATE].fact_id == "cdc:vital_signs:7:8867-4"


def test_sparse_row_with_string_decimals_and_iso_time_yields_only_present_columns():
    events = by_code(parsed("create_bare_strings"))
    assert {c: e.value for c, e in events.items()} == {codes.TEMPERATURE: 40.8, codes.SPO2: 91.5}
    assert events[codes.TEMPERATURE].effective_ms == MEASURED_MS + 51 * 60_000  # 14:57:36.123275Z


def test_zoned_timestamp_and_variable_scale_decimal():
    events = by_code(parsed("zoned_variable_scale"))
    assert events[codes.SPO2].value == 97.5  # {"scale": 2, "value": "JhY="} = 9750e-2
    assert events[codes.HEART_RATE].effective_ms == MEASURED_MS  # 16:06:36.123+02:00


# --- naive `timestamp` columns in the database's time zone (WARDWATCH_CDC_TIMEZONE) -----------------


def parse_in(msg: RawMessage, zone: str):
    return parse_cdc(msg.topic, msg.key, msg.value, partition=3, offset=0, cdc_topic_prefix=CDC_PREFIX,
                     cdc_timezone=zone)


def test_naive_timestamps_are_wall_clock_time_in_the_databases_zone():
    """Debezium sends a `timestamp` (no zone) column as its wall-clock reading "as if UTC". A hospital
    database keeping local time at +02:00 had every CDC time read 2 h late: CDC and FHIR copies of one
    reading no longer matched, and a row taken at its commit looked 2 h in the future (dead-lettered)."""
    berlin_ms = MEASURED_MS - 2 * 3_600_000  # 14:06:36.123 CEST (+02:00) is 12:06:36.123Z
    for name in ("create_schema_wrapped", "create_bare"):  # MicroTimestamp; µs without a schema
        (hr,) = [e for e in parse_in(cdc_message(name), "Europe/Berlin").events if e.code == codes.HEART_RATE]
        assert hr.effective_ms == berlin_ms and hr.issued_ms == COMMIT_MS  # the commit time is a real instant
    naive = _changed(cdc_message("create_bare_strings"), measured_at="2024-06-15T14:57:36.123275")  # ISO, no offset
    assert by_code(parse_in(naive, "Europe/Berlin"))[codes.TEMPERATURE].effective_ms == berlin_ms + 51 * 60_000
    # an ISO string with its offset ("...Z") is an instant: unaffected
    assert by_code(parse_in(cdc_message("create_bare_strings"), "Europe/Berlin"))[codes.TEMPERATURE].effective_ms \
        == MEASURED_MS + 51 * 60_000
    # timestamptz (ZonedTimestamp: an ISO string with its offset) is an instant already: unaffected
    zoned = by_code(parse_in(cdc_message("zoned_variable_scale"), "America/New_York"))
    assert zoned[codes.HEART_RATE].effective_ms == MEASURED_MS
    # UTC is the default and changes nothing
    assert by_code(parse_in(cdc_message("create_schema_wrapped"), "UTC")) == by_code(parsed("create_schema_wrapped"))


def test_a_row_taken_at_its_commit_in_local_time_is_not_future_dated():
    commit_local_us = (COMMIT_MS + 2 * 3_600_000) * 1000  # the commit instant on a +02:00 wall clock
    msg = _changed(cdc_message("create_bare"), measured_at=commit_local_us)
    assert parse(msg).rejection.reason is Reason.FUTURE_TIME  # read as UTC: 2 h after its own commit
    (hr,) = [e for e in parse_in(msg, "Europe/Berlin").events if e.code == codes.HEART_RATE]
    assert hr.effective_ms == COMMIT_MS


@pytest.mark.parametrize("timestamp_type, scale", [("io.debezium.time.Timestamp", 1),
                                                   ("io.debezium.time.MicroTimestamp", 1000),
                                                   ("io.debezium.time.NanoTimestamp", 1_000_000)])
def test_every_naive_debezium_timestamp_type_is_read_in_the_zone_across_dst(timestamp_type, scale):
    """Wall times around Europe/Berlin's 2024 transitions. Fall-back (27 Oct, 03:00 CEST -> 02:00 CET): a wall
    time in 02:00-03:00 happened twice and a zone-less column cannot say which: the first (CEST, +02:00),
    as java.time resolves it. Spring-forward (31 Mar, 02:00 CET -> 03:00 CEST): 02:00-03:00 never happened
    on the wall; read with the offset before the jump (+01:00), i.e. 03:30 CEST, as java.time and
    PostgreSQL do."""
    cases = {"2024-10-27T01:30:00": "2024-10-26T23:30:00",  # CEST
             "2024-10-27T02:30:00": "2024-10-27T00:30:00",  # repeated: the first (CEST)
             "2024-10-27T03:30:00": "2024-10-27T02:30:00",  # CET
             "2024-03-31T01:30:00": "2024-03-31T00:30:00",  # CET
             "2024-03-31T02:30:00": "2024-03-31T01:30:00",  # skipped: +01:00 (= 03:30 CEST)
             "2024-03-31T03:30:00": "2024-03-31T01:30:00"}  # CEST
    for wall, instant in cases.items():
        doc = json.loads(cdc_message("create_schema_wrapped").value)
        for part in doc["schema"]["fields"]:
            for column in part.get("fields", []):
                if column["field"] == "measured_at":
                    column["name"] = timestamp_type
        doc["payload"]["after"]["measured_at"] = utc_ms(wall) * scale
        doc["payload"]["source"]["ts_ms"] = utc_ms(instant) + 1000  # committed a second later
        msg = RawMessage("ehr.public.vital_signs", cdc_message("create_schema_wrapped").key, json.dumps(doc).encode())
        outcome = parse_in(msg, "Europe/Berlin")
        assert isinstance(outcome, Parsed), (wall, outcome)
        assert {e.effective_ms for e in outcome.events} == {utc_ms(instant)}, wall


@pytest.mark.parametrize("name", ["snapshot_read", "snapshot_read_bool"])
def test_snapshot_reads_are_facts_flagged_as_snapshot(name):
    outcome = parsed(name)
    assert len(outcome.events) == 8
    assert all(e.status is Status.FINAL and e.provenance["snapshot"] is True for e in outcome.events)
    assert outcome.events[0].provenance["op"] == "r"


def test_snapshot_sequence_with_null_commit_lsn():
    assert parsed("snapshot_read").events[0].provenance["commit_lsn"] is None


# --- updates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["update_full", "update_default_identity"])
def test_update_is_a_new_version_and_a_nulled_column_retracts(name):
    events = by_code(parsed(name))
    assert events[codes.HEART_RATE].value == 92 and events[codes.HEART_RATE].version == 24030000
    spo2 = events[codes.SPO2]
    assert spo2.status is Status.ENTERED_IN_ERROR and spo2.value is None
    assert spo2.fact_id == "cdc:vital_signs:7:59408-5"  # same fact as the create: a retraction of it
    # without a full `before` nothing shows the row did not say "on oxygen, flow not charted": retracted
    retracted = {codes.SPO2} | ({codes.SUPPLEMENTAL_O2} if name == "update_default_identity" else set())
    assert {c for c, e in events.items() if e.status is not Status.FINAL} == retracted


def test_update_with_unchanged_toasted_column_skips_that_column():
    events = by_code(parsed("update_toasted"))
    assert codes.CONSCIOUSNESS not in events
    assert events[codes.HEART_RATE].value == 99


def _without(name: str, *columns: str, op: str | None = None) -> RawMessage:
    """The fixture's message with columns removed from its `after` row (a schema change renamed or
    dropped them, or the connector's column.exclude.list leaves them out)."""
    msg = cdc_message(name)
    value = json.loads(msg.value)
    for column in columns:
        del value["after"][column]
    if op:
        value["op"] = op
    return RawMessage(msg.topic, msg.key, json.dumps(value).encode())


@pytest.mark.parametrize("op", ["c", "u"])
def test_a_column_missing_from_the_row_is_counted_not_null(op):
    """heart_rate renamed to pulse in the EHR: every row arrives without it. A null would retract the
    row's heart rate on each update (a live value gone); nothing at all would hide that the pipeline
    lost every heart rate."""
    outcome = parse(_without("update_default_identity", "heart_rate", op=op))
    assert isinstance(outcome, Parsed), outcome
    assert codes.HEART_RATE not in by_code(outcome)
    assert outcome.skipped == {"missing_column:heart_rate": 1}
    assert by_code(outcome)[codes.RESP_RATE].status is Status.FINAL  # the rest of the row as before


def test_a_lab_row_without_its_code_column_is_not_an_unmapped_code():
    outcome = parse(_without("lab_creatinine_umol_bare", "loinc_code"))
    assert isinstance(outcome, Ignored) and outcome.detail == {"skipped": {"missing_column:loinc_code": 1}}
    outcome = parse(_without("lab_creatinine_umol_bare", "value", op="u"))  # not a retraction of the result
    assert isinstance(outcome, Ignored) and outcome.detail == {"skipped": {"missing_column:value": 1}}


def test_an_encounter_without_its_discharge_column_retracts_no_discharge():
    outcome = parse(_without("encounter_update_default_identity", "discharged_at"))
    assert isinstance(outcome, Parsed), outcome
    assert all(e.status is Status.FINAL for e in outcome.events)
    assert outcome.skipped == {"missing_column:discharged_at": 1}


def test_update_that_moves_the_row_to_another_patient_retracts_from_the_old_one():
    outcome = parsed("update_patient_moved")
    new = [e for e in outcome.events if e.patient_id == "MRN-0009"]
    old = [e for e in outcome.events if e.patient_id == "MRN-0002"]
    assert {e.code for e in new} == ALL_VITAL_CODES and all(e.status is Status.FINAL for e in new)
    assert {e.code for e in old} == ALL_VITAL_CODES and all(e.status.retracts for e in old)


def _changed(msg: RawMessage, **changes) -> RawMessage:
    """The message with its envelope (payload) fields or `after` columns changed."""
    doc = json.loads(msg.value)
    envelope = doc.get("payload", doc)
    for name, value in changes.items():
        if name in ("before", "after", "op"):
            envelope[name] = value
        else:
            envelope["after"][name] = value
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


def test_an_update_that_no_longer_says_on_air_retracts_the_air_flow_it_charted():
    msg = cdc_message("update_full")
    before = json.loads(msg.value).get("payload", json.loads(msg.value))["before"]
    on_air = dict(before, oxygen_flow_rate_lpm=None, on_supplemental_oxygen=False)  # charted flow 0 (air)
    for flag in (True, None):  # now on oxygen with the flow not charted, or the flag cleared
        update = _changed(msg, before=on_air, after=dict(on_air, on_supplemental_oxygen=flag))
        flow = by_code(parse(update))[codes.O2_FLOW]
        assert flow.status is Status.ENTERED_IN_ERROR and flow.fact_id == "cdc:vital_signs:7:3151-8"
    unchanged = _changed(msg, before=on_air, after=dict(on_air))
    assert by_code(parse(unchanged))[codes.O2_FLOW].value == 0.0  # still air


def test_on_oxygen_with_the_flow_not_charted_is_a_supplemental_oxygen_fact_without_a_flow():
    # on_supplemental_oxygen true, oxygen_flow_rate_lpm NULL: no oxygen fact at all made NEWS2 score the
    # patient as on air (2 points lost). The row says "oxygen", not how much: no flow value is invented.
    msg = cdc_message("update_full")
    before = json.loads(msg.value).get("payload", json.loads(msg.value))["before"]
    on_oxygen = dict(before, oxygen_flow_rate_lpm=None, on_supplemental_oxygen=True)
    events = by_code(parse(_changed(msg, op="c", before=None, after=on_oxygen)))
    assert codes.O2_FLOW not in events
    given = events[codes.SUPPLEMENTAL_O2]
    assert (given.value, given.status, given.fact_id) == (1.0, Status.FINAL, "cdc:vital_signs:7:supplemental-oxygen")
    assert given.code_system == codes.WARDWATCH  # wardwatch's own code, not a LOINC one
    # charted with its flow: the flow is the fact; an update that now gives the flow (or says air) retracts it
    for after in (dict(on_oxygen, oxygen_flow_rate_lpm=2.0), dict(on_oxygen, on_supplemental_oxygen=False)):
        update = by_code(parse(_changed(msg, before=on_oxygen, after=after)))
        assert update[codes.SUPPLEMENTAL_O2].status is Status.ENTERED_IN_ERROR
    # a row that never said it (full `before`: flow charted) retracts nothing
    assert codes.SUPPLEMENTAL_O2 not in by_code(parse(_changed(msg, before=before, after=dict(before))))


# --- deletes, tombstones, primary-key change -----------------------------------------------------


def test_delete_with_full_identity_retracts_every_code_then_tombstone_is_control():
    delete, tombstone = (parse(m) for m in cdc_messages("delete_full"))
    assert isinstance(delete, Parsed)
    assert {e.code for e in delete.events} == ALL_VITAL_CODES  # its full `before` was not on oxygen without a flow
    assert all(e.status is Status.ENTERED_IN_ERROR and e.value is None for e in delete.events)
    assert {e.patient_id for e in delete.events} == {"MRN-0002"}
    assert {e.effective_ms for e in delete.events} == {MEASURED_MS}
    assert isinstance(tombstone, Control) and tombstone.kind == "tombstone"


def test_delete_with_default_identity_takes_patient_from_key_and_time_from_commit():
    events = parsed("delete_key_only").events
    assert {e.patient_id for e in events} == {"MRN-0001"}
    assert {e.fact_id for e in events} == {f"cdc:vital_signs:42:{c}" for c in ROW_CODES}
    assert {e.effective_ms for e in events} == {COMMIT_MS}


def test_delete_without_patient_tells_the_operator_how_to_fix_it():
    r = rejection("delete_no_patient")
    assert r.reason is Reason.MISSING_PATIENT
    assert "REPLICA IDENTITY FULL" in r.detail and "message.key.columns" in r.detail


def test_primary_key_change_retracts_old_facts_and_creates_new_ones():
    delete, tombstone, create = (parse(m) for m in cdc_messages("pk_change"))
    assert {e.fact_id.split(":")[2] for e in delete.events} == {"7"}
    assert all(e.status.retracts for e in delete.events)
    assert isinstance(tombstone, Control)
    assert {e.fact_id.split(":")[2] for e in create.events} == {"70"}
    assert all(e.status is Status.FINAL for e in create.events)


def test_redelivered_change_has_the_same_event_ids():
    msg = cdc_message("create_bare")
    first, again = parse(msg, offset=5), parse(msg, offset=900)  # a connector restart re-sends
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]


# --- rejections and ignored ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reason"), [
    ("heart_rate_5000", Reason.IMPLAUSIBLE_VALUE),
    ("negative_spo2", Reason.IMPLAUSIBLE_VALUE),  # "zg==" = -50, scale 1
    ("nan_spo2", Reason.BAD_VALUE),
    ("wrong_type", Reason.BAD_VALUE),
    ("missing_time", Reason.MISSING_TIME),
    ("ms_time_without_schema", Reason.BAD_VALUE),
    ("unknown_table", Reason.UNKNOWN_TABLE),
])
def test_bad_rows_reject_the_whole_message(name, reason):
    assert rejection(name).reason is reason


@pytest.mark.parametrize("spo2", [{"scale": 10**12, "value": "AQ=="}, {"scale": -(10**12), "value": "AQ=="}])
def test_a_decimal_scale_beyond_postgres_range_is_a_bad_value_not_a_hang(spo2):
    doc = json.loads(cdc_message("create_bare").value)
    doc["after"]["spo2"] = spo2  # a VariableScaleDecimal; 10**scale would never finish
    outcome = parse(RawMessage(f"{CDC_PREFIX}.vital_signs", None, json.dumps(doc).encode()))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.BAD_VALUE


def _measured_as_date(msg: RawMessage, value, schema_name: str | None = None) -> RawMessage:
    doc = json.loads(msg.value)
    envelope = doc.get("payload", doc)
    envelope["after"]["measured_at"] = value
    if schema_name:
        for part in doc["schema"]["fields"]:
            for column in part.get("fields", []):
                if column["field"] == "measured_at":
                    column.update(type="int32", name=schema_name)
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


def test_a_vitals_row_dated_without_a_time_of_day_is_dead_lettered_not_scored_at_midnight():
    """A `date` measurement column (Debezium io.debezium.time.Date: days since the epoch) or an ISO date
    string was read as midnight UTC: the round landed in the 00:00 hourly window, up to 24 h from when it
    was taken. Dead-lettered instead, saying why, without the date."""
    for msg in (_measured_as_date(cdc_message("create_schema_wrapped"), 19_889, "io.debezium.time.Date"),
                _measured_as_date(cdc_message("create_bare"), "2024-06-15"),
                _measured_as_date(cdc_message("create_bare"), "2024-06")):
        outcome = parse(msg)
        assert isinstance(outcome, Rejected), outcome
        r = outcome.rejection
        assert r.reason is Reason.MISSING_TIME and "time of day" in r.detail and "measured_at" in r.detail
        assert "2024" not in r.detail and "19889" not in r.detail
    # a full timestamp string is still read
    assert isinstance(parse(_measured_as_date(cdc_message("create_bare"), "2024-06-15T14:06:36Z")), Parsed)


def test_a_lab_collected_on_a_date_without_a_time_is_dead_lettered():
    msg = cdc_messages("lab_create_schema_wrapped")[0]
    doc = json.loads(msg.value)
    doc["payload"]["after"]["collected_at"] = "2024-06-15"
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode()))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_TIME


def test_rejection_detail_names_the_column_but_not_the_value():
    detail = rejection("heart_rate_5000").detail
    assert "heart_rate" in detail and "5000" not in detail and "MRN" not in detail


@pytest.mark.parametrize("name", ["malformed.txt", "invalid_utf8.bin"])
def test_undecodable_bytes_are_malformed_json(name):
    outcome = parse_cdc(f"{CDC_PREFIX}.vital_signs", None, raw_file("cdc", name), partition=0, offset=0,
                        cdc_topic_prefix=CDC_PREFIX)
    assert isinstance(outcome, Rejected)
    assert outcome.rejection.reason is Reason.MALFORMED_JSON
    assert outcome.rejection.exception == "JSONDecodeError"


@pytest.mark.parametrize(("name", "kind"), [("truncate", "truncate"), ("logical_message", "message")])
def test_truncate_and_logical_messages_are_ignored(name, kind):
    outcome = parse(cdc_message(name))
    assert isinstance(outcome, Ignored) and outcome.kind == kind


def test_json_that_is_not_an_envelope_is_invalid_structure():
    outcome = parse(RawMessage(f"{CDC_PREFIX}.vital_signs", None, b"[1, 2, 3]"))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.INVALID_STRUCTURE


def test_every_fixture_message_yields_exactly_one_outcome():
    for name in cdc_names():
        for msg in cdc_messages(name):
            assert isinstance(parse(msg), Parsed | Rejected | Control | Ignored), name


# --- never raises --------------------------------------------------------------------------------

OUTCOMES = (Parsed, Rejected, Control, Ignored)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
COLUMNS = ["id", "patient_id", "measured_at", "heart_rate", "spo2", "oxygen_flow_rate_lpm",
           "on_supplemental_oxygen", "consciousness_level", "temperature",
           # lab_results, encounters, patients (deploy/postgres/ehr-schema.sql)
           "encounter_id", "loinc_code", "value", "unit", "status", "collected_at", "resulted_at",
           "encounter_class", "ward", "admitted_at", "discharged_at", "updated_at", "birth_date", "sex"]
column_values = json_values | st.sampled_from(["2524-7", "38483-4", "umol/L", "amended", "entered-in-error",
                                               "female", "4E", "1936-03-02", "__debezium_unavailable_value"])
rows = st.dictionaries(st.sampled_from(COLUMNS), column_values, max_size=len(COLUMNS))
envelopes = st.fixed_dictionaries({
    "op": st.sampled_from(["c", "r", "u", "d", "t", "m", "x"]) | json_values,
    "before": st.none() | rows, "after": st.none() | rows,
    "source": st.fixed_dictionaries({"lsn": json_values, "ts_ms": json_values, "snapshot": json_values,
                                     "sequence": json_values, "table": json_values}),
})


@settings(max_examples=300, deadline=None)
@given(key=st.none() | st.binary(max_size=64), value=st.none() | st.binary(max_size=256), topic=st.text(max_size=40))
def test_arbitrary_bytes_never_raise(key, value, topic):
    outcome = parse_cdc(topic, key, value, partition=0, offset=0, cdc_topic_prefix=CDC_PREFIX)
    assert isinstance(outcome, OUTCOMES)


@settings(max_examples=600, deadline=None)
@given(envelope=envelopes, key=st.none() | rows, table=st.sampled_from(sorted(codes.CDC_TABLES)))
def test_arbitrary_envelopes_never_raise(envelope, key, table):
    outcome = parse_cdc(f"{CDC_PREFIX}.{table}", None if key is None else json.dumps(key).encode(),
                        json.dumps(envelope).encode(), partition=0, offset=0, cdc_topic_prefix=CDC_PREFIX)
    assert isinstance(outcome, OUTCOMES)
    if isinstance(outcome, Rejected):
        assert outcome.rejection.reason is not Reason.INTERNAL_ERROR, outcome


@settings(max_examples=600, deadline=None)
@given(name=st.sampled_from(cdc_names()), which=st.integers(0, 2), n=st.integers(0, 10_000), new=column_values)
def test_mutated_fixtures_never_raise_and_never_hit_internal_errors(name, which, n, new):
    changes = [m for m in cdc_messages(name) if m.value is not None]  # e.g. a lifecycle's transfer, a pk change's create
    msg = changes[which % len(changes)]
    doc = replace_nth_value({"key": json.loads(msg.key or b"null"), "value": json.loads(msg.value)}, n, new)
    key = None if doc["key"] is None else json.dumps(doc["key"]).encode()
    outcome = parse(RawMessage(msg.topic, key, json.dumps(doc["value"]).encode()))
    assert isinstance(outcome, OUTCOMES)
    if isinstance(outcome, Rejected):
        assert outcome.rejection.reason is not Reason.INTERNAL_ERROR, outcome


def test_row_without_any_mapped_value_is_ignored():
    msg = cdc_message("create_bare")
    doc = json.loads(msg.value)
    doc["after"] = {**{c: None for c in doc["after"]}, "id": 7, "patient_id": "MRN-0002",
                    "measured_at": doc["after"]["measured_at"]}
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode()))
    assert isinstance(outcome, Ignored) and outcome.kind == "no_values"


def test_an_lsn_wider_than_int64_is_a_bad_value_not_a_crash_later():
    import orjson as _orjson

    from schemas.cdc import parse_cdc
    from schemas.ingest_outcome import Rejected

    value = {"op": "c", "before": None, "ts_ms": 1718000000000,
             "after": {"id": 1, "patient_id": "p1", "measured_at": 1718000000000000, "heart_rate": 80},
             "source": {"table": "vital_signs", "lsn": str(2**70), "ts_ms": 1718000000000, "txId": 1}}
    out = parse_cdc("ehr.public.vital_signs", None, _orjson.dumps(value), partition=0, offset=0,
                    cdc_topic_prefix="ehr.public")
    assert isinstance(out, Rejected) and out.rejection.reason.value == "bad_value"


# --- lab_results: one row is one result ----------------------------------------------------------


def utc_ms(text: str) -> int:
    """Epoch ms of a UTC wall-clock time, worked out independently of the parser."""
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


COLLECTED_MS = utc_ms("2024-06-15T14:00:00")  # the specimen was drawn
RESULTED_MS = utc_ms("2024-06-15T15:30:00")  # the lab released the result
LAB_CODES = {codes.LACTATE, codes.WBC, codes.CREATININE, codes.PLATELETS}


def only_event(name: str, index: int = 0):
    outcome = parse(cdc_messages(name)[index])
    assert isinstance(outcome, Parsed), outcome
    (event,) = outcome.events
    return event


def test_lab_result_is_one_event_at_collection_time_available_when_resulted():
    lactate = only_event("lab_create_schema_wrapped")
    assert (lactate.code, lactate.value, lactate.unit) == (codes.LACTATE, 4.2, "mmol/L")  # "AKQQ" = 42000e-4
    assert lactate.patient_id == "MRN-0001" and lactate.encounter_id == "ENC-0001"
    # windows use the collection time; what the model could have known uses the result time, not the commit
    assert lactate.effective_ms == COLLECTED_MS and lactate.issued_ms == RESULTED_MS
    assert lactate.fact_id == "cdc:lab_results:501:2524-7" and lactate.version == 25010000
    assert lactate.status is Status.FINAL and lactate.source is Source.CDC
    assert lactate.provenance == {
        "table": "lab_results", "pk": "501", "lsn": 25010000, "txId": 1001, "source_ts_ms": 1718465400900,
        "topic": "ehr.public.lab_results", "partition": 3, "offset": 0, "op": "c", "snapshot": False,
        "commit_lsn": 25009600,
    }


def test_creatinine_in_umol_per_litre_is_converted_to_mg_per_dl_under_its_canonical_code():
    creatinine = only_event("lab_creatinine_umol_bare")
    # 38483-4 is an alias of 2160-0; 176.84 umol/L / 88.42 (umol/L per mg/dL) = 2.0 mg/dL
    assert (creatinine.code, creatinine.value, creatinine.unit) == (codes.CREATININE, 2.0, "mg/dL")
    assert creatinine.fact_id == "cdc:lab_results:502:2160-0" and creatinine.encounter_id is None


def test_an_amended_lab_supersedes_the_first_result_as_a_new_version_of_the_same_fact():
    amended = only_event("lab_amended")
    assert amended.status is Status.AMENDED and amended.value == 3.4  # string decimal "3.4000"
    assert amended.fact_id == "cdc:lab_results:503:2524-7" and amended.version == 25030000
    assert amended.effective_ms == COLLECTED_MS  # the same specimen
    # known only from the amendment on: its commit (17:45:00.900), not the result time it states (17:45:00.000),
    # for an update never became available before it was committed
    assert amended.issued_ms == utc_ms("2024-06-15T17:45:00") + 900


def test_an_amendment_under_the_old_result_time_is_known_from_its_commit_on():
    """A lab system that amends without a new result time: the new value must not be dated back, or
    training's as-of joins see it before it existed (DOMAIN.md section 3)."""
    msg = cdc_message("lab_amended")
    envelope = json.loads(msg.value).get("payload", json.loads(msg.value))
    outcome = parse(_changed(msg, resulted_at=envelope["before"]["resulted_at"]))
    (amended,) = outcome.events
    assert amended.status is Status.AMENDED
    assert amended.issued_ms == envelope["source"]["ts_ms"] > utc_ms("2024-06-15T17:45:00")  # its commit


@pytest.mark.parametrize("before", ["default_identity", "result_time_dated_back"])
def test_an_amendment_is_never_known_before_its_commit_whatever_result_time_it_states(before):
    """Under REPLICA IDENTITY DEFAULT `before` is null, so an update cannot show that it kept the old result
    time (2 h 15 min before the amendment's commit): it used to be taken as a new result time and the amended value
    was visible to training's as-of joins from the first release on. Likewise a result time the update moves
    back (even behind the first release): the new version still did not exist before its commit."""
    msg = cdc_message("lab_amended")
    envelope = json.loads(msg.value).get("payload", json.loads(msg.value))
    first_resulted_us = envelope["before"]["resulted_at"]
    if before == "default_identity":
        changed = _changed(msg, before=None, resulted_at=first_resulted_us)
    else:
        changed = _changed(msg, resulted_at=first_resulted_us - 3_600_000_000)
    (amended,) = parse(changed).events
    assert amended.status is Status.AMENDED and amended.value == 3.4
    assert amended.issued_ms == envelope["source"]["ts_ms"] == first_resulted_us // 1000 + 8_100_900  # 17:45:00.9


def test_a_lab_dated_decades_ahead_by_a_wrong_lab_clock_is_dead_lettered_though_its_result_time_agrees():
    """A lab system whose clock says 2099 writes both collected_at and resulted_at in 2099: measured
    against its own result time the collection looks fine, but the row was committed in 2024.
    Accepted, it would move the patient's clock 75 years ahead and every later reading would be late."""
    msg = cdc_message("lab_creatinine_umol_bare")
    year_2099_us = utc_ms("2099-06-15T14:00:00") * 1000
    outcome = parse(_changed(msg, collected_at=year_2099_us, resulted_at=year_2099_us + 5_400_000_000))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.FUTURE_TIME
    # an hour past its commit is a clock off by a little: still taken (MAX_FUTURE_SKEW_MS)
    commit_us = 1_718_465_400_900 * 1000
    assert isinstance(parse(_changed(msg, collected_at=commit_us + 3_000_000_000,
                                     resulted_at=commit_us + 3_500_000_000)), Parsed)


def test_a_lab_set_to_entered_in_error_retracts_it():
    retraction = only_event("lab_entered_in_error")
    assert retraction.status is Status.ENTERED_IN_ERROR and retraction.value is None
    assert retraction.fact_id == "cdc:lab_results:503:2524-7" and retraction.version > 25030000


def test_a_lab_delete_without_the_code_retracts_every_lab_code_of_that_row_then_tombstone():
    delete, tombstone = (parse(m) for m in cdc_messages("lab_delete_key_only"))
    assert {e.fact_id for e in delete.events} == {f"cdc:lab_results:503:{c}" for c in LAB_CODES}
    assert all(e.status.retracts and e.patient_id == "MRN-0001" for e in delete.events)
    assert isinstance(tombstone, Control) and tombstone.kind == "tombstone"


def test_a_lab_delete_with_the_full_row_retracts_just_its_result():
    msg = cdc_messages("lab_delete_key_only")[0]
    doc = json.loads(msg.value)
    doc["payload"]["before"] = json.loads(cdc_message("lab_amended").value)["after"]
    (event,) = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode())).events
    assert event.fact_id == "cdc:lab_results:503:2524-7" and event.status.retracts
    assert event.effective_ms == COLLECTED_MS


def lab_row_update(**changes) -> RawMessage:
    """The amended lactate row updated again with `changes` (REPLICA IDENTITY FULL)."""
    msg = cdc_message("lab_amended")
    doc = json.loads(msg.value)
    doc["before"], doc["after"] = doc["after"], {**doc["after"], **changes}
    doc["source"]["lsn"] += 1000
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


def test_a_lab_whose_code_is_corrected_retracts_the_old_test_and_states_the_new_one():
    outcome = parse(lab_row_update(loinc_code="6690-2", value="11.2000", unit="10*3/uL", status="corrected"))
    facts = {e.fact_id: e for e in outcome.events}
    assert facts["cdc:lab_results:503:2524-7"].status.retracts
    wbc = facts["cdc:lab_results:503:6690-2"]
    assert (wbc.value, wbc.status) == (11.2, Status.CORRECTED)


def test_a_lab_row_moved_to_another_patient_leaves_the_old_patients_record():
    outcome = parse(lab_row_update(patient_id="MRN-0009"))
    by_patient = {e.patient_id: e for e in outcome.events}
    assert by_patient["MRN-0001"].status.retracts and by_patient["MRN-0009"].value == 3.4


def test_a_lab_set_to_cancelled_retracts_it_and_a_row_created_cancelled_is_ignored():
    # not started or not completed: a clinical state, not bad input (it was dead-lettered as a BAD_VALUE)
    (retraction,) = parse(lab_row_update(status="cancelled")).events
    assert retraction.status.retracts and retraction.value is None
    assert retraction.fact_id == "cdc:lab_results:503:2524-7"
    msg = cdc_message("lab_amended")
    doc = json.loads(msg.value)
    doc["op"], doc["before"], doc["after"]["status"] = "c", None, "Cancelled"
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode()))
    assert isinstance(outcome, Ignored) and outcome.kind == "cancelled"  # nothing earlier to retract


def test_a_lab_with_an_unknown_status_is_a_bad_value():
    outcome = parse(lab_row_update(status="maybe"))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.BAD_VALUE
    assert "entered-in-error" in outcome.rejection.detail  # tells the operator the vocabulary


def test_a_lab_code_wardwatch_does_not_use_is_ignored_and_counted():
    outcome = parse(cdc_message("lab_unmapped_code"))
    assert isinstance(outcome, Ignored) and outcome.kind == "unmapped_code"


@pytest.mark.parametrize(("name", "reason", "words"), [
    ("lab_absurd_value", Reason.IMPLAUSIBLE_VALUE, "plausible"),  # lactate 400 mmol/L
    ("lab_unknown_unit", Reason.UNKNOWN_UNIT, "mmol"),  # lactate in mmol, an amount: no conversion declared
])
def test_impossible_or_unconvertible_labs_are_dead_lettered_with_a_reason(name, reason, words):
    r = rejection(name)
    assert r.reason is reason and words in r.detail and "MRN" not in r.detail


def lab_row_created(drop: tuple[str, ...] = (), **changes) -> RawMessage:
    """The amended lactate row as a create, with `changes` and without the columns in `drop`."""
    msg = cdc_message("lab_amended")
    doc = json.loads(msg.value)
    doc["op"], doc["before"] = "c", None
    doc["after"] = {k: v for k, v in {**doc["after"], **changes}.items() if k not in drop}
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


@pytest.mark.parametrize("row", [{"unit": None}, {"unit": " "}, {"drop": ("unit",)}])
def test_a_lactate_row_without_a_unit_is_dead_lettered_not_read_as_mmol_per_litre(row):
    # 18 with no unit may be mg/dL (~2 mmol/L): it was read as a critical 18 mmol/L, into qSOFA and the model
    outcome = parse(lab_row_created(value="18.0000", **row))
    assert isinstance(outcome, Rejected), outcome
    r = outcome.rejection
    assert r.reason is Reason.UNKNOWN_UNIT
    assert "lactate" in r.detail and "without a unit" in r.detail and "more than one unit" in r.detail
    assert "18" not in r.detail and "MRN" not in r.detail


@pytest.mark.parametrize(("value", "mmol_per_l"), [("18.0000", 2.0), ("9.9", 1.1), ("40.5", 4.5)])
def test_a_lactate_row_in_milligrams_per_decilitre_is_converted_to_mmol_per_litre(value, mmol_per_l):
    # some US labs report lactate in mg/dL (9.008 mg/dL per mmol/L): it was dead-lettered unknown_unit
    (event,) = parse(lab_row_created(value=value, unit="mg/dL")).events
    assert (event.code, event.value, event.unit) == (codes.LACTATE, mmol_per_l, "mmol/L")


def test_a_platelet_row_without_a_unit_is_read_in_its_one_unit():
    # 10*9/L is 10*3/uL by another name: platelets are reported in one unit, so no unit is that unit
    (event,) = parse(lab_row_created(loinc_code=codes.PLATELETS, value="250", unit=None)).events
    assert (event.code, event.value, event.unit) == (codes.PLATELETS, 250.0, "10*3/uL")


# --- encounters: admission, location (transfers), discharge --------------------------------------

ADMIT_MS, TRANSFER_MS, DISCHARGE_MS = (utc_ms("2024-06-15T12:54:00"), utc_ms("2024-06-16T03:10:00"),
                                       utc_ms("2024-06-20T11:00:00"))


def context(outcome) -> dict[str, object]:
    assert isinstance(outcome, Parsed), outcome
    assert all(e.code_system == codes.CONTEXT and e.source is Source.CDC for e in outcome.events)
    result = {e.code: e for e in outcome.events}
    assert len(result) == len(outcome.events), "one event per context code"
    return result


def test_an_encounters_admission_transfer_and_discharge_are_context_facts():
    admit, transfer, discharge = (context(parse(m, offset=i)) for i, m in enumerate(cdc_messages("encounter_lifecycle")))

    assert set(admit) == {codes.ADMISSION, codes.LOCATION}  # not discharged yet
    assert admit[codes.ADMISSION].value_text == "inpatient" and admit[codes.ADMISSION].value is None
    assert admit[codes.ADMISSION].effective_ms == ADMIT_MS
    assert admit[codes.ADMISSION].fact_id == "cdc:encounters:ENC-0001:admission"
    ward = admit[codes.LOCATION]
    assert (ward.value_text, ward.effective_ms) == ("4E", ADMIT_MS)
    assert ward.fact_id == f"cdc:encounters:ENC-0001:location:{ADMIT_MS}"
    assert {e.encounter_id for e in admit.values()} == {"ENC-0001"}
    assert {e.patient_id for e in admit.values()} == {"MRN-0001"}
    assert ward.provenance["table"] == "encounters" and ward.provenance["pk"] == "ENC-0001"

    # the transfer is a new location fact at the transfer time; the first ward stays a fact of its own
    icu = transfer[codes.LOCATION]
    assert (icu.value_text, icu.effective_ms) == ("ICU", TRANSFER_MS)
    assert icu.fact_id == f"cdc:encounters:ENC-0001:location:{TRANSFER_MS}"
    assert codes.DISCHARGE not in transfer  # `before` shows it was never discharged: nothing to retract

    # the discharge: no new location (the ward did not change), the admission merely re-versioned
    assert set(discharge) == {codes.ADMISSION, codes.DISCHARGE}
    assert discharge[codes.DISCHARGE].effective_ms == DISCHARGE_MS
    assert discharge[codes.DISCHARGE].fact_id == "cdc:encounters:ENC-0001:discharge"
    assert discharge[codes.DISCHARGE].status is Status.FINAL
    assert discharge[codes.ADMISSION].version > admit[codes.ADMISSION].version


def test_a_redelivered_transfer_names_the_same_location_fact():
    msg = cdc_messages("encounter_lifecycle")[1]
    first, again = parse(msg, offset=1), parse(msg, offset=77)
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]


def test_an_encounter_moved_to_another_patient_states_its_ward_there():
    transfer = cdc_messages("encounter_lifecycle")[1]
    after = json.loads(transfer.value).get("payload", json.loads(transfer.value))["after"]
    moved = parse(_changed(transfer, before=dict(after), after=dict(after, patient_id="MRN-0009")))
    new = {e.code: e for e in moved.events if e.patient_id == "MRN-0009"}
    assert new[codes.LOCATION].value_text == after["ward"] and new[codes.ADMISSION].status is Status.FINAL
    assert all(e.status.retracts for e in moved.events if e.patient_id == "MRN-0001")


def test_an_encounter_update_without_before_still_records_the_transfer_and_retracts_any_discharge():
    facts = context(parse(cdc_message("encounter_update_default_identity")))
    assert (facts[codes.LOCATION].value_text, facts[codes.LOCATION].effective_ms) == ("ICU", TRANSFER_MS)
    # discharged_at is null and nothing says it was before: a discharge undone must not keep the
    # patient discharged (and their alerts silenced), so the (maybe unknown) discharge fact is retracted
    assert facts[codes.DISCHARGE].status.retracts


def test_a_snapshot_of_a_finished_encounter_with_iso_times_states_all_three_facts():
    facts = context(parse(cdc_message("encounter_snapshot_iso")))
    assert facts[codes.ADMISSION].value_text == "emergency"
    assert facts[codes.ADMISSION].effective_ms == utc_ms("2024-06-10T08:15:00")
    assert facts[codes.LOCATION].value_text == "AMU"
    assert facts[codes.LOCATION].effective_ms == utc_ms("2024-06-10T20:40:00")  # updated_at, the row's last change
    assert facts[codes.DISCHARGE].effective_ms == utc_ms("2024-06-10T20:40:00")
    assert all(e.provenance["snapshot"] for e in facts.values())


SNAPSHOT_LSN = 27_000_000  # a re-snapshot reads the rows at a WAL position after every change above


def snapshot_of(msg: RawMessage) -> RawMessage:
    """The row of a change event as a Debezium snapshot read (op r) taken after it: no `before`, the
    snapshot flag set and the snapshot's own lsn."""
    doc = json.loads(msg.value)
    envelope = doc.get("payload", doc)
    envelope["op"], envelope["before"] = "r", None
    envelope["source"].update(snapshot="true", lsn=SNAPSHOT_LSN, sequence=json.dumps([None, str(SNAPSHOT_LSN)]))
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


def ward_at(events, ms: int) -> str | None:
    """The ward a patient was on at `ms`, from location facts as both planes keep them: per fact id
    the highest version, then the fact with the latest effective time at or before `ms`."""
    current = {}
    for e in sorted(events, key=lambda e: e.version):
        if e.code == codes.LOCATION:
            current[e.fact_id] = e
    stated = sorted((e.effective_ms, e.value_text) for e in current.values()
                    if not e.status.retracts and e.effective_ms <= ms)
    return stated[-1][1] if stated else None


def test_a_resnapshot_of_a_transferred_encounter_restates_its_facts_and_keeps_the_ward_history():
    admit, transfer, _ = (parse(m, offset=i) for i, m in enumerate(cdc_messages("encounter_lifecycle")))
    delivered = admit.events + transfer.events
    snapshot = context(parse(snapshot_of(cdc_messages("encounter_lifecycle")[1]), offset=9))

    # the current ward is stated at its transfer time: the same fact the transfer delivered
    assert (snapshot[codes.LOCATION].value_text, snapshot[codes.LOCATION].effective_ms) == ("ICU", TRANSFER_MS)
    assert f"cdc:encounters:ENC-0001:location:{ADMIT_MS}" not in {e.fact_id for e in snapshot.values()}
    # every fact of the snapshot is one already delivered, with the same content (a newer version of
    # it: the snapshot's lsn is its version, so its event ids are not the change events')
    latest = {e.fact_id: e for e in sorted(delivered, key=lambda e: e.version)}
    for e in snapshot.values():
        assert e.fact_id in latest, e.fact_id
        was = latest[e.fact_id]
        assert (e.value_text, e.value, e.effective_ms, e.status) == (was.value_text, was.value, was.effective_ms,
                                                                      was.status)
    # so 4E from admission to the transfer stays 4E
    after = delivered + list(snapshot.values())
    for ms in (ADMIT_MS, TRANSFER_MS - 1, TRANSFER_MS):
        assert ward_at(after, ms) == ward_at(delivered, ms)
    assert ward_at(after, ADMIT_MS) == "4E"


def test_a_snapshot_of_a_never_seen_transferred_encounter_states_its_ward_at_the_ward_time():
    facts = context(parse(snapshot_of(cdc_messages("encounter_lifecycle")[1])))
    assert (facts[codes.LOCATION].value_text, facts[codes.LOCATION].effective_ms) == ("ICU", TRANSFER_MS)
    assert facts[codes.LOCATION].fact_id == f"cdc:encounters:ENC-0001:location:{TRANSFER_MS}"
    assert facts[codes.ADMISSION].effective_ms == ADMIT_MS  # the admission keeps its own time
    assert ward_at(facts.values(), TRANSFER_MS - 1) is None  # the row does not say where it was before


def test_a_resnapshot_of_a_discharged_encounter_keeps_the_ward_history_and_the_discharge_time():
    delivered = [e for m in cdc_messages("encounter_lifecycle") for e in parse(m).events]
    snapshot = context(parse(snapshot_of(cdc_messages("encounter_lifecycle")[2])))
    assert snapshot[codes.DISCHARGE].effective_ms == DISCHARGE_MS and snapshot[codes.ADMISSION].effective_ms == ADMIT_MS
    # the row's last change was the discharge, so its ward is stated from then: a true statement,
    # later than the transfer (which the row no longer shows), never over the earlier wards
    assert (snapshot[codes.LOCATION].value_text, snapshot[codes.LOCATION].effective_ms) == ("ICU", DISCHARGE_MS)
    after = delivered + list(snapshot.values())
    for ms in (ADMIT_MS, TRANSFER_MS - 1, TRANSFER_MS, DISCHARGE_MS):
        assert ward_at(after, ms) == ward_at(delivered, ms)


@pytest.mark.parametrize("op", ["r", "u"])
@pytest.mark.parametrize("updated_at", [None, "absent"])
def test_an_encounter_row_without_its_ward_time_states_the_ward_at_admission(op, updated_at):
    after = dict(json.loads(cdc_messages("encounter_lifecycle")[0].value)["payload"]["after"])
    if updated_at == "absent":
        del after["updated_at"]
    else:
        after["updated_at"] = updated_at
    msg = _changed(snapshot_of(cdc_messages("encounter_lifecycle")[0]), op=op, after=after)
    facts = context(parse(msg))
    assert (facts[codes.LOCATION].value_text, facts[codes.LOCATION].effective_ms) == ("4E", ADMIT_MS)


@pytest.mark.parametrize("op", ["r", "u"])
def test_an_encounter_row_with_an_unreadable_ward_time_is_dead_lettered(op):
    msg = _changed(snapshot_of(cdc_messages("encounter_lifecycle")[1]), op=op, updated_at="yesterday")
    outcome = parse(msg)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.BAD_VALUE
    assert "updated_at" in outcome.rejection.detail


def test_a_snapshot_of_an_encounter_without_its_admission_time_is_dead_lettered_like_a_create():
    msg = _changed(snapshot_of(cdc_messages("encounter_lifecycle")[1]), admitted_at=None)
    outcome = parse(msg)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_TIME


def test_an_encounter_delete_retracts_its_admission_and_discharge():
    delete, tombstone = (parse(m) for m in cdc_messages("encounter_delete_key_only"))
    facts = context(delete)
    assert set(facts) == {codes.ADMISSION, codes.DISCHARGE}  # location facts are not enumerable
    assert all(e.status.retracts and e.patient_id == "MRN-0001" and e.encounter_id == "ENC-0001"
               for e in facts.values())
    assert isinstance(tombstone, Control)


def test_an_encounter_primary_key_change_retracts_the_old_encounter_and_admits_the_new_one():
    delete, tombstone, create = (parse(m) for m in cdc_messages("encounter_pk_change"))
    assert {e.fact_id for e in delete.events} == {"cdc:encounters:ENC-0001-A:admission",
                                                  "cdc:encounters:ENC-0001-A:discharge"}
    assert all(e.status.retracts for e in delete.events)
    assert isinstance(tombstone, Control)
    new = context(create)
    assert new[codes.ADMISSION].fact_id == "cdc:encounters:ENC-0001-B:admission"
    assert new[codes.LOCATION].value_text == "4E" and new[codes.ADMISSION].effective_ms == ADMIT_MS


def test_an_encounter_without_its_admission_time_is_dead_lettered():
    msg = cdc_messages("encounter_lifecycle")[0]
    doc = json.loads(msg.value)
    doc["payload"]["after"]["admitted_at"] = None
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode()))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.MISSING_TIME


# --- patients: sex and birth year (never the birth date) -----------------------------------------


def test_a_patient_row_gives_sex_and_birth_year_only():
    facts = context(parse(cdc_message("patient_create_schema_wrapped")))
    assert set(facts) == {codes.SEX, codes.BIRTH_YEAR}
    assert facts[codes.SEX].value_text == "female" and facts[codes.SEX].value is None
    assert facts[codes.BIRTH_YEAR].value == 1936 and facts[codes.BIRTH_YEAR].value_text is None  # born 1936-03-02
    assert {e.effective_ms for e in facts.values()} == {utc_ms("2024-06-15T12:50:00")}  # updated_at
    assert facts[codes.SEX].fact_id == "cdc:patients:MRN-0001:sex"
    assert facts[codes.BIRTH_YEAR].fact_id == "cdc:patients:MRN-0001:birth-year"
    assert all(e.encounter_id is None for e in facts.values())
    assert "03-02" not in json.dumps([e.to_dict() for e in facts.values()])  # minimum necessary PHI


def test_a_bare_patient_row_with_a_day_count_and_capitalised_sex():
    facts = context(parse(cdc_message("patient_bare")))
    assert facts[codes.BIRTH_YEAR].value == 1987  # born 1987-12-31: the last day still counts
    assert facts[codes.SEX].value_text == "male"


@pytest.mark.parametrize(("birth_date", "year"), [("1987-12-31", 1987), ("1950-01-01T00:00:00", 1950), ("-7000", 1950)])
def test_birth_dates_as_iso_strings_or_day_strings(birth_date, year):
    msg = cdc_message("patient_bare")
    doc = json.loads(msg.value)
    doc["after"]["birth_date"] = birth_date
    assert context(parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode())))[codes.BIRTH_YEAR].value == year


@pytest.mark.parametrize(("column", "raw"), [("sex", "yes"), ("birth_date", 10**9), ("birth_date", "30/02/1950")])
def test_a_patient_row_with_an_unreadable_value_is_a_bad_value(column, raw):
    msg = cdc_message("patient_bare")
    doc = json.loads(msg.value)
    doc["after"][column] = raw
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode()))
    assert isinstance(outcome, Rejected) and outcome.rejection.reason is Reason.BAD_VALUE


def test_a_patient_delete_retracts_sex_and_birth_year():
    msg = cdc_message("patient_bare")
    doc = json.loads(msg.value)
    doc["op"], doc["before"], doc["after"] = "d", {"patient_id": "MRN-0002"}, None
    facts = context(parse(RawMessage(msg.topic, msg.key, json.dumps(doc).encode())))
    assert set(facts) == {codes.SEX, codes.BIRTH_YEAR} and all(e.status.retracts for e in facts.values())


# --- column schemas are reused across messages of a table, never across a schema change ---------


def with_flow_scale(msg: RawMessage, scale: str) -> RawMessage:
    """The message with its O2 flow column declared at another Decimal scale (a connector schema change)."""
    doc = json.loads(msg.value)
    for struct in doc["schema"]["fields"]:
        for column in struct.get("fields") or []:
            if column.get("field") == "oxygen_flow_rate_lpm":
                column["parameters"]["scale"] = scale
    return RawMessage(msg.topic, msg.key, json.dumps(doc).encode())


def test_a_schema_change_between_messages_of_one_table_decodes_each_by_its_own_schema():
    original = cdc_message("create_schema_wrapped")  # O2 flow "FA==" is the unscaled integer 20, scale 1
    rescaled, unscaled = with_flow_scale(original, "2"), with_flow_scale(original, "0")
    flows = [by_code(parse(m))[codes.O2_FLOW].value for m in (original, rescaled, original, unscaled, unscaled)]
    assert flows == [2.0, 0.2, 2.0, 20.0, 20.0]
    assert parse(with_flow_scale(original, "x")).rejection.reason is Reason.BAD_VALUE  # not an integer scale
    assert by_code(parse(original))[codes.O2_FLOW].value == 2.0


@pytest.mark.parametrize("name", ["patient_create_schema_wrapped", "create_schema_wrapped", "lab_create_schema_wrapped"])
@pytest.mark.parametrize("semantic_type", [[], {}, 7])
def test_a_column_schema_whose_type_name_is_not_a_string_rejects_the_message_as_a_bad_value(name, semantic_type):
    """A hostile schema (a Debezium semantic type name that is a list, an object or a number) once
    raised TypeError in the date decoder: an internal error. Each such column alone is now BAD_VALUE,
    as an unknown type name is: the value's unit cannot be known."""
    msg = next(m for m in cdc_messages(name) if m.value is not None)
    after = next(f for f in json.loads(msg.value)["schema"]["fields"] if f.get("field") == "after")
    typed = [i for i, c in enumerate(after["fields"]) if str(c.get("name", "")).startswith("io.debezium")
             or str(c.get("name", "")).startswith("org.apache.kafka")]
    assert typed
    for i in typed:
        value = json.loads(msg.value)
        for side in value["schema"]["fields"]:
            if side.get("field") in ("before", "after"):
                side["fields"][i]["name"] = semantic_type
        outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(value).encode()))
        assert isinstance(outcome, Rejected), outcome
        assert outcome.rejection.reason is Reason.BAD_VALUE, outcome


# --- numbers a reviewer's hostile inputs read wrongly ----------------------------------------------


def _with_heart_rate(raw_json: bytes) -> RawMessage:
    msg = cdc_message("create_bare")
    value = json.loads(msg.value)
    value["after"]["heart_rate"] = "@HR@"
    return RawMessage(msg.topic, msg.key, json.dumps(value).encode().replace(b'"@HR@"', raw_json))


@pytest.mark.parametrize("text", ["8_8", "١٢٠", "+88", "８８", "0x58"])
def test_a_numeric_string_not_written_as_json_writes_numbers_is_a_bad_value(text):
    """float() reads "8_8" as 88 and any script's digits as numbers; a database writes neither."""
    rejection = parse(_with_heart_rate(json.dumps(text).encode())).rejection
    assert rejection.reason is Reason.BAD_VALUE and rejection.detail.startswith("heart_rate: not a number")
    # what JSON writes as a number is still read, blanks aside
    assert by_code(parse(_with_heart_rate(b'" 8.8e1 "')))[codes.HEART_RATE].value == 88


def test_a_number_beyond_64_bits_is_a_bad_value_not_undecodable_bytes():
    """Valid JSON orjson cannot hold: an operator told "not UTF-8 JSON" would look for an encoding fault."""
    rejection = parse(_with_heart_rate(b"1" + b"0" * 400)).rejection
    assert rejection.reason is Reason.BAD_VALUE and rejection.exception == "JSONDecodeError"
    assert "outside the 64-bit range" in rejection.detail and "UTF-8" not in rejection.detail


@pytest.mark.parametrize("sequence", ['["2_4",null]', '["٢٤",null]'])
def test_a_commit_lsn_in_other_digits_is_not_read(sequence):
    msg = cdc_message("create_bare")
    value = json.loads(msg.value)
    value["source"]["sequence"] = sequence
    outcome = parse(RawMessage(msg.topic, msg.key, json.dumps(value).encode()))
    assert all(e.provenance.get("commit_lsn") is None for e in outcome.events)
