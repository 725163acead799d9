"""vLLM slabs: after SlabUploader places a slab, every stacked LoRA tensor of the slot equals what
vLLM's own add_adapter + activate_adapter (set_lora) writes for the same adapter, bit for bit, on a
real vLLM Llama (embedding, packed qkv / gate_up, o/down, lm_head) and real PEFT adapters of several
ranks; a miss is one host->device transfer of exactly the slab's bytes (stock counts printed)."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from loraplex.errors import CapacityError
from loraplex.runtime.arena import HostArena
from loraplex.runtime.host_cache import HostCache
from loraplex.runtime.policy import LRUPolicy
from loraplex.vllm_plugin.slab_layout import ALIGN, VllmSlab, VllmTargets, pack_into
from loraplex.vllm_plugin.slab_upload import SlabUploader

from . import inproc

pytestmark = pytest.mark.vllm

MAX_RANK = 32
NAMES = ["alpha-r4", "beta-r8", "gamma-r16", "delta-r32"]  # conftest's ADAPTERS + one at rank 32
_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def env(vllm_dist, tiny_model_dir, adapter_source, tmp_path_factory):
    from loraplex import toy

    root = tmp_path_factory.mktemp("slab-adapters")
    dirs = {n: adapter_source / n for n in NAMES[:3]}
    dirs["delta-r32"] = toy.make_adapter(tiny_model_dir, root / "delta-r32", r=32, alpha=16, seed=14)
    manager = inproc.build_manager(tiny_model_dir, max_loras=3, max_rank=MAX_RANK, lora_dtype=torch.bfloat16)
    targets = VllmTargets(manager)
    up = SlabUploader(targets)
    env = types.SimpleNamespace(manager=manager, targets=targets, up=up, dirs=dirs)
    up.reserve_staging(max(_slab(env, n).nbytes for n in NAMES))
    return env


def _lora(env, name):
    return inproc.load_lora(env.manager, env.dirs[name], next(_ids))


def _stock(env, name):
    """vLLM's own path on a fresh copy: (slot contents, the LoRAModel vLLM packed, copy counter)."""
    lora = _lora(env, name)
    counter = inproc.CopyCounter(inproc.device_side(env.manager, env.up))
    with counter:
        slot = inproc.stock_activate(env.manager, lora)
    state = inproc.slot_state(env.manager, slot)
    env.manager.remove_adapter(lora.id)
    env.up.forget(slot)  # vLLM's path wrote that slot: the rule the worker manager follows too
    return state, lora, counter


def _slab(env, name, lora=None, quant=None):
    lora = _lora(env, name) if lora is None else lora
    layout = env.targets.layout(name, lora, quant)
    buf = torch.full((layout.nbytes,), 0xFF, dtype=torch.uint8)  # garbage where pack writes nothing
    env.targets.pack(name, lora, layout, buf)
    return VllmSlab((name, "v1"), layout, buf)


def _assert_same(ours, stock, what):
    bad = [k for k in stock if not torch.equal(ours[k], stock[k])]
    assert not bad, f"{what}: stacked tensors differ from vLLM's set_lora in {bad[:4]}"


def _assert_zero_outside(env, slab, slot):
    """Outside each piece's block [:rows, :cols] the slot holds zeros, and modules the adapter skips
    are zero in that slot (padding never keeps a previous adapter)."""
    blocks = {(p.module, p.which, p.slice): (p.rows, p.cols) for p in slab.layout.pieces}
    for key, t in inproc.slot_state(env.manager, slot).items():
        t = t[0] if t.dim() == 3 else t
        r, c = blocks.get(key, (0, 0))
        mask = torch.ones_like(t, dtype=torch.bool)
        mask[:r, :c] = False
        assert not t[mask].any(), f"{key}: non-zero padding beyond the adapter's real rank"


@pytest.mark.parametrize("packed_by_vllm", [False, True], ids=["raw", "vllm-packed"])
@pytest.mark.parametrize("name", NAMES)
def test_placement_equals_set_lora(env, name, packed_by_vllm):
    stock, packed, _ = _stock(env, name)
    slab = _slab(env, name, packed if packed_by_vllm else None)
    env.up.upload(slab, 2)
    ours = inproc.slot_state(env.manager, 2)
    _assert_same(ours, stock, name)
    assert any(t.any() for t in ours.values())
    _assert_zero_outside(env, slab, 2)
    assert slab.layout.rank == int(name.split("-r")[1])


@pytest.mark.parametrize("quant", [None, "int8"])
def test_every_slab_byte_is_defined(env, quant):
    """The copy moves the whole slab: the alignment gaps between pieces are zero, not leftovers
    (int8: a 16-byte scale block per piece leaves gaps; bf16 pieces of this model fill whole lines)."""
    slab = _slab(env, "alpha-r4", quant=quant)
    elem = 1 if quant else 2
    free = torch.ones(slab.nbytes, dtype=torch.bool)
    for p in slab.layout.pieces:
        free[p.offset:p.offset + p.rows * p.cols * elem] = False
        if quant:
            free[p.scale_offset:p.scale_offset + 4 * p.rank] = False
    assert free.any() or not quant
    assert not slab.buffer[free].any()


