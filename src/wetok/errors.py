"""Exceptions a user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class WetokError(Exception):
    """Base class for errors caused by user input or user-supplied files."""


class InputError(WetokError):
    """A bad input file or argument. The message names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelMismatchError(WetokError):
    """Tokens or weights made for one model were given to another."""


class CheckpointError(WetokError):
    """A checkpoint or config that cannot be loaded (missing / unexpected keys, wrong shapes, bad config)."""


def printable(text: object) -> str:
    """``text`` with every non-printable character escaped as in a Python literal (``\\n``, ``\\r``, ``\\x1b``,
    ``\\u202e``), so that names read from files (model names, paths) cannot forge extra lines or terminal escapes
    in a message. Ordinary spaces and printable non-ASCII characters are kept."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err``'s message (at most ``limit`` characters), or its type's name when it has none:
    third-party messages (torch, safetensors, huggingface_hub) often span many lines."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def describe_error(err: BaseException, what: object = None) -> str:
    """One line for an exception raised while working on ``what`` (a file name, or None): the message of a
    :class:`WetokError`; for file-system errors the file and the operating system's reason ("x.png: permission
    denied"); otherwise the exception type and message. Non-printable characters are escaped (:func:`printable`)."""
    if isinstance(err, WetokError):
        return printable(err)
    if isinstance(err, OSError) and err.strerror:
        name = err.filename if err.filename is not None else what
        reason = err.strerror[0].lower() + err.strerror[1:]
        return printable(f"{name}: {reason}" if name is not None else reason)
    if isinstance(err, MemoryError):
        reason = "out of memory" + (f" ({err})" if str(err) else "")
    elif isinstance(err, RecursionError):
        reason = "too deeply nested to process"
    else:
        reason = f"unexpected {type(err).__name__}" + (f": {err}" if str(err) else "")
    return printable(f"{what}: {reason}" if what is not None else reason)
