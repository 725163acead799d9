"""Where the vLLM internals the plugin touches differ between the releases it supports, in one place.

Every difference names the releases on each side and is handled by feature detection (is the
attribute there?), never by version strings, so a patch release that backports a change keeps
working. INTERNALS lists everything else of vLLM the plugin relies on, so that a new release can be
checked in seconds (tests/vllm/test_compat.py) and its port starts from a list, not a grep.

Differences, 0.32 | 0.33:
- Classification-head checks of a loaded LoRAModel: LoRAModelManager._validate_modules_to_save and
  _validate_token_classification_lora | one _validate_classification_head_lora. validate_lora_model()
  calls whichever the manager has.
- TokenClassificationHeadWithLoRA (0.33 only) calls the punica wrapper's add_shrink with the whole
  classification head [max_loras, 1, labels, hidden] as "A"; 0.32's (and 0.33's sequence-level)
  head uses apply_lora_full_linear. So add_shrink computes every row of what it is given, never
  narrowed to an adapter's rank (punica.py).
- Slices per LoRA linear layer: MergedColumnParallelLinearWithLoRA passes one per output size, any
  count, on both; Step5FusedQKVIndexerWithLoRA (0.33 only) passes 7. Our kernels take up to three per
  launch, so the wrapper launches groups of three (punica.py); no count is refused.
- cli_env_setup, run before `vllm serve` parses its arguments: vllm.entrypoints.serve.utils.api_utils
  | vllm.entrypoints.common.startup. cli_env_setup() finds it.
- The GPU model runner: the V1 runner (vllm.v1.worker.gpu_model_runner) | by default the V2 runner
  (vllm.v1.worker.gpu.model_runner), which keeps LoRA ids in int32 arrays (version ids therefore fit in
  31 bits, identity.py) and builds a step's set of LoRARequests by name. The ledger hook wraps the
  execute_model of whichever runner module is imported (plugin.RUNNER_MODULES); the worker takes the
  step's adapters from the mapping's ids, not from that set (worker_requests.py).
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError, LoraplexError

# Alternatives per difference, newest first: each a tuple of "module:attribute.path" that must all exist.
DIFFERENCES = {
    "classification-head checks": (
        ("vllm.lora.model_manager:LoRAModelManager._validate_classification_head_lora",),  # 0.33
        ("vllm.lora.model_manager:LoRAModelManager._validate_modules_to_save",  # 0.32
         "vllm.lora.model_manager:LoRAModelManager._validate_token_classification_lora"),
    ),
    "cli_env_setup": (
        ("vllm.entrypoints.common.startup:cli_env_setup",),  # 0.33
        ("vllm.entrypoints.serve.utils.api_utils:cli_env_setup",),  # 0.32
    ),
}

# The same on every supported release; what uses it, and how, is in the module named first.
INTERNALS = (
    # plugin.py: our wrapper in place of vLLM's, our worker manager where the runner looks it up
    "vllm.platforms:current_platform",
    "vllm.platforms.cpu:CpuPlatform.get_punica_wrapper",
    "vllm.lora.punica_wrapper.punica_selector:get_punica_wrapper",
    "vllm.v1.worker.lora_model_runner_mixin:LRUCacheWorkerLoRAManager",
    "vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin.load_lora_model",
    "vllm.lora.model_manager:LoRAModelManager._create_lora_modules",
    "vllm.lora.layers.fused_moe:FusedMoEWithLoRA",
    "vllm.entrypoints.serve.instrumentator.metrics:get_prometheus_registry",
    # version.py
    "vllm:__version__",
    # punica.py: the base class and what vLLM's layers call on it
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase._update_base_metadata",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase._select_full_linear_output",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.token_lora_indices",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.sampler_indices",
    "vllm.lora.layers:LoRAMapping",
    "vllm.lora.layers.classifier:ClassificationHeadWithLoRA",
    # loading.py: vLLM's parsing and checks of an adapter, on tensors the catalog read
    "vllm.lora.lora_model:LoRAModel.from_lora_tensors",
    "vllm.lora.lora_model:LoRAModel._should_skip_module",
    "vllm.lora.lora_model:LoRAModel.clone",
    "vllm.lora.utils:is_base_embedding_weights",
    "vllm.lora.utils:parse_fine_tuned_lora_name",
    "vllm.lora.peft_helper:PEFTHelper.from_dict",
    "vllm.lora.peft_helper:PEFTHelper.validate_legal",
    "vllm.lora.model_manager:LoRAModelManager._validate_moe_lora_format",
    # worker_manager.py, residency.py: the subclass of vLLM's manager and the manager it drives
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.create_lora_manager",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.remove_all_adapters",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager._load_adapter",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.add_adapter",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.remove_adapter",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.pin_adapter",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager._apply_adapters",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.set_active_adapters",
    "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.list_adapters",
    "vllm.lora.model_manager:LRUCacheLoRAModelManager._pin_lora_in_cpu_cache",
    "vllm.lora.model_manager:LoRAModelManager._create_merged_loras_inplace",
    "vllm.lora.model_manager:LoRAModelManager.set_adapter_mapping",
    "vllm.lora.model_manager:LoRAModelManager.get_adapter",
    "vllm.lora.model_manager:LRUCacheLoRAModelManager.remove_oldest_adapter",
    "vllm.lora.model_manager:LoRAModelManager.add_adapter",
    "vllm.lora.model_manager:LoRAModelManager.capacity",
    "vllm.lora.model_manager:LoRAModelManager.lora_slots",
    "vllm.lora.request:LoRARequest",
    "vllm.distributed:get_tensor_model_parallel_rank",
    # resolver.py
    "vllm.lora.resolver:LoRAResolver",
    "vllm.lora.resolver:LoRAResolverRegistry.register_resolver",
    "vllm.lora.resolver:LoRAResolverRegistry.resolvers",
    # serving_patch.py: the OpenAI server's adapter handling
    "vllm.entrypoints.openai.models.serving:OpenAIServingModels.__init__",
    "vllm.entrypoints.openai.models.serving:OpenAIServingModels.show_available_models",
    "vllm.entrypoints.openai.models.serving:OpenAIServingModels.resolve_lora",
    "vllm.entrypoints.openai.models.serving:OpenAIServingModels.load_lora_adapter",
    "vllm.entrypoints.openai.models.serving:OpenAIServingModels.unload_lora_adapter",
    "vllm.entrypoints.serve:create_error_response",
    # engine_core.py, failures.py: every request announced to the workers; a lost version fails alone
    "vllm.v1.engine.core:EngineCore.add_request",
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
    "vllm.v1.core.sched.scheduler:Scheduler.finish_requests",
    "vllm.v1.core.kv_cache_manager:KVCacheManager.get_block_ids",
    "vllm.v1.core.kv_cache_manager:KVCacheManager.evict_blocks",
    "vllm.v1.engine:EngineCoreOutput",
    "vllm.v1.engine:EngineCoreOutputs",
    "vllm.v1.request:RequestStatus.FINISHED_ERROR",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
    "vllm.entrypoints.generate.base.serving:GenerateBaseServing._raise_if_error",
    "vllm.entrypoints.serve.engine.serving:BaseServing._check_model",
    "vllm.exceptions:RetryableRequestError",
    # merged mode: engine_merge.py (which version, when), worker_merge.py / merge_weights.py (the weights,
    # the slots, the graph dispatch), runner_patch.py
    "vllm.v1.engine.core:EngineCore.__init__",
    "vllm.v1.engine.core:EngineCore.step",
    "vllm.v1.engine.core:EngineCore.step_with_batch_queue",
    "vllm.v1.engine.core:EngineCoreProc.run_busy_loop",
    "vllm.v1.core.sched.scheduler:Scheduler.schedule",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._determine_batch_execution_and_padding",
    "vllm.v1.worker.gpu.model_runner:get_num_active_loras_for_dispatch",
    "vllm.v1.worker.gpu.lora_utils:LoraState.add_request",
    "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading",
    "vllm.lora.model_manager:LoRAModelManager.deactivate_adapter",
    "vllm.lora.model_manager:LoRAModelManager.remove_adapter",
    "vllm.lora.lora_model:LoRAModel",
    # overlap.py (CUDA only)
    "vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA._apply_async_impl",
    "vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA._get_quant_method",
    "vllm.compilation.breakable_cudagraph:BreakableCUDAGraphCapture.is_active",
    # serve.py
    "vllm.entrypoints.cli.serve:cmd_init",
    "vllm.logger:configure_logging_from_args",
    "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "vllm.entrypoints.cli.main:main",
)


def resolve(ref: str):
    """The object `module:attr.path` names; raises ImportError or AttributeError."""
    module, _, path = ref.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _exists(ref: str) -> bool:
    try:
        resolve(ref)
    except (ImportError, AttributeError):
        return False
    return True


def missing() -> list[str]:
    """Everything in INTERNALS the installed vLLM lacks, and each difference none of whose sides it
    has (empty on a supported release)."""
    gone = [ref for ref in INTERNALS if not _exists(ref)]
    for name, sides in DIFFERENCES.items():
        if not any(all(_exists(ref) for ref in side) for side in sides):
            gone.append(f"{name}: none of {sides}")
    return gone


# ---- the differences -------------------------------------------------------------------------------
def validate_lora_model(manager, lora) -> None:
    """vLLM's own checks of a LoRAModel it did not load itself, as its worker manager makes them
    after loading (MoE layout, classification heads). Raises what vLLM raises (ValueError for a
    bad adapter; AttributeError if this vLLM has none of the checks we know)."""
    manager._validate_moe_lora_format(lora)
    for side in DIFFERENCES["classification-head checks"]:
        methods = [getattr(manager, ref.rsplit(".", 1)[1], None) for ref in side]
        if all(methods):
            for method in methods:
                method(lora)
            return
    raise AttributeError(f"{type(manager).__name__} has none of the classification-head checks loraplex "
                         f"knows: {DIFFERENCES['classification-head checks']}")


def cli_env_setup():
    """vLLM's cli_env_setup, wherever this release keeps it; None if it has none we know."""
    for (ref,) in DIFFERENCES["cli_env_setup"]:
        try:
            return resolve(ref)
        except (ImportError, AttributeError):
            continue
    return None


