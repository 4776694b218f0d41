"""The one model loader of the benchmarks: ``tiny``, ``smollm2-135m`` or any hub spec, random Llama shapes."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Llama-7B's decoder shape (multi-head attention, untied head)
LLAMA7B = dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000)


def random_llama(*, hidden: int, inter: int, layers: int, heads: int, vocab: int, kv_heads: Optional[int] = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 max_positions: int = 4096) -> nn.Module:
    """A seeded, randomly initialised ``LlamaForCausalLM`` of the given shape, built on ``device`` in ``dtype``.

    The weights are created in ``dtype`` directly (never an fp32 copy first), so a 7B shape in
    bf16 needs only its 13 GiB. For timing: the values are random, the shapes are the model's.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def load(spec: str, *, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
    """``(model, tokenizer)`` in eval mode.

    ``tiny``: :func:`obdk.testing.tiny_llama_and_tokenizer` (a 2-layer Llama and a character
    tokenizer, for dry runs); ``llama7b-random``: :func:`random_llama` at :data:`LLAMA7B` (bf16 by
    default) with SmolLM2's tokenizer and vocabulary when that package is installed, else no
    tokenizer (``None``) and vocabulary 32000; anything else: :func:`obdk.hub.load_model`
    (an HF id or directory, a ``.gguf`` file, an obdk directory, or the alias ``smollm2-135m``).
    ``dtype``: a torch dtype or ``fp32``/``bf16``/``fp16`` (default: the model's own).
    """
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if spec == "tiny":
        from obdk.testing import tiny_llama_and_tokenizer
        model, tok = tiny_llama_and_tokenizer()
        return model.to(device=device, dtype=dt).eval(), tok
    if spec == "llama7b-random":
        tok = None
        try:
            from obdk.hub import load_tokenizer
            tok = load_tokenizer("smollm2-135m")
        except Exception as exc:  # no tokenizer package on this machine: random token ids
            log.warning("llama7b-random: no SmolLM2 tokenizer (%s); random token ids, vocab 32000", exc)
        shape = dict(LLAMA7B, vocab=len(tok) if tok is not None else LLAMA7B["vocab"])
        return random_llama(**shape, device=device or "cpu", dtype=dt or torch.bfloat16), tok
    from obdk.hub import load_model
    model, tok = load_model(spec, device=device, dtype=dt)
    return model.eval(), tok


def model_label(spec: str) -> str:
    """The ``model`` column of the quality and allocation CSVs: ``tiny-llama`` for ``tiny``, else the spec."""
    return "tiny-llama" if spec == "tiny" else spec


def n_params(model: nn.Module) -> int:
    """Parameters of ``model`` (a tied tensor once)."""
    return sum(p.numel() for p in model.parameters())


def model_dtype(model: nn.Module) -> str:
    """``float32``, ``bfloat16``, ...: the dtype of the model's first parameter."""
    return str(next(model.parameters()).dtype).replace("torch.", "")
