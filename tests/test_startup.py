"""Start-up stays light: ``import structprune`` imports no optional library (issue 16, item 8).

Deterministic checks of ``sys.modules`` in a fresh interpreter, not timings (those are in
``benchmarks/import_time.py``). torchvision's rules are keyed by its functions, so they are registered
only once torchvision is imported: these tests also check that they still apply then.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("torchvision", "transformers", "timm", "matplotlib", "networkx", "scipy")


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
