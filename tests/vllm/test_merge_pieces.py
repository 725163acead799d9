"""Merged mode under vLLM, the pieces without an engine, on a real vLLM Llama's LoRA layers and real PEFT
adapters: a slot uploaded under a correction holds [A_X; A_M], [B_X, -B_M] per slice and zeros elsewhere
(runtime/merged.stack_correction is the reference); the base slot holds M's pieces alone; a merge writes
W + B@A (fp32, rounded once) into the base weights and any number of switches restore them bit for bit;
layers that cannot take a merge are refused by name; the graph-dispatch count and the settings."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from loraplex.errors import ConfigError
from loraplex.runtime.merged import stack_correction
from loraplex.vllm_plugin.merge_config import MergeSettings, serving_lora_config, settings
from loraplex.vllm_plugin.merge_weights import BaseMerger, check_layers, correction_slab, why_not_mergeable
from loraplex.vllm_plugin.slab_layout import VllmSlab, VllmTargets, piece_view
from loraplex.vllm_plugin.slab_upload import SlabUploader
from loraplex.vllm_plugin.worker_merge import dispatch_count

from . import inproc

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]  # no engine: also run on 0.33's sources

MAX_RANK = 32
_ids = itertools.count(2000)


@pytest.fixture(scope="module")
def env(vllm_dist, tiny_model_dir, adapter_source):
    manager = inproc.build_manager(tiny_model_dir, max_loras=3, max_rank=MAX_RANK, lora_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for m in manager.modules.values():  # the weights are left as allocated: give them values
        w = getattr(getattr(m, "base_layer", None), "weight", None)
        if w is not None and w.dim() == 2:
            w.data.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    targets = VllmTargets(manager)
    up = SlabUploader(targets)
    up.reserve_staging(targets.max_nbytes())
    return types.SimpleNamespace(manager=manager, targets=targets, up=up, dirs=adapter_source)


def _slab(env, name, quant=None):
    lora = inproc.load_lora(env.manager, env.dirs / name, next(_ids))
    layout = env.targets.layout(name, lora, quant)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    env.targets.pack(name, lora, layout, buf)
    return VllmSlab((name, "v1"), layout, buf)


def _pieces(slab):
    """(module, slice) -> (A [r, K], B [N, r]) of a slab (int8 pieces dequantized)."""
    out = {}
    for p in slab.layout.pieces:
        v, s = piece_view(slab.buffer, p, slab.layout.dtype, slab.layout.quant)
        if s is not None:
            v = v.float() * (s.view(-1, 1) if p.rank_dim == 0 else s.view(1, -1))
        out.setdefault((p.module, p.slice), [None, None])["AB".index(p.which)] = v.float()
    return {k: tuple(v) for k, v in out.items()}


def _expected_slot(env, own, merged):
    """{(module, which, slice): expected slot block} from stack_correction per slice (merged: M's own
    slab, which stack_correction negates)."""
    out = {}
    o, m = ({} if own is None else _pieces(own)), _pieces(merged)
    for key in o.keys() | m.keys():
        a, b = stack_correction(o.get(key), m.get(key))
        out[(key[0], "A", key[1])], out[(key[0], "B", key[1])] = a, b
    return out


def _assert_slot(env, slot, expected):
    for key, t in inproc.slot_state(env.manager, slot).items():
        t = (t[0] if t.dim() == 3 else t).float()
        want = torch.zeros_like(t)
        if key in expected:
            e = expected[key]
            want[:e.shape[0], :e.shape[1]] = e
        assert torch.equal(t, want), f"slot {slot} {key}: not [own; merged] with zeros elsewhere"


@pytest.mark.parametrize("own,merged", [("gamma-r16", "alpha-r4"), ("alpha-r4", "gamma-r16"), ("beta-r8", "alpha-r4"),
                                        (None, "alpha-r4"), ("alpha-r4", "alpha-r4")])
def test_upload_appends_the_correction(env, own, merged):
    m_slab = _slab(env, merged)
    m = correction_slab(m_slab, pin=False)
    x = None if own is None else _slab(env, own)
    env.up.forget(1)
    env.up.upload(_slab(env, "gamma-r16"), 1)  # a wider previous occupant: its leftovers must go
    env.up.set_correction(m)
    try:
        env.up.upload(x, 1)
        _assert_slot(env, 1, _expected_slot(env, x, m_slab))
        assert env.up.slot_rank(None if x is None else x.layout) == max(
            b.shape[1] for _, b in [stack_correction(*p) for p in _pairs(x, m_slab)])  # B: [N, r] in every kind
    finally:
        env.up.set_correction(None)
    env.up.upload(_slab(env, "beta-r8"), 1)  # no correction any more: nothing of it stays behind
    _assert_slot(env, 1, {(k[0], w, k[1]): v for k, (a, b) in _pieces(_slab(env, "beta-r8")).items()
                          for w, v in (("A", a), ("B", b))})


def _pairs(x, m):
    o, mm = ({} if x is None else _pieces(x)), _pieces(m)
    return [(o.get(k), mm.get(k)) for k in o.keys() | mm.keys()]


def test_int8_slab_gets_its_correction_dequantized(env):
    m8 = _slab(env, "alpha-r4", quant="int8")
    corr = correction_slab(m8, pin=False)
    assert corr.layout.quant is None
    for key, (a, b) in _pieces(m8).items():
        ca, cb = _pieces(corr)[key]
        assert torch.equal(ca, a) and torch.equal(cb, -b)


def _weights(env):
    return {name: m.base_layer.weight.data.clone() for name, m in env.manager.modules.items()
            if env.targets.kinds.get(name) in ("single", "merged")}


def test_merge_writes_w_plus_ba_and_switches_restore_bit_for_bit(env):
    merger = BaseMerger(env.targets, pin=False)
    before = _weights(env)
    slabs = {n: _slab(env, n) for n in ("alpha-r4", "gamma-r16")}
    for name in ["alpha-r4", "gamma-r16", "alpha-r4", "gamma-r16", None, "alpha-r4", None]:
        corr = None if name is None else correction_slab(slabs[name], pin=False)
        if corr is not None:
            merger.check(name, corr)
        merger.apply(corr)
        pieces = {} if name is None else _pieces(slabs[name])
        for module, w in _weights(env).items():
            layer = env.manager.modules[module]
            want = before[module].clone()
            for si, width in enumerate(layer.output_slices):
                if (module, si) in pieces:
                    a, b = pieces[(module, si)]
                    lo = sum(layer.output_slices[:si])
                    want[lo:lo + width] = (before[module][lo:lo + width].float() + b @ a).to(want.dtype)
            assert torch.equal(w, want), f"{name}: {module} is not W + B@A (or not W restored bit for bit)"
    assert merger.pristine_bytes == 0  # unmerged: no copies kept


def test_refusals_name_the_module(env):
    merger = BaseMerger(env.targets, pin=False)
    with pytest.raises(ConfigError, match="embed_tokens|lm_head"):  # beta-r8 also targets the embedding, lm_head
        merger.check("beta-r8", correction_slab(_slab(env, "beta-r8"), pin=False))
    name, layer = next((n, m) for n, m in env.manager.modules.items() if env.targets.kinds.get(n) == "single")
    kind = env.targets.kinds[name]
    assert why_not_mergeable(layer, kind) is None
    w = layer.base_layer.weight
    saved = w.data
    try:
        w.data = saved.to(torch.int8)  # what a quantized checkpoint holds
        assert "not a plain float matrix" in why_not_mergeable(layer, kind)
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            check_layers(env.targets)
    finally:
        w.data = saved
    from vllm.model_executor.layers.linear import LinearMethodBase

    class PackedInt4(LinearMethodBase):  # any quantization method other than vLLM's unquantized one
        def create_weights(self, *args, **kwargs):
            raise NotImplementedError

        def apply(self, *args, **kwargs):
            raise NotImplementedError

    method = layer.base_layer.quant_method
    layer.base_layer.quant_method = PackedInt4()
    try:
        assert "quantized base weights (PackedInt4)" in why_not_mergeable(layer, kind)
    finally:
        layer.base_layer.quant_method = method


def test_dispatch_count():
    assert dispatch_count([0, 0], None) == 0
    assert dispatch_count([7, 7, 9, 0], None) == 2
    assert dispatch_count([7, 7], 7) == 0  # only the merged adapter: vLLM's no-LoRA graphs
    assert dispatch_count([7, 0], 7) == 1  # the base rows need the correction slot
    assert dispatch_count([0], 7) == 1
    assert dispatch_count([7, 9, 11], 7) == 2


def test_v2_runner_dispatch_follows_the_merge():
    """vLLM 0.33's V2 model runner counts a batch's adapters in a module-level function: wrapped, it
    counts the merged adapter's requests as none and base requests as one (skipped on 0.32)."""
    lora_utils = pytest.importorskip("vllm.v1.worker.gpu.lora_utils")
    from vllm.lora.request import LoRARequest

    from loraplex.vllm_plugin import worker_merge

    state = lora_utils.LoraState(max_num_reqs=4)
    m, x = LoRARequest("m", 7, "/m"), LoRARequest("x", 9, "/x")
    for i, (rid, req) in enumerate([("a", m), ("b", m), ("c", None), ("d", x)]):
        state.add_request(rid, i, req)
    wrapped = worker_merge._wrap_v2_dispatch(lora_utils.get_num_active_loras_for_dispatch)
    cfg = types.SimpleNamespace(max_loras=4)
    assert wrapped(cfg, state, ["a", "b", "c", "d"], False) == 2  # unmerged: vLLM's own count
    worker_merge._merged_id[0] = 7
    try:
        assert wrapped(cfg, state, ["a", "b"], False) == 0
        assert wrapped(cfg, state, ["a", "c"], False) == 1
        assert wrapped(cfg, state, ["a", "b", "c", "d"], False) == 2
        assert wrapped(cfg, state, ["a"], True) == 5  # dummy runs keep vLLM's count
    finally:
        worker_merge._merged_id[0] = None


