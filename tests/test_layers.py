"""The package's imports point one way: no import cycles, no import from a lower layer to a higher one.

Every module under ``src/visiontune`` is parsed with :mod:`ast`; every ``import`` / ``from ... import``
counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike (a type-only import is
still a dependency of the design). ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. Importing a submodule runs its parent ``__init__`` too, but that is not drawn
as an edge: a package's ``__init__`` importing its own submodules is what packages are for, and the
``__init__``'s own imports are checked as those of any module.

Layers, lowest first; a module may import from its own layer or any lower one (within a layer the
cycle check keeps the order one way):

0. ``errors``, ``registry``, ``atomic``, ``quiet``, ``lazy``, ``extras``, ``precisions``: exceptions, name ->
   factory registries, atomic file writes, third-party log filters, names imported on first use, the optional
   extras and their install hints, the inference precisions (what the command line offers without torch).
1. ``runtime``: device, autocast, seeding, data loaders, what train, eval, infer and serve share.
2. ``data``, ``backbones``: image folders, manifests, splits, the decoded-image cache; timm factory,
   weight sources, transforms, tiny test models.
3. ``config``: the run configuration. It sits *above* data and backbones, not below as the issue's
   first sketch had it, because that is where the code's dependencies point: ``data`` and ``backbones``
   take their settings duck-typed (``SplitSpec``, any object with ``name`` / ``weights`` / ``img_size``)
   and never read ``Config``, while the config's validation composes theirs (``data.splits.split_problems``,
   ``data.images.ImageLimits``). Nothing below it imports a method either: methods register themselves
   when ``visiontune.methods`` is imported (the root package does so), and the config looks method
   names up in the registry when it validates.
   ``distributed`` sits beside it: the data-parallel runtime (process group through accelerate, global-batch
   shares, exactly-once evaluation) reads ``Config`` and is used by train, eval, infer and the caches.
4. ``methods``: the ``Method`` interface and every method, each owning its code (LoRA's fused q/k/v
   forward and lean layers included).
5. ``train``, ``eval``, ``pretrain``, ``checkpoint``, ``rundir``, ``runs``, ``check``: the loop, metrics and
   reports, ExPLoRA, checkpoints, run directories (``runs`` writes a finished run and loads one back,
   which the loop needs to resume and to finish, so it lives with the loop), the meta-device check, the memory ``estimate`` (built on the meta-device backbone and the methods).
6. ``infer``, ``multi``, ``serve``: predictor, export and evaluation of finished runs, the adapter
   host, the HTTP app.
7. ``auto``, ``sweep``, ``suggest``: method selection and grids, built from whole runs; which images to label next
   (it reads finished runs through ``infer``/``runs`` and fits the probe of ``methods``).
8. ``cli`` (and ``__main__``, ``python -m visiontune``), ``doctor`` (the machine report), ``reference`` (the docs'
   generated reference pages), ``demo`` and the root package ``visiontune`` (its public functions wrap everything below).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "visiontune"

LAYERS: list[list[str]] = [
    ["errors", "registry", "atomic", "quiet", "lazy", "extras", "precisions"],
    ["runtime"],
    ["data", "backbones"],
    ["config", "distributed"],
    ["methods"],
    ["train", "eval", "pretrain", "checkpoint", "rundir", "runs", "check", "estimate"],
    ["infer", "multi", "serve"],
    ["auto", "sweep", "suggest"],
    ["cli", "__main__", "doctor", "reference", "demo", ""],
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The innermost module of the package that ``name`` (a module or a name in one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, int]]:
    """(internal module imported, line) for every import statement in ``module``."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
            # ``from visiontune import distributed`` names the root package, whose ``__init__`` imports every layer:
            # counted as an edge to the root too, so modules below it write ``import visiontune.distributed``.
            if source == PACKAGE:
                targets.append(PACKAGE)
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                owner = _owner(target)
                if owner and owner != module:
                    out.append((owner, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        graph[module] |= {target for target, _ in imports_of(module)}
    return graph


def layer_of(module: str) -> int:
    """The layer of a module: that of its first component below the root package."""
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    top = rel.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer; add {top!r} to LAYERS (and to the docstring)")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 50
    for module in MODULES:
        layer_of(module)


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_points_up_a_layer() -> None:
    upward = sorted({
        f"{module}:{line} imports {target} (layer {layer_of(module)} -> {layer_of(target)})"
        for module in MODULES
        for target, line in imports_of(module)
        if layer_of(target) > layer_of(module)
    })
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


# The checker itself, on small graphs: a cycle is found wherever it sits, and a chain is not one.
@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b", "d"}, "b": set(), "d": {"e"}, "e": {"d"}}, [["d", "e"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert sorted(import_cycles(graph)) == expected


def test_imports_are_read_from_functions_and_relative_forms() -> None:
    """The walker sees the function-level import of the root package's ``train`` wrapper."""
    assert ("visiontune.train.loop", ) in {(t,) for t, _ in imports_of(PACKAGE)}
    assert layer_of("visiontune.methods.base") == layer_of("visiontune.methods")
    assert layer_of(PACKAGE) == len(LAYERS) - 1


def graph_numbers() -> dict[str, int]:
    """The measured import graph: modules, edges, levels (the longest import chain, counted in modules), cycles and
    upward imports; and the same at the level of packages (every subpackage and top-level module one node, as the
    architecture page's layer picture draws them)."""
    from functools import cache

    graph = import_graph()

    def top(module: str) -> str:
        rel = module.removeprefix(PACKAGE).removeprefix(".")
        return rel.split(".")[0] or PACKAGE

    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        packages[top(module)] |= {top(t) for t in targets if top(t) != top(module)}

    def levels(g: dict[str, set[str]]) -> int:
        if import_cycles(g):  # no longest chain through a loop
            return -1

        @cache
        def depth(node: str) -> int:
            return 1 + max((depth(t) for t in g.get(node, ())), default=0)

        return max(depth(n) for n in g)

    return {
        "modules": len(MODULES), "edges": sum(len(t) for t in graph.values()), "levels": levels(graph),
        "cycles": len(import_cycles(graph)),
        "upward imports": sum(layer_of(t) > layer_of(m) for m in MODULES for t, _ in imports_of(m)),
        "packages": len(packages), "package edges": sum(len(t) for t in packages.values()),
        "package levels": levels(packages),
    }


if __name__ == "__main__":  # python tests/test_layers.py: the numbers the architecture page quotes
    for key, value in graph_numbers().items():
        print(f"{key}: {value}")
