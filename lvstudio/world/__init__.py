"""The procedural world: the training data of the embedded `tiny` preset, with exact ground truth, and the oracle
that reads it back from generated frames. Used by training (data), eval (adherence, drift) and the render manifest.

    grammar    vocabulary, scene specs, captions (write, parse, sample, switch, change one thing)
    clips      rendering clips with per-frame ground truth (numpy + opencv)
    pose       how a clip's objects start (the world's own, or narrowed for a training set)
    oracle     scene, colour, shape and position read back from frames; adherence and flicker
    evaluator  per-shot oracle scores for a render's manifest

No torch anywhere in this package.
"""

from lvstudio.world.clips import (
    Clip,
    FrameTruth,
    ObjectTruth,
    object_rgb,
    render_background,
    render_spec,
    sample_clip,
)
from lvstudio.world.grammar import (
    COLOURS,
    EFFECTS,
    EXCLUDED_SCENE_EFFECTS,
    MOTIONS,
    SCENES,
    SHAPES,
    SIZES,
    SWITCH_KINDS,
    ObjectSpec,
    SceneSpec,
    change_spec,
    parse_caption,
    sample_spec,
    switch_spec,
    vocabulary,
)
from lvstudio.world.oracle import adherence, flicker, read_clip, read_frame
from lvstudio.world.pose import Pose

__all__ = [
    "COLOURS",
    "EFFECTS",
    "EXCLUDED_SCENE_EFFECTS",
    "MOTIONS",
    "SCENES",
    "SHAPES",
    "SIZES",
    "SWITCH_KINDS",
    "Clip",
    "FrameTruth",
    "ObjectSpec",
    "ObjectTruth",
    "Pose",
    "SceneSpec",
    "adherence",
    "change_spec",
    "flicker",
    "object_rgb",
    "parse_caption",
    "read_clip",
    "read_frame",
    "render_background",
    "render_spec",
    "sample_clip",
    "sample_spec",
    "switch_spec",
    "vocabulary",
]
