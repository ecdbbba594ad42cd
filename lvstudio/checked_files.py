"""Self-verifying safetensors files: a sha256 of the contents is stored in the file's own metadata.

lvstudio's job folders (per-chunk latents, backend snapshots) and everything the training recipes write
(checkpoints, ERFT error banks, latent and ODE-pair caches, exported weights) are written with `save_checked`
(atomically, through `lvstudio.atomic`) and read back with `load_checked`, which raises `DamagedFileError` with the
reason when the file is missing, truncated, has a broken header, or holds tensors whose bytes or metadata no longer
match the checksum (a flipped bit). Weights that may come from elsewhere or from an older version (init weights,
preset files, older checkpoints) are read with `require_digest=False`: parsed, and verified when they carry a
checksum. A damaged cache is built again (`load_cache`); a damaged checkpoint or export is an error.

The digest covers the metadata and each tensor's name, dtype, shape and raw bytes, in name order, so it does not
depend on how safetensors lays the file out.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lvstudio.errors import DamagedFileError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DIGEST_KEY", "WEIGHTS_HINT", "load_cache", "load_checked", "read_metadata", "save_checked",
           "tensors_digest"]

DIGEST_KEY = "lvstudio.sha256"
WEIGHTS_HINT = ("replace it with an intact copy: run the export or training that wrote it again, or restore a "
                "preset's files (`git checkout -- presets/`, or `lvstudio presets pull NAME --force`)")
T = TypeVar("T")


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


def read_metadata(path: str | os.PathLike[str], *, hint: str | None = None) -> dict[str, str]:
    """The string metadata of a safetensors file (header only); DamagedFileError (with `hint`) if it cannot be
    parsed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise DamagedFileError(path, "the file is missing", hint=hint) from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise DamagedFileError(path, _reason(err), hint=hint) from None


def load_checked(path: str | os.PathLike[str], *, require_digest: bool = True, device: str = "cpu",
                 hint: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `save_checked`, verified against its digest.

    require_digest=False accepts files without a digest (older files, files from elsewhere) after a successful
    parse, and still verifies the digest of those that have one.
    Raises DamagedFileError naming the file and what is wrong with it, with `hint` (what to do) when given."""
    from safetensors.torch import load_file

    meta = read_metadata(path, hint=hint)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - truncated data, bad offsets, ...
        raise DamagedFileError(path, _reason(err), hint=hint) from None
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        if require_digest:
            raise DamagedFileError(path, "it has no checksum (it was not written by this version of lvstudio)",
                                   hint=hint)
        return tensors, meta
    if tensors_digest(tensors, meta) != expected:
        raise DamagedFileError(path, "its contents do not match their checksum (changed bytes)", hint=hint)
    return tensors, meta


def load_cache(path: str | os.PathLike[str], read: Callable[[Path], T]) -> T | None:
    """A cache of derived data (latents, teacher trajectories) read by `read` (which verifies it, e.g. with
    `load_checked`); None when it is missing or damaged, so that the caller builds it again. Damage is not an error
    here, since nothing is lost: a warning names the file and why it is built again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read(path)
    except DamagedFileError as err:
        warnings.warn(f"{path} is damaged ({err.reason}); it is a cache of derived data, so it is built again",
                      stacklevel=2)
        return None


def _reason(err: BaseException) -> str:
    """A short reason from a safetensors/OS error: "truncated or broken header (...)"."""
    text = " ".join(str(err).split())[:160] or type(err).__name__
    if isinstance(err, OSError):
        return f"it cannot be read ({text})"
    return f"it cannot be parsed ({text})"
