"""The rest-hook receiver under load (issue #8): a few thousand valid notifications POSTed
concurrently (bounded, loopback) to a real `wardwatch receiver` process, mixed with oversized and
malformed requests. Every notification the receiver acknowledged with 2xx is on the notifications
topic exactly once; a 503 (in-flight bound exceeded) is retried by the client until accepted, as a
FHIR server does; bad requests get 4xx; the receiver's memory stays bounded."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import orjson
import pytest

from streams.topics import ensure_topics, topics_for
from tests.fixtures.ingest.corpus import fhir_bundle
from tests.integration.pipeline import record_figures, rss_kb
from wardwatch.procs import read_to_end, start_http_service, stop_service

NOTIFICATIONS = 3000
CONCURRENCY = 32  # client connections; the receiver handles at most MAX_INFLIGHT at once, so some get 503
MAX_INFLIGHT = 16
MAX_BYTES = 64 * 1024
OVERSIZED, MALFORMED = 100, 200
RSS_BOUND_KB = 500 * 1024  # generous: a leak of the bodies would be several hundred MB
FHIR_JSON = {"Content-Type": "application/fhir+json"}
RETRY_PAUSE_S = 0.05  # a FHIR server honours Retry-After (5 s); the test retries sooner to keep the load on


def notification(n: int) -> bytes:
    """A valid event notification whose Bundle.id names it uniquely, of one of 50 patients."""
    doc = orjson.loads(fhir_bundle("r4b_status_event"))
    doc["id"] = f"load-{n}"
    return orjson.dumps(doc).replace(b"MRN-0001", f"MRN-{n % 50:04d}".encode())


def malformed(n: int) -> bytes:
    kinds = [b"{not json", b"\xff\xfe", orjson.dumps({"resourceType": "Patient", "id": f"p{n}"}),
             orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": []})]
    return kinds[n % len(kinds)]


async def post_until_stored(client: httpx.AsyncClient, url: str, body: bytes, deadline: float) -> tuple[int, int]:
    """POST until a non-503 answer; returns (final status, 503s retried)."""
    retries = 0
    while True:
        response = await client.post(url, content=body, headers=FHIR_JSON)
        if response.status_code != 503:
            return response.status_code, retries
        assert time.monotonic() < deadline, "still answered 503 at the deadline"
        retries += 1
        await asyncio.sleep(RETRY_PAUSE_S)


async def load(url: str, deadline: float) -> dict:
    valid = [("valid", n, notification(n)) for n in range(NOTIFICATIONS)]
    oversized = [("oversized", n, notification(n).replace(b'"history"', b'"history","pad":"' + b"x" * MAX_BYTES + b'"'))
                 for n in range(OVERSIZED)]
    bad = [("malformed", n, malformed(n)) for n in range(MALFORMED)]
    requests = valid + oversized + bad
    random.Random(3).shuffle(requests)  # interleaved, the same order in every run
    gate = asyncio.Semaphore(CONCURRENCY)
    results: list[tuple[str, int, int, int]] = []
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def one(kind: str, n: int, body: bytes) -> None:
            async with gate:
                status, retries = await post_until_stored(client, url, body, deadline)
            results.append((kind, n, status, retries))

        started = time.monotonic()
        await asyncio.gather(*(one(*r) for r in requests))
        seconds = time.monotonic() - started
    return {"results": results, "seconds": seconds}


async def chunked_oversized(url: str) -> int:
    """An oversized body without a Content-Length (chunked): the limit must hold while reading."""
    async def chunks():
        for _ in range(4):
            yield b"x" * MAX_BYTES

    async with httpx.AsyncClient(timeout=30) as client:
        return (await client.post(url, content=chunks(), headers=FHIR_JSON)).status_code


def wait_healthy(base: str, proc, deadline: float) -> None:
    while True:
        assert proc.poll() is None, f"the receiver exited with code {proc.returncode}"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the receiver did not become ready"
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_concurrent_notifications_are_stored_exactly_once_and_bad_ones_refused(settings, tmp_path):
    settings = settings.model_copy(update={"receiver_port": 0, "receiver_max_inflight": MAX_INFLIGHT,
                                           "receiver_max_bytes": MAX_BYTES})
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    deadline = time.monotonic() + 180
    proc, port = start_http_service(["receiver"], settings, tmp_path / "receiver.log")
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/fhir/notifications"
    try:
        wait_healthy(base, proc, deadline)
        rss_before = rss_kb(proc.pid)
        run = asyncio.run(load(url, deadline))
        chunked_status = asyncio.run(chunked_oversized(url))
        rss_after = rss_kb(proc.pid)
        assert proc.poll() is None, (tmp_path / "receiver.log").read_text()[-2000:]
    finally:
        assert stop_service(proc) == 0, (tmp_path / "receiver.log").read_text()[-2000:]

    results = run["results"]
    status_by_kind = {kind: Counter(s for k, _, s, _ in results if k == kind) for kind in ("valid", "oversized", "malformed")}
    assert status_by_kind["valid"] == {200: NOTIFICATIONS}  # every one stored, after retries where needed
    assert status_by_kind["oversized"] == {413: OVERSIZED}
    assert status_by_kind["malformed"] == {400: MALFORMED}
    assert chunked_status == 413

    stored = Counter(orjson.loads(value)["id"] for _, _, _, value in read_to_end(settings, topics.fhir, topics.partitions))
    acknowledged = {f"load-{n}" for kind, n, status, _ in results if kind == "valid" and 200 <= status < 300}
    assert set(stored) == acknowledged  # none lost, nothing unacknowledged stored
    assert set(stored.values()) == {1}  # each exactly once
    dead = read_to_end(settings, topics.deadletter, topics.partitions)
    assert len(dead) == MALFORMED  # every refused body dead-lettered, once

    retried = sum(r for *_, r in results)
    rps = len(results) / run["seconds"]
    print(f"\nreceiver RSS {rss_before / 1024:.0f} MB before, {rss_after / 1024:.0f} MB after {len(results)} requests")
    assert rss_after < RSS_BOUND_KB
    record_figures("receiver_load", {
        "notifications_valid": NOTIFICATIONS, "oversized": OVERSIZED, "malformed": MALFORMED,
        "concurrency": CONCURRENCY, "receiver_max_inflight": MAX_INFLIGHT, "retried_503": retried,
        "stored_on_topic": sum(stored.values()), "lost": len(acknowledged - set(stored)),
        "duplicated": sum(n - 1 for n in stored.values()), "dead_lettered": len(dead),
        "rss_mb_before": round(rss_before / 1024, 1), "rss_mb_after": round(rss_after / 1024, 1),
        "seconds": round(run["seconds"], 1), "requests_per_s": round(rps),
    })


def with_note(body: bytes, note_bytes: int) -> bytes:
    """The notification with a long free-text note on its first Observation (a valid element)."""
    doc = orjson.loads(body)
    first = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Observation")
    first["note"] = [{"text": "x" * note_bytes}]
    return orjson.dumps(doc)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_notification_under_the_default_size_limit_is_stored_or_refused_with_4xx(settings, tmp_path):
    settings = settings.model_copy(update={"receiver_port": 0})  # default receiver_max_bytes
    ensure_topics(settings, topics_for(settings))
    body = with_note(notification(1), 2_000_000)
    assert len(body) < settings.receiver_max_bytes
    proc, port = start_http_service(["receiver"], settings, tmp_path / "receiver.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, time.monotonic() + 60)
        status = httpx.post(f"{base}/fhir/notifications", content=body, headers=FHIR_JSON, timeout=30).status_code
        print(f"\na {len(body)}-byte notification was answered {status}")
    finally:
        stop_service(proc)
    assert status == 200 or 400 <= status < 500
