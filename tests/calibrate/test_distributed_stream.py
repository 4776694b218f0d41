"""Owner-rank reduce in the layer-streamed pipeline: 2 and 3 gloo processes equal one process (fp64).

Every rank streams the same layer over its own windows (``i % W == rank``); a finished layer's statistics
are reduced to each group's owner only, which decomposes them; every rank then holds every eigenvalue
and rank 0 every factor (``obdk.stream.distributed.share_spectra``). The model is a 3-layer tiny Llama
in float64 with float64 accumulators (``calibrate_streamed(dtype=torch.float64)``), so one process and W
processes differ only by the order of summation: equal to 1e-10 relative.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from obdk.calibrate.data import CalibrationData
from obdk.config import LowRankConfig
from obdk.models import linear_groups
from obdk.nn import LowRankLinear
from obdk.pipeline import prepare
from obdk.stream import distributed as dist
from obdk.testing import make_tiny_llama

N_WINDOWS, SEQ, LAYERS = 7, 12, 3  # 7 windows on 2 ranks: 4 + 3; on 3 ranks: 3 + 2 + 2
CFG = LowRankConfig(method="obd", correct="none", alloc="global", keep=0.6, rank_multiple=2,
                    compute_dtype="float64")
TOL = 1e-10
REPO = Path(__file__).resolve().parents[2]


def _model():
    return make_tiny_llama(layers=LAYERS).double()


def _data() -> CalibrationData:
    ids = torch.randint(0, 128, (N_WINDOWS, SEQ), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0  # left-padded windows: on rank 0 of 2, rank 2 of 3 / rank 1 of 2, rank 2 of 3
    mask[5, :3] = 0
    return CalibrationData(ids, mask)


def _run(out: Path, rank: int) -> None:
    """prepare(stream=True) with fp64 accumulators, then what each rank holds, saved to ``out/r{rank}.pt``."""
    import obdk.calibrate.stream as S
    orig, infos = S.calibrate_streamed, []

    def f64(*a, **kw):  # float64 accumulators (prepare uses float32); the run's info kept
        kw["dtype"] = torch.float64
        infos.append(kw.setdefault("info", {}))
        return orig(*a, **kw)

    model = _model()
    S.calibrate_streamed = f64
    try:
        plan = prepare(model, CFG, _data(), stream=True, progress=False, calib_batch_size=2)
    finally:
        S.calibrate_streamed = orig
    res = {"eig": {n: sp.eigenvalues.cpu() for n, sp in plan.spectra.items()},
           "meta": {n: (sp.numerical_rank, sp.kept, dict(sp.damping), sp.factor_b.shape, sp.factor_a.shape)
                    for n, sp in plan.spectra.items()},
           "ranks": plan.allocate().ranks, "info": infos[0],
           "devices": {n: sp.factor_b.device.type for n, sp in plan.spectra.items()}}
    if rank == 0:
        res["factors"] = {n: (sp.factor_b, sp.factor_a) for n, sp in plan.spectra.items()}
        with dist.alone():
            plan.apply(model)
        res["lowrank"] = {n: (m.weight_a.detach(), m.weight_b.detach()) for n, m in model.named_modules()
                          if isinstance(m, LowRankLinear)}
    torch.save(res, out / f"r{rank}.pt")


def _worker(rank: int, world_size: int, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)
    try:
        _run(Path(out), rank)
    finally:
        tdist.destroy_process_group()


def _start(fn, world_size: int, out: Path) -> None:
    """Run ``fn(rank, world_size, out)`` in ``world_size`` processes; forked (torch and transformers are already
    imported here: a spawn would import them again in each child, most of these tests' time)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(fn, args=(world_size, str(out)), nprocs=world_size, join=True, start_method="fork")


def _failing_worker(rank: int, world_size: int, out: str) -> None:
    """Rank 1 raises inside on_layer; every rank writes what it raised and when (no torchrun to tear down)."""
    import datetime
    import json
    import time

    from obdk.calibrate.stream import calibrate_streamed
    from obdk.errors import DataError, ObdkError
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size,
                             timeout=datetime.timedelta(seconds=30))
    t0 = time.perf_counter()

    def on_layer(i, part):
        if rank == 1:
            raise DataError(f"a bad tensor in layer {i} on rank 1")

    try:
        calibrate_streamed(_model(), _data(), stats=("cx", "cg"), on_layer=on_layer, reduce="owner", progress=False)
        msg = "finished"
    except ObdkError as e:
        msg = f"{type(e).__name__}: {e}"
    Path(out, f"err{rank}.json").write_text(json.dumps({"msg": msg, "seconds": time.perf_counter() - t0}))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_failing_mid_sweep_fails_the_others_without_hanging(tmp_path):
    import json
    _start(_failing_worker, 2, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"err{r}.json").read_text()) for r in range(2))
    assert r1["msg"] == f"DataError: a bad tensor in layer {LAYERS - 1} on rank 1"
    # rank 0 fails at its next collective, as soon as rank 1's connection closes (at the latest the 30 s timeout)
    assert r0["msg"].startswith("CollectiveError: the reduce of ") and "failed on rank 0" in r0["msg"], r0
    assert r0["seconds"] < 30, r0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out, 0)
    return torch.load(out / "r0.pt", weights_only=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_owner_reduce_equals_one_process(world_size, single, tmp_path):
    _start(_worker, world_size, tmp_path)
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(world_size)]
    names = list(single["eig"])
    for r, g in enumerate(got):
        assert list(g["eig"]) == names  # every target, in forward order, on every rank
        for n in names:
            assert _rel(g["eig"][n], single["eig"][n]) < TOL, (r, n)
            assert g["meta"][n] == single["meta"][n], (r, n)
        assert g["ranks"] == single["ranks"], r  # the global allocation, run on every rank
        # only the writer holds factors; the others hold their shapes on the meta device
        assert set(g["devices"].values()) == ({"cpu"} if r == 0 else {"meta"}), r
    for n in names:
        for f, s in zip(got[0]["factors"][n], single["factors"][n]):
            assert _rel(f, s) < TOL, n
    assert set(got[0]["lowrank"]) == set(single["lowrank"]) and got[0]["lowrank"]
    for n, (a, b) in single["lowrank"].items():
        assert _rel(got[0]["lowrank"][n][0], a) < TOL and _rel(got[0]["lowrank"][n][1], b) < TOL, n

    # owners: every group has one, the same on every rank, and each rank owns some; the windows split 7 ways
    infos = [g["info"]["distributed"] for g in got]
    owners = infos[0]["owners"]
    assert all(i["owners"] == owners for i in infos) and set(owners.values()) == set(range(world_size))
    assert [i["windows"] for i in infos] == [len(range(r, N_WINDOWS, world_size)) for r in range(world_size)]
    # each accumulator travels once from every non-owner: Σ_ranks reduce_bytes = (W−1) × Σ accumulator bytes
    model = _model()
    groups = {g.key: g.names for g in linear_groups(model)}
    assert set(groups) == set(owners)
    acc = sum(model.get_submodule(ns[0]).in_features ** 2 + sum(model.get_submodule(n).out_features ** 2 for n in ns)
              for ns in groups.values()) * 8  # C_x [n, n] per group, C_g [m, m] per Linear, fp64
    assert sum(i["reduce_bytes"] for i in infos) == (world_size - 1) * acc
    # the factors travel once, owner → rank 0; rank 0 sends none
    fac = sum((b.numel() + a.numel()) * 8 for n, (b, a) in single["factors"].items() if owners[_key(groups, n)] != 0)
    assert infos[0]["share_bytes"] == 0 and sum(i["share_bytes"] for i in infos) == fac
    assert all(i["collectives"] > 0 and i["collective_seconds"] >= 0 for i in infos)


