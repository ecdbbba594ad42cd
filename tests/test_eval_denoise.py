"""`lvstudio eval denoise`: the one-step denoising probe's mechanics on tiny random weights (the figures come from the
trained preset, README "tiny v2: where it stands")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lvstudio.world import COLOURS, EFFECTS, MOTIONS, SCENES, SHAPES, SIZES, SWITCH_KINDS, ObjectSpec, SceneSpec
from lvstudio.world.grammar import EXCLUDED_SCENE_EFFECTS
from tests.helpers.random_bundle import random_bundle
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:the tiny preset does not know")  # the random encoder's 13 words

_objects = st.builds(ObjectSpec, st.sampled_from(COLOURS), st.sampled_from(SHAPES), st.sampled_from(MOTIONS),
                     st.sampled_from(SIZES))
_specs = st.builds(SceneSpec, st.sampled_from(SCENES), st.lists(_objects, min_size=1, max_size=3).map(tuple),
                   st.sampled_from((None, *EFFECTS))).filter(
    lambda s: (s.scene, s.effect) not in EXCLUDED_SCENE_EFFECTS)


def _differences(a: SceneSpec, b: SceneSpec) -> set[str]:
    """The fields in which two specs differ: 'scene', 'effect', 'objects', or 'primary.<field>'."""
    out = {k for k in ("scene", "effect") if getattr(a, k) != getattr(b, k)}
    if a.objects[1:] != b.objects[1:]:
        out.add("objects")
    out |= {f"primary.{f.name}" for f in dataclasses.fields(ObjectSpec)
            if getattr(a.primary, f.name) != getattr(b.primary, f.name)}
    return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(spec=_specs, seed=st.integers(0, 2**32 - 1))
def test_swapped_specs_change_exactly_the_chosen_attribute(spec: SceneSpec, seed: int) -> None:
    from lvstudio.eval.denoise_probe import STEER_KINDS, swapped_specs

    swaps = swapped_specs(spec, np.random.default_rng(seed))
    assert tuple(swaps) == STEER_KINDS
    assert swaps == swapped_specs(spec, np.random.default_rng(seed))  # deterministic for a seed
    for kind, swapped in swaps.items():
        assert _differences(spec, swapped) == ({"scene"} if kind == "scene" else {f"primary.{kind}"})
        assert swapped.caption() != spec.caption()
    assert swaps["colour"].primary.colour not in {o.colour for o in spec.objects}  # no object has the new colour
    assert (swaps["scene"].scene, spec.effect) not in EXCLUDED_SCENE_EFFECTS


def test_change_spec_motion_and_unknown_kind() -> None:
    from lvstudio.world import change_spec, sample_spec

    spec = sample_spec(np.random.default_rng(3))
    assert SWITCH_KINDS == ("scene", "colour", "shape", "motion")
    assert _differences(spec, change_spec(spec, "motion", np.random.default_rng(0))) == {"primary.motion"}
    with pytest.raises(ValueError, match="unknown kind 'size'"):
        change_spec(spec, "size", np.random.default_rng(0))


def _tiny_vae_bundle():  # noqa: ANN202 - a ModelBundle
    """The random bundle at 128 px with the shipped tiny VAE (its read-back is far from trivial: the oracle reads
    scenes and colours) and a random DiT of that VAE's 16 latent channels."""
    from lvstudio.models.tiny_vae import load_vae
    from lvstudio.models.wan_dit import WanDiT, WanDiTConfig

    bundle = random_bundle(size=128)
    bundle.vae = load_vae(ROOT / "presets" / "tiny" / "vae.safetensors").train(False)
    torch.manual_seed(1)
    bundle.dit = WanDiT(WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16,
                                     freq_dim=32, text_dim=16, text_len=8)).eval()
    with torch.no_grad():
        bundle.dit.head.head.weight.normal_(0, 0.05)
    bundle.latent_channels = 16
    return bundle


