"""Labels, training, ONNX export and the model registry."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest

from batch import registry
from batch.train import (MODEL_FEATURES, NEWS2_ALERT, fit_pipeline, make_labels, operating_metrics,
                         reliability_table, to_onnx, train_model)
from schemas import codes
from schemas.canonical import CanonicalEvent, Source, Status
from schemas.features import FEATURE_NAMES
from schemas.model_contract import ContractError
from streams.scoring import load_model

HOUR = 3_600_000
T0 = 1_700_000_000_000
HR = "heart_rate_last_24h"


def synthetic_features(n_patients: int = 40, points_per_patient: int = 15, seed: int = 1) -> pl.DataFrame:
    """Noise in every feature except heart rate, which drives the label; some values missing."""
    rng = np.random.default_rng(seed)
    n = n_patients * points_per_patient
    # each column drawn from its own stream, seeded by its name: a feature added to the specs changes
    # no other column's values (the tests that compare trained models rely on particular draws)
    columns = {name: np.random.default_rng([seed, zlib.crc32(name.encode())]).normal(0, 1, n) for name in FEATURE_NAMES}
    columns[HR] = rng.normal(90, 20, n)
    columns["news2"] = rng.integers(0, 12, n).astype(float)
    frame = pl.DataFrame({
        "patient_id": [f"p{i // points_per_patient}" for i in range(n)],
        "scoring_ms": [T0 + (i % points_per_patient) * HOUR for i in range(n)],
        **columns,
    })
    missing = rng.random(n) < 0.1
    return frame.with_columns(pl.when(pl.Series(missing)).then(None).otherwise(pl.col(HR)).alias(HR))


def labels_for(features: pl.DataFrame, seed: int = 2) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    noisy = rng.random(features.height) < 0.05
    high = features[HR].fill_null(90).to_numpy() > 100
    return features.select("patient_id", "scoring_ms", label=pl.Series(high ^ noisy).cast(pl.Int8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    features = synthetic_features()
    card = train_model(features, labels_for(features), model_dir, "v1")
    return model_dir, card, features


def session_for(model_dir, version) -> ort.InferenceSession:
    return ort.InferenceSession(str(registry.model_path(model_dir, version)), providers=["CPUExecutionProvider"])


# --- export fidelity -----------------------------------------------------------------------------


def test_onnx_probabilities_equal_sklearn_predict_proba():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (300, 5)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + 0.3 * rng.normal(0, 1, 300) > 0).astype(int)
    # the sign-constrained fit (coefficients set on a LogisticRegression) converts as scikit-learn's own does
    for directions in (None, (+1, -1, None, +1, -1)):
        pipeline = fit_pipeline(x, y, directions)
        session = ort.InferenceSession(to_onnx(pipeline), providers=["CPUExecutionProvider"])
        [probabilities] = session.run(["probabilities"], {"features": x})
        assert probabilities.shape == (300, 2)
        np.testing.assert_allclose(probabilities, pipeline.predict_proba(x), atol=1e-5)


def test_a_feature_that_worsens_the_risk_never_gets_a_protective_coefficient():
    """Two copies of one parameter, the second noisier (the consciousness ordinal and NEWS2's consciousness
    points): unconstrained, the fit gives the noisy copy a negative weight, so a worse value of it lowers the
    risk. Declared +1, no coefficient is negative; where the constraint does not bind, the fit is
    scikit-learn's (the same objective, C = 1)."""
    rng = np.random.default_rng(5)
    signal = rng.normal(0, 1, 2000)
    copy = signal + 0.3 * rng.normal(0, 1, 2000)
    other = rng.normal(0, 1, 2000)
    y = (signal - 0.8 * copy + 0.5 * other + 0.5 * rng.normal(0, 1, 2000) > 0).astype(int)
    x = np.c_[signal, copy, other].astype(np.float32)
    free = fit_pipeline(x, y, None).named_steps["classify"].coef_[0]
    assert free[1] < 0  # the defect: a protective weight on a feature whose higher values are worse
    constrained = fit_pipeline(x, y, (+1, +1, None)).named_steps["classify"].coef_[0]
    assert constrained[0] > 0 and constrained[1] == 0.0
    unbound = fit_pipeline(x, y, (None, None, None)).named_steps["classify"].coef_[0]
    np.testing.assert_allclose(unbound, free, atol=1e-3)


# --- train_model ---------------------------------------------------------------------------------


