"""A paper model of LoRA kernel time on an sm_90 GPU (H100/H200 class), after the method of
/work/shared/perf/KERNEL_MODEL.md, for loraplex's v2 kernels (work list, split-K, PDL) and vLLM's.

One kernel node of a CUDA graph costs
    t = t_node (halved when PDL overlaps it with the kernel before) + max(longest program,
        sum of program times / (132 SMs x CTAs per SM), DRAM bytes / BW_DRAM, L2->SM bytes / BW_L2)
    program = t_disp + c_instr x SASS instructions + chain x L + K loop + post x L + post bytes / B_SM
    K loop (n tiles, S stages) = tile/B_SM + (n-1) x max(L_s/(S-1), tile/B_SM); S = 1: n x (L_s + tile/B_SM) - L_s
`chain` is the dependent global round trips before the first data tile arrives (read off the compiled
SASS by tests/kernels/sass.py), `post` those after the loop (the y read of a read-modify-write, the
split-K arrival). Inside a decode step every latency is multiplied by f_step and weights come from DRAM.
The free parameters are fitted to vLLM's measured graphed per-layer times, f_step to its step rows.

A launch here is a dict: name, occ (CTAs per SM), instr (SASS instructions), classes (groups of
programs: n, chain, iters, tile, stages, post, post_bytes, work), bytes_w (weights), bytes_act, l2 (L2->SM
bytes) and pdl (True: its metadata prologue overlaps the kernel before, PDL working).
"""

from __future__ import annotations

import math

N_SM = 132
BW_COPY = 4.23e12  # measured device copy on the H200
BW_DRAM = 0.9 * BW_COPY
PEAK = 7.96e14  # measured bf16 GEMM
B_SM = 100e9  # one CTA's streaming rate with a few tiles in flight (prior)
SMEM_SM, REGS_SM = 233472, 65536
L2_RESIDENT = 40e6  # the per-layer bench keeps a working set below this in L2 between replays
BF16 = 2
LAYERS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}  # Llama-3-8B: K, output slices
FREE = {"t_node": (0.2e-6, 4e-6), "L": (0.05e-6, 1.5e-6), "L_s": (0.05e-6, 1.5e-6), "t_disp": (0.0, 2e-6),
        "c_instr": (0.0, 5e-9), "bw_l2": (1e12, 12e12)}
START = dict(t_node=1.0e-6, L=0.3e-6, L_s=0.25e-6, t_disp=0.1e-6, c_instr=0.5e-9, bw_l2=8e12, f_step=1.0)


