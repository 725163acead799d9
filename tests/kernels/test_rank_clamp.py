"""Rank values above the padded rank R (a rank vector meant for wider weights, or a bug elsewhere) are
clamped to R inside every kernel: the result equals rank = R, and nothing past a slot's R rows is read.

Each weight (and h) is a view at the start of a larger NaN-filled storage, and slots' neighbours hold
other data: a kernel that read past a slot would pick up the next slot's rows (a wrong, finite result)
or, for the last slot, the NaN after the tensor. Reads whose values never reach the output (the shrink
discards rank columns >= R) are caught by the interpreter's bounds check instead (conftest.py, launches.Recorder):
no load may touch memory outside the tensors a launch was given."""

import torch

from loraplex.kernels import reference
from loraplex.kernels.embedding import launch_embedding
from loraplex.kernels.sgmv_expand import launch_expand
from loraplex.kernels.sgmv_fused import launch_fused
from loraplex.kernels.sgmv_shrink import launch_shrink

from .cases import POISON, assert_rows, plan_for, token_slots

T, K, R, L = 20, 48, 24, 4  # R = 24: rank tiles of 16 or 32 reach past it
RANKS = torch.tensor([7, R + 5, R, 3 * R], dtype=torch.int32)  # two above R (the last slot too), one at R
CLAMPED = RANKS.clamp(max=R)
SPLIT = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, SPLIT_K=3, SPLIT_MIN_K_TILES=1, SPLIT_TARGET_PROGRAMS=32)


def _in_nan_storage(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous view at the start of a storage twice its size, the rest NaN."""
    big = torch.full((2 * t.numel(),), POISON, dtype=t.dtype)
    view = big[: t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _data(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots("uniform", T, L, gen, 0.2)
    slots[:L] = torch.arange(L, dtype=torch.int32)  # every slot, the last one included, has tokens
    plan = plan_for(slots, RANKS, L)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = [_in_nan_storage((torch.randn(L, R, K, generator=gen) / K ** 0.5).to(dtype)) for _ in range(2)]
    B = [_in_nan_storage((torch.randn(L, n, R, generator=gen) / R ** 0.5).to(dtype)) for n in (16, 8)]
    return gen, slots, plan, x, A, B


def test_shrink_clamps_rank():
    for cfg in (None, dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=16), SPLIT):
        _, slots, plan, x, A, _ = _data(1)
        out = launch_shrink(x, A, plan, torch.full((2, T, R), POISON), 1.0, config=cfg)
        ref = reference.sgmv_shrink(x, A, plan, torch.full((2, T, R), POISON), 1.0, CLAMPED)
        assert_rows(out, ref, slots, torch.float32, torch.full_like(out, POISON), f"shrink {cfg}")


def test_expand_clamps_rank():
    for cfg in (None, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16)):
        gen, slots, plan, _, _, B = _data(2)
        h = _in_nan_storage(torch.randn(2, T, R, generator=gen))
        y0 = torch.randn(T, 24, generator=gen)
        y = launch_expand(h, B, plan, y0.clone(), True, config=cfg)
        ref = reference.sgmv_expand(h, B, plan, y0.clone(), True, CLAMPED)
        assert_rows(y, ref, slots, torch.float32, y0, f"expand {cfg}")


def test_fused_clamps_rank():
    for dtype in (torch.float32, torch.float16):
        gen, slots, plan, x, A, B = _data(3, dtype)
        y0 = torch.randn(T, 24, generator=gen).to(dtype)
        y = launch_fused(y0.clone(), x, A, B, plan, 0.5)
        ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, CLAMPED, None, 0.5)
        assert_rows(y, ref, slots, dtype, y0, f"fused {dtype}")


def test_embedding_clamps_rank():
    gen, slots, plan, _, _, _ = _data(4)
    V, D = 30, 16
    ids = torch.randint(V, (T,), generator=gen)
    Ae = _in_nan_storage(torch.randn(L, V, R, generator=gen))
    Be = _in_nan_storage(torch.randn(L, D, R, generator=gen))
    y0 = torch.randn(T, D, generator=gen)
    y = launch_embedding(y0.clone(), ids, Ae, Be, plan, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16))
    ref = reference.add_lora_embedding(y0.clone(), ids, Ae, Be, plan, CLAMPED)
    assert_rows(y, ref, slots, torch.float32, y0, "embedding")
