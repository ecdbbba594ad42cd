"""Streaming-DiT backend on tiny random weights: block order and sizes, a cut drains the buffer and starts a fresh one,
backend-specific DiT weights (what every backend must do is in test_backend_conformance.py)."""

from __future__ import annotations

import torch

from lvstudio.backends.streaming_dit import StreamingDiTBackend
from lvstudio.presets import StreamingSettings
from lvstudio.prompt_stream import PromptStreamBuffer, block_num_frames
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 1, cut_at: float | None = None, transition: str = "cut",
             **kw) -> StreamingDiTBackend:  # noqa: ANN001, ANN003
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    if cut_at is not None:
        buf.add_shot(cut_at, "a blue cube on the grass", transition)
    settings = StreamingSettings(buffer_chunks=3, micro_steps=2, shift=2.0, **kw)
    return StreamingDiTBackend(bundle, buf, seed=seed, width=32, height=32, settings=settings)


def test_emits_blocks_in_order_with_the_wan_frame_counts() -> None:
    be = _backend(random_bundle())
    chunks = [be.step() for _ in range(5)]
    assert [c.index for c in chunks] == [c.block for c in chunks] == list(range(5))
    assert [c.num_frames for c in chunks] == [block_num_frames(i, 2) for i in range(5)]


def _calls_per_chunk(be: StreamingDiTBackend, n: int) -> tuple[list, list[int], list[int]]:
    """Step n chunks; per chunk, the number of model calls over the buffer and the cache frames they saw."""
    calls, cache_seen = [], []
    real = be._micro_step

    def spy() -> None:
        calls[-1] += 1
        cache_seen.append(be.cache.num_frames)
        real()

    be._micro_step = spy  # type: ignore[method-assign]
    chunks = []
    for _ in range(n):
        calls.append(0)
        chunks.append(be.step())
    return chunks, calls, cache_seen


def test_a_cut_drains_the_buffer_then_starts_a_fresh_one() -> None:
    """The chunks in flight at a cut finish under the old prompt (one per shift period, nothing enters); then the KV
    cache is emptied and the new shot warms up from an empty buffer: its first chunk takes N periods."""
    be = _backend(random_bundle(), cut_at=1.0)
    cut = be.buffer.seconds_to_block(1.0)
    chunks, calls, _ = _calls_per_chunk(be, cut + 3)
    assert [c.block for c in chunks] == list(range(cut + 3))
    assert [c.prompt for c in chunks] == ["a red ball over the sea"] * cut + ["a blue cube on the grass"] * 3
    assert [c.new_shot for c in chunks] == [b == cut for b in range(cut + 3)]
    n, s = 3, 2  # buffer chunks, micro-steps
    assert calls[0] == n * s and calls[1 : cut] == [s] * (cut - 1)  # warm-up, then one period per chunk
    assert calls[cut] == n * s and calls[cut + 1 :] == [s, s]  # the new shot warms up again, then steady
    assert be.origin == 2 * cut and be.cache.frame_ids[-1] == 2 * 3 - 1  # shot-local frames, old shot gone
    # While the buffer drains, the cut's block waits (read, not in the buffer): a live prompt lands after it.
    be = _backend(random_bundle(), cut_at=1.0)
    while be.pending is None:
        be.step()
    assert be.lead_blocks == n - 1 and be.buffer.push("a red ball").block == be.next_block + be.lead_blocks == cut + 1
    assert all(ch.block < cut for ch in be.chunks) and be.pending.block == cut


def test_a_switch_hands_over_inside_the_buffer() -> None:
    be = _backend(random_bundle(), cut_at=1.0, transition="switch")
    cut = be.buffer.seconds_to_block(1.0)
    chunks, calls, cache_seen = _calls_per_chunk(be, cut + 3)
    assert calls[1:] == [2] * (cut + 2)  # no stall: the buffer never empties
    assert [c.switched for c in chunks] == [b == cut for b in range(cut + 3)] and not any(c.new_shot for c in chunks)
    assert min(cache_seen[6:]) > 0 and be.origin == 0


def test_a_missing_backend_dit_role_is_a_clear_error() -> None:
    import pytest

    from lvstudio.errors import PresetError

    bundle = random_bundle()
    with pytest.raises(PresetError, match="no 'dit_stream' file"):
        _backend(bundle, dit="dit_stream")


def test_backend_specific_dit_weights_are_used_and_checked(tmp_path) -> None:
    """`[streaming] dit = "<role>"` runs a fine-tune of the main DiT; another architecture is refused."""
    import copy
    import json

    import pytest
    from safetensors.torch import save_file

    from lvstudio.errors import PresetError
    from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
    from lvstudio.presets import FileEntry

    bundle = random_bundle()
    tuned = copy.deepcopy(bundle.dit)
    with torch.no_grad():
        tuned.head.head.weight.add_(0.05)
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"),
              metadata={"config": json.dumps(tuned.cfg.to_dict())})
    other = WanDiT(WanDiTConfig.from_dict({**bundle.dit.cfg.to_dict(), "num_layers": 1}))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata={"config": json.dumps(other.cfg.to_dict())})
    files = {"tuned": FileEntry(path="tuned.safetensors"), "other": FileEntry(path="other.safetensors")}
    bundle.preset = bundle.preset.model_copy(update={"folder": tmp_path, "files": files})
    be = _backend(bundle, dit="tuned")
    assert be.dit is not bundle.dit and bundle.dit_for("tuned") is be.dit  # loaded once, kept on the bundle
    assert not torch.equal(be.step().latents, _backend(bundle).step().latents)
    with pytest.raises(PresetError, match="another architecture"):
        _backend(bundle, dit="other")


def test_a_shots_seed_reaches_the_noise() -> None:
    """A re-roll (a switch with a new seed) changes the noise from its block on, as on the other backends."""
    plain, reroll = _backend(random_bundle()), _backend(random_bundle())
    reroll.buffer.push("a red ball over the sea", at=2, seed=5)
    a, b = [plain.step() for _ in range(4)], [reroll.step() for _ in range(4)]
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a[:2], b[:2], strict=True))
    assert not torch.equal(a[2].latents, b[2].latents)
