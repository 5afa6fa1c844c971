"""Chaos (issue #8): at least 200,000 canonical events replayed while the worker is SIGKILLed at
least 5 times at random (seeded) moments mid-stream, compared with an undisturbed worker reading
the same canonical stream (wardwatch.soak, what `wardwatch soak` runs: one ingest, its canonical
topic mirrored record for record to the chaos worker's). The figures go to
benchmarks/results/reliability/chaos.json.

Asserted: every kill killed (the worker died of the SIGKILL and a new process replaced it) and the
reference worker never restarted; the chaos worker published exactly the reference's alert ids (none
lost, none extra) with the same records; an alert delivered more than once is the same record each
time; the same scoring snapshot ids, identical snapshot and score records under each, and the same
patient table at the end; every raw message accounted
for, the mirror exact, and every canonical offset applied by both workers' tables (their own
next-offset markers; a committed offset lagging them is only reported); and the nightly rebuild of
the chaos run's archive passes parity.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from tests.integration.pipeline import record_figures
from wardwatch.soak import SoakOptions, run_soak

EVENTS = 200_000
KILLS = 5


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sigkilled_worker_loses_nothing_over_200k_events(broker, cohort_cache, tmp_path):
    opts = SoakOptions(events=EVENTS, kills=KILLS, seed=7, bootstrap=broker.bootstrap, data_dir=tmp_path / "soak",
                       cache_dir=cohort_cache, timeout_s=840)
    f = run_soak(opts, Console(width=120))
    record_figures("chaos", {k: f[k] for k in (
        "events", "canonical_messages", "raw_messages", "patients", "kills", "kills_mid_stream", "kills_verified",
        "ingest_kills",
        "restarts", "alerts", "alerts_compared", "alerts_lost", "alerts_extra", "alerts_differing", "losses",
        "duplicates_delivered", "duplicate_alert_ids", "duplicates_differing", "reference_duplicates_differing",
        "snapshots", "snapshots_missing",
        "snapshots_extra", "scores_missing", "scores_extra", "feature_values_compared", "feature_mismatches",
        "snapshots_differing", "scores_differing", "state_patients", "state_differing",
        "mirror_exact", "recovery_s", "recovery_s_max", "worker_ready_after_assignment_s", "parity_points",
        "parity_values", "parity_mismatched", "checks", "phases_s", "seconds", "unplanned_restarts", "kill_log")})
    where = f"service logs: {f['logs']}; details: {f['details']}"

    # a kill waits for the previous restart to apply new data: a slow recovery pushes kills past the feed
    assert f["events"] >= EVENTS and f["kills"] >= KILLS, f["kill_log"]
    assert f["kills_mid_stream"] >= KILLS, (f"recovery after each kill (s): {f['recovery_s']}", f["kill_log"])
    # each kill killed (the worker died of the SIGKILL, a new process replaced it); the reference never restarted
    assert f["kills_verified"] >= KILLS, f["kill_log"]
    assert f["checks"]["reference_undisturbed"], f["unplanned_restarts"]
    # the comparison means something only if both workers read one stream, record for record
    assert f["accounting"]["mirror"]["exact"], f["accounting"]["mirror"]
    # 1. no alert lost, none extra, and each the same record as the reference's
    assert f["alerts"] > 0 and f["alerts_compared"] == f["alerts"], where
    assert f["alerts_lost"] == 0 and f["alerts_extra"] == 0 and f["alerts_differing"] == 0, where
    # 2. an alert (or snapshot, or score) delivered twice is the same record twice, in both runs
    assert f["duplicates_differing"] == 0 and f["reference_duplicates_differing"] == 0, where
    # 3. every raw message accounted for (the shared ingest), every canonical offset applied by both tables
    raw = f["accounting"]["raw"]
    assert raw["balanced"] and raw["all_read"], raw
    for run in ("reference", "chaos"):
        acct = f["accounting"][run]
        assert acct["canonical_unapplied"] == {}, (run, acct, where)
        # and committed: a restart after the run would not re-read what the table already holds
        assert acct["canonical_uncommitted"] == {}, (run, acct, where)
    # 4. the same scoring points, the same snapshot and score records under each, the same table at the end
    assert f["snapshots"] > 0 and f["feature_values_compared"] > 0 and f["state_patients"] > 0, where
    assert (f["snapshots_missing"], f["snapshots_extra"], f["scores_missing"], f["scores_extra"],
            f["feature_mismatches"], f["snapshots_differing"], f["scores_differing"],
            f["state_differing"]) == (0, 0, 0, 0, 0, 0, 0, 0), where
    # 5. the nightly rebuild of the chaos run's archive agrees with what the stream published
    assert f["checks"]["parity"] and f["parity_points"] > 0 and f["parity_mismatched"] == 0, where
    assert f["ok"], f["checks"]
