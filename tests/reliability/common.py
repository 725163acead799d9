"""Shared pieces of the reliability tests: safetensors bytes built by hand (so headers can be made
wrong in every way), adapter directories written from bytes, an independent reference reader (the
safetensors package itself), and a peak-RSS probe."""

from __future__ import annotations

import json
import os
import resource
import struct

import torch

from loraplex.errors import LoraplexError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header, data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw JSON bytes) and data; `length` overrides the
    8-byte header length field (which may then lie)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    return struct.pack("<Q", n % (1 << 64)) + hb + data


def write_adapter(root, name: str, config: bytes, weights: bytes) -> str:
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    for fname, body in ((CONFIG, config), (WEIGHTS, weights)):
        tmp = os.path.join(d, f".{fname}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, os.path.join(d, fname))  # a new inode: the catalog's version always changes
    return d


def reference_load(raw: bytes):
    """What the safetensors package makes of these bytes: {key: tensor}, or None if it refuses."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError):  # torch's view() too
        return None


def outcome(fn, *args, **kw):
    """("ok", result) or ("error", LoraplexError); anything else propagates and fails the test."""
    try:
        return "ok", fn(*args, **kw)
    except LoraplexError as e:
        assert str(e), "an error without a message"
        return "error", e


def same_tensors(a: dict, b: dict) -> bool:
    """Bitwise equality (dtype, shape, bytes) of two {key: tensor} dicts."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident set now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
