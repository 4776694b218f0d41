"""Perplexity with the standard recipe (GPTQ / SparseGPT / SVD-LLM).

The evaluation split (WikiText-2: test; C4: validation) is assembled as in
:mod:`obdk.calibrate.data`, tokenised ONCE, and cut into non-overlapping windows
of ``seqlen`` tokens; the last partial window is dropped. Each window is one
independent sequence (no BOS is inserted per window); its loss is the mean NLL
over its ``seqlen - 1`` predicted tokens, and

    ppl = exp(mean over windows of the window NLL)

which equals the token-weighted mean since every window predicts the same number
of tokens (GPTQ writes it as ``exp(sum(loss_i * seqlen) / (n * seqlen))``).
A non-finite window loss raises :class:`NonFiniteLossError` naming the window;
windows are never skipped.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .arguments import check_ints, check_model, check_type
from .calibrate.data import check_token_ids, load_text, sha256_text, tokenize_text
from .calibrate.head import window_nll
from .errors import DataError, NonFiniteLossError  # noqa: F401

log = logging.getLogger(__name__)


# NonFiniteLossError lives in obdk.errors (one base, ObdkError); re-exported here.


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _resolve_stream(dataset: Any, tokenizer: Any, split: str | None,
                    data_dir: str | os.PathLike | None) -> tuple[Tensor, dict]:
    """Token stream [N] (or windows [B, T]) and a description of where it came from."""
    if isinstance(dataset, Tensor):
        if split is not None:
            raise DataError(f"split={split!r} given with a tensor of token ids")
        ids = check_token_ids(dataset, "perplexity dataset tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        return ids, {"dataset": "tensor", "split": None, "path": None}
    if isinstance(dataset, tuple) and len(dataset) == 2 and isinstance(dataset[0], str) and isinstance(dataset[1], dict):
        text, info = dataset
    elif isinstance(dataset, (list, tuple)):
        if split is not None:
            raise DataError(f"split={split!r} given with a list of documents")
        if not dataset or not all(isinstance(d, str) for d in dataset):
            raise DataError("perplexity dataset list must be a non-empty list of str documents")
        text = "\n\n".join(dataset)
        info = {"dataset": "list", "split": None, "path": None, "docs": len(dataset)}
    else:
        text, info = load_text(dataset, data_dir, split=split, default_split="eval")
    if tokenizer is None:
        raise DataError(f"perplexity: a tokenizer is needed to tokenise {info.get('dataset')}")
    t0 = time.perf_counter()
    ids = tokenize_text(text, tokenizer)
    log.info("tokenised %d characters into %d tokens in %.2f s", len(text), ids.numel(), time.perf_counter() - t0)
    info = dict(info)
    info.setdefault("text_sha256", sha256_text(text))
    return ids, info


def perplexity(model: nn.Module, tokenizer: Any, dataset: Any = "wikitext2", *, split: str | None = None,
               seqlen: int = 512, windows: int | None = None, batch_size: int = 1,
               data_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
               progress: bool = True) -> dict:
    """Perplexity of a causal LM on non-overlapping windows of ``seqlen`` tokens.

    ``dataset``: a named dataset ``NAME[:SPLIT]`` (``wikitext2`` -> test, ``c4`` ->
    validation by default), a text/jsonl/parquet file, a ``list[str]`` of documents
    (joined with ``"\\n\\n"``), the ``(text, info)`` pair of
    :func:`obdk.calibrate.data.load_text` (e.g. GPTQ-style C4:
    ``load_text("c4", doc_sep=" ", max_docs=1100)``), or token ids: LongTensor
    ``[N]``/``[1, N]`` (a stream) or ``[B, seqlen]`` (the windows themselves).
    ``windows``: evaluate only the first N windows. ``batch_size``: windows per
    forward. ``device``: where inputs go (default: the model's device).

    Returns ``{"ppl", "nll", "dataset", "split", "seqlen", "windows", "tokens",
    "predicted_tokens", "total_tokens", "available_windows", "seconds"}``:
    ``nll`` is the mean window NLL (nats/token), ``tokens`` the tokens fed
    (windows × seqlen), ``total_tokens`` the length of the tokenised corpus.
    Raises :class:`NonFiniteLossError` naming the first window with a NaN/inf loss.
    """
    check_model("perplexity", model)
    check_ints("perplexity", seqlen=seqlen, batch_size=batch_size)
    check_ints("perplexity", none_ok=("windows",), windows=windows)
    if not isinstance(dataset, torch.Tensor):
        check_type("perplexity", "dataset", dataset, (str, os.PathLike, list, tuple),
                   "a dataset name, a file path, a list of documents, a (text, info) pair or token ids")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 (one predicted token), got {seqlen}")
    from .models import check_context
    check_context(model, seqlen, "seqlen")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if windows is not None and windows < 1:
        raise DataError(f"windows must be positive or None, got {windows}")
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    stream, info = _resolve_stream(dataset, tokenizer, split, data_dir)
    label = info["dataset"] + (f":{info['split']}" if info.get("split") else "")
    if stream.dim() == 2:
        if stream.shape[1] != seqlen:
            raise DataError(f"perplexity: token windows [{stream.shape[0]}, {stream.shape[1]}] do not have "
                             f"seqlen={seqlen} columns (pass a 1-D stream to cut windows)")
        all_windows, total = stream, stream.numel()
    else:
        total = stream.numel()
        n_avail = total // seqlen
        if n_avail == 0:
            raise DataError(f"perplexity: {label} has {total} tokens, fewer than one window of seqlen={seqlen}")
        all_windows = stream[: n_avail * seqlen].view(n_avail, seqlen)
    n_avail = all_windows.shape[0]
    if windows is not None and windows > n_avail:
        raise DataError(f"perplexity: windows={windows} but {label} has only {n_avail} windows of {seqlen} tokens")
    n = n_avail if windows is None else windows
    dev = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    nlls = torch.empty(n, dtype=torch.float64)
    try:
        with torch.inference_mode(), tqdm(total=n, desc=f"eval {label}", unit="win", disable=not progress) as bar:
            for b0 in range(0, n, batch_size):
                batch = all_windows[b0:b0 + batch_size].to(dev)
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]  # [B, T, V]
                loss = window_nll(logits, batch).double().cpu()
                bad = (~torch.isfinite(loss)).nonzero()
                if bad.numel():
                    i = b0 + int(bad[0, 0])
                    raise NonFiniteLossError(
                        f"perplexity on {label}: window {i} (tokens {i * seqlen}:{(i + 1) * seqlen}) has "
                        f"non-finite loss {float(loss[int(bad[0, 0])])}; no window is skipped")
                nlls[b0:b0 + batch.shape[0]] = loss
                bar.update(batch.shape[0])
    finally:
        if was_training:
            model.train()
    nll = float(nlls.mean())
    seconds = time.perf_counter() - t_start
    result = {
        "ppl": math.exp(nll), "nll": nll, "dataset": info["dataset"], "split": info.get("split"),
        "seqlen": seqlen, "windows": n, "tokens": n * seqlen, "predicted_tokens": n * (seqlen - 1),
        "total_tokens": total, "available_windows": n_avail, "seconds": seconds,
    }
    log.info("perplexity %s seqlen %d: %.4f over %d/%d windows (%.1f s)", label, seqlen, result["ppl"], n,
             n_avail, seconds)
    return result
