"""Debezium PostgreSQL change events (JSON converter) -> canonical events. Pure; never raises.

Input: one Kafka message of a `<cdc prefix>.<table>` topic. Key and value may be wrapped as
`{"schema": ..., "payload": ...}` (schemas.enable=true) or bare. Output: one Outcome.

The table -> shape -> columns declaration lives in schemas.codes.CDC_TABLES; this module interprets
it and never names a table. Common to every shape:
- version = source.lsn; provenance = table, pk, lsn, txId, source.ts_ms, Kafka topic/partition/offset,
  op, snapshot flag and the commit lsn of `source.sequence`.
- `c`, `r` (snapshot read): the row's facts. `u`: a new version of each fact (updates supersede); a
  fact whose column is null after the update is retracted (entered-in-error) unless `before` shows it
  was null already (without a full `before`, REPLICA IDENTITY DEFAULT, it is assumed set: a retraction
  of an unknown fact is harmless downstream, a missed one leaves a stale value live). An update that
  moves the row to another patient retracts the row's facts from the old patient.
- `d`: the row's facts are retracted. The patient comes from `before` or else the key (Debezium keys
  every topic by patient_id); the clinical time from `before` or else the commit time.
- Tombstone (null value) -> Control("tombstone"); `m` (logical message), `t` (truncate) and a row with no
  fact -> Ignored.
- An unchanged TOASTed column (`__debezium_unavailable_value`) is skipped: it carries no new value.
- A mapped column missing from the `after` row altogether (Debezium sends every captured column, null or
  not: it was renamed or dropped, or the connector excludes it) is unknown, not null: no event and no
  retraction for it, counted in Parsed.skipped (Ignored.detail["skipped"]) as `missing_column:<column>`.
  Without the time, patient or key column the row is still rejected; an absent on-air flow still lets the
  flag say air or oxygen; an absent encounter class leaves the admission without it.

Shapes:
- TableMapping (wide, vital_signs): one event per non-null mapped column, fact id
  cdc:<table>:<pk>:<code>, effective = the time column, issued = commit time (source.ts_ms).
  On air is a fact: a null oxygen flow with the on-oxygen flag false is an O2 flow of 0.0. So is
  oxygen: a null flow with the flag true is a SUPPLEMENTAL_O2 fact of 1.0 (on oxygen, flow not charted;
  NEWS2 scores it as oxygen, no flow is invented), fact id cdc:<table>:<pk>:supplemental-oxygen. An
  update that no longer says so retracts it, and so does a delete (or a move to another patient) of a
  row that said so, or whose `before` cannot tell.
- LongTable (lab_results): one row = one result. The code column goes through codes.canonical_code
  (aliases accepted); a code wardwatch does not use -> Ignored("unmapped_code"). The value is
  converted from the unit column to the code's canonical unit (no conversion -> UNKNOWN_UNIT; a null or
  absent unit is the canonical unit only for a code reported in one unit, else UNKNOWN_UNIT:
  codes.MULTI_UNIT_CODES).
  fact id cdc:<table>:<pk>:<canonical code>, effective = collection time, issued = the result time
  (labs are available hours after collection; the commit time only when the column is missing); an
  update (an amendment, a retraction, a preliminary result made final) is issued no earlier than its
  commit, max(result time, commit): it may keep the first result's time (under REPLICA IDENTITY DEFAULT
  nothing shows whether it did), and the offline as-of joins (training) must not see it before it existed,
  status from the status column (entered-in-error retracts, and so does cancelled: not started or not
  completed; a row created cancelled is Ignored("cancelled"), nothing earlier to retract). An update
  that changes the code retracts the old code's fact. A delete whose `before` lacks the code retracts
  every code the table may carry.
- ContextTable (encounters, patients): one CONTEXT event per declared fact present in the row
  (value None and the payload in value_text; birth year as value, never the date). A per-time fact
  (LOCATION) is named by its effective time, so each transfer is its own fact and a redelivery
  dedupes; an update emits it only when its value changed (or `before` cannot tell). An update and a
  snapshot read state it at the row's update time (the admission time when that is null): a snapshot
  row shows only the latest ward, which held from the row's last change, not from admission, so a
  re-snapshot restates the transfer's fact (or, when the last change was e.g. the discharge, states
  the same ward from then) and never rewrites the ward an earlier fact gave. Deletes retract
  the facts with a fixed id (admission, discharge, sex, birth year): per-time facts cannot be
  enumerated from a `before` row, which holds at most the latest ward, so a deleted encounter's
  location facts stay (downstream, its discharge retraction and missing admission say it is gone).

Columns are decoded by the Debezium semantic type in the schema when present (MicroTimestamp,
Timestamp, NanoTimestamp, ZonedTimestamp, Date, Decimal with `scale`, VariableScaleDecimal) and
leniently without a schema: numbers, numeric strings (decimal.handling.mode double / string), ISO
strings, µs integers for timestamp columns and day integers for date columns. A naive timestamp (a
`timestamp` column: Timestamp, MicroTimestamp, NanoTimestamp, an integer without a schema, an ISO string
without an offset) is the database's wall-clock reading, read in `cdc_timezone` (settings.cdc_timezone,
default UTC; DST: ingest_values.wall_to_utc_ms); a ZonedTimestamp (`timestamptz`) is an instant. A measurement's own time
column (measured_at, collected_at) holding a date alone (a `date` column, an ISO date) is missing_time:
it cannot be placed in an hourly window, and read as midnight UTC it was.

**One bad value rejects the whole message.** A value of the wrong type, NaN/Infinity, undecodable
(BAD_VALUE), in a unit with no conversion (UNKNOWN_UNIT) or outside schemas.codes plausible range
(IMPLAUSIBLE_VALUE) sends the original message to the dead-letter topic; no event of that row is
published. Half a row would look like a complete measurement downstream, and the dead-lettered
original can be replayed whole once fixed.
"""