def test_card_matches_the_onnx_signature(trained):
    model_dir, card, _ = trained
    session = session_for(model_dir, "v1")
    [model_input] = session.get_inputs()
    assert model_input.name == card["input_name"]
    assert model_input.type == "tensor(float)"
    assert model_input.shape[1] == len(card["features"])
    assert card["features"] == list(MODEL_FEATURES)
    # what each feature was computed from, in the card and in the contract the model embeds
    from schemas.model_contract import CONTRACT_METADATA_KEY, feature_definitions
    assert card["feature_definitions"] == feature_definitions(MODEL_FEATURES)
    embedded = json.loads(session.get_modelmeta().custom_metadata_map[CONTRACT_METADATA_KEY])
    assert embedded["feature_definitions"] == card["feature_definitions"]
    assert card["output_name"] in [o.name for o in session.get_outputs()]
    on_disk = json.loads(registry.card_path(model_dir, "v1").read_text())
    assert on_disk == card


def test_model_learns_the_signal_and_reports_held_out_metrics(trained):
    model_dir, card, features = trained
    assert card["n_train_patients"] + card["n_test_patients"] == features["patient_id"].n_unique()
    assert card["n_test_patients"] >= 1
    assert card["metrics"]["model"]["auroc"] > 0.85  # the label follows heart rate
    assert card["metrics"]["news2"]["auroc"] < 0.7  # NEWS2 here is noise
    assert 0 <= card["metrics"]["model"]["brier"] < card["metrics"]["news2"]["brier"]
    lo, hi = card["training_range"]["min_scoring_ms"], card["training_range"]["max_scoring_ms"]
    assert features["scoring_ms"].min() <= lo <= hi <= features["scoring_ms"].max()

    session = session_for(model_dir, "v1")
    rows = np.zeros((2, len(card["features"])), dtype=np.float32)
    rows[:, card["features"].index(HR)] = [60, 140]
    [probabilities] = session.run([card["output_name"]], {card["input_name"]: rows})
    assert probabilities[0, 1] < 0.5 < probabilities[1, 1]


def test_missing_input_is_imputed_with_the_card_values(trained):
    model_dir, card, _ = trained
    session = session_for(model_dir, "v1")
    missing = np.full((1, len(card["features"])), np.nan, dtype=np.float32)
    imputed = np.array([[card["imputation"][f] for f in card["features"]]], dtype=np.float32)
    [with_nan] = session.run([card["output_name"]], {card["input_name"]: missing})
    [with_values] = session.run([card["output_name"]], {card["input_name"]: imputed})
    np.testing.assert_allclose(with_nan, with_values, atol=1e-6)
    assert 80 < card["imputation"][HR] < 100  # the median of a N(90, 20) column


def test_the_same_data_gives_the_same_model_bytes_and_metrics_in_any_row_order(trained, tmp_path):
    """Retraining on the same nightly file must reproduce the model: a data scientist checks a shipped
    model (README: cp data/train/models-ship/v0001) by its sha256. The rows come in another order
    (polars joins and DuckDB scans promise none) and the version has another name."""
    model_dir, card, features = trained
    labels = labels_for(features)
    again = train_model(features.sample(fraction=1.0, shuffle=True, seed=5),
                        labels.sample(fraction=1.0, shuffle=True, seed=6), tmp_path, "v0002")
    assert registry.model_path(tmp_path, "v0002").read_bytes() == registry.model_path(model_dir, "v1").read_bytes()
    assert again["sha256"] == card["sha256"]
    assert again["metrics"] == card["metrics"]
    assert again["imputation"] == card["imputation"]


def test_published_version_is_never_overwritten(trained):
    model_dir, _, features = trained
    with pytest.raises(FileExistsError):
        train_model(features, labels_for(features), model_dir, "v1")


def test_single_class_labels_are_refused(tmp_path):
    features = synthetic_features(n_patients=6)
    labels = features.select("patient_id", "scoring_ms", label=pl.lit(0, pl.Int8))
    with pytest.raises(ValueError, match="single label class"):
        train_model(features, labels, tmp_path, "v1")



def test_a_patient_trained_on_is_never_held_out_when_the_cohort_grows():
    """The gate scores `current` (trained on last night's file) on tonight's held-out patients: a patient it
    was trained on must not be among them, or `current` is judged on its own training data and a good
    retrain refused. With a permutation of the sorted ids, one patient more in 300 moved 35 of the 75
    held-out patients to the other side."""
    from batch.train import split_patients

    cohort = [f"P{i:04d}" for i in range(300)]
    trained_on, held_out = split_patients(cohort)
    assert 0.15 * len(cohort) < len(held_out) < 0.35 * len(cohort)
    for grown in (cohort + ["P9999"], cohort + [f"Q{i:03d}" for i in range(100)], cohort[50:] + ["P9999"]):
        train_now, held_out_now = split_patients(grown)
        assert not held_out_now & trained_on
        assert held_out_now >= held_out & set(grown)
    assert all(all(split_patients([f"x{i}" for i in range(n)])) for n in range(2, 12))  # never an empty side


