"""SkyReels-V2 Diffusion Forcing with the Wan DiT: the guided denoiser and drivers for text-, image- and
video-to-video, equal to diffusers' `SkyReelsV2DiffusionForcing{,ImageToVideo,VideoToVideo}Pipeline`.

A streaming backend drives it like this (one model call per `step`, chunks as soon as they are final):

    settings = DFSettings(num_steps=30, shift=8, ar_step=5, causal_block_size=5, overlap_history=17,
                          addnoise_condition=20)
    sampler = SkyReelsDFSampler(settings, (1, 16, h, w), num_latents=None, generator=gen)   # None: until stopped
    neg = skyreels_conditioning(dit, negative_context, fps=24)
    while (nxt := sampler.peek()) is not None:
        cond = skyreels_conditioning(dit, context_for(nxt.entering), fps=24)   # cache these per prompt
        denoise = skyreels_denoiser(dit, cond, neg, 6.0, causal_block_size=settings.causal_block_size)
        for chunk in sampler.step(denoise):
            decode_and_emit(chunk.latents)        # timeline latents [chunk.start, chunk.start + n)

All tensors are normalised Wan latents ((z - mean) / std, as the pipelines keep them); pixels are [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import Conditioning, WanDiT, fps_class
from lvstudio.sampling.df_sampler import (
    DFSettings,
    PrefixKind,
    SkyReelsDFSampler,
    latent_frames,
    round_pixel_frames,
)
from lvstudio.sampling.samplers import DenoiseFn

# pixels [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, C, 1 + k, h, w]
EncodeFn = Callable[[Tensor], Tensor]


def skyreels_conditioning(model: WanDiT, context: Tensor, fps: float = 24) -> Conditioning:
    """Text features [B, L_txt, text_dim] (zero past each prompt) + the fps sample info -> reusable Conditioning."""
    return model.new_conditioning(context, fps_index=fps_class(fps))


def skyreels_attention(causal_block_size: int, causal_attention: bool | None = None) -> AttentionSpec:
    """Attention inside a segment. None follows diffusers (block-causal iff causal_block_size > 1); upstream
    SkyReels' CLI is bidirectional unless `--causal_attention` (= True) is given."""
    causal = causal_block_size > 1 if causal_attention is None else causal_attention
    return AttentionSpec(block_frames=causal_block_size) if causal else AttentionSpec()


def skyreels_denoiser(
    model: WanDiT,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    *,
    causal_block_size: int = 1,
    causal_attention: bool | None = None,
) -> DenoiseFn:
    """Velocity of the DiT with classifier-free guidance as the pipelines apply it.

    guidance_scale > 1: v = v_uncond + g·(v_cond − v_uncond) (two calls); otherwise the conditional call only.
    Every call sees its window with RoPE positions from 0 and the segment's attention topology.
    """
    if guidance_scale > 1.0 and uncond is None:
        raise ValueError("guidance_scale > 1 needs the negative-prompt conditioning (uncond)")
    spec = skyreels_attention(causal_block_size, causal_attention)

    @torch.no_grad()
    def denoise(x: Tensor, t: Tensor) -> Tensor:
        # x [B, C, F, H, W], t [B, F] -> v [B, C, F, H, W] (float32)
        v = model(x, t, cond, attention=spec).float()
        if guidance_scale > 1.0 and uncond is not None:
            v_uncond = model(x, t, uncond, attention=spec).float()
            v = v_uncond + guidance_scale * (v - v_uncond)
        return v

    return denoise


def encode_image_prefix(encode: EncodeFn, image: Tensor) -> Tensor:
    """Image-to-video prefix: image [B, 3, H, W] in [-1, 1] -> its latent [B, C, 1, h, w]."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    return encode(image[:, :, None])


def encode_video_prefix(encode: EncodeFn, video: Tensor, overlap_history: int) -> Tensor:
    """Video-to-video prefix: the latents of the last `overlap_history` frames of video [B, 3, F, H, W]."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
    return encode(video[:, :, -overlap_history:])


def generate_skyreels_df(
    model: WanDiT,
    settings: DFSettings,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    num_frames: int,
    latent_hw: tuple[int, int],
    guidance_scale: float = 6.0,
    causal_attention: bool | None = None,
    prefix: Tensor | None = None,
    prefix_kind: PrefixKind | None = None,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    condition_generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The whole run at once -> latents [B, C, L, h, w] (what the pipelines return with output_type="latent").

    num_frames: the pipelines' pixel count (rounded down to 4k + 1 as they do); for video-to-video it counts the
    carried overlap too. prefix / prefix_kind: `encode_image_prefix(...)`, "image" or `encode_video_prefix(...)`,
    "video" (None for text-to-video).
    """
    num_latents = latent_frames(round_pixel_frames(num_frames))
    channels = model.cfg.out_dim
    sampler = SkyReelsDFSampler(
        settings, (batch_size, channels, *latent_hw), num_latents, prefix=prefix, prefix_kind=prefix_kind,
        generator=generator, condition_generator=condition_generator, device=device,
    )
    denoise = skyreels_denoiser(model, cond, uncond, guidance_scale, causal_block_size=settings.causal_block_size,
                                causal_attention=causal_attention)
    chunks = [c.latents for c in sampler.chunks(denoise)]
    return torch.cat(chunks, dim=2)
