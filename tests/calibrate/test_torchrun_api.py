"""The same Python API script in one process and under ``torchrun`` (2 gloo processes) writes the same checkpoints.

The script (:data:`_SCRIPT`) is what a user writes: ``obdk.init_distributed()`` (a no-op in one process), load,
``obdk.prepare(..., stream=True)``, then ``Plan.save`` twice: the default ``obd`` (its ``zs+kfac`` correction runs
on every rank together, each owner stepping its own matrices) and ``correct="none"`` (rank 0 writes as one
process). Each rank records the report ``Plan.save`` returned to it. Statistics are fp32 here, so one and two
processes differ by the order of summation only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .test_distributed_stream import _rel, _torchrun

_SCRIPT = '''import json, sys
from pathlib import Path
import obdk
from obdk.stream.distributed import world

model_dir, calib, out = sys.argv[1:4]
obdk.init_distributed("cpu")  # under torchrun: the gloo group of every rank; in one process: nothing
model, tok = obdk.load_model(model_dir)
cfg = obdk.LowRankConfig(method="obd", alloc="global", keep=0.6, rank_multiple=2)
plan = obdk.prepare(model, cfg, calib, tokenizer=tok, nsamples=5, seqlen=16, stream=True, progress=False)
reports = {"default": plan.save(model, Path(out) / "default", tokenizer=tok),
           "none": plan.save(model, Path(out) / "none", tokenizer=tok, correct="none")}
rank, size = world()
Path(out, f"reports-{rank}.json").write_text(json.dumps(
    {"world": size, **{k: {"ranks": [m.rank for m in r.modules], "predicted": r.predicted_loss,
                           "correct": r.config["correct"]} for k, r in reports.items()}}))
'''


def _tensors(d: Path) -> dict:
    return load_file(d / "model.safetensors")


@pytest.mark.slow
def test_python_script_under_torchrun_writes_the_one_process_checkpoints(cli_inputs, tmp_path):
    import subprocess

    from .test_distributed_stream import REPO
    d, calib = cli_inputs
    script = tmp_path / "compress.py"
    script.write_text(_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    res = subprocess.run([sys.executable, str(script), str(d), str(calib), str(one)], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(2, [str(script)], [str(d), str(calib), str(two)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r1 = json.loads((one / "reports-0.json").read_text())
    got = [json.loads((two / f"reports-{r}.json").read_text()) for r in (0, 1)]
    assert r1["world"] == 1 and [g["world"] for g in got] == [2, 2]
    for kind, correct in (("default", "zs+kfac"), ("none", "none")):
        a, b = _tensors(one / kind), _tensors(two / kind)  # one checkpoint each, written by rank 0
        assert set(a) == set(b) and any(k.endswith("weight_a") for k in a)
        for k in a:
            assert a[k].shape == b[k].shape and _rel(b[k], a[k]) < 1e-4, (kind, k)
        for g in got:  # every rank returns rank 0's report
            assert g[kind]["ranks"] == r1[kind]["ranks"] and g[kind]["correct"] == correct
            assert abs(g[kind]["predicted"] - r1[kind]["predicted"]) <= 1e-4 * max(1.0, abs(r1[kind]["predicted"]))
        rep = json.loads((two / kind / "obdk_report.json").read_text())
        assert rep["config"]["correct"] == correct
    assert not [p for p in two.iterdir() if "obdk-tmp" in p.name or "obdk-old" in p.name]
