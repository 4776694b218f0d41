"""The ``obdk`` command line: compress, eval, generate, inspect, env.

Library code logs; only this module prints. ``--json`` makes ``compress`` and
``eval`` print one JSON object as their last line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"

from .errors import ObdkError  # noqa: E402  (light: no torch)


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
    c.add_argument("--stream", action="store_true",
                   help="run every pass one decoder layer at a time (the same statistics and model, one layer's "
                        "statistics resident): the model stays in host memory and each layer is copied to --device "
                        "in turn; the checkpoint is written tensor by tensor, without building the compressed model")
    c.add_argument("--weights-on-disk", action="store_true",
                   help="--stream: leave the decoder layers in the model's safetensors shards and read each one when "
                        "a pass needs it (host memory holds one layer; the model must be a local safetensors "
                        "checkpoint directory)")
    c.add_argument("--scratch-dir", default=None,
                   help="--stream: directory for the boundary activations and for each layer's kept spectra and "
                        "statistics beyond --max-host-memory")
    c.add_argument("--max-host-memory", type=int, default=None, metavar="BYTES",
                   help="--stream: host bytes for the boundary activations, and for the kept spectra and (with a "
                        "correction) statistics, before they spill to --scratch-dir")
    c.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: seconds a rank waits for the others in a collective (also while rank 0 "
                        "applies, evaluates and saves) before the job fails")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--rank-multiple", type=int, default=None, help="ranks rounded to a multiple of this (default 8)")
    c.add_argument("--damping", type=float, default=0.01)
    c.add_argument("--floor", type=float, default=None,
                   help="global/bsi allocation: per-matrix rank floor as a fraction of the uniform rank (default 0.2)")
    c.add_argument("--fisher", default="empirical", choices=["empirical", "true"])
    c.add_argument("--correct", default=None, choices=["none", "zs", "kfac", "zs+kfac", "zs-guarded", "seq"],
                   help="after truncation: none, zs (ZS-SVD's one-step projected gradient), kfac (the same step along the "
                        "K-FAC natural gradient), zs+kfac (both in turn), zs-guarded (zs with its step size chosen in "
                        "{0, .25, .5, .75, 1} on the last 8 calibration windows, held out from its gradient; 0 = no "
                        "correction; not with --stream) or seq (refit); default: the method's (obd: zs+kfac)")
    c.add_argument("--bsi-curvature", default=None, choices=["hutchinson", "blocked", "kfac", "fisher"],
                   help="bsi allocation: the Hessian diagonal in σ: hutchinson (all matrices probed at once), blocked "
                        "(Hutchinson per matrix), kfac (from C_x, C_g: no pass) or fisher (exact empirical-Fisher "
                        "diagonal, one pass) (default: the config's)")
    c.add_argument("--probes", type=_probes_arg, default=4,
                   help="bsi Hutchinson probes (per block), or 'auto' (until --probe-tol; at most --max-probes)")
    c.add_argument("--probe-tol", type=float, default=None,
                   help="--probes auto: stop at this relative standard error per matrix (default 0.1)")
    c.add_argument("--max-probes", type=int, default=None, help="--probes auto: at most this many probes (default 64)")
    c.add_argument("--eps", type=float, default=1e-3)
    c.add_argument("--bsi-order", default=None, choices=["importance", "spectral"],
                   help="bsi allocation: keep the most important bases (BSI) or only choose ranks (spectral) "
                        "(default: the config's)")
    c.add_argument("--bsi-terms", default=None, choices=["first+second", "second"],
                   help="bsi allocation: the importance's Taylor terms: first+second (the seed's −g·σ + ½h·σ²) or "
                        "second (½h·σ², the calibration gradient's first-order term left out) (default: the config's)")
    c.add_argument("--targets", nargs="*", default=None, help="fnmatch patterns of module names to compress")
    c.add_argument("--ignore", nargs="*", default=[], help="fnmatch patterns of module names to keep dense")
    c.add_argument("--compute-dtype", default="float64", choices=["float64", "float32"])
    c.add_argument("--solver", default="eig", choices=["eig", "cholesky"])
    c.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True, help="output directory (with several --keep: DIR-keep0.8, ...)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not an obdk checkpoint (never the input model's directory)")
    c.add_argument("--eval-windows", type=int, default=0,
                   help="after saving, evaluate WikiText-2 perplexity on this many windows of --seqlen")
    c.add_argument("--eval-tasks", default=None,
                   help="after saving, zero-shot accuracy of the dense and compressed model on these lm-eval tasks "
                        "(comma-separated, e.g. arc_easy,piqa; needs obdk[eval]), recorded in the report")
    c.add_argument("--eval-limit", type=int, default=None, help="--eval-tasks: score the first N documents of each task")
    c.add_argument("--json", action="store_true")
    _add_data_dir(c)

    e = sub.add_parser("eval", help="perplexity (and, with --tasks, zero-shot accuracy) of a model or compressed directory")
    e.add_argument("model")
    e.add_argument("--dataset", default=None,
                   help="NAME[:SPLIT] (wikitext2, c4) or a file path (default wikitext2; with --tasks, perplexity "
                        "runs only when --dataset is given)")
    e.add_argument("--tasks", default=None,
                   help="zero-shot accuracy through lm-evaluation-harness on these tasks, comma-separated "
                        "(arc_easy,arc_challenge,piqa,hellaswag,winogrande: local data; any lm-eval task name)")
    e.add_argument("--limit", type=int, default=None, help="--tasks: score the first N documents of each task")
    e.add_argument("--num-fewshot", type=int, default=0, help="--tasks: examples in each prompt (default 0)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (default all)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward for perplexity (default 1), requests per forward for --tasks "
                        "(default 8, the fastest measured with the same accuracies as 1)")
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

    pl = sub.add_parser("plan", help="memory and FLOPs a compression will need, from config.json alone")
    pl.add_argument("model", help="a config.json, a directory holding one, or a preset: "
                                  "llama-7b, llama-3-8b, llama-3-70b, qwen2.5-72b")
    pl.add_argument("--method", default="obd")
    pl.add_argument("--nsamples", type=int, default=32)
    pl.add_argument("--seqlen", type=int, default=512)
    pl.add_argument("--nproc", type=int, default=1, help="data-parallel ranks (torchrun --nproc-per-node)")
    pl.add_argument("--calib-batch-size", type=int, default=1)
    pl.add_argument("--dtype", default=None, help="model dtype (default the config's torch_dtype)")
    pl.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"])
    pl.add_argument("--correct", default=None, choices=["none", "zs", "kfac", "zs+kfac", "zs-guarded", "seq"],
                    help="the corrections of the run (default the method's): they keep every layer's statistics")
    pl.add_argument("--max-host-memory", type=int, default=None, metavar="BYTES",
                    help="the streamed run's --max-host-memory: how much of the kept bytes goes to scratch disk")
    pl.add_argument("--json", action="store_true")

    sub.add_parser("env", help="versions, extension status and op backends")
    return ap


# --------------------------------------------------------------------------- verbs


def _load(spec: str, dtype, device):
    from .hub import load_model
    return load_model(spec, dtype=dtype, device=device)  # dtype names are parsed (and checked) there


def _load_skeleton(spec: str, dtype):
    """``--weights-on-disk``: (skeleton model, its ShardedWeights, tokenizer) of a local safetensors checkpoint."""
    from .calibrate.placement import load_skeleton
    from .errors import ConfigError
    from .hub import _parse_dtype, load_tokenizer, resolve_model_path
    path = Path(resolve_model_path(spec))
    if not path.is_dir() or not any(f.name.endswith(".safetensors") for f in path.iterdir()):
        raise ConfigError(f"--weights-on-disk: {spec} is not a local directory of safetensors shards (a GGUF file or "
                          f"a hub id is loaded whole; download or convert it to a directory first)")
    model, source = load_skeleton(path, dtype=_parse_dtype(dtype))
    return model, source, load_tokenizer(str(path))


def _check_device(device: str) -> str:
    """``--device`` validated before any work: a torch device string this build and machine can use."""
    import torch

    from .errors import ConfigError
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, …)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {device!r}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: obdk runs on cpu or cuda")
    return device


def _source_dirs(spec: str) -> list[str]:
    """The local directory the model is read from (a file's folder), which ``--out`` must never replace."""
    from .hub import resolve_model_path
    try:
        path = Path(resolve_model_path(spec))
    except (ObdkError, OSError, ValueError, KeyError):  # an unresolvable spec fails at load time, named there
        return []
    if not path.exists():
        return []
    return [str(path if path.is_dir() else path.parent)]


def _probes_arg(text: str):
    """``--probes``: an integer ≥ 1 or ``auto``."""
    import argparse
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer >= 1 or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"an integer >= 1 or 'auto', got {n}")
    return n


