"""obdk — Optimal Brain Decomposition: low-rank LLM compression and fused low-rank inference.

Public API (every name: docs/python-api.md)::

    model, tok = obdk.load_model("smollm2-135m")                 # HF id/dir, .gguf, obdk dir, alias
    obdk.compress(model, obdk.LowRankConfig(keep=0.8), "wikitext2:validation", tokenizer=tok)
    plan = obdk.prepare(model, config, data); plan.apply(copy, keep=0.6); plan.save(model, "out/", keep=0.6)
    obdk.save_pretrained(model, "out/"); obdk.load_pretrained("out/")
    obdk.factorize(weight, rank, method="obd", cx=..., cg=...)   # one matrix → Factorization
    obdk.calibrate(model, data, stats=("cx", "cg"))              # → Statistics

``import obdk`` never fails on a missing or broken native extension (a logged
warning, then pure-PyTorch fallbacks).
"""
from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("obdk").addHandler(logging.NullHandler())

# _ext never raises; ops declares the torch.library ops; calibrate is a callable package (obdk.calibrate(model, ...))
from . import _ext, calibrate, ops  # noqa: E402,F401
from .config import LowRankConfig  # noqa: E402
from .errors import ObdkError  # noqa: E402
from .nn import LowRankLinear  # noqa: E402

__all__ = [
    "__version__", "ObdkError", "ops", "calibrate", "LowRankConfig", "LowRankLinear", "factorize", "spectrum",
    "compress", "compress_many", "prepare", "CompressionReport", "save_pretrained", "load_pretrained",
    "perplexity", "load_model", "PackedLowRankLinear", "pack_shared_inputs", "Factorization", "Plan", "Streaming",
    "init_distributed", "get_calibration_windows", "load_skeleton", "zeroshot_accuracy",
]

_LAZY = {
    "factorize": ("obdk.decompose", "factorize"),
    "spectrum": ("obdk.decompose", "spectrum"),
    "Factorization": ("obdk.decompose", "Factorization"),
    "compress": ("obdk.pipeline", "compress"),
    "Plan": ("obdk.plan", "Plan"),
    "Streaming": ("obdk.stream.options", "Streaming"),
    "load_skeleton": ("obdk.stream.shards", "load_skeleton"),
    "init_distributed": ("obdk.stream.distributed", "init_from_env"),
    "compress_many": ("obdk.pipeline", "compress_many"),
    "prepare": ("obdk.pipeline", "prepare"),
    "CompressionReport": ("obdk.report", "CompressionReport"),
    "save_pretrained": ("obdk.io", "save_pretrained"),
    "load_pretrained": ("obdk.io", "load_pretrained"),
    "perplexity": ("obdk.eval", "perplexity"),
    "load_model": ("obdk.hub", "load_model"),
    "PackedLowRankLinear": ("obdk.nn", "PackedLowRankLinear"),
    "pack_shared_inputs": ("obdk.nn", "pack_shared_inputs"),
    # names users need that live in inner modules (the docs use these, not the inner paths); never the name of
    # a submodule: importing obdk.zeroshot sets the attribute obdk.zeroshot to the module
    "get_calibration_windows": ("obdk.calibrate.data", "get_calibration_windows"),
    "zeroshot_accuracy": ("obdk.zeroshot", "zeroshot"),
}


def __getattr__(name: str):
    # Heavy submodules (transformers, safetensors) load on first use, not on `import obdk`.
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        val = getattr(importlib.import_module(mod), attr)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'obdk' has no attribute {name!r}")


def _register_hf() -> None:
    try:
        from .hf_integration import register
        register()
    except Exception as exc:  # pragma: no cover
        logging.getLogger("obdk").info("transformers integration not registered: %s", exc)


_register_hf()
