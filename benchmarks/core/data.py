"""Where the data are, the evaluation token streams, and calibration windows held out from them.

The evaluation sets are the standard recipe of :func:`obdk.eval.perplexity` (the split joined
with ``"\\n\\n"``, tokenised once, non-overlapping windows): WikiText-2 test and the local C4
validation sample. :class:`EvalSets` tokenises each once per run and scores any number of
models on it. :func:`calibration_data` draws the calibration windows, away from the evaluated
tokens when calibration and evaluation read the same corpus split (C4 has only a validation
split here).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from .env import REPO


def data_dir_of(arg: Optional[str] = None) -> Optional[str]:
    """``--data-dir``, else ``$OBDK_DATA_DIR``, else ``../shared/data`` when it exists, else None (online)."""
    shared = REPO.parent / "shared" / "data"
    return arg or os.environ.get("OBDK_DATA_DIR") or (str(shared) if shared.is_dir() else None)


def corpus(spec: str, role: str) -> Optional[tuple[str, str]]:
    """``(dataset, split)`` a named source resolves to for ``role`` ``calib`` or ``eval``; None for files."""
    from obdk.calibrate.data import DATASETS, parse_dataset
    p = parse_dataset(spec)
    if p is None:
        return None
    name, split = p
    if split is None:
        split = DATASETS[name].eval_split if role == "eval" else DATASETS[name].calib_split
    return name, split


class EvalSets:
    """Evaluation token streams, each loaded and tokenised once per run."""

    def __init__(self, tok, data_dir: Optional[str]):
        self.tok, self.data_dir, self._ids = tok, data_dir, {}

    def stream(self, name: str) -> torch.Tensor:
        """The whole token stream of evaluation set ``name`` (``wikitext2``, ``c4``, ``NAME:SPLIT``, a file)."""
        if name not in self._ids:
            from obdk.calibrate.data import load_text, tokenize_text
            t0 = time.perf_counter()
            text, info = load_text(name, self.data_dir, default_split="eval")
            self._ids[name] = tokenize_text(text, self.tok)
            print(f"[eval set] {name} ({info.get('dataset')}:{info.get('split')}): "
                  f"{self._ids[name].numel():,} tokens, tokenised in {time.perf_counter() - t0:.1f}s", flush=True)
        return self._ids[name]

    def windows(self, name: str, n: int, seqlen: int) -> torch.Tensor:
        """The first ``n`` non-overlapping windows of ``seqlen`` tokens, ``[n, seqlen]``."""
        ids = self.stream(name)
        if ids.numel() < n * seqlen:
            raise SystemExit(f"{name} has {ids.numel()} tokens, fewer than {n} windows of {seqlen}")
        return ids[: n * seqlen].view(n, seqlen).clone()

    def perplexity(self, model, name: str, seqlen: int, windows: Optional[int], progress: bool = False) -> dict:
        """:func:`obdk.eval.perplexity` of ``model`` on the first ``windows`` windows (None: all)."""
        from obdk.eval import perplexity
        return perplexity(model, self.tok, self.stream(name), seqlen=seqlen, windows=windows, progress=progress)


def calibration_data(spec: str, tok, *, nsamples: int, seqlen: int, seed: int, data_dir: Optional[str],
                     evals: list[str] = (), eval_tokens: int = 0, holdout: bool = True):
    """``(CalibrationData, calib_source)``; the windows avoid the evaluated tokens of the same corpus split.

    With ``holdout`` and ``spec`` naming the corpus/split an eval set scores (e.g. ``c4``), the
    windows are drawn (same sampler and seed) from the stream after its first ``eval_tokens``
    tokens, so calibration never sees a scored token. ``calib_source`` says where they came from.
    """
    from obdk.calibrate.data import get_calibration_windows, load_text, tokenize_text
    src = corpus(spec, "calib")
    clash = src is not None and any(corpus(e, "eval") == src for e in evals)
    if holdout and clash:
        text, info = load_text(spec, data_dir, default_split="calib")
        stream = tokenize_text(text, tok)
        if stream.numel() - eval_tokens < seqlen:
            raise ValueError(f"{spec}: {stream.numel()} tokens leave no calibration window after the "
                             f"{eval_tokens} evaluated ones (use --no-holdout)")
        data = get_calibration_windows(stream[eval_tokens:], tok, nsamples=nsamples, seqlen=seqlen, seed=seed)
        data.fingerprint.update(dataset=info["dataset"], split=info["split"], path=info.get("path"),
                                text_sha256=info["text_sha256"], holdout_tokens=eval_tokens)
        return data, f"{info['dataset']}:{info['split']} tokens[{eval_tokens}:] (held out from eval)"
    data = get_calibration_windows(spec, tok, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir)
    fp = data.fingerprint
    label = f"{fp.get('dataset')}:{fp.get('split')}" if fp.get("split") else str(fp.get("path") or spec)
    if clash:
        label += " (OVERLAPS eval split)"
    return data, label


def random_windows(vocab: int, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Seeded uniformly random token ids ``[n, seqlen]``, for a model without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def add_calibration_args(ap) -> None:
    """The flags :func:`calibrated_model` reads, on argparse parser ``ap`` (with ``--threads``)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2:validation")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=64, help="evaluated windows kept out of a same-corpus calibration")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)


def calibrated_model(args, stats: tuple[str, ...] = ("cx", "cg", "grad")):
    """``(model, tokenizer, data, calib_source, statistics)`` from the usual flags of a SmolLM2 study:
    ``args.model``, ``args.calib``, ``args.nsamples``, ``args.seqlen``, ``args.seed``, ``args.data_dir``,
    ``args.windows`` (evaluated windows of WikiText-2 and C4 kept out of a same-corpus calibration) and
    ``args.cache_dir`` (the allocation benchmark's statistics cache, reused when it matches)."""
    from obdk.calibrate.stats import calibrate

    from .models import load
    model, tok = load(args.model)
    data, source = calibration_data(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=data_dir_of(args.data_dir), evals=["wikitext2", "c4"],
                                    eval_tokens=args.windows * args.seqlen)
    st = calibrate(model, data, stats=stats, seed=args.seed, progress=False, cache_dir=args.cache_dir)
    return model, tok, data, source, st
