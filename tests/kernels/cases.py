"""Test data for the kernel tests: slot vectors by popularity mix, stacked weights with untrusted
padding, poisoned outputs, and the one per-dtype tolerance table every kernel test uses."""

from __future__ import annotations

import torch

from loraplex.runtime.plan import PlanBuffers

# Activations and weights are scaled so every output is O(1): these are then relative-error bounds
# of a few units in the last place of each dtype (fp16/bf16 round h once and y once).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIXES = ("identical", "distinct", "uniform", "zipf", "skewed")
POISON = float("nan")


def token_slots(mix: str, T: int, L: int, gen: torch.Generator, none_frac: float = 0.0) -> torch.Tensor:
    """A [T] int32 slot vector with punica's popularity mixes; about none_frac of the tokens get -1."""
    if mix == "identical":
        s = torch.full((T,), int(torch.randint(L, (1,), generator=gen)), dtype=torch.int64)
    elif mix == "distinct":  # every token its own adapter (as far as there are slots)
        s = torch.randperm(max(T, L), generator=gen)[:T] % L
    elif mix == "uniform":
        s = torch.randint(L, (T,), generator=gen)
    elif mix == "zipf":  # P(k) ~ 1 / k^1.5 over a random order of the slots
        w = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** 1.5
        order = torch.randperm(L, generator=gen)
        s = order[torch.multinomial(w, T, replacement=True, generator=gen)]
    elif mix == "skewed":  # one hot adapter with ~80% of the tokens, the rest spread out
        hot = int(torch.randint(L, (1,), generator=gen))
        s = torch.where(torch.rand(T, generator=gen) < 0.8, hot, torch.randint(L, (T,), generator=gen))
    else:
        raise ValueError(mix)
    if none_frac:
        s = torch.where(torch.rand(T, generator=gen) < none_frac, -1, s)
    return s.to(torch.int32)


def random_ranks(L: int, R: int, gen: torch.Generator, zero_slot: bool = False) -> torch.Tensor:
    """Mixed real ranks in [1, R] (slot 0 always gets the full R, the last 1); optionally one 0."""
    r = torch.randint(1, R + 1, (L,), generator=gen)
    r[0] = R
    if L > 1:
        r[-1] = 1
    if zero_slot and L > 2:
        r[1] = 0
    return r.to(torch.int32)


def stacked_A(L, R, K, ranks, dtype, gen, n=1):
    """n slices of [L, R, K], values ~1/sqrt(K); rows past each slot's rank hold NaN: a kernel that
    reads the padding (instead of skipping it by rank) turns the whole row's result into NaN."""
    out = []
    for _ in range(n):
        a = torch.randn(L, R, K, generator=gen) / K ** 0.5
        for s, r in enumerate(ranks.tolist()):
            a[s, r:] = POISON
        out.append(a.to(dtype))
    return out


def stacked_B(L, widths, R, ranks, dtype, gen):
    """One [L, N_s, R] slice per width, values ~1/sqrt(R); columns past each slot's rank hold NaN."""
    out = []
    for n in widths:
        b = torch.randn(L, n, R, generator=gen) / R ** 0.5
        for s, r in enumerate(ranks.tolist()):
            b[s, :, r:] = POISON
        out.append(b.to(dtype))
    return out


def plan_for(slots: torch.Tensor, ranks: torch.Tensor, L: int, max_tokens: int | None = None, max_active=None):
    buf = PlanBuffers(max(1, max_tokens or slots.numel()), L)
    return buf.build(slots, ranks, max_active)


def assert_rows(out, ref, slots, dtype, untouched, what=""):
    """Rows with an adapter match ref within TOL[dtype]; rows with slot -1 equal `untouched` bit for bit
    (NaN poison included)."""
    has = slots >= 0
    if has.any():
        torch.testing.assert_close(out[..., has, :].float(), ref[..., has, :].float(), **TOL[dtype],
                                   msg=lambda m: f"{what}: {m}")
    if (~has).any():
        got, want = out[..., ~has, :], untouched[..., ~has, :]
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool(same.all()), f"{what}: rows with slot -1 were written"
