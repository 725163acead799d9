"""LoRA concurrent with the base GEMM: the shrink runs on a second CUDA stream while the base layer's
GEMM runs on the current one; the expand joins them and adds into the base output.

At one adapter and one token, the 0.95 decode target leaves ~1.5 µs of LoRA per module, about one
CUDA-graph node: LoRA launched after the base GEMM cannot fit, LoRA hidden under it can. The shrink
needs only x, so it can start as soon as x exists; the expand needs the base output (it adds into it).

    side.wait(current)           x is ready
    side:    h = x · Aᵀ          (the plan's shrink, into the context's static fp32 scratch)
    current: y = base(x)         concurrently
    current.wait(side)
    current: y += h · Bᵀ         (the plan's expand)

Fork and join are stream waits on events, so a CUDA graph captures both branches. The context's scratch
is reused by the next layer's shrink only after this layer's expand (its fork waits on the current
stream, where the expand was queued). On CPU there is no second stream and the same two ops run one
after the other, which is what the CPU tests compare with the sequential path.

Off by default (LORAPLEX_OVERLAP=1 or LoraContext(overlap=True)) until a GPU run shows it faster.
"""

from __future__ import annotations

import os

import torch

from ..kernels import ops

ENV_OVERLAP = "LORAPLEX_OVERLAP"


def overlap_from_env() -> bool:
    return os.environ.get(ENV_OVERLAP, "").strip().lower() in ("1", "true", "yes", "on")


class SideStream:
    """The context's second stream (CUDA only) and its fork/join."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def shrink(self, x, A, plan, h, ranks) -> None:
        """h = x · Aᵀ on the side stream, after everything queued so far on the current stream."""
        if self.stream is None:
            ops.sgmv_shrink(x, A, plan, h, 1.0, ranks)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            ops.sgmv_shrink(x, A, plan, h, 1.0, ranks)

    def join(self) -> None:
        """The current stream waits for the side stream's work."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
