"""What a CUDA graph needs from the launchers, shown on CPU (interpreter): launches recorded with one
plan and replayed verbatim after another plan was written into the same buffers apply the new plan
(a graph replay, minus the GPU), and a sweep over the number of adapters in a batch never needs a new
compiled variant (a JIT compile in the serving path). Both use the GPU's configs (TARGET_PROGRAMS,
split-K), whose choices are what used to depend on the adapter count."""

import pytest
import torch

from loraplex.kernels import config, ops, reference
from loraplex.runtime.plan import PlanBuffers

from .cases import assert_rows, random_ranks, stacked_A, stacked_B
from .launches import Recorder

K, WIDTHS, R, L = 512, (2048, 256, 40), 16, 6  # q is 16 column blocks of 128 wide


@pytest.fixture
def gpu_configs(monkeypatch):
    """Configs as the launchers pick them on an H200 (heuristic + shipped JSON), on CPU tensors."""
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    monkeypatch.setattr(config, "gpu_name", lambda device: "NVIDIA H200")


def _weights(dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = random_ranks(L, R, gen)
    return gen, ranks, stacked_A(L, R, K, ranks, dtype, gen, len(WIDTHS)), stacked_B(L, WIDTHS, R, ranks, dtype, gen)


def _spread(T, D, gen):
    """T tokens over the first D slots, every one of them used, some -1 rows."""
    s = torch.arange(T) % D
    s = s[torch.randperm(T, generator=gen)]
    s[::5] = -1 if T > 5 else s[::5]
    return s.to(torch.int32)


@pytest.mark.parametrize("T", [6, 20], ids=["fused", "shrink+expand"])
def test_replayed_launches_apply_a_plan_of_more_adapters(monkeypatch, gpu_configs, T):
    gen, ranks, A, B = _weights()
    bufs = PlanBuffers(T, L)
    x = torch.zeros(T, K, dtype=torch.float16)
    y = torch.zeros(T, sum(WIDTHS), dtype=torch.float16)
    scratch = torch.zeros(3, T, R)
    one = bufs.build(torch.full((T,), 3, dtype=torch.int32), ranks)  # "captured" with one adapter
    rec = Recorder(monkeypatch)
    ops.add_lora_linear(y, x, A, B, one, buffer=scratch)
    assert rec.launches
    for D in (6, 4):  # replays after plans of more adapters (and another mix)
        slots = _spread(T, D, gen)
        plan = bufs.build(slots, ranks)  # the same static storage the launches hold
        x.copy_(torch.randn(T, K, generator=gen).half())
        y0 = torch.randn(T, sum(WIDTHS), generator=gen).half()
        y.copy_(y0)
        rec.replay()
        ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
        assert_rows(y, ref, slots, torch.float16, y0, f"replay T={T} D={D}")


@pytest.mark.parametrize("T", [8, 20], ids=["decode-fused", "small-shrink+expand"])
def test_adapter_count_sweep_needs_one_variant_per_kernel(monkeypatch, gpu_configs, T):
    """Plans as the runtime builds them outside graphs (grid bounded by the batch's adapter count)
    for 1..min(T, max_loras) adapters: every kernel launches the same compiled variant throughout."""
    gen, ranks, A, B = _weights(seed=1)
    bufs = PlanBuffers(T, L)
    x = torch.randn(T, K, generator=gen).half()
    scratch = torch.zeros(3, T, R)
    rec = Recorder(monkeypatch)
    for D in range(1, min(T, L) + 1):
        slots = _spread(T, D, gen)
        plan = bufs.build(slots, ranks, max_active=D)
        y0 = torch.randn(T, sum(WIDTHS), generator=gen).half()
        y = ops.add_lora_linear(y0.clone(), x, A, B, plan, buffer=scratch)
        assert_rows(y, reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks), slots, torch.float16, y0,
                    f"T={T} D={D}")
    names = {launch.name for launch in rec.launches}
    assert names == ({"_sgmv_fused_kernel"} if T <= 16 else {"_sgmv_shrink_kernel", "_sgmv_expand_kernel"})
    for name in names:
        assert len(rec.variants(name)) == 1, (name, rec.variants(name))
