"""End to end: output tokens/s and TTFT serving a stream of requests with mixed adapters.

A catalog of N adapters in PEFT's file format (written directly, fast) is served over bench/model.py
with continuous batching of decode steps (one CUDA graph per run on a GPU) through the Runtime, GPU
slots and host cache smaller than the working set, for four popularity mixes (identical, uniform,
zipf 1.5, distinct) and four systems:
  base      no LoRA: the ceiling
  loraplex  the Runtime with asynchronous loading: a request whose adapter is not in memory waits
            (its load runs on the loader threads) while the others keep decoding
  sync      the Runtime, loading synchronously: the step that needs the adapter blocks on it
  naive     a per-request loop in PEFT style: each request is run alone with only its adapter,
            applied with plain torch matmuls, adapters loaded on demand into an LRU of as many slots
TTFT is measured from when a request reaches the head of the line (a cache row is free for it) to
its first token, and split by where its adapter was then: cold (storage), host, gpu.
Before timing, loraplex's logits are checked against the naive path (an independent loader and
independent LoRA math) for a few requests.

  python bench/e2e.py          # GPU: 1000 adapters, 'small' model
  python bench/e2e.py --cpu    # CPU: 24 adapters, tiny model, eager (bench/results/e2e_cpu.*)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from model import DecodeGraph, DecoderModel, preset  # noqa: E402

from loraplex import Catalog, Runtime, RuntimeConfig, toy  # noqa: E402
from loraplex.layers import LoraContext, LoraLinear  # noqa: E402

MIXES = ("identical", "uniform", "zipf", "distinct")
SYSTEMS = ("base", "loraplex", "sync", "naive")
# GPU slots = batch rows: a step holds at most `slots` distinct adapters, so fewer slots than rows
# would cap the batch for the mixes with many adapters (vLLM's max_loras does the same); both tiers
# stay far smaller than the catalog, so misses happen in each
GPU_DEFAULTS = dict(preset="small", adapters=1000, slots=64, host=256, requests=512, batch=64, new_tokens=32,
                    prompt=(32, 128), naive_requests=128, dtype="bfloat16")
CPU_DEFAULTS = dict(preset="tiny", adapters=24, slots=8, host=12, requests=32, batch=8, new_tokens=8,
                    prompt=(8, 24), naive_requests=16, dtype="float32")


def write_catalog(root: Path, model, n, rank, seed=0):
    """n adapters of rank `rank` on every linear module, in PEFT's format; reused if already there."""
    want = {"adapters": n, "rank": rank, "config": model.cfg.__dict__, "seed": seed, "version": 1}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return root
    modules = {s.peft_module: (s.in_features, s.out_features) for site in model.lora_sites() for s in site.slices}
    pool = torch.randn(4 << 20, generator=torch.Generator().manual_seed(seed))  # cut, not drawn, per adapter
    cat = root / "adapters"
    cat.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in common.progress(range(n), desc="writing catalog"):
        toy.write_adapter(cat / f"a{i:05d}", modules, r=rank, alpha=2 * rank, seed=seed + i, dtype="float16",
                          b_std=rank ** -0.5, pool=pool)
    manifest.write_text(json.dumps(want))
    print(f"# wrote {n} adapters to {cat} in {time.perf_counter() - t0:.1f} s")
    return root


def make_requests(mix, names, n, prompt, vocab, seed=0):
    rng = random.Random(seed)
    if mix == "identical":
        pick = [names[0]] * n
    elif mix == "uniform":
        pick = [rng.choice(names) for _ in range(n)]
    elif mix == "zipf":  # p(k) ~ 1 / k^1.5 over a random order of the catalog
        order = rng.sample(names, len(names))
        pick = rng.choices(order, [1.0 / (k + 1) ** 1.5 for k in range(len(order))], k=n)
    elif mix == "distinct":
        order = rng.sample(names, len(names))
        pick = [order[i % len(order)] for i in range(n)]
    else:
        raise ValueError(mix)
    return [{"id": i, "name": a, "prompt": [rng.randrange(4, vocab) for _ in range(rng.randint(*prompt))]}
            for i, a in enumerate(pick)]


