"""calibrate(): exactness against plain autograd, shared inputs, GQA, padding, biases, Fisher
variants, the grad statistic, frozen weights / restored forwards, and Statistics I/O."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from obdk.calibrate.function import SharedInputMismatch
from obdk.calibrate.stats import Statistics, calibrate, stats_nbytes
from obdk.models import LinearGroup, linear_groups
from tests.conftest import make_tiny_llama, make_tiny_qwen2


def _ids(n=3, t=24, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def reference(model, seqs, dtype=torch.float64):
    """Per-module Grams by plain autograd on a ``dtype`` copy: hooks keep each Linear's input,
    ``retain_grad`` keeps each output's gradient under the sum-reduced next-token loss.

    ``seqs``: list of 1-D LongTensors (unpadded). Returns (cx per module, cg, weight grad, N_x, N_l).
    """
    ref = copy.deepcopy(model).to(dtype)
    names = [n for g in linear_groups(ref) for n in g.names]
    mods = dict(ref.named_modules())
    cx, cg, nx, nl = {}, {}, 0, 0
    for p in ref.parameters():
        p.requires_grad_(True)
        p.grad = None
    for seq in seqs:
        seen = {}
        hooks = []
        for n in names:
            def hook(mod, inp, out, n=n):
                out.retain_grad()
                seen[n] = (inp[0].detach(), out)
            hooks.append(mods[n].register_forward_hook(hook))
        logits = ref(seq[None], use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], seq[1:], reduction="sum")
        loss.backward()
        for h in hooks:
            h.remove()
        for n, (x, y) in seen.items():
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            g2 = y.grad.reshape(-1, y.shape[-1]).to(dtype)
            cx[n] = cx.get(n, 0) + x2.T @ x2
            cg[n] = cg.get(n, 0) + g2.T @ g2
        nx += seq.numel()
        nl += seq.numel() - 1
    grad = {n: mods[n].weight.grad.detach().clone() for n in names}
    return {n: v / nx for n, v in cx.items()}, {n: v / nl for n, v in cg.items()}, grad, nx, nl


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_exact_fp64_against_autograd_llama_gqa():
    model = make_tiny_llama().double()
    ids = _ids()
    st = calibrate(model, ids, stats=("cx", "cg", "grad"), dtype=torch.float64, progress=False)
    rcx, rcg, rgrad, nx, nl = reference(model, list(ids))
    assert (st.tokens, st.loss_tokens, st.windows) == (nx, nl, 3)
    assert st.fisher == "empirical" and st.dtype == torch.float64
    groups = linear_groups(model)
    assert len(st.cx) == len(groups) == 8  # one C_x per unique input, not per Linear
    for g in groups:
        for n in g.names:  # every member's own input Gram equals the shared one
            assert st.input_key[n] == g.key
            assert _rel(st.cx_for(n), rcx[n]) < 1e-10, n
    for n in rcg:
        assert st.cg[n].dtype == torch.float64
        assert _rel(st.cg[n], rcg[n]) < 1e-10, n
        assert _rel(st.grad[n], rgrad[n]) < 1e-10, n
    # GQA: 4 heads, 2 kv heads of width 16 -> k/v outputs are 32 wide
    a = "model.layers.0.self_attn."
    assert st.cg[a + "q_proj"].shape == (64, 64)
    assert st.cg[a + "k_proj"].shape == st.cg[a + "v_proj"].shape == (32, 32)
    assert st.grad[a + "k_proj"].shape == (32, 64)
    assert st.cx_for("model.layers.1.mlp.down_proj").shape == (160, 160)
    # exactly symmetric
    for t in list(st.cx.values()) + list(st.cg.values()):
        assert torch.equal(t, t.T)


def test_fp32_accumulation_close_to_fp64_reference():
    model = make_tiny_llama()
    ids = _ids(seed=2)
    st = calibrate(model, ids, progress=False)
    rcx, rcg, _, _, _ = reference(model, list(ids))
    assert st.cx_for("model.layers.0.self_attn.k_proj").dtype == torch.float32
    assert not st.grad
    assert max(_rel(st.cx_for(n), rcx[n]) for n in rcx) < 1e-5
    assert max(_rel(st.cg[n], rcg[n]) for n in rcg) < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_unpadded_sequences(side):
    model = make_tiny_llama().double()
    seqs = [_ids(1, 20, seed=3)[0], _ids(1, 13, seed=4)[0], _ids(1, 7, seed=5)[0]]
    T = 20
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    ids[mask == 0] = 5  # a real token id: padding must be excluded by the mask, not by the id
    st = calibrate(model, {"input_ids": ids, "attention_mask": mask}, stats=("cx", "cg", "grad"),
                   dtype=torch.float64, batch_size=3, progress=False)
    rcx, rcg, rgrad, nx, nl = reference(model, seqs)
    assert (st.tokens, st.loss_tokens) == (nx, nl) == (40, 37)
    for n in rcg:
        assert _rel(st.cx_for(n), rcx[n]) < 1e-9, n
        assert _rel(st.cg[n], rcg[n]) < 1e-9, n
        assert _rel(st.grad[n], rgrad[n]) < 1e-9, n


def test_qwen2_with_biases_exact():
    model = make_tiny_qwen2().double()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = _ids(2, 16, seed=6)
    st = calibrate(model, ids, stats=("cx", "cg", "grad"), dtype=torch.float64, progress=False)
    rcx, rcg, rgrad, _, _ = reference(model, list(ids))
    for n in rcg:
        assert _rel(st.cx_for(n), rcx[n]) < 1e-10, n
        assert _rel(st.cg[n], rcg[n]) < 1e-10, n
        assert _rel(st.grad[n], rgrad[n]) < 1e-10, n


def test_true_fisher_runs_differs_and_is_seeded():
    model = make_tiny_llama()
    ids = _ids(4, 16, seed=7)
    emp = calibrate(model, ids, progress=False)
    tf = calibrate(model, ids, fisher="true", seed=0, progress=False)
    tf_b = calibrate(model, ids, fisher="true", seed=0, batch_size=4, progress=False)
    tf_other = calibrate(model, ids, fisher="true", seed=1, progress=False)
    n = "model.layers.1.mlp.down_proj"
    assert tf.fisher == "true" and tf.fingerprint["seed"] == 0
    assert torch.equal(tf.cx_for(n), emp.cx_for(n))  # labels change C_g only
    assert _rel(tf.cg[n], emp.cg[n]) > 1e-2
    assert _rel(tf.cg[n], tf_b.cg[n]) < 1e-5  # labels depend on (seed, window), not on batching
    assert _rel(tf.cg[n], tf_other.cg[n]) > 1e-3
    assert all(torch.isfinite(t).all() for t in tf.cg.values())


def test_weights_frozen_and_forwards_restored_also_after_exception():
    model = make_tiny_llama()
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a mixed original state
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values()) and not all(before.values())
    seen = []

    def spy(mod, args):
        seen.append(all(not p.requires_grad for p in model.parameters()) and not model.training)
    h = model.model.register_forward_pre_hook(spy)  # the trunk runs once per window
    calibrate(model, _ids(2, 8), stats=("cx", "cg"), progress=False)
    h.remove()
    assert seen == [True, True]  # frozen and in eval mode during the pass
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())  # no dW when "grad" is not requested
    assert model.training
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all("forward" not in m.__dict__ for m in linears)

    def boom(mod, args):
        raise RuntimeError("simulated failure inside the model")
    h = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        calibrate(model, _ids(2, 8), stats=("cx", "cg", "grad"), progress=False)
    h.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in linears) and model.training
    x = torch.randint(0, 128, (1, 5))
    model.eval()
    torch.testing.assert_close(model(x).logits, make_tiny_llama().eval()(x).logits)


def test_shared_input_mismatch_names_modules():
    model = make_tiny_llama()
    p = "model.layers.0."
    wrong = [LinearGroup(0, (p + "self_attn.q_proj", p + "self_attn.o_proj"))]  # o reads the attention output
    with pytest.raises(SharedInputMismatch, match=r"q_proj and .*o_proj"):
        calibrate(model, _ids(1, 8), groups=wrong, progress=False)
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__


def test_cx_only_skips_backward_and_matches():
    model = make_tiny_llama()
    ids = _ids(2, 12, seed=8)
    full = calibrate(model, ids, progress=False)
    only = calibrate(model, ids, stats=("cx",), progress=False)
    assert not only.cg and only.stats == ("cx",)
    for k in full.cx:
        torch.testing.assert_close(only.cx[k], full.cx[k], rtol=1e-6, atol=1e-7)


def _targeted(model):
    return {n: model.get_submodule(n) for g in linear_groups(model) for n in g.names}


def test_the_lm_head_module_is_never_called():
    """C_x alone runs the trunk without the head; with gradients the head and the loss run one window
    at a time from the head's weight (never the [B, T, vocab] logits of the whole batch)."""
    model = make_tiny_llama()
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids = _ids(2, 12, seed=9)
    try:
        calibrate(model, ids, stats=("cx",), progress=False)
        calibrate(model, ids, stats=("cx", "cg"), batch_size=2, progress=False)
        assert calls == []
    finally:
        h.remove()


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_windowed_head_equals_the_full_logits_pass(monkeypatch, fisher):
    """The per-window head/loss gradient (stats.head_backward) against autograd through the model's own
    logits (the path taken for heads obdk does not recognise), padded batch, both Fisher variants."""
    import obdk.calibrate.stats as S
    model = make_tiny_llama().double()
    ids = _ids(3, 14, seed=21)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    data = {"input_ids": ids, "attention_mask": mask}
    kw = dict(stats=("cx", "cg", "grad"), dtype=torch.float64, batch_size=3, fisher=fisher, seed=3, progress=False)
    assert S.plain_head(model, _targeted(model)) is model.lm_head
    fast = calibrate(model, data, **kw)
    monkeypatch.setattr(S, "plain_head", lambda *a: None)
    slow = calibrate(model, data, **kw)
    assert (fast.tokens, fast.loss_tokens) == (slow.tokens, slow.loss_tokens)
    for kind in ("cx", "cg", "grad"):
        for k, v in getattr(slow, kind).items():
            assert _rel(getattr(fast, kind)[k], v) < 1e-12, (kind, k)


