"""The CDS Hooks service: pure card/request rules, then over real HTTP fed by the real broker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid

import httpx
import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from streams.cds import (SERVICE_ID, AuthConfigError, BadRequest, CatchUp, LatestScores, SeenTokens, card,
                         UnknownMrn, load_client_auth, make_app, patient_keys)
from streams.topics import ensure_topics, topics_for
from wardwatch.broker import free_port
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


def test_a_score_resting_on_readings_over_4_h_old_says_which_and_how_old_on_the_card():
    stale = [["systolic_bp_last_24h", 85.0, T - (14 * 60 + 44) * 60_000], ["on_oxygen", 1.0, T - 5 * 3_600_000]]
    c = card(score(path="rule", tier="medium", news2=6) | {"stale_readings": stale})
    assert c["summary"] == "Deterioration risk MEDIUM (NEWS2 6); readings over 4 h old"
    assert ("Old readings the score rests on:\n"
            "- systolic BP 85 mmHg taken 14 h 44 min before this score, not rechecked\n"
            "- on oxygen at the SpO2 round taken 5 h before this score, not rechecked") in c["detail"]
    # none old, or a record from before the field existed: nothing said
    for record in (score() | {"stale_readings": []}, score()):
        assert "old" not in card(record)["summary"] and "rechecked" not in card(record)["detail"]


@pytest.mark.parametrize("tier, indicator", [("high", "critical"), ("medium", "warning"), ("low", "info"),
                                             ("none", "info")])
def test_indicator_follows_the_tier(tier, indicator):
    assert card(score(tier=tier))["indicator"] == indicator


def test_rule_card_shows_news2():
    c = card(score(path="rule", tier="medium", news2=5))
    assert c["summary"] == "Deterioration risk MEDIUM (NEWS2 5)" and "NEWS2 rule" in c["detail"]


def test_the_card_says_how_old_the_score_is_and_not_current_past_12_h_keeping_the_tier_indicator():
    fresh = card(score(), now_ms=T + 25 * 60_000)
    assert fresh["summary"] == "Deterioration risk HIGH (probability 0.83), scored 25 min ago"
    old = card(score(), now_ms=T + 30 * 3_600_000)  # the patient's last score, none since (discharged, no vitals)
    assert old["summary"] == "Deterioration risk HIGH (probability 0.83), scored 30 h ago: NOT CURRENT"
    assert old["indicator"] == "critical" and "this is not the current risk" in old["detail"]
    assert "NOT CURRENT" not in card(score(), now_ms=T + 12 * 3_600_000)["summary"]
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score()))
    assert latest.card_for(["p-1"], T + 3 * 86_400_000)["summary"].endswith("scored 3 d ago: NOT CURRENT")


def test_over_http_the_card_says_how_old_the_score_is_when_asked():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score()))
    body = {"hook": "patient-view", "context": {"patientId": "123"}, "prefetch": prefetched("123", "p-1")}

    async def post() -> tuple[int, dict]:
        app = make_app(latest, ready=lambda: True, clock=lambda: (T + 20 * 3_600_000) / 1000)
        async with TestClient(TestServer(app)) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
            return response.status, await response.json()

    status, answer = asyncio.run(post())
    assert status == 200 and answer["cards"][0]["summary"].endswith("scored 20 h ago: NOT CURRENT")


@pytest.mark.parametrize("tier", ["high", "medium", "low", "none"])
def test_no_summary_is_cut_at_140_characters_for_any_tier_path_or_flag(tier):
    for path, news2, age_ms in [("model", 7, 0), ("rule", 20, 5 * 3_600_000), ("rule", None, 10 ** 13)]:
        record = score(tier=tier, path=path, news2=news2) | {
            "preliminary_basis": ["2524-7"], "stale_readings": [["on_oxygen", 1.0, T - 5 * 3_600_000]]}
        summary = card(record, now_ms=T + age_ms)["summary"]
        assert len(summary) < 140 and summary.endswith("; based on preliminary results; readings over 4 h old")


@pytest.mark.parametrize("probability, shown", [(0.996, ">0.99"), (0.003, "<0.01"), (0.834, "0.83"), (1.0, "1.00")])
def test_a_probability_is_never_rounded_to_a_certainty(probability, shown):
    assert card(score(probability=probability))["summary"] == f"Deterioration risk HIGH (probability {shown})"


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
                                 {"preliminary_basis": [{"code": "2524-7"}]}, {"stale_readings": "sbp"},
                                 {"stale_readings": [["systolic_bp_last_24h", 85.0]]}])
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


def prefetched(patient_id: str, mrn: str | None = None) -> dict:
    """The `prefetch` an EHR sends for discovery's Patient/{{context.patientId}}: the Patient, with its MRN
    (by default the same string as its id: these tests are about other things than keys)."""
    fhir_id = patient_id.removeprefix("Patient/")
    return {"patient": {"resourceType": "Patient", "id": fhir_id,
                        "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": mrn or fhir_id}]}}


def test_patient_keys_are_the_prefetched_mrn_and_the_fhir_id_only_when_the_ids_are_mrns():
    request = {"hook": "patient-view", "context": {"patientId": "Patient/123"},
               "prefetch": {"patient": {"resourceType": "Patient", "id": "123", "identifier": [
                   {"system": "urn:ssn", "value": "999"},
                   {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-77"}]}}}
    # the FHIR id "123" may be another patient's MRN: never a key unless the operator says the ids are MRNs
    assert patient_keys(request) == ["MRN-77"]
    assert patient_keys(request, fhir_patient_ids_are_mrns=True) == ["MRN-77", "123"]
    assert patient_keys({"context": {"patientId": "123"}}, fhir_patient_ids_are_mrns=True) == ["123"]


@pytest.mark.parametrize("prefetch", [None, {}, {"patient": None},
                                      {"patient": {"resourceType": "OperationOutcome", "issue": []}},
                                      {"patient": {"resourceType": "Patient", "id": "123", "identifier": []}},
                                      # an untyped identifier (here a national number) is no MRN: the ingest
                                      # would not key the patient by it, and its value may be someone's MRN
                                      {"patient": {"resourceType": "Patient", "id": "123",
                                                   "identifier": [{"system": "urn:ssn", "value": "999"}]}}])
def test_without_a_prefetched_mrn_the_patient_is_unknown_not_the_fhir_id(prefetch):
    request = {"hook": "patient-view", "context": {"patientId": "123"}}
    if prefetch is not None:
        request["prefetch"] = prefetch
    with pytest.raises(UnknownMrn) as unknown:
        patient_keys(request)
    assert "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS" in str(unknown.value) and "123" not in str(unknown.value)


MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"


def test_with_an_mrn_system_the_prefetched_patients_mrn_is_the_identifier_typed_mr_of_that_system():
    """A Patient typed MR in two namespaces (another facility's first): its card is the EHR's MRN's, never the
    other value's, which may be another patient's MRN (the ingest keys the Patient so too)."""
    other = {"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.3.4.5", "value": "MRN-9"}
    ours = {"type": {"coding": [{"code": "MR"}]}, "system": MRN_SYSTEM, "value": "MRN-77"}
    request = {"hook": "patient-view", "context": {"patientId": "123"},
               "prefetch": {"patient": {"resourceType": "Patient", "id": "123", "identifier": [other, ours]}}}
    assert patient_keys(request) == ["MRN-9"]  # unset: the first typed MR, as before
    assert patient_keys(request, mrn_system=MRN_SYSTEM) == ["MRN-77"]
    request["prefetch"]["patient"]["identifier"] = [other]
    with pytest.raises(UnknownMrn) as unknown:
        patient_keys(request, mrn_system=MRN_SYSTEM)
    assert "WARDWATCH_MRN_SYSTEM" in str(unknown.value) and "MRN-9" not in str(unknown.value)


def test_over_http_the_service_keys_the_prefetched_patient_by_the_mrn_system():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5, tier="high")))  # MRN p-1
    other = {"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.3.4.5", "value": "p-1"}
    body = {"hook": "patient-view", "context": {"patientId": "123"},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "123", "identifier": [other]}}}

    async def post(**options) -> tuple[int, dict]:
        async with TestClient(TestServer(make_app(latest, ready=lambda: True, **options))) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
            return response.status, await response.json()

    status, answer = asyncio.run(post())
    assert status == 200 and answer["cards"]  # unset: another facility's MRN p-1 shows p-1's card
    status, answer = asyncio.run(post(mrn_system=MRN_SYSTEM))
    assert status == 412 and "cards" not in answer  # not this patient's MRN: never p-1's risk


def test_a_prefetched_patient_of_another_id_is_refused():
    # its MRN would key another patient's card
    with pytest.raises(BadRequest, match="context.patientId"):
        patient_keys({"hook": "patient-view", "context": {"patientId": "123"}, "prefetch": prefetched("456", "MRN-9")})


def test_a_prefetched_patient_without_an_id_is_refused():
    # it cannot be shown to be the Patient in context: its MRN could key another patient's card
    patient = prefetched("123", "MRN-9")
    del patient["patient"]["id"]
    with pytest.raises(BadRequest, match="no `id`"):
        patient_keys({"hook": "patient-view", "context": {"patientId": "123"}, "prefetch": patient})


def test_over_http_a_call_keyed_by_a_fhir_id_that_is_another_patients_mrn_gets_a_412_not_their_card():
    """FHIR Patient "p-1" is not the patient whose MRN is "p-1": without a prefetched MRN, the service must
    not show that patient's HIGH risk card, nor `{"cards": []}` (no risk); 412 (CDS Hooks: the service could
    not retrieve the FHIR data it needs). With the prefetched MRN, the right patient's card (or none)."""
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5, tier="high")))  # MRN p-1

    async def post(body: dict, **options) -> tuple[int, dict]:
        async with TestClient(TestServer(make_app(latest, ready=lambda: True, **options))) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
            return response.status, await response.json()

    bare = {"hook": "patient-view", "context": {"patientId": "p-1"}}
    status, answer = asyncio.run(post(bare))
    assert status == 412 and "cards" not in answer and "prefetch" in answer["error"]
    status, answer = asyncio.run(post({**bare, "prefetch": prefetched("p-1", "MRN-OTHER")}))
    assert status == 200 and answer == {"cards": []}  # the patient in view is MRN-OTHER: not scored
    status, answer = asyncio.run(post(bare, fhir_patient_ids_are_mrns=True))  # a facade: the id is the MRN
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk HIGH")