from __future__ import annotations

import base64
import binascii
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from schemas.canonical import LOINC, CanonicalEvent, Source, Status, new_event
from schemas.codes import (ACVPU_ORDINAL, CDC_TABLES, CODES, CONSCIOUSNESS, CONTEXT, CONTEXT_CODES, O2_FLOW,
                          SUPPLEMENTAL_O2, WARDWATCH, CdcMapping, ContextFact, ContextTable, LongTable, TableMapping, canonical_code,
                          missing_unit_detail, to_canonical_unit)
from schemas.deadletter import Reason
from schemas.ingest_outcome import Control, Ignored, Outcome, Parsed, Reject, rejected
from schemas.ingest_values import (reject_future_measurements, acvpu_letter, checked_time_ms, date_only_detail,
                                   finite_number, iso_to_ms, measurement_time_ms, plausible, wall_to_utc_ms,
                                   INTEGER_TEXT, undecodable_json)

UNAVAILABLE = "__debezium_unavailable_value"

# Debezium / Kafka Connect semantic type names
DECIMAL = "org.apache.kafka.connect.data.Decimal"
VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
MICRO_TIMESTAMP = "io.debezium.time.MicroTimestamp"
NANO_TIMESTAMP = "io.debezium.time.NanoTimestamp"
TIMESTAMP_MS = ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp")
DATE_DAYS = ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date")
MAX_DECIMAL_SCALE = 1000  # PostgreSQL numeric scale range is [-1000, 1000]
BIRTH_YEARS = (1880, 2100)  # a birth date outside is a unit mix-up, not a patient

# the status column of a long table (FHIR Observation.status vocabulary)
STATUSES = {s.value: s for s in (Status.PRELIMINARY, Status.FINAL, Status.AMENDED, Status.CORRECTED,
                                 Status.ENTERED_IN_ERROR)}
# not started or not completed: a valid state, not bad input; what the row said before no longer counts, so
# it retracts as entered-in-error does (the FHIR parser reads a cancelled Observation the same way)
CANCELLED = "cancelled"
STATUSES[CANCELLED] = Status.ENTERED_IN_ERROR

_INTEGER = INTEGER_TEXT  # ASCII digits only: int() reads "8_8" and any script's digits
_MISSING_PATIENT_HINT = ("delete without patient_id: set REPLICA IDENTITY FULL on the table "
                         "or include patient_id in the connector's message.key.columns")


def parse_cdc(topic: str, key: bytes | None, value: bytes | None, *, partition: int, offset: int,
              cdc_topic_prefix: str, cdc_timezone: str = "UTC") -> Outcome:
    """cdc_timezone: the IANA zone of the database's zone-less `timestamp` columns (settings.cdc_timezone)."""
    try:
        return _parse(topic, key, value, partition, offset, cdc_topic_prefix,
                      None if cdc_timezone == "UTC" else ZoneInfo(cdc_timezone))
    except Reject as r:
        return rejected(r.reason, r.detail, r.exception)
    except orjson.JSONDecodeError as exc:
        return rejected(*undecodable_json(exc, "key or value"), type(exc).__name__)
    except Exception as exc:  # a bug: keep the message for replay after the fix
        return rejected(Reason.INTERNAL_ERROR, "unexpected error parsing a CDC message", type(exc).__name__)


