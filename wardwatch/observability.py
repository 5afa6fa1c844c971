"""Logs and metrics for every wardwatch service, in one place.

Logs: one JSON object per line on stderr: {"ts", "level", "service", "logger", "msg", ...}. Log
messages name counts, topics, partitions, versions and reasons, never a patient identifier or a
clinical value (tests/wardwatch/test_observability.py and the demo test scan the service logs for
the identifiers they fed in). `redact` is the last line of defence for exception text, which can
quote input: it is applied to every formatted exception.

Metrics: Prometheus, served by `serve(port, ready=...)` on settings.metrics_port:

    GET /metrics   Prometheus text format
    GET /healthz   200 while the process runs (liveness)
    GET /readyz    200 when `ready()` says the service can do its work, else 503 (readiness)

Every service's counters are the ones it already keeps for the stats topic (streams/stats.py):
`expose_counters(service, snapshot_fn)` (called by StatsPublisher) makes each integer leaf of the
nested snapshot a sample, read at scrape time, so the hot path pays nothing:

    wardwatch_counter_total{service="ingest", counter="cdc.dead_lettered.malformed_json"}  3

and the service's gauges (its current values, e.g. the subscription watcher's open gaps), given
with `expose_gauges(service, gauges_fn)`, as gauges (they go down too):

    wardwatch_gauge{service="subscriptions", gauge="subscriptions.open_gaps"}  1

Plus what is not in a snapshot:

    wardwatch_score_latency_seconds     raw produce -> score record published (histogram)
    wardwatch_model_info{version,path}  1 for the model in use
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# --- metrics -------------------------------------------------------------------------------------

SCORE_LATENCY = Histogram("wardwatch_score_latency_seconds", "Raw input produced -> score record published",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_PHASE = Histogram("wardwatch_worker_batch_phase_seconds",
                        "Time a worker batch spends per phase: process (state, features, scoring, alert "
                        "policy), outputs (flush to the broker), changelog (table writes acknowledged)",
                        ["phase"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
BATCH_MESSAGES = Histogram("wardwatch_worker_batch_messages", "Canonical messages per worker batch",
                           buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
MODEL_INFO = Gauge("wardwatch_model_info", "1 for the model version in use", ["version", "path"])


def observe_batch(messages: int, **phase_seconds: float) -> None:
    BATCH_MESSAGES.observe(messages)
    for phase, seconds in phase_seconds.items():
        observe_phase(phase, seconds)


def observe_phase(phase: str, seconds: float) -> None:
    """One phase of a worker batch that ends after the batch does (its changelog confirmation)."""
    BATCH_PHASE.labels(phase=phase).observe(seconds)


def set_model(version: str, path: str) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(version=version, path=path).set(1)


def flatten(snapshot: dict, prefix: str = "") -> list[tuple[str, int]]:
    """Integer leaves of a nested counters snapshot as (dotted path, value)."""
    out: list[tuple[str, int]] = []
    for key, value in snapshot.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten(value, path + ".")
        elif isinstance(value, int) and not isinstance(value, bool):
            out.append((path, value))
    return out


class _SnapshotCollector:
    """Reads every registered service's counters and gauges snapshots when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], dict]] = {}
        # (service, part) -> gauges: a service's own gauges and its consumption watchdog's, side by side
        self.gauges: dict[tuple[str, str], Callable[[], dict]] = {}

    def collect(self):
        counters = CounterMetricFamily("wardwatch_counter", "Cumulative counters of each wardwatch service",
                                       labels=["service", "counter"])
        gauges = GaugeMetricFamily("wardwatch_gauge", "Current values of each wardwatch service",
                                   labels=["service", "gauge"])
        for family, sources in ((counters, list(self.sources.items())),
                                (gauges, [(service, fn) for (service, _), fn in list(self.gauges.items())])):
            for service, snapshot in sources:
                try:
                    leaves = flatten(snapshot())
                except Exception:  # a scrape never takes a service down
                    continue
                for path, value in leaves:
                    family.add_metric([service, path], value)
        yield counters
        yield gauges


_COLLECTOR = _SnapshotCollector()
REGISTRY.register(_COLLECTOR)


def expose_counters(service: str, snapshot: Callable[[], dict]) -> None:
    _COLLECTOR.sources[service] = snapshot


def expose_gauges(service: str, gauges: Callable[[], dict], *, part: str = "service") -> None:
    """`part`: whose gauges these are, so that the service's own (e.g. subscriptions.open_gaps) and its
    consumption watchdog's (consumption.lag) both show; exposing a part again replaces it."""
    _COLLECTOR.gauges[(service, part)] = gauges


# --- logs ----------------------------------------------------------------------------------------

# Values that look like clinical identifiers in free text (MRNs such as C0-0001, E1234567 or MRN_0012345:
# up to 4 letters, a digit, a hyphen or underscore, then 3 or more digits; FHIR ids, UUIDs). Exception
# messages are the one place input can leak into a log line; they are scrubbed (of credential header values
# too: _CREDENTIAL_HEADER). A word such as sha256 goes too: a scrubbed word costs less than a kept MRN.
_IDENTIFIER_LIKE = re.compile(r"(?i)\b(?:[a-z]{1,4}\d?[-_]?)?\d{3,}(?:[-_]\d+)*\b|\b[0-9a-f]{8}-[0-9a-f-]{27}\b")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


