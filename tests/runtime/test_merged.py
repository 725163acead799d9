"""Merged mode in the Runtime, without a model: the base weights a merge changes (against the adapter's own
files), the correction each slot holds (own − merged, − merged for base requests), restoring bit for bit
after many switches, and the refusals (rank capacity, quantized or unbound modules, steps in flight)."""

import shutil

import pytest
import torch
from torch import nn

from loraplex.errors import CapacityError, ConfigError
from loraplex.runtime.merged import BaseWeight, stack_correction

from .helpers import Reference, inputs_for, reference_delta, stacked_delta, write_weights


def bind_modules(rt, dtype=torch.float32, seed=0, make=None, device="cpu"):
    """A plain nn.Linear / nn.Embedding per slice of every target, bound as its base weight."""
    torch.manual_seed(seed)
    mods = {}
    for t in rt.targets:
        bases = []
        for sl in t.slices:
            m = (make or _plain)(t.kind, sl).to(device=device, dtype=dtype)
            mods[sl.peft_module] = m
            bases.append(BaseWeight(m, sl.peft_module))
        rt.bind_base(t, bases)
    return mods


def _plain(kind, sl):
    return nn.Embedding(sl.in_features, sl.out_features) if kind == "embedding" else \
        nn.Linear(sl.in_features, sl.out_features, bias=False)


def _snapshot(mods):
    return {k: m.weight.detach().clone() for k, m in mods.items()}


def delta_w(ref: Reference, module: str):
    """ΔW = s·B·A of one module in fp32 from the adapter's files ([out, in]; embedding [vocab, dim])."""
    mw = ref.layout.get(module)
    if mw is None:
        return None
    a, b = ref.tensors[mw.a_key], ref.tensors[mw.b_key]
    s = ref.spec.scaling_for(module)
    return (a.t() @ b.t()) * s if mw.embedding else (b @ a) * s


def _check_slots(rt, plan, want: dict, atol=1e-3, rtol=1e-4, row_tol=0.0):
    """Every token's delta from its slot equals want[slot] = (own Reference | None, merged Reference).
    row_tol: extra tolerance as a fraction of the largest expected value (half-precision slots)."""
    for t in rt.targets:
        x = inputs_for(t, 1, seed=3)
        for slot, (own, merged) in want.items():
            got = stacked_delta(t, slot, x)
            exp = reference_delta(t, own, x) - reference_delta(t, merged, x)
            tol = atol + row_tol * float(exp.abs().max())
            torch.testing.assert_close(got, exp, atol=tol, rtol=rtol, msg=lambda m, t=t, s=slot: f"{t.name} {s}: {m}")


def test_merge_changes_targeted_weights_and_packs_corrections(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24)
    mods = bind_modules(rt)
    pristine = _snapshot(mods)
    cat = rt.catalog
    refs = {n: Reference(cat, n) for n in ("alpha-r4", "beta-r8", "gamma-r16")}
    assert rt.merge("alpha-r4") == cat.get("alpha-r4").key
    for path, m in mods.items():
        d = delta_w(refs["alpha-r4"], path)
        if d is None:
            assert torch.equal(m.weight, pristine[path]), path  # modules alpha leaves alone are untouched
        else:
            torch.testing.assert_close(m.weight, pristine[path] + d, atol=1e-5, rtol=1e-5)
    plan = rt.plan(["gamma-r16", None, "alpha-r4", "beta-r8"], [1, 2, 1, 1])
    gamma, base, alpha, beta = plan.request_slots
    assert alpha == -1 and plan.merged == cat.get("alpha-r4").key  # the merged adapter takes no LoRA path
    assert min(gamma, base, beta) >= 0 and len({gamma, base, beta}) == 3
    _check_slots(rt, plan, {gamma: (refs["gamma-r16"], refs["alpha-r4"]), base: (None, refs["alpha-r4"]),
                            beta: (refs["beta-r8"], refs["alpha-r4"])})
    # the packing, slice by slice, is stack_correction's (what the vLLM front end writes itself)
    t = next(t for t in rt.targets if t.name == "model.layers.1.o")
    pieces = []
    for name in ("gamma-r16", "alpha-r4"):
        mw = refs[name].layout[t.slices[0].peft_module]
        s = refs[name].spec.scaling_for(t.slices[0].peft_module)
        pieces.append((refs[name].tensors[mw.a_key], refs[name].tensors[mw.b_key] * s))
    a, b = stack_correction(*pieces)
    assert a.shape[0] == b.shape[1] == 16 + 4 == int(t.ranks[gamma])
    torch.testing.assert_close(t.A[0][gamma, :20], a)
    torch.testing.assert_close(t.B[0][gamma, :, :20], b)
    assert not t.A[0][gamma, 20:].any() and not t.B[0][gamma, :, 20:].any()  # padding stays zero
    rt.release(plan)
    assert rt.stats()["merge"]["pristine_bytes"] == sum(
        pristine[p].numel() * 4 for p in mods if delta_w(refs["alpha-r4"], p) is not None)
    rt.merge(None)
    assert rt.merged() is None and all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())
    with rt.step([None, "alpha-r4"]) as plan:
        assert plan.request_slots[0] == -1 and plan.merged is None
        _check_slots(rt, plan, {plan.request_slots[1]: (refs["alpha-r4"], None)})
    assert rt.stats()["merge"]["pristine_bytes"] == 0


