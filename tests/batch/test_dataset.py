"""`wardwatch batch dataset` end to end on a tiny cohort: clinosim (cached) -> replay -> stream ->
archive -> nightly, then the training table is read back from the DuckDB file it leaves."""

from __future__ import annotations

import json

import duckdb
import pytest
from typer.testing import CliRunner

from batch.dataset import DATASET_FILE, DatasetOptions, build_dataset
from batch.train import labelled_rows
from wardwatch.cli import app

MIX = ("sepsis:severe", "heart_failure_exacerbation:moderate", "cellulitis:mild")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cohort_cache):
    out = tmp_path_factory.mktemp("dataset") / "train"
    summary = build_dataset(DatasetOptions(patients=3, seed=5, out=out, cache_dir=cohort_cache, diseases=MIX,
                                           timeout_s=240))
    return out, summary


def test_the_cohort_mixes_the_requested_diseases(dataset, cohort_cache):
    _, summary = dataset
    [cohort] = [p for p in cohort_cache.glob("cohort-p3-s5-*")
                if json.loads((p / "cohort.json").read_text())["diseases"] == list(MIX)]
    by_disease = json.loads((cohort / "cohort.json").read_text())["patients_by_disease"]
    assert {d: len(ids) for d, ids in by_disease.items()} == {d: 1 for d in MIX}
    assert summary["diseases"] == list(MIX)


def test_the_stream_output_is_rebuilt_into_a_database_to_train_on(dataset):
    out, summary = dataset
    assert json.loads((out / DATASET_FILE).read_text()) == summary
    with duckdb.connect(summary["duckdb_path"], read_only=True) as con:
        # the summary reports the nightly's parity verdict (parity itself: tests/batch/test_parity*.py)
        assert con.execute("SELECT parity_ok FROM runs").fetchall() == [(summary["parity_ok"],)]
        [(patients,)] = con.execute("SELECT count(DISTINCT patient_id) FROM canonical_events").fetchall()
        [(points,)] = con.execute("SELECT count(*) FROM features_online").fetchall()
        events = con.sql("SELECT * FROM canonical_events").pl()
        # one row per point, as batch/dataset.py reads them: two points of one message at one time share
        # (patient, time, partition, offset) and differ in snapshot_id
        online = con.sql('SELECT patient_id, scoring_ms, "partition", "offset", snapshot_id FROM features_online').pl()
    assert patients == 3
    assert points > 0

    labels = summary["labels"]
    assert labels["patients"] == 3
    assert labels["at_risk_points"] + labels["excluded_already_deteriorated"] == labels["scoring_points"]
    assert labels["onset_positive_points"] <= labels["at_risk_points"]
    rows = labelled_rows(events, online)  # what `wardwatch batch train` reads
    assert rows.height == labels["scoring_points"]
    assert int(rows["label"].sum()) == labels["onset_positive_points"]


def test_the_command_is_registered_with_help():
    result = CliRunner().invoke(app, ["batch", "dataset", "--help"])
    assert result.exit_code == 0
    assert "--patients" in result.output and "clinosim" in result.output


@pytest.mark.timeout(240)
def test_train_on_the_dataset_reports_held_out_metrics_and_the_gate(dataset, tmp_path, clean_env):
    out, _ = dataset
    env = {"WARDWATCH_DATA_DIR": str(out), "WARDWATCH_MODEL_DIR": str(tmp_path / "models")}

    result = CliRunner().invoke(app, ["batch", "train", "--version", "t1"], env=env)

    # the seeded 3-patient dataset holds both label classes: it trains (too little data is
    # tests/wardwatch/test_cli_errors.py::test_train_on_too_little_data_says_why_and_how_to_get_more)
    assert result.exit_code == 0 and result.exception is None, result.output
    # a readable summary, not the card's reliability tables
    assert "t1 in" in result.output and "held-out" in result.output and "gate:" in result.output
    assert "reliability" not in result.output
    card = json.loads((tmp_path / "models" / "t1" / "card.json").read_text())
    assert f"{card['n_test_patients']} held-out patients" in result.output
    # the seeded dataset's one held-out patient gives rows of one class: the summary says what that means
    assert card["metrics"]["model"]["auroc"] is None
    assert "held-out metrics are not computable" in result.output and "--patients 300" in result.output
    # and the gate says it does not promote on one held-out patient, and what to do
    assert "held-out set too small to judge a model" in result.output and "--allow-small-holdout" in result.output
    assert card["gate"]["held_out_too_small"] and card["gate"]["allow_small_holdout"] is False


