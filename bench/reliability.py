"""Reliability run: fuzzing, fault injection, adversarial inputs and a churn soak, with one summary.

    python bench/reliability.py            # a few minutes: 1000 examples per fuzzer, 3-minute soak
    python bench/reliability.py --quick    # about a minute: 150 per fuzzer, 30 s soak

Runs tests/reliability/test_fuzz.py, test_faults.py and test_security.py in-process through pytest
(with LORAPLEX_FUZZ_EXAMPLES set), then the soak engine of tests/reliability/soak.py for
--soak-seconds. Writes bench/results/reliability.json (inputs fuzzed per kind, every fault and how
it ended, the soak's requests, rows checked, mismatches and peak memory against the budgets) and
reliability.png (resident memory and host-cache bytes over the soak).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import env_info, out_dir, print_table, pyplot, save_png, write_json  # noqa: E402

BASES = {  # the conftest's three adapters: ranks 4/8/16, rank and alpha patterns, rsLoRA, embeddings
    "alpha-r4": dict(r=4, alpha=8, seed=11, rank_pattern={"model.layers.0.self_attn.q_proj": 2}),
    "beta-r8": dict(r=8, alpha=16, seed=12, targets=("q_proj", "v_proj", "embed_tokens", "lm_head"), use_rslora=True),
    "gamma-r16": dict(r=16, alpha=32, seed=13, targets=("gate_proj", "up_proj", "down_proj", "o_proj"),
                      alpha_pattern={"down_proj": 8}),
}


class _Outcomes:
    """pytest plugin: outcome and duration of every test."""

    def __init__(self):
        self.tests = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            prev = self.tests.get(report.nodeid, {})
            if prev.get("outcome") in (None, "passed"):
                self.tests[report.nodeid] = {"outcome": report.outcome, "seconds": round(report.duration, 2)}


def run_tests(examples: int) -> dict:
    import pytest

    os.chdir(Path(__file__).resolve().parent.parent)  # the repo root: pytest finds tests/conftest.py
    os.environ["LORAPLEX_FUZZ_EXAMPLES"] = str(examples)
    plugin = _Outcomes()
    files = [f"tests/reliability/{f}" for f in ("test_fuzz.py", "test_faults.py", "test_security.py")]
    t0 = time.monotonic()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", *files], plugins=[plugin])
    fuzz = sys.modules.get("tests.reliability.test_fuzz")
    faults = sys.modules.get("tests.reliability.test_faults")
    return {"exit_code": int(rc), "seconds": round(time.monotonic() - t0, 1), "tests": plugin.tests,
            "inputs_fuzzed": dict(fuzz.INPUTS) if fuzz else {},
            "faults": list(faults.OUTCOMES) if faults else []}


def run_soak(seconds: float) -> dict:
    from loraplex import toy
    from tests.reliability.soak import Soak

    os.environ["LORAPLEX_BACKEND"] = "torch"  # the ops' torch path on CPU (the Triton interpreter is slow)
    with tempfile.TemporaryDirectory() as tmp:
        model = toy.build_model(Path(tmp) / "tiny-llama")
        bases = {name: str(toy.make_adapter(model, Path(tmp) / "bases" / name, **kw)) for name, kw in BASES.items()}
        root = Path(tmp) / "soak"
        root.mkdir()
        soak = Soak(root, bases)
        result = soak.run(seconds)
        soak.rt.close()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer fuzz examples, a 30 s soak")
    ap.add_argument("--examples", type=int, help="examples per fuzzer (default 1000, --quick 150)")
    ap.add_argument("--soak-seconds", type=float, help="soak length (default 180, --quick 30)")
    args = ap.parse_args(argv)
    examples = args.examples or (150 if args.quick else 1000)
    soak_s = args.soak_seconds or (30.0 if args.quick else 180.0)
    env = env_info()

    tests = run_tests(examples)
    print(f"\nreliability tests: exit code {tests['exit_code']} in {tests['seconds']} s")
    print_table(["inputs fuzzed", "count"], sorted(tests["inputs_fuzzed"].items()))
    print_table(["fault", "where", "request ended"], [[f["fault"], f["where"], f["request_ended"]]
                                                       for f in tests["faults"]])
    print(f"\nsoak: {soak_s:.0f} s ...")
    soak = run_soak(soak_s)
    samples = soak.pop("rss_samples")
    rss = [s[1] for s in samples]
    host = [s[2] for s in samples]
    half = len(rss) // 2
    memory = {"rss_peak_bytes": max(rss, default=0), "rss_first_half_peak": max(rss[:half], default=0),
              "rss_second_half_peak": max(rss[half:], default=0), "host_cache_peak_bytes": soak["host_peak_bytes"],
              "host_cache_budget_bytes": soak["host_cache_bytes"],
              "host_cache_within_budget": soak["host_peak_bytes"] <= soak["host_cache_bytes"]}
    failed = [k for k, v in tests["tests"].items() if v["outcome"] != "passed"]
    summary = {
        "inputs_fuzzed_total": sum(tests["inputs_fuzzed"].values()),
        "faults_injected": len(tests["faults"]),
        "tests_failed": failed,
        "soak_seconds": soak["seconds"], "requests_served": soak.get("requests", 0),
        "rows_checked": soak.get("rows", 0), "mismatches": soak.get("mismatches", 0),
        "stuck_threads": soak["stuck_threads"], "soak_failures": soak["failures"], **memory,
        "ok": not failed and tests["exit_code"] == 0 and soak.get("mismatches", 0) == 0
        and not soak["stuck_threads"] and not soak["failures"] and memory["host_cache_within_budget"],
    }
    print_table(["soak", "value"], [[k, v] for k, v in soak.items() if not isinstance(v, list)])
    print_table(["summary", "value"], [[k, v] for k, v in summary.items()])
    out = out_dir()
    write_json(out / "reliability.json", {"env": env, "summary": summary, "inputs_fuzzed": tests["inputs_fuzzed"],
                                          "faults": tests["faults"], "tests": tests["tests"], "soak": soak,
                                          "soak_memory_samples": [{"t": round(t, 2), "rss": r, "host_cache": h}
                                                                  for t, r, h in samples]})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ts = [s[0] for s in samples]
    ax.plot(ts, [r / 2**20 for r in rss], label="process RSS (MiB)")
    ax.plot(ts, [h / 2**20 for h in host], label="host cache used + reserved (MiB)")
    ax.axhline(soak["host_cache_bytes"] / 2**20, color="gray", ls="--", lw=0.8, label="host cache budget")
    ax.set_xlabel("soak time (s)")
    ax.set_title(f"churn soak: {summary['requests_served']} steps, {summary['rows_checked']} rows checked, "
                 f"{summary['mismatches']} mismatches", fontsize=9)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_png(fig, out / "reliability.png", env)
    print(f"\nwrote {out / 'reliability.json'} and reliability.png")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
