"""Storage backends of a catalog: what adapters a root holds (by stat, never reading weights)."""

from __future__ import annotations

import logging
import os
import stat as st
from dataclasses import dataclass

from ..errors import CatalogError, InvalidAdapter, InvalidAdapterName, StorageError
from .names import check_name, is_within

log = logging.getLogger("loraplex.catalog")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = (("adapter_model.safetensors", "safetensors"), ("adapter_model.bin", "bin"))


@dataclass(frozen=True)
class StoredAdapter:
    """One adapter as storage lists it: enough to tell whether it changed, nothing read yet."""

    name: str
    version: str
    weight_format: str  # "safetensors" | "bin"
    size_bytes: int  # weight file size
    config_path: str
    weights_path: str


class LocalStore:
    """A directory (local disk, or an S3/NFS mount) whose subdirectories are adapters."""

    remote = False

    def __init__(self, root):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise CatalogError(f"catalog path ({self.root}) does not exist or is not a directory")
        self.root_real = os.path.realpath(self.root)

    def scan(self) -> tuple[dict[str, StoredAdapter], dict[str, str]]:
        items, invalid = {}, {}
        try:
            it = os.scandir(self.root)
        except OSError as e:
            raise CatalogError(f"catalog path ({self.root}) cannot be listed: {e}") from None
        with it:
            for d in it:
                if d.name.startswith("."):
                    continue  # hidden: caches, VCS folders, temp dirs of atomic writers
                try:
                    if not d.is_dir():  # follows symlinks; stray files at the root are not adapters
                        continue
                    items[d.name] = self._stat_adapter(d.name, d.is_symlink())
                except (InvalidAdapter, InvalidAdapterName) as e:
                    invalid[d.name] = e.reason
                except OSError as e:
                    invalid[d.name] = f"cannot be read: {e.strerror or e}"
        return items, invalid

    def stat(self, name: str) -> StoredAdapter:
        """Fresh listing of one adapter (used to check a read against a changed version)."""
        check_name(name)
        path = os.path.join(self.root, name)
        try:
            if not os.path.isdir(path):
                raise FileNotFoundError(path)
            return self._stat_adapter(name, os.path.islink(path))
        except OSError as e:
            raise StorageError(name, f"cannot stat {path}: {e.strerror or e}") from None

    def _stat_adapter(self, name: str, is_link: bool) -> StoredAdapter:
        check_name(name)
        d = os.path.join(self.root, name)
        if is_link and not is_within(self.root_real, d):
            raise InvalidAdapter(name, f"symlink {d} points outside the catalog root")
        cfg = self._stat_file(name, os.path.join(d, CONFIG_FILE))
        if cfg is None:
            raise InvalidAdapter(name, f"missing {CONFIG_FILE}")
        for fname, fmt in WEIGHT_FILES:
            wpath = os.path.join(d, fname)
            w = self._stat_file(name, wpath)
            if w is not None:
                break
        else:
            raise InvalidAdapter(name, "missing adapter_model.safetensors (or adapter_model.bin)")
        version = f"{w.st_ino:x}.{w.st_mtime_ns:x}.{w.st_size:x}-{cfg.st_ino:x}.{cfg.st_mtime_ns:x}.{cfg.st_size:x}"
        return StoredAdapter(name, version, fmt, w.st_size, os.path.join(d, CONFIG_FILE), wpath)

    def _stat_file(self, name, path):
        try:
            s = os.lstat(path)
        except FileNotFoundError:
            return None
        if st.S_ISLNK(s.st_mode):
            if not is_within(self.root_real, path):
                raise InvalidAdapter(name, f"{os.path.basename(path)} is a symlink that leaves the catalog root")
            s = os.stat(path)
        if not st.S_ISREG(s.st_mode):
            raise InvalidAdapter(name, f"{os.path.basename(path)} is not a regular file")
        return s

    def read_config(self, item: StoredAdapter) -> bytes:
        from .peft import MAX_CONFIG_BYTES

        try:
            with open(item.config_path, "rb") as f:
                return f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise StorageError(item.name, f"cannot read {item.config_path}: {e.strerror or e}") from None

    def local_dir(self, item: StoredAdapter) -> str:
        return os.path.dirname(item.config_path)

    def materialize(self, item: StoredAdapter, version: str) -> str:
        """A local directory holding this version's files (for a local store: the adapter's own)."""
        return os.path.dirname(item.config_path)

    def current_version(self, item: StoredAdapter, local_dir: str) -> str | None:
        """The version on storage now (None if the adapter is gone)."""
        try:
            return self.stat(item.name).version
        except (StorageError, InvalidAdapter):
            return None
