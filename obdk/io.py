"""Checkpoints: standard HF safetensors with plain tensors, never pickles.

Format
------
A compressed module ``<name>`` is stored as ``<name>.weight_a`` [r, in] and
``<name>.weight_b`` [out, r] (plus ``<name>.bias``), and ``<name>.weight`` as an
*empty* tensor (shape [0]): a tombstone, so that a loader that does not know obdk
(transformers without ``import obdk``, or with ``quantization_config`` deleted from
``config.json``) stops on a size mismatch instead of silently initialising that
Linear at random. ``config.json`` carries ``quantization_config`` with
``quant_method: "obdk"``, the format version, the obdk version, the rank of every
compressed module, the compression config and the calibration fingerprint;
``torch_dtype`` is the dtype of the factors. ``obdk_manifest.json`` lists every
file obdk wrote (so a later save knows which files are its own).

Writing (``CheckpointWriter``, ``save_pretrained``)
---------------------------------------------------
:class:`CheckpointWriter` is the one implementation of the format: it receives the
tensors one at a time (``add``, ``add_lowrank`` with its tombstone, ``add_dense``),
writes a shard file as soon as the pending tensors fill ``max_shard_bytes`` and
releases them, and ``finish`` writes the rest and swaps; :func:`save_pretrained` feeds
it a resident model's ``state_dict``.

``check_writable`` runs first (the CLI also calls it before any compute) and refuses,
with :class:`~obdk.errors.OutputPathError`:

* always: ``.``/the current directory or one of its parents; a path under a
  regular file; the directory the model was loaded from, or a parent of it (the
  source is the only copy of the uncompressed model; ``overwrite`` is meant to
  replace a previous *output*); an unwritable parent;
* unless ``overwrite=True``: an existing regular file or symbolic link, a
  non-empty directory that is not an obdk checkpoint, and an obdk checkpoint that
  holds files obdk did not write (not in its manifest). An empty directory or an
  obdk checkpoint holding only its own files is replaced without ``overwrite``.

Then, for target ``D`` in parent ``P`` (``<pid>`` the writer's process id, ``<t>``
8 random hex digits):

1. recover ``D`` (below);
2. write the new checkpoint into ``P/.D.obdk-tmp-<pid>-<t>`` and fsync its files (shards
   as they are written, under temporary names until ``finish`` knows their number);
3. if ``D`` exists: rename it to ``P/.D.obdk-old-<pid>-<t>``;
4. rename the temporary to ``D`` and fsync ``P``;
5. remove the ``obdk-old`` copy.

A crash before 3 leaves the old ``D`` untouched; between 3 and 4 ``D`` is missing
and its previous content sits under the ``obdk-old`` name; after 4 ``D`` is the new
checkpoint. An exception (not a kill) between 3 and 4 renames the old copy back.

Recovery (``recover``, run by every save and every load of ``D``): an ``obdk-tmp``
or ``obdk-old`` sibling of ``D`` whose writer is gone (its pid is not running, or
it is this process but not a save in progress, or it has no pid: names written by
obdk before this protocol) is stale. If ``D`` is missing, the newest stale
``obdk-old`` is renamed back to ``D`` (the interrupted swap is rolled back); every
other stale temporary is removed. Temporaries of a live writer are left alone.

Loading
-------
``load_pretrained`` and the transformers quantizer (:mod:`obdk.hf_integration`) run
the same checks and raise :class:`~obdk.errors.CheckpointError` naming the file and
tensor: ``quantization_config`` (method, format version, every rank a positive
integer naming an ``nn.Linear``), the shard index and files (present, readable, not
truncated), tensor names (none missing, none unexpected), shapes, the dtype of every
factor (it must be the ``torch_dtype`` of ``config.json``; no silent cast), and the
finiteness of every tensor loaded (one reduction each, after any requested cast).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError, NonFiniteError, OutputPathError, WrongTypeError  # noqa: F401
from . import __version__
from .config import FORMAT_VERSION
from .models import set_module
from .nn import LowRankLinear

log = logging.getLogger(__name__)

QUANT_METHOD = "obdk"
SHARD_BYTES = 4 << 30
REPORT_FILE = "obdk_report.json"
MANIFEST_FILE = "obdk_manifest.json"
TMP_TAG, OLD_TAG = "obdk-tmp", "obdk-old"


# CheckpointError and OutputPathError live in obdk.errors (one base, ObdkError); re-exported here.


# --------------------------------------------------------------------------- helpers


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


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite: one sum (NaN/inf propagate); only a non-finite
    sum (a bad entry, or a finite overflow) pays for the exact elementwise check."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# --------------------------------------------------------------------------- output paths


_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?:(?P<pid>\d+)-)?(?P<tok>[0-9a-f]{{8}})$")
_ACTIVE: set[str] = set()  # temporaries a save of this process is using right now


def _temp_path(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _is_stale(path: Path, pid: Optional[int]) -> bool:
    if pid is None:
        return True  # written by obdk before temporaries carried the writer's pid
    if pid == os.getpid():
        return str(path) not in _ACTIVE
    return not _pid_alive(pid)


def temporaries(target: str | os.PathLike) -> list[tuple[Path, str, Optional[int]]]:
    """The ``obdk-tmp``/``obdk-old`` siblings of ``target``: ``[(path, tag, writer pid or None)]``."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    parent = target.parent
    if not parent.is_dir():
        return []
    out = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for n in names:
        mt = _TEMP_RE.match(n)
        if mt and mt["name"] == target.name:
            out.append((parent / n, mt["tag"], int(mt["pid"]) if mt["pid"] else None))
    return sorted(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        os.unlink(p)


def recover(target: str | os.PathLike) -> dict:
    """Roll back or clean up after an interrupted save to ``target`` (see the module docstring).

    If ``target`` is missing and a stale ``obdk-old`` copy exists, the newest one is renamed
    back to ``target``; every other stale temporary is removed; a live writer's are left alone.
    Returns ``{"restored": path or None, "removed": [paths]}``. Never raises for a temporary it
    cannot remove (logged; the next run tries again).
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    stale = [(p, tag) for p, tag, pid in temporaries(target) if _is_stale(p, pid)]
    restored = None
    olds = [p for p, tag in stale if tag == OLD_TAG]
    if olds and not os.path.lexists(target):
        def when(p: Path) -> float:
            try:
                return p.lstat().st_ctime  # a rename updates ctime: the newest is the last one moved aside
            except OSError:
                return 0.0
        newest = max(olds, key=when)
        try:
            os.rename(newest, target)
            restored = newest
            log.warning("%s: restored the previous checkpoint from %s (a save was interrupted mid-swap)",
                        target, newest.name)
        except OSError as exc:
            log.warning("%s: could not restore %s (%s)", target, newest.name, exc)
    removed = []
    for p, _ in stale:
        if p == restored:
            continue
        try:
            _remove(p)
            removed.append(p)
        except OSError as exc:
            log.warning("%s: could not remove the stale temporary %s (%s)", target, p.name, exc)
    if removed:
        log.info("%s: removed %d stale temporaries of interrupted saves", target, len(removed))
    return {"restored": restored, "removed": removed}


#: files obdk (and the tokenizer / generation config it saves) writes, for checkpoints without a manifest
_OWN_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|"
                        r"model\.safetensors\.index\.json|obdk_report\.json|obdk_manifest\.json|"
                        r"tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|"
                        r"vocab\.(json|txt)|merges\.txt|spiece\.model|chat_template\.(jinja|json))$")


def _files_under(d: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d)
        for f in files:
            out.append(f if rel == "." else f"{Path(rel).as_posix()}/{f}")
        for x in dirs:  # count empty subdirectories too: they are the user's
            full = Path(root) / x
            if full.is_symlink() or not any(full.iterdir()):
                out.append(f"{x}/" if rel == "." else f"{Path(rel).as_posix()}/{x}/")
    return sorted(out)


def _foreign_files(d: Path) -> list[str]:
    """Files in obdk checkpoint ``d`` that obdk did not write (not in its manifest)."""
    manifest = d / MANIFEST_FILE
    try:
        own = set(json.loads(manifest.read_text())["files"]) | {MANIFEST_FILE}
        return [f for f in _files_under(d) if f not in own]
    except (OSError, ValueError, KeyError, TypeError):
        return [f for f in _files_under(d) if not _OWN_FILES.match(f)]


def _looks_obdk(d: Path) -> bool:
    """``d/config.json`` parses and names ``quant_method: obdk`` (any format version)."""
    try:
        q = json.loads((d / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def _listing(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _sources_of(model: Optional[nn.Module]) -> list[str]:
    """Local directories ``model`` was loaded from (``config._name_or_path`` / ``name_or_path``)."""
    out = []
    for obj in (getattr(model, "config", None), model):
        p = getattr(obj, "_name_or_path", None) or getattr(obj, "name_or_path", None) if obj is not None else None
        if isinstance(p, (str, os.PathLike)) and os.fspath(p) and os.path.isdir(p):
            out.append(os.fspath(p))
    return out


def check_writable(out_dir: str | os.PathLike, *, overwrite: bool = False,
                   source_dir: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> Path:
    """Refuse, before any work, an output directory :func:`save_pretrained` must not write.

    Cheap (a few ``stat`` calls; no write). Raises :class:`OutputPathError` naming the path,
    what is there and how to proceed; returns the absolute target path. ``source_dir``: the
    directory (or directories) the model was loaded from; ``out_dir`` may never be it or one of
    its parents, even with ``overwrite``. See the module docstring for the full rule.
    """
    raw = os.fspath(out_dir) if out_dir is not None else ""
    if not str(raw).strip():
        raise OutputPathError("output directory is empty; name a new directory, e.g. --out runs/my-model")
    p = Path(os.path.abspath(os.path.expanduser(raw)))
    real = Path(os.path.realpath(p))
    cwd = Path(os.path.realpath(os.getcwd()))
    how = "name a new subdirectory instead, e.g. --out runs/my-model"
    if real == cwd:
        raise OutputPathError(f"output directory {raw!r} ({p}) is the current directory; obdk replaces the "
                              f"output directory as a whole; {how}")
    if real in cwd.parents:
        raise OutputPathError(f"output directory {raw!r} ({p}) is a parent of the current directory {cwd}; "
                              f"obdk replaces the output directory as a whole; {how}")
    anc = p.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(f"output directory {raw!r} ({p}) is under {anc}, which is a regular file, "
                              "not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {raw!r} ({p}): {anc} is not writable")
    srcs: list = []
    if source_dir is not None:
        srcs = [source_dir] if isinstance(source_dir, (str, os.PathLike)) else list(source_dir)
    for src in srcs:
        s = Path(os.path.realpath(os.path.expanduser(os.fspath(src))))
        if s == real or real in s.parents:
            what = "is" if s == real else "contains"
            raise OutputPathError(f"output directory {raw!r} ({p}) {what} the directory the model was loaded from "
                                  f"({s}); saving there would destroy the source model (refused even with "
                                  f"--overwrite); choose another output directory")
    if os.path.islink(p):
        if not overwrite:
            raise OutputPathError(f"output path {raw!r} ({p}) is a symbolic link (to {os.readlink(p)}); pass "
                                  "--overwrite (overwrite=True) to replace the link (its target is left alone), or "
                                  "choose another path")
    elif os.path.lexists(p) and not p.is_dir():
        if not overwrite:
            raise OutputPathError(f"output path {raw!r} ({p}) is an existing file ({p.stat().st_size} bytes), not "
                                  "a directory; pass --overwrite (overwrite=True) to replace it, or choose another path")
    elif p.is_dir():
        try:
            empty = not any(p.iterdir())
        except OSError as exc:
            raise OutputPathError(f"output directory {raw!r} ({p}) cannot be read ({exc})") from exc
        if not empty and not overwrite:
            if _looks_obdk(p):
                foreign = _foreign_files(p)
                if foreign:
                    raise OutputPathError(
                        f"output directory {raw!r} ({p}) is an obdk checkpoint that also holds files obdk did not "
                        f"write ({_listing(foreign)}); replacing it would delete them; move them out, pass "
                        "--overwrite (overwrite=True) to replace the directory anyway, or choose another path")
            else:
                raise OutputPathError(
                    f"output directory {raw!r} ({p}) exists and is not an obdk checkpoint (it holds "
                    f"{_listing(_files_under(p))}); obdk would replace the whole directory; pass --overwrite "
                    "(overwrite=True) to do so, or choose a new or empty directory")
    return p


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------- save


def _sources_of_config(model_config: Any) -> list[str]:
    """Local directories a model config names as its origin (``_name_or_path``), object or dict."""
    if isinstance(model_config, dict):
        p = model_config.get("_name_or_path")
        return [os.fspath(p)] if isinstance(p, (str, os.PathLike)) and os.fspath(p) and os.path.isdir(p) else []
    return _sources_of(model_config)


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
        tmp = _temp_path(target, TMP_TAG)
        _ACTIVE.add(str(tmp))
        try:
            tmp.mkdir()
        except BaseException:
            _ACTIVE.discard(str(tmp))
            raise
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
        try:
            if self._tmp is not None and os.path.lexists(self._tmp):
                _remove(self._tmp)
        except BaseException:
            pass  # left for recover()
        finally:
            _ACTIVE.discard(str(self._tmp))

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
        if not all_finite(t):
            raise NonFiniteError(f"{where}: tensor {name!r} holds {_nonfinite(t)}; a checkpoint with it would be "
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
        old: Optional[Path] = None
        try:
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
            if fingerprint is None and report is not None:
                fingerprint = getattr(report, "calibration", None)
            sources = self._sources + _sources_of_config(model_config)
            if not self._parts:
                self._flush(tmp / "model.safetensors")
            else:
                n = len(self._parts) + 1
                names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
                self._flush(tmp / names[-1])
                for part, fname in zip(self._parts[:-1], names):
                    os.replace(part, tmp / fname)
                weight_map = {k: names[i] for k, i in self._where.items()}
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
            cfg.pop("quantization_config", None)
            cfg.pop("_name_or_path", None)
            if not cfg.get("architectures"):
                cfg["architectures"] = _causal_lm_architectures(cfg.get("model_type"))
            cfg["quantization_config"] = {
                "quant_method": QUANT_METHOD,
                "format_version": FORMAT_VERSION,
                "obdk_version": __version__,
                "ranks": dict(self._ranks),
                "config": config.to_dict() if hasattr(config, "to_dict") else config,
                "calibration": fingerprint,
            }
            dtype = self._factor_dtype[0] if self._factor_dtype is not None else self._first_float
            cfg["torch_dtype"] = _dtype_name(dtype) if dtype is not None else None
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
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
            # The swap (module docstring, steps 3-5). Re-check first: the target may have changed meanwhile.
            if os.path.lexists(target):
                check_writable(target, overwrite=self.overwrite, source_dir=sources)
                old = _temp_path(target, OLD_TAG)
                _ACTIVE.add(str(old))
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    try:
                        os.rename(old, target)  # roll back; if this fails too, recover() restores it next time
                    except BaseException:
                        pass
                    raise
            else:
                os.rename(tmp, target)
            _fsync(target.parent, directory=True)
        except BaseException:
            self._abort()
            if old is not None:
                _ACTIVE.discard(str(old))  # rolled back, or left for recover() to restore
            raise
        self._state = "finished"
        _ACTIVE.discard(str(tmp))
        try:
            if old is not None:
                try:
                    _remove(old)
                except OSError as exc:
                    log.warning("%s: could not remove the previous checkpoint %s (%s); the next save or load "
                                "removes it", target, old.name, exc)
        finally:
            if old is not None:
                _ACTIVE.discard(str(old))
        log.info("saved %d low-rank modules to %s", len(self._ranks), target)
        return target


def _causal_lm_architectures(model_type: Any) -> Optional[list[str]]:
    """``["<X>ForCausalLM"]`` for a config that names no architecture (built in code, or read from a
    GGUF file): loaders that pick the model class by it (vLLM) would otherwise take the bare backbone."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    except Exception:  # noqa: BLE001  (a transformers without the table: leave it unset)
        name = None
    return [name] if isinstance(name, str) else None


def save_pretrained(model: nn.Module, save_dir: str | os.PathLike, *, tokenizer=None,
                    report: Any = None, fingerprint: Optional[dict] = None, config: Any = None,
                    max_shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                    source_dir: str | os.PathLike | None = None) -> Path:
    """Write a compressed (or dense) HF causal LM to ``save_dir`` atomically.

    Files: ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
    ``config.json`` with ``quantization_config`` (quant_method ``obdk``, format and
    obdk versions, ``ranks`` {module: r}, ``config``, ``calibration``),
    ``generation_config.json`` when present, the tokenizer, ``obdk_report.json`` and
    ``obdk_manifest.json``. ``report``/``config`` default to the ones
    :func:`obdk.compress` attached to the model.

    ``save_dir`` is checked by :func:`check_writable` (``overwrite``, ``source_dir``; the
    directory the model was loaded from, when its config names a local one, is always
    protected too) and replaced by the protocol of the module docstring: at every instant
    the old or the new complete checkpoint is at ``save_dir`` or recoverable by the next
    save or load. The model's tensors go through a :class:`CheckpointWriter` in
    ``state_dict`` order (tied duplicates once), so a model on the GPU is copied to the host
    one shard at a time. Returns the directory path.
    """
    report = report if report is not None else getattr(model, "_obdk_report", None)
    config = config if config is not None else getattr(model, "_obdk_config", None)
    from .nn import PackedSlice
    if any(isinstance(m, PackedSlice) for m in model.modules()):
        raise ValueError("save_pretrained: the model has packed shared-input factors; call "
                         "obdk.nn.unpack_shared_inputs(model) before saving")
    lr = lowrank_modules(model)
    sources = ([os.fspath(source_dir)] if source_dir is not None else []) + _sources_of(model)
    with CheckpointWriter(save_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite, source_dir=sources) as w:
        for k, t in _tensors_for_save(model):
            module, _, leaf = k.rpartition(".")
            if module in lr:  # weight_a, weight_b, bias, consecutive in the state dict
                if leaf == "weight_a":
                    m = lr[module]
                    w.add_lowrank(module, m.weight_a, m.weight_b, m.bias, copy=False)
                continue
            w.add(k, t, copy=False)
        return w.finish(model_config=model.config, tokenizer=tokenizer, report=report, fingerprint=fingerprint,
                        config=config, generation_config=getattr(model, "generation_config", None))


# --------------------------------------------------------------------------- load


def _check_ranks(ranks: Any, where: str) -> dict[str, int]:
    if not isinstance(ranks, dict):
        raise CheckpointError(f"{where}: quantization_config.ranks missing or not a mapping")
    for name, r in ranks.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: quantization_config.ranks has a non-string module name {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise CheckpointError(f"{where}: quantization_config.ranks[{name!r}] = {r!r} is not a positive integer")
    return ranks


def check_quantization_config(q: Any, where: str) -> dict:
    """Validate a ``quantization_config`` mapping (method, format version, ranks); ``where`` names the file."""
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    ver = q.get("format_version")
    if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1 or ver > FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantization_config.format_version={ver!r} is unknown; "
                              f"this obdk {__version__} reads format versions 1..{FORMAT_VERSION}")
    _check_ranks(q.get("ranks"), where)
    return q


def _read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an obdk checkpoint directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    return cfg


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of an obdk checkpoint dir; errors name the file and field."""
    path = Path(path)
    return check_quantization_config(_read_config_json(path).get("quantization_config"), str(path / "config.json"))


def is_obdk_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose config.json says ``quant_method: obdk``."""
    try:
        read_quantization_config(path)
        return True
    except CheckpointError:
        return False


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _k, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _a):
        _ST_DTYPES[_k] = getattr(torch, _a)


