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


def gains(new, current, low=-0.01, high=0.01):
    """metrics.model_vs_current as compare_with_current gives it: each gain's estimate and an interval
    from estimate + low to estimate + high."""
    return {f"{m}_gain": {"estimate": new[m] - current[m], "ci95": [new[m] - current[m] + low, new[m] - current[m] + high]}
            for m in ("auroc", "auprc") if new[m] is not None}


def decide(new, current=CURRENT, news2=NEWS2, auroc_gain=0.01, auprc_gain=0.01, problems=(), current_gain=None,
           noninferiority=None):
    if current is not None and current_gain is None:
        current_gain = gains(new, current)
    return gate_decision(new, news2, current, min_auroc_gain=auroc_gain, min_auprc_gain=auprc_gain,
                         contract_problems=list(problems), current_gain=current_gain,
                         noninferiority=noninferiority or {"auroc": 0.02, "auprc": 0.05})


def test_better_model_is_promoted():
    decision = decide({"auroc": 0.80, "auprc": 0.40})
    assert decision.promote
    assert any("beats NEWS2" in r for r in decision.reasons)
    assert "auroc non-inferior to current model: gain +0.0500, 95 % interval +0.0400 to +0.0600 above the margin " \
           "-0.02" in decision.reasons


def test_a_model_that_may_be_worse_than_current_beyond_the_margin_is_kept_as_candidate_with_the_interval():
    new = {"auroc": 0.74, "auprc": 0.40}
    decision = decide(new, current_gain=gains(new, CURRENT, low=-0.02, high=0.015))
    assert not decision.promote and decision.decision == "candidate"
    assert decision.reasons == ["auroc may be worse than current model: gain -0.0100, 95 % interval -0.0300 to "
                                "+0.0050 (paired patient-level bootstrap) reaches below the non-inferiority margin -0.02"]


def test_against_current_the_interval_decides_not_the_point_estimate():
    """Worse by noise is not refused and better by noise is not required: a model 0.004 below the current one
    whose paired interval stays above the margin replaces it; one 0.004 above it whose interval reaches far
    below does not."""
    worse_by_noise = {"auroc": 0.746, "auprc": 0.345}
    assert decide(worse_by_noise, current_gain=gains(worse_by_noise, CURRENT, low=-0.01, high=0.01)).promote
    better_by_noise = {"auroc": 0.754, "auprc": 0.355}
    unsure = decide(better_by_noise, current_gain=gains(better_by_noise, CURRENT, low=-0.06, high=0.06))
    assert not unsure.promote
    assert [r.split(":")[0] for r in unsure.reasons] == ["auroc may be worse than current model",
                                                         "auprc may be worse than current model"]


def test_without_an_interval_against_current_the_model_is_not_promoted():
    new = {"auroc": 0.80, "auprc": 0.40}
    no_interval = {f"{m}_gain": {"estimate": new[m] - CURRENT[m], "ci95": None} for m in ("auroc", "auprc")}
    decision = decide(new, current_gain=no_interval)
    assert not decision.promote
    assert decision.reasons[0] == ("auroc gain over current model +0.0500: no 95 % interval (too few held-out "
                                   "patients of both classes), so non-inferiority is not shown")
    assert not gate_decision(new, NEWS2, CURRENT, min_auroc_gain=0, min_auprc_gain=0).promote


def test_better_than_current_but_not_news2_by_the_margin_is_rejected():
    decision = decide({"auroc": 0.80, "auprc": 0.305}, current={"auroc": 0.6, "auprc": 0.2})
    assert not decision.promote
    assert decision.reasons == ["auprc 0.3050 does not beat NEWS2 0.3000 by 0.01"]


