"""Scratch stores that no run leaves behind: a registry of live stores, signal clean-up, a stale-store sweep.

A streamed plan spills what does not fit its host budget to private ``obdk-*`` directories under
``scratch_dir`` (the kept statistics, spectra and corrected factors: hundreds of GB at 70B). Three
mechanisms, one module, so that neither a kill nor a vanished directory leaves them on disk:

* **Registry and signals.** :func:`new_store` makes each store (``tempfile.mkdtemp``) and registers it;
  the first store installs handlers for ``SIGTERM`` and ``SIGHUP`` (a cluster's preemption, a closed
  terminal) that remove every store this process made and then re-raise the signal's previous
  behaviour (the default: the process dies of the signal, exit status 128 + signum). A signal whose
  disposition is ``SIG_IGN`` (``nohup``) is left ignored; a Python handler installed before ours is
  called after the clean-up. ``SIGINT`` needs nothing: ``KeyboardInterrupt`` unwinds and the stores'
  finalizers run. A forked child never removes its parent's stores.
* **Owner.** Each store's name carries its owner, ``{prefix}{pid}@{host}.XXXXXXXX``
  (``obdk-spectra-4242@node17.k2j4h5g6``), and the owner holds an ``flock`` on the store directory
  for its lifetime (the kernel drops the lock when the process dies, even of ``SIGKILL``). Nothing
  is added inside the store.
* **Sweep.** The first use of a scratch directory in a process (:func:`use_dir`) removes the
  ``obdk-*`` stores (and spill files) there whose owner is gone: made on this host, the lock free
  (or no ``flock`` on this file system) and the pid no longer running; it says so in one logged
  warning line. A name without ``pid@host`` (an older obdk's store), another host's store (a shared
  file system) and a store whose pid runs (even a reused pid) are never touched.

:func:`writable_dir` checks a directory by creating and removing a file in it (``os.access`` is true
for root on ``/proc``); every failure here is an :class:`~obdk.errors.ObdkError` naming the directory.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Type

from .errors import ConfigError, ObdkError

__all__ = ["writable_dir", "use_dir", "sweep", "new_store", "store", "remove_store",
           "live_stores"]

log = logging.getLogger(__name__)

# a store's or spill file's name: {prefix}{pid}@{host}.{8 random characters of mkdtemp/mkstemp}[.suffix]
_NAME = re.compile(r"obdk-.*?(\d+)@([A-Za-z0-9-]*)\.[a-z0-9_]{8}(\.\w+)?")
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_live: dict[str, tuple[int, Optional[int]]] = {}  # path -> (pid that made it, the fd holding its lock)
_previous: dict[int, object] = {}  # signum -> the disposition ours replaced
_swept: set[str] = set()
_mutex = threading.RLock()


def writable_dir(path, what: str, error: Type[ObdkError] = ConfigError) -> str:
    """``path`` (str) when it is a directory a file can be created in; else ``error`` naming ``what`` and ``path``.

    Tries the write (an unnamed ``O_TMPFILE`` file; where the file system has none, a ``.obdk-probe-*`` file created
    and removed): permission bits say nothing for root,
    and ``/proc`` or a read-only mount pass ``os.access``. ``what``: how the caller names it (``--scratch-dir``).
    """
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise error(f"{what} {p}: not a directory (create it, or choose another)")
    probe = None
    try:
        try:  # an unnamed file (O_TMPFILE): nothing to remove, nothing left even by a kill right here
            fd = os.open(p, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except (AttributeError, OSError) as e:
            if getattr(e, "errno", None) not in (None, errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            fd, probe = tempfile.mkstemp(prefix=".obdk-probe-", dir=p)  # (a file system without O_TMPFILE)
    except OSError as e:
        raise error(f"{what} {p}: cannot create a file there ({e.strerror or e}); choose a writable "
                    f"directory") from None
    os.close(fd)
    if probe is not None:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return p


def use_dir(path, what: str) -> str:
    """The scratch directory a store will use (``path``, or the system temporary directory when None), checked
    writable (:func:`writable_dir`) and swept of stale stores (:func:`sweep`, once per directory and process)."""
    where = tempfile.gettempdir() if path is None else os.fspath(path)
    writable_dir(where, what)
    sweep(where)
    return where


def _host() -> str:
    """This machine's name as it goes into a store's name (letters, digits and ``-``, at most 40)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _tagged(prefix: str) -> str:
    return f"{prefix}{os.getpid()}@{_host()}."


