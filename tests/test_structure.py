"""The shape of the package, read from its source (issue #27): the room-level import graph is acyclic (module-level
and call-time imports alike), the streamed runtime depends on no room that uses it, no function is over
:data:`MAX_FUNCTION_LINES` lines and ``pipeline.py`` is at most :data:`MAX_PIPELINE_LINES` lines.

A room is a top-level module or subpackage of ``obdk`` (``obdk/calibrate/*`` is ``calibrate``). The package's
``__init__`` (the public facade, importing lazily from every room) and ``__version__`` are not rooms.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "obdk"
MAX_FUNCTION_LINES = 120
MAX_PIPELINE_LINES = 400
#: what the streamed runtime may import: the leaves, the architecture records and the checkpoint format (its
#: shard index) and the process-wide clean-up of scratch stores (obdk.scratch: signals, stale stores)
STREAM_DEPENDS_ON = {"errors", "models", "finite", "io", "scratch"}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every Python file of the package (``kernels`` is a symlink: followed)."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    return None if len(parts) == 1 or parts[1] == "__version__" else parts[1]


def _imported(module: str, path: Path, modules: dict) -> list[str]:
    """The ``obdk`` modules ``module`` imports anywhere in its file (at the top or inside a function)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "obdk"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "obdk":
                target = node.module
            else:
                continue
            # ``from . import x``: x is a module when there is one by that name, else a name of the package
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out += subs or [target]
    return out


def room_graph() -> dict[str, set[str]]:
    """``{room: rooms it imports}`` over the whole package."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        src = _room(module)
        if src is None:
            continue
        deps = {_room(t) for t in _imported(module, path, modules)}
        graph.setdefault(src, set()).update(d for d in deps if d is not None and d != src)
    return graph


def test_room_import_graph_is_acyclic():
    graph = room_graph()
    assert {"stream", "calibrate", "decompose", "allocate", "correct", "io", "pipeline"} <= set(graph)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle between rooms: {' -> '.join(e.args[1])}")
    assert order.index("stream") < order.index("calibrate") < order.index("pipeline")


def test_stream_depends_only_on_the_leaves():
    assert room_graph()["stream"] <= STREAM_DEPENDS_ON, room_graph()["stream"] - STREAM_DEPENDS_ON


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE.parent)}::{node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_the_limit():
    found = dict(_functions())
    assert len(found) > 500 and "obdk/pipeline.py::prepare" in found
    long = {name: n for name, n in found.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_pipeline_module_size():
    n = len((PACKAGE / "pipeline.py").read_text().splitlines())
    assert n <= MAX_PIPELINE_LINES, f"obdk/pipeline.py has {n} lines"


def test_the_graph_reader_sees_an_edge_and_a_cycle(tmp_path):
    """The checks above can fail: the reader finds a relative import, and a cycle is reported."""
    modules = _modules()
    assert "obdk.errors" in _imported("obdk.stream.budget", PACKAGE / "stream" / "budget.py", modules)
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())
