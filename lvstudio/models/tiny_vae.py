"""Tiny causal video VAE for the embedded `tiny` preset (Wan VAE conventions, CPU-sized).

Conventions (as Wan2.1's VAE, see reference/mechanisms.md §2): video `[B, 3, F, H, W]` in [-1, 1] with `F = 1 + 4k`
→ latents `[B, z_dim, 1 + k, H/8, W/8]`; pixel frame 0 alone → latent 0, each later latent ↔ 4 pixel frames.
`encode` returns normalised latents `(mu - mean) / std`, `decode` takes normalised latents.

Architecture, top to bottom (activations are kept as `[B, F, C, H, W]` inside so every conv is a conv2d over frames):
- Every temporal conv is a `CausalConv3d`: zero-padded on the left in time only and evaluated as a conv2d over the
  `kt` stacked frames of each window. Its tail frames (the inputs the next window still needs) live in an explicit
  `state` dict, so running a video chunk by chunk with one dict is exactly the same as running it at once.
- Encoder: pixel-unshuffle 2× → H/2 blocks → [SpaceDown → TimeDown → blocks] × 2 → mu, logvar at H/8.
- Decoder: causal conv → blocks → [TimeUp → SpaceUp → blocks] × 2 → conv → pixel-shuffle 2×.
  `TimeDown` windows end at frames 0, 2, 4, ... (frame 0 alone → first output); `TimeUp` turns each frame into 2 and
  drops the very first output of a video, so latent 0 → 1 pixel frame, every later latent → 4.
- Every resampling step also has a parameter-free shortcut (space ↔ channels, then channel average / duplicate, as in
  DC-AE's "residual autoencoding"; time: mean of the window's last 2 frames / frame repeat). These make training on a
  CPU converge several times faster.
- Norms are per-position RMS over channels (causal, no statistics across time); no attention. Full-resolution work is
  only the final pixel-shuffle; 3×3×3 convs run at H/8 only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "lvstudio.tiny_vae/1"
LOGVAR_INIT = -6.0  # initial posterior log-variance (small noise from the start; the KL weight is tiny)
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8

State = dict[str, Tensor]  # cache key → tail frames [B, T, C, H, W]
# A state holding this key continues a video from zero history: every cache starts as zero padding (as at the start
# of a video) but the first latent decodes to 4 frames, not 1. `StreamingDecoder.new_shot()` sets it at a cut, so
# nothing of the previous shot reaches the new one and the frame count stays 4 per latent.
CONTINUE_KEY = "continue"


def _starts_video(state: State, key: str) -> bool:
    """Whether a call with `state` is the first chunk of a video (latent 0 → 1 pixel frame)."""
    return key not in state and CONTINUE_KEY not in state


@dataclass(frozen=True)
class TinyVAEConfig:
    """Sizes of the tiny VAE; `latents_mean/std` are measured after training (defaults 0 / 1)."""

    z_dim: int = 16
    in_channels: int = 3
    channels: tuple[int, int, int] = (32, 64, 64)  # widths at H/2, H/4, H/8
    enc_blocks: tuple[int, int, int] = (1, 1, 1)  # residual blocks per level (encoder)
    dec_blocks: tuple[int, int, int] = (1, 1, 1)  # residual blocks per level (decoder)
    temporal_blocks: tuple[bool, bool, bool] = (False, False, True)  # causal 3×3×3 first conv in blocks of that level
    # "progressive": the decoder upsamples time at H/8 and H/4 (2× each), so H/4 and H/2 run at 2× / 4× the latent
    # frame rate. "late": every decoder level runs at the latent frame rate and the output conv emits the 4 pixel
    # frames of each latent as channels (a temporal pixel-shuffle): about 3× less decoder work per video second.
    decoder_time_up: str = "progressive"
    latents_mean: tuple[float, ...] = field(default=())
    latents_std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.z_dim < 1 or self.in_channels < 1:
            raise ValueError("z_dim and in_channels must be positive")
        for name in ("channels", "enc_blocks", "dec_blocks", "temporal_blocks"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 entries (levels H/2, H/4, H/8)")
        c0, c1, c2 = self.channels
        if (4 * c0) % c1 or (4 * c1) % c2 or c2 % self.z_dim:
            raise ValueError(
                f"channels {self.channels} need 4*c0 % c1 == 0, 4*c1 % c2 == 0 and c2 % z_dim == 0 "
                "(parameter-free space/channel shortcuts)"
            )
        if self.decoder_time_up not in ("progressive", "late"):
            raise ValueError(f"decoder_time_up must be 'progressive' or 'late', got {self.decoder_time_up!r}")
        if not self.latents_mean:
            object.__setattr__(self, "latents_mean", (0.0,) * self.z_dim)
        if not self.latents_std:
            object.__setattr__(self, "latents_std", (1.0,) * self.z_dim)
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std must have z_dim={self.z_dim} entries")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("latents_std entries must be > 0")

    def to_json(self) -> str:
        """The config as a JSON string (stored in safetensors metadata)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TinyVAEConfig:
        """Inverse of `to_json` (lists become tuples; unknown keys are an error)."""
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown TinyVAEConfig keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def latent_frames(num_frames: int) -> int:
    """Latent frames for `num_frames = 1 + 4k` pixel frames."""
    return 1 + (num_frames - 1) // TEMPORAL_STRIDE


