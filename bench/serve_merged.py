"""Merged mode through `loraplex serve`: one adapter with most of the traffic, merged vs not merged vs the
base model alone. vLLM's own benchmark client, the toy Llama and catalog of bench/serve.py.

Servers (same vLLM flags, --max-lora-rank 32: the catalog's ranks 8-16 plus a merged rank of 16):
  plain    no merged mode
  merged   LORAPLEX_MERGE=<hot adapter>
Scenarios per server, after a warm-up, in this order rotated by one every round:
  base     every request on the base model (plain: "the base model alone"; merged: base requests pay
           the merged adapter's correction)
  hot100   every request on the hot adapter
  hot90    90 % on the hot adapter, 10 % spread over the other adapters
The two servers alternate within a round (the order flips every round) and each round starts fresh
servers; medians and min/max over rounds, with the load average before and after each run (the CPU
machine is shared: a busy one shows in those). Output tokens/s and TPOT p50.

  python bench/serve_merged.py --rounds 1 --requests 16   # a short variant first
  python bench/serve_merged.py                            # bench/results/serve_merged_cpu.json + .png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve  # noqa: E402
import serve_procs as procs  # noqa: E402

SYSTEMS = ("plain", "merged")
SCENARIOS = {"plain": ("base", "hot100", "hot90"), "merged": ("hot100", "hot90", "base")}
METRICS = {"output_tok_s": "output_throughput", "tpot_p50_ms": "median_tpot_ms", "ttft_p50_ms": "median_ttft_ms"}


def server_argv(system, a, model, catalog, hot, port):
    flags = ["--host", "127.0.0.1", "--port", str(port), "--max-loras", str(a.max_loras), "--max-lora-rank", "32",
             "--max-cpu-loras", str(a.max_loras * 2), "--max-num-seqs", str(a.max_num_seqs), "--dtype", a.dtype,
             "--enforce-eager", "--max-model-len", "256", "--seed", "0"]
    env = serve.clean_env()
    env["LORAPLEX_BACKEND"] = os.environ.get("LORAPLEX_BACKEND") or ("triton" if serve.cuda() else "torch")
    if system == "merged":
        env["LORAPLEX_MERGE"] = hot
    return [sys.executable, "-m", "loraplex.vllm_plugin.serve", str(model), "--lora-catalog-type", "storage",
            "--lora-catalog-path", str(catalog), *flags], env


def lora_list(scenario, hot, others):
    """--lora-modules for vLLM's client (random choice from the list): None for the base model."""
    if scenario == "base":
        return None
    if scenario == "hot100":
        return [hot]
    return [hot] * (9 * len(others)) + list(others)  # 90 % hot, the rest uniform over the others


def client_argv(port, model, loras, a, seed, result):
    argv = ["bench", "serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
            "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(a.input_len),
            "--random-output-len", str(a.output_len), "--num-prompts", str(a.requests), "--max-concurrency",
            str(a.concurrency), "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result",
            "--result-filename", str(result)]
    if loras:
        argv += ["--lora-modules", *loras, "--lora-assignment", "random"]
    return argv


