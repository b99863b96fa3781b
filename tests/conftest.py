"""Where the tests find the project's shared data, and what happens when it is missing.

The shared folder (``../shared`` beside the checkout, else ``/work/shared``; ``WETOK_SHARED`` overrides both) holds
the official fixtures, the official state-dict key lists and a folder of validation photographs.

* Photographs: :data:`PHOTOS` is the shared validation folder, or the repository's ``examples/images`` when it is
  missing, so tests that only need real photographs always run. :data:`PHOTO` is one of them.
* Official parity: tests marked ``@pytest.mark.shared(path, ...)`` need those files. Where one is missing they
  fail with the missing path when ``CI`` is true (a CI job must not pass by skipping them), and skip with the
  reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    if "WETOK_SHARED" in os.environ:
        return Path(os.environ["WETOK_SHARED"])
    beside = REPO.parent / "shared"
    return beside if beside.is_dir() else Path("/work/shared")


SHARED = _shared_root()
FIXTURES = SHARED / "fixtures" / "official"
OFFICIAL_KEYS = SHARED / "spec" / "official-keys"
VAL = SHARED / "data" / "images" / "val"
EXAMPLES = REPO / "examples" / "images"
#: Real photographs: the shared validation images, else the repository's examples.
PHOTOS = VAL if VAL.is_dir() else EXAMPLES
#: One photograph (the one the tests were written with where it exists).
PHOTO = VAL / "101085.jpg" if (VAL / "101085.jpg").is_file() else sorted(EXAMPLES.glob("*.png"))[0]
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    # the fast path's measured convolution choices go to a folder of this run, not the user's ~/.cache (inherited
    # by the CLI subprocesses the tests start)
    if "WETOK_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["WETOK_CACHE_DIR"] = tempfile.mkdtemp(prefix="wetok-test-cache-")
    config.addinivalue_line(
        "markers", "shared(*paths): needs these files of the shared folder; fails under CI=true if missing, else skips"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("shared"):
        missing = [str(p) for p in marker.args if not Path(p).exists()]
        if missing:
            message = f"shared test data not found: {', '.join(missing)} (set WETOK_SHARED to the shared folder)"
            if CI:
                pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
            pytest.skip(message)