def test_discovery_asks_the_ehr_to_prefetch_the_patient():
    async def get() -> dict:
        async with TestClient(TestServer(make_app(LatestScores.empty(), ready=lambda: True))) as client:
            return await (await client.get("/cds-services")).json()
    assert asyncio.run(get())["services"][0]["prefetch"] == {"patient": "Patient/{{context.patientId}}"}


MALFORMED_PATIENTS = [{"identifier": 5}, {"identifier": [{"value": "M1", "type": "MR"}]},
                      {"identifier": [{"value": "M1", "type": {"coding": {"code": "MR"}}}]}]


@pytest.mark.parametrize("request_body", [[], {"hook": "patient-view"}, {"context": {"patientId": ""}},
                                          {"hook": "order-select", "context": {"patientId": "1"}},
                                          *({"context": {"patientId": "1"}, "prefetch": {"patient": {"id": "1", **patient}}}
                                            for patient in MALFORMED_PATIENTS)])
def test_malformed_requests_are_refused(request_body):
    with pytest.raises(BadRequest):
        patient_keys(request_body)


def test_over_http_a_malformed_request_is_a_400_and_a_bad_score_never_a_500():
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5) | {"scoring_ms": str(T + 5 * 60_000)}))
    latest.update(orjson.dumps(score(minute=10, tier="low")))

    async def post(body: dict) -> tuple[int, dict]:
        async with TestClient(TestServer(make_app(latest, ready=lambda: True))) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
            return response.status, await response.json()

    status, answer = asyncio.run(post({"hook": "patient-view", "context": {"patientId": "p-1"},
                                       "prefetch": prefetched("p-1")}))
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk LOW")
    for patient in MALFORMED_PATIENTS:
        status, answer = asyncio.run(post({"hook": "patient-view", "context": {"patientId": "p-1"},
                                           "prefetch": {"patient": {"id": "p-1", **patient}}}))
        assert status == 400 and "identifier" in answer["error"]


def test_a_body_whose_content_encoding_does_not_decode_is_a_400_not_a_500():
    # was: aiohttp's RequestPayloadError escaped the handler as a 500
    async def go():
        async with TestClient(TestServer(make_app(LatestScores.empty(), None, ready=lambda: True))) as client:
            response = await client.post(f"/cds-services/{SERVICE_ID}", data=b"\x1f\x8b\x08\x00" + b"\xff" * 40,
                                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
            return response.status, await response.json()

    status, body = asyncio.run(go())
    assert status == 400 and "cannot be read" in body["error"]


def test_a_client_stalling_mid_body_gets_408_and_is_hung_up_on():
    # was: aiohttp never times out a body, so a client that sent its headers and part of its body held its
    # connection (and handler) for ever; with anonymous calls, anyone could
    body = orjson.dumps({"hook": "patient-view", "context": {"patientId": "p-1"}})

    async def stall() -> tuple[bytes, bytes]:
        app = make_app(LatestScores.empty(), None, ready=lambda: True, read_timeout_s=0.5)
        async with TestServer(app) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /cds-services/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (SERVICE_ID.encode(), len(body), body[:10]))
            await writer.drain()  # the rest never comes
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)  # up to the JSON error's end
            rest = await asyncio.wait_for(reader.read(), 2)  # then it hung up, waiting for nothing more
            writer.close()
            return answer, rest

    answer, rest = asyncio.run(stall())
    assert answer.split()[1] == b"408" and b"not received within 0.5 s" in answer
    assert b"Connection: close" in answer and rest == b""


def test_a_huge_hook_value_is_not_echoed_back_whole():
    with pytest.raises(BadRequest) as refused:
        patient_keys({"hook": "x" * 100_000, "context": {"patientId": "1"}})
    assert "patient-view" in str(refused.value) and len(str(refused.value)) < 200


# --- client authentication (CDS Hooks "Trusting CDS Clients") ---------------------------------------------

ISSUER = "https://ehr.example.org"
AUDIENCE = f"https://wardwatch.example.org/cds-services/{SERVICE_ID}"
KID = "ehr-2024"


@pytest.fixture(scope="module")
def ehr_key():
    return ec.generate_private_key(ec.SECP384R1())  # the EHR's signing key (CDS Hooks recommends ES384)


def write_jwks(path, private_key, kid=KID):
    public = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
    path.write_bytes(orjson.dumps({"keys": [public | {"kid": kid, "use": "sig"}]}))
    return path


@pytest.fixture
def client_auth(ehr_key, tmp_path, clean_env):
    from wardwatch.settings import Settings

    settings = Settings(cds_host="0.0.0.0", cds_jwks_file=write_jwks(tmp_path / "jwks.json", ehr_key),
                        cds_issuers=ISSUER, cds_audience=AUDIENCE)
    return load_client_auth(settings)


def claims(**changes) -> dict:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()),
            "tenant": "north"}
    return {k: v for k, v in (base | changes).items() if v is not None}


def signed(key, payload: dict | None = None, kid=KID, alg="ES384") -> str:
    return jwt.encode(claims() if payload is None else payload, key, algorithm=alg, headers={"kid": kid})


