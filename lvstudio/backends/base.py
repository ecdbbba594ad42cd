"""What every backend shares: the Chunk it emits, the BackendBase class it derives from, and per-block seeds.

A backend turns a model bundle and a PromptStreamBuffer into a stream of `Chunk`s, one per `step()`. `BackendBase`
owns everything that does not depend on how the latents are made:

  - setup: bundle, buffer, seed, latent size, anchors, the streaming VAE decoder, classifier-free guidance
    (`ConditioningCache`) and, for backends that keep one, the KV cache;
  - `step()`: times the work, asks the subclass for the next clean latents (`_generate`), decodes them and builds
    the `Chunk` (frame ranges, prompt, timings);
  - the conditioning of a block (`_read_conditioning`), which calls the transition hooks: `on_new_shot` at a `cut`
    (forget the previous shot), `on_prompt_switch` at a `switch` (continue the shot under the new prompt); a chunk
    that starts a new shot is decoded from zero decoder history (`decoder.new_shot()`), so nothing of the previous
    shot is smeared into its first frames;
  - snapshots with fixed key prefixes (`kv.` KV cache, `dec.` decoder caches, `anchor.N` captured anchors, plus
    whatever the subclass adds in `_state`) and `cache_summary()` with the same keys for every backend.

A subclass sets `name`, `block_latents` and `dit`, and implements `_generate`, `next_index`, `next_block`,
`_state`/`_load_state` and `held_latents`. Register it in `lvstudio.backends.registry`.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

from lvstudio.caches import AnchorCache
from lvstudio.prompt_stream import BlockConditioning, block_start_frame

if TYPE_CHECKING:
    from lvstudio.models.kv_cache import KVCache
    from lvstudio.models.wan_dit import Conditioning, WanDiT
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import PromptStreamBuffer

SUMMARY_KEYS = ("kv_frames", "kv_sink_frames", "kv_mb", "latent_frames", "latent_mb", "state_mb")
TIMING_KEYS = ("denoise", "recache", "decode")


@dataclass
class Chunk:
    """One emitted piece of video (a block for causal-KV, a buffer step for streaming, a clip for cross-clip)."""

    index: int  # block / step / clip index
    block: int  # the prompt-stream block of its first latent frame
    frames: np.ndarray  # [n, H, W, 3] uint8 RGB
    frame_start: int  # index of frames[0] in the whole video
    latents: Tensor  # [1, C, n_lat, h, w] clean latents of this chunk
    latent_start: int  # index of the first latent frame
    event_id: int  # prompt event active for this chunk
    prompt: str
    blend_weight: float = 1.0
    switched: bool = False  # a `switch` starts at this chunk
    new_shot: bool = False  # a `cut` starts a new shot at this chunk
    timings: dict[str, float] = field(default_factory=dict)  # seconds: denoise, recache, decode, total

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class Generated:
    """What a backend's `_generate` made: clean latents starting at prompt-stream block `block`."""

    index: int  # the chunk index (block, buffer step or clip)
    block: int
    latents: Tensor  # [1, C, n, h, w]
    cond: BlockConditioning  # the conditioning the chunk was made under (its prompt, event, blend weight)
    # A backend that decodes its chunks itself (SVI: every clip is its own video) gives the frames [n, H, W, 3] uint8
    # and the index of the first one; otherwise the base streams `latents` through its decoder.
    frames: np.ndarray | None = None
    frame_start: int | None = None


class ConditioningCache:
    """DiT conditionings by BlockConditioning.key, each with its own cross-attention K/V cache (a small LRU), and
    the classifier-free guidance that goes with them.

    With `cfg_scale != 1` every conditioning gets a second, unconditional row: the text features of the block's
    negative prompt (`BlockConditioning.negative`: the shot's or the storyboard's `negative_prompt`, default the empty
    prompt). Model calls and KV caches then carry `rows = 2` rows [cond, uncond], and `guide` combines the outputs.
    A DiT that injects SkyReels sample info gets the fps class of `fps`.
    """

    def __init__(self, dit: WanDiT, device: torch.device, buffer: PromptStreamBuffer, cfg_scale: float = 1.0,
                 size: int = 8, fps: float | None = None) -> None:
        self.dit, self.device, self.cfg_scale, self.size = dit, device, cfg_scale, size
        self.buffer = buffer
        self.fps_index = None
        if getattr(dit.cfg, "inject_sample_info", False):
            from lvstudio.models.wan_dit import fps_class

            self.fps_index = fps_class(buffer.fps if fps is None else fps)
        self._items: OrderedDict[str, Conditioning] = OrderedDict()

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    def get(self, key: str, context: Tensor, negative: str = "") -> Conditioning:
        """The conditioning of `context` [1, L, D] (rows [cond, uncond = `negative`] with guidance), cached under
        `key` (a BlockConditioning's key names its negative prompt)."""
        if key not in self._items:
            ctx = context.to(self.device)
            if self.guided:
                uncond = self.buffer.embedding(negative)  # [1, text_len, text_dim]
                ctx = torch.cat([ctx, uncond.to(self.device)])  # rows: [cond, uncond]
            self._items[key] = self.dit.new_conditioning(ctx, fps_index=self.fps_index)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    def of(self, bc: BlockConditioning) -> Conditioning:
        """The conditioning of a block (its prompt, blend and negative prompt)."""
        return self.get(bc.key, bc.context, bc.negative)

    def guide(self, v: Tensor) -> Tensor:
        """[rows, ...] model outputs -> [1, ...]: uncond + scale * (cond - uncond), or v itself without guidance."""
        return v[1:] + self.cfg_scale * (v[:1] - v[1:]) if self.guided else v


