import copy
import json
import uuid

import pytest

from streams.alerting import AlertPolicy, correct, discharge, step
from wardwatch.settings import Settings

MIN = 60_000
T0 = 1_704_096_000_000  # 2024-01-01T08:00Z
# the published namespace; restating it here makes any change to it (which breaks consumers' dedupe) fail
NAMESPACE = uuid.UUID("5b0d5f8e-6a36-5c3e-9a53-2f1d0c7e4a11")
POLICY = AlertPolicy(alert_reset=0.4, resolve_after=2, suppression_ms=30 * MIN)


def expected_id(patient, episode, tier, kind):
    return str(uuid.uuid5(NAMESPACE, f"{patient}|{episode}|{tier}|{kind}"))


def rule_point(minute, tier):
    return dict(scoring_ms=T0 + minute * MIN, tier=tier, probability=None, news2=None, path="rule", model_version=None)


def model_point(minute, tier, p, version="v1"):
    return dict(scoring_ms=T0 + minute * MIN, tier=tier, probability=p, news2=None, path="model", model_version=version)


def run(points, patient="p1", state=None, policy=POLICY):
    decisions = []
    for point in points:
        state, out = step(state, patient_id=patient, policy=policy, **point)
        decisions += out
    return state, decisions


def summary(decisions):
    return [(d.kind, d.tier, d.episode, (d.scoring_ms - T0) // MIN) for d in decisions]


RISE_AND_FALL = [rule_point(0, "none"), rule_point(5, "medium"), rule_point(10, "medium"), rule_point(15, "high"),
                 rule_point(20, "low"), rule_point(25, "low")]


def test_rising_edges_and_resolution():
    _, decisions = run(RISE_AND_FALL)
    # medium opens, staying medium is silent, high escalates, the second calm point resolves
    assert summary(decisions) == [("open", "medium", 1, 5), ("escalate", "high", 1, 15), ("resolve", "low", 1, 25)]
    assert [d.alert_id for d in decisions] == [expected_id("p1", 1, "medium", "open"),
                                               expected_id("p1", 1, "high", "escalate"),
                                               expected_id("p1", 1, "low", "resolve")]


def test_replaying_the_same_sequence_gives_the_same_ids():
    _, first = run(RISE_AND_FALL)
    _, again = run(RISE_AND_FALL)
    assert first == again
    _, other_patient = run(RISE_AND_FALL, patient="p2")
    assert not {d.alert_id for d in first} & {d.alert_id for d in other_patient}


def test_restart_from_serialised_state_continues_identically():
    _, straight = run(RISE_AND_FALL)
    state, before = run(RISE_AND_FALL[:3])
    restored = json.loads(json.dumps(state))  # what a changelog-backed table gives back
    _, after = run(RISE_AND_FALL[3:], state=restored)
    assert before + after == straight


def test_model_version_change_inside_an_episode_changes_nothing():
    points = [model_point(0, "medium", 0.6, "v1"), model_point(5, "high", 0.8, "v1"),
              model_point(10, "none", 0.1, "v1"), model_point(15, "none", 0.1, "v1")]
    switched = [dict(p, model_version="v2") if i >= 1 else p for i, p in enumerate(points)]
    assert run(points)[1] == run(switched)[1]


def test_dipping_and_coming_back_does_not_realert():
    points = [rule_point(0, "high"), rule_point(5, "medium"), rule_point(10, "high"), rule_point(15, "low"),
              rule_point(20, "high")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "high", 1, 0)]


def test_resolution_needs_consecutive_calm_points():
    points = [rule_point(0, "medium"), rule_point(5, "low"), rule_point(10, "medium"), rule_point(15, "none"),
              rule_point(20, "none")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 20)]


def test_model_path_hysteresis_uses_alert_reset():
    # "low" at p 0.45 is above alert_reset 0.4: not calm, the episode stays open
    points = [model_point(0, "medium", 0.55), model_point(5, "low", 0.45), model_point(10, "low", 0.45),
              model_point(15, "none", 0.2), model_point(20, "low", 0.41), model_point(25, "none", 0.3),
              model_point(30, "none", 0.39)]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 30)]


def test_resolve_after_is_configurable():
    points = [rule_point(0, "medium"), rule_point(5, "low"), rule_point(10, "low"), rule_point(15, "low")]
    _, decisions = run(points, policy=AlertPolicy(resolve_after=3))
    assert summary(decisions)[-1] == ("resolve", "low", 1, 15)


def test_a_medium_reopening_inside_the_suppression_window_is_deferred_not_dropped():
    points = [rule_point(0, "medium"), rule_point(5, "none"), rule_point(10, "none"),  # resolved at 10
              rule_point(20, "medium"),  # episode 2 opens at medium 10 min after the resolution: silent
              rule_point(35, "medium"),  # still inside the window (until 40): silent
              rule_point(40, "medium"),  # first point after the window: alerted now
              rule_point(45, "medium")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 10), ("open", "medium", 2, 40)]
    assert decisions[-1].alert_id == expected_id("p1", 2, "medium", "open")


