"""The weight format each layer gets at load (formats.method_for): blocks stay blocks only where a kernel takes them."""
from __future__ import annotations

import pytest
import torch

from shardserve.kernels.cpu import bf16_linear, native_linear
from shardserve.model.layers import formats


def test_uniform_blocks_stay_blocks():
    method, why = formats.method_for(["Q4_K", "Q4_K"], torch.float32, "cpu", None, "gate_up", gate_up=True)
    assert isinstance(method, formats.BlockMethod) and method.format == "Q4_K" and why is None


def test_row_parallel_shard_on_block_boundaries_stays_blocks():
    method, why = formats.method_for(["Q8_0"], torch.float32, "cpu", None, "o_proj", k_slice=(64, 32))
    assert isinstance(method, formats.BlockMethod) and why is None


@pytest.mark.parametrize("fmts,k_slice,device,reason", [
    (["Q4_K", "Q4_K", "Q6_K"], None, "cpu", "different formats"),           # a Q4_K_M file's qkv
    (["Q4_K"], (256, 128), "cpu", "not whole 256-wide blocks"),            # an uneven head split
    (["Q8_0"], None, "cuda", "no cuda kernel"),
])
def test_blocks_no_kernel_takes_are_dequantized_with_the_reason(fmts, k_slice, device, reason):
    method, why = formats.method_for(fmts, torch.float32, device, None, "layer", k_slice=k_slice)
    assert not isinstance(method, formats.BlockMethod) and reason in why


def test_dense_method_by_dtype_and_device():
    panel = native_linear.preferred()
    assert isinstance(formats.dense_method(torch.float32, "cpu"),
                      formats.PanelF32Method if panel else formats.OneDNNMethod)
    assert isinstance(formats.dense_method(torch.bfloat16, "cpu"),
                      formats.PanelBF16Method if bf16_linear.supported() else formats.OneDNNMethod)
    assert type(formats.dense_method(torch.float16, "cuda")) is formats.DenseMethod


def test_int8_applies_to_dense_parts_only():
    method, _ = formats.method_for(["dense"], torch.float32, "cpu", "int8", "qkv")
    assert isinstance(method, formats.Int8Method)
    method, _ = formats.method_for(["Q8_0"], torch.float32, "cpu", "int8", "qkv")
    assert isinstance(method, formats.BlockMethod)


def test_unknown_type_names_tensor_type_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"tensor blk.3.ffn_down.weight is stored as IQ2_XS, which has no kernel; "
                                         r"supported GGUF types: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"):
        formats.check_format("IQ2_XS", "blk.3.ffn_down.weight")
