"""CPU of the ingest worker per raw message over a backlog, split by thread, next to parse+encode alone.

    python -m benchmarks.ingest_cpu [--repeat 20] [--runs 3] [--profile] [--producer-conf K=V ...]
                                    [--tree PATH ...]

What it does (one embedded broker for everything):
1. the replay of a clinosim cohort (cached; no faults), `--repeat` interleaved copies with fresh
   patient ids (as `wardwatch bench`'s backlog), is produced to the raw topics once;
2. each run starts a child process that builds the real IngestWorker (streams/ingest.py, fresh consumer
   group: it reads the whole backlog from the start) and loops as IngestWorker.run does (poll_once, then
   stats.maybe_publish) until every raw message is counted in. CPU is taken from its first poll with an
   assignment to the poll that counted the last message (group join and close not included): the
   process's user+sys (getrusage), and per thread from /proc/self/task (librdkafka names its threads
   rdk:main, rdk:broker..., ; the main thread is the Python loop; threads that ended meanwhile are in
   "exited");
   then it polls the empty input for `--idle-s` more and reports that CPU per second (a figure that
   spans more than the ingest's own work, as the bench's, counts this idle polling too);
3. the codec-only figure: benchmarks.codec.ingest_pass (parse + encode + batch_values, no Kafka) over the
   same messages, in this process, best of 5 by CPU time.

CPU time, not wall time: it hardly moves with what else the machine runs. `--tree PATH` runs the
child's streams/ and wardwatch/ from another checkout (alternating with this one, run by run): an A/B
of a code change on one broker and one backlog. `--producer-conf` and `--consumer-conf` merge
librdkafka settings into the ingest's clients (an A/B of client settings, e.g. compression.type).
`--profile` adds two runs: one timing the main thread's stages by its CPU clock (time.thread_time
around consume, parse+encode, alignment, produce, flush, commit, counters, stats; each exclusive of
the stages inside it), and a cProfile of the main thread (wall clock: consume's waits are in it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# --- the child: one ingest worker over the backlog -----------------------------------------------


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (thread name, user+sys seconds) of this process's live threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rpartition(")")[2].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _group(tid: int, name: str) -> str:
    if tid == os.getpid():
        return "main (python loop)"
    if name.startswith("rdk:broker"):
        return "rdk:broker (fetch/produce I/O)"
    if name.startswith("rdk:"):
        return name
    return f"other ({name})"


def _rusage() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Stages:
    """Main-thread CPU per stage, each exclusive of the stages timed inside it."""

    def __init__(self, clock=time.thread_time):
        self._clock = clock  # the main thread's CPU clock (a test passes its own)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # time of nested stages, per open stage

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            self._stack.append(0.0)
            started = self._clock()
            try:
                return fn(*a, **kw)
            finally:
                spent = self._clock() - started
                nested = self._stack.pop()
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
                self.calls[name] = self.calls.get(name, 0) + 1
                if self._stack:
                    self._stack[-1] += spent
        return timed


class _TimedConsumer:
    def __init__(self, consumer, stages: Stages):
        self._consumer = consumer
        self.consume = stages.wrap("consume()", consumer.consume)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def _instrument(worker, stages: Stages) -> None:
    worker._consumer = _TimedConsumer(worker._consumer, stages)
    for attr, name in (("_prepare", "parse+encode (_prepare)"), ("_align", "alignment (_align)"),
                       ("_resume_due", "alignment (_resume_due)"), ("_produce", "produce()"),
                       ("_flush", "flush"), ("_commit", "commit"), ("_commit_uncommitted", "commit"),
                       ("poll_once", "poll_once, the rest"), ("_dead_letter", "dead letters")):
        setattr(worker, attr, stages.wrap(name, getattr(worker, attr)))
    worker.counters.record = stages.wrap("counters.record", worker.counters.record)
    worker.stats.maybe_publish = stages.wrap("stats.maybe_publish", worker.stats.maybe_publish)


def _gc_as_run_ingest() -> None:
    """The garbage collector set-up the child's tree's run_ingest makes after building the worker: its
    start-up heap frozen (streams/gc_tuning.py); a tree from before 7c72429 (an A/B's base, `--tree`) has
    no such module and ran with CPython's defaults, as its child then does."""
    try:
        from streams.gc_tuning import freeze_startup_heap
    except ImportError:
        return
    freeze_startup_heap()


def child(expected: int, producer_conf: dict, consumer_conf: dict, profile: bool, timeout_s: float,
          breakdown: bool = False, idle_s: float = 0.0) -> dict:
    import streams.ingest as ingest
    from streams.topics import topics_for
    from wardwatch.settings import Settings

    if producer_conf:
        base_producer = ingest.producer_config
        ingest.producer_config = lambda s: {**base_producer(s), **producer_conf}
    if consumer_conf:
        base_consumer = ingest.consumer_config
        ingest.consumer_config = lambda s: {**base_consumer(s), **consumer_conf}
    settings = Settings()
    worker = ingest.IngestWorker(settings, topics_for(settings))
    _gc_as_run_ingest()

    def counted() -> int:
        return sum(c.messages_in for c in worker.counters.sources.values())

    deadline = time.monotonic() + timeout_s
    while not worker.assigned:  # group join: not measured
        worker.poll_once()
        worker.stats.maybe_publish()
        if time.monotonic() > deadline:
            raise TimeoutError("no assignment")
    stages = Stages()
    if breakdown:
        _instrument(worker, stages)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()  # wall clock: thread_time's syscall per call distorts it more
    threads0, cpu0, wall0 = _thread_cpu(), _rusage(), time.monotonic()
    if profiler:
        profiler.enable()
    polls = 0
    while counted() < expected:
        worker.poll_once()
        worker.stats.maybe_publish()
        polls += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"{counted()} of {expected} raw messages counted before the deadline")
    if profiler:
        profiler.disable()
    cpu1, wall1, threads1 = _rusage(), time.monotonic(), _thread_cpu()
    snapshot = worker.stats_snapshot()
    idle = {}
    if idle_s > 0:  # the backlog is read: what polling an empty input costs, per second
        idle_end = time.monotonic() + idle_s
        while time.monotonic() < idle_end:
            worker.poll_once()
            worker.stats.maybe_publish()
        threads2, cpu2 = _thread_cpu(), _rusage()
        for tid, (name, seconds) in threads2.items():
            group = _group(tid, name)
            idle[group] = idle.get(group, 0.0) + (seconds - threads1.get(tid, (name, 0.0))[1]) / idle_s
        idle["all"] = (cpu2 - cpu1) / idle_s
    worker.close()

    by_group: dict[str, float] = {}
    for tid, (name, seconds) in threads1.items():
        group = _group(tid, name)
        by_group[group] = by_group.get(group, 0.0) + seconds - threads0.get(tid, (name, 0.0))[1]
    total = cpu1 - cpu0
    by_group["exited (threads that ended meanwhile)"] = total - sum(by_group.values())
    result = {"messages": counted(), "cpu_s": total, "wall_s": wall1 - wall0, "polls": polls,
              "threads_cpu_s": by_group, "canonical_messages": snapshot["canonical_messages"],
              "batches": snapshot["batches"], "alignment": snapshot.get("alignment"), "idle_cpu_s_per_s": idle}
    if breakdown:
        result["stages_s"] = stages.seconds
        result["stage_calls"] = stages.calls
    if profiler:
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"streams/|schemas/", 20)
        result["profile"] = out.getvalue()
    return result


