"""CUDA only: plans against the reference on the device, uploads overlapping a running kernel (events
order the reads, nothing blocks the host), and a CUDA graph captured over a resident static plan."""

import time

import pytest
import torch

from loraplex import Catalog, toy
from loraplex.runtime.targets import linear_shapes, llama_targets

from .helpers import Reference, check_plan, reference_delta

pytestmark = pytest.mark.gpu

H, KV, INTER, LAYERS, R = 2048, 512, 5632, 8, 16


BIG = llama_targets(LAYERS, H, KV, INTER)


def _big_targets(rt):
    for name, slices, kind in BIG:
        rt.new_target(name, slices, kind)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    for k in range(3):
        toy.write_adapter(root / f"big{k}", linear_shapes(BIG), r=R, alpha=2 * R, seed=k, dtype="bfloat16", b_std=0.1)
    return root


def test_gpu_plan_matches_reference(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=3, dtype="float16", device="cuda")
    refs = {rt.catalog.get(n).key: Reference(rt.catalog, n) for n in rt.catalog.names()}
    with rt.step(["alpha-r4", None, "beta-r8", "gamma-r16"], [3, 1, 2, 2]) as plan:
        assert plan.token_slots.is_cuda
        check_plan(rt, plan, refs, atol=1e-3, rtol=3e-3, row_tol=3e-3)
    deadline = time.monotonic() + 5
    while rt.stats()["gpu"]["in_use"] and time.monotonic() < deadline:  # released once the event passed
        rt.poll()
        time.sleep(0.001)
    assert rt.stats()["gpu"]["in_use"] == 0 and rt.stats()["uploads_in_flight"] == 0


def test_upload_overlaps_a_running_kernel(make_runtime, big_dir):
    rt = make_runtime(Catalog(big_dir), targets=False, max_loras=2, dtype="bfloat16", device="cuda")
    _big_targets(rt)
    rt.load_many(["big0", "big1"])  # storage out of the way: this test is about the device side
    rt.release(rt.plan(["big1"]))
    torch.cuda.synchronize()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    for _ in range(100):  # ~140 ms of GEMMs on the compute stream
        torch.mm(a, b)
    done.record()
    plan = rt.plan(["big0", "big1"], [3, 2])  # big0 is a miss: uploaded on the side stream
    assert not done.query(), "plan() waited for the compute stream"
    fill = rt.pool.slots[plan.adapters["big0"][1]].fill
    deadline = time.monotonic() + 10
    while not fill.upload.done.query():
        assert time.monotonic() < deadline
        time.sleep(1e-4)
    assert not done.query(), "the upload only ran after the GEMMs: it did not overlap"
    # the compute stream was made to wait for the upload: reading the slot now (queued behind the GEMMs
    # and the wait) sees the new adapter, and the check below reads it only after everything finished
    ref = Reference(rt.catalog, "big0")
    t = rt.targets[0]
    x = torch.randn(5, H)
    slot = plan.adapters["big0"][1]
    got = torch.cat([x.cuda().float() @ t.A[s][slot].float().t() @ t.B[s][slot].float().t()
                     for s in range(3)], dim=-1).cpu()
    want = torch.cat([ref.delta(sl.peft_module, x) for sl in t.slices], dim=-1)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    rt.release(plan)


def _torch_lora(t, plan, x):
    """A capturable LoRA delta for a linear target from the plan's token->slot map (gathers, no sync)."""
    slots = plan.token_slots
    idx = slots.long().clamp(min=0)
    mask = (slots >= 0).unsqueeze(1).float()
    outs = []
    for s in range(len(t.slices)):
        h = torch.einsum("tk,trk->tr", x.float(), t.A[s][idx].float())
        outs.append(torch.einsum("tr,tnr->tn", h, t.B[s][idx].float()))
    return torch.cat(outs, dim=-1) * mask


def test_graph_capture_of_a_static_plan(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=3, dtype="float16", device="cuda")
    cat = rt.catalog
    refs = {cat.get(n).key: Reference(cat, n) for n in cat.names()}
    t = next(t for t in rt.targets if t.name == "model.layers.0.qkv")
    names1, names2, tokens = ["alpha-r4", None, "beta-r8"], ["beta-r8", "alpha-r4", None], [2, 1, 3]
    plan = rt.plan(names1, tokens, static=True)
    x = torch.randn(6, 64, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _torch_lora(t, plan, x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = _torch_lora(t, plan, x)
    rt.release(plan)

    def expect(p):
        slot_key = {slot: key for key, slot in p.adapters.values()}
        xs = x.float().cpu()
        return torch.cat([reference_delta(t, None if slot < 0 else refs[slot_key[slot]], xs[i:i + 1])
                          for i, slot in enumerate(p.token_slots.tolist())])

    for names in (names1, names2, names1):
        p = rt.plan(names, tokens, static=True)  # the same buffers the graph reads
        assert p.token_slots.data_ptr() == plan.token_slots.data_ptr()
        g.replay()
        torch.testing.assert_close(y.cpu(), expect(p), atol=2e-2, rtol=2e-2)
        rt.release(p)
    check_plan(rt, p, refs, targets=[t], atol=1e-3, rtol=3e-3, row_tol=3e-3)
