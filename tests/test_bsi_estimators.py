"""BSI's estimators of the Hessian diagonal in σ against the exact diagonal of a tiny fp64 model.

The exact ``∂²L/∂σ_i²`` (every other σ fixed) of the summed calibration loss comes from autograd
(one Hessian-vector product per σ, the model is tiny enough to enumerate them). Each estimator's
relative error ``‖h − h*‖/‖h*‖`` and correlation with ``h*`` are printed (``pytest -s``).
K-FAC and the empirical Fisher are approximations of a different matrix (a Gauss-Newton-like
curvature), so they are checked exactly against their own definitions and only for correlation
with the exact diagonal; the Hutchinson ones are unbiased for it and must converge.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import obdk
from obdk.calibrate.data import CalibrationData
from obdk.calibrate.head import summed_weight_grads
from obdk.decompose.whitened import spectrum_as_svd
from obdk.errors import ConfigError, NotCollectedError
from obdk.scores import bsi_scores, fisher_diag, kfac_diag
from obdk.testing import make_tiny_llama

F64 = torch.float64


def _windows(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 24] token ids: arithmetic sequences mod 64 with 10 % of the tokens replaced at random (learnable)."""
    base, step = torch.randint(0, 64, (n, 1), generator=gen), torch.randint(1, 4, (n, 1), generator=gen)
    x = (base + step * torch.arange(24)) % 64
    return torch.where(torch.rand(n, 24, generator=gen) < 0.1, torch.randint(0, 64, (n, 24), generator=gen), x)


@pytest.fixture(scope="module")
def setup():
    """A 1-layer fp64 Llama trained briefly on learnable windows: near a minimum the Hessian is nearly PSD
    (at random initialisation three quarters of its diagonal in σ is negative, which no curvature
    approximation that is a Gram can follow)."""
    torch.manual_seed(0)
    model = make_tiny_llama(3, layers=1, hidden=32, inter=64, heads=4, kv_heads=2, vocab=64).double()
    model.set_attn_implementation("eager")  # SDPA on CPU has no double backward (the exact Hessian needs one)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(200):
        x = _windows(16, gen)
        loss = _loss(model(x, use_cache=False).logits, x) / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = _windows(4, gen)
    data = CalibrationData(input_ids=ids, attention_mask=None, fingerprint={"name": "arithmetic"})
    cfg = obdk.LowRankConfig(method="svd-llm", alloc="bsi", bsi_curvature="kfac", compute_dtype="float64")
    plan = obdk.prepare(model, cfg, data, progress=False)
    decomps = {t.name: spectrum_as_svd(plan.spectra[t.name]) for t in plan.targets}
    return model, ids, plan, decomps