class BackendBase(ABC):
    """Drives a model bundle over a PromptStreamBuffer; stateful, one chunk per `step()` (see the module docstring).

    Constructor keywords every backend takes: seed, width, height (pixels), anchors, cfg_scale (None: the preset's
    guidance for this backend). A backend with more keyword options lists them in `options`, so `make_backend` can
    refuse an option that does not apply.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def variant_for(cls, bundle: ModelBundle) -> type[BackendBase]:
        """The class that runs this backend for `bundle` (`make_backend` asks first): this class, or a subclass of
        BackendBase registered under the same name for a kind of model (erft-crossclip -> its SVI variant for
        image-to-video presets)."""
        return cls

    def __init__(self, bundle: ModelBundle, buffer: PromptStreamBuffer, *, seed: int, width: int, height: int,
                 anchors: AnchorCache | None = None) -> None:
        self.bundle = bundle
        self.buffer = buffer
        self.seed = seed
        self.anchors = anchors or AnchorCache()
        self.h, self.w = bundle.latent_hw(width, height)
        self.block_latents = bundle.preset.attention.block_frames  # latent frames per prompt-stream block
        self.dit: WanDiT = bundle.dit
        self.cache: KVCache | None = None  # backends that keep a KV cache of emitted frames set it
        self.decoder = bundle.vae.streaming_decoder()
        self._timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)

    def _use_guidance(self, dit: WanDiT, cfg_scale: float) -> None:
        """Run `dit` with classifier-free guidance `cfg_scale` (1 = none): sets `dit`, `conds` and `batch` (rows)."""
        self.dit = dit
        self.conds = ConditioningCache(dit, self.bundle.device, self.buffer, cfg_scale)
        self.batch = self.conds.rows  # [cond, uncond] rows in model calls and KV caches with guidance

    # -- what a subclass provides ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def next_index(self) -> int:
        """Index of the next chunk (block, buffer step or clip)."""

    @property
    @abstractmethod
    def next_block(self) -> int:
        """The prompt-stream block the next chunk starts at. A live prompt pushed now lands on block
        `next_block + lead_blocks` (the blocks in between already hold their prompt) and shows from the first chunk
        that starts at or after it."""

    @property
    def lead_blocks(self) -> int:
        """How many blocks past `next_block` a live prompt lands (see `next_block`); 0 unless a backend holds
        blocks whose prompt is already fixed (the streaming buffer)."""
        return 0

    @abstractmethod
    def _generate(self) -> Generated:
        """Make the next chunk's clean latents (and advance the backend's counters)."""

    @abstractmethod
    def held_latents(self) -> list[Tensor]:
        """The latents the backend keeps between chunks besides its KV cache (window, moving buffer, carry)."""

    @abstractmethod
    def _state(self) -> dict[str, Tensor]:
        """Backend-specific snapshot tensors (counters, buffers), next to the base's `kv.`/`dec.`/`anchor.N` keys."""

    @abstractmethod
    def _load_state(self, state: dict[str, Tensor]) -> None:
        """Restore `_state()` and the prompt stream's position (`buffer.restore_position`)."""

    def block_start_frame(self, block: int) -> int:
        """First output pixel frame of prompt-stream block `block` (Wan layout: block 0 is 3 frames shorter)."""
        return block_start_frame(block, self.block_latents)

    def fresh_decoder(self):  # noqa: ANN201 - the VAE's streaming decoder
        """A new streaming decoder in the state this backend's decoder started in (`--resume` re-decodes with it)."""
        return self.bundle.vae.streaming_decoder()

    # -- transition hooks ------------------------------------------------------------------------------------------
    def on_prompt_switch(self, bc: BlockConditioning) -> None:  # noqa: B027 - an optional hook, no-op by default
        """A `switch` at block `bc.block`: the shot continues under a new prompt. Default: nothing — the new prompt
        conditions the blocks from here on. causal-kv re-encodes its KV window under it (LongLive re-cache)."""

    def on_new_shot(self, bc: BlockConditioning) -> None:  # noqa: B027 - no-op for a backend without history
        """A `cut` at block `bc.block`: a new shot starts. A backend that carries history (KV cache, moving buffer,
        carried latents) must forget it here, so nothing of the previous shot conditions the new one except what
        the storyboard names on purpose (identities, anchors placed in the new shot). The base restarts the VAE
        decoder when the chunk is decoded; the conformance suite checks that a new shot does not depend on the
        previous one."""

    def estimate(self) -> str | None:
        """One line on how long a chunk will take, measured before the render starts, for backends that are far from
        real time (render prints it). Default: None, nothing to say."""
        return None

    def _read_conditioning(self, block: int) -> BlockConditioning:
        """The conditioning of `block` from the prompt stream (marking it handed out), calling the transition hook
        of a `cut` (`on_new_shot`) or a `switch` (`on_prompt_switch`) that starts there."""
        bc = self.buffer.conditioning(block)
        if bc.new_shot:
            self.on_new_shot(bc)
        elif bc.switched:
            self.on_prompt_switch(bc)
        return bc

    # -- one chunk ---------------------------------------------------------------------------------------------------
    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the wall time of the block to this chunk's `timings[key]`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._timings[key] += time.perf_counter() - t0

    @torch.no_grad()
    def step(self) -> Chunk:
        """Generate, decode and return the next chunk."""
        t_start = time.perf_counter()
        self._timings = dict.fromkeys(TIMING_KEYS, 0.0)
        out = self._generate()
        bc = out.cond
        frames = out.frames
        if frames is None:
            with self.timed("decode"):
                if bc.new_shot:
                    self.decoder.new_shot()  # zero history, still 4 frames per latent: no smear of the previous shot
                frames = to_uint8_frames(self.decoder.decode(out.latents))
        start = self.block_start_frame(out.block) if out.frame_start is None else out.frame_start
        return Chunk(
            index=out.index, block=out.block, frames=frames, frame_start=start, latents=out.latents.cpu(),
            latent_start=out.block * self.block_latents, event_id=bc.event_id, prompt=bc.prompt,
            blend_weight=bc.blend_weight, switched=bc.switched, new_shot=bc.new_shot,
            timings={**self._timings, "total": time.perf_counter() - t_start},
        )

    # -- snapshots and summaries -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue exactly from the next chunk (tensors only; saved as safetensors)."""
        state = {} if self.cache is None else {f"kv.{k}": v for k, v in self.cache.state_dict().items()}
        state.update({f"dec.{k}": v for k, v in self.decoder.state_dict().items()})
        for i, a in enumerate(self.anchors.anchors):
            if a.latents is not None:
                state[f"anchor.{i}"] = a.latents.contiguous()
        state.update(self._state())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a `state_dict()` (the buffer must hold the same prompt events)."""
        if self.cache is not None:
            self.cache.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("kv.")})
        self.decoder.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dec.")})
        for i, a in enumerate(self.anchors.anchors):
            if f"anchor.{i}" in state:
                a.latents = state[f"anchor.{i}"]
        self._load_state(state)

    def cache_summary(self) -> dict[str, float]:
        """Sizes of what the backend keeps between chunks; the same keys (`SUMMARY_KEYS`) for every backend."""
        kv_mb = 0.0 if self.cache is None else self.cache.nbytes() / 2**20
        held = self.held_latents()
        latent_mb = sum(t.numel() * t.element_size() for t in held) / 2**20
        return {
            "kv_frames": float(0 if self.cache is None else self.cache.num_frames),
            "kv_sink_frames": float(0 if self.cache is None else self.cache.num_sink),
            "kv_mb": kv_mb,
            "latent_frames": float(sum(t.shape[2] for t in held)),
            "latent_mb": latent_mb,
            "state_mb": kv_mb + latent_mb,
        }


def block_seed(run_seed: int, index: int, salt: str = "block") -> int:
    """A per-block seed derived from the run seed, so any block is reproducible on its own."""
    digest = hashlib.sha256(f"{run_seed}:{salt}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_generator(run_seed: int, index: int, device: torch.device, salt: str = "block") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(block_seed(run_seed, index, salt))


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
