"""The cheap weights check a catalog runs on every adapter version it lists: the safetensors header
parsed and checked against the file's size and the adapter's config (tensor names, dtypes, ranks,
targeted modules, A/B pairs), no tensor data read. `.bin` files: the zip directory only (see
weights.bin_container_problem); their shapes live in the pickle, checked only by the full load.

A verdict is None (passed), a reason (str: the adapter cannot be served), CHANGED (the files are no
longer the listed version: the next refresh lists the new one) or UNCHECKED (nothing cheap to read:
a remote adapter with no local copy and no ranged read allowed, or the store did not answer).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import stat

from ..errors import AdapterChanged, InvalidAdapter, StorageError
from .names import is_within
from .weights import bin_container_problem, header_length, layout, parse_header

log = logging.getLogger("loraplex.catalog")

CHANGED = type("Changed", (), {"__repr__": lambda self: "CHANGED"})()
UNCHECKED = type("Unchecked", (), {"__repr__": lambda self: "UNCHECKED"})()
FIRST_READ = 64 << 10  # a ranged read of this much holds the header of most adapters (~130 B a tensor)
# O_NONBLOCK: a weight file swapped for a FIFO after the scan must not hang the check.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_SYMLINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # open(O_NOFOLLOW) of a symlink: Linux, BSD


def weights_tag(s: os.stat_result) -> str:
    """The weight file's part of a local version string (store._item builds the same, inline)."""
    return f"{s.st_ino:x}.{s.st_mtime_ns:x}.{s.st_size:x}"


def check_file(name: str, spec, path: str, weight_format: str, *, version: str | None = None,
               root_real: str | None = None):
    """The verdict on the weight file at `path`. version: the listed local version; a file that is
    not its weights (replaced since the listing) is CHANGED. root_real: a symlink there must resolve
    inside it (it may have been swapped for one leading out since the scan checked it)."""
    try:
        try:
            fd = os.open(path, _OPEN_FLAGS | (_NOFOLLOW if root_real is not None else 0))
        except OSError as e:
            if e.errno not in _SYMLINK_ERRNOS:
                raise
            if not is_within(root_real, path):
                return CHANGED  # the scan refused such a link: this is a swap after it
            fd = os.open(path, _OPEN_FLAGS)  # a symlink inside the root
        try:
            s = os.fstat(fd)  # of the file read, whatever the path names by now
            if version is not None and not version.startswith(weights_tag(s) + "-"):
                return CHANGED
            if not stat.S_ISREG(s.st_mode):
                return f"{os.path.basename(path)} is not a regular file"
            if weight_format == "safetensors":
                first = _pread(fd, min(8, s.st_size), 0)
                n = header_length(name, first, s.st_size)
                return header_verdict(name, spec, _pread(fd, n, 8), s.st_size)
            if weight_format == "bin":
                with os.fdopen(os.dup(fd), "rb") as f:
                    return bin_container_problem(f, s.st_size)
            return f"unknown weight format {weight_format!r}"
        finally:
            os.close(fd)
    except InvalidAdapter as e:
        return e.reason
    except OSError as e:
        return f"{os.path.basename(path)} cannot be read: {e.strerror or e}"


