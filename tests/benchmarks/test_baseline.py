import math

import orjson
import pytest

from benchmarks.baseline import debezium_vital_signs, percentile, run_baseline, summarize
from schemas.codes import CDC_TABLES


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_of_a_run_where_nothing_arrived_is_not_positive():
    figures = summarize(relayed=0, relay_s=0.0, latencies_ns=[])
    assert figures["n"] == 0
    assert figures["baseline_events_per_s"] == 0.0
    assert math.isnan(figures["baseline_latency_ms_p50"])


def test_summary_reports_latency_in_milliseconds():
    figures = summarize(relayed=4, relay_s=2.0, latencies_ns=[1_000_000, 2_000_000, 3_000_000, 40_000_000])
    assert figures["baseline_events_per_s"] == 2.0
    assert figures["baseline_latency_ms_p50"] == 2.0
    assert figures["baseline_latency_ms_p99"] == 40.0
    assert figures["n"] == 4


def test_payloads_are_debezium_creates_of_the_mapped_table_about_1kb():
    mapping = CDC_TABLES["vital_signs"]
    payloads = debezium_vital_signs(50, seed=3)
    assert payloads == debezium_vital_signs(50, seed=3)
    assert len(set(payloads)) == 50
    for raw in payloads:
        assert 800 <= len(raw) <= 1300
        event = orjson.loads(raw)
        assert event["op"] == "c" and event["before"] is None
        assert event["source"]["table"] == mapping.table
        assert {mapping.patient_column, mapping.time_column, *mapping.columns} <= event["after"].keys()


@pytest.mark.integration
def test_every_message_makes_it_through_the_live_baseline_relay_at_the_offered_rate(settings):
    figures = run_baseline(settings, 2000, rate=1000, timeout_s=180)

    assert figures["n"] == 2000
    for name in ("baseline_events_per_s", "baseline_latency_ms_p50", "baseline_latency_ms_p99"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["baseline_latency_ms_max"] >= figures["baseline_latency_ms_p99"] >= figures["baseline_latency_ms_p50"]
    assert figures["feed_per_s"] <= 1100  # paced: the feeder did not run ahead of the offer


@pytest.mark.integration
def test_capacity_baseline_relays_a_prefilled_topic_and_reports_no_queueing_latency(settings):
    figures = run_baseline(settings, 2000, timeout_s=180)

    assert figures["n"] == 2000
    assert figures["baseline_events_per_s"] > 0 and figures["feed_per_s"] > 0
    # the messages waited in the topic before the relay started: that is not a hop latency
    assert math.isnan(figures["baseline_latency_ms_p50"]) and math.isnan(figures["baseline_latency_ms_p99"])

