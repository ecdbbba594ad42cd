"""The SVI Hub presets: what `presets list` and `render` say without the weights, and a full offline pull + render
of the shipped svi-shot-14b preset at tiny size (Wan I2V architecture, random weights, a LoRA in the published
layout) from a hand-built Hugging Face cache (HF_HUB_OFFLINE=1, every cache in tmp_path)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from lvstudio.presets.schema import load_preset

ROOT = Path(__file__).resolve().parents[1]
I2V_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
SVI_REPO = "vita-video-gen/svi-model"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*_a, **_k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LVSTUDIO_CACHE", str(tmp_path / "lv"))
    monkeypatch.setenv("LVSTUDIO_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("LVSTUDIO_DEVICE", "cpu")


def _story(tmp_path: Path, preset: str, size: int = 832, height: int = 480) -> Path:
    import cv2
    import numpy as np

    image = tmp_path / "first.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image), rng.integers(0, 256, (height, size, 3), dtype=np.uint8))
    story = tmp_path / "story.toml"
    story.write_text(f'''title = "svi"
preset = "{preset}"
duration = "1s"

[[shots]]
at = "0s"
prompt = "a red ball over the sea"

[[shots]]
at = "0.5s"
prompt = "a blue ball over the grass"

[[anchors]]
at = "0s"
image = "{image.name}"
''')
    return story


@pytest.mark.parametrize("name, mode, lora", [
    ("svi-shot-14b", "shot", "version-1.0/svi-shot.safetensors"),
    ("svi-film-14b", "film", "version-1.0/svi-film-opt-10212025.safetensors"),
])
def test_shipped_svi_presets(name: str, mode: str, lora: str) -> None:
    p = load_preset(name)
    assert (p.backend, p.crossclip.svi, p.crossclip.pixel_frames, p.realtime) == ("erft-crossclip", mode, 81, False)
    assert (p.crossclip.steps, p.crossclip.shift, p.crossclip.cfg_scale, p.crossclip.sampler) == (50, 5.0, 5.0, "euler")
    assert p.negative_prompt.startswith("bright tones, overexposed")
    assert (p.width, p.height, p.fps, p.dit_config["model_type"], p.dit_config["num_layers"]) == (832, 480, 16, "i2v",
                                                                                                   40)
    assert p.files["svi_lora"].path == lora and p.file_repo("svi_lora") == SVI_REPO
    assert {p.file_repo(r) for r in ("dit", "image_encoder", "text_encoder", "tokenizer", "vae")} == {I2V_REPO}
    assert p.hub_repos() == [SVI_REPO, I2V_REPO] and "Apache-2.0" in p.licence


def test_presets_list_says_svi_is_not_real_time() -> None:
    from lvstudio.presets.cli import presets_list

    lines: list[str] = []
    presets_list(echo=lines.append)
    svi = [line for line in lines if line.startswith("svi-")]
    assert len(svi) == 2 and all("erft-crossclip" in s and "NOT REAL TIME" in s for s in svi)
    assert not any("NOT REAL TIME" in line for line in lines if line.startswith(("tiny", "longlive")))


@pytest.mark.parametrize("locked", [False, True])
def test_render_without_the_weights_says_pull_it_first(tmp_path: Path, locked: bool) -> None:
    from typer.testing import CliRunner

    from lvstudio.cli import app

    if locked:  # pulled once somewhere (a lock with commits), but the Hub cache here is empty
        lock = tmp_path / "lv" / "locks" / "svi-shot-14b.json"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"preset": "svi-shot-14b", "revisions": {SVI_REPO: "1" * 40, I2V_REPO: "2" * 40}}))
    story, out = _story(tmp_path, "svi-shot-14b", size=64, height=32), tmp_path / "out.mp4"
    result = CliRunner().invoke(app, ["render", str(story), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "lvstudio presets pull svi-shot-14b" in result.output
    if locked:
        assert "is not pulled yet" in result.output and "not in the Hub cache" in result.output
        assert "HF_HUB_OFFLINE is set here" in result.output
    assert not out.exists() and not list(tmp_path.glob("out*"))


# -- a full offline pull and render at tiny size -------------------------------------------------------------


def _published_lora(dit: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in SVI's published layout: `blocks.N.<linear>.lora_{A,B}.default.weight` on q,k,v,o and ffn.0/2."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and (
                name.split(".", 2)[2] in {f"{a}.{b}" for a in ("self_attn", "cross_attn") for b in "qkvo"} | {
                    "ffn.0", "ffn.2"}):
            out[f"{name}.lora_A.default.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            out[f"{name}.lora_B.default.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return out


def _svi_hub_cache(root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The SVI repos at tiny size: the Wan I2V Diffusers folders and the SVI LoRA file."""
    import tempfile

    import diffusers
    import transformers
    from safetensors.torch import save as save_bytes

    from lvstudio.models.key_maps import load_dit_state_dict
    from lvstudio.models.wan_dit import WanDiT
    from lvstudio.models.wan_i2v import dit_config_from_diffusers
    from tests.helpers.hub_cache import (
        TEXT_DIM,
        WORDS,
        add_file,
        add_folder,
        commit_for,
        write_text_encoder,
        write_tokenizer,
        write_vae,
    )

    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=4, added_kv_proj_dim=24).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=4)).eval()
    base = WanDiT(dit_config_from_diffusers(transformer.config))
    load_dit_state_dict(base, transformer.state_dict())
    lora = _published_lora(base)
    i2v, svi = commit_for(I2V_REPO), commit_for(SVI_REPO)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        transformer.save_pretrained(str(t / "transformer"), safe_serialization=True, max_shard_size="20KB")
        clip.save_pretrained(str(t / "image_encoder"), safe_serialization=True)
        write_tokenizer(t / "tokenizer")
        write_text_encoder(t / "text_encoder", vocab_size=3 + len(WORDS) + 27)
        write_vae(t / "vae")
        for sub in ("transformer", "image_encoder", "tokenizer", "text_encoder", "vae"):
            add_folder(root, I2V_REPO, i2v, sub, t / sub)
    add_file(root, SVI_REPO, svi, "version-1.0/svi-shot.safetensors", save_bytes({f"pipe.dit.{k}": v for k, v in
                                                                                   lora.items()}))
    return {k: v.clone() for k, v in base.state_dict().items()}, lora


