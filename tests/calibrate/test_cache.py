"""The statistics cache: hit/miss keyed by model, data, tokenizer and settings; atomic writes;
resume after an interruption from a partial checkpoint."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from obdk.calibrate.cache import StatsCache, data_fingerprint, model_fingerprint
from obdk.calibrate.stats import calibrate
from tests.conftest import make_tiny_llama


def _ids(n=4, t=12, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


class _Counter:
    """Counts (and optionally fails) the model's forward calls.

    Hooks the trunk (``model.model``), which runs once per window both in a pass with gradients
    and in a ``C_x``-only pass (that one skips the LM head: see ``stats._trunk``).
    """

    def __init__(self, model, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.h = model.model.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")


def _entries(root):
    return sorted(p.name for p in root.iterdir())


def test_hit_does_not_run_the_model(tmp_path):
    model = make_tiny_llama()
    ids = _ids()
    cnt = _Counter(model)
    first = calibrate(model, ids, cache_dir=tmp_path, progress=False)
    assert cnt.calls == 4
    second = calibrate(model, ids, cache_dir=tmp_path, progress=False)
    assert cnt.calls == 4  # served from disk
    assert second.fingerprint == first.fingerprint and second.tokens == first.tokens
    assert second.input_key == first.input_key
    for k, v in first.cg.items():
        assert torch.equal(second.cg[k], v)
    for k, v in first.cx.items():
        assert torch.equal(second.cx[k], v)
    # one finished entry, nothing temporary or partial left behind
    assert len(_entries(tmp_path)) == 1 and not any(n.startswith(".") or "partial" in n for n in _entries(tmp_path))
    # anything that changes the statistics misses
    calibrate(model, ids, stats=("cx",), cache_dir=tmp_path, progress=False)
    calibrate(model, ids, fisher="true", cache_dir=tmp_path, progress=False)
    calibrate(model, ids, dtype=torch.float64, cache_dir=tmp_path, progress=False)
    calibrate(model, _ids(seed=1), cache_dir=tmp_path, progress=False)
    assert cnt.calls == 4 + 4 * 4
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    calibrate(model, ids, cache_dir=tmp_path, progress=False)
    assert cnt.calls == 24 and len(_entries(tmp_path)) == 6
    # the batch size changes only summation order: still a hit
    calibrate(model, ids, batch_size=2, cache_dir=tmp_path, progress=False)
    assert cnt.calls == 24


def test_key_covers_tokenizer_and_data_fingerprint():
    ids = _ids()
    plain = data_fingerprint(ids, None)
    tok_a = data_fingerprint(ids, None, SimpleNamespace(input_ids=ids, fingerprint={"tokenizer_hash": "aaa"}))
    tok_b = data_fingerprint(ids, None, SimpleNamespace(input_ids=ids, fingerprint={"tokenizer_hash": "bbb"}))
    assert tok_a["tokenizer_hash"] == "aaa" and "tokenizer_hash" not in plain
    assert len({str(plain), str(tok_a), str(tok_b)}) == 3
    masked = data_fingerprint(ids, torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0))
    assert masked["ids"] == plain["ids"] and "mask" in masked
    m1, m2 = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    assert model_fingerprint(m1)["hash"] == model_fingerprint(make_tiny_llama(seed=0))["hash"]
    assert model_fingerprint(m1)["hash"] != model_fingerprint(m2)["hash"]


def test_calibration_data_like_object(tmp_path):
    model = make_tiny_llama()
    ids = _ids()
    data = SimpleNamespace(input_ids=ids, attention_mask=None,
                           fingerprint={"dataset": "synthetic", "tokenizer_hash": "t0"},
                           fingerprint_key=lambda: "synthetic-4x12")
    st = calibrate(model, data, cache_dir=tmp_path, progress=False)
    assert st.fingerprint["data"]["source"]["dataset"] == "synthetic"
    assert st.fingerprint["data"]["tokenizer_hash"] == "t0"
    cnt = _Counter(model)
    data2 = SimpleNamespace(input_ids=ids, attention_mask=None,
                            fingerprint={"dataset": "synthetic", "tokenizer_hash": "t1"})
    calibrate(model, data2, cache_dir=tmp_path, progress=False)
    assert cnt.calls == 4  # another tokenizer: a miss


def test_resume_after_interruption(tmp_path):
    model = make_tiny_llama()
    ids = _ids(7, 10, seed=3)
    full = calibrate(model, ids, stats=("cx", "cg", "grad"), progress=False)

    cnt = _Counter(model, fail_at=6)  # windows 0..4 complete, the 6th forward fails
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, ids, stats=("cx", "cg", "grad"), cache_dir=tmp_path, checkpoint_every=2, progress=False)
    cnt.h.remove()
    partial = [n for n in _entries(tmp_path) if "partial" in n]
    assert len(partial) == 1 and partial[0].endswith(".partial-r0of1.safetensors")
    assert all("forward" not in m.__dict__ for m in model.modules())

    cache = StatsCache(tmp_path)
    key = partial[0].split(".partial")[0]
    _, meta = cache.load_partial(key)
    assert meta["done"] == 4 and meta["tokens"] == 40

    cnt = _Counter(model)
    resumed = calibrate(model, ids, stats=("cx", "cg", "grad"), cache_dir=tmp_path, checkpoint_every=2,
                        progress=False)
    assert cnt.calls == 3  # windows 4, 5, 6 only
    assert resumed.tokens == full.tokens == 70 and resumed.loss_tokens == 63
    for kind in ("cx", "cg", "grad"):
        for k, v in getattr(full, kind).items():
            torch.testing.assert_close(getattr(resumed, kind)[k], v, rtol=1e-6, atol=1e-9)
    assert not any("partial" in n for n in _entries(tmp_path))  # a completed run drops the checkpoint
    assert cache.has(key)


def test_resume_false_ignores_the_checkpoint(tmp_path):
    model = make_tiny_llama()
    ids = _ids(4, 8, seed=4)
    cnt = _Counter(model, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, ids, cache_dir=tmp_path, checkpoint_every=1, progress=False)
    cnt.h.remove()
    cnt = _Counter(model)
    calibrate(model, ids, cache_dir=tmp_path, checkpoint_every=1, resume=False, progress=False)
    assert cnt.calls == 4
