"""The tree shows the process boundary: which side each module lives on, and who may import whom.

Read off the source with ``ast`` (nothing is imported), so a new import that
breaks a layer fails here, naming the file and the import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "ftrain"
SIDES = ("Worker side", "Supervisor side", "Storage leaf", "Shared contract")


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every ftrain module ``path`` imports, at any depth (functions and TYPE_CHECKING blocks included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ftrain"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftrain"):
            if node.module == "ftrain":  # `from ftrain import x`: x may be a module or a name
                out.update(f"ftrain.{a.name}" for a in node.names)
            else:
                out.add(node.module)
    return out


def test_checkpoint_is_a_storage_leaf() -> None:
    allowed = ("ftrain.checkpoint", "ftrain.errors", "ftrain.faults", "ftrain.hashing")
    bad = {f"{p.relative_to(PKG.parent)}: {m}"
           for p in (PKG / "checkpoint").glob("*.py") for m in imports(p)
           if not (m.startswith(allowed) or m == "ftrain.__version__")}
    assert not bad, f"ftrain/checkpoint/ must import only the storage leaf and the shared errors/faults: {sorted(bad)}"


WORKER = ("ftrain.session", "ftrain.data", "ftrain.finetune")  # inside the training processes (torch)
#: Every package under ftrain/, and what it must not import. The worker side never reaches the supervisor or the
#: tools; the supervisor side (supervisor, cli, telemetry) never reaches the worker side, whose modules import
#: torch; telemetry reads event logs for both the tools and the supervisor's progress line, so it imports neither.
BOUNDARIES: dict[str, tuple[str, ...]] = {
    "session": ("ftrain.supervisor", "ftrain.cli", "ftrain.telemetry"),
    "data": ("ftrain.supervisor", "ftrain.cli", "ftrain.telemetry", "ftrain.session", "ftrain.finetune"),
    "finetune": ("ftrain.supervisor", "ftrain.cli", "ftrain.telemetry"),
    "supervisor": (*WORKER, "ftrain.cli"),
    "cli": WORKER,
    "telemetry": (*WORKER, "ftrain.supervisor", "ftrain.cli"),
    "checkpoint": (*WORKER, "ftrain.supervisor", "ftrain.cli", "ftrain.telemetry"),  # (and more: the leaf test)
    # The configuration is read on both sides of the boundary: it may import only the shared contract.
    "config": (*WORKER, "ftrain.supervisor", "ftrain.cli", "ftrain.telemetry", "ftrain.checkpoint"),
}


@pytest.mark.parametrize(("side", "forbidden"), sorted(BOUNDARIES.items()))
def test_the_process_boundary_is_not_crossed(side: str, forbidden: tuple[str, ...]) -> None:
    bad = {f"{p.relative_to(PKG.parent)}: {m}" for p in (PKG / side).rglob("*.py") for m in imports(p)
           if m.startswith(forbidden)}
    assert not bad, sorted(bad)


def test_every_package_has_its_boundary() -> None:
    packages = {d.name for d in PKG.iterdir() if (d / "__init__.py").is_file()}
    assert packages == set(BOUNDARIES), f"add the new package to BOUNDARIES: {sorted(packages ^ set(BOUNDARIES))}"


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(PKG.parent)): n for p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_every_top_level_module_and_package_says_which_side_it_lives_on() -> None:
    tops = [p for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    tops += [d / "__init__.py" for d in PKG.iterdir() if (d / "__init__.py").is_file()]
    missing = [str(p.relative_to(PKG.parent)) for p in tops
               if not any(side in (ast.get_docstring(ast.parse(p.read_text())) or "") for side in SIDES)]
    assert not missing, f"docstring should start by naming its side ({', '.join(SIDES)}): {missing}"


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    # The import scanner must see imports hidden in functions and TYPE_CHECKING blocks.
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ftrain.config import X\n"
                     "def f():\n    import ftrain.session.session\n    from ftrain import errors\n")
    assert imports(probe) == {"ftrain.config", "ftrain.session.session", "ftrain.errors"}


def test_test_modules_have_unique_basenames() -> None:
    # pytest's default import mode imports test modules by basename: two test_x.py in different folders
    # break collection of the whole suite (only visible when both tiers run).
    names = [p.name for p in (PKG.parent / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_test_module_imports_another() -> None:
    # Shared fakes and helpers live in plain modules (tests/helpers.py, tests/unit/*/..._fakes.py, conftest.py): a
    # test module imported by another runs its module-level code twice and couples two test files' internals.
    bad = []
    for path in (PKG.parent / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(PKG.parent)}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not bad, sorted(bad)
