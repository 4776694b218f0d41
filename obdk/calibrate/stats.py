"""Calibration statistics of every targeted Linear: ``C_x``, ``C_g`` and the weight gradient.

``calibrate(model, data)`` runs the model over calibration windows (forward, and backward of
the sum-reduced next-token loss when ``cg`` or ``grad`` is requested) and returns a
:class:`Statistics`:

* ``cx[key]``  [n, n]: ``C_x = (1/N_x) Σ_t x_t x_tᵀ``, one per *unique input* (``key`` =
  ``LinearGroup.key``; q/k/v share one, gate/up share one). ``N_x`` = ``Statistics.tokens`` =
  the number of non-padding tokens of all windows (every position of an unpadded window,
  including the last one, which has an input but no label).
* ``cg[name]`` [m, m]: ``C_g = (1/N_ℓ) Σ_t g_t g_tᵀ`` with ``g_t = ∂L/∂y_t`` and
  ``L = Σ_t ℓ_t`` the *sum* (not the mean) of the next-token cross-entropies, so each token's
  gradient is not divided by the token count. ``N_ℓ`` = ``Statistics.loss_tokens`` = the
  number of positions that carry a loss (a non-padding token followed by a non-padding token:
  ``T − 1`` per unpadded window of length ``T``). The sum runs over all non-padding positions;
  the last position of a window has ``g = 0`` exactly (nothing downstream of it has a loss),
  so ``C_g`` is the mean of ``g gᵀ`` over the tokens that have a loss: the empirical Fisher
  per token. With ``fisher="true"`` the labels are sampled from the model's own predictive
  distribution instead (same positions, a ``torch.Generator`` seeded by ``(seed, window)``).
* ``grad[name]`` [m, n] (only when requested): ``∂L/∂W`` of the same sum loss, *summed* over
  all windows, not normalised (divide by ``loss_tokens`` for the gradient of the mean loss).

With these normalisers ``½ tr(C_g ΔW C_x ΔWᵀ)`` is the K-FAC estimate of the increase of the
mean per-token loss (``N_x/N_ℓ = T/(T−1)`` is the only difference between the two).

Memory (fp32, shared inputs deduplicated; fp64 doubles every number)
--------------------------------------------------------------------
Per decoder layer ``C_x`` holds 2·d² (q/k/v input, gate/up input) + d² (o input) + ffn² (down
input) values; ``C_g`` holds the squares of the q, k, v, o, gate, up output sizes and d² (down).

| model                | C_x                              | C_g                               | total                  |
|----------------------|----------------------------------|-----------------------------------|------------------------|
| Llama-7B, per layer  | 171,507,712 values = 654.25 MiB  | 326,238,208 values = 1,244.50 MiB | 1,898.75 MiB           |
| Llama-7B, 32 layers  | 5,488,246,784 v = 20.45 GiB      | 10,439,622,656 v = 38.89 GiB      | 59.34 GiB (63.71 GB)   |
| Llama-70B, per layer | 1,023,410,176 values = 3,904 MiB | 1,847,590,912 values = 7,048 MiB  | 10,952 MiB (10.70 GiB) |
| Llama-70B, 80 layers | 81,872,814,080 v = 305.0 GiB     | 147,807,272,960 v = 550.6 GiB     | 855.6 GiB (918.7 GB)   |

(Llama-7B: d=4096, ffn=11008, MHA, so every attention output is d. Llama-70B: d=8192,
ffn=28672, GQA with 8 kv heads, so k/v outputs are 1024 wide.) The optional ``grad``
statistic adds one fp32 m×n matrix per Linear: 24.1 GiB for Llama-7B.

How obdk keeps this within a GPU:

* accumulators are fp32 (fp64 only on request), one ``C_x`` per unique input (deduplication
  saves 3·d² per layer: 6 GiB on Llama-7B), activations stay in the model's 16-bit dtype (the
  ``gram_acc_`` op converts at most 64 MiB of rows at a time), and no ``dW`` is ever formed;
* every accumulator is allocated on the device of its own Linear, so a model split over GPUs
  with a ``device_map`` splits its statistics the same way;
* ``offload=True``: after the last window every accumulator is all-reduced, normalised in
  place and copied to host memory *one at a time*, its device copy freed before the next, so
  the result never needs a second copy on the GPU. Offloading a layer earlier is not
  possible in a single pass (each window adds to every layer until the last one), and doing
  it during the last backward would not lower the peak, which is reached before;
* the loss of a backward pass runs one window at a time from the LM head's weight
  (:func:`plain_head`, :func:`head_backward`) for the architectures whose logits are
  ``lm_head(hidden)``: only ``[T-1, vocab]`` logits and their fp32 softmax exist at once, never the
  ``[B, T, vocab]`` logits of a batch with their fp32 copy and gradient (4 windows of 2048 tokens
  at Llama's vocabulary of 32,000: 1 GiB per fp32 copy). On SmolLM2-135M (vocabulary 49,152) this
  made a ``cx+cg`` pass 6–8 % faster at batch size 1 and 16 % at batch size 4 (−1 GiB peak RSS);
* ``groups=`` restricts a pass to a slice of the Linears: :func:`layer_slices` plans slices
  under a byte budget and :meth:`Statistics.merge` joins the passes (each pass costs one
  forward+backward over the data). Llama-7B on an 80 GB H100: 59.3 GiB of statistics next to
  12.6 GiB of bf16 weights leaves too little for activations, two passes of 16 layers
  (29.7 GiB each) fit. Llama-70B needs 10.7 GiB per layer and its bf16 weights (131 GiB)
  already span several GPUs: even over 8 × 80 GB the full 855.6 GiB (107 GiB per GPU) does
  not fit, so it is calibrated in slices (e.g. 4 layers = 42.8 GiB per pass on one GPU, or
  32 layers ≈ 43 GiB per GPU per pass over 8), each finished slice going to host memory
  (``offload=True``) or to the cache on disk.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import distributed as dist
from .cache import StatsCache, cache_key, data_fingerprint, model_fingerprint
from .function import CalibrationContext, CalibrationLinear, GroupState, ModuleSlot

log = logging.getLogger(__name__)

__all__ = ["Statistics", "calibrate", "stats_nbytes", "layer_slices", "STATS", "plain_head", "head_backward"]

#: the statistics ``calibrate`` can collect
STATS = ("cx", "cg", "grad")
_FORMAT = "obdk-statistics"
_FORMAT_VERSION = 1
_FISHER = ("empirical", "true")


# =========================================================================== Statistics


@dataclass
class Statistics:
    """Calibration statistics of the targeted Linears of one model.

    * ``cx``: group key → ``C_x`` [n, n], one per unique input, normalised by ``tokens``;
    * ``cg``: module name → ``C_g`` [m, m], normalised by ``loss_tokens``;
    * ``grad``: module name → ``∂L/∂W`` [m, n] of the summed loss (not normalised);
    * ``input_key``: module name → its group key in ``cx``;
    * ``tokens`` (N_x): non-padding tokens seen; ``loss_tokens`` (N_ℓ): positions with a loss;
      ``windows``: calibration windows;
    * ``fisher``: ``"empirical"`` or ``"true"``; ``dtype``: dtype of the statistics;
    * ``fingerprint``: data fingerprint, model hash, stats set, dtype, fisher, seed (JSON-able).
    """

    cx: dict[str, Tensor] = field(default_factory=dict)
    cg: dict[str, Tensor] = field(default_factory=dict)
    grad: dict[str, Tensor] = field(default_factory=dict)
    input_key: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    windows: int = 0
    fisher: str = "empirical"
    dtype: torch.dtype = torch.float32
    fingerprint: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ access

    @property
    def modules(self) -> list[str]:
        """Names of the Linears covered, in forward order."""
        return list(self.input_key)

    @property
    def stats(self) -> tuple[str, ...]:
        """Which statistics are present (subset of ``("cx", "cg", "grad")``)."""
        return tuple(s for s in STATS if getattr(self, s))

    def cx_for(self, module_name: str) -> Tensor:
        """``C_x`` [n, n] of the input read by ``module_name`` (shared within its group)."""
        key = self.input_key.get(module_name)
        if key is None:
            raise KeyError(f"Statistics: no Linear named {module_name!r} (have {len(self.input_key)}, "
                           f"e.g. {self.modules[:3]})")
        if key not in self.cx:
            raise KeyError(f"Statistics: C_x of {module_name!r} (input {key!r}) was not collected "
                           f"(stats present: {self.stats})")
        return self.cx[key]

    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        return sum(t.numel() * t.element_size() for d in (self.cx, self.cg, self.grad) for t in d.values())

    def to(self, device: str | torch.device) -> "Statistics":
        """A copy with every tensor on ``device`` (tensors already there are shared, not copied)."""
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Statistics(mv(self.cx), mv(self.cg), mv(self.grad), dict(self.input_key), self.tokens,
                          self.loss_tokens, self.windows, self.fisher, self.dtype, dict(self.fingerprint))

    @classmethod
    def merge(cls, parts: Sequence["Statistics"]) -> "Statistics":
        """Join statistics of disjoint module slices computed on the same data (see :func:`layer_slices`)."""
        if not parts:
            raise ValueError("Statistics.merge: nothing to merge")
        first = parts[0]
        out = Statistics(tokens=first.tokens, loss_tokens=first.loss_tokens, windows=first.windows,
                         fisher=first.fisher, dtype=first.dtype, fingerprint=dict(first.fingerprint))
        for i, p in enumerate(parts):
            same = (p.tokens, p.loss_tokens, p.fisher, p.dtype, p.fingerprint.get("data"))
            ref = (first.tokens, first.loss_tokens, first.fisher, first.dtype, first.fingerprint.get("data"))
            if same != ref:
                raise ValueError(f"Statistics.merge: part {i} was computed on other data or settings "
                                 f"(tokens/loss_tokens/fisher/dtype/data {same[:4]} vs {ref[:4]})")
            for kind in STATS:
                dst, src = getattr(out, kind), getattr(p, kind)
                clash = dst.keys() & src.keys()
                if clash:
                    raise ValueError(f"Statistics.merge: part {i} repeats {kind} of {sorted(clash)[:3]}")
                dst.update(src)
            out.input_key.update(p.input_key)
        return out

    # ------------------------------------------------------------------ disk

    def _meta(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "windows": self.windows, "fisher": self.fisher,
                "dtype": str(self.dtype).replace("torch.", ""), "input_key": self.input_key,
                "stats": list(self.stats), "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/statistics.safetensors`` (tensors ``cx/<key>``, ``cg/<name>``,
        ``grad/<name>``) and ``path/statistics.json`` (everything else). Returns ``path``."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"{kind}/{k}": v.detach().to("cpu").contiguous()
                   for kind in STATS for k, v in getattr(self, kind).items()}
        tmp = path / ".statistics.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": _FORMAT})
        os.replace(tmp, path / "statistics.safetensors")
        tmpj = path / ".statistics.json.tmp"
        tmpj.write_text(json.dumps(self._meta(), indent=1, default=str))  # keeps forward order
        os.replace(tmpj, path / "statistics.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Statistics":
        """Read statistics written by :meth:`save` onto ``device``."""
        from safetensors import safe_open
        path = Path(path)
        meta_file, tens_file = path / "statistics.json", path / "statistics.safetensors"
        if not meta_file.is_file() or not tens_file.is_file():
            raise FileNotFoundError(f"Statistics.load: {path} has no statistics.json/statistics.safetensors")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != _FORMAT or int(meta.get("version", 0)) > _FORMAT_VERSION:
            raise ValueError(f"Statistics.load: {meta_file} is not {_FORMAT} version <= {_FORMAT_VERSION} "
                             f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        st = Statistics(input_key=dict(meta["input_key"]), tokens=int(meta["tokens"]),
                        loss_tokens=int(meta["loss_tokens"]), windows=int(meta["windows"]),
                        fisher=meta["fisher"], dtype=getattr(torch, meta["dtype"]),
                        fingerprint=meta.get("fingerprint", {}))
        with safe_open(str(tens_file), framework="pt", device=str(device)) as f:
            for k in f.keys():
                kind, name = k.split("/", 1)
                getattr(st, kind)[name] = f.get_tensor(k)
        return st


# =========================================================================== planning


def _resolve_groups(model: nn.Module, groups) -> tuple[list, dict[str, nn.Linear]]:
    from ..models import linear_groups
    groups = list(linear_groups(model) if groups is None else groups)
    if not groups:
        raise ValueError(f"calibrate: no targeted Linears in {type(model).__name__}")
    mods = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    for g in groups:
        first = None
        for name in g.names:
            m = mods.get(name)
            if m is None:
                raise ValueError(f"calibrate: group {g.key} names {name!r}, which is not a module of {type(model).__name__}")
            if not isinstance(m, nn.Linear):
                raise TypeError(f"calibrate: {name} is a {type(m).__name__}, not an nn.Linear (already compressed?)")
            if name in linears:
                raise ValueError(f"calibrate: {name} appears in more than one group")
            if first is not None and m.in_features != first.in_features:
                raise ValueError(f"calibrate: group {g.key} mixes inputs of width {first.in_features} and "
                                 f"{m.in_features} ({name}); members of a group must read one tensor")
            first = first or m
            linears[name] = m
    return groups, linears


def stats_nbytes(model: nn.Module, stats: Iterable[str] = ("cx", "cg"), dtype: torch.dtype = torch.float32,
                 groups=None) -> int:
    """Bytes the statistics ``stats`` of ``model`` (or of ``groups``) need in ``dtype``."""
    groups, lin = _resolve_groups(model, groups)
    return sum(_group_nbytes(g, lin, set(stats), dtype) for g in groups)


def _group_nbytes(g, lin: dict[str, nn.Linear], stats: set[str], dtype: torch.dtype) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    n = lin[g.names[0]].in_features
    total = n * n if "cx" in stats else 0
    for name in g.names:
        m = lin[name]
        total += m.out_features ** 2 if "cg" in stats else 0
        total += m.out_features * m.in_features if "grad" in stats else 0
    return total * es


def layer_slices(model: nn.Module, budget_bytes: int, *, stats: Iterable[str] = ("cx", "cg"),
                 dtype: torch.dtype = torch.float32, groups=None) -> list[list]:
    """Split the targeted groups into consecutive slices whose statistics fit ``budget_bytes``.

    Returns a list of ``LinearGroup`` lists; calibrate each with ``groups=slice`` (one
    forward+backward over the data per slice) and join the results with
    :meth:`Statistics.merge`. Raises ``ValueError`` naming the group that alone exceeds the budget.
    """
    groups, lin = _resolve_groups(model, groups)
    st = set(stats)
    out: list[list] = [[]]
    used = 0
    for g in groups:
        b = _group_nbytes(g, lin, st, dtype)
        if b > budget_bytes:
            raise ValueError(f"layer_slices: the statistics of {g.key} alone need {b} bytes > budget {budget_bytes}")
        if used + b > budget_bytes and out[-1]:
            out.append([])
            used = 0
        out[-1].append(g)
        used += b
    return out


# =========================================================================== calibrate


def _windows(data: Any) -> tuple[Tensor, Optional[Tensor], Any]:
    """``(input_ids [N, T] int64, attention_mask [N, T] int64 | None, source object)``."""
    src = None
    if isinstance(data, Tensor):
        ids, mask = data, None
    elif hasattr(data, "input_ids"):
        ids, mask, src = data.input_ids, getattr(data, "attention_mask", None), data
    elif isinstance(data, dict) and "input_ids" in data:
        ids, mask = data["input_ids"], data.get("attention_mask")
    else:
        raise TypeError(f"calibrate: data must be a LongTensor [N, T] or have .input_ids, got {type(data).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"calibrate: input_ids must be an integer tensor [N, T], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"calibrate: no calibration tokens (input_ids {tuple(ids.shape)})")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"calibrate: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        mask = mask.to(torch.int64)
        if bool((mask == 1).all()):
            mask = None
    return ids.to(torch.int64), mask, src


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, Tensor):
        return w.device
    return next(model.parameters()).device


def _window_generator(seed: int, window: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(window)) % (1 << 63))
    return g


class _Patch:
    """Freezes the model, puts it in eval mode and swaps each targeted Linear's forward; undone by ``restore``."""

    def __init__(self, model: nn.Module, slots: dict[str, ModuleSlot], linears: dict[str, nn.Linear],
                 anchor: Tensor) -> None:
        self.model = model
        self.requires = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.swapped: list[tuple[nn.Module, str, bool, Any]] = []
        try:
            for p, _ in self.requires:
                p.requires_grad_(False)
            model.eval()
            for name, slot in slots.items():
                mod = linears[name]
                # accelerate's dispatch hooks wrap ``forward`` and call ``_old_forward``
                attr = "_old_forward" if hasattr(mod, "_hf_hook") and hasattr(mod, "_old_forward") else "forward"
                had = attr in mod.__dict__
                self.swapped.append((mod, attr, had, mod.__dict__.get(attr)))
                setattr(mod, attr, _calibration_forward(mod, slot, anchor))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for mod, attr, had, old in reversed(self.swapped):
            if had:
                setattr(mod, attr, old)
            else:
                mod.__dict__.pop(attr, None)
        self.swapped = []
        for p, req in self.requires:
            p.requires_grad_(req)
        for m, mode in self.modes:
            m.training = mode


