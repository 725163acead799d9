"""Merged mode A/B inside one vllm.LLM (this process): the same engine switched between "hot adapter merged"
and "nothing merged" every round, each state serving a batch of base-model requests and a batch of the
hot adapter's. One process, one thread binding, interleaved rounds: on a shared CPU machine this is
fairer than separate servers (bench/serve_merged.py), though it measures offline batches, not a server.

  python bench/merged_inproc.py [--rounds 5] [--requests 16] [--tokens 32]
  -> bench/results/merged_inproc_cpu.json + .png (output tokens/s per state and request kind)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve  # noqa: E402

CASES = (("merged", "hot"), ("merged", "base"), ("unmerged", "base"), ("unmerged", "hot"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args(argv)
    model, catalog = serve.build_data(a)
    hot = sorted(p.name for p in catalog.iterdir() if p.is_dir())[0]
    os.environ.update(LORAPLEX_CATALOG=str(catalog), LORAPLEX_BACKEND=os.environ.get("LORAPLEX_BACKEND", "torch"),
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", LORAPLEX_MERGE=hot)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from loraplex import vllm_plugin

    vllm_plugin.register()
    from vllm import LLM, SamplingParams

    from loraplex.vllm_plugin import lora_request, merge_adapter

    llm = LLM(model=str(model), enable_lora=True, max_lora_rank=32, max_loras=4, dtype="float32", enforce_eager=True,
              seed=0, max_num_seqs=a.requests, max_model_len=256)
    sp = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    runs = []
    for rnd in range(a.rounds):
        for state in (("merged", "unmerged") if rnd % 2 == 0 else ("unmerged", "merged")):
            merge_adapter(llm, hot if state == "merged" else None)
            for kind in ("hot", "base"):
                prompts = [{"prompt_token_ids": [1, rnd, len(runs)] + list(range(5 + i, 69 + i))}
                           for i in range(a.requests)]  # distinct prompts: no prefix-cache hits across runs
                req = lora_request(hot) if kind == "hot" else None
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                llm.generate(prompts, sp, lora_request=[req] * a.requests, use_tqdm=False)
                tok_s = a.requests * a.tokens / (time.perf_counter() - t0)
                runs.append(dict(round=rnd, state=state, kind=kind, output_tok_s=tok_s, loadavg=load))
                print(f"round {rnd} {state:8s} {kind:4s} {tok_s:7.0f} tok/s  load {load:.2f}", flush=True)
    med = {f"{s}.{k}": statistics.median(r["output_tok_s"] for r in runs if (r["state"], r["kind"]) == (s, k))
           for s, k in CASES}
    ratios = {"merged.hot/unmerged.base": med["merged.hot"] / med["unmerged.base"],
              "merged.hot/unmerged.hot": med["merged.hot"] / med["unmerged.hot"],
              "merged.base/unmerged.hot": med["merged.base"] / med["unmerged.hot"]}
    env = common.env_info(argv if argv is not None else sys.argv)
    out = common.out_dir()
    common.write_json(out / "merged_inproc_cpu.json", dict(machine=env, versions=serve.versions(),
                      settings={**vars(a), "hot": hot}, medians=med, ratios=ratios, runs=runs))
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{s}\n{k}" for s, k in CASES]
    ax.bar(labels, [med[f"{s}.{k}"] for s, k in CASES])
    for i, (s, k) in enumerate(CASES):
        ax.plot([i] * a.rounds, [r["output_tok_s"] for r in runs if (r["state"], r["kind"]) == (s, k)], "k.")
    ax.set_ylabel("output tokens/s (median, dots: rounds)")
    ax.set_title(f"one vllm.LLM, {hot} merged or not, {a.requests} requests x {a.tokens} tokens", fontsize=10)
    common.save_png(fig, out / "merged_inproc_cpu.png", env)
    print(med, ratios)


if __name__ == "__main__":
    main()
