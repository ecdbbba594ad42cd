"""Attention topologies for the Wan DiT: block-causal masks, the rolling KV cache with an attention sink,
and the cross-attention cache.

Frames are *latent* frames throughout. A token belongs to the frame it was patchified from; all tokens of a frame
share one frame id. The same rule decides who may attend to whom in training (a dense mask over the whole sequence)
and in cached inference (keys = cached frames + the new frames), so the two give the same numbers:

    allowed(q, k) =  block(k) <= block(q)                                   (block-causal; dropped if bidirectional)
                 and (window is None  or  k < sink  or  k >= block_end(q) - (window - sink))

`window` is the total attention span in frames (sink + past + the current block, LongLive's `local_attn_size`);
`sink` frames are the first frames ever written and are never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionSpec:
    """How frames may attend to each other.

    block_frames: latent frames per causal block; None means bidirectional.
    window_frames: total attention span in frames (sink + past + current block); None means unbounded.
    sink_frames: number of first frames that stay visible forever (attention sink).
    """

    block_frames: int | None = None
    window_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self) -> None:
        if self.block_frames is not None and self.block_frames < 1:
            raise ValueError(f"block_frames must be >= 1 (got {self.block_frames})")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0 (got {self.sink_frames})")
        if self.window_frames is not None:
            need = self.sink_frames + (self.block_frames or 1)
            if self.window_frames < need:
                raise ValueError(
                    f"window_frames={self.window_frames} is smaller than sink_frames + block_frames = {need}; "
                    "the window must hold the sink and the block being generated"
                )


def frame_mask(query_frames: Tensor, key_frames: Tensor, spec: AttentionSpec) -> Tensor:
    """Boolean [Fq, Fk] mask (True = attend) between absolute query frame ids and key frame ids (int64).

    Key frames are listed in write order, so the first `spec.sink_frames` of them are the sink (normally frames
    0..S-1; after a re-cache without a global sink, the first re-encoded frames).
    """
    q = query_frames[:, None]  # [Fq, 1]
    k = key_frames[None, :]  # [1, Fk]
    if spec.block_frames is not None:
        q_block = torch.div(query_frames, spec.block_frames, rounding_mode="floor")
        allowed = torch.div(k, spec.block_frames, rounding_mode="floor") <= q_block[:, None]
        q_end = (q_block + 1) * spec.block_frames  # exclusive end frame of each query's block
    else:
        allowed = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
        q_end = query_frames.new_full(query_frames.shape, int(query_frames.max()) + 1)
    if spec.window_frames is not None:
        recent = k >= (q_end[:, None] - (spec.window_frames - spec.sink_frames))
        is_sink = torch.zeros_like(recent)
        is_sink[:, : spec.sink_frames] = True
        allowed = allowed & (is_sink | recent)
    return allowed


def token_mask(frame_allowed: Tensor, q_tokens_per_frame: int, k_tokens_per_frame: int) -> Tensor:
    """Expand a [Fq, Fk] frame mask to a [Fq*Lq, Fk*Lk] token mask."""
    return frame_allowed.repeat_interleave(q_tokens_per_frame, 0).repeat_interleave(k_tokens_per_frame, 1)


def sequence_mask(num_frames: int, tokens_per_frame: int, spec: AttentionSpec, start_frame: int = 0) -> Tensor | None:
    """Dense token mask for a whole sequence (training / full-sequence reference); None when nothing is masked."""
    if spec.block_frames is None and spec.window_frames is None:
        return None
    frames = torch.arange(start_frame, start_frame + num_frames)
    return token_mask(frame_mask(frames, frames, spec), tokens_per_frame, tokens_per_frame)


@dataclass
class _LayerKV:
    k: Tensor  # [B, S, heads, head_dim], RoPE *not* applied (positions are applied when read)
    v: Tensor  # [B, S, heads, head_dim]


@dataclass
class KVCache:
    """Per-layer self-attention K/V of committed frames: the sink plus a rolling window of recent frames.

    Keys are stored without RoPE so that positions can be absolute (default) or re-based inside the window.
    Capacity is fixed: `sink_frames + (window_frames - sink_frames)` frames, so memory is constant however long
    the rollout grows.
    """

    num_layers: int
    spec: AttentionSpec
    tokens_per_frame: int
    layers: list[_LayerKV | None] = field(default_factory=list)
    frame_ids: list[int] = field(default_factory=list)  # absolute frame index of each cached frame, in order
    num_sink: int = 0  # how many of the cached frames are sink frames

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    # -- introspection -------------------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)

    @property
    def end_frame(self) -> int:
        """One past the last frame written (0 when empty)."""
        return self.frame_ids[-1] + 1 if self.frame_ids else 0

    def nbytes(self) -> int:
        return sum(kv.k.numel() * kv.k.element_size() * 2 for kv in self.layers if kv is not None)

    def reset(self) -> None:
        self.layers = [None] * self.num_layers
        self.frame_ids = []
        self.num_sink = 0

    def keep_only_sink(self) -> None:
        """Drop everything but the sink frames (used by re-cache with a global sink)."""
        keep = self.num_sink * self.tokens_per_frame
        self.layers = [None if kv is None else _LayerKV(kv.k[:, :keep], kv.v[:, :keep]) for kv in self.layers]
        self.frame_ids = self.frame_ids[: self.num_sink]

    # -- read / write (called by the attention layers) ---------------------------------------------------------
    def read(self, layer: int) -> tuple[Tensor, Tensor] | None:
        kv = self.layers[layer]
        return None if kv is None else (kv.k, kv.v)

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Append new frames' K/V for one layer; eviction is applied by `commit_frames` after the last layer."""
        kv = self.layers[layer]
        self.layers[layer] = _LayerKV(k, v) if kv is None else _LayerKV(torch.cat([kv.k, k], 1), torch.cat([kv.v, v], 1))

    def commit_frames(self, new_frame_ids: list[int]) -> None:
        """Record the frames appended to every layer, fill the sink, and evict the oldest non-sink frames."""
        for f in new_frame_ids:
            self.frame_ids.append(f)
            if self.num_sink < self.spec.sink_frames and len(self.frame_ids) == self.num_sink + 1:
                self.num_sink += 1
        if self.spec.window_frames is None:
            return
        capacity = self.num_sink + (self.spec.window_frames - self.spec.sink_frames)
        excess = len(self.frame_ids) - capacity
        if excess <= 0:
            return
        # Keep sink frames, drop the `excess` oldest frames after them.
        lf = self.tokens_per_frame
        s, e = self.num_sink * lf, (self.num_sink + excess) * lf
        for i, kv in enumerate(self.layers):
            if kv is not None:
                self.layers[i] = _LayerKV(torch.cat([kv.k[:, :s], kv.k[:, e:]], 1), torch.cat([kv.v[:, :s], kv.v[:, e:]], 1))
        self.frame_ids = self.frame_ids[: self.num_sink] + self.frame_ids[self.num_sink + excess :]

    # -- snapshot ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {
            "frame_ids": torch.tensor(self.frame_ids, dtype=torch.int64),
            "num_sink": torch.tensor(self.num_sink),
        }
        for i, kv in enumerate(self.layers):
            if kv is not None:
                out[f"{i}.k"] = kv.k.contiguous()
                out[f"{i}.v"] = kv.v.contiguous()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.reset()
        self.frame_ids = [int(x) for x in state["frame_ids"].tolist()]
        self.num_sink = int(state["num_sink"])
        for i in range(self.num_layers):
            if f"{i}.k" in state:
                self.layers[i] = _LayerKV(state[f"{i}.k"], state[f"{i}.v"])


@dataclass
class CrossAttnCache:
    """Per-layer cross-attention K/V for one conditioning (text, and image tokens for i2v).

    Filled on first use; `reset()` whenever the conditioning changes (a prompt switch or a new blend weight).
    """

    num_layers: int
    layers: list[tuple[Tensor, ...] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    @property
    def is_filled(self) -> bool:
        return all(x is not None for x in self.layers)

    def reset(self) -> None:
        self.layers = [None] * self.num_layers
