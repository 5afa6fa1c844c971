"""id-only FHIR notifications: GET the focus resources from the FHIR server, then parse the notification
as if the server had sent them inline, so id-only and full-resource payloads give identical events.

    NeedsFetch(references)                           (schemas.fhir.parse_notification)
        |  GET <fhir_server_url>/<Type>/<id> for each reference (timeout, retries with backoff doubling from
        |  WARDWATCH_FHIR_RETRY_BACKOFF_S, or after a 429/503's Retry-After (seconds or an HTTP-date) when
        |  it sends one, each wait at most MAX_RETRY_DELAY_S);
        |  for a DELETE entry the version before the delete: vread <Type>/<id>/_history/<n-1> when the
        |  delete's version n is known (its response.etag), else the instance history <Type>/<id>/_history;
        |  a reference answered 410 Gone (deleted; id-only notifications of deletes carry no DELETE entry):
        |    <Type>/<id>: the instance history, whose version before the newest delete it retracts;
        |    <Type>/<id>/_history/<n> (servers answer a vread of the version a delete created so): as a
        |    DELETE entry with etag W/"n", the vread of <n-1>
        |  the instance history is read page by page (HAPI pages it by 20) along its `next` links, only on
        |  the configured server (scheme, host, port and under its base path: another one would get the
        |  token), until the version
        |  before the newest delete is listed, at most WARDWATCH_FHIR_HISTORY_MAX_PAGES pages (each is a
        |  blocking GET of the worker; next links going round in a circle must not stall it)
        |  complete_notification(): the same status entry + the fetched resources (a DELETE entry gets the
        |  version before it, which the parser turns into retractions of that version's facts; a gone
        |  reference becomes such a DELETE entry, with the history's delete etag / lastModified, or for a
        |  gone version its etag and no lastModified: issued at the notification's timestamp)
        v
    parse_notification() again -> Parsed | Rejected | Ignored

Subjects naming their Patient by the server's id alone (NeedsFetch `patients`, after the id-only round if
any): FhirClient.patient_mrn() reads "Patient/<id>" for its MRN (the identifier typed MR, of
WARDWATCH_MRN_SYSTEM when set) and the notification is parsed again with `patient_mrns`; a Patient without an
MRN -> MISSING_PATIENT. The MRN is cached (bounded LRU, PATIENT_CACHE_SIZE) for WARDWATCH_FHIR_PATIENT_CACHE_TTL_S
(monotonic clock): a patient merge or an MRN corrected on the server applies to the notifications read that
long after it at the latest, without a restart. The Patient itself adds no facts here (a cached one could
not): its own notifications give its sex and birth year.

Failures are data outcomes, never exceptions, so the ingest worker dead-letters the original bytes:
    no server configured          -> FHIR_SERVER_NOT_CONFIGURED (replay after setting WARDWATCH_FHIR_SERVER_URL)
    404 for a reference           -> RESOURCE_NOT_FOUND (never visible to this client)
    410 for a reference           -> the retractions of its version before the delete (see above); its history
                                     answered 404 / 410 or without a version before the delete -> RESOURCE_NOT_FOUND
                                     ("deleted (410) and its history could not be read: ..."); other failures of
                                     the history read as below, with the same prefix
    410 for a version reference   -> the same, from the vread of the version before it ("deleted (410) and the
                                     version before it could not be read: ..."); a 404 -> RESOURCE_NOT_FOUND
    404 / 410 for the version before a DELETE entry (vread or history; a server without either)
                                  -> RESOURCE_NOT_FOUND (a 410 there is a failed read, not another delete)
    timeouts, connection errors, undecodable (e.g. broken gzip) bodies, 429 and 5xx after every retry,
    other 4xx (401/403: a token problem), a body that is not the resource asked for
                                  -> FETCH_FAILED (replayable once the server is back)
    a history whose next page is on another server or outside the base path (not read: set
    WARDWATCH_FHIR_SERVER_URL to the address the server names itself by, if it is the same), or without the version before the delete in its first
    WARDWATCH_FHIR_HISTORY_MAX_PAGES pages -> FETCH_FAILED (replayable after that change)
    anything unexpected (a bug)   -> INTERNAL_ERROR (replayable after the fix)

A server that failed every retry (timeouts, connection errors, 408/429/5xx) is not asked again for
WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S: id-only notifications are FETCH_FAILED at once meanwhile (they would
be after their retries anyway). The ingest worker reads CDC and FHIR in one loop, so without the pause
an outage would hold every batch for the retries of each id-only notification in it (4 attempts of 5 s
by default) and the vital signs behind them would reach the patient worker minutes late. When the last
answer was a 429/503 with a longer Retry-After, the pause is that long (at most MAX_UNAVAILABLE_PAUSE_S,
10 min): the server said when to come back. The log line and the paused notifications' detail say how long
and why.

Network: WARDWATCH_FHIR_PROXY_URL, when set, is the proxy of every request (its credentials from the URL go to
the proxy only); no proxy from the environment (HTTP_PROXY, ...) is ever used, since it would receive the token.
The token itself goes only to an https server or a loopback one unless WARDWATCH_FHIR_ALLOW_PLAIN_HTTP=true
(settings refuse it at load).

Runs inside the ingest worker, only for id-only notifications and DELETE entries whose version before
the delete the notification does not carry; other full-resource ones never get here. Details and logs
name resource types only, never ids.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import httpx
import orjson

from schemas.deadletter import Reason
from schemas.fhir import (HISTORY, complete_notification, gone_delete_entry, gone_version_delete, history_decides,
                          maps_type, mrn_of, no_mrn_detail, parse_notification, version_before_delete)
from schemas.ingest_outcome import NeedsFetch, Outcome, Rejected, rejected
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
PATIENT_CACHE_SIZE = 10_000  # Patient id -> MRN entries kept (a few hundred bytes each)
_RETRIED_STATUSES = {408, 429, 500, 502, 503, 504}
_GONE_STATUSES = {404, 410}
# the longest wait between two attempts: the delay doubles from WARDWATCH_FHIR_RETRY_BACKOFF_S, and each wait
# blocks the ingest worker (CDC included): unbounded, 10 retries of 0.5 s would sleep 256 s before the last
# one, past the consumption watchdog's WARDWATCH_STALL_TIMEOUT_S; a longer Retry-After is waited this long too
MAX_RETRY_DELAY_S = 10.0
_RETRY_AFTER_STATUSES = {429, 503}  # the answers whose Retry-After sets the wait before the next attempt
# the longest pause a final 429/503's Retry-After sets after every retry failed (WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S
# is the pause otherwise, and the shortest): the server named when to come back, but a broken or hostile header
# ("Retry-After: 86400") must not stop every id-only read for a day
MAX_UNAVAILABLE_PAUSE_S = 600.0


def warn_of_environment_proxy(log: logging.Logger, proxy_url) -> None:
    """One warning when the environment names a proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, lower case too) that
    FHIR requests do not use because WARDWATCH_FHIR_PROXY_URL is unset: a deployment that relied on it (the
    ingest followed it before the setting existed) would otherwise just see its reads fail. Never the value."""
    import urllib.request

    if proxy_url is None and {"http", "https", "all"} & set(urllib.request.getproxies_environment()):
        log.warning("a proxy is set in the environment (HTTP_PROXY, HTTPS_PROXY or ALL_PROXY) but FHIR requests "
                    "do not use it (it would receive the bearer tokens): set WARDWATCH_FHIR_PROXY_URL if the FHIR "
                    "server is reachable only through a proxy")


class FetchError(Exception):
    """A reference could not be fetched; `reason` is the dead-letter reason."""

    def __init__(self, reason: Reason, detail: str, exception: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.exception = reason, detail, exception


class Gone(FetchError):
    """The server answered 410 Gone: the resource existed and was deleted."""


class Paused(FetchError):
    """Not sent: the server failed every retry moments ago (WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S). The detail
    advises the ingest's redrive; other callers (subscriptions recover) give their own advice."""


