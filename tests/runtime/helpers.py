"""Test helpers: the tiny Llama's LoRA targets, the fp32 reference from the adapter's own files, and
the same delta computed from the stacked target weights of a slot (plain torch, no kernels)."""

from __future__ import annotations

import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraplex.runtime.targets import llama_targets

HIDDEN, KV, INTER, VOCAB, LAYERS = 64, 32, 128, 256, 2


def llama_target_specs(layers=LAYERS, embed=True, lm_head=True):
    """(name, slices, kind) of every module the tiny Llama wraps, stacked as the layers do (qkv, gate_up)."""
    return llama_targets(layers, HIDDEN, KV, INTER, vocab=VOCAB, embed=embed, lm_head=lm_head)


def add_llama_targets(rt, **kw):
    return [rt.new_target(n, s, k) for n, s, k in llama_target_specs(**kw)]


def clone_adapter(src, dst, seed: int, scale: float = 1.0):
    """A new PEFT adapter with src's config and keys/shapes but fresh random weights (fast: no model)."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "adapter_config.json"), os.path.join(dst, "adapter_config.json"))
    write_weights(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
                  seed, scale)
    return dst


def write_weights(src_file, dst_file, seed: int, scale: float = 1.0):
    """Atomically replace dst_file with src_file's keys/shapes filled with seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with safe_open(src_file, "pt") as f:
        tensors = {k: (torch.randn(f.get_slice(k).get_shape(), generator=g) * scale).contiguous() for k in f.keys()}
    tmp = f"{dst_file}.tmp{seed}"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, dst_file)


class Reference:
    """fp32 LoRA deltas of one adapter version, straight from its files through the catalog."""

    def __init__(self, catalog, name, entry=None):
        self.entry, self.layout, tensors = catalog.load_adapter(name, entry)
        self.spec = self.entry.spec
        self.tensors = {k: v.float() for k, v in tensors.items()}

    @classmethod
    def from_file(cls, name, spec, weights_file):
        """The reference of a weight file kept aside (e.g. one version of an adapter rewritten later)."""
        from safetensors.torch import load_file

        from loraplex.catalog.weights import layout

        self = cls.__new__(cls)
        self.entry, self.spec = None, spec
        self.tensors = {k: v.float() for k, v in load_file(weights_file).items()}
        self.layout = layout(name, spec, {k: (tuple(v.shape), "F32") for k, v in self.tensors.items()})
        return self

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        mw = self.layout.get(module)
        if mw is None:
            return None
        a, b = self.tensors[mw.a_key], self.tensors[mw.b_key]
        s = self.spec.scaling_for(module)
        if mw.embedding:  # x holds token ids
            return a.t()[x] @ b.t() * s
        return x @ a.t() @ b.t() * s


def stacked_delta(target, slot: int, x: torch.Tensor) -> torch.Tensor:
    """The delta of `slot` from the stacked weights: concat over slices of x @ A^T @ B^T (scale folded)."""
    if slot < 0:
        n = x.shape[0]
        return torch.zeros(n, target.out_features)
    outs = []
    for s in range(len(target.slices)):
        a, b = target.A[s][slot].float().cpu(), target.B[s][slot].float().cpu()
        if target.kind == "embedding":
            outs.append(a[x] @ b.t())
        else:
            outs.append(x @ a.t() @ b.t())
    return torch.cat(outs, dim=-1)


def reference_delta(target, ref: Reference | None, x: torch.Tensor) -> torch.Tensor:
    """What the adapter adds to `target`'s output for inputs x, fp32; zeros for modules it leaves alone."""
    n = x.shape[0]
    if ref is None:
        return torch.zeros(n, target.out_features)
    outs = []
    for sl in target.slices:
        d = ref.delta(sl.peft_module, x)
        outs.append(torch.zeros(n, sl.out_features) if d is None else d)
    return torch.cat(outs, dim=-1)


def inputs_for(target, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if target.kind == "embedding":
        return torch.randint(0, target.slices[0].in_features, (n,), generator=g)
    return torch.randn(n, target.slices[0].in_features, generator=g)


def check_plan(rt, plan, refs: dict, targets=None, atol=1e-4, rtol=1e-4, seed=0, row_tol=0.0) -> int:
    """Every token's delta from its slot's stacked weights equals the fp32 reference of the adapter
    version the plan says that slot holds. refs: {(name, version): Reference}. Returns rows checked.
    row_tol: extra absolute tolerance as a fraction of the row's largest reference value (half
    precision: rounding errors scale with the magnitudes summed, not with each output)."""
    slot_key = {slot: key for key, slot in plan.adapters.values()}
    token_slots = plan.token_slots.cpu().tolist()
    rows = 0
    for t in targets or rt.targets:
        x = inputs_for(t, len(token_slots), seed)
        for i, slot in enumerate(token_slots):
            got = stacked_delta(t, slot, x[i:i + 1])
            want = reference_delta(t, None if slot < 0 else refs[slot_key[slot]], x[i:i + 1])
            tol = atol + row_tol * float(want.abs().max()) if want.numel() else atol
            torch.testing.assert_close(got, want, atol=tol, rtol=rtol,
                                       msg=lambda m, t=t, i=i, slot=slot: f"{t.name} token {i} slot {slot}: {m}")
            rows += 1
    return rows