def _key(groups: dict, name: str) -> str:
    return next(k for k, ns in groups.items() if name in ns)


def test_owner_helpers_without_a_process_group():
    costs = [("a", 8), ("b", 5), ("c", 4), ("d", 3), ("e", 3)]
    assert dist.assign_owners(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    loads = [0, 0]
    dist.assign_owners(costs[:2], 2, loads)
    assert loads == [8, 5] and dist.assign_owners([("x", 1)], 2, loads) == {"x": 1}
    assert dist.assign_owners(costs, 1) == {k: 0 for k, _ in costs}
    assert dist.decomposition_cost(4, 8) == dist.decomposition_cost(8, 4) == 4 ** 3 + 4 * 64
    assert dist.share_spectra({"x": 1}, {}) == {"x": 1}
    dist.reduce_sum_(torch.ones(2), 0)  # no group: no-op
    with dist.alone():
        assert dist.world() == (0, 1)
    with pytest.raises(ValueError, match="world_size 0"):
        dist.assign_owners(costs, 0)


# --------------------------------------------------------------------------- through torchrun and the CLI

_FAULT = '''import os, sys
import obdk.decompose.schedule as schedule
from obdk.errors import DataError
if os.environ["RANK"] == "1":  # the first decomposition rank 1 owns fails
    def boom(*a, **k):
        raise DataError("injected failure while decomposing on this rank")
    schedule.decompose_targets = boom
from obdk.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _cli_args(model_dir: Path, calib: Path, out: Path) -> list[str]:
    return ["compress", str(model_dir), "--calib", str(calib), "--nsamples", "5", "--seqlen", "16", "--stream",
            "--method", "obd", "--correct", "none", "--alloc", "global", "--keep", "0.6", "--rank-multiple", "2",
            "--dist-timeout", "120", "--out", str(out)]


def _torchrun(nproc: int, target: list[str], args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.2", *target, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_compress_equals_one_process(cli_inputs, tmp_path):
    import json

    from safetensors.torch import load_file

    from obdk.cli import main
    d, calib = cli_inputs
    assert main(_cli_args(d, calib, tmp_path / "one")) == 0
    res = _torchrun(2, ["-m", "obdk"], _cli_args(d, calib, tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(one) == set(two) and any(k.endswith("weight_a") for k in one)
    for k in one:  # fp32 statistics here: the order of summation differs between 1 and 2 processes
        assert one[k].shape == two[k].shape and _rel(two[k], one[k]) < 1e-4, k
    rep1 = json.loads((tmp_path / "one" / "obdk_report.json").read_text())
    rep2 = json.loads((tmp_path / "two" / "obdk_report.json").read_text())
    assert [m["rank"] for m in rep1["modules"]] == [m["rank"] for m in rep2["modules"]]
    per_rank = rep2["cli"]["distributed"]
    assert [r["rank"] for r in per_rank] == [0, 1] and "distributed" not in rep1["cli"]
    assert all(r["reduce_bytes"] > 0 and r["collective_seconds"] >= 0 and r["peak_rss_mib"] > 0 for r in per_rank)
    assert per_rank[0]["share_bytes"] == 0 < per_rank[1]["share_bytes"]


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_and_writes_nothing(cli_inputs, tmp_path):
    d, calib = cli_inputs
    driver = tmp_path / "fault.py"
    driver.write_text(_FAULT)
    out = tmp_path / "out"
    res = _torchrun(2, [str(driver)], _cli_args(d, calib, out), timeout=90)
    assert res.returncode != 0
    err = res.stderr + res.stdout
    assert "obdk compress: error (rank 1 of 2): " in err and "injected failure while decomposing" in err, err[-3000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "obdk-tmp" in p.name]
