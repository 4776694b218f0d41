"""Tiny models built from configs, for tests and dry runs.

Nothing here touches the hub or the disk: each helper builds a randomly initialised model (or
a character tokenizer) in code, seeded, in a few milliseconds. The test suite uses them as
fixtures and the benchmark scripts as their ``--model tiny`` path, so that both exercise the
whole pipeline without a real checkpoint.

* :func:`make_tiny_llama` — a 2-layer Llama with grouped-query attention;
* :func:`make_tiny_qwen2` — a 2-layer Qwen2 (q/k/v with bias);
* :func:`make_char_tokenizer` — a character-level fast tokenizer over ASCII;
* :func:`tiny_llama_and_tokenizer` — the first and the last together, with matching vocabularies.
"""
from __future__ import annotations

import torch

__all__ = ["make_tiny_llama", "make_tiny_qwen2", "make_char_tokenizer", "tiny_llama_and_tokenizer"]


def make_tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, inter: int = 160,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 128, tie: bool = True):
    """A randomly initialised Llama with GQA (kv_heads < heads), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def make_tiny_qwen2(seed: int = 0, *, layers: int = 2, hidden: int = 64, inter: int = 160,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 128):
    """A randomly initialised Qwen2 (q/k/v with bias), fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def make_char_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer over ASCII (ids 0..vocab-1; unknown → '?'), no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 32 + vocab - 2)]
    table = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="?")


def tiny_llama_and_tokenizer(seed: int = 0):
    """``(make_tiny_llama(seed), make_char_tokenizer())``: a model and a tokenizer that fit each other."""
    return make_tiny_llama(seed), make_char_tokenizer()
