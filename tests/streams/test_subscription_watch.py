"""The subscription watcher: a notification it cannot read and a backlog read one partition ahead, with
stand-in Kafka clients, then the service through the real broker (a duplicate and a gap, then SIGKILL
and restart; a backlog after an outage)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, KafkaError, Producer, TopicPartition

from streams import subscription_watch
from streams.subscription_watch import SubscriptionWatcher, group_id
from streams.subscriptions import SubscriptionState
from streams.topics import ensure_topics, topics_for
from wardwatch.procs import kill_service, start_service, stop_service, wait_for_commits
from wardwatch.settings import Settings

SUB = "https://ehr.example.org/fhir/Subscription/ww-vitals"
LABS = "https://ehr.example.org/fhir/Subscription/ww-labs"
ADT = "https://ehr.example.org/fhir/Subscription/ww-adt"
T0 = 1_718_460_000_000  # 2024-06-15T14:00:00Z
DEADLINE_S = 90


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def notification(kind: str, number: int, at_ms: int, subscription: str = SUB) -> bytes:
    """An R4B notification Bundle (status only: the watcher never looks at the resources)."""
    events = [{"eventNumber": str(number), "timestamp": iso(at_ms)}] if kind == "event-notification" else []
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
              "eventsSinceSubscriptionStart": str(number), "notificationEvent": events,
              "subscription": {"reference": subscription}}
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "timestamp": iso(at_ms),
                         "entry": [{"resource": status}]})


class StandInKafka:
    """The watcher's Consumer and Producer without a broker: `partitions`, every write acknowledged."""

    partitions = 1

    def __init__(self, config):
        self.messages, self.produced, self.commits = [], [], []

    def list_topics(self, topic, timeout):
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None,
                                                              partitions=dict.fromkeys(range(self.partitions)))})

    def committed(self, partitions, timeout):
        return partitions

    def assign(self, partitions):
        pass

    def consume(self, num_messages, timeout):
        messages, self.messages = self.messages, []
        return messages

    def commit(self, offsets, asynchronous):
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])

    def produce(self, topic, key, value, headers=None, on_delivery=None, **kw):
        self.produced.append((topic, key, value))

    def flush(self, timeout=None):
        return 0

    def close(self):
        pass


class Notification:
    def __init__(self, value: bytes, offset: int, partition: int = 0, arrival_ms: int = T0):
        self._value, self._offset, self._partition, self._arrival_ms = value, offset, partition, arrival_ms

    def error(self):
        return None

    def value(self):
        return self._value

    def timestamp(self):
        return TIMESTAMP_CREATE_TIME, self._arrival_ms

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset


class PartitionEnd(Notification):
    """The event confluent-kafka delivers when a partition is read to its end (enable.partition.eof)."""

    def __init__(self, partition: int, offset: int):
        super().__init__(b"", offset, partition)

    def error(self):
        return KafkaError(KafkaError._PARTITION_EOF)


def test_a_counter_beyond_int64_is_counted_unreadable_and_committed(monkeypatch):
    monkeypatch.setattr(subscription_watch, "Consumer", StandInKafka)
    monkeypatch.setattr(subscription_watch, "Producer", StandInKafka)
    monkeypatch.setattr(subscription_watch, "restore_states", lambda *args, **kwargs: {})
    settings = Settings(topic_prefix="t")
    watcher = SubscriptionWatcher(settings, topics_for(settings))
    oversized = notification("handshake", 0, T0).replace(b'"eventsSinceSubscriptionStart":"0"',
                                                         b'"eventsSinceSubscriptionStart":"100000000000000000000"')
    watcher._consumer.messages = [Notification(oversized, 5)]

    assert watcher.poll_once() == 1  # not a crash loop: its state is never written
    assert watcher.snapshot()["subscriptions"]["unreadable"] == 1
    assert watcher._consumer.commits == [[(0, 6)]]


# an outage's backlog: 20 minutes of notifications the watcher reads only when it is back
OUTAGE_SETTINGS = {"fhir_gap_grace_s": 60.0, "fhir_heartbeat_period_s": 60.0, "fhir_heartbeat_missed_periods": 3}
SILENCE_MS = 3 * 60_000  # heartbeat-missed after three silent periods
BACKLOG_END = T0 + 1_200_500  # both subscriptions' last arrival


