"""Per-layer LoRA kernels: y += LoRA(x) for one Llama-3-8B layer's modules, ours beside the peers.

Modules qkv (4096 -> 4096+1024+1024), o (4096 -> 4096), gate_up (4096 -> 2x14336), down
(14336 -> 4096); tokens {1,16,64,256,1024,4096} spread uniformly over {1,8,32} distinct adapters
(32 slots); rank {16,64}; bf16. Systems: ours eager and CUDA-graphed (for 1 < T <= 256 also the
path add_lora_linear does not take there, loraplex_fused or loraplex_unfused: the data that sets
fused_max_tokens), vLLM 0.33's and SGLang 0.5.23's Triton LoRA ops (eager and graphed, when fetched
into .peers/ by /work/shared/peers/get_*_ops.sh; on a GPU, or in --smoke under the interpreter) and
a torch loop (kernels/reference.py). Every system
is checked against the fp32 reference before it is timed. Each time is reported as median and
p20/p80 over calls with L2 flushed before each, beside the bandwidth floor: the bytes that must
move (x, the A/B rows of the adapters in use, y read + written) over a measured device copy rate.

  python bench/kernels.py                         # GPU: everything, JSON + PNG in bench/results/
  python bench/kernels.py --layers qkv --tokens 64 --adapters 32 --ranks 16
  TRITON_INTERPRET=1 python bench/kernels.py --smoke   # CPU: tiny shapes, checks only, no timing claims
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from loraplex.kernels import ops, reference  # noqa: E402
from loraplex.runtime.plan import PlanBuffers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}
SMOKE_LAYERS = {"qkv": (64, (64, 16, 16)), "o": (64, (64,)), "gate_up": (64, (96, 96)), "down": (96, (64,))}
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max error / max |delta|
SLOTS = 32


class Case:
    """One module's stacked weights (SLOTS slots, all of rank R), a token mix over D adapters, and
    x / y; y0 keeps the base output so every system starts from the same y."""

    def __init__(self, K, widths, T, D, R, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.K, self.widths, self.T, self.D, self.R, self.dtype = K, widths, T, D, R, dtype
        used = torch.randperm(SLOTS, generator=g)[:D]
        self.tok = used[torch.randperm(T, generator=g) % D].to(torch.int32).to(device)  # uniform over D
        self.ranks = torch.full((SLOTS,), R, dtype=torch.int32, device=device)
        gd = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: 10^8 values at T=4096
        self.A = [(torch.randn(SLOTS, R, K, generator=gd, device=device) / K ** 0.5).to(dtype) for _ in widths]
        self.B = [(torch.randn(SLOTS, n, R, generator=gd, device=device) / R ** 0.5).to(dtype) for n in widths]
        self.x = torch.randn(T, K, generator=gd, device=device).to(dtype)
        self.y0 = torch.randn(T, sum(widths), generator=gd, device=device).to(dtype)
        self.y = self.y0.clone()
        # the grid bound a captured graph must use (all SLOTS slots), as serving does, not this case's D
        self.plan = PlanBuffers(T, SLOTS, device).build(self.tok, self.ranks)
        self.scratch = torch.empty(len(widths), T, R, dtype=torch.float32, device=device)

    def floor_bytes(self) -> int:
        e = torch.tensor([], dtype=self.dtype).element_size()
        N = sum(self.widths)
        return e * (self.T * self.K + self.D * self.R * (self.K * len(self.widths) + N) + 2 * self.T * N)


# ---- systems: each returns fn() doing case.y += LoRA(case.x) in place, metadata built outside fn
def loraplex_fn(c):
    return lambda: ops.add_lora_linear(c.y, c.x, c.A, c.B, c.plan, buffer=c.scratch)


def loraplex_alt_fn(c):
    """The path add_lora_linear does NOT take at this T (fused <-> shrink+expand), with the same
    launchers: the data for choosing fused_max_tokens in kernels/configs/<GPU>.json."""
    from loraplex.kernels.common import plan_tensors
    from loraplex.kernels.sgmv_expand import run as expand
    from loraplex.kernels.sgmv_fused import run as fused
    from loraplex.kernels.sgmv_shrink import run as shrink

    meta = plan_tensors(c.plan, c.ranks)
    ma = c.plan.max_active
    if ops.use_fused(c.T, c.x.device, c.R):
        def fn():
            shrink(c.x, c.A, c.scratch, *meta, c.plan.split_partials, c.plan.split_counters, ma, 1.0)
            expand(c.scratch, c.B, c.y, *meta, ma, True)
        return "loraplex_unfused", fn
    return "loraplex_fused", lambda: fused(c.y, c.x, c.A, c.B, *meta, ma, 1.0)


def torch_loop_fn(c):
    return lambda: reference.add_lora_linear(c.y, c.x, c.A, c.B, c.plan, c.ranks)


def vllm_fn(c, peers):
    sys.path.insert(0, str(peers / "vllm"))
    import vllm.lora.ops.triton_ops as v

    meta = v.LoRAKernelMeta.make(SLOTS, c.T, c.x.device)
    meta.prepare_tensors(c.tok)
    args = meta.meta_args(c.T, True)
    A4, B4 = [a.unsqueeze(1) for a in c.A], [b.unsqueeze(1) for b in c.B]  # vLLM: [S, 1, R, K], [S, 1, N, R]

    def fn():
        v.lora_shrink(c.x, A4, c.scratch, *args, 1.0)
        v.lora_expand(c.scratch, B4, c.y, *args, offset_start=0, add_inputs=True)

    return fn


def sglang_fn(c, peers):
    os.environ["SGLANG_SHIM"] = str(peers / "sglang")
    spec = importlib.util.spec_from_file_location("sglang_peer", _sglang_peer_path(peers))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    apply = peer.make_sglang_lora([a.unsqueeze(1) for a in c.A], [b.unsqueeze(1) for b in c.B], c.tok)
    return lambda: apply(c.x, c.y)


def graphed(fn):
    """Capture fn (already run once, so compiled) in a CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _sglang_peer_path(peers: Path):
    """sglang_peer.py: where GPU_RUN.md copies it (.peers/), else the shared folder."""
    return next((p for p in (peers / "sglang_peer.py", REPO.parent / "shared/peers/sglang_peer.py",
                             Path("/work/shared/peers/sglang_peer.py")) if p.is_file()), None)


