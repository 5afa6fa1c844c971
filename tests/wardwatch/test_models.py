"""The model shipped in the package (wardwatch/models): the worker and the demo score with it until a
nightly trains their own, so it must fit the current feature specs."""

from __future__ import annotations

from schemas.features import FEATURE_NAMES, FEATURES, derive
from streams.scoring import Scorer, load_model, read_current
from wardwatch.demo import BUNDLED_MODELS
from wardwatch.settings import Settings


# features appended after the shipped model was trained: it reads its inputs by name from its card,
# so it ignores them until retrained (NEWS2, its floor and the rule path use them at once). The shipped
# model was retrained on the 53 before it (clinosim charts no FiO2, so the FiO2 weights are 0); the one
# after it is only an input of on_oxygen (a CDC row on oxygen with its flow not charted), which clinosim
# never writes, so a retrain would give it weight 0 too.
NOT_YET_TRAINED_ON: tuple[str, ...] = ("supplemental_oxygen_time_since_last_s_24h",)


def test_the_shipped_model_is_trained_on_the_current_feature_list():
    version = read_current(BUNDLED_MODELS)
    assert version is not None, "wardwatch/models/current must name the shipped version"
    model = load_model(BUNDLED_MODELS, version)  # checks sha256, the card and the ONNX signature
    assert model.contract.features == tuple(f for f in FEATURE_NAMES if f not in NOT_YET_TRAINED_ON), (
        "the feature specs changed: retrain the shipped model (see batch/train.py and the README)")


def test_the_shipped_model_embeds_its_contract():
    """A card edited after training (features reordered) is refused only for a model that embeds its
    contract (schemas/model_contract.py); models registered before that carry none."""
    import onnxruntime

    from schemas.model_contract import CONTRACT_METADATA_KEY
    path = BUNDLED_MODELS / read_current(BUNDLED_MODELS) / "model.onnx"
    metadata = onnxruntime.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert CONTRACT_METADATA_KEY in metadata


def test_the_shipped_model_is_refused_by_a_worker_that_computes_a_feature_otherwise(monkeypatch):
    """A release that changes what a feature name computes (its window here) must not serve a model
    trained on the old definition: the worker refuses it at start with the reason, as for a renamed
    feature, instead of scoring every patient with inputs the weights were not fitted to."""
    import pytest

    from schemas import model_contract
    from schemas.model_contract import ContractError, as_recorded_now, feature_definitions

    version = read_current(BUNDLED_MODELS)
    model = load_model(BUNDLED_MODELS, version)
    # (its card lists no derived definition versions: read as 1, schemas.model_contract.as_recorded_now)
    assert {f: as_recorded_now(d) for f, d in model.contract.definitions.items()} == feature_definitions(
        model.contract.features)
    code, agg, _ = model_contract.FEATURE_DEFINITIONS["heart_rate_mean_1h"]
    monkeypatch.setitem(model_contract.FEATURE_DEFINITIONS, "heart_rate_mean_1h", [code, agg, 2 * 3600])
    with pytest.raises(ContractError, match="heart_rate_mean_1h: trained on .*3600.*computed here as .*7200"):
        Scorer(BUNDLED_MODELS, Settings())


def test_the_shipped_model_is_refused_by_a_worker_that_computes_news2_by_another_function(monkeypatch):
    """The same seven inputs, another NEWS2 (its spec's definition_version bumped, as a release that moves a
    band must): the shipped model, whose card predates the versions and so reads as version 1, is refused
    with the feature named, not served NEWS2 values it was not trained on."""
    import pytest

    from schemas import model_contract
    from schemas.model_contract import ContractError
    from tests.schemas.test_model_contract import with_function_changed

    Scorer(BUNDLED_MODELS, Settings())  # today it loads
    monkeypatch.setattr(model_contract, "FEATURE_DEFINITIONS", with_function_changed("news2"))
    with pytest.raises(ContractError, match=r"news2: trained on definition version 1 of its function, computed "
                                            r"here by version 2"):
        Scorer(BUNDLED_MODELS, Settings())


def test_the_shipped_model_scores_a_complete_snapshot_on_the_model_path():
    # a patient on the way down: every NEWS2 input present (NEWS2 3, no single 3, so the NEWS2 floor
    # leaves the tier to the model), trends and labs missing (imputed)
    snapshot = {spec.name: None for spec in FEATURES} | {  # base features: the scorer derives the rest
        "resp_rate_last_24h": 20.0, "spo2_last_24h": 95.0, "o2_flow_last_24h": 0.0, "systolic_bp_last_24h": 112.0,
        "heart_rate_last_24h": 95.0, "consciousness_last_24h": 0.0, "temperature_last_24h": 38.2,
        "spo2_time_since_last_s_24h": 0.0, "o2_flow_time_since_last_s_24h": 0.0,
        "heart_rate_slope_6h": 8.0, "systolic_bp_delta_24h": -30.0}
    [result] = Scorer(BUNDLED_MODELS, Settings()).score([snapshot])
    assert result.path == "model"
    assert 0.0 <= result.probability <= 1.0
    # the rationale comes from the model's own coefficients (Imputer -> Scaler -> LinearClassifier)
    assert load_model(BUNDLED_MODELS, read_current(BUNDLED_MODELS)).linear is not None
    observed = derive(snapshot)  # the base features given, and what the scorer derives from them
    assert result.rationale and all(observed[r["feature"]] is not None
                                    for r in result.rationale)  # imputed features never explain a score


def test_the_shipped_model_never_lowers_the_risk_as_a_vital_sign_worsens():
    """Consciousness A->C->V->P->U, RR 16->35, SpO2 97->88, SBP 125->80, O2 0->6 L/min on an otherwise calm
    round (batch/directional.py). The model shipped before its coefficients were sign-constrained failed: an
    unresponsive patient scored 0.000, a confused one 0.99, SBP 80 below SBP 90."""
    from batch.directional import directional_table, directional_violations, model_scorer

    table = directional_table(model_scorer(BUNDLED_MODELS, read_current(BUNDLED_MODELS)))
    assert directional_violations(table) == []
    levels = dict(table["consciousness"]["first round"])
    assert levels["U"] > 10 * levels["A"]
