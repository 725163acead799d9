"""Offline tuner: loraplex's kernel configs for one GPU, written as loraplex/kernels/configs/<GPU>.json.

What it times is what serving runs: one decode step's LoRA at Llama-3-8B shapes (32 layers x qkv / o /
gate_up / down through ops.add_lora_linear, rank R on 32 slots), captured in a CUDA graph, tokens
spread evenly over 1 / 8 / 32 adapters, for a token count per shape class (decode 1 and 16, small 64,
medium 256, large 2048) and ranks 16 and 64. A coordinate search, one knob at a time in the order of
expected value (decode first: split-K and tiles of the shrink, tiles of the expand, then the fused
kernel's tiles; the other classes; where the fused path stops; PDL), keeps a value only if it is
>= 2 % faster over the knob's cases; every new
config is checked against the fp32 reference before it is timed. The table is rewritten after every
knob, so a run stopped by its deadline (LORAPLEX_DEADLINE, or --budget-s, default 5 min) keeps what it
found; knobs it never reached keep the heuristic. Kernels compile in --jobs worker processes first
(each runs the very launches the search will make, filling the Triton cache), then the search loads
them from the cache.

  python bench/tune.py                           # GPU: writes kernels/configs/<GPU>.json + a log in results/
  TRITON_INTERPRET=1 python bench/tune.py --smoke  # CPU: tiny shapes, interpreter, checks the code path only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from loraplex.kernels import config, ops, reference  # noqa: E402
from loraplex.runtime.plan import PlanBuffers  # noqa: E402

MODULES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
           "down": (14336, (4096,))}
SMOKE_MODULES = {"qkv": (64, (64, 16, 16)), "down": (96, (64,))}
CLASS_TOKENS = {"decode": (1, 16), "small": (64,), "medium": (256,), "large": (2048,)}
SMOKE_CLASS_TOKENS = {"decode": (1, 5), "small": (20,)}
# the kernel tests' per-element tolerance (tests/kernels/cases.py): |got - ref| <= TOL * (1 + |ref|)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
KEEP = 0.98  # a new value must take <= 98 % of the current time: noise does not move the table


def knobs(R, classes, smoke):
    """(op, table key, field, values, token counts, forced) in the order the search visits them: the
    decode path in force first (split-K shrink + expand; then the fused kernel, measured with
    fused_max_tokens forced on), the other classes, where the fused path stops, PDL. op None: a
    top-level key; op "*": the field in every op's "default"."""
    two = (lambda v: v[:2]) if smoke else (lambda v: v)
    rk = f"r{config.pow2(R)}"
    dec = classes["decode"]
    fused = {"fused_max_tokens": max(dec)}
    out = []
    for cls in ("decode", "small", "medium", "large"):
        ts = classes.get(cls, ())
        out += [("sgmv_shrink", f"{cls}@{rk}", "SPLIT_K", two([16, 8, 4, 1]), ts, {}),
                ("sgmv_shrink", f"{cls}@{rk}", "BLOCK_K", two([128, 64, 256, 512]), ts, {}),
                ("sgmv_shrink", f"{cls}@{rk}", "num_stages", two([3, 4, 2]), ts, {}),
                ("sgmv_expand", f"{cls}@{rk}", "BLOCK_N", two([128, 64, 256]), ts, {}),
                ("sgmv_expand", f"{cls}@{rk}", "BLOCK_M", two([32, 16, 64]), ts, {})]
        if cls == "decode":
            out += [("sgmv_fused", f"decode@{rk}", "BLOCK_K", two([512, 256, 128]), dec, fused),
                    ("sgmv_fused", f"decode@{rk}", "BLOCK_N", two([128, 64]), dec, fused),
                    ("sgmv_fused", f"decode@{rk}", "TARGET_PROGRAMS", two([132, 264, 66]), dec, fused),
                    ("sgmv_fused", f"decode@{rk}", "num_stages", two([3, 4, 2]), dec, fused)]
    out.append((None, None, "fused_max_tokens", two([0, 16, 64]), dec + classes.get("small", ()), {}))
    out.append(("*", "default", "PDL", [True, False], dec + classes.get("small", ()), {}))
    return out


