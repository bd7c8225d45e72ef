"""A bounded load test against a real tp=2 server on loopback: 1,000 requests from 64 concurrent clients,
mixed prompt/output lengths, streaming and not, completions and chat, 10% invalid, 5% disconnecting
mid-stream. Every valid request must return exactly the text of the same greedy request run alone through
the offline LLM (uni executor, no batching with anything else); every invalid one a 4xx with an OpenAI error
body; no 5xx; the engine empty afterwards (from /metrics) and the server's RSS growth under 10%."""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import pytest

from rel_util import vm_rss_kib
from server_proc import ServerProcess
from shardserve import LLM, SamplingParams

N_REQUESTS = 1000
CONCURRENCY = 64
WARMUP = 64
WORDS = ("the cat sat on a mat while seven quiet rivers ran past old stone bridges under grey "
         "autumn skies and every traveller paused to count the birds").split()
BAD = [
    (b"{not json", 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    ({"model": "gpt-17", "prompt": "x"}, 404),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400),
    ({"model": "tiny", "prompt": [1] + [5] * 300}, 400),
    ({"model": "tiny", "prompt": [1, 99999]}, 400),
    ({"model": "tiny", "prompt": [1, -3]}, 400),
    ({"model": "tiny", "prompt": []}, 400),
    ({"model": "tiny"}, 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": 400}, 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    ({"model": "tiny", "prompt": "x", "stream": True, "logprobs": 99}, 400),
    ({"model": "tiny", "messages": []}, 400),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
]


def build_plan(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 5, 12, 30, 60)))) for _ in range(40)]
    plan = []
    for i in range(N_REQUESTS):
        r = rng.random()
        if r < 0.10:
            body, status = BAD[i % len(BAD)]
            path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
            plan.append({"kind": "invalid", "path": path, "body": body, "status": status})
        elif r < 0.15:
            plan.append({"kind": "disconnect", "path": "/v1/completions",
                         "body": {"model": "tiny", "prompt": rng.choice(prompts), "max_tokens": 64, "temperature": 0,
                                  "ignore_eos": True, "stream": True}})
        else:
            chat = rng.random() < 0.25
            body = {"model": "tiny", "max_tokens": rng.choice((4, 8, 12, 16)), "temperature": 0,
                    "stream": rng.random() < 0.5}
            if chat:
                body["messages"] = [{"role": "user", "content": rng.choice(prompts)}]
            else:
                body["prompt"] = rng.choice(prompts)
            plan.append({"kind": "chat" if chat else "completion", "body": body,
                         "path": "/v1/chat/completions" if chat else "/v1/completions"})
    return plan


def expected_texts(llm: LLM, plan: list[dict]) -> dict:
    """Each distinct valid request run alone (one at a time) through the offline engine."""
    out = {}
    for item in plan:
        if item["kind"] not in ("chat", "completion"):
            continue
        b = item["body"]
        key = _key(item)
        if key in out:
            continue
        p = SamplingParams(temperature=0.0, max_tokens=b["max_tokens"])
        if item["kind"] == "chat":
            res = llm.chat(b["messages"], p, use_tqdm=False)[0]
        else:
            res = llm.generate(b["prompt"], p, use_tqdm=False)[0]
        out[key] = (res.outputs[0].text, res.outputs[0].finish_reason)
    return out


def _key(item: dict) -> tuple:
    b = item["body"]
    return item["kind"], json.dumps(b.get("messages") or b.get("prompt")), b["max_tokens"]


async def run_one(client: httpx.AsyncClient, item: dict) -> dict:
    body = item["body"]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if item["kind"] == "disconnect":
        async with client.stream("POST", item["path"], content=content, headers=headers) as r:
            got = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got >= 2:
                        break                                  # hang up mid-stream
        return {"status": r.status_code}
    if isinstance(body, dict) and body.get("stream"):
        async with client.stream("POST", item["path"], content=content, headers=headers) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "json": json.loads(await r.aread())}
            text, finish, errors = "", None, []
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                for c in event["choices"]:
                    text += c["text"] if "text" in c else (c["delta"].get("content") or "")
                    finish = c.get("finish_reason") or finish
            return {"status": r.status_code, "text": text, "finish": finish, "errors": errors}
    r = await client.post(item["path"], content=content, headers=headers)
    data = r.json()
    if r.status_code != 200:
        return {"status": r.status_code, "json": data}
    c = data["choices"][0]
    text = c["text"] if "text" in c else c["message"]["content"]
    return {"status": r.status_code, "text": text, "finish": c["finish_reason"]}


