"""Imports run one way (issue 19): a package imports only from the floors below its own.

ops → downstream / watch → chain → upstream / cache / observability / fleet → config → resilience / adapters →
clock / signals / masking / background. `demo` sits on top (it starts the proxy). Packages on one floor do not
import each other, so each floor can be read without the ones beside it (docs/architecture.md).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"
FLOORS = [
    {"demo"},
    {"ops"},
    {"downstream", "watch"},
    {"chain"},
    {"upstream", "cache", "observability", "fleet"},
    {"config"},
    {"resilience", "adapters"},
    {"clock", "signals", "masking", "background"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level proxy package or module, line) for every `proxy...` import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "proxy":
            parts = node.module.split(".")
            names = [alias.name for alias in node.names] if len(parts) == 1 else [parts[1]]
            found.update((name, node.lineno) for name in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "proxy" and len(parts) > 1:
                    found.add((parts[1], node.lineno))
    return found


def own_package(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if own_package(p) not in ("__init__", "__main__")]


def test_every_package_has_a_floor():
    assert {own_package(p) for p in modules()} <= set(FLOOR), "a new package needs its floor in FLOORS"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    mine = own_package(path)
    upward = [f"line {line}: proxy.{name} (floor {FLOOR[name]}) from {mine} (floor {FLOOR[mine]})"
              for name, line in sorted(imported_packages(path), key=lambda item: item[1])
              if name != mine and name in FLOOR and FLOOR[name] <= FLOOR[mine]]
    assert not upward, "imports must go to lower floors only:\n" + "\n".join(upward)