# --- the parent ------------------------------------------------------------------------------------


def _backlog(settings, cache_dir: Path, patients: int, seed: int, repeat: int):
    from benchmarks.pipeline import id_pattern, repeated
    from streams.replay import build_replay, generate_cohort, load_patient_refs

    cohort = generate_cohort(cache_dir.resolve(), patients=patients, seed=seed)
    replay = build_replay(cohort, faults=False, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                          late_by_s=settings.allowed_lateness_s + 3600)
    mrns = replay.manifest["patients"]
    refs = load_patient_refs(cohort)
    pattern = id_pattern([*mrns, *(refs[m].removeprefix("Patient/") for m in mrns if m in refs)])
    return repeated(replay.messages, pattern, repeat)


def codec_us(messages, settings, passes: int = 5) -> float:
    """Parse + encode alone (benchmarks.codec.ingest_pass), best of `passes` by CPU time, µs per message."""
    from benchmarks.codec import RawRecord, best_seconds, ingest_pass
    from streams.topics import topics_for

    topics = topics_for(settings)
    records = [RawRecord(topics.cdc[m.table] if m.kind == "cdc" else topics.fhir, m.key, m.value, offset,
                         m.kind == "cdc") for offset, m in enumerate(messages)]
    seconds = best_seconds(lambda: ingest_pass(records, settings.cdc_topic_prefix,
                                               settings.canonical_max_message_bytes, settings.ingest_batch_size),
                           passes, clock=time.process_time)
    return seconds / len(records) * 1e6