def test_slot_reuse_smaller_rank_and_skipped_modules(env):
    # r16 after r32 in the same slot, then r4 (its q_proj at rank 2 inside a rank-4 qkv), r8 with the
    # embedding and lm_head (modules the others skip), and r32 again over all of them
    for name in ["delta-r32", "gamma-r16", "alpha-r4", "beta-r8", "delta-r32", "alpha-r4"]:
        stock, _, _ = _stock(env, name)
        slab = _slab(env, name)
        env.up.upload(slab, 1)
        _assert_same(inproc.slot_state(env.manager, 1), stock, f"{name} reusing slot 1")
        _assert_zero_outside(env, slab, 1)


def test_slot_written_by_vllm_is_zeroed_before_reuse(env):
    lora = _lora(env, "delta-r32")  # vLLM's path fills slot 0 at rank 32 (e.g. a warm-up dummy LoRA)
    slot = inproc.stock_activate(env.manager, lora)
    env.manager.remove_adapter(lora.id)
    env.up.forget(slot)
    slab = _slab(env, "alpha-r4")
    env.up.upload(slab, slot)
    stock, _, _ = _stock(env, "alpha-r4")
    _assert_same(inproc.slot_state(env.manager, slot), stock, "alpha-r4 over vLLM's rank-32 write")
    _assert_zero_outside(env, slab, slot)


@pytest.mark.parametrize("name", NAMES)
def test_one_transfer_of_the_slab_bytes_per_miss(env, name, capsys):
    _, _, stock = _stock(env, name)
    slab = _slab(env, name)
    ours = inproc.CopyCounter(inproc.device_side(env.manager, env.up))
    with ours:
        handle = env.up.upload(slab, 2)
    assert (ours.transfers, ours.transfer_bytes) == (1, slab.nbytes)
    assert handle.nbytes == slab.nbytes
    # the slab is the adapter at its real rank: the bytes set_lora copies, plus alignment gaps only
    assert stock.transfers == len(slab.layout.pieces)
    assert stock.transfer_bytes <= slab.nbytes < stock.transfer_bytes + ALIGN * len(slab.layout.pieces)
    with capsys.disabled():
        print(f"\n{name}: stock vLLM set_lora path: {stock.transfers} host->device copies, "
              f"{stock.transfer_bytes} bytes, {stock.fills} zero fills; loraplex slab: {ours.transfers} copy, "
              f"{ours.transfer_bytes} bytes, {ours.fills} zero fills")


def test_host_cache_holds_exact_slab_bytes(env):
    layouts = {n: env.targets.layout(n, _lora(env, n)) for n in NAMES}
    budget = HostArena.rounded(layouts["delta-r32"].nbytes) + HostArena.rounded(layouts["gamma-r16"].nbytes)
    arena = HostArena(budget, pin=False)
    cache = HostCache(budget, None, LRUPolicy(), arena=arena, wait_s=0.05)
    for name in NAMES + NAMES[::-1]:
        slab = pack_into(cache, (name, "v1"), env.targets, _lora(env, name))
        assert slab.nbytes == layouts[name].nbytes
        held = [cache.peek(k) for k in cache.keys()]
        assert cache.used_bytes == sum(HostArena.rounded(s.nbytes) for s in held)
        assert arena.nbytes - arena.free_bytes() == cache.used_bytes  # what is allocated is what is counted
        assert cache.peak_bytes <= budget
        # the bytes in the arena are the packed adapter (the arena view is the slab's buffer)
        assert slab.buffer.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
    assert cache.evictions > 0
    small = HostCache(1024, None, LRUPolicy(), arena=HostArena(1024, pin=False), wait_s=0.05)
    with pytest.raises(CapacityError, match="'gamma-r16'"):
        pack_into(small, ("gamma-r16", "v1"), env.targets, _lora(env, "gamma-r16"))
    assert small.used_bytes == small.reserved_bytes == 0


@pytest.mark.parametrize("name", NAMES)
def test_int8_slab_dequantizes_per_rank_component(env, name):
    stock, _, _ = _stock(env, name)
    slab = _slab(env, name, quant="int8")
    assert slab.nbytes < _slab(env, name).nbytes
    env.up.upload(slab, 2)
    ours = inproc.slot_state(env.manager, 2)
    for p in slab.layout.pieces:
        key = (p.module, p.which, p.slice)
        x = stock[key][0] if stock[key].dim() == 3 else stock[key]
        x = x[:p.rows, :p.cols].float()
        amax = x.abs().amax(dim=1 - p.rank_dim, keepdim=True)  # one scale per rank component
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        ref = (torch.round(x / s).clamp(-127, 127) * s).to(torch.bfloat16)
        got = ours[key][0] if ours[key].dim() == 3 else ours[key]
        assert torch.equal(got[:p.rows, :p.cols], ref), key
        err = (got[:p.rows, :p.cols].float() - x).abs()
        assert (err <= s / 2 * (1 + 2**-8) + x.abs() * 2**-8).all(), key  # rounding to int8, then to bf16
    _assert_zero_outside(env, slab, 2)


