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

The container and its disk format are :mod:`obdk.calibrate.statistics`; how many bytes the
statistics take and how to slice a pass under a budget, :mod:`obdk.calibrate.memory`; the loss and
its backward, :mod:`obdk.calibrate.head`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..arguments import check_model
from ..errors import ConfigError, DataError, NonFiniteError, WrongTypeError
from ..models import accepts_position_ids, forward_kwargs, input_device, trunk
from ..stream import distributed as dist
from .cache import StatsCache, cache_key, data_fingerprint, model_fingerprint
from .function import CalibrationContext, CalibrationLinear, GroupState, ModuleSlot
from .head import head_backward, label_positions, loss_backward, plain_head  # noqa: F401
from .memory import _resolve_groups, stats_nbytes  # noqa: F401  (public here too)
from .statistics import _FISHER, STATS, Statistics

log = logging.getLogger(__name__)

__all__ = ["Statistics", "calibrate", "stats_nbytes", "STATS", "plain_head", "head_backward"]


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
        raise WrongTypeError(f"calibrate: data must be a LongTensor [N, T] or have .input_ids, got {type(data).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise DataError(f"calibrate: input_ids must be an integer tensor [N, T], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise DataError(f"calibrate: no calibration tokens (input_ids {tuple(ids.shape)})")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise DataError(f"calibrate: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        mask = mask.to(torch.int64)
        if bool((mask == 1).all()):
            mask = None
    return ids.to(torch.int64), mask, src


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
    check_model("calibrate", model)  # an nn.Module, no meta-device tensor (the first one named)
    want = _check_options(stats, fisher, dtype, batch_size, checkpoint_every, cache_dir)
    backward = "cg" in want or "grad" in want

    ids, mask, src = _windows(data)
    groups, linears = _resolve_groups(model, groups)
    _check_finite_weights(model)
    rank, world = dist.world()
    seed_used = int(seed) if (fisher == "true" and backward) else None

    fingerprint, data_fp, model_fp = calibration_fingerprint(model, linears, ids, mask, src, want=want, dtype=dtype,
                                                             fisher=fisher, seed=seed_used)
    cache = StatsCache(cache_dir) if cache_dir is not None else None
    key = cache_key(model_fp, data_fp, stats=want, fisher=fisher, dtype=dtype, seed=seed_used) if cache else None

    if cache is not None and dist.all_agree(cache.has(key)):
        log.info("calibrate: statistics cache hit %s (%s); the model is not run", key, cache.entry(key))
        hit = cache.load(key)
        return hit if offload else _place(hit, linears, groups)

    ctx = CalibrationContext()
    slots, accs, input_key = accumulators(groups, linears, want, dtype, ctx)
    nbytes = sum(t.numel() * t.element_size() for t in accs.values())
    mine = dist.shard(ids.shape[0], rank, world)
    log.info("calibrate: %d windows x %d tokens (rank %d/%d: %d), %d Linears in %d input groups, stats %s in %s "
             "(%.3f GiB), fisher=%s", ids.shape[0], ids.shape[1], rank, world, len(mine), len(linears), len(groups),
             "+".join(want), str(dtype).replace("torch.", ""), nbytes / 2**30, fisher)

    done, tokens, loss_tokens = 0, 0, 0
    if cache is not None and resume:
        done, tokens, loss_tokens = _resume(cache, key, rank, world, accs, len(mine))
    tokens, loss_tokens = _run_pass(model, ctx, slots, linears, accs, ids=ids, mask=mask, mine=mine, done=done,
                                    tokens=tokens, loss_tokens=loss_tokens, backward=backward, fisher=fisher,
                                    seed=seed, batch_size=int(batch_size), want=want, progress=progress,
                                    checkpoint=(cache, key, rank, world, checkpoint_every))
    out = reduce_statistics(accs, input_key, tokens=tokens, loss_tokens=loss_tokens, backward=backward,
                            windows=int(ids.shape[0]), fisher=fisher, dtype=dtype, fingerprint=fingerprint,
                            offload=offload, progress=progress)
    for s in slots.values():
        s.cg = s.grad = None
        s.group.cx = None

    if cache is not None:
        if rank == 0:
            entry = cache.store(key, out)
            log.info("calibrate: statistics cached at %s", entry)
        cache.drop_partial(key, rank, world)
        dist.barrier()
    return out


def _check_options(stats, fisher, dtype, batch_size, checkpoint_every=None, cache_dir=None, *,
                   fn: str = "calibrate") -> tuple[str, ...]:
    """The requested statistics, deduplicated in order; a ``ConfigError`` naming a bad option of ``fn``."""
    want = tuple(dict.fromkeys(stats))
    bad = [s for s in want if s not in STATS]
    if bad or not want:
        raise ConfigError(f"{fn}: stats must be a non-empty subset of {STATS}, got {tuple(stats)}")
    if fisher not in _FISHER:
        raise ConfigError(f"{fn}: fisher must be one of {_FISHER}, got {fisher!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"{fn}: dtype must be torch.float32 or torch.float64, got {dtype}")
    if int(batch_size) < 1:
        raise ConfigError(f"{fn}: batch_size must be >= 1, got {batch_size}")
    if checkpoint_every is not None and (cache_dir is None or int(checkpoint_every) < 1):
        raise ConfigError(f"{fn}: checkpoint_every={checkpoint_every} needs cache_dir and a positive count")
    return want


def calibration_fingerprint(model: nn.Module, linears: dict[str, nn.Linear], ids: Tensor, mask: Optional[Tensor],
                            src: Any, *, want: Sequence[str], dtype: torch.dtype, fisher: str,
                            seed: Optional[int]) -> tuple[dict, dict, dict]:
    """``(fingerprint, data fingerprint, model fingerprint)`` of a calibration over ``ids`` [N, T].

    ``fingerprint`` is what :class:`Statistics` records: the data, the model hash and name, the
    statistics, their dtype, the Fisher variant and the seed that drew true-Fisher labels (or None).
    """
    data_fp = data_fingerprint(ids, mask, src)
    model_fp = model_fingerprint(model, list(linears))
    fingerprint = {"data": data_fp, "model": model_fp["hash"], "model_name": model_fp["name_or_path"],
                   "stats": sorted(want), "dtype": str(dtype).replace("torch.", ""), "fisher": fisher,
                   "seed": seed}
    return fingerprint, data_fp, model_fp


def accumulators(groups, linears: dict[str, nn.Linear], want: Sequence[str], dtype: torch.dtype,
                 ctx: CalibrationContext, slots: Optional[dict[str, ModuleSlot]] = None
                 ) -> tuple[dict[str, ModuleSlot], dict[str, Tensor], dict[str, str]]:
    """Zeroed sums for ``want`` of every group, each on its own Linear's device.

    Returns ``(slots, accs, input_key)``: the calibration Function's per-module slots; the raw
    sums in forward order keyed ``"cx/<group key>"`` [n, n], ``"cg/<name>"`` [m, m],
    ``"grad/<name>"`` [m, n]; and module name → its group key. ``slots``: existing slots of (at least)
    these groups to fill instead of new ones (a streamed pass patches the model once and arms one decoder
    layer's groups at a time); the returned slots are then those.
    """
    fresh = slots is None
    slots = {} if fresh else slots
    accs: dict[str, Tensor] = {}
    input_key: dict[str, str] = {}
    for g in groups:
        first = linears[g.names[0]]
        dev = first.weight.device
        cx = torch.zeros(first.in_features, first.in_features, dtype=dtype, device=dev) if "cx" in want else None
        if cx is not None:
            accs[f"cx/{g.key}"] = cx
        if fresh:
            gs = GroupState(g.key, g.names, cx, ctx)
        else:
            gs = slots[g.names[0]].group
            gs.cx = cx
        for name in g.names:
            m = linears[name]
            cg = torch.zeros(m.out_features, m.out_features, dtype=dtype, device=m.weight.device) if "cg" in want else None
            gr = (torch.zeros(m.out_features, m.in_features, dtype=dtype, device=m.weight.device)
                  if "grad" in want else None)
            if cg is not None:
                accs[f"cg/{name}"] = cg
            if gr is not None:
                accs[f"grad/{name}"] = gr
            if fresh:
                slots[name] = ModuleSlot(name, gs, cg, gr)
            else:
                slots[name].cg, slots[name].grad = cg, gr
            input_key[name] = g.key
    return slots, accs, input_key


def _resume(cache, key: str, rank: int, world: int, accs: dict[str, Tensor], windows: int) -> tuple[int, int, int]:
    """Load a partial checkpoint into ``accs``; returns ``(windows done, tokens, loss tokens)``."""
    part = cache.load_partial(key, rank, world)
    if part is None:
        return 0, 0, 0
    tensors, meta = part
    if set(tensors) != set(accs):
        raise DataError(f"calibrate: partial checkpoint {cache.partial_path(key, rank, world)} holds "
                        f"other accumulators than this run; delete it or pass resume=False")
    for k, t in tensors.items():
        accs[k].copy_(t)
    log.info("calibrate: resuming from %s after %d of %d windows", cache.partial_path(key, rank, world),
             int(meta["done"]), windows)
    return int(meta["done"]), int(meta["tokens"]), int(meta["loss_tokens"])


def _run_pass(model, ctx, slots, linears, accs, *, ids, mask, mine, done, tokens, loss_tokens, backward, fisher,
              seed, batch_size, want, progress, checkpoint) -> tuple[int, int]:
    """The windows ``mine[done:]`` through the patched model; returns the updated ``(tokens, loss tokens)``."""
    cache, key, rank, world, checkpoint_every = checkpoint
    # a forward-only pass (C_x alone) needs no logits: run the trunk without the LM head; a backward
    # pass runs the trunk too when the head is a plain Linear, and the head + loss one window at a time
    head = plain_head(model, linears) if backward else None
    runner = trunk(model, linears) if (head is not None or not backward) else model
    accepts_pos = accepts_position_ids(runner)
    group_states = list({id(s.group): s.group for s in slots.values()}.values())
    in_dev = input_device(model)
    anchor = torch.zeros(0, device=in_dev, requires_grad=True)
    from tqdm.auto import tqdm
    patch = _Patch(model, slots, linears, anchor)
    try:
        with ctx.defer_symmetry(), tqdm(total=len(mine), initial=done, desc=f"obdk calibrate [{'+'.join(want)}]",
                                        unit="window", disable=not progress, leave=False) as bar:
            last_ckpt = done
            while done < len(mine):
                idx = mine[done:done + batch_size]
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
    return tokens, loss_tokens


def reduce_statistics(accs: dict[str, Tensor], input_key: dict[str, str], *, tokens: int, loss_tokens: int,
                      backward: bool, windows: int, fisher: str, dtype: torch.dtype, fingerprint: dict,
                      offload: bool = False, progress: bool = True) -> Statistics:
    """Sums → :class:`Statistics`: all-reduced across ranks, ``C_x`` / ``tokens``, ``C_g`` / ``loss_tokens``.

    ``accs`` (see :func:`accumulators`) is emptied as it goes, one tensor at a time, so the
    result never needs a second copy; ``offload`` moves each to host memory.
    """
    like = next(iter(accs.values()))
    tokens, loss_tokens = dist.all_reduce_counts([tokens, loss_tokens], like=like)
    if tokens == 0:
        raise DataError("calibrate: every token is padding; no statistics")
    if backward and loss_tokens == 0:
        raise DataError("calibrate: no position has a next-token label (windows of length 1?); C_g is undefined")
    out = Statistics(input_key=input_key, tokens=tokens, loss_tokens=loss_tokens if backward else 0,
                     windows=windows, fisher=fisher, dtype=dtype, fingerprint=fingerprint)
    move_normalised(out, accs, combine=lambda key, t: dist.all_reduce_sum_([t]), offload=offload, progress=progress,
                    desc="obdk calibrate [reduce+normalise" + ("+offload]" if offload else "]"))
    return out


def move_normalised(out: Statistics, accs: dict[str, Tensor], *, combine: Callable[[str, Tensor], None],
                    keep: Callable[[str], bool] = lambda key: True, offload: bool = False, progress: bool = False,
                    desc: str = "") -> None:
    """Move every raw sum of ``accs`` (keyed ``"cx/<group key>"``, ``"cg/<name>"``, ``"grad/<name>"``, see
    :func:`accumulators`) into ``out``, one tensor at a time and in order: combined across ranks first
    (``combine(key, t)``, in place: every rank calls it for every key), then, where ``keep(key)``, normalised by
    ``out``'s normalisers (``C_x`` / ``out.tokens``, ``C_g`` / ``out.loss_tokens``, ``∂L/∂W`` summed) and stored
    (on the host with ``offload``); a sum not kept is dropped. ``accs`` is emptied."""
    from tqdm.auto import tqdm
    for k in tqdm(list(accs), desc=desc, disable=not progress, leave=False):
        t = accs.pop(k)
        combine(k, t)
        if not keep(k):
            continue
        kind, name = k.split("/", 1)
        if kind == "cx":
            t.div_(out.tokens)
        elif kind == "cg":
            t.div_(out.loss_tokens)
        if offload and t.device.type != "cpu":
            t = t.to("cpu")
        getattr(out, kind)[name] = t


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


def _run_batch(model: nn.Module, ctx: CalibrationContext, group_states: Sequence[GroupState], *, ids: Tensor,
               mask: Optional[Tensor], windows: Sequence[int], backward: bool, fisher: str, seed: int,
               accepts_pos: bool, head: Optional[nn.Linear] = None) -> tuple[int, int]:
    """One forward (and backward) over ``ids`` [B, T]; returns ``(tokens, loss positions)``.

    ``head``: with ``backward``, ``model`` is the trunk and the loss runs through
    :func:`~obdk.calibrate.head.head_backward` (see :func:`~obdk.calibrate.head.plain_head`);
    None: ``model`` returns the logits. The gradients flow into the calibration Function's
    ``C_g`` accumulators (:func:`~obdk.calibrate.head.loss_backward`).
    """
    B, T = ids.shape
    ctx.set_batch(mask, B * T)
    lab = label_positions(mask)
    n_tok = int(mask.bool().sum()) if mask is not None else B * T
    n_lab = int(lab.sum()) if lab is not None else B * (T - 1)

    def check() -> None:
        for gs in group_states:
            gs.check_complete()

    if backward:
        loss_backward(model, head, ids=ids, mask=mask, windows=windows, fisher=fisher, seed=seed,
                      accepts_pos=accepts_pos, after_forward=check)
    else:
        with torch.no_grad():
            model(**forward_kwargs(ids, mask, accepts_pos))
        check()
    return n_tok, n_lab


def _check_finite_weights(model: nn.Module) -> None:
    """Name the first parameter (in forward order) holding NaN/inf, before a pass spreads it.

    A NaN weight in layer 1 flows back through the backward pass into every earlier layer's
    ``C_g``; checked here (one reduction per tensor), the error names where it first appears.
    """
    from ..finite import all_finite
    for name, p in model.named_parameters():
        if p.is_floating_point() and not all_finite(p.detach()):
            raise NonFiniteError(f"calibrate: parameter {name} {tuple(p.shape)} holds NaN/inf values; "
                                 f"fix or reload the model before compressing it")
