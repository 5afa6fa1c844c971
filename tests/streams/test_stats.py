"""Counters snapshots: summing and accounting (pure), publishing and reading back through the real broker."""

from __future__ import annotations

import io

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from rich.console import Console

from streams.stats import (StatsPublisher, add_counters, latest_per_instance, read_stats, stats_record,
                           stats_table, summarize)
from streams.topics import ensure_topics, topics_for


def _record(service: str, counters: dict, updated: int = 1) -> bytes:
    return orjson.dumps({"service": service, "instance": "x", "started_at_ms": 0, "updated_at_ms": updated,
                         "counters": counters})


def _source(messages_in, parsed, dead=None, control=None, ignored=None, events=0):
    return {"messages_in": messages_in, "messages_parsed": parsed, "events_out": events,
            "dead_lettered": dead or {}, "control": control or {}, "ignored": ignored or {}, "skipped": {}}


def test_nested_counters_add_key_by_key():
    total = add_counters({"cdc": {"messages_in": 3, "dead_lettered": {"bad_value": 1}}, "batches": 2},
                         {"cdc": {"messages_in": 4, "dead_lettered": {"bad_value": 2, "malformed_json": 1}},
                          "batches": 1, "fhir": {"messages_in": 5}})
    assert total == {"cdc": {"messages_in": 7, "dead_lettered": {"bad_value": 3, "malformed_json": 1}},
                     "batches": 3, "fhir": {"messages_in": 5}}


def test_latest_record_per_instance_wins_and_bad_records_do_not_hide_others():
    records = [
        (b"ingest:a", _record("ingest", {"cdc": _source(1, 1)})),
        (b"ingest:b", _record("ingest", {"cdc": _source(5, 5)})),
        (b"ingest:a", _record("ingest", {"cdc": _source(10, 10)})),  # a's newer snapshot
        (b"ingest:c", b"{not json"),
        (b"ingest:d", _record("ingest", {"cdc": _source(2, 2)})),
        (b"ingest:d", None),  # tombstone: instance d was removed
    ]
    latest = latest_per_instance(records)
    assert set(latest) == {"ingest:a", "ingest:b"}
    summary = summarize(latest)
    ingest = summary["services"]["ingest"]
    assert ingest["instances"] == 2 and ingest["counters"]["cdc"]["messages_in"] == 15


@pytest.mark.parametrize("updated", ["soon", [1], {"ms": 1}])
def test_a_record_whose_update_time_is_not_a_number_does_not_hide_the_others(updated):
    odd = orjson.dumps({"service": "ingest", "instance": "x", "started_at_ms": 0, "updated_at_ms": updated,
                        "counters": {"cdc": _source(1, 1)}})
    latest = latest_per_instance([(b"ingest:a", odd), (b"ingest:b", _record("ingest", {"cdc": _source(5, 5)}, 7))])
    ingest = summarize(latest, now_ms=NOW)["services"]["ingest"]
    assert ingest["counters"]["cdc"]["messages_in"] == 6 and ingest["updated_at_ms"] == 7


def test_accounting_equation_is_checked_per_source():
    ok = _source(10, 5, dead={"bad_value": 2}, control={"tombstone": 1}, ignored={"truncate": 2})
    short = _source(10, 5, dead={"bad_value": 2})  # 3 messages unaccounted for
    summary = summarize({
        "ingest:a": orjson.loads(_record("ingest", {"cdc": ok, "fhir": short, "batches": 4})),
        "worker:a": orjson.loads(_record("worker", {"dedupe": {"duplicates": 3}, "late": {"events": 1}})),
    })
    assert summary["services"]["ingest"]["balanced"] == {"cdc": True, "fhir": False}
    assert summary["services"]["worker"]["balanced"] == {}  # no sources: nothing to balance
    assert summary["balanced"] is False
    text = _render(summary)
    assert "BROKEN" in text and "holds" in text and "dedupe.duplicates" in text


NOW = 1_800_000_000_000


