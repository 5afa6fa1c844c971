"""The online per-patient state and the rules that update it (docs/patient-state.md), as pure code.

    result = apply_batch(state, events, allowed_lateness_ms=..., dedupe_horizon_ms=...,
                         cross_source_tolerance=...)
    result.outcomes  # one Outcome per event, in arrival order: accepted | corrected | duplicate | late
    result.state     # the new PatientState (the input state is never mutated)
    result.changed   # any accepted or corrected (when to score: schemas/cadence.py)

A higher version of a known fact whose content equals the fact's current content (a Debezium
re-snapshot, a FHIR versionId bump for a note) is a restatement (rule 2): a duplicate, not a
correction. So that it can be told even for a fact that has no live copy any more, `known` keeps
the content of a retracted fact (retracted) and of a pruned one (its code, value and mark).

A final result whose preliminary version is live through the other source (same code and effective
time, any value) replaces it (rule 4): outcome corrected, with `supersedes` naming the replaced fact,
which becomes the alias. This holds for a new fact and for a fact's own new version made final; and a
preliminary result arriving after the other source's final one is its alias, whatever its value.

A FHIR Observation version replaces all of the resource's facts (rule 6): applying an event that carries
its version's codes (`version_codes`) retracts every fact of the same resource known at a lower version,
live (not retracted, not an alias), whose code that version does not carry: one more outcome, corrected,
right after the event's own, its event a retraction of that fact at the version (`replaced_by` names the
event). A new fact of a resource already known at a higher version is a stale version: a duplicate
(redelivery), never live. A version carrying none of the mapped codes is one event, its version marker
(schemas.codes.VERSION_MARK: a retraction of a fact never live, `version_codes` empty): applied like any
retraction of a new fact (accepted, late or a duplicate; known, never live) and then replacing every fact
of the resource.

Expiry is applied *logically* on every lookup (a `known` entry older than clock - horizon counts as
unknown; a live fact at or before clock - lateness - MAX_WINDOW never matches), so outcomes depend only on the
arrival order of events, not on how they were cut into micro-batches nor on when the physical
pruning ran. The batch plane can therefore replay the rules event by event.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple

from schemas.canonical import LOINC, CanonicalEvent, Status, new_event
from schemas.codes import CODES, VERSION_MARK
from schemas.features import MAX_WINDOW_S

MAX_WINDOW_MS = MAX_WINDOW_S * 1000
# bump when the to_dict layout changes (2: a live fact may carry the preliminary mark; 3: a known entry
# may carry the content of a fact without a live copy; 4: a known entry that its live fact implies is
# not written, and a live fact without a known entry has a null one)
STATE_FORMAT = 4
# formats from_dict reads: a format-1 state is a format-2 state whose facts are all taken as final (its
# layout did not keep the status; a preliminary reading in it goes unflagged until it is superseded); a
# format-1 or 2 state is a format-3 state whose retracted and pruned facts have an unknown content (any
# higher version of one is a correction, as before); a format-3 state is a format-4 state with every
# known entry written (the same state)
READABLE_FORMATS = (1, 2, 3, STATE_FORMAT)
# formats to_dict writes: 3 too, so that an upgrade from a format-3 release can be rolled back until the
# operator switches to 4 (settings.state_write_format; docs/operations.md "Upgrade and roll back wardwatch")
WRITABLE_FORMATS = (3, STATE_FORMAT)


class Kind(StrEnum):
    ACCEPTED = "accepted"
    CORRECTED = "corrected"
    DUPLICATE = "duplicate"
    LATE = "late"


class DuplicateKind(StrEnum):
    REDELIVERY = "redelivery"  # same fact, version already seen (rule 1)
    RESTATEMENT = "restatement"  # same fact, higher version, same content (rule 2)
    CROSS_SOURCE = "cross_source"  # same measurement via the other source (rule 4)


class Outcome(NamedTuple):
    event: CanonicalEvent
    kind: Kind
    duplicate_kind: DuplicateKind | None = None
    late_by_ms: int | None = None  # only for late events: clock - allowed_lateness - effective_ms
    # only for a final result replacing its preliminary cross-source twin (rule 4): the twin's fact_id
    supersedes: str | None = None
    # only for a retraction the state made itself (rule 6: a FHIR version dropped the fact's code): the fact_id
    # of the event of that version whose outcome it follows (it has no arrival position of its own)
    replaced_by: str | None = None


# State rows are plain tuples, not objects: the whole state is serialised on every micro-batch (the
# table write) and plain tuples go to JSON arrays as they are, with no conversion pass.
#
# known entry: (version, effective_ms, alias) -- the highest version seen, that version's effective
#   time (drives expiry, event time only), and whether the fact is a cross-source alias (rule 4).
#   A fact without a live copy carries a fourth element, its content (GONE), so that a restatement of it
#   is recognised: None when it is retracted, (code, value, is_preliminary) when its live copy was
#   pruned. A live fact's content is its live copy. (A format-1/2 state has no fourth element: unknown.)
Known = tuple[int, int, bool] | tuple[int, int, bool, tuple[str, float, bool] | None]
GONE = 3
# live fact: (effective_ms, fact_id, value, source, version) -- tuples sort by (effective_ms,
#   fact_id), which is also the `last` tie-break. A preliminary result carries a sixth element, True
#   (is_preliminary): final ones, nearly all facts, cost nothing more to store or serialise.
LiveFact = tuple[int, str, float, str, int] | tuple[int, str, float, str, int, bool]
EFFECTIVE_MS, FACT_ID, VALUE, SOURCE, VERSION, PRELIMINARY = range(6)


def is_preliminary(fact: LiveFact) -> bool:
    return len(fact) > PRELIMINARY


# globals: an Enum class attribute costs ~150 ns per event (Python 3.11), the retracts property more
_PRELIMINARY = Status.PRELIMINARY
_RETRACTION = Status.ENTERED_IN_ERROR  # Status.retracts
# rule 6: the codes a resource's facts can have, in the order the retractions of dropped ones follow an event,
# and its version marker's (a version carrying none of them: schemas.codes.VERSION_MARK), known like a retracted
# fact so that an older version arriving after it is stale; it is never live, so never retracted
_RESOURCE_CODES = tuple(sorted((*CODES, VERSION_MARK)))
_RESOURCE_CODE_SET = frozenset(_RESOURCE_CODES)


@dataclass(frozen=True, slots=True)
class PatientState:
    """Per-patient state. Treat as immutable: apply_batch shares unchanged parts between states.

    known: fact_id -> Known (dedupe; includes retracted facts and aliases)
    facts: code -> live facts of that code, sorted by (effective_ms, fact_id)
    clock: max effective_ms of accepted new facts, None before the first one
    """

    known: dict[str, Known] = field(default_factory=dict)
    facts: dict[str, list[LiveFact]] = field(default_factory=dict)
    clock: int | None = None
    # not state, what to_dict writes of `known`, kept by apply_batch as it goes (so that a table write
    # costs no pass over the state): every entry but the implied ones, an implied entry being
    # (version, effective_ms, False) of its fact's live copy (most keys: a fact accepted and not changed
    # since). None: to_dict works it out (a state not made by apply_batch or from_dict)
    explicit: dict[str, Known] | None = field(default=None, compare=False, repr=False)

    def live(self, code: str) -> list[LiveFact]:
        return self.facts.get(code, [])

    def to_dict(self, fmt: int = STATE_FORMAT) -> dict[str, Any]:
        """JSON-ready and compact (rows are arrays; from_dict derives the known entries the live facts
        imply). Shares the state's containers: serialise it, don't edit it. fmt: WRITABLE_FORMATS, 3 for
        a release before format 4 to read (settings.state_write_format)."""
        if fmt == 3:  # every known entry written, as format 3 was (the same state, ~half as large again)
            return {"format": 3, "clock": self.clock, "known": self.known, "facts": self.facts}
        known = self.explicit if self.explicit is not None else explicit_known(self.known, self.facts)
        if known is None:  # a live fact without a known entry, or live twice (not made by apply_batch)
            known = self.known | {fact[FACT_ID]: None for rows in self.facts.values() for fact in rows
                                  if fact[FACT_ID] not in self.known}  # every entry, a null for no entry
        return {"format": STATE_FORMAT, "clock": self.clock, "known": known, "facts": self.facts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatientState:
        fmt = d.get("format")
        if fmt not in READABLE_FORMATS:
            # a state written by a newer wardwatch (a rolled-back image): stop rather than guess, since a
            # guess would lose dedupe state (docs/operations.md, "Upgrade and roll back wardwatch")
            raise ValueError(f"unsupported patient state format {fmt!r}: this worker reads formats "
                             f"{READABLE_FORMATS}; run a wardwatch version that reads it (docs/operations.md)")
        # JSON gives lists; rows must be tuples again (bisect compares them with tuple keys), and so must
        # a pruned fact's content
        facts = {code: list(map(tuple, rows)) for code, rows in d["facts"].items()}
        written = d["known"]
        explicit = {fid: tuple(entry) if len(entry) == GONE or entry[GONE] is None else (*entry[:GONE], tuple(entry[GONE]))
                    for fid, entry in written.items() if entry is not None}
        if fmt < 4:  # every entry written
            return cls(explicit, facts, d["clock"], explicit_known(explicit, facts))
        known = explicit.copy()
        for rows in facts.values():
            for fact in rows:
                if fact[FACT_ID] not in written:
                    known[fact[FACT_ID]] = (fact[VERSION], fact[EFFECTIVE_MS], False)
        # a null entry (a live fact without one) is not kept up as the state changes: to_dict works it out
        return cls(known, facts, d["clock"], explicit if len(explicit) == len(written) else None)


def explicit_known(known: dict[str, Known], facts: dict[str, list[LiveFact]]) -> dict[str, Known] | None:
    """The entries of `known` that their live fact does not imply (PatientState.explicit), or None when a
    live fact has no entry or a fact is live twice (then to_dict writes every entry)."""
    explicit = known.copy()
    live = set()
    for rows in facts.values():
        for fact in rows:
            fid = fact[FACT_ID]
            entry = known.get(fid)
            if entry is None or fid in live:
                return None
            live.add(fid)
            if entry == (fact[VERSION], fact[EFFECTIVE_MS], False):
                del explicit[fid]
    return explicit


@dataclass(frozen=True, slots=True)
class BatchResult:
    state: PatientState
    outcomes: list[Outcome]
    changed: bool  # any accepted or corrected

    @property
    def late(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind is Kind.LATE]


def apply_batch(
    state: PatientState | None,
    events: list[CanonicalEvent],
    *,
    allowed_lateness_ms: int,
    dedupe_horizon_ms: int,
    cross_source_tolerance: float,
) -> BatchResult:
    """Apply one micro-batch of one patient's events in arrival order (rules 1-6), then prune."""
    if dedupe_horizon_ms <= allowed_lateness_ms:
        # otherwise a redelivery whose key expired could be accepted a second time
        raise ValueError("dedupe horizon must exceed the allowed lateness")
    draft = _Draft(state or PatientState())
    outcomes: list[Outcome] = []
    changed = False
    for e in events:
        outcome = draft.apply(e, allowed_lateness_ms, dedupe_horizon_ms, cross_source_tolerance)
        changed = changed or outcome.kind is Kind.ACCEPTED or outcome.kind is Kind.CORRECTED
        outcomes.append(outcome)
        if e.version_codes is not None and (replaced := draft.replace(e, dedupe_horizon_ms)):  # rule 6
            outcomes += replaced
            changed = True
    return BatchResult(draft.finish(dedupe_horizon_ms, allowed_lateness_ms), outcomes, changed)


