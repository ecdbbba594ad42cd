"""A training config's mistakes are the user's: exit 2 with `file: key: what — fix`, before any work, no empty out_dir.

Every config here is a copy of a shipped one (or a line or two) with one mistake; nothing trains.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvstudio.train.causal_distill import CausalDistillConfig
from lvstudio.train.common import ConfigError, TrainConfigBase, load_config
from lvstudio.train.diffusion_forcing import DFConfig
from lvstudio.train.erft import ERFTConfig
from lvstudio.train.self_forcing import SelfForcingConfig
from lvstudio.train.streaming import StreamConfig
from lvstudio.train.vae_config import VAEFileConfig
from lvstudio.train.vae_decoder import VaeDecoderConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "presets" / "tiny"


def _df_config(tmp_path: Path, *changes: tuple[str, str], name: str = "train.toml",
               shipped: str = "train_df.toml") -> Path:
    """A copy of a shipped latent-space config: the VAE (and the init weights) absolute, out_dir in tmp_path/run,
    then each (pattern, replacement) applied to its lines."""
    text = (TINY / shipped).read_text(encoding="utf-8")
    text = re.sub(r'(?m)^vae = .*$', f'vae = "{TINY / "vae.safetensors"}"', text)
    text = re.sub(r'(?m)^init_dit = .*$', "", text)
    text = re.sub(r'(?m)^init_text = .*$', f'init_text = "{TINY / "text.safetensors"}"', text)
    text = re.sub(r'(?m)^out_dir = .*$', f'out_dir = "{tmp_path / "run"}"', text)
    for pattern, replacement in changes:
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert n == 1, pattern
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _cli(*args: str) -> tuple[int, str]:
    """(exit code, output) of the CLI; an exception escaping it (a traceback at the terminal) fails the test."""
    from lvstudio.cli import app

    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, SystemExit) or result.exception is None, (result.exception, result.output)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output.strip()


# ---------------------------------------------------------------------------------------------------------------
# 1. Values that do not fit each other are refused when the config is read


@pytest.mark.parametrize(("change", "says"), [
    (("^size = 128", "size = 100"), "size: the frame size must be a multiple of 8 px in [8, 512], got 100 — set size"),
    (("^size = 128", "size = 24"), "size: the procedural world draws frames of a multiple of 8 px in [32, 512]"),
    (("^size = 128", "size = 40"), "size: 40 px is 5 latents a side, not a whole number of the DiT's 2x2-latent "
                                   "patches — set size to a multiple of 16 px"),
    (("^latent_frames = 6", "latent_frames = 8"), "latent_frames: the training window of 8 latents is longer than "
                                                  "the encoded clips (clip_latents = 7) — set latent_frames"),
    (("^block_frames = 2", "block_frames = 4"), "latent_frames: 6 latents is not a whole number of causal blocks of "
                                                "block_frames = 4"),
    (("^clip_latents = 7", "clip_latents = 0"), "clip_latents: must be at least 1, got 0"),
    (("^switch_prob = 0.3", "switch_prob = 1.5"), "switch_prob: must be in [0, 1] (a share), got 1.5"),
    (("^object_slots = true", "moving_in_slots = true"), "moving_in_slots: moving_in_slots = true starts moving "
                                                         "objects at their slots, and object_slots is false"),
    (("^text_dim = 128", "text_dim = 130"), "text_dim: 130 is not divisible by the text encoder's 4 heads"),
])
def test_diffusion_forcing_values_that_do_not_fit_are_refused_when_read(tmp_path: Path, change: tuple[str, str],
                                                                        says: str) -> None:
    # size = 100 once rendered no clip: a ValueError traceback from the world, after out_dir was made.
    config = _df_config(tmp_path, change)
    with pytest.raises(ConfigError, match=re.escape(f"{config}: {says}")):
        load_config(config, DFConfig)


def test_a_bad_size_is_exit_2_for_train_and_bench_and_leaves_no_out_dir(tmp_path: Path) -> None:
    config = _df_config(tmp_path, ("^size = 128", "size = 100"), name="sizebad.toml")
    for args in (["train", "diffusion-forcing", str(config), "--no-progress"], ["bench", "train", str(config)]):
        code, out = _cli(*args)
        assert code == 2 and out.startswith(f"{config}: size: the frame size must be a multiple of 8 px"), out
        assert "— set size to one, such as 64 or 128" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("model", "lines", "says"), [
    (StreamConfig, 'out_dir = "r"\npartitions = [[4, 1]]', "partitions: [4, 1]: 4 chunks of block_frames = 2 are "
                                                           "longer than latent_frames = 6 — use at most 3 chunks"),
    (ERFTConfig, 'out_dir = "r"\nclip_latents = 6', "clip_latents: clips of 6 latents are too short for windows of "
                                                   "clip_frames = 6 latents"),
    (VAEFileConfig, 'out_dir = "r"\nclip_frames = 10', "clip_frames: 10 frames is not 1 + 4k"),
    (VAEFileConfig, 'out_dir = "r"\ncrop = 200', "crop: 200 px is not a multiple of 8 px in [0, size = 128]"),
    (SelfForcingConfig, 'out_dir = "r"\nwindow_frames = 2', "window_frames: window_frames=2 is smaller than "
                                                          "sink_frames + block_frames = 4"),
    (SelfForcingConfig, 'out_dir = "r"\nhistory_start_index = 9', "history_start_index: must index step_list"),
    (CausalDistillConfig, 'out_dir = "r"\nteacher_drop_cfg = 2.0', "teacher_drop_cfg: teacher_drop_cfg = 2.0 guides "
                                                                 "on the words of teacher_drop_words, which is empty"),
])
def test_the_other_recipes_name_the_key_that_does_not_fit(tmp_path: Path, model: type[TrainConfigBase], lines: str,
                                                          says: str) -> None:
    config = tmp_path / "train.toml"
    config.write_text(lines + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{config}: {says}")):
        load_config(config, model)


# ---------------------------------------------------------------------------------------------------------------
# 2. A missing or foreign input file is named by its key: nothing is damaged


def test_a_missing_vae_names_the_key_exit_2_and_leaves_no_out_dir(tmp_path: Path) -> None:
    # It once said ".../nothere.safetensors is damaged: the file is missing — ... git checkout -- presets/".
    config = _df_config(tmp_path, ("^vae = .*$", 'vae = "nothere.safetensors"'))
    code, out = _cli("train", "diffusion-forcing", str(config), "--no-progress")
    assert code == 2, out
    assert out == (f"{config}: vae: no such file {tmp_path / 'nothere.safetensors'} (paths are relative to the "
                   "config file's folder) — set vae to an existing VAE weight file (e.g. presets/tiny/vae.safetensors)")
    assert "damaged" not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["self-forcing", "causal-distill"])
def test_a_missing_teacher_is_a_user_mistake_not_a_disk_failure(tmp_path: Path, recipe: str) -> None:
    # It once was exit 74: "training failed: real_dit = .../dit.safetensors: no such file. The last checkpoint is
    # intact ...".
    config = tmp_path / "train.toml"
    config.write_text('out_dir = "run"\n', encoding="utf-8")
    code, out = _cli("train", recipe, str(config), "--no-progress")
    assert code == 2, out
    assert out.startswith(f"{config}: real_dit: no such file {tmp_path / 'dit.safetensors'} (paths are relative"), out
    assert "set real_dit to an existing DiT weight file" in out and "checkpoint" not in out
    assert not (tmp_path / "run").exists()


def test_a_missing_generator_init_says_to_run_the_ode_init_first(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text(f'out_dir = "run"\nreal_dit = "{TINY / "dit.safetensors"}"\ntext = "{TINY / "text.safetensors"}"'
                      '\ninit_dit = "ode/dit.safetensors"\n', encoding="utf-8")
    code, out = _cli("train", "self-forcing", str(config), "--no-progress")
    assert code == 2 and out.startswith(f"{config}: init_dit: no such file {tmp_path / 'ode' / 'dit.safetensors'}")
    assert "run the ODE init first (lvstudio train causal-distill presets/tiny/train_ode.toml)" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("target", "says"), [
    (TINY / "train_df.toml", "is not a safetensors weight file"),
    (TINY / "dit.safetensors", "is not a tiny VAE weight file (its format is 'pt', not 'lvstudio.tiny_vae/1')"),
])
def test_a_vae_that_is_not_a_vae_file_names_the_key(tmp_path: Path, target: Path, says: str) -> None:
    # A TOML once was "damaged: it cannot be parsed"; a DiT a ValueError traceback from the VAE loader.
    config = _df_config(tmp_path, ("^vae = .*$", f'vae = "{target}"'))
    code, out = _cli("train", "diffusion-forcing", str(config), "--no-progress")
    assert code == 2 and out.startswith(f"{config}: vae: {target} {says} — set vae to an existing VAE weight"), out
    assert "damaged" not in out and not (tmp_path / "run").exists()


def test_a_missing_vae_init_and_decoder_inputs_name_their_keys(tmp_path: Path) -> None:
    from lvstudio.train.vae_config import run_vae_config
    from lvstudio.train.vae_decoder import train_vae_decoder

    config = tmp_path / "vae.toml"
    config.write_text('out_dir = "run"\ninit_from = "gone.safetensors"\n', encoding="utf-8")
    gone = tmp_path / "gone.safetensors"
    with pytest.raises(ConfigError, match=re.escape(f"{config}: init_from: no such file {gone}")):
        run_vae_config(config, progress=False)
    config.write_text(f'out_dir = "run"\nvae = "{TINY / "vae.safetensors"}"\ndit = "nodit.safetensors"\n'
                      f'text = "{TINY / "text.safetensors"}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{config}: dit: no such file {tmp_path / 'nodit.safetensors'}")):
        train_vae_decoder(load_config(config, VaeDecoderConfig), progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. out_dir that is a file, a config that is a folder


def test_an_out_dir_that_is_a_file_is_exit_2_before_any_work(tmp_path: Path) -> None:
    # It once was exit 74: "training failed: File exists. The last checkpoint is intact ...", with no checkpoint.
    (tmp_path / "afile").write_text("x")
    config = _df_config(tmp_path, ("^size = 128", "size = 128"))
    config.write_text(config.read_text().replace(str(tmp_path / "run"), str(tmp_path / "afile")))
    code, out = _cli("train", "diffusion-forcing", str(config), "--no-progress")
    assert code == 2 and out == (f"{config}: out_dir: {tmp_path / 'afile'} is a file, not a folder — set out_dir to a "
                                 "folder (a new one is made when the run starts)"), out
    config.write_text(config.read_text().replace(str(tmp_path / "afile"), str(tmp_path / "afile" / "sub")))
    with pytest.raises(ConfigError, match=re.escape(f"out_dir: {tmp_path / 'afile'}, above {tmp_path / 'afile' / 'sub'}"
                                                    ", is a file")):
        load_config(config, DFConfig)


def test_a_config_that_is_a_folder_is_exit_2(tmp_path: Path) -> None:
    code, out = _cli("train", "diffusion-forcing", str(tmp_path), "--no-progress")
    assert code == 2 and out == (f"{tmp_path} is a folder, not a config file — pass the path of a training config "
                                 "TOML (e.g. presets/tiny/train_df.toml)"), out


# ---------------------------------------------------------------------------------------------------------------
# 4. A config that sets nothing


@pytest.mark.parametrize(("model", "example"), [
    (DFConfig, "train_df.toml"), (StreamConfig, "train_stream.toml"), (ERFTConfig, "train_erft.toml"),
    (SelfForcingConfig, "train_sf.toml"), (CausalDistillConfig, "train_ode.toml"), (VAEFileConfig, "train_vae.toml"),
    (VaeDecoderConfig, "train_vae_decoder.toml"),
])
def test_a_config_that_sets_nothing_is_refused(tmp_path: Path, model: type[TrainConfigBase], example: str) -> None:
    # `lvstudio train vae empty.toml` once started a 1000-step run of defaults into runs/train next to it.
    config = tmp_path / "empty.toml"
    config.write_text("# nothing but a comment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{config} sets nothing (a run of defaults only is refused) — "
                                                    f"start from a copy of presets/tiny/{example}")):
        load_config(config, model)
    assert not (tmp_path / "runs").exists()


def test_keys_left_out_of_a_config_that_sets_some_keep_their_defaults(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('out_dir = "run"\n', encoding="utf-8")
    cfg = load_config(config, VAEFileConfig)
    assert cfg.steps == 1000 and cfg.out_dir == str(tmp_path / "run") and not (tmp_path / "run").exists()
