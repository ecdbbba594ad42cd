"""Preset schema: one TOML file per model setup in `presets/` (or any path), validated by pydantic.

A preset names the backend default, native size and fps, the model files (in-repo for `tiny`, on the Hugging Face
Hub for the others), the sampler and the attention settings. `lvstudio presets list|info` read these;
`lvstudio presets pull|verify|convert` (`lvstudio.presets.hub`, `.convert`) fetch Hub files;
`lvstudio.presets.load.load_bundle` turns a preset into models.

Presets are found, first match wins, in the user's preset folder (`user_presets_dir()`: where `lvstudio presets pin`
writes), in the folders listed in `LVSTUDIO_PRESET_PATH` (os.pathsep-separated) and in the repository's `presets/`
folder, by exact name or by a unique name prefix (`self-forcing` -> `self-forcing-1.3b`). A preset file that says
`base = "NAME"` changes the preset NAME found further down that list: its tables are merged key by key over NAME's
(a pin file holds only `revision`, `[revisions]` and `[files.<role>] sha256/size`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lvstudio.backends.registry import BACKENDS, DEFAULT_BACKEND
from lvstudio.errors import PresetError

DType = Literal["auto", "bfloat16-if-native", "bfloat16", "float16", "float32"]

# The old spelling of "not pinned" (today: leave `revision` out). Still read, as unpinned.
REVISION_PLACEHOLDER = "FILL-ME"
MAX_BASE_DEPTH = 8
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What may come from the Hub: weights and JSON. `.pt`/`.pth` are pickles: only `lvstudio presets convert` opens them
# (torch.load(weights_only=True)) and turns them into safetensors; nothing else ever unpickles a downloaded file.
HUB_SUFFIXES = {".safetensors": "safetensors", ".json": "json", ".pt": "pt", ".pth": "pt"}


def presets_dir() -> Path:
    """The repository's `presets/` folder (next to the package)."""
    return Path(__file__).resolve().parents[2] / "presets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def step_list_problem(steps: Sequence[float], warp: bool) -> str | None:
    """Why a few-step list cannot be sampled (None if it can): empty, a timestep outside (0, 1000], or a fractional
    one where `warp` looks the list up in the 1000-entry table."""
    if not steps:
        return "step_list must name at least one timestep (e.g. [1000, 750, 500, 250])"
    bad = [s for s in steps if not 0 < s <= 1000]
    if bad:
        return f"step_list timesteps must lie in (0, 1000] (got {bad[0]:g})"
    fractional = [s for s in steps if s != round(s)]
    if warp and fractional:
        return (f"warp = true looks step_list up in the 1000-entry table, so its timesteps must be whole numbers "
                f"(got {fractional[0]:g}): round them (e.g. 667 for 666.7) or set warp = false")
    return None


class SamplerSettings(_Strict):
    kind: Literal["few-step", "euler", "unipc"] = "euler"
    steps: int = Field(8, ge=1, le=1000)  # for euler/unipc
    shift: float = Field(1.0, gt=0)
    step_list: list[float] = [1000.0, 750.0, 500.0, 250.0]  # for few-step
    warp: bool = True  # few-step: warp the list onto the shifted table (Self-Forcing)
    cfg_scale: float = Field(1.0, ge=0)  # 1 = no classifier-free guidance
    context_noise: float = Field(0.0, ge=0, le=1000)  # timestep of the clean context pass

    @model_validator(mode="after")
    def _step_list(self) -> SamplerSettings:
        problem = step_list_problem(self.step_list, self.kind == "few-step" and self.warp)
        if problem:
            raise ValueError(problem)
        return self


class AttentionSettings(_Strict):
    block_frames: int = Field(3, ge=1)  # latent frames per causal block
    window_frames: int | None = Field(None, ge=1)  # total attention span (sink + past + block); None = unbounded
    sink_frames: int = Field(0, ge=0)
    rope_mode: Literal["absolute", "rebase"] = "absolute"
    global_sink: bool = True  # keep the sink's K/V across a prompt-switch re-cache (LongLive global_sink)
    recache_on_switch: bool = True
    # How the re-cached window attends to itself: all frames to all (LongLive upstream) or block by block.
    recache_attention: Literal["bidirectional", "block-causal"] = "bidirectional"

    @model_validator(mode="after")
    def _window(self) -> AttentionSettings:
        problem = window_problem(self.window_frames, self.sink_frames, self.block_frames, "block_frames")
        if problem:
            raise ValueError(problem)
        return self


