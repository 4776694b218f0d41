"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, offline on local task data.

:func:`zeroshot` wraps an in-memory model (dense or obdk-compressed) in the harness's ``HFLM``
and runs its task definitions (prompts, answer choices, metrics, seeds) unchanged. Only where
the data come from can change:

* a *leaf* task ``T`` for which ``<data_dir>/zeroshot/T/validation`` exists (a split saved
  with ``datasets.Dataset.save_to_disk``) is loaded from that folder: obdk writes a one-file
  task YAML that ``include:``\\ s the harness's own YAML for ``T`` and overrides only the data
  source (``dataset_path: arrow``, ``dataset_kwargs.data_files``) and the split to score
  (``validation``; ARC's default is *test*, so the result says ``split: "validation"``);
* any other task, group or tag goes through the harness's normal loading (the HF hub, or its
  cache when ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set). A tag such as ``ai2_arc`` is
  expanded into its tasks first, so those use local data too.

``data_dir`` defaults to ``$OBDK_DATA_DIR``, else ``../shared/data`` beside the repository
when it exists. The shared data hold the validation splits of ``arc_easy``,
``arc_challenge``, ``piqa``, ``hellaswag`` and ``winogrande`` (:data:`LOCAL_TASKS`).

Errors (all :class:`obdk.errors.ObdkError`): an unknown task name is a
:class:`~obdk.errors.ConfigError` naming it (with close matches); a task whose data are not
local and cannot be loaded (offline, or any load failure) is a
:class:`~obdk.errors.DatasetNotFoundError` naming the task, the local folder looked at and
the harness's dataset. lm_eval itself is the optional extra ``pip install 'obdk[eval]'``.

The harness's own CLI on an obdk checkpoint: ``python -m obdk.lm_eval <lm_eval args>`` (see
:mod:`obdk.lm_eval`).
"""
from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, DatasetNotFoundError, ObdkError

log = logging.getLogger(__name__)

__all__ = ["zeroshot", "LOCAL_TASKS", "CHANCE", "parse_tasks", "check_tasks", "local_task_dir", "local_task_yamls",
           "format_table", "json_summary", "mean_accuracy", "cli_eval"]

#: the tasks whose validation splits the shared data hold
LOCAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande")
#: accuracy of a uniform guess (1 / number of choices)
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5}
#: folders of lm_eval/tasks/ that define LOCAL_TASKS: indexing only these takes milliseconds,
#: the whole task tree (~15k entries) about 10 s, which is paid only for other names
_HARNESS_DIRS = ("arc", "piqa", "hellaswag", "winogrande")
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_REPO = Path(__file__).resolve().parents[1]
#: lm_eval's evaluator seeds (its defaults), fixed here so every call is reproducible
#: Requests per forward by default. Measured (benchmarks/bench_zeroshot_batch.py, zeroshot_batch.csv:
#: SmolLM2-135M, piqa/arc_easy/hellaswag, 200 documents each, 2-core CPU): batch 8 scored 2,001
#: requests 2.3x faster than batch 1, and faster than 32 and lm-eval's "auto" (which spends minutes
#: detecting 64 on a CPU), with the same accuracies as batch 1 on every task.
DEFAULT_BATCH_SIZE = 8

SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


# --------------------------------------------------------------------------- names, data


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise ConfigError("zero-shot evaluation (--tasks/--eval-tasks) needs EleutherAI's lm-evaluation-harness: "
                          f"pip install 'obdk[eval]' (lm_eval>=0.4.13); importing it failed: {exc}") from exc
    return lm_eval


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"arc_easy, piqa"`` or ``["arc_easy", "piqa"]`` → ``["arc_easy", "piqa"]`` (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for t in items:
        if not isinstance(t, str):
            raise ConfigError(f"tasks: {t!r} is not a task name")
        t = t.strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise ConfigError(f"tasks={tasks!r} names no task (comma-separated lm-eval task names, e.g. arc_easy,piqa)")
    return out


def _is_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)


def resolve_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``data_dir``, else ``$OBDK_DATA_DIR``, else ``<repo>/../shared/data`` if it exists."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DatasetNotFoundError(f"data_dir={os.fspath(data_dir)!r} is not a directory")
        return p
    env = os.environ.get("OBDK_DATA_DIR", "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DatasetNotFoundError(f"OBDK_DATA_DIR={env!r} is not a directory")
        return p
    p = _REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


def _looked_at(task: str, root: Path | None) -> str:
    return str(root / "zeroshot" / task / "validation") if root is not None else \
        "<no data dir: --data-dir/OBDK_DATA_DIR unset>/zeroshot/" + task + "/validation"


def local_task_dir(task: str, root: Path | None) -> Path | None:
    """``<root>/zeroshot/<task>/validation`` when it holds a saved split (``*.arrow`` files), else None."""
    if root is None:
        return None
    d = root / "zeroshot" / task / "validation"
    if not d.is_dir():
        return None
    if not sorted(d.glob("*.arrow")):
        raise DatasetNotFoundError(f"zero-shot task {task!r}: {d} exists but holds no .arrow file "
                                   "(expected a split saved with datasets.Dataset.save_to_disk)")
    return d


@functools.lru_cache(maxsize=2)
def _task_manager(full: bool):
    """lm_eval's TaskManager over the folders of LOCAL_TASKS (fast) or over every task (``full``)."""
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager
    if full:
        return TaskManager()
    base = Path(lm_eval.__file__).parent / "tasks"
    return TaskManager(include_defaults=False, include_path=[str(base / d) for d in _HARNESS_DIRS if (base / d).is_dir()])