class NaiveLinear(nn.Module):
    """PEFT-style: one active adapter, y = base(x) + (x A^T) B^T scale per slice, plain matmuls."""

    def __init__(self, base, slices, owner):
        super().__init__()
        self.base, self.mods, self.owner = base, [s.peft_module for s in slices], owner
        self.offs = [0]
        for s in slices:
            self.offs.append(self.offs[-1] + s.out_features)

    def forward(self, x):
        y = self.base(x)
        w = self.owner.current
        if w is None:
            return y
        for i, m in enumerate(self.mods):
            if m in w:
                a, b = w[m]
                y[:, self.offs[i]:self.offs[i + 1]] += (x @ a.t()) @ b.t()
        return y


class Naive:
    def __init__(self, catalog, slots, device, dtype):
        self.catalog, self.slots, self.device, self.dtype = catalog, slots, device, dtype
        self.cache, self.current, self.hits, self.misses, self.evictions = OrderedDict(), None, 0, 0, 0

    def where(self, name):
        return "gpu" if name in self.cache else "cold"

    def use(self, name):
        if name is None:
            self.current = None
            return
        if name in self.cache:
            self.cache.move_to_end(name)
            self.hits += 1
        else:  # synchronous load, as PEFT's load_adapter
            from safetensors.torch import load_file

            self.misses += 1
            entry = self.catalog.get(name)
            spec = entry.spec
            t = load_file(str(Path(entry.path) / "adapter_model.safetensors"))
            w = {}
            for k, a in t.items():
                if k.endswith(".lora_A.weight"):
                    m = k[len("base_model.model."):-len(".lora_A.weight")]
                    b = t[k.replace("lora_A", "lora_B")] * spec.scaling_for(m)
                    w[m] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype))
            self.cache[name] = w
            if len(self.cache) > self.slots:
                self.cache.popitem(last=False)
                self.evictions += 1
        self.current = self.cache[name]


class Engine:
    """Continuous batching over the model's B cache rows: prefill one admitted request at a time,
    then one decode step for every row (empty rows ride along with slot -1)."""

    def __init__(self, model, system, catalog, a):
        self.model, self.system, self.a, self.dev = model, system, a, model.device
        self.B, self.rt, self.naive = model.max_batch, None, None
        if system in ("loraplex", "sync"):
            T = max(self.B, a.prompt[1])
            # the host arena (pinned on a GPU) holds a.host slabs, with 10% room for fragmentation
            numel = sum(a.rank * (s.in_features + s.out_features) for site in model.lora_sites() for s in site.slices)
            host_bytes = int(a.host * numel * model.embed.weight.element_size() * 1.1) + (1 << 20)
            self.rt = Runtime(catalog, RuntimeConfig(max_loras=a.slots, max_rank=a.rank, max_cpu_loras=a.host,
                                                     host_cache_bytes=host_bytes, dtype=a.dtype, max_num_tokens=T,
                                                     device=str(self.dev)))
            self.ctx = LoraContext(T, a.slots, a.rank, self.dev)
            model.set_lora(lambda base, name, slices: LoraLinear(base, self.rt.new_target(name, slices), self.ctx))
        elif system == "naive":
            self.naive = Naive(catalog, a.slots, self.dev, model.dtype)
            model.set_lora(lambda base, name, slices: NaiveLinear(base, slices, self.naive))
        else:
            model.set_lora(None)
        self.graph = None
        if system != "naive":
            if self.rt is not None:  # capture with the widest grid; later plans fill the same buffers
                empty = torch.full((self.B,), -1, dtype=torch.int32, device=self.dev)
                self.ctx.set(self.rt.plan_buffers.build(empty, max_active=a.slots))
            self.graph = DecodeGraph(model, self.B, graph=self.dev.type == "cuda" and not a.no_graph)

    def where(self, name):
        if name is None or self.system == "base":
            return "none"
        if self.naive is not None:
            return self.naive.where(name)
        if self.rt.slot_of(name) is not None:
            return "gpu"
        # asks without starting a load (ensure() would start one and make `sync` partly asynchronous)
        return "host" if self.rt.catalog.get(name).key in self.rt.host else "cold"

    def prefill(self, req, row):
        ids = torch.tensor(req["prompt"], dtype=torch.long, device=self.dev)
        name = None if self.system == "base" else req["name"]
        with torch.no_grad():
            if self.rt is not None:
                with self.rt.step([name], [ids.numel()]) as plan:
                    self.ctx.set(plan)
                    logits = self.model.prefill(ids, row)
                self.ctx.clear()
            else:
                if self.naive is not None:
                    self.naive.use(name)
                logits = self.model.prefill(ids, row)
        return logits[0]

    def decode(self, rows, ids, pos):
        """rows: the request (or None) of each cache row; returns logits [B, V] (rows in order)."""
        with torch.no_grad():
            if self.naive is not None:
                out = torch.zeros(self.B, self.model.cfg.vocab, device=self.dev)
                for r, req in enumerate(rows):
                    if req is not None:
                        self.naive.use(req["name"])
                        out[r] = self.model.decode(ids[r:r + 1], pos[r:r + 1], row0=r)[0].float()
                return out
            if self.rt is None:
                return self.graph.run(ids, pos)
            names = [None if q is None else q["name"] for q in rows]
            with self.rt.step(names, [1] * self.B, static=True) as plan:
                self.ctx.set(plan)
                logits = self.graph.run(ids, pos)
            return logits

    def close(self):
        if self.rt is not None:
            self.rt.close()
        self.model.set_lora(None)


