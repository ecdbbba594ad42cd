"""The streaming-DiT backend's SkyReels-V2 Diffusion Forcing mode (a preset with a `[skyreels]` table).

The model call is diffusers' `SkyReelsV2DiffusionForcingPipeline` step (`lvstudio.sampling.df_sampler`, proven equal
to the pipelines): segments of W = (base_num_frames - 1)//4 + 1 latents, per-block timestep matrices (`ar_step`,
`causal_block_size`), one UniPC solver per frame, the last O latents of a segment carried (re-noised to
`addnoise_condition`) into the next. What this module adds is the link to the Prompt Stream Buffer and the session:

  - prompt-stream blocks are the sampler's blocks (`causal_block_size` latents, = `attention.block_frames`);
  - a block reads its conditioning (prompt, blend, negative prompt) when its frames *enter* the sampler, and every
    frame is denoised under its own block's prompt to the end: a model call runs once per distinct prompt among the
    frames it steps (one call, as diffusers makes it, when they share one). So a shot or a live prompt takes effect
    exactly from its block; a cut and a blend act as everywhere else (a cut is a hard change at its block, a blend
    interpolates the text features block by block). Live prompts land on the first block that has not entered yet:
    `lead_blocks` = the blocks that have entered but are not emitted (they hold their prompt already);
  - chunks stream out as soon as the sampler finishes frames: one `Chunk` per block, in timeline order;
  - image-to-video: a storyboard anchor image at 0:00 is the first frame (diffusers' image-to-video pipeline);
  - `extend`: a video [1, 3, F, H, W] in [-1, 1] to continue (the video-to-video pipeline): its last
    `overlap_history` frames are encoded as the clean prefix; the output starts after them, and the decoder is primed
    with them so the first new frames follow the video.

Classifier-free guidance: guided whenever the scale is not 1, v = v_uncond + g·(v_cond − v_uncond), the
unconditional call with the block's negative prompt, as two model calls like diffusers (which guides only for g > 1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator
from lvstudio.backends.streaming_dit import StreamingDiTBackend
from lvstudio.errors import LvError
from lvstudio.prompt_stream import BlockConditioning
from lvstudio.sampling.df_sampler import DFSettings, SkyReelsDFSampler
from lvstudio.sampling.skyreels_df import encode_video_prefix, skyreels_attention

if TYPE_CHECKING:
    from lvstudio.caches import AnchorCache
    from lvstudio.models.wan_dit import Conditioning
    from lvstudio.presets.load import ModelBundle
    from lvstudio.presets.schema import SkyReelsSettings, StreamingSettings
    from lvstudio.prompt_stream import PromptStreamBuffer


def df_settings(sk: SkyReelsSettings) -> DFSettings:
    return DFSettings(num_steps=sk.num_steps, shift=sk.shift, base_num_frames=sk.base_num_frames, ar_step=sk.ar_step,
                      causal_block_size=sk.causal_block_size, overlap_history=sk.overlap_history,
                      addnoise_condition=sk.addnoise_condition)


def planned_latents(num_frames: int, block: int, prefix: int = 0, *, first_frame: bool = True) -> int:
    """Run latents for `num_frames` output pixel frames: enough latents (the session trims the frames), whole blocks
    (every segment must divide), plus the `prefix` latents of a video being extended. first_frame: the run's first
    latent is one frame (a video's start), else every latent is 4 frames (after a cut, after an extended video)."""
    new = math.ceil((num_frames - 1) / 4) + 1 if first_frame else math.ceil(num_frames / 4)
    return prefix + max(math.ceil(new / block), 1) * block


class SkyReelsDFMode(StreamingDiTBackend):
    """streaming-dit with a SkyReels-V2 DF preset (see the module docstring); made by `StreamingDiTBackend(...)`."""

    def __init__(  # noqa: PLR0913 - the backend keywords
        self,
        bundle: ModelBundle,
        buffer: PromptStreamBuffer,
        *,
        seed: int,
        width: int,
        height: int,
        anchors: AnchorCache | None = None,
        cfg_scale: float | None = None,
        settings: StreamingSettings | None = None,  # noqa: ARG002 - the moving buffer's; not used in this mode
        num_frames: int | None = None,
        extend: Tensor | None = None,
    ) -> None:
        BackendBase.__init__(self, bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        sk = bundle.preset.skyreels
        if sk is None:
            raise LvError(f"preset {bundle.preset.name!r} has no [skyreels] table")
        self.sk, self.df = sk, df_settings(sk)
        self.block_latents = sk.causal_block_size
        if buffer.block_latents != self.block_latents:
            raise LvError(f"the prompt stream's blocks ({buffer.block_latents} latents) are not the preset's "
                          f"causal_block_size ({self.block_latents})", hint="build the buffer with block_latents = "
                                                                            "attention.block_frames")
        self.dit = bundle.dit
        self.cfg = sk.guidance_scale if cfg_scale is None else cfg_scale
        self.batch = 2 if self.cfg != 1.0 else 1  # model calls per prompt (cond, uncond)
        self.spec = skyreels_attention(sk.causal_block_size, sk.causal_attention)
        self._conds: OrderedDict[str, Conditioning] = OrderedDict()
        self.num_frames = num_frames
        self.block_conds: dict[int, BlockConditioning] = {}
        self.ready: Tensor | None = None  # [1, C, n, h, w] finished run latents from `returned` on
        self.entered = 0  # prompt-stream blocks whose frames have entered a sampler (their prompt is fixed)
        self.cut_at = -1  # the block of a cut that ends the current run (-1: none known)
        # The first run starts at block 0 from a video to extend, an anchor image at 0:00 or noise.
        prefix, kind = self._prefix(extend)
        self._prime = None
        self._new_run(0, prefix, kind)
        if kind == "video":
            self._prime = prefix[:, :, : self.offset]  # the run's first latents (diffusers cuts the end)
            self.decoder = self.fresh_decoder()

    def _new_run(self, block: int, prefix: Tensor | None = None, kind: str | None = None) -> None:
        """A fresh DF run from prompt-stream block `block` (0, or the block of a cut: nothing carries over)."""
        n = self.block_latents
        self.run_block, self.cut_at = block, -1
        self.block_conds = {b: bc for b, bc in self.block_conds.items() if b < block}  # frames of the old run
        self.sampler = SkyReelsDFSampler(
            self.df, (1, self.bundle.latent_channels, self.h, self.w), None, prefix=prefix, prefix_kind=kind,
            generator=block_generator(self.seed, block, torch.device("cpu"), "skyreels"),
            condition_generator=block_generator(self.seed, block, torch.device("cpu"), "skyreels-addnoise"),
            device=self.bundle.device)
        self.offset = self.sampler.input_latents  # run latents before the output (an extended video's tail)
        if self.num_frames is not None:
            left = self.num_frames - self.block_start_frame(block)
            self.sampler.num_latents = planned_latents(left, n, self.offset, first_frame=block == 0 and not self.offset)
        self.sampler.segment_plan(0)  # raises now for a plan that cannot work
        self.returned = self.offset  # run latents handed out as chunks (or skipped: the extended video's)
        self.ready = None

    def _prefix(self, extend: Tensor | None) -> tuple[Tensor | None, str | None]:
        if extend is not None:
            if extend.ndim != 5 or extend.shape[:2] != (1, 3) or extend.shape[2] < self.sk.overlap_history:
                raise LvError(f"the video to extend must have at least overlap_history = {self.sk.overlap_history} "
                              f"frames (got {extend.shape[2] if extend.ndim == 5 else 0})",
                              hint="extend a longer video")
            with torch.no_grad():
                return encode_video_prefix(self.bundle.vae.encode, extend.to(self.bundle.device),
                                           self.sk.overlap_history), "video"
        first = [a for a in self.anchors.anchors if a.block == 0 and a.latents is not None]
        if first:  # the VAE is causal: the first latent of the still clip is the image's own latent
            return first[0].latents[:, :, :1].to(self.bundle.device), "image"
        return None, None

    def fresh_decoder(self):  # noqa: ANN201 - the VAE's streaming decoder type
        """A decoder primed with the extended video's tail (its frames are the video's, not output)."""
        decoder = self.bundle.vae.streaming_decoder()
        if getattr(self, "_prime", None) is not None:
            with torch.no_grad():
                decoder.decode(self._prime)
        return decoder

    # -- positions --------------------------------------------------------------------------------------------------
    @property
    def next_index(self) -> int:
        return self.run_block + (self.returned - self.offset) // self.block_latents

    @property
    def next_block(self) -> int:
        return self.next_index

    @property
    def lead_blocks(self) -> int:
        """Blocks that have entered the sampler (their prompt is fixed) but are not emitted yet."""
        return max(self.entered - self.next_block, 0)

    def block_start_frame(self, block: int) -> int:
        if self._prime is not None:  # after an extended video every latent is 4 new frames
            return 4 * block * self.block_latents
        return super().block_start_frame(block)

    def _block_of(self, latent: int) -> int:
        """The prompt-stream block of a latent of the current run."""
        return self.run_block + (latent - self.offset) // self.block_latents

    # -- cuts: a cut ends the run; the new shot is a fresh run ---------------------------------------------------------
    def on_new_shot(self, bc: BlockConditioning) -> None:
        """A cut inside the current run (known only once its block enters: a live cut): the run's frames from that
        block on are made but never shown; the next run starts at the cut."""
        if bc.block > self.run_block and (self.cut_at < 0 or bc.block < self.cut_at):
            self.cut_at = bc.block

    def _end_run_at_known_cut(self) -> None:
        """Before a segment starts: a cut the prompt stream already knows inside it ends the run there (the segment is
        planned shorter, as diffusers plans a video's last segment)."""
        seg = self.sampler.segment_plan(self.sampler.segment_index)
        if seg is None or self.sampler.latents is not None or self.cut_at >= 0:
            return
        first_new = self._block_of(seg.start + max(seg.emit_from, seg.prefix, 1))
        cut = self.buffer.first_cut(max(first_new, self.run_block + 1), self._block_of(seg.end - 1) + 1)
        if cut is not None:
            self.cut_at = cut
            self.sampler.num_latents = self.offset + (cut - self.run_block) * self.block_latents

    # -- one chunk = one block --------------------------------------------------------------------------------------
    def _generate(self) -> Generated:
        n = self.block_latents
        while self.ready is None or self.ready.shape[2] < n:
            if self.ready is None and self.next_block == self.cut_at:
                self._new_run(self.cut_at)  # every frame before the cut is out: the new shot starts from nothing
                continue
            self._end_run_at_known_cut()
            if self.sampler.done:
                if self.ready is None and self.next_block != self.cut_at:
                    raise LvError("the SkyReels run is complete: no frames are left to make",
                                  hint="render a longer duration")
                if self.ready is None:
                    continue
                break
            self._call()
        block = self._block_of(self.returned)
        latents, rest = self.ready[:, :, :n], self.ready[:, :, n:]
        self.ready = rest if rest.shape[2] else None
        self.returned += latents.shape[2]
        bc = self.block_conds[block]
        for old in [b for b in self.block_conds if b < block - self.df.base_latents // n]:
            del self.block_conds[old]  # out of every window
        return Generated(block, block, latents, bc)

    def _call(self) -> None:
        """One sampler iteration: read the entering blocks' prompts, then one model call per distinct prompt."""
        nxt = self.sampler.peek()
        assert nxt is not None  # callers check `done`
        # Step 1: blocks entering now read their conditioning (a cut calls on_new_shot; a switch, on_prompt_switch).
        for latent in nxt.entering:
            b = self._block_of(latent)
            if b in self.block_conds:
                continue
            if self.cut_at < 0 or b < self.cut_at:
                self.block_conds[b] = self._read_conditioning(b)
                self.entered = max(self.entered, b + 1)
            if 0 <= self.cut_at <= b:  # made, never shown: the new shot starts afresh
                self.block_conds[b] = self.buffer.conditioning(self.cut_at - 1)
        # Step 2: frames stepped at this call, grouped by the prompt they entered with.
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for latent in nxt.updating:
            bc = self.block_conds[self._block_of(latent)]
            groups.setdefault(bc.key, []).append(latent - nxt.window.start)
        start = nxt.window.start

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            # x [1, C, F, h, w], t [1, F] -> v [1, C, F, h, w]; each stepped frame from its own prompt's call
            v = torch.zeros_like(x, dtype=torch.float32)  # frames not stepped: their output is not used
            for i, frames in enumerate(groups.values()):
                bc = self.block_conds[self._block_of(start + frames[0])]
                out = self._velocity(x, t, bc)
                if i == 0:
                    v = out
                else:
                    v[:, :, frames] = out[:, :, frames]
            return v

        with self.timed("denoise"):
            chunks = self.sampler.step(denoise)
        stop = None if self.cut_at < 0 else self.offset + (self.cut_at - self.run_block) * self.block_latents
        for chunk in chunks:
            lat = chunk.latents[:, :, max(self.offset - chunk.start, 0) : None if stop is None else stop - chunk.start]
            if lat.shape[2]:
                self.ready = lat if self.ready is None else torch.cat([self.ready, lat], dim=2)

    @torch.no_grad()
    def _velocity(self, x: Tensor, t: Tensor, bc: BlockConditioning) -> Tensor:
        v = self.dit(x, t, self._cond(bc.key, bc.context), attention=self.spec).float()
        if self.cfg != 1.0:
            neg = self.buffer.embedding(bc.negative)
            v_u = self.dit(x, t, self._cond("\x00negative:" + bc.negative, neg), attention=self.spec).float()
            v = v_u + self.cfg * (v - v_u)
        return v

    def _cond(self, key: str, context: Tensor) -> Conditioning:
        """A Conditioning per text (its own cross-attention cache; fps sample info of the preset's fps)."""
        if key not in self._conds:
            from lvstudio.models.wan_dit import fps_class

            fps = fps_class(self.buffer.fps) if self.dit.cfg.inject_sample_info else None
            self._conds[key] = self.dit.new_conditioning(context.to(self.bundle.device), fps_index=fps)
            while len(self._conds) > 8:
                self._conds.popitem(last=False)
        self._conds.move_to_end(key)
        return self._conds[key]

    # -- state ------------------------------------------------------------------------------------------------------
    def held_latents(self) -> list[Tensor]:
        return [t for t in (self.sampler.latents, self.sampler.history, self.ready) if t is not None]

    def _state(self) -> dict[str, Tensor]:
        state = {f"df.{k}": v for k, v in self.sampler.state_dict().items()}
        length = -1 if self.sampler.num_latents is None else self.sampler.num_latents
        state["counters"] = torch.tensor([self.returned, self.entered, self.run_block, self.cut_at, length])
        if self.ready is not None:
            state["ready"] = self.ready.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        returned, entered, run_block, cut_at, length = (int(v) for v in state["counters"])
        if run_block != self.run_block:
            self._new_run(run_block)
        self.sampler.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("df.")})
        self.sampler.num_latents = None if length < 0 else length
        self.returned, self.entered, self.cut_at = returned, entered, cut_at
        self.ready = state["ready"].to(self.bundle.device) if "ready" in state else None
        self.buffer.restore_position(self.entered)
        self.block_conds = {b: self.buffer.conditioning(b if cut_at < 0 or b < cut_at else cut_at - 1)
                            for b in range(self.next_block, self.entered)}
