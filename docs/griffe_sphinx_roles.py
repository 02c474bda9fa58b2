"""Griffe extension: render the package's Sphinx-style markup in the mkdocstrings API reference.

structprune's docstrings follow Google style, with Sphinx roles for cross-references
(:func:`slim`, :class:`~structprune.errors.TraceError`, :meth:`Pruner.run`, :mod:`structprune.errors`)
and reST double backticks for inline code. mkdocstrings renders Markdown, where these would show
literally. Once griffe has loaded the package this extension rewrites every docstring:

* a role whose target resolves (Python scoping: the object's class, its module, the enclosing
  modules, then the package) to an object the reference documents becomes a cross-reference,
  ``[`TraceError`][structprune.TraceError]``. "Documents" means a ``::: identifier`` directive on a
  page of the site (``docs/*.md``), or a documented public member of a class so rendered; a member
  that is not rendered itself (a dataclass field) links to its class. Anything else (a private
  helper, an internal module) becomes inline code, so ``mkdocs build --strict`` never meets an
  unresolvable reference;
* reST double-backtick literals become Markdown code spans (single backticks).

Fenced code blocks and ``>>>`` examples are left alone. Sphinx's ``~`` (show the last component) and
explicit titles (``:func:`title <target>```) are honoured.

Registered in mkdocs.yml under the python handler's ``extensions`` option (a path, relative to
mkdocs.yml). ``rewrite`` is plain text in, text out, so tests can call it directly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj|const|type):`(?P<body>[^`\n]+)`")
DOUBLE_BACKTICKS = re.compile(r"(?<!`)``(?!`)(?P<code>[^`\n]+?)(?<!`)``(?!`)")
DIRECTIVE = re.compile(r"^:::[ \t]+(?P<identifier>[\w.]+)[ \t]*$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~)")
TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")

Resolver = Callable[[str], Optional[str]]


def _role(match: "re.Match[str]", resolve: Resolver) -> str:
    body = match.group("body").strip()
    titled = TITLED.fullmatch(body)
    title, target = (titled.group("title"), titled.group("target")) if titled else (None, body)
    target = target.strip().lstrip("!")
    short = target.startswith("~")
    target = target.lstrip("~").lstrip(".")
    text = title or (target.rsplit(".", 1)[-1] if short else target)
    identifier = resolve(target)
    return f"[`{text}`][{identifier}]" if identifier else f"`{text}`"


def rewrite(text: str, resolve: Resolver) -> str:
    """``text`` with every Sphinx role made a cross-reference (``resolve(target)``: the identifier to
    link to, or None for inline code) and every reST double-backtick literal made a Markdown code span,
    outside code blocks and doctest lines."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.lstrip().startswith((">>>", "... ")):
            line = ROLE.sub(lambda match: _role(match, resolve), line)
            line = DOUBLE_BACKTICKS.sub(lambda match: f"`{match.group('code')}`", line)
        lines.append(line)
    return "\n".join(lines)


def _final(obj: Any) -> Any:
    """The object an alias points to, or None where it cannot be resolved (an external package)."""
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles and double backticks of every docstring of the loaded package."""

    def __init__(self, pages: Optional[Iterable[str]] = None) -> None:
        docs = Path(__file__).resolve().parent
        self.pages = [Path(page) for page in pages] if pages is not None else sorted(docs.glob("**/*.md"))
        self.rendered: Dict[str, str] = {}  # path of a documented object -> the identifier its heading has

    # ---- what the site documents ------------------------------------------------------------------------------
    def _collect_rendered(self, collection: Any) -> None:
        for page in self.pages:
            for identifier in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
                try:
                    target = _final(collection[identifier])
                except Exception:  # noqa: BLE001 - another package, or a stale directive: strict mode reports it
                    continue
                if target is None:
                    continue
                self.rendered.setdefault(target.path, identifier)
                if target.is_class:  # mkdocstrings renders the class's own public members that have a docstring
                    for name, member in target.members.items():
                        if not name.startswith("_") and not member.is_alias and member.docstring:
                            self.rendered.setdefault(member.path, f"{identifier}.{name}")

    def _identifier(self, obj: Any) -> Optional[str]:
        target = _final(obj)
        if target is None:
            return None
        if target.is_module and target.path not in self.rendered and target.name in target.members:
            # a submodule shadowing the function it defines (structprune.slim): Python's name is the function
            target = _final(target.members[target.name])
            if target is None:
                return None
        node = target
        while node is not None and not node.is_module:  # an undocumented member links to its class
            if node.path in self.rendered:
                return self.rendered[node.path]
            node = node.parent
        return self.rendered.get(target.path)

    def _resolver(self, obj: Any, collection: Any, package: str) -> Resolver:
        scopes = []
        scope = obj
        while scope is not None:
            if scope.is_class or scope.is_module:
                scopes.append(scope.path)
            scope = scope.parent

        def resolve(target: str) -> Optional[str]:
            candidates = [target] if target.split(".")[0] == package else []
            candidates += [f"{path}.{target}" for path in scopes]
            for candidate in candidates:
                try:
                    found = collection[candidate]
                except Exception:  # noqa: BLE001 - not there (KeyError) or behind an external alias
                    continue
                return self._identifier(found)  # the innermost scope wins, as in Python
            return None

        return resolve

    # ---- the hook ---------------------------------------------------------------------------------------------
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        if not self.rendered:
            self._collect_rendered(collection)
        self._walk(pkg, collection, pkg.name)

    def _walk(self, obj: Any, collection: Any, package: str) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, self._resolver(obj, collection, package))
            obj.docstring.__dict__.pop("parsed", None)  # parsed lazily; drop a stale parse should there be one
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, collection, package)
