"""Weight formats of linear layers: one method object per layer, chosen when the model is built.

A method (vLLM's `quant_method`) owns the layer's weight from creation to use: `create_weights` registers the
parameter the checkpoint fills, `read` cuts a rank's slice out of a checkpoint tensor in the form the parameter
stores, `process_weights_after_loading` turns it into what `apply` computes with. Layers call
`self.method.apply(self, x, bias)`; nothing re-decides the path per call.

Formats:
- dense in the activation dtype: `PanelF32Method` (float32 on AVX-512 CPUs: the C panel GEMM),
  `PanelBF16Method` (bfloat16 on AVX512-BF16 CPUs: the C k-pair panel GEMM on VDPBF16PS),
  `OneDNNMethod` (float32 / bfloat16 on other CPUs: oneDNN's prepacked GEMM),
  `DenseMethod` (F.linear: GPUs, float16, and CPUs without oneDNN);
- `BlockMethod`: GGUF quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) kept as in the file, [N, row bytes]
  (Q8_0 / Q4_0 / Q4_1 reordered at load into quant_panels' k-major panels of the same bytes);
- `Int8Method`: weight-only int8 with per-output-channel scales, made at load from a dense checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.kernels.cpu import bf16_linear, native, native_linear, quant_linear, quant_panels

GGUF_BLOCK_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
DENSE_FORMATS = ("F32", "F16", "BF16", "dense")       # stored as floats: loaded in the activation dtype


def read_blocks(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """Raw GGUF block rows [length, row bytes] (dim 0) or the bytes of columns [start, start + length) of every
    row (dim 1; both ends must fall on block boundaries) of a checkpoint tensor."""
    return loaded.narrow_blocks(dim, start, length)


def block_row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of k weights stored as GGUF blocks of `fmt`."""
    return quant_linear.row_bytes(fmt, k)


def block_rows(weight: torch.Tensor, fmt: str, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of GGUF block rows [N, row bytes] dequantized to float32 [len(ids), k] (embedding lookups)."""
    return quant_linear.dequantize_rows(weight, fmt, k, ids)


class LinearMethod:
    """Dense weight [N, K] in the activation dtype, applied with F.linear."""

    format = "dense"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def create_weights(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=self.dtype),
                                    requires_grad=False)

    def read(self, loaded, dim: int, start: int, length: int) -> torch.Tensor:
        """This rank's slice [start, start + length) along `dim` of a checkpoint tensor, as the parameter stores it."""
        return loaded.narrow(dim, start, length)

    def read_full(self, loaded) -> torch.Tensor:
        return loaded if isinstance(loaded, torch.Tensor) else loaded.full()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def silu_and_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up straight from one fused GEMM (gate_up layers), or None when this format has none."""
        return None

    def row_lookup(self, layer: nn.Module):
        """ids -> rows [len(ids), K] of the weight in the activation dtype, read from the form this method holds it
        in after loading (a tied embedding's lookups), or None when that form has no cheap row access (the plain
        weight, where kept, is shared directly)."""
        return None

    def extra_bytes(self, layer: nn.Module) -> int:
        """Bytes this method holds beyond the layer's parameters (a packed copy in `layer.packed`)."""
        packed = getattr(layer, "packed", None)
        return 0 if packed is None else packed.numel() * packed.element_size()


DenseMethod = LinearMethod


class OneDNNMethod(LinearMethod):
    """Float32 / bfloat16 on the CPU: the weight reordered once for oneDNN's GEMM, the plain copy released."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.numel():
            layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.data, None)
            layer.weight.data = torch.empty(0, dtype=self.dtype)

    def apply(self, layer, x, bias):
        if getattr(layer, "packed", None) is None:          # an empty shard (nothing to reorder)
            return F.linear(x, layer.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, bias, "none", [], "")


class PanelMethod(LinearMethod):
    """A dense weight packed once at load for a C GEMM (`pack`) into `layer.packed`, with its row count in
    `layer.packed_rows`; the plain copy is released. An empty shard keeps its empty weight (F.linear)."""

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer):
        w = layer.weight.data
        if not w.numel():
            return
        layer.packed = self.pack(w)
        layer.packed_rows = w.shape[0]
        layer.weight.data = torch.empty(0, dtype=self.dtype)


class PanelF32Method(PanelMethod):
    """Float32 on AVX-512 CPUs: the weight packed into the C GEMM's 16-column panels (linear_f32.c).

    `gate_up`: a gate_up weight whose halves are 16-column aligned is packed in (gate, up) panel pairs, so
    `silu_and_mul` takes silu(gate) * up straight from the GEMM (linear_silu_f32)."""

    def __init__(self, dtype: torch.dtype, gate_up: bool = False):
        super().__init__(dtype)
        self.gate_up = gate_up
        self.gate_up_silu = False                 # set at load when the layout allows the fused activation

    def pack(self, weight):
        if self.gate_up and (weight.shape[0] // 2) % 16 == 0:
            self.gate_up_silu = True
            return native_linear.pack_gate_up(weight)
        return native_linear.pack(weight)

    def apply(self, layer, x, bias):
        if not getattr(layer, "packed_rows", 0):
            return F.linear(x, layer.weight, bias)
        out = native_linear.linear(x, layer.packed, bias, layer.packed_rows)
        return native_linear.gate_up_columns(out) if self.gate_up_silu else out

    def silu_and_mul(self, layer, x):
        if not self.gate_up_silu:
            return None
        return native_linear.silu_linear(x, layer.packed, layer.packed_rows // 2)


class PanelBF16Method(PanelMethod):
    """bfloat16 on AVX512-BF16 CPUs: the weight packed into linear_bf16.c's k-pair panels (VDPBF16PS: bf16
    products, float32 sums); outputs rounded to bf16 as F.linear's would be."""

    def pack(self, weight):
        return bf16_linear.pack(weight)

    def apply(self, layer, x, bias):
        if not getattr(layer, "packed_rows", 0):
            return F.linear(x, layer.weight, bias)
        return bf16_linear.linear(x, layer.packed, bias, layer.packed_rows, layer.in_features).to(x.dtype)

    def row_lookup(self, layer):
        if not getattr(layer, "packed_rows", 0):
            return None
        return lambda ids: bf16_linear.rows(layer.packed, ids, layer.in_features)


