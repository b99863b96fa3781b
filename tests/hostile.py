"""Running ``wetok`` on hostile input in a subprocess and checking the promise made for bad input.

The promise (README, "Security and limits"): one line on stderr, exit code 2, no traceback, nothing left in the
output folder, and bounded memory. :func:`run_wetok` runs the command in a child Python whose peak resident memory
(``VmHWM`` from ``/proc/self/status``, read at exit) comes back with the result; :func:`assert_refused` checks
the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: Peak resident memory (MiB) any refused hostile input may cost: Python + torch + a small model is ~400-600 MiB.
DEFAULT_PEAK_MIB = 1500

_DRIVER = r"""
import atexit, os, sys

def _peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(os.environ["WETOK_PEAK_FILE"], "w") as out:
                    out.write(line.split()[1])

atexit.register(_peak)
sys.argv = ["wetok", *sys.argv[1:]]
from wetok.cli.main import main
sys.exit(main())
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    peak_mib: float  #: peak resident memory of the child, in MiB (nan if it could not be read)

    @property
    def lines(self) -> list[str]:
        """stderr lines, without notes about randomly initialised test models."""
        return [line for line in self.stderr.strip().splitlines()
                if line and not (line.startswith("note: ") and "randomly initialised" in line)]


def run_wetok(*args: str | os.PathLike, cwd: Path | None = None, timeout: float = 300,
              env: dict[str, str] | None = None) -> Result:
    """Run ``wetok ARGS`` in a fresh interpreter (one thread) and return its exit code, output and peak memory."""
    peak_file = Path(cwd or ".").resolve() / f".peak-{os.getpid()}-{id(args)}"
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WETOK_PEAK_FILE": str(peak_file),
                 **(env or {})}
    src = Path(__file__).resolve().parents[1] / "src"
    child_env["PYTHONPATH"] = os.pathsep.join([str(src), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-c", _DRIVER, *map(str, args)], cwd=cwd, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    try:
        peak = int(peak_file.read_text()) / 1024
        peak_file.unlink()
    except (OSError, ValueError):
        peak = float("nan")
    return Result(done.returncode, done.stdout, done.stderr, peak)


def assert_refused(result: Result, *, contains: str | tuple[str, ...] = (), output: Path | None = None,
                   peak_mib: float = DEFAULT_PEAK_MIB) -> str:
    """Exit 2, exactly one stderr line (containing each of ``contains``), no traceback, nothing written under
    ``output`` (no file there, no hidden temporary), and peak memory under ``peak_mib``. Returns the line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.lines) == 1, result.lines
    line = result.lines[0]
    for text in (contains,) if isinstance(contains, str) else contains:
        assert text in line, (text, line)
    if output is not None:
        left = [p for p in (output.rglob("*") if output.is_dir() else [output]) if p.exists()]
        assert left == [] or (output.is_dir() and all(p.is_dir() for p in left)), left
    assert not result.peak_mib > peak_mib, f"peak memory {result.peak_mib:.0f} MiB > {peak_mib} MiB"
    return line
