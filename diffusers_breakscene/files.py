"""Writing files safely: writability checks before any work, atomic replace after it.

Every file the library writes (bundles, exports, checkpoints, pictures) goes through
:func:`atomic_write`: the content is written to a temporary file in the target's folder, flushed
to disk, then renamed over the target (``os.replace``, atomic on POSIX and Windows). A process
killed at any moment leaves either the previous file or the complete new one. The new file gets
the permissions a plain ``open(path, "w")`` would give it: those of the file it replaces, or the
umask's for a new one.

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
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BreakSceneError, InvalidArgumentError, UnwritableOutputError, fail

__all__ = [
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "check_utf8_path",
    "check_writable",
    "fsync_dir",
    "new_file_mode",
    "settle_permissions",
    "usual_permissions",
]


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


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Like :func:`check_writable`, for a folder: also refused when ``path`` is an existing
    file (where ``mkdir`` would fail with a bare ``FileExistsError`` later). Nothing is created.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = file.write_text("x")
        >>> check_output_dir(file)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.UnwritableOutputError: Cannot write the output folder '...notes.txt': it is a file, not a folder; ...
    """  # noqa: E501
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UnwritableOutputError(
            f"Cannot write the {what} {str(path)!r}: it is a file, not a folder; choose another "
            "location (a new or existing folder), or move the file away."
        )
    return check_writable(path, what)


def check_output_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Like :func:`check_writable`, for a file: also refused when ``path`` is a folder.

    Example:
        >>> import tempfile
        >>> check_output_file(tempfile.mkdtemp(), "picture")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.UnwritableOutputError: Cannot write the picture '...': it is a folder; pass a file name.
    """  # noqa: E501
    path = Path(path).expanduser()
    if path.is_dir():
        raise UnwritableOutputError(
            f"Cannot write the {what} {str(path)!r}: it is a folder; pass a file name."
        )
    return check_writable(path, what)


def check_utf8_path(
    path: str | os.PathLike[str],
    what: str = "file",
    error: type[BreakSceneError] = InvalidArgumentError,
) -> Path:
    """Refuse (``error``) a path whose name is not valid UTF-8: a POSIX file name may hold any
    bytes, but safetensors and the tokenizers library cannot open such a path (and would report
    a damaged file instead). Returns ``path`` as a ``Path``.

    Example:
        >>> import os
        >>> check_utf8_path(os.fsdecode(b"/tmp/caf\\xe9.safetensors"), "bundle")
        Traceback (most recent call last):
        ...
        diffusers_breakscene.errors.InvalidArgumentError: the bundle '/tmp/caf\\xe9.safetensors' has a name that is not valid UTF-8, which safetensors and tokenizers cannot open; rename it (or the folder it is in) using UTF-8 characters
    """  # noqa: E501
    path = Path(path).expanduser()
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        fail(
            error,
            f"the {what} '{shown}' has a name that is not valid UTF-8, which safetensors and "
            "tokenizers cannot open",
            "rename it (or the folder it is in) using UTF-8 characters",
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


def _new_temporary_file(path: Path) -> Path:
    """Create an empty hidden file beside ``path`` and return its name.

    Written by hand rather than with ``tempfile.mkstemp``, which creates its file with mode 0600
    whatever the umask. ``os.open`` with 0666 lets the umask narrow the mode exactly as it does
    for any new file, so :func:`new_file_mode` can read it back.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def new_file_mode(folder: str | os.PathLike[str]) -> int:
    """The permission bits a file newly created in ``folder`` gets (0666 narrowed by the umask).

    Read from a probe file rather than with ``os.umask``, which can only be read by setting it,
    a race with other threads creating files.

    Example:
        >>> import os, tempfile
        >>> previous = os.umask(0o022)
        >>> oct(new_file_mode(tempfile.mkdtemp()))
        '0o644'
        >>> _ = os.umask(previous)
    """
    probe = _new_temporary_file(Path(folder) / "mode")
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink(missing_ok=True)


def settle_permissions(file: Path, target: Path, new_mode: int) -> None:
    """Give ``file``, about to be renamed onto ``target``, the permissions a plain
    ``open(target, "w")`` would leave: ``target``'s own where it exists, else ``new_mode``.

    Needed because writers that replace files through a temporary one create it 0600 (Python's
    ``tempfile.mkstemp``; ``safetensors.torch.save_file`` since 0.8, safetensors issue #782), and
    the rename carries that mode over: bundles meant to be shared would be unreadable to others.
    """
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = new_mode
    os.chmod(file, mode)


@contextlib.contextmanager
def usual_permissions(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Files that the ``with`` block creates or replaces under ``folder`` end with the mode a
    plain write gives: a replaced file's previous mode, the umask's for a new one. For
    ``save_pretrained``: diffusers and transformers write weights with
    ``safetensors.torch.save_file``, which since safetensors 0.8 leaves them 0600 whatever the
    umask (safetensors issue #782), so a saved model folder would be unreadable to others.
    Files the block leaves alone keep their mode.

    Example:
        >>> import os, tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from safetensors.torch import save_file
        >>> previous = os.umask(0o022)
        >>> folder = Path(tempfile.mkdtemp())
        >>> with usual_permissions(folder):
        ...     save_file({"w": torch.ones(1)}, folder / "model.safetensors")
        >>> oct((folder / "model.safetensors").stat().st_mode & 0o777)
        '0o644'
        >>> _ = os.umask(previous)
    """
    folder = Path(folder)

    def files() -> dict[Path, os.stat_result]:
        if not folder.is_dir():
            return {}
        return {f: f.lstat() for f in folder.rglob("*") if f.is_file() and not f.is_symlink()}

    before = files()
    yield
    modes: dict[Path, int] = {}
    for file, now in files().items():
        was = before.get(file)
        if was is not None and was.st_ino == now.st_ino:
            continue  # written in place (or untouched): open() already kept its mode
        if was is not None:
            mode = stat.S_IMODE(was.st_mode)
        else:
            if file.parent not in modes:
                modes[file.parent] = new_file_mode(file.parent)
            mode = modes[file.parent]
        os.chmod(file, mode)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], what: str = "file"
) -> Path:
    """Call ``write(temporary_path)``, fsync the result, then rename it onto ``path``.

    Missing parent folders are created. On any failure the temporary file is removed and a
    previous file at ``path`` is unchanged; ``OSError`` becomes :class:`UnwritableOutputError`.
    The new file keeps the permissions of the file it replaces (a new one gets the umask's).
    """
    path = check_output_file(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary_file(path)
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives a new file
    except OSError as error:
        raise UnwritableOutputError(f"Cannot write the {what} {str(path)!r}: {error}") from error
    try:
        write(tmp)  # may replace tmp (safetensors does), so its mode is settled afterwards
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        settle_permissions(tmp, path, mode)
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
