"""``Plan.save``: the compressed checkpoint written tensor by tensor, without building the compressed model.

It must be the checkpoint of ``Plan.apply`` + ``save_pretrained`` (same tensor names, values, ranks,
``config.json`` and report), leave the dense model untouched, and, for a skeleton read from its checkpoint
(``prepare(stream=True, source=...)``), run the whole default pipeline (calibration, both corrections, the
save) with at most one decoder layer materialized at any moment, and give the loaded model's checkpoint."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import obdk
from obdk.calibrate import placement
from obdk.calibrate.placement import load_skeleton
from obdk.config import LowRankConfig
from obdk.errors import ConfigError
from obdk.pipeline import prepare
from obdk.testing import make_tiny_llama, make_tiny_qwen2


def _windows(n=4, t=12, seed=3, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _json(d: Path, name: str) -> dict:
    with open(d / name) as f:
        return json.load(f)


def _same_checkpoint(a: Path, b: Path, *, atol: float = 0.0) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb) or sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        if atol == 0.0:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)
    ca, cb = _json(a, "config.json"), _json(b, "config.json")
    for c in (ca, cb):
        c.pop("_name_or_path", None)
        c["quantization_config"].pop("obdk_version", None)
    assert ca == cb
    ra, rb = _json(a, "obdk_report.json"), _json(b, "obdk_report.json")
    for key in ("model_params_before", "model_params_after", "targeted_params_before", "targeted_params_after",
                "config", "calibration"):
        assert ra[key] == rb[key], key
    ma = {m["name"]: (m["rank"], m["params"]) for m in ra["modules"]}
    mb = {m["name"]: (m["rank"], m["params"]) for m in rb["modules"]}
    assert ma == mb
    assert abs(ra["predicted_loss"] - rb["predicted_loss"]) <= 1e-9 * max(1.0, abs(rb["predicted_loss"]))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method,correct,stream", [("obd", "none", False), ("svd-llm", "none", True),
                                                   ("obd", "zs+kfac", True), ("zs-svd", "none", False),
                                                   ("bsi", "none", False)])
def test_save_equals_apply_then_save_pretrained(tmp_path, method, correct, stream):
    model = make_tiny_qwen2(layers=2).double()  # q/k/v with bias: biases of compressed modules are written
    ids = _windows()
    cfg = LowRankConfig(method=method, correct=correct, bsi_curvature="kfac") if method == "bsi" else \
        LowRankConfig(method=method, correct=correct)
    plan = prepare(model, cfg, ids, progress=False, stream=stream)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rep = plan.save(model, tmp_path / "saved", keep=0.6, max_shard_bytes=40_000)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # the dense model is untouched
    assert not any(isinstance(m, obdk.LowRankLinear) for m in model.modules())
    ref = copy.deepcopy(model)
    rep_ref = plan.apply(ref, keep=0.6)
    obdk.save_pretrained(ref, tmp_path / "ref", max_shard_bytes=40_000, report=rep_ref)
    _same_checkpoint(tmp_path / "saved", tmp_path / "ref")
    assert len([f for f in os.listdir(tmp_path / "saved") if f.endswith(".safetensors")]) > 1
    assert rep.model_params_after == rep_ref.model_params_after
    assert [m.rank for m in rep.modules] == [m.rank for m in rep_ref.modules]
    assert any(m.rank is not None for m in rep.modules)
    loaded = obdk.load_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref, ids), atol=0, rtol=0)


def test_save_refuses_what_save_pretrained_refuses(tmp_path):
    model = make_tiny_llama(layers=2).double()
    plan = prepare(model, LowRankConfig(method="obd", correct="none"), _windows(), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(obdk.errors.OutputPathError):
        plan.save(model, out, keep=0.6)
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    with pytest.raises(ConfigError, match="keep"):
        plan.save(model, tmp_path / "other", keep=1.5)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
def test_skeleton_pipeline_one_layer_at_a_time_equals_loaded_model(tmp_path, make, monkeypatch):
    """The default method (obd, zs+kfac) on a skeleton read from its shards: every pass fetches one decoder
    layer at a time, the checkpoint equals the one made from the fully loaded model."""
    src = tmp_path / "src"
    make(layers=3).double().save_pretrained(src, safe_serialization=True, max_shard_size="60KB")
    ids = _windows(n=5)
    cfg = LowRankConfig(method="obd")
    assert cfg.resolved_correct == "zs+kfac"

    loaded = AutoModelForCausalLM.from_pretrained(src).eval()
    plan_ref = prepare(loaded, cfg, ids, progress=False, stream=True)
    rep_ref = plan_ref.apply(loaded, keep=0.6)
    obdk.save_pretrained(loaded, tmp_path / "ref", report=rep_ref)

    live, peak, fetches = set(), [0], [0]
    fetch, release = placement.LayerPlacement.fetch, placement.LayerPlacement.release

    def counted_fetch(self, i):
        live.add((id(self), i))
        peak[0] = max(peak[0], len(live))
        fetches[0] += 1
        return fetch(self, i)

    def counted_release(self, i):
        live.discard((id(self), i))
        return release(self, i)

    monkeypatch.setattr(placement.LayerPlacement, "fetch", counted_fetch)
    monkeypatch.setattr(placement.LayerPlacement, "release", counted_release)
    skel, source = load_skeleton(src)
    plan = prepare(skel, cfg, ids, progress=False, stream=True, source=source, max_host_memory=0)
    with pytest.raises(ConfigError, match="Plan.save"):
        plan.apply(skel, keep=0.6)
    plan.save(skel, tmp_path / "saved", keep=0.6)
    assert peak[0] == 1 and not live
    assert fetches[0] == 3 * 2 * 3  # three passes (calibration, zs, kfac), each a forward and a backward sweep
    assert all(p.is_meta for layer in skel.model.layers for p in layer.parameters())
    _same_checkpoint(tmp_path / "saved", tmp_path / "ref", atol=1e-12)
    got = obdk.load_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_logits(got, ids), _logits(loaded, ids), atol=1e-10, rtol=0)


def test_skeleton_needs_stream(tmp_path):
    src = tmp_path / "src"
    make_tiny_llama(layers=2).double().save_pretrained(src, safe_serialization=True)
    skel, source = load_skeleton(src)
    with pytest.raises(ConfigError, match="stream=True"):
        prepare(skel, LowRankConfig(method="obd"), _windows(), progress=False, source=source)
