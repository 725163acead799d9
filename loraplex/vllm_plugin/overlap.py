"""LORAPLEX_OVERLAP=1 in vLLM: each LoRA linear layer's shrink runs on a second CUDA stream under the
base GEMM, and the expand adds into the base output after the join (loraplex/layers/overlap.py says
why). Off by default until a GPU run shows it faster.

vLLM already has the plumbing a CUDA graph needs for a second stream in its LoRA layers
(VLLM_LORA_ENABLE_DUAL_STREAM: an auxiliary stream and two events per layer, the layer reachable from
a custom op that torch.compile does not trace into). Its own split is coarser: the whole delta on the
auxiliary stream into a freshly zeroed tensor, then one more add. This module turns that plumbing on
and replaces the split (BaseLinearLayerWithLoRA._apply_async_impl) with ours when the layer's punica
wrapper is loraplex's; any other wrapper keeps vLLM's.
"""

from __future__ import annotations

import logging
import os

from ._hooks import after_import, unwrap_loaded, wrap

log = logging.getLogger("loraplex.vllm_plugin")

ENV_OVERLAP = "LORAPLEX_OVERLAP"
ENV_VLLM_DUAL = "VLLM_LORA_ENABLE_DUAL_STREAM"
MODULE = "vllm.lora.layers.base_linear"


def wanted(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return str(environ.get(ENV_OVERLAP, "")).strip().lower() in ("1", "true", "yes", "on")


def install() -> bool:
    """Turn vLLM's dual-stream plumbing on (read when vLLM imports its LoRA layers) and wrap its split.
    Returns False (and changes nothing) where there is no CUDA."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        log.warning("loraplex: %s=1 needs CUDA streams; running LoRA after the base GEMM", ENV_OVERLAP)
        return False
    os.environ[ENV_VLLM_DUAL] = "1"
    after_import(MODULE, patch_layers)
    return True


def patch_layers(module) -> None:
    wrap(module.BaseLinearLayerWithLoRA, "_apply_async_impl", _wrap)


def unpatch_layers() -> None:
    unwrap_loaded(MODULE, "BaseLinearLayerWithLoRA", "_apply_async_impl")


def _wrap(orig):
    def _apply_async_impl(self, x, bias=None):
        import torch

        from .punica import LoraplexPunicaWrapper

        wrapper = self.punica_wrapper
        if not isinstance(wrapper, LoraplexPunicaWrapper) or _breakable_capture():
            return orig(self, x, bias)
        x2 = x.flatten(0, 1) if x.ndim == 3 else x
        fork, join = self._events
        main = torch.cuda.current_stream()
        fork.record(main)  # x is ready
        with torch.cuda.stream(self._lora_stream):
            fork.wait()
            h = wrapper.lora_shrink(x2, self.lora_a_stacked, 1.0)
            join.record()
        output = self._get_quant_method().apply(self.base_layer, x, bias)
        join.wait(main)  # the shrink is done; the next layer's shrink waits for this expand (its fork)
        if h is not None:
            out2 = output.flatten(0, 1) if output.ndim == 3 else output
            wrapper.lora_expand(out2, h, self.lora_b_stacked, self.output_slices)
        return output

    return _apply_async_impl


def _breakable_capture() -> bool:
    """vLLM runs both branches on one stream while a breakable CUDA graph is being captured."""
    try:
        from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphCapture

        return BreakableCUDAGraphCapture.is_active()
    except ImportError:
        return False
