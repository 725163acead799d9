"""Merged mode under vLLM, the engine core's part: which adapter version is merged, decided in the one
process that sees every request, and the switch sent to every worker between two steps.

- Which version: LORAPLEX_MERGE=<name> merges the name's current catalog version when the engine
  starts (a failure stops the start, with the reason); LORAPLEX_MERGE_AUTO runs the MergePolicy
  (runtime/merge_policy.py) on the tokens each step schedules, per adapter name. A request for the
  merged name with another version id whose version is the catalog's current one (a republish) has
  that version merged instead (identity.py: each version is its own adapter to vLLM).
- When: a switch is sent before the step after the decision, as one blocking collective RPC
  (worker_merge.merge_switch). Each worker takes RPCs in the order the engine core sends them, so
  every tensor-parallel rank switches between the same two steps. A worker that fails restores its
  weights; the engine core then unmerges every worker, so they never disagree, and logs why. Nothing a
  client or storage does stops the engine: a version that cannot be merged is served unmerged.
- The scheduler: vLLM counts the adapters of a batch against --max-loras, but while an adapter is
  merged, base-model requests need a slot of their own (for the merged adapter's correction). With
  merged mode configured the scheduler's copy of the LoRA config allows one adapter fewer per batch;
  the workers' config, which sizes the slots, is untouched.
"""

from __future__ import annotations

import copy
import logging

from ..errors import CatalogError, ConfigError
from ..runtime.merge_policy import MergePolicy
from .merge_config import ENV_MERGE, settings

log = logging.getLogger("loraplex.vllm_plugin")


def _on_worker(worker, method, *args):
    """Runs in each worker process (a cloudpickled reference to this function, not code)."""
    from .worker_manager import manager_of

    manager = manager_of(worker)
    if manager is None:
        raise ConfigError("merged mode needs loraplex's worker LoRA manager (LORAPLEX_CATALOG and --enable-lora)")
    return getattr(manager, method)(*args)


