"""Attention topologies for the Wan DiT: block-causal masks, the rolling KV cache with an attention sink,
and the cross-attention cache.

Frames are *latent* frames throughout. A token belongs to the frame it was patchified from; all tokens of a frame
share one frame id. The same rule decides who may attend to whom in training (a dense mask over the whole sequence)
and in cached inference (keys = cached frames + the new frames), so the two give the same numbers:

    allowed(q, k) =  block(k) <= block(q)                                   (block-causal; dropped if bidirectional)
                 and (window is None  or  k < sink  or  k >= block_end(q) - (window - sink))

`window` is the total attention span in frames (sink + past + the current block, LongLive's `local_attn_size`);
`sink` frames are the first frames ever written and are never evicted.

The KV cache keeps exactly what the next block can see. With W = window, S = sink and n = block frames, a block
attends to the sink, the R = W - S - n frames before it and itself, so after each committed block the cache holds
the sink + the R most recent frames, and each layer owns one buffer of W frames, allocated once:

    slots [0, S)     the sink, pinned
    slots [S, W)     a ring of W - S slots: the R most recent frames + n free slots, where the next block's K/V go

The next block's call then needs no mask and no copy: its keys are the buffer itself (attention does not depend on
the order of its keys). Keys are stored already rotated by RoPE at their absolute frame position, so nothing is
re-rotated per call. `rope_mode="rebase"` (positions re-based inside the window) only moves the sink relative to
the window: queries and window keys keep absolute positions (RoPE sees only position differences) and the sink is
re-rotated, from an un-rotated copy, when the window slides. Calls that do not fit this pattern (a query of several
blocks, a re-cache, a gap) take the general path: cached keys + new keys, with a dense mask where one is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from lvstudio.models.rope import apply_rope

RopeMode = Literal["absolute", "rebase"]


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


Run = tuple[int, int, int]  # (first buffer token, first token among the call's new tokens, token count)


def _runs(slots: list[int], which: list[int], tokens_per_frame: int) -> list[Run]:
    """Contiguous token copies that put new frame j (for j in `which`) into buffer slot slots[j]."""
    lf = tokens_per_frame
    runs: list[list[int]] = []
    for j in which:
        dst, src = slots[j] * lf, j * lf
        if runs and runs[-1][0] + runs[-1][2] == dst and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += lf
        else:
            runs.append([dst, src, lf])
    return [(a, b, c) for a, b, c in runs]


def _run_index(runs: list[Run], device: torch.device) -> Tensor:
    """Buffer token indices of the new tokens, in their order: [sum of counts] int64."""
    return torch.cat([torch.arange(dst, dst + n, device=device) for dst, _, n in runs])


@dataclass
class _LayerKV:
    """One layer's buffers, allocated once; tokens are laid out frame by frame in slot order."""

    k: Tensor  # [B, C*L, heads, head_dim] keys, RoPE applied at absolute frame positions (sink: see rebase)
    v: Tensor  # [B, C*L, heads, head_dim]
    sink_raw: Tensor | None = None  # [B, S*L, heads, head_dim] un-rotated sink keys (rope_mode="rebase" only)
    sink_shift: int | None = None  # rebase: the k slots hold sink frame i rotated at position i + sink_shift


@dataclass
class _Layout:
    """Which frame sits in which buffer slot."""

    frame_ids: list[int] = field(default_factory=list)  # absolute frame ids in write order, sink frames first
    slots: list[int] = field(default_factory=list)  # buffer slot of each frame
    num_sink: int = 0  # how many of the frames are sink frames
    ring_next: int = 0  # ring position (slot - S) the next non-sink frame is written to


