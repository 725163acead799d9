"""Split-K shrink (interpreted) against the fp32 reference: every popularity mix, odd K, mixed ranks,
NaN padding and slot -1 rows; deterministic sums, counters back at zero after every launch (what a
CUDA graph replay needs), the device-side split count, and the fallback when the scratch is too small."""

import pytest
import torch

from loraplex.kernels import reference
from loraplex.kernels.sgmv_shrink import launch_shrink, split_plan
from loraplex.runtime.plan import PlanBuffers

from .cases import DTYPES, MIXES, POISON, assert_rows, random_ranks, stacked_A, token_slots
from .launches import Recorder

# 13 K tiles of 16 (K = 200: the last one partial), up to 4 splits, as many programs as it takes
SPLIT = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, SPLIT_K=4, SPLIT_MIN_K_TILES=2, SPLIT_TARGET_PROGRAMS=64)


def _case(dtype, mix, T=24, K=200, R=32, L=6, n_slices=2, seed=0, cfg=SPLIT, none_frac=0.25, buffers=None):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = (buffers or PlanBuffers(T, L)).build(slots, ranks)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = stacked_A(L, R, K, ranks, dtype, gen, n_slices)
    out = torch.full((n_slices, T, R), POISON)
    launch_shrink(x, A, plan, out, 0.5, config=cfg)
    ref = reference.sgmv_shrink(x, A, plan, torch.full_like(out, POISON), 0.5, ranks)
    assert_rows(out, ref, slots, dtype, torch.full_like(out, POISON), f"split-K shrink {dtype} {mix}")
    assert not plan.split_counters.any(), "arrival counters must be back at zero after the launch"
    return out, (x, A, plan)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_mixes(monkeypatch, dtype, mix):
    rec = Recorder(monkeypatch)
    _case(dtype, mix, seed=hash(mix) % 1000)
    (launch,) = rec.launches
    assert launch.kwargs["SPLIT"] == 4 and launch.args[14] == 4  # the split path ran, up to 4 splits


def test_split_k_is_deterministic_and_replays_clean():
    """Same launch, same bits: the partials are summed in split order, whichever split came last; the
    counters are zero again after each launch, so a replay (a graph replay) splits right again."""
    out1, (x, A, plan) = _case(torch.float32, "skewed", seed=7)
    for _ in range(2):
        out2 = torch.full_like(out1, POISON)
        launch_shrink(x, A, plan, out2, 0.5, config=SPLIT)
        assert torch.equal(torch.nan_to_num(out1, nan=7.0), torch.nan_to_num(out2, nan=7.0))
        assert not plan.split_counters.any()


def test_split_count_follows_the_real_tiles_on_the_device():
    """The host only bounds the grid; the splits per tile come from the plan's tile count: one adapter
    gets every split the K loop allows, eight adapters share the programs (two splits each). Seen in the
    scratch: split k writes its partials at [k, slice, token, R]."""
    cfg = dict(SPLIT, SPLIT_TARGET_PROGRAMS=16)
    bufs = PlanBuffers(32, 8)
    splits, programs = split_plan(cfg, 32, 200, 16, 1, 8, bufs.split_partials, bufs.split_counters)
    assert (splits, programs) == (4, 16)  # the tile bound (8 slots, 32 tokens, 16 rows a tile) is 8
    per_split = 32 * 16  # one slice x 32 tokens x R 16
    for mix, used in (("identical", 4), ("distinct", 2)):  # 2 tiles x 4 splits; 8 tiles x 2 splits
        bufs.split_partials.fill_(POISON)
        _case(torch.float32, mix, T=32, R=16, L=8, n_slices=1, cfg=cfg, buffers=bufs, none_frac=0.0)
        written = [not bufs.split_partials[k * per_split:(k + 1) * per_split].isnan().all() for k in range(4)]
        assert written == [k < used for k in range(4)], (mix, written)


def test_scratch_too_small_runs_unsplit(monkeypatch):
    rec = Recorder(monkeypatch)
    _case(torch.float16, "uniform", buffers=PlanBuffers(24, 6, split_partial_floats=100))
    assert rec.launches[-1].kwargs["SPLIT"] == 1
    rec.clear()
    _case(torch.float16, "uniform", buffers=PlanBuffers(24, 6, split_counters=3))
    assert rec.launches[-1].kwargs["SPLIT"] == 1


def test_split_k_odd_sizes_rank_one_and_all_minus_one():
    cfg = dict(SPLIT, BLOCK_K=32)
    _case(torch.bfloat16, "zipf", T=13, K=129, R=1, L=3, n_slices=3, seed=5, cfg=cfg)
    _case(torch.float32, "uniform", T=9, K=129, R=16, L=3, n_slices=1, seed=6, cfg=cfg, none_frac=1.0)


def test_a_stray_arrival_does_not_outlive_its_step():
    """One arrival too many (a split that left early, a side-stream shrink dropped without its join)
    leaves a tile's counter at 1: every later launch would then take its third arrival for the last,
    sum a stale partial, and leave 1 behind again. PlanBuffers.build zeroes the counters, so the step
    after the stray one is exact, and so is every step after that."""
    bufs = PlanBuffers(24, 6)
    _, (x, A, plan) = _case(torch.float32, "identical", buffers=bufs, none_frac=0.0)
    bufs.split_counters[0] = 1  # the stray arrival, on tile 0 (which is split 4 ways)
    launch_shrink(x, A, plan, torch.zeros(2, 24, 32), 0.5, config=SPLIT)  # this step's own result is lost
    for seed in (1, 2, 3):  # the next steps: new plans built into the same buffers, fresh inputs
        _case(torch.float32, "identical", seed=seed, buffers=bufs, none_frac=0.0)
