"""obdk.compress end to end on tiny models: every method, budget, save/load, generate, any ratio."""
import pytest
import torch

import obdk
from obdk.config import LowRankConfig
from obdk.nn import LowRankLinear
from obdk.pipeline import prepare, spectrum_as_svd
from tests.conftest import make_tiny_llama, make_tiny_qwen2

IDS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))


def _logits(m, ids=IDS[:2]):
    with torch.no_grad():
        return m(ids).logits


def _loss(m, ids=IDS):
    with torch.no_grad():
        lg = m(ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
def test_compress_save_load_identical_and_generate(make, tmp_path):
    m = make()
    emb = m.model.embed_tokens.weight.detach().clone()
    rep = obdk.compress(m, LowRankConfig(method="obd", keep=0.6, rank_multiple=4), IDS, progress=False)
    assert any(isinstance(x, LowRankLinear) for x in m.modules())
    # tied lm_head untouched (and still tied)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    torch.testing.assert_close(m.model.embed_tokens.weight, emb, rtol=0, atol=0)
    assert rep.model_params_after < rep.model_params_before
    d = obdk.save_pretrained(m, tmp_path / "c")
    m2 = obdk.load_pretrained(d)
    torch.testing.assert_close(_logits(m2), _logits(m), rtol=0, atol=0)
    out = m2.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    if make is make_tiny_qwen2:  # q/k/v biases are kept
        q = m2.get_submodule("model.layers.0.self_attn.q_proj")
        assert isinstance(q, LowRankLinear) and q.bias is not None or not isinstance(q, LowRankLinear)


@pytest.mark.parametrize("method,extra", [
    ("svd", {}), ("svd-llm", {}), ("asvd", {}), ("obd", {}), ("obd", {"alloc": "uniform"}),
    ("zs-svd", {}), ("bsi", {"probes": 2}), ("obd", {"correct": "zs"}), ("svd-llm", {"alloc": "zero-sum"}),
    ("obd", {"correct": "seq"}), ("svd-llm", {"correct": "seq"}), ("obd", {"correct": "kfac"}),
    ("svd-llm", {"correct": "kfac"}), ("obd", {"correct": "zs+kfac"}),
])
def test_every_method_honours_budget(method, extra):
    m = make_tiny_llama()
    mult = 4
    rep = obdk.compress(m, LowRankConfig(method=method, keep=0.6, rank_multiple=mult, **extra), IDS, progress=False)
    budget = 0.6 * rep.targeted_params_before
    # within one rank multiple per module of the budget
    slack = sum(mult * (x.out_features + x.in_features) for x in rep.modules) / 2
    assert rep.targeted_params_after <= budget + slack
    assert rep.targeted_params_after >= budget - 2 * slack
    for mod in rep.modules:
        if mod.rank is not None:
            assert mod.rank * (mod.out_features + mod.in_features) < mod.out_features * mod.in_features
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert _loss(m) == pytest.approx(_loss(m), abs=0)  # runs, finite


def test_obd_predicted_loss_matches_kfac_and_is_lowest():
    """On the same stats, OBD's predicted (K-FAC) loss is the smallest of svd/svd-llm/obd at equal ranks."""
    from obdk.decompose import damp_covariance, kfac_loss
    base = make_tiny_llama()
    stats = obdk.calibrate(base, IDS, stats=("cx", "cg"), progress=False)
    losses = {}
    for method in ("svd", "svd-llm", "obd"):
        m = make_tiny_llama()
        cfg = LowRankConfig(method=method, keep=0.5, alloc="uniform", rank_multiple=4, damping=0.0, correct="none")
        rep = obdk.compress(m, cfg, stats=stats, progress=False)
        total = 0.0
        for r in rep.modules:
            w = base.get_submodule(r.name).weight.detach().double()
            new = m.get_submodule(r.name)
            wp = new.weight.detach().double() if isinstance(new, LowRankLinear) else w
            total += kfac_loss(w - wp, stats.cx_for(r.name).double(), stats.cg[r.name].double())
            if method == "obd" and isinstance(new, LowRankLinear):
                assert kfac_loss(w - wp, stats.cx_for(r.name).double(), stats.cg[r.name].double()) == \
                    pytest.approx(r.predicted_loss, rel=1e-4, abs=1e-12)
        losses[method] = total
    assert losses["obd"] <= losses["svd-llm"] * (1 + 1e-9)
    assert losses["obd"] <= losses["svd"] * (1 + 1e-9)
    _ = damp_covariance


def test_any_ratio_from_one_decomposition_equals_fresh_compression():
    cfg = LowRankConfig(method="obd", keep=0.8, rank_multiple=4)
    base = make_tiny_llama()
    plan = prepare(base, cfg, IDS, progress=False)
    import copy
    for keep in (0.8, 0.5):
        m1 = copy.deepcopy(base)
        r1 = plan.apply(m1, keep=keep)
        m2 = make_tiny_llama()
        r2 = obdk.compress(m2, LowRankConfig(method="obd", keep=keep, rank_multiple=4), IDS, progress=False)
        assert [x.rank for x in r1.modules] == [x.rank for x in r2.modules]
        torch.testing.assert_close(_logits(m1), _logits(m2))


def test_compress_many_returns_one_model_per_ratio():
    base = make_tiny_llama()
    out = obdk.compress_many(base, LowRankConfig(method="svd-llm", rank_multiple=4), [0.9, 0.5], IDS, progress=False)
    assert [round(r.config["keep"], 2) for _, r in out] == [0.9, 0.5]
    assert out[0][1].targeted_params_after > out[1][1].targeted_params_after
    assert not any(isinstance(x, LowRankLinear) for x in base.modules())  # the input model is untouched


def test_zero_sum_scores_equal_zs_svd_reference():
    """For svd-llm whitening, the pipeline's δ_i = −σ_i ∂L/∂σ_i equals ZS-SVD's whitened-coordinate score."""
    from obdk.allocate import zero_sum_scores
    m = make_tiny_llama()
    cfg = LowRankConfig(method="zs-svd", keep=0.6, damping=0.01)
    plan = prepare(m, cfg, IDS, progress=False)
    name = plan.targets[0].name
    ref = zero_sum_scores(m.get_submodule(name).weight.detach(), plan.stats.grad[name], plan.stats.cx_for(name),
                          damping=0.01)
    ours = plan.scores("zero-sum")[name]
    k = min(ours.numel(), ref.delta.numel())
    torch.testing.assert_close(ours[:k].double(), ref.delta[:k].double().cpu(), rtol=1e-5, atol=1e-7)
    # the adapter's σ_i = ‖b_i‖‖a_i‖ is another parametrisation of the same components: δ is invariant
    ws = spectrum_as_svd(plan.spectra[name])
    torch.testing.assert_close(ws.weight().float(), m.get_submodule(name).weight.detach(), rtol=1e-3, atol=1e-4)


def test_targets_and_ignore_patterns():
    m = make_tiny_llama()
    rep = obdk.compress(m, LowRankConfig(method="svd", keep=0.5, targets=["*mlp*"], ignore=["*down_proj"],
                                         rank_multiple=4), progress=False)
    names = {r.name.split(".")[-1] for r in rep.modules}
    assert names == {"gate_proj", "up_proj"}
    with pytest.raises(ValueError, match="no Linear matched"):
        obdk.compress(make_tiny_llama(), LowRankConfig(method="svd", targets=["*nothing*"]), progress=False)


def test_missing_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration"):
        obdk.compress(make_tiny_llama(), LowRankConfig(method="obd"), None, progress=False)


def test_unknown_architecture_falls_back_to_all_decoder_linears():
    m = make_tiny_llama()
    m.config.model_type = "my-new-arch"
    rep = obdk.compress(m, LowRankConfig(method="svd", keep=0.5, rank_multiple=4), progress=False)
    assert len(rep.modules) == 2 * 7


@pytest.mark.parametrize("method", ["obd", "svd-llm", "svd"])
def test_batched_decomposition_equals_per_matrix(method):
    """prepare(batch=k) decomposes same-shaped targets in batched calls; the spectra are the same."""
    m = make_tiny_llama(layers=3)
    one = prepare(m, LowRankConfig(method=method), IDS, progress=False, batch=1)
    many = prepare(m, LowRankConfig(method=method), IDS, stats=one.stats, progress=False, batch=4)
    assert set(one.spectra) == set(many.spectra)
    for name, s1 in one.spectra.items():
        s2 = many.spectra[name]
        torch.testing.assert_close(s2.eigenvalues, s1.eigenvalues, rtol=1e-9, atol=1e-12)
        f1, f2 = s1.truncate(8, keep_dense_at_break_even=False), s2.truncate(8, keep_dense_at_break_even=False)
        torch.testing.assert_close(f2.b @ f2.a, f1.b @ f1.a, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="batch"):
        prepare(m, LowRankConfig(method=method), IDS, stats=one.stats, progress=False, batch=0)


@pytest.mark.parametrize("method", ["obd", "svd-llm", "asvd"])
def test_parallel_decomposition_equals_sequential_and_restores_threads(method):
    """prepare(workers=k) runs k decompositions at once on one intra-op thread each: same spectra, same
    order, and the caller's thread count comes back, also after an error."""
    m = make_tiny_llama(layers=3)
    threads = torch.get_num_threads()
    one = prepare(m, LowRankConfig(method=method), IDS, progress=False, workers=1)
    many = prepare(m, LowRankConfig(method=method), IDS, stats=one.stats, progress=False, workers=3)
    assert torch.get_num_threads() == threads
    assert list(one.spectra) == list(many.spectra)
    assert many.timer.stages["factorisation/eigen"].seconds > 0  # the workers' phases are clocked too
    for name, s1 in one.spectra.items():
        torch.testing.assert_close(many.spectra[name].eigenvalues, s1.eigenvalues, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="workers"):
        prepare(m, LowRankConfig(method=method), IDS, stats=one.stats, progress=False, workers=0)
    # a bad covariance in one layer: the error names it, and nothing is left changed
    bad = one.stats
    key = next(iter(bad.cx))
    saved = bad.cx[key].clone()
    bad.cx[key][0, 0] = float("nan")
    try:
        for workers in (1, 2):
            with pytest.raises(ValueError, match=r"model\.layers\.0\.[\w.]+_proj: .*non-finite"):
                prepare(m, LowRankConfig(method=method), IDS, stats=bad, progress=False, workers=workers)
    finally:
        bad.cx[key].copy_(saved)
    assert torch.get_num_threads() == threads


def test_default_obd_correction_needs_windows_and_says_so():
    m = make_tiny_llama()
    stats = obdk.calibrate(m, IDS, stats=("cx", "cg"), progress=False)
    with pytest.raises(ValueError, match="correct='none'"):
        obdk.compress(m, LowRankConfig(method="obd", keep=0.6), stats=stats, progress=False)
    rep = obdk.compress(m, LowRankConfig(method="obd", keep=0.6, correct="none"), stats=stats, progress=False)
    assert "correction" not in rep.stages
    assert rep.config["correct"] == "none"
    m2 = make_tiny_llama()
    rep2 = obdk.compress(m2, LowRankConfig(method="obd", keep=0.6), IDS, progress=False)
    assert "correction" in rep2.stages and rep2.config["correct"] == "zs+kfac"  # the report records what ran


def test_kfac_correction_reduces_to_zs_without_covariances_and_reports_its_damping():
    # plain SVD: both covariances are I, the natural step is the Euclidean one
    outs = {}
    for corr in ("zs", "kfac"):
        m = make_tiny_llama()
        rep = obdk.compress(m, LowRankConfig(method="svd", keep=0.6, rank_multiple=4, correct=corr), IDS,
                            progress=False)
        assert rep.config["correct"] == corr and "correction" in rep.stages
        outs[corr] = m
    for (n, p1), (_, p2) in zip(outs["zs"].named_parameters(), outs["kfac"].named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)
    # OBD: different from zs, finite, the solves' damping in every factored module's report
    m, m2 = make_tiny_llama(), make_tiny_llama()
    stats = obdk.calibrate(m, IDS, stats=("cx", "cg"), progress=False)
    rep = obdk.compress(m, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, correct="kfac"), IDS,
                        stats=stats, progress=False)
    obdk.compress(m2, LowRankConfig(method="obd", keep=0.6, rank_multiple=4, correct="zs"), IDS, stats=stats,
                  progress=False)
    factored = [x for x in rep.modules if x.rank is not None]
    assert factored and all({"kfac_cx", "kfac_cg"} <= set(x.damping) for x in factored)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert any(not torch.allclose(p1, p2) for p1, p2 in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("solver", ["eig", "cholesky"])
def test_factorisation_sub_stages_are_timed(solver):
    """The report breaks the factorisation down into roots / products / eigen / solves (issue #7);
    with one worker the parts add up to no more than the stage's wall time, and the summary
    prints them in brackets after the stage."""
    from obdk.decompose.closed_form import PHASES
    m = make_tiny_llama(layers=2)
    plan = prepare(m, LowRankConfig(method="obd", solver=solver, correct="none"), IDS, progress=False, workers=1)
    st = plan.timer.to_dict()
    parts = [st[f"factorisation/{p}"]["seconds"] for p in PHASES]
    assert all(p > 0 for p in parts)
    assert sum(parts) <= st["factorisation"]["seconds"] * 1.05 + 1e-3
    rep = plan.apply(make_tiny_llama(layers=2), keep=0.7)
    assert set(f"factorisation/{p}" for p in PHASES) <= set(rep.stages)
    assert "factorisation " in rep.summary() and "(roots " in rep.summary()
    # outside prepare, decompositions pay nothing for the clock and report nothing
    from obdk.decompose.closed_form import _CLOCK
    assert _CLOCK.get() is None


def test_calibration_batch_size_gives_the_same_statistics(monkeypatch):
    """prepare(calib_batch_size=k) and obdk compress --calib-batch-size run k windows per pass;
    the statistics (and so the spectra) equal one window per pass up to rounding."""
    import obdk.calibrate.stats as S
    m = make_tiny_llama()
    cfg = LowRankConfig(method="obd", correct="none")
    one = prepare(m, cfg, IDS, progress=False)
    seen = []
    real = S.calibrate
    monkeypatch.setattr(S, "calibrate", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    three = prepare(m, cfg, IDS, progress=False, calib_batch_size=3)
    assert seen == [3]
    for kind in ("cx", "cg"):
        for k, v in getattr(one.stats, kind).items():
            torch.testing.assert_close(getattr(three.stats, kind)[k], v, rtol=1e-5, atol=1e-7)
    for name, s in one.spectra.items():
        torch.testing.assert_close(three.spectra[name].eigenvalues, s.eigenvalues, rtol=1e-4, atol=1e-9)
    from obdk.cli import build_parser
    args = build_parser().parse_args(["compress", "smollm2-135m", "--calib-batch-size", "4", "--out", "x"])
    assert args.calib_batch_size == 4
