"""`lvstudio presets list | info | pull | pin | verify | convert | hash`: one typer sub-app over the presets package.

The `presets_*` functions do the work and report through `echo` (one line per step); the `*_cmd` functions are the
typer commands with the documented options, registered on `presets_app` (which `lvstudio.cli` mounts as
`lvstudio presets`). Heavy imports (pydantic, torch, huggingface_hub) happen inside the functions, so importing this
module keeps `lvstudio --help` instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lvstudio.errors import PresetError

if TYPE_CHECKING:
    from lvstudio.presets.convert import Converted
    from lvstudio.presets.hub import FileCheck, PullResult
    from lvstudio.presets.schema import Preset

Echo = Callable[[str], None]

presets_app = typer.Typer(help="List, pull, pin, verify, convert and hash model presets.", no_args_is_help=True)


def _hub_preset(name: str) -> Preset:
    from lvstudio.presets.schema import load_preset

    preset = load_preset(name)
    if not preset.is_hub:
        raise PresetError(f"preset {preset.name!r} has no Hub files; nothing to pull, verify or convert",
                          hint="its weights live next to its preset.toml")
    return preset


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def preset_status(preset: Preset) -> str:
    """Whether a preset's files are present and verified, in a few words (the status column of `presets list`).

    Embedded presets: "ready" (every file present and matching the sha256/size its preset file records),
    "missing <file>", "checksum mismatch" or "damaged <file>" (not a readable safetensors file). Hub presets:
    "not pulled", "not converted", "verified" (every file matched its reference when last hashed, and is unchanged
    since), "pulled, not verified" (some large file was never hashed: `lvstudio presets verify NAME` does it) or
    "checksum mismatch". Nothing large is hashed here.
    """
    from lvstudio.presets import hub, integrity

    if not preset.is_hub:
        stamps = integrity.Stamps(trust=True)
        for role in integrity.local_roles(preset):
            entry, path = preset.files[role], preset.file_path(role)
            check = integrity.check_file(path, stamps, sha256=entry.sha256, size=entry.size)
            if check.status == "missing":
                return f"missing {entry.path}"
            if check.failed:
                return "checksum mismatch"
            if path.suffix == ".safetensors" and integrity.safetensors_error(path) is not None:
                return f"damaged {entry.path}"
        stamps.save()
        return "ready"
    try:
        resolved = hub.resolve(preset)
    except PresetError as err:
        return "not converted" if "converted" in str(err) else "not pulled"
    checks = hub.verify_resolved(resolved, use_stamps=True, cached_only=True)
    if any(c.failed for c in checks):
        return "checksum mismatch"
    if any(c.status == "unchecked" for c in checks):
        return "pulled, not verified"
    return "verified"


def presets_list(*, echo: Echo = print) -> list[tuple[str, str]]:
    """One line per preset found (name, backend, native size, status, description, which says when a preset is not
    real time); returns (name, status)."""
    from lvstudio.presets.schema import available_presets, load_preset

    out = []
    for name in available_presets():
        p = load_preset(name)
        status = preset_status(p)
        size = f"{p.width}x{p.height}@{p.fps}"
        speed = "" if p.realtime else "NOT REAL TIME (minutes per clip): "
        echo(f"{name:24s} {p.backend:14s} {size:12s} {status:20s} {speed}{p.description}")
        out.append((name, status))
    return out


def presets_info(name: str, *, echo: Echo = print) -> Preset:
    """A preset's settings and files as JSON, its status, and (tiny text encoder) its vocabulary."""
    from lvstudio.presets.schema import load_preset

    p = load_preset(name)
    echo(p.model_dump_json(indent=2, exclude={"folder", "sources"}))
    echo("preset file: " + " over ".join(str(f) for f in p.sources))
    if p.is_hub:
        from lvstudio.presets.lock import lock_path, locked_commits

        locked = locked_commits(p.name)
        for repo in p.hub_repos():
            pin, lock = p.pinned_revision(repo), locked.get(repo)
            state = (f"pinned at {pin}" if pin else f"locked at {lock} by a pull ({lock_path(p.name)})" if lock
                     else "not pinned, not pulled: the first pull resolves main once and locks it")
            echo(f"revision of {repo}: {state}")
    echo(f"status: {preset_status(p)}")
    if p.text_encoder == "tiny" and "text_encoder" in p.files and p.file_path("text_encoder").exists():
        from lvstudio.models.tiny_text import load_text_encoder

        vocab = [w for w in load_text_encoder(p.file_path("text_encoder")).cfg.vocab if not w.startswith("<")]
        echo(f"vocabulary ({len(vocab)} words): {' '.join(vocab)}")
    return p


