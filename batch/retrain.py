"""Retraining from the rebuilt DuckDB file: features as of `issued` (no leakage) at every online
scoring point, labels from canonical state, a model written to the registry."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb

from batch import registry
from batch.features import features_as_of_issued
from batch.train import make_labels, train_model
from wardwatch.settings import Settings


def retrain(settings: Settings, *, version: str | None = None, promote_if_none: bool = True) -> dict:
    """Train a new model version from settings.duckdb_path into settings.model_dir; returns its card.

    The new version becomes `current` only when there is no current model yet (the promotion gate
    against an existing model comes with the offline-plane issue)."""
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        events = con.sql("SELECT * FROM canonical_events").pl()
        points = con.sql('SELECT DISTINCT patient_id, scoring_ms, "partition", "offset" FROM features_online').pl()
    if points.is_empty():
        raise ValueError("no scoring points in the DuckDB file: run the stream and `wardwatch batch nightly` first")
    lateness_ms = settings.allowed_lateness_s * 1000
    feats = features_as_of_issued(events, points, allowed_lateness_ms=lateness_ms,
                                  cross_source_tolerance=settings.cross_source_tolerance)
    labels = make_labels(events, feats, allowed_lateness_ms=lateness_ms,
                         cross_source_tolerance=settings.cross_source_tolerance)
    version = version or datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S")
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    card = train_model(feats, labels, settings.model_dir, version)
    card["promoted"] = False
    if promote_if_none and registry.current_version(settings.model_dir) is None:
        registry.set_current(settings.model_dir, version)
        card["promoted"] = True
    return card