def _config_from_args(args):
    from .config import DEFAULT_FLOOR, DEFAULT_RANK_MULTIPLE, LowRankConfig
    from .errors import ConfigError
    cfg = LowRankConfig(method=args.method, keep=args.keep[0], alloc=args.alloc, whitening=args.whitening,
                        targets=args.targets, ignore=args.ignore,
                        rank_multiple=DEFAULT_RANK_MULTIPLE if args.rank_multiple is None else args.rank_multiple,
                        damping=args.damping, floor=DEFAULT_FLOOR if args.floor is None else args.floor,
                        compute_dtype=args.compute_dtype, solver=args.solver, fisher=args.fisher,
                        correct=args.correct, probes=args.probes, eps=args.eps,
                        **{k: v for k, v in (("bsi_order", args.bsi_order), ("bsi_curvature", args.bsi_curvature),
                                             ("bsi_terms", args.bsi_terms), ("probe_tol", args.probe_tol),
                                             ("max_probes", args.max_probes)) if v is not None})
    if cfg.resolved_alloc == "zero-sum":
        given = [f for f, v in (("--floor", args.floor), ("--rank-multiple", args.rank_multiple)) if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)}: the zero-sum allocation (ZS-SVD) removes components one at a "
                              f"time and uses neither; drop {'them' if len(given) > 1 else 'it'} or choose "
                              f"another --alloc")
    return cfg