def test_a_high_opening_inside_the_suppression_window_pages_at_once():
    # NEWS2 >= 7 is RCP 2017's emergency-response trigger: the hold-off must not hold it. Before, a high point 5
    # and 20 min after the resolution paged nothing, and "open high" came at the first point after the window
    points = [rule_point(0, "medium"), rule_point(10, "none"), rule_point(20, "none"),  # resolved at 20
              rule_point(25, "high"), rule_point(40, "high"), rule_point(51, "high")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 20), ("open", "high", 2, 25)]
    assert decisions[-1].alert_id == expected_id("p1", 2, "high", "open")


def test_a_deferred_medium_opening_that_becomes_high_inside_the_window_pages_at_once_as_high():
    points = [rule_point(0, "medium"), rule_point(5, "none"), rule_point(10, "none"),  # resolved at 10
              rule_point(20, "medium"),  # deferred
              rule_point(25, "high"),  # inside the window (until 40): pages now, as high
              rule_point(40, "high"), rule_point(45, "medium"), rule_point(50, "high")]  # the episode's open stands
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 10), ("open", "high", 2, 25)]
    assert decisions[-1].alert_id == expected_id("p1", 2, "high", "open")
    # a restart replaying the same points (from the state before them, as the changelog gives it back) repeats them
    state, before = run(points[:4])
    _, after = run(points[4:], state=json.loads(json.dumps(state)))
    assert before + after == decisions


def test_a_silent_episode_resolves_silently():
    points = [rule_point(0, "medium"), rule_point(5, "none"), rule_point(10, "none"),
              rule_point(15, "medium"), rule_point(20, "low"), rule_point(25, "low"),  # episode 2: silent
              rule_point(45, "medium")]  # 35 min after the last *alerted* resolution: episode 3 alerts
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 10), ("open", "medium", 3, 45)]


def test_after_the_window_a_new_episode_alerts_at_once():
    points = [rule_point(0, "high"), rule_point(5, "none"), rule_point(10, "none"), rule_point(40, "medium")]
    _, decisions = run(points)
    assert summary(decisions)[-1] == ("open", "medium", 2, 40)


def test_low_never_opens_an_episode():
    state, decisions = run([rule_point(0, "low"), model_point(5, "low", 0.49), rule_point(10, "none")])
    assert decisions == []
    assert state["episode"] == 0 and not state["open"]


def test_calm_points_at_one_time_count_once_toward_resolution():
    # one vitals round sent as several messages scores at the same time more than once (schemas/cadence.py);
    # counted as two calm rounds it resolved the episode, and a later deterioration then waited out the
    # suppression window in silence
    points = [rule_point(0, "high"), rule_point(5, "low"), rule_point(5, "low"), rule_point(5, "none")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "high", 1, 0)]
    _, decisions = run([*points, rule_point(10, "low")])  # a second calm round does
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "low", 1, 10)]


def test_points_scored_sooner_than_the_interval_do_not_resolve_an_episode_sooner():
    # a reading scoring NEWS2 points is scored inside the scoring interval (schemas/cadence.py): a monitor
    # charting every minute must not turn two calm minutes into a resolution that regular rounds (5 min
    # apart, resolve_after 2) reach only 10 min after the last non-calm point
    policy = AlertPolicy(alert_reset=0.4, resolve_after=2, suppression_ms=30 * MIN, calm_for_ms=2 * 5 * MIN)
    every_minute = [rule_point(0, "high"), *(rule_point(m, "low") for m in range(1, 12))]
    _, decisions = run(every_minute, policy=policy)
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "low", 1, 10)]
    _, decisions = run([rule_point(0, "high"), rule_point(5, "low"), rule_point(10, "low")], policy=policy)
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "low", 1, 10)]  # regular rounds: as before
    # a non-calm point restarts the clock
    _, decisions = run([*every_minute[:9], rule_point(9, "medium"), *(rule_point(m, "low") for m in range(10, 21))],
                       policy=policy)
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "low", 1, 19)]


def test_from_settings_the_calm_time_is_resolve_after_scoring_intervals():
    from wardwatch.settings import Settings

    assert AlertPolicy.from_settings(Settings(scoring_min_interval_s=300)).calm_for_ms == 2 * 300_000
    assert AlertPolicy.from_settings(Settings(scoring_min_interval_s=0)).calm_for_ms == 0  # every set is scored


# --- the calm rule as the ward's clinical owners set it (WARDWATCH_ALERT_RESOLVE_AFTER, _CALM_FOR_S, _SUPPRESSION_S)

def news2_point(hour, news2):
    """An hourly NEWS2 round on the rule path: 5-6 medium, 7+ high, else none (streams/scoring.py)."""
    tier = "high" if news2 >= 7 else "medium" if news2 >= 5 else "none"
    return dict(scoring_ms=T0 + hour * 60 * MIN, tier=tier, probability=None, news2=news2, path="rule",
                model_version=None)


def test_resolve_after_set_to_3_keeps_the_episode_open_through_two_calm_points_and_resolves_at_the_third():
    policy = AlertPolicy.from_settings(Settings(alert_resolve_after=3))
    points = [rule_point(0, "medium"), rule_point(5, "low"), rule_point(10, "low")]
    state, decisions = run(points, policy=policy)
    assert summary(decisions) == [("open", "medium", 1, 0)] and state["open"]  # the default resolves here
    _, decisions = run([*points, rule_point(15, "low")], policy=policy)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "low", 1, 15)]


