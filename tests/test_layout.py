"""The package's layout rules (docs/architecture.md), read from the code's own imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Installed names of the three source folders (setup.cfg's package_dir).
ROOTS = {"ips_path": REPO / "ips_path", "ips_path.tiling": REPO / "tiling", "ips_path.cli": REPO / "cli"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if not (package == "ips_path" and parts and parts[0] in ("tiling", "cli")):
                modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every ipspath module that ``name`` imports anywhere in its file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _offenders(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if _in(name, importer)
                  for target in targets if any(_in(target, package) for package in forbidden))


def test_the_graph_sees_the_stages():
    assert {"ips_path.runtime.errors", "ips_path.training.train", "ips_path.inference.predict",
            "ips_path.cli.main", "ips_path.tiling.run"} <= set(GRAPH)
    assert "ips_path.runtime.errors" in GRAPH["ips_path.training.train"]


def test_runtime_imports_nothing_of_ipspath_above_it():
    above = tuple(sorted({".".join(name.split(".")[:2]) for name in MODULES} - {"ips_path.runtime", "ips_path"}))
    assert not _offenders("ips_path.runtime", above)


def test_tasks_import_neither_training_nor_inference():
    assert not _offenders("ips_path.tasks", ("ips_path.training", "ips_path.inference"))


def test_the_model_imports_no_outcome_kind():
    assert not _offenders("ips_path.model", ("ips_path.tasks",))


def test_synthetic_data_is_imported_only_by_the_cli():
    importers = {line.split(" -> ")[0]: line for line in _offenders("ips_path", ("ips_path.synthetic",))}
    assert not [line for importer, line in importers.items()
                if not _in(importer, "ips_path.synthetic") and not _in(importer, "ips_path.cli")]


def test_there_are_no_import_circles():
    circles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not circles
