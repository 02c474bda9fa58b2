"""The API reference (docs/reference.md, rendered by mkdocstrings) documents every public name and
renders the docstrings as what they are: cross-references instead of literal Sphinx roles, ``slim``'s
keyword options as a parameter table, code examples as code blocks."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import structprune as sp
from structprune.options import Options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "docs", "reference.md")
DIRECTIVE = re.compile(r"^:::[ \t]+([\w.]+)[ \t]*$", re.MULTILINE)
SPHINX_ROLES = (":func:", ":class:", ":meth:", ":attr:", ":data:", ":mod:", ":exc:", ":obj:")


def _directives() -> list:
    with open(REFERENCE, encoding="utf-8") as f:
        return DIRECTIVE.findall(f.read())


def _own_docstring(obj) -> str:
    doc = (obj.__doc__ or "").strip()
    if isinstance(obj, type) and doc.startswith(f"{obj.__name__}("):
        return ""  # the signature @dataclass writes into a class that has no docstring
    return doc


@pytest.mark.parametrize("name", sp.__all__)
def test_every_public_name_has_a_docstring(name):
    assert _own_docstring(getattr(sp, name)), f"structprune.{name} has no docstring of its own"


def test_every_public_name_has_a_reference_entry():
    """Each name of ``structprune.__all__`` is rendered by a ``::: identifier`` directive that, as griffe
    (mkdocstrings' loader) resolves it, is that very object: ``::: structprune.slim`` would render the
    submodule ``structprune.slim``, not the function."""
    griffe = pytest.importorskip("griffe", reason="griffe comes with mkdocstrings[python], in the test extra")
    package = griffe.load("structprune", search_paths=[REPO], resolve_aliases=True)
    rendered = set()
    for identifier in _directives():
        obj = package[identifier[len("structprune."):]] if identifier != "structprune" else package
        rendered.add(obj.final_target.path if obj.is_alias else obj.path)
    missing = []
    for name in sp.__all__:
        obj = getattr(sp, name)
        if f"{obj.__module__}.{obj.__qualname__}" not in rendered:
            missing.append(name)
    assert not missing, f"docs/reference.md has no entry rendering {missing}"


# ---- the rendered reference ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_html(tmp_path_factory) -> str:
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra (pip install -e '.[test]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is in the test extra")
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(site / "reference" / "index.html", encoding="utf-8") as f:
        return f.read()


def _section(html: str, identifier: str) -> str:
    """The HTML of one top-level entry: from its heading to the next top-level heading."""
    start = html.index(f'id="{identifier}"')
    end = html.find("<h3 ", start + 1)
    return html[start:end if end > 0 else len(html)]


def test_reference_shows_no_sphinx_or_rest_markup(reference_html):
    text = re.sub(r"<[^>]+>", "", reference_html)  # the visible text, not attributes
    assert not [role for role in SPHINX_ROLES if role in text]
    assert "``" not in text
    # a role naming a documented object became a link to it
    assert 'href="#structprune.TraceError"' in reference_html
    assert 'href="#structprune.slim.slim"' in reference_html


def test_slim_keyword_options_render_as_a_parameter_table(reference_html):
    slim = _section(reference_html, "structprune.slim.slim")
    rows = set(re.findall(r"<td>\s*<code>(\w+)</code>\s*</td>", slim))
    assert {"model", "example_input", "ratio"} <= rows
    assert set(Options.names()) <= rows, f"options without their own entry: {set(Options.names()) - rows}"


def test_code_examples_render_as_code_blocks(reference_html):
    assert "<blockquote>" not in reference_html  # what a bare ">>> code" line becomes in Markdown
    for identifier in ("structprune.DependencyGraph", "structprune.LotteryTicket", "structprune.PruningSession",
                       "structprune.masks.sparsify.sparsify", "structprune.iter_groups"):
        assert re.search(r"<pre[^>]*>\s*(<span></span>)?<code", _section(reference_html, identifier)), identifier


@pytest.mark.parametrize("name", ["count_macs", "count_parameters", "latency_ms", "VerificationResult",
                                  "StructPruneError", "TraceError", "ExampleInputError", "InvalidModelError",
                                  "InvalidOptionError", "InvalidRatioError", "VerificationError", "LoadError"])
def test_reference_renders_metrics_errors_and_verification(reference_html, name):
    assert f'id="structprune.{name}"' in reference_html


# ---- the griffe extension that rewrites the roles -----------------------------------------------------------------
def _extension():
    pytest.importorskip("griffe", reason="griffe comes with mkdocstrings[python], in the test extra")
    spec = importlib.util.spec_from_file_location("griffe_sphinx_roles",
                                                  os.path.join(REPO, "docs", "griffe_sphinx_roles.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roles_become_cross_references_or_code():
    rewrite = _extension().rewrite
    known = {"slim": "structprune.slim.slim", "structprune.errors.TraceError": "structprune.TraceError"}
    text = ("Like :func:`slim`; raises :class:`~structprune.errors.TraceError` (see :mod:`structprune.x`, "
            ":meth:`a title <slim>`), ``ratio=0.5``.\n```python\nx = ``kept``  # :func:`kept`\n```\n"
            ">>> f(``kept``)")
    assert rewrite(text, known.get) == (
        "Like [`slim`][structprune.slim.slim]; raises [`TraceError`][structprune.TraceError] (see "
        "`structprune.x`, [`a title`][structprune.slim.slim]), `ratio=0.5`.\n```python\nx = ``kept``  "
        "# :func:`kept`\n```\n>>> f(``kept``)")
