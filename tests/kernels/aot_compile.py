"""Compile every kernel variant serving can pick to an sm_90 cubin, on a machine without a GPU, and check
the compiler's own resource figures.

The interpreter accepts code that the real compiler rejects (type unification in branches, dot shapes,
constexpr misuse) and has no resource limits; this catches both on CPU. For Llama-3-8B's modules, token
counts of every shape class and ranks 8..512, it asks kernels/config.py what each op would run with
(the heuristic, the shipped default.json and every per-GPU JSON), specializes each kernel as Triton's
JIT would at such a launch (16-byte aligned pointers, ints divisible by 16, ints equal to 1 folded),
compiles each distinct variant once and checks:
  - 0 spills (no local memory), shared memory within budget.SMEM_LIMIT;
  - no HGMMA (wgmma) that takes A from registers inside a pipelined loop (num_stages > 1), and no A
    register rewritten before its wgmma finished (ptxas < 13.3, triton-lang/triton#9433);
  - variants launched with programmatic dependent launch wait (griddepcontrol.wait, ACQBULK in SASS)
    before their data: on every path from the entry, nothing before the wait stores, does an atomic or
    a cp.async, or loads through anything but the plan's metadata pointers, and no program exits
    without having waited (tests/kernels/sass.py follows the SASS's control flow and registers);
  - the split-K shrink decides whether a split takes part in its tile's arrival on nothing read
    through the rank vector (splits reading different ranks must still all arrive);
  - a program's dependent round trips before its first data tile stay within MAX_CHAIN;
  - 16-bit weights at ranks divisible by 16 are loaded as vectors (no LDG.E.U16: a mask along the
    unit-stride rank dimension on the real rank instead of the padded one forces scalar loads);
read from cuobjdump's resource usage and SASS (the tools ship in Triton's NVIDIA backend).
Run in a process WITHOUT TRITON_INTERPRET:
    python -m tests.kernels.aot_compile [--arch 90] [--table FILE.md]
Prints one line per variant (regs / shared memory / spills) and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "compile checks need the real compiler, not the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraplex.kernels import budget, config  # noqa: E402
from loraplex.kernels.embedding import _lora_embedding_kernel  # noqa: E402
from loraplex.kernels.sgmv_expand import _sgmv_expand_kernel  # noqa: E402
from loraplex.kernels.sgmv_fused import _sgmv_fused_kernel  # noqa: E402
from loraplex.kernels.sgmv_shrink import _sgmv_shrink_kernel, split_plan  # noqa: E402
from loraplex.kernels.tiles import tile_bound  # noqa: E402
from loraplex.runtime.plan import SPLIT_COUNTERS, SPLIT_PARTIAL_FLOATS  # noqa: E402
from tests.kernels import sass as sass_facts  # noqa: E402

MODULES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
           "down": (14336, (4096,)), "lm_head": (4096, (128256,))}
TOKENS = (1, 64, 256, 2048)  # one per shape class (decode, small, medium, large)
RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PREC = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
SLICE_ARGS = {"NUM_SLICES", "N0", "N1", "N2", "stride_ym"}  # what the slice count changes
INDEX_PTRS = {"sorted_ids_ptr", "tiles_ptr", "n_tiles_ptr", "ranks_ptr", "count_ptr"}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# dependent global round trips until a program's first data tile (tile record, then rank and token ids
# together, then the tile; split-K reads the real tile count first): more means ptxas moved a metadata
# load below a branch again (bench/results/NOTES.md, issue 19)
MAX_CHAIN = {"sgmv_shrink": 4, "sgmv_expand": 3, "lora_embedding": 3, "sgmv_fused": 4}


def _source(kernel, dtype, ints, consts, fp32_ptrs=(), ids_dtype="i64"):
    """ASTSource as the JIT specializes a launch: pointers 16-byte aligned, ints == 1 folded to
    constants, ints divisible by 16 marked so."""
    sig, cx, attrs, key = {}, {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
            key[name] = ("constexpr", consts[name])
        elif name.endswith("_ptr"):
            ty = ids_dtype if name == "ids_ptr" else "i32" if name in INDEX_PTRS else \
                "fp32" if name in fp32_ptrs else dtype
            sig[name], attrs[(i,)] = "*" + ty, [["tt.divisibility", 16]]
            key[name] = ("*" + ty,)
        elif name == "scale":
            sig[name] = key[name] = "fp32"
        elif ints[name] == 1:
            sig[name], cx[(i,)] = "constexpr", 1
            key[name] = ("int", 1)
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            key[name] = ("int", "D" if ints[name] % 16 == 0 else "")
    return ASTSource(kernel, sig, cx, attrs), (kernel.__name__, key)


class _Sized:
    """Stands in for the plan's split-K scratch in split_plan, which reads only numel()."""

    def __init__(self, n):
        self.n = n

    def numel(self):
        return self.n


