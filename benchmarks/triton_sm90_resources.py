"""Ahead-of-time compile of every Triton kernel of ``kernels/`` for Hopper (sm_90a), no GPU needed.

For every kernel, every config its launcher can select (the autotune lists of
``kernels/lowrank.py``, the heuristic table of ``kernels/gram.py``) and every dtype / constexpr
variant the launchers pass (fp16, bf16, fp32; bias on/off; grouped G=2 (gate/up) and G=3 (q/k/v);
split / fp64 accumulator for the Gram kernels), this compiles with

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=...)

and reads the resources: registers, stack frame, spill stores/loads (ptxas ``-v``, which Triton
runs; and ``cuobjdump --dump-resource-usage`` of the cubin), shared memory (the launch's dynamic
shared memory from the compiled metadata), the matrix instructions (``wgmma`` in the PTX,
``HGMMA`` / ``HMMA`` in the SASS) and the global loads (128-bit ``ld.global.v4`` and 16-byte
``cp.async`` against narrower ones).

The specialisation is the one the runtime JIT gives the launchers' real calls: pointers 16-byte
aligned, integer arguments that are multiples of 16 marked divisible by 16, integers equal to 1
turned into constants (the unit inner strides of the Gram kernel; M = 1 on the decode path,
single-sequence decoding), for Llama-7B-shaped problems (n = 4096, m = 4096 or 11008, rank 1024,
2048 prefill tokens). Shapes whose rank or width is not a multiple of 16 get other code (no
divisibility hint); the ``unaligned`` variant of the prefill GEMM shows that case once.

Run from the repository root:

    python -m benchmarks.triton_sm90_resources              # all variants, this triton
    /work/venvs/triton36/bin/python -m benchmarks.triton_sm90_resources   # the same with triton 3.6
    python -m benchmarks.triton_sm90_resources --nvcc-log build/cuda/build.log --nvcc-version 13.0

Each run replaces the rows of its own ``source`` (``triton-<version>`` or ``nvcc``) in
``benchmarks/results/triton_sm90_resources.csv`` and keeps the others. Exit status 1 when a
variant fails to compile or needs more shared memory than an sm_90 block can have (227 KB), or
when a spill is not explained in ``SPILL_NOTES``. ``--quick`` compiles the subset the CI test uses
and writes nothing unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
CSV_PATH = REPO / "benchmarks" / "results" / "triton_sm90_resources.csv"
#: Largest shared memory one block can have on sm_90 (opt-in, cudaFuncSetAttribute): 227 KB.
SM90_MAX_SMEM = 227 * 1024
#: Registers a thread can have at most; a kernel at this count has likely been capped.
MAX_REGS = 255

# Spills that were looked at and found harmless: (kernel, path, variant, config) -> reason. A spill
# not listed here fails the run. The configs of kernels/lowrank.py that spilled were dropped or
# retuned, or are pruned for the kind of call they spill in (lowrank._SPILLING).
SPILL_NOTES: dict[tuple[str, str, str, str], str] = {
    ("_gram_tile_kernel", "gram-tile", "nosplit+acc64", "128x128x64"):
        "fp64 accumulator only: 100 B (triton 3.9) / 472 B (3.6) spilled in the fp64 symmetric epilogue "
        "(SASS: every STL/LDL follows the token loop), once per thread per tile",
    ("_gram_reduce_kernel", "gram-reduce", "acc64", "128x128"):
        "fp64 accumulator only: 36 B (triton 3.9) / up to 256 B of stack (3.6) in the straight-line fp64 "
        "epilogue (SASS: the STL/LDL all follow the split loop), once per thread per tile",
}
for _path, _var in (("prefill-gemm1", "plain"), ("prefill-gemm2", "plain"), ("prefill-gemm2", "bias")):
    SPILL_NOTES[("_nt_kernel", _path, _var, "128x128x64")] = (
        "fp32 (ieee FMA) under triton 3.6 only: one 4-byte STL/LDL pair per 64-deep k-step, against "
        "64x64 FMAs per thread per step (SASS); triton 3.9 does not spill")
    SPILL_NOTES[("_nt_kernel", _path, _var, "64x128x64")] = (
        "fp32 (ieee FMA) under triton 3.6 only: 3 STL + 3 LDL of 4 bytes per 64-deep k-step, against "
        "32x64 FMAs per thread per step (SASS); triton 3.9 does not spill")
# The same for the CUDA extension's kernels (ptxas -v of .ci/cuda_build.sh): (kernel, template args).
NVCC_SPILL_NOTES: dict[tuple[str, str], str] = {
    ("lowrank_expand", "__half, 4, 8"):
        "fp16, 3-4 rows only, nvcc 13.0: acc[w][2..3] kept in an 8-byte stack frame, 2 LDL + 2 STL (L1) per "
        "k-step beside 4 LDG.128 of b; small next to the HBM stream but not free: to fix in csrc/cuda",
}

COLUMNS = [
    "source", "tool_version", "kernel", "path", "dtype", "variant", "config", "num_warps", "num_stages",
    "registers", "stack_bytes", "spill_stores", "spill_loads", "local_bytes", "smem_bytes", "smem_ok",
    "mma", "wgmma_ptx", "hgmma_sass", "hmma_sass", "ld_v4", "cp_async_16", "ld_narrow", "cp_async_narrow",
    "compile_s", "note", "git_sha", "date",
]


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One compile: a kernel, the argument values its launcher passes, a config."""
    module: str                  # "lowrank" / "gram"
    kernel: str                  # function name in the module
    path: str                    # prefill-gemm1, prefill-gemm2, decode-shrink, decode-expand, gram-tile, gram-reduce
    dtype: str                   # the input dtype (fp16 / bf16 / fp32)
    variant: str                 # the constexpr variant, e.g. "bias", "G3+bias", "split+acc64"
    args: dict                   # runtime argument name -> ("ptr", elem) | ("int", value) | ("fp32", value)
    constexprs: dict             # constexpr name -> value (launcher flags and config block sizes)
    num_warps: int
    num_stages: int
    options: dict = field(default_factory=dict)   # extra compile options the launcher passes
    config_key: str = ""         # the config's block sizes, for the table and SPILL_NOTES
    quick: bool = False          # in the CI subset

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.path}/{self.dtype}/{self.variant}/{self.config_key}/w{self.num_warps}s{self.num_stages}"


