"""Shrink and expand Triton kernels (interpreted on CPU) against the fp32 reference."""

import pytest
import torch

from loraplex.kernels import reference
from loraplex.kernels.sgmv_expand import launch_expand
from loraplex.kernels.sgmv_shrink import launch_shrink

from .cases import DTYPES, MIXES, POISON, assert_rows, plan_for, random_ranks, stacked_A, stacked_B, token_slots

# Small tiles so that every loop and mask runs more than once at test sizes (K, N, rank, tokens).
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16, BLOCK_K=16)


def _shrink_case(dtype, mix, T, K, R, L, n_slices, seed, none_frac=0.25, cfg=None, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = plan_for(slots, ranks, L)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = stacked_A(L, R, K, ranks, dtype, gen, n_slices)
    out = torch.full((n_slices, T, R), POISON)
    launch_shrink(x, A, plan, out, scale, config=cfg)
    ref = reference.sgmv_shrink(x, A, plan, torch.full_like(out, POISON), scale, ranks)
    assert_rows(out, ref, slots, dtype, torch.full_like(out, POISON), f"shrink {dtype} {mix}")


def _expand_case(dtype, mix, T, widths, R, L, seed, add, none_frac=0.25, cfg=None):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = plan_for(slots, ranks, L)
    h = torch.randn(len(widths), T, R, generator=gen)
    for s, r in enumerate(ranks.tolist()):  # shrink's contract: zero past the rank
        h[:, slots == s, r:] = 0
    B = stacked_B(L, widths, R, ranks, dtype, gen)
    y0 = torch.randn(T, sum(widths), generator=gen).to(dtype) if add else torch.full((T, sum(widths)), POISON,
                                                                                         dtype=dtype)
    y = launch_expand(h, B, plan, y0.clone(), add, config=cfg)
    ref = reference.sgmv_expand(h, B, plan, y0.clone(), add, ranks)
    assert_rows(y, ref, slots, dtype, y0, f"expand {dtype} {mix} add={add}")


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_mixes(dtype, mix):
    _shrink_case(dtype, mix, T=24, K=72, R=32, L=6, n_slices=2, seed=hash(mix) % 1000, cfg=SMALL)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_mixes(dtype, mix):
    _expand_case(dtype, mix, T=24, widths=(40, 24), R=32, L=6, seed=hash(mix) % 1000, add=True, cfg=SMALL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("add", [True, False], ids=["add", "overwrite"])
def test_expand_three_slices_of_different_widths(dtype, add):
    _expand_case(dtype, "uniform", T=20, widths=(48, 17, 1), R=16, L=4, seed=3, add=add, cfg=SMALL)


@pytest.mark.parametrize("n_slices", [1, 2, 3])
def test_shrink_slices(n_slices):
    _shrink_case(torch.float16, "uniform", T=17, K=129, R=16, L=4, n_slices=n_slices, seed=n_slices, cfg=SMALL)


@pytest.mark.parametrize("T", [1, 2, 17, 64])
def test_token_counts_default_config(T):
    """Whatever block sizes the CPU heuristic picks."""
    _shrink_case(torch.float16, "zipf", T=T, K=129, R=8, L=5, n_slices=3, seed=T)
    _expand_case(torch.float16, "zipf", T=T, widths=(33, 7, 7), R=8, L=5, seed=T, add=True)


@pytest.mark.parametrize("none_frac", [0.0, 1.0], ids=["no-minus-one", "all-minus-one"])
def test_slot_minus_one_absent_and_all(none_frac):
    _shrink_case(torch.float32, "uniform", T=9, K=40, R=16, L=3, n_slices=2, seed=5, none_frac=none_frac)
    _expand_case(torch.float32, "uniform", T=9, widths=(20, 12), R=16, L=3, seed=5, add=False, none_frac=none_frac)


def test_odd_sizes_and_rank_one():
    """hidden 129, max rank 1 (every tile mostly masked), odd widths."""
    _shrink_case(torch.bfloat16, "skewed", T=13, K=129, R=1, L=3, n_slices=1, seed=7, cfg=SMALL)
    _expand_case(torch.bfloat16, "skewed", T=13, widths=(129,), R=1, L=3, seed=7, add=True, cfg=SMALL)


def test_lm_head_like_wide_expand():
    """Many column blocks on grid axis 0 (an lm_head's vocab-wide output, small here)."""
    _expand_case(torch.float16, "uniform", T=5, widths=(1000,), R=16, L=3, seed=9, add=True,
                 cfg=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16))


def test_strided_rows_and_max_active_bound():
    """x and y as column views of wider tensors (row stride != width); a tight max_active."""
    gen = torch.Generator().manual_seed(11)
    T, K, R, L = 10, 48, 16, 8
    slots = torch.tensor([2, 5, -1, 2, 5, 5, 2, -1, 5, 2], dtype=torch.int32)
    ranks = random_ranks(L, R, gen)
    plan = plan_for(slots, ranks, L, max_tokens=32, max_active=2)
    wide = torch.randn(T, K + 8, generator=gen).half()
    x = wide[:, 4:4 + K]
    A = stacked_A(L, R, K, ranks, torch.float16, gen, 1)
    big = torch.full((1, 40, R), POISON)
    out = big[:, :T]  # a view of a larger scratch buffer, as add_lora_linear passes it
    launch_shrink(x, A, plan, out)
    ref = reference.sgmv_shrink(x, A, plan, torch.full((1, T, R), POISON), 1.0, ranks)
    assert_rows(out, ref, slots, torch.float16, torch.full_like(out, POISON), "shrink strided")
    assert big[:, T:].isnan().all()
    B = stacked_B(L, (24,), R, ranks, torch.float16, gen)
    ywide = torch.randn(T, 40, generator=gen).half()
    y0 = ywide.clone()
    launch_expand(ref, B, plan, ywide[:, 8:32])
    yref = reference.sgmv_expand(ref, B, plan, y0[:, 8:32].clone(), True, ranks)
    assert_rows(ywide[:, 8:32], yref, slots, torch.float16, y0[:, 8:32], "expand strided")
    assert torch.equal(ywide[:, :8], y0[:, :8]) and torch.equal(ywide[:, 32:], y0[:, 32:])


def test_ranks_argument_overrides_plan():
    """ranks=... takes precedence over plan.slot_ranks (a target's own ranks tensor)."""
    gen = torch.Generator().manual_seed(12)
    T, K, R, L = 6, 32, 16, 3
    slots = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    ranks = torch.tensor([16, 3, 9], dtype=torch.int32)
    plan = plan_for(slots, torch.zeros(L, dtype=torch.int32), L)  # plan's own ranks: all 0
    x = torch.randn(T, K, generator=gen)
    A = stacked_A(L, R, K, ranks, torch.float32, gen, 1)
    out = torch.full((1, T, R), POISON)
    launch_shrink(x, A, plan, out, ranks=ranks)
    ref = reference.sgmv_shrink(x, A, plan, torch.full_like(out, POISON), 1.0, ranks)
    assert_rows(out, ref, slots, torch.float32, out, "ranks override")
    assert out[:, slots != 0, 9:].eq(0).all() and not out[:, slots == 0, 9:].eq(0).all()
