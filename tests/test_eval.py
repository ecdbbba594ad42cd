"""Evaluation and benchmark plumbing on tiny random weights (the figures themselves come from the trained preset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.random_bundle import random_bundle


def test_adherence_report_on_random_weights() -> None:
    from lvstudio.eval.adherence import evaluate_adherence

    report = evaluate_adherence(random_bundle(size=64), num_prompts=2, seconds=0.5, seed=0)
    assert report.num_prompts == 2 and len(report.per_prompt) == 2
    for key in ("scene", "colour", "shape"):
        assert 0.0 <= report.mean[key] <= 1.0 and 0.0 <= report.majority[key] <= 1.0
    assert any("weakest" in line for line in report.lines())
    # The confusion of prompted and read shapes covers every frame once; objects per frame as the prompts name them.
    import numpy as np

    from lvstudio.world import parse_caption

    frames = 2 * round(0.5 * 16)
    prompted = [parse_caption(r["prompt"]) for r in report.per_prompt]
    assert sum(sum(reads.values()) for reads in report.shape_reads.values()) == frames
    assert set(report.shape_reads) == {spec.objects[0].shape for spec in prompted}
    assert report.objects_prompted == pytest.approx(np.mean([len(spec.objects) for spec in prompted]))
    assert report.objects_read >= 0 and sum(" read as " in line for line in report.lines()) == len(report.shape_reads)
    # Each prompt is filed under its primary object's motion and size and its number of objects.
    assert [(r["motion"], r["size"], r["count"]) for r in report.per_prompt] == [
        (s.objects[0].motion, s.objects[0].size, len(s.objects)) for s in prompted]
    assert any(line.startswith("  shape by motion: ") for line in report.lines())
    # Why frames are not exactly the objects: per prompt and as the mean over prompts.
    for kind in ("several", "missing", "other"):
        assert 0.0 <= report.per_prompt[0][kind] <= 1.0
        assert report.faults[kind] == pytest.approx(np.mean([r[kind] for r in report.per_prompt]))
    assert any(line.startswith("  not exactly the objects, % of frames: ") for line in report.lines())
    assert any(line.startswith("  ... by motion: ") for line in report.lines())
    # Whether moving objects travel the prompted way: per moving prompt where countable, and its mean.
    moving = [r["travel"] for r in report.per_prompt if "travel" in r]
    assert all(r["motion"].startswith("moving") for r in report.per_prompt if "travel" in r)
    assert report.travel == (pytest.approx(np.mean(moving)) if moving else None)
    assert any(line.startswith("  moving objects travel") for line in report.lines()) == bool(moving)


def test_adherence_breakdown_groups_prompts() -> None:
    """`breakdown` averages a score over the prompts of each group, largest group first (ties by name)."""
    from lvstudio.eval.adherence import AdherenceReport

    rows = [{"prompt": "a", "shape": 1.0, "objects": 1.0, "motion": "bouncing", "count": 1},
            {"prompt": "b", "shape": 0.0, "objects": 0.5, "motion": "bouncing", "count": 2},
            {"prompt": "c", "shape": 0.5, "objects": 0.0, "motion": "resting", "count": 2},
            {"prompt": "d", "shape": 0.25, "objects": 1.0, "count": 1}]  # no motion: left out of that breakdown
    report = AdherenceReport(4, 1.0, "causal-kv", {}, {}, rows)
    assert report.breakdown("shape", "motion") == {"bouncing": 0.5, "resting": 0.5}
    assert list(report.breakdown("shape", "motion")) == ["bouncing", "resting"]
    assert report.breakdown("objects", "count") == {"1": 1.0, "2": 0.25}
    assert report.breakdown("shape", "size") == {}


@pytest.mark.filterwarnings("ignore:the tiny preset does not know")
def test_transitions_report_on_random_weights(tmp_path: Path) -> None:
    """The plumbing of `lvstudio eval transitions` (the figures come from the trained preset, README)."""
    import numpy as np

    from lvstudio.eval.transitions import (
        TransitionsConfig,
        evaluate_backend,
        identity_specs,
        related_specs,
        save_reports,
        unrelated_specs,
    )

    specs = unrelated_specs(np.random.default_rng(0), 6)
    assert all(a.scene != b.scene and a.primary.colour != b.primary.colour and a.primary.shape != b.primary.shape
               for a, b in zip(specs, specs[1:], strict=False))
    chain, changed = related_specs(np.random.default_rng(0), 6)
    assert len({s.scene for s in chain}) == 1 and changed[0] == "" and set(changed[1:]) <= {"colour", "shape"}
    for a, b, what in zip(chain, chain[1:], changed[1:], strict=False):
        assert getattr(a.primary, what) != getattr(b.primary, what) and a.primary.motion == b.primary.motion
    hero, prompts, hero_specs = identity_specs(np.random.default_rng(0), 4)
    assert all(p.startswith("{hero} ") and p.replace("{hero}", hero) == s.caption()
               for p, s in zip(prompts, hero_specs, strict=True))
    logs: list[str] = []
    for backend in ("causal-kv", "streaming-dit", "erft-crossclip"):
        report = evaluate_backend(random_bundle(size=32), backend, TransitionsConfig(3, 1.0, 2, 0), log=logs.append)
        assert len(report.prompts) == 3 and len(report.cut_per_shot) == 3
        assert set(report.checks()) >= {"switch continuity <= 1.5x", "cut scene within 3 points"}
        assert report.continuity["switch_ratio"] > 0 and report.latency["cut"] > 0
        assert 0 <= report.decoder["restart_scene_first4"] <= 1 and report.response_curve
        assert any("decoder at a cut" in line for line in report.lines())
    saved = json.loads(save_reports([report], tmp_path / "t.json").read_text())
    assert saved[0]["backend"] == "erft-crossclip" and logs


def test_training_log_plot(tmp_path: Path) -> None:
    from lvstudio.eval.plots import plot_training_log

    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(50)))
    out = plot_training_log(log, tmp_path / "loss.png", "test")
    assert out.exists() and out.stat().st_size > 1000
