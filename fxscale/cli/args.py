"""What every `fxscale` command shares: argument types that reject bad values with a one-line
message (argparse turns them into exit 2), output targets checked before the work starts, and
JSON written atomically or to stdout."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from fxscale.contracts.errors import InputError
from fxscale.contracts.jsonio import output_file, write_atomic

# Zoo models are built with random weights on this machine: sizes it can hold.
MAX_LAYERS = 256
MAX_HIDDEN = 16384
HEAD_DIM = 16  # zoo models have hidden // 16 heads


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    """Parse a number, or an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive(text: str) -> int:
    """argparse type: a positive integer."""
    value = _number(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def bounded(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        value = _number(text, int, "an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}"
                                             f"{what}, got {text}")
        return value
    return parse


layers = bounded(1, MAX_LAYERS)


def hidden(text: str) -> int:
    """argparse type: a zoo model's hidden size (a multiple of the 16-wide heads)."""
    value = bounded(HEAD_DIM, MAX_HIDDEN)(text)
    if value % HEAD_DIM:
        raise argparse.ArgumentTypeError(f"must be a multiple of {HEAD_DIM} (zoo models have "
                                         f"{HEAD_DIM}-wide heads), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a positive number."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def json_target(text: str) -> str:
    """argparse type: where JSON goes, '-' for stdout or a file path (not a directory)."""
    if text != "-":
        _checked_file(text)
    return text


def file_target(text: str) -> str:
    """argparse type: a file to write (not a directory)."""
    _checked_file(text)
    return text


def _checked_file(text: str) -> None:
    """An argparse error when a path cannot be written as a file."""
    try:
        output_file(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def write_json(data: Any, target: str) -> None:
    """Write JSON to a file (atomically), or to stdout when the target is '-'."""
    text = json.dumps(data, indent=1)
    if target == "-":
        print(text)
    else:
        write_atomic(Path(target), text + "\n")


def model_args(parser: argparse.ArgumentParser, names: Sequence[str], default_layers: int,
                example_shape: bool = True) -> None:
    """Options that pick and size a zoo model (and the example input's shape)."""
    parser.add_argument("--model", choices=names, default="llama")
    parser.add_argument("--layers", type=layers, default=default_layers)
    parser.add_argument("--hidden", type=hidden, default=64,
                        help="hidden size, a multiple of 16 (default 64)")
    if example_shape:
        parser.add_argument("--batch", type=positive, default=2)
        parser.add_argument("--length", type=positive, default=16)
