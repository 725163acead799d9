"""Which version of a catalog adapter a vLLM request means, carried in the request itself.

vLLM knows an adapter by its int id: GPU slots, its CPU cache and a batch's adapter count are keyed by
`lora_int_id`, and prefix-cache blocks by (lora_name, lora_path). A catalog request therefore names one
*version* of its adapter in both:

- `lora_path` is `<adapter dir>#loraplex-version=<token>`: a new version gets new prefix-cache keys (its
  blocks are computed afresh), an unchanged one keeps its hits, and the worker loads exactly the version
  the token names (never another one under its keys);
- `lora_int_id` is one id per version: `1 + blake2b(name, token) mod (2**31 - 2)`, the same in every
  process and API server replica. Two versions of one name are two adapters to vLLM, so a request
  started on the old version keeps it to its last token while new requests run on the new one, in the
  same batch, in two slots. The id fits in 31 bits because vLLM 0.33's model runner keeps ids in int32
  arrays. Two versions live in one worker at once share an id with probability about L/2**31 per new
  version (L: versions the worker holds, a few hundred at most); the worker detects it and fails the
  newer version's requests with a retryable error rather than serve one version's weights for the
  other (worker_manager.py). The catalog's per-name ids (catalog/ids.py) are unchanged: they name
  adapters (get_adapter_name), version ids name what one request runs on.
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


def version_id(name: str, token: str) -> int:
    """vLLM's lora_int_id for one version (token) of catalog adapter `name`: in [1, 2**31 - 2]."""
    h = int.from_bytes(hashlib.blake2b(f"{name}\0{token}".encode(), digest_size=8).digest(), "big")
    return 1 + h % ((1 << 31) - 2)
