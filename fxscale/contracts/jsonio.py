"""The project's JSON files: reading with errors that say where, field checks, atomic writes
(of one file, or of a whole folder), the cache folder. No torch."""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from fxscale.contracts.errors import InputError

MAX_JSON_BYTES = 256 << 20  # a contract file past this is not one fxscale wrote


def read_json(text_or_path: str | Path) -> tuple[Any, str]:
    """Parse JSON text, or the file at a path; return (data, where) for error messages."""
    text = str(text_or_path)
    where = "<json>"
    if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
        where, text = text, read_text(Path(text_or_path), "a JSON file")
    try:
        return json.loads(text, parse_constant=_no_constant), where
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON (line {err.lineno}, column {err.colno}): "
                         f"{err.msg}") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    except _NotJSONNumber as err:
        raise InputError(f"{where}: {err} (JSON has no NaN or Infinity)") from None


def read_text(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a file, or an InputError naming it (missing, a folder, too big,
    not text)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give {what}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    if path.stat().st_size > limit:
        raise InputError(f"{path}: {path.stat().st_size} bytes is larger than {what} can be "
                         f"({limit} bytes)")
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not content
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}); give {what}") from None


class _NotJSONNumber(Exception):
    """NaN or Infinity in a JSON text (Python's reader would accept them)."""


def _no_constant(name: str) -> NoReturn:
    """Refuse NaN and Infinity."""
    raise _NotJSONNumber(f"{name} is not a JSON number")


class Checker:
    """Field checks of one file whose errors (InputError) name the file and the field path."""

    def __init__(self, where: str, what: str) -> None:
        self.where, self.what = where, what

    def fail(self, path: str, message: str) -> NoReturn:
        """Raise the error for one field."""
        at = f"field '{path}'" if path else self.what
        raise InputError(f"{self.where}: {at} {message}")

    def get(self, data: dict, name: str, prefix: str = "", default: Any = ...) -> Any:
        """A field's value (required unless a default is given)."""
        if name in data:
            return data[name]
        if default is ...:
            raise InputError(f"{self.where}: missing field '{prefix}{name}' ({self.what})")
        return default

    def unknown(self, data: dict, known: set[str], prefix: str = "") -> None:
        """Refuse fields the contract does not have (a typo would otherwise be ignored)."""
        extra = sorted(set(data) - known)
        if extra:
            raise InputError(f"{self.where}: unknown field(s) {[prefix + e for e in extra]} "
                             f"({self.what} has {sorted(known)})")

    def object(self, value: Any, path: str) -> dict:
        """A JSON object."""
        if not isinstance(value, dict):
            self.fail(path, f"must be a JSON object, got {_shown(value)}")
        return value

    def array(self, value: Any, path: str, nonempty: bool = False) -> list:
        """A JSON array (optionally non-empty)."""
        if not isinstance(value, list):
            self.fail(path, f"must be a JSON array, got {_shown(value)}")
        if nonempty and not value:
            self.fail(path, "must not be empty")
        return value

    def string(self, value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
        """A string (optionally one of `choices`)."""
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_shown(value)}")
        if choices is not None and value not in choices:
            self.fail(path, f"must be one of {list(choices)}, got {value!r}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        """true or false."""
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_shown(value)}")
        return value

    def number(self, value: Any, path: str, minimum: float | None = None,
               integer: bool = False) -> float:
        """A finite number (an integer when asked), at least `minimum` when given."""
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or \
                not math.isfinite(value):
            self.fail(path, f"must be {'an integer' if integer else 'a finite number'}, "
                            f"got {_shown(value)}")
        if minimum is not None and value < minimum:
            self.fail(path, f"must be >= {minimum:g}, got {value!r}")
        return value


def _shown(value: Any) -> str:
    """A value as an error message shows it: short, with its JSON type."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:60]}{'...' * (len(text) > 60)}"


def cache_root() -> Path:
    """Where fxscale caches results: $FXSCALE_CACHE_DIR, else $XDG_CACHE_HOME/fxscale."""
    root = os.environ.get("FXSCALE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fxscale")
    return Path(root)


def output_file(target: str | Path, what: str = "output") -> Path:
    """A path a command may write one file to: not a directory, in a folder that exists or
    can be made; an InputError otherwise (before any work is done)."""
    path = Path(target)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name for the {what}")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path}: {path.parent} is a file, not a folder")
    return path


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file so that a concurrent reader sees the old or the new content, never half
    (with the permissions a plain write gives: the user's umask applies)."""
    path = output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    data = text.encode() if isinstance(text, str) else text
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_folder(target: str | Path, ours: Callable[[str], bool], what: str) -> Path:
    """A folder a command may replace as a whole: missing, or holding only files the command
    writes (`ours(name)`), so replacing it loses nothing else; an InputError otherwise."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} is a file; give a directory for the {what} "
                         "(created if missing)")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if not ours(p.name))
        if foreign:
            raise InputError(f"{target} holds files that are not part of an earlier {what} "
                             f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                             "give a new or empty directory, or move them")
    return target


@contextlib.contextmanager
def replace_folder(target: str | Path, ours: Callable[[str], bool],
                   what: str) -> Iterator[Path]:
    """Write a folder of files as one change: the block writes into a fresh sibling folder,
    which replaces `target` only when the block finishes; on any error (or an interrupt)
    `target` keeps its earlier content and the partial folder is removed. `target` may hold
    only files of an earlier run (see output_folder)."""
    target = output_folder(target, ours, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "new")
    staging.mkdir()  # mode 0o777 less the umask, as a plain mkdir of the target would be
    try:
        yield staging
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside `target` (.name.<random>.kind)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.{kind}")


def _swap_in(staging: Path, target: Path) -> None:
    """Put a finished folder in place of `target`: two renames, so at every moment `target`
    (or, for an instant, its backup beside it) holds one complete version."""
    if not target.exists():
        os.replace(staging, target)
        return
    backup = _sibling(target, "old")
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
