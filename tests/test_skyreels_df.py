"""SkyReels-V2 Diffusion Forcing sampling equals diffusers' own pipelines (text-, image- and video-to-video).

Tiny random components as diffusers' tests build them (SkyReelsV2Transformer3DModel, AutoencoderKLWan, a umT5
encoder), no network: the transformer is the diffusers twin of our WanDiT (same weights), the text features come from
our umT5 adapter and are handed to both, the noise comes from the same seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lvstudio.models.key_maps import official_to_diffusers
from lvstudio.models.wan_components import UMT5Text, WanVAE
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
from lvstudio.sampling.df_sampler import (
    DFSettings,
    SkyReelsDFSampler,
    plan_segments,
    segment_schedule,
    switch_latencies,
)
from lvstudio.sampling.skyreels_df import (
    encode_image_prefix,
    encode_video_prefix,
    generate_skyreels_df,
    skyreels_conditioning,
    skyreels_denoiser,
)
from tests.helpers.hub_cache import WORDS, write_tokenizer

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

HEIGHT = WIDTH = 32  # latent 4 x 4 (VAE stride 8), 4 tokens per latent frame
TEXT_DIM = 16
TEXT_LEN = 16
SEED, NOISE_SEED = 3, 123


class Components:
    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        torch.manual_seed(0)
        self.cfg = WanDiTConfig(dim=24, ffn_dim=32, num_heads=2, num_layers=2, in_dim=16, out_dim=16, freq_dim=32,
                                text_dim=TEXT_DIM, text_len=TEXT_LEN, inject_sample_info=True)
        self.dit = WanDiT(self.cfg).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.dit.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.transformer = diffusers.SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True,
        ).eval()
        self.transformer.load_state_dict(official_to_diffusers(self.dit.state_dict()), strict=True)
        torch.manual_seed(0)
        self.vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                              temperal_downsample=[False, True, True]).eval()
        write_tokenizer(root / "tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        torch.manual_seed(1)
        self.text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=3 + len(WORDS) + 27, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)).eval()
        text = UMT5Text(self.text_encoder, self.tokenizer, TEXT_LEN, torch.device("cpu"), "never")
        self.prompt = text.encode(["a red ball bouncing on the sea"])  # [1, 16, 16], zero past the prompt
        self.negative = text.encode(["static grass"])
        self.wan_vae = WanVAE(self.vae, torch.device("cpu"), torch.float32)

    def pipeline(self, cls, shift: float = 8.0):  # type: ignore[no-untyped-def]
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=shift)
        pipe = cls(tokenizer=self.tokenizer, text_encoder=self.text_encoder, transformer=self.transformer,
                   vae=self.vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def comp(tmp_path_factory: pytest.TempPathFactory) -> Components:
    return Components(tmp_path_factory.mktemp("skyreels"))


def _reference(comp: Components, cls, extra: dict, shift: float, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    torch.manual_seed(NOISE_SEED)  # addnoise_condition draws from the global generator
    out = comp.pipeline(cls, shift)(
        prompt=None, prompt_embeds=comp.prompt, negative_prompt_embeds=comp.negative, height=HEIGHT, width=WIDTH,
        generator=torch.Generator().manual_seed(SEED), output_type="latent", fps=24, **extra, **kw,
    ).frames
    return out


def _ours(comp: Components, settings: DFSettings, num_frames: int, guidance_scale: float,
          prefix: torch.Tensor | None = None, prefix_kind: str | None = None) -> torch.Tensor:
    torch.manual_seed(NOISE_SEED)
    cond = skyreels_conditioning(comp.dit, comp.prompt, fps=24)
    uncond = skyreels_conditioning(comp.dit, comp.negative, fps=24)
    return generate_skyreels_df(
        comp.dit, settings, cond, uncond, num_frames=num_frames, latent_hw=(HEIGHT // 8, WIDTH // 8),
        guidance_scale=guidance_scale, prefix=prefix, prefix_kind=prefix_kind,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(SEED),
    )


def _pipeline_kwargs(s: DFSettings, num_frames: int, guidance_scale: float) -> dict:
    return {"shift": s.shift, "num_frames": num_frames, "num_inference_steps": s.num_steps,
            "guidance_scale": guidance_scale, "base_num_frames": s.base_num_frames, "ar_step": s.ar_step,
            "causal_block_size": s.causal_block_size, "overlap_history": s.overlap_history,
            "addnoise_condition": s.addnoise_condition}


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all()
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel


# (settings, num_frames): synchronous, asynchronous, and long videos of three segments (one with the carried prefix cut
# to the block size: overlap 3 latents, blocks of 2).
T2V_CASES = {
    "sync": (DFSettings(num_steps=4, base_num_frames=97), 17),
    "async": (DFSettings(num_steps=8, base_num_frames=97, ar_step=5, causal_block_size=5), 37),
    "long-sync": (DFSettings(num_steps=4, base_num_frames=21, overlap_history=9, addnoise_condition=20), 41),
    "long-async": (DFSettings(num_steps=8, base_num_frames=37, ar_step=5, causal_block_size=5, overlap_history=17,
                              addnoise_condition=20), 77),
    "long-cut-prefix": (DFSettings(num_steps=4, base_num_frames=21, ar_step=2, causal_block_size=2,
                                   overlap_history=9, addnoise_condition=20), 37),
}


@pytest.mark.parametrize("case", sorted(T2V_CASES))
def test_text_to_video_equals_diffusers(comp: Components, case: str) -> None:
    settings, num_frames = T2V_CASES[case]
    ref = _reference(comp, diffusers.SkyReelsV2DiffusionForcingPipeline, {},
                     **_pipeline_kwargs(settings, num_frames, 6.0))
    ours = _ours(comp, settings, num_frames, 6.0)
    _assert_close(ours, ref)
    if case.startswith("long"):
        assert len(plan_segments(settings, ours.shape[2])) == 3


def _image(seed: int) -> PIL.Image:
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


I2V_CASES = {
    "sync": (DFSettings(num_steps=4, shift=5.0, base_num_frames=97), 17),
    "async-long": (DFSettings(num_steps=8, shift=5.0, base_num_frames=37, ar_step=5, causal_block_size=5,
                              overlap_history=17, addnoise_condition=20), 77),
}


@pytest.mark.parametrize("case", sorted(I2V_CASES))
def test_image_to_video_equals_diffusers(comp: Components, case: str) -> None:
    settings, num_frames = I2V_CASES[case]
    image = _image(5)
    pipe_cls = diffusers.SkyReelsV2DiffusionForcingImageToVideoPipeline
    ref = _reference(comp, pipe_cls, {"image": image}, **_pipeline_kwargs(settings, num_frames, 5.0))
    pixels = comp.pipeline(pipe_cls).video_processor.preprocess(image, height=HEIGHT, width=WIDTH)  # [1, 3, H, W]
    prefix = encode_image_prefix(comp.wan_vae.encode, pixels)
    ours = _ours(comp, settings, num_frames, 5.0, prefix, "image")
    _assert_close(ours, ref)
    if settings.causal_block_size == 1:  # the image latent is a finished frame: it is the first output frame
        assert torch.allclose(ours[:, :, :1], prefix, atol=1e-6)


V2V_CASES = {
    "sync": (DFSettings(num_steps=4, base_num_frames=97, overlap_history=9, addnoise_condition=20), 29),
    "async-long": (DFSettings(num_steps=8, base_num_frames=37, ar_step=5, causal_block_size=5, overlap_history=17,
                              addnoise_condition=20), 77),
}


@pytest.mark.parametrize("case", sorted(V2V_CASES))
def test_video_to_video_equals_diffusers(comp: Components, case: str) -> None:
    settings, num_frames = V2V_CASES[case]
    video = [_image(10 + i) for i in range(21)]
    pipe_cls = diffusers.SkyReelsV2DiffusionForcingVideoToVideoPipeline
    ref = _reference(comp, pipe_cls, {"video": video}, **_pipeline_kwargs(settings, num_frames, 6.0))
    pixels = comp.pipeline(pipe_cls).video_processor.preprocess_video(video, height=HEIGHT, width=WIDTH)
    assert settings.overlap_history is not None
    prefix = encode_video_prefix(comp.wan_vae.encode, pixels, settings.overlap_history)
    ours = _ours(comp, settings, num_frames, 6.0, prefix, "video")
    _assert_close(ours, ref)
    n_in = prefix.shape[2] - prefix.shape[2] % settings.causal_block_size
    assert torch.allclose(ours[:, :, :n_in], prefix[:, :, :n_in], atol=1e-6)  # the output starts with the input


# --------------------------------------------------------------------------------------------------------------
# Streaming behaviour (no reference needed)
# --------------------------------------------------------------------------------------------------------------


def test_chunks_come_as_soon_as_blocks_are_final_and_concatenate_to_the_run(comp: Components) -> None:
    settings, num_frames = T2V_CASES["long-async"]
    cond = skyreels_conditioning(comp.dit, comp.prompt)
    uncond = skyreels_conditioning(comp.dit, comp.negative)
    denoise = skyreels_denoiser(comp.dit, cond, uncond, 6.0, causal_block_size=5)
    torch.manual_seed(NOISE_SEED)
    sampler = SkyReelsDFSampler(settings, (1, 16, 4, 4), 20, generator=torch.Generator().manual_seed(SEED))
    events = []
    while (nxt := sampler.peek()) is not None:
        for chunk in sampler.step(denoise):
            events.append((nxt.segment, nxt.iteration, chunk.start, chunk.num_frames, chunk.latents))
    # Async: the second 5-frame block of the first segment is final 5 iterations after the first (8 steps,
    # ar_step 5); later segments carry one block and denoise one new block in 8 iterations.
    assert [(s, i, start, n) for s, i, start, n, _ in events] == [
        (0, 7, 0, 5), (0, 12, 5, 5), (1, 7, 10, 5), (2, 7, 15, 5)]
    whole = torch.cat([e[-1] for e in events], dim=2)
    _assert_close(whole, _ours(comp, settings, num_frames, 6.0))


def test_snapshot_resume_is_exact(comp: Components) -> None:
    settings, _ = T2V_CASES["long-async"]
    cond = skyreels_conditioning(comp.dit, comp.prompt)
    uncond = skyreels_conditioning(comp.dit, comp.negative)
    denoise = skyreels_denoiser(comp.dit, cond, uncond, 6.0, causal_block_size=5)

    def make() -> SkyReelsDFSampler:
        return SkyReelsDFSampler(settings, (1, 16, 4, 4), 20, generator=torch.Generator().manual_seed(SEED),
                                 condition_generator=torch.Generator().manual_seed(NOISE_SEED))

    full = torch.cat([c.latents for c in make().chunks(denoise)], dim=2)
    first = make()
    out = []
    for _ in range(17):  # stop inside the second segment (13 + 8 + 8 iterations)
        out += first.step(denoise)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = make()
    resumed.load_state_dict(state)
    out += list(resumed.chunks(denoise))
    assert torch.equal(torch.cat([c.latents for c in out], dim=2), full)


def test_unbounded_run_keeps_going_and_memory_is_per_segment(comp: Components) -> None:
    settings = DFSettings(num_steps=2, base_num_frames=21, overlap_history=9, addnoise_condition=20)
    cond = skyreels_conditioning(comp.dit, comp.prompt)
    denoise = skyreels_denoiser(comp.dit, cond, None, 1.0)
    sampler = SkyReelsDFSampler(settings, (1, 16, 4, 4), None, generator=torch.Generator().manual_seed(0))
    starts = []
    for chunk in sampler.chunks(denoise):
        starts.append((chunk.start, chunk.num_frames))
        assert sampler.history is None or sampler.history.shape[2] <= settings.overlap_latents
        if len(starts) == 5:
            break
    assert starts == [(0, 6), (6, 3), (9, 3), (12, 3), (15, 3)]  # W = 6 latents, O = 3: 3 new latents a segment


def test_settings_and_plans_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="overlap_history"):
        plan_segments(DFSettings(base_num_frames=97), 30)
    with pytest.raises(ValueError, match="shorter than"):
        DFSettings(base_num_frames=17, overlap_history=17)
    with pytest.raises(ValueError, match="multiple of causal_block_size"):
        segment_schedule(DFSettings(causal_block_size=5), plan_segments(DFSettings(causal_block_size=5), 12)[0])
    with pytest.raises(ValueError, match="too few"):
        plan_segments(DFSettings(base_num_frames=37, overlap_history=17), 3, 3, "video", long_video=True)
    # upstream's recommended long video: 737 frames = 185 latents, 9 segments of 25 latents (5 carried)
    segs = plan_segments(DFSettings(ar_step=5, causal_block_size=5, overlap_history=17, addnoise_condition=20), 185)
    assert len(segs) == 9 and {s.num_frames for s in segs} == {25} and segs[-1].end == 185
    assert all(s.prefix == 5 and s.emit_from == 5 for s in segs[1:])


def test_prompt_switch_between_calls_leaves_emitted_frames_alone(comp: Components) -> None:
    settings = DFSettings(num_steps=3, base_num_frames=37, ar_step=2, causal_block_size=5, overlap_history=17,
                          addnoise_condition=20)
    conds = [skyreels_conditioning(comp.dit, c) for c in (comp.prompt, comp.negative)]

    def run(switch_call: int | None) -> tuple[list, list]:
        sampler = SkyReelsDFSampler(settings, (1, 16, 4, 4), 20, generator=torch.Generator().manual_seed(SEED),
                                    condition_generator=torch.Generator().manual_seed(NOISE_SEED))
        chunks, entering, call = [], [], 0
        while (nxt := sampler.peek()) is not None:
            cond = conds[1] if switch_call is not None and call >= switch_call else conds[0]
            entering.append(nxt.entering)
            chunks += [(call, c) for c in sampler.step(skyreels_denoiser(comp.dit, cond, None, 1.0,
                                                                         causal_block_size=5))]
            call += 1
        return chunks, entering

    base, entering = run(None)
    # blocks enter at calls 0 and 2 (segment 0: 5 calls), 5 (segment 1: 3 calls) and 8 (segment 2)
    assert [(i, r) for i, r in enumerate(entering) if r] == [(0, range(5)), (2, range(5, 10)), (5, range(10, 15)),
                                                              (8, range(15, 20))]
    switched, _ = run(4)
    for (call, a), (_, b) in zip(base, switched, strict=True):
        if call < 4:
            assert torch.equal(a.latents, b.latents)  # emitted before the switch: untouched
        else:
            assert not torch.allclose(a.latents, b.latents)


def test_switch_latencies_sync_and_async() -> None:
    sync = DFSettings(num_steps=4, base_num_frames=21, overlap_history=9)  # W = 6, O = 3 latents
    lat = switch_latencies(sync, 12)  # segments of 6, 6, 6 latents starting at 0, 3, 6: 3 x 4 calls
    assert [(x.call, x.emitted, x.first_new, x.latent_frames, x.calls_until_visible) for x in lat] == [
        (0, 0, 0, 0, 4), (1, 0, 6, 6, 7), (2, 0, 6, 6, 6), (3, 0, 6, 6, 5),
        (4, 6, 6, 0, 4), (5, 6, 9, 3, 7), (6, 6, 9, 3, 6), (7, 6, 9, 3, 5), (8, 9, 9, 0, 4)]
    asyn = DFSettings(num_steps=4, base_num_frames=37, ar_step=2, causal_block_size=5)  # one segment, 2 blocks
    lat = switch_latencies(asyn, 10)
    assert [(x.call, x.first_new, x.latent_frames, x.calls_until_visible) for x in lat] == [
        (0, 0, 0, 4), (1, 5, 5, 5), (2, 5, 5, 4)]
