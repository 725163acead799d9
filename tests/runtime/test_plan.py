"""BatchPlan against a plain-Python construction of the same metadata."""

import pytest
import torch

from loraplex.errors import LaunchError
from loraplex.kernels.tiles import TILE_SIZES, tile_bound
from loraplex.runtime.plan import PlanBuffers


def _python_plan(slots, L):
    order = sorted(range(len(slots)), key=lambda t: slots[t])  # sorted() is stable
    count = [sum(1 for s in slots if s == k) for k in range(L)]
    start = [sum(1 for s in slots if s < k) for k in range(L)]
    present = [k for k in range(L) if count[k]]
    return dict(sorted=order, count=count, start=start, active=present + [k for k in range(L) if not count[k]],
                num_active=len(present))


def _check(plan, slots, L):
    want = _python_plan(slots, L)
    T = len(slots)
    assert plan.num_tokens == T
    assert plan.token_slots.tolist() == slots
    assert plan.sorted_token_ids.tolist() == want["sorted"]
    assert plan.slot_count.tolist() == want["count"]
    assert plan.slot_start.tolist() == want["start"]
    assert plan.active_slots.tolist() == want["active"]
    assert plan.num_active.tolist() == [want["num_active"]]
    for k in range(L):  # each segment holds exactly the tokens of its slot, in token order
        seg = plan.sorted_token_ids[plan.slot_start[k]: plan.slot_start[k] + plan.slot_count[k]].tolist()
        assert seg == [t for t in range(T) if slots[t] == k]
    for tensor in (plan.token_slots, plan.sorted_token_ids, plan.slot_start, plan.slot_count, plan.active_slots,
                   plan.num_active, plan.slot_ranks):
        assert tensor.dtype == torch.int32


@pytest.mark.parametrize("seed", range(12))
def test_random_slot_vectors_match_python(seed):
    gen = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 9, (1,), generator=gen))
    T = int(torch.randint(1, 40, (1,), generator=gen))
    none_frac = [0.0, 0.3, 1.0][seed % 3]
    slots = torch.randint(L, (T,), generator=gen)
    slots = torch.where(torch.rand(T, generator=gen) < none_frac, -1, slots).to(torch.int32)
    ranks = torch.randint(0, 65, (L,), generator=gen, dtype=torch.int32)
    plan = PlanBuffers(64, L).build(slots, ranks)
    _check(plan, slots.tolist(), L)
    assert plan.slot_ranks.tolist() == ranks.tolist()
    assert plan.max_active == L


def test_all_minus_one_and_empty():
    buf = PlanBuffers(8, 4)
    _check(buf.build(torch.full((5,), -1, dtype=torch.int32)), [-1] * 5, 4)
    empty = buf.build(torch.zeros(0, dtype=torch.int32))
    _check(empty, [], 4)
    assert empty.num_active.item() == 0


def test_buffers_are_reused_across_steps():
    """The same static storage serves every step (what a captured CUDA graph needs); a shorter step
    after a longer one sees none of the old tokens."""
    buf = PlanBuffers(16, 5)
    first = buf.build(torch.tensor([4, 4, 1, 0, 3, 2, 2, 4, 1, 0, 0, 3], dtype=torch.int32))
    second = buf.build(torch.tensor([2, -1, 2], dtype=torch.int32))
    _check(second, [2, -1, 2], 5)
    assert second.sorted_token_ids.data_ptr() == first.sorted_token_ids.data_ptr()
    assert second.slot_start.data_ptr() == first.slot_start.data_ptr()
    assert second.num_active.data_ptr() == first.num_active.data_ptr()


def test_in_place_token_slots_and_max_active():
    buf = PlanBuffers(8, 6)
    buf.token_slots[:4].copy_(torch.tensor([5, 0, 5, -1], dtype=torch.int32))
    plan = buf.build(buf.token_slots[:4], max_active=2)
    _check(plan, [5, 0, 5, -1], 6)
    assert plan.max_active == 2
    assert buf.build(buf.token_slots[:4], max_active=99).max_active == 6


