"""Streaming-DiT backend on tiny random weights: block order and sizes, backend-specific DiT weights (what every
backend must do is in test_backend_conformance.py)."""

from __future__ import annotations

import torch

from lvstudio.backends.streaming_dit import StreamingDiTBackend
from lvstudio.presets import StreamingSettings
from lvstudio.prompt_stream import PromptStreamBuffer, block_num_frames
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 1, **kw) -> StreamingDiTBackend:
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    settings = StreamingSettings(buffer_chunks=3, micro_steps=2, shift=2.0, **kw)
    return StreamingDiTBackend(bundle, buf, seed=seed, width=32, height=32, settings=settings)


def test_emits_blocks_in_order_with_the_wan_frame_counts() -> None:
    be = _backend(random_bundle())
    chunks = [be.step() for _ in range(5)]
    assert [c.index for c in chunks] == [c.block for c in chunks] == list(range(5))
    assert [c.num_frames for c in chunks] == [block_num_frames(i, 2) for i in range(5)]


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
