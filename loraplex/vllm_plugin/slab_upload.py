"""A vLLM slab into one slot of vLLM's stacked LoRA tensors: one copy per miss, placed off the step.

upload(slab, slot) issues, on CUDA all on one high-priority side stream:
  1. wait for the last step that read the slot (its event, recorded by steps_enqueued; no host sync);
  2. ONE host->device copy of the whole slab (pinned, non_blocking) into a device staging buffer;
  3. zero fills of what the slot's previous occupant wrote beyond the new adapter's blocks (a slot
     whose contents are unknown, e.g. after vLLM's own path wrote it, is zeroed whole), batched;
  4. the placement: device-to-device copies from staging into every piece's block [:rows, :cols]
     (int8 slabs: one dequantizing multiply per piece instead);
  5. an event. Only a step whose batch uses the slot waits for it (make_ready); other steps never do.
On the CPU the same steps run synchronously: the "device" is the CPU, the copy in step 2 is the one
read of the host slab.

Why a staging buffer rather than copying straight into slot-major views of the stacked tensors:
vLLM allocates each module's stacked tensors itself, [max_loras, 1, R, K] per slice, and its kernels
(and ours) take them as they are. Slot-major storage would mean re-allocating every stacked tensor
as a strided view of one buffer and would pad each piece to max_lora_rank in the copy. The staging
copy costs one device-to-device pass over the slab (~4 TB/s against ~55 GB/s for the H2D copy: under
2% of the miss) and keeps the copy at the adapter's real rank. The staging buffer is reserved once,
at the largest slab size, before CUDA graphs are captured (reserve_staging).

Merged mode (worker_merge.py): while an adapter M is merged into the base weights, every slot holds
its adapter minus M. set_correction() copies M's negated slab to the device once per switch; from then
on each upload places, after every piece of its own adapter (ranks [0, r)), M's piece of the same
module and slice (ranks [r, r + r_M)), by device-to-device copies: still one host-to-device copy per
miss. An upload of no slab (None) places M's pieces alone: the slot base-model requests use.

Nothing here may run inside CUDA-graph capture (upload refuses); the stacked tensors are written in
place, so captured graphs read the new weights at their next replay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from ..kernels.checks import capturing
from ..runtime.int8 import dequantize_into
from ..runtime.upload import UploadHandle
from .slab_layout import VllmTargets, piece_view

log = logging.getLogger("loraplex.vllm_plugin")

_VIEW_CACHE = 64  # (layout signature, slot) -> prepared views; most adapters share a few layouts


class SlabUploader:
    def __init__(self, targets: VllmTargets, device=None, compute_stream=None):
        self.targets = targets  # VllmTargets, or anything with its kinds/dtype/stacked/slot_view
        first = targets.stacked(next(iter(targets.kinds)), "B")[0]
        self.device = torch.device(device) if device is not None else first.device
        self.cuda = self.device.type == "cuda"
        self.slots = first.shape[0]
        self._lock = threading.Lock()  # one upload issued at a time: they share the staging buffer
        self._stream = torch.cuda.Stream(device=self.device, priority=-1) if self.cuda else None
        # the stream vLLM's steps run on (the constructing thread's current stream by default)
        self._compute = (compute_stream or torch.cuda.current_stream(self.device)) if self.cuda else None
        self._staging: torch.Tensor | None = None
        self._views: OrderedDict = OrderedDict()
        # per slot: {(module, which, slice): (rows, cols)} the last upload wrote; None = unknown
        self._extent: list[dict | None] = [None] * self.slots
        self._ready: list = [None] * self.slots  # CUDA: event of the slot's last upload, until a step waited
        self._read: list = [None] * self.slots  # CUDA: event after the last step that read the slot
        self._warned_pageable = False
        self._correction = None  # (layout, device bytes, host slab) of the merged adapter's negated slab
        self._correction_dev: torch.Tensor | None = None

    # ---- what the slab leaves to vLLM ----------------------------------------------------------
    @property
    def uncovered(self) -> tuple[str, ...]:
        """Modules the slab does not cover: the caller runs vLLM's set_lora/reset_lora for them."""
        return self.targets.uncovered

    def place_uncovered(self, lora_model, slot: int) -> None:
        """vLLM's own per-module path for the uncovered modules (what activate_adapter does for them).
        `lora_model` as vLLM's add_adapter leaves it (packed by _create_merged_loras_inplace, scaling
        folded), holding weights for these modules only if the caller likes; None: zero them."""
        manager = self.targets.manager
        for name in self.uncovered:
            module = manager.modules[name]
            lora = manager._get_lora_layer_weights(lora_model, name) if lora_model is not None else None
            if lora is None:
                module.reset_lora(slot)
            else:
                module.set_lora(slot, lora.lora_a, lora.lora_b)

    # ---- slot bookkeeping ----------------------------------------------------------------------
    def forget(self, slot: int | None = None) -> None:
        """vLLM's own path wrote `slot` (None: every slot): its contents are unknown, so the next
        upload zeroes it whole. On CUDA the write is ordered like a step that read the slot."""
        slots = range(self.slots) if slot is None else (slot,)
        with self._lock:
            for s in slots:
                self._extent[s] = None
        self.steps_enqueued(slots)

    def steps_enqueued(self, slots) -> None:
        """Call after enqueueing a step (on the current stream) whose batch reads `slots`: an upload
        into one of them will wait for this point of the stream, never for the host."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for s in slots:
                self._read[s] = ev

    def make_ready(self, slots) -> None:
        """Call before enqueueing a step that reads `slots`: the current stream waits on their uploads
        in flight (a device-side wait; the host goes on)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            for s in slots:
                ev = self._ready[s]
                if ev is not None:
                    stream.wait_event(ev)
                    self._ready[s] = None  # later steps on this stream are ordered after this one

    def reserve_staging(self, nbytes: int) -> None:
        """Allocate the staging buffer now (at startup, before graph capture and memory profiling)."""
        with self._lock:
            if self.cuda:
                with torch.cuda.stream(self._stream):
                    self._staging_buffer(nbytes)
            else:
                self._staging_buffer(nbytes)

    # ---- merged mode: the correction every upload appends ------------------------------------------
    def reserve_correction(self, nbytes: int) -> None:
        """Allocate the device copy of the correction now (startup, before memory profiling)."""
        with self._lock:
            self._correction_buffer(nbytes)

    def _correction_buffer(self, nbytes: int) -> torch.Tensor:
        c = self._correction_dev
        if c is None or c.numel() < nbytes:
            if self.cuda and capturing():
                raise RuntimeError("loraplex: correction buffer growth during CUDA-graph capture")
            if self.cuda:
                with torch.cuda.stream(self._stream):
                    c = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            else:
                c = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self._correction_dev = c
        return c

    def set_correction(self, slab) -> None:
        """Every later upload appends `slab`'s pieces (the merged adapter, B negated: correction_slab)
        after its own adapter's; None: no correction. Call between steps, with no upload in flight that
        may still read the old correction (a switch syncs the device first). Slots uploaded before
        keep what they hold: the caller refills them."""
        with self._lock:
            self._views.clear()
            if slab is None:
                self._correction = None
                return
            layout = slab.layout
            if layout.quant is not None or layout.dtype != self.targets.dtype:
                raise ValueError(f"a correction must be packed unquantized in {self.targets.dtype}, got "
                                 f"{layout.quant or layout.dtype}")
            n = layout.nbytes
            dev = self._correction_buffer(n)
            if self.cuda:
                with torch.cuda.stream(self._stream):  # uploads run on this stream: ordered after the copy
                    dev[:n].copy_(slab.buffer[:n], non_blocking=True)
            else:
                dev[:n].copy_(slab.buffer[:n])
            self._correction = (layout, dev, slab)  # the host slab stays referenced while it may be read

    @property
    def correction(self):
        """The layout of the correction uploads append now, or None."""
        return None if self._correction is None else self._correction[0]

    def slot_rank(self, layout) -> int:
        """The rank a slot holding `layout` (None: nothing of its own) has with the current correction:
        the largest own + correction rank over its slices."""
        own = {} if layout is None else {(p.module, p.which, p.slice): p.rank for p in layout.pieces}
        corr = {} if self._correction is None else {(p.module, p.which, p.slice): p.rank
                                                    for p in self._correction[0].pieces}
        return max([own.get(k, 0) + corr.get(k, 0) for k in own.keys() | corr.keys()], default=0)

    # ---- the upload ----------------------------------------------------------------------------
    def upload(self, slab, slot: int, wait_compute: bool = False) -> UploadHandle:
        """Write `slab` into `slot` of every covered module. Keep the slab's host-cache lease until
        the handle's query() is true (the copy reads the host buffer until then). slab None: the
        correction alone (merged mode's base-model slot).

        The placement waits for the slot's last reader (steps_enqueued). wait_compute=True also
        waits for everything enqueued on the compute stream so far: for uploads issued from another
        thread into a slot whose last reader may not have been recorded yet (safe, less overlap)."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range (max_loras={self.slots})")
        if self.cuda and capturing():
            raise RuntimeError("loraplex: an adapter upload must never be captured in a CUDA graph")
        if slab is None and self._correction is None:
            raise ValueError("an upload of no slab needs a correction (merged mode)")
        nbytes = 0 if slab is None else slab.layout.nbytes
        if slab is not None and slab.layout.dtype != self.targets.dtype:
            raise ValueError(f"slab {slab.key!r} is packed for {slab.layout.dtype}, vLLM's LoRA dtype is "
                             f"{self.targets.dtype}")
        if not self.cuda:
            t0 = time.perf_counter()
            with self._lock:
                self._place(slab, slot)
            return UploadHandle(seconds=time.perf_counter() - t0, nbytes=nbytes)
        if slab is not None and not self._warned_pageable and not slab.buffer.is_pinned():
            self._warned_pageable = True
            log.warning("loraplex: slab %r is not in pinned memory: its copy blocks the host", slab.key)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self._lock, torch.cuda.stream(self._stream):
            start.record(self._stream)
            if self._read[slot] is not None:
                self._stream.wait_event(self._read[slot])  # the slot's last reader must finish first
            if wait_compute:
                now = torch.cuda.Event()
                now.record(self._compute)
                self._stream.wait_event(now)
            self._place(slab, slot)
            done.record(self._stream)
            self._ready[slot] = done
        return UploadHandle(start, done, keep=() if slab is None else (slab.buffer,), nbytes=nbytes)

    def _place(self, slab, slot: int) -> None:
        layout = None if slab is None else slab.layout
        if layout is not None:
            n = layout.nbytes
            staging = self._staging_buffer(n)
            staging[:n].copy_(slab.buffer[:n], non_blocking=self.cuda)  # the one host->device copy
        dsts, srcs, scales, extent = self._prepared(layout, slot)
        zero = self._stale_blocks(extent, slot)
        if zero:
            torch._foreach_zero_(zero)
        own = 0 if layout is None else len(layout.pieces)
        if layout is not None and layout.quant is not None:
            for p, d, q, s in zip(layout.pieces, dsts[:own], srcs[:own], scales[:own], strict=True):
                dequantize_into(d, q, s, p.rank_dim)
            dsts, srcs = dsts[own:], srcs[own:]
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        self._extent[slot] = extent

    def _stale_blocks(self, new: dict, slot: int) -> list:
        """Views of the slot that hold something the new upload does not overwrite (`new`: its extent
        per (module, which, slice)): all covered blocks when the slot's contents are unknown, else what
        the previous upload wrote outside the new blocks (a wider rank before, or a module the new
        adapter skips)."""
        t = self.targets
        old = self._extent[slot]
        if old is None:
            return [v[slot] for m in t.kinds for w in "AB" for v in t.stacked(m, w)]
        out = []
        for key, (ro, co) in old.items():
            rn, cn = new.get(key, (0, 0))
            if ro <= rn and co <= cn:
                continue
            full = t.slot_view(key[0], key[1], key[2], slot)
            if ro > rn:
                out.append(full[rn:ro, :co])
            if co > cn:
                out.append(full[:min(rn, ro), cn:co])
        return [v for v in out if v.numel()]

    def _prepared(self, layout, slot: int):
        """(destination blocks, sources, scales, extent) of every piece, the adapter's own (from the
        staging buffer) then the correction's (from its device copy, placed after the own piece's
        rank); cached per layout shape and slot, so a miss of a common layout builds no views
        (hundreds per adapter on a large model)."""
        corr = self._correction
        key = (None if layout is None else layout.signature, slot,
               None if self._staging is None else self._staging.data_ptr(),
               None if corr is None else (corr[0].signature, corr[1].data_ptr()))
        hit = self._views.get(key)
        if hit is not None:
            self._views.move_to_end(key)
            return hit
        dsts, srcs, scales, extent, own = [], [], [], {}, {}
        for p in () if layout is None else layout.pieces:
            dsts.append(self.targets.slot_view(p.module, p.which, p.slice, slot)[:p.rows, :p.cols])
            v, s = piece_view(self._staging, p, layout.dtype, layout.quant)
            srcs.append(v)
            scales.append(s)
            own[(p.module, p.which, p.slice)] = p.rank
            extent[(p.module, p.which, p.slice)] = (p.rows, p.cols)
        for p in () if corr is None else corr[0].pieces:
            k = (p.module, p.which, p.slice)
            at = own.get(k, 0)
            view = self.targets.slot_view(p.module, p.which, p.slice, slot)
            if p.rank_dim == 0:
                dsts.append(view[at:at + p.rows, :p.cols])
                rows, cols = at + p.rows, max(p.cols, extent.get(k, (0, 0))[1])
            else:
                dsts.append(view[:p.rows, at:at + p.cols])
                rows, cols = max(p.rows, extent.get(k, (0, 0))[0]), at + p.cols
            if rows > view.shape[0] or cols > view.shape[1]:
                raise ValueError(f"module {p.module} ({p.which}, slice {p.slice}): the adapter's rank {at} plus the "
                                 f"merged adapter's {p.rank} exceed the stacked tensors' {list(view.shape)}")
            srcs.append(piece_view(corr[1], p, corr[0].dtype, None)[0])
            scales.append(None)
            extent[k] = (rows, cols)
        hit = self._views[key] = (dsts, srcs, scales, extent)
        if len(self._views) > _VIEW_CACHE:
            self._views.popitem(last=False)
        return hit

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        # on CUDA allocated inside the side stream's context: the caching allocator ties the block to
        # that stream, so every reuse is ordered after the previous upload's reads of it
        s = self._staging
        if s is None or s.numel() < nbytes:
            if self.cuda and capturing():
                raise RuntimeError("loraplex: staging buffer growth during CUDA-graph capture")
            self._staging = s = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._views.clear()
        return s


__all__ = ["SlabUploader"]
