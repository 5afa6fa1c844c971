import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from schemas.model_contract import ContractError
from streams.scoring import Scorer, load_model, model_tier
from wardwatch.settings import Settings

FEATURES = ["resp_rate_last_24h", "spo2_last_24h", "lactate_last_24h"]
IMPUTATION = {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "lactate_last_24h": 1.2}

# a patient with every NEWS2 parameter normal: RR 16, SpO2 97, air, SBP 125, pulse 72, alert, 37.0 C
NORMAL = {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "o2_flow_last_24h": 0.0, "systolic_bp_last_24h": 125.0,
          "heart_rate_last_24h": 72.0, "consciousness_last_24h": 0, "temperature_last_24h": 37.0,
          "lactate_last_24h": 1.0}


def snapshot(**changes):
    return {**NORMAL, **changes}


def training_data(seed=0, flip=False):
    rng = np.random.default_rng(seed)
    n = 400
    X = np.column_stack([rng.normal(18, 5, n), rng.normal(95, 3, n), rng.gamma(2.0, 1.0, n)])
    risk = 0.25 * (X[:, 0] - 18) - 0.4 * (X[:, 1] - 95) + 0.8 * (X[:, 2] - 2) + rng.normal(0, 1, n)
    y = (risk > 0).astype(int)
    return X, (1 - y if flip else y)


def fit_linear(seed=0, flip=False):
    X, y = training_data(seed, flip)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)


def onnx_bytes(model, width=3):
    return to_onnx(model, initial_types=[("features", FloatTensorType([None, width]))],
                   options={"zipmap": False}).SerializeToString()


def register(model_dir: Path, version: str, model_onnx: bytes, *, features=FEATURES, imputation=IMPUTATION,
             point=True) -> Path:
    """What batch/registry.py writes: <dir>/<version>/{model.onnx, card.json} and <dir>/current."""
    version_dir = model_dir / version
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(model_onnx)
    card = {"version": version, "created": "2024-01-01T00:00:00Z", "features": list(features),
            "input_name": "features", "output_name": "probabilities", "imputation": dict(imputation),
            "training_range": {"start": "2023-01-01", "end": "2023-12-31"}, "metrics": {"auroc": 0.8},
            "sha256": hashlib.sha256(model_onnx).hexdigest()}
    (version_dir / "card.json").write_text(json.dumps(card))
    if point:
        (model_dir / "current").write_text(version + "\n")
    return version_dir


def rows(snapshots, features=FEATURES, imputation=IMPUTATION):
    return np.array([[s.get(f, imputation[f]) for f in features] for s in snapshots], dtype=np.float32)


@pytest.fixture
def settings(tmp_path):  # no broker here: scoring is in-process
    return Settings(model_dir=tmp_path / "models", alert_threshold=0.5, alert_reset=0.4)


@pytest.fixture
def model_dir(settings):
    return settings.model_dir


class CountingSession:
    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


# --- model path ----------------------------------------------------------------------------------


def test_batched_probabilities_equal_sklearn(model_dir, settings):
    clf = fit_linear()
    register(model_dir, "v1", onnx_bytes(clf))
    scorer = Scorer(model_dir, settings)
    counting = CountingSession(scorer.model.session)
    scorer.model = dataclasses.replace(scorer.model, session=counting)

    batch = [snapshot(), snapshot(resp_rate_last_24h=28.0, spo2_last_24h=90.0, lactate_last_24h=4.5),
             snapshot(resp_rate_last_24h=12.0, lactate_last_24h=0.5)]
    results = scorer.score(batch)

    assert counting.runs == len(batch)  # one row per run: see the next test
    expected = clf.predict_proba(rows(batch))[:, 1]
    assert [r.probability for r in results] == pytest.approx(expected, abs=1e-5)
    assert {(r.path, r.model_version) for r in results} == {("model", "v1")}
    assert [r.news2 for r in results] == [0, 3 + 3 + 0, 0]  # RR 28 -> 3, SpO2 90 -> 3
    assert all(r.missing == [] for r in results)


