"""Malformed storyboards are all rejected with a located message and a fix; fuzzing lets only StoryboardError out.

Each file in tests/data/bad_storyboards/ starts with `# expect: <substring>`: a location (line:col or key path) and
the message that the error must contain.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvstudio.errors import StoryboardError
from lvstudio.storyboard import Storyboard, load_storyboard, parse_storyboard

ROOT = Path(__file__).resolve().parents[1]
BAD_DIR = ROOT / "tests" / "data" / "bad_storyboards"
BAD_FILES = sorted(BAD_DIR.glob("*.toml"))
LOCATION = re.compile(r"^\S+?(:\d+(:\d+)?)?: ")
KEY_PATH = re.compile(r"^[\w\"\-]+(\[\d+\]|\.[\w\"\-]+)*$")
INTERNAL_BUG = "unexpected internal error"
# A sample for the (slower) subprocess checks: one of each family.
CLI_SAMPLE = [
    "syntax_unquoted_time", "encoding_latin1", "unknown_shot_key_typo", "time_seconds_over_59", "shots_unsorted",
    "identity_unknown", "anchor_image_missing", "resolution_odd", "blend_longer_than_gap", "encoding_binary_junk",
]

VALID = """title = "Fuzz"
duration = "20s"
fps = 16

[identities.hero]
prompt = "a red ball"

[[anchors]]
at = "12s"
shot = 1

[[shots]]
at = 0
prompt = "{hero} bouncing over the sea"

[[shots]]
at = "0:08"
prompt = "{hero} moving left on the grass"
transition = "blend 2s"
"""


def _expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    return first.removeprefix("# expect: ").strip()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_message(err: StoryboardError, source: str) -> None:
    """One headline that starts with the file, names a location, and says what to do; at most three lines."""
    text = str(err)
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, text
    assert lines[0].startswith(source), text
    assert err.line is not None or err.key_path is not None or "TOML" in err.message or "limit" in err.message \
        or "value" in err.message, text
    if err.key_path is not None:
        assert KEY_PATH.match(err.key_path), err.key_path
    assert err.fix, text
    assert "Traceback" not in text and INTERNAL_BUG not in text


def test_corpus_is_big_enough() -> None:
    assert len(BAD_FILES) >= 60


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_storyboard_is_rejected(path: Path) -> None:
    expect = _expectation(path)
    with pytest.raises(StoryboardError) as info:
        load_storyboard(path)
    assert expect in str(info.value), f"\nexpected: {expect}\ngot:      {info.value}"
    assert LOCATION.match(str(info.value))
    _check_message(info.value, str(path))


def test_generated_huge_files_are_rejected(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text(VALID + "# padding\n" * 30_000, encoding="utf-8")  # ~300 KB
    with pytest.raises(StoryboardError, match=r"big.toml: the file is \d+ bytes, more than the 256 KiB limit"):
        load_storyboard(big)
    many = tmp_path / "many.toml"
    many.write_text('title = "t"\nduration = 5000\n'
                    + "".join(f'[[shots]]\nat = {i}\nprompt = "a red ball"\n' for i in range(1001)), encoding="utf-8")
    with pytest.raises(StoryboardError, match="shots: 1001 shots, more than the limit of 1000"):
        load_storyboard(many)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_cli_check_rejects_with_exit_2(name: str, tmp_path: Path) -> None:
    path = BAD_DIR / f"{name}.toml"
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "lvstudio.cli", "check", str(path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result
    assert _expectation(path) in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert 1 <= len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before  # nothing written in the cwd


@pytest.mark.slow
def test_cli_check_rejects_generated_huge_file(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"# x\n" * 70_000)
    result = subprocess.run(
        [sys.executable, "-m", "lvstudio.cli", "check", "big.toml"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "big.toml: the file is 280000 bytes" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == ["big.toml"]


# --- fuzzing -----------------------------------------------------------------------------------------------------


def _parse_only_storyboard_error(text: str) -> Storyboard | None:
    """Property 1: parse returns a Storyboard or raises StoryboardError (never anything else, never a bug)."""
    try:
        sb = parse_storyboard(text, "fuzz.toml")
    except StoryboardError as err:
        assert INTERNAL_BUG not in err.message, err.message
        assert str(err).splitlines()[0].startswith("fuzz.toml")
        return None
    _check_invariants(sb)
    return sb


def _check_invariants(sb: Storyboard) -> None:
    """Property 3: an accepted storyboard satisfies the rules."""
    assert sb.shots and sb.shots[0].at == 0
    assert all(b.at > a.at for a, b in zip(sb.shots, sb.shots[1:], strict=False))
    assert all(s.at < sb.duration for s in sb.shots) and 0 < sb.duration <= 86400
    assert 1 <= sb.fps <= 60 and sb.num_frames() >= 1 and math.isfinite(sb.duration)
    for i, shot in enumerate(sb.shots):
        assert "{" not in sb.resolved_prompt(i)
        if shot.transition.kind == "blend":
            assert 0 < shot.transition.seconds < shot.at - sb.shots[i - 1].at


_TOMLISH = st.text(
    alphabet=st.sampled_from(list('[]{}=."\'#,:-_ \n\tabcdefghijklmnopqrstuvwxyz0123456789sx') + ["\x00", "é", "\\"]),
    max_size=300,
)
_FRAGMENTS = st.sampled_from([
    "[[shots]]\n", "[shots]\n", "at = ", "prompt = ", '"{hero}"', "{", "}", "= =", "\n", '"', "'''", '"""', "1:75",
    "-1", "nan", "inf", "1e309", "-0.0", "99999999999999999999999", "true", "[1, [2, [3]]]", "{a = 1}",
    "[identities.hero]\n", "[[anchors]]\nshot = 9\n", "transition = ", '"blend 99s"', "\x00", "\ufeff", "0x1F",
    "1979-05-27", "07:32:00", "resolution = [65, 64]\n", "fps = 16.5\n",
])


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_TOMLISH)
def test_fuzz_random_text(text: str) -> None:
    _parse_only_storyboard_error(text)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 8), _FRAGMENTS | _TOMLISH), min_size=1,
                max_size=4))
