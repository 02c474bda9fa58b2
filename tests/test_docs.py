"""The documentation builds strictly (mkdocs --strict: broken links and bad references fail) and its
API reference really renders the docstrings."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for text in ("Return a structurally pruned copy", "Soft filter pruning", "Rebuild a model saved"):
        assert text in reference
