"""Model glue on a tiny Llama: summed weight gradients, ZS-SVD end to end, BSI scores end to end."""
from __future__ import annotations

import pytest
import torch

from obdk.allocate import (
    MatrixSpec,
    allocate_bsi,
    allocate_zero_sum,
    bsi_scores,
    next_token_loss,
    summed_weight_grads,
    whitened_svd,
    zero_sum_scores,
)

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]


def _windows(n=3, t=12, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 8:] = 0  # right padding on one window
    return ids, mask


def test_summed_weight_grads_matches_autograd_and_restores_flags(tiny_llama):
    model = tiny_llama
    model.model.embed_tokens.weight.requires_grad_(False)   # a mixed starting state to restore
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask = _windows()
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in NAMES]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # reference: the plain sum of per-token cross entropies over real (input, target) pairs
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    valid = (mask[:, 1:] * mask[:, :-1]).bool().reshape(-1)
    ref_loss = torch.nn.functional.cross_entropy(lg[valid], ids[:, 1:].reshape(-1)[valid], reduction="sum")
    assert next_token_loss(logits, ids, mask).item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref = torch.autograd.grad(ref_loss, weights)
    got = summed_weight_grads(model, ids, NAMES, attention_mask=mask, batch_size=2)
    assert list(got) == NAMES
    for n, r in zip(NAMES, ref):
        assert got[n].shape == r.shape and got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], r, rtol=1e-4, atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    # no mask, one window at a time == all at once
    g1 = summed_weight_grads(model, ids, NAMES[:1], batch_size=1)
    g3 = summed_weight_grads(model, ids, NAMES[:1], batch_size=3)
    torch.testing.assert_close(g1[NAMES[0]], g3[NAMES[0]], rtol=1e-4, atol=1e-5)


def test_summed_weight_grads_restores_flags_on_error(tiny_llama):
    before = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    with pytest.raises(Exception):
        summed_weight_grads(tiny_llama, torch.full((1, 4), 10_000), NAMES[:1])  # token id out of range
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == before
    with pytest.raises(ValueError, match="2-D weight"):
        summed_weight_grads(tiny_llama, torch.zeros(1, 4, dtype=torch.long), ["model.norm"])


def test_zero_sum_end_to_end(tiny_llama):
    ids, mask = _windows(seed=1)
    grads = summed_weight_grads(tiny_llama, ids, NAMES, attention_mask=mask)
    mods = dict(tiny_llama.named_modules())
    gen = torch.Generator().manual_seed(0)
    specs, scores = [], {}
    for n in NAMES:
        w = mods[n].weight
        x = torch.randn(256, w.shape[1], generator=gen)
        sc = zero_sum_scores(w, grads[n], x.T @ x / 256)
        scores[n] = sc
        specs.append(MatrixSpec(n, *w.shape, deltas=sc.delta))
    alloc = allocate_zero_sum(specs, 0.5)
    assert alloc.params <= alloc.budget
    for n in NAMES:
        r = alloc.ranks[n]
        if r is not None:
            a, b = scores[n].factors(rank=r)
            assert a.shape == (r, mods[n].weight.shape[1]) and b.shape == (mods[n].weight.shape[0], r)


def test_bsi_scores_end_to_end(tiny_llama):
    model = tiny_llama
    ids, mask = _windows(n=2, t=10, seed=2)
    mods = dict(model.named_modules())
    originals = {n: mods[n].weight.detach().clone() for n in NAMES}
    gen = torch.Generator().manual_seed(0)
    decomps = {}
    for i, n in enumerate(NAMES):
        w = mods[n].weight
        cx = None
        if i == 1:
            x = torch.randn(128, w.shape[1], generator=gen)
            cx = x.T @ x / 128
        decomps[n] = whitened_svd(w, cx)
    out = bsi_scores(model, ids, decomps, probes=3, eps=1e-2, attention_mask=mask,
                     generator=torch.Generator().manual_seed(5))
    for n in NAMES:
        assert torch.equal(mods[n].weight, originals[n]), "weights not restored"
        k = min(mods[n].weight.shape)
        sc = out[n]
        for t in (sc.importance, sc.importance_var, sc.grad, sc.h_diag, sc.h_var):
            assert t.shape == (k,) and torch.isfinite(t).all()
        assert (sc.h_var >= 0).all()
        torch.testing.assert_close(sc.importance, -sc.grad * decomps[n].sigma + 0.5 * sc.h_diag * decomps[n].sigma ** 2)
    # g is the projection of the plain weight gradient at the (reconstructed) weights
    g = summed_weight_grads(model, ids, NAMES, attention_mask=mask)
    for n in NAMES:
        want = decomps[n].grad_sigma(g[n])
        torch.testing.assert_close(out[n].grad, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    specs = [MatrixSpec(n, *mods[n].weight.shape, importance=out[n].importance) for n in NAMES]
    alloc = allocate_bsi(specs, 0.5, 4)
    assert alloc.params <= alloc.budget
    assert set(alloc.meta["kept_indices"]) == set(NAMES)


def test_summed_weight_grads_windowed_loss_equals_the_full_logits(monkeypatch):
    """The loss runs one window at a time from the head's weight (obdk.calibrate.head.plain_head):
    the lm_head module is never called, and the gradients equal the full-logits path (fp64)."""
    import obdk.calibrate.head as S
    from tests.conftest import make_tiny_llama
    model = make_tiny_llama().double().eval()
    ids, mask = _windows(4, 14, seed=3)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = summed_weight_grads(model, ids, NAMES, attention_mask=mask, batch_size=2)
        assert calls == []
        monkeypatch.setattr(S, "plain_head", lambda *a: None)
        slow = summed_weight_grads(model, ids, NAMES, attention_mask=mask, batch_size=2)
        assert len(calls) == 2
    finally:
        h.remove()
    for n in NAMES:
        assert fast[n].dtype == torch.float64
        rel = ((fast[n] - slow[n]).norm() / slow[n].norm()).item()
        assert rel < 1e-6, n  # the full-logits path forms its loss in fp32 (next_token_loss), this one in fp64
