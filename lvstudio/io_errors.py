"""The one place where failures of the machine (not of the user's input) become clear messages.

A full disk, a permission, a read-only or missing folder, a file that vanished mid-run: whatever raised it (Python's
own file calls, safetensors' Rust writer, PyAV/FFmpeg, huggingface_hub), `io_failure` turns it into an `IOFailure`
that says what failed, on which path, and what to do (exit code 74). The render, the training runs, the Hub pull and
the studios call it with what they were doing and how to continue (a resume command); the CLI's root group calls it
for anything that still escapes a command, so no OSError ever ends in a traceback.

    with translated_io("render", resume="lvstudio render story.toml --resume"):
        ...
"""

from __future__ import annotations

import errno as errnos
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lvstudio.errors import IOFailure

__all__ = ["as_os_error", "describe_free_space", "io_failure", "is_io_error", "translated_io"]

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`, if it is one: an OSError itself, a safetensors error that wraps one (its message
    ends in "(os error N)"), or one in its cause/context chain. None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = _RUST_OS_ERROR.search(str(current)) if type(current).__name__ == "SafetensorError" else None
        if match is not None:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return err if isinstance(err, OSError) else None


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent (absolute: relative paths are taken from the cwd)."""
    p = path if path.is_absolute() else Path.cwd() / path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def describe_free_space(path: str | os.PathLike[str]) -> str:
    """"12.3 MB free" on the disk holding `path` (or its nearest existing folder); "" if it cannot be read."""
    try:
        free = shutil.disk_usage(nearest_existing(Path(path))).free
    except OSError:
        return ""
    return f"{free / 1e6:.1f} MB free" if free < 10**9 else f"{free / 1e9:.1f} GB free"


def _then(resume: str | None) -> str:
    return f", then continue with: {resume}" if resume else ", then run the command again"


def io_failure(err: BaseException, *, action: str, path: str | os.PathLike[str] | None = None,
               resume: str | None = None, kept: str | None = None,
               elsewhere: str = "write somewhere else") -> IOFailure:
    """An IOFailure for `err` (see `as_os_error`).

    action: what lvstudio was doing ("writing the video", "saving a checkpoint"); path: the file or folder (default:
    the one the error names); resume: the command that continues the work once the problem is fixed; kept: a
    sentence on what is safe on disk ("the job is kept in out/x.job"); elsewhere: how to use another folder instead.
    """
    if isinstance(err, IOFailure):
        return err
    os_err = as_os_error(err)
    code = os_err.errno if os_err is not None else None
    named = os_err.filename if os_err is not None and os_err.filename else None
    where = Path(path) if path is not None else Path(named) if named is not None else None
    target = f" {where}" if where is not None else ""
    folder = where.parent if where is not None and str(where.parent) else Path(".")
    then = _then(resume)
    if code in (errnos.ENOSPC, errnos.EDQUOT):
        free = describe_free_space(folder)
        what = "no space left on the device" if code == errnos.ENOSPC else "the disk quota is used up"
        message = f"{action}{target} failed: {what}" + (f" ({free})" if free else "")
        hint = f"free some space on that disk, or {elsewhere}{then}"
    elif code in (errnos.EACCES, errnos.EPERM):
        message = f"{action}{target} failed: permission denied"
        hint = f"fix the permissions of {folder}, or {elsewhere}{then}"
    elif code == errnos.EROFS:
        message = f"{action}{target} failed: {folder} is on a read-only file system"
        hint = f"remount that disk read-write, or {elsewhere}{then}"
    elif code == errnos.ENOENT:
        message = f"{action}{target} failed: it, or its folder, does not exist (moved or deleted while lvstudio ran?)"
        hint = f"check that {folder} exists and stays in place (and its disk stays mounted){then}"
    elif code == errnos.ENOTDIR:
        message = f"{action}{target} failed: a part of that path is a file, not a folder"
        hint = f"{elsewhere}{then}"
    elif code == errnos.EISDIR:
        message = f"{action}{target} failed: it is a folder"
        hint = f"give a file name{then}"
    elif code in (errnos.EMFILE, errnos.ENFILE):
        message = f"{action}{target} failed: too many open files"
        hint = f"raise the limit (ulimit -n){then}"
    elif code == errnos.ENAMETOOLONG:
        message = f"{action}{target} failed: the file name is too long"
        hint = f"use a shorter path, or {elsewhere}{then}"
    elif code == errnos.EIO:
        message = f"{action}{target} failed: the disk reported an I/O error"
        hint = f"check the disk (dmesg, smartctl){then}"
    else:
        reason = (os_err.strerror if os_err is not None and os_err.strerror else str(err)) or type(err).__name__
        message = f"{action}{target} failed: {reason}"
        hint = f"fix the cause{then}"
    if kept:
        message = f"{message}. {kept}"
    return IOFailure(message, hint=hint, path=where, errno=code)


def is_io_error(err: BaseException) -> bool:
    """True for errors `io_failure` knows how to explain (OSErrors and safetensors I/O errors)."""
    return isinstance(err, IOFailure) or as_os_error(err) is not None


@contextmanager
def translated_io(action: str, *, path: str | os.PathLike[str] | None = None, resume: str | None = None,
                  kept: str | None = None, elsewhere: str = "write somewhere else") -> Iterator[None]:
    """Run a block; an OSError (or a safetensors I/O error) leaving it becomes an IOFailure (see `io_failure`)."""
    try:
        yield
    except IOFailure:
        raise
    except Exception as err:
        if not is_io_error(err):
            raise
        raise io_failure(err, action=action, path=path, resume=resume, kept=kept, elsewhere=elsewhere) from err
