"""`wardwatch check cdc|fhir FILE` through the real CLI, on fixture captures a platform team might feed it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from wardwatch.check import as_envelope
from wardwatch.cli import app

CHECK = Path(__file__).parents[1] / "fixtures" / "ingest" / "check"
runner = CliRunner()


def _run(*args: str) -> tuple[int, list[dict]]:
    result = runner.invoke(app, ["check", *args])
    lines = [orjson.loads(line) for line in result.stdout.splitlines() if line.strip()] if result.exit_code == 0 else []
    return result.exit_code, lines


def _by_kind(lines: list[dict], kind: str) -> list[dict]:
    return [line for line in lines if line["kind"] == kind]


def test_fhir_capture_prints_one_outcome_per_message_and_a_summary():
    code, lines = _run("fhir", str(CHECK / "fhir.jsonl"))
    assert code == 0  # rejected lines are results, not failures
    events = _by_kind(lines, "event")
    assert {e["line"] for e in events} == {1}
    # the degF temperature prints in Cel: (101.3 - 32) * 5 / 9 = 38.5
    (temp,) = [e["event"] for e in events if e["event"]["code"] == "8310-5"]
    assert temp["unit"] == "Cel" and temp["value"] == pytest.approx(38.5)
    assert temp["patient_id"] == "MRN-0001" and temp["source"] == "fhir" and temp["status"] == "final"
    assert temp["effective"] == "2024-06-15T14:06:36.537Z"  # µs in the resource, ms in the event
    assert temp["issued"] == "2024-06-15T14:07:00.000Z"  # no `issued`: meta.lastUpdated
    assert "effective_ms" not in temp and temp["fact_id"] == "fhir:Observation/vs-temp-1:8310-5"
    # the BP panel gives both pressures, each in mm[Hg]
    assert {(e["event"]["code"], e["event"]["value"], e["event"]["unit"]) for e in events} >= {
        ("8480-6", 96.0, "mm[Hg]"), ("8462-4", 68.0, "mm[Hg]")}

    assert [(c["line"], c["type"]) for c in _by_kind(lines, "control")] == [(2, "handshake")]
    rejected = {r["line"]: r["reason"] for r in _by_kind(lines, "rejected")}
    # id-only cannot be fetched offline; an envelope's string value is the raw (broken) body
    assert rejected == {3: "no_fhir_server", 4: "malformed_json", 5: "invalid_structure"}
    assert [(i["line"], i["type"]) for i in _by_kind(lines, "ignored")] == [(6, "unmapped_code")]

    summary = lines[-1]
    assert summary["kind"] == "summary" and summary["source"] == "fhir"
    assert summary["messages_in"] == 6 and summary["messages_parsed"] == 1 and summary["events_out"] == len(events)
    assert summary["dead_lettered"] == {"no_fhir_server": 1, "malformed_json": 1, "invalid_structure": 1}
    assert summary["balanced"] is True


def test_cdc_capture_handles_envelopes_bare_values_tombstones_and_other_prefixes():
    code, lines = _run("cdc", str(CHECK / "cdc.jsonl"))
    assert code == 0
    events = _by_kind(lines, "event")
    # line 1 (envelope, no schema) and line 2 (bare, schema-wrapped) are wide vitals rows: 8 events each
    assert [e["line"] for e in events] == [1] * 8 + [2] * 8
    on_air = [e["event"] for e in events if e["line"] == 1 and e["event"]["code"] == "3151-8"]
    assert on_air[0]["value"] == 0.0 and on_air[0]["unit"] == "L/min"  # null flow + not on oxygen = 0 L/min
    # measured_at 1718460396123275 µs since the epoch
    assert {e["event"]["effective"] for e in events if e["line"] == 1} == {"2024-06-15T14:06:36.123Z"}
    assert _by_kind(lines, "control") == [{"kind": "control", "line": 3, "type": "tombstone",
                                          "detail": {"table": "vital_signs"}}]
    # line 4 is blank; line 5 is a truncate on a topic with another prefix: still the right table
    assert [(i["line"], i["type"]) for i in _by_kind(lines, "ignored")] == [(5, "truncate")]
    assert {r["line"]: r["reason"] for r in _by_kind(lines, "rejected")} == {6: "malformed_json",
                                                                           7: "implausible_value"}
    summary = lines[-1]
    assert (summary["messages_in"], summary["messages_parsed"], summary["events_out"]) == (6, 2, 16)
    assert summary["control"] == {"tombstone": 1} and summary["balanced"] is True


def test_bare_lines_take_their_table_from_the_topic_option(tmp_path):
    capture = tmp_path / "labs.jsonl"
    capture.write_text((CHECK / "cdc.jsonl").read_text().splitlines()[1] + "\n")  # a vital_signs row, bare
    code, lines = _run("cdc", str(capture), "--topic", "ehr.public.no_such_table")
    assert code == 0
    assert [(line["kind"], line.get("reason")) for line in lines[:-1]] == [("rejected", "unknown_table")]


def test_invalid_utf8_line_is_rejected_not_fatal(tmp_path):
    capture = tmp_path / "bytes.jsonl"
    capture.write_bytes(b'\xff\xfe{"resourceType": "Bundle"}\n')
    code, lines = _run("fhir", str(capture))
    assert code == 0
    assert lines[0]["kind"] == "rejected" and lines[0]["reason"] == "malformed_json"


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["check", "fhir", str(CHECK / "missing.jsonl")]).exit_code == 2
    assert runner.invoke(app, ["check", "hl7v2", str(CHECK / "fhir.jsonl")]).exit_code == 2


def test_envelope_is_told_apart_from_bare_values():
    assert as_envelope(b'{"topic": "t", "key": null, "value": {"op": "c"}, "headers": {}}') is not None
    assert as_envelope(b'{"value": null}') is not None  # a tombstone envelope
    # a Debezium value without schema, a wrapped one, and a FHIR Bundle are bare values
    assert as_envelope(b'{"before": null, "after": {"value": 1}, "op": "c"}') is None
    assert as_envelope(b'{"schema": {}, "payload": {"value": 1}}') is None
    assert as_envelope(b'{"resourceType": "Bundle", "value": 1}') is None
    assert as_envelope(b"not json") is None


def test_help_shows_an_example():
    result = runner.invoke(app, ["check", "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout


def test_an_envelope_timestamp_bounds_a_fhir_observation_without_a_server_time():
    """As in the ingest: an Observation with no issued, meta.lastUpdated or notification timestamp is checked
    against the record's timestamp (2099 is future-dated); without one it cannot be checked (missing_time)."""
    from wardwatch.check import check_lines
    from tests.fixtures.ingest.corpus import fhir_bundle

    doc = orjson.loads(fhir_bundle("r4b_amended_reference_only"))
    doc.pop("timestamp")
    for event in doc["entry"][0]["resource"]["notificationEvent"]:
        event.pop("timestamp")
    doc["entry"][1]["resource"]["effectiveDateTime"] = "2099-06-15T14:06:36Z"
    lines = [orjson.dumps({"value": doc, "timestamp": 1_718_460_456_000}), orjson.dumps({"value": doc})]
    out = []
    check_lines("fhir", lines, emit=lambda b: out.append(orjson.loads(b)))
    assert [d["reason"] for d in _by_kind(out, "rejected")] == ["future_time", "missing_time"]