def test_a_longer_calm_duration_keeps_open_an_episode_the_default_resolves():
    rounds = [rule_point(0, "high"), *(rule_point(m, "none") for m in range(5, 65, 5))]
    _, decisions = run(rounds, policy=AlertPolicy.from_settings(Settings()))
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "none", 1, 10)]
    _, decisions = run(rounds, policy=AlertPolicy.from_settings(Settings(alert_calm_for_s=3600)))
    assert summary(decisions) == [("open", "high", 1, 0), ("resolve", "none", 1, 60)]  # an hour calm


def test_the_suppression_window_is_a_setting():
    # the default holds back a reopening 10 min after the resolution; with the hold-off off it pages at once
    points = [rule_point(0, "medium"), rule_point(5, "none"), rule_point(10, "none"), rule_point(20, "medium")]
    _, decisions = run(points, policy=AlertPolicy.from_settings(Settings()))
    assert [d.kind for d in decisions] == ["open", "resolve"]
    _, decisions = run(points, policy=AlertPolicy.from_settings(Settings(alert_suppression_s=0)))
    assert summary(decisions)[-1] == ("open", "medium", 2, 20)


# a patient hovering at the NEWS2 threshold (README): 5, then two rounds at 4, then 5 again, hourly for a day.
# (Strictly alternating 5, 4, 5, 4 never resolves even by default: two calm points in a row are needed.)
HOVERING = [news2_point(h, 5 if h % 3 == 0 else 4) for h in range(24)]


@pytest.mark.parametrize("stricter", [{"alert_resolve_after": 3}, {"alert_calm_for_s": 3 * 3600}])
def test_a_stricter_calm_rule_opens_fewer_episodes_for_a_patient_hovering_at_the_threshold(stricter):
    _, default = run(HOVERING, policy=AlertPolicy.from_settings(Settings()))
    _, strict = run(HOVERING, policy=AlertPolicy.from_settings(Settings(**stricter)))
    opens = lambda decisions: [d for d in decisions if d.kind == "open"]  # noqa: E731
    assert len(opens(default)) == 8  # paged at every return to 5
    assert summary(strict) == [("open", "medium", 1, 0)]  # one episode, open all day


def test_the_cost_of_a_stricter_calm_rule_a_new_deterioration_in_the_open_episode_is_not_paged_unless_higher():
    # after two calm rounds the patient is back at NEWS2 6: by default a new episode pages (an hour after the
    # resolution, past the hold-off); with resolve_after 3 the episode is still open at medium and 6 is medium:
    # no page. A NEWS2 of 7 (high) still escalates inside the episode.
    points = [news2_point(0, 5), news2_point(1, 4), news2_point(2, 4), news2_point(3, 6)]
    _, default = run(points, policy=AlertPolicy.from_settings(Settings()))
    assert [(d.kind, d.tier, d.episode) for d in default] == [("open", "medium", 1), ("resolve", "none", 1),
                                                              ("open", "medium", 2)]
    strict = AlertPolicy.from_settings(Settings(alert_resolve_after=3))
    state, decisions = run(points, policy=strict)
    assert [(d.kind, d.tier, d.episode) for d in decisions] == [("open", "medium", 1)]  # the NEWS2 of 6: silent
    _, decisions = run([news2_point(4, 7)], state=state, policy=strict)
    assert [(d.kind, d.tier, d.episode) for d in decisions] == [("escalate", "high", 1)]


def test_an_older_point_alerts_but_never_calms_nor_replaces_the_latest_risk():
    # an older point is a vitals round charted after a correction point at the clock (streams/alerting.py): the
    # newest vitals. Before, it was dropped as a replay and a high NEWS2 charted so alerted nothing
    state, _ = run([rule_point(0, "medium")])
    after, decisions = step(state, patient_id="p1", policy=POLICY, **rule_point(-5, "high"))
    assert summary(decisions) == [("escalate", "high", 1, -5)]
    assert (after["last_scoring_ms"], after["tier"]) == (state["last_scoring_ms"], "medium")
    closed, _ = run([rule_point(0, "low")])  # never alerted: nothing open
    opened, decisions = step(closed, patient_id="p1", policy=POLICY, **rule_point(-5, "high"))
    assert summary(decisions) == [("open", "high", 1, -5)]
    # an older calm point changes nothing: it says nothing about the patient now
    calm, decisions = step(state, patient_id="p1", policy=POLICY, **rule_point(-5, "low"))
    assert decisions == [] and calm == state


def test_same_time_rescore_after_a_correction_is_applied():
    # a correction re-scores the patient at the same clock
    _, decisions = run([rule_point(0, "medium"), rule_point(0, "high")])
    assert summary(decisions) == [("open", "medium", 1, 0), ("escalate", "high", 1, 0)]


def test_step_does_not_modify_its_input_and_state_is_json():
    state, _ = run(RISE_AND_FALL[:2])
    frozen = copy.deepcopy(state)
    new_state, _ = step(state, patient_id="p1", policy=POLICY, **rule_point(15, "high"))
    assert state == frozen
    assert json.loads(json.dumps(new_state)) == new_state
    assert new_state["tier"] == "high" and new_state["alerted_tier"] == "high"


