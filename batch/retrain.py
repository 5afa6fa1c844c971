"""Retraining from the rebuilt DuckDB file and the promotion gate.

    retrain(settings) -> card

Features as of `issued` (no leakage) at every online scoring point, labels from canonical state
(batch/train.py), a new version in the registry. Then the gate decides what the new version becomes:

    promote     it beats NEWS2 on the held-out patients by the configured margins
                (settings.gate_min_auroc_gain / gate_min_auprc_gain, on the point estimates) and its gain
                over NEWS2 is above 0 across its 95 % interval (the paired patient-level bootstrap of
                batch/train.py: the model must be shown better than the rule, not just on this draw of
                75 patients); its probabilities are calibrated at least as well as NEWS2's (Brier, held-out
                rows: the alert threshold applies to them); it is not shown worse than `current` (non-inferiority, below); it passes the
                contract check and the directional check (batch/directional.py: a worse consciousness
                level, RR, SpO2, SBP or O2 flow never lowers its risk): `current` points at it
                (registry.promote records who/when/why)
    candidate   otherwise: the `candidate` pointer names it, so the worker can shadow-score it

Never promoted automatically on a held-out set too small to judge a model by (fewer than 20 patients or 10
with an onset: batch.train.too_few_to_judge), whatever its figures: the reason says what to do (more data;
`batch train --allow-small-holdout`, which lets the other checks decide and is recorded in the card's
`gate`; or `wardwatch model promote` by hand, recorded in history.jsonl with the same warning).

Against `current`, non-inferiority with a declared margin (settings.gate_noninferiority_auroc /
_auprc): the low end of the 95 % interval of the paired gain (new - current, both models scored on the
same held-out rows, the same patient-level bootstrap draws) must not lie below -margin. Comparing point
estimates let noise decide: a retrain 0.003 worse on 75 patients was refused, one 0.003 better promoted,
though either difference is far inside what another draw of patients gives. Requiring the gain shown
above 0 instead would keep `current` forever (a retrain is expected to be about as good as the model
serving, which passed the NEWS2 test itself); the margin states how much worse a model may possibly be
and still replace it. `current` is evaluated on the same held-out rows as the new model (its card's
metrics come from another split and are not comparable); the gain and its interval go into the new
card (`metrics.model_vs_current`). Same rows, not necessarily unseen by `current`: when its card does not
record the new card's split rule (`split`; a model trained before 2026-11-27 records none), some of them
may be its training patients, the comparison favours it, and the verdict says so (split_difference). The decision and its reasons go into the new card (`gate`) and into
the `runs` row of the nightly whose file the model was trained on (record_in_runs).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import duckdb
import numpy as np
import orjson
import polars as pl

from batch import registry
from batch.directional import directional_table, directional_violations, model_scorer, registered_model
from batch.features import features_as_of_issued
from batch.nightly import TRAIN, NightlyBusy, writer_lock
from batch.train import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SERVED, bootstrap_intervals, features_with_labels,
                         held_out_too_small, make_labels, operating_metrics, published_points, split_patients,
                         train_model)
from wardwatch.settings import Settings

GATE_METRICS = ("auroc", "auprc")
# what "more data" means when the held-out set is too small (README, "The offline plane")
MORE_DATA = "`wardwatch batch dataset --patients 300`, or the nightlies of more patients"
# as batch/train.py joins them: snapshot_id tells apart two points of one message at one time (cut at their
# idx, their features and labels may differ)
_KEYS = ("patient_id", "scoring_ms", "partition", "offset", "snapshot_id")


@dataclass(frozen=True)
class GateDecision:
    decision: str  # "promote" or "candidate"
    reasons: list[str]
    compared: dict = field(default_factory=dict)  # {"new": {...}, "current": {...} | None, "news2": {...}}
    margins: dict = field(default_factory=dict)

    @property
    def promote(self) -> bool:
        return self.decision == "promote"


def gate_decision(new: dict, news2: dict | None, current: dict | None, *, min_auroc_gain: float,
                  min_auprc_gain: float, contract_problems: list[str] = (),
                  news2_gain_ci95: dict | None = None, directional_problems: list[str] = (),
                  current_gain: dict | None = None, noninferiority: dict | None = None,
                  held_out_too_small: str | None = None, allow_small_holdout: bool = False,
                  current_split_differs: str | None = None) -> GateDecision:
    """Promote only when every gate metric of `new` is at least NEWS2's plus its margin, the low end of
    the 95 % interval of each gain over NEWS2 (`news2_gain_ci95`: {"auroc": [low, high], "auprc": [...]},
    card metrics.model_vs_news2) is above 0, the model is non-inferior to the current model (when there
    is one), the contract holds and the model passed the directional check (`directional_problems`: the
    lines of batch.directional.directional_violations, none). Pure: metrics in, verdict out. Without
    news2_gain_ci95 (None) the NEWS2 interval is not checked: retrain always passes it.

    Non-inferiority to `current`: `current_gain` is metrics.model_vs_current ({"auroc_gain": {"estimate",
    "ci95": [low, high]}, "auprc_gain": ...}: new - current, paired); each interval's low end must be at
    least -noninferiority[metric] ({"auroc": margin, "auprc": margin}, 0 or more). Point estimates alone
    never decide against `current`: an interval that is None (one class in every draw), or a current
    model with no interval of its gain, never passes.

    Calibration: when the metrics carry a Brier score (`brier`, as the card's do), the new model's must be at
    most NEWS2's (NEWS2 mapped to a probability on the training rows): ranking metrics cannot see
    probabilities shifted up or down, and the alert threshold is applied to the probability.

    Each metrics dict holds `auroc` and `auprc` on the same held-out rows; None means not computable
    (one class only), which never passes; so does an interval that is None.

    `held_out_too_small` (batch.train.held_out_too_small of the card's metrics: why its held-out patients are
    too few to judge a model by, or None) never passes either, whatever the figures: on 2 held-out patients
    an interval "above 0" is noise. `allow_small_holdout` (`batch train --allow-small-holdout`) lets the
    other checks decide anyway, and says so among the reasons.

    `current_split_differs` (judge: why `current`'s card does not record the new model's split rule) adds a
    line to the verdict, promote or not: some held-out patients may be `current`'s training patients, so the
    comparison favours `current`. Non-inferiority is still required: the bias only makes `current` look
    better, so a pass still shows the new model not worse, and a new model is never swapped in on a
    comparison that was not made; a fail may be that bias, which the line says (review the candidate, e.g.
    shadow-scored, and promote it by hand)."""
    margins = {"auroc": min_auroc_gain, "auprc": min_auprc_gain}
    noninferiority = {"auroc": 0.0, "auprc": 0.0} | (noninferiority or {})
    reasons: list[str] = [f"contract: {p}" for p in contract_problems]
    # a worse vital sign lowering the risk is a safety defect, whatever the discrimination
    reasons += [f"directional check: {p}" for p in directional_problems]
    passed = []
    if news2 is None:
        reasons.append("no NEWS2 metrics on the held-out rows: cannot show the model beats the rule")
    for metric in GATE_METRICS if news2 is not None else ():
        mine, theirs = new.get(metric), news2.get(metric)
        if mine is None or theirs is None:
            reasons.append(f"{metric} vs NEWS2 not computable (the {new.get('n_rows', '?')} held-out rows at "
                           f"risk hold {new.get('positives', '?')} positive: one class or none)")
        elif not mine - theirs >= margins[metric]:  # (NaN: not shown)
            reasons.append(f"{metric} {mine:.4f} does not beat NEWS2 {theirs:.4f} by {margins[metric]:g}")
        else:
            passed.append(f"{metric} {mine:.4f} beats NEWS2 {theirs:.4f} by >= {margins[metric]:g}")
    for metric in GATE_METRICS if news2 is not None and news2_gain_ci95 is not None else ():
        ci = news2_gain_ci95.get(metric)
        if ci is None:
            reasons.append(f"{metric} gain over NEWS2: no 95 % interval (too few held-out patients of both classes)")
        elif not ci[0] > 0:  # (NaN: not shown)
            # an interval wholly below 0 shows the model worse than NEWS2, which "includes 0" would hide
            where = "includes 0" if ci[1] >= 0 else "is below 0: the model is worse than NEWS2"
            reasons.append(f"{metric} gain over NEWS2 not shown: its 95 % interval {ci[0]:+.4f} to {ci[1]:+.4f} "
                           f"(patient-level bootstrap) {where}")
        else:
            passed.append(f"{metric} gain over NEWS2 95 % interval {ci[0]:+.4f} to {ci[1]:+.4f} is above 0")
    if news2 is not None and ("brier" in new or "brier" in news2):  # (a card's metrics always carry it)
        # AUROC/AUPRC only rank: the alert threshold is applied to the probability itself, so a model
        # whose probabilities are off (overconfident: alerts on most patients; underconfident: none)
        # ranks as well and would still be promoted. The floor: its Brier score on the held-out rows at
        # most that of NEWS2 mapped to a probability (a one-feature logistic fit on the training rows).
        mine, theirs = new.get("brier"), news2.get("brier")
        if mine is None or theirs is None:
            reasons.append("calibration vs NEWS2 not computable (no Brier score on the held-out rows)")
        elif not mine <= theirs:  # (NaN: not shown)
            reasons.append(f"calibration: Brier {mine:.4f} is worse than NEWS2's {theirs:.4f} (NEWS2 mapped to a "
                           "probability): the probabilities the alert threshold is applied to are less accurate "
                           "than the rule's")
        else:
            passed.append(f"calibration: Brier {mine:.4f} at most NEWS2's {theirs:.4f}")
    for metric in GATE_METRICS if current is not None else ():
        gain = (current_gain or {}).get(f"{metric}_gain") or {}
        estimate, ci, limit = gain.get("estimate"), gain.get("ci95"), -noninferiority[metric]
        if new.get(metric) is None or current.get(metric) is None or estimate is None:
            reasons.append(f"{metric} vs current model not computable (the {new.get('n_rows', '?')} held-out rows "
                           f"at risk hold {new.get('positives', '?')} positive: one class or none)")
        elif ci is None:
            reasons.append(f"{metric} gain over current model {estimate:+.4f}: no 95 % interval (too few held-out "
                           "patients of both classes), so non-inferiority is not shown")
        elif not ci[0] >= limit:  # (NaN: not shown)
            reasons.append(f"{metric} may be worse than current model: gain {estimate:+.4f}, 95 % interval "
                           f"{ci[0]:+.4f} to {ci[1]:+.4f} (paired patient-level bootstrap) reaches below the "
                           f"non-inferiority margin {limit:+g}")
        else:
            passed.append(f"{metric} non-inferior to current model: gain {estimate:+.4f}, 95 % interval "
                          f"{ci[0]:+.4f} to {ci[1]:+.4f} above the margin {limit:+g}")
    if held_out_too_small and not allow_small_holdout:
        reasons.append(f"held-out set too small to judge a model: {held_out_too_small}; not promoted automatically. "
                       f"Train on more patients ({MORE_DATA}), or re-run with `wardwatch batch train "
                       "--allow-small-holdout` to let the gate decide on these figures (recorded in the card), "
                       "or promote it by hand: `wardwatch model promote VERSION --reason ...`")
    elif held_out_too_small:
        passed.append(f"held-out set too small to judge a model: {held_out_too_small}; the gate decided on it "
                      "anyway (--allow-small-holdout)")
    if current is not None and current_split_differs:
        note = (f"{current_split_differs}: some of these held-out patients may be its training patients; the "
                "comparison favours current (non-inferiority still required: a pass stands, a fail may be that bias)")
        (reasons if reasons else passed).append(note)
    compared = {"new": new, "news2": news2, "current": current}
    gate_margins = margins | {"noninferiority_vs_current": noninferiority}
    if reasons:
        return GateDecision("candidate", reasons, compared, gate_margins)
    return GateDecision("promote", passed, compared, gate_margins)


def _held_out(features: pl.DataFrame, labels: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """The rows batch.train.train_model evaluates on: same join, same patient split (defaults), at risk,
    and served by the model (every NEWS2 input charted; the worker takes the rule path elsewhere); and
    every held-out patient (sorted), the bootstrap's draws (as train_model's)."""
    keys = [k for k in _KEYS if k in features.columns and k in labels.columns]
    data = features.join(labels.select(*keys, "label").unique(subset=keys), on=keys).filter(
        pl.col("label").is_not_null())
    _, test_ids = split_patients(data["patient_id"].to_list())
    held_out = data.filter(pl.col("patient_id").is_in(sorted(test_ids)) & SERVED)
    if "at_risk" in labels.columns:  # the onset label: rows already deteriorated at T are not evaluated
        held_out = held_out.join(labels.filter(pl.col("at_risk")).select(keys).unique(), on=keys, how="semi")
    return held_out, sorted(test_ids)


def model_probabilities(model_dir, version: str, rows: pl.DataFrame) -> np.ndarray:
    """The risk a registered model gives `rows`, fed as the worker feeds it (streams/scoring.py model_input:
    the card's feature order, its imputation values for missing features, float32, one run per row), so the
    gate judges the model the worker would serve, whether or not its graph imputes by itself."""
    from streams.scoring import model_input
    from streams.scoring import model_probabilities as served_probabilities

    contract, session = registered_model(model_dir, version)
    # a feature the rows no longer have (renamed or dropped since the model was trained) is missing, as
    # the worker serves it (imputed from the card): the gate still compares, it does not crash
    raw = rows.select(pl.col(f).cast(pl.Float64) if f in rows.columns else pl.lit(None, pl.Float64).alias(f)
                      for f in contract.features).to_numpy().astype(np.float64)
    x, _ = model_input(contract, raw)
    return served_probabilities(session, contract, x)


def _ranking_metrics(y: np.ndarray, probability: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(set(y.tolist())) < 2:
        return {"auroc": None, "auprc": None, "n_rows": len(y)}
    return {"auroc": float(roc_auc_score(y, probability)), "auprc": float(average_precision_score(y, probability)),
            "n_rows": len(y)}


def compare_with_current(model_dir, version: str, current: str, rows: pl.DataFrame, patients: list[str], *,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The new model against the current one on the same held-out rows (features, label, patient_id):
    both scored with onnxruntime, their AUROC/AUPRC and the paired gain (new - current) with its 95 %
    interval from the patient-level bootstrap of batch/train.py (`patients`: every held-out patient, the
    draws; the same draws for both models). Returns the card's metrics.model_vs_current."""
    new_p, current_p = model_probabilities(model_dir, version, rows), model_probabilities(model_dir, current, rows)
    y = rows["label"].to_numpy().astype(int)
    new, cur = _ranking_metrics(y, new_p), _ranking_metrics(y, current_p)
    intervals = bootstrap_intervals(patients, rows["patient_id"].to_list(), y, {"new": new_p, "current": current_p},
                                    {}, resamples=resamples, seed=seed)
    out = {"current_version": current, "current": cur | {"ci95": {m: intervals["current"][m] for m in GATE_METRICS}},
           "new": new | {"ci95": {m: intervals["new"][m] for m in GATE_METRICS}},
           "n_rows": len(y), "positives": int(y.sum()), "patients": len(patients)}
    for m in GATE_METRICS:
        estimate = None if None in (new[m], cur[m]) else new[m] - cur[m]
        out[f"{m}_gain"] = {"estimate": estimate, "ci95": intervals["gain"][m]}
    return out


def alert_burden(model_dir, version: str, current: str, features: pl.DataFrame, labels: pl.DataFrame, *,
                 threshold: float) -> dict:
    """How many alerts the new model and `current` would raise at `threshold` on the same held-out rows:
    every scoring point of the held-out patients (at risk or not; none on the NEWS2 rule path, where the
    worker serves no model), both scored with onnxruntime, counted by batch.train.operating_metrics (rising
    edges, per 100 patient-days, with the sensitivity). Reported, not gated: a promotion that doubles
    the ward's alerts at the same sensitivity is then in plain sight."""
    data = features_with_labels(features, labels)
    _, test_ids = split_patients(data["patient_id"].to_list())
    rows = data.filter(pl.col("patient_id").is_in(sorted(test_ids))).with_columns(_served=SERVED)
    out = {"threshold": threshold, "rows": "every held-out scoring point, at risk or not (the model's score where the "
                                           "worker serves it); alerts per 100 patient-days", "current_version": current}
    for name, v in (("new", version), ("current", current)):
        scored = rows.with_columns(_p=pl.Series(model_probabilities(model_dir, v, rows), dtype=pl.Float64))
        out[name] = operating_metrics(scored.with_columns(_score=pl.when(pl.col("_served")).then(pl.col("_p"))),
                                      threshold=threshold)
    new_rate, current_rate = out["new"]["alerts_per_100_patient_days"], out["current"]["alerts_per_100_patient_days"]
    out["ratio_new_to_current"] = round(new_rate / current_rate, 3) if new_rate is not None and current_rate else None
    return out


def apply_gate(settings: Settings, version: str, decision: GateDecision, *, promote_if_none: bool = True) -> str:
    """Move the pointers as the gate decided; returns what the version became."""
    model_dir = settings.model_dir
    no_current = registry.current_version(model_dir) is None
    if decision.promote and (promote_if_none or not no_current):
        registry.promote(model_dir, version, who="batch retrain", why="promotion gate: " + "; ".join(decision.reasons))
        return "promoted"
    if registry.integrity(model_dir, version) == "ok":
        registry.set_candidate(model_dir, version)
    return "candidate"


RECORD_WAIT_S = 1800.0  # a nightly takes minutes (3 min for 5 M events, benchmarks/results/bench-batch.json)


def record_in_runs(settings: Settings, card: dict, *, run_id: str | None = None, wait_s: float = RECORD_WAIT_S,
                   on_wait: Callable[[str], None] | None = None) -> None:
    """Write the gate's decision and the held-out metrics into the `runs` row of `run_id` (the run
    whose file the model was trained on; None: the latest row).

    Under the lock every writer of the file takes (batch.nightly.writer_lock): a nightly swapping
    its new file in meanwhile would lose this update, or this update its row. The model is already
    published by now, so a nightly in progress is waited for (up to `wait_s`, then NightlyBusy;
    `on_wait(holder)` once when it has to wait) rather than the decision dropped.

    The file is updated in place when nobody else has it open. An analyst's read-only session
    (`duckdb -readonly`, a notebook, `wardwatch query`) holds a lock that refuses writers, and
    the model is already published by then: so, when only readers hold it, a copy is updated and
    swapped in as the nightly swaps its new file (readers keep their view until they reopen)."""
    with writer_lock(settings.duckdb_path, TRAIN, patience=lambda holder: wait_s, on_wait=on_wait):
        _record_in_file(settings.duckdb_path, card, run_id)


def _record_in_file(path, card: dict, run_id: str | None) -> None:
    try:
        with duckdb.connect(str(path)) as con:
            _record(con, card, run_id)
        return
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        conflict = exc
    wal = path.with_name(path.name + ".wal")
    copy = path.with_name(f".{path.name}.{uuid.uuid4().hex}.recording")
    try:
        # a read-only session of our own proves the holders only read, and keeps writers out while copying
        with duckdb.connect(str(path), read_only=True):
            if wal.exists():  # a writer's unfinished log: the bytes alone would lose its changes
                raise conflict
            shutil.copyfile(path, copy)
            copied = _identity(path)
        with duckdb.connect(str(copy)) as con:
            _record(con, card, run_id)
            con.execute("CHECKPOINT")
        if _identity(path) != copied:  # a nightly swapped its new file in meanwhile: never overwrite it
            raise conflict
        os.replace(copy, path)
    finally:
        for leftover in (copy, copy.with_name(copy.name + ".wal")):
            leftover.unlink(missing_ok=True)


def _identity(path) -> tuple[int, int, int]:
    """Which file `path` is now, and whether it changed: inode, size and modification time."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def latest_run(con: duckdb.DuckDBPyConnection) -> str | None:
    latest = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC, run_id DESC LIMIT 1").fetchall()
    return latest[0][0] if latest else None


def _record(con: duckdb.DuckDBPyConnection, card: dict, run_id: str | None = None) -> None:
    for column in ("model_version", "gate_decision", "gate_reasons_json", "model_metrics_json"):
        con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {column} VARCHAR")
    # a nightly waited for has added its own row since: the model belongs to the run it was trained on
    run_id = run_id or latest_run(con)
    if run_id is None:
        return
    gate = card.get("gate", {})
    con.execute("UPDATE runs SET model_version = ?, gate_decision = ?, gate_reasons_json = ?, "
                "model_metrics_json = ? WHERE run_id = ?",
                [card["version"], gate.get("decision"), orjson.dumps(gate.get("reasons", [])).decode(),
                 orjson.dumps(card.get("metrics", {}), option=orjson.OPT_SORT_KEYS).decode(), run_id])


def split_difference(new_card: dict, current_card: dict) -> str | None:
    """Why `current` may have trained on some of the new model's held-out patients (None: both cards record
    the same split rule, batch.train.split_rule: a patient is held out by both or by neither)."""
    mine, theirs = new_card.get("split"), current_card.get("split")
    if mine is not None and mine == theirs:
        return None
    what = ("its card records no split rule: a permutation of the sorted ids, before 2026-11-27" if theirs is None
            else f"{theirs.get('method')}, held-out fraction {theirs.get('held_out_fraction')}, seed {theirs.get('seed')}")
    return f"current {current_card.get('version')} was trained with another split ({what})"


def judge(settings: Settings, card: dict, feats: pl.DataFrame, labels: pl.DataFrame, *,
          promote_if_none: bool = True, allow_small_holdout: bool = False) -> dict:
    """The gate on a version train_model just published from `feats`/`labels`: the directional check,
    the paired comparison with `current` on the same held-out rows, the held-out set's size, the decision,
    the pointers moved and the card rewritten with all of it (`gate`, with `held_out_too_small` and
    `allow_small_holdout`; `metrics.model_vs_current`, `directional_check`). Returns the card."""
    version = card["version"]
    table = directional_table(model_scorer(settings.model_dir, version))
    current = registry.current_version(settings.model_dir)
    noninferiority = {"auroc": settings.gate_noninferiority_auroc, "auprc": settings.gate_noninferiority_auprc}
    small = held_out_too_small(card["metrics"])
    current_metrics = vs_current = split_differs = None
    if current is not None and registry.integrity(settings.model_dir, current) == "ok":
        rows, patients = _held_out(feats, labels)
        vs_current = compare_with_current(settings.model_dir, version, current, rows, patients)
        vs_current["noninferiority_margin"] = noninferiority
        split_differs = split_difference(card, registry.load_card(settings.model_dir, current))
        vs_current["same_split"] = split_differs is None
        vs_current["alert_burden"] = alert_burden(settings.model_dir, version, current, feats, labels,
                                                  threshold=settings.alert_threshold)
        current_metrics = vs_current["current"]
        card["metrics"]["model_vs_current"] = vs_current  # the card, `runs` row and report show the interval
    decision = gate_decision(card["metrics"]["model"], card["metrics"].get("news2"), current_metrics,
                             min_auroc_gain=settings.gate_min_auroc_gain,
                             min_auprc_gain=settings.gate_min_auprc_gain,
                             contract_problems=registry.contract_problems(settings.model_dir, version),
                             news2_gain_ci95={m: (card["metrics"].get("model_vs_news2") or {}).get(f"{m}_gain", {})
                                              .get("ci95") for m in GATE_METRICS},
                             directional_problems=directional_violations(table), current_gain=vs_current,
                             noninferiority=noninferiority, held_out_too_small=small,
                             allow_small_holdout=allow_small_holdout, current_split_differs=split_differs)
    if current is not None and vs_current is None:  # a current model that fails its integrity check
        problem = (f"current model {current} failed its integrity check "
                   f"({registry.integrity(settings.model_dir, current)}): not compared, so not replaced "
                   "automatically; check the registry, then `wardwatch model promote VERSION --reason ...`")
        decision = GateDecision("candidate", [*([] if decision.promote else decision.reasons), problem],
                                decision.compared, decision.margins)
    outcome = apply_gate(settings, version, decision, promote_if_none=promote_if_none)
    card["gate"] = asdict(decision) | {"current_version": current, "outcome": outcome,
                                       "alert_burden": (vs_current or {}).get("alert_burden"),
                                       "held_out_too_small": small, "allow_small_holdout": allow_small_holdout}
    card["promoted"] = outcome == "promoted"
    card["directional_check"] = table  # the probability at each step: what a reviewer reads first
    registry.write_card(settings.model_dir, version, card)
    return card


def retrain(settings: Settings, *, version: str | None = None, promote_if_none: bool = True,
            allow_small_holdout: bool = False, record_wait_s: float = RECORD_WAIT_S,
            on_wait: Callable[[str], None] | None = None) -> dict:
    """Train a new version from settings.duckdb_path into settings.model_dir, gate it; returns its card.

    `promote_if_none=False` keeps even a gate-passing model out of an empty `current` (as candidate).
    `allow_small_holdout=True` lets the gate promote on a held-out set too small to judge a model by
    (gate_decision; recorded in the card's `gate`).
    The decision goes into the runs row of the file trained on (record_in_runs: `record_wait_s`,
    `on_wait`); NightlyBusy when a nightly kept the file longer, after the model is published."""
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        trained_on = latest_run(con) if _has_runs(con) else None
        events = con.sql("SELECT * FROM canonical_events").pl()
        points = published_points(con)  # with idx: each cut where the stream's point saw its message
    if points.is_empty():
        raise ValueError("no scoring points in the DuckDB file: run the stream and `wardwatch batch nightly` first")
    lateness_ms = settings.allowed_lateness_s * 1000
    rules = {"allowed_lateness_ms": lateness_ms, "cross_source_tolerance": settings.cross_source_tolerance,
             "dedupe_horizon_ms": settings.dedupe_horizon_s * 1000}
    feats = features_as_of_issued(events, points, **rules)
    labels = make_labels(events, feats, **rules)
    version = version or datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S")
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    card = train_model(feats, labels, settings.model_dir, version, alert_threshold=settings.alert_threshold)

    card = judge(settings, card, feats, labels, promote_if_none=promote_if_none,
                 allow_small_holdout=allow_small_holdout)
    try:
        record_in_runs(settings, card, run_id=trained_on, wait_s=record_wait_s, on_wait=on_wait)
    except NightlyBusy as exc:  # what the operator has to know: the model is live, the runs row is not
        raise NightlyBusy(f"model {version} is in {settings.model_dir} ({card['gate']['outcome']}; its card holds "
                          f"the gate's decision) but the decision is not in the runs table: {exc}") from None
    return card


def _has_runs(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' "
                            "AND table_name = 'runs'").fetchall()[0][0])
