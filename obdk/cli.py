"""The ``obdk`` command line: compress, eval, generate, inspect, plan, env (every flag: docs/cli.md).

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
from typing import Optional

DEFAULT_MODEL = "smollm2-135m"

from .errors import ObdkError  # noqa: E402  (light: no torch)


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local data directory laid out like shared/data (default: $OBDK_DATA_DIR, else the HF hub)")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors (an unknown flag, a bad value) are one line and exit status 2, like every
    other refusal of the CLI (the usage is left to ``--help``); subcommand parsers are of this class too."""

    def error(self, message: str):
        # "argument --keep: 1.5: must be ..." -> "--keep 1.5: must be ...", as the CLI's other errors read
        message = re.sub(r"^argument ([^\s:/]+)(?:/\S+)?: ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(lo: int):
    """An argparse ``type=``: an integer ≥ ``lo`` (counts, sizes, byte limits), refused where it enters."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= {lo}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"{n}: must be an integer >= {lo}")
        return n
    parse.__name__ = f"integer >= {lo}"
    return parse


def _number(ok, what: str):
    """An argparse ``type=``: a float for which ``ok`` holds (``what`` says which, in the error)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}") from None
        if not ok(x):  # (NaN fails every comparison)
            raise argparse.ArgumentTypeError(f"{text}: must be {what}")
        return x
    parse.__name__ = what
    return parse


_ratio = _number(lambda x: 0.0 < x <= 1.0, "a number in (0, 1] (the fraction of the targeted parameters kept)")
_seconds = _number(lambda x: 0.0 < x < float("inf"), "a finite number of seconds > 0")


def _text(what: str):
    """An argparse ``type=``: text that is not empty (``what`` says what it names)."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: empty; give {what}")
        return text
    parse.__name__ = what
    return parse


def _tasks(text: str) -> str:
    """An argparse ``type=``: comma-separated task names, at least one (``""`` or ``","`` would silently mean none)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no task; give comma-separated lm-eval task names, "
                                         f"e.g. arc_easy,piqa")
    return ",".join(names)


