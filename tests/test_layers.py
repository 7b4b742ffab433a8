"""The layering of forge, read from the source (ast) rather than from a picture: every import of a module
of forge, top level or lazy inside a function, must point down the arrows of the design. A new import that
points up (an op that imports the optimizer, an optimizer that knows a model class, a registry that imports
the pipeline) fails here with the file, the line and the rule."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"_checks", "phase_table"}     # torch-free leaves anything may read
# layer -> the layers it may import (besides itself and BASE)
ALLOWED = {
    "kernels": set(),
    "_native": set(),
    "ops": {"kernels", "_native"},
    "optim": {"ops", "_native"},
    "nn": {"ops"},
    "distributed": set(),           # who this process is under torchrun, the collectives phases use (torch only)
    "data": {"distributed"},        # evaluate() shares its counts over the ranks of a phase
    "merge": set(),
    "baking": {"nn", "ops", "distributed"},   # PromptBaker samples and trains its share of each batch
    "registry": set(),
    "tracking": set(),
    "pipeline": {"registry", "tracking", "baking", "optim", "nn", "data", "merge", "ops", "kernels", "_native",
                 "distributed"},
    "bench": {"ops", "optim", "nn", "_native"},
    "ui": {"registry", "tracking"},
    "cli": {"pipeline", "registry", "tracking", "bench", "ops", "ui", "_native", "distributed"},
    "__main__": {"cli"},           # `python -m forge` (what `torchrun -m forge` starts)
    "__init__": {"pipeline"},      # forge.load_model: a lazy re-export of forge.pipeline.loading
    "_checks": set(),
    "phase_table": set(),
}


def _layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    name = rel.parts[1]
    return name[:-3] if name.endswith(".py") else name


def _layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] != "forge":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _forge_imports(path: Path):
    """(line, module) of every absolute import of a forge module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "forge":          # from forge import _native
                yield from ((node.lineno, f"forge.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _sources():
    return sorted([*(ROOT / "forge").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


def layering_violations() -> list[str]:
    found = []
    for path in _sources():
        layer = _layer_of_file(path)
        for line, module in _forge_imports(path):
            target = _layer_of_module(module)
            if target is None or target == layer or target in BASE:
                continue
            if layer == "kernels" and module.startswith("forge.kernels"):
                continue
            if target not in ALLOWED.get(layer, set()):
                found.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {module} ({target})")
    return found


def test_the_source_tree_is_layered():
    assert layering_violations() == []


def test_every_source_file_belongs_to_a_known_layer():
    assert sorted({_layer_of_file(p) for p in _sources()} - set(ALLOWED)) == []


@pytest.mark.parametrize("layer, module, allowed", [
    ("ops", "forge.optim", False), ("kernels", "forge.ops", False), ("optim", "forge.nn", False),
    ("optim", "forge.pipeline", False), ("registry", "forge.ops", False), ("tracking", "forge.pipeline", False),
    ("pipeline", "forge.cli", False), ("nn", "forge.ops", True), ("pipeline", "forge.optim", True)])
def test_the_rules_are_the_designs(layer, module, allowed):
    """The table itself says what the design says (so the tree test cannot pass by a permissive table)."""
    assert (_layer_of_module(module) in ALLOWED[layer]) == allowed
