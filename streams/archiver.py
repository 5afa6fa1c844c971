"""Archiver: every output topic -> Parquet, crash-safe, at-least-once.

Layout: <archive_dir>/<kind>/date=YYYY-MM-DD/part-<uuid>.parquet, kind one of ARCHIVE_SCHEMAS.
The date is the record's clinical/scoring time where it has one, else the Kafka timestamp (one beyond
the years 1-9999 clamped to them).

One row per archived thing (`kafka_*` columns are the record's own position on its topic):

    canonical   one row per event: CanonicalEvent fields (provenance as JSON) + event_id
                + arrival position partition/offset/idx
    late        the late event's fields + late_by_ms + partition/offset of its canonical message
    deadletter  key and value as the original bytes + the ww.* headers as columns
    features    snapshot_id, patient_id, scoring_ms, partition, offset, idx, trigger, features_json
    scores      the score record (point, trigger, trigger_event_id, features_hash, input_watermark as a
                struct), rationale as rationale_json
    alerts      the header fields + resource_json (the FHIR RiskAssessment)

Columns added later (idx, trigger, ... of features/scores; ward, status, original_alert_id, reason,
preliminary_basis of alerts and scores, incomplete_news2 of alerts) are nullable: part files written before
them read with nulls there.
    scores_shadow  the shadow (candidate) model's score records, in the scores shape
    gaps        FHIR subscription gap / missed-heartbeat records: subscription, gap_kind, record_json
    unreadable  an output record the archiver could not decode, or whose values do not fit its kind's
                schema: raw key/value + the error, so nothing leaves the system unrecorded

Durability: rows are buffered, written to a hidden `.part-*.tmp` file in the target directory,
fsynced and renamed (the directory fsynced, and a newly made date/kind directory's parent too); only
then are the consumed offsets committed. A crash therefore loses no
record (it is re-read) but may archive one twice; batch/rebuild.py removes those duplicates by id.
Readers glob `part-*.parquet`, so a left-over `.tmp` file is never read; an archiver starting removes
those older than an hour (their writer was killed mid-write).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.canonical import CanonicalEvent
from streams.commits import commit_offsets
from streams.topics import Topics
from wardwatch import observability
from wardwatch.observability import redact
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

# --- schemas: one fixed Arrow schema per kind, so every file of a kind reads the same ------------

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.binary()
_CODES = pa.list_(_S)  # e.g. an alert's preliminary_basis, a FHIR event's version_codes: LOINC codes

_EVENT_FIELDS = [
    ("patient_id", _S), ("code", _S), ("value", _F), ("unit", _S), ("effective_ms", _I),
    ("issued_ms", _I), ("status", _S), ("source", _S), ("fact_id", _S), ("version", _I),
    ("encounter_id", _S), ("code_system", _S), ("value_text", _S), ("provenance", _S), ("event_id", _S),
    # null on CDC events and in part files written before the column existed (read as null)
    ("version_codes", _CODES),
]
_KAFKA_FIELDS = [("kafka_partition", _I), ("kafka_offset", _I), ("kafka_timestamp_ms", _I)]
# a scoring point (docs/patient-state.md "Scoring points"): idx is its run's last event in the message
_POINT_FIELDS = [("snapshot_id", _S), ("patient_id", _S), ("scoring_ms", _I), ("partition", _I), ("offset", _I),
                 ("idx", _I), ("trigger", _S)]
_WATERMARK = pa.struct([("partition", _I), ("offset", _I), ("idx", _I), ("event_ms", _I)])

ARCHIVE_SCHEMAS: dict[str, pa.Schema] = {
    "canonical": pa.schema([*_EVENT_FIELDS, ("partition", _I), ("offset", _I), ("idx", _I),
                            ("kafka_timestamp_ms", _I)]),
    "late": pa.schema([*_EVENT_FIELDS, ("late_by_ms", _I), ("partition", _I), ("offset", _I), *_KAFKA_FIELDS]),
    "deadletter": pa.schema([
        ("key", _B), ("value", _B), ("reason", _S), ("detail", _S), ("exception", _S), ("stage", _S),
        ("source_topic", _S), ("source_partition", _I), ("source_offset", _I), ("other_headers_json", _S),
        *_KAFKA_FIELDS]),
    "features": pa.schema([*_POINT_FIELDS, ("features_json", _S), *_KAFKA_FIELDS]),
    "scores": pa.schema([*_POINT_FIELDS, ("trigger_event_id", _S), ("features_hash", _S),
                         ("input_watermark", _WATERMARK), ("model_version", _S), ("path", _S), ("probability", _F),
                         ("news2", _I), ("tier", _S), ("rationale_json", _S), ("preliminary_basis", _CODES),
                         *_KAFKA_FIELDS]),
    "alerts": pa.schema([("alert_id", _S), ("kind", _S), ("tier", _S), ("patient_id", _S), ("encounter_id", _S),
                         ("ward", _S), ("scoring_ms", _I), ("model_version", _S), ("path", _S), ("status", _S),
                         ("original_alert_id", _S), ("reason", _S), ("resource_json", _S),
                         ("preliminary_basis", _CODES), ("incomplete_news2", _CODES), *_KAFKA_FIELDS]),
    "unreadable": pa.schema([("topic", _S), ("key", _B), ("value", _B), ("error", _S), *_KAFKA_FIELDS]),
}
# the shadow (candidate) model's scores have the shape of the served scores
ARCHIVE_SCHEMAS["scores_shadow"] = ARCHIVE_SCHEMAS["scores"]
# FHIR subscription gaps / missed heartbeats: the record as JSON plus the fields analysts filter on
ARCHIVE_SCHEMAS["gaps"] = pa.schema([("subscription", _S), ("gap_kind", _S), ("record_json", _S), *_KAFKA_FIELDS])

_DEADLETTER_HEADERS = {
    "ww.reason": "reason", "ww.detail": "detail", "ww.exception": "exception", "ww.stage": "stage",
    "ww.source.topic": "source_topic", "ww.source.partition": "source_partition",
    "ww.source.offset": "source_offset",
}


def kinds_by_topic(topics: Topics) -> dict[str, str]:
    kinds = {topics.canonical: "canonical", topics.late: "late", topics.deadletter: "deadletter",
             topics.features: "features", topics.scores: "scores", topics.alerts: "alerts",
             topics.scores_shadow: "scores_shadow", topics.gaps: "gaps"}
    kinds.pop("", None)  # a Topics built without the newer topics
    return kinds


# --- pure: one Kafka record -> archive rows ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The parts of a Kafka message the archiver keeps (a plain value, so tests need no broker)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Row:
    kind: str
    date: str  # YYYY-MM-DD, the partition directory
    values: dict[str, Any]


def utc_date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def kafka_date(ms: int) -> str:
    """The date of a Kafka timestamp: any int64 a producer set, one beyond the years 1-9999 (a timestamp
    in microseconds, say) clamped to them. utc_date raised on it outside any row maker, so one such record
    stopped the archiver at every restart: no topic was archived until that record left retention."""
    try:
        return utc_date(ms)
    except (ValueError, OverflowError, OSError):
        return "0001-01-01" if ms < 0 else "9999-12-31"


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _text(value: Any) -> str | None:
    """Strings stay; other JSON values keep their JSON spelling (a tier sent as 2 becomes "2")."""
    return value if value is None or isinstance(value, str) else _json_text(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _kafka(rec: RawRecord) -> dict[str, int]:
    return {"kafka_partition": rec.partition, "kafka_offset": rec.offset, "kafka_timestamp_ms": rec.timestamp_ms}


def _event_columns(d: dict[str, Any]) -> dict[str, Any]:
    e = CanonicalEvent.from_dict(d)  # validates the fields and fills defaults
    row = e.to_dict()
    row["status"], row["source"] = e.status.value, e.source.value
    row["provenance"] = _json_text(e.provenance)
    row["version_codes"] = None if e.version_codes is None else list(e.version_codes)
    return row


def _canonical_rows(rec: RawRecord) -> list[Row]:
    events = orjson.loads(rec.value)
    if not isinstance(events, list):
        raise ValueError("canonical value is not a JSON array")
    rows = []
    for idx, d in enumerate(events):
        row = _event_columns(d) | {"partition": rec.partition, "offset": rec.offset, "idx": idx,
                                   "kafka_timestamp_ms": rec.timestamp_ms}
        rows.append(Row("canonical", utc_date(row["effective_ms"]), row))
    return rows


def _late_rows(rec: RawRecord) -> list[Row]:
    d = orjson.loads(rec.value)
    row = _event_columns(d["event"]) | {"late_by_ms": int(d["late_by_ms"]), "partition": _int(d.get("partition")),
                                        "offset": _int(d.get("offset"))} | _kafka(rec)
    return [Row("late", utc_date(row["effective_ms"]), row)]


def _deadletter_rows(rec: RawRecord) -> list[Row]:
    row: dict[str, Any] = {"key": rec.key, "value": rec.value}
    other = {}
    for name, raw in rec.headers:
        text = None if raw is None else raw.decode("utf-8", errors="replace")
        column = _DEADLETTER_HEADERS.get(name)
        if column is None:
            other[name] = text
        elif column in ("source_partition", "source_offset"):
            row[column] = int(text) if text and text.lstrip("-").isdigit() else None
        else:
            row[column] = text
    row["other_headers_json"] = _json_text(other) if other else None
    return [Row("deadletter", kafka_date(rec.timestamp_ms), row | _kafka(rec))]


def _snapshot_point(d: dict[str, Any]) -> dict[str, Any]:
    return {"snapshot_id": str(d["snapshot_id"]), "patient_id": str(d["patient_id"]),
            "scoring_ms": int(d["scoring_ms"]), "partition": _int(d.get("partition")), "offset": _int(d.get("offset")),
            "idx": _int(d.get("idx")), "trigger": _text(d.get("trigger"))}


def _watermark(value: Any) -> dict[str, int | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("input_watermark is not an object")
    return {name: _int(value.get(name)) for name in _WATERMARK.names}


def _features_rows(rec: RawRecord) -> list[Row]:
    d = orjson.loads(rec.value)
    if not isinstance(d.get("features"), dict):
        raise ValueError("features record has no features object")
    row = _snapshot_point(d) | {"features_json": _json_text(d["features"])} | _kafka(rec)
    return [Row("features", utc_date(row["scoring_ms"]), row)]


def _scores_rows(rec: RawRecord) -> list[Row]:
    d = orjson.loads(rec.value)
    row = _snapshot_point(d) | {
        "trigger_event_id": _text(d.get("trigger_event_id")), "features_hash": _text(d.get("features_hash")),
        "input_watermark": _watermark(d.get("input_watermark")),
        "model_version": _text(d.get("model_version")), "path": _text(d.get("path")),
        "probability": _float(d.get("probability")), "news2": _int(d.get("news2")), "tier": _text(d.get("tier")),
        "rationale_json": _json_text(d.get("rationale")), "preliminary_basis": d.get("preliminary_basis"),
    } | _kafka(rec)
    return [Row("scores", utc_date(row["scoring_ms"]), row)]


def _scores_shadow_rows(rec: RawRecord) -> list[Row]:
    return [Row("scores_shadow", row.date, row.values) for row in _scores_rows(rec)]


def _gaps_rows(rec: RawRecord) -> list[Row]:
    d = orjson.loads(rec.value)
    if not isinstance(d, dict):
        raise ValueError("gap record is not a JSON object")
    subscription = d.get("subscription") or (rec.key.decode("utf-8", errors="replace") if rec.key else None)
    row = {"subscription": _text(subscription), "gap_kind": _text(d.get("kind") or d.get("type")),
           "record_json": _json_text(d)} | _kafka(rec)
    return [Row("gaps", kafka_date(rec.timestamp_ms), row)]


def _alerts_rows(rec: RawRecord) -> list[Row]:
    d = orjson.loads(rec.value)
    h = d["header"]
    row = {"alert_id": str(h["alert_id"]), "kind": _text(h.get("kind")), "tier": _text(h.get("tier")),
           "patient_id": _text(h.get("patient_id")), "encounter_id": _text(h.get("encounter_id")),
           "ward": _text(h.get("ward")), "scoring_ms": _int(h.get("scoring_ms")),
           "model_version": _text(h.get("model_version")), "path": _text(h.get("path")),
           "status": _text(h.get("status")), "original_alert_id": _text(h.get("original_alert_id")),
           "reason": _text(h.get("reason")), "resource_json": _json_text(d.get("resource")),
           "preliminary_basis": h.get("preliminary_basis"),
           "incomplete_news2": h.get("incomplete_news2")} | _kafka(rec)
    date = utc_date(row["scoring_ms"]) if row["scoring_ms"] is not None else kafka_date(rec.timestamp_ms)
    return [Row("alerts", date, row)]


_ROW_MAKERS = {"canonical": _canonical_rows, "late": _late_rows, "deadletter": _deadletter_rows,
               "features": _features_rows, "scores": _scores_rows, "alerts": _alerts_rows,
               "scores_shadow": _scores_shadow_rows, "gaps": _gaps_rows}


# --- what Arrow can store: checked per row, so one badly typed record cannot fail a whole file ----

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT_INT = 2**53  # Arrow refuses a larger int in a float64 column (not exactly representable)


def _columns(kind: str, *types: pa.DataType) -> tuple[str, ...]:
    return tuple(f.name for f in ARCHIVE_SCHEMAS[kind] if f.type in types)


# kind -> its columns by Arrow type (every type a schema above uses is one of these)
_COLUMNS = {kind: (_columns(kind, _S), _columns(kind, _I), _columns(kind, _F), _columns(kind, _B),
                   _columns(kind, _WATERMARK), _columns(kind, _CODES)) for kind in ARCHIVE_SCHEMAS}


def _fits_int(v: Any) -> bool:
    return type(v) is int and _INT64_MIN <= v <= _INT64_MAX  # type(): a bool is refused too


_NULLABLE_STR = frozenset({str, type(None)})


def misfit_column(kind: str, values: dict[str, Any]) -> str | None:
    """The first column whose value the kind's Arrow schema cannot hold, or None when the row fits.
    Plain type checks, inlined: this runs for every archived row."""
    strings, ints, floats, binaries, watermarks, code_lists = _COLUMNS[kind]
    get = values.get
    for name in strings:  # orjson never decodes a lone surrogate, so every str encodes as UTF-8
        if type(get(name)) not in _NULLABLE_STR:
            return name
    for name in ints:
        v = get(name)
        if v is not None and (type(v) is not int or not _INT64_MIN <= v <= _INT64_MAX):
            return name
    for name in floats:
        v = get(name)
        if v is not None and type(v) is not float and not (type(v) is int and abs(v) <= _EXACT_FLOAT_INT):
            return name
    for name in binaries:
        v = get(name)
        if v is not None and type(v) is not bytes:
            return name
    for name in watermarks:
        v = get(name)
        if v is not None and not (isinstance(v, dict) and all(
                v.get(field) is None or _fits_int(v.get(field)) for field in _WATERMARK.names)):
            return name
    for name in code_lists:
        v = get(name)
        if v is not None and not (type(v) is list and all(type(code) is str for code in v)):
            return name
    return None


def rows_for(kind: str, rec: RawRecord) -> list[Row]:
    """The archive rows of one record; a record that cannot be decoded, or whose rows do not fit
    their Arrow schema, becomes one `unreadable` row."""
    try:
        rows = _ROW_MAKERS[kind](rec)
        for row in rows:
            column = misfit_column(row.kind, row.values)
            if column is not None:  # the type only: the value may be clinical
                raise TypeError(f"{row.kind} column {column}: a {type(row.values[column]).__name__} does not fit "
                                f"{ARCHIVE_SCHEMAS[row.kind].field(column).type}")
        return rows
    except Exception as exc:  # data error: keep the bytes, never stop the archive
        row = {"topic": rec.topic, "key": rec.key, "value": rec.value,
               "error": f"{type(exc).__name__}: {exc}"[:1000]} | _kafka(rec)
        return [Row("unreadable", kafka_date(rec.timestamp_ms), row)]


# --- durable files -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dirs(directory: Path) -> None:
    """mkdir -p, then fsync the parent of every directory it created: a new date directory's own entry
    lives in its parent, and without that fsync a power cut after the offsets were committed can take
    the directory, and every part file renamed into it, away."""
    created = []
    d = directory
    while not d.is_dir():
        created.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(created):
        _fsync_dir(d.parent)


def write_part(archive_dir: Path, kind: str, date: str, rows: list[dict[str, Any]]) -> Path:
    """Write one part file atomically: hidden temp file, fsync, rename, fsync the directory (and the
    parents of any directory created for it)."""
    directory = archive_dir / kind / f"date={date}"
    _make_durable_dirs(directory)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    table = pa.Table.from_pylist(rows, schema=ARCHIVE_SCHEMAS[kind])
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # a full disk fails mid-file: the half-written file would hold on to the space the
        # restarted archiver needs (nothing reads it; only a restart an hour on removes it)
        tmp.unlink(missing_ok=True)
        raise
    final = directory / name
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


STALE_TEMP_S = 3600.0  # a part is written in seconds: a temp file untouched this long lost its writer


def remove_stale_temp_files(archive_dir: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the temp files of writers killed mid-write (SIGKILL, OOM, power cut: no `except` ran), which
    nothing reads and which otherwise held their space for ever. Only old ones: another archiver sharing the
    volume may be writing one now (and if it were not, its rename fails and its records are re-read).
    Returns how many were removed."""
    cutoff = time.time() - older_than_s
    removed = 0
    for tmp in archive_dir.glob("*/date=*/.part-*.parquet.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def part_files(archive_dir: Path, kind: str) -> list[Path]:
    """Every finished part file of a kind, in a stable order (temp files are never listed)."""
    return sorted((archive_dir / kind).glob("date=*/part-*.parquet"))


# --- wiring: the consumer-group worker -----------------------------------------------------------


class Archiver:
    """Consumes topics.outputs in one consumer group and lands them in Parquet.

    `flush_rows` / `flush_interval_s` bound the rows per file and how long a row waits in memory.
    """

    def __init__(self, settings: Settings, topics: Topics, *, flush_rows: int = 10_000,
                 flush_interval_s: float = 5.0, batch_size: int = 1000):
        from confluent_kafka import Consumer

        self.archive_dir = settings.archive_dir
        if self.archive_dir.is_dir() and (stale := remove_stale_temp_files(self.archive_dir)):
            log.warning("removed %d temp file(s) an archiver killed mid-write left behind", stale)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self._kinds = kinds_by_topic(topics)
        self._buffer: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._buffered_rows = 0
        self._oldest_buffered: float | None = None
        self._pending_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        self.seen_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset after the last seen
        self.consumed: dict[str, int] = {kind: 0 for kind in self._kinds.values()}
        # records of each kind kept as `unreadable` rows (undecodable, or not fitting the kind's columns)
        self.unreadable: dict[str, int] = {kind: 0 for kind in self._kinds.values()}
        self.files_written = 0
        observability.expose_counters("archiver", self.counters)  # /metrics, read at scrape time
        self._group_id = f"{settings.group_prefix}.archiver"
        self._consumer = Consumer({
            **settings.kafka_client_config("archiver"),
            "group.id": self._group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(settings.heartbeat_interval_s * 1000),
        })
        self.assigned = threading.Event()
        # the partitions it holds, for its consumption watchdog's thread (replaced, never mutated)
        self.partitions: frozenset[tuple[str, int]] = frozenset()
        # flush before partitions move to another member, so it starts after our durable rows
        self._callback_error: Exception | None = None
        self._consumer.subscribe(list(self._kinds), on_assign=self._on_assign, on_revoke=self._on_revoke)

    @property
    def group_id(self) -> str:
        return self._group_id

    def _on_assign(self, consumer, partitions) -> None:
        self.partitions = self.partitions | {(tp.topic, tp.partition) for tp in partitions}
        self.assigned.set()

    def poll_once(self, timeout_s: float = 1.0) -> int:
        """Consume up to batch_size records, buffer their rows, flush when due. Returns records seen."""
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException

        messages = self._consumer.consume(num_messages=self.batch_size, timeout=timeout_s)
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise error
        seen = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("archiver consume error: %s", err)
                continue
            ts_type, ts = msg.timestamp()
            rec = RawRecord(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                            timestamp_ms=int(time.time() * 1000) if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                            key=msg.key(), value=msg.value(), headers=tuple(msg.headers() or ()))
            kind = self._kinds[rec.topic]
            for row in rows_for(kind, rec):
                self._buffer.setdefault((row.kind, row.date), []).append(row.values)
                self._buffered_rows += 1
                if row.kind == "unreadable":
                    self.unreadable[kind] += 1
            if self._oldest_buffered is None:
                self._oldest_buffered = time.monotonic()
            self._pending_offsets[(rec.topic, rec.partition)] = rec.offset + 1
            self.seen_offsets[(rec.topic, rec.partition)] = rec.offset + 1
            self.consumed[kind] += 1
            seen += 1
        if self._flush_due():
            self.flush()
        return seen

    def counters(self) -> dict[str, Any]:
        """Records consumed and kept as unreadable, per kind, and part files written: on /metrics as
        wardwatch_counter_total{service="archiver", counter="unreadable.<kind>"} and so on."""
        return {"consumed": dict(self.consumed), "unreadable": dict(self.unreadable),
                "files_written": self.files_written}

    def _flush_due(self) -> bool:
        if self._oldest_buffered is None:
            return False
        return (self._buffered_rows >= self.flush_rows
                or time.monotonic() - self._oldest_buffered >= self.flush_interval_s)

    def flush(self) -> None:
        """Make every buffered row durable, then commit the offsets of the records they came from."""
        self._write_buffer()
        if self._pending_offsets:
            self._commit()
            self._pending_offsets.clear()

    def _write_buffer(self) -> None:
        for (kind, date), rows in sorted(self._buffer.items()):
            write_part(self.archive_dir, kind, date, rows)
            self.files_written += 1
        self._buffer.clear()
        self._buffered_rows = 0
        self._oldest_buffered = None

    def _commit(self) -> None:
        commit_offsets(self._consumer, self._pending_offsets, log)

    def _on_revoke(self, consumer, partitions) -> None:
        self.partitions = self.partitions - {(tp.topic, tp.partition) for tp in partitions}
        # runs inside consume(): an exception here would surface as a bare KafkaError (not an
        # Exception), so keep it and raise it from poll_once instead
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - re-raised by poll_once
            self._callback_error = exc

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.poll_once()
            self.flush()
        except Exception as exc:
            # e.g. a full or read-only archive volume: stop loudly; the buffered records' offsets are not
            # committed, so the restarted archiver reads them again
            # (the message scrubbed: a conversion error may quote a row's value, a patient id)
            log.critical("archiver stopped (%s: %s); the records not yet written are re-read after the restart",
                         type(exc).__name__, redact(str(exc)))
            raise
        finally:
            self.close()

    def drain(self, expected: dict[str, int] | None = None, idle_s: float = 3.0,
              deadline_s: float = 60.0) -> dict[str, int]:
        """Consume until `expected` records per kind were seen (or, without it, until nothing
        arrived for idle_s after joining the group), or the deadline passes; flush and return the
        records seen per kind."""
        start = last_seen = time.monotonic()
        while time.monotonic() - start < deadline_s:
            if self.poll_once(timeout_s=0.5) or not self.assigned.is_set():
                last_seen = time.monotonic()
            if expected is not None and all(self.consumed.get(k, 0) >= n for k, n in expected.items()):
                break
            if expected is None and time.monotonic() - last_seen >= idle_s:
                break
        self.flush()
        return dict(self.consumed)

    def close(self, timeout_s: float = 15.0) -> None:
        """Leave the group. librdkafka's close can block for ever while the group is still being joined (an
        interrupt moments after start): it gets `timeout_s` on a helper thread, then the caller goes on to
        stop the rest (the demo's services and broker) instead of hanging with them all still running; the
        broker drops the member after its session timeout. Flushed files are not at stake: flush() wrote them."""
        closing = threading.Thread(target=self._consumer.close, name="archiver-close", daemon=True)
        closing.start()
        closing.join(timeout_s)
        if closing.is_alive():
            log.warning("the archiver's consumer did not close within %.0f s; going on without it", timeout_s)
