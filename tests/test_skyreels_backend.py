"""streaming-dit in SkyReels-V2 DF mode equals diffusers' DF pipelines, driven the way users drive it: a storyboard
through the RenderSession and the Prompt Stream Buffer (text-to-video sync and async with 3 segments, the
storyboard's negative prompt as CFG's unconditional row; image-to-video from an anchor image at 0:00), and
`extend` (video-to-video). Tiny random components as in tests/test_skyreels_df.py; no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lvstudio.backends.base import block_seed
from lvstudio.models.wan_components import UMT5Text
from lvstudio.presets.load import ModelBundle
from lvstudio.presets.schema import AttentionSettings, Preset, SkyReelsSettings
from lvstudio.session import RenderSession, RenderSettings
from lvstudio.storyboard import parse_storyboard
from tests.test_skyreels_df import HEIGHT, TEXT_LEN, WIDTH, Components, _assert_close, _image

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red ball bouncing on the sea", "static grass"
SEED = 11


@pytest.fixture(scope="module")
def comp(tmp_path_factory: pytest.TempPathFactory) -> Components:
    return Components(tmp_path_factory.mktemp("skyreels-backend"))


def _bundle(comp: Components, sk: SkyReelsSettings) -> ModelBundle:
    preset = Preset(name="skyreels-test", backend="streaming-dit", fps=24, width=WIDTH, height=HEIGHT,
                    text_encoder="umt5", vae="wan", skyreels=sk,
                    attention=AttentionSettings(block_frames=sk.causal_block_size))
    text = UMT5Text(comp.text_encoder, comp.tokenizer, TEXT_LEN, torch.device("cpu"), "never")
    return ModelBundle(preset, comp.dit, text, comp.wan_vae, torch.device("cpu"), latent_channels=16)


def _story(num_frames: int, extra: str = "") -> str:
    return (f'title = "t"\nfps = 24\nduration = "{num_frames / 24!r}s"\nseed = {SEED}\n'
            f'negative_prompt = "{NEGATIVE}"\n{extra}\n[[shots]]\nat = 0\nprompt = "{PROMPT}"\n')


def _session_latents(comp: Components, sk: SkyReelsSettings, text: str, base_dir: Path | None = None) -> torch.Tensor:
    sb = parse_storyboard(text, "t.toml", base_dir)
    bundle = _bundle(comp, sk)
    settings = RenderSettings("skyreels-test", "streaming-dit", sb.seed, sb.fps, WIDTH, HEIGHT, sb.num_frames())
    session = RenderSession(sb, bundle, settings)
    chunks: list[torch.Tensor] = []
    session.add_sink(lambda c: chunks.append(c.latents))
    with torch.no_grad():
        session.run()
    return torch.cat(chunks, dim=2)


def _reference(comp: Components, cls, sk: SkyReelsSettings, num_frames: int, **extra) -> torch.Tensor:  # noqa: ANN001
    torch.manual_seed(block_seed(SEED, 0, "skyreels-addnoise"))  # addnoise_condition: the global generator in diffusers
    pipe = comp.pipeline(cls, sk.shift)
    negative = UMT5Text(comp.text_encoder, comp.tokenizer, TEXT_LEN, torch.device("cpu"), "never").encode([NEGATIVE])
    return pipe(prompt=None, prompt_embeds=comp.prompt, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                generator=torch.Generator().manual_seed(block_seed(SEED, 0, "skyreels")), output_type="latent",
                fps=24, num_frames=num_frames, num_inference_steps=sk.num_steps, guidance_scale=sk.guidance_scale,
                base_num_frames=sk.base_num_frames, ar_step=sk.ar_step, causal_block_size=sk.causal_block_size,
                overlap_history=sk.overlap_history, addnoise_condition=sk.addnoise_condition, **extra).frames


CASES = {  # (settings, pixel frames): 3 segments each
    "sync": (SkyReelsSettings(num_steps=4, base_num_frames=21, ar_step=0, causal_block_size=1, overlap_history=9,
                              addnoise_condition=20, guidance_scale=6.0), 41),
    "async": (SkyReelsSettings(num_steps=8, base_num_frames=37, ar_step=5, causal_block_size=5, overlap_history=17,
                               addnoise_condition=20, guidance_scale=6.0), 77),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_storyboard_text_to_video_equals_the_pipeline(comp: Components, case: str) -> None:
    sk, num_frames = CASES[case]
    ref = _reference(comp, diffusers.SkyReelsV2DiffusionForcingPipeline, sk, num_frames)
    ours = _session_latents(comp, sk, _story(num_frames))
    _assert_close(ours, ref)


def test_storyboard_anchor_image_at_zero_is_image_to_video(comp: Components, tmp_path: Path) -> None:
    import cv2

    sk = SkyReelsSettings(num_steps=8, shift=5.0, base_num_frames=37, ar_step=5, causal_block_size=5,
                          overlap_history=17, addnoise_condition=20, guidance_scale=5.0)
    image = _image(5)
    cv2.imwrite(str(tmp_path / "start.png"), cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    ref = _reference(comp, diffusers.SkyReelsV2DiffusionForcingImageToVideoPipeline, sk, 77, image=image)
    ours = _session_latents(comp, sk, _story(77, '[[anchors]]\nat = 0\nimage = "start.png"\n'), tmp_path)
    _assert_close(ours, ref)


def test_extend_continues_a_video_as_the_video_to_video_pipeline(comp: Components) -> None:
    from lvstudio.backends import make_backend
    from lvstudio.prompt_stream import PromptStreamBuffer

    sk = SkyReelsSettings(num_steps=8, base_num_frames=37, ar_step=5, causal_block_size=5, overlap_history=17,
                          addnoise_condition=20, guidance_scale=6.0)
    video = [_image(10 + i) for i in range(21)]
    pipe_cls = diffusers.SkyReelsV2DiffusionForcingVideoToVideoPipeline
    ref = _reference(comp, pipe_cls, sk, 77, video=video)  # [1, 16, 5 input + 15 new, h, w]
    pixels = comp.pipeline(pipe_cls).video_processor.preprocess_video(video, height=HEIGHT, width=WIDTH)
    bundle = _bundle(comp, sk)
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=5, fps=24, negative=NEGATIVE)
    buf.add_shot(0.0, PROMPT)
    new_frames = 4 * 15  # the pipeline's 77 frames count the 17 carried: 15 new latents of 4 frames
    be = make_backend("streaming-dit", bundle, buf, seed=SEED, width=WIDTH, height=HEIGHT, num_frames=new_frames,
                      extend=pixels)
    with torch.no_grad():
        chunks = [be.step() for _ in range(3)]
    assert [c.frame_start for c in chunks] == [0, 20, 40] and all(c.num_frames == 20 for c in chunks)
    _assert_close(torch.cat([c.latents for c in chunks], dim=2), ref[:, :, 5:])


def test_live_prompts_through_the_session_api_land_where_the_studios_say() -> None:
    """What the TUI and the web studio do (RenderSession.push from another thread between chunks): a live switch
    lands on the first block that has not entered the sampler and shows from that block's frame on."""
    from tests.helpers.random_bundle import random_skyreels_bundle

    bundle = random_skyreels_bundle()
    sb = parse_storyboard('title = "t"\nduration = "4s"\n[[shots]]\nat = 0\nprompt = "a red ball"\n')
    settings = RenderSettings("random-skyreels", "streaming-dit", 0, 16, 32, 32, sb.num_frames())
    session = RenderSession(sb, bundle, settings)
    made = []
    session.add_sink(made.append)
    for _ in range(2):
        session.step()
    event = session.push("a blue cube", transition="switch")
    assert event.block == session.backend.next_block + session.backend.lead_blocks
    with torch.no_grad():
        session.run()
    assert all((c.prompt == "a blue cube") == (c.block >= event.block) for c in made)
    assert any(c.prompt == "a blue cube" for c in made)
    live = [s for s in session.shot_ranges() if s["source"] == "live"]
    assert live[0]["frame_start"] == session.block_frame(event.block)
    assert "a blue cube" in dump_rendered(session)


def dump_rendered(session: RenderSession) -> str:
    from lvstudio.storyboard import dump_storyboard

    return dump_storyboard(session.rendered_storyboard())
