"""What every backend shares: the Chunk it emits, the protocol the session drives, and per-block seeds."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass
class Chunk:
    """One emitted piece of video (a block for causal-KV, a buffer step for streaming, a clip for cross-clip)."""

    index: int  # block / step / clip index
    frames: np.ndarray  # [n, H, W, 3] uint8 RGB
    frame_start: int  # index of frames[0] in the whole video
    latents: Tensor  # [1, C, n_lat, h, w] clean latents of this chunk
    latent_start: int  # index of the first latent frame
    event_id: int  # prompt event active for this chunk
    prompt: str
    blend_weight: float = 1.0
    switched: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds: denoise, recache, decode, total

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class Backend(Protocol):
    """Drives a model bundle over a PromptStreamBuffer; stateful, one chunk per `step()`."""

    name: str

    def step(self) -> Chunk:
        """Generate and return the next chunk."""
        ...

    @property
    def next_index(self) -> int:
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue exactly from the next chunk (tensors only; saved as safetensors)."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ...

    def cache_summary(self) -> dict[str, float]:
        ...


class ConditioningCache:
    """DiT conditionings by BlockConditioning.key, each with its own cross-attention K/V cache (a small LRU), and
    the classifier-free guidance that goes with them.

    With `cfg_scale != 1` every conditioning gets a second, unconditional row (text features of the empty prompt):
    model calls and KV caches then carry `rows = 2` rows [cond, uncond], and `guide` combines the two outputs.
    """

    def __init__(self, dit, device: torch.device, buffer, cfg_scale: float = 1.0, size: int = 8) -> None:  # noqa: ANN001
        self.dit, self.device, self.cfg_scale, self.size = dit, device, cfg_scale, size
        self.uncond = buffer.embedding("") if cfg_scale != 1.0 else None  # [1, text_len, text_dim]
        self._items: OrderedDict[str, object] = OrderedDict()

    @property
    def rows(self) -> int:
        return 1 if self.uncond is None else 2

    def get(self, key: str, context: Tensor):  # noqa: ANN201 - lvstudio.models.wan_dit.Conditioning
        if key not in self._items:
            ctx = context.to(self.device)
            if self.uncond is not None:
                ctx = torch.cat([ctx, self.uncond.to(self.device)])  # rows: [cond, uncond]
            self._items[key] = self.dit.new_conditioning(ctx)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    def guide(self, v: Tensor) -> Tensor:
        """[rows, ...] model outputs -> [1, ...]: uncond + scale * (cond - uncond), or v itself without guidance."""
        return v if self.uncond is None else v[1:] + self.cfg_scale * (v[:1] - v[1:])


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