def forged(alg: str, secret: bytes = b"", **header) -> str:
    """A token PyJWT refuses to make: alg none (no signature), HMAC keyed with the public key, or a
    header it refuses to read (`header` overrides)."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    header = {"alg": alg, "typ": "JWT", "kid": KID} | header
    signing_input = b64(orjson.dumps(header)) + b"." + b64(orjson.dumps(claims()))
    signature = b64(hmac.new(secret, signing_input, hashlib.sha256).digest()) if alg == "HS256" else b""
    return (signing_input + b"." + signature).decode()


def call(latest: LatestScores, auth, headers: dict, *, path: str = f"/cds-services/{SERVICE_ID}",
         tokens: int = 1) -> list[tuple[int, dict, dict]]:
    """POST (GET for discovery and health) `tokens` times; [(status, body, response headers)]."""
    async def go():
        answers = []
        async with TestClient(TestServer(make_app(latest, auth, ready=lambda: True))) as client:
            for _ in range(tokens):
                if path.startswith("/cds-services/"):
                    response = await client.post(path, headers=headers, json={
                        "hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p-1"},
                        "prefetch": prefetched("p-1")})
                else:
                    response = await client.get(path, headers=headers)
                answers.append((response.status, await response.json(), dict(response.headers)))
        return answers
    return asyncio.run(go())


@pytest.fixture
def scored() -> LatestScores:
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score(minute=5, tier="high")))
    return latest


def test_a_call_with_a_valid_client_token_gets_the_card(scored, client_auth, ehr_key):
    [(status, body, _)] = call(scored, client_auth, {"Authorization": f"Bearer {signed(ehr_key)}"})
    assert status == 200 and body["cards"][0]["summary"].startswith("Deterioration risk HIGH")
    # aud as an array holding the endpoint URL is the spec's other form
    [(status, body, _)] = call(scored, client_auth, {
        "Authorization": f"Bearer {signed(ehr_key, claims(aud=[AUDIENCE]))}"})
    assert status == 200 and body["cards"]


UNAUTHORIZED = ("no token", "not bearer", "wrong key", "unknown kid", "wrong iss", "wrong aud", "expired", "no jti",
                "no exp", "no iat", "valid for a day", "alg none", "HS256 keyed with the public key",
                "kid not a string", "unknown critical header")


def _unauthorized_calls(ehr_key) -> dict[str, dict]:
    other_key = ec.generate_private_key(ec.SECP384R1())  # not in the JWK Set, signing under the trusted kid
    public_pem = ehr_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    long_ago = int(time.time()) - 3600
    return {
        "no token": {},
        "not bearer": {"Authorization": f"Basic {base64.b64encode(b'ehr:secret').decode()}"},
        "wrong key": {"Authorization": f"Bearer {signed(other_key)}"},
        "unknown kid": {"Authorization": f"Bearer {signed(ehr_key, kid='someone-else')}"},
        "wrong iss": {"Authorization": f"Bearer {signed(ehr_key, claims(iss='https://attacker.example'))}"},
        "wrong aud": {"Authorization": f"Bearer {signed(ehr_key, claims(aud='https://other.example/cds-services/x'))}"},
        "expired": {"Authorization": f"Bearer {signed(ehr_key, claims(iat=long_ago, exp=long_ago + 300))}"},
        "no jti": {"Authorization": f"Bearer {signed(ehr_key, claims(jti=None))}"},
        "no exp": {"Authorization": f"Bearer {signed(ehr_key, claims(exp=None))}"},
        "no iat": {"Authorization": f"Bearer {signed(ehr_key, claims(iat=None))}"},
        "valid for a day": {"Authorization": f"Bearer {signed(ehr_key, claims(exp=int(time.time()) + 86400))}"},
        "alg none": {"Authorization": f"Bearer {forged('none')}"},
        "HS256 keyed with the public key": {"Authorization": f"Bearer {forged('HS256', public_pem)}"},
        # headers PyJWT refuses before any key is looked up: a 401 like the others, not a 500
        "kid not a string": {"Authorization": f"Bearer {forged('ES384', kid=2024)}"},
        "unknown critical header": {"Authorization": f"Bearer {forged('ES384', crit=['exp-v9'], **{'exp-v9': 1})}"},
    }


@pytest.mark.parametrize("case", UNAUTHORIZED)
def test_a_call_without_a_valid_client_token_is_a_401_without_the_card(case, scored, client_auth, ehr_key):
    headers = _unauthorized_calls(ehr_key)[case]
    [(status, body, response_headers)] = call(scored, client_auth, headers)
    assert status == 401 and "cards" not in body, (case, body)
    # RFC 6750: a call without a token gets the bare challenge, a refused token error="invalid_token"
    assert response_headers["WWW-Authenticate"] == 'Bearer realm="wardwatch"' + (
        "" if case == "no token" else ', error="invalid_token"')
    sent = headers.get("Authorization", "").partition(" ")[2]
    # what is wrong, in general terms: never the token, nor a claim's value
    assert body["error"] and (not sent or sent not in body["error"])
    for value in ("attacker.example", "other.example", "someone-else", "north"):
        assert value not in body["error"]


def test_an_authorization_header_that_is_not_utf8_is_a_401_not_a_500(scored, client_auth):
    # was: aiohttp hands such header bytes over as surrogates, on which PyJWT raised UnicodeEncodeError: a 500
    async def post_raw(token: bytes) -> bytes:
        async with TestServer(make_app(scored, client_auth, ready=lambda: True)) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"POST /cds-services/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                         % (SERVICE_ID.encode(), token))
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer

    for token in (b"\xff\xfe", b"eyJhbGciOiJFUzM4NCJ9\xff.e30.sig"):
        answer = asyncio.run(post_raw(token))
        assert answer.split()[1] == b"401" and b'error="invalid_token"' in answer, answer[:200]


def test_a_replayed_token_is_refused(scored, client_auth, ehr_key):
    headers = {"Authorization": f"Bearer {signed(ehr_key)}"}
    first, replay = call(scored, client_auth, headers, tokens=2)
    assert first[0] == 200 and first[1]["cards"]
    assert replay[0] == 401 and "already used" in replay[1]["error"] and "cards" not in replay[1]
    assert call(scored, client_auth, {"Authorization": f"Bearer {signed(ehr_key)}"})[0][0] == 200  # a new jti


def test_the_replay_memory_is_bounded_and_forgets_expired_tokens():
    seen = SeenTokens(capacity=3)
    assert seen.first_use(("ehr", "a"), until=100, now=0) and not seen.first_use(("ehr", "a"), until=100, now=50)
    assert seen.first_use(("other-ehr", "a"), until=100, now=50)  # a jti is unique per issuer
    seen.first_use(("ehr", "b"), until=200, now=50)
    seen.first_use(("ehr", "c"), until=300, now=150)  # a, other-a expired: forgotten
    assert len(seen) == 2
    seen.first_use(("ehr", "d"), until=400, now=150)
    seen.first_use(("ehr", "e"), until=500, now=150)  # full: b (the first to expire) goes
    assert len(seen) == 3 and not seen.first_use(("ehr", "e"), until=500, now=160)
    assert not seen.first_use(("ehr", "c"), until=300, now=160)  # the later-expiring ones are kept
    assert not seen.first_use(("ehr", "d"), until=400, now=160)
    assert seen.first_use(("ehr", "b"), until=200, now=160)  # b was forgotten: it is new again


def test_discovery_and_health_stay_open_with_client_authentication(scored, client_auth):
    [(status, body, _)] = call(scored, client_auth, {}, path="/cds-services")
    assert status == 200 and body["services"][0]["id"] == SERVICE_ID
    [(status, body, _)] = call(scored, client_auth, {}, path="/healthz")
    assert status == 200 and body["patients"] == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "cds.internal"])
def test_without_client_keys_the_service_refuses_a_non_loopback_address_unless_told(host, clean_env):
    from wardwatch.settings import Settings

    with pytest.raises(AuthConfigError) as refused:
        load_client_auth(Settings(cds_host=host))
    message = str(refused.value)
    assert "\n" not in message and "WARDWATCH_CDS_JWKS_FILE" in message
    assert "WARDWATCH_CDS_ALLOW_ANONYMOUS=true" in message
    assert load_client_auth(Settings(cds_host=host, cds_allow_anonymous=True)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.53"])
def test_on_a_loopback_address_the_service_still_takes_anonymous_calls(host, clean_env):
    from wardwatch.settings import Settings

    assert load_client_auth(Settings(cds_host=host)) is None


def test_a_jwks_the_service_cannot_use_stops_it_in_one_line(ehr_key, tmp_path, clean_env):
    from wardwatch.settings import Settings

    def refusal(jwks_path, audience=AUDIENCE) -> str:
        with pytest.raises(AuthConfigError) as refused:
            load_client_auth(Settings(cds_jwks_file=jwks_path, cds_issuers=ISSUER, cds_audience=audience))
        return str(refused.value)

    assert "cannot be read" in refusal(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not JSON" in refusal(tmp_path / "bad.json")
    (tmp_path / "secret.json").write_text('{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}')
    assert "public keys only" in refusal(tmp_path / "secret.json")
    private = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(ehr_key)) | {"kid": KID}
    (tmp_path / "private.json").write_bytes(orjson.dumps({"keys": [private]}))
    assert "public keys only" in refusal(tmp_path / "private.json")
    assert "private" not in refusal(write_jwks(tmp_path / "ok.json", ehr_key), "https://wardwatch.example.org")
    assert f"/cds-services/{SERVICE_ID}" in refusal(tmp_path / "ok.json", "https://wardwatch.example.org/cds-services")


def test_catch_up_reads_on_past_the_reported_ends_and_never_waits_for_records_that_cannot_come():
    catch_up = CatchUp({0: (0, 3), 1: (5, 5), 2: (10, 12)}, 0.0, quiet_s=0.5, idle_s=2.0)  # 1: empty
    catch_up.seen(0, 2, 0.1)
    catch_up.seen(2, 10, 0.1)
    assert not catch_up.tick(0.2, drained=True) and not catch_up.done.is_set()  # partition 2's 11 not read yet
    catch_up.seen(2, 11, 0.3)  # every reported end reached, but on Tansu an end is a batch's base + 1:
    assert not catch_up.tick(0.7, drained=True) and not catch_up.done.is_set()  # the rest may still come
    catch_up.tick(0.8, drained=False)
    assert not catch_up.done.is_set()  # a full read: more was fetched than delivered yet
    catch_up.tick(0.9, drained=True)
    assert catch_up.done.is_set()

    flooded = CatchUp({0: (0, 3)}, 0.0, quiet_s=0.5)  # new scores keep every read full
    flooded.seen(0, 2, 0.1)
    flooded.tick(5.0, drained=False)
    assert not flooded.done.is_set()
    flooded.tick(5.1, drained=False)  # ten times the quiet time past the ends: what was fetched is read
    assert flooded.done.is_set()

    empty = CatchUp({0: (0, 0), 1: (7, 7)}, 0.0, quiet_s=0.5)
    empty.tick(0.5, drained=True)
    assert empty.done.is_set()  # nothing to read: ready after the quiet time

    short = CatchUp({0: (0, 100)}, 0.0, quiet_s=0.5, idle_s=2.0)  # e.g. recreated with fewer records since
    short.seen(0, 40, 1.0)
    assert not short.tick(2.9, drained=True)  # records came 1.9 s ago
    assert short.tick(3.0, drained=True)  # idle: ask the broker where the ends are now
    assert not short.done.is_set()  # (no answer, or more there: not done)
    assert not short.tick(4.0, drained=True)  # asked 1 s ago
    assert short.tick(5.0, drained=True)
    short.at_end()  # the broker has nothing past the positions: done
    assert short.done.is_set()


def test_until_the_scores_are_read_a_call_is_a_503_never_an_empty_answer():
    """An empty `cards` while the service re-reads the topic after a restart would tell the clinician
    "no risk" for a patient whose high score it has not read yet."""
    latest = LatestScores.empty()
    caught_up = False

    async def calls() -> list[tuple[int, dict, dict]]:
        async with TestClient(TestServer(make_app(latest, ready=lambda: caught_up))) as client:
            answers = []
            for method, path in [("post", f"/cds-services/{SERVICE_ID}"), ("get", "/readyz"),
                                 ("get", "/healthz"), ("get", "/cds-services")]:
                body = ({"hook": "patient-view", "context": {"patientId": "p-1"}, "prefetch": prefetched("p-1")}
                        if method == "post" else None)
                response = await getattr(client, method)(path, json=body)
                answers.append((response.status, await response.json(), dict(response.headers)))
            return answers

    (call, call_body, headers), (ready, _, _), (health, health_body, _), (discovery, _, _) = asyncio.run(calls())
    assert call == 503 and int(headers["Retry-After"]) > 0 and "retry" in call_body["error"]
    assert ready == 503 and health == 200 and health_body["caught_up"] is False
    assert discovery == 200  # the EHR may still discover the service
    latest.update(orjson.dumps(score()))
    caught_up = True
    (call, call_body, _), (ready, _, _), (health, health_body, _), _ = asyncio.run(calls())
    assert call == 200 and call_body["cards"][0]["summary"].startswith("Deterioration risk HIGH")
    assert ready == 200 and health_body["caught_up"] is True


# --- over real HTTP, fed from the real broker -------------------------------------------------------------


def publish(settings, topic: str, records: list[dict]) -> None:
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 1})
    for r in records:
        producer.produce(topic, key=r["patient_id"].encode(), value=orjson.dumps(r))
    assert producer.flush(30) == 0


def ask(base: str, patient_id: str) -> httpx.Response:
    return httpx.post(f"{base}/cds-services/wardwatch-deterioration", timeout=5,
                      json={"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                            "context": {"userId": "Practitioner/1", "patientId": patient_id},
                            "prefetch": prefetched(patient_id)})


def wait_for_card(base: str, patient_id: str, proc, expect, timeout_s: float = 60.0) -> dict:
    """Ask until the answer satisfies `expect(cards)` (the service catches up on the topic)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wardwatch cds exited with code {proc.returncode}")
        try:
            answer = ask(base, patient_id)
            if answer.status_code == 503:  # still reading the scores topic since its start
                last = answer.json()
            else:
                last = answer.json()["cards"]
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
        # scored in 2024: shown today as the old score it is
        assert rule["summary"] == "Deterioration risk MEDIUM (NEWS2 5), scored >99 d ago: NOT CURRENT"

        discovery = httpx.get(f"{base}/cds-services", timeout=5).json()
        assert discovery["services"] == [{
            "id": "wardwatch-deterioration", "hook": "patient-view", "title": "wardwatch deterioration risk",
            "description": discovery["services"][0]["description"],
            "prefetch": {"patient": "Patient/{{context.patientId}}"}}]
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


