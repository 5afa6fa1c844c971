"""The model's input contract: a named, versioned, ordered feature list, checked against the ONNX
model's signature when the model is loaded (never at scoring time).

The card (`<model_dir>/<version>/card.json`, written by batch/registry.py) carries:

    {version, created, features: [ordered names from schemas.features.FEATURE_NAMES],
     input_name: "features", output_name: "probabilities", imputation: {feature: value},
     training_range, metrics, sha256 (of model.onnx)}

The ONNX input is float32 [None, len(features)], columns in `features` order; the output
`output_name` is [N, 2] with column 1 = probability of deterioration.

    contract = ModelContract.from_card(card)
    check_contract(contract, session.get_inputs(), session.get_outputs(),   # raises ContractError
                   session.get_modelmeta().custom_metadata_map)

The card's sha256 pins model.onnx, but not the card itself: an edited feature list would feed every
feature to the wrong weight, silently. So training writes the contract into the ONNX model's own
metadata (CONTRACT_METADATA_KEY, covered by the sha256), and the check compares the card with it. A
model registered before that has no such entry and is checked as before.

A name alone does not pin what a feature is: a release may change a spec's code, aggregation or window, or
a derived feature's inputs or its function (how NEWS2 is computed from the same inputs: the spec's declared
definition_version), and keep its name. The card (and the embedded contract) therefore also carry
each feature's definition as training computed it (`feature_definitions`, FEATURE_DEFINITIONS_KEY), and a
model whose definitions differ from this code base's is refused, not fed values it never saw in training.
A card without them (registered before) is checked by name only; a card whose derived definitions carry no
version (registered before versions) is read as version 1 (UNRECORDED_DEFINITION_VERSION says why that holds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from schemas.features import DERIVED, FEATURE_NAMES, FEATURES

ONNX_FLOAT = "tensor(float)"
_ONNX_PROBABILITY_TYPES = (ONNX_FLOAT, "tensor(double)")
# the ONNX metadata_props key holding the contract the model was trained with (contract_metadata)
CONTRACT_METADATA_KEY = "wardwatch.contract"
# the card's (and the embedded contract's) key for what each feature was computed from at training
FEATURE_DEFINITIONS_KEY = "feature_definitions"
# A derived feature's definition in a card written before definition versions were recorded: ["derived",
# inputs, optional inputs], read as version 1. That is honest, not a guess: no derived function changed its
# values between the first card that recorded definitions (13a99f9) and the versions' introduction (news2,
# its sub-scores and qsofa unchanged since the shipped v0001 was trained, af4fa12; on_oxygen's one change,
# bd8bf90, added an optional input, which such a card does not list, so it is refused by its inputs anyway).
# So the shipped v0001, and any model trained since, were trained on version 1 of every derived feature.
UNRECORDED_DEFINITION_VERSION = 1


def definitions_of(features, derived) -> dict[str, list]:
    """What each feature is computed from: a base feature's [code, aggregation, window_s], a derived
    one's ["derived", inputs, optional inputs, definition_version] (JSON-ready lists: a card read back
    compares equal)."""
    return {**{f.name: [f.code, f.agg, f.window_s] for f in features},
            **{d.name: ["derived", list(d.inputs), list(d.optional), d.definition_version] for d in derived}}


# what each feature of this code base is computed from (definitions_of the specs)
FEATURE_DEFINITIONS: dict[str, list] = definitions_of(FEATURES, DERIVED)


def feature_definitions(features: Sequence[str]) -> dict[str, list]:
    """The definitions of `features` as this code base computes them (for a card written at training)."""
    return {f: FEATURE_DEFINITIONS[f] for f in features}


def as_recorded_now(definition: Any) -> Any:
    """A card's definition of one feature in today's form: a derived one without a definition version
    (a card from before them) is at UNRECORDED_DEFINITION_VERSION."""
    if isinstance(definition, list) and len(definition) == 3 and definition[0] == "derived":
        return [*definition, UNRECORDED_DEFINITION_VERSION]
    return definition


class ContractError(Exception):
    """The model on disk does not match its card, or the card does not match this code base."""


class TensorSignature(Protocol):
    """What check_contract reads from an input/output; onnxruntime's NodeArg satisfies it."""

    name: str
    shape: Sequence[Any]