def _add_compress(sub) -> None:
    """The ``compress`` verb's arguments (the method, allocation and correction names from :mod:`obdk.registry`)."""
    from .registry import ALLOCATORS, CORRECTIONS, HEALINGS, METHODS
    c = sub.add_parser("compress", help="compress a causal LM and save it")
    c.add_argument("model", help="HF id or directory, a .gguf file, or the alias smollm2-135m")
    c.add_argument("--method", default="obd", help=f"{' | '.join(METHODS)} (default obd)")
    c.add_argument("--keep", type=_ratio, nargs="+", default=[0.8],
                   help="fraction(s) of targeted Linear parameters kept; several write one model each")
    c.add_argument("--alloc", default=None, help=f"{' | '.join(ALLOCATORS)} (default: the method's)")
    c.add_argument("--whitening", default=None, help="override the method's whitening: svd | svd-llm | obd")
    c.add_argument("--calib", type=_text("a dataset NAME[:SPLIT] or a file"), default="wikitext2:validation", help="NAME[:SPLIT] (wikitext2, c4) or a file path")
    c.add_argument("--nsamples", type=_count(1), default=32, help="calibration windows (default 32)")
    c.add_argument("--seqlen", type=_count(1), default=512,
                   help="tokens per calibration window, also of the --eval-windows evaluation (default 512)")
    c.add_argument("--calib-batch-size", type=_count(1), default=1,
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
    c.add_argument("--max-host-memory", type=_count(0), default=None, metavar="BYTES",
                   help="--stream: host bytes for the boundary activations, and for the kept spectra and (with a "
                        "correction) statistics, before they spill to --scratch-dir")
    c.add_argument("--dist-timeout", type=_seconds, default=1800.0, metavar="SECONDS",
                   help="under torchrun: seconds a rank waits for the others in a collective (also while rank 0 "
                        "applies, evaluates and saves) before the job fails")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration windows' offsets (and of true-Fisher labels) (default 0)")
    c.add_argument("--rank-multiple", type=int, default=None, help="ranks rounded to a multiple of this (default 8)")
    c.add_argument("--damping", type=float, default=0.01,
                   help="relative damping α of C_x and C_g (C + α·mean(diag C)·I), escalated where a factorisation "
                        "fails; the damping used is in the report (default 0.01)")
    c.add_argument("--floor", type=float, default=None,
                   help="global/bsi allocation: per-matrix rank floor as a fraction of the uniform rank (default 0.2)")
    c.add_argument("--fisher", default="empirical", choices=["empirical", "true"],
                   help="C_g and gradients from the data's next tokens (empirical, default) or from labels sampled "
                        "from the model (true)")
    c.add_argument("--correct", default=None, choices=["none", *CORRECTIONS],
                   help="after truncation: none, zs (ZS-SVD's one-step projected gradient), kfac (the same step along the "
                        "K-FAC natural gradient), zs+kfac (both in turn), zs-guarded (zs with its step size chosen in "
                        "{0, .25, .5, .75, 1} on the last 8 calibration windows, held out from its gradient; 0 = no "
                        "correction; not with --stream) or seq (refit); default: the method's (obd: zs+kfac)")
    c.add_argument("--heal", default=None, choices=["none", *HEALINGS],
                   help="after the correction, train the factors at the same ranks to match the dense model: layer "
                        "(each decoder layer on the compressed model's input to it, MSE to the dense layer's output; "
                        "streams) or e2e (all factors on the KL divergence from the dense model's next-token "
                        "distribution; not with --stream) (default none)")
    c.add_argument("--heal-data", type=_text("a dataset NAME[:SPLIT] or a file"), default=None,
                   help="--heal: the healing text, NAME[:SPLIT] (wikitext2, c4) or a file (default: the calibration "
                        "windows; never wikitext2:test, which the evaluation reads)")
    c.add_argument("--heal-tokens", type=_count(1), default=None,
                   help="--heal: tokens of healing windows of --seqlen drawn from --heal-data (or from --calib) "
                        "(default: the calibration's --nsamples x --seqlen)")
    c.add_argument("--heal-steps", type=_count(0), default=None,
                   help="--heal: the most steps (per decoder layer for layer), each on 4 windows; it stops earlier "
                        "when the held-out loss stops improving (default: layer 16, e2e 32)")
    c.add_argument("--heal-lr", type=float, default=None,
                   help="--heal: Adam's step relative to each factor's RMS (default: layer 1e-2, e2e 1e-3)")
    c.add_argument("--heal-ce", type=float, default=None,
                   help="--heal e2e: the weight w of the healing text's next-token cross-entropy in the loss "
                        "(1 - w)·KL + w·CE (0: pure distillation from the dense model; default 0.5)")
    c.add_argument("--bsi-curvature", default=None, choices=["hutchinson", "blocked", "kfac", "fisher"],
                   help="bsi allocation: the Hessian diagonal in σ: hutchinson (all matrices probed at once), blocked "
                        "(Hutchinson per matrix), kfac (from C_x, C_g: no pass) or fisher (exact empirical-Fisher "
                        "diagonal, one pass) (default: the config's)")
    c.add_argument("--probes", type=_probes_arg, default=4,
                   help="bsi Hutchinson probes (per block), or 'auto' (until --probe-tol; at most --max-probes)")
    c.add_argument("--probe-tol", type=float, default=None,
                   help="--probes auto: stop at this relative standard error per matrix (default 0.1)")
    c.add_argument("--max-probes", type=int, default=None, help="--probes auto: at most this many probes (default 64)")
    c.add_argument("--eps", type=float, default=1e-3,
                   help="bsi Hutchinson/blocked curvature: the finite-difference step in σ (default 1e-3)")
    c.add_argument("--bsi-order", default=None, choices=["importance", "spectral"],
                   help="bsi allocation: keep the most important bases (BSI) or only choose ranks (spectral) "
                        "(default: the config's)")
    c.add_argument("--bsi-terms", default=None, choices=["first+second", "second"],
                   help="bsi allocation: the importance's Taylor terms: first+second (the BSI paper's −g·σ + ½h·σ²) or "
                        "second (½h·σ², the calibration gradient's first-order term left out) (default: the config's)")
    c.add_argument("--targets", nargs="*", default=None, help="fnmatch patterns of module names to compress")
    c.add_argument("--ignore", nargs="*", default=[], help="fnmatch patterns of module names to keep dense")
    c.add_argument("--compute-dtype", default="float64", choices=["float64", "float32"],
                   help="dtype of the decompositions (default float64; float32 is faster, see benchmarks/RESULTS.md)")
    c.add_argument("--solver", default="eig", choices=["eig", "cholesky"],
                   help="eig: the exact eigen form, no root of C_x and no inverse (default); cholesky: the root-"
                        "and-SVD route")
    c.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    c.add_argument("--device", default="cpu",
                   help="compute device: cpu, cuda, cuda:1 (default cpu); with --stream the model stays in host "
                        "memory and one decoder layer at a time is copied here")
    c.add_argument("--out", required=True, help="output directory (with several --keep: DIR-keep0.8, ...)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not an obdk checkpoint (never the input model's directory)")
    c.add_argument("--eval-windows", type=_count(0), default=0,
                   help="after saving, evaluate WikiText-2 perplexity on this many windows of --seqlen")
    c.add_argument("--eval-tasks", type=_tasks, default=None,
                   help="after saving, zero-shot accuracy of the dense and compressed model on these lm-eval tasks "
                        "(comma-separated, e.g. arc_easy,piqa; needs obdk[eval]), recorded in the report")
    c.add_argument("--eval-limit", type=_count(1), default=None, help="--eval-tasks: score the first N documents of each task")
    c.add_argument("--json", action="store_true", help="print one JSON object as the last line instead of the text summary "
                   "(with several --keep: {\"results\": [one per ratio]})")
    _add_data_dir(c)


def build_parser() -> argparse.ArgumentParser:
    from .registry import CORRECTIONS
    ap = _Parser(prog="obdk", description="Low-rank LLM compression (Optimal Brain Decomposition)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="verb", required=True)

    _add_compress(sub)

    e = sub.add_parser("eval", help="perplexity (and, with --tasks, zero-shot accuracy) of a model or compressed directory")
    e.add_argument("model", help="an obdk checkpoint directory, an HF id or directory, a .gguf file, or smollm2-135m")
    e.add_argument("--dataset", type=_text("a dataset NAME[:SPLIT] or a file"), default=None,
                   help="NAME[:SPLIT] (wikitext2, c4) or a file path (default wikitext2; with --tasks, perplexity "
                        "runs only when --dataset is given)")
    e.add_argument("--tasks", type=_tasks, default=None,
                   help="zero-shot accuracy through lm-evaluation-harness on these tasks, comma-separated "
                        "(arc_easy,arc_challenge,piqa,hellaswag,winogrande: local data; any lm-eval task name)")
    e.add_argument("--limit", type=_count(1), default=None, help="--tasks: score the first N documents of each task")
    e.add_argument("--num-fewshot", type=_count(0), default=0, help="--tasks: examples in each prompt (default 0)")
    e.add_argument("--seqlen", type=_count(1), default=512, help="tokens per perplexity window (default 512)")
    e.add_argument("--windows", type=_count(1), default=None, help="evaluate the first N windows (default all)")
    e.add_argument("--batch-size", type=_count(1), default=None,
                   help="windows per forward for perplexity (default 1), requests per forward for --tasks "
                        "(default 8, the fastest measured with the same accuracies as 1)")
    e.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16; default the checkpoint's)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_data_dir(e)

    g = sub.add_parser("generate", help="generate text from a model or compressed directory")
    g.add_argument("model", help="an obdk checkpoint directory, an HF id or directory, a .gguf file, or smollm2-135m")
    g.add_argument("--prompt", type=_text("a prompt"), required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_count(1), default=48, help="tokens to generate, greedily (default 48)")
    g.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16; default the checkpoint's)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--backend", default=None, help="force the low-rank backend (torch, cpp, triton, cuda)")

    i = sub.add_parser("inspect", help="ranks and report of a compressed directory")
    i.add_argument("dir", help="an obdk checkpoint directory")
    i.add_argument("--heatmap", default=None, help="write a layers × module-type rank heatmap PNG here")
    i.add_argument("--json", action="store_true", help="print the ranks, report and measurements as one JSON object")

    pl = sub.add_parser("plan", help="memory and FLOPs a compression will need, from config.json alone")
    pl.add_argument("model", help="a config.json, a directory holding one, or a preset: "
                                  "llama-7b, llama-3-8b, llama-3-70b, qwen2.5-72b")
    pl.add_argument("--method", default="obd", help="as obdk compress --method: decides the statistics (default obd)")
    pl.add_argument("--nsamples", type=_count(1), default=32, help="calibration windows (default 32)")
    pl.add_argument("--seqlen", type=_count(1), default=512, help="tokens per calibration window (default 512)")
    pl.add_argument("--nproc", type=_count(1), default=1, help="data-parallel ranks (torchrun --nproc-per-node)")
    pl.add_argument("--calib-batch-size", type=_count(1), default=1, help="calibration windows per pass (default 1)")
    pl.add_argument("--dtype", default=None, help="model dtype (default the config's torch_dtype)")
    pl.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"],
                    help="dtype of the statistics (default float32)")
    pl.add_argument("--correct", default=None, choices=["none", *CORRECTIONS],
                    help="the corrections of the run (default the method's): they keep every layer's statistics")
    pl.add_argument("--max-host-memory", type=_count(0), default=None, metavar="BYTES",
                    help="the streamed run's --max-host-memory: how much of the kept bytes goes to scratch disk")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    sub.add_parser("env", help="versions, extension status and op backends")
    return ap


# --------------------------------------------------------------------------- verbs


def _load(spec: str, dtype, device):
    from .hub import load_model
    return load_model(spec, dtype=dtype, device=device)  # dtype names are parsed (and checked) there


def _load_skeleton(spec: str, dtype):
    """``--weights-on-disk``: (skeleton model, its ShardedWeights, tokenizer) of a local safetensors checkpoint."""
    from .errors import ConfigError
    from .hub import _parse_dtype, load_tokenizer, resolve_model_path
    from .stream.shards import load_skeleton
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
    from .registry import ALLOCATORS
    cfg = LowRankConfig(method=args.method, keep=args.keep[0], alloc=args.alloc, whitening=args.whitening,
                        targets=args.targets, ignore=args.ignore,
                        rank_multiple=DEFAULT_RANK_MULTIPLE if args.rank_multiple is None else args.rank_multiple,
                        damping=args.damping, floor=DEFAULT_FLOOR if args.floor is None else args.floor,
                        compute_dtype=args.compute_dtype, solver=args.solver, fisher=args.fisher,
                        correct=args.correct, probes=args.probes, eps=args.eps, heal=args.heal,
                        heal_steps=args.heal_steps, heal_lr=args.heal_lr,
                        **({} if args.heal_ce is None else {"heal_ce": args.heal_ce}),
                        **{k: v for k, v in (("bsi_order", args.bsi_order), ("bsi_curvature", args.bsi_curvature),
                                             ("bsi_terms", args.bsi_terms), ("probe_tol", args.probe_tol),
                                             ("max_probes", args.max_probes)) if v is not None})
    alloc = ALLOCATORS[cfg.resolved_alloc]  # options the allocation has no use for are refused, not ignored
    given = ["--" + f.replace("_", "-") for f in alloc.refuses if getattr(args, f) is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)}: the {alloc.name} allocation {alloc.refuses_why} and uses "
                          f"{'neither' if len(alloc.refuses) > 1 else 'none'}; drop {'them' if len(given) > 1 else 'it'} "
                          f"or choose another --alloc")
    return cfg


