"""Job folders: what an interrupted render leaves behind to resume from, and how it checks itself on `--resume`.

Layout (one folder per output, `out/x.job/` for `out/x.mp4`):

    job.json                       identity (format, lvstudio version, storyboard sha256, settings, preset
                                   fingerprint), the job id, the preset reference and the resume command
    chunks/000000.safetensors      each chunk's clean latents + metadata (index, frames, prompt, job id; the
                                   session's live prompts when they changed)
    snapshots/000008.safetensors   backend state after that many chunks (the last KEEP_SNAPSHOTS are kept)
    live.safetensors               every live prompt pushed so far (metadata only), written at each push: the
                                   prompts that landed after the last chunk saved before a crash

Every file is written atomically (temp file, fsync, rename) and carries its own checksum (`lvstudio.checked_files`),
so our own writes never leave a damaged file, and damage from elsewhere (a disk, a copy, a hand) is detected.

`JobFolder.validate` is what `--resume` runs: it refuses a job made for another storyboard, preset, seed, settings or
lvstudio version (naming each difference), checks every chunk and snapshot, and picks the newest intact snapshot
that only needs intact chunks before it. Chunks are deterministic, so whatever comes after that point (a truncated
chunk and everything after it, a damaged snapshot) is dropped and regenerated. No snapshot at all means starting
from the first chunk: a backend's initial state is its own snapshot 0.

Nothing here knows about renders beyond "chunks and snapshots": a batch of renders keeps one JobFolder per output.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvstudio import __version__
from lvstudio.checked_files import load_checked, read_metadata, save_checked
from lvstudio.errors import DamagedFileError, LvError

if TYPE_CHECKING:
    from torch import Tensor

    from lvstudio.presets.schema import Preset

JOB_FORMAT = "lvstudio.job/3"  # 3: a cut starts a new shot (issue #13); chunks record new_shot
KEEP_SNAPSHOTS = 2
_INDEXED = re.compile(r"^(\d{6})\.safetensors$")


class JobMismatchError(LvError):
    """A job folder made for something else than what the command asks for."""


@dataclass(frozen=True)
class JobIdentity:
    """What must be equal for a job to be continued: any difference would change the output."""

    storyboard_sha256: str
    settings: dict[str, Any]
    preset: str  # preset_fingerprint()
    lvstudio: str = __version__
    format: str = JOB_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "lvstudio": self.lvstudio, "storyboard_sha256": self.storyboard_sha256,
                "settings": dict(self.settings), "preset": self.preset}

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """Why a job with identity `saved` (job.json) is not this one; [] if it is."""
        out = []
        if saved.get("format") != self.format:
            out.append(f"its format is {saved.get('format')!r}, this lvstudio writes {self.format!r}")
        if saved.get("lvstudio") != self.lvstudio:
            out.append(f"it was made by lvstudio {saved.get('lvstudio')}, this is lvstudio {self.lvstudio}")
        if saved.get("storyboard_sha256") != self.storyboard_sha256:
            out.append("the storyboard changed since (its sha256 differs)")
        old = saved.get("settings") or {}
        for key, value in self.settings.items():
            if old.get(key) != value:
                out.append(f"{key}: the job has {old.get(key)!r}, this command asks for {value!r}")
        if not any(d.startswith("preset:") for d in out) and saved.get("preset") != self.preset:
            out.append("the preset's configuration or weight files changed since")
        return out


FINGERPRINT_HASH_LIMIT = 64 << 20  # local weight files up to this size are hashed; larger ones: size and mtime


def preset_fingerprint(preset: Preset) -> str:
    """sha256 of a preset's configuration (Hub files are pinned there by commit and sha256) and of its local weight
    files: their contents (files up to FINGERPRINT_HASH_LIMIT), else their size and modification time."""
    import hashlib

    h = hashlib.sha256(preset.model_dump_json().encode())
    for role in sorted(preset.files):
        if preset.is_hub_file(role) or preset.folder is None:
            continue
        path = preset.folder / preset.files[role].path
        try:
            st = path.stat()
            if path.is_file() and st.st_size <= FINGERPRINT_HASH_LIMIT:
                h.update(f"{role}:{hashlib.sha256(path.read_bytes()).hexdigest()}".encode())
            else:
                h.update(f"{role}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{role}:missing".encode())
    return h.hexdigest()


def preset_reference(ref: str) -> str:
    """How job.json names a preset so that `--resume` finds it again: a name as it is, a path made absolute."""
    path = Path(ref)
    if ref.endswith(".toml") and path.exists():
        return str(path.resolve())
    if path.is_dir() and (path / "preset.toml").is_file():  # a preset's folder (`load_preset` takes it too)
        return str(path.resolve())
    return ref


@dataclass
class ResumePoint:
    """Where a validated job continues: chunks [0, index) are kept; `snapshot` restores the state after them."""

    index: int
    snapshot: Path | None  # None: start from the backend's initial state (index 0)
    meta: dict[str, str] = field(default_factory=dict)  # the snapshot's metadata
    dropped_meta: list[dict[str, str]] = field(default_factory=list)  # of the intact chunks made again, in order
    notes: list[str] = field(default_factory=list)  # what the check found and did, for the user


class JobFolder:
    """One job folder (module docstring). Files are written atomically and checked when read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.info_path = self.root / "job.json"
        self.chunks = self.root / "chunks"
        self.snapshots = self.root / "snapshots"
        self.live_path = self.root / "live.safetensors"
        self._job_id: str | None = None

    # -- writing --------------------------------------------------------------------------------------------------
    def create(self, identity: JobIdentity, **extra: Any) -> dict[str, Any]:
        """Make the folder and write job.json (identity + a fresh job id + `extra`); returns what was written."""
        from lvstudio.atomic import atomic_write_json

        self.root.mkdir(parents=True, exist_ok=True)
        self.chunks.mkdir(exist_ok=True)
        self.snapshots.mkdir(exist_ok=True)
        info = {**identity.as_dict(), "job_id": secrets.token_hex(8), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **extra}
        atomic_write_json(self.info_path, info)
        self._job_id = info["job_id"]
        return info

    @property
    def job_id(self) -> str:
        if self._job_id is None:
            self._job_id = str(self.read_info()["job_id"])
        return self._job_id

    def chunk_path(self, index: int) -> Path:
        return self.chunks / f"{index:06d}.safetensors"

    def snapshot_path(self, index: int) -> Path:
        return self.snapshots / f"{index:06d}.safetensors"

    def save_chunk(self, index: int, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Path:
        """Chunk `index`'s tensors (folders are made by `create` only: a job folder deleted mid-run is an error,
        never silently made again without its job.json)."""
        return save_checked(tensors, self.chunk_path(index), {**meta, "index": str(index), "job_id": self.job_id})

    def save_snapshot(self, index: int, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Path:
        """The state after `index` chunks; older snapshots beyond the newest KEEP_SNAPSHOTS are removed."""
        path = save_checked(tensors, self.snapshot_path(index), {**meta, "index": str(index), "job_id": self.job_id})
        for old in sorted(self._indexed(self.snapshots))[:-KEEP_SNAPSHOTS]:
            self.snapshot_path(old).unlink(missing_ok=True)
        return path

    def save_live(self, events: str) -> Path:
        """The live prompt events pushed so far (JSON), replacing the previous list: written when a prompt is pushed,
        before any chunk it steers exists."""
        return save_checked({}, self.live_path, {"live_events": events, "job_id": self.job_id})

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.exists()

    def frames_saved(self) -> int | None:
        """Frames made up to the newest snapshot, from its header (unchecked: `validate` checks everything when the
        job resumes); 0 for a job with no snapshot yet; None when there is no job here to resume (no job.json)."""
        if not self.info_path.is_file():
            return None
        for index in reversed(self._indexed(self.snapshots)):
            try:
                return int(read_metadata(self.snapshot_path(index)).get("frames_done", 0))
            except (DamagedFileError, ValueError):
                continue
        return 0

    def read_info(self) -> dict[str, Any]:
        """job.json; LvError when it is missing or damaged (then the job cannot be identified)."""
        if not self.info_path.exists():
            raise LvError(f"nothing to resume: {self.root} has no job.json",
                          hint="run without --resume to start (with --force to replace that folder)")
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("job_id"), str):
                raise ValueError("not a job description")
        except (ValueError, UnicodeDecodeError) as err:
            raise DamagedFileError(self.info_path, f"it cannot be read as a job description ({err})",
                                   hint="the job cannot be identified: start over with --force") from None
        return info

    def check_identity(self, identity: JobIdentity) -> dict[str, Any]:
        """job.json, if it describes the same job as `identity`; JobMismatchError listing the differences if not."""
        info = self.read_info()
        diffs = identity.differences(info)
        if diffs:
            raise JobMismatchError(
                f"cannot resume the job in {self.root}: " + "; ".join(diffs),
                hint="resume with the same storyboard, preset and options (or undo the change), "
                     "or start over with --force (which discards the job)")
        return info

    def load_chunk(self, index: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        return load_checked(self.chunk_path(index))

    def load_snapshot(self, point: ResumePoint) -> dict[str, Tensor]:
        if point.snapshot is None:
            return {}
        return load_checked(point.snapshot)[0]

    def load_live(self) -> tuple[str | None, str | None]:
        """(the live events pushed so far as JSON, None) from live.safetensors; (None, why not) when it is damaged or
        another job's; (None, None) when no prompt was pushed."""
        if not self.live_path.exists():
            return None, None
        try:
            _, meta = load_checked(self.live_path)
        except DamagedFileError as err:
            return None, err.reason
        if meta.get("job_id") != self.job_id or "live_events" not in meta:
            return None, "it belongs to another job"
        return meta["live_events"], None

    @staticmethod
    def _indexed(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _INDEXED.match(p.name)))

    def _check(self, path: Path, index: int) -> tuple[dict[str, str] | None, str | None]:
        """(metadata, None) for an intact file of this job at `index`, else (None, why not)."""
        try:
            _, meta = load_checked(path)
        except DamagedFileError as err:
            return None, err.reason
        if meta.get("job_id") != self.job_id:
            return None, "it belongs to another job"
        if meta.get("index") != str(index):
            return None, f"it says it is number {meta.get('index')}"
        return meta, None

    # -- validation -------------------------------------------------------------------------------------------------
    def validate(self, identity: JobIdentity, echo: Callable[[str], None] | None = None) -> ResumePoint:
        """Check the whole folder for `--resume` (module docstring); drop what cannot be used; say what was done."""
        self.check_identity(identity)
        self.chunks.mkdir(exist_ok=True)
        self.snapshots.mkdir(exist_ok=True)
        for folder in (self.root, self.chunks, self.snapshots):
            for stale in folder.glob(".*.partial"):
                stale.unlink(missing_ok=True)  # temporary files of writes that a crash cut short
        notes: list[str] = []
        # Step 1: the intact run of chunks from 0.
        chunk_files = self._indexed(self.chunks)
        good = 0
        metas: list[dict[str, str]] = []
        while good in chunk_files:
            meta, why = self._check(self.chunk_path(good), good)
            if why is not None:
                notes.append(f"chunk {good} is damaged: {why}")
                break
            metas.append(meta or {})
            good += 1
        else:
            if any(i > good for i in chunk_files):
                notes.append(f"chunk {good} is missing")
        # Step 2: the newest intact snapshot that needs no chunk past the intact run.
        point = ResumePoint(0, None)
        for index in reversed(self._indexed(self.snapshots)):
            path = self.snapshot_path(index)
            if index > good:
                notes.append(f"snapshot {index} is not used: it needs chunks up to {index - 1}")
                continue
            meta, why = self._check(path, index)
            if why is not None:
                notes.append(f"snapshot {index} is damaged: {why}")
                continue
            point = ResumePoint(index, path, meta)
            break
        point.dropped_meta = metas[point.index:]
        # Step 3: drop what comes after the resume point (it is regenerated exactly), and damaged snapshots.
        dropped = [i for i in chunk_files if i >= point.index]
        for i in dropped:
            self.chunk_path(i).unlink(missing_ok=True)
        for i in self._indexed(self.snapshots):
            if i > point.index:
                self.snapshot_path(i).unlink(missing_ok=True)
        if notes:
            start = "the first chunk" if point.snapshot is None else f"the snapshot after chunk {point.index - 1}"
            again = f"chunks {dropped[0]}-{dropped[-1]} are made again" if dropped else "nothing is lost"
            notes.append(f"resuming from {start}; {again}")
        point.notes = notes
        if echo is not None:
            for note in notes:
                echo(f"job check: {note}")
        return point
