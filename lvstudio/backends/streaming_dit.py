"""The streaming-DiT backend (StreamDiT / Rolling-Forcing style): a moving buffer at staggered noise levels.

The buffer holds up to N chunks of c latent frames; chunk 0 is the oldest and cleanest. The partition
(`lvstudio.sampling.schedules.stream_partition_levels`) has N slots of noise levels, slot 0 the cleanest; chunk i sits
in slot `first_slot + i`. Each model call denoises every frame of the buffer by one level (per-frame timesteps into
the DiT, attention block-causal or bidirectional inside the buffer plus the KV cache of emitted frames: sink +
rolling window). After s micro-steps (a shift period) every chunk moves one slot down; the chunk that finished slot 0
is clean: it is emitted (context pass into the KV cache, streaming VAE decode) and fresh noise enters slot N - 1.
Warm-up: chunks enter one per shift period and sit at the noisy end until the buffer is full.

Prompts and transitions. Each chunk takes its prompt from the Prompt Stream Buffer when it *enters*, so a live prompt
lands `lead_blocks` (N - 1 once the buffer is full) blocks after the next emitted one.
  - `switch` / `blend`: the buffer's natural hand-over. The new prompt conditions chunks from its block on while the
    older chunks finish under theirs; the KV cache and the buffer carry on.
  - `cut`: a fresh buffer. The cut's chunk waits (`pending`); no noise enters while the chunks already in flight —
    the previous shot's last N - 1 blocks — finish under their own prompt, one per shift period as always (on a
    shrinking buffer, so each period is cheaper). Then the KV cache is emptied, frames are numbered from 0 again
    (RoPE, cache ids: the new shot starts exactly as a video does) and the new shot warms up from an empty buffer.
    Latency: its first chunk leaves after N shift periods instead of one; the model work between the cut's last old
    chunk and its first new one is N(N+1)/2 · s chunk-evaluations against N · s in the steady state, and the total
    work over the transition is unchanged (the drain saves what the warm-up costs).

A preset with a `[skyreels]` table runs this backend in its SkyReels-V2 Diffusion Forcing mode instead
(`lvstudio.backends.skyreels_mode.SkyReelsDFMode`, which `StreamingDiTBackend(...)` returns for such a preset): the
same streaming contract (prompts taken when frames enter, chunks out as they finish), with diffusers' DF sampler.
Options: `num_frames` (the video's length, so the DF mode plans its last segment as diffusers does; the moving
buffer is unbounded and ignores it) and `extend` (DF mode only: a video [1, 3, F, H, W] in [-1, 1] to continue).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator
from lvstudio.errors import LvError
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
    options = ("num_frames", "extend")

    def __new__(cls, bundle: ModelBundle, *args: object, **kwargs: object) -> StreamingDiTBackend:  # noqa: ARG004
        """The SkyReels-V2 DF mode for a preset with [skyreels], the moving buffer otherwise."""
        if cls is StreamingDiTBackend and bundle.preset.skyreels is not None:
            from lvstudio.backends.skyreels_mode import SkyReelsDFMode

            cls = SkyReelsDFMode
        return super().__new__(cls)

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
        num_frames: int | None = None,  # noqa: ARG002 - the moving buffer is unbounded
        extend: Tensor | None = None,
    ) -> None:
        super().__init__(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        if extend is not None:
            raise LvError(f"--extend needs a SkyReels-V2 DF preset; preset {bundle.preset.name!r} runs the streaming "
                          "buffer, which cannot continue a video", hint="use preset = \"skyreels-v2-df-1.3b-540p\"")
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
        self.x: Tensor | None = None  # [1, C, p*c, h, w] buffer latents (p = len(chunks))
        self.chunks: list[_BufferChunk] = []
        self.first_slot = 0  # partition slot of chunks[0] (0 = cleanest, N - 1 = noisiest)
        self.pending: _BufferChunk | None = None  # a cut's first chunk, waiting for the buffer to drain
        self.micro = 0  # micro-step inside the current shift period
        self.emitted = 0  # chunks emitted so far (= block index of the buffer's first chunk when full)
        self.entered = 0  # blocks whose prompt has been read (in the buffer, emitted, or pending)
        self.origin = 0  # latent frame where the current shot starts: frames are numbered from it (RoPE, cache)

    @property
    def next_index(self) -> int:
        return self.emitted

    @property
    def next_block(self) -> int:
        return self.emitted

    @property
    def lead_blocks(self) -> int:
        """Blocks past the next emitted one whose prompt is already read: N - 1 once the buffer is full (fewer while
        a cut drains the buffer, 0 before the first chunk enters)."""
        return self.entered - self.emitted

    # -- transitions ------------------------------------------------------------------------------------------------
    def on_new_shot(self, bc: BlockConditioning) -> None:
        """A cut: the new shot's first chunk waits until the chunks in flight are emitted (see the module doc)."""
        self.pending = _BufferChunk(bc.block, bc)

    def _start_shot(self, chunk: _BufferChunk) -> None:
        """The buffer has drained: forget the previous shot (KV cache, sink included) and number frames from 0."""
        self.cache.reset()
        self.origin = chunk.block * self.c
        self.pending = None
        self._enter(chunk)

    def _fill(self) -> None:
        """Start of a shift period: the next block enters the noisy end (slot N - 1), unless a cut is draining the
        buffer; once drained, the cut's chunk starts a fresh buffer."""
        if self.pending is None and (not self.chunks or self.first_slot + len(self.chunks) < self.st.buffer_chunks):
            b = self.entered
            self.entered += 1
            chunk = _BufferChunk(b, self._read_conditioning(b))  # a cut sets `pending` (on_new_shot)
            if self.pending is None:
                self._enter(chunk)
        if self.pending is not None and not self.chunks:
            self._start_shot(self.pending)

    def _enter(self, chunk: _BufferChunk) -> None:
        """A fresh chunk of noise (seeded by its block, and the shot's seed if it has one) enters the noisy end."""
        seed = self.seed if chunk.cond.seed is None else chunk.cond.seed
        gen = block_generator(seed, chunk.block, torch.device("cpu"), salt="stream")
        noise = torch.randn(1, self.bundle.latent_channels, self.c, self.h, self.w, generator=gen)
        noise = noise.to(self.bundle.device)
        if not self.chunks:
            self.first_slot = self.st.buffer_chunks - 1
        self.x = noise if self.x is None or not self.chunks else torch.cat([self.x, noise], dim=2)
        self.chunks.append(chunk)

    # -- one emitted chunk ----------------------------------------------------------------------------------------
    def _generate(self) -> Generated:
        while True:
            # Step 1: at the start of a shift period, a chunk enters (warm-up adds one per period; a cut drains).
            if self.micro == 0:
                self._fill()
            # Step 2: one model call over the buffer; each frame moves down one level (Euler on its own sigma).
            with self.timed("denoise"):
                self._micro_step()
            self.micro += 1
            if self.micro < self.st.micro_steps:
                continue
            # Step 3: the period ends: every chunk moves one slot down; the one leaving slot 0 is clean.
            self.micro = 0
            if self.first_slot == 0:
                break
            self.first_slot -= 1
        # Step 4: emit the clean first chunk: context pass into the cache, shift the buffer (decoded by the base).
        first = self.chunks.pop(0)
        x0 = self.x[:, :, : self.c]
        self.x = self.x[:, :, self.c :]
        cond = self.conds.of(first.cond)
        self.dit(x0.expand(self.batch, -1, -1, -1, -1), torch.zeros(self.batch, self.c, device=x0.device), cond,
                 attention=AttentionSpec(self.c), kv_cache=self.cache, start_frame=first.block * self.c - self.origin,
                 write_cache=True, rope_mode=self.attn.rope_mode)
        self.emitted += 1
        return Generated(first.block, first.block, x0, first.cond)

    def _micro_step(self) -> None:
        p = len(self.chunks)
        cols = slice(self.first_slot * self.c, (self.first_slot + p) * self.c)  # the chunks' slots
        s_from = self.part.sigma_from[self.micro, cols].to(self.x)  # [p*c]
        s_to = self.part.sigma_to[self.micro, cols].to(self.x)
        t = (s_from * 1000)[None]  # [1, p*c]
        start = self.chunks[0].block * self.c - self.origin  # shot-local frame numbers
        v = torch.empty_like(self.x)
        # Frames are conditioned on the prompt they entered with: one call per distinct prompt in the buffer.
        keys = list(OrderedDict.fromkeys(ch.cond.key for ch in self.chunks))
        for key in keys:
            ch0 = next(ch for ch in self.chunks if ch.cond.key == key)
            cond = self.conds.of(ch0.cond)
            out = self.conds.guide(self.dit(self.x.expand(self.batch, -1, -1, -1, -1), t.expand(self.batch, -1), cond,
                                            attention=self.spec, kv_cache=self.cache, start_frame=start,
                                            rope_mode=self.attn.rope_mode))
            for i, ch in enumerate(self.chunks):
                if ch.cond.key == key:
                    v[:, :, i * self.c : (i + 1) * self.c] = out[:, :, i * self.c : (i + 1) * self.c]
        self.x = self.x + (s_to - s_from)[None, None, :, None, None] * v

    # -- state ------------------------------------------------------------------------------------------------------
    def held_latents(self) -> list[Tensor]:
        return [] if self.x is None or not self.chunks else [self.x]

    def _state(self) -> dict[str, Tensor]:
        state = {"counters": torch.tensor([self.micro, self.emitted, self.entered, self.first_slot,
                                           int(self.pending is not None), self.origin]),
                 "chunk_blocks": torch.tensor([ch.block for ch in self.chunks], dtype=torch.int64)}
        if self.x is not None and self.chunks:
            state["buffer"] = self.x.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        counters = [int(v) for v in state["counters"]]
        self.micro, self.emitted, self.entered = counters[:3]
        self.x = state.get("buffer")
        self.buffer.restore_position(self.entered)
        self.chunks = [_BufferChunk(int(b), self.buffer.conditioning(int(b))) for b in state["chunk_blocks"]]
        if len(counters) == 3:  # a snapshot from before cuts drained the buffer: chunks sat at the noisy end
            counters += [self.st.buffer_chunks - 1 - len(self.chunks), 0, 0]
        self.first_slot, has_pending, self.origin = counters[3:6]
        b = self.entered - 1
        self.pending = _BufferChunk(b, self.buffer.conditioning(b)) if has_pending else None
