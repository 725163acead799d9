"""Kernel block sizes: a shape heuristic, overridden by per-GPU JSON files in kernels/configs/.

No @triton.autotune in serving paths (its first-call benchmarking would stall a step and cannot run
inside a CUDA graph capture); instead an offline tuner writes configs/<GPU name>.json, keyed by
op and shape class, and the launchers read it here. Every device query is guarded so that CPU
tensors (the Triton interpreter) get a CPU heuristic without touching a CUDA driver.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
OPS = ("sgmv_shrink", "sgmv_expand", "sgmv_fused", "lora_embedding")
WIDE_N = 32768  # expand outputs this wide (lm_head, 128k vocab) get their own class


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]; 16 is tl.dot's smallest tile side."""
    p = 1 << max(0, int(n) - 1).bit_length()
    p = max(lo, p)
    return min(hi, p) if hi is not None else p


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


def _heuristic_gpu(op, T, K, N, R):
    bm = 16 if T <= 16 else 32 if T <= 128 else 64
    br = pow2(R, 16, 64)
    if op == "sgmv_shrink":
        # few tokens: long K tiles keep enough bytes in flight per program
        return dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=256 if T <= 16 else 128 if T <= 128 else 64,
                    num_warps=4, num_stages=2 if T <= 16 else 3)
    if op == "sgmv_fused":
        # h keeps the whole rank in registers. A program's serial K loop is its latency (each column
        # group re-reads A), so long K tiles, deep pipelining, and about one program per SM in total.
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, BLOCK_R=16, TARGET_PROGRAMS=132, num_warps=4,
                    num_stages=3)
    # expand / embedding: a program's B tile is [BLOCK_N, BLOCK_R]; wide N wants many programs
    return dict(BLOCK_M=bm, BLOCK_N=128 if T <= 128 else 64 if bm == 64 else 128, BLOCK_R=br,
                num_warps=4, num_stages=2)


def _heuristic_cpu(op, T, K, N, R):
    # The interpreter runs programs one after another and vectorizes inside one: big tiles, few programs.
    cfg = dict(BLOCK_M=pow2(T, 16, 64), BLOCK_R=pow2(R, 16, 64), num_warps=1, num_stages=1)
    if op in ("sgmv_shrink", "sgmv_fused"):
        cfg["BLOCK_K"] = pow2(K, 16, 256)
    if op != "sgmv_shrink":
        cfg["BLOCK_N"] = pow2(N, 16, 256)
    return cfg


def get(op: str, device, num_tokens: int, K: int = 0, N: int = 0, R: int = 16) -> dict:
    """Block sizes for `op` on `device` for a problem of num_tokens x K (shrink) / N (expand), rank R."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {OPS}")
    name = gpu_name(device)
    if name == "cpu":
        return _heuristic_cpu(op, num_tokens, K, N, R)
    cfg = _heuristic_gpu(op, num_tokens, K, N, R)
    table = load(name).get(op, {})
    cfg.update(table.get("default", {}))
    cfg.update(table.get(shape_class(num_tokens, N), {}))
    return cfg


def fused_max_tokens(device) -> int:
    """Batches up to this many tokens take the fused shrink+expand kernel in add_lora_linear."""
    return int(load(gpu_name(device)).get("fused_max_tokens", 16))
