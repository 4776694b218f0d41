"""FactorStore / Truncations (obdk.correct.factor_store): a streamed correction's results kept layer by layer under the
plan's host budget, spilled to scratch beyond it, read back bit for bit; the streamed default compression
through them equals the resident one while no step's results are ever all on host at once."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import obdk
from obdk.config import LowRankConfig
from obdk.correct.factor_store import FactorStore, Truncations
from obdk.errors import ConfigError, MissingFileError
from obdk.stream.budget import HostBudget
from obdk.testing import make_tiny_llama


def _facs(seed, names, r=3, m=8, n=5):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g,
                                                                                   dtype=torch.float64), 0.5 + i)
            for i, k in enumerate(names)}


@pytest.mark.parametrize("limit", [None, 0, 400])
def test_store_keeps_layers_on_host_then_scratch_bit_for_bit(tmp_path, limit):
    budget = HostBudget(limit)
    st = FactorStore(scratch_dir=tmp_path, budget=budget)
    layers = {i: _facs(i, [f"l{i}.q", f"l{i}.k"]) for i in (2, 1, 0)}
    for i, f in layers.items():
        st.put_layer(i, f)
    assert list(st) == ["l2.q", "l2.k", "l1.q", "l1.k", "l0.q", "l0.k"] and len(st) == 6
    assert "l1.k" in st and "l9.q" not in st and st.files_read == 0  # (membership reads nothing)
    assert budget.used == st.host_bytes <= (limit if limit is not None else 10 ** 9)
    assert st.nbytes() == 6 * (3 * 5 + 8 * 3) * 8
    for i, f in layers.items():
        for k, (a, b, p) in f.items():
            ga, gb, gp = st[k]
            assert torch.equal(ga, a) and torch.equal(gb, b) and gp == p and st.rank(k) == 3
    if limit == 0:
        assert st.spilled_bytes == st.nbytes() and st.files_read == 3 and len(os.listdir(tmp_path)) == 1
    with pytest.raises(ConfigError, match="already kept"):
        st.put_layer(1, _facs(9, ["x"]))
    with pytest.raises(KeyError):
        st["nope"]
    st.free()
    assert budget.used == 0 and not os.listdir(tmp_path)


def test_a_deleted_factor_file_names_it(tmp_path):
    st = FactorStore(scratch_dir=tmp_path, budget=HostBudget(0))
    st.put_layer(0, _facs(0, ["model.layers.0.q"]))
    (d,) = tmp_path.iterdir()
    (f,) = d.iterdir()
    f.unlink()
    with pytest.raises(MissingFileError, match=str(f)):
        st["model.layers.0.q"]


def test_truncations_make_each_entry_when_asked():
    made = []
    t = Truncations(["a", "b"], lambda n: made.append(n) or (n, n, 0.0))
    assert list(t) == ["a", "b"] and len(t) == 2 and "a" in t and "c" not in t and made == []
    assert t["b"] == ("b", "b", 0.0) and made == ["b"]
    with pytest.raises(KeyError):
        t["c"]


def test_streamed_default_compression_keeps_the_corrected_factors_layer_by_layer(tmp_path, monkeypatch):
    """obd zs+kfac streamed with max_host_memory=0, written by Plan.save: both steps' results go to spilled
    FactorStores (each freed when read), W_r is only ever written into fetched private copies (never into the
    model's own tensors, which are not copied either), and the checkpoint equals the resident pipeline's."""
    from tests.test_plan_save import _same_checkpoint
    model = make_tiny_llama(layers=3).double()
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(4))
    cfg = LowRankConfig(method="obd")
    ref = copy.deepcopy(model)
    rep_ref = obdk.prepare(ref, cfg, ids, progress=False).apply(ref, keep=0.6)
    obdk.save_pretrained(ref, tmp_path / "ref", report=rep_ref)

    kept = []  # (store, host bytes, spilled bytes) after each put
    put = FactorStore.put_layer

    def spy(self, i, f):
        put(self, i, f)
        kept.append((id(self), self.host_bytes, self.spilled_bytes))

    monkeypatch.setattr(FactorStore, "put_layer", spy)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    plan = obdk.prepare(model, cfg, ids, progress=False, stream=True, scratch_dir=scratch, max_host_memory=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    home = {p.data_ptr() for p in model.parameters()}
    writes = []
    orig_copy = torch.Tensor.copy_

    def watch(t, src, *a, **k):
        if t.data_ptr() in home:
            writes.append(tuple(t.shape))
        return orig_copy(t, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", watch)
    plan.save(model, tmp_path / "saved", keep=0.6)
    monkeypatch.setattr(torch.Tensor, "copy_", orig_copy)
    assert len({k[0] for k in kept}) == 2 and len(kept) == 2 * 3  # two steps, three layers each
    assert all(host == 0 and spilled > 0 for _, host, spilled in kept)  # every layer's results went to scratch
    assert writes == []  # no W_r written into the model's own tensors
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
    _same_checkpoint(tmp_path / "saved", tmp_path / "ref", atol=1e-9)
    plan.close()
    assert not os.listdir(scratch)
