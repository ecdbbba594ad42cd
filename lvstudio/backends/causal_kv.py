"""The causal-KV backend (CausVid / Self-Forcing / LongLive style): block-autoregressive generation over a rolling
KV cache with an attention sink.

Per block of n latent frames:
  1. conditioning from the Prompt Stream Buffer. A `cut` starts a new shot: the KV cache and the recent latents are
     emptied, and the shot's frames are numbered from 0 again (RoPE positions and cache frame ids are shot-local), so
     the shot's first block is computed exactly as a video's first block (an anchor placed at the cut pins its first
     latent, and that block becomes the new sink). A `switch` continues the shot: the window is re-cached under the
     new prompt (LongLive);
  2. sample the block from per-block seeded noise, attending to the cache (few-step with re-noising, or Euler/UniPC);
     frames pinned by an anchor are held clean (timestep 0) throughout;
  3. clean context pass: the block's x0 at t = context_noise is written into the KV cache (eviction keeps the sink);
  4. streaming VAE decode of the block (the decoder keeps its causal caches across blocks; done by BackendBase).
A live prompt lands on the next block (lead 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.presets.schema import AttentionSettings, SamplerSettings
from lvstudio.sampling.flow_matching import FlowMatchTable, sigma_grid, warp_steps
from lvstudio.sampling.samplers import euler_sample, few_step_sample, unipc_sample

if TYPE_CHECKING:
    from lvstudio.caches import AnchorCache
    from lvstudio.models.wan_dit import Conditioning
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import BlockConditioning, PromptStreamBuffer

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x [B, C, F, h, w], t [B, F]) -> velocity


def sample_block(denoise_fn: Denoiser, noise: Tensor, settings: SamplerSettings, generator: torch.Generator) -> Tensor:
    """Run the preset's sampler on one block; returns clean latents."""
    if settings.kind == "few-step":
        steps = warp_steps(settings.step_list, settings.shift) if settings.warp else list(settings.step_list)
        return few_step_sample(denoise_fn, noise, steps, generator, table=FlowMatchTable(shift=settings.shift))
    sigmas = sigma_grid(settings.steps, settings.shift)
    if settings.kind == "euler":
        return euler_sample(denoise_fn, noise, sigmas)
    return unipc_sample(denoise_fn, noise, sigmas)


