"""Prompt Stream Buffer: timeline -> per-block conditioning, blends, cuts, switches, identities, thread-safe live
pushes."""

from __future__ import annotations

import threading

import pytest
import torch

from lvstudio.caches import IdentityCache
from lvstudio.prompt_stream import PromptStreamBuffer, block_at_frame, block_start_frame


def _encode(prompts: list[str]) -> torch.Tensor:
    # a deterministic fake encoder: one number per prompt, so blends are easy to read
    return torch.tensor([[[float(len(p))]] for p in prompts])


def _buffer() -> PromptStreamBuffer:
    ids = IdentityCache()
    ids.add("hero", "a red ball")
    return PromptStreamBuffer(_encode, ids, block_latents=2, fps=16)


def test_block_frame_mapping_follows_the_wan_vae() -> None:
    assert [block_start_frame(b, 2) for b in range(4)] == [0, 5, 13, 21]
    for f in range(60):
        b = block_at_frame(f, 2)
        assert block_start_frame(b, 2) >= f and (b == 0 or block_start_frame(b - 1, 2) < f)


def test_shots_cuts_blends_and_identities() -> None:
    buf = _buffer()
    buf.add_shot(0.0, "{hero} over the sea")
    buf.add_shot(1.0, "{hero} on the grass", transition="blend", blend_seconds=1.0, shot=1)
    buf.add_shot(3.0, "a blue cube", shot=2)
    c0 = buf.conditioning(0)
    assert c0.prompt == "a red ball over the sea" and not c0.switched and c0.blend_weight == 1.0
    first_blend = buf.seconds_to_block(1.0)
    weights = [buf.conditioning(b).blend_weight for b in range(first_blend, first_blend + 3)]
    assert weights == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    mid = buf.conditioning(first_blend)
    a, b = len("a red ball over the sea"), len("a red ball on the grass")
    assert mid.context.item() == pytest.approx((2 / 3) * a + (1 / 3) * b)
    cut = buf.conditioning(buf.seconds_to_block(3.0))
    assert cut.new_shot and not cut.switched and cut.prompt == "a blue cube"  # storyboard shots default to a cut
    assert not any(buf.conditioning(b).new_shot for b in range(first_blend, first_blend + 3))  # a blend continues
    with pytest.raises(ValueError, match="unknown identity"):
        buf.add_shot(4.0, "{villain} appears")
    with pytest.raises(ValueError, match="cut, switch, blend"):
        buf.add_shot(4.0, "a red ball", transition="fade")


def test_cut_starts_a_new_shot_and_switch_continues_it() -> None:
    buf = _buffer()
    buf.add_shot(0.0, "a red ball")
    buf.add_shot(1.0, "a blue cube", transition="switch")
    buf.add_shot(2.0, "a green star", transition="cut")
    b1, b2 = buf.seconds_to_block(1.0), buf.seconds_to_block(2.0)
    flags = {b: (buf.conditioning(b).switched, buf.conditioning(b).new_shot) for b in range(b2 + 2)}
    assert flags[b1] == (True, False) and flags[b2] == (False, True)
    assert all(f == (False, False) for b, f in flags.items() if b not in (b1, b2))
    # The first cut in a range of blocks (a clip asks before it fixes its blocks); a later event at the block wins.
    assert buf.first_cut(0, b2) is None and buf.first_cut(0, b2 + 1) == b2 and buf.first_cut(b2 + 1, 99) is None
    buf.push("a pink ball", at=b2 + 3, transition="cut")
    assert buf.first_cut(b2 + 1, 99) == b2 + 3
    buf.push("a pink ball", at=b2 + 3)  # the live default: a switch, which wins the block
    assert buf.first_cut(b2 + 1, 99) is None and buf.conditioning(b2 + 3).switched


def test_live_push_lands_on_the_next_block_from_another_thread() -> None:
    buf = _buffer()
    buf.add_shot(0.0, "a red ball")
    for b in range(3):
        buf.conditioning(b)
    ev = {}
    t = threading.Thread(target=lambda: ev.setdefault("e", buf.push("a blue cube on the grass")))
    t.start()
    t.join()
    assert ev["e"].block == 3 and ev["e"].source == "live" and ev["e"].transition == "switch"  # the live default
    c = buf.conditioning(3)
    assert c.prompt == "a blue cube on the grass" and c.switched and not c.new_shot
    assert buf.conditioning(2).prompt == "a red ball"  # the past is unchanged
    with pytest.raises(ValueError):
        buf.push("   ")


def test_embeddings_are_cached_per_prompt() -> None:
    calls = []

    def enc(p: list[str]) -> torch.Tensor:
        calls.append(p)
        return _encode(p)

    buf = PromptStreamBuffer(enc, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball")
    for b in range(5):
        buf.conditioning(b)
    assert calls == [["a red ball"]]