def test_settings_and_the_served_rank_limit():
    from vllm.config import LoRAConfig

    assert not settings({}).enabled
    s = settings({"LORAPLEX_MERGE": "main"})
    assert s.pinned == "main" and s.merge_rank(32) == 16 and s.serve_rank(32) == 16
    auto = settings({"LORAPLEX_MERGE_AUTO": "window=8,threshold=0.6,hysteresis=0.2", "LORAPLEX_MERGE_RANK": "8"}).auto
    assert (auto.window_steps, auto.threshold, auto.hysteresis) == (8, 0.6, 0.2)
    assert settings({"LORAPLEX_MERGE_AUTO": "1"}).auto is not None
    with pytest.raises(ConfigError, match="set one of them"):
        settings({"LORAPLEX_MERGE": "a", "LORAPLEX_MERGE_AUTO": "1"})
    with pytest.raises(ConfigError, match="LORAPLEX_MERGE_AUTO"):
        settings({"LORAPLEX_MERGE_AUTO": "threshold"})
    with pytest.raises(ConfigError, match="LORAPLEX_MERGE_RANK"):
        MergeSettings(pinned="a", rank=32).merge_rank(32)
    lc = LoRAConfig(max_lora_rank=32, max_loras=2)
    assert serving_lora_config(lc, {}) is lc
    limited = serving_lora_config(lc, {"LORAPLEX_MERGE": "a", "LORAPLEX_MERGE_RANK": "8"})
    assert limited.max_lora_rank == 24 and lc.max_lora_rank == 32