def window_problem(window: int | None, sink: int, block: int, block_key: str) -> str | None:
    """Why an attention window cannot hold the sink and the block being generated (None if it can): the check
    `lvstudio.models.kv_cache.AttentionSpec` makes when a backend builds its cache, made when the preset loads."""
    need = sink + block
    if window is None or window >= need:
        return None
    return (f"window_frames = {window} is smaller than sink_frames + {block_key} = {sink} + {block} = {need}: the "
            f"window must hold the sink and the block being generated. Set window_frames >= {need}, lower sink_frames "
            f"or {block_key}, or leave window_frames out (unbounded)")


class CrossClipSettings(_Strict):
    """The ERFT cross-clip backend (Stable Video Infinity style)."""

    clip_frames: int = Field(6, ge=2)  # latent frames per clip, carried frames included
    carry_frames: int = Field(2, ge=0)  # last latents of the previous clip, re-used clean (latent carry-over)
    bidirectional: bool = False  # attention inside a clip (the tiny model was trained block-causal)
    use_anchor: bool = True  # prepend the AnchorCache's latest anchor (or the video's first latent) as a reference
    steps: int = Field(8, ge=1)
    shift: float = Field(2.0, gt=0)
    cfg_scale: float | None = Field(None, ge=0)  # classifier-free guidance; None = the preset's sampler.cfg_scale
    lora: str | None = None  # role in [files] of an ERFT LoRA to apply (safetensors)
    # Stable Video Infinity: an image-to-video DiT (its SVI LoRA merged at load, `svi_lora` in [files]) makes clips of
    # `pixel_frames` frames, each conditioned on the previous one as this release does (lvstudio.models.svi.SVI_MODES:
    # shot / film / tom / 2.0 carry decoded frames, 2.0-pro latents). None: the latent carry-over above.
    svi: Literal["shot", "film", "tom", "2.0", "2.0-pro"] | None = None
    pixel_frames: int = Field(81, ge=5)  # SVI: frames per clip (1 + 4k), the previous clip's motion frames included
    # The flow sampler of each clip on the (steps, shift) grid. SVI: euler or unipc. The latent carry-over: euler or
    # few-step (each step predicts the clean latents and re-noises them with fresh noise to the next σ of the grid).
    sampler: Literal["euler", "unipc", "few-step"] = "euler"

    @field_validator("pixel_frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError(f"pixel_frames must be 1 + 4k (e.g. 81), got {value}")
        return value

    @model_validator(mode="after")
    def _sampler(self) -> CrossClipSettings:
        if self.svi is not None and self.sampler == "few-step":
            raise ValueError(f'sampler = "few-step" is for the latent carry-over; svi = "{self.svi}" samples each clip '
                             'with "euler" or "unipc"')
        if self.svi is None and self.sampler == "unipc":
            raise ValueError('sampler = "unipc" is for SVI clips (svi = ...); the latent carry-over samples with '
                             '"euler" or "few-step"')
        return self


class StreamingSettings(_Strict):
    """The streaming-DiT backend's moving buffer (StreamDiT partitions)."""

    buffer_chunks: int = Field(4, ge=1)  # N chunks in the buffer, each at its own noise level
    chunk_frames: int | None = Field(None, ge=1)  # latent frames per chunk (default: attention.block_frames)
    micro_steps: int = Field(2, ge=1)  # denoising steps per chunk before the buffer shifts (steps per frame = N * s)
    shift: float = Field(2.0, gt=0)
    causal_buffer: bool = True  # block-causal attention inside the buffer (as the tiny preset was trained)
    cfg_scale: float | None = Field(None, ge=0)  # classifier-free guidance; None = the preset's sampler.cfg_scale
    dit: str | None = None  # role in [files] of DiT weights fine-tuned for this backend (`lvstudio train streaming`)


def _wan_latents(pixel_frames: int) -> int:
    return (pixel_frames - 1) // 4 + 1


class SkyReelsSettings(_Strict):
    """The streaming-DiT backend's SkyReels-V2 Diffusion Forcing mode (`lvstudio.backends.skyreels_mode`): the
    `DFSettings` of `lvstudio.sampling.df_sampler` plus guidance. A preset with this table runs streaming-dit in this
    mode; counts of frames are pixel frames, as in diffusers' pipelines."""

    num_steps: int = Field(30, ge=1, le=120)  # UniPC steps per frame
    shift: float = Field(8.0, gt=0)  # set explicitly: the Hub repo's scheduler config says 1.0
    base_num_frames: int = Field(97, ge=5)  # pixel frames per segment (the model's window): 97 at 540P, 121 at 720P
    ar_step: int = Field(5, ge=0)  # 0 = synchronous; 5 = block k trails block k - 1 by 5 steps (upstream async)
    causal_block_size: int = Field(5, ge=1)  # latent frames per block (= attention.block_frames)
    causal_attention: bool | None = None  # None = diffusers: block-causal iff causal_block_size > 1
    overlap_history: int = Field(17, ge=1)  # pixel frames carried between segments (17 or 37 upstream)
    addnoise_condition: float = Field(20.0, ge=0, le=60)  # noise put back on carried frames (diffusers warns > 60)
    guidance_scale: float = Field(6.0, ge=0)  # CFG with the negative prompt (5.0 upstream for image-to-video)

    @property
    def base_latents(self) -> int:
        return _wan_latents(self.base_num_frames)

    @property
    def overlap_latents(self) -> int:
        return _wan_latents(self.overlap_history)

    def check(self, block_frames: int) -> None:
        """Segments must divide into blocks of `causal_block_size` (ValueError naming the fix otherwise)."""
        cbs = self.causal_block_size
        if block_frames != cbs:
            raise ValueError(f"attention.block_frames ({block_frames}) must equal skyreels.causal_block_size ({cbs}):"
                             " the prompt stream's blocks are the sampler's blocks")
        if self.base_latents % cbs or self.overlap_latents % cbs:
            raise ValueError(
                f"skyreels: base_num_frames {self.base_num_frames} ({self.base_latents} latents) and overlap_history "
                f"{self.overlap_history} ({self.overlap_latents} latents) must be whole blocks of causal_block_size "
                f"{cbs} latents (e.g. 97 and 17 with 5)")
        if self.overlap_latents >= self.base_latents:
            raise ValueError(f"skyreels: overlap_history {self.overlap_history} must be shorter than base_num_frames "
                             f"{self.base_num_frames}")


class FileEntry(_Strict):
    """One file (or, with format = "diffusers", one diffusers component folder) a preset needs.

    Local presets name files relative to the preset folder. Hub presets name them relative to the repository root
    of `repo_id` (default: the preset's `repo_id`) at the pinned revision.
    """

    path: str  # relative to the preset folder (local) or the repo root (hub)
    sha256: str | None = None  # expected sha256 of a single file (hex); None = check against the Hub's LFS etag
    repo_id: str | None = None  # Hub repository holding the file (default: the preset's repo_id)
    format: Literal["safetensors", "pt", "json", "diffusers"] | None = None  # None = from the file suffix
    state_key: str | None = None  # pt: the dict inside the checkpoint to take (e.g. "generator_ema")
    size: int | None = Field(None, ge=0)  # bytes, if known (informational; pull asks the Hub)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return None if value is None else value.lower()

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and not _REPO_ID.fullmatch(value):
            raise ValueError(f"repo_id must look like 'owner/name', got {value!r}")
        return value

    @property
    def kind(self) -> str:
        """safetensors | pt | json | diffusers (a folder with config.json + *.safetensors)."""
        if self.format is not None:
            return self.format
        return HUB_SUFFIXES.get(PurePosixPath(self.path).suffix.lower(), "unknown")

    def check_hub_path(self, role: str) -> None:
        """Refuse Hub entries that could deliver code or escape the snapshot (ValueError)."""
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts or "\\" in self.path or not self.path.strip():
            raise ValueError(f"files.{role}.path {self.path!r} must be a relative path inside the repository")
        if self.kind == "diffusers":
            if p.suffix:
                raise ValueError(f"files.{role}: a diffusers entry names a folder, got {self.path!r}")
            return
        if p.suffix.lower() not in HUB_SUFFIXES:
            raise ValueError(
                f"files.{role}.path {self.path!r}: only *.safetensors, *.json and *.pt/*.pth (converted to "
                "safetensors by `lvstudio presets convert`) may come from the Hub — never code"
            )
        if HUB_SUFFIXES[p.suffix.lower()] != self.kind:
            raise ValueError(f"files.{role}: format {self.kind!r} does not match the file suffix of {self.path!r}")


class LoraSettings(_Strict):
    """A LoRA adapter applied (merged) at load time through peft (LongLive: rank 256, alpha 256)."""

    file: str = "lora"  # role in [files] holding the adapter
    rank: int | None = Field(None, ge=1)  # None = read from the adapter's lora_A shapes
    alpha: float | None = Field(None, gt=0)  # None = rank (scale 1)
    # Module names (regex, full match) that carry adapters: all attention and FFN linears of every block.
    target_modules: str = r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o)|ffn\.(0|2))"


