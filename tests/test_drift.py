"""`lvstudio eval drift`: image statistics with known answers, variants, the storyboard, reports, plot and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lvstudio.errors import LvError
from lvstudio.eval.drift import (
    DriftConfig,
    DriftReport,
    Variant,
    check_variant,
    drift_storyboard,
    evaluate_drift,
    first_last,
    load_reports,
    parse_variant,
    plot_drift,
    summary_lines,
    variant_problem,
)
from lvstudio.eval.image_stats import colour_histograms, frame_flicker, grid_stats, histogram_distance, image_stats
from tests.helpers.random_preset import write_random_preset

TINY_CFG = DriftConfig(minutes=0.1, window_seconds=2.0, prompts=2, seconds_per_prompt=1.5, seed=0, threads=1)


@pytest.fixture(scope="module")
def tiny_report() -> tuple[DriftReport, list[dict]]:
    """A 6-second drift run of the tiny preset on causal-kv (shared by several tests)."""
    seen: list[dict] = []
    return evaluate_drift("base=tiny:causal-kv", TINY_CFG, on_window=seen.append), seen


# -- image statistics ---------------------------------------------------------------------------------------------
def test_grey_frame_has_no_saturation_chroma_or_vivid_pixels() -> None:
    grey = np.full((2, 32, 32, 3), 128, np.uint8)
    s = image_stats(grey)
    assert set(s) == {"luminance", "contrast", "saturation", "chroma", "sharpness", "vivid", "blockiness", "checker"}
    assert all(v.shape == (2,) for v in s.values())
    assert np.allclose(s["saturation"], 0) and np.allclose(s["chroma"], 0) and np.allclose(s["vivid"], 0)
    assert np.allclose(s["luminance"], 128 / 255, atol=1e-4)
    assert np.allclose(s["contrast"], 0, atol=1e-6) and np.allclose(s["sharpness"], 0)


def test_pure_red_is_fully_saturated_and_vivid() -> None:
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    s = image_stats(red)  # a single [H, W, 3] frame is accepted
    assert s["saturation"][0] == pytest.approx(1.0) and s["chroma"][0] == pytest.approx(1.0)
    assert s["vivid"][0] == pytest.approx(1.0) and s["luminance"][0] == pytest.approx(0.299, abs=1e-4)


def test_half_black_half_white_contrast() -> None:
    f = np.zeros((1, 32, 32, 3), np.uint8)
    f[:, :, 16:] = 255
    s = image_stats(f)
    assert s["luminance"][0] == pytest.approx(0.5, abs=1e-3) and s["contrast"][0] == pytest.approx(0.5, abs=1e-3)


def test_blur_lowers_sharpness() -> None:
    import cv2

    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(sharp, (7, 7), 2.0)
    a, b = image_stats(np.stack([sharp, blurred]))["sharpness"]
    assert a > 5 * b > 0


def test_histograms_and_distance() -> None:
    black = np.zeros((1, 16, 16, 3), np.uint8)
    white = np.full((1, 16, 16, 3), 255, np.uint8)
    hb, hw = colour_histograms(black), colour_histograms(white)
    assert hb.shape == (1, 512) and hb.sum() == 256 and hb[0, 0] == 256 and hw[0, 511] == 256
    assert histogram_distance(hb[0], hb[0] * 3) == pytest.approx(0.0, abs=1e-9)  # counts are normalised
    assert histogram_distance(hb[0], hw[0]) == pytest.approx(1.0)
    assert math.isnan(histogram_distance(hb[0], np.zeros(512)))
    mixed = np.concatenate([black, white], axis=2)  # half and half
    assert 0.0 < histogram_distance(colour_histograms(mixed)[0], hb[0]) < 1.0


def test_frame_flicker() -> None:
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[2] = 255
    f = frame_flicker(frames)
    assert math.isnan(f[0]) and f[1] == 0.0 and f[2] == pytest.approx(1.0)
    assert frame_flicker(frames[:1], previous=frames[2])[0] == pytest.approx(1.0)


def test_stats_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        image_stats(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        colour_histograms(np.zeros((8, 8), np.uint8))


# -- config, variants, storyboard ------------------------------------------------------------------------------------
def test_config_validation() -> None:
    with pytest.raises(ValueError, match="minutes"):
        DriftConfig(minutes=0)
    with pytest.raises(ValueError, match="prompts"):
        DriftConfig(prompts=0)
    with pytest.raises(ValueError, match="threads"):
        DriftConfig(threads=-1)


def test_parse_variant() -> None:
    assert parse_variant("base=tiny:causal-kv") == Variant("base", "tiny", "causal-kv", None)
    v = parse_variant(" crossclip = tiny : erft-crossclip : lora=off ")
    assert v == Variant("crossclip", "tiny", "erft-crossclip", False)
    assert v.text == "crossclip=tiny:erft-crossclip:lora=off"
    assert parse_variant("e=tiny:erft-crossclip:lora=on").lora is True
    assert parse_variant("e=tiny:erft-crossclip:lora=runs/x.safetensors").lora == "runs/x.safetensors"
    assert parse_variant("tiny:streaming-dit").name == "tiny-streaming-dit"
    for text in ("base=tiny:causal-kv", "e=tiny:erft-crossclip:lora=on", "e=tiny:erft-crossclip:lora=a/b.st"):
        assert parse_variant(text).text == text


@pytest.mark.parametrize(("text", "match"), [
    ("base=tiny", "PRESET:BACKEND"),
    ("base=tiny:warp-drive", "unknown backend"),
    ("base=tiny:causal-kv:lora=off", "only to the erft-crossclip"),
    ("base=tiny:erft-crossclip:steps=3", "unknown option"),
    ("b/a=tiny:causal-kv", "name"),
])
def test_parse_variant_errors(text: str, match: str) -> None:
    with pytest.raises(LvError, match=match):
        parse_variant(text)


def test_variant_availability(tmp_path: Path) -> None:
    problem = variant_problem(parse_variant("sf=tiny-slow:causal-kv"))
    assert problem is not None and "tiny-slow" in problem and "tiny" in problem.split("choose one of", 1)[1]
    with pytest.raises(LvError, match="tiny-slow"):
        check_variant(parse_variant("sf=tiny-slow:causal-kv"))
    assert variant_problem(parse_variant("base=tiny:causal-kv")) is None
    with_lora = write_random_preset(tmp_path / "with-lora", lora=True)
    assert variant_problem(parse_variant(f"erft={with_lora}:erft-crossclip:lora=on")) is None
    assert variant_problem(parse_variant("cc=tiny:erft-crossclip:lora=off")) is None  # tiny names no LoRA: fine
    assert "LoRA" in (variant_problem(parse_variant("erft=tiny:erft-crossclip:lora=on")) or "")
    assert "not found" in (variant_problem(parse_variant("erft=tiny:erft-crossclip:lora=/nonexistent.st")) or "")


def test_storyboard_cycles_prompts_and_fills_the_duration() -> None:
    cfg = DriftConfig(minutes=2.0, prompts=3, seconds_per_prompt=25.0, seed=4)
    shots = drift_storyboard(cfg)
    assert [t for t, _, _ in shots] == [25.0 * i for i in range(5)]  # 0..100 s; 125 s is past 120 s
    prompts = [p for _, p, _ in shots]
    assert len(set(prompts)) == 3 and prompts[3:] == prompts[:2]
    assert all(spec.caption() == p for _, p, spec in shots)
    assert drift_storyboard(cfg) == shots and drift_storyboard(DriftConfig(minutes=2.0, prompts=3,
                                                                           seconds_per_prompt=25.0, seed=5)) != shots


# -- a tiny run, reports, plot ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run(tiny_report: tuple[DriftReport, list[dict]]) -> None:
    report, seen = tiny_report
    assert [w["index"] for w in report.windows] == [0, 1, 2] and seen == report.windows
    assert sum(w["frames"] for w in report.windows) == 96  # 6 s at 16 fps
    assert report.windows[-1]["end_s"] == pytest.approx(6.0)
    for w in report.windows:
        for key in ("scene", "colour", "shape", "objects", "saturation", "chroma", "vivid", "hist_distance"):
            assert 0.0 <= w[key] <= 1.0, (key, w)
        assert w["sharpness"] > 0 and 0 <= w["flicker"] < 1
    assert len(report.prompts) == 2 and len(report.shots) == 4
    assert [s["occurrence"] for s in report.shots] == [0, 0, 1, 1]
    assert report.frames_per_second > 0 and report.preset == "tiny"
    first, last, slope = first_last(report, "scene")
    assert 0 <= first <= 1 and 0 <= last <= 1 and math.isfinite(slope)


@pytest.mark.slow
def test_crossclip_with_lora_off() -> None:
    cfg = DriftConfig(minutes=0.03, window_seconds=1.0, prompts=1, seconds_per_prompt=10.0, threads=1)
    report = evaluate_drift(parse_variant("cc=tiny:erft-crossclip:lora=off"), cfg)
    assert report.backend == "erft-crossclip" and sum(w["frames"] for w in report.windows) == round(0.03 * 60 * 16)
    assert len(report.shots) == 1 and report.variant == "cc=tiny:erft-crossclip:lora=off"


@pytest.mark.slow
def test_json_round_trip_and_plot(tmp_path: Path, tiny_report: tuple[DriftReport, list[dict]]) -> None:
    report = tiny_report[0]
    odd = DriftReport.from_json(report.to_json())
    odd.windows[0]["flicker"] = float("nan")  # NaN survives as null
    again = DriftReport.from_json(odd.to_json())
    assert math.isnan(again.windows[0]["flicker"]) and again.config == report.config
    assert again.windows[1:] == report.windows[1:] and again.shots == report.shots
    path = report.save(tmp_path / "base.json")
    assert load_reports(path)[0].windows == report.windows
    png = plot_drift([report, again], tmp_path / "plots" / "drift.png")
    assert png.exists() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert [r.name for r in load_reports(png.with_suffix(".json"))] == ["base", "base"]
    lines = summary_lines([report])
    assert any("scene adherence" in line for line in lines) and any("base=tiny:causal-kv" in line for line in lines)
    with pytest.raises(LvError):
        (tmp_path / "junk.json").write_text(json.dumps({"x": 1}))
        load_reports(tmp_path / "junk.json")


# -- the CLI --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_drift(tmp_path: Path) -> None:
    from lvstudio.cli import app

    out, runs = tmp_path / "d.png", tmp_path / "runs"
    args = ["eval", "drift", "--minutes", "0.05", "--window", "1", "--prompts", "2", "--seconds-per-prompt", "1",
            "--variant", "base=tiny:causal-kv", "--out", str(out), "--json-dir", str(runs)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and (runs / "base.json").exists() and out.with_suffix(".json").exists()
    assert "scene adherence" in result.stdout
    replot = CliRunner().invoke(app, ["eval", "drift", "--replot", str(runs / "base.json"), "--out",
                                      str(tmp_path / "again.png")])
    assert replot.exit_code == 0, replot.output
    assert (tmp_path / "again.png").exists()
    again = CliRunner().invoke(app, ["eval", "drift", "--replot", str(runs / "base.json"), "--out", str(out)])
    assert again.exit_code == 2 and "already exists — pass --force" in again.stderr  # before any work
    forced = CliRunner().invoke(app, ["eval", "drift", "--replot", str(runs / "base.json"), "--out", str(out),
                                      "--force"])
    assert forced.exit_code == 0, forced.output
    fresh = str(tmp_path / "new.png")
    bad = CliRunner().invoke(app, ["eval", "drift", "--variant", "sf=tiny-slow:causal-kv", "--out", fresh])
    assert bad.exit_code == 2 and "tiny-slow" in bad.stderr
    blend = CliRunner().invoke(app, ["eval", "drift", "--transition", "blend", "--out", fresh])
    assert blend.exit_code == 2 and "transition must be 'switch' or 'cut'" in blend.stderr
    for wrong, says in (("d.txt", "this writes a .png file"), (".", "is a folder")):
        refused = CliRunner().invoke(app, ["eval", "drift", "--out", str(tmp_path / wrong)])
        assert refused.exit_code == 2 and says in refused.stderr
    png = CliRunner().invoke(app, ["eval", "drift", "--replot", str(out), "--out", fresh])  # the plot, not its data
    assert png.exit_code == 2 and "is not a drift report" in png.stderr and "Traceback" not in png.output


def test_grid_stats_see_latent_tiles_and_checkerboards() -> None:
    from lvstudio.world import sample_clip

    clean = sample_clip(3, 4, size=128).frames
    stats = image_stats(clean)
    assert np.all(np.abs(stats["blockiness"] - 1.0) < 0.35) and np.all(stats["checker"] < 0.01)
    rng = np.random.default_rng(0)
    tiles = np.kron(rng.random((1, 16, 16)), np.ones((1, 8, 8)))  # flat 8x8 cells: every step lies on the grid
    smooth = np.cumsum(np.full((1, 128, 128), 1.0 / 128), axis=2)  # a ramp: steps everywhere, none special
    assert grid_stats(tiles)["blockiness"][0] > 10 and abs(grid_stats(smooth)["blockiness"][0] - 1.0) < 1e-3
    checker = (np.indices((128, 128)).sum(axis=0) % 2).astype(np.float64)[None]
    assert grid_stats(checker)["checker"][0] == 1.0 and grid_stats(smooth)["checker"][0] < 1e-6


@pytest.mark.slow
def test_the_prompts_are_joined_by_cuts_or_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """--transition cut: every prompt starts a new shot (the history is not carried); switch (default): one shot."""
    from lvstudio.prompt_stream import PromptStreamBuffer

    with pytest.raises(ValueError, match="transition must be 'switch' or 'cut'"):
        DriftConfig(transition="blend")
    seen: list[str] = []
    add_shot = PromptStreamBuffer.add_shot

    def recording(self, at, prompt, transition, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(transition)
        return add_shot(self, at, prompt, transition, **kw)

    monkeypatch.setattr(PromptStreamBuffer, "add_shot", recording)
    for transition in ("cut", "switch"):
        seen.clear()
        cfg = DriftConfig(minutes=0.05, window_seconds=1.0, prompts=2, seconds_per_prompt=1.0, transition=transition)
        report = evaluate_drift("base=tiny:causal-kv", cfg)
        assert seen == ["cut"] + [transition] * 2 and report.config.transition == transition
        assert DriftReport.from_json(report.to_json()).config == cfg
        assert f"each prompt a {transition}" in summary_lines([report])[0]


def test_stability_reports_the_noise_of_one_showing_and_flags_halves_apart_beyond_it() -> None:
    """Per prompt: first vs last showing (the target), and the halves of its showings with one showing's sd; the
    halves are flagged only where they differ by more than 2 standard errors."""
    from lvstudio.eval.drift import per_prompt_halves, stability_lines

    noisy = [0.7, 0.3, 0.6, 0.4, 0.5, 0.4, 0.6, 0.3, 0.7, 0.5]  # up and down, no trend; first 0.7, last 0.5
    falling = [0.9, 0.9, 0.8, 0.9, 0.9, 0.2, 0.1, 0.2, 0.1, 0.2]
    shots = [{"prompt_index": p, "shape": v, "colour": 1.0, "objects": 1.0}
             for i in range(10) for p, v in ((0, noisy[i]), (1, falling[i]))]
    report = DriftReport("x=tiny:causal-kv", "x", "tiny", "causal-kv", TINY_CFG, 16, 64, 64, ["a", "b"], shots=shots)
    (k0, sd0, a0, b0, se0), (k1, sd1, a1, b1, se1) = per_prompt_halves(report, "shape")
    assert (k0, k1) == (0, 1) and sd0 == pytest.approx(float(np.std(noisy, ddof=1)))
    assert (a0, b0) == pytest.approx((0.5, 0.5)) and (a1, b1) == pytest.approx((0.88, 0.16))
    assert se0 == pytest.approx(sd0 * math.sqrt(0.4))
    lines = stability_lines(report)
    shape = lines[lines.index(next(x for x in lines if x.strip().startswith("shape"))) + 1]
    assert "p0 0.50->0.50 sd 0.15  p1" in shape and shape.endswith("!")  # the fall is flagged, the noise is not
    assert "p0 0.70->0.50 !" in next(x for x in lines if x.strip().startswith("shape"))  # the target's own check
