"""Rejections and the dead-letter contract.

A parse step returns canonical events or a Rejection; wiring routes rejections to the dead-letter
topic with `deadletter_headers()`, untouched original bytes as the value, and moves a counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    MALFORMED_JSON = "malformed_json"  # not JSON / not UTF-8
    INVALID_STRUCTURE = "invalid_structure"  # JSON, but not the envelope we expect
    INVALID_RESOURCE = "invalid_resource"  # FHIR resource fails fhir.resources validation
    UNSUPPORTED_RESOURCE = "unsupported_resource"  # a resource type wardwatch does not map
    UNKNOWN_TABLE = "unknown_table"  # CDC topic/table with no mapping
    MISSING_PATIENT = "missing_patient"
    MISSING_TIME = "missing_time"
    BAD_VALUE = "bad_value"  # wrong type, NaN/Infinity, undecodable
    UNKNOWN_UNIT = "unknown_unit"
    IMPLAUSIBLE_VALUE = "implausible_value"  # outside schemas.codes plausible range
    NO_FHIR_SERVER = "no_fhir_server"  # id-only payload and no server configured
    FHIR_SERVER_NOT_CONFIGURED = "no_fhir_server"  # the same reason by its descriptive name (an alias)
    RESOURCE_NOT_FOUND = "resource_not_found"  # id-only payload: the server answered 404/410 for a focus
    FETCH_FAILED = "fetch_failed"  # id-only payload: server unreachable / erroring after retries; replayable
    FUTURE_TIME = "future_time"  # a measurement's effective time after it was recorded (a wrong clock)
    TOO_LARGE = "too_large"
    INTERNAL_ERROR = "internal_error"  # a bug: the message is kept so it can be replayed after a fix


class Stage(StrEnum):
    INGEST_CDC = "ingest.cdc"
    INGEST_FHIR = "ingest.fhir"
    PATIENT_STATE = "patient_state"
    RECEIVER = "receiver"  # the rest-hook receiver refused a POSTed notification


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str  # human-readable, never patient values or identifiers
    exception: str | None = None  # exception class name, when one was raised


# on a dead letter whose original was too large to copy: its size; the ww.source.* headers say where it is
VALUE_OMITTED_HEADER = "ww.value.omitted_bytes"


def deadletter_headers(rejection: Rejection, stage: Stage, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("ww.reason", rejection.reason.value.encode()),
        ("ww.detail", rejection.detail.encode()[:1000]),
        ("ww.exception", (rejection.exception or "").encode()),
        ("ww.stage", stage.value.encode()),
        ("ww.source.topic", topic.encode()),
        ("ww.source.partition", str(partition).encode()),
        ("ww.source.offset", str(offset).encode()),
    ]