@pytest.mark.slow  # builds a Hub cache, pulls, loads and renders two 9-frame clips: ~10 s
def test_pull_and_render_svi_shot_at_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("diffusers")
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.presets.cli import presets_pull
    from lvstudio.presets.load import load_bundle
    from lvstudio.video import probe_video
    from tests.helpers.hub_cache import TEXT_LEN, write_test_preset

    base, lora = _svi_hub_cache(tmp_path / "hub")
    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(tmp_path / "presets"))
    dit_config = {"model_type": "i2v", "dim": 24, "ffn_dim": 32, "num_heads": 2, "num_layers": 3, "in_dim": 36,
                  "out_dim": 16, "freq_dim": 256, "image_dim": 4, "text_len": TEXT_LEN}
    write_test_preset(tmp_path / "presets", "svi-shot-14b", size=32, dit_config=dit_config,
                      crossclip={"pixel_frames": 9, "steps": 2}, sampler={"steps": 2})
    name = "hubtest-svi-shot-14b"
    presets_pull(name, ["main"], echo=lambda _m: None)
    # The published LoRA is merged at load: W + 1.0 * B @ A.
    bundle = load_bundle(name, "cpu")
    q = "blocks.1.self_attn.q"
    want = base[f"{q}.weight"] + lora[f"{q}.lora_B.default.weight"] @ lora[f"{q}.lora_A.default.weight"]
    assert torch.allclose(bundle.dit.state_dict()[f"{q}.weight"], want, atol=1e-6)
    assert bundle.image_encoder is not None and any("no CUDA GPU" in n for n in bundle.notes)
    # Render 1 s (16 frames): two clips of 8 new frames, a prompt change at 0.5 s showing from the second clip.
    story, out = _story(tmp_path, name, size=32, height=32), tmp_path / "svi.mp4"
    grad = torch.is_grad_enabled()
    try:
        result = CliRunner().invoke(app, ["render", str(story), "--out", str(out), "--no-progress"])
    finally:
        torch.set_grad_enabled(grad)
    assert result.exit_code == 0, result.output
    assert "no CUDA GPU" in result.output and "merged into 30 linears at scale 1" in result.output
    assert "min per 9-frame clip (2 steps × " in result.output
    info = probe_video(out)
    assert (info.width, info.height, info.num_frames) == (32, 32, 16)

    # Too little free GPU memory for the DiT: the loader streams its blocks, says so, and computes the same numbers
    # (the plan is made for a GPU; here the "GPU" is the CPU, so the streamer copies CPU to CPU).
    import lvstudio.models.offload as offload
    from lvstudio.models.wan_i2v import latent_frames

    cfg = bundle.dit.cfg
    fp = offload.dit_footprint(cfg, torch.float32)
    act = offload.activation_bytes(cfg, (latent_frames(9), 4, 4), 2, torch.float32)
    free = fp.nonblock_bytes + 2 * fp.block_bytes + 3 * 1024**3 + act  # room for the stream buffers, no block more
    monkeypatch.setattr(offload, "gpu_free_bytes", lambda _dev: free)
    streamed = load_bundle(name, "cpu")
    chosen = " ".join(streamed.notes)
    assert "streaming weights block by block — 0 of 3 blocks stay on the GPU" in chosen, chosen
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 20, 3, 4, 4, generator=g)
    ctx, clip_fea = torch.randn(1, TEXT_LEN, 16, generator=g), torch.randn(1, 5, 4, generator=g)
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        want = bundle.dit(x, t, bundle.dit.new_conditioning(ctx, clip_fea, y))
        got = streamed.dit(x, t, streamed.dit.new_conditioning(ctx, clip_fea, y))
    assert torch.equal(got, want)