def run_server(system, a, model, catalog, hot, others, rnd, work, deadline) -> list[dict]:
    port = procs.free_port()
    argv, env = server_argv(system, a, model, catalog, hot, port)
    srv = procs.Server(argv, env, work / f"r{rnd}-{system}.server.log", port)
    rows = []
    try:
        srv.start(timeout=min(a.startup_timeout, deadline - time.time()))
        srv.complete(str(model))
        srv.complete(hot)
        scs = SCENARIOS[system]
        for sc in scs[rnd % len(scs):] + scs[:rnd % len(scs)]:  # the first run after startup rotates
            result = work / f"r{rnd}-{system}-{sc}.json"
            result.unlink(missing_ok=True)
            (work / "runs.json").write_text(json.dumps([client_argv(port, model, lora_list(sc, hot, others), a,
                                                                     1000 + rnd, result)]))
            before = {"loadavg": os.getloadavg(), "uptime": procs.uptime()}
            rc = procs.run_bounded([sys.executable, serve.CLI, "--runs", str(work / "runs.json")], serve.clean_env(),
                                   work / f"r{rnd}-{system}-{sc}.client.log", deadline - time.time() - 15)
            row = {"round": rnd, "system": system, "scenario": sc, "before": before,
                   "after": {"loadavg": os.getloadavg(), "uptime": procs.uptime()}}
            if result.is_file():
                r = json.loads(result.read_text())
                row.update({k: r.get(v) for k, v in METRICS.items()}, completed=r.get("completed"),
                           failed=r.get("failed"), ok=True)
            else:
                row.update(ok=False, error=f"no result (client rc {rc})")
            rows.append(row)
            print(f"round {rnd} {system:7s} {sc:7s} " + (" ".join(f"{m}={row[m]:.2f}" for m in METRICS)
                  if row["ok"] else row["error"]) + f"  load {before['loadavg'][0]:.2f}", flush=True)
        rows.append({"round": rnd, "system": system, "scenario": "_metrics", "ok": False,
                     "loraplex_metrics": serve.scrape(srv)})
    except Exception as e:  # noqa: BLE001 - one failed server is recorded; the other still runs
        rows.append({"round": rnd, "system": system, "ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]})
    finally:
        srv.stop()
    return rows


def summarize(rows) -> tuple[dict, dict]:
    ok = [r for r in rows if r.get("ok")]
    med: dict = {}
    for r in ok:
        med.setdefault(r["system"], {}).setdefault(r["scenario"], {})
    for s, scs in med.items():
        for sc in scs:
            scs[sc] = {m: serve.spread([r[m] for r in ok if r["system"] == s and r["scenario"] == sc]) for m in METRICS}

    def m(s, sc, k):
        return med.get(s, {}).get(sc, {}).get(k, {}).get("median")

    ratios = {}
    for k in ("output_tok_s", "tpot_p50_ms"):
        base = m("plain", "base", k)
        for sc in ("hot100", "hot90"):
            for s in SYSTEMS:
                v = m(s, sc, k)
                ratios[f"{s}.{sc}.{k}/plain.base"] = v / base if v is not None and base else None
            un, mg = m("plain", sc, k), m("merged", sc, k)
            ratios[f"merged/plain.{sc}.{k}"] = mg / un if mg is not None and un else None
        mb = m("merged", "base", k)
        ratios[f"merged.base.{k}/plain.base"] = mb / base if mb is not None and base else None
    return med, ratios


def plot(result, path, env):
    plt = common.pyplot()
    med = result["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    scs = ("base", "hot100", "hot90")
    for ax, (k, title) in zip(axes, (("output_tok_s", "output tokens/s"), ("tpot_p50_ms", "TPOT p50 (ms)")),
                              strict=True):
        for i, s in enumerate(SYSTEMS):
            cells = [med.get(s, {}).get(sc, {}).get(k) or {} for sc in scs]
            vals = [c.get("median") or 0 for c in cells]
            err = [[v - (c.get("min") or v) for v, c in zip(vals, cells, strict=True)],
                   [(c.get("max") or v) - v for v, c in zip(vals, cells, strict=True)]]
            ax.bar([x + i * 0.4 for x in range(len(scs))], vals, 0.4, yerr=err, capsize=3, label=s)
        ax.set_xticks([x + 0.2 for x in range(len(scs))])
        ax.set_xticklabels(["base model", "100 % hot", "90 % hot"])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    st = result["settings"]
    fig.suptitle(f"merged mode, vLLM {result['versions'].get('vllm')}, toy Llama (hidden {st['hidden']}, "
                 f"{st['layers']} layers), {st['requests']} requests x {st['rounds']} rounds, bars min-max",
                 fontsize=10)
    common.save_png(fig, path, env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--time-budget", type=float, default=2400)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    deadline = min(t0 + a.time_budget, time.time() + common.time_left())
    procs.install_cleanup()
    a.dtype = a.dtype or ("bfloat16" if serve.cuda() else "float32")
    model, catalog = serve.build_data(a)
    names = sorted(p.name for p in catalog.iterdir() if p.is_dir())
    hot, others = names[0], names[1:]
    env = common.env_info(argv if argv is not None else sys.argv)
    work = Path(f"/tmp/loraplex-bench-serve/merged-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    stem = a.out or ("serve_merged_gpu" if serve.cuda() else "serve_merged_cpu")
    settings = {**vars(a), "hot": hot, "logs": str(work), "orders": []}
    rows: list = []

    def save():
        med, ratios = summarize(rows)
        res = {"machine": env, "versions": serve.versions(), "settings": settings, "medians": med, "ratios": ratios,
               "runs": rows, "wall_s": round(time.time() - t0, 1)}
        common.write_json(common.out_dir() / f"{stem}.json", res)
        return res

    for rnd in range(a.rounds):
        order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
        if deadline - time.time() < 120:
            break
        settings["orders"].append(list(order))
        for system in order:
            rows.extend(run_server(system, a, model, catalog, hot, others, rnd, work, deadline))
            save()
    res = save()
    plot(res, common.out_dir() / f"{stem}.png", env)
    table = [[s, sc, *[res["medians"][s][sc][k]["median"] for k in METRICS]]
             for s in res["medians"] for sc in res["medians"][s]]
    common.print_table(["system", "scenario", *METRICS], table)
    print(json.dumps(res["ratios"], indent=1))


if __name__ == "__main__":
    main()
