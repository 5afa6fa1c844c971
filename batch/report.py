"""The nightly report: one self-contained HTML file (inline SVG, no scripts, no CDN).

    write_report(settings, out=None) -> path     (default <data_dir>/reports/nightly-<run_id>.html)

Sections, all read from the DuckDB file:
    parity        the latest run's summary and per-feature mismatch counts; parity over the whole file as it
                  stands (parity_report, features_online): what a full rebuild of the same archive reports
    onset label   scoring points at risk / already deteriorated (batch/train.py: only at-risk rows are
                  evaluated), onset episodes, and how many an alert (open or escalate) preceded within
                  the horizon, with the median lead time to the onset
    ROC           the served risk (model probability) vs NEWS2 on the same labelled at-risk points, with
                  AUROC/AUPRC and their 95 % intervals for both and for the paired gain (model - NEWS2),
                  from the patient-level bootstrap of batch/train.py (a patient's points are not
                  independent: patients are drawn, not points)
    model         the last model trained (`batch train`, its `runs` row: this run or an earlier one): its held-out
                  figures with the card's intervals next to NEWS2's, the paired gains over NEWS2 and over
                  the model current then (non-inferiority margin), the gate's decision and its reasons
    (ROC and model open with a warning when their patients are too few to judge a model by:
    batch.train.too_few_to_judge)
    calibration   predicted vs observed onset rate in ten probability bins; NEWS2's observed rate per
                  clinical band (NEWS2 is a score, not a probability); at-risk points
    alert burden  alerts opened per 100 patient-days; a patient-day is a day between a patient's
                  first and last measurement that stood (patients.first/last_effective_ms: a retracted
                  reading does not stretch the stay)

The numbers are computed here with numpy (pure functions below), independently of the SQL views.
"""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import numpy as np
import orjson
from sklearn.metrics import average_precision_score, roc_auc_score

from batch.catalog import LABEL_HORIZON_MS
from batch.train import BOOTSTRAP_RESAMPLES, bootstrap_intervals, held_out_too_small, too_few_to_judge
from schemas.features import FEATURE_NAMES
from wardwatch.settings import Settings

DAY_MS = 24 * 3600 * 1000
NEWS2_BANDS = ((0, 4, "0-4 low"), (5, 6, "5-6 medium"), (7, 20, "7+ high"))


# --- pure metrics --------------------------------------------------------------------------------


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0,0) to (1,1)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    distinct = np.r_[np.nonzero(np.diff(score))[0], len(y) - 1]  # last index of each tied run
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    positives, negatives = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def reliability(y: np.ndarray, probability: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, rows) per non-empty probability bin."""
    index = np.minimum((probability * bins).astype(int), bins - 1)
    return [(float(probability[index == b].mean()), float(y[index == b].mean()), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]


def alerts_per_100_patient_days(alerts_opened: int, patient_days: float) -> float | None:
    return None if patient_days <= 0 else 100.0 * alerts_opened / patient_days


def onset_detection(episodes: list[tuple[str, int]], alerts: list[tuple[str, int]],
                    horizon_ms: int = LABEL_HORIZON_MS) -> tuple[int, float | None]:
    """Episodes (patient, onset_ms) with an alert (patient, scoring_ms) in [onset - horizon, onset),
    and the median lead time in hours from each one's first such alert to its onset."""
    times: dict[str, list[int]] = {}
    for patient, t in alerts:
        times.setdefault(patient, []).append(t)
    leads = []
    for patient, onset in episodes:
        before = [t for t in times.get(patient, []) if onset - horizon_ms <= t < onset]
        if before:
            leads.append((onset - min(before)) / 3_600_000)
    return len(leads), float(np.median(leads)) if leads else None


