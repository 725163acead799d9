"""LoRA-wrapped linear layers: the base output as before, plus the LoRA delta of each row's adapter,
applied by the SGMV ops from the current step's plan, in place into the base output. Decode-sized
steps allocate nothing: the fp32 intermediate and a slice group's delta live in the context's scratch."""

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
        ctx, t = self.context, self.target
        rows = x.numel() // x.shape[-1]
        plan = ctx.plan_for_rows(rows, t.name)
        if plan is None or plan.max_active == 0:  # no adapter in the step (e.g. all merged): the base layer
            return self.base(x)
        x2 = _rows(x).contiguous()
        if ctx.side is None:
            y = self.base(x)
            # nn.Linear's output is freshly allocated and contiguous: the view aliases it
            ops.add_lora_linear(y.view(-1, y.shape[-1]), x2, t.A, t.B, plan, t.ranks, ctx.buffer)
            return y
        h = ctx.shrink_out(len(t.A), rows, t.A[0].shape[1])
        ctx.side.shrink(x2, t.A, plan, h, t.ranks)  # concurrent with the base GEMM (overlap.py)
        y = self.base(x)
        ctx.side.join()
        ops.sgmv_expand(h, t.B, plan, y.view(-1, y.shape[-1]), True, t.ranks)
        return y


class LoraSliceLinear(nn.Module):
    """One slice of a group that shares its input (q, k, v of HF attention; gate, up of an MLP).

    The first slice of the group called in a step computes the delta of every slice in one launch;
    the others reuse it when they are called with the very same input tensor (as HF's attention and
    MLP do), and the group computes it again otherwise, so results never depend on the call pattern."""

    def __init__(self, base: nn.Linear, group: SliceGroup, index: int):
        super().__init__()
        self.base = base
        self.group = group
        self.index = index

    def forward(self, x):
        self.group.start(x)  # with overlap: the group's shrink runs under this base GEMM
        y = self.base(x)
        delta = self.group.delta(x, self.index)
        if delta is None:
            return y
        return y.add_(delta.view(y.shape).to(y.dtype))  # y is nn.Linear's fresh output: add in place


class SliceGroup:
    """The stacked target of a group of LoraSliceLinear. The group's delta [rows, sum of slice outs]
    lives in the context (context.delta: which group and input it was computed for), in its static
    scratch for decode-sized inputs, so every group of a model shares one buffer and a decode step
    allocates nothing; like the context, a group is used by one thread at a time."""

    def __init__(self, target, context):
        self.target = target
        self.context = context
        context.reserve_delta(target.out_features, target.dtype)

    def delta(self, x, index):
        """The LoRA delta of slice `index` for input x ([rows, out of the slice], a view), or None."""
        ctx, t = self.context, self.target
        plan = ctx.plan_for_rows(x.numel() // x.shape[-1], t.name)
        if plan is None or plan.max_active == 0:
            return None
        lo = t.out_offsets[index]
        hi = lo + t.slices[index].out_features
        cached = ctx.delta
        if cached is not None and cached[0] is self and cached[1] is x:
            return cached[2][:, lo:hi]
        pending = ctx.pending
        if pending is not None and pending[0] is self and pending[1] is x:
            _, _, x2, h, plan = pending
            ctx.pending = None
            ctx.side.join()
            d = ctx.delta_buffer(x2.shape[0], t.out_features, x.dtype, x.device)
            ops.sgmv_expand(h, t.B, plan, d, True, t.ranks)
        else:
            x2 = _rows(x).contiguous()
            d = ctx.delta_buffer(x2.shape[0], t.out_features, x.dtype, x.device)
            ops.add_lora_linear(d, x2, t.A, t.B, plan, t.ranks, ctx.buffer)
        ctx.delta = (self, x, d)
        return d[:, lo:hi]

    def start(self, x) -> None:
        """With overlap on: issue the group's shrink on the side stream, once per input."""
        ctx, t = self.context, self.target
        if ctx.side is None:
            return
        cached, pending = ctx.delta, ctx.pending
        if (cached is not None and cached[0] is self and cached[1] is x) or (
                pending is not None and pending[0] is self and pending[1] is x):
            return
        rows = x.numel() // x.shape[-1]
        plan = ctx.plan_for_rows(rows, t.name)
        if plan is None or plan.max_active == 0:
            return
        if pending is not None:  # another group's shrink never expanded (its layer was skipped): wait for it
            ctx.side.join()
        x2 = _rows(x).contiguous()
        h = ctx.shrink_out(len(t.A), rows, t.A[0].shape[1])
        ctx.side.shrink(x2, t.A, plan, h, t.ranks)
        ctx.pending = (self, x, x2, h, plan)
