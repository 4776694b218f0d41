"""Shared fixtures: tiny models built from configs in code (no hub), real-data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("OBDK_DATA_DIR", REPO.parent / "shared" / "data"))


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


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return make_tiny_qwen2()


@pytest.fixture
def data_dir():
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.skip(f"real data not found under {DATA_DIR} (set OBDK_DATA_DIR)")
    return DATA_DIR


def make_char_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer over ASCII (ids 0..vocab-1; unknown → '?'), no hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 32 + vocab - 2)]
    table = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="?")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama + char tokenizer saved as a plain HF model directory."""
    d = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(d)
    make_char_tokenizer().save_pretrained(d)
    return d