def test_held_out_patients_with_no_row_at_risk_give_a_model_whose_metrics_are_not_computable(tmp_path):
    """Every held-out patient already deteriorated at each point: no held-out row to judge the model on.
    It is published with metrics None (the gate keeps it as a candidate), not a scikit-learn error."""
    from batch.retrain import gate_decision
    from batch.train import split_patients

    features = synthetic_features(n_patients=8)
    _, held_out = split_patients(features["patient_id"].to_list())
    labels = labels_for(features).with_columns(at_risk=~pl.col("patient_id").is_in(sorted(held_out)))
    card = train_model(features, labels, tmp_path, "v1")
    model = card["metrics"]["model"]
    assert (model["n_rows"], model["auroc"], model["auprc"], model["brier"]) == (0, None, None, None)
    assert card["metrics"]["news2"]["auroc"] is None and card["metrics"]["model"]["reliability"] == []
    decision = gate_decision(model, card["metrics"]["news2"], None, min_auroc_gain=0, min_auprc_gain=0)
    assert decision.decision == "candidate"
    assert "auroc vs NEWS2 not computable (the 0 held-out rows at risk hold 0 positive" in decision.reasons[0]

# --- registry ------------------------------------------------------------------------------------


def test_tampered_model_file_is_refused(tmp_path):
    features = synthetic_features(n_patients=8)
    train_model(features, labels_for(features), tmp_path, "v1")
    assert registry.load_card(tmp_path, "v1")["version"] == "v1"
    path = registry.model_path(tmp_path, "v1")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(registry.ModelIntegrityError, match="does not match its card"):
        registry.load_card(tmp_path, "v1")
    with pytest.raises(registry.ModelIntegrityError):
        registry.set_current(tmp_path, "v1")
    assert registry.current_version(tmp_path) is None


@pytest.mark.parametrize("edit", ["reversed features", "swapped imputation"])
def test_a_card_edited_after_registration_is_refused_where_the_model_is_loaded(tmp_path, edit):
    """The sha256 pins model.onnx, not the card: the contract is embedded in the model at training, so
    an edited card (its features would meet the wrong weights) is caught by promote and by the scorer."""
    features = synthetic_features(n_patients=8)
    train_model(features, labels_for(features), tmp_path, "v1")
    assert registry.contract_problems(tmp_path, "v1") == []
    path = registry.card_path(tmp_path, "v1")
    card = json.loads(path.read_text())
    if edit == "reversed features":
        card["features"] = card["features"][::-1]
    else:
        first, second = card["features"][:2]
        imputation = card["imputation"]
        imputation[first], imputation[second] = imputation[second] + 1.0, imputation[first]
    path.write_text(json.dumps(card))
    [problem] = registry.contract_problems(tmp_path, "v1")
    assert "differ from the contract model.onnx was trained with" in problem
    with pytest.raises(registry.PromotionRefused):
        registry.promote(tmp_path, "v1", why="edited card")
    with pytest.raises(ContractError, match="restore card.json"):
        load_model(tmp_path, "v1")


def test_model_promote_refuses_a_model_trained_on_another_news2_function(tmp_path, monkeypatch):
    """`wardwatch model promote` (registry.promote) runs the contract check: a model trained while NEWS2 was
    computed by definition version 1 is refused once this code computes version 2, naming the feature."""
    from schemas import model_contract
    from tests.schemas.test_model_contract import with_function_changed

    features = synthetic_features(n_patients=8)
    train_model(features, labels_for(features), tmp_path, "v1")
    assert registry.load_card(tmp_path, "v1")["feature_definitions"]["news2"][-1] == 1
    monkeypatch.setattr(model_contract, "FEATURE_DEFINITIONS", with_function_changed("news2"))
    with pytest.raises(registry.PromotionRefused, match=r"news2: trained on definition version 1 of its function"):
        registry.promote(tmp_path, "v1", why="new NEWS2")
    assert registry.current_version(tmp_path) is None


