"""obdk.io.CheckpointWriter: a checkpoint written tensor by tensor is save_pretrained's, shard for shard;
host memory holds at most one shard of pending tensors; every failure leaves the target as it was."""
import json

import pytest
import torch
import torch.nn as nn

import obdk
from obdk import io
from obdk.config import LowRankConfig
from obdk.errors import CheckpointError, NonFiniteError, OutputPathError
from obdk.models import set_module
from obdk.nn import LowRankLinear
from tests.conftest import make_char_tokenizer, make_tiny_llama, make_tiny_qwen2

LLAMA = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
QWEN = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"]
UP = LLAMA[0]
REPORT = {"method": "obd", "keep": 0.8, "modules": [{"name": UP, "rank": 8}]}
FINGERPRINT = {"model": "tiny", "data": "abc", "windows": 4}


def _compressed(kind="llama", rank=8, seed=0):
    """A tiny fp64 model with three Linears replaced by rank-``rank`` SVD factors (qwen2: two with a bias)."""
    m = (make_tiny_llama(seed=seed) if kind == "llama" else make_tiny_qwen2(seed=seed)).double()
    for name in LLAMA if kind == "llama" else QWEN:
        lin = m.get_submodule(name)
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        bias = lin.bias.detach() if lin.bias is not None else None
        set_module(m, name, LowRankLinear.from_factors(vh[:rank], u[:, :rank] * s[:rank], bias))
    return m


