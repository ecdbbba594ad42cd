"""Embedded presets' files are checked before they are loaded: the sha256 and size their preset.toml records
(`lvstudio presets hash PATH --write` writes them), then the safetensors header. A flipped byte, a truncated file or
a damaged header is one clear line and exit 2, never a render with corrupted weights or a traceback.

Tests that rely on exact hashes build their own preset in tmp_path (tiny random weights), so they hold whatever
weights presets/tiny ships; one test checks that the shipped presets record the hashes of the files they ship."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lvstudio.errors import PresetError
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hashed(tmp_path: Path) -> Path:
    """A valid embedded preset in tmp_path whose preset.toml records its files' sha256 and size."""
    from lvstudio.presets.cli import presets_hash

    toml = write_random_preset(tmp_path / "random-test")
    presets_hash(str(toml.parent), write=True, echo=lambda _m: None)
    return toml


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # one bit in the middle of the weights: same size, same header
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 100]
    elif how == "header":  # a byte of the JSON header: the file still has its size
        data[12] = 0xFF
    path.write_bytes(bytes(data))


def test_hash_write_records_sha256_and_size_and_keeps_the_file_as_written(tmp_path: Path) -> None:
    import hashlib

    import tomli

    from lvstudio.presets import load_preset
    from lvstudio.presets.cli import presets_hash

    toml = write_random_preset(tmp_path / "p")
    toml.write_text("# a maintainer's comment\n" + toml.read_text())
    lines: list[str] = []
    presets_hash(str(toml.parent), echo=lines.append)  # without --write: prints, changes nothing
    assert "not recorded" in lines[0] and "--write" in lines[-1] and "sha256" not in toml.read_text()
    presets_hash(str(toml), write=True, echo=lines.append)
    data = tomli.loads(toml.read_text())
    for role in ("dit", "text_encoder", "vae"):
        f = toml.parent / data["files"][role]["path"]
        assert data["files"][role]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert data["files"][role]["size"] == f.stat().st_size
    assert toml.read_text().startswith("# a maintainer's comment\n")  # comments and layout stay
    assert load_preset(toml).files["dit"].sha256 == data["files"]["dit"]["sha256"]
    again: list[str] = []
    presets_hash(str(toml), write=True, echo=again.append)
    assert "already up to date" in again[-1] and all("(recorded)" in line for line in again[:-1])


@pytest.mark.parametrize("how, words", [
    ("flip", "sha256"),
    ("truncate", "bytes, expected"),
])
def test_a_changed_file_is_refused_before_loading(hashed: Path, monkeypatch, how: str, words: str) -> None:
    import safetensors.torch

    from lvstudio.presets.load import load_bundle

    loads: list[str] = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: loads.append(str(a[0])) or real(*a, **k))
    _damage(hashed.parent / "vae.safetensors", how)
    with pytest.raises(PresetError, match="checksum mismatch") as err:
        load_bundle(str(hashed))
    text = str(err.value)
    assert str(hashed.parent / "vae.safetensors") in text and words in text
    assert "presets hash" in text and "git checkout" in text  # the fix: restore it, or record new weights
    assert loads == []  # refused before anything was read


@pytest.mark.parametrize("how", ["header", "truncate"])
def test_a_damaged_file_without_recorded_hashes_is_a_clear_error(tmp_path: Path, how: str) -> None:
    from lvstudio.presets.load import load_bundle

    toml = write_random_preset(tmp_path / "p")  # no sha256 recorded: the header check still runs
    _damage(tmp_path / "p" / "dit.safetensors", how)
    with pytest.raises(PresetError, match="not a readable safetensors file") as err:
        load_bundle(str(toml))
    assert str(tmp_path / "p" / "dit.safetensors") in str(err.value)


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_render_with_a_damaged_embedded_preset_exits_2_naming_the_file(hashed: Path, tmp_path: Path, monkeypatch,
                                                                        how: str) -> None:
    from lvstudio.cli import app

    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(hashed.parent.parent))
    _damage(hashed.parent / "dit.safetensors", how)
    story = tmp_path / "story.toml"
    demo = (ROOT / "storyboards" / "demo.toml").read_text()
    story.write_text(demo.replace('preset = "tiny"', 'preset = "random-test"'))
    out = tmp_path / "out.mp4"
    grad = torch.is_grad_enabled()
    try:  # `lvstudio render` turns autograd off for its process; the in-process runner must not leak that
        result = CliRunner().invoke(app, ["render", str(story), "--out", str(out), "--duration", "1s",
                                          "--no-progress"])
    finally:
        torch.set_grad_enabled(grad)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and str(hashed.parent / "dit.safetensors") in result.output
    assert not out.exists()


