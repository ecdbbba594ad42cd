"""Weight storage (`lvstudio.models.weight_storage`): float16 / int8 files load back as float models, close to the
float32 ones; a broken int8 file is a clear error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvstudio.checked_files import load_checked, read_metadata
from lvstudio.errors import DamagedFileError
from lvstudio.models.weight_storage import (
    INT8_MIN_ELEMENTS,
    SCALE_SUFFIX,
    decode_storage,
    encode_storage,
    read_weights,
    store_weights,
)
from tests.helpers.random_preset import write_random_preset
from tests.helpers.vae_tiny import small_vae_config_file


def test_int8_keeps_each_weight_within_half_a_step_of_its_channel_scale() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"lin.weight": torch.randn(64, 48, generator=g) * torch.linspace(0.01, 3, 64)[:, None],
               "conv.weight": torch.randn(16, 8, 3, 3, generator=g), "lin.bias": torch.randn(64, generator=g),
               "small.weight": torch.randn(8, 8, generator=g), "steps": torch.arange(5)}
    stored, meta = encode_storage(tensors, "int8")
    assert meta == {"storage": "int8-per-channel"}
    assert stored["lin.weight"].dtype == torch.int8 and stored["conv.weight"].dtype == torch.int8
    assert stored["lin.weight" + SCALE_SUFFIX].shape == (64, 1)
    assert stored["conv.weight" + SCALE_SUFFIX].shape == (16, 1, 1, 1)
    assert stored["lin.bias"].dtype == torch.float16 and stored["small.weight"].dtype == torch.float16  # < 1,024
    assert 8 * 8 < INT8_MIN_ELEMENTS and torch.equal(stored["steps"], tensors["steps"])
    back = decode_storage(stored, meta)
    assert set(back) == set(tensors)
    for name in ("lin.weight", "conv.weight"):
        scale = stored[name + SCALE_SUFFIX]
        assert back[name].dtype == torch.float32
        assert ((back[name] - tensors[name]).abs() <= scale / 2 + 1e-7).all()
        # Each output channel's largest weight is stored exactly (it is +-127 steps).
        assert torch.allclose(back[name].abs().flatten(1).amax(1), tensors[name].abs().flatten(1).amax(1))
    assert decode_storage(stored, {}) is not stored and decode_storage(tensors, {})["lin.bias"] is tensors["lin.bias"]


def test_float_storages_only_change_the_dtype() -> None:
    t = {"w": torch.randn(40, 40, dtype=torch.float64), "n": torch.tensor([3])}
    half, meta = encode_storage(t, "float16")
    assert meta == {"storage": "float16"} and half["w"].dtype == torch.float16 and half["n"].dtype == torch.int64
    full, _ = encode_storage(t, "float32")
    assert full["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="choose one of float32, float16, int8"):
        encode_storage(t, "int4")  # type: ignore[arg-type]


def test_an_int8_preset_loads_and_runs_close_to_the_float32_one(tmp_path: Path) -> None:
    from lvstudio.presets.load import load_bundle

    preset = write_random_preset(tmp_path / "f32")
    small = tmp_path / "int8"
    shutil.copytree(preset.parent, small)
    for name in ("dit.safetensors", "text.safetensors", "vae.safetensors"):
        store_weights(preset.parent / name, small / name, "int8")
        tensors, meta = load_checked(small / name)  # written with their own checksum, the metadata kept
        assert meta["storage"] == "int8-per-channel"
        assert set(read_metadata(preset.parent / name)) <= meta.keys()
    dit_bytes = (small / "dit.safetensors").stat().st_size / (preset.parent / "dit.safetensors").stat().st_size
    assert dit_bytes < 0.45  # int8 weights + float16 biases/norms + headers, of a float32 file
    a, b = load_bundle(str(preset)), load_bundle(str(small / "preset.toml"))
    # Every tensor back in float, each within a couple of percent of the original.
    for (name, wa), wb in zip(a.dit.state_dict().items(), b.dit.state_dict().values(), strict=True):
        assert wb.dtype == torch.float32
        assert (wa - wb).norm() <= 0.02 * wa.norm() + 1e-3, name
    # And the models compute nearly the same things: DiT velocity, text embedding, VAE decode.
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 2, 8, 8), torch.full((1, 2), 700.0)
    ctx_a, ctx_b = a.text.encode(["a red ball on the grass"]), b.text.encode(["a red ball on the grass"])
    assert (ctx_a - ctx_b).norm() <= 0.02 * ctx_a.norm()
    z = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        va = a.dit(x, t, a.dit.new_conditioning(ctx_a))
        vb = b.dit(x, t, b.dit.new_conditioning(ctx_b))
        da, db = a.vae.decode(z), b.vae.decode(z)
    assert (va - vb).norm() <= 0.03 * va.norm()
    assert (da - db).norm() <= 0.03 * da.norm()


def test_an_int8_tensor_without_its_scale_is_a_damaged_file(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    save_file({"lin.weight": torch.randn(64, 32)}, str(src), metadata={"format": "pt"})
    store_weights(src, tmp_path / "q.safetensors", "int8")
    tensors = load_file(str(tmp_path / "q.safetensors"))
    del tensors["lin.weight" + SCALE_SUFFIX]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata={"storage": "int8-per-channel"})
    with pytest.raises(DamagedFileError, match=r"broken\.safetensors is damaged: its int8 tensor lin\.weight has no"):
        read_weights(tmp_path / "broken.safetensors")


@pytest.mark.slow
def test_train_export_refuses_an_unknown_storage_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "df.toml"
    config.write_text('out_dir = "run"\n')
    proc = subprocess.run([sys.executable, "-m", "lvstudio", "train", "export", str(config), "--to", str(tmp_path),
                           "--storage", "int4"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--storage 'int4' is not a weight storage — choose float32, float16, int8" in lines[0]


@pytest.mark.slow
def test_a_vae_run_exports_in_its_export_storage(tmp_path: Path) -> None:
    from lvstudio.models.tiny_vae import load_vae
    from lvstudio.train.vae_config import run_vae_config

    config = small_vae_config_file(tmp_path / "vae.toml", "run", steps=1, size=32, export="preset/vae.safetensors",
                                   export_storage="int8")
    (tmp_path / "preset").mkdir()
    run_vae_config(config, progress=False)
    tensors, meta = load_checked(tmp_path / "preset" / "vae.safetensors")
    assert meta["storage"] == "int8-per-channel" and any(t.dtype == torch.int8 for t in tensors.values())
    full = load_vae(json.loads((tmp_path / "run" / "result.json").read_text())["model_path"]).state_dict()
    small = load_vae(tmp_path / "preset" / "vae.safetensors").state_dict()
    assert full.keys() == small.keys()
    assert all((full[k] - small[k]).norm() <= 0.02 * full[k].norm() + 1e-3 for k in full)


def test_a_vae_run_with_impossible_model_sizes_names_the_file_and_table(tmp_path: Path) -> None:
    config = small_vae_config_file(tmp_path / "vae.toml", "run", model={"channels": [8, 8, 16], "z_dim": 6})
    proc = subprocess.run([sys.executable, "-m", "lvstudio", "train", "vae", str(config)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{config}: [model]: channels (8, 8, 16) need" in proc.stderr and "c2 % z_dim == 0" in proc.stderr


def test_a_vae_run_from_another_model_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, save_vae

    save_vae(TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 16, 16))), tmp_path / "src.safetensors")
    config = small_vae_config_file(tmp_path / "vae.toml", "run", init_from="src.safetensors",
                                   model={"channels": [8, 8, 16], "z_dim": 8})
    proc = subprocess.run([sys.executable, "-m", "lvstudio", "train", "vae", str(config)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has another model" in proc.stderr and "(channels)" in proc.stderr
    assert not (tmp_path / "run").exists()
