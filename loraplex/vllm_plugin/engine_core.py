"""The engine core's part: tell the workers which adapter version every request holds, and fail the
requests whose version is lost without stopping the engine.

- `EngineCore.add_request`: every request with an adapter is announced to the workers (one
  non-blocking RPC, ordered before the step that first schedules it). The workers record it in their
  ledger (ledger.py), so its version is never evicted while the request is unfinished, and load it
  into the host cache ahead of its step (LORAPLEX_QUEUE_PREFETCH, on by default).
- `Scheduler.update_from_output`: requests the workers reported as unrunnable (failures.py) lose
  the tokens of this step, their KV blocks leave the prefix cache (computed without their adapter,
  they must never be reused), and they finish with vLLM's error status; every other request and the
  engine go on.
- Merged mode (engine_merge.py): the engine core decides which adapter version is merged and switches
  every worker between two steps.
"""

from __future__ import annotations

import logging
import os

from . import failures
from ._hooks import unwrap_loaded, wrap

log = logging.getLogger("loraplex.vllm_plugin")

ENV_PREFETCH = "LORAPLEX_QUEUE_PREFETCH"
CORE_MODULE = "vllm.v1.engine.core"
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"


def prefetch_enabled(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return str(environ.get(ENV_PREFETCH, "1")).strip().lower() not in ("0", "false", "no", "off")


def _announce_on_worker(worker, items) -> int:
    """Runs in each worker process (a cloudpickled reference to this function, not code)."""
    from .worker_manager import LoraplexWorkerLoRAManager

    worker = getattr(worker, "worker", worker)
    manager = getattr(getattr(worker, "model_runner", None), "lora_manager", None)
    if not isinstance(manager, LoraplexWorkerLoRAManager):
        return 0
    try:
        return manager.announce(items)
    except Exception:  # noqa: BLE001 - the step binds the request again if this failed
        log.exception("loraplex: announcing queued requests failed")
        return 0


def _wrap_add_request(orig):
    def add_request(self, request, *args, **kwargs):
        result = orig(self, request, *args, **kwargs)
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            try:
                self.model_executor.collective_rpc(_announce_on_worker, args=([(request.request_id, lora)],),
                                                   non_block=True)
            except Exception:  # noqa: BLE001 - never fail a request because its announcement failed
                log.exception("loraplex: could not announce adapter '%s' to the workers", lora.lora_name)
        return result

    return add_request


def _wrap_update_from_output(orig):
    def update_from_output(self, scheduler_output, model_runner_output):
        failed = failures.take_reported(lambda rid: rid in self.requests)
        if failed:
            _drop_tokens(model_runner_output, failed)
        outputs = orig(self, scheduler_output, model_runner_output)
        if failed:
            _fail(self, failed, outputs)
        return outputs

    return update_from_output


def _drop_tokens(model_runner_output, failed) -> None:
    index = getattr(model_runner_output, "req_id_to_index", None) or {}
    sampled = getattr(model_runner_output, "sampled_token_ids", None)
    if sampled is None:
        return
    for req_id in failed:
        i = index.get(req_id)
        if i is not None and i < len(sampled):
            sampled[i] = []


def _fail(scheduler, failed: dict, outputs: dict) -> None:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import RequestStatus

    blocks = set()
    for req_id in failed:
        try:
            for group in scheduler.kv_cache_manager.get_block_ids(req_id):
                blocks.update(group)
        except Exception:  # noqa: BLE001 - a request without blocks (still waiting)
            continue
    if blocks:
        scheduler.kv_cache_manager.evict_blocks(blocks)
    for request in scheduler.finish_requests(list(failed), RequestStatus.FINISHED_ERROR):
        message = failed[request.request_id]
        log.warning("loraplex: request %s failed: %s", request.request_id, message)
        failures.publish_error(request.request_id, message)
        eco = outputs.get(request.client_index)
        if eco is None:
            eco = outputs[request.client_index] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                            finish_reason=request.get_finished_reason()))


def patch_engine_core(module) -> None:
    from . import engine_merge

    wrap(module.EngineCore, "add_request", _wrap_add_request)
    engine_merge.patch_engine_core(module)


def patch_scheduler(module) -> None:
    from . import engine_merge

    wrap(module.Scheduler, "update_from_output", _wrap_update_from_output)
    engine_merge.patch_scheduler(module)


def unpatch() -> None:
    import sys

    from . import engine_merge

    unwrap_loaded(CORE_MODULE, "EngineCore", "add_request")
    unwrap_loaded(SCHEDULER_MODULE, "Scheduler", "update_from_output")
    engine_merge.unpatch(sys.modules.get(CORE_MODULE), sys.modules.get(SCHEDULER_MODULE))
