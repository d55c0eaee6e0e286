"""The package's dependencies point down (README, "Layering"), checked on the source's import statements.

Every import is counted, module-level or inside a function, so a lazy import cannot hide an upward edge.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "megatron_rl"


def imported_modules(source: str) -> set[str]:
    """Absolute module names imported anywhere in `source` ("<relative>" for a relative import)."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module if node.level == 0 else "<relative>")
    return modules


def subpackage_imports(subpackage: str) -> dict[str, set[str]]:
    """{file relative to megatron_rl/: modules it imports} for every file of megatron_rl/<subpackage>/."""
    return {
        str(path.relative_to(PACKAGE_ROOT)): imported_modules(path.read_text())
        for path in sorted((PACKAGE_ROOT / subpackage).rglob("*.py"))
    }


def algorithms_violations(modules: set[str]) -> set[str]:
    """Imports `algorithms` may not make: anything but the standard library, torch and algorithms itself."""

    def allowed(module: str) -> bool:
        top = module.split(".")[0]
        return top in sys.stdlib_module_names or top == "torch" or module.startswith("megatron_rl.algorithms")

    return {module for module in modules if not allowed(module)}


def imports_of_package(modules: set[str], package: str) -> set[str]:
    return {module for module in modules if module == package or module.startswith(package + ".")}


def test_algorithms_imports_only_torch_and_the_standard_library():
    violations = {
        f: bad for f, mods in subpackage_imports("algorithms").items() if (bad := algorithms_violations(mods))
    }
    assert violations == {}


def test_the_algorithms_rule_rejects_an_upward_or_third_party_import():
    source = "import numpy\nfrom megatron_rl.config import Config\ndef f():\n    import megatron.core\n"
    assert algorithms_violations(imported_modules(source)) == {"numpy", "megatron_rl.config", "megatron.core"}
    assert algorithms_violations(imported_modules("from .kl import kl_k3\n")) == {"<relative>"}


@pytest.mark.parametrize(
    ("subpackage", "forbidden"),
    [
        ("learner", "megatron_rl.rollout"),
        ("rollout", "megatron_rl.learner"),
        ("parallel", "megatron_rl.learner"),
        ("parallel", "megatron_rl.rollout"),
        ("parallel", "megatron_rl.trainer"),
        ("learner", "megatron_rl.trainer"),
        ("rollout", "megatron_rl.trainer"),
    ],
)
def test_no_import_points_up_or_across(subpackage, forbidden):
    violations = {
        f: bad for f, mods in subpackage_imports(subpackage).items() if (bad := imports_of_package(mods, forbidden))
    }
    assert violations == {}
