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
  prefetch        the engine core announces queued requests' adapters to the workers (prefetch.py)
  overlap         LORAPLEX_OVERLAP=1 on CUDA: LoRA shrink under the base GEMM (overlap.py)
"""

from __future__ import annotations

import logging
import os
import threading

from ._hooks import after_import, unwrap, wrap
from .catalog_handle import ENV_CATALOG

log = logging.getLogger("loraplex.vllm_plugin")

ENV_ENABLE = "LORAPLEX_ENABLE"
ENV_KERNELS = "LORAPLEX_KERNELS"
MIXIN_MODULE = "vllm.v1.worker.lora_model_runner_mixin"
SERVING_MODULE = "vllm.entrypoints.openai.models.serving"
METRICS_MODULE = "vllm.entrypoints.serve.instrumentator.metrics"
MANAGER_MODULE = "vllm.lora.model_manager"

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
        parts |= {"resolver", "serving", "worker_manager"}
        from .prefetch import enabled

        if enabled(environ):
            parts.add("prefetch")
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

    _ensure_state_dir()
    after_import(SERVING_MODULE, patch)
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

    after_import(MIXIN_MODULE, patch)


def install_overlap() -> None:
    from .overlap import install

    install()


def install_prefetch() -> None:
    from .prefetch import CORE_MODULE, patch_engine_core

    after_import(CORE_MODULE, patch_engine_core)


_INSTALLERS = {"kernels": install_kernels, "resolver": install_resolver, "serving": install_serving,
               "worker_manager": install_worker_manager, "prefetch": install_prefetch, "overlap": install_overlap}


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
        from .overlap import MODULE as LAYERS_MODULE
        from .overlap import unpatch_layers
        from .prefetch import CORE_MODULE, unpatch_engine_core

        unpatch_engine_core()
        unpatch_layers()
        manager_module = sys.modules.get(MANAGER_MODULE)
        if manager_module is not None:
            unwrap(manager_module.LoRAModelManager, "_create_lora_modules")
        from . import _hooks

        with _hooks._lock:
            _hooks._pending.pop(SERVING_MODULE, None)
            _hooks._pending.pop(MIXIN_MODULE, None)
            _hooks._pending.pop(METRICS_MODULE, None)
            _hooks._pending.pop(MANAGER_MODULE, None)
            _hooks._pending.pop(CORE_MODULE, None)
            _hooks._pending.pop(LAYERS_MODULE, None)
        _installed.clear()


def installed_parts() -> frozenset[str]:
    return frozenset(_installed)