def discrimination(y: np.ndarray, probability: np.ndarray, news2: np.ndarray, patients: list[str],
                   resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """AUROC/AUPRC of the model and NEWS2 on the same rows, with the paired gain (model - NEWS2): each
    {"estimate", "ci95": [low, high] | None}, intervals from the patient-level bootstrap (batch/train.py),
    the same draws for both scores. Needs both classes."""
    y = y.astype(int)
    cis = bootstrap_intervals(sorted(set(patients)), patients, y, {"model": probability, "news2": news2}, {},
                              resamples=resamples)
    out: dict = {"resamples": resamples, "patients": len(set(patients))}
    for metric, fn in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        model, rule = float(fn(y, probability)), float(fn(y, news2))
        out[metric] = {"model": {"estimate": model, "ci95": cis["model"][metric]},
                       "news2": {"estimate": rule, "ci95": cis["news2"][metric]},
                       "gain": {"estimate": model - rule, "ci95": cis["gain"][metric]}}
    return out


def with_interval(estimate: float | None, ci95: list[float] | None, digits: int = 3, signed: bool = False) -> str:
    """0.843 (0.708 to 0.966); '-' when there is no estimate, the estimate alone when there is no interval."""
    if estimate is None:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(estimate)
    return text + (f" ({fmt.format(ci95[0])} to {fmt.format(ci95[1])})" if ci95 else " (no interval)")


# --- SVG -----------------------------------------------------------------------------------------


def svg_plot(series: list[tuple[str, list[float], list[float], str]], xlabel: str, ylabel: str,
             diagonal: bool = True, size: int = 320) -> str:
    """A unit-square line plot: series of (label, xs, ys, colour), axes 0..1."""
    pad = 40
    inner = size - 2 * pad

    def xy(x: float, y: float) -> str:
        return f"{pad + x * inner:.1f},{size - pad - y * inner:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#999"/>']
    if diagonal:
        parts.append(f'<polyline points="{xy(0, 0)} {xy(1, 1)}" stroke="#ccc" stroke-dasharray="4" fill="none"/>')
    for tick in (0, 0.5, 1):
        parts.append(f'<text x="{pad + tick * inner:.0f}" y="{size - pad + 14}" font-size="10" '
                     f'text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{size - pad - tick * inner + 4:.0f}" font-size="10" '
                     f'text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 6}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{size / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {size / 2})">{html.escape(ylabel)}</text>')
    for i, (label, xs, ys, colour) in enumerate(series):
        points = " ".join(xy(x, y) for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{points}" stroke="{colour}" stroke-width="2" fill="none"/>')
        parts.append(f'<text x="{pad + 6}" y="{pad + 14 + 14 * i}" font-size="11" fill="{colour}">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- gathering -----------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class NoNightlyRun(LookupError):
    """The file has the nightly's tables but no run recorded in `runs`: nothing to report on."""


def gather(con: duckdb.DuckDBPyConnection) -> dict:
    """Everything the report shows, as plain values."""
    run = con.execute("SELECT * FROM runs ORDER BY started_at DESC, run_id DESC LIMIT 1")
    columns = [d[0] for d in run.description]
    row = run.fetchone()
    if row is None:
        raise NoNightlyRun("no nightly run recorded in its `runs` table")
    latest = dict(zip(columns, row))
    # the nightly writes its report before any `batch train` on it: show the last model trained, on whichever run
    trained = con.execute("SELECT * FROM runs WHERE model_version IS NOT NULL "
                          "ORDER BY started_at DESC, run_id DESC LIMIT 1").fetchone()
    # the onset label is evaluated on at-risk rows only (already deteriorated patients are excluded)
    # one model's discrimination: pooling the points of two versions (before and after a promotion) would give
    # a figure of neither. The version serving last; the others per day in model_performance_daily
    served = con.execute("SELECT model_version FROM scores WHERE model_version IS NOT NULL AND probability IS NOT NULL "
                         "ORDER BY scoring_ms DESC, model_version DESC LIMIT 1").fetchone()
    served = served[0] if served else None
    labelled = con.execute("""
        SELECT s.probability, s.news2, l.label, s.patient_id FROM scores s
        JOIN labels l USING (snapshot_id)
        WHERE s.news2 IS NOT NULL AND l.at_risk AND s.model_version IS NOT DISTINCT FROM $served""",
                           {"served": served}).fetchall()
    other_versions = con.execute("""
        SELECT count(*), count(DISTINCT s.model_version) FROM scores s JOIN labels l USING (snapshot_id)
        WHERE s.news2 IS NOT NULL AND l.at_risk AND s.probability IS NOT NULL
          AND s.model_version IS DISTINCT FROM $served""", {"served": served}).fetchone()
    points, at_risk = con.execute("SELECT count(*), count(*) FILTER (WHERE at_risk) FROM labels").fetchone()
    episodes = con.execute("SELECT DISTINCT patient_id, onset_ms FROM labels "
                           "WHERE label = 1 AND at_risk AND onset_ms IS NOT NULL").fetchall()
    # an alert a correction withdrew (its basis was entered in error) caught nothing: not a detection. It
    # still paged someone, so it stays in the burden (alerts opened)
    raised = con.execute("SELECT patient_id, scoring_ms FROM alert_outcomes WHERE kind IN ('open', 'escalate') "
                         "AND scoring_ms IS NOT NULL AND NOT withdrawn").fetchall()
    opened = con.execute("SELECT count(*) FROM alerts WHERE kind = 'open'").fetchone()[0]
    span_ms = con.execute("SELECT coalesce(sum(last_effective_ms - first_effective_ms), 0) FROM patients").fetchone()[0]
    detected, lead_h = onset_detection(episodes, raised)
    # an incremental run checks only its new points (none on a quiet night): also parity over the whole
    # file as it stands, what a full rebuild of the same archive reports. Not a sum over the runs since the
    # last full one: a later run checks a point again (an event of the patient archived after it) and
    # replaces its verdict, so sums counted it twice and kept a mismatch the later run resolved.
    # parity_report holds every standing failure (match false) and nothing else but pending points.
    runs_since_full = con.execute("""
        SELECT count(*) FROM runs
        WHERE started_at >= (SELECT coalesce(max(started_at), TIMESTAMPTZ '-infinity') FROM runs WHERE "full")
        """).fetchone()[0]
    points_in_file = con.execute("SELECT count(*) FROM features_online").fetchone()[0]
    mismatched, max_diff, failures = con.execute("""
        SELECT count(*) FILTER (WHERE "check" = 'feature'),
               coalesce(max(abs_diff) FILTER (WHERE "check" = 'feature'), 0.0),
               count(*) FILTER (WHERE NOT match) FROM parity_report""").fetchone()
    since_full = (runs_since_full, points_in_file, points_in_file * len(FEATURE_NAMES), mismatched, max_diff,
                  failures == 0)
    return {"run": latest, "trained": dict(zip(columns, trained)) if trained else None, "since_full": since_full,
            "labelled": labelled, "served_model": served,
            "other_versions": {"points": int(other_versions[0]), "versions": int(other_versions[1])},
            "alerts_opened": int(opened),
            "patient_days": float(span_ms) / DAY_MS,
            "onset": {"points": int(points), "at_risk": int(at_risk), "episodes": len(episodes),
                      "detected": detected, "median_lead_time_h": lead_h}}


def render(data: dict) -> str:
    run = data["run"]
    parity = orjson.loads(run["parity_json"]) if run.get("parity_json") else {}
    sections = [f"<h1>wardwatch nightly run {html.escape(str(run['run_id']))}</h1>",
                f"<p>started {html.escape(str(run['started_at']))}; {'full rebuild' if run['full'] else 'incremental'}; "
                f"{run.get('new_parts', '-')} new archive parts</p>",
                "<h2>Parity (online vs offline features)</h2>",
                _table(["points checked", "values checked", "mismatched", "match rate", "max abs diff",
                        "late published", "late recomputed", "late mismatched", "parity ok"],
                       [[run["points_checked"], run["values_checked"], run["mismatched"], run["match_rate"],
                         run["max_abs_diff"], run["late_published"], run["late_recomputed"],
                         run["late_mismatched"], run["parity_ok"]]])]
    if data.get("since_full"):
        runs, points, values, mismatched, max_diff, ok = data["since_full"]
        sections.append(f"<p>This run checked the points it added. The whole file, as a full rebuild checks it "
                        f"({runs} runs since the last full rebuild, this one included):</p>"
                        + _table(["runs", "points checked", "values checked", "mismatched", "max abs diff",
                                  "parity ok"], [[runs, points, values, mismatched, max_diff, ok]]))
    per_feature = parity.get("per_feature_mismatches") or {}
    if per_feature:
        sections.append(_table(["feature", "mismatches"], sorted(per_feature.items())))

    onset = data.get("onset")
    if onset is not None:
        sections.append(f"<h2>Onset label (horizon {LABEL_HORIZON_MS // 3_600_000} h)</h2>")
        sections.append(_table(
            ["scoring points", "at risk", "already deteriorated (not evaluated)", "onset episodes",
             "episodes with an alert before onset", "median lead time (h)"],
            [[onset["points"], onset["at_risk"], onset["points"] - onset["at_risk"], onset["episodes"],
              onset["detected"], onset["median_lead_time_h"]]]))

    rows = [r for r in data["labelled"] if r[0] is not None]
    served = data.get("served_model")
    sections.append("<h2>Discrimination: served model" + (f" {html.escape(served)}" if served else "")
                    + " vs NEWS2 (same labelled at-risk scoring points)</h2>")
    if (others := data.get("other_versions") or {}).get("points"):
        sections.append(f"<p>The file also holds {others['points']} labelled at-risk points scored by "
                        f"{others['versions']} other model version(s) (before a promotion or a rollback): left out here, "
                        "a figure pooling two models describes neither; `model_performance_daily` gives each version "
                        "per day.</p>")
    y = np.array([r[2] for r in rows], dtype=float)
    if len(rows) and 0 < y.sum() < len(y):
        if small := too_few_to_judge(len({r[3] for r in rows}), len({r[3] for r in rows if r[2] == 1})):
            sections.append(_warning("Too few patients to judge", small))
        probability = np.array([r[0] for r in rows], dtype=float)
        news2 = np.array([r[1] for r in rows], dtype=float)
        model_roc, news2_roc = roc_points(y, probability), roc_points(y, news2)
        sections.append(svg_plot([(f"model AUROC {auc(*model_roc):.3f}", *map(list, model_roc), "#1f77b4"),
                                  (f"NEWS2 AUROC {auc(*news2_roc):.3f}", *map(list, news2_roc), "#d62728")],
                                 "false positive rate", "true positive rate"))
        shown = discrimination(y, probability, news2, [r[3] for r in rows])
        sections.append(_table(["", "AUROC (95 % CI)", "AUPRC (95 % CI)"], [
            [name, *(with_interval(shown[m][key]["estimate"], shown[m][key]["ci95"], signed=key == "gain")
                     for m in ("auroc", "auprc"))]
            for key, name in (("model", "served model"), ("news2", "NEWS2"), ("gain", "model - NEWS2 (paired)"))]))
        sections.append(f"<p>95 % intervals: patient-level bootstrap ({shown['resamples']} draws of the "
                        f"{shown['patients']} patients with labelled at-risk model-path points, every point of a drawn "
                        "patient taken; the same draws for the model and NEWS2, so the gain's interval is paired). "
                        "An interval of the gain that includes 0 does not show a difference. These are every patient the "
                        "stream scored, not held-out patients: for a model trained on this file they flatter it (its "
                        "held-out figures: the model section below, after `wardwatch batch train`).</p>")
        bins = reliability(y, probability)
        sections.append("<h2>Calibration</h2>")
        sections.append(svg_plot([("model", [b[0] for b in bins], [b[1] for b in bins], "#1f77b4")],
                                 "predicted probability", "observed rate"))
        sections.append(_table(["mean predicted", "observed", "rows"], [list(b) for b in bins]))
        band_rows = []
        for low, high, name in NEWS2_BANDS:
            in_band = (news2 >= low) & (news2 <= high)
            band_rows.append([name, float(y[in_band].mean()) if in_band.any() else None, int(in_band.sum())])
        sections.append(_table(["NEWS2 band", "observed rate", "rows"], band_rows))
    else:
        sections.append(f"<p>Not computable: {len(rows)} labelled model-path scores, "
                        f"{int(y.sum()) if len(rows) else 0} positive (needs both classes).</p>")

    sections += _model_section(data.get("trained", run), this_run=run)

    burden = alerts_per_100_patient_days(data["alerts_opened"], data["patient_days"])
    sections.append("<h2>Alert burden</h2>")
    sections.append(_table(["alerts opened", "patient-days", "alerts per 100 patient-days"],
                           [[data["alerts_opened"], data["patient_days"], burden]]))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
             ".warning{border-left:.3em solid #d62728;padding-left:.5em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>wardwatch nightly report</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def _warning(title: str, text: str) -> str:
    return f"<p class='warning'><b>{html.escape(title)}</b>: {html.escape(text)}</p>"


def _model_section(run: dict | None, *, this_run: dict) -> list[str]:
    """The last model trained (`batch train` records it in the row of the run it trained on, `run`):
    held-out figures with their intervals, the paired gains, the gate's decision and reasons. Nothing when
    none was trained."""
    if not run or not run.get("model_version"):
        return []
    on = "this run" if run.get("run_id") == this_run.get("run_id") else f"run {run.get('run_id')} ({run.get('started_at')})"
    metrics = orjson.loads(run["model_metrics_json"]) if run.get("model_metrics_json") else {}
    reasons = orjson.loads(run["gate_reasons_json"]) if run.get("gate_reasons_json") else []
    out = [f"<h2>Model {html.escape(str(run['model_version']))} trained on {html.escape(on)}: held-out patients</h2>"]
    if small := held_out_too_small(metrics):
        out.append(_warning("Held-out set too small to judge", small))
    rows = []
    for key, name in (("model", "model"), ("news2", "NEWS2")):
        block = metrics.get(key) or {}
        ci = block.get("ci95") or {}
        rows.append([name, *(with_interval(block.get(m), ci.get(m)) for m in ("auroc", "auprc"))])
    def gains(block: dict) -> list[str]:  # the paired gains' cells (card metrics.model_vs_*)
        return [with_interval((block.get(f"{m}_gain") or {}).get("estimate"), (block.get(f"{m}_gain") or {}).get("ci95"),
                              signed=True) for m in ("auroc", "auprc")]

    vs_news2 = metrics.get("model_vs_news2") or {}
    if vs_news2:
        rows.append(["model - NEWS2 (paired)", *gains(vs_news2)])
    vs_current = metrics.get("model_vs_current") or {}
    if vs_current:
        margin = vs_current.get("noninferiority_margin") or {}
        rows.append([f"model - current {vs_current.get('current_version', '')} (paired; non-inferiority margin "
                     + ", ".join(f"{m.upper()} -{margin[m]:g}" for m in ("auroc", "auprc") if m in margin) + ")",
                     *gains(vs_current)])
    out.append(_table(["", "AUROC (95 % CI)", "AUPRC (95 % CI)"], rows))
    bootstrap = metrics.get("bootstrap") or {}
    if bootstrap:
        out.append(f"<p>95 % intervals: patient-level bootstrap, {bootstrap.get('resamples')} draws of the "
                   f"{bootstrap.get('patients')} held-out patients (the model card's <code>ci95</code>, "
                   "<code>model_vs_news2</code>, <code>model_vs_current</code>).</p>")
    out.append(f"<p>Gate: <b>{html.escape(str(run.get('gate_decision')))}</b></p>")
    out.append("<ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in reasons) + "</ul>")
    return out


def write_report(settings: Settings, out: Path | None = None) -> Path:
    """Render the latest run's report from settings.duckdb_path into `out` (written atomically)."""
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        data = gather(con)
    out = out or settings.data_dir / "reports" / f"nightly-{data['run']['run_id']}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(data))
    tmp.replace(out)
    return out
