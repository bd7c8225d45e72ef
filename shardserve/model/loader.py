"""Builds this rank's model shard and drives each parameter's weight_loader over the checkpoint."""
from __future__ import annotations

import torch
from torch import nn

from shardserve.distributed.parallel_state import ParallelContext
from shardserve.model.checkpoint import open_checkpoint
from shardserve.model.layers.linear import LinearBase, default_weight_loader
from shardserve.model.registry import model_class
from shardserve.model.spec import ModelSpec


def load_model(spec: ModelSpec, ctx: ParallelContext, layer_range: tuple[int, int], dtype: torch.dtype,
               prepack: bool = True) -> nn.Module:
    """Allocate only this rank's shard (layers of other stages are placeholders) and fill it."""
    with torch.device(ctx.device):
        model = model_class(spec.architecture)(spec, ctx, layer_range, dtype)
    load_weights(model, open_checkpoint(spec))
    if prepack and ctx.device.type == "cpu":
        for module in model.modules():
            if isinstance(module, LinearBase):
                module.prepack()
    return model.eval()


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
