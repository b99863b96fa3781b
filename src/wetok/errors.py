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
