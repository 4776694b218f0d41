"""Write obdk checkpoints: :class:`CheckpointWriter` (tensor by tensor) and :func:`write_model` (a model's).

:class:`CheckpointWriter` is the one implementation of the format (:mod:`obdk.io.format`): it receives the
tensors one at a time (``add``, ``add_lowrank`` with its tombstone, ``add_dense``), writes a shard file as
soon as the pending tensors fill ``max_shard_bytes`` and releases them, and ``finish`` writes the rest and
swaps it in by the atomic protocol of :mod:`obdk.io.atomic`. :func:`write_model` is the one "model →
checkpoint" routine: a model's ``state_dict`` in order, each compressed module written as its factors;
:func:`save_pretrained` (a model whose targets are ``LowRankLinear``) and
:meth:`obdk.plan.Plan.save` (a dense model and each target's factors made as it is written) both call it.
The report and the compression config are handed over as arguments (the :class:`~obdk.report.CompressionReport`
of :meth:`~obdk.plan.Plan.apply`, :func:`obdk.compress` or :meth:`~obdk.plan.Plan.save`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .. import __version__
from ..arguments import check_model, check_path
from ..config import FORMAT_VERSION
from ..errors import CheckpointError, ConfigError, NonFiniteError, WrongTypeError
from ..finite import all_finite as _all_finite
from ..nn import LowRankLinear
from .atomic import (
    _files_under,
    _fsync,
    _listing,
    _sources_of,
    _sources_of_config,
    check_writable,
    drop_temporary,
    new_temporary,
    recover,
    release_swap,
    swap_in,
)
from .format import (
    INDEX_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    SHARD_BYTES,
    SINGLE_FILE,
    _dtype_name,
    nonfinite,
    quantization_config,
)

log = logging.getLogger(__name__)

__all__ = ["CheckpointWriter", "write_model", "save_pretrained", "lowrank_modules", "SHARD_BYTES"]


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """All ``LowRankLinear`` modules of ``model`` by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _tensors_for_save(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``model.state_dict()`` in order, tied duplicates dropped (first name
    wins); tensors are detached but left where they are (the writer copies each to the host)."""
    seen: set[tuple] = set()
    for k, t in model.state_dict().items():
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                continue  # tied weight (e.g. lm_head.weight ↔ embed_tokens.weight)
            seen.add(key)
        yield k, t.detach()


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


def _write_rest(tmp: Path, *, tokenizer: Any, report: Any, generation_config: Any) -> None:
    """The files beside the shards and ``config.json``: generation config, tokenizer, report, then the manifest of
    every file, each fsynced (the shards were as they were written)."""
    if generation_config is not None:
        try:
            generation_config.save_pretrained(str(tmp))
        except Exception as exc:  # a malformed generation config must not lose the model
            log.warning("generation_config not saved: %s", exc)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if report is not None:
        rep = report.to_dict() if hasattr(report, "to_dict") else report
        (tmp / REPORT_FILE).write_text(json.dumps(rep, indent=2, default=str))
    files = _files_under(tmp)
    (tmp / MANIFEST_FILE).write_text(json.dumps({"obdk_version": __version__, "files": files}, indent=2))
    for f in files + [MANIFEST_FILE]:
        if not f.endswith(".safetensors"):  # shards were fsynced as they were written
            _fsync(tmp / f)
    _fsync(tmp, directory=True)


class CheckpointWriter:
    """Write an obdk checkpoint tensor by tensor, without the model in memory.

    The format and the atomic protocol are those of the module docstring (:func:`save_pretrained`
    is this writer fed from a resident model)::

        with CheckpointWriter(out_dir, max_shard_bytes=..., overwrite=False, source_dir=src) as w:
            w.add("model.embed_tokens.weight", emb)                 # any tensor, by its full name
            w.add_lowrank("model.layers.0.mlp.up_proj", a, b)      # a [r, in], b [out, r]
            w.add_dense("model.layers.0.mlp.down_proj", weight)    # weight [out, in] (+ bias [out])
            w.finish(model_config=hf_config, tokenizer=tok, report=report)

    Entering runs :func:`recover` and :func:`check_writable` (``overwrite``, ``source_dir``) and
    creates the temporary directory; nothing at ``save_dir`` changes until :meth:`finish` swaps
    the complete checkpoint in. Each added tensor is checked finite, copied to the host
    (contiguous) and kept pending; when the next tensor would take the pending ones past
    ``max_shard_bytes`` they are written as one shard file (fsynced) and released, so host
    memory holds at most ``max(max_shard_bytes, largest tensor)`` bytes of pending tensors
    (``peak_pending_bytes`` records it). Tensors go into shards in the order they are added
    (the order fixes the shard files' bytes; :func:`save_pretrained` adds ``state_dict`` order).
    Leaving the ``with`` by an exception, or by :meth:`abort`, removes the temporary directory and
    leaves ``save_dir`` as it was; leaving it without either, :meth:`finish` or :meth:`abort`,
    does the same and raises :class:`CheckpointError`. Tied tensors (a head tied to the
    embeddings) are added once, under their first name. Errors name the tensor or module.
    """

    def __init__(self, save_dir: str | os.PathLike, *, max_shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                 source_dir: str | os.PathLike | Iterable[str | os.PathLike] | None = None):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ConfigError(f"CheckpointWriter: max_shard_bytes={max_shard_bytes!r} is not a positive integer")
        self.save_dir, self.max_shard_bytes, self.overwrite = save_dir, max_shard_bytes, overwrite
        if source_dir is None:
            self._sources: list = []
        elif isinstance(source_dir, (str, os.PathLike)):
            self._sources = [os.fspath(source_dir)]
        else:
            self._sources = [os.fspath(s) for s in source_dir]
        self.target: Optional[Path] = None
        self._tmp: Optional[Path] = None
        self._state = "new"  # new → open → finished | aborted
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.peak_pending_bytes = 0  #: the most bytes of tensors ever held pending at once
        self.total_bytes = 0  #: bytes of every tensor added (the index's ``total_size``)
        self._parts: list[Path] = []  # shards written so far, under temporary names
        self._where: dict[str, int] = {}  # tensor name → its shard (0-based), in the order added
        self._ranks: dict[str, int] = {}
        self._factor_dtype: Optional[tuple[torch.dtype, str]] = None  # (dtype, the first module in it)
        self._first_float: Optional[torch.dtype] = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> "CheckpointWriter":
        if self._state != "new":
            raise CheckpointError(f"CheckpointWriter for {self.save_dir}: entered twice (one writer writes one "
                                  "checkpoint)")
        recover(self.save_dir)
        target = check_writable(self.save_dir, overwrite=self.overwrite, source_dir=self._sources)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temporary(target)
        self.target, self._tmp, self._state = target, tmp, "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            self._abort()
            if exc_type is None:
                raise CheckpointError(f"{self.target}: the CheckpointWriter was left without finish() or abort(); "
                                      "nothing was saved and the directory is as it was")
        return False

    def abort(self) -> None:
        """Drop everything written so far (the temporary directory); ``save_dir`` stays as it was."""
        self._check_open("abort")
        self._abort()

    def _abort(self) -> None:
        self._state = "aborted"
        self._pending.clear()
        self._pending_bytes = 0
        drop_temporary(self._tmp)

    def _check_open(self, what: str) -> None:
        if self._state == "open":
            return
        how = {"new": "was not entered (use it as `with CheckpointWriter(...) as w:`)",
               "finished": "is already finished", "aborted": "was aborted"}[self._state]
        raise CheckpointError(f"CheckpointWriter for {self.target or self.save_dir}: {what}() called, but the "
                              f"writer {how}")

    @property
    def ranks(self) -> dict[str, int]:
        """``{module: rank}`` of every :meth:`add_lowrank` so far, in the order added."""
        return dict(self._ranks)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the tensors added but not yet written to a shard file."""
        return self._pending_bytes

    @property
    def shards_written(self) -> int:
        """Shard files written so far (the last one is written by :meth:`finish`)."""
        return len(self._parts)

    # ----------------------------------------------------------------- tensors

    def add(self, name: str, tensor: torch.Tensor, *, copy: bool = True) -> None:
        """Add tensor ``name`` (any shape and dtype) as it is stored in the checkpoint.

        For everything but compressed Linears (:meth:`add_lowrank`): embeddings, norms, dense
        weights, biases. ``copy=False`` keeps a host tensor without copying it; the caller then
        must not modify it before the writer finishes (:func:`save_pretrained` passes it: the
        model stays resident and unchanged). Raises :class:`NonFiniteError` for a NaN/inf entry,
        :class:`CheckpointError` for a name added twice or a ``.weight_a``/``.weight_b`` name.
        """
        if isinstance(name, str) and name.endswith((".weight_a", ".weight_b")):
            raise CheckpointError(f"{self.target or self.save_dir}: tensor {name!r} is named like a low-rank factor; "
                                  f"add the module through add_lowrank({name.rsplit('.', 1)[0]!r}, a, b) so that "
                                  "its rank and tombstone are recorded")
        self._put(name, tensor, copy)

    def add_dense(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  copy: bool = True) -> None:
        """Add an uncompressed Linear ``name``: ``<name>.weight`` [out, in] (and ``<name>.bias`` [out])."""
        self._put(f"{name}.weight", weight, copy)
        if bias is not None:
            self._put(f"{name}.bias", bias, copy)

    def add_lowrank(self, name: str, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                    copy: bool = True) -> None:
        """Add compressed Linear ``name`` (a ``LowRankLinear`` of rank ``r``): ``a`` [r, in] as
        ``<name>.weight_a``, the empty tombstone ``<name>.weight`` [0], ``b`` [out, r] as
        ``<name>.weight_b`` and ``bias`` [out] as ``<name>.bias``; records rank ``r``.

        Every factor of a checkpoint (and the biases of compressed modules) shares one floating
        dtype (``torch_dtype`` of ``config.json``); a module in another one raises
        :class:`CheckpointError` naming both modules."""
        where = self.target or self.save_dir
        self._check_open("add_lowrank")
        for what, t in (("a", a), ("b", b), ("bias", bias)):
            if not isinstance(t, torch.Tensor) and (t is not None or what != "bias"):
                raise WrongTypeError(f"{where}: add_lowrank({name!r}): {what} is a {type(t).__name__}, not a tensor")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise CheckpointError(f"{where}: add_lowrank({name!r}) needs a [r, in] and b [out, r] with r > 0, got "
                                  f"a {tuple(a.shape)} and b {tuple(b.shape)}")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise CheckpointError(f"{where}: add_lowrank({name!r}): bias has shape {tuple(bias.shape)}, expected "
                                  f"({b.shape[0]},) (the rows of b)")
        if name in self._ranks:
            raise CheckpointError(f"{where}: low-rank module {name!r} added twice")
        want, first = self._factor_dtype or (a.dtype, name)
        for leaf, t in (("weight_a", a), ("weight_b", b), ("bias", bias)):
            if t is None:
                continue
            if not t.is_floating_point():
                raise CheckpointError(f"{where}: tensor '{name}.{leaf}' of low-rank module {name} is {t.dtype}, not a "
                                      "floating dtype")
            if t.dtype != want:
                other = f"module {first} is {_dtype_name(want)}" if first != name else \
                    f"'{name}.weight_a' is {_dtype_name(want)}"
                raise CheckpointError(f"{where}: the low-rank factors are in several dtypes: '{name}.{leaf}' is "
                                      f"{_dtype_name(t.dtype)}, {other}; cast the model (or the factors) to one "
                                      "dtype first (model.to(dtype))")
        # every check of the module's tensors before any is stored: an error leaves the writer as it was
        parts = [(f"{name}.weight_a", self._host(f"{name}.weight_a", a, copy)),
                 (f"{name}.weight", self._host(f"{name}.weight", torch.empty(0, dtype=a.dtype), False)),  # tombstone
                 (f"{name}.weight_b", self._host(f"{name}.weight_b", b, copy))]
        if bias is not None:
            parts.append((f"{name}.bias", self._host(f"{name}.bias", bias, copy)))
        for k, host in parts:
            self._store(k, host)
        self._factor_dtype = (want, first)
        self._ranks[name] = int(a.shape[0])

    def _put(self, name: str, tensor: torch.Tensor, copy: bool) -> None:
        self._store(name, self._host(name, tensor, copy))

    def _host(self, name: str, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        """Check tensor ``name`` (open writer, new name, real and finite values); its contiguous host copy."""
        where = self.target or self.save_dir
        self._check_open("add")
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: tensor name {name!r} is not a non-empty string")
        if not isinstance(tensor, torch.Tensor):
            raise WrongTypeError(f"{where}: tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in self._where or name in self._pending:
            raise CheckpointError(f"{where}: tensor {name!r} added twice")
        t = tensor.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"{where}: tensor {name!r} is on the meta device (it holds no values)")
        if not _all_finite(t):
            raise NonFiniteError(f"{where}: tensor {name!r} holds {nonfinite(t)}; a checkpoint with it would be "
                                 "refused by every loader, so it is not saved")
        host = t.contiguous().cpu()
        if copy and host.device == t.device and host.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            host = host.clone()  # a host tensor the caller may change or free: keep our own copy
        return host

    def _store(self, name: str, host: torch.Tensor) -> None:
        """Keep ``host`` pending; first write the pending tensors as a shard if it would not fit with them."""
        nbytes = host.numel() * host.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = host
        self._pending_bytes += nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)
        self.total_bytes += nbytes
        if self._first_float is None and host.is_floating_point():
            self._first_float = host.dtype

    def _flush(self, path: Optional[Path] = None) -> None:
        """Write the pending tensors as the next shard (to ``path``, else a temporary name) and release them."""
        i = len(self._parts)
        path = path or self._tmp / f"model-{i + 1:05d}.safetensors.obdk-part"
        _write_shard(self._pending, path, {"format": "pt", "obdk_format_version": str(FORMAT_VERSION)})
        _fsync(path)
        self._where.update((k, i) for k in self._pending)
        self._parts.append(path)
        self._pending = {}
        self._pending_bytes = 0

    # ----------------------------------------------------------------- finish

    def _model_config(self, model_config: Any, ranks: Optional[dict[str, int]]) -> dict:
        """``model_config`` as a dict, after the cross-check of ``ranks`` and the check that something was added."""
        target = self.target
        if hasattr(model_config, "to_dict"):
            cfg = model_config.to_dict()
        elif isinstance(model_config, dict):
            cfg = dict(model_config)
        else:
            raise WrongTypeError(f"{target}: finish(model_config=...) is a {type(model_config).__name__}, not a "
                                 "transformers config or a dict")
        if ranks is not None and dict(ranks) != self._ranks:
            diff = sorted(set(ranks) ^ set(self._ranks)) + \
                sorted(k for k in set(ranks) & set(self._ranks) if ranks[k] != self._ranks[k])
            raise CheckpointError(f"{target}: finish(ranks=...) differs from the low-rank modules added for "
                                  f"{_listing(diff)} (given {[ranks.get(k) for k in diff[:5]]}, added "
                                  f"{[self._ranks.get(k) for k in diff[:5]]})")
        if not self._pending and not self._parts:
            raise CheckpointError(f"{target}: finish() with no tensor added; nothing to save")
        return cfg

    def _write_shards(self) -> None:
        """The last shard, every shard under its final name, and the index when there are several."""
        tmp = self._tmp
        if not self._parts:
            self._flush(tmp / SINGLE_FILE)
            return
        n = len(self._parts) + 1
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._flush(tmp / names[-1])
        for part, fname in zip(self._parts[:-1], names):
            os.replace(part, tmp / fname)
        weight_map = {k: names[i] for k, i in self._where.items()}
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))


    def finish(self, *, model_config: Any, ranks: Optional[dict[str, int]] = None, tokenizer: Any = None,
               report: Any = None, fingerprint: Optional[dict] = None, config: Any = None,
               generation_config: Any = None) -> Path:
        """Write the last shard, the index, ``config.json``, the rest, and swap the checkpoint in.

        ``model_config``: the HF config of the uncompressed architecture (a ``PretrainedConfig``
        or its ``to_dict()``); its ``quantization_config`` and ``_name_or_path`` are dropped, a
        local ``_name_or_path`` is protected like ``source_dir``. ``ranks`` ({module: r}), when
        given, must be the ranks added by :meth:`add_lowrank` (a cross-check; they are recorded
        either way). ``config`` (a ``LowRankConfig`` or dict) and ``fingerprint`` (default:
        ``report.calibration``) go into ``quantization_config``; ``report`` (with ``to_dict`` or
        a dict) into ``obdk_report.json``; ``tokenizer`` and ``generation_config`` are saved by
        their ``save_pretrained`` (a generation config that fails to save is logged, not fatal).
        Returns the checkpoint directory. Any failure leaves ``save_dir`` as it was.
        """
        self._check_open("finish")
        target, tmp = self.target, self._tmp
        try:
            cfg = self._model_config(model_config, ranks)
            if fingerprint is None and report is not None:
                fingerprint = getattr(report, "calibration", None)
            sources = self._sources + _sources_of_config(model_config)
            self._write_shards()
            cfg.pop("quantization_config", None)
            cfg.pop("_name_or_path", None)
            if not cfg.get("architectures"):
                cfg["architectures"] = _causal_lm_architectures(cfg.get("model_type"))
            cfg["quantization_config"] = quantization_config(self._ranks, config, fingerprint)
            dtype = self._factor_dtype[0] if self._factor_dtype is not None else self._first_float
            cfg["torch_dtype"] = _dtype_name(dtype) if dtype is not None else None
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            _write_rest(tmp, tokenizer=tokenizer, report=report, generation_config=generation_config)
            old = swap_in(tmp, target, overwrite=self.overwrite, sources=sources)  # steps 3-4
        except BaseException:
            self._abort()
            raise
        self._state = "finished"
        release_swap(tmp, target, old)  # step 5
        log.info("saved %d low-rank modules to %s", len(self._ranks), target)
        return target


