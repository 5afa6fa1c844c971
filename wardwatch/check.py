"""`wardwatch check cdc|fhir FILE`: run the ingest parsers offline on a file of raw messages.

A platform team points this at a capture of its Debezium or FHIR output to see, before going live,
what wardwatch will make of every message. Nothing talks to Kafka or to a FHIR server (an id-only
notification is reported as the parser rejects it without a server: no_fhir_server).

Input: one message per line (blank lines are skipped). A line is an **envelope** when it is a JSON
object that has a "value" member and no members other than topic, key, value, headers, partition,
offset and timestamp:

    {"topic": "ehr.public.vital_signs", "key": {"id": 7}, "value": {...Debezium value...}, "headers": {}}

Neither a Debezium value (payload/schema or before/after/op/source) nor a FHIR Bundle (resourceType)
can look like that, so every other line is a **bare** message value, taken byte for byte (so a
malformed or non-UTF-8 line is checked as exactly those bytes). In an envelope, `key` and `value`
are JSON or null (null value: a tombstone); a JSON *string* is taken as the raw text of the key or
value (plain-string keys, malformed bodies); anything else is serialised as compact JSON.
`headers` are accepted and not used (the parsers do not read headers).

The CDC table is the last dot-separated segment of the topic (`<prefix>.<schema>.<table>`, any
prefix). Bare lines, and envelopes without a topic, use `--topic`. The partition is the envelope's
or 0; the offset the envelope's or the line's index (0-based), so provenance points at the line.
An envelope's `timestamp` (the Kafka record's, epoch ms) is what the ingest checks a FHIR Observation
with no server time against (issued, meta.lastUpdated, notification timestamp); without one such an
Observation is rejected as missing_time, as the ingest would reject a record without a timestamp.

Output: one JSON line per outcome, in input order, each with the 1-based input `line`:

    {"kind": "event", "line": n, "event": {...}}          one per canonical event
    {"kind": "rejected", "line": n, "reason": ..., "detail": ..., "exception": ...}
    {"kind": "control", "line": n, "type": "tombstone"|"handshake"|"heartbeat"|..., "detail": {...}}
    {"kind": "ignored", "line": n, "type": ..., "detail": {...}}
    {"kind": "summary", "source": ..., ...the ingest worker's counters..., "balanced": bool}

An event uses the CanonicalEvent field names, except the times: `effective` and `issued` are
ISO-8601 UTC strings (millisecond precision) in place of effective_ms and issued_ms; `value` is in
the canonical unit whose UCUM code is `unit`; `event_id` is included. The summary's counters are
those of streams.ingest.SourceCounters (what `wardwatch stats` shows for a live worker):
messages_in, messages_parsed, events_out, dead_lettered (what the worker would dead-letter, by
reason), control, ignored and skipped by kind.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from schemas.canonical import CanonicalEvent
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Control, Ignored, Outcome, Parsed, Rejected, rejected
from streams.ingest import IngestCounters

SOURCES = ("cdc", "fhir")
DEFAULT_TOPICS = {"cdc": "ehr.public.vital_signs", "fhir": "ww.fhir.notifications"}
ENVELOPE_KEYS = frozenset({"topic", "key", "value", "headers", "partition", "offset", "timestamp"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_messages(lines: list[bytes], default_topic: str
                  ) -> Iterator[tuple[int, str, bytes | None, bytes | None, int, int, int | None]]:
    """(line number, topic, key, value, partition, offset, record timestamp ms or None) for every non-blank line."""
    for index, line in enumerate(lines):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        envelope = as_envelope(line)
        if envelope is None:
            yield index + 1, default_topic, None, line, 0, index, None
            continue
        topic = envelope.get("topic") if isinstance(envelope.get("topic"), str) else default_topic
        partition = envelope.get("partition") if _is_int(envelope.get("partition")) else 0
        offset = envelope.get("offset") if _is_int(envelope.get("offset")) else index
        timestamp = envelope.get("timestamp") if _is_int(envelope.get("timestamp")) else None
        yield index + 1, topic, _raw(envelope.get("key")), _raw(envelope["value"]), partition, offset, timestamp


def as_envelope(line: bytes) -> dict[str, Any] | None:
    """The line as an envelope object, or None when it is a bare message value."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and "value" in doc and set(doc) <= ENVELOPE_KEYS:
        return doc
    return None


