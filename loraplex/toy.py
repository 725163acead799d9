"""A tiny Llama-shaped model and real PEFT adapters for it, built locally (no downloads).

Used by the tests, the demo and the CPU benchmarks. Needs transformers, peft and tokenizers (the
`dev` extra); imported only by those.
"""

from __future__ import annotations

import json
import os

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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
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
                 rank_pattern=None, alpha_pattern=None, b_scale=20.0, base_model=None):
    """Write a PEFT LoRA adapter with random non-zero A and B (B scaled up so it visibly changes
    outputs). `targets` may include embed_tokens and lm_head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
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
