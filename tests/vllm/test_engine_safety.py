"""vllm.LLM with vLLM's prefix cache on (its default when serving): an adapter republished under the
same name must never be served with KV blocks computed by its old weights, unchanged adapters keep
their prefix-cache hits, and an adapter with bad weights (NaN) is refused by name without changing
any other request's output. Greedy tokens are checked against transformers + PEFT (fp32)."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import hf_greedy, in_process_engine, poisoned_copy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32
# 100 token ids: three full KV blocks of 32 plus a partial one, so a repeated prompt hits the cache
LONG = [1] + [(7 * i + 3) % 250 + 4 for i in range(99)]
SHORT = [1, 17, 42, 99, 7]
GEN = 6


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "prefix", max_loras=2,
                                 max_cpu_loras=2, max_model_len=160, max_num_batched_tokens=512,
                                 enable_prefix_caching=True, block_size=BLOCK)


def _run(engine, name, prompt):
    """(greedy tokens, prompt tokens served from the prefix cache) of one request."""
    from vllm import SamplingParams

    from loraplex.vllm_plugin import lora_request

    sp = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True)
    req = None if name is None else lora_request(name)
    (out,) = engine.llm.generate([{"prompt_token_ids": list(prompt)}], sp, lora_request=req, use_tqdm=False)
    return list(out.outputs[0].token_ids), out.num_cached_tokens or 0


def _manager(engine, method, *args, **kwargs):
    from loraplex.vllm_plugin.worker_manager import call_worker_manager

    (result,) = call_worker_manager(engine.llm, method, *args, **kwargs)
    return result


def _publish(engine, src, name, tmp):
    """Replace catalog adapter `name` by a copy of `src` with renames (readers never see a torn copy)."""
    staged = tmp / f"new-{name}"
    shutil.copytree(src, staged)
    if (engine.catalog / name).exists():
        os.rename(engine.catalog / name, tmp / f"old-{name}")
    os.rename(staged, engine.catalog / name)


def test_unchanged_adapter_keeps_prefix_cache_hits(engine):
    expected = hf_greedy(engine.model, engine.catalog / "beta-r8", LONG, GEN)
    first, _ = _run(engine, "beta-r8", LONG)
    again, cached = _run(engine, "beta-r8", LONG)
    assert first == again == expected
    assert cached >= 3 * BLOCK, f"only {cached} prompt tokens came from the prefix cache"


def test_republished_adapter_never_reuses_old_kv(engine, tmp_path):
    _publish(engine, engine.catalog / "alpha-r4", "swap", tmp_path)
    v1 = hf_greedy(engine.model, engine.catalog / "alpha-r4", LONG, GEN)
    v2 = hf_greedy(engine.model, engine.catalog / "gamma-r16", LONG, GEN)
    assert v1 != v2, "the two versions must differ on this prompt, or the test proves nothing"
    assert _run(engine, "swap", LONG)[0] == v1
    assert _run(engine, "swap", LONG)[1] >= 3 * BLOCK  # v1's blocks are cached now
    _publish(engine, engine.catalog / "gamma-r16", "swap", tmp_path)
    assert _manager(engine, "refresh_storage_catalog").changed == ("swap",)
    loads = _manager(engine, "cache_sizes")["host"]["loads"]
    tokens, cached = _run(engine, "swap", LONG)
    assert tokens == v2, "served with KV blocks computed by the adapter's previous weights"
    assert cached == 0
    # the new version's own blocks are reused from now on
    tokens, cached = _run(engine, "swap", LONG)
    assert tokens == v2 and cached >= 3 * BLOCK
    # reloaded in place once, not at every step (vLLM #41482)
    assert _manager(engine, "cache_sizes")["host"]["loads"] == loads + 1


def test_nan_adapter_is_refused_and_harms_no_one(engine, tmp_path):
    from loraplex.errors import InvalidAdapter

    os.rename(poisoned_copy(engine.catalog / "alpha-r4", tmp_path / "poisoned"), engine.catalog / "poisoned")
    _manager(engine, "refresh_storage_catalog")

    with pytest.raises(Exception) as err:  # noqa: PT011 - vLLM may wrap the error; its text must say why
        _run(engine, "poisoned", SHORT)
    text = str(err.value)
    assert "poisoned" in text and "NaN" in text, text
    with pytest.raises(InvalidAdapter, match="poisoned"):
        _manager(engine, "load_multiple_adapters", ["poisoned"])
    # everyone else is served exactly as before, the base model included
    for name in (None, "beta-r8", "alpha-r4", None):
        src = None if name is None else engine.catalog / name
        for prompt in (SHORT, LONG):
            assert _run(engine, name, prompt)[0] == hf_greedy(engine.model, src, prompt, GEN), (name, prompt)


def test_queued_requests_adapters_load_before_they_are_scheduled(engine, tmp_path):
    """Two GPU slots, five new adapters: three requests wait in the scheduler while two run. Their
    adapters are announced when they enter the queue and loaded into the host cache meanwhile, so
    the steps that schedule them find them ready instead of waiting for storage."""
    from vllm import SamplingParams

    from loraplex.vllm_plugin import lora_request

    sources = ["alpha-r4", "beta-r8", "gamma-r16", "alpha-r4", "gamma-r16"]
    names = [f"queued-{i}" for i in range(len(sources))]
    for name, src in zip(names, sources, strict=True):
        _publish(engine, engine.catalog / src, name, tmp_path)
    before = _manager(engine, "cache_sizes")
    sp = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True)
    outs = engine.llm.generate([{"prompt_token_ids": SHORT}] * len(names), sp,
                               lora_request=[lora_request(n) for n in names], use_tqdm=False)
    after = _manager(engine, "cache_sizes")
    for out, src in zip(outs, sources, strict=True):
        assert list(out.outputs[0].token_ids) == hf_greedy(engine.model, engine.catalog / src, SHORT, GEN)
    assert after["queue_prefetches"] - before["queue_prefetches"] == len(names)
    assert after["host"]["loads"] - before["host"]["loads"] == len(names)  # each read from storage once
    # at most the first step's two adapters can still be in flight when their step starts
    assert after["host"]["misses"] - before["host"]["misses"] <= 2