def test_margins_are_inclusive_and_configurable():
    new, news2, current = {"auroc": 0.75, "auprc": 0.5}, {"auroc": 0.5, "auprc": 0.25}, {"auroc": 0.75, "auprc": 0.5}
    assert decide(new, current, news2, auroc_gain=0.25, auprc_gain=0.25).promote  # NEWS2 + 0.25 exactly
    assert not decide(new, current, news2, auroc_gain=0.26, auprc_gain=0.0).promote
    at_margin = gains(new, current, low=-0.125, high=0.125)  # the interval's low end exactly -0.125
    assert decide(new, current, news2, current_gain=at_margin, noninferiority={"auroc": 0.125, "auprc": 0.125}).promote
    assert not decide(new, current, news2, current_gain=at_margin,
                      noninferiority={"auroc": 0.12, "auprc": 0.125}).promote


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
    better = {"auroc": 0.90, "auprc": 0.60}
    decision = gate_decision(better, NEWS2, CURRENT, min_auroc_gain=0, min_auprc_gain=0,
                             directional_problems=[problem], current_gain=gains(better, CURRENT))
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
                    '0 AS "offset", \'s1\' AS snapshot_id')
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

    import numpy as np
    import polars as pl

    features = registry.load_card(settings.model_dir, "v1")["features"]
    rnd = random.Random(7)
    rows = pl.DataFrame({f: [rnd.uniform(0, 100) for _ in range(40)] for f in features}
                        | {"label": [i % 3 == 0 for i in range(40)]})
    gone = features[0]
    without = retrain.model_probabilities(settings.model_dir, "v1", rows.drop(gone))
    as_missing = retrain.model_probabilities(settings.model_dir, "v1", rows.with_columns(pl.lit(None).alias(gone)))
    assert len(without) == 40 and (without == as_missing).all() and bool(np.isfinite(without).all())


def test_a_model_whose_graph_does_not_impute_is_judged_on_what_the_worker_serves(tmp_path):
    """The model contract does not require an Imputer in the graph. A model without one (here StandardScaler +
    LogisticRegression) scored on a snapshot with lactate not charted: the worker fills in the card's value
    and gets a risk; the gate and the directional check must get the same risk (they fed the graph NaN and
    judged a NaN probability: a model ranked on one thing and served as another)."""
    import polars as pl

    from batch.directional import model_scorer
    from streams.scoring import Scorer
    from tests.streams.test_scoring import FEATURES, NORMAL, fit_linear, onnx_bytes, register

    model_dir = tmp_path / "models"
    register(model_dir, "v1", onnx_bytes(fit_linear()))
    snapshots = [NORMAL | {"lactate_last_24h": None}, NORMAL | {"lactate_last_24h": 4.0, "resp_rate_last_24h": 26.0},
                 NORMAL | {"resp_rate_last_24h": 24.0, "lactate_last_24h": None}]
    served = [r.probability for r in Scorer(model_dir, Settings(model_dir=model_dir)).score(snapshots)]
    assert all(r is not None and 0 < r < 1 for r in served)
    gate = retrain.model_probabilities(model_dir, "v1", pl.DataFrame([{f: s[f] for f in FEATURES} for s in snapshots]))
    assert gate.tolist() == served
    assert model_scorer(model_dir, "v1")(snapshots).tolist() == served


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


def test_a_current_model_that_fails_its_integrity_check_is_not_replaced_unseen(tmp_path, monkeypatch):
    """A tampered `current` used to be skipped as if there were none: the new model replaced it with no
    word of the comparison that never happened."""
    from batch.train import train_model
    from tests.batch.test_train import labels_for, synthetic_features

    monkeypatch.setattr(retrain, "directional_violations", lambda table: [])  # (see the test below)
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    features = synthetic_features(n_patients=80, seed=3)
    labels = labels_for(features)
    train_model(features, labels, settings.model_dir, "v1")
    registry.promote(settings.model_dir, "v1", why="first")
    registry.model_path(settings.model_dir, "v1").write_bytes(b"not the model the card describes")

    card = retrain.judge(settings, train_model(features, labels, settings.model_dir, "v2"), features, labels)
    assert card["gate"]["outcome"] == "candidate" and registry.current_version(settings.model_dir) == "v1"
    assert any(r.startswith("current model v1 failed its integrity check (tampered)") for r in card["gate"]["reasons"])


