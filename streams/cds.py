"""`wardwatch cds`: a CDS Hooks service that answers `patient-view` with the patient's latest risk.

    GET  /cds-services                            discovery: service `wardwatch-deterioration`,
                                                  hook patient-view, prefetch patient: Patient/{{context.patientId}}
    POST /cds-services/wardwatch-deterioration    CDS Hooks request -> {"cards": [card]} or {"cards": []};
                                                  412 when the patient's MRN cannot be known
    GET  /healthz                                 {"patients": n, "records_read": n, "records_skipped": n,
                                                   "caught_up": bool}
    GET  /readyz                                  200 once the scores topic is read up to its end at start, else 503

Request: `context.patientId` is the FHIR Patient id (a "Patient/<id>" reference is accepted too).
wardwatch keys patients by the EHR's MRN (the CDC rows' patient_id; schemas/fhir.py reads FHIR subjects
to it), never by a FHIR server's own Patient id, which may equal another patient's MRN: a card for it
would be another patient's risk. So the key is the MRN of the Patient the EHR prefetches
(`prefetch.patient`, which discovery asks for as `Patient/{{context.patientId}}`: the identifier typed
MR, and of WARDWATCH_MRN_SYSTEM when that is set, as the ingest reads it); the bare `context.patientId` is tried after it only with
WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS=true (a facade whose Patient.id is the EHR's key). A prefetched
Patient of another id than context.patientId (or without an id) is a 400, as is a call whose
`fhirAuthorization.patient` (CDS Hooks: the FHIR id of the patient a patient/ scoped token is restricted to) is
not a FHIR id or not context.patientId: the call names two patients, so it gets no card and makes no FHIR
request, and neither id is echoed or logged. Without a usable prefetch (absent, null, an
OperationOutcome, no MRN) and without that setting the answer is 412 Precondition Failed (CDS Hooks:
"unable to retrieve the necessary FHIR data ... either through a prefetch request or directly calling the
FHIR server"), with a JSON `error` saying what to configure and no id: never `{"cards": []}`, which would
read as "no risk", as during catch-up below. Answers `{"cards": []}` for a known MRN wardwatch has not
scored, 400 (with a JSON `error` saying what to fix) for a malformed request, 408 (and the connection
closed) for a body not received whole within WARDWATCH_CDS_READ_TIMEOUT_S (30 s).

Reading the Patient from the EHR (CDS Hooks "FHIR Resource Access", PatientReader): a call whose
`prefetch.patient` is absent or null (not one the EHR answered with an OperationOutcome or a Patient
without MRN: that answer stands) but which sends `fhirServer` and `fhirAuthorization` has its Patient read
from there, `GET <fhirServer>/Patient/<context.patientId>` with `Authorization: Bearer <access_token>` and
`Accept: application/fhir+json` (through WARDWATCH_FHIR_PROXY_URL when set; never a proxy from the
environment: trust_env=False), and is keyed by that Patient's MRN by the prefetch's rule (_mrn). Only
from a server listed in WARDWATCH_CDS_FHIR_SERVERS (base URLs compared without a trailing slash; https, or
http on a loopback host; empty, the default: never, the 412 above): a call never chooses which host the
service calls (SSRF), a fhirServer not listed is a 412 saying to list it. The patientId must be a FHIR id
(schemas.fhir.relative_reference's rule, no "/"), the token an RFC 6750 bearer token, else 400 and no
request. The read has WARDWATCH_CDS_FHIR_TIMEOUT_S (5 s) in all, follows no redirect, reads at most
FHIR_PATIENT_MAX_BYTES, keeps no cookie, and runs on the event loop (aiohttp client). Any failure (no
answer in time, a status other than 200, not JSON, not a Patient, a Patient of another id, no MRN) is a
412 with a JSON `error` saying which, never `{"cards": []}` nor a 500: CDS Hooks names 412 for data it
could not get "directly calling the FHIR server", and an EHR treats the spec's codes, not a 502, as "no
decision support for this call". The token serves that one GET and is never cached, logged or echoed;
nothing is cached (every call reads its Patient); the log line of a failure names the server and the
reason, never the patient id.

Client authentication (CDS Hooks "Trusting CDS Clients"): with WARDWATCH_CDS_JWKS_FILE set, every
service call must carry `Authorization: Bearer <JWT>`, signed (ES384 or RS384 unless
WARDWATCH_CDS_ALGORITHMS says otherwise; never `none` or HMAC) by the key of that JWK Set its `kid`
names, with an `iss` of WARDWATCH_CDS_ISSUERS, an `aud` of WARDWATCH_CDS_AUDIENCE (the URL of the
service endpoint the client calls), `exp`, `iat` and a `jti` not used before; else 401 with
`WWW-Authenticate: Bearer` and a JSON `error` naming what is wrong (never a claim's value). The keys
are the file's, exchanged out of band: a `jku` header is never fetched (it would let the token name
the key that verifies it). Discovery and /healthz stay open: they hold no patient data. Without a
JWK Set the service takes anonymous calls, and starts only on a loopback address or with
WARDWATCH_CDS_ALLOW_ANONYMOUS=true (load_client_auth).

Key rotation and revocation without a restart (ClientKeys): the JWK Set file is stat()ed at most every
WARDWATCH_CDS_JWKS_CHECK_S (5 s) when a service call comes, and re-read only when it changed (device,
inode, size, mtime or ctime); a call with an unknown `kid` may look once more per interval, so an
EHR's first call with its new key finds it. At most two stat()s per interval, and a read only for a
changed file: no token, valid or not, makes the service touch the disk per request.
The new file's keys replace the old ones whole: a key removed from the file stops verifying within
that interval. A changed file that cannot be read, is not JSON or not a usable JWK Set (no key, a
private key, ...) keeps the last good keys: one error line `CDS client keys NOT reloaded: ...` (no key
material), the counter `client_keys.reload_failures` and the gauge `client_keys.file_unusable` (1 until
a good file is in place) on the metrics endpoint; a good reload logs `CDS client keys reloaded ...`
with the kids added and removed. A file that was never usable stops the service at start, as before.

Card: summary (< 140 chars, no identifiers: the tier and the probability or NEWS2, and "preliminary
results" when a reading the score rests on is a preliminary result), indicator by tier (high
critical, medium warning, low/none info), source.label "wardwatch", the score's age when the card is asked
for (", scored 25 min ago"; past SCORE_CURRENT_MS, 12 h: ", scored 30 h ago: NOT CURRENT", and the detail says no
score came since: a patient no longer scored, discharged or not charted, keeps a latest score that is not the risk
now), a probability never rounded to a certainty (">0.99", "<0.01", not "1.00", "0.00"), detail (markdown: the top
contributing features, the scoring time, the model version or NEWS2 rule, and which parameters were
preliminary: the score record's `preliminary_basis` codes, never their values). A score resting on a
reading older than schemas.alert.STALE_AFTER_MS (the record's `stale_readings`: a NEWS2 parameter scoring
points or a top feature) says so: "; readings over 4 h old" in the summary, and each such reading, its
value and its age at the scoring time in the detail ("systolic BP 85 mmHg taken 14 h 44 min before this
score, not rechecked"), so the clinician does not take it for a fresh deterioration.

State: the latest score record per patient (the greatest scoring_ms; a tie goes to the later
record), so memory grows with the number of patients, never with the number of scores. It is fed
by a consumer of the scores topic that starts at the beginning of every partition and commits
nothing. Kafka is the durable store: after a restart the service rebuilds the same table by
re-reading the topic (the topic's retention bounds how far back a patient's latest score can
be). Until it has read up to the end offsets the topic had when it started (CatchUp), a service
call answers 503 with Retry-After, never `{"cards": []}`: an empty answer would tell the clinician
"no risk" for a patient whose high score is not read yet. GET /readyz (and the metrics port's)
answers 503 until then too; /healthz says `caught_up`. Shadow scores (scores.shadow)
are never served. Logs never carry patient ids or values.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import logging
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import aiohttp_cors
import jwt
import orjson
from aiohttp import web

from schemas.alert import HOUR_MS, MINUTE_MS, STALE_AFTER_MS, format_age, stale_words
from schemas.codes import parameter_name
from schemas.fhir import mrn_of, relative_reference
from wardwatch.listen import is_loopback, run_http
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

SERVICE_ID = "wardwatch-deterioration"
HOOK = "patient-view"
SOURCE_LABEL = "wardwatch"
SUMMARY_MAX = 139  # CDS Hooks: summary SHOULD be < 140 characters
# a score older than this when shown is NOT CURRENT on its card: NEWS2 0 is observed at least every 12 h (RCP)
SCORE_CURRENT_MS = 12 * HOUR_MS
INDICATOR = {"high": "critical", "medium": "warning", "low": "info", "none": "info"}
# card uuids are deterministic per score record (a stable card across re-reads of the topic)
CARD_NAMESPACE = uuid.UUID("0c7a3d52-2f0e-5b7a-9d0e-6f2b1a4c8e31")

DISCOVERY = {"services": [{
    "id": SERVICE_ID,
    "hook": HOOK,
    "title": "wardwatch deterioration risk",
    "description": "The latest wardwatch risk of clinical deterioration for the patient in view "
                   "(model probability or NEWS2), with its top contributing features.",
    # the Patient, for its MRN: wardwatch keys patients by it, not by the FHIR id (patient_keys)
    "prefetch": {"patient": "Patient/{{context.patientId}}"},
}]}


CORS_MAX_AGE_S = 600  # how long a browser may reuse a preflight answer
ECHO_MAX = 64  # characters of a request value an error message may quote (a 1 MB `hook` is not echoed back)


class BadRequest(ValueError):
    """The CDS Hooks request cannot be answered as sent; the message says what to fix."""


class UnknownMrn(ValueError):
    """Whose risk is asked cannot be known: no prefetched Patient with an MRN (412 Precondition Failed)."""


UNKNOWN_MRN = ("no prefetched Patient with an MRN (identifier typed MR, of WARDWATCH_MRN_SYSTEM if set): wardwatch keys patients by the EHR's MRN, "
               "not by the FHIR Patient id, which may be another patient's MRN. Send the prefetch `patient` "
               "(Patient/{{context.patientId}}) this service's discovery declares, or set "
               "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS=true if the FHIR Patient ids are the EHR's patient keys; or, "
               "for calls sending `fhirServer` and `fhirAuthorization`, list that server in "
               "WARDWATCH_CDS_FHIR_SERVERS so this service reads the Patient from it")


def _echo(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= ECHO_MAX else shown[:ECHO_MAX] + "..."


# --- pure: request -> patient keys, score record -> card --------------------------------------------------


def patient_keys(request: Any, fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None) -> list[str]:
    """The wardwatch patient keys to try for a CDS Hooks request, best first: the prefetched Patient's MRN (its
    identifier typed MR, of `mrn_system` when set: settings.mrn_system), then (only when the FHIR Patient ids
    are the MRNs) context.patientId. UnknownMrn when there is none."""
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object (a CDS Hooks request)")
    if request.get("hook", HOOK) != HOOK:
        raise BadRequest(f"this service answers the {HOOK!r} hook, not {_echo(request.get('hook'))}")
    ctx = request.get("context")
    if not isinstance(ctx, dict):
        raise BadRequest("the request has no `context` object")
    raw = ctx.get("patientId")
    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest("`context.patientId` must be a non-empty string (the FHIR Patient id)")
    patient_id = raw.strip()
    if patient_id.startswith("Patient/"):
        patient_id = patient_id.removeprefix("Patient/").split("/")[0]
    scoped = _token_patient(request.get("fhirAuthorization"))
    if scoped is not None and scoped != patient_id:
        # the EHR's token is for one patient, its context names another: which one is in view is not known, and
        # a card for the wrong one is worse than none (neither id is echoed or logged)
        raise BadRequest("`fhirAuthorization.patient` (the patient the access token is restricted to) is not "
                         "`context.patientId`: the call names two patients, so no card is given; the EHR must "
                         "send the token of the patient in context")
    keys = []
    patient = (request.get("prefetch") or {}).get("patient") if isinstance(request.get("prefetch"), dict) else None
    if isinstance(patient, dict) and patient.get("resourceType", "Patient") != "Patient":
        patient = None  # CDS Hooks 2: an OperationOutcome for a prefetch the client could not fetch
    if isinstance(patient, dict) and patient.get("id") != patient_id:
        # its MRN would be another patient's key: a card of someone else's risk; a Patient without an id cannot
        # be shown to be the one in context (the prefetch Patient/{{context.patientId}} is a read: it has one)
        raise BadRequest("`prefetch.patient` is not the Patient of `context.patientId` (their ids differ)"
                         if patient.get("id") is not None else
                         "`prefetch.patient` has no `id`: it cannot be checked to be the Patient of `context.patientId`")
    mrn = _mrn(patient, mrn_system)
    if mrn:
        keys.append(mrn)
    if fhir_patient_ids_are_mrns and patient_id not in keys:
        keys.append(patient_id)
    if not keys:
        raise UnknownMrn(UNKNOWN_MRN)
    return keys


def _token_patient(authorization: Any) -> str | None:
    """`fhirAuthorization.patient` (CDS Hooks: the FHIR id of the patient a token with patient/ scopes is restricted
    to) when sent, else None; BadRequest when it is not a FHIR id (a "Patient/" prefix is dropped, as
    context.patientId's). The rest of fhirAuthorization is checked only
    when the service reads with it (patient_read)."""
    if not isinstance(authorization, dict) or authorization.get("patient") is None:
        return None
    scoped = authorization["patient"]
    if isinstance(scoped, str):  # "Patient/<id>" (some EHRs) as context.patientId: the same patient, not a refusal
        scoped = scoped.strip().removeprefix("Patient/")
    if (not isinstance(scoped, str) or "/" in scoped
            or relative_reference(f"Patient/{scoped}") != f"Patient/{scoped}"):
        raise BadRequest("`fhirAuthorization.patient` is not a FHIR id (1 to 64 of A-Z a-z 0-9 - .): CDS Hooks "
                         "sends there the id of the patient the access token is restricted to")
    return scoped


def _mrn(patient: Any, mrn_system: str | None = None) -> str | None:
    if not isinstance(patient, dict):  # CDS Hooks sends null for a prefetch the client could not fetch
        return None
    raw = patient.get("identifier") or []
    if not isinstance(raw, list):
        raise BadRequest("`prefetch.patient.identifier` must be an array (a FHIR Patient)")
    for identifier in raw:  # a malformed `type` is the request's fault (400), not "no MRN"
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            _type_codes(identifier)
    # the ingest's rule (schemas.fhir.mrn_of), so a card is keyed as the readings are: typed MR only (an untyped
    # identifier may be of another namespace, a national number or the server's own, whose value could be someone
    # else's MRN), of `mrn_system` when set (one typed MR per facility may be there: only the EHR's is its key)
    return mrn_of(patient, mrn_system)


def _type_codes(identifier: dict) -> list[Any]:
    type_ = identifier.get("type") or {}
    coding = (type_.get("coding") or []) if isinstance(type_, dict) else None
    if not isinstance(coding, list):
        raise BadRequest("`prefetch.patient.identifier[].type` must be a CodeableConcept with a `coding` array")
    return [c.get("code") for c in coding if isinstance(c, dict)]


# --- without a prefetch: the Patient read from the call's fhirServer (CDS Hooks "FHIR Resource Access") ------


FHIR_JSON = "application/fhir+json"
FHIR_PATIENT_MAX_BYTES = 1 << 20  # a Patient's JSON read from a fhirServer (a photo inline is the most it holds)
# RFC 6750 b64token: an OAuth 2.0 bearer token, which can never break the Authorization header it is sent in
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # fullmatch: "$" would let a "\n" end through
BEARER_TOKEN_MAX = 8192  # characters of an access token sent on (a JWT with many scopes is a few thousand)


class PatientNotRead(UnknownMrn):
    """The Patient could not be read from the call's fhirServer, or has no MRN there (412, as UnknownMrn)."""


@dataclass(frozen=True)
class PatientRead:
    """What reading a call's Patient takes: the allow-listed base URL, the FHIR id, the call's access token
    (used for this one GET only: never stored beyond the call, logged or echoed)."""

    server: str
    patient_id: str
    token: str = field(repr=False)


def patient_read(request: dict, servers: Sequence[str]) -> PatientRead | None:
    """The read of the Patient of a CDS Hooks request (one patient_keys found no MRN for, so `context.patientId`
    is a string) when this service is to make it: no prefetched Patient (`prefetch.patient` absent or null; a
    prefetched Patient without an MRN, or an OperationOutcome, is the EHR's answer already: not read again), and
    `fhirServer` and `fhirAuthorization` sent. None: nothing to read. `servers`: settings.cds_fhir_servers (each
    without a trailing slash); a fhirServer not among them is never called (PatientNotRead: a 412 saying to
    list it). BadRequest for a malformed fhirServer, fhirAuthorization or a patientId that is not a FHIR id."""
    prefetch = request.get("prefetch")
    if isinstance(prefetch, dict) and prefetch.get("patient") is not None:
        return None
    server, authorization = request.get("fhirServer"), request.get("fhirAuthorization")
    if server is None:
        return None
    if not isinstance(server, str) or not server.strip():
        raise BadRequest("`fhirServer` must be the base URL of the EHR's FHIR server (a string)")
    base = server.strip().rstrip("/")
    if base not in servers:  # SSRF: a request never decides which host the service calls
        raise PatientNotRead(f"`fhirServer` {_echo(base)} is not a FHIR server this service may read from: list it "
                             "in WARDWATCH_CDS_FHIR_SERVERS, or send the prefetch `patient` (Patient/{{context."
                             "patientId}}) this service's discovery declares")
    if authorization is None:
        raise PatientNotRead("`fhirServer` sent without `fhirAuthorization`: no access token to read the Patient "
                             "with; send one, or the prefetch `patient` this service's discovery declares")
    if not isinstance(authorization, dict):
        raise BadRequest("`fhirAuthorization` must be an object (CDS Hooks: access_token, token_type, ...)")
    token_type, token = authorization.get("token_type"), authorization.get("access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise BadRequest("`fhirAuthorization.token_type` must be \"Bearer\"")
    if not isinstance(token, str) or len(token) > BEARER_TOKEN_MAX or not _BEARER_TOKEN.fullmatch(token):
        # never echoed: it is a credential
        raise BadRequest(f"`fhirAuthorization.access_token` must be an OAuth 2.0 bearer token (RFC 6750 characters, "
                         f"at most {BEARER_TOKEN_MAX})")
    patient_id = request["context"]["patientId"].strip().removeprefix("Patient/")
    # a FHIR id only ([A-Za-z0-9-.]{1,64}, not "." or ".."), as the ingest reads a Patient: the id is put in
    # the URL path, so "a/b", "../x", "1/_history/2" or "1?_format=xml" would read another resource
    if "/" in patient_id or relative_reference(f"Patient/{patient_id}") != f"Patient/{patient_id}":
        raise BadRequest("`context.patientId` is not a FHIR id (1 to 64 of A-Z a-z 0-9 - .): the Patient cannot "
                         "be read from `fhirServer` by it")
    return PatientRead(base, patient_id, token)


class PatientReader:
    """Reads the Patient of a call sent without its prefetch from the call's fhirServer, when that server is
    one of `servers` (settings.cds_fhir_servers): GET <fhirServer>/Patient/<id> with the call's bearer token,
    within `timeout_s` (connection and body), no redirect followed, at most FHIR_PATIENT_MAX_BYTES, no cookie
    kept; nothing is cached. Its `session` is opened and closed with the app (make_app)."""

    def __init__(self, servers: Sequence[str], timeout_s: float, mrn_system: str | None = None,
                 proxy_url: str | None = None):
        self.servers = tuple(server.rstrip("/") for server in servers)
        self.timeout_s, self.mrn_system = timeout_s, mrn_system
        self.session: aiohttp.ClientSession | None = None
        # settings.fhir_proxy_url: the only proxy (trust_env=False: none from the environment, which would get
        # the tokens); its credentials go in Proxy-Authorization, never in a log line
        self.proxy, self.proxy_headers = _proxy(proxy_url)

    async def session_context(self, _app: web.Application):
        """aiohttp cleanup_ctx: one client session (and its connection pool) for the app's life."""
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            self.session = session
            yield
            self.session = None

    async def mrn(self, read: PatientRead) -> str:
        """The MRN of the Patient `read` names, by the rule of a prefetched Patient (_mrn); PatientNotRead
        (412) saying why not, never with the patient's id or the token. Logged: the server and why."""
        try:
            return self._mrn_of(await self._get(read), read)
        except PatientNotRead as e:
            log.warning("CDS: no MRN for a call from its fhirServer %s: %s", read.server, e)
            raise

    async def _get(self, read: PatientRead) -> bytes:
        what = "reading the Patient from `fhirServer`"
        if self.session is None:
            raise PatientNotRead(f"{what}: the service is stopping")
        headers = {"Authorization": f"Bearer {read.token}", "Accept": FHIR_JSON}
        if self.proxy_headers and read.server.startswith("http://"):
            # a plain-http request goes to the proxy itself, which aiohttp sends proxy_headers to only in a
            # CONNECT (https): here they travel with the request (never into an https tunnel: the server would get them)
            headers |= self.proxy_headers
        try:
            async with asyncio.timeout(self.timeout_s):  # the whole read, whatever the server trickles
                async with self.session.get(f"{read.server}/Patient/{read.patient_id}", headers=headers,
                                            allow_redirects=False, proxy=self.proxy,
                                            proxy_headers=self.proxy_headers) as response:
                    if response.status != 200:  # a redirect too: it would name a host nobody allow-listed
                        raise PatientNotRead(f"{what}: the server answered {response.status} "
                                             "(CDS Hooks: data the service needs could not be retrieved)")
                    if (response.content_length or 0) > FHIR_PATIENT_MAX_BYTES:
                        raise PatientNotRead(f"{what}: the answer is over {FHIR_PATIENT_MAX_BYTES} bytes")
                    body, size = [], 0
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        size += len(chunk)
                        if size > FHIR_PATIENT_MAX_BYTES:
                            raise PatientNotRead(f"{what}: the answer is over {FHIR_PATIENT_MAX_BYTES} bytes")
                        body.append(chunk)
                    return b"".join(body)
        except PatientNotRead:  # (a ValueError: not the one below)
            raise
        except TimeoutError:
            raise PatientNotRead(f"{what}: no answer within {self.timeout_s:g} s "
                                 "(WARDWATCH_CDS_FHIR_TIMEOUT_S)") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:  # the type only: a message may carry the URL
            raise PatientNotRead(f"{what}: {type(e).__name__}") from None

    def _mrn_of(self, body: bytes, read: PatientRead) -> str:
        what = "the Patient read from `fhirServer`"
        try:
            patient = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise PatientNotRead(f"{what} is not JSON") from None
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            raise PatientNotRead(f"{what} is not a Patient resource")
        if patient.get("id") != read.patient_id:  # its MRN would key another patient's card
            raise PatientNotRead(f"{what} is not the Patient of `context.patientId` (their ids differ)")
        try:
            mrn = _mrn(patient, self.mrn_system)
        except BadRequest:
            raise PatientNotRead(f"{what} has a malformed `identifier`") from None
        if mrn is None:
            of_system = ", of WARDWATCH_MRN_SYSTEM" if self.mrn_system else ""
            raise PatientNotRead(f"{what} has no MRN (identifier typed MR{of_system}): wardwatch keys patients "
                                 "by the EHR's MRN, not by the FHIR Patient id")
        return mrn


def _proxy(url: str | None) -> tuple[str | None, dict[str, str] | None]:
    """(proxy URL without credentials, headers with its Proxy-Authorization) for aiohttp, which takes no
    credentials from an explicit proxy URL."""
    if url is None:
        return None, None
    from yarl import URL

    parsed = URL(url)
    if parsed.user is None and parsed.password is None:
        return str(parsed), None
    credentials = base64.b64encode(f"{parsed.user or ''}:{parsed.password or ''}".encode()).decode()
    return str(parsed.with_user(None)), {"Proxy-Authorization": f"Basic {credentials}"}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _probability(p: float) -> str:
    """Two decimals, never rounded to a certainty: 0.996 is ">0.99", not "1.00"; 0.003 is "<0.01", not "0.00"."""
    if p >= 0.995 and p < 1:
        return ">0.99"
    if 0 < p < 0.005:
        return "<0.01"
    return f"{p:.2f}"


def _ago(ms: int) -> str:
    """A score's age in a summary: "less than 1 min", "25 min", "7 h", "3 d", ">99 d"."""
    minutes = max(ms, 0) // MINUTE_MS
    if minutes < 1:
        return "less than 1 min"
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} d" if minutes < 100 * 24 * 60 else ">99 d"


