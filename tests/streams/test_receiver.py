"""The rest-hook receiver: pure decisions, then real HTTP on 127.0.0.1 against the real broker."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import httpx
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import SecretStr

from schemas.deadletter import Reason
from streams.receiver import (Accept, BackgroundReceiver, Receiver, Refuse, classify, content_type_ok, post_notification,
                              token_ok)
from streams.stats import read_stats, summarize
from streams.topics import ensure_topics, topics_for
from wardwatch.broker import EmbeddedBroker, closed_port, free_port
from wardwatch.procs import start_http_service, stop_service
from wardwatch.settings import Settings
from tests.fixtures.ingest.corpus import fhir_bundle, raw_file

SUBSCRIPTION = b"https://ehr.example.org/fhir/Subscription/ww-vitals"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
DEADLINE_S = 30


# --- pure ----------------------------------------------------------------------------------------


def test_bearer_token_must_match_exactly_when_configured():
    assert token_ok(None, None) and token_ok("Bearer anything", None)
    assert token_ok("Bearer s3cret", "s3cret") and token_ok("bearer s3cret", "s3cret")
    assert not token_ok(None, "s3cret")
    assert not token_ok("Bearer s3cre", "s3cret")
    assert not token_ok("Basic s3cret", "s3cret")


def test_a_token_that_is_not_utf8_is_a_wrong_token():
    assert not token_ok("Bearer \udcff\udcfe", "s3cret")  # how aiohttp hands over the bytes ff fe
    assert token_ok("Bearer p\u00e4ss", "p\u00e4ss")


def test_only_json_content_types_are_accepted():
    assert content_type_ok("application/fhir+json") and content_type_ok("application/json")
    assert not content_type_ok("text/plain") and not content_type_ok("application/octet-stream")


def test_event_notification_is_keyed_by_its_patient():
    assert classify(fhir_bundle("r4b_status_event")) == Accept(b"MRN-0001", "event")


def test_handshake_and_id_only_notifications_are_accepted_keyed_by_subscription():
    assert classify(fhir_bundle("r4b_handshake")) == Accept(SUBSCRIPTION, "handshake")
    # id-only needs a fetch, which the ingest worker does: the receiver must not refuse it
    assert classify(fhir_bundle("r4b_id_only")) == Accept(SUBSCRIPTION, "needs_fetch")


def test_notifications_with_deletes_are_accepted_not_refused():
    # an update and a delete of one Observation: was refused (400) as internal_error
    assert classify(fhir_bundle("r4b_update_and_delete_bp")) == Accept(b"MRN-0001", "event")
    # a delete alone needs the version before it, which the ingest worker reads from the FHIR server
    assert classify(fhir_bundle("r4b_delete_bp")) == Accept(SUBSCRIPTION, "needs_fetch")


def test_a_subject_named_by_the_fhir_servers_patient_id_alone_is_accepted_for_the_ingest_to_read_its_mrn():
    """The ingest worker reads the Patient's MRN from the FHIR server: the receiver must not refuse it, nor key
    it by the server's id (which may be another patient's MRN)."""
    body = fhir_bundle("r4b_amended_reference_only")
    assert classify(body) == Accept(SUBSCRIPTION, "needs_fetch")
    assert classify(body, fhir_patient_ids_are_mrns=True) == Accept(b"pt-e4f5d6254795", "event")


def test_a_patient_without_an_mrn_is_refused_unless_its_id_is_the_mrn():
    bundle = json.loads(fhir_bundle("r4b_patient"))
    del bundle["entry"][1]["resource"]["identifier"][1]["type"]
    body = json.dumps(bundle).encode()
    assert classify(body).rejection.reason is Reason.MISSING_PATIENT
    assert classify(body, fhir_patient_ids_are_mrns=True) == Accept(b"pt-e4f5d6254795", "event")


def test_bad_bodies_are_refused_with_the_parser_reason():
    assert classify(b"{not json").rejection.reason is Reason.MALFORMED_JSON
    assert classify(fhir_bundle("wrong_resource_type")).rejection.reason is Reason.INVALID_STRUCTURE
    refused = classify(fhir_bundle("heart_rate_5000"))
    assert isinstance(refused, Refuse) and refused.rejection.reason is Reason.IMPLAUSIBLE_VALUE


def test_a_counter_beyond_int64_is_refused():
    oversized = fhir_bundle("r4b_handshake").replace(b'"eventsSinceSubscriptionStart": "0"',
                                                     b'"eventsSinceSubscriptionStart": "100000000000000000000"')
    refused = classify(oversized)
    assert isinstance(refused, Refuse) and refused.rejection.reason is Reason.INVALID_STRUCTURE


# --- real HTTP, stand-in producer ----------------------------------------------------------------


class RefusingProducer:
    """A producer whose produce() raises `code` at once, as librdkafka does for a message over its size
    limit or a topic known not to exist; the stats topic takes its writes."""

    def __init__(self, code: int):
        self.code = code

    def produce(self, topic, **kwargs):
        if not topic.endswith(".stats"):
            raise KafkaException(KafkaError(self.code))

    def poll(self, timeout):
        return 0

    def flush(self, timeout=None):
        return 0

    def purge(self, *args, **kwargs):
        pass

    def close(self):
        return True


def post_with_producer(monkeypatch, producer, body: bytes, headers=FHIR_JSON):
    """POST `body` to a receiver whose producer is `producer`; the aiohttp response, read."""
    monkeypatch.setattr("confluent_kafka.Producer", lambda config: producer)
    receiver = Receiver(Settings(topic_prefix="t"))

    async def post():
        async with TestClient(TestServer(receiver.app)) as client:
            response = await client.post("/fhir/notifications", data=body, headers=headers)
            await response.read()
            return response

    return asyncio.run(post())


MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"  # the fixtures' MRN namespace


def national_id_subject() -> bytes:
    """A reading whose subject names its Patient by reference and by a national number equal to MRN-0042."""
    bundle = json.loads(fhir_bundle("r4b_amended_reference_only"))
    bundle["entry"][1]["resource"]["subject"]["identifier"] = {"system": "urn:oid:2.16.840.1.113883.4.1",
                                                               "value": "MRN-0042"}
    return json.dumps(bundle).encode()


class RecordingProducer(RefusingProducer):
    """A producer that stores every write at once (partition 0, offset n) and keeps (topic, key)."""

    def __init__(self):
        self.written: list[tuple[str, bytes | None]] = []

    def produce(self, topic, *, key=None, value=None, headers=None, on_delivery=None):
        self.written.append((topic, key))
        if on_delivery is not None:
            on_delivery(None, type("Stored", (), {"partition": lambda s: 0, "offset": lambda s: len(self.written)})())


def test_with_an_mrn_system_a_subject_identifier_of_another_system_is_not_the_raw_key(monkeypatch):
    """The receiver keys a notification as the ingest will read it: with WARDWATCH_MRN_SYSTEM a national number
    equal to another patient's MRN is no MRN (the ingest reads the subject's Patient for it), so the message is
    not partitioned as that other patient's."""
    assert classify(national_id_subject()) == Accept(b"MRN-0042", "event")  # unset: any identifier, as before
    assert classify(national_id_subject(), mrn_system=MRN_SYSTEM) == Accept(SUBSCRIPTION, "needs_fetch")
    producer = RecordingProducer()
    monkeypatch.setattr("confluent_kafka.Producer", lambda config: producer)
    receiver = Receiver(Settings(topic_prefix="t", mrn_system=MRN_SYSTEM))

    async def post():
        async with TestClient(TestServer(receiver.app)) as client:
            response = await client.post("/fhir/notifications", data=national_id_subject(), headers=FHIR_JSON)
            await response.read()
            return response.status

    assert asyncio.run(post()) in (200, 201)
    assert [key for topic, key in producer.written if not topic.endswith(".stats")] == [SUBSCRIPTION]


