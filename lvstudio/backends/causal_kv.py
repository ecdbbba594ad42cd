"""The causal-KV backend (CausVid / Self-Forcing / LongLive style): block-autoregressive generation over a rolling
KV cache with an attention sink.

Per block of n latent frames:
  1. conditioning from the Prompt Stream Buffer; on a hard cut, re-cache the window under the new prompt (LongLive);
  2. sample the block from per-block seeded noise, attending to the cache (few-step with re-noising, or Euler/UniPC);
     frames pinned by an anchor are held clean (timestep 0) throughout;
  3. clean context pass: the block's x0 at t = context_noise is written into the KV cache (eviction keeps the sink);
  4. streaming VAE decode of the block (the decoder keeps its causal caches across blocks).
"""

from __future__ import annotations

import time
import torch
from torch import Tensor

from lvstudio.backends.base import Chunk, ConditioningCache, block_generator, to_uint8_frames
from lvstudio.bundle import ModelBundle
from lvstudio.caches import AnchorCache
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import Conditioning
from lvstudio.presets import AttentionSettings, SamplerSettings
from lvstudio.prompt_stream import PromptStreamBuffer, block_start_frame
from lvstudio.sampling.flow_matching import FlowMatchTable, sigma_grid, warp_steps
from lvstudio.sampling.samplers import euler_sample, few_step_sample, unipc_sample


def sample_block(
    denoise_fn,  # (x [B,C,F,h,w], t [B,F]) -> velocity
    noise: Tensor,
    settings: SamplerSettings,
    generator: torch.Generator,
) -> Tensor:
    """Run the preset's sampler on one block; returns clean latents."""
    if settings.kind == "few-step":
        steps = warp_steps(settings.step_list, settings.shift) if settings.warp else list(settings.step_list)
        return few_step_sample(denoise_fn, noise, steps, generator, table=FlowMatchTable(shift=settings.shift))
    sigmas = sigma_grid(settings.steps, settings.shift)
    if settings.kind == "euler":
        return euler_sample(denoise_fn, noise, sigmas)
    return unipc_sample(denoise_fn, noise, sigmas)


class CausalKVBackend:
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
        sampler: SamplerSettings | None = None,
        attention: AttentionSettings | None = None,
    ) -> None:
        self.bundle = bundle
        self.buffer = buffer
        self.seed = seed
        self.anchors = anchors or AnchorCache()
        self.sampler = sampler or bundle.preset.sampler
        self.attn = attention or bundle.preset.attention
        self.h, self.w = bundle.latent_hw(width, height)
        self.n = self.attn.block_frames
        self.spec = AttentionSpec(self.n, self.attn.window_frames, self.attn.sink_frames)
        self.conds = ConditioningCache(bundle.dit, bundle.device, buffer, self.sampler.cfg_scale)
        self.batch = self.conds.rows  # [cond, uncond] rows with guidance
        self.cache = bundle.dit.new_kv_cache(self.spec, (self.h, self.w))
        self.decoder = bundle.vae.streaming_decoder()
        self.keep_latents = self.attn.window_frames or 4 * self.n * 8
        self.recent: Tensor | None = None  # [1, C, k, h, w] last clean latents (for re-cache)
        self.block = 0

    @property
    def next_index(self) -> int:
        return self.block

    @property
    def start_frame(self) -> int:
        return self.block * self.n

    # -- one block ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> Chunk:
        dit, dev = self.bundle.dit, self.bundle.device
        b, s, n = self.block, self.start_frame, self.n
        t_start = time.perf_counter()
        bc = self.buffer.conditioning(b)
        cond = self.conds.get(bc.key, bc.context)
        # Step 1: a hard cut re-encodes the window under the new prompt (LongLive KV re-cache).
        t_recache = 0.0
        if bc.switched and self.attn.recache_on_switch and self.recent is not None:
            t0 = time.perf_counter()
            self.recache(cond)
            t_recache = time.perf_counter() - t0
        # Step 2: anchors pinned to this block (their first latents are held clean).
        pinned = self._pinned_latents(b)
        # Step 3: sample the block against the cache.
        gen = block_generator(self.seed if bc.seed is None else bc.seed, b, torch.device("cpu"))
        noise = torch.randn(1, self.bundle.latent_channels, n, self.h, self.w, generator=gen).to(dev)
        t0 = time.perf_counter()
        x0 = sample_block(self._denoiser(cond, s, pinned), noise, self.sampler, gen)
        if pinned is not None:
            x0[:, :, : pinned.shape[2]] = pinned
        t_denoise = time.perf_counter() - t0
        # Step 4: clean context pass writes the block's K/V.
        t_ctx = torch.full((self.batch, n), float(self.sampler.context_noise), device=dev)
        dit(x0.expand(self.batch, -1, -1, -1, -1), t_ctx, cond, attention=self.spec, kv_cache=self.cache,
            start_frame=s, write_cache=True, rope_mode=self.attn.rope_mode)
        self._remember(x0)
        self._capture_shot_anchor(b, x0, cond)
        # Step 5: streaming decode.
        t0 = time.perf_counter()
        frames = to_uint8_frames(self.decoder.decode(x0))
        t_decode = time.perf_counter() - t0
        chunk = Chunk(
            index=b, frames=frames, frame_start=block_start_frame(b, n), latents=x0.cpu(), latent_start=s,
            event_id=bc.event_id, prompt=bc.prompt, blend_weight=bc.blend_weight, switched=bc.switched,
            timings={"denoise": t_denoise, "recache": t_recache, "decode": t_decode,
                     "total": time.perf_counter() - t_start},
        )
        self.block += 1
        return chunk

    def _denoiser(self, cond: Conditioning, start: int, pinned: Tensor | None):
        dit = self.bundle.dit

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            if pinned is not None:
                k = pinned.shape[2]
                x = torch.cat([pinned.to(x.dtype), x[:, :, k:]], dim=2)
                t = torch.cat([torch.zeros_like(t[:, :k]), t[:, k:]], dim=1)
            xb = x.expand(self.batch, -1, -1, -1, -1)
            tb = t.expand(self.batch, -1)
            v = dit(xb, tb, cond, attention=self.spec, kv_cache=self.cache, start_frame=start,
                    rope_mode=self.attn.rope_mode)
            return self.conds.guide(v)

        return denoise

    # -- re-cache, anchors, memory ----------------------------------------------------------------------------------
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
        self.bundle.dit.recache(self.cache, frames, self.start_frame - k, cond, keep_sink=self.attn.global_sink,
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
        """"First frame of shot N" anchors: keep that shot's first block; with a sink, its K/V become the new sink."""
        for a in self.anchors.to_capture(block):
            a.latents = x0.detach().cpu().clone()
            if self.attn.sink_frames and block > 0:
                self.bundle.dit.recache(self.cache, x0.expand(self.batch, -1, -1, -1, -1), self.start_frame, cond,
                                        keep_sink=False, block_frames=self.n, rope_mode=self.attn.rope_mode,
                                        t_context=self.sampler.context_noise)

    def cache_summary(self) -> dict[str, float]:
        return {
            "kv_frames": float(self.cache.num_frames),
            "kv_sink_frames": float(self.cache.num_sink),
            "kv_mb": self.cache.nbytes() / 2**20,
            "recent_latents": float(0 if self.recent is None else self.recent.shape[2]),
        }

    # -- snapshot -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"kv.{k}": v for k, v in self.cache.state_dict().items()}
        state.update({f"dec.{k}": v for k, v in self.decoder.state_dict().items()})
        state["block"] = torch.tensor(self.block)
        if self.recent is not None:
            state["recent"] = self.recent.contiguous()
        for i, a in enumerate(self.anchors.anchors):
            if a.latents is not None:
                state[f"anchor.{i}"] = a.latents.contiguous()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.cache.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("kv.")})
        self.decoder.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dec.")})
        self.block = int(state["block"])
        self.recent = state.get("recent")
        for i, a in enumerate(self.anchors.anchors):
            if f"anchor.{i}" in state:
                a.latents = state[f"anchor.{i}"]
        self.buffer.restore_position(self.block)