class MergeControl:
    def __init__(self, core, merge_settings):
        self.core = core
        self.settings = merge_settings
        self.policy = MergePolicy(merge_settings.auto) if merge_settings.auto is not None else None
        self.pinned = merge_settings.pinned  # the name whose new versions are merged as they appear
        self.merged = None  # the LoRARequest every worker has merged
        self.pending = False
        self.target = None  # the LoRARequest to merge at the next step boundary (None: unmerge)
        self.switches = 0
        self.failures = 0
        self._latest: dict[str, object] = {}  # adapter name -> the last LoRARequest seen for it
        self._compared: set[int] = set()  # version ids of the merged name already compared with the catalog

    # ---- switching ------------------------------------------------------------------------------
    def start(self) -> None:
        """At engine start: merge the pinned adapter now (ConfigError with the reason if it cannot be)."""
        name = self.settings.pinned
        if name is None:
            return
        try:
            request = _catalog().request(name)
        except CatalogError as e:
            raise ConfigError(f"{ENV_MERGE}={name!r}: {e}") from e
        if not self._switch(request):
            raise ConfigError(f"{ENV_MERGE}={name!r}: the adapter could not be merged (the workers' log says why)")

    def merge_now(self, name: str | None) -> dict:
        """Merge catalog adapter `name` (its current version) now, or unmerge (None): an explicit
        switch, which turns the automatic policy off. ConfigError if it cannot be merged."""
        self.policy = None
        self.pending = False
        self.pinned = name
        request = None if name is None else _catalog().request(name)
        if not self._switch(request):
            raise ConfigError(f"LoRA adapter '{name}' could not be merged; it is served unmerged (the workers' log "
                              f"says why)")
        return self.stats()

    def ask(self, request) -> None:
        """Switch to `request` (None: unmerge) before the next step."""
        self.target, self.pending = request, True

    def before_step(self) -> None:
        if self.pending:
            self.pending = False
            target = self.target
            same = (target is None and self.merged is None) or (
                target is not None and self.merged is not None and target.lora_int_id == self.merged.lora_int_id)
            if not same:
                self._switch(target)

    def _switch(self, request) -> bool:
        rpc = self.core.model_executor.collective_rpc
        try:
            rpc(_on_worker, args=("merge_switch", request))
        except Exception as e:  # noqa: BLE001 - one adapter that cannot be merged never stops the engine
            self.failures += 1
            log.warning("loraplex: merging LoRA adapter '%s' failed, serving unmerged: %s",
                        getattr(request, "lora_name", None), e)
            rpc(_on_worker, args=("merge_switch", None))  # every worker the same (if even this fails: stop)
            self.merged = None
            return request is None
        self.merged = request
        self.switches += 1
        log.info("loraplex: merged LoRA adapter is now %s", "none" if request is None else
                 f"'{request.lora_name}' (id {request.lora_int_id})")
        return True

    # ---- what each step schedules ---------------------------------------------------------------
    def observe(self, scheduler, output) -> None:
        names, tokens = [], []
        requests = scheduler.requests
        for req_id, n in output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            lora = None if request is None else request.lora_request
            name = None if lora is None else lora.lora_name
            names.append(name)
            tokens.append(n)
            if lora is not None:
                self._latest[name] = lora
                self._maybe_republished(lora)
        if self.policy is None:
            return
        self.policy.observe(names, tokens)
        current = self._current_name()
        want = self.policy.decide(current)
        if want != current:
            self.policy.switched()
            self.ask(None if want is None else self._request_for(want))

    def _current_name(self):
        r = self.target if self.pending else self.merged
        return None if r is None else r.lora_name

    def _request_for(self, name: str):
        """The current catalog version of `name` (else the last request seen for it)."""
        try:
            return _catalog().request(name)
        except CatalogError:
            return self._latest.get(name)

    def _maybe_republished(self, lora) -> None:
        """A request for the merged name (or the pinned one, while not merged) on another version: merge
        that version if it is the current one."""
        merged = self.target if self.pending else self.merged
        name = self.pinned if merged is None else merged.lora_name
        if lora.lora_name != name or (merged is not None and lora.lora_int_id == merged.lora_int_id) \
                or lora.lora_int_id in self._compared:
            return
        self._compared.add(lora.lora_int_id)
        if len(self._compared) > 1024:
            self._compared.clear()
        try:
            current = _catalog().request(lora.lora_name)
        except CatalogError:
            return
        if current.lora_int_id == lora.lora_int_id:
            self.ask(lora)

    def stats(self) -> dict:
        m = self.merged
        return {"merged": None if m is None else [m.lora_name, m.lora_int_id], "switches": self.switches,
                "failures": self.failures, "policy": self.policy is not None}


def _catalog():
    from .catalog_handle import get_handle

    handle = get_handle()
    if handle is None:
        raise ConfigError("merged mode needs an adapter catalog (LORAPLEX_CATALOG)")
    return handle


def control_of(core) -> MergeControl | None:
    return getattr(core, "_loraplex_merge", None)


def _loraplex_merge(self, name):
    """EngineCore utility (merge_adapter below): switch the merged adapter between two steps."""
    control = control_of(self)
    if control is None:
        raise ConfigError("merged mode is off: start vLLM with LORAPLEX_MERGE=<name> or LORAPLEX_MERGE_AUTO=1")
    return control.merge_now(name)


def _loraplex_merge_state(self):
    control = control_of(self)
    return None if control is None else control.stats()


def merge_adapter(llm, name: str | None) -> dict:
    """Merge catalog adapter `name` into the base weights of a vllm.LLM's engine now (None: unmerge);
    turns the automatic policy off. Returns {"merged": [name, lora id] | None, "switches", ...}."""
    return _utility(llm, "loraplex_merge", name)


def merge_state(llm) -> dict | None:
    """The engine core's merged adapter and switch counts (None: merged mode is off)."""
    return _utility(llm, "loraplex_merge_state")


