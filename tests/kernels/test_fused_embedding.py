"""Fused shrink+expand and embedding LoRA kernels (interpreted on CPU) against the fp32 reference."""

import pytest
import torch

from loraplex.kernels import reference
from loraplex.kernels.embedding import launch_embedding
from loraplex.kernels.sgmv_fused import launch_fused

from .cases import DTYPES, MIXES, POISON, assert_rows, plan_for, random_ranks, stacked_A, stacked_B, token_slots


def _fused_case(dtype, mix, T, K, widths, R, L, seed, none_frac=0.25, cfg=None, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = plan_for(slots, ranks, L)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = stacked_A(L, R, K, ranks, dtype, gen, len(widths))
    B = stacked_B(L, widths, R, ranks, dtype, gen)
    y0 = torch.randn(T, sum(widths), generator=gen).to(dtype)
    y = launch_fused(y0.clone(), x, A, B, plan, scale, config=cfg)
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks, None, scale)
    assert_rows(y, ref, slots, dtype, y0, f"fused {dtype} {mix}")


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_mixes(dtype, mix):
    # SPLIT_N=2 and 16-wide tiles: several column blocks per program, K and rank loops masked
    _fused_case(dtype, mix, T=12, K=72, widths=(40, 24, 8), R=32, L=5, seed=hash(mix) % 1000,
                cfg=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_N=2))


@pytest.mark.parametrize("T", [1, 3, 16])
def test_fused_decode_sizes_default_config(T):
    _fused_case(torch.float16, "distinct", T=T, K=129, widths=(33,), R=16, L=4, seed=T)


def test_fused_all_minus_one_and_rank_one():
    _fused_case(torch.float32, "uniform", T=4, K=40, widths=(20, 12), R=16, L=3, seed=1, none_frac=1.0)
    _fused_case(torch.bfloat16, "identical", T=4, K=40, widths=(20,), R=1, L=2, seed=2)


def _embedding_case(dtype, mix, T, V, D, R, L, seed, none_frac=0.25, cfg=None):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = plan_for(slots, ranks, L)
    ids = torch.randint(V, (T,), generator=gen)
    ids[: min(T, 2)] = torch.tensor([-1, V])[: min(T, 2)]  # out of vocabulary: adds nothing
    A = stacked_B(L, (V,), R, ranks, dtype, gen)[0]  # [L, V, R], NaN past each slot's rank
    B = stacked_B(L, (D,), R, ranks, dtype, gen)[0]
    y0 = torch.randn(T, D, generator=gen).to(dtype)
    y = launch_embedding(y0.clone(), ids, A, B, plan, config=cfg)
    ref = reference.add_lora_embedding(y0.clone(), ids, A, B, plan, ranks)
    assert_rows(y, ref, slots, dtype, y0, f"embedding {dtype} {mix}")
    for t in range(min(T, 2)):  # out-of-vocabulary rows unchanged
        assert torch.equal(y[t], y0[t])


@pytest.mark.parametrize("mix", ["uniform", "zipf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding(dtype, mix):
    _embedding_case(dtype, mix, T=20, V=50, D=40, R=32, L=4, seed=4,
                    cfg=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16))


@pytest.mark.parametrize("T", [1, 33])
def test_embedding_default_config(T):
    _embedding_case(torch.float16, "skewed", T=T, V=70, D=24, R=8, L=3, seed=T)


def test_embedding_int32_ids_and_poison_free_rows():
    gen = torch.Generator().manual_seed(5)
    T, V, D, R, L = 6, 10, 8, 4, 2
    slots = torch.tensor([-1, 0, 1, -1, 1, 0], dtype=torch.int32)
    ranks = torch.tensor([4, 2], dtype=torch.int32)
    plan = plan_for(slots, ranks, L)
    ids = torch.randint(V, (T,), generator=gen, dtype=torch.int32)
    A = torch.randn(L, V, R, generator=gen)
    B = torch.randn(L, D, R, generator=gen)
    y0 = torch.full((T, D), POISON)
    y0[slots >= 0] = 0
    y = launch_embedding(y0.clone(), ids, A, B, plan)
    ref = reference.add_lora_embedding(y0.clone(), ids, A, B, plan, ranks)
    assert_rows(y, ref, slots, torch.float32, y0, "embedding int32")