def test_fuzz_edits_of_a_valid_storyboard(edits: list[tuple[int, int, str]]) -> None:
    text = VALID
    for pos, cut, insert in edits:
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + cut:]
    _parse_only_storyboard_error(text)


def _toml_value(value: object) -> str:
    """Test-only TOML writer for the random documents below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04X}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


_KEYS = st.sampled_from(["title", "duration", "fps", "seed", "at", "prompt", "shots", "identities", "anchors",
                         "image", "shot", "transition", "resolution", "backend", "preset", "hero", "x", "Hero", ""])
_SCALARS = (
    st.integers(-(2**70), 2**70) | st.floats() | st.booleans()
    | st.sampled_from(["0", "1:30", "12s", "blend 2s", "cut", "a red ball", "{hero} bouncing", "64x64", "tiny",
                       "causal-kv", "", "1:75", "-5", "{x"])
    | st.text(max_size=20)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=12,
)
_SHOT = st.fixed_dictionaries(
    {"at": _SCALARS}, optional={"prompt": _SCALARS, "transition": _SCALARS, "seed": _SCALARS, "x": _VALUES}
)
_DOCUMENTS = st.fixed_dictionaries(
    {"title": _SCALARS, "duration": _SCALARS},
    optional={
        "fps": _SCALARS, "seed": _SCALARS, "resolution": _VALUES, "backend": _SCALARS, "preset": _SCALARS,
        "identities": st.dictionaries(_KEYS, st.fixed_dictionaries({"prompt": _SCALARS}) | _VALUES, max_size=3),
        "anchors": st.lists(st.fixed_dictionaries({"at": _SCALARS}, optional={"shot": _SCALARS}), max_size=3),
        "shots": st.lists(_SHOT, max_size=4), "extra": _VALUES,
    },
)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENTS)
def test_fuzz_random_documents(document: dict[str, object]) -> None:
    text = "\n".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items()) + "\n"
    _parse_only_storyboard_error(text)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BAD_FILES), st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_fuzz_byte_flips_of_the_corpus(path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(path.read_bytes())
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        text = bytes(data).decode("utf-8", "replace")
    _parse_only_storyboard_error(text)


def test_fuzzing_writes_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Property 4: rejected parses create nothing in the working directory."""
    monkeypatch.chdir(tmp_path)
    for path in BAD_FILES:
        with pytest.raises(StoryboardError):
            load_storyboard(path)
        with pytest.raises(StoryboardError):
            parse_storyboard(path.read_bytes().decode("utf-8", "replace"))
    assert os.listdir(tmp_path) == []
