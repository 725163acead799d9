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

K, R, L = 1024, 16, 6  # 4 K tiles of 256 at decode: split-K has something to split
# the fused kernel's old SPLIT_N depended on the adapter count only with many column blocks per slice
WIDTHS = {"fused": (2048, 256, 40), "split": (128, 64, 40)}


@pytest.fixture
def gpu_configs(monkeypatch):
    """Configs as the launchers pick them on a GPU (heuristic + shipped JSON), on CPU tensors."""
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    monkeypatch.setattr(config, "gpu_name", lambda device: "NVIDIA H200")


def _path(monkeypatch, path):
    """Decode through the fused kernel (a tuned table may turn it on) or the split-K shrink + expand."""
    if path == "fused":
        shipped = config.load("NVIDIA H200")
        monkeypatch.setattr(config, "load", lambda name: dict(shipped, fused_max_tokens=16))


def _weights(widths, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = random_ranks(L, R, gen)
    return gen, ranks, stacked_A(L, R, K, ranks, dtype, gen, len(widths)), stacked_B(L, widths, R, ranks, dtype, gen)


def _spread(T, D, gen):
    """T tokens over the first D slots, every one of them used, some -1 rows."""
    s = torch.arange(T) % D
    s = s[torch.randperm(T, generator=gen)]
    s[::5] = -1 if T > 5 else s[::5]
    return s.to(torch.int32)


@pytest.mark.parametrize("T,path", [(6, "fused"), (6, "split"), (20, "split")],
                         ids=["decode-fused", "decode-split-K", "small-split-K"])
def test_replayed_launches_apply_a_plan_of_more_adapters(monkeypatch, gpu_configs, T, path):
    _path(monkeypatch, path)
    widths = WIDTHS[path]
    gen, ranks, A, B = _weights(widths)
    bufs = PlanBuffers(T, L)
    x = torch.zeros(T, K, dtype=torch.float16)
    y = torch.zeros(T, sum(widths), dtype=torch.float16)
    scratch = torch.zeros(3, T, R)
    one = bufs.build(torch.full((T,), 3, dtype=torch.int32), ranks)  # "captured" with one adapter
    rec = Recorder(monkeypatch)
    ops.add_lora_linear(y, x, A, B, one, buffer=scratch)
    assert rec.launches
    for D in (6, 4):  # replays after plans of more adapters (and another mix)
        slots = _spread(T, D, gen)
        plan = bufs.build(slots, ranks)  # the same static storage the launches hold
        x.copy_(torch.randn(T, K, generator=gen).half())
        y0 = torch.randn(T, sum(widths), generator=gen).half()
        y.copy_(y0)
        rec.replay()
        ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
        assert_rows(y, ref, slots, torch.float16, y0, f"replay T={T} D={D}")


@pytest.mark.parametrize("T,path", [(8, "fused"), (8, "split"), (20, "split")],
                         ids=["decode-fused", "decode-split-K", "small-split-K"])
def test_adapter_count_sweep_needs_one_variant_per_kernel(monkeypatch, gpu_configs, T, path):
    """Plans as the runtime builds them outside graphs (grid bounded by the batch's adapter count)
    for 1..min(T, max_loras) adapters: every kernel launches the same compiled variant throughout."""
    _path(monkeypatch, path)
    widths = WIDTHS[path]
    gen, ranks, A, B = _weights(widths, seed=1)
    bufs = PlanBuffers(T, L)
    x = torch.randn(T, K, generator=gen).half()
    scratch = torch.zeros(3, T, R)
    rec = Recorder(monkeypatch)
    for D in range(1, min(T, L) + 1):
        slots = _spread(T, D, gen)
        plan = bufs.build(slots, ranks, max_active=D)
        y0 = torch.randn(T, sum(widths), generator=gen).half()
        y = ops.add_lora_linear(y0.clone(), x, A, B, plan, buffer=scratch)
        assert_rows(y, reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks), slots, torch.float16, y0,
                    f"T={T} D={D}")
    names = {launch.name for launch in rec.launches}
    assert names == ({"_sgmv_fused_kernel"} if path == "fused" else {"_sgmv_shrink_kernel", "_sgmv_expand_kernel"})
    assert path == "fused" or all(launch.kwargs["SPLIT"] > 1 for launch in rec.launches if "shrink" in launch.name)
    for name in names:
        assert len(rec.variants(name)) == 1, (name, rec.variants(name))
