"""End-to-end decomposition latency: the published SVD-LLM pipeline against obdk, same process.

Issue #7 item 4. One model is loaded once; every pipeline works on its own deep copy, on the
same calibration windows (``get_calibration_windows("wikitext2:validation", tok, nsamples,
seqlen, seed=0)``, so the same ``nsamples × seqlen`` tokens for every row), and every
compressed model is scored on the same WikiText-2 test windows.

Pipelines
---------
``reference svd-llm``
    The research code as published (AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py``), re-implemented
    as the baseline in :mod:`benchmarks.baselines.svd_llm` (``collect``, ``cholesky``,
    ``whitening``; their docstrings list the steps mirrored).
    Stages: ``calibration`` (forward passes with a forward hook on every targeted Linear),
    ``factorisation`` (fp64 Cholesky with the eigenvalue-shift retry, explicit ``inv``, full
    SVD; broken down in ``kind=detail`` rows ``factorisation/cholesky|inv|svd``) and
    ``packing`` (factors, two ``nn.Linear`` per matrix, module swap).
``obdk svd-llm``
    ``LowRankConfig(method="svd-llm", keep, alloc="uniform", rank_multiple=1)``, other fields
    at their defaults (fp64 exact eigen form, relative damping 0.01). Its factorisation is
    broken down in ``kind=detail`` rows ``factorisation/roots|products|eigen|solves`` (summed
    over problems: with parallel workers on CPU they add up to more than the stage's wall time).
``obdk obd``
    ``LowRankConfig(method="obd", keep, correct="none")``: one-shot, global allocation (rank multiple 8,
    floor 0.5); calibration also runs backward passes for ``C_g``.
``obdk obd-uniform``
    ``LowRankConfig(method="obd", keep, alloc="uniform", rank_multiple=1)``: like for like with
    the two uniform rows.
``obdk obd streamed``
    ``obdk obd`` with ``prepare(stream=True)`` (:mod:`obdk.calibrate.stream`): the same statistics one
    decoder layer at a time, each layer decomposed as its backward sweep ends (in line, not
    overlapped); detail rows ``calibration/capture|forward sweep|backward sweep`` (the sweeps include
    the in-line factorisation, which ``factorisation`` reports again as its sum).
``obdk obd zs+kfac`` / ``obdk obd zs+kfac streamed``
    obdk's default ``LowRankConfig(method="obd", keep)`` (global ranks, the zs and kfac correction
    steps, two more gradient passes), resident and streamed (the corrections' gradient passes stream too,
    reading each layer's kept statistics).

obdk rows run :func:`obdk.prepare` once and :meth:`Plan.apply` per ``keep``; the
stages come from the ``StageTimer`` records (``report.stages``: calibration, factorisation,
allocation, truncation, packing). The first ``--keeps`` value is the end-to-end run
(``run=first``); each further value is an extra ratio (``run=extra``), whose ``total`` is the
marginal cost of that ratio (obdk: ``Plan.apply`` on a fresh dense copy; reference: its
``whitening`` step again from the stored Cholesky factors, as ``--profiling_mat_path`` reuses
them) and ``marginal_frac`` that marginal divided by the pipeline's first total.
The ``total`` rows are wall time around the whole pipeline (so ``total − Σ stages`` is the
un-staged overhead); copying the dense model and perplexity are never inside a timed region.

Rank mapping (same parameter count)
-----------------------------------
SVD-LLM's ``--ratio`` is the fraction *removed*; ``main`` passes ``1 − ratio`` to
``whitening``, which keeps ``int(m·n·ratio/(m+n))`` singular values per matrix. obdk's
``keep`` is the fraction of targeted Linear parameters kept and uniform allocation gives
``r = round(keep·m·n/(m+n))`` (``rank_multiple=1``; dense at break-even). ``--ref-rank
match`` (default) gives the baseline exactly obdk's uniform ranks, so ``reference svd-llm``,
``obdk svd-llm`` and ``obdk obd-uniform`` keep the same parameter count (column
``params_after``); ``--ref-rank floor`` uses the reference's ``int()`` (≤ 1 rank less per matrix).

Columns
-------
pipeline, keep, run (dense|first|extra), stage, kind (stage|detail|total|eval), seconds,
peak_rss_mib, peak_cuda_mib, ppl, marginal_frac, params_after (targeted Linear parameters
after compression), keep_actual, ref_shifted (reference: Grams that needed the eigenvalue
shift), model, model_dtype, nsamples, seqlen, tokens, eval_windows, eval_seqlen, threads, ref_rank, run_id,
and the provenance columns of
``benchmarks.core.env.env_fields`` (device, versions, git sha, timestamp, load average).
``peak_rss_mib`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process high-water
mark, monotone over the whole run, so a later pipeline inherits the peak of an earlier one
(pipelines run in ``--pipelines`` order; only increases are informative). ``peak_cuda_mib``
is ``torch.cuda.max_memory_allocated`` reset per stage.

Models (``--dtype`` sets the dtype every pipeline runs in): ``smollm2-135m``
(``obdk.hub.load_model``, GGUF dequantised to fp32 by default), ``tiny``
(:func:`obdk.testing.tiny_llama_and_tokenizer`, for checking the script),
``llama7b-random`` (CUDA only: a randomly initialised Llama-7B-shaped model, 32 layers,
d=4096, ffn=11008, MHA, bf16; SmolLM2's tokenizer and vocabulary when that package is
installed, otherwise uniformly random token ids with vocab 32000). On an 80 GB GPU obdk
``obd`` on the 7B shape needs 59 GiB of fp32 statistics next to 13 GiB of weights (see
``obdk/calibrate/stats.py``): run it on the larger GPU or leave it out with ``--pipelines``.

The figure (stacked stage times of the first keep, the marginal cost of each extra keep) is
drawn by :func:`benchmarks.plot_results.plot_latency`, here after every run and with
``--plot-only`` from the last run in ``--out``.

    python -m benchmarks.bench_decompose_latency --model smollm2-135m --nsamples 32 --seqlen 512 \\
        --keeps 0.8 0.6 0.9 --eval-windows 8 --out benchmarks/results/decompose_latency_cpu.csv
    python -m benchmarks.bench_decompose_latency --model smollm2-135m --dtype bf16 --nsamples 16 --seqlen 512 \\
        --keeps 0.8 0.6 --out benchmarks/results/decompose_latency_cpu_bf16.csv
    python -m benchmarks.bench_decompose_latency --plot-only --out benchmarks/results/decompose_latency_cpu.csv
    python -m benchmarks.bench_decompose_latency --model tiny --nsamples 2 --seqlen 64 --eval-windows 1 \
        --out /tmp/dl.csv                                                            # seconds: smoke test

In bf16 the reference keeps its published arithmetic (it runs its model in 16 bits too): hooks
upcast each input to fp32 before the Gram, Cholesky and ``inv`` in fp64, SVD in fp32, factors cast
back to the model's dtype.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import obdk
import obdk.allocate  # noqa: F401  imported here so that no pipeline's timed stage pays for the import
import obdk.calibrate.stats  # noqa: F401
import obdk.decompose  # noqa: F401
from obdk.config import LowRankConfig
from obdk.models import select_targets
from obdk.report import StageTimer

from .baselines import svd_llm
from .core.data import EvalSets, data_dir_of, random_windows
from .core.env import RESULTS, env_fields, set_threads
from .core.models import load, model_dtype
from .core.rows import format_table, read_rows, to_float, write_csv
from .core.sweep import keep_sweep
from .core.timing import free, peak_rss_mib, sync

log = logging.getLogger("bench_decompose_latency")

PIPELINES = ("reference", "svd-llm", "obd", "obd-uniform", "obd-stream", "obd-default", "obd-default-stream")
LABELS = {"reference": "reference svd-llm", "svd-llm": "obdk svd-llm", "obd": "obdk obd",
          "obd-uniform": "obdk obd-uniform", "obd-stream": "obdk obd streamed", "obd-default": "obdk obd zs+kfac",
          "obd-default-stream": "obdk obd zs+kfac streamed"}
STAGE_ORDER = ("calibration", "factorisation", "scores", "allocation", "truncation", "correction", "packing")


# =========================================================================== models and data


def clone(base: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(base).to(device).eval()


def calibration_windows(tok, vocab: int, nsamples: int, seqlen: int, data_dir: Optional[str]):
    """``nsamples`` windows of WikiText-2 validation (seed 0), the same for every pipeline; random ids without a tokenizer."""
    from obdk.calibrate.data import get_calibration_windows
    if tok is None:  # llama7b-random without a tokenizer
        return get_calibration_windows(random_windows(vocab, nsamples, seqlen, seed=0), None,
                                       nsamples=nsamples, seqlen=seqlen, seed=0)
    return get_calibration_windows("wikitext2:validation", tok, nsamples=nsamples, seqlen=seqlen, seed=0,
                                   data_dir=data_dir)


def eval_windows(tok, vocab: int, n: int, seqlen: int, data_dir: Optional[str]) -> torch.Tensor:
    """The first ``n`` windows of ``seqlen`` tokens of WikiText-2 test; random ids without a tokenizer."""
    if tok is None:
        return random_windows(vocab, n, seqlen, seed=1)
    return EvalSets(tok, data_dir).windows("wikitext2", n, seqlen)


def ppl_of(model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    from obdk.eval import perplexity
    res = perplexity(model, None, windows, seqlen=windows.shape[1], progress=False)
    return float(res["ppl"]), float(res["seconds"])


# =========================================================================== running


def _config(pipe: str, keep: float) -> LowRankConfig:
    if pipe == "svd-llm":
        return LowRankConfig(method="svd-llm", keep=keep, alloc="uniform", rank_multiple=1)
    if pipe in ("obd", "obd-stream"):
        return LowRankConfig(method="obd", keep=keep, correct="none")
    if pipe in ("obd-default", "obd-default-stream"):
        return LowRankConfig(method="obd", keep=keep)
    if pipe == "obd-uniform":
        return LowRankConfig(method="obd", keep=keep, alloc="uniform", rank_multiple=1, correct="none")
    raise ValueError(pipe)


def _stage_rows(common: dict, stages: dict, kind: str = "stage") -> list[dict]:
    rows = []
    for name, st in stages.items():  # "stage/sub" (e.g. obdk's factorisation/eigen) is a breakdown, not stacked
        rows.append({**common, "stage": name, "kind": "detail" if "/" in name else kind, "seconds": st["seconds"],
                     "peak_rss_mib": st["peak_rss_mib"], "peak_cuda_mib": st.get("peak_cuda_mib")})
    return rows


def _run_rows(meta: dict, label: str, keep: float, run: str, ppl: float, params_after: int, keep_actual: float,
              stages: list[tuple[dict, str]], total: float, device, first_total: Optional[float] = None,
              **extra) -> list[dict]:
    """The stage rows and the total row of one run (``first`` or ``extra``) of one pipeline."""
    common = {**meta, "pipeline": label, "keep": keep, "run": run, "ppl": ppl, "params_after": params_after,
              "keep_actual": keep_actual, **extra}
    rows = [r for st, kind in stages for r in _stage_rows(common, st, kind)]
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None
    total_row = {**common, "stage": "total", "kind": "total", "seconds": total, "peak_rss_mib": peak_rss_mib(),
                 "peak_cuda_mib": peak_cuda}
    if first_total is not None:
        total_row["marginal_frac"] = total / first_total
        log.info("%s extra keep=%.2f: %.3f s (%.1f%% of first), ppl %.3f", label, keep, total,
                 100 * total / first_total, ppl)
    else:
        log.info("%s keep=%.2f: %.2f s, ppl %.3f", label, keep, total, ppl)
    return rows + [total_row]


def run_reference(base, device, data, keeps, ev, args, meta) -> list[dict]:
    """The SVD-LLM baseline end to end at ``keeps[0]``; each further keep re-runs its whitening from the stored factors."""
    label = LABELS["reference"]
    model = clone(base, device)
    free()
    timer, detail = StageTimer(), StageTimer()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    shifted: list = []
    _, chol = svd_llm.compress(model, data.input_ids, keeps[0], timer=timer, detail=detail, rank_mode=args.ref_rank,
                               shifted=shifted)
    sync(device)
    first_total = time.perf_counter() - t0
    ppl, _ = ppl_of(model, ev)
    pa = svd_llm.params_after(model)
    rows = _run_rows(meta, label, keeps[0], "first", ppl, pa, pa / meta["_params_before"],
                     [(timer.to_dict(), "stage"), (detail.to_dict(), "detail")], first_total, device,
                     ref_shifted=len(shifted))
    del model
    free()

    def whitening(model, keep):  # as --profiling_mat_path reuses the Cholesky factors
        timers = StageTimer(), StageTimer()
        svd_llm.whitening(model, chol, keep, timer=timers[0], detail=timers[1], rank_mode=args.ref_rank)
        return timers

    for res in keep_sweep(base, keeps[1:], whitening, clone=lambda b: clone(b, device), device=device):
        ppl, _ = ppl_of(res.model, ev)
        pa = svd_llm.params_after(res.model)
        timer, detail = res.report
        rows += _run_rows(meta, label, res.point["keep"], "extra", ppl, pa, pa / meta["_params_before"],
                          [(timer.to_dict(), "stage"), (detail.to_dict(), "detail")], res.seconds, device,
                          first_total=first_total)
    chol = None  # (released; whitening's closure reads the name)
    free()
    return rows


def run_obdk(pipe, base, device, data, keeps, ev, args, meta) -> list[dict]:
    """``prepare`` + ``Plan.apply`` at ``keeps[0]`` (timed together); each further keep is ``Plan.apply`` alone."""
    label = LABELS[pipe]
    config = _config(pipe, keeps[0])
    model = clone(base, device)
    free()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    plan = obdk.prepare(model, config, data, progress=False, timer=StageTimer(), stream=pipe.endswith("-stream"))
    report = plan.apply(model, keep=keeps[0])
    sync(device)
    first_total = time.perf_counter() - t0
    prepared = set(plan.timer.stages)
    ppl, _ = ppl_of(model, ev)
    rows = _run_rows(meta, label, keeps[0], "first", ppl, report.targeted_params_after, report.keep_actual,
                     [(report.stages, "stage")], first_total, device)
    del model
    free()
    for res in keep_sweep(base, keeps[1:], plan.apply, clone=lambda b: clone(b, device), device=device):
        ppl, _ = ppl_of(res.model, ev)
        rep = res.report
        marginal = {s: v for s, v in rep.stages.items() if s not in prepared}  # this keep's own stages
        rows += _run_rows(meta, label, res.point["keep"], "extra", ppl, rep.targeted_params_after, rep.keep_actual,
                          [(marginal, "stage")], res.seconds, device, first_total=first_total)
    del plan
    free()
    return rows


# =========================================================================== summary


def summarize(rows: list[dict]) -> list[str]:
    """Lines: per pipeline × keep the stage times, total and ppl; then the three target ratios."""
    from collections import defaultdict
    tab: dict = defaultdict(dict)
    ppl, frac, dense = {}, {}, None
    for r in rows:
        key = (r["pipeline"], float(r["keep"]))
        if r["kind"] == "eval":
            dense = to_float(r["ppl"])
            continue
        if r["kind"] in ("stage", "total"):
            tab[key][r["stage"]] = to_float(r["seconds"])
        ppl[key] = to_float(r["ppl"])
        if r["kind"] == "total" and to_float(r.get("marginal_frac")) is not None:
            frac[key] = to_float(r["marginal_frac"])
    cols = ["pipeline", "keep", "run"] + [s for s in STAGE_ORDER if any(s in v for v in tab.values())] + \
        ["total", "ppl", "extra/first"]
    out_rows = []
    for (p, k), st in tab.items():
        d = {"pipeline": p, "keep": k, "run": "extra" if (p, k) in frac else "first", "ppl": ppl[(p, k)],
             "extra/first": frac.get((p, k), "")}
        d.update({s: v for s, v in st.items()})
        out_rows.append(d)
    rank = {LABELS[p]: i for i, p in enumerate(PIPELINES)}
    out_rows.sort(key=lambda d: (d["run"] != "first", rank.get(d["pipeline"], 99), d["keep"]))
    lines = format_table(out_rows, cols)
    if dense is not None:
        lines.append(f"dense ppl: {dense:.4g}")
    first = {d["pipeline"]: d for d in out_rows if d["run"] == "first"}
    ref, sl, obd = first.get(LABELS["reference"]), first.get(LABELS["svd-llm"]), first.get(LABELS["obd"])
    if ref and sl:
        sp = ref["total"] / sl["total"]
        ok = "met" if sp >= 5 and sl["ppl"] <= ref["ppl"] else "NOT met"
        lines.append(f"speedup obdk svd-llm over reference (end to end, keep {sl['keep']}): {sp:.2f}x "
                     f"(ppl {sl['ppl']:.4g} vs {ref['ppl']:.4g}; target >= 5x at equal or better ppl: {ok})")
    if obd and sl:
        ra = obd["total"] / sl["total"]
        lines.append(f"obdk obd / obdk svd-llm (end to end): {ra:.2f}x (target <= 1.5x: {'met' if ra <= 1.5 else 'NOT met'})")
    for res_p, str_p in (("obd", "obd-stream"), ("obd-default", "obd-default-stream")):
        a, b = first.get(LABELS[res_p]), first.get(LABELS[str_p])
        if a and b:
            ra = b["total"] / a["total"]
            lines.append(f"{LABELS[str_p]} / resident (end to end): {ra:.2f}x, ppl {b['ppl']:.6g} vs {a['ppl']:.6g} "
                         f"(target <= 1.3x at the same ppl: {'met' if ra <= 1.3 else 'NOT met'})")
    for p in (LABELS["svd-llm"], LABELS["obd"], LABELS["obd-uniform"], LABELS["reference"]):
        fr = [(k, v) for (pp, k), v in frac.items() if pp == p]
        if fr:
            worst = max(v for _, v in fr)
            tgt = "" if p == LABELS["reference"] else f" (target <= 10%: {'met' if worst <= 0.10 else 'NOT met'})"
            lines.append(f"{p}: extra ratio marginal / first total: "
                         + ", ".join(f"keep {k}: {100 * v:.2f}%" for k, v in sorted(fr)) + tgt)
    return lines


def last_run(rows: list[dict]) -> list[dict]:
    """The rows of the last run (``run_id``) in ``rows``."""
    if not rows:
        raise SystemExit("the CSV holds no rows")
    return [r for r in rows if r.get("run_id") == rows[-1]["run_id"]]


# =========================================================================== main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "tiny", "llama7b-random"))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.9],
                    help="first: the end-to-end run; the rest: extra ratios from the same calibration")
    ap.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows for perplexity")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    ap.add_argument("--ref-rank", default="match", choices=("match", "floor"),
                    help="baseline ranks: obdk's uniform ranks (same parameters) or the reference's int()")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                    help="model dtype for every pipeline (default: fp32 for smollm2-135m's dequantised GGUF, "
                         "bf16 for llama7b-random)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--layers", type=int, default=None,  # benchmarks/gpu_suite.sh: a 7B shape that fits its time
                    help="llama7b-random only: this many decoder layers instead of 32 (model column "
                         "llama7b-random-<N>layers; random token ids)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--data-dir", default=data_dir_of(None))
    ap.add_argument("--out", default=str(RESULTS / "decompose_latency_cpu.csv"))
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot of the last run in --out")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    from .plot_results import plot_latency
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("obdk", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if args.plot_only:
        rows = last_run(read_rows(out))
        print("\n".join(summarize(rows)))
        print(f"plot: {plot_latency(out, png)[0]}")
        return rows
    set_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.model == "llama7b-random" and device.type != "cuda":
        raise SystemExit("--model llama7b-random needs a CUDA device (--device cuda)")

    t0 = time.perf_counter()
    label = args.model
    if args.layers and args.model == "llama7b-random":  # --layers (gpu_suite.sh): fewer 7B-shaped layers
        from .core.models import DTYPES, LLAMA7B, random_llama
        base, tok = random_llama(**dict(LLAMA7B, layers=args.layers), device=device,
                                 dtype=DTYPES[args.dtype or "bf16"]), None
        label = f"llama7b-random-{args.layers}layers"
    else:
        base, tok = load(args.model, device=device, dtype=args.dtype)
    if args.model == "llama7b-random":  # the dense original waits in host memory; each pipeline copies it to the GPU
        base = base.cpu()
    vocab = base.config.vocab_size
    eval_seqlen = args.eval_seqlen
    maxpos = getattr(base.config, "max_position_embeddings", None)
    if maxpos and eval_seqlen > maxpos:
        log.info("eval seqlen %d > max_position_embeddings %d: using %d", eval_seqlen, maxpos, maxpos)
        eval_seqlen = maxpos
    try:
        data = calibration_windows(tok, vocab, args.nsamples, args.seqlen, args.data_dir)
        ev = eval_windows(tok, vocab, args.eval_windows, eval_seqlen, args.data_dir)
    except (FileNotFoundError, OSError) as exc:
        if args.model != "llama7b-random":
            raise
        log.warning("llama7b-random: WikiText-2 not available (%s); random token ids", exc)
        data = calibration_windows(None, vocab, args.nsamples, args.seqlen, None)
        ev = eval_windows(None, vocab, args.eval_windows, eval_seqlen, None)
    log.info("model %s loaded and data ready in %.1f s", args.model, time.perf_counter() - t0)

    targeted = sum(t.m * t.n for t in select_targets(base, LowRankConfig()))
    env = env_fields(device)
    meta = {"model": label, "model_dtype": model_dtype(base), "nsamples": args.nsamples, "seqlen": args.seqlen,
            "tokens": int(data.input_ids.numel()), "eval_windows": args.eval_windows, "eval_seqlen": eval_seqlen,
            "threads": torch.get_num_threads(), "ref_rank": args.ref_rank, "run_id": env["timestamp"] + "/" + args.model,
            "_params_before": targeted, **env}

    rows: list[dict] = []
    model = clone(base, device)
    dppl, dsec = ppl_of(model, ev)  # also warms up the forward pass before any pipeline is timed
    del model
    free()
    rows.append({**meta, "pipeline": "dense", "keep": 1.0, "run": "dense", "stage": "eval", "kind": "eval",
                 "seconds": dsec, "peak_rss_mib": peak_rss_mib(), "ppl": dppl, "params_after": targeted,
                 "keep_actual": 1.0})
    log.info("dense ppl %.4f (%d windows of %d)", dppl, ev.shape[0], eval_seqlen)
    for pipe in args.pipelines:
        if pipe == "reference":
            rows += run_reference(base, device, data, args.keeps, ev, args, meta)
        else:
            rows += run_obdk(pipe, base, device, data, args.keeps, ev, args, meta)
    for r in rows:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
        r.setdefault("marginal_frac", "")
        r.setdefault("peak_cuda_mib", "")
    lead = ["pipeline", "keep", "run", "stage", "kind", "seconds", "peak_rss_mib", "peak_cuda_mib", "ppl",
            "marginal_frac", "params_after", "keep_actual"]
    rows = [{**{k: r.get(k, "") for k in lead}, **{k: v for k, v in r.items() if k not in lead}} for r in rows]
    write_csv(rows, out)
    str_rows = [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]
    print("\n".join(summarize(str_rows)))
    print(f"csv: {out}\nplot: {plot_latency(out, png)[0]}")
    return rows


if __name__ == "__main__":
    main()
