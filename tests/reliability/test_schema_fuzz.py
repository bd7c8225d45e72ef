"""Schema fuzzing: schemathesis generates requests (valid and invalid) from the running tp=1 server's own
/openapi.json; no answer may be a 5xx. Bounded: ~20 examples per operation and mode, no shrinking."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server_proc import serving

OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/models", "POST /tokenize", "POST /detokenize",
              "POST /v1/completions", "POST /v1/chat/completions"]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
EXAMPLES = 20


@pytest.fixture(scope="module")
def server(llama_gqa):
    with serving(llama_gqa) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.mark.timeout(60)
def test_schema_lists_the_fuzzed_operations(schema):
    labels = sorted(op.ok().label for op in schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


# negative data is impossible for an operation without parameters or body (the GETs): positive only there
CASES = [(label, mode) for label in OPERATIONS for mode in MODES
         if mode == GenerationMode.POSITIVE or label.startswith("POST")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_server_errors(server, schema, label, mode):
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    seen = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=server.url, timeout=120)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    print(f"{label} [{mode.value}]: {len(seen)} requests, statuses {sorted(set(seen))}")
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200      # still serving


RAW = [("/v1/completions", b'{"model": "tiny", "prompt": "\\udcff abc", "max_tokens": 2}'),
       ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}'),
       ("/tokenize", b'{"prompt": "\\udcff abc"}'),
       ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udcff"}]}'),
       ("/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}'),
       ("/tokenize", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}')]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path,raw", RAW, ids=[f"{p}-{i}" for i, (p, _) in enumerate(RAW)])
def test_found_by_hand_lone_surrogates_and_bad_content_parts_are_400(server, path, raw):
    """Were 500s (TypeError from the tokenizer / str.join): JSON can carry lone surrogates and non-string parts."""
    r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