def card(record: dict, now_ms: int | None = None) -> dict:
    """One card for a score record (see the module docstring); `now_ms`: when it is shown, so the summary says how
    old the score is, and NOT CURRENT past SCORE_CURRENT_MS (None: the age is not said)."""
    tier = record.get("tier") if record.get("tier") in INDICATOR else "none"
    probability, news2 = record.get("probability"), record.get("news2")
    if record.get("path") == "model" and probability is not None:
        measure = f"probability {_probability(probability)}"
        method = f"model {record.get('model_version')}"
    else:
        measure = f"NEWS2 {news2}" if news2 is not None else "no NEWS2: vitals missing"
        method = "NEWS2 rule"
    preliminary = record.get("preliminary_basis") or []  # (absent from records written before it existed)
    if not isinstance(preliminary, list) or not all(isinstance(code, str) for code in preliminary):
        raise TypeError("preliminary_basis is not a list of codes")
    stale = record.get("stale_readings") or []  # (absent from records written before it existed)
    if not isinstance(stale, list) or not all(isinstance(r, list) and len(r) == 3 for r in stale):
        raise TypeError("stale_readings is not a list of [feature, value, taken_ms]")
    flag = ""
    age = None if now_ms is None else now_ms - record["scoring_ms"]
    if age is not None:  # a score computed hours ago is not the patient's risk now: say how old it is
        flag += f", scored {_ago(age)} ago" + (": NOT CURRENT" if age > SCORE_CURRENT_MS else "")
    flag += "; based on preliminary results" if preliminary else ""
    if stale:
        flag += f"; readings over {STALE_AFTER_MS // HOUR_MS} h old"
    summary = f"Deterioration risk {tier.upper()} ({measure}){flag}"[:SUMMARY_MAX]
    lines = [f"Scored at {_iso(record['scoring_ms'])} by {method}."]
    if age is not None and age > SCORE_CURRENT_MS:
        lines.append("")
        lines.append(f"No score since, {format_age(age)} ago: this is not the current "
                     f"risk. Check the latest observations or chart a new vitals set.")
    if preliminary:
        lines.append("")
        lines.append(f"Based on preliminary results, which may change when final: "
                     f"{', '.join(parameter_name(code) for code in preliminary)}.")
    if stale:
        lines.append("")
        lines.append("Old readings the score rests on:")
        lines += [f"- {words}" for words in stale_words(stale, record["scoring_ms"], "this score")]
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
            card(record)  # a record that cannot make a card is skipped here, not a 500 when asked for
        except (TypeError, KeyError, ValueError, OverflowError, OSError):  # JSONDecodeError is a ValueError
            self.records_skipped += 1  # our own topic: a bug upstream, counted (never a patient value in logs)
            return False
        self.records_read += 1
        held = self.by_patient.get(patient)
        if held is not None and held["scoring_ms"] > scoring_ms:
            return False
        self.by_patient[patient] = record
        return True

    def get(self, keys: list[str]) -> dict | None:
        return next((self.by_patient[k] for k in keys if k in self.by_patient), None)

    def card_for(self, keys: list[str], now_ms: int | None = None) -> dict | None:
        """The card of the first key's latest score; with `now_ms`, saying how old it is then (card()). Built
        when asked for: its summary depends on the time it is shown."""
        record = self.get(keys)
        return card(record, now_ms) if record is not None else None


