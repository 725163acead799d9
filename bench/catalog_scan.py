"""Catalog listing, refresh and lookup at scale: N adapter directories on local disk.

    python bench/catalog_scan.py                # 100k adapters, results in bench/results/
    python bench/catalog_scan.py --n 20000 --repeat 5

The catalog is generated once (configs written directly, one tiny safetensors file hard-linked into
every directory, so generation is fast and the weights are valid for their configs). Configs come
from `--recipes` training recipes (rank, alpha, targets): adapters trained with one recipe have
byte-identical adapter_config.json, as PEFT writes it. A final phase makes every config distinct
(the worst case for parsing) and lists again.

Measured (page cache warm, the config parse caches cleared before every listing, so each listing
costs what a fresh process pays): listing = Catalog(root), which returns once every adapter is listed;
the background weights checks of that first listing (header of every weight file against its size
and config), timed from the listing's return until wait_checks() returns; refresh() with nothing
changed; refresh() with `--changed` of the adapters changed (half rewrite their config, half replace
their weights), checked to report exactly those (more than the catalog's sync_checks, so their
weights are checked in the background: the time until wait_checks() returns is reported too);
refresh(names) for such a change (what Catalog.watch does on filesystem events); get /
get_adapter_id / get_adapter_name per call; the resident memory a catalog adds to a fresh process.
Every measurement starts after the previous one's background checks are done. Wall and CPU seconds:
on a shared machine the wall time includes waiting; `uptime`'s load is recorded with each phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import env_info, out_dir, percentiles, print_table, pyplot, save_png, write_json  # noqa: E402
from loraplex.catalog import Catalog  # noqa: E402
from loraplex.catalog import check as check_mod  # noqa: E402
from loraplex.catalog import peft as peft_mod  # noqa: E402

RANKS = (4, 8, 16, 32, 64)
TARGETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"))
HIDDEN = 64
LINKS_PER_FILE = 50_000  # ext4 allows 65,000 hard links to one file


def recipe_config(j: int) -> tuple[int, dict]:
    """The j-th training recipe's rank and adapter_config.json (PEFT's keys and defaults)."""
    r = RANKS[j % len(RANKS)]
    targets = list(TARGETS[(j // len(RANKS)) % len(TARGETS)])
    alpha = r * (1 + j // (len(RANKS) * len(TARGETS)))
    return r, {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }


def write_weights(path: str, r: int, targets) -> None:
    import torch
    from safetensors.torch import save_file

    t = {}
    for m in targets:
        key = f"base_model.model.model.layers.0.self_attn.{m}"
        t[f"{key}.lora_A.weight"] = torch.zeros(r, HIDDEN)
        t[f"{key}.lora_B.weight"] = torch.zeros(HIDDEN, r)
    save_file(t, path)


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def name_of(i: int) -> str:
    return f"adapter-{i:06d}"


def generate(root: str, n: int, recipes: int) -> dict[int, tuple[int, dict]]:
    """n adapter dirs under root; adapter i uses recipe i % recipes. Returns the recipes."""
    os.makedirs(root, exist_ok=True)
    src = os.path.join(root, ".src")  # hidden: the catalog does not list it
    os.makedirs(src, exist_ok=True)
    specs = {j: recipe_config(j) for j in range(recipes)}
    raw = {j: json.dumps(cfg, indent=2, sort_keys=True).encode() for j, (_, cfg) in specs.items()}
    links: dict[int, tuple[str, int]] = {}  # recipe -> (weight file, links made to it)
    for i in range(n):
        j = i % recipes
        d = os.path.join(root, name_of(i))
        os.mkdir(d)
        write_file(os.path.join(d, "adapter_config.json"), raw[j])
        w, used = links.get(j, ("", LINKS_PER_FILE))
        if used >= LINKS_PER_FILE:
            w, used = os.path.join(src, f"w{j}-{i}.safetensors"), 0
            r, cfg = specs[j]
            write_weights(w, r, cfg["target_modules"])
        os.link(w, os.path.join(d, "adapter_model.safetensors"))
        links[j] = (w, used + 1)
    return specs


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CPU_S: dict[str, list[float]] = {}  # CPU seconds of this process per measurement (other load shows in wall)


def timed(fn, cpu_key: str | None = None):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cpu_key:
        CPU_S.setdefault(cpu_key, []).append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def list_catalog(root: str, key: str):
    """(listing s, catalog, background checks s): the checks are waited for, so that the next
    measurement does not share the CPU with them."""
    peft_mod.clear_caches()  # what a fresh process pays: no config parsed yet
    check_mod._VERDICTS.clear()
    gc.collect()
    t, cat = timed(lambda: Catalog(root), key)
    t_checks, done = timed(lambda: cat.wait_checks(600), key + "_checks")
    assert done
    return t, cat, t_checks


def load_avg() -> float:
    return os.getloadavg()[0]


_CHILD = """
import gc, sys
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * {page}
from loraplex.catalog import Catalog
r0 = rss()
cat = Catalog(sys.argv[1])
gc.collect()
print(rss() - r0, len(cat))
"""


def catalog_rss(root: str) -> int:
    """Resident bytes one catalog adds to a fresh process (nothing else loaded: no torch)."""
    code = _CHILD.format(page=os.sysconf("SC_PAGE_SIZE"))
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def change_some(root: str, names: list[str], rng: random.Random) -> None:
    """Half get a rewritten config (atomic replace, alpha changed), half new weights (a fresh copy)."""
    for k, name in enumerate(names):
        d = os.path.join(root, name)
        if k % 2 == 0:
            path = os.path.join(d, "adapter_config.json")
            with open(path, "rb") as f:
                cfg = json.loads(f.read())
            cfg["lora_alpha"] = cfg["lora_alpha"] + rng.randint(1, 1000)
            write_file(path + ".tmp", json.dumps(cfg, indent=2, sort_keys=True).encode())
            os.replace(path + ".tmp", path)
        else:
            path = os.path.join(d, "adapter_model.safetensors")
            shutil.copyfile(path, path + ".tmp")
            os.replace(path + ".tmp", path)


def per_call_ns(fn, args, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for a in args:
            fn(a)
        runs.append((time.perf_counter() - t0) / len(args) * 1e9)
    return percentiles(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="adapter directories (default 100000)")
    p.add_argument("--recipes", type=int, default=64, help="distinct training recipes (configs)")
    p.add_argument("--changed", type=float, default=0.01, help="fraction changed for the refresh test")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    p.add_argument("--dir", default=None, help="where to generate (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the generated catalog")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the existing JSON")
    args = p.parse_args(argv)
    if args.replot:
        res = json.loads((out_dir() / "catalog_scan.json").read_text())
        plot(res, out_dir() / "catalog_scan.png", res["env"])
        return res
    env = env_info([sys.executable, *(argv if argv is not None else sys.argv)])
    root = args.dir or tempfile.mkdtemp(prefix="loraplex-catalog-bench-")
    if os.path.exists(root) and os.listdir(root):
        shutil.rmtree(root)
    rng = random.Random(0)
    res: dict = {"env": env, "n": args.n, "recipes": args.recipes, "changed_fraction": args.changed,
                 "repeat": args.repeat, "root_fs": _fs_type(root)}
    try:
        t, _ = timed(lambda: generate(root, args.n, args.recipes))
        res["generate_s"] = t
        print(f"generated {args.n} adapters in {t:.1f} s under {root}")

        list_s, checks_s, cat = [], [], None
        res["load_avg"] = {"list": load_avg()}
        for _ in range(args.repeat):
            del cat
            cat = None
            t, cat, tc = list_catalog(root, "list")
            list_s.append(t)
            checks_s.append(tc)
        assert len(cat) == args.n and not cat.invalid() and not cat.unchecked(), \
            (len(cat), list(cat.invalid().items())[:3])
        res["list_s"] = percentiles(list_s)
        res["list_checks_s"] = percentiles(checks_s)
        res["rss_bytes"] = rss_bytes()
        res["rss_catalog_bytes"] = catalog_rss(root)

        res["load_avg"]["refresh"] = load_avg()
        res["refresh_unchanged_s"] = percentiles(
            [_refresh_checked(cat, set(), "refresh_unchanged") for _ in range(args.repeat)])
        k = max(1, int(args.n * args.changed))
        changed_runs, named_runs = [], []
        for _ in range(args.repeat):
            names = rng.sample(cat.names(), k)
            change_some(root, names, rng)
            changed_runs.append(_refresh_checked(cat, set(names), "refresh_changed"))
        for _ in range(args.repeat):  # what a watcher does on filesystem events: refresh(names)
            names = rng.sample(cat.names(), k)
            change_some(root, names, rng)
            named_runs.append(_refresh_checked(cat, set(names), "refresh_named", names=names))
        res["refresh_changed_s"] = percentiles(changed_runs)
        res["refresh_named_changed_s"] = percentiles(named_runs)
        res["refresh_changed_count"] = k
        res["refresh_checks_s"] = {key: percentiles(v) for key, v in CHECKS_S.items()}

        names = cat.names()
        sample = [names[rng.randrange(len(names))] for _ in range(100_000)]
        ids = [cat.get_adapter_id(n) for n in sample]
        assert all(cat.get_adapter_name(i) == n for i, n in zip(ids, sample, strict=True))
        res["get_ns"] = per_call_ns(cat.get, sample, args.repeat)
        res["get_adapter_id_ns"] = per_call_ns(cat.get_adapter_id, sample, args.repeat)
        res["get_adapter_name_ns"] = per_call_ns(cat.get_adapter_name, ids, args.repeat)

        # Worst case for parsing: every config distinct (one more key each; PEFT ignores unknown keys).
        for i, name in enumerate(names):
            path = os.path.join(root, name, "adapter_config.json")
            with open(path, "rb") as f:
                data = f.read()
            write_file(path, data.replace(b'"revision": null', b'"revision": "r%d"' % i))
        del cat
        distinct, distinct_checks = [], []
        res["load_avg"]["list_distinct_configs"] = load_avg()
        for _ in range(args.repeat):
            t, cat, tc = list_catalog(root, "list_distinct_configs")
            distinct.append(t)
            distinct_checks.append(tc)
            assert len(cat) == args.n and not cat.invalid()
            del cat
        res["list_distinct_configs_s"] = percentiles(distinct)
        res["list_distinct_configs_checks_s"] = percentiles(distinct_checks)
        res["load_avg"]["end"] = load_avg()
        res["cpu_s"] = {key: percentiles(v) for key, v in CPU_S.items()}
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    cpu = res["cpu_s"]
    rows = [
        ["list (Catalog(root))", *_mpp(res["list_s"]), cpu["list"]["median"]],
        ["  then weights checks (background)", *_mpp(res["list_checks_s"]), cpu["list_checks"]["median"]],
        ["list, every config distinct", *_mpp(res["list_distinct_configs_s"]), cpu["list_distinct_configs"]["median"]],
        ["  then weights checks (background)", *_mpp(res["list_distinct_configs_checks_s"]),
         cpu["list_distinct_configs_checks"]["median"]],
        ["refresh(), nothing changed", *_mpp(res["refresh_unchanged_s"]), cpu["refresh_unchanged"]["median"]],
        [f"refresh(), {k} changed", *_mpp(res["refresh_changed_s"]), cpu["refresh_changed"]["median"]],
        [f"refresh(names), {k} changed", *_mpp(res["refresh_named_changed_s"]), cpu["refresh_named"]["median"]],
    ]
    print_table([f"{args.n} adapters: wall s", "median", "p20", "p80", "CPU s"], rows)
    print_table(["lookup: ns per call", "median", "p20", "p80"],
                [[k, *_mpp(res[k + "_ns"])] for k in ("get", "get_adapter_id", "get_adapter_name")])
    print("load average (1 min) at each phase: " + ", ".join(f"{k} {v:.2f}" for k, v in res["load_avg"].items()))
    print(f"resident memory: {res['rss_catalog_bytes'] / 2**20:.0f} MiB for the catalog in a fresh process "
          f"({res['rss_catalog_bytes'] / args.n:.0f} B per adapter); this process: {res['rss_bytes'] / 2**20:.0f} MiB")
    out = out_dir()
    write_json(out / "catalog_scan.json", res)
    plot(res, out / "catalog_scan.png", env)
    print(f"wrote {out / 'catalog_scan.json'} and {out / 'catalog_scan.png'}")
    return res


def _mpp(p):
    return [p["median"], p["p20"], p["p80"]]


def _refresh_checked(cat, changed: set, key: str, names=None) -> float:
    t, diff = timed(lambda: cat.refresh(names), key)
    assert set(diff.changed) == changed and not diff.added and not diff.removed, diff
    tc, done = timed(lambda: cat.wait_checks(600), key + "_checks")
    assert done and len(cat) == len(cat.names()) and not cat.invalid()
    CHECKS_S.setdefault(key, []).append(tc)
    return t


CHECKS_S: dict[str, list[float]] = {}  # background weights checks after a refresh, until wait_checks()


def _fs_type(path: str) -> str | None:
    try:
        best = ("", None)
        real = os.path.realpath(os.path.dirname(path.rstrip("/")) or "/")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fs = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, fs)
        return best[1]
    except OSError:
        return None


def plot(res: dict, path: Path, env: dict) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    k = res["refresh_changed_count"]
    bars = [("list", res["list_s"]), ("then checks\n(background)", res["list_checks_s"]),
            ("list\n(distinct cfgs)", res["list_distinct_configs_s"]),
            ("then checks\n(background)", res["list_distinct_configs_checks_s"]),
            ("refresh()\n(none changed)", res["refresh_unchanged_s"]),
            (f"refresh()\n({k} changed)", res["refresh_changed_s"]),
            (f"refresh(names)\n({k} changed)", res["refresh_named_changed_s"])]
    _bars(ax1, bars, "seconds")
    ax1.axhline(2.0, color="red", lw=0.8, ls="--", label="target: list in 2 s")
    ax1.legend(fontsize=8)
    load = res.get("load_avg", {})
    ax1.set_title(f"{res['n']:,} adapters, {res['recipes']} recipes ({res['root_fs']})"
                  + (f"; 1-min load {min(load.values()):.1f}-{max(load.values()):.1f} on {res['env']['cpu_count']} CPUs"
                     if load else ""), fontsize=10)
    _bars(ax2, [(n, res[n + "_ns"]) for n in ("get", "get_adapter_id", "get_adapter_name")], "ns per call")
    ax2.set_title(f"lookups; catalog RSS {res['rss_catalog_bytes'] / 2**20:.0f} MiB", fontsize=10)
    fig.suptitle(env["command"], fontsize=7)
    save_png(fig, path, env)


def _bars(ax, bars, unit):
    xs = range(len(bars))
    med = [b["median"] for _, b in bars]
    err = [[b["median"] - b["p20"] for _, b in bars], [b["p80"] - b["median"] for _, b in bars]]
    ax.bar(xs, med, yerr=err, capsize=3, color="#4c72b0")
    for x, m in zip(xs, med, strict=True):
        ax.text(x, m, f"{m:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [n for n, _ in bars], fontsize=7)
    ax.set_ylabel(f"{unit} (median, p20-p80)")


if __name__ == "__main__":
    main()
