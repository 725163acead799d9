"""fp32 torch implementations of the LoRA ops, with the same signatures as kernels/ops.py.

Two uses: the oracle the Triton kernels are tested against, and the `torch` backend on CPU (a
demo runs much faster here than in the Triton interpreter). They read only `plan.token_slots`,
never the plan's sorted segments, so they share no indexing logic with the kernels they check.
One loop step per slot in the batch; every product is done in fp32 and rounded once on store.
"""

from __future__ import annotations

import torch


def _slot_groups(plan):
    """[(slot, token indices)] for every slot with tokens in this batch (host sync: reference only)."""
    slots = plan.token_slots[: plan.num_tokens]
    groups = []
    for s in torch.unique(slots).tolist():
        if s >= 0:
            groups.append((s, torch.nonzero(slots == s).flatten()))
    return groups


def _ranks(plan, ranks):
    return (plan.slot_ranks if ranks is None else ranks).tolist()


def sgmv_shrink(x, A, plan, out, scale=1.0, ranks=None):
    """Semantics: out[s, t, :] = scale * x[t] @ A[s][slot(t), :rank]^T, zero beyond the rank;
    rows of tokens with slot -1 are left untouched. See ops.sgmv_shrink for shapes."""
    rk = _ranks(plan, ranks)
    for s, idx in _slot_groups(plan):
        r = rk[s]
        xs = x[idx].float()
        for i, a in enumerate(A):
            h = torch.zeros(idx.numel(), out.shape[2], dtype=torch.float32, device=out.device)
            if r > 0:
                h[:, :r] = (xs @ a[s, :r].float().t()) * scale
            out[i, idx] = h
    return out


def sgmv_expand(h, B, plan, y, add=True, ranks=None):
    """Semantics: y[t, off_s : off_s + N_s] (+)= h[s, t, :rank] @ B[s][slot(t), :, :rank]^T;
    rows of tokens with slot -1 are left untouched. See ops.sgmv_expand for shapes."""
    rk = _ranks(plan, ranks)
    for s, idx in _slot_groups(plan):
        r = rk[s]
        off = 0
        for i, b in enumerate(B):
            n = b.shape[1]
            acc = h[i, idx, :r].float() @ b[s, :, :r].float().t()
            if add:
                acc = acc + y[idx, off:off + n].float()
            y[idx, off:off + n] = acc.to(y.dtype)
            off += n
    return y


def add_lora_linear(y, x, A_list, B_list, plan, ranks=None, buffer=None, scale=1.0):
    """Semantics: y[t] += concat_s(scale * x[t] @ A_s[slot(t)]^T @ B_s[slot(t)]^T). See ops."""
    rk = _ranks(plan, ranks)
    for s, idx in _slot_groups(plan):
        r = rk[s]
        xs = x[idx].float()
        off = 0
        for a, b in zip(A_list, B_list, strict=True):
            n = b.shape[1]
            h = (xs @ a[s, :r].float().t()) * scale
            y[idx, off:off + n] = (y[idx, off:off + n].float() + h @ b[s, :, :r].float().t()).to(y.dtype)
            off += n
    return y


def add_lora_embedding(y, token_ids, A_emb, B_emb, plan, ranks=None, buffer=None):
    """Semantics: y[t] += A_emb[slot(t), token_ids[t], :rank] @ B_emb[slot(t), :, :rank]^T;
    ids outside [0, V) add nothing. See ops.add_lora_embedding."""
    rk = _ranks(plan, ranks)
    V = A_emb.shape[1]
    for s, idx in _slot_groups(plan):
        r = rk[s]
        ids = token_ids[idx].long()
        ok = (ids >= 0) & (ids < V)
        h = torch.zeros(idx.numel(), r, dtype=torch.float32, device=y.device)
        h[ok] = A_emb[s, ids[ok], :r].float()
        y[idx] = (y[idx].float() + h @ B_emb[s, :, :r].float().t()).to(y.dtype)
    return y