# --- pure: CDS client authentication (CDS Hooks "Trusting CDS Clients") -------------------------------------

LEEWAY_S = 30  # clock skew allowed between the EHR and this host on exp and iat
# A token may not be valid for longer than this from now: it bounds how long a jti must be remembered,
# so the in-memory replay cache is enough (and a restart, which forgets it, reopens a short window only)
MAX_TOKEN_LIFETIME_S = 15 * 60
SEEN_TOKENS_MAX = 100_000  # jti entries kept at most (a few MB)
REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
# which key types can verify which algorithms (a JWK without `alg` is tried with the allowed ones of its type)
KEY_TYPE_ALGORITHMS = {"EC": ("ES",), "RSA": ("RS", "PS"), "OKP": ("EdDSA",)}


class AuthConfigError(ValueError):
    """`wardwatch cds` cannot start with these settings; the message is one line saying what to set."""


class KeysUnreadable(AuthConfigError):
    """The JWK Set file could not be read at all (an I/O error, which may pass), not a bad content."""


class Unauthorized(Exception):
    """A service call without a valid client token; the message says what is wrong in general terms."""

    def __init__(self, message: str, *, token_sent: bool = True):
        super().__init__(message)
        self.token_sent = token_sent


class SeenTokens:
    """The (iss, jti) of every accepted token until it expires: a token is accepted once. In memory and
    bounded: a restart forgets it, which re-opens a replay window of at most MAX_TOKEN_LIFETIME_S for
    tokens captured before it; when full of live tokens, the one expiring first is forgotten first."""

    def __init__(self, capacity: int = SEEN_TOKENS_MAX):
        self.capacity = capacity
        self._until: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def first_use(self, key: tuple[str, str], until: float, now: float) -> bool:
        """True (and remembered until `until`) the first time `key` is seen while it is valid."""
        if key in self._until:  # (an expired token never gets here: it was refused first)
            return False
        while self._heap and (self._heap[0][0] < now or len(self._until) >= self.capacity):
            _, old = heapq.heappop(self._heap)
            self._until.pop(old, None)
        self._until[key] = until
        heapq.heappush(self._heap, (until, key))
        return True

    def __len__(self) -> int:
        return len(self._until)


