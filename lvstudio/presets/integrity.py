"""Integrity of preset files: sha256 with a stamp cache, sizes, safetensors headers, and one verdict.

Every file a preset loads is checked before it is opened:

  * Hub files against, first found: the preset's own `sha256`/`size` (single files), the lock written by
    `lvstudio presets pull` (sha256 + size of every file at the locked commit), the Hub's content address (the blob
    name in the Hub cache: sha256 for LFS files, git's blob sha1 for small files);
  * converted `.pt` files against the JSON record written beside them;
  * embedded presets' files against `[files.<role>] sha256 / size` in their preset.toml, then their safetensors
    header is read (a truncated file or a damaged header is an error, not a traceback).

Large files are hashed once: a stamp, (real path, size, mtime) -> sha256 in `<LVSTUDIO_CACHE>/verified.json`, lets
later loads skip a file whose size and mtime have not changed. Files up to SMALL_FILE bytes are always hashed (that
costs less than keeping a stamp), so loading an embedded preset writes nothing to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvstudio.atomic import atomic_write_json
from lvstudio.errors import PresetError

CHUNK = 1 << 20  # hash in 1 MiB reads
SMALL_FILE = 16 << 20  # bytes; files up to this size are hashed every time, never stamped
_HEX = frozenset("0123456789abcdef")


def lvstudio_cache_dir() -> Path:
    """lvstudio's own cache (locks, converted weights, stamps): LVSTUDIO_CACHE, else $XDG_CACHE_HOME/lvstudio, else
    ~/.cache/lvstudio. Read at call time."""
    if os.environ.get("LVSTUDIO_CACHE"):
        return Path(os.environ["LVSTUDIO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lvstudio"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data, sort_keys=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """git's object id of a file ("blob <size>\\0" + bytes): the Hub's etag for small, non-LFS files."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one file."""

    path: Path  # as the user sees it (the snapshot path, the converted file, the preset's file)
    status: str  # ok | mismatch | missing | unreferenced (nothing to compare with) | unchecked (not hashed now)
    sha256: str  # "" when not hashed
    expected: str | None  # what it was compared with (sha256, git-sha1 or a size), if anything
    reference: str  # preset | lock | hub-etag | converted-record | none
    detail: str = ""  # why it failed, in words

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "missing")


class Stamps:
    """sha256 remembered per (real path, size, mtime) so a load does not re-hash gigabytes every time.

    Every large file hashed is remembered; `trust` says whether a remembered hash may stand in for hashing again
    (loads and `presets list` trust stamps; `pull` and `presets verify` hash everything afresh).
    """

    def __init__(self, trust: bool) -> None:
        self.trust = trust
        self.path = lvstudio_cache_dir() / "verified.json"
        self.data: dict[str, list] = read_json(self.path)
        self.dirty = False

    def sha256(self, path: Path, *, compute: bool = True) -> str | None:
        """The file's sha256 (remembered, else hashed now); None when `compute` is off and the file is large and
        was never hashed (or changed since)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        if st.st_size <= SMALL_FILE:
            return sha256_file(Path(real))
        key = [st.st_size, st.st_mtime_ns]
        hit = self.data.get(real)
        if self.trust and isinstance(hit, list) and hit[:2] == key:
            return str(hit[2])
        if not compute:
            return None
        digest = sha256_file(Path(real))
        self.data[real] = [*key, digest]
        self.dirty = True
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record a hash computed elsewhere (e.g. while a file was written) for the file as it is now."""
        real = os.path.realpath(path)
        st = os.stat(real)
        if st.st_size > SMALL_FILE:
            self.data[real] = [st.st_size, st.st_mtime_ns, digest]
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.data)
            self.dirty = False


def _etag(path: Path) -> str | None:
    """The Hub cache's content address of a file: the name of the blob its snapshot link points to."""
    name = Path(os.path.realpath(path)).name
    return name if len(name) in (40, 64) and set(name) <= _HEX else None


