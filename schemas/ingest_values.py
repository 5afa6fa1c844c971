"""Value checks shared by the CDC and FHIR parsers: times, numbers, plausibility, ACVPU, GCS.

Each helper raises `Reject` so a parser can abandon the whole message in one place.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone, tzinfo

from schemas.codes import ACVPU_ORDINAL, CODES, CONTEXT, GCS_RANGE
from schemas.deadletter import Reason
from schemas.ingest_outcome import Reject

# a clinical time outside this range is a unit mix-up (ms read as µs, seconds read as ms), not data
_MIN_MS = 315_532_800_000  # 1980-01-01
_MAX_MS = 4_102_444_800_000  # 2100-01-01
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_FRACTION = re.compile(r"(\.\d{6})\d+")  # nanosecond fractions: keep microseconds
# a leap second (FHIR dateTime/instant allow seconds 60): read as second 59, as java.time's ISO_INSTANT parses it
_LEAP_SECOND = re.compile(r"(T\d{2}:\d{2}:)60(?=\D|$)")


def iso_to_ms(text: str, what: str, naive_zone: tzinfo | None = None) -> int:
    """ISO-8601 date or date-time -> epoch ms; a naive value is wall-clock time in naive_zone (a CDC
    database's zone, see wall_to_utc_ms), UTC when None."""
    try:
        dt = datetime.fromisoformat(_LEAP_SECOND.sub(r"\g<1>59", _FRACTION.sub(r"\1", text.strip()), count=1))
    except (ValueError, AttributeError) as exc:
        raise Reject(Reason.BAD_VALUE, f"{what}: not an ISO-8601 date-time") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=naive_zone or timezone.utc)  # fold=0: see wall_to_utc_ms
    # floor to ms with integer arithmetic, as CDC µs are floored: the same instant from both sources
    # must give the same effective_ms (cross-source dedupe compares it exactly)
    return checked_time_ms((dt - _EPOCH) // timedelta(milliseconds=1), what)


# a date without a time of day: FHIR R4 dateTime may be YYYY, YYYY-MM or YYYY-MM-DD ("a date, date-time
# or partial date"); a `date` column or an ISO date string in CDC. (The ISO basic and week forms too.)
_DATE_ONLY = re.compile(r"\d{4}(?:-\d{2}(?:-\d{2})?)?|\d{8}|\d{4}-?W\d{2}(?:-?\d)?")


def date_only_detail(what: str) -> str:
    return f"{what}: a date without a time of day cannot be placed in an hourly window"


def measurement_time_ms(text: str, what: str, naive_zone: tzinfo | None = None) -> int:
    """iso_to_ms for when a reading was taken. A date alone (any FHIR dateTime precision coarser than a
    time of day) is dead-lettered as MISSING_TIME: read as midnight UTC it would be scored in the 00:00
    window, up to a day from when it was taken, and move the patient's clock. The detail never has the date."""
    stripped = text.strip() if isinstance(text, str) else text
    if isinstance(stripped, str) and _DATE_ONLY.fullmatch(stripped):
        try:  # a malformed date (month 13) stays a bad value
            datetime.fromisoformat(stripped + "-01" * (2 - stripped.count("-")) if len(stripped) < 8 else stripped)
        except ValueError as exc:
            raise Reject(Reason.BAD_VALUE, f"{what}: not an ISO-8601 date-time") from exc
        raise Reject(Reason.MISSING_TIME, date_only_detail(what))
    return iso_to_ms(text, what, naive_zone)


def wall_to_utc_ms(wall_ms: int, zone: tzinfo) -> int:
    """A wall-clock reading in `zone`, as epoch ms "as if UTC" (what Debezium sends for a PostgreSQL
    `timestamp` column), -> epoch ms of the instant. DST, by zoneinfo with fold=0, as java.time resolves a
    local date-time (so a Java FHIR server over the same database gives the same instant, and CDC/FHIR
    duplicates still match): a wall time of the repeated fall-back hour, which happened twice and which a
    zone-less column cannot tell apart, is the first one (the offset before the change: summer time); one
    of the skipped spring-forward hour, which never happened on the wall, is read with the offset before
    the jump too (02:30 in Europe/Berlin is 01:30Z = 03:30 CEST), as PostgreSQL reads it."""
    wall = _EPOCH_NAIVE + timedelta(milliseconds=wall_ms)
    return wall_ms - wall.replace(tzinfo=zone).utcoffset() // timedelta(milliseconds=1)


def checked_time_ms(ms: int, what: str) -> int:
    if not _MIN_MS <= ms < _MAX_MS:
        raise Reject(Reason.BAD_VALUE, f"{what}: time outside 1980-2100 (wrong time unit?)")
    return ms


# A number sent as a string must be written as JSON writes one (ASCII digits, a minus sign, a fraction, an
# exponent; leading zeros too, unambiguous in decimal): float() and int() also read "8_8" as 88, "+88", " .5",
# and the digits of any script ("١٢٠" as 120), which no database or FHIR server writes as a number: such a
# string is a bad value, not a reading. (re's \d matches every script's digits: these say [0-9].)
INTEGER_TEXT = re.compile(r"-?[0-9]+")
NUMBER_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NON_FINITE = {"nan", "inf", "infinity"}


def finite_number(raw: object, what: str) -> float:
    """A JSON number or numeric string (NUMBER_TEXT, surrounding blanks aside) as a finite float; booleans,
    NaN and Infinity are bad values."""
    if isinstance(raw, bool):
        raise Reject(Reason.BAD_VALUE, f"{what}: boolean where a number was expected")
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if not NUMBER_TEXT.fullmatch(text):
            if text.lower().lstrip("+-") in _NON_FINITE:
                raise Reject(Reason.BAD_VALUE, f"{what}: NaN or Infinity")
            raise Reject(Reason.BAD_VALUE, f"{what}: not a number")
        value = float(text)
    else:
        raise Reject(Reason.BAD_VALUE, f"{what}: {type(raw).__name__} where a number was expected")
    if not math.isfinite(value):
        raise Reject(Reason.BAD_VALUE, f"{what}: NaN or Infinity")
    return value


def undecodable_json(exc: ValueError, what: str) -> tuple[Reason, str]:
    """The dead-letter reason and detail of JSON orjson refused (`what`: the message part, e.g. "value").
    Valid JSON it cannot hold is told apart from bytes that are not JSON: a number beyond a 64-bit float
    (orjson reads an integer past 64 bits as a float, and refuses one past ~1.8e308 as infinity) is a bad
    value, as the same number sent as a string ("1e400") is; nesting deeper than orjson's 1024 levels stays
    malformed_json, saying so. The detail never holds the value."""
    message = str(getattr(exc, "msg", ""))
    if message.startswith("number is infinity"):
        return Reason.BAD_VALUE, f"{what} holds a number outside the 64-bit range (valid JSON, not readable)"
    if message.startswith("depth limit"):
        return Reason.MALFORMED_JSON, f"{what} is JSON nested deeper than 1024 levels"
    return Reason.MALFORMED_JSON, f"{what} is not UTF-8 JSON"


def plausible(code: str, value: float, what: str) -> float:
    low, high = CODES[code].plausible
    if not low <= value <= high:
        raise Reject(Reason.IMPLAUSIBLE_VALUE, f"{what}: outside plausible range [{low}, {high}]")
    return value


def acvpu_letter(raw: object, what: str) -> str:
    letter = raw.strip().upper() if isinstance(raw, str) else None
    if letter not in ACVPU_ORDINAL:
        raise Reject(Reason.BAD_VALUE, f"{what}: not one of A, C, V, P, U")
    return letter


def gcs_total(raw: object, what: str, bounds: tuple[int, int] = GCS_RANGE) -> int:
    """A Glasgow Coma Scale score: an integer within bounds (a total 3..15, or one component's range), a
    number or an integral float such as 14.0. The detail never echoes the value."""
    value = finite_number(raw, what)
    if not value.is_integer():
        raise Reject(Reason.BAD_VALUE, f"{what}: not an integer")
    low, high = bounds
    if not low <= value <= high:
        raise Reject(Reason.IMPLAUSIBLE_VALUE, f"{what}: outside the GCS range [{low}, {high}]")
    return int(value)


# A measurement cannot be taken after it was recorded. An effective time more than this past the
# event's issued time (the commit time of a CDC row, a lab's resulted_at, FHIR `issued`) is a wrong
# clock or a typo (2099 for 2024), and accepting it would move the patient's event-time clock
# decades ahead and make every later real measurement "late". Context facts (admissions, transfers)
# may legitimately be planned ahead and never move the clock, so they are exempt.
MAX_FUTURE_SKEW_MS = 3_600_000


def reject_future_measurements(events, recorded_ms: int | None = None) -> None:
    """recorded_ms: when the source's own server recorded the message (a CDC row's commit time; a FHIR
    notification's timestamp, else the Kafka record's, for an Observation with neither `issued` nor
    meta.lastUpdated, whose effective time stands in for its issued time), None when unknown. It bounds the effective time too:
    the issued time can come from the clock that dated the measurement (a lab's resulted_at), so one
    wrong clock moves both."""
    for e in events:
        if e.code_system == CONTEXT:
            continue
        recorded = e.issued_ms if recorded_ms is None else min(e.issued_ms, recorded_ms)
        if e.effective_ms > recorded + MAX_FUTURE_SKEW_MS:
            raise Reject(Reason.FUTURE_TIME, f"{e.code}: effective time is "
                                             f"{(e.effective_ms - recorded) / 3_600_000:.1f} h after it was recorded")