def _set(table, op, key, field, value):
    t = copy.deepcopy(table)
    if op is None:
        t[field] = value
    for o in (config.OPS if op == "*" else [op] if op else []):
        t.setdefault(o, {}).setdefault(key, {})[field] = value
    return t


@contextlib.contextmanager
def using(table, name):
    """Launchers pick configs from `table` as if it were configs/<name>.json (on CPU tensors too)."""
    load, gpu = config.load, config.gpu_name
    config.load = lambda n: table
    config.gpu_name = lambda device: name
    try:
        yield
    finally:
        config.load, config.gpu_name = load, gpu


class Bench:
    """Stacked weights of `layers` layers at rank R (every slot full rank), and per (T, D) the inputs,
    a graph-safe plan and the fp32 scratch; step(T, D) runs the LoRA of one decode step."""

    def __init__(self, modules, R, layers, slots, device, dtype, seed=0):
        self.modules, self.R, self.slots, self.device, self.dtype = modules, R, slots, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        self.layers = [{m: ([w(slots, R, K, scale=K ** -0.5) for _ in ns],
                            [w(slots, n, R, scale=R ** -0.5) for n in ns])
                        for m, (K, ns) in modules.items()} for _ in range(layers)]
        self.ranks = torch.full((slots,), R, dtype=torch.int32, device=device)
        self._cases = {}

    def case(self, T, D):
        if (T, D) not in self._cases:
            g = torch.Generator().manual_seed(T * 100 + D)
            tok = torch.randperm(self.slots, generator=g)[:D][torch.arange(T) % D].to(torch.int32).to(self.device)
            plan = PlanBuffers(T, self.slots, self.device).build(tok, self.ranks)  # bound: every slot
            io = {m: (torch.randn(T, K, generator=g).to(self.dtype).to(self.device),
                      torch.randn(T, sum(ns), generator=g).to(self.dtype).to(self.device))
                  for m, (K, ns) in self.modules.items()}
            scratch = torch.zeros(3, T, self.R, device=self.device)
            self._cases[(T, D)] = (plan, io, scratch)
        return self._cases[(T, D)]

    def step(self, T, D):
        plan, io, scratch = self.case(T, D)
        for layer in self.layers:
            for m, (A, B) in layer.items():
                x, y = io[m]
                ops.add_lora_linear(y, x, A, B, plan, self.ranks, scratch)

    def check(self, T, D) -> float:
        """Layer 0's modules against the fp32 reference: the largest |got - ref| / (1 + |ref|)."""
        plan, io, scratch = self.case(T, D)
        worst = 0.0
        for m, (A, B) in self.layers[0].items():
            x, y = io[m]
            y0 = y.clone()
            got = ops.add_lora_linear(y0.clone(), x, A, B, plan, self.ranks, scratch).float()
            ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, self.ranks).float()
            worst = max(worst, float(((got - ref).abs() / (1 + ref.abs())).max()))
        return worst

    def time_ms(self, T, D, reps) -> float:
        """Median ms of one step: CUDA-graph replays on a GPU, eager perf_counter on the CPU."""
        self.step(T, D)  # compile (or load from the cache) outside the capture
        if torch.device(self.device).type != "cuda":
            return common.percentiles(common.time_fn(lambda: self.step(T, D), iters=reps, warmup=0))["median"]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.step(T, D)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(T, D)
        ms = common.percentiles(common.time_fn(graph.replay, iters=reps, warmup=2))["median"]
        del graph
        return ms


def _cases(ts, adapters):
    return [(T, D) for T in ts for D in adapters if D <= T]


