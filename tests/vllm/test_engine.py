"""End to end: vllm.LLM on the tiny Llama with the plugin enabled and a catalog of real PEFT adapters.
Greedy tokens must equal transformers + PEFT (fp32, computed per request in tests/vllm/conftest.py),
in batches that mix adapters and requests without one, with more adapters over time than GPU slots,
and for an adapter added to the catalog after the engine started. One engine for the module."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from .conftest import GEN_TOKENS, PROMPTS, in_process_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_LORAS = 2  # GPU slots
MAX_CPU_LORAS = 2  # vLLM's own CPU cache; loraplex's host cache sits under it


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    # LORAPLEX_REFRESH_INTERVAL 0: tests add adapters and re-list at once
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "engine",
                                 env={"LORAPLEX_REFRESH_INTERVAL": "0"}, max_loras=MAX_LORAS,
                                 max_cpu_loras=MAX_CPU_LORAS, max_model_len=64, max_num_batched_tokens=256)


def _generate(engine, names, prompts=PROMPTS):
    from vllm import SamplingParams

    from loraplex.vllm_plugin import lora_request

    sp = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
    reqs = [None if n is None else lora_request(n) for n in names]
    outs = engine.llm.generate([{"prompt_token_ids": list(p)} for p in prompts[: len(names)]], sp,
                               lora_request=reqs, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _expected(engine, reference, names, prompts=PROMPTS):
    return [reference(None if n is None else engine.catalog / n, p) for n, p in zip(names, prompts, strict=False)]


def _manager(engine, method, *args, **kwargs):
    from loraplex.vllm_plugin.worker_manager import call_worker_manager

    (result,) = call_worker_manager(engine.llm, method, *args, **kwargs)
    return result


def test_engine_uses_loraplex(engine):
    def kinds(worker):
        manager = worker.model_runner.lora_manager
        wrappers = manager._adapter_manager.punica_wrapper_mapping.values()
        return type(manager).__name__, sorted({type(w).__name__ for w in wrappers})

    assert engine.llm.collective_rpc(kinds) == [("LoraplexWorkerLoRAManager", ["LoraplexPunicaWrapper"])]


@pytest.mark.parametrize("names", [[None, "alpha-r4", "beta-r8"], ["beta-r8", None, "alpha-r4"],
                                   ["alpha-r4", "alpha-r4", None, "beta-r8"]])
def test_mixed_batches_match_transformers_peft(engine, reference, names):
    expected = _expected(engine, reference, names)
    assert _generate(engine, names) == expected
    # the adapters really change the output (otherwise this test would prove nothing)
    for n, p, e in zip(names, PROMPTS, expected, strict=False):
        if n is not None:
            assert e != reference(None, p), f"{n} does not change the greedy tokens of {p}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_in_the_engine(engine, reference, monkeypatch):
    """The same batch on loraplex's Triton SGMV kernels (interpreted on CPU) instead of the torch ops."""
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    from loraplex.kernels import ops

    assert ops.backend("cpu") == "triton"
    names = ["beta-r8", None, "alpha-r4"]
    assert _generate(engine, names) == _expected(engine, reference, names)


def test_more_adapters_than_gpu_slots(engine, reference):
    # three distinct adapters in one call with two GPU slots: vLLM schedules them in turns
    names = ["gamma-r16", "alpha-r4", None, "beta-r8"]
    assert _generate(engine, names) == _expected(engine, reference, names)
    # and over time: every switch evicts from both GPU slots and vLLM's 2-adapter CPU cache
    for names in (["gamma-r16"], ["alpha-r4", None], ["beta-r8", "gamma-r16"], ["alpha-r4", "beta-r8"]):
        assert _generate(engine, names) == _expected(engine, reference, names)
    sizes = _manager(engine, "cache_sizes")
    assert sizes["gpu_slots"] == MAX_LORAS and sizes["gpu_used"] <= MAX_LORAS
    assert sizes["cpu_capacity"] == MAX_CPU_LORAS and sizes["cpu_used"] <= MAX_CPU_LORAS
    # adapters vLLM evicted came back from loraplex's host cache, not from storage
    assert sizes["host"]["hits"] > 0 and sizes["host"]["loads"] == sizes["host"]["entries"] == 3


def test_adapter_added_after_start_is_served(engine, reference, tmp_path):
    from loraplex import toy

    staging = tmp_path / "delta-r6"
    toy.make_adapter(engine.model, staging, r=6, alpha=12, seed=21, targets=("q_proj", "o_proj", "down_proj"))
    os.rename(staging, engine.catalog / "delta-r6")  # appears atomically, as a sync tool would do it
    names = ["delta-r6", None, "alpha-r4"]
    out = _generate(engine, names)
    assert out == _expected(engine, reference, names)
    assert out[0] != reference(None, PROMPTS[0])


def test_adapter_changed_in_place_is_reloaded(engine, reference, tmp_path):
    from loraplex.vllm_plugin import lora_request

    shutil.copytree(engine.catalog / "alpha-r4", engine.catalog / "swap")
    names = ["swap", None]
    assert _generate(engine, names)[0] == reference(engine.catalog / "alpha-r4", PROMPTS[0])
    before = lora_request("swap")
    # a new version is published under the same name (renames: readers never see a torn copy)
    shutil.copytree(engine.catalog / "gamma-r16", tmp_path / "new")
    os.rename(engine.catalog / "swap", tmp_path / "old")
    os.rename(tmp_path / "new", engine.catalog / "swap")
    assert _manager(engine, "refresh_storage_catalog").changed == ("swap",)
    after = lora_request("swap")
    assert after.lora_int_id != before.lora_int_id and after.lora_path != before.lora_path  # a new version
    assert _generate(engine, names)[0] == reference(engine.catalog / "gamma-r16", PROMPTS[0])
    assert _generate(engine, ["alpha-r4", "swap"]) == _expected(engine, reference, ["alpha-r4", "gamma-r16"])


def test_worker_manager_api(engine, reference):
    from loraplex.catalog import Catalog
    from loraplex.errors import AdapterNotFound
    from loraplex.vllm_plugin import lora_request

    catalog = Catalog(engine.catalog)
    ids = {n: catalog.get_adapter_id(n) for n in catalog.names()}
    assert _manager(engine, "get_adapter_name", ids["beta-r8"]) == "beta-r8"
    assert _manager(engine, "refresh_storage_catalog") is not None
    # catalog ids name adapters; lora ids name versions
    assert _manager(engine, "load_multiple_adapters", ["alpha-r4", "gamma-r16"]) == {
        n: lora_request(n).lora_int_id for n in ("alpha-r4", "gamma-r16")}
    assert _manager(engine, "prefetch_adapter", "gamma-r16") is True
    with pytest.raises(AdapterNotFound):
        _manager(engine, "prefetch_adapter", "no-such-adapter")
    assert _manager(engine, "pin_adapter_by_name", "beta-r8") is True
    _generate(engine, [None])  # workers hear of finished requests with the next step: their versions are let go
    sizes = _manager(engine, "set_cache_policy", host_cache_bytes=1)  # evicts all but the pinned one
    assert sizes["host"]["entries"] == 1 and sizes["host"]["pinned"] == 1
    assert lora_request("beta-r8").lora_int_id in sizes["gpu_ids"]
    _manager(engine, "set_cache_policy", host_cache_bytes=2 << 30)
    # the pinned adapter keeps its slot; the other slot still serves the rest
    for names in (["alpha-r4", "beta-r8"], ["gamma-r16", None], ["beta-r8", "alpha-r4"]):
        assert _generate(engine, names) == _expected(engine, reference, names)
