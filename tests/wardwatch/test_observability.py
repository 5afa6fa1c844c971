import logging
import sys
import urllib.error
import urllib.request

import orjson
import pytest

from wardwatch import observability as obs


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_log_lines_are_json_with_structured_fields(capsys):
    obs.configure_logging("ingest", "INFO")
    logging.getLogger("wardwatch.test").info("batch done", extra={"messages": 12, "topic": "ww.canonical"})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = orjson.loads(line)
    assert entry["service"] == "ingest" and entry["level"] == "info" and entry["msg"] == "batch done"
    assert entry["messages"] == 12 and entry["topic"] == "ww.canonical"
    assert entry["ts"].endswith("Z")


def test_exception_text_is_scrubbed_of_identifiers(capsys):
    obs.configure_logging("worker", "INFO")
    try:
        raise ValueError("bad value for patient C0-0001 in Observation 8b0f8d2e-8f3c-4c56-9b0a-1c2d3e4f5a6b")
    except ValueError:
        logging.getLogger("wardwatch.test").exception("could not parse a message")
    entry = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["exc_type"] == "ValueError"
    assert "C0-0001" not in entry["exc"] and "8b0f8d2e" not in entry["exc"]
    assert "<redacted>" in entry["exc"]


def test_exception_text_is_scrubbed_in_plain_text_logs_too(capsys):
    # WARDWATCH_JSON_LOGS=false printed the traceback as it was, identifiers included
    obs.configure_logging("worker", "INFO", json_logs=False)
    try:
        raise ValueError("bad value for patient C0-0001 in Observation 8b0f8d2e-8f3c-4c56-9b0a-1c2d3e4f5a6b")
    except ValueError:
        logging.getLogger("wardwatch.test").exception("could not parse a message")
    err = capsys.readouterr().err
    assert "could not parse a message" in err and "ValueError" in err
    assert "C0-0001" not in err and "8b0f8d2e" not in err and "<redacted>" in err


def test_a_tracebacks_frame_lines_keep_their_line_numbers_while_its_message_is_scrubbed(capsys):
    # every line number of 3 or more digits was scrubbed with the identifiers: "line <redacted>, in ..."
    obs.configure_logging("worker", "INFO")
    try:
        exec(compile("\n" * 1233 + "raise ValueError('no MRN-0001234 here')", "/app/streams/deep.py", "exec"))
    except ValueError:
        logging.getLogger("wardwatch.test").exception("could not parse a message")
    entry = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert 'File "/app/streams/deep.py", line 1234, in <module>' in entry["exc"]
    assert "0001234" not in entry["exc"] and "<redacted>" in entry["exc"]
    # input shaped as a frame line keeps only its number
    assert obs.redact('  File "x", line 7, in MRN0012345') == '  File "x", line 7, in <redacted>'


@pytest.mark.parametrize("mrn", ["E1234567", "MRN0012345", "MRN_0012345", "Patient/pat12345"])
def test_an_mrn_of_letters_then_digits_is_scrubbed_from_exception_text(mrn, capsys):
    # only a hyphenated prefix (C0-0001) or digits alone were scrubbed: a hospital's E1234567 was logged whole
    obs.configure_logging("worker", "INFO")
    try:
        raise KeyError(mrn)
    except KeyError:
        logging.getLogger("wardwatch.test").exception("could not find a patient")
    entry = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert mrn.removeprefix("Patient/") not in entry["exc"] and "<redacted>" in entry["exc"]


@pytest.mark.parametrize("json_logs", [True, False])
def test_an_exception_given_as_a_log_lines_argument_is_scrubbed(json_logs, capsys):
    # "scores feed stopped (%s: %s)", exc: only exc_info was scrubbed, the message went out whole
    obs.configure_logging("cds", "INFO", json_logs=json_logs)
    exc = ValueError("could not convert 'C0-0001' for column patient_id")
    logging.getLogger("wardwatch.test").error("scores feed stopped (%s: %s); %r", type(exc).__name__, exc, exc)
    err = capsys.readouterr().err
    assert "scores feed stopped (ValueError: could not convert '<redacted>' for column patient_id)" in err
    assert "C0-0001" not in err


