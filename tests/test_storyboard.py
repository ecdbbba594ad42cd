"""Storyboard parsing: times, the schema, cross-field rules, limits at their boundaries, images, round trips."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvstudio.errors import StoryboardError
from lvstudio.storyboard import (
    MAX_FILE_BYTES,
    Anchor,
    Identity,
    Shot,
    Storyboard,
    Transition,
    dump_storyboard,
    format_time,
    load_storyboard,
    parse_storyboard,
    parse_time,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "storyboards").glob("*.toml"))

GOOD = """title = "Good"
duration = "10s"

[identities.hero]
prompt = "a red ball"

[[shots]]
at = 0
prompt = "{hero} bouncing over the sea"

[[shots]]
at = "5s"
prompt = "{hero} resting on the grass"
transition = "blend 2s"
"""


def _write_png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    import cv2

    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    image[:, :, 2] = 200  # red in BGR
    assert cv2.imwrite(str(path), image)
    return path


def _rejects(text: str, *needles: str, base_dir: Path | None = None) -> StoryboardError:
    with pytest.raises(StoryboardError) as info:
        parse_storyboard(text, "t.toml", base_dir)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


# --- times -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0), (90, 90.0), (1.5, 1.5), ("12s", 12.0), ("1.5s", 1.5), ("12", 12.0), (" 12 s ", 12.0),
        ("1:30", 90.0), ("0:05.5", 5.5), ("0:5", 5.0), ("1:02:03", 3723.0), ("10:00", 600.0), ("0:00", 0.0),
        ("24:00:00", 86400.0),
    ],
)
def test_parse_time_accepts(value: str | int | float, seconds: float) -> None:
    assert parse_time(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["1:75", "five", "", "-1", -1, "1:2:3:4", "1:75:00", "5 min", "1e3", "١٢", True, None, [1], float("nan"),
     float("inf"), 10**400, "1,5s", ":30"],
)
def test_parse_time_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_time(value)  # type: ignore[arg-type]
    assert "—" in str(info.value)  # every message carries a fix


def test_parse_time_message_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r'"1:75" is not a time .* use seconds \("90s", 90\) or m:ss \("1:30"\)'):
        parse_time("1:75")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (5.5, "0:05.5"), (65.5, "1:05.5"), (600, "10:00"), (3723, "1:02:03"), (0.25, "0:00.25"),
     (1e-05, "0:00.00001"), (86400, "24:00:00")],
)
def test_format_time(seconds: float, text: str) -> None:
    assert format_time(seconds) == text
    assert parse_time(text) == seconds


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.floats(min_value=0, max_value=2.0**52, allow_nan=False, allow_infinity=False)
       | st.floats(min_value=0, max_value=200, allow_nan=False))
def test_format_time_round_trip_is_exact(seconds: float) -> None:
    assert parse_time(format_time(seconds)) == seconds


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1:00", True])
def test_format_time_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        format_time(bad)  # type: ignore[arg-type]


# --- the examples and the queries --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_and_round_trip(path: Path) -> None:
    sb = load_storyboard(path)
    assert sb.preset == "tiny"
    assert parse_storyboard(dump_storyboard(sb)) == sb
    for i in range(len(sb.shots)):
        assert "{" not in sb.resolved_prompt(i)


def test_example_files_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"demo.toml", "story.toml", "long.toml"} <= names
    demo, story, long = (load_storyboard(ROOT / "storyboards" / n) for n in ("demo.toml", "story.toml", "long.toml"))
    assert demo.duration == 12 and len(demo.shots) == 3 and len(demo.identities) == 1
    assert any(s.transition.kind == "blend" for s in demo.shots)
    assert len(story.identities) == 2 and any(a.shot == 1 for a in story.anchors)
    assert {s.transition.kind for s in story.shots} == {"cut", "switch", "blend"}
    assert 50 <= story.duration <= 70
    assert long.duration == 600 and len(long.shots) == 10


def test_example_prompts_use_the_tiny_vocabulary() -> None:
    from lvstudio.world import vocabulary

    words = set(vocabulary())
    for path in EXAMPLES:
        sb = load_storyboard(path)
        for i in range(len(sb.shots)):
            unknown = set(re.findall(r"[a-z]+", sb.resolved_prompt(i))) - words
            assert not unknown, (path.name, i, unknown)


def test_queries() -> None:
    sb = parse_storyboard(GOOD)
    assert sb.resolved_prompt(0) == "a red ball bouncing over the sea"
    assert sb.resolved_prompt(1) == "a red ball resting on the grass"
    assert sb.shot_identities(1) == ["hero"]
    assert [sb.shot_at(t) for t in (0, 4.99, 5, 9.9, 100)] == [0, 0, 1, 1, 1]
    assert sb.shot_end(0) == 5 and sb.shot_end(1) == 10 and sb.shot_end(-1) == 10
    assert sb.num_frames() == 160
    assert sb.shots[1].transition == Transition(kind="blend", seconds=2.0)
    assert str(sb.shots[1].transition) == "blend 2s" and str(sb.shots[0].transition) == "cut"
    with pytest.raises(ValueError):
        sb.shot_at(-1)


def test_transitions_cut_switch_blend() -> None:
    """`cut` (the default: a new shot), `switch` (the shot continues) and `blend Ns`; storyboards written before
    `switch` existed parse unchanged; the writer writes `switch` back and leaves the default out."""
    sb = parse_storyboard(GOOD.replace('transition = "blend 2s"', 'transition = " Switch "'))
    assert sb.shots[1].transition == Transition(kind="switch") and str(sb.shots[1].transition) == "switch"
    text = dump_storyboard(sb)
    assert 'transition = "switch"' in text and 'transition = "cut"' not in text and parse_storyboard(text) == sb
    old = parse_storyboard(GOOD.replace('transition = "blend 2s"', 'transition = "cut"'))
    assert old.shots[1].transition == Transition() == Transition(kind="cut")
    assert parse_storyboard(GOOD.replace('transition = "blend 2s"\n', "")).shots[1].transition.kind == "cut"
    _rejects(GOOD.replace('transition = "blend 2s"', 'transition = "swtich"'),
             't.toml:14:14: shots[1].transition: "swtich" is not a transition — did you mean "switch"?')
    _rejects(GOOD.replace('transition = "blend 2s"', 'transition = "switch 2s"'), 'is not a transition')
    with pytest.raises(ValueError, match="a switch has no duration"):
        Transition(kind="switch", seconds=1.0)


def test_defaults_and_optional_fields() -> None:
    sb = parse_storyboard('title = "t"\nduration = 3\n[[shots]]\nat = 0\nprompt = "a red ball"\n')
    assert (sb.preset, sb.backend, sb.fps, sb.resolution, sb.seed) == ("tiny", None, 16, None, 0)
    assert sb.identities == {} and sb.anchors == [] and sb.shots[0].seed is None
    full = parse_storyboard(
        'title = "t"\npreset = "tiny"\nbackend = "streaming-dit"\nfps = 24\nresolution = [512, 320]\n'
        'duration = "1:00"\nseed = 9\n[[shots]]\nat = 00:00:00\nprompt = "a red ball"\nseed = 3\n'
        '[[shots]]\nat = "0:30"\nprompt = "a blue cube"\ntransition = "BLEND 0:01.5"\n'
    )
    assert full.backend == "streaming-dit" and full.resolution == (512, 320) and full.fps == 24
    assert full.shots[0].seed == 3 and full.shots[1].transition.seconds == 1.5
    assert parse_storyboard(GOOD.replace('duration = "10s"', 'duration = "10s"\nresolution = "64 x 1920"'))\
        .resolution == (64, 1920)


def test_prompts_are_stripped_and_may_span_lines() -> None:
    sb = parse_storyboard(GOOD.replace('"{hero} resting on the grass"', '"""\n  {hero} resting\n  on the grass\n"""'))
    assert sb.shots[1].prompt == "{hero} resting\n  on the grass"


def test_bom_is_accepted() -> None:
    assert parse_storyboard("\ufeff" + GOOD).title == "Good"


# --- limits at their boundaries ----------------------------------------------------------------------------------


def _shots(n: int, step: float = 1.0) -> str:
    return "".join(f'[[shots]]\nat = {i * step}\nprompt = "a red ball"\n' for i in range(n))


def test_limit_shots() -> None:
    head = 'title = "t"\nduration = 2000\n'
    assert len(parse_storyboard(head + _shots(1000)).shots) == 1000
    _rejects(head + _shots(1001), "shots: 1001 shots, more than the limit of 1000")


def test_limit_prompt_length() -> None:
    ok = GOOD.replace("a red ball", "a" * 1000)
    assert len(parse_storyboard(ok).identities["hero"].prompt) == 1000
    _rejects(GOOD.replace("a red ball", "a" * 1001), "identities.hero.prompt: prompt is 1001 characters long")


def test_limit_identities() -> None:
    def text(n: int) -> str:
        ids = "".join(f'[identities.h{i}]\nprompt = "a red ball"\n' for i in range(n))
        return 'title = "t"\nduration = 5\n' + ids + '[[shots]]\nat = 0\nprompt = "{h0}"\n'

    assert len(parse_storyboard(text(64)).identities) == 64
    _rejects(text(65), "identities: 65 identities, more than the limit of 64")


def test_limit_anchors() -> None:
    def text(n: int) -> str:
        return GOOD + "".join(f"[[anchors]]\nat = {i * 0.1}\nshot = 1\n" for i in range(n))

    assert len(parse_storyboard(text(64)).anchors) == 64
    _rejects(text(65), "anchors: 65 anchors, more than the limit of 64")


def test_limit_file_size(tmp_path: Path) -> None:
    pad = MAX_FILE_BYTES - len(GOOD.encode()) - 1
    exact = GOOD + "#" * pad + "\n"
    assert len(exact.encode()) == MAX_FILE_BYTES
    assert parse_storyboard(exact).title == "Good"
    _rejects(exact + " ", "more than the 256 KiB limit")
    (tmp_path / "big.toml").write_text(exact + "#", encoding="utf-8")
    with pytest.raises(StoryboardError, match="256 KiB"):
        load_storyboard(tmp_path / "big.toml")
    (tmp_path / "ok.toml").write_text(exact, encoding="utf-8")
    assert load_storyboard(tmp_path / "ok.toml").title == "Good"


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("fps", "1", "0"), ("fps", "60", "61"), ("seed", "0", "-1"), ("seed", str(2**63 - 1), str(2**63)),
        ("resolution", '"64x64"', '"56x64"'), ("resolution", '"1920x1920"', '"1928x64"'),
        ("resolution", "[64, 1920]", "[64, 1921]"),
    ],
)
def test_limit_scalars(key: str, good: str, bad: str) -> None:
    def text(value: str) -> str:
        return GOOD.replace('duration = "10s"', f'duration = "10s"\n{key} = {value}')

    parse_storyboard(text(good))
    _rejects(text(bad), f"t.toml:3:{len(key) + 4}: {key}:")


def test_limit_duration() -> None:
    def text(duration: str) -> str:
        return f'title = "t"\nduration = {duration}\n[[shots]]\nat = 0\nprompt = "a red ball"\n'

    assert parse_storyboard(text('"24:00:00"')).duration == 86400
    _rejects(text("86400.001"), "duration:", "24-hour maximum")
    assert parse_storyboard(text("0.0625")).num_frames() == 1  # one frame at 16 fps
    _rejects(text("0.03"), "shorter than one frame")


def test_blend_must_be_shorter_than_the_gap() -> None:
    assert parse_storyboard(GOOD.replace("blend 2s", "blend 4.99s")).shots[1].transition.seconds == 4.99
    _rejects(GOOD.replace("blend 2s", "blend 5s"), "t.toml:14:14: shots[1].transition: blend 5s is not shorter")


# --- images ------------------------------------------------------------------------------------------------------


def test_images_resolve_relative_to_the_storyboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "anchors").mkdir()
    _write_png(tmp_path / "anchors" / "start.png")
    _write_png(tmp_path / "hero.png")
    text = GOOD.replace('prompt = "a red ball"', 'prompt = "a red ball"\nimage = "hero.png"') + (
        '[[anchors]]\nat = 0\nimage = "anchors/start.png"\n[[anchors]]\nat = "6s"\nshot = 2\n'
    )
    (tmp_path / "story.toml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(ROOT)  # not the storyboard's folder
    sb = load_storyboard(tmp_path / "story.toml")
    assert sb.identities["hero"].image == tmp_path / "hero.png"
    assert sb.anchors[0].image == tmp_path / "anchors" / "start.png" and sb.anchors[1].shot == 2
    assert parse_storyboard(dump_storyboard(sb)) == sb  # absolute paths round-trip from anywhere
    with pytest.raises(StoryboardError, match="image not found"):
        parse_storyboard(text)  # base_dir defaults to the cwd, where the images are not
    assert parse_storyboard(text, base_dir=tmp_path) == sb


def test_corrupt_image_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    text = GOOD + '[[anchors]]\nat = 0\nimage = "bad.png"\n'
    _rejects(text, "anchors[0].image:", "could not be decoded", base_dir=tmp_path)
    huge = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + (9000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0"
    (tmp_path / "huge.png").write_bytes(huge + b"\0" * 64)  # a decompression bomb would claim this much
    _rejects(text.replace("bad.png", "huge.png"), "is 9000x9000 pixels, larger than 8192", base_dir=tmp_path)
    (tmp_path / "text.png").write_text("hello")
    _rejects(text.replace("bad.png", "text.png"), "is not a PNG, JPEG, WebP or BMP image", base_dir=tmp_path)


# --- error rendering ---------------------------------------------------------------------------------------------


def test_error_format() -> None:
    err = _rejects(GOOD.replace('at = "5s"', 'at = "1:75"'))
    lines = str(err).splitlines()
    assert lines[0] == ('t.toml:12:6: shots[1].at: "1:75" is not a time (the seconds in m:ss must be below 60) '
                        '— use seconds ("90s", 90) or m:ss ("1:30")')
    assert lines[1].endswith('| at = "1:75"') and lines[2].endswith("|      ^")
    assert (err.file, err.line, err.column, err.key_path) == ("t.toml", 12, 6, "shots[1].at")
    assert err.fix == 'use seconds ("90s", 90) or m:ss ("1:30")' and err.exit_code == 2
    bare = StoryboardError("no shots", file="x.toml", key_path="shots", fix="add one")
    assert str(bare) == "x.toml: shots: no shots — add one"
    assert str(StoryboardError("bad\nthing", file="f")) == "f: bad\\nthing"


def test_only_storyboard_error_escapes_odd_inputs(tmp_path: Path) -> None:
    for text in ["", "\x00", "[[", "a = [" * 1000, "x = " + "9" * 5000, "shots = " + "[" * 300 + "]" * 300]:
        with pytest.raises(StoryboardError):
            parse_storyboard(text)
    with pytest.raises(StoryboardError):
        parse_storyboard(b"title = 'x'")  # type: ignore[arg-type]
    with pytest.raises(StoryboardError, match="file not found"):
        load_storyboard(tmp_path / "missing.toml")
    with pytest.raises(StoryboardError, match="is a folder"):
        load_storyboard(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'title = "caf\xe9"\n')
    with pytest.raises(StoryboardError, match=r"latin1.toml:1:13: invalid UTF-8 byte 0xe9"):
        load_storyboard(tmp_path / "latin1.toml")


# --- python construction and round trips -------------------------------------------------------------------------


def test_models_can_be_built_in_python() -> None:
    sb = Storyboard(
        title="t", duration=4.0, identities={"cat": Identity(prompt="a pink star")},
        shots=[Shot(at=0, prompt="{cat} spinning"), Shot(at=2, prompt="{cat} resting", transition="blend 1s")],
        anchors=[Anchor(at=3, shot=2)],
    )
    assert sb.resolved_prompt(1) == "a pink star resting"
    assert parse_storyboard(dump_storyboard(sb)) == sb


def test_dump_escapes_text() -> None:
    tricky = 'a "quoted" \\ back\tslash ünïcødé ✓'
    sb = Storyboard(title=tricky.replace("\t", " "), duration=2.5, shots=[Shot(at=0, prompt=tricky + "\nline 2")])
    assert parse_storyboard(dump_storyboard(sb)) == sb


_words = st.sampled_from(["a", "red", "blue", "ball", "cube", "star", "bouncing", "over", "sea", "é", '"', "\\"])
_prompt = st.lists(_words, min_size=1, max_size=6).map(" ".join)


@st.composite
def _storyboards(draw: st.DrawFn) -> Storyboard:
    fps = draw(st.integers(1, 60))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), max_size=3, unique=True))
    identities = {n: Identity(prompt=draw(_prompt)) for n in names}
    gaps = draw(st.lists(st.floats(1.0, 50.0, allow_nan=False), min_size=0, max_size=5))
    starts = [0.0]
    for gap in gaps:
        starts.append(starts[-1] + gap)
    duration = starts[-1] + draw(st.floats(1.0, 30.0))
    shots = []
    for i, at in enumerate(starts):
        ref = f"{{{draw(st.sampled_from(names))}}} " if names and draw(st.booleans()) else ""
        kind = draw(st.sampled_from(["cut", "switch", "blend"])) if i else "cut"
        blend = draw(st.floats(0.01, 0.99)) * (at - starts[i - 1]) if kind == "blend" else 0.0
        shots.append(Shot(
            at=at, prompt=ref + draw(_prompt), transition=Transition(kind=kind, seconds=blend),
            seed=draw(st.none() | st.integers(0, 2**63 - 1)),
        ))
    anchors = [Anchor(at=draw(st.floats(starts[k], duration - 0.5)), shot=k + 1)
               for k in draw(st.lists(st.integers(0, len(starts) - 1), max_size=2))]
    side = st.integers(8, 240).map(lambda v: v * 8)
    return Storyboard(
        title=draw(_prompt), preset=draw(st.sampled_from(["tiny", "wan-1.3b", "a.b_c-d"])),
        backend=draw(st.sampled_from([None, "causal-kv", "streaming-dit", "erft-crossclip"])), fps=fps,
        resolution=draw(st.none() | st.tuples(side, side)), duration=duration,
        seed=draw(st.integers(0, 2**63 - 1)), identities=identities, anchors=anchors, shots=shots,
    )


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_storyboards())
def test_dump_round_trip(sb: Storyboard) -> None:
    text = dump_storyboard(sb)
    again = parse_storyboard(text)
    assert again == sb
    assert dump_storyboard(again) == text
    assert all(math.isfinite(s.at) for s in again.shots)
