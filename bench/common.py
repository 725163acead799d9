"""Helpers shared by the bench/ scripts: what machine and versions a result came from, timing
(CUDA events on a GPU, perf_counter on the CPU), percentiles, and writing JSON + PNG results.

Every result file carries `env_info()` so that a figure can be traced back to the GPU, the library
versions and the exact command line that made it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - a missing or broken package is reported as absent
        return None
    return getattr(m, "__version__", "unknown")


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0)


def env_info(argv=None) -> dict:
    """GPU, versions, command line and time: the header of every result file."""
    import torch

    argv = sys.argv if argv is None else argv
    info = {
        "gpu": gpu_name(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "loraplex": _version("loraplex"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(shlex.quote(a) for a in argv),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": os.environ.get("LORAPLEX_BACKEND") or None,
    }
    if torch.cuda.is_available():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def percentiles(xs) -> dict:
    """median, p20 and p80 (what every benchmark here reports), plus n, min and mean."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"n": 0, "median": None, "p20": None, "p80": None, "min": None, "mean": None}

    def q(p):  # linear interpolation between closest ranks
        k = (len(xs) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"n": len(xs), "median": q(0.5), "p20": q(0.2), "p80": q(0.8), "min": xs[0],
            "mean": statistics.fmean(xs)}


def time_fn(fn, iters: int = 50, warmup: int = 5, device=None) -> list[float]:
    """Per-call times of fn() in milliseconds: CUDA events on a GPU (one pair per call, so host
    launch time only shows when the GPU waits for it), perf_counter after a sync otherwise."""
    import torch

    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in evs]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


class Timer:
    """Wall-clock seconds of a block, synchronizing CUDA on both ends so queued work counts."""

    def __init__(self, sync: bool = True):
        self.sync = sync
        self.seconds = 0.0

    def _sync(self):
        import torch

        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        return False


def progress(it=None, **kw):
    """A tqdm progress bar that redraws at most once a second (logs stay short when not a terminal)."""
    from tqdm import tqdm

    return tqdm(it, mininterval=1.0, **kw)


def write_json(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, env: dict | None = None) -> Path:
    """Save fig with a one-line footer naming the GPU, torch/triton versions and the time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if env:
        fig.text(0.01, 0.005, f"{env.get('gpu')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                 f"{env.get('time')}", fontsize=6, color="gray")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def time_left() -> float:
    """Seconds until $LORAPLEX_DEADLINE (a Unix time that bench/gpu_run.sh sets for each stage, a
    little before it kills the stage); inf when unset. Sweeps stop starting new work when it runs
    low and write what they have, so a short device lease still returns results."""
    d = os.environ.get("LORAPLEX_DEADLINE")
    return float(d) - time.time() if d else float("inf")


def interpreting() -> bool:
    """Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1, set before their import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def out_dir(default: Path = RESULTS) -> Path:
    """Where results go: $LORAPLEX_BENCH_OUT if set (the GPU runner points it at $OUT), else bench/results."""
    p = Path(os.environ.get("LORAPLEX_BENCH_OUT") or default)
    p.mkdir(parents=True, exist_ok=True)
    return p


def print_table(header, rows, file=None) -> None:
    """A fixed-width text table: header is a list of column titles, rows lists of cells."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