class Preset(_Strict):
    name: str
    description: str = ""
    backend: str = DEFAULT_BACKEND  # a name in lvstudio.backends.registry
    fps: int = Field(16, ge=1, le=120)
    width: int = Field(128, ge=16)
    height: int = Field(128, ge=16)
    dit_config: dict = Field(default_factory=dict)  # WanDiTConfig fields
    text_encoder: Literal["tiny", "umt5"] = "tiny"
    vae: Literal["tiny", "wan"] = "tiny"
    files: dict[str, FileEntry] = Field(default_factory=dict)  # role -> file (dit, text_encoder, vae, lora...)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    attention: AttentionSettings = Field(default_factory=AttentionSettings)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    crossclip: CrossClipSettings = Field(default_factory=CrossClipSettings)
    skyreels: SkyReelsSettings | None = None  # streaming-dit runs SkyReels-V2 Diffusion Forcing with these settings
    negative_prompt: str = ""  # CFG's unconditional prompt when the storyboard sets none ("" = the empty prompt)
    repo_id: str | None = None  # Hugging Face Hub presets
    # 40-hex commit of repo_id; left out = unpinned: the first `presets pull` resolves the branch once and locks it.
    revision: str | None = None
    revisions: dict[str, str] = Field(default_factory=dict)  # other repos: repo_id -> 40-hex commit
    licence: str = ""
    lora: LoraSettings | None = None
    dtype: DType = "auto"  # DiT and text encoder: auto = bfloat16 on GPU, float32 on CPU; bfloat16-if-native: also
    # bfloat16 on a CPU with bfloat16 arithmetic (AVX512-BF16 / AMX)
    vae_dtype: DType = "auto"
    text_offload: Literal["auto", "never", "cpu", "swap"] = "auto"  # where the text encoder lives on a GPU run
    training: dict = Field(default_factory=dict)  # how the weights were made, and their figures (informational)
    realtime: bool = True  # False: minutes per clip (14B); `presets list` says so and render prints an estimate
    folder: Path | None = Field(None, exclude=True)  # where the preset's local files live (set by load_preset)
    sources: list[Path] = Field(default_factory=list, exclude=True)  # its preset files, the `base` chain, top first

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of: {', '.join(BACKENDS)}")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        return None if value is None or value == REVISION_PLACEHOLDER else _check_revision(value, "revision")

    @field_validator("revisions")
    @classmethod
    def _revisions(cls, value: dict[str, str]) -> dict[str, str]:
        for repo, rev in value.items():
            if not _REPO_ID.fullmatch(repo):
                raise ValueError(f"revisions: {repo!r} is not a repo id ('owner/name')")
            if rev != REVISION_PLACEHOLDER:
                _check_revision(rev, f"revisions.{repo}")
        return {repo: rev for repo, rev in value.items() if rev != REVISION_PLACEHOLDER}

    @model_validator(mode="after")
    def _hub_files(self) -> Preset:
        if self.repo_id is not None and not _REPO_ID.fullmatch(self.repo_id):
            raise ValueError(f"repo_id must look like 'owner/name', got {self.repo_id!r}")
        for role, entry in self.files.items():
            if self.is_hub_file(role):
                entry.check_hub_path(role)
                if entry.repo_id is None and self.repo_id is None:
                    raise ValueError(f"files.{role} has no repo_id and the preset has none")
        if self.lora is not None and self.lora.file not in self.files:
            raise ValueError(f"lora.file = {self.lora.file!r} is not a role in [files]")
        if self.skyreels is not None:
            self.skyreels.check(self.attention.block_frames)
        self._check_backend_tables()
        if self.dit_config:
            _check_dit_config(self.dit_config)
        return self

    def _check_backend_tables(self) -> None:
        """The cross-field checks the backends make when they start, made when the preset loads (ValueError)."""
        attn, chunk = self.attention, self.streaming.chunk_frames
        if chunk is not None:
            problem = window_problem(attn.window_frames, attn.sink_frames, chunk, "streaming.chunk_frames")
            if problem:
                raise ValueError(f"attention.{problem}")
        cc, n = self.crossclip, attn.block_frames
        if ("crossclip" in self.model_fields_set or self.backend == "erft-crossclip") and (
                cc.clip_frames % n or cc.carry_frames % n or cc.carry_frames >= cc.clip_frames):
            raise ValueError(f"crossclip.clip_frames ({cc.clip_frames}) and crossclip.carry_frames ({cc.carry_frames})"
                             f" must be multiples of attention.block_frames ({n}), with carry_frames < clip_frames: "
                             f"e.g. clip_frames = {3 * n}, carry_frames = {n}")

    @property
    def is_world(self) -> bool:
        """True for presets of the procedural world (the tiny text encoder knows only its grammar): the oracle
        (`lvstudio.world.oracle`) can score what they make."""
        return self.text_encoder == "tiny"

    # -- Hub helpers --------------------------------------------------------------------------------------------
    @property
    def is_hub(self) -> bool:
        """True when any file comes from the Hugging Face Hub."""
        return any(self.is_hub_file(role) for role in self.files)

    def is_hub_file(self, role: str) -> bool:
        return self.files[role].repo_id is not None or self.repo_id is not None

    def file_repo(self, role: str) -> str:
        """The Hub repository of a file (its own repo_id, else the preset's)."""
        repo = self.files[role].repo_id or self.repo_id
        if repo is None:
            raise PresetError(f"preset {self.name!r}: files.{role} is not a Hub file")
        return repo

    def hub_repos(self) -> list[str]:
        """Every Hub repository the preset reads from, main repo first."""
        repos: list[str] = []
        for role in self.files:
            if self.is_hub_file(role) and self.file_repo(role) not in repos:
                repos.append(self.file_repo(role))
        if self.repo_id in repos:
            repos.remove(self.repo_id)
            repos.insert(0, self.repo_id)
        return repos

    def pinned_revision(self, repo_id: str) -> str | None:
        """The 40-hex commit the preset pins for a repository, or None (unpinned)."""
        rev = self.revisions.get(repo_id)
        if rev is None and repo_id == self.repo_id:
            rev = self.revision
        return rev if rev is not None and _COMMIT.fullmatch(rev) else None

    def file_path(self, role: str) -> Path:
        """A local preset's file (next to its preset.toml). Hub files are found with `lvstudio.presets.hub.resolve`."""
        if role not in self.files:
            raise PresetError(f"preset {self.name!r} has no {role!r} file",
                              hint=f"add [files.{role}] to its preset.toml")
        if self.is_hub_file(role):
            raise PresetError(f"preset {self.name!r}: files.{role} lives on the Hub, not next to the preset",
                              hint=f"`lvstudio presets pull {self.name}` fetches it; "
                                   "lvstudio.presets.hub.resolve finds it")
        if self.folder is None:
            raise PresetError(f"preset {self.name!r} was not loaded from a file", hint="load it with load_preset()")
        return self.folder / self.files[role].path