def _loss(logits, ids):
    """The summed next-token cross entropy in the logits' dtype (fp64 here)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def _exact_diag(model, ids, decomps) -> dict[str, torch.Tensor]:
    names = list(decomps)
    sig = torch.cat([decomps[n].sigma for n in names]).clone().requires_grad_(True)
    sizes = [decomps[n].sigma.numel() for n in names]
    params = {}
    for n, s in zip(names, torch.split(sig, sizes)):
        d = decomps[n]
        params[f"{n}.weight"] = (d.u * s) @ d.right
    loss = _loss(functional_call(model, params, (ids,), {"use_cache": False}).logits, ids)
    (g,) = torch.autograd.grad(loss, sig, create_graph=True)
    h = torch.stack([torch.autograd.grad(g[i], sig, retain_graph=True)[0][i] for i in range(sig.numel())])
    return dict(zip(names, torch.split(h.detach(), sizes)))


@pytest.fixture(scope="module")
def exact(setup):
    model, ids, _, decomps = setup
    return _exact_diag(model, ids, decomps)


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _rel(h, ref):
    return float((h - ref).norm() / ref.norm())


def _corr(h, ref):
    return float(torch.corrcoef(torch.stack([h, ref]))[0, 1])


def test_kfac_is_its_definition(setup):
    _, _, plan, decomps = setup
    st = plan.stats
    name = plan.targets[1].name  # k_proj: 16 × 32
    d = decomps[name]
    cx, cg, n = st.cx_for(name).double(), st.cg[name].double(), st.loss_tokens
    h = kfac_diag(d, cx, cg, n)
    big = n * torch.kron(cx, cg)  # vec (column-major) of B: (C_x ⊗ C_g) acts on vec(B)
    want = torch.stack([(b := torch.outer(d.u[:, i], d.right[i])).T.reshape(-1) @ big @ b.T.reshape(-1)
                        for i in range(d.sigma.numel())])
    torch.testing.assert_close(h, want, rtol=1e-10, atol=0)


def test_fisher_is_its_definition(setup):
    model, ids, _, decomps = setup
    names = list(decomps)[:3]
    sub = {n: decomps[n] for n in names}
    g, h = fisher_diag(model, ids, sub, batch_size=3)
    # per-token inputs a_t and output gradients g_t of the summed loss, by autograd on the outputs
    mods = dict(model.named_modules())
    inputs, outputs = {}, {}

    def keep(m, i, o, n):
        inputs[n], outputs[n] = i[0].detach(), o

    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: keep(m, i, o, n)) for n in names]
    w = [mods[n].weight for n in names]
    for p in w:
        p.requires_grad_(True)
    try:
        loss = _loss(model(ids, use_cache=False).logits, ids)
        gouts = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for hk in hooks:
            hk.remove()
        for p in w:
            p.requires_grad_(False)
    for n, go in zip(names, gouts):
        d = decomps[n]
        q = (go.reshape(-1, go.shape[-1]) @ d.u) * (inputs[n].reshape(-1, inputs[n].shape[-1]) @ d.right.T)
        torch.testing.assert_close(h[n], (q * q).sum(0), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g[n], q.sum(0), rtol=1e-10, atol=1e-14)
    # the gradient in σ is the projection of the summed weight gradient
    gw = summed_weight_grads(model, ids, names)
    for n in names:
        torch.testing.assert_close(g[n], decomps[n].grad_sigma(gw[n]), rtol=1e-8, atol=1e-12)


def test_estimators_against_the_exact_hessian_diagonal(setup, exact):
    model, ids, plan, decomps = setup
    names = list(decomps)
    ref = _flat(exact, names)
    sigma = _flat({n: decomps[n].sigma for n in names}, names)
    mods = dict(model.named_modules())
    before = {n: mods[n].weight.detach().clone() for n in names}
    res = {}
    for label, kw in [("hutchinson 2", dict(curvature="hutchinson", probes=2)),
                      ("hutchinson 32", dict(curvature="hutchinson", probes=32)),
                      ("blocked 2", dict(curvature="blocked", probes=2)),
                      ("blocked 32", dict(curvature="blocked", probes=32)),
                      ("blocked auto 0.1", dict(curvature="blocked", probes="auto", probe_tol=0.1, max_probes=100)),
                      ("kfac", dict(curvature="kfac")), ("fisher", dict(curvature="fisher"))]:
        out = bsi_scores(model, ids, decomps, eps=1e-4, stats=plan.stats, batch_size=4,
                         generator=torch.Generator().manual_seed(0), **kw)
        h = _flat({n: out[n].h_diag for n in names}, names)
        res[label] = (_rel(h, ref), _corr(h, ref), out[names[0]].passes,
                      _rel(h * sigma ** 2, ref * sigma ** 2))
    for n in names:
        assert torch.equal(mods[n].weight, before[n]), "weights not restored"
    print("\nestimator              rel.err  corr   passes  rel.err(½hσ²)")
    for label, (e, c, p, ei) in res.items():
        print(f"{label:<22} {e:7.3f}  {c:5.3f}  {p:6d}  {ei:7.3f}")
    # Hutchinson converges, and blocking per matrix reduces its error at equal probes
    assert res["hutchinson 32"][0] < res["hutchinson 2"][0]
    assert res["blocked 32"][0] < res["hutchinson 32"][0]
    assert res["blocked 32"][0] < 0.1 and res["blocked 32"][1] > 0.99
    assert res["blocked auto 0.1"][0] < 0.15
    # the passes are counted: kfac reads the statistics (no pass), fisher takes one, the rest 2 per probe
    assert res["kfac"][2] == 0 and res["fisher"][2] == 1
    assert res["hutchinson 2"][2] == 4 and res["blocked 2"][2] == 4 * len(names)
    # the closed-form curvatures approximate another matrix; they must still rank like it
    assert res["kfac"][1] > 0.6 and res["fisher"][1] > 0.6
    assert res["kfac"][0] < 1 and res["fisher"][0] < 1


def test_bsi_auto_probes_stop_by_the_rule(setup):
    model, ids, plan, decomps = setup
    names = list(decomps)[:2]
    sub = {n: decomps[n] for n in names}
    loose = bsi_scores(model, ids, sub, curvature="blocked", probes="auto", probe_tol=1.0, max_probes=50,
                       eps=1e-4, batch_size=4, generator=torch.Generator().manual_seed(0))
    tight = bsi_scores(model, ids, sub, curvature="blocked", probes="auto", probe_tol=1e-9, max_probes=5,
                       eps=1e-4, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert all(loose[n].probes == 3 for n in names)  # the minimum: a variance needs a few probes
    assert all(tight[n].probes == 5 for n in names)  # the cap
    assert tight[names[0]].passes == 1 + 2 * 5 * len(names)  # no stats given: one pass for the gradient
    for n in names:
        se = (tight[n].h_var.sum().sqrt() / tight[n].h_diag.norm())
        assert torch.isfinite(se)


def test_bsi_config_fields_and_plan(setup):
    model, ids, plan, _ = setup
    for bad in (dict(bsi_curvature="exact"), dict(probes="many"), dict(probes=0), dict(probe_tol=0),
                dict(max_probes=2), dict(max_probes=True)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            obdk.LowRankConfig(method="bsi", **bad)
    cfg = obdk.LowRankConfig(method="bsi", bsi_curvature="kfac", probes="auto")
    assert "cg" in cfg.needed_stats and obdk.LowRankConfig.from_json(cfg.to_json()) == cfg
    assert "cg" not in obdk.LowRankConfig(method="bsi", bsi_curvature="fisher").needed_stats
    # the estimator is an apply-time option, cached per estimator
    a = plan.scores("bsi", model, plan.resolve(bsi_curvature="kfac"))
    b = plan.scores("bsi", model, plan.resolve(bsi_curvature="fisher"))
    assert a is plan.scores("bsi", model, plan.resolve(bsi_curvature="kfac")) and a is not b
    rep = plan.apply(make_copy(model), keep=0.6, bsi_curvature="fisher", bsi_order="spectral")
    assert rep.config["bsi_curvature"] == "fisher"
    # kfac on a plan without C_g is refused by name
    plan2 = obdk.prepare(model, obdk.LowRankConfig(method="bsi", bsi_curvature="fisher", compute_dtype="float64"),
                         CalibrationData(input_ids=ids, attention_mask=None, fingerprint={"name": "arithmetic"}),
                         progress=False)
    with pytest.raises(NotCollectedError, match="bsi_curvature"):
        plan2.apply(make_copy(model), keep=0.6, bsi_curvature="kfac")


def make_copy(model):
    import copy
    return copy.deepcopy(model)


def test_cli_bsi_flags():
    from obdk.cli import _config_from_args, build_parser
    ap = build_parser()
    base = ["compress", "tiny", "--out", "/tmp/x", "--method", "bsi"]
    cfg = _config_from_args(ap.parse_args(base + ["--bsi-curvature", "fisher", "--probes", "auto",
                                                  "--probe-tol", "0.2", "--max-probes", "9"]))
    assert (cfg.bsi_curvature, cfg.probes, cfg.probe_tol, cfg.max_probes) == ("fisher", "auto", 0.2, 9)
    assert _config_from_args(ap.parse_args(base)).bsi_order == obdk.LowRankConfig().bsi_order
    for bad in (["--probes", "x"], ["--probes", "0"], ["--bsi-curvature", "exact"]):
        with pytest.raises(SystemExit):
            ap.parse_args(base + bad)
    with pytest.raises(ConfigError, match="max_probes"):
        _config_from_args(ap.parse_args(base + ["--max-probes", "1"]))


def test_bsi_terms_second_order_is_the_kfac_loss_of_the_truncation(setup):
    """``bsi_terms='second'`` keeps ``½h_iiσ_i²`` only. With K-FAC curvature on input-whitened bases the
    cross terms ``(u_iᵀC_g u_j)(x_iᵀC_x x_j)`` vanish (``x_iᵀC_x x_j = δ_ij`` up to the whitening's damping),
    so the tail sum of the second-order terms is the K-FAC loss ``½N·tr(C_g ΔW C_x ΔWᵀ)`` of truncating
    to that rank; the gradient term is what the seed's importance adds to it."""
    model, _, plan, decomps = setup
    sc = plan.scores("bsi", model, plan.resolve(bsi_curvature="kfac"))
    st = plan.stats
    for t in plan.targets[:4]:
        s, d = sc[t.name], decomps[t.name]
        torch.testing.assert_close(s.terms("second"), 0.5 * s.h_diag * d.sigma ** 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.terms("first+second"), s.importance, rtol=0, atol=0)
        torch.testing.assert_close(s.importance - s.second_order, -s.grad * d.sigma, rtol=1e-10, atol=1e-12)
        cx, cg, n = st.cx_for(t.name).double(), st.cg[t.name].double(), st.loss_tokens
        for r in (1, d.sigma.numel() // 2):
            dw = (d.u[:, r:] * d.sigma[r:]) @ d.right[r:]
            kfac_loss = 0.5 * n * torch.trace(cg @ dw @ cx @ dw.T)
            assert float(s.second_order[r:].sum()) == pytest.approx(float(kfac_loss), rel=0.02), (t.name, r)
    with pytest.raises(ConfigError, match="which"):
        next(iter(sc.values())).terms("first")


def test_bsi_terms_config_cli_and_plan(setup):
    """The field is validated by name, round-trips, is an apply-time option (the scores are shared) and
    changes the allocation; on OBD's bases the K-FAC second-order term is the spectral cost ``½λ_i`` (per token,
    so times N), which makes the allocation OBD's global one."""
    from obdk.cli import _config_from_args, build_parser
    model, ids, plan, _ = setup
    with pytest.raises(ConfigError, match="bsi_terms"):
        obdk.LowRankConfig(method="bsi", bsi_terms="first")
    cfg = obdk.LowRankConfig(method="bsi", bsi_terms="second")
    assert obdk.LowRankConfig.from_json(cfg.to_json()) == cfg
    ap = build_parser()
    base = ["compress", "tiny", "--out", "/tmp/x", "--method", "bsi"]
    assert _config_from_args(ap.parse_args(base + ["--bsi-terms", "second"])).bsi_terms == "second"
    assert _config_from_args(ap.parse_args(base)).bsi_terms == obdk.LowRankConfig().bsi_terms
    with pytest.raises(SystemExit):
        ap.parse_args(base + ["--bsi-terms", "first"])
    a = plan.allocate(0.6, config=plan.resolve(0.6, bsi_curvature="kfac", bsi_order="spectral", bsi_terms="second"),
                      model=model)
    b = plan.allocate(0.6, config=plan.resolve(0.6, bsi_curvature="kfac", bsi_order="spectral",
                                               bsi_terms="first+second"), model=model)
    sc = plan.scores("bsi", model, plan.resolve(bsi_curvature="kfac"))
    want = {n: sum(float(v) for v in sc[n].second_order[r:]) for n, r in a.ranks.items() if r is not None}
    assert a.predicted_loss == pytest.approx(sum(want.values()), rel=1e-9)
    assert a.ranks != b.ranks
    rep = plan.apply(make_copy(model), keep=0.6, bsi_curvature="kfac", bsi_terms="second")
    assert rep.config["bsi_terms"] == "second"
    obd = obdk.prepare(model, obdk.LowRankConfig(method="obd", alloc="bsi", bsi_curvature="kfac", damping=0.0,
                                                 compute_dtype="float64"),
                       CalibrationData(input_ids=ids, attention_mask=None, fingerprint={"name": "arithmetic"}),
                       progress=False)
    so, n = obd.scores("bsi", model), obd.stats.loss_tokens
    for t in obd.targets:
        lam = obd.eigenvalues(t.name).double()
        k = so[t.name].second_order.numel()
        torch.testing.assert_close(so[t.name].second_order, n * lam[:k] / 2, rtol=1e-6, atol=1e-9 * n * float(lam.max()))
    for keep in (0.8, 0.6):
        bsi = obd.allocate(keep, config=obd.resolve(keep, bsi_curvature="kfac", bsi_order="spectral", bsi_terms="second"),
                           model=model)
        assert bsi.ranks == obd.allocate(keep, alloc="global").ranks, keep
