"""A stage's Llama decoder layers in one C call per step (decoder_f32.c).

Applies to float32 activations on the CPU with linears in panel-packed float32 (native_linear) or GGUF blocks
(quant_linear) and a head size the attention kernels take; under TP the C code calls back into Python for the two
all-reduces of each layer. Otherwise llama.py runs its per-op path, which computes the same values with the same
kernels.
"""
from __future__ import annotations

import ctypes

import torch

from shardserve.distributed.comm import all_reduce
from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.model.forward_batch import ForwardBatch
from shardserve.kernels.cpu import native, quant_linear
from shardserve.model.layers import formats

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
QUANT_PANELS = 100          # decoder_f32.c: format codes from here on are quant_panels.c's layout


class Step(ctypes.Structure):
    """Mirror of decoder_f32.c's Step."""
    _fields_ = ([(name, _I) for name in ("T", "H", "Hq", "Hk", "D", "I", "num_slots")]
                + [("eps", _F), ("scale", _F), ("threads", _I), ("fused_silu", _I)]
                + [(name, _P) for name in ("positions", "slot_mapping", "cos", "sin")]
                + [("num_decode", _I), ("decode_width", _I), ("decode_slots", _P), ("decode_lens", _P)]
                + [("num_segs", _I), ("segs", _P), ("seg_slots", _P)]
                + [("all_reduce", _P)]
                + [("skip_unsampled", _I), ("num_keep", _I), ("keep", _P), ("keep_segs", _P)]
                + [(name, _P) for name in ("h", "qkv", "q", "k", "attn", "gate_up", "act")])