@lru_cache(maxsize=256)
def _resource_fact_ids(resource: str) -> tuple[tuple[str, str], ...]:
    """(code, fact_id) of each fact a resource can have (rule 6), in _RESOURCE_CODES order. Cached: every event
    of a FHIR panel (several codes, one resource) looks them all up, some twice (_superseded, replace)."""
    return tuple((code, f"{resource}:{code}") for code in _RESOURCE_CODES)


class _Draft:
    """A copy-on-write working copy of a PatientState: copies a part only when it first changes."""

    __slots__ = ("base", "known", "facts", "clock", "explicit", "_own_known", "_own_codes", "_own_explicit")

    def __init__(self, base: PatientState):
        self.base = base
        self.known = base.known
        self.facts = base.facts
        self.clock = base.clock
        # kept as `known` changes (_set_explicit); None (a live fact without an entry, or live twice: not
        # made here) stays None
        self.explicit = base.explicit if base.explicit is not None else explicit_known(base.known, base.facts)
        self._own_known = False
        self._own_codes: set[str] | None = None  # None: self.facts is still the base dict
        self._own_explicit = False

    # --- the rules -------------------------------------------------------------------------

    def apply(self, e: CanonicalEvent, lateness_ms: int, horizon_ms: int, tolerance: float) -> Outcome:
        entry = self.known.get(e.fact_id)
        if entry is not None:
            known_effective_ms, alias = entry[1], entry[2]
            if self.clock is None or known_effective_ms >= self.clock - horizon_ms:  # not expired
                if e.version <= entry[0]:  # rule 1
                    return Outcome(e, Kind.DUPLICATE, DuplicateKind.REDELIVERY)
                if alias and (twin := self._preliminary_twin(e, self._other_source_at(e, lateness_ms))):  # rule 4
                    return self._finalise(e, twin, None)
                # rule 2. An alias's content is never used: every new version of it restates it
                if alias or self._restates(e, entry):
                    self._set_known(e.fact_id, (e.version, e.effective_ms, *entry[2:]))
                    return Outcome(e, Kind.DUPLICATE, DuplicateKind.RESTATEMENT)
                # rule 4: made final, it also replaces the other source's live preliminary result (both
                # sources sent the preliminary result, too far apart in value to be one fact)
                if (twin := self._preliminary_twin(e, self._other_source_at(e, lateness_ms))) is not None:
                    return self._finalise(e, twin, entry)
                self._unlive(e, known_effective_ms)
                self._remember_live(e)
                return Outcome(e, Kind.CORRECTED)

        # rule 6: a new fact of a resource already known at a higher version: that version does not carry it
        if e.version_codes is not None and self._superseded(e, horizon_ms):
            return Outcome(e, Kind.DUPLICATE, DuplicateKind.REDELIVERY)

        # rule 4 reads the other source's live facts at e's time, before and after rule 3: one lookup
        others = self._other_source_at(e, lateness_ms)
        # rule 4, before rule 3: the final version of a live preliminary result is a correction, never late
        if (twin := self._preliminary_twin(e, others)) is not None:
            return self._finalise(e, twin, entry)

        if self.clock is not None and e.effective_ms < self.clock - lateness_ms:  # rule 3
            return Outcome(e, Kind.LATE, late_by_ms=self.clock - lateness_ms - e.effective_ms)

        if self._has_cross_source_twin(e, others, tolerance):  # rule 4
            self._remember(e, True, False)
            return Outcome(e, Kind.DUPLICATE, DuplicateKind.CROSS_SOURCE)

        if entry is not None and not alias:  # an expired key taken as new: drop any stale copy
            self._unlive(e, known_effective_ms)
        self._remember_live(e)  # rule 5
        if self.clock is None or e.effective_ms > self.clock:
            self.clock = e.effective_ms
        return Outcome(e, Kind.ACCEPTED)

    def _resource_facts(self, e: CanonicalEvent, horizon_ms: int):
        """(code, fact_id, known entry) of the facts of e's resource known and not expired (rule 6), by code."""
        # a code of the mapping (or a version marker) only, as batch.features._with_replacements (a foreign
        # producer's event of another code, or an empty one, is no fact of a resource: it neither retracts nor is stale)
        fact_id, code = e.fact_id, e.code
        if code not in _RESOURCE_CODE_SET or not fact_id.endswith(code) or fact_id[-len(code) - 1:-len(code)] != ":":
            return
        floor = None if self.clock is None else self.clock - horizon_ms
        known = self.known
        for code, fact_id in _resource_fact_ids(fact_id[:-len(code) - 1]):
            entry = known.get(fact_id)
            if entry is not None and (floor is None or entry[1] >= floor):
                yield code, fact_id, entry

    def _superseded(self, e: CanonicalEvent, horizon_ms: int) -> bool:
        """Whether a fact of e's resource is known at a version above e's (rule 6)."""
        return any(entry[0] > e.version for _, _, entry in self._resource_facts(e, horizon_ms))

    def replace(self, e: CanonicalEvent, horizon_ms: int) -> list[Outcome]:
        """Rule 6: retract each fact of e's resource known at a lower version, not retracted and not an
        alias, whose code e's version does not carry. A retraction at e's version, effective and issued
        time (what a new version of the fact retracting it would be); outcome corrected."""
        outcomes = []
        for code, fact_id, entry in self._resource_facts(e, horizon_ms):
            if (code in e.version_codes or entry[0] >= e.version or entry[2]
                    or (len(entry) > GONE and entry[GONE] is None)):
                continue
            # (LOINC: the fact is one of a mapped code, whichever event retracts it, a version marker too)
            retraction = new_event(e.patient_id, code, None, None, e.effective_ms, e.issued_ms, _RETRACTION,
                                   e.source, fact_id, e.version, e.encounter_id, LOINC, None, e.provenance,
                                   e.version_codes)
            self._remember(retraction, False, True)
            self._unlive(retraction, entry[1])
            outcomes.append(Outcome(retraction, Kind.CORRECTED, replaced_by=e.fact_id))
        return outcomes

    def _restates(self, e: CanonicalEvent, entry: Known) -> bool:
        """Whether e (a higher version of a known fact, not an alias) has the fact's current content:
        retracted again, or the same code, value, effective time and preliminary mark."""
        if len(entry) > GONE and entry[GONE] is None:  # retracted: only another retraction restates it
            return e.status is _RETRACTION
        if e.status is _RETRACTION or e.effective_ms != entry[1]:
            return False
        preliminary = e.status is _PRELIMINARY
        if len(entry) > GONE:  # its live copy was pruned: the entry keeps the content
            code, value, was_preliminary = entry[GONE]
            return code == e.code and value == e.value and was_preliminary == preliminary
        facts = self.facts.get(e.code)  # its live copy, under the same code if the content is the same
        if not facts:
            return False
        i = bisect_left(facts, (e.effective_ms, e.fact_id))
        if i == len(facts):
            return False
        fact = facts[i]
        return fact[FACT_ID] == e.fact_id and fact[VALUE] == e.value and is_preliminary(fact) == preliminary

    def _has_cross_source_twin(self, e: CanonicalEvent, others: list[LiveFact], tolerance: float) -> bool:
        """A live fact of the other source (`others`: _other_source_at) that e repeats: within tolerance,
        or, e being a preliminary result, a final one whatever its value (the preliminary version of a
        result already final)."""
        if e.value is None or not others:  # nearly always: no generator to make
            return False
        preliminary = e.status is _PRELIMINARY
        return any(abs(e.value - other[VALUE]) <= tolerance or (preliminary and not is_preliminary(other))
                   for other in others)

    def _preliminary_twin(self, e: CanonicalEvent, others: list[LiveFact]) -> LiveFact | None:
        """The live preliminary result that e, a final result through the other source (same code, same
        effective time, any value; `others`: _other_source_at), is the final version of: the first by
        fact_id, or None."""
        if not others or e.value is None or e.status is _PRELIMINARY or e.status is _RETRACTION:
            return None  # nearly always: no other source's fact, no generator to make
        return next((other for other in others if is_preliminary(other) and other[VALUE] is not None), None)

    def _other_source_at(self, e: CanonicalEvent, lateness_ms: int) -> list[LiveFact]:
        """The live facts of e's code at e's effective time from the other source (by fact_id; mostly none)."""
        if self.clock is not None and e.effective_ms <= self.clock - lateness_ms - MAX_WINDOW_MS:
            return []  # facts that old are logically pruned
        facts = self.facts.get(e.code)
        if not facts:
            return []
        found = []
        i = bisect_left(facts, (e.effective_ms,))
        while i < len(facts) and facts[i][EFFECTIVE_MS] == e.effective_ms:
            if facts[i][SOURCE] != e.source:
                found.append(facts[i])
            i += 1
        return found

    def _finalise(self, e: CanonicalEvent, twin: LiveFact, stale: Known | None) -> Outcome:
        """e replaces its preliminary twin: e's fact is live (no longer an alias, if it was one) and the
        twin's becomes the alias, so that its later versions are restatements. The clock stays: the
        twin was accepted at this effective time."""
        twin_id = twin[FACT_ID]
        facts = self._writable(e.code)
        del facts[bisect_left(facts, twin[:2])]
        known = self.known.get(twin_id)  # (none if its key expired while it stayed live)
        self._set_known(twin_id, (known[0] if known else twin[VERSION], twin[EFFECTIVE_MS], True))
        if stale is not None and not stale[2]:  # an expired key of e taken as new: drop any stale copy
            self._unlive(e, stale[1])
        self._remember_live(e)
        return Outcome(e, Kind.CORRECTED, supersedes=twin_id)

    # --- copy-on-write mutations -----------------------------------------------------------

    def _remember(self, e: CanonicalEvent, alias: bool, retracts: bool) -> None:
        # a retracted fact has no live copy: its entry says it is retracted
        self._set_known(e.fact_id, (e.version, e.effective_ms, alias, None) if retracts else
                        (e.version, e.effective_ms, alias))

    def _remember_live(self, e: CanonicalEvent) -> None:
        """e's fact is known at e's version and, unless e retracts it, live as e says (rule 5)."""
        if e.status is _RETRACTION:
            self._remember(e, False, True)
            return
        # the live copy implies the entry (version, effective_ms, not an alias): it is not written
        # (PatientState.explicit). Set here rather than written by _set_known and dropped again: no copy
        # of `explicit` for a run of new facts, two calls less per event
        if not self._own_known:
            self.known = dict(self.known)
            self._own_known = True
        self.known[e.fact_id] = (e.version, e.effective_ms, False)
        if self.explicit is not None and e.fact_id in self.explicit:  # written before: a correction
            self._set_explicit(e.fact_id, None)
        fact = (e.effective_ms, e.fact_id, e.value, e.source.value, e.version)
        insort(self._writable(e.code), (*fact, True) if e.status is _PRELIMINARY else fact)

    def _set_known(self, fact_id: str, entry: Known) -> None:
        if not self._own_known:
            self.known = dict(self.known)
            self._own_known = True
        self.known[fact_id] = entry
        # written: an entry a live copy implies is set by _remember_live. (A live copy is only removed along
        # with a _set_known of its fact: corrected, finalised, made an alias, or pruned with its content.)
        self._set_explicit(fact_id, entry)

    def _set_explicit(self, fact_id: str, entry: Known | None) -> None:
        """PatientState.explicit[fact_id] = entry, or no entry if None."""
        if self.explicit is None:
            return
        if not self._own_explicit:
            self.explicit = dict(self.explicit)
            self._own_explicit = True
        if entry is None:
            self.explicit.pop(fact_id, None)
        else:
            self.explicit[fact_id] = entry

    def _writable(self, code: str) -> list[LiveFact]:
        if self._own_codes is None:
            self.facts = dict(self.facts)
            self._own_codes = set()
        if code not in self._own_codes:
            self.facts[code] = list(self.facts.get(code, ()))
            self._own_codes.add(code)
        return self.facts[code]

    def _unlive(self, e: CanonicalEvent, known_effective_ms: int) -> None:
        """Remove the live copy of e's fact, if any (it sits at the effective time `known` recorded)."""
        key = (known_effective_ms, e.fact_id)
        # the fact's code is e.code unless a correction changed it: then look everywhere
        for code in (e.code, *(c for c in self.facts if c != e.code)):
            facts = self.facts.get(code)
            if not facts:
                continue
            i = bisect_left(facts, key)
            if i < len(facts) and facts[i][:2] == key:
                del self._writable(code)[i]
                return

    # --- pruning ---------------------------------------------------------------------------

    def finish(self, horizon_ms: int, lateness_ms: int) -> PatientState:
        if self.clock is None:
            return PatientState(self.known, self.facts, self.clock, self.explicit)
        # a vitals point can be as old as clock - lateness (an out-of-order set that is not late), so
        # no window reaches a fact at or before this again
        floor = self.clock - lateness_ms - MAX_WINDOW_MS
        facts = self.facts  # kept as it is when nothing is to drop (about half the calls)
        if not all(rows and rows[0][EFFECTIVE_MS] > floor for rows in facts.values()):
            facts = {}
            for code, rows in self.facts.items():
                if rows and rows[0][EFFECTIVE_MS] > floor:
                    facts[code] = rows  # nothing to drop: most codes on most batches
                    continue
                i = bisect_left(rows, (floor + 1,))
                if i < len(rows):
                    facts[code] = rows[i:]
                for fact in rows[:i]:  # a pruned fact's content moves to its known entry (rule 2 compares it)
                    entry = self.known.get(fact[FACT_ID])
                    if entry is not None and len(entry) == GONE:
                        self._set_known(fact[FACT_ID], (*entry, (code, fact[VALUE], is_preliminary(fact))))
        known = self.known
        if self._crossed_gc_period(horizon_ms):
            cutoff = self.clock - horizon_ms
            # an expired key whose fact is still live (lateness + the longest window beyond the horizon)
            # stays: a later event of that fact drops the stale copy through it, as it would had no sweep
            # run yet (else the outcome would depend on where a micro-batch ended)
            if expired := [fid for fid, k in known.items() if k[1] < cutoff]:  # k[1]: effective_ms
                still_live = {fact[FACT_ID] for rows in facts.values() for fact in rows[:bisect_left(rows, (cutoff,))]}
                # deleting from a copy keeps the other keys' order, as a filtered copy would, and is cheaper
                known = known.copy() if not self._own_known else known
                for fid in expired:
                    if fid not in still_live:
                        del known[fid]
                        self._set_explicit(fid, None)
        return PatientState(known, facts, self.clock, self.explicit)

    def _crossed_gc_period(self, horizon_ms: int) -> bool:
        """Sweep `known` only when the clock enters a new period of horizon/8: lookups already treat
        expired keys as unknown, so sweeping on every batch would only cost time. `known` thus holds
        at most horizon * 9/8 of event time."""
        period = max(horizon_ms // 8, 1)
        old = self.base.clock
        return self.clock is not None and (old is None or self.clock // period != old // period)