def _utility(llm, method, *args):
    client = llm.llm_engine.engine_core
    if hasattr(client, "call_utility"):  # the engine core in its own process
        return client.call_utility(method, *args)
    return getattr(client.engine_core, method)(*args)  # in this process


# ---- the hooks ---------------------------------------------------------------------------------------
def setup(core, at_start: bool = True) -> None:
    """Once per engine core, before its first step: the scheduler's adapter count and the pinned merge.
    at_start: a pinned adapter that cannot be merged stops the start (else it is logged, and served
    unmerged)."""
    if getattr(core, "_loraplex_merge_setup", False):
        return
    core._loraplex_merge_setup = True
    s = settings()
    scheduler = getattr(core, "scheduler", None)
    if not s.enabled or getattr(scheduler, "lora_config", None) is None:
        return
    lora = scheduler.lora_config
    if lora.max_loras < 2:
        raise ConfigError("merged mode needs --max-loras >= 2: base-model requests take one slot for the "
                          "merged adapter's correction")
    fewer = copy.copy(lora)
    object.__setattr__(fewer, "max_loras", lora.max_loras - 1)
    scheduler.lora_config = fewer  # the scheduler's copy only
    control = core._loraplex_merge = MergeControl(core, s)
    scheduler._loraplex_merge = control
    try:
        control.start()
    except ConfigError:
        if at_start:
            raise
        log.exception("loraplex: merged mode: the pinned adapter could not be merged; serving unmerged")


# vLLM loads plugins inside EngineCore.__init__: in an engine-core process that constructor is already
# running when the plugin wraps it, so the setup also runs when the busy loop starts (still before any
# request), and, as a last resort, before the first step.
def _wrap_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        setup(self)

    return __init__


def _wrap_busy_loop(orig):
    def run_busy_loop(self, *args, **kwargs):
        setup(self)
        return orig(self, *args, **kwargs)

    return run_busy_loop


def _wrap_step(orig):
    def step(self, *args, **kwargs):
        setup(self, at_start=False)
        control = control_of(self)
        if control is not None:
            control.before_step()
        return orig(self, *args, **kwargs)

    return step


def _wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        output = orig(self, *args, **kwargs)
        control = getattr(self, "_loraplex_merge", None)
        if control is not None:
            try:
                control.observe(self, output)
            except Exception:  # noqa: BLE001 - the policy must never fail a step
                log.exception("loraplex: the merge policy failed on this step")
        return output

    return schedule


def _busy_loop_classes(module) -> list:
    return [c for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, module.EngineCore) and "run_busy_loop" in vars(c)]


def patch_engine_core(module) -> None:
    from ._hooks import wrap

    wrap(module.EngineCore, "__init__", _wrap_init)
    for name in ("step", "step_with_batch_queue"):
        wrap(module.EngineCore, name, _wrap_step)
    for cls in _busy_loop_classes(module):
        wrap(cls, "run_busy_loop", _wrap_busy_loop)
    module.EngineCore.loraplex_merge = _loraplex_merge
    module.EngineCore.loraplex_merge_state = _loraplex_merge_state


def patch_scheduler(module) -> None:
    from ._hooks import wrap

    wrap(module.Scheduler, "schedule", _wrap_schedule)


def unpatch(core_module, scheduler_module) -> None:
    from ._hooks import unwrap

    if core_module is not None:
        for name in ("__init__", "step", "step_with_batch_queue"):
            unwrap(core_module.EngineCore, name)
        for cls in _busy_loop_classes(core_module):
            unwrap(cls, "run_busy_loop")
        for name in ("loraplex_merge", "loraplex_merge_state"):
            if name in vars(core_module.EngineCore):
                delattr(core_module.EngineCore, name)
    if scheduler_module is not None:
        unwrap(scheduler_module.Scheduler, "schedule")


__all__ = ["MergeControl", "control_of", "merge_adapter", "merge_state", "patch_engine_core", "patch_scheduler",
           "unpatch"]
