"""SliceGroup and LoraContext without a model: a group's slices equal one merged LoraLinear over the
same target whatever the call order (and with another group sharing the context's delta scratch in
between), and LoraContext's per-request row plans."""

import pytest
import torch
from torch import nn

from loraplex.layers import LoraContext, LoraLinear, LoraSliceLinear, SliceGroup
from loraplex.runtime import LoraTarget, PlanBuffers, SliceSpec

L, R, K = 4, 8, 32
TPR = [3, 1, 2, 4]  # tokens per request; request 1 has no adapter
TOKEN_SLOTS = torch.tensor(sum(([s] * n for s, n in zip([0, -1, 1, 3], TPR, strict=True)), []), dtype=torch.int32)


def _target(name, outs, seed):
    g = torch.Generator().manual_seed(seed)
    t = LoraTarget(name, [SliceSpec(f"{name}.{i}", K, n) for i, n in enumerate(outs)], "linear", L, R, torch.float32)
    t.ranks.copy_(torch.tensor([8, 3, 0, 5], dtype=torch.int32))
    for w in (*t.A, *t.B):
        w.copy_(torch.randn(w.shape, generator=g))
    for s, r in enumerate(t.ranks.tolist()):  # padding beyond each slot's rank is zero, as the pool keeps it
        for a in t.A:
            a[s, r:].zero_()
        for b in t.B:
            b[s, :, r:].zero_()
    return t


def _group(t, ctx, seed):
    torch.manual_seed(seed)
    bases = [nn.Linear(K, s.out_features) for s in t.slices]
    merged = nn.Linear(K, t.out_features)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([b.weight for b in bases]))
        merged.bias.copy_(torch.cat([b.bias for b in bases]))
    g = SliceGroup(t, ctx)
    return [LoraSliceLinear(b, g, i) for i, b in enumerate(bases)], LoraLinear(merged, t, ctx)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("rows", [10, 4])  # 10: a step's rows, above delta_rows; 4: one row per request
def test_slices_equal_merged_linear_in_any_order(order, rows):
    ctx = LoraContext(64, L, R, "cpu", delta_rows=6)
    qkv, merged = _group(_target("qkv", (32, 16, 16), 0), ctx, 0)
    other, _ = _group(_target("gate_up", (48, 48), 1), ctx, 1)  # wider: the scratch is strided for qkv
    ctx.set(PlanBuffers(64, L).build(TOKEN_SLOTS), TPR)
    x = torch.randn(rows, K)
    with torch.no_grad():
        want = merged(x)
        got = [None] * 3
        for i in order:
            got[i] = qkv[i](x)
            if i == order[0]:
                other[0](torch.randn(rows, K))  # another group overwrites the shared delta scratch
        got = torch.cat(got, -1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (want - torch.cat([b.base(x) for b in qkv], -1)).abs().max() > 0.1  # the adapters do something


def test_row_plan_is_the_step_plan_when_each_request_has_one_token():
    ctx = LoraContext(16, L, R, "cpu")
    buffers = PlanBuffers(16, L)
    plan = buffers.build(torch.tensor([0, -1, 2, 3], dtype=torch.int32))
    ctx.set(plan, [1, 1, 1, 1])
    assert ctx.plan_for_rows(4, "x") is plan  # rows == tokens == requests: the same plan either way
    rows = ctx._row_buffers.build(plan.token_slots.clone())  # what the per-request plan would have been
    for f in ("token_slots", "sorted_token_ids", "slot_start", "slot_count", "active_slots", "num_active"):
        assert torch.equal(getattr(rows, f), getattr(plan, f)), f


def test_row_plan_takes_each_requests_last_token():
    ctx = LoraContext(16, L, R, "cpu")
    ctx.set(PlanBuffers(16, L).build(TOKEN_SLOTS), TPR)
    assert ctx.plan_for_rows(4, "x").token_slots.tolist() == [0, -1, 1, 3]
    ctx.set(PlanBuffers(16, L).build(TOKEN_SLOTS[:6]), [3, 0, 1, 2])  # a request without tokens has no row
    assert ctx.plan_for_rows(3, "x").token_slots.tolist() == [0, -1, 1]
