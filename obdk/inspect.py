"""``obdk inspect``: the ranks of a compressed directory as a compact table and a heatmap."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .io.format import read_quantization_config
from .io.load import load_report

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<kind>.+)$")


def rank_grid(ranks: dict[str, Optional[int]], modules: list[str]) -> tuple[list[int], list[str], dict]:
    """Arrange ``ranks`` (module → rank, None = dense) as layers × module kinds.

    Returns ``(layers, kinds, grid)`` with ``grid[(layer, kind)] = rank | None``; ``modules``
    lists every targeted module (dense ones included) so dense cells are shown.
    """
    grid: dict[tuple[int, str], Optional[int]] = {}
    layers, kinds = set(), []
    for name in modules:
        mt = _LAYER.match(name)
        if not mt:
            continue
        layer, kind = int(mt["idx"]), mt["kind"].split(".")[-1]
        layers.add(layer)
        if kind not in kinds:
            kinds.append(kind)
        grid[(layer, kind)] = ranks.get(name)
    return sorted(layers), kinds, grid


def inspect_dir(path: str, heatmap: Optional[str] = None) -> dict[str, Any]:
    """Read an obdk checkpoint's ranks and report; return ``{"text", "data"}`` and optionally write a PNG."""
    q = read_quantization_config(path)
    rep = load_report(path) or {}
    ranks = {k: int(v) for k, v in q["ranks"].items()}
    mods = rep.get("modules") or [{"name": k, "rank": v} for k, v in ranks.items()]
    names = [m["name"] for m in mods]
    shapes = {m["name"]: (m.get("out_features"), m.get("in_features")) for m in mods}
    layers, kinds, grid = rank_grid(ranks, names)
    cfg = q.get("config") or {}
    lines = [f"{path}: obdk format {q['format_version']} (obdk {q.get('obdk_version')}), "
             f"method={cfg.get('method')} alloc={cfg.get('alloc')} keep={cfg.get('keep')}"]
    if rep:
        lines.append(f"targeted params {rep['targeted_params_before']:,} → {rep['targeted_params_after']:,} "
                     f"(kept {rep.get('keep_actual', 0):.4f}); model params {rep['model_params_before']:,} → "
                     f"{rep['model_params_after']:,}; predicted loss increase {rep.get('predicted_loss', 0):.4f}")
        if rep.get("measured"):
            lines.append("measured: " + ", ".join(f"{k}={v}" for k, v in rep["measured"].items()))
    hdr = "layer " + " ".join(f"{k:>9s}" for k in kinds)
    sub = "      " + " ".join(f"{'%sx%s' % shapes.get(next((n for n in names if n.endswith('.' + k)), ''), (None, None)):>9s}"
                              if shapes else "" for k in kinds)
    lines += [hdr, sub]
    for layer in layers:
        cells = []
        for k in kinds:
            r = grid.get((layer, k), "-")
            cells.append(f"{'dense' if r is None else r:>9}")
        lines.append(f"{layer:5d} " + " ".join(cells))
    if heatmap:
        _heatmap(layers, kinds, grid, shapes, names, heatmap, title=f"{Path(path).name}: ranks")
        lines.append(f"heatmap written to {heatmap}")
    data = {"path": str(path), "quantization_config": q, "ranks": ranks,
            "grid": {f"{l}.{k}": grid.get((l, k)) for l in layers for k in kinds},
            "report": {k: v for k, v in rep.items() if k != "modules"}}
    return {"text": "\n".join(lines), "data": data}


def _heatmap(layers, kinds, grid, shapes, names, out, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # colour = kept fraction of the dense parameters of that cell (rank·(m+n)/(m·n)); dense = 1
    frac = np.full((len(layers), len(kinds)), np.nan)
    ann = [["" for _ in kinds] for _ in layers]
    for i, l in enumerate(layers):
        for j, k in enumerate(kinds):
            if (l, k) not in grid:
                continue
            r = grid[(l, k)]
            name = next((n for n in names if n.endswith(f".{l}.") or n.split(".")[-1] == k and f".{l}." in n), None)
            m, n = shapes.get(name, (None, None)) if name else (None, None)
            if r is None:
                frac[i, j], ann[i][j] = 1.0, "D"
            else:
                frac[i, j] = r * (m + n) / (m * n) if m and n else np.nan
                ann[i][j] = str(r)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 0.8 + 0.28 * len(layers)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(kinds)):
            ax.text(j, i, ann[i][j], ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="kept fraction of parameters")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
