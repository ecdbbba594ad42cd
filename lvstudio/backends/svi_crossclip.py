"""The cross-clip backend for Stable Video Infinity presets: Wan image-to-video clips chained the way SVI chains them.

`erft-crossclip` hands a preset whose `[crossclip] svi = "<mode>"` to this class (`ERFTCrossClipBackend.variant_for`).
The video is made clip by clip; every clip is one Wan2.1 image-to-video sample of `pixel_frames` frames (81 for the
14B presets, bidirectional attention inside the clip) whose conditioning comes from `lvstudio.models.svi`:

  y          the previous clip's last K decoded frames (8-bit) re-encoded, then padding (zeros or the reference):
             modes shot, film, tom, 2.0; or VAE(reference) + the previous clip's last latent + zeros: 2.0-pro
  CLIP       the first of those K frames (pixel carry) or the reference (latent carry)
  text       one prompt per clip from the Prompt Stream Buffer: the prompt of the first block that starts at or after
             the clip's first new frame. The blocks a clip covers are handed out when it starts, so a prompt change
             (storyboard or live) inside a clip shows from the next clip; a live prompt lands on the next clip.
  reference  the AnchorCache's latest anchor at or before that block with pixels: a storyboard anchor image, or the
             captured first frame of a shot ("shot:N" anchors); the first clip needs an anchor image at 0 s
             (image-to-video has no other start).

Each clip is decoded on its own (a fresh VAE decode, as upstream) and shows only its new frames: pixel carry drops
the last K frames of every clip (the next clip regenerates them from their re-encoding), latent carry drops the first
`overlap` frames of a clip that continues one (they repeat the carried latent).
Transitions as in the latent erft-crossclip backend: a `switch` or a blend changes the prompt and keeps the carried
frames (SVI-Film was trained on such scene changes); a `cut` ends the clip's shown frames where it starts and begins
a new shot there with nothing carried: image-to-video from the shot's own anchor image, else (an image-to-video
model cannot start from nothing) from the latest earlier anchor image, under the new prompt. Clip k draws its noise
from its own seed, so a resumed render continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator, to_uint8_frames
from lvstudio.errors import LvError, PresetError
from lvstudio.models.svi import SviConditioner, svi_mode
from lvstudio.models.wan_i2v import I2VSampling, latent_frames, sample_i2v
from lvstudio.prompt_stream import block_at_frame, block_start_frame

if TYPE_CHECKING:
    from lvstudio.caches import AnchorCache, CachedAnchor
    from lvstudio.presets.load import ModelBundle
    from lvstudio.presets.schema import CrossClipSettings
    from lvstudio.prompt_stream import BlockConditioning, PromptStreamBuffer

ANCHOR_HINT = 'add `[[anchors]]` with `at = "0s"` and `image = "first_frame.png"` to the storyboard'


class SviCrossClipBackend(BackendBase):
    """erft-crossclip for an SVI preset (an image-to-video DiT with an SVI LoRA merged); see the module docstring."""

    name = "erft-crossclip"
    options = ()

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
        settings: CrossClipSettings | None = None,
    ) -> None:
        super().__init__(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        self.st = settings or bundle.preset.crossclip
        name = bundle.preset.name
        if self.st.svi is None:
            raise PresetError(f"preset {name!r} sets no [crossclip] svi mode", hint='set svi = "shot" or "film"')
        if bundle.dit.cfg.model_type != "i2v":
            raise PresetError(f"preset {name!r} asks for SVI clips but its DiT is {bundle.dit.cfg.model_type}",
                              hint='SVI runs on a Wan2.1 image-to-video DiT: dit_config.model_type = "i2v"')
        if bundle.image_encoder is None:
            raise PresetError(f"preset {name!r}: SVI needs the CLIP image encoder and the bundle has none",
                              hint="name it as files.image_encoder (the image_encoder/ folder of the Wan I2V repo)")
        self.mode = svi_mode(self.st.svi)
        self.num_frames = self.st.pixel_frames
        if cfg_scale is None:
            cfg_scale = bundle.preset.sampler.cfg_scale if self.st.cfg_scale is None else self.st.cfg_scale
        self.sampling = I2VSampling(steps=self.st.steps, shift=self.st.shift, guidance=cfg_scale,
                                    sampler=self.st.sampler)
        self.guided = cfg_scale != 1.0  # the unconditional row: each clip's `BlockConditioning.negative`
        self.shot_block = 0  # first block of the current shot
        first = self._reference(0)
        if first is None:
            raise LvError(f"preset {name!r} is image-to-video (Stable Video Infinity): the video starts from an "
                          "anchor image at 0 s and the storyboard has none", hint=ANCHOR_HINT)
        if first.shape[-2:] != (height, width):
            raise LvError(f"the anchor image is {first.shape[-1]}x{first.shape[-2]}, the render {width}x{height}",
                          hint="anchor images are resized to the render size by the session; pass them that way")
        self.chain = SviConditioner(self.mode, first, self.num_frames)
        self.clip = 0
        self.frames_done = 0  # frames shown so far

    # -- positions ---------------------------------------------------------------------------------------------
    @property
    def next_index(self) -> int:
        return self.clip

    @property
    def next_block(self) -> int:
        return block_at_frame(self.frames_done, self.block_latents)

    def _emit(self) -> slice:
        """The frames of the next clip that are new: all but the K regenerated by the next clip (pixel carry), all
        but the `overlap` repeated ones when the clip continues a carried latent (latent carry)."""
        if self.mode.carry == "latents" and self.chain.carry is not None:
            return slice(self.mode.overlap, self.num_frames)
        return self.chain.emit_slice(self.num_frames, 0)

    @property
    def new_per_clip(self) -> int:
        """Frames a clip that continues the previous one adds."""
        return self.num_frames - (self.mode.motion if self.mode.carry == "pixels" else self.mode.overlap)

    # -- transitions and the reference -------------------------------------------------------------------------
    def on_new_shot(self, bc: BlockConditioning) -> None:
        """A cut: nothing of the previous shot is carried; the clip starts image-to-video from the reference."""
        self.chain.carry, self.chain.anchor = None, None
        self.shot_block = bc.block

    def _anchors_with_pixels(self, block: int) -> list[CachedAnchor]:
        return [a for a in self.anchors.anchors if a.block <= block and a.pixels is not None]

    def _reference(self, block: int) -> Tensor | None:
        """[1, 3, H, W] in [-1, 1]: the latest anchor image (or captured shot frame) placed in this shot at or before
        `block`, else the latest earlier one (a new shot of an image-to-video model needs an image to start from)."""
        ready = self._anchors_with_pixels(block)
        own = [a for a in ready if a.block >= self.shot_block]
        pick = own or ready
        return None if not pick else pick[-1].pixels.float().cpu()

    def _capture(self, frames: Tensor, start: int) -> None:
        """Keep the first frame of a shot ("shot:N" anchors) when a clip shows it: frames [1, 3, n, H, W]."""
        for a in self.anchors.anchors:
            if a.capture_block is None or a.pixels is not None:
                continue
            at = block_start_frame(a.capture_block, self.block_latents) - start
            if 0 <= at < frames.shape[2]:
                a.pixels = frames[:, :, at].float().cpu().clone()

    # -- one clip -----------------------------------------------------------------------------------------------
    def _generate(self) -> Generated:
        dev = self.bundle.device
        n = self.block_latents
        start = self.frames_done
        # Step 1: the clip's prompt (its first block; a cut there starts a new shot: on_new_shot), the frames it shows
        # (a cut that starts inside the clip, held-back frames included, ends them: the next shot starts exactly
        # there), and hand out every block it shows.
        block = block_at_frame(start, n)
        bc = self._read_conditioning(block)
        emit = self._emit()
        end = start + self.num_frames - emit.start  # one past the clip's last frame, held-back ones included
        cut = self.buffer.first_cut(block + 1, block_at_frame(end + 1, n))  # a cut starting at `end` ends it too
        if cut is not None:
            emit = slice(emit.start, emit.start + block_start_frame(cut, n) - start)
        shown = emit.stop - emit.start
        for b in range(block + 1, block_at_frame(start + shown, n)):
            self.buffer.conditioning(b)
        # Step 2: the reference (a new anchor replaces the chain's) and the clip's y + CLIP tokens.
        ref = self._reference(block)
        if ref is not None and not torch.equal(ref, self.chain.reference):
            self.chain.reference, self.chain.anchor = ref, None
        with self.timed("denoise"):
            inputs = self.chain.next_inputs(self.bundle.vae)
            clip_fea = self.bundle.image_encoder.encode(inputs.clip_image, preprocess="wan")  # [1, 257, 1280]
            # Step 3: sample the clip from its own noise.
            gen = block_generator(self.seed if bc.seed is None else bc.seed, self.clip, torch.device("cpu"),
                                  salt="clip")
            f = latent_frames(self.num_frames)
            noise = torch.randn(1, self.bundle.latent_channels, f, self.h, self.w, generator=gen).to(dev)
            # CFG's unconditional text: the block's negative prompt (the shot's, else the storyboard's, else the
            # preset's `negative_prompt`, as for every backend), [1, L, D]
            negative = self.buffer.embedding(bc.negative).to(dev) if self.guided else None
            latents = sample_i2v(self.dit, noise, bc.context.to(dev), clip_fea, inputs.y, self.sampling,
                                 negative_text=negative)  # [1, z, f, h, w]
        # Step 4: decode the clip on its own, record it in the chain, show its new frames.
        with self.timed("decode"):
            video = self.bundle.vae.decode(latents)  # [1, 3, F, H, W]
            self.chain.advance(latents, video)
            new = video[:, :, emit]
            self._capture(new, start)
            frames = to_uint8_frames(new)
        out = Generated(self.clip, block, latents, bc, frames=frames, frame_start=start)
        self.clip += 1
        self.frames_done += shown
        return out

    # -- an estimate before the render -------------------------------------------------------------------------
    def estimate(self) -> str:
        """Minutes per clip from the first clip's conditioning (CLIP + VAE encode, counted twice for the decode)
        and one sampling step with the clip's real shapes, measured now (the first step errs high by a little)."""
        dev = self.bundle.device

        def now() -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter()

        t0 = now()
        inputs = SviConditioner(self.mode, self.chain.reference, self.num_frames).next_inputs(self.bundle.vae)
        clip_fea = self.bundle.image_encoder.encode(inputs.clip_image, preprocess="wan")
        t1 = now()
        noise = torch.zeros(1, self.bundle.latent_channels, latent_frames(self.num_frames), self.h, self.w,
                            device=dev)
        context = self.buffer.embedding("").to(dev)
        sample_i2v(self.dit, noise, context, clip_fea, inputs.y, replace(self.sampling, steps=1),
                   negative_text=context if self.guided else None)
        t2 = now()
        from lvstudio.models.offload import estimate_clip_time

        est = estimate_clip_time(t2 - t1, self.sampling.steps, 2 * (t1 - t0))
        return (f"{self.bundle.preset.name}: {est.message(self.num_frames, float(self.bundle.preset.fps))} "
                f"(measured on one step now; {self.new_per_clip} new frames per clip after the first)")

    # -- snapshots ----------------------------------------------------------------------------------------------
    def held_latents(self) -> list[Tensor]:
        """What the chain carries to the next clip: K decoded frames (pixel carry) or latents + the anchor latent."""
        return [t for t in (self.chain.carry, self.chain.anchor) if t is not None]

    def _state(self) -> dict[str, Tensor]:
        state = {"counters": torch.tensor([self.clip, self.frames_done, self.shot_block])}
        state.update({f"svi.{k}": v for k, v in self.chain.state_dict().items()})
        for i, a in enumerate(self.anchors.anchors):
            if a.capture_block is not None and a.pixels is not None:
                state[f"anchor_px.{i}"] = a.pixels.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        self.clip, self.frames_done, self.shot_block = (int(v) for v in state["counters"])
        self.chain.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("svi.")})
        for i, a in enumerate(self.anchors.anchors):
            if f"anchor_px.{i}" in state:
                a.pixels = state[f"anchor_px.{i}"]
        self.buffer.restore_position(self.next_block)
