"""The one-call C decoder (decoder_f32.c) gives bit for bit the per-op path's results, through the engine:
prompts of different lengths, a shared prefix served from the cache, prefill chunks next to decode rows."""
from __future__ import annotations

import pytest
import torch

import tiny_checkpoints as checkpoints
from shardserve import LLM, SamplingParams
from shardserve.kernels.cpu import native
from shardserve.model.layers import native_decoder
from shardserve.model.layers.native_decoder import NativeDecoder
from shardserve.model.llama import LlamaModel

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels are not built here (no gcc)")

SHARED = [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3, 600, 42, 42, 9, 870, 31, 2, 5, 77]
PROMPTS = [[1, 5, 9, 33], SHARED + [8, 9, 10], [1, 42], SHARED + list(range(300, 340)), SHARED]


def _generate(path: str, native_on: bool, monkeypatch, threads: int = 0) -> tuple[list, int]:
    runs = []
    if threads:
        monkeypatch.setattr(native_decoder, "_threads", lambda: threads)
    real_run = NativeDecoder.run
    monkeypatch.setattr(NativeDecoder, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    if not native_on:
        monkeypatch.setattr(NativeDecoder, "supports", staticmethod(lambda *a: False))
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, logprobs=3)
    # 16-token blocks and 24-token steps: the long prompt is chunked, and chunks share steps with decode rows
    with LLM(path, max_model_len=256, kv_cache_memory=4 << 20, block_size=16, max_num_batched_tokens=24,
             enable_prefix_caching=True) as llm:
        llm.generate([{"prompt_token_ids": SHARED}], SamplingParams(max_tokens=1), use_tqdm=False)  # cache the prefix
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    monkeypatch.undo()
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs], len(runs)


@pytest.mark.parametrize("name,threads", [("llama_gqa", 1), ("llama_gqa", 2), ("llama_gqa", 3), ("qwen2", 2),
                                          ("mistral", 2), ("Q8_0", 2), ("Q4_K", 1), ("Q4_K", 3)])
def test_native_decoder_equals_per_op_path(name, threads, request, monkeypatch):
    """One stream with every kernel on all threads (1), or 2-3 row streams of single-threaded kernels; float32
    panels or GGUF blocks (a Q8_0 / Q4_K twin of llama_blocks)."""
    path = (checkpoints.quantized_gguf(request.getfixturevalue("llama_blocks"), name) if name[0] == "Q"
            else request.getfixturevalue(name))
    with_native, runs = _generate(path, True, monkeypatch, threads)
    assert runs > 0                                      # the one-call decoder did run
    per_op, runs = _generate(path, False, monkeypatch)
    assert runs == 0
    assert with_native == per_op                         # tokens and logprob values, exactly


def _hidden_states(path: str, native_on: bool, monkeypatch) -> list:
    """The last stage's output rows and its sampled rows, for each step of a prefill-heavy run."""
    seen = []
    real_forward = LlamaModel.forward

    def forward(self, batch, intermediate):
        out = real_forward(self, batch, intermediate)
        seen.append((out.clone(), batch.logits_indices.tolist()))
        return out

    monkeypatch.setattr(LlamaModel, "forward", forward)
    if not native_on:
        monkeypatch.setattr(NativeDecoder, "supports", staticmethod(lambda *a: False))
    with LLM(path, max_model_len=256, kv_cache_memory=4 << 20, max_num_batched_tokens=24,
             enable_prefix_caching=False) as llm:
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=3),
                     use_tqdm=False)
    monkeypatch.undo()
    return seen


def test_last_layer_skips_rows_nobody_samples(llama_gqa, monkeypatch):
    """Sampled rows equal the per-op path's bit for bit; a prefill chunk's other rows skip the last layer's
    attention and MLP, so they do not (they are never read)."""
    native_steps = _hidden_states(llama_gqa, True, monkeypatch)
    per_op_steps = _hidden_states(llama_gqa, False, monkeypatch)
    assert len(native_steps) == len(per_op_steps)
    skipped = 0
    for (a, rows), (b, rows_b) in zip(native_steps, per_op_steps):
        assert rows == rows_b
        assert torch.equal(a[rows], b[rows])
        others = [r for r in range(a.shape[0]) if r not in rows]
        skipped += sum(not torch.equal(a[r], b[r]) for r in others)
    assert skipped > 0


class _FakeGroup:
    size = 2


def test_tp_all_reduce_callback_plumbing(llama_gqa, monkeypatch):
    """Under TP the C decoder calls back for two all-reduces per layer, on x's rows; a sum that returns a new
    tensor is copied back. With an all-reduce that changes nothing the outputs equal the plain run's."""
    plain, _ = _generate(llama_gqa, True, monkeypatch)
    calls = []
    real_init = NativeDecoder.__init__
    monkeypatch.setattr(NativeDecoder, "__init__", lambda self, layers, tp=None: real_init(self, layers, _FakeGroup()))
    monkeypatch.setattr(native_decoder, "all_reduce", lambda t, group: calls.append(tuple(t.shape)) or t.clone())
    with_callback, runs = _generate(llama_gqa, True, monkeypatch)
    assert with_callback == plain
    layers = 5                                               # llama_gqa
    assert runs > 0 and len(calls) == 2 * layers * runs
    assert all(cols == 64 for _, cols in calls)              # hidden size


def test_all_reduce_failure_is_kept_for_run():
    x = torch.zeros(4, 8)
    errors: list = []

    def broken(t, group):
        raise RuntimeError("rank 1 exited")

    real = native_decoder.all_reduce
    native_decoder.all_reduce = broken
    try:
        assert native_decoder._all_reduce_rows(x, x.data_ptr() + 8 * 4, 2, 8, _FakeGroup(), errors) == 1
    finally:
        native_decoder.all_reduce = real
    assert len(errors) == 1 and "rank 1 exited" in str(errors[0])
    native_decoder.all_reduce = lambda t, group: t + 1       # a new tensor: copied into rows 1-2 only
    try:
        assert native_decoder._all_reduce_rows(x, x.data_ptr() + 8 * 4, 2, 8, _FakeGroup(), errors) == 0
    finally:
        native_decoder.all_reduce = real
    assert x[1:3].eq(1).all() and x[0].eq(0).all() and x[3].eq(0).all()