class ClientKeys:
    """The trusted client keys of WARDWATCH_CDS_JWKS_FILE, kept in step with the file without a restart.

    The file is stat()ed at most every `check_s` seconds, when a service call asks for a key, and read
    only when its identity, size or modification time changed. A call whose `kid` is unknown may make
    one extra stat() at most once per `check_s` (the EHR's first call with a rotated key finds it at
    once), so no token, valid or not, makes the service touch the disk per request. A changed file
    replaces the keys whole: a key removed from it stops verifying. A changed file that cannot be read
    or is not a usable JWK Set keeps the last good keys, says so in one error line (no key material)
    and counts it (client_keys.reload_failures; gauge client_keys.file_unusable is 1 until a good file
    is in place). Service calls run on one event loop: no lock is needed."""

    def __init__(self, path: Path, algorithms: list[str], *, check_s: float = 5.0,
                 clock=time.monotonic):
        self.path, self.algorithms, self.check_s, self._clock = Path(path), list(algorithms), check_s, clock
        self.checks = self.reloads = self.reload_failures = 0
        self.file_unusable = False
        self._reported: tuple | None = None  # the file version whose failure was logged (one line per version)
        self._version = self._stat()  # AuthConfigError at start: the service does not start
        self.keys = self._read()
        self._checked = self._forced = clock()

    def _where(self) -> str:
        return f"WARDWATCH_CDS_JWKS_FILE={self.path}"

    def _stat(self) -> tuple:
        try:
            st = os.stat(self.path)  # (follows a symlink: a Kubernetes ConfigMap swaps its target)
        except OSError as e:
            raise AuthConfigError(f"{self._where()} cannot be read ({e.strerror}; in a container: mount the "
                                  f"file there)") from None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read(self) -> dict[tuple[str, str], jwt.PyJWK]:
        try:
            jwks = orjson.loads(self.path.read_bytes())
        except OSError as e:
            raise KeysUnreadable(f"{self._where()} cannot be read ({e.strerror}; in a container: mount the "
                                 f"file there)") from None
        except orjson.JSONDecodeError:
            raise AuthConfigError(f"{self._where()} is not JSON (a JWK Set of the CDS clients' public keys)") from None
        try:
            return client_keys(jwks, self.algorithms)
        except AuthConfigError as e:
            raise AuthConfigError(f"{self._where()} {e}") from None

    def get(self, kid: str, alg: str) -> jwt.PyJWK | None:
        """The key for a token's (kid, alg), or None; re-reads a changed file first (see the class)."""
        now = self._clock()
        looked = now - self._checked >= self.check_s
        if looked:
            self._refresh(now)
        key = self.keys.get((kid, alg))
        if key is None and not looked and now - self._forced >= self.check_s:
            self._forced = now  # an unknown kid: one extra look per interval, whatever the tokens say
            self._refresh(now)
            key = self.keys.get((kid, alg))
        return key

    def _refresh(self, now: float) -> None:
        self._checked = now
        self.checks += 1
        try:
            version = self._stat()
        except AuthConfigError as e:
            self._failed(("gone",), e)
            return
        if version == self._version:
            return
        try:  # the version seen before the read: a write during the read is seen (and read) next time
            keys = self._read()
        except AuthConfigError as e:
            self._failed(version, e)
            return
        before, after = {kid for kid, _ in self.keys}, {kid for kid, _ in keys}
        self.keys, self._version, self.file_unusable, self._reported = keys, version, False, None
        self.reloads += 1
        log.info("CDS client keys reloaded from %s: %d key(s); kids added: %s; removed: %s", self._where(),
                    len(after), ", ".join(sorted(after - before)) or "none",
                    ", ".join(sorted(before - after)) or "none")

    def _failed(self, version: tuple, error: AuthConfigError) -> None:
        self.file_unusable = True
        # a bad content is read again only once the file changes; an I/O error may pass (EIO, EMFILE, a
        # permission being fixed), so that version is read again at the next look
        self._version = None if isinstance(error, KeysUnreadable) else version
        if version == self._reported:
            return  # this broken state was reported already: one line per change, not one per interval
        self._reported = version
        self.reload_failures += 1
        kids = sorted({kid for kid, _ in self.keys})
        log.error("CDS client keys NOT reloaded: %s; still verifying with the %d key(s) loaded before (kids %s)",
                  error, len(kids), ", ".join(kids))

    def kids(self) -> set[str]:
        return {kid for kid, _ in self.keys}

    def counters(self) -> dict:
        return {"client_keys": {"checks": self.checks, "reloads": self.reloads,
                                "reload_failures": self.reload_failures}}

    def gauges(self) -> dict:
        return {"client_keys": {"loaded": len(self.kids()), "file_unusable": int(self.file_unusable)}}