def serve(engine, requests, a, desc):
    """Serve `requests` to completion; returns per-request records and the wall time."""
    B, dev, async_ = engine.B, engine.dev, engine.system == "loraplex"
    rows = [None] * B
    ids = torch.zeros(B, dtype=torch.long, device=dev)
    pos = torch.zeros(B, dtype=torch.long, device=dev)
    queue = list(requests)
    bar = common.progress(total=len(requests), desc=desc, leave=False)
    t0 = time.perf_counter()
    while queue or any(rows):
        free = [r for r in range(B) if rows[r] is None]
        # async: look ahead past requests that wait for a load, but not so far that prefetches evict
        # each other from the host cache
        window = queue[: max(len(free), min(2 * len(free), a.host // 2)) if async_ else len(free)]
        for q in window[: len(free)]:  # reached the head of the line: TTFT starts now
            if "t_head" not in q:
                q["t_head"], q["tier"] = time.perf_counter(), engine.where(q["name"])
        if async_:
            engine.rt.ensure([q["name"] for q in window])  # prefetch the next ones while decoding
        active = {q["name"] for q in rows if q is not None}
        for q in list(window):
            if not free:
                break
            if engine.rt is not None and q["name"] not in active and len(active) >= a.slots:
                continue  # a step cannot hold more distinct adapters than GPU slots
            if async_ and engine.rt.ensure([q["name"]])[q["name"]] != "ready":
                continue  # still loading: let the requests behind it go first
            if "t_head" not in q:
                q["t_head"], q["tier"] = time.perf_counter(), engine.where(q["name"])
            row = free.pop(0)
            first = int(engine.prefill(q, row).argmax())
            q["ttft"] = time.perf_counter() - q["t_head"]
            q["out"] = [first]
            rows[row], ids[row], pos[row] = q, first, len(q["prompt"])
            active.add(q["name"])
            queue.remove(q)
        if not any(rows):
            time.sleep(0.001)  # everything waits for loads
            continue
        nxt = engine.decode(rows, ids, pos).argmax(-1).tolist()
        for r, q in enumerate(rows):
            if q is None:
                continue
            q["out"].append(nxt[r])
            ids[r], pos[r] = nxt[r], pos[r] + 1
            if len(q["out"]) >= a.new_tokens:
                rows[r], ids[r], pos[r] = None, 0, 0
                bar.update(1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bar.close()
    return time.perf_counter() - t0


def check(model, catalog, a, names):
    """loraplex's prefill and batched decode logits vs the naive path's, for a few adapters."""
    reqs = make_requests("distinct", names, min(4, model.max_batch, a.slots), a.prompt, model.cfg.vocab, seed=99)
    got = {}
    for system in ("loraplex", "naive"):
        eng = Engine(model, system, catalog, a)
        rows = [None] * eng.B
        ids = torch.zeros(eng.B, dtype=torch.long, device=model.device)
        pos = torch.zeros_like(ids)
        first = []
        for r, q in enumerate(reqs):
            first.append(eng.prefill(q, r).float())
            rows[r], ids[r], pos[r] = q, int(first[-1].argmax()), len(q["prompt"])
        step = eng.decode(rows, ids, pos)[: len(reqs)].float()
        got[system] = (torch.stack(first), step)
        eng.close()
    base = Engine(model, "base", catalog, a)
    plain = torch.stack([base.prefill(q, r).float() for r, q in enumerate(reqs)])
    base.close()
    (p1, d1), (p2, d2) = got["loraplex"], got["naive"]
    scale = max(p2.abs().max().item(), d2.abs().max().item())
    err = max((p1 - p2).abs().max().item(), (d1 - d2).abs().max().item()) / scale
    moved = (p2 - plain).abs().max().item() / scale
    return err, moved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small CPU run (eager, torch reference ops)")
    for k in ("preset", "dtype"):
        ap.add_argument(f"--{k}")
    for k in ("adapters", "slots", "host", "requests", "batch", "new_tokens", "naive_requests"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"GPU default {GPU_DEFAULTS[k]}, CPU "
                        f"{CPU_DEFAULTS[k]}" + (" (host-cache entries)" if k == "host" else ""))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--catalog-dir", default=None, help="default /tmp/loraplex-e2e-<preset>-<N>-r<rank>")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    for k, v in (CPU_DEFAULTS if dev.type == "cpu" else GPU_DEFAULTS).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if dev.type == "cpu":
        import os

        os.environ.setdefault("LORAPLEX_BACKEND", "torch")  # the Triton interpreter is far too slow here
        torch.set_num_threads(1)  # tiny ops: a second thread only adds waiting (8x on a busy machine)
    env = common.env_info()
    cfg = preset(a.preset)
    model = DecoderModel(cfg, a.batch, a.prompt[1] + a.new_tokens + 1, getattr(torch, a.dtype), dev).eval()
    root = Path(a.catalog_dir or f"/tmp/loraplex-e2e-{a.preset}-{a.adapters}-r{a.rank}")
    catalog = Catalog(write_catalog(root, model, a.adapters, a.rank) / "adapters")
    names = catalog.names()
    err, moved = check(model, catalog, a, names)
    tol = 1e-4 if a.dtype == "float32" else 5e-2  # half: the naive path rounds x@A to bf16, we do not
    print(f"# check vs the naive path: max logit error {err:.1e} of max |logit| (tolerance {tol:.0e}); "
          f"the adapters move logits by {moved:.2f} of it")
    if not (err < tol and moved > 10 * tol):
        raise SystemExit("FAIL: loraplex and the naive path disagree (or the adapters change nothing)")
    runs = []
    result = {"env": env, "config": {k: v for k, v in vars(a).items()}, "model": cfg.__dict__,
              "check": {"max_error": err, "adapter_effect": moved, "tolerance": tol}, "runs": runs,
              "ttft": "from reaching the head of the line (a free cache row) to the first token"}
    if dev.type == "cpu":
        result["note"] = ("CPU run: eager, LoRA on the torch reference ops (per-slot loops with host syncs), "
                          "a busy shared machine; it shows the pipeline works, not how fast it is on a GPU")
    out = Path(a.out) if a.out else common.out_dir()
    stem = "e2e_cpu" if dev.type == "cpu" else f"e2e_{common.gpu_name().replace(' ', '_')}"
    plan = [(mix, system) for mix in a.mixes.split(",") for system in a.systems.split(",")]
    for i, (mix, system) in enumerate(plan):
        if common.time_left() < 30:
            result["truncated"] = f"deadline: {len(plan) - i} of {len(plan)} (mix, system) runs not started"
            print(f"# {result['truncated']}", flush=True)
            break
        n = a.naive_requests if system == "naive" else a.requests
        reqs = make_requests(mix, names, n, a.prompt, cfg.vocab, seed=MIXES.index(mix))
        eng = Engine(model, system, catalog, a)
        wall = serve(eng, reqs, a, f"{mix}/{system}")
        runs.append(summarize(mix, system, reqs, wall, eng))
        eng.close()
        r = runs[-1]
        print(f"{mix:>9} {system:>8}: {r['tokens_per_s']:9.1f} tok/s | TTFT median ms " + ", ".join(
            f"{t} {v['median']:.1f} (n={v['n']})" for t, v in r["ttft_ms_by_tier"].items() if v["n"]), flush=True)
        common.write_json(out / f"{stem}.json", result)  # after every run: a killed stage keeps them
    common.write_json(out / f"{stem}.json", result)
    plot(result, out / f"{stem}.png", env)
    print(f"# wrote {out / stem}.json and .png")
    return result


def summarize(mix, system, reqs, wall, eng):
    tokens = sum(len(q["out"]) for q in reqs)
    tiers = {}
    for t in ("cold", "host", "gpu", "none"):
        tiers[t] = common.percentiles([q["ttft"] * 1e3 for q in reqs if q["tier"] == t])
    rec = {"mix": mix, "system": system, "requests": len(reqs), "tokens": tokens, "seconds": wall,
           "tokens_per_s": tokens / wall, "ttft_ms_by_tier": tiers,
           "ttft_ms": common.percentiles([q["ttft"] * 1e3 for q in reqs]),
           "distinct_adapters": len({q["name"] for q in reqs})}
    if eng.rt is not None:
        s = eng.rt.stats()
        rec["tiers"] = {t: {k: s[t][k] for k in ("hits", "misses", "evictions", "entries")} for t in ("host", "gpu")}
        for t in rec["tiers"].values():
            n = t["hits"] + t["misses"]
            t["hit_rate"] = t["hits"] / n if n else None
        rec["uploaded_bytes"] = eng.rt.metrics.value("loraplex_upload_bytes_total")
        rec["load_ms"] = {p: 1e3 * eng.rt.metrics.value("loraplex_load_seconds_sum", phase=p) / max(
            1.0, eng.rt.metrics.value("loraplex_load_seconds_count", phase=p)) for p in ("read", "pack", "upload")}
    elif eng.naive is not None:
        n = eng.naive
        rec["tiers"] = {"gpu": {"hits": n.hits, "misses": n.misses, "evictions": n.evictions,
                                "hit_rate": n.hits / max(1, n.hits + n.misses)}}
    rec["ttft_s"] = [round(q["ttft"], 6) for q in reqs]
    rec["ttft_tier"] = [q["tier"] for q in reqs]
    return rec


def plot(result, path, env):
    plt = common.pyplot()
    runs = result["runs"]
    mixes = list(dict.fromkeys(r["mix"] for r in runs))
    systems = list(dict.fromkeys(r["system"] for r in runs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = [next((r["tokens_per_s"] for r in runs if r["mix"] == m and r["system"] == s), 0) for m in mixes]
        ax1.bar([x + i * w for x in range(len(mixes))], vals, w, label=s)
    ax1.set_xticks([x + w * (len(systems) - 1) / 2 for x in range(len(mixes))])
    ax1.set_xticklabels(mixes)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput per adapter mix", fontsize=10)
    ax1.legend(fontsize=8)
    groups, labels = [], []
    for s in ("loraplex", "sync", "naive"):
        for t in ("cold", "host", "gpu"):
            xs = [v * 1e3 for r in runs if r["system"] == s
                  for v, tt in zip(r["ttft_s"], r["ttft_tier"], strict=True) if tt == t]
            if xs:
                groups.append(xs)
                labels.append(f"{s}\n{t}")
    if groups:
        ax2.boxplot(groups, whis=(5, 95), showfliers=False)
        ax2.set_xticks(range(1, len(labels) + 1))
        ax2.set_xticklabels(labels, fontsize=7)
        ax2.set_yscale("log")
    ax2.set_ylabel("TTFT ms (box: p25-p75, whiskers p5-p95)")
    ax2.set_title("TTFT by where the adapter was (all mixes)", fontsize=10)
    c = result["config"]
    fig.suptitle(f"{result['model']['hidden']}-hidden x {result['model']['layers']} layers, {c['adapters']} adapters "
                 f"r{c['rank']}, {c['slots']} GPU slots, {c['host']} host entries, batch {c['batch']}"
                 + ("\nCPU, torch reference ops: not representative of GPU speed" if "note" in result else ""),
                 fontsize=10, y=1.04)
    common.save_png(fig, path, env)


if __name__ == "__main__":
    main()