def test_only_a_write_over_the_size_limit_is_unstorable_the_rest_is_retried(monkeypatch):
    unknown_topic = RefusingProducer(KafkaError._UNKNOWN_TOPIC)
    for name in ("r4b_status_event", "heart_rate_5000"):  # stored, and refused (its dead letter)
        response = post_with_producer(monkeypatch, unknown_topic, fhir_bundle(name))
        assert response.status == 503 and int(response.headers["Retry-After"]) > 0
    too_large = post_with_producer(monkeypatch, RefusingProducer(KafkaError.MSG_SIZE_TOO_LARGE),
                                   fhir_bundle("r4b_status_event"))
    assert too_large.status == 413 and "Retry-After" not in too_large.headers


def test_an_authorization_header_that_is_not_utf8_gets_401(monkeypatch):
    # no broker: the token is checked before anything is written
    monkeypatch.setattr("confluent_kafka.Producer", lambda config: RefusingProducer(KafkaError._UNKNOWN_TOPIC))
    receiver = Receiver(Settings(topic_prefix="t", receiver_token=SecretStr("s3cret")))
    body = fhir_bundle("r4b_handshake")

    async def post_raw() -> bytes:  # an HTTP client would refuse to send these header bytes
        async with TestServer(receiver.app) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /fhir/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                         b"Authorization: Bearer \xff\xfe\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            status_line = await reader.readline()
            writer.close()
            return status_line

    assert asyncio.run(post_raw()).split()[1] == b"401"


