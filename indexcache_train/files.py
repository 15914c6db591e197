"""Result files written so that a crash mid-write leaves the previous version whole."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to a sibling temporary file, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