def test_presets_list_status_of_a_damaged_embedded_preset(hashed: Path, monkeypatch) -> None:
    from lvstudio.presets.cli import presets_list

    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(hashed.parent.parent))
    assert dict(presets_list(echo=lambda _m: None))["random-test"] == "ready"
    _damage(hashed.parent / "text.safetensors", "flip")
    assert dict(presets_list(echo=lambda _m: None))["random-test"] == "checksum mismatch"


def test_the_shipped_embedded_presets_record_the_hashes_of_what_they_ship() -> None:
    """After retraining, `lvstudio presets hash presets/<name> --write` records the new weights (see README)."""
    from lvstudio.presets import load_preset
    from lvstudio.presets.integrity import verify_local

    preset = load_preset("tiny")
    assert all(preset.files[r].sha256 and preset.files[r].size for r in preset.files)
    assert len(verify_local(preset)) == len(preset.files)


def test_a_changed_erft_lora_is_refused_when_the_bundle_loads(tmp_path: Path) -> None:
    """Every file of the preset is checked at load, not only the DiT, text encoder and VAE."""
    from lvstudio.presets.cli import presets_hash
    from lvstudio.presets.load import load_bundle

    toml = write_random_preset(tmp_path / "with-lora", lora=True)
    presets_hash(str(toml.parent), write=True, echo=lambda _m: None)
    load_bundle(str(toml))  # intact: loads
    _damage(toml.parent / "erft_lora.safetensors", "flip")
    with pytest.raises(PresetError, match="erft_lora.safetensors"):
        load_bundle(str(toml))


def test_a_base_preset_file_changes_only_what_it_says(tmp_path: Path, monkeypatch) -> None:
    """`base = "NAME"`: the file's tables merged over NAME's (the mechanism behind `presets pin`)."""
    from lvstudio.presets import load_preset

    user = tmp_path / "config"
    monkeypatch.setenv("LVSTUDIO_CONFIG", str(user))
    (user / "presets").mkdir(parents=True)
    (user / "presets" / "tiny.toml").write_text('base = "tiny"\nname = "tiny"\n[sampler]\nsteps = 3\n')
    p = load_preset("tiny")
    shipped = load_preset(ROOT / "presets" / "tiny" / "preset.toml")
    assert p.sampler.steps == 3 and p.sampler.shift == shipped.sampler.shift and p.files == shipped.files
    assert p.folder == ROOT / "presets" / "tiny" and p.sources[0] == user / "presets" / "tiny.toml"
    assert p.file_path("dit").is_file()
    (user / "presets" / "tiny.toml").write_text('base = "no-such-preset"\nname = "tiny"\n')
    with pytest.raises(PresetError, match="no preset of that name below"):
        load_preset("tiny")
    os.remove(user / "presets" / "tiny.toml")
    assert load_preset("tiny").sampler.steps == shipped.sampler.steps


@pytest.mark.parametrize(("steps", "warp", "words"), [
    ("[1000.0, 666.7, 333.0]", "true", ["666.7", "whole numbers", "warp = false"]),
    ("[1000.0, 0.0]", "false", ["(0, 1000]", "got 0"]),
    ("[]", "true", ["at least one timestep"]),
])
def test_a_few_step_list_the_sampler_cannot_run_is_refused_naming_the_key(tmp_path: Path, steps: str, warp: str,
                                                                          words: list[str]) -> None:
    from lvstudio.presets import load_preset

    text = (Path(__file__).parents[1] / "presets" / "tiny" / "preset.toml").read_text()
    head, tail = text.split("[sampler]", 1)
    tail = tail.split("[attention]", 1)[1]
    path = tmp_path / "preset.toml"
    path.write_text(f'{head}[sampler]\nkind = "few-step"\nshift = 2.0\nstep_list = {steps}\nwarp = {warp}\n\n'
                    f"[attention]{tail}")
    with pytest.raises(PresetError) as err:
        load_preset(path)
    assert str(path) in str(err.value) and "sampler" in str(err.value)
    for word in words:
        assert word in str(err.value)
    path.write_text(path.read_text().replace(f"step_list = {steps}", "step_list = [1000.0, 667.0, 333.0]"))
    assert load_preset(path).sampler.step_list == [1000.0, 667.0, 333.0]


@pytest.mark.parametrize(("table", "words"), [
    ({"svi": "film", "sampler": "few-step"}, ['"few-step" is for the latent carry-over', '"euler" or "unipc"']),
    ({"sampler": "unipc"}, ['"unipc" is for SVI clips', '"euler" or "few-step"']),
])
def test_a_cross_clip_sampler_its_clips_cannot_use_is_refused(table: dict, words: list[str]) -> None:
    from pydantic import ValidationError

    from lvstudio.presets import CrossClipSettings

    with pytest.raises(ValidationError) as err:
        CrossClipSettings(**table)
    for word in words:
        assert word in str(err.value)
    assert CrossClipSettings(sampler="few-step").sampler == "few-step"
