"""SpectrumStore: each layer's spectra kept after its decomposition (eigenvalues and metadata on host, ordered
factors on host memory up to a budget shared with the kept statistics, beyond it one safetensors file per layer),
and the streamed plan built on it: the same ranks, factors and logits as a plain dict of spectra, bit for bit."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import obdk
from obdk.allocate.budget import max_factored_rank
from obdk.calibrate.layer_statistics import LayerStatistics
from obdk.calibrate.stream import calibrate_streamed
from obdk.config import LowRankConfig
from obdk.decompose import spectra as batched_spectra
from obdk.decompose import spectrum
from obdk.decompose.spectrum_store import SpectrumStore
from obdk.errors import ConfigError, DataError, MissingFileError, NotCollectedError
from obdk.stream.budget import HostBudget
from obdk.testing import make_tiny_llama

LAYERS = 3
CFG = LowRankConfig(method="obd", keep=0.7, rank_multiple=1, correct="none", compute_dtype="float64")


def _ids():
    return torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(5))


def _spd(n, g):
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (3 * n)


def _layer_spectra(i: int, shapes=((6, 10), (10, 6))):
    """``({name: Spectrum}, {name: weight})`` of one made-up layer: obd spectra of random weights."""
    g = torch.Generator().manual_seed(100 + i)
    out, ws = {}, {}
    for j, (m, n) in enumerate(shapes):
        w = torch.randn(m, n, generator=g, dtype=torch.float64)
        name = f"layers.{i}.w{j}"
        out[name], ws[name] = spectrum(w, cx=_spd(n, g), cg=_spd(m, g)), w
    return out, ws


def _factor_bytes(sps):
    return sum(sp.factor_b.numel() * 8 + sp.factor_a.numel() * 8 for sp in sps.values())


# --------------------------------------------------------------------------- the store on its own

@pytest.mark.parametrize("limit", [None, 0])
def test_store_gives_back_every_spectrum_exactly_and_reattaches_the_weight(limit, tmp_path):
    store = SpectrumStore(limit, tmp_path, order=["layers.1.w1", "layers.1.w0", "layers.0.w1", "layers.0.w0"])
    ref, weights = {}, {}
    for i in range(2):
        sps, ws = _layer_spectra(i)
        store.put_layer(i, sps)
        ref.update(sps)
        weights.update(ws)
    assert list(store) == ["layers.1.w1", "layers.1.w0", "layers.0.w1", "layers.0.w0"] and len(store) == 4
    total = _factor_bytes(ref)
    assert (store.host_bytes, store.spilled_bytes) == ((total, 0) if limit is None else (0, total))
    assert store.eigen_bytes == sum(sp.eigenvalues.numel() * 8 for sp in ref.values())
    for name, sp in ref.items():  # metadata and eigenvalues: no file read
        assert torch.equal(store.eigenvalues(name), sp.eigenvalues)
        meta = store.meta(name)
        assert {k: meta[k] for k in ("method", "solver", "damping", "numerical_rank", "rtol", "kept", "shape")} == \
            {"method": sp.method, "solver": sp.solver, "damping": sp.damping, "numerical_rank": sp.numerical_rank,
             "rtol": sp.rtol, "kept": sp.kept, "shape": sp.shape}
        assert meta["spilled"] is (limit == 0) and meta["layer"] == int(name.split(".")[1])
    assert store.files_read == 0
    for name in ["layers.0.w0", "layers.0.w1", "layers.1.w0", "layers.1.w1"]:  # a layer-by-layer walk
        got = store[name]
        assert type(got) is type(ref[name]) and got.weight is weights[name]  # the model's tensor, not a copy
        for f in ("eigenvalues", "factor_b", "factor_a"):
            assert torch.equal(getattr(got, f), getattr(ref[name], f)), (name, f)
        assert (got.method, got.damping, got.kept, got.numerical_rank) == \
            (ref[name].method, ref[name].damping, ref[name].kept, ref[name].numerical_rank)
        assert torch.equal(got.truncate(3).b, ref[name].truncate(3).b)
    assert store.files_read == (0 if limit is None else 2)  # each layer's file read once
    store["layers.0.w0"], store["layers.1.w0"]
    assert store.files_read == (0 if limit is None else 4)  # only the last layer read is cached
    if limit == 0:
        (d,) = tmp_path.iterdir()
        assert d.name.startswith("obdk-spectra-") and sorted(p.name for p in d.iterdir()) == \
            ["layer-0.safetensors", "layer-1.safetensors"]
        from safetensors import safe_open
        with safe_open(str(d / "layer-0.safetensors"), framework="pt") as f:  # factors only: no weight, no λ
            assert sorted(f.keys()) == ["layers.0.w0/factor_a", "layers.0.w0/factor_b", "layers.0.w1/factor_a",
                                        "layers.0.w1/factor_b"]
    else:
        assert not list(tmp_path.iterdir())
    assert "layers.0.w0" in store and "nope" not in store and store.get("nope") is None
    with pytest.raises(NotCollectedError, match="nope"):
        store.eigenvalues("nope")
    store.close()
    assert not list(tmp_path.iterdir()) and len(store) == 0 and store.host_bytes == 0
    with pytest.raises(ConfigError, match="closed"):
        store["layers.0.w0"]


def test_batch_views_device_copies_and_meta_factors():
    """Factors that view a batched result are copied (keeping one keeps no other alive); factors on the meta
    device (a non-writer rank) are kept as shapes, 0 bytes; the weight is never copied."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    cxs = [_spd(5, g) for _ in ws]
    cgs = [_spd(8, g) for _ in ws]
    sps = batched_spectra(ws, cxs=cxs, cgs=cgs)
    assert sps[0].factor_b.untyped_storage().nbytes() > sps[0].factor_b.numel() * 8  # a view into the batch
    store = SpectrumStore()
    store.put_layer(0, {"a": sps[0], "b": sps[1]})
    got = store["a"]
    assert torch.equal(got.factor_b, sps[0].factor_b)
    assert got.factor_b.untyped_storage().nbytes() == got.factor_b.numel() * 8
    assert store.host_bytes == _factor_bytes({"a": sps[0], "b": sps[1]})
    import dataclasses
    meta = dataclasses.replace(sps[0], factor_b=torch.empty(8, 5, dtype=torch.float64, device="meta"),
                               factor_a=torch.empty(5, 5, dtype=torch.float64, device="meta"))
    store.put_layer(1, {"m": meta})
    assert store.host_bytes == _factor_bytes({"a": sps[0], "b": sps[1]})  # nothing for the shapes
    got = store["m"]
    assert got.factor_b.is_meta and got.factor_b.shape == (8, 5) and torch.equal(got.eigenvalues, sps[0].eigenvalues)
    assert got.weight is sps[0].weight  # the very tensor the spectrum referred to


