"""Writing storyboards back as TOML (`dump_storyboard`): text that parses to an equal `Storyboard`."""

from __future__ import annotations

from lvstudio.storyboard.schema import Storyboard
from lvstudio.storyboard.times import format_time


def toml_string(text: str) -> str:
    """A TOML basic string literal for `text`."""
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def dump_storyboard(sb: Storyboard) -> str:
    """TOML text that parses back to a Storyboard equal to `sb` (image paths are written absolute)."""
    lines = [f"title = {toml_string(sb.title)}", f"preset = {toml_string(sb.preset)}"]
    if sb.backend is not None:
        lines.append(f"backend = {toml_string(sb.backend)}")
    lines.append(f"fps = {sb.fps}")
    if sb.resolution is not None:
        lines.append(f'resolution = "{sb.resolution[0]}x{sb.resolution[1]}"')
    lines += [f'duration = "{format_time(sb.duration)}"', f"seed = {sb.seed}"]
    if sb.negative_prompt is not None:
        lines.append(f"negative_prompt = {toml_string(sb.negative_prompt)}")
    for name, identity in sb.identities.items():
        lines += ["", f"[identities.{name}]", f"prompt = {toml_string(identity.prompt)}"]
        if identity.image is not None:
            lines.append(f"image = {toml_string(str(identity.image))}")
    for anchor in sb.anchors:
        lines += ["", "[[anchors]]", f'at = "{format_time(anchor.at)}"']
        if anchor.image is not None:
            lines.append(f"image = {toml_string(str(anchor.image))}")
        if anchor.shot is not None:
            lines.append(f"shot = {anchor.shot}")
    for shot in sb.shots:
        lines += ["", "[[shots]]", f'at = "{format_time(shot.at)}"', f"prompt = {toml_string(shot.prompt)}"]
        if shot.transition.kind != "cut":  # the default; "switch" and "blend Ns" are written
            lines.append(f'transition = "{shot.transition}"')
        if shot.seed is not None:
            lines.append(f"seed = {shot.seed}")
        if shot.negative_prompt is not None:
            lines.append(f"negative_prompt = {toml_string(shot.negative_prompt)}")
    return "\n".join(lines) + "\n"
