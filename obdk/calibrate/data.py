"""Text corpora and calibration windows.

Sources
-------
A *source* is one of:

- a named dataset ``NAME[:SPLIT]``: ``wikitext2`` (splits ``train``, ``validation``
  (alias ``valid``), ``test``) or ``c4`` (splits ``validation``, and ``train``
  from the hub only);
- a local file: ``.txt``/``.raw`` (read verbatim), ``.jsonl`` (a ``text`` field
  per line), ``.parquet`` (a ``text`` column; needs pyarrow);
- a ``list[str]`` of documents;
- a tensor of token ids: LongTensor ``[N]`` (one stream) or ``[B, T]``;
- the ``(text, info)`` pair that :func:`load_text` returns.

Named datasets are read from a local data directory: the ``data_dir`` argument,
else ``$OBDK_DATA_DIR``, laid out as::

    wikitext-2-raw/wiki.{train,valid,test}.raw
    c4-validation-sample/c4_validation_2k.jsonl   (or .parquet)

and otherwise from the Hugging Face hub with ``datasets.load_dataset`` (skipped
when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set). Errors say which local
paths were looked at and why the hub failed.

Text assembly
-------------
- WikiText-2: HF rows (each line with its ``"\\n"`` kept, whitespace-only lines
  become ``""``) joined with ``"\\n\\n"`` -- the standard recipe
  (``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1")["text"])``); the
  local raw files and the hub give the same text.
- C4 and ``.jsonl``/``.parquet``: documents joined with ``doc_sep`` (default
  ``"\\n\\n"``). The GPTQ/SparseGPT/SVD-LLM C4 *perplexity* instead uses the
  first 1,100 documents of ``en/c4-validation.00000-of-00008.json.gz`` joined
  with ``" "``: ``load_text("c4", doc_sep=" ", max_docs=1100)`` against the hub
  shard. The local 2,000-document sample is not known to be that shard's head,
  so use it for relative comparisons only.
- ``.txt``/``.raw`` files are read verbatim (a local ``wiki.test.raw`` given as a
  path is *not* re-assembled; name ``wikitext2:test`` for the standard recipe).

Calibration windows
-------------------
:func:`get_calibration_windows` tokenises the text once and draws ``nsamples``
windows of ``seqlen`` tokens at uniformly random start offsets from a
``torch.Generator`` seeded with ``seed`` (GPTQ-style sampling from the
concatenated stream). Without an explicit split, calibration on ``wikitext2``
uses ``train``; ``c4`` uses ``validation``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from ..errors import DataError, DatasetNotFoundError, MissingFileError, WrongTypeError  # noqa: F401

log = logging.getLogger(__name__)

DATA_DIR_ENV = "OBDK_DATA_DIR"
#: sampling scheme id, part of every fingerprint (bump when window drawing changes)
SAMPLER = "uniform-start/torch.Generator/v1"


@dataclass(frozen=True)
class _Dataset:
    """A named corpus: local files per split (relative to the data dir) and the hub recipe per split."""
    local: dict[str, tuple[str, ...]]
    hub: dict[str, tuple[tuple, dict]]
    kind: str  # "wikitext" (line rows) or "docs" (documents)
    eval_split: str
    calib_split: str


DATASETS: dict[str, _Dataset] = {
    "wikitext2": _Dataset(
        local={"train": ("wikitext-2-raw/wiki.train.raw",),
               "validation": ("wikitext-2-raw/wiki.valid.raw",),
               "test": ("wikitext-2-raw/wiki.test.raw",)},
        hub={s: (("wikitext", "wikitext-2-raw-v1"), {"split": s}) for s in ("train", "validation", "test")},
        kind="wikitext", eval_split="test", calib_split="train"),
    "c4": _Dataset(
        local={"validation": ("c4-validation-sample/c4_validation_2k.jsonl",
                              "c4-validation-sample/c4_validation_2k.parquet")},
        hub={"validation": (("allenai/c4",), {"data_files": "en/c4-validation.00000-of-00008.json.gz", "split": "train"}),
             "train": (("allenai/c4",), {"data_files": "en/c4-train.00000-of-01024.json.gz", "split": "train"})},
        kind="docs", eval_split="validation", calib_split="validation"),
}
_NAME_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2": "wikitext2", "wiki2": "wikitext2",
                 "c4": "c4"}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_TEXT_SUFFIXES = (".txt", ".raw")
_DOC_SUFFIXES = (".jsonl", ".parquet")

Source = Union[str, os.PathLike, Sequence[str], Tensor, tuple]


# DatasetNotFoundError lives in obdk.errors (one base, ObdkError); re-exported here.


# --------------------------------------------------------------------------- text


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: ``data_dir``, else ``$OBDK_DATA_DIR``, else None.

    Raises ``FileNotFoundError`` when the one given does not exist (naming the
    argument or the environment variable).
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise MissingFileError(f"data_dir={os.fspath(data_dir)!r} is not a directory")
        return p
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise MissingFileError(f"{DATA_DIR_ENV}={env!r} is not a directory")
        return p
    return None


def parse_dataset(spec: str) -> tuple[str, str | None] | None:
    """``"wikitext2:test"`` -> ``("wikitext2", "test")``; ``"c4"`` -> ``("c4", None)``.

    Returns None when the name part is not a known dataset. Raises ``ValueError``
    for a known dataset with an unknown split, listing its splits.
    """
    name, _, split = spec.strip().partition(":")
    key = _NAME_ALIASES.get(name.strip().lower())
    if key is None:
        return None
    if not split:
        return key, None
    s = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    known = sorted(set(DATASETS[key].local) | set(DATASETS[key].hub))
    if s not in known:
        raise DataError(f"dataset {key!r} has no split {split!r}; available splits: {', '.join(known)}")
    return key, s


def hub_offline(*, datasets: bool = False) -> bool:
    """True when the environment forbids hub access (read at call time, not import time): ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set (``1``/``on``/``yes``/``true``), and for ``datasets`` also ``HF_DATASETS_OFFLINE``.
    The one copy: :mod:`obdk.hub` (models, tokenizers) asks it too."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE") for var in names)