def test_heads_with_a_logit_transform_take_the_full_logits_pass():
    import obdk.calibrate.stats as S
    model = make_tiny_llama()
    linears = _targeted(model)
    assert S.plain_head(model, linears) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # as Gemma-2 sets it: logits = 30·tanh(head(h)/30)
    assert S.plain_head(model, linears) is None
    model.config.final_logit_softcapping = None
    model.config.model_type = "some-new-arch"  # unknown forward: never assume a plain head
    assert S.plain_head(model, linears) is None


def test_batching_does_not_change_the_result():
    model = make_tiny_llama().double()
    ids = _ids(5, 10, seed=9)
    a = calibrate(model, ids, stats=("cx", "cg", "grad"), dtype=torch.float64, progress=False)
    b = calibrate(model, ids, stats=("cx", "cg", "grad"), dtype=torch.float64, batch_size=2, progress=False)
    for kind in ("cx", "cg", "grad"):
        for k, v in getattr(a, kind).items():
            assert _rel(getattr(b, kind)[k], v) < 1e-12


def test_disjoint_group_passes_merge_equal_one_pass_and_memory_helpers():
    model = make_tiny_llama()
    ids = _ids(2, 12, seed=10)
    full = calibrate(model, ids, progress=False)
    total = stats_nbytes(model)
    assert total == full.nbytes()
    groups = linear_groups(model)
    half = len(groups) // 2
    parts = [groups[:half], groups[half:]]
    assert sum(stats_nbytes(model, groups=p) for p in parts) == total
    merged = Statistics.merge([calibrate(model, ids, groups=p, progress=False) for p in parts])
    assert list(merged.cx) == list(full.cx) and list(merged.cg) == list(full.cg)
    for k in full.cg:
        torch.testing.assert_close(merged.cg[k], full.cg[k])
    for k in full.cx:
        torch.testing.assert_close(merged.cx[k], full.cx[k])


