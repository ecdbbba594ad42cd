"""Causal-KV backend on tiny random weights: block sizes, re-cache on a switch, an empty cache on a cut, guidance rows,
anchors (what every backend must do is in test_backend_conformance.py)."""

from __future__ import annotations

import torch

from lvstudio.backends.causal_kv import CausalKVBackend
from lvstudio.presets import AttentionSettings, SamplerSettings
from lvstudio.prompt_stream import PromptStreamBuffer, block_num_frames
from tests.helpers.random_bundle import random_bundle


def _backend(bundle, seed: int = 3, cut_at: float | None = None, transition: str = "cut",
             anchors=None) -> CausalKVBackend:  # noqa: ANN001
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=bundle.preset.attention.block_frames, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    if cut_at is not None:
        buf.add_shot(cut_at, "a blue cube on the grass", transition)
    return CausalKVBackend(bundle, buf, seed=seed, width=32, height=32, anchors=anchors)


def test_blocks_have_the_wan_frame_counts() -> None:
    be = _backend(random_bundle())
    chunks = [be.step() for _ in range(3)]
    assert [c.num_frames for c in chunks] == [block_num_frames(b, 2) for b in range(3)]
    assert chunks[0].frames.dtype.name == "uint8" and chunks[0].frames.shape[1:] == (32, 32, 3)


def test_switch_triggers_recache_and_the_window_keeps_its_sink() -> None:
    bundle = random_bundle()
    be = _backend(bundle, cut_at=1.0, transition="switch")
    chunks = [be.step() for _ in range(8)]
    switched = [c.index for c in chunks if c.switched]
    assert switched == [be.buffer.seconds_to_block(1.0)] and not any(c.new_shot for c in chunks)
    assert chunks[switched[0]].timings["recache"] > 0
    assert all(c.timings["recache"] == 0 for c in chunks if not c.switched)
    assert be.cache.num_frames <= 6 and be.cache.num_sink == 2
    assert be.cache.frame_ids[-1] == 2 * 8 - 1  # one shot: frames numbered from the start of the video


def test_cut_empties_the_cache_and_numbers_frames_from_the_shot_start() -> None:
    bundle = random_bundle()
    be = _backend(bundle, cut_at=1.0)
    cut = be.buffer.seconds_to_block(1.0)
    for _ in range(cut):
        be.step()
    assert be.cache.frame_ids == [0, 1, 4, 5] and be.recent is not None  # sink + what the next block sees
    seen: list[list[int]] = []
    real = be.dit.forward

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003
        seen.append(list(be.cache.frame_ids))
        return real(*args, **kwargs)

    be.dit.forward = spy  # type: ignore[method-assign]
    chunk = be.step()
    assert chunk.new_shot and not chunk.switched and chunk.timings["recache"] == 0  # a cut does not re-cache
    assert seen[0] == [] and all(ids == [] for ids in seen)  # every model call of the cut's block: an empty cache
    assert be.cache.frame_ids == [0, 1] and be.cache.num_sink == 2  # the new shot's first block is its sink
    assert be.recent.shape[2] == 2 and be.origin == 2 * cut
    be.dit.forward = real  # type: ignore[method-assign]
    be.step()
    assert be.cache.frame_ids == [0, 1, 2, 3]


def test_an_anchor_at_a_cut_seeds_the_new_shots_sink() -> None:
    from lvstudio.caches import AnchorCache, CachedAnchor

    bundle = random_bundle()
    cut = 3  # 1 s at 16 fps with 2-latent blocks
    img = torch.randn(1, 4, 2, 4, 4)
    anchors = AnchorCache()
    anchors.add(CachedAnchor(cut, "image:test.png", img))
    be = _backend(bundle, cut_at=1.0, anchors=anchors)
    chunks = [be.step() for _ in range(cut + 1)]
    assert chunks[cut].new_shot and torch.equal(chunks[cut].latents[:, :, 0], img[:, :, 1])  # pinned, then the sink
    assert be.cache.frame_ids == [0, 1] and be.cache.num_sink == 2


def test_multistep_sampler_with_cfg_runs() -> None:
    bundle = random_bundle(sampler=SamplerSettings(kind="euler", steps=3, shift=2.0, cfg_scale=3.0),
                           attention=AttentionSettings(block_frames=1, window_frames=4, sink_frames=1))
    be = _backend(bundle)
    chunks = [be.step() for _ in range(3)]
    assert be.cache.layers[0].k.shape[0] == 2  # cond + uncond rows
    assert all(torch.isfinite(c.latents).all() for c in chunks)


def test_anchors_pin_latents_image_and_first_frame_of_a_shot() -> None:
    from lvstudio.caches import AnchorCache, CachedAnchor

    bundle = random_bundle()
    img = torch.randn(1, 4, 2, 4, 4)
    anchors = AnchorCache()
    anchors.add(CachedAnchor(0, "image:test.png", img))
    anchors.add(CachedAnchor(3, "shot:1", capture_block=0))
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    be = CausalKVBackend(bundle, buf, seed=1, width=32, height=32, anchors=anchors)
    chunks = [be.step() for _ in range(4)]
    assert torch.equal(chunks[0].latents[:, :, 0], img[:, :, 0])
    assert torch.equal(chunks[3].latents[:, :, 0], chunks[0].latents[:, :, 1])
    assert anchors.summary()[1]["ready"]


def test_recache_attention_setting_reaches_the_model(monkeypatch) -> None:
    seen: list[int | None] = []
    for pattern in ("bidirectional", "block-causal"):
        bundle = random_bundle(attention=AttentionSettings(block_frames=2, window_frames=6, sink_frames=2,
                                                           global_sink=False, recache_attention=pattern))
        def spy(*args, real=bundle.dit.recache, **kwargs):
            seen.append(kwargs["block_frames"])
            return real(*args, **kwargs)

        monkeypatch.setattr(bundle.dit, "recache", spy)
        be = _backend(bundle, cut_at=1.0, transition="switch")
        for _ in range(be.buffer.seconds_to_block(1.0) + 1):
            be.step()
    assert seen == [None, 2]  # upstream LongLive re-encodes the window bidirectionally by default


def test_a_cut_starts_like_a_fresh_video_with_rebased_rope_and_a_resliced_sink(monkeypatch) -> None:  # noqa: ANN001
    """The tiny preset's settings (rope_mode = "rebase", global_sink = false): with the same noise for every block,
    the blocks after a cut equal a fresh render's first blocks bit for bit — the emptied cache leaves nothing behind
    (sink keys kept un-rotated, sink shift, ring position) — including blocks where the window slides."""
    import lvstudio.backends.causal_kv as ckv

    monkeypatch.setattr(ckv, "block_generator",
                        lambda run_seed, index, device, salt="block": torch.Generator(device).manual_seed(run_seed))
    bundle = random_bundle(attention=AttentionSettings(block_frames=2, window_frames=6, sink_frames=2,
                                                       rope_mode="rebase", global_sink=False))
    cut = _backend(bundle, cut_at=1.0)
    for _ in range(cut.buffer.seconds_to_block(1.0)):
        cut.step()
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a blue cube on the grass")
    fresh = CausalKVBackend(bundle, buf, seed=3, width=32, height=32)
    for _ in range(5):
        assert torch.equal(cut.step().latents, fresh.step().latents)
