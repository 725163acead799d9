"""Merged mode through inject() on the tiny Llama: logits and greedy tokens equal transformers+PEFT for the
merged adapter, the other adapters and the base model, in mixed batches, across switches; the merged
adapter pinned by config or $LORAPLEX_MERGE; refusals for quantized, custom and tied modules.

Tolerance (fp32): |ours − PEFT| <= 1e-4 + 2e-5·S per row, S = the largest |logit| of the row's own
reference and of the merged adapter's on the same prompt. Requests that undo the merged adapter cancel
its contribution, so their rounding error scales with it, not with their own logits; the session's
adapters (B scaled by 20) change the weights by 85 to 15000 times their norm, so S reaches ~170
(beta-r8's lm_head) and the worst error seen is 8e-6·S (~70 fp32 ulps of S).
"""

import pytest
import torch

from loraplex import Catalog, ConfigError, RuntimeConfig
from loraplex.layers import inject

from .test_inject import NAMES, _prompts, _reference_logits

MERGE_TOL = {torch.float32: (1e-4, 2e-5)}


@pytest.fixture(scope="module")
def catalog(adapter_source):
    return Catalog(adapter_source)


def _ours(model_dir, catalog, dtype=torch.float32, max_loras=4, max_rank=24, **cfg):
    from transformers import LlamaForCausalLM

    from loraplex import Runtime

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rt = Runtime(catalog, RuntimeConfig(max_loras=max_loras, max_rank=max_rank, dtype=str(dtype).split(".")[1],
                                        device="cpu", host_cache_bytes=64 << 20, **cfg))
    return inject(model, rt), rt


def refs_for(model_dir, catalog, ids, names):
    return {n: _reference_logits(model_dir, catalog, n, ids, torch.float32) for n in set(names)}


def assert_rows_equal(got, refs, names, merged, dtype=torch.float32, what=""):
    atol, rtol = MERGE_TOL[dtype]
    for i, name in enumerate(names):
        ref = refs[name][i]
        scale = max(ref.abs().max().item(), 0.0 if merged is None else refs[merged][i].abs().max().item())
        err = (got[i].float() - ref).abs().max().item()
        assert err <= atol + rtol * scale, f"{what} request {i} ({name}), merged {merged}: max logit error {err}"