def _parse(topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int,
           prefix: str, zone: ZoneInfo | None = None) -> Outcome:
    table = topic[len(prefix) + 1:] if topic.startswith(prefix + ".") else None
    if value is None:
        return Control("tombstone", {"table": table})
    envelope, value_schema = _unwrap(_load_value(topic, value))
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
    change = _SHAPES[type(mapping)](envelope, source, key_row, _column_schemas(value_schema, mapping.table),
                                    mapping, topic, partition, offset, zone)
    events = change.retract_row() if op == "d" else change.row_events()
    if isinstance(events, Ignored):
        return events
    reject_future_measurements(events, change.issued_ms)  # the commit time: the database's clock
    if not events:  # e.g. only unchanged TOASTed columns
        return Ignored("no_values", {"skipped": change.skipped} if change.skipped else {})
    return Parsed(events, skipped=change.skipped)


class _Change:
    """One decoded change event of any table shape: what every shape shares."""

    def __init__(self, envelope: dict, source: dict, key_row: dict, schemas: dict[str, dict],
                 mapping: CdcMapping, topic: str, partition: int, offset: int, zone: ZoneInfo | None = None):
        self.op = envelope["op"]
        self.zone = zone  # of naive timestamps (None: UTC)
        self.before = envelope.get("before") if isinstance(envelope.get("before"), dict) else None
        self.after = envelope.get("after") if isinstance(envelope.get("after"), dict) else None
        self.key_row = key_row
        self.schemas = schemas
        self.mapping = mapping
        self.skipped: dict[str, int] = {}  # mapped columns the `after` row lacks, as missing_column:<column>
        self.absent: set[str] = set()  # those columns
        self.lsn = _int_field(source.get("lsn"), "source.lsn")
        ts_ms = source.get("ts_ms", envelope.get("ts_ms"))
        self.issued_ms = _int_field(ts_ms, "source.ts_ms")
        row = self.after if self.op != "d" else self.before
        self.pk = _text((row or {}).get(mapping.pk_column)) or _text(key_row.get(mapping.pk_column))
        if self.pk is None:
            raise Reject(Reason.INVALID_STRUCTURE, f"no primary key column {mapping.pk_column!r} in row or key")
        self.fact_prefix = f"cdc:{mapping.table}:{self.pk}:"  # + code: the row's fact ids
        self.provenance = {
            "table": mapping.table, "pk": self.pk, "lsn": self.lsn, "txId": source.get("txId"),
            "source_ts_ms": self.issued_ms, "topic": topic, "partition": partition, "offset": offset,
            "op": self.op, "snapshot": _is_snapshot(source.get("snapshot")),
            "commit_lsn": _commit_lsn(source.get("sequence")),
        }

    def row_events(self) -> list[CanonicalEvent] | Ignored:  # c / r / u
        raise NotImplementedError

    def retract_row(self) -> list[CanonicalEvent] | Ignored:  # d
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------

    def _after_row(self) -> tuple[dict, str]:
        """The row of a c / r / u and its patient."""
        if self.after is None:
            raise Reject(Reason.INVALID_STRUCTURE, f"op {self.op!r} without an 'after' row")
        patient = self._patient(self.after)
        if patient is None:
            raise Reject(Reason.MISSING_PATIENT, f"row has no {self.mapping.patient_column}")
        return self.after, patient

    def _deleted_row(self) -> tuple[dict, str]:
        """The `before` row of a d (maybe only its key columns) and its patient."""
        before = self.before or {}
        patient = self._patient(before) or self._patient(self.key_row)
        if patient is None:
            raise Reject(Reason.MISSING_PATIENT, _MISSING_PATIENT_HINT)
        return before, patient

    def _moved_from(self, patient: str) -> str | None:
        """The patient an update moved the row away from, if it did."""
        old = self._patient(self.before) if self.op == "u" and self.before else None
        return old if old is not None and old != patient else None

    def _absent(self, row: dict, column: str) -> bool:
        """Whether a mapped column is missing from the row altogether (not null: Debezium sends every captured
        column, null or not): renamed or dropped by a schema change, or excluded by the connector's
        column.exclude.list. Its value is unknown, neither a reading nor a removal: nothing is emitted for it
        (a null would retract the row's earlier value on every update) and it is counted as skipped."""
        if column in row:
            return False
        self.absent.add(column)
        kind = f"missing_column:{column}"  # a mapped column's name, never input: a bounded set of counter keys
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        return True

    def _was_set_before(self, column: str) -> bool:
        """Without a full `before` (REPLICA IDENTITY DEFAULT) assume it was set: a retraction of an
        unknown fact is harmless downstream, a missed one leaves a stale value live."""
        return self.before is None or column not in self.before or self.before[column] is not None

    def _changed(self, column: str) -> bool:
        """Whether an update changed the column (True when `before` cannot tell)."""
        if self.before is None or column not in self.before or self.before[column] == UNAVAILABLE:
            return True
        return self.before[column] != self.after.get(column)

    def _patient(self, row: dict) -> str | None:
        return _text(row.get(self.mapping.patient_column))

    def _encounter(self, row: dict) -> str | None:
        column = self.mapping.encounter_column
        return _text(row.get(column)) if column else None

    def _time(self, row: dict, column: str, *, time_of_day: bool = False) -> int | None:
        raw = row.get(column)
        if raw is None or raw == UNAVAILABLE:
            return None
        return _decode_time_ms(raw, self.schemas.get(column), column, time_of_day=time_of_day, zone=self.zone)

    def _required_time(self, row: dict, column: str) -> int:
        """When the row's reading was taken: a date alone (a `date` column, an ISO date) is dead-lettered,
        as it cannot be placed in an hourly window (read as midnight UTC it was scored at 00:00)."""
        ms = self._time(row, column, time_of_day=True)
        if ms is None:
            raise Reject(Reason.MISSING_TIME, f"row has no {column}")
        return ms

    def _deleted_time(self, before: dict, column: str) -> int:
        """Under REPLICA IDENTITY DEFAULT `before` has no time: the commit time stands in."""
        return (self._time(before, column) if column in before else None) or self.issued_ms

    def _event(self, patient: str, encounter: str | None, code: str, value: float | None, text: str | None,
               effective_ms: int, status: Status, *, issued_ms: int | None = None,
               fact_suffix: str = "") -> CanonicalEvent:
        unit, code_system = _UNIT_AND_SYSTEM[code]
        return new_event(patient, code, value, unit, effective_ms, self.issued_ms if issued_ms is None else issued_ms,
                         status, Source.CDC, self.fact_prefix + code + fact_suffix, self.lsn, encounter, code_system,
                         text, self.provenance)

    def _retraction(self, patient: str, encounter: str | None, code: str, effective_ms: int,
                    **kwargs: Any) -> CanonicalEvent:
        return self._event(patient, encounter, code, None, None, effective_ms, Status.ENTERED_IN_ERROR, **kwargs)

    def _number(self, code: str, raw: Any, column: str, unit: str | None) -> float:
        """A measurement in the canonical unit of `code`, checked for plausibility."""
        value = to_canonical_unit(code, _decode_number(raw, self.schemas.get(column), column), unit)
        if value is None and unit is None:  # a null unit column for a code reported in more than one unit
            raise Reject(Reason.UNKNOWN_UNIT, f"{column}: {missing_unit_detail(code)}")
        if value is None:
            raise Reject(Reason.UNKNOWN_UNIT, f"{column}: no conversion from unit {str(unit)[:20]!r} "
                                              f"to {CODES[code].unit} for {CODES[code].name}")
        return plausible(code, value, column)


