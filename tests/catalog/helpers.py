"""Test helpers for the catalog: PEFT-format files written by hand, and observers of file access
that do not go through loraplex (Python audit events, inotify), so tests can prove what was read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
HIDDEN = 64  # the tiny Llama of loraplex.toy: q/o 64 -> 64, k/v 64 -> 32, mlp 64 <-> 128
_DROP = object()
DROP = _DROP  # peft_config(r=DROP) leaves the key out


def peft_config(**overrides) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA."""
    cfg = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
        "fan_in_fan_out": False, "modules_to_save": None, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama", "inference_mode": True, "layers_to_transform": None,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not _DROP}


def lora_tensors(r=4, modules=("q_proj", "v_proj"), layer=0, seed=0, a_rank=None, b_rank=None) -> dict:
    """{PEFT key: tensor} of a LoRA on layer `layer` of the tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        n_out = 32 if m in ("k_proj", "v_proj") else HIDDEN
        key = f"{PREFIX}model.layers.{layer}.self_attn.{m}"
        out[f"{key}.lora_A.weight"] = torch.randn(a_rank or r, HIDDEN, generator=g)
        out[f"{key}.lora_B.weight"] = torch.randn(n_out, b_rank or r, generator=g)
    return out


def write_adapter(d, config: dict | None = None, tensors: dict | None = None, raw_config: bytes | None = None,
                  weights: str = "safetensors") -> str:
    """An adapter directory; config/tensors default to a valid r=4 q/v LoRA."""
    d = os.fspath(d)
    os.makedirs(d, exist_ok=True)
    if raw_config is None:
        raw_config = json.dumps(peft_config() if config is None else config, indent=2).encode()
    with open(os.path.join(d, "adapter_config.json"), "wb") as f:
        f.write(raw_config)
    tensors = lora_tensors() if tensors is None else tensors
    if weights == "safetensors":
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    elif weights == "bin":
        torch.save(tensors, os.path.join(d, "adapter_model.bin"))
    return d


def replace_file(path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename), as careful publishers do."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def edit_config(adapter_dir, **changes) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    replace_file(path, json.dumps(cfg, indent=2).encode())


def publish(src, root, name) -> str:
    """Copy adapter dir `src` into the catalog `root` as `name` atomically: a hidden temp dir (never
    listed) renamed into place, so a concurrent scan sees all of it or nothing."""
    tmp = os.path.join(root, f".{name}.tmp")
    shutil.copytree(src, tmp)
    dst = os.path.join(root, name)
    os.rename(tmp, dst)
    return dst


# ---- what was opened ----------------------------------------------------------------------------
_recorders: list[list[str]] = []


def _audit(event, args):
    if event == "open" and _recorders and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        for rec in _recorders:
            rec.append(p)


sys.addaudithook(_audit)  # cannot be removed; inert while no recorder is active


@contextlib.contextmanager
def python_opens():
    """Every path Python code opens (io.open, os.open: audit event 'open') inside the block.
    Native code (safetensors' Rust reader) is not seen: use inotify_opens for that."""
    rec: list[str] = []
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


@contextlib.contextmanager
def inotify_opens(directory):
    """Paths under `directory` that any code of this machine opened inside the block, as the kernel
    reports them (IN_OPEN through watchdog): native readers included."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers.inotify import InotifyObserver

    seen: list[str] = []
    lock = threading.Lock()

    class Handler(FileSystemEventHandler):
        def on_opened(self, event):
            with lock:
                seen.append(os.fsdecode(event.src_path))

    obs = InotifyObserver()
    obs.schedule(Handler(), os.fspath(directory), recursive=True)
    obs.start()
    try:
        yield seen
        time.sleep(0.3)  # events are delivered asynchronously
    finally:
        obs.stop()
        obs.join(5)


def wait_for(pred, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def read_header(path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and the data after it."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_with_header(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


@contextlib.contextmanager
def names_seen(cat):
    """Poll cat.names() in a thread for the duration of the block; yields the set of every name seen."""
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            seen.update(cat.names())

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        yield seen
    finally:
        stop.set()
        reader.join()
