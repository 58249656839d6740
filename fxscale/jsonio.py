"""The project's JSON files: reading with errors that say where, atomic writes, the cache
folder. No torch."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def read_json(text_or_path: str | Path) -> tuple[Any, str]:
    """Parse JSON text, or the file at a path; return (data, where) for error messages."""
    text = str(text_or_path)
    where = "<json>"
    if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
        where, text = text, Path(text_or_path).read_text()
    try:
        return json.loads(text), where
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON (line {err.lineno}, column {err.colno}): "
                         f"{err.msg}") from None


def cache_root() -> Path:
    """Where fxscale caches results: $FXSCALE_CACHE_DIR, else $XDG_CACHE_HOME/fxscale."""
    root = os.environ.get("FXSCALE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fxscale")
    return Path(root)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a concurrent reader sees the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
