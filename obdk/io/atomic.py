"""The atomic save and its recovery: what an output directory may be, and how a checkpoint replaces it.

:func:`check_writable` runs first (the CLI also calls it before any compute) and refuses,
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
2. write the new checkpoint into ``P/.D.obdk-tmp-<pid>-<t>`` (:func:`new_temporary`) and fsync its files (shards
   as they are written, under temporary names until the writer knows their number);
3. if ``D`` exists: rename it to ``P/.D.obdk-old-<pid>-<t>`` (:func:`swap_in`);
4. rename the temporary to ``D`` and fsync ``P``;
5. remove the ``obdk-old`` copy (:func:`release_swap`).

A crash before 3 leaves the old ``D`` untouched; between 3 and 4 ``D`` is missing
and its previous content sits under the ``obdk-old`` name; after 4 ``D`` is the new
checkpoint. An exception (not a kill) between 3 and 4 renames the old copy back.

Recovery (:func:`recover`, run by every save and every load of ``D``): an ``obdk-tmp``
or ``obdk-old`` sibling of ``D`` whose writer is gone (its pid is not running, or
it is this process but not a save in progress, or it has no pid: names written by
obdk before this protocol) is stale. If ``D`` is missing, the newest stale
``obdk-old`` is renamed back to ``D`` (the interrupted swap is rolled back); every
other stale temporary is removed. Temporaries of a live writer are left alone.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import OutputPathError
from .format import MANIFEST_FILE, QUANT_METHOD

log = logging.getLogger(__name__)

TMP_TAG, OLD_TAG = "obdk-tmp", "obdk-old"

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


def _sources_of(model: Any) -> list[str]:
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

    Cheap (a few ``stat`` calls and one unnamed probe file in the nearest existing ancestor: a real write,
    since ``os.access`` is true for root on ``/proc``). Raises :class:`OutputPathError` naming the path,
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
    from ..scratch import writable_dir  # a real write: os.access is true for root on /proc
    writable_dir(anc, f"output directory {raw!r} ({p}) is under", error=OutputPathError)
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


def _sources_of_config(model_config: Any) -> list[str]:
    """Local directories a model config names as its origin (``_name_or_path``), object or dict."""
    if isinstance(model_config, dict):
        p = model_config.get("_name_or_path")
        return [os.fspath(p)] if isinstance(p, (str, os.PathLike)) and os.fspath(p) and os.path.isdir(p) else []
    return _sources_of(model_config)


def new_temporary(target: Path) -> Path:
    """Create the temporary directory a save of ``target`` writes into (step 2), marked as in use by this process."""
    tmp = _temp_path(target, TMP_TAG)
    _ACTIVE.add(str(tmp))
    try:
        tmp.mkdir()
    except BaseException:
        _ACTIVE.discard(str(tmp))
        raise
    return tmp


def drop_temporary(tmp: Optional[Path]) -> None:
    """Remove an abandoned temporary (an aborted save); one that cannot be removed is left for :func:`recover`."""
    try:
        if tmp is not None and os.path.lexists(tmp):
            _remove(tmp)
    except BaseException:
        pass  # left for recover()
    finally:
        _ACTIVE.discard(str(tmp))


def swap_in(tmp: Path, target: Path, *, overwrite: bool, sources: list) -> Optional[Path]:
    """Steps 3 and 4: the complete checkpoint in ``tmp`` becomes ``target``; returns the ``obdk-old`` copy of the
    previous ``target`` (None when there was none), for :func:`release_swap`. The target is checked again first
    (it may have changed meanwhile); an exception between the renames puts the old copy back."""
    old: Optional[Path] = None
    try:
        if os.path.lexists(target):
            check_writable(target, overwrite=overwrite, source_dir=sources)
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
        if old is not None:
            _ACTIVE.discard(str(old))  # rolled back, or left for recover() to restore
        raise
    return old


def release_swap(tmp: Path, target: Path, old: Optional[Path]) -> None:
    """Step 5: forget the temporary and remove the previous checkpoint's ``obdk-old`` copy."""
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