def test_sigma_zero_row_is_the_vae_read_back() -> None:
    from lvstudio.eval.denoise_probe import DenoiseConfig, evaluate_denoise
    from lvstudio.eval.vae_readback import vae_readback

    report = evaluate_denoise(_tiny_vae_bundle(), DenoiseConfig(clips=2, sigmas=(0.5,)))
    assert [r.sigma for r in report.rows] == [0.0, 0.5] and report.frames == 5  # blocks of 2 latents
    vae = vae_readback(ROOT / "presets" / "tiny" / "vae.safetensors", clips=2, frames=5, switch_prob=0.0)
    assert report.rows[0].data == vae.adherence
    # Shape read-back per motion of the primary object: the clips' motions, a rate each, and a report line.
    from lvstudio.eval.vae_readback import HELD_OUT_SEED
    from lvstudio.world import sample_clip

    motions = {sample_clip(HELD_OUT_SEED + i, 5, switch_prob=0.0).specs[0].objects[0].motion for i in range(2)}
    assert set(vae.by_motion) == motions and all(0.0 <= v <= 1.0 for v in vae.by_motion.values())
    assert any(line.startswith("  shape by motion: ") for line in vae.lines())
    assert report.rows[0].data["scene"] == 1.0 and report.rows[0].data["colour"] == 1.0  # not trivially zero
    assert report.rows[0].latent_mse is None and report.rows[0].follows_text == {}
    # A random DiT does not know the world: its one-step prediction at σ = 0.5 loses what the VAE keeps.
    assert report.rows[1].latent_mse > 0.01 and report.rows[1].data != report.rows[0].data


def test_a_probe_in_another_pose_reads_those_clips() -> None:
    from lvstudio.eval.denoise_probe import DenoiseConfig, evaluate_denoise
    from lvstudio.world import Pose

    bundle = _tiny_vae_bundle()
    free = evaluate_denoise(bundle, DenoiseConfig(clips=3, sigmas=(0.5,)))
    upright = evaluate_denoise(bundle, DenoiseConfig(clips=3, sigmas=(0.5,), pose=Pose(upright=True, grid=16)))
    assert [c["caption"] for c in upright.per_clip] == [c["caption"] for c in free.per_clip]  # the same clips
    assert upright.rows[1].latent_mse != free.rows[1].latent_mse  # drawn at another angle
    assert upright.pose == {"upright": True, "grid": 16} and free.pose == {}
    assert "objects upright, on a 16-px grid" in upright.lines()[0] and "upright" not in free.lines()[0]


def test_probe_is_deterministic_for_a_seed_and_conditions_on_the_swapped_captions() -> None:
    from lvstudio.eval.denoise_probe import STEER_KINDS, DenoiseConfig, evaluate_denoise
    from lvstudio.world import parse_caption

    bundle = random_bundle(size=32)
    bundle.preset = bundle.preset.model_copy(update={
        "negative_prompt": "a cube", "sampler": bundle.preset.sampler.model_copy(update={"cfg_scale": 3.0})})
    encoded: list[str] = []
    encode = bundle.text.encode
    bundle.text.encode = lambda prompts: (encoded.extend(prompts), encode(prompts))[1]

    cfg = DenoiseConfig(clips=2, sigmas=(0.9, 0.5, 0.5))
    first = evaluate_denoise(bundle, cfg)
    assert cfg.sigmas == (0.5, 0.9) and first.cfg_scale == 3.0
    assert dataclasses.asdict(first) == dataclasses.asdict(evaluate_denoise(bundle, cfg))
    other = evaluate_denoise(bundle, dataclasses.replace(cfg, seed=1))
    assert [r.latent_mse for r in other.rows] != [r.latent_mse for r in first.rows]  # other noise
    # Every caption the DiT saw: the negative prompt (guidance), each clip's true caption and its three swaps.
    assert "a cube" in encoded
    for clip in first.per_clip:
        true = parse_caption(clip["caption"])
        assert {clip["caption"], *(clip[f"{k}_swapped"] for k in STEER_KINDS)} <= set(encoded)
        for kind in STEER_KINDS:
            swapped = parse_caption(clip[f"{kind}_swapped"])
            assert _differences(true, swapped) == ({"scene"} if kind == "scene" else {f"primary.{kind}"})
        assert set(clip["sigma"]) == {"0", "0.5", "0.9"}
    for row in first.rows[1:]:
        assert set(row.follows_text) == set(row.keeps_data) == set(STEER_KINDS)
        assert all(0.0 <= v <= 1.0 for v in (*row.follows_text.values(), *row.keeps_data.values()))
    # The scene steer row: a frame reads as the swapped scene or the true one, never both.
    assert all(row.follows_text["scene"] + row.keeps_data["scene"] <= 1.0 for row in first.rows[1:])
    assert any("one word swapped" in line for line in first.lines())


