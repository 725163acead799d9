"""Smoke test of an installed loraplex wheel, run by .ci/run from a directory outside the checkout, in a
virtual environment holding the wheel and its core dependencies only (no vLLM, no GPU, no dev extra).

Checks what an editable install would hide: the package imports from site-packages, the version agrees
with the installed metadata and `loraplex --version`, the console script runs `catalog ls`/`validate`,
package data (kernel configs, py.typed) shipped, the vLLM entry point resolves, and one Triton kernel
runs (interpreted) against a float64 loop.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # read when kernels are defined: before any loraplex.kernels import
os.environ["LORAPLEX_BACKEND"] = "triton"


def check(cond, what):
    if not cond:
        sys.exit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}")


def run(*args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def main() -> None:
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
    import loraplex

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(loraplex.__file__).resolve()
    check(site in where.parents, f"loraplex imported from the venv's site-packages ({where})")
    check(checkout is None or where.parent != checkout / "loraplex", "not the checkout's source tree")
    check(Path.cwd().resolve() != checkout, "run outside the checkout")
    check(importlib.util.find_spec("vllm") is None, "no vLLM in this environment")
    check(md.version("loraplex") == loraplex.__version__, f"metadata version == __version__ ({loraplex.__version__})")

    exe = str(Path(sys.executable).parent / "loraplex")
    check(os.access(exe, os.X_OK), f"console script installed ({exe})")
    rc, out, _ = run(exe, "--version")
    check(rc == 0 and out.strip() == f"loraplex {loraplex.__version__}", f"`loraplex --version` -> {out.strip()!r}")

    pkg = where.parent
    configs = sorted(p.name for p in (pkg / "kernels" / "configs").glob("*.json"))
    check("default.json" in configs, f"kernel configs shipped: {configs}")
    from loraplex.kernels import config as kconfig

    check(kconfig.load("no-such-gpu") == json.loads((pkg / "kernels/configs/default.json").read_text()),
          "kernel config loader reads the shipped default.json")
    check((pkg / "py.typed").is_file(), "py.typed shipped")
    lic = md.distribution("loraplex").metadata
    check(lic["License-Expression"] == "Apache-2.0", "License-Expression: Apache-2.0")

    eps = md.entry_points(group="vllm.general_plugins", name="loraplex")
    check(len(eps) == 1, "vllm.general_plugins entry point 'loraplex' registered")
    check(callable(next(iter(eps)).load()), "entry point resolves to a callable")

    from loraplex.toy import write_adapter

    root = Path(tempfile.mkdtemp(prefix="loraplex-smoke-"))
    modules = {f"model.layers.{i}.self_attn.{m}": (64, 64) for i in range(2) for m in ("q_proj", "v_proj")}
    for i, name in enumerate(["alpha", "beta"]):
        write_adapter(root / name, modules, r=4 * (i + 1), alpha=8, seed=i)
    rc, out, err = run(exe, "catalog", "ls", str(root))
    check(rc == 0 and out.splitlines()[-1] == f"2 adapters in {root}", f"`catalog ls` -> {out.splitlines()[-1:]}")
    rc, out, err = run(exe, "catalog", "validate", str(root))
    check(rc == 0 and out.splitlines()[-1].startswith("2 valid, 0 invalid"), f"`catalog validate` -> {out.strip()}")
    (root / "beta" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    rc, out, err = run(exe, "catalog", "validate", str(root))
    check(rc == 1 and out.startswith("INVALID  beta: "), f"`catalog validate` names a corrupt adapter (rc {rc})")

    import torch

    from loraplex.kernels import ops
    from loraplex.runtime.plan import PlanBuffers

    g = torch.Generator().manual_seed(0)
    T, L, R, K = 5, 3, 8, 32
    slots = torch.tensor([0, 2, -1, 2, 1], dtype=torch.int32)
    ranks = torch.tensor([8, 4, 2], dtype=torch.int32)
    x, A = torch.randn(T, K, generator=g), torch.randn(L, R, K, generator=g)
    out = torch.full((1, T, R), 7.0)
    ops.sgmv_shrink(x, [A], PlanBuffers(T, L).build(slots, ranks), out)
    want = torch.full((T, R), 7.0, dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[t] = 0
            want[t, :ranks[s]] = x[t].double() @ A[s, :ranks[s]].double().T
    check(torch.allclose(out[0].double(), want, atol=1e-4), "Triton sgmv_shrink (interpreted) matches a float64 loop")
    shutil.rmtree(root)
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
