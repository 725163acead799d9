"""vLLM general plugin (filled in by the vLLM plugin issue)."""


def register():
    """vllm.general_plugins entry point: a no-op unless LORAPLEX_CATALOG is set."""
    return None