def test_cdc_timezone_reads_zone_less_times_as_the_ingest_does(tmp_path, monkeypatch):
    """`check cdc` read a local-time database's rows as UTC whatever WARDWATCH_CDC_TIMEZONE said, so an offline
    check of a capture showed every time shifted (or future_time) where the ingest parsed it fine."""
    from tests.fixtures.ingest.corpus import cdc_message

    capture = tmp_path / "cdc.jsonl"
    msg = cdc_message("create_bare")
    capture.write_bytes(orjson.dumps({"topic": msg.topic, "key": None, "value": orjson.loads(msg.value)}) + b"\n")
    monkeypatch.delenv("WARDWATCH_CDC_TIMEZONE", raising=False)

    def heart_rate_effective(*args: str, env: dict | None = None) -> str:
        result = runner.invoke(app, ["check", "cdc", str(capture), *args], env=env)
        assert result.exit_code == 0, result.output
        (hr,) = [line["event"] for line in map(orjson.loads, result.stdout.splitlines())
                 if line["kind"] == "event" and line["event"]["code"] == "8867-4"]
        return hr["effective"]

    utc = heart_rate_effective()
    assert utc == "2024-06-15T14:06:36.123Z"
    assert heart_rate_effective("--cdc-timezone", "Europe/Berlin") == "2024-06-15T12:06:36.123Z"  # CEST, +02:00
    assert heart_rate_effective(env={"WARDWATCH_CDC_TIMEZONE": "Europe/Berlin"}) == "2024-06-15T12:06:36.123Z"
    bad = runner.invoke(app, ["check", "cdc", str(capture), "--cdc-timezone", "+02:00"])
    assert bad.exit_code == 2 and "not an IANA time zone" in bad.output


