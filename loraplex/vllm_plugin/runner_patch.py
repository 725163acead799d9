"""The model runner's hooks for loraplex's worker manager: every step's scheduler output reaches the
ledger before the runner takes it in (worker_requests.py), and the adapter count vLLM's CUDA-graph
dispatch sees follows merged mode (worker_merge.py). Installed on whichever runner module vLLM imports
(plugin.RUNNER_MODULES)."""

from __future__ import annotations


def _wrap_execute_model(orig):
    from .worker_manager import LoraplexWorkerLoRAManager

    def execute_model(self, scheduler_output, *args, **kwargs):
        manager = getattr(self, "lora_manager", None)
        if isinstance(manager, LoraplexWorkerLoRAManager):
            manager.on_step(scheduler_output)
        return orig(self, scheduler_output, *args, **kwargs)

    return execute_model


def patch_model_runner(module) -> None:
    """Every step's scheduler output reaches the ledger before the runner takes it in."""
    from ._hooks import wrap
    from .worker_merge import patch_dispatch

    wrap(module.GPUModelRunner, "execute_model", _wrap_execute_model)
    patch_dispatch(module)


def unpatch_model_runners() -> None:
    import sys

    from ._hooks import unwrap
    from .plugin import RUNNER_MODULES
    from .worker_merge import unpatch_dispatch

    for name in RUNNER_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            unwrap(module.GPUModelRunner, "execute_model")
            unpatch_dispatch(module)
