"""Cache miss: the time to make one adapter usable (storage -> slab -> GPU slot), per phase, against
the one-copy pinned H2D ceiling; and how much a concurrent GEMM loop slows down while adapters upload.

  python bench/upload.py          # GPU: Llama-3-8B shapes, r16 on every linear module (84 MB in bf16)
  python bench/upload.py --cpu    # CPU: 4 small layers; storage read and pack only -> results/upload_cpu.*
  python bench/upload.py --vllm   # vLLM's path: stock set_lora vs loraplex slabs -> results/upload_vllm_cpu.*

Phases, each timed on its own over several adapters (every repetition reads another adapter, so
nothing is served from the runtime's caches):
  read     open + header + layout + the final version check (what the loader does around the copy)
  pack     every tensor read from the file and copied into its slab region (dtype, scale folded)
           "cold": after POSIX_FADV_DONTNEED on the file (the page cache let go of it); "warm": cached
  upload   slab -> slot: "staged" (one H2D copy + device scatter, the default) and "direct" (one
           H2D copy per tensor), timed with CUDA events on the side stream
  h2d      the ceiling: one pinned H2D copy of the slab's bytes
  miss     Runtime.plan() on a cold adapter, wall clock until the upload completed
Before timing, the uploaded slot is checked against the adapter's own safetensors weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from loraplex import (  # noqa: E402
    Catalog,
    Runtime,
    RuntimeConfig,
    toy,  # noqa: E402
)
from loraplex.catalog.reader import open_adapter  # noqa: E402
from loraplex.runtime.slab import Slab, pack  # noqa: E402
from loraplex.runtime.targets import linear_shapes, llama_targets  # noqa: E402
from loraplex.runtime.upload import Uploader  # noqa: E402

GPU = dict(layers=32, hidden=4096, kv=1024, inter=14336, rank=16, adapters=6, repeats=5)
CPU = dict(layers=4, hidden=1024, kv=256, inter=3584, rank=16, adapters=4, repeats=9)
H2D_CEILING_GBPS = 55.0  # measured on the H200 (ENVIRONMENT.md); this run measures its own too


def targets(s):
    return llama_targets(s["layers"], s["hidden"], s["kv"], s["inter"])


def write_adapters(root: Path, s, n: int) -> list[str]:
    """n adapters in PEFT's file format (bf16, rank s['rank'] on every linear module)."""
    r, names = s["rank"], []
    shapes = linear_shapes(targets(s))
    for k in range(n):
        d = toy.write_adapter(root / f"adapter{k}", shapes, r=r, alpha=2 * r, seed=k, dtype="bfloat16", b_std=0.1)
        fd = os.open(os.path.join(d, "adapter_model.safetensors"), os.O_RDONLY)
        os.fsync(fd)  # written back, so POSIX_FADV_DONTNEED can really drop it from the page cache
        os.close(fd)
        names.append(os.path.basename(d))
    return names


def add_targets(rt, s) -> None:
    for name, slices, kind in targets(s):
        rt.new_target(name, slices, kind)


def drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_and_pack(rt, name: str, pin: bool):
    """The loader's steps, timed apart: (slab, its host-cache reservation, read s, pack s, reserve s).
    Cancel the reservation once the slab is no longer used (its arena range is then reused)."""
    entry = rt.catalog.get(name)
    t0 = time.perf_counter()
    reader = open_adapter(rt.catalog, name, entry)
    layout = rt._layout_for(entry, reader.layout)
    t1 = time.perf_counter()
    res = rt.host.reserve(entry.key, layout.nbytes)
    buf = rt.host.buffer_for(res, layout.numel, layout.dtype, pin)
    t2 = time.perf_counter()
    pack(name, reader, layout, buf)
    t3 = time.perf_counter()
    reader.close()
    t4 = time.perf_counter()
    return Slab(entry, layout, buf), res, (t1 - t0) + (t4 - t3), t3 - t2, t2 - t1


