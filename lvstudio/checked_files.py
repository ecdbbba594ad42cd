"""Self-verifying safetensors files: a sha256 of the contents is stored in the file's own metadata.

lvstudio's job folders (per-chunk latents, backend snapshots) and training checkpoints are written with
`save_checked` (atomically, through `lvstudio.atomic`) and read back with `load_checked`, which raises
`DamagedFileError` with the reason when the file is missing, truncated, has a broken header, or holds tensors whose
bytes or metadata no longer match the checksum (a flipped bit). The digest covers the metadata and each tensor's
name, dtype, shape and raw bytes, in name order, so it does not depend on how safetensors lays the file out.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lvstudio.errors import DamagedFileError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DIGEST_KEY", "load_checked", "read_metadata", "save_checked", "tensors_digest"]

DIGEST_KEY = "lvstudio.sha256"


def tensors_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over the metadata (but the digest itself), then (name, dtype, shape, raw bytes) of every tensor, in
    name order."""
    h = hashlib.sha256()
    for key, value in sorted((metadata or {}).items()):
        if key != DIGEST_KEY:
            h.update(f"{key}\0{value}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return h.hexdigest()


def _byte_dtype():  # noqa: ANN202 - torch.uint8, imported lazily
    import torch

    return torch.uint8


def save_checked(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` atomically with `metadata` plus their digest (`DIGEST_KEY`)."""
    from lvstudio.atomic import save_safetensors_atomic

    meta = dict(metadata or {})
    meta[DIGEST_KEY] = tensors_digest(tensors, meta)
    return save_safetensors_atomic(tensors, path, meta)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file (header only); DamagedFileError if it cannot be parsed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise DamagedFileError(path, "the file is missing") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise DamagedFileError(path, _reason(err)) from None


def load_checked(path: str | os.PathLike[str], *, require_digest: bool = True,
                 device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `save_checked`, verified against its digest.

    require_digest=False accepts files without a digest (older files) after a successful parse.
    Raises DamagedFileError naming the file and what is wrong with it."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - truncated data, bad offsets, ...
        raise DamagedFileError(path, _reason(err)) from None
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        if require_digest:
            raise DamagedFileError(path, "it has no checksum (it was not written by this version of lvstudio)")
        return tensors, meta
    if tensors_digest(tensors, meta) != expected:
        raise DamagedFileError(path, "its contents do not match their checksum (changed bytes)")
    return tensors, meta


def _reason(err: BaseException) -> str:
    """A short reason from a safetensors/OS error: "truncated or broken header (...)"."""
    text = " ".join(str(err).split())[:160] or type(err).__name__
    if isinstance(err, OSError):
        return f"it cannot be read ({text})"
    return f"it cannot be parsed ({text})"
