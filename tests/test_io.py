"""Checkpoint round trip and every error path of obdk.io."""
import json

import pytest
import torch

import obdk
from obdk import io
from obdk.models import set_module
from obdk.nn import LowRankLinear
from tests.conftest import make_tiny_llama


def _lowrank_model(rank=8, bias_model=None):
    m = bias_model or make_tiny_llama()
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"):
        lin = m.get_submodule(name)
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        new = LowRankLinear.from_factors(vh[:rank], u[:, :rank] * s[:rank],
                                         lin.bias.detach() if lin.bias is not None else None)
        set_module(m, name, new)
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.fixture
def saved(tmp_path):
    m = _lowrank_model()
    d = io.save_pretrained(m, tmp_path / "ck")
    return m, d


def test_round_trip_identical_logits_and_tied_head(saved):
    m, d = saved
    ids = torch.randint(0, 128, (2, 12))
    m2 = obdk.load_pretrained(d)
    torch.testing.assert_close(_logits(m2, ids), _logits(m, ids), rtol=0, atol=0)
    assert isinstance(m2.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)
    assert m2.get_submodule("model.layers.0.mlp.up_proj").rank == 8
    assert m2.lm_head.weight is m2.model.embed_tokens.weight  # tied head untouched and still tied
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "obdk" and q["format_version"] == 1 and q["obdk_version"] == obdk.__version__
    assert q["ranks"] == {"model.layers.0.mlp.up_proj": 8, "model.layers.1.self_attn.q_proj": 8}
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        tomb = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight_a" in keys
    assert tomb.shape == (0,)  # the dense weight is a tombstone: loaders without obdk stop on its shape
    assert "model.layers.0.mlp.down_proj.weight" in keys  # dense modules keep their weight


def test_transformers_from_pretrained_loads_obdk_dir(saved):
    from transformers import AutoModelForCausalLM
    m, d = saved
    ids = torch.randint(0, 128, (1, 9))
    m3 = AutoModelForCausalLM.from_pretrained(str(d))
    assert isinstance(m3.get_submodule("model.layers.1.self_attn.q_proj"), LowRankLinear)
    torch.testing.assert_close(_logits(m3, ids), _logits(m, ids), rtol=0, atol=0)


def test_sharded_round_trip(tmp_path):
    m = _lowrank_model()
    d = io.save_pretrained(m, tmp_path / "sh", max_shard_bytes=20_000)
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(_logits(obdk.load_pretrained(d), ids), _logits(m, ids), rtol=0, atol=0)


def test_bf16_dtype_cast(saved):
    _, d = saved
    m2 = obdk.load_pretrained(d, dtype=torch.bfloat16)
    assert m2.get_submodule("model.layers.0.mlp.up_proj").weight_a.dtype == torch.bfloat16


def test_missing_shard_named(tmp_path):
    d = io.save_pretrained(_lowrank_model(), tmp_path / "sh", max_shard_bytes=20_000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(io.CheckpointError, match=victim.name):
        obdk.load_pretrained(d)


def test_truncated_file_named(saved):
    _, d = saved
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(io.CheckpointError, match="model.safetensors"):
        obdk.load_pretrained(d)


def test_rank_mismatch_names_tensor(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["ranks"]["model.layers.0.mlp.up_proj"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_a.*rank 4"):
        obdk.load_pretrained(d)


def test_unknown_format_version(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.CheckpointError, match="format_version=99"):
        obdk.load_pretrained(d)


def test_not_an_obdk_dir(tmp_path):
    with pytest.raises(io.CheckpointError, match="config.json"):
        obdk.load_pretrained(tmp_path)


def test_atomic_write_leaves_nothing_on_crash(tmp_path, monkeypatch):
    m = _lowrank_model()
    good = io.save_pretrained(m, tmp_path / "ck")
    before = sorted(p.name for p in good.iterdir())

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(m.config, "to_dict", explode)
    with pytest.raises(Boom):
        io.save_pretrained(m, tmp_path / "ck")
    # the previous complete checkpoint is untouched, and no temp directory is left behind
    assert sorted(p.name for p in good.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    with pytest.raises(Boom):
        io.save_pretrained(m, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_load_packed_identical_and_packed_save_refused(tmp_path):
    from obdk.nn import PackedSlice, unpack_shared_inputs
    m = _lowrank_model()
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"):
        lin = m.get_submodule(name)
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        set_module(m, name, LowRankLinear.from_factors(vh[:8], u[:, :8] * s[:8], None))
    d = io.save_pretrained(m, tmp_path / "ck")
    m2 = obdk.load_pretrained(d, pack=True)
    assert any(isinstance(x, PackedSlice) for x in m2.modules())
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(_logits(m2, ids), _logits(m, ids))
    with pytest.raises(ValueError, match="unpack_shared_inputs"):
        obdk.save_pretrained(m2, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    unpack_shared_inputs(m2)
    obdk.save_pretrained(m2, tmp_path / "unpacked")
    torch.testing.assert_close(_logits(obdk.load_pretrained(tmp_path / "unpacked"), ids), _logits(m, ids))
