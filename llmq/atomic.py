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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_pending: list[int] = []  # signals received inside atomic_output / atomic_directory, not yet acted on


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT or SIGTERM arrived; writers call this between units of work (tensors)."""
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """SIGINT/SIGTERM set a flag instead of raising wherever the main thread happens to be: a KeyboardInterrupt
    raised inside numba's dispatcher or llvmlite's ctypes callbacks becomes a SystemError traceback or is
    swallowed. A second signal still interrupts at once. (Handlers can only be set from the main thread.)"""
    def handler(signum, frame):
        if _pending:
            raise KeyboardInterrupt
        _pending.append(signum)
    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """Yields a temporary path next to `out`; renames it to `out` when the block completes."""
    out = Path(out)
    check_output_path(out, force)
    if expected_bytes:
        check_free_space(out, expected_bytes)
    tmp = None
    try:
        with _deferred_signals():
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp",
                                                dir=out.parent if str(out.parent) else ".")
            except OSError as e:
                raise LlmqError(f"cannot write {out}: {e.strerror or e}") from None
            os.close(fd)
            tmp = Path(tmp_name)
            yield tmp
            check_interrupted()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the output is an ordinary file
            os.replace(tmp, out)
    except BaseException:
        if tmp is not None:
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
    tmp = None
    try:
        with _deferred_signals():
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
            yield tmp
            check_interrupted()
            os.chmod(tmp, 0o777 & ~_umask())
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