class CausalKVBackend(BackendBase):
    name = "causal-kv"

    def __init__(
        self,
        bundle: ModelBundle,
        buffer: PromptStreamBuffer,
        *,
        seed: int,
        width: int,
        height: int,
        anchors: AnchorCache | None = None,
        cfg_scale: float | None = None,
        sampler: SamplerSettings | None = None,
        attention: AttentionSettings | None = None,
    ) -> None:
        super().__init__(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        self.sampler = sampler or bundle.preset.sampler
        self.attn = attention or bundle.preset.attention
        self.n = self.block_latents = self.attn.block_frames
        self.spec = AttentionSpec(self.n, self.attn.window_frames, self.attn.sink_frames)
        self._use_guidance(bundle.dit, self.sampler.cfg_scale if cfg_scale is None else cfg_scale)
        self.cache = self.dit.new_kv_cache(self.spec, (self.h, self.w))
        self.keep_latents = self.attn.window_frames or 4 * self.n * 8
        self.recent: Tensor | None = None  # [1, C, k, h, w] last clean latents of this shot (for re-cache)
        self.block = 0
        self.origin = 0  # latent frame where the current shot starts: frames are numbered from it (RoPE, cache)

    @property
    def next_index(self) -> int:
        return self.block

    @property
    def next_block(self) -> int:
        return self.block

    @property
    def start_frame(self) -> int:
        """The next block's first latent frame, counted from the start of its shot (RoPE position, cache frame id).

        Why shot-local with absolute RoPE too: attention sees only position differences, so inside a shot this
        changes nothing, and a new shot then starts exactly as a video does — bit for bit, whatever came before —
        with the model's RoPE table (1024 latent frames for Wan) counted per shot rather than per video."""
        return self.block * self.n - self.origin

    # -- one block ------------------------------------------------------------------------------------------------
    def _generate(self) -> Generated:
        b, n = self.block, self.n
        # Step 1: conditioning; a cut empties the cache (on_new_shot), a switch re-caches it (on_prompt_switch).
        bc = self._read_conditioning(b)
        s = self.start_frame  # shot-local: 0 at the first block of a new shot
        cond = self.conds.of(bc)
        # Step 2: anchors pinned to this block (their first latents are held clean).
        pinned = self._pinned_latents(b)
        # Step 3: sample the block against the cache.
        gen = block_generator(self.seed if bc.seed is None else bc.seed, b, torch.device("cpu"))
        noise = torch.randn(1, self.bundle.latent_channels, n, self.h, self.w, generator=gen).to(self.bundle.device)
        with self.timed("denoise"):
            x0 = sample_block(self._denoiser(cond, s, pinned), noise, self.sampler, gen)
            if pinned is not None:
                x0[:, :, : pinned.shape[2]] = pinned
        # Step 4: clean context pass writes the block's K/V.
        t_ctx = torch.full((self.batch, n), float(self.sampler.context_noise), device=self.bundle.device)
        self.dit(x0.expand(self.batch, -1, -1, -1, -1), t_ctx, cond, attention=self.spec, kv_cache=self.cache,
                 start_frame=s, write_cache=True, rope_mode=self.attn.rope_mode)
        self._remember(x0)
        self._capture_shot_anchor(b, x0, cond)
        self.block += 1
        return Generated(b, b, x0, bc)

    def _denoiser(self, cond: Conditioning, start: int, pinned: Tensor | None) -> Denoiser:
        def denoise(x: Tensor, t: Tensor) -> Tensor:
            if pinned is not None:
                k = pinned.shape[2]
                x = torch.cat([pinned.to(x.dtype), x[:, :, k:]], dim=2)
                t = torch.cat([torch.zeros_like(t[:, :k]), t[:, k:]], dim=1)
            xb = x.expand(self.batch, -1, -1, -1, -1)
            tb = t.expand(self.batch, -1)
            v = self.dit(xb, tb, cond, attention=self.spec, kv_cache=self.cache, start_frame=start,
                         rope_mode=self.attn.rope_mode)
            return self.conds.guide(v)

        return denoise

    # -- transitions, re-cache, anchors, memory ---------------------------------------------------------------------
    def on_new_shot(self, bc: BlockConditioning) -> None:
        """A cut: forget the previous shot (KV cache, sink included, and the recent latents kept for re-cache); the
        new shot's frames are numbered from 0. Anchors placed at this block still pin its first latent."""
        self.cache.reset()
        self.recent = None
        self.origin = bc.block * self.n

    def on_prompt_switch(self, bc: BlockConditioning) -> None:
        """LongLive: re-encode the window under the new prompt (if the preset says so and there is history)."""
        if self.attn.recache_on_switch and self.recent is not None:
            with self.timed("recache"):
                self.recache(self.conds.of(bc))

    def recache(self, cond: Conditioning) -> None:
        """Re-encode the recent clean latents (the window) under `cond` (LongLive `_recache_after_switch`).

        The window's frames attend to each other as `attention.recache_attention` says: all to all, as upstream
        LongLive does (its KV path ignores the block mask), or block-causally.
        """
        if self.recent is None:
            return
        k = self.recent.shape[2]
        if self.attn.window_frames is not None:
            k = min(k, self.attn.window_frames)
        frames = self.recent[:, :, -k:].expand(self.batch, -1, -1, -1, -1)
        causal = self.attn.recache_attention == "block-causal"  # LongLive upstream: bidirectional
        self.dit.recache(self.cache, frames, self.start_frame - k, cond, keep_sink=self.attn.global_sink,
                         block_frames=self.n if causal else None, rope_mode=self.attn.rope_mode,
                         t_context=self.sampler.context_noise)

    def _remember(self, x0: Tensor) -> None:
        self.recent = x0 if self.recent is None else torch.cat([self.recent, x0], dim=2)[:, :, -self.keep_latents :]

    def _pinned_latents(self, block: int) -> Tensor | None:
        for a in self.anchors.at_block(block):
            pinned = a.pinned()
            if pinned is not None and not (a.capture_block == block):
                return pinned.to(self.bundle.device)
        return None

    def _capture_shot_anchor(self, block: int, x0: Tensor, cond: Conditioning) -> None:
        """"First frame of shot N" anchors: keep that shot's first block; with a sink, its K/V become the new sink
        (already so when the block starts the video or a new shot: the cache then holds just this block)."""
        for a in self.anchors.to_capture(block):
            a.latents = x0.detach().cpu().clone()
            if self.attn.sink_frames and self.start_frame > 0:
                self.dit.recache(self.cache, x0.expand(self.batch, -1, -1, -1, -1), self.start_frame, cond,
                                 keep_sink=False, block_frames=self.n, rope_mode=self.attn.rope_mode,
                                 t_context=self.sampler.context_noise)

    def held_latents(self) -> list[Tensor]:
        return [] if self.recent is None else [self.recent]

    # -- snapshot -----------------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Tensor]:
        state = {"block": torch.tensor(self.block), "origin": torch.tensor(self.origin)}
        if self.recent is not None:
            state["recent"] = self.recent.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        self.block = int(state["block"])
        self.origin = int(state.get("origin", torch.tensor(0)))
        self.recent = state.get("recent")
        self.buffer.restore_position(self.block)
