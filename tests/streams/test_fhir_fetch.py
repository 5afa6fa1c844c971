"""id-only notifications completed from a FHIR server: a real HTTP server on 127.0.0.1 serves the
resources (tests/fixtures/ingest/fhir/server/<Type>/<id>.json), then once through the real broker."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from pydantic import SecretStr

from schemas import codes
from schemas.canonical import decode_batch
from schemas.deadletter import Reason
from schemas.canonical import Status
from schemas.fhir import complete_notification, parse_notification
from schemas.ingest_outcome import Ignored, NeedsFetch, Parsed, Rejected
from schemas.ingest_values import iso_to_ms
from streams.fhir_fetch import MAX_UNAVAILABLE_PAUSE_S, FhirClient, resolve, retry_after
from streams.features import compute_features
from streams.ingest import IngestWorker
from streams.state import Kind, apply_batch
from streams.topics import ensure_topics, topics_for
from wardwatch.settings import Settings
from tests.fixtures.ingest.corpus import fhir_bundle, nested_too_deep_to_write
from tests.streams.fhir_server import SERVED, FhirServer

TOKEN = "s3cret-token"


@pytest.fixture
def fhir_server():
    server = FhirServer()
    try:
        yield server
    finally:
        server.stop()


def client_for(url: str, **overrides) -> FhirClient:
    options = dict(fhir_server_url=url, fhir_auth_token=SecretStr(TOKEN), fhir_timeout_s=2.0, fhir_retries=2,
                   fhir_retry_backoff_s=0.01)
    return FhirClient(Settings(**{**options, **overrides}))


def parse(raw: bytes):
    return parse_notification(raw, topic="ww.fhir.notifications", partition=3, offset=7)


def fetch_and_parse(name: str, client: FhirClient | None):
    raw = fhir_bundle(name)
    outcome = parse(raw)
    assert isinstance(outcome, NeedsFetch)
    return resolve(outcome, raw, client, topic="ww.fhir.notifications", partition=3, offset=7)


def rejection(outcome):
    assert isinstance(outcome, Rejected) and not isinstance(outcome, NeedsFetch), outcome
    return outcome.rejection


# --- the fetch ---------------------------------------------------------------------------------


def test_id_only_gives_the_same_events_as_the_full_resource_notification(fhir_server):
    outcome = fetch_and_parse("r4b_id_only", client_for(fhir_server.url))
    assert outcome == parse(fhir_bundle("r4b_full_resource_hr9"))  # written by hand with the resource inline
    assert [e.value for e in outcome.events] == [112]
    assert fhir_server.requests == [("/fhir/Observation/vs-hr-9", f"Bearer {TOKEN}")]


def test_r4_id_only_encounter_and_patient_become_context_facts(fhir_server):
    outcome = fetch_and_parse("r4_id_only_parameters", client_for(fhir_server.url))
    assert isinstance(outcome, Parsed) and outcome.event_numbers == [48, 49]
    assert sorted(e.code for e in outcome.events) == sorted(
        [codes.ADMISSION, codes.LOCATION, codes.SEX, codes.BIRTH_YEAR])
    assert {e.patient_id for e in outcome.events} == {"MRN-0001"}
    # the absolute focus reference was fetched relative to the configured base URL
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Encounter/enc-4d8ac7e31e96",
                                                          "/fhir/Patient/pt-e4f5d6254795"]


def test_a_server_error_is_retried_until_it_answers(fhir_server):
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(500, b"oops"), (503, b"busy")])
    outcome = fetch_and_parse("r4b_id_only", client_for(fhir_server.url, fhir_retries=2))
    assert isinstance(outcome, Parsed) and [e.value for e in outcome.events] == [112]
    assert len(fhir_server.requests) == 3


def test_a_server_that_keeps_failing_dead_letters_as_fetch_failed(fhir_server):
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(500, b"oops")] * 5)
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url, fhir_retries=1)))
    assert r.reason is Reason.FETCH_FAILED and "500" in r.detail and "2 attempts" in r.detail
    assert "vs-hr-9" not in r.detail  # ids stay out of dead-letter headers
    assert len(fhir_server.requests) == 2


def test_the_wait_between_retries_doubles_but_is_bounded(fhir_server):
    """Each wait blocks the ingest worker: was 1, 2, 4, ..., 128 s for 8 retries of 1 s (255 s in all, past
    the consumption watchdog), now at most MAX_RETRY_DELAY_S (10 s) a wait."""
    waits = []
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=8, fhir_retry_backoff_s=1.0,
                                 fhir_unavailable_pause_s=0), sleep=waits.append)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(503, b"busy")] * 9)
    r = rejection(fetch_and_parse("r4b_id_only", client))
    assert r.reason is Reason.FETCH_FAILED and "9 attempts" in r.detail
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]



def http_date(seconds_from_now: float) -> str:
    from email.utils import formatdate
    return formatdate(time.time() + seconds_from_now, usegmt=True)


def test_a_busy_server_is_asked_again_after_its_retry_after_not_the_backoff(fhir_server):
    """A 429/503 saying when to come back (seconds or an HTTP-date) was asked again after the backoff (0.01 s
    here: it kept hammering an overloaded server, then gave up before the time it named). Its Retry-After is
    now the wait, at most MAX_RETRY_DELAY_S; a status without it keeps the backoff."""
    waits = []
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=4, fhir_retry_backoff_s=0.01,
                                 fhir_unavailable_pause_s=0), sleep=waits.append)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([
        (429, b"slow down", {"Retry-After": "3"}),
        (503, b"busy", {"Retry-After": "120"}),  # longer than the bound: waits the bound
        (503, b"busy", {"Retry-After": http_date(3600)}),
        (500, b"oops", {"Retry-After": "7"}),  # not a 429 / 503: the backoff
    ])
    outcome = fetch_and_parse("r4b_id_only", client)
    assert isinstance(outcome, Parsed) and [e.value for e in outcome.events] == [112]
    assert waits == [3.0, 10.0, 10.0, 0.08]


def test_a_server_still_busy_at_the_last_attempt_says_when_it_asked_to_be_retried(fhir_server):
    waits = []
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=1, fhir_retry_backoff_s=0.01,
                                 fhir_unavailable_pause_s=0), sleep=waits.append)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(503, b"busy", {"Retry-After": "600"})] * 2)
    r = rejection(fetch_and_parse("r4b_id_only", client))
    assert r.reason is Reason.FETCH_FAILED and "2 attempts" in r.detail
    assert "the server asked to retry after 600 s" in r.detail
    assert waits == [10.0]



@pytest.mark.parametrize("value, seconds", [
    ("5", 5.0), (" 0 ", 0.0),
    ("Sun, 06 Nov 1994 08:49:42 GMT", 5.0),  # RFC 9110's example date, 5 s after `now`
    ("Sun, 06 Nov 1994 08:49:30 GMT", 0.0),  # already past: at once
    ("soon", None), ("-3", None), ("", None), (None, None),  # unreadable: the backoff
])
def test_retry_after_is_read_as_seconds_or_an_http_date(value, seconds):
    assert retry_after(value, now=lambda: 784111777.0) == seconds


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_after_a_server_failed_every_retry_notifications_are_dead_lettered_at_once_for_a_while(fhir_server):
    """An outage must not hold the ingest worker (and the CDC vital signs it also reads) for each id-only
    notification's own retries: once one failed them all, the next ones fail at once, without a GET,
    until the pause is over; then the server is asked again."""
    clock = Clock()
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=1, fhir_retry_backoff_s=0.01,
                                 fhir_unavailable_pause_s=30.0), monotonic=clock)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(503, b"busy")] * 2)
    first = rejection(fetch_and_parse("r4b_id_only", client))
    assert first.reason is Reason.FETCH_FAILED and len(fhir_server.requests) == 2  # its own retries

    clock.now += 29
    second = rejection(fetch_and_parse("r4b_id_only", client))
    assert second.reason is Reason.FETCH_FAILED and "redrive fetch_failed" in second.detail
    assert "vs-hr-9" not in second.detail
    assert len(fhir_server.requests) == 2  # not asked

    clock.now += 2  # the pause is over and the server is back
    outcome = fetch_and_parse("r4b_id_only", client)
    assert isinstance(outcome, Parsed) and [e.value for e in outcome.events] == [112]
    assert len(fhir_server.requests) == 3


def test_the_pause_after_a_busy_server_lasts_as_long_as_its_retry_after_asked(fhir_server, caplog):
    """The final 503 said Retry-After: 120; the pause ended after WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S (30 s)
    and the ingest asked again a server that had asked for 120 s. The pause is now the Retry-After, and the
    paused notifications' detail and the log say how long and why (no ids); a Retry-After past
    MAX_UNAVAILABLE_PAUSE_S (10 min) pauses that long, not a day."""
    clock = Clock()
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=0,
                                 fhir_unavailable_pause_s=30.0), monotonic=clock, sleep=lambda s: None)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(503, b"busy", {"Retry-After": "120"}),
                                                            (503, b"busy", {"Retry-After": "86400"})])
    with caplog.at_level(logging.WARNING, logger="streams.fhir_fetch"):
        assert rejection(fetch_and_parse("r4b_id_only", client)).reason is Reason.FETCH_FAILED
    assert "for the next 120 s, as the server asked with Retry-After: 120 s" in caplog.text
    assert "vs-hr-9" not in caplog.text

    clock.now += 60  # past the 30 s setting, within the server's 120 s: still not asked
    paused = rejection(fetch_and_parse("r4b_id_only", client))
    assert "asked again in 60 s, as the server asked with Retry-After: 120 s" in paused.detail
    assert "vs-hr-9" not in paused.detail and len(fhir_server.requests) == 1

    clock.now += 61  # the 120 s are over: asked again; it now asks for a day and gets 10 min
    assert rejection(fetch_and_parse("r4b_id_only", client)).reason is Reason.FETCH_FAILED
    assert len(fhir_server.requests) == 2
    clock.now += MAX_UNAVAILABLE_PAUSE_S - 1
    assert "asked again in 1 s, as the server asked with Retry-After: 86400 s, at most 600 s" in rejection(
        fetch_and_parse("r4b_id_only", client)).detail
    clock.now += 2
    assert isinstance(fetch_and_parse("r4b_id_only", client), Parsed) and len(fhir_server.requests) == 3


def test_a_missing_resource_or_a_refused_token_does_not_pause_the_reads(fhir_server):
    clock = Clock()
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_unavailable_pause_s=30.0), monotonic=clock)
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(404, b"{}"), (401, b"{}")])
    assert rejection(fetch_and_parse("r4b_id_only", client)).reason is Reason.RESOURCE_NOT_FOUND
    assert rejection(fetch_and_parse("r4b_id_only", client)).reason is Reason.FETCH_FAILED  # the 401
    assert isinstance(fetch_and_parse("r4b_id_only", client), Parsed)  # the server answers: read at once
    assert len(fhir_server.requests) == 3


def test_a_pause_of_zero_keeps_asking_after_every_failure(fhir_server):
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_retries=0, fhir_unavailable_pause_s=0))
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(503, b"busy")])
    assert rejection(fetch_and_parse("r4b_id_only", client)).reason is Reason.FETCH_FAILED
    assert isinstance(fetch_and_parse("r4b_id_only", client), Parsed)
    assert len(fhir_server.requests) == 2


def test_a_missing_resource_is_dead_lettered_as_not_found_without_retrying(fhir_server):
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(404, b"{}")])  # unknown: not a delete (410)
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND and "404" in r.detail
    assert len(fhir_server.requests) == 1  # no history read: nothing says it was deleted


def test_an_unauthorized_answer_is_not_retried(fhir_server):
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(401, b"{}")])
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url)))
    assert r.reason is Reason.FETCH_FAILED and "401" in r.detail
    assert len(fhir_server.requests) == 1


def test_a_slow_server_times_out_and_is_retried(fhir_server):
    fhir_server.stall.set()
    started = time.monotonic()
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url, fhir_timeout_s=0.3, fhir_retries=1)))
    assert r.reason is Reason.FETCH_FAILED and r.exception == "ReadTimeout"
    assert len(fhir_server.requests) == 2
    assert time.monotonic() - started < 5  # bounded by the timeouts, not by the server


def test_a_body_that_does_not_match_its_content_encoding_is_retried_then_fetch_failed(fhir_server):
    broken = (200, b"not gzip at all", {"Content-Encoding": "gzip"})
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([broken] * 2)
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url, fhir_retries=1)))
    assert r.reason is Reason.FETCH_FAILED and r.exception == "DecodingError"
    assert len(fhir_server.requests) == 2


def test_an_unreachable_server_is_fetch_failed():
    server = FhirServer()
    url = server.url
    server.stop()  # nothing listens on that port any more
    r = rejection(fetch_and_parse("r4b_id_only", client_for(url, fhir_retries=1)))
    assert r.reason is Reason.FETCH_FAILED and r.exception == "ConnectError"


def test_a_server_answering_with_another_resource_is_fetch_failed(fhir_server):
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(200, (SERVED / "Patient/pt-e4f5d6254795.json").read_bytes())])
    r = rejection(fetch_and_parse("r4b_id_only", client_for(fhir_server.url)))
    assert r.reason is Reason.FETCH_FAILED and "different resource" in r.detail


def test_a_notification_too_deeply_nested_to_complete_is_an_internal_error_not_a_crash(fhir_server):
    # orjson reads JSON nested up to 1024 levels but writes only 255: completing it fails after the fetch
    raw = nested_too_deep_to_write("r4b_id_only")
    outcome = parse(raw)
    assert isinstance(outcome, NeedsFetch)
    result = resolve(outcome, raw, client_for(fhir_server.url), topic="ww.fhir.notifications", partition=3, offset=7)
    assert rejection(result).reason is Reason.INTERNAL_ERROR


def test_without_a_server_id_only_is_dead_lettered_saying_what_to_set():
    r = rejection(fetch_and_parse("r4b_id_only", None))
    assert r.reason is Reason.FHIR_SERVER_NOT_CONFIGURED and "WARDWATCH_FHIR_SERVER_URL" in r.detail


def test_the_client_refuses_to_start_without_a_url():
    with pytest.raises(ValueError, match="WARDWATCH_FHIR_SERVER_URL"):
        FhirClient(Settings(fhir_server_url=None))


# --- subjects named by the server's Patient id only -------------------------------------------------

PATIENT = "/fhir/Patient/pt-e4f5d6254795"


def served_patient(**changes) -> bytes:
    patient = json.loads((SERVED / "Patient" / "pt-e4f5d6254795.json").read_bytes())
    return json.dumps({**patient, **changes}).encode()


def test_a_subject_named_by_the_server_id_alone_is_keyed_by_its_patients_mrn_read_once(fhir_server):
    """The server's Patient id (HAPI: 1, 2, 3...) may be another patient's MRN: keyed by it, this heart rate
    would join that patient's state and alerts. Its MRN is read from the server, once per patient."""
    client = client_for(fhir_server.url)
    for _ in range(3):  # three notifications of the same patient
        outcome = resolve_body(fhir_bundle("r4b_amended_reference_only"), client)
        assert isinstance(outcome, Parsed) and [(e.patient_id, e.value) for e in outcome.events] == [("MRN-0001", 84)]
    assert fhir_server.requests == [(PATIENT, f"Bearer {TOKEN}")]  # cached after the first read
    # an Encounter's subject alike
    outcome = resolve_body(fhir_bundle("r5_encounter_discharged"), client)
    assert isinstance(outcome, Parsed) and {e.patient_id for e in outcome.events} == {"MRN-0001"}
    assert len(fhir_server.requests) == 1