def _shrink(T, K, widths, R, dt, c):
    ns = len(widths)
    bound = tile_bound(T, c["BLOCK_M"], 32)
    splits, _ = split_plan(c, T, K, R, ns, bound, _Sized(SPLIT_PARTIAL_FLOATS), _Sized(SPLIT_COUNTERS))
    # max_split is a runtime int (not 1 where it splits); SPLIT, the unrolled bound of the partials' sum,
    # is its power of two, as the launcher passes it
    ints = dict(K=K, R=R, max_split=max(2, splits), stride_xm=K, stride_os=T * R, stride_om=R, stride_ps=T * R,
                stride_pk=ns * T * R)
    return _source(_sgmv_shrink_kernel, dt, ints, dict(
        NUM_SLICES=ns, BLOCK_M=c["BLOCK_M"], BLOCK_R=c["BLOCK_R"], BLOCK_K=c["BLOCK_K"],
        EVEN_K=K % c["BLOCK_K"] == 0, SPLIT=triton.next_power_of_2(splits) if splits > 1 else 1, UPCAST=False,
        DOT_PREC=PREC[dt], USE_PDL=c["PDL"]), fp32_ptrs=("out_ptr", "part_ptr"))


def _expand(T, K, widths, R, dt, c):
    n = list(widths) + [0] * (3 - len(widths))
    ints = dict(N0=n[0], N1=n[1], N2=n[2], R=R, stride_hs=T * R, stride_hm=R, stride_ym=sum(widths))
    return _source(_sgmv_expand_kernel, dt, ints, dict(
        NUM_SLICES=len(widths), BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], ADD=True,
        UPCAST=False, DOT_PREC=PREC[dt], USE_PDL=c["PDL"]), fp32_ptrs=("h_ptr",))


def _fused(T, K, widths, R, dt, c):
    n = list(widths) + [0] * (3 - len(widths))
    ints = dict(K=K, N0=n[0], N1=n[1], N2=n[2], R=R, stride_xm=K, stride_ym=sum(widths))
    return _source(_sgmv_fused_kernel, dt, ints, dict(
        NUM_SLICES=len(widths), BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        BLOCK_R=max(16, triton.next_power_of_2(R)), EVEN_K=K % c["BLOCK_K"] == 0, UPCAST=False,
        DOT_PREC=PREC[dt], USE_PDL=c["PDL"]))


def _embedding(T, K, widths, R, dt, c):
    ints = dict(V=128256, D=widths[0], R=R, stride_ym=widths[0])
    return _source(_lora_embedding_kernel, dt, ints, dict(
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], UPCAST=False, DOT_PREC=PREC[dt],
        USE_PDL=c["PDL"]))


BUILD = {"sgmv_shrink": _shrink, "sgmv_expand": _expand, "sgmv_fused": _fused, "lora_embedding": _embedding}


def gpu_configs():
    """GPU names whose configs serving can pick: any GPU without its own file (heuristic + default.json),
    and each per-GPU file shipped in kernels/configs/."""
    names = ["(heuristic + default.json)"]
    names += [p.stem.replace("_", " ") for p in sorted(config.CONFIG_DIR.glob("*.json")) if p.stem != "default"]
    return names


