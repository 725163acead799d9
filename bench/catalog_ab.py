"""Catalog listing A/B between two source trees, in alternating fresh processes on one generated catalog:
Catalog(root) for N adapters with identical configs (64 training recipes), then with every config
distinct. Only CPU-bound listing time (page cache warm); bench/catalog_scan.py measures the rest.

    python bench/catalog_ab.py --before /path/to/old/checkout [--after .] [--n 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import catalog_scan as cs  # noqa: E402

CHILD = ("import time, sys; t = time.perf_counter(); c = time.process_time()\n"
         "from loraplex.catalog import Catalog\n"
         "cat = Catalog(sys.argv[1]); print(time.perf_counter() - t, time.process_time() - c, len(cat))")


def once(tree: str, root: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, root], env=dict(os.environ, PYTHONPATH=tree),
                         capture_output=True, text=True, check=True).stdout.split()
    assert int(out[2]) == N, out
    return float(out[0]), float(out[1])


def main(argv=None) -> None:
    global N
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=str(HERE.parent))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    N = args.n
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    res = {"n": N, "trees": trees, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "cat")
        cs.generate(root, N, 64)
        for phase in ("identical", "distinct"):
            if phase == "distinct":  # one more key each, as catalog_scan.py does
                for i, name in enumerate(sorted(n for n in os.listdir(root) if not n.startswith("."))):
                    p = os.path.join(root, name, "adapter_config.json")
                    with open(p, "rb") as f:
                        data = f.read()
                    cs.write_file(p, data.replace(b'"revision": null', b'"revision": "r%d"' % i))
            for tree in trees.values():
                once(tree, root)  # page cache and bytecode caches warm for both
            for r in range(args.rounds):
                for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    wall, cpu = once(trees[label], root)
                    res["runs"].setdefault(phase, {}).setdefault(label, []).append(
                        {"wall_s": wall, "cpu_s": cpu, "load_1min": os.getloadavg()[0]})
    for phase, d in res["runs"].items():
        for label, runs in d.items():
            ws = sorted(x["wall_s"] for x in runs)
            print(f"{phase:9s} {label:6s} wall median {ws[len(ws) // 2]:.2f} s (min {ws[0]:.2f}, max {ws[-1]:.2f}), "
                  f"load {min(x['load_1min'] for x in runs):.1f}-{max(x['load_1min'] for x in runs):.1f}")
    out = HERE / "results" / "catalog_ab.json"
    out.write_text(json.dumps({**res, "command": " ".join(sys.argv)}, indent=1))
    print(f"wrote {out}")


N = 0
if __name__ == "__main__":
    main()
