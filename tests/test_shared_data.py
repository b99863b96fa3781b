"""tests/conftest.py: without the shared folder, official-parity tests fail under CI=true and skip otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PARITY_TEST = '''
import pytest

from conftest import FIXTURES


@pytest.mark.shared(FIXTURES / "tiny_ds16_g4.ckpt")
def test_parity():
    assert False, "must not run without its fixture"
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """Run a parity test with tests/conftest.py as a plugin, the shared folder pointing nowhere."""
    (tmp_path / "test_parity.py").write_text(PARITY_TEST)
    env = {**os.environ, "WETOK_SHARED": str(tmp_path / "no-shared"), "PYTHONPATH": str(TESTS)}
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_parity.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_shared_data_fails_in_ci_and_skips_locally(tmp_path):
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert "no-shared/fixtures/official/tiny_ds16_g4.ckpt" in local.stdout  # the skip says what is missing
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout + ci.stderr
    assert "CI=true, so this is a failure" in ci.stdout
