"""LazyTensor: a checkpoint tensor that reads (and dequantizes) only the slice a rank asks for."""
from __future__ import annotations

import torch


class LazyTensor:
    """A checkpoint tensor that reads (and dequantizes) only the slice asked for."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype as stored; GGUF tensors are always presented as float32

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])

    def _check(self, dim: int, start: int, length: int) -> None:
        if dim < 0:
            dim += len(self.shape)
        if not 0 <= dim < len(self.shape):
            raise IndexError(f"dim {dim} out of range for shape {self.shape}")
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {self.shape}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"