@pytest.mark.parametrize("where", ["news2 gain", "current gain"])
def test_an_interval_that_is_not_a_number_shows_nothing(where):
    nan = float("nan")
    new, news2 = {"auroc": 0.9, "auprc": 0.8}, {"auroc": 0.7, "auprc": 0.5}
    news2_ci = {m: [nan, nan] if where == "news2 gain" else [0.1, 0.3] for m in ("auroc", "auprc")}
    current_gain = {f"{m}_gain": {"estimate": 0.0, "ci95": [nan, nan] if where == "current gain" else [-0.01, 0.01]}
                    for m in ("auroc", "auprc")}
    decision = retrain.gate_decision(new, news2, dict(new), min_auroc_gain=0.0, min_auprc_gain=0.0,
                                     news2_gain_ci95=news2_ci, current_gain=current_gain,
                                     noninferiority={"auroc": 0.02, "auprc": 0.05})
    assert decision.decision == "candidate", decision.reasons


def test_against_the_current_model_two_trained_models_are_compared_on_the_paired_interval(tmp_path, monkeypatch):
    """Real models, trained and scored through ONNX: a retrain on the same 80 patients with another 5 % of
    label noise is a little worse than the current model on both point estimates (the point-estimate rule
    kept the current model for that), but the paired interval of the gain stays above the non-inferiority
    margins (0.02 AUROC, 0.05 AUPRC): it replaces the current model. A model trained on the labels of
    other patients is shown worse: it stays a candidate, the interval in its reason. The card and the
    `runs` row carry the gain and its interval."""
    from batch.train import train_model
    from tests.batch.test_train import labels_for, synthetic_features

    # the synthetic features are N(0, 1) noise beside heart rate, not clinical scales: the directional check's
    # whole rounds of real vitals saturate these models (risk 1.000 -> 0.999); it has its own tests
    monkeypatch.setattr(retrain, "directional_violations", lambda table: [])
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    features = synthetic_features(n_patients=80, seed=3)
    labels = labels_for(features)
    train_model(features, labels, settings.model_dir, "v1")
    registry.promote(settings.model_dir, "v1", why="first")

    card = retrain.judge(settings, train_model(features, labels_for(features, seed=12), settings.model_dir, "v2"),
                         features, labels)
    vs_current = card["metrics"]["model_vs_current"]
    assert vs_current["current_version"] == "v1" and vs_current["patients"] == card["n_test_patients"] == 24
    for metric, margin in (("auroc", 0.02), ("auprc", 0.05)):
        gain = vs_current[f"{metric}_gain"]
        assert gain["estimate"] < 0  # worse on this draw of 24 held-out patients...
        assert gain["ci95"][0] < gain["estimate"] < gain["ci95"][1] and gain["ci95"][0] > -margin  # ...by noise
        assert gain["estimate"] == pytest.approx(vs_current["new"][metric] - vs_current["current"][metric])
    assert card["gate"]["outcome"] == "promoted" and registry.current_version(settings.model_dir) == "v2"
    low, high = vs_current["auroc_gain"]["ci95"]
    assert (f"auroc non-inferior to current model: gain {vs_current['auroc_gain']['estimate']:+.4f}, 95 % interval "
            f"{low:+.4f} to {high:+.4f} above the margin -0.02") in card["gate"]["reasons"]

    unrelated = labels_for(synthetic_features(n_patients=80, seed=53))
    card = retrain.judge(settings, train_model(features, unrelated, settings.model_dir, "v3"), features, labels)
    gain = card["metrics"]["model_vs_current"]["auroc_gain"]
    assert gain["ci95"][1] < -0.2
    assert card["gate"]["outcome"] == "candidate" and registry.current_version(settings.model_dir) == "v2"
    assert (f"auroc may be worse than current model: gain {gain['estimate']:+.4f}, 95 % interval {gain['ci95'][0]:+.4f} "
            f"to {gain['ci95'][1]:+.4f} (paired patient-level bootstrap) reaches below the non-inferiority margin "
            "-0.02") in card["gate"]["reasons"]
    assert registry.load_card(settings.model_dir, "v3")["metrics"]["model_vs_current"] == card["metrics"]["model_vs_current"]
    from wardwatch.cli import train_summary

    assert (f"model - current v2  AUROC {gain['estimate']:.3f} (95% CI {gain['ci95'][0]:.3f} to {gain['ci95'][1]:.3f})"
            in train_summary(card, settings.model_dir))

    settings.data_dir.mkdir()
    with duckdb.connect(str(settings.duckdb_path)) as con:
        con.execute("CREATE TABLE runs (run_id VARCHAR, started_at TIMESTAMPTZ)")
        con.execute("INSERT INTO runs VALUES ('r1', '2024-01-01 00:00+00')")
    record_in_runs(settings, card)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        reasons, metrics = con.execute("SELECT gate_reasons_json, model_metrics_json FROM runs").fetchone()
    assert orjson.loads(metrics)["model_vs_current"]["auroc_gain"] == gain
    assert any(r.startswith("auroc may be worse than current model") for r in orjson.loads(reasons))


