"""Static contracts on the source tree, read with `ast` (nothing is imported): layering and size.

Layers, top to bottom: the modules directly in node/ (`intellect.node` itself), cli, app, run, net, engine
(all under `intellect.node`), then `intellect.protocol`, then `intellect.crypto`. A module may import its own
layer and any layer below it, never one above. Every import counts, wherever it is written: at module level,
inside a function, under `if TYPE_CHECKING:`, and `importlib.import_module("intellect.…")` /
`__import__("intellect.…")` with a literal (or f-string with a literal prefix) module name.

Size: no class under node/ longer than MAX_CLASS_LINES, no function or method longer than MAX_FUNCTION_LINES
(from its `def` line to its last line, decorators excluded; nested defs count toward the enclosing function).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Source directory → the package it is installed as (pyproject.toml's package-dir).
PACKAGES: dict[str, str] = {
    "node": "intellect.node",
    "protocol": "intellect.protocol",
    "crypto": "intellect.crypto",
}

#: Bottom to top; a module may import from its own rank and below.
LAYERS: tuple[str, ...] = (
    "intellect.crypto",
    "intellect.protocol",
    "intellect.node.engine",
    "intellect.node.net",
    "intellect.node.run",
    "intellect.node.app",
    "intellect.node.cli",
    "intellect.node",  # node/__init__.py and anything else directly in node/: the top
)

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Source:
    path: Path
    module: str  # dotted name, e.g. intellect.node.net.dht
    is_package: bool  # an __init__.py
    tree: ast.Module

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _sources(dirs: tuple[str, ...] = tuple(PACKAGES)) -> list[Source]:
    out = []
    for src in dirs:
        for path in sorted((ROOT / src).rglob("*.py")):
            parts = list(path.relative_to(ROOT / src).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            module = ".".join([PACKAGES[src], *parts])
            out.append(Source(path, module, is_package, ast.parse(path.read_text(), filename=str(path))))
    return out


def layer_rank(module: str) -> int | None:
    """Rank of the layer `module` belongs to (higher = further up), or None if it is not ours."""
    # The top (intellect.node) is a prefix of the node layers, so it is tried last.
    for rank, layer in sorted(enumerate(LAYERS), key=lambda item: item[1] == LAYERS[-1]):
        if module == layer or module.startswith(layer + "."):
            return rank
    return None


def _literal_prefix(node: ast.expr) -> str | None:
    """The module name of a literal argument, or the literal prefix of an f-string (up to its last dot)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".") if first.value.endswith(".") else first.value.rpartition(".")[0]
    return None


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def _module_exists(module: str) -> bool:
    for src, package in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            rest = module[len(package) :].lstrip(".").split(".") if module != package else []
            base = ROOT.joinpath(src, *rest)
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def imports_of(source: Source) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import anywhere in the module, relative ones resolved."""
    package = source.module if source.is_package else source.module.rpartition(".")[0]
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from intellect.node import engine` imports the submodule, not just the package.
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if alias.name != "*" and _module_exists(sub) else base
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            name = _literal_prefix(node.args[0])
            if name:
                yield node.lineno, name


def layer_violations() -> list[str]:
    found = []
    for source in _sources():
        own = layer_rank(source.module)
        assert own is not None, source.module
        for line, target in imports_of(source):
            rank = layer_rank(target)
            if rank is not None and rank > own:
                found.append(f"{source.rel}:{line}: {source.module} imports {target} ({LAYERS[rank]})")
    return found


def size_violations() -> list[str]:
    found = []
    for source in _sources(("node",)):
        for node in ast.walk(source.tree):
            if isinstance(node, ast.ClassDef):
                limit, what = MAX_CLASS_LINES, "class"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit, what = MAX_FUNCTION_LINES, "function"
            else:
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{source.rel}:{node.lineno}: {what} {node.name} is {lines} lines (max {limit})")
    return found


# ---- the contracts -------------------------------------------------------------------------------------


def test_no_module_imports_a_layer_above_its_own() -> None:
    found = layer_violations()
    assert not found, f"{len(found)} upward import(s):\n" + "\n".join(found)


def test_no_class_or_function_under_node_is_too_long() -> None:
    found = size_violations()
    assert not found, f"{len(found)} oversized definition(s):\n" + "\n".join(found)


# ---- the checker itself --------------------------------------------------------------------------------


def _fake(module: str, code: str, is_package: bool = False) -> Source:
    return Source(ROOT / "node" / "x.py", module, is_package, ast.parse(code))


def test_layer_ranks() -> None:
    assert layer_rank("intellect.crypto.identity") == 0
    assert layer_rank("intellect.protocol") == 1
    assert layer_rank("intellect.node.engine.model") == 2
    assert layer_rank("intellect.node.net") == 3
    assert layer_rank("intellect.node.run.service") == 4
    assert layer_rank("intellect.node.app.config") == 5
    assert layer_rank("intellect.node.cli.main") == 6
    assert layer_rank("intellect.node") == 7
    assert layer_rank("intellect.node.engineering") == 7  # not the engine layer
    assert layer_rank("intellect.nodes") is None
    assert layer_rank("hivemind.dht") is None


def test_every_kind_of_import_is_seen() -> None:
    code = (
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "import intellect.node.app.config as cfg\n"
        "if TYPE_CHECKING:\n"
        "    from intellect.node.run import x\n"
        "def f():\n"
        "    from intellect.node.cli.main import main\n"
        "    importlib.import_module('intellect.node.app.daemon')\n"
        "    importlib.import_module(f'intellect.node.cli.{name}')\n"
        "    __import__('intellect.node.app')\n"
        "from intellect.node import net\n"
        "from intellect.node import __version__\n"
        "from . import gossip\n"
        "from ..app import config\n"
    )
    got = sorted(imports_of(_fake("intellect.node.net.dht", code)))
    assert got == [
        (1, "importlib"),
        (2, "typing"),
        (3, "intellect.node.app.config"),
        (5, "intellect.node.run"),
        (7, "intellect.node.cli.main"),
        (8, "intellect.node.app.daemon"),
        (9, "intellect.node.cli"),
        (10, "intellect.node.app"),
        (11, "intellect.node.net"),
        (12, "intellect.node"),
        (13, "intellect.node.net.gossip"),
        (14, "intellect.node.app.config"),
    ]


def test_a_planted_upward_import_is_reported() -> None:
    engine = _fake("intellect.node.engine.model", "def f():\n    from intellect.node.net.dht import X\n")
    crypto = _fake("intellect.crypto.identity", "from intellect.protocol import codec\n")
    for source, bad in ((engine, "intellect.node.net.dht"), (crypto, "intellect.protocol.codec")):
        own = layer_rank(source.module)
        assert own is not None
        assert [t for _, t in imports_of(source) if (layer_rank(t) or -1) > own] == [bad]