def presets_pull(
    name: str,
    revision: list[str] | None = None,
    *,
    force: bool = False,
    convert: bool = True,
    echo: Echo = print,
) -> PullResult:
    """Download (or find in the Hub cache) a preset's files, check every byte, lock the commits with the sha256 and
    size of every file, convert `.pt` checkpoints.

    revision: `--revision` values — `OWNER/NAME=COMMIT`, a bare 40-hex commit (the main repo), or a branch such as
    `main` (resolve every unpinned repository again, also where a lock exists). Without it, an unpinned repository
    is read at its locked commit, or (first pull) its main branch is resolved once and locked.
    """
    from lvstudio.presets import hub

    preset = _hub_preset(name)
    overrides = hub.parse_revision_args(revision or [], preset)
    echo(f"preset {preset.name}: {len(hub.hub_entries(preset))} entries from {', '.join(preset.hub_repos())}"
         + (" (offline: Hub cache only)" if hub.is_offline() else ""))
    result = hub.pull(preset, overrides, force=force, log=echo)
    for r in result.repos:
        how = "from the cache" if r.cached else f"downloaded {_gib(r.bytes_downloaded)}"
        echo(f"  {r.repo_id} @ {r.commit} ({r.why}; {how})")
    unref = [c for c in result.checks if c.status == "unreferenced"]
    echo(f"  sha256 checked: {sum(c.status == 'ok' for c in result.checks)} files"
         + (f", {len(unref)} without a reference hash" if unref else ""))
    echo(f"  lock (commits, sha256 and size of every file): {result.lock}")
    if any(r.why == "not pinned" or r.revision != r.commit for r in result.repos):
        echo(f"  to pin these commits for good: `lvstudio presets pin {preset.name}`")
    if convert:
        presets_convert(preset.name, force=force, echo=echo)
    echo(f'ready: use preset = "{preset.name}" in a storyboard (needs a GPU for full-size models: --device cuda)')
    return result


def presets_pin(name: str, *, to: Path | None = None, force: bool = False, echo: Echo = print) -> Path:
    """Write the commits of a preset's last pull (and the sha256/size of its single-file entries) into a pin file,
    `NAME.toml` with `base = "NAME"`, in the user's preset folder (or `to`)."""
    from lvstudio.presets import edit, hub
    from lvstudio.presets.lock import lock_path, read_lock
    from lvstudio.presets.schema import user_presets_dir

    preset = _hub_preset(name)
    lock = read_lock(preset.name)
    absent = [repo for repo in preset.hub_repos() if repo not in lock]
    if absent:
        raise PresetError(f"preset {preset.name!r} has no locked commit for {', '.join(absent)}: nothing to pin yet",
                          hint=f"pull it first: `lvstudio presets pull {preset.name}`")
    commits = {repo: lock[repo].commit for repo in preset.hub_repos()}
    for repo, commit in commits.items():
        pinned = preset.pinned_revision(repo)
        if pinned is not None and pinned != commit:
            raise PresetError(f"preset {preset.name!r} pins {repo} at {pinned[:12]} but its lock says {commit[:12]}",
                              hint=f"pull it again (`lvstudio presets pull {preset.name}`), then pin")
    files = {}
    for e in hub.hub_entries(preset):
        locked = lock[e.repo_id].files.get(e.path) if e.kind != "diffusers" else None
        if locked is not None:
            files[e.role] = (locked.sha256, locked.size)
    target = (to or user_presets_dir()) / f"{preset.name}.toml"
    if preset.sources[-1].resolve() == target.resolve():  # no base below it: the file is the preset itself
        raise PresetError(f"{target} is the preset itself, not a pin file",
                          hint="write the commits into it by hand, or pin into another folder with --to DIR")
    edit.write_pin_file(target, preset.name, preset.repo_id, commits, files, source=f"the lock {lock_path(name)}",
                        force=force)
    for repo, commit in commits.items():
        echo(f"  {repo} @ {commit}")
    echo(f"pinned {preset.name} in {target} ({len(files)} file hashes); delete that file to unpin")
    if to is not None:
        echo(f"  {to} is read when it is listed in LVSTUDIO_PRESET_PATH")
    return target


