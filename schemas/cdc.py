"""Debezium PostgreSQL change events (JSON converter) -> canonical events. Pure; never raises.

Input: one Kafka message of a `<cdc prefix>.<table>` topic. Key and value may be wrapped as
`{"schema": ..., "payload": ...}` (schemas.enable=true) or bare. Output: one Outcome.

Mapping (the table -> column -> LOINC declaration lives in schemas.codes.CDC_TABLES):
- One wide row becomes one CanonicalEvent per non-null mapped column.
  fact_id = "cdc:<table>:<pk>:<code>", version = source.lsn, effective = the time column,
  issued = source.ts_ms (commit time), status final.
- `c`, `r` (snapshot read): the row's values. `u`: a new version of every column; a column that is
  null after the update retracts its fact (entered-in-error), unless `before` shows it was null already.
- `d`: every mapped code of the row is retracted. The patient comes from `before` or else the key;
  the clinical time from `before` or else the commit time.
- Tombstone (null value) -> Control("tombstone"); `m` (logical message), `t` (truncate) and a row with no
  mapped value -> Ignored.
- On air is a fact: a null oxygen flow with on_supplemental_oxygen false is an O2 flow of 0.0.
- An unchanged TOASTed column (`__debezium_unavailable_value`) is skipped: it carries no new value.

Columns are decoded by the Debezium semantic type in the schema when present (MicroTimestamp,
Timestamp, NanoTimestamp, ZonedTimestamp, Date, Decimal with `scale`, VariableScaleDecimal) and
leniently without a schema (numbers, numeric strings, ISO strings, µs integers for the time column).

**One bad value rejects the whole message.** A value of the wrong type, NaN/Infinity, undecodable
(BAD_VALUE) or outside schemas.codes plausible range (IMPLAUSIBLE_VALUE) sends the original message
to the dead-letter topic; no event of that row is published. Half a row would look like a complete
measurement downstream, and the dead-lettered original can be replayed whole once fixed.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import orjson

from schemas.canonical import CanonicalEvent, Source, Status
from schemas.codes import (ACVPU_ORDINAL, CDC_TABLES, CODES, CONSCIOUSNESS, O2_FLOW, TableMapping,
                          to_canonical_unit)
from schemas.deadletter import Reason
from schemas.ingest_outcome import Control, Ignored, Outcome, Parsed, Reject, rejected
from schemas.ingest_values import acvpu_letter, checked_time_ms, finite_number, iso_to_ms, plausible

UNAVAILABLE = "__debezium_unavailable_value"

# Debezium / Kafka Connect semantic type names
DECIMAL = "org.apache.kafka.connect.data.Decimal"
VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
MICRO_TIMESTAMP = "io.debezium.time.MicroTimestamp"
NANO_TIMESTAMP = "io.debezium.time.NanoTimestamp"
ZONED_TIMESTAMP = "io.debezium.time.ZonedTimestamp"
TIMESTAMP_MS = ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp")
DATE_DAYS = ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date")
MAX_DECIMAL_SCALE = 1000  # PostgreSQL numeric scale range is [-1000, 1000]

# the table's "on air" column: (flow column, on-oxygen flag column)
ON_AIR_COLUMNS = {"vital_signs": ("oxygen_flow_rate_lpm", "on_supplemental_oxygen")}

_INTEGER = re.compile(r"-?\d+")
_MISSING_PATIENT_HINT = ("delete without patient_id: set REPLICA IDENTITY FULL on the table "
                         "or include patient_id in the connector's message.key.columns")


def parse_cdc(topic: str, key: bytes | None, value: bytes | None, *, partition: int, offset: int,
              cdc_topic_prefix: str) -> Outcome:
    try:
        return _parse(topic, key, value, partition, offset, cdc_topic_prefix)
    except Reject as r:
        return rejected(r.reason, r.detail, r.exception)
    except orjson.JSONDecodeError as exc:
        return rejected(Reason.MALFORMED_JSON, "key or value is not UTF-8 JSON", type(exc).__name__)
    except Exception as exc:  # a bug: keep the message for replay after the fix
        return rejected(Reason.INTERNAL_ERROR, "unexpected error parsing a CDC message", type(exc).__name__)


def _parse(topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int,
           prefix: str) -> Outcome:
    table = topic[len(prefix) + 1:] if topic.startswith(prefix + ".") else None
    if value is None:
        return Control("tombstone", {"table": table})
    envelope, value_schema = _unwrap(orjson.loads(value))
    key_row, _ = _unwrap(orjson.loads(key)) if key else ({}, None)
    if not isinstance(envelope, dict) or "op" not in envelope:
        raise Reject(Reason.INVALID_STRUCTURE, "value is not a Debezium change event envelope")
    if not isinstance(key_row, dict):
        key_row = {}
    op = envelope["op"]
    if op == "m":
        return Ignored("message")
    if op == "t":
        return Ignored("truncate")
    if op not in ("c", "r", "u", "d"):
        raise Reject(Reason.INVALID_STRUCTURE, f"unknown op {str(op)[:10]!r}")
    source = envelope.get("source") if isinstance(envelope.get("source"), dict) else {}
    table = table or source.get("table")
    mapping = CDC_TABLES.get(table) if isinstance(table, str) else None
    if mapping is None:
        raise Reject(Reason.UNKNOWN_TABLE, f"no mapping for table {str(table)[:80]!r}")
    change = _Change(envelope, source, key_row, _column_schemas(value_schema), mapping,
                     topic, partition, offset)
    events = change.retract_row() if op == "d" else change.row_events()
    return Parsed(events) if events else Ignored("no_values")  # e.g. only unchanged TOASTed columns


class _Change:
    """One decoded change event; builds its canonical events."""

    def __init__(self, envelope: dict, source: dict, key_row: dict, schemas: dict[str, dict],
                 mapping: TableMapping, topic: str, partition: int, offset: int):
        self.op = envelope["op"]
        self.before = envelope.get("before") if isinstance(envelope.get("before"), dict) else None
        self.after = envelope.get("after") if isinstance(envelope.get("after"), dict) else None
        self.key_row = key_row
        self.schemas = schemas
        self.mapping = mapping
        self.lsn = _int_field(source.get("lsn"), "source.lsn")
        ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
        self.issued_ms = _int_field(ts_ms, "source.ts_ms")
        row = self.after if self.op != "d" else self.before
        self.pk = _text((row or {}).get(mapping.pk_column)) or _text(key_row.get(mapping.pk_column))
        if self.pk is None:
            raise Reject(Reason.INVALID_STRUCTURE, f"no primary key column {mapping.pk_column!r} in row or key")
        self.provenance = {
            "table": mapping.table, "pk": self.pk, "lsn": self.lsn, "txId": source.get("txId"),
            "source_ts_ms": self.issued_ms, "topic": topic, "partition": partition, "offset": offset,
            "op": self.op, "snapshot": _is_snapshot(source.get("snapshot")),
            "commit_lsn": _commit_lsn(source.get("sequence")),
        }

    # --- c / r / u ---------------------------------------------------------------------------

    def row_events(self) -> list[CanonicalEvent]:
        row = self.after
        if row is None:
            raise Reject(Reason.INVALID_STRUCTURE, f"op {self.op!r} without an 'after' row")
        patient = self._patient(row)
        if patient is None:
            raise Reject(Reason.MISSING_PATIENT, f"row has no {self.mapping.patient_column}")
        effective_ms = self._time(row)
        if effective_ms is None:
            raise Reject(Reason.MISSING_TIME, f"row has no {self.mapping.time_column}")
        encounter = _text(row.get(self.mapping.encounter_column)) if self.mapping.encounter_column else None

        events = []
        for column, (code, value, text) in self._values(row).items():
            if value is not None:
                events.append(self._event(patient, encounter, code, value, text, effective_ms, Status.FINAL))
            elif self.op == "u" and self._was_set_before(column):
                events.append(self._event(patient, encounter, code, None, None, effective_ms,
                                          Status.ENTERED_IN_ERROR))
        old_patient = self._patient(self.before) if self.before else None
        if self.op == "u" and old_patient is not None and old_patient != patient:
            # the row moved to another patient: its facts leave the old patient's record
            events += self._retractions(old_patient, None, self._time(self.before) or effective_ms)
        return events

    def _was_set_before(self, column: str) -> bool:
        """Without a full `before` (REPLICA IDENTITY DEFAULT) assume it was set: a retraction of an
        unknown fact is harmless downstream, a missed one leaves a stale value live."""
        return self.before is None or column not in self.before or self.before[column] is not None

    def _values(self, row: dict) -> dict[str, tuple[str, float | None, str | None]]:
        """column -> (code, canonical value or None when null, text); unavailable columns omitted."""
        values = {}
        for column, (code, _unit) in self.mapping.columns.items():
            raw = row.get(column)
            if raw == UNAVAILABLE:
                continue
            values[column] = (code, *self._decode_value(code, raw, column))
        on_air = ON_AIR_COLUMNS.get(self.mapping.table)
        if on_air and on_air[0] in values and values[on_air[0]][1] is None:
            if _decode_bool(row.get(on_air[1]), on_air[1]) is False:
                values[on_air[0]] = (O2_FLOW, 0.0, None)
        return values

    def _decode_value(self, code: str, raw: Any, column: str) -> tuple[float | None, str | None]:
        if raw is None:
            return None, None
        if code == CONSCIOUSNESS:
            letter = acvpu_letter(raw, column)
            return float(ACVPU_ORDINAL[letter]), letter
        value = to_canonical_unit(code, _decode_number(raw, self.schemas.get(column), column),
                                  self.mapping.columns[column][1])
        if value is None:
            raise Reject(Reason.UNKNOWN_UNIT, f"{column}: no conversion from the mapped unit")
        return plausible(code, value, column), None

    # --- d -----------------------------------------------------------------------------------

    def retract_row(self) -> list[CanonicalEvent]:
        before = self.before or {}
        patient = self._patient(before) or self._patient(self.key_row)
        if patient is None:
            raise Reject(Reason.MISSING_PATIENT, _MISSING_PATIENT_HINT)
        encounter = _text(before.get(self.mapping.encounter_column)) if self.mapping.encounter_column else None
        # under REPLICA IDENTITY DEFAULT `before` has no time: the commit time stands in
        effective_ms = self._time(before) if self.mapping.time_column in before else None
        return self._retractions(patient, encounter, effective_ms or self.issued_ms)

    def _retractions(self, patient: str, encounter: str | None, effective_ms: int) -> list[CanonicalEvent]:
        codes = dict.fromkeys(code for code, _unit in self.mapping.columns.values())
        return [self._event(patient, encounter, code, None, None, effective_ms, Status.ENTERED_IN_ERROR)
                for code in codes]

    # --- shared ------------------------------------------------------------------------------

    def _patient(self, row: dict) -> str | None:
        return _text(row.get(self.mapping.patient_column))

    def _time(self, row: dict) -> int | None:
        column = self.mapping.time_column
        raw = row.get(column)
        if raw is None or raw == UNAVAILABLE:
            return None
        return _decode_time_ms(raw, self.schemas.get(column), column)

    def _event(self, patient: str, encounter: str | None, code: str, value: float | None,
               text: str | None, effective_ms: int, status: Status) -> CanonicalEvent:
        return CanonicalEvent(
            patient_id=patient, code=code, value=value, unit=CODES[code].unit,
            effective_ms=effective_ms, issued_ms=self.issued_ms, status=status, source=Source.CDC,
            fact_id=f"cdc:{self.mapping.table}:{self.pk}:{code}", version=self.lsn,
            encounter_id=encounter, value_text=text, provenance=self.provenance,
        )


# --- envelope helpers ----------------------------------------------------------------------------


def _unwrap(doc: Any) -> tuple[Any, dict | None]:
    """(payload, schema) of a schema-wrapped message, or (doc, None) when bare."""
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        schema = doc["schema"] if isinstance(doc["schema"], dict) else None
        return doc["payload"], schema
    return doc, None


def _column_schemas(value_schema: dict | None) -> dict[str, dict]:
    """column -> field schema, from the envelope's `after` (or `before`) struct."""
    if not value_schema:
        return {}
    fields = value_schema.get("fields")
    for name in ("after", "before"):
        for f in fields if isinstance(fields, list) else []:
            if isinstance(f, dict) and f.get("field") == name and isinstance(f.get("fields"), list):
                columns = [c for c in f["fields"] if isinstance(c, dict) and isinstance(c.get("field"), str)]
                return {c["field"]: c for c in columns}
    return {}


