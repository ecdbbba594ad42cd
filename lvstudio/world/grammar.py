"""The procedural world's vocabulary and caption grammar: scene specs, captions, parsing free text, sampling.

A frame of the world shows one of six muted scenes (`SCENES`) with one to three vivid flat-coloured objects on top,
described by a caption from a small word-level grammar::

    a red ball bouncing over the sea at dusk
    a big blue cube moving left on the grass
    a yellow star spinning in the night sky
    a red ball resting and a pink star growing on the snow in fog     (two objects; the first is the primary one)

`SceneSpec.caption()` writes a caption, `parse_caption()` reads one back (tolerant of free text and synonyms),
`sample_spec()` draws one, `switch_spec()` changes one thing of it (a mid-clip prompt switch), `change_spec()` a
given one. Excluded from sampling (renderable on request): `night` with `dusk` (contradictory words). Pure Python +
numpy's random generator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------

SCENES: tuple[str, ...] = ("sky", "sea", "grass", "night", "desert", "snow")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
SHAPES: tuple[str, ...] = ("ball", "cube", "triangle", "star")
MOTIONS: tuple[str, ...] = (
    "moving left", "moving right", "moving up", "moving down", "bouncing", "spinning", "growing", "resting",
)
EFFECTS: tuple[str, ...] = ("dusk", "rain", "fog")
SIZES: tuple[str, ...] = ("small", "big")
MAX_OBJECTS = 3
EXCLUDED_SCENE_EFFECTS: tuple[tuple[str, str], ...] = (("night", "dusk"),)

SCENE_PHRASES: Mapping[str, str] = MappingProxyType({
    "sky": "in the sky", "sea": "over the sea", "grass": "on the grass",
    "night": "in the night sky", "desert": "in the desert", "snow": "on the snow",
})
EFFECT_PHRASES: Mapping[str, str] = MappingProxyType({"dusk": "at dusk", "rain": "in the rain", "fog": "in fog"})

DEFAULT_SCENE, DEFAULT_COLOUR, DEFAULT_SHAPE, DEFAULT_MOTION = "sky", "red", "ball", "resting"

# Free-text synonyms → canonical words (parse_caption only; the grammar emits canonical words).
_SCENE_WORDS: Mapping[str, str] = MappingProxyType({
    **{w: "sky" for w in ("sky", "skies", "air", "clouds", "cloud", "cloudy")},
    **{w: "sea" for w in ("sea", "ocean", "water", "waves", "wave", "lake", "beach", "seaside")},
    **{w: "grass" for w in ("grass", "grassy", "field", "meadow", "lawn", "park", "prairie")},
    **{w: "night" for w in ("night", "stars", "starry", "midnight", "nighttime")},
    **{w: "desert" for w in ("desert", "sand", "sandy", "dunes", "dune", "sahara")},
    **{w: "snow" for w in ("snow", "snowy", "winter", "ice", "icy", "snowfield")},
})
_EFFECT_WORDS: Mapping[str, str] = MappingProxyType({
    **{w: "dusk" for w in ("dusk", "sunset", "evening", "twilight", "sundown")},
    **{w: "rain" for w in ("rain", "rainy", "raining", "rainstorm", "storm", "stormy", "drizzle")},
    **{w: "fog" for w in ("fog", "foggy", "mist", "misty", "haze", "hazy")},
})
_COLOUR_WORDS: Mapping[str, str] = MappingProxyType({
    **{c: c for c in COLOURS},
    "crimson": "red", "scarlet": "red", "gold": "yellow", "golden": "yellow", "lime": "green",
    "navy": "blue", "violet": "purple", "magenta": "pink", "rose": "pink",
})
_SHAPE_WORDS: Mapping[str, str] = MappingProxyType({
    **{w: "ball" for w in ("ball", "balls", "sphere", "circle", "orb", "disc", "disk")},
    **{w: "cube" for w in ("cube", "cubes", "square", "box", "block")},
    **{w: "triangle" for w in ("triangle", "triangles", "pyramid")},
    "star": "star",
})
_SIZE_WORDS: Mapping[str, str] = MappingProxyType({
    **{w: "small" for w in ("small", "tiny", "little")},
    **{w: "big" for w in ("big", "large", "huge", "giant")},
})
_DIRECTION_WORDS: Mapping[str, str] = MappingProxyType({
    **{w: "moving left" for w in ("left", "leftward", "leftwards", "west")},
    **{w: "moving right" for w in ("right", "rightward", "rightwards", "east")},
    **{w: "moving up" for w in ("up", "upward", "upwards", "rising", "rises", "ascending")},
    **{w: "moving down" for w in ("down", "downward", "downwards", "falling", "falls", "sinking", "dropping")},
})
_MOTION_WORDS: Mapping[str, str] = MappingProxyType({
    **_DIRECTION_WORDS,
    **{w: "bouncing" for w in ("bouncing", "bounce", "bounces", "bouncy", "jumping", "hopping")},
    **{w: "spinning" for w in ("spinning", "spin", "spins", "rotating", "rotates", "turning", "twirling")},
    **{w: "growing" for w in ("growing", "grow", "grows", "expanding", "swelling")},
    **{w: "resting" for w in ("resting", "rests", "still", "static", "sitting", "staying", "stays", "idle")},
})
_GENERIC_MOVES = frozenset(("moving", "moves", "move", "rolling", "drifting", "flying", "sliding", "going",
                            "heading", "travelling", "traveling", "gliding"))
_TOKEN = re.compile(r"[a-z]+")


# ----------------------------------------------------------------------------------------------------------------
# Specs and captions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: canonical words from COLOURS, SHAPES, MOTIONS, SIZES."""

    colour: str
    shape: str
    motion: str
    size: str = "small"

    def __post_init__(self) -> None:
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("motion", self.motion, MOTIONS), ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

    def phrase(self) -> str:
        """'a big red ball bouncing' (article a/an chosen by the next word)."""
        words = (["big"] if self.size == "big" else []) + [self.colour, self.shape, self.motion]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])