def test_a_snapshot_gets_the_same_probability_bit_for_bit_whatever_batch_it_is_scored_in(model_dir, settings):
    # a restarted worker re-scores a snapshot in another batch than the first time: its score record
    # (and an alert decision at the threshold) must not change. onnxruntime's batched kernels differ
    # from its single-row path in the last bits, for about 1 row in 10 of this model.
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    scorer = Scorer(model_dir, settings)
    rng = np.random.default_rng(3)
    batch = [snapshot(resp_rate_last_24h=float(rng.uniform(8, 30)), spo2_last_24h=float(rng.uniform(85, 100)),
                      lactate_last_24h=float(rng.uniform(0.5, 6)), heart_rate_last_24h=float(rng.uniform(50, 140)))
             for _ in range(64)]
    in_batch = [r.probability for r in scorer.score(batch)]
    alone = [scorer.score([s])[0].probability for s in batch]
    assert in_batch == alone  # exact equality, not approx


def test_missing_non_news2_feature_is_imputed_from_the_card(model_dir, settings):
    clf = fit_linear()
    register(model_dir, "v1", onnx_bytes(clf))
    incomplete = snapshot(resp_rate_last_24h=26.0)
    del incomplete["lactate_last_24h"]

    [result] = Scorer(model_dir, settings).score([incomplete])

    assert result.path == "model"
    expected = clf.predict_proba([[26.0, 97.0, IMPUTATION["lactate_last_24h"]]])[0, 1]
    assert result.probability == pytest.approx(expected, abs=1e-5)
    assert "lactate_last_24h" not in [r["feature"] for r in result.rationale]  # an imputed value is no reason


def test_linear_rationale_is_coefficient_times_scaled_value(model_dir, settings):
    clf = fit_linear()
    register(model_dir, "v1", onnx_bytes(clf))
    x = snapshot(resp_rate_last_24h=30.0, spo2_last_24h=91.0, lactate_last_24h=3.0)

    [result] = Scorer(model_dir, settings).score([x])

    scaler, lr = clf[0], clf[-1]
    z = (np.array([x[f] for f in FEATURES]) - scaler.mean_) / scaler.scale_
    contributions = dict(zip(FEATURES, lr.coef_[0] * z))
    towards_risk = sorted((f for f in FEATURES if contributions[f] > 0), key=lambda f: -contributions[f])
    assert len(towards_risk) == 3  # high RR, low SpO2 and high lactate all push towards deterioration
    assert [r["feature"] for r in result.rationale] == towards_risk
    for reason in result.rationale:
        assert reason["contribution"] == pytest.approx(contributions[reason["feature"]], rel=1e-4)
        assert reason["value"] == pytest.approx(x[reason["feature"]])


def test_non_linear_model_rationale_is_distance_from_imputation(model_dir, settings):
    X, y = training_data()
    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, y)
    register(model_dir, "tree1", onnx_bytes(tree))
    # relative distances: RR |22-16|/16 = 0.375, SpO2 |96-97|/97 ~ 0.0103, lactate |4.2-1.2|/1.2 = 2.5
    x = snapshot(resp_rate_last_24h=22.0, spo2_last_24h=96.0, lactate_last_24h=4.2)

    [result] = Scorer(model_dir, settings).score([x])

    assert result.probability == pytest.approx(tree.predict_proba(rows([x]))[0, 1], abs=1e-5)
    assert [r["feature"] for r in result.rationale] == ["lactate_last_24h", "resp_rate_last_24h", "spo2_last_24h"]
    assert [r["contribution"] for r in result.rationale] == pytest.approx([2.5, 0.375, 1 / 97], rel=1e-6)


@pytest.mark.parametrize("p, tier", [(0.95, "high"), (0.7, "high"), (0.6999, "medium"), (0.5, "medium"),
                                     (0.4999, "low"), (0.4, "low"), (0.3999, "none"), (0.0, "none")])
