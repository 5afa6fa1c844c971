"""The promotion gate: a new model is promoted only when it beats current and NEWS2 by the margins."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import duckdb
import orjson
import pytest

from batch import registry, retrain
from batch.retrain import GateDecision, apply_gate, gate_decision, record_in_runs
from tests.batch.test_registry import add_version, tamper
from wardwatch.settings import Settings

NEWS2 = {"auroc": 0.70, "auprc": 0.30}
CURRENT = {"auroc": 0.75, "auprc": 0.35}


def decide(new, current=CURRENT, news2=NEWS2, auroc_gain=0.01, auprc_gain=0.01, problems=()):
    return gate_decision(new, news2, current, min_auroc_gain=auroc_gain, min_auprc_gain=auprc_gain,
                         contract_problems=list(problems))


def test_better_model_is_promoted():
    decision = decide({"auroc": 0.80, "auprc": 0.40})
    assert decision.promote
    assert any("beats current model" in r for r in decision.reasons)


def test_worse_than_current_is_kept_as_candidate_with_the_reason():
    decision = decide({"auroc": 0.74, "auprc": 0.40})
    assert not decision.promote and decision.decision == "candidate"
    assert decision.reasons == ["auroc 0.7400 does not beat current model 0.7500 by 0.01"]


def test_better_than_current_but_not_news2_by_the_margin_is_rejected():
    decision = decide({"auroc": 0.80, "auprc": 0.305}, current={"auroc": 0.6, "auprc": 0.2})
    assert not decision.promote
    assert decision.reasons == ["auprc 0.3050 does not beat NEWS2 0.3000 by 0.01"]


def test_margin_is_inclusive_and_configurable():
    new = {"auroc": 0.76, "auprc": 0.36}
    assert decide(new, auroc_gain=0.01, auprc_gain=0.01).promote
    assert not decide(new, auroc_gain=0.02, auprc_gain=0.0).promote


def test_first_model_is_judged_against_news2_only():
    assert decide({"auroc": 0.72, "auprc": 0.32}, current=None).promote
    assert not decide({"auroc": 0.65, "auprc": 0.32}, current=None).promote


def test_uncomputable_metrics_and_contract_problems_never_pass():
    assert not decide({"auroc": None, "auprc": None}).promote
    decision = decide({"auroc": 0.9, "auprc": 0.9}, problems=["ONNX input takes 28 features"])
    assert not decision.promote and decision.reasons == ["contract: ONNX input takes 28 features"]


def test_a_gain_over_news2_whose_95_percent_interval_includes_0_is_not_promoted():
    """0.03 better than NEWS2 on 75 held-out patients may be the luck of the draw: the model must be shown
    better than the rule it adds to, across the paired patient-level bootstrap's interval of the gain."""
    new = {"auroc": 0.80, "auprc": 0.40}
    unsure = {"auroc": [-0.02, 0.08], "auprc": [0.01, 0.19]}
    decision = gate_decision(new, {"auroc": 0.77, "auprc": 0.30}, None, min_auroc_gain=0, min_auprc_gain=0,
                             news2_gain_ci95=unsure)
    assert decision.decision == "candidate"
    assert decision.reasons == ["auroc gain over NEWS2 not shown: its 95 % interval -0.0200 to +0.0800 "
                                "(patient-level bootstrap) includes 0"]
    shown = gate_decision(new, {"auroc": 0.77, "auprc": 0.30}, None, min_auroc_gain=0, min_auprc_gain=0,
                          news2_gain_ci95={"auroc": [0.004, 0.06], "auprc": [0.01, 0.19]})
    assert shown.promote and "auroc gain over NEWS2 95 % interval +0.0040 to +0.0600 is above 0" in shown.reasons
    no_interval = gate_decision(new, {"auroc": 0.77, "auprc": 0.30}, None, min_auroc_gain=0, min_auprc_gain=0,
                                news2_gain_ci95={"auroc": None, "auprc": [0.01, 0.19]})
    assert not no_interval.promote


