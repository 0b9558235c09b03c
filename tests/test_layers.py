"""The house on floors: every module of the package sits on a declared floor, imports (those inside functions too)
point only to its own floor or lower ones, and no set of modules imports itself in a circle.

The floor order is declared once, here (:data:`FLOORS`). A new top-level module or folder must be placed on a floor
before the test passes, so nothing can slip in unseen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkv_lightning"

FLOORS: list[set[str]] = [
    {"errors", "files", "hparams", "quiet", "loggers", "command_line"},  # ground: no project imports but errors
    {"nn"},  # networks: the attention core and its algebra
    {"variants", "accounting"},  # the variant labels and closed-form costs, read off the networks
    {"checkpoints", "resume", "parallel"},  # reading, writing and resuming checkpoints; sharding
    {"data", "callbacks", "config_files", "guards"},  # data modules, callbacks, config files, pre-flight checks
    {"tasks"},  # the LightningModules and the one task builder (tasks/persist.py)
    {"hints", "lightning_cli"},  # the LightningCLI and its error hints
    {"uptrain", "interop", "export", "harness", "evaluate", "analysis", "bench", "study"},  # commands
    {"cli", "__main__"},  # the command table and the error boundary
]
"""The floors, ground first. A module may import modules of its own floor and of lower ones; the package root
(``qkv_lightning/__init__.py``, only the version) sits below them all."""


def floor_of(module: str) -> int:
    """The floor of a module ``qkv_lightning.X...``: its top-level unit X's position in :data:`FLOORS`."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package root
    for number, units in enumerate(FLOORS):
        if parts[1] in units:
            return number
    raise AssertionError(f"{module} is on no floor: add its top-level unit {parts[1]!r} to FLOORS")


def module_name(path: Path, package: Path) -> str:
    return ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path, package: Path, known: set[str]) -> set[str]:
    """Every project module that ``path`` imports, at any depth of the file (functions, ``if TYPE_CHECKING``
    included), relative imports resolved, and ``from package import module`` read as an import of that module."""
    me = module_name(path, package)
    here = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # a name inside a module: the module itself
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(package.rglob("*.py"))
    known = {module_name(path, package) for path in paths}
    return {module_name(path, package): imports_of(path, package, known) for path in paths}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    for module in graph:
        floor_of(module)  # every module, importing or not, stands on a floor
    return sorted(
        f"{module} (floor {floor_of(module)}) -> {target} (floor {floor_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if floor_of(target) > floor_of(module)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports. A package's
    ``__init__`` that re-exports its own modules is not a circle: an edge from a module to its own package's
    ``__init__`` (or up to its parents) only runs that ``__init__`` first, so those edges are left out."""
    edges = {
        module: {t for t in targets if not module.startswith(t + ".")} for module, targets in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_a_floor() -> None:
    assert upward_imports(import_graph()) == []


def test_no_module_imports_itself_through_a_circle() -> None:
    assert cycles(import_graph()) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "qkv_lightning"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_see_imports_inside_functions_cycles_and_modules_on_no_floor(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "checkpoints.py": "def f():\n    from qkv_lightning.tasks.base import plain\n",
            "tasks/__init__.py": "",
            "tasks/base.py": "from qkv_lightning.checkpoints import f\nplain = 1\n",
            "export.py": "def g():\n    from qkv_lightning.interop import hf\n",
            "interop/__init__.py": "",
            "interop/hf.py": "from .. import export\n",
            "nn/__init__.py": "from .attention import X\n",
            "nn/attention.py": "X = 1\nimport qkv_lightning.nn\n",
        },
    )
    graph = import_graph(root)
    assert upward_imports(graph) == [
        "qkv_lightning.checkpoints (floor 3) -> qkv_lightning.tasks.base (floor 5)"
    ]
    assert cycles(graph) == [
        ["qkv_lightning.checkpoints", "qkv_lightning.tasks.base"],
        ["qkv_lightning.export", "qkv_lightning.interop.hf"],
    ]
    (root / "newthing.py").write_text("")
    with pytest.raises(AssertionError, match="'newthing'"):
        upward_imports(import_graph(root))