def pixel_frames(num_latents: int) -> int:
    """Pixel frames decoded from `num_latents` latent frames."""
    return 1 + TEMPORAL_STRIDE * (num_latents - 1)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks. Activations: [B, F, C, H, W].


def _conv_frames(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a conv2d to every frame: [B, F, C, H, W] → [B, F, C', H', W']."""
    b, f = x.shape[:2]
    y = conv(x.flatten(0, 1).contiguous(memory_format=torch.channels_last))  # [B*F, C', H', W']
    return y.unflatten(0, (b, f))


class CausalConv3d(nn.Module):
    """Conv over (time, height, width), padded with zeros on the left in time only.

    Evaluated as a conv2d over the `kt` frames of each window stacked on channels (same maths as a conv3d, much faster
    on CPU). Window `i` ends at input frame `i * stride_t`. With a `state` dict, the input frames the next window
    still needs are kept under `self.cache_key`, so chunked calls equal one call over the whole sequence.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride_t: int = 1,
        stride_hw: int = 1,
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.kt, self.stride_t = kt, stride_t
        self.conv = nn.Conv2d(kt * cin, cout, (kh, kw), stride=stride_hw, padding=(kh // 2, kw // 2))
        self.cache_key = ""  # set by the owning encoder/decoder (its module name)

    @property
    def is_temporal(self) -> bool:
        return self.kt > 1 or self.stride_t > 1

    def windows(self, x: Tensor, state: State) -> Tensor:
        """[B, F, C, H, W] → the time windows completed by this chunk, [B, n, kt, C, H, W]; updates the cache."""
        # Step 1: prepend the tail of the previous chunk (or the zero left-padding at the start of a video).
        tail = state.get(self.cache_key)
        if tail is None:
            tail = x.new_zeros((x.shape[0], self.kt - 1, *x.shape[2:]))
        seq = torch.cat([tail, x], dim=1)  # [B, T, C, H, W]
        n_out = (seq.shape[1] - self.kt) // self.stride_t + 1 if seq.shape[1] >= self.kt else 0
        # Step 2: keep the frames from the start of the next window on.
        state[self.cache_key] = seq[:, n_out * self.stride_t :].clone()
        # Step 3: gather the kt frames of every window.
        last = max(n_out - 1, 0) * self.stride_t + 1 if n_out else 0
        return torch.stack([seq[:, j : j + last : self.stride_t] for j in range(self.kt)], dim=2)

    def forward(self, x: Tensor, state: State) -> Tensor:
        """[B, F, C, H, W] → [B, F', C', H', W'] (F' = number of windows completed by this chunk)."""
        if not self.is_temporal:
            return _conv_frames(self.conv, x)
        return self.conv_windows(self.windows(x, state))

    def conv_windows(self, w: Tensor) -> Tensor:
        """[B, n, kt, C, H, W] → [B, n, C', H', W']."""
        if w.shape[1] == 0:
            return w.new_zeros((w.shape[0], 0, self.conv.out_channels, *w.shape[4:]))
        return _conv_frames(self.conv, w.flatten(2, 3))


class RMSNorm(nn.Module):
    """RMS norm over channels at every position (causal: no statistics across frames)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # [B, F, C, H, W]
        return x * torch.rsqrt(x.pow(2).mean(dim=2, keepdim=True) + self.eps) * self.gamma


class ResBlock(nn.Module):
    """norm → SiLU → conv (causal 3×3×3 or 1×3×3) → norm → SiLU → conv 1×3×3, plus the input."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(channels)
        self.conv1 = CausalConv3d(channels, channels, (3 if temporal else 1, 3, 3))
        self.norm2 = RMSNorm(channels)
        self.conv2 = CausalConv3d(channels, channels, (1, 3, 3))
        nn.init.zeros_(self.conv2.conv.weight)  # start as identity
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: Tensor, state: State) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        return x + h


# Parameter-free shortcuts (as in "residual autoencoding"): space ↔ channels, then average or duplicate channels.


def _channel_avg(x: Tensor, cout: int) -> Tensor:
    """[B, F, C, H, W] → [B, F, cout, H, W] by averaging groups of C/cout channels."""
    return x.unflatten(2, (cout, x.shape[2] // cout)).mean(dim=3)


def _channel_dup(x: Tensor, cout: int) -> Tensor:
    """[B, F, C, H, W] → [B, F, cout, H, W] by repeating every channel cout/C times."""
    return x.repeat_interleave(cout // x.shape[2], dim=2)


class SpaceDown(nn.Module):
    """2× spatial downsampling: conv stride 2 + (pixel-unshuffle → channel average) shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (1, 3, 3), stride_hw=2)

    def forward(self, x: Tensor, state: State) -> Tensor:  # [B, F, C, H, W] → [B, F, C', H/2, W/2]
        return self.conv(x, state) + _channel_avg(F.pixel_unshuffle(x, 2), self.conv.conv.out_channels)


class SpaceUp(nn.Module):
    """2× spatial upsampling: nearest + conv, plus (channel duplicate → pixel-shuffle) shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (1, 3, 3))

    def forward(self, x: Tensor, state: State) -> Tensor:  # [B, F, C, H, W] → [B, F, C', 2H, 2W]
        b, f = x.shape[:2]
        frames = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # [B*F, C, H, W]
        up = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        shortcut = F.pixel_shuffle(_channel_dup(x, 4 * self.conv.conv.out_channels), 2)
        return self.conv(up.unflatten(0, (b, f)), state) + shortcut


class TimeDown(nn.Module):
    """2× causal temporal downsampling: output i = conv(frames 2i-2, 2i-1, 2i) + mean(frames 2i-1, 2i)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (3, 1, 1), stride_t=2)

    def forward(self, x: Tensor, state: State) -> Tensor:  # [B, F, C, H, W] → [B, (F+1)//2 at start else F/2, ...]
        w = self.conv.windows(x, state)  # [B, n, 3, C, H, W]
        return self.conv.conv_windows(w) + w[:, :, 1:].mean(dim=2)


class TimeUp(nn.Module):
    """2× causal temporal upsampling: frame t → frames (2t-1, 2t) = repeat + causal (3,1,1) conv.

    The very first output of a video (frame -1) is dropped, so the first input frame yields a single frame.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))
        nn.init.zeros_(self.conv.conv.weight)
        nn.init.zeros_(self.conv.conv.bias)

    def forward(self, x: Tensor, state: State) -> Tensor:  # [B, F, C, H, W] → [B, 2F (-1 at video start), C, H, W]
        first = _starts_video(state, self.conv.cache_key)
        c = x.shape[2]
        y = self.conv(x, state).unflatten(2, (2, c)) + x.unsqueeze(2)  # [B, F, 2, C, H, W]
        y = y.flatten(1, 2)  # [B, 2F, C, H, W]
        return y[:, 1:] if first else y


def _name_caches(root: nn.Module) -> list[str]:
    """Give every temporal CausalConv3d under `root` its module name as cache key; return the keys."""
    keys = []
    for name, module in root.named_modules():
        if isinstance(module, CausalConv3d) and module.is_temporal:
            module.cache_key = name
            keys.append(name)
    return keys


class Encoder(nn.Module):
    """[B, F, 3, H, W] (F = 1+4k) → mu, logvar [B, 1+k, z, H/8, W/8]."""

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        c0, c1, c2 = cfg.channels
        t0, t1, t2 = cfg.temporal_blocks
        self.conv_in = CausalConv3d(4 * cfg.in_channels, c0, (1, 3, 3))  # after pixel-unshuffle 2×
        self.blocks0 = nn.ModuleList(ResBlock(c0, t0) for _ in range(cfg.enc_blocks[0]))
        self.down1 = SpaceDown(c0, c1)
        self.time_down1 = TimeDown(c1)
        self.blocks1 = nn.ModuleList(ResBlock(c1, t1) for _ in range(cfg.enc_blocks[1]))
        self.down2 = SpaceDown(c1, c2)
        self.time_down2 = TimeDown(c2)
        self.blocks2 = nn.ModuleList(ResBlock(c2, t2) for _ in range(cfg.enc_blocks[2]))
        self.norm_out = RMSNorm(c2)
        self.conv_out = CausalConv3d(c2, 2 * cfg.z_dim, (1, 3, 3))  # → mu, logvar
        nn.init.constant_(self.conv_out.conv.bias[cfg.z_dim :], LOGVAR_INIT)
        self.cache_keys = _name_caches(self)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, Tensor]:
        x = self.conv_in(F.pixel_unshuffle(x, 2), state)  # [B, F, c0, H/2, W/2]
        for block in self.blocks0:
            x = block(x, state)
        x = self.time_down1(self.down1(x, state), state)  # [B, 1+2k, c1, H/4, W/4]
        for block in self.blocks1:
            x = block(x, state)
        x = self.time_down2(self.down2(x, state), state)  # [B, 1+k, c2, H/8, W/8]
        for block in self.blocks2:
            x = block(x, state)
        mu, logvar = self.conv_out(F.silu(self.norm_out(x)), state).chunk(2, dim=2)  # [B, 1+k, z, h, w] each
        mu = mu + _channel_avg(x, mu.shape[2])
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """Raw latents [B, f, z, h, w] → video [B, 1+4(f-1) (4f after the first chunk), 3, 8h, 8w] (unclamped).

    `decoder_time_up = "late"`: no TimeUp layers; the output conv gives 4 frames × 12 channels per latent frame, and
    the first latent of a video keeps only its last frame (latent 0 ↔ pixel frame 0, as in the progressive layout).
    """

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        c0, c1, c2 = cfg.channels
        t0, t1, t2 = cfg.temporal_blocks
        self.late = cfg.decoder_time_up == "late"
        self.conv_in = CausalConv3d(cfg.z_dim, c2, (3, 3, 3))
        self.blocks2 = nn.ModuleList(ResBlock(c2, t2) for _ in range(cfg.dec_blocks[2]))
        self.time_up2 = None if self.late else TimeUp(c2)
        self.up2 = SpaceUp(c2, c1)
        self.blocks1 = nn.ModuleList(ResBlock(c1, t1) for _ in range(cfg.dec_blocks[1]))
        self.time_up1 = None if self.late else TimeUp(c1)
        self.up1 = SpaceUp(c1, c0)
        self.blocks0 = nn.ModuleList(ResBlock(c0, t0) for _ in range(cfg.dec_blocks[0]))
        self.norm_out = RMSNorm(c0)
        frames_out = TEMPORAL_STRIDE if self.late else 1
        self.conv_out = CausalConv3d(c0, frames_out * 4 * cfg.in_channels, (1, 3, 3))  # then pixel-shuffle 2×
        self.cache_keys = _name_caches(self)

    def forward(self, z: Tensor, state: State) -> Tensor:
        first = _starts_video(state, self.conv_in.cache_key)  # the first chunk of a video
        x = self.conv_in(z, state) + _channel_dup(z, self.conv_in.conv.out_channels)  # [B, f, c2, h, w]
        for block in self.blocks2:
            x = block(x, state)
        if self.time_up2 is not None:
            x = self.time_up2(x, state)  # [B, 2f-1, c2, h, w]
        x = self.up2(x, state)  # [B, f or 2f-1, c1, 2h, 2w]
        for block in self.blocks1:
            x = block(x, state)
        if self.time_up1 is not None:
            x = self.time_up1(x, state)  # [B, 4f-3, c1, 2h, 2w]
        x = self.up1(x, state)  # [B, f or 4f-3, c0, 4h, 4w]
        for block in self.blocks0:
            x = block(x, state)
        x = self.conv_out(F.silu(self.norm_out(x)), state)  # [B, f or 4f-3, 12 (x4 late), 4h, 4w]
        if self.late:
            x = x.unflatten(2, (TEMPORAL_STRIDE, -1)).flatten(1, 2)  # [B, 4f, 12, 4h, 4w]
            if first:
                x = x[:, TEMPORAL_STRIDE - 1 :]  # latent 0 → pixel frame 0 only
        return F.pixel_shuffle(x, 2)  # [B, 4f-3, 3, 8h, 8w]


# ---------------------------------------------------------------------------------------------------------------
# The VAE and its streaming wrappers.


class VAEOutput(NamedTuple):
    """Training forward: reconstruction [B, 3, F, H, W] (unclamped) and raw posterior mean/logvar [B, z, f, h, w]."""

    recon: Tensor
    mean: Tensor
    logvar: Tensor


def _check_video(video: Tensor, in_channels: int, streaming_first: bool | None = None) -> None:
    if video.ndim != 5 or video.shape[1] != in_channels:
        raise ValueError(f"video must be [B, {in_channels}, F, H, W], got {tuple(video.shape)}")
    h, w = video.shape[-2:]
    if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE or h == 0 or w == 0:
        raise ValueError(f"H and W must be positive multiples of {SPATIAL_STRIDE}, got {h}x{w}")
    n = video.shape[2]
    if streaming_first is False:
        if n % TEMPORAL_STRIDE:
            raise ValueError(f"after the first call, frames per call must be a multiple of 4, got {n}")
    elif n < 1 or (n - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"number of frames must be 1 + 4k, got {n}")


def _check_latents(z: Tensor, z_dim: int) -> None:
    if z.ndim != 5 or z.shape[1] != z_dim:
        raise ValueError(f"latents must be [B, {z_dim}, f, h, w], got {tuple(z.shape)}")


class TinyVAE(nn.Module):
    """Tiny causal video VAE (4× time, 8× space, z_dim channels)."""

    def __init__(self, config: TinyVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.register_buffer("latents_mean", torch.empty(self.config.z_dim), persistent=False)
        self.register_buffer("latents_std", torch.empty(self.config.z_dim), persistent=False)
        self._load_stats()

    def _load_stats(self) -> None:
        with torch.no_grad():
            self.latents_mean.copy_(torch.tensor(self.config.latents_mean))
            self.latents_std.copy_(torch.tensor(self.config.latents_std))

    def set_latent_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Store measured per-channel latent statistics (config and buffers)."""
        self.config = replace(self.config, latents_mean=tuple(map(float, mean)), latents_std=tuple(map(float, std)))
        self._load_stats()

    def _stat(self, t: Tensor) -> Tensor:  # [z] → [1, z, 1, 1, 1]
        return t.view(1, -1, 1, 1, 1)

    @property
    def _param(self) -> Tensor:
        return next(self.parameters())

    # Raw (un-normalised) pieces, layout [B, C, F, H, W] outside.
    def encode_raw(self, video: Tensor, state: State | None = None) -> tuple[Tensor, Tensor]:
        """[B, 3, F, H, W] → raw posterior (mu, logvar) [B, z, f, h, w] (no input checks)."""
        p = self._param
        mu, logvar = self.encoder(video.to(p).transpose(1, 2), {} if state is None else state)
        return mu.transpose(1, 2), logvar.transpose(1, 2)

    def decode_raw(self, z: Tensor, state: State | None = None) -> Tensor:
        """Raw latents [B, z, f, h, w] → unclamped video [B, 3, F, H, W] (no input checks)."""
        x = self.decoder(z.to(self._param).transpose(1, 2), {} if state is None else state)
        return x.transpose(1, 2)

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 1+4k → normalised latents [B, z, 1+k, H/8, W/8] (posterior mean)."""
        _check_video(video, self.config.in_channels)
        mu, _ = self.encode_raw(video)
        return (mu - self._stat(self.latents_mean)) / self._stat(self.latents_std)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, z, f, h, w] → video [B, 3, 1+4(f-1), 8h, 8w] clamped to [-1, 1]."""
        _check_latents(z, self.config.z_dim)
        if z.shape[2] == 0:
            raise ValueError("latents must have at least one frame")
        raw = z.to(self._param) * self._stat(self.latents_std) + self._stat(self.latents_mean)
        return self.decode_raw(raw).clamp(-1.0, 1.0)

    def forward(self, video: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> VAEOutput:
        """Training pass: encode, sample z = mu + sigma * eps (or mu), decode (unclamped)."""
        _check_video(video, self.config.in_channels)
        mu, logvar = self.encode_raw(video)
        z = mu
        if sample:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)  # a CPU generator on any device
            z = mu + torch.exp(0.5 * logvar) * eps
        return VAEOutput(self.decode_raw(z), mu, logvar)

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder holding the causal caches of one video."""
        return StreamingDecoder(self)

    def streaming_encoder(self) -> StreamingEncoder:
        """An encoder holding the causal caches of one video."""
        return StreamingEncoder(self)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _Streaming:
    """Shared cache handling of the streaming encoder/decoder."""

    def __init__(self, vae: TinyVAE, keys: list[str]) -> None:
        self.vae = vae
        self._keys = frozenset(keys)
        self._state: State = {}
        self._shape: tuple[int, int, int] | None = None  # (B, H, W) of this video's input, once known

    @property
    def started(self) -> bool:
        return bool(self._state)

    def reset(self) -> None:
        """Forget the video: the next call starts a new one."""
        self._state = {}
        self._shape = None

    def _check_shape(self, x: Tensor) -> None:
        shape = (x.shape[0], x.shape[-2], x.shape[-1])
        if self.started and self._shape is not None and shape != self._shape:
            raise ValueError(f"(batch, height, width) changed mid-video: {self._shape} → {shape}; call reset() first")
        self._shape = shape

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the causal caches (tensors only; save with safetensors to snapshot a render)."""
        return {k: v.detach().clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore caches from `state_dict()` (resume exactly where the snapshot was taken)."""
        unknown = set(state) - self._keys - {CONTINUE_KEY}
        if unknown:
            raise ValueError(f"unknown cache keys: {sorted(unknown)[:5]}")
        p = self.vae._param
        self._state = {k: v.detach().to(device=p.device, dtype=p.dtype).clone() for k, v in state.items()}
        self._shape = None


class StreamingDecoder(_Streaming):
    """Decode a video block by block; the concatenated output equals `TinyVAE.decode` of all latents."""

    def __init__(self, vae: TinyVAE) -> None:
        super().__init__(vae, vae.decoder.cache_keys)

    def new_shot(self) -> None:
        """A hard cut: forget the previous shot's frames (zero history) but keep decoding 4 frames per latent."""
        self._state = {CONTINUE_KEY: torch.ones(())}

    @torch.no_grad()
    def decode(self, z_block: Tensor) -> Tensor:
        """Normalised latents [B, z, n, h, w] → frames [B, 3, 1+4(n-1) on the first call else 4n, 8h, 8w]."""
        vae = self.vae
        _check_latents(z_block, vae.config.z_dim)
        self._check_shape(z_block)
        if z_block.shape[2] == 0:
            return z_block.new_zeros((z_block.shape[0], vae.config.in_channels, 0, *(8 * s for s in z_block.shape[3:])))
        raw = z_block.to(vae._param) * vae._stat(vae.latents_std) + vae._stat(vae.latents_mean)
        return vae.decode_raw(raw, self._state).clamp(-1.0, 1.0)


class StreamingEncoder(_Streaming):
    """Encode a video chunk by chunk (first call 1+4k frames, later calls 4k); equals `TinyVAE.encode` of all."""

    def __init__(self, vae: TinyVAE) -> None:
        super().__init__(vae, vae.encoder.cache_keys)

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """[B, 3, n, H, W] in [-1, 1] → normalised latents [B, z, n//4 (+1 on the first call), H/8, W/8]."""
        vae = self.vae
        _check_video(frames, vae.config.in_channels, streaming_first=not self.started)
        self._check_shape(frames)
        if frames.shape[2] == 0:
            h, w = (s // SPATIAL_STRIDE for s in frames.shape[3:])
            return frames.new_zeros((frames.shape[0], vae.config.z_dim, 0, h, w))
        mu, _ = vae.encode_raw(frames, self._state)
        return (mu - vae._stat(vae.latents_mean)) / vae._stat(vae.latents_std)


# ---------------------------------------------------------------------------------------------------------------
# Save / load (safetensors, config JSON in the metadata).


def save_vae(vae: TinyVAE, path: str | os.PathLike[str]) -> None:
    """Write the weights and config to `path` (safetensors, atomic replace, with a checksum:
    `lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked

    tensors = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    save_checked(tensors, path, {"format": FORMAT, "config": vae.config.to_json()})


def load_vae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TinyVAE:
    """Load a `save_vae` file (strict key match) into a new TinyVAE in eval mode; its checksum is verified when it
    has one (DamagedFileError otherwise)."""
    from lvstudio.models.weight_storage import read_weights

    path = os.fspath(path)
    tensors, metadata = read_weights(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path} is not a tiny VAE file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    vae = TinyVAE(TinyVAEConfig.from_json(metadata["config"]))
    vae.load_state_dict(tensors, strict=True)
    return vae.to(device).train(False)


def widen_latents(vae: TinyVAE, z_dim: int) -> TinyVAE:
    """A copy of `vae` with `z_dim` latent channels (a multiple k of its own) that encodes and decodes exactly as it
    does (raw posterior means; statistics reset to 0 / 1), to fine-tune a wider latent from a trained VAE.

    Each latent i becomes k latents k·i + j that share its encoder row: their parameter-free shortcut averages a k-th
    of the old group of encoder channels each, so they are old_i + d_j with the d_j summing to 0. The decoder's first
    conv reads each copy at 1/k of the old weight (the sum gives back old_i) and, at the current frame's centre tap,
    subtracts d_j = z_{k·i+j} − mean_m z_{k·i+m} from the channels whose shortcut duplicates z_{k·i+j}.
    """
    old = vae.config.z_dim
    c2 = vae.config.channels[2]
    if z_dim % old or c2 % z_dim:
        raise ValueError(f"z_dim {z_dim} must be a multiple of {old} and divide the bottom width {c2}")
    k = z_dim // old
    wide = TinyVAE(replace(vae.config, z_dim=z_dim, latents_mean=(), latents_std=()))
    state = {name: t.clone() for name, t in vae.state_dict().items()}
    copies = torch.arange(z_dim) // k  # new latent → the old one it copies
    with torch.no_grad():
        # Encoder output conv [2z, c2, 3, 3]: mean rows, then log-variance rows, each repeated k times.
        rows = torch.cat([copies, old + copies])
        for name in ("encoder.conv_out.conv.weight", "encoder.conv_out.conv.bias"):
            state[name] = state[name][rows]
        # Decoder input conv [c2, kt*z, 3, 3], inputs time-major (frame t, latent c at t*z + c).
        w = state["decoder.conv_in.conv.weight"]
        kt = w.shape[1] // old
        w = w.unflatten(1, (kt, old))[:, :, copies] / k  # [c2, kt, z_dim, 3, 3]
        group = c2 // z_dim  # decoder channels duplicating one latent
        for new in range(z_dim):
            first = new - new % k  # the k copies of one old latent: first .. first + k - 1
            out = slice(new * group, (new + 1) * group)
            w[out, kt - 1, first : first + k, 1, 1] += 1.0 / k
            w[out, kt - 1, new, 1, 1] -= 1.0
        state["decoder.conv_in.conv.weight"] = w.flatten(1, 2)
    wide.load_state_dict(state, strict=True)
    return wide.to(vae._param.device).train(vae.training)


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)
