"""The ``obdk`` command line: compress, eval, generate, inspect, env.

Library code logs; only this module prints. ``--json`` makes ``compress`` and
``eval`` print one JSON object as their last line.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local data directory laid out like shared/data (default: $OBDK_DATA_DIR, else the HF hub)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="obdk", description="Low-rank LLM compression (Optimal Brain Decomposition)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="verb", required=True)

    c = sub.add_parser("compress", help="compress a causal LM and save it")
    c.add_argument("model", help="HF id or directory, a .gguf file, or the alias smollm2-135m")
    c.add_argument("--method", default="obd", help="svd | svd-llm | asvd | obd | zs-svd | bsi (default obd)")
    c.add_argument("--keep", type=float, nargs="+", default=[0.8],
                   help="fraction(s) of targeted Linear parameters kept; several write one model each")
    c.add_argument("--alloc", default=None, help="uniform | global | zero-sum | bsi (default: the method's)")
    c.add_argument("--whitening", default=None, help="override the method's whitening: svd | svd-llm | obd")
    c.add_argument("--calib", default="wikitext2:validation", help="NAME[:SPLIT] (wikitext2, c4) or a file path")
    c.add_argument("--nsamples", type=int, default=32)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--calib-batch-size", type=int, default=1,
                   help="calibration windows per forward/backward pass (more: faster, more memory)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--rank-multiple", type=int, default=8)
    c.add_argument("--damping", type=float, default=0.01)
    c.add_argument("--floor", type=float, default=0.2,
                   help="global allocation: per-matrix rank floor as a fraction of the uniform rank")
    c.add_argument("--fisher", default="empirical", choices=["empirical", "true"])
    c.add_argument("--correct", default=None, choices=["none", "zs", "kfac", "zs+kfac", "seq"],
                   help="after truncation: none, zs (ZS-SVD's one-step projected gradient), kfac (the same step along the "
                        "K-FAC natural gradient), zs+kfac (both in turn) or seq (refit); default: the method's "
                        "(obd: zs+kfac)")
    c.add_argument("--probes", type=int, default=4)
    c.add_argument("--eps", type=float, default=1e-3)
    c.add_argument("--bsi-order", default="importance", choices=["importance", "spectral"],
                   help="bsi allocation: keep the most important bases (BSI) or only choose ranks (spectral)")
    c.add_argument("--targets", nargs="*", default=None, help="fnmatch patterns of module names to compress")
    c.add_argument("--ignore", nargs="*", default=[], help="fnmatch patterns of module names to keep dense")
    c.add_argument("--compute-dtype", default="float64", choices=["float64", "float32"])
    c.add_argument("--solver", default="eig", choices=["eig", "cholesky"])
    c.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True, help="output directory (with several --keep: DIR-keep0.8, ...)")
    c.add_argument("--eval-windows", type=int, default=0,
                   help="after saving, evaluate WikiText-2 perplexity on this many windows of --seqlen")
    c.add_argument("--json", action="store_true")
    _add_data_dir(c)

    e = sub.add_parser("eval", help="perplexity of a model or compressed directory")
    e.add_argument("model")
    e.add_argument("--dataset", default="wikitext2", help="NAME[:SPLIT] (wikitext2, c4) or a file path")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (default all)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--dtype", default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    _add_data_dir(e)

    g = sub.add_parser("generate", help="generate text from a model or compressed directory")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--dtype", default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--backend", default=None, help="force the low-rank backend (torch, cpp, triton, cuda)")

    i = sub.add_parser("inspect", help="ranks and report of a compressed directory")
    i.add_argument("dir")
    i.add_argument("--heatmap", default=None, help="write a layers × module-type rank heatmap PNG here")
    i.add_argument("--json", action="store_true")

    sub.add_parser("env", help="versions, extension status and op backends")
    return ap


# --------------------------------------------------------------------------- verbs


def _load(spec: str, dtype, device):
    from .hub import load_model
    return load_model(spec, dtype=dtype, device=device)  # dtype names are parsed (and checked) there


def cmd_compress(args) -> int:
    import torch

    import obdk
    from .pipeline import StageTimer, _nparams, prepare
    from .config import LowRankConfig

    cfg = LowRankConfig(method=args.method, keep=args.keep[0], alloc=args.alloc, whitening=args.whitening,
                        targets=args.targets, ignore=args.ignore, rank_multiple=args.rank_multiple,
                        damping=args.damping, floor=args.floor, compute_dtype=args.compute_dtype,
                        solver=args.solver, fisher=args.fisher, correct=args.correct, probes=args.probes,
                        eps=args.eps, bsi_order=args.bsi_order)
    for k in args.keep:
        LowRankConfig(method=args.method, keep=k)  # validates every --keep
    timer = StageTimer()
    with timer("load"):
        model, tok = _load(args.model, args.dtype, args.device)
    before = _nparams(model)
    dense_eval = None
    if args.eval_windows:  # the dense model on the same windows, for the measured loss increase
        from .eval import perplexity
        with torch.inference_mode():
            dense_eval = perplexity(model, tok, "wikitext2", seqlen=args.seqlen, windows=args.eval_windows,
                                    data_dir=args.data_dir)
    plan = prepare(model, cfg, args.calib, tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen,
                   seed=args.seed, data_dir=args.data_dir, timer=timer, calib_batch_size=args.calib_batch_size)
    results = []
    base = None
    if len(args.keep) > 1:
        base = model
    for idx, keep in enumerate(args.keep):
        t0 = time.perf_counter()
        m = copy.deepcopy(base) if base is not None else model
        report = plan.apply(m, keep=keep, model_params_before=before)
        out = Path(args.out if len(args.keep) == 1 else f"{args.out}-keep{keep:g}")
        save_timer = StageTimer()
        with save_timer("save"):
            obdk.save_pretrained(m, out, tokenizer=tok, report=report)
        report.stages.update(save_timer.to_dict())
        marginal = time.perf_counter() - t0
        row = {"out": str(out), "keep": keep, "keep_actual": report.keep_actual,
               "targeted_params_before": report.targeted_params_before,
               "targeted_params_after": report.targeted_params_after,
               "model_params_before": report.model_params_before, "model_params_after": report.model_params_after,
               "predicted_loss": report.predicted_loss, "method": args.method,
               "alloc": cfg.alloc or cfg.resolved_alloc, "stages": report.stages,
               "seconds_this_ratio": marginal}
        if args.eval_windows:
            from .eval import perplexity
            with torch.inference_mode():
                row["eval"] = perplexity(m, tok, "wikitext2", seqlen=args.seqlen, windows=args.eval_windows,
                                         data_dir=args.data_dir)
            if dense_eval is not None:
                report.record_measurement(dense_eval, row["eval"])
                row["measured"] = report.measured
        # rewrite the report with the save stage included
        (out / "obdk_report.json").write_text(json.dumps({**report.to_dict(), "cli": row}, indent=2, default=str))
        results.append(row)
        if not args.json:
            print(f"[{idx + 1}/{len(args.keep)}] keep={keep:g} → {out}")
            print("  " + report.summary().replace("\n", "\n  "))
            if idx > 0:
                print(f"  marginal cost of this ratio: {marginal:.1f}s")
            if "eval" in row:
                print(f"  wikitext2 ppl ({row['eval']['windows']}×{args.seqlen}): {row['eval']['ppl']:.2f} "
                      f"(dense {dense_eval['ppl']:.2f}; loss increase measured {report.measured['loss_increase']:.3f} "
                      f"vs predicted {report.predicted_loss:.3f} nats)")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}, default=str))
    return 0


def cmd_eval(args) -> int:
    from .eval import perplexity
    model, tok = _load(args.model, args.dtype, args.device)
    res = perplexity(model, tok, args.dataset, seqlen=args.seqlen, windows=args.windows,
                     batch_size=args.batch_size, data_dir=args.data_dir, device=args.device)
    res["model"] = args.model
    if args.json:
        print(json.dumps(res, default=str))
    else:
        print(f"{args.model}: {res['dataset']} ppl {res['ppl']:.3f} "
              f"({res['windows']} windows × {res['seqlen']} tokens, {res['tokens']} tokens, {res['seconds']:.1f}s)")
    return 0


def cmd_generate(args) -> int:
    import torch
    if args.backend:
        os.environ["OBDK_BACKEND"] = args.backend
    model, tok = _load(args.model, args.dtype, args.device)
    enc = tok(args.prompt, return_tensors="pt").to(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out.shape[1] - enc["input_ids"].shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    print(f"[{new} new tokens in {dt:.2f}s, {new / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_dir
    rep = inspect_dir(args.dir, heatmap=args.heatmap)
    if args.json:
        print(json.dumps(rep["data"], default=str))
    else:
        print(rep["text"])
    return 0


def cmd_env(args) -> int:
    from .env import format_report, report
    print(format_report(report()))
    return 0


VERBS = {"compress": cmd_compress, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``obdk`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return VERBS[args.verb](args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"obdk {args.verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