def _pread(fd: int, n: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            raise InvalidAdapter("", f"adapter_model.safetensors is corrupt: file ends at byte {offset + got}, "
                                     f"expected {offset + n} (truncated under the read?)")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


# Verdicts by header bytes, file size and spec: adapters trained with one recipe have byte-identical
# headers (names, shapes, offsets; no data) and share one spec (see peft.parse_config_bytes), so a
# catalog checks each recipe once. Reasons never name the adapter. Headers are keyed by a 128-bit
# blake2b digest (a real adapter's header is ~60 KB: the bytes themselves would make this cache
# hundreds of MB); bounded, cleared when full.
_VERDICTS: dict[tuple[bytes, int, int], tuple[object, str | None]] = {}
_VERDICTS_MAX_ENTRIES = 4096


def header_verdict(name: str, spec, raw: bytes, file_size: int) -> str | None:
    """None if a safetensors header (the JSON bytes after the length) fits the file size and the
    config, else the reason."""
    key = (hashlib.blake2b(raw, digest_size=16).digest(), file_size, id(spec))
    hit = _VERDICTS.get(key)
    if hit is not None and hit[0] is spec:  # `is`: the id of a dead spec may be reused
        return hit[1]
    try:
        shapes, _ = parse_header(name, raw, file_size)
        layout(name, spec, shapes)  # names, dtypes, ranks and targets against the config
        verdict = None
    except InvalidAdapter as e:
        verdict = e.reason
    if len(_VERDICTS) >= _VERDICTS_MAX_ENTRIES:
        _VERDICTS.clear()
    _VERDICTS[key] = (spec, verdict)
    return verdict


def check_items(store, pairs, *, network: bool) -> dict:
    """{name: verdict} for [(StoredAdapter, AdapterSpec)] of one store. Remote stores read a local
    copy if one is on disk, else (network=True, safetensors) the header by ranged reads."""
    if not getattr(store, "remote", False):
        return _check_local(store, pairs)
    out, ranged = {}, []
    for item, spec in pairs:
        local = store.local_dir(item)
        if store.current_version(item, local) == item.version:  # downloaded before: intact and immutable
            out[item.name] = check_file(item.name, spec, os.path.join(local, posixpath.basename(item.weights_path)),
                                        item.weight_format)
        elif network and item.weight_format == "safetensors":
            ranged.append((item, spec))
        else:
            out[item.name] = UNCHECKED
    if ranged:
        out.update(_check_ranged(store, ranged))
    return out


def _check_local(store, pairs) -> dict:
    out = {}
    root_real = getattr(store, "root_real", None)
    for item, spec in pairs:
        v = check_file(item.name, spec, item.weights_path, item.weight_format, version=item.version,
                       root_real=root_real)
        if type(v) is str:  # a failure, unless the files were replaced or removed under the check
            try:
                now = store.current_version(item, os.path.dirname(item.config_path))
            except OSError:
                now = None
            if now != item.version:
                v = CHANGED
        out[item.name] = v
    return out


def _check_ranged(store, pairs) -> dict:
    """Header verdicts from ranged reads: one read of the first FIRST_READ bytes of every file (a
    concurrent batch), a second for headers longer than that. A failure is confirmed by a HEAD of
    both files: an object replaced since the listing is CHANGED, not corrupt."""
    out, more = {}, []
    first = _ranges(store, [(it.weights_path, 0, min(it.size_bytes, FIRST_READ)) for it, _ in pairs])
    for (item, spec), data in zip(pairs, first, strict=True):
        if isinstance(data, BaseException):
            out[item.name] = _read_error(item, data)
            continue
        try:
            n = header_length(item.name, data, item.size_bytes)
        except InvalidAdapter as e:
            out[item.name] = e.reason
            continue
        if 8 + n <= len(data):
            out[item.name] = header_verdict(item.name, spec, data[8:8 + n], item.size_bytes)
        else:
            more.append((item, spec, data, n))
    if more:
        rest = _ranges(store, [(it.weights_path, len(d), 8 + n) for it, _, d, n in more])
        for (item, spec, data, n), tail in zip(more, rest, strict=True):
            out[item.name] = (_read_error(item, tail) if isinstance(tail, BaseException)
                              else header_verdict(item.name, spec, (data + tail)[8:8 + n], item.size_bytes))
    for item, _ in pairs:
        if type(out[item.name]) is str:
            try:
                store.check_current(item)
            except AdapterChanged:
                out[item.name] = CHANGED
            except StorageError:
                out[item.name] = UNCHECKED
    return out


def _ranges(store, ranges) -> list:
    try:
        return store.fs.cat_ranges([p for p, _, _ in ranges], [s for _, s, _ in ranges], [e for _, _, e in ranges],
                                   on_error="return")
    except Exception as e:  # noqa: BLE001 - each backend raises its own types
        return [e] * len(ranges)


def _read_error(item, e: BaseException):
    if isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == errno.ENOENT:
        return CHANGED  # deleted since the listing
    log.info("weights check of LoRA adapter '%s' skipped (its header could not be read: %s)", item.name, e)
    return UNCHECKED
