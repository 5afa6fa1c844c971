import math
import threading
import time
from decimal import Decimal

import orjson
import pytest

from benchmarks.pipeline import (WARMUP_SUFFIX, AlertArrival, ScoreArrival, alert_figures, print_table, ScoreCollector, _wait_until_quiet, backlog_grew, combine,
                                 CpuSampler, Epochs, cpu_per_message, event_span_ms, cpu_seconds, id_pattern, late_share, memory_figures, paced_messages, pipeline_figures, repeated,
                                 next_search_rate, run_bench, search_rates, split_by_capacity, sustained, sustained_verdict, with_suffix)
from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed
from streams.replay import (LAB_SUBSCRIPTION, CommitInfo, RawMessage, Replay, VitalRow, debezium_key, debezium_value,
                            notification_bundle, row_payload, vital_observation)
from wardwatch.settings import Settings

MRN, PATIENT_RESOURCE = "C0-0001", "pt-324a66a0db81"


def cdc_insert(row_id: int, mrn: str) -> RawMessage:
    key = orjson.dumps({"payload": {"id": row_id, "patient_id": mrn}})
    value = orjson.dumps({"payload": {"after": {"id": row_id, "patient_id": mrn, "encounter_id": f"ENC-{mrn}-6324",
                                                "heart_rate": 91}, "op": "c"}})
    return RawMessage("cdc", "vital_signs", key, value)


def lab_notification(mrn: str) -> RawMessage:
    obs = {"resourceType": "Observation", "id": "lab-a69583ef8a26",
           "subject": {"reference": f"Patient/{PATIENT_RESOURCE}", "identifier": {"value": mrn}},
           "valueQuantity": {"value": 2.2}}
    return RawMessage("fhir", None, mrn.encode(), orjson.dumps({"resourceType": "Bundle", "entry": [{"resource": obs}]}))


# --- pure helpers ---------------------------------------------------------------------------------


def test_renaming_gives_new_patients_with_the_same_clinical_content():
    pattern = id_pattern([MRN, PATIENT_RESOURCE])
    cdc, lab = with_suffix([cdc_insert(7, MRN), lab_notification(MRN)], pattern, "-r3")

    assert orjson.loads(cdc.key)["payload"] == {"id": 7, "patient_id": "C0-0001-r3"}
    after = orjson.loads(cdc.value)["payload"]["after"]
    assert after == {"id": 7, "patient_id": "C0-0001-r3", "encounter_id": "ENC-C0-0001-r3-6324", "heart_rate": 91}
    assert lab.key == b"C0-0001-r3"
    obs = orjson.loads(lab.value)["entry"][0]["resource"]
    assert obs["subject"] == {"reference": "Patient/pt-324a66a0db81-r3", "identifier": {"value": "C0-0001-r3"}}
    assert obs["valueQuantity"] == {"value": 2.2} and obs["id"] == "lab-a69583ef8a26"


def test_renaming_leaves_longer_ids_and_tombstones_alone():
    pattern = id_pattern([MRN])
    other, tombstone = with_suffix([cdc_insert(8, "C0-00012"), RawMessage("cdc", "vital_signs", b"k", None)],
                                   pattern, "-r1")
    assert orjson.loads(other.key)["payload"]["patient_id"] == "C0-00012"
    assert tombstone.value is None