def test_a_malformed_authorization_header_never_puts_the_token_in_the_log(monkeypatch, capsys):
    # was: aiohttp logs a malformed request's offending header line with its traceback, and the log's scrubbing
    # took out identifier-like values only: the sender's bearer token went into the receiver's log as it was
    import logging

    from wardwatch import observability

    monkeypatch.setattr("confluent_kafka.Producer", lambda config: RefusingProducer(KafkaError._UNKNOWN_TOPIC))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    async def post_raw() -> bytes:
        receiver = Receiver(Settings(topic_prefix="t", receiver_token=SecretStr("s3cret-token-abc")))
        async with TestServer(receiver.app) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /fhir/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                         b"Authorization: Bearer s3cret-token-abc\x01\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            status_line = await reader.readline()
            writer.close()
            return status_line

    try:
        for json_logs in (True, False):
            observability.configure_logging("receiver", "INFO", json_logs=json_logs)
            assert asyncio.run(post_raw()).split()[1] == b"400"
            err = capsys.readouterr().err
            assert "Authorization: <redacted>" in err  # the line is logged, its value is not
            assert "s3cret-token-abc" not in err
    finally:
        root.handlers[:], root.level = handlers, level


class AckingProducer:
    """A producer whose broker acknowledges every write at once."""

    class Stored:
        def partition(self):
            return 0

        def offset(self):
            return 0

    def produce(self, topic, *, on_delivery=None, **kwargs):
        if on_delivery is not None:
            on_delivery(None, self.Stored())

    def poll(self, timeout):
        return 0

    def flush(self, timeout=None):
        return 0

    def purge(self, *args, **kwargs):
        pass

    def close(self):
        return True


class UnreachableBrokerProducer(AckingProducer):
    """A producer whose metadata requests wait `wait_s`, then fail: the broker is down."""

    def __init__(self, wait_s: float):
        self.wait_s, self.metadata_requests = wait_s, 0
        self._lock = threading.Lock()

    def list_topics(self, topic=None, timeout=-1):
        with self._lock:
            self.metadata_requests += 1
        time.sleep(self.wait_s)
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))


def test_concurrent_readyz_probes_share_one_broker_check(monkeypatch):
    # was: every /readyz ran its own broker check (up to 2 s with the broker down) on the thread pool that
    # validates notifications, so probes hammering it while the broker was down delayed notifications
    producer = UnreachableBrokerProducer(wait_s=1.0)
    monkeypatch.setattr("confluent_kafka.Producer", lambda config: producer)
    receiver = Receiver(Settings(topic_prefix="t"))

    async def probe() -> tuple[list[int], int, int]:
        async with TestClient(TestServer(receiver.app)) as client:
            async def one() -> int:
                return (await client.get("/readyz")).status
            statuses = list(await asyncio.gather(*(one() for _ in range(8))))
            checks = producer.metadata_requests
            await one()  # a probe after that check finished asks the broker again
            return statuses, checks, producer.metadata_requests

    statuses, checks, after = asyncio.run(probe())
    assert statuses == [503] * 8  # every probe answered: not ready
    assert (checks, after) == (1, 2)


