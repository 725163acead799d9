"""Decode step with LoRA vs without: the fraction of base throughput kept (base time / LoRA time).

Llama-3-8B shape (bench/model.py), LoRA rank 16 on every linear module (fused qkv, o, fused
gate_up, down), 32 GPU slots, tokens {1, 32, 128, 256} spread uniformly over {1, 8, 32} distinct
adapters, each step captured in a CUDA graph. The same run measures vLLM's and SGLang's Triton LoRA
ops in place of ours (fetched into .peers/ by /work/shared/peers/get_*_ops.sh; GPU only) and the
limit set by bytes alone. Every system is checked against an fp32 reference on layer 0's modules
before it is timed; a failed check stops the run.

  python bench/step.py                 # GPU: full table, JSON + PNG in bench/results/
  python bench/step.py --linear-only   # the linear modules only: the setup of TARGETS.md's figures
  python bench/step.py --smoke         # CPU: tiny model, eager, one pass, no timing claims
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from model import DecodeGraph, DecoderModel, preset  # noqa: E402

from loraplex.layers import LoraContext, LoraLinear  # noqa: E402
from loraplex.runtime import LoraTarget, PlanBuffers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max error / max |reference|


# ---- LoRA systems: each wraps a base linear and prepares per-step metadata outside the timed region
class Base:
    name = "base"

    def wrap(self, base, name, slices):
        # one wrapper per site for the whole run: peers convert or index weights once, not per config
        cache = self.__dict__.setdefault("_wrappers", {})
        if name not in cache:
            cache[name] = self.make(base, name, slices)
        return cache[name]

    def make(self, base, name, slices):
        return base

    def prepare(self, tok, D):
        pass


class Loraplex(Base):
    name = "loraplex"

    def __init__(self, targets, max_tokens, slots, rank, device):
        self.targets = targets
        self.ctx = LoraContext(max_tokens, slots, rank, device)
        self.buffers = PlanBuffers(max_tokens, slots, device)

    def make(self, base, name, slices):
        return LoraLinear(base, self.targets[name], self.ctx)

    def prepare(self, tok, D):
        ranks = next(iter(self.targets.values())).ranks
        # graph-safe grid bound (every slot), as serving builds plans for capture; not this case's D
        self.ctx.set(self.buffers.build(tok, ranks))


class LoraplexOverlap(Loraplex):
    """loraplex with each LoRA shrink on a second stream under the base GEMM (layers/overlap.py)."""

    name = "loraplex_overlap"

    def __init__(self, targets, max_tokens, slots, rank, device):
        super().__init__(targets, max_tokens, slots, rank, device)
        self.ctx = LoraContext(max_tokens, slots, rank, device, overlap=True)


class _VllmLinear(nn.Module):
    def __init__(self, base, target, owner):
        super().__init__()
        self.base, self.A, self.B, self.owner = base, target.A, target.B, owner

    def forward(self, x):
        y = self.base(x)
        T, o = x.shape[0], self.owner
        # as vLLM's punica wrapper: an fp32 buffer per call, shrink then expand with add_inputs
        buf = torch.empty(len(self.A), T, self.A[0].shape[1], dtype=torch.float32, device=x.device)
        args = o.meta.meta_args(T, True)
        o.ops.lora_shrink(x, self.A, buf, *args, 1.0)
        o.ops.lora_expand(buf, self.B, y, *args, offset_start=0, add_inputs=True)
        return y


class Vllm(Base):
    """vLLM 0.33's lora_shrink/lora_expand on the very same stacked weights ([S, R, K], [S, N, R];
    scaling already folded into B), metadata from LoRAKernelMeta.prepare_tensors."""

    name = "vllm"

    def __init__(self, targets, max_tokens, slots, device, peers):
        sys.path.insert(0, str(peers / "vllm"))
        import vllm.lora.ops.triton_ops as ops

        self.ops, self.targets = ops, targets
        self.meta = ops.LoRAKernelMeta.make(slots, max_tokens, device)

    def make(self, base, name, slices):
        return _VllmLinear(base, self.targets[name], self)

    def prepare(self, tok, D):
        self.meta.prepare_tensors(tok)


class _SglangLinear(nn.Module):
    def __init__(self, base, target, owner):
        super().__init__()
        self.base, self.owner = base, owner
        A4 = [a.unsqueeze(1) for a in target.A]
        B4 = [b.unsqueeze(1) for b in target.B]
        self.A, self.B, slices = owner.peer.sglang_weights(A4, B4)  # SGLang's pool layout, converted once
        off = [0]
        for n in slices:
            off.append(off[-1] + n)
        self.S, self.max_slice = len(slices), max(slices)
        self.offsets_cpu = torch.tensor(off, dtype=torch.int32)
        self.offsets = self.offsets_cpu.to(self.A.device)

    def forward(self, x):
        y = self.base(x)
        p, bi = self.owner.peer, self.owner.batch_info
        a = p.chunked_sgmv_lora_shrink_forward(x, self.A, bi, num_slices=self.S)
        p.chunked_sgmv_lora_expand_forward(a, self.B, bi, self.offsets, self.max_slice, base_output=y,
                                           slice_offsets_cpu=self.offsets_cpu)
        return y


class Sglang(Base):
    """SGLang 0.5.23's csgmv ops, called as /work/shared/peers/sglang_peer.py explains (imported from
    there, or from .peers/sglang_peer.py where the runner copied it); one LoRABatchInfo per step."""

    name = "sglang"

    def __init__(self, targets, slots, rank, peers):
        os.environ["SGLANG_SHIM"] = str(peers / "sglang")
        path = _sglang_peer(peers)
        spec = importlib.util.spec_from_file_location("sglang_peer", path)
        self.peer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.peer)
        self.targets, self.slots, self.rank = targets, slots, rank
        self.batch_info = None

    def make(self, base, name, slices):
        return _SglangLinear(base, self.targets[name], self)

    def prepare(self, tok, D):
        self.batch_info = self.peer.sglang_batch_info(tok, self.slots, self.rank, 1.0, max_chunk=16,
                                                      device=tok.device)


def _sglang_peer(peers: Path):
    """sglang_peer.py: where gpu_run.sh's instructions copy it, else the shared folder."""
    for p in (peers / "sglang_peer.py", REPO.parent / "shared/peers/sglang_peer.py",
              Path("/work/shared/peers/sglang_peer.py")):
        if p.is_file():
            return p
    return None