def outage_backlog() -> dict[int, list[tuple[bytes, int]]]:
    """Per partition, (notification, arrival ms) in arrival order: ww-vitals numbers 1..40 every 30 s
    alternate between partitions 1 and 0 (25 never arrives: the one true gap); ww-labs and ww-adt send
    only their heartbeat, every minute, ww-labs all on partition 1, ww-adt all on partition 0."""
    backlog: dict[int, list[tuple[bytes, int]]] = {0: [], 1: []}
    for n in range(1, 41):
        if n != 25:
            backlog[n % 2].append((notification("event-notification", n, T0 + n * 30_000), T0 + n * 30_000 + 500))
    for k in range(1, 21):
        for partition, subscription in ((1, LABS), (0, ADT)):
            backlog[partition].append((notification("heartbeat", 0, T0 + k * 60_000, subscription),
                                       T0 + k * 60_000 + 500))
    return {p: sorted(messages, key=lambda m: m[1]) for p, messages in backlog.items()}


def saved_before_outage() -> dict[str, SubscriptionState]:
    """The saved states of the heartbeat-only subscriptions: the watcher last heard from them just before
    it went down."""
    return {sub: SubscriptionState(sub, high=0, low=1, clock_ms=T0, last_arrival_ms=T0) for sub in (LABS, ADT)}


def alarms(values: list[bytes]) -> list[tuple]:
    records = [orjson.loads(v) for v in values]
    return sorted((r["subscription"], r["kind"], r["first_missing"], r["last_missing"]) for r in records)


def heartbeat_detections(values: list[bytes]) -> list[tuple[str, int]]:
    records = [orjson.loads(v) for v in values]
    return sorted((r["subscription"], r["detected_at_ms"]) for r in records if r["kind"] == "heartbeat-missed")


class TwoPartitions(StandInKafka):
    partitions = 2


def test_a_backlog_read_one_partition_ahead_raises_no_false_alarm(monkeypatch):
    """After an outage the consumer hands over the backlog a partition at a time: numbers on the partition
    read second must not be reported missing, nor a channel whose heartbeats are there reported silent."""
    monkeypatch.setattr(subscription_watch, "Consumer", TwoPartitions)
    monkeypatch.setattr(subscription_watch, "Producer", StandInKafka)
    monkeypatch.setattr(subscription_watch, "restore_states", lambda *args, **kwargs: saved_before_outage())
    settings = Settings(topic_prefix="t", **OUTAGE_SETTINGS)
    topics = topics_for(settings)
    wall_ms = BACKLOG_END + 10_000  # back shortly after the last notification
    watcher = SubscriptionWatcher(settings, topics, wall_clock_ms=lambda: wall_ms)
    watcher.poll_once()  # before the first fetch returns: nothing read yet, so nothing is known silent
    for partition, messages in outage_backlog().items():
        watcher._consumer.messages = [Notification(value, offset, partition, arrival)
                                      for offset, (value, arrival) in enumerate(messages)]
        watcher._consumer.messages.append(PartitionEnd(partition, len(messages)))
        watcher.poll_once()
    watcher.poll_once()

    def published():
        return [value for topic, _, value in watcher._producer.produced if topic == topics.gaps]

    assert alarms(published()) == [(SUB, "gap", 25, 25)]  # the one true gap, no silence
    wall_ms = BACKLOG_END + 3_600_000  # an hour without a notification: every channel is dead
    watcher.poll_once()
    assert heartbeat_detections(published()) == [(sub, BACKLOG_END + SILENCE_MS) for sub in sorted((SUB, LABS, ADT))]


def test_a_partition_that_never_delivers_does_not_silence_the_heartbeat_alarm(monkeypatch, caplog):
    """Partition 1 has no leader: neither a message nor its end ever comes. After one heartbeat-missed
    timeout it stops holding the clock back, with one warning, and the stats show it; the dead channel
    on partition 0 is then reported."""
    monkeypatch.setattr(subscription_watch, "Consumer", TwoPartitions)
    monkeypatch.setattr(subscription_watch, "Producer", StandInKafka)
    monkeypatch.setattr(subscription_watch, "restore_states", lambda *args, **kwargs: {})
    settings = Settings(topic_prefix="t", **OUTAGE_SETTINGS)
    topics = topics_for(settings)
    wall_ms = T0 + 1_000
    watcher = SubscriptionWatcher(settings, topics, wall_clock_ms=lambda: wall_ms)
    watcher._consumer.messages = [Notification(notification("heartbeat", 0, T0, ADT), 0, 0, T0),
                                  PartitionEnd(0, 1)]
    watcher.poll_once()

    def published():
        return [value for topic, _, value in watcher._producer.produced if topic == topics.gaps]

    stats = watcher.gauges()["subscriptions"]
    assert (stats["caught_up"], stats["stalled_partitions"]) == (0, 0)
    wall_ms = T0 + SILENCE_MS  # ww-adt silent for a timeout: due, but partition 1 might still hold its heartbeat
    watcher.poll_once()
    assert published() == [] and watcher.gauges()["subscriptions"]["stalled_partitions"] == 0
    wall_ms = T0 + 1_000 + SILENCE_MS  # partition 1 silent for a timeout too: stalled
    with caplog.at_level("WARNING", logger=subscription_watch.__name__):
        watcher.poll_once()
        wall_ms += 60_000
        watcher.poll_once()
    assert heartbeat_detections(published()) == [(ADT, T0 + SILENCE_MS)]
    stats = watcher.gauges()["subscriptions"]
    assert (stats["caught_up"], stats["stalled_partitions"]) == (0, 1)
    stalls = [r.getMessage() for r in caplog.records if "no end of partition" in r.getMessage()]
    assert len(stalls) == 1 and "partition 1" in stalls[0] and "ww-adt" not in stalls[0]  # once, no ids