def _check_dit_config(config: dict) -> None:
    """`[dit_config]` must build a `WanDiTConfig` (known keys, dim divisible by num_heads...): ValueError otherwise."""
    from lvstudio.models.wan_config import WanDiTConfig

    try:
        WanDiTConfig.from_dict(config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"dit_config: {err}") from None


def _check_revision(value: str, key: str) -> str:
    if _COMMIT.fullmatch(value):
        return value
    raise ValueError(
        f"{key} must be a 40-hex commit id (got {value!r}); a branch or tag such as 'main' would silently change the "
        f"weights. Leave it out to leave the repository unpinned (the first pull locks the commit it resolved)"
    )


def is_commit(revision: str | None) -> bool:
    """True for a full 40-hex (lowercase) commit id."""
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def user_presets_dir() -> Path:
    """The user's own preset folder (searched first; `lvstudio presets pin` writes here):
    $LVSTUDIO_CONFIG/presets, else $XDG_CONFIG_HOME/lvstudio/presets, else ~/.config/lvstudio/presets."""
    if os.environ.get("LVSTUDIO_CONFIG"):
        return Path(os.environ["LVSTUDIO_CONFIG"]).expanduser() / "presets"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "lvstudio" / "presets"


def preset_search_dirs() -> list[Path]:
    """Folders searched for presets, first match wins: the user's folder (pins go there, so they apply to whichever
    preset of that name is found below), then LVSTUDIO_PRESET_PATH, then the repository's presets/."""
    extra = [Path(p) for p in os.environ.get("LVSTUDIO_PRESET_PATH", "").split(os.pathsep) if p.strip()]
    return [user_presets_dir(), *extra, presets_dir()]