# --- a held-out set too small to judge a model ---------------------------------------------------

TOO_SMALL = "2 patients, 1 of them with an onset: too few to judge a model by"


def test_a_model_that_passes_every_check_on_too_few_held_out_patients_is_not_promoted_automatically():
    """On 2 held-out patients a gain "shown above 0" is noise: the figures pass, the gate keeps a candidate and
    says why and what to do."""
    new, shown = {"auroc": 0.95, "auprc": 0.90}, {"auroc": [0.1, 0.3], "auprc": [0.2, 0.5]}
    decision = gate_decision(new, NEWS2, None, min_auroc_gain=0, min_auprc_gain=0, news2_gain_ci95=shown,
                             held_out_too_small=TOO_SMALL)
    assert decision.decision == "candidate"
    [reason] = decision.reasons
    assert reason.startswith(f"held-out set too small to judge a model: {TOO_SMALL}; not promoted automatically")
    assert "wardwatch batch dataset --patients 300" in reason and "--allow-small-holdout" in reason
    assert "wardwatch model promote VERSION" in reason
    # the override lets the other checks decide, and says so; it never passes a model they refuse
    allowed = gate_decision(new, NEWS2, None, min_auroc_gain=0, min_auprc_gain=0, news2_gain_ci95=shown,
                            held_out_too_small=TOO_SMALL, allow_small_holdout=True)
    assert allowed.promote and any("decided on it anyway (--allow-small-holdout)" in r for r in allowed.reasons)
    worse = gate_decision({"auroc": 0.6, "auprc": 0.2}, NEWS2, None, min_auroc_gain=0, min_auprc_gain=0,
                          held_out_too_small=TOO_SMALL, allow_small_holdout=True)
    assert not worse.promote
    assert decide({"auroc": 0.80, "auprc": 0.40}).promote  # enough held-out patients: as before


def test_batch_train_on_a_small_cohort_keeps_a_candidate_unless_told_and_records_the_override(tmp_path, monkeypatch):
    """A real model on 40 synthetic patients (14 held out) beats NEWS2 on every figure: it was made current.
    Now it stays a candidate; with --allow-small-holdout (retrain's allow_small_holdout) it is promoted, and the
    card and the registry history say on what."""
    from batch.train import train_model
    from tests.batch.test_train import labels_for, synthetic_features

    monkeypatch.setattr(retrain, "directional_violations", lambda table: [])  # N(0, 1) noise, not vitals
    features = synthetic_features(n_patients=40, seed=3)
    labels = labels_for(features)

    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    card = retrain.judge(settings, train_model(features, labels, settings.model_dir, "v1"), features, labels)
    assert card["metrics"]["bootstrap"]["patients"] == 14
    assert card["gate"]["outcome"] == "candidate" and registry.current_version(settings.model_dir) is None
    assert card["gate"]["held_out_too_small"].startswith("14 patients")
    assert card["gate"]["allow_small_holdout"] is False
    assert [r for r in card["gate"]["reasons"] if r.startswith("held-out set too small")] == card["gate"]["reasons"]
    assert registry.candidate_version(settings.model_dir) == "v1"

    allowed = Settings(model_dir=tmp_path / "allowed", data_dir=tmp_path / "data")
    card = retrain.judge(allowed, train_model(features, labels, allowed.model_dir, "v1"), features, labels,
                         allow_small_holdout=True)
    assert card["gate"]["outcome"] == "promoted" and registry.current_version(allowed.model_dir) == "v1"
    assert card["gate"]["allow_small_holdout"] is True
    assert registry.load_card(allowed.model_dir, "v1")["gate"]["allow_small_holdout"] is True
    [entry] = registry.read_history(allowed.model_dir)
    assert entry["who"] == "batch retrain" and entry["held_out_too_small"].startswith("14 patients")
    assert "--allow-small-holdout" in entry["why"]


