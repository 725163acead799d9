"""reference.py against a naive per-token einsum written here (shares no code with it)."""

import pytest
import torch

from loraplex.kernels import reference

from .cases import MIXES, plan_for, random_ranks, token_slots


def _naive_lora(x, A_list, B_list, slots, ranks, scale):
    """One token at a time: delta[t] = concat_s(scale * B_s[slot, :, :r] @ (A_s[slot, :r] @ x[t]))."""
    rows = []
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s < 0:
            rows.append(None)
            continue
        r = int(ranks[s])
        parts = []
        for a, b in zip(A_list, B_list, strict=True):
            h = torch.einsum("rk,k->r", a[s, :r].double(), x[t].double()) * scale
            parts.append(torch.einsum("nr,r->n", b[s, :, :r].double(), h))
        rows.append(torch.cat(parts))
    return rows


@pytest.mark.parametrize("mix", MIXES)
def test_linear_reference_matches_naive(mix):
    gen = torch.Generator().manual_seed(1)
    T, K, R, L, widths = 19, 33, 8, 5, (12, 5)
    slots = token_slots(mix, T, L, gen, 0.3)
    ranks = random_ranks(L, R, gen, zero_slot=True)
    plan = plan_for(slots, ranks, L)
    x = torch.randn(T, K, generator=gen)
    A = [torch.randn(L, R, K, generator=gen) for _ in widths]
    B = [torch.randn(L, n, R, generator=gen) for n in widths]
    y0 = torch.randn(T, sum(widths), generator=gen)
    naive = _naive_lora(x, A, B, slots, ranks, 0.25)

    y = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks, None, 0.25)
    h = reference.sgmv_shrink(x, A, plan, torch.full((2, T, R), 7.0), 0.25, ranks)
    y2 = reference.sgmv_expand(h, B, plan, y0.clone(), True, ranks)
    y3 = reference.sgmv_expand(h, B, plan, torch.full_like(y0, 7.0), False, ranks)
    for t, d in enumerate(naive):
        if d is None:
            assert torch.equal(y[t], y0[t]) and torch.equal(y2[t], y0[t])
            assert torch.equal(y3[t], torch.full_like(y0[t], 7))
            assert h[:, t].eq(7).all()
            continue
        r = int(ranks[slots[t]])
        torch.testing.assert_close(y[t].double(), y0[t].double() + d, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(y2[t].double(), y0[t].double() + d, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(y3[t].double(), d, atol=1e-4, rtol=1e-5)
        assert h[:, t, r:].eq(0).all()


def test_embedding_reference_matches_naive():
    gen = torch.Generator().manual_seed(2)
    T, V, D, R, L = 11, 30, 9, 8, 4
    slots = token_slots("uniform", T, L, gen, 0.3)
    ranks = random_ranks(L, R, gen)
    plan = plan_for(slots, ranks, L)
    ids = torch.randint(V, (T,), generator=gen)
    ids[0], ids[1] = -1, V  # out of vocabulary: adds nothing
    A = torch.randn(L, V, R, generator=gen)
    B = torch.randn(L, D, R, generator=gen)
    y0 = torch.randn(T, D, generator=gen)
    y = reference.add_lora_embedding(y0.clone(), ids, A, B, plan, ranks)
    for t in range(T):
        s, i = int(slots[t]), int(ids[t])
        if s < 0 or not 0 <= i < V:
            assert torch.equal(y[t], y0[t])
            continue
        r = int(ranks[s])
        want = y0[t].double() + torch.einsum("dr,r->d", B[s, :, :r].double(), A[s, i, :r].double())
        torch.testing.assert_close(y[t].double(), want, atol=1e-5, rtol=1e-5)