@dataclass(frozen=True)
class SceneSpec:
    """What one frame shows: a scene, 1..MAX_OBJECTS objects (the first is the primary one), an optional effect."""

    scene: str
    objects: tuple[ObjectSpec, ...]
    effect: str | None = None

    def __post_init__(self) -> None:
        if self.scene not in SCENES:
            raise ValueError(f"unknown scene {self.scene!r}; choose one of {', '.join(SCENES)}")
        if self.effect is not None and self.effect not in EFFECTS:
            raise ValueError(f"unknown effect {self.effect!r}; choose one of {', '.join(EFFECTS)} or None")
        if not isinstance(self.objects, tuple) or not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"objects must be a tuple of 1..{MAX_OBJECTS} ObjectSpec, got {self.objects!r}")
        if not all(isinstance(o, ObjectSpec) for o in self.objects):
            raise ValueError("objects must contain ObjectSpec instances")

    @property
    def primary(self) -> ObjectSpec:
        """The first (primary) object."""
        return self.objects[0]

    def caption(self) -> str:
        """Grammar → text, e.g. 'a red ball bouncing and a blue cube resting over the sea at dusk'."""
        text = " and ".join(o.phrase() for o in self.objects) + " " + SCENE_PHRASES[self.scene]
        return text + (" " + EFFECT_PHRASES[self.effect] if self.effect else "")


