"""The remote store's local disk cache: materialized versions under `<cache_dir>/<name>/<version hash>/`,
evicted whole, least recently used first, to stay within `cache_bytes`; temp files and hidden deletes.

One process owns a cache dir's budget (processes sharing one stay correct, since every write is an
atomic rename, but each counts only its own bytes). The LRU order survives a restart through the
directories' mtimes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from ..errors import CapacityError, CatalogError

log = logging.getLogger("loraplex.catalog")

_TMP, _CONFIGS = ".tmp", ".configs"  # hidden, so never taken for adapter names


class DiskCache:
    def __init__(self, cache_dir: str, cache_bytes: int, label: str):
        if int(cache_bytes) <= 0:
            raise CatalogError(f"cache_bytes must be positive, got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self.dir = cache_dir
        self._label = label  # the catalog URL, for messages
        self._tmp = os.path.join(cache_dir, _TMP)
        self.configs = os.path.join(cache_dir, _CONFIGS)
        try:
            os.makedirs(self._tmp, exist_ok=True)
            os.makedirs(self.configs, exist_ok=True)
        except OSError as e:
            raise CatalogError(f"cache dir {cache_dir} for {label} cannot be created: {e}") from None
        self._lock = threading.Lock()  # guards everything below
        self._lru: OrderedDict[tuple[str, str], int] = OrderedDict()  # (name, vhash) -> bytes, oldest first
        self._used = 0  # sum of self._lru's values
        self._reserved = 0  # bytes of downloads in flight, counted against the budget before they land
        self._busy: set[tuple[str, str]] = set()  # keys being materialized: never evicted
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._clean_tmp()
        self._index_disk()

    def key_lock(self, key) -> threading.Lock:
        """One lock per version: concurrent callers of one version share one download."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def hit(self, key, path: str, intact: Callable[[], bool]) -> bool:
        """Is this version on disk (`intact()`)? If so mark it most recently used. Under the lock, so
        an eviction cannot remove it between the check and the caller's use."""
        with self._lock:
            if not intact():
                return False
            if key not in self._lru:  # materialized by another process sharing the cache dir
                self._lru[key] = dir_bytes(path)
                self._used += self._lru[key]
            self._lru.move_to_end(key)
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU order survives a restart (see _index_disk)
        return True

    @contextlib.contextmanager
    def reserve(self, key, name: str, size: int):
        """Count `size` bytes against the budget while the body writes the version (evicting least
        recently used versions first); the version is cached once the body returns."""
        if size > self.cache_bytes:
            raise CapacityError(f"LoRA adapter '{name}' is {size} bytes, more than the whole cache budget "
                                f"for {self._label} (cache_bytes={self.cache_bytes}); raise cache_bytes")
        victims = []
        with self._lock:
            self._busy.add(key)
            while self._used + self._reserved + size > self.cache_bytes:
                victim = next((k for k in self._lru if k not in self._busy), None)
                if victim is None:
                    self._busy.discard(key)
                    raise CapacityError(f"LoRA adapter '{name}' ({size} bytes) does not fit in the cache of "
                                        f"{self._label}: downloads in flight fill cache_bytes={self.cache_bytes}")
                self._used -= self._lru.pop(victim)
                victims.append(self.hide(os.path.join(self.dir, *victim)))
            self._reserved += size
        for path in victims:
            shutil.rmtree(path, ignore_errors=True)
        done = False
        try:
            yield
            done = True
        finally:
            with self._lock:
                self._reserved -= size
                self._busy.discard(key)
                if done:
                    self._used += size - self._lru.pop(key, 0)
                    self._lru[key] = size

    def _index_disk(self) -> None:
        """Adopt the versions already materialized (oldest use first); trim to the budget."""
        found = []
        for name in listdir(self.dir):
            if name.startswith("."):
                continue
            for vh in listdir(os.path.join(self.dir, name)):
                path = os.path.join(self.dir, name, vh)
                with contextlib.suppress(OSError):
                    found.append((os.stat(path).st_mtime_ns, (name, vh), dir_bytes(path)))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._used += size
        while self._lru and self._used > self.cache_bytes:
            key, size = self._lru.popitem(last=False)
            self._used -= size
            shutil.rmtree(self.hide(os.path.join(self.dir, *key)), ignore_errors=True)

    # ---- temp files -----------------------------------------------------------------------------
    def new_tmp(self) -> str:
        # The pid lets a later process tell leftovers of a dead one from live downloads of another.
        return os.path.join(self._tmp, f"{os.getpid()}-{uuid.uuid4().hex}")

    def hide(self, path: str) -> str:
        """Move a version out of sight in one rename, so no reader finds it half deleted."""
        dest = self.new_tmp()
        try:
            os.rename(path, dest)
            return dest
        except OSError:
            return path

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = self.new_tmp()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # the config cache only saves requests: failing to fill it is harmless
            log.debug("cannot cache %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # still there only if writing failed

    def _clean_tmp(self) -> None:
        for entry in listdir(self._tmp):
            pid = entry.split("-", 1)[0]
            if pid.isdigit() and alive(int(pid)):
                continue
            path = os.path.join(self._tmp, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def dir_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
