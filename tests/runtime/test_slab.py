"""Slabs: layout from the header, packing straight from the file, validation, version checks."""

import os

import pytest
import torch

from loraplex import Catalog
from loraplex.catalog.reader import open_adapter
from loraplex.errors import AdapterChanged, InvalidAdapter
from loraplex.runtime import LoraTarget, SliceSpec
from loraplex.runtime.slab import Slab, allocate, pack, plan_layout
from loraplex.runtime.upload import Uploader

from .helpers import llama_target_specs, write_weights


def _targets(dtype=torch.float32, max_rank=16, max_loras=2):
    return [LoraTarget(n, s, k, max_loras, max_rank, dtype) for n, s, k in llama_target_specs()]


def _slab(cat, name, targets, max_rank=16, dtype=torch.float32, unmatched="warn"):
    entry = cat.get(name)
    with open_adapter(cat, name, entry) as reader:
        layout = plan_layout(name, entry.spec, reader.layout, targets, max_rank, dtype, unmatched)
        buf = allocate(layout, pin=False)
        pack(name, reader, layout, buf)
    return Slab(entry, layout, buf)


def test_layout_follows_targets_and_real_ranks(catalog_dir):
    cat = Catalog(catalog_dir)
    targets = _targets()
    slab = _slab(cat, "alpha-r4", targets)
    names = [t.name for t in targets]
    ranks = dict(zip(names, slab.layout.slice_ranks, strict=True))
    assert ranks["model.layers.0.qkv"] == (2, 4, 4)  # rank_pattern: layer 0 q_proj has rank 2
    assert ranks["model.layers.1.qkv"] == (4, 4, 4)
    assert ranks["embed_tokens"] == (0,) and ranks["lm_head"] == (0,)  # not targeted: rank 0
    assert slab.layout.target_ranks[names.index("model.layers.0.qkv")] == 4
    # pool order: targets in registration order, slices in order, A before B, each region aligned
    order = [(r.target, r.slice, r.which) for r in slab.layout.regions]
    assert order == sorted(order, key=lambda o: (o[0], o[1], o[2]))
    assert all(r.offset % 32 == 0 for r in slab.layout.regions)
    assert slab.nbytes == slab.layout.numel * 4
    real = sum(r.numel for r in slab.layout.regions)
    assert real <= slab.layout.numel < real + 32 * len(slab.layout.regions)


def test_packed_values_scaling_and_embedding(catalog_dir):
    cat = Catalog(catalog_dir)
    targets = _targets()
    for name in ("beta-r8", "gamma-r16"):
        entry, lay, tensors = cat.load_adapter(name)
        slab = _slab(cat, name, targets)
        for reg in slab.layout.regions:
            t = targets[reg.target]
            module = t.slices[reg.slice].peft_module
            src = tensors[reg.key].float()
            want = src.t() if reg.transpose else src
            if reg.which == "B":
                want = want * entry.spec.scaling_for(module)
            torch.testing.assert_close(slab.view(reg), want, rtol=0, atol=0)
    # rsLoRA (beta) and alpha_pattern (gamma's down_proj) give other scalings than alpha/r
    beta = cat.get("beta-r8").spec
    assert beta.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8 ** 0.5)
    gamma = cat.get("gamma-r16").spec
    assert gamma.scaling_for("model.layers.0.mlp.down_proj") == pytest.approx(8 / 16)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_upload_equals_reference_write_slot(catalog_dir, dtype, file_dtype):
    """The fast path (slab + scatter) writes exactly what LoraTarget.write_slot writes, for weights
    stored in fp32 or bf16 (a bf16 file into a bf16 target takes the no-upcast path)."""
    if file_dtype != torch.float32:
        from safetensors.torch import load_file, save_file

        for name in ("beta-r8", "gamma-r16"):
            w = str(catalog_dir / name / "adapter_model.safetensors")
            save_file({k: v.to(file_dtype) for k, v in load_file(w).items()}, w + ".tmp", metadata={"format": "pt"})
            os.replace(w + ".tmp", w)
    cat = Catalog(catalog_dir)
    fast, ref = _targets(dtype), _targets(dtype)
    up = Uploader(fast, "cpu")
    prev = tuple((0,) * len(t.slices) for t in fast)
    for slot, name in enumerate(("beta-r8", "gamma-r16")):
        slab = _slab(cat, name, fast, dtype=dtype)
        up.upload(slab, slot, prev)
        _, lay, tensors = cat.load_adapter(name)
        spec = cat.get(name).spec
        for t in ref:
            ws = []
            for sl in t.slices:
                mw = lay.get(sl.peft_module)
                s = spec.scaling_for(sl.peft_module)
                ws.append(None if mw is None else (tensors[mw.a_key], tensors[mw.b_key], s))
            t.write_slot(slot, ws)
    for a, b in zip(fast, ref, strict=True):
        for x, y in zip((*a.A, *a.B, a.ranks), (*b.A, *b.B, b.ranks), strict=True):
            assert torch.equal(x, y), a.name


