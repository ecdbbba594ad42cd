"""Evaluation and benchmark plumbing on tiny random weights (the figures themselves come from the trained preset)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.random_bundle import random_bundle


def test_adherence_report_on_random_weights() -> None:
    from lvstudio.eval.adherence import evaluate_adherence

    report = evaluate_adherence(random_bundle(size=64), num_prompts=2, seconds=0.5, seed=0)
    assert report.num_prompts == 2 and len(report.per_prompt) == 2
    for key in ("scene", "colour", "shape"):
        assert 0.0 <= report.mean[key] <= 1.0 and 0.0 <= report.majority[key] <= 1.0
    assert any("weakest" in line for line in report.lines())


def test_training_log_plot(tmp_path: Path) -> None:
    from lvstudio.eval.plots import plot_training_log

    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(50)))
    out = plot_training_log(log, tmp_path / "loss.png", "test")
    assert out.exists() and out.stat().st_size > 1000