def test_a_gain_over_news2_whose_interval_is_wholly_below_0_is_said_to_be_worse_not_to_include_0():
    # `batch train` on the demo printed "its 95 % interval -0.1216 to -0.0833 ... includes 0"
    decision = gate_decision({"auroc": 0.69, "auprc": 0.15}, {"auroc": 0.81, "auprc": 0.23}, None, min_auroc_gain=0,
                             min_auprc_gain=0, news2_gain_ci95={"auroc": [-0.1216, -0.0833], "auprc": [-0.02, 0.01]})
    assert "auroc gain over NEWS2 not shown: its 95 % interval -0.1216 to -0.0833 (patient-level bootstrap) is below 0: " \
           "the model is worse than NEWS2" in decision.reasons
    assert "auprc gain over NEWS2 not shown: its 95 % interval -0.0200 to +0.0100 (patient-level bootstrap) " \
           "includes 0" in decision.reasons


def test_a_model_whose_risk_falls_as_a_vital_sign_worsens_is_kept_as_candidate_naming_the_parameter():
    """Better than NEWS2 and current on every metric, but an unresponsive patient scores below a confused one:
    a safety defect no discrimination figure makes up for."""
    problem = "consciousness (first round): risk falls from 0.995 at C to 0.630 at V"
    decision = gate_decision({"auroc": 0.90, "auprc": 0.60}, NEWS2, CURRENT, min_auroc_gain=0, min_auprc_gain=0,
                             directional_problems=[problem])
    assert decision.decision == "candidate"
    assert decision.reasons == [f"directional check: {problem}"]


def test_retrain_runs_the_directional_check_on_the_model_it_trained(tmp_path, monkeypatch):
    """The unconstrained model shipped before (tests/fixtures/models/unconstrained) as what training gave."""
    import shutil

    import polars as pl

    from tests.batch.test_directional import UNCONSTRAINED

    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE canonical_events AS SELECT 1 AS x")
        con.execute('CREATE TABLE features_online AS SELECT \'p\' AS patient_id, 0 AS scoring_ms, 0 AS "partition", '
                    '0 AS "offset"')
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('r1', '2024-01-01 00:00+00')")

    def trained(features, labels, model_dir, version, **kwargs):
        shutil.copytree(UNCONSTRAINED / "v0001", model_dir / version)
        return registry.load_card(model_dir, version) | {"version": version}

    monkeypatch.setattr(retrain, "features_as_of_issued", lambda *a, **k: pl.DataFrame())
    monkeypatch.setattr(retrain, "make_labels", lambda *a, **k: pl.DataFrame())
    monkeypatch.setattr(retrain, "train_model", trained)
    card = retrain.retrain(settings, version="v0001")
    assert card["gate"]["outcome"] == "candidate" and registry.current_version(settings.model_dir) is None
    assert any(r.startswith("directional check: consciousness") for r in card["gate"]["reasons"])
    assert dict(card["directional_check"]["consciousness"]["first round"])["U"] < 0.01


@pytest.fixture
def settings(tmp_path) -> Settings:
    models = tmp_path / "models"
    add_version(models, "v1")
    add_version(models, "v2")
    registry.promote(models, "v1", why="first")
    return Settings(model_dir=models, data_dir=tmp_path / "data")


def test_a_passing_model_becomes_current(settings):
    assert apply_gate(settings, "v2", GateDecision("promote", ["auroc beats"])) == "promoted"
    assert registry.current_version(settings.model_dir) == "v2"
    assert registry.read_history(settings.model_dir)[-1]["why"] == "promotion gate: auroc beats"


def test_a_failing_model_becomes_the_candidate_and_current_stays(settings):
    assert apply_gate(settings, "v2", GateDecision("candidate", ["auroc worse"])) == "candidate"
    assert registry.current_version(settings.model_dir) == "v1"
    assert registry.candidate_version(settings.model_dir) == "v2"


def test_a_tampered_failing_model_is_not_even_the_candidate(settings):
    tamper(settings.model_dir, "v2")
    assert apply_gate(settings, "v2", GateDecision("candidate", ["contract"])) == "candidate"
    assert registry.candidate_version(settings.model_dir) is None


