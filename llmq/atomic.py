"""Outputs appear whole or not at all: written to a temporary file in the target directory and renamed into
place only when complete. An interrupted run (exception, Ctrl-C, SIGTERM) removes the temporary file; even a
SIGKILL leaves only a `.tmp` sibling, never a partial file at the output path."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LlmqError


def check_output_path(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise LlmqError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise LlmqError(f"{out} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LlmqError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmqError(f"cannot write {out}: directory {parent} is not writable")


def check_free_space(out: Path, nbytes: int) -> None:
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    if nbytes > free:
        raise LlmqError(f"not enough disk space for {out}: needs {nbytes / 2**20:.1f} MiB, "
                        f"{free / 2**20:.1f} MiB free")


class _Terminated(BaseException):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C so cleanup runs (only possible from the main thread)."""
    def handler(signum, frame):
        raise _Terminated()
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """Yields a temporary path next to `out`; renames it to `out` when the block completes."""
    out = Path(out)
    check_output_path(out, force)
    if expected_bytes:
        check_free_space(out, expected_bytes)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    except OSError as e:
        raise LlmqError(f"cannot write {out}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _sigterm_raises():
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the output is an ordinary file
            os.replace(tmp, out)
    except _Terminated:
        tmp.unlink(missing_ok=True)
        raise KeyboardInterrupt from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Like atomic_output for a directory of files (used by `llmq unpack`)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LlmqError(f"{out} exists and is not empty; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LlmqError(f"cannot write {out}: directory {parent} does not exist or is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        with _sigterm_raises():
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    except _Terminated:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
