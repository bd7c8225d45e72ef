"""The accuracy bound the float32-activation GEMM kernels are held to against a float64 reference."""
from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def check_product(y: torch.Tensor, x: torch.Tensor, deq: np.ndarray, bias: torch.Tensor | None, c: float = 8) -> None:
    """y against the float64 x W^T (+ bias) of the dequantized weights `deq`, within float32 summation rounding:
    |y - ref| <= c * eps32 * (sum_k |x_k w_k| + |b|) (the kernels' activations stay float32)."""
    xn = x.double().numpy()
    b = 0.0 if bias is None else bias.double().numpy()
    ref = xn @ deq.T + b
    bound = c * EPS32 * (np.abs(xn) @ np.abs(deq).T + np.abs(b)) + 1e-30
    np.testing.assert_array_less(np.abs(y.double().numpy() - ref), bound)
