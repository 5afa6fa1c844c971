"""Labels and the first deterioration model: logistic regression exported to ONNX with a model card.

Label (horizon H = 12 h by default), for a scoring point of patient p at time T:

    label = 1 when, in (T, T + H],
      - a later scoring point of p has NEWS2 >= 7 (the emergency-response trigger), or
      - p has a systolic BP <= 90 mm[Hg] (effective time in the window), or
      - p has a lactate >= 4 mmol/L (effective time in the window);
    otherwise 0.

The vitals and labs are the facts in hindsight (latest versions, retractions removed): a label is
ground truth, not what was known at T. The features, in contrast, come from
batch.features.features_as_of_issued, so training never sees the future.

The model (impute missing with training medians -> standardize -> logistic regression) is exported
with skl2onnx: input "features" float32 [None, n_features] in the card's feature order, NaN meaning
missing (the graph imputes it with the card's `imputation` values); output "probabilities" float32
[N, 2] (column 1 = deterioration).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from batch import registry
from batch.features import (DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_CROSS_SOURCE_TOLERANCE, features_as_of_issued,
                            final_facts)
from schemas import codes
from schemas.features import FEATURE_NAMES

# Every feature is numeric (consciousness is its ACVPU ordinal); the NEWS2 sub-scores give a
# linear model the clinical band edges it cannot learn itself.
MODEL_FEATURES: tuple[str, ...] = FEATURE_NAMES
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"

NEWS2_EMERGENCY = 7
LOW_SYSTOLIC_BP = 90.0
HIGH_LACTATE = 4.0
LABEL_DEFINITION = (f"deterioration within (T, T+horizon]: a later scoring point with NEWS2 >= {NEWS2_EMERGENCY}, "
                    f"or systolic BP <= {LOW_SYSTOLIC_BP:g} mm[Hg], or lactate >= {HIGH_LACTATE:g} mmol/L "
                    "(effective time in the window; facts in hindsight)")

_KEYS = ("patient_id", "scoring_ms", "partition", "offset")


# --- labels --------------------------------------------------------------------------------------


def make_labels(events_df: pl.DataFrame, points_df: pl.DataFrame, horizon_h: float = 12, *,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
                cross_source_tolerance: float = DEFAULT_CROSS_SOURCE_TOLERANCE) -> pl.DataFrame:
    """The points (input order and columns) plus `label` (0/1) and one boolean per criterion:
    label_news2_high, label_low_sbp, label_high_lactate.

    NEWS2 comes from points_df's `news2` column when present (e.g. the features frame), otherwise
    it is computed as of issue time at each point.
    """
    horizon_ms = int(horizon_h * 3600 * 1000)
    points = points_df.with_columns(pl.col("scoring_ms").cast(pl.Int64))
    news2 = (points["news2"] if "news2" in points.columns else
             features_as_of_issued(events_df, points.select("patient_id", "scoring_ms"),
                                   allowed_lateness_ms=allowed_lateness_ms,
                                   cross_source_tolerance=cross_source_tolerance)["news2"])
    facts = final_facts(events_df, allowed_lateness_ms=allowed_lateness_ms,
                        cross_source_tolerance=cross_source_tolerance)
    criteria = {
        "label_news2_high": points.select("patient_id", t=pl.col("scoring_ms")).filter(news2 >= NEWS2_EMERGENCY),
        "label_low_sbp": facts.filter((pl.col("code") == codes.SYSTOLIC_BP) & (pl.col("value") <= LOW_SYSTOLIC_BP))
                              .select("patient_id", t=pl.col("effective_ms")),
        "label_high_lactate": facts.filter((pl.col("code") == codes.LACTATE) & (pl.col("value") >= HIGH_LACTATE))
                                   .select("patient_id", t=pl.col("effective_ms")),
    }
    out = points
    for name, times in criteria.items():
        out = out.with_columns(_within_horizon(points, times, horizon_ms).alias(name))
    return out.with_columns(label=pl.any_horizontal(list(criteria)).cast(pl.Int8))


def _within_horizon(points: pl.DataFrame, times: pl.DataFrame, horizon_ms: int) -> pl.Series:
    """Per point (input order): does the patient have a time in (scoring_ms, scoring_ms + horizon]?
    The next time strictly after T is an as-of join looking forward."""
    left = points.select("patient_id", "scoring_ms").with_row_index("_point").sort("scoring_ms")
    right = times.with_columns(pl.col("t").cast(pl.Int64)).sort("t")
    nxt = left.join_asof(right, left_on="scoring_ms", right_on="t", by="patient_id",
                         strategy="forward", allow_exact_matches=False, check_sortedness=False)  # sorted above
    within = (pl.col("t") - pl.col("scoring_ms") <= horizon_ms).fill_null(False).alias("within")
    return nxt.sort("_point").select(within)["within"]


# --- training ------------------------------------------------------------------------------------


def split_patients(patient_ids, test_fraction: float = 0.25, seed: int = 0) -> tuple[set[str], set[str]]:
    """A reproducible patient-level split: no patient has rows on both sides."""
    patients = sorted(set(patient_ids))
    if len(patients) < 2:
        raise ValueError("need at least two patients for a patient-level split")
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = min(len(patients) - 1, max(1, round(test_fraction * len(patients))))
    test = {patients[i] for i in order[:n_test]}
    return set(patients) - test, test


def train_model(features_df: pl.DataFrame, labels_df: pl.DataFrame, out_dir: Path | str, version: str, *,
                test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Train, evaluate on held-out patients, export model.onnx + card.json under out_dir/version.

    Rows are matched on the point keys both frames share. Returns the card. Refuses to overwrite an
    existing version (published versions are immutable).
    """
    registry.check_version_name(version)
    target = Path(out_dir) / version
    if target.exists():
        raise FileExistsError(f"model version {version!r} already exists in {out_dir}")

    data = _joined(features_df, labels_df)
    train_ids, test_ids = split_patients(data["patient_id"].to_list(), test_fraction, seed)
    train = data.filter(pl.col("patient_id").is_in(list(train_ids)))
    test = data.filter(pl.col("patient_id").is_in(list(test_ids)))
    x_train, y_train = _matrix(train), train["label"].to_numpy().astype(int)
    x_test, y_test = _matrix(test), test["label"].to_numpy().astype(int)
    if len(set(y_train)) < 2:
        raise ValueError("training rows hold a single label class; cannot fit a classifier")

    pipeline = fit_pipeline(x_train, y_train)
    imputation = dict(zip(MODEL_FEATURES, (float(v) for v in pipeline.named_steps["impute"].statistics_)))

    metrics = {"model": _metrics(y_test, pipeline.predict_proba(x_test)[:, 1])}
    if "news2" in data.columns:
        metrics["news2"] = _news2_metrics(train, test, imputation.get("news2"))

    onnx_bytes = to_onnx(pipeline)
    card = {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": "StandardScaler + LogisticRegression (scikit-learn), median imputation",
        "features": list(MODEL_FEATURES),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "positive_class_index": 1,
        "imputation": imputation,
        "label": LABEL_DEFINITION,
        "training_range": {"min_scoring_ms": int(train["scoring_ms"].min()),
                           "max_scoring_ms": int(train["scoring_ms"].max())},
        "n_train_patients": len(train_ids),
        "n_test_patients": len(test_ids),
        "n_train_rows": train.height,
        "n_test_rows": test.height,
        "metrics": metrics,
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    _publish(target, onnx_bytes, card)
    return card


def fit_pipeline(x: np.ndarray, y: np.ndarray) -> Pipeline:
    """Median imputation (NaN = missing) -> standardization -> logistic regression."""
    return Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("classify", LogisticRegression(max_iter=2000)),
    ]).fit(x, y)


