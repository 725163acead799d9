"""Fixtures for the vLLM plugin tests: the single-process distributed setup vLLM's layers need, and
the independent reference (HF transformers + PEFT, fp32 greedy) for end-to-end token checks."""

from __future__ import annotations

import os
import socket

import pytest

GEN_TOKENS = 6
# Prompts as token ids: no tokenizer differences between vLLM and the reference.
PROMPTS = ([1, 17, 42, 99, 7], [1, 50, 60, 70], [1, 5, 6], [1, 200, 3, 14, 15, 92])


@pytest.fixture(scope="module")
def vllm_dist(tmp_path_factory):
    """vLLM's distributed state for one process (gloo, world size 1) inside a default VllmConfig, so
    its LoRA layers can be built and run without an engine. vLLM's process groups are process-global:
    they are created once and kept, and created again in a module that finds them gone (an in-process
    engine of an earlier module destroys them when it shuts down)."""
    import torch  # noqa: F401
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    config = VllmConfig()
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_file = tmp_path_factory.mktemp("dist") / "init"
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{init_file}",
                                         local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
        yield config


def hf_greedy(model_dir, adapter_dir, prompt, n=GEN_TOKENS):
    """Greedy continuation of `prompt` by transformers (+ PEFT adapter), fp32, no KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class Reference:
    """Memoized hf_greedy per (adapter directory, prompt)."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self._memo = {}

    def __call__(self, adapter_dir, prompt):
        key = (None if adapter_dir is None else os.fspath(adapter_dir), tuple(prompt))
        if key not in self._memo:
            self._memo[key] = hf_greedy(self.model_dir, key[0], prompt)
        return self._memo[key]


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, label, env=(), **llm_kwargs):
    """A generator for a module fixture: a vllm.LLM in this process over a fresh copy of the test
    catalog, with the plugin registered, torch ops (the interpreter is too slow for whole models);
    yields SimpleNamespace(llm, catalog, model) and tears everything down after."""
    import gc
    import shutil
    from types import SimpleNamespace

    from loraplex import vllm_plugin

    catalog = tmp_path_factory.mktemp(label) / "catalog"
    shutil.copytree(adapter_source, catalog)
    mp = pytest.MonkeyPatch()
    state = tmp_path_factory.mktemp(label + "-state")  # the plugin's state dir: this engine's alone
    for key, value in {"LORAPLEX_CATALOG": str(catalog), "LORAPLEX_BACKEND": "torch", "LORAPLEX_STATE_DIR": str(state),
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in this process: starts in seconds
                       "VLLM_CPU_KVCACHE_SPACE": "1", **dict(env)}.items():
        mp.setenv(key, value)
    vllm_plugin.unregister()
    # vLLM loads plugins once per process, maybe before this env existed: register explicitly.
    assert vllm_plugin.register() == {"kernels", "resolver", "serving", "worker_manager", "engine_core"}
    from vllm import LLM

    llm = LLM(model=tiny_model_dir, enable_lora=True, seed=0,
              **{"max_num_seqs": 4, "max_lora_rank": 16, "dtype": "float32", "enforce_eager": True, **llm_kwargs})
    try:
        yield SimpleNamespace(llm=llm, catalog=catalog, model=tiny_model_dir)
    finally:
        # Shut the engine down now, not when the last reference goes: a failed test's traceback can keep
        # it alive, and its finalizer would then tear down vLLM's process groups under the next engine.
        finalizer = getattr(llm.llm_engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        del llm
        gc.collect()
        vllm_plugin.unregister()
        mp.undo()


def poisoned_copy(src, dst):
    """A copy of adapter directory `src` at `dst` with one NaN in its first lora_A weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst
