"""The streaming-DiT backend (StreamDiT / Rolling-Forcing style): a moving buffer at staggered noise levels.

The buffer holds N chunks of c latent frames; chunk 0 is the oldest and cleanest. Each model call denoises every frame
of the buffer by one level of a StreamDiT partition (`lvstudio.sampling.schedules.stream_partition_levels`): per-frame
timesteps into the DiT, attention block-causal (or bidirectional) inside the buffer plus the KV cache of emitted
frames (sink + rolling window). After s micro-steps the first chunk is clean: it is emitted (context pass into the KV
cache, streaming VAE decode), the buffer shifts by c and fresh noise enters. Each chunk takes its prompt from the
Prompt Stream Buffer when it *enters* the buffer, so a prompt change reaches the output within one buffer length: a
live prompt lands N - 1 blocks after the next emitted one (`lead_blocks`, once the buffer is full).
Warm-up: chunks enter one per shift period and sit at the noisy end of the partition until the buffer is full.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.presets.schema import StreamingSettings
from lvstudio.prompt_stream import BlockConditioning
from lvstudio.sampling.schedules import stream_partition_levels

if TYPE_CHECKING:
    from lvstudio.caches import AnchorCache
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import PromptStreamBuffer


@dataclass
class _BufferChunk:
    block: int  # block index of this chunk in the whole video
    cond: BlockConditioning


class StreamingDiTBackend(BackendBase):
    name = "streaming-dit"

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
        settings: StreamingSettings | None = None,
    ) -> None:
        super().__init__(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        self.st = settings or bundle.preset.streaming
        attn = bundle.preset.attention
        self.c = self.block_latents = self.st.chunk_frames or attn.block_frames
        self.attn = attn
        self.part = stream_partition_levels(self.st.buffer_chunks, self.c, self.st.micro_steps, self.st.shift)
        self.spec = AttentionSpec(self.c if self.st.causal_buffer else None, attn.window_frames, attn.sink_frames)
        if cfg_scale is None:
            cfg_scale = bundle.preset.sampler.cfg_scale if self.st.cfg_scale is None else self.st.cfg_scale
        self._use_guidance(bundle.dit_for(self.st.dit), cfg_scale)
        cache_spec = AttentionSpec(self.c, attn.window_frames, attn.sink_frames)
        self.cache = self.dit.new_kv_cache(cache_spec, (self.h, self.w))
        self.x: Tensor | None = None  # [1, C, P*c, h, w] buffer latents
        self.chunks: list[_BufferChunk] = []
        self.micro = 0  # micro-step inside the current shift period
        self.emitted = 0  # chunks emitted so far (= block index of the buffer's first chunk when full)
        self.entered = 0  # chunks that have entered the buffer

    @property
    def next_index(self) -> int:
        return self.emitted

    @property
    def next_block(self) -> int:
        return self.emitted

    @property
    def lead_blocks(self) -> int:
        """Chunks already in the buffer hold their prompt: N - 1 once the buffer is full."""
        return self.st.buffer_chunks - 1

    def _enter(self) -> None:
        """A fresh chunk of noise enters the noisy end of the buffer, with the prompt active for its block."""
        b = self.entered
        gen = block_generator(self.seed, b, torch.device("cpu"), salt="stream")
        noise = torch.randn(1, self.bundle.latent_channels, self.c, self.h, self.w, generator=gen)
        noise = noise.to(self.bundle.device)
        self.x = noise if self.x is None else torch.cat([self.x, noise], dim=2)
        self.chunks.append(_BufferChunk(b, self._read_conditioning(b)))
        self.entered += 1

    # -- one emitted chunk ----------------------------------------------------------------------------------------
    def _generate(self) -> Generated:
        n = self.st.buffer_chunks
        while True:
            # Step 1: at the start of a shift period, fill the buffer up to N chunks (warm-up adds one per period).
            if self.micro == 0 and len(self.chunks) < n:
                self._enter()
            # Step 2: one model call over the buffer; each frame moves down one level (Euler on its own sigma).
            with self.timed("denoise"):
                self._micro_step()
            self.micro += 1
            if self.micro < self.st.micro_steps:
                continue
            self.micro = 0
            if len(self.chunks) == n:
                break  # the first chunk just reached sigma 0
        # Step 3: emit the clean first chunk: context pass into the cache, shift the buffer (decoded by the base).
        first = self.chunks.pop(0)
        x0 = self.x[:, :, : self.c]
        self.x = self.x[:, :, self.c :]
        cond = self.conds.get(first.cond.key, first.cond.context)
        self.dit(x0.expand(self.batch, -1, -1, -1, -1), torch.zeros(self.batch, self.c, device=x0.device), cond,
                 attention=AttentionSpec(self.c), kv_cache=self.cache, start_frame=first.block * self.c,
                 write_cache=True, rope_mode=self.attn.rope_mode)
        self.emitted += 1
        return Generated(first.block, first.block, x0, first.cond)

    def _micro_step(self) -> None:
        p = len(self.chunks)
        cols = slice(self.part.buffer_frames - p * self.c, None)  # warm-up: the noisy end of the partition
        s_from = self.part.sigma_from[self.micro, cols].to(self.x)  # [P*c]
        s_to = self.part.sigma_to[self.micro, cols].to(self.x)
        t = (s_from * 1000)[None]  # [1, P*c]
        start = self.chunks[0].block * self.c
        v = torch.empty_like(self.x)
        # Frames are conditioned on the prompt they entered with: one call per distinct prompt in the buffer.
        keys = list(OrderedDict.fromkeys(ch.cond.key for ch in self.chunks))
        for key in keys:
            ch0 = next(ch for ch in self.chunks if ch.cond.key == key)
            cond = self.conds.get(ch0.cond.key, ch0.cond.context)
            out = self.conds.guide(self.dit(self.x.expand(self.batch, -1, -1, -1, -1), t.expand(self.batch, -1), cond,
                                            attention=self.spec, kv_cache=self.cache, start_frame=start,
                                            rope_mode=self.attn.rope_mode))
            for i, ch in enumerate(self.chunks):
                if ch.cond.key == key:
                    v[:, :, i * self.c : (i + 1) * self.c] = out[:, :, i * self.c : (i + 1) * self.c]
        self.x = self.x + (s_to - s_from)[None, None, :, None, None] * v

    # -- state ------------------------------------------------------------------------------------------------------
    def held_latents(self) -> list[Tensor]:
        return [] if self.x is None else [self.x]

    def _state(self) -> dict[str, Tensor]:
        state = {"counters": torch.tensor([self.micro, self.emitted, self.entered]),
                 "chunk_blocks": torch.tensor([ch.block for ch in self.chunks], dtype=torch.int64)}
        if self.x is not None:
            state["buffer"] = self.x.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        self.micro, self.emitted, self.entered = (int(v) for v in state["counters"])
        self.x = state.get("buffer")
        self.buffer.restore_position(self.entered)
        self.chunks = [_BufferChunk(int(b), self.buffer.conditioning(int(b))) for b in state["chunk_blocks"]]
