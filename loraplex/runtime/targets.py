"""LoraTarget: the stacked GPU weights of one wrapped module, the shared interface between the
layers (which create and read them), the slot pool (which writes slots) and the kernels.

Per slice s of a module (qkv has 3 slices, gate_up 2, others 1):
  linear:    A[s]: [max_loras, max_rank, in_features]    B[s]: [max_loras, out_s, max_rank]
  embedding: A[0]: [max_loras, vocab, max_rank] (A transposed: a token's row is contiguous)
             B[0]: [max_loras, embedding_dim, max_rank]
ranks: int32 [max_loras], the largest real rank of the slot over the slices (0 = empty slot).
Padding rows/columns beyond a slot's real rank are zero, so a kernel that reads them stays right;
ranks only lets kernels skip that work. Scaling is folded into B when a slot is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SliceSpec:
    peft_module: str  # PEFT module path without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"
    in_features: int  # embeddings: vocabulary size
    out_features: int  # embeddings: embedding dim


class LoraTarget:
    def __init__(self, name: str, slices, kind: str, max_loras: int, max_rank: int,
                 dtype=torch.float16, device="cpu"):
        if kind not in ("linear", "embedding"):
            raise ValueError(f"kind must be 'linear' or 'embedding', got {kind!r}")
        slices = tuple(slices)
        if kind == "embedding" and len(slices) != 1:
            raise ValueError("an embedding target has exactly one slice")
        if kind == "linear" and len({s.in_features for s in slices}) != 1:
            raise ValueError(f"slices of {name} must share in_features")
        self.name = name
        self.slices = slices
        self.kind = kind
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        z = dict(dtype=dtype, device=self.device)
        if kind == "linear":
            self.A = [torch.zeros(max_loras, max_rank, s.in_features, **z) for s in slices]
        else:
            self.A = [torch.zeros(max_loras, slices[0].in_features, max_rank, **z)]
        self.B = [torch.zeros(max_loras, s.out_features, max_rank, **z) for s in slices]
        self.ranks = torch.zeros(max_loras, dtype=torch.int32, device=self.device)
        offs, o = [], 0
        for s in slices:
            offs.append(o)
            o += s.out_features
        self.out_offsets = tuple(offs)
        self.out_features = o

    @property
    def nbytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.A, *self.B))

    def clear_slot(self, slot: int) -> None:
        for t in (*self.A, *self.B):
            t[slot].zero_()
        self.ranks[slot] = 0

    def write_slot(self, slot: int, weights) -> None:
        """Simple synchronous write. weights: per slice None or (A [r, in], B [out, r], scaling)
        (embedding: A as PEFT stores it, [r, vocab]). The pool's fast path writes the same layout."""
        self.clear_slot(slot)
        rank = 0
        for s, w in enumerate(weights):
            if w is None:
                continue
            a, b, scaling = w
            r = a.shape[0]
            if self.kind == "linear":
                self.A[s][slot, :r].copy_(a)
            else:
                self.A[s][slot, :, :r].copy_(a.t())
            self.B[s][slot, :, :r].copy_(b.float().mul(scaling))
            rank = max(rank, r)
        self.ranks[slot] = rank

    def __repr__(self):
        return f"LoraTarget({self.name!r}, {self.kind}, slices={[s.peft_module for s in self.slices]})"


def llama_targets(layers: int, hidden: int, kv_out: int, intermediate: int, *, q_out: int | None = None,
                  vocab: int | None = None, embed: bool = False, lm_head: bool = False):
    """[(name, slices, kind)] of a Llama-family decoder's LoRA sites as loraplex stacks them: q/k/v and
    gate/up merged (one launch per group), o and down single, optionally embed_tokens and lm_head.
    Module paths are PEFT's, so adapters trained on the HF model map onto them."""
    q_out = q_out or hidden
    out = []
    if embed:
        out.append(("embed_tokens", [SliceSpec("model.embed_tokens", vocab, hidden)], "embedding"))
    for i in range(layers):
        p = f"model.layers.{i}"
        out.append((f"{p}.qkv", [SliceSpec(f"{p}.self_attn.q_proj", hidden, q_out),
                                 SliceSpec(f"{p}.self_attn.k_proj", hidden, kv_out),
                                 SliceSpec(f"{p}.self_attn.v_proj", hidden, kv_out)], "linear"))
        out.append((f"{p}.o", [SliceSpec(f"{p}.self_attn.o_proj", q_out, hidden)], "linear"))
        out.append((f"{p}.gate_up", [SliceSpec(f"{p}.mlp.gate_proj", hidden, intermediate),
                                     SliceSpec(f"{p}.mlp.up_proj", hidden, intermediate)], "linear"))
        out.append((f"{p}.down", [SliceSpec(f"{p}.mlp.down_proj", intermediate, hidden)], "linear"))
    if lm_head:
        out.append(("lm_head", [SliceSpec("lm_head", hidden, vocab)], "linear"))
    return out


def linear_shapes(targets) -> dict:
    """{PEFT module path: (in_features, out_features)} of the linear slices of llama_targets(...)."""
    return {s.peft_module: (s.in_features, s.out_features) for _, slices, kind in targets if kind == "linear"
            for s in slices}