def test_documented_memory_numbers_llama_7b_70b():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        m7 = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=256))
        m70 = LlamaForCausalLM(LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                           num_attention_heads=64, num_key_value_heads=8, vocab_size=256))
    assert stats_nbytes(m7) == 63_711_477_760 and stats_nbytes(m7, ("cx",)) == 4 * 5_488_246_784
    assert stats_nbytes(m70) == 918_720_348_160 and stats_nbytes(m70, ("cg",)) == 4 * 147_807_272_960


def test_statistics_save_load_and_to(tmp_path):
    model = make_tiny_llama()
    st = calibrate(model, _ids(2, 8), stats=("cx", "cg", "grad"), progress=False)
    st.save(tmp_path / "s")
    back = Statistics.load(tmp_path / "s")
    assert (back.tokens, back.loss_tokens, back.windows, back.fisher, back.dtype) == \
        (st.tokens, st.loss_tokens, st.windows, st.fisher, st.dtype)
    assert back.input_key == st.input_key and back.fingerprint == st.fingerprint
    assert back.modules == st.modules
    for kind in ("cx", "cg", "grad"):
        for k, v in getattr(st, kind).items():
            assert torch.equal(getattr(back, kind)[k], v)
    moved = st.to("meta")
    assert moved.cg[st.modules[0]].device.type == "meta" and st.cg[st.modules[0]].device.type == "cpu"
    with pytest.raises(KeyError, match="no Linear named"):
        st.cx_for("lm_head")


