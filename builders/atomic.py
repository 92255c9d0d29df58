"""Atomic directory writes: a crash never leaves a directory that looks complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it is renamed onto `target`.

    The temporary directory lives in the same parent so the final rename is atomic on one
    filesystem. On any exception it is removed and `target` is left as it was.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            # Move the old copy aside first: rename() cannot replace a non-empty directory.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "content")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(out_dir: str | Path, holds_previous: Callable[[Path], bool], what: str,
                      inputs: Iterable[str | Path] = (), error: type[Exception] = ValueError) -> None:
    """Refuse an output directory that atomic_directory() would replace with loss: a file, a directory
    that is or holds one of `inputs`, or a non-empty directory that `holds_previous` does not
    recognise as an earlier output of the same kind (`what`, for the message)."""
    out = Path(out_dir).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == out or out in source.parents:
            raise error(f"writing {out_dir} would replace {source}, an input of this run; write to another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise error(f"{out_dir} exists and is not a directory")
    if any(out.iterdir()) and not holds_previous(out):
        raise error(f"{out_dir} is not empty and holds no {what}; choose a new or empty directory "
                    "(the output replaces it whole)")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp's 0600: a replaced file keeps its mode, a new one gets the umask's (a config.pbtxt
    # must stay readable by a tritonserver running as another user).
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if path.exists():
            os.chmod(tmp, mode)  # the umask may have taken bits away
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) through a temporary sibling and rename it into place."""
    atomic_write_bytes(path, text.encode())