# A credential header as a parser error quotes its line (aiohttp logs a malformed request's offending header,
# e.g. b'Authorization: Bearer <token>\x01', with its traceback): the value goes, up to the quote or line end
_CREDENTIAL_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key)(\s*:\s*)[^'\"\r\n]*")


# a traceback's frame line (`  File "/app/streams/app.py", line 412, in process_batch`): its line number is
# never input, and is kept, so a maintainer can find the line; the path and the name are scrubbed as the rest
_FRAME_LINE = re.compile(r'^((?:\s*\|)*\s*File "[^"\n]*", )line (\d+)(, in .*)$')  # "  | File": an ExceptionGroup's


def _redact_line(line: str) -> str:
    if frame := _FRAME_LINE.match(line):
        return f"{_redact_text(frame[1])}line {frame[2]}{_redact_text(frame[3])}"
    return _redact_text(line)


def _redact_text(text: str) -> str:
    return _IDENTIFIER_LIKE.sub("<redacted>", _CREDENTIAL_HEADER.sub(r"\1\2<redacted>", text))


def redact(text: str) -> str:
    return "\n".join(_redact_line(line) for line in text.split("\n"))


class _Scrubbed:
    """An exception given as a log line's argument ("... (%s)", exc), formatted scrubbed."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __str__(self) -> str:
        return redact(str(self.exc))

    def __repr__(self) -> str:
        return redact(repr(self.exc))


def _scrub_exception_args(record: logging.LogRecord) -> bool:
    """Handler filter: an exception among a record's arguments is scrubbed like a traceback. Our lines
    (the scores feed stopped, a changelog not confirmed) and libraries' ("Error in grouping key : %r")
    put the exception's message in the line itself, where only exc_info was scrubbed."""
    if isinstance(record.args, tuple) and any(isinstance(a, BaseException) for a in record.args):
        record.args = tuple(_Scrubbed(a) if isinstance(a, BaseException) else a for a in record.args)
    return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # structured fields passed as logging's `extra=` (counts, topics, versions)
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class PlainFormatter(logging.Formatter):
    """Plain text for a terminal, with exception text scrubbed as in the JSON lines."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return redact(super().formatException(ei))


def configure_logging(service: str, level: str = "INFO", *, json_logs: bool = True) -> None:
    """Replace the root handlers: JSON lines (default) or plain text for a developer's terminal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json_logs else
                         PlainFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    handler.addFilter(_scrub_exception_args)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception ending a thread (the receiver's producer poller, a watchdog): a log line with its
    traceback scrubbed by the formatter, not threading's default hook, which printed it whole on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("wardwatch").critical("thread %s stopped on an uncaught %s", name, args.exc_type.__name__,
                                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(unraisable) -> None:
    """An exception Python cannot raise (in a __del__, a finalizer, a garbage-collected generator): a log
    line with its traceback scrubbed, not the default hook's whole text on stderr."""
    exc = unraisable.exc_value
    logging.getLogger("wardwatch").error("an exception was ignored in %s", type(unraisable.object).__name__,
                                         exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback))


# --- the metrics/health endpoint -----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], bool] = staticmethod(lambda: True)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/metrics":
            self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            self._answer(200, b'{"status":"ok"}', "application/json")
        elif self.path == "/readyz":
            try:
                ok = bool(self.ready())
            except Exception:  # a readiness probe that fails means not ready, never a crash
                ok = False
            self._answer(200 if ok else 503, b'{"ready":%s}' % (b"true" if ok else b"false"), "application/json")
        else:
            self._answer(404, b'{"error":"not found"}', "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # scrapes are not worth a log line each
        pass


_readiness: Callable[[], bool] = lambda: True  # the service's, once it says (set_readiness)


def set_readiness(ready: Callable[[], bool]) -> None:
    """What /readyz answers from now on, for a service whose readiness exists only once it runs (its
    consumption watchdog, streams/watchdog.py) while the endpoint was started before."""
    global _readiness
    _readiness = single_flight(ready)


def single_flight(check: Callable[[], bool]) -> Callable[[], bool]:
    """`check`, with concurrent calls sharing one run: a caller arriving while it runs waits for that run's
    answer instead of starting its own. The metrics server answers each request on a thread of its own, and a
    readiness check can take seconds (the receiver's broker check: 2 s with the broker down), so probes
    hammering /readyz must not start one broker request each."""
    if getattr(check, "single_flight", False):  # already shared: wrapping again would nest a level per call
        return check
    lock = threading.Lock()
    state: dict = {"running": None}  # the run in progress: an Event set when its answer is in `answer`

    def shared() -> bool:
        with lock:
            run = state["running"]
            leader = run is None
            if leader:
                run = state["running"] = {"done": threading.Event(), "answer": False, "error": None}
        if not leader:
            run["done"].wait()
        else:
            try:
                run["answer"] = check()
            except BaseException as exc:  # handed to every waiter, as the check's own callers would get it
                run["error"] = exc
            finally:
                with lock:
                    state["running"] = None
                run["done"].set()
        if run["error"] is not None:
            raise run["error"]
        return run["answer"]

    shared.single_flight = True  # type: ignore[attr-defined]
    return shared


def serve(port: int | None, *, host: str = "127.0.0.1", ready: Callable[[], bool] | None = None
          ) -> ThreadingHTTPServer | None:
    """Start the metrics/health server in a daemon thread; None when `port` is None (disabled).
    /readyz asks `ready`, else what set_readiness() last gave (200 until then)."""
    if port is None:
        return None
    handler = type("Handler", (_Handler,), {"ready": staticmethod(ready or (lambda: _readiness()))})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    logging.getLogger(__name__).info("metrics and health endpoints listening", extra={"port": server.server_port})
    return server
