"""What a compression run will need, from a model's ``config.json`` alone (no weights).

:func:`plan_run` reads the shapes of a Llama-family decoder (Llama, Mistral, Qwen2/3, and any
config with ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``num_hidden_layers``, ``vocab_size``) and returns, for a calibration
of ``nsamples × seqlen`` tokens split over ``nproc`` data-parallel ranks:

* statistics bytes per decoder layer and in all (``C_x`` per unique input, ``C_g`` per output,
  ``∂L/∂W`` per Linear when the method needs it), exactly as :func:`obdk.calibrate.memory.stats_nbytes`
  counts them;
* the peak device memory of one rank of the layer-streamed pipeline: one decoder layer's
  weights, its statistics, and the activations of one calibration batch through it (an
  estimate: the layer's inputs and outputs kept for the backward, attention probabilities, the
  MLP's intermediates, and one window's LM-head logits);
* host memory (or scratch disk) for the boundary activations (the input of every decoder layer
  for every window and the one gradient buffer of the backward sweep, model dtype), for the kept factors (every
  target's ordered factors up to the largest rank that saves parameters, in the model dtype, so any ratio is a
  slice: about the decoder's own bytes; BSI allocations keep them whole, in the float64 compute dtype) and, when
  the method corrects, for every layer's statistics; with ``max_host_memory`` how much of that goes to the
  scratch disk (a layer's factors are kept on host or written to scratch whole, the top layers first);
* FLOPs of calibration (forward, backward, the streamed pass's recomputed forward, the Grams)
  and of the decompositions (eigen-problems on the smaller side of each matrix).

Every figure is arithmetic on the shapes; the formulas are in :func:`plan_run`'s body.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .allocate.budget import max_factored_rank
from .config import WHITENINGS
from .errors import ConfigError, MissingFileError
from .registry import ALLOCATORS, CORRECTIONS, METHODS

__all__ = ["PRESETS", "read_model_config", "check_model_config", "plan_run", "format_plan"]

GiB = float(1 << 30)

#: shapes of the models the README plans for (from their published config.json files)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000, torch_dtype="float16"),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, torch_dtype="bfloat16"),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256, torch_dtype="bfloat16"),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_attention_heads=64,
                        num_key_value_heads=8, num_hidden_layers=80, vocab_size=152064, torch_dtype="bfloat16"),
}

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def read_model_config(spec: str | os.PathLike) -> dict[str, Any]:
    """A model's config as a dict: a preset name (:data:`PRESETS`), a ``config.json``, or a directory holding one."""
    s = os.fspath(spec)
    if s in PRESETS:
        return dict(PRESETS[s])
    p = Path(s).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise MissingFileError(f"{spec}: no config.json there (or a preset: {', '.join(PRESETS)})")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: not a JSON model config ({exc})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: not a model config (a JSON object with hidden_size, num_hidden_layers, ...)")
    check_model_config(cfg, str(p))
    return cfg


_NEED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def check_model_config(cfg: dict[str, Any], source: str = "model config") -> None:
    """Every field :func:`plan_run` reads, checked; a :class:`ConfigError` naming the field and ``source`` (the file).

    :data:`_NEED` fields: positive integers (a bool, a float or a string is refused); ``num_key_value_heads`` and
    ``head_dim`` (optional, null = absent): positive integers, the KV heads dividing ``num_attention_heads`` (GQA
    groups); without ``head_dim``, ``num_attention_heads`` must divide ``hidden_size``."""
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {field} {cfg.get(field)!r}: {why}")

    for k in _NEED + ("num_key_value_heads", "head_dim"):
        v = cfg.get(k)
        if v is None and k not in _NEED:
            continue
        if v is None:
            raise ConfigError(f"{source}: {k} missing (a Llama-family decoder config is needed)")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(k, "must be a positive integer")
    h, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    if kv is not None and h % kv:
        raise bad("num_key_value_heads", f"must divide num_attention_heads {h} (each KV head serves a group of "
                                         f"query heads)")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % h:
        raise bad("num_attention_heads", f"must divide hidden_size {cfg['hidden_size']} (or give head_dim)")


