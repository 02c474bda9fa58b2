"""Progress bars: a nicety, never a dependency."""
from __future__ import annotations

import sys
from typing import Any, Optional


def progress_bar(total: Optional[int], desc: str) -> Optional[Any]:
    """A tqdm bar on stderr (``total`` None: a counter without an end), or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr)