# ---- layers the kernels do not cover ---------------------------------------------------------------
def check_layers(modules) -> None:
    """Refuse, at startup, a model whose LoRA layers would call punica ops loraplex does not implement
    (LoRA on fused MoE experts): otherwise the first step with an adapter would stop the engine.
    modules: vLLM's LoRAModelManager.modules (name -> LoRA layer)."""
    from .punica import LoraplexPunicaWrapper

    moe = getattr(importlib.import_module("vllm.lora.layers.fused_moe"), "FusedMoEWithLoRA", None)
    ours = [name for name, layer in modules.items()
            if isinstance(getattr(layer, "punica_wrapper", None), LoraplexPunicaWrapper)]
    refused = [name for name in ours if moe is not None and isinstance(modules[name], moe)]
    if refused:
        raise ConfigError(
            f"loraplex's LoRA kernels do not cover LoRA on fused MoE experts ({', '.join(refused[:3])}"
            f"{', ...' if len(refused) > 3 else ''}): start vLLM with LORAPLEX_KERNELS=0 to keep vLLM's "
            f"own kernels (loraplex's catalog and host cache still apply).")


# ---- failures inside vLLM's code -------------------------------------------------------------------
INTERNAL_ERROR = "loraplex internal error"  # every VllmInternalError's message starts with it
_REPORT_IT = "please report it with this message."  # ... and ends with it


class VllmInternalError(LoraplexError):
    """The plugin failed inside vLLM's code (an AttributeError or TypeError from its internals): a
    loraplex bug or a vLLM change this module does not handle, never a fault of the adapter."""


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - reporting an error must not raise another
        return "unknown"


def internal_error(exc: BaseException, doing: str) -> VllmInternalError:
    """A VllmInternalError for `exc`, raised while `doing` (e.g. "loading adapter 'x'")."""
    from .. import __version__

    return VllmInternalError(
        f"{INTERNAL_ERROR} (loraplex {__version__}, vLLM {vllm_version()}) while {doing}: "
        f"{type(exc).__name__}: {exc}. This is a bug in loraplex's vLLM plugin or a vLLM change it does not "
        f"handle, not a problem with the adapter; {_REPORT_IT}")


def internal_message(exc: BaseException) -> str | None:
    """The message of a VllmInternalError, also after vLLM's engine relayed it inside its own ("Call to
    add_lora method failed: ..."); None for any other error."""
    text = str(exc)
    start = text.find(INTERNAL_ERROR)
    if start < 0:
        return None
    end = text.find(_REPORT_IT, start)
    return text[start:] if end < 0 else text[start: end + len(_REPORT_IT)]
