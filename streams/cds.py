"""`wardwatch cds`: a CDS Hooks service that answers `patient-view` with the patient's latest risk.

    GET  /cds-services                            discovery: service `wardwatch-deterioration`,
                                                  hook patient-view, no prefetch
    POST /cds-services/wardwatch-deterioration    CDS Hooks request -> {"cards": [card]} or {"cards": []}
    GET  /healthz                                 {"patients": n, "records_read": n, "records_skipped": n}

Request: `context.patientId` is the FHIR Patient id (a "Patient/<id>" reference is accepted too).
wardwatch keys patients the way the ingest does (schemas/fhir.py): by the MRN when the source
gives one, else by the Patient id. A request may carry the Patient resource as `prefetch.patient`;
then its MRN (identifier typed MR, else the only identifier) is tried first, then the id.
Answers `{"cards": []}` for a patient wardwatch has not scored, 400 (with a JSON `error` saying
what to fix) for a malformed request.

Card: summary (< 140 chars, no identifiers: the tier and the probability or NEWS2, and "preliminary
results" when a reading the score rests on is a preliminary result), indicator by tier (high
critical, medium warning, low/none info), source.label "wardwatch", detail (markdown: the top
contributing features, the scoring time, the model version or NEWS2 rule, and which parameters were
preliminary: the score record's `preliminary_basis` codes, never their values).

State: the latest score record per patient (the greatest scoring_ms; a tie goes to the later
record), so memory grows with the number of patients, never with the number of scores. It is fed
by a consumer of the scores topic that starts at the beginning of every partition and commits
nothing. Kafka is the durable store: after a restart the service rebuilds the same table by
re-reading the topic (the topic's retention bounds how far back a patient's latest score can
be); while it catches up, a patient may still answer `{"cards": []}`. Shadow scores (scores.shadow)
are never served. Logs never carry patient ids or values.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from schemas.codes import parameter_name
from wardwatch.listen import run_http
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

SERVICE_ID = "wardwatch-deterioration"
HOOK = "patient-view"
SOURCE_LABEL = "wardwatch"
SUMMARY_MAX = 139  # CDS Hooks: summary SHOULD be < 140 characters
INDICATOR = {"high": "critical", "medium": "warning", "low": "info", "none": "info"}
# card uuids are deterministic per score record (a stable card across re-reads of the topic)
CARD_NAMESPACE = uuid.UUID("0c7a3d52-2f0e-5b7a-9d0e-6f2b1a4c8e31")

DISCOVERY = {"services": [{
    "id": SERVICE_ID,
    "hook": HOOK,
    "title": "wardwatch deterioration risk",
    "description": "The latest wardwatch risk of clinical deterioration for the patient in view "
                   "(model probability or NEWS2), with its top contributing features.",
    "prefetch": {},
}]}


class BadRequest(ValueError):
    """The CDS Hooks request cannot be answered as sent; the message says what to fix."""


# --- pure: request -> patient keys, score record -> card --------------------------------------------------


def patient_keys(request: Any) -> list[str]:
    """The wardwatch patient keys to try for a CDS Hooks request, best first."""
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object (a CDS Hooks request)")
    if request.get("hook", HOOK) != HOOK:
        raise BadRequest(f"this service answers the {HOOK!r} hook, not {request.get('hook')!r}")
    ctx = request.get("context")
    if not isinstance(ctx, dict):
        raise BadRequest("the request has no `context` object")
    raw = ctx.get("patientId")
    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest("`context.patientId` must be a non-empty string (the FHIR Patient id)")
    patient_id = raw.strip()
    if patient_id.startswith("Patient/"):
        patient_id = patient_id.removeprefix("Patient/").split("/")[0]
    keys = []
    mrn = _mrn((request.get("prefetch") or {}).get("patient") if isinstance(request.get("prefetch"), dict) else None)
    if mrn:
        keys.append(mrn)
    if patient_id not in keys:
        keys.append(patient_id)
    return keys


def _mrn(patient: Any) -> str | None:
    if not isinstance(patient, dict):  # CDS Hooks sends null for a prefetch the client could not fetch
        return None
    raw = patient.get("identifier") or []
    if not isinstance(raw, list):
        raise BadRequest("`prefetch.patient.identifier` must be an array (a FHIR Patient)")
    identifiers = [i for i in raw if isinstance(i, dict) and isinstance(i.get("value"), str)]
    typed = [i for i in identifiers if "MR" in _type_codes(i)]
    chosen = typed or (identifiers if len(identifiers) == 1 else [])
    return chosen[0]["value"].strip() or None if chosen else None


def _type_codes(identifier: dict) -> list[Any]:
    type_ = identifier.get("type") or {}
    coding = (type_.get("coding") or []) if isinstance(type_, dict) else None
    if not isinstance(coding, list):
        raise BadRequest("`prefetch.patient.identifier[].type` must be a CodeableConcept with a `coding` array")
    return [c.get("code") for c in coding if isinstance(c, dict)]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def card(record: dict) -> dict:
    """One card for a score record (see the module docstring)."""
    tier = record.get("tier") if record.get("tier") in INDICATOR else "none"
    probability, news2 = record.get("probability"), record.get("news2")
    if record.get("path") == "model" and probability is not None:
        measure = f"probability {probability:.2f}"
        method = f"model {record.get('model_version')}"
    else:
        measure = f"NEWS2 {news2}" if news2 is not None else "NEWS2 unavailable (missing vital signs)"
        method = "NEWS2 rule"
    preliminary = record.get("preliminary_basis") or []  # (absent from records written before it existed)
    if not isinstance(preliminary, list) or not all(isinstance(code, str) for code in preliminary):
        raise TypeError("preliminary_basis is not a list of codes")
    flag = "; based on preliminary results" if preliminary else ""
    summary = f"Deterioration risk {tier.upper()} ({measure}){flag}"[:SUMMARY_MAX]
    lines = [f"Scored at {_iso(record['scoring_ms'])} by {method}."]
    if preliminary:
        lines.append("")
        lines.append(f"Based on preliminary results, which may change when final: "
                     f"{', '.join(parameter_name(code) for code in preliminary)}.")
    reasons = record.get("rationale") or []
    if reasons:
        lines.append("")
        lines.append("Top contributing features:")
        lines += [f"- {r['feature']} = {float(r['value']):g} (contribution {float(r['contribution']):+.2f})"
                  for r in reasons]
    missing = record.get("missing") or []
    if missing:
        lines.append("")
        lines.append(f"Not measured recently: {', '.join(missing)}.")
    return {
        "uuid": str(uuid.uuid5(CARD_NAMESPACE, f"{record.get('snapshot_id')}|{record['scoring_ms']}")),
        "summary": summary,
        "indicator": INDICATOR[tier],
        "detail": "\n".join(lines),
        "source": {"label": SOURCE_LABEL},
    }


@dataclass
class LatestScores:
    """The latest score record per patient. update() runs on the feed thread, get() on the web loop:
    dict operations on one key are atomic under the GIL and records are never mutated."""

    by_patient: dict[str, dict]
    cards: dict[str, dict] = field(default_factory=dict)  # each patient's card, built once as its record arrives
    records_read: int = 0
    records_skipped: int = 0

    @classmethod
    def empty(cls) -> LatestScores:
        return cls({})

    def update(self, value: bytes | None) -> bool:
        """Take one scores-topic value; True when it is now the patient's latest."""
        try:
            record = orjson.loads(value) if value else None
            patient, scoring_ms = record["patient_id"], int(record["scoring_ms"])
            if not isinstance(patient, str):
                raise TypeError("patient_id is not a string")
            record = record | {"scoring_ms": scoring_ms}  # kept converted: the next update compares it
            built = card(record)  # a record that cannot make a card is skipped here, not a 500 when asked for
        except (TypeError, KeyError, ValueError, OverflowError, OSError):  # JSONDecodeError is a ValueError
            self.records_skipped += 1  # our own topic: a bug upstream, counted (never a patient value in logs)
            return False
        self.records_read += 1
        held = self.by_patient.get(patient)
        if held is not None and held["scoring_ms"] > scoring_ms:
            return False
        self.cards[patient] = built  # (before the record: a reader that finds the record finds its card)
        self.by_patient[patient] = record
        return True

    def get(self, keys: list[str]) -> dict | None:
        return next((self.by_patient[k] for k in keys if k in self.by_patient), None)

    def card_for(self, keys: list[str]) -> dict | None:
        return next((self.cards[k] for k in keys if k in self.by_patient), None)


