"""The non-blocking half of the Runtime API, for schedulers that must not stall a step on storage:
ensure() starts what is missing and reports, poll() reports progress, load_many() waits for a set.

"ready" means a plan for the adapter will not wait for storage (it is in the host cache or on the
GPU); uploading from the host cache is left to the plan, which needs a slot anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

from ..errors import AdapterChanged, CapacityError, LoraplexError, StorageError

if TYPE_CHECKING:
    from ..catalog.base import CatalogBase
    from ..config import RuntimeConfig
    from .host_cache import HostCache
    from .loader import Loader
    from .pool import SlotPool


class SchedulingMixin:
    """Mixed into Runtime; uses its catalog, host, pool, loader and config."""

    if TYPE_CHECKING:  # Runtime's, for type checkers
        catalog: CatalogBase
        config: RuntimeConfig
        host: HostCache
        pool: SlotPool
        loader: Loader
        _watched: dict[str, None]
        _errors: dict[str, BaseException]

        def _reclaim(self) -> None: ...

    def ensure(self, names: Iterable[str | None]) -> dict[str, str]:
        """{name: "ready" | "loading" | "failed"} without blocking; starts loads of what is missing.
        ready: a plan will not wait for storage. failed: error(name) says why. A load that failed on
        storage or for room (StorageError, CapacityError: transient) is reported failed once, then
        tried again by the next ensure(); invalid files stay failed until a refresh sees a change."""
        return self._ensure(names, fresh=True)

    def _ensure(self, names: Iterable[str | None], fresh: bool) -> dict[str, str]:
        self._reclaim()
        out: dict[str, str] = {}
        for name in dict.fromkeys(n for n in names if n is not None):
            out[name] = self._status(name, fresh=fresh)
            if out[name] == "loading":
                self._watched[name] = None
        return out

    def poll(self) -> dict[str, str]:
        """Progress of the names ensure() reported as loading: {name: status}; final ones are dropped."""
        out = self._ensure(list(self._watched), fresh=False)  # reports a failure once, never retries it
        for name, status in out.items():
            if status != "loading":
                self._watched.pop(name, None)
        return out

    def error(self, name: str) -> BaseException | None:
        """Why `name` failed in ensure()/poll()/load_many(), or None."""
        return self._errors.get(name)

    def _status(self, name: str, retry: bool = True, fresh: bool = False) -> str:
        try:
            entry = self.catalog.get(name)
        except LoraplexError as e:
            self._errors[name] = e
            return "failed"
        key = entry.key
        if key in self.host or self.pool.resident(key) is not None:
            self._errors.pop(name, None)
            return "ready"
        err = self.loader.failures.get(key)
        if isinstance(err, AdapterChanged) and retry:
            self.catalog.refresh()
            return self._status(name, retry=False, fresh=fresh)
        if fresh and isinstance(err, (StorageError, CapacityError)) and getattr(err, "_reported", False):
            # The version is unchanged, so without this a store that was down (or a full cache) would
            # fail every later request for the adapter, even once it is back. Each failed load is
            # reported once (so a caller that only calls ensure() sees it); the next request retries.
            self.loader.failures.pop(key, None)
            err = None
        if err is not None:
            err._reported = True
            self._errors[name] = err
            return "failed"
        if not self.loader.loading(key):
            try:
                fut = self.loader.acquire(entry, claim=False)
            except RuntimeError as e:  # the loader was shut down
                self._errors[name] = e
                return "failed"
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                return "ready"
        return "loading"

    def prefetch(self, names: Iterable[str | None]) -> None:
        """Start loading `names` into the host cache (non-blocking)."""
        self.ensure(names)

    def load_many(self, names: Iterable[str | None], timeout: float | None = None) -> dict[str, str]:
        """Load `names` into the host cache, in parallel, blocking: {name: "ready" | "failed"}."""
        timeout = self.config.load_timeout_s if timeout is None else timeout
        status = self.ensure(names)
        futs: list[Future] = []
        for name, s in status.items():
            if s == "loading":
                with contextlib.suppress(LoraplexError):
                    futs.append(self.loader.acquire(self.catalog.get(name), claim=False))
        wait(futs, timeout=timeout)
        return {n: ("loading" if s == "loading" else s)
                for n, s in self._ensure(list(status), fresh=False).items()}  # report, not retry


__all__ = ["SchedulingMixin"]