@dataclass
class TensorInfo:
    """Where a checkpoint tensor lives and what its header says."""
    file: Path
    dtype: Any  # torch.dtype, or the safetensors dtype string when torch has no equivalent
    shape: tuple


def _read_header(f: Path) -> dict:
    """The JSON header of safetensors file ``f``; errors name the file (missing, unreadable, truncated)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except Exception as exc:
        raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({exc})") from exc
    need = 8 + n + (max(ends) if ends else 0)
    if size < need:
        raise CheckpointError(f"{f}: truncated ({size} bytes, header says {need})")
    return header


def tensor_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of checkpoint ``path`` (single file or shard index) from the file headers only."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        from .calibrate.placement import read_weight_map
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
        weight_map = None
    out: dict[str, TensorInfo] = {}
    for fname in files:
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing shard" + (f" (listed in {index.name})" if weight_map else ""))
        for k, v in _read_header(f).items():
            if k == "__metadata__":
                continue
            if k in out:
                raise CheckpointError(f"{f}: tensor {k!r} is also stored in {out[k].file.name}")
            out[k] = TensorInfo(f, _ST_DTYPES.get(v.get("dtype"), v.get("dtype")), tuple(v.get("shape", ())))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{index}: tensors {missing[:5]} listed but not found in their shard files")
    return out


def factor_dtype(cfg: dict) -> Optional[torch.dtype]:
    """The factors' dtype recorded in ``config.json`` (``torch_dtype``, else ``dtype``), or None."""
    for key in ("torch_dtype", "dtype"):
        v = cfg.get(key)
        if isinstance(v, str) and isinstance(getattr(torch, v.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, v.removeprefix("torch."))
    return None


def is_tombstone(name: str, info: TensorInfo, ranks: dict) -> bool:
    """``<module>.weight`` stored empty for a compressed ``<module>`` (see the module docstring)."""
    return name.endswith(".weight") and name[: -len(".weight")] in ranks and info.shape in ((0,), ())


def install_lowrank(model: nn.Module, ranks: dict[str, int], where: str, **kw) -> nn.Module:
    """Replace each module named in ``ranks`` (an ``nn.Linear``) by a ``LowRankLinear`` of that rank."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            what = "absent" if old is None else f"a {type(old).__name__}"
            raise CheckpointError(f"{where}: quantization_config.ranks names module {name!r}, which is {what}, "
                                  f"not an nn.Linear of {type(model).__name__}")
        new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None, **kw)
        set_module(model, name, new)
    return model


def check_tensors(path: Path, cfg: dict, q: dict, index: dict[str, TensorInfo],
                  expected: dict[str, torch.Tensor], tied: set[str]) -> None:
    """Names, shapes and factor dtypes of checkpoint ``path`` against the model's ``expected`` state dict
    (after :func:`install_lowrank`); headers only, nothing is read. Raises :class:`CheckpointError`."""
    ranks = q["ranks"]
    want = factor_dtype(cfg)
    cfg_file = path / "config.json"
    for name, rank in ranks.items():
        a_key = f"{name}.weight_a"
        if a_key not in index:
            raise CheckpointError(f"{path}: tensor {a_key!r} missing for low-rank module {name} (rank {rank})")
    for k, ref in expected.items():
        info = index.get(k)
        if info is None:
            if k in tied:
                continue
            raise CheckpointError(f"{path}: tensor {k!r} missing from the checkpoint")
        if tuple(info.shape) != tuple(ref.shape):
            hint = ""
            if k.endswith((".weight_a", ".weight_b")):
                hint = f" (config.json says rank {ranks.get(k.rsplit('.', 1)[0])})"
            raise CheckpointError(f"{info.file}: tensor {k!r} has shape {tuple(info.shape)}, expected "
                                  f"{tuple(ref.shape)}{hint}")
        module = k.rsplit(".", 1)[0]
        if module in ranks:
            got = info.dtype
            if not isinstance(got, torch.dtype) or not got.is_floating_point:
                raise CheckpointError(f"{info.file}: tensor {k!r} of low-rank module {module} is stored as {got}, "
                                      "not a floating dtype")
            if want is None:
                want = got  # no dtype recorded: every factor must share the first one's
            if got != want:
                raise CheckpointError(f"{info.file}: tensor {k!r} is stored as {_dtype_name(got)}, but {cfg_file} "
                                      f"records the factors as {_dtype_name(want)} (torch_dtype); the checkpoint "
                                      "was edited or mixed from two saves; re-save it (obdk does not cast "
                                      "factors silently)")
    unexpected = sorted(k for k, info in index.items() if k not in expected and not is_tombstone(k, info, ranks))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]} (not in the model with the saved ranks)")


def _nonfinite(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    kinds = [w for w, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t))) if bool(m.any())]
    return f"{'/'.join(kinds)} in {int(bad.sum())} of {t.numel()} entries"


def check_finite(name: str, t: torch.Tensor, file: Any, cast: Optional[torch.dtype] = None) -> None:
    """Raise :class:`CheckpointError` when tensor ``name`` (from ``file``) holds NaN/Inf."""
    if not all_finite(t):
        after = f" after the cast to {_dtype_name(cast)} (the values overflow it)" if cast is not None else ""
        raise CheckpointError(f"{file}: tensor {name!r} holds {_nonfinite(t)}{after}; the checkpoint is corrupt"
                              + ("" if cast is None else " for this dtype; load it in its saved dtype"))


def load_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, pack: Optional[bool] = None) -> nn.Module:
    """Load an obdk checkpoint written by :func:`save_pretrained`.

    First :func:`recover` rolls back or cleans up an interrupted save of ``path``. The model
    is built from ``config.json`` with its parameters on the meta device (buffers such as
    rotary frequencies are real), each module listed in ``quantization_config.ranks``
    becomes a ``LowRankLinear`` of that rank, every check of the module docstring runs on the
    file headers (:func:`check_tensors`), and each tensor is read, checked finite, cast
    when ``dtype`` is given (floating tensors; checked finite again) and assigned.
    ``device`` places the model. Returns the model in eval mode. ``pack`` packs the factors of
    modules that read one input (q/k/v, gate/up) so the input is read once
    (:func:`obdk.nn.pack_shared_inputs`); default: on CUDA only, where it saves launches and
    reads (on CPU it does not pay). Raises :class:`CheckpointError` naming the file and
    tensor at fault.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg_dict = _read_config_json(path)
    q = check_quantization_config(cfg_dict.get("quantization_config"), str(path / "config.json"))
    cfg_dict = dict(cfg_dict)
    cfg_dict.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(**cfg_dict) if "model_type" in cfg_dict else AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: not a model config transformers can build ({exc})") from exc
    index = tensor_index(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        install_lowrank(model, q["ranks"], str(path / "config.json"))
    expected = model.state_dict()
    tied = _tied_names(model)
    check_tensors(path, cfg_dict, q, index, expected, tied)
    handles: dict[Path, Any] = {}
    sd: dict[str, torch.Tensor] = {}
    for k in expected:
        info = index.get(k)
        if info is None:
            continue  # tied (check_tensors let it through)
        try:
            h = handles.get(info.file)
            if h is None:
                h = handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            t = h.get_tensor(k)
        except Exception as exc:
            raise CheckpointError(f"{info.file}: tensor {k!r} unreadable ({exc})") from exc
        check_finite(k, t, info.file)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
            check_finite(k, t, info.file, cast=dtype)
        sd[k] = t
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: parameters {still_meta[:5]} were not found in the checkpoint")
    model.config.quantization_config = q
    model.config._name_or_path = str(path.resolve())
    model._obdk_quantization_config = q
    model = model.to(device).eval()
    if pack is None:
        pack = torch.device(device).type == "cuda"
    if pack:
        from .nn import pack_shared_inputs
        pack_shared_inputs(model)
    return model


def has_obdk_tensors(path: str | os.PathLike) -> bool:
    """True when the safetensors of ``path`` hold obdk factors (``*.weight_a``/``*.weight_b``), whatever
    ``config.json`` says (e.g. an obdk checkpoint whose ``quantization_config`` was deleted)."""
    try:
        names = tensor_index(path)
    except CheckpointError:
        return False
    return any(k.endswith(".weight_a") for k in names) and any(k.endswith(".weight_b") for k in names)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are tied to an earlier parameter (e.g. ``lm_head.weight``)."""
    names: set[str] = set()
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tie and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        for n, m in model.named_modules():
            if m is model.get_output_embeddings():
                names.add(f"{n}.weight")
    return names


def update_report(path: str | os.PathLike, report: Any) -> None:
    """Rewrite ``obdk_report.json`` of a saved checkpoint (e.g. after an evaluation), atomically."""
    f = Path(path) / REPORT_FILE
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    tmp = f.with_name(f".{f.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(rep, indent=2, default=str))
    os.replace(tmp, f)


def load_report(path: str | os.PathLike) -> Optional[dict]:
    """The ``obdk_report.json`` of a checkpoint directory, or None."""
    f = Path(path) / REPORT_FILE
    return json.loads(f.read_text()) if f.is_file() else None
