"""register(): the `vllm.general_plugins` entry point. vLLM calls it in every process it starts (API
server, engine core, workers), so it is idempotent, cheap when disabled, and leaves vLLM untouched
unless asked:

  LORAPLEX_CATALOG=/dir or s3://...   kernels + catalog resolver + /v1/models listing + worker cache
  LORAPLEX_ENABLE=1                   kernels only (vLLM's own adapter loading and discovery)
  LORAPLEX_KERNELS=0                  with a catalog: keep vLLM's own punica kernels

What it installs:
  kernels         get_punica_wrapper of the CPU and CUDA platforms returns our wrapper's qualname; a
                  model whose LoRA layers need ops our wrapper lacks is refused at startup
  resolver        CatalogLoRAResolver in vLLM's LoRAResolverRegistry
  serving         OpenAIServingModels wraps (listing, deterministic ids), when the server imports it
  worker_manager  LoraplexWorkerLoRAManager, when the model runner's module is imported
  engine_core     the engine core announces every request's adapter version to the workers (their
                  ledger; queued adapters load ahead unless LORAPLEX_QUEUE_PREFETCH=0) and fails
                  only the requests whose version is lost (engine_core.py)
  overlap         LORAPLEX_OVERLAP=1 on CUDA: LoRA shrink under the base GEMM (overlap.py)
  merged mode     LORAPLEX_MERGE / LORAPLEX_MERGE_AUTO (merge_config.py): one adapter merged into the base
                  weights, chosen by the engine core (engine_merge.py), applied by every worker
                  (worker_merge.py); needs the catalog
"""

from __future__ import annotations

import logging
import os
import threading

from ._hooks import after_import, unwrap_loaded, wrap
from .catalog_handle import ENV_CATALOG

log = logging.getLogger("loraplex.vllm_plugin")

ENV_ENABLE = "LORAPLEX_ENABLE"
ENV_KERNELS = "LORAPLEX_KERNELS"
MIXIN_MODULE = "vllm.v1.worker.lora_model_runner_mixin"
RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner",  # the V1 model runner (CPU's subclasses it)
                  "vllm.v1.worker.gpu.model_runner")  # vLLM 0.33's V2 model runner (its GPU default)
ERRORS_MODULE = "vllm.entrypoints.generate.base.serving"
CHECK_MODULE = "vllm.entrypoints.serve.engine.serving"
SERVING_MODULE = "vllm.entrypoints.openai.models.serving"
METRICS_MODULE = "vllm.entrypoints.serve.instrumentator.metrics"
MANAGER_MODULE = "vllm.lora.model_manager"
LINEAR_MODULE = "vllm.model_executor.layers.linear"

_lock = threading.RLock()
_installed: set[str] = set()
_platform_originals: list[tuple[type, object]] = []
_mixin_original: list = []


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _falsy(value) -> bool:
    return str(value).strip().lower() in ("0", "false", "no", "off")


def wanted_parts(environ=None) -> set[str]:
    """The parts the environment asks for (empty: the plugin stays a no-op)."""
    environ = os.environ if environ is None else environ
    catalog = environ.get(ENV_CATALOG, "").strip()
    parts = set()
    if (catalog or _truthy(environ.get(ENV_ENABLE, ""))) and not _falsy(environ.get(ENV_KERNELS, "1")):
        parts.add("kernels")
    if "kernels" in parts:
        from .overlap import wanted

        if wanted(environ):
            parts.add("overlap")
    if catalog:
        parts |= {"resolver", "serving", "worker_manager", "engine_core"}
    return parts


def register() -> frozenset[str]:
    """Install what the environment asks for; returns the installed parts. Safe to call again."""
    parts = wanted_parts()
    if not parts:
        return frozenset(_installed)
    from .version import check_vllm_version

    check_vllm_version()  # raises UnsupportedVllmVersion with what to do
    _share_vllm_log_handlers()
    with _lock:
        for part in sorted(parts - _installed):
            _INSTALLERS[part]()
            _installed.add(part)
        return frozenset(_installed)


