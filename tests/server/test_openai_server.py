"""A real tp=2 server process, talked to with the official `openai` client: parity with the offline LLM,
streaming, n, logprobs, usage, concurrency, disconnects, and every kind of bad input."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server_proc import REPO, serving
from shardserve import LLM, SamplingParams

API_KEY = "sk-test-123"
PROMPT = "Hello world, this is a test"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(llama_gqa):
    with serving(llama_gqa, "-tp", "2", api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(llama_gqa):
    with LLM(llama_gqa, max_model_len=256, kv_cache_memory=16 << 20) as llm:
        yield llm


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_completion_equals_offline(client, offline):
    expected = offline.generate(PROMPT, greedy(), use_tqdm=False)[0]
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == expected.outputs[0].text
    assert resp.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_completion_equals_offline(client, offline):
    expected = offline.generate(PROMPT, greedy(), use_tqdm=False)[0].outputs[0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_token_id_prompt_and_echo(client, offline):
    ids = [1, 17, 250, 9, 44]
    expected = offline.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert resp.choices[0].text == expected.text and resp.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)


def test_chat_equals_offline_streaming_and_not(client, offline):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    expected = offline.chat(messages, greedy(), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_n_and_logprobs(client):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=3,
                                     logprobs=3)
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(len(top) >= 1 for top in c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert resp.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in resp.choices)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_prompt_logprobs_extra_field(server, client, offline):
    # vLLM's extra field: each completion choice (and a chat response, top level) carries `prompt_logprobs`
    expected = offline.generate(PROMPT, greedy(max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                     extra_body={"prompt_logprobs": 2})
    got = resp.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(expected.prompt_token_ids) and got[0] is None
    for entry, want, token in zip(got[1:], expected.prompt_logprobs[1:], expected.prompt_token_ids[1:]):
        assert set(entry) == {str(t) for t in want} and str(token) in entry
        for t, lp in want.items():
            assert abs(entry[str(t)]["logprob"] - lp.logprob) < 1e-4 and entry[str(t)]["rank"] == lp.rank
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, extra_body={"prompt_logprobs": 0})
    chat_lps = chat.model_extra["prompt_logprobs"]
    assert chat_lps[0] is None and all(len(e) == 1 for e in chat_lps[1:])
    h = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"model": "tiny", "prompt": PROMPT, "prompt_logprobs": -1},
                 {"model": "tiny", "prompt": PROMPT, "prompt_logprobs": 21},
                 {"model": "tiny", "prompt": PROMPT, "prompt_logprobs": 1, "stream": True}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 400 and "prompt_logprobs" in r.text, r.text


def test_models_tokenize_detokenize_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = {"Authorization": f"Bearer {API_KEY}"}
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=h).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"][1:]}, headers=h).json()
    assert detok["prompt"] == PROMPT
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("shardserve_num_requests_running", "shardserve_num_requests_waiting", "shardserve_kv_cache_usage_perc",
                 "shardserve_prompt_tokens_total", "shardserve_generation_tokens_total",
                 "shardserve_time_to_first_token_seconds_bucket", "shardserve_time_per_output_token_seconds_bucket"):
        assert name in metrics


def test_32_concurrent_streams_equal_sequential(server, client):
    prompts = [f"Request number {i} says" for i in range(32)]
    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                  for p in prompts[:8]]

    async def one(aclient, p):
        stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    concurrent = asyncio.run(all_of_them())
    assert concurrent[:8] == sequential
    rest = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in prompts[8:]]
    assert concurrent[8:] == rest


def gauge(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert gauge(server, "shardserve_kv_cache_usage_perc") > 0
    deadline = time.time() + 20
    while time.time() < deadline and (gauge(server, "shardserve_kv_cache_usage_perc") > 0
                                      or gauge(server, "shardserve_num_requests_running") > 0):
        time.sleep(0.2)
    assert gauge(server, "shardserve_kv_cache_usage_perc") == 0
    assert gauge(server, "shardserve_num_requests_running") == 0


BAD = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", {"model": "tiny", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-17", "prompt": PROMPT}, 404, "model"),
    ("temperature out of range", {"model": "tiny", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("top_p out of range", {"model": "tiny", "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ("n zero", {"model": "tiny", "prompt": PROMPT, "n": 0}, 400, "n"),
    ("prompt too long", {"model": "tiny", "prompt": [1] + [5] * 300}, 400, "prompt"),
    ("token id out of vocab", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("empty token list", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt + max_tokens too long", {"model": "tiny", "prompt": PROMPT, "max_tokens": 400}, 400, "max_tokens"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_then_good_request_works(server, client, what, body, status, param):
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers=h, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param:
        assert param in (err["param"] or "") or param in err["message"], err
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text != None


def test_chat_bad_input(server, client):
    h = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"model": "tiny", "messages": []}, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "tiny", "messages": "hello"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 400 and "error" in r.json()


def test_api_key_required(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_tp2_pp2_server_equals_offline(llama_gqa, offline):
    with serving(llama_gqa, "-tp", "2", "-pp", "2") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        expected = offline.generate(PROMPT, greedy(), use_tqdm=False)[0].outputs[0].text
        assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text == expected
        streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == expected


@pytest.mark.timeout(120)
def test_busy_port_fails_before_the_engine_starts(llama_gqa):
    """A port already taken is named at once: the server takes its port before it starts the engine (so no rank is
    spawned, and the engine's own ephemeral sockets can never take the port first)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-m", "shardserve.entrypoints.cli", "serve", llama_gqa, "--port",
                               str(port), "-tp", "2"], capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr[-3000:]
    assert "KV cache" not in proc.stderr, proc.stderr[-3000:]         # the engine never started