@pytest.mark.integration
def test_the_feed_is_caught_up_only_once_the_last_record_of_a_big_last_batch_is_read(settings):
    """Tansu reports a partition's end as its last record batch's base + 1: a feed that trusted it was
    ready 500 records into a 2,000-record batch, and for ~90 ms answered "no card" for its last patient."""
    import threading

    from streams.cds import ScoresFeed

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 500, "compression.type": "lz4",
                         "batch.num.messages": 100_000, "batch.size": 1_000_000})
    records = [score(f"other-{i}", i % 600, tier="low", probability=0.1) for i in range(2_000)]
    for r in [*records, score("p-late", 30, tier="high", probability=0.91)]:
        producer.produce(topics.scores, partition=0, key=r["patient_id"].encode(), value=orjson.dumps(r))
    assert producer.flush(30) == 0

    latest = LatestScores.empty()
    present_when_ready = []

    class Snapshot(threading.Event):
        def set(self):
            present_when_ready.append("p-late" in latest.by_patient)
            super().set()

    feed = ScoresFeed(settings, topics.scores, latest)
    feed.caught_up = Snapshot()
    feed.start()
    try:
        assert feed.caught_up.wait(60), feed.error
    finally:
        feed.stop_event.set()
        feed.join(10)
    assert present_when_ready == [True]


@pytest.mark.integration
def test_the_broker_says_a_feed_is_at_its_end_even_with_a_partition_it_never_read_from(settings):
    """The idle rule's question to the broker: a partition nothing was read from has no position yet
    (-1001); it is at its end when the broker holds nothing there. It answered "no" for ever."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.cds import ScoresFeed

    topics = topics_for(settings)
    ensure_topics(settings, topics)
    producer = Producer(settings.kafka_client_config())
    for i in range(10):
        producer.produce(topics.scores, partition=0, value=orjson.dumps(score(f"p-{i}")))
    assert producer.flush(30) == 0
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-end",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        partitions = sorted(consumer.list_topics(topics.scores, timeout=30).topics[topics.scores].partitions)
        assert len(partitions) > 1  # the others stay empty
        tps = [TopicPartition(topics.scores, p) for p in partitions]
        consumer.assign([TopicPartition(topics.scores, p, 0) for p in partitions])
        assert not ScoresFeed._at_end(consumer, tps)  # nothing read yet
        read, deadline = 0, time.monotonic() + 30
        while read < 10 and time.monotonic() < deadline:
            read += sum(1 for m in consumer.consume(num_messages=100, timeout=0.5) if m.error() is None)
        assert read == 10
        assert ScoresFeed._at_end(consumer, tps)
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_feed_of_a_missing_topic_stops_the_service_instead_of_serving_no_card_for_everyone(settings, monkeypatch):
    import signal

    import streams.cds
    from streams.cds import ScoresFeed

    signals = []
    monkeypatch.setattr(streams.cds.os, "kill", lambda pid, sig: signals.append(sig))  # the service's own stop
    feed = ScoresFeed(settings, f"{settings.topic_prefix}.no-such-scores", LatestScores.empty())
    feed.start()
    feed.join(60)
    assert not feed.is_alive() and not feed.caught_up.is_set()
    assert "does not exist" in str(feed.error) and signals == [signal.SIGTERM]


@pytest.mark.integration
def test_a_restarted_cds_service_never_answers_no_card_for_a_scored_patient(settings, tmp_path):
    """After a (re)start the service re-reads the whole scores topic: until it is read to the end it
    had at start, a call for a patient whose high score sits at the end is 503, never `{"cards": []}`."""
    settings = settings.model_copy(update={"cds_port": 0, "metrics_port": free_port()})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    publish(settings, topics.scores, [score(f"other-{i}", i % 600, tier="low", probability=0.1)
                                      for i in range(20_000)])
    publish(settings, topics.scores, [score("p-late", 30, tier="high", probability=0.91)])

    proc, port = start_http_service(["cds"], settings, tmp_path / "cds.log")
    base, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{settings.metrics_port}"
    answers = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"no card for p-late within 60 s: {answers[-3:]}"
            response = ask(base, "p-late")
            answers.append((response.status_code, response.json()))
            if response.status_code == 200:
                break
            time.sleep(0.02)
        assert httpx.get(f"{metrics}/readyz", timeout=5).status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    finally:
        stop_service(proc)
    status, body = answers[-1]
    assert body["cards"] and "HIGH" in body["cards"][0]["summary"], answers[-1]
    assert all(status == 503 for status, _ in answers[:-1]), answers[:5]


@pytest.mark.integration
def test_cds_service_with_client_keys_answers_only_signed_calls(settings, tmp_path, ehr_key):
    settings = settings.model_copy(update={
        "cds_port": 0, "cds_jwks_file": write_jwks(tmp_path / "jwks.json", ehr_key), "cds_issuers": [ISSUER],
        "cds_audience": AUDIENCE})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    publish(settings, topics.scores, [score("p-9", 0, tier="high", probability=0.91)])

    proc, port = start_http_service(["cds"], settings, tmp_path / "cds.log")
    base = f"http://127.0.0.1:{port}"
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p-9"},
            "prefetch": prefetched("p-9")}
    try:
        deadline, cards = time.monotonic() + 60, []
        while not cards and time.monotonic() < deadline:  # (a new token each call: a jti is used once)
            signed_call = httpx.post(f"{base}/cds-services/{SERVICE_ID}", json=body, timeout=5,
                                     headers={"Authorization": f"Bearer {signed(ehr_key)}"})
            assert signed_call.status_code in (200, 503), signed_call.text  # 503: still reading the scores
            cards = signed_call.json().get("cards")
            time.sleep(0.2)
        assert cards and "probability 0.91" in cards[0]["summary"]
        anonymous = httpx.post(f"{base}/cds-services/{SERVICE_ID}", json=body, timeout=5)
        assert anonymous.status_code == 401 and "cards" not in anonymous.json()
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert httpx.get(f"{base}/cds-services", timeout=5).status_code == 200  # discovery: no patient data
    finally:
        stop_service(proc)
    log = (tmp_path / "cds.log").read_text()
    assert "CDS client authentication: signed JWT required" in log and ISSUER not in log


# --- client keys follow the JWK Set file: rotation and revocation without a restart -----------------------

NEW_KID = "ehr-2025"


def write_keys(path, *pairs, atomic: bool = True):
    """The JWK Set of (private key, kid) pairs' public halves; atomic: written beside and renamed over
    (what an operator's `mv` or a ConfigMap update does), else rewritten in place."""
    keys = [orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())) | {"kid": kid, "use": "sig"}
            for k, kid in pairs]
    if atomic:
        spare = path.with_name(path.name + ".new")
        spare.write_bytes(orjson.dumps({"keys": keys}))
        spare.replace(path)
    else:
        path.write_bytes(orjson.dumps({"keys": keys}))
    return path


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rotating(ehr_key, tmp_path, clean_env):
    """(auth, jwks path, clock): client auth on a JWK Set file holding ehr_key, with a clock the test moves."""
    from wardwatch.settings import Settings

    path = write_keys(tmp_path / "jwks.json", (ehr_key, KID))
    clock = Clock()
    settings = Settings(cds_host="0.0.0.0", cds_jwks_file=path, cds_issuers=ISSUER, cds_audience=AUDIENCE,
                        cds_jwks_check_s=5)
    return load_client_auth(settings, clock=clock), path, clock