def test_current_pointer_round_trips(tmp_path):
    assert registry.current_version(tmp_path) is None
    assert registry.list_versions(tmp_path) == []
    features = synthetic_features(n_patients=8)
    for version in ("2024.1", "2024.2"):
        train_model(features, labels_for(features), tmp_path, version)
    registry.set_current(tmp_path, "2024.1")
    assert registry.current_version(tmp_path) == "2024.1"
    registry.set_current(tmp_path, "2024.2")
    assert registry.current_version(tmp_path) == "2024.2"
    assert registry.list_versions(tmp_path) == ["2024.1", "2024.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2024.1", "2024.2", "current"]  # no temp files left


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, object]]:
    """("fsync", inode) and ("replace", file name) in the order they happen."""
    events: list[tuple[str, object]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_a_published_model_is_on_disk_before_current_names_it(tmp_path, monkeypatch):
    """After a power loss, `current` must never name a model file whose bytes were still in cache."""
    features = synthetic_features(n_patients=8)
    events = record_fsyncs_and_renames(monkeypatch)
    train_model(features, labels_for(features), tmp_path, "v1")
    registry.set_current(tmp_path, "v1")
    pointer = events.index(("replace", "current"))
    synced_before = {inode for kind, inode in events[:pointer] if kind == "fsync"}
    version = tmp_path / "v1"
    # the files, the version directory's entries, and its rename into the registry
    on_disk = [version / "model.onnx", version / "card.json", version, tmp_path]
    assert {p.stat().st_ino for p in on_disk} <= synced_before
    assert ("fsync", tmp_path.stat().st_ino) in events[pointer:]  # and the pointer's own rename


def test_unknown_or_path_like_versions_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.set_current(tmp_path, "missing")
    with pytest.raises(ValueError, match="invalid model version"):
        registry.load_card(tmp_path, "../elsewhere")


# --- labels --------------------------------------------------------------------------------------


def vital(fact_id: str, code: str, value: float | None, effective_ms: int, offset: int, *, version: int = 1,
          status: Status = Status.FINAL) -> dict:
    d = CanonicalEvent(patient_id="p1", code=code, value=value, unit=None, effective_ms=effective_ms,
                       issued_ms=effective_ms, status=status, source=Source.CDC, fact_id=fact_id,
                       version=version).to_dict()
    del d["provenance"]
    return {**d, "partition": 0, "offset": offset, "idx": 0}


def points_at(*times_and_news2) -> pl.DataFrame:
    return pl.DataFrame([{"patient_id": "p1", "scoring_ms": t, "partition": 0, "offset": 0, "news2": n}
                         for t, n in times_and_news2], schema_overrides={"news2": pl.Int64})


def test_low_blood_pressure_labels_the_preceding_twelve_hours():
    events = pl.DataFrame([vital("hr", codes.HEART_RATE, 80, T0, 0),
                           vital("sbp", codes.SYSTOLIC_BP, 85, T0 + 12 * HOUR, 1)])
    points = points_at((T0, 0), (T0 + 12 * HOUR - 1, 0), (T0 - 1, 0), (T0 + 12 * HOUR, 0))
    labels = make_labels(events, points, horizon_h=12)
    # T+12h exactly is inside (T, T+12h]; 1 ms earlier than 12 h before is outside; T itself is not "after"
    assert labels["label"].to_list() == [1, 1, 0, 0]
    assert labels["label_low_sbp"].to_list() == [True, True, False, False]


def test_lactate_threshold_and_retracted_values():
    events = pl.DataFrame([
        vital("lac1", codes.LACTATE, 4.0, T0 + HOUR, 0),
        vital("lac2", codes.LACTATE, 3.9, T0 + 20 * HOUR, 1),
        vital("sbp", codes.SYSTOLIC_BP, 80, T0 + 30 * HOUR, 2),
        vital("sbp", codes.SYSTOLIC_BP, None, T0 + 30 * HOUR, 3, version=2, status=Status.ENTERED_IN_ERROR),
    ], schema_overrides={"value": pl.Float64})
    labels = make_labels(events, points_at((T0, 0), (T0 + 19 * HOUR, 0)), horizon_h=12)
    assert labels["label"].to_list() == [1, 0]  # 4.0 counts; 3.9 does not; the retracted SBP 80 does not


def test_later_high_news2_labels_earlier_points_only():
    events = pl.DataFrame([vital("hr", codes.HEART_RATE, 80, T0, 0)])
    points = points_at((T0, 3), (T0 + 4 * HOUR, 7), (T0 + 6 * HOUR, 2), (T0 + 20 * HOUR, 1))
    labels = make_labels(events, points, horizon_h=12)
    assert labels["label_news2_high"].to_list() == [True, False, False, False]
    assert labels["label"].to_list() == [1, 0, 0, 0]


# --- the onset label -----------------------------------------------------------------------------


def test_onset_within_the_horizon_is_positive_and_beyond_it_negative():
    t = T0 + 24 * HOUR
    base = [vital("hr", codes.HEART_RATE, 80, t - HOUR, 0)]

    def label_with_low_bp_at(effective_ms: int) -> dict:
        events = pl.DataFrame(base + [vital("sbp", codes.SYSTOLIC_BP, 85, effective_ms, 1)])
        return make_labels(events, points_at((t, 2)), horizon_h=12).row(0, named=True)

    at_5h = label_with_low_bp_at(t + 5 * HOUR)
    assert (at_5h["at_risk"], at_5h["label"], at_5h["onset_ms"]) == (True, 1, t + 5 * HOUR)
    at_13h = label_with_low_bp_at(t + 13 * HOUR)
    assert (at_13h["at_risk"], at_13h["label"], at_13h["onset_ms"]) == (True, 0, None)


def test_a_patient_already_deteriorated_at_t_is_not_at_risk():
    t = T0 + 24 * HOUR
    events = pl.DataFrame([vital("sbp1", codes.SYSTOLIC_BP, 85, t - 2 * HOUR, 0),  # known at T
                           vital("sbp2", codes.SYSTOLIC_BP, 80, t + 3 * HOUR, 1)])
    row = make_labels(events, points_at((t, 3)), horizon_h=12).row(0, named=True)
    assert row["at_risk"] is False
    assert row["label"] == 0 and row["onset_ms"] is None  # nothing new to predict: excluded from training

    # already deteriorated by NEWS2 alone (SBP fine), or by a lactate of the last 24 h
    events = pl.DataFrame([vital("sbp", codes.SYSTOLIC_BP, 80, t + 3 * HOUR, 0)])
    assert make_labels(events, points_at((t, 7)), horizon_h=12)["at_risk"].to_list() == [False]
    lactate = [vital("lac", codes.LACTATE, 5.0, t - 3 * HOUR, 0), vital("sbp", codes.SYSTOLIC_BP, 80, t + HOUR, 1)]
    assert make_labels(pl.DataFrame(lactate), points_at((t, 2)), horizon_h=12)["at_risk"].to_list() == [False]


def test_labels_of_bare_points_compute_the_state_at_t_themselves():
    """make_labels on points alone (no feature column): the state at T is computed as of issue time, as
    its docstring says, instead of failing on a frame of no rows."""
    t = T0 + 24 * HOUR
    events = pl.DataFrame([vital("sbp1", codes.SYSTOLIC_BP, 85, t - 2 * HOUR, 0),  # known at T: not at risk
                           vital("hr", codes.HEART_RATE, 80, t + HOUR, 1),
                           vital("sbp2", codes.SYSTOLIC_BP, 120, t + 2 * HOUR, 2)])
    points = pl.DataFrame({"patient_id": ["p1", "p1"], "scoring_ms": [t - 3 * HOUR, t]})
    labels = make_labels(events, points, horizon_h=12)
    assert labels["at_risk"].to_list() == [True, False]
    assert labels["label"].to_list() == [1, 0]
    assert labels["onset_ms"].to_list() == [t - 2 * HOUR, None]

def test_only_the_first_onset_is_labelled():
    events = pl.DataFrame([vital("sbp1", codes.SYSTOLIC_BP, 85, T0, 0),
                           vital("sbp2", codes.SYSTOLIC_BP, 118, T0 + 2 * HOUR, 1),  # recovered
                           vital("sbp3", codes.SYSTOLIC_BP, 88, T0 + 6 * HOUR, 2)])
    labels = make_labels(events, points_at((T0 - HOUR, 1), (T0 + HOUR, 2), (T0 + 3 * HOUR, 2)), horizon_h=12)
    assert labels["at_risk"].to_list() == [True, False, False]  # once deteriorated, never at risk again
    assert labels["label"].to_list() == [1, 0, 0]
    assert labels["onset_ms"].to_list() == [T0, None, None]


def test_the_onset_is_the_first_deterioration_event_of_any_criterion():
    events = pl.DataFrame([vital("hr", codes.HEART_RATE, 80, T0, 0),
                           vital("lac", codes.LACTATE, 4.5, T0 + 8 * HOUR, 1),
                           vital("sbp", codes.SYSTOLIC_BP, 85, T0 + 9 * HOUR, 2)])
    labels = make_labels(events, points_at((T0, 1), (T0 + 4 * HOUR, 8)), horizon_h=12)
    # the later point scoring NEWS2 8 at T0+4h comes first; that point itself is already deteriorated
    assert labels["onset_ms"].to_list() == [T0 + 4 * HOUR, None]
    assert labels.select("label_news2_high", "label_low_sbp", "label_high_lactate").row(0) == (True, True, True)


def test_rows_already_deteriorated_are_left_out_of_training_and_evaluation(tmp_path):
    features = synthetic_features(n_patients=20)
    labels = labels_for(features).with_columns(at_risk=pl.Series([i % 4 != 0 for i in range(features.height)]))
    card = train_model(features, labels, tmp_path, "v1")
    excluded = labels.filter(~pl.col("at_risk")).height
    assert card["n_excluded_rows"] == excluded
    assert card["n_train_rows"] + card["n_train_rows_rule_path"] + card["n_test_rows"] == features.height - excluded
    assert card["metrics"]["all_rows"]["model"]["n_rows"] == card["n_test_rows"]
    # the model's own figures: the at-risk rows it serves (a heart rate charted: the rest is the rule path)
    assert card["metrics"]["model"]["n_rows"] == card["n_test_rows_served"] == card["metrics"]["news2"]["n_rows"]
    assert card["n_test_rows_served"] == card["n_test_rows"] - card["metrics"]["evaluation"]["excluded_rows_rule_path"]


def test_held_out_metrics_are_those_of_the_points_the_worker_serves_the_model(tmp_path):
    """A point missing a NEWS2 input takes the rule path in the worker (streams/scoring.py): the model never
    scores it. Those points here are all onsets the model, imputing the missing heart rate, ranks low; counted
    in, they made the card's AUROC and the gate judge a model on points it is never asked about."""
    from sklearn.metrics import roc_auc_score

    from batch.retrain import _held_out
    from batch.train import split_patients

    features = synthetic_features()
    rule_path = features[HR].is_null()  # every other NEWS2 input is charted in the synthetic frame
    labels = labels_for(features).with_columns(label=pl.when(rule_path).then(1).otherwise(pl.col("label")).cast(pl.Int8))
    card = train_model(features, labels, tmp_path, "v1")

    _, held_out = split_patients(features["patient_id"].to_list())
    test = features.join(labels, on=["patient_id", "scoring_ms"]).filter(pl.col("patient_id").is_in(sorted(held_out)))
    served = test.filter(pl.col(HR).is_not_null())
    assert 0 < served.height < test.height
    x = served.select(pl.col(f).cast(pl.Float64) for f in card["features"]).to_numpy().astype(np.float32)
    [probabilities] = session_for(tmp_path, "v1").run([card["output_name"]], {card["input_name"]: x})
    model, news2 = card["metrics"]["model"], card["metrics"]["news2"]
    assert model["n_rows"] == news2["n_rows"] == served.height
    assert model["auroc"] == pytest.approx(roc_auc_score(served["label"], probabilities[:, 1]), abs=1e-4)
    assert news2["auroc"] == pytest.approx(roc_auc_score(served["label"], served["news2"]), abs=1e-9)
    assert card["metrics"]["evaluation"]["excluded_rows_rule_path"] == test.height - served.height
    # the figures with the rule-path points are still in the card, apart and lower
    everything = card["metrics"]["all_rows"]
    assert everything["model"]["n_rows"] == test.height and everything["model"]["auroc"] < model["auroc"] - 0.02
    # the gate judges the current model on the same served rows
    assert _held_out(features, labels)[0].height == served.height
    # and it is trained on such rows only: the training patients' rule-path rows (all onsets here) are left out
    training = features.filter(~pl.col("patient_id").is_in(sorted(held_out)))
    assert card["n_train_rows"] == training.filter(pl.col(HR).is_not_null()).height
    assert card["n_train_rows_rule_path"] == training.filter(pl.col(HR).is_null()).height > 0


# --- evaluation at the operating threshold -------------------------------------------------------


def stay(patient: str, onset_h: float, high_at_h: tuple[float, ...]) -> list[dict]:
    """Scoring points every 2 h over 24 h; the score is 0.9 at `high_at_h`, else 0.1; points in the
    12 h before the onset are positive."""
    rows = []
    for h in range(0, 25, 2):
        positive = onset_h - 12 <= h < onset_h
        rows.append({"patient_id": patient, "scoring_ms": T0 + h * HOUR, "_score": 0.9 if h in high_at_h else 0.1,
                     "label": int(positive), "onset_ms": T0 + int(onset_h * HOUR) if positive else None})
    return rows


def test_sensitivity_lead_time_and_alert_rate_on_four_patients():
    rows = pl.DataFrame(stay("a", 10, (4, 6))  # alerted 6 h before its onset
                        + stay("b", 20, (10, 14))  # alerted 10 h before (twice: 2 rising edges)
                        + stay("c", 10, (12,))  # alerted only after the onset: missed
                        + stay("d", 22, (4,)))  # alerted 18 h before: outside the 12 h window, missed
    m = operating_metrics(rows, threshold=0.5)
    assert m["onset_episodes"] == 4
    assert m["episodes_detected"] == 2
    assert m["sensitivity"] == 0.5
    assert m["median_lead_time_h"] == 8.0  # median of 6 h and 10 h
    assert m["alerts"] == 5  # a: 1, b: 2, c: 1, d: 1
    assert m["patient_days"] == 4.0  # 24 h each
    assert m["alerts_per_100_patient_days"] == 125.0


def test_a_missing_score_never_alerts():
    rows = pl.DataFrame(stay("a", 10, ())).with_columns(_score=pl.lit(None, pl.Float64))
    m = operating_metrics(rows, threshold=0.5)
    assert (m["alerts"], m["episodes_detected"], m["sensitivity"]) == (0, 0, 0.0)
    assert m["median_lead_time_h"] is None


def test_reliability_table_by_deciles_keeps_ties_together():
    rng = np.random.default_rng(4)
    p = rng.uniform(0, 1, 1000)
    y = (rng.uniform(0, 1, 1000) < p).astype(int)  # calibrated by construction
    table = reliability_table(y, p)
    assert len(table) == 10 and all(row["n"] == 100 for row in table)
    assert all(abs(row["mean_predicted"] - row["observed"]) < 0.15 for row in table)

    coarse = reliability_table([0] * 9 + [1] + [0] * 2 + [1] * 8, [0.05] * 10 + [0.85] * 10)
    assert [(r["n"], r["mean_predicted"], r["observed"]) for r in coarse] == [(10, 0.05, 0.1), (10, 0.85, 0.8)]


def test_card_reports_the_model_and_news2_at_their_operating_points(trained):
    _, card, _ = trained
    model, news2 = card["metrics"]["model"], card["metrics"]["news2"]
    assert model["operating"]["threshold"] == 0.5
    assert news2["operating"]["threshold"] == NEWS2_ALERT
    for metrics in (model, news2):
        assert sum(row["n"] for row in metrics["reliability"]) == metrics["n_rows"]
        assert metrics["operating"]["patient_days"] > 0
        assert metrics["operating"]["onset_episodes"] == 0  # these labels carry no onset times
        assert metrics["operating"]["sensitivity"] is None


# --- uncertainty ---------------------------------------------------------------------------------


def test_held_out_figures_carry_reproducible_patient_level_95_percent_intervals(trained, tmp_path):
    """40 patients' worth of held-out rows give wide intervals: the card and `batch train`'s summary show
    them for the model and NEWS2, and for the model's gain over NEWS2 (the gate reads that one)."""
    from wardwatch.cli import train_summary

    model_dir, card, _ = trained
    metrics = card["metrics"]
    for name in ("model", "news2"):
        low, high = metrics[name]["ci95"]["auroc"]
        assert low < metrics[name]["auroc"] < high and high - low > 0.02
        assert metrics[name]["ci95"]["auprc"][0] < metrics[name]["auprc"] < metrics[name]["ci95"]["auprc"][1]
        assert metrics[name]["ci95"]["alerts_per_100_patient_days"] is not None
    gain = metrics["model_vs_news2"]["auroc_gain"]
    assert gain["estimate"] == pytest.approx(metrics["model"]["auroc"] - metrics["news2"]["auroc"])
    assert gain["ci95"][0] < gain["estimate"] < gain["ci95"][1]
    assert metrics["bootstrap"]["resamples"] >= 200 and metrics["bootstrap"]["patients"] == card["n_test_patients"]
    summary = train_summary(card, model_dir)
    low, high = metrics["model"]["ci95"]["auroc"]
    assert f"AUROC {metrics['model']['auroc']:.3f} (95% CI {low:.3f} to {high:.3f})" in summary
    assert "model - NEWS2  AUROC" in summary and "patient-level bootstrap" in summary


def test_batch_trains_summary_says_when_the_held_out_set_is_too_small_to_judge(trained):
    """14 held-out patients (about a quarter of 40): `batch train` printed their AUROC and intervals like any
    others. The card now counts the held-out patients with an onset, and the summary warns before the
    figures; a large enough held-out set gets no warning."""
    import copy

    from wardwatch.cli import train_summary

    model_dir, card, features = trained
    bootstrap = card["metrics"]["bootstrap"]
    assert bootstrap["patients"] == card["n_test_patients"] == 14
    # labels_for: a heart rate over 100 (or 5 % noise) is an onset; a patient with ~15 points has some
    assert 0 < bootstrap["patients_with_onset"] <= 14
    lines = train_summary(card, model_dir).splitlines()
    assert lines[1] == (f"  warning: held-out set too small: 14 patients, {bootstrap['patients_with_onset']} of them "
                        "with an onset: too few to judge a model by (at least 20 patients and 10 with an onset are "
                        "needed); these AUROC/AUPRC figures and their 95 % intervals are noise, not evidence")
    assert lines[2].startswith("  model  AUROC")

    larger = copy.deepcopy(card)
    larger["metrics"]["bootstrap"] |= {"patients": 75, "patients_evaluated": 75, "patients_with_onset": 12}
    assert "warning" not in train_summary(larger, model_dir)
    larger["metrics"]["bootstrap"]["patients_with_onset"] = 9
    assert "warning: held-out set too small: 75 patients, 9 of them" in train_summary(larger, model_dir)


def test_intervals_resample_patients_so_copies_of_their_rows_do_not_narrow_them():
    """Rows of one patient are not independent: a bootstrap of rows would narrow the interval each time a
    patient is scored more often. Drawing patients, ten copies of every row give the same interval."""
    from batch.train import bootstrap_intervals

    rng = np.random.default_rng(8)
    patients = [f"p{i}" for i in range(30)]
    row_patients = [p for p in patients for _ in range(4)]
    y = np.array([i % 3 == 0 for i in range(len(row_patients))], dtype=int)
    scores = {"model": y + rng.normal(0, 0.8, len(y)), "news2": y + rng.normal(0, 1.2, len(y))}
    operating = {name: pl.DataFrame({"patient_id": patients, "alerts": [i % 2 for i in range(30)],
                                     "span_ms": [24 * HOUR] * 30, "episodes": [1] * 30,
                                     "detected": [i % 3 != 0 for i in range(30)]}) for name in scores}
    once = bootstrap_intervals(patients, row_patients, y, scores, operating, resamples=200)
    copies = np.tile(np.arange(len(y)), 10)
    tenfold = bootstrap_intervals(patients, [row_patients[i] for i in copies], y[copies],
                                  {k: v[copies] for k, v in scores.items()}, operating, resamples=200)
    assert tenfold == once
    assert once["model"]["auroc"][1] - once["model"]["auroc"][0] > 0.05
    assert once == bootstrap_intervals(patients, row_patients, y, scores, operating, resamples=200)  # fixed seed


def test_weighted_rows_give_the_metrics_of_the_rows_repeated():
    """The bootstrap weighs each row by how often its patient was drawn instead of copying it (a nightly
    report's draws over a million scores took ~1 s each): the AUROC and average precision must be those
    of the rows repeated, ties included."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from batch.train import RankedRows

    rng = np.random.default_rng(5)
    y = (rng.random(400) < 0.2).astype(int)
    score = np.round(y + rng.normal(0, 1, 400), 1)  # rounded: many ties, across classes too
    weight = rng.integers(0, 4, 400)
    weight[y == 1][:3] = 0
    repeated = np.repeat(np.arange(400), weight)
    auroc, ap = RankedRows(y, score).metrics(weight.astype(float))
    assert auroc == pytest.approx(roc_auc_score(y[repeated], score[repeated]), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(y[repeated], score[repeated]), abs=1e-12)


def test_held_out_patients_without_a_row_judged_do_not_count_towards_enough_to_judge(tmp_path):
    """The floor (20 held-out patients, 10 with an onset) counted every held-out patient, also those deteriorated
    at every point, who have no row the AUROC/AUPRC are computed on: ~25 held out, 12 of them judged, passed as
    enough, though the figures and their bootstrap rest on 12 patients."""
    from batch.train import held_out_too_small, split_patients

    features = synthetic_features(n_patients=100)
    _, held_out = split_patients(features["patient_id"].to_list())
    judged = sorted(held_out)[:12]
    labels = labels_for(features).with_columns(
        at_risk=~pl.col("patient_id").is_in(sorted(held_out)) | pl.col("patient_id").is_in(judged))
    card = train_model(features, labels, tmp_path, "v1")
    assert (held_out_too_small(card["metrics"]) or "").startswith("12 patients")
    bootstrap = card["metrics"]["bootstrap"]
    assert bootstrap["patients"] == len(held_out) >= 20 and bootstrap["patients_evaluated"] == 12
    assert bootstrap["patients_with_onset"] >= 10  # the onset floor alone would not have caught it