@dataclass
class ClientAuth:
    """What a CDS client's token is checked against (built at start by load_client_auth; its keys
    follow the JWK Set file: ClientKeys)."""

    keys: ClientKeys
    issuers: list[str]
    audience: str
    algorithms: list[str]
    seen: SeenTokens = field(default_factory=SeenTokens)

    def describe(self) -> str:
        return (f"signed JWT required on every service call ({len(self.keys.kids())} client key(s), "
                f"{len(self.issuers)} issuer(s), algorithms {', '.join(self.algorithms)}; "
                f"{self.keys.path} re-read when it changes, checked every {self.keys.check_s:g} s at most)")


def client_keys(jwks: Any, algorithms: list[str]) -> dict[tuple[str, str], jwt.PyJWK]:
    """(kid, alg) -> verifying key, for every key of a JWK Set and allowed algorithm it can verify."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise AuthConfigError("is not a JWK Set: a JSON object with a non-empty `keys` array")
    keys: dict[tuple[str, str], jwt.PyJWK] = {}
    for jwk in jwks["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            raise AuthConfigError("has a key without a `kid` (CDS Hooks: the token's kid names its key)")
        kid, kty = jwk["kid"], jwk.get("kty")
        if not isinstance(kty, str):
            raise AuthConfigError(f"key {kid!r} has no `kty` (key type) string")
        if kty == "oct" or "d" in jwk:
            raise AuthConfigError(f"key {kid!r} is a secret or private key: give the clients' public keys only")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key of the client: never a signature
        prefixes = KEY_TYPE_ALGORITHMS.get(kty, ())
        for alg in algorithms:
            if not alg.startswith(prefixes) or jwk.get("alg", alg) != alg:
                continue
            try:
                keys[(kid, alg)] = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError as e:
                raise AuthConfigError(f"key {kid!r} is not a usable {alg} public key ({type(e).__name__})") from None
    if not keys:
        raise AuthConfigError(f"has no key that can verify {', '.join(algorithms)} (WARDWATCH_CDS_ALGORITHMS)")
    return keys


def load_client_auth(settings: Settings, *, clock=time.monotonic) -> ClientAuth | None:
    """The client checks `wardwatch cds` runs with (None: anonymous calls), or AuthConfigError: one
    line saying what to set. Anonymous only where nobody else can connect (a loopback address), unless
    the operator says so: on the compose network every container reaches the port."""
    if settings.cds_jwks_file is None:
        if is_loopback(settings.cds_host) or settings.cds_allow_anonymous:
            return None
        raise AuthConfigError(
            f"WARDWATCH_CDS_HOST={settings.cds_host} without WARDWATCH_CDS_JWKS_FILE would serve every patient's "
            "risk to anyone who reaches the port: set WARDWATCH_CDS_JWKS_FILE (the EHRs' public keys), "
            "WARDWATCH_CDS_ISSUERS and WARDWATCH_CDS_AUDIENCE to require signed tokens, or "
            "WARDWATCH_CDS_ALLOW_ANONYMOUS=true to accept that")
    keys = ClientKeys(settings.cds_jwks_file, settings.cds_algorithms, check_s=settings.cds_jwks_check_s,
                      clock=clock)
    audience = settings.cds_audience or ""
    # CDS Hooks: aud is the URL of the endpoint called, and a service's endpoint is <base>/cds-services/<id>
    endpoint = f"/cds-services/{SERVICE_ID}"
    if not audience.startswith(("https://", "http://")) or not audience.rstrip("/").endswith(endpoint):
        raise AuthConfigError(f"WARDWATCH_CDS_AUDIENCE={audience} is not this service's endpoint URL as the EHR "
                              f"calls it: https://<host>[/<path>]{endpoint}")
    return ClientAuth(keys, list(settings.cds_issuers), audience.rstrip("/"), list(settings.cds_algorithms))


def authenticate(auth: ClientAuth, authorization: str | None, now: float | None = None) -> None:
    """Check the Authorization header of a service call; Unauthorized says what is wrong."""
    if not authorization:
        raise Unauthorized("no bearer token: a CDS client must send `Authorization: Bearer <JWT>` signed with "
                           "its key (CDS Hooks: Trusting CDS Clients)", token_sent=False)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header is not `Bearer <JWT>`")
    if not token.isascii():  # a JWT is base64url; header bytes that are not UTF-8 would make PyJWT raise (a 500)
        raise Unauthorized("the bearer token is not a JWT")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise Unauthorized("the bearer token is not a JWT") from None
    except jwt.PyJWTError:  # a header PyJWT refuses (a kid that is not a string, a `crit` it cannot honour)
        raise Unauthorized("the token's header is not valid for this service") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in auth.algorithms:  # none and HMAC are never in the list (settings.py)
        raise Unauthorized(f"the token's signing algorithm is not accepted (only {', '.join(auth.algorithms)})")
    key = auth.keys.get(kid, alg) if isinstance(kid, str) else None
    if key is None:
        raise Unauthorized("the token's `kid` names no trusted client key for its algorithm")
    try:
        claims = jwt.decode(token, key, algorithms=[alg], audience=[auth.audience, auth.audience + "/"],
                            issuer=auth.issuers, leeway=LEEWAY_S,
                            options={"require": REQUIRED_CLAIMS, "verify_signature": True})
    except jwt.MissingRequiredClaimError as e:
        raise Unauthorized(f"the token has no `{e.claim}` claim (CDS Hooks requires iss, aud, exp, iat, jti)") from None
    except jwt.InvalidSignatureError:
        raise Unauthorized("the token's signature does not verify with the client's key") from None
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("the token is not valid yet (issued in the future)") from None
    except jwt.InvalidIssuerError:
        raise Unauthorized("the token's issuer (`iss`) is not a trusted CDS client") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized("the token's audience (`aud`) is not this service's endpoint") from None
    except jwt.PyJWTError:  # a malformed claim or token: said in general terms, never quoted
        raise Unauthorized("the token is not a valid JWT for this service") from None
    now = time.time() if now is None else now  # wall clock: authentication, not event time
    jti, exp = claims["jti"], int(claims["exp"])  # (exp: PyJWT checked it is an integer date)
    if not isinstance(jti, str) or not jti:
        raise Unauthorized("the token's `jti` must be a non-empty string")
    if exp > now + MAX_TOKEN_LIFETIME_S + LEEWAY_S:
        raise Unauthorized(f"the token is valid for too long (at most {MAX_TOKEN_LIFETIME_S // 60} minutes ahead)")
    if not auth.seen.first_use((claims["iss"], jti), exp + LEEWAY_S, now):
        raise Unauthorized("the token was already used (`jti` replayed): sign a new token for every call")


# --- wiring: HTTP and the Kafka feed ---------------------------------------------------------------------


CATCHING_UP_RETRY_S = 5


class CatchUp:
    """Whether a reader of a topic from its beginning has read everything the topic held when it started.

    `ends`: partition -> (low, high) watermarks at start. The embedded broker (Tansu) reports a
    partition's high watermark as its last record batch's base offset + 1, not its true end (as
    streams/app.py ExactEndRecovery and streams/stats.py read_stats found): the rest of that batch comes
    in the same fetch, so the reader is done once it reached every partition's reported end, at least
    `quiet_s` has passed since, and a read has come back short (what was fetched is all delivered), or
    ten times `quiet_s` has passed (new records that never let a read come back short: a flood). And
    whatever those ends say, it is done when nothing has come for
    `idle_s` and the broker's current ends are no further than the reader's positions (`at_end`):
    records below the start ends that can never come (a tail removed, a topic recreated smaller) do not
    keep it waiting, while a broker that does not answer keeps it not done."""

    def __init__(self, ends: dict[int, tuple[int, int]], now: float, *, quiet_s: float = 0.5, idle_s: float = 2.0):
        self.remaining = {p: high for p, (low, high) in ends.items() if high > low}
        self.quiet_s, self.idle_s = quiet_s, idle_s
        self.reached_at = now if not self.remaining else None
        self.last_record_at = self.last_probe_at = now
        self.done = threading.Event()

    def seen(self, partition: int, offset: int, now: float) -> None:
        """A record at `offset` of `partition` was read."""
        self.last_record_at = now
        end = self.remaining.get(partition)
        if end is not None and offset + 1 >= end:
            del self.remaining[partition]
            if not self.remaining:
                self.reached_at = now

    def tick(self, now: float, *, drained: bool) -> bool:
        """After each read (`drained`: it returned fewer records than asked for): True when the reader
        should ask the broker whether it is at the end (idle)."""
        if self.reached_at is not None and (now - self.reached_at >= 10 * self.quiet_s or
                                            (now - self.reached_at >= self.quiet_s and drained)):
            self.done.set()
        if self.done.is_set() or now - max(self.last_record_at, self.last_probe_at) < self.idle_s:
            return False
        self.last_probe_at = now
        return True

    def at_end(self) -> None:
        """The broker says nothing more is there to read: done."""
        self.done.set()


def make_app(latest: LatestScores, auth: ClientAuth | None = None, *, ready: Callable[[], bool],
             fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None,
             cors_origins: Sequence[str] = (), fhir_servers: Sequence[str] = (),
             fhir_timeout_s: float = 5.0, fhir_proxy_url: str | None = None,
             read_timeout_s: float = 30.0, clock: Callable[[], float] = time.time) -> web.Application:
    """auth None: anonymous service calls (load_client_auth decides when that is allowed). ready: the
    scores are read up to the topic's end at start (CatchUp.done.is_set); until then calls get 503.
    fhir_patient_ids_are_mrns, mrn_system: the settings of those names (see patient_keys).
    cors_origins: settings.cds_cors_origins (see allow_cors). fhir_servers, fhir_timeout_s:
    settings.cds_fhir_servers and cds_fhir_timeout_s (see PatientReader; none: no FHIR server is ever called).
    fhir_proxy_url: settings.fhir_proxy_url's value (None: FHIR servers are reached directly).
    read_timeout_s: settings.cds_read_timeout_s (a body not received whole within it: 408, connection closed)."""
    reader = PatientReader(fhir_servers, fhir_timeout_s, mrn_system, fhir_proxy_url) if fhir_servers else None

    async def discovery(_request: web.Request) -> web.Response:
        return web.json_response(DISCOVERY)

    async def service(request: web.Request) -> web.Response:
        if auth is not None:  # before the body is read: an unauthenticated caller learns nothing
            try:
                authenticate(auth, request.headers.get("Authorization"))
            except Unauthorized as e:
                # RFC 6750: a missing token gets the bare challenge, a bad one error="invalid_token"
                challenge = 'Bearer realm="wardwatch"' + (', error="invalid_token"' if e.token_sent else "")
                return web.json_response({"error": str(e)}, status=401, headers={"WWW-Authenticate": challenge})
        if not ready():  # an empty answer now could hide a high score not read yet
            return web.json_response(
                {"error": "the CDS service is still reading the latest scores since its start: retry shortly"},
                status=503, headers={"Retry-After": str(CATCHING_UP_RETRY_S)})
        try:
            # bounded: aiohttp never times out a body, so a client trickling one would hold its connection
            # (and its handler) for ever; without client authentication anyone can
            body = orjson.loads(await asyncio.wait_for(request.read(), read_timeout_s))
        except asyncio.TimeoutError:
            response = web.json_response({"error": f"the request body was not received within {read_timeout_s:g} s"},
                                         status=408)
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            # hang up now: aiohttp would otherwise keep reading the rest of the body for 10 s more
            request.protocol.force_close()
            return response
        except orjson.JSONDecodeError:
            return web.json_response({"error": "the request body is not JSON: send a CDS Hooks request"}, status=400)
        except web.RequestPayloadError:  # a corrupt gzip/deflate Content-Encoding, broken chunked framing: not a 500
            return web.json_response({"error": "the request body cannot be read (corrupt Content-Encoding or "
                                               "chunked framing)"}, status=400)
        try:
            keys = patient_keys(body, fhir_patient_ids_are_mrns, mrn_system)
        except BadRequest as e:
            return web.json_response({"error": str(e)}, status=400)
        except UnknownMrn as e:  # never {"cards": []}: it would read as "no risk"
            try:
                read = patient_read(body, reader.servers) if reader is not None else None
                if read is None:
                    return web.json_response({"error": str(e)}, status=412)
                keys = [await reader.mrn(read)]  # (with fhir_patient_ids_are_mrns, no UnknownMrn gets here)
            except BadRequest as bad:
                return web.json_response({"error": str(bad)}, status=400)
            except UnknownMrn as unknown:  # CDS Hooks: 412 when the data cannot be had from the FHIR server either
                return web.json_response({"error": str(unknown)}, status=412)
        found = latest.card_for(keys, int(clock() * 1000))
        return web.json_response({"cards": [found] if found else []})

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"patients": len(latest.by_patient), "records_read": latest.records_read,
                                  "records_skipped": latest.records_skipped, "caught_up": ready()})

    async def readiness(_request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "still reading the scores topic"}, status=503)

    app = web.Application()
    app.router.add_get("/cds-services", discovery)
    app.router.add_post(f"/cds-services/{SERVICE_ID}", service)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", readiness)
    allow_cors(app, cors_origins)
    if reader is not None:
        app.cleanup_ctx.append(reader.session_context)
    return app


def allow_cors(app: web.Application, origins: Sequence[str]) -> None:
    """CORS for browser-based CDS clients (CDS Hooks: "CDS Services and browser-based CDS Clients will
    require CORS support"), for the named origins only, on discovery and the service: a preflight
    (OPTIONS) from one of them is answered with the methods and the Authorization and Content-Type
    headers a call sends; its answers carry Access-Control-Allow-Origin, and expose WWW-Authenticate and
    Retry-After (what a 401 or a 503 tells the app to do). No credentials (cookies): a call authenticates
    with its bearer JWT. Any other origin gets no CORS header, so the browser withholds the answer; no
    origins (the default), none at all."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(allow_credentials=False, allow_headers=("Authorization", "Content-Type"),
                                           expose_headers=("WWW-Authenticate", "Retry-After"), max_age=CORS_MAX_AGE_S)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        if route.resource is not None and route.resource.canonical.startswith("/cds-services"):
            cors.add(route)


