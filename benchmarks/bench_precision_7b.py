"""fp32 or fp64 for the decompositions at Llama-7B widths? Measured on synthetic statistics.

``bench_precision.py`` answers the question on real SmolLM2-135M statistics (widths 576/1536).
No 7B model can be downloaded here, so this script builds seeded, deterministic synthetic
``(W, C_x, C_g)`` triples at Llama-7B widths (d = 4096, ffn = 11008; ``--scale`` multiplies both:
``0.125`` for a seconds-long smoke test, ``0.140625`` gives SmolLM2's widths 576/1548) with the
features that make real 7B statistics hard, and measures fp32's *excess K-FAC loss over fp64*.

Shapes (m = out, n = in): ``q`` d×d (C_x d, C_g d), ``gate`` ffn×d (C_x d, C_g ffn), ``down``
d×ffn (C_x ffn, C_g d). Every orthogonal basis is the Q of a QR of a seeded fp64 Gaussian (column
signs fixed by diag R, i.e. Haar), so W, C_x and C_g have independent random eigenbases.
Construction, all in fp64 (defaults = the ``brief-spec`` recipe; flags in brackets):

* ``W = U diag(s) Vᵀ`` (U m×p, V n×p, p = min(m, n)): ``s_k = k^-0.5`` [``--w-beta``] with the
  leading values multiplied by (8, 5, 3, 2) [``--w-lead``]; scaled to ``‖W‖_F = 0.02·√(mn)``.
  Stored in fp32, as the model holds it (so both truncations come back as fp32 factors).
* ``C_x = Q diag(λ) Qᵀ + outliers``: ``λ_k = k^-1.5`` [``--cx-beta``] (``λ_1 = 1``), the last 1 %
  [``--tail-frac``] falling geometrically to ``λ_n = 1e-8`` [``--cx-min-rel``] (a power-law bulk,
  then a few near-null directions, the shape of real spectra); scaled to mean diagonal 1; then
  four "massive activation" channels (random coordinates) get (1e3, 2e3, 5e3, 1e4) × the median
  diagonal added to their diagonal entries [``--cx-outliers``]. Cast to fp32 as obdk's
  calibration stores it.
* ``C_g = Q diag(λ) Qᵀ``: steeper, nearly low rank: ``λ_k = k^-2`` [``--cg-beta``], tail to
  ``1e-10`` [``--cg-min-rel``], mean diagonal 1e-8 (gradient magnitudes) [``--cg-mean-diag``];
  ``--cg-outliers N`` adds outlier channels like C_x's (default 0). Cast to fp32.

``--label`` names the recipe in the CSV. ``smollm2-matched`` (``--w-beta 0.3 --w-lead 2 1.5
--cx-beta 0.9 --cg-beta 1.0``, outliers and tails as above) has the spectral slopes measured on
SmolLM2-135M's real weights and statistics (W: s_k ~ k^-0.2…-0.6; C_x: λ_k ~ k^-0.7…-1.7;
C_g: k^-0.5…-2); ``brief-spec`` is much steeper, a stress test.

Measurement, for every method (``svd-llm``, ``obd``; solver ``eig``) × shape × damping α
(``--alphas``, default 0.01 = obdk's default, and 1e-4): ``spectrum(..., compute_dtype=fp64)``
then ``fp32`` (same damping, timed back to back, same process), both truncated to
``r = floor(keep · mn/(m+n))`` for every ``--keeps`` (``keep_dense_at_break_even=False``). The
K-FAC loss ``½ tr(C_g Δ C_x Δᵀ)`` of each truncation (``Δ = W − B A``) is evaluated in fp64 against
the fp32-stored statistics upcast and damped with the fp64 spectrum's damping per side
(``damp_covariance``, as ``bench_precision.py``): ``excess_rel_fp32 = (L32 − L64)/L64``. The same
products also give the undamped loss (``loss_undamped_*``, ``excess_rel_undamped``): the loss
terms ``tr(C_g Δ C_x Δᵀ)``, ``tr(C_g Δ Δᵀ)``, ``tr(Δ C_x Δᵀ)``, ``‖Δ‖²`` are computed once and combined
for any damping (``--verify-loss`` checks the damped value against ``kfac_loss``). Also: the
largest relative difference of the top-r eigenvalues, the damping each decomposition used
(``damping_{cx,cg}_fp{64,32}``), numerical rank and predicted loss of each, wall times, and two
properties of the fp64 spectrum λ that predict the fp32 error: ``lam_r_over_lam1 = λ_r/λ_1`` and
``tail_over_lam1 = Σ_{i>r} λ_i / λ_1`` (fp32's eigen-solver resolves λ only to ~1e-7·λ_1).
Rows are appended to the CSV after every shape (so ``--shapes`` can split a long run);
generated statistics are cached under ``--cache-dir``.

    python -m benchmarks.bench_precision_7b --scale 0.125 --verify-loss --out /tmp/p7b_small.csv
    python -m benchmarks.bench_precision_7b --shapes q gate
    python -m benchmarks.bench_precision_7b --shapes down
    python -m benchmarks.bench_precision_7b --label smollm2-matched --w-beta 0.3 --w-lead 2 1.5 \
        --cx-beta 0.9 --cg-beta 1.0 --shapes q gate down
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from .core.env import RESULTS, env_fields
from .core.rows import print_table, write_csv

D, FFN = 4096, 11008
SHAPE_NAMES = ("q", "gate", "down")
W_RMS = 0.02                            # RMS of a 7B weight entry
CX_OUTLIER_RATIOS = (1e3, 2e3, 5e3, 1e4)  # massive-activation channels, × median diagonal


def shape_of(name: str, scale: float) -> tuple:
    d, ffn = max(8, round(D * scale)), max(8, round(FFN * scale))
    return {"q": (d, d), "gate": (ffn, d), "down": (d, ffn)}[name]


# --------------------------------------------------------------------------- synthetic statistics


def _orthogonal(p: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-distributed p×k matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _powerlaw(p: int, beta: float, min_rel: float, tail_frac: float) -> torch.Tensor:
    """``λ_k = k^-β`` (``λ_1 = 1``), the last ``⌈tail_frac·p⌉`` values falling geometrically to ``λ_p = min_rel``.

    Real covariances look like this: a power-law bulk, then a few near-null directions. Where the
    power law itself ends below ``min_rel``, values are floored at ``min_rel``.
    """
    lam = torch.arange(1, p + 1, dtype=torch.float64).pow(-beta)
    t = min(p - 1, math.ceil(tail_frac * p))
    start = float(lam[p - t - 1]) if t > 0 else min_rel
    if t > 0 and start > min_rel:
        lam[p - t:] = start * (min_rel / start) ** (torch.arange(1, t + 1, dtype=torch.float64) / t)
    return lam.clamp_min(min_rel)


def _covariance(p: int, beta: float, min_rel: float, tail_frac: float, mean_diag: float, outlier_ratios,
                gen) -> torch.Tensor:
    lam = _powerlaw(p, beta, min_rel, tail_frac)
    q = _orthogonal(p, p, gen)
    c = (q * lam) @ q.T
    del q
    c = (c + c.T) / 2
    c *= mean_diag / float(torch.diagonal(c).mean())
    if outlier_ratios:
        idx = torch.randperm(p, generator=gen)[:len(outlier_ratios)]
        med = float(torch.diagonal(c).median())
        for i, ratio in zip(idx.tolist(), outlier_ratios):
            c[i, i] += ratio * med
    return c.to(torch.float32)


def _weight(m: int, n: int, beta: float, lead, gen) -> torch.Tensor:
    p = min(m, n)
    s = torch.arange(1, p + 1, dtype=torch.float64).pow(-beta)
    for i, f in enumerate(lead[:p]):
        s[i] *= f
    s *= W_RMS * math.sqrt(m * n) / float(s.norm())
    u = _orthogonal(m, p, gen)
    v = _orthogonal(n, p, gen)
    return ((u * s) @ v.T).to(torch.float32)


def build_stats(name: str, scale: float, seed: int, params: dict, cache_dir: str | None) -> dict:
    """``{"w": [m, n], "cx": [n, n], "cg": [m, m]}`` fp32, deterministic in (name, scale, seed, params)."""
    m, n = shape_of(name, scale)
    key = json.dumps({"name": name, "m": m, "n": n, "seed": seed, "w_rms": W_RMS, **params}, sort_keys=True)
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"{name}_{m}x{n}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
        if path.exists():
            return torch.load(path)
    sid = SHAPE_NAMES.index(name)
    gens = [torch.Generator().manual_seed(seed * 1000 + 10 * sid + j) for j in range(3)]
    out = {"w": _weight(m, n, params["w_beta"], [float(x) for x in params["w_lead"].split()], gens[0]),
           "cx": _covariance(n, params["cx_beta"], params["cx_min_rel"], params["tail_frac"], 1.0,
                             CX_OUTLIER_RATIOS[:params["cx_outliers"]], gens[1]),
           "cg": _covariance(m, params["cg_beta"], params["cg_min_rel"], params["tail_frac"], params["cg_mean_diag"],
                             CX_OUTLIER_RATIOS[:params["cg_outliers"]], gens[2])}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


# --------------------------------------------------------------------------- loss


def loss_terms(delta: torch.Tensor, cx: torch.Tensor, cg) -> dict:
    """fp64 traces of ``Δ`` [m, n] against undamped ``cx`` [n, n], ``cg`` [m, m] (or None: identity).

    ``gx = tr(C_g Δ C_x Δᵀ)``, ``g = tr(C_g Δ Δᵀ)``, ``x = tr(Δ C_x Δᵀ)``, ``o = ‖Δ‖²``: the damped loss
    for damped ``C + a·I`` is ``½(gx + a_x g + a_g x + a_x a_g o)`` (all terms ≥ 0, no cancellation).
    """
    p = delta @ cx
    t = {"x": float((delta * p).sum()), "o": float((delta * delta).sum())}
    if cg is None:
        t["gx"], t["g"] = t["x"], t["o"]
    else:
        g = cg @ delta
        t["gx"], t["g"] = float((g * p).sum()), float((g * delta).sum())
    return t


def combine(t: dict, ax_abs: float, ag_abs: float) -> float:
    """``½ tr((C_g + a_g I) Δ (C_x + a_x I) Δᵀ)`` from :func:`loss_terms` (absolute dampings)."""
    return 0.5 * (t["gx"] + ax_abs * t["g"] + ag_abs * t["x"] + ax_abs * ag_abs * t["o"])


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES), choices=SHAPE_NAMES)
    ap.add_argument("--methods", nargs="+", default=["svd-llm", "obd"], choices=["svd-llm", "obd"])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.01, 1e-4])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--solver", default="eig", choices=["eig", "cholesky"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies d=4096 and ffn=11008 (0.125: a quick test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-beta", type=float, default=0.5, help="singular values of W: s_k = k^-w_beta")
    ap.add_argument("--w-lead", type=float, nargs="*", default=[8.0, 5.0, 3.0, 2.0],
                    help="multipliers of the leading singular values of W")
    ap.add_argument("--cx-beta", type=float, default=1.5)
    ap.add_argument("--cx-min-rel", type=float, default=1e-8)
    ap.add_argument("--cx-outliers", type=int, default=4, choices=range(len(CX_OUTLIER_RATIOS) + 1))
    ap.add_argument("--tail-frac", type=float, default=0.01, help="share of eigenvalues in the near-null tail")
    ap.add_argument("--cg-beta", type=float, default=2.0)
    ap.add_argument("--cg-min-rel", type=float, default=1e-10)
    ap.add_argument("--cg-mean-diag", type=float, default=1e-8)
    ap.add_argument("--cg-outliers", type=int, default=0, choices=range(len(CX_OUTLIER_RATIOS) + 1))
    ap.add_argument("--label", default="brief-spec", help="name of the statistics recipe (a CSV column)")
    ap.add_argument("--verify-loss", action="store_true", help="also evaluate kfac_loss directly and compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="/tmp/obdk-synth7b-cache", help="generated statistics ('' to disable)")
    ap.add_argument("--out", default=str(RESULTS / "precision_7b_synthetic.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from obdk.decompose import damp_covariance, kfac_loss, spectrum

    params = {"w_beta": args.w_beta, "w_lead": " ".join(f"{x:g}" for x in args.w_lead), "cx_beta": args.cx_beta, "cx_min_rel": args.cx_min_rel, "cx_outliers": args.cx_outliers,
              "cg_beta": args.cg_beta, "cg_min_rel": args.cg_min_rel, "cg_mean_diag": args.cg_mean_diag,
              "cg_outliers": args.cg_outliers, "tail_frac": args.tail_frac}
    env = env_fields("cpu")
    t_start = time.perf_counter()
    all_rows = []
    for shape in args.shapes:
        m, n = shape_of(shape, args.scale)
        t0 = time.perf_counter()
        st = build_stats(shape, args.scale, args.seed, params, args.cache_dir or None)
        print(f"[{shape} {m}x{n}] statistics {time.perf_counter() - t0:.1f}s", flush=True)
        w, cx, cg = st["w"], st["cx"], st["cg"]
        w64, cx64, cg64 = w.double(), cx.double(), cg.double()
        sx, sg = float(torch.diagonal(cx64).mean()), float(torch.diagonal(cg64).mean())
        rows = []
        for method in args.methods:
            use_cg = method == "obd"
            for alpha in args.alphas:
                specs, secs = {}, {}
                for cd in (torch.float64, torch.float32):
                    gc.collect()
                    t0 = time.perf_counter()
                    specs[cd] = spectrum(w, method=method, cx=cx, cg=cg if use_cg else None, solver=args.solver,
                                         compute_dtype=cd, damping=alpha)
                    secs[cd] = time.perf_counter() - t0
                s64, s32 = specs[torch.float64], specs[torch.float32]
                print(f"[{shape} {method} a={alpha:g}] decompose fp64 {secs[torch.float64]:.1f}s "
                      f"fp32 {secs[torch.float32]:.1f}s damping {s64.damping} / {s32.damping}", flush=True)
                d64 = s64.damping
                ax_abs = d64.get("cx", 0.0) * sx
                ag_abs = d64.get("cg", 0.0) * sg if use_cg else 0.0
                for keep in args.keeps:
                    r = int(math.floor(keep * m * n / (m + n)))
                    t0 = time.perf_counter()
                    losses, und, verify = [], [], []
                    for s in (s64, s32):
                        f = s.truncate(r, keep_dense_at_break_even=False)
                        delta = w64 - f.b.double() @ f.a.double()
                        terms = loss_terms(delta, cx64, cg64 if use_cg else None)
                        losses.append(combine(terms, ax_abs, ag_abs))
                        und.append(0.5 * terms["gx"])
                        if args.verify_loss:
                            ref = kfac_loss(delta, damp_covariance(cx64, d64.get("cx", 0.0)),
                                            damp_covariance(cg64, d64.get("cg", 0.0)) if use_cg else None)
                            verify.append(abs(ref - losses[-1]) / abs(ref))
                        del delta, f
                    lam64, lam32 = s64.eigenvalues[:r], s32.eigenvalues[:r]
                    eig_rel = float(((lam32 - lam64).abs() / lam64.clamp_min(1e-300)).max())
                    row = {"shape": shape, "m": m, "n": n, "method": method, "solver": args.solver, "alpha": alpha,
                           "keep": keep, "rank": r,
                           "kfac_loss_fp64": losses[0], "kfac_loss_fp32": losses[1],
                           "excess_rel_fp32": (losses[1] - losses[0]) / losses[0],
                           "loss_undamped_fp64": und[0], "loss_undamped_fp32": und[1],
                           "excess_rel_undamped": (und[1] - und[0]) / und[0],
                           "predicted_loss_fp64": s64.tail_loss(r), "predicted_loss_fp32": s32.tail_loss(r),
                           "eig_top_r_max_reldiff": eig_rel,
                           "lam_r_over_lam1": float(s64.eigenvalues[r - 1] / s64.eigenvalues[0]),
                           "tail_over_lam1": float(s64.eigenvalues[r:].sum() / s64.eigenvalues[0]),
                           "damping_cx_fp64": d64.get("cx", 0.0), "damping_cg_fp64": d64.get("cg", 0.0),
                           "damping_cx_fp32": s32.damping.get("cx", 0.0), "damping_cg_fp32": s32.damping.get("cg", 0.0),
                           "numerical_rank_fp64": s64.numerical_rank, "numerical_rank_fp32": s32.numerical_rank,
                           "kept_fp64": s64.kept, "kept_fp32": s32.kept,
                           "decompose_s_fp64": round(secs[torch.float64], 2),
                           "decompose_s_fp32": round(secs[torch.float32], 2),
                           "speedup_fp32": round(secs[torch.float64] / secs[torch.float32], 3),
                           "label": args.label, "scale": args.scale, "seed": args.seed, **params,
                           "cx_outlier_ratios": " ".join(f"{x:g}" for x in CX_OUTLIER_RATIOS[:args.cx_outliers])}
                    if args.verify_loss:
                        row["verify_kfac_loss_reldiff"] = max(verify)
                    row.update(env)
                    rows.append(row)
                    print(f"  keep {keep} r={r}: L64 {losses[0]:.6g} L32 {losses[1]:.6g} "
                          f"excess_rel {row['excess_rel_fp32']:.3g} (undamped {row['excess_rel_undamped']:.3g}) "
                          f"eig_rel {eig_rel:.3g} [{time.perf_counter() - t0:.1f}s]"
                          + (f" verify {max(verify):.2g}" if args.verify_loss else ""), flush=True)
                del specs, s64, s32
        write_csv(rows, args.out)
        all_rows += rows
        del st, w, cx, cg, w64, cx64, cg64
        gc.collect()
    print(f"total {time.perf_counter() - t_start:.1f}s", flush=True)
    print_table(all_rows, ["shape", "method", "alpha", "keep", "rank", "excess_rel_fp32", "excess_rel_undamped",
                           "eig_top_r_max_reldiff", "damping_cx_fp32", "damping_cg_fp32", "decompose_s_fp64",
                           "decompose_s_fp32"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
