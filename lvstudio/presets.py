"""Presets: one TOML file per model setup in `presets/` (or any path), validated by pydantic.

A preset names the backend default, native size and fps, the model files (in-repo for `tiny`), the sampler and the
attention settings. `lvstudio presets list|info` read these; `lvstudio.bundle.load_bundle` turns one into models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lvstudio.errors import PresetError

BackendName = Literal["causal-kv", "streaming-dit", "erft-crossclip"]


def presets_dir() -> Path:
    """The repository's `presets/` folder (next to the package)."""
    return Path(__file__).resolve().parent.parent / "presets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerSettings(_Strict):
    kind: Literal["few-step", "euler", "unipc"] = "euler"
    steps: int = Field(8, ge=1, le=1000)  # for euler/unipc
    shift: float = Field(1.0, gt=0)
    step_list: list[float] = [1000.0, 750.0, 500.0, 250.0]  # for few-step
    warp: bool = True  # few-step: warp the list onto the shifted table (Self-Forcing)
    cfg_scale: float = Field(1.0, ge=0)  # 1 = no classifier-free guidance
    context_noise: float = Field(0.0, ge=0, le=1000)  # timestep of the clean context pass


class AttentionSettings(_Strict):
    block_frames: int = Field(3, ge=1)  # latent frames per causal block
    window_frames: int | None = Field(None, ge=1)  # total attention span (sink + past + block); None = unbounded
    sink_frames: int = Field(0, ge=0)
    rope_mode: Literal["absolute", "rebase"] = "absolute"
    global_sink: bool = True  # keep the sink's K/V across a prompt-switch re-cache (LongLive global_sink)
    recache_on_switch: bool = True


class StreamingSettings(_Strict):
    """The streaming-DiT backend's moving buffer (StreamDiT partitions)."""

    buffer_chunks: int = Field(4, ge=1)  # N chunks in the buffer, each at its own noise level
    chunk_frames: int | None = Field(None, ge=1)  # latent frames per chunk (default: attention.block_frames)
    micro_steps: int = Field(2, ge=1)  # denoising steps per chunk before the buffer shifts (steps per frame = N * s)
    shift: float = Field(2.0, gt=0)
    causal_buffer: bool = True  # block-causal attention inside the buffer (as the tiny preset was trained)


class FileEntry(_Strict):
    path: str  # relative to the preset folder (local) or the repo root (hub)
    sha256: str | None = None


class Preset(_Strict):
    name: str
    description: str = ""
    backend: BackendName = "causal-kv"
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
    repo_id: str | None = None  # Hugging Face Hub presets
    revision: str | None = None
    licence: str = ""
    training: dict = Field(default_factory=dict)  # how the weights were made, and their figures (informational)
    folder: Path | None = Field(None, exclude=True)  # where the preset file lives (set by load_preset)

    def file_path(self, role: str) -> Path:
        if role not in self.files:
            raise PresetError(f"preset {self.name!r} has no {role!r} file", hint=f"add [files.{role}] to its preset.toml")
        assert self.folder is not None
        return self.folder / self.files[role].path


def available_presets() -> dict[str, Path]:
    """name -> preset file for every preset shipped in presets/ (`NAME.toml` or `NAME/preset.toml`)."""
    root = presets_dir()
    found: dict[str, Path] = {}
    if root.is_dir():
        for p in sorted(root.glob("*.toml")):
            found[p.stem] = p
        for p in sorted(root.glob("*/preset.toml")):
            found[p.parent.name] = p
    return found


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset by name (from presets/) or by path to its TOML file."""
    import tomli

    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.exists()):
        known = available_presets()
        if str(name_or_path) not in known:
            raise PresetError(
                f"unknown preset {str(name_or_path)!r}",
                hint=f"choose one of: {', '.join(sorted(known)) or '(none found)'}; `lvstudio presets list` shows them",
            )
        path = known[str(name_or_path)]
    try:
        data = tomli.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomli.TOMLDecodeError) as err:
        raise PresetError(f"{path}: {err}", hint="fix the preset file's TOML") from None
    try:
        preset = Preset.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise PresetError(f"{path}: {key}: {first['msg']}", hint="see presets/tiny/preset.toml for the schema") from None
    return preset.model_copy(update={"folder": path.parent})
