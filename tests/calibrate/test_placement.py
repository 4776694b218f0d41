"""Layer placement of the streamed calibration (obdk.calibrate.placement): a skeleton whose decoder layers
are read from the safetensors shards one at a time, and a host-memory model computed on another device.

Tiny Llama and Qwen2 in float64, saved by HF ``save_pretrained`` in several shards: the skeleton's streamed
statistics equal the resident ``calibrate`` of the loaded model (1e-10 relative, same fingerprint); at most
one decoder layer is ever materialized and every one is meta again afterwards, also after an error; the
bytes read are the decoder layers' once per sweep; ``on_fetch`` overwrites act like a model with those
weights; broken checkpoints are refused naming the file and tensor."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from obdk.calibrate.placement import LayerPlacement, ShardedWeights, load_skeleton
from obdk.calibrate.stats import calibrate
from obdk.calibrate.stream import calibrate_streamed
from obdk.errors import CheckpointError, ConfigError
from obdk.testing import make_tiny_llama, make_tiny_qwen2
from tests.calibrate.test_stream import TOL, _data, _max_rel, _rel

ARCHS = {"llama": lambda: make_tiny_llama(layers=3), "qwen2": lambda: make_tiny_qwen2(layers=3)}
ALL = ("cx", "cg", "grad")


def _save(model, d) -> str:
    """``model`` saved by HF in shards of at most 60 kB (a tiny fp64 layer spans several)."""
    model.save_pretrained(d, safe_serialization=True, max_shard_size="60KB")
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 3
    return str(d)


def _loaded(d):
    return AutoModelForCausalLM.from_pretrained(d).eval()


def _layer_bytes(model) -> int:
    """Stored bytes of every decoder-layer tensor (fp64 checkpoints: the model's own bytes)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n)


def _materialized(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if any(not p.is_meta for p in layer.parameters())]


@pytest.fixture(scope="module", params=list(ARCHS))
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, _save(ARCHS[request.param]().double(), d)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_skeleton_streamed_equals_resident(ckpt, padded, fisher, monkeypatch):
    arch, d = ckpt
    data = _data(padded)
    kw = dict(stats=ALL, dtype=torch.float64, fisher=fisher, seed=3, batch_size=2, progress=False)
    full = _loaded(d)
    ref = calibrate(full, data, **kw)
    model, source = load_skeleton(d)
    assert _materialized(model) == [] and model.model.embed_tokens.weight.device.type == "cpu"
    seen = []  # decoder layers materialized right after each fetch, and while on_layer runs
    fetch = LayerPlacement.fetch

    def counting(self, i):
        layer = fetch(self, i)
        seen.append(("fetch", i, _materialized(model)))
        return layer
    monkeypatch.setattr(LayerPlacement, "fetch", counting)

    def on_layer(i, part):
        seen.append(("on_layer", i, _materialized(model)))
        assert model.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.device.type == "cpu"
    info = {}
    parts = []
    st = calibrate_streamed(model, data, source=source, info=info, keep=True,
                            on_layer=lambda i, p: (on_layer(i, p), parts.append(p)), **kw)
    assert _max_rel(st, ref) < TOL  # also keys, order, normalisers and the fingerprint
    assert [s[:2] for s in seen] == [("fetch", 0), ("fetch", 1), ("fetch", 2), ("fetch", 2), ("on_layer", 2),
                                     ("fetch", 1), ("on_layer", 1), ("fetch", 0), ("on_layer", 0)]
    assert all(s[2] == [s[1]] for s in seen)  # exactly the layer at work, no other
    assert _materialized(model) == [] and info["peak_layers_materialized"] == 1
    assert "named_parameters" not in model.__dict__ and "parameters" not in model.__dict__  # fingerprint patch gone
    assert info["weights_read_bytes"] == 2 * _layer_bytes(full)  # forward sweep + backward sweep
    assert info["fingerprint_read_bytes"] == _layer_bytes(full)


def test_cx_alone_reads_each_layer_once(ckpt):
    _, d = ckpt
    data = _data(True)
    ref = calibrate(_loaded(d), data, stats=("cx",), dtype=torch.float64, progress=False)
    model, source = load_skeleton(d)
    info = {}
    st = calibrate_streamed(model, data, stats=("cx",), dtype=torch.float64, source=source, info=info,
                            progress=False)
    assert _max_rel(st, ref) < TOL
    assert info["weights_read_bytes"] == _layer_bytes(_loaded(d)) and _materialized(model) == []


def test_skeleton_matches_the_loaded_model(ckpt):
    _, d = ckpt
    full = _loaded(d)
    model, source = load_skeleton(d)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, read once
    ref_buffers = dict(full.named_buffers())
    for n, b in model.named_buffers():  # rotary inv_freq: recomputed (built on meta it has no values)
        assert not b.is_meta and torch.equal(b, ref_buffers[n]), n
    for n, p in model.named_parameters():
        q = full.get_parameter(n)
        assert p.dtype == q.dtype == torch.float64 and p.shape == q.shape
        assert p.is_meta == (".layers." in n)
        if not p.is_meta:
            assert torch.equal(p, q), n
    # single tensors and module states, for e.g. a correction's original weight
    name = "model.layers.1.self_attn.q_proj.weight"
    w = source.tensor(name, "cpu", torch.float32)
    assert w.dtype == torch.float32 and torch.equal(w, full.get_parameter(name).float())
    state = source.module_state("model.layers.1.", "cpu")
    assert state.keys() == full.model.layers[1].state_dict().keys()
    assert all(torch.equal(v, full.model.layers[1].state_dict()[k]) for k, v in state.items())
    like = source.module_state("model.layers.2.", like=model.model.layers[2])
    assert like.keys() == dict(model.model.layers[2].named_parameters()).keys()


def test_device_cpu_is_todays_pass():
    model = make_tiny_llama(layers=3).double()
    data = _data(True)
    kw = dict(stats=ALL, dtype=torch.float64, fisher="true", batch_size=2, progress=False)
    a = calibrate_streamed(model, data, **kw)
    info = {}
    b = calibrate_streamed(model, data, device="cpu", info=info, **kw)
    assert a.fingerprint == b.fingerprint
    for kind in ALL:
        assert list(getattr(a, kind)) == list(getattr(b, kind))
        for k, v in getattr(a, kind).items():
            assert torch.equal(getattr(b, kind)[k], v), (kind, k)
    assert info["weights_moved_bytes"] == 0 and info["weights_read_bytes"] == 0 and info["device"] == "cpu"


@pytest.mark.parametrize("use_source", [True, False], ids=["skeleton", "resident"])
def test_on_fetch_overwrite_equals_a_model_with_that_weight(tmp_path, use_source):
    d = _save(make_tiny_llama(layers=3).double(), tmp_path)
    data = _data(True)
    kw = dict(stats=ALL, dtype=torch.float64, batch_size=2, progress=False)
    target = "model.layers.1.self_attn.q_proj"
    zeroed = _loaded(d)
    with torch.no_grad():
        zeroed.get_submodule(target).weight.zero_()
    ref = calibrate(zeroed, data, **kw)
    assert _rel(ref.cg["model.layers.0.mlp.down_proj"], calibrate(_loaded(d), data, **kw).cg[
        "model.layers.0.mlp.down_proj"]) > 1e-6  # the overwrite matters below it
    model, source = load_skeleton(d) if use_source else (_loaded(d), None)
    calls = []

    def on_fetch(i, layer):
        calls.append(i)
        assert layer is model.model.layers[i]
        if i == 1:
            with torch.no_grad():
                layer.self_attn.q_proj.weight.zero_()
    st = calibrate_streamed(model, data, source=source, on_fetch=on_fetch, **kw)
    assert calls == [0, 1, 2, 2, 1, 0]
    for kind in ALL:
        for k, v in getattr(ref, kind).items():
            assert _rel(getattr(st, kind)[k], v) < TOL, (kind, k)
    if use_source:  # the overwrite went to the materialized copy: gone with it
        assert _materialized(model) == []
        assert not torch.equal(source.tensor(target + ".weight"), torch.zeros(64, 64, dtype=torch.float64))
    else:  # with on_fetch each fetch is a private copy: the resident model never sees the overwrite
        assert torch.equal(model.get_submodule(target).weight, _loaded(d).get_submodule(target).weight)


def test_placement_bookkeeping():
    """Without a move (the compute device is the model's) fetch/release leave every tensor as it was; a layer
    is fetched once at a time; captured call arguments go to the compute device with shared tensors kept
    shared (here ``meta``, to run without an accelerator; the copies themselves are the CUDA test's)."""
    model = make_tiny_llama(layers=3).double()
    before = {n: (t, t.data_ptr()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    place = LayerPlacement(model, device="cpu")
    assert not place.staged and place.fetch(1) is model.model.layers[1]
    with pytest.raises(ConfigError, match="already fetched"):
        place.fetch(1)
    place.fetch(2)
    with place.outside():
        pass
    assert place.peak_fetched == 2 and place.moved_bytes == 0
    place.close()
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is before[n][0] and t.data_ptr() == before[n][1], n
    far = LayerPlacement(model, device="meta")
    assert far.staged and far.device.type == "meta"
    shared = torch.ones(4)
    calls = [((None, torch.ones(2)), {"mask": shared, "pos": (torch.ones(1), None)}), ((None,), {"mask": shared})]
    moved = far.to_device(calls)
    assert moved[0][1]["mask"] is moved[1][1]["mask"] and moved[0][1]["mask"].is_meta  # one mask, moved once
    assert moved[0][0][1].is_meta and moved[0][1]["pos"][1] is None and moved[1][0] == (None,)
    assert far.stage(calls)[0][1]["mask"] is shared  # already in host memory


def _rewrite(d, name, fn):
    """Apply ``fn(tensors)`` to the shard holding tensor ``name`` (and drop removed names from the index)."""
    index_file = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_file))
    shard = os.path.join(d, index["weight_map"][name])
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != index["weight_map"][name]}
    json.dump(index, open(index_file, "w"))
    return shard


