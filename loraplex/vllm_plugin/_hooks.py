"""Run a callback right after a module is imported (or now, if it already is).

The plugin is loaded in every vLLM process, but each patch matters in one kind of process only: the
worker LoRA manager in workers, the model listing in the API server. Importing those vLLM modules
eagerly would cost seconds in processes that never use them (vllm.lora.worker_manager alone takes
~3 s), so the patches wait for vLLM itself to import the module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable

log = logging.getLogger("loraplex.vllm_plugin")

_lock = threading.Lock()
_pending: dict[str, list[Callable]] = {}


def _run(callbacks, module):
    for cb in callbacks:
        try:
            cb(module)
        except Exception:  # noqa: BLE001 - a failed patch must not break vLLM's import
            log.exception("loraplex: patching %s failed", module.__name__)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner = inner
        self.name = name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self.name, [])
        _run(callbacks, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched name it asks the other finders and wraps their loader."""

    _busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_finder = _Finder()


def after_import(name: str, callback: Callable) -> None:
    """callback(module) once `name` is imported: now if it already is, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        _run([callback], module)
        return
    with _lock:
        _pending.setdefault(name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        # Imported by another thread between the first check and now (and already past our finder)?
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        done = module is not None and not getattr(spec, "_initializing", False)
        callbacks = _pending.pop(name, []) if done and not isinstance(getattr(spec, "loader", None), _Loader) else []
    _run(callbacks, module)


def wrap(owner, attr: str, make: Callable) -> None:
    """owner.attr = make(original), once: a second call (vLLM loads plugins in every process, maybe
    more than once) finds it wrapped. owner: a class (its own attribute, not an inherited one) or a
    module. The wrapper remembers the original for unwrap()."""
    current = vars(owner)[attr]
    if getattr(current, "__loraplex_wrapped__", None) is None:
        new = make(current)
        new.__loraplex_wrapped__ = current
        setattr(owner, attr, new)


def unwrap(owner, attr: str) -> None:
    """Undo wrap() (no-op if owner.attr is not ours)."""
    orig = getattr(vars(owner).get(attr), "__loraplex_wrapped__", None)
    if orig is not None:
        setattr(owner, attr, orig)


def unwrap_loaded(module_name: str, owner: str, *attrs: str) -> None:
    """unwrap() `attrs` of class `owner` of module `module_name`, if that module was imported."""
    module = sys.modules.get(module_name)
    if module is not None:
        for attr in attrs:
            unwrap(getattr(module, owner), attr)
