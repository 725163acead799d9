"""vLLM execution modes the punica wrapper has to know about when it is built: micro-batching (refused)
and CUDA graphs captured per adapter-count bucket (which let the kernels' grids follow the bucket)."""

from __future__ import annotations

from ..errors import ConfigError


def vllm_config():
    """The VllmConfig being built into a model (None outside vLLM's config context)."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # an older layout: no config to read
        return None
    return get_current_vllm_config_or_none()


def refuse_microbatching(config) -> None:
    """Dual-batch overlap runs the model's forward as two micro-batches on two threads that share one
    punica wrapper: one step's plans, scratch and split-K counters would be used by both at once, and
    each micro-batch sees only its own rows of the step's mapping. vLLM itself refuses LoRA with DBO in
    its V2 model runner; its V1 runner does not, so refuse here."""
    par = getattr(config, "parallel_config", None)
    if par is not None and getattr(par, "use_ubatching", False):
        raise ConfigError("loraplex's LoRA kernels do not support vLLM's dual-batch overlap / micro-batching "
                          "(--enable-dbo, --ubatch-size > 1): micro-batches would share one step's LoRA plans; "
                          "turn micro-batching off to serve LoRA adapters with loraplex")


def graph_buckets(config, max_loras: int) -> list[int] | None:
    """The adapter counts vLLM captures a CUDA graph for, when it captures one per count (LoRAConfig.
    specialize_active_lora with CompilationConfig.cudagraph_specialize_lora): a step with n adapters
    replays the graph of the smallest count >= n. None when one graph serves every count."""
    lora = getattr(config, "lora_config", None)
    comp = getattr(config, "compilation_config", None)
    if not (getattr(lora, "specialize_active_lora", False) and getattr(comp, "cudagraph_specialize_lora", False)):
        return None
    # vllm.lora.utils.get_captured_lora_counts(max_loras, True): powers of two up to max_loras, and max_loras + 1
    return [n for n in range(1, max_loras + 2) if n & (n - 1) == 0 or n == max_loras + 1]
