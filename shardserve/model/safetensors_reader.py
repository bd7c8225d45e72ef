"""Safetensors checkpoints: the files of an HF folder opened for lazy, sliced reads (mmap)."""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from shardserve.model.lazy_tensors import LazyTensor

def open_safetensors(folder: str) -> dict[str, Any]:
    """Tensor name -> the open safe_open handle of the file holding it (model.safetensors.index.json if present)."""
    from safetensors import safe_open
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
        if not os.path.isfile(index):
            for n in handles[fname].keys():
                weight_map[n] = fname
    return {n: handles[fname] for n, fname in weight_map.items()}


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
