"""vLLM in one process (vllm.LLM), loraplex trees side by side: output tokens/s of a uniform batch over
a catalog of many adapters, each tree in fresh processes, the trees alternating round by round, with
the process's CPU seconds (two busy cores show as CPU ~ 2x wall).

    python bench/inproc_ab.py --tree before=/path/to/old --tree after=. --catalog DIR --model DIR [--rounds 3]

DIR: a catalog and model made by bench/serve.py (its --data-dir), e.g. /tmp/loraplex-bench-serve/h512-l4-n128.
Writes bench/results/inproc_ab.json (--out to name it otherwise).
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

HERE = Path(__file__).resolve().parent


def child(catalog: str, model: str, requests: int) -> None:
    os.environ.update(LORAPLEX_CATALOG=catalog, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    os.environ.setdefault("LORAPLEX_BACKEND", "torch")  # the Triton interpreter is far too slow to serve with
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    import loraplex
    from loraplex.vllm_plugin import lora_request

    llm = LLM(model=model, enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=32, dtype="float32",
              enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0)
    names = sorted(os.listdir(catalog))
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def run(n):
        reqs = [lora_request(rng.choice(names)) for _ in range(n)]
        prompts = [{"prompt_token_ids": [rng.randrange(4, 250) for _ in range(64)]} for _ in range(n)]
        t, c = time.perf_counter(), time.process_time()
        llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        return n * 32 / (time.perf_counter() - t), time.process_time() - c, time.perf_counter() - t

    run(16)  # warm-up
    tok_s, cpu_s, wall_s = run(requests)
    print("RESULT " + json.dumps({"tok_s": tok_s, "cpu_s": cpu_s, "wall_s": wall_s, "loraplex": loraplex.__file__}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--out", default="inproc_ab", help="result name under bench/results/")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.catalog, a.model, a.requests)
    trees = dict(t.split("=", 1) for t in a.tree)
    runs: dict[str, list] = {label: [] for label in trees}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for label in order:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(trees[label]))
            out = subprocess.run([sys.executable, __file__, "--child", "--tree", "x=.", "--catalog", a.catalog,
                                  "--model", a.model, "--requests", str(a.requests)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            res["load_1min"] = os.getloadavg()[0]
            runs[label].append(res)
            print(f"round {r} {label:10s} {res['tok_s']:.1f} tok/s, CPU {res['cpu_s']:.1f} s in {res['wall_s']:.1f} s",
                  flush=True)
    for label, rs in runs.items():
        print(f"{label:10s} median {statistics.median(x['tok_s'] for x in rs):.1f} tok/s")
    out_path = HERE / "results" / f"{a.out}.json"
    out_path.write_text(json.dumps({"trees": trees, "runs": runs, "command": " ".join(sys.argv)}, indent=1))
    print("wrote", out_path)


if __name__ == "__main__":
    main()