def test_batch_train_passes_allow_small_holdout_and_prints_why_it_kept_a_candidate(tmp_path, clean_env, monkeypatch):
    from typer.testing import CliRunner

    from wardwatch.cli import app

    (tmp_path / "wardwatch.duckdb").touch()
    told = {}
    reasons = [f"held-out set too small to judge a model: {TOO_SMALL}; not promoted automatically. Train on more"]

    def fake_retrain(settings, **kwargs):
        told.update(kwargs)
        return {"version": "v1", "n_train_patients": 6, "n_test_patients": 2,
                "metrics": {"model": {"auroc": 0.9, "auprc": 0.8, "n_rows": 30, "positives": 4},
                            "bootstrap": {"patients": 2, "patients_with_onset": 1, "resamples": 500}},
                "gate": {"decision": "candidate", "reasons": reasons, "outcome": "candidate"}}

    monkeypatch.setattr(retrain, "retrain", fake_retrain)
    env = {"WARDWATCH_DATA_DIR": str(tmp_path), "WARDWATCH_MODEL_DIR": str(tmp_path / "models")}
    plain = CliRunner().invoke(app, ["batch", "train"], env=env)
    assert plain.exit_code == 0, plain.output
    assert told["allow_small_holdout"] is False
    assert "gate: candidate" in plain.output and "held-out set too small to judge a model" in plain.output
    allowed = CliRunner().invoke(app, ["batch", "train", "--allow-small-holdout"], env=env)
    assert allowed.exit_code == 0 and told["allow_small_holdout"] is True, allowed.output


def test_a_model_that_ranks_well_but_whose_probabilities_are_off_is_not_promoted():
    """AUROC/AUPRC only rank: a model that ranks as well but gives everyone a probability far too high (alerts on
    most of a ward at WARDWATCH_ALERT_THRESHOLD) must not be promoted for its ranking. Its Brier score on the
    held-out rows must be at most NEWS2's mapped to a probability."""
    news2 = {"auroc": 0.70, "auprc": 0.30, "brier": 0.084}
    calibrated = {"auroc": 0.80, "auprc": 0.40, "brier": 0.060}
    assert decide(calibrated, news2=news2).promote
    overconfident = calibrated | {"brier": 0.31}
    decision = decide(overconfident, news2=news2)
    assert not decision.promote
    assert decision.reasons == ["calibration: Brier 0.3100 is worse than NEWS2's 0.0840 (NEWS2 mapped to a "
                                "probability): the probabilities the alert threshold is applied to are less "
                                "accurate than the rule's"]
    assert not decide(calibrated | {"brier": None}, news2=news2).promote  # not computable never passes