def test_unknown_tier_is_a_bug():
    with pytest.raises(ValueError):
        step(None, patient_id="p1", **rule_point(0, "critical"))


def test_policy_from_settings_takes_alert_reset():
    assert AlertPolicy.from_settings(Settings(alert_reset=0.25)).alert_reset == 0.25


# --- corrections and discharge -------------------------------------------------------------------

BASIS = lambda: [["hr:1", 1], ["rr:1", 1]]  # noqa: E731  the observations the alert was based on


def opened(tier="high", minute=0):
    state, [d] = step(None, patient_id="p1", policy=POLICY, basis=BASIS, **rule_point(minute, tier))
    return state, d


def test_retracting_a_basis_fact_that_made_the_risk_withdraws_the_alert():
    state, original = opened("high")
    state, [c] = correct(state, corrected={"rr:1": 2}, **rule_point(0, "none"))
    assert (c.kind, c.status, c.original_alert_id, c.tier) == ("correction", "entered-in-error", original.alert_id,
                                                               "high")
    assert c.alert_id == str(uuid.uuid5(NAMESPACE, f"{original.alert_id}|correction|rr:1@2"))
    assert not state["open"] and state["alerts"] == []
    # the error is not a recovery: no suppression window, a real rise alerts at once with a fresh id
    state, [again] = step(state, patient_id="p1", policy=POLICY, **rule_point(5, "medium"))
    assert (again.kind, again.episode) == ("open", 2) and again.alert_id != original.alert_id


def test_an_alert_withdrawn_beyond_the_lateness_bound_keeps_its_own_time():
    """An alert older than the lateness bound is judged by the correction's point at the clock (no re-score at
    its time). Withdrawn, it is the resource as published, with status entered-in-error: its occurrenceDateTime
    moved to the correction's time, and a consumer upserting by id saw the withdrawn alert jump hours later."""
    state, original = opened("high", 0)
    state, [c] = correct(state, corrected={"rr:1": 2}, **rule_point(300, "none"))  # rescore: none, at the clock
    assert (c.status, c.original_alert_id) == ("entered-in-error", original.alert_id)
    assert c.scoring_ms == original.scoring_ms == T0


def test_amending_a_basis_fact_that_keeps_the_tier_amends_the_alert():
    state, original = opened("high")
    new_basis = [["hr:1", 1], ["rr:1", 3]]
    state, [c] = correct(state, corrected={"rr:1": 3}, basis=lambda: new_basis,
                         **{**model_point(0, "high", 0.81), "scoring_ms": T0})
    assert (c.status, c.original_alert_id, c.tier) == ("amended", original.alert_id, "high")
    assert state["open"] and state["alerts"][-1]["basis"] == new_basis
    assert state["alerts"][-1]["probability"] == 0.81
    # a second amendment of the same fact version is the same correction; a later version is a new one
    _, [again] = correct(state, corrected={"rr:1": 4}, **rule_point(0, "high"))
    assert again.alert_id != c.alert_id


def test_a_correction_outside_the_basis_changes_nothing():
    state, _ = opened("high")
    assert correct(state, corrected={"spo2:9": 2}, **rule_point(0, "none")) == (state, [])
    assert correct(state, corrected={"rr:1": 1}, **rule_point(0, "none")) == (state, [])  # not newer


def test_withdrawing_an_escalation_falls_back_to_the_open_alert_and_never_reuses_its_id():
    state, first = opened("medium", 0)
    state, [esc] = step(state, patient_id="p1", policy=POLICY, basis=lambda: [["rr:2", 1]], **rule_point(5, "high"))
    state, [c] = correct(state, corrected={"rr:2": 2}, **rule_point(5, "medium"))
    assert (c.status, c.original_alert_id) == ("entered-in-error", esc.alert_id)
    assert state["open"] and state["alerted_tier"] == "medium"
    state, [esc2] = step(state, patient_id="p1", policy=POLICY, **rule_point(10, "high"))
    assert esc2.kind == "escalate" and esc2.alert_id not in {esc.alert_id, first.alert_id}
    assert esc2.alert_id == str(uuid.uuid5(NAMESPACE, "p1|1|high|escalate|1"))


def escalated_over_a_shared_reading():
    """An open medium alert (basis hr:1, rr:1) escalated to high (basis hr:1, rr:2): both stand."""
    state, first = opened("medium", 0)
    state, [esc] = step(state, patient_id="p1", policy=POLICY, basis=lambda: [["hr:1", 1], ["rr:2", 1]],
                        **rule_point(5, "high"))
    return state, first, esc


