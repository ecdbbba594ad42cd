"""The CLI skeleton: help, version, `check`, error exits, and import hygiene (no torch for --help)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvstudio import __version__
from lvstudio.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "storyboards").glob("*.toml"))
HEAVY = ("torch", "gradio", "textual", "diffusers", "transformers", "peft", "av", "cv2")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_help_in_a_subprocess(tmp_path: Path) -> None:
    result = _run("-m", "lvstudio.cli", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for word in ("check", "presets", "train", "eval", "bench"):
        assert word in result.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_importing_the_cli_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, lvstudio.cli\n"
        f"print('torch' in sys.modules)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["False", "[]"]


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lvstudio {__version__}"


@pytest.mark.parametrize("name", ["presets", "train", "eval", "bench"])
def test_command_groups_have_help(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_examples(path: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: OK" in result.stdout
    assert "{" not in result.stdout  # prompts are shown resolved
    assert "0:00" in result.stdout


@pytest.mark.slow
def test_check_example_in_a_subprocess() -> None:
    result = _run("-m", "lvstudio.cli", "check", "storyboards/demo.toml")
    assert result.returncode == 0, result.stderr
    assert "storyboards/demo.toml: OK" in result.stdout and "a red ball bouncing over the sea at dusk" in result.stdout
    assert "blend 2s" in result.stdout and "192 frames" in result.stdout


def test_check_bad_storyboard_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\nduration = "10s"\n[[shots]]\nat = "1:75"\nprompt = "a red ball"\n')
    result = CliRunner().invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f'{bad}:4:6: shots[0].at: "1:75" is not a time' in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_check_warns_per_shot_about_words_the_preset_does_not_know(tmp_path: Path) -> None:
    story = tmp_path / "s.toml"
    story.write_text('title = "x"\npreset = "tiny"\nduration = "4s"\n[[shots]]\nat = 0\n'
                     'prompt = "a crimson ball zooming over the sea"\n[[shots]]\nat = 2\n'
                     'prompt = "a red ball bouncing over the sea"\n')
    result = CliRunner().invoke(app, ["check", str(story)])
    assert result.exit_code == 0 and f"{story}: OK" in result.stdout
    assert "warning: shot 1: preset 'tiny' does not know 'crimson', 'zooming'" in result.stderr
    assert "shot 2" not in result.stderr
    for example in EXAMPLES:  # the example storyboards use only words their preset knows
        assert "warning" not in CliRunner().invoke(app, ["check", str(example)]).stderr


def test_check_missing_file() -> None:
    result = CliRunner().invoke(app, ["check", "does-not-exist.toml"])
    assert result.exit_code == 2 and "does-not-exist.toml: file not found" in result.stderr


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    import lvstudio.storyboard

    def interrupted(path: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lvstudio.storyboard, "load_storyboard", interrupted)
    result = CliRunner().invoke(app, ["check", str(EXAMPLES[0])])
    assert result.exit_code == 130 and "interrupted" in result.stderr


def test_usage_error_exits_2() -> None:
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_bench_render_compares_backends_and_presets_side_by_side(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "render", "--minutes", "0.02", "--preset", "tiny", "--backend", "causal-kv",
                                 "--backend", "erft-crossclip"])
    assert result.exit_code == 0, result.output
    assert "side by side (ratios vs tiny/causal-kv)" in result.output
    assert "tiny/erft-crossclip / tiny/causal-kv: speed x" in result.output
    # Two presets of one name (tiny and a copy of it): labelled by what was asked for, the copy by its folder.
    copy = tmp_path / "old-tiny"
    shutil.copytree(ROOT / "presets" / "tiny", copy)
    same = runner.invoke(app, ["bench", "render", "--minutes", "0.02", "--preset", "tiny", "--preset",
                               str(copy / "preset.toml")])
    assert same.exit_code == 0, same.output
    assert "old-tiny/causal-kv / tiny/causal-kv: speed x" in same.output
    bad = _run("-m", "lvstudio", "bench", "render", "--minutes", "0.02", "--backend", "nope")
    assert bad.returncode == 2 and "is not a backend" in bad.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["eval", "adherence", "--prompts", "0"], "--prompts must be at least 1"),
    (["eval", "adherence", "--seconds", "-1"], "--seconds must give at least 2 frames"),
    (["eval", "adherence", "--seconds", "0.07"], "0.125 s or more at the preset's 16 fps"),
    (["eval", "adherence", "--backend", "nope"], "is not a backend"),
    (["bench", "render", "--minutes", "-1"], "--minutes must be a positive number"),
    (["bench", "render", "--minutes", "0"], "--minutes must be a positive number"),
    (["bench", "render", "--threads", "0"], "--threads must be at least 1"),
    (["bench", "model", "--threads", "0"], "--threads"),
    (["eval", "transitions", "--prompts", "2"], "--prompts must be at least 3"),
    (["eval", "transitions", "--seconds", "0.7"], "each shot is scored from its second block on: use --seconds 1"),
    # Options shared by several commands, refused before any work (these once crashed OpenMP, ran silently past
    # their range, or ended in a torch traceback):
    (["render", str(EXAMPLES[0]), "--threads", "100000"], "--threads 100000 is out of range"),
    (["render", str(EXAMPLES[0]), "--threads", "-1"], "--threads -1 is out of range"),
    (["eval", "adherence", "--threads", "-1"], "--threads -1 is out of range"),
    (["bench", "render", "--threads", "100000"], "--threads 100000 is out of range"),
    (["bench", "render", "--batch", "-1"], "--batch"),
    (["render", str(EXAMPLES[0]), "--seed", "-1"], "--seed -1 is out of range"),
    (["render", str(EXAMPLES[0]), "--seed", str(2**63)], "use a whole number from 0 to 9223372036854775807"),
    (["tui", "--prompt", "a red ball", "--seed", "-1"], "--seed -1 is out of range"),
    (["eval", "transitions", "--seed", "-3"], "--seed -3 is out of range"),
    (["eval", "transitions", "--json", str(ROOT / "pyproject.toml")], "this writes a .json file"),
    (["eval", "transitions", "--json", str(ROOT)], "is a folder"),
    (["eval", "transitions", "--json", str(ROOT / "pyproject.toml" / "x.json")], "is a file, not a folder"),
    (["eval", "denoise", "--json", str(ROOT / "pyproject.toml")], "this writes a .json file"),
    (["render", str(EXAMPLES[0]), "--duration", "10000000"], "longer than the 24-hour maximum"),
    (["tui", "--prompt", "a red ball", "--duration", "25:00:00"], "longer than the 24-hour maximum"),
    (["render", str(EXAMPLES[0]), "--device", "meta"], "unknown device 'meta'"),
    (["render", str(EXAMPLES[0]), "--device", "mps"], "no Apple GPU (MPS)"),
    (["render", str(EXAMPLES[0]), "--preset", ""], "--preset is empty"),
    (["render", str(EXAMPLES[0]), "--backend", " "], "--backend is empty"),
    (["tui", "--prompt", "a red ball", "--preset", ""], "--preset is empty"),
    (["tui", "--prompt", "a " * 700], "--prompt: prompt is 1399 characters long"),  # was "--prompt:9:10: ..."
    (["eval", "vae", str(EXAMPLES[0])], "is not a safetensors weight file, not a VAE's"),
    (["eval", "vae", str(ROOT / "presets" / "tiny" / "dit.safetensors")], "holds a DiT's weights"),
])
def test_eval_and_bench_refuse_runs_with_nothing_to_measure(args: list[str], says: str) -> None:
    # These once printed NaN figures with exit 0 or raised a traceback from deep in the render.
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output


def test_render_out_is_an_mp4_or_a_folder(tmp_path: Path) -> None:
    story = tmp_path / "sea.toml"
    story.write_text('title = "sea"\nduration = 0.5\n[[shots]]\nat = 0\nprompt = "a red ball over the sea"\n')
    runner = CliRunner()
    for name in ("clip.avi", "clip"):
        refused = runner.invoke(app, ["render", str(story), "--out", str(tmp_path / name), "--no-progress"])
        assert refused.exit_code == 2, refused.output
        assert "writes H.264 in an MP4 container" in refused.output and "clip.mp4" in refused.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sea.toml"]
    folder = tmp_path / "renders"
    folder.mkdir()
    done = runner.invoke(app, ["render", str(story), "--out", str(folder), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert (folder / "sea.mp4").stat().st_size > 0 and (folder / "sea.manifest.json").is_file()


@pytest.mark.parametrize("command", ["render", "tui"])
def test_a_bad_duration_says_the_accepted_forms_once(command: str) -> None:
    args = [command, str(EXAMPLES[0])] if command == "render" else [command, "--prompt", "a red ball"]
    result = CliRunner().invoke(app, [*args, "--duration", "soon"])
    assert result.exit_code == 2, result.output
    assert '--duration: "soon" is not a time' in result.output
    assert result.output.count('m:ss ("1:30")') == 1


def test_bench_render_says_when_no_switch_was_timed() -> None:
    from lvstudio.eval.bench_render import RenderBenchResult

    figures = dict.fromkeys(("realtime_factor", "first_frame_s", "chunk_ms_minute1", "chunk_ms_last", "rss_mb_minute1",
                             "rss_mb_last", "kv_mb_minute1", "kv_mb_last", "state_mb_minute1", "state_mb_last",
                             "chunk_ms_median"), 1.0)
    short = RenderBenchResult(preset="tiny", backend="causal-kv", minutes=0.1, threads=1, recache_ms=float("nan"),
                              **figures)
    assert short.lines()[-1].endswith("not measured (the render ended before its first prompt switch)")
    timed = RenderBenchResult(preset="tiny", backend="causal-kv", minutes=1, threads=1, recache_ms=12.0, **figures)
    assert "re-cache stall: 12.0 ms" in timed.lines()[-1]


def test_a_device_that_cannot_run_is_refused_before_any_folder_is_made(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["render", str(EXAMPLES[0]), "--device", "meta", "--no-progress"])
    assert result.exit_code == 2 and "unknown device 'meta'" in result.output
    assert list(tmp_path.iterdir()) == []  # no out/ left behind


def test_eval_transitions_keeps_an_existing_json_unless_forced(tmp_path: Path) -> None:
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    result = CliRunner().invoke(app, ["eval", "transitions", "--json", str(mine)])
    assert result.exit_code == 2 and "already exists — pass --force" in result.output
    assert mine.read_text() == "{}"


def test_output_paths_blocked_by_a_file_or_of_another_kind_are_refused_up_front(tmp_path: Path) -> None:
    """A file where a folder must be, or a recording that is not an .mp4, is the user's mistake (exit 2, before any
    work), not a disk that refused a write (these were exit 74, or a folder named x.avi)."""
    (tmp_path / "taken.mp4").write_bytes(b"mine")
    runner = CliRunner()
    cases = [
        (["render", str(EXAMPLES[0]), "--out", str(tmp_path / "taken.mp4" / "x.mp4")], "is a file, not a folder"),
        (["render", str(EXAMPLES[0]), "--out-dir", str(tmp_path / "taken.mp4")], "--out-dir"),
        (["tui", "--prompt", "a red ball", "--record", str(tmp_path / "take.avi")], "name it"),
        (["tui", "--prompt", "a red ball", "--record", str(tmp_path / "taken.mp4")], "never overwrites a recording"),
    ]
    for args, says in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]
    assert (tmp_path / "taken.mp4").read_bytes() == b"mine"


def test_check_refuses_a_preset_that_render_would_refuse(tmp_path: Path) -> None:
    story = tmp_path / "typo.toml"
    story.write_text('title = "typo"\npreset = "tiny-fats"\nduration = 1\n[[shots]]\nat = 0\nprompt = "a red ball"\n')
    result = CliRunner().invoke(app, ["check", str(story)])
    assert result.exit_code == 2 and "preset = 'tiny-fats': unknown preset" in result.output
    assert "OK" not in result.output


@pytest.mark.slow
def test_a_render_warns_about_unknown_words_in_one_plain_line(tmp_path: Path) -> None:
    story = tmp_path / "zebra.toml"
    story.write_text('title = "z"\nduration = 0.5\n[[shots]]\nat = 0\nprompt = "a red zebra ball"\n')
    result = _run("-m", "lvstudio.cli", "render", str(story), "--out", str(tmp_path / "z.mp4"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "warning: the tiny preset does not know the words 'zebra'" in result.stderr
    assert "UserWarning" not in result.stderr and "return func" not in result.stderr  # no Python source location