def test_errors():
    buf = PlanBuffers(4, 2)
    with pytest.raises(LaunchError, match="at most 4 tokens"):
        buf.build(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(LaunchError, match="must be int32"):
        buf.build(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(LaunchError, match="max_tokens >= 1"):
        PlanBuffers(0, 2)


def _python_tiles(slots, L, bm):
    """[(slot, first index into the sorted ids, rows)] of every work tile, slots ascending."""
    out, first = [], sum(1 for s in slots if s < 0)
    for k in range(L):
        count = sum(1 for s in slots if s == k)
        for m0 in range(0, count, bm):
            out.append((k, first + m0, min(bm, count - m0)))
        first += count
    return out


@pytest.mark.parametrize("seed", range(8))
def test_work_lists_match_python(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    L = int(torch.randint(1, 9, (1,), generator=gen))
    T = int(torch.randint(1, 150, (1,), generator=gen))
    slots = torch.randint(L, (T,), generator=gen)
    if seed % 2:  # a hot adapter: segments longer than every tile size
        slots = torch.where(torch.rand(T, generator=gen) < 0.7, 0, slots)
    slots = torch.where(torch.rand(T, generator=gen) < 0.2, -1, slots).to(torch.int32)
    buf = PlanBuffers(160, L)
    buf.build(torch.full((160,), max(0, L - 1), dtype=torch.int32))  # a longer, different plan first
    plan = buf.build(slots)
    for i, bm in enumerate(TILE_SIZES):
        want = _python_tiles(slots.tolist(), L, bm)
        assert plan.n_tiles[i].item() == len(want)
        assert len(want) <= tile_bound(T, bm, L) and len(want) <= tile_bound(T, bm, len(set(slots.tolist()) - {-1}))
        got = plan.tiles[i]
        assert [tuple(r) for r in got[: len(want), :3].tolist()] == want
        assert not got[len(want):, 2].any(), "records past the real tiles must have no rows"


def test_tile_bound_is_tight():
    assert tile_bound(1, 16, 32) == 1 and tile_bound(0, 16, 4) == 0 and tile_bound(5, 16, 0) == 0
    assert tile_bound(32, 16, 32) == 32  # 32 adapters of one token each
    assert tile_bound(32, 16, 1) == 2
    assert tile_bound(256, 64, 32) == 35  # 4 full tiles' worth plus a partial tile per adapter at most


def test_static_plans_bound_the_grid_by_every_slot(make_runtime, catalog_dir, monkeypatch):
    """A graph replays the launches it captured. Captured with a static plan of one adapter, replayed
    after a static plan of three was written into the same buffers, every adapter must still apply.
    Emulated on CPU: the kernel launches of the first plan are recorded and replayed verbatim."""
    from loraplex.kernels import ops, reference

    from ..kernels.launches import Recorder

    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    rt = make_runtime(catalog_dir, max_loras=4)
    t = next(t for t in rt.targets if t.name == "model.layers.0.qkv")  # alpha and beta adapt it
    K, N = t.slices[0].in_features, t.out_features
    x, y = torch.zeros(3, K), torch.zeros(3, N)
    gen = torch.Generator().manual_seed(0)
    for path in ("fused", "shrink+expand"):
        monkeypatch.setattr(ops, "use_fused", lambda T, device, rank=16, p=path: p == "fused")
        first = rt.plan(["alpha-r4", None, "alpha-r4"], static=True)
        assert first.max_active == rt.config.max_loras
        rec = Recorder(monkeypatch)
        ops.add_lora_linear(y, x, t.A, t.B, first, t.ranks, buffer=torch.zeros(3, 3, t.max_rank))
        rt.release(first)
        second = rt.plan(["beta-r8", "alpha-r4", "gamma-r16"], static=True)
        assert second.sorted_token_ids.data_ptr() == first.sorted_token_ids.data_ptr()
        x.copy_(torch.randn(3, K, generator=gen))
        y0 = torch.randn(3, N, generator=gen)
        y.copy_(y0)
        rec.replay()
        ref = reference.add_lora_linear(y0.clone(), x, t.A, t.B, second, t.ranks)
        assert not torch.equal(ref[0], y0[0]), "beta adapts this module: the check must be able to fail"
        # the runtime tests' fp32 tolerance (check_plan): these adapters' deltas are not normalized to O(1)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4, msg=lambda m, p=path: f"{p} replay: {m}")
        rt.release(second)


@pytest.mark.parametrize("bad", [4, 99, -2])
def test_out_of_range_slot_is_named(bad):
    """A slot outside [-1, max_loras) is the caller's bug: a LaunchError naming the token and the slot
    (on a GPU an out-of-bounds index would be a device-side assert that takes the CUDA context down)."""
    buf = PlanBuffers(8, 4)
    slots = torch.tensor([0, 1, -1, bad, 2], dtype=torch.int32)
    with pytest.raises(LaunchError, match=rf"token 3 has slot {bad}\b.*\[0, 4\)"):
        buf.build(slots)
    _check(buf.build(torch.tensor([0, 3, -1], dtype=torch.int32)), [0, 3, -1], 4)  # the buffers still work
