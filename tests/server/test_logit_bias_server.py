"""logit_bias over HTTP: a -100 bias changes the greedy completion, malformed ones get OpenAI-shaped 400s."""
from __future__ import annotations

import httpx
import pytest

from server_proc import serving
from shardserve import LLM, SamplingParams

PROMPT = "Hello world, this is a test"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(llama_gqa):
    with serving(llama_gqa) as srv:
        yield srv


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


@pytest.fixture(scope="module")
def offline(llama_gqa):
    with LLM(llama_gqa, max_model_len=256, kv_cache_memory=16 << 20) as llm:
        yield llm


def test_ban_changes_first_token(server, offline):
    ids = offline.get_tokenizer().encode(PROMPT)
    out = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=1, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
    first = out.token_ids[0]
    second = max((t for t in out.logprobs[0] if t != first), key=lambda t: out.logprobs[0][t].logprob)
    decode = offline.get_tokenizer().decode

    def complete(**extra) -> str:
        r = post(server, "/v1/completions", prompt=ids, max_tokens=1, temperature=0, **extra)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert complete() == decode([first])
    assert complete(logit_bias={str(first): -100}) == decode([second]) != decode([first])
    chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0, logit_bias={"400": 100})
    forced = post(server, "/v1/chat/completions", **chat)
    assert forced.status_code == 200, forced.text
    assert forced.json()["choices"][0]["message"]["content"] == decode([400])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bias", [{"abc": 5}, {"-1": 100}, {"5": 101}, [1, 2], {"5": "x"}, {"99999999": 1}])
def test_bad_logit_bias_is_400(server, path, bias):
    body = {"max_tokens": 1, "logit_bias": bias}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = post(server, path, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "logit_bias" in err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400
