"""User mistakes in presets and their files end in one clear line and exit 2, never in a traceback: inconsistent
settings are refused when the preset loads (naming the preset file, the key and the fix), a weight file that holds
another model names the role and the file, `presets convert` overwrites nothing the user had without --force, and a
preset may be named by its folder. No test touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lvstudio.errors import PresetError
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> tuple[int, str]:
    from lvstudio.cli import app

    grad = torch.is_grad_enabled()
    try:  # `lvstudio render` turns autograd off for its process; the in-process runner must not leak that
        result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_grad_enabled(grad)
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _preset(tmp_path: Path, extra: str = "", **kw: int) -> Path:
    toml = write_random_preset(tmp_path / "p", **kw)
    if extra:
        toml.write_text(toml.read_text() + extra)
    return toml


# ---------------------------------------------------------------------------------------------------------------
# 1. cross-field settings the model code enforces at build time are checked when the preset loads
# ---------------------------------------------------------------------------------------------------------------


def test_presets_info_refuses_a_window_smaller_than_sink_plus_block(tmp_path: Path) -> None:
    toml = _preset(tmp_path, window=1, sink=2, block_frames=2)
    code, out = _cli("presets", "info", str(toml))
    assert code == 2, out
    assert str(toml) in out and "window_frames = 1" in out and "window_frames >= 4" in out


@pytest.mark.parametrize(("extra", "kw", "words"), [
    ("\n[streaming]\nchunk_frames = 6\n", {}, ("streaming.chunk_frames", "window_frames >= 8")),
    ("\n[crossclip]\nclip_frames = 5\ncarry_frames = 2\n", {}, ("crossclip.clip_frames (5)", "block_frames (2)")),
    ("\n[crossclip]\nclip_frames = 4\ncarry_frames = 4\n", {}, ("carry_frames < clip_frames",)),
    ("\n[dit_config]\ndim = 100\nnum_heads = 3\n", {}, ("dit_config", "not divisible by num_heads")),
    ("\n[dit_config]\nchannels = [8, 8, 8]\n", {}, ("dit_config", "unknown DiT config keys ['channels']")),
])
def test_inconsistent_backend_tables_are_refused_when_the_preset_loads(tmp_path: Path, extra: str, kw: dict,
                                                                       words: tuple[str, ...]) -> None:
    from lvstudio.presets import load_preset

    toml = _preset(tmp_path, extra, **kw)
    with pytest.raises(PresetError) as err:
        load_preset(str(toml))
    assert str(toml) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_the_shipped_presets_pass_the_cross_field_checks() -> None:
    from lvstudio.presets import available_presets, load_preset

    for path in available_presets().values():
        load_preset(path)


# ---------------------------------------------------------------------------------------------------------------
# 2. a weight file holding another model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "other", "holds", "want"), [
    ("dit", "vae", "VAE", "DiT"),
    ("dit", "text", "text encoder", "DiT"),
    ("text", "dit", "DiT", "text encoder"),
    ("vae", "dit", "DiT", "VAE"),
    ("vae", "text", "text encoder", "VAE"),
])
def test_a_weight_file_of_another_model_names_the_preset_the_role_and_the_file(tmp_path: Path, role: str,
                                                                                other: str, holds: str,
                                                                                want: str) -> None:
    from lvstudio.presets.load import load_bundle

    toml = _preset(tmp_path)
    shutil.copyfile(toml.parent / f"{other}.safetensors", toml.parent / f"{role}.safetensors")
    key = {"text": "text_encoder"}.get(role, role)
    with pytest.raises(PresetError) as err:
        load_bundle(str(toml))
    text = str(err.value)
    assert str(toml) in text and f"[files.{key}]" in text and str(toml.parent / f"{role}.safetensors") in text
    assert f"holds a {holds}'s weights" in text and f"not a {want}'s" in text


def test_dit_weights_of_another_architecture_name_the_role_and_dit_config(tmp_path: Path) -> None:
    from lvstudio.presets.load import load_bundle

    toml = _preset(tmp_path, "\n[dit_config]\ndim = 64\nffn_dim = 64\nnum_heads = 2\nnum_layers = 2\nin_dim = 4\n"
                             "out_dim = 4\nfreq_dim = 32\ntext_dim = 16\ntext_len = 12\n")
    with pytest.raises(PresetError, match=r"\[files\.dit\].*\[dit_config\]") as err:
        load_bundle(str(toml))
    assert str(toml) in str(err.value)


def test_render_with_the_vae_as_the_dit_exits_2(tmp_path: Path) -> None:
    from lvstudio.presets.cli import presets_hash

    toml = _preset(tmp_path)
    shutil.copyfile(toml.parent / "vae.safetensors", toml.parent / "dit.safetensors")
    presets_hash(str(toml), write=True, echo=lambda _m: None)  # the checksums match: only the content is wrong
    out = tmp_path / "x.mp4"
    code, text = _cli("render", str(ROOT / "storyboards" / "demo.toml"), "--duration", "0.5s", "--preset", str(toml),
                      "--out", str(out), "--no-progress")
    assert code == 2, text
    assert "[files.dit]" in text and "holds a VAE's weights" in text and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. presets convert FILE.pt --output
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_pt(tmp_path: Path) -> Path:
    path = tmp_path / "small.pt"
    torch.save({"a": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("name", ["notes.txt", "x.mp4"])
def test_convert_refuses_an_output_that_is_not_safetensors_and_keeps_it(tmp_path: Path, small_pt: Path,
                                                                        name: str) -> None:
    target = tmp_path / name
    if name == "notes.txt":
        target.write_text("my notes\n")
    code, out = _cli("presets", "convert", str(small_pt), "-o", str(target), "--kind", "tensors")
    assert code == 2, out
    assert ".safetensors" in out and str(target) in out
    assert (target.read_text() == "my notes\n") if name == "notes.txt" else not target.exists()


def test_convert_refuses_a_folder_as_output_with_exit_2(tmp_path: Path, small_pt: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    code, out = _cli("presets", "convert", str(small_pt), "-o", f"{folder}/", "--kind", "tensors")
    assert code == 2, out
    assert "is a folder" in out and "model.safetensors" in out


def test_convert_keeps_an_existing_safetensors_unless_force(tmp_path: Path, small_pt: Path) -> None:
    target = tmp_path / "mine.safetensors"
    shutil.copyfile(ROOT / "presets" / "tiny" / "vae.safetensors", target)
    before = target.read_bytes()
    code, out = _cli("presets", "convert", str(small_pt), "-o", str(target), "--kind", "tensors")
    assert code == 2, out
    assert "already exists" in out and "--force" in out and target.read_bytes() == before
    assert not (tmp_path / "mine.safetensors.lvstudio.json").exists()
    code, out = _cli("presets", "convert", str(small_pt), "-o", str(target), "--kind", "tensors", "--force")
    assert code == 0, out
    assert target.read_bytes() != before
    code, out = _cli("presets", "convert", str(small_pt), "-o", str(target), "--kind", "tensors")
    assert code == 0 and "up to date" in out, out  # an up-to-date conversion of the same file: nothing to replace
    code, out = _cli("presets", "convert", str(small_pt), "-o", str(target), "--kind", "dit")
    assert code == 2 and "already exists" in out, out  # another kind would replace it


def test_convert_of_a_missing_pt_says_it_does_not_exist(tmp_path: Path) -> None:
    code, out = _cli("presets", "convert", str(tmp_path / "nothere.pt"), "-o", str(tmp_path / "x.safetensors"))
    assert code == 2, out
    assert "does not exist" in out and "not to a preset" not in out


class Payload:  # a class: unpickling it would need code
    pass


def test_convert_refuses_a_pickle_with_code_without_pytorchs_advice(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"a": Payload()}, path)
    code, out = _cli("presets", "convert", str(path), "-o", str(tmp_path / "c.safetensors"))
    assert code == 2, out
    assert "refusing to unpickle" in out and "Payload" in out
    assert "weights_only=False" not in out and "weights_only` set to `False" not in out
    assert not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. presets hash --write on a file it cannot write
# ---------------------------------------------------------------------------------------------------------------


def test_hash_write_on_a_read_only_preset_suggests_no_missing_option(tmp_path: Path, monkeypatch) -> None:
    from lvstudio.presets import edit

    toml = _preset(tmp_path)

    def refuse(path: Path, _text: str) -> Path:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(edit, "atomic_write_text", refuse)  # root ignores file modes: refuse the write itself
    code, out = _cli("presets", "hash", str(toml.parent), "--write")
    assert code == 74, out
    assert "permission denied" in out and str(toml) in out
    assert "--out" not in out and "copy the preset's folder" in out


# ---------------------------------------------------------------------------------------------------------------
# 5. a preset named by its folder
# ---------------------------------------------------------------------------------------------------------------


def test_a_folder_holding_preset_toml_is_that_preset(tmp_path: Path) -> None:
    from lvstudio.presets import load_preset

    toml = _preset(tmp_path)
    preset = load_preset(str(toml.parent))
    assert preset.name == "random-test" and preset.sources == [toml]
    code, out = _cli("presets", "info", str(ROOT / "presets" / "tiny"))
    assert code == 0, out
    assert '"name": "tiny"' in out


def test_a_folder_without_preset_toml_or_a_missing_toml_says_so(tmp_path: Path) -> None:
    code, out = _cli("presets", "info", str(tmp_path))
    assert code == 2, out
    assert "without a preset.toml" in out and str(tmp_path) in out
    code, out = _cli("presets", "info", str(tmp_path / "nope.toml"))
    assert code == 2, out
    assert "does not exist" in out and str(tmp_path / "nope.toml") in out
