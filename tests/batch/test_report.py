"""The nightly HTML report and `wardwatch query`."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from batch.nightly import run_nightly
from batch.report import auc, gather, onset_detection, reliability, render, roc_points
from batch.train import bootstrap_intervals
from tests.batch.test_nightly import ALERT, canonical, deteriorate, point_rows, stage1, stage2, twin
from tests.batch.test_rebuild import B1, STANDINS, T0, build_archive, hr, kafka, write
from wardwatch.cli import app
from wardwatch.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_lateness_s=3600)


def test_nightly_writes_a_self_contained_report_with_its_parity_numbers(settings):
    build_archive(settings.archive_dir, skew={(0, 2): 91.0})  # one mismatch, so the numbers are not all zero
    result = run_nightly(settings, **STANDINS)
    report = Path(result["report_path"])
    assert report.exists() and result["run_id"] in report.name
    text = report.read_text()
    p = result["parity"]
    cells = re.findall(r"<td>([^<]*)</td>", text)
    assert cells[:3] == [str(p["points_checked"]), str(p["values_checked"]), str(p["mismatched"])]
    assert "heart_rate_last_24h" in text  # the feature that mismatched
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from elsewhere
    assert "<script" not in text


def test_report_cli_writes_where_asked(settings, tmp_path):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, report=False, **STANDINS)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["batch", "report", "--out", str(out)],
                                env={"WARDWATCH_DATA_DIR": str(settings.data_dir)})
    assert result.exit_code == 0, result.output
    assert "Alert burden" in out.read_text()


def whole_file_parity(report: Path) -> list[str]:
    text = report.read_text()
    return re.findall(r"<td>([^<]*)</td>", text[text.index("The whole file"):text.index("Onset label")])


def full_rebuild_parity(settings: Settings) -> list[str]:
    """What `batch nightly --full` over a copy of the same archive reports: points, values, mismatched,
    max abs diff, parity ok."""
    p = run_nightly(twin(settings), full=True, report=False, **STANDINS)
    return [str(p["parity"][k]) for k in ("points_checked", "values_checked", "mismatched")] + [
        f"{p['parity']['max_abs_diff']:.4g}", str(p["parity_ok"])]


def test_a_quiet_nights_report_still_shows_what_parity_has_checked_in_the_file(settings):
    """An incremental run with no new archive parts checks no point: its own row says 0, so the report
    also shows parity over the whole file (here after a full run, then one adding stage 2's points):
    the figures a full rebuild of the same archive reports."""
    stage1(settings.archive_dir)
    checked = [run_nightly(settings, report=False, **STANDINS)]
    stage2(settings.archive_dir)
    checked.append(run_nightly(settings, full=False, report=False, **STANDINS))
    quiet = run_nightly(settings, full=False, **STANDINS)  # as `wardwatch batch nightly` runs
    assert quiet["parity"]["points_checked"] == 0 < min(r["parity"]["points_checked"] for r in checked)
    assert whole_file_parity(Path(quiet["report_path"])) == [str(len(checked) + 1), *full_rebuild_parity(settings)]


def test_the_whole_file_parity_counts_a_point_checked_again_once_with_its_latest_verdict(settings):
    """Night 1: the archiver landed the snapshot at (0, 2) before the event it saw, so the offline side
    lacks it: a mismatch. Night 2 archives the event and checks that point again: it matches. The report
    summed the runs' checks since the last full rebuild: 4 points (the file holds 3), 2 mismatched (the
    file's parity_report holds 1), unlike a full rebuild of the same archive."""
    stage1(settings.archive_dir)
    features, scores = point_rows([(0, 2)])
    features[0]["features_json"] = orjson.dumps({"heart_rate_last_24h": 100.0}).decode()  # E seen
    write(settings.archive_dir, "features", "early", features)
    write(settings.archive_dir, "scores", "early", scores)
    first = run_nightly(settings, full=False, report=False, **STANDINS)
    assert first["parity"]["mismatched"] == 2  # (0, 1) for good; (0, 2) until E is archived
    write(settings.archive_dir, "canonical", "late", canonical({(0, 2): [hr("E", 1, B1.effective_ms, 100.0)]}))
    again = run_nightly(settings, full=False, report=False, **STANDINS)
    assert (again["parity"]["points_checked"], again["parity"]["mismatched"]) == (1, 0)
    quiet = run_nightly(settings, full=False, **STANDINS)
    full = full_rebuild_parity(settings)
    assert (full[0], full[2]) == ("3", "1")  # 3 points; (0, 1)'s mismatch stands
    assert whole_file_parity(Path(quiet["report_path"])) == ["3", *full]


def test_report_evaluates_the_onset_label_on_at_risk_points(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)  # p1 deteriorates 3 h after an alert; a second alert comes at the onset
    text = Path(run_nightly(settings, **STANDINS)["report_path"]).read_text()
    onset = text[text.index("Onset label"):text.index("Discrimination")]
    cells = re.findall(r"<td>([^<]*)</td>", onset)
    # 7 points, 1 already deteriorated; the one onset was preceded by the first alert by 3 h
    assert cells == ["7", "6", "1", "1", "1", "3"]


def test_an_alert_withdrawn_by_a_correction_detects_no_onset_but_still_counts_as_opened(settings):
    """The report counted al1 as catching p1's onset 3 h ahead even after a correction withdrew it (its basis
    was entered in error): a detection that rested on an error."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)
    withdrawal = ALERT | {"alert_id": "c1", "kind": "correction", "status": "entered-in-error",
                          "original_alert_id": "al1", "scoring_ms": T0 + 60_000}
    write(settings.archive_dir, "alerts", "s4", [withdrawal | kafka(0, 2)])
    text = Path(run_nightly(settings, **STANDINS)["report_path"]).read_text()
    onset = text[text.index("Onset label"):text.index("Discrimination")]
    # 7 points, 1 already deteriorated, the one onset: al2 came at the onset itself, al1 was withdrawn
    assert re.findall(r"<td>([^<]*)</td>", onset) == ["7", "6", "1", "1", "0", "-"]
    burden = text[text.index("Alert burden"):]
    assert re.findall(r"<td>([^<]*)</td>", burden)[0] == "2"  # al1 and al2 still paged


def test_onset_counts_as_detected_only_by_an_alert_within_the_horizon_before_it():
    hour = 3_600_000
    episodes = [("p1", 20 * hour), ("p2", 20 * hour), ("p3", 20 * hour)]
    alerts = [("p1", 15 * hour), ("p1", 18 * hour),  # the first one inside the 12 h counts
              ("p2", 20 * hour), ("p2", 21 * hour),  # at or after the onset: too late
              ("p3", 7 * hour)]  # 13 h before: outside the horizon
    assert onset_detection(episodes, alerts) == (1, 5.0)


def test_roc_matches_sklearn_and_is_drawn_for_model_and_news2():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(float)
    probability = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    news2 = np.round(3 * y + rng.integers(0, 6, 300))  # many ties
    assert auc(*roc_points(y, probability)) == pytest.approx(roc_auc_score(y, probability))
    assert auc(*roc_points(y, news2)) == pytest.approx(roc_auc_score(y, news2))
    run = {"run_id": "r1", "started_at": "2024-06-10", "full": True, "new_parts": 3, "points_checked": 300,
           "values_checked": 9000, "mismatched": 0, "match_rate": 1.0, "max_abs_diff": 0.0, "late_published": 0,
           "late_recomputed": 0, "late_mismatched": 0, "parity_ok": True, "parity_json": orjson.dumps({}).decode()}
    patients = [f"p{i % 30}" for i in range(300)]
    html = render({"run": run, "labelled": list(zip(probability, news2, y, patients)), "alerts_opened": 6,
                   "patient_days": 12.0})
    assert html.count("<svg") == 2
    assert f"model AUROC {roc_auc_score(y, probability):.3f}" in html
    assert f"NEWS2 AUROC {roc_auc_score(y, news2):.3f}" in html
    assert "<td>50</td>" in html  # 6 alerts over 12 patient-days = 50 per 100 patient-days


RUN = {"run_id": "r1", "started_at": "2024-06-10", "full": True, "new_parts": 3, "points_checked": 300,
       "values_checked": 9000, "mismatched": 0, "match_rate": 1.0, "max_abs_diff": 0.0, "late_published": 0,
       "late_recomputed": 0, "late_mismatched": 0, "parity_ok": True, "parity_json": "{}"}


def table_after(html: str, heading: str) -> dict[str, list[str]]:
    """The first table after `heading`, as {first cell: the other cells}."""
    table = html[html.index(heading):]
    table = table[table.index("<table>"):table.index("</table>")]
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in table.split("<tr>")]
    return {cells[0]: cells[1:] for cells in rows if cells}


def test_the_report_gives_each_auroc_and_auprc_its_patient_level_interval_and_the_paired_gain():
    """A data scientist reading the report sees how sure each figure is: the model's and NEWS2's AUROC and
    AUPRC with 95 % intervals, and the model's gain over NEWS2 with the interval of the paired difference,
    patients (not points) drawn, as the model card computes them."""
    rng = np.random.default_rng(5)
    patients = [f"p{i // 20}" for i in range(600)]  # 30 patients, 20 points each
    y = (rng.random(600) < 0.15).astype(float)
    probability = np.clip(0.25 * y + rng.random(600) * 0.75, 0, 1)
    news2 = np.round(2 * y + rng.integers(0, 7, 600))
    html = render({"run": RUN, "labelled": list(zip(probability, news2, y, patients)), "alerts_opened": 6,
                   "patient_days": 12.0})
    shown = table_after(html, "Discrimination")
    ci = bootstrap_intervals(sorted(set(patients)), patients, y.astype(int), {"model": probability, "news2": news2}, {})
    auroc = {"model": roc_auc_score(y, probability), "news2": roc_auc_score(y, news2)}
    auprc = {"model": average_precision_score(y, probability), "news2": average_precision_score(y, news2)}

    def fmt(value, interval, sign=""):
        return f"{value:{sign}.3f} ({interval[0]:{sign}.3f} to {interval[1]:{sign}.3f})"

    assert shown["served model"] == [fmt(auroc["model"], ci["model"]["auroc"]), fmt(auprc["model"], ci["model"]["auprc"])]
    assert shown["NEWS2"] == [fmt(auroc["news2"], ci["news2"]["auroc"]), fmt(auprc["news2"], ci["news2"]["auprc"])]
    assert shown["model - NEWS2 (paired)"] == [fmt(auroc["model"] - auroc["news2"], ci["gain"]["auroc"], "+"),
                                               fmt(auprc["model"] - auprc["news2"], ci["gain"]["auprc"], "+")]
    assert "patient-level bootstrap (500 draws of the 30 patients" in html


def test_the_report_shows_the_trained_models_intervals_gains_and_the_gates_decision():
    """After `batch train`, the run's row holds the card's metrics and the gate's reasons: the report shows
    the held-out figures with their intervals, the gains over NEWS2 and over the current model, and why."""
    metrics = {"model": {"auroc": 0.8434, "auprc": 0.6604, "ci95": {"auroc": [0.7078, 0.9658], "auprc": [0.4288, 0.875]}},
               "news2": {"auroc": 0.8417, "auprc": 0.3829, "ci95": {"auroc": [0.7553, 0.9225], "auprc": [0.2246, 0.5805]}},
               "model_vs_news2": {"auroc_gain": {"estimate": 0.0016, "ci95": [-0.097, 0.0901]},
                                  "auprc_gain": {"estimate": 0.2775, "ci95": [0.086, 0.449]}},
               "model_vs_current": {"current_version": "v0001", "noninferiority_margin": {"auroc": 0.02, "auprc": 0.05},
                                    "auroc_gain": {"estimate": -0.004, "ci95": [-0.012, 0.003]},
                                    "auprc_gain": {"estimate": 0.01, "ci95": [-0.03, 0.05]}},
               "bootstrap": {"resamples": 500, "patients": 75}}
    reasons = ["auroc gain over NEWS2 not shown: its 95 % interval -0.0970 to +0.0895 (patient-level bootstrap) "
               "includes 0"]
    run = RUN | {"model_version": "v0002", "gate_decision": "candidate", "gate_reasons_json": orjson.dumps(reasons).decode(),
                 "model_metrics_json": orjson.dumps(metrics).decode()}
    html = render({"run": run, "labelled": [], "alerts_opened": 0, "patient_days": 1.0})
    shown = table_after(html, "Model v0002 trained on this run")
    assert shown["model"] == ["0.843 (0.708 to 0.966)", "0.660 (0.429 to 0.875)"]
    assert shown["NEWS2"] == ["0.842 (0.755 to 0.922)", "0.383 (0.225 to 0.581)"]
    assert shown["model - NEWS2 (paired)"] == ["+0.002 (-0.097 to +0.090)", "+0.278 (+0.086 to +0.449)"]
    assert shown["model - current v0001 (paired; non-inferiority margin AUROC -0.02, AUPRC -0.05)"] == [
        "-0.004 (-0.012 to +0.003)", "+0.010 (-0.030 to +0.050)"]
    assert "Gate: <b>candidate</b>" in html and f"<li>{reasons[0]}</li>" in html


def test_the_report_says_when_its_patients_are_too_few_to_judge_a_model():
    """The demo's 8 patients hold out 2: an AUROC and a 95 % interval from them were shown like any other.
    Both the held-out figures and the served model's figures now open with a plain warning, and a cohort
    large enough shows none."""
    rng = np.random.default_rng(5)

    def rendered(n_patients: int, held_out: int, held_out_with_onset: int | None) -> str:
        patients = [f"p{i // 20}" for i in range(20 * n_patients)]
        y = np.array([i % 20 == 0 and i // 20 % 3 == 0 for i in range(len(patients))], dtype=float)
        probability = np.clip(0.25 * y + rng.random(len(y)) * 0.75, 0, 1)
        metrics = {"model": {"auroc": 0.9, "auprc": 0.5, "positives": 7},
                   "bootstrap": {"resamples": 500, "patients": held_out}
                   | ({} if held_out_with_onset is None else {"patients_with_onset": held_out_with_onset})}
        run = RUN | {"model_version": "v0002", "gate_decision": "candidate", "gate_reasons_json": "[]",
                     "model_metrics_json": orjson.dumps(metrics).decode()}
        return render({"run": run, "labelled": list(zip(probability, np.round(rng.random(len(y)) * 9), y, patients)),
                       "alerts_opened": 0, "patient_days": 1.0})

    tiny = rendered(n_patients=8, held_out=2, held_out_with_onset=1)
    model = tiny[tiny.index("Model v0002"):]
    assert model.index("<b>Held-out set too small to judge</b>: 2 patients, 1 of them with an onset: too few to "
                       "judge a model by") < model.index("<table>")  # read before the figures
    served = tiny[tiny.index("Discrimination"):tiny.index("Model v0002")]
    assert "<b>Too few patients to judge</b>: 8 patients, 3 of them with an onset" in served

    large = rendered(n_patients=60, held_out=75, held_out_with_onset=12)
    assert "too few to judge" not in large and "class='warning'" not in large
    # a card from before patients_with_onset: its positive rows stand in (never fewer than those patients)
    assert "75 patients, 7 of them with an onset: too few" in rendered(n_patients=60, held_out=75,
                                                                        held_out_with_onset=None)


def test_the_next_nightlys_report_shows_the_model_trained_on_the_run_before(settings):
    """The nightly writes its report before anyone trains on it, and the scheduler never trains: the gate's
    decision recorded in the previous run's row never reached a report an operator opens."""
    import duckdb

    stage1(settings.archive_dir)
    first = run_nightly(settings, report=False, **STANDINS)
    with duckdb.connect(str(settings.duckdb_path)) as con:  # as `wardwatch batch train` records it
        con.execute("UPDATE runs SET model_version = 'v0007', gate_decision = 'candidate', "
                    "gate_reasons_json = '[\"auroc gain over NEWS2 not shown\"]', model_metrics_json = '{}' "
                    "WHERE run_id = ?", [first["run_id"]])
    stage2(settings.archive_dir)
    text = Path(run_nightly(settings, full=False, **STANDINS)["report_path"]).read_text()
    assert f"Model v0007 trained on run {first['run_id']}" in text
    assert "Gate: <b>candidate</b>" in text and "<li>auroc gain over NEWS2 not shown</li>" in text


def test_reliability_bins_predicted_against_observed():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    assert reliability(y, p) == [(0.05, 0.0, 2), (0.55, 0.5, 2), (0.95, 1.0, 2)]


def test_query_prints_rows_csv_and_the_schema_summary(settings):
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    run_nightly(settings, report=False, **STANDINS)
    env = {"WARDWATCH_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()
    csv = runner.invoke(app, ["query", "SELECT patient_id, sex FROM patients ORDER BY 1", "--csv"], env=env)
    assert csv.exit_code == 0, csv.output
    assert csv.output.splitlines() == ["patient_id,sex", "p1,female", "p2,"]
    # as DuckDB writes CSV: NULL empty, an empty string "", booleans and lists readable back
    typed = runner.invoke(app, ["query", "SELECT NULL AS a, '' AS b, true AS c, [1, 2] AS d, 'x,y' AS e", "--csv"],
                          env=env)
    assert typed.exit_code == 0, typed.output
    assert typed.output.splitlines() == ["a,b,c,d,e", ',"",true,"[1, 2]","x,y"']
    table = runner.invoke(app, ["query", "SELECT count(*) AS n FROM alert_outcomes"], env=env)
    assert table.exit_code == 0 and "1" in table.output
    summary = runner.invoke(app, ["query"], env=env)
    assert summary.exit_code == 0
    assert "table patients" in summary.output and "view  alert_outcomes" in summary.output
    assert "duckdb -readonly" in summary.output
    # the column-comment query it prints lists the file's tables and views, not DuckDB's own catalog
    hint = summary.output.split("Column comments:", 1)[1].split(";", 1)[0].replace("\n", " ")  # wrapped
    comments = runner.invoke(app, ["query", hint, "--csv"], env=env)
    assert comments.exit_code == 0, comments.output
    listed = {row.split(",")[0] for row in comments.output.splitlines()[1:]}
    assert {"patients", "alert_outcomes"} <= listed and not {"pg_type", "duckdb_columns"} & listed
    refused = runner.invoke(app, ["query", "DELETE FROM patients"], env=env)
    assert refused.exit_code == 2 and "read-only" in refused.output.lower()


def test_discrimination_is_one_model_versions_not_a_pool_of_two(settings):
    """After a promotion the file holds points scored by two versions; one AUROC over both describes neither
    model. The report shows the version serving last and says how many points of other versions it left out."""
    stage1(settings.archive_dir)
    stage2(settings.archive_dir)
    deteriorate(settings.archive_dir)
    run_nightly(settings, **STANDINS)
    with duckdb.connect(str(settings.duckdb_path)) as con:
        scored = con.execute("SELECT count(*) FROM scores s JOIN labels l USING (snapshot_id) "
                             "WHERE s.news2 IS NOT NULL AND l.at_risk AND s.probability IS NOT NULL").fetchone()[0]
        first = con.execute("SELECT min(scoring_ms) FROM scores WHERE probability IS NOT NULL").fetchone()[0]
        con.execute("UPDATE scores SET model_version = 'v0001' WHERE scoring_ms = ?", [first])
        con.execute("UPDATE scores SET model_version = 'v0002' WHERE scoring_ms > ?", [first])
        old = con.execute("SELECT count(*) FROM scores s JOIN labels l USING (snapshot_id) WHERE s.news2 IS NOT NULL "
                          "AND l.at_risk AND s.model_version = 'v0001'").fetchone()[0]
        data = gather(con)

    assert scored > 2 and old >= 1
    assert data["served_model"] == "v0002"
    assert len([r for r in data["labelled"] if r[0] is not None]) == scored - old
    assert data["other_versions"] == {"points": old, "versions": 1}
    html = render(data)
    assert "served model v0002 vs NEWS2" in html and f"{old} labelled at-risk points scored by 1 other" in html
