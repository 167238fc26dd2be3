"""Lint for the monorepo's shape: component packages stay independent, copies stay identical.

1. No component package (sd-vae, sd-clip, sd-unet, sd-samplers, sd-lora) imports a sibling; only
   sd-pipeline composes them (and sd-server serves sd-pipeline).
2. A module whose first line is ``# Copied from pkg.module`` must equal that module, line for
   line, apart from the marker (STYLE.md, convention 4).
3. No code imports another distribution's private module (``sd_x._anything``): a helper two
   distributions need is either a checked copy (2) or public API. Applies to every package's
   sources and tests, the benchmarks, examples and tools.

Exits 1 and names each violation. ``--fix`` rewrites drifted copies from their source.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("sd_vae", "sd_clip", "sd_unet", "sd_samplers", "sd_lora", "sd_controlnet")
ALL = (*COMPONENTS, "sd_pipeline", "sd_server")
MARKER = "# Copied from "


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_files(root: Path, module: str):
    dist = root / "packages" / module.replace("_", "-")
    for sub in ("src", "tests"):
        yield from sorted((dist / sub).rglob("*.py"))


def check_independence(root: Path = ROOT) -> list[str]:
    errors = []
    for module in COMPONENTS:
        for path in package_files(root, module):
            for other in imported_modules(path) & (set(ALL) - {module}):
                errors.append(f"{path.relative_to(root)}: component {module} imports {other}")
    return errors


def private_imports(path: Path) -> set[str]:
    """The ``sd_x._y`` modules a file imports (``import sd_x._y``, ``from sd_x._y import``,
    ``from sd_x import _y``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0].startswith("sd_") and any(p.startswith("_") for p in parts[1:2]):
                found.add(".".join(parts[:2]))
    return found


def check_private_imports(root: Path = ROOT) -> list[str]:
    errors = []
    files = [(p, p.relative_to(root).parts) for p in sorted(root.glob("packages/*/*/**/*.py"))]
    for extra in ("benchmarks", "examples", "tools"):
        files += [(p, ()) for p in sorted((root / extra).rglob("*.py"))]
    for path, parts in files:
        own = parts[1].replace("-", "_") if len(parts) > 1 else None
        for module in sorted(private_imports(path)):
            if module.split(".")[0] != own and module != "sd_pipeline._version":
                errors.append(
                    f"{path.relative_to(root)}: imports {module}, private to another "
                    "distribution; use its public API"
                )
    return errors


def check_copies(root: Path = ROOT, fix: bool = False) -> list[str]:
    errors = []
    packages = root / "packages"
    for path in sorted(packages.glob("*/src/*/*.py")):
        lines = path.read_text().splitlines(keepends=True)
        if not lines or not lines[0].startswith(MARKER):
            continue
        source_name = lines[0][len(MARKER) :].split(":")[0].split()[0]
        pkg, _, mod = source_name.partition(".")
        source = packages / pkg.replace("_", "-") / "src" / pkg / f"{mod}.py"
        if not source.is_file():
            errors.append(
                f"{path.relative_to(root)}: copied from {source_name}, which does not exist"
            )
        elif fix:
            path.write_text(lines[0] + source.read_text())
        elif source.read_text() != "".join(lines[1:]):
            errors.append(
                f"{path.relative_to(root)} has drifted from {source.relative_to(root)}: "
                "edit the source, then run `python tools/check_packages.py --fix`"
            )
    return errors


def main() -> int:
    errors = check_independence() + check_private_imports()
    errors += check_copies(fix="--fix" in sys.argv[1:])
    for e in errors:
        print(e, file=sys.stderr)
    if not errors:
        print("package independence, private imports and copied modules: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