# --- wiring: HTTP and the Kafka feed ---------------------------------------------------------------------


def make_app(latest: LatestScores) -> web.Application:
    async def discovery(_request: web.Request) -> web.Response:
        return web.json_response(DISCOVERY)

    async def service(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "the request body is not JSON: send a CDS Hooks request"}, status=400)
        try:
            keys = patient_keys(body)
        except BadRequest as e:
            return web.json_response({"error": str(e)}, status=400)
        found = latest.card_for(keys)
        return web.json_response({"cards": [found] if found else []})

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"patients": len(latest.by_patient), "records_read": latest.records_read,
                                  "records_skipped": latest.records_skipped})

    app = web.Application()
    app.router.add_get("/cds-services", discovery)
    app.router.add_post(f"/cds-services/{SERVICE_ID}", service)
    app.router.add_get("/healthz", health)
    return app


class ScoresFeed(threading.Thread):
    """Reads the scores topic from the beginning into `latest`, until stop is set."""

    def __init__(self, settings: Settings, topic: str, latest: LatestScores):
        super().__init__(name="cds-scores-feed", daemon=True)
        self.settings, self.topic, self.latest = settings, topic, latest
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({
            **self.settings.kafka_client_config(),
            # assign(), not subscribe(): no group membership, nothing committed; every start re-reads
            "group.id": f"{self.settings.group_prefix}-cds-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,  # Tansu answers a fetch only when this wait expires
        })
        try:
            partitions = consumer.list_topics(self.topic, timeout=30).topics[self.topic].partitions
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            while not self.stop_event.is_set():
                for message in consumer.consume(num_messages=500, timeout=0.2):
                    if message.error():
                        log.warning("scores feed: %s", message.error())
                        continue
                    self.latest.update(message.value())
        except Exception as e:  # infrastructure: stop the service rather than serve stale risk
            self.error = e
            log.error("scores feed stopped (%s: %s); stopping the CDS service", type(e).__name__, e)
            os.kill(os.getpid(), signal.SIGTERM)  # run_app turns it into a clean shutdown
        finally:
            consumer.close()


def run_cds(settings: Settings) -> None:
    """Blocking: serve CDS Hooks on settings.cds_host:cds_port until SIGINT/SIGTERM (cds_port 0: any
    free port, logged once bound: wardwatch/listen.py)."""
    from streams.topics import ensure_topics, topics_for

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    latest = LatestScores.empty()
    feed = ScoresFeed(settings, topics.scores, latest)
    feed.start()
    app = make_app(latest)

    async def stop_feed(_app: web.Application) -> None:
        feed.stop_event.set()

    app.on_cleanup.append(stop_feed)
    run_http(app, settings.cds_host, settings.cds_port, log=log, what="CDS Hooks service",
             after=f"/cds-services (scores from {topics.scores})")
    feed.join(timeout=10)
    if feed.error is not None:
        raise SystemExit(f"the CDS service stopped because it could not read {topics.scores}: {feed.error}; "
                         "check that the broker at WARDWATCH_BOOTSTRAP_SERVERS is reachable")