def test_bad_arguments_are_named():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="stats must be"):
        calibrate(model, _ids(1, 4), stats=("cx", "hessian"), progress=False)
    with pytest.raises(ValueError, match="fisher"):
        calibrate(model, _ids(1, 4), fisher="exact", progress=False)
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        calibrate(model, _ids(1, 4), dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="attention_mask"):
        calibrate(model, {"input_ids": _ids(2, 4), "attention_mask": torch.ones(2, 5)}, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        calibrate(model, _ids(1, 4), checkpoint_every=2, progress=False)


def test_bf16_activations_fp32_statistics_exact():
    """bf16 model: the statistics equal the fp64 Grams of the very bf16 inputs/gradients it produced."""
    model = make_tiny_llama().to(torch.bfloat16)
    ids = _ids(2, 16, seed=12)
    before = torch.backends.mkldnn.matmul.fp32_precision
    st = calibrate(model, ids, stats=("cx", "cg", "grad"), progress=False)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # the bf16-math switch is scoped
    assert st.dtype == torch.float32 and st.cg[st.modules[0]].dtype == torch.float32
    xs, gs = {}, {}
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for n in st.modules:
        def hook(mod, inp, out, n=n):
            out.retain_grad()
            xs.setdefault(n, []).append(inp[0].detach())
            gs.setdefault(n, []).append(out)
        mods[n].register_forward_hook(hook)
    for p in ref.parameters():
        p.requires_grad_(False)
    emb = ref.get_input_embeddings()
    emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    for b in range(2):
        logits = ref(ids[b:b + 1], use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), ids[b, 1:], reduction="sum").backward()
    for n in st.modules:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[n]]).double()
        g = torch.cat([t.grad.reshape(-1, t.shape[-1]) for t in gs[n]]).double()
        assert _rel(st.cx_for(n), x.T @ x / st.tokens) < 1e-6, n
        assert _rel(st.cg[n], g.T @ g / st.loss_tokens) < 1e-6, n
        assert _rel(st.grad[n], g.T @ x) < 1e-6, n
