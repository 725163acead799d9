"""int8 host slabs: a LoRA weight stored as int8 with one fp32 scale per rank component.

A LoRA delta is a sum over rank components (a row of A times a column of B). Each component gets its
own scale in A and in B, so a component with small weights is not flattened by a large one, and the
scales cost 2 x rank floats per module: the slab is close to half of its 16-bit size. The scale
runs along the rank dimension: rows of a linear A [r, in], columns of a B [out, r] or of an
embedding A stored as [vocab, r].

Symmetric rounding to [-127, 127]; an all-zero component gets scale 1 (its int8 values are 0).
Dequantizing is one multiply per weight (int8 x fp32 rounded once into the model dtype), done where
the weights land (on the GPU after the copy; on the CPU in the worker).
"""

from __future__ import annotations

import torch

QMAX = 127


def scale_shape(rows: int, cols: int, rank_dim: int) -> tuple[int, int]:
    """Shape the scales broadcast with: [rows, 1] when the rank runs along rows, else [1, cols]."""
    return (rows, 1) if rank_dim == 0 else (1, cols)


def quantize_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rank_dim: int) -> None:
    """x [rows, cols] (any float dtype) -> q [rows, cols] int8 and scale [rank] fp32, in place."""
    xf = x.float()
    amax = xf.abs().amax(dim=1 - rank_dim, keepdim=True)
    s = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q.copy_(torch.round(xf / s).clamp_(-QMAX, QMAX))
    scale.copy_(s.reshape(-1))


def dequantize_into(dst: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rank_dim: int) -> None:
    """dst [rows, cols] (model dtype, may be a strided view) = q * scale, one kernel, no temporary."""
    torch.mul(q, scale.view(scale_shape(q.shape[0], q.shape[1], rank_dim)), out=dst)


__all__ = ["QMAX", "dequantize_into", "quantize_into", "scale_shape"]
