"""Decoder tuning on the DiT's last-step estimates (`lvstudio train vae-decoder`): the estimates (block-causal, one
forward each), the captions per block, the config checks, and tiny runs that tune only the decoder, resume exactly,
export, and fail cleanly from the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvstudio.cli import app
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, load_vae, save_vae
from lvstudio.sampling.flow_matching import timesteps_from_sigma
from lvstudio.train.vae_decoder import VaeDecoderConfig, block_captions, dit_estimates, train_vae_decoder
from tests.helpers.df_tiny import config_file
from tests.test_self_forcing import tiny_dit, tiny_files


def _files(folder: Path) -> dict[str, str]:
    """A tiny DiT (4 latent channels) + text encoder, and a tiny VAE of 4 latent channels with non-trivial stats."""
    files = tiny_files(folder)
    torch.manual_seed(3)
    vae = TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 8, 16), decoder_time_up="late"))
    vae.set_latent_stats([0.1, -0.2, 0.0, 0.3], [0.9, 1.1, 1.3, 0.7])
    save_vae(vae, folder / "vae.safetensors")
    return {"dit": files["real_dit"], "text": files["text"], "vae": str(folder / "vae.safetensors")}


def _cfg(out: Path, files: dict[str, str], **kw) -> VaeDecoderConfig:
    base = dict(out_dir=str(out), steps=3, batch_size=2, size=32, crop=16, clip_frames=13, lr=1e-3, warmup_steps=1,
                log_every=1, ckpt_every=2, threads=1, device="cpu", restart_prob=0.5, **files)
    return VaeDecoderConfig(**(base | kw))


def test_estimates_are_one_block_causal_forward_per_block() -> None:
    dit, spec = tiny_dit(), AttentionSpec(2, 6, 2)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, 4, generator=g)
    context, sigma = torch.randn(2, 2, 8, 16, generator=g), torch.tensor([0.3, 0.5])
    est = dit_estimates(dit, context, z0, sigma, noise, spec)
    # Block 1: its past (block 0) clean at timestep 0, itself noised to σ, the caption of block 1.
    s = sigma.view(2, 1, 1, 1, 1)
    z_s = (1 - s) * z0[:, :, 2:] + s * noise[:, :, 2:]
    t = torch.cat([torch.zeros(2, 2), timesteps_from_sigma(sigma)[:, None].expand(2, 2)], dim=1)
    with torch.no_grad():
        v = dit(torch.cat([z0[:, :, :2], z_s], 2), t, dit.new_conditioning(context[:, 1]), attention=spec)
    torch.testing.assert_close(est[:, :, 2:], z_s - s * v[:, :, 2:])
    # Block 0 sees neither block 1's latents nor its noise nor its caption.
    def flip_block_1(a: torch.Tensor, dim: int) -> torch.Tensor:  # the second half along dim (block 1) negated
        first, second = a.chunk(2, dim)
        return torch.cat([first, -second], dim)

    changed = dit_estimates(dit, flip_block_1(context, 1), flip_block_1(z0, 2), sigma, flip_block_1(noise, 2), spec)
    assert torch.equal(changed[:, :, :2], est[:, :, :2]) and not torch.allclose(changed[:, :, 2:], est[:, :, 2:])


def test_block_captions_take_the_caption_of_each_blocks_last_frame() -> None:
    captions = ["a red ball in the sky"] * 7 + ["a blue cube on the grass"] * 6  # switch at frame 7 of 13
    # Latents 0-3 end at frames 0, 4, 8, 12; block 0 = latents 0-1 (frame 4), block 1 = latents 2-3 (frame 12).
    assert block_captions(captions, 4, 2) == ["a red ball in the sky", "a blue cube on the grass"]


@pytest.mark.parametrize(("key", "value", "words"), [
    ("clip_frames", 9, "block_frames"), ("clip_frames", 12, "1 + 4k"), ("sigma_range", (0.0, 0.5), "sigma_range"),
    ("crop", 20, "multiples of 8"), ("estimate_prob", 1.5, "estimate_prob")])
def test_config_refuses_what_cannot_run(tmp_path: Path, key: str, value: object, words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        _cfg(tmp_path, {"vae": "v", "dit": "d", "text": "t"}, **{key: value})


def test_run_tunes_only_the_decoder_resumes_exactly_and_exports(tmp_path: Path) -> None:
    files = _files(tmp_path / "base")
    full = train_vae_decoder(_cfg(tmp_path / "a", files), progress=False)
    train_vae_decoder(_cfg(tmp_path / "b", files, steps=2), progress=False)
    resumed = train_vae_decoder(_cfg(tmp_path / "b", files, export=str(tmp_path / "ship.safetensors"),
                                     export_storage="int8"), progress=False)
    assert full["step"] == resumed["step"] == 3
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b and len(log_a) == 3
    base, a, b = (load_file(str(p)) for p in (files["vae"], tmp_path / "a" / "vae.safetensors",
                                               tmp_path / "b" / "vae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(base[k], a[k]) for k in base if not k.startswith("decoder."))  # encoder + stats kept
    assert any(not torch.equal(base[k], a[k]) for k in base if k.startswith("decoder."))
    shipped = load_vae(tmp_path / "ship.safetensors")
    assert shipped.config.latents_std == load_vae(files["vae"]).config.latents_std


def test_cli_names_a_missing_file_and_exits_2(tmp_path: Path) -> None:
    files = _files(tmp_path / "base")
    path = config_file(tmp_path / "tune.toml", _cfg(tmp_path / "out", files | {"dit": str(tmp_path / "nope.st")}))
    result = CliRunner().invoke(app, ["train", "vae-decoder", str(path), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "nope.st" in result.output and "Traceback" not in result.output


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    from lvstudio.errors import LvError
    from lvstudio.train.loop import save_checkpoint

    files = _files(tmp_path / "base")
    save_checkpoint(tmp_path / "out" / "checkpoint.safetensors", load_vae(files["vae"]), None, None, 5,
                    {"recipe": "diffusion-forcing"})
    with pytest.raises(LvError, match="diffusion-forcing checkpoint, not a vae-decoder one"):
        train_vae_decoder(_cfg(tmp_path / "out", files), progress=False)


def test_the_presets_config_tunes_around_its_samplers_last_sigma_into_its_run_folder() -> None:
    from lvstudio.presets.schema import load_preset
    from lvstudio.sampling.flow_matching import sigma_grid, warp_steps
    from lvstudio.train.common import load_config

    root = Path(__file__).resolve().parents[1] / "presets" / "tiny"
    cfg = load_config(root / "train_vae_decoder.toml", VaeDecoderConfig)
    assert (Path(cfg.dit), Path(cfg.text)) == (root / "dit.safetensors", root / "text.safetensors")
    assert cfg.export and Path(cfg.export).parent == Path(cfg.out_dir)  # tried, not shipped: it stays in its run
    sampler, crossclip = load_preset("tiny").sampler, load_preset("tiny").crossclip
    # The last σ of both samplers (causal-KV's and the cross-clip backend's, each re-noising on an Euler grid) is
    # where the decoder was tuned.
    assert sampler.kind == "few-step" and sampler.warp
    for last in (warp_steps(sampler.step_list, sampler.shift)[-1] / 1000, float(sigma_grid(crossclip.steps,
                                                                                           crossclip.shift)[-2])):
        assert cfg.sigma_range[0] <= last <= cfg.sigma_range[1], last


def test_fringe_weight_counts_the_colours_the_decoder_draws_where_the_target_has_none() -> None:
    """object_pixel_weight: vivid target pixels (and their rim) weigh more; with the reconstruction, so do the vivid
    pixels it draws on the target's background (a yellow fringe by a blue cube), and the loss on them grows."""
    from lvstudio.train.vae_recipe import object_pixel_weight, reconstruction_terms

    x = torch.zeros(1, 3, 1, 32, 32)  # grey background in [-1, 1]
    x[:, 2, :, 4:8, 4:8] = 1.0  # a blue object (chroma 1 of 2)
    recon = x.clone()
    recon[:, 0:2, :, 20:24, 20:24] = 0.8  # a yellow fringe far from it
    plain, fringe = object_pixel_weight(x, 8.0), object_pixel_weight(x, 8.0, recon)
    assert plain[0, 0, 0, 6, 6] > plain[0, 0, 0, 22, 22] == plain[0, 0, 0, 30, 30]
    assert fringe[0, 0, 0, 22, 22] == fringe[0, 0, 0, 6, 6] > fringe[0, 0, 0, 30, 30]
    assert (plain.mean(dim=(3, 4)) - 1).abs().max() < 1e-5 and (fringe.mean(dim=(3, 4)) - 1).abs().max() < 1e-5
    assert reconstruction_terms(recon, x, 8.0, fringe=True)["l1"] > reconstruction_terms(recon, x, 8.0)["l1"]
