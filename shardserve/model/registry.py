"""Architecture name -> model class."""
from __future__ import annotations

from torch import nn

from shardserve.model.llama import LlamaForCausalLM
from shardserve.model.spec import SUPPORTED_ARCHITECTURES

_MODELS: dict[str, type[nn.Module]] = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {', '.join(_MODELS)}")
    return _MODELS[architecture]
