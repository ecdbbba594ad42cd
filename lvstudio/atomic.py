"""Atomic safetensors writes: a temporary file in the same folder, fsync, then rename into place.

A crash never leaves a half-written file at the final path; readers see the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import Tensor


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