def run_child(settings, tree: Path, expected: int, args) -> dict:
    from wardwatch.procs import settings_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDWATCH_")}
    env.update(settings_env(settings.model_copy(update={"group_prefix": f"cpu{uuid.uuid4().hex[:8]}"})))
    env.update(dict(kv.split("=", 1) for kv in args.env))
    env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, str(HERE), "--child", str(expected), "--timeout", str(args.timeout),
           "--idle-s", str(args.idle_s)]
    for kv in args.producer_conf:
        cmd += ["--producer-conf", kv]
    for kv in args.consumer_conf:
        cmd += ["--consumer-conf", kv]
    if args.profile_run:
        cmd.append("--profile")
    if args.breakdown_run:
        cmd.append("--breakdown")
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=args.timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"ingest child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _conf(pairs: list[str]) -> dict:
    conf = {}
    for kv in pairs:
        key, _, value = kv.partition("=")
        conf[key] = value
    return conf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest_cpu", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=8, help="clinosim patients in the cohort (cached)")
    parser.add_argument("--seed", type=int, default=7, help="cohort and replay seed")
    parser.add_argument("--repeat", type=int, default=20, help="copies of the replay in the backlog (1,131 messages each)")
    parser.add_argument("--runs", type=int, default=3, help="ingest runs per tree (alternating trees); medians reported")
    parser.add_argument("--profile", action="store_true", help="one more run with cProfile on the main thread")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout to A/B against this one (its streams/ and wardwatch/)")
    parser.add_argument("--producer-conf", action="append", default=[], metavar="K=V",
                        help="librdkafka setting merged into the ingest's producer config")
    parser.add_argument("--consumer-conf", action="append", default=[], metavar="K=V",
                        help="librdkafka setting merged into the ingest's consumer config")
    parser.add_argument("--env", action="append", default=[], metavar="WARDWATCH_X=V",
                        help="a setting for the ingest child (e.g. WARDWATCH_INGEST_BATCH_SIZE=1000)")
    parser.add_argument("--idle-s", type=float, default=3.0,
                        help="after the backlog, poll the empty input this long and report its CPU per second")
    parser.add_argument("--timeout", type=float, default=300.0, help="per ingest run (seconds)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="clinosim cohort cache")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        result = child(args.child, _conf(args.producer_conf), _conf(args.consumer_conf), args.profile, args.timeout,
                       args.breakdown, args.idle_s)
        print(json.dumps(result))
        return result
    if args.repeat < 1 or args.runs < 1:
        parser.error("--repeat and --runs must be at least 1")

    from streams.replay import Replay, publish
    from streams.topics import ensure_topics, topics_for
    from wardwatch.broker import EmbeddedBroker
    from wardwatch.settings import Settings

    trees = [REPO, *(t.resolve() for t in args.tree)]
    with EmbeddedBroker.start() as broker:
        run = uuid.uuid4().hex[:8]
        settings = Settings(bootstrap_servers=broker.bootstrap, topic_prefix=f"cpu{run}",
                            cdc_topic_prefix=f"cpu{run}.ehr.public", group_prefix=f"cpu{run}")
        messages = _backlog(settings, args.cache_dir, args.patients, args.seed, args.repeat)
        topics = topics_for(settings)
        ensure_topics(settings, topics)
        publish(Replay(messages, {}), settings, topics)
        n = len(messages)
        codec = codec_us(messages, settings)
        print(f"{n:,} raw messages pre-filled; parse+encode alone (codec): {codec:.1f} µs/raw message")
        results: dict[str, list[dict]] = {str(t): [] for t in trees}
        args.profile_run = args.breakdown_run = False
        for i in range(args.runs):
            for tree in trees:
                r = run_child(settings, tree, n, args)
                results[str(tree)].append(r)
                print(f"  run {i + 1} {tree.name}: {r['cpu_s'] / n * 1e6:.1f} µs/raw message "
                      f"(main {r['threads_cpu_s']['main (python loop)'] / n * 1e6:.1f}), wall {r['wall_s']:.1f} s, "
                      f"{r['polls']} polls, {r['canonical_messages']} canonical messages", flush=True)
        profile = breakdown = None
        if args.profile:
            args.breakdown_run = True
            breakdown = run_child(settings, trees[0], n, args)
            args.breakdown_run, args.profile_run = False, True
            profile = run_child(settings, trees[0], n, args)

    summary = {"messages": n, "codec_us_per_msg": round(codec, 1), "trees": {}}
    for tree, runs in results.items():
        groups = sorted({g for r in runs for g in r["threads_cpu_s"]})
        summary["trees"][tree] = {
            "runs_us_per_msg": [round(r["cpu_s"] / n * 1e6, 1) for r in runs],
            "median_us_per_msg": round(statistics.median(r["cpu_s"] / n * 1e6 for r in runs), 1),
            "idle_ms_cpu_per_s": round(statistics.median(r["idle_cpu_s_per_s"].get("all", 0.0) for r in runs) * 1e3, 1),
            "threads_median_us_per_msg": {g: round(statistics.median(r["threads_cpu_s"].get(g, 0.0) / n * 1e6
                                                                     for r in runs), 1) for g in groups},
        }
    for tree, s in summary["trees"].items():
        print(f"\n{tree}: ingest {s['median_us_per_msg']:.1f} µs/raw message CPU (median of {s['runs_us_per_msg']}),"
              f" codec alone {codec:.1f}")
        for group, us in sorted(s["threads_median_us_per_msg"].items(), key=lambda kv: -kv[1]):
            print(f"    {group:<40} {us:>7.1f} µs/raw message")
        if args.idle_s > 0:
            print(f"    idle afterwards (input read, polling on): {s['idle_ms_cpu_per_s']:.1f} ms of CPU per second")
    if breakdown is not None:
        main_s = breakdown["threads_cpu_s"]["main (python loop)"]
        print(f"\nmain thread by stage (CPU clock; a run with the timers in: {breakdown['cpu_s'] / n * 1e6:.1f} "
              f"µs/raw message in all, {main_s / n * 1e6:.1f} on the main thread):")
        timed = sum(breakdown["stages_s"].values())
        for name, seconds in sorted(breakdown["stages_s"].items(), key=lambda kv: -kv[1]):
            print(f"    {name:<40} {seconds / n * 1e6:>7.1f} µs/raw message  ({breakdown['stage_calls'][name]} calls)")
        print(f"    {'outside poll_once (the loop, timers)':<40} {(main_s - timed) / n * 1e6:>7.1f} µs/raw message")
        summary["main_thread_stages_us_per_msg"] = {k: round(v / n * 1e6, 1) for k, v in breakdown["stages_s"].items()}
    if profile is not None:
        print(f"\ncProfile of the main thread ({profile['cpu_s'] / n * 1e6:.1f} µs/raw message under the profiler):")
        print(profile["profile"])
        summary["profile"] = profile["profile"]
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file by run_child: the child's tree is on PYTHONPATH
        sys.path[0] = os.environ.get("PYTHONPATH", str(REPO)).split(os.pathsep)[0]
    main()