def _entry(name: str):
    """(TaskManager that knows ``name``, its index entry), or a ConfigError naming it."""
    for full in (False, True):
        tm = _task_manager(full)
        if name in tm.task_index:
            return tm, tm.task_index[name]
    close = difflib.get_close_matches(name, _task_manager(True).all_tasks, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown lm-eval task {name!r} (not a task, group or tag of lm_eval "
                      f"{_import_lm_eval().__version__}){hint}")


def _kind(entry) -> str:
    return getattr(getattr(entry, "kind", None), "name", "TASK")


def _expand(names: Sequence[str]) -> list[str]:
    """Tags become their member tasks (sorted); tasks and groups stay (unknown names: ConfigError)."""
    out: list[str] = []
    for n in names:
        _, e = _entry(n)
        members = sorted(e.tags) if _kind(e) == "TAG" else [n]
        for m in members:
            if m not in out:
                out.append(m)
    return out


def check_tasks(tasks: str | Iterable[str], *, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Validate ``tasks`` without loading any data or model: lm_eval importable, every name a task, group or
    tag of the harness (else :class:`~obdk.errors.ConfigError`), ``data_dir`` a directory. Returns the names
    with tags expanded into their tasks."""
    names = parse_tasks(tasks)
    _import_lm_eval()
    resolve_root(data_dir)
    with _quiet(True):
        return _expand(names)


def _yaml_text(task: str, base_yaml: Path, data: Path) -> str:
    files = [str(f) for f in sorted(data.glob("*.arrow"))]
    lines = [f"include: {str(base_yaml)!r}", f"task: {task}", "dataset_path: arrow", "dataset_name: null",
             "dataset_kwargs:", "  data_files:", "    validation:"]
    lines += [f"      - {f!r}" for f in files]
    # score the local split; few-shot examples (num_fewshot > 0) come from the same split, the
    # scored document excluded (the harness excludes it when fewshot and test split coincide)
    lines += ["training_split: null", "validation_split: null", "test_split: validation",
              "fewshot_split: validation"]
    return "\n".join(lines) + "\n"


def local_task_yamls(tasks: Sequence[str], data_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> dict:
    """Write, for each of ``tasks`` with local data, ``<out_dir>/<task>.yaml`` (the harness's task
    pointed at the local split); returns ``{task: yaml_path}``. Used by :mod:`obdk.lm_eval` as an
    ``--include_path`` for the harness's own CLI."""
    root = resolve_root(data_dir)
    out = {}
    for t in tasks:
        d = local_task_dir(t, root)
        if d is None:
            continue
        _, e = _entry(t)
        if _kind(e) not in ("TASK",) or e.yaml_path is None:
            continue
        p = Path(out_dir) / f"{t}.yaml"
        p.write_text(_yaml_text(t, Path(e.yaml_path), d))
        out[t] = p
    return out


@contextmanager
def _quiet(progress: bool):
    """lm_eval and datasets log a warning per task for things obdk does on purpose; keep them at
    ERROR unless obdk logs at INFO. Datasets' own progress bars follow ``progress``."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if not log.isEnabledFor(logging.INFO):
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    import datasets
    bars = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars and not progress:
            datasets.enable_progress_bars()


def _load_tasks(name: str, root: Path | None, tmp: Path) -> list[tuple[Any, dict]]:
    """Build the harness's Task objects for ``name``: [(task, {"name", "source", "split"})]."""
    tm, e = _entry(name)
    local = local_task_dir(name, root) if _kind(e) == "TASK" and e.yaml_path is not None else None
    if local is not None:
        spec = tmp / f"{name}.yaml"
        spec.write_text(_yaml_text(name, Path(e.yaml_path), local))
        source = f"local:{local}"
    else:
        spec = name
    try:
        loaded = tm.load([str(spec)])
    except ObdkError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if local is not None:
            raise DatasetNotFoundError(f"zero-shot task {name!r}: loading the local split {local} failed "
                                       f"({type(exc).__name__}: {first})") from exc
        hub = _dataset_path(e)
        offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
        why = f"{'/'.join(offline)} is set and it is not in the HF cache" if offline else "loading it failed"
        raise DatasetNotFoundError(
            f"zero-shot task {name!r}: no local data at {_looked_at(name, root)}, and the harness's dataset "
            f"{hub or '(see its task YAML)'}: {why} ({type(exc).__name__}: {first})") from exc
    out = []
    for tname, task in loaded["tasks"].items():
        cfg = task.config
        split = cfg.test_split or cfg.validation_split
        src = source if local is not None else f"lm_eval:{cfg.dataset_path}" + (
            f"/{cfg.dataset_name}" if cfg.dataset_name else "")
        out.append((task, {"name": tname, "source": src, "split": split}))
    return out


def _evaluate(lm, task, name: str, *, num_fewshot: int, limit: int | None) -> dict:
    """One task through ``lm_eval.evaluator.evaluate`` with what ``simple_evaluate`` would set first:
    its seeds (:data:`SEEDS`), the task's ``num_fewshot`` (unless its YAML pins 0) and few-shot seed.
    (``simple_evaluate`` itself also collects the environment, ``pip list`` included: 3 s a call.)"""
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(SEEDS["random_seed"])
    np.random.seed(SEEDS["numpy_random_seed"])
    set_torch_seed(SEEDS["torch_random_seed"])
    if task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=SEEDS["fewshot_random_seed"])
    return evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}}, limit=limit,
                    bootstrap_iters=1000, log_samples=False)