def test_bad_sigmas_and_clips_are_refused() -> None:
    from lvstudio.eval.denoise_probe import DenoiseConfig, parse_sigmas

    assert parse_sigmas("0.3, 0.5,1") == (0.3, 0.5, 1.0)
    for bad, match in ((dict(sigmas=(1.5,)), r"1\.5 is not a noise level in \(0, 1\]"),
                       (dict(sigmas=(0.0,)), "0 is not a noise level"), (dict(sigmas=()), "at least one"),
                       (dict(sigmas=(float("nan"),)), "nan is not"), (dict(clips=0), "--clips must be at least 1"),
                       (dict(cfg_scale=-1.0), "--cfg-scale must be")):
        with pytest.raises(ValueError, match=match):
            DenoiseConfig(**bad)
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_sigmas("0.5,x")


def test_cli_bad_sigmas_exit_2_with_one_line() -> None:
    from lvstudio.cli import app

    res = CliRunner().invoke(app, ["eval", "denoise", "--sigmas", "1.5"])
    assert res.exit_code == 2
    assert res.output.strip() == "--sigmas: 1.5 is not a noise level in (0, 1] (0, the VAE alone, is always shown)"
    res = CliRunner().invoke(app, ["eval", "denoise", "--clips", "0"])
    assert res.exit_code == 2 and res.output.strip() == "--clips must be at least 1, got 0"
    res = CliRunner().invoke(app, ["eval", "denoise", "--grid", "-16"])
    assert res.exit_code == 2 and res.output.strip() == "grid must be a whole number of px >= 0 (0 = off), got -16"


def test_cli_on_a_random_preset_writes_json_and_keeps_an_existing_file(tmp_path: Path) -> None:
    from lvstudio.cli import app

    preset = write_random_preset(tmp_path / "p", size=32)
    out = tmp_path / "denoise.json"
    args = ["eval", "denoise", "--preset", str(preset), "--clips", "1", "--sigmas", "0.5", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "0 (VAE)" in res.output and "random-test" in res.output
    saved = json.loads(out.read_text())
    assert [r["sigma"] for r in saved["rows"]] == [0.0, 0.5] and saved["clips"] == 1
    out.write_text("mine")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.output and out.read_text() == "mine"
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0 and out.read_text() != "mine"


def test_cli_pose_flags_reach_the_held_out_clips(tmp_path: Path) -> None:
    from lvstudio.cli import app

    preset = write_random_preset(tmp_path / "p", size=32)
    out = tmp_path / "denoise.json"
    res = CliRunner().invoke(app, ["eval", "denoise", "--preset", str(preset), "--clips", "1", "--sigmas", "0.5",
                                   "--upright", "--slots", "--grid", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "objects upright, in fixed slots, on a 16-px grid)" in res.output
    assert json.loads(out.read_text())["pose"] == {"upright": True, "grid": 16, "slots": True}


@pytest.mark.slow  # the trained tiny preset, 2 clips x 5 noise levels x 4 captions
def test_cli_on_the_tiny_preset(tmp_path: Path) -> None:
    from lvstudio.cli import app
    from lvstudio.eval.vae_readback import vae_readback
    from lvstudio.presets import load_preset

    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["eval", "denoise", "--clips", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line.startswith("  0")]
    assert [line.split()[0] for line in table] == ["0", "0.3", "0.5", "0.7", "0.8", "0.9"]
    saved = json.loads(out.read_text())
    assert saved["preset"] == "tiny" and saved["cfg_scale"] == load_preset("tiny").sampler.cfg_scale
    vae = vae_readback(ROOT / "presets" / "tiny" / "vae.safetensors", clips=2, frames=5, switch_prob=0.0)
    assert saved["rows"][0]["data"] == vae.adherence
    # The trained DiT denoises: the one-step error grows with σ, and at σ = 0.3 it keeps the data's scene.
    mse = [r["latent_mse"] for r in saved["rows"][1:]]
    assert mse == sorted(mse) and saved["rows"][1]["data"]["scene"] >= 0.8
