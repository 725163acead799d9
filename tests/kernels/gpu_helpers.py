"""Helpers of the GPU tests (test_gpu.py): a kernel that lets the next launch start at once and writes
late (what a programmatic dependent launch must wait for), and a LoRA layer case on the device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _late_copy(src_ptr, dst_ptr, n, spin, BLOCK: tl.constexpr):
    """Signals its dependents first (griddepcontrol.launch_dependents), spins, and only then copies
    src to dst: a kernel launched after it with PDL that read dst before its wait would see the old
    contents."""
    tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(src_ptr + offs, mask=m, other=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(spin):
        acc = acc * 0.999 + 1.0
    v = tl.where(acc < 0.0, 0, v)  # never true: keeps the spin before the store
    tl.store(dst_ptr + offs, v, mask=m)


def late_copy(dst: torch.Tensor, src: torch.Tensor, spin: int = 100_000) -> None:
    """dst.copy_(src) by _late_copy, launched with PDL; both contiguous, of a size divisible by 4 bytes."""
    d, s = dst.view(-1).view(torch.int32), src.view(-1).view(torch.int32)
    _late_copy[(triton.cdiv(d.numel(), 1024),)](s, d, d.numel(), spin, BLOCK=1024, launch_pdl=True)


def layer_case(T, L=8, R=16, K=4096, widths=(4096, 1024, 1024), dtype=torch.bfloat16, seed=0):
    """A qkv-shaped LoraTarget on the GPU (mixed ranks, one slot at 0), its base linear, its per-slice
    base linears (for a SliceGroup) and an input."""
    from loraplex.runtime.targets import LoraTarget, SliceSpec

    g = torch.Generator(device="cuda").manual_seed(seed)
    target = LoraTarget("t", [SliceSpec(f"s{i}", K, n) for i, n in enumerate(widths)], "linear", L, R,
                        dtype=dtype, device="cuda")
    for a, b in zip(target.A, target.B, strict=True):
        a.copy_(torch.randn(a.shape, generator=g, device="cuda") * K ** -0.5)
        b.copy_(torch.randn(b.shape, generator=g, device="cuda") * R ** -0.5)
    ranks = torch.randint(1, R + 1, (L,), generator=g, device="cuda", dtype=torch.int32)
    ranks[1] = 0
    target.ranks.copy_(ranks)
    base = torch.nn.Linear(K, sum(widths), bias=False).to("cuda", dtype)
    parts, lo = [], 0
    for n in widths:
        p = torch.nn.Linear(K, n, bias=False).to("cuda", dtype)
        p.weight.data.copy_(base.weight.data[lo:lo + n])
        parts.append(p)
        lo += n
    x = torch.randn(T, K, generator=g, device="cuda").to(dtype)
    return target, base, parts, x
