"""The user documentation stays true: links resolve, every CLI flag is documented, examples run.

* Every relative link and image in README.md, ARCHITECTURE.md, docs/*.md and benchmarks/*.md
  points at a file or directory that exists, and a ``#fragment`` at a heading of its target page
  (slugs as the forge renders them: lower case, punctuation dropped, spaces → hyphens).
* Every flag that ``obdk <verb> --help`` prints is documented in that verb's section of
  docs/cli.md (``## obdk <verb>``), and every ``obdk <verb> --flag`` written in a command line of
  the docs is a flag that verb takes.
* Every ``obdk.<name>`` the README and docs/ mention resolves.
* Code blocks: a ```` ```python run ```` block is executed, the blocks of one page in order in one
  temporary directory, with ``obdk.load_model`` returning a tiny Llama and a character tokenizer
  (``obdk.testing``) whatever spec it is given, and ``obdk.compress``/``prepare``/``compress_many``
  calibrating on at most 4 windows of 128 tokens, so the SmolLM2 examples run in seconds. A
  ```` ```python no-run: <reason> ```` block is reported as skipped with its reason; a ``python``
  block with neither marker fails (every example must say which it is).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("OBDK_DATA_DIR", REPO.parent / "shared" / "data"))

USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ALL_DOCS = USER_DOCS + [REPO / "ARCHITECTURE.md", REPO / "benchmarks" / "README.md", REPO / "benchmarks" / "RESULTS.md"]
README_MAX_LINES = 300

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """The fenced code blocks of a Markdown file: ``(line of the opening fence, info string, body)``."""
    out, lines, i = [], path.read_text(encoding="utf-8").split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{_rel(path)}:{start}: the code block opened here is never closed")
        out.append((start, info, "\n".join(body)))
        i += 1
    return out


def prose(path: Path) -> str:
    """The file's text with fenced code blocks and inline code spans blanked (links there are not links)."""
    text, out, in_fence = path.read_text(encoding="utf-8"), [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if in_fence is None and m:
            in_fence = m.group(2)
            out.append("")
            continue
        if in_fence is not None:
            if line.strip().startswith(in_fence):
                in_fence = None
            out.append("")
            continue
        out.append(re.sub(r"`[^`]*`", "``", line))
    return "\n".join(out)


# --------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)


def slug(heading: str) -> str:
    """The anchor the forge gives a heading: inline markup dropped, lower case, punctuation removed, spaces → -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) → text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, … as on the forge)."""
    seen: dict[str, int] = {}
    out, in_fence = set(), None
    for line in path.read_text(encoding="utf-8").split("\n"):
        m = FENCE.match(line)
        if in_fence is None and m:
            in_fence = m.group(2)
            continue
        if in_fence is not None:
            if line.strip().startswith(in_fence):
                in_fence = None
            continue
        h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if h:
            base = slug(h.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def links(path: Path) -> list[str]:
    text = prose(path)
    return LINK.findall(text) + HTML_SRC.findall(text)


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_relative_links_and_images_resolve(doc):
    assert doc.exists(), f"{_rel(doc)} is missing"
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, …
            continue
        path, _, frag = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file or directory ({dest})")
            continue
        if frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: {_rel(dest)} has no heading with the anchor #{frag}")
    assert not bad, f"{_rel(doc)}: broken links:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_code_blocks_are_closed(doc):
    blocks(doc)  # raises naming the line of an unclosed fence


def test_slug_matches_the_forge():
    assert slug("ZS-SVD's one-step correction along the step") == "zs-svds-one-step-correction-along-the-step"
    assert slug("Plan first: `obdk plan`") == "plan-first-obdk-plan"
    assert slug("compress_many: several copies in one call") == "compress_many-several-copies-in-one-call"
    assert slug("Keep 0.7, and each published recipe against its claim") == \
        "keep-07-and-each-published-recipe-against-its-claim"


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").rstrip("\n").split("\n"))
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it ≤ {README_MAX_LINES} (details go to docs/)"


# --------------------------------------------------------------------------- the CLI


def _verbs():
    from obdk.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices


def _help_flags(parser) -> set[str]:
    """Every ``--flag`` the parser's ``--help`` prints: its options and any flag its help texts name."""
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"  # no wrapping: argparse would break a long flag at its hyphens
    try:
        text = parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    flags |= {f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", text) if f != "--help"}
    return flags


def cli_sections() -> dict[str, str]:
    """docs/cli.md split by ``## obdk <verb>`` headings: {verb: text of its section}."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    parts = re.split(r"^## obdk (\w+)\s*$", text, flags=re.M)
    return {parts[i]: re.split(r"^## ", parts[i + 1], flags=re.M)[0] for i in range(1, len(parts), 2)}


def _documented(flag: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def test_every_verb_has_a_section_in_cli_md():
    _, verbs = _verbs()
    sections = cli_sections()
    missing = sorted(set(verbs) - set(sections))
    assert not missing, f"docs/cli.md has no '## obdk <verb>' section for: {', '.join(missing)}"


def test_every_help_flag_is_documented_in_cli_md():
    parser, verbs = _verbs()
    sections = cli_sections()
    whole = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [f"obdk {f}" for f in sorted(_help_flags(parser) - set().union(*map(_help_flags, verbs.values())))
               if not _documented(f, whole)]
    for verb, sp in verbs.items():
        section = sections.get(verb, "")
        missing += [f"obdk {verb} {f}" for f in sorted(_help_flags(sp)) if not _documented(f, section)]
    assert not missing, ("flags that `obdk <verb> --help` prints but docs/cli.md does not document (in the verb's "
                         "section):\n  " + "\n  ".join(missing))


COMMAND = re.compile(r"(?:^|[\s(/])obdk(?:\s+(?:-v|--verbose))?\s+(compress|eval|generate|inspect|plan|env)\b([^;|&#]*)")


def _command_lines(doc: Path):
    """Command lines of the doc's code blocks: every line of a shell block, ``$ …`` lines of text blocks."""
    for start, info, body in blocks(doc):
        lang = (info.split() or [""])[0]
        joined = body.replace("\\\n", " ")
        for k, line in enumerate(joined.split("\n")):
            if lang in ("bash", "sh", "shell", "console"):
                yield start + k, line
            elif lang == "text" and line.startswith("$ "):
                yield start + k, line[2:]


def test_commands_in_the_docs_use_real_flags():
    parser, verbs = _verbs()
    known = {v: {o for a in sp._actions for o in a.option_strings} for v, sp in verbs.items()}
    bad = []
    for doc in ALL_DOCS:
        for lineno, line in _command_lines(doc):
            for m in COMMAND.finditer(line):
                verb, rest = m.group(1), m.group(2)
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                    if flag not in known[verb]:
                        bad.append(f"{_rel(doc)}:{lineno + 1}: obdk {verb} has no flag {flag}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- names


def _resolve(dotted: str):
    obj = importlib.import_module("obdk")
    parts = dotted.split(".")[1:]
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(["obdk", *parts[: i + 1]]))
    return obj


def test_every_obdk_name_in_the_docs_resolves():
    import obdk
    names = set()
    for doc in USER_DOCS:
        names |= set(re.findall(r"(?<![\w.])obdk(?:\.[A-Za-z]\w*)+", doc.read_text(encoding="utf-8")))
    bad = []
    for name in sorted(names):
        try:
            _resolve(name)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("obdk"):  # an optional dependency that is not installed
                continue
            bad.append(f"{name}: {exc}")
        except AttributeError as exc:
            bad.append(f"{name}: {exc}")
    assert not bad, "names the docs mention that do not exist:\n  " + "\n  ".join(bad)
    for name in obdk.__all__:
        assert getattr(obdk, name) is not None, name


def test_exported_names_are_not_submodules():
    """``import obdk.X`` sets the attribute ``obdk.X`` to the submodule, so a lazily exported function may not be
    called like a submodule: it would be the module or the function depending on what was imported first."""
    import obdk
    clash = [n for n in obdk._LAZY if (REPO / "obdk" / f"{n}.py").exists() or (REPO / "obdk" / n).is_dir()]
    assert not clash, f"obdk exports {clash} lazily under the name of a submodule"


# --------------------------------------------------------------------------- runnable examples


def _python_blocks(doc: Path):
    return [(start, info, body) for start, info, body in blocks(doc) if (info.split() or [""])[0] == "python"]


def test_every_python_block_says_whether_it_runs():
    bad = []
    for doc in ALL_DOCS:
        for start, info, _ in _python_blocks(doc):
            words = info.split(None, 1)
            marker = words[1] if len(words) > 1 else ""
            if not (marker == "run" or re.match(r"no-run:\s*\S", marker)):
                bad.append(f"{_rel(doc)}:{start}: ```{info}")
    assert not bad, ("python blocks must be marked ```python run (executed by this test) or ```python no-run: "
                     "<reason>:\n  " + "\n  ".join(bad))


NO_RUN = [(doc, start, info) for doc in ALL_DOCS for start, info, _ in _python_blocks(doc) if "no-run" in info]


@pytest.mark.parametrize("doc,start,info", NO_RUN, ids=[f"{_rel(d)}:{s}" for d, s, _ in NO_RUN] or None)
def test_python_blocks_not_run(doc, start, info):
    pytest.skip(f"{_rel(doc)}:{start}: {info.split('no-run:', 1)[1].strip()}")


RUNNABLE = [doc for doc in ALL_DOCS if any(info.split()[1:2] == ["run"] for _, info, _ in _python_blocks(doc))]


def _tiny_load_model(spec, *, dtype=None, device="cpu"):
    """``obdk.load_model`` for the examples: a tiny Llama and a character tokenizer, whatever ``spec`` is."""
    from obdk.testing import tiny_llama_and_tokenizer
    model, tok = tiny_llama_and_tokenizer()
    return model.to(device), tok


EXAMPLE_NSAMPLES, EXAMPLE_SEQLEN = 4, 128


def _clamped(fn):
    """``fn`` with its calibration size cut to 4 windows of 128 tokens: the tiny model needs no more, and the
    examples then run in seconds whatever size (the defaults, 32 × 512) they ask for on SmolLM2."""
    def run(*args, nsamples=EXAMPLE_NSAMPLES, seqlen=EXAMPLE_SEQLEN, **kw):
        return fn(*args, nsamples=min(nsamples, EXAMPLE_NSAMPLES), seqlen=min(seqlen, EXAMPLE_SEQLEN), **kw)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=_rel)
def test_runnable_examples(doc, tmp_path, monkeypatch):
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw").exists():
        pytest.skip(f"the examples calibrate on WikiText-2, not found under {DATA_DIR} (set OBDK_DATA_DIR)")
    import obdk
    monkeypatch.setenv("OBDK_DATA_DIR", str(DATA_DIR))
    monkeypatch.setattr(obdk, "load_model", _tiny_load_model)
    for name in ("compress", "prepare", "compress_many"):
        monkeypatch.setattr(obdk, name, _clamped(getattr(obdk, name)))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for start, info, body in _python_blocks(doc):
        if info.split()[1:2] != ["run"]:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(body, f"{_rel(doc)}:{start + 1}", "exec"), {"__name__": "__docs__"})
        except Exception as exc:
            raise AssertionError(f"{_rel(doc)}: the example at line {start + 1} failed: {type(exc).__name__}: {exc}\n"
                                 f"its output:\n{out.getvalue()[-2000:]}") from exc
        ran += 1
    assert ran
