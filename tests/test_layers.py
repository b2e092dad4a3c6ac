"""Imports flow one way: the bottom (config, errors, storage, schemas, devices, runroot), then
curation, tokens, models, training, sampling, then the Prefect flows and the CLI, and the
plug-ins (the demo) on top. A module may import its own layer and the layers below it.

`python tests/test_layers.py` prints the import graph between layers.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTOM = (
    "dalle.config", "dalle.errors", "dalle.storage", "dalle.schemas", "dalle.devices", "dalle.processes",
    "dalle.runroot",
)  # fmt: skip
# Lowest first; a module belongs to the first layer whose prefixes match it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("bottom", BOTTOM + ("dalle",)),
    ("curate", ("dalle.curate",)),
    ("tokens", ("dalle.tokens",)),
    ("models", ("dalle.models",)),
    ("train", ("dalle.train",)),
    ("sample", ("dalle.sample",)),
    ("plan", ("dalle.plan",)),  # estimates every stage from the models' own code
    ("flows", ("flows",)),
    ("plug-ins", ("demo",)),
]


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index): the longest prefix wins
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (at any depth in the file, with its line), absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def source_files() -> list[Path]:
    return sorted(p for top in ("dalle", "flows", "demo") for p in (REPO / top).rglob("*.py"))


def upward_imports() -> list[str]:
    problems = []
    for path in source_files():
        own = layer_of(module_name(path))
        for name, line in imports_of(path):
            if name.split(".")[0] == "prefect" and module_name(path).startswith("dalle"):
                problems.append(
                    f"{path.relative_to(REPO)}:{line} imports prefect: the library runs without it"
                )
            target = layer_of(name)
            if target is not None and own is not None and target > own:
                problems.append(
                    f"{path.relative_to(REPO)}:{line} ({LAYERS[own][0]}) imports {name} ({LAYERS[target][0]})"
                )
    return sorted(set(problems))


def test_no_layer_imports_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The check itself must be able to fail: a curation module that imports the training loop.
    probe = tmp_path / "dalle" / "curate" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def later():\n    from dalle.train.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert "dalle/curate/probe.py:2 (curate) imports dalle.train.loop (train)" in upward_imports()


@pytest.mark.parametrize("plugin", ["demo"])
def test_the_library_and_flows_do_not_import_a_plugin(plugin):
    # Deleting the demo must leave the pipeline whole: nothing below the plug-ins names it.
    users = [
        f"{path.relative_to(REPO)}:{line}"
        for path in source_files()
        if not module_name(path).startswith(plugin)
        for name, line in imports_of(path)
        if name == plugin or name.startswith(plugin + ".")
    ]
    assert users == []


def graph() -> Counter:
    edges: Counter = Counter()
    for path in source_files():
        own = layer_of(module_name(path))
        for name, _ in imports_of(path):
            target = layer_of(name)
            if target is not None and own is not None and target != own:
                edges[(LAYERS[own][0], LAYERS[target][0])] += 1
    return edges


if __name__ == "__main__":
    order = [name for name, _ in LAYERS]
    print("layers, lowest first: " + " < ".join(order))
    for (source, target), count in sorted(
        graph().items(), key=lambda e: (order.index(e[0][0]), order.index(e[0][1]))
    ):
        print(f"  {source:9s} -> {target:9s} {count:3d} imports")
    problems = upward_imports()
    print("\n".join(problems) if problems else "no upward imports")
    sys.exit(1 if problems else 0)
