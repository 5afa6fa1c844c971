"""`wardwatch batch dataset`: training data at a useful scale, through the real pipeline.

    build_dataset(DatasetOptions(patients=300, out=Path("data/train"))) -> summary dict

clinosim cohort: a mix of diseases and severities (TRAINING_DISEASES), cached by its parameters
(streams/replay.generate_cohort)
-> replay with faults -> receiver + ingest -> patient worker -> archiver, on the embedded broker
-> nightly rebuild + parity (wardwatch/demo.py run_demo, without its training step)
-> <out>/wardwatch.duckdb, and <out>/dataset.json: cohort, label counts (batch/train.py), timings.

The model then learns from what the pipeline actually produced:

    WARDWATCH_DATA_DIR=<out> WARDWATCH_MODEL_DIR=<out>/models wardwatch batch train
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson
import polars as pl
from rich.console import Console

from wardwatch.settings import Settings

# Severe and moderate infections, cardiorespiratory and bleeding cases deteriorate at different
# times of their stay; mild cases and fractures mostly do not, so the label has negatives that are
# sick but stable, not only healthy-looking rows.
TRAINING_DISEASES: tuple[str, ...] = (
    "sepsis:severe",
    "sepsis:moderate",
    "bacterial_pneumonia:severe",
    "bacterial_pneumonia:moderate",
    "aspiration_pneumonia:severe",
    "heart_failure_exacerbation:severe",
    "heart_failure_exacerbation:moderate",
    "copd_exacerbation:moderate",
    "pulmonary_embolism:moderate",
    "gi_bleeding:severe",
    "acute_pancreatitis:severe",
    "acute_kidney_injury:moderate",
    "urinary_tract_infection:mild",
    "cellulitis:mild",
    "hip_fracture:mild",
)
DATASET_FILE = "dataset.json"


@dataclass(frozen=True)
class DatasetOptions:
    patients: int = 300
    seed: int = 11
    out: Path = Path("data/train")
    cache_dir: Path = Path("data/cache")
    diseases: tuple[str, ...] = TRAINING_DISEASES
    faults: bool = True
    timeout_s: float | None = None  # default: scales with the cohort (see stream_timeout_s)
    bootstrap: str | None = None  # a Kafka to use instead of a fresh embedded broker (big cohorts: see README)


def stream_timeout_s(patients: int) -> float:
    """A deadline for the replay + stream that grows with the cohort (about 1 s per patient on
    this 2-core machine, measured), with a wide margin: it only stops a stuck run."""
    return 300.0 + 6.0 * patients


def label_summary(duckdb_path: Path, settings: Settings) -> dict:
    """Onset-label counts over every scoring point of the rebuilt file (features as of `issued`)."""
    from batch.train import labelled_rows, published_points

    with duckdb.connect(str(duckdb_path), read_only=True) as con:
        events = con.sql("SELECT * FROM canonical_events").pl()
        points = published_points(con)  # as `batch train` reads them
    rows = labelled_rows(events, points, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
                         cross_source_tolerance=settings.cross_source_tolerance,
                         dedupe_horizon_ms=settings.dedupe_horizon_s * 1000)
    at_risk = rows.filter(pl.col("at_risk"))
    positives = at_risk.filter(pl.col("label") == 1)
    return {
        "patients": rows["patient_id"].n_unique(),
        "scoring_points": rows.height,
        "at_risk_points": at_risk.height,
        "excluded_already_deteriorated": rows.height - at_risk.height,
        "onset_positive_points": positives.height,
        "onset_episodes": positives.select("patient_id", "onset_ms").unique().height,
        "patients_with_onset": positives["patient_id"].n_unique(),
    }


def build_dataset(opts: DatasetOptions, console: Console | None = None) -> dict:
    """Generate, stream, archive and rebuild; returns (and writes to <out>/dataset.json) a summary."""
    from wardwatch.demo import DemoOptions, run_demo

    console = console or Console()
    started = time.monotonic()
    timeout = opts.timeout_s if opts.timeout_s is not None else stream_timeout_s(opts.patients)
    demo = run_demo(DemoOptions(patients=opts.patients, seed=opts.seed, faults=opts.faults, train=False,
                                data_dir=opts.out, cache_dir=opts.cache_dir, diseases=opts.diseases,
                                timeout_s=timeout, bootstrap=opts.bootstrap), console)
    pipeline_s = time.monotonic() - started
    settings = Settings(data_dir=opts.out.resolve())
    with console.status("counting onset labels (features as of issued at every scoring point)"):
        labels = label_summary(Path(demo["duckdb_path"]), settings)
    summary = {
        "patients_requested": opts.patients, "seed": opts.seed, "diseases": list(opts.diseases),
        "faults": opts.faults, "duckdb_path": demo["duckdb_path"], "parity_ok": demo["parity_ok"],
        "events_in": demo["events_in"], "events_canonical": demo["events_canonical"], "scores": demo["scores"],
        "labels": labels, "pipeline_seconds": round(pipeline_s, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    (opts.out / DATASET_FILE).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary
