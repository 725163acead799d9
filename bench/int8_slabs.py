"""int8 host slabs: what they hold (capacity) and what they cost (accuracy), against bf16 slabs.

  python bench/int8_slabs.py          # CPU, ~1 min -> results/int8_slabs.{json,png}

Accuracy, on the toy model (loraplex/toy.py) and a set of real PEFT adapters (ranks 8 and 16, every
linear module; some also embed_tokens and lm_head): each adapter is packed as a bf16 slab and as an
int8 slab and placed by SlabUploader into a real vLLM Llama's stacked tensors (vLLM's layout, lora
dtype bf16). The weights each slot then holds are written back into the PEFT model (transformers,
fp32, scaling folded as in the slot) and every request is decoded greedily twice:
  tokens_equal   requests whose greedy tokens with the int8 slot equal those with the bf16 slot
  max_logit_err  max |logit difference| over every position, teacher-forced on the bf16 tokens
  logit_range    the spread of those logits, for scale
  bf16_slot_vs_peft_fp32_tokens_equal   the same for the bf16 slot against PEFT's own fp32 adapter:
                 checks the write-back (a wrong mapping would change most tokens)
Capacity: slab bytes per adapter, bf16 and int8, for the toy set and for Llama-3-8B shapes (r16 on
every linear module, from a layout on the meta device); adapters per GiB of host cache.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402

from loraplex import toy  # noqa: E402
from loraplex.vllm_plugin.slab_layout import VllmSlab, VllmTargets  # noqa: E402
from loraplex.vllm_plugin.slab_upload import SlabUploader  # noqa: E402
from tests.vllm import inproc  # noqa: E402

ADAPTERS = [dict(r=8, alpha=16, seed=31), dict(r=16, alpha=32, seed=32),
            dict(r=8, alpha=8, seed=33, targets=toy.ALL_LINEAR + ("embed_tokens", "lm_head")),
            dict(r=16, alpha=16, seed=34, use_rslora=True), dict(r=4, alpha=8, seed=35),
            dict(r=16, alpha=32, seed=36, targets=toy.ALL_LINEAR + ("lm_head",)),
            dict(r=8, alpha=16, seed=37), dict(r=16, alpha=16, seed=38)]
# B's multiplier (toy.make_adapter's b_scale): 20 is the tests' (the adapter's delta is ~80x the base
# weights: every output is the adapter's, and any rounding flips near-tied greedy tokens); 0.05 gives
# ||scale*B@A|| ~ 0.2 ||W||, a strong but plausible fine-tune
SETS = {"tests_b20": 20.0, "moderate_b0.05": 0.05}
PROMPTS = 8  # per adapter
NEW_TOKENS = 12


def _slab(targets, name, lora, quant):
    layout = targets.layout(name, lora, quant)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    targets.pack(name, lora, layout, buf)
    return VllmSlab((name, quant or "bf16"), layout, buf)


def _load_slot(peft_model, manager, slab, slot):
    """Write what `slot` holds into the PEFT model's LoRA weights (scaling already folded: set 1)."""
    state = inproc.slot_state(manager, slot)
    for p in slab.layout.pieces:
        t = state[(p.module, p.which, p.slice)]
        block = (t[0] if t.dim() == 3 else t)[:p.rows, :p.cols].float()
        parts = manager.packed_modules.get(p.module)
        peft_name = parts[p.slice] if parts else p.module
        layer = peft_model.get_submodule("base_model.model." + peft_name)
        with torch.no_grad():
            if peft_name.endswith("embed_tokens"):
                target = layer.lora_embedding_A if p.which == "A" else layer.lora_embedding_B
                target["default"].copy_(block.t() if p.which == "A" else block)
            else:
                target = layer.lora_A if p.which == "A" else layer.lora_B
                target["default"].weight.copy_(block)
        layer.scaling["default"] = 1.0


def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def accuracy(root: Path, b_scale: float) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = toy.build_model(root / "toy")  # the same model (seed 0) for every set
    manager = inproc.build_manager(model_dir, max_loras=2, max_rank=16, lora_dtype=torch.bfloat16)
    targets = VllmTargets(manager)
    up = SlabUploader(targets)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    equal = total = check_equal = 0
    max_err, bf16_err, spread, per_adapter, sizes = 0.0, 0.0, 0.0, [], {"bf16": 0, "int8": 0}
    for k, kw in enumerate(ADAPTERS):
        d = toy.make_adapter(model_dir, root / f"b{b_scale}-a{k}", base=base, b_scale=b_scale, **kw)
        lora = inproc.load_lora(manager, d, k + 1)
        slabs = {q or "bf16": _slab(targets, f"a{k}", lora, q) for q in (None, "int8")}
        models = {}
        for slot, (q, slab) in enumerate(slabs.items()):
            sizes[q] += slab.nbytes
            up.upload(slab, slot)
            m = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
            _load_slot(m, manager, slab, slot)
            models[q] = m
        same = 0
        fp32 = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()  # the adapter as PEFT computes it
        for _ in range(PROMPTS):
            prompt = [1] + torch.randint(4, 256, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            ref = _greedy(models["bf16"], prompt, NEW_TOKENS)
            got = _greedy(models["int8"], prompt, NEW_TOKENS)
            same += ref == got
            check_equal += ref == _greedy(fp32, prompt, NEW_TOKENS)  # the write-back is right (bf16 vs fp32)
            la, lb = _logits(models["bf16"], prompt + ref), _logits(models["int8"], prompt + ref)
            max_err = max(max_err, float((la - lb).abs().max()))
            bf16_err = max(bf16_err, float((la - _logits(fp32, prompt + ref)).abs().max()))
            spread = max(spread, float(la.max() - la.min()))
        per_adapter.append({**{k2: v for k2, v in kw.items() if k2 != "targets"}, "tokens_equal": same,
                            "requests": PROMPTS})
        equal += same
        total += PROMPTS
    return {"b_scale": b_scale, "requests": total, "tokens_equal": equal, "max_logit_err": max_err,
            "bf16_slot_vs_peft_fp32_tokens_equal": check_equal, "bf16_slot_vs_peft_fp32_max_logit_err": bf16_err,
            "logit_range": spread, "new_tokens": NEW_TOKENS, "per_adapter": per_adapter, "toy_bytes": sizes,
            "toy_capacity_x": sizes["bf16"] / sizes["int8"]}


def capacity_8b(root: Path) -> dict:
    from upload_vllm import LLAMA8B, _model_dir
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    big = inproc.build_manager(_model_dir(root, LLAMA8B, "llama8b"), max_loras=1, max_rank=16, max_cpu_loras=2,
                               lora_dtype=torch.bfloat16, device="meta")
    targets = VllmTargets(big)
    r, loras = LLAMA8B["rank"], {}
    for m, (n_in, n_out) in toy.linear_modules(big.model.config).items():
        loras[m] = LoRALayerWeights(m, r, 2 * r, torch.empty(r, n_in, dtype=torch.bfloat16, device="meta"),
                                    torch.empty(n_out, r, dtype=torch.bfloat16, device="meta"))
    model = LoRAModel(1, r, loras)
    b16, b8 = targets.layout("8b", model).nbytes, targets.layout("8b", model, "int8").nbytes
    gib = 1 << 30
    return {"bytes_bf16": b16, "bytes_int8": b8, "capacity_x": b16 / b8,
            "adapters_per_16GiB": {"bf16": 16 * gib // b16, "int8": 16 * gib // b8}}


def plot(res, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    c = res["llama8b"]["adapters_per_16GiB"]
    ax1.bar(["bf16 slabs", "int8 slabs"], [c["bf16"], c["int8"]], color=["tab:gray", "tab:blue"])
    ax1.set_title("Llama-3-8B r16 adapters per 16 GiB host cache")
    sets = list(res["accuracy"])
    x = range(len(sets))
    acc = res["accuracy"]
    ax2.bar([i - 0.2 for i in x], [acc[k]["tokens_equal"] / acc[k]["requests"] for k in sets], 0.4,
            label="int8 slot = bf16 slot", color="tab:blue")
    ax2.bar([i + 0.2 for i in x], [acc[k]["bf16_slot_vs_peft_fp32_tokens_equal"] / acc[k]["requests"] for k in sets],
            0.4, label="bf16 slot = PEFT fp32", color="tab:gray")
    ax2.set_xticks(list(x), [f"{k}\nlogit err int8 {acc[k]['max_logit_err']:.2g} / bf16 "
                             f"{acc[k]['bf16_slot_vs_peft_fp32_max_logit_err']:.2g}" for k in sets], fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("requests with equal greedy tokens")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set_title("toy model, 8 PEFT adapters x 8 requests", fontsize=9)
    common.save_png(fig, path, res["env"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    out = args.out or common.out_dir()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="loraplex-int8-"))
    res = {"env": common.env_info(), "llama8b": capacity_8b(root),
           "accuracy": {name: accuracy(root, b) for name, b in SETS.items()}}
    common.write_json(out / "int8_slabs.json", res)
    plot(res, out / "int8_slabs.png")
    c = res["llama8b"]
    print(f"capacity: Llama-3-8B r16 {c['bytes_bf16']} B bf16 vs {c['bytes_int8']} B int8 = {c['capacity_x']:.3f}x")
    for name, a in res["accuracy"].items():
        print(f"{name}: toy set {a['toy_capacity_x']:.3f}x; int8 vs bf16 slot: greedy tokens equal in "
              f"{a['tokens_equal']}/{a['requests']} requests, max logit error {a['max_logit_err']:.4g} "
              f"(logit range {a['logit_range']:.3g}); bf16 slot vs PEFT fp32: "
              f"{a['bf16_slot_vs_peft_fp32_tokens_equal']}/{a['requests']}, "
              f"{a['bf16_slot_vs_peft_fp32_max_logit_err']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
