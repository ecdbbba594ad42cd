"""Procedural world: determinism, caption grammar round trip, switches, motion, sizes, frame bounds."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvstudio.world import (
    COLOURS,
    EFFECTS,
    EXCLUDED_SCENE_EFFECTS,
    MOTIONS,
    SCENES,
    SHAPES,
    SIZES,
    Clip,
    FrameTruth,
    ObjectSpec,
    SceneSpec,
    parse_caption,
    render_background,
    render_spec,
    sample_clip,
    sample_spec,
    vocabulary,
)


def _specs(n: int, seed: int = 0) -> list[SceneSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(n)]


def test_vocabulary_sizes() -> None:
    assert len(SCENES) >= 4 and len(COLOURS) >= 6 and len(SHAPES) >= 4 and len(MOTIONS) >= 4 and len(EFFECTS) >= 1
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    assert all(w.isalpha() and w.islower() for w in vocab)


def test_sample_clip_is_deterministic_by_seed() -> None:
    a, b = sample_clip(7, 12, size=64), sample_clip(7, 12, size=64)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.captions == b.captions and a.truth == b.truth and a.switch_frames == b.switch_frames
    c = sample_clip(8, 12, size=64)
    assert c.frames.tobytes() != a.frames.tobytes()
    spec = _specs(1)[0]
    assert render_spec(spec, 6, 64, seed=3).frames.tobytes() == render_spec(spec, 6, 64, seed=3).frames.tobytes()
    assert render_spec(spec, 6, 64, seed=3).frames.tobytes() != render_spec(spec, 6, 64, seed=4).frames.tobytes()


def test_clip_layout() -> None:
    clip = sample_clip(1, 9, size=64)
    assert isinstance(clip, Clip)
    assert clip.frames.shape == (9, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert len(clip.captions) == len(clip.specs) == len(clip.truth) == 9
    assert all(isinstance(t, FrameTruth) for t in clip.truth)
    for cap, spec, truth in zip(clip.captions, clip.specs, clip.truth, strict=True):
        assert cap == spec.caption()
        assert truth.scene == spec.scene and truth.effect == spec.effect
        assert [(o.colour, o.shape) for o in truth.objects] == [(o.colour, o.shape) for o in spec.objects]


def test_caption_round_trip_for_sampled_specs() -> None:
    rng = np.random.default_rng(0)
    for spec in _specs(600):
        assert parse_caption(spec.caption()) == spec, spec.caption()
    for seed in range(60):  # switched specs too
        clip = sample_clip(seed, 8, size=64, switch_prob=1.0)
        for cap, spec in zip(clip.captions, clip.specs, strict=True):
            assert parse_caption(cap) == spec, cap
    # every canonical value, hand-built (incl. three objects)
    for i in range(len(MOTIONS) * len(COLOURS)):
        objs = tuple(ObjectSpec(COLOURS[(i + k) % len(COLOURS)], SHAPES[(i + k) % len(SHAPES)],
                                MOTIONS[(i + 3 * k) % len(MOTIONS)], SIZES[(i + k) % 2]) for k in range(1 + i % 3))
        spec = SceneSpec(SCENES[i % len(SCENES)], objs, (None, *EFFECTS)[int(rng.integers(4))])
        assert parse_caption(spec.caption()) == spec, spec.caption()


def test_captions_use_only_vocabulary_words() -> None:
    vocab = set(vocabulary())
    used: set[str] = set()
    for spec in _specs(400):
        used.update(spec.caption().split())
    assert used == vocab  # sampling emits every word of the grammar, and nothing else


def test_caption_examples() -> None:
    red_ball = ObjectSpec("red", "ball", "bouncing")
    assert SceneSpec("sea", (red_ball,), "dusk").caption() == "a red ball bouncing over the sea at dusk"
    assert (SceneSpec("grass", (ObjectSpec("blue", "cube", "moving left", "big"),)).caption()
            == "a big blue cube moving left on the grass")
    assert (SceneSpec("night", (ObjectSpec("yellow", "star", "spinning"),)).caption()
            == "a yellow star spinning in the night sky")
    two = SceneSpec("snow", (ObjectSpec("orange", "triangle", "growing"), red_ball), "fog")
    assert two.caption() == "an orange triangle growing and a red ball bouncing on the snow in fog"


def test_parse_caption_free_text() -> None:
    spec = parse_caption("Please show me a HUGE crimson sphere rolling leftwards across a sandy desert, sunset!!")
    assert spec == SceneSpec("desert", (ObjectSpec("red", "ball", "moving left", "big"),), "dusk")
    spec = parse_caption("zorblax quux a green star and a purple box spinning in the snowy mist")
    assert spec.scene == "snow" and spec.effect == "fog"
    assert [(o.colour, o.shape) for o in spec.objects] == [("green", "star"), ("purple", "cube")]
    assert spec.objects[1].motion == "spinning"
    assert parse_caption("a pink thing in the rain").objects[0].colour == "pink"
    assert parse_caption("stars twinkle over a blue triangle").scene == "night"
    default = parse_caption("")
    assert default == SceneSpec("sky", (ObjectSpec("red", "ball", "resting"),), None)
    assert parse_caption(None) == default  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_caption_never_raises(text: str) -> None:
    spec = parse_caption(text)
    assert isinstance(spec, SceneSpec) and 1 <= len(spec.objects) <= 3


def test_spec_validation_raises_value_error() -> None:
    with pytest.raises(ValueError, match="colour"):
        ObjectSpec("cyan", "ball", "resting")
    with pytest.raises(ValueError, match="scene"):
        SceneSpec("moon", (ObjectSpec("red", "ball", "resting"),))
    with pytest.raises(ValueError, match="objects"):
        SceneSpec("sky", ())
    for bad in (30, 100, 520, 129):
        with pytest.raises(ValueError, match="size"):
            sample_clip(0, 2, size=bad)
    with pytest.raises(ValueError, match="num_frames"):
        sample_clip(0, 0)


def test_sampling_respects_exclusions_and_distinct_colours() -> None:
    specs = _specs(800, seed=3)
    assert not any((s.scene, s.effect) in EXCLUDED_SCENE_EFFECTS for s in specs)
    assert {len(s.objects) for s in specs} == {1, 2}
    assert all(len({o.colour for o in s.objects}) == len(s.objects) for s in specs)
    assert {s.scene for s in specs} == set(SCENES) and {s.effect for s in specs} == {None, *EFFECTS}


def test_switch_clips() -> None:
    for seed in range(40):
        clip = sample_clip(seed, 16, size=64, switch_prob=1.0)
        assert len(clip.switch_frames) == 1
        k = clip.switch_frames[0]
        assert 4 <= k <= 12
        assert clip.captions[k] != clip.captions[k - 1]
        assert len(set(clip.captions[:k])) == 1 and len(set(clip.captions[k:])) == 1
        before, after = clip.specs[k - 1], clip.specs[k]
        changed = (before.scene != after.scene) + sum(
            getattr(before.objects[0], f) != getattr(after.objects[0], f) for f in ("colour", "shape", "motion"))
        assert changed == 1 and before.objects[1:] == after.objects[1:]
        assert len({o.colour for o in after.objects}) == len(after.objects)
    assert all(not sample_clip(s, 16, size=64, switch_prob=0.0).switch_frames for s in range(10))


def test_objects_move_smoothly_across_switches() -> None:
    size = 64
    for seed in range(40):
        clip = sample_clip(seed, 16, size=size, switch_prob=1.0)
        k = clip.switch_frames[0]
        a, b = clip.truth[k - 1].objects[0], clip.truth[k].objects[0]
        jump = float(np.hypot(b.x - a.x, b.y - a.y))
        motion = clip.specs[k].objects[0].motion
        # a moving object may wrap (a jump along its own axis only); otherwise the step is small
        wrapped = motion.startswith("moving") and (abs(b.y - a.y) < 1e-6 or abs(b.x - a.x) < 1e-6)
        assert jump <= 0.1 * size or wrapped, (seed, motion, jump)


def test_objects_stay_inside_the_frame() -> None:
    for seed in range(40):
        size = (64, 96, 128)[seed % 3]
        clip = sample_clip(seed, 40, size=size, switch_prob=0.5)
        for truth in clip.truth:
            for o in truth.objects:
                half = o.size / 2
                assert half <= o.x <= size - half and half <= o.y <= size - half, (seed, o)


def _track(motion: str, shape: str = "cube", frames: int = 24) -> list:
    spec = SceneSpec("grass", (ObjectSpec("red", shape, motion),))
    return [t.objects[0] for t in render_spec(spec, frames, 128, seed=5).truth]


def test_motions_are_visible_and_mean_what_they_say() -> None:
    for motion, axis, sign in (("moving left", "x", -1), ("moving right", "x", 1),
                               ("moving up", "y", -1), ("moving down", "y", 1)):
        track = _track(motion)
        steps = np.diff([getattr(o, axis) for o in track])
        assert np.mean(sign * steps > 0) >= 0.9, motion  # mostly forward (a wrap is one jump back)
        assert np.median(np.abs(steps)) >= 1.5  # ~0.015 * S per frame
        other = "y" if axis == "x" else "x"
        assert np.ptp([getattr(o, other) for o in track]) == 0
    bounce = [o.y for o in _track("bouncing", frames=32)]
    assert np.ptp(bounce) > 0.2 * 128 and np.sum(np.diff(np.sign(np.diff(bounce))) != 0) >= 2  # up and down
    spin = _track("spinning")
    assert np.ptp([o.x for o in spin]) == 0 and len({round(o.angle) for o in spin}) == len(spin)
    grow = [o.size for o in _track("growing", frames=16)]
    assert grow[-1] > 1.15 * grow[0]
    rest = _track("resting")
    assert len({(o.x, o.y, o.size, o.angle) for o in rest}) == 1


@pytest.mark.parametrize("size", [64, 128, 256, 72, 200])
def test_sizes(size: int) -> None:
    clip = sample_clip(11, 3, size=size)
    assert clip.frames.shape == (3, size, size, 3)
    objects = [o for t in clip.truth for o in t.objects]
    assert all(0.05 * size < o.size < 0.7 * size for o in objects)


def test_backgrounds_animate_and_differ() -> None:
    means = []
    for scene in SCENES:
        frames = render_background(scene, None, num_frames=6, size=64, seed=1)
        assert frames.shape == (6, 64, 64, 3)
        assert np.abs(frames[5].astype(int) - frames[0]).sum() > 0, scene
        means.append(frames.reshape(-1, 3).mean(axis=0))
    dist = np.linalg.norm(np.array(means)[:, None] - np.array(means)[None], axis=-1)
    assert dist[~np.eye(len(SCENES), dtype=bool)].min() > 15  # dominant colours are distinct


@pytest.mark.slow
def test_world_does_not_import_torch() -> None:
    code = "import sys, lvstudio.world as w; w.sample_clip(0, 2, 64); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_poses_start_objects_upright_or_centred_and_change_nothing_else() -> None:
    from lvstudio.world import Pose
    from lvstudio.world.oracle import adherence

    centred_x = []
    for seed in range(8):
        free = sample_clip(seed, 9, size=128)
        for pose in (Pose(upright=True), Pose(centred=True), Pose(upright=True, centred=True)):
            clip = sample_clip(seed, 9, size=128, pose=pose)
            assert clip.captions == free.captions and clip.switch_frames == free.switch_frames
            for a, b in zip(free.truth, clip.truth, strict=True):
                assert [(o.colour, o.shape, o.size) for o in a.objects] == [(o.colour, o.shape, o.size)
                                                                            for o in b.objects]
            first, own = clip.truth[0].objects, free.truth[0].objects
            assert [o.angle for o in first] == ([0.0] * len(first) if pose.upright else [o.angle for o in own])
            if not pose.centred:
                assert [(o.x, o.y) for o in first] == [(o.x, o.y) for o in own]
            else:
                centred_x += [o.x for o, spec in zip(first, clip.specs[0].objects, strict=True)
                              if spec.motion in ("resting", "spinning", "growing", "bouncing")]
            assert clip.frames.tobytes() != free.frames.tobytes()
            scores = adherence(clip.frames, clip.specs)
            assert scores["shape"] == 1.0 and scores["colour"] == 1.0 and scores["objects"] == 1.0
    # Objects that do not move sideways start in the middle half of the frame's free positions: [0.25, 0.75] S
    # give or take their radius and margin.
    assert centred_x and all(0.25 * 128 <= x <= 0.75 * 128 for x in centred_x)
    spin = [f.objects[0].angle for f in render_spec(
        SceneSpec("sky", (ObjectSpec("red", "star", "spinning"),)), 4, 64, pose=Pose(upright=True)).truth]
    assert spin[0] == 0.0 and len(set(spin)) == 4  # spinning objects still turn


def test_grid_pose_starts_objects_on_cell_centres_and_changes_nothing_else() -> None:
    from lvstudio.world import Pose
    from lvstudio.world.oracle import adherence

    starts = []
    for seed in range(12):
        free = sample_clip(seed, 9, size=128)
        clip = sample_clip(seed, 9, size=128, pose=Pose(upright=True, centred=True, grid=16))
        assert clip.captions == free.captions and clip.switch_frames == free.switch_frames
        starts += [(o.x, o.y) for o in clip.truth[0].objects]
        scores = adherence(clip.frames, clip.specs)
        assert scores["shape"] == 1.0 and scores["colour"] == 1.0 and scores["objects"] == 1.0
    # Pixel i is drawn centred on coordinate i, so the 16-px cells (one DiT token each) are centred on 16k + 7.5.
    assert len(starts) >= 12 and all((x - 7.5) % 16 == 0 and (y - 7.5) % 16 == 0 for x, y in starts)


def test_slot_pose_gives_each_caption_one_starting_layout() -> None:
    from lvstudio.world import Pose
    from lvstudio.world.oracle import adherence

    pose = Pose(upright=True, slots=True, grid=16)
    layouts: dict[str, set] = {}
    for seed in range(40):
        free = sample_clip(seed, 5, size=128, switch_prob=0.0)
        clip = sample_clip(seed, 5, size=128, switch_prob=0.0, pose=pose)
        assert clip.captions == free.captions
        scores = adherence(clip.frames, clip.specs)
        assert scores["shape"] == 1.0 and scores["colour"] == 1.0 and scores["objects"] == 1.0
        # Shapes, sizes and motions are in the caption; with them, where the objects start is fixed (a growing
        # object starts at a random scale, so its free positions vary).
        key = "|".join(f"{o.size} {o.shape} {o.motion}" for o in clip.specs[0].objects)
        if "growing" not in key:
            layouts.setdefault(key, set()).add(tuple((o.x, o.y) for o in clip.truth[0].objects))
        if len(clip.specs[0].objects) == 2:
            a, b = clip.truth[0].objects
            assert math.hypot(a.x - b.x, a.y - b.y) > (a.size + b.size) / 2  # they start apart
    assert all(len(v) == 1 for v in layouts.values()) and len(layouts) > 5
    one = [c for c in (sample_clip(s, 5, 128, 0.0, pose) for s in range(40)) if len(c.specs[0].objects) == 1
           and c.specs[0].objects[0].motion == "resting"]
    # The middle (64) is a corner of four 16-px cells: the object starts at the centre of the lower right one.
    assert one and all(o.x == o.y == 71.5 for c in one for o in c.truth[0].objects)
    assert pose.words() == "upright, in fixed slots, on a 16-px grid"


def test_moving_in_slots_starts_every_object_at_its_slot_whatever_its_motion() -> None:
    """Under `slots` alone a moving object starts on its trailing side, far from its slot for some motions (the first
    of two objects moving left starts at the right edge); `moving_in_slots` starts it at its slot like the others, so
    the layout depends only on the number of objects (and sizes), not on the motions."""
    from lvstudio.world import Pose
    from lvstudio.world.oracle import adherence

    slots, moving = Pose(upright=True, slots=True, grid=16), Pose(upright=True, slots=True, grid=16,
                                                                  moving_in_slots=True)
    starts: dict[tuple[int, int, str], set] = {}
    trailing_apart = 0
    for seed in range(80):
        before = sample_clip(seed, 5, size=128, switch_prob=0.0, pose=slots)
        clip = sample_clip(seed, 5, size=128, switch_prob=0.0, pose=moving)
        assert clip.captions == before.captions and adherence(clip.frames, clip.specs)["objects"] == 1.0
        objects = clip.specs[0].objects
        for j, (o, t, b) in enumerate(zip(objects, clip.truth[0].objects, before.truth[0].objects, strict=True)):
            if o.motion != "growing":  # a growing object starts at a random scale: its free positions vary
                starts.setdefault((len(objects), j, o.size), set()).add((t.x, t.y))
            trailing_apart += o.motion.startswith("moving") and math.hypot(t.x - b.x, t.y - b.y) > 16
    assert all(len(v) == 1 for v in starts.values()) and len(starts) >= 4  # one place per slot, any motion
    assert trailing_apart >= 5  # the old pose put those moving objects elsewhere
    assert moving.words() == "upright, in fixed slots, moving ones too, on a 16-px grid"
    with pytest.raises(ValueError, match="needs slots"):
        Pose(moving_in_slots=True)


def test_through_edges_moves_objects_out_and_back_without_a_jump() -> None:
    """The world moves an object that reaches an edge to the opposite one in a frame; under `through_edges` it leaves
    across the edge at its speed, is out of sight for a moment and comes back across the opposite edge, so no frame
    holds it at two places (what a 4-frame latent would average)."""
    from lvstudio.world import Pose
    from lvstudio.world.clips import _MOVE_SPEED
    from lvstudio.world.oracle import read_frame

    pose = Pose(through_edges=True)
    v = _MOVE_SPEED * 128
    for motion, axis, sign in (("moving left", "x", -1), ("moving up", "y", -1), ("moving right", "x", 1)):
        spec = SceneSpec("sky", (ObjectSpec("red", "ball", motion),))
        clip = render_spec(spec, 120, 128, seed=0, pose=pose)
        pos = [getattr(f.objects[0], axis) for f in clip.truth]
        other = {getattr(f.objects[0], "y" if axis == "x" else "x") for f in clip.truth}
        steps = [b - a for a, b in itertools.pairwise(pos)]
        loops = [d for d in steps if abs(d - sign * v) > 1e-6]
        # Every frame moves by the speed but once, when the object is out of sight on both sides of the loop.
        assert len(loops) == 1 and len(other) == 1
        k = steps.index(loops[0])
        r = clip.truth[k].objects[0].size / 2
        assert min(pos[k], 128 - pos[k]) < -r + v and min(pos[k + 1], 128 - pos[k + 1]) < -r + v
        counts = [sum(o.colour == "red" for o in read_frame(f).objects) for f in clip.frames]
        assert counts.count(0) <= 4 and max(counts) == 1  # never two; out of sight (or a sliver) for a few frames
        edge = [i for i in range(120) if 0 < min(pos[i], 128 - pos[i]) < r]
        assert edge and all(counts[i] == 1 for i in edge[1:-1])  # cut by the edge, but there
    # Resting objects and the world's own pose do as before.
    still = SceneSpec("sky", (ObjectSpec("red", "ball", "resting"),))
    same = render_spec(still, 9, 128, seed=1, pose=pose).frames, render_spec(still, 9, 128, seed=1).frames
    assert same[0].tobytes() == same[1].tobytes()
    assert Pose(slots=True, through_edges=True).words() == "in fixed slots, moving through the edges"


def test_late_pose_records_a_later_stretch_of_the_same_world() -> None:
    from lvstudio.world import Pose
    from lvstudio.world.oracle import adherence

    pose = Pose(upright=True, slots=True, grid=16, late_prob=0.5, late_frames=60)
    base = Pose(upright=True, slots=True, grid=16)
    leads = [pose.lead_in(seed) for seed in range(40)]
    assert leads == [pose.lead_in(seed) for seed in range(40)]  # by seed
    assert 8 <= sum(1 for k in leads if k) <= 32 and all(0 <= k <= 60 for k in leads)
    for seed in [s for s, k in enumerate(leads) if k][:8]:
        k = leads[seed]
        late = sample_clip(seed, 9, size=128, switch_prob=0.0, pose=pose)
        long = sample_clip(seed, k + 9, size=128, switch_prob=0.0, pose=base)
        # The late clip is frames k.. of the clip that starts at once: same world, same captions, same truth.
        assert late.frames.tobytes() == long.frames[k:].tobytes() and late.captions == long.captions[k:]
        assert late.truth == long.truth[k:]
        assert adherence(late.frames, late.specs)["objects"] == 1.0
    # Clips of seeds without a lead-in are unchanged; a switch keeps its place in the recorded frames.
    seed = leads.index(0)
    assert sample_clip(seed, 9, pose=pose).frames.tobytes() == sample_clip(seed, 9, pose=base).frames.tobytes()
    seed = next(s for s, k in enumerate(leads) if k and sample_clip(s, 17, pose=base).switch_frames)
    assert sample_clip(seed, 17, pose=pose).switch_frames == sample_clip(seed, 17, pose=base).switch_frames
    assert pose.words().endswith("50% of clips up to 60 frames late")
    for bad in ({"late_prob": 1.5}, {"late_frames": -1}, {"late_frames": True}):
        with pytest.raises(ValueError, match="late_"):
            Pose(**bad)


def test_a_long_run_wraps_moving_objects_that_a_late_clip_shows() -> None:
    """What late clips are for: a `moving` object reaches the far edge only after ~50 frames (3 s), so a 25-frame
    training clip that starts at once never shows it re-entering at the opposite edge; one that starts late does."""
    from lvstudio.world import Pose

    spec = SceneSpec("sky", (ObjectSpec("red", "ball", "moving left"),))
    base, late = Pose(slots=True), Pose(slots=True, late_prob=1.0, late_frames=80)

    def jumps(clip: Clip) -> int:
        xs = [f.objects[0].x for f in clip.truth]
        return sum(abs(b - a) > 10 for a, b in itertools.pairwise(xs))

    assert jumps(render_spec(spec, 25, 128, seed=0, pose=base)) == 0
    seeds = [s for s in range(20) if late.lead_in(s) > 40]
    assert seeds and any(jumps(render_spec(spec, 25, 128, seed=s, pose=late)) == 1 for s in seeds)
