"""Writing files safely: writability checks before any work, atomic replace after it.

Every file the library writes (bundles, exports, checkpoints, pictures) goes through
:func:`atomic_write`: the content is written to a temporary file in the target's folder, flushed
to disk, then renamed over the target (``os.replace``, atomic on POSIX and Windows). A process
killed at any moment leaves either the previous file or the complete new one.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("hello")).read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UnwritableOutputError

__all__ = ["atomic_write", "check_writable", "fsync_dir"]


def check_writable(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Raise :class:`UnwritableOutputError` unless ``path`` (a file or a folder, existing or
    not) can be created there; nothing is created. Returns ``path`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> check_writable(tempfile.mkdtemp() + "/new/file.bin").name
        'file.bin'
    """
    path = Path(path).expanduser()
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() and ancestor != path:
        raise UnwritableOutputError(
            f"Cannot write the {what} {str(path)!r}: {str(ancestor)!r} is a file, not a folder; "
            "choose another location."
        )
    folder = ancestor if ancestor.is_dir() else ancestor.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnwritableOutputError(
            f"Cannot write the {what} {str(path)!r}: no write permission in {str(folder)!r}; "
            "choose another location."
        )
    return path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries to disk (so a rename survives a power cut); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], what: str = "file"
) -> Path:
    """Call ``write(temporary_path)``, fsync the result, then rename it onto ``path``.

    Missing parent folders are created. On any failure the temporary file is removed and a
    previous file at ``path`` is unchanged; ``OSError`` becomes :class:`UnwritableOutputError`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UnwritableOutputError(
            f"Cannot write the {what} {str(path)!r}: it is a folder; pass a file name."
        )
    check_writable(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise UnwritableOutputError(f"Cannot write the {what} {str(path)!r}: {error}") from error
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UnwritableOutputError(
            f"Writing the {what} {str(path)!r} failed: {error}; any previous file there is "
            "unchanged."
        ) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