# --- wide rows: one event per mapped column ------------------------------------------------------


class _WideChange(_Change):
    mapping: TableMapping

    def row_events(self) -> list[CanonicalEvent]:
        row, patient = self._after_row()
        effective_ms = self._required_time(row, self.mapping.time_column)
        encounter = self._encounter(row)
        events = []
        for column, (code, value, text) in self._values(row).items():
            if value is not None:
                events.append(self._event(patient, encounter, code, value, text, effective_ms, Status.FINAL))
            elif self.op == "u" and column not in self.absent and self._charted_before(column):
                events.append(self._retraction(patient, encounter, code, effective_ms))
        old_patient = self._moved_from(patient)
        if old_patient is not None:  # the row's facts leave the old patient's record
            events += self._retractions(old_patient, None, self._time(self.before, self.mapping.time_column)
                                        or effective_ms)
        return events

    def _charted_before(self, column: str) -> bool:
        """Whether the column (null now) gave the row a fact before the update, which it must retract."""
        on_air = self.mapping.on_air
        if on_air and column == on_air[1]:
            return self._charted_oxygen_before()
        return self._was_set_before(column) or self._charted_air_before(column)

    def _charted_oxygen_before(self) -> bool:
        """Whether the row carried the derived "on oxygen, flow not charted" fact before (flow null, flag
        true). Without a full `before` assume it did, as _was_set_before does."""
        flow, flag = self.mapping.on_air
        if self.before is None or flow not in self.before or flag not in self.before:
            return True
        try:  # a null flag is not captured (a delete's `before` under REPLICA IDENTITY DEFAULT): cannot tell
            return self.before[flow] is None and _decode_bool(self.before[flag], flag) in (True, None)
        except Reject:  # an unreadable old flag: retract, a retraction of an unknown fact is harmless
            return True

    def _charted_air_before(self, column: str) -> bool:
        """Whether the flow column was null before with the on-air flag false: the row then carried a
        derived flow of 0 (air), which an update that no longer says so must retract."""
        on_air = self.mapping.on_air
        if not on_air or column != on_air[0] or self.before is None:
            return False
        try:
            return _decode_bool(self.before.get(on_air[1]), on_air[1]) is False
        except Reject:  # an unreadable old flag: retract, a retraction of an unknown fact is harmless
            return True

    def _values(self, row: dict) -> dict[str, tuple[str, float | None, str | None]]:
        """column -> (code, canonical value or None when null, text); unavailable columns omitted."""
        values = {}
        on_air = self.mapping.on_air
        for column, (code, unit) in self.mapping.columns.items():
            if self._absent(row, column) and not (on_air and column == on_air[0]):
                continue  # (an absent flow is no flow for the on-air flag, but never retracted: row_events)
            raw = row.get(column)
            if raw is None:
                values[column] = (code, None, None)
            elif raw == UNAVAILABLE:
                continue
            elif code == CONSCIOUSNESS:
                letter = acvpu_letter(raw, column)
                values[column] = (code, float(ACVPU_ORDINAL[letter]), letter)
            else:
                values[column] = (code, self._number(code, raw, column, unit), None)
        if on_air and on_air[0] in values and not self._absent(row, on_air[1]):
            flag = _decode_bool(row.get(on_air[1]), on_air[1]) if values[on_air[0]][1] is None else None
            if flag is False:
                values[on_air[0]] = (O2_FLOW, 0.0, None)
            # on oxygen, flow not charted: NEWS2 needs only "air or oxygen"; no flow value is invented
            values[on_air[1]] = (SUPPLEMENTAL_O2, 1.0 if flag is True else None, None)
        return values

    def retract_row(self) -> list[CanonicalEvent]:
        before, patient = self._deleted_row()
        return self._retractions(patient, self._encounter(before), self._deleted_time(before, self.mapping.time_column))

    def _retractions(self, patient: str, encounter: str | None, effective_ms: int) -> list[CanonicalEvent]:
        codes = dict.fromkeys(code for code, _unit in self.mapping.columns.values())
        if self.mapping.on_air and self._charted_oxygen_before():
            codes[SUPPLEMENTAL_O2] = None
        return [self._retraction(patient, encounter, code, effective_ms) for code in codes]


