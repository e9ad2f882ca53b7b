"""The package's shape: a few library modules and commands at the top, every other
concern in its own wing, and imports that only point down.

The graph is read from the source (every ``import`` statement, lazy ones inside
functions included), so a circle closed by a function-level import fails too.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sdedit_jax")

LIBRARY = ("__init__", "sde", "score", "rng", "edit", "engine", "pretrained")
COMMANDS = ("main", "train", "evaluate", "convert", "composite")
# What each part may import besides itself. Commands and tools may import any part of
# the library, tools the commands too (they measure them); nothing in the library
# imports a command, a tool or the job.
MAY_IMPORT = {
    "util": set(),
    "rng": set(),
    "sde": {"util", "rng"},
    "score": {"sde"},
    "sampling": {"sde", "rng", "util"},
    "edit": {"sde", "rng", "sampling"},
    "engine": {"edit", "sde", "rng", "sampling"},
    "models": {"util"},
    "importers": {"models", "sde", "score", "util"},
    "latent": {"importers", "models", "rng", "score", "sde", "util"},
    "pretrained": {"importers", "latent", "models", "score", "sde", "util"},
    "data": {"util"},
    "metrics": {"importers", "util"},
    "evaluation": {"data", "engine", "metrics", "pretrained", "rng", "sampling", "sde", "util"},
    "training": {"data", "engine", "models", "pretrained", "score", "sde", "util"},
    "jobs": {
        "data",
        "edit",
        "engine",
        "latent",
        "pretrained",
        "rng",
        "sampling",
        "score",
        "sde",
        "util",
    },
    # The studio command's wing: a web page over the engine and the job's own inputs.
    "studio": {"data", "engine", "jobs", "pretrained", "rng", "sampling", "util"},
    "__init__": set(LIBRARY) | {"sampling"},
}
ANY_LIBRARY = set(MAY_IMPORT) - {"__init__"} | {"__init__"}
for _command in COMMANDS:
    MAY_IMPORT[_command] = ANY_LIBRARY
MAY_IMPORT["tools"] = ANY_LIBRARY | set(COMMANDS)


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that ``path`` imports (a name imported from a package
    counts as that submodule when it is one, else as the package)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def _part(module: str) -> str:
    """``sdedit_jax.jobs.run`` -> ``jobs``; ``sdedit_jax.engine`` -> ``engine``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(path, modules) - {m} for m, path in modules.items()}


def test_top_level_holds_the_library_and_the_commands():
    top = sorted(n[:-3] for n in os.listdir(PACKAGE) if n.endswith(".py"))
    assert top == sorted(LIBRARY + COMMANDS)
    assert len(top) <= 13


def test_every_part_has_its_rule(graph):
    assert {_part(m) for m in graph} <= set(MAY_IMPORT)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a part that its rule does not allow."""
    return sorted(
        f"{m} imports {dep}"
        for m, deps in graph.items()
        for dep in deps
        if _part(dep) != _part(m) and _part(dep) not in MAY_IMPORT[_part(m)]
    )


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search; a back edge is a circle, reported with its path."""
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [module, dep]))
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return circles


def test_imports_only_point_down(graph):
    assert not _upward(graph)


def test_no_import_circle(graph):
    assert not _circles(graph)


def test_the_checks_find_an_upward_import_and_a_circle(graph):
    """The checks are live: a network importing an importer, and a lazy import back from
    the sampler into the engine, are each reported by name."""
    bad = {m: set(deps) for m, deps in graph.items()}
    bad["sdedit_jax.models.unet"].add("sdedit_jax.importers.diffusers")
    bad["sdedit_jax.sampling.integrate"].add("sdedit_jax.engine")
    assert "sdedit_jax.models.unet imports sdedit_jax.importers.diffusers" in _upward(bad)
    assert any(
        "sdedit_jax.engine" in c and "sdedit_jax.sampling.integrate" in c for c in _circles(bad)
    )