def test_a_sender_stalling_mid_body_gets_408_and_frees_its_place(monkeypatch):
    # was: aiohttp never times out a body, so a sender that sent its headers and part of its body kept
    # its in-flight place for ever; WARDWATCH_RECEIVER_MAX_INFLIGHT of them and every notification got 503
    monkeypatch.setattr("confluent_kafka.Producer", lambda config: AckingProducer())
    receiver = Receiver(Settings(topic_prefix="t", receiver_max_inflight=1, receiver_read_timeout_s=0.5))
    body = fhir_bundle("r4b_status_event")

    async def stall_then_post() -> tuple[bytes, int]:
        async with TestServer(receiver.app) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /fhir/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))  # the rest never comes
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b'"}]}'), 5)  # up to the OperationOutcome's end
            assert await asyncio.wait_for(reader.read(), 2) == b""  # then it hung up, waiting for nothing more
            async with TestClient(server) as client:  # while the stalled sender is still connected
                response = await client.post("/fhir/notifications", data=body, headers=FHIR_JSON)
            writer.close()
            return answer, response.status

    answer, after = asyncio.run(stall_then_post())
    assert answer.split()[1] == b"408" and b"not received within 0.5 s" in answer
    assert b"Connection: close" in answer
    assert after == 200 and receiver.inflight == 0  # the next notification is stored, not throttled


def test_a_body_whose_content_encoding_does_not_decode_is_a_400_not_a_500(monkeypatch):
    # was: aiohttp's RequestPayloadError escaped the handler as a 500, which a FHIR server retries for ever
    producer = RecordingProducer()
    body = fhir_bundle("r4b_status_event")
    corrupt = gzip.compress(body)[:12] + b"\xff" * 40  # a gzip header, then no valid deflate block
    for encoding, sent in (("gzip", body), ("deflate", b"not deflate"), ("gzip", corrupt)):
        response = post_with_producer(monkeypatch, producer, sent, headers=FHIR_JSON | {"Content-Encoding": encoding})
        assert response.status == 400, encoding
        assert response.headers["Content-Type"] == "application/fhir+json"
    assert [topic for topic, _ in producer.written if not topic.endswith(".stats")] == []  # nothing stored
    stored = post_with_producer(monkeypatch, producer, gzip.compress(body),
                                headers=FHIR_JSON | {"Content-Encoding": "gzip"})
    assert stored.status == 200  # a body that decodes is still taken


# --- real HTTP, real broker ----------------------------------------------------------------------


def _receiver_settings(settings, **overrides):
    return settings.model_copy(update={"receiver_port": 0, **overrides})