def test_decision_is_recorded_in_the_latest_run(settings):
    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('old', '2024-01-01 00:00+00'), ('new', '2024-01-02 00:00+00')")
    card = {"version": "v2", "metrics": {"model": {"auroc": 0.8}},
            "gate": {"decision": "candidate", "reasons": ["auroc worse"]}}
    record_in_runs(settings, card)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT run_id, model_version, gate_decision, gate_reasons_json FROM runs "
                           "ORDER BY run_id").fetchall()
    assert rows[0] == ("new", "v2", "candidate", orjson.dumps(["auroc worse"]).decode())
    assert rows[1][1:] == (None, None, None)


def test_the_current_model_is_judged_on_rows_without_a_feature_it_reads_as_the_worker_serves_it(settings):
    """A feature renamed or dropped since the current model was trained: the worker serves the model with
    it missing (imputed), so the gate scores it so too, instead of failing the whole training run."""
    import random

    import polars as pl

    features = registry.load_card(settings.model_dir, "v1")["features"]
    rnd = random.Random(7)
    rows = pl.DataFrame({f: [rnd.uniform(0, 100) for _ in range(40)] for f in features}
                        | {"label": [i % 3 == 0 for i in range(40)]})
    gone = features[0]
    without = retrain.model_metrics_on(settings.model_dir, "v1", rows.drop(gone))
    as_missing = retrain.model_metrics_on(settings.model_dir, "v1", rows.with_columns(pl.lit(None).alias(gone)))
    assert without == as_missing and without["auroc"] is not None and without["n_rows"] == 40


@contextmanager
def analyst_reading(path: Path):
    """Another process holding the DuckDB file open read-only (a lock that refuses writers), as
    `duckdb -readonly` or a notebook does, until the block ends."""
    reader = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
         "con.sql('SELECT count(*) FROM runs').fetchall(); print('open', flush=True); sys.stdin.read()",
         str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        yield
    finally:
        reader.communicate("", timeout=30)


def test_the_decision_is_recorded_while_an_analyst_has_the_file_open_read_only(settings):
    """`duckdb -readonly` or a notebook on the nightly file holds a lock that refuses writers; by the
    time the gate's decision is recorded the model is published and the pointers have moved, so
    `batch train` must not fail there (it said "cannot read ...: rebuild it with nightly --full")."""
    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('new', '2024-01-02 00:00+00')")
    with analyst_reading(settings.duckdb_path):
        record_in_runs(settings, {"version": "v2", "metrics": {}, "gate": {"decision": "promote", "reasons": []}})
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id, model_version, gate_decision FROM runs").fetchall() == [
            ("new", "v2", "promote")]
    # no copy left behind (the lock file stays, as the nightly's does)
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [".wardwatch.duckdb.lock", "wardwatch.duckdb"]


