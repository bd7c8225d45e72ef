"""A stage's Llama decoder layers in one C call per step (decoder_f32.c).

Applies on the CPU to float32 activations with linears in panel-packed float32 (native_linear) or GGUF blocks
(quant_linear), and to bfloat16 ones with linears in bf16 k-pair panels (bf16_linear) or GGUF blocks, with a head size
the attention kernels take; under TP the C code calls back into Python for the two all-reduces of each layer.
Otherwise llama.py runs its per-op path: for float32 the same values with the same kernels; for bfloat16 the same
kernels for the linears, torch for the rest.
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
LINEAR_BF16 = -2            # decoder_f32.c: bf16 weights packed for linear_bf16.c


class Step(ctypes.Structure):
    """Mirror of decoder_f32.c's Step."""
    _fields_ = ([(name, _I) for name in ("T", "H", "Hq", "Hk", "D", "I", "num_slots")]
                + [("eps", _F), ("scale", _F), ("threads", _I), ("fused_silu", _I), ("bf16", _I)]
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
        self.dtype = first.input_layernorm.weight.dtype         # the activations' (float32 or bfloat16)
        self.held: list[torch.Tensor] = []      # float32 copies of bf16 norms and biases, which the C code reads
        # Per layer, decoder_f32.c's table: in/post norm, qkv weight and bias, o, gate_up, down (the caches go
        # between these and the formats at each step, bound later), then the four linears' format codes.
        self.weight_ptrs, self.formats = [], []
        for layer in layers:
            linears = _linears(layer)
            qkv, o, gate_up, down = (_weight(m) for m in linears)
            self.weight_ptrs.append([self._f32_ptr(layer.input_layernorm.weight),
                                     self._f32_ptr(layer.post_attention_layernorm.weight), qkv[0],
                                     self._f32_ptr(layer.self_attn.qkv_proj.bias), o[0], gate_up[0], down[0]])
            self.formats.append([qkv[1], o[1], gate_up[1], down[1]])

    def _f32_ptr(self, t: torch.Tensor | None) -> int:
        """Address of t as float32 (0 for None): t's own, or a float32 copy held here."""
        if t is not None and t.dtype != torch.float32:
            t = t.float().contiguous()
            self.held.append(t)
        return _ptr(t)

    @staticmethod
    def supports(layers: list) -> bool:
        """Float32 activations with linears float32 panel-packed or GGUF blocks, or bfloat16 ones with linears bf16
        panel-packed or GGUF blocks; no o_proj/MLP bias (TP adds it after the all-reduce); heads the kernels take."""
        if not layers or not native.available():
            return False
        first = layers[0]
        attn = first.self_attn.attn
        linears = [m for layer in layers for m in _linears(layer)]
        dense = {torch.float32: formats.PanelF32Method, torch.bfloat16: formats.PanelBF16Method}.get(
            first.input_layernorm.weight.dtype)
        return (dense is not None
                and all(isinstance(m.method, (dense, formats.BlockMethod)) for m in linears)
                and all(m.packed_rows or isinstance(m.method, formats.BlockMethod) for m in linears)
                and len({layer.mlp.gate_up_proj.gate_up_silu for layer in layers}) == 1
                and all(m.bias is None for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                                                      layer.mlp.down_proj))
                and attn.head_dim % 16 == 0 and attn.num_heads // attn.num_kv_heads <= 64)

    def run(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
            sampled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] (and the residual [T, H], None before the first layer) -> both after the last layer.
        sampled_only (the last stage, whose outputs are read only at batch.logits_indices): the last layer
        finishes only those rows; the other rows of the result are left unspecified."""
        t, hd = x.shape[0], self.head_dim
        nq, nkv, inter = self.heads * hd, self.kv_heads * hd, self.intermediate
        has_residual = residual is not None
        x = x.to(torch.float32, copy=True).contiguous()             # written in place by the kernel
        residual = residual.to(torch.float32, copy=True).contiguous() if has_residual else torch.empty_like(x)
        assert self.layers[0].self_attn.attn.k_cache.dtype == self.dtype, "the KV cache holds the activation dtype"
        table = torch.tensor([ptrs + [layer.self_attn.attn.k_cache.data_ptr(), layer.self_attn.attn.v_cache.data_ptr()]
                              + fmts for ptrs, layer, fmts in zip(self.weight_ptrs, self.layers, self.formats)],
                             dtype=torch.int64)
        scratch = {name: torch.empty(t, width) for name, width in
                   (("h", self.hidden), ("qkv", nq + 2 * nkv), ("q", nq), ("k", nkv), ("attn", nq),
                    ("gate_up", 0 if self.fused_silu else 2 * inter), ("act", inter))}   # fused: never written
        alive = [batch.positions.contiguous(), batch.slot_mapping.contiguous()]     # held through the call
        step = Step(T=t, H=self.hidden, Hq=self.heads, Hk=self.kv_heads, D=hd, I=inter,
                    num_slots=self.layers[0].self_attn.attn.k_cache.shape[0], eps=self.eps, scale=self.scale,
                    threads=_threads(), fused_silu=int(self.fused_silu), bf16=int(self.dtype == torch.bfloat16),
                    positions=alive[0].data_ptr(),
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
        return x.to(self.dtype), residual.to(self.dtype)        # bf16: exact, the C code rounded them


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
    """(address, decoder_f32.c format code) of a linear's weight: float32 panels (-1), bf16 panels (LINEAR_BF16),
    GGUF blocks as stored (quant_linear's code) or repacked into quant_panels' layout (QUANT_PANELS + the code)."""
    if isinstance(linear.method, formats.BlockMethod):
        code = quant_linear.format_code(linear.method.format)
        return linear.weight.data_ptr(), code + (QUANT_PANELS if linear.method.panels else 0)
    bf16 = isinstance(linear.method, formats.PanelBF16Method)
    return linear.packed.data_ptr(), LINEAR_BF16 if bf16 else -1


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