def test_model_tiers(p, tier):
    assert model_tier(p, alert_threshold=0.5, high_threshold=0.7, alert_reset=0.4) == tier


@pytest.mark.parametrize("p, tier", [(0.95, "high"), (0.8, "high"), (0.79, "low"), (0.7, "low"), (0.4, "low"),
                                     (0.39, "none")])
def test_an_alert_threshold_above_the_high_cut_off_is_where_alerts_start(p, tier):
    # an operator raising the threshold to 0.8 gets no alert (medium or high) below 0.8
    assert model_tier(p, alert_threshold=0.8, high_threshold=0.7, alert_reset=0.4) == tier


def test_scored_tier_follows_the_probability(model_dir, settings):
    clf = fit_linear()
    register(model_dir, "v1", onnx_bytes(clf))
    sick = snapshot(resp_rate_last_24h=35.0, spo2_last_24h=86.0, lactate_last_24h=8.0)
    well = snapshot(resp_rate_last_24h=12.0, spo2_last_24h=99.0, lactate_last_24h=0.5)

    results = Scorer(model_dir, settings).score([sick, well])

    assert results[0].probability >= 0.7 and results[0].tier == "high"
    assert results[1].probability < 0.4 and results[1].tier == "none"


# --- contract and integrity ----------------------------------------------------------------------


def test_card_listing_a_feature_the_model_lacks_is_refused(model_dir, settings):
    four = FEATURES + ["wbc_last_24h"]
    register(model_dir, "v1", onnx_bytes(fit_linear()), features=four, imputation={**IMPUTATION, "wbc_last_24h": 7.0})

    with pytest.raises(ContractError, match="takes 3 features but the card lists 4"):
        load_model(model_dir, "v1")
    with pytest.raises(ContractError, match="card lists 4"):  # the worker does not start on it
        Scorer(model_dir, settings)
    scorer = Scorer(model_dir, settings, strict=False)
    assert scorer.model_version is None and "card lists 4" in scorer.model_error
    assert scorer.score([snapshot()])[0].path == "rule"


def test_model_of_the_wrong_width_is_refused(model_dir):
    X, y = training_data()
    wide = make_pipeline(StandardScaler(), LogisticRegression()).fit(np.column_stack([X, X[:, :1]]), y)
    register(model_dir, "v1", onnx_bytes(wide, width=4))

    with pytest.raises(ContractError, match="takes 4 features but the card lists 3"):
        load_model(model_dir, "v1")


def test_tampered_model_file_is_refused(model_dir, settings, caplog):
    version_dir = register(model_dir, "v1", onnx_bytes(fit_linear()))
    other = onnx_bytes(fit_linear(flip=True))  # a valid model, just not the registered one
    (version_dir / "model.onnx").write_bytes(other)

    with pytest.raises(ContractError, match="sha256"):
        load_model(model_dir, "v1")
    # a worker must not start on a model it cannot trust: it stops and says what to do
    with pytest.raises(ContractError, match=r"(?s)current model 'v1'.*sha256.*wardwatch model rollback"):
        Scorer(model_dir, settings)
    # a non-strict scorer (the shadow) logs once and scores nothing with it
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="streams.scoring"):
        scorer = Scorer(model_dir, settings, strict=False)
    [result] = scorer.score([snapshot(resp_rate_last_24h=26.0)])
    assert (result.path, result.model_version, result.probability) == ("rule", None, None)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_card_version_must_match_the_pointer(model_dir):
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    (model_dir / "v1" / "card.json").write_text((model_dir / "v1" / "card.json").read_text().replace('"v1"', '"v0"'))
    with pytest.raises(ContractError, match="v0"):
        load_model(model_dir, "v1")


# --- rule path -----------------------------------------------------------------------------------