def _preset_files() -> list[tuple[str, Path]]:
    """(name, file) of every preset file found, in search order (a name may appear more than once)."""
    out: list[tuple[str, Path]] = []
    for root in preset_search_dirs():
        if root.is_dir():
            out += [(p.stem, p) for p in sorted(root.glob("*.toml"))]
            out += [(p.parent.name, p) for p in sorted(root.glob("*/preset.toml"))]
    return out


def available_presets() -> dict[str, Path]:
    """name -> preset file for every preset found (`NAME.toml` or `NAME/preset.toml`; earlier folders win)."""
    found: dict[str, Path] = {}
    for name, path in _preset_files():
        found.setdefault(name, path)
    return dict(sorted(found.items()))


def _resolve_name(name: str, known: dict[str, Path]) -> Path | None:
    if name in known:
        return known[name]
    matches = [n for n in known if n.startswith(name + "-") or n.startswith(name + ".")]
    return known[matches[0]] if len(matches) == 1 else None


def _read_toml(path: Path) -> dict:
    import tomli

    try:
        return tomli.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomli.TOMLDecodeError) as err:
        raise PresetError(f"{path}: {err}", hint="fix the preset file's TOML") from None


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, tables merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _base_file(name: str, below: Path) -> Path | None:
    """The preset file `base = name` in `below` refers to: the first one found after `below` in search order (for its
    own name), else the first one that is not `below`."""
    files = [p for n, p in _preset_files() if n == name]
    same = [i for i, p in enumerate(files) if p.resolve() == below.resolve()]
    after = files[same[0] + 1 :] if same else files
    return after[0] if after else None