def presets_verify(name: str, *, echo: Echo = print) -> list[FileCheck]:
    """Re-hash every file of a pulled preset (sources and converted files); PresetError on any mismatch."""
    from lvstudio.presets import hub

    preset = _hub_preset(name)
    checks = hub.verify(preset, full=True)
    for c in checks:
        ref = f" (vs {c.reference})" if c.reference != "none" else " (no reference hash: not checked)"
        echo(f"  {c.status:<12} {c.sha256[:16]}…  {c.path}{ref}")
    hub.require_ok(preset, checks)
    echo(f"{preset.name}: {len(checks)} files verified")
    return checks


def presets_convert(
    name_or_path: str,
    output: Path | None = None,
    *,
    kind: str = "dit",
    state_key: str | None = None,
    force: bool = False,
    echo: Echo = print,
) -> list[Converted]:
    """Convert a pulled preset's `.pt` files (by preset name), or one `.pt` file (by path) to safetensors."""
    from lvstudio.presets import convert

    src = Path(name_or_path)
    if src.suffix.lower() in (".pt", ".pth"):
        if not src.is_file():
            raise PresetError(f"checkpoint {src} " + ("is a folder" if src.exists() else "does not exist"),
                              hint="check the path of the .pt file (a pulled preset is converted by its name)")
        if kind not in ("dit", "lora", "tensors"):
            raise PresetError(f"--kind must be dit, lora or tensors (got {kind!r})")
        out = output or src.with_suffix(".safetensors")
        convert.check_single_output(out)
        echo(f"converting {src} (torch.load(weights_only=True): tensors only, code is refused)")
        done = [convert.convert_checkpoint(src, out, kind=kind, state_key=state_key, force=force,  # type: ignore[arg-type]
                                           replace=False)]
    else:
        if output is not None:
            raise PresetError("--output applies to a single .pt file, not to a preset",
                              hint="converted preset files go to the lvstudio cache (LVSTUDIO_CACHE)")
        done = convert.convert_preset(_hub_preset(name_or_path), force=force)
        if not done:
            echo(f"{name_or_path}: no .pt files to convert")
    for c in done:
        state = "up to date" if c.skipped else f"{c.num_tensors} tensors"
        echo(f"  {c.kind:<7} {c.output} ({state}, sha256 {c.sha256[:16]}…)")
    return done


def _preset_at(target: str) -> Preset:
    """A preset by name, by its TOML file, or by the folder holding its preset.toml."""
    from lvstudio.presets.schema import load_preset

    path = Path(target)
    if path.is_dir():
        if not (path / "preset.toml").is_file():
            raise PresetError(f"{path} has no preset.toml", hint="give the preset's folder, its TOML file or its name")
        path = path / "preset.toml"
    return load_preset(path if path.suffix == ".toml" else target)


def presets_hash(target: str, *, write: bool = False, echo: Echo = print) -> dict[str, tuple[str, int]]:
    """sha256 and size of every file of an embedded preset; `write` records them in its preset file (a maintainer
    runs this after retraining the weights a preset ships)."""
    from lvstudio.presets import edit, integrity

    preset = _preset_at(target)
    hashes = integrity.hash_local(preset)
    if not hashes:
        raise PresetError(f"preset {preset.name!r} has no local files to hash",
                          hint="Hub presets are hashed by `lvstudio presets pull` (the lock) and pinned by "
                               "`lvstudio presets pin`")
    differ = 0
    for role, (sha, size) in hashes.items():
        entry = preset.files[role]
        same = entry.sha256 == sha and entry.size == size
        differ += not same
        state = "recorded" if same else "not recorded" if entry.sha256 is None else "differs from the preset file"
        echo(f"  {role:<14} {sha}  {size:>10}  {preset.file_path(role)}  ({state})")
    if write:
        from lvstudio.io_errors import translated_io

        # `presets hash` has no --out: the way round a file it cannot write is a copy of the preset it can.
        with translated_io("writing the sha256 and size into", path=preset.sources[0],
                           elsewhere="copy the preset's folder somewhere writable and hash the copy"):
            changed = edit.write_file_hashes(preset.sources[0], hashes)
        echo(f"{preset.sources[0]}: " + (f"wrote sha256 and size of {', '.join(changed)}" if changed
                                         else "already up to date"))
    elif differ:
        echo(f"{differ} of {len(hashes)} not recorded; `lvstudio presets hash {target} --write` records them in "
             f"{preset.sources[0]}")
    return hashes


