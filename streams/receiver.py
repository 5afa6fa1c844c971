"""The rest-hook receiver: FHIR server -> HTTP POST -> the notifications topic, acknowledged end to end.

    FHIR server (rest-hook channel)
        |  POST /fhir/notifications  (or POST /)   body: one notification Bundle
        |  checks, in order: in-flight bound (503), bearer token (401), content type (415),
        |  body size (413), the whole body within settings.receiver_read_timeout_s (408), a body that
        |  decodes (400: a corrupt gzip/deflate Content-Encoding or chunked framing; nothing to dead-letter),
        |  a notification Bundle schemas.fhir accepts (400 + dead letter)
        v
    <prefix>.fhir.notifications   key: patient id of the events (else the subscription)
                                  value: the POSTed bytes, unchanged (decoded if sent gzip/deflate)
        |  2xx only once the broker acknowledged the write; no ack within
        |  settings.receiver_ack_timeout_s, or a failed write -> 503 + Retry-After: the server retries
        v
    the ingest worker parses it again (the topic is the source of truth; the receiver only gatekeeps)

What is refused (400) and why:
- Not JSON, not a Bundle, no status entry, an invalid resource, an implausible value, ...: whatever
  `parse_notification` rejects, except the payloads it can only reject for lack of a fetch
  (`id-only`, `empty`, a DELETE entry whose version before the delete must be read; reason
  no_fhir_server): those are valid notifications, so they are forwarded and the ingest worker
  fetches or dead-letters them.
- A refused body is written to the dead-letter topic (stage "receiver", the parser's reason, the
  original bytes) *before* the 400 is answered; if that write fails the answer is 503, so the body is
  never lost silently. Its headers have no source topic/offset: it never was on a topic.

GET /healthz answers 200 while the process serves; GET /readyz answers 200 only when the producer
reaches the broker and the notifications topic exists (probes arriving while that check runs, up to 2 s
with the broker down, share its answer: they never take more than one of the validation threads). `wardwatch receiver` answers the /readyz of its
metrics port (WARDWATCH_METRICS_PORT, what an orchestrator probes) the same way.

Keying: a notification's events are normally of one patient; with several, the first event's
patient is the key (the ingest worker re-keys every event by its own patient). Handshakes,
heartbeats and notifications without events are keyed by the subscription.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from confluent_kafka import KafkaError, KafkaException

from schemas.deadletter import Reason, Rejection, Stage
from schemas.fhir import parse_notification, parse_status
from schemas.ingest_outcome import Control, Ignored, Outcome, Parsed, Rejected
from streams.commits import kafka_error
from streams.stats import StatsPublisher
from streams.topics import Topics, topics_for
from wardwatch.listen import is_loopback, run_http
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPES = ("application/fhir+json", "application/json")
NOTIFICATION_PATHS = ("/fhir/notifications", "/")
RETRY_AFTER_S = "5"
# parser rejections that only mean "the resources must be fetched": the notification itself is fine
NEEDS_FETCH = {Reason.NO_FHIR_SERVER}


# --- decisions (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    key: bytes | None
    kind: str  # "event" | control type | "ignored" | "needs_fetch": what was accepted, for the counters


@dataclass(frozen=True, slots=True)
class Refuse:
    rejection: Rejection


def classify(body: bytes, fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None) -> Accept | Refuse:
    """Accept a notification (with its Kafka key) or refuse it with the parser's reason; the patient keys
    as the ingest worker reads them (settings.fhir_patient_ids_are_mrns, settings.mrn_system)."""
    return decide(body, parse_notification(body, topic="receiver", partition=-1, offset=-1,
                                           fhir_patient_ids_are_mrns=fhir_patient_ids_are_mrns, mrn_system=mrn_system))


def decide(body: bytes, outcome: Outcome) -> Accept | Refuse:
    match outcome:
        case Parsed(events=events):
            return Accept(events[0].patient_id.encode() if events else _subscription_key(body), "event")
        case Control(kind=kind, detail=detail):
            return Accept(_encode(detail.get("subscription")), kind)
        case Ignored(detail=detail):
            return Accept(_encode(detail.get("subscription")), "ignored")
        case Rejected(rejection=rejection) if rejection.reason in NEEDS_FETCH:
            return Accept(_subscription_key(body), "needs_fetch")
        case Rejected(rejection=rejection):
            return Refuse(rejection)
    return Accept(_subscription_key(body), "other")  # an outcome added later: forward, ingest decides


def _subscription_key(body: bytes) -> bytes | None:
    try:
        bundle = orjson.loads(body)
        return _encode(parse_status(bundle["entry"][0]["resource"], bundle.get("type")).subscription)
    except Exception:  # the key is best effort; the parser already accepted the body
        return None


def _encode(text: Any) -> bytes | None:
    return text.encode() if isinstance(text, str) and text else None


def open_receiver_refusal(settings: Settings) -> str | None:
    """One line saying what to set when the receiver would take anyone's notifications from beyond this
    host (no token on a non-loopback address, not allowed by the operator); None when it may start.
    A notification is clinical input: an unauthenticated one could add readings to any patient."""
    if settings.receiver_token is not None or is_loopback(settings.receiver_host) or settings.receiver_allow_anonymous:
        return None
    return (f"WARDWATCH_RECEIVER_HOST={settings.receiver_host} without WARDWATCH_RECEIVER_TOKEN would store "
            "notifications (vital signs, lab results) from anyone who reaches the port: set "
            "WARDWATCH_RECEIVER_TOKEN (subscription-init gives it to the FHIR server), or "
            "WARDWATCH_RECEIVER_ALLOW_ANONYMOUS=true to accept that")


def content_type_ok(content_type: str) -> bool:
    return content_type.lower() in CONTENT_TYPES


def token_ok(authorization: str | None, expected: str | None) -> bool:
    """No token configured: anyone may post. Else `Authorization: Bearer <token>`, compared in constant time."""
    if expected is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    # aiohttp keeps header bytes that are not UTF-8 as surrogates: turn them back into those bytes
    given_bytes = given.strip().encode("utf-8", errors="surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, expected.encode())


def operation_outcome(severity: str, code: str, diagnostics: str) -> bytes:
    """The FHIR answer body: says what is wrong (never patient values: details come from the parser)."""
    return orjson.dumps({"resourceType": "OperationOutcome",
                         "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]})


def receiver_deadletter_headers(rejection: Rejection, path: str) -> list[tuple[str, bytes]]:
    """The dead-letter headers of schemas.deadletter, without a source position: the body came over HTTP."""
    return [
        ("ww.reason", rejection.reason.value.encode()),
        ("ww.detail", rejection.detail.encode()[:1000]),
        ("ww.exception", (rejection.exception or "").encode()),
        ("ww.stage", Stage.RECEIVER.value.encode()),
        ("ww.source.http", f"POST {path}".encode()),
    ]


# --- the service ---------------------------------------------------------------------------------


class BrokerUnavailable(Exception):
    """The broker could not take the write now: 503, the FHIR server retries."""


class Unstorable(Exception):
    """The broker can never take this write (larger than its message limit): 413, do not retry."""


class Receiver:
    """The aiohttp application plus its producer (with a poll thread serving delivery callbacks)."""

    def __init__(self, settings: Settings, topics: Topics | None = None):
        from confluent_kafka import Producer

        self.settings = settings
        self.topics = topics or topics_for(settings)
        self.counters = ReceiverCounters()
        self._token = settings.receiver_token.get_secret_value() if settings.receiver_token else None
        self._inflight = 0
        if settings.receiver_max_bytes > settings.max_message_bytes - 64 * 1024:
            raise ValueError(f"WARDWATCH_RECEIVER_MAX_BYTES ({settings.receiver_max_bytes}) must stay below "
                             f"WARDWATCH_MAX_MESSAGE_BYTES ({settings.max_message_bytes}) minus 64 KiB: a "
                             "notification the receiver accepts must fit on the topic")
        ack_timeout_ms = max(1, int(settings.receiver_ack_timeout_s * 1000))
        self._producer = Producer({
            **settings.kafka_client_config("receiver"),
            "acks": "all",
            "linger.ms": 2,
            "partitioner": "murmur2_random",  # Java-compatible: the same partition as the other writers of the key
            "message.max.bytes": settings.max_message_bytes,  # >= receiver_max_bytes (checked at start)
            "message.timeout.ms": ack_timeout_ms,  # give up (and let the server retry) when we do
            "socket.connection.setup.timeout.ms": min(ack_timeout_ms, 10_000),
        })
        self._stats = StatsPublisher("receiver", self.counters.snapshot, self._producer, self.topics.stats,
                                     interval_s=settings.stats_interval_s)
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._stats_task: asyncio.Task | None = None
        self._readiness_check: asyncio.Future | None = None  # the broker check /readyz probes share
        self.app = web.Application(client_max_size=settings.receiver_max_bytes)
        for path in NOTIFICATION_PATHS:
            self.app.router.add_post(path, self.handle_notification)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    @property
    def inflight(self) -> int:
        """Notification requests being handled right now."""
        return self._inflight

    # --- lifecycle -----------------------------------------------------------------------------

    async def _start(self, _app: web.Application) -> None:
        self._poller = threading.Thread(target=self._poll_loop, name="receiver-producer-poll", daemon=True)
        self._poller.start()
        self._stats_task = asyncio.create_task(self._publish_stats())

    async def _stop(self, _app: web.Application) -> None:
        if self._stats_task:
            self._stats_task.cancel()
        self._stats.publish(final=True)  # the final counts
        await asyncio.to_thread(self._producer.flush, 5)
        self._stop_polling.set()
        if self._poller:
            self._poller.join(5)
        # a stopped receiver holds no Kafka client: it would go on reconnecting (and logging each failure)
        # for as long as the object lives. What the broker has not acknowledged by now was never answered
        # 2xx: the FHIR server sends it again
        self._producer.purge()
        self._producer.close()

    def _poll_loop(self) -> None:
        while not self._stop_polling.is_set():
            self._producer.poll(0.05)  # runs delivery callbacks, which resolve the waiting requests

    async def _publish_stats(self) -> None:
        while True:
            self._stats.maybe_publish()
            await asyncio.sleep(self.settings.stats_interval_s)  # a publishing period, not a synchronisation

    # --- handlers ------------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        if await self._broker_check():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "broker unreachable or notifications topic missing"}, status=503)

    async def _broker_check(self) -> bool:
        """broker_reachable on a worker thread, one at a time: probes arriving while a check runs wait for
        its answer instead of starting their own. The check takes up to 2 s with the broker down, on the
        thread pool that validates notifications: N probes at once must cost one thread, not N."""
        if self._readiness_check is None or self._readiness_check.done():
            self._readiness_check = asyncio.ensure_future(asyncio.to_thread(self.broker_reachable))
        # shielded: a prober hanging up must not cancel the check the others wait for
        return await asyncio.shield(self._readiness_check)

    def broker_reachable(self) -> bool:
        try:
            md = self._producer.list_topics(self.topics.fhir, timeout=2)
        except Exception:  # KafkaException: no broker answered
            return False
        topic = md.topics.get(self.topics.fhir)
        return topic is not None and topic.error is None and bool(topic.partitions)

    async def handle_notification(self, request: web.Request) -> web.Response:
        if self._inflight >= self.settings.receiver_max_inflight:
            return self._answer(503, "throttled", "too many notifications in flight; retry later", retry=True)
        self._inflight += 1
        try:
            return await self._handle(request)
        finally:
            self._inflight -= 1

    async def _handle(self, request: web.Request) -> web.Response:
        if not token_ok(request.headers.get("Authorization"), self._token):
            return self._answer(401, "login", "missing or wrong bearer token",
                                headers={"WWW-Authenticate": 'Bearer realm="wardwatch"'})
        if not content_type_ok(request.content_type):
            return self._answer(415, "not-supported", "send the Bundle as application/fhir+json or application/json")
        max_bytes = self.settings.receiver_max_bytes
        if request.content_length is not None and request.content_length > max_bytes:
            return self._answer(413, "too-costly", f"notification larger than {max_bytes} bytes")
        read_timeout_s = self.settings.receiver_read_timeout_s
        try:
            # bounded: aiohttp never times out a body, so a sender stalling mid-body would keep its
            # in-flight place for ever, and max_inflight of them would refuse every notification (503)
            body = await asyncio.wait_for(request.read(), read_timeout_s)
        except web.HTTPRequestEntityTooLarge:  # chunked bodies have no Content-Length to check first
            return self._answer(413, "too-costly", f"notification larger than {max_bytes} bytes")
        except web.RequestPayloadError:
            # a body that cannot be decoded (a corrupt gzip/deflate Content-Encoding, broken chunked framing) is
            # the sender's to fix: a 5xx would have the FHIR server retry it for ever. No bytes to dead-letter
            response = self._answer(400, "invalid", "notification body cannot be read (corrupt Content-Encoding "
                                    "or chunked framing)")
            response.force_close()
            return response
        except asyncio.TimeoutError:
            response = self._answer(408, "timeout", f"notification body not received within {read_timeout_s:g} s")
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            # hang up now: aiohttp would otherwise keep reading the rest of the body for 10 s more
            request.protocol.force_close()
            return response

        # FHIR validation is CPU work: keep the loop free
        decision = await asyncio.to_thread(classify, body, self.settings.fhir_patient_ids_are_mrns,
                                           self.settings.mrn_system)
        try:
            if isinstance(decision, Refuse):
                await self._write(self.topics.deadletter, None, body,
                                  receiver_deadletter_headers(decision.rejection, request.path))
                self.counters.dead_lettered(decision.rejection.reason.value)
                r = decision.rejection
                return self._answer(400, "invalid", f"{r.reason.value}: {r.detail}")
            partition, offset = await self._write(self.topics.fhir, decision.key, body, [])
        except BrokerUnavailable as exc:
            return self._answer(503, "transient", f"notification not stored: {exc}; retry later", retry=True)
        except Unstorable as exc:
            return self._answer(413, "too-costly", f"notification cannot be stored: {exc}")
        self.counters.accepted(decision.kind)
        # where it was stored, so a sender can trace it (and the demo can wait for ingest to pass it)
        return self._answer(200, "informational", "notification stored", severity="information",
                            headers={STORED_HEADER: f"{partition}:{offset}"})

    async def _write(self, topic: str, key: bytes | None, value: bytes, headers: list) -> tuple[int, int]:
        """Produce and wait for the broker's acknowledgement (or raise BrokerUnavailable).
        Returns the (partition, offset) the broker stored it at."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future = loop.create_future()
        stored: list[tuple[int, int]] = []

        def on_delivery(err, msg) -> None:  # runs on the poll thread
            if err is None:
                stored.append((msg.partition(), msg.offset()))
            loop.call_soon_threadsafe(_settle, acked, err)

        try:
            self._producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
        except BufferError as exc:
            raise BrokerUnavailable("producer queue full") from exc
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:  # a retry can never store it
                raise Unstorable(error.name()) from exc
            # anything else (e.g. _UNKNOWN_TOPIC while a topic is missing) may pass: the server retries
            name = error.name() if error is not None else "unknown error"
            raise BrokerUnavailable(f"producer refused the write ({name})") from exc
        try:
            err = await asyncio.wait_for(acked, self.settings.receiver_ack_timeout_s)
        except asyncio.TimeoutError as exc:
            raise BrokerUnavailable(f"no broker acknowledgement within {self.settings.receiver_ack_timeout_s}s") from exc
        if err is not None:
            raise BrokerUnavailable(f"broker refused the write ({err.name()})")
        return stored[0]

    def _answer(self, status: int, code: str, diagnostics: str, *, severity: str = "error", retry: bool = False,
                headers: dict[str, str] | None = None) -> web.Response:
        self.counters.responded(status)
        headers = dict(headers or {})
        if retry:
            headers["Retry-After"] = RETRY_AFTER_S
        return web.Response(status=status, body=operation_outcome(severity, code, diagnostics),
                            content_type="application/fhir+json", headers=headers)


