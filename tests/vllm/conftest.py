"""The vLLM tests run in the vLLM venv only (`make test-vllm`; `make test` runs it after the main suite).

vLLM pins an older transformers than obdk's main environment, so it lives in its own venv
(.ci/vllm_venv.sh). In an environment without vLLM (the main suite's `pytest tests`) this
directory is not collected at all: these tests are run by their own pytest invocation, never
reported as skipped.
"""
from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]

import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

#: Each architecture: (make(), ignore patterns) — the ignores keep members of fused groups and
#: row-parallel Linears dense, beside obdk's own break-even choices, so that every checkpoint
#: holds low-rank and dense members inside one fused q/k/v or gate/up group.
ARCHS = ("llama", "qwen2", "mistral", "phi3")
HIDDEN, INTER, HEADS, VOCAB = 128, 256, 4, 128  # head_dim 32: vLLM's CPU attention needs >= 32


def make_tiny(arch: str):
    """A tiny random fp32 causal LM of ``arch`` (2 layers; GQA; Mistral with one KV head, so TP 2
    replicates it; Qwen2 with q/k/v biases; Phi-3 with q/k/v and gate/up fused on disk)."""
    import torch

    from obdk.testing import make_tiny_llama, make_tiny_qwen2
    common = dict(hidden=HIDDEN, inter=INTER, heads=HEADS, vocab=VOCAB)
    if arch == "llama":
        m = make_tiny_llama(seed=1, kv_heads=2, tie=True, **common)
    elif arch == "qwen2":
        m = make_tiny_qwen2(seed=2, kv_heads=2, **common)
    else:
        from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM
        torch.manual_seed(3)
        kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                  num_attention_heads=HEADS, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
        if arch == "mistral":
            m = MistralForCausalLM(MistralConfig(num_key_value_heads=1, sliding_window=None, **kw))
        else:
            m = Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, **kw))
    m.config.architectures = [type(m).__name__]  # from_config leaves it unset; vLLM picks the class by it
    return m.eval()


IGNORE = {
    "llama": ["*layers.0.self_attn.k_proj", "*layers.1.self_attn.o_proj", "*layers.1.mlp.up_proj"],
    "qwen2": ["*layers.0.self_attn.v_proj", "*layers.0.mlp.gate_proj"],
    "mistral": ["*layers.1.self_attn.q_proj", "*o_proj"],
    "phi3": ["*layers.0.self_attn.qkv_proj", "*layers.1.mlp.gate_up_proj"],
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{arch: directory}``: each tiny model compressed by ``obdk.compress`` (OBD, keep 0.6, global
    allocation) and saved by ``obdk.save_pretrained``; the Llama one with a character tokenizer."""
    import torch

    import obdk
    from obdk.config import LowRankConfig
    from obdk.testing import make_char_tokenizer
    root = tmp_path_factory.mktemp("vllm-ckpt")
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for arch in ARCHS:
        m = make_tiny(arch)
        obdk.compress(m, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, ignore=IGNORE[arch]), ids,
                      progress=False)
        d = root / arch
        obdk.save_pretrained(m, d, tokenizer=make_char_tokenizer(VOCAB) if arch == "llama" else None)
        out[arch] = d
    return out


def ranks_of(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["quantization_config"]["ranks"]
