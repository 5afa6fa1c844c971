"""benchmarks/codec.py over the ingest fixture corpus (no clinosim cohort, no broker)."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.codec import STAGES, RawRecord, ingest_pass, measure
from schemas.canonical import decode_batch
from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed
from tests.fixtures.ingest.corpus import CDC_PREFIX, cdc_messages, cdc_names, fhir_bundle, fhir_names
from wardwatch.settings import Settings

SETTINGS = Settings(cdc_topic_prefix=CDC_PREFIX)


def fixture_records() -> list[RawRecord]:
    cdc = [(m.topic, m.key, m.value, True) for name in cdc_names() for m in cdc_messages(name)]
    fhir = [("ww.fhir.notifications", None, fhir_bundle(name), False) for name in fhir_names()]
    return [RawRecord(topic, key, value, offset, is_cdc)
            for offset, (topic, key, value, is_cdc) in enumerate(cdc + fhir)]


def parsed_events(records: list[RawRecord]) -> list:
    events = []
    for r in records:
        outcome = (parse_cdc(r.topic, r.key, r.value, partition=0, offset=r.offset, cdc_topic_prefix=CDC_PREFIX)
                   if r.is_cdc else parse_notification(r.value, topic=r.topic, partition=0, offset=r.offset))
        if isinstance(outcome, Parsed):
            events += outcome.events
    return events


def test_the_worker_side_decodes_exactly_the_events_the_ingest_side_parsed():
    records = fixture_records()
    values = ingest_pass(records, CDC_PREFIX, SETTINGS.canonical_max_message_bytes, poll_size=7)
    decoded = [e for value in values for e in decode_batch(value)]
    expected = parsed_events(records)
    assert len(expected) > 50  # the corpus has CDC and FHIR events
    assert sorted(e.to_json() for e in decoded) == sorted(e.to_json() for e in expected)
    assert all(len({e.patient_id for e in decode_batch(v)}) == 1 for v in values)  # one patient per message


def test_every_stage_is_measured_on_the_same_events():
    records = fixture_records()
    figures = measure(records, SETTINGS, repeat=1)
    assert figures["events"] == len(parsed_events(records))
    assert figures["messages"] == len(records)
    for stage in STAGES:
        assert figures[f"{stage} events/s"] > 0 and figures[f"{stage} messages/s"] > 0


def test_runs_as_a_module_with_help():
    result = subprocess.run([sys.executable, "-m", "benchmarks.codec", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "--patients" in result.stdout and "--repeat" in result.stdout
