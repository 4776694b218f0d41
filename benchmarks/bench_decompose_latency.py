"""End-to-end decomposition latency: the published SVD-LLM pipeline against obdk, same process.

Issue #7 item 4. One model is loaded once; every pipeline works on its own deep copy, on the
same calibration windows (``get_calibration_windows("wikitext2:validation", tok, nsamples,
seqlen, seed=0)``, so the same ``nsamples × seqlen`` tokens for every row), and every
compressed model is scored on the same WikiText-2 test windows.

Pipelines
---------
``reference svd-llm``
    The research code as published (AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py``), re-written here
    (not copied) as the baseline: see :func:`reference_collect`, :func:`reference_cholesky`
    and :func:`reference_whitening`, whose docstrings list the steps mirrored.
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

obdk rows run :func:`obdk.pipeline.prepare` once and :meth:`Plan.apply` per ``keep``; the
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
``_common.env_fields`` (device, versions, git sha, timestamp, load average).
``peak_rss_mib`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process high-water
mark, monotone over the whole run, so a later pipeline inherits the peak of an earlier one
(pipelines run in ``--pipelines`` order; only increases are informative). ``peak_cuda_mib``
is ``torch.cuda.max_memory_allocated`` reset per stage.

Models (``--dtype`` sets the dtype every pipeline runs in): ``smollm2-135m``
(``obdk.hub.load_model``, GGUF dequantised to fp32 by default), ``tiny``
(``tests/conftest.py::make_tiny_llama`` + ``make_char_tokenizer``, for checking the script),
``llama7b-random`` (CUDA only: a randomly initialised Llama-7B-shaped model, 32 layers,
d=4096, ffn=11008, MHA, bf16; SmolLM2's tokenizer and vocabulary when that package is
installed, otherwise uniformly random token ids with vocab 32000). On an 80 GB GPU obdk
``obd`` on the 7B shape needs 59 GiB of fp32 statistics next to 13 GiB of weights (see
``obdk/calibrate/stats.py``): run it on the larger GPU or leave it out with ``--pipelines``.

    python benchmarks/bench_decompose_latency.py --model smollm2-135m --nsamples 32 --seqlen 512 \\
        --keeps 0.8 0.6 0.9 --eval-windows 8 --out benchmarks/results/decompose_latency_cpu.csv
    python benchmarks/bench_decompose_latency.py --model smollm2-135m --dtype bf16 --nsamples 16 --seqlen 512 \\
        --keeps 0.8 0.6 --out benchmarks/results/decompose_latency_cpu_bf16.csv
    python benchmarks/bench_decompose_latency.py --plot-only --out benchmarks/results/decompose_latency_cpu.csv

In bf16 the reference keeps its published arithmetic (it runs its model in 16 bits too): hooks
upcast each input to fp32 before the Gram, Cholesky and ``inv`` in fp64, SVD in fp32, factors cast
back to the model's dtype.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

try:
    import _common  # run as ``python benchmarks/bench_decompose_latency.py``
except ImportError:  # imported as ``benchmarks.bench_decompose_latency`` (tests)
    from benchmarks import _common

import obdk.allocate  # noqa: F401,E402  imported here so that no pipeline's timed stage pays for the import
import obdk.calibrate.stats  # noqa: F401,E402
import obdk.decompose  # noqa: F401,E402
from obdk.config import LowRankConfig
from obdk.models import decoder_layers
from obdk.pipeline import StageTimer, _nparams, prepare

log = logging.getLogger("bench_decompose_latency")

PIPELINES = ("reference", "svd-llm", "obd", "obd-uniform")
LABELS = {"reference": "reference svd-llm", "svd-llm": "obdk svd-llm", "obd": "obdk obd",
          "obd-uniform": "obdk obd-uniform"}
STAGE_ORDER = ("calibration", "factorisation", "scores", "allocation", "truncation", "correction", "packing")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device=None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# =========================================================================== the reference pipeline


def reference_targets(model: nn.Module) -> list[tuple[int, str, nn.Linear]]:
    """``(layer index, full name, module)`` of every ``nn.Linear`` inside the decoder layers.

    Mirrors the reference's ``find_layers(layers[i])`` over ``model.model.layers``.
    """
    path, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.append((i, f"{path}.{i}.{name}", mod))
    return out


@torch.no_grad()
def reference_collect(model: nn.Module, input_ids: torch.Tensor, *, timer: Optional[StageTimer] = None,
                      batch_size: int = 1, offload: bool = True) -> dict[str, torch.Tensor]:
    """Raw input Grams ``Σ_t x_t x_tᵀ`` (fp32, not normalised) of every targeted Linear.

    As ``profle_svdllm`` in SVD-LLM's ``SVDLLM.py``: ``register_forward_hook`` on every Linear;
    the hook upcasts ``input[0]`` to fp32 (``.detach().float()``), forms the batched
    ``inp.transpose(1, 2) @ inp`` and sums it over the batch into that module's own
    accumulator (q/k/v and gate/up each keep a copy: no sharing); whole-model forward passes
    over the windows; hooks cleared afterwards; with ``offload`` the Grams then go to the CPU
    (``raw_scaling_diag_matrix.cpu()``) as the reference moves them before its Cholesky loop.
    (The reference hooks every ``nn.Linear`` of the
    model, ``lm_head`` included, whose Gram is never used; here only the decoder Linears.
    Its published ``main`` step 1 calls the layer-by-layer ``profle_svdllm_low_resource``,
    which has the same hook and arithmetic and only changes the memory schedule.)
    ``use_cache=False`` for both this and obdk. Timed as stage ``calibration``.
    """
    timer = timer or StageTimer()
    targets = reference_targets(model)
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            inp = inputs[0].detach().float()
            if inp.dim() == 2:
                inp = inp.unsqueeze(0)
            adds = torch.matmul(inp.transpose(1, 2), inp)
            adds_sum = torch.sum(adds, dim=0)
            if name in grams:
                grams[name] += adds_sum
            else:
                grams[name] = adds_sum
            del inp, adds, adds_sum
        return hook

    emb = model.get_input_embeddings()
    dev = emb.weight.device
    was_training = model.training
    model.eval()
    with timer("calibration"):
        for _, name, mod in targets:
            handles.append(mod.register_forward_hook(make_hook(name)))
        try:
            for b0 in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[b0:b0 + batch_size].to(dev), use_cache=False)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if offload:
            for name in grams:
                grams[name] = grams[name].cpu()
    return grams


@torch.no_grad()
def reference_cholesky(grams: dict[str, torch.Tensor], *, timer: Optional[StageTimer] = None,
                       detail: Optional[StageTimer] = None, damping: float = 0.0,
                       shifted: Optional[list] = None, device=None) -> dict[str, torch.Tensor]:
    """fp64 lower Cholesky factor ``S`` of each raw Gram (``S Sᵀ = Σ x xᵀ``), kept on the CPU.

    As the second half of ``profle_svdllm``: ``raw.double().to(device)`` (default: where the
    Gram is),
    ``torch.linalg.cholesky``; on failure ``eigvalsh`` and a shift ``(−λ_min + 1e-6)·I``, then
    Cholesky again; the factor goes to the CPU (``profiling_mat``) and the Gram is freed
    (``grams`` is emptied as it goes). No damping in the reference: ``damping`` > 0 adds
    ``damping·mean(diag)·I`` first (obdk's relative damping), only so that the tests can
    compare both at the same damping. Names whose Gram needed the shift are appended to
    ``shifted``. Timed as ``factorisation`` (detail ``factorisation/cholesky``).
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    out: dict[str, torch.Tensor] = {}
    for name in list(grams):
        with timer("factorisation"), detail("factorisation/cholesky"):
            raw = grams.pop(name).double()
            if device is not None:
                raw = raw.to(device)
            if damping > 0:
                raw += damping * torch.diagonal(raw).mean() * torch.eye(raw.shape[0], dtype=raw.dtype,
                                                                         device=raw.device)
            try:
                chol = torch.linalg.cholesky(raw)
            except Exception:  # torch.linalg.LinAlgError: not positive definite
                log.info("reference: %s: Gram is not positive definite; eigenvalue shift", name)
                eigenvalues = torch.linalg.eigvalsh(raw)
                raw += (-eigenvalues[0] + 1e-6) * torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
                chol = torch.linalg.cholesky(raw)
                if shifted is not None:
                    shifted.append(name)
            out[name] = chol.cpu()
            del raw, chol
    return out


def reference_rank(m: int, n: int, keep: float, mode: str = "match") -> Optional[int]:
    """Rank of an ``m×n`` matrix at ``keep`` (None: kept dense).

    ``match``: obdk's uniform rank, ``round(keep·mn/(m+n))`` (halves up, at least 1), dense
    when ``r(m+n) ≥ mn`` (``obdk.allocate.allocate_uniform`` with ``multiple=1``), so the
    baseline keeps exactly the parameters obdk keeps. ``floor``: the reference's
    ``int(m·n·ratio/(m+n))`` with ``ratio = keep``, never dense.
    """
    be = m * n / (m + n)
    if mode == "floor":
        return max(1, int(m * n * keep / (m + n)))
    if mode != "match":
        raise ValueError(f"reference_rank: mode must be 'match' or 'floor', got {mode!r}")
    if keep >= 1.0:
        return None
    r = max(1, math.floor(keep * be + 0.5))
    return None if r * (m + n) >= m * n else r


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def reference_whitening(model: nn.Module, chol: dict[str, torch.Tensor], keep: float, *,
                        timer: Optional[StageTimer] = None, detail: Optional[StageTimer] = None,
                        rank_mode: str = "match") -> dict[str, Optional[int]]:
    """Replace every targeted Linear by its SVD-LLM factors at ``keep``; returns the ranks.

    As ``whitening`` in SVD-LLM's ``SVDLLM.py``, per Linear: ``W = weight.float()``; the fp64
    Cholesky factor ``S`` moved to the device; explicit ``S⁻¹ = torch.linalg.inv(S)`` in fp64
    (on failure ``S += 1e-6·I`` and again); both cast to fp32; ``W_scale = W @ S``; full
    ``torch.linalg.svd(W_scale, full_matrices=False)`` in fp32; truncate to ``r``
    (:func:`reference_rank`); ``truc_v = Vᵀ[:r] @ S⁻¹``; ``√Σ`` as a ``torch.diag`` matrix and
    matmuls: ``svd_u = U_r·√Σ``, ``svd_v = √Σ·truc_v``. Packing builds two fresh ``nn.Linear``
    (``v_proj: n→r``, ``u_proj: r→m``, default init, then the factors assigned) as the
    reference's ``SVD_LlamaAttention``/``SVD_LlamaMLP`` hold, in an ``nn.Sequential`` swapped in
    for the Linear (the reference swaps whole forked attention/MLP classes instead, which broke
    on GQA models; the arithmetic per matrix is the same). Factors are cast to the weight's
    dtype (the reference evaluates in fp32). Timed as ``factorisation`` (details
    ``factorisation/inv``, ``factorisation/svd``) and ``packing``.
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    ranks: dict[str, Optional[int]] = {}
    for _, name, lin in reference_targets(model):
        m, n = lin.out_features, lin.in_features
        r = reference_rank(m, n, keep, rank_mode)
        ranks[name] = r
        if r is None:
            continue
        dev, dt = lin.weight.device, lin.weight.dtype
        with timer("factorisation"):
            with detail("factorisation/inv"):
                W = lin.weight.data.float().to(dev)
                scaling_diag_matrix = chol[name].to(dev)
                try:
                    scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
                except Exception:
                    scaling_diag_matrix = scaling_diag_matrix + 1e-6 * torch.eye(n, dtype=scaling_diag_matrix.dtype,
                                                                                 device=dev)
                    scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
                scaling_diag_matrix = scaling_diag_matrix.float()
                scaling_matrix_inv = scaling_matrix_inv.float()
            with detail("factorisation/svd"):
                W_scale = torch.matmul(W, scaling_diag_matrix)
                U, S, VT = torch.linalg.svd(W_scale, full_matrices=False)
        with timer("packing"):
            truc_s = S[:r]
            truc_u = U[:, :r]
            truc_v = torch.matmul(VT[:r, :], scaling_matrix_inv)
            sqrt_sigma = torch.sqrt(torch.diag(truc_s))
            svd_u = torch.matmul(truc_u, sqrt_sigma).to(dt)
            svd_v = torch.matmul(sqrt_sigma, truc_v).to(dt)
            v_proj = nn.Linear(n, r, bias=False, device=dev, dtype=dt)
            u_proj = nn.Linear(r, m, bias=lin.bias is not None, device=dev, dtype=dt)
            v_proj.weight.data = svd_v
            u_proj.weight.data = svd_u
            if lin.bias is not None:
                u_proj.bias.data = lin.bias.data
            _set_module(model, name, nn.Sequential(OrderedDict(v_proj=v_proj, u_proj=u_proj)))
            del W, W_scale, scaling_matrix_inv, scaling_diag_matrix, U, S, VT, truc_s, truc_u, truc_v, sqrt_sigma
    return ranks


def reference_svdllm(model: nn.Module, windows: torch.Tensor, keep: float, *, timer: Optional[StageTimer] = None,
                     detail: Optional[StageTimer] = None, rank_mode: str = "match", damping: float = 0.0,
                     shifted: Optional[list] = None):
    """The whole reference pipeline on ``model`` (in place): collect, Cholesky, whitening at ``keep``.

    Returns ``(ranks, chol)``; ``chol`` (the reference's ``profiling_mat``, on the CPU) serves
    further ratios through :func:`reference_whitening`. Names of Grams that needed the
    eigenvalue shift are appended to ``shifted``.
    """
    timer = timer or StageTimer()
    detail = detail or StageTimer()
    dev = model.get_input_embeddings().weight.device
    grams = reference_collect(model, windows, timer=timer)
    shifted = [] if shifted is None else shifted
    chol = reference_cholesky(grams, timer=timer, detail=detail, damping=damping, shifted=shifted, device=dev)
    if shifted:
        log.warning("reference: %d of %d Grams were not positive definite (eigenvalue shift applied)",
                    len(shifted), len(chol))
    ranks = reference_whitening(model, chol, keep, timer=timer, detail=detail, rank_mode=rank_mode)
    return ranks, chol


def _params_after(model: nn.Module) -> int:
    """Parameters of the targeted Linears (dense or factored) of ``model``."""
    path, layers = decoder_layers(model)
    total = 0
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                total += mod.weight.numel()
            elif hasattr(mod, "weight_a") and hasattr(mod, "weight_b"):
                total += mod.weight_a.numel() + mod.weight_b.numel()
    return total


# =========================================================================== models and data


def _default_data_dir() -> Optional[str]:
    if os.environ.get("OBDK_DATA_DIR"):
        return os.environ["OBDK_DATA_DIR"]
    d = _common.REPO.parent / "shared" / "data"
    return str(d) if d.is_dir() else None


def build_model(name: str, device: torch.device, dtype: Optional[str] = None):
    """``(model, tokenizer, base_device)``: the dense model lives on ``base_device`` between pipelines.

    ``dtype`` (``fp32``, ``bf16``, ``fp16``): the model's dtype for every pipeline (default: fp32 for
    ``tiny`` and the dequantised GGUF of ``smollm2-135m``, bf16 for ``llama7b-random``).
    """
    dt = _DTYPES[dtype] if dtype else None
    if name == "tiny":
        if str(_common.REPO) not in sys.path:
            sys.path.insert(0, str(_common.REPO))
        from tests.conftest import make_char_tokenizer, make_tiny_llama
        return make_tiny_llama().to(device=device, dtype=dt), make_char_tokenizer(), device
    if name == "smollm2-135m":
        from obdk.hub import load_model
        model, tok = load_model("smollm2-135m", device=device, dtype=dt)
        return model, tok, device
    if name == "llama7b-random":
        if device.type != "cuda":
            raise SystemExit("--model llama7b-random needs a CUDA device (--device cuda)")
        from transformers import LlamaConfig, LlamaForCausalLM
        tok = None
        try:
            from obdk.hub import load_tokenizer
            tok = load_tokenizer("smollm2-135m")
        except Exception as exc:  # no tokenizer package on this machine: random token ids
            log.warning("llama7b-random: no SmolLM2 tokenizer (%s); random token ids, vocab 32000", exc)
        vocab = len(tok) if tok is not None else 32000
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        old = torch.get_default_dtype()
        torch.manual_seed(0)
        try:
            torch.set_default_dtype(dt or torch.bfloat16)
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        # The dense original waits in host memory; each pipeline gets its own copy on the GPU.
        return model.eval().cpu(), tok, torch.device("cpu")
    raise SystemExit(f"unknown --model {name!r}")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def clone(base: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(base).to(device).eval()


def calibration_data(tok, vocab: int, nsamples: int, seqlen: int, data_dir: Optional[str]):
    from obdk.calibrate.data import get_calibration_windows
    if tok is None:  # llama7b-random without a tokenizer
        g = torch.Generator().manual_seed(0)
        return get_calibration_windows(torch.randint(0, vocab, (nsamples, seqlen), generator=g), None,
                                       nsamples=nsamples, seqlen=seqlen, seed=0)
    return get_calibration_windows("wikitext2:validation", tok, nsamples=nsamples, seqlen=seqlen, seed=0,
                                   data_dir=data_dir)


def eval_windows(tok, vocab: int, n: int, seqlen: int, data_dir: Optional[str]) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens of WikiText-2 test (tokenised once)."""
    if tok is None:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, vocab, (n, seqlen), generator=g)
    from obdk.calibrate.data import load_text, tokenize_text
    text, _ = load_text("wikitext2:test", data_dir)
    ids = tokenize_text(text, tok)
    if ids.numel() < n * seqlen:
        raise SystemExit(f"WikiText-2 test has {ids.numel()} tokens, fewer than {n} windows of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen).clone()


def ppl_of(model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    from obdk.eval import perplexity
    res = perplexity(model, None, windows, seqlen=windows.shape[1], progress=False)
    return float(res["ppl"]), float(res["seconds"])


# =========================================================================== running


def _config(pipe: str, keep: float) -> LowRankConfig:
    if pipe == "svd-llm":
        return LowRankConfig(method="svd-llm", keep=keep, alloc="uniform", rank_multiple=1)
    if pipe == "obd":
        return LowRankConfig(method="obd", keep=keep, correct="none")
    if pipe == "obd-uniform":
        return LowRankConfig(method="obd", keep=keep, alloc="uniform", rank_multiple=1, correct="none")
    raise ValueError(pipe)


def _stage_rows(common: dict, stages: dict, kind: str = "stage") -> list[dict]:
    rows = []
    for name, st in stages.items():  # "stage/sub" (e.g. obdk's factorisation/eigen) is a breakdown, not stacked
        rows.append({**common, "stage": name, "kind": "detail" if "/" in name else kind, "seconds": st["seconds"],
                     "peak_rss_mib": st["peak_rss_mib"], "peak_cuda_mib": st.get("peak_cuda_mib")})
    return rows


def _total_row(common: dict, seconds: float, device) -> dict:
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None
    return {**common, "stage": "total", "kind": "total", "seconds": seconds,
            "peak_rss_mib": _common_rss(), "peak_cuda_mib": peak_cuda}


def _common_rss() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_reference(base, base_dev, device, data, keeps, ev, args, meta) -> list[dict]:
    rows = []
    label = LABELS["reference"]
    first_total = None
    model = clone(base, device)
    _free()
    timer, detail = StageTimer(), StageTimer()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    shifted: list = []
    _, chol = reference_svdllm(model, data.input_ids, keeps[0], timer=timer, detail=detail, rank_mode=args.ref_rank,
                               shifted=shifted)
    _sync(device)
    total = time.perf_counter() - t0
    first_total = total
    ppl, _ = ppl_of(model, ev)
    pa = _params_after(model)
    common = {**meta, "pipeline": label, "keep": keeps[0], "run": "first", "ppl": ppl, "params_after": pa,
              "keep_actual": pa / meta["_params_before"], "ref_shifted": len(shifted)}
    rows += _stage_rows(common, timer.to_dict()) + _stage_rows(common, detail.to_dict(), "detail")
    rows.append(_total_row(common, total, device))
    log.info("%s keep=%.2f: %.2f s, ppl %.3f", label, keeps[0], total, ppl)
    del model
    _free()
    for k in keeps[1:]:
        model = clone(base, device)
        _free()
        timer, detail = StageTimer(), StageTimer()
        t0 = time.perf_counter()
        reference_whitening(model, chol, k, timer=timer, detail=detail, rank_mode=args.ref_rank)
        _sync(device)
        total = time.perf_counter() - t0
        ppl, _ = ppl_of(model, ev)
        pa = _params_after(model)
        common = {**meta, "pipeline": label, "keep": k, "run": "extra", "ppl": ppl, "params_after": pa,
                  "keep_actual": pa / meta["_params_before"]}
        rows += _stage_rows(common, timer.to_dict()) + _stage_rows(common, detail.to_dict(), "detail")
        rows.append({**_total_row(common, total, device), "marginal_frac": total / first_total})
        log.info("%s extra keep=%.2f: %.2f s (%.1f%% of first), ppl %.3f", label, k, total,
                 100 * total / first_total, ppl)
        del model
        _free()
    del chol
    _free()
    return rows


def run_obdk(pipe, base, base_dev, device, data, keeps, ev, args, meta) -> list[dict]:
    rows = []
    label = LABELS[pipe]
    config = _config(pipe, keeps[0])
    model = clone(base, device)
    _free()
    timer = StageTimer()
    before = meta["_model_params"]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    plan = prepare(model, config, data, progress=False, timer=timer)
    report = plan.apply(model, keep=keeps[0], model_params_before=before)
    _sync(device)
    first_total = time.perf_counter() - t0
    prepared = set(plan.timer.stages)
    ppl, _ = ppl_of(model, ev)
    common = {**meta, "pipeline": label, "keep": keeps[0], "run": "first", "ppl": ppl,
              "params_after": report.targeted_params_after, "keep_actual": report.keep_actual}
    rows += _stage_rows(common, report.stages)
    rows.append(_total_row(common, first_total, device))
    log.info("%s keep=%.2f: %.2f s, ppl %.3f", label, keeps[0], first_total, ppl)
    del model
    _free()
    for k in keeps[1:]:
        model = clone(base, device)
        _free()
        t0 = time.perf_counter()
        report = plan.apply(model, keep=k, model_params_before=before)
        _sync(device)
        total = time.perf_counter() - t0
        ppl, _ = ppl_of(model, ev)
        marginal = {s: v for s, v in report.stages.items() if s not in prepared}
        common = {**meta, "pipeline": label, "keep": k, "run": "extra", "ppl": ppl,
                  "params_after": report.targeted_params_after, "keep_actual": report.keep_actual}
        rows += _stage_rows(common, marginal)
        rows.append({**_total_row(common, total, device), "marginal_frac": total / first_total})
        log.info("%s extra keep=%.2f: %.3f s (%.1f%% of first), ppl %.3f", label, k, total,
                 100 * total / first_total, ppl)
        del model
        _free()
    del plan
    _free()
    return rows


# =========================================================================== summary and plot


def _f(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def summarize(rows: list[dict]) -> list[str]:
    """Lines: per pipeline × keep the stage times, total and ppl; then the three target ratios."""
    from collections import defaultdict
    tab: dict = defaultdict(dict)
    ppl, frac, dense = {}, {}, None
    for r in rows:
        key = (r["pipeline"], float(r["keep"]))
        if r["kind"] == "eval":
            dense = _f(r["ppl"])
            continue
        if r["kind"] in ("stage", "total"):
            tab[key][r["stage"]] = _f(r["seconds"])
        ppl[key] = _f(r["ppl"])
        if r["kind"] == "total" and _f(r.get("marginal_frac")) is not None:
            frac[key] = _f(r["marginal_frac"])
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
    lines = []
    cells = [cols] + [[_common.fmt(d.get(c, "")) for c in cols] for d in out_rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        lines.append("  ".join(s.rjust(w) for s, w in zip(row, widths)))
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
    for p in (LABELS["svd-llm"], LABELS["obd"], LABELS["obd-uniform"], LABELS["reference"]):
        fr = [(k, v) for (pp, k), v in frac.items() if pp == p]
        if fr:
            worst = max(v for _, v in fr)
            tgt = "" if p == LABELS["reference"] else f" (target <= 10%: {'met' if worst <= 0.10 else 'NOT met'})"
            lines.append(f"{p}: extra ratio marginal / first total: "
                         + ", ".join(f"keep {k}: {100 * v:.2f}%" for k, v in sorted(fr)) + tgt)
    return lines


def read_run(csv_path: Path, run_id: Optional[str] = None) -> list[dict]:
    """Rows of one run (default: the last run in the file)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{csv_path} holds no rows")
    run_id = run_id or rows[-1]["run_id"]
    return [r for r in rows if r.get("run_id") == run_id]


def plot(rows: list[dict], png: Path) -> Path:
    """Stacked bars of the stages per pipeline (first keep), and each extra ratio's marginal cost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = [LABELS[p] for p in PIPELINES]
    first = [r for r in rows if r["run"] == "first" and r["kind"] == "stage"]
    pipes = [p for p in order if any(r["pipeline"] == p for r in first)]
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s for r in first)]
    stages += sorted({r["stage"] for r in first} - set(stages))
    secs = {(r["pipeline"], r["stage"]): float(r["seconds"]) for r in first}
    ppl = {r["pipeline"]: _f(r["ppl"]) for r in first}
    keep0 = first[0]["keep"] if first else ""
    extra = [r for r in rows if r["run"] == "extra" and r["kind"] == "total"]
    ekeeps = sorted({r["keep"] for r in extra}, key=float)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(13 if extra else 7.5, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if extra else None)
    ax = axes[0][0]
    colors = plt.get_cmap("tab10")
    bottom = [0.0] * len(pipes)
    for i, s in enumerate(stages):
        h = [secs.get((p, s), 0.0) for p in pipes]
        ax.bar(range(len(pipes)), h, bottom=bottom, label=s, color=colors(i % 10))
        bottom = [b + x for b, x in zip(bottom, h)]
    for j, p in enumerate(pipes):
        tot = [float(r["seconds"]) for r in rows if r["pipeline"] == p and r["run"] == "first" and r["kind"] == "total"]
        txt = f"{tot[0]:.3g} s" if tot else ""
        if ppl.get(p) is not None:
            txt += f"\nppl {ppl[p]:.3g}"
        ax.text(j, bottom[j], txt, ha="center", va="bottom", fontsize=8)
    dense = [_f(r["ppl"]) for r in rows if r["kind"] == "eval"]
    meta = rows[0] if rows else {}
    ax.set_xticks(range(len(pipes)), [p.replace(" ", "\n", 1) for p in pipes], fontsize=9)
    ax.set_ylabel("seconds")
    ax.set_ylim(0, max(bottom + [1e-9]) * 1.35)
    ax.set_title(f"end to end at keep {keep0}" + (f" (dense ppl {dense[0]:.3g})" if dense and dense[0] else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=min(4, max(1, len(stages))))
    if extra:
        ax2 = axes[0][1]
        epipes = [p for p in order if any(r["pipeline"] == p for r in extra)]
        w = 0.8 / max(1, len(ekeeps))
        for i, k in enumerate(ekeeps):
            h = [next((float(r["seconds"]) for r in extra if r["pipeline"] == p and r["keep"] == k), 0.0) for p in epipes]
            fr = [next((_f(r.get("marginal_frac")) for r in extra if r["pipeline"] == p and r["keep"] == k), None)
                  for p in epipes]
            xs = [j + (i - (len(ekeeps) - 1) / 2) * w for j in range(len(epipes))]
            ax2.bar(xs, h, width=w, label=f"keep {k}", color=colors((i + 5) % 10))
            for x, y, f in zip(xs, h, fr):
                if f is not None:
                    ax2.text(x, y, f"{100 * f:.1f}%", ha="center", va="bottom", fontsize=7)
        ax2.set_xticks(range(len(epipes)), [p.replace(" ", "\n", 1) for p in epipes], fontsize=9)
        ax2.set_ylabel("seconds")
        ax2.set_title("each extra ratio (% of the first total)", fontsize=10)
        ax2.set_ylim(0, max([float(r["seconds"]) for r in extra] + [1e-9]) * 1.3)
        ax2.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{meta.get('model', '')} ({meta.get('model_dtype') or 'float32'}): {meta.get('nsamples', '')}×{meta.get('seqlen', '')} calibration tokens, "
                 f"{meta.get('device_name', '')}, {meta.get('git_sha', '')}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


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
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--data-dir", default=_default_data_dir())
    ap.add_argument("--out", default=str(_common.REPO / "benchmarks" / "results" / "decompose_latency_cpu.csv"))
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot of the last run in --out")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("obdk", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if args.plot_only:
        rows = read_run(out)
        print("\n".join(summarize(rows)))
        print(f"plot: {plot(rows, png)}")
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")

    t0 = time.perf_counter()
    base, tok, base_dev = build_model(args.model, device, args.dtype)
    vocab = base.config.vocab_size
    eval_seqlen = args.eval_seqlen
    maxpos = getattr(base.config, "max_position_embeddings", None)
    if maxpos and eval_seqlen > maxpos:
        log.info("eval seqlen %d > max_position_embeddings %d: using %d", eval_seqlen, maxpos, maxpos)
        eval_seqlen = maxpos
    try:
        data = calibration_data(tok, vocab, args.nsamples, args.seqlen, args.data_dir)
        ev = eval_windows(tok, vocab, args.eval_windows, eval_seqlen, args.data_dir)
    except (FileNotFoundError, OSError) as exc:
        if args.model != "llama7b-random":
            raise
        log.warning("llama7b-random: WikiText-2 not available (%s); random token ids", exc)
        data = calibration_data(None, vocab, args.nsamples, args.seqlen, None)
        ev = eval_windows(None, vocab, args.eval_windows, eval_seqlen, None)
    log.info("model %s loaded and data ready in %.1f s", args.model, time.perf_counter() - t0)

    from obdk.pipeline import select_targets
    targeted = sum(t.m * t.n for t in select_targets(base, LowRankConfig()))
    env = _common.env_fields(device)
    meta = {"model": args.model, "model_dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "nsamples": args.nsamples, "seqlen": args.seqlen,
            "tokens": int(data.input_ids.numel()), "eval_windows": args.eval_windows, "eval_seqlen": eval_seqlen,
            "threads": torch.get_num_threads(), "ref_rank": args.ref_rank, "run_id": env["timestamp"] + "/" + args.model,
            "_params_before": targeted, "_model_params": _nparams(base), **env}

    rows: list[dict] = []
    model = clone(base, device)
    dppl, dsec = ppl_of(model, ev)  # also warms up the forward pass before any pipeline is timed
    del model
    _free()
    rows.append({**meta, "pipeline": "dense", "keep": 1.0, "run": "dense", "stage": "eval", "kind": "eval",
                 "seconds": dsec, "peak_rss_mib": _common_rss(), "ppl": dppl, "params_after": targeted,
                 "keep_actual": 1.0})
    log.info("dense ppl %.4f (%d windows of %d)", dppl, ev.shape[0], eval_seqlen)
    for pipe in args.pipelines:
        if pipe == "reference":
            rows += run_reference(base, base_dev, device, data, args.keeps, ev, args, meta)
        else:
            rows += run_obdk(pipe, base, base_dev, device, data, args.keeps, ev, args, meta)
    for r in rows:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
        r.setdefault("marginal_frac", "")
        r.setdefault("peak_cuda_mib", "")
    lead = ["pipeline", "keep", "run", "stage", "kind", "seconds", "peak_rss_mib", "peak_cuda_mib", "ppl",
            "marginal_frac", "params_after", "keep_actual"]
    rows = [{**{k: r.get(k, "") for k in lead}, **{k: v for k, v in r.items() if k not in lead}} for r in rows]
    _common.write_csv(rows, out)
    str_rows = [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]
    print("\n".join(summarize(str_rows)))
    print(f"csv: {out}\nplot: {plot(str_rows, png)}")
    return rows


if __name__ == "__main__":
    main()