@pytest.mark.parametrize("json_logs", [True, False])
def test_an_exception_ending_a_services_thread_is_logged_scrubbed(json_logs, capsys, monkeypatch):
    """An exception that ends a thread of a service (the receiver's producer poller, a consumption
    watchdog) went to threading's default hook: its whole traceback on stderr, the container's log, with
    the patient id in its message. Now one log line like the others, the traceback scrubbed."""
    import threading

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    obs.configure_logging("receiver", "INFO", json_logs=json_logs)

    def fails():
        raise ValueError("could not convert 'C0-0001' for column patient_id")

    thread = threading.Thread(target=fails, name="receiver-producer-poll")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert "C0-0001" not in err
    assert "receiver-producer-poll" in err and "ValueError" in err and "<redacted>" in err


@pytest.mark.parametrize("json_logs", [True, False])
def test_an_exception_python_cannot_raise_is_logged_scrubbed(json_logs, capsys, monkeypatch):
    # an exception in a __del__ went to sys.unraisablehook's default: its message whole on stderr
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    obs.configure_logging("worker", "INFO", json_logs=json_logs)

    class Holder:
        def __del__(self):
            raise ValueError("could not close the record of 'C0-0001'")

    Holder()
    err = capsys.readouterr().err
    assert "C0-0001" not in err and "ValueError" in err and "<redacted>" in err


def test_an_exception_groups_frame_lines_keep_their_line_numbers():
    # a TaskGroup's failure prints its inner tracebacks with "  | " before each frame line
    assert obs.redact('    |   File "/app/streams/app.py", line 1234, in process_batch') == \
        '    |   File "/app/streams/app.py", line 1234, in process_batch'
    assert obs.redact('    | ValueError: MRN0012345') == '    | ValueError: <redacted>'


def test_metrics_health_and_readiness_endpoints():
    ready = {"ok": False}
    server = obs.serve(0, ready=lambda: ready["ok"])
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        counts = {"cdc": {"messages_in": 10, "dead_lettered": {"bad_json": 3}}, "healthy": True}
        obs.expose_counters("ingest-test", lambda: counts)
        status, body = _get(base + "/metrics")
        assert status == 200
        assert b'wardwatch_counter_total{counter="cdc.dead_lettered.bad_json",service="ingest-test"} 3.0' in body
        assert b'counter="cdc.messages_in",service="ingest-test"} 10.0' in body
        counts["cdc"]["messages_in"] = 12  # read at scrape time
        assert b'counter="cdc.messages_in",service="ingest-test"} 12.0' in _get(base + "/metrics")[1]
        assert b"healthy" not in _get(base + "/metrics")[1]  # booleans are not counters
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz")[0] == 503  # not ready until the service says so
        ready["ok"] = True
        assert _get(base + "/readyz")[0] == 200
        assert _get(base + "/nope")[0] == 404
    finally:
        server.shutdown()


def test_gauges_are_scraped_as_gauges_not_as_counters():
    server = obs.serve(0)
    try:
        gauges = {"subscriptions": {"open_gaps": 2}}
        obs.expose_gauges("watcher-test", lambda: gauges)
        body = _get(f"http://127.0.0.1:{server.server_port}/metrics")[1]
        assert b"# TYPE wardwatch_gauge gauge" in body
        assert b'wardwatch_gauge{gauge="subscriptions.open_gaps",service="watcher-test"} 2.0' in body
        assert b'counter="subscriptions.open_gaps"' not in body
        gauges["subscriptions"]["open_gaps"] = 0  # a gauge goes down: read at scrape time
        assert b'service="watcher-test"} 0.0' in _get(f"http://127.0.0.1:{server.server_port}/metrics")[1]
    finally:
        server.shutdown()


