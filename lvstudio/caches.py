"""Identity and anchor caches: what must stay the same across a long video.

IdentityCache: per named identity, its prompt (substituted for `{name}` in every shot, so a named identity conditions
every shot the same way), its text embedding, and reference latents when an image was given.
AnchorCache: keyframe latents — encoded anchor images, or the first block of a shot — that pin the look. The causal-KV
backend keeps an anchor's K/V as the attention sink; the cross-clip backend conditions every clip on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class CachedIdentity:
    name: str
    prompt: str
    image: Path | None = None
    embedding: Tensor | None = None  # [1, L, D]
    ref_latents: Tensor | None = None  # [1, C, 1, h, w]


@dataclass
class IdentityCache:
    identities: dict[str, CachedIdentity] = field(default_factory=dict)

    def add(self, name: str, prompt: str, image: Path | None = None) -> None:
        self.identities[name] = CachedIdentity(name, prompt, image)

    def resolve(self, prompt: str) -> str:
        """Replace `{name}` by the identity's prompt; unknown names raise ValueError naming the known ones."""

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.identities:
                known = ", ".join(sorted(self.identities)) or "none defined"
                raise ValueError(f"unknown identity {{{name}}} (known: {known})")
            return self.identities[name].prompt

        return _REF.sub(sub, prompt)

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"name": i.name, "prompt": i.prompt, "image": str(i.image) if i.image else None,
             "embedded": i.embedding is not None, "reference_latents": i.ref_latents is not None}
            for i in self.identities.values()
        ]


@dataclass
class CachedAnchor:
    """A keyframe. `latents[:, :, 0]` is a first-frame latent (used at block 0); `latents[:, :, 1]` a regular
    4-frame latent of the same look (used when the anchor lands later in the video)."""

    block: int  # the block whose first latent is pinned to the anchor
    source: str  # "image:<path>" or "shot:<n>"
    latents: Tensor | None = None  # [1, C, >=2, h, w] clean latents (encoded image, or the captured shot block)
    capture_block: int | None = None  # "shot:<n>" anchors: the block whose latents are captured
    # [1, 3, H, W] in [-1, 1]: the anchor image itself (or a captured first frame) for image-to-video backends (SVI)
    pixels: Tensor | None = None

    def pinned(self) -> Tensor | None:
        """The latent to hold clean at the start of `block` ([1, C, 1, h, w]), or None if not captured yet."""
        if self.latents is None:
            return None
        if self.block == 0 or self.latents.shape[2] < 2:
            return self.latents[:, :, :1]
        return self.latents[:, :, 1:2]


@dataclass
class AnchorCache:
    anchors: list[CachedAnchor] = field(default_factory=list)

    def add(self, anchor: CachedAnchor) -> None:
        self.anchors.append(anchor)
        self.anchors.sort(key=lambda a: a.block)

    def at_block(self, block: int) -> list[CachedAnchor]:
        return [a for a in self.anchors if a.block == block]

    def to_capture(self, block: int) -> list[CachedAnchor]:
        return [a for a in self.anchors if a.capture_block == block and a.latents is None]

    def latest(self, block: int, since: int = 0) -> CachedAnchor | None:
        """The most recent anchor with latents placed in blocks [since, block] (the cross-clip reference; `since`:
        the current shot's first block, as a cut leaves the previous shot's anchors behind)."""
        ready = [a for a in self.anchors if since <= a.block <= block and a.latents is not None]
        return ready[-1] if ready else None

    def summary(self) -> list[dict[str, Any]]:
        return [{"block": a.block, "source": a.source, "capture_block": a.capture_block,
                 "ready": a.latents is not None} for a in self.anchors]
