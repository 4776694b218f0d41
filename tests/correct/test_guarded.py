"""The guarded ZS step (correct='zs-guarded'): the step size t it chooses minimises the loss on the held-out
calibration windows over its grid (losses checked against perplexity of the packed model), t = 0 gives the
uncorrected factors exactly, t = 1 is ZS-SVD's step on the gradient windows; the pipeline holds out the last
guard_windows windows and reports t; what it cannot do is refused by name. Tiny fp64 Llama."""
from __future__ import annotations

import copy

import pytest
import torch

import obdk
from obdk.config import LowRankConfig
from obdk.correct import guarded
from obdk.correct.guarded import GRID, guarded_correct, heldout_loss, split_holdout
from obdk.correct.steps import gradient_correct
from obdk.errors import ConfigError, DataError
from obdk.eval import perplexity
from obdk.models import set_module
from obdk.nn import LowRankLinear
from obdk.testing import make_tiny_llama

CFG = dict(method="zs-svd", keep=0.3, rank_multiple=1, compute_dtype="float64")


def _trained():
    """A tiny fp64 Llama fitted for 60 Adam steps to modular ramps (a random one predicts near-uniformly, so that
    truncating it barely moves the loss), and 6 windows of such ramps."""
    torch.manual_seed(0)
    model = make_tiny_llama(layers=2).double()
    g = torch.Generator().manual_seed(0)

    def ramps(n, T=24):
        start, step = torch.randint(0, 128, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        return (start + step * torch.arange(T)) % 128

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        x = ramps(16)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), ramps(6)


@pytest.fixture(scope="module")
def setup():
    model, ids = _trained()
    cfg = LowRankConfig(**CFG, correct="zs-guarded", guard_windows=2)
    plan = obdk.prepare(model, cfg, ids, progress=False)
    alloc = plan.allocate(config=cfg)
    factors = {n: plan.factors(n, r) for n, r in alloc.ranks.items() if r is not None}
    return model, plan, cfg, factors


def _packed(model, factors):
    m = copy.deepcopy(model)
    for n, (a, b, _) in factors.items():
        set_module(m, n, LowRankLinear.from_factors(a.to(torch.float64), b.to(torch.float64)))
    return m


def _same(f, g):
    assert f.keys() == g.keys()
    for n in f:
        assert torch.equal(f[n][0], g[n][0]) and torch.equal(f[n][1], g[n][1]), n


def test_split_holds_out_the_last_windows(setup):
    _, plan, _, _ = setup
    fit, held = split_holdout(plan.data, 2)
    assert torch.equal(fit.input_ids, plan.data.input_ids[:4]) and torch.equal(held.input_ids, plan.data.input_ids[4:])
    with pytest.raises(DataError, match="guard_windows=6"):
        split_holdout(plan.data, 6)


def test_chosen_t_minimises_the_heldout_loss_over_the_grid(setup):
    model, plan, cfg, factors = setup
    fit, held = split_holdout(plan.data, 2)
    out, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats, spectra=plan.spectra,
                                config=cfg)
    per_t, _ = gradient_correct(model, factors, "zs", data=fit, stats=plan.stats, spectra=plan.spectra, config=cfg,
                                scales=GRID)
    # the held-out loss at each t, measured independently: perplexity of the packed model on the held-out windows
    nll = {t: perplexity(_packed(model, {n: per_t[n][j] for n in factors}), None, held.input_ids, seqlen=24,
                         progress=False)["nll"] for j, t in enumerate(GRID)}
    assert set(info["loss"]) == set(GRID)
    for t in GRID:
        assert info["loss"][t] == pytest.approx(nll[t], rel=1e-6, abs=0), t  # (fp32 logits in both)
    assert max(nll.values()) - min(nll.values()) > 1e-2  # the line search has something to choose
    assert info["t"] == min(GRID, key=lambda t: nll[t])
    assert all(nll[info["t"]] <= v for v in nll.values())
    j = GRID.index(info["t"])
    _same(out, {n: per_t[n][j] for n in factors})
    assert info["gradient_windows"] == 4 and info["holdout_windows"] == 2
    # t = 1 is ZS-SVD's step (on the gradient windows), t = 0 the input factors
    zs, _ = gradient_correct(model, factors, "zs", data=fit, stats=plan.stats, spectra=plan.spectra, config=cfg)
    _same({n: per_t[n][-1] for n in factors}, zs)
    _same({n: per_t[n][0] for n in factors}, factors)
    # the model is left dense and unchanged
    assert all(type(mod) is not LowRankLinear for mod in model.modules())


