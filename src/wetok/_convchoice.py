"""Which float32 3x3 convolution runs faster on this machine, Winograd (NNPACK) or oneDNN's direct one, per layer
shape: measured once, remembered in a per-machine cache file.

The mode comes from the environment variable ``WETOK_CONV_CHOICE``:

* ``measure`` (default): the first call of a layer shape (channels in and out, torch threads, and batch and
  pixels per map rounded to powers of two) times both kernels, each on a random input of that shape in its own
  layout (Winograd NCHW, oneDNN channels_last: what a chain of such layers passes on; one
  warm-up, then the best of three, interleaved; CPU time with one torch thread, wall time with several) and
  keeps Winograd only if it is at least 3% faster. Results are stored in
  ``<cache>/conv-choice-<cpu key>-torch<version>.json`` (``<cache>``: ``WETOK_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/wetok``, else ``~/.cache/wetok``), keyed by the CPU model and feature flags
  (:func:`wetok._cpu.cpu_key`) and torch version, so another CPU or torch measures afresh. The file is rewritten
  atomically; an unreadable or malformed one is ignored (and replaced). A cache that cannot be written only
  costs measuring again in the next process.
* ``rules``: fixed thresholds (see :class:`wetok.fast.WinogradConv2d`), the choice tuned on one AMD Zen 5 CPU;
* ``winograd`` / ``direct``: always that kernel.

Both kernels compute the same convolution (Winograd rounds differently, within 1e-4 over the official f = 16
network), so the choice changes speed, not results beyond float32 round-off.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._cpu import cpu_key
from ._files import atomic_write

__all__ = ["ENV_CACHE", "ENV_MODE", "MODES", "cache_path", "choice_mode", "measured_choice"]

ENV_MODE = "WETOK_CONV_CHOICE"
ENV_CACHE = "WETOK_CACHE_DIR"
MODES = ("measure", "rules", "winograd", "direct")
#: Winograd must beat the direct convolution by this factor to be chosen (ties go to the direct kernel).
MARGIN = 0.97
REPS = 3
_FORMAT = 2  # 2: one entry per shape, each kernel timed on its own layout (1: per input layout)

_lock = threading.Lock()
_memory: dict[str, dict[str, dict]] = {}  # cache path -> key -> entry, what this process has read or measured


def choice_mode() -> str:
    """The mode from ``WETOK_CONV_CHOICE`` (default ``measure``); an unknown value is an error naming the variable."""
    mode = os.environ.get(ENV_MODE, "").strip().lower() or "measure"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={os.environ[ENV_MODE]!r}: expected one of {', '.join(MODES)}")
    return mode


def cache_path() -> Path:
    """This machine's and torch version's cache file (hand-written lookup: platformdirs is not a dependency)."""
    if os.environ.get(ENV_CACHE):
        folder = Path(os.environ[ENV_CACHE])
    elif os.environ.get("XDG_CACHE_HOME"):
        folder = Path(os.environ["XDG_CACHE_HOME"]) / "wetok"
    else:
        folder = Path.home() / ".cache" / "wetok"
    version = torch.__version__.replace("+", "_")
    return folder / f"conv-choice-{cpu_key()}-torch{version}.json"


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("choices"), dict):
        return {}
    return {k: v for k, v in data["choices"].items()
            if isinstance(v, dict) and v.get("choice") in ("winograd", "direct")}


def _store(path: Path, key: str, entry: dict) -> None:
    """Merge ``entry`` into the file (re-read first, so entries other processes wrote survive), atomically."""
    merged = _read(path) | {key: entry}
    text = json.dumps({"format": _FORMAT, "torch": torch.__version__, "choices": merged}, indent=1, sort_keys=True)
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError:
        pass  # a read-only cache: measured again by the next process, nothing else is lost


def _clock() -> Callable[[], float]:
    """With one torch thread the process's CPU time (time slices other processes take are not counted, so a busy
    machine does not flip the choice); with several, wall time (CPU time would count threads waiting)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _best_times(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """One warm-up each, then the best of ``REPS`` interleaved calls (the best is what load disturbs least)."""
    for run in runs.values():
        run()
    clock = _clock()
    best = {name: float("inf") for name in runs}
    names = list(runs)
    for r in range(REPS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock()
            runs[name]()
            best[name] = min(best[name], clock() - start)
    return best


def measured_choice(key: str, kernels: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """``"winograd"`` or ``"direct"`` for ``key``: from this process's memory, else the cache file, else timed
    now and stored. ``kernels()`` gives the two calls to time (``"winograd"`` and ``"direct"``); Winograd raising
    RuntimeError counts as the direct kernel winning."""
    path = cache_path()
    with _lock:
        known = _memory.setdefault(str(path), _read(path))
        if key in known:
            return known[key]["choice"]
        try:
            runs = kernels()
            best = _best_times({"winograd": runs["winograd"], "direct": runs["direct"]})
        except RuntimeError:  # NNPACK refuses some shapes, without a reason
            best = {"winograd": float("inf"), "direct": float("nan")}
        choice = "winograd" if best["winograd"] < MARGIN * best["direct"] else "direct"
        entry = {"choice": choice, "winograd_s": best["winograd"], "direct_s": best["direct"]}
        entry = {k: (None if isinstance(v, float) and not v < float("inf") else v) for k, v in entry.items()}
        known[key] = entry
        _store(path, key, entry)
        return choice