class _ToVllmLog(logging.Handler):
    """Hands loraplex's records to vLLM's logger at emit time (vLLM configures its handlers after
    plugins load), so they appear in vLLM's log, formatted like vLLM's own."""

    def emit(self, record):
        logging.getLogger("vllm").handle(record)


def _share_vllm_log_handlers() -> None:
    """Route loraplex's messages (resolved adapters, skipped invalid ones) into vLLM's log, unless the
    application configured logging itself."""
    ours = logging.getLogger("loraplex")
    if ours.handlers or logging.getLogger().handlers:
        return
    ours.addHandler(_ToVllmLog())
    ours.propagate = False
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


# ---- installers ------------------------------------------------------------------------------------
def _punica_qualname(cls) -> str:
    from .punica import QUALNAME

    return QUALNAME


def install_kernels() -> None:
    """Make vLLM build our punica wrapper on CPU and CUDA (it asks platform.get_punica_wrapper())."""
    from vllm.platforms import current_platform

    targets = []
    try:
        from vllm.platforms.cpu import CpuPlatform

        targets.append(CpuPlatform)
    except Exception:  # noqa: BLE001 - a build without the CPU platform
        pass
    if current_platform.is_cuda():
        from vllm.platforms.cuda import CudaPlatformBase  # importable only on CUDA builds

        targets.append(CudaPlatformBase)
    if current_platform.is_cpu() or current_platform.is_cuda():
        targets.append(type(current_platform))  # in case a subclass overrides the method
    else:
        log.warning("loraplex: platform %s is not CPU or CUDA; keeping vLLM's LoRA kernels",
                    type(current_platform).__name__)
    for cls in dict.fromkeys(targets):
        if "get_punica_wrapper" in cls.__dict__ and cls.__dict__["get_punica_wrapper"] is _BOUND:
            continue
        _platform_originals.append((cls, cls.__dict__.get("get_punica_wrapper")))
        cls.get_punica_wrapper = _BOUND
    after_import(MANAGER_MODULE, _patch_model_manager)
    log.info("loraplex: LoRA kernels installed (%s)", _punica_qualname(None))


def _patch_model_manager(module) -> None:
    """Check the LoRA layers vLLM creates for the model (compat.check_layers) as soon as it has."""

    def make(orig):
        def _create_lora_modules(self, *args, **kwargs):
            result = orig(self, *args, **kwargs)
            from .compat import check_layers

            check_layers(self.modules)
            return result

        return _create_lora_modules

    wrap(module.LoRAModelManager, "_create_lora_modules", make)


_BOUND = classmethod(_punica_qualname)


def install_resolver() -> None:
    from .resolver import install_resolver as _install

    _install()


def install_serving() -> None:
    def patch(module):
        from .serving_patch import patch_serving_models

        patch_serving_models(module)

    def patch_errors(module):
        from .serving_patch import patch_generation_errors

        patch_generation_errors(module)

    def patch_checks(module):
        from .serving_patch import patch_request_checks

        patch_request_checks(module)

    _ensure_state_dir()
    after_import(SERVING_MODULE, patch)
    after_import(ERRORS_MODULE, patch_errors)
    after_import(CHECK_MODULE, patch_checks)
    after_import(METRICS_MODULE, _patch_metrics)


def _ensure_state_dir() -> None:
    """Where workers publish what they hold (residency.py) for this server's /metrics. Created by the
    first process (the API server, or an offline LLM's); the engine and workers it starts inherit it."""
    from .residency import ENV_STATE_DIR

    if os.environ.get(ENV_STATE_DIR, "").strip():
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="loraplex-state-")
    os.environ[ENV_STATE_DIR] = path
    atexit.register(shutil.rmtree, path, True)