def _hub_texts(name: str, split: str) -> list[str]:
    """Rows of the ``text`` column from the hub (tests monkeypatch this)."""
    if hub_offline(datasets=True):
        raise ConnectionError("hub access disabled (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)")
    import datasets
    args, kwargs = DATASETS[name].hub[split]
    ds = datasets.load_dataset(*args, **kwargs)
    return list(ds["text"])


def _wikitext_rows(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def _read_docs(path: Path) -> list[str]:
    """Documents of a ``.jsonl`` (``text`` field per line) or ``.parquet`` (``text`` column) file."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"{path}: reading .parquet needs pyarrow (or use the .jsonl)") from exc
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [str(t) for t in table.column("text").to_pylist()]
    docs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            docs.append(obj["text"])
    return docs


def _join_docs(docs: Sequence[str], doc_sep: str, max_docs: int | None) -> str:
    if max_docs is not None:
        if max_docs <= 0:
            raise DataError(f"max_docs must be positive, got {max_docs}")
        docs = docs[:max_docs]
    return doc_sep.join(docs)


def _load_named(name: str, split: str, data_dir: str | os.PathLike | None, doc_sep: str,
                max_docs: int | None) -> tuple[str, dict]:
    ds = DATASETS[name]
    root = resolve_data_dir(data_dir)
    looked: list[str] = []
    where = (f"data_dir={os.fspath(data_dir)!r}" if data_dir is not None
             else f"${DATA_DIR_ENV}" if root is not None else None)
    info: dict[str, Any] = {"dataset": name, "split": split}
    rows = path = None
    if root is not None:
        for rel in ds.local.get(split, ()):
            cand = root / rel
            if cand.suffix == ".parquet":
                try:
                    import pyarrow  # noqa: F401
                except ImportError:
                    looked.append(f"{cand} (skipped: no pyarrow)")
                    continue
            if cand.is_file():
                path = cand
                break
            looked.append(str(cand))
        if path is not None:
            rows = _wikitext_rows(path) if ds.kind == "wikitext" else _read_docs(path)
            info.update(path=str(path.resolve()), origin="local")
    if rows is None:
        try:
            rows = _hub_texts(name, split)
        except Exception as exc:  # ConnectionError, DatasetNotFoundError, ValueError (unknown split), ...
            hub_err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            local_note = ("looked at " + ", ".join(looked) if looked
                          else f"no local data directory (pass data_dir= or set ${DATA_DIR_ENV})" if root is None
                          else f"{where} has no file for this split")
            avail = [s for s, rels in ds.local.items() if root is not None and any((root / r).is_file() for r in rels)]
            raise DatasetNotFoundError(
                f"{name}:{split} not found: {local_note}; the Hugging Face hub was unreachable ({hub_err}). "
                f"Splits available locally: {', '.join(sorted(avail)) or 'none'}; "
                f"known splits: {', '.join(sorted(set(ds.local) | set(ds.hub)))}") from exc
        args, kwargs = ds.hub[split]
        info.update(path="hf://datasets/" + "/".join(args) + (f"/{kwargs['data_files']}" if "data_files" in kwargs else "")
                    + f"[{kwargs['split']}]", origin="hub")
    if ds.kind == "wikitext":
        text = "\n\n".join(rows)
        info["rows"] = len(rows)
    else:
        text = _join_docs(rows, doc_sep, max_docs)
        info.update(docs=min(len(rows), max_docs or len(rows)), doc_sep=doc_sep, max_docs=max_docs)
    if not text.strip():
        raise DataError(f"{name}:{split} from {info['path']} is empty")
    return text, info


def _load_file(path: Path, doc_sep: str, max_docs: int | None) -> tuple[str, dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a file, or a dataset name with data_dir={str(path)!r}")
    if suffix not in _TEXT_SUFFIXES + _DOC_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                         f"use one of {', '.join(_TEXT_SUFFIXES + _DOC_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    info: dict[str, Any] = {"dataset": "file", "split": None, "path": str(path.resolve()), "origin": "file"}
    try:
        if suffix in _TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
        else:
            docs = _read_docs(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); calibration and evaluation "
                        f"files must be UTF-8 text or JSON lines") from None
    if suffix not in _TEXT_SUFFIXES:
        text = _join_docs(docs, doc_sep, max_docs)
        info.update(docs=min(len(docs), max_docs or len(docs)), doc_sep=doc_sep, max_docs=max_docs)
    if not text.strip():
        raise DataError(f"{path} has no text (only whitespace or no documents)")
    return text, info


def load_text(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
              split: str | None = None, doc_sep: str = "\n\n", max_docs: int | None = None,
              default_split: str = "eval") -> tuple[str, dict]:
    """Load a corpus as one string.

    ``name_or_path``: ``NAME[:SPLIT]`` (``wikitext2``, ``c4``) or a ``.txt``/``.raw``/
    ``.jsonl``/``.parquet`` file. ``split`` may be given separately (it must agree
    with one in the name). Without a split, ``default_split="eval"`` picks the
    perplexity split (wikitext2: test, c4: validation) and ``"calib"`` the
    calibration split (wikitext2: train, c4: validation). ``doc_sep``/``max_docs``
    apply to document corpora (c4, jsonl, parquet).

    Returns ``(text, info)`` with ``info = {"dataset", "split", "path", "origin",
    "chars", "text_sha256", ...}``. Raises ``FileNotFoundError`` for a missing file,
    :class:`DatasetNotFoundError` for a split neither local nor on the hub,
    ``ValueError`` for an unknown dataset/split, an empty file or bad JSONL.
    """
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    parsed = parse_dataset(s) if os.sep not in s else None  # a known name wins over a same-named cwd entry
    if parsed is None:
        if not p.exists():
            if os.sep in s or p.suffix:
                raise MissingFileError(f"dataset file {p.resolve()} does not exist")
            raise DataError(f"unknown dataset {s!r}; named datasets: {', '.join(DATASETS)} "
                             f"(NAME[:SPLIT]), or the path of a {'/'.join(_TEXT_SUFFIXES + _DOC_SUFFIXES)} file")
        if split is not None:
            raise DataError(f"split={split!r} given for the file {p}; splits apply to named datasets only")
        text, info = _load_file(p, doc_sep, max_docs)
    else:
        name, sp = parsed
        if split is not None:
            other = parse_dataset(f"{name}:{split}")[1]
            if sp is not None and sp != other:
                raise DataError(f"dataset {s!r} names split {sp!r} but split={split!r} was given")
            sp = other
        if sp is None:
            if default_split not in ("eval", "calib"):
                raise DataError(f"default_split must be 'eval' or 'calib', got {default_split!r}")
            sp = DATASETS[name].eval_split if default_split == "eval" else DATASETS[name].calib_split
        text, info = _load_named(name, sp, data_dir, doc_sep, max_docs)
    info["chars"] = len(text)
    info["text_sha256"] = sha256_text(text)
    log.info("loaded %s%s from %s: %d characters", info["dataset"], f":{info['split']}" if info["split"] else "",
             info["path"], len(text))
    return text, info


# --------------------------------------------------------------------------- tokens


def tokenize_text(text: str, tokenizer: Any) -> Tensor:
    """Tokenise a whole corpus once: LongTensor ``[N]``.

    Special tokens are added as the tokenizer does by default (a BOS at the start
    for Llama tokenizers, none for GPT-2-style ones), as in the standard recipe.
    The "sequence longer than model_max_length" warning is suppressed
    (``verbose=False``): long streams are cut into windows afterwards.
    """
    if tokenizer is None:
        raise DataError("a tokenizer is needed to tokenise text")
    enc = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False, return_attention_mask=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def check_token_ids(ids: Tensor, what: str) -> Tensor:
    """Validate token ids (integer tensor, [N] or [B, T], non-negative) and return them as CPU int64."""
    if not isinstance(ids, Tensor):
        raise WrongTypeError(f"{what}: expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise WrongTypeError(f"{what}: token ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise DataError(f"{what}: token ids must be [N] or [B, T], got shape {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise DataError(f"{what}: negative token id {int(ids.min())}")
    return ids.to(torch.long).cpu()


def _ids_sha256(ids: Tensor) -> str:
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.contiguous().numpy().tobytes())
    return h.hexdigest()


def _tok_hash(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    from .fingerprint import tokenizer_hash
    return tokenizer_hash(tokenizer)


def _label(info: dict) -> str:
    if info.get("split"):
        return f"{info['dataset']}:{info['split']}"
    return info.get("path") or info["dataset"]


@dataclass
class CalibrationData:
    """Calibration windows.

    ``input_ids``: LongTensor ``[nsamples, seqlen]``. ``attention_mask``: LongTensor
    ``[nsamples, seqlen]`` with 0 on padding (list-of-documents input), or None when
    every position is real. ``fingerprint``: ``{dataset, split, path, nsamples,
    seqlen, seed, tokenizer_hash, text_sha256, sampler, kind, ...}``.
    """
    input_ids: Tensor
    attention_mask: Tensor | None
    fingerprint: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def fingerprint_key(self) -> str:
        """Short stable hash (16 hex chars) of :attr:`fingerprint`, for cache file names."""
        blob = json.dumps(self.fingerprint, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _random_windows(stream: Tensor, nsamples: int, seqlen: int, seed: int, label: str) -> Tensor:
    n = stream.numel()
    if n < seqlen:
        raise DataError(f"{label} has {n} tokens, fewer than one window of seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def _document_windows(docs: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int,
                      seed: int) -> tuple[Tensor, Tensor]:
    if len(docs) < nsamples:
        raise DataError(f"list of {len(docs)} documents: fewer than nsamples={nsamples}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(docs), generator=g)[:nsamples].tolist() if len(docs) > nsamples else list(range(nsamples))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    pad = 0 if pad is None else int(pad)
    ids = torch.full((nsamples, seqlen), pad, dtype=torch.long)
    mask = torch.zeros((nsamples, seqlen), dtype=torch.long)
    for row, i in enumerate(pick):
        if not isinstance(docs[i], str):
            raise WrongTypeError(f"document {i} of the list is a {type(docs[i]).__name__}, not str")
        toks = tokenizer(docs[i], add_special_tokens=True, truncation=True, max_length=seqlen,
                         verbose=False)["input_ids"]
        if len(toks) == 0:
            raise DataError(f"document {i} of the list tokenises to no tokens")
        ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[row, :len(toks)] = 1
    return ids, mask


def get_calibration_windows(source: Source, tokenizer: Any = None, *, nsamples: int = 32, seqlen: int = 512,
                            seed: int = 0, data_dir: str | os.PathLike | None = None) -> CalibrationData:
    """Draw calibration windows from ``source`` (see the module docstring for the kinds).

    - text (named dataset, file, ``(text, info)``) and 1-D id tensors: the stream is
      tokenised once and ``nsamples`` windows of ``seqlen`` tokens start at offsets
      drawn uniformly from ``[0, N - seqlen]`` by ``torch.Generator().manual_seed(seed)``;
      ``attention_mask`` is None.
    - ``list[str]``: ``nsamples`` documents chosen by a seeded permutation, each
      tokenised, truncated to ``seqlen`` and right-padded; ``attention_mask`` marks
      real tokens with 1.
    - 2-D id tensor ``[B, seqlen]``: its first ``nsamples`` rows, as given.

    Returns :class:`CalibrationData` (``input_ids`` [nsamples, seqlen]). Raises
    ``ValueError`` when the source is too short for one window, or is empty;
    ``FileNotFoundError`` for a missing file.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise DataError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    fp: dict[str, Any] = {"sampler": SAMPLER, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    mask = None
    if isinstance(source, Tensor):
        ids = check_token_ids(source, "calibration tensor")
        fp.update(dataset="tensor", split=None, path=None, kind="tensor", text_sha256=None,
                  ids_sha256=_ids_sha256(ids), tokenizer_hash=_tok_hash(tokenizer))
        if ids.dim() == 1:
            windows = _random_windows(ids, nsamples, seqlen, seed, f"token tensor [{ids.numel()}]")
        else:
            b, t = ids.shape
            if t != seqlen:
                raise DataError(f"calibration tensor [{b}, {t}]: rows must have seqlen={seqlen} tokens "
                                 "(pass a 1-D stream to draw windows from)")
            if b < nsamples:
                raise DataError(f"calibration tensor [{b}, {t}] has {b} rows, fewer than nsamples={nsamples}")
            windows = ids[:nsamples].clone()
    elif isinstance(source, (list, tuple)) and not (isinstance(source, tuple) and len(source) == 2
                                                     and isinstance(source[0], str) and isinstance(source[1], dict)):
        if tokenizer is None:
            raise DataError("a tokenizer is needed for a list of documents")
        docs = list(source)
        if not docs:
            raise DataError("the list of calibration documents is empty")
        windows, mask = _document_windows(docs, tokenizer, nsamples, seqlen, seed)
        blob = json.dumps(docs, ensure_ascii=False)
        fp.update(dataset="list", split=None, path=None, kind="documents", docs=len(docs),
                  text_sha256=sha256_text(blob), tokenizer_hash=_tok_hash(tokenizer))
    else:
        if isinstance(source, tuple):
            text, info = source
            info = dict(info)
            info.setdefault("text_sha256", sha256_text(text))
        else:
            text, info = load_text(source, data_dir, default_split="calib")
        if tokenizer is None:
            raise DataError(f"a tokenizer is needed to tokenise {_label(info)}")
        ds = DATASETS.get(info.get("dataset", ""))
        if ds is not None and info.get("split") == ds.eval_split:
            (log.warning if ds.calib_split != ds.eval_split else log.info)(
                "calibrating on %s, the split that perplexity evaluates by default: "
                "perplexity on it will be optimistic", _label(info))
        stream = tokenize_text(text, tokenizer)
        windows = _random_windows(stream, nsamples, seqlen, seed,
                                  f"{_label(info)} ({info.get('path')})")
        fp.update(dataset=info.get("dataset"), split=info.get("split"), path=info.get("path"), kind="windows",
                  text_sha256=info["text_sha256"], tokens=stream.numel(), tokenizer_hash=_tok_hash(tokenizer))
    log.info("calibration: %d windows of %d tokens from %s (seed %d)", nsamples, seqlen,
             fp.get("path") or fp["dataset"], seed)
    return CalibrationData(input_ids=windows, attention_mask=mask, fingerprint=fp)