def peers_available(peers: Path, smoke: bool = False) -> dict:
    """Peers run on a GPU, and in --smoke under the Triton interpreter (use --dtype float16 there:
    the interpreter's bf16 dot is broken; checks only)."""
    usable = torch.cuda.is_available() or (smoke and common.interpreting())
    return {"vllm": usable and (peers / "vllm/vllm/lora/ops/triton_ops/__init__.py").is_file(),
            "sglang": usable and (peers / "sglang/sglang/srt/lora/utils.py").is_file()
            and _sglang_peer(peers) is not None}


# ---- weights, token mixes, reference check, bytes
def make_targets(model, slots, rank, lm_head, seed=0):
    """One LoraTarget per site, every slot filled with a random rank-`rank` adapter whose delta is
    of the order of the base output (so a wrong LoRA cannot hide under the base in the check)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    targets = {}
    for site in model.lora_sites(lm_head):
        t = LoraTarget(site.name, site.slices, "linear", slots, rank, model.dtype, model.device)
        for a in t.A:
            a.normal_(0.0, a.shape[2] ** -0.5, generator=g)
        for b in t.B:
            b.normal_(0.0, 0.5 * rank ** -0.5, generator=g)
        t.ranks.fill_(rank)
        targets[site.name] = t
    return targets


def token_slots(T, D, slots, device, seed=0):
    """T tokens spread uniformly over D distinct slots (chosen at random among `slots`), shuffled."""
    g = torch.Generator().manual_seed(seed * 1000 + T * 37 + D)
    chosen = torch.randperm(slots, generator=g)[:D]
    tok = chosen[torch.arange(T) % D][torch.randperm(T, generator=g)]
    return tok.to(torch.int32).to(device)


def reference_delta(x, target, tok):
    """fp32 LoRA delta of every token: concat over slices of x A[slot]^T B[slot]^T."""
    out = torch.zeros(x.shape[0], target.out_features, dtype=torch.float32, device=x.device)
    for s in torch.unique(tok).tolist():
        idx = torch.nonzero(tok == s).flatten()
        xs = x[idx].float()
        for a, b, off, sl in zip(target.A, target.B, target.out_offsets, target.slices, strict=True):
            out[idx, off:off + sl.out_features] = (xs @ a[s].float().t()) @ b[s].float().t()
    return out


@torch.no_grad()
def check(model, system, targets, tok):
    """Worst error of `system`'s wrappers on layer 0 (and lm_head if wrapped) vs the fp32 reference."""
    worst = 0.0
    g = torch.Generator(device=model.device).manual_seed(1)
    for name, mod in model.lora_modules.items():
        if not (name.startswith("model.layers.0.") or name == "lm_head"):
            continue
        t = targets[name]
        x = torch.randn(tok.numel(), t.slices[0].in_features, generator=g, device=model.device).to(model.dtype)
        y = mod(x).float()
        ref = mod.base(x).float() + reference_delta(x, t, tok)
        worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
    return worst