def _owner_gone(path: str) -> bool:
    """True when the process that made store (or spill file) ``path`` is gone: its name says this host and a pid
    that no longer runs, and its lock can be taken (or this file system has no ``flock``)."""
    import fcntl
    m = _NAME.fullmatch(os.path.basename(path))
    if m is None or m.group(2) != _host():
        return False  # an older obdk's store, or another machine's (a shared file system): never touched
    try:
        os.kill(int(m.group(1)), 0)
        return False  # the pid runs (its owner, or a process that reused the pid: left alone either way)
    except ProcessLookupError:
        pass
    except OSError:  # (EPERM: a process of another user runs under that pid)
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # free: nobody holds it
    except OSError as e:
        return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # held (another pid namespace)
    finally:
        os.close(fd)


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def sweep(where, *, force: bool = False) -> list[str]:
    """Remove the ``obdk-*`` stores in directory ``where`` whose owner process is gone; returns their paths.

    Once per directory and process unless ``force``. One warning line names the directory, how many stores and
    bytes were removed. Unreadable directories are left alone (the write check names them)."""
    key = os.path.realpath(os.fspath(where))
    with _mutex:
        if key in _swept and not force:
            return []
        _swept.add(key)
    try:
        names = os.listdir(key)
    except OSError:
        return []
    removed, nbytes = [], 0
    for name in sorted(names):
        path = os.path.join(key, name)
        if not name.startswith("obdk-") or os.path.islink(path) or path in _live:
            continue
        if _owner_gone(path):
            nbytes += _size(path) if os.path.isdir(path) else os.lstat(path).st_size
            remove_store(path)
            removed.append(path)
    if removed:
        log.warning("removed %d stale scratch store(s) (%.3g GB) in %s left by processes that are gone: %s",
                    len(removed), nbytes / 1e9, key, ", ".join(os.path.basename(p) for p in removed))
    return removed


def _on_signal(signum, frame) -> None:
    """Remove this process's stores, then do what the signal did before obdk's handler (default: die of it)."""
    _remove_all()
    prev = _previous.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL if prev is None else prev)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Our handler on SIGTERM/SIGHUP (main thread only; an ignored signal stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        if sig in _previous:
            continue
        cur = signal.getsignal(sig)
        if cur is signal.SIG_IGN or cur is _on_signal:
            continue
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main interpreter, or not allowed
            continue
        _previous[sig] = cur


def _remove_all() -> None:
    """Remove every store this process registered (not its parent's, after a fork)."""
    me = os.getpid()
    for path, (pid, _) in list(_live.items()):
        if pid == me:
            remove_store(path)


def new_store(prefix: str, where, owner: str) -> str:
    """A new private directory ``{where}/{prefix}{pid}@{host}.XXXXXXXX`` (``where`` None: the system temporary
    directory), registered for removal on SIGTERM/SIGHUP and ``flock``-ed while this process lives;
    :func:`remove_store` removes it.

    ``owner`` names the store in the error raised when ``where`` cannot take a new directory (it vanished, or
    it is not writable): a :class:`~obdk.errors.ConfigError` naming the directory."""
    import fcntl
    where = tempfile.gettempdir() if where is None else os.fspath(where)
    sweep(where)
    try:
        path = tempfile.mkdtemp(prefix=_tagged(prefix), dir=where)
    except OSError as e:
        raise ConfigError(f"{owner}: cannot create a scratch directory in {where} ({e.strerror or e}); was it "
                          f"removed or made read-only during the run?") from None
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no flock on this file system: the sweep goes by the pid alone
    with _mutex:
        _live[path] = (os.getpid(), fd)
        _install_handlers()
    return path


@contextmanager
def store(prefix: str, where, owner: str) -> Iterator[str]:
    """:func:`new_store` as a context manager (``tempfile.TemporaryDirectory`` that a SIGTERM/SIGHUP removes too)."""
    path = new_store(prefix, where, owner)
    try:
        yield path
    finally:
        remove_store(path)


def remove_store(path: str) -> None:
    """Remove store (directory or file) ``path`` and forget it (idempotent)."""
    with _mutex:
        entry = _live.pop(path, None)
    if entry is not None and entry[1] is not None:
        try:
            os.close(entry[1])
        except OSError:
            pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def live_stores() -> list[str]:
    """The stores this process has registered and not yet removed."""
    return [p for p, (pid, _) in _live.items() if pid == os.getpid()]
