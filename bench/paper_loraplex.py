"""loraplex's launches for the paper model (bench/paper_model.py): the v2 launchers' host logic replayed
(kernels/config.py's picks, the work-list grid bound, split_plan and the device split count, the fused
column split), each program's round trips taken from its compiled binary's facts.

facts(op, layer, T) -> dict(occ, instr, chain, chain_pdl, arrival, exit): chain = round trips until the
first data tile with nothing overlapped, chain_pdl = the same counted from the wait, arrival = the
split-K last arrival (store of the partial to the end), exit = round trips of a program past the real
tiles. Where they come from (the compiled SASS, or fixed numbers) is the caller's choice.
"""

from __future__ import annotations

from paper_model import BF16, LAYERS, cdiv, tiles_of

from loraplex.kernels import config
from loraplex.kernels.sgmv_shrink import split_plan
from loraplex.kernels.tiles import tile_bound
from loraplex.runtime.plan import SPLIT_COUNTERS, SPLIT_PARTIAL_FLOATS

GPU = "NVIDIA H200"  # no per-GPU file ships: the heuristic + default.json, as on any such GPU today


class _Sized:
    def __init__(self, n):
        self.n = n

    def numel(self):
        return self.n


def pick(op, T, K=0, N=0, R=16):
    return config.pick(op, GPU, T, K=K, N=N, R=R, arch=90, elem=BF16)


def _chain(f, pdl):
    return f["chain_pdl"] if pdl else f["chain"]


def shrink(layer, T, R, counts, bound_slots, facts, pdl):
    K, widths = LAYERS[layer]
    ns = len(widths)
    cfg = pick("sgmv_shrink", T, K=K, R=R)
    bm, br, bk = cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_K"]
    bound = tile_bound(T, bm, bound_slots)
    splits, programs = split_plan(cfg, T, K, R, ns, bound, _Sized(SPLIT_PARTIAL_FLOATS), _Sized(SPLIT_COUNTERS))
    tiles = tiles_of(counts, bm)
    n_k = cdiv(K, bk)
    want = min(max(programs // max(len(tiles), 1), 1), splits)
    k_per = cdiv(n_k, want)
    n_split = cdiv(n_k, k_per)
    f = facts("sgmv_shrink", layer, T)
    rs = ns * cdiv(R, br)
    cls, l2 = [dict(n=(programs - len(tiles) * n_split) * rs, chain=f["exit"])], 0
    for rows in tiles:
        tile = rows * bk * BF16 + bk * min(br, R) * BF16  # padding rows are masked: not fetched
        fix = n_split * rows * br * 4 if n_split > 1 else 0
        cls.append(dict(n=n_split * rs, chain=_chain(f, pdl), iters=k_per, tile=tile, stages=cfg["num_stages"],
                        post=f["arrival"] if n_split > 1 else 0, post_bytes=fix, work=True))
        l2 += n_split * rs * k_per * tile + 2 * rs * fix
    D = len(counts)
    act = T * K * BF16 + ns * T * R * 4 + (2 * n_split * ns * T * R * 4 if n_split > 1 else 0)
    return dict(name="shrink", occ=f["occ"], instr=f["instr"], classes=cls, bytes_w=D * ns * R * K * BF16,
                bytes_act=act, l2=l2, pdl=pdl, programs=programs * rs, splits=n_split)


def expand(layer, T, R, counts, bound_slots, facts, pdl):
    _, widths = LAYERS[layer]
    ns = len(widths)
    cfg = pick("sgmv_expand", T, N=sum(widths), R=R)
    bm, bn, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"]
    nb = sum(cdiv(w, bn) for w in widths)
    bound = tile_bound(T, bm, bound_slots)
    tiles = tiles_of(counts, bm)
    f = facts("sgmv_expand", layer, T)
    cls, l2 = [dict(n=(bound - len(tiles)) * nb, chain=f["exit"])], 0
    for rows in tiles:
        tile = br * bn * BF16 + rows * br * 4
        cls.append(dict(n=nb, chain=_chain(f, pdl), iters=cdiv(R, br), tile=tile, stages=cfg["num_stages"], post=1,
                        post_bytes=2 * rows * bn * BF16, work=True))
        l2 += nb * (cdiv(R, br) * tile + 2 * rows * bn * BF16)
    D = len(counts)
    return dict(name="expand", occ=f["occ"], instr=f["instr"], classes=cls, bytes_w=D * sum(widths) * R * BF16,
                bytes_act=ns * T * R * 4 + 2 * T * sum(widths) * BF16, l2=l2, pdl=pdl, programs=bound * nb)


def fused(layer, T, R, counts, bound_slots, facts, pdl):
    from loraplex.kernels.sgmv_fused import programs_per_slice

    K, widths = LAYERS[layer]
    ns = len(widths)
    cfg = pick("sgmv_fused", T, K=K, N=sum(widths), R=R)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    G = programs_per_slice(cfg, T, bm, bound_slots, widths)
    tiles = tiles_of(counts, bm)
    f = facts("sgmv_fused", layer, T)
    cls, l2 = [], 0
    for w in widths:
        n_nb = cdiv(w, bn)
        split = min(max(G // max(len(tiles), 1), 1), n_nb)
        cls.append(dict(n=G - len(tiles) * split, chain=f["exit"]))
        for rows in tiles:
            tile = rows * bk * BF16 + bk * R * BF16
            walk = cdiv(n_nb, split)  # column blocks the busiest group walks: B and y in one round trip each
            b_tile = R * bn * BF16 + 2 * rows * bn * BF16
            cls.append(dict(n=split, chain=_chain(f, pdl), iters=cdiv(K, bk), tile=tile, stages=cfg["num_stages"],
                            post=walk, post_bytes=walk * b_tile, work=True))
            l2 += split * cdiv(K, bk) * tile + n_nb * b_tile
    D = len(counts)
    return dict(name="fused", occ=f["occ"], instr=f["instr"], classes=cls,
                bytes_w=D * sum(R * K * BF16 + w * R * BF16 for w in widths),
                bytes_act=T * K * BF16 + 2 * T * sum(widths) * BF16, l2=l2, pdl=pdl, programs=G * ns)


def layer(name, T, R, counts, bound_slots, facts, pdl_first, pdl_rest):
    """What ops.add_lora_linear launches for one module: the fused kernel up to fused_max_tokens, else
    split-K shrink then expand. pdl_first: the first LoRA launch after the base GEMM overlaps it (only
    if the GEMM lets dependents start early); pdl_rest: the LoRA launches after a LoRA launch."""
    table = config.load(GPU)
    fused_tokens = int(table.get("fused_max_tokens", config.DEFAULTS["fused_max_tokens"]))
    fused_rank = int(table.get("fused_max_rank", config.DEFAULTS["fused_max_rank"]))
    if fused_tokens >= T and fused_rank >= R:
        return [fused(name, T, R, counts, bound_slots, facts, pdl_first)]
    return [shrink(name, T, R, counts, bound_slots, facts, pdl_first),
            expand(name, T, R, counts, bound_slots, facts, pdl_rest)]
