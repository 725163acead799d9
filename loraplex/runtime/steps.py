"""Step lifetimes: plan buffers, and what a finished step or upload gives back.

A plan holds its GPU slots (and its plan buffers) until the step that read them finished. On CPU a
step is finished when the caller releases the plan. On CUDA, release records an event on the compute
stream and the slots come back when event.query() says the device got past it; nothing here ever
blocks the host on the device. Uploads likewise hold their slab's host-cache lease until their own
event completed, because the pinned buffer is what the copy engine reads.
"""

from __future__ import annotations

import threading

import torch

from .plan import PlanBuffers


class PlanSet:
    """PlanBuffers plus the scratch the per-step inputs pass through (host on CPU, device on CUDA)."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device, static: bool = False):
        self.buffers = PlanBuffers(max_tokens, max_loras, device)
        self.static = static
        n = max_tokens + max_loras
        cuda = device.type == "cuda"
        self.host = None if cuda else torch.zeros(n, dtype=torch.int32)  # CUDA: a fresh pinned block per plan
        self.dev = torch.zeros(n, dtype=torch.int32, device=device) if cuda else None


class Lease:
    """What one plan holds: slot indices (one per distinct adapter) and its PlanSet (None until taken)."""

    __slots__ = ("slots", "plan_set", "stream", "released")

    def __init__(self, slots, plan_set: PlanSet | None, stream=None):
        self.slots = list(slots)
        self.plan_set = plan_set
        self.stream = stream
        self.released = False


class StepTracker:
    def __init__(self, pool, host, max_tokens: int, max_loras: int, device: torch.device, metrics=None):
        self.pool = pool
        self.host = host
        self.max_tokens = max_tokens
        self.max_loras = max_loras
        self.device = device
        self.cuda = device.type == "cuda"
        self._metrics = metrics
        self._lock = threading.Lock()
        self.primary = PlanSet(max_tokens, max_loras, device, static=True)
        self._free: list[PlanSet] = [self.primary]
        self._steps: list = []  # (events, lease): released on CUDA, waiting for the device
        self._uploads: list = []  # (UploadHandle, key): copies in flight holding a host lease

    # ---- plan buffers ---------------------------------------------------------------------------
    def take_plan_set(self, static: bool = False) -> PlanSet:
        """The primary set (the one a captured CUDA graph reads) when static or when free, else a spare.
        Spares exist for callers that keep several plans open at once (threads, pipelined engines)."""
        if static:
            return self.primary
        with self._lock:
            if self._free:
                return self._free.pop(0)
        return PlanSet(self.max_tokens, self.max_loras, self.device)

    def _give_back(self, ps: PlanSet | None) -> None:
        if ps is None or (ps.static and ps is not self.primary):  # None: the plan failed before taking one
            return
        with self._lock:
            if ps is self.primary:
                self._free.insert(0, ps)
            elif len(self._free) < 8:  # keep a few spares; more are garbage
                self._free.append(ps)

    # ---- ends of steps --------------------------------------------------------------------------
    def release(self, lease: Lease, static_set: bool) -> None:
        if lease.released:
            return
        lease.released = True
        if not self.cuda:
            self.pool.release(lease.slots)
            if not static_set:
                self._give_back(lease.plan_set)
            return
        events = []
        for stream in {torch.cuda.current_stream(self.device), lease.stream} - {None}:
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
        with self._lock:
            self._steps.append((events, lease, static_set))
        self.reclaim()

    def upload_issued(self, handle, key) -> None:
        """CUDA: keep `key`'s host lease until the copies of `handle` completed."""
        with self._lock:
            self._uploads.append((handle, key))

    def reclaim(self) -> None:
        """Give back what finished steps and uploads held. Cheap; called often; never blocks."""
        if not self.cuda:
            return
        with self._lock:
            steps, self._steps = _split(self._steps, lambda s: all(e.query() for e in s[0]))
            uploads, self._uploads = _split(self._uploads, lambda u: u[0].query())
        for _, lease, static_set in steps:
            self.pool.release(lease.slots)
            if not static_set:
                self._give_back(lease.plan_set)
        for handle, key in uploads:
            self.host.unlease(key)
            if self._metrics is not None:
                secs = handle.elapsed()
                if secs is not None:
                    self._metrics.phase("upload", secs)

    def in_flight(self) -> dict:
        with self._lock:
            return {"steps": len(self._steps), "uploads": len(self._uploads)}


def _split(items: list, done) -> tuple[list, list]:
    yes, no = [], []
    for it in items:
        (yes if done(it) else no).append(it)
    return yes, no


__all__ = ["Lease", "PlanSet", "StepTracker"]