def check_slot(rt, slab, slot: int, wfile) -> None:
    """The slot holds the adapter's own weights (A exact, B * scaling to bf16 rounding), zero padding."""
    ref = load_file(str(wfile))
    spec = slab.entry.spec
    for t in rt.targets[:4]:
        for si, sl in enumerate(t.slices):
            a = ref[f"base_model.model.{sl.peft_module}.lora_A.weight"]
            b = ref[f"base_model.model.{sl.peft_module}.lora_B.weight"].float() * spec.scaling_for(sl.peft_module)
            r = a.shape[0]
            assert torch.equal(t.A[si][slot, :r].cpu(), a), sl.peft_module
            torch.testing.assert_close(t.B[si][slot, :, :r].float().cpu(), b, rtol=1e-2, atol=1e-3)
            assert not t.A[si][slot, r:].any() and not t.B[si][slot, :, r:].any()


def gemm_slowdown(rt, slabs, n_gemm: int = 40, size: int = 8192, reps: int = 5) -> dict:
    """GEMM loop time alone vs while uploads run on the side stream (as many as overlap the loop)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    up = rt.uploader

    def loop():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n_gemm):
            torch.mm(a, b)
        e.record()
        return s, e

    loop()
    torch.cuda.synchronize()
    alone, busy, uploads, up_bytes = [], [], [], 0
    for _ in range(reps):
        s, e = loop()
        torch.cuda.synchronize()
        alone.append(s.elapsed_time(e))
        s, e = loop()  # queued on the compute stream; the uploads below run beside it
        handles = []
        while not e.query() and len(handles) < 64:
            slab = slabs[len(handles) % len(slabs)]
            handles.append(up.upload(slab, 1 + len(handles) % (rt.config.max_loras - 1), None))
        torch.cuda.synchronize()
        busy.append(s.elapsed_time(e))
        uploads.append(len(handles))
        up_bytes += sum(h.nbytes for h in handles)
    ma, mb = common.percentiles(alone)["median"], common.percentiles(busy)["median"]
    return {"gemm": f"{n_gemm} x bf16 mm {size}^3", "alone_ms": common.percentiles(alone),
            "with_uploads_ms": common.percentiles(busy), "uploads_per_loop": uploads,
            "slowdown": mb / ma - 1.0, "uploaded_gb": up_bytes / 1e9}


def run(args) -> dict:
    cpu = args.cpu or not torch.cuda.is_available()
    s = dict(CPU if cpu else GPU)
    for k in ("layers", "adapters", "repeats"):
        if getattr(args, k):
            s[k] = getattr(args, k)
    dev = "cpu" if cpu else "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-upload-"))
    names = write_adapters(tmp, s, s["adapters"])
    cat = Catalog(tmp)
    rt = Runtime(cat, RuntimeConfig(max_loras=4, max_rank=s["rank"], dtype="bfloat16", device=dev,
                                    host_cache_bytes=2 << 30, load_workers=2))
    add_targets(rt, s)
    pin = not cpu
    res = {"env": common.env_info(), "config": {**s, "device": dev, "dtype": "bfloat16"},
           "load_average": os.getloadavg()}  # CPU figures from a shared machine: say how busy it was
    phases = {"read_cold": [], "pack_cold": [], "read_warm": [], "pack_warm": [], "reserve": []}
    slabs = []
    t0 = time.perf_counter()
    rt.arena.buffer  # noqa: B018 - the arena is allocated (pinned on CUDA) once, at first use
    res["arena_alloc_ms"] = (time.perf_counter() - t0) * 1e3
    for rep in range(s["repeats"]):
        for temp in ("cold", "warm"):
            name = names[rep % len(names)]
            if temp == "cold":
                drop_page_cache(tmp / name / "adapter_model.safetensors")
            slab, reservation, rd, pk, al = read_and_pack(rt, name, pin)
            phases[f"read_{temp}"].append(rd * 1e3)
            phases[f"pack_{temp}"].append(pk * 1e3)
            phases["reserve"].append(al * 1e3)
            if len(slabs) < 3:
                slabs.append(slab)  # kept for the upload timings: its reservation stays open
            else:
                rt.host.cancel(reservation)
    nbytes = slabs[0].nbytes
    res["adapter_bytes"] = nbytes
    res["file_bytes"] = os.path.getsize(tmp / names[0] / "adapter_model.safetensors")
    if not cpu:
        res.update(gpu_phases(rt, s, names, slabs, tmp, phases))
    res["phases_ms"] = {k: common.percentiles(v) for k, v in phases.items() if v}
    med = {k: v["median"] for k, v in res["phases_ms"].items()}
    res["gbps"] = {k: nbytes / (med[k] * 1e6) for k in med if k.startswith(("pack", "upload", "h2d"))}
    if not cpu:
        h2d = med["h2d_one_copy"]
        res["upload_over_h2d"] = {m: med[f"upload_{m}"] / h2d for m in ("staged", "direct")}
        res["target"] = "miss usable after disk read + <= 1.2x one-copy H2D; concurrent steps slowed <= 2%"
        res["miss_over_read_plus_h2d"] = med["miss"] / (med["read_cold"] + med["pack_cold"] + 1.2 * h2d)
    rt.close()
    return res


def gpu_phases(rt, s, names, slabs, tmp, phases) -> dict:
    out = {}
    prev = None
    slab = slabs[0]
    h = rt.uploader.upload(slab, 0, prev)
    torch.cuda.synchronize()
    check_slot(rt, slab, 0, tmp / slab.key[0] / "adapter_model.safetensors")
    out["checked"] = "slot 0 equals the adapter's safetensors weights (A exact, B*scale to bf16), zero padding"
    for mode in ("staged", "direct"):
        up = Uploader(rt.targets, "cuda", mode)
        times = []
        for i in range(s["repeats"] + 2):
            h = up.upload(slabs[i % len(slabs)], 1 + i % 3, None)
            h.done.synchronize()
            times.append(h.elapsed() * 1e3)
        phases[f"upload_{mode}"] = times[2:]  # the first two allocate the staging buffer and warm up
    pinned = torch.empty(slab.nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(slab.nbytes, dtype=torch.uint8, device="cuda")
    phases["h2d_one_copy"] = common.time_fn(lambda: dst.copy_(pinned, non_blocking=True), iters=10, warmup=2)
    miss = []
    for rep in range(s["repeats"]):
        name = names[(rep + 1) % len(names)]
        rt.host.clear()
        drop_page_cache(tmp / name / "adapter_model.safetensors")
        for n in names:  # free every slot so the plan below is a pure miss, not a wait
            if rt.slot_of(n) is not None:
                rt.pool.drop_stale(n, None)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with rt.step([name], [1]):
            pass
        torch.cuda.synchronize()
        miss.append((time.perf_counter() - t0) * 1e3)
    phases["miss"] = miss
    out["concurrent_gemm"] = gemm_slowdown(rt, slabs)
    return out


def plot(res, path) -> None:
    plt = common.pyplot()
    ph = res["phases_ms"]
    keys = list(ph)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) + 1.2))
    med = [ph[k]["median"] for k in keys]
    err = [[m - ph[k]["p20"] for k, m in zip(keys, med, strict=True)],
           [ph[k]["p80"] - m for k, m in zip(keys, med, strict=True)]]
    ax.barh(keys, med, xerr=err, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("ms (median, p20-p80)")
    mb = res["adapter_bytes"] / 2 ** 20
    what = "storage -> slab" if res["config"]["device"] == "cpu" else "storage -> slab -> GPU slot"
    ax.set_title(f"{what}, {mb:.1f} MiB slab ({res['config']['device']})")
    common.save_png(fig, path, res["env"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small shapes, CPU-side phases only")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--adapters", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--vllm", action="store_true", help="vLLM path: stock set_lora vs slabs (upload_vllm.py)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    out = args.out or common.out_dir()
    if args.vllm:
        import upload_vllm

        return upload_vllm.main(args, out)
    res = run(args)
    tag = "cpu" if res["config"]["device"] == "cpu" else "gpu"
    common.write_json(out / f"upload_{tag}.json", res)
    plot(res, out / f"upload_{tag}.png")
    for k, v in res["phases_ms"].items():
        gb = res["gbps"].get(k)
        print(f"{k:>14}: {v['median']:9.3f} ms (p20 {v['p20']:.3f}, p80 {v['p80']:.3f})"
              + (f"  {gb:6.2f} GB/s" if gb else ""))
    for k in ("upload_over_h2d", "miss_over_read_plus_h2d", "concurrent_gemm"):
        if k in res:
            print(k, res[k])
    return 0


if __name__ == "__main__":
    sys.exit(main())
