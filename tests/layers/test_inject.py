"""inject() on a real transformers Llama with real PEFT adapters: mixed batches (with and without an
adapter) must give the logits and greedy tokens of transformers+PEFT run per request."""

import pytest
import torch

from loraplex import Catalog, RuntimeConfig
from loraplex.layers import inject

# |ours - fp32 reference| <= atol + rtol * max|reference| on logits, per dtype. bf16 keeps 8 bits of
# mantissa and the rsLoRA adapter with embedding + lm_head LoRA drives logits to ~170, where one bf16
# step is 1.0; PEFT itself run in bf16 is off by ~0.6 there.
TOL = {torch.float32: (1e-4, 0.0), torch.bfloat16: (2e-2, 2e-2)}
NAMES = [None, "alpha-r4", "beta-r8", "gamma-r16", "alpha-r4", None, "beta-r8"]


@pytest.fixture(scope="module")
def catalog(adapter_source):
    return Catalog(adapter_source)


def _prompts(n, length, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, length), generator=g)


_REF_MODELS = {}


def _reference_logits(model_dir, catalog, name, ids, dtype):
    """transformers (+ PEFT when name is not None), one request at a time."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    key = (str(model_dir), name, dtype)
    if key not in _REF_MODELS:
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        _REF_MODELS[key] = base if name is None else PeftModel.from_pretrained(base, catalog.get(name).path).eval()
    with torch.no_grad():
        return _REF_MODELS[key](ids).logits


def _ours(model_dir, catalog, dtype, max_loras=4):
    from transformers import LlamaForCausalLM

    from loraplex import Runtime

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rt = Runtime(catalog, RuntimeConfig(max_loras=max_loras, max_rank=16, dtype=str(dtype).split(".")[1],
                                        device="cpu", host_cache_bytes=64 << 20))
    return inject(model, rt), rt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_logits_equal_peft(tiny_model_dir, catalog, dtype):
    ids = _prompts(len(NAMES), 6)
    lm, _ = _ours(tiny_model_dir, catalog, dtype)
    with torch.no_grad(), lm.step(NAMES, [ids.shape[1]] * len(NAMES)):
        got = lm.model(ids).logits.float()
    refs = {}
    atol, rtol = TOL[dtype]
    for i, name in enumerate(NAMES):
        if name not in refs:
            refs[name] = _reference_logits(tiny_model_dir, catalog, name, ids, torch.float32)
        ref = refs[name][i]
        err = (got[i] - ref).abs().max().item()
        assert err <= atol + rtol * ref.abs().max().item(), f"request {i} ({name}): max logit error {err}"
    # the adapters really change the output, so equality above is not trivially met
    assert (refs["alpha-r4"] - refs[None]).abs().max() > 0.1


def test_no_plan_is_the_base_model(tiny_model_dir, catalog):
    ids = _prompts(2, 5)
    lm, _ = _ours(tiny_model_dir, catalog, torch.float32)
    with torch.no_grad():
        got = lm.model(ids).logits
    ref = _reference_logits(tiny_model_dir, catalog, None, ids, torch.float32)
    assert torch.equal(got, ref)


def test_greedy_tokens_equal_peft_with_kv_cache(tiny_model_dir, catalog):
    """Prefill then decode with HF's KV cache: the decode steps see one row per request, and the
    lm_head keeps only the last position, so the per-request plan path is exercised too."""
    names = ["gamma-r16", None, "beta-r8", "alpha-r4"]
    steps, plen = 5, 4
    ids = _prompts(len(names), plen, seed=3)
    lm, _ = _ours(tiny_model_dir, catalog, torch.float32, max_loras=3)
    model = lm.model
    out = ids
    with torch.no_grad():
        with lm.step(names, [plen] * len(names)):
            res = model(ids, use_cache=True, logits_to_keep=1)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        for _ in range(steps - 1):
            with lm.step(names, [1] * len(names)):
                res = model(nxt, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    for i, name in enumerate(names):
        want = ids[i : i + 1]
        for _ in range(steps):  # the reference: full forward per step, per request
            logits = _reference_logits(tiny_model_dir, catalog, name, want, torch.float32)
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert out[i].tolist() == want[0].tolist(), f"request {i} ({name})"


def test_plan_row_mismatch_is_a_clear_error(tiny_model_dir, catalog):
    from loraplex.errors import LaunchError

    lm, _ = _ours(tiny_model_dir, catalog, torch.float32)
    ids = _prompts(2, 5)
    with pytest.raises(LaunchError, match="rows"), torch.no_grad(), lm.step(["alpha-r4", None], [3, 3]):
        lm.model(ids)
