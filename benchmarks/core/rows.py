"""CSV rows: append with a union header, write one row at a time, resume by key columns."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .env import env_fields, loadavg, timestamp


def write_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header = union of keys, in first-seen order).

    The file is rewritten whole, so a row with a new column never shifts the older ones, and
    a run that is cut short leaves a complete file behind.
    """
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    cols: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            old = list(reader)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of a CSV as dicts of strings ([] when the file does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


def last_rows(rows: Iterable[dict], key_cols: Sequence[str]) -> list[dict]:
    """The last row of each key (the values of ``key_cols``, as strings), in first-seen key order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out[tuple(str(r.get(c, "")) for c in key_cols)] = r
    return list(out.values())


def key_cell(v) -> str:
    """Canonical text of a key cell (``0.8`` == ``"0.8"`` == ``"0.80"``), so CSV text matches Python values."""
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
        if math.isfinite(f):
            return repr(round(f, 6))
    except (TypeError, ValueError):
        pass
    return str(v)


class ResultLog:
    """The rows of one run, written to ``path`` one at a time; with ``resume``, the keys already there.

    A row's key is its values in ``key_cols`` (compared through :func:`key_cell`). ``has(**cells)``
    says whether a row with those cells was already written (this run or, with ``resume``, an
    earlier one); ``write(row)`` stamps the provenance columns (:func:`~.env.env_fields`, with the
    timestamp and load average of the moment of writing) and appends it at once.
    """

    def __init__(self, path: str | os.PathLike, key_cols: Sequence[str], resume: bool, *, device=None):
        self.path, self.key_cols = Path(path), tuple(key_cols)
        self.done: set[tuple] = set()
        self.rows: list[dict] = []
        if resume:
            for r in read_rows(self.path):
                self.done.add(self.key(r))
            print(f"[resume] {len(self.done)} rows already in {self.path}", flush=True)
        self._env = env_fields(device)

    def key(self, row: dict) -> tuple:
        return tuple(key_cell(row.get(c, "")) for c in self.key_cols)

    def has(self, **cells) -> bool:
        return self.key(cells) in self.done

    def write(self, row: dict) -> dict:
        row = {**row, **self._env, "timestamp": timestamp(), "loadavg_1m": loadavg()}
        write_csv([row], self.path)
        self.done.add(self.key(row))
        self.rows.append(row)
        return row


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], cols: Sequence[str]) -> list[str]:
    """Lines of a plain right-aligned table of ``cols`` (missing values blank)."""
    cells = [list(cols)] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return ["  ".join(s.rjust(w) for s, w in zip(row, widths)) for row in cells]


def print_table(rows: Sequence[dict], cols: Sequence[str]) -> None:
    for line in format_table(rows, cols):
        print(line, flush=True)


def to_float(v) -> Optional[float]:
    """A CSV cell as a finite float, or None (blank, text, nan, inf)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