def status_of(scored, auth, key, kid=KID) -> int:
    [(status, _, _)] = call(scored, auth, {"Authorization": f"Bearer {signed(key, kid=kid)}"})
    return status


def test_a_rotated_key_verifies_and_a_revoked_one_stops_without_a_restart(scored, rotating, ehr_key):
    auth, path, clock = rotating
    new_key = ec.generate_private_key(ec.SECP384R1())
    assert status_of(scored, auth, ehr_key) == 200 and status_of(scored, auth, new_key, NEW_KID) == 401
    clock.now += 5
    assert status_of(scored, auth, ehr_key) == 200  # the periodic look: nothing changed

    write_keys(path, (ehr_key, KID), (new_key, NEW_KID))  # the EHR publishes its next key beside the old one
    clock.now += 1  # before the next periodic look: the unknown kid makes the one extra look, and finds it
    assert status_of(scored, auth, new_key, NEW_KID) == 200
    assert status_of(scored, auth, ehr_key) == 200  # both verify while the EHR switches

    write_keys(path, (new_key, NEW_KID), atomic=False)  # the old key revoked (the file rewritten in place)
    clock.now += 5
    assert status_of(scored, auth, ehr_key) == 401
    assert status_of(scored, auth, new_key, NEW_KID) == 200
    assert auth.keys.counters()["client_keys"]["reloads"] == 2
    assert auth.keys.gauges() == {"client_keys": {"loaded": 1, "file_unusable": 0}}


def test_a_revoked_key_keeps_verifying_no_longer_than_the_interval(scored, rotating, ehr_key):
    auth, path, clock = rotating
    other = ec.generate_private_key(ec.SECP384R1())
    write_keys(path, (other, NEW_KID))
    clock.now += 4.9  # the file is not looked at before the interval: a known kid costs no stat
    assert status_of(scored, auth, ehr_key) == 200
    clock.now += 0.1
    assert status_of(scored, auth, ehr_key) == 401


