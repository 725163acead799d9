"""Uploader: a slab into one slot of every registered target.

CUDA: everything is issued on a side stream and ends with an event, so the compute stream keeps
running other adapters' steps; only plans that use the slot wait for the event (Runtime.plan does
stream.wait_event). The default ("staged") path is one H2D copy of the whole slab into a device
staging buffer (one large copy runs near the 55 GB/s pinned ceiling, hundreds of small ones at a
quarter of it), then device-to-device copies into the slot views, batched with torch._foreach_copy_
(contiguous views go through one multi-tensor kernel per ~100 tensors). "direct" copies each region
host->device straight into its slot view; bench/upload.py measures both.
CPU: the same views and copies, synchronous, straight from the slab.

Merged mode (merged.py): a slot may hold two slabs, the request's own in ranks [0, r_own) of each slice
and the merged adapter's negated one in [r_own, r_own + r_merged); the base-model slot holds the latter
alone. Both go through the same copies (one staging buffer on CUDA).

Padding: beyond a slot's real rank every row/column must be zero (kernels may read it). The pool
remembers the rank each (target, slice) of a slot holds; padding is zeroed only where the previous
occupant's rank was larger than the new one's, so the common case writes nothing but the weights.
"""

from __future__ import annotations

import threading
import time

import torch


class UploadHandle:
    """What an upload leaves behind: on CUDA the events to wait on and the host memory to keep alive."""

    __slots__ = ("start", "done", "keep", "seconds", "nbytes")

    def __init__(self, start=None, done=None, keep=(), seconds: float | None = None, nbytes: int = 0):
        self.start = start
        self.done = done
        self.keep = keep  # host tensors read by in-flight copies
        self.seconds = seconds
        self.nbytes = nbytes

    def query(self) -> bool:
        return self.done is None or self.done.query()

    def elapsed(self) -> float | None:
        """Upload time in seconds (CUDA: from the events, once done; CPU: measured synchronously)."""
        if self.seconds is None and self.start is not None and self.done is not None and self.done.query():
            self.seconds = self.start.elapsed_time(self.done) / 1e3
        return self.seconds


class Uploader:
    def __init__(self, targets: list, device, mode: str = "staged"):
        if mode not in ("staged", "direct"):
            raise ValueError(f"upload mode must be 'staged' or 'direct', got {mode!r}")
        self.targets = targets  # the runtime's list: targets registered later are seen
        self.device = torch.device(device)
        self.mode = mode
        self.cuda = self.device.type == "cuda"
        self._lock = threading.Lock()  # one upload issued at a time: they share the staging buffer
        # high priority: the copy kernels get SMs at the next block boundary instead of queueing behind a
        # long GEMM, so a miss becomes usable sooner; the work (and the compute it takes) is the same
        self._stream = torch.cuda.Stream(device=self.device, priority=-1) if self.cuda else None
        self._staging = None

    def _slot_views(self, slab, slot: int, starts=None):
        """(dst, src-region) pairs: where each region of the slab lands in slot `slot`; starts:
        [target][slice] first rank of the slab's part (None: 0)."""
        out = []
        for reg in slab.layout.regions:
            t = self.targets[reg.target]
            lo = 0 if starts is None else starts[reg.target][reg.slice]
            full = (t.A if reg.which == "A" else t.B)[reg.slice][slot]
            dst = full[lo:lo + reg.rank] if reg.row_prefix else full[:, lo:lo + reg.rank]
            out.append((dst, reg))
        return out

    @staticmethod
    def _parts(slab, minus):
        """(slab, starts) of what a slot receives: the own slab at rank 0, the merged correction after it."""
        parts = [] if slab is None else [(slab, None)]
        if minus is not None:
            parts.append((minus, None if slab is None else slab.layout.slice_ranks))
        return parts

    def _zero_padding(self, slice_ranks, slot: int, prev_ranks) -> None:
        """Zero [new rank, previous rank) of every (target, slice) whose previous occupant was wider."""
        for ti, t in enumerate(self.targets):
            new = slice_ranks[ti]
            for si in range(len(t.slices)):
                prev = t.max_rank if prev_ranks is None else prev_ranks[ti][si]
                if prev <= new[si]:
                    continue
                lo, hi = new[si], prev
                if t.kind == "linear":
                    t.A[si][slot, lo:hi].zero_()
                else:
                    t.A[si][slot, :, lo:hi].zero_()
                t.B[si][slot, :, lo:hi].zero_()

    def upload(self, slab, slot: int, prev_ranks, minus=None, slice_ranks=None) -> UploadHandle:
        """Write `slab` into `slot`. prev_ranks: [target][slice] ranks the slot held (None: unknown).
        Merged mode: `minus` (the merged adapter's negated slab) goes after it, or alone (slab None);
        slice_ranks: the slot's resulting [target][slice] ranks (merged.correction_ranks)."""
        parts = self._parts(slab, minus)
        slice_ranks = slab.layout.slice_ranks if slice_ranks is None else slice_ranks
        target_ranks = [max(r, default=0) for r in slice_ranks]
        nbytes = sum(p.nbytes for p, _ in parts)
        if self.cuda:
            return self._upload_cuda(parts, slot, prev_ranks, slice_ranks, target_ranks, nbytes)
        t0 = time.perf_counter()
        self._zero_padding(slice_ranks, slot, prev_ranks)
        pairs = [(d, p.view(r)) for p, starts in parts for d, r in self._slot_views(p, slot, starts)]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        for ti, t in enumerate(self.targets):
            t.ranks[slot] = target_ranks[ti]
        return UploadHandle(seconds=time.perf_counter() - t0, nbytes=nbytes)

    def _upload_cuda(self, parts, slot: int, prev_ranks, slice_ranks, target_ranks, nbytes) -> UploadHandle:
        ranks_host = torch.tensor(target_ranks, dtype=torch.int32).pin_memory()
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        with self._lock, torch.cuda.stream(self._stream):
            start.record(self._stream)
            self._zero_padding(slice_ranks, slot, prev_ranks)
            if self.mode == "direct":
                for p, starts in parts:
                    for dst, reg in self._slot_views(p, slot, starts):
                        dst.copy_(p.view(reg), non_blocking=True)
            elif parts:
                total = sum(p.layout.numel for p, _ in parts)
                staging = self._staging_buffer(total, parts[0][0].layout.dtype)
                dsts, srcs, base = [], [], 0
                for p, starts in parts:
                    n = p.layout.numel
                    staging[base:base + n].copy_(p.buffer[:n], non_blocking=True)
                    for dst, r in self._slot_views(p, slot, starts):
                        dsts.append(dst)
                        srcs.append(staging[base + r.offset:base + r.offset + r.numel].view(r.rows, r.cols))
                    base += n
                if dsts:
                    torch._foreach_copy_(dsts, srcs)
            ranks_dev = ranks_host.to(self.device, non_blocking=True)
            torch._foreach_copy_([t.ranks[slot:slot + 1] for t in self.targets],
                                 [ranks_dev[i:i + 1] for i in range(len(self.targets))])
            done.record(self._stream)
        keep = (*(p.buffer for p, _ in parts), ranks_host)
        return UploadHandle(start, done, keep=keep, nbytes=nbytes)

    def _staging_buffer(self, numel: int, dtype) -> torch.Tensor:
        # allocated on the side stream (we are inside its context), so the caching allocator ties the
        # block to that stream and every reuse is ordered after the previous upload's copies
        s = self._staging
        if s is None or s.numel() < numel or s.dtype != dtype:
            self._staging = s = torch.empty(numel, dtype=dtype, device=self.device)
        return s


__all__ = ["UploadHandle", "Uploader"]
