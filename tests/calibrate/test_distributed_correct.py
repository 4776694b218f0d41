"""Owner-rank reduce with the corrections: 2 and 3 gloo processes equal one process (fp64).

Default ``obd`` (global allocation, ``zs+kfac``) and ``zs-svd`` with ``correct="zs"`` (zero-sum allocation: each
owner's δ scores all-gathered), streamed: each rank keeps only the statistics of the matrices it owns; every rank
runs the corrections together (each gradient pass sharded over the ranks, each ``∂L/∂W`` reduced to its owner,
which steps it; the corrected factors broadcast to every rank).
The same tiny fp64 Llama and 7 padded windows as ``test_distributed_stream.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from obdk.config import LowRankConfig
from obdk.nn import LowRankLinear
from obdk.pipeline import prepare
from obdk.stream import distributed as dist

from .test_distributed_stream import _cli_args, _data, _model, _rel, _start, _torchrun

CFGS = {"obd": LowRankConfig(method="obd", keep=0.6, rank_multiple=2, compute_dtype="float64"),
        "zs-svd": LowRankConfig(method="zs-svd", correct="zs", keep=0.6, compute_dtype="float64")}
TOL = 1e-9


def _run(out: Path, rank: int, method: str) -> None:
    """prepare(stream=True) + apply on this rank (every rank together under a group), saved to ``out/r{rank}.pt``."""
    import obdk.calibrate.stream as S
    orig = S.calibrate_streamed

    def f64(*a, **kw):  # float64 accumulators in the calibration (prepare uses float32)
        kw["dtype"] = torch.float64
        return orig(*a, **kw)

    model = _model()
    S.calibrate_streamed = f64
    try:
        plan = prepare(model, CFGS[method], _data(), stream=True, progress=False, calib_batch_size=2)
    finally:
        S.calibrate_streamed = orig
    t0 = dist.traffic()
    rep = plan.apply(model)
    t1 = dist.traffic()
    res = {"modules": list(plan.stats.modules), "nbytes": plan.stats.nbytes(),
           "ranks": {m.name: m.rank for m in rep.modules}, "pred": {m.name: m.predicted_loss for m in rep.modules},
           "damping": {m.name: m.damping for m in rep.modules},
           "lowrank": {n: (m.weight_a.detach(), m.weight_b.detach()) for n, m in model.named_modules()
                       if isinstance(m, LowRankLinear)},
           "logits": model(_data().input_ids).logits.detach(),
           "traffic": {k: t1[k] - t0[k] for k in t1}, "owners": plan.stream.owners if plan.stream else None}
    torch.save(res, out / f"r{rank}.pt")


def _worker(rank: int, world_size: int, out: str) -> None:
    torch.set_num_threads(1)
    method = Path(out, "method").read_text()
    tdist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)
    try:
        _run(Path(out), rank, method)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    res = {}
    for method in CFGS:
        out = tmp_path_factory.mktemp(f"single-{method}")
        _run(out, 0, method)
        res[method] = torch.load(out / "r0.pt", weights_only=False)
    return res


@pytest.mark.parametrize("method,world_size", [("obd", 2), ("obd", 3), ("zs-svd", 2), ("zs-svd", 3)])
def test_corrected_owner_reduce_equals_one_process(method, world_size, single, tmp_path):
    (tmp_path / "method").write_text(method)
    _start(_worker, world_size, tmp_path)
    one = single[method]
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(world_size)]
    assert one["lowrank"]
    for r, g in enumerate(got):  # every rank ends with the same compressed model as one process
        assert g["ranks"] == one["ranks"], r
        assert set(g["lowrank"]) == set(one["lowrank"]), r
        for n, (a, b) in one["lowrank"].items():
            assert _rel(g["lowrank"][n][0], a) < TOL and _rel(g["lowrank"][n][1], b) < TOL, (r, n)
        assert _rel(g["logits"], one["logits"]) < TOL, r
        for n, p in one["pred"].items():
            assert abs(g["pred"][n] - p) <= TOL * max(1.0, abs(p)), (r, n)
            assert g["damping"][n].keys() == one["damping"][n].keys(), (r, n)
    # each rank kept only the statistics of the matrices it owns: together exactly one process's
    owners = got[0]["owners"]
    assert set(owners.values()) == set(range(world_size))
    mods = [set(g["modules"]) for g in got]
    assert set().union(*mods) == set(one["modules"]) and sum(map(len, mods)) == len(one["modules"])
    assert sum(g["nbytes"] for g in got) == one["nbytes"]
    # apply's traffic: rank 0 broadcasts the truncated factors once; each step's owners broadcast theirs
    fac = sum((a.numel() + b.numel()) * 8 for a, b in one["lowrank"].values())
    steps = len(CFGS[method].resolved_correct.split("+"))
    assert sum(g["traffic"]["broadcast_bytes"] for g in got) == (1 + steps) * fac
    assert all(g["traffic"]["reduce_bytes"] > 0 for g in got[1:])
    assert got[0]["traffic"]["share_bytes"] == 0


def test_a_distributed_plan_refuses_a_correction_on_one_rank(tmp_path):
    from obdk.correct.steps import check_world
    from obdk.errors import ConfigError
    from obdk.stream import HostBudget, Streaming
    with pytest.raises(ConfigError, match="prepared by 2 ranks"):
        check_world(Streaming(HostBudget(), owners={"x": 1}, world=2))
    check_world(Streaming(HostBudget(), owners={}, world=1))


@pytest.mark.slow
def test_torchrun_compress_default_method_equals_one_process(cli_inputs, tmp_path):
    from safetensors.torch import load_file

    from obdk.cli import main
    d, calib = cli_inputs
    args = lambda out: [a for a in _cli_args(d, calib, out)  # noqa: E731  (the default method: obd, zs+kfac)
                        if a not in ("--method", "obd", "--correct", "none", "--alloc", "global")]
    assert main(args(tmp_path / "one")) == 0
    res = _torchrun(2, ["-m", "obdk"], args(tmp_path / "two"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(one) == set(two) and any(k.endswith("weight_a") for k in one)
    for k in one:  # fp32 statistics: the order of summation differs between 1 and 2 processes
        assert one[k].shape == two[k].shape and _rel(two[k], one[k]) < 1e-4, k
    rep1 = json.loads((tmp_path / "one" / "obdk_report.json").read_text())
    rep2 = json.loads((tmp_path / "two" / "obdk_report.json").read_text())
    assert rep2["config"]["correct"] == "zs+kfac" == rep1["config"]["correct"]
    assert [m["rank"] for m in rep1["modules"]] == [m["rank"] for m in rep2["modules"]]
    per_rank = rep2["cli"]["distributed"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert per_rank[0]["broadcast_bytes"] > 0 and per_rank[1]["broadcast_bytes"] > 0
