"""DERIVED, not measured: whole-model times from the measured 7B-shaped layers of ``scale_7b.csv`` (issue #30 item 3).

``python -m benchmarks.scale_7b_derive [--csv benchmarks/results/scale_7b.csv] [--out benchmarks/results/scale_7b.md]``
reads the last ``--correct none`` row of :mod:`benchmarks.bench_scale_7b` and writes a Markdown page with:

* the measured row (per-layer forward, backward and decomposition seconds, peaks, ``obdk plan`` next to them);
* the FLOPs of one decoder layer, from :func:`obdk.planner.plan_run` (the difference of its counts for 2 and 1
  layers: the LM head and embeddings are the rest), and the rates this CPU achieved on them;
* the whole 32-layer Llama-2-7B-shaped run on this CPU: the measured wall of the run plus, for each layer it did
  not have, the measured per-layer medians (forward, backward, decompositions, save);
* the same run on one H200, and Llama-3-70B (bf16) on one H200 and on 8 (``torchrun``: the windows split over
  the ranks, each matrix decomposed by its owner rank), at the rates in :data:`RATES` (NVIDIA's H100/H200 SXM
  peak figures, the H200 being the H100's GH100 compute with more memory, times an assumed efficiency): FLOPs /
  rate, compute only (no disk, host-device copies or collectives), so a lower bound.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from obdk.planner import PRESETS, plan_run

from .core.env import RESULTS
from .core.rows import read_rows

#: assumed H200 SXM rates (FLOP/s): NVIDIA's dense peaks (H100/H200 SXM datasheet: FP64 tensor 66.9 TF, FP32 66.9 TF
#: without tensor cores, which PyTorch's fp32 matmuls use by default, BF16 tensor 989 TF) times an efficiency
#: that is an assumption, not a measurement: 50% for the calibration's matmuls (large GEMMs), 10% for the fp64
#: decompositions (eigh's tridiagonal reduction is half matrix-vector work, memory bound)
RATES = {
    "calib_float32": (66.9e12, 0.5, "FP32 66.9 TF/s (no tensor cores) x 50%"),
    "calib_bfloat16": (989e12, 0.5, "BF16 tensor 989 TF/s x 50%"),
    "decompose_float64": (66.9e12, 0.1, "FP64 tensor 66.9 TF/s x 10%"),
}


def layer_flops(cfg: dict, **kw) -> tuple[float, float, float]:
    """(calibration FLOPs of one decoder layer, its decompositions' FLOPs, the calibration FLOPs of the rest: the
    LM head and embeddings), from ``plan_run`` at 2 and 1 layers."""
    one = plan_run({**cfg, "num_hidden_layers": 1}, **kw)
    two = plan_run({**cfg, "num_hidden_layers": 2}, **kw)
    c, d = two["calibration_flops"] - one["calibration_flops"], two["decomposition_flops"] - one["decomposition_flops"]
    return c, d, one["calibration_flops"] - c


def gpu_hours(cfg: dict, nproc: int, dtype: str, nsamples: int, seqlen: int) -> dict:
    """Compute-only seconds of a run of ``cfg`` on ``nproc`` H200s at :data:`RATES`."""
    c, d, rest = layer_flops(cfg, method="obd", nsamples=nsamples, seqlen=seqlen, dtype=dtype)
    L = cfg["num_hidden_layers"]
    rc = RATES[f"calib_{'bfloat16' if dtype != 'float32' else 'float32'}"]
    rd = RATES["decompose_float64"]
    calib_s = (c * L + rest) / (rc[0] * rc[1]) / nproc
    dec_s = d * L / (rd[0] * rd[1]) / nproc
    p = plan_run(cfg, method="obd", nsamples=nsamples, seqlen=seqlen, dtype=dtype, nproc=nproc, correct="none")
    return {"calib_s": calib_s, "dec_s": dec_s, "total_s": calib_s + dec_s, "calib_rate": rc[2], "dec_rate": rd[2],
            "device_gib": p["peak_device_bytes_per_rank"] / 2**30, "factor_gb": p["host_factor_bytes"] / 1e9,
            "boundary_gb": p["host_boundary_bytes_per_rank"] / 1e9}


def _f(x, nd=1) -> str:
    return f"{float(x):,.{nd}f}"


def derive(row: dict) -> str:
    L = int(row["layers"])
    ns, sl = int(row["nsamples"]), int(row["seqlen"])
    cfg7 = {**PRESETS["llama-7b"], "torch_dtype": "float32"}
    c, d, rest = layer_flops(cfg7, method="obd", nsamples=ns, seqlen=sl, dtype="float32")
    fwd, bwd, dec = (float(row[f"{k}_layer_median_s"]) for k in ("forward", "backward", "decompose"))
    # CPU seconds of the child: what the layer costs on one core, whatever the machine's load
    cfwd, cbwd, cdec = (float(row[f"{k}_layer_median_cpu_s"]) for k in ("forward", "backward", "decompose"))
    save_layer = float(row["stage_save_s"]) / L
    wall, cpu = float(row["wall_s"]), float(row["user_s"]) + float(row["sys_s"])
    per_layer, cpu_layer = fwd + bwd + dec + save_layer, cfwd + cbwd + cdec + save_layer
    wall32, cpu32 = wall + (32 - L) * per_layer, cpu + (32 - L) * cpu_layer
    # of the calibration FLOPs of a layer: the forward is a quarter (forward, backward 2x, recomputed forward)
    fwd_flops = c / 4
    plan32 = plan_run(cfg7, method="obd", nsamples=ns, seqlen=sl, dtype="float32", correct="none",
                      max_host_memory=int(row["max_host_memory"]))
    plan_run_L = plan_run({**cfg7, "num_hidden_layers": L}, method="obd", nsamples=ns, seqlen=sl, dtype="float32",
                          correct="none", max_host_memory=int(row["max_host_memory"]))
    lines = [
        ("# A Llama-2-7B-shaped model on this CPU: the whole model measured; GPU and 70B times DERIVED (issue #30)"
         if L == 32 else
         "# A Llama-2-7B-shaped model on this CPU: measured layers, DERIVED whole-model times (issue #30)"),
        "",
        "Written by `python -m benchmarks.scale_7b_derive` from `benchmarks/results/scale_7b.csv` "
        f"(git {row['git_sha']}, {row['timestamp']}). **Everything below the first table is DERIVED** "
        "(arithmetic on measured per-layer times, `obdk plan` FLOP counts and assumed GPU rates), not measured.",
        "",
        "## Measured",
        "",
        f"`obdk compress` of a random fp32 Llama-2-7B-shaped checkpoint with **{L} decoder layers** (hidden 4096, "
        f"intermediate 11008, vocabulary 32000; {_f(row['model_disk_gb'], 2)} GB on disk), `--stream "
        f"--weights-on-disk --method obd --keep {row['keep']} --correct none`, {ns} x {sl} tokens of WikiText-2, "
        f"`--max-host-memory` {int(row['max_host_memory']) / 2**30:.0f} GiB, on {row['device_name']} "
        f"(load average {row['loadavg_mean']} mean, {row['loadavg_max']} max during the run: the machine was shared).",
        "",
        "| what | measured | `obdk plan` |",
        "|---|---|---|",
        f"| peak RSS (from outside, `wait4`) | {row['peak_rss_gib']} GiB | "
        f"{plan_run_L['host_peak_bytes_per_rank'] / 2**30:.2f} GiB (host peak of a streamed CPU run) |",
        f"| peak scratch disk | {row['peak_scratch_gb']} GB | {plan_run_L['scratch_bytes_per_rank'] / 1e9:.2f} GB |",
        f"| kept factors (all layers) | see scratch + host | {plan_run_L['host_factor_bytes'] / 1e9:.2f} GB |",
        f"| peak scratch + output checkpoint | {row['peak_scratch_plus_out_gb']} GB | |",
        f"| wall | {_f(wall)} s | |",
        f"| per layer: forward sweep / backward sweep / decompositions (median), wall | {fwd} / {bwd} / {dec} s | |",
        f"| the same in the child's CPU seconds ({row['threads']} thread) | {cfwd} / {cbwd} / {cdec} s | |",
        f"| host RSS by phase (sampled) | {row['rss_by_phase_gib']} GiB | |",
        f"| save | {row['stage_save_s']} s ({row['ckpt_shards']} shards, largest {row['ckpt_largest_shard_gb']} GB) | |",
        f"| ranks sum / dense / keep actual | {row['ranks_sum']} / {row['ranks_dense']} / {float(row['keep_actual']):.4f} | |",
        f"| `obdk eval` perplexity ({row['ppl_windows']} windows, {row['eval_dtype']}) | {float(row['ppl']):.4g} "
        f"(random weights: finite is the check) | |",
        f"| transformers load + forward | {row['hf_class']}, {row['hf_lowrank_modules']} LowRankLinear, logits "
        f"finite {row['hf_logits_finite']} | |",
        "",
        f"Planner against measurement. Scratch: the plan counts the boundary buffers "
        f"({int(row['plan_host_boundary_bytes_per_rank']) / 1e9:.2f} GB, spilled at `--max-host-memory 0`; "
        f"{row['peak_scratch_mapped_gb']} GB seen mapped) as held while every layer's factors are written; the "
        f"backward sweep frees them first, so the measured peak is the factors alone: the plan is an upper bound by "
        f"the boundary bytes. Host: `obdk plan`'s host peak adds up what the measured peak (the decompositions) holds: "
        f"the embeddings and LM head (1.05 GB fp32), one layer's weights ({plan_run_L['layer_params'] * 4 / 1e9:.2f} GB), "
        f"its statistics ({plan_run_L['layer_stats_bytes'] / 1e9:.2f} GB fp32, the plan's figure) and one fp64 "
        f"decomposition of an 11008 x 4096 matrix (W, both covariances, the Cholesky root, T, T C, K, its "
        f"eigenvectors and LAPACK work, the factors: about 2.5 GB) = 6.3 GB, plus the boundary buffers (memory-mapped "
        f"at --max-host-memory 0, their touched pages resident) and the interpreter: "
        f"{float(row['peak_rss_gib']) * 2**30 / 1e9:.2f} GB measured, "
        f"{plan_run_L['host_peak_bytes_per_rank'] / 1e9:.2f} GB planned (the interpreter counted as the 0.46 GB a "
        f"process with torch, transformers and obdk imported holds). With 2 workers (two such decompositions at "
        f"once) and the spectra compacted only after the layer, a 4-layer run peaked at 8.8 GB and was OOM-killed on "
        f"this shared machine; this row ran 1 worker, each spectrum compacted in its worker.",
        "",
        "## DERIVED: FLOPs of one decoder layer and the rates this CPU achieved",
        "",
        f"`obdk plan` counts, per Llama-2-7B layer at {ns} x {sl} tokens: calibration {c:.3g} FLOPs (forward "
        f"{fwd_flops:.3g}, backward 2x, the recomputed forward, the Grams), decompositions {d:.3g} FLOPs; the LM "
        f"head and embeddings {rest:.3g}. Per CPU second of the child (median layer): forward {cfwd} s "
        f"({fwd_flops / cfwd / 1e9:.1f} GFLOP/s), backward with the Grams {cbwd} s "
        f"({(c - fwd_flops) / cbwd / 1e9:.1f} GFLOP/s), decompositions {cdec} s ({d / cdec / 1e9:.1f} GFLOP/s, fp64); "
        f"the counts are the planner's formulas, so these rates are only as exact as they are.",
        "",
        "## DERIVED: whole runs",
        "",
        "| run | where | calibration | decompositions | total | how |",
        "|---|---|---|---|---|---|",
        *([f"| Llama-2-7B shape, 32 layers, fp32, {ns}x{sl}, --correct none | this CPU as it was during the run "
           f"(load {row['loadavg_mean']}) | - | - | **{_f(wall / 3600, 2)} h MEASURED** (CPU {_f(cpu / 3600, 2)} h) | "
           f"the whole run above, wall clock |"] if L == 32 else []),
        f"| Llama-2-7B shape, 32 layers, fp32, {ns}x{sl}, --correct none | this CPU, one core to itself | "
        f"{_f(32 * (cfwd + cbwd) / 3600, 2)} h | {_f(32 * cdec / 3600, 2)} h | **{_f(cpu32 / 3600, 2)} h** | "
        f"measured {L}-layer CPU seconds + {32 - L} x the measured per-layer CPU seconds ({_f(cpu_layer)} s incl. "
        f"save) |",
        f"| the same | this CPU as shared during the run (load {row['loadavg_mean']}) | "
        f"{_f(32 * (fwd + bwd) / 3600, 2)} h | {_f(32 * dec / 3600, 2)} h | **{_f(wall32 / 3600, 2)} h** | "
        f"measured {L}-layer wall + {32 - L} x measured per-layer wall ({_f(per_layer)} s incl. save) |",
    ]
    for name, cfg, dtype, nproc, (n2, s2) in (
            ("Llama-2-7B shape, 32 layers, fp32", cfg7, "float32", 1, (ns, sl)),
            ("Llama-2-7B shape, 32 layers, fp32", cfg7, "float32", 1, (32, 512)),
            ("Llama-3-70B, 80 layers, bf16", PRESETS["llama-3-70b"], "bfloat16", 1, (32, 512)),
            ("Llama-3-70B, 80 layers, bf16", PRESETS["llama-3-70b"], "bfloat16", 8, (32, 512)),
            ("Llama-3-70B, 80 layers, bf16", PRESETS["llama-3-70b"], "bfloat16", 8, (128, 2048))):
        g = gpu_hours(cfg, nproc, dtype, n2, s2)
        lines.append(f"| {name}, {n2}x{s2} | {nproc} x H200{' (torchrun)' if nproc > 1 else ''} | "
                     f"{_f(g['calib_s'] / 60, 1)} min | {_f(g['dec_s'] / 60, 1)} min | **{_f(g['total_s'] / 60, 1)} min** | "
                     f"compute only at {g['calib_rate']} / {g['dec_rate']}; device {g['device_gib']:.1f} GiB per rank, "
                     f"kept factors {g['factor_gb']:.0f} GB on host or scratch |")
    lines += [
        "",
        "Assumptions of the GPU rows (not measured: no GPU was available to this run): "
        + "; ".join(f"{v[2]}" for v in RATES.values())
        + ". The peaks are NVIDIA's H100/H200 SXM datasheet figures (the H200 has the H100's compute); the "
        "efficiencies are guesses. The rows leave out reading the weights (three passes over the checkpoint with "
        "`--weights-on-disk`: 27 GB each for the fp32 7B shape, 141 GB for the 70B in bf16), the copies between "
        "host and device, the save, and the collectives of torchrun; on this CPU those are inside the measured "
        "times. The 8-GPU rows divide both the calibration (windows split over the ranks) and the decompositions "
        "(each matrix decomposed by its owner rank) by 8.",
        "",
        f"Whole 32-layer run, `obdk plan` for this machine's settings: kept factors "
        f"{plan32['host_factor_bytes'] / 1e9:.1f} GB; scratch disk under `--max-host-memory "
        f"{int(row['max_host_memory'])}` {plan32['scratch_bytes_per_rank'] / 1e9:.1f} GB (the factors and the "
        f"boundary buffers), next to the 26.9 GB model and the ~22 GB output; with the default corrections "
        f"(zs+kfac) every layer's statistics are kept too: "
        f"{plan_run(cfg7, method='obd', nsamples=ns, seqlen=sl, dtype='float32')['host_kept_stats_bytes'] / 1e9:.0f}"
        " GB more, which this machine's disk (77 GB free) cannot hold next to the model and the output.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=str(RESULTS / "scale_7b.csv"))
    ap.add_argument("--out", default=str(RESULTS / "scale_7b.md"))
    args = ap.parse_args(argv)
    rows = [r for r in read_rows(args.csv) if r["correct"] == "none" and int(r["layers"]) >= 2]
    if not rows:
        raise SystemExit(f"{args.csv}: no --correct none row with 2 or more layers (run benchmarks.bench_scale_7b)")
    text = derive(rows[-1])
    Path(args.out).write_text(text)
    print(text)
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