def test_bad_options_and_misuse_are_named(tmp_path):
    with pytest.raises(ConfigError, match="max_host_memory must be >= 0"):
        SpectrumStore(-1)
    with pytest.raises(ConfigError, match="max_host_memory"):
        SpectrumStore("lots")
    with pytest.raises(ConfigError, match=f"scratch_dir {tmp_path / 'nope'} is not a directory"):
        SpectrumStore(0, tmp_path / "nope")
    with pytest.raises(ConfigError, match="max_host_memory or budget"):
        SpectrumStore(10, budget=HostBudget(10))
    with pytest.raises(ConfigError, match="max_host_memory or budget"):
        LayerStatistics(10, budget=HostBudget(10))
    store = SpectrumStore()
    sps, _ = _layer_spectra(0)
    store.put_layer(0, sps)
    with pytest.raises(ConfigError, match="layer 0's spectra were already kept"):
        store.put_layer(0, _layer_spectra(0)[0])
    with pytest.raises(ConfigError, match="layers.0.w0's spectrum was already kept"):
        store.put_layer(1, {"layers.0.w0": sps["layers.0.w0"]})
    with pytest.raises(DataError, match="x is not a Spectrum"):
        store.put_layer(2, {"x": 3})


def test_a_missing_or_corrupt_spill_file_names_the_file_and_target(tmp_path):
    store = SpectrumStore(0, tmp_path)
    for i in range(2):
        store.put_layer(i, _layer_spectra(i)[0])
    (d,) = tmp_path.iterdir()
    (d / "layer-1.safetensors").unlink()
    path = d / "layer-1.safetensors"
    assert store.meta("layers.1.w0")["shape"] == (6, 10) and store.eigenvalues("layers.1.w1").numel() == 6
    with pytest.raises(MissingFileError, match=f"scratch file {path} holding layers.1.w0's factors .decoder layer 1"):
        store["layers.1.w0"]
    (d / "layer-0.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DataError, match=f"scratch file {d / 'layer-0.safetensors'} holding layers.0.w1's factors"):
        store["layers.0.w1"]
    from safetensors.torch import save_file  # a readable file with the wrong tensors
    save_file({"layers.0.w0/factor_b": torch.zeros(2, 2, dtype=torch.float64)}, str(d / "layer-0.safetensors"))
    with pytest.raises(DataError, match="is corrupt: tensor layers.0.w0/factor_b is torch.float64 .2, 2."):
        store["layers.0.w0"]


def test_host_budget_is_shared_and_given_back():
    b = HostBudget(100)
    assert b.take(60) and not b.take(41) and b.take(40) and (b.used, b.peak) == (100, 100)
    b.give(60)
    assert (b.used, b.peak) == (40, 100) and HostBudget(None).take(10 ** 15)
    for bad in (-1, float("inf"), True, "8G"):
        with pytest.raises(ConfigError, match="max_host_memory"):
            HostBudget(bad)


# --------------------------------------------------------------------------- the streamed plan on it

def _compressed(plan, model, keep):
    m = copy.deepcopy(model)
    rep = plan.apply(m, keep=keep)
    facs = {n: (mod.weight_a.detach().clone(), mod.weight_b.detach().clone()) for n, mod in m.named_modules()
            if isinstance(mod, obdk.nn.LowRankLinear)}
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = m(x).logits
    return {r.name: r.rank for r in rep.modules}, facs, logits


@pytest.fixture(scope="module")
def resident():
    """Today's plan: a plain dict of spectra, prepared (resident decompositions) on the streamed statistics."""
    model = make_tiny_llama(layers=LAYERS).double()
    stats = calibrate_streamed(model, _ids(), stats=CFG.needed_stats, dtype=torch.float32, progress=False)
    plan = obdk.prepare(model, CFG, _ids(), stats=stats, progress=False, workers=1)
    assert type(plan.spectra) is dict
    return model, plan, {k: _compressed(plan, model, k) for k in (0.5, 0.8)}


@pytest.mark.parametrize("spill", [False, True])
def test_streamed_plan_on_the_store_equals_the_dict_plan_bit_for_bit(spill, resident, tmp_path):
    model, ref, ref_out = resident
    plan = obdk.prepare(model, CFG, _ids(), progress=False, stream=True, workers=1, scratch_dir=tmp_path,
                        max_host_memory=0 if spill else None)
    store = plan.spectra
    assert isinstance(store, SpectrumStore) and set(store) == set(ref.spectra)
    assert list(store) == [t.name for t in plan.targets]  # forward order, as the streamed plan's dict had them
    # kept compacted: the leading max_factored_rank(m, n) components (no allocation factors a rank at or above
    # break-even), in the weight's dtype (fp64 here)
    total = sum(8 * R * (m + n) for m, n, R in ((*sp.shape, max_factored_rank(*sp.shape))
                                                   for sp in ref.spectra.values()))
    assert total < _factor_bytes(ref.spectra)
    assert (store.host_bytes, store.spilled_bytes) == ((0, total) if spill else (total, 0))
    dirs = list(tmp_path.iterdir())
    if spill:
        assert len(dirs) == 1 and sorted(p.name for p in dirs[0].iterdir()) == \
            [f"layer-{i}.safetensors" for i in range(LAYERS)]
    else:
        assert not dirs
    alloc = plan.allocate(keep=0.5)  # the allocation reads the eigenvalues only
    assert store.files_read == 0
    assert alloc.ranks == ref.allocate(keep=0.5).ranks
    for keep in (0.5, 0.8):  # two ratios from one decomposition
        before = store.files_read
        ranks, facs, logits = _compressed(plan, model, keep)
        assert store.files_read - before == (LAYERS if spill else 0)  # the truncation reads each layer once
        ranks0, facs0, logits0 = ref_out[keep]
        assert ranks == ranks0 and facs.keys() == facs0.keys() and facs
        for n in facs0:
            assert all(torch.equal(a, b) for a, b in zip(facs[n], facs0[n])), n
        assert torch.equal(logits, logits0)
    for n, sp in ref.spectra.items():
        got = plan.spectra[n]
        R = max_factored_rank(*sp.shape)
        assert torch.equal(got.eigenvalues, sp.eigenvalues) and got.kept == min(sp.kept, R), n
        assert torch.equal(got.factor_b, sp.factor_b[:, :R]) and torch.equal(got.factor_a, sp.factor_a[:R]), n
        with pytest.raises(DataError, match=f"rank {R + 1} needs {R + 1} components .* carry {R}"):
            got.truncate(R + 1, keep_dense_at_break_even=False)
        w = model.get_submodule(n).weight  # the model's own tensor (detached, as decompositions see it), not a copy
        assert got.weight.data_ptr() == w.data_ptr() and got.weight.shape == w.shape and got.damping == sp.damping
    plan.close()
    assert not list(tmp_path.iterdir()) and store.host_bytes == 0 and store.budget.used == 0
    with pytest.raises(ConfigError, match="SpectrumStore: closed .Plan.close"):
        plan.allocate(keep=0.5)


def test_an_fp32_model_keeps_fp32_factors_and_compresses_as_the_dict_plan(tmp_path):
    """fp32 weights, fp64 decompositions: the store keeps the factors in fp32, to break-even (a quarter to a
    half of the fp64 full-rank bytes), and every truncation, hence the compressed model, is the dict plan's."""
    model = make_tiny_llama(layers=2)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and CFG.compute_dtype == "float64"
    stats = calibrate_streamed(model, _ids(), stats=CFG.needed_stats, dtype=torch.float32, progress=False)
    ref = obdk.prepare(model, CFG, _ids(), stats=stats, progress=False, workers=1)
    plan = obdk.prepare(model, CFG, _ids(), progress=False, stream=True, workers=1, scratch_dir=tmp_path,
                        max_host_memory=0)
    store = plan.spectra
    assert all(sp.factor_b.dtype == torch.float64 for sp in ref.spectra.values())
    want = sum(4 * max_factored_rank(*sp.shape) * sum(sp.shape) for sp in ref.spectra.values())
    assert store.spilled_bytes == want <= _factor_bytes(ref.spectra) / 2
    for n in ref.spectra:
        got = store[n]
        assert got.factor_b.dtype == got.factor_a.dtype == torch.float32, n
    for keep in (0.5, 0.8):
        ranks, facs, logits = _compressed(plan, model, keep)
        ranks0, facs0, logits0 = _compressed(ref, model, keep)
        assert ranks == ranks0 and facs.keys() == facs0.keys() and facs
        assert all(torch.equal(a, b) for n in facs for a, b in zip(facs[n], facs0[n]))
        assert torch.equal(logits, logits0)
    plan.close()


@pytest.mark.parametrize("spill", [True, False])
def test_a_releasing_save_frees_each_layer_once_written_and_writes_the_same_checkpoint(spill, tmp_path):
    """``Plan.save(release=True)``: each layer's kept factors (host bytes or scratch file) go as soon as its targets
    are written, in layer order; the checkpoint is the non-releasing save's, byte for byte; afterwards the plan
    still allocates and reports, and a truncation says why it cannot."""
    from safetensors.torch import load_file
    model = make_tiny_llama(layers=LAYERS).double()
    (tmp_path / "s").mkdir()
    plan = obdk.prepare(model, CFG, _ids(), progress=False, stream=True, workers=1, scratch_dir=tmp_path / "s",
                        max_host_memory=0 if spill else None)
    store = plan.spectra
    plan.save(model, tmp_path / "ref", keep=0.6)

    def held():
        if not spill:
            return sorted(store._host_layers)
        return sorted(int(p.name[6:-12]) for p in next((tmp_path / "s").iterdir()).iterdir())
    assert held() == list(range(LAYERS)) and (store.spilled_bytes if spill else store.budget.used) > 0
    seen = []
    real = store.release_layer

    def spy(i):
        seen.append((i, held()))
        return real(i)
    store.release_layer = spy
    rep = plan.save(model, tmp_path / "out", keep=0.6, release=True)
    # in layer order, each once, each held until then
    assert seen == [(i, list(range(i, LAYERS))) for i in range(LAYERS)]
    assert held() == [] and store.spilled_bytes == store.host_bytes == store.budget.used == 0
    ref = {f.name: load_file(f) for f in (tmp_path / "ref").glob("*.safetensors")}
    got = {f.name: load_file(f) for f in (tmp_path / "out").glob("*.safetensors")}
    assert ref.keys() == got.keys() and all(ref[f].keys() == got[f].keys() and
                                            all(torch.equal(ref[f][k], got[f][k]) for k in ref[f]) for f in ref)
    assert plan.allocate(keep=0.6).ranks == {m.name: m.rank for m in rep.modules}
    name = plan.targets[0].name
    assert plan.eigenvalues(name).numel() > 0 and plan.damping(name)
    with pytest.raises(ConfigError, match="released once written .Plan.save"):
        plan.factors(name, 2)
    plan.close()


def test_a_streamed_save_writes_shards_of_stream_shard_bytes(tmp_path, monkeypatch):
    """A streamed plan's save holds at most STREAM_SHARD_BYTES of pending tensors (not save_pretrained's 4 GiB):
    its shards are that size; a resident plan's keep the 4 GiB default; an explicit size wins."""
    from obdk import plan as plan_module
    model = make_tiny_llama(layers=2).double()
    monkeypatch.setattr(plan_module, "STREAM_SHARD_BYTES", 100_000)
    streamed = obdk.prepare(model, CFG, _ids(), progress=False, stream=True, workers=1)
    resident = obdk.prepare(model, CFG, _ids(), progress=False, workers=1)
    sizes = {}
    for name, plan, kw in (("s", streamed, {}), ("r", resident, {}), ("x", streamed, {"max_shard_bytes": 300_000})):
        plan.save(model, tmp_path / name, keep=0.6, **kw)
        sizes[name] = sorted(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
    total = sum(sizes["r"])
    assert len(sizes["r"]) == 1 and total > 400_000  # 4 GiB: one file
    assert len(sizes["s"]) >= total // 100_000 and max(sizes["s"]) <= 100_000 + 4096  # (+ its header)
    assert len(sizes["x"]) < len(sizes["s"]) and max(sizes["x"]) <= 300_000 + 4096
    streamed.close()


def test_one_budget_bounds_the_kept_statistics_and_spectra_together(tmp_path):
    model = make_tiny_llama(layers=LAYERS).double()
    cfg = CFG.replace(correct="kfac")  # keeps every layer's statistics too
    free = obdk.prepare(model, cfg, _ids(), progress=False, stream=True, workers=1)
    st, sp = free.stats.nbytes(), free.spectra.nbytes()
    assert free.stats.budget is free.spectra.budget is free.stream.budget  # the passes' buffers draw on it too
    assert free.stats.budget.used == st + sp and free.stats.budget.peak > st + sp
    limit = max(st, sp)  # either store alone would fit: only a shared budget must spill
    plan = obdk.prepare(model, cfg, _ids(), progress=False, stream=True, workers=1, scratch_dir=tmp_path,
                        max_host_memory=limit)
    budget = plan.spectra.budget
    assert plan.stats.budget is budget and budget.limit == limit
    assert plan.stats.nbytes() == st and plan.spectra.nbytes() == sp
    assert plan.stats.host_bytes + plan.spectra.host_bytes == budget.used <= limit and budget.peak <= limit
    assert plan.stats.spilled_bytes + plan.spectra.spilled_bytes >= st + sp - limit > 0
    assert plan.stats.host_bytes > 0 and plan.spectra.host_bytes > 0  # both drew on it (top layer first)
    ranks, facs, logits = _compressed(plan, model, 0.6)
    ranks0, facs0, logits0 = _compressed(free, model, 0.6)
    assert ranks == ranks0 and all(torch.equal(a, b) for n in facs0 for a, b in zip(facs[n], facs0[n]))
    assert torch.equal(logits, logits0)
    assert budget.peak <= limit
    names = sorted(p.name.split("-")[1] for p in tmp_path.iterdir())
    assert names == ["kept", "spectra"]
    del plan, budget
    gc.collect()
    assert not list(tmp_path.iterdir())  # both scratch directories removed with the plan


def test_a_deleted_spill_file_fails_the_apply_naming_file_and_target(tmp_path):
    model = make_tiny_llama(layers=LAYERS).double()
    plan = obdk.prepare(model, CFG, _ids(), progress=False, stream=True, scratch_dir=tmp_path, max_host_memory=0)
    (d,) = tmp_path.iterdir()
    (d / "layer-1.safetensors").unlink()
    plan.allocate(keep=0.6)  # the eigenvalues do not need the file
    with pytest.raises(MissingFileError, match=rf"{d / 'layer-1.safetensors'} holding model\.layers\.1\.\S+'s factors"):
        plan.apply(copy.deepcopy(model), keep=0.6)


def test_boundary_buffers_draw_on_a_shared_budget():
    """calibrate_streamed(budget=): the boundary buffers go to scratch when what others hold leaves no room,
    with the same statistics; the bytes are given back when the pass ends."""
    from obdk.stream.budget import HostBudget
    model = make_tiny_llama(layers=LAYERS).double()
    ref_info, info = {}, {}
    ref = calibrate_streamed(model, _ids(), stats=("cx", "cg"), dtype=torch.float64, progress=False, info=ref_info)
    assert ref_info["spilled_bytes"] == 0
    budget = HostBudget(1000)
    assert budget.take(900)  # another store holds most of it
    got = calibrate_streamed(model, _ids(), stats=("cx", "cg"), dtype=torch.float64, progress=False, info=info,
                             budget=budget)
    assert info["spilled_bytes"] == ref_info["peak_host_bytes"] > 0 and info["peak_host_bytes"] == 0
    assert budget.used == 900 and budget.peak <= 1000
    for kind in ("cx", "cg"):
        for k, v in getattr(ref, kind).items():
            assert torch.equal(getattr(got, kind)[k], v)
    with pytest.raises(ConfigError, match="not both"):
        calibrate_streamed(model, _ids(), progress=False, budget=budget, max_host_memory=10)