#: ``factors[module](entries) -> (a [r, n], b [m, r], bias [m] or None)``: a compressed module's tensors to write,
#: given its ``state_dict`` entries ``{leaf: tensor}`` (e.g. ``{"weight": W, "bias": c}``)
Factors = Mapping[str, Callable[[dict], tuple]]


def _causal_lm_architectures(model_type: Any) -> Optional[list[str]]:
    """``["<X>ForCausalLM"]`` for a config that names no architecture (built in code, or read from a
    GGUF file): loaders that pick the model class by it (vLLM) would otherwise take the bare backbone."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    except Exception:  # noqa: BLE001  (a transformers without the table: leave it unset)
        name = None
    return [name] if isinstance(name, str) else None


def write_model(model: nn.Module, save_dir: str | os.PathLike, *, factors: Factors,
                tensor: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None, copy: bool = True,
                tokenizer: Any = None, report: Any = None, config: Any = None, fingerprint: Optional[dict] = None,
                max_shard_bytes: int = SHARD_BYTES, overwrite: bool = False, source_dir: Any = None) -> Path:
    """Write ``model`` as an obdk checkpoint at ``save_dir``: its ``state_dict`` in order, tied duplicates once.

    Each module named in ``factors`` is written as its factors (:meth:`CheckpointWriter.add_lowrank`: ``a`` [r, n],
    ``b`` [m, r], its bias and the tombstone) at the place of its first ``state_dict`` entry, and its other entries
    are skipped; every other entry is written as it is, after ``tensor(key, t)`` when given (e.g. a skeleton's
    meta tensor read from its checkpoint). ``copy``: as for :meth:`CheckpointWriter.add`. ``report``: the
    :class:`~obdk.report.CompressionReport` (or a dict) for ``obdk_report.json``, or a callable returning it, called
    once every tensor is written (a report that times the writing); ``config``: the ``LowRankConfig`` (or dict)
    for ``quantization_config``, default the report's ``config``; ``fingerprint``: default the report's
    ``calibration``. ``tokenizer``, ``max_shard_bytes``, ``overwrite``, ``source_dir`` (the directory the model
    was loaded from, protected with the one its config names): as for :func:`save_pretrained`. Returns the
    checkpoint directory; any failure leaves ``save_dir`` as it was.
    """
    sd = dict(_tensors_for_save(model))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        mod, _, leaf = key.rpartition(".")
        if mod in factors:
            by_module.setdefault(mod, {})[leaf] = t
    sources = ([os.fspath(source_dir)] if source_dir is not None else []) + _sources_of(model)
    with CheckpointWriter(save_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite, source_dir=sources) as w:
        for key, t in sd.items():
            mod = key.rpartition(".")[0]
            if mod not in factors:
                w.add(key, t if tensor is None else tensor(key, t), copy=copy)
            elif mod in by_module:  # the module's first entry: its factors (its other entries are skipped)
                a, b, bias = factors[mod](by_module.pop(mod))
                w.add_lowrank(mod, a, b, bias, copy=copy)
                del a, b, bias
        if callable(report):
            report = report()
        if config is None and isinstance(getattr(report, "config", None), dict):
            from ..config import LowRankConfig
            config = LowRankConfig.from_dict(report.config)
        return w.finish(model_config=model.config, tokenizer=tokenizer, report=report, fingerprint=fingerprint,
                        config=config, generation_config=getattr(model, "generation_config", None))


def save_pretrained(model: nn.Module, save_dir: str | os.PathLike, *, tokenizer=None,
                    report: Any = None, fingerprint: Optional[dict] = None, config: Any = None,
                    max_shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                    source_dir: str | os.PathLike | None = None) -> Path:
    """Write a compressed (or dense) HF causal LM to ``save_dir`` atomically.

    Files: ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
    ``config.json`` with ``quantization_config`` (quant_method ``obdk``, format and
    obdk versions, ``ranks`` {module: r}, ``config``, ``calibration``),
    ``generation_config.json`` when present, the tokenizer, ``obdk_report.json`` and
    ``obdk_manifest.json``. ``report``: the :class:`~obdk.report.CompressionReport` that
    :func:`obdk.compress` or :meth:`~obdk.plan.Plan.apply` returned (``obdk_report.json``; its
    ``config`` and ``calibration`` go into ``quantization_config`` unless ``config`` or
    ``fingerprint`` is given); without one the checkpoint has no report.

    ``save_dir`` is checked by :func:`~obdk.io.atomic.check_writable` (``overwrite``, ``source_dir``; the
    directory the model was loaded from, when its config names a local one, is always
    protected too) and replaced by the protocol of :mod:`obdk.io.atomic`: at every instant
    the old or the new complete checkpoint is at ``save_dir`` or recoverable by the next
    save or load. The model's tensors go through :func:`write_model` in ``state_dict`` order
    (tied duplicates once), so a model on the GPU is copied to the host one shard at a time.
    Under ``torch.distributed`` every rank that calls it writes: call it on one rank (rank 0), or use
    :meth:`~obdk.plan.Plan.save`, which does. Returns the directory path.
    """
    check_model("save_pretrained", model, meta_ok=True)  # (a meta tensor is named by the writer below)
    check_path("save_pretrained", "save_dir", save_dir)
    from ..nn import PackedSlice
    if any(isinstance(m, PackedSlice) for m in model.modules()):
        raise ValueError("save_pretrained: the model has packed shared-input factors; call "
                         "obdk.nn.unpack_shared_inputs(model) before saving")
    factors = {name: _own_factors for name in lowrank_modules(model)}
    return write_model(model, save_dir, factors=factors, copy=False, tokenizer=tokenizer, report=report,
                       config=config, fingerprint=fingerprint, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                       source_dir=source_dir)


def _own_factors(entries: dict) -> tuple:
    """A ``LowRankLinear``'s own factors and bias from its ``state_dict`` entries."""
    return entries["weight_a"], entries["weight_b"], entries.get("bias")