def test_missing_news2_input_falls_back_to_the_rule(model_dir, settings):
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    no_temperature = snapshot(resp_rate_last_24h=30.0)
    del no_temperature["temperature_last_24h"]

    results = Scorer(model_dir, settings).score([no_temperature, snapshot(spo2_last_24h=None)])

    # RR 30 scores 3 whatever the temperature: its own trigger (see the test below)
    assert [(r.path, r.probability, r.model_version, r.news2, r.tier) for r in results] == [
        ("rule", None, None, None, "medium"), ("rule", None, None, None, "none")]
    assert results[0].missing == ["temperature_last_24h"]
    assert results[1].missing == ["spo2_last_24h"]


@pytest.mark.parametrize("changes, tier, rationale", [
    # a single parameter scoring 3 triggers, whatever the missing one would score (RCP 2017)
    ({"resp_rate_last_24h": 30.0}, "medium", [("resp_rate_last_24h", 3.0)]),
    ({"consciousness_last_24h": 4}, "medium", [("consciousness_last_24h", 3.0)]),  # unresponsive
    # NEWS2 is at least the charted parameters' sum: 3 + 3 + 2 is high, 2 + 2 + 1 medium
    ({"systolic_bp_last_24h": 85.0, "spo2_last_24h": 90.0, "o2_flow_last_24h": 2.0}, "high",
     [("spo2_last_24h", 3.0), ("systolic_bp_last_24h", 3.0), ("on_oxygen", 2.0)]),
    ({"spo2_last_24h": 93.0, "o2_flow_last_24h": 2.0, "heart_rate_last_24h": 95.0}, "medium",
     [("spo2_last_24h", 2.0), ("on_oxygen", 2.0), ("heart_rate_last_24h", 1.0)]),
    ({"resp_rate_last_24h": 22.0, "heart_rate_last_24h": 95.0}, "none", [("resp_rate_last_24h", 2.0),
                                                                          ("heart_rate_last_24h", 1.0)]),
])
def test_charted_news2_parameters_trigger_when_another_is_missing(model_dir, settings, changes, tier, rationale):
    """Temperature not charted in 24 h: NEWS2 is unknown, but an RR of 30 or a patient in shock is not
    less urgent for it. Before, any missing input made the tier none: no alert, an 'info' card."""
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    [result] = Scorer(model_dir, settings).score([snapshot(**changes, temperature_last_24h=None)])
    assert (result.path, result.news2, result.tier, result.missing) == ("rule", None, tier, ["temperature_last_24h"])
    assert [(r["feature"], r["contribution"]) for r in result.rationale] == rationale


def test_nothing_charted_for_news2_is_no_tier(settings):
    empty = {name: None for name in NORMAL}
    [result] = Scorer(settings.model_dir, settings).score([empty])
    assert (result.path, result.news2, result.tier, result.rationale) == ("rule", None, "none", [])


def test_mixed_batch_keeps_the_order(model_dir, settings):
    clf = fit_linear()
    register(model_dir, "v1", onnx_bytes(clf))
    complete = snapshot(resp_rate_last_24h=24.0)

    results = Scorer(model_dir, settings).score([snapshot(heart_rate_last_24h=None), complete])

    assert [r.path for r in results] == ["rule", "model"]
    assert results[1].probability == pytest.approx(clf.predict_proba(rows([complete]))[0, 1], abs=1e-5)