BROKEN = {
    "not JSON": lambda path, key: path.write_text('{"keys": [{"kty": "EC", "crv": "P-384", "x'),
    "removed": lambda path, key: path.unlink(),
    "no keys": lambda path, key: path.write_text('{"keys": []}'),
    "a private key": lambda path, key: path.write_bytes(orjson.dumps({"keys": [
        orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(key)) | {"kid": NEW_KID}]})),
    "unreadable": lambda path, key: path.mkdir() if path.unlink() is None else None,  # a directory now
    "a kty list": lambda path, key: path.write_bytes(orjson.dumps({"keys": [  # was a TypeError: a 500 per look
        orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": NEW_KID, "kty": ["EC"]}]})),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_new_file_keeps_the_last_good_keys_in_one_log_line(case, scored, rotating, ehr_key, caplog):
    auth, path, clock = rotating
    new_key = ec.generate_private_key(ec.SECP384R1())
    BROKEN[case](path, new_key)
    caplog.set_level("INFO", logger="streams.cds")
    for _ in range(3):  # three intervals: the same broken file is reported once
        clock.now += 5
        assert status_of(scored, auth, ehr_key) == 200
    [line] = [r for r in caplog.records if r.name == "streams.cds"]
    assert line.levelname == "ERROR" and line.getMessage().startswith("CDS client keys NOT reloaded")
    assert "still verifying with the 1 key(s) loaded before" in line.getMessage()
    public = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(ehr_key))
    secret = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(new_key))
    for material in (public["x"], public["y"], secret["x"], secret["d"]):
        assert material not in line.getMessage()
    assert auth.keys.counters()["client_keys"]["reload_failures"] == 1
    assert auth.keys.gauges()["client_keys"]["file_unusable"] == 1

    if path.is_dir():
        path.rmdir()
    write_keys(path, (new_key, NEW_KID))  # fixed: the new file's keys, and only those
    clock.now += 5
    assert status_of(scored, auth, new_key, NEW_KID) == 200 and status_of(scored, auth, ehr_key) == 401
    assert auth.keys.gauges() == {"client_keys": {"loaded": 1, "file_unusable": 0}}
    # (its own records: with the root logger at INFO, as a CLI command left it, aiohttp's access lines come too)
    assert "CDS client keys reloaded" in [r for r in caplog.records if r.name == "streams.cds"][-1].getMessage()


def test_a_read_error_that_passes_is_read_again_at_the_next_look(scored, rotating, ehr_key, monkeypatch):
    """An I/O error reading a changed, valid file (EIO, EMFILE, a permission being fixed) may pass: the
    file is read again at the next look, not only once it changes again (the new key got 401 for good)."""
    import errno
    from pathlib import Path

    auth, path, clock = rotating
    new_key = ec.generate_private_key(ec.SECP384R1())
    write_keys(path, (new_key, NEW_KID))
    real_read = Path.read_bytes
    failing = {"left": 1}

    def flaky_read(self):
        if self == path and failing["left"]:
            failing["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", flaky_read)
    clock.now += 5
    assert status_of(scored, auth, new_key, NEW_KID) == 401 and status_of(scored, auth, ehr_key) == 200
    assert auth.keys.gauges()["client_keys"]["file_unusable"] == 1
    clock.now += 5  # the same file, readable now
    assert status_of(scored, auth, new_key, NEW_KID) == 200 and status_of(scored, auth, ehr_key) == 401
    assert auth.keys.gauges()["client_keys"]["file_unusable"] == 0
    assert auth.keys.counters()["client_keys"]["reload_failures"] == 1


def test_no_token_makes_the_service_touch_the_disk_per_request(scored, rotating, ehr_key, monkeypatch):
    from streams.cds import ClientKeys

    auth, path, clock = rotating
    touched = {"stat": 0, "read": 0}

    def counting(name):
        real = getattr(ClientKeys, name)

        def spy(self, *args):
            touched[name.strip("_")] += 1
            return real(self, *args)
        return spy

    monkeypatch.setattr(ClientKeys, "_stat", counting("_stat"))
    monkeypatch.setattr(ClientKeys, "_read", counting("_read"))
    unknown = [{"Authorization": f"Bearer {signed(ehr_key, kid=f'probe-{i}')}"} for i in range(40)]
    valid = [{"Authorization": f"Bearer {signed(ehr_key)}"} for _ in range(40)]
    clock.now += 5  # one interval has passed: one look is due

    async def go():
        answers = []
        async with TestClient(TestServer(make_app(scored, auth, ready=lambda: True))) as client:
            for headers in (h for pair in zip(unknown, valid) for h in pair):
                response = await client.post(f"/cds-services/{SERVICE_ID}", headers=headers, json={
                    "hook": "patient-view", "context": {"patientId": "p-1"}, "prefetch": prefetched("p-1")})
                answers.append(response.status)
        return answers

    answers = asyncio.run(go())
    assert answers == [401, 200] * 40
    # 80 calls in one interval, 40 naming unknown kids: the periodic look and the one an unknown kid may
    # add, each a stat() of an unchanged file; nothing read
    assert touched == {"stat": 2, "read": 0}
    write_keys(path, (ehr_key, KID), atomic=False)
    clock.now += 5
    asyncio.run(go())
    assert touched == {"stat": 4, "read": 1}  # the changed file is read once


@pytest.mark.integration
def test_cds_service_follows_its_jwks_file_without_a_restart(settings, tmp_path, ehr_key):
    """The real `wardwatch cds` process: a rotated key verifies, a revoked one stops, a broken file keeps
    the last good keys with one log line and a metric, all without a restart."""
    jwks = write_keys(tmp_path / "jwks.json", (ehr_key, KID))
    settings = settings.model_copy(update={
        "cds_port": 0, "cds_jwks_file": jwks, "cds_issuers": [ISSUER], "cds_audience": AUDIENCE,
        "cds_jwks_check_s": 1.0, "metrics_port": 0})
    new_key = ec.generate_private_key(ec.SECP384R1())
    log_path = tmp_path / "cds.log"
    proc, port = start_http_service(["cds"], settings, log_path)
    base = f"http://127.0.0.1:{port}"
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p-9"},
            "prefetch": prefetched("p-9")}

    def status(key, kid=KID) -> int:
        return httpx.post(f"{base}/cds-services/{SERVICE_ID}", json=body, timeout=5,
                          headers={"Authorization": f"Bearer {signed(key, kid=kid)}"}).status_code

    def until(expected: int, key, kid=KID, timeout_s: float = 10.0) -> float:
        """Seconds until a call signed by `key` gets `expected` (a new token each call)."""
        start = time.monotonic()
        while (got := status(key, kid)) != expected:
            assert time.monotonic() - start < timeout_s, f"still {got} after {timeout_s}s"
            assert proc.poll() is None, "wardwatch cds exited"
            time.sleep(0.1)
        return time.monotonic() - start

    def metrics() -> str:
        lines = [orjson.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        [metrics_port] = [e["port"] for e in lines if e["msg"] == "metrics and health endpoints listening"]
        return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:  # the scores topic read (503 before)
            assert time.monotonic() < deadline and proc.poll() is None, "wardwatch cds never became ready"
            time.sleep(0.1)
        assert status(ehr_key) == 200 and status(new_key, NEW_KID) == 401
        write_keys(jwks, (ehr_key, KID), (new_key, NEW_KID))  # rotation: the new key beside the old
        assert until(200, new_key, NEW_KID) < 3
        assert status(ehr_key) == 200

        write_keys(jwks, (new_key, NEW_KID))  # revocation of the old key
        assert until(401, ehr_key) < 3
        assert status(new_key, NEW_KID) == 200

        jwks.write_text('{"keys": [')  # a half-written file: the last good keys stay
        deadline = time.monotonic() + 10
        while "CDS client keys NOT reloaded" not in log_path.read_text():
            assert time.monotonic() < deadline, "the broken file was never noticed"
            assert status(new_key, NEW_KID) == 200
            time.sleep(0.2)
        for _ in range(15):  # a few more intervals: still the old keys, still one line
            assert status(new_key, NEW_KID) == 200 and status(ehr_key) == 401
            time.sleep(0.2)
        scraped = metrics()
        assert 'wardwatch_counter_total{counter="client_keys.reload_failures",service="cds"} 1.0' in scraped
        assert 'wardwatch_gauge{gauge="client_keys.file_unusable",service="cds"} 1.0' in scraped
        assert 'wardwatch_counter_total{counter="client_keys.reloads",service="cds"} 2.0' in scraped

        write_keys(jwks, (ehr_key, KID))  # fixed (and the old key trusted again)
        until(200, ehr_key)
        assert 'wardwatch_gauge{gauge="client_keys.file_unusable",service="cds"} 0.0' in metrics()
        assert proc.poll() is None  # the same process throughout
    finally:
        stop_service(proc)
    text = log_path.read_text()
    assert text.count("CDS client keys NOT reloaded") == 1 and text.count("CDS client keys reloaded") == 3
    public = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(new_key.public_key()))
    assert public["x"] not in text and ISSUER not in text


EHR_APP = "https://ehr-app.example.org"  # a browser-based CDS client's origin


def browser(scored, auth, origins, *requests) -> list[tuple[int, dict]]:
    """What a browser on EHR_APP (or another origin) sees: [(status, headers)] of each (method, path,
    headers) sent to a service allowing `origins`."""
    async def go():
        answers = []
        app = make_app(scored, auth, ready=lambda: True, cors_origins=origins)
        async with TestClient(TestServer(app)) as client:
            for method, path, headers in requests:
                body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": "p-1"},
                        "prefetch": prefetched("p-1")} if method == "POST" else None
                response = await client.request(method, path, headers=headers, json=body)
                answers.append((response.status, dict(response.headers)))
        return answers
    return asyncio.run(go())


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def test_a_browser_app_on_an_allowed_origin_can_call_the_service_with_its_token(scored, client_auth, ehr_key):
    """CDS Hooks: browser-based CDS clients need CORS. The preflight allows the POST with its Authorization
    header; the answer names the origin (else the browser withholds the card), and a 401's challenge is
    readable by the app."""
    service = f"/cds-services/{SERVICE_ID}"
    bearer = {"Origin": EHR_APP, "Authorization": f"Bearer {signed(ehr_key)}"}
    (pre, pre_h), (ok, ok_h), (denied, denied_h), (found, found_h) = browser(
        scored, client_auth, [EHR_APP], ("OPTIONS", service, {"Origin": EHR_APP} | PREFLIGHT),
        ("POST", service, bearer), ("POST", service, {"Origin": EHR_APP}),
        ("GET", "/cds-services", {"Origin": EHR_APP}))
    assert pre == 200 and pre_h["Access-Control-Allow-Origin"] == EHR_APP
    assert "POST" in pre_h["Access-Control-Allow-Methods"]
    assert {"AUTHORIZATION", "CONTENT-TYPE"} <= {h.strip().upper() for h in pre_h["Access-Control-Allow-Headers"].split(",")}
    assert "Access-Control-Allow-Credentials" not in pre_h  # the JWT authenticates, never a cookie
    assert ok == 200 and ok_h["Access-Control-Allow-Origin"] == EHR_APP
    assert denied == 401 and denied_h["Access-Control-Allow-Origin"] == EHR_APP
    assert "WWW-AUTHENTICATE" in denied_h["Access-Control-Expose-Headers"].upper()
    assert found == 200 and found_h["Access-Control-Allow-Origin"] == EHR_APP  # discovery too


def test_another_origin_or_no_allowed_origins_gets_no_cors_headers(scored, client_auth, ehr_key):
    """A page on an origin not named (or any page, with none named) cannot read the answers: the browser
    refuses a response without Access-Control-Allow-Origin. A token still decides what a server-side
    caller gets."""
    service = f"/cds-services/{SERVICE_ID}"
    for origins, origin in (([EHR_APP], "https://evil.example.net"), ([], EHR_APP)):
        bearer = {"Authorization": f"Bearer {signed(ehr_key)}"}  # a token is good once
        (pre, pre_h), (post, post_h) = browser(
            scored, client_auth, origins, ("OPTIONS", service, {"Origin": origin} | PREFLIGHT),
            ("POST", service, {"Origin": origin} | bearer))
        assert pre != 200 or "Access-Control-Allow-Origin" not in pre_h
        assert post == 200 and "Access-Control-Allow-Origin" not in post_h


@pytest.mark.parametrize("value", ["*", "https://ehr.example.org/", "ehr.example.org", "https://ehr.example.org/app"])
def test_cors_origins_must_be_exact_web_origins(value, clean_env):
    from pydantic import ValidationError

    from wardwatch.settings import Settings

    clean_env.setenv("WARDWATCH_CDS_CORS_ORIGINS", f"{EHR_APP}, {value}")
    with pytest.raises(ValidationError, match="scheme://host"):
        Settings()
    clean_env.setenv("WARDWATCH_CDS_CORS_ORIGINS", f"{EHR_APP}, http://localhost:3000")
    assert Settings().cds_cors_origins == [EHR_APP, "http://localhost:3000"]


# --- without a prefetch: the Patient read from the call's fhirServer (WARDWATCH_CDS_FHIR_SERVERS) ----------

FHIR_TOKEN = "eyJhbGciOiJSUzM4NCJ9.fhir-access_token~for+wardwatch/1=="  # an RFC 6750 bearer token
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
OUR_MRN = {"type": MR, "system": MRN_SYSTEM, "value": "p-1"}
OTHER_FACILITY_MRN = {"type": MR, "system": "urn:oid:1.2.3.4.5", "value": "p-2"}
NATIONAL_NUMBER = {"system": "urn:ssn", "value": "p-1"}


def fhir_patient(fhir_id: str, *identifiers: dict) -> dict:
    return {"resourceType": "Patient", "id": fhir_id, "identifier": list(identifiers)}