# ---------------------------------------------------------------------------------------------------------------
# typer commands
# ---------------------------------------------------------------------------------------------------------------


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


@presets_app.command("list")
def list_cmd() -> None:
    """List the presets found (your preset folder, $LVSTUDIO_PRESET_PATH, presets/): backend, size, file status."""
    presets_list(echo=typer.echo)


@presets_app.command("info")
def info_cmd(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Show a preset's settings, files, status and (for tiny) its vocabulary."""
    presets_info(name, echo=typer.echo)


@presets_app.command("pull")
def pull_cmd(
    name: Annotated[str, typer.Argument(help="Preset name (or unique prefix), e.g. self-forcing-1.3b.")],
    revision: Annotated[list[str] | None, typer.Option(
        "--revision", "-r", metavar="[REPO=]REV",
        help="Commit to pull: OWNER/NAME=COMMIT, a bare COMMIT for the preset's main repo, or a branch such as "
             "'main' to move every unpinned repo to today's commit (default: the locked commit, else main resolved "
             "once). Repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and convert again even if cached.")] = False,
    no_convert: Annotated[bool, typer.Option("--no-convert", help="Do not convert .pt checkpoints now.")] = False,
) -> None:
    """Download a Hub preset (weights and JSON only) at one commit per repo, check every byte, lock the commits with
    the sha256 and size of every file, convert .pt to safetensors."""
    presets_pull(name, revision, force=force, convert=not no_convert, echo=_echo)


@presets_app.command("pin")
def pin_cmd(
    name: Annotated[str, typer.Argument(help="A pulled Hub preset.")],
    to: Annotated[Path | None, typer.Option("--to", help="Folder for the pin file (default: your preset folder, "
                                            "$LVSTUDIO_CONFIG/presets or ~/.config/lvstudio/presets).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file there that is not a pin file.")] = False,
) -> None:
    """Pin the commits of the last pull: writes NAME.toml (base = NAME, the commits and file hashes) in your preset
    folder, so every later pull and load reads exactly those files."""
    presets_pin(name, to=to, force=force, echo=_echo)


@presets_app.command("hash")
def hash_cmd(
    target: Annotated[str, typer.Argument(metavar="PRESET|PATH", help="An embedded preset: name, folder or TOML.")],
    write: Annotated[bool, typer.Option("--write", help="Record sha256 and size in the preset file.")] = False,
) -> None:
    """Print (and with --write, record) the sha256 and size of an embedded preset's files; loads check them."""
    presets_hash(target, write=write, echo=typer.echo)


@presets_app.command("verify")
def verify_cmd(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Re-hash every file of a pulled preset against its pinned or Hub checksums."""
    presets_verify(name, echo=_echo)


@presets_app.command("convert")
def convert_cmd(
    target: Annotated[str, typer.Argument(metavar="PRESET|FILE.pt", help="A pulled preset, or one .pt checkpoint.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .safetensors (single file).")] = None,
    kind: Annotated[str, typer.Option(help="Single file: dit | lora | tensors.")] = "dit",
    state_key: Annotated[str | None, typer.Option(
        help="Single file: dict inside the checkpoint, e.g. generator_ema.")] = None,
    force: Annotated[bool, typer.Option("--force", help=(
        "Convert again even if up to date; for one .pt file, also replace an existing --output (and its "
        ".lvstudio.json), which is refused without it."))] = False,
) -> None:
    """Convert upstream .pt checkpoints to safetensors once (torch.load(weights_only=True), official Wan keys)."""
    presets_convert(target, output, kind=kind, state_key=state_key, force=force, echo=_echo)
