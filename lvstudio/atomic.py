"""Atomic file writes: the one way lvstudio writes a file that someone else may read.

Every writer goes through `atomic_path`: the data goes to a temporary file in the same folder (so the final rename
never crosses a file system), is flushed to disk (fsync), gets the permissions the old file had (else 0o666 minus the
umask), is renamed over the final path (`os.replace`), and the folder entry is flushed too. A crash or Ctrl-C at any
point leaves either the old file or the new one, never a truncated one; a failed write removes its temporary file
and raises an OSError that keeps the errno and names the final path (also when safetensors' Rust writer failed), so
`lvstudio.io_errors` can explain it.

The folder must exist (callers create it when that is what they mean). Heavy imports (safetensors) stay inside the
functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "replace_durably",
    "save_safetensors_atomic",
]

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an OSError


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entry table so a rename survives a power cut (best effort; not on every OS)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    """Permissions for a replaced file: the old file's, else 0o666 minus the umask (read without changing it)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def replace_durably(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move a finished, fsynced temporary file over `final` (same folder) and flush the folder entry."""
    final = Path(final)
    os.replace(tmp, final)
    fsync_dir(final.parent if str(final.parent) else Path("."))
    return final


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without an error, the file written there is
    fsynced, given the final file's permissions and renamed over `path`. On an error it is deleted."""
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".partial")
    except OSError as err:
        raise _os_error_at(err, final) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, _new_file_mode(final))
        os.replace(tmp, final)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        os_err = _os_error_at(err, final)
        if os_err is not None:
            raise os_err from err
        raise
    fsync_dir(folder)


def _os_error_at(err: BaseException, final: Path) -> OSError | None:
    """An OSError (errno kept) naming the final path, for an OSError or a safetensors I/O error ("... (os error 28)")
    raised while writing its temporary file; None for any other error."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None and type(err).__name__ == "SafetensorError":
        match = _RUST_OS_ERROR.search(str(err))
        code = int(match.group(1)) if match else None
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(final))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Mapping[str, Any] | list[Any], *, indent: int = 2,
                      sort_keys: bool = False) -> Path:
    """Write `data` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def save_safetensors_atomic(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors (detached, contiguous) as a safetensors file with string metadata, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=None if metadata is None else dict(metadata))
    return Path(path)
