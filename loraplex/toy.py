"""A tiny Llama-shaped model and real PEFT adapters for it, built locally (no downloads).

Used by the tests, the demo and the CPU benchmarks. Needs transformers, peft and tokenizers (the
`dev` extra); imported only by those.
"""

from __future__ import annotations

import json
import os
import string

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a lora adapter changes a few low rank matrices of a large model",
    "serving thousands of adapters over one base model on one gpu",
    "hello world, tokens per second, cache hits and misses",
]

# targets: the module names PEFT selects by suffix
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(vocab_size=256, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128):
    from transformers import LlamaConfig

    # head_dim 32: vLLM's CPU attention needs head_dim >= 32
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=hidden // heads,
    )


def build_tokenizer(vocab_size=256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The alphabet is printable ASCII, not all 256 byte symbols: with those and the 4 special tokens
    # the vocabulary would outgrow a 256-token model (ids its embedding does not have).
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(string.printable)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=sorted({c for piece, _ in pieces for c in piece}),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens for a {vocab_size}-token model")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_model(out_dir, seed=0, **cfg):
    """Write a random-init tiny Llama and its tokenizer to out_dir (once); return out_dir."""
    import torch
    from transformers import LlamaForCausalLM

    out_dir = os.fspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(seed)
    config = tiny_config(**cfg)
    model = LlamaForCausalLM(config).eval()
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer(config.vocab_size).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def make_adapter(model_dir, out_dir, *, r=8, alpha=16, targets=ALL_LINEAR, seed=1, use_rslora=False,
                 rank_pattern=None, alpha_pattern=None, b_scale=20.0, base_model=None, base=None):
    """Write a PEFT LoRA adapter with random non-zero A and B (B scaled up so it visibly changes
    outputs). `targets` may include embed_tokens and lm_head. `base`: the loaded base model (fp32) to
    copy instead of reading model_dir again (PEFT wraps in place, so a copy keeps `base` clean)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        base = copy.deepcopy(base)
    else:
        base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
        init_lora_weights=False, use_rslora=use_rslora, rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(b_scale)
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        data = json.load(f)
    data["base_model_name_or_path"] = base_model or os.fspath(model_dir)
    with open(cfg_path, "w") as f:
        json.dump(data, f, indent=2)
    return out_dir


def linear_modules(config, targets=ALL_LINEAR) -> dict:
    """{PEFT module path: (in_features, out_features)} of a Llama config's linear layers in `targets`."""
    h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = {"q_proj": (h, config.num_attention_heads * d), "k_proj": (h, config.num_key_value_heads * d),
              "v_proj": (h, config.num_key_value_heads * d), "o_proj": (config.num_attention_heads * d, h),
              "gate_proj": (h, config.intermediate_size), "up_proj": (h, config.intermediate_size),
              "down_proj": (config.intermediate_size, h)}
    part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"model.layers.{i}.{part.get(m, 'mlp')}.{m}": shapes[m]
            for i in range(config.num_hidden_layers) for m in shapes if m in targets}


def peft_config(r, alpha, target_modules, base_model=None, use_rslora=False) -> dict:
    """adapter_config.json of a plain LoRA adapter, with the keys PEFT writes (missing newer keys take
    PEFT's defaults when it loads the file)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(target_modules), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": use_rslora,
    }


def write_adapter(out_dir, modules: dict, *, r=8, alpha=16, seed=0, base_model=None, dtype="float32",
                  a_std=None, b_std=0.02, pool=None):
    """Write a LoRA adapter in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors,
    keys base_model.model.<module>.lora_A.weight [r, in] / lora_B.weight [out, r]) without PEFT and
    without a model: fast enough for catalogs of thousands. modules: {PEFT module path: (in, out)}.

    A ~ N(0, a_std = 1/sqrt(in)), B ~ N(0, b_std): unlike PEFT's training init B is non-zero, so the
    adapter changes outputs. pool (a 1-D float tensor of N(0, 1) samples): weights are cut from it at
    a seeded offset instead of drawn, which makes a catalog of N adapters cost one draw."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for mod, (n_in, n_out) in modules.items():
        for kind, shape, std in (("lora_A", (r, n_in), a_std or n_in ** -0.5), ("lora_B", (n_out, r), b_std)):
            n = shape[0] * shape[1]
            if pool is not None and pool.numel() > n:
                off = int(torch.randint(0, pool.numel() - n, (1,), generator=g))
                w = pool[off:off + n].view(shape) * std
            else:
                w = torch.randn(shape, generator=g) * std
            tensors[f"base_model.model.{mod}.{kind}.weight"] = w.to(getattr(torch, dtype)).contiguous()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config(r, alpha, leaves, base_model), f, indent=2)
    return out_dir
