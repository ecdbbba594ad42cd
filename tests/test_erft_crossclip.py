"""ERFT cross-clip backend on tiny random weights: clip sizes, determinism, latent carry-over, snapshots."""

from __future__ import annotations

import torch

from lvstudio.backends.erft_crossclip import ERFTCrossClipBackend
from lvstudio.presets import CrossClipSettings
from lvstudio.prompt_stream import PromptStreamBuffer
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 1, cut_at: float | None = None) -> ERFTCrossClipBackend:
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    if cut_at is not None:
        buf.add_shot(cut_at, "a blue cube on the grass")
    st = CrossClipSettings(clip_frames=6, carry_frames=2, steps=2)
    return ERFTCrossClipBackend(bundle, buf, seed=seed, width=32, height=32, settings=st)


def test_clips_carry_latents_and_are_deterministic() -> None:
    bundle = random_bundle()
    a, b = _backend(bundle), _backend(bundle)
    ca = [a.step() for _ in range(3)]
    cb = [b.step() for _ in range(3)]
    assert [c.latents.shape[2] for c in ca] == [6, 4, 4]  # the first clip has no carried frames
    assert [c.num_frames for c in ca] == [21, 16, 16]
    assert [c.frame_start for c in ca] == [0, 21, 37]
    for x, y in zip(ca, cb):
        assert torch.equal(x.latents, y.latents)
    assert torch.equal(a.carry, ca[-1].latents[:, :, -2:])
    assert not torch.equal(_backend(bundle, seed=2).step().latents, ca[0].latents)


def test_one_prompt_per_clip_and_exact_snapshot() -> None:
    bundle = random_bundle()
    be = _backend(bundle, cut_at=2.0)
    chunks = [be.step() for _ in range(3)]
    assert chunks[0].prompt == "a red ball over the sea" and chunks[2].prompt == "a blue cube on the grass"
    ref = _backend(bundle)
    want = [ref.step().latents for _ in range(4)]
    first = _backend(bundle)
    first.step(), first.step()
    again = _backend(bundle)
    again.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert torch.equal(again.step().latents, want[2]) and torch.equal(again.step().latents, want[3])


def test_guidance_zero_is_the_unconditional_clip() -> None:
    bundle = random_bundle()
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "")
    plain = ERFTCrossClipBackend(bundle, buf, seed=1, width=32, height=32,
                                 settings=CrossClipSettings(clip_frames=6, carry_frames=2, steps=2, cfg_scale=1.0))
    buf2 = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf2.add_shot(0.0, "a red ball over the sea")
    guided0 = ERFTCrossClipBackend(bundle, buf2, seed=1, width=32, height=32,
                                   settings=CrossClipSettings(clip_frames=6, carry_frames=2, steps=2, cfg_scale=0.0))
    for _ in range(2):
        torch.testing.assert_close(guided0.step().latents, plain.step().latents, atol=1e-5, rtol=1e-5)
    assert guided0.batch == 2 and plain.batch == 1


def test_clip_boundaries_are_continuous_on_the_tiny_preset() -> None:
    """The first frames of clip k+1 continue clip k: the frame difference across a boundary is of the size of the
    differences inside a clip; without the carried latents and the reference it jumps (about 4x)."""
    import numpy as np

    from lvstudio.presets.load import load_bundle

    torch.set_num_threads(1)
    bundle = load_bundle("tiny")

    def boundaries(settings: CrossClipSettings) -> tuple[list[float], float]:
        buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
        buf.add_shot(0.0, "a red ball bouncing over the sea")
        be = ERFTCrossClipBackend(bundle, buf, seed=0, width=128, height=128, settings=settings)
        clips = [be.step().frames.astype(np.float32) / 255 for _ in range(3)]
        inside = float(np.median([np.abs(np.diff(c, axis=0)).mean() for c in clips]))
        return [float(np.abs(clips[k + 1][0] - clips[k][-1]).mean()) for k in range(2)], inside

    carried, inside = boundaries(bundle.preset.crossclip)
    cut, _ = boundaries(bundle.preset.crossclip.model_copy(update={"carry_frames": 0, "use_anchor": False}))
    assert max(carried) < 1.5 * inside, (carried, inside)
    assert max(carried) < 0.5 * min(cut), (carried, cut)
