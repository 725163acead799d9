"""Adapters on an object store (s3://, gs://, memory://, http...) through fsspec.

A scan is one recursive listing (never a request per adapter); an adapter's version is built from
the ETags and sizes of its two files. Weights are downloaded on demand into a local cache directory:
into a temp dir first, checked against the listed version before and after, then renamed into
`<cache_dir>/<name>/<version hash>/` in one step, so a reader never sees a partial or mixed copy.
Materialized versions are immutable; disk_cache.py keeps them within `cache_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import AdapterChanged, CatalogError, InvalidAdapter, InvalidAdapterName, StorageError
from .disk_cache import DiskCache
from .names import check_name
from .store import CONFIG_FILE, WEIGHT_FILES, StoredAdapter

log = logging.getLogger("loraplex.catalog")

# Metadata that changes whenever an object's bytes do, best first. S3/HTTP give ETag, GCS etag or
# md5Hash, local/memory filesystems only a timestamp. Listing and HEAD must pick the same key.
_TAG_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated",
             "created")
_PLAIN_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class RemoteAdapter(StoredAdapter):
    """A listed remote adapter; config_path/weights_path are paths of the store's fsspec filesystem."""

    config_size: int = 0
    config_tag: str = ""


class RemoteStore:
    """An fsspec URL whose immediate "subdirectories" are adapters, served from a local cache."""

    remote = True

    def __init__(self, root: str, *, cache_dir=None, cache_bytes: int = 20 << 30, storage_options=None):
        import fsspec

        self.root = _check_url(root)
        opts = dict(storage_options or {})
        opts.setdefault("skip_instance_cache", True)  # our own client: options and state not shared
        opts["use_listings_cache"] = False  # a cached listing would hide changes from scan() and HEADs
        try:
            self.fs, path = fsspec.core.url_to_fs(self.root, **opts)
        except Exception as e:  # noqa: BLE001 - unknown protocol, missing backend package, bad options
            raise CatalogError(f"catalog URL {self.root} cannot be opened: {_why(e)}") from None
        self._base = path.rstrip("/")  # _check_url refused an empty one
        self.cache_dir = os.path.abspath(os.fspath(cache_dir or default_cache_dir(self.root)))
        self._cache = DiskCache(self.cache_dir, cache_bytes, self.root)
        self.cache_bytes = self._cache.cache_bytes

    # ---- listing --------------------------------------------------------------------------------
    def scan(self) -> tuple[dict[str, RemoteAdapter], dict[str, str]]:
        try:
            # No maxdepth: s3fs answers an unbounded find with one paginated ListObjectsV2, while a
            # maxdepth makes it walk (one request per adapter). Deeper objects are filtered out below.
            listing = self.fs.find(self._base, withdirs=True, detail=True)
        except FileNotFoundError:
            raise CatalogError(f"catalog URL {self.root} does not exist (no such bucket or directory)") from None
        except Exception as e:  # noqa: BLE001 - each backend raises its own types (botocore, aiohttp, OSError)
            raise StorageError(None, f"cannot list {self.root}: {_why(e)}") from None
        items, invalid = self._items(self._group(listing))
        self._prefetch_configs(items.values())
        return items, invalid

    def scan_names(self, names) -> tuple[dict[str, RemoteAdapter], dict[str, str]]:
        """scan(), limited to these adapters: one listing of each one's prefix instead of the whole
        catalog (a request for a name published a moment ago). A name that is gone appears in neither."""
        found, invalid = {}, {}
        for name in names:
            try:
                listing = self.fs.find(f"{self._base}/{check_name(name)}", withdirs=True, detail=True)
            except InvalidAdapterName as e:
                invalid[name] = e.reason
                continue
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - each backend raises its own types
                raise StorageError(name, f"cannot list {self.root}/{name}: {_why(e)}") from None
            found.update({n: d for n, d in self._group(listing).items() if n == name})
        items, bad = self._items(found)
        return items, {**invalid, **bad}

    def _group(self, listing) -> dict[str, dict[str, dict]]:
        """{adapter name: {file name: info}} of an fsspec listing under the root (hidden names,
        stray root objects and deeper objects left out; an empty adapter dir maps to {})."""
        files: dict[str, dict[str, dict]] = {}
        for path, info in listing.items():
            path = path.rstrip("/")
            rel = path[len(self._base) + 1:] if path.startswith(self._base + "/") else ""
            if not rel:
                continue
            parts = rel.split("/")
            if not parts[0] or parts[0].startswith("."):
                continue  # hidden: caches, temp objects of uploaders
            if len(parts) == 1:
                if info.get("type") == "directory":
                    files.setdefault(parts[0], {})  # an empty adapter dir is reported as invalid
                continue  # a stray object at the root is not an adapter
            d = files.setdefault(parts[0], {})
            if len(parts) == 2 and info.get("type") == "file":
                d[parts[1]] = info
        return files

    def _items(self, files):
        items, invalid = {}, {}
        for name, d in files.items():
            try:
                items[name] = self._item(name, d)
            except (InvalidAdapter, InvalidAdapterName) as e:
                invalid[name] = e.reason
        return items, invalid

    def _prefetch_configs(self, items) -> None:
        """Fetch the configs read_config() is about to ask for (those not cached) in one concurrent
        batch, so a cold start over thousands of adapters is not one GET after another. Only configs
        whose ETag is their MD5 are kept (checkable without a HEAD); read_config() does the rest."""
        from .peft import MAX_CONFIG_BYTES

        todo = {it.config_path: it for it in items
                if _MD5.fullmatch(it.config_tag) and it.config_size <= MAX_CONFIG_BYTES
                and not any(c in it.config_path for c in "*?[")  # glob characters would make cat() list
                and not os.path.exists(self._config_cache(it))}
        if len(todo) < 2:
            return
        try:
            got = self.fs.cat(list(todo), on_error="return")
        except Exception as e:  # noqa: BLE001 - only a shortcut: read_config() fetches again and reports
            log.debug("config prefetch from %s failed: %s", self.root, _why(e))
            return
        for path, data in got.items():
            it = todo.get(path)
            if it is not None and isinstance(data, bytes) and _md5_matches(data, it):
                self._cache.write_atomic(self._config_cache(it), data)

    def _item(self, name: str, files: dict[str, dict]) -> RemoteAdapter:
        check_name(name)
        cinfo = files.get(CONFIG_FILE)
        if cinfo is None:
            raise InvalidAdapter(name, f"missing {CONFIG_FILE}")
        for fname, fmt in WEIGHT_FILES:
            winfo = files.get(fname)
            if winfo is not None:
                break
        else:
            raise InvalidAdapter(name, "missing adapter_model.safetensors (or adapter_model.bin)")
        prefix = f"{self._base}/{name}"
        return RemoteAdapter(name, _version(winfo, cinfo), fmt, int(winfo["size"]), f"{prefix}/{CONFIG_FILE}",
                             f"{prefix}/{fname}", config_size=int(cinfo["size"]), config_tag=_tag(cinfo))

    # ---- reading --------------------------------------------------------------------------------
    def read_config(self, item: RemoteAdapter) -> bytes:
        """The config bytes of this version: from the local copy or the config cache when present,
        else one small GET (plus a HEAD when its bytes cannot be checked against the ETag)."""
        from .peft import MAX_CONFIG_BYTES

        if item.config_size > MAX_CONFIG_BYTES:  # refuse before downloading anything
            raise InvalidAdapter(item.name, f"{CONFIG_FILE} is {item.config_size} bytes (limit {MAX_CONFIG_BYTES})")
        cached = self._config_cache(item)
        for path in (os.path.join(self.local_dir(item), CONFIG_FILE), cached):
            try:
                with open(path, "rb") as f:
                    return f.read(MAX_CONFIG_BYTES + 1)
            except OSError:
                pass
        with _storage_errors(item, f"read {self.root}/{item.name}/{CONFIG_FILE}"):
            data = self.fs.cat_file(item.config_path, start=0, end=MAX_CONFIG_BYTES + 1)
            # A single-part S3 upload's ETag is the MD5 of its bytes: a match proves we read this
            # version. Otherwise (multipart, SSE-KMS, other stores) a HEAD must still show it.
            if not _md5_matches(data, item):
                info = self.fs.info(item.config_path)
                if _tag(info) != item.config_tag or int(info["size"]) != len(data):
                    raise AdapterChanged(item.name, item.version, None)
        self._cache.write_atomic(cached, data)
        return data

    def _config_cache(self, item: RemoteAdapter) -> str:
        return os.path.join(self._cache.configs, _digest(f"{item.name}\0{item.config_tag}\0{item.config_size}"))

    def local_dir(self, item: StoredAdapter) -> str:
        check_name(item.name)  # the name becomes a path component: it must not leave the cache dir
        return os.path.join(self.cache_dir, item.name, _digest(item.version))

    def current_version(self, item: StoredAdapter, local_dir: str) -> str | None:
        """A materialized copy never changes: it is `item.version` while it is intact on disk."""
        if local_dir == self.local_dir(item) and _intact(item, local_dir):
            return item.version
        return None

    def materialize(self, item: RemoteAdapter, version: str) -> str:
        """A local directory with exactly this version's files, downloaded once and then reused
        (also while the store is unreachable)."""
        if version != item.version:
            raise AdapterChanged(item.name, version, item.version)
        final = self.local_dir(item)
        key = (item.name, os.path.basename(final))
        with self._cache.key_lock(key):  # concurrent callers of one version share one download
            if self._cache.hit(key, final, lambda: _intact(item, final)):
                return final
            with self._cache.reserve(key, item.name, item.size_bytes + item.config_size):
                self._download(item, final)
        return final

    def _download(self, item: RemoteAdapter, final: str) -> None:
        tmp = self._cache.new_tmp()
        try:
            with _storage_errors(item, f"download {self.root}/{item.name}"):
                self._download_into(item, tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing partial survives a failure

    def _download_into(self, item: RemoteAdapter, tmp: str, final: str) -> None:
        os.makedirs(tmp)
        self._check_remote(item)
        for rpath in (item.config_path, item.weights_path):
            lpath = os.path.join(tmp, posixpath.basename(rpath))
            self.fs.get_file(rpath, lpath)
            os.chmod(lpath, 0o444)  # the copy is immutable: current_version() relies on it
        self._check_remote(item)  # unchanged after the download: what we hold is this version
        if not _intact(item, tmp):
            raise OSError("the download was truncated (sizes differ from the listing)")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.lexists(final):  # a damaged earlier copy: replace it whole
            shutil.rmtree(self._cache.hide(final), ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _intact(item, final):  # else another process sharing the cache got there first
                raise

    def check_current(self, item: RemoteAdapter) -> None:
        """Raise AdapterChanged unless storage still holds this version (a HEAD of each file), or
        StorageError if it does not answer."""
        with _storage_errors(item, f"check {self.root}/{item.name}"):
            self._check_remote(item)

    def _check_remote(self, item: RemoteAdapter) -> None:
        now = _version(self.fs.info(item.weights_path), self.fs.info(item.config_path))
        if now != item.version:
            raise AdapterChanged(item.name, item.version, now)


def default_cache_dir(root: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loraplex", _digest(root))


def _check_url(root: str) -> str:
    """The URL without trailing '/', refused if a '.'/'..' segment could move it off its prefix."""
    scheme, sep, rest = str(root).partition("://")
    rest = rest.rstrip("/")
    if not sep or not scheme or not rest:
        raise CatalogError(f"catalog URL {root!r} is not of the form scheme://bucket/prefix")
    if "\\" in rest or any(unquote(seg) in (".", "..") for seg in rest.split("/")):
        raise CatalogError(f"catalog URL {root!r} has a '.', '..' or '\\' path segment; refused so that it "
                           "cannot leave its prefix")
    return f"{scheme}://{rest}"


def _tag(info: dict) -> str:
    """A short, path-safe token of the first change-revealing field of an object's metadata."""
    for k in _TAG_KEYS:
        v = info.get(k)
        if v is None or v == "":
            continue
        if hasattr(v, "timestamp"):  # datetimes: listing and HEAD may report different time zones
            v = v.timestamp()
        s = str(v).strip('"')
        return s if _PLAIN_TAG.fullmatch(s) else _digest(s)
    return ""  # no such field: the size alone must tell versions apart


def _version(winfo: dict, cinfo: dict) -> str:
    return f"{_tag(winfo)}.{int(winfo['size']):x}+{_tag(cinfo)}.{int(cinfo['size']):x}"


def _md5_matches(data: bytes, item: RemoteAdapter) -> bool:
    return (len(data) == item.config_size and _MD5.fullmatch(item.config_tag) is not None
            and hashlib.md5(data, usedforsecurity=False).hexdigest() == item.config_tag)


def _digest(s: str) -> str:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _intact(item: StoredAdapter, d: str) -> bool:
    try:
        return (os.path.getsize(os.path.join(d, CONFIG_FILE)) == getattr(item, "config_size", -1)
                and os.path.getsize(os.path.join(d, posixpath.basename(item.weights_path))) == item.size_bytes)
    except OSError:
        return False


@contextlib.contextmanager
def _storage_errors(item: StoredAdapter, what: str):
    """A file gone from storage means the version changed; any other backend error (each raises its
    own types: botocore, aiohttp, OSError) is a StorageError naming the adapter."""
    try:
        yield
    except FileNotFoundError:
        raise AdapterChanged(item.name, item.version, None) from None
    except CatalogError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StorageError(item.name, f"cannot {what}: {_why(e)}") from None


def _why(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    return f"{type(e).__name__}: {msg}"[:400]
