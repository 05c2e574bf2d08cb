"""Layers point one way: no module of snapimg imports from a layer above its own.

The layers are the table in docs/architecture.md ("Layers"), parsed here, so the test and
the package map cannot disagree.  Every import counts: at the top, inside a function and
under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "snapimg"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
OUTSIDE = ("vmtests", "tests", "bench", "reliability")  # the product never imports these


def layers(text: str) -> dict[str, int]:
    """``{"errors": 1, ..., "engine": 2, ...}`` from the "Layers" table of the package map."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rank: dict[str, int] = {}
    for number, cell in re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE):
        for name in re.findall(r"`(\w+)`", cell):
            assert name not in rank, f"{name} is in two layers"
            rank[name] = int(number)
    return rank


def parts_of(package: Path) -> list[str]:
    """Top-level modules and subpackages of snapimg: what the layers are made of."""
    return sorted(
        p.stem if p.is_file() else p.name
        for p in package.iterdir()
        if (p.suffix in (".py", ".pyi") and p.stem != "__init__")
        or (p.is_dir() and any(p.glob("*.py")))
    )


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, relative ones resolved; for
    ``from snapimg import x`` the module ``snapimg.x`` where x is one."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.split(".") if path.stem == "__init__" else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base == "snapimg":  # a submodule, or a name of snapimg/__init__.py
                out += [
                    (node.lineno, f"snapimg.{a.name}" if a.name in parts_of(PACKAGE) else base)
                    for a in node.names
                ]
            else:
                out.append((node.lineno, base))
    return out


def part(module: str) -> str | None:
    """The layer part a dotted module name belongs to (None: not snapimg)."""
    names = module.split(".")
    if names[0] != "snapimg":
        return None
    return names[1] if len(names) > 1 else "__init__"  # the root: __version__


def test_every_part_of_snapimg_has_a_layer() -> None:
    rank = layers(ARCHITECTURE.read_text())
    missing = [p for p in parts_of(PACKAGE) if p not in rank]
    assert not missing, f"not in the Layers table of docs/architecture.md: {missing}"
    gone = [name for name in rank if name not in parts_of(PACKAGE)]
    assert not gone, f"in the Layers table but not in snapimg/: {gone}"


def violations(rank: dict[str, int]) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        source = part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert source is not None
        for line, target_module in imported(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target_module}"
            if target_module.split(".")[0] in OUTSIDE:
                found.append(f"{where}: the product imports nothing from {target_module}")
                continue
            target = part(target_module)
            if target is None or target == source or "__init__" in (source, target):
                continue
            have, want = rank[source], rank[target]
            if want > have:
                found.append(f"{where}: layer {want} above {source}'s layer {have}")
            elif want == have and (PACKAGE / source).is_dir():
                found.append(
                    f"{where}: packages of one layer ({have}) import nothing of each other"
                )
    return found


def test_imports_point_down() -> None:
    assert violations(layers(ARCHITECTURE.read_text())) == []


def test_the_check_finds_an_upward_import() -> None:
    """The same check against a wrong order finds the imports that then point up."""
    rank = layers(ARCHITECTURE.read_text())
    swapped = {**rank, "engine": rank["backends"], "backends": rank["engine"]}
    found = violations(swapped)
    assert any(
        v.startswith("snapimg/backends/native.py") and "snapimg.engine" in v for v in found
    ), found
    one_layer = {**rank, "inspect": rank["backup"]}
    found = violations(one_layer)
    assert any(v.startswith("snapimg/inspect/point.py") and "one layer" in v for v in found)