def test_a_reading_in_the_open_alerts_basis_only_corrects_the_open_alert_under_an_escalation():
    """The open alert stands next to its escalation: a retracted reading it rested on must withdraw it,
    not leave it standing on an error because only the latest alert was looked at."""
    state, first, esc = escalated_over_a_shared_reading()
    state, [c] = correct(state, corrected={"rr:1": 2}, **rule_point(5, "none"))
    assert (c.status, c.original_alert_id, c.tier) == ("entered-in-error", first.alert_id, "medium")
    # the escalation stands: the episode stays open at its tier
    assert state["open"] and state["alerted_tier"] == "high"
    assert [a["alert_id"] for a in state["alerts"]] == [esc.alert_id]
    # judged at its own time (rescore) the open alert may still hold: then it is amended in place
    state2, _, _ = escalated_over_a_shared_reading()
    state2, [amended] = correct(state2, corrected={"rr:1": 2}, rescore=lambda alert: rule_point(0, "medium")
                                | {"basis": lambda: [["hr:1", 1], ["rr:1", 2]]}, **rule_point(5, "none"))
    assert (amended.status, amended.original_alert_id) == ("amended", first.alert_id)
    assert [a["basis"] for a in state2["alerts"]] == [[["hr:1", 1], ["rr:1", 2]], [["hr:1", 1], ["rr:2", 1]]]