def test_a_services_own_gauges_and_its_watchdogs_both_show():
    """The subscription watcher's gauges (subscriptions.open_gaps, ...) and its consumption watchdog's
    (consumption.lag, ...) are both documented on /metrics; the watchdog, started second, replaced them."""
    from streams.watchdog import StallWatchdog

    obs.expose_gauges("both-test", lambda: {"subscriptions": {"open_gaps": 2}})  # as StatsPublisher does
    dog = StallWatchdog(30.0, lambda: ({}, {}), service="both-test")
    dog.start()
    server = obs.serve(0)
    try:
        body = _get(f"http://127.0.0.1:{server.server_port}/metrics")[1]
        assert b'wardwatch_gauge{gauge="subscriptions.open_gaps",service="both-test"} 2.0' in body
        assert b'wardwatch_gauge{gauge="consumption.lag",service="both-test"} 0.0' in body
    finally:
        server.shutdown()
        dog.stop()


def test_a_failing_readiness_probe_means_not_ready():
    def broken() -> bool:
        raise RuntimeError("broker down")

    server = obs.serve(0, ready=broken)
    try:
        assert _get(f"http://127.0.0.1:{server.server_port}/readyz")[0] == 503
    finally:
        server.shutdown()


def test_disabled_when_no_port():
    assert obs.serve(None) is None


def test_worker_batch_phases_are_scraped_as_histograms():
    server = obs.serve(0)
    try:
        obs.observe_batch(40, process=0.03, outputs=0.004, changelog=0.002)
        body = _get(f"http://127.0.0.1:{server.server_port}/metrics")[1].decode()
        # an operator reads where a batch's time goes, and how big batches are
        assert 'wardwatch_worker_batch_phase_seconds_bucket{le="0.05",phase="process"}' in body
        process_sum = next(float(line.split()[-1]) for line in body.splitlines()
                           if line.startswith('wardwatch_worker_batch_phase_seconds_sum{phase="process"}'))
        assert process_sum >= 0.03
        assert "wardwatch_worker_batch_messages_count" in body
    finally:
        server.shutdown()


def test_a_service_that_knows_its_readiness_only_once_it_runs_sets_it_later():
    """The ingest and archiver serve /metrics before their consumption watchdog exists: /readyz
    answers 200 until they set their readiness, then what the watchdog says."""
    server = obs.serve(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/readyz"
        assert _get(url)[0] == 200
        obs.set_readiness(lambda: False)
        assert _get(url)[0] == 503
    finally:
        obs.set_readiness(lambda: True)
        server.shutdown()


def test_concurrent_readyz_probes_on_the_metrics_port_share_one_check():
    """The receiver's readiness asks the broker (up to 2 s when it is down), and the metrics server answers each
    request on a thread of its own: 8 probes at once started 8 broker requests. Now they share one."""
    import threading

    calls, release = [], threading.Event()

    def slow_broker_check() -> bool:
        calls.append(1)
        release.wait(10)
        return False

    server = obs.serve(0)
    try:
        obs.set_readiness(slow_broker_check)
        url = f"http://127.0.0.1:{server.server_port}/readyz"
        answers: list[int] = []
        probes = [threading.Thread(target=lambda: answers.append(_get(url)[0])) for _ in range(8)]
        before = threading.active_count()
        for p in probes:
            p.start()
        # every probe's request is being answered (a server thread each) while the first one's check runs
        for _ in range(2000):
            if calls and threading.active_count() >= before + 16:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.3)
        release.set()
        for p in probes:
            p.join(30)
        assert answers == [503] * 8
        assert len(calls) == 1
        release.clear()
        release.set()
        assert _get(url)[0] == 503 and len(calls) == 2  # the next probe after it checks again: no caching
    finally:
        obs.set_readiness(lambda: True)
        server.shutdown()


def test_setting_readiness_again_and_again_never_nests_the_shared_check():
    """Each set_readiness wrapped the check in one more single-flight layer: a test suite (or a service) setting
    it back thousands of times made /readyz recurse past Python's limit and answer 503 for ever."""
    obs.set_readiness(lambda: True)
    try:
        for _ in range(3000):
            obs.set_readiness(obs._readiness)
        assert obs._readiness() is True
    finally:
        obs.set_readiness(lambda: True)

