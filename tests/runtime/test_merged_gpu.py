"""CUDA only, merged mode: correction slots written by both upload paths (two slabs through one staging
buffer, or copied region by region), exact unmerge of device weights from pinned host copies, and a
CUDA graph captured over a static plan replayed across switches (nothing is reallocated by a switch)."""

import pytest
import torch

from loraplex.kernels import ops

from .helpers import Reference, reference_delta
from .test_merged import _check_slots, _snapshot, bind_modules

pytestmark = pytest.mark.gpu
NAMES = ["gamma-r16", None, "alpha-r4", "beta-r8"]


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_gpu_correction_slots_and_exact_unmerge(make_runtime, adapter_source, mode):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24, dtype="float16", device="cuda", upload_mode=mode)
    mods = bind_modules(rt, dtype=torch.float16, device="cuda")
    pristine = _snapshot(mods)
    refs = {n: Reference(rt.catalog, n) for n in ("alpha-r4", "beta-r8", "gamma-r16")}
    for merged in ("alpha-r4", "gamma-r16"):
        rt.merge(merged)
        plan = rt.plan(NAMES)
        torch.cuda.synchronize()
        slots = dict(zip(NAMES, plan.request_slots, strict=True))
        assert slots[merged] == -1
        want = {s: (None if n is None else refs[n], refs[merged]) for n, s in slots.items() if n != merged}
        _check_slots(rt, plan, want, atol=1e-3, rtol=3e-3, row_tol=3e-3)
        rt.release(plan)
    rt.merge(None)
    torch.cuda.synchronize()
    assert all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())


def test_gpu_graph_replays_across_switches(make_runtime, adapter_source):
    """One module's base GEMM + LoRA captured once; after each switch a new static plan is written into
    the same buffers and the replay equals the fp32 reference of every request (which does not depend on
    what is merged)."""
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24, dtype="float16", device="cuda")
    mods = bind_modules(rt, dtype=torch.float16, device="cuda")
    t = next(t for t in rt.targets if t.name == "model.layers.1.o")
    w = mods[t.slices[0].peft_module].weight.detach()  # shares storage: sees every merge
    w0 = w.float().clone()
    refs = {n: Reference(rt.catalog, n) for n in ("alpha-r4", "beta-r8", "gamma-r16")}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(len(NAMES), t.slices[0].in_features, device="cuda", dtype=torch.float16, generator=g)
    y = torch.empty(len(NAMES), t.out_features, device="cuda", dtype=torch.float16)
    scratch = torch.empty(1, len(NAMES), 24, device="cuda", dtype=torch.float32)
    plan = rt.plan(NAMES, static=True)

    def step():
        torch.matmul(x, w.t(), out=y)
        ops.add_lora_linear(y, x, t.A, t.B, plan, t.ranks, scratch)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    rt.release(plan)
    xs = x.float().cpu()
    want = torch.stack([xs[i] @ w0.cpu().t() + reference_delta(t, None if n is None else refs[n], xs[i:i + 1])[0]
                        for i, n in enumerate(NAMES)])
    for merged in ("alpha-r4", "gamma-r16", None, "beta-r8"):
        rt.merge(merged)
        plan = rt.plan(NAMES, static=True)
        graph.replay()
        torch.cuda.synchronize()
        got = y.float().cpu()
        rt.release(plan)
        for i, n in enumerate(NAMES):
            tol = 1e-2 + 3e-3 * float(want[i].abs().max())
            assert (got[i] - want[i]).abs().max() <= tol, f"merged {merged}: request {i} ({n})"
