"""Tests of the tiny causal video VAE and its training recipe (small sizes, CPU)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from lvstudio.errors import LvError
from lvstudio.models.tiny_vae import (
    TinyVAE,
    TinyVAEConfig,
    latent_frames,
    load_vae,
    pixel_frames,
    save_vae,
    widen_latents,
)
from lvstudio.train.vae_recipe import VAETrainConfig, train_vae

SMALL = TinyVAEConfig(channels=(8, 8, 16))


def _vae(cfg: TinyVAEConfig = SMALL, seed: int = 0) -> TinyVAE:
    torch.manual_seed(seed)
    vae = TinyVAE(cfg).eval()
    # Residual/TimeUp convs start at zero; randomise them so every path is exercised.
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.05)
    return vae


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def rect_batch(num_frames: int, size: int):
    """Synthetic moving-rectangle clips [B, 3, F, S, S] in [-1, 1] (our own data, not the world)."""

    def make(rng: np.random.Generator, batch: int) -> torch.Tensor:
        out = np.empty((batch, 3, num_frames, size, size), np.float32)
        for i in range(batch):
            bg = rng.uniform(-0.6, 0.2, 3)
            col = rng.uniform(-1, 1, 3)
            x0, y0 = rng.integers(0, size // 2, 2)
            vx, vy = rng.integers(-2, 3, 2)
            rw, rh = rng.integers(size // 4, size // 2, 2)
            for f in range(num_frames):
                frame = np.broadcast_to(bg[:, None, None], (3, size, size)).copy()
                x, y = (x0 + vx * f) % size, (y0 + vy * f) % size
                frame[:, y : y + rh, x : x + rw] = col[:, None, None]
                out[i, :, f] = frame
        return torch.from_numpy(out)

    return make


# ---------------------------------------------------------------------------------------------------------------
# Shapes, validation, causality.


@torch.no_grad()
def test_shapes_and_range() -> None:
    vae = _vae(TinyVAEConfig())
    x = _video(2, 9, 32, 48)
    z = vae.encode(x)
    assert z.shape == (2, 16, 3, 4, 6)
    y = vae.decode(z)
    assert y.shape == (2, 3, 9, 32, 48)
    assert float(y.abs().max()) <= 1.0
    assert vae.encode(x[:, :, :1]).shape == (2, 16, 1, 4, 6)  # a single image → one latent
    assert vae.decode(z[:, :, :1]).shape == (2, 3, 1, 32, 48)
    out = vae(x)
    assert out.recon.shape == x.shape and out.mean.shape == out.logvar.shape == (2, 16, 3, 4, 6)
    assert latent_frames(17) == 5 and pixel_frames(5) == 17


@pytest.mark.parametrize(
    "shape", [(1, 3, 8, 16, 16), (1, 3, 0, 16, 16), (1, 3, 5, 20, 16), (1, 3, 5, 16, 12), (1, 4, 5, 16, 16)]
)
def test_bad_video_raises(shape: tuple[int, ...]) -> None:
    vae = _vae()
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(shape))
    with pytest.raises(ValueError):
        vae(torch.zeros(shape))


def test_bad_latents_and_config_raise() -> None:
    vae = _vae()
    with pytest.raises(ValueError):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError):
        vae.decode(torch.zeros(1, 16, 2, 2))
    with pytest.raises(ValueError):
        TinyVAEConfig(latents_mean=(0.0,) * 3)
    with pytest.raises(ValueError):
        TinyVAEConfig(latents_std=(0.0,) * 16)
    with pytest.raises(ValueError):
        TinyVAEConfig(channels=(32, 48, 64))  # shortcuts need integer channel ratios


@torch.no_grad()
def test_encoder_is_causal() -> None:
    vae = _vae()
    x = _video(1, 13, 16, 16)
    z = vae.encode(x)
    for k, first_changed in [(0, 0), (1, 1), (4, 1), (5, 2), (12, 3)]:
        x2 = x.clone()
        x2[:, :, k] = -x2[:, :, k]
        z2 = vae.encode(x2)
        assert torch.equal(z2[:, :, :first_changed], z[:, :, :first_changed]), k
        assert not torch.allclose(z2[:, :, first_changed], z[:, :, first_changed]), k


@torch.no_grad()
def test_decoder_is_causal() -> None:
    vae = _vae()
    z = torch.randn(1, 16, 4, 2, 2)
    y = vae.decode(z)
    for j in range(4):
        z2 = z.clone()
        z2[:, :, j] += 1.0
        y2 = vae.decode(z2)
        first = 0 if j == 0 else 1 + 4 * (j - 1)  # pixel frames of latent j start here
        assert torch.equal(y2[:, :, :first], y[:, :, :first]), j
        assert not torch.allclose(y2[:, :, first : first + 1], y[:, :, first : first + 1]), j


@torch.no_grad()
def test_latent_normalisation() -> None:
    vae = _vae()
    x = _video(1, 5, 16, 16)
    mu, _ = vae.encode_raw(x)
    mean, std = [0.1 * i for i in range(16)], [1.0 + 0.5 * i for i in range(16)]
    vae.set_latent_stats(mean, std)
    z = vae.encode(x)
    expect = (mu - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, expect)
    torch.testing.assert_close(vae.decode(z), vae.decode_raw(mu).clamp(-1, 1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Streaming.


@pytest.mark.parametrize("splits", [[1] * 7, [1, 2, 3, 1], [3, 3, 1], [2, 2, 2, 1], [2, 1, 3, 1], [7]])
@torch.no_grad()
def test_streaming_decode_equals_full(splits: list[int]) -> None:
    vae = _vae(TinyVAEConfig())
    z = torch.randn(1, 16, sum(splits), 3, 2)
    full = vae.decode(z)
    dec = vae.streaming_decoder()
    parts, start = [], 0
    for i, n in enumerate(splits):
        out = dec.decode(z[:, :, start : start + n])
        assert out.shape[2] == (pixel_frames(n) if i == 0 else 4 * n)
        parts.append(out)
        start += n
    assert float((torch.cat(parts, dim=2) - full).abs().max()) <= 1e-5
    dec.reset()  # a new video starts over
    torch.testing.assert_close(dec.decode(z[:, :, :2]), full[:, :, :5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("splits", [[1, 4, 8, 4], [5, 12], [9, 8], [17], [1, 4, 4, 4, 4]])
@torch.no_grad()
def test_streaming_encode_equals_full(splits: list[int]) -> None:
    vae = _vae(TinyVAEConfig())
    x = _video(2, sum(splits), 16, 24)
    full = vae.encode(x)
    enc = vae.streaming_encoder()
    parts, start = [], 0
    for n in splits:
        parts.append(enc.encode(x[:, :, start : start + n]))
        start += n
    got = torch.cat(parts, dim=2)
    assert got.shape == full.shape
    assert float((got - full).abs().max()) <= 1e-5


def test_streaming_encode_rejects_bad_chunks() -> None:
    vae = _vae()
    enc = vae.streaming_encoder()
    with pytest.raises(ValueError):
        enc.encode(_video(1, 4, 16, 16))  # first call needs 1 + 4k frames
    enc.encode(_video(1, 1, 16, 16))
    with pytest.raises(ValueError):
        enc.encode(_video(1, 3, 16, 16))  # later calls need 4k frames
    with pytest.raises(ValueError):
        enc.encode(_video(1, 4, 16, 24))  # same size throughout a video
    dec = vae.streaming_decoder()
    dec.decode(torch.randn(1, 16, 1, 2, 2))
    with pytest.raises(ValueError):
        dec.decode(torch.randn(2, 16, 1, 2, 2))


@pytest.mark.parametrize("time_up", ["progressive", "late"])
@torch.no_grad()
def test_new_shot_restarts_from_zero_history_with_4_frames_per_latent(time_up: str) -> None:
    """A cut: after `new_shot()` the decoder gives 4 frames per latent, nothing of the previous latents reaches the
    output (another history, or none, gives bit-identical frames), and the frames are those of a decoder whose
    every causal cache holds zeros (the literal zero history, built here by zeroing a used decoder's caches)."""
    vae = _vae(dataclasses.replace(SMALL, decoder_time_up=time_up))
    g = torch.Generator().manual_seed(1)
    before_a, before_b, shot = (torch.randn(1, 16, n, 3, 2, generator=g) for n in (3, 5, 3))
    outs = []
    for history in (before_a, before_b, None):
        dec = vae.streaming_decoder()
        if history is not None:
            dec.decode(history)
        dec.new_shot()
        outs.append(torch.cat([dec.decode(shot[:, :, :2]), dec.decode(shot[:, :, 2:])], dim=2))
    assert outs[0].shape[2] == 4 * 3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    zeroed = vae.streaming_decoder()
    zeroed.decode(before_a)
    zeroed.load_state_dict({k: torch.zeros_like(v) for k, v in zeroed.state_dict().items()})
    torch.testing.assert_close(zeroed.decode(shot), outs[0], atol=1e-6, rtol=0)
    carried = vae.streaming_decoder()  # without the restart the previous shot does reach the new one
    carried.decode(before_a)
    assert carried.decode(shot).shape == outs[0].shape and not torch.allclose(carried.decode(shot), outs[0])
    resumed = vae.streaming_decoder()  # a snapshot right after the cut resumes the restart
    dec = vae.streaming_decoder()
    dec.decode(before_a)
    dec.new_shot()
    resumed.load_state_dict(dec.state_dict())
    assert torch.equal(torch.cat([resumed.decode(shot[:, :, :2]), resumed.decode(shot[:, :, 2:])], dim=2), outs[0])


@torch.no_grad()
def test_streaming_decoder_snapshot_resume(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    vae = _vae()
    z = torch.randn(1, 16, 8, 2, 2)
    dec = vae.streaming_decoder()
    head = dec.decode(z[:, :, :3])
    snap = dec.state_dict()
    save_file(snap, str(tmp_path / "snap.safetensors"))  # caches are plain tensors
    tail = dec.decode(z[:, :, 3:])
    dec2 = vae.streaming_decoder()
    dec2.load_state_dict(load_file(str(tmp_path / "snap.safetensors")))
    assert torch.equal(dec2.decode(z[:, :, 3:]), tail)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), vae.decode(z), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        dec2.load_state_dict({"no.such.cache": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# Save / load.


@torch.no_grad()
def test_save_load_round_trip(tmp_path) -> None:
    vae = _vae()
    vae.set_latent_stats([0.5] * 16, [2.0] * 16)
    path = tmp_path / "vae.safetensors"
    save_vae(vae, path)
    loaded = load_vae(path)
    assert loaded.config == vae.config
    for (k, a), (k2, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = _video(1, 5, 16, 16)
    assert torch.equal(loaded.decode(loaded.encode(x)), vae.decode(vae.encode(x)))
    assert TinyVAEConfig.from_json(vae.config.to_json()) == vae.config


# ---------------------------------------------------------------------------------------------------------------
# Training recipe.


def _train_cfg(tmp_path, **kw) -> VAETrainConfig:
    base = dict(
        steps=6, batch_size=2, clip_frames=5, size=16, crop=0, lr=3e-3, warmup_steps=0, log_every=1, ckpt_every=2,
        eval_batches=1, stats_batches=1, out_dir=str(tmp_path / "run"), model=SMALL,
    )
    base.update(kw)
    return VAETrainConfig(**base)


@pytest.mark.slow
def test_training_reduces_loss_on_fixed_batch(tmp_path) -> None:
    fixed = rect_batch(5, 16)(np.random.default_rng(0), 2)
    losses: list[float] = []
    cfg = _train_cfg(tmp_path, steps=12)
    res = train_vae(cfg, lambda rng, b: fixed, progress=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    loaded = load_vae(res["model_path"])
    assert loaded.config.latents_std == pytest.approx(res["latents_std"])
    assert np.isfinite(res["psnr"])
    # The stored statistics make encode() roughly zero-mean / unit-std per channel on that data.
    with torch.no_grad():
        z = loaded.encode(fixed)
    assert float(z.mean(dim=(0, 2, 3, 4)).abs().max()) < 1e-3
    assert float((z.std(dim=(0, 2, 3, 4), unbiased=False) - 1).abs().max()) < 1e-3


def test_world_batch_fn_converts_clips(monkeypatch) -> None:
    import sys
    import types

    from lvstudio.train.vae_recipe import world_batch_fn

    calls = []

    def sample_clip(seed: int, num_frames: int, size: int = 128, switch_prob: float = 0.3):
        calls.append((seed, num_frames, size))
        frames = np.full((num_frames, size, size, 3), 255, np.uint8)
        frames[..., 0] = 0
        return types.SimpleNamespace(frames=frames)

    monkeypatch.setitem(sys.modules, "lvstudio.world", types.SimpleNamespace(sample_clip=sample_clip))
    x = world_batch_fn(5, 16)(np.random.default_rng(0), 3)
    assert x.shape == (3, 3, 5, 16, 16) and x.dtype == torch.float32
    assert float(x[:, 0].max()) == -1.0 and float(x[:, 1:].min()) == 1.0
    assert len(calls) == 3 and all(c[1:] == (5, 16) for c in calls)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_checkpoint_resume_matches_uninterrupted(tmp_path) -> None:
    make = rect_batch(5, 24)
    full: dict[int, float] = {}
    cfg_a = _train_cfg(tmp_path / "a", size=24, crop=16, warmup_steps=2)
    train_vae(cfg_a, make, progress=lambda s, m: full.__setitem__(s, m["loss"]))

    def stop_at_4(step: int, m: dict[str, float]) -> None:
        if step == 4:
            raise _Stop

    cfg_b = dataclasses.replace(cfg_a, out_dir=str(tmp_path / "b"))
    with pytest.raises(_Stop):
        train_vae(cfg_b, make, progress=stop_at_4)
    resumed: dict[int, float] = {}
    res = train_vae(cfg_b, make, progress=lambda s, m: resumed.__setitem__(s, m["loss"]))
    assert sorted(resumed) == [5, 6] and res["steps_run"] == 2
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_resume_rejects_other_model(tmp_path) -> None:
    make = rect_batch(5, 16)
    cfg = _train_cfg(tmp_path, steps=1)
    train_vae(cfg, make)
    with pytest.raises(LvError, match=r"trained with another model config .* — use the config the run"):
        train_vae(dataclasses.replace(cfg, model=TinyVAEConfig(channels=(8, 16, 16))), make)


@torch.no_grad()
@pytest.mark.parametrize("time_up", ["progressive", "late"])
def test_widen_latents_encodes_and_decodes_as_the_narrow_vae(time_up: str) -> None:
    vae = _vae(TinyVAEConfig(z_dim=4, channels=(8, 8, 16), decoder_time_up=time_up))
    wide = widen_latents(vae, 8)
    x = _video(2, 9, 32, 32)
    mu, _ = vae.encode_raw(x)  # [2, 4, 3, 4, 4]
    mu_wide, _ = wide.encode_raw(x)  # [2, 8, 3, 4, 4]: latent i → 2i, 2i + 1
    assert wide.config.z_dim == 8 and mu_wide.shape == (2, 8, 3, 4, 4)
    torch.testing.assert_close(mu_wide.unflatten(1, (4, 2)).mean(2), mu, atol=1e-5, rtol=1e-5)
    assert float((mu_wide[:, 0] - mu_wide[:, 1]).abs().max()) > 1e-3  # the two copies carry different numbers
    torch.testing.assert_close(wide.decode_raw(mu_wide), vae.decode_raw(mu), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        widen_latents(vae, 6)


@pytest.mark.slow
def test_training_from_a_narrower_vae_starts_from_its_weights(tmp_path) -> None:
    src = _vae(TinyVAEConfig(z_dim=4, channels=(8, 8, 16)))
    save_vae(src, tmp_path / "src.safetensors")
    make = rect_batch(5, 16)
    cfg = _train_cfg(tmp_path, steps=1, lr=0.0, model=TinyVAEConfig(z_dim=8, channels=(8, 8, 16)),
                     init_from=str(tmp_path / "src.safetensors"))  # lr 0: the weights stay where they start
    out = load_vae(train_vae(cfg, make)["model_path"])
    x = _video(1, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(out.decode_raw(out.encode_raw(x)[0]), src.decode_raw(src.encode_raw(x)[0]),
                                   atol=1e-5, rtol=1e-5)
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "other"),
                                model=TinyVAEConfig(z_dim=8, channels=(8, 16, 16)))
    with pytest.raises(LvError, match=r"another model .*\(channels\)"):
        train_vae(other, make)
    assert not (tmp_path / "other").exists()  # a refused run leaves no out_dir behind


# ---------------------------------------------------------------------------------------------------------------
# Speed report (prints only; run with -s to see it). Never asserts on time.


def test_speed_report() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vae = TinyVAE().eval()
        z = torch.randn(1, 16, 5, 16, 16)
        img = torch.rand(1, 3, 1, 128, 128) * 2 - 1
        with torch.inference_mode():
            dec = vae.streaming_decoder()
            dec.decode(z[:, :, :1])
            dec.decode(z[:, :, 1:5])  # warm-up
            t0 = time.perf_counter()
            frames = dec.decode(z[:, :, 1:5])
            t1 = time.perf_counter()
            vae.encode(img)
            t2 = time.perf_counter()
            vae.encode(img)
            t3 = time.perf_counter()
        assert frames.shape == (1, 3, 16, 128, 128)
        print(
            f"\ntiny VAE ({vae.num_parameters()} params): decode 16 frames 128x128 {1e3 * (t1 - t0):.1f} ms, "
            f"encode one image {1e3 * (t3 - t2):.1f} ms (2 threads)"
        )
    finally:
        torch.set_num_threads(threads)