def cmd_compress(args) -> int:
    """``obdk compress``; under ``torchrun`` (``WORLD_SIZE`` > 1) inside one process group (gloo on CPU, NCCL on
    CUDA) that every rank calibrates in; :meth:`~obdk.plan.Plan.save` carries the rank policy (every rank allocates
    and must agree, the correction of an owner-reduced streamed plan runs on every rank, rank 0 writes), and rank 0
    alone evaluates while the others wait at a barrier."""
    from .stream import distributed as dist
    _check_device(args.device)
    own, args.device = dist.init_from_env(args.device, args.dist_timeout)
    try:
        rc = _compress(args)
        dist.barrier()  # the other ranks wait here until rank 0 has evaluated
        return rc
    finally:
        if own:
            dist.destroy()


def _rank_counters() -> list:
    """Every rank's collective counters and peak RSS (MiB), in rank order (a collective)."""
    import resource

    from .stream import distributed as dist
    mine = {"rank": dist.world()[0], **dist.traffic(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return dist.all_gather_objects(mine)


def _check_compress_args(args) -> tuple[list[dict], list[Path], list[str]]:
    """Everything ``compress`` refuses before any work: ``(variants, output directories, source directories)``."""
    from .errors import ConfigError
    from .io.atomic import check_writable
    if not args.stream and (args.scratch_dir is not None or args.max_host_memory is not None):
        raise ConfigError("--scratch-dir/--max-host-memory: they apply to the streamed calibration; add --stream")
    if args.weights_on_disk and not args.stream:
        raise ConfigError("--weights-on-disk: only the streamed passes read one decoder layer at a time; add --stream")
    if args.max_host_memory is not None and args.max_host_memory < 0:
        raise ConfigError(f"--max-host-memory {args.max_host_memory}: must be a byte count ≥ 0")
    if args.scratch_dir is not None:  # a real write, and stale stores of killed runs swept (obdk.scratch)
        from .scratch import use_dir
        use_dir(args.scratch_dir, "--scratch-dir")
    _check_heal_args(args)
    if len(set(args.keep)) != len(args.keep):
        raise ConfigError(f"--keep {' '.join(f'{k:g}' for k in args.keep)}: a ratio is repeated (each writes one "
                          f"DIR-keepK directory)")
    outs = [Path(args.out if len(args.keep) == 1 else f"{args.out}-keep{k:g}") for k in args.keep]
    _check_device(args.device)
    sources = _source_dirs(args.model)
    for out in outs:  # before any work: a refused output costs a second, not a compression
        check_writable(out, overwrite=args.overwrite, source_dir=sources)
    if args.eval_tasks:  # unknown task names fail before any work
        from .zeroshot import check_tasks
        check_tasks(args.eval_tasks, data_dir=args.data_dir)
    return [{"keep": k} for k in args.keep], outs, sources


def _check_heal_args(args) -> None:
    """The ``--heal-*`` flags: only with ``--heal``; a healing file that exists; never the evaluated split."""
    from .calibrate.data import parse_dataset
    from .errors import ConfigError
    given = [f for f in ("heal_data", "heal_tokens", "heal_steps", "heal_lr", "heal_ce") if getattr(args, f) is not None]
    if given and args.heal in (None, "none"):
        raise ConfigError(f"{', '.join('--' + f.replace('_', '-') for f in given)}: "
                          f"{'they set' if len(given) > 1 else 'it sets'} the healing; add --heal layer or --heal e2e")
    if args.heal_ce is not None and args.heal == "layer":
        raise ConfigError("--heal-ce: it weighs end-to-end healing's loss; --heal layer trains each layer on the "
                          "dense layer's output; drop it or use --heal e2e")
    if args.stream and args.heal not in (None, "none"):
        from .registry import HEALINGS
        why = HEALINGS[args.heal].stream_refusal
        if why is not None:
            raise ConfigError(f"--heal {args.heal} with --stream: {why}")
    if args.heal_data is None:
        return
    named = parse_dataset(args.heal_data)
    if named is None and not Path(args.heal_data).is_file():
        raise ConfigError(f"--heal-data {args.heal_data}: no such file (and not a dataset NAME[:SPLIT] such as "
                          f"wikitext2:validation or c4)")
    if named is not None and named[0] == "wikitext2" and named[1] == "test":
        raise ConfigError(f"--heal-data {args.heal_data}: WikiText-2 test is what --eval-windows and obdk eval "
                          f"score; heal on wikitext2:validation, c4 or a file")


def _heal_windows(args, tok):
    """The healing windows of ``--heal-data``/``--heal-tokens`` (None: the calibration windows)."""
    if args.heal_data is None and args.heal_tokens is None:
        return None
    from .calibrate.data import get_calibration_windows
    tokens = args.heal_tokens or args.nsamples * args.seqlen
    return get_calibration_windows(args.heal_data or args.calib, tok, nsamples=-(-tokens // args.seqlen),
                                   seqlen=args.seqlen, seed=args.seed + 1, data_dir=args.data_dir)


def _compress(args) -> int:
    """``obdk compress``: parse → prepare → save per ``--keep`` → evaluate and print (rank 0)."""
    from .pipeline import prepare
    from .report import StageTimer, count_params
    from .stream.distributed import world
    cfg = _config_from_args(args)
    variants, outs, sources = _check_compress_args(args)
    timer = StageTimer()
    with timer("load"):
        if args.weights_on_disk:
            model, source, tok = _load_skeleton(args.model, args.dtype)
        else:  # streamed, the model stays in host memory and each pass copies one layer at a time to --device
            (model, tok), source = _load(args.model, args.dtype, "cpu" if args.stream else args.device), None
    before = count_params(model)
    plan = prepare(model, cfg, args.calib, tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen,
                   seed=args.seed, data_dir=args.data_dir, timer=timer, calib_batch_size=args.calib_batch_size,
                   stream=args.stream, scratch_dir=args.scratch_dir, max_host_memory=args.max_host_memory,
                   device=args.device if args.stream else None, source=source)
    for v in variants:
        plan.resolve(**v)  # every --keep validated before the first is written
    heal_data = _heal_windows(args, tok)
    writer, many = world()[0] == 0, world()[1] > 1
    dense = _Evaluation(args, tok, sources, dense=model if writer and source is None else None)
    if source is not None and (args.eval_windows or args.eval_tasks) and not args.json:
        print("note: --weights-on-disk: the dense model is not evaluated (its layers stay on disk); the compressed "
              "one is, loaded from its checkpoint")
    rows = []
    for i, v in enumerate(variants):  # each ratio's checkpoint written tensor by tensor; the model stays dense
        # the last ratio releases each layer's kept factors once written: the scratch shrinks as the checkpoint grows
        report = plan.save(model, outs[i], tokenizer=tok, overwrite=args.overwrite,
                           source_dir=sources[0] if sources else None, model_params_before=before,
                           release=i == len(variants) - 1, heal_data=heal_data, **v)
        counters = _rank_counters() if many else None  # (a collective: every rank)
        if writer:
            rows.append(dense.finish(i, outs[i], v, report, counters, len(variants)))
    plan.close()
    if args.json and writer:
        print(json.dumps(rows[0] if len(rows) == 1 else {"results": rows}, default=str))
    return 0


class _Evaluation:
    """``compress``'s evaluations on rank 0: the dense model's (before any ratio), then each saved checkpoint's,
    loaded as a user gets it; its row of ``--json`` and ``obdk_report.json`` (``cli``), and its printed summary."""

    def __init__(self, args, tok, sources: list[str], dense) -> None:
        self.args, self.tok, self.sources = args, tok, sources
        self.ppl = self.zs = None
        self.t_last = time.perf_counter()
        if dense is not None and args.eval_windows:  # the dense model on the same windows, for the measured loss
            self.ppl = self._perplexity(dense)
        if dense is not None and args.eval_tasks:  # the dense model on the same documents
            from .zeroshot import zeroshot
            self.zs = zeroshot(dense, tok, args.eval_tasks, limit=args.eval_limit, data_dir=args.data_dir)

    def _perplexity(self, model) -> dict:
        import torch

        from .eval import perplexity
        with torch.inference_mode():
            return perplexity(model, self.tok, "wikitext2", seqlen=self.args.seqlen, windows=self.args.eval_windows,
                              data_dir=self.args.data_dir)

    def finish(self, idx: int, out: Path, variant: dict, report, counters: Optional[list], n: int) -> dict:
        """Evaluate the checkpoint ``out`` of one ratio, record and print it; returns its row."""
        import obdk

        from .io.load import update_report
        args = self.args
        row = {"out": str(out), "keep": variant["keep"], "keep_actual": report.keep_actual,
               "targeted_params_before": report.targeted_params_before,
               "targeted_params_after": report.targeted_params_after,
               "model_params_before": report.model_params_before, "model_params_after": report.model_params_after,
               "predicted_loss": report.predicted_loss, "method": args.method,
               "alloc": report.config["alloc"], "stages": report.stages,
               "coverage": {k: v for k, v in report.coverage.items() if k != "untargeted"}}
        if counters is not None:  # torchrun: bytes sent, seconds in collectives and peak RSS of each rank
            row["distributed"] = counters
        m = obdk.load_pretrained(out, device=args.device) if args.eval_windows or args.eval_tasks else None
        if args.eval_windows:
            row["eval"] = self._perplexity(m)
            if self.ppl is not None:
                report.record_measurement(self.ppl, row["eval"])
                row["measured"] = report.measured
        if args.eval_tasks:
            from .zeroshot import zeroshot
            row["zeroshot"] = zeroshot(m, self.tok, args.eval_tasks, limit=args.eval_limit, data_dir=args.data_dir)
            if self.zs is not None:
                report.record_zeroshot(self.zs, row["zeroshot"])
        row["seconds_this_ratio"] = time.perf_counter() - self.t_last
        self.t_last = time.perf_counter()
        update_report(out, {**report.to_dict(), "cli": row})  # with the save stage and the evaluation
        if not args.json:
            self._print(idx, n, out, row, report)
        return row

    def _print(self, idx: int, n: int, out: Path, row: dict, report) -> None:
        args = self.args
        print(f"[{idx + 1}/{n}] keep={row['keep']:g} → {out}")
        print("  " + report.summary().replace("\n", "\n  "))
        if idx > 0:
            print(f"  marginal cost of this ratio: {row['seconds_this_ratio']:.1f}s")
        if "eval" in row and self.ppl is not None:
            print(f"  wikitext2 ppl ({row['eval']['windows']}×{args.seqlen}): {row['eval']['ppl']:.2f} "
                  f"(dense {self.ppl['ppl']:.2f}; loss increase measured {report.measured['loss_increase']:.3f} "
                  f"vs predicted {report.predicted_loss:.3f} nats)")
        elif "eval" in row:
            print(f"  wikitext2 ppl ({row['eval']['windows']}×{args.seqlen}): {row['eval']['ppl']:.2f} "
                  f"(predicted loss increase {report.predicted_loss:.3f} nats)")
        if "zeroshot" in row:
            from .zeroshot import format_table
            print("  " + format_table(row["zeroshot"], dense=self.zs).replace("\n", "\n  "))


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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a refused flag (one line, status 2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
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
