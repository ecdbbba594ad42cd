"""The Prompt Stream Buffer: a timeline of prompt events (storyboard shots + live pushes) turned into per-block
conditioning for a backend.

Time runs in *blocks* of latent frames. With Wan's causal VAE, latent 0 is one pixel frame and every later latent is
four, so block b (n latents) starts at pixel frame 0 for b = 0 and 4bn - 3 afterwards. A shot at time T applies from
the first block starting at or after T. Transitions (`lvstudio.transitions`): a `cut` sets `new_shot` on its first
block (the backend forgets the previous shot), a `switch` sets `switched` (the shot continues under the new prompt;
causal-kv re-caches its KV window), a `blend` interpolates the text embeddings of the previous and the new prompt
over N blocks.

Live pushes are thread-safe: `push(prompt)` lands on the next block the backend has not asked for yet, as a
`switch` unless told otherwise.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from lvstudio.caches import IdentityCache
from lvstudio.transitions import BLEND, CUT, LIVE_DEFAULT, STORYBOARD_DEFAULT, SWITCH, check_transition


def block_start_frame(block: int, block_latents: int) -> int:
    """First pixel frame of a block (Wan VAE: latent 0 -> 1 frame, later latents -> 4 frames)."""
    return 0 if block == 0 else 4 * block * block_latents - 3


def block_num_frames(block: int, block_latents: int) -> int:
    return 4 * block_latents - 3 if block == 0 else 4 * block_latents


def block_at_frame(frame: int, block_latents: int) -> int:
    """The first block whose start frame is >= frame."""
    if frame <= 0:
        return 0
    return math.ceil((frame + 3) / (4 * block_latents))


@dataclass(frozen=True)
class PromptEvent:
    block: int  # first block it applies to
    prompt: str  # as written (may contain {identity})
    resolved: str  # identities substituted
    transition: str = STORYBOARD_DEFAULT  # "cut" | "switch" | "blend" (lvstudio.transitions)
    blend_blocks: int = 0
    source: str = "storyboard"  # "storyboard" | "live"
    shot: int | None = None  # storyboard shot index (0-based)
    seed: int | None = None  # per-shot seed override
    negative: str | None = None  # CFG's unconditional prompt as written (None = the buffer's default)


@dataclass(frozen=True)
class BlockConditioning:
    block: int
    event_id: int  # index of the active event
    prompt: str  # resolved text of the active event
    context: Tensor  # [1, L, D] text features (blended during a blend)
    key: str  # identifies the context (for cross-attention caches)
    blend_weight: float  # weight of the active prompt (1.0 outside a blend)
    previous_prompt: str | None
    switched: bool  # a `switch` starts at this block: the shot continues under a new prompt
    seed: int | None
    new_shot: bool = False  # a `cut` starts at this block: a new shot, nothing of the previous one carries over
    negative: str = ""  # resolved negative prompt: the unconditional row of classifier-free guidance


class PromptStreamBuffer:
    def __init__(
        self,
        encode: Callable[[list[str]], Tensor],
        identities: IdentityCache | None = None,
        *,
        block_latents: int,
        fps: int,
        negative: str = "",
    ) -> None:
        """negative: the default negative prompt (the storyboard's `negative_prompt`; "" = the empty prompt)."""
        self._encode = encode
        self.negative = negative
        self.identities = identities or IdentityCache()
        self.block_latents = block_latents
        self.fps = fps
        self._events: list[PromptEvent] = []
        self._lock = threading.Lock()
        self._next_block = 0  # the first block not yet handed to the backend
        self._embeddings: dict[str, Tensor] = {}

    # -- building the timeline ---------------------------------------------------------------------------------
    def seconds_to_block(self, seconds: float) -> int:
        return block_at_frame(round(seconds * self.fps), self.block_latents)

    def add(self, event: PromptEvent) -> PromptEvent:
        with self._lock:
            self._events.append(event)
            self._events.sort(key=lambda e: (e.block, e.source == "live"))  # stable: later pushes win ties
        return event

    def add_shot(self, at_seconds: float, prompt: str, transition: str = STORYBOARD_DEFAULT,
                 blend_seconds: float = 0.0, shot: int | None = None, seed: int | None = None,
                 negative: str | None = None) -> PromptEvent:
        blocks = 0
        if check_transition(transition) == BLEND:
            blocks = max(1, round(blend_seconds * self.fps / (4 * self.block_latents)))
        return self.add(PromptEvent(self.seconds_to_block(at_seconds), prompt, self.identities.resolve(prompt),
                                    transition, blocks, "storyboard", shot, seed, negative))

    def push(self, prompt: str, at: int | None = None, transition: str = LIVE_DEFAULT, blend_blocks: int = 2,
             seed: int | None = None, negative: str | None = None) -> PromptEvent:
        """Live prompt: applies from block `at`, default the next block not yet generated; a `switch` unless
        `transition` says otherwise. Thread-safe. negative: its negative prompt (None = the buffer's default)."""
        if not prompt.strip():
            raise ValueError("a live prompt must not be empty")
        check_transition(transition)
        resolved = self.identities.resolve(prompt)
        with self._lock:
            block = self._next_block if at is None else max(at, self._next_block)
        blocks = blend_blocks if transition == BLEND else 0
        return self.add(PromptEvent(block, prompt, resolved, transition, blocks, "live", seed=seed,
                                    negative=negative))

    @property
    def events(self) -> list[PromptEvent]:
        with self._lock:
            return list(self._events)

    @property
    def next_block(self) -> int:
        with self._lock:
            return self._next_block

    # -- conditioning ------------------------------------------------------------------------------------------------
    def embedding(self, resolved_prompt: str) -> Tensor:
        """Text features for a prompt, cached per prompt."""
        if resolved_prompt not in self._embeddings:
            self._embeddings[resolved_prompt] = self._encode([resolved_prompt])
        return self._embeddings[resolved_prompt]

    def active_index(self, block: int, events: list[PromptEvent] | None = None) -> int:
        events = self.events if events is None else events
        idx = [i for i, e in enumerate(events) if e.block <= block]
        if not idx:
            raise ValueError("no prompt covers block 0: the first shot must start at 0s")
        return idx[-1]

    def conditioning(self, block: int) -> BlockConditioning:
        """Conditioning of one block; marks the block as handed out (live pushes go after it)."""
        with self._lock:
            self._next_block = max(self._next_block, block + 1)
            events = list(self._events)
        i = self.active_index(block, events)
        ev = events[i]
        prev = events[i - 1] if i > 0 else None
        ctx = self.embedding(ev.resolved)
        weight, prev_prompt, key = 1.0, None, ev.resolved
        if ev.transition == BLEND and prev is not None and block - ev.block < ev.blend_blocks:
            weight = (block - ev.block + 1) / (ev.blend_blocks + 1)
            prev_prompt = prev.resolved
            ctx = (1 - weight) * self.embedding(prev.resolved) + weight * ctx
            key = f"{prev.resolved} -> {ev.resolved} @ {weight:.4f}"
        starts = ev.block == block and block > 0 and prev is not None
        negative = self.identities.resolve(self.negative if ev.negative is None else ev.negative)
        if negative:
            key = f"{key} || negative: {negative}"
        return BlockConditioning(block, i, ev.resolved, ctx, key, weight, prev_prompt,
                                 switched=starts and ev.transition == SWITCH, seed=ev.seed,
                                 new_shot=starts and ev.transition == CUT, negative=negative)

    def first_cut(self, start: int, stop: int) -> int | None:
        """The first block in [start, stop) where a `cut` starts a new shot (None if none), as far as the events
        known now say; a backend that fixes several blocks at once (a clip) asks before it reads them."""
        events = self.events
        for ev in events:
            if start <= ev.block < stop and ev.block > 0 and ev.transition == CUT:
                if events[self.active_index(ev.block, events)] is ev:  # a later event at the same block wins
                    return ev.block
        return None

    def restore_position(self, next_block: int) -> None:
        """Used when resuming a render: blocks before next_block are already generated."""
        with self._lock:
            self._next_block = next_block
