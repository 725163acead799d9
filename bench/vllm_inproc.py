"""The plugin's own cost inside vLLM, without HTTP: vllm.LLM in this process over a catalog of many
adapters, uniform traffic, output tokens/s, with residency publishing on and off (and any other
loraplex build on PYTHONPATH for before/after comparisons). Rounds alternate the variants, each in
a fresh process, so they share the machine's state.

    python bench/vllm_inproc.py --catalog DIR --model DIR [--rounds 3]

DIR: a catalog and model made by bench/serve.py (its --data-dir), e.g. /tmp/loraplex-bench-serve/h512-l4-n128.
Writes bench/results/vllm_inproc.json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _one(model, catalog, publish: bool, requests: int, seed: int) -> float:
    """Runs in a child process: tokens/s of one uniform batch after a warm-up batch."""
    os.environ.update(LORAPLEX_CATALOG=catalog, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not publish:
        from loraplex.vllm_plugin import residency

        residency.ResidencyReporter.publish = lambda self: None
    from vllm import LLM, SamplingParams

    from loraplex.vllm_plugin import lora_request

    llm = LLM(model=model, enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=32, dtype="float32",
              enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0)
    names = sorted(os.listdir(catalog))
    rng = random.Random(seed)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def run(n):
        reqs = [lora_request(rng.choice(names)) for _ in range(n)]
        prompts = [{"prompt_token_ids": [rng.randrange(4, 250) for _ in range(64)]} for _ in range(n)]
        t = time.perf_counter()
        llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        return n * 32 / (time.perf_counter() - t)

    run(16)
    return run(requests)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--child", choices=("publish", "no-publish"))
    args = ap.parse_args()
    if args.child:
        print("RESULT", _one(args.model, args.catalog, args.child == "publish", args.requests, 0), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("LORAPLEX_BACKEND", "torch")  # the interpreter is far too slow for a model
    env = common.env_info()
    env["loadavg_before"] = os.getloadavg()
    rows = {"publish": [], "no-publish": []}
    for _ in range(args.rounds):
        for variant in rows:
            out = subprocess.run([sys.executable, __file__, "--catalog", args.catalog, "--model", args.model,
                                  "--requests", str(args.requests), "--child", variant],
                                 capture_output=True, text=True, timeout=900)
            got = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            rows[variant].append(float(got[-1].split()[1]) if got else None)
            print(variant, rows[variant][-1], flush=True)
    env["loadavg_after"] = os.getloadavg()
    med = {k: statistics.median([x for x in v if x is not None] or [0.0]) for k, v in rows.items()}
    data = {"env": env, "args": vars(args), "tokens_per_s": rows, "median": med,
            "publish_over_no_publish": med["publish"] / med["no-publish"] if med["no-publish"] else None}
    out = common.out_dir()
    common.write_json(out / "vllm_inproc.json", data)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(med), list(med.values()), color=["tab:blue", "tab:gray"])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title("vllm.LLM in-process, uniform over the catalog")
    common.save_png(fig, out / "vllm_inproc.png", env)
    print(json.dumps(med))


if __name__ == "__main__":
    main()