class FakeFhir:
    """The EHR's FHIR server, on a loopback port: GET /fhir/Patient/<id> answers what `answers` holds for the
    id (a resource, or (status, body)); "slow" answers only once `release` is set. Every request it gets is
    kept in `received` as (path, headers)."""

    def __init__(self, answers: dict):
        from aiohttp import web

        self.answers, self.received = answers, []
        self.release = asyncio.Event()

        async def patient(request: web.Request) -> web.StreamResponse:
            self.received.append((request.path, dict(request.headers)))
            fhir_id = request.match_info["id"]
            if fhir_id == "slow":
                await self.release.wait()
            if fhir_id == "moved":  # a redirect to a resource that would give a card: never followed
                raise web.HTTPFound("/elsewhere/Patient/fhir-a1")
            if fhir_id == "fhir-streamed":  # a body without Content-Length that never ends: read up to the bound
                response = web.StreamResponse(headers={"Content-Type": "application/fhir+json"})
                await response.prepare(request)
                await response.write(b'{"resourceType": "Patient", "id": "fhir-streamed", "text": "')
                while not self.release.is_set():
                    await response.write(b"x" * 65536)
                return response
            answer = self.answers.get(fhir_id, (404, {"resourceType": "OperationOutcome", "issue": []}))
            status, body = answer if isinstance(answer, tuple) else (200, answer)
            # a session cookie of this caller's: sent back on a later call, it could stand in for its token
            return web.Response(status=status, body=body if isinstance(body, bytes) else orjson.dumps(body),
                                content_type="application/fhir+json", headers={"Set-Cookie": "session=ehr-user-1"})

        self.app = web.Application()
        self.app.router.add_get("/fhir/Patient/{id}", patient)
        self.app.router.add_get("/elsewhere/Patient/{id}", patient)


FHIR_ANSWERS = {
    "fhir-a1": fhir_patient("fhir-a1", NATIONAL_NUMBER, OUR_MRN),  # MRN p-1, scored HIGH
    "fhir-two-mrns": fhir_patient("fhir-two-mrns", OTHER_FACILITY_MRN, OUR_MRN),  # p-2 (LOW) first, then p-1
    "fhir-no-mrn": fhir_patient("fhir-no-mrn", NATIONAL_NUMBER),  # p-1, but not typed MR: no MRN
    "fhir-other-id": fhir_patient("fhir-a1", OUR_MRN),  # another Patient than the one asked for
    "fhir-observation": {"resourceType": "Observation", "id": "fhir-observation"},
    "fhir-html": (200, b"<html>login</html>"),
    "fhir-huge": fhir_patient("fhir-huge", OUR_MRN) | {"text": {"div": "x" * (2 << 20)}},
    "fhir-forbidden": (403, {"resourceType": "OperationOutcome", "issue": []}),
    "slow": fhir_patient("slow", OUR_MRN),
}


def call_reading_fhir(patient_id: str, *, servers=None, timeout_s: float = 5.0, mrn_system: str | None = None,
                      calls: int = 1, host: str = "127.0.0.1", **request) -> tuple[int, dict, list, float]:
    """POST a patient-view call without prefetch, with fhirServer (the fake's base URL, with a trailing slash)
    and fhirAuthorization, to a service that may read from `servers` (default: the fake's base URL), `calls`
    times; `host` names the fake in the URLs. (status, answer, the requests the FHIR server got, seconds the
    call took) of the last call."""
    latest = LatestScores.empty()
    latest.update(orjson.dumps(score("p-1", minute=5, tier="high")))
    latest.update(orjson.dumps(score("p-2", minute=5, tier="low", probability=0.1)))

    async def go():
        fhir = FakeFhir(FHIR_ANSWERS)
        async with TestServer(fhir.app, host="127.0.0.1") as server:
            base = f"http://{host}:{server.port}/fhir"
            body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": {"patientId": patient_id},
                    "fhirServer": base + "/",
                    "fhirAuthorization": {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                          "scope": "patient/Patient.read", "subject": "wardwatch"}} | request
            app = make_app(latest, ready=lambda: True, mrn_system=mrn_system, fhir_timeout_s=timeout_s,
                           fhir_servers=[base] if servers is None else servers)
            async with TestClient(TestServer(app)) as client:
                for _ in range(calls):
                    started = time.monotonic()
                    response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
                    took = time.monotonic() - started
                    answer = await response.json()
            fhir.release.set()
            return response.status, answer, fhir.received, took
    return asyncio.run(go())


def test_without_a_prefetch_the_patient_read_from_the_fhir_server_keys_the_card_by_its_mrn():
    """CDS Hooks lets a service read what the EHR did not prefetch from `fhirServer` with `fhirAuthorization`:
    the Patient's MRN (not its FHIR id) finds its card, with the EHR's token sent as a bearer token."""
    for prefetch in ({}, {"prefetch": {}}, {"prefetch": {"patient": None}}, {"prefetch": None}):
        # (localhost: a client keeps no cookie of an IP address's)
        status, answer, received, _ = call_reading_fhir("Patient/fhir-a1", calls=2, host="localhost", **prefetch)
        assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk HIGH"), prefetch
        assert len(received) == 2  # nothing cached: each call reads with its own token
        for path, headers in received:
            assert path == "/fhir/Patient/fhir-a1"
            assert headers["Authorization"] == f"Bearer {FHIR_TOKEN}"
            assert headers["Accept"] == "application/fhir+json"
            assert "Cookie" not in headers  # the first answer's session cookie is not sent back


def test_the_read_patients_mrn_follows_the_prefetch_rule_with_the_mrn_system():
    # the first typed MR without WARDWATCH_MRN_SYSTEM (another facility's p-2: LOW), the EHR's own with it
    status, answer, _, _ = call_reading_fhir("fhir-two-mrns")
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk LOW")
    status, answer, _, _ = call_reading_fhir("fhir-two-mrns", mrn_system=MRN_SYSTEM)
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk HIGH")


def test_a_fhir_server_not_allow_listed_is_never_called():
    """SSRF: the request names the server; only the operator's list decides whether it is called. Not listed:
    412 saying to list it; no list (the default): the 412 of a call without prefetch, as before."""
    status, answer, received, _ = call_reading_fhir("fhir-a1", servers=["https://ehr.example.org/fhir"])
    assert status == 412 and "cards" not in answer and received == []
    assert "WARDWATCH_CDS_FHIR_SERVERS" in answer["error"] and "127.0.0.1" in answer["error"]
    status, answer, received, _ = call_reading_fhir("fhir-a1", servers=[])
    assert status == 412 and received == [] and "prefetch" in answer["error"]
    status, answer, received, _ = call_reading_fhir("fhir-a1", fhirServer="http://127.0.0.1:1/fhir" + "x" * 500)
    assert status == 412 and received == [] and len(answer["error"]) < 400  # the URL is not echoed whole


def test_a_prefetched_patient_is_never_read_again():
    # the EHR answered the prefetch (a Patient without MRN, or an OperationOutcome): its answer stands
    for patient in (fhir_patient("fhir-a1", NATIONAL_NUMBER), {"resourceType": "OperationOutcome", "issue": []}):
        status, answer, received, _ = call_reading_fhir("fhir-a1", prefetch={"patient": patient})
        assert status == 412 and received == [] and "cards" not in answer


@pytest.mark.parametrize("patient_id, error", [
    ("fhir-no-mrn", "no MRN"),  # an untyped identifier is no MRN, as in a prefetch
    ("fhir-other-id", "ids differ"),  # its MRN would be another patient's card
    ("fhir-observation", "not a Patient"),
    ("fhir-html", "not JSON"),
    ("fhir-huge", "bytes"),
    ("fhir-streamed", "bytes"),
    ("fhir-missing", "answered 404"),
    ("fhir-forbidden", "answered 403"),  # the token does not reach it
    ("moved", "answered 302"),  # a redirect is not followed
])
def test_a_patient_that_cannot_be_read_or_has_no_mrn_is_a_412_never_no_cards(patient_id, error):
    status, answer, received, _ = call_reading_fhir(patient_id)
    assert status == 412 and "cards" not in answer and error in answer["error"]
    assert patient_id not in answer["error"] and FHIR_TOKEN not in answer["error"]
    assert [path for path, _ in received] == [f"/fhir/Patient/{patient_id}"]  # one GET, nothing elsewhere


def test_a_fhir_server_slower_than_the_timeout_is_a_412_within_the_timeout():
    status, answer, received, took = call_reading_fhir("slow", timeout_s=0.5)
    assert status == 412 and "WARDWATCH_CDS_FHIR_TIMEOUT_S" in answer["error"] and len(received) == 1
    assert took < 2.5  # the EHR gets its answer, not a hung call


@pytest.mark.parametrize("patient_id", ["fhir-a1/x", "Patient/../Observation/1", "..", "Patient/..", "1/_history/2",
                                        "1?_format=xml", "a%2Fb", "x" * 65])
def test_a_patient_id_that_is_not_a_fhir_id_is_a_400_and_no_request(patient_id):
    status, answer, received, _ = call_reading_fhir(patient_id)
    assert status == 400 and "FHIR id" in answer["error"] and received == []


