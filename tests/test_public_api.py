"""The public API is fully annotated (loraplex ships py.typed, so users' type checkers read these hints;
`make typecheck` runs mypy over the same modules). A new public method without hints fails here."""

import inspect

import pytest

import loraplex
from loraplex.kernels import ops
from loraplex.layers import LoraModel

PUBLIC = [loraplex.Catalog, loraplex.MemoryCatalog, loraplex.Runtime, loraplex.RuntimeConfig, loraplex.CatalogConfig,
          LoraModel, loraplex.inject, loraplex.open_catalog, ops.backend, ops.sgmv_shrink, ops.sgmv_expand,
          ops.add_lora_linear, ops.add_lora_embedding, ops.use_fused,
          *[getattr(loraplex, n) for n in loraplex.__all__ if n.endswith(("Error", "Found", "Adapter", "Changed",
                                                                          "Name"))]]


def _functions(obj):
    if not inspect.isclass(obj):
        yield obj.__qualname__, obj
        return
    for klass in obj.__mro__:
        if not klass.__module__.startswith("loraplex"):
            continue
        for name, fn in vars(klass).items():
            if name.startswith("_") and name != "__init__":
                continue
            fn = fn.fget if isinstance(fn, property) else getattr(fn, "__wrapped__", fn)
            if inspect.isfunction(fn):
                yield f"{obj.__name__}.{name}", fn


CASES = dict(kv for obj in PUBLIC for kv in _functions(obj))


@pytest.mark.parametrize("name", sorted(CASES))
def test_public_function_is_annotated(name):
    sig = inspect.signature(CASES[name])
    missing = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")
               and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"


def test_py_typed_ships():
    from importlib.resources import files

    assert files("loraplex").joinpath("py.typed").is_file()
