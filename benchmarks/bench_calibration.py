"""How much does collecting C_x and C_g cost on top of a plain forward+backward pass?

One calibration pass over the same windows, three ways, interleaved in the same run:

(a) ``plain``: forward + backward of the sum-reduced next-token loss, weights frozen, no
    statistics (the input embeddings' output requires grad so that the pass reaches every
    Linear, as a calibration pass must);
(b) ``obdk``: :func:`obdk.calibrate.stats.calibrate` with ``stats=("cx", "cg")`` (fused
    Function, one ``C_x`` per shared input, ``obdk::gram_acc_``);
(c) ``hooks``: the research-code way: ``register_forward_hook`` on every targeted Linear
    (input upcast to fp32, ``xᵀx`` per Linear, no sharing) and ``register_full_backward_hook``
    (``grad_output`` upcast to fp32, one ``gᵀg`` GEMM per Linear).

Models (``--models``): SmolLM2-135M (``obdk.hub.load_model("smollm2-135m")``), on a GPU
Llama-7B-shaped decoder layers (``llama7b-layers``: d=4096, ffn=11008, MHA,
``--synthetic-layers`` of them, random weights), and ``tiny`` (the 2-layer test model, for a
dry run). Each (model, dtype) runs every method
``--repeats`` times in rotating order after a one-window warm-up; the CSV keeps the median
time, its spread, ratios (b/a, c/b) and the peak memory of each method above its starting
level (CPU: the kernel's RSS high-water mark reset per method, or psutil sampling, else N/A;
GPU: ``torch.cuda.max_memory_allocated``). On a shared machine prefer the paired ratio
(median over repeats of hooks/obdk measured back to back), which drifting load affects least.

    python -m benchmarks.bench_calibration --nsamples 8 --seqlen 256 --out benchmarks/results/calibration_cpu.csv
    python -m benchmarks.bench_calibration --models tiny --dtypes fp32 --nsamples 2 --seqlen 32 --repeats 1  # smoke test
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from obdk.calibrate.stats import calibrate
from obdk.models import linear_groups

from .core.env import env_fields, set_threads
from .core.models import DTYPES, LLAMA7B, load, random_llama
from .core.rows import write_csv
from .core.timing import free, sync

# ----------------------------------------------------------------------------- environment


def _env(device: torch.device) -> dict:
    """The provenance columns, the Python version, and on CPU the C++ Gram paths that ran."""
    from obdk import _ext
    info = env_fields(device)
    if device.type == "cpu" and _ext.has("gram_cpu_blas"):  # which C++ Gram path the CPU rows ran
        info["cpu_gram"] = _ext._C.gram_cpu_blas()
        info["cpu_gram_bf16"] = _ext._C.gram_cpu_bf16() if _ext.has("gram_cpu_bf16") else "gemm"
    info["python"] = platform.python_version()
    return info


# ----------------------------------------------------------------------------- memory


def _proc_status(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the kernel's RSS high-water mark
    (``VmHWM``), reset through ``/proc/self/clear_refs`` after ``malloc_trim``; elsewhere RSS
    sampled every 2 ms with psutil; ``nan`` (written N/A) when neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, float("nan")
        self._mode = None

    def __enter__(self) -> "PeakMemory":
        free()  # freed heap pages go back to the OS first, so that reuse shows up as growth
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._mode = "cuda"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._base = _proc_status("VmRSS")
            if self._base is not None:
                self._mode = "hwm"
                return self
        except OSError:
            pass
        try:
            import psutil
        except ImportError:
            return self
        proc = psutil.Process()
        self._base = self._max = proc.memory_info().rss
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.wait(0.002):
                self._max = max(self._max, proc.memory_info().rss)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        self._mode = "psutil"
        return self

    def __exit__(self, *exc) -> None:
        if self._mode == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._mode == "hwm":
            self.peak_mib = ((_proc_status("VmHWM") or self._base) - self._base) / 2**20
        elif self._mode == "psutil":
            self._stop.set()
            self._thread.join()
            self.peak_mib = (self._max - self._base) / 2**20


# ----------------------------------------------------------------------------- the three passes


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")


class _Frozen:
    """Freeze the weights and make the embeddings' output require grad (so backward reaches layer 0)."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.req = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.req:
            p.requires_grad_(False)
        self.h = self.model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return self

    def __exit__(self, *exc) -> None:
        self.h.remove()
        for p, r in self.req:
            p.requires_grad_(r)


def plain_pass(model, ids: torch.Tensor, batch_size: int) -> None:
    """(a) forward + backward of the sum loss, frozen weights, no statistics."""
    with _Frozen(model):
        for s in range(0, ids.shape[0], batch_size):
            _loss(model, ids[s:s + batch_size]).backward()


def obdk_pass(model, ids: torch.Tensor, batch_size: int):
    """(b) obdk's fused collection of C_x (per shared input) and C_g."""
    return calibrate(model, ids, stats=("cx", "cg"), batch_size=batch_size, progress=False)


