"""vLLM plugin: loraplex kernels, catalog discovery and host cache inside vLLM.

Entry point `vllm.general_plugins: loraplex = loraplex.vllm_plugin:register`. Importing this package
does not import vLLM (register() does, and only when LORAPLEX_CATALOG or LORAPLEX_ENABLE is set), so
`import loraplex` works without vLLM installed. See docs/vllm.md.
"""


def register():
    """vllm.general_plugins entry point: a no-op unless LORAPLEX_CATALOG or LORAPLEX_ENABLE=1 is set.
    Returns the installed parts (kernels, resolver, serving, worker_manager)."""
    from .plugin import register as _register

    return _register()


def unregister():
    """Undo register() in this process (for tests)."""
    from .plugin import unregister as _unregister

    return _unregister()


def lora_request(name):
    """A vLLM LoRARequest for catalog adapter `name` ($LORAPLEX_CATALOG), for offline LLM use."""
    from .resolver import lora_request as _lora_request

    return _lora_request(name)


def merge_adapter(llm, name):
    """Merge catalog adapter `name` into the base weights of a vllm.LLM now (None: unmerge); needs
    LORAPLEX_MERGE or LORAPLEX_MERGE_AUTO at startup (docs/architecture.md, merged mode)."""
    from .engine_merge import merge_adapter as _merge_adapter

    return _merge_adapter(llm, name)


def serve_main(argv=None):
    """`loraplex serve MODEL --lora-catalog-type storage --lora-catalog-path PATH [vLLM args]`."""
    from .serve import serve_main as _serve_main

    return _serve_main(argv)


__all__ = ["lora_request", "merge_adapter", "register", "serve_main", "unregister"]