def _read(settings, topic, expected: int, deadline_s: float = DEADLINE_S):
    """Every message of `topic` from the beginning, once at least `expected` arrived (bounded)."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    seen = []
    try:
        deadline = time.monotonic() + deadline_s
        while len(seen) < expected:
            assert time.monotonic() < deadline, f"only {len(seen)} of {expected} messages on {topic}"
            seen += [m for m in consumer.consume(100, timeout=0.2) if m.error() is None]
        return seen
    finally:
        consumer.close()


@pytest.fixture
def served(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)

    def serve(**overrides):
        receiver = BackgroundReceiver(_receiver_settings(settings, **overrides), topics)
        started.append(receiver)
        return receiver

    started: list[BackgroundReceiver] = []
    yield serve, topics
    for receiver in started:
        receiver.stop()


@pytest.mark.integration
def test_valid_notification_lands_on_the_topic_unchanged_keyed_by_patient(settings, served):
    serve, topics = served
    receiver = serve()
    body = fhir_bundle("r4b_status_event")
    response = httpx.post(f"{receiver.url}/fhir/notifications", content=body, headers=FHIR_JSON, timeout=10)
    assert 200 <= response.status_code < 300
    handshake = httpx.post(f"{receiver.url}/", content=fhir_bundle("r4b_handshake"),
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert handshake.status_code == 200

    landed = {m.key(): m.value() for m in _read(settings, topics.fhir, expected=2)}
    assert landed == {b"MRN-0001": body, SUBSCRIPTION: fhir_bundle("r4b_handshake")}
    assert httpx.get(f"{receiver.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{receiver.url}/readyz", timeout=10).status_code == 200


@pytest.mark.integration
def test_post_notification_reports_where_it_was_stored(settings, served):
    serve, topics = served
    receiver = serve()
    bodies = [fhir_bundle("r4b_status_event"), fhir_bundle("r4b_handshake")]
    with httpx.Client(timeout=10) as client:
        stored = [post_notification(client, f"{receiver.url}/fhir/notifications", b) for b in bodies]
    by_position = {(m.partition(), m.offset()): m.value() for m in _read(settings, topics.fhir, expected=2)}
    assert [by_position[pos] for pos in stored] == bodies
    with httpx.Client(timeout=10) as client:  # refused as invalid: dead-lettered, not stored
        assert post_notification(client, f"{receiver.url}/fhir/notifications", b"{not json") is None
    guarded = serve(receiver_token=SecretStr("s3cret"))  # a sender without the token must be told, loudly
    with httpx.Client(timeout=10) as client, pytest.raises(RuntimeError, match="401"):
        post_notification(client, f"{guarded.url}/fhir/notifications", bodies[0])
    with httpx.Client(timeout=10) as client:
        assert post_notification(client, f"{guarded.url}/fhir/notifications", bodies[0], token="s3cret") is not None


@pytest.mark.integration
def test_bad_json_is_refused_with_an_operation_outcome_and_dead_lettered(settings, served):
    serve, topics = served
    receiver = serve()
    body = raw_file("fhir", "malformed.txt")
    response = httpx.post(f"{receiver.url}/fhir/notifications", content=body, headers=FHIR_JSON, timeout=10)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "malformed_json" in outcome["issue"][0]["diagnostics"]

    (dead,) = _read(settings, topics.deadletter, expected=1)
    headers = {k: v.decode() for k, v in dead.headers()}
    assert dead.value() == body
    assert headers["ww.reason"] == "malformed_json" and headers["ww.stage"] == "receiver"
    assert _read(settings, topics.fhir, expected=0, deadline_s=1) == []


@pytest.mark.integration
def test_wrong_content_type_too_large_and_wrong_token_are_refused(settings, served):
    serve, _ = served
    receiver = serve(receiver_token=SecretStr("s3cret"), receiver_max_bytes=1000)
    url = f"{receiver.url}/fhir/notifications"
    small = fhir_bundle("r4b_handshake")
    assert len(small) < 1000 < len(fhir_bundle("r4b_status_event"))
    auth = {"Authorization": "Bearer s3cret"}

    assert httpx.post(url, content=small, headers=FHIR_JSON, timeout=10).status_code == 401
    assert httpx.post(url, content=small, headers={**FHIR_JSON, "Authorization": "Bearer nope"},
                      timeout=10).status_code == 401
    assert httpx.post(url, content=small, headers={"Content-Type": "text/plain", **auth}, timeout=10).status_code == 415
    assert httpx.post(url, content=fhir_bundle("r4b_status_event"), headers={**FHIR_JSON, **auth},
                      timeout=10).status_code == 413
    # a chunked body has no Content-Length: the limit must hold while reading it
    chunks = iter([fhir_bundle("r4b_status_event")[:600], fhir_bundle("r4b_status_event")[600:]])
    assert httpx.post(url, content=chunks, headers={**FHIR_JSON, **auth}, timeout=10).status_code == 413
    assert httpx.post(url, content=small, headers={**FHIR_JSON, **auth}, timeout=10).status_code == 200


@pytest.mark.integration
def test_unreachable_broker_answers_503_with_retry_after(settings):
    with closed_port() as port:  # no broker there, nor can one start there
        closed = settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}", "receiver_port": 0,
                                             "receiver_ack_timeout_s": 1.0})
        with BackgroundReceiver(closed) as receiver:
            started = time.monotonic()
            response = httpx.post(f"{receiver.url}/fhir/notifications", content=fhir_bundle("r4b_status_event"),
                                  headers=FHIR_JSON, timeout=10)
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
            assert time.monotonic() - started < 5  # bounded by the ack timeout, not hanging
            # a refused body cannot be dead-lettered either: 503 too, so the server retries it
            bad = httpx.post(f"{receiver.url}/fhir/notifications", content=b"{", headers=FHIR_JSON, timeout=10)
            assert bad.status_code == 503
            assert httpx.get(f"{receiver.url}/readyz", timeout=10).status_code == 503
            assert httpx.get(f"{receiver.url}/healthz", timeout=5).status_code == 200


@pytest.mark.integration
def test_a_stopped_receiver_stops_reconnecting_to_an_unreachable_broker(settings, capfd):
    # its producer lived on after stop(), retrying the broker and printing librdkafka's connection errors
    # to stderr for as long as anything referenced the receiver (the next test's output, in this suite)
    with closed_port() as port:
        closed = settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}", "receiver_port": 0,
                                             "receiver_ack_timeout_s": 1.0})
        receiver = BackgroundReceiver(closed)
        assert httpx.get(f"{receiver.url}/readyz", timeout=10).status_code == 503
        receiver.stop()
        capfd.readouterr()
        time.sleep(2)
        assert "%3|" not in capfd.readouterr().err
        assert receiver.receiver is not None  # still referenced: the producer is closed, not collected


@pytest.mark.integration
def test_requests_beyond_the_in_flight_bound_get_503(settings):
    with closed_port() as port:  # no broker there, nor can one start there
        closed = settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}", "receiver_port": 0,
                                             "receiver_ack_timeout_s": 3.0, "receiver_max_inflight": 1})
        with BackgroundReceiver(closed) as receiver:
            url = f"{receiver.url}/fhir/notifications"
            first: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: first.append(
                httpx.post(url, content=fhir_bundle("r4b_handshake"), headers=FHIR_JSON, timeout=10)))
            waiting.start()
            deadline = time.monotonic() + 5
            while receiver.receiver.inflight < 1:  # the first request waits for an ack that never comes
                assert time.monotonic() < deadline, "first request never got in flight"
                time.sleep(0.01)
            second = httpx.post(url, content=fhir_bundle("r4b_handshake"), headers=FHIR_JSON, timeout=10)
            assert second.status_code == 503 and "Retry-After" in second.headers
            assert "in flight" in orjson.loads(second.content)["issue"][0]["diagnostics"]
            waiting.join(10)
            assert first[0].status_code == 503  # and the first one times out on the missing broker


@pytest.mark.integration
def test_wardwatch_receiver_serves_until_sigterm_and_publishes_its_counters(settings, tmp_path):
    service_settings = settings.model_copy(update={"receiver_port": 0, "stats_interval_s": 0.5})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    proc, port = start_http_service(["receiver"], service_settings, tmp_path / "receiver.log")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + DEADLINE_S
        while True:  # its port is bound; the app may still be starting
            assert proc.poll() is None, (tmp_path / "receiver.log").read_text()
            assert time.monotonic() < deadline, "receiver never answered /healthz"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        ok = httpx.post(f"{url}/fhir/notifications", content=fhir_bundle("r4b_status_event"), headers=FHIR_JSON,
                        timeout=10)
        bad = httpx.post(f"{url}/fhir/notifications", content=b"[]", headers=FHIR_JSON, timeout=10)
        assert (ok.status_code, bad.status_code) == (200, 400)
    finally:
        assert stop_service(proc) == 0, (tmp_path / "receiver.log").read_text()[-2000:]

    summary = summarize(read_stats(settings, topics, timeout_s=30))  # the final snapshot, sent at shutdown
    counters = summary["services"]["receiver"]["counters"]
    assert counters["responses"] == {"200": 1, "400": 1}
    assert counters["accepted"] == {"event": 1} and counters["dead_lettered"] == {"invalid_structure": 1}


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.TransportError:
        return 0


def _wait_for_status(url: str, status: int, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while (got := _status(url)) != status:
        assert time.monotonic() < deadline, f"{url} still answers {got}, not {status}"
        time.sleep(0.2)


@pytest.mark.integration
def test_the_metrics_ports_readyz_follows_the_broker(settings, tmp_path):
    """An orchestrator probes /readyz on WARDWATCH_METRICS_PORT: while the broker cannot take the
    receiver's writes it must say 503 there too (it answered 200 whatever the broker did)."""
    with EmbeddedBroker.start(log_path=tmp_path / "broker.log") as broker:
        metrics_port = free_port()
        service_settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap, "receiver_port": 0,
                                                       "metrics_port": metrics_port})
        proc, _port = start_http_service(["receiver"], service_settings, tmp_path / "receiver.log")
        ready = f"http://127.0.0.1:{metrics_port}/readyz"
        try:
            _wait_for_status(ready, 200)
            broker.pause()  # SIGSTOP: the broker answers nothing
            try:
                _wait_for_status(ready, 503)
            finally:
                broker.resume()
            _wait_for_status(ready, 200)
        finally:
            assert stop_service(proc) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