@pytest.mark.parametrize("patients", ["0", "-3"])
def test_a_cohort_of_no_patient_is_refused_before_anything_runs_or_is_cached(patients, tmp_path, monkeypatch):
    """`--patients 0` used to generate an empty cohort, cache it under its parameters (every later run
    with them reused it) and stop with a FileNotFoundError traceback about encounters.csv."""
    import batch.dataset
    from streams.replay import generate_cohort

    monkeypatch.setattr(batch.dataset, "build_dataset", lambda *a, **k: pytest.fail("the pipeline must not start"))
    result = CliRunner().invoke(app, ["batch", "dataset", "--patients", patients, "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "--patients" in result.output
    with pytest.raises(ValueError, match="at least one patient"):
        generate_cohort(tmp_path / "cache", patients=int(patients), seed=11)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("command", [["batch", "dataset", "--out"], ["demo", "--data-dir"], ["soak", "--data-dir"]])
def test_a_directory_that_holds_no_earlier_run_is_never_wiped(command, tmp_path, monkeypatch):
    """--out / --data-dir is wiped first: `--out .` in a checkout, or `--out data` (the clinosim cache),
    used to be deleted whole. Only an empty directory or an earlier run's (marked) is wiped."""
    import wardwatch.demo

    def no_broker(*a, **k):
        raise RuntimeError("the pipeline must not start")

    monkeypatch.setattr(wardwatch.demo.EmbeddedBroker, "start", no_broker)
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, [*command, str(tmp_path), "--cache-dir" if command[0] == "batch" else "--seed",
                                      str(tmp_path / "cache") if command[0] == "batch" else "7"])
    assert result.exit_code == 2 and "refusing to wipe" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"

    from wardwatch.demo import RUN_MARK, check_wipeable

    check_wipeable(tmp_path / "new")
    # a deployment's data directory holds what a run leaves too (archive/, wardwatch.duckdb): never a run's
    # without the mark (`wardwatch demo --data-dir /var/lib/wardwatch/data` wiped the archive)
    deployed = tmp_path / "deployed"
    (deployed / "archive").mkdir(parents=True)
    (deployed / "wardwatch.duckdb").write_text("the reconciled state")
    with pytest.raises(ValueError, match="refusing to wipe"):
        check_wipeable(deployed)
    # a home directory that happens to hold a `logs` folder is not a run's
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    (home / "thesis.tex").write_text("years")
    with pytest.raises(ValueError, match="refusing to wipe"):
        check_wipeable(home)
    earlier = tmp_path / "earlier"
    (earlier / "logs").mkdir(parents=True)
    (earlier / "models-ship").mkdir()  # what an analyst adds to a marked run's directory goes with it
    (earlier / RUN_MARK).write_text("")
    check_wipeable(earlier)


def test_a_run_marks_its_directory_before_it_starts(tmp_path, monkeypatch):
    import wardwatch.demo
    from wardwatch.demo import RUN_MARK, DemoOptions, run_demo

    def no_broker(*a, **k):
        raise RuntimeError("stop here")

    monkeypatch.setattr(wardwatch.demo.EmbeddedBroker, "start", no_broker)
    with pytest.raises(RuntimeError, match="stop here"):
        run_demo(DemoOptions(data_dir=tmp_path / "run"))
    assert (tmp_path / "run" / RUN_MARK).exists() and (tmp_path / "run" / "logs").is_dir()


def test_a_dataset_runs_on_the_kafka_it_is_given(tmp_path, monkeypatch):
    """`batch dataset --bootstrap`: the embedded broker cannot carry ~1000 patients (README), so a big
    training set needs a real Kafka, which the pipeline run must then use."""
    import batch.dataset
    import wardwatch.demo

    seen = {}

    def pipeline(opts, console):
        seen["bootstrap"] = opts.bootstrap
        raise RuntimeError("stop after the pipeline's options")

    monkeypatch.setattr(wardwatch.demo, "run_demo", pipeline)
    with pytest.raises(RuntimeError, match="stop after"):
        batch.dataset.build_dataset(batch.dataset.DatasetOptions(patients=2, out=tmp_path / "d",
                                                                 bootstrap="kafka.example.org:9092"), None)
    assert seen == {"bootstrap": "kafka.example.org:9092"}