class NativeDecoder:
    """Runs `layers` (LlamaDecoderLayer, all on this rank) through decoder_f32.c."""

    def __init__(self, layers: list, tp: ParallelGroup | None = None):
        self.layers, self.tp = layers, tp
        first = layers[0]
        attn = first.self_attn.attn
        self.hidden = first.input_layernorm.weight.shape[0]
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.intermediate = first.mlp.down_proj.in_features
        self.eps, self.scale = first.input_layernorm.eps, attn.scale
        self.rotary = first.self_attn.rotary
        self.fused_silu = first.mlp.gate_up_proj.gate_up_silu
        # Per layer, decoder_f32.c's table: in/post norm, qkv weight and bias, o, gate_up, down (the caches go
        # between these and the formats at each step, bound later), then the four linears' format codes.
        self.weight_ptrs, self.formats = [], []
        for layer in layers:
            linears = _linears(layer)
            qkv, o, gate_up, down = (_weight(m) for m in linears)
            self.weight_ptrs.append([layer.input_layernorm.weight.data_ptr(),
                                     layer.post_attention_layernorm.weight.data_ptr(), qkv[0],
                                     _ptr(layer.self_attn.qkv_proj.bias), o[0], gate_up[0], down[0]])
            self.formats.append([qkv[1], o[1], gate_up[1], down[1]])

    @staticmethod
    def supports(layers: list) -> bool:
        """Float32 activations; linears float32 panel-packed or GGUF blocks; no o_proj/MLP bias (TP adds it after
        the all-reduce); heads the kernels take."""
        if not layers or not native.available():
            return False
        first = layers[0]
        attn = first.self_attn.attn
        linears = [m for layer in layers for m in _linears(layer)]
        return (all(isinstance(m.method, (formats.PanelF32Method, formats.BlockMethod)) for m in linears)
                and all(m.packed_rows or isinstance(m.method, formats.BlockMethod) for m in linears)
                and len({layer.mlp.gate_up_proj.gate_up_silu for layer in layers}) == 1
                and all(m.bias is None for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                                                      layer.mlp.down_proj))
                and first.input_layernorm.weight.dtype == torch.float32
                and attn.head_dim % 16 == 0 and attn.num_heads // attn.num_kv_heads <= 64)

    def run(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
            sampled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (and the residual [T, H], None before the first layer) -> both after the last layer.
        sampled_only (the last stage, whose outputs are read only at batch.logits_indices): the last layer
        finishes only those rows; the other rows of the result are left unspecified."""
        t, hd = x.shape[0], self.head_dim
        nq, nkv, inter = self.heads * hd, self.kv_heads * hd, self.intermediate
        has_residual = residual is not None
        x = x.contiguous().clone()                  # written in place by the kernel
        residual = residual.contiguous().clone() if has_residual else torch.empty_like(x)
        table = torch.tensor([ptrs + [layer.self_attn.attn.k_cache.data_ptr(), layer.self_attn.attn.v_cache.data_ptr()]
                              + fmts for ptrs, layer, fmts in zip(self.weight_ptrs, self.layers, self.formats)],
                             dtype=torch.int64)
        scratch = {name: torch.empty(t, width) for name, width in
                   (("h", self.hidden), ("qkv", nq + 2 * nkv), ("q", nq), ("k", nkv), ("attn", nq),
                    ("gate_up", 0 if self.fused_silu else 2 * inter), ("act", inter))}   # fused: never written
        alive = [batch.positions.contiguous(), batch.slot_mapping.contiguous()]     # held through the call
        step = Step(T=t, H=self.hidden, Hq=self.heads, Hk=self.kv_heads, D=hd, I=inter,
                    num_slots=self.layers[0].self_attn.attn.k_cache.shape[0], eps=self.eps, scale=self.scale,
                    threads=_threads(), fused_silu=int(self.fused_silu), positions=alive[0].data_ptr(),
                    slot_mapping=alive[1].data_ptr(),
                    cos=self.rotary.cos.data_ptr(), sin=self.rotary.sin.data_ptr(),
                    **{name: buf.data_ptr() for name, buf in scratch.items()})
        if batch.num_decode:
            slots, lens = batch.decode_slots.contiguous(), batch.decode_lens.contiguous()
            alive += [slots, lens]
            step.num_decode, step.decode_width = batch.num_decode, slots.shape[1]
            step.decode_slots, step.decode_lens = slots.data_ptr(), lens.data_ptr()
        if batch.prefills:
            segs, seg_slots = batch.prefill_plan
            step.num_segs, step.segs, step.seg_slots = segs.shape[0], segs.data_ptr(), seg_slots.data_ptr()
        if sampled_only:
            kept = batch.logits_indices
            kept = torch.zeros(0, dtype=torch.int64) if kept is None else kept.contiguous()   # ascending rows
            alive += [kept]
            step.skip_unsampled, step.num_keep, step.keep = 1, kept.shape[0], kept.data_ptr()
            if batch.prefills:
                step.keep_segs = batch.sampled_row_segs.data_ptr()
        errors: list[BaseException] = []
        callback = None
        if self.tp is not None and self.tp.size > 1:
            callback = _ALL_REDUCE(lambda ptr, rows, cols: _all_reduce_rows(x, ptr, rows, cols, self.tp, errors))
            step.all_reduce = ctypes.cast(callback, _P)
        bad = native.lib().decoder_layers_f32(table.data_ptr(), len(self.layers), ctypes.byref(step), x.data_ptr(),
                                              residual.data_ptr(), int(has_residual))
        if errors:
            raise errors[0]
        if bad == -2:
            raise MemoryError("a quantized linear layer could not allocate its scratch buffer")
        if bad:
            raise IndexError(f"KV write: {bad} slot(s) outside the cache's {step.num_slots} slots")
        return x, residual


_ALL_REDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def _all_reduce_rows(x: torch.Tensor, ptr: int, rows: int, cols: int, group: ParallelGroup,
                     errors: list[BaseException]) -> int:
    """The C decoder's all-reduce: rows x cols floats of x starting at ptr, summed over the TP group in place.
    Returns 0, or 1 with the exception kept for run() to raise (an exception cannot cross the C frames)."""
    try:
        start = (ptr - x.data_ptr()) // x.element_size()
        view = x.view(-1)[start: start + rows * cols].view(rows, cols)
        summed = all_reduce(view, group)
        if summed.data_ptr() != view.data_ptr():
            view.copy_(summed)
        return 0
    except BaseException as exc:                     # noqa: BLE001 - re-raised by run()
        errors.append(exc)
        return 1


def _threads() -> int:
    """Threads for the call: with at least this many decode rows and prefill chunks, as many row streams."""
    return torch.get_num_threads()


def _linears(layer) -> tuple:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _weight(linear) -> tuple[int, int]:
    """(address, decoder_f32.c format code) of a linear's weight: float32 panels (-1), GGUF blocks as stored
    (quant_linear's code) or repacked into quant_panels' layout (QUANT_PANELS + quant_linear's code)."""
    if isinstance(linear.method, formats.BlockMethod):
        code = quant_linear.format_code(linear.method.format)
        return linear.weight.data_ptr(), code + (QUANT_PANELS if linear.method.panels else 0)
    return linear.packed.data_ptr(), -1


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
