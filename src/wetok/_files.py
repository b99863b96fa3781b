"""Writing files and folders so that readers never see half of one: shared by models, token files, images,
reports, statistics and exported model folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import InputError


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends (they are then delivered), so that a temporary file is never
    created without its name being known to the code that removes it."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask (Windows)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _write_error(path: Path, err: OSError) -> InputError:
    reason = (err.strerror or str(err) or type(err).__name__).lower()
    other = err.filename is not None and not os.path.abspath(err.filename).startswith(os.path.abspath(path.parent))
    return InputError(path, f"cannot write: {reason}" + (f" ({err.filename})" if other else ""))


def atomic_write(path: str | Path, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (created with its folder), give it the usual
    permissions (``mkstemp`` makes 0600 files) and rename it into place. On any failure, SIGINT and SIGTERM
    included (the ``wetok`` command turns SIGTERM into an exception), nothing is left behind. ``suffix`` is the
    temporary file's ending (writers such as Pillow choose the format from it). File-system errors (a read-only
    folder, a full disk) raise :class:`~wetok.errors.InputError` naming ``path``."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
            os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_folder(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``path``, give it the usual permissions (``mkdtemp``
    makes 0700 folders) and rename it to ``path``, which must not exist or be an empty folder. On any failure
    nothing is left behind."""
    path = Path(path)
    tmp: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _signals_held():
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        except OSError as err:
            raise _write_error(path, err) from err
        tmp.chmod(0o777 & ~current_umask())
        write(tmp)
        if path.is_dir():
            path.rmdir()  # only an empty folder may be replaced
        tmp.rename(path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def regular_file_size(path: str | os.PathLike, what: str = "file") -> int:
    """The size of the regular file ``path``, or one :class:`InputError`: a pipe, a device (``/dev/zero``), a socket
    or a folder is refused from ``stat``, before anything opens it (reading one would block or never end)."""
    import stat

    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as err:
        raise InputError(path, f"cannot read {what}: {(err.strerror or str(err)).lower()}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, f"is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(path, f"is not a regular file (a pipe, device or socket), so not a {what}")
    return info.st_size


def read_limited(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (:func:`regular_file_size`) of at most ``limit`` bytes, or one
    :class:`InputError`. The limit is checked from the size and again while reading (a file that grows)."""
    path = Path(path)
    size = regular_file_size(path, what)
    if size > limit:
        raise InputError(path, f"{what} of {size} bytes is larger than the limit of {limit} bytes")
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise InputError(path, f"cannot read {what}: {(err.strerror or str(err)).lower()}") from None
    if len(data) > limit:
        raise InputError(path, f"{what} grew past the limit of {limit} bytes while being read")
    return data
