"""Wan2.1 image-to-video around our WanDiT: the conditioning tensor `y`, CLIP tokens, negative prompts, one clip.

Shapes (B videos, F = 1 + 4k pixel frames of H x W, latent f = (F - 1)/4 + 1 frames of h x w = H/8 x W/8, z = 16):

    mask    [4, f, h, w]          1 where a pixel frame is given; frame 0's flag is repeated 4x, so each latent frame
                                  gets 4 flags (one per pixel frame it covers)
    video   [B, 3, F, H, W]       the conditioning frames in [-1, 1] (the image, then zeros)
    latents [B, z, f, h, w]       VAE(video), normalised with the 16 latents_mean/std values
    y       [B, 4 + z, f, h, w]   cat(mask, latents); the DiT concatenates it to the noise: 16 + 20 = 36 channels
    clip    [B, 257, 1280]        CLIP ViT-H/14 penultimate tokens (lvstudio.models.clip_vision), read by k_img/v_img
    text    [B, 512, 4096]        umT5 features, zero past each prompt; the negative prompt shares image, clip and y

`sample_i2v` is diffusers' `WanImageToVideoPipeline` denoising loop on our DiT: given the same noise, scheduler
(Euler or UniPC on the same σ grid) and conditioning it returns the same latents. Classifier-free guidance:
v = v_neg + g·(v_pos − v_neg), both rows in one batched DiT call by default (one pass over the weights per step,
which matters when the weights are streamed, lvstudio.models.offload).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
from lvstudio.sampling.flow_matching import sigma_grid, unipc_flow_schedule
from lvstudio.sampling.samplers import StepCallback, euler_sample, unipc_sample

SamplerName = Literal["euler", "unipc"]
TEMPORAL_STRIDE = 4  # Wan VAE: 4 pixel frames per latent frame (after the first)
SPATIAL_STRIDE = 8


class VideoEncoder(Protocol):
    """What the conditioning needs from a VAE: `lvstudio.models.wan_components.WanVAE` (or the tiny VAE) fits."""

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, z, 1 + k, H/8, W/8]."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class I2VSampling:
    """How one clip is sampled. Defaults are Stable Video Infinity's (DiffSynth `FlowMatchScheduler(shift=5,
    sigma_min=0, extra_one_step=True)`, 50 Euler steps, CFG 5 with the negative prompt)."""

    steps: int = 50
    shift: float = 5.0
    guidance: float = 5.0
    sampler: SamplerName = "euler"
    batch_cfg: bool = True  # positive and negative rows in one DiT call (else two calls per step)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if self.sampler not in ("euler", "unipc"):
            raise ValueError(f"sampler must be 'euler' or 'unipc' (got {self.sampler!r})")

    def schedule(self) -> tuple[Tensor, Tensor]:
        """(sigmas [steps + 1] ending at 0, model timesteps [steps] in 1000-scale)."""
        if self.sampler == "unipc":
            sigmas, timesteps = unipc_flow_schedule(self.steps, self.shift)  # diffusers UniPC flow sigmas
            return sigmas.double(), timesteps.double()
        sigmas = sigma_grid(self.steps, self.shift)  # shift(linspace(1, 0, n + 1)[:-1]) ‖ [0]
        return sigmas, sigmas[:-1] * 1000.0


def dit_config_from_diffusers(config: Mapping[str, Any]) -> WanDiTConfig:
    """A diffusers `WanTransformer3DModel` config.json (dict) -> our WanDiTConfig (i2v when it has image_dim)."""
    heads = int(config["num_attention_heads"])
    dim = heads * int(config["attention_head_dim"])
    i2v = config.get("image_dim") is not None
    if i2v and config.get("added_kv_proj_dim") not in (None, dim):
        raise ValueError(f"added_kv_proj_dim {config.get('added_kv_proj_dim')} != inner dim {dim}: not a Wan2.1 I2V DiT")
    if config.get("pos_embed_seq_len") is not None:
        raise ValueError("pos_embed_seq_len is set: this is a first-last-frame (FLF2V) DiT, which lvstudio does not load")
    return WanDiTConfig(
        model_type="i2v" if i2v else "t2v", dim=dim, ffn_dim=int(config["ffn_dim"]), num_heads=heads,
        num_layers=int(config["num_layers"]), in_dim=int(config["in_channels"]), out_dim=int(config["out_channels"]),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))), freq_dim=int(config.get("freq_dim", 256)),
        text_dim=int(config.get("text_dim", 4096)), image_dim=int(config.get("image_dim") or 1280),
        eps=float(config.get("eps", 1e-6)),
    )


# ---------------------------------------------------------------------------------------------------------------
# The conditioning tensor y
# ---------------------------------------------------------------------------------------------------------------


def latent_frames(num_frames: int) -> int:
    """Pixel frames (1 + 4k) -> latent frames (1 + k)."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"num_frames must be 1 + 4k (e.g. 81), got {num_frames}")
    return (num_frames - 1) // TEMPORAL_STRIDE + 1


def i2v_mask(num_frames: int, latent_hw: tuple[int, int], known: Sequence[int] = (0,), *,
             device: torch.device | str | None = None) -> Tensor:
    """Wan's frame mask [4, f, h, w] (float32): pixel frames listed in `known` are 1, the rest 0.

    Built as Wan / diffusers do: a per-pixel-frame mask [F, h, w] whose first frame is repeated 4 times, viewed as
    [f, 4, h, w] and transposed, so latent 0 carries frame 0's flag in all 4 channels and latent j the flags of
    pixel frames 4j-3 .. 4j. `known=(0,)` is image-to-video; `(0, F-1)` would be first-last-frame.
    """
    f = latent_frames(num_frames)
    h, w = latent_hw
    per_frame = torch.zeros(num_frames, h, w, device=device)
    for i in known:
        if not -num_frames <= i < num_frames:
            raise ValueError(f"known frame {i} is outside 0..{num_frames - 1}")
        per_frame[i] = 1.0
    padded = torch.cat([per_frame[:1].expand(TEMPORAL_STRIDE, h, w), per_frame[1:]])  # [F + 3, h, w]
    return padded.view(f, TEMPORAL_STRIDE, h, w).transpose(0, 1).contiguous()  # [4, f, h, w]


def first_frame_video(image: Tensor, num_frames: int) -> Tensor:
    """image [B, 3, H, W] -> [B, 3, F, H, W]: the image, then zeros (diffusers' `video_condition`)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    b, _, h, w = image.shape
    return torch.cat([image[:, :, None], image.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)


def encode_condition(vae: VideoEncoder, video: Tensor, mask: Tensor) -> Tensor:
    """VAE-encode the conditioning video [B, 3, F, H, W] and prepend the mask [4, f, h, w] -> y [B, 4 + z, f, h, w]."""
    latents = vae.encode(video).float()  # [B, z, f, h, w], normalised
    b = latents.shape[0]
    if latents.shape[2:] != mask.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the latents {tuple(latents.shape)}")
    return torch.cat([mask.to(latents.device)[None].expand(b, -1, -1, -1, -1), latents], dim=1)


def i2v_condition(vae: VideoEncoder, image: Tensor, num_frames: int) -> Tensor:
    """Plain Wan image-to-video: y [B, 20, f, h, w] for `image` [B, 3, H, W] as frame 0 of `num_frames`."""
    h, w = image.shape[-2] // SPATIAL_STRIDE, image.shape[-1] // SPATIAL_STRIDE
    return encode_condition(vae, first_frame_video(image, num_frames), i2v_mask(num_frames, (h, w)))


# ---------------------------------------------------------------------------------------------------------------
# Sampling one clip
# ---------------------------------------------------------------------------------------------------------------


def sample_i2v(
    dit: WanDiT,
    noise: Tensor,
    text: Tensor,
    clip_fea: Tensor,
    y: Tensor,
    sampling: I2VSampling,
    *,
    negative_text: Tensor | None = None,
    sigmas: Sequence[float] | Tensor | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Sample one image-to-video clip; returns the clean latents [B, 16, f, h, w] (float32, on the noise's device).

    noise [B, 16, f, h, w]; text / negative_text [B, L, text_dim] (L = 512 for Wan); clip_fea [B, T, image_dim];
    y [B, 20, f, h, w]. Guidance needs `negative_text` unless `sampling.guidance == 1`. `sigmas` / `timesteps`
    replace `sampling.schedule()` (e.g. a diffusers scheduler's own grid). `callback(i, t, x)` runs after every step
    (a `lvstudio.models.offload.StepClock` there measures the step time).
    """
    if dit.cfg.model_type != "i2v":
        raise ValueError("sample_i2v needs an i2v DiT (model_type='i2v', in_dim 36)")
    b = noise.shape[0]
    if y.shape[0] != b or clip_fea.shape[0] != b or text.shape[0] != b:
        raise ValueError(f"batch sizes differ: noise {b}, text {text.shape[0]}, clip {clip_fea.shape[0]}, "
                         f"y {y.shape[0]}")
    if y.shape[2:] != noise.shape[2:]:
        raise ValueError(f"y {tuple(y.shape)} does not match the noise {tuple(noise.shape)}")
    guided = sampling.guidance != 1.0
    if guided and negative_text is None:
        raise ValueError("classifier-free guidance needs negative_text (the negative prompt's features)")
    dev = noise.device
    text, clip_fea, y = text.to(dev), clip_fea.to(dev), y.to(dev)

    # Step 1: conditionings (each keeps its cross-attention K/V for all steps of the clip).
    if guided and sampling.batch_cfg:
        rows = dit.new_conditioning(torch.cat([text, negative_text.to(dev)]), clip_fea.repeat(2, 1, 1),
                                    y.repeat(2, 1, 1, 1, 1))

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            v = dit(x.repeat(2, 1, 1, 1, 1), t.repeat(2, 1), rows)  # [2B, 16, f, h, w]: positive rows, then negative
            v_pos, v_neg = v[:b].float(), v[b:].float()
            return v_neg + sampling.guidance * (v_pos - v_neg)
    else:
        pos = dit.new_conditioning(text, clip_fea, y)
        neg = dit.new_conditioning(negative_text.to(dev), clip_fea, y) if guided else None

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            v_pos = dit(x, t, pos).float()
            if neg is None:
                return v_pos
            v_neg = dit(x, t, neg).float()
            return v_neg + sampling.guidance * (v_pos - v_neg)

    # Step 2: integrate the flow from noise to data.
    if sigmas is None:
        sigmas, timesteps = sampling.schedule()
    run = unipc_sample if sampling.sampler == "unipc" else euler_sample
    return run(denoise, noise.float(), sigmas, timesteps=timesteps, callback=callback)
