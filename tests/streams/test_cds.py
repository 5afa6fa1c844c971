"""The CDS Hooks service: pure card/request rules, then over real HTTP fed by the real broker."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer

from streams.cds import SERVICE_ID, BadRequest, LatestScores, card, make_app, patient_keys
from streams.topics import ensure_topics, topics_for
from wardwatch.procs import start_http_service, stop_service

T = 1_704_096_000_000  # 2024-01-01T08:00:00Z
REASONS = [{"feature": "resp_rate_last_24h", "value": 28.0, "contribution": 1.42},
           {"feature": "spo2_last_24h", "value": 90.0, "contribution": 0.9}]


def score(patient="p-1", minute=0, *, tier="high", probability=0.83, path="model", version="v0001", news2=7):
    return {"snapshot_id": f"s{patient}{minute}", "patient_id": patient, "scoring_ms": T + minute * 60_000,
            "partition": 0, "offset": minute, "model_version": version if path == "model" else None, "path": path,
            "probability": probability if path == "model" else None, "news2": news2, "tier": tier,
            "rationale": REASONS, "missing": []}


# --- pure ----------------------------------------------------------------------------------------------


def test_model_card_names_tier_probability_features_time_and_version():
    c = card(score())
    assert c["summary"] == "Deterioration risk HIGH (probability 0.83)"
    assert len(c["summary"]) < 140 and "p-1" not in c["summary"]
    assert (c["indicator"], c["source"]) == ("critical", {"label": "wardwatch"})
    assert "2024-01-01T08:00:00Z" in c["detail"] and "model v0001" in c["detail"]
    assert "resp_rate_last_24h = 28" in c["detail"] and "spo2_last_24h = 90" in c["detail"]


def test_a_score_resting_on_preliminary_results_says_so_on_the_card():
    c = card(score() | {"preliminary_basis": ["2524-7", "9279-1"]})
    assert c["summary"] == "Deterioration risk HIGH (probability 0.83); based on preliminary results"
    assert len(c["summary"]) < 140
    assert ("Based on preliminary results, which may change when final: lactate (LOINC 2524-7), "
            "resp rate (LOINC 9279-1).") in c["detail"]
    # all final, or a record from before the field existed: no flag
    for record in (score() | {"preliminary_basis": []}, score()):
        assert "preliminary" not in card(record)["summary"] + card(record)["detail"]


@pytest.mark.parametrize("tier, indicator", [("high", "critical"), ("medium", "warning"), ("low", "info"),
                                             ("none", "info")])
def test_indicator_follows_the_tier(tier, indicator):
    assert card(score(tier=tier))["indicator"] == indicator


def test_rule_card_shows_news2():
    c = card(score(path="rule", tier="medium", news2=5))
    assert c["summary"] == "Deterioration risk MEDIUM (NEWS2 5)" and "NEWS2 rule" in c["detail"]


def test_latest_is_by_scoring_time_not_arrival():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=10, tier="medium")))
    latest.update(orjson.dumps(score(minute=5, tier="high")))  # older, arriving later
    latest.update(b"{not json")
    assert latest.get(["p-1"])["tier"] == "medium"
    assert (latest.records_read, latest.records_skipped, len(latest.by_patient)) == (2, 1, 1)
    assert latest.card_for(["Patient/x", "p-1"]) == card(latest.get(["p-1"]))  # the latest record's card
    assert latest.card_for(["p-2"]) is None


@pytest.mark.parametrize("bad", [{"scoring_ms": 1e20}, {"probability": "0.8"},
                                 {"rationale": "resp_rate"}, {"rationale": [{"feature": "x"}]}, {"missing": [5]},
                                 {"tier": ["high"]}, {"preliminary_basis": "2524-7"},
                                 {"preliminary_basis": [{"code": "2524-7"}]}])
def test_a_score_that_cannot_make_a_card_is_skipped_and_counted(bad):
    latest = LatestScores.empty()
    assert latest.update(orjson.dumps(score(minute=5))) is True
    assert latest.update(orjson.dumps(score(minute=10) | bad)) is False
    assert latest.records_skipped == 1 and card(latest.get(["p-1"]))["summary"].startswith("Deterioration risk HIGH")


def test_a_scoring_time_sent_as_a_string_is_kept_as_a_number():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5) | {"scoring_ms": str(T + 5 * 60_000)}))
    latest.update(orjson.dumps(score(minute=10, tier="low")))  # the next score compares with it
    assert latest.get(["p-1"])["tier"] == "low"
    assert "2024-01-01T08:10:00Z" in card(latest.get(["p-1"]))["detail"]


def test_patient_keys_prefer_the_mrn_then_the_fhir_id():
    request = {"hook": "patient-view", "context": {"patientId": "Patient/123"},
               "prefetch": {"patient": {"resourceType": "Patient", "id": "123", "identifier": [
                   {"system": "urn:ssn", "value": "999"},
                   {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-77"}]}}}
    assert patient_keys(request) == ["MRN-77", "123"]
    assert patient_keys({"context": {"patientId": "123"}}) == ["123"]


MALFORMED_PATIENTS = [{"identifier": 5}, {"identifier": [{"value": "M1", "type": "MR"}]},
                      {"identifier": [{"value": "M1", "type": {"coding": {"code": "MR"}}}]}]


@pytest.mark.parametrize("request_body", [[], {"hook": "patient-view"}, {"context": {"patientId": ""}},
                                          {"hook": "order-select", "context": {"patientId": "1"}},
                                          *({"context": {"patientId": "1"}, "prefetch": {"patient": patient}}
                                            for patient in MALFORMED_PATIENTS)])
def test_malformed_requests_are_refused(request_body):
    with pytest.raises(BadRequest):
        patient_keys(request_body)


def test_over_http_a_malformed_request_is_a_400_and_a_bad_score_never_a_500():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5) | {"scoring_ms": str(T + 5 * 60_000)}))
    latest.update(orjson.dumps(score(minute=10, tier="low")))

    async def post(body: dict) -> tuple[int, dict]:
        async with TestClient(TestServer(make_app(latest))) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
            return response.status, await response.json()

    status, answer = asyncio.run(post({"hook": "patient-view", "context": {"patientId": "p-1"}}))
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk LOW")
    for patient in MALFORMED_PATIENTS:
        status, answer = asyncio.run(post({"hook": "patient-view", "context": {"patientId": "p-1"},
                                           "prefetch": {"patient": patient}}))
        assert status == 400 and "identifier" in answer["error"]


# --- over real HTTP, fed from the real broker -------------------------------------------------------------


def publish(settings, topic: str, records: list[dict]) -> None:
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 1})
    for r in records:
        producer.produce(topic, key=r["patient_id"].encode(), value=orjson.dumps(r))
    assert producer.flush(30) == 0


def ask(base: str, patient_id: str) -> httpx.Response:
    return httpx.post(f"{base}/cds-services/wardwatch-deterioration", timeout=5,
                      json={"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                            "context": {"userId": "Practitioner/1", "patientId": patient_id}})


def wait_for_card(base: str, patient_id: str, proc, expect, timeout_s: float = 60.0) -> dict:
    """Ask until the answer satisfies `expect(cards)` (the service catches up on the topic)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wardwatch cds exited with code {proc.returncode}")
        try:
            last = ask(base, patient_id).json()["cards"]
            if expect(last):
                return last
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no expected card for the patient within {timeout_s}s; last answer {last}")


