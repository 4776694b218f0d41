"""calibrate_streamed(): the layer-streamed pass equals the resident calibrate() (fp64, 1e-10 relative) on
tiny Llama, Qwen2 (sliding-window layers), Mistral (sliding window) and Phi-3, padded and unpadded,
empirical and true Fisher; a forced spill to scratch gives the same bytes; the per-layer hand-off holds
one layer's statistics; the compressed model equals the resident path's; unsupported models are refused."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import obdk
from obdk.calibrate.stats import Statistics, calibrate
from obdk.calibrate.stream import StreamingUnsupportedError, calibrate_streamed
from obdk.errors import ObdkError
from tests.conftest import make_tiny_llama, make_tiny_qwen2

TOL = 1e-10


def _mistral(seed=0, sliding=6):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=sliding, tie_word_embeddings=False)
    return MistralForCausalLM(cfg).eval()


def _phi3(seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
                     pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return Phi3ForCausalLM(cfg).eval()


def _qwen2_sliding(seed=0, sliding=True):
    """Qwen2 with per-layer masks: layer 0 full attention, layers 1-2 a 6-token sliding window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=sliding, sliding_window=6, max_window_layers=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


ARCHS = {
    "llama": lambda: make_tiny_llama(layers=3),
    "qwen2": lambda: make_tiny_qwen2(),
    "qwen2-sliding": _qwen2_sliding,
    "mistral": _mistral,
    "phi3": _phi3,
}


def _data(padded: bool, n=3, t=16, seed=1):
    ids = torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))
    if not padded:
        return ids
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, 10:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _max_rel(st: Statistics, ref: Statistics) -> float:
    """Max relative difference over every tensor; also checks keys, their order and the normalisers."""
    assert (st.tokens, st.loss_tokens, st.windows, st.fisher, st.dtype) == \
        (ref.tokens, ref.loss_tokens, ref.windows, ref.fisher, ref.dtype)
    assert st.input_key == ref.input_key and list(st.input_key) == list(ref.input_key)
    assert st.fingerprint == ref.fingerprint
    worst = 0.0
    for kind in ("cx", "cg", "grad"):
        a, b = getattr(st, kind), getattr(ref, kind)
        assert list(a) == list(b), kind
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            worst = max(worst, _rel(a[k], b[k]))
    return worst


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_streamed_equals_resident_fp64(arch, padded, fisher):
    model = ARCHS[arch]().double()
    data = _data(padded)
    kw = dict(stats=("cx", "cg", "grad"), dtype=torch.float64, fisher=fisher, seed=3, batch_size=2, progress=False)
    ref = calibrate(model, data, **kw)
    info = {}
    st = calibrate_streamed(model, data, info=info, **kw)
    assert st.stats == ("cx", "cg", "grad") and len(st.cg) == len(ref.cg) > 0
    assert _max_rel(st, ref) < TOL
    assert info["layers"] == len(model.model.layers) and info["spilled_bytes"] == 0
    # C_x is counted once (in the recompute), not also in the forward sweep: a double count is 2x
    assert all(torch.isfinite(t).all() for t in st.cx.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "phi3"])
def test_cx_alone_forward_sweep_only(arch):
    model = ARCHS[arch]().double()
    data = _data(True)
    ref = calibrate(model, data, stats=("cx",), dtype=torch.float64, progress=False)
    info = {}
    st = calibrate_streamed(model, data, stats=("cx",), dtype=torch.float64, progress=False, info=info)
    assert not st.cg and st.loss_tokens == 0
    assert _max_rel(st, ref) < TOL
    assert info["seconds"]["backward sweep"] == 0.0


def test_per_layer_masks_matter_and_are_replayed():
    """The sliding window changes the statistics (so replaying one layer's mask for all would fail)."""
    data = _data(False, t=16)
    kw = dict(stats=("cx", "cg"), dtype=torch.float64, progress=False)
    slid = _qwen2_sliding().double()
    full = _qwen2_sliding(sliding=False).double()
    a, b = calibrate(slid, data, **kw), calibrate(full, data, **kw)
    top = "model.layers.2.mlp.down_proj"
    assert _rel(a.cg[top], b.cg[top]) > 1e-3
    assert _rel(a.cx_for("model.layers.0.self_attn.o_proj"), b.cx_for("model.layers.0.self_attn.o_proj")) < 1e-12
    assert _max_rel(calibrate_streamed(slid, data, **kw), a) < TOL


