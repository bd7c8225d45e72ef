"""GGUF metadata read once and fast: the parser against gguf-py, the spec against the previous (gguf-py) reader."""
from __future__ import annotations

import dataclasses
import functools
import shutil

import numpy as np
import pytest

import tiny_checkpoints as checkpoints
from shardserve.model import gguf_metadata
from shardserve.model.gguf_metadata import parse_gguf_metadata, read_gguf_metadata
from shardserve.model.spec import ModelSpec
from shardserve.model.spec_reader import read_model_spec


@functools.lru_cache(maxsize=None)
def _gguf_py(path: str):
    """gguf-py's reading of a file (~3 s for SmolLM2: read once for both tests)."""
    import gguf
    return gguf.GGUFReader(path, "r")


def _reference_spec(path: str) -> tuple[ModelSpec, dict[str, str]]:
    """The spec and tensor formats as the previous reader built them from gguf.GGUFReader (the oracle)."""
    import gguf
    reader = _gguf_py(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    def token_id(token):
        f = reader.fields.get("tokenizer.ggml.tokens")
        return None if f is None else next((i for i, part in enumerate(f.data)
                                            if bytes(f.parts[part]) == token.encode()), None)

    p, names = "llama.", {t.name for t in reader.tensors}
    hidden, heads = int(field(p + "embedding_length")), int(field(p + "attention.head_count"))
    vocab = field(p + "vocab_size")
    if vocab is None:
        f = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(f.data) if f is not None else next(int(t.shape[1]) for t in reader.tensors
                                                        if t.name == "token_embd.weight")
    scaling = None
    if field(p + "rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(field(p + "rope.scaling.factor"))}
    eos = [int(e) for e in (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id"),
                            field("tokenizer.ggml.eom_token_id")) if e is not None]
    if "<|im_end|>" in (field("tokenizer.chat_template") or "") and token_id("<|im_end|>") is not None:
        eos.append(token_id("<|im_end|>"))
    bos, sliding = field("tokenizer.ggml.bos_token_id"), field(p + "attention.sliding_window")
    kinds = frozenset(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    spec = ModelSpec(
        architecture="LlamaForCausalLM", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(field(p + "feed_forward_length")), num_layers=int(field(p + "block_count")),
        num_heads=heads, num_kv_heads=int(field(p + "attention.head_count_kv", heads)),
        head_dim=int(field(p + "attention.key_length", hidden // heads)),
        rms_norm_eps=float(str(np.float32(field(p + "attention.layer_norm_rms_epsilon", 1e-5)))),
        rope_theta=float(field(p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(field(p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        checkpoint_dtype={frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(kinds, "float32"),
        bos_token_id=int(bos) if bos is not None else None, eos_token_ids=tuple(dict.fromkeys(eos)), format="gguf",
        weights_path=path, sliding_window=int(sliding) if sliding else None,
        mlp_split_unit=max((gguf.GGML_QUANT_SIZES[t.tensor_type][0] for t in reader.tensors
                            if t.name.endswith(".ffn_down.weight")), default=1),
        extra={"gguf_name": field("general.name")})
    return spec, {t.name: t.tensor_type.name for t in reader.tensors}


def _chatml_gguf(path: str, endian=None) -> str:
    """A ChatML GGUF whose eos is <|endoftext|>, written in the given byte order."""
    import gguf
    w = gguf.GGUFWriter(path, "llama", **({} if endian is None else {"endianess": endian}))
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_rope_freq_base, 5e5),
                   (w.add_layer_norm_rms_eps, 1e-6)):
        add(v)
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "a", "<|im_end|>", "日本"])
    w.add_token_types([3, 3, 1, 3, 1])
    w.add_eos_token_id(0)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("test.floats", [0.5, -1.25])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    w.add_tensor("token_embd.weight", np.arange(40, dtype=np.float32).reshape(5, 8))
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def _gguf_files(request, tmp_path) -> dict[str, str]:
    import gguf
    blocks = request.getfixturevalue("llama_blocks")
    return {"tiny F32": request.getfixturevalue("tiny_gguf"),
            "blocks Q8_0": checkpoints.quantized_gguf(blocks, "Q8_0"),
            "blocks Q4_K": checkpoints.quantized_gguf(blocks, "Q4_K"),
            "chatml": _chatml_gguf(str(tmp_path / "chatml.gguf")),
            "chatml big-endian": _chatml_gguf(str(tmp_path / "chatml-be.gguf"), gguf.GGUFEndian.BIG),
            "SmolLM2 Q4_1": request.getfixturevalue("smollm2_gguf")}


def test_metadata_equals_gguf_py(request, tmp_path):
    """Every metadata value and every tensor's type, dims, data offset and size equal gguf-py's reading."""
    for what, path in _gguf_files(request, tmp_path).items():
        meta, reader = parse_gguf_metadata(path), _gguf_py(path)
        assert meta.data_offset == reader.data_offset, what
        keys = [k for k in reader.fields if not k.startswith("GGUF.")]
        assert list(meta.fields) == keys, what
        for key in keys:
            value = meta.fields[key]
            if isinstance(value, list):         # an array of arrays: gguf-py's contents() flattens it
                value = [x for v in value for x in v.tolist()]
            elif hasattr(value, "tolist"):
                value = value.tolist()
            assert value == reader.fields[key].contents(), (what, key)
        assert [(t.name, t.ggml_type, t.dims, t.offset, t.n_bytes) for t in meta.tensors] == \
            [(t.name, int(t.tensor_type), tuple(t.shape.tolist()), int(t.data_offset), int(t.n_bytes))
             for t in reader.tensors], what
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None:              # the byte search finds what a full decode finds
            for i in (0, 1, len(tokens) - 1):
                assert tokens.index(tokens.tolist()[i]) == tokens.tolist().index(tokens.tolist()[i])
            assert tokens.index("no such token \u2603") is None


def test_spec_equals_previous_reader(request, tmp_path):
    """Every ModelSpec field the engine uses (and the tensor formats) equal what the gguf-py reader produced."""
    for what, path in _gguf_files(request, tmp_path).items():
        spec, ref = read_model_spec(path), _reference_spec(path)
        for f in dataclasses.fields(ModelSpec):
            if f.name != "extra":
                assert getattr(spec, f.name) == getattr(ref[0], f.name), (what, f.name)
        assert spec.extra["gguf_name"] == ref[0].extra["gguf_name"], what
        table = spec.extra["gguf_tensors"]       # what the workers receive instead of parsing the file
        assert [t.name for t in table] == list(ref[1]) and [t.type_name for t in table] == list(ref[1].values())


def test_parsed_once_per_file_version(tiny_gguf, tmp_path):
    """The driver's spec, tokenizer and format check share one parse; a rewritten file is parsed again."""
    path = str(tmp_path / "copy.gguf")
    shutil.copy(tiny_gguf, path)
    before = gguf_metadata.parse_count
    read_model_spec(path)
    from shardserve.model.tokenizer import build_tokenizer
    build_tokenizer(read_model_spec(path))
    assert read_gguf_metadata(path) is read_gguf_metadata(path)
    assert gguf_metadata.parse_count == before + 1
    _chatml_gguf(path)                             # the same path, new contents
    assert read_model_spec(path).vocab_size == 5
    assert gguf_metadata.parse_count == before + 2


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_model_spec(str(bad))
