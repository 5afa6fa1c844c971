"""The consumption watch: a partition with messages waiting and nothing applied for the window is
stalled; an idle partition, one that moves, or one that could not be observed is not."""

from streams.progress import ALL_ASSIGNED, ConsumptionWatch, as_one

WINDOW = 60.0


def _watch_over(observations):
    """Feed (time, applied, watermarks) observations; returns the watch."""
    watch = ConsumptionWatch(WINDOW)
    for now, applied, watermarks in observations:
        watch.observe(now, applied, watermarks)
    return watch


def test_a_partition_with_waiting_messages_that_never_moves_is_stalled_once_the_window_passes():
    watch = _watch_over([(t, {0: 10}, {0: (0, 25)}) for t in (0.0, 30.0, 59.0)])
    assert watch.stalled(59.0) == {}  # within the window
    watch.observe(60.0, {0: 10}, {0: (0, 25)})
    assert watch.stalled(60.0) == {0: 60.0}
    assert watch.lag == {0: 15}
    assert watch.seconds_without_progress(60.0) == 60.0


def test_a_partition_that_applies_something_in_each_window_is_not_stalled_however_long_it_lags():
    watch = _watch_over([(t, {0: int(t)}, {0: (0, 10_000)}) for t in range(0, 600, 50)])
    assert watch.stalled(599.0) == {}
    assert watch.seconds_without_progress(599.0) < WINDOW


def test_an_idle_partition_with_nothing_waiting_is_never_stalled():
    watch = _watch_over([(t, {0: 25}, {0: (0, 25)}) for t in range(0, 3600, 60)])
    assert watch.stalled(3600.0) == {}
    assert watch.seconds_without_progress(3600.0) == 0.0
    # and the clock starts when messages arrive, not when the partition last moved
    watch.observe(3600.0, {0: 25}, {0: (0, 30)})
    watch.observe(3630.0, {0: 25}, {0: (0, 30)})
    assert watch.stalled(3630.0) == {}
    watch.observe(3660.0, {0: 25}, {0: (0, 30)})
    assert watch.stalled(3660.0) == {0: 60.0}


def test_nothing_applied_yet_counts_from_the_low_watermark():
    watch = _watch_over([(0.0, {3: None}, {3: (100, 140)}), (60.0, {3: None}, {3: (100, 140)})])
    assert watch.lag == {3: 40}
    assert watch.stalled(60.0) == {3: 60.0}
    # an empty partition (low == high) has nothing waiting
    watch = _watch_over([(0.0, {3: None}, {3: (7, 7)}), (60.0, {3: None}, {3: (7, 7)})])
    assert watch.stalled(60.0) == {}


def test_an_applied_offset_below_the_retention_start_counts_from_the_low_watermark():
    watch = _watch_over([(0.0, {0: 5}, {0: (50, 60)})])
    assert watch.lag == {0: 10}


def test_a_failed_observation_gives_every_partition_the_whole_window_again():
    # a broker outage of 5 min is not the worker's stall: after it, the worker gets a full window
    watch = _watch_over([(0.0, {0: 10}, {0: (0, 25)}), (30.0, {0: 10}, {0: (0, 25)})])
    watch.unobservable()
    assert watch.stalled(330.0) == {}
    watch.observe(330.0, {0: 10}, {0: (0, 25)})
    assert watch.stalled(389.0) == {}
    watch.observe(390.0, {0: 10}, {0: (0, 25)})
    assert watch.stalled(390.0) == {0: 60.0}


def test_only_the_stuck_partition_is_named_and_a_revoked_one_is_forgotten():
    watch = ConsumptionWatch(WINDOW)
    watch.observe(0.0, {0: 10, 1: 0}, {0: (0, 25), 1: (0, 25)})
    watch.observe(60.0, {0: 10, 1: 20}, {0: (0, 25), 1: (0, 25)})
    assert watch.stalled(60.0) == {0: 60.0}
    watch.observe(61.0, {1: 21}, {1: (0, 25)})  # partition 0 went to another worker
    assert watch.stalled(61.0) == {}
    assert watch.lag == {1: 4}


def test_partitions_watched_as_one_stall_only_when_none_moves():
    """The ingest holds partitions that ran ahead in event time on purpose (alignment): one paused
    partition with messages waiting is no stall while another moves."""
    watch = ConsumptionWatch(WINDOW)
    for t in range(0, 300, 30):  # partition b is held back for 5 min while a moves
        watch.observe(float(t), *as_one({"a": t, "b": 5}, {"a": (0, 1000), "b": (0, 50)}))
    assert watch.stalled(270.0) == {}
    watch.observe(300.0, *as_one({"a": 300, "b": 5}, {"a": (0, 1000), "b": (0, 50)}))
    watch.observe(360.0, *as_one({"a": 300, "b": 5}, {"a": (0, 1000), "b": (0, 50)}))
    assert watch.stalled(360.0) == {ALL_ASSIGNED: 60.0}
    assert watch.lag == {ALL_ASSIGNED: 700 + 45}


def test_as_one_never_lets_one_partitions_surplus_hide_anothers_lag():
    # the embedded broker reports a's end (last batch's base + 1) below what was applied there
    applied, watermarks = as_one({"a": 18, "b": 0}, {"a": (0, 7), "b": (0, 1)})
    watch = ConsumptionWatch(WINDOW)
    watch.observe(0.0, applied, watermarks)
    assert watch.lag == {ALL_ASSIGNED: 1}
    # nothing committed yet counts from the low watermark, as for one partition
    assert as_one({"a": None}, {"a": (10, 15)}) == ({ALL_ASSIGNED: 10}, {ALL_ASSIGNED: (0, 15)})


def test_a_rebalance_or_recovery_that_moves_nothing_for_the_window_is_stuck_and_one_that_moves_is_not():
    from streams.progress import BusyWatch

    busy = BusyWatch(WINDOW)
    for t, token in [(0.0, ("recovering", 5)), (30.0, ("recovering", 900)), (80.0, ("recovering", 2000))]:
        busy.observe(t, token)  # a long recovery that reads records: never stuck
        assert busy.stuck(t) is None
    busy.observe(139.0, ("recovering", 2000))
    assert busy.stuck(139.0) is None  # 59 s without progress
    busy.observe(140.0, ("recovering", 2000))
    assert busy.stuck(140.0) == 60.0
    busy.observe(141.0, None)  # no longer busy: forgotten
    assert busy.stuck(500.0) is None
    busy.observe(600.0, ("recovering", 2000))  # busy again, same offsets: a new episode, its own window
    assert busy.stuck(659.0) is None and busy.stuck(660.0) == 60.0