class BlockMethod(LinearMethod):
    """GGUF quantized blocks kept as in the file: weight uint8 [N, row_bytes(K)], rows of whole blocks, applied by
    quant_linear.c on float32 activations (other activation dtypes are converted around the call)."""

    def __init__(self, dtype: torch.dtype, fmt: str):
        super().__init__(dtype)
        self.format = fmt
        self.panels = False                 # set at load: the weight was repacked into quant_panels' layout

    def create_weights(self, layer):
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, quant_linear.row_bytes(self.format, layer.in_features), dtype=torch.uint8),
            requires_grad=False)

    def read(self, loaded, dim, start, length):
        return read_blocks(loaded, dim, start, length)

    def read_full(self, loaded):
        return loaded.narrow_blocks(0, 0, loaded.shape[0])

    def process_weights_after_loading(self, layer):
        """Q8_0 / Q4_0 / Q4_1 on AVX-512 CPUs: the rows reordered once into quant_panels' k-major panels (the same
        bytes, kept in layer.weight), unless the layer keeps its rows (`keep_rows`: the LM head, whose rows the
        tied embedding reads)."""
        w = layer.weight.data
        if (w.numel() and quant_panels.supports(self.format) and not getattr(layer, "keep_rows", False)
                and native.available() and native.lib().quant_panels_avx512()):
            layer.weight.data = quant_panels.repack(w, self.format, layer.in_features)
            self.panels = True

    def apply(self, layer, x, bias):
        bias = None if bias is None else bias.float()
        if self.panels:
            out = quant_panels.linear(x.float(), layer.weight, self.format, layer.out_features, layer.in_features,
                                      bias)
        else:
            out = quant_linear.linear(x.float(), layer.weight, self.format, layer.in_features, bias)
        return out.to(x.dtype)


class Int8Method(LinearMethod):
    """Weight-only int8 with one float32 scale per output channel (`quantization="int8"`): the checkpoint fills a
    dense weight in the activation dtype, quantized after loading (w ~ scale[n] * q[n, k])."""

    format = "I8"

    def process_weights_after_loading(self, layer):
        q, scales = quant_linear.quantize_int8(layer.weight.data)
        layer.weight.data = q
        layer.weight_scale = scales

    def apply(self, layer, x, bias):
        out = quant_linear.linear(x.float(), layer.weight, "I8", layer.in_features,
                                  None if bias is None else bias.float(), scales=layer.weight_scale)
        return out.to(x.dtype)

    def extra_bytes(self, layer):
        scales = getattr(layer, "weight_scale", None)
        return 0 if scales is None else scales.numel() * scales.element_size()


def dense_method(dtype: torch.dtype, device: torch.device | str, gate_up: bool = False) -> LinearMethod:
    """The fastest dense method for this dtype and device (decided once, when the layer is built)."""
    if torch.device(device).type == "cpu":
        if dtype == torch.float32 and native_linear.preferred():
            return PanelF32Method(dtype, gate_up)
        if dtype == torch.bfloat16 and bf16_linear.supported():
            return PanelBF16Method(dtype)
        if dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
            return OneDNNMethod(dtype)
    return DenseMethod(dtype)


def check_format(fmt: str, tensor: str) -> None:
    """Refuse a stored type that no method can hold, naming the tensor, its type and what is supported."""
    if fmt not in GGUF_BLOCK_FORMATS + DENSE_FORMATS:
        raise ValueError(f"tensor {tensor} is stored as {fmt}, which has no kernel; supported GGUF types: "
                         f"{', '.join(GGUF_BLOCK_FORMATS)}, F32, F16, BF16 (re-quantize the file to one of them, "
                         f"e.g. with llama-quantize)")


def method_for(formats: list[str], dtype: torch.dtype, device: torch.device | str, quantization: str | None,
               name: str, gate_up: bool = False,
               k_slice: tuple[int, int] | None = None) -> tuple[LinearMethod, str | None]:
    """The method for a layer whose checkpoint sub-matrices are stored in `formats` (one per fused part), and why
    blocks were dequantized (None when they were not).

    GGUF blocks stay blocks on the CPU when every part has the same block format and this rank's slice of K
    (`k_slice`, row-parallel layers) falls on block boundaries; otherwise the layer is dequantized to the
    activation dtype at load (the loader logs one line per reason)."""
    for fmt in formats:
        check_format(fmt, name)
    if quantization == "int8" and all(f in DENSE_FORMATS for f in formats):
        return Int8Method(dtype), None
    why = None
    if set(formats) & set(GGUF_BLOCK_FORMATS):
        block = quant_linear.FORMATS[formats[0]][0]
        if torch.device(device).type != "cpu":
            why = f"no {torch.device(device).type} kernel for GGUF blocks"
        elif len(set(formats)) > 1:
            why = "the parts of a fused layer are stored in different formats"
        elif k_slice is not None and (k_slice[0] % block or k_slice[1] % block):
            why = f"this rank's input columns are not whole {block}-wide blocks"
        else:
            return BlockMethod(dtype, formats[0]), None
    return dense_method(dtype, device, gate_up), why
