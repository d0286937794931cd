"""The map holds: each floor imports only the floors below it (docs/architecture.md, "The map").

Imports are read from the source (not at run time), skipping `if TYPE_CHECKING:` blocks, which exist only for
annotations.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _modules(package: str) -> dict[str, set[str]]:
    base = ROOT / package.replace(".", "/")
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): _runtime_imports(p)
        for p in base.rglob("*.py")
    }


def _offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for module, imports in _modules(package).items():
        bad = sorted(i for i in imports if any(i == f or i.startswith(f + ".") for f in forbidden))
        if bad:
            out[module] = bad
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        (
            "shared.domain",
            ("shared.app", "shared.adapters", "shared.bootstrap", "services", "redis", "litestar", "arq", "openai"),
        ),
        ("shared.app", ("shared.adapters", "shared.bootstrap", "services", "redis", "litestar", "arq", "openai")),
        ("services.api", ("shared.adapters", "redis", "arq")),
        ("services.worker", ("shared.adapters", "redis", "arq")),
    ],
)
def test_a_floor_imports_only_the_floors_below(package: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(package, forbidden) == {}


def test_only_the_composition_root_wires_adapters_for_the_processes() -> None:
    """The CLI and ops reach adapters only through `shared.bootstrap`."""
    assert _offenders("services", ("shared.adapters",)) == {}


def test_the_api_stacks_at_most_four_import_levels() -> None:
    modules = {
        m: {i for i in imports if i.startswith("services.api.")} for m, imports in _modules("services.api").items()
    }

    @functools.cache
    def depth(module: str) -> int:
        return 1 + max((depth(d) for d in modules.get(module, ()) if d != module), default=0)

    deepest = max(modules, key=depth)
    assert depth(deepest) <= 4, (deepest, depth(deepest))