def test_no_drift_after_many_switches(make_runtime, adapter_source):
    """bf16, where W + ΔW − ΔW is not W: every unmerge copies the pristine bits back."""
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24, dtype="bfloat16")
    mods = bind_modules(rt, dtype=torch.bfloat16)
    pristine = _snapshot(mods)
    order = ["alpha-r4", "beta-r8", "gamma-r16", None, "gamma-r16", "alpha-r4", None]
    for i in range(3 * len(order)):
        rt.merge(order[i % len(order)])
        with rt.step([None, "beta-r8"]):
            pass
        if rt.merged() is not None:
            assert any(not torch.equal(m.weight, pristine[p]) for p, m in mods.items())
    rt.merge(None)
    for p, m in mods.items():
        assert torch.equal(m.weight, pristine[p]), p
    # the test can fail: unmerging by subtraction would leave rounding behind
    w = pristine["model.layers.0.self_attn.q_proj"].float()
    d = delta_w(Reference(rt.catalog, "alpha-r4"), "model.layers.0.self_attn.q_proj")
    assert not torch.equal(((w + d).bfloat16().float() - d).bfloat16(), w.bfloat16())


def test_correction_over_max_rank_is_refused_clearly(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=16)
    bind_modules(rt)
    rt.merge("alpha-r4")
    with pytest.raises(CapacityError, match=r"'gamma-r16'.*'alpha-r4'.*o_proj.*16 \+ 4 = 20.*max_rank=16"):
        rt.plan(["gamma-r16"])
    with rt.step([None, "beta-r8", "alpha-r4"]) as plan:  # 8 + 4 fits: the others are still served
        assert plan.request_slots[2] == -1
    assert rt.merge(None, timeout=1.0) is None  # the refused plan left nothing active behind


def test_unmergeable_modules_are_refused_by_name(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24)
    q0 = "model.layers.0.self_attn.q_proj"

    class QuantLinear(nn.Linear):
        pass

    cases = [
        (lambda kind, sl: QuantLinear(sl.in_features, sl.out_features) if sl.peft_module == q0 else _plain(kind, sl),
         r"'alpha-r4'.*self_attn.q_proj is a QuantLinear"),
        (None, r"'alpha-r4'.*self_attn.q_proj has Tensor weights of dtype torch.float8_e4m3fn"),
    ]
    for make, msg in cases:
        mods = bind_modules(rt, make=make)
        if make is None:
            mods[q0].weight.data = mods[q0].weight.data.to(torch.float8_e4m3fn)
        pristine = _snapshot(mods)
        with pytest.raises(ConfigError, match=msg):
            rt.merge("alpha-r4")
        assert rt.merged() is None and all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())
        assert rt.merge("gamma-r16") is not None  # gamma does not target q_proj: nothing in its way
        rt.merge(None)
    rt.bind_base(rt.targets[0], [None])  # embed_tokens: no base weight known
    with pytest.raises(ConfigError, match="'beta-r8'.*model.embed_tokens has no base weight bound"):
        rt.merge("beta-r8")


def test_switch_waits_for_plans_in_flight(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24)
    mods = bind_modules(rt)
    pristine = _snapshot(mods)
    plan = rt.plan(["gamma-r16", None])
    with pytest.raises(CapacityError, match="in flight"):
        rt.merge("alpha-r4", timeout=0.2)
    assert rt.merged() is None and all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())
    rt.release(plan)
    assert rt.merge("alpha-r4") is not None


def test_switch_reloads_pinned_adapters_and_keeps_a_slot_for_base_requests(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=2, max_rank=24)
    bind_modules(rt)
    rt.pin("gamma-r16")
    rt.merge("alpha-r4")
    assert rt.slot_of("gamma-r16") is not None  # resident again, now holding its correction
    assert rt.stats()["gpu"]["keys"][rt.slot_of("gamma-r16")] == rt.catalog.get("gamma-r16").key
    with pytest.raises(CapacityError, match="pinned already.*one slot for the merged correction"):
        rt.pin("beta-r8")
    rt.merge(None)
    rt.pin("beta-r8")
    with pytest.raises(CapacityError, match="every GPU slot is pinned"):
        rt.merge("alpha-r4")


def test_republished_merged_adapter_is_merged_again(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=4, max_rank=24)
    mods = bind_modules(rt)
    pristine = _snapshot(mods)
    cat = rt.catalog
    old = Reference(cat, "alpha-r4")
    rt.merge("alpha-r4")
    w = catalog_dir / "alpha-r4" / "adapter_model.safetensors"
    write_weights(w, w, seed=5, scale=0.5)
    assert cat.refresh().changed == ("alpha-r4",)
    new = Reference(cat, "alpha-r4")
    for _ in range(100):  # the new version is loaded in the background; every step is exact meanwhile
        with rt.step(["alpha-r4", None]) as plan:
            own, base = plan.request_slots
            want = {base: (None, old if plan.merged == old.entry.key else new)}
            if own >= 0:  # before the switch: new version through its correction against the old merge
                assert plan.merged == old.entry.key
                want[own] = (new, old)
            _check_slots(rt, plan, want)
        if rt.merged() == new.entry.key:
            break
    assert rt.merged() == new.entry.key
    for path, m in mods.items():  # merged again from the pristine weights, not on top of the old merge
        d = delta_w(new, path)
        torch.testing.assert_close(m.weight, pristine[path] + (0 if d is None else d), atol=1e-5, rtol=1e-5)
    shutil.rmtree(catalog_dir / "alpha-r4")
    cat.refresh()
    with rt.step([None]):
        pass  # the unmerge runs at this step's boundary (the removed adapter needs no load)
    assert rt.merged() is None and all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())