class FhirClient:
    """A small synchronous FHIR read client (the ingest worker is a synchronous loop)."""

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic):
        if not settings.fhir_server_url:
            raise ValueError("FhirClient needs settings.fhir_server_url (WARDWATCH_FHIR_SERVER_URL)")
        headers = {"Accept": FHIR_JSON}
        if settings.fhir_auth_token is not None:
            headers["Authorization"] = f"Bearer {settings.fhir_auth_token.get_secret_value()}"
        self._base = httpx.URL(settings.fhir_server_url.rstrip("/") + "/")
        # a transport of its own: httpx then takes no proxy from the environment (HTTP_PROXY, ...), which would
        # receive the token; WARDWATCH_FHIR_PROXY_URL is the only proxy (CA bundles: SSL_CERT_FILE still applies)
        proxy = settings.fhir_proxy_url.get_secret_value() if settings.fhir_proxy_url is not None else None
        warn_of_environment_proxy(log, proxy)
        self._http = httpx.Client(base_url=self._base, headers=headers, timeout=settings.fhir_timeout_s,
                                  transport=httpx.HTTPTransport(proxy=proxy))
        self.retries = settings.fhir_retries
        self.history_pages = settings.fhir_history_max_pages
        self.backoff_s = settings.fhir_retry_backoff_s
        self.unavailable_pause_s = settings.fhir_unavailable_pause_s
        self._unavailable_until = float("-inf")  # (monotonic) no GET before then: the server just failed
        self._unavailable_why = ""  # said with the pause: the server's Retry-After, when it set the pause
        self._sleep = sleep
        self._monotonic = monotonic
        self.mrn_system = settings.mrn_system
        self.patient_cache_ttl_s = settings.fhir_patient_cache_ttl_s
        # "Patient/<id>" -> (MRN, monotonic time read): a subject's Patient is read once per TTL, not for every
        # notification of it
        self._mrns: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def read(self, reference: str) -> dict:
        """GET one relative reference ("Type/id" or "Type/id/_history/v") -> the resource as a dict;
        "Type/id/_history" (a DELETE whose version is unknown) -> its newest version before the delete."""
        if reference.endswith(f"/{HISTORY}"):
            return self._version_before_delete(reference)
        return _resource(self._get(reference), reference)

    def patient_mrn(self, reference: str) -> str | None:
        """The MRN of "Patient/<id>" (its identifier typed MR, of settings.mrn_system when set), None when it has
        none; read from the server, then from a bounded LRU cache (PATIENT_CACHE_SIZE) for
        settings.fhir_patient_cache_ttl_s: a merge or MRN correction on the server is read after that at the
        latest (a Patient without an MRN is not cached). The monotonic clock: cache freshness, not event time."""
        now = self._monotonic()
        cached = self._mrns.get(reference)
        if cached is not None and now - cached[1] < self.patient_cache_ttl_s:
            self._mrns.move_to_end(reference)
            return cached[0]
        self._mrns.pop(reference, None)  # expired: read again
        mrn = mrn_of(self.read(reference), self.mrn_system)
        if mrn is not None:
            self._mrns[reference] = (mrn, now)
            if len(self._mrns) > PATIENT_CACHE_SIZE:
                self._mrns.popitem(last=False)
        return mrn

    def _version_before_delete(self, reference: str) -> dict:
        resource = version_before_delete(self._history(reference), reference)
        if resource is None:
            raise FetchError(Reason.RESOURCE_NOT_FOUND, f"GET {_kind(reference)}: no version before the delete")
        return resource

    def version_delete_entry(self, reference: str) -> dict:
        """For "Type/id/_history/n" answered 410 Gone (the version a delete created): the DELETE entry with
        etag W/"n" and the version before it, read as for a DELETE entry (schemas.fhir.gone_version_delete);
        a type wardwatch does not map is not read."""
        entry, prior = gone_version_delete(reference)
        if prior is None:
            return entry
        if prior.endswith(f"/{HISTORY}"):  # n is no version number: as a 410 of the resource itself
            return self.delete_entry(prior.removesuffix(f"/{HISTORY}"))
        try:
            return {**entry, "resource": self.read(prior)}
        except FetchError as exc:  # the reason of the vread: a 5xx stays replayable (fetch_failed)
            raise FetchError(exc.reason, f"GET {_kind(reference)}: deleted (410) and the version before it could "
                                         f"not be read: {exc.detail}", exc.exception) from exc

    def delete_entry(self, reference: str) -> dict:
        """For "Type/id" answered 410 Gone: the DELETE entry that retracts its version before the delete,
        from the instance history (schemas.fhir.gone_delete_entry); a type wardwatch does not map is not read."""
        if not maps_type(reference):
            return gone_delete_entry(reference, None)
        history = f"{reference}/{HISTORY}"
        try:
            entry = gone_delete_entry(reference, self._history(history))
            if entry is None:
                raise FetchError(Reason.RESOURCE_NOT_FOUND, f"GET {_kind(history)}: no version before the delete")
        except FetchError as exc:  # the reason of the history read: a 5xx stays replayable (fetch_failed)
            raise FetchError(exc.reason, f"GET {_kind(reference)}: deleted (410) and its history could not be "
                                         f"read: {exc.detail}", exc.exception) from exc
        return entry

    def _history(self, reference: str) -> dict:
        """The instance history ("Type/id/_history"), its pages' entries in one Bundle: servers page it (HAPI
        by 20), so the `next` links are followed until the version before the newest delete is read
        (schemas.fhir.history_decides) or there is no next page. At most `fhir_history_max_pages` pages: each
        is a blocking GET (with its retries) of the ingest worker, and a resource with thousands of versions,
        or a server whose next links go round in a circle, must not stall every partition it reads."""
        kind = _kind(reference)
        page = self._history_page(reference, kind)
        history, pages = {**page, "entry": _list(page.get("entry"))}, 1
        while not history_decides(history, reference) and (link := _next_link(page)) is not None:
            if pages == self.history_pages:
                raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the version before the delete is not in the "
                                                      f"first {pages} pages of the history (raise "
                                                      f"WARDWATCH_FHIR_HISTORY_MAX_PAGES, then replay)")
            page = self._history_page(self._same_server(link, kind), kind)
            history["entry"] += _list(page.get("entry"))
            pages += 1
        return history

    def _history_page(self, url: str, kind: str) -> dict:
        try:
            page = orjson.loads(self._get(url, kind=kind).content)
        except orjson.JSONDecodeError as exc:
            raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the body is not JSON", type(exc).__name__)
        if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
            raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the server did not answer with a Bundle")
        return page

    def _same_server(self, link: str, kind: str) -> str:
        """A next link as an absolute URL, relative ones resolved against the server's base URL (FHIR's rule);
        one on another scheme, host or port, or outside the base path, is refused: the request, with its
        token, would go there."""
        try:
            url = self._base.join(link)
        except httpx.InvalidURL as exc:
            raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the next page link is not a URL", type(exc).__name__)
        if (url.scheme, url.host, url.port) != (self._base.scheme, self._base.host, self._base.port):
            raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the next page of the history is on another server "
                                                  f"and was not read (it would get the token); if that is this "
                                                  f"server's own address, set WARDWATCH_FHIR_SERVER_URL to it")
        # under the base path too (HAPI's "<base>?_getpages=..." is the base itself): another application
        # behind the same host and port (a reverse proxy's /admin, /other-app) must not get the token either
        # url.path is decoded: a percent-encoded dot segment ("<base>/%2e%2e/admin", left as sent by the join,
        # which removes only literal ones) starts with the base here but is /admin to a server normalising it
        if (url.path != self._base.path.rstrip("/") and not url.path.startswith(self._base.path)) or any(
                segment in (".", "..") for segment in url.path.split("/")):
            raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the next page of the history is outside the FHIR "
                                                  f"base path and was not read (it would get the token)")
        return str(url)

    def subscription_events(self, subscription: str, first: int, last: int) -> bytes:
        """The `$events` operation (R4B backport / R5): the notification Bundle (type query-event) of
        event numbers first..last of a subscription ("Subscription/<id>"), as the server sent it."""
        response = self._get(f"{subscription}/$events", params={"eventsSinceNumber": str(first),
                                                                 "eventsUntilNumber": str(last),
                                                                 "content": "full-resource"})
        try:
            bundle = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise FetchError(Reason.FETCH_FAILED, "$events: the body is not JSON", type(exc).__name__)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise FetchError(Reason.FETCH_FAILED, "$events: the server did not answer with a Bundle")
        return response.content

    def _get(self, reference: str, params: dict[str, str] | None = None, *, kind: str | None = None) -> httpx.Response:
        """GET with retries on timeouts, connection errors, undecodable bodies, 408/429/5xx (after the backoff, or
        a 429/503's Retry-After, at most MAX_RETRY_DELAY_S); 200 -> the response.
        `kind` names what is read in details (default: the reference's _kind; a next-page URL holds ids)."""
        kind = kind or _kind(reference)
        paused_s = self._unavailable_until - self._monotonic()
        if paused_s > 0:
            raise Paused(Reason.FETCH_FAILED, f"GET {kind}: not sent, the FHIR server failed every retry moments "
                                                  f"ago (asked again in {paused_s:.0f} s{self._unavailable_why}; "
                                                  f"redrive fetch_failed once it is back)")
        attempt = 0
        while True:
            retry_after_s = None  # what the server asked the client to wait (429 / 503 with Retry-After)
            try:
                response = self._http.get(reference, params=params)
            except httpx.HTTPError as exc:  # timeouts, refused connections, protocol errors, undecodable bodies
                failure = FetchError(Reason.FETCH_FAILED, f"GET {kind}: {type(exc).__name__}", type(exc).__name__)
            else:
                if response.status_code == 200:
                    return response
                if response.status_code in _GONE_STATUSES:
                    raise (Gone if response.status_code == 410 else FetchError)(
                        Reason.RESOURCE_NOT_FOUND, f"GET {kind}: the FHIR server answered {response.status_code}")
                failure = FetchError(Reason.FETCH_FAILED,
                                     f"GET {kind}: the FHIR server answered {response.status_code}")
                if response.status_code not in _RETRIED_STATUSES:
                    raise failure  # 401/403/400...: retrying will not help, an operator must act
                if response.status_code in _RETRY_AFTER_STATUSES:
                    retry_after_s = retry_after(response.headers.get("Retry-After"))
            if attempt >= self.retries:
                self._pause_after(failure, retry_after_s)
                asked = "" if retry_after_s is None else f"; the server asked to retry after {retry_after_s:.0f} s"
                raise FetchError(failure.reason, f"{failure.detail} (after {attempt + 1} attempts{asked})",
                                 failure.exception)
            wait_s = self.backoff_s * 2**attempt if retry_after_s is None else retry_after_s
            self._sleep(min(wait_s, MAX_RETRY_DELAY_S))
            attempt += 1

    def _pause_after(self, failure: FetchError, retry_after_s: float | None) -> None:
        """No GET for WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S, or for the final answer's Retry-After when longer
        (at most MAX_UNAVAILABLE_PAUSE_S): a server that asked for 120 s was asked again after 30. 0: off."""
        if self.unavailable_pause_s <= 0:
            return
        pause_s, self._unavailable_why = self.unavailable_pause_s, ""
        if retry_after_s is not None and min(retry_after_s, MAX_UNAVAILABLE_PAUSE_S) > pause_s:
            pause_s = min(retry_after_s, MAX_UNAVAILABLE_PAUSE_S)
            capped = f", at most {MAX_UNAVAILABLE_PAUSE_S:.0f} s" if retry_after_s > MAX_UNAVAILABLE_PAUSE_S else ""
            self._unavailable_why = f", as the server asked with Retry-After: {retry_after_s:.0f} s{capped}"
        self._unavailable_until = self._monotonic() + pause_s
        log.warning("the FHIR server failed every retry (%s): id-only notifications are dead-lettered "
                    "fetch_failed for the next %.0f s%s", failure.detail, pause_s,
                    self._unavailable_why or " (WARDWATCH_FHIR_UNAVAILABLE_PAUSE_S)")

    def close(self) -> None:
        self._http.close()


def retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """A Retry-After header -> the seconds to wait (0 for a date already past), None when absent or unreadable
    (the backoff then applies). Either delay-seconds ("120") or an HTTP-date ("Fri, 31 Dec 1999 23:59:59 GMT",
    against the wall clock `now`)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP-dates are in GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now())


def resolve(outcome: Outcome, value: bytes | None, client: FhirClient | None, *, topic: str, partition: int,
            offset: int, received_ms: int | None = None, fhir_patient_ids_are_mrns: bool = False,
            mrn_system: str | None = None) -> Outcome:
    """Turn a NeedsFetch into the outcome of the completed notification; other outcomes pass through.
    First the id-only references (the completed notification is parsed again), then the MRNs of subjects
    named by the server's Patient id only (`patients`: parsed again with them)."""
    if not isinstance(outcome, NeedsFetch):
        return outcome
    if client is None:
        return Rejected(outcome.rejection)  # FHIR_SERVER_NOT_CONFIGURED, with what to set
    try:
        if outcome.references:
            value = complete_notification(value, *_fetch(client, outcome.references, outcome.priors))
            outcome = parse_notification(value, topic=topic, partition=partition, offset=offset,
                                         received_ms=received_ms, fhir_patient_ids_are_mrns=fhir_patient_ids_are_mrns,
                                         mrn_system=mrn_system)
            if isinstance(outcome, NeedsFetch) and outcome.references:  # other resources than the ones referenced
                return rejected(Reason.FETCH_FAILED, "the fetched resources do not match the notification's references")
        if isinstance(outcome, NeedsFetch):
            mrns = {ref: client.patient_mrn(ref) for ref in outcome.patients}
            if None in mrns.values():
                return rejected(Reason.MISSING_PATIENT, no_mrn_detail("the subject's Patient (read from the FHIR "
                                                                      "server)", mrn_system))
            outcome = parse_notification(value, topic=topic, partition=partition, offset=offset,
                                         received_ms=received_ms, fhir_patient_ids_are_mrns=fhir_patient_ids_are_mrns,
                                         patient_mrns=mrns, mrn_system=mrn_system)
    except FetchError as exc:
        return rejected(exc.reason, exc.detail, exc.exception)
    except Exception as exc:  # a bug (e.g. JSON orjson reads but cannot write back): keep the message for replay
        return rejected(Reason.INTERNAL_ERROR, "unexpected error completing an id-only notification",
                        type(exc).__name__)
    if isinstance(outcome, NeedsFetch):  # only a bug gets here: every subject's MRN was given
        return rejected(Reason.INTERNAL_ERROR, "subjects still unresolved after reading their Patients")
    return outcome


