"""The package layout's import rules (../shared/docs/design.md, "Import rules"), read from the source with ast.

Packages depend downward in the order of the data flow; siblings of one layer do not import each other; no method
imports another; methods use only the planner's public sections and budget; module-level imports form no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "samplan"

# lowest first; a package may import its own modules and those of lower layers
LAYERS = [
    {"errors", "utils", "paths", "devices", "parallel", "locks", "disk_space"},  # samplan/<name>.py, shared by everything
    {"dataset"},
    {"experiment_planning"},  # fingerprint, base plan, plan sections, budget
    {"models", "prompts", "preprocessing"},
    {"engine"},  # recipe, losses, optimisers, augmentation, default steps, dense prediction: what methods compose
    {"methods"},
    {"training", "inference", "evaluation"},
    {"pipeline"},  # plan-and-preprocess, train-then-validate
    {"cli"},
]
# module -> module edges that go against the layers, each with its reason
ALLOWED_EDGES = {
    # the fingerprint measures cases after the crop that preprocessing applies (nnU-Net's); the crop itself is a
    # leaf module that imports nothing of samplan but errors and utils
    ("samplan.experiment_planning.fingerprint", "samplan.preprocessing.cropping"),
}
# what methods may use of the planner: the typed sections and the budget, never its internals
PLANNER_PUBLIC = {"samplan.experiment_planning.budget", "samplan.experiment_planning.sections",
                  "samplan.experiment_planning.recipe_sections"}
SHARED_METHOD_PARTS = {"base", "sam_common"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _targets(node: ast.stmt, known: set[str]) -> set[str]:
    """samplan modules one import statement names (`from p import m` counts as p.m when that is a module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("samplan")}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("samplan"):
        subs = {f"{node.module}.{a.name}" for a in node.names} & known
        return subs if len(subs) == len(node.names) else subs | {node.module}
    return set()


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module is imported: not function or class bodies, not TYPE_CHECKING."""
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            out.extend(_module_level(node.orelse))
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody"):
            out.extend(_module_level(getattr(node, field, []) or []))
        for handler in getattr(node, "handlers", []) or []:
            out.extend(_module_level(handler.body))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, set[str]]]:
    """Per module: {"all": every samplan import (function-level included), "top": module-level ones}."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    out = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        every = set().union(*(_targets(n, known) for n in ast.walk(tree) if isinstance(n, ast.stmt)))
        top = set().union(*(_targets(n, known) for n in _module_level(tree.body)))
        out[name] = {"all": every, "top": top}
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def test_every_package_has_a_layer(graph):
    packages = {_package(m) for m in graph} - {""}
    assert packages <= set().union(*LAYERS), sorted(packages - set().union(*LAYERS))


def test_packages_import_only_downward(graph):
    bad = []
    for module, imports in graph.items():
        src = _package(module)
        for target in imports["all"]:
            dst = _package(target)
            if not src or not dst or src == dst or (module, target) in ALLOWED_EDGES:
                continue
            if _layer(dst) > _layer(src) or (_layer(dst) == _layer(src) and _layer(src) > 0):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layers (design.md 'Import rules'):\n" + "\n".join(sorted(bad))


def test_allowed_edges_still_exist(graph):
    stale = [e for e in ALLOWED_EDGES if e[1] not in graph.get(e[0], {}).get("all", set())]
    assert not stale, f"remove these from ALLOWED_EDGES: {stale}"


def test_no_method_imports_another_method(graph):
    bad = []
    for module, imports in graph.items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != "methods":
            continue  # the registry (samplan.methods) imports every method
        own = parts[2]
        for target in imports["all"]:
            t = target.split(".")
            if len(t) >= 3 and t[1] == "methods" and t[2] not in SHARED_METHOD_PARTS | {own}:
                bad.append(f"{module} -> {target}")
            if own in SHARED_METHOD_PARTS and len(t) >= 3 and t[1] == "methods" and t[2] not in SHARED_METHOD_PARTS:
                bad.append(f"{module} -> {target} (shared parts must not depend on a method)")
            if len(t) == 2 and t[1] == "methods":
                bad.append(f"{module} -> {target} (the registry)")
    assert not bad, "\n".join(sorted(bad))


def test_methods_use_only_the_planners_public_sections(graph):
    bad = [f"{m} -> {t}" for m, imports in graph.items() if m.startswith("samplan.methods")
           for t in imports["all"] if t.startswith("samplan.experiment_planning") and t not in PLANNER_PUBLIC]
    assert not bad, "\n".join(sorted(bad))


def test_method_plans_are_torch_free_and_import_no_torch_parts(graph):
    plan_modules = [m for m in graph if m.startswith("samplan.methods.") and m.endswith(".plan")]
    assert {m.split(".")[2] for m in plan_modules} >= {"unet", "samunetr", "medsam", "samzeroshot", "sam_common"}
    for m in plan_modules:
        text = (ROOT.parent / (m.replace(".", "/") + ".py")).read_text(encoding="utf-8")
        assert "import torch" not in text, m
        own = ".".join(m.split(".")[:3])
        torch_parts = [t for t in graph[m]["all"] if t.startswith(own + ".") and not t.endswith((".plan", ".section"))]
        assert not torch_parts, f"{m} imports {torch_parts}: torch parts import plan.py, never the other way"


def test_no_module_level_import_cycles(graph):
    top = {m: {t for t in v["top"] if t in graph and t != m} for m, v in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(top[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(top):
        if m not in state:
            walk(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_a_missing_rule_would_be_caught(graph):
    # the checks see function-level imports too: the predictor's lazy import of the methods registry is found
    assert "samplan.methods" in graph["samplan.inference.predictor"]["all"]
    assert any(t.startswith("samplan.methods") for t in graph["samplan.training.trainer"]["top"])