@dataclass
class CachePlan:
    """How one forward call reads and writes the cache; made once by `KVCache.plan`, used by every layer."""

    frames: list[int]  # absolute ids of the call's new (query) frames
    write: bool  # commit the new frames after the call
    in_buffer: bool  # keys = the buffer's first `used_tokens` tokens, with the new frames put in free slots
    used_tokens: int
    new_runs: list[Run]  # in_buffer: where the new frames' K/V go
    live_tokens: int  # general path: the cached keys are the buffer's first `live_tokens` tokens ...
    live_index: Tensor | None  # ... or, when not None, these buffer token indices [live tokens] int64
    mask: Tensor | None  # [Fq, Fk] frame mask over the keys in the order attention gets them; None = all visible
    store_runs: list[Run]  # write: new frames that stay cached
    sink_runs: list[Run]  # write, rebase: new frames that become sink frames (their un-rotated keys are kept)
    capacity: int  # buffer frames this call needs
    sink_shift: int | None  # rebase: during this call sink frame i sits at position i + sink_shift
    sink_positions: list[int] | None  # rebase: positions to re-rotate the cached sink to (None: nothing moves)
    after: _Layout  # the layout once the call is committed
    sink_rotation: Tensor | None = None  # complex RoPE rotation for `sink_positions` (set by the model)


