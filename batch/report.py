"""The nightly report: one self-contained HTML file (inline SVG, no scripts, no CDN).

    write_report(settings, out=None) -> path     (default <data_dir>/reports/nightly-<run_id>.html)

Sections, all read from the DuckDB file:
    parity        the latest run's summary and per-feature mismatch counts
    onset label   scoring points at risk / already deteriorated (batch/train.py: only at-risk rows are
                  evaluated), onset episodes, and how many an alert (open or escalate) preceded within
                  the horizon, with the median lead time to the onset
    ROC           the served risk (model probability) vs NEWS2 on the same labelled at-risk points
    calibration   predicted vs observed onset rate in ten probability bins; NEWS2's observed rate per
                  clinical band (NEWS2 is a score, not a probability); at-risk points
    alert burden  alerts opened per 100 patient-days; a patient-day is a day between a patient's
                  first and last measurement

The numbers are computed here with numpy (pure functions below), independently of the SQL views.
"""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import numpy as np
import orjson

from batch.catalog import LABEL_HORIZON_MS
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


def gather(con: duckdb.DuckDBPyConnection) -> dict:
    """Everything the report shows, as plain values."""
    run = con.execute("SELECT * FROM runs ORDER BY started_at DESC, run_id DESC LIMIT 1")
    columns = [d[0] for d in run.description]
    latest = dict(zip(columns, run.fetchone()))
    # the onset label is evaluated on at-risk rows only (already deteriorated patients are excluded)
    labelled = con.execute("""
        SELECT s.probability, s.news2, l.label FROM scores s
        JOIN labels l USING (patient_id, scoring_ms, "partition", "offset")
        WHERE s.news2 IS NOT NULL AND l.at_risk""").fetchall()
    points, at_risk = con.execute("SELECT count(*), count(*) FILTER (WHERE at_risk) FROM labels").fetchone()
    episodes = con.execute("SELECT DISTINCT patient_id, onset_ms FROM labels "
                           "WHERE label = 1 AND at_risk AND onset_ms IS NOT NULL").fetchall()
    raised = con.execute("SELECT patient_id, scoring_ms FROM alerts "
                         "WHERE kind IN ('open', 'escalate') AND scoring_ms IS NOT NULL").fetchall()
    opened = con.execute("SELECT count(*) FROM alerts WHERE kind = 'open'").fetchone()[0]
    span_ms = con.execute("SELECT coalesce(sum(last_effective_ms - first_effective_ms), 0) FROM patients").fetchone()[0]
    detected, lead_h = onset_detection(episodes, raised)
    # an incremental run checks only its new points (none on a quiet night): also every run since the
    # file was last rebuilt in full, whose checks together cover every point in it
    since_full = con.execute("""
        SELECT count(*), sum(points_checked), sum(values_checked), sum(mismatched), max(max_abs_diff),
               bool_and(parity_ok) FROM runs
        WHERE started_at >= (SELECT coalesce(max(started_at), TIMESTAMPTZ '-infinity') FROM runs WHERE "full")
        """).fetchone()
    return {"run": latest, "since_full": since_full, "labelled": labelled, "alerts_opened": int(opened),
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
        sections.append(f"<p>This run checked the points it added. Since the last full rebuild ({runs} runs, "
                        "this one included):</p>"
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
    sections.append("<h2>Discrimination: served model vs NEWS2 (same labelled at-risk scoring points)</h2>")
    y = np.array([r[2] for r in rows], dtype=float)
    if len(rows) and 0 < y.sum() < len(y):
        probability = np.array([r[0] for r in rows], dtype=float)
        news2 = np.array([r[1] for r in rows], dtype=float)
        model_roc, news2_roc = roc_points(y, probability), roc_points(y, news2)
        sections.append(svg_plot([(f"model AUROC {auc(*model_roc):.3f}", *map(list, model_roc), "#1f77b4"),
                                  (f"NEWS2 AUROC {auc(*news2_roc):.3f}", *map(list, news2_roc), "#d62728")],
                                 "false positive rate", "true positive rate"))
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

    burden = alerts_per_100_patient_days(data["alerts_opened"], data["patient_days"])
    sections.append("<h2>Alert burden</h2>")
    sections.append(_table(["alerts opened", "patient-days", "alerts per 100 patient-days"],
                           [[data["alerts_opened"], data["patient_days"], burden]]))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>wardwatch nightly report</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


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