def check_file(path: Path, stamps: Stamps, *, sha256: str | None = None, size: int | None = None,
               reference: str = "preset", etag: bool = False, compute: bool = True) -> FileCheck:
    """Check one file: present, of the expected size, of the expected sha256 (else, with `etag`, of the Hub's
    content address). The size is compared first, so a truncated file is caught without reading it."""
    if not os.path.isfile(path):
        return FileCheck(path, "missing", "", sha256, reference, "the file is missing")
    actual = os.stat(os.path.realpath(path)).st_size
    if size is not None and actual != size:
        return FileCheck(path, "mismatch", "", str(size), reference,
                         f"{actual} bytes, expected {size} from {reference}: truncated or replaced")
    digest = stamps.sha256(path, compute=compute)
    if digest is None:
        return FileCheck(path, "unchecked", "", sha256, "none")
    if sha256 is not None:
        ok = digest == sha256
        return FileCheck(path, "ok" if ok else "mismatch", digest, sha256, reference,
                         "" if ok else f"sha256 {digest[:16]}…, expected {sha256[:16]}… from {reference}")
    tag = _etag(path) if etag else None
    if tag is None:
        return FileCheck(path, "unreferenced", digest, None, "none")
    actual_tag = digest if len(tag) == 64 else git_blob_sha1(Path(os.path.realpath(path)))
    ok = actual_tag == tag
    kind = "sha256" if len(tag) == 64 else "git-sha1"
    return FileCheck(path, "ok" if ok else "mismatch", digest, tag, "hub-etag",
                     "" if ok else f"{kind} {actual_tag[:16]}…, expected {tag[:16]}… from hub-etag")


def require_ok(preset_name: str, checks: Iterable[FileCheck], *, hint: str) -> None:
    """Raise PresetError naming every file that is missing or does not match (nothing is loaded after this)."""
    bad = [c for c in checks if c.failed]
    if not bad:
        return
    lines = "; ".join(f"{c.path} ({c.detail})" for c in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise PresetError(f"checksum mismatch in preset {preset_name!r}: {lines}{more}", hint=hint)


def safetensors_error(path: Path) -> str | None:
    """Why a file is not a readable safetensors file (its header, and that the data it describes fits), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def check_safetensors(path: Path, preset_name: str, hint: str) -> None:
    """PresetError (exit 2) naming the file when it is not a readable safetensors file."""
    why = safetensors_error(path)
    if why is not None:
        raise PresetError(f"preset {preset_name!r}: {path} is not a readable safetensors file ({why})", hint=hint)


# ---------------------------------------------------------------------------------------------------------------
# Embedded (local) presets
# ---------------------------------------------------------------------------------------------------------------


def local_hint(preset: Any) -> str:
    """The fix for a damaged file of an embedded preset."""
    folder = preset.folder if preset.folder is not None else "its folder"
    return (f"restore the file (in a checkout: `git checkout -- {folder}`), or, if you replaced the weights on "
            f"purpose, record their hashes with `lvstudio presets hash {folder} --write`")


def local_roles(preset: Any, roles: Iterable[str] | None = None) -> list[str]:
    wanted = list(preset.files) if roles is None else [r for r in roles if r in preset.files]
    return [r for r in wanted if not preset.is_hub_file(r)]


def verify_local(preset: Any, roles: Iterable[str] | None = None) -> list[FileCheck]:
    """Check an embedded preset's files before they are opened: sha256 and size from its preset file (where given),
    then each safetensors header. PresetError (exit 2) on a missing, changed, truncated or unreadable file."""
    stamps = Stamps(trust=True)
    checks = []
    try:
        for role in local_roles(preset, roles):
            entry = preset.files[role]
            checks.append(check_file(preset.file_path(role), stamps, sha256=entry.sha256, size=entry.size,
                                     reference=f"{preset.name} preset files.{role}"))
    finally:
        stamps.save()
    require_ok(preset.name, checks, hint=local_hint(preset))
    for c in checks:
        if c.path.suffix == ".safetensors":
            check_safetensors(c.path, preset.name, local_hint(preset))
    return checks


def hash_local(preset: Any) -> dict[str, tuple[str, int]]:
    """role -> (sha256, size) of every file of an embedded preset, hashed now (`lvstudio presets hash`)."""
    out: dict[str, tuple[str, int]] = {}
    for role in local_roles(preset):
        path = preset.file_path(role)
        if not path.is_file():
            raise PresetError(f"preset {preset.name!r}: files.{role} ({path}) does not exist",
                              hint="restore it, or remove [files." + role + "] from the preset file")
        if path.suffix == ".safetensors":
            check_safetensors(path, preset.name, local_hint(preset))
        out[role] = (sha256_file(path), path.stat().st_size)
    return out