FEED_BATCH = 500  # records per read of the scores feed
TOPIC_WAIT_S = 10.0  # for the scores topic's metadata after ensure_topics


class ScoresFeed(threading.Thread):
    """Reads the scores topic from the beginning into `latest`, until stop is set. `caught_up` is set
    once it has read all the topic held when it started (CatchUp)."""

    def __init__(self, settings: Settings, topic: str, latest: LatestScores):
        super().__init__(name="cds-scores-feed", daemon=True)
        self.settings, self.topic, self.latest = settings, topic, latest
        self.stop_event = threading.Event()
        self.caught_up = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({
            **self.settings.kafka_client_config(),
            # assign(), not subscribe(): no group membership, nothing committed; every start re-reads
            "group.id": f"{self.settings.group_prefix}-cds-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,  # Tansu answers a fetch only when this wait expires
            "auto.offset.reset": "earliest",  # a position lost (a topic recreated): read it all again, not skip
        })
        try:
            deadline = time.monotonic() + TOPIC_WAIT_S
            while True:  # a topic just created may take a moment to show in every broker's metadata
                topic = consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
                if topic is not None and topic.error is None and topic.partitions:
                    break
                if time.monotonic() >= deadline or self.stop_event.is_set():  # never "ready" reading nothing
                    raise RuntimeError(f"the scores topic {self.topic} does not exist (WARDWATCH_TOPIC_PREFIX?)")
                time.sleep(0.5)
            tps = [TopicPartition(self.topic, p) for p in sorted(topic.partitions)]
            started = time.monotonic()
            catch_up = CatchUp({tp.partition: consumer.get_watermark_offsets(tp, timeout=30) for tp in tps}, started)
            consumer.assign([TopicPartition(self.topic, tp.partition, OFFSET_BEGINNING) for tp in tps])
            while not self.stop_event.is_set():
                messages = consumer.consume(num_messages=FEED_BATCH, timeout=0.2)
                for message in messages:
                    if message.error():
                        log.warning("scores feed: %s", message.error())
                        continue
                    self.latest.update(message.value())
                    catch_up.seen(message.partition(), message.offset(), time.monotonic())
                if catch_up.tick(time.monotonic(), drained=len(messages) < FEED_BATCH) and self._at_end(consumer, tps):
                    catch_up.at_end()
                if catch_up.done.is_set() and not self.caught_up.is_set():
                    self.caught_up.set()
                    log.info("scores read up to the end of %s at start: %d records in %.1f s; serving cards",
                             self.topic, self.latest.records_read + self.latest.records_skipped,
                             time.monotonic() - started)
        except Exception as e:  # infrastructure: stop the service rather than serve stale risk
            self.error = e
            log.error("scores feed stopped (%s: %s); stopping the CDS service", type(e).__name__, e)
            os.kill(os.getpid(), signal.SIGTERM)  # run_app turns it into a clean shutdown
        finally:
            consumer.close()

    @staticmethod
    def _at_end(consumer, tps) -> bool:
        """Every partition's current end is at or below the next offset this consumer reads (no answer: no)."""
        from confluent_kafka import KafkaException

        try:
            positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
            for tp in tps:
                low, high = consumer.get_watermark_offsets(tp, timeout=2)
                at = positions[tp.partition]
                if high > (at if at >= 0 else low):  # (no position yet: nothing read from it, so its start)
                    return False
            return True
        except KafkaException:
            return False


