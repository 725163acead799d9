"""LoraContext: the current step's plan, set once per step and read by every wrapped layer of a model
(so nothing is threaded through the model's forward signature).

One context belongs to one model and is used by one thread at a time: set() and the layers' forwards
of a step must not interleave with another step's (the plan, the row plan and the shared fp32 scratch
are per context). Serve several models, or several concurrent steps, with one context each.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from ..errors import LaunchError
from ..runtime.plan import PlanBuffers
from .overlap import SideStream, overlap_from_env


class LoraContext:
    """Holds the plan of the step being run, a scratch buffer, and a per-request plan for layers that
    see one row per request (lm_head when a model keeps only the last position's logits).

    Nothing here allocates on the device per step: the last-row indices and the row plan live in
    static buffers (what a captured CUDA graph needs), filled by one small H2D copy in set()."""

    def __init__(self, max_tokens: int, max_loras: int, max_rank: int, device, max_slices: int = 3,
                 delta_rows: int = 256, overlap: bool | None = None):
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        # LoRA shrink concurrent with the base GEMM (overlap.py); None: LORAPLEX_OVERLAP decides
        self.side = SideStream(self.device) if (overlap_from_env() if overlap is None else overlap) else None
        self.pending = None  # overlap: (group, input, x rows, h, plan) of a shrink issued, not yet expanded
        self.plan = None
        self.step_id = 0
        self.buffer = torch.empty(max_slices, max_tokens, max_rank, dtype=torch.float32, device=self.device)
        # SliceGroup deltas: (group, input, delta) of the last group computed in this step, and a static
        # scratch of delta_rows rows for them (sized by reserve_delta when the groups are made)
        self.delta = None
        self.delta_rows = min(delta_rows, max_tokens)
        self._delta_scratch = None
        self._row_buffers = PlanBuffers(max_tokens, max_loras, self.device)
        self._last_index_buf = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        self._row_plan = None
        self._last_index = None  # view of _last_index_buf: the last row of each request that has rows

    def set(self, plan, tokens_per_request=None) -> None:
        """Make `plan` current. tokens_per_request (host ints, summing to plan.num_tokens) lets layers
        that see only the last row of each request (with at least one token) get a plan for those rows."""
        self.plan = plan
        self.step_id += 1
        self.delta = None
        self.pending = None
        self._row_plan = None
        self._last_index = None
        if plan is not None and tokens_per_request is not None:
            counts = list(tokens_per_request)
            if sum(counts) != plan.num_tokens:
                raise LaunchError(f"tokens_per_request sums to {sum(counts)}, plan has {plan.num_tokens} tokens")
            # a request without tokens has no last row: it is not among the rows such a layer sees
            ends = [e - 1 for c, e in zip(counts, itertools.accumulate(counts), strict=True) if c]
            n = len(ends)
            if self.device.type == "cuda":  # fresh pinned block: the allocator keeps it until the copy ran
                host = torch.empty(n, dtype=torch.int64, pin_memory=True)
                host.numpy()[:] = ends
                self._last_index_buf[:n].copy_(host, non_blocking=True)
            else:
                self._last_index_buf[:n].numpy()[:] = ends
            self._last_index = self._last_index_buf[:n]

    def shrink_out(self, n_slices: int, rows: int, R: int) -> torch.Tensor:
        """The fp32 shrink output [n_slices, rows, R] for a layer of padded rank R: a view of the scratch."""
        return self.buffer[:n_slices, :rows, :R]

    def reserve_delta(self, width: int, dtype) -> None:
        """Make the delta scratch hold delta_rows x `width` of `dtype` (called as groups are created,
        before any step: the buffer is then never reallocated, so CUDA graphs can capture reads of it)."""
        s = self._delta_scratch
        if s is None or s.shape[1] < width or s.dtype != dtype:
            width = width if s is None or s.dtype != dtype else max(width, s.shape[1])
            self._delta_scratch = torch.empty(self.delta_rows, width, dtype=dtype, device=self.device)
            self.delta = None

    def delta_buffer(self, rows: int, width: int, dtype, device) -> torch.Tensor:
        """A zeroed [rows, width] tensor for a group's delta: a view of the scratch when it fits, else
        a fresh allocation (prefill-sized steps, where it costs little next to the work)."""
        s = self._delta_scratch
        if s is not None and rows <= s.shape[0] and width <= s.shape[1] and s.dtype == dtype and s.device == device:
            return s[:rows, :width].zero_()
        return torch.zeros(rows, width, dtype=dtype, device=device)

    def clear(self) -> None:
        self.set(None)

    @contextlib.contextmanager
    def use(self, plan, tokens_per_request=None):
        self.set(plan, tokens_per_request)
        try:
            yield plan
        finally:
            self.clear()

    def plan_for_rows(self, rows: int, what: str):
        """The plan for a layer input of `rows` rows: the step's plan, or the per-request plan.
        When every request has one token the two are the same plan (rows == tokens == requests)."""
        plan = self.plan
        if plan is None or rows == plan.num_tokens:
            return plan
        if self._last_index is not None and rows == self._last_index.numel():
            if self._row_plan is None:
                rb = self._row_buffers
                slots = torch.index_select(plan.token_slots, 0, self._last_index, out=rb.token_slots[:rows])
                self._row_plan = rb.build(slots, plan.slot_ranks, plan.max_active)
            return self._row_plan
        raise LaunchError(
            f"{what}: input has {rows} rows but the step's plan has {plan.num_tokens} tokens"
            + (f" and {self._last_index.numel()} requests" if self._last_index is not None else "")
        )
