"""benchmarks/gpu_suite.sh --dry-run: the prepared H200 run, every step on CPU with tiny sizes.

The dry run executes the suite's own step list (setup, the build step's check, both pytest steps,
the benchmarks through ``python -m benchmarks.<name>``, obdk's compiled decode among them) with the
CPU flags, so a renamed flag, a broken import or a step that writes no CSV fails here rather than
on the device.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    from obdk import _ext
    if not _ext.loaded():
        pytest.skip(f"obdk._C not built ({_ext.load_error}); the dry run checks it loads")
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHON"] = sys.executable  # the suite's default is the image's python3; here, this environment's
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(out), "--budget", "300"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - t0
    log = (out / "suite.log").read_text() if (out / "suite.log").exists() else r.stdout + r.stderr
    steps = {row["step"]: row for row in csv.DictReader(open(out / "suite_steps.csv"))}
    assert r.returncode == 0, f"dry run failed: {steps}\n{log[-4000:]}"
    want = ["setup", "build", "pytest-triton", "pytest-cuda", "lowrank-decode", "lowrank-prefill", "calibration",
            "generate", "generate-compiled", "decompose"]
    assert sorted(steps) == sorted(want), steps
    data = Path(env.get("OBDK_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2-raw" / "wiki.test.raw"
    for name, row in steps.items():
        if name == "decompose" and not data.exists():
            assert row["status"] == "skipped-no-data"
            continue
        # on CPU every GPU test is skipped or deselected: pytest exits 0 (some skipped) or 5 (none selected)
        assert row["status"] in ("ok", "ok-none-selected"), (name, row, log[-3000:])
    # every benchmark wrote its rows, one file per benchmark, and at most 8 files in all (the device's limit)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files

    def rows(name):
        with open(out / name) as f:
            return list(csv.DictReader(f))

    op = rows("lowrank_op_cpu-dry.csv")
    assert {r["M"] for r in op} == {"1", "128"}
    assert {"dense", "two_mm", "op"} <= {r["provider"] for r in op}
    assert all(float(r["median_us"]) > 0 for r in op)
    gen = rows("generate_cpu-dry.csv")
    assert {r["variant"] for r in gen} == {"dense", "keep0.6", "keep0.6+packed"}
    # obdk's own decode path compiled (static cache + torch.compile; CUDA graphs on the GPU): dense vs keep 0.6
    assert {(r["variant"], r["compile"]) for r in gen if r["compile"]} == {("dense", "eager"), ("keep0.6", "eager")}
    cal = rows("calibration_cpu-dry.csv")
    assert len(cal) == 1 and cal[0]["model"] == "tiny" and float(cal[0]["obdk_s"]) > 0
    if data.exists():
        dec = rows("decompose_latency_cpu-dry.csv")
        assert {"reference svd-llm", "obdk svd-llm", "obdk obd"} <= {r["pipeline"] for r in dec}
    assert "budget 300s" in log
    print(f"dry run: {wall:.0f} s; steps: {[(k, v['seconds']) for k, v in steps.items()]}")
