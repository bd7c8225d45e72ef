"""Backpressure: a flooded server (one running, two waiting) refuses the overflow with 503 and serves the rest."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server_proc import serving

pytestmark = pytest.mark.timeout(300)
RUNNING, WAITING = 1, 2                  # --max-num-seqs, --max-waiting-requests
FLOOD = 8
MAX_TOKENS = 160                         # one request runs for a while, so the whole flood arrives meanwhile


@pytest.fixture(scope="module")
def server(llama_gqa):
    with serving(llama_gqa, "--max-num-seqs", str(RUNNING), "--max-waiting-requests", str(WAITING)) as srv:
        yield srv


def body(i: int, stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": f"Request {i} of the flood says", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def alone(server, i: int) -> str:
    r = httpx.post(server.url + "/v1/completions", json=body(i), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def send(client: httpx.AsyncClient, i: int, stream: bool) -> tuple[int, httpx.Headers, dict | str]:
    """Status, headers and either the JSON body or (streamed and accepted) the concatenated text."""
    async with client.stream("POST", "/v1/completions", json=body(i, stream)) as r:
        raw = await r.aread()
    if not stream or r.status_code != 200:
        return r.status_code, r.headers, httpx.Response(r.status_code, content=raw).json()
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            event = httpx.Response(200, content=line[6:]).json()
            assert "error" not in event, event
            text += event["choices"][0]["text"]
    assert raw.decode().rstrip().endswith("data: [DONE]")
    return r.status_code, r.headers, text


async def flood(url: str, stream: bool) -> list[tuple[int, httpx.Headers, dict | str]]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=FLOOD)) as client:
        return await asyncio.gather(*(send(client, i, stream) for i in range(FLOOD)))


def gauge(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_flood_rejects_the_overflow_and_completes_the_rest(server, stream):
    results = asyncio.run(flood(server.url, stream))
    accepted = [i for i, (status, _, _) in enumerate(results) if status == 200]
    rejected = [i for i, (status, _, _) in enumerate(results) if status != 200]
    # All of the flood arrives while the first request runs: one runs, two wait, the other five are refused.
    assert len(accepted) == RUNNING + WAITING, [status for status, _, _ in results]
    for i in rejected:
        status, headers, err = results[i]
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["code"] == 503 and err["error"]["type"] == "service_unavailable"
        assert err["error"]["message"]
    for i in accepted:
        status, _, got = results[i]
        text = got if stream else got["choices"][0]["text"]
        if not stream:
            assert got["usage"]["completion_tokens"] == MAX_TOKENS
        assert text == alone(server, i), f"request {i} differs from running it alone"
    assert alone(server, rejected[0])                        # after the flood a refused request is served
    deadline = time.time() + 20
    while time.time() < deadline and (gauge(server, "shardserve_num_requests_running")
                                      or gauge(server, "shardserve_num_requests_waiting")):
        time.sleep(0.2)
    assert gauge(server, "shardserve_num_requests_running") == 0
    assert gauge(server, "shardserve_num_requests_waiting") == 0


def test_a_partly_refused_batch_of_prompts_runs_none_of_them(server):
    """Four prompts in one request, room for three: a 503, and the three already queued are withdrawn."""
    batch = dict(body(0), prompt=[f"Batch prompt {i}" for i in range(RUNNING + WAITING + 1)], max_tokens=240)
    r = httpx.post(server.url + "/v1/completions", json=batch, timeout=120)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == 503
    # Left queued, the three would run for seconds (240 tokens each, one at a time); withdrawn, they are gone now.
    deadline = time.time() + 1.0
    while time.time() < deadline and (gauge(server, "shardserve_num_requests_running")
                                      or gauge(server, "shardserve_num_requests_waiting")):
        time.sleep(0.05)
    assert gauge(server, "shardserve_num_requests_running") == 0
    assert gauge(server, "shardserve_num_requests_waiting") == 0
    assert alone(server, 0)