# --- long rows: one coded result per row ---------------------------------------------------------


class _LongChange(_Change):
    mapping: LongTable

    def row_events(self) -> list[CanonicalEvent] | Ignored:
        m = self.mapping
        row, patient = self._after_row()
        if self._absent(row, m.code_column):  # which test it is cannot be told: not "unmapped_code"
            return Ignored("no_values", {"skipped": self.skipped})
        code = self._code(row)
        effective_ms = self._required_time(row, m.time_column)
        encounter = self._encounter(row)
        events = []
        moved_from, old_code = self._moved_from(patient), self._old_code(code)
        if (moved_from is not None or old_code != code) and old_code is not None:
            # the old fact leaves: the row moved to another patient, or names another test now
            old_effective = self._time(self.before, m.time_column) or effective_ms
            events.append(self._retraction(moved_from or patient, encounter, old_code, old_effective))
        if code is None:
            return events or Ignored("unmapped_code")
        issued_ms = self._time(row, m.issued_column) or self.issued_ms  # (the commit time if missing)
        if self.op == "u":
            # a new version (an amendment, a retraction) did not exist before its commit, whatever result time
            # the row states: the old one kept (REPLICA IDENTITY DEFAULT cannot even show it was kept), or one
            # dated back. Dating it earlier would let as-of joins (training) see it before it existed
            issued_ms = max(issued_ms, self.issued_ms)
        status = self._status(row)
        raw = row.get(m.value_column)
        if raw == UNAVAILABLE or self._absent(row, m.value_column):
            return events
        if self.op == "c" and self._cancelled(row):  # a new row: no earlier version gave a value to retract
            return events or Ignored(CANCELLED)
        if status.retracts or raw is None:
            if status.retracts or (self.op == "u" and self._was_set_before(m.value_column)):
                events.append(self._retraction(patient, encounter, code, effective_ms, issued_ms=issued_ms))
            return events
        value = self._number(code, raw, m.value_column, _text(row.get(m.unit_column)))
        events.append(self._event(patient, encounter, code, value, None, effective_ms, status, issued_ms=issued_ms))
        return events

    def _old_code(self, code: str | None) -> str | None:
        """The code the row had before an update (the same code when `before` cannot tell)."""
        raw = self.before.get(self.mapping.code_column) if self.op == "u" and self.before else None
        return code if raw is None or raw == UNAVAILABLE else self._code(self.before)

    def retract_row(self) -> list[CanonicalEvent] | Ignored:
        m = self.mapping
        before, patient = self._deleted_row()
        if _text(before.get(m.code_column)) is not None:
            code = self._code(before)
            if code is None:
                return Ignored("unmapped_code")
            codes = (code,)
        else:  # REPLICA IDENTITY DEFAULT: the code is unknown, retract every code the row may have had
            codes = m.codes
        effective_ms = self._deleted_time(before, m.time_column)
        return [self._retraction(patient, self._encounter(before), c, effective_ms) for c in codes]

    def _code(self, row: dict) -> str | None:
        """The canonical code of the row's test; None when wardwatch does not use it."""
        raw = _text(row.get(self.mapping.code_column))
        code = canonical_code(raw) if raw else None
        return code if code in self.mapping.codes else None

    def _cancelled(self, row: dict) -> bool:
        raw = row.get(self.mapping.status_column)
        return isinstance(raw, str) and raw.strip().lower() == CANCELLED

    def _status(self, row: dict) -> Status:
        raw = row.get(self.mapping.status_column)
        if raw is None or raw == UNAVAILABLE:  # the column defaults to final
            return Status.FINAL
        status = STATUSES.get(raw.strip().lower()) if isinstance(raw, str) else None
        if status is None:
            raise Reject(Reason.BAD_VALUE, f"{self.mapping.status_column}: not one of {', '.join(STATUSES)}")
        return status


