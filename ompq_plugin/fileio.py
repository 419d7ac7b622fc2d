"""Atomic file writes: an output either appears complete or not at all.

:func:`check_writable` is what every command runs on each of its outputs before any work, so a
bad output path fails in a second, not after a search or an export. :func:`atomic_path` writes to
a temporary name beside the target and renames it into place; SIGINT / SIGTERM are held for the
few system calls that create, rename or delete the temporary file, so an interrupt at any point
leaves either the old file or the new one, and no temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ompq_plugin.errors import OmpqError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT / SIGTERM until the block ends (main thread; elsewhere a no-op).

    The handlers are swapped for one that only records the signal, which is raised again once
    the block is over. (A signal mask would not do: it is per thread, and torch's worker threads
    would take the signal instead.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: object) -> None:
        pending.append(signum)

    old = {sig: signal.signal(sig, record) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if "inline_container" in str(exc) or "PytorchStreamWriter" in str(exc):
        return "torch.save stopped part-way"  # torch's zip writer hides the errno
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc) else ''}"


def write_error(target: Path, exc: BaseException) -> OmpqError:
    """The user-facing error for a write to ``target`` that failed with ``exc``."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        fix = (
            "the disk is full or a file-size limit (ulimit -f) was reached: free space or "
            "write elsewhere with -o"
        )
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"the folder {_folder(target)} is not writable: choose another folder with -o"
    else:
        fix = (
            "the disk may be full or a file-size limit (ulimit -f) reached: free space or "
            "write elsewhere with -o"
        )
    return OmpqError(f"could not write {target} ({_reason(exc)}); nothing was written; {fix}")


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch's RuntimeError for a failed write (its zip writer hides the errno)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text for key in ("inline_container", "PytorchStreamWriter", "file write failed")
    )


def check_writable(path: str | os.PathLike[str], flag: str = "-o") -> Path:
    """Refuse, before any work, an output path that cannot be written; return it as a Path.

    The folder must exist and accept a new file (probed by creating and deleting one, which
    catches permissions, read-only mounts and a file standing where a folder should be), and the
    target must not be a folder.
    """
    target = Path(path)
    folder = _folder(target)
    if not folder.exists():
        # a file somewhere up the path makes exists() False too; name it
        for parent in folder.parents:
            if parent.exists() and not parent.is_dir():
                raise OmpqError(
                    f"{flag} {target}: {parent} is a file, not a folder; choose another output path"
                )
        raise OmpqError(
            f"output folder {folder} does not exist (for {flag} {target}): "
            "create it or choose another path"
        )
    if not folder.is_dir():
        raise OmpqError(
            f"{flag} {target}: {folder} is a file, not a folder; choose another output path"
        )
    if target.is_dir():
        raise OmpqError(
            f"{flag} {target} is a folder; pass a file name inside it, e.g. {target / 'out'}"
        )
    try:
        with signals_held():
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OmpqError(
            f"cannot write {target} ({_reason(exc)}): the folder {folder} is not "
            f"writable; choose another path with {flag}"
        ) from None
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A failed write (disk full, file-size limit, permissions) becomes an :class:`OmpqError`
    naming the file; whatever happens, the temporary file is removed and an older ``path`` is
    left as it was.
    """
    target = check_writable(path)
    tmp_path: Path | None = None
    try:
        with signals_held():  # the file and the name that cleans it up appear together
            try:
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=".tmp", dir=_folder(target)
                )
            except OSError as exc:
                raise write_error(target, exc) from None
            os.close(fd)
            tmp_path = Path(tmp)
        try:
            yield tmp_path
        except Exception as exc:
            if _is_write_failure(exc):
                raise write_error(target, exc) from None
            raise
        with signals_held():
            try:
                os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the usual mode
                os.replace(tmp_path, target)
            except OSError as exc:
                raise write_error(target, exc) from None
            tmp_path = None
    finally:
        if tmp_path is not None:
            with signals_held():
                tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several outputs of one command: all of them appear, or none."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