def variants(arch: int = 90, ranks=RANKS, tokens=TOKENS, full: bool = False):
    """(label, ASTSource, num_warps, num_stages, launch_pdl, vector) for every distinct variant that the
    configs pick for these modules, token counts and ranks (bf16; fp16 at rank 16, fp32 at 16 and 64).

    Not `full`: a variant that differs from one already listed only in its slice count (qkv 3, gate_up 2,
    o/down/lm_head 1: which of up to three base pointers a program uses) is compiled with 3 slices only,
    except in bf16 at rank 16, where every slice count is compiled."""
    found = {}  # key -> [op, dt, mod, T, config, source, vector, ranks]: insertion order is compile order
    for gpu in gpu_configs():
        table = config.load(gpu)
        max_t = int(table.get("fused_max_tokens", config.DEFAULTS["fused_max_tokens"]))
        max_r = int(table.get("fused_max_rank", config.DEFAULTS["fused_max_rank"]))
        for R in ranks:
            dts = ("bf16",) + (("fp16", "fp32") if R == 16 else ("fp32",) if R == 64 else ())
            for dt in dts:
                every_slice_count = full or (R == 16 and dt == "bf16")
                for T in tokens:
                    for mod, (K, widths) in MODULES.items():
                        ops = ["sgmv_shrink", "sgmv_expand"]
                        # the fused path: where add_lora_linear takes it, and at decode sizes in any case (a
                        # tuned table may turn it on: bench/tune.py measures it there)
                        if min(max(max_t, 16) - T, max_r - R) >= 0:
                            ops.append("sgmv_fused")
                        if mod == "o":  # the embedding LoRA of a 4096-wide model
                            ops.append("lora_embedding")
                        for op in ops:
                            c = config.pick(op, gpu, T, K=K, N=sum(widths), R=R, arch=arch, elem=ELEM[dt])
                            src, (kname, spec) = BUILD[op](T, K, widths, R, dt, c)
                            if not every_slice_count:
                                spec = {k: v for k, v in spec.items() if k not in SLICE_ARGS}
                            key = (kname, tuple(sorted(spec.items(), key=repr)), c["num_warps"], c["num_stages"],
                                   bool(c["PDL"]))
                            if key in found:  # the same binary: e.g. ranks 64..512 (BLOCK_R 64, R a runtime int)
                                if R not in found[key][-1]:
                                    found[key][-1].append(R)
                                continue
                            # 16-bit weights at a rank the JIT sees as a multiple of 16 must load them as vectors
                            found[key] = [op, dt, mod, T, c, src, dt != "fp32" and R % 16 == 0, [R]]
    for op, dt, mod, T, c, src, vector, rs in found.values():
        label = f"{op} {dt} {mod} T={T} ranks={','.join(map(str, rs))} " + " ".join(
            f"{k}={v}" for k, v in sorted(c.items()) if k.startswith(("BLOCK", "num_")))
        yield label, src, c["num_warps"], c["num_stages"], bool(c["PDL"]), vector


def _wgmma_reg_a_reuse(sass: str) -> int:
    """HGMMA sites whose register A operand is rewritten before the WARPGROUP.DEPBAR that waits for it."""
    lines, bad = sass.splitlines(), 0
    for i, ln in enumerate(lines):
        m = re.search(r"HGMMA\.\S+ R\d+, R(\d+),", ln)
        if not m:
            continue
        regs = {f"R{int(m.group(1)) + k}" for k in range(4)}
        for ln2 in lines[i + 1:]:
            if "WARPGROUP.DEPBAR" in ln2:
                break
            d = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?[A-Z][\w.]*\s+(R\d+)[ ,;]", ln2)
            if d and d.group(1) in regs:
                bad += 1
                break
    return bad


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack/local bytes (spills), static shared memory, and wgmma facts from cuobjdump."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), static_smem=int(m.group(3)), local=int(m.group(4)),
                hgmma=len(re.findall(r"\bHGMMA\.", sass)),
                hgmma_reg_a=len(re.findall(r"HGMMA\.\S+ R\d+, R\d+,", sass)),
                u16_loads=len(re.findall(r"\bLDG\.E\.U16\b", sass)),
                reg_a_reuse=_wgmma_reg_a_reuse(sass),
                local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)))