def peers_available(peers: Path, smoke: bool = False) -> dict:
    """Peers run on a GPU, and in --smoke under the Triton interpreter (fp16: checks only)."""
    usable = (torch.cuda.is_available() and not smoke) or (smoke and common.interpreting())
    return {"vllm": usable and (peers / "vllm/vllm/lora/ops/triton_ops/__init__.py").is_file(),
            "sglang": usable and (peers / "sglang/sglang/srt/lora/utils.py").is_file()
            and _sglang_peer_path(peers) is not None}


def systems(c, peers, avail, want):
    out = {"loraplex": lambda: loraplex_fn(c)}
    if 1 < c.T <= 256:  # around the fused/unfused switch
        label, fn = loraplex_alt_fn(c)
        out[label] = lambda: fn
    out["torch_loop"] = lambda: torch_loop_fn(c)
    if avail["vllm"]:
        out["vllm"] = lambda: vllm_fn(c, peers)
    if avail["sglang"]:
        out["sglang"] = lambda: sglang_fn(c, peers)
    return {k: v for k, v in out.items() if not want or k in want}


# ---- check, time
def check(c, fn) -> float:
    """Run fn once from y0; return max error / max |delta| against the fp32 reference."""
    c.y.copy_(c.y0)
    fn()
    ref = reference.add_lora_linear(c.y0.clone().float(), c.x, c.A, c.B, c.plan, c.ranks)
    delta = (ref - c.y0.float()).abs().max().item()
    return (c.y.float() - ref).abs().max().item() / max(delta, 1e-12)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = common.percentiles(common.time_fn(lambda: b.copy_(a), iters=20, warmup=3))["median"]
    return 2 * n / (ms * 1e-3)


def time_us(fn, reps, flush):
    """Per-call microseconds with L2 flushed before each call (weights do not stay in L2 across the
    layers of a real step), CUDA events around the call only."""
    fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 for a, b in evs]


