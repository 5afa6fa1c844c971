"""Alert policy: per-patient scoring points -> alert decisions. Pure; event time only.

    state, decisions = step(state, patient_id=..., scoring_ms=..., tier=..., probability=...,
                            news2=..., path=..., model_version=..., policy=AlertPolicy.from_settings(s))

`state` is a JSON-serialisable dict (AlertState) kept per patient in a changelog-backed table;
None for a patient never scored. Tiers rank none < low < medium < high.

Rules
- An alert is a rising edge, never a level. Closed -> tier medium/high opens episode n+1 and
  alerts "open". Inside an open episode a tier above the highest tier alerted so far alerts
  "escalate" (medium -> high). A tier that stays, or dips and comes back, alerts nothing.
- Hysteresis: a scoring point is *calm* when its tier is none/low and, on the model path, its
  probability is below `alert_reset`. The episode resolves after `resolve_after` consecutive calm
  points at distinct times (a non-calm point resets the count), once the patient has been calm for
  `calm_for_ms` of event time since the episode's last non-calm point, and alerts "resolve" (tier =
  the tier at resolution). A calm point may rest on an incomplete NEWS2 (an input not charted in 24 h:
  the rule path's tier from the parameters charted, streams/scoring.py): it counts all the same (resolving
  makes the next deterioration page again, as a new episode; refusing would silence re-deteriorations on
  a feed that never charts one parameter), but the resolution names the inputs not charted at it or any
  calm point counted towards it (AlertDecision.missing, kept in the state as calm_missing), and its
  resource says the episode ended on an incomplete NEWS2, not that the risk is below the line
  (schemas/alert.py). Points at one time (a vitals round sent as several messages, a correction's
  re-score at the clock) count once, and points scored sooner than the cadence's interval (a reading
  raising its parameter's NEWS2 points, schemas/cadence.py) do not make it resolve
  sooner than regular rounds would: calm_for_ms is resolve_after scoring intervals.
  Both are settings (WARDWATCH_ALERT_RESOLVE_AFTER, default 2; WARDWATCH_ALERT_CALM_FOR_S, unset: that
  rule), as is suppression_ms (WARDWATCH_ALERT_SUPPRESSION_S, 30 min): more calm before resolving pages a
  patient hovering at the threshold less often, at the cost that a new deterioration to the tier already
  alerted inside the still-open episode pages nothing (a higher tier still escalates). A change applies
  from the next point: the episode counter is in the state, so published ids stay, new episodes take new
  numbers, and an open episode keeps its id and resolves by the new rule.
- Suppression (the re-alert hold-off): an episode that opens at *medium* within `suppression_ms` of the
  last alerted resolution is silent while the window lasts (a patient flapping around the threshold). It
  is deferred, not dropped: at its first scoring point after the window, if still medium/high, it alerts
  "open" at the tier of that point. A *high* point never waits: NEWS2 >= 7 is RCP 2017's emergency-response
  trigger, so an episode opening high, or a deferred medium one becoming high inside the window, alerts
  "open" at high at once (the same id as a deferred high opening had: patient|episode|high|open). An
  episode that never alerted resolves silently (the consumer never saw it open) and does not restart
  the window.
- A scoring point older than the last one seen is a vitals round charted after a correction was
  re-scored at the patient clock (a lab collected after the last round moves the clock; schemas/
  cadence.py): the newest vitals, older than the clock. It opens or escalates as any point does, but
  never counts as calm and leaves the latest risk (last_scoring_ms, tier, ...) to the newer point.
  (Before, it was taken for a replay and dropped: a NEWS2 of 19 charted so opened no alert. A replay
  of applied input makes no point: the patient state dedupes it.)
- Discharged: a scoring point of a discharged patient (step(discharged=True): the patient's context
  holds a DISCHARGE at or after its ADMISSION, streams/patient_agent.py) opens no episode and escalates
  none. The patient has left the ward: a page would reach a nurse who cannot act, and no later point
  or discharge would ever resolve it, so it would stand on every board for good. Vitals charted late
  for the stay, or a device still sending after the discharge, are still scored (scores topic, CDS).
  A readmission (a newer ADMISSION) lifts it; an episode still open lets calm points resolve it (one
  that such points opened before the discharge arrived is resolved by the discharge: discharge()).

Corrections (correct()): the open episode keeps its alerts (open, escalate) with their basis, the
(fact_id, version) of the observations each was based on (the latest reading of each parameter, what
the published RiskAssessment.basis names). When a message corrects (amends or retracts) a fact one of
the episode's alerts read (the open one and an escalation stand together, so each alert that read it is
corrected, oldest first), a re-score *at that alert's scoring time* with the corrected facts decides
(streams/patient_agent.py makes it; the correction's own scoring point, at the patient clock, is
published as usual and goes to step()). Judged at the clock instead, an alert whose patient had improved
since would be withdrawn as entered-in-error by any correction it read, even one that changes nothing at
its time (a lactate made final, a temperature amended within its NEWS2 band), and one whose patient had
worsened would be amended whatever the error.
An alert read a fact when the fact is in its basis, or when a window feature read it at the alert's time
though it was not the latest reading (`read_at`: the heart rate that set heart_rate_max_6h, one of a
slope's window). streams.patient_agent.read_at tells that from the corrected reading's code and time,
before and after the correction, and the windows ending at the alert's time of the features reading more
than the latest (mean, min, max, count, slope, delta), so the alert state keeps nothing more than the
basis (a 6 h window of a monitor charting every minute holds 360 heart rates). Before, only the basis was
matched, and an alert whose model risk rested on an erroneous earlier reading stood.
- its tier still meets the alert's tier: kind "correction", status "amended" (new probability and
  basis); the alert stays the open one.
- it does not: kind "correction", status "entered-in-error"; the alert is withdrawn. The latest
  alert left in the episode sets its tier again; with none left the episode closes silently (no
  suppression window: an error is not a recovery), so a still-alerting patient opens a new episode.
  Later alerts in that episode carry a revision in their id, so no withdrawn id is ever reused.
  correction id = uuid5(NAMESPACE, f"{original_id}|correction|{fact_id}@{version},...") over the
  corrected facts the alert read (basis and windows), sorted: a restart that replays the correction
  repeats the id.
Limit: when the alert is older than the lateness bound (its time before clock - allowed_lateness) the
state may no longer hold every reading of its windows (pruning, docs/patient-state.md), so the re-score
is the correction's point at the clock, as it was, and only a fact in its basis reaches it (read_at gives
nothing there: judged at the clock, a correction of an earlier reading would withdraw the alert of a
patient who has since improved).
A preliminary result in the basis that becomes final (a new version of the same fact, status final,
or a final result of the same measurement through the other source, which replaces it:
docs/patient-state.md rule 4) is such a correction too, whether or not its value changed: the alert the consumer holds says it rests
on a preliminary reading, and the amended one no longer does (its basis names the final version). So
a clinician who saw "based on preliminary results" sees it cleared, or the alert withdrawn if the
final value no longer supports its tier. A new version that changes nothing (a restatement: a
re-snapshot, a versionId bump; docs/patient-state.md rule 2) is not a correction and never reaches
correct().
After the episode is over (resolved, or discharged) its alerts stand no more, but a reading one of them
rested on may still be amended or entered in error. Such an alert is kept (AlertState.closed) while it is
within the lateness bound of the patient clock (AlertPolicy.correctable_ms), and a correction of a fact it
read (its basis or its windows) re-scores it at its own time as above: if its tier no longer holds, it is
withdrawn (kind "correction", status "entered-in-error"), so a record or an audit never keeps an alert that rested on an error. If the
tier holds, nothing is published: an amendment of an alert that no longer stands changes nothing a consumer
shows (and would read as standing again), so only the kept basis is brought up to date. An alert older
than the bound is not judged: its windows may be pruned, and at the clock the patient's state says nothing
about the alert's time.
Discharge (discharge()): a discharge at or after the open episode's first alert resolves it (kind
"resolve", reason "discharge"); an episode that never alerted closes silently. A discharge dated before
the first alert may be an earlier stay's arriving late, and then leaves the episode open; but one at or
after the current admission (`admitted_ms`) is this stay's, and resolves it whatever the alert's time: vitals
sent after the discharge (a monitor still attached) can arrive before it and open the episode, which no
later point of the discharged patient would escalate or, without calm points, ever resolve.

Alert ids: alert_id = uuid5(NAMESPACE, f"{patient_id}|{episode}|{tier}|{kind}") (plus f"|{revision}"
after an entered-in-error correction in that episode).
- Deterministic: replaying the same scoring points from the same (or an empty) state gives the
  same ids, so a consumer drops duplicates after a restart or a rebuild.
- Independent of wall clock, of scoring time and of the model version: a model hot-reload inside
  an episode neither re-alerts nor changes the ids (the RiskAssessment's `method` names the version).
- Unique: an episode alerts each kind at most once per tier (open once, escalate to high once,
  resolve once), and episode numbers only grow.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, NotRequired, Sequence, TypedDict

from wardwatch.settings import Settings

Tier = Literal["none", "low", "medium", "high"]
Kind = Literal["open", "escalate", "resolve", "correction"]
Status = Literal["final", "amended", "entered-in-error"]
# [[fact_id, version, preliminary code or None, taken_ms], ...]: the observations an alert was based on
# (streams.patient_agent._basis); alerts stored before the time was kept have [fact_id, version] or, for a
# preliminary reading, [fact_id, version, code]
Basis = list[list]
# scoring time T -> the corrected facts (ids) a feature read at T, within its window (streams.patient_agent.read_at)
ReadAt = Callable[[int], Iterable[str]]

TIER_RANK: dict[str, int] = {"none": 0, "low": 1, "medium": 2, "high": 3}
ALERTING_RANK = TIER_RANK["medium"]
HIGH_RANK = TIER_RANK["high"]

# fixed forever: changing it changes every alert id and breaks consumers' dedupe
NAMESPACE = uuid.UUID("5b0d5f8e-6a36-5c3e-9a53-2f1d0c7e4a11")

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    alert_reset: float = 0.4  # model probability below which a point can be calm
    resolve_after: int = 2  # consecutive calm scoring points that resolve an episode
    # event time from the last non-calm point before they may (from_settings: resolve_after scoring
    # intervals, what consecutive points took before readings scoring NEWS2 points were scored sooner)
    calm_for_ms: int = 0
    suppression_ms: int = 30 * MINUTE_MS  # re-alert hold-off after an alerted resolution
    # how long (event time behind the latest scoring point) a closed episode's alert can still be
    # withdrawn by a correction: the lateness bound, beyond which its windows may be pruned
    correctable_ms: int = 12 * 60 * MINUTE_MS

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> AlertPolicy:
        """The policy every plane runs (worker, benchmarks, tests): WARDWATCH_ALERT_RESET, _RESOLVE_AFTER,
        _CALM_FOR_S (unset: resolve_after scoring intervals), _SUPPRESSION_S and the lateness bound."""
        policy = cls(**{"alert_reset": settings.alert_reset, "resolve_after": settings.alert_resolve_after,
                        "suppression_ms": settings.alert_suppression_s * 1000,
                        "correctable_ms": settings.allowed_lateness_s * 1000, **overrides})
        if "calm_for_ms" in overrides:
            return policy
        if settings.alert_calm_for_s is not None:
            return dataclasses.replace(policy, calm_for_ms=settings.alert_calm_for_s * 1000)
        return dataclasses.replace(policy, calm_for_ms=policy.resolve_after * settings.scoring_min_interval_s * 1000)


class AlertState(TypedDict):
    episode: int  # number of the latest episode (0: none yet)
    open: bool
    alerted_tier: str | None  # highest tier alerted in the open episode; None: not alerted (yet)
    calm_points: int  # consecutive calm points in the open episode
    # the NEWS2 inputs not charted in 24 h at any of those calm points (step(missing=...)), in the order first
    # met; kept only while not empty, so a record without it (and every older one) loads as []
    calm_missing: NotRequired[list[str]]
    last_not_calm_ms: int | None  # scoring time of the open episode's last non-calm point (None: before it was kept)
    last_alert_ms: int | None  # scoring time of the last open/escalate
    last_resolve_ms: int | None  # scoring time of the last alerted resolution (suppression window)
    # the latest scoring point, kept so the latest risk per patient can be served
    last_scoring_ms: int | None
    tier: str
    probability: float | None
    news2: int | None
    path: str | None
    model_version: str | None
    # the alerts of the open episode, oldest first (EpisodeAlert dicts); [] when closed (added in
    # issue #5: a state without it loads as [])
    alerts: list[dict]
    revision: int  # entered-in-error corrections in the open episode (part of later alert ids)
    # alerts of closed episodes still within AlertPolicy.correctable_ms, oldest first: EpisodeAlert dicts
    # plus their "episode" (a correction can still withdraw them); a state without it loads as []
    closed: list[dict]


class EpisodeAlert(TypedDict):
    """What a correction needs to know about an alert already sent (kept while its episode is open)."""
    alert_id: str
    kind: str
    tier: str
    scoring_ms: int
    probability: float | None
    news2: int | None
    path: str | None
    model_version: str | None
    rationale: list
    basis: Basis
    # [feature, value, taken_ms]: the readings it rests on older than schemas.alert.STALE_AFTER_MS, said in
    # its rationale (an alert stored before it existed has no "stale": none is said)
    stale: list


@dataclass(frozen=True, slots=True)
class AlertDecision:
    alert_id: str
    kind: Kind
    tier: Tier
    episode: int
    scoring_ms: int
    status: Status = "final"
    original_alert_id: str | None = None  # corrections: the alert they correct
    reason: str | None = None  # e.g. "discharge" for a resolution by discharge
    # a resolution (kind "resolve") on an incomplete NEWS2: the NEWS2 inputs not charted in 24 h at the
    # resolving point or a calm point counted towards it (schemas.alert says so in its note); () else
    missing: tuple[str, ...] = ()


def initial_state() -> AlertState:
    return AlertState(episode=0, open=False, alerted_tier=None, calm_points=0, last_not_calm_ms=None, last_alert_ms=None,
                      last_resolve_ms=None, last_scoring_ms=None, tier="none", probability=None, news2=None,
                      path=None, model_version=None, alerts=[], revision=0, closed=[])


def alert_id(patient_id: str, episode: int, tier: str, kind: str, revision: int = 0) -> str:
    name = f"{patient_id}|{episode}|{tier}|{kind}" + (f"|{revision}" if revision else "")
    return str(uuid.uuid5(NAMESPACE, name))


def correction_id(original_alert_id: str, corrected: Mapping[str, int]) -> str:
    facts = ",".join(f"{fact_id}@{version}" for fact_id, version in sorted(corrected.items()))
    return str(uuid.uuid5(NAMESPACE, f"{original_alert_id}|correction|{facts}"))


def _close(s: AlertState) -> None:
    """End the open episode; its alerts are kept as closed ones (a correction may still withdraw them)."""
    if s["alerts"]:
        s["closed"] = [*s["closed"], *({**a, "episode": s["episode"]} for a in s["alerts"])]
    s.update(open=False, alerted_tier=None, calm_points=0, alerts=[], revision=0)
    s.pop("calm_missing", None)


def step(state: dict | None, *, patient_id: str, scoring_ms: int, tier: Tier, probability: float | None,
         news2: int | None, path: str, model_version: str | None,
         policy: AlertPolicy = AlertPolicy(), rationale: Sequence = (),
         basis: Callable[[], Basis] | None = None, discharged: bool = False,
         stale: Sequence = (), missing: Sequence[str] = ()) -> tuple[AlertState, list[AlertDecision]]:
    """Apply one scoring point; returns the new state (the input is not modified) and the alerts.
    `basis` is called only when the point alerts (it costs a lookup per code). `discharged`: the patient
    has left (module docstring): the point neither opens nor escalates an episode. `missing`: the NEWS2
    inputs not charted in 24 h at this point (streams.scoring.ScoreResult.missing), named by a resolution
    it counts towards (module docstring)."""
    if tier not in TIER_RANK:
        raise ValueError(f"unknown tier {tier!r}; expected one of {list(TIER_RANK)}")
    s: AlertState = {**initial_state(), **(state or {})}
    previous_ms = s["last_scoring_ms"]
    older = previous_ms is not None and scoring_ms < previous_ms  # a round charted after a correction point
    if older and TIER_RANK[tier] < ALERTING_RANK:
        return s, []  # opens nothing, and an old calm point does not make the episode calmer now
    if not older:
        s.update(last_scoring_ms=scoring_ms, tier=tier, probability=probability, news2=news2, path=path,
                 model_version=model_version)
    if s["closed"] and s["closed"][0]["scoring_ms"] < scoring_ms - policy.correctable_ms:
        s["closed"] = [a for a in s["closed"] if a["scoring_ms"] >= scoring_ms - policy.correctable_ms]

    def decide(kind: Kind, at_tier: str) -> AlertDecision:
        return AlertDecision(alert_id(patient_id, s["episode"], at_tier, kind, s["revision"]), kind, at_tier,
                             s["episode"], scoring_ms)

    rank = TIER_RANK[tier]
    if not s["open"]:
        if rank < ALERTING_RANK or discharged:
            return s, []
        s.update(episode=s["episode"] + 1, open=True, alerted_tier=None, calm_points=0, alerts=[], revision=0)
        s.pop("calm_missing", None)

    calm = rank < ALERTING_RANK and not (path == "model" and (probability is None or probability >= policy.alert_reset))
    if calm:
        if scoring_ms != previous_ms:  # another point at the same time is the same moment, not one more
            s["calm_points"] += 1
        if missing:  # its calm rests on an incomplete NEWS2 (even at a time already counted)
            s["calm_missing"] = list(dict.fromkeys([*s.get("calm_missing", ()), *missing]))
        calm_since = s["last_not_calm_ms"]
        if s["calm_points"] < policy.resolve_after or (
                calm_since is not None and scoring_ms - calm_since < policy.calm_for_ms):
            return s, []
        alerted, incomplete = s["alerted_tier"] is not None, tuple(s.get("calm_missing", ()))
        _close(s)
        if not alerted:
            return s, []
        s["last_resolve_ms"] = scoring_ms
        return s, [dataclasses.replace(decide("resolve", tier), missing=incomplete)]

    s["calm_points"], s["last_not_calm_ms"] = 0, max(scoring_ms, s["last_not_calm_ms"] or scoring_ms)
    s.pop("calm_missing", None)
    if discharged:
        return s, []
    if s["alerted_tier"] is None:
        # the hold-off defers a medium opening only (the flapping it exists for): a high one (NEWS2 >= 7, RCP
        # 2017's emergency-response trigger) never waits, nor a deferred medium one that becomes high
        in_window = (rank < HIGH_RANK and s["last_resolve_ms"] is not None
                     and scoring_ms < s["last_resolve_ms"] + policy.suppression_ms)
        if in_window or rank < ALERTING_RANK:
            return s, []
        kind: Kind = "open"
    elif rank > TIER_RANK[s["alerted_tier"]]:
        kind = "escalate"
    else:
        return s, []
    s.update(alerted_tier=tier, last_alert_ms=scoring_ms)
    d = decide(kind, tier)
    s["alerts"] = [*s["alerts"], EpisodeAlert(
        alert_id=d.alert_id, kind=kind, tier=tier, scoring_ms=scoring_ms, probability=probability, news2=news2,
        path=path, model_version=model_version, rationale=list(rationale), basis=basis() if basis else [],
        stale=list(stale))]
    return s, [d]


def correct(state: dict | None, *, corrected: Mapping[str, int], scoring_ms: int, tier: Tier,
            probability: float | None, news2: int | None, path: str, model_version: str | None,
            rationale: Sequence = (), basis: Callable[[], Basis] | None = None,
            superseded: Mapping[str, str] | None = None, stale: Sequence = (),
            rescore: Callable[[EpisodeAlert], dict | None] | None = None,
            read_at: ReadAt | None = None) -> tuple[AlertState, list[AlertDecision]]:
    """Correct each alert of the open episode whose basis `corrected` (fact_id -> new version, the
    corrections applied by one message) touches, oldest first: the open one and any escalation stand
    together, so one resting on a corrected reading must not stand unamended because a later one was
    corrected. The keyword point is the re-score after those corrections; `rescore(alert)` gives the
    point at that alert's own scoring time instead (None: use the keyword point; see the module
    docstring). Call it before step() for the correction's scoring point. Returns the new state and
    one correction per touched alert. `superseded`: preliminary fact_id -> the fact_id (in
    `corrected`) of the final result that came through the other source and replaced it
    (docs/patient-state.md rule 4): a basis naming the preliminary fact is touched by that correction.
    `read_at(T)`: the facts of `corrected` a feature read at scoring time T (within its window), not only
    the latest of each code the basis names: an alert is touched by those at its time too (module docstring)."""
    s: AlertState = {**initial_state(), **(state or {})}
    default = dict(scoring_ms=scoring_ms, tier=tier, probability=probability, news2=news2, path=path,
                   model_version=model_version, rationale=rationale, basis=basis, stale=stale)
    decisions = _correct_closed(s, corrected, superseded, rescore, default, read_at)
    touched = corrected_alerts(s, corrected=corrected, superseded=superseded, read_at=read_at)
    if not touched:
        return s, decisions
    for current, in_basis in touched:
        point = (rescore(current) if rescore else None) or default
        cid = correction_id(current["alert_id"], in_basis)
        at = [a["alert_id"] for a in s["alerts"]].index(current["alert_id"])
        if TIER_RANK[point["tier"]] >= TIER_RANK[current["tier"]]:
            made = point.get("basis")
            amended = EpisodeAlert(**{**current, "scoring_ms": point["scoring_ms"],
                                      "probability": point["probability"], "news2": point["news2"],
                                      "path": point["path"], "model_version": point["model_version"],
                                      "rationale": list(point.get("rationale", ())),
                                      "basis": made() if made else current["basis"],
                                      "stale": list(point.get("stale", ()))})
            s["alerts"] = [*s["alerts"][:at], amended, *s["alerts"][at + 1:]]
            decisions.append(AlertDecision(cid, "correction", point["tier"], s["episode"], point["scoring_ms"],
                                           "amended", current["alert_id"]))
            continue
        s["alerts"] = [*s["alerts"][:at], *s["alerts"][at + 1:]]
        s["revision"] += 1
        if s["alerts"]:  # the latest left is the highest tier alerted (escalations only go up)
            s["alerted_tier"] = s["alerts"][-1]["tier"]
        else:  # the only alert left was an error: close without a suppression window
            s.update(open=False, alerted_tier=None, calm_points=0, alerts=[])
            s.pop("calm_missing", None)
        # withdrawn as it was published: its own time (a point at the clock, beyond the lateness bound, would
        # move the withdrawn alert's occurrenceDateTime and whenPeriod to the correction's time)
        decisions.append(AlertDecision(cid, "correction", current["tier"], s["episode"], current["scoring_ms"],
                                       "entered-in-error", current["alert_id"]))
    return s, decisions


def _correct_closed(s: AlertState, corrected: Mapping[str, int], superseded: Mapping[str, str] | None,
                    rescore: Callable[[EpisodeAlert], dict | None] | None, default: dict,
                    read_at: ReadAt | None = None) -> list[AlertDecision]:
    """Withdraw each closed episode's alert whose basis the corrections touch and whose tier no longer holds
    at its own time (module docstring); one it still holds only gets its basis brought up to date."""
    touched = _touched(s["closed"], corrected, superseded, read_at) if s["closed"] and corrected else []
    decisions = []
    for current, in_basis in touched:
        point = rescore(current) if rescore else None
        if point is None and current["scoring_ms"] == default["scoring_ms"]:
            # the correction's own point is at the alert's time (discharged before the next round: the
            # clock has not moved), so it is the alert's judgement; rescore gives None there
            point = default
        if point is None:  # beyond the lateness bound: not judged (see the module docstring)
            continue
        at = [a["alert_id"] for a in s["closed"]].index(current["alert_id"])
        if TIER_RANK[point["tier"]] >= TIER_RANK[current["tier"]]:
            made = point.get("basis")
            if made:
                s["closed"] = [*s["closed"][:at], {**current, "basis": made(), "stale": list(point.get("stale", ()))},
                               *s["closed"][at + 1:]]
            continue
        s["closed"] = [*s["closed"][:at], *s["closed"][at + 1:]]
        decisions.append(AlertDecision(correction_id(current["alert_id"], in_basis), "correction", current["tier"],
                                       current["episode"], point["scoring_ms"], "entered-in-error",
                                       current["alert_id"]))
    return decisions


def corrected_alerts(state: dict | None, *, corrected: Mapping[str, int], superseded: Mapping[str, str] | None = None,
                     read_at: ReadAt | None = None) -> list[tuple[EpisodeAlert, dict[str, int]]]:
    """The open episode's alerts whose basis these corrections touch, or a reading a feature read at their
    time (`read_at`, see correct()), oldest first, each with the touched facts (fact_id -> new version; a
    superseded preliminary fact is named by its final result)."""
    if not state or not state.get("open") or not state.get("alerts") or not corrected:
        return []
    return _touched(state["alerts"], corrected, superseded, read_at)


def _touched(alerts: Sequence[dict], corrected: Mapping[str, int], superseded: Mapping[str, str] | None,
             read_at: ReadAt | None = None) -> list[tuple[EpisodeAlert, dict[str, int]]]:
    superseded = superseded or {}
    touched = []
    for alert in alerts:
        in_basis = {}
        for fact_id, version, *_ in alert["basis"]:
            if (v := corrected.get(fact_id)) is not None and v > version:
                in_basis[fact_id] = v
            elif (final := superseded.get(fact_id)) is not None:
                in_basis[final] = corrected[final]  # the id names the final result's fact and version
        if read_at is not None:
            # a reading a window feature read at the alert's time; one its basis names at this version or a
            # later one is no news to it (one it names at an older version is in in_basis already)
            named = {entry[0] for entry in alert["basis"]}
            for fact_id in read_at(alert["scoring_ms"]):
                if fact_id not in named and fact_id in corrected:
                    in_basis[fact_id] = corrected[fact_id]
        if in_basis:
            touched.append((alert, in_basis))
    return touched


def discharge(state: dict | None, *, patient_id: str, discharged_ms: int,
              admitted_ms: int | None = None) -> tuple[AlertState, list[AlertDecision]]:
    """A discharge resolves the open episode if it happened at or after the episode's first alert, or if
    it is the current stay's (at or after `admitted_ms`, the current admission): module docstring."""
    s: AlertState = {**initial_state(), **(state or {})}
    if not s["open"]:
        return s, []
    if s["alerted_tier"] is None:  # never alerted: the consumer never saw it open
        _close(s)
        return s, []
    this_stay = admitted_ms is not None and discharged_ms >= admitted_ms
    if s["alerts"] and discharged_ms < s["alerts"][0]["scoring_ms"] and not this_stay:
        return s, []  # may be an earlier stay's discharge arriving late
    tier = s["tier"]
    d = AlertDecision(alert_id(patient_id, s["episode"], tier, "resolve", s["revision"]), "resolve", tier,
                      s["episode"], discharged_ms, reason="discharge")
    _close(s)
    s["last_scoring_ms"] = max(s["last_scoring_ms"] or discharged_ms, discharged_ms)
    return s, [d]