def search(args, name, deadline, log):
    """The coordinate search over every rank; returns the table (also written after every knob)."""
    smoke = args.smoke
    modules = SMOKE_MODULES if smoke else MODULES
    classes = {c: t for c, t in (SMOKE_CLASS_TOKENS if smoke else CLASS_TOKENS).items() if c in args.classes}
    classes.setdefault("decode", (1,))
    dtype = getattr(torch, args.dtype)
    table = {}
    if Path(args.out).is_file() and args.resume:
        table = {k: v for k, v in json.loads(Path(args.out).read_text()).items() if not k.startswith("_")}
    for R in args.ranks:
        bench = Bench(modules, R, 1 if smoke else args.layers, args.slots, args.device, dtype)
        timed = {}  # (frozen effective configs, T, D) -> ms: a candidate equal to one timed before is not re-run
        for op, key, field, values, ts, forced in knobs(R, classes, smoke):
            cases = _cases(ts, args.adapters)
            if not cases:
                continue
            with using(dict(table, **forced), name):  # the value in force first: what the others must beat
                cur = _current(op, key, field, cases[0][0], modules, R, dtype)
            values = [cur] + [v for v in values if v != cur]
            results = []
            for v in values:
                if time.time() > deadline:
                    log.append(dict(rank=R, op=op, key=key, field=field, stopped="deadline"))
                    return table
                cand = _set(table, op, key, field, v)
                with using(dict(cand, **forced), name):
                    eff = _effective(modules, cases, R, dtype)
                    total, err = 0.0, 0.0
                    for T, D in cases:
                        k = (eff[(T, D)], T, D)
                        if k not in timed:
                            err = max(err, bench.check(T, D))
                            if err > TOL[dtype]:
                                break
                            timed[k] = bench.time_ms(T, D, args.reps)
                        total += timed[k]
                ok = err <= TOL[dtype]
                results.append((total if ok else float("inf"), v))
                log.append(dict(rank=R, op=op, key=key, field=field, value=v, ms=total if ok else None,
                                check=err, cases=cases))
            base = results[0][0]  # values[0] is the current choice (the heuristic's, or the last kept)
            best_t, best_v = min(results, key=lambda r: r[0])
            if best_t <= KEEP * base and best_v != values[0]:
                table = _set(table, op, key, field, best_v)
            print(f"r{R} {op or ''} {key or ''} {field}: " + ", ".join(f"{v}={t:.3f}" for t, v in results)
                  + f" ms -> {best_v if best_t <= KEEP * base else values[0]}", flush=True)
            write_table(args.out, table, name, log)
    return table


def _current(op, key, field, T, modules, R, dtype):
    """The value `field` has now for op at T tokens (the table's, else the heuristic's, as fitted)."""
    if op is None:
        return config.fused_max_tokens("cuda") if field == "fused_max_tokens" else config.load("")[field]
    K, ns = next(iter(modules.values()))
    o = "sgmv_shrink" if op == "*" else op
    elem = torch.empty((), dtype=dtype).element_size()
    return config.pick(o, "tuning", T, K=K, N=sum(ns), R=R, elem=elem).get(field)


def _effective(modules, cases, R, dtype):
    """What every launch of a case will run with: the fitted configs of each op for each module."""
    elem = torch.empty((), dtype=dtype).element_size()
    out = {}
    for T, D in cases:
        picks = [json.dumps(config.pick(op, "tuning", T, K=K, N=sum(ns), R=R, elem=elem), sort_keys=True)
                 for op in config.OPS[:3] for K, ns in modules.values()]
        out[(T, D)] = (tuple(picks), config.fused_max_tokens("cuda"), config.fused_max_rank("cuda"))
    return out


def write_table(path, table, name, log):
    """The config file (also copied into the results folder, which the GPU run brings back) and the log."""
    data = dict(sorted(table.items()), _tuned=dict(gpu=name, env=common.env_info()))
    common.write_json(path, data)
    if Path(path).parent.resolve() != common.out_dir().resolve():
        common.write_json(common.out_dir() / Path(path).name, data)
    common.write_json(common.out_dir() / f"tune_{config._file_key(name)}.json",
                      dict(table=table, log=log, env=common.env_info()))