def _fetch(client: FhirClient, references: tuple[str, ...],
           priors: tuple[str, ...] = ()) -> tuple[dict[str, dict], dict[str, dict]]:
    """(reference -> resource, reference -> DELETE entry of a resource answered 410 Gone). A read ("Type/id")
    or a version read ("Type/id/_history/n": the version the delete created) answered 410 means a delete;
    the version before a DELETE entry (`priors`) or a history answered 410 stays resource_not_found."""
    fetched, gone = {}, {}
    for ref in references:
        try:
            fetched[ref] = client.read(ref)
        except Gone:
            if ref in priors or ref.endswith(f"/{HISTORY}"):
                raise
            gone[ref] = client.delete_entry(ref) if ref.count("/") == 1 else client.version_delete_entry(ref)
    return fetched, gone


def _resource(response: httpx.Response, reference: str) -> dict:
    try:
        resource = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise FetchError(Reason.FETCH_FAILED, f"GET {_kind(reference)}: the body is not JSON", type(exc).__name__)
    kind, rid = reference.split("/")[:2]
    if not isinstance(resource, dict) or resource.get("resourceType") != kind or resource.get("id") != rid:
        raise FetchError(Reason.FETCH_FAILED, f"GET {kind}: the server returned a different resource")
    return resource


def _next_link(bundle: dict) -> str | None:
    """The url of a Bundle's link with relation "next" (the next page), if any."""
    links = bundle.get("link")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"].strip() or None
    return None


def _list(raw) -> list:
    return raw if isinstance(raw, list) else []


def _kind(reference: str) -> str:
    """The resource type (and whether a version or the history was read) only: ids can identify patients
    and must not reach logs or headers."""
    parts = reference.split("/")
    return f"{parts[0]}/{HISTORY}" if HISTORY in parts[2:3] else parts[0]