def test_uncovered_module_keeps_vllm_path(env):
    """A layer class slabs do not know (here: a subclass overriding set_lora) is left to vLLM."""
    name = "model.layers.0.self_attn.o_proj"
    module = env.manager.modules[name]
    cls = type(module)
    module.__class__ = type("CustomSetLoRA", (cls,), {"set_lora": lambda self, *a, **k: cls.set_lora(self, *a, **k)})
    try:
        targets = VllmTargets(env.manager)
        up = SlabUploader(targets)
        assert targets.uncovered == (name,) and name not in targets.kinds
        stock, _, _ = _stock(env, "gamma-r16")
        lora = _lora(env, "gamma-r16")
        layout = targets.layout("gamma-r16", lora)
        assert all(p.module != name for p in layout.pieces)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        targets.pack("gamma-r16", lora, layout, buf)
        up.upload(VllmSlab(("gamma-r16", "v1"), layout, buf), 2)
        env.manager._create_merged_loras_inplace(lora)  # vLLM's set_lora takes what add_adapter leaves
        shell = targets.shell(lora)  # what vLLM's CPU cache keeps: the uncovered module's weights only
        assert list(shell.loras) == [name]
        up.place_uncovered(shell, 2)
        _assert_same(inproc.slot_state(env.manager, 2), stock, "slab + vLLM path for the uncovered module")
    finally:
        module.__class__ = cls
    env.up.forget(2)  # slot 2 was written by another uploader


def test_tensor_parallel_shard_equals_set_lora(vllm_dist):
    """Rank 1 of 2: the slab holds the shard the layer's own slice_lora_a/slice_lora_b cut."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    lc = LoRAConfig(max_lora_rank=8, max_loras=2, lora_dtype=torch.float32)
    row = RowParallelLinearWithLoRA(RowParallelLinear(64, 32, bias=False, params_dtype=torch.float32))
    gu = MergedColumnParallelLinearWithLoRA(MergedColumnParallelLinear(32, [48, 48], bias=False,
                                                                       params_dtype=torch.float32))
    for layer in (row, gu):
        layer.create_lora_weights(2, lc)
        layer.tp_size, layer.tp_rank = 2, 1  # this worker holds the second half of the full weights
    gu.output_ids = (1, 1)
    g = torch.Generator().manual_seed(7)

    def w(*shape):
        return torch.randn(*shape, generator=g)

    row_lora = LoRALayerWeights("row", 5, 10, w(5, 128), w(32, 5))  # full in_features = 2 x 64
    parts = [LoRALayerWeights(n, 6, 3, w(6, 32), w(96, 6)) for n in ("gate", "up")]  # full out = 2 x 48
    lora = LoRAModel(1, 6, {"row": row_lora, **{p.module_name: p for p in parts}})
    manager = types.SimpleNamespace(modules={"row": row, "gu": gu}, packed_modules={"gu": ["gate", "up"]},
                                    lora_config=lc, _get_lora_layer_weights=lambda m, n: m.get_lora(n))
    targets = VllmTargets(manager)
    layout = targets.layout("tp", lora)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    targets.pack("tp", lora, layout, buf)
    SlabUploader(targets).upload(VllmSlab(("tp", "v1"), layout, buf), 1)

    row_lora.optimize()
    row.set_lora(0, row_lora.lora_a, row_lora.lora_b)
    packed = PackedLoRALayerWeights.pack(parts)
    gu.set_lora(0, packed.lora_a, packed.lora_b)
    for layer in (row, gu):
        for t in list(layer.lora_a_stacked) + list(layer.lora_b_stacked):
            assert torch.equal(t[1], t[0])
    assert torch.equal(row.lora_a_stacked[0][1, 0, :5], row_lora.lora_a[:, 64:])


def test_shell_holds_no_covered_weights_and_staging_fits_every_slab(env):
    lora = _lora(env, "beta-r8")
    shell = env.targets.shell(lora)
    assert shell.id == lora.id and shell.rank == lora.rank and not shell.loras  # Llama: every module covered
    for quant in (None, "int8"):
        top = env.targets.max_nbytes(quant)
        assert all(_slab(env, n, quant=quant).nbytes <= top for n in NAMES)


def test_int8_is_opt_in(env):
    from loraplex.config import RuntimeConfig
    from loraplex.errors import ConfigError

    assert RuntimeConfig().host_slab_quant is None
    assert RuntimeConfig(host_slab_quant="int8").host_slab_quant == "int8"
    with pytest.raises(ConfigError, match="host_slab_quant"):
        RuntimeConfig(host_slab_quant="int4")
    with pytest.raises(ValueError, match="int4"):
        env.targets.layout("alpha-r4", _lora(env, "alpha-r4"), "int4")
