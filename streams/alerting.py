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
  points (a non-calm point resets the count) and alerts "resolve" (tier = the tier at resolution).
- Suppression: an episode that opens within `suppression_ms` of the last alerted resolution is
  silent while the window lasts. It is deferred, not dropped: at its first scoring point after the
  window, if still medium/high, it alerts "open" at the tier of that point. An episode that never
  alerted resolves silently (the consumer never saw it open) and does not restart the window.
- A scoring point older than the last one seen is stale and changes nothing (the patient clock
  never goes back, so this only happens on a replay of already-applied input).

Alert ids: alert_id = uuid5(NAMESPACE, f"{patient_id}|{episode}|{tier}|{kind}").
- Deterministic: replaying the same scoring points from the same (or an empty) state gives the
  same ids, so a consumer drops duplicates after a restart or a rebuild.
- Independent of wall clock, of scoring time and of the model version: a model hot-reload inside
  an episode neither re-alerts nor changes the ids (the RiskAssessment's `method` names the version).
- Unique: an episode alerts each kind at most once per tier (open once, escalate to high once,
  resolve once), and episode numbers only grow.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, TypedDict

from wardwatch.settings import Settings

Tier = Literal["none", "low", "medium", "high"]
Kind = Literal["open", "escalate", "resolve"]

TIER_RANK: dict[str, int] = {"none": 0, "low": 1, "medium": 2, "high": 3}
ALERTING_RANK = TIER_RANK["medium"]

# fixed forever: changing it changes every alert id and breaks consumers' dedupe
NAMESPACE = uuid.UUID("5b0d5f8e-6a36-5c3e-9a53-2f1d0c7e4a11")

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    alert_reset: float = 0.4  # model probability below which a point can be calm
    resolve_after: int = 2  # consecutive calm scoring points that resolve an episode
    suppression_ms: int = 30 * MINUTE_MS  # re-alert hold-off after an alerted resolution

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> AlertPolicy:
        return cls(alert_reset=settings.alert_reset, **overrides)


class AlertState(TypedDict):
    episode: int  # number of the latest episode (0: none yet)
    open: bool
    alerted_tier: str | None  # highest tier alerted in the open episode; None: not alerted (yet)
    calm_points: int  # consecutive calm points in the open episode
    last_alert_ms: int | None  # scoring time of the last open/escalate
    last_resolve_ms: int | None  # scoring time of the last alerted resolution (suppression window)
    # the latest scoring point, kept so the latest risk per patient can be served
    last_scoring_ms: int | None
    tier: str
    probability: float | None
    news2: int | None
    path: str | None
    model_version: str | None


@dataclass(frozen=True, slots=True)
class AlertDecision:
    alert_id: str
    kind: Kind
    tier: Tier
    episode: int
    scoring_ms: int


def initial_state() -> AlertState:
    return AlertState(episode=0, open=False, alerted_tier=None, calm_points=0, last_alert_ms=None,
                      last_resolve_ms=None, last_scoring_ms=None, tier="none", probability=None, news2=None,
                      path=None, model_version=None)


def alert_id(patient_id: str, episode: int, tier: str, kind: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{patient_id}|{episode}|{tier}|{kind}"))


def step(state: dict | None, *, patient_id: str, scoring_ms: int, tier: Tier, probability: float | None,
         news2: int | None, path: str, model_version: str | None,
         policy: AlertPolicy = AlertPolicy()) -> tuple[AlertState, list[AlertDecision]]:
    """Apply one scoring point; returns the new state (the input is not modified) and the alerts."""
    if tier not in TIER_RANK:
        raise ValueError(f"unknown tier {tier!r}; expected one of {list(TIER_RANK)}")
    s: AlertState = {**initial_state(), **(state or {})}
    if s["last_scoring_ms"] is not None and scoring_ms < s["last_scoring_ms"]:
        return s, []
    s.update(last_scoring_ms=scoring_ms, tier=tier, probability=probability, news2=news2, path=path,
             model_version=model_version)

    def decide(kind: Kind, at_tier: str) -> AlertDecision:
        return AlertDecision(alert_id(patient_id, s["episode"], at_tier, kind), kind, at_tier, s["episode"], scoring_ms)

    rank = TIER_RANK[tier]
    if not s["open"]:
        if rank < ALERTING_RANK:
            return s, []
        s.update(episode=s["episode"] + 1, open=True, alerted_tier=None, calm_points=0)

    calm = rank < ALERTING_RANK and not (path == "model" and (probability is None or probability >= policy.alert_reset))
    if calm:
        s["calm_points"] += 1
        if s["calm_points"] < policy.resolve_after:
            return s, []
        alerted = s["alerted_tier"] is not None
        s.update(open=False, alerted_tier=None, calm_points=0)
        if not alerted:
            return s, []
        s["last_resolve_ms"] = scoring_ms
        return s, [decide("resolve", tier)]

    s["calm_points"] = 0
    if s["alerted_tier"] is None:
        in_window = s["last_resolve_ms"] is not None and scoring_ms < s["last_resolve_ms"] + policy.suppression_ms
        if in_window or rank < ALERTING_RANK:
            return s, []
        kind: Kind = "open"
    elif rank > TIER_RANK[s["alerted_tier"]]:
        kind = "escalate"
    else:
        return s, []
    s.update(alerted_tier=tier, last_alert_ms=scoring_ms)
    return s, [decide(kind, tier)]