def test_a_reading_both_alerts_rest_on_corrects_each_of_them_oldest_first():
    state, first, esc = escalated_over_a_shared_reading()
    seen = []

    def at_own_time(alert):  # each alert is judged at its own time: both fall below their tier there
        seen.append(alert["alert_id"])
        return rule_point((alert["scoring_ms"] - T0) // MIN, "low")

    state, corrections = correct(state, corrected={"hr:1": 2}, rescore=at_own_time, **rule_point(5, "high"))
    assert seen == [first.alert_id, esc.alert_id]
    assert [(c.status, c.original_alert_id) for c in corrections] == [("entered-in-error", first.alert_id),
                                                                      ("entered-in-error", esc.alert_id)]
    assert len({c.alert_id for c in corrections}) == 2
    assert not state["open"] and state["alerts"] == []  # nothing stands: closed, no suppression window


def test_a_reading_a_window_feature_read_at_the_alerts_time_corrects_it_though_not_in_its_basis():
    """hr:0 is no basis entry (not the latest heart rate), but a window feature read it at the alert's time
    (read_at says so): its error withdraws the alert judged at its own time, or amends it where the tier holds."""
    read_at_open = lambda T: ["hr:0"] if T == T0 else []  # noqa: E731
    state, original = opened("high")
    withdrawn, [c] = correct(state, corrected={"hr:0": 2}, read_at=read_at_open, rescore=judged_at("none"),
                             **rule_point(30, "high"))
    assert (c.status, c.original_alert_id, c.scoring_ms) == ("entered-in-error", original.alert_id, T0)
    assert c.alert_id == str(uuid.uuid5(NAMESPACE, f"{original.alert_id}|correction|hr:0@2"))
    assert not withdrawn["open"]
    amended, [c] = correct(state, corrected={"hr:0": 2}, read_at=read_at_open, rescore=judged_at("high"),
                           **rule_point(30, "none"))
    assert (c.status, c.original_alert_id, c.scoring_ms) == ("amended", original.alert_id, T0)
    assert amended["alerts"][0]["basis"] == BASIS()  # the rescore made none: the latest readings stay
    # a reading no feature read at the alert's time (after it, older than every window) touches nothing
    assert correct(state, corrected={"hr:0": 2}, read_at=lambda T: [], rescore=judged_at("none"),
                   **rule_point(30, "none")) == (state, [])


def test_a_window_reading_corrects_only_the_alerts_whose_time_read_it_and_is_named_once():
    state, first, esc = escalated_over_a_shared_reading()
    # rr:0 was read at the escalation's time only (taken between the two alerts); hr:1 is in both bases
    state, corrections = correct(state, corrected={"rr:0": 2, "hr:1": 2},
                                 read_at=lambda T: ["rr:0", "hr:1"] if T == T0 + 5 * MIN else ["hr:1"],
                                 rescore=lambda alert: judged_at("high")(alert) | {"basis": lambda: [["hr:1", 2]]},
                                 **rule_point(5, "high"))
    assert [(c.status, c.original_alert_id) for c in corrections] == [("amended", first.alert_id),
                                                                      ("amended", esc.alert_id)]
    assert corrections[0].alert_id == str(uuid.uuid5(NAMESPACE, f"{first.alert_id}|correction|hr:1@2"))
    assert corrections[1].alert_id == str(uuid.uuid5(NAMESPACE, f"{esc.alert_id}|correction|hr:1@2,rr:0@2"))
    # a version the basis already names (the amendments made it) is no news to the alert
    assert correct(state, corrected={"hr:1": 2}, read_at=lambda T: ["hr:1"], rescore=judged_at("none"),
                   **rule_point(5, "none"))[1] == []


def test_a_closed_alert_is_withdrawn_by_an_error_in_a_reading_its_windows_read():
    state, original = resolved_episode()
    state, [c] = correct(state, corrected={"spo2:0": 2}, read_at=lambda T: ["spo2:0"] if T == T0 else [],
                         rescore=judged_at("none"), **rule_point(10, "none"))
    assert (c.kind, c.status, c.original_alert_id, c.scoring_ms) == (
        "correction", "entered-in-error", original.alert_id, T0)
    assert state["closed"] == []


def resolved_episode(close=None):
    """An open high alert on BASIS at minute 0, then two calm points: the episode resolves at minute 10
    (or `close` ends it)."""
    state, original = opened("high", 0)
    if close:
        state = close(state)
    else:
        state, [resolved] = run([rule_point(5, "low"), rule_point(10, "low")], state=state)[0:2]
        assert resolved.kind == "resolve"
    assert not state["open"]
    return state, original


def judged_at(tier):
    """A rescore at the alert's own time that gives `tier` there."""
    return lambda alert: rule_point((alert["scoring_ms"] - T0) // MIN, tier)


def test_a_resolved_alert_whose_basis_was_an_error_is_withdrawn():
    """The episode is over, but the record must not keep an alert that rested on an error: a retraction
    of its reading, judged at the alert's time, withdraws it."""
    state, original = resolved_episode()
    state, [c] = correct(state, corrected={"rr:1": 2}, rescore=judged_at("none"), **rule_point(0, "none"))
    assert (c.kind, c.status, c.original_alert_id, c.tier, c.episode) == (
        "correction", "entered-in-error", original.alert_id, "high", 1)
    assert c.scoring_ms == T0  # judged at the alert's time
    assert c.alert_id == str(uuid.uuid5(NAMESPACE, f"{original.alert_id}|correction|rr:1@2"))
    assert not state["open"] and state["closed"] == []
    # withdrawn once: a later correction of the same reading finds nothing to withdraw
    assert correct(state, corrected={"rr:1": 3}, rescore=judged_at("none"), **rule_point(0, "none"))[1] == []
    # the next episode is unaffected: it opens as it would have
    _, [again] = step(state, patient_id="p1", policy=POLICY, **rule_point(60, "medium"))
    assert (again.kind, again.episode) == ("open", 2)


def test_a_resolved_alert_that_still_holds_at_its_time_publishes_nothing():
    """An amendment of an alert that no longer stands changes nothing a consumer shows; its kept basis
    follows the amendment, so a later error in the same reading is judged on the new version."""
    state, original = resolved_episode()
    new_basis = [["hr:1", 1], ["rr:1", 2]]
    state, decisions = correct(state, corrected={"rr:1": 2}, **rule_point(0, "none"),
                               rescore=lambda alert: rule_point(0, "high") | {"basis": lambda: new_basis})
    assert decisions == [] and [a["basis"] for a in state["closed"]] == [new_basis]
    _, [c] = correct(state, corrected={"rr:1": 3}, rescore=judged_at("low"), **rule_point(0, "none"))
    assert (c.status, c.original_alert_id) == ("entered-in-error", original.alert_id)


def test_a_discharged_episodes_alert_can_still_be_withdrawn():
    state, original = resolved_episode(
        close=lambda s: discharge(s, patient_id="p1", discharged_ms=T0 + 30 * MIN)[0])
    _, [c] = correct(state, corrected={"hr:1": 2}, rescore=judged_at("low"), **rule_point(0, "none"))
    assert (c.status, c.original_alert_id) == ("entered-in-error", original.alert_id)


def test_a_discharge_before_the_next_round_leaves_the_alert_judged_by_the_corrections_own_point():
    """Alerted, then discharged (say to intensive care) before another reading: the patient clock is
    still the alert's time, so the correction's point is the alert re-scored at its own time (rescore
    gives None there, as for the open episode): it withdraws the alert, or keeps it where it holds."""
    def discharged(s):
        return discharge(s, patient_id="p1", discharged_ms=T0 + 5 * MIN)[0]

    state, original = resolved_episode(close=discharged)
    state, [c] = correct(state, corrected={"rr:1": 2}, rescore=lambda alert: None, **rule_point(0, "none"))
    assert (c.kind, c.status, c.original_alert_id, c.scoring_ms) == (
        "correction", "entered-in-error", original.alert_id, T0)
    assert state["closed"] == []
    state, original = resolved_episode(close=discharged)
    state, decisions = correct(state, corrected={"rr:1": 2}, rescore=lambda alert: None, **rule_point(0, "high"))
    assert decisions == [] and [a["alert_id"] for a in state["closed"]] == [original.alert_id]


def test_forgetting_a_closed_alert_beyond_the_lateness_bound_keeps_a_later_episodes_one_within_it():
    """The bound is per alert: a scoring point that forgets an old episode's alert must keep a newer
    closed one still within it (here exactly at it), which a correction of its reading still withdraws."""
    policy = AlertPolicy(alert_reset=0.4, resolve_after=2, suppression_ms=30 * MIN, correctable_ms=60 * MIN)
    state, _ = opened("high", 0)
    state, _ = run([rule_point(5, "low"), rule_point(10, "low")], state=state, policy=policy)
    second = dict(rule_point(40, "high"), basis=lambda: [["hr:2", 1]])
    state, [original] = step(state, patient_id="p1", policy=policy, **second)
    state, _ = run([rule_point(45, "low"), rule_point(50, "low")], state=state, policy=policy)
    assert len(state["closed"]) == 2
    state, _ = run([rule_point(100, "none")], state=state, policy=policy)  # episode 2's: exactly at the bound
    assert [a["alert_id"] for a in state["closed"]] == [original.alert_id]
    _, [c] = correct(state, corrected={"hr:2": 2}, rescore=judged_at("low"), **rule_point(100, "none"))
    assert (c.status, c.original_alert_id) == ("entered-in-error", original.alert_id)


def test_a_model_point_exactly_at_the_reset_probability_is_not_calm():
    """Hysteresis: calm is a probability below alert_reset (module docstring). A point at exactly the reset
    (tier low) restarts the count; only two points below it resolve the episode."""
    points = [model_point(0, "medium", 0.6), model_point(5, "low", 0.4), model_point(10, "low", 0.3)]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0)]
    _, decisions = run([*points, model_point(15, "low", 0.3)])
    assert summary(decisions)[-1] == ("resolve", "low", 1, 15)

