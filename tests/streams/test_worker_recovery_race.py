"""A worker applies the canonical messages that were waiting when it started, whatever the timing of its
first recovery against its fetcher.

In CI the pipeline bench once saw a worker log "Worker ready" and then apply nothing for minutes: a
fetch asked for while recovery still had the changelog partitions active ran after recovery had paused
them, with faust's (then empty) set of active partitions, which aiokafka reads as "every partition". It
handed over the prefetched canonical messages, faust dropped them as not active, and with nothing
committed yet nothing sought back to them. tests/streams/recovery_race_worker.py forces that timing on
the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.topics import ensure_topics, topics_for
from tests.streams.recovery_race_worker import FORCED
from tests.streams.worker_runs import Publisher, canonical_messages
from wardwatch.procs import check_alive, settings_env, stop_service
from wardwatch.worker_results import wait_for_applied

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_messages_waiting_before_the_first_start_are_applied_when_recovery_ends_mid_fetch(settings, tmp_path):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    # a fresh group, so nothing is committed: the worker starts each partition at its first message
    ends = Publisher(settings, topics.canonical, canonical_messages(patients=8, rows=1)).start().join(30)
    assert len(ends) > 1  # several canonical partitions hold messages

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WARDWATCH_")}, **settings_env(settings)}
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as out:
        worker = subprocess.Popen([sys.executable, "-m", "tests.streams.recovery_race_worker"], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        wait_for_applied(settings, topics, ends, deadline=time.monotonic() + 60,
                         on_wait=lambda: (check_alive({"worker": worker}, tmp_path), time.sleep(0.5)))
        applied = True
    except TimeoutError:
        applied = False
    finally:
        stop_service(worker)
    assert FORCED in log_path.read_text(errors="replace"), "the interleaving was not forced: see the worker log"
    assert applied, "the worker left canonical messages unapplied"