async def drive(url: str, plan: list[dict]) -> tuple[list[dict], list[float]]:
    results: list[dict | None] = [None] * len(plan)
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(plan)):
        queue.put_nowait(i)
    # Idle pooled connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them: with both at 5 s
    # a request sent on a connection the server is closing that instant fails with ReadError (seen once in 1000).
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def client_task():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    results[i] = await run_one(client, plan[i])
                except Exception as exc:                       # noqa: BLE001 - reported as a failure
                    results[i] = {"status": -1, "exc": repr(exc)}
                latencies.append(time.perf_counter() - t0)
        await asyncio.gather(*(client_task() for _ in range(CONCURRENCY)))
    return results, latencies


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.timeout(300)
def test_load_1000_requests_64_clients(llama_gqa):
    plan = build_plan()
    with LLM(llama_gqa, max_model_len=256, kv_cache_memory=16 << 20) as offline:
        t0 = time.perf_counter()
        expected = expected_texts(offline, plan)
        ref_s = time.perf_counter() - t0
    srv = ServerProcess(llama_gqa, "-tp", "2")
    try:
        warm = [item for item in build_plan(seed=99) if item["kind"] in ("chat", "completion")][:WARMUP]
        asyncio.run(drive(srv.url, warm))
        rss_before = vm_rss_kib(srv.proc.pid)
        t0 = time.perf_counter()
        results, latencies = asyncio.run(drive(srv.url, plan))
        wall = time.perf_counter() - t0
        problems = []
        statuses = Counter()
        for i, (item, res) in enumerate(zip(plan, results)):
            statuses[res["status"]] += 1
            if res["status"] >= 500 or res["status"] < 0:
                problems.append((i, item["kind"], res))
            elif item["kind"] == "invalid":
                err = (res.get("json") or {}).get("error", {})
                if res["status"] != item["status"] or not (set(err) >= {"message", "type", "param", "code"}):
                    problems.append((i, "invalid", item["body"], res))
            elif item["kind"] in ("chat", "completion"):
                want = expected[_key(item)]
                if res["status"] != 200 or res.get("errors") or (res["text"], res["finish"]) != want:
                    problems.append((i, item["kind"], item["body"], res, want))
        deadline = time.time() + 30
        names = ("shardserve_kv_cache_usage_perc", "shardserve_num_requests_running", "shardserve_num_requests_waiting")
        while time.time() < deadline and any(metric(srv.url, n) > 0 for n in names):
            time.sleep(0.2)
        final = {n: metric(srv.url, n) for n in names}
        rss_after = vm_rss_kib(srv.proc.pid)
        lat = sorted(latencies)
        kinds = Counter(item["kind"] for item in plan)
        print(f"\nload: {N_REQUESTS} requests ({dict(kinds)}), {CONCURRENCY} clients, {wall:.1f} s "
              f"({N_REQUESTS / wall:.1f} req/s); statuses {dict(statuses)}; latency p50 {lat[len(lat) // 2]:.3f} s "
              f"p99 {lat[int(len(lat) * 0.99)]:.3f} s; after: {final}; server RSS {rss_before / 1024:.1f} -> "
              f"{rss_after / 1024:.1f} MiB ({(rss_after - rss_before) / rss_before:+.1%}); "
              f"{len(expected)} distinct references computed alone offline in {ref_s:.1f} s; "
              f"{len(problems)} problems")
        assert not problems, problems[:5]
        assert all(v == 0 for v in final.values()), final
        assert rss_after < rss_before * 1.10, (rss_before, rss_after)
        code = srv.terminate()
        assert code == 0, srv.output()
        assert srv.children() == []
    finally:
        srv.kill()
