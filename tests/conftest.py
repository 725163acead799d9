"""Shared fixtures: a tiny local Llama and real PEFT adapters for it (built once per session)."""

import os

import torch

# The interpreter flag is read when a @triton.jit kernel is defined: set it before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402

# name -> make_adapter kwargs: several ranks, target sets, rsLoRA, rank/alpha patterns, embeddings
ADAPTERS = {
    "alpha-r4": dict(r=4, alpha=8, seed=11, rank_pattern={"model.layers.0.self_attn.q_proj": 2}),
    "beta-r8": dict(r=8, alpha=16, seed=12, targets=("q_proj", "v_proj", "embed_tokens", "lm_head"),
                    use_rslora=True),
    "gamma-r16": dict(r=16, alpha=32, seed=13, targets=("gate_proj", "up_proj", "down_proj", "o_proj"),
                      alpha_pattern={"down_proj": 8}),
}


def pytest_report_header(config):
    """Which loraplex (checkout or installed wheel) and which library versions this run tests."""
    from importlib.metadata import PackageNotFoundError, version

    import loraplex

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    libs = ", ".join(f"{n} {v(n)}" for n in ("torch", "triton", "transformers", "peft", "safetensors", "numpy"))
    return [f"loraplex {loraplex.__version__} from {os.path.dirname(loraplex.__file__)}", libs]


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except Exception:  # noqa: BLE001 - a broken vllm install counts as absent
        has_vllm = False
    soak = "soak" in (config.option.markexpr or "")
    for item in items:
        if "soak" in item.keywords and not soak:
            item.add_marker(pytest.mark.skip(reason="long soak: run with -m soak"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs vLLM (the 'vllm' extra)"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from loraplex import toy

    return toy.build_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_source(tmp_path_factory, tiny_model_dir):
    """A read-only directory of real PEFT adapters; copy from it, never write into it."""
    from loraplex import toy

    root = tmp_path_factory.mktemp("adapters")
    for name, kw in ADAPTERS.items():
        toy.make_adapter(tiny_model_dir, root / name, **kw)
    return root


@pytest.fixture
def catalog_dir(tmp_path, adapter_source):
    """A fresh, writable catalog directory holding copies of the ADAPTERS."""
    root = tmp_path / "catalog"
    shutil.copytree(adapter_source, root)
    return root