def test_reused_slot_padding_is_zeroed(catalog_dir):
    """gamma (r16) then alpha (r4) in the same slot: nothing of gamma survives beyond rank 4."""
    cat = Catalog(catalog_dir)
    targets = _targets()
    up = Uploader(targets, "cpu")
    g = _slab(cat, "gamma-r16", targets)
    up.upload(g, 0, tuple((0,) * len(t.slices) for t in targets))
    a = _slab(cat, "alpha-r4", targets)
    up.upload(a, 0, g.layout.slice_ranks)
    for ti, t in enumerate(targets):
        for si in range(len(t.slices)):
            r = a.layout.slice_ranks[ti][si]
            if t.kind == "linear":
                assert not t.A[si][0, r:].any()
            assert not t.B[si][0, :, r:].any()
        assert int(t.ranks[0]) == a.layout.target_ranks[ti]


def test_rank_above_max_rank_is_invalid(catalog_dir):
    cat = Catalog(catalog_dir)
    with pytest.raises(InvalidAdapter, match=r"gamma-r16.*rank 16, larger than max_rank=8"):
        _slab(cat, "gamma-r16", _targets(max_rank=8), max_rank=8)


def test_shape_mismatch_is_invalid(catalog_dir):
    cat = Catalog(catalog_dir)
    bad = [LoraTarget("o", [SliceSpec("model.layers.0.self_attn.o_proj", 64, 96)], "linear", 2, 16, torch.float32)]
    with pytest.raises(InvalidAdapter, match=r"gamma-r16.*o_proj has \(in, out\) = \(64, 64\).*\(64, 96\)"):
        _slab(cat, "gamma-r16", bad)
    emb_as_linear = [LoraTarget("e", [SliceSpec("model.embed_tokens", 256, 64)], "linear", 2, 16, torch.float32)]
    with pytest.raises(InvalidAdapter, match="embedding LoRA weights but target e is linear"):
        _slab(cat, "beta-r8", emb_as_linear)


def test_unmatched_modules(catalog_dir):
    cat = Catalog(catalog_dir)
    only_qkv = [t for t in _targets() if t.name.endswith("qkv")]
    slab = _slab(cat, "beta-r8", only_qkv, unmatched="ignore")
    assert slab.layout.ignored == ("lm_head", "model.embed_tokens")
    with pytest.raises(InvalidAdapter, match="not wrapped by any registered LoRA target"):
        _slab(cat, "beta-r8", only_qkv, unmatched="error")
    with pytest.raises(InvalidAdapter, match="none of its modules"):
        _slab(cat, "gamma-r16", only_qkv, unmatched="ignore")


def test_reader_detects_change_under_the_read(catalog_dir):
    cat = Catalog(catalog_dir)
    entry = cat.get("alpha-r4")
    reader = open_adapter(cat, "alpha-r4", entry)
    key = next(iter(reader.layout.values())).a_key
    before = reader.tensor(key).clone()
    wfile = os.path.join(catalog_dir, "alpha-r4", "adapter_model.safetensors")
    write_weights(wfile, wfile, seed=5)
    # the open file still shows the version we opened (a replaced file keeps its old inode alive)...
    assert torch.equal(reader.tensor(key), before)
    # ...but the read is refused at close: the version changed
    with pytest.raises(AdapterChanged):
        reader.close()
    with pytest.raises(AdapterChanged), open_adapter(cat, "alpha-r4", entry):
        pass  # the catalog was not refreshed: the stale entry opens, and is refused at close
    cat.refresh()
    with open_adapter(cat, "alpha-r4") as r2:
        assert not torch.equal(r2.tensor(key), before)


def test_corrupt_and_missing_files(catalog_dir):
    cat = Catalog(catalog_dir)
    wfile = os.path.join(catalog_dir, "beta-r8", "adapter_model.safetensors")
    with open(wfile, "r+b") as f:  # keep size and inode: a header that no longer parses
        f.write(b"\xff" * 16)
    cat.refresh()
    with pytest.raises(InvalidAdapter, match="beta-r8.*corrupt"):
        open_adapter(cat, "beta-r8")
    entry = cat.get("gamma-r16")
    os.remove(os.path.join(catalog_dir, "gamma-r16", "adapter_model.safetensors"))
    with pytest.raises(AdapterChanged):  # gone under a stale entry: a change, so callers refresh
        open_adapter(cat, "gamma-r16", entry)


def test_nan_weights_are_invalid(catalog_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    cat = Catalog(catalog_dir)
    wfile = os.path.join(catalog_dir, "alpha-r4", "adapter_model.safetensors")
    t = load_file(wfile)
    k = sorted(t)[0]
    t[k][0, 0] = float("nan")
    save_file(t, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "w.safetensors", wfile)
    cat.refresh()
    with pytest.raises(InvalidAdapter, match=r"alpha-r4.*NaN"):
        _slab(cat, "alpha-r4", _targets())


def test_fp16_overflow_after_scaling_is_invalid(catalog_dir):
    cat = Catalog(catalog_dir)
    wfile = os.path.join(catalog_dir, "gamma-r16", "adapter_model.safetensors")
    write_weights(wfile, wfile, seed=3, scale=1e6)  # B * scaling beyond fp16's 65504
    cat.refresh()
    with pytest.raises(InvalidAdapter, match=r"gamma-r16.*beyond the range of torch.float16"):
        _slab(cat, "gamma-r16", _targets(torch.float16), dtype=torch.float16)