def bytes_limit(cfg, T, D, rank, context, attention, lm_head, dtype_bytes=2):
    """Kept fraction if a step cost only its bytes: base weights (+ KV cache read) vs the D adapters."""
    base = cfg.param_bytes(dtype_bytes) - cfg.vocab * cfg.hidden * dtype_bytes  # embedding: T rows only
    if attention:
        base += 2 * cfg.layers * T * (context + 1) * cfg.kv_heads * cfg.head_dim * dtype_bytes
    kv = cfg.kv_heads * cfg.head_dim
    # A [r, in] per slice + B [out, r]: qkv (3 slices), o, gate_up (2 slices), down
    per_layer = rank * ((3 * cfg.hidden + cfg.hidden + 2 * kv) + 2 * cfg.hidden
                        + (2 * cfg.hidden + 2 * cfg.intermediate) + (cfg.intermediate + cfg.hidden))
    adapter = dtype_bytes * (cfg.layers * per_layer + (rank * (cfg.hidden + cfg.vocab) if lm_head else 0))
    return base / (base + min(D, T) * adapter), adapter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, eager, one pass, no timing claims")
    ap.add_argument("--preset", default=None, help="model shape (default llama3-8b; tiny with --smoke)")
    ap.add_argument("--tokens", default="1,32,128,256")
    ap.add_argument("--adapters", default="1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--context", type=int, default=128, help="tokens already cached per request")
    ap.add_argument("--linear-only", action="store_true", help="no attention: the TARGETS.md peer setup")
    ap.add_argument("--lm-head", action="store_true", help="LoRA on lm_head too")
    ap.add_argument("--systems", default="loraplex,loraplex_overlap,vllm,sglang")
    ap.add_argument("--peers", default=str(REPO / ".peers"))
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --smoke writes only if given)")
    args = ap.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        ap.error("timing needs a GPU; on the CPU use --smoke")
    cfg = preset(args.preset or ("tiny" if args.smoke else "llama3-8b"))
    dtype = getattr(torch, args.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    tokens = [int(t) for t in args.tokens.split(",")]
    adapters = [int(d) for d in args.adapters.split(",")]
    iters, graph = (1, False) if args.smoke else (args.iters, not args.no_graph)
    env = common.env_info()
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {cfg} | {dtype} | "
          f"rank {args.rank} | slots {args.slots} | {'linear only' if args.linear_only else f'context {args.context}'}"
          f" | {'CUDA graphs' if graph else 'eager'}", flush=True)

    torch.manual_seed(0)
    max_seq = -(-(args.context + 1) // 64) * 64
    model = DecoderModel(cfg, max(tokens), max_seq, dtype, dev, attention=not args.linear_only).eval()
    targets = make_targets(model, args.slots, args.rank, args.lm_head)
    peers = Path(args.peers)
    avail = peers_available(peers, args.smoke)
    systems, errors = [Base()], {}
    for name in args.systems.split(","):
        try:
            if name in ("loraplex", "loraplex_overlap"):
                kind = Loraplex if name == "loraplex" else LoraplexOverlap
                systems.append(kind(targets, max(tokens), args.slots, args.rank, dev))
            elif name in ("vllm", "sglang") and not avail[name]:
                print(f"# {name}: skipped ({'no GPU' if dev.type != 'cuda' else f'not fetched into {peers}'})")
            elif name == "vllm":
                systems.append(Vllm(targets, max(tokens), args.slots, dev, peers))
            elif name == "sglang":
                systems.append(Sglang(targets, args.slots, args.rank, peers))
        except Exception as e:  # noqa: BLE001 - a peer that does not import must not cost our figure
            errors[f"{name} setup"] = f"{type(e).__name__}: {e}"
            print(f"# {name}: FAILED to set up: {errors[f'{name} setup']}", flush=True)
    names = [s.name for s in systems[1:]]
    out = None
    if args.out or not args.smoke:
        out = Path(args.out) if args.out else common.out_dir()
        tag = "smoke" if args.smoke else common.gpu_name().replace(" ", "_")
        stem = f"step_{tag}{'_linear' if args.linear_only else ''}"
    rows, checks = [], {}
    result = {"env": env, "config": {**cfg.__dict__, "dtype": str(dtype), "rank": args.rank, "slots": args.slots,
                                     "context": None if args.linear_only else args.context,
                                     "linear_only": args.linear_only, "lm_head": args.lm_head, "graph": graph,
                                     "iters": iters, "smoke": args.smoke,
                                     "adapter_bytes": bytes_limit(cfg, 1, 1, args.rank, args.context,
                                                                  not args.linear_only, args.lm_head)[1]},
              "systems": names, "checks": checks, "errors": errors, "rows": rows,
              "figure": "kept = base median step time / LoRA median step time (higher is better, 1.0 = free)"}

    def timed(T, ids, pos):
        step = DecodeGraph(model, T, graph=graph)
        step.ids.copy_(ids)
        step.pos.copy_(pos)
        ms = common.percentiles(common.time_fn(step.run, iters=iters, warmup=0 if args.smoke else 10, device=dev))
        del step
        return ms

    print(f"{'tokens':>6} {'adapters':>8} {'base ms':>9} " + " ".join(f"{n:>9}" for n in names)
          + f" {'bytes limit':>11}   (columns: fraction of base throughput kept)", flush=True)
    configs = [(T, D) for T in tokens for D in [1] + [d for d in adapters if 1 < d <= T]]
    base_ms = {}
    for i, (T, D) in enumerate(configs):
        if common.time_left() < 20:
            result["truncated"] = f"deadline: {len(configs) - i} of {len(configs)} (tokens, adapters) not run"
            print(f"# {result['truncated']}", flush=True)
            break
        gen = torch.Generator(device=dev).manual_seed(T)
        ids = torch.randint(0, cfg.vocab, (T,), device=dev, generator=gen)
        pos = torch.full((T,), args.context, dtype=torch.long, device=dev)
        if T not in base_ms:
            model.set_lora(None)
            base_ms[T] = timed(T, ids, pos)
        tok = token_slots(T, D, args.slots, dev)
        limit, _ = bytes_limit(cfg, T, D, args.rank, args.context, not args.linear_only, args.lm_head)
        row = {"tokens": T, "adapters": D, "bytes_limit": limit, "base": {"ms": base_ms[T]}}
        for sysm in systems[1:]:
            key = f"{sysm.name} T={T} D={D}"
            try:
                model.set_lora(sysm.wrap, lm_head=args.lm_head)
                sysm.prepare(tok, D)
                err = check(model, sysm, targets, tok)
                checks[key] = err
                if not err < TOL[dtype]:  # recorded and not timed; the other systems still run
                    errors[key] = f"check: error {err:.2e} >= {TOL[dtype]:.0e}"
                    print(f"# FAIL: {key}: {errors[key]}", flush=True)
                    continue
                ms = timed(T, ids, pos)
                row[sysm.name] = {"ms": ms, "kept": base_ms[T]["median"] / ms["median"]}
            except Exception as e:  # noqa: BLE001 - recorded in the JSON; the sweep goes on
                errors[key] = f"{type(e).__name__}: {e}"
                print(f"# FAIL: {key}: {errors[key][:400]}", flush=True)
        rows.append(row)
        print(f"{T:>6} {D:>8} {base_ms[T]['median']:>9.3f} " + " ".join(
            f"{row[n]['kept']:>9.3f}" if n in row else f"{'FAIL':>9}" for n in names) + f" {limit:>11.3f}", flush=True)
        if out is not None:  # after every row: a stage killed at its time limit keeps what it measured
            common.write_json(out / f"{stem}.json", result)
    print(f"# reference check (max error / max |ref|, tolerance {TOL[dtype]:.0e}): worst "
          + ", ".join(f"{n} {max((v for k, v in checks.items() if k.startswith(n + ' ')), default=float('nan')):.1e}"
                      for n in names))
    if args.smoke:
        print("# --smoke: one eager pass on the CPU; the numbers above are not timing results")
    if out is not None:
        common.write_json(out / f"{stem}.json", result)
        plot(result, out / f"{stem}.png", env)
        print(f"# wrote {out / stem}.json and .png")
    if errors:
        print(f"# {len(errors)} failure(s): " + "; ".join(f"{k}: {v[:200]}" for k, v in errors.items()))
        raise SystemExit(1)
    return result


def plot(result, path, env):
    plt = common.pyplot()
    rows, names = result["rows"], result["systems"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (len(names) + 1)
    xs = range(len(rows))
    for i, n in enumerate(names):
        ax.bar([x + i * width for x in xs], [r[n]["kept"] if n in r else 0.0 for r in rows], width, label=n)
    ax.bar([x + len(names) * width for x in xs], [r["bytes_limit"] for r in rows], width, label="bytes limit",
           color="lightgray", edgecolor="gray")
    ax.set_xticks([x + width * len(names) / 2 for x in xs])
    ax.set_xticklabels([f"T={r['tokens']}\nD={r['adapters']}" for r in rows], fontsize=8)
    ax.set_ylabel("fraction of base throughput kept")
    ax.set_ylim(0, 1.1)
    ax.axhline(1.0, color="black", lw=0.5)
    c = result["config"]
    where = "linear only" if c["linear_only"] else f"context {c['context']}"
    ax.set_title(f"decode step with LoRA r{c['rank']} on every linear module vs base ({where}, "
                 f"{'CUDA graphs' if c['graph'] else 'eager'})", fontsize=10)
    ax.legend(fontsize=8, ncol=len(names) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    common.save_png(fig, path, env)


if __name__ == "__main__":
    main()
