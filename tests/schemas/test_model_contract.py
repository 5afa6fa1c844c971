from dataclasses import dataclass

import pytest

from schemas.model_contract import ContractError, ModelContract, check_contract

FEATURES = ["resp_rate_last_24h", "spo2_last_24h", "lactate_last_24h"]


@dataclass
class Tensor:  # stands in for onnxruntime's NodeArg
    name: str
    shape: list
    type: str = "tensor(float)"


def card(**overrides):
    c = {"version": "v7", "created": "2024-01-01T00:00:00Z", "features": list(FEATURES), "input_name": "features",
         "output_name": "probabilities", "imputation": {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0,
                                                         "lactate_last_24h": 1.1},
         "training_range": {}, "metrics": {}, "sha256": "00"}
    c.update(overrides)
    return c


INPUTS = [Tensor("features", [None, 3])]
OUTPUTS = [Tensor("label", [None]), Tensor("probabilities", [None, 2])]


def contract_error(c, inputs=INPUTS, outputs=OUTPUTS) -> str:
    with pytest.raises(ContractError) as e:
        check_contract(ModelContract.from_card(c), inputs, outputs)
    return str(e.value)


def test_a_matching_card_and_model_pass():
    contract = ModelContract.from_card(card())
    check_contract(contract, INPUTS, OUTPUTS)
    assert contract.version == "v7"
    assert contract.features == tuple(FEATURES)  # order is the column order of the model input


def test_a_feature_computed_otherwise_than_in_training_is_refused():
    """A release that redefines a feature under the same name (here the lactate's window, 24 h -> 48 h, as
    if the card came from such a release) must not have the model served: its weights would read values
    it was never trained on, silently."""
    from schemas.model_contract import FEATURE_DEFINITIONS_KEY, feature_definitions

    same = feature_definitions(FEATURES)
    check_contract(ModelContract.from_card(card(**{FEATURE_DEFINITIONS_KEY: same})), INPUTS, OUTPUTS)
    code, agg, _ = same["lactate_last_24h"]
    other = {**same, "lactate_last_24h": [code, agg, 48 * 3600]}
    message = contract_error(card(**{FEATURE_DEFINITIONS_KEY: other}))
    assert "lactate_last_24h" in message and "172800" in message and "86400" in message
    assert "computed differently" in message and "retrain" in message
    assert "resp_rate_last_24h" not in message  # only the feature that changed is named


def with_function_changed(name: str) -> dict[str, list]:
    """This code base's definitions as a release would give them that changed how `name` is computed from
    the same inputs: its spec's definition_version bumped, nothing else."""
    from dataclasses import replace

    from schemas.features import DERIVED, FEATURES as SPECS
    from schemas.model_contract import definitions_of

    return definitions_of(SPECS, tuple(replace(d, definition_version=d.definition_version + 1) if d.name == name
                                       else d for d in DERIVED))


DERIVED_FEATURES = ["news2", "news2_pulse", "resp_rate_last_24h"]
DERIVED_CARD = {"features": DERIVED_FEATURES, "imputation": {"news2": 1.0, "news2_pulse": 0.0, "resp_rate_last_24h": 16.0}}


def test_a_derived_feature_computed_by_another_function_from_the_same_inputs_is_refused(monkeypatch):
    """NEWS2 computed another way from the same seven inputs (a band moved): its inputs alone, all the card
    recorded, would not show it, and the model would be served values it was not trained on."""
    from schemas import model_contract
    from schemas.model_contract import FEATURE_DEFINITIONS_KEY, feature_definitions

    trained = card(**DERIVED_CARD, **{FEATURE_DEFINITIONS_KEY: feature_definitions(DERIVED_FEATURES)})
    assert trained[FEATURE_DEFINITIONS_KEY]["news2"][-1] == 1  # the version is in the contract training writes
    check_contract(ModelContract.from_card(trained), INPUTS, OUTPUTS)
    monkeypatch.setattr(model_contract, "FEATURE_DEFINITIONS", with_function_changed("news2"))
    message = contract_error(trained)
    assert "news2: trained on definition version 1 of its function, computed here by version 2" in message
    assert "retrain" in message and "news2_pulse" not in message  # only the feature that changed is named