def test_renamed_replay_messages_parse_to_the_same_events_of_a_new_patient():
    row = VitalRow(MRN, f"ENC-{MRN}-632486892592", 1_718_409_600_000_000,
                   {"heart_rate": 112, "respiratory_rate": 24, "spo2": Decimal("93.0"), "temperature": Decimal("38.4")})
    cdc = RawMessage("cdc", "vital_signs", debezium_key(7, MRN), debezium_value(
        "c", None, row_payload(7, row), CommitInfo(24_024_000, 24_023_900, 7_400, row.measured_at_us,
                                                   row.measured_at_us // 1000 + 20), "vital_signs"))
    obs, _ = vital_observation(row, "heart_rate", 7, row.measured_at_us + 60_000_000, f"Patient/{PATIENT_RESOURCE}")
    fhir = RawMessage("fhir", None, MRN.encode(), orjson.dumps(
        notification_bundle(LAB_SUBSCRIPTION, "event-notification", 1, row.measured_at_us + 60_000_000, 1, obs)))

    def events(messages):
        cdc_out = parse_cdc("ehr.public.vital_signs", messages[0].key, messages[0].value, partition=0, offset=0,
                            cdc_topic_prefix="ehr.public")
        fhir_out = parse_notification(messages[1].value, topic="fhir", partition=0, offset=1)
        assert isinstance(cdc_out, Parsed) and isinstance(fhir_out, Parsed)
        return [e.to_dict() for e in [*cdc_out.events, *fhir_out.events]]

    original = events([cdc, fhir])
    renamed = events(with_suffix([cdc, fhir], id_pattern([MRN, PATIENT_RESOURCE]), "-r1"))

    assert len(original) > 1 and {e["patient_id"] for e in renamed} == {"C0-0001-r1"}
    for before, after in zip(original, renamed, strict=True):  # same facts, values and times
        encounter = before["encounter_id"] and before["encounter_id"].replace(MRN, "C0-0001-r1")
        assert after == {**before, "patient_id": "C0-0001-r1", "encounter_id": encounter}


def test_each_repetition_has_its_own_patients():
    messages = [cdc_insert(1, MRN), lab_notification(MRN), cdc_insert(2, "C1-0001")]
    out = repeated(messages, id_pattern([MRN, "C1-0001", PATIENT_RESOURCE]), 3)

    assert len(out) == 9
    keys = [m.key for m in out]
    assert len(set(keys)) == 9
    assert {orjson.loads(m.key)["payload"]["patient_id"] for m in out if m.kind == "cdc"} == {
        f"{p}-r{r}" for p in (MRN, "C1-0001") for r in range(3)}


def test_copies_are_interleaved_in_event_time_order_like_concurrent_patients():
    messages = [cdc_insert(1, MRN), lab_notification(MRN), cdc_insert(2, "C1-0001")]
    out = repeated(messages, id_pattern([MRN, "C1-0001", PATIENT_RESOURCE]), 3)

    # the replay's first message of every copy, then its second of every copy, ...: never one copy's
    # whole history before the next copy starts
    assert [m.kind for m in out] == ["cdc"] * 3 + ["fhir"] * 3 + ["cdc"] * 3
    assert [m.key for m in out[:3]] == [with_suffix(messages[:1], id_pattern([MRN]), f"-r{r}")[0].key for r in range(3)]


def test_paced_load_is_fresh_patients_of_the_requested_size():
    pattern = id_pattern([MRN, PATIENT_RESOURCE])
    messages = paced_messages([cdc_insert(1, MRN), lab_notification(MRN)], pattern, rate=5, seconds=1.0)
    assert len(messages) == 5
    keys = [orjson.loads(m.key)["payload"]["patient_id"] if m.kind == "cdc" else m.key.decode() for m in messages]
    assert keys == ["C0-0001-p5c0", "C0-0001-p5c1", "C0-0001-p5c2", "C0-0001-p5c0", "C0-0001-p5c1"]


def test_a_search_phase_has_patients_of_its_own_even_at_a_fixed_phase_rate():
    pattern = id_pattern([MRN, PATIENT_RESOURCE])
    fixed = paced_messages([cdc_insert(1, MRN)], pattern, rate=2, seconds=1.0)
    search = paced_messages([cdc_insert(1, MRN)], pattern, rate=2, seconds=1.0, tag="s")
    patients = [{orjson.loads(m.key)["payload"]["patient_id"] for m in msgs} for msgs in (fixed, search)]
    assert patients == [{"C0-0001-p2c0", "C0-0001-p2c1"}, {"C0-0001-s2c0", "C0-0001-s2c1"}]


def _arrivals(latencies_ms: list[float]) -> list[ScoreArrival]:
    """One score per 10 ms of produce time, with these latencies."""
    ms = 1_000_000
    return [ScoreArrival(i * 10 * ms + int(lat * ms), i * 10 * ms, f"p{i}", "rule") for i, lat in enumerate(latencies_ms)]


def test_a_steady_latency_is_no_backlog_even_with_jitter():
    assert not backlog_grew(_arrivals([30, 45, 28, 60, 33, 31, 40, 29, 35, 70, 32, 30]))


def test_a_latency_that_climbs_over_the_phase_is_a_backlog():
    assert backlog_grew(_arrivals([30 + 40 * i for i in range(12)]))  # 30 ms -> 470 ms: a queue building


def test_arrival_order_does_not_matter_only_produce_time():
    climbing = _arrivals([30 + 40 * i for i in range(12)])
    assert backlog_grew(list(reversed(climbing)))


def test_too_few_scores_to_tell_count_as_not_sustained():
    assert backlog_grew(_arrivals([30, 30, 30]))


def test_late_share_is_of_the_events_the_worker_applied_or_routed_late():
    assert late_share({"accepted": 300, "late": 100, "scores": 50}) == 0.25
    assert late_share({}) is None  # nothing counted yet: unknown, not zero


def test_a_phase_that_kept_up_by_routing_events_late_is_not_sustained():
    steady = {"kept_up": True, "latency_grew": False, "late_share": 0.0}
    assert sustained(steady)
    assert not sustained({**steady, "late_share": 0.3})  # late events are cheap: not the whole work
    assert not sustained({**steady, "latency_grew": True})
    assert not sustained({**steady, "kept_up": False})


def test_search_climbs_from_a_fifth_of_the_capacity_to_nine_tenths_of_it():
    # 20% of 5,000, then x1.25 each, in 100s, while within 90% of it
    assert search_rates(5000.0) == [1000, 1200, 1500, 1900, 2400, 3000, 3800]
    assert search_rates(5000.0, tries=3) == [1000, 1200, 1500]
    # a small pipeline (a tiny backlog measures little capacity) is searched in 10s, never above 90% of it,
    # never the same rate twice
    assert search_rates(150.0) == [30, 40, 50, 70, 90, 110]
    assert search_rates(20.0) == [10]


def test_the_search_climbs_while_sustained_and_goes_down_by_halves_when_even_the_lowest_is_not():
    up = search_rates(5000.0)  # 1000, 1200, 1500, ...
    assert next_search_rate(5000.0, []) == 1000
    assert next_search_rate(5000.0, [(1000, True)]) == 1200
    assert next_search_rate(5000.0, [(1000, True), (1200, True)]) == 1500
    assert next_search_rate(5000.0, [(1000, True), (1200, False)]) is None  # max: 1000
    assert next_search_rate(5000.0, [(r, True) for r in up]) is None  # every one sustained: over
    # the lowest was not sustained: halves, until one is or three more have failed
    assert next_search_rate(3290.0, [(600, False)]) == 300
    assert next_search_rate(3290.0, [(600, False), (300, False)]) == 150
    assert next_search_rate(3290.0, [(600, False), (300, False), (150, False)]) == 70
    assert next_search_rate(3290.0, [(600, False), (300, False), (150, False), (70, False)]) is None
    assert next_search_rate(3290.0, [(600, False), (300, True)]) is None  # max: 300
    assert next_search_rate(30000.0, [(6000, False)]) == 3000


def test_overloads_run_after_the_sustained_rate_search_and_the_rest_before_it():
    within, beyond = split_by_capacity([1000, 10000, 3500], 3500.0)
    assert within == [1000, 3500]
    assert beyond == [10000]


def test_a_phase_that_was_not_sustained_says_why():
    ok = {"kept_up": True, "latency_grew": False, "late_share": 0.0}
    assert sustained_verdict(ok) == "yes"
    assert sustained_verdict({**ok, "late_share": 0.004}) == "yes"  # under 1% late
    assert sustained_verdict({**ok, "latency_grew": True}) == "no: latency grew"
    assert sustained_verdict({"kept_up": False, "latency_grew": True, "late_share": 0.35}) == \
        "no: fell behind, latency grew, 35% late"


def test_each_epoch_starts_more_than_a_day_after_the_previous_one_ends():
    day_us = 86_400_000_000
    span_us = 13 * day_us + 5 * 3_600_000_000  # 13 days 5 hours
    built = []

    def build(shift_s: int) -> Replay:
        built.append(shift_s)
        start = 1_700_000_000_000_000 + shift_s * 1_000_000
        return Replay([], {"time_span_us": [start, start + span_us]})

    epochs = Epochs(build, build(0))
    spans = [event_span_ms(build(0))] + [event_span_ms(epochs.next()) for _ in range(3)]
    assert built == [0, 0, 15 * 86_400, 30 * 86_400, 45 * 86_400]  # whole days: 13 days 5 h + a day, rounded up
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start - end > 86_400_000  # more than a day: beyond the allowed lateness and the alignment skew


def test_memory_per_10k_patients_is_the_growth_over_the_warm_worker():
    mb = 2**20
    figures = memory_figures(rss_warm=100 * mb, rss_end=150 * mb, patients=5000)
    assert figures["worker_rss_mb"] == 150.0
    assert figures["worker_rss_mb_per_10k_patients"] == 100.0  # 50 MB for 5k patients
    assert memory_figures(None, 150 * mb, 10)["worker_rss_mb_per_10k_patients"] is None


def test_cpu_seconds_of_a_process_grow_with_the_work_it_does():
    import os

    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of this process's CPU
        pass
    after = cpu_seconds(os.getpid())
    assert before is not None and 0.2 <= after - before <= 5.0
    assert cpu_seconds(2**22 + 1) is None  # no such process


def test_cpu_per_message_is_each_process_cpu_over_the_phase_divided_by_its_messages():
    per_msg = cpu_per_message({"worker": 10.0, "ingest": 2.0, "broker": None},
                              {"worker": 12.5, "ingest": 2.1, "broker": 7.0}, messages=5000)
    assert per_msg == {"worker": 500.0, "ingest": 20.0, "broker": None}  # µs; unreadable stays unknown
    assert cpu_per_message({"worker": 1.0}, {"worker": 2.0}, messages=0) == {"worker": None}


def test_a_phase_cpu_is_read_over_its_working_span_not_its_idle_drain():
    sampler = CpuSampler({"worker": 0})
    sampler.samples = [(0, {"worker": 1.0}), (1_000, {"worker": 2.0}), (2_000, {"worker": 3.0}),
                       (9_000, {"worker": 3.5})]  # the drain after the last score adds 0.5 s of polling
    assert sampler.per_message(start_ns=500, end_ns=2_500, messages=1000) == {"worker": 2000.0}
    assert sampler.at(-5) == {"worker": 1.0}  # before the first sample: the first one


def test_the_sampler_records_the_processes_while_it_runs():
    import os

    with CpuSampler({"me": os.getpid()}, interval_s=0.01) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # a polled condition: the sampler's thread appends on its own schedule
    assert len(sampler.samples) >= 3 and all(snap["me"] is not None for _, snap in sampler.samples)


def test_figures_span_from_the_first_produce_to_the_last_score():
    ms = 1_000_000
    arrivals = [ScoreArrival(1_000 * ms, 990 * ms, "a", "rule"), ScoreArrival(1_500 * ms, 1_400 * ms, "b", "rule"),
                ScoreArrival(3_000 * ms, 2_970 * ms, "a", "model"), ScoreArrival(2_000 * ms, None, "c", "rule")]
    figures = pipeline_figures(n_events=400, first_produced_ns=0, fed_ns=2_000 * ms, arrivals=arrivals)

    assert figures["pipeline_events_per_s"] == pytest.approx(400 / 3.0)
    assert figures["latency_ms_p50"] == pytest.approx(30.0)  # of 10, 100, 30 ms; the headerless one is left out
    assert figures["latency_ms_max"] == pytest.approx(100.0)
    assert figures["n_scores"] == 4 and figures["n_scores_without_produced_ns"] == 1
    assert figures["n_patients"] == 3
    assert figures["scoring_paths"] == {"rule": 3, "model": 1}
    assert figures["n_scores_restamped"] == 1  # produced at 2,970 ms, after the feed ended at 2,000 ms


def test_no_scores_means_no_throughput():
    figures = pipeline_figures(n_events=10, first_produced_ns=0, fed_ns=1, arrivals=[])
    assert figures["pipeline_events_per_s"] == 0.0 and math.isnan(figures["latency_ms_p99"])


def test_alert_latency_is_from_the_raw_produce_to_the_alert_record():
    ms = 1_000_000
    alerts = [AlertArrival(1_010 * ms, 1_000 * ms, "a"), AlertArrival(2_040 * ms, 2_000 * ms, "b"),
              AlertArrival(3_020 * ms, 3_000 * ms, "a"), AlertArrival(3_500 * ms, None, "c")]
    figures = alert_figures(alerts)

    assert figures["n_alerts"] == 4  # the headerless one is counted, not timed
    assert figures["alert_latency_ms_p50"] == pytest.approx(20.0)  # of 10, 40, 20 ms
    assert figures["alert_latency_ms_max"] == pytest.approx(40.0)
    assert 20.0 <= figures["alert_latency_ms_p99"] <= 40.0


def test_a_phase_without_alerts_reports_no_alert_latency_rather_than_a_number():
    assert alert_figures([]) == {"n_alerts": 0, "alert_latency_ms_p50": None, "alert_latency_ms_p99": None,
                                 "alert_latency_ms_max": None}


def test_the_printed_tables_show_alert_latency_next_to_the_unchanged_score_latency():
    from rich.console import Console

    phase = {"offered_per_s": 1000, "achieved_offer_per_s": 1000.0, "latency_ms_p50": 12.0, "latency_ms_p99": 34.0,
             "latency_ms_max": 56.0, "kept_up": True, "latency_grew": False, "late_share": 0.0,
             "baseline_latency_ms_p50": 1.0, "baseline_latency_ms_p99": 2.0,
             "n_alerts": 7, "alert_latency_ms_p50": 13.5, "alert_latency_ms_p99": 41.25, "alert_latency_ms_max": 77.0}
    quiet = {**phase, "offered_per_s": 10000, "n_alerts": 0, "alert_latency_ms_p50": None,
             "alert_latency_ms_p99": None, "alert_latency_ms_max": None}
    r = {"pipeline_events_per_s": 5000.0, "baseline_events_per_s": 9000.0, "latency_ms_p50": 900.0,
         "latency_ms_p99": 1900.0, "n_events": 100, "baseline_n": 100, "n_scores": 40, "paced": [phase, quiet],
         "n_alerts": 3, "alert_latency_ms_p50": 950.0, "alert_latency_ms_p99": 1950.0, "alert_latency_ms_max": 2000.0,
         "went_quiet": True, "n_scores_restamped": 0, "n_scores_without_produced_ns": 0, "ratio": 0.55,
         "n_patients": 2, "scoring_paths": {"rule": 40}, "cpu_count": 2, "python_version": "3.11", "timestamp": "t"}
    console = Console(record=True, width=400)
    print_table(console, r)
    lines = console.export_text().splitlines()

    def cells(label: str) -> list[list[str]]:  # each table's row of that offered load
        rows = [line for line in lines if line.lstrip("│ ").startswith(label + " ")]
        return [[c.strip() for c in row.split("│") if c.strip()] for row in rows]

    score_1k, alert_1k = cells("1,000")
    assert score_1k[2:5] == ["12.0", "34.0", "56.0"] and len(score_1k) == 8  # score latency table as before
    assert alert_1k == ["1,000", "7", "13.5", "41.2", "77.0"]  # alerts, alert p50, p99, max
    assert cells("10,000")[1] == ["10,000", "0", "none", "none", "none"]
    assert any("alert records out" in line and "3" in line for line in lines)
    assert any("backlog alert latency p99 (ms)" in line and "1,950.0" in line for line in lines)


def test_the_collector_keeps_alert_records_apart_from_score_records():
    collector = ScoreCollector(Settings(), "scores", "alerts")
    with collector._changed:
        collector.alerts.append(AlertArrival(2, 1, "C0-0001-r0"))
    assert collector.snapshot() == [] and collector.alert_snapshot() == [AlertArrival(2, 1, "C0-0001-r0")]
    collector.error = RuntimeError("broker gone")
    with pytest.raises(RuntimeError, match="broker gone"):
        collector.alert_snapshot()


def test_ratio_is_pipeline_over_baseline():
    baseline = {"baseline_events_per_s": 2000.0, "feed_per_s": 3000.0,
                "n": 10}
    out = combine({"pipeline_events_per_s": 500.0}, baseline, {"cpu_count": 2})
    assert out["ratio"] == 0.25 and out["baseline_n"] == 10 and out["cpu_count"] == 2


# --- completion: the scores going quiet -----------------------------------------------------------


def idle_collector(*arrivals: ScoreArrival) -> ScoreCollector:
    """A collector whose consumer thread is not started: the test hands it the arrivals."""
    collector = ScoreCollector(Settings(), "scores")
    collector.arrivals.extend(arrivals)
    return collector


def hand_over(collector: ScoreCollector, arrival: ScoreArrival) -> None:
    with collector._changed:
        collector.arrivals.append(arrival)
        collector._changed.notify_all()


WARM = ScoreArrival(1, 1, f"C0-0001{WARMUP_SUFFIX}", "rule")


def test_quiet_after_the_last_measured_score_returns_the_measured_ones(tmp_path):
    first, second = ScoreArrival(2, 1, "C0-0001-r0", "rule"), ScoreArrival(3, 2, "C0-0001-r1", "model")
    collector = idle_collector(WARM, first)
    timer = threading.Timer(0.2, hand_over, (collector, second))
    timer.start()
    started = time.monotonic()
    try:
        arrivals, went_quiet = _wait_until_quiet(collector, quiet_s=1.0, deadline=started + 10, procs={},
                                                 logs=tmp_path)
    finally:
        timer.cancel()

    assert went_quiet and arrivals == [first, second]  # the warm-up score is not measured
    # the late arrival restarted the quiet period: ~1.2 s, where a wait that ignored it ends at ~1.0 s
    # (not >= 1.2: a condition wait can wake a few microseconds early)
    assert time.monotonic() - started > 1.1


def test_warm_up_scores_alone_wait_for_the_deadline_and_say_so(tmp_path):
    collector = idle_collector(WARM)
    started = time.monotonic()
    arrivals, went_quiet = _wait_until_quiet(collector, quiet_s=0.1, deadline=started + 0.6, procs={}, logs=tmp_path)

    assert arrivals == [] and not went_quiet
    assert time.monotonic() - started >= 0.6


def test_a_failed_scores_consumer_fails_the_wait(tmp_path):
    collector = idle_collector()
    collector.error = RuntimeError("broker gone")
    with pytest.raises(RuntimeError, match="broker gone"):
        _wait_until_quiet(collector, quiet_s=0.1, deadline=time.monotonic() + 5, procs={}, logs=tmp_path)


# --- the whole run --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_small_run_measures_both_sides(tmp_path):
    # ~110 s on 2 busy cores, most of it the max-sustained-rate search (up to 8 phases of ~9 s, more
    # when the machine is fast enough to sustain each one): the deadline leaves room for twice that
    result = run_bench(patients=2, repeat=1, data_dir=tmp_path / "bench", cache_dir=tmp_path / "cache",
                       quiet_s=3.0, timeout_s=270, rates=(200,), paced_s=1.0, state_patients=16)

    for key in ("pipeline_events_per_s", "baseline_events_per_s", "ratio", "latency_ms_p50", "latency_ms_p99",
                "latency_ms_max", "baseline_feed_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["went_quiet"]  # the figures cover the whole feed, not a run cut by the deadline
    assert result["n_events"] > 0 and result["baseline_n"] == result["n_events"]
    assert result["n_scores"] > 0 and result["n_scores_without_produced_ns"] == 0
    # the latency starts at the raw produce: ingest carries the raw header over, it does not re-stamp it
    assert result["n_scores_restamped"] == 0
    assert result["n_patients"] == 2  # every replayed patient was scored; the warm-up patient is not counted
    assert result["latency_ms_p99"] >= result["latency_ms_p50"]
    assert result["cpu_count"] and result["python_version"] and result["timestamp"]
    # the paced phase offered its own fresh patients and every one of them was scored
    (phase,) = result["paced"]
    assert phase["offered_per_s"] == 200 and phase["n_events"] == 200 and phase["n_scores"] > 0
    assert math.isfinite(phase["latency_ms_p99"]) and phase["latency_ms_p99"] >= phase["latency_ms_p50"]
    # event-to-alert: the alert records are read too, each timed from its raw produce like the scores
    for figures in (result, phase):
        assert figures["n_alerts"] >= 0 and (figures["alert_latency_ms_p99"] is None) == (figures["n_alerts"] == 0)
        if figures["n_alerts"]:
            assert 0 < figures["alert_latency_ms_p50"] <= figures["alert_latency_ms_p99"] <= figures["alert_latency_ms_max"]
    # next to the baseline's hop latency at the same offered load
    assert math.isfinite(phase["baseline_latency_ms_p99"]) and phase["baseline_latency_ms_p99"] > 0
    # the backlog's events are accounted for as applied or late, and the late share is reported
    assert result["worker_accepted"] > 0 and 0 <= result["late_share"] < 1
    # the max sustained rate was searched below the unpaced capacity; a sustained phase has the
    # relay's latency at the same rate next to it
    assert all(rate <= 0.9 * result["pipeline_events_per_s"] for rate in result["sustained_tried_per_s"])
    if result["sustained"] is not None:
        assert sustained(result["sustained"])
        assert math.isfinite(result["sustained"]["baseline_latency_ms_p99"])
    assert result["patients_in_state"] > result["n_patients"]  # warm-up + measured + paced patients
    # every phase replays days of its own, after the backlog's and each other's: event time never goes back
    spans = sorted([result["event_span_ms"], *(p["event_span_ms"] for p in result["paced"] + result["search_phases"])])
    assert spans[0] == result["event_span_ms"]
    assert all(end < start for (_, end), (start, _) in zip(spans, spans[1:]))
    # live state measured in a clean process: 16 patients with full windows take some memory
    assert result["state_patients"] == 16 and result["state_table_mb_per_10k_patients"] > 0
