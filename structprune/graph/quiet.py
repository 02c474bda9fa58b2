"""torch.export's graph dumps, kept off stderr.

When ``torch.export`` fails, it prints the partial graph it had captured to stderr
(``print(e.partial_fx_graph, file=sys.stderr)``): thousands of lines for a detector. structprune's
fallbacks make such failures routine (torch.fx first, then torch.export, then part by part) and report
them in its own words, so these dumps are noise to the user. :func:`without_graph_dumps` drops them
while everything else written to stderr passes through; the CLI also strips them from error messages
(:data:`DUMP_START`).
"""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Iterator, TextIO

# the first line of a dump: a generated forward or GraphModule (torch.export, torch.fx), fx's original traceback
DUMP_START = re.compile(r"^\s*(def forward\(self|class \w+\(torch\.nn\.Module\)|class GraphModule\(|"
                        r"Original traceback:)")


class DumpFilter:
    """A text stream that passes everything to ``stream`` except graph dumps: one ``write`` that starts like a
    dump (``print`` writes its whole argument at once) and the newline ``print`` writes after it."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._dropped = False  # print() writes its end="\n" separately: drop that too

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, False
        if DUMP_START.match(text):
            self._dropped = True
        elif not (dropped and text == "\n"):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's answers
        return getattr(self.stream, name)


@contextlib.contextmanager
def without_graph_dumps() -> Iterator[None]:
    """Within the block, graph dumps written to ``sys.stderr`` are dropped (nested blocks filter once)."""
    if isinstance(sys.stderr, DumpFilter):
        yield
        return
    with contextlib.redirect_stderr(DumpFilter(sys.stderr)):
        yield