def _text(raw: Any) -> str | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, str) and raw.strip() and raw != UNAVAILABLE:
        return raw.strip()
    return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int_field(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or raw is None:
        raise Reject(Reason.INVALID_STRUCTURE, f"{what} missing")
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        raw = int(raw)
    if isinstance(raw, int):
        if not INT64_MIN <= raw <= INT64_MAX:  # Kafka Connect int64: anything wider cannot be real
            raise Reject(Reason.BAD_VALUE, f"{what} is outside the int64 range")
        return raw
    raise Reject(Reason.INVALID_STRUCTURE, f"{what} is not an integer")


def _is_snapshot(raw: Any) -> bool:
    """`source.snapshot` is a string enum (true, first, last, incremental, false, ...) or a boolean."""
    if isinstance(raw, str):
        return raw.strip().lower() not in ("", "false")
    return bool(raw)


def _commit_lsn(sequence: Any) -> int | None:
    """`source.sequence` is a JSON array inside a string: [last commit lsn, current lsn]."""
    try:
        items = orjson.loads(sequence) if isinstance(sequence, str) else sequence
        lsn = int(items[0]) if isinstance(items, list) and items and items[0] is not None else None
        return lsn if lsn is None or INT64_MIN <= lsn <= INT64_MAX else None
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None


# --- column decoding -----------------------------------------------------------------------------


def _decode_number(raw: Any, schema: dict | None, what: str) -> float:
    name = schema.get("name") if isinstance(schema, dict) else None
    if name == DECIMAL and isinstance(raw, str):
        parameters = schema.get("parameters") if isinstance(schema.get("parameters"), dict) else {}
        scale = parameters.get("scale", 0)
        if not _INTEGER.fullmatch(str(scale)):
            raise Reject(Reason.BAD_VALUE, f"{what}: Decimal schema without an integer scale")
        return _unscaled(raw, int(str(scale)), what)
    if name == VARIABLE_SCALE_DECIMAL or (isinstance(raw, dict) and {"scale", "value"} <= raw.keys()):
        if not isinstance(raw, dict) or not isinstance(raw.get("value"), str):
            raise Reject(Reason.BAD_VALUE, f"{what}: malformed VariableScaleDecimal")
        return _unscaled(raw["value"], int(finite_number(raw.get("scale"), what)), what)
    try:
        return finite_number(raw, what)
    except Reject:
        if isinstance(raw, str) and schema is None:
            raise Reject(Reason.BAD_VALUE, f"{what}: not a number (a precise decimal without a schema "
                                           "needs decimal.handling.mode=double or string)") from None
        raise


def _unscaled(b64: str, scale: int, what: str) -> float:
    """Kafka Connect Decimal: base64 of the big-endian two's-complement unscaled integer."""
    if abs(scale) > MAX_DECIMAL_SCALE:  # 10**scale of a hostile scale would hang the worker
        raise Reject(Reason.BAD_VALUE, f"{what}: decimal scale out of range")
    try:
        unscaled = int.from_bytes(base64.b64decode(b64, validate=True), "big", signed=True)
    except (binascii.Error, ValueError) as exc:
        raise Reject(Reason.BAD_VALUE, f"{what}: undecodable decimal") from exc
    return unscaled / 10**scale


def _decode_time_ms(raw: Any, schema: dict | None, what: str) -> int:
    name = schema.get("name") if isinstance(schema, dict) else None
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        raw = int(raw)
    if isinstance(raw, str):
        return iso_to_ms(raw, what)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise Reject(Reason.BAD_VALUE, f"{what}: not a time")
    n = int(finite_number(raw, what))
    if name in (None, MICRO_TIMESTAMP):  # without a schema an integer time is µs (time.precision.mode adaptive)
        ms = n // 1000
    elif name in TIMESTAMP_MS:
        ms = n
    elif name == NANO_TIMESTAMP:
        ms = n // 1_000_000
    elif name in DATE_DAYS:
        ms = n * 86_400_000
    else:
        raise Reject(Reason.BAD_VALUE, f"{what}: unsupported time type {str(name)[:60]}")
    return checked_time_ms(ms, what)


def _decode_bool(raw: Any, what: str) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "t", "f"):
        return raw.strip().lower() in ("true", "t")
    raise Reject(Reason.BAD_VALUE, f"{what}: not a boolean")