def hooks_pass(model, ids: torch.Tensor, batch_size: int):
    """(c) forward/backward hooks on every Linear, fp32 upcast, one GEMM per Linear per side."""
    mods = dict(model.named_modules())
    names = [n for g in linear_groups(model) for n in g.names]
    dev = ids.device
    cx = {n: torch.zeros(mods[n].in_features, mods[n].in_features, device=dev) for n in names}
    cg = {n: torch.zeros(mods[n].out_features, mods[n].out_features, device=dev) for n in names}
    handles = []
    for n in names:
        def fwd(mod, inp, out, n=n):
            x = inp[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            cx[n] += x.T @ x

        def bwd(mod, grad_input, grad_output, n=n):
            g = grad_output[0].detach().float()
            g = g.reshape(-1, g.shape[-1])
            cg[n] += g.T @ g
        handles.append(mods[n].register_forward_hook(fwd))
        handles.append(mods[n].register_full_backward_hook(bwd))
    try:
        with _Frozen(model):
            for s in range(0, ids.shape[0], batch_size):
                _loss(model, ids[s:s + batch_size]).backward()
    finally:
        for h in handles:
            h.remove()
    ntok = ids.numel()
    nlab = ids.shape[0] * (ids.shape[1] - 1)
    for v in cx.values():
        v.div_(ntok)
    for v in cg.values():
        v.div_(nlab)
    return cx, cg


# ----------------------------------------------------------------------------- models


# ----------------------------------------------------------------------------- driver


def run_one(model, ids: torch.Tensor, batch_size: int, repeats: int, device: torch.device) -> dict:
    """Time the three methods (rotating order, ``repeats`` times) and check obdk against the hooks."""
    methods: dict[str, Callable] = {"plain": plain_pass, "obdk": obdk_pass, "hooks": hooks_pass}
    for fn in methods.values():  # warm-up: one window each (kernels, allocator, oneDNN primitives)
        fn(model, ids[:1], 1)
    times = {k: [] for k in methods}
    peaks = {k: [] for k in methods}
    results = {}
    order = list(methods)
    for r in range(repeats):
        for name in order[r % 3:] + order[:r % 3]:
            with PeakMemory(device) as pm:
                sync(device)
                t0 = time.perf_counter()
                out = methods[name](model, ids, batch_size)
                sync(device)
                dt = time.perf_counter() - t0
            times[name].append(dt)
            peaks[name].append(pm.peak_mib)
            if r == 0 and out is not None:
                results[name] = out
            del out
    st = results["obdk"]
    hcx, hcg = results["hooks"]
    rel = 0.0
    for n, key in st.input_key.items():
        for a, b in ((st.cx[key], hcx[n]), (st.cg[n], hcg[n])):
            rel = max(rel, float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {}
    for k in methods:
        row[f"{k}_s"] = round(med[k], 4)
        row[f"{k}_min_s"] = round(min(times[k]), 4)
        row[f"{k}_max_s"] = round(max(times[k]), 4)
        pk = [p for p in peaks[k] if p == p]
        row[f"{k}_peak_mib"] = round(max(pk), 1) if pk else "N/A"
    row["obdk_over_plain"] = round(med["obdk"] / med["plain"], 3)
    row["hooks_over_obdk"] = round(med["hooks"] / med["obdk"], 3)
    # per-repeat ratios are robust to load drifting over the run on a shared machine
    row["hooks_over_obdk_paired_median"] = round(statistics.median(
        h / o for h, o in zip(times["hooks"], times["obdk"])), 3)
    row["max_rel_diff_obdk_vs_hooks"] = f"{rel:.2e}"
    row["stats_mib_obdk"] = round(st.nbytes() / 2**20, 1)
    row["stats_mib_hooks"] = round(sum(v.numel() * 4 for d in (hcx, hcg) for v in d.values()) / 2**20, 1)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, bf16 on GPU)")
    ap.add_argument("--models", default=None,
                    help="comma list of smollm2-135m,llama7b-layers,tiny (default: the first two on GPU, "
                         "smollm2-135m on CPU)")
    ap.add_argument("--synthetic-layers", type=int, default=2, help="decoder layers of the Llama-7B-shaped model")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--out", default=None, help="CSV file to append rows to")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    set_threads(args.threads)
    dtypes = (args.dtypes or ("bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    models = (args.models or ("smollm2-135m,llama7b-layers" if device.type == "cuda" else "smollm2-135m")).split(",")
    env = _env(device)
    rows = []
    for mname in models:
        for dname in dtypes:
            dtype = DTYPES[dname]
            if mname in ("smollm2-135m", "tiny"):
                model, _ = load(mname, device=device, dtype=dtype)
            elif mname == "llama7b-layers":
                model = random_llama(**dict(LLAMA7B, layers=args.synthetic_layers), device=device, dtype=dtype)
                mname = f"llama7b-{args.synthetic_layers}layers"
            else:
                raise SystemExit(f"unknown model {mname!r} (choose smollm2-135m, llama7b-layers, tiny)")
            vocab = model.get_input_embeddings().weight.shape[0]
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g).to(device)
            row = {"model": mname, "dtype": dname, "device": str(device), "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "batch_size": args.batch_size, "repeats": args.repeats,
                   "threads": torch.get_num_threads() if device.type == "cpu" else "",
                   "linears": sum(len(gr.names) for gr in linear_groups(model))}
            row.update(run_one(model, ids, args.batch_size, args.repeats, device))
            row.update(env)
            rows.append(row)
            print(f"{mname:>20} {dname:>5}: plain {row['plain_s']:.2f}s  obdk {row['obdk_s']:.2f}s  "
                  f"hooks {row['hooks_s']:.2f}s  obdk/plain {row['obdk_over_plain']:.2f}  "
                  f"hooks/obdk {row['hooks_over_obdk']:.2f} (paired {row['hooks_over_obdk_paired_median']:.2f})  "
                  f"peak MiB plain/obdk/hooks {row['plain_peak_mib']}/{row['obdk_peak_mib']}/{row['hooks_peak_mib']}  "
                  f"rel diff {row['max_rel_diff_obdk_vs_hooks']}", flush=True)
            if args.out:  # one row at a time: a long run that is cut short keeps what it measured
                write_csv([row], args.out)  # union header: a column added later never shifts the others
            del model
            gc.collect()
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
