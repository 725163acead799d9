"""Runtime fixtures: runtimes over the tiny Llama's targets, and a larger set of adapters (clones of
the session's real PEFT adapters with fresh weights, so building them takes milliseconds)."""

import shutil

import pytest

from loraplex import Catalog, RuntimeConfig
from loraplex.runtime import Runtime

from .helpers import add_llama_targets, clone_adapter

BASES = ("alpha-r4", "beta-r8", "gamma-r16")


@pytest.fixture(scope="session")
def many_source(tmp_path_factory, adapter_source):
    """12 adapters a00..a11 cycling through the three base configs (ranks 4/8/16, rank and alpha
    patterns, rsLoRA, embeddings)."""
    root = tmp_path_factory.mktemp("many")
    for i in range(12):
        clone_adapter(adapter_source / BASES[i % 3], root / f"a{i:02d}", seed=100 + i)
    return root


@pytest.fixture
def many_dir(tmp_path, many_source):
    root = tmp_path / "many"
    shutil.copytree(many_source, root)
    return root


@pytest.fixture
def make_runtime():
    """make_runtime(catalog_root_or_catalog, **config) -> Runtime with every tiny-Llama target registered."""
    made = []

    def make(root, targets=True, registry=None, **cfg):
        cat = root if hasattr(root, "get") else Catalog(root)
        cfg.setdefault("dtype", "float32")
        cfg.setdefault("device", "cpu")
        rt = Runtime(cat, RuntimeConfig(**cfg), metrics_registry=registry)
        made.append(rt)
        if targets:
            add_llama_targets(rt)
        return rt

    yield make
    for rt in made:
        rt.close()