def _calibration_forward(mod: nn.Linear, slot: ModuleSlot, anchor: Tensor):
    def forward(input: Tensor) -> Tensor:
        return CalibrationLinear.apply(input, mod.weight, mod.bias, anchor, slot)
    forward.__obdk_calibration__ = True  # type: ignore[attr-defined]
    return forward


def calibrate(model: nn.Module, data: Any, *, stats: Sequence[str] = ("cx", "cg"), batch_size: int = 1,
              dtype: torch.dtype = torch.float32, fisher: str = "empirical", seed: int = 0, offload: bool = False,
              cache_dir: Optional[str | os.PathLike] = None, resume: bool = True,
              checkpoint_every: Optional[int] = None, progress: bool = True, groups=None) -> Statistics:
    """Collect the calibration statistics of every targeted Linear of ``model``.

    ``data``: a ``CalibrationData``-like object (``.input_ids`` [N, T], ``.attention_mask``
    [N, T] or None, optional ``.fingerprint``), a dict with ``input_ids``, or a LongTensor
    [N, T]; attention-mask zeros are padding (no ``C_x`` row, no loss).
    ``stats``: any of ``"cx"``, ``"cg"``, ``"grad"`` (see the module docstring for the
    definitions and normalisers). ``batch_size`` windows run per forward. ``dtype``: float32
    or float64 accumulators. ``fisher``: ``"empirical"`` (data labels) or ``"true"`` (labels
    sampled from the model, seeded by ``seed`` and the window index). ``offload``: return the
    statistics on CPU. ``cache_dir``: reuse/write a cached result (see
    :mod:`obdk.calibrate.cache`); ``checkpoint_every=K`` also checkpoints partial sums every K
    windows there, and ``resume`` picks up such a checkpoint. ``groups``: the
    ``LinearGroup`` list to target (default :func:`obdk.models.linear_groups`).

    The weights are frozen for the run and their ``requires_grad`` flags, training mode and
    forward methods are restored afterwards, also on an exception. Under
    ``torch.distributed`` each rank takes windows ``i % world == rank`` and the sums are
    all-reduced before normalising. Returns :class:`Statistics`.
    """
    want = tuple(dict.fromkeys(stats))
    bad = [s for s in want if s not in STATS]
    if bad or not want:
        raise ValueError(f"calibrate: stats must be a non-empty subset of {STATS}, got {tuple(stats)}")
    if fisher not in _FISHER:
        raise ValueError(f"calibrate: fisher must be one of {_FISHER}, got {fisher!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"calibrate: dtype must be torch.float32 or torch.float64, got {dtype}")
    if int(batch_size) < 1:
        raise ValueError(f"calibrate: batch_size must be >= 1, got {batch_size}")
    if checkpoint_every is not None and (cache_dir is None or int(checkpoint_every) < 1):
        raise ValueError(f"calibrate: checkpoint_every={checkpoint_every} needs cache_dir and a positive count")
    backward = "cg" in want or "grad" in want

    ids, mask, src = _windows(data)
    groups, linears = _resolve_groups(model, groups)
    rank, world = dist.world()
    seed_used = int(seed) if (fisher == "true" and backward) else None

    data_fp = data_fingerprint(ids, mask, src)
    model_fp = model_fingerprint(model, list(linears))
    fingerprint = {"data": data_fp, "model": model_fp["hash"], "model_name": model_fp["name_or_path"],
                   "stats": sorted(want), "dtype": str(dtype).replace("torch.", ""), "fisher": fisher,
                   "seed": seed_used}
    cache = StatsCache(cache_dir) if cache_dir is not None else None
    key = cache_key(model_fp, data_fp, stats=want, fisher=fisher, dtype=dtype, seed=seed_used) if cache else None

    if cache is not None and dist.all_agree(cache.has(key)):
        log.info("calibrate: statistics cache hit %s (%s); the model is not run", key, cache.entry(key))
        hit = cache.load(key)
        return hit if offload else _place(hit, linears, groups)

    # ---------------------------------------------------------------- accumulators
    ctx = CalibrationContext()
    slots: dict[str, ModuleSlot] = {}
    accs: dict[str, Tensor] = {}  # "cx/<key>", "cg/<name>", "grad/<name>" -> raw sums (forward order)
    input_key: dict[str, str] = {}
    for g in groups:
        first = linears[g.names[0]]
        dev = first.weight.device
        cx = torch.zeros(first.in_features, first.in_features, dtype=dtype, device=dev) if "cx" in want else None
        if cx is not None:
            accs[f"cx/{g.key}"] = cx
        gs = GroupState(g.key, g.names, cx, ctx)
        for name in g.names:
            m = linears[name]
            cg = torch.zeros(m.out_features, m.out_features, dtype=dtype, device=m.weight.device) if "cg" in want else None
            gr = (torch.zeros(m.out_features, m.in_features, dtype=dtype, device=m.weight.device)
                  if "grad" in want else None)
            if cg is not None:
                accs[f"cg/{name}"] = cg
            if gr is not None:
                accs[f"grad/{name}"] = gr
            slots[name] = ModuleSlot(name, gs, cg, gr)
            input_key[name] = g.key
    nbytes = sum(t.numel() * t.element_size() for t in accs.values())
    mine = dist.shard(ids.shape[0], rank, world)
    log.info("calibrate: %d windows x %d tokens (rank %d/%d: %d), %d Linears in %d input groups, stats %s in %s "
             "(%.3f GiB), fisher=%s", ids.shape[0], ids.shape[1], rank, world, len(mine), len(linears), len(groups),
             "+".join(want), str(dtype).replace("torch.", ""), nbytes / 2**30, fisher)

    done, tokens, loss_tokens = 0, 0, 0
    if cache is not None and resume:
        part = cache.load_partial(key, rank, world)
        if part is not None:
            tensors, meta = part
            if set(tensors) != set(accs):
                raise RuntimeError(f"calibrate: partial checkpoint {cache.partial_path(key, rank, world)} holds "
                                   f"other accumulators than this run; delete it or pass resume=False")
            for k, t in tensors.items():
                accs[k].copy_(t)
            done, tokens, loss_tokens = int(meta["done"]), int(meta["tokens"]), int(meta["loss_tokens"])
            log.info("calibrate: resuming from %s after %d of %d windows", cache.partial_path(key, rank, world),
                     done, len(mine))

    # ---------------------------------------------------------------- the pass
    # a forward-only pass (C_x alone) needs no logits: run the trunk without the LM head; a backward
    # pass runs the trunk too when the head is a plain Linear, and the head + loss one window at a time
    head = plain_head(model, linears) if backward else None
    runner = _trunk(model, linears) if (head is not None or not backward) else model
    accepts_pos = "position_ids" in inspect.signature(runner.forward).parameters
    group_states = list({id(s.group): s.group for s in slots.values()}.values())
    in_dev = _input_device(model)
    anchor = torch.zeros(0, device=in_dev, requires_grad=True)
    from tqdm.auto import tqdm
    patch = _Patch(model, slots, linears, anchor)
    try:
        with ctx.defer_symmetry(), tqdm(total=len(mine), initial=done, desc=f"obdk calibrate [{'+'.join(want)}]", unit="window",
                  disable=not progress, leave=False) as bar:
            last_ckpt = done
            while done < len(mine):
                idx = mine[done:done + int(batch_size)]
                b_ids = ids[idx].to(in_dev)
                b_mask = mask[idx].to(in_dev) if mask is not None else None
                nt, nl = _run_batch(runner, ctx, group_states, ids=b_ids, mask=b_mask, windows=idx,
                                    backward=backward, fisher=fisher, seed=seed, accepts_pos=accepts_pos,
                                    head=head)
                tokens += nt
                loss_tokens += nl
                done += len(idx)
                bar.update(len(idx))
                if checkpoint_every is not None and done - last_ckpt >= int(checkpoint_every) and done < len(mine):
                    ctx.symmetrize()
                    cache.save_partial(key, accs, {"done": done, "tokens": tokens, "loss_tokens": loss_tokens,
                                                   "windows": len(mine)}, rank, world)
                    last_ckpt = done
                    log.debug("calibrate: checkpoint after %d windows", done)
    finally:
        patch.restore()

    # ---------------------------------------------------------------- reduce, normalise, offload
    like = next(iter(accs.values()))
    tokens, loss_tokens = dist.all_reduce_counts([tokens, loss_tokens], like=like)
    if tokens == 0:
        raise ValueError("calibrate: every token is padding; no statistics")
    if backward and loss_tokens == 0:
        raise ValueError("calibrate: no position has a next-token label (windows of length 1?); C_g is undefined")
    out = Statistics(input_key=input_key, tokens=tokens, loss_tokens=loss_tokens if backward else 0,
                     windows=int(ids.shape[0]), fisher=fisher, dtype=dtype, fingerprint=fingerprint)
    keys = list(accs)
    for k in tqdm(keys, desc="obdk calibrate [reduce+normalise" + ("+offload]" if offload else "]"),
                  disable=not progress, leave=False):
        t = accs.pop(k)
        dist.all_reduce_sum_([t])
        kind, name = k.split("/", 1)
        if kind == "cx":
            t.div_(tokens)
        elif kind == "cg":
            t.div_(loss_tokens)
        if offload and t.device.type != "cpu":
            t = t.to("cpu")
        getattr(out, kind)[name] = t
    for s in (slots.values()):
        s.cg = s.grad = None
        s.group.cx = None

    if cache is not None:
        if rank == 0:
            entry = cache.store(key, out)
            log.info("calibrate: statistics cached at %s", entry)
        cache.drop_partial(key, rank, world)
        dist.barrier()
    return out


def _place(st: Statistics, linears: dict[str, nn.Linear], groups) -> Statistics:
    """Move cached statistics onto the devices a fresh run would have used (each module's)."""
    dev_of = {name: m.weight.device for name, m in linears.items()}
    for g in groups:
        if g.key in st.cx:
            st.cx[g.key] = st.cx[g.key].to(dev_of[g.names[0]])
    for kind in ("cg", "grad"):
        d = getattr(st, kind)
        for name in list(d):
            if name in dev_of:
                d[name] = d[name].to(dev_of[name])
    return st


def _trunk(model: nn.Module, linears: dict[str, nn.Linear]) -> nn.Module:
    """The sub-module that runs every targeted Linear without the LM head, else ``model``.

    A Hugging Face causal LM's ``base_model`` (``LlamaForCausalLM.model``) returns hidden
    states; skipping the ``[vocab, d]`` head saves ~19 % of SmolLM2-135M's forward FLOPs. Used
    only when it takes ``input_ids`` and contains every targeted Linear.
    """
    trunk = getattr(model, "base_model", None)
    if not isinstance(trunk, nn.Module) or trunk is model:
        return model
    try:
        params = inspect.signature(trunk.forward).parameters
    except (TypeError, ValueError):
        return model
    inside = {id(m) for m in trunk.modules()}
    if "input_ids" not in params or any(id(m) not in inside for m in linears.values()):
        return model
    return trunk


# Model types whose ``*ForCausalLM.forward`` computes ``logits = lm_head(base_model(...)[0])`` with
# nothing in between (no logit scaling; soft-capping only where the config sets it, checked below).
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


def plain_head(model: nn.Module, linears: dict[str, nn.Linear]) -> Optional[nn.Linear]:
    """The LM head when ``model``'s logits are exactly ``head(trunk(...)[0])``, else None.

    ``linears``: {name: module} of the modules whose gradients are wanted (they must all sit in the
    trunk, ``model.base_model``). Then a backward pass runs the trunk and forms the logits, the loss gradient and the
    head's input gradient one window at a time (:func:`head_backward`) instead of holding
    ``[B, T, vocab]`` logits, their fp32 copy and their gradient at once. Only for the model
    types in ``_PLAIN_HEAD_TYPES`` with no logit transform in their config, a plain ``nn.Linear``
    head outside the targeted Linears, and a trunk that :func:`_trunk` accepts.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or any(head is m for m in linears.values()):
        return None
    trunk = _trunk(model, linears)
    if trunk is model or any(head is m for m in trunk.modules()):
        return None
    return head


def head_backward(hidden: Tensor, head: nn.Linear, *, ids: Tensor, lab: Optional[Tensor],
                   windows: Sequence[int], fisher: str, seed: int) -> Tensor:
    """``∂L/∂hidden`` [B, T, d] of the sum-reduced next-token loss of ``head(hidden)``.

    ``hidden`` [B, T, d] (detached trunk output), ``ids`` [B, T], ``lab`` [B, T-1] (positions with
    a label) or None (all). One window at a time: logits [T-1, V] in the head's dtype, their
    softmax in fp32 or better, ``p - onehot(label)`` (zero on unlabelled positions), times the
    head's weight. Equal to autograd through ``F.cross_entropy(logits, reduction="sum")``; with
    ``fisher="true"`` the labels are drawn exactly as the full-logits path draws them (one
    ``torch.multinomial`` per window on the same probabilities, the same generator).
    """
    B, T, _ = hidden.shape
    grad = torch.zeros_like(hidden)
    w = head.weight
    rows = torch.arange(T - 1, device=hidden.device)
    for b, win in enumerate(windows):
        logits = F.linear(hidden[b, :-1], w, head.bias)  # [T-1, V]
        ldt = torch.promote_types(logits.dtype, torch.float32)
        p = torch.softmax(logits.to(ldt), dim=-1)
        del logits
        if fisher == "empirical":
            labels = ids[b, 1:].to(p.device)
        else:
            labels = torch.multinomial(p, 1, generator=_window_generator(seed, win, p.device)).squeeze(1)
        p[rows, labels] -= 1
        if lab is not None:
            p.mul_(lab[b].to(device=p.device, dtype=p.dtype)[:, None])
        grad[b, :-1] = p.to(w.dtype) @ w
        del p
    return grad


def _run_batch(model: nn.Module, ctx: CalibrationContext, group_states: Sequence[GroupState], *, ids: Tensor,
               mask: Optional[Tensor], windows: Sequence[int], backward: bool, fisher: str, seed: int,
               accepts_pos: bool, head: Optional[nn.Linear] = None) -> tuple[int, int]:
    """One forward (and backward) over ``ids`` [B, T]; returns ``(tokens, loss positions)``.

    ``head``: with ``backward``, ``model`` is the trunk and the loss runs through
    :func:`head_backward` (see :func:`plain_head`); None: ``model`` returns the logits.
    """
    B, T = ids.shape
    ctx.set_batch(mask, B * T)
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        valid = mask.bool()
        kwargs["attention_mask"] = mask
        if accepts_pos:  # positions count real tokens only, so a left-padded window sees the unpadded RoPE phases
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        n_tok = int(valid.sum())
        lab = valid[:, :-1] & valid[:, 1:]
    else:
        n_tok = B * T
        lab = None
    n_lab = int(lab.sum()) if lab is not None else B * (T - 1)
    if not backward:
        with torch.no_grad():
            model(**kwargs)
        for gs in group_states:
            gs.check_complete()
        return n_tok, n_lab
    if head is not None:
        with torch.enable_grad():
            out = model(**kwargs)
            for gs in group_states:
                gs.check_complete()
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            del out
            with torch.no_grad():
                grad = head_backward(hidden.detach(), head, ids=ids, lab=lab, windows=windows, fisher=fisher,
                                      seed=seed)
            hidden.backward(grad)
        return n_tok, n_lab
    with torch.enable_grad():
        out = model(**kwargs)
        for gs in group_states:
            gs.check_complete()
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, :-1]
        if fisher == "empirical":
            labels = ids[:, 1:].to(logits.device)
        else:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
                labels = torch.stack([
                    torch.multinomial(probs[b], 1, generator=_window_generator(seed, w, probs.device)).squeeze(1)
                    for b, w in enumerate(windows)])
                del probs
        if lab is not None:
            labels = labels.masked_fill(~lab.to(labels.device), -100)
        ldt = torch.promote_types(logits.dtype, torch.float32)  # 16-bit logits: loss in fp32; fp64 stays fp64
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(ldt), labels.reshape(-1),
                               reduction="sum", ignore_index=-100)
        del out, logits
        loss.backward()
    return n_tok, n_lab
