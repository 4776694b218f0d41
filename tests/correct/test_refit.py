"""Sequential refit (``correct="seq"``, obdk.refit): exactness where inputs are unshifted, smaller
output error than one-shot where they are, same ranks, weights restored, clear errors."""
import copy

import pytest
import torch

import obdk
from obdk.config import LowRankConfig
from obdk.nn import LowRankLinear
from obdk.pipeline import prepare
from tests.conftest import make_char_tokenizer, make_tiny_llama, make_tiny_qwen2

IDS = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))


def _last_hidden(m, ids=IDS):
    with torch.no_grad():
        return m(ids, output_hidden_states=True).hidden_states[-1]


def _product(m, name):
    mod = m.get_submodule(name)
    assert isinstance(mod, LowRankLinear), name
    return mod.weight_b.double() @ mod.weight_a.double()


def test_first_group_equals_one_shot():
    """Layer 0's q/k/v read the embeddings, which compression does not shift: the refit target is
    W C_x C_x⁻¹ = W, so the factors equal one-shot OBD's (damping ~0 so the solve is exact)."""
    base = make_tiny_llama(layers=2)
    cfg = dict(method="obd", keep=0.5, rank_multiple=4, alloc="uniform", damping=1e-9)
    plan = prepare(base, LowRankConfig(**cfg, correct="none"), IDS, progress=False)
    one, seq = copy.deepcopy(base), copy.deepcopy(base)
    plan.apply(one)
    plan_seq = prepare(base, LowRankConfig(**cfg, correct="seq"), IDS, stats=plan.stats, progress=False)
    plan_seq.apply(seq)
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        torch.testing.assert_close(_product(seq, name), _product(one, name), rtol=1e-4, atol=1e-6)
    # later groups see shifted inputs and are refitted: different factors
    assert not torch.allclose(_product(seq, "model.layers.1.mlp.down_proj"),
                              _product(one, "model.layers.1.mlp.down_proj"), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("method", ["obd", "svd-llm"])
def test_refit_tracks_dense_outputs_better(make, method):
    """The compressed model's last hidden states stay closer to the dense model's with refit."""
    base = make(layers=3)
    dense = _last_hidden(base)
    err = {}
    for corr in ("none", "seq"):
        m = copy.deepcopy(base)
        rep = obdk.compress(m, LowRankConfig(method=method, keep=0.5, rank_multiple=4, correct=corr), IDS,
                            progress=False)
        err[corr] = float((_last_hidden(m) - dense).norm())
        ranks = {x.name: x.rank for x in rep.modules}
        if corr == "none":
            ranks0 = ranks
    assert ranks == ranks0, "refit must not change the allocation"
    assert err["seq"] < 0.9 * err["none"], err


def test_refit_reports_damping_and_restores_weights_on_failure(monkeypatch):
    base = make_tiny_llama(layers=2)
    m = copy.deepcopy(base)
    rep = obdk.compress(m, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, correct="seq"), IDS, progress=False)
    assert "correction" in rep.stages
    assert any("refit_cx_shifted_solve" in x.damping for x in rep.modules if x.rank is not None)

    # a failure half-way leaves the dense weights as they were
    from obdk.correct import refit
    m2 = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    calls = {"n": 0}
    real = refit.shifted_cholesky

    def boom(c, d, what):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError(f"sequential refit: {what}: injected")
        return real(c, d, what)

    monkeypatch.setattr(refit, "shifted_cholesky", boom)
    with pytest.raises(ValueError, match="injected"):
        obdk.compress(m2, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, correct="seq"), IDS, progress=False)
    for n, p in m2.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_padded_documents_and_save_load(tmp_path):
    """list[str] calibration (right-padded windows): padding rows are excluded, the result loads back."""
    tok = make_char_tokenizer()
    docs = [("the quick brown fox jumps over the lazy dog " * (1 + i % 3))[: 20 + 7 * i] for i in range(8)]
    m = make_tiny_llama(layers=2)
    obdk.compress(m, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, correct="seq"), docs, tokenizer=tok,
                  nsamples=8, seqlen=40, progress=False)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    d = obdk.save_pretrained(m, tmp_path / "c")
    m2 = obdk.load_pretrained(d)
    with torch.no_grad():
        torch.testing.assert_close(m2(IDS[:2]).logits, m(IDS[:2]).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_needs_input_whitening(method):
    with pytest.raises(ValueError, match="correct='seq'"):
        LowRankConfig(method=method, correct="seq").validate()