def test_the_patient_cache_is_bounded(fhir_server, monkeypatch):
    import streams.fhir_fetch as fhir_fetch
    monkeypatch.setattr(fhir_fetch, "PATIENT_CACHE_SIZE", 1)
    other = "/fhir/Patient/pt-2"
    fhir_server.script[other] = deque([(200, served_patient(id="pt-2", identifier=[
        {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-0002"}]))])
    client = client_for(fhir_server.url)
    assert client.patient_mrn("Patient/pt-e4f5d6254795") == "MRN-0001"
    assert client.patient_mrn("Patient/pt-2") == "MRN-0002"  # evicts pt-e4f5d6254795
    assert client.patient_mrn("Patient/pt-e4f5d6254795") == "MRN-0001"
    assert [path for path, _ in fhir_server.requests] == [PATIENT, other, PATIENT]


def test_a_cached_mrn_expires_so_a_merge_on_the_server_applies_without_a_restart(fhir_server):
    """The server merged pt-e4f5d6254795 into the patient of MRN-0009 (or corrected its MRN): a cache that never
    expired kept keying its readings by MRN-0001 until the ingest restarted. Cache freshness is on the
    monotonic clock (injected here), never on event time."""
    now = [1000.0]
    fhir_server.script[PATIENT] = deque([(200, served_patient()), (200, served_patient(identifier=[
        {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-0009"}]))])
    client = FhirClient(Settings(fhir_server_url=fhir_server.url, fhir_patient_cache_ttl_s=600),
                        monotonic=lambda: now[0])
    assert client.patient_mrn("Patient/pt-e4f5d6254795") == "MRN-0001"
    now[0] += 599.0
    assert client.patient_mrn("Patient/pt-e4f5d6254795") == "MRN-0001"  # within the TTL: not read again
    assert len(fhir_server.requests) == 1
    now[0] += 1.0
    outcome = resolve_body(fhir_bundle("r4b_amended_reference_only"), client)
    assert [e.patient_id for e in outcome.events] == ["MRN-0009"]  # read again: the server's MRN now
    assert [path for path, _ in fhir_server.requests] == [PATIENT, PATIENT]


def test_the_patient_cache_ttl_is_a_setting_of_an_hour_by_default(clean_env):  # (not the shell's WARDWATCH_*)
    assert Settings().fhir_patient_cache_ttl_s == 3600
    assert "monotonic" in Settings.model_fields["fhir_patient_cache_ttl_s"].description


def test_with_an_mrn_system_a_fetched_patients_mrn_is_the_identifier_typed_mr_of_that_system(fhir_server):
    """A Patient typed MR in two namespaces (another facility's first): only the EHR's is its key."""
    other = {"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.3.4.5", "value": "MRN-0042"}
    patient = json.loads(served_patient())
    fhir_server.script[PATIENT] = deque([(200, served_patient(identifier=[other, *patient["identifier"]]))] * 2)
    raw = fhir_bundle("r4b_amended_reference_only")
    unset = resolve_body(raw, client_for(fhir_server.url))
    assert [e.patient_id for e in unset.events] == ["MRN-0042"]  # unset: the first typed MR, as before
    system = "urn:oid:2.16.840.1.113883.19.5"
    outcome = resolve(parse(raw), raw, client_for(fhir_server.url, mrn_system=system), topic="t", partition=0,
                      offset=0, mrn_system=system)
    assert [e.patient_id for e in outcome.events] == ["MRN-0001"]
    # typed MR of another system only: no MRN, dead-lettered naming the setting
    fhir_server.script[PATIENT] = deque([(200, served_patient(identifier=[other]))])
    outcome = resolve(parse(raw), raw, client_for(fhir_server.url, mrn_system=system), topic="t", partition=0,
                      offset=0, mrn_system=system)
    r = rejection(outcome)
    assert r.reason is Reason.MISSING_PATIENT and "WARDWATCH_MRN_SYSTEM" in r.detail and "MRN-0042" not in r.detail


def test_a_fetched_patient_without_an_mrn_is_dead_lettered_as_missing_patient(fhir_server):
    fhir_server.script[PATIENT] = deque([(200, served_patient(identifier=[{"value": "not-typed"}]))])
    r = rejection(resolve_body(fhir_bundle("r4b_amended_reference_only"), client_for(fhir_server.url)))
    assert r.reason is Reason.MISSING_PATIENT and "pt-e4f5d6254795" not in r.detail


def test_a_subject_whose_patient_is_gone_is_dead_lettered_as_not_found(fhir_server):
    fhir_server.script[PATIENT] = deque([(404, b'{"resourceType": "OperationOutcome"}')])
    r = rejection(resolve_body(fhir_bundle("r4b_amended_reference_only"), client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND


def test_without_a_server_a_subject_named_by_the_server_id_alone_is_dead_lettered_saying_what_to_set():
    r = rejection(resolve_body(fhir_bundle("r4b_amended_reference_only"), None))
    assert r.reason is Reason.FHIR_SERVER_NOT_CONFIGURED
    assert "WARDWATCH_FHIR_SERVER_URL" in r.detail and "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS" in r.detail
    assert "pt-e4f5d6254795" not in r.detail


def test_an_id_only_reading_whose_subject_is_the_server_id_alone_reads_both(fhir_server):
    """The id-only Observation, once read, names its Patient by id only: its MRN is read next."""
    served = json.loads((SERVED / "Observation" / "vs-hr-9.json").read_bytes())
    served["subject"] = {"reference": "Patient/pt-e4f5d6254795"}
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(200, json.dumps(served).encode())])
    outcome = fetch_and_parse("r4b_id_only", client_for(fhir_server.url))
    assert isinstance(outcome, Parsed) and [(e.patient_id, e.value) for e in outcome.events] == [("MRN-0001", 112)]
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Observation/vs-hr-9", PATIENT]


def test_with_ids_that_are_mrns_nothing_is_read(fhir_server):
    raw = fhir_bundle("r4b_amended_reference_only")
    outcome = parse_notification(raw, topic="t", partition=0, offset=0, fhir_patient_ids_are_mrns=True)
    assert isinstance(outcome, Parsed) and [e.patient_id for e in outcome.events] == ["pt-e4f5d6254795"]
    assert fhir_server.requests == []


# --- deletes ---------------------------------------------------------------------------------------

BP_V1 = "/fhir/Observation/vs-bp-1/_history/1"


def resolve_body(raw: bytes, client: FhirClient | None):
    outcome = parse(raw)
    assert isinstance(outcome, NeedsFetch), outcome
    return resolve(outcome, raw, client, topic="ww.fhir.notifications", partition=3, offset=7)


def strip(name: str, *drop: str) -> bytes:
    """A fixture notification with entries' `drop` keys removed (resource: id-only; etag: version unknown)."""
    bundle = json.loads(fhir_bundle(name))
    for entry in bundle["entry"][1:]:
        for key in drop:
            entry.pop(key, None)
            entry.get("response", {}).pop(key, None)
    return json.dumps(bundle).encode()


@pytest.mark.timeout(60)
def test_a_deleted_reading_is_retracted_and_stops_counting_in_the_features(fhir_server):
    delivered = parse(fhir_bundle("r4b_status_event"))
    outcome = fetch_and_parse("r4b_delete_bp", client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was resource_not_found: the GET of the deleted resource
    assert [path for path, _ in fhir_server.requests] == [BP_V1]  # the vread of the version before
    bp = {e.fact_id: e.version for e in delivered.events if e.fact_id.startswith("fhir:Observation/vs-bp-1:")}
    assert {e.fact_id: e.version for e in outcome.events} == {fact: 2 for fact in bp} and set(bp.values()) == {1}
    assert all(e.status.retracts and e.value is None for e in outcome.events)

    # the patient's state as the worker keeps it: the systolic pressure is gone from its features
    rules = dict(allowed_lateness_ms=3_600_000, dedupe_horizon_ms=48 * 3_600_000, cross_source_tolerance=0.05)
    before = apply_batch(None, delivered.events, **rules).state
    after = apply_batch(before, outcome.events, **rules)
    at = max(e.effective_ms for e in delivered.events)
    assert compute_features(before, at)["systolic_bp_last_24h"] == 96
    assert {o.kind for o in after.outcomes} == {Kind.CORRECTED}
    assert compute_features(after.state, at)["systolic_bp_last_24h"] is None
    assert not after.state.live(codes.SYSTOLIC_BP) and not after.state.live(codes.DIASTOLIC_BP)


@pytest.mark.timeout(60)
def test_a_delete_of_unknown_version_reads_the_history_and_takes_the_version_before_it(fhir_server):
    v1, v2 = (json.loads((SERVED / f"Observation/vs-bp-1/_history/{v}.json").read_bytes()) for v in (1, 2))
    history = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {**v2, "meta": {"versionId": "4"}}},  # re-created after the delete: still live
        {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"etag": 'W/"3"'}},
        {"resource": v2}, {"resource": v1}]}
    fhir_server.script["/fhir/Observation/vs-bp-1/_history"] = deque([(200, json.dumps(history).encode())])
    outcome = resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome
    assert {e.version for e in outcome.events} == {3}  # one past version 2: below the re-created 4
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Observation/vs-bp-1/_history"]


@pytest.mark.timeout(60)
def test_a_late_delete_without_versions_does_not_retract_the_re_created_reading(fhir_server):
    v1, v2 = (json.loads((SERVED / f"Observation/vs-bp-1/_history/{v}.json").read_bytes()) for v in (1, 2))
    history = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {**v2, "meta": {"versionId": "4"}}},  # re-created after the delete: live
        {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"status": "204"}},  # no etag
        {"resource": v2}, {"resource": v1}]}
    fhir_server.script["/fhir/Observation/vs-bp-1/_history"] = deque([(200, json.dumps(history).encode())])
    outcome = resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome
    # version 2's facts, one past it: below the live 4 (was version 5, retracting the re-created reading)
    assert {e.version for e in outcome.events} == {3} and all(e.status.retracts for e in outcome.events)


@pytest.mark.timeout(60)
def test_id_only_update_and_delete_in_one_notification_reads_only_the_version_before_the_delete(fhir_server):
    outcome = resolve_body(strip("r4b_update_and_delete_bp", "resource"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # the current resource is gone (410): it is not requested
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Observation/vs-bp-1/_history/2"]
    assert sorted((e.code, e.version, e.status.value) for e in outcome.events) == [
        (codes.DIASTOLIC_BP, 3, "entered-in-error"), (codes.SYSTOLIC_BP, 3, "entered-in-error")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [404, 410])
def test_a_version_before_the_delete_the_server_cannot_read_is_dead_lettered_as_not_found(fhir_server, status):
    fhir_server.script[BP_V1] = deque([(status, b"{}")])
    r = rejection(fetch_and_parse("r4b_delete_bp", client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND and f"Observation/_history: the FHIR server answered {status}" in r.detail
    assert "vs-bp-1" not in r.detail
    assert [path for path, _ in fhir_server.requests] == [BP_V1]  # a 410 here is no delete of version 1


@pytest.mark.timeout(60)
def test_a_history_without_a_version_before_the_delete_is_dead_lettered_as_not_found(fhir_server):
    gone = {"resourceType": "Bundle", "type": "history", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"etag": 'W/"2"'}}]}
    fhir_server.script["/fhir/Observation/vs-bp-1/_history"] = deque([(200, json.dumps(gone).encode())])
    r = rejection(resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND and "no version before the delete" in r.detail


def test_without_a_server_a_delete_is_dead_lettered_saying_what_to_set():
    r = rejection(fetch_and_parse("r4b_delete_bp", None))
    assert r.reason is Reason.FHIR_SERVER_NOT_CONFIGURED and "WARDWATCH_FHIR_SERVER_URL" in r.detail


# --- a focus the server answers 410 Gone (id-only notification of a delete, no DELETE entry) -------

BP = "/fhir/Observation/vs-bp-1"
DELETED_AT = "2024-06-15T14:20:00Z"


def id_only(*focus: str) -> bytes:
    """r4b_id_only naming `focus` instead: one notification event and one id-only entry (a fullUrl) each."""
    bundle = json.loads(fhir_bundle("r4b_id_only"))
    status = bundle["entry"][0]
    event = status["resource"]["notificationEvent"][0]
    status["resource"]["notificationEvent"] = [{**event, "eventNumber": str(32 + i), "focus": {"reference": ref}}
                                               for i, ref in enumerate(focus)]
    status["resource"]["eventsSinceSubscriptionStart"] = str(31 + len(focus))
    bundle["entry"] = [status, *({"fullUrl": f"https://ehr.example.org/fhir/{ref}"} for ref in focus)]
    return json.dumps(bundle).encode()


def served_bp(version: int) -> dict:
    return json.loads((SERVED / f"Observation/vs-bp-1/_history/{version}.json").read_bytes())


def bp_deleted(fhir_server, delete: dict | None = None) -> None:
    """vs-bp-1 deleted as version 3 after versions 1 and 2: 410 for the resource, its history newest first."""
    delete = delete or {"request": {"method": "DELETE", "url": "Observation/vs-bp-1/_history/3"},
                        "response": {"status": "204", "etag": 'W/"3"', "lastModified": DELETED_AT}}
    fhir_server.script[BP] = deque([(410, b'{"resourceType": "OperationOutcome"}')])
    fhir_server.histories[f"{BP}/_history"] = [delete, {"resource": served_bp(2)}, {"resource": served_bp(1)}]


@pytest.mark.timeout(60)
def test_an_id_only_notification_of_a_deleted_reading_retracts_it_and_it_stops_counting(fhir_server):
    bp_deleted(fhir_server)
    outcome = resolve_body(id_only("Observation/vs-bp-1"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was resource_not_found: the 410 of the focus
    assert [path for path, _ in fhir_server.requests] == [BP, f"{BP}/_history"]
    # exactly the facts of the last version (2), retracted at the delete's version 3, issued when deleted
    v2 = parse(complete_notification(id_only("Observation/vs-bp-1"), {"Observation/vs-bp-1": served_bp(2)}))
    assert {e.fact_id: e.version for e in v2.events} == {e.fact_id: 2 for e in outcome.events}
    assert len(outcome.events) == 2 and {e.version for e in outcome.events} == {3}
    for r, fact in zip(sorted(outcome.events, key=lambda e: e.fact_id), sorted(v2.events, key=lambda e: e.fact_id)):
        assert (r.status, r.value, r.value_text) == (Status.ENTERED_IN_ERROR, None, None)
        assert (r.patient_id, r.code, r.effective_ms, r.encounter_id) == (
            fact.patient_id, fact.code, fact.effective_ms, fact.encounter_id)
        assert r.issued_ms == iso_to_ms(DELETED_AT, "lastModified")

    # applied to the patient's state as the worker keeps it: the systolic pressure is gone from its features
    delivered = parse(fhir_bundle("r4b_status_event"))
    rules = dict(allowed_lateness_ms=3_600_000, dedupe_horizon_ms=48 * 3_600_000, cross_source_tolerance=0.05)
    before = apply_batch(None, delivered.events, **rules).state
    after = apply_batch(before, outcome.events, **rules)
    at = max(e.effective_ms for e in delivered.events)
    assert compute_features(before, at)["systolic_bp_last_24h"] == 96
    assert compute_features(after.state, at)["systolic_bp_last_24h"] is None
    assert not after.state.live(codes.SYSTOLIC_BP) and not after.state.live(codes.DIASTOLIC_BP)


@pytest.mark.timeout(60)
def test_a_delete_the_history_lists_by_its_status_only_is_still_the_delete(fhir_server):
    # some servers list a delete without its request: no resource, response.status 204 / 410
    bp_deleted(fhir_server, {"fullUrl": "https://ehr.example.org/fhir/Observation/vs-bp-1",
                             "response": {"status": "410 Gone", "lastModified": DELETED_AT}})
    outcome = resolve_body(id_only("Observation/vs-bp-1"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome
    assert {e.version for e in outcome.events} == {3}  # no etag: one past the version before (2)
    # issued when deleted, not at the notification's timestamp (14:07:01)
    assert {e.issued_ms for e in outcome.events} == {iso_to_ms(DELETED_AT, "lastModified")}
    assert all(e.status.retracts for e in outcome.events)


@pytest.mark.timeout(60)
def test_a_notification_naming_a_deleted_and_a_live_reading_gives_both(fhir_server):
    bp_deleted(fhir_server)
    outcome = resolve_body(id_only("Observation/vs-bp-1", "Observation/vs-hr-9"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was resource_not_found for the whole notification
    assert outcome.event_numbers == [32, 33]
    assert {e.code: (e.version, e.value) for e in outcome.events} == {
        codes.SYSTOLIC_BP: (3, None), codes.DIASTOLIC_BP: (3, None), codes.HEART_RATE: (1, 112)}
    assert len(outcome.events) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("history", [
    (404, b'{"resourceType": "OperationOutcome"}'),
    (410, b'{"resourceType": "OperationOutcome"}'),
    (200, json.dumps({"resourceType": "Bundle", "type": "history", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"etag": 'W/"2"'}}]}).encode()),
], ids=["404", "410", "no-version-before"])
def test_a_deleted_reading_whose_history_cannot_be_read_is_dead_lettered_as_not_found(fhir_server, history):
    fhir_server.script[BP] = deque([(410, b"{}")])
    fhir_server.script[f"{BP}/_history"] = deque([history])
    r = rejection(resolve_body(id_only("Observation/vs-bp-1"), client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND
    assert r.detail.startswith("GET Observation: deleted (410) and its history could not be read: ")
    assert "vs-bp-1" not in r.detail
    assert [path for path, _ in fhir_server.requests] == [BP, f"{BP}/_history"]


@pytest.mark.timeout(60)
def test_a_deleted_planned_encounter_is_skipped_and_the_live_reading_beside_it_is_read(fhir_server):
    enc = "/fhir/Encounter/enc-4d8ac7e31e96"
    served = json.loads((SERVED / "Encounter/enc-4d8ac7e31e96.json").read_bytes())
    planned = {**{k: v for k, v in served.items() if k not in ("period", "location")},  # no period.start yet
               "status": "planned", "meta": {"versionId": "1", "lastUpdated": "2024-06-15T08:00:00Z"}}
    history = {"resourceType": "Bundle", "type": "history", "entry": [
        {"request": {"method": "DELETE", "url": "Encounter/enc-4d8ac7e31e96/_history/2"},
         "response": {"status": "204", "etag": 'W/"2"', "lastModified": DELETED_AT}}, {"resource": planned}]}
    fhir_server.script[enc] = deque([(410, b'{"resourceType": "OperationOutcome"}')])
    fhir_server.script[f"{enc}/_history"] = deque([(200, json.dumps(history).encode())])
    outcome = resolve_body(id_only("Encounter/enc-4d8ac7e31e96", "Observation/vs-hr-9"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was missing_time for the whole notification
    assert [(e.code, e.value) for e in outcome.events] == [(codes.HEART_RATE, 112)]
    assert outcome.skipped == {"Encounter": 1}  # never admitted: no facts to retract, counted like its updates


def test_a_deleted_resource_of_a_type_wardwatch_does_not_map_is_skipped_without_reading_its_history(fhir_server):
    fhir_server.script["/fhir/Condition/c-1"] = deque([(410, b"{}")])
    outcome = resolve_body(id_only("Condition/c-1"), client_for(fhir_server.url))
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"Condition": 1}
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Condition/c-1"]


def features_after(events) -> dict:
    """The features of r4b_status_event's patient before and after `events`, as the worker keeps its state."""
    delivered = parse(fhir_bundle("r4b_status_event"))
    rules = dict(allowed_lateness_ms=3_600_000, dedupe_horizon_ms=48 * 3_600_000, cross_source_tolerance=0.05)
    before = apply_batch(None, delivered.events, **rules).state
    after = apply_batch(before, events, **rules).state
    at = max(e.effective_ms for e in delivered.events)
    assert compute_features(before, at)["systolic_bp_last_24h"] == 96
    return compute_features(after, at)


def bp_facts(version: int) -> dict[str, int]:
    """fact id -> version of what vs-bp-1's `version` gave."""
    v = parse(complete_notification(id_only("Observation/vs-bp-1"), {"Observation/vs-bp-1": served_bp(version)}))
    return {e.fact_id: e.version for e in v.events}


# --- a history the server pages ----------------------------------------------------------------------

HISTORY = f"{BP}/_history"


def bp_recreated(*versions: int) -> list[dict]:
    """History entries of vs-bp-1 re-created after a delete: version 2's content as each of `versions`."""
    return [{"resource": {**served_bp(2), "meta": {**served_bp(2)["meta"], "versionId": str(v)}}} for v in versions]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("link", [
    None,  # absolute, as HAPI writes them
    lambda path, page: f"Observation/vs-bp-1/_history?_page={page}",  # relative to the base URL
    lambda path, page: f"{path}?_page={page}",  # an absolute path on this server
], ids=["absolute", "relative", "absolute-path"])
def test_a_gone_reading_whose_version_before_the_delete_is_on_the_second_page_is_retracted(fhir_server, link):
    bp_deleted(fhir_server)
    fhir_server.page_size = 1  # page 1: the delete only; page 2: version 2; page 3: version 1
    if link:
        fhir_server.next_link = link
    outcome = resolve_body(id_only("Observation/vs-bp-1"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was resource_not_found: no version before the delete on page 1
    assert [path for path, _ in fhir_server.requests] == [BP, HISTORY, f"{HISTORY}?_page=2"]  # not page 3
    assert {e.fact_id: e.version for e in outcome.events} == {fact: 3 for fact in bp_facts(2)}
    assert all(e.status.retracts and e.value is None for e in outcome.events)
    assert features_after(outcome.events)["systolic_bp_last_24h"] is None


@pytest.mark.timeout(60)
def test_a_delete_behind_a_page_of_re_created_versions_retracts_the_version_before_it_not_the_live_one(fhir_server):
    # deleted (no etag), then re-created as 4, 5 and 6: page 1 holds only the live versions
    fhir_server.histories[HISTORY] = [*bp_recreated(6, 5, 4), {
        "request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"status": "204"}},
        {"resource": served_bp(2)}, {"resource": served_bp(1)}]
    fhir_server.page_size = 2
    outcome = resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome
    # version 2's facts, one past it; was the live version 6, retracted at version 7
    assert {e.fact_id: e.version for e in outcome.events} == {fact: 3 for fact in bp_facts(2)}
    assert [path for path, _ in fhir_server.requests] == [HISTORY, f"{HISTORY}?_page=2", f"{HISTORY}?_page=3"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("elsewhere", ["another-port", "another-host", "https"])
def test_a_next_page_on_another_server_is_not_read(fhir_server, elsewhere):
    other = FhirServer()  # a server that would get the token
    try:
        fhir_server.next_link = {
            "another-port": lambda path, page: f"{other.origin}{path}?_page={page}",
            "another-host": lambda path, page: f"https://fhir.elsewhere.example{path}?_page={page}",
            "https": lambda path, page: f"{fhir_server.origin.replace('http:', 'https:')}{path}?_page={page}",
        }[elsewhere]
        bp_deleted(fhir_server)
        fhir_server.page_size = 1
        r = rejection(resolve_body(id_only("Observation/vs-bp-1", "Observation/vs-hr-9"), client_for(fhir_server.url)))
        assert other.requests == []
    finally:
        other.stop()
    assert r.reason is Reason.FETCH_FAILED  # was resource_not_found: the next page was never read
    assert r.detail.startswith("GET Observation: deleted (410) and its history could not be read: GET "
                               "Observation/_history: the next page of the history is on another server")
    assert "vs-bp-1" not in r.detail and "elsewhere" not in r.detail and str(other.origin) not in r.detail
    assert [path for path, _ in fhir_server.requests] == [BP, HISTORY]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outside", ["/admin", "/fhirx", "/fhir/..", "/fhir/%2e%2e", "/fhir/.%2E", "/fhir/..%2F"])
def test_a_next_page_outside_the_base_path_is_not_read(fhir_server, outside):
    """Same host and port, another application behind it (a reverse proxy's other paths): it would get the
    token too. Was: read (only scheme, host and port were compared)."""
    fhir_server.next_link = lambda path, page: f"{fhir_server.origin}{outside}{path.removeprefix('/fhir')}?_page={page}"
    bp_deleted(fhir_server)
    fhir_server.page_size = 1
    r = rejection(resolve_body(id_only("Observation/vs-bp-1"), client_for(fhir_server.url)))
    assert r.reason is Reason.FETCH_FAILED and "outside the FHIR base path" in r.detail
    assert [path for path, _ in fhir_server.requests] == [BP, HISTORY]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("pages", "read"), [(3, False), (6, True)])
def test_the_history_is_read_up_to_the_page_bound(fhir_server, pages, read):
    # re-created as 4 to 7 after the delete: version 2 is on page 6 at one entry a page
    fhir_server.histories[HISTORY] = [*bp_recreated(7, 6, 5, 4), {
        "request": {"method": "DELETE", "url": "Observation/vs-bp-1"}, "response": {"status": "204"}},
        {"resource": served_bp(2)}, {"resource": served_bp(1)}]
    fhir_server.page_size = 1
    outcome = resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url, fhir_history_max_pages=pages))
    assert len(fhir_server.requests) == pages
    if read:
        assert isinstance(outcome, Parsed) and {e.version for e in outcome.events} == {3}, outcome
    else:  # was the live version 7, retracted
        r = rejection(outcome)
        assert r.reason is Reason.FETCH_FAILED and "WARDWATCH_FHIR_HISTORY_MAX_PAGES" in r.detail
        assert r.detail == ("GET Observation/_history: the version before the delete is not in the first 3 pages "
                            "of the history (raise WARDWATCH_FHIR_HISTORY_MAX_PAGES, then replay)")


@pytest.mark.timeout(60)
def test_next_links_going_round_in_a_circle_stop_at_the_page_bound(fhir_server):
    fhir_server.histories[HISTORY] = [*bp_recreated(5, 4), {"resource": served_bp(2)}]  # no delete listed
    fhir_server.page_size = 1
    fhir_server.next_link = lambda path, page: f"{fhir_server.origin}{path}"  # every page links to page 1
    r = rejection(resolve_body(strip("r4b_delete_bp", "etag"), client_for(fhir_server.url, fhir_history_max_pages=4)))
    assert r.reason is Reason.FETCH_FAILED and "first 4 pages" in r.detail
    assert [path for path, _ in fhir_server.requests] == [HISTORY] * 4


# --- a versioned focus of the deleting version, answered 410 Gone ------------------------------------


@pytest.mark.timeout(60)
def test_a_versioned_focus_of_a_delete_answered_410_retracts_the_version_before_it(fhir_server):
    fhir_server.script[f"{BP}/_history/3"] = deque([(410, b'{"resourceType": "OperationOutcome"}')])
    outcome = resolve_body(id_only("Observation/vs-bp-1/_history/3", "Observation/vs-hr-9"),
                           client_for(fhir_server.url))
    assert isinstance(outcome, Parsed), outcome  # was resource_not_found for the whole notification
    assert [path for path, _ in fhir_server.requests] == [f"{BP}/_history/3", f"{BP}/_history/2",
                                                          "/fhir/Observation/vs-hr-9"]
    retracted = {e.fact_id: e for e in outcome.events if e.code != codes.HEART_RATE}
    # version 2's facts (above the delivered version 1), retracted at the delete's version 3
    assert {fact: e.version for fact, e in retracted.items()} == {fact: 3 for fact in bp_facts(2)}
    assert all((e.status, e.value, e.value_text) == (Status.ENTERED_IN_ERROR, None, None) for e in retracted.values())
    assert [(e.value, e.version) for e in outcome.events if e.code == codes.HEART_RATE] == [(112, 1)]  # still read
    features = features_after(outcome.events)
    assert features["systolic_bp_last_24h"] is None


@pytest.mark.timeout(60)
def test_a_versioned_focus_answered_410_whose_version_before_cannot_be_read_is_not_found(fhir_server):
    fhir_server.script[f"{BP}/_history/3"] = deque([(410, b"{}")])
    fhir_server.script[f"{BP}/_history/2"] = deque([(404, b"{}")])
    r = rejection(resolve_body(id_only("Observation/vs-bp-1/_history/3"), client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND
    assert r.detail == ("GET Observation/_history: deleted (410) and the version before it could not be read: "
                        "GET Observation/_history: the FHIR server answered 404")


@pytest.mark.timeout(60)
def test_a_versioned_focus_answered_404_stays_not_found(fhir_server):
    fhir_server.script[f"{BP}/_history/3"] = deque([(404, b"{}")])  # never visible: nothing says it was deleted
    r = rejection(resolve_body(id_only("Observation/vs-bp-1/_history/3"), client_for(fhir_server.url)))
    assert r.reason is Reason.RESOURCE_NOT_FOUND
    assert r.detail == "GET Observation/_history: the FHIR server answered 404"
    assert [path for path, _ in fhir_server.requests] == [f"{BP}/_history/3"]


def test_a_versioned_focus_of_a_type_wardwatch_does_not_map_answered_410_is_skipped(fhir_server):
    fhir_server.script["/fhir/Condition/c-1/_history/2"] = deque([(410, b"{}")])
    outcome = resolve_body(id_only("Condition/c-1/_history/2"), client_for(fhir_server.url))
    assert isinstance(outcome, Ignored) and outcome.detail["skipped"] == {"Condition": 1}  # was resource_not_found
    assert [path for path, _ in fhir_server.requests] == ["/fhir/Condition/c-1/_history/2"]


# --- through the real broker ---------------------------------------------------------------------


def _read_until(consumer: Consumer, enough, deadline_s: float = 60):
    """Consume until `enough(messages)` holds; a deadline, never a fixed wait."""
    messages, deadline = [], time.monotonic() + deadline_s
    while not enough(messages):
        assert time.monotonic() < deadline, f"only {len(messages)} messages arrived"
        messages += [m for m in consumer.consume(100, timeout=0.2) if m.error() is None]
    return messages


@pytest.mark.integration
def test_ingest_worker_fetches_id_only_notifications_into_canonical_events(settings, fhir_server):
    settings = settings.model_copy(update={"fhir_server_url": fhir_server.url, "fhir_retry_backoff_s": 0.01})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    producer = Producer(settings.kafka_client_config())
    producer.produce(topics.fhir, key=b"MRN-0001", value=fhir_bundle("r4_id_only_parameters"))
    fhir_server.script["/fhir/Observation/vs-hr-9"] = deque([(404, b"{}")])  # deleted since notified
    producer.produce(topics.fhir, key=b"MRN-0001", value=fhir_bundle("r4b_id_only"))
    assert producer.flush(30) == 0

    reader = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    reader.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                   for t in (topics.canonical, topics.deadletter) for p in range(topics.partitions)])
    worker, stop = IngestWorker(settings, topics), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        messages = _read_until(reader, lambda ms: {m.topic() for m in ms} == {topics.canonical, topics.deadletter})
    finally:
        stop.set()
        thread.join(30)
        reader.close()

    (canonical,) = [m for m in messages if m.topic() == topics.canonical]
    events = decode_batch(canonical.value())
    assert canonical.key() == b"MRN-0001"
    assert sorted(e.code for e in events) == sorted([codes.ADMISSION, codes.LOCATION, codes.SEX, codes.BIRTH_YEAR])
    (dead,) = [m for m in messages if m.topic() == topics.deadletter]
    headers = dict(dead.headers())
    assert headers["ww.reason"] == Reason.RESOURCE_NOT_FOUND.value.encode()
    assert dead.value() == fhir_bundle("r4b_id_only")  # the original id-only bytes, replayable
    assert worker.counters.snapshot()["fhir"]["dead_lettered"] == {"resource_not_found": 1}


# --- WARDWATCH_FHIR_PROXY_URL: the only proxy the FHIR client uses ----------------------------------------


@pytest.fixture
def unreachable_fhir(fhir_server):
    """(the FHIR server's URL at a loopback port nothing answers on, a proxy that forwards requests for that
    address to the FHIR server): a read that succeeds went through the proxy."""
    from tests.streams.forward_proxy import ForwardProxy
    from wardwatch.broker import closed_port

    with closed_port() as port:
        proxy = ForwardProxy({f"127.0.0.1:{port}": ("127.0.0.1", int(fhir_server.origin.rsplit(":", 1)[1]))},
                             credentials="ward:pa ss")
        try:
            yield f"http://127.0.0.1:{port}/fhir", proxy
        finally:
            proxy.stop()


def test_with_a_proxy_url_the_fhir_reads_go_through_that_proxy_with_its_credentials(fhir_server, unreachable_fhir):
    """A hospital whose FHIR server is reachable only through an HTTP proxy: the reads go through it (the server's
    own address refuses connections here), with the proxy's credentials from the URL and the server's token."""
    url, proxy = unreachable_fhir
    outcome = fetch_and_parse("r4b_id_only", client_for(url, fhir_proxy_url=SecretStr(
        proxy.url.replace("http://", "http://ward:pa%20ss@")), fhir_retries=0))
    assert isinstance(outcome, Parsed) and [e.value for e in outcome.events] == [112]
    assert [(method, target) for method, target, _ in proxy.requests] == [("GET", f"{url}/Observation/vs-hr-9")]
    assert proxy.requests[0][2] == "Basic d2FyZDpwYSBzcw=="  # ward:pa ss
    assert fhir_server.requests == [("/fhir/Observation/vs-hr-9", f"Bearer {TOKEN}")]  # the proxy forwarded it


def test_without_a_proxy_url_no_proxy_from_the_environment_gets_the_token(fhir_server, unreachable_fhir, monkeypatch,
                                                                          caplog):
    """HTTP_PROXY and the like are not the operator's choice of where the FHIR token goes: ignored (httpx would
    follow them by default); wrong proxy credentials: a FETCH_FAILED saying 407, without them in the detail."""
    url, proxy = unreachable_fhir
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url.replace("http://", "http://ward:pa%20ss@"))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    rejected_ = rejection(fetch_and_parse("r4b_id_only", client_for(url, fhir_retries=0)))
    assert rejected_.reason is Reason.FETCH_FAILED and "ConnectError" in rejected_.detail
    [warning] = [r.getMessage() for r in caplog.records if "proxy is set in the environment" in r.getMessage()]
    assert "WARDWATCH_FHIR_PROXY_URL" in warning and "pa%20ss" not in warning and proxy.url not in warning
    assert proxy.requests == [] and fhir_server.requests == []
    wrong = SecretStr(proxy.url.replace("http://", "http://ward:wrong@"))
    rejected_ = rejection(fetch_and_parse("r4b_id_only", client_for(url, fhir_proxy_url=wrong, fhir_retries=0)))
    assert rejected_.reason is Reason.FETCH_FAILED and "407" in rejected_.detail and "wrong" not in rejected_.detail
    assert fhir_server.requests == []
