"""The tiny local model and tokenizer the demo and tests are built on."""

import pytest


@pytest.mark.parametrize("vocab", [256, 300])
def test_tokenizer_fits_the_model_vocabulary(vocab):
    from loraplex import toy

    tok = toy.build_tokenizer(vocab)
    assert len(tok) <= vocab and max(tok.get_vocab().values()) < vocab
    ids = tok("The adapters are loaded from storage on demand.")["input_ids"]
    assert ids and max(ids) < vocab
    assert tok.decode(ids) == "The adapters are loaded from storage on demand."


def test_tiny_model_embeds_every_token_id(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert len(AutoTokenizer.from_pretrained(tiny_model_dir)) <= config.vocab_size