# --- context rows: encounter and patient facts ---------------------------------------------------


class _ContextChange(_Change):
    mapping: ContextTable

    def row_events(self) -> list[CanonicalEvent]:
        row, patient = self._after_row()
        encounter = self._encounter(row)
        events = []
        for fact in self.mapping.facts:
            columns = [c for c in dict.fromkeys((fact.presence, fact.text_column, fact.year_column)) if c]
            if any(row.get(c) == UNAVAILABLE for c in columns):
                continue  # an unchanged TOASTed column carries no new value
            if [c for c in columns if self._absent(row, c)] and fact.presence in self.absent:
                continue  # (each absent column counted; one that only adds to the fact, e.g. the class, is null)
            if fact.presence and row.get(fact.presence) is None:
                if self.op == "u" and not fact.per_time and self._was_set_before(fact.presence):
                    events.append(self._retraction(patient, encounter, fact.code, self._effective(row, fact)))
                continue
            moved_here = self._moved_from(patient) is not None
            if self.op == "u" and fact.per_time and not self._changed(fact.presence) and not moved_here:
                continue  # e.g. the same ward again: not a transfer (unless the row moved to this patient)
            effective_ms = self._effective(row, fact)
            value, text = self._payload(row, fact)
            events.append(self._event(patient, encounter, fact.code, value, text, effective_ms, Status.FINAL,
                                      fact_suffix=f":{effective_ms}" if fact.per_time else ""))
        moved_from = self._moved_from(patient)
        if moved_from is not None:
            events += self._retractions(moved_from, self._encounter(self.before), self.before)
        return events

    def retract_row(self) -> list[CanonicalEvent]:
        before, patient = self._deleted_row()
        return self._retractions(patient, self._encounter(before) or self._encounter(self.key_row), before)

    def _retractions(self, patient: str, encounter: str | None, before: dict) -> list[CanonicalEvent]:
        """Retract the facts with a fixed id; per-time facts cannot be enumerated (module docstring)."""
        return [self._retraction(patient, encounter, f.code, self._deleted_time(before, f.time_column))
                for f in self.mapping.facts if not f.per_time]

    def _effective(self, row: dict, fact: ContextFact) -> int:
        """The fact's time column; on an update or a snapshot read its update-time column when it has
        one and it is set."""
        if self.op == "u" and fact.update_time_column:
            ms = self._time(row, fact.update_time_column)
            if ms is not None:
                return ms
        # (a discharge retraction has no discharge time left: the update's commit time stands in)
        ms = self._time(row, fact.time_column)
        if ms is None and fact.time_column == fact.presence:
            return self.issued_ms
        if ms is None:  # a snapshot read needs it even with an update time: its row is whole, as a create's
            raise Reject(Reason.MISSING_TIME, f"row has no {fact.time_column}")
        if self.op == "r" and fact.update_time_column:
            # a snapshot row is the row after its latest change: its ward holds from that change, not
            # from admission (that would restate the admission ward's fact as the current ward)
            updated = self._time(row, fact.update_time_column)
            return ms if updated is None else updated
        return ms

    def _payload(self, row: dict, fact: ContextFact) -> tuple[float | None, str | None]:
        """(value, value_text) of a present fact."""
        if fact.year_column:
            column = fact.year_column
            return float(_decode_year(row.get(column), self.schemas.get(column), column)), None
        raw = row.get(fact.text_column) if fact.text_column else None
        if raw is None:
            return None, None
        text = _text(raw)
        if text is None:
            raise Reject(Reason.BAD_VALUE, f"{fact.text_column}: not a text")
        if fact.allowed_text is not None:
            text = text.lower()
            if text not in fact.allowed_text:
                raise Reject(Reason.BAD_VALUE, f"{fact.text_column}: not one of {', '.join(fact.allowed_text)}")
        return None, text


