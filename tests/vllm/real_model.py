"""A real vLLM model on CPU with the plugin's LoRA parts, without an engine (vLLM's compiled ops are not
needed, so this also runs on a vLLM wheel's Python sources), and transformers + PEFT as its reference."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

MAX_LORAS = 2


def registered_plugin(catalog, adapter_source):
    """A module fixture's body: the plugin registered over a copy of adapter_source at `catalog`,
    torch ops; yields SimpleNamespace(parts, catalog) and unregisters after."""
    from loraplex import vllm_plugin

    shutil.copytree(adapter_source, catalog)
    mp = pytest.MonkeyPatch()
    for key in ("LORAPLEX_ENABLE", "LORAPLEX_KERNELS", "LORAPLEX_OVERLAP"):
        mp.delenv(key, raising=False)
    mp.setenv("LORAPLEX_CATALOG", str(catalog))
    mp.setenv("LORAPLEX_BACKEND", "torch")
    vllm_plugin.unregister()
    try:
        yield SimpleNamespace(parts=vllm_plugin.register(), catalog=catalog)
    finally:
        vllm_plugin.unregister()
        mp.undo()


def build_runner(model_dir, weights=None, **engine_kwargs):
    """(vllm_config, model, runner): a vLLM model built from model_dir on CPU (with `weights`, a
    safetensors file, loaded), wrapped for LoRA by vLLM's model runner mixin, which holds the worker
    manager the plugin installed. No engine."""
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    args = EngineArgs(model=model_dir, dtype="float32", enable_lora=True, max_lora_rank=16, max_loras=MAX_LORAS,
                      max_cpu_loras=4, max_num_seqs=4, max_model_len=128, enforce_eager=True, **engine_kwargs)
    config = args.create_engine_config()
    with set_current_vllm_config(config):
        torch.set_default_dtype(torch.float32)
        with torch.device("cpu"):
            model = initialize_model(vllm_config=config)
        if weights is not None:
            model.load_weights(load_file(weights).items())
        for module in model.modules():  # what vLLM's loader does after loading (CPU weight layouts)
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
        runner = LoRAModelRunnerMixin()
        runner.load_lora_model(model, config, torch.device("cpu"))
    return config, model, runner


def peft_model(model_dir, adapter_dirs, auto_class=None):
    """transformers + PEFT (fp32) with every adapter in {name: directory} loaded under its name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = (auto_class or AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    return peft.eval()


def rows_reference(peft, module_of, x, names):
    """Row t of module_of(hf_model)(x) with adapter names[t] (None: the base model)."""
    out = []
    for t, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    out.append(module_of(peft.base_model.model)(x[t: t + 1]))
            else:
                peft.set_adapter(name)
                out.append(module_of(peft.base_model.model)(x[t: t + 1]))
    return torch.cat(out)


def activate(runner, names, requests=None):
    """Make vLLM's worker manager run the next layer calls with adapter names[t] on row t (None: no
    adapter); catalog adapters unless `requests` ({name: LoRARequest}) gives them."""
    from loraplex.vllm_plugin import lora_request

    reqs = {n: (requests or {}).get(n) or lora_request(n) for n in set(names) if n is not None}
    ids = tuple(reqs[n].lora_int_id if n is not None else 0 for n in names)
    runner._set_active_loras(ids, ids, set(reqs.values()))




def make_classifier(root, num_labels=5):
    """(model_dir, adapter_dir): a tiny Llama sequence classifier (transformers) and a PEFT SEQ_CLS
    adapter for it: LoRA on q/v plus its own copy of the `score` head (modules_to_save), changed so
    that it differs from the base head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from loraplex import toy

    config = toy.tiny_config()
    config.num_labels = num_labels
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(5)
    model = LlamaForSequenceClassification(config).eval()
    model_dir, adapter_dir = root / "classifier", root / "classifier-adapter"
    model.save_pretrained(model_dir, safe_serialization=True)
    toy.build_tokenizer(config.vocab_size).save_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    peft.save_pretrained(adapter_dir, safe_serialization=True)
    return model_dir, adapter_dir


def read_adapter(adapter_dir):
    """(adapter_config dict, tensors) of a PEFT adapter directory."""
    import json

    from safetensors.torch import load_file

    with open(adapter_dir / "adapter_config.json") as f:
        return json.load(f), load_file(adapter_dir / "adapter_model.safetensors")
