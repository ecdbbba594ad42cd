"""The ERFT cross-clip backend (Stable Video Infinity style): the video is made clip by clip.

Each clip is a short sequence of latent frames sampled jointly (bidirectional or block-causal inside the clip, as the
preset says), conditioned on
  - the last K latents of the previous clip, carried over clean (latent carry-over: no VAE round trip) and held at
    timestep 0 while the clip is sampled;
  - a reference: the latest anchor of the AnchorCache (an anchor image or the first frame of a shot), or else the
    video's first latent, prepended as one clean frame;
  - one prompt per clip from the Prompt Stream Buffer (the prompt active at the clip's first new block), so a prompt
    change shows from the first clip that starts at or after it; a live prompt lands on the next clip (lead 0).
Transitions: a `switch` or `blend` continues the shot (the next clip carries latents as usual). A `cut` starts a new
shot: the clip before it is shortened to end at the cut (so the cut lands exactly on its block), and the cut's clip
starts without carried latents and without the previous shot's reference — its reference is an anchor placed in
the new shot, else nothing for its first clip and its own first latent afterwards (as at the start of a video).
Clip k uses its own seed. Models fine-tuned with Error-Recycling (an ERFT LoRA named by the preset) learn to repair
the errors such carried history accumulates.

Stable Video Infinity presets (`[crossclip] svi = "shot" | "film" | ...`: a Wan2.1 image-to-video DiT with an SVI
LoRA) run through `lvstudio.backends.svi_crossclip.SviCrossClipBackend` instead (`variant_for`): same name, same
per-clip prompts and anchors, SVI's own clip conditioning.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lvstudio.backends.base import BackendBase, Generated, block_generator
from lvstudio.errors import PresetError
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.presets.schema import CrossClipSettings
from lvstudio.sampling.flow_matching import sigma_grid
from lvstudio.sampling.samplers import euler_sample, few_step_sample

if TYPE_CHECKING:
    from lvstudio.caches import AnchorCache
    from lvstudio.models.wan_dit import WanDiT
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import BlockConditioning, PromptStreamBuffer

MERGED_MARK = "_lvstudio_erft_lora"  # set on a large DiT whose weights carry a LoRA merged in place
INPLACE_MERGE_PARAMS = 1e8  # DiTs above this size get the LoRA merged in place instead of into a copy


class ERFTCrossClipBackend(BackendBase):
    name = "erft-crossclip"
    options = ("lora",)

    @classmethod
    def variant_for(cls, bundle: ModelBundle) -> type[BackendBase]:
        """SVI presets run as `SviCrossClipBackend`; every other preset as this class."""
        if bundle.preset.crossclip.svi is None:
            return cls
        from lvstudio.backends.svi_crossclip import SviCrossClipBackend

        return SviCrossClipBackend

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
        lora: str | Path | bool | None = None,
    ) -> None:
        """lora: None = the preset's ERFT LoRA (settings.lora, a role in [files]) if it names one; False = none
        (the "without ERFT" baseline); True = the preset's, required; a path = that LoRA file."""
        super().__init__(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
        self.st = settings or bundle.preset.crossclip
        self.n = self.block_latents
        if self.st.clip_frames % self.n or self.st.carry_frames % self.n or self.st.carry_frames >= self.st.clip_frames:
            raise PresetError(
                f"preset {bundle.preset.name!r}: crossclip.clip_frames ({self.st.clip_frames}) and carry_frames "
                f"({self.st.carry_frames}) must be multiples of attention.block_frames ({self.n}), with carry_frames "
                "< clip_frames, for the erft-crossclip backend",
                hint=f"set [crossclip] clip_frames = {3 * self.n}, carry_frames = {self.n} in the preset, or use "
                     "another --backend")
        self.lora_path = self._lora_path(lora)
        if self.lora_path is None and getattr(bundle.dit, MERGED_MARK, None) is not None:
            raise PresetError(f"the bundle's DiT carries the ERFT LoRA {getattr(bundle.dit, MERGED_MARK)} (merged in "
                              "place: it is too large to copy)", hint="load the bundle again for a run without ERFT")
        dit = bundle.dit if self.lora_path is None else _merged_copy(bundle.dit, self.lora_path)
        if cfg_scale is None:
            cfg_scale = bundle.preset.sampler.cfg_scale if self.st.cfg_scale is None else self.st.cfg_scale
        self._use_guidance(dit, cfg_scale)
        self.clip = 0
        self.latents_done = 0  # latent frames emitted so far
        self.carry: Tensor | None = None  # [1, C, K, h, w]
        self.first: Tensor | None = None  # [1, C, 1, h, w] the shot's first latent (default reference)
        self.shot_block = 0  # the block where the current shot started (anchors before it are not references)

    @property
    def next_index(self) -> int:
        return self.clip

    @property
    def next_block(self) -> int:
        return self.latents_done // self.n

    def _lora_path(self, lora: str | Path | bool | None) -> Path | None:
        if lora is False:
            return None
        if isinstance(lora, (str, Path)):
            return Path(lora)
        if self.st.lora is None:
            if lora is True:
                raise PresetError(f"preset {self.bundle.preset.name!r} names no ERFT LoRA",
                                  hint="set crossclip.lora to a role in [files] (e.g. erft_lora) or pass a LoRA path")
            return None
        return self.bundle.preset.file_path(self.st.lora)

    def _reference(self, block: int) -> Tensor | None:
        """The clean reference frame prepended to the clip (a 4-frame-type latent): the latest anchor of this shot,
        else the shot's first latent."""
        if not self.st.use_anchor:
            return None
        anchor = self.anchors.latest(block, since=self.shot_block)
        if anchor is not None and anchor.pinned() is not None and block > 0:
            return anchor.latents[:, :, -1:].to(self.bundle.device)
        return None if self.first is None else self.first

    def on_new_shot(self, bc: BlockConditioning) -> None:
        """A cut: the clip starts without the previous shot's carried latents or reference."""
        self.carry = None
        self.first = None
        self.shot_block = bc.block

    def _generate(self) -> Generated:
        dev = self.bundle.device
        first_block = self.latents_done // self.n
        bc = self._read_conditioning(first_block)  # a cut drops the carry and the reference (on_new_shot)
        k = 0 if self.carry is None else self.carry.shape[2]
        new = self.st.clip_frames - k
        cut = self.buffer.first_cut(first_block + 1, first_block + new // self.n)
        if cut is not None:  # end the clip at the next cut, so the new shot starts exactly there
            new = (cut - first_block) * self.n
        for b in range(first_block + 1, first_block + new // self.n):
            self.buffer.conditioning(b)  # mark the clip's blocks as handed out (live pushes land after the clip)
        cond = self.conds.of(bc)
        # Step 1: the clip = [reference] + [carried latents] + [noise]; clean frames are held at t = 0.
        ref = self._reference(first_block)
        prefix = [x for x in (ref, self.carry) if x is not None]
        clean = torch.cat(prefix, dim=2) if prefix else None
        p = 0 if clean is None else clean.shape[2]
        gen = block_generator(self.seed if bc.seed is None else bc.seed, self.clip, torch.device("cpu"), salt="clip")
        noise = torch.randn(1, self.bundle.latent_channels, new, self.h, self.w, generator=gen).to(dev)
        spec = AttentionSpec(None if self.st.bidirectional else self.n)

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            seq = x if clean is None else torch.cat([clean, x], dim=2)
            ts = t if clean is None else torch.cat([torch.zeros(1, p, device=dev), t], dim=1)
            v = self.dit(seq.expand(self.batch, -1, -1, -1, -1), ts.expand(self.batch, -1), cond, attention=spec,
                         start_frame=self._start(p))[:, :, p:]
            return self.conds.guide(v)

        # Step 2: sample the new frames (few-step: the Euler grid's σ, re-noised between steps from the clip's stream).
        sigmas = sigma_grid(self.st.steps, self.st.shift)
        with self.timed("denoise"):
            if self.st.sampler == "few-step":
                x0 = few_step_sample(denoise, noise, [1000.0 * float(sg) for sg in sigmas[:-1]], gen)
            else:
                x0 = euler_sample(denoise, noise, sigmas)
        # Step 3: carry the tail over (the base decodes the new latents: one continuous streaming decode).
        if self.first is None:
            self.first = x0[:, :, :1].clone()
        self.carry = x0[:, :, max(0, new - self.st.carry_frames) :] if self.st.carry_frames else None
        out = Generated(self.clip, first_block, x0, bc)
        self.clip += 1
        self.latents_done += new
        return out

    def _start(self, prefix: int) -> int:
        """Frame index of the clip's first frame, aligned to the block grid so block-causal masks line up."""
        return 0 if prefix % self.n == 0 else self.n - prefix % self.n

    def held_latents(self) -> list[Tensor]:
        return [x for x in (self.carry, self.first) if x is not None]

    def _state(self) -> dict[str, Tensor]:
        state = {"counters": torch.tensor([self.clip, self.latents_done, self.shot_block])}
        if self.carry is not None:
            state["carry"] = self.carry.contiguous()
        if self.first is not None:
            state["first"] = self.first.contiguous()
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        counters = [int(v) for v in state["counters"]]
        self.clip, self.latents_done = counters[:2]
        self.shot_block = counters[2] if len(counters) > 2 else 0
        self.carry = state.get("carry")
        self.first = state.get("first")
        self.buffer.restore_position(self.latents_done // self.n)


def _merged_copy(dit: WanDiT, path: Path) -> WanDiT:
    """The DiT with the LoRA merged in. The bundle's DiT serves other backends too, so small DiTs are copied first;
    a DiT over 1e8 parameters (Hub presets) is merged IN PLACE to avoid doubling its memory — the bundle's DiT then
    carries the LoRA for the rest of the process (marked, so it is never merged twice)."""
    from lvstudio.models.lora import apply_lora

    if sum(p.numel() for p in dit.parameters()) <= INPLACE_MERGE_PARAMS:
        return apply_lora(copy.deepcopy(dit), path, merge=True).train(False).requires_grad_(False)
    merged = getattr(dit, MERGED_MARK, None)
    if merged == str(path):
        return dit
    if merged is not None:
        raise PresetError(f"this DiT already has the LoRA {merged} merged in place; cannot apply {path} as well",
                          hint="load the bundle again to switch ERFT LoRAs")
    dit = apply_lora(dit, path, merge=True).train(False).requires_grad_(False)
    setattr(dit, MERGED_MARK, str(path))
    return dit