def prewarm(args, deadline):
    """Compile the first pass's candidates in worker processes (each runs the launches once at D=1;
    the Triton cache is shared through TRITON_CACHE_DIR); the search then loads them."""
    if args.jobs < 2 or args.smoke or not torch.cuda.is_available():
        return
    import subprocess

    cmd = [sys.executable, __file__, "--warm-worker", "--dtype", args.dtype, "--slots", "2",
           "--ranks", ",".join(map(str, args.ranks)), "--classes", ",".join(args.classes)]
    procs = [subprocess.Popen(cmd + ["--worker-index", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
    stop = time.time() + max(1.0, min(args.warm_s, 0.5 * (deadline - time.time())))  # half the time at most
    for p in procs:
        try:
            p.wait(timeout=max(0.1, stop - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def warm_worker(args):
    """One share of the first-pass candidates, each run once (compiling it) on a 1-layer bench."""
    i, n = map(int, args.worker_index.split("/"))
    dtype = getattr(torch, args.dtype)
    classes = {c: t for c, t in CLASS_TOKENS.items() if c in args.classes}
    classes.setdefault("decode", (1,))
    jobs = []
    for R in args.ranks:
        for op, key, field, values, ts, forced in knobs(R, classes, False):
            jobs += [(R, dict(_set({}, op, key, field, v), **forced), T) for v in values for T in ts]
    for R, table, T in jobs[i::n]:
        bench = Bench(MODULES, R, 1, 2, "cuda", dtype)
        with using(table, "tuning"), contextlib.suppress(Exception):
            bench.step(T, 1)
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpreter, no timing claims")
    ap.add_argument("--ranks", default=None, help="default 16,64 (smoke: 16)")
    ap.add_argument("--adapters", default=None, help="default 1,8,32 (smoke: 1,3)")
    ap.add_argument("--classes", default="decode,small,medium,large")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--slots", type=int, default=None, help="default 32 (smoke: 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=None, help="graph replays per case (default 10; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop after this long (or LORAPLEX_DEADLINE)")
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--warm-s", type=float, default=90.0, help="most seconds spent compiling in parallel first")
    ap.add_argument("--out", default=None, help="default kernels/configs/<GPU>.json (smoke: results folder)")
    ap.add_argument("--resume", action="store_true", help="start from the table already in --out")
    ap.add_argument("--warm-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", default="0/1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in (args.ranks or ("16" if args.smoke else "16,64")).split(",")]
    args.adapters = [int(d) for d in (args.adapters or ("1,3" if args.smoke else "1,8,32")).split(",")]
    args.classes = args.classes.split(",")
    args.slots = args.slots or (4 if args.smoke else 32)
    args.reps = args.reps or (1 if args.smoke else 10)
    if args.warm_worker:
        return warm_worker(args)
    if args.smoke and not common.interpreting():
        raise SystemExit("--smoke runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU (or --smoke on the CPU)")
    os.environ["LORAPLEX_BACKEND"] = "triton"
    args.device = "cpu" if args.smoke else "cuda"
    name = "smoke" if args.smoke else common.gpu_name()
    args.out = args.out or str(common.out_dir() / "tune_smoke_config.json" if args.smoke
                               else config.CONFIG_DIR / f"{config._file_key(name)}.json")
    deadline = min(time.time() + args.budget_s, time.time() + common.time_left())
    print(f"# tune {name}: ranks {args.ranks}, adapters {args.adapters}, classes {args.classes}, "
          f"deadline in {deadline - time.time():.0f} s -> {args.out}", flush=True)
    t0 = time.time()
    prewarm(args, deadline)
    print(f"# compiled in {args.jobs} processes: {time.time() - t0:.0f} s", flush=True)
    log = []
    table = search(args, name, deadline, log)
    write_table(args.out, table, name, log)
    print(f"# wrote {args.out} ({time.time() - t0:.0f} s): {json.dumps(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