_SHAPES: dict[type, type[_Change]] = {TableMapping: _WideChange, LongTable: _LongChange,
                                      ContextTable: _ContextChange}

# code -> (unit, code system) of its events; who/where (context) facts: no unit, their own code system
_UNIT_AND_SYSTEM = {**{code: (info.unit, LOINC) for code, info in CODES.items()},
                    SUPPLEMENTAL_O2: (CODES[SUPPLEMENTAL_O2].unit, WARDWATCH),
                    **dict.fromkeys(CONTEXT_CODES, (None, CONTEXT))}


# --- envelope helpers ----------------------------------------------------------------------------


def _unwrap(doc: Any) -> tuple[Any, dict | None]:
    """(payload, schema) of a schema-wrapped message, or (doc, None) when bare."""
    if isinstance(doc, dict) and len(doc) == 2 and "schema" in doc and "payload" in doc:
        schema = doc["schema"] if isinstance(doc["schema"], dict) else None
        return doc["payload"], schema
    return doc, None


# topic -> (the bytes its last schema-wrapped value began with, `{"schema":<schema>,"payload":`, and
# that schema parsed): Debezium repeats the same schema (~3.5 KB) in every message of a table, and
# parsing it again was about a fifth of a message's cost. Callers only read the schema.
_LAST_SCHEMA: dict[str, tuple[bytes, dict]] = {}
_MAX_PAYLOAD_BRACKETS = 1000  # orjson refuses nesting deeper than 1024; a payload under this is far from it


def _load_value(topic: str, value: bytes) -> Any:
    """orjson.loads(value); when the value is exactly {"schema":<the topic's last schema>,"payload":<one
    JSON value>}, only the payload is parsed. Anything else (another schema, a third member, trailing
    bytes, invalid JSON) is parsed whole, so what loads or fails is what orjson.loads(value) gives."""
    last = _LAST_SCHEMA.get(topic)
    if last is not None and isinstance(value, bytes) and value.startswith(last[0]) and value.endswith(b"}"):
        payload = value[len(last[0]):-1]
        if payload.count(b"{") + payload.count(b"[") < _MAX_PAYLOAD_BRACKETS:
            try:
                return {"schema": last[1], "payload": orjson.loads(payload)}
            except orjson.JSONDecodeError:
                pass  # the whole value gives the error
    doc = orjson.loads(value)
    if isinstance(doc, dict) and len(doc) == 2 and isinstance(doc.get("schema"), dict) and "payload" in doc:
        _LAST_SCHEMA[topic] = (b'{"schema":' + orjson.dumps(doc["schema"]) + b',"payload":', doc["schema"])
    return doc


def _column_schemas(value_schema: dict | None, table: str) -> dict[str, dict]:
    """column -> field schema, from the envelope's `after` (or `before`) struct."""
    if not value_schema:
        return {}
    fields = value_schema.get("fields")
    for name in ("after", "before"):
        for f in fields if isinstance(fields, list) else []:
            if isinstance(f, dict) and f.get("field") == name and isinstance(f.get("fields"), list):
                return _columns_by_name(table, f["fields"])
    return {}