def _watcher(instance: str, open_gaps: int, messages: int, *, updated: int = NOW, stopped: bool = False) -> dict:
    return orjson.loads(stats_record("subscriptions", instance, 0, updated,
                                     {"subscriptions": {"messages": messages, "events": messages}},
                                     {"subscriptions": {"open_gaps": open_gaps, "caught_up": 1}}, stopped=stopped))


def test_a_stopped_or_silent_instance_gauges_do_not_add_to_a_live_ones_but_its_counters_still_sum():
    latest = {
        "subscriptions:h1:1:1": _watcher("subscriptions:h1:1:1", 2, 10, updated=NOW - 60_000, stopped=True),
        "subscriptions:h1:2:2": _watcher("subscriptions:h1:2:2", 3, 7, updated=NOW - 120_000),  # killed: silent
        "subscriptions:h2:3:3": _watcher("subscriptions:h2:3:3", 2, 4, updated=NOW - 1_000),  # the running one
    }
    watcher = summarize(latest, now_ms=NOW)["services"]["subscriptions"]
    assert watcher["counters"]["subscriptions"] == {"messages": 21, "events": 21}
    assert (watcher["instances"], watcher["live_instances"], watcher["gauges_left_out"]) == (3, 1, 2)
    assert watcher["gauges"] == {"subscriptions:h2:3:3": {"updated_at_ms": NOW - 1_000, "values": {
        "subscriptions": {"open_gaps": 2, "caught_up": 1}}}}
    text = _render(summarize(latest, now_ms=NOW))
    assert "gauge subscriptions.open_gaps" in text and "now, h2:3" in text and "h1:" not in text
    assert "1 live" in text and "stopped or silent instances" in text
    # the same, every instance stopped: no gauge at all rather than stale ones
    assert summarize(latest, now_ms=NOW + 3_600_000)["services"]["subscriptions"]["gauges"] == {}


def test_records_of_the_old_format_are_read_with_their_gauges_out_of_the_counters():
    old = {"service": "subscriptions", "instance": "subscriptions:h:1:0", "started_at_ms": 0, "updated_at_ms": NOW,
           "counters": {"subscriptions": {"messages": 5, "unreadable": 1, "unattributed": 0, "events": 4,
                                          "subscriptions": 1, "open_gaps": 2, "caught_up": 1,
                                          "stalled_partitions": 0}}}
    ingest = {"service": "ingest", "instance": "ingest:h:2:0", "started_at_ms": 0, "updated_at_ms": NOW,
              "counters": {"cdc": _source(3, 3)}}
    latest = latest_per_instance([(b"subscriptions:h:1:0", orjson.dumps(old)), (b"ingest:h:2:0", orjson.dumps(ingest))])
    summary = summarize(latest, now_ms=NOW)
    watcher = summary["services"]["subscriptions"]
    assert watcher["counters"] == {"subscriptions": {"messages": 5, "unreadable": 1, "unattributed": 0}}
    # (its per-kind counts were totals restored across restarts then: not summable either)
    assert watcher["gauges"]["subscriptions:h:1:0"]["values"] == {"subscriptions": {
        "events": 4, "subscriptions": 1, "open_gaps": 2, "caught_up": 1, "stalled_partitions": 0}}
    assert summary["services"]["ingest"]["counters"]["cdc"]["messages_in"] == 3 and summary["balanced"]


def test_the_final_snapshot_of_a_clean_shutdown_marks_the_instance_stopped():
    producer = _RecordingProducer()
    publisher = StatsPublisher("subscriptions", lambda: {"subscriptions": {"messages": 1}}, producer, "p.stats",
                               gauges=lambda: {"subscriptions": {"open_gaps": 1}}, interval_s=5.0,
                               clock_ms=lambda: NOW)
    publisher.publish()
    publisher.publish(final=True)
    first, final = (r for _, _, r in producer.sent)
    assert first["gauges"] == {"subscriptions": {"open_gaps": 1}} and first["interval_ms"] == 5_000
    assert "stopped" not in first and final["stopped"] is True
    key = publisher.key
    assert summarize({key: first}, now_ms=NOW)["services"]["subscriptions"]["gauges"]
    assert summarize({key: final}, now_ms=NOW)["services"]["subscriptions"]["gauges"] == {}


def _render(summary) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(stats_table(summary))
    return console.export_text()