@dataclass(frozen=True, slots=True)
class ModelContract:
    version: str
    features: tuple[str, ...]
    input_name: str
    output_name: str
    imputation: dict[str, float | None]
    sha256: str | None = None
    definitions: dict[str, list] | None = None  # FEATURE_DEFINITIONS_KEY; None: a card from before them

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ModelContract:
        missing = [k for k in ("version", "features", "input_name", "output_name", "imputation") if k not in card]
        if missing:
            raise ContractError(f"model card lacks {missing}; re-register the model with batch/registry.py")
        try:
            features = tuple(card["features"])
            if not all(type(f) is str for f in features):  # a list among them breaks the checks' lookups
                raise TypeError("a feature name is not a string")
            return cls(
                version=str(card["version"]),
                features=features,
                input_name=card["input_name"],
                output_name=card["output_name"],
                imputation=dict(card["imputation"] or {}),
                sha256=card.get("sha256"),
                definitions=None if card.get(FEATURE_DEFINITIONS_KEY) is None else dict(card[FEATURE_DEFINITIONS_KEY]),
            )
        except (TypeError, ValueError) as e:  # e.g. "features": 7 in a hand-edited card: refused, not a crash
            raise ContractError(f"model card fields have the wrong type ({e}); re-register the model") from None


def contract_metadata(features: Sequence[str], imputation: Mapping[str, float | None], input_name: str,
                      output_name: str, definitions: Mapping[str, list] | None = None) -> str:
    """The contract as training embeds it in the ONNX model (CONTRACT_METADATA_KEY): canonical JSON."""
    contract = {"features": list(features), "imputation": dict(imputation), "input_name": input_name,
                "output_name": output_name}
    if definitions is not None:
        contract[FEATURE_DEFINITIONS_KEY] = dict(definitions)
    return json.dumps(contract, sort_keys=True, separators=(",", ":"))


def check_contract(contract: ModelContract, onnx_inputs: Sequence[TensorSignature],
                   onnx_outputs: Sequence[TensorSignature], metadata: Mapping[str, str] | None = None) -> None:
    """Raise ContractError listing every way the card and the ONNX signature disagree. `metadata`: the
    ONNX model's metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map)."""
    problems = (_feature_problems(contract) + _signature_problems(contract, onnx_inputs, onnx_outputs)
                + _embedded_problems(contract, metadata or {}))
    if problems:
        listed = "\n  - ".join(problems)
        raise ContractError(f"model {contract.version} violates its contract:\n  - {listed}")


def _feature_problems(contract: ModelContract) -> list[str]:
    problems = []
    if not contract.features:
        problems.append("card lists no features")
    unknown = [f for f in contract.features if f not in FEATURE_NAMES]
    if unknown:
        problems.append(f"card features {unknown} are not in schemas.features.FEATURE_NAMES "
                        "(renamed or removed feature? retrain against the current feature specs)")
    if contract.definitions is not None:
        # same name, other values: the model's weights would meet a feature it was not trained on
        trained = {f: as_recorded_now(contract.definitions.get(f)) for f in contract.features}
        changed = {f: (trained[f], FEATURE_DEFINITIONS[f]) for f in contract.features
                   if f in FEATURE_DEFINITIONS and trained[f] != FEATURE_DEFINITIONS[f]}
        if changed:
            listed = "; ".join(_changed(f, was, now) for f, (was, now) in changed.items())
            problems.append(f"card features are computed differently by this wardwatch than when the model was "
                            f"trained ({listed}): retrain against the current feature specs, or run the wardwatch "
                            "release the model was trained with")
    duplicates = sorted({f for f in contract.features if contract.features.count(f) > 1})
    if duplicates:
        problems.append(f"card lists features more than once: {duplicates}")
    no_value = [f for f in contract.features if not _is_finite_number(contract.imputation.get(f))]
    if no_value:
        problems.append(f"card imputation has no finite value for {no_value} "
                        "(every feature needs one: a missing input is imputed before scoring)")
    return problems


