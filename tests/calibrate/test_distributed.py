"""Data-parallel calibration: 2 gloo processes on CPU equal one process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from obdk.calibrate.stats import Statistics, calibrate
from obdk.stream.distributed import all_agree, all_reduce_counts, shard, world
from tests.conftest import make_tiny_llama

N_WINDOWS, SEQ = 5, 12  # uneven split: rank 0 gets windows 0, 2, 4; rank 1 gets 1, 3


def _data():
    ids = torch.randint(0, 128, (N_WINDOWS, SEQ), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[3, :4] = 0  # one left-padded window
    return {"input_ids": ids, "attention_mask": mask}


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        assert world() == (rank, world_size)
        model = make_tiny_llama()
        emp = calibrate(model, _data(), stats=("cx", "cg", "grad"), batch_size=2, progress=False,
                        cache_dir=Path(out) / "cache")
        emp.save(Path(out) / f"emp{rank}")
        tf = calibrate(model, _data(), fisher="true", seed=3, progress=False)
        tf.save(Path(out) / f"true{rank}")
    finally:
        tdist.destroy_process_group()


def _assert_close(a: Statistics, b: Statistics, tol: float = 1e-5) -> None:
    assert (a.tokens, a.loss_tokens, a.windows) == (b.tokens, b.loss_tokens, b.windows)
    for kind in ("cx", "cg", "grad"):
        da, db = getattr(a, kind), getattr(b, kind)
        assert set(da) == set(db)
        for k in da:
            err = float((da[k].double() - db[k].double()).norm() / db[k].double().norm())
            assert err < tol, (kind, k, err)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # forked, as in test_distributed_stream.py: torch is imported here already, a spawn imports it again per rank
    mp.start_processes(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    model = make_tiny_llama()
    single = calibrate(model, _data(), stats=("cx", "cg", "grad"), progress=False)
    single_tf = calibrate(model, _data(), fisher="true", seed=3, progress=False)
    r0, r1 = Statistics.load(tmp_path / "emp0"), Statistics.load(tmp_path / "emp1")
    assert single.tokens == N_WINDOWS * SEQ - 4
    _assert_close(r0, single)
    _assert_close(r1, single)
    _assert_close(Statistics.load(tmp_path / "true0"), single_tf)  # labels seeded per window, not per rank
    _assert_close(Statistics.load(tmp_path / "true1"), single_tf)
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and entries[0].is_dir()  # rank 0 wrote the one entry, no partials left
    _assert_close(Statistics.load(entries[0]), single)


def test_helpers_without_a_process_group():
    assert world() == (0, 1)
    assert shard(7, 1, 3) == [1, 4] and shard(2, 0, 1) == [0, 1]
    with pytest.raises(ValueError, match="rank 3"):
        shard(4, 3, 2)
    assert all_reduce_counts([3, 4]) == [3, 4] and all_agree(True) and not all_agree(False)
