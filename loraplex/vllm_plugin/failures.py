"""Failing the requests whose adapter version cannot be loaded, and nothing else.

A request is bound to one adapter version (identity.py) and the worker keeps that version loadable
until the request finishes (ledger.py). It can still be lost: storage replaced or deleted it before any
worker read it, its files turned out unreadable, or a new version's id collides with a live one. vLLM
has no way for a worker to fail one request, so a worker that cannot load a version runs that step's
rows without an adapter (their tokens are thrown away) and reports the requests here; the engine core
then drops their tokens, evicts their KV blocks from the prefix cache (they were computed without the
adapter) and finishes them as errors; the API server answers them with a 503 naming the adapter.

The three processes share LORAPLEX_STATE_DIR: workers write `failed/<request>`, the engine core turns
each into `errors/<request>` after finishing the request, the API server reads and removes that. A
file per request keeps every step free of work when nothing failed (one scandir of an empty
directory) and needs no channel vLLM does not already have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

from .residency import ENV_STATE_DIR

log = logging.getLogger("loraplex.vllm_plugin")

FAILED, ERRORS = "failed", "errors"
STALE_S = 600.0  # records nobody claimed (a request of another engine, an offline LLM) are dropped


def _dir(kind: str) -> str | None:
    root = os.environ.get(ENV_STATE_DIR, "").strip()
    return os.path.join(root, kind) if root else None


def _file_name(req_id: str) -> str:
    """Request ids are client-chosen text: hex keeps them safe as file names and keeps the prefix
    property the API server needs (its id is a prefix of the engine's)."""
    raw = req_id.encode()
    head = raw[:100].hex()
    return head if len(raw) <= 100 else f"{head}.{hashlib.blake2b(raw, digest_size=8).hexdigest()}"


def _write(kind: str, req_id: str, message: str) -> None:
    directory = _dir(kind)
    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _file_name(req_id))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"request_id": req_id, "message": message}, f)
    os.replace(tmp, path)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report(req_ids, message: str) -> None:
    """Worker: these requests cannot run (message names the adapter and why)."""
    for req_id in req_ids:
        try:
            _write(FAILED, req_id, message)
        except OSError:
            log.exception("loraplex: could not report failed request %s", req_id)


def take_reported(known) -> dict[str, str]:
    """Engine core: {request id: message} of reported requests for which known(request id) is true,
    removed from the directory; other engines' records are left alone until they are stale."""
    directory = _dir(FAILED)
    if directory is None:
        return {}
    out = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    now = time.time()
    for entry in entries:
        if entry.name.endswith(".tmp"):
            continue
        record = _read(entry.path)
        mine = record is not None and known(record.get("request_id"))
        if mine:
            out[record["request_id"]] = str(record.get("message", ""))
        if mine or record is None or _older_than(entry, now):
            _remove(entry.path)
    return out


def publish_error(req_id: str, message: str) -> None:
    """Engine core: the request was finished as an error; tell the API server why."""
    try:
        _write(ERRORS, req_id, message)
        directory = _dir(ERRORS)
        now = time.time()
        for entry in os.scandir(directory):
            if _older_than(entry, now):
                _remove(entry.path)
    except OSError:
        log.exception("loraplex: could not record why request %s failed", req_id)


def take_error(api_request_id: str) -> str | None:
    """API server: why the engine failed this request (the API id is a prefix of the engine's), or
    None if loraplex did not fail it."""
    directory = _dir(ERRORS)
    if directory is None or not api_request_id:
        return None
    prefix = _file_name(api_request_id)[:200].split(".")[0]
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix) and not e.name.endswith(".tmp")]
    except FileNotFoundError:
        return None
    for entry in entries:
        record = _read(entry.path)
        if record is not None and str(record.get("request_id", "")).startswith(api_request_id):
            _remove(entry.path)
            return str(record.get("message", ""))
    return None


def _older_than(entry, now: float) -> bool:
    try:
        return now - entry.stat().st_mtime > STALE_S
    except OSError:
        return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
