"""Kernel block sizes: a shape heuristic, overridden by per-GPU JSON files in kernels/configs/, then
fitted to the GPU's resources (kernels/budget.py).

No @triton.autotune in serving paths (its first-call benchmarking would stall a step and cannot run
inside a CUDA graph capture); instead an offline tuner (bench/tune.py) writes configs/<GPU name>.json,
keyed by op and shape class (optionally per rank: "small@r64"), and the launchers read it here. Every
device query is guarded so that CPU tensors (the Triton interpreter) get a CPU heuristic without
touching a CUDA driver.

Per-op keys besides the block sizes and num_warps / num_stages:
  SPLIT_K, SPLIT_MIN_K_TILES, SPLIT_TARGET_PROGRAMS   shrink: most K splits (1 = off), the fewest K tiles
                                                      a split walks, programs to aim for in all
  TARGET_PROGRAMS                                     fused: programs to aim for in all
  PDL                                                 programmatic dependent launch where supported
Global keys: fused_max_tokens, fused_max_rank (batches up to this many tokens, at ranks up to this,
take the fused kernel).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from .budget import fit, pow2

CONFIG_DIR = Path(__file__).with_name("configs")
OPS = ("sgmv_shrink", "sgmv_expand", "sgmv_fused", "lora_embedding")
GLOBAL_KEYS = ("fused_max_tokens", "fused_max_rank")
WIDE_N = 32768  # expand outputs this wide (lm_head, 128k vocab) get their own class
# GPUs: decode through the split-K shrink + expand (the calibrated paper model of the v2 kernels,
# bench/results/NOTES.md: 0.83 kept at T=1 against 0.80 fused at r16, 0.80 against 0.55 at r64; the
# fused kernel walks all of K serially per program); the tuner measures both and may set fused_max_tokens.
# The CPU interpreter runs programs one after another: there the fused kernel's single launch wins.
DEFAULTS = {"fused_max_tokens": 0, "fused_max_rank": 128}
CPU_DEFAULTS = {"fused_max_tokens": 16, "fused_max_rank": 128}

__all__ = ["get", "pick", "load", "shape_class", "rank_key", "fused_max_tokens", "fused_max_rank", "pow2"]


def gpu_name(device) -> str:
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return _cuda_name(dev.index)


def _file_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


@functools.cache
def _cuda_name(index) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 - no driver / no device: fall back to the heuristic
        return "unknown"


@functools.cache
def _cuda_arch(index) -> int:
    try:
        major, minor = torch.cuda.get_device_capability(index)
        return 10 * major + minor
    except Exception:  # noqa: BLE001 - no driver: assume the GPU the rules were written for
        return 90


@functools.cache
def load(name: str) -> dict:
    """The JSON config for GPU `name` (configs/<name>.json, else configs/default.json, else {})."""
    for path in (CONFIG_DIR / f"{_file_key(name)}.json", CONFIG_DIR / "default.json"):
        if path.is_file():
            with open(path) as f:
                return json.load(f)
    return {}


def shape_class(num_tokens: int, n: int = 0) -> str:
    if n >= WIDE_N:
        return "wide"
    if num_tokens <= 16:
        return "decode"
    if num_tokens <= 128:
        return "small"
    if num_tokens <= 1024:
        return "medium"
    return "large"


def rank_key(R: int) -> str:
    """The rank bucket of a JSON key such as "small@r64": the padded rank rounded up to a power of two."""
    return f"r{pow2(R)}"


def _heuristic_gpu(op, T, K, N, R):
    bm = 16 if T <= 16 else 32 if T <= 128 else 64
    br = pow2(R, 16, 64)
    if op == "sgmv_shrink":
        # few tokens: long K tiles keep enough bytes in flight per program; split K up to 16 ways while
        # the tiles are few (the split count adapts on the device to the real tiles)
        return dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=256 if T <= 16 else 128 if T <= 128 else 64,
                    num_warps=4, num_stages=2 if T <= 16 else 3, SPLIT_K=16 if T <= 1024 else 1,
                    SPLIT_MIN_K_TILES=2, SPLIT_TARGET_PROGRAMS=264, PDL=True)
    if op == "sgmv_fused":
        # h keeps the whole rank in registers. A program's serial K loop is its latency (each column
        # group re-reads A), so long K tiles (as long as shared memory allows two CTAs per SM), deep
        # pipelining, and about one program per SM in total.
        bk = 512 if R <= 16 else 256 if R <= 64 else 128
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=bk, BLOCK_R=16, TARGET_PROGRAMS=132, num_warps=4,
                    num_stages=3, PDL=True)
    # expand / embedding: a program's B tile is [BLOCK_N, BLOCK_R]; wide N wants many programs
    return dict(BLOCK_M=bm, BLOCK_N=128 if T <= 128 else 64 if bm == 64 else 128, BLOCK_R=br,
                num_warps=4, num_stages=2, PDL=True)


def _heuristic_cpu(op, T, K, N, R):
    # The interpreter runs programs one after another and vectorizes inside one: big tiles, few programs.
    cfg = dict(BLOCK_M=pow2(T, 16, 64), BLOCK_R=pow2(R, 16, 64), num_warps=1, num_stages=1)
    if op in ("sgmv_shrink", "sgmv_fused"):
        cfg["BLOCK_K"] = pow2(K, 16, 256)
    if op != "sgmv_shrink":
        cfg["BLOCK_N"] = pow2(N, 16, 256)
    if op == "sgmv_fused":
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
    return cfg


def pick(op: str, name: str, num_tokens: int, K: int = 0, N: int = 0, R: int = 16, arch: int = 90,
         elem: int = 2) -> dict:
    """The config a GPU called `name` (sm_`arch`) uses for weights of `elem` bytes: heuristic, then the
    JSON entries "default", "default@rR", class, "class@rR" (later ones win, field by field), then
    fitted to the resources (kernels/budget.py)."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {OPS}")
    cfg = _heuristic_gpu(op, num_tokens, K, N, R)
    table = load(name).get(op, {})
    cls, rk = shape_class(num_tokens, N), rank_key(R)
    for key in ("default", f"default@{rk}", cls, f"{cls}@{rk}"):
        cfg.update(table.get(key, {}))
    return fit(op, cfg, R, arch, elem)


def get(op: str, device, num_tokens: int, K: int = 0, N: int = 0, R: int = 16, dtype=torch.bfloat16) -> dict:
    """Block sizes for `op` on `device` for a problem of num_tokens x K (shrink) / N (expand), rank R,
    weights of `dtype`."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {OPS}")
    name = gpu_name(device)
    if name == "cpu":
        return _heuristic_cpu(op, num_tokens, K, N, R)
    elem = torch.empty((), dtype=dtype).element_size()
    return pick(op, name, num_tokens, K, N, R, _cuda_arch(torch.device(device).index), elem)


def _flag(device, key: str) -> int:
    name = gpu_name(device)
    if name == "cpu":
        return CPU_DEFAULTS[key]
    return int(load(name).get(key, DEFAULTS[key]))


def fused_max_tokens(device) -> int:
    """Batches up to this many tokens take the fused shrink+expand kernel in add_lora_linear."""
    return _flag(device, "fused_max_tokens")


def fused_max_rank(device) -> int:
    """...and only at padded ranks up to this (h and a B tile of the whole rank live in registers)."""
    return _flag(device, "fused_max_rank")
