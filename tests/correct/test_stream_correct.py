"""Streamed corrections: with prepare(stream=True) the zs/kfac steps take their gradients in a layer-streamed pass
and read one layer's statistics at a time, and the compressed model equals the resident path's (fp64); so do
zero-sum's layer-by-layer scores; what cannot stream (bsi, seq) is refused by name before any work."""
from __future__ import annotations

import copy

import pytest
import torch

import obdk
from obdk.calibrate.data import CalibrationData
from obdk.calibrate.head import summed_weight_grads
from obdk.calibrate.layer_statistics import LayerStatistics
from obdk.calibrate.stream import calibrate_streamed
from obdk.config import LowRankConfig
from obdk.errors import ConfigError, ObdkError
from obdk.testing import make_tiny_llama, make_tiny_qwen2


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


def _compressed(plan, model, **kw):
    m = copy.deepcopy(model)
    rep = plan.apply(m, **kw)
    facs = {n: (mod.weight_a.detach().clone(), mod.weight_b.detach().clone()) for n, mod in m.named_modules()
            if isinstance(mod, obdk.nn.LowRankLinear)}
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = m(x).logits
    return {r.name: r.rank for r in rep.modules}, facs, logits, rep


def _assert_same(got, ref, tol):
    ranks, facs, logits, _ = got
    ranks0, facs0, logits0, _ = ref
    assert ranks == ranks0
    assert facs and facs.keys() == facs0.keys()
    for n in facs0:
        for a, b in zip(facs[n], facs0[n]):
            assert _rel(a, b) < tol, n
    assert _rel(logits, logits0) < tol


def _data(padded):
    ids = torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(5))
    if not padded:
        return ids
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, 14:] = 0
    return CalibrationData(ids, mask, {"kind": "test", "padded": True})


def test_streamed_weight_gradients_equal_the_whole_model_pass():
    """The correction's gradient (∂L/∂W of the summed loss at the truncation) from the streamed pass."""
    model = make_tiny_llama(layers=3).double()
    d = _data(True)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ref = summed_weight_grads(model, d.input_ids, names, attention_mask=d.attention_mask)
    got = calibrate_streamed(model, d, stats=("grad",), dtype=torch.float64, progress=False)
    for n in names:
        assert _rel(got.grad[n], ref[n]) < 1e-10, n


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("correct", ["zs+kfac", "kfac", "zs"])
def test_streamed_corrections_equal_resident(padded, correct):
    model = make_tiny_llama(layers=3).double()
    cfg = LowRankConfig(method="obd", keep=0.6, rank_multiple=1, compute_dtype="float64", correct=correct)
    d = _data(padded)
    ref = _compressed(obdk.prepare(model, cfg, d, progress=False), model)
    plan = obdk.prepare(model, cfg, d, progress=False, stream=True)
    if correct:
        assert isinstance(plan.stats, LayerStatistics) and plan.stats.layers == [0, 1, 2]
        assert not plan.stats.stats.count("grad")
    got = _compressed(plan, model)
    assert got[3].config["correct"] == correct
    _assert_same(got, ref, 1e-9)
    # the dense model the plan was prepared on is left as it was
    assert _rel(model.model.layers[0].mlp.down_proj.weight, make_tiny_llama(layers=3).double()
                .model.layers[0].mlp.down_proj.weight) == 0


def test_forced_spill_of_the_kept_statistics_gives_the_same_model(tmp_path):
    model = make_tiny_qwen2().double()
    cfg = LowRankConfig(method="obd", keep=0.7, rank_multiple=1, compute_dtype="float64")
    d = _data(False)
    ref = _compressed(obdk.prepare(model, cfg, d, progress=False, stream=True), model)
    plan = obdk.prepare(model, cfg, d, progress=False, stream=True, scratch_dir=tmp_path, max_host_memory=0)
    assert plan.stats.spilled_bytes == plan.stats.nbytes() > 0 and plan.stats.host_bytes == 0
    # one private directory for the statistics, one for the spectra (the same budget), a safetensors file per layer
    kept, spectra = sorted(tmp_path.iterdir(), key=lambda p: p.name)
    assert kept.name.startswith("obdk-kept-") and spectra.name.startswith("obdk-spectra-")
    for d in (kept, spectra):
        assert sorted(f.name for f in d.iterdir()) == [f"layer-{i}.safetensors" for i in plan.stats.layers]
    _assert_same(_compressed(plan, model), ref, 1e-15)
    del plan
    import gc
    gc.collect()
    assert not list(tmp_path.iterdir())  # removed with the plan: nothing left behind