def cmd_compress(args) -> int:
    """``obdk compress``; under ``torchrun`` (``WORLD_SIZE`` > 1) inside one process group (gloo on CPU, NCCL on
    CUDA) that every rank calibrates in, rank 0 alone applying and saving while the others wait at a barrier (with a
    correction on an owner-reduced streamed plan every rank applies, each stepping the matrices it owns; rank 0
    alone saves)."""
    import contextlib

    from .calibrate import distributed as dist
    _check_device(args.device)
    own, args.device = dist.init_from_env(args.device, args.dist_timeout)
    try:
        with contextlib.ExitStack() as solo:
            rc = _compress(args, solo)
        dist.barrier()  # the other ranks wait here until rank 0 has saved
        return rc
    finally:
        if own:
            dist.destroy()


def _corrects_everywhere(plan, variants: list) -> bool:
    """True when ``plan`` is owner-reduced over the process group and a variant corrects: then every rank runs
    apply's correction (each owner steps its own matrices, every rank packs the same factors); rank 0 alone saves."""
    return bool((plan.stream or {}).get("owners") is not None
                and any(plan.resolve(**v).resolved_correct for v in variants))


def _rank_counters() -> list:
    """Every rank's collective counters and peak RSS (MiB), in rank order (a collective)."""
    import resource

    from .calibrate import distributed as dist
    mine = {"rank": dist.world()[0], **dist.traffic(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return dist.all_gather_objects(mine)


def _ranks_agree(plan, variants: list, solo) -> list | None:
    """Under a process group: every rank allocates every variant and the ranks must agree (:class:`DataError`
    naming the first rank that differs); returns each rank's collective counters and peak RSS (MiB), and
    on rank 0 hides the group for the rest of ``solo`` (rank 0 applies and saves as one process) unless the
    correction runs on every rank (:func:`_corrects_everywhere`). None without a group."""
    from .calibrate import distributed as dist
    rank, world = dist.world()
    if world == 1:
        return None
    for v in variants:
        alloc = plan.allocate(config=plan.resolve(**v))
        dist.same_on_every_rank(alloc.ranks, f"the allocation at --keep {v['keep']:g}")
    per_rank = _rank_counters()
    if rank == 0 and not _corrects_everywhere(plan, variants):
        solo.enter_context(dist.alone())
    return per_rank


def _compress(args, solo) -> int:
    import torch

    import obdk
    from .errors import ConfigError
    from .io import check_writable, update_report
    from .calibrate.distributed import world as dist_world
    from .pipeline import compress_many, prepare
    from .report import StageTimer, count_params

    cfg = _config_from_args(args)
    if not args.stream and (args.scratch_dir is not None or args.max_host_memory is not None):
        raise ConfigError("--scratch-dir/--max-host-memory: they apply to the streamed calibration; add --stream")
    if args.weights_on_disk and not args.stream:
        raise ConfigError("--weights-on-disk: only the streamed passes read one decoder layer at a time; add --stream")
    if args.max_host_memory is not None and args.max_host_memory < 0:
        raise ConfigError(f"--max-host-memory {args.max_host_memory}: must be a byte count ≥ 0")
    if args.scratch_dir is not None and not os.path.isdir(args.scratch_dir):
        raise ConfigError(f"--scratch-dir {args.scratch_dir}: not a directory (create it, or leave the flag out "
                          f"for the system temporary directory)")
    if len(set(args.keep)) != len(args.keep):
        raise ConfigError(f"--keep {' '.join(f'{k:g}' for k in args.keep)}: a ratio is repeated (each writes one "
                          f"DIR-keepK directory)")
    variants = [{"keep": k} for k in args.keep]
    outs = [Path(args.out if len(args.keep) == 1 else f"{args.out}-keep{k:g}") for k in args.keep]
    _check_device(args.device)
    sources = _source_dirs(args.model)
    for out in outs:  # before any work: a refused output costs a second, not a compression
        check_writable(out, overwrite=args.overwrite, source_dir=sources)
    if args.eval_tasks:  # unknown task names fail before any work
        from .zeroshot import check_tasks, zeroshot
        check_tasks(args.eval_tasks, data_dir=args.data_dir)
    timer = StageTimer()
    source = None
    with timer("load"):
        if args.weights_on_disk:
            model, source, tok = _load_skeleton(args.model, args.dtype)
        else:  # streamed, the model stays in host memory and each pass copies one layer at a time to --device
            model, tok = _load(args.model, args.dtype, "cpu" if args.stream else args.device)
    before = count_params(model)
    plan = prepare(model, cfg, args.calib, tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen,
                   seed=args.seed, data_dir=args.data_dir, timer=timer, calib_batch_size=args.calib_batch_size,
                   stream=args.stream, scratch_dir=args.scratch_dir, max_host_memory=args.max_host_memory,
                   device=args.device if args.stream else None, source=source)
    for v in variants:
        plan.resolve(**v)  # every --keep validated before the first is applied
    per_rank = _ranks_agree(plan, variants, solo)
    everywhere = per_rank is not None and _corrects_everywhere(plan, variants)
    writer = per_rank is None or dist_world()[0] == 0
    if not writer and not everywhere:  # torchrun: the ranks other than 0 are done here
        return 0
    # one process, streamed: each ratio's checkpoint is written tensor by tensor (Plan.save), the model stays dense
    by_save = args.stream and per_rank is None
    dense_eval = None
    if source is not None and (args.eval_windows or args.eval_tasks) and not args.json:
        print("note: --weights-on-disk: the dense model is not evaluated (its layers stay on disk); the compressed "
              "one is, loaded from its checkpoint")
    if args.eval_windows and writer and source is None:  # the dense model on the same windows, for the measured loss
        from .eval import perplexity
        with torch.inference_mode():
            dense_eval = perplexity(model, tok, "wikitext2", seqlen=args.seqlen, windows=args.eval_windows,
                                    data_dir=args.data_dir)
    dense_zs = None
    if args.eval_tasks and writer and source is None:  # the dense model on the same documents
        dense_zs = zeroshot(model, tok, args.eval_tasks, limit=args.eval_limit, data_dir=args.data_dir)
    t_last = [time.perf_counter()]

    def finish(m, report, variant) -> dict:
        """Save one compressed copy, evaluate it, print its summary; returns its row."""
        counters = [_rank_counters()] if everywhere else []  # a collective: every rank, before rank 0 saves
        if not writer:
            return None
        idx = variants.index(variant)
        out, keep = outs[idx], variant["keep"]
        if m is not None:  # (by_save: Plan.save has written it)
            save_timer = StageTimer()
            with save_timer("save"):
                obdk.save_pretrained(m, out, tokenizer=tok, report=report, overwrite=args.overwrite,
                                     source_dir=sources[0] if sources else None)
            report.stages.update(save_timer.to_dict())
        elif args.eval_windows or args.eval_tasks:  # evaluated as a user gets it: loaded from its checkpoint
            m = obdk.load_pretrained(out, device=args.device)
        row = {"out": str(out), "keep": keep, "keep_actual": report.keep_actual,
               "targeted_params_before": report.targeted_params_before,
               "targeted_params_after": report.targeted_params_after,
               "model_params_before": report.model_params_before, "model_params_after": report.model_params_after,
               "predicted_loss": report.predicted_loss, "method": args.method,
               "alloc": report.config["alloc"], "stages": report.stages,
               "coverage": {k: v for k, v in report.coverage.items() if k != "untargeted"}}
        if per_rank is not None:  # torchrun: bytes sent, seconds in collectives and peak RSS of each rank
            row["distributed"] = counters[0] if counters else per_rank
        if args.eval_windows:
            from .eval import perplexity
            with torch.inference_mode():
                row["eval"] = perplexity(m, tok, "wikitext2", seqlen=args.seqlen, windows=args.eval_windows,
                                         data_dir=args.data_dir)
            if dense_eval is not None:
                report.record_measurement(dense_eval, row["eval"])
                row["measured"] = report.measured
        if args.eval_tasks:
            row["zeroshot"] = zeroshot(m, tok, args.eval_tasks, limit=args.eval_limit, data_dir=args.data_dir)
            if dense_zs is not None:
                report.record_zeroshot(dense_zs, row["zeroshot"])
        row["seconds_this_ratio"] = time.perf_counter() - t_last[0]
        t_last[0] = time.perf_counter()
        update_report(out, {**report.to_dict(), "cli": row})  # with the save stage and the evaluation
        if not args.json:
            print(f"[{idx + 1}/{len(variants)}] keep={keep:g} → {out}")
            print("  " + report.summary().replace("\n", "\n  "))
            if idx > 0:
                print(f"  marginal cost of this ratio: {row['seconds_this_ratio']:.1f}s")
            if "eval" in row and dense_eval is not None:
                print(f"  wikitext2 ppl ({row['eval']['windows']}×{args.seqlen}): {row['eval']['ppl']:.2f} "
                      f"(dense {dense_eval['ppl']:.2f}; loss increase measured {report.measured['loss_increase']:.3f} "
                      f"vs predicted {report.predicted_loss:.3f} nats)")
            elif "eval" in row:
                print(f"  wikitext2 ppl ({row['eval']['windows']}×{args.seqlen}): {row['eval']['ppl']:.2f} "
                      f"(predicted loss increase {report.predicted_loss:.3f} nats)")
            if "zeroshot" in row:
                from .zeroshot import format_table
                print("  " + format_table(row["zeroshot"], dense=dense_zs).replace("\n", "\n  "))
        return row

    if by_save:
        # the last ratio releases each layer's kept factors once written: the scratch shrinks as the checkpoint grows
        results = [finish(None, plan.save(model, outs[i], tokenizer=tok, overwrite=args.overwrite,
                                          source_dir=sources[0] if sources else None, model_params_before=before,
                                          release=i == len(variants) - 1, **v), v) for i, v in enumerate(variants)]
        plan.close()
    elif len(variants) == 1:  # one ratio: compress the loaded model itself, no copy
        results = [finish(model, plan.apply(model, model_params_before=before, **variants[0]), variants[0])]
    else:
        results = compress_many(model, cfg, variants, plan=plan, on_result=finish)
    if args.json and writer:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}, default=str))
    return 0