@pytest.mark.parametrize("authorization", [
    {"access_token": FHIR_TOKEN + "\r\nX-Injected: 1", "token_type": "Bearer"},
    {"access_token": FHIR_TOKEN + "\n", "token_type": "Bearer"},
    {"access_token": "", "token_type": "Bearer"},
    {"access_token": FHIR_TOKEN, "token_type": "MAC"},
    {"token_type": "Bearer"},
    "Bearer " + FHIR_TOKEN,
])
def test_a_malformed_fhir_authorization_is_a_400_and_no_request(authorization):
    status, answer, received, _ = call_reading_fhir("fhir-a1", fhirAuthorization=authorization)
    assert status == 400 and "fhirAuthorization" in answer["error"] and received == []
    assert FHIR_TOKEN not in answer["error"]


def test_reading_the_patient_logs_neither_the_token_nor_the_patient_id(caplog):
    caplog.set_level("DEBUG")
    for patient_id in ("fhir-a1", "fhir-no-mrn", "fhir-missing", "fhir-html"):
        call_reading_fhir(patient_id)
    ours = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]  # (the fake server's own log)
    assert any("no MRN for a call from its fhirServer http://127.0.0.1" in line for line in ours)
    for line in ours:
        assert FHIR_TOKEN not in line and "fhir-" not in line, line


@pytest.mark.parametrize("value, error", [("http://ehr.example.org/fhir", "https"), ("ehr.example.org/fhir", "base URL"),
                                          ("https://user:pw@ehr.example.org/fhir", "base URL"),
                                          ("https://ehr.example.org/fhir?_format=json", "base URL")])
def test_fhir_servers_must_be_https_base_urls(value, error, clean_env):
    from pydantic import ValidationError

    from wardwatch.settings import Settings

    clean_env.setenv("WARDWATCH_CDS_FHIR_SERVERS", f"https://ehr.example.org/fhir/r4, {value}")
    with pytest.raises(ValidationError, match=error):
        Settings()
    clean_env.setenv("WARDWATCH_CDS_FHIR_SERVERS", "https://ehr.example.org/fhir/r4/, http://localhost:8080/fhir")
    assert Settings().cds_fhir_servers == ["https://ehr.example.org/fhir/r4", "http://localhost:8080/fhir"]
    assert Settings().cds_fhir_timeout_s == 5.0


def test_the_prefetched_patients_mrn_is_the_one_the_ingest_keys_its_readings_by():
    """A Patient whose first identifier typed MR is blank and whose second is its MRN: the ingest keys its
    readings by that second one (schemas.fhir.mrn_of), so the card must be asked by it too, not a 412."""
    from schemas.fhir import mrn_of

    patient = {"resourceType": "Patient", "id": "123", "identifier": [
        {"type": {"coding": [{"code": "MR"}]}, "value": "  "}, {"type": {"coding": [{"code": "MR"}]}, "value": "p-1"}]}
    request = {"hook": "patient-view", "context": {"patientId": "123"}, "prefetch": {"patient": patient}}
    assert patient_keys(request) == [mrn_of(patient)] == ["p-1"]


# --- fhirAuthorization.patient: the patient the EHR's token is restricted to -------------------------------


@pytest.mark.parametrize("scoped, error", [("fhir-b2", "is not `context.patientId`"),
                                           ("Patient/fhir-b2", "is not `context.patientId`"),
                                           ("Patient/../fhir-a1", "not a FHIR id"), ("../fhir-a1", "not a FHIR id"),
                                           (123, "not a FHIR id"), ("", "not a FHIR id")])
def test_a_token_restricted_to_another_patient_than_the_context_is_a_400_and_no_request(scoped, error, caplog):
    """CDS Hooks: fhirAuthorization.patient is the FHIR id of the patient a patient/ scoped token is for. Another
    patient than context.patientId (or not an id): the EHR is confused about who is in view, so no card for
    either, whether the Patient is prefetched or would be read, nothing read, and neither id said or logged."""
    caplog.set_level("DEBUG")
    authorization = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                     "scope": "patient/Patient.read", "subject": "wardwatch", "patient": scoped}
    for prefetch in ({}, {"prefetch": prefetched("fhir-a1", "p-1")}):
        status, answer, received, _ = call_reading_fhir("fhir-a1", fhirAuthorization=authorization, **prefetch)
        assert status == 400 and "cards" not in answer and received == [], prefetch
        assert error in answer["error"] and "fhirAuthorization.patient" in answer["error"]
        assert "fhir-a1" not in answer["error"] and "fhir-b2" not in answer["error"]
    ours = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]
    assert not [line for line in ours if "fhir-a1" in line or "fhir-b2" in line]


def test_a_token_restricted_to_the_patient_in_context_reads_it_as_before():
    authorization = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                     "scope": "patient/Patient.read", "subject": "wardwatch", "patient": "fhir-a1"}
    for patient_id in ("fhir-a1", "Patient/fhir-a1"):
        status, answer, received, _ = call_reading_fhir(patient_id, fhirAuthorization=authorization)
        assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk HIGH")
        assert [path for path, _ in received] == ["/fhir/Patient/fhir-a1"]
        # sent as a reference, as some EHRs do (CDS Hooks says an id): the same patient, so no reason to refuse
        status, answer, received, _ = call_reading_fhir(patient_id,
                                                        fhirAuthorization=authorization | {"patient": "Patient/fhir-a1"})
        assert status == 200 and answer["cards"] and [path for path, _ in received] == ["/fhir/Patient/fhir-a1"]
    status, answer, _, _ = call_reading_fhir("fhir-a1", fhirAuthorization=authorization | {"patient": None})
    assert status == 200 and answer["cards"]  # null: not sent (a token with user/ scopes)


# --- WARDWATCH_FHIR_PROXY_URL: a FHIR server reachable only through an HTTP proxy ---------------------------


def call_through_proxy(proxy_url_of, patient_id: str = "fhir-a1") -> tuple[int, dict, list, list]:
    """A call without prefetch whose fhirServer is a loopback port nothing answers on, to a service given
    `proxy_url_of(proxy)` as settings.fhir_proxy_url; the proxy (credentials ward:pa ss) forwards requests for
    that address to the EHR's FHIR server. (status, answer, the proxy's requests, the FHIR server's requests)."""
    from tests.streams.forward_proxy import ForwardProxy
    from wardwatch.broker import closed_port

    latest = LatestScores.empty()
    latest.update(orjson.dumps(score("p-1", minute=5, tier="high")))

    async def go():
        fhir = FakeFhir(FHIR_ANSWERS)
        async with TestServer(fhir.app, host="127.0.0.1") as server:
            with closed_port() as port:
                proxy = ForwardProxy({f"127.0.0.1:{port}": ("127.0.0.1", server.port)}, credentials="ward:pa ss")
                try:
                    base = f"http://127.0.0.1:{port}/fhir"
                    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                            "context": {"patientId": patient_id}, "fhirServer": base,
                            "fhirAuthorization": {"access_token": FHIR_TOKEN, "token_type": "Bearer"}}
                    app = make_app(latest, ready=lambda: True, fhir_servers=[base],
                                   fhir_proxy_url=proxy_url_of(proxy))
                    async with TestClient(TestServer(app)) as client:
                        response = await client.post(f"/cds-services/{SERVICE_ID}", json=body)
                        answer = await response.json()
                finally:
                    proxy.stop()
            return response.status, answer, proxy.requests, fhir.received
    return asyncio.run(go())


def test_with_a_proxy_url_the_patient_is_read_through_that_proxy_with_its_credentials(caplog):
    caplog.set_level("DEBUG")
    status, answer, via_proxy, received = call_through_proxy(lambda p: p.url.replace("http://", "http://ward:pa%20ss@"))
    assert status == 200 and answer["cards"][0]["summary"].startswith("Deterioration risk HIGH")
    [(method, target, credentials)] = via_proxy
    assert method == "GET" and target.endswith("/fhir/Patient/fhir-a1") and credentials == "Basic d2FyZDpwYSBzcw=="
    [(path, headers)] = received  # forwarded by the proxy, with the EHR's token for the FHIR server
    assert path == "/fhir/Patient/fhir-a1" and headers["Authorization"] == f"Bearer {FHIR_TOKEN}"
    assert "Proxy-Authorization" not in headers  # the proxy's credentials are the proxy's only
    assert not [r for r in caplog.records if "pa ss" in r.getMessage() or "pa%20ss" in r.getMessage()]


def test_without_a_proxy_url_no_proxy_is_used_and_wrong_proxy_credentials_are_a_412():
    status, answer, via_proxy, received = call_through_proxy(lambda p: None)
    assert status == 412 and "ClientConnectorError" in answer["error"] and via_proxy == [] and received == []
    status, answer, via_proxy, received = call_through_proxy(lambda p: p.url.replace("http://", "http://ward:wrong@"))
    assert status == 412 and "answered 407" in answer["error"] and "wrong" not in answer["error"]
    assert len(via_proxy) == 1 and received == []