def test_a_current_model_trained_with_another_split_is_compared_but_the_verdict_says_it_is_favoured(
        tmp_path, monkeypatch):
    """The shipped v0001 was split by a permutation of the sorted ids: some of a new model's held-out
    patients may be its training patients. The card records the split rule; when `current`'s does not
    match, the verdict and the `batch train` summary say the comparison favours current (non-inferiority
    still applies); with the same rule they say nothing of it."""
    from batch.train import split_rule, train_model
    from tests.batch.test_train import labels_for, synthetic_features
    from wardwatch.cli import train_summary

    monkeypatch.setattr(retrain, "directional_violations", lambda table: [])  # (see the test above)
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data")
    features = synthetic_features(n_patients=80, seed=3)
    labels = labels_for(features)
    v1 = train_model(features, labels, settings.model_dir, "v1")
    assert v1["split"] == split_rule() and v1["split"]["method"] == "patient_id_hash"
    registry.promote(settings.model_dir, "v1", why="first")
    same = retrain.judge(settings, train_model(features, labels_for(features, seed=12), settings.model_dir, "v2"),
                         features, labels)
    assert same["metrics"]["model_vs_current"]["same_split"] is True
    assert not any("another split" in r for r in same["gate"]["reasons"])

    old = registry.load_card(settings.model_dir, "v2")
    del old["split"]  # as a card trained before 2026-11-27
    registry.write_card(settings.model_dir, "v2", old)
    card = retrain.judge(settings, train_model(features, labels_for(features, seed=12), settings.model_dir, "v3"),
                         features, labels)
    assert card["metrics"]["model_vs_current"]["same_split"] is False
    note = ("current v2 was trained with another split (its card records no split rule: a permutation of the sorted "
            "ids, before 2026-11-27): some of these held-out patients may be its training patients; the comparison "
            "favours current")
    assert any(r.startswith(note) for r in card["gate"]["reasons"]), card["gate"]["reasons"]
    assert any(r.startswith("auroc non-inferior to current model") or r.startswith("auroc may be worse")
               for r in card["gate"]["reasons"])  # the check still ran
    summary = train_summary(card, settings.model_dir)
    assert "warning: v2 was trained with another split" in summary and note in summary


def test_the_gate_reports_the_alerts_the_new_model_and_current_would_raise_on_the_same_held_out_rows(
        tmp_path, monkeypatch):
    """A promotion could double the ward's alerts at the same sensitivity: the card's gate, model_vs_current
    and the `batch train` summary carry both models' alerts per 100 patient-days at the alert threshold,
    on the same held-out scoring points; each agrees with what that model's own card counted on them."""
    from batch.train import train_model
    from tests.batch.test_train import labels_for, synthetic_features
    from wardwatch.cli import train_summary

    monkeypatch.setattr(retrain, "directional_violations", lambda table: [])  # (see the tests above)
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", alert_threshold=0.3,
                        alert_reset=0.2)
    features = synthetic_features(n_patients=80, seed=3)
    labels = labels_for(features)
    v1 = train_model(features, labels, settings.model_dir, "v1", alert_threshold=0.3)
    registry.promote(settings.model_dir, "v1", why="first")
    v2 = train_model(features, labels_for(features, seed=12), settings.model_dir, "v2", alert_threshold=0.3)
    card = retrain.judge(settings, v2, features, labels)
    burden = card["gate"]["alert_burden"]
    assert burden == card["metrics"]["model_vs_current"]["alert_burden"] and burden["threshold"] == 0.3
    for name, trained in (("new", v2), ("current", v1)):
        own = trained["metrics"]["model"]["operating"]  # the model's own card, on these held-out patients
        assert burden[name]["alerts"] == own["alerts"] > 0
        assert burden[name]["alerts_per_100_patient_days"] == own["alerts_per_100_patient_days"]
    assert burden["new"]["patient_days"] == burden["current"]["patient_days"]  # the same rows
    new_rate, current_rate = (burden[n]["alerts_per_100_patient_days"] for n in ("new", "current"))
    assert burden["ratio_new_to_current"] == pytest.approx(new_rate / current_rate, abs=1e-3)
    assert (f"alerts at >= 0.3 per 100 patient-days (every held-out scoring point, same rows): model {new_rate:.3f}, "
            f"current v1 {current_rate:.3f} (x{new_rate / current_rate:.2f})") in train_summary(card, settings.model_dir)
