"""Storyboard: the user's TOML file of timed prompts, identities and anchors, parsed and validated.

    title = "Harbour at dusk"
    duration = "40s"
    [identities.hero]            # referenced as {hero} in prompts
    prompt = "a red ball"
    [[shots]]
    at = 0
    prompt = "{hero} bouncing over the sea"
    [[shots]]
    at = "0:12"
    prompt = "{hero} moving right on the grass"
    transition = "blend 2s"      # or "cut" (default: a new shot) or "switch" (the shot continues)

    schema    the pydantic models and their checks (every message has a fix)
    times     seconds <-> "1:30", exactly
    locator   where in the TOML text a problem is; syntax and validation errors as one StoryboardError
    reader    parse_storyboard (text), load_storyboard (file): only StoryboardError escapes
    writer    dump_storyboard: TOML that parses back to an equal Storyboard
"""

from lvstudio.storyboard.reader import load_storyboard, parse_storyboard
from lvstudio.storyboard.schema import MAX_FILE_BYTES, Anchor, Identity, Shot, Storyboard, Transition
from lvstudio.storyboard.times import format_time, parse_duration, parse_time
from lvstudio.storyboard.writer import dump_storyboard, toml_string

__all__ = [
    "MAX_FILE_BYTES",
    "Anchor",
    "Identity",
    "Shot",
    "Storyboard",
    "Transition",
    "dump_storyboard",
    "format_time",
    "load_storyboard",
    "parse_storyboard",
    "parse_duration",
    "parse_time",
    "toml_string",
]