def run(args, save=None):
    """The sweep, rank -> tokens -> adapters -> layer (so a sweep cut short by the deadline still
    covers every layer at the smaller sizes). save(env, rows) is called after every case."""
    gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if gpu else "cpu"
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    tokens = args.tokens or ([1, 5, 24] if args.smoke else [1, 16, 64, 256, 1024, 4096])
    adapters = args.adapters or ([1, 3] if args.smoke else [1, 8, 32])
    ranks = args.ranks or ([8] if args.smoke else [16, 64])
    peers = Path(args.peers)
    avail = peers_available(peers, args.smoke)
    env = common.env_info()
    env["peers"] = avail
    bw = copy_bandwidth(device) if gpu else None
    env["copy_bytes_per_s"] = bw
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if gpu else None
    rows, failed = [], []
    cases = [(name, R, D, T) for R in ranks for T in tokens for D in adapters for name in (args.layers or list(layers))
             if D <= T]
    for i, (name, R, D, T) in enumerate(cases):
        if common.time_left() < 15:
            env["truncated"] = f"deadline: {len(cases) - i} of {len(cases)} cases not run"
            print(f"# {env['truncated']}", flush=True)
            break
        K, widths = layers[name]
        c = Case(K, widths, T, D, R, torch.bfloat16 if gpu else torch.float16, device)
        floor = c.floor_bytes() / bw * 1e6 if bw else None
        for sys_name, make in systems(c, peers, avail, args.systems).items():
            try:
                fn = make()
                err = check(c, fn)
            except Exception as e:  # noqa: BLE001 - one system's failure must not end the sweep
                row = dict(layer=name, K=K, widths=list(widths), T=T, adapters=D, rank=R, system=sys_name,
                           check_err=float("nan"), check="FAIL", floor_us=floor, error=f"{type(e).__name__}: {e}")
                failed.append(row)
                rows.append(row)
                print(_line(row), "|", row["error"][:300], flush=True)
                continue
            ok = err <= TOL[c.dtype]
            variants = [(sys_name, fn)]
            if gpu and sys_name != "torch_loop":  # the loop syncs with the host: not capturable
                variants.append((sys_name + "_graph", lambda fn=fn: graphed(fn)))
            for label, f in variants:
                row = dict(layer=name, K=K, widths=list(widths), T=T, adapters=D, rank=R, system=label,
                           check_err=err, check="pass" if ok else "FAIL", floor_us=floor)
                try:
                    if label != sys_name:  # capture, then re-check what the graph computes
                        f = f()
                        row["check_err"] = err2 = check(c, f)
                        row["check"] = "pass" if err2 <= TOL[c.dtype] else "FAIL"
                    if row["check"] == "pass" and gpu:
                        reps = max(5, args.reps // 10) if sys_name == "torch_loop" else args.reps
                        p = common.percentiles(time_us(f, reps, flush))
                        row.update(median_us=p["median"], p20_us=p["p20"], p80_us=p["p80"],
                                   x_floor=p["median"] / floor)
                except Exception as e:  # noqa: BLE001
                    row.update(check="FAIL", error=f"{type(e).__name__}: {e}")
                if row["check"] == "FAIL":
                    failed.append(row)
                rows.append(row)
                print(_line(row) + (f" | {row['error'][:300]}" if "error" in row else ""), flush=True)
        del c
        if save is not None:
            save(env, rows)
    return env, rows, failed


def _line(r):
    t = f"{r['median_us']:9.1f} us  p20 {r['p20_us']:8.1f}  p80 {r['p80_us']:8.1f}  x{r['x_floor']:6.2f} floor" \
        if r.get("median_us") is not None else "(not timed)"
    return (f"{r['layer']:8s} T={r['T']:5d} D={r['adapters']:3d} r={r['rank']:3d} {r['system']:16s} "
            f"check {r['check']} ({r['check_err']:.1e})  {t}")


def plot(rows, path, env):
    """One panel per (layer, adapters) at each rank: time vs tokens per system, floor dashed."""
    plt = common.pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    adapters = sorted({r["adapters"] for r in rows})
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plt.subplots(len(layers), len(adapters) * len(ranks), squeeze=False,
                             figsize=(3.2 * len(adapters) * len(ranks), 2.6 * len(layers)))
    for i, layer in enumerate(layers):
        for j, (R, D) in enumerate((R, D) for R in ranks for D in adapters):
            ax = axes[i][j]
            sel = [r for r in rows if r["layer"] == layer and r["adapters"] == D and r["rank"] == R]
            for s in dict.fromkeys(r["system"] for r in sel):
                pts = [(r["T"], r["median_us"]) for r in sel if r["system"] == s and r.get("median_us")]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=s)
            fl = sorted({(r["T"], r["floor_us"]) for r in sel if r.get("floor_us")})
            if fl:
                ax.plot(*zip(*fl, strict=True), "k--", lw=1, label="bandwidth floor")
            ax.set(xscale="log", yscale="log", title=f"{layer} D={D} r={R}", xlabel="tokens", ylabel="us")
            ax.title.set_fontsize(8)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return common.save_png(fig, path, env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks only, no timing")
    ap.add_argument("--layers", nargs="*", choices=list(LAYERS))
    ap.add_argument("--tokens", nargs="*", type=int)
    ap.add_argument("--adapters", nargs="*", type=int)
    ap.add_argument("--ranks", nargs="*", type=int)
    ap.add_argument("--systems", nargs="*", help="loraplex loraplex_fused loraplex_unfused torch_loop vllm sglang "
                    "(default: all available)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--peers", default=str(REPO / ".peers"), help="dir with vllm/ and sglang/ from get_*_ops.sh")
    ap.add_argument("--out", help="output dir (default: $LORAPLEX_BENCH_OUT or bench/results; smoke: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="kernels_smoke_")) if args.smoke
                                           else common.out_dir())
    gpu = "cpu" if args.smoke or not torch.cuda.is_available() else common.gpu_name()
    stem = "kernels_smoke" if args.smoke else "kernels_" + "".join(ch if ch.isalnum() else "_" for ch in gpu)

    def save(env, rows):  # after every case: a stage killed at its time limit keeps what it measured
        common.write_json(out / f"{stem}.json", {"env": env, "rows": rows})

    env, rows, failed = run(args, save)
    save(env, rows)
    if rows:
        plot(rows, out / f"{stem}.png", env)
    print(f"wrote {out / stem}.json and .png")
    if failed:
        print(f"{len(failed)} system(s) FAILED their check:", *[_line(r) for r in failed], sep="\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
