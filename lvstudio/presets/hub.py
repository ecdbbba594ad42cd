"""Hugging Face Hub presets: pull (download), resolve (offline), verify (sha256) and the lock of pinned commits.

A Hub preset names files in one or more repositories (the DiT checkpoint in its own repo, umT5 + VAE in
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`). Each repository is read at a 40-hex commit: pinned in the preset, or — while the
preset still says `revision = "FILL-ME"` — given once to `lvstudio presets pull NAME --revision ...` and then kept in
a lock file (`<lvstudio cache>/locks/NAME.json`). Nothing ever floats on a branch silently.

    pull     snapshot_download with allow_patterns = exactly the preset's files (weights + JSON, never code); cache
             reuse first (no network when everything is cached), HF_HUB_OFFLINE respected, free disk checked first,
             then every file hashed (sha256) and the commits written to the lock.
    resolve  local only: role -> path in the Hub cache snapshot (or the converted safetensors for `.pt` files);
             clear errors when something was never pulled or converted.
    verify   sha256 of every file against the preset's pinned sha256, or against the Hub's own content address
             (the blob name: sha256 for LFS files, git-sha1 for small files), before anything is loaded.

Where things live: the Hub cache is HF_HUB_CACHE (or HF_HOME/hub, else huggingface_hub's default); lvstudio's own
cache (locks, converted safetensors, verification stamps) is LVSTUDIO_CACHE (default ~/.cache/lvstudio). Both are
read when a function is called, not at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lvstudio.atomic import atomic_write_json
from lvstudio.errors import LvError, PresetError
from lvstudio.presets.schema import REVISION_PLACEHOLDER, FileEntry, Preset, is_commit

CHUNK = 1 << 20  # hash in 1 MiB reads
SMALL_FILE = 16 << 20  # bytes; files up to this size are hashed even when only remembered hashes are wanted
DISK_MARGIN = 2 << 30  # keep 2 GiB free after a download (bytes)
WEIGHT_SUFFIXES = (".safetensors",)
TEXT_SUFFIXES = (".json",)


# ---------------------------------------------------------------------------------------------------------------
# Locations and modes (read at call time)
# ---------------------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def lvstudio_cache_dir() -> Path:
    """lvstudio's own cache (locks, converted weights, verification stamps): LVSTUDIO_CACHE or ~/.cache/lvstudio."""
    if os.environ.get("LVSTUDIO_CACHE"):
        return Path(os.environ["LVSTUDIO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lvstudio"


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """`models--owner--name` inside the Hub cache."""
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def lock_path(preset_name: str) -> Path:
    return lvstudio_cache_dir() / "locks" / f"{preset_name}.json"


def converted_path(repo_id: str, commit: str, path: str) -> Path:
    """Where `lvstudio presets convert` writes the safetensors for an upstream `.pt` file."""
    stem = PurePosixPath(path).with_suffix(".safetensors")
    return lvstudio_cache_dir() / "converted" / ("models--" + repo_id.replace("/", "--")) / commit / stem


def sidecar_path(converted: Path) -> Path:
    """The JSON record next to a converted file (its sha256, source and source sha256)."""
    return converted.with_name(converted.name + ".lvstudio.json")


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data, sort_keys=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------------
# Revisions and the lock
# ---------------------------------------------------------------------------------------------------------------


def read_lock(preset_name: str) -> dict[str, str]:
    """repo_id -> commit recorded by the last successful pull of this preset ({} if none)."""
    data = _read_json(lock_path(preset_name))
    revs = data.get("revisions", {})
    return {k: v for k, v in revs.items() if isinstance(v, str) and is_commit(v)}


def write_lock(preset_name: str, revisions: Mapping[str, str]) -> Path:
    path = lock_path(preset_name)
    _write_json(path, {"preset": preset_name, "revisions": dict(revisions),
                              "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path


def parse_revision_args(values: Iterable[str], preset: Preset) -> dict[str, str]:
    """`--revision` values -> {repo_id: revision}.

    `REPO=REV` applies to that repository. A bare 40-hex commit applies to the preset's main repository. A bare
    branch or tag (e.g. `main`) is an explicit opt-in to float once: it applies to every repository the preset does
    not pin, and pull records the commits it resolved to in the lock.
    """
    repos = preset.hub_repos()
    out: dict[str, str] = {}
    for raw in values:
        value = raw.strip()
        if not value:
            continue
        if "=" in value:
            repo, rev = (s.strip() for s in value.split("=", 1))
            if repo not in repos:
                raise PresetError(f"--revision {value!r}: preset {preset.name!r} does not use repository {repo!r}",
                                  hint=f"its repositories are: {', '.join(repos)}")
            out[repo] = rev
        elif is_commit(value.lower()):
            if preset.repo_id is None:
                raise PresetError(f"--revision {value}: preset {preset.name!r} has no main repo_id",
                                  hint="write --revision OWNER/NAME=COMMIT")
            out[preset.repo_id] = value.lower()
        else:
            for repo in repos:
                if preset.pinned_revision(repo) is None:
                    out.setdefault(repo, value)
    for repo, rev in out.items():
        if not rev or rev == REVISION_PLACEHOLDER:
            raise PresetError(f"--revision for {repo} is empty or {REVISION_PLACEHOLDER!r}",
                              hint="give the 40-hex commit id from the repository's history on huggingface.co")
    return out


def resolve_revisions(preset: Preset, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """repo_id -> revision to use: --revision override, else the preset's pinned commit, else the lock's commit.

    Raises PresetError when a repository has no pin anywhere (the preset says FILL-ME and nothing was pulled).
    """
    overrides = overrides or {}
    lock = read_lock(preset.name)
    out: dict[str, str] = {}
    missing: list[str] = []
    for repo in preset.hub_repos():
        rev = overrides.get(repo) or preset.pinned_revision(repo) or lock.get(repo)
        if rev is None:
            missing.append(repo)
        else:
            out[repo] = rev
    if missing:
        example = " ".join(f"--revision {r}=<40-hex commit>" for r in missing)
        raise PresetError(
            f"preset {preset.name!r} pins no revision for {', '.join(missing)} (revision = {REVISION_PLACEHOLDER!r}) "
            "and lvstudio never floats on 'main'",
            hint=f"pull it at a commit you checked: `lvstudio presets pull {preset.name} {example}` (commit ids are in "
                 "the repository's 'Files and versions' history), or `--revision main` to pin today's main once",
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Which files a preset needs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubEntry:
    """One preset file on the Hub."""

    role: str
    repo_id: str
    entry: FileEntry

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def kind(self) -> str:
        return self.entry.kind

    def patterns(self) -> list[str]:
        """allow_patterns for this entry: the exact file, or a diffusers folder's *.safetensors and *.json."""
        if self.kind == "diffusers":
            return [f"{self.path}/*.safetensors", f"{self.path}/*.json"]
        return [self.path]


def hub_entries(preset: Preset, repo_id: str | None = None) -> list[HubEntry]:
    out = []
    for role, entry in preset.files.items():
        if preset.is_hub_file(role):
            repo = preset.file_repo(role)
            if repo_id is None or repo == repo_id:
                out.append(HubEntry(role, repo, entry))
    return out


def allow_patterns(preset: Preset, repo_id: str) -> list[str]:
    """The allow_patterns passed to snapshot_download for one repository (weights and JSON only)."""
    patterns: list[str] = []
    for e in hub_entries(preset, repo_id):
        for p in e.patterns():
            if p not in patterns:
                patterns.append(p)
    return patterns


def _entry_files(snapshot: Path, e: HubEntry) -> list[Path]:
    """Files of an entry present in a snapshot folder (a diffusers folder lists its weights and JSON)."""
    target = snapshot / e.path
    if e.kind != "diffusers":
        return [target] if target.is_file() else []
    if not target.is_dir():
        return []
    return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + TEXT_SUFFIXES)


def _entry_missing(snapshot: Path, e: HubEntry) -> str | None:
    """Why an entry is incomplete in a snapshot (None when complete)."""
    files = _entry_files(snapshot, e)
    if e.kind != "diffusers":
        return None if files else e.path
    names = {p.name for p in files}
    if names & {"tokenizer.json", "tokenizer_config.json"}:  # a tokenizer folder: JSON only
        return None if "tokenizer.json" in names else f"{e.path}/tokenizer.json"
    if "config.json" not in names:
        return f"{e.path}/config.json"
    if not any(n.endswith(".safetensors") for n in names):
        return f"{e.path}/*.safetensors"
    for index in (p for p in files if p.name.endswith(".safetensors.index.json")):
        shards = set(_read_json(index).get("weight_map", {}).values())
        absent = sorted(s for s in shards if not (index.parent / s).is_file())
        if absent:
            return f"{e.path}/{absent[0]}"
    return None


def _snapshot(repo_id: str, revision: str, cache: Path) -> tuple[str | None, Path | None]:
    """(commit, snapshot folder) for a revision in the local cache, or (None, None)."""
    folder = repo_folder(repo_id, cache)
    commit = revision if is_commit(revision) else None
    if commit is None:
        ref = folder / "refs" / revision
        if ref.is_file():
            commit = ref.read_text(encoding="utf-8").strip()
    if commit is None:
        return None, None
    snap = folder / "snapshots" / commit
    return commit, (snap if snap.is_dir() else None)


# ---------------------------------------------------------------------------------------------------------------
# Resolve (local only)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """Where a pulled preset's files are: role -> local path, repo -> commit."""

    preset: Preset
    commits: dict[str, str]
    paths: dict[str, Path]  # role -> file, diffusers folder, or (pt) the converted safetensors
    sources: dict[str, Path] = field(default_factory=dict)  # role -> the upstream file in the Hub cache

    def files(self, role: str) -> list[Path]:
        """Every loadable file of a role (a diffusers folder expands to its weights and JSON)."""
        p = self.paths[role]
        if p.is_dir():
            return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in WEIGHT_SUFFIXES + TEXT_SUFFIXES)
        return [p]


def _pull_hint(preset: Preset) -> str:
    hint = f"run `lvstudio presets pull {preset.name}`"
    if is_offline():
        hint += " on a machine with network (HF_HUB_OFFLINE is set here), or copy its Hub cache into " + str(
            hub_cache_dir())
    return hint


def resolve(preset: Preset, *, require_converted: bool = True,
            revisions: Mapping[str, str] | None = None) -> Resolved:
    """Find every Hub file of a preset in the local cache (never touches the network).

    revisions: {repo_id: revision}; default: the preset's pins, else the lock written by `presets pull`.
    """
    cache = hub_cache_dir()
    revisions = dict(revisions) if revisions is not None else resolve_revisions(preset)
    commits: dict[str, str] = {}
    paths: dict[str, Path] = {}
    sources: dict[str, Path] = {}
    for repo, rev in revisions.items():
        commit, snap = _snapshot(repo, rev, cache)
        if snap is None or commit is None:
            raise PresetError(
                f"preset {preset.name!r} is not pulled yet: {repo} at {rev[:12]} is not in the Hub cache {cache}",
                hint=_pull_hint(preset),
            )
        commits[repo] = commit
        for e in hub_entries(preset, repo):
            missing = _entry_missing(snap, e)
            if missing is not None:
                raise PresetError(
                    f"preset {preset.name!r} is not fully pulled: {repo}/{missing} (commit {commit[:12]}) is missing "
                    f"from the Hub cache {cache}",
                    hint=_pull_hint(preset),
                )
            src = snap / e.path
            sources[e.role] = src
            if e.kind == "pt":
                conv = converted_path(repo, commit, e.path)
                if require_converted and not (conv.is_file() and sidecar_path(conv).is_file()):
                    raise PresetError(
                        f"preset {preset.name!r}: {repo}/{e.path} is an upstream pickle checkpoint that has not been "
                        "converted to safetensors yet",
                        hint=f"run `lvstudio presets convert {preset.name}` (once; it uses "
                             "torch.load(weights_only=True))",
                    )
                paths[e.role] = conv
            else:
                paths[e.role] = src
    return Resolved(preset, commits, paths, sources)


# ---------------------------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------------------------


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
    """The result of hashing one file."""

    path: Path  # as the user sees it (the snapshot path or the converted file)
    status: str  # ok | mismatch | unreferenced (no expected hash known) | unchecked (not hashed yet: cached_only)
    sha256: str
    expected: str | None  # what it was compared with (sha256 or git-sha1), if anything
    reference: str  # preset | hub-etag | converted-record | none


class _Stamps:
    """sha256 remembered per (real path, size, mtime) so loading does not re-hash gigabytes every time.

    Every hash computed is remembered; `trust` says whether a remembered one may be used instead of hashing again
    (loads and `presets list` trust them; `pull` and `presets verify` hash everything afresh).
    """

    def __init__(self, trust: bool) -> None:
        self.trust = trust
        self.path = lvstudio_cache_dir() / "verified.json"
        self.data: dict[str, list] = _read_json(self.path)
        self.dirty = False

    def sha256(self, path: Path, *, compute: bool = True) -> str | None:
        """The file's sha256 (remembered, else hashed now); None when `compute` is off, nothing is remembered and
        the file is large."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns]
        hit = self.data.get(real)
        if self.trust and hit is not None and hit[:2] == key:
            return str(hit[2])
        if not compute and st.st_size > SMALL_FILE:
            return None
        digest = sha256_file(Path(real))
        self.data[real] = [*key, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            _write_json(self.path, self.data)


def _check_file(path: Path, expected_sha256: str | None, stamps: _Stamps, compute: bool = True) -> FileCheck:
    digest = stamps.sha256(path, compute=compute)
    if digest is None:
        return FileCheck(path, "unchecked", "", expected_sha256, "none")
    if expected_sha256 is not None:
        status = "ok" if digest == expected_sha256 else "mismatch"
        return FileCheck(path, status, digest, expected_sha256, "preset")
    etag = Path(os.path.realpath(path)).name
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        return FileCheck(path, "ok" if digest == etag else "mismatch", digest, etag, "hub-etag")
    if len(etag) == 40 and all(c in "0123456789abcdef" for c in etag):
        sha1 = git_blob_sha1(Path(os.path.realpath(path)))
        return FileCheck(path, "ok" if sha1 == etag else "mismatch", digest, etag, "hub-etag")
    return FileCheck(path, "unreferenced", digest, None, "none")


def verify_resolved(resolved: Resolved, *, use_stamps: bool, include_sources: bool = False,
                    roles: Iterable[str] | None = None, cached_only: bool = False) -> list[FileCheck]:
    """Hash the files of a resolved preset (converted files against their record, others against preset/etag).

    cached_only: hash nothing large, use only the hashes remembered from earlier checks (files never checked come
    back "unchecked"); `presets list` uses this to say whether a preset is verified without reading gigabytes.
    """
    stamps = _Stamps(use_stamps or cached_only)
    compute = not cached_only
    checks: list[FileCheck] = []
    preset = resolved.preset
    wanted = set(roles) if roles is not None else set(resolved.paths)
    try:
        for role, path in resolved.paths.items():
            if role not in wanted:
                continue
            entry = preset.files[role]
            if entry.kind == "pt":
                if include_sources and role in resolved.sources:
                    checks.append(_check_file(resolved.sources[role], entry.sha256, stamps, compute))
                if path.is_file():
                    record = _read_json(sidecar_path(path))
                    digest = stamps.sha256(path, compute=compute)
                    exp = record.get("sha256")
                    status = "unchecked" if digest is None else "ok" if exp == digest else "mismatch"
                    checks.append(FileCheck(path, status, digest or "", exp, "converted-record"))
                continue
            single = entry.sha256 if entry.kind != "diffusers" else None
            for f in resolved.files(role):
                checks.append(_check_file(f, single, stamps, compute))
    finally:
        stamps.save()
    return checks


def require_ok(preset: Preset, checks: list[FileCheck]) -> None:
    """Raise PresetError naming every file whose hash does not match (nothing is loaded after this fails)."""
    bad = [c for c in checks if c.status == "mismatch"]
    if not bad:
        return
    lines = "; ".join(f"{c.path} (sha256 {c.sha256[:16]}…, expected {str(c.expected)[:16]}… from {c.reference})"
                      for c in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise PresetError(
        f"checksum mismatch in preset {preset.name!r}: {lines}{more}",
        hint=f"the files are corrupt or were changed; re-download them with `lvstudio presets pull {preset.name} "
             "--force` (converted files: `lvstudio presets convert " + preset.name + " --force`)",
    )


def verify(preset: Preset, *, full: bool = True) -> list[FileCheck]:
    """Hash every file of a pulled preset (upstream `.pt` sources included); see require_ok for the verdict."""
    resolved = resolve(preset, require_converted=False)
    return verify_resolved(resolved, use_stamps=not full, include_sources=True)


# ---------------------------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoPull:
    """What pull did for one repository."""

    repo_id: str
    revision: str  # as requested
    commit: str  # resolved 40-hex commit
    cached: bool  # True: everything was already in the cache (no network used)
    bytes_downloaded: int
    snapshot: Path


@dataclass(frozen=True)
class PullResult:
    preset: str
    repos: list[RepoPull]
    checks: list[FileCheck]
    lock: Path


def _map_hub_error(err: BaseException, preset: Preset, repo_id: str, revision: str) -> LvError:
    """huggingface_hub errors -> one clear PresetError each."""
    from huggingface_hub import errors as hf

    name = preset.name
    if isinstance(err, hf.DryRunError) and err.__cause__ is not None:  # the dry run wraps the real Hub error
        err = err.__cause__
    if isinstance(err, hf.GatedRepoError):
        return PresetError(
            f"{repo_id} is a gated repository and this machine has no access to it",
            hint=f"accept its terms on https://huggingface.co/{repo_id}, then log in (`hf auth login` or HF_TOKEN) "
                 f"and run `lvstudio presets pull {name}` again")
    if isinstance(err, hf.RepositoryNotFoundError):
        return PresetError(
            f"repository {repo_id} was not found on the Hub (or is private)",
            hint="check repo_id in the preset; for a private repository log in with `hf auth login` or set HF_TOKEN")
    if isinstance(err, hf.RevisionNotFoundError):
        return PresetError(
            f"revision {revision!r} does not exist in {repo_id}",
            hint=f"take a commit id from https://huggingface.co/{repo_id}/commits/main and pass it with "
                 f"`lvstudio presets pull {name} --revision {repo_id}=<commit>`")
    if isinstance(err, hf.LocalEntryNotFoundError):
        if is_offline():
            return PresetError(
                f"offline (HF_HUB_OFFLINE=1) and {repo_id} at {revision[:12]} is not in the Hub cache "
                f"{hub_cache_dir()}",
                hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {name}`, or copy a Hub cache holding it "
                     "there")
        return PresetError(
            f"could not reach the Hub for {repo_id} and it is not in the Hub cache {hub_cache_dir()}",
            hint="check the network connection (or HF_ENDPOINT) and try again")
    if isinstance(err, hf.EntryNotFoundError):
        return PresetError(
            f"a file of preset {name!r} is not in {repo_id} at {revision[:12]}: {err}",
            hint="check files.*.path in the preset against the repository's file list")
    if isinstance(err, hf.OfflineModeIsEnabled):
        return PresetError(f"HF_HUB_OFFLINE is set and {repo_id} must be downloaded",
                           hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {name}`")
    if isinstance(err, hf.HfHubHTTPError):
        return PresetError(f"the Hub refused or failed a request for {repo_id}: {str(err).splitlines()[0]}",
                           hint="try again later; if it persists, check HF_TOKEN and the repository page")
    if isinstance(err, OSError) and not isinstance(err, ConnectionError | TimeoutError):
        from lvstudio.io_errors import io_failure, is_io_error

        if is_io_error(err):  # a full disk, a permission, a cache folder that vanished: one message everywhere
            return io_failure(err, action=f"downloading {repo_id} into {hub_cache_dir()}",
                              resume=f"lvstudio presets pull {name}",
                              elsewhere="set HF_HUB_CACHE (and LVSTUDIO_CACHE) to another disk")
    return PresetError(f"downloading {repo_id} failed: {type(err).__name__}: {err}",
                       hint="check the network connection and try again")


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hf

    return (hf.HfHubHTTPError, hf.EntryNotFoundError, hf.OfflineModeIsEnabled, hf.DryRunError, ConnectionError,
            TimeoutError, OSError)


def download_plan(repo_id: str, revision: str, patterns: list[str], cache: Path) -> list[tuple[str, int, bool]]:
    """(file, size in bytes, already cached) for what snapshot_download would fetch (a dry run: metadata only)."""
    from huggingface_hub import snapshot_download

    infos = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns, dry_run=True)
    return [(i.filename, int(i.file_size or 0), bool(i.is_cached)) for i in infos]


def _existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def check_disk(preset: Preset, download: int, convert: int, margin: int = DISK_MARGIN) -> None:
    """Refuse to start when the Hub cache (downloads) or the lvstudio cache (converted copies) lacks room."""
    hub_dir, lv_dir = hub_cache_dir(), lvstudio_cache_dir()
    same = _existing(hub_dir).stat().st_dev == _existing(lv_dir).stat().st_dev
    needs = [(hub_dir, download + (convert if same else 0))] + ([] if same else [(lv_dir, convert)])
    for where, need in needs:
        free = free_bytes(where)
        if need and need + margin > free:
            raise PresetError(
                f"not enough disk space to pull preset {preset.name!r}: {download / 2**30:.1f} GiB to download"
                + (f" + {convert / 2**30:.1f} GiB for the converted safetensors" if convert else "")
                + f" (+{margin / 2**30:.0f} GiB margin) but {free / 2**30:.1f} GiB free at {where}",
                hint="free some space, or point HF_HUB_CACHE (and LVSTUDIO_CACHE) at a bigger disk, then pull again",
            )


def pull(
    preset: Preset,
    revisions: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    tqdm_class: Any = None,
    log: Callable[[str], None] | None = None,
) -> PullResult:
    """Download (or find in the cache) every Hub file of a preset, verify sha256, and lock the commits.

    revisions: {repo_id: revision} overrides (from `--revision`); a preset's pinned commits are used otherwise.
    Raises PresetError for every user-fixable problem (unpinned, offline and not cached, gated/missing repo,
    unknown revision, missing file, not enough disk, checksum mismatch).
    """
    say = log or (lambda _m: None)
    for repo, rev in (revisions or {}).items():
        pinned = preset.pinned_revision(repo)
        if pinned is not None and rev != pinned:
            raise PresetError(
                f"preset {preset.name!r} pins {repo} at {pinned[:12]}; --revision {rev!r} would be ignored when "
                "loading",
                hint="drop --revision for this repository, or edit the preset's pin (or copy the preset under a new "
                     "name)",
            )
    revs = resolve_revisions(preset, revisions)
    results = [_pull_repo(preset, repo, rev, force=force, tqdm_class=tqdm_class, say=say) for repo, rev in revs.items()]
    # Step 4: lock the commits, then hash everything (upstream sources included) before anyone loads it.
    commits = {r.repo_id: r.commit for r in results}
    lock = write_lock(preset.name, commits)
    resolved = resolve(preset, require_converted=False, revisions=commits)
    checks = verify_resolved(resolved, use_stamps=False, include_sources=True)
    require_ok(preset, checks)
    return PullResult(preset.name, results, checks, lock)


def _pull_repo(preset: Preset, repo: str, rev: str, *, force: bool, tqdm_class: Any,
               say: Callable[[str], None]) -> RepoPull:
    """One repository of a pull: from the cache when complete there, else a checked download of exactly the
    preset's files."""
    cache = hub_cache_dir()
    offline = is_offline()
    entries = hub_entries(preset, repo)
    patterns = allow_patterns(preset, repo)
    # Step 1: cache reuse — a complete local snapshot needs no network at all.
    commit, snap = _snapshot(repo, rev, cache)
    floating = not is_commit(rev)
    if snap is not None and commit is not None and not force and (offline or not floating):
        missing = [m for e in entries if (m := _entry_missing(snap, e)) is not None]
        if not missing:
            say(f"{repo}@{commit[:12]}: cached ({len(entries)} entries)")
            return RepoPull(repo, rev, commit, True, 0, snap)
    else:
        missing = [e.path for e in entries]
    if offline:
        raise PresetError(
            f"offline (HF_HUB_OFFLINE=1) and preset {preset.name!r} is not in the Hub cache {cache}: "
            f"{repo} at {rev[:12]} lacks {', '.join(missing[:4])}",
            hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {preset.name}`, or copy a Hub cache "
                 "holding these files there",
        )
    from huggingface_hub import snapshot_download

    try:
        # Step 2: what would be downloaded, and is there room for it (plus the converted copies of .pt files)?
        plan = download_plan(repo, rev, patterns, cache)
        need = sum(size for _, size, cached in plan if not cached or force)
        check_disk(preset, need, sum(size for name, size, _ in plan if name.endswith((".pt", ".pth"))))
        if not plan:
            raise PresetError(f"none of {patterns} exist in {repo} at {rev[:12]}",
                              hint="check files.*.path in the preset against the repository's file list")
        say(f"{repo}@{rev[:12]}: downloading {need / 2**30:.2f} GiB ({len(plan)} files)")
        # Step 3: download exactly the preset's files (never code).
        folder = snapshot_download(repo, revision=rev, cache_dir=str(cache), allow_patterns=patterns,
                                   force_download=force, tqdm_class=tqdm_class)
    except PresetError:
        raise
    except _hub_errors() as err:
        raise _map_hub_error(err, preset, repo, rev) from None
    snap = Path(folder)
    commit = snap.name
    missing = [m for e in entries if (m := _entry_missing(snap, e)) is not None]
    if missing:
        raise PresetError(f"{repo} at {commit[:12]} has no {', '.join(missing)}",
                          hint="check files.*.path in the preset against the repository's file list")
    return RepoPull(repo, rev, commit, False, sum(s for _, s, c in plan if not c), snap)