def vocabulary() -> list[str]:
    """Every word the caption grammar can emit (sorted, unique)."""
    words = {"a", "an", "and", "big", *COLOURS, *SHAPES}
    for phrase in (*MOTIONS, *SCENE_PHRASES.values(), *EFFECT_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


def _find_motion(words: Sequence[str]) -> str | None:
    """First motion in a word list; 'moving' without a direction looks 3 words ahead, else means moving right."""
    for i, w in enumerate(words):
        if w in _MOTION_WORDS:
            return _MOTION_WORDS[w]
        if w in _GENERIC_MOVES:
            for nxt in words[i + 1: i + 4]:
                if nxt in _DIRECTION_WORDS:
                    return _DIRECTION_WORDS[nxt]
            return "moving right"
    return None


def _last(words: Sequence[str], table: Mapping[str, str]) -> str | None:
    """Last word of `words` found in `table`, mapped."""
    hits = [table[w] for w in words if w in table]
    return hits[-1] if hits else None


def _first(words: Sequence[str], table: Mapping[str, str]) -> str | None:
    """First word of `words` found in `table`, mapped."""
    return next((table[w] for w in words if w in table), None)


def parse_caption(text: str) -> SceneSpec:
    """Inverse of SceneSpec.caption(), tolerant of free text; never raises.

    Each shape word starts an object (up to MAX_OBJECTS); its colour and size are the last such words before it,
    its motion the first motion after it (else before it). A scene word anywhere sets the scene ('night' wins over
    'sky'); an effect word anywhere sets the effect. Missing parts default to sky / red / ball / resting / small /
    no effect.
    """
    words = _TOKEN.findall(str(text).lower())
    scenes = [_SCENE_WORDS[w] for w in words if w in _SCENE_WORDS]
    scene = "night" if "night" in scenes else (scenes[0] if scenes else DEFAULT_SCENE)
    effect = _first(words, _EFFECT_WORDS)
    starts = [i for i, w in enumerate(words) if w in _SHAPE_WORDS][:MAX_OBJECTS]
    objects: list[ObjectSpec] = []
    if not starts:
        objects.append(ObjectSpec(colour=_first(words, _COLOUR_WORDS) or DEFAULT_COLOUR, shape=DEFAULT_SHAPE,
                                  motion=_find_motion(words) or DEFAULT_MOTION,
                                  size=_first(words, _SIZE_WORDS) or "small"))
    for k, pos in enumerate(starts):
        before = words[(starts[k - 1] + 1 if k else 0): pos]
        after = words[pos + 1: (starts[k + 1] if k + 1 < len(starts) else len(words))]
        objects.append(ObjectSpec(
            colour=_last(before, _COLOUR_WORDS) or _first(after, _COLOUR_WORDS) or DEFAULT_COLOUR,
            shape=_SHAPE_WORDS[words[pos]],
            motion=_find_motion(after) or _find_motion(before) or DEFAULT_MOTION,
            size=_last(before, _SIZE_WORDS) or "small",
        ))
    return SceneSpec(scene=scene, objects=tuple(objects), effect=effect)


def _allowed(scene: str, effect: str | None) -> bool:
    """Whether sampling may combine this scene and effect."""
    return (scene, effect) not in EXCLUDED_SCENE_EFFECTS


def _sample_object(rng: np.random.Generator, exclude_colours: Sequence[str] = ()) -> ObjectSpec:
    """A random object whose colour is not in exclude_colours."""
    colours = [c for c in COLOURS if c not in exclude_colours]
    return ObjectSpec(colour=colours[rng.integers(len(colours))], shape=SHAPES[rng.integers(len(SHAPES))],
                      motion=MOTIONS[rng.integers(len(MOTIONS))], size="big" if rng.random() < 0.4 else "small")


def sample_spec(rng: np.random.Generator) -> SceneSpec:
    """A random spec: 1 object (70%) or 2 of different colours (30%); an effect half of the time."""
    scene = SCENES[rng.integers(len(SCENES))]
    effects = [e for e in EFFECTS if _allowed(scene, e)]
    effect = effects[rng.integers(len(effects))] if rng.random() < 0.5 else None
    objects = [_sample_object(rng)]
    if rng.random() < 0.3:
        objects.append(_sample_object(rng, exclude_colours=[objects[0].colour]))
    return SceneSpec(scene=scene, objects=tuple(objects), effect=effect)


SWITCH_KINDS: tuple[str, ...] = ("scene", "colour", "shape", "motion")  # what a mid-clip switch may change


def switch_spec(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """The spec after one mid-clip switch: the scene, or the primary object's colour, shape or motion."""
    return change_spec(spec, SWITCH_KINDS[rng.integers(len(SWITCH_KINDS))], rng)


def change_spec(spec: SceneSpec, kind: str, rng: np.random.Generator) -> SceneSpec:
    """The spec with exactly one thing changed (`kind` in SWITCH_KINDS), drawn from `rng`: the scene (one sampling
    allows with the spec's effect), or the primary object's colour (one no object of the spec has), shape or
    motion. Everything else stays."""
    first = spec.primary
    if kind == "scene":
        scenes = [s for s in SCENES if s != spec.scene and _allowed(s, spec.effect)]
        return replace(spec, scene=scenes[rng.integers(len(scenes))])
    if kind == "colour":
        taken = {first.colour, *(o.colour for o in spec.objects[1:])}
        choices = [c for c in COLOURS if c not in taken]
        new_first = replace(first, colour=choices[rng.integers(len(choices))])
    elif kind == "shape":
        choices = [s for s in SHAPES if s != first.shape]
        new_first = replace(first, shape=choices[rng.integers(len(choices))])
    elif kind == "motion":
        choices = [m for m in MOTIONS if m != first.motion]
        new_first = replace(first, motion=choices[rng.integers(len(choices))])
    else:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(SWITCH_KINDS)}")
    return replace(spec, objects=(new_first, *spec.objects[1:]))