def _count_lora_ops(monkeypatch):
    """Count the LoRA ops the layers call (each still runs)."""
    from loraplex.kernels import ops

    calls = []
    for name in ("add_lora_linear", "add_lora_embedding", "sgmv_shrink", "sgmv_expand"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    return calls


def test_mixed_batches_equal_peft_across_switches(tiny_model_dir, catalog, monkeypatch):
    ids = _prompts(len(NAMES), 6)
    lm, rt = _ours(tiny_model_dir, catalog)
    refs = refs_for(tiny_model_dir, catalog, ids, NAMES)
    calls = _count_lora_ops(monkeypatch)
    for merged in (None, "alpha-r4", "beta-r8", None):  # beta: embed_tokens and lm_head merged too
        rt.merge(merged)
        with torch.no_grad(), lm.step(NAMES, [ids.shape[1]] * len(NAMES)) as plan:
            got = lm.model(ids).logits
        assert [s == -1 for s in plan.request_slots] == [n == merged for n in NAMES]  # base rows: a slot if merged
        assert_rows_equal(got, refs, NAMES, merged)
        if merged is not None:  # a batch of the merged adapter alone runs no LoRA at all
            rows = [i for i, n in enumerate(NAMES) if n == merged]
            assert calls
            calls.clear()
            with torch.no_grad(), lm.step([merged] * len(rows), [ids.shape[1]] * len(rows)) as plan:
                assert plan.max_active == 0
                got = lm.model(ids[rows]).logits
            assert not calls  # the plain base layers: no LoRA op called at all
            assert_rows_equal(got, {merged: refs[merged][rows]}, [merged] * len(rows), merged)
    assert (refs["alpha-r4"] - refs[None]).abs().max() > 0.1  # the adapters do change the output


def test_greedy_tokens_equal_peft_across_two_switches(tiny_model_dir, catalog):
    """Prefill with alpha merged, decode with HF's KV cache, switch to gamma after 2 decode steps and
    unmerge after 4: every request's tokens are PEFT's. The KV cached before a switch stays valid (each
    request was served exactly either way)."""
    names = ["gamma-r16", None, "beta-r8", "alpha-r4"]
    steps, plen = 7, 4
    ids = _prompts(len(names), plen, seed=3)
    lm, rt = _ours(tiny_model_dir, catalog, max_loras=4)
    model = lm.model
    rt.merge("alpha-r4")
    out = ids
    with torch.no_grad():
        with lm.step(names, [plen] * len(names)):
            res = model(ids, use_cache=True, logits_to_keep=1)
        for step in range(1, steps):
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            if step in (2, 4):
                rt.merge({2: "gamma-r16", 4: None}[step])
            with lm.step(names, [1] * len(names)):
                res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
        out = torch.cat([out, res.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert rt.stats()["merge"]["switches"] == 3
    for i, name in enumerate(names):
        want = ids[i:i + 1]
        for _ in range(steps):
            logits = _reference_logits(tiny_model_dir, catalog, name, want, torch.float32)
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert out[i].tolist() == want[0].tolist(), f"request {i} ({name})"


def test_merged_adapter_pinned_by_config_or_environment(tiny_model_dir, catalog, monkeypatch):
    lm, rt = _ours(tiny_model_dir, catalog, merge_adapter="gamma-r16")
    assert rt.merged() == catalog.get("gamma-r16").key  # merged by inject()
    monkeypatch.setenv("LORAPLEX_MERGE", "alpha-r4")
    lm, rt = _ours(tiny_model_dir, catalog)
    assert rt.merged() == catalog.get("alpha-r4").key
    ids = _prompts(3, 5)
    with torch.no_grad(), lm.step(["alpha-r4", None, "gamma-r16"], [5] * 3):
        got = lm.model(ids).logits
    assert_rows_equal(got, refs_for(tiny_model_dir, catalog, ids, ["alpha-r4", None, "gamma-r16"]),
                      ["alpha-r4", None, "gamma-r16"], "alpha-r4")
    from loraplex.config import AutoMerge

    with pytest.raises(ConfigError, match="LORAPLEX_MERGE='alpha-r4'.*merge_auto"):
        _ours(tiny_model_dir, catalog, merge_auto=AutoMerge())


def test_quantized_custom_or_tied_modules_refuse_merged_mode(tiny_model_dir, catalog):
    from torch import nn

    lm, rt = _ours(tiny_model_dir, catalog)
    q0 = lm.model.model.layers[0].self_attn.q_proj.base
    q0.weight.data = q0.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match=r"'alpha-r4'.*module model.layers.0.self_attn.q_proj has Tensor weights "
                                          r"of dtype torch.float8_e4m3fn \(quantized"):
        rt.merge("alpha-r4")
    assert rt.merge("gamma-r16") is not None  # gamma leaves q_proj alone

    class Int8Linear(nn.Linear):  # what a quantization library's layer looks like to inject()
        pass

    lm, rt = _ours(tiny_model_dir, catalog, max_loras=4)
    down = lm.model.model.layers[1].mlp.down_proj
    down.base.__class__ = Int8Linear
    with pytest.raises(ConfigError, match="model.layers.1.mlp.down_proj is a Int8Linear, not a plain nn.Linear"):
        rt.merge("gamma-r16")
    assert rt.merged() is None

    from transformers import LlamaForCausalLM

    from loraplex import Runtime

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied embeddings
    rt = Runtime(catalog, RuntimeConfig(max_loras=4, max_rank=24, dtype="float32", device="cpu"))
    inject(model, rt)
    with pytest.raises(ConfigError, match="model.embed_tokens shares its weight with lm_head.weight"):
        rt.merge("beta-r8")
