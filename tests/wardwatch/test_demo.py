"""The walking skeleton end to end through the real embedded broker: replay -> ingest -> faust
worker -> archiver -> nightly rebuild + parity, as `wardwatch demo` runs it."""

from __future__ import annotations

import duckdb
import orjson
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from rich.console import Console

from wardwatch.demo import DemoOptions, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # 300 msg/s: a replay compresses days into seconds, so on a loaded CI machine a scheduling hiccup
    # of 100 ms at the default 1000 msg/s is over a day of event time arriving out of step across topics
    summary = run_demo(DemoOptions(patients=4, seed=3, data_dir=root / "data", cache_dir=root / "cache",
                                   train=True, rate=300.0), Console(quiet=True))
    return summary


@pytest.mark.timeout(240)
def test_demo_passes_parity_on_every_scoring_point(demo):
    assert demo["parity_ok"]
    assert demo["parity_points"] > 10
    assert demo["parity_mismatched"] == 0


@pytest.mark.timeout(240)
def test_injected_faults_are_accounted_for(demo):
    manifest_late = demo["late_injected"]
    assert manifest_late > 0
    with duckdb.connect(demo["duckdb_path"], read_only=True) as con:
        late_ids = {r[0] for r in con.execute("SELECT fact_id FROM late_events").fetchall()}
        reasons = {r[0] for r in con.execute("SELECT reason FROM dead_letters").fetchall()}
    # the late topic holds exactly the events of the injected too-late rows, once each
    assert late_ids == set(demo["late_injected_fact_ids"])
    assert demo["late_events"] == len(late_ids)
    assert demo["dead_lettered"] == demo["faults"]["bad_messages"]
    assert reasons <= {"malformed_json", "invalid_structure", "unsupported_resource", "implausible_value",
                       "invalid_resource", "bad_value"}
    assert demo["duplicates_dropped"] >= demo["faults"]["redelivered"] + demo["faults"]["cross_source_duplicate"]


@pytest.mark.timeout(240)
def test_preliminary_lab_results_are_used_then_corrected_by_their_final_version(demo):
    """Labs report some results preliminary first: the stream accepts the preliminary version and takes
    the final one as a correction, even when its value is unchanged (the flag an alert carries goes)."""
    with duckdb.connect(demo["duckdb_path"], read_only=True) as con:
        rows = con.execute("SELECT fact_id, version, status, value, outcome FROM canonical_events WHERE fact_id IN "
                           "(SELECT fact_id FROM canonical_events WHERE status = 'preliminary') "
                           "ORDER BY fact_id, version").fetchall()
    versions: dict[str, list] = {}
    for fact_id, *rest in rows:
        versions.setdefault(fact_id, []).append(rest)
    assert len(versions) == demo["faults"]["preliminary"] > 0
    for (v1, s1, _, o1), (v2, s2, _, o2) in versions.values():
        assert (v1, s1, o1, v2, s2, o2) == (1, "preliminary", "accepted", 2, "final", "corrected")
    assert sorted(v[0][2] == v[1][2] for v in versions.values()) == [False, True]  # one corrected value, one same


@pytest.mark.timeout(240)
def test_alerts_are_valid_risk_assessments_with_deterministic_ids(demo):
    assert demo["alerts"] > 0
    with duckdb.connect(demo["duckdb_path"], read_only=True) as con:
        rows = con.execute("SELECT alert_id, kind, original_alert_id, resource FROM alerts").fetchall()
    for alert_id, kind, original_alert_id, resource in rows:
        ra = RiskAssessment.model_validate(orjson.loads(resource))
        # a correction amends the alert it corrects: the same FHIR resource id, a new alert_id
        if kind == "correction":
            assert original_alert_id and original_alert_id != alert_id
            assert ra.id == original_alert_id
        else:
            assert original_alert_id is None
            assert ra.id == alert_id
        # by MRN (typed MR), never as "Patient/<MRN>": the FHIR server's Patient of that id may be another patient
        assert ra.subject.reference is None and ra.subject.identifier.value
        assert ra.subject.identifier.type.coding[0].code == "MR"


@pytest.mark.timeout(240)
def test_duckdb_file_holds_the_rebuilt_tables(demo):
    with duckdb.connect(demo["duckdb_path"], read_only=True) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        scored_by_model = con.execute("SELECT count(*) FROM scores WHERE path = 'model'").fetchone()[0]
    assert {"canonical_events", "observations", "features_online", "features_offline", "parity_report",
            "scores", "alerts", "dead_letters", "late_events", "runs"} <= tables
    assert scored_by_model > 0  # the shipped model scores before any nightly run
    assert demo["events_canonical"] > demo["events_in"]  # wide vitals rows fan out into several events


@pytest.mark.timeout(240)
def test_every_raw_message_is_accounted_for_by_the_services_own_counters(demo):
    assert demo["accounting_ok"]
    services = demo["service_counters"]["services"]
    ingest = services["ingest"]["counters"]
    receiver = services["receiver"]["counters"]
    # FHIR bundles went through the rest-hook receiver; the ones it refused never reached a topic
    refused = sum(receiver["dead_lettered"].values())
    assert ingest["cdc"]["messages_in"] + ingest["fhir"]["messages_in"] + refused == demo["events_in"]
    assert ingest["cdc"]["events_out"] + ingest["fhir"]["events_out"] == demo["events_canonical"]
    dead = sum(sum(ingest[s]["dead_lettered"].values()) for s in ("cdc", "fhir")) + refused
    assert dead == demo["dead_lettered"]