def test_a_closed_alert_beyond_the_lateness_bound_is_not_judged():
    state, _ = resolved_episode()
    # not judgeable at its time (the rescore says so): nothing is published, the alert is kept; the
    # correction's point is at the clock (minute 10, the resolve), not at the alert's time
    kept, decisions = correct(state, corrected={"rr:1": 2}, rescore=lambda alert: None, **rule_point(10, "none"))
    assert decisions == [] and len(kept["closed"]) == 1
    # a scoring point more than the bound after the alert forgets it (event time, not wall clock)
    policy = AlertPolicy(correctable_ms=60 * MIN)
    state, _ = step(state, patient_id="p1", policy=policy, **rule_point(60, "none"))
    assert len(state["closed"]) == 1  # exactly at the bound: kept
    state, _ = step(state, patient_id="p1", policy=policy, **rule_point(61, "none"))
    assert state["closed"] == []
    assert correct(state, corrected={"rr:1": 2}, rescore=judged_at("none"), **rule_point(0, "none"))[1] == []
    assert AlertPolicy.from_settings(Settings(allowed_lateness_s=7200)).correctable_ms == 7200 * 1000


def test_discharge_resolves_the_open_episode_once():
    state, _ = opened("high", 0)
    state, [d] = discharge(state, patient_id="p1", discharged_ms=T0 + 30 * MIN)
    assert (d.kind, d.reason, d.tier, d.episode) == ("resolve", "discharge", "high", 1)
    assert d.alert_id == expected_id("p1", 1, "high", "resolve")
    assert discharge(state, patient_id="p1", discharged_ms=T0 + 30 * MIN)[1] == []  # redelivered: nothing


def test_a_discharge_before_the_alert_does_not_resolve_it():
    state, _ = opened("high", 60)
    assert discharge(state, patient_id="p1", discharged_ms=T0)[1] == []
    # an earlier stay's, as far as anyone knows: the current admission is after it
    assert discharge(state, patient_id="p1", discharged_ms=T0, admitted_ms=T0 + 30 * MIN)[1] == []


def test_the_current_stays_discharge_resolves_an_alert_opened_after_it_by_vitals_that_arrived_first():
    """A monitor still sending after the discharge: its vitals reach the stream before the discharge
    row (charted later, dated back) and open an episode. The discharge must end it, or it stands on
    the board for good: the discharged patient's later points neither escalate nor open anything."""
    state, _ = opened("high", 10)
    state, [d] = discharge(state, patient_id="p1", discharged_ms=T0, admitted_ms=T0 - 60 * MIN)
    assert (d.kind, d.reason, d.tier, d.episode) == ("resolve", "discharge", "high", 1) and not state["open"]
    assert discharge(state, patient_id="p1", discharged_ms=T0, admitted_ms=T0 - 60 * MIN)[1] == []  # once


def test_a_discharge_at_the_very_time_of_the_current_admission_is_this_stays():
    """"At or after" the admission (discharge()): an admission and its discharge charted at one time (a
    cancelled admission, a day case) end the alert that vitals arriving first opened; otherwise it would
    stand on the board for good."""
    state, _ = opened("high", 10)
    state, [d] = discharge(state, patient_id="p1", discharged_ms=T0, admitted_ms=T0)
    assert (d.kind, d.reason, d.tier) == ("resolve", "discharge", "high") and not state["open"]

def test_a_discharged_patient_is_never_paged_by_a_new_or_escalated_alert():
    """A device still sending, or vitals charted after the discharge was recorded: nobody on the ward can act,
    and nothing would ever resolve such an alert (the discharge is already applied)."""
    state, decisions = run([rule_point(0, "medium")])
    state, _ = discharge(state, patient_id="p1", discharged_ms=T0 + 5 * MIN)
    for minute in (40, 50, 60):  # past the suppression window
        state, out = step(state, patient_id="p1", policy=POLICY, discharged=True, **rule_point(minute, "high"))
        assert out == [] and not state["open"]
    assert state["last_scoring_ms"] == T0 + 60 * MIN and state["tier"] == "high"  # still the latest risk
    # readmitted: the next point alerts as usual
    _, [d] = step(state, patient_id="p1", policy=POLICY, **rule_point(70, "high"))
    assert (d.kind, d.tier, d.episode) == ("open", "high", 2)
    # an episode still open when the discharge came (it preceded the first alert) escalates no more
    state, _ = opened("medium", 0)
    state, out = step(state, patient_id="p1", policy=POLICY, discharged=True, **rule_point(10, "high"))
    assert out == [] and state["alerted_tier"] == "medium"


