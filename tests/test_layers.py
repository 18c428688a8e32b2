"""The package reads top-down: formats at the bottom, the core above them, orchestration on top,
and no import (at module level or inside a function) runs back up."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drifting_vla"

LAYERS = {
    # what lies on disk and what a config may say; small helpers every layer shares
    "formats": 0, "specs": 0, "rotations": 0, "distributed": 0, "precision": 0, "plugins": 0, "configs": 0, "safety": 0,
    # the network, the data, the simulators, the objectives and the policy
    "models": 1, "data": 1, "envs": 1, "objectives": 1, "inference": 1, "logging": 1,
    # what runs them: training, evaluation, serving, probes, benchmarks and the command line
    "training": 2, "evaluation": 2, "serving": 2, "lab": 2, "benchmarks": 2, "cli": 2,
}
NAMES = {0: "formats", 1: "core", 2: "orchestration"}


def layer_of(module: str) -> int | None:
    """The layer of `drifting_vla.<part>...`; None for the package root and for other packages."""
    parts = module.split(".")
    if parts[0] != "drifting_vla" or len(parts) == 1:
        return None
    return LAYERS[parts[1]]


def modules():
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        yield file, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(file: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_package_has_a_layer():
    top = {p.name for p in PACKAGE.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert {name.removesuffix(".py") for name in top} - {"__init__"} == set(LAYERS)


@pytest.mark.parametrize("file, module", list(modules()), ids=lambda value: str(value) if isinstance(value, str) else "")
def test_no_import_runs_back_up(file, module):
    own = layer_of(module)
    if own is None:
        return
    upward = sorted(m for m in imported_modules(file) if (layer_of(m) or 0) > own)
    assert not upward, f"{module} ({NAMES[own]}) imports {upward} from a layer above it"
