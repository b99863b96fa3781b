"""The library versions a report records next to its figures."""

from __future__ import annotations

import platform
from importlib import metadata


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Python's version and each installed distribution's in ``names`` ("not installed" where absent)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