_TY = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64", "i32": "i32", "i64": "i64"}


def _load_module(name: str):
    """Import kernels/<name>.py as a private module with compiled (not interpreted) kernels;
    ``TRITON_INTERPRET`` is unset while it is defined and restored afterwards."""
    mod_name = f"_obdk_sm90_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(mod_name, REPO / "kernels" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    if getattr(mod, "interpreted", lambda: False)():
        raise RuntimeError(f"kernels/{name}.py was defined under the Triton interpreter")
    sys.modules[mod_name] = mod
    return mod


def _cfg_parts(c) -> tuple[dict, int, int]:
    return dict(c.kwargs), c.num_warps, c.num_stages


def _key(d: dict, names) -> str:
    return "x".join(str(d[n]) for n in names)


def _selectable(lk, v: "Variant") -> bool:
    """Whether the autotuner can pick ``v``'s config for ``v``'s call: kernels/lowrank.py prunes,
    per kind of call, the configs of ``_nt_kernel`` that spill (``_SPILLING``)."""
    if v.kernel != "_nt_kernel" or not hasattr(lk, "_SPILLING"):
        return True
    c = v.constexprs
    kind = lk._call_kind(G=c["G"], PREC=c["PREC"], aligned=not v.variant.startswith("unaligned"))
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], v.num_warps, v.num_stages) not in lk._SPILLING.get(kind, set())


def _quick(v: "Variant", first: dict) -> bool:
    """The CI subset: every config of every kernel once in its main call (bf16), the grouped expands'
    selectable configs, one fp16 and one fp32 variant per path, each Gram configuration once."""
    if v.kernel == "_nt_kernel":
        if v.dtype == "bf16":
            return (v.path == "prefill-gemm1" and v.variant == "plain") or v.variant in ("M1", "M1+G3+bias", "G3+bias")
        return v.variant in ("plain", "M1") and first.setdefault((v.path, v.dtype), v.name) == v.name
    if v.kernel == "_down_splitn_kernel":
        return v.dtype == "bf16" or first.setdefault((v.path, v.dtype), v.name) == v.name
    if v.kernel == "_gram_tile_kernel":
        big = v.config_key.startswith("128")
        return (v.variant == "nosplit" and not (big and v.dtype == "fp16")) or (v.variant == "split" and v.dtype == "bf16" and big)
    return v.variant == "acc32"


