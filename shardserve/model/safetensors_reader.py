"""Safetensors checkpoints: the files of an HF folder memory-mapped, tensors served as views of the map."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from shardserve.model.lazy_tensors import LazyTensor
from shardserve.model.spec_reader import read_safetensors_header

_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class MappedSafetensors:
    """One .safetensors file: its JSON header parsed, its bytes in one copy-on-write memory map (never written)."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.base = read_safetensors_header(path)
        self.bytes = torch.from_numpy(np.memmap(path, mode="c", dtype=np.uint8)) if self.entries else None

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor, a view of the map (reading it pages the file in; copying it is the one copy)."""
        entry = self.entries[name]
        dtype = _TORCH.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} is stored as {entry['dtype']}, which shardserve does not "
                             f"read; supported: {', '.join(_TORCH)}")
        begin, end = entry["data_offsets"]
        raw = self.bytes[self.base + begin:self.base + end]
        if (self.base + begin) % dtype.itemsize:           # the format does not promise alignment: copy it
            raw = raw.clone()
        return raw.view(dtype).view(entry["shape"])


def open_safetensors(folder: str) -> dict[str, MappedSafetensors]:
    """Tensor name -> the mapped file holding it (model.safetensors.index.json if present)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        weight_map = {}
    handles = {fname: MappedSafetensors(os.path.join(folder, fname)) for fname in files}
    if not os.path.isfile(index):
        weight_map = {n: fname for fname, handle in handles.items() for n in handle.entries}
    return {n: handles[fname] for n, fname in weight_map.items()}


class SafetensorsLazyTensor(LazyTensor):
    """A tensor inside a mapped .safetensors file; narrow() returns a view of the file in the stored dtype, so the
    caller's copy into its parameter is the only copy."""

    def __init__(self, handle: MappedSafetensors, name: str):
        self._values = handle.tensor(name)
        self.name = name
        self.shape = tuple(self._values.shape)
        self.dtype = self._values.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim < 0:
            dim += len(self.shape)
        self._check(dim, start, length)
        return self._values.narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self._values
