"""How a shipped weight file stores its tensors: float32, float16, or int8 with a scale per output channel.

The embedded presets live in git under a size budget, so their files may store the weights compactly; every loader
of a weight file (`read_weights`) gives back float tensors whatever the storage, so models never see it.

- `float32` / `float16`: every floating tensor in that dtype (float16: half the bytes, outputs equal to ~1e-3).
- `int8` (`storage = "int8-per-channel"` in the file's metadata): each floating tensor of at least 2 dimensions and
  `INT8_MIN_ELEMENTS` elements (the Linear and Conv weights: nearly all the bytes) is stored as
  q = round(w / s) in int8 with s = max |w| over all but its first dimension / 127, one scale per output channel,
  kept in float32 under `<name>.int8_scale` ([out, 1, ...]); read back as q * s (each weight within s / 2 of the
  original). Biases, norms and small tensors are stored in float16. About a quarter of float32's bytes.

An int8 tensor without a scale of fitting shape is a `DamagedFileError` naming the file: lvstudio never writes one,
so the file was changed or written by something else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lvstudio.errors import DamagedFileError

if TYPE_CHECKING:
    from torch import Tensor

Storage = Literal["float32", "float16", "int8"]
STORAGES: tuple[str, ...] = ("float32", "float16", "int8")
STORAGE_KEY = "storage"  # metadata key; absent in files written before storage existed (read as they are)
INT8 = "int8-per-channel"
SCALE_SUFFIX = ".int8_scale"
INT8_MIN_ELEMENTS = 1024


def encode_storage(tensors: Mapping[str, Tensor], storage: Storage) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`tensors` as `storage` stores them, and the metadata that says so (merge it into the file's)."""
    import torch

    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: choose one of {', '.join(STORAGES)}")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out[name] = t
        elif storage == "float32":
            out[name] = t.float()
        elif storage == "float16" or t.dim() < 2 or t.numel() < INT8_MIN_ELEMENTS:
            out[name] = t.half()
        else:
            w = t.float()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127.0  # [out, 1...]
            out[name] = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
            out[name + SCALE_SUFFIX] = scale
    return out, ({STORAGE_KEY: INT8} if storage == "int8" else {STORAGE_KEY: storage})


def decode_storage(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: str | os.PathLike[str] = ""
                   ) -> dict[str, Tensor]:
    """Float tensors back from a file's `tensors` and `metadata` (int8 ones as q * scale in float32; the others as
    they are stored)."""
    import torch

    if metadata.get(STORAGE_KEY) != INT8:
        return dict(tensors)
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == torch.int8:
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None or scale.dim() != t.dim() or scale.shape[0] != t.shape[0]:
                raise DamagedFileError(path, f"its int8 tensor {name} has no {name}{SCALE_SUFFIX} of a fitting shape",
                                       hint="store the weights again (`lvstudio train export CONFIG --to DIR "
                                            "--storage int8`)")
            out[name] = t.float() * scale.float()
        else:
            out[name] = t
    return out


def read_weights(path: str | os.PathLike[str], hint: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A weight file's tensors (floats, whatever its storage) and metadata; its checksum is verified when it has one
    (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import WEIGHTS_HINT, load_checked

    tensors, meta = load_checked(path, require_digest=False, hint=hint or WEIGHTS_HINT)
    return decode_storage(tensors, meta, path), meta


def store_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str], storage: Storage,
                  hint: str | None = None) -> Path:
    """Write weight file `src` again as `dst` in `storage` (metadata kept; atomically, with its own checksum)."""
    from lvstudio.checked_files import save_checked

    tensors, meta = read_weights(src, hint)
    stored, extra = encode_storage(tensors, storage)
    return save_checked(stored, dst, {k: v for k, v in meta.items() if k != STORAGE_KEY} | extra)
