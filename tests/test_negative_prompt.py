"""`negative_prompt` (storyboard-level and per shot): parsed, checked with located errors (exit 2 in `check`),
written back, carried by the Prompt Stream Buffer, and used as CFG's unconditional row by the backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lvstudio.errors import StoryboardError
from lvstudio.storyboard import dump_storyboard, parse_storyboard

STORY = """title = "Negatives"
duration = "4s"
negative_prompt = "blurry, static"

[identities.hero]
prompt = "a red ball"

[[shots]]
at = 0
prompt = "{hero} bouncing over the sea"

[[shots]]
at = "2s"
prompt = "a blue cube on the grass"
negative_prompt = "{hero}"

[[shots]]
at = "3s"
prompt = "a blue cube on the grass"
negative_prompt = ""
"""


def test_parsed_defaulted_and_written_back() -> None:
    sb = parse_storyboard(STORY)
    assert sb.negative_prompt == "blurry, static"
    assert [s.negative_prompt for s in sb.shots] == [None, "{hero}", ""]
    assert [sb.negative_for(i) for i in range(3)] == ["blurry, static", "{hero}", ""]
    assert parse_storyboard(dump_storyboard(sb)) == sb
    plain = parse_storyboard('title = "t"\nduration = 3\n[[shots]]\nat = 0\nprompt = "a red ball"\n')
    assert plain.negative_prompt is None and plain.negative_for(0) == ""  # the empty prompt stays the default
    assert plain.negative_for(0, default="static") == "static"  # ... unless the preset names one
    assert "negative_prompt" not in dump_storyboard(plain)


@pytest.mark.parametrize(("old", "new", "needles"), [
    ('negative_prompt = "blurry, static"', "negative_prompt = 3",
     ["t.toml:3:", "negative_prompt", "must be text, got an integer"]),
    ('negative_prompt = "{hero}"', 'negative_prompt = "{villain}"',
     ["t.toml:15:19", "shots[1].negative_prompt", "unknown identity {villain}", "[identities.villain]"]),
    ('negative_prompt = "{hero}"', 'negative_prompt = "x {"', ["shots[1].negative_prompt", "'{' without a matching"]),
    ('negative_prompt = ""', 'negative_prompt = "' + "x" * 1001 + '"', ["shots[2].negative_prompt", "1001 characters"]),
    ('negative_prompt = "blurry, static"', 'negative_prompt = "a\\u0007b"', ["negative_prompt", "control character"]),
    ('negative_prompt = ""', 'negativ_prompt = ""', ["shots[2]", "negativ_prompt"]),
])
def test_bad_values_are_located_errors(old: str, new: str, needles: list[str]) -> None:
    assert old in STORY
    with pytest.raises(StoryboardError) as info:
        parse_storyboard(STORY.replace(old, new, 1), "t.toml")
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_check_accepts_and_rejects_with_exit_2(tmp_path: Path) -> None:
    from lvstudio.cli import app

    good = tmp_path / "good.toml"
    good.write_text(STORY)
    result = CliRunner().invoke(app, ["check", str(good)])
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.toml"
    bad.write_text(STORY.replace('negative_prompt = "{hero}"', "negative_prompt = [1]"))
    result = CliRunner().invoke(app, ["check", str(bad)])
    assert result.exit_code == 2 and "bad.toml:15:" in result.output and "negative_prompt" in result.output
    assert "Traceback" not in result.output


def test_prompt_stream_carries_the_negative_of_each_block() -> None:
    from lvstudio.caches import IdentityCache
    from lvstudio.prompt_stream import PromptStreamBuffer

    ids = IdentityCache()
    ids.add("hero", "a red ball")
    buf = PromptStreamBuffer(lambda p: torch.zeros(1, 2, 3), ids, block_latents=1, fps=16, negative="blurry")
    buf.add_shot(0.0, "a", negative=None)
    buf.add_shot(1.0, "b", negative="{hero} static")
    buf.add_shot(2.0, "c", negative="")
    negs = [buf.conditioning(b).negative for b in range(buf.seconds_to_block(2.0) + 1)]
    assert negs[0] == "blurry" and negs[-2] == "a red ball static" and negs[-1] == ""
    assert buf.conditioning(0).key != buf.conditioning(buf.seconds_to_block(1.0)).key
    assert buf.push("d").negative is None and buf.conditioning(buf.next_block).negative == "blurry"  # live: default


def test_guidance_uses_the_negative_as_the_unconditional_row() -> None:
    """CFG 0 keeps only the unconditional row: with a negative prompt it equals the unguided run of that prompt."""
    from lvstudio.backends import make_backend
    from lvstudio.prompt_stream import PromptStreamBuffer
    from tests.helpers.random_bundle import random_bundle

    bundle = random_bundle()

    def run(prompt: str, cfg: float, negative: str = "") -> torch.Tensor:
        buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16, negative=negative)
        buf.add_shot(0.0, prompt)
        be = make_backend("causal-kv", bundle, buf, seed=1, width=32, height=32, cfg_scale=cfg)
        return torch.cat([be.step().latents for _ in range(2)], dim=2)

    neg = "a blue cube on the grass"
    torch.testing.assert_close(run("a red ball", 0.0, neg), run(neg, 1.0), atol=1e-3, rtol=1e-3)
    assert not torch.allclose(run("a red ball", 3.0, neg), run("a red ball", 3.0), atol=1e-4)
