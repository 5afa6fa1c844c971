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