def _patch_metrics(module) -> None:
    """/metrics serves the registry get_prometheus_registry() returns (the global one, or a
    multiprocess one): add the residency collector to whichever it is."""
    from .residency_metrics import register_collector

    def make(orig):
        def get_prometheus_registry():
            registry = orig()
            register_collector(registry)
            return registry

        return get_prometheus_registry

    wrap(module, "get_prometheus_registry", make)


def install_worker_manager() -> None:
    def patch(module):
        from .worker_manager import LoraplexWorkerLoRAManager

        current = module.LRUCacheWorkerLoRAManager
        if current is not LoraplexWorkerLoRAManager:
            _mixin_original[:] = [(module, current)]
            module.LRUCacheWorkerLoRAManager = LoraplexWorkerLoRAManager

    def patch_runner(module):
        from .runner_patch import patch_model_runner

        patch_model_runner(module)

    def patch_linear(module):
        from .merge_weights import install_cpu_weights

        install_cpu_weights(module)

    after_import(MIXIN_MODULE, patch)
    for name in RUNNER_MODULES:
        after_import(name, patch_runner)
    after_import(LINEAR_MODULE, patch_linear)


def install_overlap() -> None:
    from .overlap import install

    install()


def install_engine_core() -> None:
    from .engine_core import CORE_MODULE, SCHEDULER_MODULE, patch_engine_core, patch_scheduler

    after_import(CORE_MODULE, patch_engine_core)
    after_import(SCHEDULER_MODULE, patch_scheduler)


_INSTALLERS = {"kernels": install_kernels, "resolver": install_resolver, "serving": install_serving,
               "worker_manager": install_worker_manager, "engine_core": install_engine_core, "overlap": install_overlap}


def unregister() -> None:
    """Undo everything register() did in this process (tests; vLLM never calls it)."""
    import sys

    with _lock:
        for cls, orig in reversed(_platform_originals):
            if orig is None:
                if "get_punica_wrapper" in cls.__dict__:
                    delattr(cls, "get_punica_wrapper")
            else:
                cls.get_punica_wrapper = orig
        _platform_originals.clear()
        for module, orig in _mixin_original:
            module.LRUCacheWorkerLoRAManager = orig
        _mixin_original.clear()
        if "resolver" in _installed:
            from .resolver import uninstall_resolver

            uninstall_resolver()
        if SERVING_MODULE in sys.modules:
            from .serving_patch import unpatch_serving_models

            unpatch_serving_models()
        from . import _hooks
        from .engine_core import CORE_MODULE, SCHEDULER_MODULE
        from .engine_core import unpatch as unpatch_engine_core
        from .overlap import MODULE as LAYERS_MODULE
        from .overlap import unpatch_layers

        unpatch_engine_core()
        unpatch_layers()
        unwrap_loaded(MANAGER_MODULE, "LoRAModelManager", "_create_lora_modules")
        if LINEAR_MODULE in sys.modules:
            from .merge_weights import uninstall_cpu_weights

            uninstall_cpu_weights()
        if any(name in sys.modules for name in RUNNER_MODULES):
            from .runner_patch import unpatch_model_runners

            unpatch_model_runners()
        if ERRORS_MODULE in sys.modules or CHECK_MODULE in sys.modules:
            from .serving_patch import unpatch_generation_errors, unpatch_request_checks

            unpatch_generation_errors()
            unpatch_request_checks()
        with _hooks._lock:
            for name in (SERVING_MODULE, MIXIN_MODULE, METRICS_MODULE, MANAGER_MODULE, CORE_MODULE, SCHEDULER_MODULE,
                         LAYERS_MODULE, ERRORS_MODULE, CHECK_MODULE, LINEAR_MODULE, *RUNNER_MODULES):
                _hooks._pending.pop(name, None)
        _installed.clear()


def installed_parts() -> frozenset[str]:
    return frozenset(_installed)
