"""Tests for tokenizer.py: loading (folder / GGUF), chat templates, incremental detokenization."""
from __future__ import annotations

import json
import os
import random

import pytest

from shardserve.model.checkpoint import read_model_spec
from shardserve.model.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer

TEXTS = [
    "Hello world, the capital of France is Paris.",
    "Emoji 😀👍🏽 and flags 🇫🇷🇯🇵 in a row",
    "日本語のテキストと中文字符, ünïcödé ok",
    "  leading spaces\n\nnew lines\tand tabs  ",
]


def _deltas(tok, prompt_ids, out_ids, skip=True):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = [d.append(t) for t in out_ids]
    return d, deltas


def test_tiny_tokenizer_consistent_with_config(llama_gqa):
    spec = read_model_spec(llama_gqa)
    tok = load_tokenizer(spec)
    assert load_tokenizer(spec) is tok  # cached per path
    assert len(tok) == spec.vocab_size == 1003
    assert tok.bos_token_id == spec.bos_token_id == 1 and tok.eos_token_id == 2
    assert spec.eos_token_ids == (tok.eos_token_id,)
    for i in range(spec.vocab_size):  # every id decodes
        assert isinstance(tok.decode([i]), str)
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and max(ids) < 1003 and tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_chat_template_tiny_and_missing(qwen2, tmp_path):
    tok = load_tokenizer(read_model_spec(qwen2))
    ids = apply_chat_template(tok, [{"role": "user", "content": "Hi there"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == "<s><|user|>\nHi there</s>\n<|assistant|>\n"
    no_gen = apply_chat_template(tok, [{"role": "user", "content": "Hi there"}], add_generation_prompt=False)
    assert tok.decode(no_gen) == "<s><|user|>\nHi there</s>\n"
    # a tokenizer without a chat template
    d = tmp_path / "notemplate"
    d.mkdir()
    for f in os.listdir(qwen2):
        os.symlink(os.path.join(qwen2, f), d / f)
    os.remove(d / "tokenizer_config.json")
    with open(os.path.join(qwen2, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(load_tokenizer(read_model_spec(str(d))), [{"role": "user", "content": "x"}])


def test_tiny_gguf_tokenizer_matches_folder(tiny_gguf, tiny_gguf_twin):
    g = load_tokenizer(read_model_spec(tiny_gguf))
    h = load_tokenizer(read_model_spec(tiny_gguf_twin))
    assert len(g) == len(h) == 1003
    for text in TEXTS:
        assert g.encode(text, add_special_tokens=False) == h.encode(text, add_special_tokens=False)
        ids = h.encode(text, add_special_tokens=False)
        assert g.decode(ids) == h.decode(ids) == text
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert apply_chat_template(g, msgs) == apply_chat_template(h, msgs)


def test_smollm2_tokenizer_and_chat_template(smollm2_gguf, smollm2_hf):
    tok = load_tokenizer(read_model_spec(smollm2_gguf))
    assert len(tok) == 49152
    ids = apply_chat_template(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                               "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                               "<|im_end|>\n<|im_start|>assistant\n")
    hf = load_tokenizer(read_model_spec(smollm2_hf))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_incremental_detokenizer_multibyte(which, request):
    if which == "tiny":
        tok = load_tokenizer(read_model_spec(request.getfixturevalue("llama_gqa")))
    else:
        tok = load_tokenizer(read_model_spec(request.getfixturevalue("smollm2_gguf")))
    prompt = tok.encode("Say something:", add_special_tokens=False)
    held_back = 0
    for text in TEXTS:
        out = tok.encode(text, add_special_tokens=False)
        d, deltas = _deltas(tok, prompt, out)
        assert "".join(deltas) == d.text == tok.decode(out, skip_special_tokens=True), text
        assert all("\ufffd" not in x for x in deltas), deltas
        held_back += deltas.count("")
    assert held_back > 0  # byte-level BPE split some characters across tokens, and they were held back


def test_incremental_detokenizer_special_tokens(smollm2_gguf):
    tok = load_tokenizer(read_model_spec(smollm2_gguf))
    out = tok.encode("Paris 🇫🇷 is lovely.", add_special_tokens=False) + [2]  # ... <|im_end|>
    for skip in (True, False):
        d, deltas = _deltas(tok, [1, 4093], out, skip)
        assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip)
    d, deltas = _deltas(tok, [], out)  # empty prompt
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=True)


def test_incremental_detokenizer_flush_and_random_ids(llama_gqa):
    tok = load_tokenizer(read_model_spec(llama_gqa))
    partial = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # ends inside the emoji's bytes
    d, deltas = _deltas(tok, [], partial)
    full = tok.decode(partial)
    assert full.endswith("\ufffd") and d.text == full.rstrip("\ufffd")  # the partial emoji is held back
    rest = full[len(d.text):]
    assert d.flush() == rest and d.text == full and d.flush() == ""
    rng = random.Random(0)
    for _ in range(20):  # arbitrary ids never raise, and deltas + flush rebuild the full text
        out = [rng.randrange(3, 1003) for _ in range(30)]
        d, deltas = _deltas(tok, [rng.randrange(1003) for _ in range(4)], out)
        assert "".join(deltas) + d.flush() == tok.decode(out, skip_special_tokens=True)
