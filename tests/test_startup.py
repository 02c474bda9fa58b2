"""Start-up stays light: ``import structprune`` imports no optional library (issue 16, item 8).

Deterministic checks of ``sys.modules`` in a fresh interpreter, not timings (those are in
``benchmarks/import_time.py``). torchvision's rules are keyed by its functions, so they are registered
only once torchvision is imported: these tests also check that they still apply then.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torchvision", "transformers", "timm", "matplotlib", "networkx", "scipy")
STUB = Path(__file__).parent.parent / "structprune" / "__init__.pyi"


def run_fresh(code: str) -> str:
    """stdout of ``code`` run in a new interpreter (the test process has imported everything already)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_structprune_loads_no_optional_library():
    out = run_fresh(f"""
        import sys
        import structprune
        import structprune.cli.main
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_import_structprune_does_not_import_torch():
    # torch alone takes over 2 s to import on a 2-core machine: the public names load on first use
    out = run_fresh("""
        import sys
        import structprune
        print("torch" in sys.modules, structprune.__version__)
    """)
    assert out.split()[0] == "False"


def test_every_public_name_resolves_to_its_object_and_none_is_shadowed_by_its_module():
    # structprune.slim is both a module and the function it defines: importing the module (as the package's own
    # modules do) must not replace the function on the package
    out = run_fresh("""
        import inspect
        import structprune.slim, structprune.tools.io
        import structprune as sp
        missing = [n for n in sp.__all__ if getattr(sp, n, None) is None]
        modules = [n for n in sp.__all__ if inspect.ismodule(getattr(sp, n))]
        print(missing, modules, callable(sp.slim), sorted(dir(sp)) == sorted(sp.__all__))
    """)
    assert out.split() == ["[]", "[]", "True", "True"]


def test_the_stub_lists_the_public_api():
    # one source of truth: __all__ is exactly what __init__.pyi imports
    import ast

    import structprune as sp

    tree = ast.parse(STUB.read_text())
    imported = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == set(sp.__all__) and len(imported) > 60
    assert not hasattr(sp, "no_such_name")


def test_torchvision_rules_apply_once_torchvision_is_imported_even_inside_override():
    # StochasticDepth's function is fx-wrapped by torchvision: a call_function node whose rule is registered lazily.
    # The first lookup happens inside override(), whose exit restores the registry: the rule must survive it.
    out = run_fresh("""
        import torch
        import structprune as sp
        from structprune.ops import registry
        from structprune.ops.activation import unary
        import torchvision

        traced = torch.fx.symbolic_trace(torchvision.ops.StochasticDepth(0.1, "row"))
        node = next(n for n in traced.graph.nodes if n.op == "call_function")
        with registry.override():
            inside = registry.lookup(node, {}) is unary
        after = registry.lookup(node, {}) is unary
        names = [spec.name for spec in sp.list_ops("function")]
        print(inside, after, "torchvision.models.swin_transformer.shifted_window_attention" in names)
    """)
    assert out.split() == ["True", "True", "True"]


def test_help_and_version_do_not_import_torch():
    out = run_fresh("""
        import contextlib, io, sys
        from structprune.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()) as text:
            codes = [main(argv) for argv in (["--help"], ["slim", "--help"], ["export", "--help"], ["--version"])]
        print(codes, "torch" in sys.modules, "wanda" in text.getvalue())
    """)
    assert out.split() == ["[0,", "0,", "0,", "0]", "False", "True"]


def test_the_criteria_help_names_are_the_registered_ones():
    from structprune.cli.main import BUILT_IN_CRITERIA

    out = run_fresh("import structprune as sp; print(' '.join(sp.list_criteria()))")
    assert tuple(out.split()) == BUILT_IN_CRITERIA
