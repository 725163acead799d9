"""Queue-aware prefetch: an adapter starts loading when its request enters vLLM's scheduler, not
when the request is scheduled.

Under load a request waits in the scheduler's queue for a while (max_num_seqs, KV space, max_loras);
vLLM loads its adapter only in the step that first schedules it, and that step, with every request
in it, waits for storage. The engine core's add_request is wrapped to send the adapter to the
workers (one non-blocking RPC, deduplicated), whose LoraplexWorkerLoRAManager.prefetch_queued starts
loading it into the host cache on its loader threads. The host cache bounds what this may load ahead
(prefetched-but-unused adapters take at most half its byte budget), so a long queue of distinct
adapters cannot evict the ones running requests use. LORAPLEX_QUEUE_PREFETCH=0 turns it off.
"""

from __future__ import annotations

import logging
import os
import time

from ._hooks import unwrap, wrap

log = logging.getLogger("loraplex.vllm_plugin")

ENV_PREFETCH = "LORAPLEX_QUEUE_PREFETCH"
CORE_MODULE = "vllm.v1.engine.core"
_RESEND_S = 1.0  # the same adapter is announced at most once a second (the workers dedupe too)


def enabled(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return str(environ.get(ENV_PREFETCH, "1")).strip().lower() not in ("0", "false", "no", "off")


def _prefetch_on_worker(worker, lora_requests) -> int:
    """Runs in each worker process (a cloudpickled reference to this function, not code)."""
    from .worker_manager import LoraplexWorkerLoRAManager

    worker = getattr(worker, "worker", worker)
    manager = getattr(getattr(worker, "model_runner", None), "lora_manager", None)
    if not isinstance(manager, LoraplexWorkerLoRAManager):
        return 0
    try:
        return manager.prefetch_queued(lora_requests)
    except Exception:  # noqa: BLE001 - a prefetch is only a head start: the step loads what it needs
        log.exception("loraplex: queue prefetch failed")
        return 0


def _wrap_add_request(orig):
    def add_request(self, request, *args, **kwargs):
        result = orig(self, request, *args, **kwargs)
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            sent = self.__dict__.setdefault("_loraplex_announced", {})
            key = (lora.lora_int_id, lora.lora_path)
            now = time.monotonic()
            if now - sent.get(key, -1e9) >= _RESEND_S:
                if len(sent) > 4096:
                    sent.clear()
                sent[key] = now
                try:
                    self.model_executor.collective_rpc(_prefetch_on_worker, args=([lora],), non_block=True)
                except Exception:  # noqa: BLE001 - never fail a request because its head start failed
                    log.exception("loraplex: could not announce adapter '%s' to the workers", lora.lora_name)
        return result

    return add_request


def patch_engine_core(module) -> None:
    wrap(module.EngineCore, "add_request", _wrap_add_request)


def unpatch_engine_core() -> None:
    import sys

    module = sys.modules.get(CORE_MODULE)
    if module is not None:
        unwrap(module.EngineCore, "add_request")
