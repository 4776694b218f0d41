"""The Triton kernels of ``kernels/`` compile for Hopper (sm_90a) with no GPU, within its resources.

The interpreter tests check what the kernels compute; these check what the compiler makes of
them for the H200 (``benchmarks/triton_sm90_resources.py`` does the compiling):

* every autotune config of every kernel, in its heaviest launcher variant (grouped expand with
  bias; bf16 for every config, fp16/fp32 for the first), plus each Gram configuration
  ``pick_config`` can return, compiles with the installed Triton; none needs more shared memory
  than an sm_90 block can have (227 KB), none spills (``SPILL_NOTES`` lists the spills judged
  harmless: none at present), the 16-bit prefill GEMMs issue ``wgmma`` and the decode path
  streams its factors with 128-bit loads;
* the same with Triton 3.6 (the H200 image's), when the venv of ``make triton36-venv`` exists
  (``OBDK_TRITON36_PYTHON`` names another interpreter); skipped with the reason otherwise;
* the committed table ``benchmarks/results/triton_sm90_resources.csv`` covers every config of
  ``kernels/lowrank.py`` for every Triton version it lists, and its rows satisfy the same rules
  (so a config added without regenerating the table fails here), and the rows of this Triton
  version match what was just compiled.

The compiles run in a subprocess (2 processes, no SASS dump) so this session's Triton state and
``TRITON_INTERPRET`` stay untouched; about 30 s for one Triton version on 2 cores.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "benchmarks" / "results" / "triton_sm90_resources.csv"
sys.path.insert(0, str(REPO))
from benchmarks import triton_sm90_resources as res  # noqa: E402

TRITON36 = Path(os.environ.get("OBDK_TRITON36_PYTHON", REPO.parent / "venvs" / "triton36" / "bin" / "python"))


def _python_triton_version(python: str) -> str | None:
    r = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _compile_quick(python: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / "rows.csv"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    r = subprocess.run([python, "-m", "benchmarks.triton_sm90_resources", "--quick", "--no-sass", "--jobs", "2",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 2:
        pytest.skip(f"triton cannot compile for sm_90a here: {r.stderr.strip()}")
    assert out.exists(), f"no table written (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    rows = list(csv.DictReader(open(out)))
    assert r.returncode == 0, f"sm_90a compile check failed:\n{r.stderr}\n{r.stdout}"
    return rows


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        name = f"{r['kernel']} {r['path']} {r['dtype']} {r['variant']} {r['config']} w{r['num_warps']}s{r['num_stages']}"
        assert not r["note"].startswith("COMPILE ERROR"), name + ": " + r["note"]
        assert 0 < int(r["registers"]) <= res.MAX_REGS, name
        assert int(r["smem_bytes"]) <= res.SM90_MAX_SMEM, f"{name}: {r['smem_bytes']} B shared memory"
        spill = int(r["spill_stores"]) + int(r["spill_loads"])
        if spill:
            assert (r["kernel"], r["path"], r["variant"], r["config"]) in res.SPILL_NOTES, f"{name}: unexplained spill"
            assert "spill harmless" in r["note"], name
        if r["path"].startswith("prefill") and r["dtype"] in ("fp16", "bf16") and not r["variant"].startswith("unaligned"):
            assert int(r["wgmma_ptx"]) > 0 and r["mma"] == "wgmma", f"{name}: 16-bit prefill GEMM without wgmma"
        if r["path"].startswith("prefill") and r["dtype"] == "fp32":
            assert r["mma"] == "fma", f"{name}: fp32 ieee GEMM should not use tensor cores ({r['mma']})"
        if r["path"] in ("decode-shrink", "decode-expand") and "G" not in r["variant"]:
            # the factor streamed at decode (a in the shrink, b in the expand) moves in 16-byte pieces.
            # Not so in the grouped expand (G2/G3): its B offsets and strides come from META at run
            # time, so Triton cannot prove alignment and loads narrower pieces (the CSV's note says so).
            assert int(r["ld_v4"]) + int(r["cp_async_16"]) > 0, f"{name}: no 128-bit loads"
            # a few narrow ones move the tiny x / t tile (16 rows, M of them real), never the factor
            assert int(r["cp_async_narrow"]) + int(r["ld_narrow"]) <= 8, f"{name}: loads narrower than 16 bytes"


def test_quick_variants_cover_every_config():
    """The CI subset still compiles every autotune config of every kernel at least once."""
    lk = res._load_module("lowrank")
    quick = res.all_variants(quick=True)
    full = res.all_variants()
    assert {v.name for v in quick} <= {v.name for v in full}
    for kernel, paths, configs, names in (
            ("_nt_kernel", ("prefill-gemm1", "prefill-gemm2"), lk._PREFILL_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            ("_nt_kernel", ("decode-expand",), lk._EXPAND_DECODE_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            ("_down_splitn_kernel", ("decode-shrink",), lk._DOWN_CONFIGS, ("BLOCK_R", "BLOCK_K", "SPLIT_K"))):
        want = {(res._key(c.kwargs, names), c.num_warps, c.num_stages) for c in configs}
        got = {(v.config_key, v.num_warps, v.num_stages) for v in quick if v.kernel == kernel and v.path in paths}
        path = paths
        assert want == got, (kernel, path, want ^ got)
    assert {v.dtype for v in quick} == {"fp16", "bf16", "fp32"}
    assert {v.kernel for v in quick} == {"_nt_kernel", "_down_splitn_kernel", "_gram_tile_kernel", "_gram_reduce_kernel"}


def test_sm90_compile_installed_triton(tmp_path):
    why = res.can_compile()
    if why:
        pytest.skip(f"triton cannot compile for sm_90a here: {why}")
    rows = _compile_quick(sys.executable, tmp_path)
    _check_rows(rows)
    assert len(rows) == len(res.all_variants(quick=True))
    import triton
    # the committed table's rows for this Triton version were made by the same compiler
    committed = {(r["kernel"], r["path"], r["dtype"], r["variant"], r["config"], r["num_warps"], r["num_stages"]): r
                 for r in csv.DictReader(open(TABLE)) if r["source"] == f"triton-{triton.__version__}"}
    if not committed:
        pytest.skip(f"the committed table has no rows for triton {triton.__version__}")
    for r in rows:
        key = (r["kernel"], r["path"], r["dtype"], r["variant"], r["config"], r["num_warps"], r["num_stages"])
        assert key in committed, f"{key} missing from {TABLE.name}: regenerate it (python -m benchmarks.triton_sm90_resources)"
        c = committed[key]
        for col in ("registers", "stack_bytes", "smem_bytes", "wgmma_ptx", "spill_stores"):
            assert r[col] == c[col], f"{key}: {col} {r[col]} now, {c[col]} in {TABLE.name}: regenerate it"


def test_sm90_compile_triton36(tmp_path):
    if not TRITON36.exists():
        pytest.skip(f"no Triton 3.6 venv at {TRITON36} (make triton36-venv creates it, ~10 s)")
    version = _python_triton_version(str(TRITON36))
    if version is None or not version.startswith("3.6"):
        pytest.skip(f"{TRITON36} has triton {version}, not 3.6")
    _check_rows(_compile_quick(str(TRITON36), tmp_path))


def test_committed_table():
    """Every config of kernels/lowrank.py is in the table for every Triton version, within the rules."""
    rows = list(csv.DictReader(open(TABLE)))
    assert set(rows[0]) == set(res.COLUMNS)
    triton_rows = [r for r in rows if r["source"].startswith("triton-")]
    _check_rows(triton_rows)
    versions = {r["source"] for r in triton_rows}
    assert {"triton-3.6.0"} <= versions, versions
    full = res.all_variants()
    want = {(v.kernel, v.path, v.dtype, v.variant, v.config_key, str(v.num_warps), str(v.num_stages)) for v in full}
    for src in versions:
        got = {(r["kernel"], r["path"], r["dtype"], r["variant"], r["config"], r["num_warps"], r["num_stages"])
               for r in triton_rows if r["source"] == src}
        assert want <= got, f"{src}: {len(want - got)} variants missing from {TABLE.name}, e.g. {sorted(want - got)[:3]}"
        assert all(r["git_sha"] and r["date"] and r["tool_version"] for r in triton_rows if r["source"] == src)
    for r in rows:
        if r["source"] == "nvcc":
            if int(r["spill_stores"]) or int(r["spill_loads"]):
                assert (r["kernel"], r["variant"]) in res.NVCC_SPILL_NOTES and "spill known" in r["note"], r
            assert int(r["smem_bytes"]) <= res.SM90_MAX_SMEM, r
