"""Training on a chosen device, and data workers that render exactly what the training process would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvstudio.train.common import ConfigError, train_device


def test_train_device_auto_and_cpu() -> None:
    assert train_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert train_device("auto").type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_device_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train_device("cuda")


def test_df_config_rejects_unknown_device(tmp_path) -> None:
    from lvstudio.train.common import load_config
    from lvstudio.train.diffusion_forcing import DFConfig

    cfg = tmp_path / "df.toml"
    cfg.write_text('device = "tpu"\n')
    with pytest.raises(ConfigError, match="device"):
        load_config(cfg, DFConfig)


@pytest.mark.slow
def test_vae_data_workers_give_the_same_batches() -> None:
    from lvstudio.train.vae_recipe import VAETrainConfig, step_batches, world_batch_fn

    make = world_batch_fn(5, size=32, cut_prob=0.5)
    here = VAETrainConfig(steps=5, batch_size=2, clip_frames=5, size=32, crop=16)
    ahead = VAETrainConfig(steps=5, batch_size=2, clip_frames=5, size=32, crop=16, data_workers=2)
    for (x0, s0), (x1, s1) in zip(step_batches(here, make, 1), step_batches(ahead, make, 1), strict=True):
        assert s0 == s1
        assert torch.equal(x0, x1)


@pytest.mark.slow
def test_dataset_workers_give_the_same_dataset() -> None:
    from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig
    from lvstudio.train.data import encode_world_dataset

    torch.manual_seed(0)
    vae = TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 8, 8), enc_blocks=(0, 0, 0), dec_blocks=(0, 0, 0))).train(False)
    here = encode_world_dataset(vae, 5, 2, 32, 0.3, seed=1, batch=2)
    ahead = encode_world_dataset(vae, 5, 2, 32, 0.3, seed=1, batch=2, workers=2)
    assert here.seeds == ahead.seeds == [1_000_003 + i for i in range(5)]
    assert here.captions == ahead.captions
    assert torch.equal(here.objects, ahead.objects)
    np.testing.assert_allclose(here.latents.numpy(), ahead.latents.numpy(), atol=1e-6)


def test_eval_vae_reads_back_reconstructions(tmp_path) -> None:
    from lvstudio.eval.vae_readback import vae_readback
    from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, save_vae
    from lvstudio.world.oracle import ADHERENCE_KEYS

    torch.manual_seed(0)
    path = tmp_path / "vae.safetensors"
    save_vae(TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 8, 8), enc_blocks=(0, 0, 0), dec_blocks=(0, 0, 0))), path)
    result = vae_readback(path, clips=2, frames=5)
    assert set(result.adherence) == set(ADHERENCE_KEYS)
    assert all(0.0 <= v <= 1.0 for v in result.adherence.values())
    assert result.adherence["shape"] < 0.5  # a random decoder draws no shapes: the read-back can fail
    assert 0 < result.psnr_db < 20 and result.decode_ms_per_second > 0
    assert "PSNR" in result.lines()[-1]


def test_eval_vae_missing_file_is_exit_2(tmp_path) -> None:
    from typer.testing import CliRunner

    from lvstudio.cli import app

    res = CliRunner().invoke(app, ["eval", "vae", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2
    assert "no such file" in res.output