@pytest.mark.integration
def test_cds_service_over_http_serves_the_latest_score_and_rebuilds_after_restart(settings, tmp_path):
    settings = settings.model_copy(update={"cds_port": 0})  # any free port, read back from the log
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    publish(settings, topics.scores, [score("p-1", 0, tier="medium", probability=0.55),
                                      score("p-1", 15, tier="high", probability=0.83),
                                      score("p-2", 3, path="rule", tier="medium", news2=5)])
    publish(settings, topics.scores_shadow, [score("p-3", 1, path="model", version="cand")])  # never served

    proc, port = start_http_service(["cds"], settings, tmp_path / "cds.log")
    base = f"http://127.0.0.1:{port}"
    try:
        [c] = wait_for_card(base, "p-1", proc, lambda cards: cards and "HIGH" in cards[0]["summary"])
        assert c["indicator"] == "critical" and c["source"]["label"] == "wardwatch"
        assert "probability 0.83" in c["summary"] and "model v0001" in c["detail"]
        [rule] = wait_for_card(base, "Patient/p-2", proc, lambda cards: bool(cards))
        assert rule["summary"] == "Deterioration risk MEDIUM (NEWS2 5)"

        discovery = httpx.get(f"{base}/cds-services", timeout=5).json()
        assert discovery["services"] == [{
            "id": "wardwatch-deterioration", "hook": "patient-view", "title": "wardwatch deterioration risk",
            "description": discovery["services"][0]["description"], "prefetch": {}}]
        assert ask(base, "p-3").json() == {"cards": []}  # shadow-only and unknown patients: no card
        assert ask(base, "nobody").json() == {"cards": []}
        bad = httpx.post(f"{base}/cds-services/wardwatch-deterioration", content=b"{not json", timeout=5)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        no_patient = httpx.post(f"{base}/cds-services/wardwatch-deterioration", json={"hook": "patient-view",
                                                                                      "context": {}}, timeout=5)
        assert no_patient.status_code == 400 and "patientId" in no_patient.json()["error"]

        # a newer score while running replaces the card
        publish(settings, topics.scores, [score("p-1", 30, tier="low", probability=0.42)])
        wait_for_card(base, "p-1", proc, lambda cards: cards and "LOW" in cards[0]["summary"])
    finally:
        stop_service(proc)

    # Kafka is the durable store: a fresh process rebuilds the same latest score by re-reading
    proc, port = start_http_service(["cds"], settings, tmp_path / "cds.log")  # the same log, appended to
    base = f"http://127.0.0.1:{port}"
    try:
        [c] = wait_for_card(base, "p-1", proc, lambda cards: cards and "LOW" in cards[0]["summary"])
        assert "probability 0.42" in c["summary"]
        wait_for_card(base, "p-2", proc, lambda cards: bool(cards))
        health = httpx.get(f"{base}/healthz", timeout=5).json()
        assert health["patients"] == 2 and health["records_read"] == 4
    finally:
        stop_service(proc)