def test_forced_spill_gives_identical_bytes_and_leaves_nothing(tmp_path):
    model = make_tiny_llama(layers=3).double()
    data = _data(True, n=4)
    kw = dict(stats=("cx", "cg", "grad"), dtype=torch.float64, fisher="true", batch_size=3, progress=False)
    info_mem, info_disk = {}, {}
    mem = calibrate_streamed(model, data, info=info_mem, **kw)
    disk = calibrate_streamed(model, data, scratch_dir=tmp_path, max_host_memory=0, info=info_disk, **kw)
    assert info_mem["spilled_bytes"] == 0 and info_mem["peak_host_bytes"] > 0
    assert info_disk["peak_host_bytes"] == 0 and info_disk["scratch_files"] == 3 + 1  # 3 layer inputs + 1 gradient
    assert info_disk["spilled_bytes"] == info_mem["peak_host_bytes"]
    for kind in ("cx", "cg", "grad"):
        for k, v in getattr(mem, kind).items():
            assert torch.equal(getattr(disk, kind)[k], v), (kind, k)
    assert os.listdir(tmp_path) == []  # the mapped files are unlinked at once
    # a budget between: the first boundary buffers stay on host, the rest spill
    one = 4 * 16 * 64 * 8
    part = {}
    mixed = calibrate_streamed(model, data, scratch_dir=tmp_path, max_host_memory=2 * one, info=part, **kw)
    assert part["peak_host_bytes"] == 2 * one and part["scratch_files"] == 2
    assert all(torch.equal(mixed.cg[k], v) for k, v in mem.cg.items())
    # cx alone needs two boundary buffers at most at a time
    cx = {}
    calibrate_streamed(model, data, stats=("cx",), info=cx, progress=False)
    assert cx["peak_host_bytes"] == 2 * one  # fp64 model: [4, 16, 64] fp64 per buffer


def test_on_layer_hands_off_one_layer_at_a_time():
    model = make_tiny_llama(layers=3).double()
    data = _data(False)
    kw = dict(stats=("cx", "cg"), dtype=torch.float64, progress=False)
    full = calibrate(model, data, **kw)
    parts, order = [], []
    info = {}

    def take(i, st):
        order.append(i)
        assert all(n.startswith(f"model.layers.{i}.") for n in st.input_key)
        parts.append(st)
    out = calibrate_streamed(model, data, on_layer=take, info=info, **kw)
    assert order == [2, 1, 0]  # the backward sweep finishes the top layer first
    assert out.nbytes() == 0 and out.input_key == full.input_key and out.tokens == full.tokens
    merged = Statistics.merge(parts)
    for kind in ("cx", "cg"):
        for k, v in getattr(full, kind).items():
            assert _rel(getattr(merged, kind)[k], v) < TOL
    per_layer = max(p.nbytes() for p in parts)
    assert info["peak_stats_bytes"] == per_layer == full.nbytes() // 3
    kept = {}
    calibrate_streamed(model, data, info=kept, **kw)
    assert kept["peak_stats_bytes"] == full.nbytes()  # keeping everything holds everything


def test_compressed_model_equals_resident_path():
    model = make_tiny_llama().double()
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    cfg = obdk.LowRankConfig(method="obd", keep=0.6, rank_multiple=1, compute_dtype="float64")
    streamed = calibrate_streamed(model, ids, stats=cfg.needed_stats, dtype=torch.float32, progress=False)
    plans = {"resident": obdk.prepare(model, cfg, ids, progress=False),
             "stats=streamed": obdk.prepare(model, cfg, ids, stats=streamed, progress=False),
             "stream=True": obdk.prepare(model, cfg, ids, stream=True, progress=False)}
    out = {}
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    for k, plan in plans.items():
        m = copy.deepcopy(model)
        rep = plan.apply(m)
        ranks = {r.name: r.rank for r in rep.modules}
        facs = {n: (mod.weight_a.detach().clone(), mod.weight_b.detach().clone()) for n, mod in m.named_modules()
                if isinstance(mod, obdk.nn.LowRankLinear)}
        with torch.no_grad():
            out[k] = (ranks, facs, m(x).logits)
    ranks0, facs0, logits0 = out["resident"]
    assert any(r is not None for r in ranks0.values()) and facs0
    for k in ("stats=streamed", "stream=True"):
        ranks, facs, logits = out[k]
        assert ranks == ranks0, k
        assert facs.keys() == facs0.keys()
        for n in facs0:
            for a, b in zip(facs[n], facs0[n]):
                assert _rel(a, b) < 1e-6, (k, n)
        assert _rel(logits, logits0) < 1e-8, k


