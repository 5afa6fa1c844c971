"""Chaos (issue #8): at least 200,000 canonical events replayed through ingest + worker + archiver
while the worker is SIGKILLed at least 5 times at random (seeded) moments (wardwatch.soak, what
`wardwatch soak` runs). The figures go to benchmarks/results/reliability/chaos.json.

Asserted, within the chaos run: an alert delivered twice is the same record twice; every raw message
is accounted for and every canonical offset applied (the table's own markers); the nightly rebuild of its archive
agrees with everything the stream published (features at every scoring point, the late set), which
a lost, skipped or twice-applied canonical message would break.

Reported, not asserted: the comparison with the undisturbed reference run (alert ids, scoring points).
The two runs have separate ingest workers, and the order in which an ingest worker reads the raw
topics (vitals, labs, encounters, notifications) depends on timing, so the two canonical streams are
not the same stream and their alerts differ for that reason alone. Comparing alert ids needs both
workers fed one canonical stream: open in issue #8.
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
        "events", "raw_messages", "patients", "kills", "kills_mid_stream", "ingest_kills", "restarts", "alerts",
        "alerts_lost", "losses", "duplicates_delivered", "duplicate_alert_ids", "snapshots", "feature_values_compared",
        "feature_mismatches", "feature_differences_from_arrival_order", "recovery_s", "recovery_s_max",
        "worker_ready_after_assignment_s", "parity_points", "parity_values", "parity_mismatched", "checks",
        "phases_s", "seconds", "unplanned_restarts")})
    where = f"service logs: {f['logs']}; details: {f['details']}"

    assert f["events"] >= EVENTS and f["kills"] >= KILLS and f["kills_mid_stream"] >= KILLS
    # (reported) the comparison with the reference run: see the module docstring
    print(f"alerts: {f['alerts']} in the reference, {f['alerts_lost']} of them not in the chaos run; "
          f"scoring points differing: {len(f['details']['snapshots_missing_ids'])}+ (first ids only)")
    # an alert delivered twice is the same record twice
    assert f["duplicates_differing"] == 0, where
    # every raw message accounted for, every canonical offset applied and committed, in both runs
    for run, acct in f["accounting"].items():
        assert acct["balanced"] and acct["all_read"], (run, acct)
        assert acct["canonical_unapplied"] == {}, (run, acct, where)
        # (reported) a committed offset can lag what the table applied: faust may stall its commit
        # behind an offset it skipped; a restart then re-reads and drops those messages (issue #8)
        print(f"{run}: committed offsets behind the applied ones: {acct['canonical_uncommitted']}")
    # the nightly rebuild of the chaos run's archive agrees with what the stream published
    assert f["checks"]["parity"] and f["parity_points"] > 0 and f["parity_mismatched"] == 0, where
