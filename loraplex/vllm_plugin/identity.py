"""Which version of a catalog adapter a vLLM request means, carried in the request itself.

vLLM keys prefix-cache blocks by (lora_name, lora_path) and keeps them across an in-place reload, so
an adapter republished under the same name would be served with KV computed by its old weights. A
catalog request therefore names its version in lora_path: `<adapter dir>#loraplex-version=<token>`.
A new version gets new cache keys (its blocks are computed afresh), an unchanged one keeps its hits,
and the worker loads exactly the version the token names (never another one under its keys).
"""

from __future__ import annotations

import hashlib

SEP = "#loraplex-version="


def version_token(version) -> str:
    """A short, stable token of a catalog version (the same in every process)."""
    return hashlib.blake2b(repr(version).encode(), digest_size=8).hexdigest()


def catalog_path(local_dir: str, version) -> str:
    """lora_path of a request for this version of a catalog adapter."""
    return f"{local_dir}{SEP}{version_token(version)}"


def split_path(lora_path: str) -> tuple[str, str | None]:
    """(directory, version token) of a lora_path; the token is None for paths not made here."""
    head, sep, token = lora_path.rpartition(SEP)
    if not sep or not token:
        return lora_path, None
    return head, token
