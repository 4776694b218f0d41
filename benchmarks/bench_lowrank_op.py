"""``obdk::lowrank_linear`` alone, per provider, on Llama-7B Linear shapes.

Shapes (out m × in n): 4096×4096 (q/k/v/o), 11008×4096 (gate/up), 4096×11008 (down); rank
for keep ∈ {0.8, 0.6, 0.4} is keep·mn/(m+n) rounded to a multiple of 64 (the parameter count
of the factors is keep × the dense one); token rows M ∈ {1, 4, 16, 128, 2048, 8192}.

Providers (whichever run on the device): ``dense`` (F.linear with the product b·a made
once), ``two_mm`` (torch.mm then torch.addmm), ``triton`` (obdk.kernels.lowrank), ``cuda``
(obdk._C.lowrank_linear_cuda), ``cpp`` (obdk._C.lowrank_linear_cpu), and ``op``
(``obdk.ops.lowrank_linear`` with automatic backend choice: the real call a module makes,
dispatch overhead included).

Columns: median and 20/80 % quantiles (µs; ``triton.testing.do_bench`` on CUDA; on CPU a
perf_counter loop over all providers in rotating rounds, so a shared machine's load drifts
hit them alike), speedup vs dense and vs two_mm, achieved GB/s and TFLOP/s, and
on a GPU with known peaks (H100: 3.35 TB/s, 989 TFLOP/s bf16) the fraction of the bandwidth
roofline at decode (M ≤ 16; bytes = the factors r(m+n)·elem, or mn·elem for dense, + x and y)
and of the FLOP roofline at prefill (M ≥ 128; 2M·r(m+n), or 2Mmn for dense), plus the max
relative error against ``obdk.ops.lowrank_linear_reference``. Every row carries the device
name, torch/triton/obdk versions, git SHA and timestamp.

    python -m benchmarks.bench_lowrank_op --quick --out benchmarks/results/lowrank_op_cpu.csv
    python -m benchmarks.bench_lowrank_op --device cuda --out benchmarks/results/lowrank_op_h100.csv
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.nn.functional as F

import obdk
from obdk import _ext
from obdk.ops import lowrank_linear_reference

from .core.env import env_fields, peaks, set_threads
from .core.models import DTYPES
from .core.rows import print_table, write_csv
from .core.timing import bench_interleaved, sync

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out m, in n)
KEEPS = [0.8, 0.6, 0.4]
MS = [1, 4, 16, 128, 2048, 8192]
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_MS = [1, 16, 128]
DECODE_MAX_M = 16


def rank_for(keep: float, m: int, n: int, multiple: int = 64) -> int:
    return max(multiple, int(round(keep * m * n / (m + n) / multiple)) * multiple)


def providers(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> fn(x, a, b, bias, w_dense) for every provider that runs here."""
    out = {
        "dense": lambda x, a, b, bias, w: F.linear(x, w, bias),
        "two_mm": lambda x, a, b, bias, w: torch.addmm(bias, torch.mm(x, a.t()), b.t()),
    }
    if device.type == "cuda":
        try:
            from obdk.kernels.lowrank import lowrank_linear_triton
            out["triton"] = lambda x, a, b, bias, w: lowrank_linear_triton(x, a, b, bias)
        except Exception as exc:  # pragma: no cover
            print(f"# triton provider unavailable: {exc}", file=sys.stderr)
        if _ext.has("lowrank_linear_cuda"):
            out["cuda"] = lambda x, a, b, bias, w: _ext._C.lowrank_linear_cuda(x, a, b, bias)
    if device.type == "cpu" and _ext.has("lowrank_linear_cpu"):
        out["cpp"] = lambda x, a, b, bias, w: _ext._C.lowrank_linear_cpu(x, a, b, bias)
    out["op"] = lambda x, a, b, bias, w: obdk.ops.lowrank_linear(x, a, b, bias)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, shapes {QUICK_SHAPES}")
    p.add_argument("--ms", type=int, nargs="*", help="token rows M (overrides --quick)")
    p.add_argument("--keeps", type=float, nargs="*", default=KEEPS)
    p.add_argument("--providers", nargs="*", help="subset of providers to run")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement (CPU loop)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is steadier on a shared, oversubscribed machine)")
    p.add_argument("--out", help="append rows to this CSV")
    args = p.parse_args(argv)
    set_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ms = args.ms or (QUICK_MS if args.quick else MS)
    budget = args.max_seconds or (1.0 if device.type == "cuda" else (0.6 if args.quick else 2.0))
    provs = providers(device, dtype)
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers}
    env = env_fields(device)
    peak = peaks(device)
    elem = torch.finfo(dtype).bits // 8
    print(f"# {env['device_name']}  torch {env['torch']}  triton {env['triton']}  obdk {env['obdk']}  "
          f"{env['git_sha']}  dtype {dtype}  providers {list(provs)}", flush=True)

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for (m, n) in shapes:
        w = (torch.randn(m, n, generator=gen) / n ** 0.5).to(device, dtype)  # dense timing ignores values
        for keep in args.keeps:
            r = rank_for(keep, m, n)
            a = (torch.randn(r, n, generator=gen) / n ** 0.5).to(device, dtype)
            b = (torch.randn(m, r, generator=gen) / r ** 0.5).to(device, dtype)
            bias = (torch.randn(m, generator=gen) * 0.1).to(device, dtype)
            for M in ms:
                x = torch.randn(M, n, generator=gen).to(device, dtype)
                ref = lowrank_linear_reference(x, a, b, bias)
                base: dict = {}
                run: dict = {}
                errs: dict = {}
                for name, fn in provs.items():
                    call = (lambda fn=fn: fn(x, a, b, bias, w))
                    try:
                        y = call()
                        sync(device)
                    except Exception as exc:
                        print(f"# {name} {m}x{n} r{r} M{M}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    errs[name] = ((y.float() - ref).abs().max() / ref.abs().max()).item() if name != "dense" else float("nan")
                    run[name] = call
                    del y
                times = bench_interleaved(run, device, max_seconds=budget)
                for name, (med, q20, q80) in times.items():
                    dense = name == "dense"
                    wbytes = (m * n if dense else r * (m + n)) * elem
                    nbytes = wbytes + (M * n + M * m) * elem
                    flops = 2 * M * (m * n if dense else r * (m + n))
                    row = {"shape": f"{m}x{n}", "m": m, "n": n, "keep": keep, "rank": r, "M": M, "dtype": str(dtype).split(".")[-1],
                           "provider": name, "median_us": med, "q20_us": q20, "q80_us": q80,
                           "gbps": nbytes / med * 1e-3, "tflops": flops / med * 1e-6, "max_rel_err": errs[name]}
                    if peak is not None:
                        if M <= DECODE_MAX_M:
                            row["frac_bw_roofline"] = nbytes / (med * 1e-6) / peak["bw"]
                        if M >= 128 and dtype != torch.float32:
                            row["frac_flop_roofline"] = flops / (med * 1e-6) / peak["flops_16"]
                    base[name] = med
                    rows.append(row)
                cur = [rw for rw in rows if rw["shape"] == f"{m}x{n}" and rw["M"] == M and rw["keep"] == keep]
                dense_med = base.get("dense")  # dense is re-measured in every (keep, M) round: same conditions
                for rw in cur:
                    if dense_med:
                        rw["speedup_vs_dense"] = dense_med / rw["median_us"]
                    if "two_mm" in base:
                        rw["speedup_vs_two_mm"] = base["two_mm"] / rw["median_us"]
                print_table(cur, ["shape", "keep", "rank", "M", "provider", "median_us", "q20_us", "q80_us",
                                          "speedup_vs_dense", "speedup_vs_two_mm", "gbps", "tflops",
                                          "frac_bw_roofline", "frac_flop_roofline", "max_rel_err"])
                x = ref = None  # (released; the providers' closures read the names)
            a = b = bias = None
            gc.collect()
        w = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [{**r, **env} for r in rows]
    if args.out:
        print(f"# wrote {len(rows)} rows to {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
