"""SlabUploader on CUDA: ordering by events only. A step that does not use the arriving adapter's
slot does not wait for its upload; a slot is not overwritten while a step that reads it runs; a
captured graph reads the new weights at replay and an upload is never captured.

No vLLM needed (the GPU machine has none): the stacked tensors are plain CUDA tensors in vLLM's
shapes ([slots, 1, R, K] and [slots, 1, N, R] per slice) behind the same interface VllmTargets has.
`torch.cuda._sleep` only holds a stream busy; every assertion is on event states and values.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.vllm_plugin.slab_layout import ALIGN, Piece, VllmSlab, VllmSlabLayout, piece_view
from loraplex.vllm_plugin.slab_upload import SlabUploader

from .inproc import CopyCounter

pytestmark = pytest.mark.gpu

SLOTS, R, K, N = 3, 16, 4096, 4096
SLEEP = int(2e9)  # GPU cycles (~1 s): long enough that the host checks run while the stream is busy


class PlainTargets:
    def __init__(self, device, dtype=torch.bfloat16):
        self.dtype = dtype
        self.kinds = {"m0": "single", "m1": "single"}
        self.uncovered = ()
        self._t = {(m, w): [torch.zeros((SLOTS, 1, R, K) if w == "A" else (SLOTS, 1, N, R), dtype=dtype,
                                        device=device)] for m in self.kinds for w in "AB"}

    def stacked(self, module, which):
        return self._t[(module, which)]

    def slot_view(self, module, which, si, slot):
        return self._t[(module, which)][si][slot][0]


def make_slab(rank, seed, dtype=torch.bfloat16, quant=None):
    pieces, off = [], 0
    for m in ("m0", "m1"):
        for which, rows, cols, rd in (("A", rank, K, 0), ("B", N, rank, 1)):
            size = rows * cols * (1 if quant else torch.empty((), dtype=dtype).element_size())
            s_off = -1
            at, off = off, off + -(-size // ALIGN) * ALIGN
            if quant:
                s_off, off = off, off + -(-(rank * 4) // ALIGN) * ALIGN
            pieces.append(Piece(m, which, 0, at, rows, cols, rd, s_off))
    layout = VllmSlabLayout(tuple(pieces), off, dtype, quant, {"m0": rank, "m1": rank})
    buf = torch.zeros(off, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    g = torch.Generator().manual_seed(seed)
    for p in pieces:
        v, s = piece_view(buf, p, dtype, quant)
        if quant:
            v.copy_(torch.randint(-127, 128, v.shape, generator=g, dtype=torch.int8))
            s.copy_(torch.rand(s.shape, generator=g) / 100)
        else:
            v.copy_(torch.randn(v.shape, generator=g) / 10)
    return VllmSlab((f"r{rank}-{seed}", "v1"), layout, buf)


def expected_a(slab, module="m0"):
    p = next(p for p in slab.layout.pieces if p.module == module and p.which == "A")
    full = torch.zeros(R, K, dtype=slab.layout.dtype)
    full[:p.rows] = piece_view(slab.buffer, p, slab.layout.dtype, None)[0]
    return full


@pytest.fixture
def up():
    return SlabUploader(PlainTargets(torch.device("cuda")))


def test_one_h2d_copy_of_the_slab(up):
    slab = make_slab(16, 1)
    up.reserve_staging(slab.nbytes)
    counter = CopyCounter()
    with counter:
        h = up.upload(slab, 0)
    torch.cuda.synchronize()
    assert (counter.transfers, counter.transfer_bytes) == (1, slab.nbytes)
    assert h.query() and h.elapsed() is not None
    assert torch.equal(up.targets.slot_view("m0", "A", 0, 0).cpu(), expected_a(slab))


def test_step_without_the_slot_does_not_wait(up):
    slab = make_slab(16, 2)
    blocker = torch.cuda.Stream()
    with torch.cuda.stream(blocker):  # a long step still reading slot 0
        torch.cuda._sleep(SLEEP)
        up.steps_enqueued([0])
    h = up.upload(slab, 0)  # must wait for that step, on the device
    up.make_ready([1])  # a step on slot 1 only
    y = up.targets.slot_view("m0", "A", 0, 1).float().sum()
    step = torch.cuda.Event()
    step.record()
    step.synchronize()
    assert not h.query(), "the upload ran before the step still reading its slot finished"
    assert float(y) == 0.0
    up.make_ready([0])  # a step on slot 0 waits for the upload
    got = up.targets.slot_view("m0", "A", 0, 0).clone()
    torch.cuda.synchronize()
    assert h.query()
    assert torch.equal(got.cpu(), expected_a(slab))


def test_wait_compute_orders_after_everything_enqueued(up):
    slab = make_slab(16, 8)
    torch.cuda._sleep(SLEEP)  # a step enqueued on the compute stream, its slots never recorded
    h = up.upload(slab, 2, wait_compute=True)
    assert not h.query()
    torch.cuda.synchronize()
    assert h.query() and torch.equal(up.targets.slot_view("m0", "A", 0, 2).cpu(), expected_a(slab))


def test_slot_not_overwritten_under_a_running_step(up):
    old, new = make_slab(16, 3), make_slab(8, 4)
    up.upload(old, 0)
    up.make_ready([0])
    torch.cuda._sleep(SLEEP)  # the step is slow; it reads slot 0 at its end
    seen = up.targets.slot_view("m0", "A", 0, 0).clone()
    up.steps_enqueued([0])
    h = up.upload(new, 0)
    torch.cuda.synchronize()
    assert h.query()
    assert torch.equal(seen.cpu(), expected_a(old)), "slot 0 was overwritten under the step reading it"
    assert torch.equal(up.targets.slot_view("m0", "A", 0, 0).cpu(), expected_a(new))  # rank 8: rows 8.. zero


def test_graph_replays_new_weights_and_uploads_are_never_captured(up):
    a, b = make_slab(16, 5), make_slab(4, 6)
    up.reserve_staging(max(a.nbytes, b.nbytes))
    up.upload(a, 1)
    up.make_ready([1])
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    w = up.targets.stacked("m0", "A")[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x @ w[1, 0].t()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x @ w[1, 0].t()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float().cpu(), (x.float().cpu() @ expected_a(a).float().t()), rtol=2e-2, atol=2e-1)
    up.steps_enqueued([1])
    up.upload(b, 1)
    up.make_ready([1])
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float().cpu(), (x.float().cpu() @ expected_a(b).float().t()), rtol=2e-2, atol=2e-1)
    g2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captured"), torch.cuda.graph(g2):
        up.upload(a, 2)


def test_int8_dequantized_on_device_equals_cpu():
    slab = make_slab(16, 7, quant="int8")
    gpu, cpu = SlabUploader(PlainTargets(torch.device("cuda"))), SlabUploader(PlainTargets(torch.device("cpu")))
    gpu.upload(slab, 2)
    cpu.upload(slab, 2)
    torch.cuda.synchronize()
    for m in ("m0", "m1"):
        for w in "AB":
            assert torch.equal(gpu.targets.slot_view(m, w, 0, 2).cpu(), cpu.targets.slot_view(m, w, 0, 2))