def test_check_fhir_takes_the_mrn_system_as_the_ingest_does(tmp_path, monkeypatch):
    """--mrn-system (or WARDWATCH_MRN_SYSTEM): a subject identifier of another system is no MRN offline either
    (here a national number equal to MRN-0042, whose Patient only the FHIR server could tell: no_fhir_server)."""
    from tests.fixtures.ingest.corpus import fhir_bundle

    bundle = orjson.loads(fhir_bundle("r4b_amended_reference_only"))
    bundle["entry"][1]["resource"]["subject"]["identifier"] = {"system": "urn:oid:2.16.840.1.113883.4.1",
                                                               "value": "MRN-0042"}
    capture = tmp_path / "fhir.jsonl"
    capture.write_bytes(orjson.dumps(bundle) + b"\n")
    monkeypatch.delenv("WARDWATCH_MRN_SYSTEM", raising=False)
    code, lines = _run("fhir", str(capture))
    assert code == 0 and [d["event"]["patient_id"] for d in _by_kind(lines, "event")] == ["MRN-0042"]
    system = "urn:oid:2.16.840.1.113883.19.5"
    for args, env in ((["--mrn-system", system], None), ([], {"WARDWATCH_MRN_SYSTEM": system})):
        result = runner.invoke(app, ["check", "fhir", str(capture), *args], env=env)
        assert result.exit_code == 0, result.output
        lines = [orjson.loads(line) for line in result.stdout.splitlines()]
        assert _by_kind(lines, "event") == [] and [d["reason"] for d in _by_kind(lines, "rejected")] == ["no_fhir_server"]
    bad = runner.invoke(app, ["check", "fhir", str(capture), "--mrn-system", "MRN"])
    assert bad.exit_code == 2 and "not a URI" in bad.output


def test_a_subject_named_by_the_fhir_servers_patient_id_alone_is_checked_as_the_ingest_would(tmp_path, monkeypatch):
    """Offline there is no FHIR server to read the MRN from: such a reading is reported rejected
    (no_fhir_server), as the ingest without WARDWATCH_FHIR_SERVER_URL dead-letters it; with
    --fhir-patient-ids-are-mrns (or its variable) it is keyed by the id, as that ingest would."""
    from tests.fixtures.ingest.corpus import fhir_bundle

    capture = tmp_path / "fhir.jsonl"
    capture.write_bytes(orjson.dumps(orjson.loads(fhir_bundle("r4b_amended_reference_only"))) + b"\n")
    monkeypatch.delenv("WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS", raising=False)
    code, lines = _run("fhir", str(capture))
    assert code == 0 and [d["reason"] for d in _by_kind(lines, "rejected")] == ["no_fhir_server"]
    assert _by_kind(lines, "event") == []
    for args, env in ((["--fhir-patient-ids-are-mrns"], None), ([], {"WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS": "true"})):
        result = runner.invoke(app, ["check", "fhir", str(capture), *args], env=env)
        assert result.exit_code == 0, result.output
        events = [line["event"] for line in map(orjson.loads, result.stdout.splitlines()) if line["kind"] == "event"]
        assert [e["patient_id"] for e in events] == ["pt-e4f5d6254795"]