def test_broken_checkpoints_are_refused_naming_file_and_tensor(tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    missing = _save(make_tiny_llama(layers=3).double(), tmp_path / "missing")
    _rewrite(missing, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: tensor '{name}' missing"):
        load_skeleton(missing)

    shape = _save(make_tiny_llama(layers=3).double(), tmp_path / "shape")
    shard = _rewrite(shape, name, lambda t: t.__setitem__(name, t[name][:, :7].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' has shape \(160, 7\), expected \(160, 64\)"):
        load_skeleton(shape)

    nan = _save(make_tiny_llama(layers=3).double(), tmp_path / "nan")
    shard = _rewrite(nan, name, lambda t: t[name].__setitem__((3, 4), float("nan")))
    model, source = load_skeleton(nan)  # headers only: the layers are read by the pass
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' holds NaN/Inf in 1 of"):
        calibrate_streamed(model, _data(False), source=source, progress=False)
    assert _materialized(model) == []  # the error left no layer behind
    assert all("forward" not in m.__dict__ for m in model.modules())

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"{empty}: no config.json"):
        load_skeleton(empty)
    (empty / "config.json").write_text(open(os.path.join(nan, "config.json")).read())
    with pytest.raises(CheckpointError, match=rf"{empty}: no model.safetensors"):
        load_skeleton(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ShardedWeights(tmp_path / "nowhere")


def test_skeleton_and_source_must_go_together(tmp_path):
    d = _save(make_tiny_llama(layers=2).double(), tmp_path)
    model, source = load_skeleton(d)
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj.weight is on the meta device.*source="):
        calibrate_streamed(model, _data(False), progress=False)
    with pytest.raises(ConfigError, match="holds real weights"):
        calibrate_streamed(_loaded(d), _data(False), source=source, progress=False)
    with pytest.raises(ConfigError, match="device='gpu0' is not a torch device"):
        calibrate_streamed(_loaded(d), _data(False), device="gpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda', but CUDA is not available"):
            calibrate_streamed(_loaded(d), _data(False), device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_model_on_cuda_holds_one_layer():
    model = make_tiny_llama(layers=12, hidden=128, inter=384, vocab=64).double()
    data = _data(True, n=4, t=16)
    data["input_ids"] %= 64
    kw = dict(stats=ALL, dtype=torch.float64, batch_size=2, progress=False)
    ref = calibrate_streamed(model, data, **kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    info, sizes = {}, []
    st = calibrate_streamed(model, data, device="cuda", info=info, keep=True,
                            on_layer=lambda i, part: sizes.append(part.nbytes()), **kw)
    peak = torch.cuda.max_memory_allocated() - base
    for kind in ALL:
        for k, v in getattr(ref, kind).items():
            assert getattr(st, kind)[k].device.type == "cpu"  # kept parts leave the device
            assert _rel(getattr(st, kind)[k], v) < 1e-9, (kind, k)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    acc = max(sizes)  # one layer's C_x, C_g and dL/dW
    act = 2 * 16 * (128 * 8 + 384 * 3) * 8  # one batch: hidden states, attention and MLP intermediates (fp64)
    bound = 2 * (layer + outside + acc + act)
    resident = 12 * layer + outside + acc  # what the device would hold with every layer on it
    assert info["peak_layers_materialized"] == 1 and info["weights_moved_bytes"] >= 2 * 12 * layer
    assert peak < bound < resident, (peak, bound, resident)
