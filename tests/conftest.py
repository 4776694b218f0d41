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