@pytest.mark.timeout(240)
def test_service_logs_are_json_and_name_no_patient(demo):
    from pathlib import Path

    with duckdb.connect(demo["duckdb_path"], read_only=True) as con:
        identifiers = {r[0] for r in con.execute(
            "SELECT patient_id FROM canonical_events UNION SELECT encounter_id FROM canonical_events "
            "WHERE encounter_id IS NOT NULL").fetchall()}
    assert identifiers
    logs = Path(demo["duckdb_path"]).parent / "logs"
    checked = 0
    for name in ("receiver", "ingest", "subscriptions", "worker"):
        for line in (logs / f"{name}.log").read_text().splitlines():
            if not line.startswith("{"):
                continue  # librdkafka writes its own plain lines to stderr (broker addresses only)
            entry = orjson.loads(line)
            assert entry["service"] == name
            checked += 1
    assert checked > 0
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        leaked = sorted(i for i in identifiers if i in text)
        assert not leaked, f"{log.name} names {len(leaked)} patient/encounter identifiers"


def test_the_summary_says_where_the_demos_models_are(tmp_path):
    """The demo's registry is <data dir>/models, but `wardwatch model list` reads WARDWATCH_MODEL_DIR
    (default models/): following only the database hint, an analyst saw "no model versions"."""
    from wardwatch.demo import _print_summary

    summary = {k: 0 for k in ("events_in", "events_canonical", "dead_lettered", "duplicates_dropped", "late_events",
                              "scores", "alerts", "parity_checked", "parity_mismatched", "parity_points", "seconds")}
    summary |= {"model_trained": None, "parity_ok": True, "duckdb_path": str(tmp_path / "wardwatch.duckdb"),
                "model_dir": str(tmp_path / "models")}
    console = Console(record=True, width=300)
    _print_summary(console, summary)
    assert f"WARDWATCH_MODEL_DIR={tmp_path / 'models'} wardwatch model list" in console.export_text()


@pytest.mark.timeout(240)
def test_the_archiver_stays_in_its_group_while_the_replay_publishes(broker, cohort_cache, tmp_path, monkeypatch,
                                                                     caplog):
    """The demo's in-process archiver used to be polled only before and after the replay's publish: a
    publish longer than max.poll.interval.ms made librdkafka drop it from its group ("maximum poll
    interval exceeded"), and it rejoined. Here the interval is 6 s (its floor: the session timeout) and
    the publish is paced to last longer than that."""
    import time

    import confluent_kafka

    import wardwatch.demo as demo_module

    max_poll_ms = 6000
    real_consumer = confluent_kafka.Consumer

    def consumer(conf):  # only the archiver's consumer gets the short interval
        if conf.get("group.id", "").endswith(".archiver"):
            conf = {**conf, "max.poll.interval.ms": max_poll_ms}
        return real_consumer(conf)

    monkeypatch.setattr(confluent_kafka, "Consumer", consumer)
    archivers = []

    class RecordingArchiver(demo_module.Archiver):
        def __init__(self, *args, **kwargs):
            self.assignments = 0
            self.polls: list[float] = []
            super().__init__(*args, **kwargs)
            archivers.append(self)

        def _on_assign(self, consumer, partitions):
            self.assignments += 1
            super()._on_assign(consumer, partitions)

        def poll_once(self, timeout_s: float = 1.0) -> int:
            self.polls.append(time.monotonic())
            return super().poll_once(timeout_s)

    publishing = {}
    real_publish = demo_module.publish

    def publish(*args, **kwargs):
        publishing["start"] = time.monotonic()
        result = real_publish(*args, **kwargs)
        publishing["end"] = time.monotonic()
        publishing["archived_meanwhile"] = sum(archivers[0].consumed.values())
        return result

    monkeypatch.setattr(demo_module, "Archiver", RecordingArchiver)
    monkeypatch.setattr(demo_module, "publish", publish)
    summary = run_demo(DemoOptions(patients=2, seed=7, data_dir=tmp_path / "data", cache_dir=cohort_cache,
                                   train=False, rate=40.0, bootstrap=broker.bootstrap), Console(quiet=True))

    assert publishing["end"] - publishing["start"] > max_poll_ms / 1000 + 1  # else the test proves nothing
    (archiver,) = archivers
    assert not [r.getMessage() for r in caplog.records if "archiver consume error" in r.getMessage()]
    assert archiver.assignments == 1  # joined once, never dropped and rejoined
    assert publishing["archived_meanwhile"] > 0  # it archived the stream's output as it came
    during = [publishing["start"]] + [t for t in archiver.polls
                                      if publishing["start"] < t < publishing["end"]] + [publishing["end"]]
    # never left unpolled as long as librdkafka allows (the poller runs every second; a tighter bound would
    # time the machine's load, not the demo)
    assert max(b - a for a, b in zip(during, during[1:])) < max_poll_ms / 1000
    assert summary["parity_ok"]