def test_a_card_from_before_definition_versions_reads_as_version_1(monkeypatch):
    """Cards written before the versions (the shipped v0001) list a derived feature's inputs only: they load
    as trained on version 1, today's, and are refused once the function changes."""
    from schemas import model_contract
    from schemas.model_contract import FEATURE_DEFINITIONS_KEY, feature_definitions

    unversioned = {f: d[:3] if d[0] == "derived" else d for f, d in feature_definitions(DERIVED_FEATURES).items()}
    old = card(**DERIVED_CARD, **{FEATURE_DEFINITIONS_KEY: unversioned})
    check_contract(ModelContract.from_card(old), INPUTS, OUTPUTS)
    monkeypatch.setattr(model_contract, "FEATURE_DEFINITIONS", with_function_changed("news2_pulse"))
    message = contract_error(old)
    assert "news2_pulse: trained on definition version 1 of its function, computed here by version 2" in message


def test_unknown_feature_is_named():
    message = contract_error(card(features=["resp_rate_last_24h", "spo2_last_24h", "pulse_pressure_6h"],
                                  imputation={"resp_rate_last_24h": 1, "spo2_last_24h": 1, "pulse_pressure_6h": 1}))
    assert "pulse_pressure_6h" in message
    assert "FEATURE_NAMES" in message
    assert "v7" in message


def test_card_listing_more_features_than_the_model_takes():
    c = card(features=FEATURES + ["wbc_last_24h"], imputation={**card()["imputation"], "wbc_last_24h": 7.0})
    message = contract_error(c)
    assert "takes 3 features but the card lists 4" in message


def test_model_wider_than_the_card():
    message = contract_error(card(), inputs=[Tensor("features", [None, 5])])
    assert "takes 5 features but the card lists 3" in message


def test_input_width_must_be_fixed():
    assert "width must be a fixed 3" in contract_error(card(), inputs=[Tensor("features", [None, "n"])])


def test_input_name_mismatch():
    message = contract_error(card(input_name="X"))
    assert "'X'" in message and "['features']" in message


def test_output_name_mismatch():
    message = contract_error(card(output_name="output_probability"))
    assert "'output_probability'" in message and "probabilities" in message


def test_output_must_have_two_columns():
    assert "expected 2" in contract_error(card(), outputs=[Tensor("probabilities", [None, 3])])


def test_input_must_be_float32():
    assert "float32" in contract_error(card(), inputs=[Tensor("features", [None, 3], "tensor(double)")])


@pytest.mark.parametrize("imputation", [
    {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0},  # lactate absent
    {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "lactate_last_24h": None},
    {"resp_rate_last_24h": 16.0, "spo2_last_24h": 97.0, "lactate_last_24h": float("nan")},
])
def test_every_feature_needs_an_imputation_value(imputation):
    message = contract_error(card(imputation=imputation))
    assert "imputation" in message and "lactate_last_24h" in message
    assert "resp_rate_last_24h" not in message


def test_every_problem_is_reported_at_once():
    message = contract_error(card(output_name="nope", imputation={}), inputs=[Tensor("features", [None, 4])])
    assert "imputation" in message and "takes 4 features" in message and "'nope'" in message


def test_card_without_required_fields():
    with pytest.raises(ContractError, match="features"):
        ModelContract.from_card({"version": "v1", "input_name": "features", "output_name": "probabilities",
                                 "imputation": {}})


@pytest.mark.parametrize("output", [Tensor("label", [None], "tensor(int64)"),  # skl2onnx's class label output
                                    Tensor("label", [None, 2], "tensor(int64)")])
def test_a_card_naming_an_output_that_is_not_the_probabilities_is_refused_at_load(output):
    """A card whose output_name is the classifier's label output ([N] int64) passed the check (its second
    dimension unknown), and the worker then failed on column 1 of every score instead of refusing the model."""
    message = contract_error(card(output_name="label"), outputs=[output, Tensor("probabilities", [None, 2])])
    assert "'label'" in message and "expected" in message
