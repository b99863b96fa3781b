"""Field checks shared by the model configurations (:class:`wetok.WeTokConfig`, ``WeTokARConfig``) and the
training recipes: exact types (a bool is not an integer, a string is not a number), ranges, and the size bound
that every configuration passes before a module is built.

Hand-written rather than pydantic: the checks are a handful of ranges on frozen dataclasses that must stay plain
dataclasses (their constructor arguments are the saved ``config.json``).
"""

from __future__ import annotations

import math
import numbers
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, Union

__all__ = ["MAX_PARAMETERS_ENV", "check_bool", "check_choice", "check_float", "check_int", "check_size", "conform",
           "describe_type", "max_parameters"]

#: Environment variable that raises the parameter bound of every model configuration.
MAX_PARAMETERS_ENV = "WETOK_MAX_PARAMETERS"
#: Default bound: 2e9 parameters, 8 GB of float32 weights (the largest official tokenizer has 1.7e9).
DEFAULT_MAX_PARAMETERS = 2_000_000_000


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (bools, floats and strings are refused), within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are Integral
        raise TypeError(f"{name} must be an integer, got {_show(value)}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` (an int or float, not a bool) as a finite float within the range (bounds closed unless
    ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {_show(value)}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'above' if low_open else 'at least'} {low}, got {number}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name} must be {'below' if high_open else 'at most'} {high}, got {number}")
    return number


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {_show(value)}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def check_optional_str(name: str, value: Any, max_length: int = 4096) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or null, got {_show(value)}")
    if value is not None and len(value) > max_length:
        raise ValueError(f"{name} is longer than {max_length} characters")
    if value is not None and not value.isprintable():
        raise ValueError(f"{name} must be printable text (no line breaks or control characters)")
    return value


def max_parameters() -> int:
    """The parameter bound: ``$WETOK_MAX_PARAMETERS`` when set to a number above the default (``3e9`` notation
    accepted), else :data:`DEFAULT_MAX_PARAMETERS`. The bound can only be raised: every registered configuration
    is built when wetok is imported."""
    raw = os.environ.get(MAX_PARAMETERS_ENV, "").strip()
    try:
        return max(DEFAULT_MAX_PARAMETERS, int(float(raw))) if raw else DEFAULT_MAX_PARAMETERS
    except (ValueError, OverflowError):
        return DEFAULT_MAX_PARAMETERS


def check_size(what: str, parameters: int) -> None:
    """Refuse a configuration of more than :func:`max_parameters` parameters, before anything is allocated."""
    bound = max_parameters()
    if parameters > bound:
        raise ValueError(
            f"{what} would have {parameters:.3g} parameters ({4 * parameters / 2**30:.1f} GiB in float32), above "
            f"the limit of {bound:.3g}; set {MAX_PARAMETERS_ENV} to allow more"
        )


def conform(value: Any, hint: Any) -> Any:
    """``value`` checked against a field's type ``hint`` (and converted: a list to a tuple, an int or a numeric
    string to a float, an integral float to an int), or TypeError. A bool is not a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return conform(value, arg)
            except TypeError:
                continue
        raise TypeError
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(conform(v, a) for v, a in zip(value, args, strict=True))
    elif origin is list:
        if isinstance(value, list):
            return [conform(v, args[0]) for v in value]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
    raise TypeError


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return _TYPE_NAMES.get(hint, str(hint))