def _dataset_path(entry) -> str | None:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
        return cfg.get("dataset_path") + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    except Exception:  # only for the message
        return None


# --------------------------------------------------------------------------- results


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _metrics(row: dict) -> dict:
    """``{"acc,none": .5, "acc_stderr,none": .1, ...}`` → ``{"acc": .5, "acc_stderr": .1}`` (first filter wins,
    ``none`` preferred)."""
    out: dict[str, float | None] = {}
    keys = sorted((k for k in row if "," in k), key=lambda k: (k.split(",", 1)[1] != "none", k))
    for k in keys:
        m = k.split(",", 1)[0]
        if m not in out:
            out[m] = _num(row[k])
    return out


# --------------------------------------------------------------------------- public API


def zeroshot(model, tokenizer, tasks: str | Iterable[str], *, limit: int | None = None,
             batch_size: int | str = DEFAULT_BATCH_SIZE,
             num_fewshot: int = 0, data_dir: str | os.PathLike | None = None, device=None,
             progress: bool = True) -> dict:
    """Zero-shot (or ``num_fewshot``-shot) accuracy of a causal LM through lm-evaluation-harness.

    ``model``: a ``transformers.PreTrainedModel`` (dense, or compressed in place by obdk: its
    ``LowRankLinear`` modules run as they are), in eval mode; ``tokenizer`` its tokenizer.
    ``tasks``: lm-eval task, group or tag names, a list or one comma-separated string
    (``"arc_easy,arc_challenge,piqa,hellaswag,winogrande"``). ``limit``: score only the first
    ``limit`` documents of each task (int ≥ 1; None = all). ``batch_size``: requests per forward
    (int ≥ 1, or ``"auto"`` for lm-eval's detection; default :data:`DEFAULT_BATCH_SIZE`, the
    fastest measured with the same accuracies as 1: a batch only pads the shorter requests). ``num_fewshot``: examples in each prompt (0 = zero-shot). ``data_dir``: the local
    data root holding ``zeroshot/<task>/validation`` (default ``$OBDK_DATA_DIR``, else
    ``../shared/data`` beside the repository). ``device``: move the model there first (default:
    where it is). ``progress``: progress bars (one per task: ``zero-shot <task>``, and the
    harness's own).

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "split",
    "source", "seconds", "available", "num_fewshot", "metrics"}}`` in the order asked (tags
    expanded into their tasks, groups into theirs): ``acc``/``acc_norm`` floats in [0, 1]
    (``acc_norm`` None where the task has none, e.g. winogrande), the ``*_stderr`` their standard
    errors (sample std / √n; None for n = 1), ``n`` the documents scored (int), ``available`` the
    split's size, ``split`` the split scored (``"validation"`` for local data), ``source``
    ``"local:<folder>"`` or ``"lm_eval:<hub dataset>"``, ``seconds`` the wall time of the task
    (loading and scoring), ``metrics`` every numeric metric the harness reported. Deterministic:
    the harness's seeds are fixed (:data:`SEEDS`).

    Raises :class:`~obdk.errors.ConfigError` for an unknown task name or bad argument (or when
    lm_eval is not installed) and :class:`~obdk.errors.DatasetNotFoundError` for a task whose data
    are neither local nor loadable.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                     and batch_size >= 1)):
        raise ConfigError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be a non-negative int, got {num_fewshot!r}")
    names = parse_tasks(tasks)
    _import_lm_eval()
    from tqdm.auto import tqdm
    root = resolve_root(data_dir)
    with _quiet(progress):
        names = _expand(names)  # unknown names fail here, before any work
        with tempfile.TemporaryDirectory(prefix="obdk-zeroshot-") as tmp:
            built = []  # every task's data first: a missing one fails before the model is touched
            for name in names:
                t0 = time.perf_counter()
                tasks_ = _load_tasks(name, root, Path(tmp))
                built += [(task, info, (time.perf_counter() - t0) / len(tasks_)) for task, info in tasks_]
        from lm_eval.models.huggingface import HFLM
        if device is not None:
            model = model.to(device)
        was_training = model.training
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results: dict[str, dict] = {}
        try:
            with tqdm(built, desc="zero-shot", unit="task", disable=not progress) as bar:
                for task, info, t_load in bar:
                    tname = info["name"]
                    bar.set_description(f"zero-shot {tname}")
                    t1 = time.perf_counter()
                    res = _evaluate(lm, task, tname, num_fewshot=num_fewshot, limit=limit)
                    row = res["results"][tname]
                    m = _metrics(row)
                    ns = res.get("n-samples", {}).get(tname, {})
                    results[tname] = {
                        "acc": m.get("acc"), "acc_stderr": m.get("acc_stderr"),
                        "acc_norm": m.get("acc_norm"), "acc_norm_stderr": m.get("acc_norm_stderr"),
                        "n": int(ns.get("effective", row.get("sample_len", 0))), "available": ns.get("original"),
                        "split": info["split"], "source": info["source"],
                        "seconds": time.perf_counter() - t1 + t_load, "num_fewshot": num_fewshot, "metrics": m,
                    }
                    log.info("zero-shot %s: acc %s acc_norm %s (n=%d, %s split, %.1f s)", tname, m.get("acc"),
                             m.get("acc_norm"), results[tname]["n"], info["split"], results[tname]["seconds"])
        finally:
            if was_training:
                model.train()
    return results


def mean_accuracy(results: dict, key: str = "acc") -> float | None:
    """Unweighted mean of ``key`` over the tasks that report it (acc_norm falls back to acc where a task
    has none, as papers average winogrande's acc with the others' acc_norm); None if none do."""
    vals = []
    for r in results.values():
        v = r.get(key)
        if v is None and key == "acc_norm":
            v = r.get("acc")
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def _pct(v, se=None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:5.1f} ± {100 * se:4.1f}" if se is not None else f"{100 * v:5.1f}       "


def format_table(results: dict, *, dense: dict | None = None) -> str:
    """A text table: task, split, n, acc ± stderr, acc_norm ± stderr (percent), seconds; the mean last.
    With ``dense`` (the same tasks on the dense model) two more columns give acc and acc_norm of the dense model."""
    head = f"{'task':<16} {'split':<10} {'n':>6}  {'acc %':>12}  {'acc_norm %':>12}  {'time':>7}"
    if dense:
        head += f"  {'dense acc':>9} {'dense norm':>10}"
    lines = [head]
    for t, r in results.items():
        line = (f"{t:<16} {str(r.get('split')):<10} {r['n']:>6}  {_pct(r['acc'], r['acc_stderr']):>12}  "
                f"{_pct(r['acc_norm'], r['acc_norm_stderr']):>12}  {r['seconds']:6.1f}s")
        if dense:
            d = dense.get(t, {})
            line += f"  {_pct(d.get('acc')).strip():>9} {_pct(d.get('acc_norm')).strip():>10}"
        lines.append(line)
    if len(results) > 1:
        line = (f"{'mean':<16} {'':<10} {'':>6}  {_pct(mean_accuracy(results, 'acc')):>12}  "
                f"{_pct(mean_accuracy(results, 'acc_norm')):>12}  {sum(r['seconds'] for r in results.values()):6.1f}s")
        if dense:
            line += (f"  {_pct(mean_accuracy(dense, 'acc')).strip():>9} "
                     f"{_pct(mean_accuracy(dense, 'acc_norm')).strip():>10}")
        lines.append(line)
    return "\n".join(lines)


def json_summary(results: dict) -> dict:
    """The JSON form of :func:`zeroshot`'s result: per task acc, acc_stderr, acc_norm, acc_norm_stderr, n, split,
    source, seconds (``metrics`` dropped), plus ``mean_acc``/``mean_acc_norm`` over the tasks."""
    keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "available", "split", "source", "seconds",
            "num_fewshot")
    return {"tasks": {t: {k: r.get(k) for k in keys} for t, r in results.items()},
            "mean_acc": mean_accuracy(results, "acc"), "mean_acc_norm": mean_accuracy(results, "acc_norm")}


def cli_eval(args, model, tokenizer) -> dict:
    """``obdk eval --tasks``: perplexity first when ``--dataset`` is also given, then zero-shot; prints
    the table (or, with ``--json``, nothing: the caller prints the returned object as its last line).

    Returns the JSON object: the perplexity keys (only with ``--dataset``), ``model`` and
    ``zeroshot`` (:func:`json_summary`)."""
    out: dict[str, Any] = {}
    if getattr(args, "dataset", None):
        from .eval import perplexity
        out.update(perplexity(model, tokenizer, args.dataset, seqlen=args.seqlen, windows=args.windows,
                              batch_size=1 if args.batch_size is None else args.batch_size, data_dir=args.data_dir, device=args.device))
        if not args.json:
            print(f"{args.model}: {out['dataset']} ppl {out['ppl']:.3f} ({out['windows']} windows × {out['seqlen']} "
                  f"tokens, {out['tokens']} tokens, {out['seconds']:.1f}s)")
    res = zeroshot(model, tokenizer, args.tasks, limit=args.limit,
                   batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
                   num_fewshot=args.num_fewshot, data_dir=args.data_dir, device=args.device)
    out["model"] = args.model
    out["zeroshot"] = json_summary(res)
    if not args.json:
        print(f"{args.model}: zero-shot accuracy (lm-evaluation-harness, {args.num_fewshot}-shot"
              f"{f', first {args.limit} per task' if args.limit else ''})")
        print(format_table(res))
    return out