def test_interior_minimum(setup):
    """On a grid past ZS-SVD's step the loss falls then rises again: the minimum inside the grid is chosen."""
    model, plan, cfg, factors = setup
    fit, held = split_holdout(plan.data, 2)
    _, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats, spectra=plan.spectra,
                              config=cfg, grid=(0.0, 1.0, 2.0, 5.0, 50.0))
    loss = info["loss"]
    assert loss[50.0] > loss[0.0] and info["t"] not in (0.0, 50.0)
    assert loss[info["t"]] == min(loss.values())


def test_overshooting_step_chooses_t0_and_the_uncorrected_factors(setup):
    model, plan, cfg, factors = setup
    fit, held = split_holdout(plan.data, 2)
    before = heldout_loss(model, held.input_ids)
    out, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats, spectra=plan.spectra,
                                config=cfg, grid=(0.0, 50.0))  # fifty ZS steps overshoot
    assert heldout_loss(model, held.input_ids) == before
    assert info["loss"][50.0] > info["loss"][0.0] and info["t"] == 0.0
    _same(out, factors)


def test_pipeline_reports_t_and_equals_no_correction_at_t0(setup, monkeypatch):
    model, plan, _, factors = setup
    m = copy.deepcopy(model)
    rep = plan.apply(m, correct="zs-guarded", guard_windows=2)
    fit, held = split_holdout(plan.data, 2)
    _, info = guarded_correct(model, factors, data=fit, holdout=held, stats=plan.stats, spectra=plan.spectra,
                              config=plan.resolve(correct="zs-guarded", guard_windows=2))
    assert rep.config["correct"] == "zs-guarded" and rep.config["guard_windows"] == 2
    low = [r for r in rep.modules if r.rank is not None]
    assert low and all(r.damping["guard_t"] == info["t"] for r in low)
    assert all(r.damping[f"guard_loss@{t:g}"] == pytest.approx(info["loss"][t], rel=1e-12) for r in low for t in GRID)
    # with a grid whose only other step overshoots, the compressed model is the uncorrected one, bit for bit
    monkeypatch.setattr(guarded, "GRID", (0.0, 50.0))
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    rep0 = plan.apply(m0, correct="zs-guarded", guard_windows=2)
    plan.apply(m1, correct="none")
    assert {r.damping["guard_t"] for r in rep0.modules if r.rank is not None} == {0.0}
    for (n, p0), (_, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        assert torch.equal(p0, p1), n


def test_refusals_name_the_field():
    with pytest.raises(ConfigError, match="guard_windows"):
        LowRankConfig(guard_windows=0)
    model = make_tiny_llama(layers=2).double()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    plan = obdk.prepare(model, LowRankConfig(**CFG, correct="zs-guarded"), ids, progress=False)
    with pytest.raises(DataError, match="guard_windows=8"):  # 8 held out of 4 windows
        plan.apply(copy.deepcopy(model))
    with pytest.raises(ConfigError, match="zs-guarded"):  # the line search runs the whole model: no stream
        sp = obdk.prepare(model, LowRankConfig(**CFG, correct="zs-guarded", guard_windows=1), ids, progress=False,
                          stream=True)
        sp.apply(copy.deepcopy(model))
    with pytest.raises(ConfigError, match="include 0"):
        guarded_correct(model, {}, data=ids, holdout=ids, stats=None, spectra={}, config=None, grid=(0.5, 1.0))
