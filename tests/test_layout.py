"""The house: imports point down the layers, never up, and no stage module imports another."""

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "pipeline"
# Lower number = lower floor. A module may import its own package or anything on a lower floor.
FLOORS = {"errors": -1, "artifacts": 0, "modeling": 0, "data": 1, "env_report": 1, "adapters": 2, "alignment": 2, "evaluation": 2, "hub": 3,
          "stages": 4, "cli": 5}
STAGE_HELPERS = {"common", "training", "__init__"}  # shared stage machinery, importable by every stage module


def room(module: str) -> str:
    """'pipeline.stages.sft' -> 'stages'; 'pipeline.artifacts' -> 'artifacts'; 'pipeline' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def pipeline_imports(path) -> list[tuple[int, str]]:
    """(line, module) for every `pipeline.*` import in the file, at any depth (late imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("pipeline"):
            names = [f"{node.module}.{a.name}" if node.module == "pipeline" else node.module for a in node.names]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline")]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "metrics" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_point_down(path):
    own = room("pipeline." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if own in ("", "__init__"):
        return  # the package face registers the model family (and drops one third-party warning), nothing else
    assert own in FLOORS, f"{path.relative_to(REPO)}: a new room; give it a floor in tests/test_layout.py"
    for line, module in pipeline_imports(path):
        target = room(module) or "modeling"  # `import pipeline` only registers the model family
        assert target == own or FLOORS[target] < FLOORS[own], \
            f"{path.relative_to(REPO)}:{line}: imports {module} (floor {FLOORS[target]}) from floor {FLOORS[own]}"


STAGE_MODULES = sorted(p for p in (PACKAGE / "stages").glob("*.py") if p.stem not in STAGE_HELPERS)


@pytest.mark.parametrize("path", STAGE_MODULES, ids=[p.stem for p in STAGE_MODULES])
def test_no_stage_module_imports_another(path):
    for line, module in pipeline_imports(path):
        if module.startswith("pipeline.stages."):
            assert module.split(".")[2] in STAGE_HELPERS, \
                f"{path.relative_to(REPO)}:{line}: imports the stage module {module}; share it from a lower floor"


def test_the_bottom_layer_imports_nothing_of_the_package():
    assert pipeline_imports(PACKAGE / "errors.py") == []
    assert {module for _, module in pipeline_imports(PACKAGE / "artifacts.py")} <= {"pipeline.errors"}


def test_modeling_files_are_self_contained():
    """Hub remote code: the modeling files never import the package (a user's machine does not have it)."""
    for name in ("configuration_pipeline_gpt.py", "modeling_pipeline_gpt.py"):
        assert pipeline_imports(PACKAGE / "modeling" / name) == [], name
