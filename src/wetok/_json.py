"""Parsing JSON from user files: every parser failure, including the interpreter's limits (deep nesting, integers
of thousands of digits), becomes one :class:`wetok.errors.InputError` naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["parse_json"]


def parse_json(path: str | Path, data: bytes | str, what: str = "JSON") -> Any:
    """``json.loads(data)``, or :class:`InputError` ``path: not a valid <what> (reason)``.

    Caught: malformed JSON and bad UTF-8, integers beyond :func:`sys.get_int_max_str_digits` (ValueError) and
    nesting deeper than the parser's recursion limit (RecursionError). Callers still check the types they use.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError(path, f"not a valid {what} (nested too deeply)") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not a valid {what} (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except ValueError as err:  # json.JSONDecodeError, and the int-digits limit
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "digits" in reason:
            reason = "an integer with too many digits"
        raise InputError(path, f"not a valid {what} ({reason})") from None