def cdiv(a, b):
    return -(-a // b)


def occupancy(regs, smem, warps):
    """CTAs per SM: registers per warp in units of 256, 1 KB of shared memory reserved per CTA, at most
    64 warps and 32 CTAs."""
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    return max(0, min((REGS_SM // per_warp) // warps, SMEM_SM // (smem + 1024), 64 // warps, 32))


def even_counts(T, D):
    return [T // D + (i < T % D) for i in range(D)]


def tiles_of(counts, bm):
    """Rows of every work tile: each slot's tokens cut into tiles of bm."""
    return [min(bm, c - j * bm) for c in counts for j in range(cdiv(c, bm))]


# ---- time ------------------------------------------------------------------------------------------
def program_time(c, P, L, Ls, instr):
    t = P["t_disp"] + P["c_instr"] * instr + c["chain"] * L
    n = c.get("iters", 0)
    if n:
        tile = c["tile"] / B_SM
        S = c.get("stages", 1)
        t += tile + (n - 1) * max(Ls / (S - 1), tile) if S >= 2 else n * (Ls + tile) - Ls
    return t + c.get("post", 0) * L + c.get("post_bytes", 0) / B_SM


def launch_time(ln, P, L, Ls, dram_bytes):
    if not ln["occ"]:
        return float("inf")
    times = [(program_time(c, P, L, Ls, ln["instr"] if c.get("work") else 0), c["n"]) for c in ln["classes"]
             if c["n"] > 0]
    longest = max((t for t, _ in times), default=0.0)
    slots = sum(t * n for t, n in times) / (N_SM * ln["occ"])
    return P["t_node"] * (0.5 if ln.get("pdl") else 1.0) + max(longest, slots, dram_bytes / BW_DRAM,
                                                                ln["l2"] / P["bw_l2"])


def layer_time(launches, P, ctx="step"):
    """Seconds for one module's launches: ctx 'layer' is the per-layer graphed bench (weights stay in L2
    when they fit), 'step' a whole decode step (weights from DRAM, latencies x f_step)."""
    ws = sum(ln["bytes_w"] + ln["bytes_act"] for ln in launches)
    f = 1.0 if ctx == "layer" else P["f_step"]
    total = 0.0
    for ln in launches:
        dram = 0.0 if ctx == "layer" and ws < L2_RESIDENT else ln["bytes_w"] + ln["bytes_act"]
        total += launch_time(ln, P, P["L"] * f, P["L_s"] * f, dram)
    return total


def kept_fraction(base_s, modules, P, layers=32):
    """The decode step's fraction of base throughput kept: base_s (the step without LoRA, seconds) over
    base_s plus `layers` times the LoRA time of `modules` ({module name: [launches]}, one layer's worth;
    a module whose LoRA is skipped is left out or given [])."""
    lora = sum(layer_time(launches, P) for launches in modules.values())
    return base_s / (base_s + layers * lora)


# ---- fitting ---------------------------------------------------------------------------------------
def _search(loss, P, keys, bounds):
    """Coordinate search in multiplicative steps, halved when no move improves."""
    best, step = loss(P), {k: 0.5 for k in keys}
    for _ in range(200):
        moved = False
        for k in keys:
            for mul in (1 + step[k], 1 / (1 + step[k])):
                Q = dict(P)
                lo, hi = bounds[k]
                Q[k] = min(hi, max(lo, (P[k] if P[k] > 0 else lo + 1e-12) * mul))
                q = loss(Q)
                if q < best - 1e-12:
                    P, best, moved = Q, q, True
        if not moved:
            step = {k: v / 2 for k, v in step.items()}
            if max(step.values()) < 1e-3:
                break
    return P


def fit_layers(rows, P0=START):
    """Least squares on log time over measured rows: dicts with launches and meas_s."""
    def loss(P):
        return sum((math.log(layer_time(r["launches"], P, "layer")) - math.log(r["meas_s"])) ** 2 for r in rows)
    return _search(loss, dict(P0), list(FREE), FREE)


def fit_step(rows, P):
    """f_step over measured step rows: dicts with base_s, meas_s and modules (as kept_fraction takes)."""
    def loss(Q):
        return sum((math.log(r["base_s"] + 32 * sum(layer_time(m, Q) for m in r["modules"].values()))
                    - math.log(r["meas_s"])) ** 2 for r in rows)
    return _search(loss, dict(P, f_step=1.2), ["f_step"], {"f_step": (0.5, 5.0)})["f_step"]


# ---- vLLM 0.33's launches (utils.py defaults; grid z = distinct adapters) ------------------------------
def vllm_layer(layer, T, R, counts, compiled):
    """The memset, shrink and expand vLLM launches for one module. compiled(kind, slices, T, R) gives
    the compiled variant's facts (occ, instr)."""
    K, widths = LAYERS[layer]
    ns, D = len(widths), len(counts)
    bm, bn, (bk, sk) = 32, 16, ((256, 64) if T < 128 else (32, 8))
    st = compiled("v_shrink", layer, T, R)
    nmb, n_it = cdiv(T, bm), cdiv(K, bk * sk)
    loaders = min(sk, cdiv(K, bk)) if n_it == 1 else sk
    tile, cls, l2 = bm * bk * BF16 + bk * bn * BF16, [], 0
    for c in counts:
        used = cdiv(c, bm)
        cls.append(dict(n=(nmb - used) * sk * cdiv(R, bn) * ns, chain=2))  # m blocks past the adapter's rows
        # chain: lora id, token count, start, token ids (slice pointer alongside), first tile
        cls.append(dict(n=used * loaders * cdiv(R, bn) * ns, chain=5, iters=n_it, tile=tile, stages=2, work=True))
        cls.append(dict(n=used * (sk - loaders) * cdiv(R, bn) * ns, chain=4, work=True))  # splits past K add zeros
        l2 += used * loaders * cdiv(R, bn) * ns * n_it * tile
    shrink = dict(name="v_shrink", occ=st["occ"], instr=st["instr"], classes=cls, bytes_w=D * ns * R * K * BF16,
                  bytes_act=T * K * BF16, l2=l2)
    memset = dict(name="v_zero", occ=32, instr=0, classes=[dict(n=1, chain=1)], bytes_w=0, bytes_act=0, l2=0)
    same = len(set(widths)) == 1
    bm, bn, bk = 64, (64 if ns > 1 else 128), 32
    st = compiled("v_expand", layer, T, R)
    nmb, nnb, n_it = cdiv(T, bm), cdiv(max(widths), bn), cdiv(R, bk)
    cls, l2 = [], 0
    for c in counts:
        used = cdiv(c, bm)
        cls.append(dict(n=(nmb - used) * nnb * ns, chain=2))
        for rows in tiles_of([c], bm):
            for w in widths:
                cls.append(dict(n=nnb - cdiv(w, bn), chain=2 if same else 3))
                t = bk * bn * BF16 + bm * bk * 4
                cls.append(dict(n=cdiv(w, bn), chain=5 if same else 6, iters=n_it, tile=t, stages=1, post=1,
                                post_bytes=2 * rows * bn * BF16, work=True))
                l2 += cdiv(w, bn) * (n_it * t + 2 * rows * bn * BF16)
    expand = dict(name="v_expand", occ=st["occ"], instr=st["instr"], classes=cls,
                  bytes_w=D * sum(widths) * R * BF16, bytes_act=ns * T * R * 4 + 2 * T * sum(widths) * BF16, l2=l2)
    return [memset, shrink, expand]
