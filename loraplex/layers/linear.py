"""LoRA-wrapped linear layers: the base output as before, plus the LoRA delta of each row's adapter,
applied by the SGMV ops from the current step's plan."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class LoraLinear(nn.Module):
    """Column, row or lm_head linear (one slice), or a merged linear whose output concatenates
    several slices (a fused qkv or gate_up projection): one launch covers every slice."""

    def __init__(self, base: nn.Linear, target, context):
        super().__init__()
        if target.out_features != base.out_features:
            raise ValueError(f"{target.name}: slices sum to {target.out_features}, base has {base.out_features}")
        self.base = base
        self.target = target
        self.context = context

    def forward(self, x):
        y = self.base(x)
        plan = self.context.plan_for_rows(x.numel() // x.shape[-1], self.target.name)
        if plan is None:
            return y
        t = self.target
        # nn.Linear's output is freshly allocated and contiguous: the view aliases it
        ops.add_lora_linear(y.view(-1, y.shape[-1]), _rows(x).contiguous(), t.A, t.B, plan, t.ranks,
                            self.context.buffer)
        return y


class LoraSliceLinear(nn.Module):
    """One slice of a group that shares its input (q, k, v of HF attention; gate, up of an MLP).

    The first slice of the group called in a step computes the delta of every slice in one launch;
    the others reuse it when they are called with the very same input tensor (as HF's attention and
    MLP do), and compute their own slice otherwise, so results never depend on the call pattern."""

    def __init__(self, base: nn.Linear, group: SliceGroup, index: int):
        super().__init__()
        self.base = base
        self.group = group
        self.index = index

    def forward(self, x):
        y = self.base(x)
        delta = self.group.delta(x, self.index)
        if delta is None:
            return y
        return y + delta.view(y.shape).to(y.dtype)


class SliceGroup:
    def __init__(self, target, context):
        self.target = target
        self.context = context
        self._key = None
        self._x = None
        self._delta = None

    def delta(self, x, index):
        ctx, t = self.context, self.target
        plan = ctx.plan_for_rows(x.numel() // x.shape[-1], t.name)
        if plan is None:
            return None
        lo = t.out_offsets[index]
        hi = lo + t.slices[index].out_features
        if self._x is x and self._key == ctx.step_id:
            return self._delta[:, lo:hi]
        x2 = _rows(x).contiguous()
        if index == 0:
            d = torch.zeros(x2.shape[0], t.out_features, dtype=x.dtype, device=x.device)
            ops.add_lora_linear(d, x2, t.A, t.B, plan, t.ranks, ctx.buffer)
            self._key, self._x, self._delta = ctx.step_id, x, d
            return d[:, lo:hi]
        d = torch.zeros(x2.shape[0], hi - lo, dtype=x.dtype, device=x.device)
        ops.add_lora_linear(d, x2, [t.A[index]], [t.B[index]], plan, t.ranks, ctx.buffer)
        return d