def _changed(feature: str, was: Any, now: list) -> str:
    """One feature trained on one definition and computed here by another, in words."""
    if isinstance(was, list) and len(was) == 4 and was[:3] == now[:3]:  # same inputs, another function
        return (f"{feature}: trained on definition version {was[3]} of its function, computed here by version "
                f"{now[3]} (schemas/features.py DerivedSpec.definition_version)")
    return f"{feature}: trained on {was}, computed here as {now}"


def _embedded_problems(contract: ModelContract, metadata: Mapping[str, str]) -> list[str]:
    """The card against the contract embedded in the model at training (none embedded: nothing to check)."""
    raw = metadata.get(CONTRACT_METADATA_KEY)
    if raw is None:
        return []
    try:
        embedded = json.loads(raw)
        trained = {k: embedded[k] for k in ("features", "imputation", "input_name", "output_name")}
        if FEATURE_DEFINITIONS_KEY in embedded:  # (a model trained before them embeds none)
            trained[FEATURE_DEFINITIONS_KEY] = embedded[FEATURE_DEFINITIONS_KEY]
    except (ValueError, TypeError, KeyError):
        return [f"model.onnx metadata {CONTRACT_METADATA_KEY!r} is unreadable: re-register the model"]
    card = {"features": list(contract.features), "imputation": contract.imputation,
            "input_name": contract.input_name, "output_name": contract.output_name,
            FEATURE_DEFINITIONS_KEY: contract.definitions}
    differ = [k for k in trained if trained[k] != card[k]]
    if differ:
        return [f"card {differ} differ from the contract model.onnx was trained with (the card was edited "
                "after registration; its features would meet the wrong weights): restore card.json"]
    return []


def _signature_problems(contract: ModelContract, onnx_inputs: Sequence[TensorSignature],
                        onnx_outputs: Sequence[TensorSignature]) -> list[str]:
    problems = []
    input_names = [i.name for i in onnx_inputs]
    if len(onnx_inputs) != 1 or input_names[0] != contract.input_name:
        problems.append(f"card input_name {contract.input_name!r} but the ONNX model has inputs {input_names} "
                        "(expected exactly one)")
    else:
        node = onnx_inputs[0]
        width = _dim(node.shape, 1)
        if width is None:
            problems.append(f"ONNX input {node.name!r} has shape {list(node.shape)}: its width must be a fixed "
                            f"{len(contract.features)} (export with FloatTensorType([None, n_features]))")
        elif width != len(contract.features):
            problems.append(f"ONNX input {node.name!r} takes {width} features but the card lists "
                            f"{len(contract.features)}: the card and model.onnx come from different trainings")
        node_type = getattr(node, "type", ONNX_FLOAT)
        if node_type != ONNX_FLOAT:
            problems.append(f"ONNX input {node.name!r} is {node_type}, expected {ONNX_FLOAT} (float32)")

    output = next((o for o in onnx_outputs if o.name == contract.output_name), None)
    if output is None:
        problems.append(f"card output_name {contract.output_name!r} but the ONNX model has outputs "
                        f"{[o.name for o in onnx_outputs]} (export the classifier with zipmap disabled)")
    elif output.shape is not None and len(output.shape) != 2:
        # e.g. skl2onnx's "label" output ([N] int64): it passed, and every score then failed on its column 1
        problems.append(f"ONNX output {output.name!r} has shape {list(output.shape)}; expected [N, 2] probabilities "
                        "(column 1 = deterioration)")
    elif _dim(output.shape, 1) not in (None, 2):
        problems.append(f"ONNX output {output.name!r} has {_dim(output.shape, 1)} columns; expected 2 "
                        "(column 1 = deterioration)")
    elif getattr(output, "type", ONNX_FLOAT) not in _ONNX_PROBABILITY_TYPES:
        problems.append(f"ONNX output {output.name!r} is {output.type}, expected probabilities "
                        f"({' or '.join(_ONNX_PROBABILITY_TYPES)})")
    return problems


def _dim(shape: Sequence[Any] | None, axis: int) -> int | None:
    """A fixed dimension, or None when it is symbolic/unknown."""
    if not shape or len(shape) <= axis:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
