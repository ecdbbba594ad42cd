"""Streaming-DiT backend on tiny random weights: determinism, constant buffer memory, prompt changes enter with chunks."""

from __future__ import annotations

import torch

from lvstudio.backends.streaming_dit import StreamingDiTBackend
from lvstudio.presets import StreamingSettings
from lvstudio.prompt_stream import PromptStreamBuffer, block_num_frames
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 1, cut_at: float | None = None, **kw) -> StreamingDiTBackend:
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    if cut_at is not None:
        buf.add_shot(cut_at, "a blue cube on the grass")
    settings = StreamingSettings(buffer_chunks=3, micro_steps=2, shift=2.0, **kw)
    return StreamingDiTBackend(bundle, buf, seed=seed, width=32, height=32, settings=settings)


def test_deterministic_and_emits_blocks_in_order() -> None:
    bundle = random_bundle()
    a, b = _backend(bundle), _backend(bundle)
    ca = [a.step() for _ in range(5)]
    cb = [b.step() for _ in range(5)]
    assert [c.index for c in ca] == list(range(5))
    assert [c.num_frames for c in ca] == [block_num_frames(i, 2) for i in range(5)]
    for x, y in zip(ca, cb):
        assert torch.equal(x.latents, y.latents)
    assert not torch.equal(_backend(bundle, seed=2).step().latents, ca[0].latents)


def test_buffer_and_cache_memory_are_constant() -> None:
    be = _backend(random_bundle())
    sizes = []
    for _ in range(10):
        be.step()
        sizes.append((tuple(be.x.shape), be.cache.nbytes()))
    assert len(set(sizes[3:])) == 1, sizes


def test_prompt_change_reaches_the_output_within_one_buffer_length() -> None:
    bundle = random_bundle()
    be = _backend(bundle, cut_at=1.0)
    switch_block = be.buffer.seconds_to_block(1.0)
    chunks = [be.step() for _ in range(switch_block + 3)]
    prompts = [c.prompt for c in chunks]
    assert prompts[switch_block - 1] == "a red ball over the sea"
    assert prompts[switch_block] == "a blue cube on the grass"  # the chunk that entered after the change


def test_snapshot_resume_is_exact() -> None:
    bundle = random_bundle()
    ref = _backend(bundle)
    want = [ref.step().latents for _ in range(6)]
    first = _backend(bundle)
    for _ in range(3):
        first.step()
    state = {k: v.clone() for k, v in first.state_dict().items()}
    again = _backend(bundle)
    again.load_state_dict(state)
    for w in want[3:]:
        assert torch.equal(w, again.step().latents)


def test_guidance_zero_is_the_unconditional_rollout_and_guidance_changes_the_output() -> None:
    """cfg rows [cond, uncond] share nothing: scale 0 gives exactly the run of the empty prompt without guidance."""
    bundle = random_bundle()
    be = _backend(bundle, cfg_scale=0.0)
    got = [be.step().latents for _ in range(4)]
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "")
    plain = StreamingDiTBackend(bundle, buf, seed=1, width=32, height=32,
                                settings=StreamingSettings(buffer_chunks=3, micro_steps=2, shift=2.0, cfg_scale=1.0))
    want = [plain.step().latents for _ in range(4)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    guided = _backend(bundle, cfg_scale=3.0)
    assert guided.batch == 2
    assert not torch.allclose(guided.step().latents, _backend(bundle, cfg_scale=1.0).step().latents)


def test_a_missing_backend_dit_role_is_a_clear_error() -> None:
    import pytest

    from lvstudio.errors import PresetError

    bundle = random_bundle()
    with pytest.raises(PresetError, match="no 'dit_stream' file"):
        _backend(bundle, dit="dit_stream")


def test_a_prompt_switch_changes_the_content_on_the_tiny_preset() -> None:
    """Oracle-checked on the trained tiny preset: a red ball over the sea, then (at 1 s) a yellow ball on the grass.
    Chunks take the prompt they enter the buffer with, so the new scene and colour show from the switch block on,
    and the switch reaches the output one buffer length after it was made."""
    import numpy as np

    from lvstudio.eval.oracle import adherence
    from lvstudio.presets.load import load_bundle
    from lvstudio.train.world import ObjectSpec, SceneSpec

    torch.set_num_threads(1)
    bundle = load_bundle("tiny")
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball bouncing over the sea")
    buf.add_shot(1.0, "a yellow ball bouncing on the grass")
    be = StreamingDiTBackend(bundle, buf, seed=3, width=128, height=128)
    chunks = [be.step() for _ in range(6)]  # 1 + 5 blocks of 8 frames = 41 frames (2.5 s)
    frames = np.concatenate([c.frames for c in chunks])
    switch = 16  # frame of the switch (1 s at 16 fps; block 2 starts at frame 1 + 8 = 9, block 3 at 17)
    before = adherence(frames[1:switch - 4], SceneSpec("sea", (ObjectSpec("red", "ball", "bouncing"),)))
    after = adherence(frames[switch + 8 :], SceneSpec("grass", (ObjectSpec("yellow", "ball", "bouncing"),)))
    stale = adherence(frames[switch + 8 :], SceneSpec("grass", (ObjectSpec("red", "ball", "bouncing"),)))
    assert before["scene"] > 0.8 and before["colour"] > 0.8, before
    assert after["scene"] > 0.8 and after["colour"] > 0.8, after
    assert stale["colour"] < 0.2, stale  # the red ball is gone
    first_new = next(c for c in chunks if c.prompt == "a yellow ball bouncing on the grass")
    assert first_new.index == buf.seconds_to_block(1.0)


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
