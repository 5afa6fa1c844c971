"""Memory of live patient state, per 10k patients, measured in a clean child process.

The worker holds, per patient, the record bytes in its table (faust's memory store, backed by the
changelog) and, for the most recently active patients, the parsed record (streams/app.py
RecentCache). This measures exactly those structures after the online plane
(streams.patient_agent.PatientProcessor) has processed whole clinosim stays for `patients`
patients: RSS after minus RSS before, in a fresh interpreter (so no other run's garbage counts),
scaled to 10k patients. Whole stays mean every patient's windows are full (state is pruned to
its windows, so it does not grow with the length of a stay).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path


def _measure(conn, patients: int, cache_dir: str, model_dir: str, cache_patients: int) -> None:
    import gc
    import os

    import orjson

    from benchmarks.batch import canonical_polls, parsed_replay
    from benchmarks.pipeline import rss_bytes
    from streams.app import RecentCache
    from streams.patient_agent import CanonicalMessage, PatientProcessor, PatientRecord
    from streams.replay import generate_cohort
    from streams.scoring import Scorer
    from wardwatch.demo import seed_models
    from wardwatch.settings import Settings

    settings = Settings(model_dir=Path(model_dir))
    seed_models(settings.model_dir)
    cohort_patients = 8
    messages = parsed_replay(generate_cohort(Path(cache_dir), patients=cohort_patients, seed=7), settings, 7)
    events_per_copy = sum(len(m) for m in messages)
    processor = PatientProcessor(settings, Scorer(settings.model_dir, settings))
    table: dict[str, bytes] = {}  # what faust's memory store holds: every patient's record bytes
    parsed = RecentCache(cache_patients)  # what the worker keeps parsed: the recently active ones

    def load(patient: str) -> PatientRecord | None:
        rec = parsed.get(patient)
        if rec is None and patient in table:
            rec = PatientRecord.from_bytes(table[patient])
        return rec

    gc.collect()
    before = rss_bytes(os.getpid())
    offset = 0
    copies = -(-patients // cohort_patients)
    for poll in canonical_polls(messages, copies * events_per_copy):
        batch = []
        for patient, events in poll.items():
            batch.append(CanonicalMessage(0, offset, orjson.dumps([e.to_dict() for e in events]), None,
                                          patient.encode()))
            offset += 1
        records, _ = processor.process(batch, load)
        for patient, rec in records.items():
            table[patient] = rec.to_bytes()
            parsed[patient] = rec
    gc.collect()
    after = rss_bytes(os.getpid())
    conn.send({"patients": len(table), "rss_before": before, "rss_after": after,
               "table_bytes": sum(len(v) for v in table.values()), "parsed_cached": len(parsed)})
    conn.close()


def state_memory(patients: int = 1000, *, cache_dir: Path = Path("data/cache"), model_dir: Path,
                 cache_patients: int = 5000, timeout_s: float = 600.0) -> dict:
    """Run the measurement in a child process; MB of RSS per 10k patients of live state."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(child, patients, str(cache_dir.resolve()), str(model_dir),
                                              cache_patients))
    proc.start()
    if not parent.poll(timeout_s):
        proc.kill()
        raise TimeoutError(f"state memory measurement did not finish within {timeout_s:.0f} s")
    r = parent.recv()
    proc.join(30)
    n = r["patients"]
    if not r["rss_before"] or not r["rss_after"] or n == 0:
        return {"state_patients": n, "state_rss_mb_per_10k_patients": None}
    return {
        "state_patients": n,
        "state_rss_mb_per_10k_patients": round((r["rss_after"] - r["rss_before"]) / 2**20 / n * 10_000, 1),
        "state_table_mb_per_10k_patients": round(r["table_bytes"] / 2**20 / n * 10_000, 1),
        "state_parsed_cache_patients": r["parsed_cached"],
    }