def cmd_eval(args) -> int:
    from .eval import perplexity
    _check_device(args.device)
    if args.tasks:  # unknown task names fail before the model loads
        from .zeroshot import check_tasks
        check_tasks(args.tasks, data_dir=args.data_dir)
    model, tok = _load(args.model, args.dtype, args.device)
    if args.tasks:  # zero-shot accuracy through lm-eval; perplexity as well only when --dataset is given
        from .zeroshot import cli_eval
        res = cli_eval(args, model, tok)
        if args.json:
            print(json.dumps(res, default=str))
        return 0
    res = perplexity(model, tok, args.dataset or "wikitext2", seqlen=args.seqlen, windows=args.windows,
                     batch_size=1 if args.batch_size is None else args.batch_size, data_dir=args.data_dir, device=args.device)
    res["model"] = args.model
    if args.json:
        print(json.dumps(res, default=str))
    else:
        print(f"{args.model}: {res['dataset']} ppl {res['ppl']:.3f} "
              f"({res['windows']} windows × {res['seqlen']} tokens, {res['tokens']} tokens, {res['seconds']:.1f}s)")
    return 0


def cmd_generate(args) -> int:
    import torch

    from . import backends
    _check_device(args.device)
    if args.backend not in (None, "auto"):  # validated before the model loads
        dtype = None
        if args.dtype:
            from .hub import _parse_dtype
            dtype = _parse_dtype(args.dtype)
        backends.select("lowrank_linear", args.device, dtype, backend=args.backend)
    model, tok = _load(args.model, args.dtype, args.device)
    enc = tok(args.prompt, return_tensors="pt").to(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), backends.use(args.backend):
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


def cmd_plan(args) -> int:
    from .planner import format_plan, plan_run, read_model_config
    res = plan_run(read_model_config(args.model), method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                   nproc=args.nproc, batch_size=args.calib_batch_size, stats_dtype=args.stats_dtype, dtype=args.dtype,
                   correct=args.correct, max_host_memory=args.max_host_memory)
    print(json.dumps(res) if args.json else format_plan(res))
    return 0


def cmd_env(args) -> int:
    from .env import format_report, report
    print(format_report(report()))
    return 0


VERBS = {"compress": cmd_compress, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect, "plan": cmd_plan,
         "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``obdk`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return VERBS[args.verb](args)
    except ObdkError as exc:  # the user's input or data: one line naming the culprit; a bug keeps its traceback
        msg = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        msg = re.sub(r"^LowRankConfig\.(\w+)=", lambda m: "--" + m.group(1).replace("_", "-") + " ", msg)
        where = ""
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun: say which rank failed
            where = f" (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
        print(f"obdk {args.verb}: error{where}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