# table -> (the row struct's field list, its columns by name): every message of a table repeats the
# same struct, and comparing it with the last one is cheaper than indexing it again; a changed struct
# (a schema change) replaces the entry. Callers only read the dict.
_LAST_COLUMNS: dict[str, tuple[list, dict[str, dict]]] = {}


def _columns_by_name(table: str, fields: list) -> dict[str, dict]:
    last = _LAST_COLUMNS.get(table)
    if last is not None and last[0] == fields:
        return last[1]
    columns = {c["field"]: c for c in fields if isinstance(c, dict) and isinstance(c.get("field"), str)}
    _LAST_COLUMNS[table] = (fields, columns)
    return columns


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
        first = items[0] if isinstance(items, list) and items else None
        if isinstance(first, str) and INTEGER_TEXT.fullmatch(first.strip()):  # not "8_8", "1.5", other scripts' digits
            first = int(first)
        lsn = first if isinstance(first, int) and not isinstance(first, bool) else None
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


def _decode_time_ms(raw: Any, schema: dict | None, what: str, *, time_of_day: bool = False,
                    zone: ZoneInfo | None = None) -> int:
    """time_of_day: the time a reading was taken, which a date alone cannot give (MISSING_TIME). zone: of
    a naive timestamp (a `timestamp` column: Timestamp, MicroTimestamp, NanoTimestamp, an integer without
    a schema, an ISO string without an offset), which Debezium sends as its wall-clock reading "as if UTC";
    None: UTC. A ZonedTimestamp (`timestamptz`) string carries its offset and is an instant already."""
    name = schema.get("name") if isinstance(schema, dict) else None
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        raw = int(raw)
    if isinstance(raw, str):
        return measurement_time_ms(raw, what, zone) if time_of_day else iso_to_ms(raw, what, zone)
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
        if time_of_day:
            raise Reject(Reason.MISSING_TIME, date_only_detail(what))
        ms = n * 86_400_000
    else:
        raise Reject(Reason.BAD_VALUE, f"{what}: unsupported time type {str(name)[:60]}")
    if zone is not None and name not in DATE_DAYS:
        ms = wall_to_utc_ms(checked_time_ms(ms, what), zone)  # (checked first: datetime's range is narrower)
    return checked_time_ms(ms, what)


def _decode_year(raw: Any, schema: dict | None, what: str) -> int:
    """The year of a date column: days since the epoch (Date, or any integer without a schema), an
    ISO date string, or a timestamp type the schema names. Only the year leaves this function."""
    name = schema.get("name") if isinstance(schema, dict) else None
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        raw = int(raw)
    if isinstance(raw, str):
        try:
            year = date.fromisoformat(raw.strip()[:10]).year
        except ValueError as exc:
            raise Reject(Reason.BAD_VALUE, f"{what}: not an ISO-8601 date") from exc
    elif isinstance(raw, int) and not isinstance(raw, bool):
        per_day = {None: 1, MICRO_TIMESTAMP: 86_400_000_000, NANO_TIMESTAMP: 86_400_000_000_000,
                   **dict.fromkeys(DATE_DAYS, 1), **dict.fromkeys(TIMESTAMP_MS, 86_400_000)
                   }.get(name) if isinstance(name, str | None) else None  # a list name is unhashable
        if per_day is None:
            raise Reject(Reason.BAD_VALUE, f"{what}: unsupported date type {str(name)[:60]}")
        days = raw // per_day
        if not -40_000 < days < 50_000:  # about 1860-2106: beyond is a unit mix-up
            raise Reject(Reason.BAD_VALUE, f"{what}: date outside {BIRTH_YEARS[0]}-{BIRTH_YEARS[1]}")
        year = (date(1970, 1, 1) + timedelta(days=days)).year
    else:
        raise Reject(Reason.BAD_VALUE, f"{what}: not a date")
    if not BIRTH_YEARS[0] <= year <= BIRTH_YEARS[1]:
        raise Reject(Reason.BAD_VALUE, f"{what}: date outside {BIRTH_YEARS[0]}-{BIRTH_YEARS[1]}")
    return year


def _decode_bool(raw: Any, what: str) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "t", "f"):
        return raw.strip().lower() in ("true", "t")
    raise Reject(Reason.BAD_VALUE, f"{what}: not a boolean")