def test_unsupported_models_are_refused_not_approximated():
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    ids = _data(False, n=1, t=8)
    with pytest.raises(StreamingUnsupportedError, match="model type 'opt'.*stream=False") as e:
        calibrate_streamed(opt, ids, progress=False)
    assert isinstance(e.value, ObdkError)

    model = make_tiny_llama()
    model.config.final_logit_softcapping = 30.0  # logits = 30·tanh(head(h)/30): no windowed plain head
    with pytest.raises(StreamingUnsupportedError, match="plain Linear head"):
        calibrate_streamed(model, ids, progress=False)
    calibrate_streamed(model, ids, stats=("cx",), progress=False)  # C_x needs no head
    model.config.final_logit_softcapping = None

    # something between decoder layers (here a forward hook rewriting layer 0's output) breaks the chain
    h = model.model.layers[0].register_forward_hook(lambda mod, a, out: out * 1.0 if torch.is_tensor(out) else out)
    try:
        with pytest.raises(StreamingUnsupportedError, match="layer 1 did not receive the output of layer 0"):
            calibrate_streamed(model, ids, progress=False)
    finally:
        h.remove()
    assert "forward" not in model.model.layers[0].__dict__  # the stubs are gone again
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))

    with pytest.raises(StreamingUnsupportedError, match="not inside a decoder layer"):
        from obdk.models import LinearGroup
        calibrate_streamed(model, ids, groups=[LinearGroup(0, ("lm_head",))], progress=False)
    with pytest.raises(ValueError, match="max_host_memory"):
        calibrate_streamed(model, ids, max_host_memory=-1, progress=False)


def test_prepare_stream_decomposes_each_layer_and_drops_its_statistics():
    """prepare(stream=True) without a statistics-reading correction: each layer decomposed during the sweep
    (spectra equal the resident plan's), no statistics kept, and a later C_x/C_g correction refused by name."""
    import obdk
    from obdk.config import LowRankConfig
    from obdk.errors import ConfigError
    from obdk.testing import make_tiny_llama
    model = make_tiny_llama(layers=3).double()
    ids = torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(5))
    cfg = LowRankConfig(method="obd", keep=0.7, rank_multiple=4, correct="none")
    ref = obdk.prepare(model, cfg, ids, progress=False)
    plan = obdk.prepare(model, cfg, ids, progress=False, stream=True)
    assert not plan.stats_kept and not plan.stats.cx and not plan.stats.cg
    assert set(plan.spectra) == set(ref.spectra)
    for n, sp in ref.spectra.items():
        torch.testing.assert_close(plan.spectra[n].eigenvalues, sp.eigenvalues, rtol=1e-10, atol=0)
    r1 = ref.apply(make_tiny_llama(layers=3).double())
    r2 = plan.apply(make_tiny_llama(layers=3).double())
    assert [m.rank for m in r1.modules] == [m.rank for m in r2.modules]
    with pytest.raises(ConfigError, match="dropped"):
        plan.apply(make_tiny_llama(layers=3).double(), correct="kfac")
    layered = obdk.prepare(model, LowRankConfig(method="obd", keep=0.7, rank_multiple=4), ids, progress=False,
                           stream=True)
    # zs+kfac reads C_x and C_g: kept layer by layer, not as one resident Statistics
    assert not layered.stats_kept and layered.stats.layers == [0, 1, 2] and layered.stats.layer(1).cg