def _raw(doc: Any) -> bytes | None:
    if doc is None:
        return None
    if isinstance(doc, str):
        return doc.encode()
    return orjson.dumps(doc)


def _is_int(raw: Any) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def parse_message(source: str, topic: str, key: bytes | None, value: bytes | None, partition: int,
                  offset: int, received_ms: int | None = None, cdc_timezone: str = "UTC",
                  fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None) -> Outcome:
    if source == "cdc":
        # the table is the topic's last segment, whatever the prefix of this feed
        prefix = topic.rsplit(".", 1)[0] if "." in topic else ""
        return parse_cdc(topic, key, value, partition=partition, offset=offset, cdc_topic_prefix=prefix,
                         cdc_timezone=cdc_timezone)
    # no FHIR server offline: a subject named by the server's Patient id alone is rejected (no_fhir_server),
    # as the ingest without WARDWATCH_FHIR_SERVER_URL would, unless the ids are the MRNs
    return parse_notification(value, topic=topic, partition=partition, offset=offset, received_ms=received_ms,
                              fhir_patient_ids_are_mrns=fhir_patient_ids_are_mrns, mrn_system=mrn_system)


def iso_utc(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_json(event: CanonicalEvent) -> dict[str, Any]:
    d = event.to_dict()
    d["effective"] = iso_utc(d.pop("effective_ms"))
    d["issued"] = iso_utc(d.pop("issued_ms"))
    return d


def outcome_lines(line: int, outcome: Outcome) -> list[dict[str, Any]]:
    match outcome:
        case Parsed(events=events):
            return [{"kind": "event", "line": line, "event": event_json(e)} for e in events]
        case Rejected(rejection=r):
            return [{"kind": "rejected", "line": line, "reason": r.reason.value, "detail": r.detail,
                     "exception": r.exception}]
        case Control(kind=kind, detail=detail):
            return [{"kind": "control", "line": line, "type": kind, "detail": detail}]
        case Ignored(kind=kind, detail=detail):
            return [{"kind": "ignored", "line": line, "type": kind, "detail": detail}]
    raise TypeError(f"unknown outcome {type(outcome).__name__}")


def check_lines(source: str, lines: list[bytes], default_topic: str | None = None,
                emit: Callable[[bytes], None] = print, cdc_timezone: str = "UTC",
                fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None) -> dict[str, Any]:
    """Parse every message, emit one JSON line per outcome and the summary; returns the summary.
    cdc_timezone: of the database's zone-less timestamps, as the ingest's settings.cdc_timezone;
    fhir_patient_ids_are_mrns, mrn_system: as the ingest's settings of those names."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    counters = IngestCounters()
    topic = default_topic or DEFAULT_TOPICS[source]
    for line, msg_topic, key, value, partition, offset, received_ms in read_messages(lines, topic):
        outcome = parse_message(source, msg_topic, key, value, partition, offset, received_ms, cdc_timezone,
                                fhir_patient_ids_are_mrns, mrn_system)
        try:
            rendered = [orjson.dumps(doc) for doc in outcome_lines(line, outcome)]
        except (orjson.JSONEncodeError, OverflowError, TypeError) as exc:  # as the worker: kept, not fatal
            outcome = rejected(Reason.INTERNAL_ERROR, "parsed event is not JSON-encodable", type(exc).__name__)
            rendered = [orjson.dumps(doc) for doc in outcome_lines(line, outcome)]
        counters.record(source, outcome)
        for text in rendered:
            emit(text)
    summary = {"kind": "summary", "source": source, **counters.snapshot()[source],
               "balanced": counters.balanced()}
    emit(orjson.dumps(summary))
    return summary


def check_file(source: str, path: Path, default_topic: str | None = None,
               emit: Callable[[bytes], None] = print, cdc_timezone: str = "UTC",
               fhir_patient_ids_are_mrns: bool = False, mrn_system: str | None = None) -> dict[str, Any]:
    return check_lines(source, Path(path).read_bytes().split(b"\n"), default_topic, emit, cdc_timezone,
                       fhir_patient_ids_are_mrns, mrn_system)