def _joined(features_df: pl.DataFrame, labels_df: pl.DataFrame) -> pl.DataFrame:
    keys = [k for k in _KEYS if k in features_df.columns and k in labels_df.columns]
    if "patient_id" not in keys or "scoring_ms" not in keys:
        raise ValueError("features and labels must both carry patient_id and scoring_ms")
    missing = [f for f in MODEL_FEATURES if f not in features_df.columns]
    if missing:
        raise ValueError(f"features frame lacks model inputs: {missing}")
    labels = labels_df.select(*keys, "label").unique(subset=keys, keep="first")
    return features_df.join(labels, on=keys, how="inner").filter(pl.col("label").is_not_null())


def _matrix(frame: pl.DataFrame) -> np.ndarray:
    """Model inputs in card order, float32, missing as NaN (exactly what the ONNX model receives)."""
    return frame.select(pl.col(f).cast(pl.Float64) for f in MODEL_FEATURES).to_numpy().astype(np.float32)


def _metrics(y: np.ndarray, score: np.ndarray, probability: np.ndarray | None = None) -> dict:
    """AUROC/AUPRC of a ranking score and Brier of a probability (the score itself by default).
    AUROC and AUPRC are None when the rows hold one class only."""
    probability = score if probability is None else probability
    two_classes = len(set(y.tolist())) == 2
    return {
        "auroc": float(roc_auc_score(y, score)) if two_classes else None,
        "auprc": float(average_precision_score(y, score)) if two_classes else None,
        "brier": float(brier_score_loss(y, probability, labels=[0, 1])),
        "n_rows": int(len(y)),
        "positives": int(y.sum()),
    }


def _news2_metrics(train: pl.DataFrame, test: pl.DataFrame, fill: float | None) -> dict:
    """NEWS2 on the same held-out rows: the score ranks for AUROC/AUPRC; for Brier it is mapped to
    a probability by a one-feature logistic fit on the training rows. Missing NEWS2 takes the
    training median (as the model's input does)."""
    def news2(frame: pl.DataFrame) -> np.ndarray:
        return frame["news2"].cast(pl.Float64).fill_null(fill if fill is not None else 0.0).to_numpy()

    calibration = LogisticRegression().fit(news2(train).reshape(-1, 1), train["label"].to_numpy().astype(int))
    score = news2(test)
    probability = calibration.predict_proba(score.reshape(-1, 1))[:, 1]
    return _metrics(test["label"].to_numpy().astype(int), score, probability)


def to_onnx(pipeline: Pipeline) -> bytes:
    """The fitted pipeline as an ONNX model: input INPUT_NAME float32 [None, n], output OUTPUT_NAME [N, 2]."""
    onx = convert_sklearn(
        pipeline,
        initial_types=[(INPUT_NAME, FloatTensorType([None, pipeline.n_features_in_]))],
        options={id(pipeline.named_steps["classify"]): {"zipmap": False}},  # a plain [N, 2] tensor
    )
    outputs = [o.name for o in onx.graph.output]
    if OUTPUT_NAME not in outputs:
        raise RuntimeError(f"ONNX export has outputs {outputs}, expected {OUTPUT_NAME!r}")
    return onx.SerializeToString()


def _publish(target: Path, onnx_bytes: bytes, card: dict) -> None:
    """Write model + card into a temporary directory, then rename it into place in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        (staging / registry.MODEL_FILE).write_bytes(onnx_bytes)
        (staging / registry.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
