"""Perplexity: the standard recipe against a direct computation, window selection, failures."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obdk.eval import NonFiniteLossError, perplexity
from tests.conftest import make_tiny_llama


def byte_tokenizer():
    """A byte-level tokenizer with no merges: one token per UTF-8 byte, <eos>=256, <pad>=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<eos>": 256, "<pad>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", model_max_length=32)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab=258)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


TEXT = "The quick brown fox jumps over the lazy dog.\n\n = Heading = \n" * 12  # 720 bytes


def manual_ppl(model, ids, seqlen, n=None):
    n_all = ids.numel() // seqlen
    n = n_all if n is None else n
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(w).logits
            losses.append(F.cross_entropy(logits[0, :-1], w[0, 1:]).item())
    return math.exp(sum(losses) / n), n_all


def test_matches_manual_computation(tmp_path, model, tok):
    p = tmp_path / "c.txt"
    p.write_text(TEXT, encoding="utf-8")
    ids = torch.tensor(tok(TEXT, verbose=False)["input_ids"])
    ref, n_all = manual_ppl(model, ids, 64)
    r = perplexity(model, tok, str(p), seqlen=64, progress=False)
    assert n_all == len(TEXT.encode()) // 64 == 11
    assert r["windows"] == r["available_windows"] == 11 and r["total_tokens"] == ids.numel()
    assert r["tokens"] == 11 * 64 and r["predicted_tokens"] == 11 * 63 and r["seqlen"] == 64
    assert r["ppl"] == pytest.approx(ref, rel=1e-5) and r["nll"] == pytest.approx(math.log(ref), rel=1e-5)
    assert r["dataset"] == "file" and r["split"] is None and r["seconds"] > 0
    # batched forward gives the same number; a tensor stream too ([N] and [1, N])
    assert perplexity(model, tok, str(p), seqlen=64, batch_size=4, progress=False)["ppl"] == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, None, ids, seqlen=64, progress=False)["ppl"] == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, None, ids[None], seqlen=64, progress=False)["ppl"] == pytest.approx(ref, rel=1e-5)


def test_windows_honoured(model, tok):
    ids = torch.tensor(tok(TEXT, verbose=False)["input_ids"])
    ref, _ = manual_ppl(model, ids, 32, n=3)
    r = perplexity(model, tok, [TEXT], seqlen=32, windows=3, progress=False)
    assert r["windows"] == 3 and r["tokens"] == 96 and r["available_windows"] == len(TEXT.encode()) // 32
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match=r"windows=99 but list has only 22 windows of 32 tokens"):
        perplexity(model, tok, [TEXT], seqlen=32, windows=99, progress=False)
    rows = ids[: 4 * 32].view(4, 32)
    assert perplexity(model, None, rows, seqlen=32, windows=3, progress=False)["ppl"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="seqlen=16 columns"):
        perplexity(model, None, rows, seqlen=16, progress=False)


class NaNAt(nn.Module):
    """Wraps a model; the forward number ``bad`` (0-based) returns NaN logits."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        if self.calls == self.bad:
            out.logits = torch.full_like(out.logits, float("nan"))
        self.calls += 1
        return out


def test_non_finite_window_raises_with_index(model, tok):
    with pytest.raises(NonFiniteLossError, match=r"window 2 \(tokens 64:96\).*non-finite loss nan"):
        perplexity(NaNAt(model, 2), tok, [TEXT], seqlen=32, progress=False)
    # batches of 3: the second forward holds windows 3, 4, 5, all NaN; the first is named
    with pytest.raises(NonFiniteLossError, match=r"window 3 "):
        perplexity(NaNAt(model, 1), tok, [TEXT], seqlen=32, batch_size=3, progress=False)


def test_errors_and_mode_restored(model, tok):
    with pytest.raises(ValueError, match=r"fewer than one window of seqlen=4096"):
        perplexity(model, tok, [TEXT], seqlen=4096, progress=False)
    with pytest.raises(ValueError, match="unknown dataset 'ptb'"):
        perplexity(model, tok, "ptb", progress=False)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        perplexity(model, None, [TEXT], progress=False)
    with pytest.raises(ValueError, match="split='test' given with a tensor"):
        perplexity(model, None, torch.arange(100), split="test", progress=False)
    model.train()
    try:
        perplexity(model, tok, [TEXT], seqlen=32, windows=1, progress=False)
        assert model.training
    finally:
        model.eval()


def test_progress_named_phase(model, tok, capsys):
    perplexity(model, tok, [TEXT], seqlen=32, windows=2, progress=True)
    assert "eval list" in capsys.readouterr().err
    perplexity(model, tok, [TEXT], seqlen=32, windows=2, progress=False)
    assert "eval" not in capsys.readouterr().err


def test_named_dataset_default_splits(data_dir, tok):
    m = make_tiny_llama(vocab=258, layers=1)
    r = perplexity(m, tok, "wikitext2", seqlen=64, windows=2, data_dir=data_dir, progress=False)
    assert (r["dataset"], r["split"], r["windows"]) == ("wikitext2", "test", 2)
    with pytest.raises(ValueError, match="names split 'test' but split='validation'"):
        perplexity(m, tok, "wikitext2:test", split="validation", data_dir=data_dir, progress=False)


@pytest.mark.slow
def test_smollm2_gguf_wikitext2(data_dir):
    import time

    from obdk.hub import load_model
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    assert not model.training and next(model.parameters()).dtype == torch.float32
    from obdk.calibrate.data import load_text, tokenize_text
    text, _ = load_text("wikitext2:test", data_dir)
    t0 = time.perf_counter()
    ids = tokenize_text(text, tok)
    tok_s = time.perf_counter() - t0
    assert ids.numel() == 304_986 and ids.numel() // 2048 == 148  # the README's counts
    assert tok_s < 30
    r = perplexity(model, tok, "wikitext2", seqlen=512, windows=2, data_dir=data_dir, progress=False)
    print(f"\nGGUF load {load_s:.1f} s, tokenise wiki.test {tok_s:.1f} s; "
          f"wikitext2 test ppl@512 over 2 windows: {r['ppl']:.2f} ({r['seconds']:.1f} s)")
    assert r["total_tokens"] == 304_986 and r["available_windows"] == 595 and r["windows"] == 2
    assert 15 < r["ppl"] < 60  # full test set: 30.21
