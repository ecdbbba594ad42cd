"""ERFT cross-clip backend: clip sizes, latent carry-over, a cut ends the clip and starts one without carried latents,
continuity across clips on the tiny preset (what every backend must do is in test_backend_conformance.py)."""

from __future__ import annotations

import pytest
import torch

from lvstudio.backends.erft_crossclip import ERFTCrossClipBackend
from lvstudio.presets import CrossClipSettings
from lvstudio.prompt_stream import PromptStreamBuffer
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 1, cut_at: float | None = None, transition: str = "cut",
             anchors=None) -> ERFTCrossClipBackend:  # noqa: ANN001
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    if cut_at is not None:
        buf.add_shot(cut_at, "a blue cube on the grass", transition)
    st = CrossClipSettings(clip_frames=6, carry_frames=2, steps=2)
    return ERFTCrossClipBackend(bundle, buf, seed=seed, width=32, height=32, settings=st, anchors=anchors)


def test_clips_carry_latents() -> None:
    be = _backend(random_bundle())
    chunks = [be.step() for _ in range(3)]
    assert [c.latents.shape[2] for c in chunks] == [6, 4, 4]  # the first clip has no carried frames
    assert [c.num_frames for c in chunks] == [21, 16, 16]
    assert [c.frame_start for c in chunks] == [0, 21, 37]
    assert [c.block for c in chunks] == [0, 3, 5]
    assert torch.equal(be.carry, chunks[-1].latents[:, :, -2:])


def test_a_cut_ends_the_clip_and_starts_one_without_carried_latents() -> None:
    from lvstudio.caches import AnchorCache, CachedAnchor

    anchors = AnchorCache()
    anchors.add(CachedAnchor(0, "image:start.png", torch.randn(1, 4, 2, 4, 4)))  # shot 1's reference, not shot 2's
    be = _backend(random_bundle(), cut_at=1.5, anchors=anchors)  # block 4: inside the clip of blocks 3-4
    cut = be.buffer.seconds_to_block(1.5)
    prefixes = []
    real = be.dit.forward

    def spy(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        prefixes.append(x.shape[2])
        return real(x, *args, **kwargs)

    be.dit.forward = spy  # type: ignore[method-assign]
    chunks = [be.step() for _ in range(5)]
    assert cut == 4 and [c.block for c in chunks] == [0, 3, 4, 7, 9]
    assert [c.latents.shape[2] for c in chunks] == [6, 2, 6, 4, 4]  # the clip before the cut ends at it
    assert [c.new_shot for c in chunks] == [False, False, True, False, False]
    # Model inputs per clip (2 steps each): [reference] + [carry] + new frames. The cut's clip has neither (shot 1's
    # anchor is not used); afterwards the new shot's own first latent is the reference.
    assert prefixes == [6] * 2 + [1 + 2 + 2] * 2 + [6] * 2 + [1 + 2 + 4] * 4
    assert torch.equal(be.first, chunks[2].latents[:, :, :1]) and be.shot_block == cut


def test_a_switch_keeps_the_carried_latents() -> None:
    be = _backend(random_bundle(), cut_at=1.5, transition="switch")
    chunks = [be.step() for _ in range(4)]
    assert [c.latents.shape[2] for c in chunks] == [6, 4, 4, 4]  # a switch inside a clip shows from the next one
    assert not any(c.new_shot for c in chunks) and be.first is not None and be.shot_block == 0


@pytest.mark.slow
def test_clip_boundaries_are_continuous_on_the_tiny_preset() -> None:
    """The first frames of clip k+1 continue clip k: the frame difference across a clip boundary is of the size of
    the differences across latent boundaries inside a clip (each latent decodes to 4 frames, and v2's decoder changes
    the picture mostly between latents); without the carried latents and the reference it jumps (about 10x)."""
    import numpy as np

    from lvstudio.presets.load import load_bundle

    torch.set_num_threads(1)
    bundle = load_bundle("tiny")

    def latent_steps(clip: np.ndarray) -> list[float]:
        """Frame differences where a new latent starts inside the clip (a first latent of 1 frame when 4k + 1)."""
        diffs = np.abs(np.diff(clip, axis=0)).mean(axis=(1, 2, 3))
        starts = range(1, len(clip), 4) if len(clip) % 4 == 1 else range(4, len(clip), 4)
        return [float(diffs[s - 1]) for s in starts]

    def boundaries(settings: CrossClipSettings) -> tuple[list[float], float]:
        buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
        buf.add_shot(0.0, "a red ball bouncing over the sea")
        be = ERFTCrossClipBackend(bundle, buf, seed=0, width=128, height=128, settings=settings)
        clips = [be.step().frames.astype(np.float32) / 255 for _ in range(3)]
        inside = float(np.median([d for c in clips for d in latent_steps(c)]))
        return [float(np.abs(clips[k + 1][0] - clips[k][-1]).mean()) for k in range(2)], inside

    carried, inside = boundaries(bundle.preset.crossclip)
    cut, _ = boundaries(bundle.preset.crossclip.model_copy(update={"carry_frames": 0, "use_anchor": False}))
    assert max(carried) < 1.5 * inside, (carried, inside)
    assert max(carried) < 0.3 * min(cut), (carried, cut)


def test_clips_that_are_not_whole_blocks_are_a_preset_error() -> None:
    from lvstudio.errors import PresetError

    bundle = random_bundle()
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    with pytest.raises(PresetError, match="multiples of attention.block_frames"):  # exit 2, not a traceback
        ERFTCrossClipBackend(bundle, buf, seed=1, width=32, height=32,
                             settings=CrossClipSettings(clip_frames=5, carry_frames=2, steps=2))
