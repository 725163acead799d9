"""LoRA-wrapped embedding: base rows, plus each token's adapter row (A gathered by token id, expanded by B)."""

from __future__ import annotations

from torch import nn

from ..kernels import ops


class LoraEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, target, context):
        super().__init__()
        self.base = base
        self.target = target
        self.context = context

    def forward(self, ids):
        y = self.base(ids)
        plan = self.context.plan_for_rows(ids.numel(), self.target.name)
        if plan is None or plan.max_active == 0:  # no adapter in the step (e.g. all merged)
            return y
        y2 = y.reshape(-1, y.shape[-1])
        t = self.target
        ops.add_lora_embedding(y2, ids.reshape(-1), t.A[0], t.B[0], plan, t.ranks)
        return y2.view(y.shape)
