"""Reading the project's JSON files (GroupGraph, Profile) with errors that say where. No torch."""
from __future__ import annotations

import json
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
