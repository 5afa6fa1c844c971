"""schemas.fhir.validate_resource: elements checked apart (cached) give fhir.resources' own decisions."""

from __future__ import annotations

import copy
import random

import orjson
import pytest

from schemas.deadletter import Reason
from schemas.fhir import R4B, R5, _MINIMAL, _resource_model, _validated_apart, validate_resource
from schemas.ingest_outcome import Reject
from tests.schemas.test_ingest_golden import WRONG_VALUES, _slots, load_corpus


def heart_rate(**changes) -> dict:
    obs = {"resourceType": "Observation", "id": "hr-1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Practitioner/7"}],
           "category": [{"coding": [{"code": "vital-signs"}]}],
           "effectiveDateTime": "2024-06-15T14:06:00Z", "valueQuantity": {"value": 80, "code": "/min"}}
    return {**obs, **changes}


def whole_model_detail(resource: dict, version: str) -> str:
    """The rejection detail validating the whole resource gives (what the ingest always wrote)."""
    try:
        _resource_model(resource["resourceType"], version).model_validate(resource)
    except ValueError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in exc.errors(include_input=False)[:5])
        return f"invalid {version} {resource['resourceType']}: {where}"
    raise AssertionError("the resource is valid")


@pytest.mark.parametrize("version", [R4B, R5])
@pytest.mark.parametrize("bad", [
    {"performer": [{"reference": 7}]},  # an element checked apart
    {"performer": [None]},
    {"code": {"coding": "8867-4"}},  # a required one
    {"valueString": "80"},  # a second value[x], next to valid elements checked apart
    {"status": None},  # the required primitive, null
    {"subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-02-30T10:00:00Z"},
])
def test_an_invalid_resource_is_rejected_as_the_whole_model_rejects_it(version, bad):
    validate_resource(heart_rate(), version)  # its valid elements are cached now
    resource = heart_rate(**bad)
    with pytest.raises(Reject) as rejected:
        validate_resource(resource, version)
    assert rejected.value.reason == Reason.INVALID_RESOURCE
    assert rejected.value.detail == whole_model_detail(resource, version)


@pytest.mark.parametrize("version", [R4B, R5])
def test_valid_resources_pass_again_and_again(version):
    for i in range(3):
        validate_resource(heart_rate(id=f"hr-{i}", valueQuantity={"value": 80 + i, "code": "/min"}), version)


@pytest.mark.parametrize("kind, version", sorted(_MINIMAL))
def test_elements_checked_apart_are_never_checked_together_with_others_by_fhir_resources(kind, version):
    model = _resource_model(kind, version)
    blank = model.model_construct()
    choices = {name for names in blank.get_one_of_many_fields().values() for name in names}
    required_primitives = {name for pair in blank.get_required_fields() for name in pair}
    apart = _validated_apart(kind, version)
    assert apart  # else nothing is cached and validation costs what it did
    for name in apart:
        assert name not in choices | required_primitives
        assert model.model_fields[name].alias in (None, name)  # one key per element
    model.model_validate(_MINIMAL[kind, version])  # the stand-ins are valid, or the fast path never accepts


# keys fhir.resources checks across elements, and values that are valid for some of them
ADDED_KEYS = ("valueString", "valueInteger", "valueCodeableConcept", "effectiveInstant", "effectivePeriod", "status",
              "_status", "code", "subject", "category", "code_fhir", "subject_fhir", "resource_type")
ADDED_VALUES = (None, "80", 80, "2024-06-15T14:06:00Z", {"text": "x"}, {"start": "2024-06-15T14:06:00Z"},
                {"extension": [{"url": "http://x", "valueString": "y"}]}, [{"text": "x"}], {"reference": "Patient/p"})


def decision(resource: dict, version: str) -> str:
    try:
        validate_resource(resource, version)
    except Reject as r:
        return r.detail
    except Exception as exc:  # (parse_notification turns it into an internal error)
        return type(exc).__name__
    return "valid"


def whole_model_decision(resource: dict, version: str) -> str:
    try:
        return whole_model_detail(resource, version)
    except AssertionError:
        return "valid"
    except Exception as exc:
        return type(exc).__name__


def test_random_double_mutants_get_the_whole_models_decision():
    """Two values of a real resource replaced or added at random (tests/schemas/test_ingest_golden.py
    mutates one at a time): every decision and detail is the one validating the whole resource gives."""
    rng = random.Random(7)
    lab = next(m for m in load_corpus() if m.source == "fhir" and m.value and b'"Observation"' in m.value)
    resources = [(orjson.loads(lab.value)["entry"][1]["resource"], R4B), (heart_rate(), R4B), (heart_rate(), R5)]
    rejected = 0
    for _ in range(2000):
        original, version = rng.choice(resources)
        resource = orjson.loads(orjson.dumps(original))
        for _ in range(2):
            if rng.random() < 0.3:  # a second value[x] or effective[x], a null or missing status, ...
                resource[rng.choice(ADDED_KEYS)] = copy.deepcopy(rng.choice(ADDED_VALUES))
                continue
            path, _value = rng.choice([s for s in _slots(resource) if s[0] != ("resourceType",)])  # it picks the model
            node = resource
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = copy.deepcopy(rng.choice(WRONG_VALUES))  # a later change may go inside it
        got = decision(resource, version)
        assert got == whole_model_decision(resource, version)
        rejected += got != "valid"
    assert rejected > 300 and 2000 - rejected > 50  # both decisions were exercised
