"""Adapter names are single, visible path components; paths never leave the catalog root."""

from __future__ import annotations

import os
import re

from ..errors import InvalidAdapterName

MAX_NAME_BYTES = 255
# Everything a name may not contain: separators, control characters, and ':' (a URL scheme).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\:]")


def check_name(name) -> str:
    """Return `name` if it is a safe adapter name, else raise InvalidAdapterName with the reason."""
    # Fast path first: the scan checks every directory name of a 100k-adapter root.
    if (
        type(name) is str
        and name
        and name[0] != "."
        and _FORBIDDEN.search(name) is None
        # UTF-8 takes at most 4 bytes a character: short names need no encoding to be measured
        and (len(name) <= MAX_NAME_BYTES // 4 or len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES)
    ):
        return name
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
    if ":" in name:
        raise InvalidAdapterName(name, "':' is not allowed (it could be read as a URL scheme)")
    if _FORBIDDEN.search(name):
        raise InvalidAdapterName(name, "control characters are not allowed")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidAdapterName(name, f"longer than {MAX_NAME_BYTES} bytes")
    return name  # a str subclass that passes every check


def is_within(root_real: str, path: str) -> bool:
    """True if `path`, with every symlink resolved, lies inside the resolved root."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)