def flow_facts(cubin: bytes, src, pdl: bool) -> dict:
    """What sass.py reads off the binary's control flow: pre-wait problems (PDL variants), split-K
    arrivals decided on the rank, and the dependent round trips (chain to the first data tile; with
    PDL counted from the wait; the split-K arrival)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    code = sass_facts.parse(text)
    names = [n for n, ty in src.signature.items() if ty != "constexpr"]
    params = sass_facts.param_names(sass_facts.param_layout(cubin), names)
    meta = sass_facts.METADATA
    split = src.constants.get((src.fn.arg_names.index("SPLIT"),), 1) if "SPLIT" in src.fn.arg_names else 1
    return dict(instr=len(code), pre_wait=sass_facts.pre_wait_problems(code, params, meta) if pdl else [],
                rank_skips=sass_facts.rank_decided_skips(code, params) if split > 1 else [],
                chain=sass_facts.round_trips(code, params, meta)["chain"],
                chain_pdl=sass_facts.round_trips(code, params, meta, pdl=True)["chain"] if pdl else None,
                arrival=sass_facts.arrival_round_trips(code, params))


def check(label, src, warps, stages, pdl, vector, target):
    """(ok, line) for one variant."""
    opts = dict(num_warps=warps, num_stages=stages)
    if pdl:
        opts["launch_pdl"] = True
    try:
        k = triton.compile(src, target=target, options=opts)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is the finding
        return False, f"FAIL sm_{target.arch}  {label}  compile error: {type(e).__name__}: {str(e)[:300]}"
    st = inspect_cubin(k.asm["cubin"])
    flow = flow_facts(k.asm["cubin"], src, pdl)
    smem = int(k.metadata.shared) + st["static_smem"]
    problems = []
    if st["local"] or st["stack"] or st["local_ops"]:
        problems.append(f"spills (stack {st['stack']} B, local {st['local']} B)")
    if smem > budget.SMEM_LIMIT:
        problems.append(f"shared memory {smem} B > {budget.SMEM_LIMIT} B")
    if st["hgmma_reg_a"] and stages > 1:
        problems.append(f"{st['hgmma_reg_a']} wgmma with A in registers in a loop of {stages} stages")
    if st["reg_a_reuse"]:
        problems.append(f"{st['reg_a_reuse']} wgmma A registers rewritten before the wait")
    if vector and st["u16_loads"]:
        problems.append(f"{st['u16_loads']} scalar 16-bit loads (masks along the unit-stride rank break vectors)")
    if pdl and "griddepcontrol.wait" not in k.asm["ptx"]:
        problems.append("launched with PDL but no griddepcontrol.wait before reading the previous kernel's data")
    problems += flow["pre_wait"] + flow["rank_skips"]
    op = label.split()[0]
    if flow["chain"] > MAX_CHAIN[op]:
        problems.append(f"{flow['chain']:.0f} dependent round trips before the first data tile "
                        f"(at most {MAX_CHAIN[op]})")
    facts = (f"regs={st['regs']} smem={smem} spills={st['local'] + st['stack']} hgmma={st['hgmma']} "
             f"hgmma_reg_a={st['hgmma_reg_a']} u16_loads={st['u16_loads']} warps={warps} stages={stages} "
             f"pdl={int(pdl)} instr={flow['instr']} chain={flow['chain']:.0f}"
             + (f" chain_pdl={flow['chain_pdl']:.0f}" if flow["chain_pdl"] is not None else "")
             + (f" arrival={flow['arrival']:.0f}" if flow["arrival"] is not None else ""))
    if problems:
        return False, f"FAIL sm_{target.arch}  {label}  {facts}  " + "; ".join(problems)
    return True, f"ok  sm_{target.arch}  {label}  {facts}"


_WORKER = {}


def _check_index(args):
    """Worker: compile variant i of the (deterministic) list; each worker builds the list once."""
    i, arch, ranks, full = args
    if "v" not in _WORKER:
        _WORKER["v"] = list(variants(arch, ranks, full=full))
    return check(*_WORKER["v"][i], GPUTarget("cuda", arch, 32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
    ap.add_argument("--full", action="store_true", help="every slice count at every rank")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes")
    ap.add_argument("--table", help="also write the lines to this file")
    a = ap.parse_args(argv)
    ranks = tuple(int(r) for r in a.ranks.split(","))
    n = len(list(variants(a.arch, ranks, full=a.full)))
    work = [(i, a.arch, ranks, a.full) for i in range(n)]
    if a.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(a.jobs) as pool:
            results = list(pool.map(_check_index, work))
    else:
        results = [_check_index(w) for w in work]
    lines = [line for _, line in results]
    failed = sum(not ok for ok, _ in results)
    for line in lines:
        print(line)
    print(f"variants: {n}, failed: {failed}, triton {triton.__version__}")
    if a.table:
        Path(a.table).write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
