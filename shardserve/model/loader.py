"""Builds this rank's model shard and drives each parameter's weight_loader over the checkpoint."""
from __future__ import annotations

import logging

import torch
from torch import nn

from shardserve.distributed.parallel_state import ParallelContext
from shardserve.model.checkpoint import open_checkpoint
from shardserve.model.layers import formats
from shardserve.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.model.layers.linear import LinearBase, default_weight_loader
from shardserve.model.registry import model_class
from shardserve.model.spec import ModelSpec

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec, ctx: ParallelContext, layer_range: tuple[int, int], dtype: torch.dtype,
               quantization: str | None = None) -> nn.Module:
    """Allocate only this rank's shard (layers of other stages are placeholders) in the formats the checkpoint
    stores (or `quantization` asks for), fill it, and let each layer's method process what it loaded."""
    reader = open_checkpoint(spec)
    with torch.device(ctx.device):
        model = model_class(spec.architecture)(spec, ctx, layer_range, dtype)
        choose_formats(model, reader, dtype, ctx.device, quantization)
    load_weights(model, reader)
    for module in reversed(list(model.modules())):             # children before the modules holding them
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model.eval()


def choose_formats(model: nn.Module, reader, dtype: torch.dtype, device: torch.device,
                   quantization: str | None) -> None:
    """Give each layer the method for what its checkpoint tensors hold (GGUF blocks stay blocks) before loading."""
    parts_of, dequantized = {}, {}
    for part, (fused, _) in getattr(model, "packed_modules_mapping", {}).items():
        parts_of.setdefault(fused, []).append(part)
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding):
            fmt = reader.tensor_format(f"{name}.weight")
            if fmt in formats.GGUF_BLOCK_FORMATS and device.type == "cpu":
                module.use_format(fmt)
        elif isinstance(module, LinearBase):
            prefix, _, leaf = name.rpartition(".")
            parts = [f"{prefix}.{part}.weight" for part in parts_of.get(leaf, [])] or [f"{name}.weight"]
            fmts = [reader.tensor_format(part) for part in parts]
            method, why = formats.method_for(fmts, dtype, device, None if isinstance(module, ParallelLMHead) else
                                             quantization, name, gate_up=module.gate_up, k_slice=module.k_slice)
            if why:
                dequantized.setdefault(why, []).append(name)
            if (isinstance(module, ParallelLMHead) and isinstance(method, formats.OneDNNMethod)
                    and getattr(model, "ties_on_this_rank", lambda: False)()):
                # a reordered copy could not serve the embedding's row lookups: keep one plain copy for both
                # (bf16 SmolLM2: 57 MB less, +1.8 ms per decode step in F.linear)
                method = formats.DenseMethod(dtype)
            if type(method) is not type(module.method) or method.format != module.method.format:
                module.use_method(method)
    for why, names in dequantized.items():
        log.warning("%d layers (%s%s) are dequantized to %s at load: %s", len(names), ", ".join(names[:3]),
                    ", ..." if len(names) > 3 else "", dtype, why)


def load_weights(model: nn.Module, reader) -> None:
    """Map every checkpoint tensor onto the parameter that wants it; tensors of other stages are skipped."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    aliases = model.checkpoint_aliases() if hasattr(model, "checkpoint_aliases") else {}
    loaded: set[str] = set()
    for name in reader.names():
        targets = [name] + ([aliases[name]] if name in aliases else [])
        for target in targets:
            param_name, shard_id = _fused_name(target, packed)
            param = params.get(param_name)
            if param is None:
                continue                      # owned by another pipeline stage, or not a parameter here
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, reader.get(name), shard_id)
            loaded.add(param_name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _fused_name(name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    for part, (fused, shard_id) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None
