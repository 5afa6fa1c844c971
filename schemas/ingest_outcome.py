"""What an ingest parser returns for one raw message: exactly one of four outcomes.

    Parsed    canonical events to publish (one or more, possibly of several patients)
    Rejected  a data error: the original message goes to the dead-letter topic with the reason
    Control   protocol traffic that carries no clinical fact (tombstone, handshake, heartbeat)
    Ignored   a valid message wardwatch has no use for (op 'm', truncate, unmapped codes)

The ingest worker routes on the type; parsers never raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.canonical import CanonicalEvent
from schemas.deadletter import Reason, Rejection


@dataclass(frozen=True, slots=True)
class Parsed:
    events: list[CanonicalEvent]
    # FHIR only: which subscription and notification event numbers this message carried (gap detection)
    subscription: str | None = None
    event_numbers: list[int] = field(default_factory=list)
    # parts of the message that were skipped (e.g. an unmapped Observation in a bundle), by kind
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class Control:
    kind: str  # "tombstone" | "handshake" | "heartbeat" | "query-status"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ignored:
    kind: str  # e.g. "message", "truncate", "unmapped_code", "Encounter"
    detail: dict[str, Any] = field(default_factory=dict)  # FHIR: subscription + event_numbers, still counted for gaps


@dataclass(frozen=True, slots=True)
class NeedsFetch(Rejected):
    """An id-only FHIR notification: the resources must be fetched from the FHIR server.

    It *is* a Rejected (reason FHIR_SERVER_NOT_CONFIGURED), so a caller without a FHIR server
    dead-letters it unchanged; a caller with one (streams/fhir_fetch.py) GETs `references` and parses
    the completed notification instead."""

    references: tuple[str, ...] = ()  # relative "Type/id" (or "Type/id/_history/v"), in focus order
    # those of them that are the version before a DELETE entry: a 410 for one is a failed read, not a delete
    priors: tuple[str, ...] = ()
    # "Patient/<id>" of subjects without an identifier whose Patient the notification does not carry: only
    # their MRN is wanted (streams/fhir_fetch.py reads it, cached, and parses again with `patient_mrns`)
    patients: tuple[str, ...] = ()


Outcome = Parsed | Rejected | Control | Ignored


class Reject(Exception):
    """Raised inside a parser to abandon the message; the parser's entry point turns it into Rejected."""

    def __init__(self, reason: Reason, detail: str, exception: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.exception = exception  # class name of the underlying error, for the dead-letter header


def rejected(reason: Reason, detail: str, exception: str | None = None) -> Rejected:
    return Rejected(Rejection(reason=reason, detail=detail, exception=exception))