@pytest.mark.parametrize("changes, news2, tier", [
    ({}, 0, "none"),
    ({"resp_rate_last_24h": 22.0, "heart_rate_last_24h": 95.0}, 3, "none"),  # 2 + 1, no single 3
    ({"resp_rate_last_24h": 26.0}, 3, "medium"),  # a single parameter scoring 3: a trigger of its own
    ({"systolic_bp_last_24h": 85.0}, 3, "medium"),
    ({"consciousness_last_24h": 2}, 3, "medium"),  # responds to voice
    ({"resp_rate_last_24h": 22.0, "spo2_last_24h": 94.0, "heart_rate_last_24h": 95.0, "temperature_last_24h": 38.5},
     5, "medium"),  # 2 + 1 + 1 + 1
    ({"resp_rate_last_24h": 26.0, "spo2_last_24h": 93.0, "heart_rate_last_24h": 115.0}, 7, "high"),  # 3 + 2 + 2
    ({"o2_flow_last_24h": 2.0, "consciousness_last_24h": 2, "systolic_bp_last_24h": 95.0}, 7, "high"),  # 2 + 3 + 2
])
def test_no_registry_scores_with_news2(settings, changes, news2, tier):
    scorer = Scorer(settings.model_dir, settings)  # the directory does not even exist
    [result] = scorer.score([snapshot(**changes)])
    assert (result.path, result.probability, result.model_version) == ("rule", None, None)
    assert (result.news2, result.tier, result.missing) == (news2, tier, [])


def test_news2_is_the_floor_of_the_model_path(model_dir, settings):
    """The model (RR, SpO2, lactate here) sees a well patient; NEWS2 sees SBP 85, pulse 135 and a patient
    responding to pain (9: emergency), or SBP 85 alone (a single 3: urgent). The alert must not wait."""
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    well = dict(resp_rate_last_24h=12.0, spo2_last_24h=99.0, lactate_last_24h=0.5)
    shocked = snapshot(**well, systolic_bp_last_24h=85.0, heart_rate_last_24h=135.0, consciousness_last_24h=3)
    one_three = snapshot(**well, systolic_bp_last_24h=85.0)
    sick_by_model = snapshot(resp_rate_last_24h=35.0, spo2_last_24h=86.0, lactate_last_24h=8.0, o2_flow_last_24h=2.0)

    floor, single, model = Scorer(model_dir, settings).score([shocked, one_three, sick_by_model])

    assert floor.probability < 0.4  # the model alone would not alert
    assert (floor.path, floor.tier, floor.news2, floor.model_version) == ("rule", "high", 9, "v1")
    assert [r["feature"] for r in floor.rationale] == ["systolic_bp_last_24h", "heart_rate_last_24h",
                                                       "consciousness_last_24h"]
    assert (single.path, single.tier) == ("rule", "medium")
    assert (model.path, model.tier) == ("model", "high")  # above its NEWS2 tier: the model's own


def test_rule_rationale_lists_the_highest_news2_parameters(settings):
    x = snapshot(resp_rate_last_24h=26.0, spo2_last_24h=93.0, heart_rate_last_24h=115.0, temperature_last_24h=38.5)
    [result] = Scorer(settings.model_dir, settings).score([x])
    assert [(r["feature"], r["value"], r["contribution"]) for r in result.rationale] == [
        ("resp_rate_last_24h", 26.0, 3.0), ("spo2_last_24h", 93.0, 2.0), ("heart_rate_last_24h", 115.0, 2.0)]


def test_empty_registry_directory_is_rule_only(model_dir, settings):
    model_dir.mkdir(parents=True)
    assert Scorer(model_dir, settings).score([snapshot()])[0].path == "rule"


# --- hot reload ----------------------------------------------------------------------------------


def test_reload_if_changed_switches_versions(model_dir, settings):
    first, second = fit_linear(seed=0), fit_linear(seed=1, flip=True)
    register(model_dir, "v1", onnx_bytes(first))
    register(model_dir, "v2", onnx_bytes(second), point=False)
    x = snapshot(resp_rate_last_24h=24.0, lactate_last_24h=3.0)
    scorer = Scorer(model_dir, settings)
    assert scorer.reload_if_changed() is False  # pointer unchanged

    (model_dir / "current").write_text("v2")
    assert scorer.reload_if_changed() is True
    [result] = scorer.score([x])
    assert result.model_version == "v2"
    assert result.probability == pytest.approx(second.predict_proba(rows([x]))[0, 1], abs=1e-5)
    assert scorer.reload_if_changed() is False