def test_states_written_before_corrections_existed_still_step():
    old = {k: v for k, v in opened("high")[0].items() if k not in ("alerts", "revision")}
    state, corrections = correct(old, corrected={"rr:1": 2}, **rule_point(0, "none"))
    assert corrections == [] and state["open"]  # no recorded basis: nothing to correct, nothing breaks
    _, [d] = discharge(old, patient_id="p1", discharged_ms=T0)
    assert d.kind == "resolve"


# --- a resolution resting on an incomplete NEWS2 (an input not charted in 24 h: the rule path's partial sum)

def incomplete_point(minute, tier, *missing):
    """A rule-path point without a NEWS2 (streams/scoring.py: tier from the parameters charted)."""
    return dict(rule_point(minute, tier), missing=list(missing))


def resolution_resource(decision):
    from fhir.resources.R4B.riskassessment import RiskAssessment

    from schemas.alert import build_alert

    resource = build_alert(decision, patient_id="p1", encounter_id="e1", probability=None, news2=None,
                           model_version=None, path="rule", rationale=[], basis=[])["resource"]
    RiskAssessment.model_validate(resource)  # still a valid FHIR R4B RiskAssessment
    [note] = resource["note"]
    return note["text"]


def test_a_resolution_on_incomplete_news2_names_the_parameters_not_charted_and_claims_no_calm():
    # the calm points' partial NEWS2 (< 5, no single 3) is tier none: they resolve the episode (the safe
    # direction for paging), but nothing says the risk is back below the line: respiratory rate is unknown
    points = [rule_point(0, "medium"), incomplete_point(5, "none", "resp_rate_last_24h"),
              incomplete_point(10, "none", "resp_rate_last_24h", "on_oxygen")]
    state, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 10)]
    assert decisions[-1].missing == ("resp_rate_last_24h", "on_oxygen")
    text = resolution_resource(decisions[-1])
    assert text.startswith("Resolution, not a new alert") and "earlier wardwatch alerts no longer stand" in text
    assert "ended on an incomplete NEWS2" in text and "respiratory rate, air or oxygen" in text
    assert "the risk is back below the alerting line, so" not in text and "below the alerting line is not known" in text
    assert "calm_missing" not in state  # closed: nothing kept


def test_an_incomplete_calm_point_counted_towards_the_resolution_is_named_though_the_resolving_one_is_complete():
    points = [rule_point(0, "high"), incomplete_point(5, "none", "systolic_bp_last_24h"), rule_point(10, "low")]
    _, decisions = run(points)
    assert decisions[-1].kind == "resolve" and decisions[-1].missing == ("systolic_bp_last_24h",)
    assert "not charted in the last 24 h: systolic BP" in resolution_resource(decisions[-1])
    # kept across a restart: the state between the calm points, as the changelog gives it back
    state, before = run(points[:2])
    assert state["calm_missing"] == ["systolic_bp_last_24h"]
    _, after = run(points[2:], state=json.loads(json.dumps(state)))
    assert before + after == decisions


def test_a_resolution_on_complete_points_keeps_its_note_and_a_non_calm_point_forgets_earlier_incomplete_ones():
    from schemas.alert import RESOLVED

    complete = [rule_point(0, "medium"), rule_point(5, "none"), rule_point(10, "none")]
    _, decisions = run(complete)
    assert decisions[-1].missing == () and resolution_resource(decisions[-1]) == RESOLVED
    # an incomplete calm point, then a non-calm one: the count restarts, and the two complete calm points after
    # it resolve as before (the incomplete point did not count towards this resolution)
    points = [rule_point(0, "medium"), incomplete_point(5, "none", "heart_rate_last_24h"), rule_point(10, "medium"),
              rule_point(15, "none"), rule_point(20, "none")]
    _, decisions = run(points)
    assert summary(decisions)[-1] == ("resolve", "none", 1, 20)
    assert decisions[-1].missing == () and resolution_resource(decisions[-1]) == RESOLVED


def test_a_point_at_the_time_of_the_last_one_is_the_latest_not_an_older_round():
    """A vitals round sent as several messages scores several points at one time: the later one is the
    latest risk (a discharge resolves at its tier), and an incomplete calm one is named by the resolution it
    counts towards, though its time was counted already (module docstring)."""
    state, decisions = run([rule_point(0, "high"), rule_point(5, "high"), rule_point(5, "low")])
    assert state["tier"] == "low"
    _, [d] = discharge(state, patient_id="p1", discharged_ms=T0 + 6 * MIN)
    assert (d.kind, d.tier) == ("resolve", "low")
    points = [rule_point(0, "medium"), rule_point(5, "none"), incomplete_point(5, "none", "resp_rate_last_24h"),
              rule_point(10, "none")]
    _, decisions = run(points)
    assert summary(decisions) == [("open", "medium", 1, 0), ("resolve", "none", 1, 10)]
    assert decisions[-1].missing == ("resp_rate_last_24h",)
    assert "ended on an incomplete NEWS2" in resolution_resource(decisions[-1])