def publish(settings, topic: str, messages: list[tuple[bytes | None, bytes]]) -> dict[tuple[str, int], int]:
    """Produce (key, value) pairs; returns the offset after the last one per partition (commit targets)."""
    ends: dict[tuple[str, int], int] = {}

    def delivered(err, msg):
        assert err is None, err
        tp = (msg.topic(), msg.partition())
        ends[tp] = max(ends.get(tp, 0), msg.offset() + 1)

    producer = Producer({**settings.kafka_client_config(), "partitioner": "murmur2_random"})
    for key, value in messages:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    return ends


def read_to_end(settings, topic: str, partitions: int) -> list:
    """Every record of `topic`: a marker is appended to each partition and read back, so the read
    provably reaches everything written before (end-offset queries can answer too low on Tansu)."""
    marker = b"__test_end_marker__"
    producer = Producer(settings.kafka_client_config())
    marker_offsets: dict[int, int] = {}
    for p in range(partitions):
        producer.produce(topic, key=marker, value=b"{}", partition=p,
                         on_delivery=lambda err, msg: marker_offsets.__setitem__(msg.partition(), msg.offset()))
    assert producer.flush(30) == 0 and len(marker_offsets) == partitions
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    records, pending, deadline = [], dict(marker_offsets), time.monotonic() + DEADLINE_S
    try:
        while pending:
            assert time.monotonic() < deadline, f"{topic} not read to its end"
            for msg in consumer.consume(100, timeout=0.2):
                if msg.error() is not None:
                    continue
                if msg.offset() >= pending.get(msg.partition(), float("inf")):
                    pending.pop(msg.partition())
                if msg.key() != marker:
                    records.append(msg)
    finally:
        consumer.close()
    return records


@pytest.mark.integration
def test_one_gap_record_survives_sigkill_and_restart(settings, tmp_path):
    settings = settings.model_copy(update={"fhir_gap_grace_s": 60.0, "fhir_heartbeat_period_s": 3600.0})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    group, logs = group_id(settings), tmp_path / "subscriptions.log"

    def wait_processed(targets):
        def alive():
            assert watcher.poll() is None, f"the watcher exited: see {logs}"
            time.sleep(0.2)

        wait_for_commits(settings, group, targets, deadline=time.monotonic() + DEADLINE_S, on_wait=alive)

    # notifications keyed by patient: one subscription's numbers land on different partitions
    first = [(b"MRN-0001", notification("handshake", 0, T0)),
             (b"MRN-0001", notification("event-notification", 1, T0 + 1_000)),
             (b"MRN-0002", notification("event-notification", 2, T0 + 2_000)),
             (b"MRN-0003", notification("event-notification", 3, T0 + 3_000)),
             (b"MRN-0003", notification("event-notification", 3, T0 + 3_000)),  # re-sent by the server
             (b"MRN-0004", notification("event-notification", 6, T0 + 6_000)),  # 4 and 5 never arrive
             (b"MRN-0005", notification("event-notification", 7, T0 + 7_000))]
    watcher = start_service(["subscriptions"], settings, logs)
    try:
        targets = publish(settings, topics.fhir, first)
        assert len({p for _, p in targets}) > 1  # the test means something only across partitions
        wait_processed(targets)
        # all within the grace so far; a heartbeat 1000 s later (event time) makes the gap due
        targets = publish(settings, topics.fhir, [(None, notification("heartbeat", 7, T0 + 1_000_000))])
        wait_processed(targets)

        gaps = read_to_end(settings, topics.gaps, topics.partitions)
        assert len(gaps) == 1, [g.value() for g in gaps]
        record = orjson.loads(gaps[0].value())
        assert gaps[0].key() == SUB.encode()
        assert (record["subscription"], record["kind"]) == (SUB, "gap")
        assert (record["first_missing"], record["last_missing"]) == (4, 5)
        # noticed when the first number past the gap was read (6 or 7: partitions interleave), plus the grace
        assert T0 + 6_000 + 60_000 <= record["detected_at_ms"] <= T0 + 7_000 + 60_000

        kill_service(watcher)  # SIGKILL: no clean shutdown
        watcher = start_service(["subscriptions"], settings, logs)
        targets = publish(settings, topics.fhir, [(b"MRN-0006", notification("event-notification", 8, T0 + 1_001_000)),
                                                  (b"MRN-0005", notification("event-notification", 7, T0 + 7_000))])
        wait_processed(targets)
    finally:
        stop_service(watcher)

    after = read_to_end(settings, topics.gaps, topics.partitions)
    assert [m.value() for m in after] == [gaps[0].value()]  # no second, different record
    states = [orjson.loads(m.value()) for m in read_to_end(settings, topics.subscription_state, topics.partitions)
              if m.key() == SUB.encode() and m.value() is not None]
    latest = states[-1]
    # restored, not restarted from scratch: 8 follows 7, the re-sent 7 is a duplicate like the re-sent 3
    assert latest["high"] == 8 and latest["counts"]["duplicates"] == 2
    assert [g[:2] for g in latest["gaps"]] == [[4, 5]] and latest["gaps"][0][3] is True