def _feed(w, model):
    """Give ``w`` the model's tensors one at a time as a streamed pipeline would: fresh copies (on the
    writer's default copy=True), compressed Linears through add_lowrank, dense ones through add_dense,
    the rest through add; the tied head is left out (the loader ties it back)."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    for k, t in model.state_dict().items():
        if k in tied:
            continue
        module, _, leaf = k.rpartition(".")
        owner = model.get_submodule(module)
        if isinstance(owner, LowRankLinear):
            if leaf == "weight_a":  # weight_b and bias follow it in the state dict
                bias = owner.bias.detach().clone() if owner.bias is not None else None
                w.add_lowrank(module, owner.weight_a.detach().clone(), owner.weight_b.detach().clone(), bias)
        elif isinstance(owner, nn.Linear):
            if leaf == "weight":
                bias = owner.bias.detach().clone() if owner.bias is not None else None
                w.add_dense(module, owner.weight.detach().clone(), bias)
        else:
            w.add(k, t.detach().clone())


def _finish_kw(model):
    return dict(model_config=model.config, tokenizer=make_char_tokenizer(), report=REPORT,
                fingerprint=FINGERPRINT, config=LowRankConfig(), generation_config=model.generation_config)


def _st(path):
    """A safetensors file as (header length, header JSON, data bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _assert_same_checkpoint(a, b):
    """Same files; each safetensors file has the same header (tensors in the same order, same dtypes,
    shapes, offsets, metadata) and the same data bytes; every JSON file parses equal. (The raw bytes of
    a header can differ between any two saves, old code included: safetensors writes the ``__metadata__``
    keys in the order of a Rust HashMap, which is randomised per process.)"""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        if f.endswith(".safetensors"):
            (na, ha, da), (nb, hb, db) = _st(a / f), _st(b / f)
            assert (na, ha, list(ha)) == (nb, hb, list(hb)), f
            assert da == db, f"{f}: tensor data differ"
        elif f.endswith(".json"):
            ja, jb = json.loads((a / f).read_text()), json.loads((b / f).read_text())
            assert ja == jb, f
            if f == "model.safetensors.index.json":
                assert list(ja["weight_map"]) == list(jb["weight_map"])
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _logits(m, ids=torch.arange(24).view(2, 12)):
    with torch.no_grad():
        return m(ids).logits


def _tree(d):
    return sorted((str(p.relative_to(d)), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


# --------------------------------------------------------------------------- same checkpoint as save_pretrained


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("shard", [io.SHARD_BYTES, 20_000, 1], ids=["single", "sharded", "one-per-file"])
def test_writer_output_is_save_pretrained_output(tmp_path, kind, shard):
    m = _compressed(kind)
    kw = _finish_kw(m)
    ref = io.save_pretrained(m, tmp_path / "ref", max_shard_bytes=shard, tokenizer=kw["tokenizer"], report=REPORT,
                             fingerprint=FINGERPRINT, config=LowRankConfig())
    with io.CheckpointWriter(tmp_path / "w", max_shard_bytes=shard) as w:
        _feed(w, m)
        out = w.finish(**kw)
    assert out == tmp_path / "w"
    _assert_same_checkpoint(ref, out)
    # what the files hold, checked from the files themselves
    sd = {k: t for k, t in m.state_dict().items() if not (k == "lm_head.weight" and m.config.tie_word_embeddings)}
    names = LLAMA if kind == "llama" else QWEN
    index = io.tensor_index(out)
    assert set(index) == set(sd) | {f"{n}.weight" for n in names}
    for k, info in index.items():
        if k in sd:
            assert (info.dtype, info.shape) == (sd[k].dtype, tuple(sd[k].shape)), k
        else:
            assert info.shape == (0,) and info.dtype == torch.float64, k  # tombstones
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["ranks"] == {n: 8 for n in names} == w.ranks and cfg["torch_dtype"] == "float64"
    assert q["calibration"] == FINGERPRINT and q["config"] == LowRankConfig().to_dict()
    shards = sorted(out.glob("model*.safetensors"))
    if shard == io.SHARD_BYTES:
        assert [p.name for p in shards] == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        n = len(shards)
        assert n > 3 and [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        assert {k: index[k].file.name for k in index} == idx["weight_map"]
        assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
        sizes = {p.name: 0 for p in shards}
        count = {p.name: 0 for p in shards}
        for k, f in idx["weight_map"].items():
            sizes[f] += index[k].dtype.itemsize * (torch.Size(index[k].shape).numel())
            count[f] += 1
        order = list(idx["weight_map"])  # the order added: each shard is the longest run that fits
        for f in sizes:
            assert sizes[f] <= shard or count[f] == 1, f
        for a, b in zip(order, order[1:]):
            fa, fb = idx["weight_map"][a], idx["weight_map"][b]
            if fa != fb:  # a new shard starts only when its first tensor did not fit in the previous one
                assert sizes[fa] + index[b].dtype.itemsize * torch.Size(index[b].shape).numel() > shard
    m2 = obdk.load_pretrained(out)
    assert m2.get_submodule(names[0]).rank == 8
    torch.testing.assert_close(_logits(m2), _logits(m), rtol=0, atol=0)


def test_shard_boundaries(tmp_path):
    """A tensor joins the pending shard while the shard stays within max_shard_bytes (an exact fit and an
    empty tensor included); one larger than the limit gets a shard of its own."""
    f64 = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731  (8 bytes an entry)
    with io.CheckpointWriter(tmp_path / "ck", max_shard_bytes=200) as w:
        for name, t in [("a", f64(12)), ("b", f64(13)), ("empty", f64(0)), ("c", f64(1)), ("big", f64(40)),
                        ("d", f64(25)), ("e", f64(1))]:
            w.add(name, t)
        w.finish(model_config=make_tiny_llama().config)
    idx = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shard = {k: int(f.split("-")[1]) for k, f in idx["weight_map"].items()}
    assert shard == {"a": 1, "b": 1, "empty": 1, "c": 2, "big": 3, "d": 4, "e": 5}
    assert list(idx["weight_map"]) == ["a", "b", "empty", "c", "big", "d", "e"]
    assert idx["metadata"]["total_size"] == 8 * (12 + 13 + 1 + 40 + 25 + 1)
    assert w.peak_pending_bytes == 320  # "big" alone


def test_copy_is_taken_at_add(tmp_path):
    m = _compressed()
    with io.CheckpointWriter(tmp_path / "ck", max_shard_bytes=1 << 20) as w:
        emb = m.model.embed_tokens.weight.detach().clone()
        w.add("model.embed_tokens.weight", emb)
        emb.fill_(7.0)  # the caller reuses its buffer before the shard is written
        for k, t in m.state_dict().items():
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                continue
            module, _, leaf = k.rpartition(".")
            if module in LLAMA:
                if leaf == "weight_a":
                    mod = m.get_submodule(module)
                    w.add_lowrank(module, mod.weight_a, mod.weight_b)
            else:
                w.add(k, t)
        w.finish(model_config=m.config)
    torch.testing.assert_close(_logits(obdk.load_pretrained(tmp_path / "ck")), _logits(m), rtol=0, atol=0)


# --------------------------------------------------------------------------- memory


def test_pending_bytes_never_exceed_one_shard(tmp_path):
    m = _compressed()
    limit = 30_000
    sizes = {k: t.numel() * t.element_size() for k, t in m.state_dict().items()}
    largest = max(sizes.values())
    assert largest > limit  # the embeddings (65,536 bytes) do not fit in one shard on their own
    with io.CheckpointWriter(tmp_path / "ck", max_shard_bytes=limit) as w:
        seen, written_during = [], []
        for k, t in m.state_dict().items():
            if k == "lm_head.weight":
                continue
            module, _, leaf = k.rpartition(".")
            if module in LLAMA:
                if leaf != "weight_a":
                    continue
                mod = m.get_submodule(module)
                w.add_lowrank(module, mod.weight_a, mod.weight_b)
            else:
                w.add(k, t)
            seen.append(w.pending_bytes)
            assert w.pending_bytes <= max(limit, largest) <= limit + largest
            parts = sorted(p.name for p in w._tmp.iterdir())
            assert len(parts) == w.shards_written  # written (and released) during the adds, not at finish
            written_during.append(w.shards_written)
        assert w.peak_pending_bytes == max(seen) and limit < w.peak_pending_bytes <= limit + largest
        assert written_during[-1] > 3 and written_during == sorted(written_during)
        w.finish(model_config=m.config)
    n = len(list((tmp_path / "ck").glob("model-*.safetensors")))
    assert n == written_during[-1] + 1  # the last shard is written by finish


# --------------------------------------------------------------------------- failures leave the target as it was


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "fresh"])
def test_exception_in_the_with_leaves_the_old_checkpoint(tmp_path, existing):
    d = tmp_path / "ck"
    old = _compressed(seed=0)
    if existing:
        io.save_pretrained(old, d)
    before = _tree(d) if existing else None
    with pytest.raises(RuntimeError, match="boom"):
        with io.CheckpointWriter(d, max_shard_bytes=20_000) as w:
            _feed(w, _compressed(rank=4, seed=1))
            assert w.shards_written > 1 and w._tmp.is_dir()
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ck"] if existing else [])
    assert io.temporaries(d) == []
    if existing:
        assert _tree(d) == before
        torch.testing.assert_close(_logits(obdk.load_pretrained(d)), _logits(old), rtol=0, atol=0)


def test_leaving_without_finish_raises_and_abort_does_not(tmp_path):
    m = _compressed()
    d = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="left without finish"):
        with io.CheckpointWriter(d) as w:
            w.add("model.norm.weight", m.model.norm.weight)
    with io.CheckpointWriter(d) as w:
        w.add("model.norm.weight", m.model.norm.weight)
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_failing_finish_leaves_the_old_checkpoint(tmp_path):
    d = io.save_pretrained(_compressed(), tmp_path / "ck")
    before = _tree(d)
    m = _compressed(rank=4, seed=1)
    with pytest.raises(CheckpointError, match=rf"finish\(ranks=...\) differs .*{UP}"):
        with io.CheckpointWriter(d) as w:
            _feed(w, m)
            w.finish(model_config=m.config, ranks={**w.ranks, UP: 8})
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_source_named_by_the_model_config_is_protected_at_the_swap(tmp_path):
    d = io.save_pretrained(_compressed(), tmp_path / "ck")
    before = _tree(d)
    m = obdk.load_pretrained(d)  # its config names d as where it came from
    with pytest.raises(OutputPathError, match="the directory the model was loaded from"):
        with io.CheckpointWriter(d, overwrite=True) as w:  # no source_dir given
            _feed(w, m)
            w.finish(model_config=m.config)
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --------------------------------------------------------------------------- checks as it goes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_named(tmp_path, bad):
    m = _compressed()
    with io.CheckpointWriter(tmp_path / "ck") as w:
        norm = m.model.norm.weight.detach().clone()
        norm[3] = bad
        with pytest.raises(NonFiniteError, match=r"tensor 'model\.norm\.weight' holds (NaN|Inf) in 1 of 64"):
            w.add("model.norm.weight", norm)
        mod = m.get_submodule(UP)
        b = mod.weight_b.detach().clone()
        b[0, 0] = bad
        with pytest.raises(NonFiniteError, match=rf"tensor '{UP}\.weight_b' holds"):
            w.add_lowrank(UP, mod.weight_a, b)
        assert w.ranks == {} and w.total_bytes == 0  # nothing of either was kept
        _feed(w, m)  # so the same names can still be added
        w.finish(model_config=m.config)
    torch.testing.assert_close(_logits(obdk.load_pretrained(tmp_path / "ck")), _logits(m), rtol=0, atol=0)


def test_name_added_twice(tmp_path):
    m = _compressed()
    mod = m.get_submodule(UP)
    with io.CheckpointWriter(tmp_path / "ck", max_shard_bytes=1) as w:
        w.add("model.norm.weight", m.model.norm.weight)
        w.add("model.embed_tokens.weight", m.model.embed_tokens.weight)  # the norm is now in a written shard
        assert w.shards_written == 1
        with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' added twice"):
            w.add("model.norm.weight", m.model.norm.weight)
        with pytest.raises(CheckpointError, match=r"tensor 'model\.embed_tokens\.weight' added twice"):
            w.add("model.embed_tokens.weight", m.model.embed_tokens.weight)
        w.add_lowrank(UP, mod.weight_a, mod.weight_b)
        with pytest.raises(CheckpointError, match=rf"low-rank module '{UP}' added twice"):
            w.add_lowrank(UP, mod.weight_a, mod.weight_b)
        with pytest.raises(CheckpointError, match=rf"tensor '{UP}\.weight' added twice"):  # its tombstone
            w.add_dense(UP, torch.zeros(160, 64, dtype=torch.float64))
        with pytest.raises(CheckpointError, match=rf"'{UP}\.weight_a' is named like a low-rank factor"):
            w.add(f"{UP}.weight_a", mod.weight_a)
        w.abort()


def test_mixed_factor_dtypes_name_both_modules(tmp_path):
    m = _compressed()
    up, q = (m.get_submodule(n) for n in LLAMA[:2])
    with io.CheckpointWriter(tmp_path / "ck") as w:
        w.add_lowrank(LLAMA[0], up.weight_a, up.weight_b)
        with pytest.raises(CheckpointError, match=rf"several dtypes: '{LLAMA[1]}\.weight_a' is float32, module "
                                                  rf"{LLAMA[0]} is float64"):
            w.add_lowrank(LLAMA[1], q.weight_a.float(), q.weight_b.float())
        with pytest.raises(CheckpointError, match=rf"several dtypes: '{LLAMA[1]}\.weight_b' is float32, module "
                                                  rf"{LLAMA[0]} is float64"):
            w.add_lowrank(LLAMA[1], q.weight_a, q.weight_b.float())
        assert w.ranks == {LLAMA[0]: 8}
        w.abort()
    with io.CheckpointWriter(tmp_path / "ck") as w:  # the first module itself mixed
        with pytest.raises(CheckpointError, match=rf"'{LLAMA[1]}\.weight_b' is bfloat16, '{LLAMA[1]}\.weight_a' "
                                                  "is float64"):
            w.add_lowrank(LLAMA[1], q.weight_a, q.weight_b.bfloat16())
        w.add_lowrank(LLAMA[1], q.weight_a.float(), q.weight_b.float())  # the failed call fixed no dtype
        w.abort()


def test_lifecycle_errors(tmp_path):
    m = _compressed()
    w = io.CheckpointWriter(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"add\(\) called, but the writer was not entered"):
        w.add("model.norm.weight", m.model.norm.weight)
    with w:
        _feed(w, m)
        w.finish(model_config=m.config)
        with pytest.raises(CheckpointError, match=r"finish\(\) called, but the writer is already finished"):
            w.finish(model_config=m.config)
        with pytest.raises(CheckpointError, match=r"add\(\) called, but the writer is already finished"):
            w.add("model.extra", torch.zeros(3))
        with pytest.raises(CheckpointError, match=r"add_lowrank\(\) called, but the writer is already finished"):
            w.add_lowrank("model.x", torch.zeros(2, 3), torch.zeros(4, 2))
    with pytest.raises(CheckpointError, match="entered twice"):
        with w:
            pass
    assert set(io.tensor_index(tmp_path / "ck")) >= {"model.norm.weight"} and "model.extra" not in \
        io.tensor_index(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no tensor added"):
        with io.CheckpointWriter(tmp_path / "empty") as w2:
            w2.finish(model_config=m.config)
    assert not (tmp_path / "empty").exists()


def test_bad_arguments_named(tmp_path):
    with pytest.raises(obdk.errors.ConfigError, match="max_shard_bytes=0"):
        io.CheckpointWriter(tmp_path / "ck", max_shard_bytes=0)
    m = _compressed()
    mod = m.get_submodule(UP)
    with io.CheckpointWriter(tmp_path / "ck") as w:
        with pytest.raises(CheckpointError, match=rf"add_lowrank\('{UP}'\) needs a \[r, in\] and b \[out, r\]"):
            w.add_lowrank(UP, mod.weight_a, mod.weight_b.T)
        with pytest.raises(CheckpointError, match=rf"add_lowrank\('{UP}'\): bias has shape \(3,\)"):
            w.add_lowrank(UP, mod.weight_a, mod.weight_b, torch.zeros(3, dtype=torch.float64))
        with pytest.raises(obdk.errors.WrongTypeError, match=r"tensor 'model\.norm\.weight' is a list"):
            w.add("model.norm.weight", [1.0, 2.0])
        with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is on the meta device"):
            w.add("model.norm.weight", torch.empty(64, device="meta"))
        _feed(w, m)
        with pytest.raises(obdk.errors.WrongTypeError, match=r"finish\(model_config=...\) is a str"):
            w.finish(model_config="llama")
    assert not (tmp_path / "ck").exists() and io.temporaries(tmp_path / "ck") == []
