"""The SVD-LLM baseline (benchmarks/baselines/svd_llm.py) computes what obdk's svd-llm computes.

A speed comparison is only fair if the baseline is a correct implementation: on a tiny Llama
its hook Grams equal obdk's ``C_x`` (times the token count), its ranks are obdk's uniform
ranks, and its factors give the same truncated weight as obdk ``svd-llm`` at the same rank and
damping; its eigenvalue-shift fallback yields finite factors on a singular Gram. The script that
times it, benchmarks/bench_decompose_latency.py, is run end to end on the tiny model as a
subprocess (``python -m``), as a user runs it.
"""
import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baselines import svd_llm as ref_impl
from obdk.allocate import MatrixSpec, allocate_uniform
from obdk.calibrate.stats import calibrate
from obdk.config import LowRankConfig
from obdk.pipeline import prepare
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))  # 512 tokens > 160 = widest input


def _ref_weight(model, name):
    seq = model.get_submodule(name)
    return seq.u_proj.weight.detach().double() @ seq.v_proj.weight.detach().double()


def test_hook_grams_are_obdk_cx_times_tokens():
    m = make_tiny_llama()
    grams = ref_impl.collect(m, IDS)
    st = calibrate(copy.deepcopy(m), IDS, stats=("cx",), progress=False)
    assert set(grams) == set(st.input_key)  # every decoder Linear, one Gram each (q/k/v not shared)
    for name, g in grams.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double() / st.tokens, st.cx_for(name).double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damping", [0.0, 0.01])
@pytest.mark.parametrize("keep", [0.6, 0.9])
def test_reference_factors_match_obdk_svdllm(keep, damping):
    base = make_tiny_llama()
    ref = copy.deepcopy(base)
    shifted = []
    grams = ref_impl.collect(ref, IDS)
    chol = ref_impl.cholesky(grams, damping=damping, shifted=shifted)
    assert not shifted and not grams  # full-rank Grams here; Grams freed as the reference does
    ranks = ref_impl.whitening(ref, chol, keep)

    ob = copy.deepcopy(base)
    plan = prepare(ob, LowRankConfig(method="svd-llm", keep=keep, alloc="uniform", rank_multiple=1,
                                     damping=damping), IDS, progress=False)
    alloc = plan.allocate(keep)
    assert ranks == alloc.ranks  # same rank per matrix → same parameter count
    for t in plan.targets:
        r = ranks[t.name]
        assert r is not None
        a, b, _ = plan.factors(t.name, r)
        w_obdk = b.double() @ a.double()
        w_ref = _ref_weight(ref, t.name)
        rel = float((w_ref - w_obdk).norm() / w_obdk.norm())
        assert rel < 2e-4, f"{t.name} rank {r}: relative difference {rel:.2e}"
    # the swapped-in modules reproduce the truncated layer
    x = torch.randn(3, base.config.hidden_size)
    name = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(ref.get_submodule(name)(x).double(), x.double() @ _ref_weight(ref, name).T,
                               rtol=1e-5, atol=1e-5)
    params = sum(r * (t.m + t.n) for t in plan.targets for r in [ranks[t.name]])
    assert ref_impl.params_after(ref) == params


def test_eigenvalue_shift_fallback_on_singular_gram():
    m = make_tiny_llama()
    ids = IDS[:1, :16]  # 16 tokens: every Gram (64 or 160 wide) is singular
    shifted = []
    grams = ref_impl.collect(m, ids)
    chol = ref_impl.cholesky(grams, shifted=shifted)
    assert shifted  # the reference's fallback ran
    for name, L in chol.items():
        assert L.dtype == torch.float64 and torch.isfinite(L).all()
    ref_impl.whitening(m, chol, 0.6)
    with torch.no_grad():
        assert torch.isfinite(m(IDS[:2]).logits).all()


@pytest.mark.parametrize("keep", [0.1, 0.37, 0.6, 0.8, 0.95, 0.999])
def test_rank_mapping_matches_obdk_uniform(keep):
    shapes = [(64, 64), (32, 64), (160, 64), (64, 160), (576, 1536), (4096, 11008), (192, 576)]
    specs = [MatrixSpec(f"m{i}", m, n) for i, (m, n) in enumerate(shapes)]
    alloc = allocate_uniform(specs, keep, multiple=1)
    for s in specs:
        assert ref_impl.rank(s.m, s.n, keep, "match") == alloc.ranks[s.name]
        assert ref_impl.rank(s.m, s.n, keep, "floor") == max(1, int(s.m * s.n * keep / (s.m + s.n)))


def _run_benchmark(*args: str) -> None:
    """``python -m benchmarks.bench_decompose_latency ARGS`` from the repository root; fails on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_decompose_latency", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_benchmark_runs_end_to_end_on_tiny(tmp_path, data_dir):
    out = tmp_path / "lat.csv"
    _run_benchmark("--model", "tiny", "--nsamples", "2", "--seqlen", "32", "--keeps", "0.8", "0.6",
                   "--eval-windows", "1", "--eval-seqlen", "64", "--pipelines", "reference", "svd-llm",
                   "--threads", "1", "--data-dir", str(data_dir), "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    totals = {(r["pipeline"], r["keep"]): r for r in rows if r["kind"] == "total"}
    assert set(totals) == {("reference svd-llm", "0.8"), ("reference svd-llm", "0.6"),
                           ("obdk svd-llm", "0.8"), ("obdk svd-llm", "0.6")}
    for k in ("0.8", "0.6"):  # same parameter count for both
        assert totals[("reference svd-llm", k)]["params_after"] == totals[("obdk svd-llm", k)]["params_after"]
    assert float(totals[("obdk svd-llm", "0.6")]["marginal_frac"]) > 0
    stages = {r["stage"] for r in rows if r["pipeline"] == "obdk svd-llm" and r["run"] == "first"}
    assert {"calibration", "factorisation", "allocation", "truncation", "packing", "total"} <= stages
    assert all(float(r["ppl"]) > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0


def test_benchmark_runs_in_bf16_on_tiny(tmp_path, data_dir):
    """--dtype bf16: every pipeline runs the bf16 model (the reference's hooks still upcast to fp32)."""
    out = tmp_path / "lat_bf16.csv"
    _run_benchmark("--model", "tiny", "--dtype", "bf16", "--nsamples", "2", "--seqlen", "32", "--keeps", "0.8",
                   "--eval-windows", "1", "--eval-seqlen", "64", "--pipelines", "reference", "svd-llm", "obd",
                   "--threads", "1", "--data-dir", str(data_dir), "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert {r["model_dtype"] for r in rows} == {"bfloat16"}
    totals = {r["pipeline"]: r for r in rows if r["kind"] == "total"}
    assert set(totals) == {"reference svd-llm", "obdk svd-llm", "obdk obd"}
    assert totals["reference svd-llm"]["params_after"] == totals["obdk svd-llm"]["params_after"]
    assert all(0 < float(r["ppl"]) < float("inf") for r in rows)
