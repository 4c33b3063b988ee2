"""Fixtures for testing the plugin through forge itself: an isolated cache and a tiny word-level model.

The model is a randomly initialised 2-layer Llama. Its tokenizer has a fixed vocabulary of words
and maps every other word to [UNK], so token counts and unknown tokens are known exactly. It is built
here, offline, in about a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The test tokenizer's vocabulary. Whitespace separates words, so "cat." is unknown but "cat" is not.
VOCABULARY = ["Question:", "What", "is", "the", "plural", "of", "Answer:", "a", "cat", "dog", "sat", "on", "mat",
              "cats", "dogs", "mice", "mouse", "geese", "goose", "children", "child"]
SPECIAL_TOKENS = {"unk": "[UNK]", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Point FORGE_CACHE at a fresh directory, so that no test reads another test's cached entries."""
    root = tmp_path_factory.mktemp("forge-cache")
    monkeypatch.setenv("FORGE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def word_model_dir(tmp_path_factory) -> Path:
    """An HF model directory: a tiny random Llama with a word-level tokenizer that adds <s> to each text."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocabulary = {token: index for index, token in enumerate(specials + VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocabulary["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")

    config = LlamaConfig(vocab_size=len(vocabulary), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=vocabulary["<s>"], eos_token_id=vocabulary["</s>"],
                         pad_token_id=vocabulary["<pad>"])
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("word-model")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