class _RecordingProducer:
    def __init__(self):
        self.sent = []

    def produce(self, topic, key, value, headers, on_delivery):
        self.sent.append((topic, key, orjson.loads(value)))


def test_publisher_sends_at_most_once_per_interval_under_a_stable_instance_key():
    producer = _RecordingProducer()
    count = {"n": 0}
    publisher = StatsPublisher("ingest", lambda: {"cdc": {"messages_in": count["n"]}}, producer, "p.stats",
                               interval_s=2.0, clock_ms=lambda: 1_000)
    assert publisher.maybe_publish(now_s=100.0)
    count["n"] = 7
    assert not publisher.maybe_publish(now_s=101.0)  # within the interval
    assert publisher.maybe_publish(now_s=102.5)
    assert [r["counters"]["cdc"]["messages_in"] for _, _, r in producer.sent] == [0, 7]
    keys = {k for _, k, _ in producer.sent}
    assert len(keys) == 1 and next(iter(keys)).decode().startswith("ingest:")
    assert next(iter(keys)).decode().endswith(":1000")  # <service>:<host>:<pid>:<start ms>


class _RefusingProducer:
    """produce() raises at once, as librdkafka does for a topic it knows does not exist."""

    def produce(self, topic, key, value, headers, on_delivery):
        raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC))


def test_a_snapshot_the_producer_refuses_is_counted_and_logged_without_data(caplog):
    publisher = StatsPublisher("receiver", lambda: {"responses": {"200": 1}}, _RefusingProducer(), "p.stats")
    publisher.publish()  # e.g. the receiver's final snapshot: its shutdown must go on to the flush
    assert publisher.maybe_publish(now_s=100.0)
    assert publisher.not_sent == 2
    assert "_UNKNOWN_TOPIC" in caplog.text and "200" not in caplog.text


@pytest.mark.integration
def test_published_snapshots_are_read_back_latest_per_instance(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    producer = Producer(settings.kafka_client_config())
    counts = {"cdc": _source(3, 2, ignored={"truncate": 1}, events=16)}
    first = StatsPublisher("ingest", lambda: counts, producer, topics.stats)
    second = StatsPublisher("ingest", lambda: {"cdc": _source(4, 4, events=8)}, producer, topics.stats,
                            clock_ms=lambda: 42)  # another instance (another start time)
    first.publish()
    counts = {"cdc": _source(9, 8, ignored={"truncate": 1}, events=40)}  # later, more processed
    first.publish()
    second.publish()
    assert producer.flush(30) == 0

    summary = summarize(read_stats(settings, topics, timeout_s=30))
    ingest = summary["services"]["ingest"]
    assert ingest["instances"] == 2
    assert ingest["counters"]["cdc"]["messages_in"] == 13 and ingest["counters"]["cdc"]["events_out"] == 48
    assert summary["balanced"] is True


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_stats_are_read_while_services_keep_publishing(settings):
    # several instances publish every few hundred ms: the reader must not wait for a lull that never comes
    import threading

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    producer = Producer(settings.kafka_client_config())
    publishers = [StatsPublisher("ingest", lambda: {"cdc": _source(1, 1, events=1)}, producer, topics.stats,
                                 clock_ms=lambda i=i: i) for i in range(8)]
    stop = threading.Event()

    def publish_forever():
        while not stop.is_set():
            for publisher in publishers:
                publisher.publish()
                producer.poll(0)
                stop.wait(0.02)  # 8 instances: a record every 20 ms, never a 0.3 s lull

    for publisher in publishers:  # every instance is in the topic before the read starts
        publisher.publish()
    producer.flush(10)
    thread = threading.Thread(target=publish_forever, daemon=True)
    thread.start()
    try:
        summary = summarize(read_stats(settings, topics, timeout_s=10))
    finally:
        stop.set()
        thread.join(5)
        producer.flush(10)
    assert summary["services"]["ingest"]["instances"] == 8


@pytest.mark.integration
def test_reading_an_empty_stats_topic_gives_no_services(settings):
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    assert summarize(read_stats(settings, topics, timeout_s=30)) == {"services": {}, "balanced": True}