def run_cds(settings: Settings, auth: ClientAuth | None) -> None:
    """Blocking: serve CDS Hooks on settings.cds_host:cds_port until SIGINT/SIGTERM (cds_port 0: any
    free port, logged once bound: wardwatch/listen.py). `auth`: load_client_auth(settings)."""
    from streams.topics import ensure_topics, topics_for
    from wardwatch import observability

    if auth is not None:
        log.info("CDS client authentication: %s", auth.describe())
        observability.expose_counters("cds", auth.keys.counters)  # read at scrape time: nothing on the hot path
        observability.expose_gauges("cds", auth.keys.gauges)
    elif is_loopback(settings.cds_host):
        log.info("CDS client authentication: off, anonymous service calls accepted (loopback address only); "
                 "set WARDWATCH_CDS_JWKS_FILE to require the EHR's signed tokens")
    else:
        log.warning("CDS client authentication: off, anonymous service calls accepted from anyone who reaches "
                    "the port (WARDWATCH_CDS_ALLOW_ANONYMOUS=true); set WARDWATCH_CDS_JWKS_FILE to require the "
                    "EHR's signed tokens")
    topics = topics_for(settings)
    latest = LatestScores.empty()
    feed = ScoresFeed(settings, topics.scores, latest)
    observability.set_readiness(feed.caught_up.is_set)  # the metrics port's /readyz too, from now on
    ensure_topics(settings, topics)
    feed.start()
    app = make_app(latest, auth, ready=feed.caught_up.is_set,
                   fhir_patient_ids_are_mrns=settings.fhir_patient_ids_are_mrns, mrn_system=settings.mrn_system,
                   cors_origins=settings.cds_cors_origins, fhir_servers=settings.cds_fhir_servers,
                   fhir_timeout_s=settings.cds_fhir_timeout_s, read_timeout_s=settings.cds_read_timeout_s,
                   fhir_proxy_url=settings.fhir_proxy_url.get_secret_value() if settings.fhir_proxy_url else None)
    if settings.cds_fhir_servers:
        from streams.fhir_fetch import warn_of_environment_proxy

        warn_of_environment_proxy(log, settings.fhir_proxy_url)
        log.info("CDS: a call without its prefetched Patient has it read from its fhirServer when that is one of "
                 "WARDWATCH_CDS_FHIR_SERVERS (%s; timeout %g s%s)", ", ".join(settings.cds_fhir_servers),
                 settings.cds_fhir_timeout_s, "; through WARDWATCH_FHIR_PROXY_URL" if settings.fhir_proxy_url else "")

    async def stop_feed(_app: web.Application) -> None:
        feed.stop_event.set()

    app.on_cleanup.append(stop_feed)
    run_http(app, settings.cds_host, settings.cds_port, log=log, what="CDS Hooks service",
             after=f"/cds-services (scores from {topics.scores})")
    feed.join(timeout=10)
    if feed.error is not None:
        raise SystemExit(f"the CDS service stopped because it could not read {topics.scores}: {feed.error}; "
                         "check that the broker at WARDWATCH_BOOTSTRAP_SERVERS is reachable")
