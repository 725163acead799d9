"""Fault injection without mocks: a real fsspec filesystem that misbehaves on demand, and a trigger
that acts on storage at an exact point of a real load (the first call of a given function, seen
through the interpreter's profile hook), so "mid-load" faults are deterministic."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import time

from fsspec.implementations.memory import MemoryFileSystem


class FlakyFS(MemoryFileSystem):
    """An in-memory object store (fsspec's MemoryFileSystem) reached as flaky://, whose downloads of
    weight files fail on demand: after `fail_after` bytes (EIO, as a dropped connection), after
    `enospc_after` bytes written locally (disk full), or slowly (`delay_s` per 4 KiB chunk).
    Faults are class attributes: RemoteStore builds its own instance."""

    protocol = "flaky"
    fail_after: int | None = None
    enospc_after: int | None = None
    delay_s: float = 0.0
    only = ""  # faults hit weight files whose path contains this
    downloads = 0  # weight-file downloads started

    @classmethod
    def reset(cls, only: str = ""):
        cls.fail_after = cls.enospc_after = None
        cls.delay_s = 0.0
        cls.downloads = 0
        cls.only = only

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return super()._strip_protocol(path)

    def get_file(self, rpath, lpath, callback=None, outfile=None, **kwargs):
        weights = (rpath.endswith(".safetensors") or rpath.endswith(".bin")) and self.only in rpath
        if weights:
            type(self).downloads += 1
        written = 0
        with self.open(rpath, "rb") as src, open(lpath, "wb") as dst:
            while True:
                chunk = src.read(4096)
                if not chunk:
                    return
                if weights and self.delay_s:
                    time.sleep(self.delay_s)
                if weights and self.fail_after is not None and written + len(chunk) > self.fail_after:
                    raise OSError(errno.EIO, "connection reset by peer (injected)")
                if weights and self.enospc_after is not None and written + len(chunk) > self.enospc_after:
                    dst.write(chunk[: max(0, self.enospc_after - written)])  # what fit before the disk filled
                    dst.flush()
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                dst.write(chunk)
                written += len(chunk)


def put_dir(fs_root: str, local_dir) -> None:
    """Copy a local adapter tree into the shared memory store under flaky://<fs_root>/."""
    fs = FlakyFS()
    for dirpath, _, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local_dir).replace(os.sep, "/")
            with open(os.path.join(dirpath, f), "rb") as fh:
                fs.pipe_file(f"{fs_root}/{rel}", fh.read())


@contextlib.contextmanager
def on_first_call(action, *, code=None, builtin=None):
    """Run action() once, in whichever thread first calls the Python function whose code object is
    `code` (or the C builtin `builtin`), just before that call runs. Threads started inside the
    block are watched too, so create the runtime whose loader should be caught inside it or before
    its first load (its worker threads start on the first load)."""
    fired = threading.Event()
    errors: list[BaseException] = []

    def prof(frame, event, arg):
        if fired.is_set():
            return
        if (event == "call" and frame.f_code is code) or (event == "c_call" and arg is builtin):
            fired.set()  # first: the action may call the same function
            try:
                action()
            except BaseException as e:  # noqa: BLE001 - reported to the test, not to the code under test
                errors.append(e)

    threading.setprofile(prof)
    sys.setprofile(prof)
    try:
        yield fired
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    if errors:
        raise errors[0]


def cache_leftovers(cache_dir) -> list[str]:
    """Partial downloads under a RemoteStore cache dir: anything in its temp dir, and version dirs
    missing a file (a complete version holds the config and one weight file)."""
    bad = []
    tmp = os.path.join(cache_dir, ".tmp")
    if os.path.isdir(tmp):
        bad += [os.path.join(tmp, e) for e in os.listdir(tmp)]
    for name in os.listdir(cache_dir):
        if name.startswith("."):
            continue
        for vh in os.listdir(os.path.join(cache_dir, name)):
            files = set(os.listdir(os.path.join(cache_dir, name, vh)))
            if "adapter_config.json" not in files or not files & {"adapter_model.safetensors", "adapter_model.bin"}:
                bad.append(os.path.join(cache_dir, name, vh))
    return bad