@dataclass
class KVCache:
    """Per-layer self-attention K/V of committed frames: the sink plus the frames the next block can see.

    Each layer's buffer holds `window_frames` frames and is allocated on first use, with the batch, dtype and device
    of the K/V written, so memory is constant however long the rollout grows; without a window it grows by
    doubling. `state_dict()` holds only the live frames.
    """

    num_layers: int
    spec: AttentionSpec
    tokens_per_frame: int
    layers: list[_LayerKV | None] = field(default_factory=list)
    layout: _Layout = field(default_factory=_Layout)
    rope_mode: RopeMode | None = None  # set by the first call on an empty cache; one cache, one mode

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    # -- introspection -------------------------------------------------------------------------------------------
    @property
    def frame_ids(self) -> list[int]:
        """Absolute frame index of each cached frame, sink first, then oldest to newest."""
        return self.layout.frame_ids

    @property
    def num_sink(self) -> int:
        return self.layout.num_sink

    @property
    def num_frames(self) -> int:
        return len(self.layout.frame_ids)

    @property
    def end_frame(self) -> int:
        """One past the last frame written (0 when empty)."""
        return self.layout.frame_ids[-1] + 1 if self.layout.frame_ids else 0

    @property
    def ring_frames(self) -> int | None:
        """Slots after the sink: window - sink (None: unbounded)."""
        w = self.spec.window_frames
        return None if w is None else w - self.spec.sink_frames

    @property
    def keep_frames(self) -> int | None:
        """Non-sink frames kept after a commit: those the next block sees besides itself (None: all)."""
        ring = self.ring_frames
        return None if ring is None else ring - (self.spec.block_frames or 1)

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated, not only live)."""
        total = 0
        for kv in self.layers:
            if kv is not None:
                total += sum(t.numel() * t.element_size() for t in (kv.k, kv.v, kv.sink_raw) if t is not None)
        return total

    def reset(self) -> None:
        """Forget every frame (the buffers stay allocated)."""
        self.layout = _Layout()
        self.rope_mode = None
        for kv in self.layers:
            if kv is not None:
                kv.sink_shift = None

    def keep_only_sink(self) -> None:
        """Drop everything but the sink frames (used by re-cache with a global sink)."""
        lay = self.layout
        self.layout = _Layout(lay.frame_ids[: lay.num_sink], lay.slots[: lay.num_sink], lay.num_sink, 0)

    # -- planning a call -------------------------------------------------------------------------------------------
    def _place(self, frames: list[int]) -> tuple[_Layout, list[int], list[bool]]:
        """Layout after appending `frames` and evicting; the slot of each new frame; whether each stays cached.

        New frames fill the sink while every cached frame is a sink frame; the others go round the ring. Eviction
        keeps the sink and the `keep_frames` newest frames, which sit in distinct ring slots.
        """
        lay = self.layout
        s_max, ring = self.spec.sink_frames, self.ring_frames
        ids, slots, n_sink, nxt = list(lay.frame_ids), list(lay.slots), lay.num_sink, lay.ring_next
        new_slots = []
        for f in frames:
            if n_sink < s_max and len(ids) == n_sink:
                slot = n_sink
                n_sink += 1
            else:
                slot = s_max + nxt
                nxt = nxt + 1 if ring is None else (nxt + 1) % ring
            ids.append(f)
            slots.append(slot)
            new_slots.append(slot)
        drop = 0 if self.keep_frames is None else max(0, len(ids) - n_sink - self.keep_frames)
        del ids[n_sink : n_sink + drop], slots[n_sink : n_sink + drop]
        old = len(lay.frame_ids)
        kept = [not (n_sink <= old + j < n_sink + drop) for j in range(len(frames))]
        return _Layout(ids, slots, n_sink, nxt), new_slots, kept

    def plan(self, frames: list[int], attention: AttentionSpec, *, write: bool, rope_mode: RopeMode) -> CachePlan:
        """Where this call's keys come from and where its new K/V go. frames: absolute ids of the new frames."""
        lay, lf = self.layout, self.tokens_per_frame
        if lay.frame_ids and rope_mode != self.rope_mode:
            raise ValueError(f"this KV cache was written with rope_mode={self.rope_mode!r}, not {rope_mode!r}; "
                             "use one rope_mode per cache (reset() it to change)")
        self.rope_mode = rope_mode
        if write and lay.frame_ids and frames[0] < self.end_frame:
            raise ValueError(f"frames from {frames[0]} are already cached (cache ends at {self.end_frame}); "
                             "use WanDiT.recache() to re-encode cached frames")
        after, new_slots, kept = self._place(frames)
        n_live, used = len(lay.slots), len(lay.slots) + len(frames)
        # The cache's window and sink decide which cached frames stay visible.
        spec = replace(attention, window_frames=self.spec.window_frames, sink_frames=self.spec.sink_frames)
        queries = torch.tensor(frames, dtype=torch.int64)
        store = [j for j in range(len(frames)) if kept[j]] if write else []
        sink_new = [j for j in store if new_slots[j] < self.spec.sink_frames] if rope_mode == "rebase" else []
        # Rebase: queries and window keys keep absolute positions; sink frame i must sit at i + shift, where
        # shift = (first non-sink frame) - (number of sink frames), as if the window started right after the sink.
        shift = positions = None
        if rope_mode == "rebase" and (lay.num_sink or sink_new):
            shift = min(lay.frame_ids[lay.num_sink :] + frames) - lay.num_sink
            moved = any(kv is None or kv.sink_shift != shift for kv in self.layers)
            positions = [shift + i for i in range(lay.num_sink)] if lay.num_sink and moved else None
        capacity = self.spec.window_frames or max(lay.slots + new_slots) + 1
        common = {"frames": frames, "write": write, "capacity": capacity, "sink_shift": shift,
                  "sink_positions": positions, "after": after, "store_runs": _runs(new_slots, store, lf),
                  "sink_runs": _runs(new_slots, sink_new, lf)}
        # Step 1: the steady state. The new frames fit in free slots, cached + new frames fill the buffer's first
        # `used` slots and every query sees every key: attention reads the buffer as it is, with no mask.
        occupied = set(lay.slots) | set(new_slots)
        if len(occupied) == used and max(occupied) == used - 1:
            by_slot = [0] * used
            for f, s in zip(lay.frame_ids + frames, lay.slots + new_slots, strict=True):
                by_slot[s] = f
            if bool(frame_mask(queries, torch.tensor(by_slot, dtype=torch.int64), spec).all()):
                everything = list(range(len(frames)))
                return CachePlan(in_buffer=True, used_tokens=used * lf, new_runs=_runs(new_slots, everything, lf),
                                 live_tokens=0, live_index=None, mask=None, **common)
        # Step 2: the general case: the cached keys (slot order), then the new keys, masked where needed.
        order = sorted(range(n_live), key=lay.slots.__getitem__)
        live_slots = [lay.slots[i] for i in order]
        keys = torch.tensor([lay.frame_ids[i] for i in order] + frames, dtype=torch.int64)
        allowed = frame_mask(queries, keys, spec)
        live_index = None
        if live_slots != list(range(n_live)):
            live_index = torch.cat([torch.arange(s * lf, (s + 1) * lf) for s in live_slots])
        return CachePlan(in_buffer=False, used_tokens=0, new_runs=[], live_tokens=n_live * lf, live_index=live_index,
                         mask=None if bool(allowed.all()) else allowed, **common)

    # -- per layer -------------------------------------------------------------------------------------------------
    def _buffers(self, layer: int, like: Tensor, frames: int) -> _LayerKV:
        """The layer's buffers for keys like `like` [B, L, heads, head_dim], at least `frames` frames long."""
        lf = self.tokens_per_frame
        b, _, h, d = like.shape
        kv = self.layers[layer]
        if kv is not None and (kv.k.shape[0], kv.k.shape[2], kv.k.shape[3]) != (b, h, d):
            if self.layout.frame_ids:
                raise ValueError(f"the KV cache holds K/V of shape [B={kv.k.shape[0]}, heads={kv.k.shape[2]}, "
                                 f"head_dim={kv.k.shape[3]}], this call has [B={b}, heads={h}, head_dim={d}]")
            kv = None
        if kv is None:
            kv = _LayerKV(like.new_zeros(b, frames * lf, h, d), like.new_zeros(b, frames * lf, h, d))
        elif kv.k.device != like.device or kv.k.dtype != like.dtype:  # e.g. a snapshot loaded on the CPU
            raw = None if kv.sink_raw is None else kv.sink_raw.to(like)
            kv = _LayerKV(kv.k.to(like), kv.v.to(like), raw, kv.sink_shift)
        if kv.k.shape[1] < frames * lf:  # unbounded window: grow by doubling
            size = max(frames * lf, 2 * kv.k.shape[1])
            k, v = like.new_zeros(b, size, h, d), like.new_zeros(b, size, h, d)
            k[:, : kv.k.shape[1]], v[:, : kv.v.shape[1]] = kv.k, kv.v
            kv = _LayerKV(k, v, kv.sink_raw, kv.sink_shift)
        if self.rope_mode == "rebase" and self.spec.sink_frames and kv.sink_raw is None:
            kv.sink_raw = like.new_zeros(b, self.spec.sink_frames * lf, h, d)
        self.layers[layer] = kv
        return kv

    def layer_kv(self, layer: int, plan: CachePlan, k: Tensor, v: Tensor, k_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values one layer attends to, given its new frames' k (RoPE applied), v and k before RoPE.

        k, v, k_raw: [B, Lq, heads, head_dim]. Returns keys, values [B, Lk, heads, head_dim] in the order of the
        plan's mask columns. With `plan.write`, the new frames that stay cached are stored (detached).
        """
        kv = self._buffers(layer, k, plan.capacity)
        # Step 1 (rebase): rotate the cached sink to where this call's window puts it.
        if plan.sink_rotation is not None and kv.sink_shift != plan.sink_shift and kv.sink_raw is not None:
            n = self.layout.num_sink * self.tokens_per_frame
            kv.k[:, :n] = apply_rope(kv.sink_raw[:, :n], plan.sink_rotation)
        if plan.sink_shift is not None:
            kv.sink_shift = plan.sink_shift
        # Step 2: the keys and values attention reads.
        stored = False
        if plan.in_buffer and not (k.requires_grad or v.requires_grad):
            for dst, src, n in plan.new_runs:  # the new frames go straight into free slots
                kv.k[:, dst : dst + n] = k[:, src : src + n]
                kv.v[:, dst : dst + n] = v[:, src : src + n]
            keys, values = kv.k[:, : plan.used_tokens], kv.v[:, : plan.used_tokens]
            stored = True
        elif plan.in_buffer:  # training: the same layout, copied so that the graph reaches k and v
            idx = _run_index(plan.new_runs, k.device)
            keys = kv.k[:, : plan.used_tokens].index_copy(1, idx, k)
            values = kv.v[:, : plan.used_tokens].index_copy(1, idx, v)
        else:
            if plan.live_index is None:
                live_k, live_v = kv.k[:, : plan.live_tokens], kv.v[:, : plan.live_tokens]
            else:
                plan.live_index = plan.live_index.to(k.device)  # moved once, for every layer
                live_k, live_v = kv.k.index_select(1, plan.live_index), kv.v.index_select(1, plan.live_index)
            keys, values = torch.cat([live_k, k], dim=1), torch.cat([live_v, v], dim=1)
        # Step 3: keep the new frames that stay cached (and, in rebase mode, the new sink frames un-rotated).
        if plan.write:
            if not stored:
                for dst, src, n in plan.store_runs:
                    kv.k[:, dst : dst + n] = k[:, src : src + n].detach()
                    kv.v[:, dst : dst + n] = v[:, src : src + n].detach()
            for dst, src, n in plan.sink_runs:
                kv.sink_raw[:, dst : dst + n] = k_raw[:, src : src + n].detach()  # type: ignore[index]
        return keys, values

    def commit(self, plan: CachePlan) -> None:
        """Record the frames a writing call stored in every layer (call after the last layer)."""
        if plan.write:
            self.layout = plan.after

    # -- snapshot ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The live frames only, in write order, plus where each sits (so a resumed run computes identically)."""
        lay, lf = self.layout, self.tokens_per_frame
        out: dict[str, Tensor] = {
            "format": torch.tensor(2),
            "frame_ids": torch.tensor(lay.frame_ids, dtype=torch.int64),
            "slots": torch.tensor(lay.slots, dtype=torch.int64),
            "num_sink": torch.tensor(lay.num_sink),
            "ring_next": torch.tensor(lay.ring_next),
            "rope_mode": torch.tensor(_ROPE_CODES[self.rope_mode]),
        }
        if not lay.frame_ids:
            return out
        for i, kv in enumerate(self.layers):
            if kv is None:
                continue
            idx = torch.cat([torch.arange(s * lf, (s + 1) * lf, device=kv.k.device) for s in lay.slots])
            out[f"{i}.k"] = kv.k.index_select(1, idx)
            out[f"{i}.v"] = kv.v.index_select(1, idx)
            if kv.sink_raw is not None and lay.num_sink:
                out[f"{i}.sink_raw"] = kv.sink_raw[:, : lay.num_sink * lf].clone()
            if kv.sink_shift is not None:
                out[f"{i}.sink_shift"] = torch.tensor(kv.sink_shift)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "slots" not in state:
            raise ValueError("this KV-cache snapshot comes from an older lvstudio (keys stored without RoPE) and "
                             "cannot be resumed by this version; start the render again")
        self.reset()
        self.layers = [None] * self.num_layers
        ids = [int(x) for x in state["frame_ids"].tolist()]
        slots = [int(x) for x in state["slots"].tolist()]
        self.layout = _Layout(ids, slots, int(state["num_sink"]), int(state["ring_next"]))
        self.rope_mode = _ROPE_MODES[int(state["rope_mode"])]
        lf = self.tokens_per_frame
        frames = self.spec.window_frames or (max(slots) + 1 if slots else 0)
        for i in range(self.num_layers):
            if f"{i}.k" not in state:
                continue
            k, v = state[f"{i}.k"], state[f"{i}.v"]
            b, _, h, d = k.shape
            idx = torch.cat([torch.arange(s * lf, (s + 1) * lf, device=k.device) for s in slots])
            kv = _LayerKV(k.new_zeros(b, frames * lf, h, d), v.new_zeros(b, frames * lf, h, d))
            kv.k.index_copy_(1, idx, k)
            kv.v.index_copy_(1, idx, v)
            if f"{i}.sink_raw" in state:
                raw = state[f"{i}.sink_raw"]
                kv.sink_raw = raw.new_zeros(b, self.spec.sink_frames * lf, h, d)
                kv.sink_raw[:, : raw.shape[1]] = raw
            if f"{i}.sink_shift" in state:
                kv.sink_shift = int(state[f"{i}.sink_shift"])
            self.layers[i] = kv


_ROPE_CODES: dict[RopeMode | None, int] = {None: 0, "absolute": 1, "rebase": 2}
_ROPE_MODES: dict[int, RopeMode | None] = {v: k for k, v in _ROPE_CODES.items()}


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