def test_reload_to_a_refused_version_keeps_the_current_model(model_dir, settings):
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    bad = register(model_dir, "v2", onnx_bytes(fit_linear(seed=3)), point=False)
    (bad / "model.onnx").write_bytes(b"not the registered bytes")
    scorer = Scorer(model_dir, settings)

    (model_dir / "current").write_text("v2")
    assert scorer.reload_if_changed() is False
    assert scorer.model_version == "v1" and "sha256" in scorer.model_error
    assert scorer.score([snapshot()])[0].model_version == "v1"


@pytest.mark.parametrize("features", [lambda names: 7,
                                      lambda names: [*names[:-1], [names[-1]]]],  # a name as a list: unhashable
                         ids=["features-7", "a-feature-name-as-a-list"])
def test_reload_to_a_version_whose_card_has_wrong_types_keeps_the_current_model(model_dir, settings, features):
    """A hand-edited card ("features": 7, or a feature name that is no string) must be refused like
    any bad model, not raise out of the reload and stop the worker (which then could not start
    again on it)."""
    import json

    register(model_dir, "v1", onnx_bytes(fit_linear()))
    bad = register(model_dir, "v2", onnx_bytes(fit_linear(seed=3)), point=False)
    card = json.loads((bad / "card.json").read_text())
    (bad / "card.json").write_text(json.dumps(card | {"features": features(card["features"])}))
    scorer = Scorer(model_dir, settings)

    (model_dir / "current").write_text("v2")
    assert scorer.reload_if_changed() is False
    assert scorer.model_version == "v1" and "wrong type" in scorer.model_error
    assert scorer.score([snapshot()])[0].model_version == "v1"


def test_reload_picks_up_a_registry_created_after_start(model_dir, settings):
    scorer = Scorer(model_dir, settings)
    assert scorer.model_version is None
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    assert scorer.reload_if_changed() is True
    assert scorer.score([snapshot()])[0].path == "model"


# --- shadow (candidate) model --------------------------------------------------------------------


def test_shadow_follows_its_own_registry_and_scores_only_what_its_model_can(tmp_path, model_dir):
    clf, candidate = fit_linear(seed=0), fit_linear(seed=1, flip=True)
    register(model_dir, "v1", onnx_bytes(clf))
    shadow_dir = tmp_path / "shadow"
    register(shadow_dir, "cand", onnx_bytes(candidate))
    s = Settings(model_dir=model_dir, shadow_model_dir=shadow_dir)
    x = snapshot(resp_rate_last_24h=24.0, lactate_last_24h=3.0)

    scorer = Scorer(model_dir, s)
    no_temperature = snapshot()
    del no_temperature["temperature_last_24h"]
    shadowed = scorer.shadow.score_shadow([no_temperature, x])

    assert [i for i, _ in shadowed] == [1]  # a snapshot the model cannot score has no shadow score
    [(_, result)] = shadowed
    assert (result.path, result.model_version) == ("shadow", "cand")
    assert result.probability == pytest.approx(candidate.predict_proba(rows([x]))[0, 1], abs=1e-5)
    assert scorer.score([x])[0].model_version == "v1"  # the main scores are untouched


def test_candidate_pointer_in_the_main_registry_is_picked_up_and_dropped(model_dir, settings):
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    register(model_dir, "v2", onnx_bytes(fit_linear(seed=2)), point=False)
    scorer = Scorer(model_dir, settings)
    assert scorer.shadow.score_shadow([snapshot()]) == []  # no candidate: no shadow scores

    (model_dir / "candidate").write_text("v2\n")
    scorer.reload_if_changed()
    assert [r.model_version for _, r in scorer.shadow.score_shadow([snapshot()])] == ["v2"]

    (model_dir / "candidate").unlink()  # promoted or withdrawn
    scorer.reload_if_changed()
    assert scorer.shadow.score_shadow([snapshot()]) == []
