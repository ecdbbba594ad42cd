"""The architecture of a Wan2.1-family DiT (`WanDiTConfig`) and the named configs, without torch.

`lvstudio.models.wan_dit` builds the model from it; the preset schema (`lvstudio.presets.schema`) checks a preset's
`[dit_config]` with it when the preset is loaded, so `lvstudio presets info` names a bad key without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan2.1-family DiT (field names follow the official `WanModel` config where they exist)."""

    model_type: Literal["t2v", "i2v"] = "t2v"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280  # CLIP ViT-H/14 penultimate features (i2v only)
    eps: float = 1e-6
    rope_max_frames: int = 1024  # length of the RoPE table the checkpoints were trained with
    rope_theta: float = 10000.0
    # SkyReels-V2 additions (diffusers `SkyReelsV2Transformer3DModel` config names):
    inject_sample_info: bool = False  # fps class embedding added to the 6-way modulation (SkyReels-V2-DF-1.3B)
    num_frame_per_block: int = 1  # > 1: calls without an explicit AttentionSpec are block-causal over such blocks

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1 (got {self.num_frame_per_block})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for 3D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WanDiTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "patch_size" in data:
            data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)


CONFIGS: dict[str, WanDiTConfig] = {
    # The embedded preset's architecture: a few million parameters, 16-channel latents from the tiny VAE.
    "tiny": WanDiTConfig(dim=192, ffn_dim=576, num_heads=3, num_layers=6, text_dim=128, text_len=24, freq_dim=64),
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-i2v-14b": WanDiTConfig(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
}