def test_recording_beside_a_reader_never_overwrites_a_file_swapped_in_meanwhile(settings, monkeypatch):
    """The decision goes into a copy swapped in when readers hold the file: if the nightly swapped its new
    file in while the copy was written, the copy (of the old file) must not replace it."""
    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('old', '2024-01-02 00:00+00')")
    newer = settings.data_dir / "nightly-new.duckdb"
    with duckdb.connect(str(newer)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('tonight', '2024-01-03 00:00+00')")
    record = retrain._record

    def nightly_swaps_first(con, card, run_id=None):  # writing the copy: the nightly's swap lands now
        os.replace(newer, settings.duckdb_path)
        record(con, card, run_id)

    monkeypatch.setattr(retrain, "_record", nightly_swaps_first)
    with analyst_reading(settings.duckdb_path), pytest.raises(duckdb.IOException):  # the reader forces the copy
        record_in_runs(settings, {"version": "v2", "metrics": {}, "gate": {"decision": "promote", "reasons": []}})
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [("tonight",)]
    assert sorted(p.name for p in settings.data_dir.iterdir()) == [".wardwatch.duckdb.lock", "wardwatch.duckdb"]


# --- the nightly's lock --------------------------------------------------------------------------

DECISION = {"version": "v2", "metrics": {}, "gate": {"decision": "promote", "reasons": []}}


def test_a_decision_recorded_while_a_nightly_swaps_the_file_is_kept_next_to_the_nightlys_row(settings, monkeypatch):
    """`batch train` records its gate decision while a nightly, having read `runs`, writes its new file:
    written into the old file, the decision was lost when the nightly swapped its file in. The train
    waits for the nightly, then records into the row of the run it trained on, not the nightly's."""
    import threading

    from batch import nightly
    from tests.batch.test_nightly import stage1
    from tests.batch.test_rebuild import STANDINS

    stage1(settings.archive_dir)
    trained_on = nightly.run_nightly(settings, report=False, **STANDINS)["run_id"]
    inside, release, waiting = threading.Event(), threading.Event(), threading.Event()
    create_views = nightly.create_views

    def slow_views(con):  # the new file holds `runs` by now; the swap comes next
        inside.set()
        assert release.wait(60), "the test never let the nightly go on"
        create_views(con)

    monkeypatch.setattr(nightly, "create_views", slow_views)
    outcome: dict = {}

    def run(name, job):
        try:
            outcome[name] = job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
            outcome[name] = exc

    second = threading.Thread(target=run, args=("nightly", lambda: nightly.run_nightly(
        settings, full=False, report=False, **STANDINS)))
    second.start()
    recorder = threading.Thread(target=run, args=("train", lambda: record_in_runs(
        settings, DECISION, run_id=trained_on, on_wait=lambda holder: waiting.set())))
    try:
        assert inside.wait(60), "the second nightly never reached its write"
        recorder.start()
        # the train waits for the nightly's lock (told through on_wait) instead of writing the old file
        assert waiting.wait(30), "the train never waited for the nightly's lock"
        assert recorder.is_alive()  # and still waits: the nightly holds its lock until released
    finally:
        release.set()
        second.join(60)
        if recorder.is_alive() or recorder.ident is not None:
            recorder.join(60)
    assert not isinstance(outcome.get("train"), BaseException), outcome["train"]
    assert not isinstance(outcome.get("nightly"), BaseException), outcome["nightly"]
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT run_id, model_version, gate_decision FROM runs ORDER BY started_at").fetchall()
    assert rows == [(trained_on, "v2", "promote"), (outcome["nightly"]["run_id"], None, None)]


def test_a_train_that_waited_too_long_for_the_nightly_says_so_and_leaves_the_file_alone(settings):
    from batch.nightly import NIGHTLY, NightlyBusy, writer_lock

    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ, model_version VARCHAR)")
        con.execute("INSERT INTO runs VALUES ('a', '2024-01-02 00:00+00', NULL)")
    told = []
    with writer_lock(settings.duckdb_path, NIGHTLY):
        with pytest.raises(NightlyBusy, match=r"^nightly still holds .*\.wardwatch\.duckdb\.lock after 1 s"):
            record_in_runs(settings, DECISION, wait_s=1.0, on_wait=told.append)
    assert told == [NIGHTLY]  # the CLI prints what it waits for
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT model_version FROM runs").fetchall() == [(None,)]


@pytest.mark.parametrize("writer", ["train", "nightly"])
def test_the_copy_a_train_killed_while_recording_left_is_removed_by_the_next_writer(settings, writer):
    """Recording beside a reader writes a whole copy of the DuckDB file (.<file>.<id>.recording); a train
    killed meanwhile (its container stopped) left it on the data volume for good."""
    from batch.nightly import run_nightly
    from tests.batch.test_nightly import stage1
    from tests.batch.test_rebuild import STANDINS

    stage1(settings.archive_dir)
    run_nightly(settings, report=False, **STANDINS)
    target = settings.duckdb_path
    killed = [target.with_name(f".{target.name}.deadbeef.recording"),
              target.with_name(f".{target.name}.deadbeef.recording.wal")]
    for path in killed:
        path.write_bytes(b"half a database")
    if writer == "train":
        record_in_runs(settings, DECISION)
    else:
        run_nightly(settings, full=False, report=False, **STANDINS)
    assert sorted(p.name for p in target.parent.iterdir() if "recording" in p.name) == []
