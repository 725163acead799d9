"""Adapter names are single, visible path components; paths never leave the catalog root."""

from __future__ import annotations

import os

from ..errors import InvalidAdapterName

MAX_NAME_BYTES = 255


def check_name(name) -> str:
    """Return `name` if it is a safe adapter name, else raise InvalidAdapterName with the reason."""
    if not isinstance(name, str):
        raise InvalidAdapterName(name, f"names are strings, got {type(name).__name__}")
    if not name:
        raise InvalidAdapterName(name, "empty name")
    if name in (".", ".."):
        raise InvalidAdapterName(name, "'.' and '..' are not adapter names")
    if name.startswith("."):
        raise InvalidAdapterName(name, "hidden names (starting with '.') are not adapters")
    if "/" in name or "\\" in name:
        raise InvalidAdapterName(name, "names are a single path component (no '/' or '\\')")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidAdapterName(name, "control characters are not allowed")
    if ":" in name:
        raise InvalidAdapterName(name, "':' is not allowed (it could be read as a URL scheme)")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidAdapterName(name, f"longer than {MAX_NAME_BYTES} bytes")
    return name


def is_within(root_real: str, path: str) -> bool:
    """True if `path`, with every symlink resolved, lies inside the resolved root."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)
