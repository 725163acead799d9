"""What a kernel config may ask of one sm_90 SM (H100/H200), and fit(): the config shrunk until it fits.

No Triton here: an estimate from the tiles each kernel keeps in flight, conservative enough that the
real compiler's figure stays below it. tests/kernels/aot_compile.py compiles every config that the
heuristics and the shipped JSON files can pick, for ranks 8..512, and checks the compiler's own
numbers (0 spills, shared memory within SMEM_LIMIT, no pipelined wgmma with A in registers).

Rules, each for a failure seen in compiled code (see /work/shared/perf/KERNEL_MODEL.md, section 4):
- shared memory: the fused kernel at rank 256 asked for 279 KB (the limit is 227 KB) and could not
  launch; BLOCK_K (then stages, then BLOCK_N) shrinks until the estimate fits.
- registers: the fused kernel keeps h [BLOCK_M, BLOCK_R] and a B tile [BLOCK_R, BLOCK_N] in registers;
  at rank 128 with BLOCK_N 128 it reached 255 registers. The B tile is capped at FUSED_B_BYTES. fp32
  weights (a reference setting: exact dots without tensor cores) keep both operand tiles of the K loop
  in registers: BLOCK_K is capped at FP32_MAX_BLOCK_K there.
- wgmma with A in registers inside a pipelined loop can be miscompiled by ptxas < 13.3
  (triton-lang/triton#9433): the expand and embedding dots take A from registers (h converted to the
  weights' dtype, gathered A rows), and become wgmma from BLOCK_M 64 on sm_90, so those run with
  num_stages 1 there; the fused kernel keeps BLOCK_M <= 32 (mma.sync, never wgmma).
"""

from __future__ import annotations

from .tiles import TILE_SIZES

SMEM_LIMIT = 232448  # 227 KB: the most shared memory one CTA may use on sm_90
SMEM_MARGIN = 8192  # the compiler's own scratch (layout conversions, barriers) on top of the tiles
FUSED_B_BYTES = 8192  # the fused kernel's B tile in registers: 16 registers per thread of 4 warps
FP32_MAX_BLOCK_K = 32  # fp32 weights: exact (non tensor-core) dots hold both operand tiles in registers
FUSED_MAX_BLOCK_M = 32  # mma.sync: h (A of the expand dot) lives in registers
FUSED_MAX_RANK = 128  # h [BLOCK_M, rank] and its B tiles in registers: at 256 the compiler spills


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]; 16 is tl.dot's smallest tile side."""
    p = 1 << max(0, int(n) - 1).bit_length()
    p = max(lo, p)
    return min(hi, p) if hi is not None else p


def smem_bytes(op: str, cfg: dict, R: int, elem: int = 2) -> int:
    """Estimated shared memory of one CTA: the pipeliner keeps num_stages - 1 copies of the tiles a loop
    streams (at least one, for the dot's operands), plus the tiles the compiler stages once."""
    bufs = max(1, int(cfg.get("num_stages", 2)) - 1)
    bm = cfg["BLOCK_M"]
    if op == "sgmv_shrink":
        return bufs * (bm + cfg["BLOCK_R"]) * cfg["BLOCK_K"] * elem
    if op == "sgmv_fused":
        br = pow2(R)
        return bufs * (bm + br) * cfg["BLOCK_K"] * elem + br * cfg["BLOCK_N"] * elem + bm * br * elem
    if op == "sgmv_expand":  # h is fp32
        return bufs * (bm * cfg["BLOCK_R"] * 4 + cfg["BLOCK_R"] * cfg["BLOCK_N"] * elem)
    return bufs * (bm + cfg["BLOCK_N"]) * cfg["BLOCK_R"] * elem  # lora_embedding


def fits(op: str, cfg: dict, R: int, elem: int = 2) -> bool:
    return smem_bytes(op, cfg, R, elem) + SMEM_MARGIN <= SMEM_LIMIT


def fit(op: str, cfg: dict, R: int, arch: int = 90, elem: int = 2) -> dict:
    """cfg made valid for sm_`arch` at padded rank R and weights of `elem` bytes: BLOCK_M one of
    TILE_SIZES, the rules above."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = next((b for b in TILE_SIZES if b >= cfg["BLOCK_M"]), TILE_SIZES[-1])
    if op == "sgmv_fused":
        if pow2(R) > FUSED_MAX_RANK:
            raise ValueError(f"sgmv_fused holds the whole rank in registers: rank {R} > {FUSED_MAX_RANK} does not "
                             "fit (add_lora_linear runs such ranks as shrink + expand)")
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], FUSED_MAX_BLOCK_M)
        cfg["BLOCK_R"] = pow2(R)
        cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], FUSED_B_BYTES // (cfg["BLOCK_R"] * elem)))
    if elem >= 4 and "BLOCK_K" in cfg:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], FP32_MAX_BLOCK_K)
    if op in ("sgmv_expand", "lora_embedding") and arch >= 90 and cfg["BLOCK_M"] >= 64:
        cfg["num_stages"] = 1
    while not fits(op, cfg, R, elem):
        if "BLOCK_K" in cfg and cfg["BLOCK_K"] > 32:
            cfg["BLOCK_K"] //= 2
        elif cfg.get("num_stages", 2) > 2:
            cfg["num_stages"] -= 1
        elif "BLOCK_N" in cfg and cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg.get("BLOCK_R", 16) > 16 and op != "sgmv_fused":
            cfg["BLOCK_R"] //= 2
        else:
            raise ValueError(f"{op}: no config fits sm_{arch} shared memory at rank {R}: {cfg}")
    return cfg