STORED_HEADER = "X-Wardwatch-Stored"  # "<partition>:<offset>" of the notifications topic


def post_notification(client, url: str, body: bytes, *, token: str | None = None, deadline_s: float = 60.0
                      ) -> tuple[int, int] | None:
    """POST one notification as a FHIR server's rest-hook does, retrying 503 (Retry-After) until
    stored; returns the (partition, offset) it was stored at, or None when the receiver refused it
    as invalid (400: it is on the dead-letter topic). Raises on any other answer (a wrong token,
    size or content type is the sender's configuration to fix) or when the deadline passes.
    `client` is an httpx.Client."""
    headers = {"Content-Type": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    give_up = time.monotonic() + deadline_s
    while True:
        response = client.post(url, content=body, headers=headers)
        if response.status_code == 200:
            partition, offset = response.headers[STORED_HEADER].split(":")
            return int(partition), int(offset)
        if response.status_code == 400:
            return None
        if response.status_code != 503 or time.monotonic() >= give_up:
            raise RuntimeError(f"receiver answered {response.status_code}: {response.text[:300]}")
        time.sleep(min(float(response.headers.get("Retry-After", 1)), max(0.0, give_up - time.monotonic())))


def _settle(future: asyncio.Future, err) -> None:
    if not future.done():  # the request may have timed out already
        future.set_result(err)


class ReceiverCounters:
    """Responses by status, accepted notifications by kind, dead letters by reason (event-loop thread only)."""

    def __init__(self) -> None:
        self.responses: Counter = Counter()
        self.accepted_kinds: Counter = Counter()
        self.dead_letter_reasons: Counter = Counter()

    def responded(self, status: int) -> None:
        self.responses[str(status)] += 1

    def accepted(self, kind: str) -> None:
        self.accepted_kinds[kind] += 1

    def dead_lettered(self, reason: str) -> None:
        self.dead_letter_reasons[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"responses": dict(self.responses), "accepted": dict(self.accepted_kinds),
                "dead_lettered": dict(self.dead_letter_reasons)}


# --- entry points --------------------------------------------------------------------------------


def run_receiver(settings: Settings) -> None:
    """CLI entry point: serve until SIGINT/SIGTERM (aiohttp handles the signals and cleans up).
    receiver_port 0: any free port, logged once bound (wardwatch/listen.py)."""
    from streams.topics import ensure_topics
    from wardwatch import observability

    refusal = open_receiver_refusal(settings)
    if refusal:
        raise ValueError(refusal)
    if settings.receiver_token is not None:
        log.info("receiver authentication: bearer token required on every notification")
    elif is_loopback(settings.receiver_host):
        log.info("receiver authentication: off, notifications accepted without a token (loopback address only); "
                 "set WARDWATCH_RECEIVER_TOKEN to require one")
    else:
        log.warning("receiver authentication: off, notifications accepted without a token from anyone who reaches "
                    "the port (WARDWATCH_RECEIVER_ALLOW_ANONYMOUS=true); set WARDWATCH_RECEIVER_TOKEN to require one")
    receiver = Receiver(settings)
    # the metrics port's /readyz (what an orchestrator probes) answers as the receiver's own
    observability.set_readiness(receiver.broker_reachable)
    try:
        ensure_topics(settings, receiver.topics, timeout_s=10)
    except Exception as exc:  # serve anyway: /readyz says 503 until the broker and topics are there
        log.warning("could not check/create the topics (%s); /readyz answers 503 until they exist", exc)
    # (no access log: it would carry nothing useful and cost a line per notification)
    run_http(receiver.app, settings.receiver_host, settings.receiver_port, log=log, what="rest-hook receiver",
             after=f"{NOTIFICATION_PATHS[0]} -> {receiver.topics.fhir}")


class BackgroundReceiver:
    """The receiver served on its own event loop in a thread (tests, the demo): `.url`, then `.stop()`."""

    def __init__(self, settings: Settings, topics: Topics | None = None, *, timeout_s: float = 10.0):
        self.receiver = Receiver(settings, topics)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.receiver.app, access_log=None)
        self._thread = threading.Thread(target=self._loop.run_forever, name="receiver", daemon=True)
        self._thread.start()
        self.port = self._call(self._serve(settings.receiver_host, settings.receiver_port), timeout_s)
        self.url = f"http://{settings.receiver_host}:{self.port}"

    async def _serve(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return self._runner.addresses[0][1]  # the bound port (port 0 picks a free one)

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        try:
            self._call(self._runner.cleanup(), timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            self._loop.close()

    def __enter__(self) -> "BackgroundReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
