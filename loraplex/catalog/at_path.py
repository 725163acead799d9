"""Reading one version of an adapter from the directory it was listed in, after the catalog moved on.

Publishers that swap a symlink (`name -> .versions/v7`, replaced atomically by `name -> .versions/v8`)
leave the old version's files in place. A request resolved to v7 just before the swap must still run
on v7, and the catalog's own reads only ever give the current version. read_version_at() reads a
version from the real directory it lived in, as long as its files there are unchanged.
"""

from __future__ import annotations

import json
import os

from ..errors import AdapterChanged, InvalidAdapter
from .names import is_within
from .peft import MAX_CONFIG_BYTES, parse_config_bytes
from .store import read_config_file, stat_adapter_dir
from .weights import read_tensors


def read_version_at(name: str, directory: str, root_real: str, want) -> tuple[dict, dict]:
    """(config dict, checked tensors) of the adapter files in `directory` (a real directory inside
    `root_real`), if want(version) is true for their version; AdapterChanged otherwise, or if they
    change while they are read."""
    directory = os.path.realpath(directory)
    if not is_within(root_real, directory):
        raise InvalidAdapter(name, f"{directory} is outside the catalog root")
    try:
        item = stat_adapter_dir(name, directory, root_real)
    except (InvalidAdapter, OSError):
        raise AdapterChanged(name, None, None) from None  # gone, or no longer an adapter
    if not want(item.version):
        raise AdapterChanged(name, None, item.version)
    raw = read_config_file(name, item.config_path, root_real)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(name, f"adapter_config.json is over {MAX_CONFIG_BYTES} bytes")
    spec = parse_config_bytes(name, raw)
    try:
        _, tensors = read_tensors(name, item.weights_path, item.weight_format, spec)
    except (InvalidAdapter, OSError):
        _check_unchanged(name, directory, root_real, item.version)
        raise
    _check_unchanged(name, directory, root_real, item.version)
    return json.loads(raw), tensors


def _check_unchanged(name, directory, root_real, version) -> None:
    try:
        now = stat_adapter_dir(name, directory, root_real).version
    except (InvalidAdapter, OSError):
        now = None
    if now != version:
        raise AdapterChanged(name, version, now)
