"""LoraContext: the current step's plan, set once per step and read by every wrapped layer of a model
(so nothing is threaded through the model's forward signature)."""

from __future__ import annotations

import contextlib

import torch

from ..errors import LaunchError
from ..runtime.plan import PlanBuffers


class LoraContext:
    """Holds the plan of the step being run, a scratch buffer, and a per-request plan for layers that
    see one row per request (lm_head when a model keeps only the last position's logits)."""

    def __init__(self, max_tokens: int, max_loras: int, max_rank: int, device, max_slices: int = 3):
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.plan = None
        self.step_id = 0
        self.buffer = torch.empty(max_slices, max_tokens, max_rank, dtype=torch.float32, device=self.device)
        self._row_buffers = PlanBuffers(max_tokens, max_loras, self.device)
        self._row_plan = None
        self._last_index = None

    def set(self, plan, tokens_per_request=None) -> None:
        """Make `plan` current. tokens_per_request (host ints, summing to plan.num_tokens) lets layers
        that see only each request's last row get a plan for those rows."""
        self.plan = plan
        self.step_id += 1
        self._row_plan = None
        self._last_index = None
        if plan is not None and tokens_per_request is not None:
            counts = list(tokens_per_request)
            if sum(counts) != plan.num_tokens:
                raise LaunchError(f"tokens_per_request sums to {sum(counts)}, plan has {plan.num_tokens} tokens")
            ends, total = [], 0
            for c in counts:
                total += c
                ends.append(total - 1)
            self._last_index = torch.tensor(ends, dtype=torch.long).to(self.device, non_blocking=True)

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
        """The plan for a layer input of `rows` rows: the step's plan, or the per-request plan."""
        plan = self.plan
        if plan is None or rows == plan.num_tokens:
            return plan
        if self._last_index is not None and rows == self._last_index.numel():
            if self._row_plan is None:
                slots = plan.token_slots.index_select(0, self._last_index)
                self._row_plan = self._row_buffers.build(slots, plan.slot_ranks, plan.max_active)
            return self._row_plan
        raise LaunchError(
            f"{what}: input has {rows} rows but the step's plan has {plan.num_tokens} tokens"
            + (f" and {self._last_index.numel()} requests" if self._last_index is not None else "")
        )