def _shapes(cfg: dict[str, Any]) -> tuple[list[tuple[str, int, int, str]], dict[str, int]]:
    """Targets of one decoder layer ``[(name, m, n, input key)]`` and the sizes used elsewhere."""
    check_model_config(cfg)
    d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or d // h
    q, k = h * hd, kv * hd
    targets = [("q_proj", q, d, "attn_in"), ("k_proj", k, d, "attn_in"), ("v_proj", k, d, "attn_in"),
               ("o_proj", d, q, "o_in"), ("gate_proj", f, d, "mlp_in"), ("up_proj", f, d, "mlp_in"),
               ("down_proj", d, f, "down_in")]
    return targets, dict(d=d, f=f, h=h, kv=kv, hd=hd, layers=cfg["num_hidden_layers"], vocab=cfg["vocab_size"])


def plan_run(cfg: dict[str, Any], *, method: str = "obd", nsamples: int = 32, seqlen: int = 512, nproc: int = 1,
             batch_size: int = 1, stats_dtype: str = "float32", dtype: Optional[str] = None,
             correct: Optional[str] = None, max_host_memory: Optional[int] = None) -> dict[str, Any]:
    """The memory and FLOPs of compressing the model ``cfg`` with ``method`` (see the module docstring).

    ``cfg``: a config dict (:func:`read_model_config`); ``nsamples`` windows of ``seqlen`` tokens,
    split over ``nproc`` ranks (each takes ``ceil(nsamples / nproc)``), ``batch_size`` windows per
    pass; ``stats_dtype`` of the statistics; ``dtype`` of the model (default its ``torch_dtype``);
    ``correct`` the corrections (``obdk compress --correct``; None: the method's, ``"none"``: none);
    ``max_host_memory`` the streamed run's ``--max-host-memory`` (None: unbounded, nothing on scratch).
    Returns a JSON-able dict; bytes are integers, FLOPs floats.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"plan_run: cfg must be a model config dict (read_model_config), got {type(cfg).__name__}")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen), ("nproc", nproc), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v!r}: must be a positive integer")
    if dtype is None and cfg.get("torch_dtype") is not None and cfg["torch_dtype"] not in _DTYPE_BYTES:
        raise ConfigError(f"model config: torch_dtype {cfg['torch_dtype']!r}: one of {', '.join(_DTYPE_BYTES)} "
                          f"(or pass --dtype)")
    dtype = dtype or str(cfg.get("torch_dtype") or "float32")
    if dtype not in _DTYPE_BYTES or stats_dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype {dtype!r} / stats dtype {stats_dtype!r}: model dtype one of "
                          f"{', '.join(_DTYPE_BYTES)}, statistics float32 or float64")
    if max_host_memory is not None and (not isinstance(max_host_memory, int) or isinstance(max_host_memory, bool)
                                        or max_host_memory < 0):
        raise ConfigError(f"--max-host-memory {max_host_memory!r}: must be a byte count >= 0")
    wb, sb = _DTYPE_BYTES[dtype], _DTYPE_BYTES[stats_dtype]
    preset = METHODS[method]
    whitening, alloc = preset.whitening, preset.alloc
    correct = preset.correct if correct is None else (None if correct == "none" else correct)
    if correct is not None and correct not in CORRECTIONS:
        raise ConfigError(f"--correct {correct!r}: choose none or one of {', '.join(CORRECTIONS)}")
    want = set(WHITENINGS[whitening]) | set(preset.stats)
    targets, z = _shapes(cfg)
    L, d, f, V = z["layers"], z["d"], z["f"], z["vocab"]
    inputs = {key: n for _, _, n, key in targets}

    # statistics of one layer: one C_x per unique input, C_g per output, ∂L/∂W per Linear
    cx = sum(n * n for n in inputs.values()) if "cx" in want else 0
    cg = sum(m * m for _, m, _, _ in targets) if "cg" in want else 0
    grad = sum(m * n for _, m, n, _ in targets) if "grad" in want else 0
    layer_stats = (cx + cg + grad) * sb
    layer_params = sum(m * n for _, m, n, _ in targets) + 2 * d  # + the two norms
    backward = bool({"cg", "grad"} & want)

    # one rank's share of the windows and tokens
    windows = -(-nsamples // nproc)
    tokens = windows * seqlen
    all_tokens = nsamples * seqlen
    bt = batch_size * seqlen
    # activations of one batch through one layer, kept for its backward (model dtype): the layer
    # input and output, q/k/v, the attention output, the MLP's gate/up/act products, plus the
    # attention probabilities [heads, T, T] (eager; SDPA keeps less) and one window's logits in fp32
    acts = bt * (2 * d + q_k_v(z) + d + 3 * f) * wb + batch_size * z["h"] * seqlen * seqlen * wb
    head = seqlen * V * 4 * (2 if backward else 0)
    peak_device = layer_params * wb + layer_stats + acts + head
    # every layer's input, plus the one gradient buffer (it exists while the top layer's input still does);
    # the calibrate_streamed peak (BoundaryStore.peak_host_bytes, stream_memory.csv: SmolLM2 32×512 fp32
    # 1.0898 GiB = 31 buffers; the 7B shape with 2 layers, 2×64 bf16: 3 buffers)
    boundary = (L + 1) * windows * seqlen * d * wb if backward else 2 * windows * seqlen * d * wb
    # the kept factors (a streamed plan's SpectrumStore, Spectrum.compact): the leading max_factored_rank(m, n)
    # components in the model dtype, r·(m+n) < m·n, so about the decoder's own bytes (Llama-7B fp32: 0.81 GB per
    # layer); an allocator that keeps any component (BSI) keeps whole spectra in the compute dtype, float64
    if ALLOCATORS[alloc].any_component:
        layer_factors = sum((m + n) * min(m, n) for _, m, n, _ in targets) * 8
    else:
        layer_factors = sum((m + n) * max_factored_rank(m, n) for _, m, n, _ in targets) * wb
    factors = layer_factors * L
    # the corrections solve with each layer's C_x and C_g again (a LayerStatistics; the gradients are dropped)
    layer_kept_stats = (cx + cg) * sb if correct is not None else 0
    # one HostBudget of max_host_memory bounds the boundary buffers, the kept factors and statistics together: from
    # the top layer down (the backward sweep) while the boundary buffers are held, each layer's factors, then its
    # statistics, are kept on host when they fit in what is left, else written whole to the scratch disk
    scratch = 0
    if max_host_memory is not None:
        left = max_host_memory - boundary
        scratch = max(0, -left)
        for _ in range(L):
            for nbytes in (layer_factors, layer_kept_stats):
                if 0 < nbytes <= left:
                    left -= nbytes
                else:
                    scratch += nbytes
    params = layer_params * L
    kept = factors + layer_kept_stats * L  # (+ the boundary buffers: mapped when spilled, see _host_peak)
    host_peak, work = _host_peak(cfg, targets, V * d * wb, layer_params * wb + layer_stats,
                                 boundary + (kept if max_host_memory is None else min(kept, max_host_memory)))
    # forward: the Linears (2 FLOPs per weight and token), attention scores and mixing
    # (4·T·(heads·head_dim) per token and layer) and the LM head (2·d·V per token)
    fwd = (2.0 * params + 4.0 * L * seqlen * z["h"] * z["hd"] + 2.0 * d * V) * all_tokens
    gram = sum(n * n for n in inputs.values()) * all_tokens * (1.0 if "cx" in want else 0.0)
    gram += sum(m * m for _, m, _, _ in targets) * all_tokens * (1.0 if "cg" in want else 0.0)
    calib = fwd + (2 * fwd + fwd if backward else 0.0) + gram * L  # forward, backward (2×), recomputed forward
    # per matrix: products T = L W (m·n·p), K = T C Tᵀ (p·n² + p²·n), eigh of K (≈ 9 p³), roots of
    # both covariances (n³/3 + m³/3) and the solves for the factors (m·n·p)
    dec = 0.0
    for _, m, n, _ in targets:
        p = min(m, n)
        dec += 2.0 * (2 * m * n * p + p * n * n + p * p * n) + 9.0 * p ** 3 + (n ** 3 + m ** 3) / 3.0
    dec *= L
    return {
        "model": {k: cfg.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "num_hidden_layers", "vocab_size")},
        "method": method, "stats": sorted(want), "nsamples": nsamples, "seqlen": seqlen, "nproc": nproc,
        "batch_size": batch_size, "dtype": dtype, "stats_dtype": stats_dtype,
        "params": int(params), "layer_params": int(layer_params),
        "layer_stats_bytes": int(layer_stats), "layer_cx_bytes": int(cx * sb), "layer_cg_bytes": int(cg * sb),
        "layer_grad_bytes": int(grad * sb), "total_stats_bytes": int(layer_stats * L),
        "peak_device_bytes_per_rank": int(peak_device),
        "host_boundary_bytes_per_rank": int(boundary), "host_factor_bytes": int(factors),
        "layer_factor_bytes": int(layer_factors), "host_kept_stats_bytes": int(layer_kept_stats * L),
        "correct": correct or "none", "max_host_memory": max_host_memory,
        "scratch_bytes_per_rank": int(scratch), "host_peak_bytes_per_rank": int(host_peak),
        "decompose_work_bytes": int(work),
        "calibration_flops": calib, "decomposition_flops": dec,
        "tokens_per_rank": int(tokens),
    }


def _host_peak(cfg: dict, targets, embed_bytes: int, layer_bytes: int, held: int) -> tuple[int, int]:
    """``(host peak, the largest decomposition's work)`` of a streamed CPU run (one decomposition worker,
    ``--weights-on-disk``): the embeddings and LM head, one decoder layer's weights and statistics
    (``layer_bytes``), the largest decomposition's fp64 working set (W, T, T·C; both covariances; the root, K and its
    eigenvectors on the smaller side: 8·(3mn + m² + n² + 2p²)), ``held`` (the boundary buffers always: spilled ones
    are memory-mapped and the pages the sweeps touch count in RSS; the factors and statistics up to
    ``max_host_memory``) and the interpreter with torch and transformers
    loaded. Measured on the 7B shape at ``--max-host-memory 0``: 2 layers 6.70 GB against 6.86 GB here; all 32 layers
    8.39 GB against 7.87 GB (6 % under: the rest grew during the 2.4-hour run, by what this sum does not say)."""
    outside = embed_bytes * (1 if cfg.get("tie_word_embeddings") else 2)
    work = max(8 * (3 * m * n + m * m + n * n + 2 * min(m, n) ** 2) for _, m, n, _ in targets)
    return outside + layer_bytes + work + held + _INTERPRETER_BYTES, work


#: resident bytes of a Python process with torch, transformers and obdk's pipeline imported (measured on this CPU,
#: torch 2.13 CPU, transformers 5.25: 0.46 GB)
_INTERPRETER_BYTES = 460_000_000


def q_k_v(z: dict[str, int]) -> int:
    """Width of the concatenated q, k and v projections."""
    return z["h"] * z["hd"] + 2 * z["kv"] * z["hd"]


def format_plan(p: dict[str, Any]) -> str:
    """A few readable lines of :func:`plan_run`'s result."""
    m = p["model"]
    g = lambda b: f"{b / GiB:,.2f} GiB"  # noqa: E731
    lines = [
        f"{m.get('model_type')} {m['num_hidden_layers']} layers, d={m['hidden_size']}, ffn={m['intermediate_size']}, "
        f"heads {m['num_attention_heads']}/{m.get('num_key_value_heads')}, {p['params'] / 1e9:.2f} B decoder params",
        f"method {p['method']} (statistics {'+'.join(p['stats']) or 'none'}), {p['nsamples']} × {p['seqlen']} tokens "
        f"over {p['nproc']} rank(s), model {p['dtype']}, statistics {p['stats_dtype']}",
        f"statistics: {g(p['layer_stats_bytes'])} per layer (C_x {g(p['layer_cx_bytes'])}, C_g "
        f"{g(p['layer_cg_bytes'])}, grad {g(p['layer_grad_bytes'])}); all layers resident {g(p['total_stats_bytes'])}",
        f"peak device memory per rank, streamed: {g(p['peak_device_bytes_per_rank'])} (one layer's weights, "
        f"statistics and a batch's activations)",
        f"host memory or scratch disk per rank: boundary activations {g(p['host_boundary_bytes_per_rank'])}, "
        f"kept factors {g(p['host_factor_bytes'])}, kept statistics (--correct {p['correct']}) "
        f"{g(p['host_kept_stats_bytes'])}; scratch disk with --max-host-memory "
        f"{'unbounded' if p['max_host_memory'] is None else g(p['max_host_memory'])}: {g(p['scratch_bytes_per_rank'])}",
        f"host memory peak per rank, streamed on CPU with --weights-on-disk: {g(p['host_peak_bytes_per_rank'])} "
        f"(embeddings and head, one layer's weights and statistics, the largest decomposition's fp64 work "
        f"{g(p['decompose_work_bytes'])}, what --max-host-memory keeps, the interpreter)",
        f"FLOPs: calibration {p['calibration_flops']:.3g}, decomposition {p['decomposition_flops']:.3g}",
    ]
    return "\n".join(lines)