def events_answer(*numbers: int, at_ms: int = T0) -> bytes:
    """A $events answer: a query-event Bundle with these event numbers (statuses only)."""
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": "query-event",
              "eventsSinceSubscriptionStart": "9", "subscription": {"reference": SUB},
              "notificationEvent": [{"eventNumber": str(n), "timestamp": iso(at_ms)} for n in numbers]}
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "timestamp": iso(at_ms),
                         "entry": [{"resource": status}]})


@pytest.mark.parametrize(("answered", "republished", "error"), [
    ((4, 5, 6), True, None),
    ((4,), True, "the server's $events answer lacks event numbers 5..6"),  # was: no error for the last two
    ((4, 6), True, "the server's $events answer lacks event numbers 5..5"),
    ((3, 9), False, "the server's $events answer holds none of the missing event numbers"),  # was: republished
])
def test_recover_says_which_missing_numbers_the_servers_answer_lacks(monkeypatch, answered, republished, error):
    from collections import deque

    from streams.fhir_fetch import FhirClient
    from streams.subscriptions import Gap, SubscriptionState
    from tests.streams.fhir_server import FhirServer

    saved = SubscriptionState(SUB, high=9, low=1, clock_ms=T0, gaps=[Gap(4, 6, T0, reported=True)])
    producer = StandInKafka({})
    monkeypatch.setattr(subscription_watch, "Producer", lambda config: producer)
    monkeypatch.setattr(subscription_watch, "restore_states", lambda *args: {SUB: saved})
    server = FhirServer()
    path = "/fhir/Subscription/ww-vitals/$events?eventsSinceNumber=4&eventsUntilNumber=6&content=full-resource"
    server.script[path] = deque([(200, events_answer(*answered))])
    client = FhirClient(Settings(fhir_server_url=server.url, fhir_retries=0))
    try:
        results = subscription_watch.recover_gaps(Settings(), topics_for(Settings()), client)
    finally:
        client.close()
        server.stop()
    assert results == [{"subscription": SUB, "first_missing": 4, "last_missing": 6, "republished": republished,
                        "error": error}]
    assert [value for _, _, value in producer.produced] == ([events_answer(*answered)] if republished else [])


