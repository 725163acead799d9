"""BatchPlan against a plain-Python construction of the same metadata."""

import pytest
import torch

from loraplex.errors import LaunchError
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