def _with_bases(path: Path) -> tuple[dict, list[Path]]:
    """A preset file's data merged over its `base` chain, and the files of that chain (top first)."""
    data = _read_toml(path)
    chain = [path]
    while "base" in data:
        name = data.pop("base")
        if not isinstance(name, str) or len(chain) > MAX_BASE_DEPTH:
            raise PresetError(f"{chain[-1]}: base must name one preset (chain: {' -> '.join(map(str, chain))})",
                              hint='write base = "NAME" with the name of a preset found below this file')
        found = _base_file(name, chain[-1])
        if found is None:
            raise PresetError(f"{chain[-1]}: base = {name!r}: no preset of that name below this file",
                              hint="`lvstudio presets list` shows the presets; delete the file to drop the override")
        below = _read_toml(found)
        chain.append(found)
        data = _merge(below, data)  # carries on with `below`'s own base, if it has one
    return data, chain


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset by name (from the search folders), by path to its TOML file or to the folder holding its
    preset.toml (its `base` chain merged)."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "preset.toml").is_file() and _resolve_name(str(name_or_path),
                                                                            available_presets()) is None:
        path = path / "preset.toml"  # a folder of a preset (a name is looked up first, as below)
    elif path.suffix == ".toml" and not path.is_file():
        raise PresetError(f"preset file {path} does not exist" if not path.exists() else f"{path} is not a file",
                          hint="check the path, or give a preset's name (`lvstudio presets list` shows them)")
    if not (path.suffix == ".toml" and path.exists()):
        known = available_presets()
        found = _resolve_name(str(name_or_path), known)
        if found is None and path.is_dir():  # a name is looked up first: a folder of that name may sit in the cwd
            raise PresetError(f"{path} is a folder without a preset.toml",
                              hint="pass a preset's TOML file, the folder holding its preset.toml, or its name")
        if found is None:
            raise PresetError(
                f"unknown preset {str(name_or_path)!r}",
                hint=f"choose one of: {', '.join(sorted(known)) or '(none found)'}; `lvstudio presets list` shows them",
            )
        path = found
    data, chain = _with_bases(path)
    try:
        preset = Preset.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        where = str(path) + (f" (with its base {', '.join(map(str, chain[1:]))})" if len(chain) > 1 else "")
        msg = first["msg"].removeprefix("Value error, ")
        raise PresetError(f"{where}: {key + ': ' if key else ''}{msg}",
                          hint="see presets/tiny/preset.toml for the schema") from None
    return preset.model_copy(update={"folder": chain[-1].parent, "sources": chain})
