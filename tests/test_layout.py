"""The package layout of DESIGN.md section 2, read from the code's own imports (every import statement,
those inside functions too): each package imports only the packages below it, no modules import each
other in a circle, and every library module stays a size a reader holds in their head."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("ume_r1", "workers", "sft", "rewards")
# package -> the packages it may import (besides itself)
MAY_IMPORT = {
    "ume_r1.torchvision_guard": set(),
    "ume_r1.data": set(),
    "ume_r1.reward": set(),
    "ume_r1.model": {"ume_r1.data"},
    "ume_r1.synthetic": {"ume_r1.data"},
    "ume_r1.rollout": {"ume_r1.data", "ume_r1.model"},
    "ume_r1.training": {"ume_r1.data", "ume_r1.model"},
    "ume_r1.eval": {"ume_r1.data", "ume_r1.model", "ume_r1.rollout", "ume_r1.synthetic"},
    "rewards": {"ume_r1.data", "ume_r1.reward"},
    "workers": {"ume_r1.data", "ume_r1.model", "ume_r1.rollout", "ume_r1.training", "ume_r1.reward"},
    "sft": {"ume_r1.data", "ume_r1.model", "ume_r1.training", "ume_r1.eval"},
    "ume_r1.grpo": {
        "ume_r1.data",
        "ume_r1.model",
        "ume_r1.rollout",
        "ume_r1.training",
        "ume_r1.reward",
        "ume_r1.eval",
        "workers",
    },
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pkg import mod` counts as importing pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def package(module: str) -> str | None:
    """The layer of MAY_IMPORT that holds `module`, or None."""
    return next((p for p in MAY_IMPORT if module == p or module.startswith(p + ".")), None)


def test_every_module_belongs_to_a_layer():
    orphans = [m for m in modules() if m not in ROOTS and package(m) is None]
    assert not orphans, f"modules outside every layer of MAY_IMPORT: {orphans}"


def test_packages_import_only_the_layers_below():
    known = modules()
    wrong = [
        f"{module} imports {target}"
        for module, path in known.items()
        if module not in ROOTS
        for target in sorted(imports(path, known))
        if package(target) != package(module) and package(target) not in MAY_IMPORT[package(module)]
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_circle():
    known = modules()
    graph = {module: imports(path, known) - {module} for module, path in known.items()}
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_library_modules_stay_readable():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split along a seam): {long}"
