"""Structure figures of the package: module sizes, longest functions, comment share, import layers.

    python benchmarks/layout_metrics.py            # a table on stdout
    python benchmarks/layout_metrics.py --json     # the same as JSON

Reads the source with ``ast`` only (nothing is imported), so it runs on any checkout and gives the
before/after figures of a restructuring.
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
from typing import Dict, List, Set, Tuple

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "structprune"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, name: str, is_package: bool) -> Set[str]:
    """Package-internal modules imported at module level (function-local imports are lazy and skipped)."""
    found: Set[str] = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in tree.body if isinstance(tree, ast.Module) else []:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("structprune"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("structprune"))
    return found


def measure() -> Dict:
    modules: Dict[str, Dict] = {}
    functions: List[Tuple[int, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        name = _module_name(path)
        lines = text.splitlines()
        comments = sum(1 for line in lines if line.strip().startswith("#"))
        modules[name] = {"lines": len(lines), "comments": comments,
                         "imports": sorted(_imports(tree, name, path.name == "__init__.py"))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    # import layers: a module's layer is one more than the deepest package module it imports
    layer: Dict[str, int] = {}

    def depth(mod: str, seen: Tuple[str, ...] = ()) -> int:
        if mod in layer:
            return layer[mod]
        if mod in seen or mod not in modules:
            return 0
        deps = [d for d in modules[mod]["imports"] if d != mod]
        layer[mod] = 1 + max((depth(d, seen + (mod,)) for d in deps), default=-1)
        return layer[mod]

    for mod in modules:
        depth(mod)
    functions.sort(reverse=True)
    total = sum(m["lines"] for m in modules.values())
    return {"modules": len(modules), "lines": total,
            "comment_share": sum(m["comments"] for m in modules.values()) / max(total, 1),
            "largest_modules": sorted(((m["lines"], n) for n, m in modules.items()), reverse=True)[:8],
            "longest_functions": functions[:8], "functions_over_60": sum(1 for n, _ in functions if n > 60),
            "modules_over_400": sum(1 for m in modules.values() if m["lines"] > 400),
            "import_layers": 1 + max(layer.values(), default=0),
            "folders": sorted({n.rsplit(".", 1)[0] for n in modules if n.count(".") >= 2})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    figures = measure()
    if parser.parse_args().json:
        print(json.dumps(figures, indent=1))
        return
    print(f"{figures['modules']} modules, {figures['lines']} lines, comments {figures['comment_share']:.1%}, "
          f"{figures['import_layers']} import layers, {figures['modules_over_400']} modules over 400 lines, "
          f"{figures['functions_over_60']} functions over 60 lines")
    print("folders:", ", ".join(figures["folders"]) or "(flat)")
    print("largest modules:", ", ".join(f"{n} {lines}" for lines, n in figures["largest_modules"]))
    print("longest functions:", ", ".join(f"{n} {lines}" for lines, n in figures["longest_functions"]))


if __name__ == "__main__":
    main()
