"""Self-verifying folders: a manifest (`checksums.json`) lists the sha256 and size of every other file in the folder.

For folders whose files lvstudio does not write itself, such as the shards torch.distributed.checkpoint writes for an
FSDP checkpoint (`lvstudio.train.sharding`), where a checksum cannot go into each file's header as
`lvstudio.checked_files` does. `write_manifest` runs once the folder is complete and writes the manifest last
(atomically, `lvstudio.atomic`), so a folder with a manifest is a complete one; `verify_manifest` raises
`DamagedFileError` naming the first file that is missing, not listed, of another size or changed. A folder without a
manifest (written before manifests existed) is not checked.

    {"format": "lvstudio.checksums/1",
     "files": {"meta.json": {"size": 812, "sha256": "..."}, "shard-00001-model-00001-of-00001.safetensors": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lvstudio.errors import DamagedFileError

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "file_sha256", "folder_files", "verify_manifest", "write_manifest"]

MANIFEST = "checksums.json"
MANIFEST_FORMAT = "lvstudio.checksums/1"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (read in blocks: shards can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every file under `folder` but the manifest, as sorted relative POSIX paths."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p != root / MANIFEST)


def write_manifest(folder: str | os.PathLike[str]) -> Path:
    """Hash every file of a complete folder and write `folder/checksums.json` atomically; returns its path."""
    from lvstudio.atomic import atomic_write_json

    root = Path(folder)
    files = {name: {"size": (root / name).stat().st_size, "sha256": file_sha256(root / name)}
             for name in folder_files(root)}
    return atomic_write_json(root / MANIFEST, {"format": MANIFEST_FORMAT, "files": files}, sort_keys=True)


def verify_manifest(folder: str | os.PathLike[str], *, hint: str | None = None) -> bool:
    """Check every file of `folder` against its manifest: True when they all match, False when the folder has no
    manifest. DamagedFileError (with `hint`) naming the manifest when it cannot be read, else the first file (in
    name order) that is missing, not listed in it, of another size, or whose bytes changed."""
    root = Path(folder)
    listed = _read_manifest(root / MANIFEST, hint)
    if listed is None:
        return False
    present = set(folder_files(root))
    for name in sorted(present | set(listed)):
        path = root / name
        if name not in present:
            raise DamagedFileError(path, f"the file is missing ({MANIFEST} lists it)", hint=hint)
        if name not in listed:
            raise DamagedFileError(path, f"the file is not part of it ({MANIFEST} does not list it)", hint=hint)
        size, want = path.stat().st_size, listed[name]
        if size != want["size"]:
            raise DamagedFileError(path, f"it has {size} bytes, not the {want['size']} that {MANIFEST} records "
                                         "(truncated or replaced)", hint=hint)
        if file_sha256(path) != want["sha256"]:
            raise DamagedFileError(path, f"its contents do not match their checksum in {MANIFEST} (changed bytes)",
                                   hint=hint)
    return True


def _read_manifest(path: Path, hint: str | None) -> dict[str, dict] | None:
    """name -> {"size", "sha256"} from a manifest; None when there is none; DamagedFileError when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as err:
        raise DamagedFileError(path, f"it cannot be parsed ({' '.join(str(err).split())[:160]})", hint=hint) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not _valid_entries(data.get("files")):
        raise DamagedFileError(path, f"it is not an lvstudio manifest ({MANIFEST_FORMAT})", hint=hint)
    return data["files"]


def _valid_entries(files: object) -> bool:
    return isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values())