def test_recover_after_the_server_failed_says_to_run_recover_again_not_to_redrive(monkeypatch):
    """After one $events read failed every retry, the client's unavailable pause skips the other gaps; their
    results said "redrive fetch_failed once it is back" (the ingest's advice: nothing was dead-lettered, a
    redrive would not ask $events). They now say to run recover again once the server answers."""
    from collections import deque

    from streams.fhir_fetch import FhirClient
    from streams.subscriptions import Gap, SubscriptionState
    from tests.streams.fhir_server import FhirServer

    saved = SubscriptionState(SUB, high=9, low=1, clock_ms=T0, gaps=[Gap(2, 3, T0, reported=True),
                                                                      Gap(5, 6, T0, reported=True)])
    producer = StandInKafka({})
    monkeypatch.setattr(subscription_watch, "Producer", lambda config: producer)
    monkeypatch.setattr(subscription_watch, "restore_states", lambda *args: {SUB: saved})
    server = FhirServer()
    first = "/fhir/Subscription/ww-vitals/$events?eventsSinceNumber=2&eventsUntilNumber=3&content=full-resource"
    server.script[first] = deque([(503, b"busy")])
    client = FhirClient(Settings(fhir_server_url=server.url, fhir_retries=0, fhir_unavailable_pause_s=30.0))
    try:
        results = subscription_watch.recover_gaps(Settings(), topics_for(Settings()), client)
    finally:
        client.close()
        server.stop()
    assert [path for path, _ in server.requests] == [first]  # the second gap waits for the server to answer
    assert [(r["first_missing"], r["republished"]) for r in results] == [(2, False), (5, False)]
    assert "503" in results[0]["error"]
    assert "redrive" not in results[1]["error"]
    assert "run `wardwatch subscriptions recover` again once it answers" in results[1]["error"]
    assert producer.produced == []


@pytest.mark.integration
def test_recover_republishes_the_missing_notifications_of_an_open_gap(settings):
    from collections import deque

    from streams.fhir_fetch import FhirClient
    from streams.subscription_watch import recover_gaps
    from streams.subscriptions import Gap, SubscriptionState
    from tests.streams.fhir_server import FhirServer

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    saved = SubscriptionState(SUB, high=9, low=1, clock_ms=T0, gaps=[Gap(4, 5, T0, reported=True),
                                                                      Gap(8, 8, T0, reported=False)])
    publish(settings, topics.subscription_state, [(SUB.encode(), orjson.dumps(saved.to_dict()))])
    missing = events_answer(4, 5)  # the server's $events answer
    server = FhirServer()
    expected_path = "/fhir/Subscription/ww-vitals/$events?eventsSinceNumber=4&eventsUntilNumber=5&content=full-resource"
    server.script[expected_path] = deque([(200, missing)])
    client = FhirClient(settings.model_copy(update={"fhir_server_url": server.url}))
    try:
        results = recover_gaps(settings, topics, client)
    finally:
        client.close()
        server.stop()

    # only the reported gap: 8 is still within its grace and may arrive by itself
    assert results == [{"subscription": SUB, "first_missing": 4, "last_missing": 5, "republished": True, "error": None}]
    assert [path for path, _ in server.requests] == [expected_path]
    republished = read_to_end(settings, topics.fhir, topics.partitions)
    assert [(m.key(), m.value()) for m in republished] == [(SUB.encode(), missing)]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_backlog_after_an_outage_raises_only_the_true_alarms(settings):
    """The same outage through the real broker: the backlog is written to two partitions while the
    watcher is down, then read in small batches as librdkafka hands it over (a partition at a time, in
    an order the test does not choose: either way one heartbeat-only subscription looks silent)."""
    settings = settings.model_copy(update=OUTAGE_SETTINGS)
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    publish(settings, topics.subscription_state, [(sub.encode(), orjson.dumps(state.to_dict()))
                                                  for sub, state in saved_before_outage().items()])
    producer = Producer(settings.kafka_client_config())
    backlog = outage_backlog()
    for partition, messages in backlog.items():
        for value, arrival in messages:  # the receiver's timestamps, from before the watcher came back
            producer.produce(topics.fhir, key=b"MRN-0001", value=value, partition=partition, timestamp=arrival)
    assert producer.flush(30) == 0
    total = sum(len(messages) for messages in backlog.values())

    wall_ms = BACKLOG_END + 10_000
    watcher = SubscriptionWatcher(settings, topics, wall_clock_ms=lambda: wall_ms, batch_size=10)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while watcher.messages < total or not watcher.caught_up:
            assert time.monotonic() < deadline, f"read {watcher.messages} of {total}, caught up: {watcher.caught_up}"
            watcher.poll_once()
        caught_up = [m.value() for m in read_to_end(settings, topics.gaps, topics.partitions)]
        wall_ms = BACKLOG_END + 3_600_000
        watcher.poll_once()
    finally:
        watcher.close()

    assert alarms(caught_up) == [(SUB, "gap", 25, 25)]
    after = [m.value() for m in read_to_end(settings, topics.gaps, topics.partitions)]
    assert heartbeat_detections(after) == [(sub, BACKLOG_END + SILENCE_MS) for sub in sorted((SUB, LABS, ADT))]