def lowrank_variants(lk) -> list[Variant]:
    """Every (config, dtype, flags) the launchers of kernels/lowrank.py can compile (after the
    launchers' autotuners prune, per kind of call, the configs known to spill)."""
    out: list[Variant] = []
    n, r, m_attn, m_mlp, M = 4096, 1024, 4096, 11008, 2048
    prec16 = "tf32"  # _prec(): the PREC argument for 16-bit inputs (unused by 16-bit dots)
    for dt in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else prec16
        # ---- prefill: GEMM 1 t = x aᵀ (t in x.dtype), GEMM 2 y = t bᵀ + bias (grouped or not)
        for ci, c in enumerate(lk._PREFILL_CONFIGS):
            kw, w, s = _cfg_parts(c)
            ck = _key(kw, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            flags = dict(UPCAST_A=False, UPCAST_B=False, PREC=prec)
            g1 = dict(A=("ptr", dt), B=("ptr", dt), C=("ptr", dt), BIAS=("ptr", dt), META=("ptr", dt),
                      M=("int", M), N=("int", r), K=("int", n), stride_am=("int", n), stride_bn=("int", n),
                      stride_cm=("int", r), M_BUCKET=("int", M))
            out.append(Variant("lowrank", "_nt_kernel", "prefill-gemm1", dt, "plain", g1,
                               dict(G=1, HAS_BIAS=False, **flags, **kw), w, s, config_key=ck, quick=dt == "bf16"))
            for variant, G, bias, N, meta in (("plain", 1, False, m_attn, None), ("bias", 1, True, m_attn, None),
                                              ("G2", 2, False, 2 * m_mlp, "i64"), ("G3+bias", 3, True, 3 * m_attn, "i64")):
                g2 = dict(A=("ptr", dt), B=("ptr", dt), C=("ptr", dt), BIAS=("ptr", dt),
                          META=("ptr", meta or dt), M=("int", M), N=("int", N), K=("int", r),
                          stride_am=("int", r), stride_bn=("int", 0 if G > 1 else r), stride_cm=("int", N),
                          M_BUCKET=("int", M))
                out.append(Variant("lowrank", "_nt_kernel", "prefill-gemm2", dt, variant, g2,
                                   dict(G=G, HAS_BIAS=bias, **flags, **kw), w, s, config_key=ck,
                                   quick=variant == "G3+bias" and (dt == "bf16" or ci == 0)))
            if dt != "fp32":
                # a rank that is a multiple of 8 but not 16: no divisibility hint on K and the strides
                ru = r + 8
                gu = dict(g1, N=("int", ru), stride_cm=("int", ru))
                gu2 = dict(A=("ptr", dt), B=("ptr", dt), C=("ptr", dt), BIAS=("ptr", dt), META=("ptr", dt),
                           M=("int", M), N=("int", m_attn), K=("int", ru), stride_am=("int", ru),
                           stride_bn=("int", ru), stride_cm=("int", m_attn), M_BUCKET=("int", M))
                if ci == 0:
                    out.append(Variant("lowrank", "_nt_kernel", "prefill-gemm1", dt, "unaligned-r", gu,
                                       dict(G=1, HAS_BIAS=False, **flags, **kw), w, s, config_key=ck))
                out.append(Variant("lowrank", "_nt_kernel", "prefill-gemm2", dt, "unaligned-r", gu2,
                                   dict(G=1, HAS_BIAS=True, **flags, **kw), w, s, config_key=ck))
        # ---- decode: shrink (split over n, fp32 t), expand y = t bᵀ + bias with t fp32
        for ci, c in enumerate(lk._DOWN_CONFIGS):
            kw, w, s = _cfg_parts(c)
            ck = _key(kw, ("BLOCK_R", "BLOCK_K", "SPLIT_K"))
            a = dict(X=("ptr", dt), A=("ptr", dt), WS=("ptr", "fp32"), T=("ptr", "fp32"), CNT=("ptr", "i32"),
                     M=("int", 1), N_IN=("int", n), R=("int", r), stride_xm=("int", n), stride_ar=("int", n))
            out.append(Variant("lowrank", "_down_splitn_kernel", "decode-shrink", dt, "M1", a,
                               dict(PREC=prec, UPCAST=False, BLOCK_M=lk._DECODE_BLOCK_M, **kw), w, s,
                               config_key=ck, quick=dt == "bf16" or ci == 0))
        for ci, c in enumerate(lk._EXPAND_DECODE_CONFIGS):
            kw, w, s = _cfg_parts(c)
            ck = _key(kw, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            upcast_b = dt != "fp32"
            flags = dict(UPCAST_A=False, UPCAST_B=upcast_b, PREC="tf32x3" if upcast_b else "ieee")
            for variant, G, bias, N, meta in (("M1", 1, False, m_attn, None), ("M1+bias", 1, True, m_attn, None),
                                              ("M1+G2", 2, False, 2 * m_mlp, "i64"),
                                              ("M1+G3+bias", 3, True, 3 * m_attn, "i64")):
                e = dict(A=("ptr", "fp32"), B=("ptr", dt), C=("ptr", dt), BIAS=("ptr", dt), META=("ptr", meta or dt),
                         M=("int", 1), N=("int", N), K=("int", r), stride_am=("int", r),
                         stride_bn=("int", 0 if G > 1 else r), stride_cm=("int", N), M_BUCKET=("int", 1))
                out.append(Variant("lowrank", "_nt_kernel", "decode-expand", dt, variant, e,
                                   dict(G=G, HAS_BIAS=bias, **flags, **kw), w, s, config_key=ck,
                                   quick=variant == "M1+G3+bias" and (dt == "bf16" or ci == 0)))
    return out


def gram_variants(gm) -> list[Variant]:
    """The configs pick_config can return on CUDA and the flags gram_acc_triton passes."""
    out: list[Variant] = []
    T = 2048
    seen = set()
    for dt, n in (("fp32", 4096), ("fp16", 1024), ("fp16", 4096), ("bf16", 1024), ("bf16", 4096)):
        # pick_config's table, without the SM-count-dependent split (both split settings are compiled)
        if dt == "fp32":
            block, block_k, warps, stages = 64, 32, 4, 3
        elif n >= 2048:
            block, block_k, warps, stages = 128, 64, 8, 3
        else:
            block, block_k, warps, stages = 64, 64, 4, 4
        nt = -(-n // block)
        tiles = nt * (nt + 1) // 2
        for split in (False, True):
            for acc64 in (False, True):
                per_split = 1024 if split else T
                args = dict(x_ptr=("ptr", dt), acc_ptr=("ptr", "fp64" if acc64 else "fp32"), ws_ptr=("ptr", "fp32"),
                            T=("int", T), N=("int", n), stride_xt=("int", n), stride_xn=("int", 1),
                            stride_a0=("int", n), stride_a1=("int", 1), alpha=("fp32", 1.0),
                            tokens_per_split=("int", per_split), num_tiles=("int", tiles))
                variant = ("split" if split else "nosplit") + ("+acc64" if acc64 else "")
                out.append(Variant("gram", "_gram_tile_kernel", "gram-tile", dt, variant, args,
                                   dict(BLOCK=block, BLOCK_K=block_k, PRECISION="ieee", UPCAST=False, SPLIT=split,
                                        ACC_F64=acc64, INTERP=False), warps, stages,
                                   options=dict(enable_fp_fusion=False), config_key=f"{block}x{block}x{block_k}",
                                   quick=not acc64))
                if split and (block, acc64) not in seen:
                    seen.add((block, acc64))
                    rargs = dict(ws_ptr=("ptr", "fp32"), acc_ptr=("ptr", "fp64" if acc64 else "fp32"), N=("int", n),
                                 stride_a0=("int", n), stride_a1=("int", 1), alpha=("fp32", 1.0),
                                 num_tiles=("int", tiles), num_splits=("int", 4))
                    out.append(Variant("gram", "_gram_reduce_kernel", "gram-reduce", "fp32",
                                       "acc64" if acc64 else "acc32", rargs,
                                       dict(BLOCK=block, ACC_F64=acc64, INTERP=False), 8 if block >= 128 else 4, 1,
                                       options=dict(enable_fp_fusion=False), config_key=f"{block}x{block}",
                                       quick=True))
    return out


def all_variants(quick: bool = False) -> list[Variant]:
    lk = _load_module("lowrank")
    vs = [v for v in lowrank_variants(lk) if _selectable(lk, v)] + gram_variants(_load_module("gram"))
    first: dict = {}
    for v in vs:
        v.quick = _quick(v, first)
    return [v for v in vs if v.quick] if quick else vs


# --------------------------------------------------------------------------- compile and read


def _triton_bin(name: str) -> Optional[str]:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if p.exists():
        return str(p)
    return shutil.which(name)


def _ptxas_path() -> str:
    """The ptxas Triton itself runs for sm_90a (triton 3.9: ``ptxas-blackwell``; 3.6: ``ptxas``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:  # pragma: no cover - other Triton layouts
        return _triton_bin("ptxas")


def tool_version() -> str:
    """``<triton version> (ptxas <release>)``."""
    import triton
    try:
        out = subprocess.run([_ptxas_path(), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([0-9.]+)", out)
        return f"{triton.__version__} (ptxas {m.group(1)})" if m else triton.__version__
    except Exception:
        return triton.__version__


def can_compile() -> Optional[str]:
    """None when this triton can compile for CUDA sm_90 here, else the reason it cannot."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton not importable: {exc}"
    try:
        from triton.backends import backends
    except Exception as exc:  # pragma: no cover
        return f"triton has no backend registry: {exc}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend (have {sorted(backends)})"
    if _triton_bin("ptxas") is None:
        return "no ptxas in triton's package or on PATH"
    return None


def _signature(fn, v: Variant) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the runtime JIT specialises v's arguments."""
    sig: dict[str, str] = {}
    const: dict[str, Any] = dict(v.constexprs)
    attrs: dict[tuple, list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
            continue
        kind, val = v.args[name]
        if kind == "ptr":
            sig[name] = "*" + _TY[val]
            attrs[(i,)] = [["tt.divisibility", 16]]           # torch allocations are 16-byte aligned
        elif kind == "int":
            if val == 1:
                sig[name] = "constexpr"
                const[name] = 1                              # the JIT turns 1 into a constant
            else:
                sig[name] = "i32"
                if val % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "fp32":
            sig[name] = "fp32"
        else:  # pragma: no cover
            raise ValueError(kind)
    return sig, const, attrs


_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _count_loads(ptx: str) -> dict:
    ld_v4 = ld_narrow = cp16 = cpn = 0
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith("@"):
            s = s.split(None, 1)[1] if " " in s else s
        if s.startswith("ld.global"):
            if ".v4.b32" in s or ".v4.f32" in s or ".v4.u32" in s or ".v2.b64" in s or ".v2.u64" in s:
                ld_v4 += 1
            else:
                ld_narrow += 1
        elif s.startswith("cp.async.") and "shared.global" in s and "bulk" not in s:
            m = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(,|;)", s)
            size = int(m.group(1), 0) if m else 0
            if size == 16:
                cp16 += 1
            else:
                cpn += 1
    return dict(ld_v4=ld_v4, ld_narrow=ld_narrow, cp_async_16=cp16, cp_async_narrow=cpn)


def compile_variant(v: Variant, sass: bool = True) -> dict:
    """Compile ``v`` for sm_90a and return its table row (without the run-wide columns)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = _load_module(v.module)
    fn = getattr(mod, v.kernel)
    sig, const, attrs = _signature(fn, v)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options(dict(num_warps=v.num_warps, num_stages=v.num_stages, **v.options))
    row: dict[str, Any] = dict(kernel=v.kernel, path=v.path, dtype=v.dtype, variant=v.variant,
                               config=v.config_key, num_warps=v.num_warps, num_stages=v.num_stages)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=target, options=opts.__dict__)
    except Exception as exc:  # a compile error is a result, reported by the caller
        row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300])
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    md = k.metadata
    row["smem_bytes"] = int(md.shared)
    row["smem_ok"] = int(md.shared) <= SM90_MAX_SMEM
    cubin = k.asm["cubin"]
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        cp = os.path.join(d, "k.cubin")
        with open(cp, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", cp], capture_output=True, text=True)
        m = _RES_RE.search(res.stdout)
        if m:
            row["registers"], row["stack_bytes"], _static, row["local_bytes"] = (int(g) for g in m.groups())
        if sass:
            res = subprocess.run([_triton_bin("cuobjdump"), "--dump-sass", cp], capture_output=True, text=True)
            row["hgmma_sass"] = len(re.findall(r"\bHGMMA\b", res.stdout))
            row["hmma_sass"] = len(re.findall(r"\bHMMA\b", res.stdout))
            row["_sass_ldl_stl"] = len(re.findall(r"\b(LDL|STL)\b", res.stdout))
    # spills: from Triton's own ptxas -v (printed with dump_ptxas_log); else re-run ptxas -v on the PTX
    text = log.getvalue()
    mp = _PTXAS_RE.search(text)
    if mp is None:
        with tempfile.TemporaryDirectory() as d:
            pp = os.path.join(d, "k.ptx")
            with open(pp, "w") as f:
                f.write(ptx)
            res = subprocess.run([_ptxas_path(), "-v", "--gpu-name=sm_90a", pp, "-o", os.path.join(d, "o.cubin")],
                                 capture_output=True, text=True)
            mp = _PTXAS_RE.search(res.stderr + res.stdout)
    if mp:
        _stack, row["spill_stores"], row["spill_loads"] = (int(g) for g in mp.groups())
    row["wgmma_ptx"] = ptx.count("wgmma.mma_async")
    row.update(_count_loads(ptx))
    if row["wgmma_ptx"]:
        row["mma"] = "wgmma"
    elif "mma.sync" in ptx:
        row["mma"] = "mma.sync"
    else:
        row["mma"] = "fma"
    return row


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9: keep its current default, no warning
    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log = True
    except Exception:  # triton without knobs.nvidia.dump_ptxas_log: ptxas is re-run on the PTX
        pass


def _run_one(args) -> dict:
    v, sass = args
    return compile_variant(v, sass=sass)


def compile_all(variants: list[Variant], jobs: int = 2, sass: bool = True, progress: bool = True) -> list[dict]:
    """Compile the variants (``jobs`` processes); rows in the variants' order."""
    _init_worker()
    if jobs <= 1:
        return [compile_variant(v, sass) for v in variants]
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    rows = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as ex:
        for i, row in enumerate(ex.map(_run_one, [(v, sass) for v in variants], chunksize=1), 1):
            rows.append(row)
            if progress and (i % 20 == 0 or i == len(variants)):
                print(f"  {i}/{len(variants)} compiled ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def problems(rows: list[dict]) -> list[str]:
    """What fails the check: compile errors, shared memory over the limit, unexplained spills,
    16-bit prefill GEMMs without wgmma."""
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['path']} {r['dtype']} {r['variant']} {r['config']} w{r['num_warps']}s{r['num_stages']}"
        if r.get("error"):
            bad.append(f"{name}: compile error: {r['error']}")
            continue
        if int(r["smem_bytes"]) > SM90_MAX_SMEM:
            bad.append(f"{name}: {r['smem_bytes']} B shared memory > {SM90_MAX_SMEM} B (sm_90 limit)")
        spill = int(r.get("spill_stores") or 0) + int(r.get("spill_loads") or 0)
        if spill and (r["kernel"], r["path"], r["variant"], r["config"]) not in SPILL_NOTES:
            bad.append(f"{name}: spills ({r.get('spill_stores')} B stores, {r.get('spill_loads')} B loads, "
                       f"{r.get('stack_bytes')} B stack) and SPILL_NOTES does not explain it")
        if (r["path"].startswith("prefill") and r["dtype"] in ("fp16", "bf16") and not r["variant"].startswith("unaligned")
                and not int(r.get("wgmma_ptx") or 0)):
            bad.append(f"{name}: 16-bit prefill GEMM without wgmma (mma={r.get('mma')})")
    return bad


# --------------------------------------------------------------------------- nvcc (ptxas -v of the CUDA build)


def parse_ptxas_log(text: str) -> list[dict]:
    """Rows from ``nvcc -Xptxas -v`` output: one per (kernel, arch)."""
    rows, cur = [], None
    names = {}
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(mangled=m.group(1), arch=m.group(2))
            rows.append(cur)
            names[m.group(1)] = None
            continue
        if cur is None:
            continue
        m = _PTXAS_RE.search(line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers(.*)", line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", m.group(2))
            cur["smem_bytes"] = int(sm.group(1)) if sm else 0
    if names and shutil.which("c++filt"):
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        for k, d in zip(names, res.stdout.splitlines()):
            names[k] = d
    out, seen = [], set()
    for r in rows:
        if "registers" not in r:
            continue
        if r["mangled"] in seen:  # a kernel is printed once per translation unit that instantiates it
            continue
        seen.add(r["mangled"])
        pretty = (names.get(r["mangled"]) or r["mangled"]).replace("(anonymous namespace)::", "")
        pretty = re.sub(r"^void\s+", "", pretty)
        m = re.match(r"^(?:[\w:]*::)?(\w+)(<[^()]*>)?\(", pretty)
        kern, targs = (m.group(1), (m.group(2) or "")) if m else (pretty, "")
        out.append(dict(kernel=kern, path="cuda-ext", dtype=_dtype_of(targs), variant=targs[1:-1] or "-",
                        config="", num_warps="", num_stages="", registers=r["registers"],
                        stack_bytes=r.get("stack_bytes", 0), spill_stores=r.get("spill_stores", 0),
                        spill_loads=r.get("spill_loads", 0), local_bytes="", smem_bytes=r["smem_bytes"],
                        smem_ok=r["smem_bytes"] <= SM90_MAX_SMEM, note=r["arch"]))
    return out


def _dtype_of(targs: str) -> str:
    if "__half" in targs:
        return "fp16"
    if "bfloat16" in targs:
        return "bf16"
    if "float" in targs:
        return "fp32"
    return "-"


# --------------------------------------------------------------------------- table


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _row_key(r: dict) -> tuple:
    return (r["kernel"], r["path"], r["dtype"], r["variant"], r["config"], str(r["num_warps"]), str(r["num_stages"]))


def write_rows(rows: list[dict], source: str, tool_version: str, out: Path = CSV_PATH,
               keep_provenance: bool = False) -> None:
    """Replace ``source``'s rows of the table at ``out`` by ``rows``; keep the other sources' rows."""
    keep: list[dict] = []
    if out.exists():
        with open(out, newline="") as f:
            keep = [r for r in csv.DictReader(f) if r.get("source") != source]
    sha, date = _git_sha(), _dt.date.today().isoformat()
    new = []
    for r in rows:
        r = {k: v for k, v in r.items() if not k.startswith("_")}
        r.setdefault("note", "")
        r["note"] = re.sub(r"^(grouped|unaligned): [^;]*(; )?", "", r["note"])
        if r.get("kernel") == "_nt_kernel" and re.search(r"G[23]", r.get("variant", "")):
            r["note"] = ("grouped: B offsets/strides read from META at run time, alignment unknown to Triton, "
                         "so B moves in narrow loads" + ("; " + r["note"] if r["note"] else ""))
        elif r.get("variant", "").startswith("unaligned"):
            r["note"] = ("unaligned: K/strides not multiples of 16 (rank a multiple of 8 only), operands move "
                         "in narrow loads" + ("; " + r["note"] if r["note"] else ""))
        if r.get("error"):
            r["note"] = f"COMPILE ERROR: {r.pop('error')}"
        spill = int(r.get("spill_stores") or 0) + int(r.get("spill_loads") or 0)
        harmless = SPILL_NOTES.get((r.get("kernel"), r.get("path"), r.get("variant"), r.get("config")))
        known = NVCC_SPILL_NOTES.get((r.get("kernel"), r.get("variant"))) if source == "nvcc" else None
        if spill and (harmless or known):
            why = f"spill harmless: {harmless}" if harmless else f"spill known, not fixed: {known}"
            r["note"] = (r["note"] + "; " if r["note"] else "") + why
        if keep_provenance:
            r.update(source=source, tool_version=r.get("tool_version") or tool_version)
        else:
            r.update(source=source, tool_version=tool_version, git_sha=sha, date=date)
        new.append({c: r.get(c, "") for c in COLUMNS})
    order = {"triton": 0, "nvcc": 1}
    allrows = sorted(keep + new, key=lambda r: (order.get(r["source"].split("-")[0], 2), r["source"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in allrows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def summary(rows: list[dict]) -> str:
    """One line per (kernel, path, dtype): the register / stack / smem range and the mma."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("error"):
            continue
        groups.setdefault((r["kernel"], r["path"], r["dtype"]), []).append(r)
    lines = []
    for (k, p, d), rs in groups.items():
        regs = [int(r["registers"]) for r in rs if r.get("registers") not in (None, "")]
        smem = [int(r["smem_bytes"]) for r in rs]
        stack = [int(r.get("stack_bytes") or 0) for r in rs]
        mmas = sorted({r.get("mma", "") for r in rs})
        ld = sum(int(r.get("ld_v4") or 0) + int(r.get("cp_async_16") or 0) for r in rs)
        nar = sum(int(r.get("ld_narrow") or 0) + int(r.get("cp_async_narrow") or 0) for r in rs)
        lines.append(f"  {k:20s} {p:14s} {d:5s} n={len(rs):3d} regs {min(regs, default=0):3d}-{max(regs, default=0):3d} "
                     f"stack max {max(stack):4d} B smem max {max(smem) // 1024:3d} KB mma {'/'.join(mmas):10s} "
                     f"128-bit loads {ld} narrow {nar}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CI subset only (every config once); writes no table "
                    "unless --out is given")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    ap.add_argument("--no-sass", action="store_true", help="skip cuobjdump --dump-sass (no HGMMA/HMMA counts)")
    ap.add_argument("--out", type=Path, default=None, help=f"the table (default {CSV_PATH.relative_to(REPO)})")
    ap.add_argument("--filter", default=None, help="only variants whose name (kernel/path/dtype/variant/config/"
                    "wWsS) matches this regular expression; writes no table unless --out is given")
    ap.add_argument("--cache-dir", type=Path, default=None, help="Triton cache to use (default: $TRITON_CACHE_DIR "
                    "if set, else a fresh temporary one, so every variant is compiled and its ptxas log read)")
    ap.add_argument("--recheck", action="store_true", help="no compiling: drop the rows of configs no longer "
                    "selectable, re-apply SPILL_NOTES and the rules to the table's rows (keeps versions, sha, date)")
    ap.add_argument("--nvcc-log", type=Path, help="parse this nvcc -Xptxas -v build log into the source=nvcc rows "
                    "instead of compiling Triton kernels")
    ap.add_argument("--nvcc-version", default="", help="nvcc version for the nvcc rows' tool_version")
    args = ap.parse_args(argv)

    if args.recheck:
        path = args.out or CSV_PATH
        with open(path, newline="") as f:
            allrows = list(csv.DictReader(f))
        bad = []
        live = {(v.kernel, v.path, v.dtype, v.variant, v.config_key, str(v.num_warps), str(v.num_stages))
                for v in all_variants()}
        for src in dict.fromkeys(r["source"] for r in allrows):
            rows = [dict(r) for r in allrows if r["source"] == src
                    and (not src.startswith("triton-") or _row_key(r) in live)]  # pruned configs go
            for r in rows:
                r["note"] = re.sub(r"(; )?spill (harmless|known, not fixed): .*$", "", r["note"])
                if src.startswith("triton-"):
                    r["smem_ok"] = r["smem_ok"] == "True"
            if src.startswith("triton-"):
                bad += [f"{src}: {b}" for b in problems(rows)]
            write_rows(rows, src, rows[0]["tool_version"], path, keep_provenance=True)
        print(f"rechecked {len(allrows)} rows of {path}")
        for b in bad:
            print("FAIL", b, file=sys.stderr)
        return 1 if bad else 0

    if args.nvcc_log:
        rows = parse_ptxas_log(args.nvcc_log.read_text(errors="replace"))
        if not rows:
            print(f"no ptxas -v resource lines in {args.nvcc_log}", file=sys.stderr)
            return 1
        write_rows(rows, "nvcc", args.nvcc_version, args.out or CSV_PATH)
        for r in rows:
            print(f"  nvcc {r['kernel']:28s} {r['variant']:28s} regs {r['registers']:3d} stack {r['stack_bytes']:4d} "
                  f"spill {r['spill_stores']}/{r['spill_loads']} smem {r['smem_bytes']}")
        bad = [f"{r['kernel']}<{r['variant']}>: spills and NVCC_SPILL_NOTES does not explain it" for r in rows
               if (r["spill_stores"] or r["spill_loads"]) and (r["kernel"], r["variant"]) not in NVCC_SPILL_NOTES]
        bad += [f"{r['kernel']}<{r['variant']}>: smem {r['smem_bytes']}" for r in rows if not r["smem_ok"]]
        for b in bad:
            print("FAIL", b, file=sys.stderr)
        return 1 if bad else 0

    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir)
    elif "TRITON_CACHE_DIR" not in os.environ:
        # a fresh cache: a cache hit has no ptxas log (spill bytes) and would hide a compiler change
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="obdk-sm90-cache-")
    why = can_compile()
    if why:
        print(f"cannot compile for sm_90a here: {why}", file=sys.stderr)
        return 2
    import triton
    variants = all_variants(quick=args.quick)
    if args.filter:
        variants = [v for v in variants if re.search(args.filter, v.name)]
    t0 = time.perf_counter()
    rows = compile_all(variants, jobs=args.jobs, sass=not args.no_sass)
    dt = time.perf_counter() - t0
    print(f"triton {triton.__version__}: {len(rows)} variants compiled for sm_90a in {dt:.0f} s ({args.jobs} jobs)")
    print(summary(rows))
    bad = problems(rows)
    out = args.out if args.out is not None else (None if args.quick or args.filter else CSV_PATH)
    if out is not None:
        if args.filter and out.resolve() == CSV_PATH.resolve() and out.exists():
            # a partial run: keep this source's other rows that are still selectable, replace the compiled ones
            keys = {_row_key(r) for r in rows}
            live = {(v.kernel, v.path, v.dtype, v.variant, v.config_key, str(v.num_warps), str(v.num_stages))
                    for v in all_variants()}
            with open(out, newline="") as f:
                old = [r for r in csv.DictReader(f) if r["source"] == f"triton-{triton.__version__}"
                       and _row_key(r) in live and _row_key(r) not in keys]
            for r in old:
                r["smem_ok"] = r["smem_ok"] == "True"
            rows = old + rows
        write_rows(rows, f"triton-{triton.__version__}", tool_version(), out)
        print(f"wrote {len(rows)} rows to {out}")
    for b in bad:
        print("FAIL", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
