"""GGUF tensor data: the file memory-mapped, tensors found from the spec's table, sliced and dequantized lazily."""
from __future__ import annotations

import os

import numpy as np
import torch

from shardserve.model.gguf_metadata import GGUFTensorInfo, read_gguf_metadata
from shardserve.model.lazy_tensors import LazyTensor
from shardserve.model.spec import ModelSpec

# GGML types numpy holds as values (gguf-py's ReaderTensor.data); every other type is bytes [rows, row bytes]
_VALUE_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}

_DENSE_TORCH = ("F32", "F16", "BF16")       # types whose values torch holds as stored (narrow returns file views)

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


def spec_tensor_table(spec: ModelSpec) -> tuple[GGUFTensorInfo, ...]:
    """The GGUF tensor table the driver put in the spec (so a worker parses no metadata), after checking the file
    is the one the driver read. A spec built without it (by hand) falls back to parsing the file here."""
    table = spec.extra.get("gguf_tensors")
    if table is None:
        return read_gguf_metadata(spec.weights_path).tensors
    size = spec.extra.get("gguf_file_size")
    if size is not None and os.path.getsize(spec.weights_path) != size:
        raise ValueError(f"{spec.weights_path} changed after the driver read it ({size} bytes then, "
                         f"{os.path.getsize(spec.weights_path)} now); start the engine again")
    return table


def map_tensors(path: str, table: tuple[GGUFTensorInfo, ...]) -> dict[str, tuple[GGUFTensorInfo, np.ndarray]]:
    """GGUF name -> (info, a view of its bytes in one memory map of `path`): values for F32 / F16 / ints, uint8
    [rows..., row bytes] for block and BF16 types (gguf-py's ReaderTensor.data layout). No data is read. The map
    is copy-on-write (writable for torch.from_numpy, never written back; nothing here writes to it)."""
    import gguf
    mm = np.memmap(path, mode="c", dtype=np.uint8)
    out = {}
    for info in table:
        raw = mm[info.offset:info.offset + info.n_bytes]
        shape = info.shape
        if info.ggml_type in _VALUE_DTYPES:
            data = raw.view(_VALUE_DTYPES[info.ggml_type]).reshape(shape)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
            data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
        out[info.name] = (info, data)
    return out


def _unpermute_rows(w, head_dim: int):
    """Undo llama.cpp's q/k permutation on whole heads: w [n_heads * head_dim, ...] (numpy or torch).

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

    def __init__(self, info: GGUFTensorInfo, data: np.ndarray, permuted_head_dim: int | None = None):
        import gguf
        self._data = data
        self._qtype = gguf.GGMLQuantizationType(info.ggml_type)
        self._block, self._type_size = gguf.GGML_QUANT_SIZES[self._qtype]
        self.name = info.name
        self.shape = info.shape
        self.dtype = torch.float32
        self._head_dim = permuted_head_dim
        if permuted_head_dim is not None:
            assert len(self.shape) == 2 and self.shape[0] % permuted_head_dim == 0, (self.name, self.shape)

    def _dequant(self, raw: np.ndarray) -> np.ndarray:
        import gguf
        return gguf.quants.dequantize(np.ascontiguousarray(raw), self._qtype).astype(np.float32, copy=False)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows or columns [start, start + length) along dim: F32 / F16 / BF16 as stored, a view of the mapped file
        (the caller's copy into its parameter is the one copy; q/k rows are un-permuted, which copies), every
        other type dequantized to float32."""
        if dim < 0:
            dim += len(self.shape)
        self._check(dim, start, length)
        hd = self._head_dim
        if hd is not None and dim == 0:
            assert start % hd == 0 and length % hd == 0, (
                f"{self.name}: narrow(0, {start}, {length}) on a permuted q/k tensor must be aligned to head_dim={hd}")
        if self._qtype.name in _DENSE_TORCH:
            values = torch.from_numpy(self._data)
            if self._qtype.name == "BF16":                       # stored as bytes [..., 2 * cols]
                values = values.view(torch.bfloat16)
            out = values.narrow(dim, start, length)
            return out if self._head_dim is None else _unpermute_rows(out, self._head_dim)
        raw = self._data                   # [rows, cols] for F32 / F16, [rows, row bytes] uint8 otherwise
        if len(self.shape) == 1:
            out = self._dequant(raw[start:start + length]) if raw.dtype != np.uint8 else \
                self._dequant(raw).reshape(-1)[start:start + length]
            return torch.from_numpy(np.array(out, dtype=np.float32))
        if dim == 0:
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
        raw = self._data.view(np.uint8).reshape(self.shape[0], -1)       # [rows, row bytes]
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


class PermutedVector(LazyTensor):
    """A permuted q/k bias vector in a GGUF file (head-aligned narrow only)."""

    def __init__(self, inner: GGUFLazyTensor, head_dim: int):
        self._inner, self._hd = inner, head_dim
        self.shape, self.dtype = inner.shape, inner.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        assert start % self._hd == 0 and length % self._hd == 0, "q/k narrow must be head-aligned"
        return _unpermute_rows(self._inner.narrow(dim, start, length), self._hd).contiguous()
