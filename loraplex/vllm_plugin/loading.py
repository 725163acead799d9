"""A catalog adapter as a vLLM LoRAModel, read through the catalog instead of vLLM's own loader.

vLLM's loader reads whatever files are at lora_path now and checks neither their version nor their
values: an adapter with one NaN weight is served and poisons the KV blocks other requests reuse.
Through the catalog, the read is of exactly one version (AdapterChanged otherwise) and its weights
are checked against the config (shapes, ranks, NaN/inf) before anything reaches vLLM. The checks
vLLM makes itself (rank limit, features, target modules) are kept and reported as InvalidAdapter.
An AttributeError, TypeError or ImportError from vLLM's code is not the adapter's fault (a vLLM
change compat.py does not handle, or a loraplex bug): it becomes a VllmInternalError naming loraplex
and the vLLM version, which the server reports as its own error and which never marks the adapter
unservable.
"""

from __future__ import annotations

from ..errors import InvalidAdapter
from .compat import internal_error, validate_lora_model

_INTERNAL = (AttributeError, TypeError, ImportError)  # from vLLM's code: never the adapter's fault


def expected_modules(adapter_manager) -> set[str]:
    """Module names this model can apply LoRA to (packed modules expanded to their parts)."""
    packed = adapter_manager.packed_modules_mapping
    names = set()
    for module in adapter_manager.supported_lora_modules:
        names.update(packed.get(module, [module]))
        if module == "experts":
            names.add(module)
    return names


def _check_modules(name, tensors, expected, peft_helper, weights_mapper, skip_prefixes):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    unexpected = []
    for key in tensors:
        if is_base_embedding_weights(key) or "base_layer" in key:
            continue
        if skip_prefixes and LoRAModel._should_skip_module(key, skip_prefixes):
            continue
        module, _ = parse_fine_tuned_lora_name(key, weights_mapper)
        if ".experts" in module:
            ok = module[module.find(".experts") + 1:] in expected
        else:
            base = module.rsplit(".", 1)[-1]
            ok = base in expected or base in (peft_helper.modules_to_save or ())
        if not ok:
            unexpected.append(module)
    if unexpected:
        raise InvalidAdapter(name, f"targets modules this model cannot apply LoRA to: {sorted(set(unexpected))[:8]}")


def _peft_helper(name: str, config: dict, lora_config, max_position_embeddings=None):
    """vLLM's parsed config of the adapter, after vLLM's own checks (rank limit, features). In merged
    mode the rank limit is what a served adapter may have (merge_config.py), in the API server and the
    workers alike."""
    from vllm.lora.peft_helper import PEFTHelper

    from .merge_config import rank_message, serving_lora_config

    limited = serving_lora_config(lora_config)
    try:
        peft_helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": max_position_embeddings})
        peft_helper.validate_legal(limited)
    except ValueError as e:
        why = str(e)
        if limited is not lora_config and "max_lora_rank" in why:
            why += rank_message(lora_config)
        raise InvalidAdapter(name, why) from None
    return peft_helper


def check_vllm_limits(name: str, config: dict, tensors: dict, lora_config, modules=None) -> None:
    """vLLM's own checks of an adapter (rank limit, features; target modules when `modules`, the
    model's LoRA-capable modules, is known), made before the engine is asked: a refusal there costs
    an engine round trip and pages of worker and engine tracebacks. Raises InvalidAdapter."""
    try:
        peft_helper = _peft_helper(name, config, lora_config)
        if modules:
            _check_modules(name, tensors, set(modules), peft_helper, None, None)
    except _INTERNAL as e:
        raise internal_error(e, f"checking adapter '{name}' against vLLM's limits") from e


def build_lora_model(worker_manager, lora_id: int, name: str, config: dict, tensors: dict):
    """vLLM's LoRAModel (on CPU, in the LoRA dtype) from checked catalog tensors. Raises
    InvalidAdapter naming the adapter for everything vLLM would refuse, VllmInternalError when vLLM's
    code fails under us."""
    try:
        from vllm.lora.lora_model import LoRAModel

        manager = worker_manager._adapter_manager
        peft_helper = _peft_helper(name, config, worker_manager.lora_config, worker_manager.max_position_embeddings)
        model = manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None
        skip = getattr(model, "lora_skip_prefixes", None)
        _check_modules(name, tensors, expected_modules(manager), peft_helper, mapper, skip)
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=lora_id, tensors=tensors, peft_helper=peft_helper, device="cpu",
            dtype=worker_manager.lora_config.lora_dtype, model_vocab_size=worker_manager.vocab_size,
            weights_mapper=mapper, skip_prefixes=skip)
        validate_lora_model(manager, lora)
    except InvalidAdapter:
        raise
    except (ValueError, KeyError) as e:
        raise InvalidAdapter(name, str(e)) from None
    except _INTERNAL as e:
        raise internal_error(e, f"loading adapter '{name}'") from e
    return lora