def test_zero_sum_scores_stream_layer_by_layer():
    model = make_tiny_llama(layers=3).double()
    cfg = LowRankConfig(method="zs-svd", keep=0.6, compute_dtype="float64")
    d = _data(True)
    res = obdk.prepare(model, cfg, d, progress=False)
    plan = obdk.prepare(model, cfg, d, progress=False, stream=True)
    assert not plan.stats.grad  # the gradients were dropped with each layer, only the scores are kept
    for n, delta in res.scores("zero-sum").items():
        assert _rel(plan.scores("zero-sum")[n], delta) < 1e-9, n
    _assert_same(_compressed(plan, model), _compressed(res, model), 1e-9)


@pytest.mark.parametrize("cfg,what", [
    (LowRankConfig(method="bsi", bsi_curvature="hutchinson"), "bsi"),
    (LowRankConfig(method="svd-llm", correct="seq"), "seq"),
])
def test_what_cannot_stream_is_refused_before_any_work(cfg, what, monkeypatch):
    import obdk.calibrate.stream as S
    monkeypatch.setattr(S, "calibrate_streamed", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(ConfigError, match=f"{what}.*stream=False") as e:
        obdk.prepare(make_tiny_llama(), cfg, _data(False), progress=False, stream=True)
    assert isinstance(e.value, ObdkError)


def test_streamed_plan_refuses_corrections_and_scores_it_did_not_keep():
    model = make_tiny_llama(layers=2).double()
    plan = obdk.prepare(model, LowRankConfig(method="obd", keep=0.7, correct="none"), _data(False), progress=False,
                        stream=True)
    for correct in ("kfac", "zs"):  # both re-truncate in each layer's whitening: statistics this plan dropped
        with pytest.raises(ConfigError, match=f"{correct}.*streamed plan.*dropped them"):
            plan.apply(copy.deepcopy(model), correct=correct)
    with pytest.raises(ConfigError, match="streamed plan.*bsi"):
        plan.apply(copy.deepcopy(model), alloc="bsi")
    with pytest.raises(ConfigError, match="zero-sum.*streamed plan"):
        plan.apply(copy.deepcopy(model), alloc="zero-sum")


@pytest.mark.parametrize("order", ["spectral", "importance"])
def test_bsi_with_kfac_curvature_streams_layer_by_layer(order):
    """BSI's K-FAC curvature needs only each layer's statistics and gradients: scores and model as resident."""
    model = make_tiny_llama(layers=3).double()
    cfg = LowRankConfig(method="bsi", keep=0.6, compute_dtype="float64", bsi_curvature="kfac", bsi_order=order)
    d = _data(True)
    res = obdk.prepare(model, cfg, d, progress=False)
    plan = obdk.prepare(model, cfg, d, progress=False, stream=True)
    ref_scores, got_scores = res.scores("bsi", model), plan.scores("bsi", model)
    for n, sc in ref_scores.items():
        assert _rel(got_scores[n].importance, sc.importance) < 1e-9, n
    _assert_same(_compressed(plan, model), _compressed(res, model), 1e-9)
    with pytest.raises(ConfigError, match="bsi_curvature 'hutchinson'.*does not stream"):
        obdk.prepare(model, cfg.replace(bsi_curvature="hutchinson"), d, progress=False, stream=True)
    with pytest.raises(ConfigError, match="streamed plan.*hutchinson"):
        plan.apply(copy.deepcopy(model), bsi_curvature="hutchinson")
