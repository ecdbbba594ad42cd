"""Streaming-buffer training: staggered levels, the consistency term, one step reduces the loss, resume works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lvstudio.train.data import sample_batch
from lvstudio.train.diffusion_forcing import build_model
from lvstudio.train.loop import step_generator
from lvstudio.train.streaming import StreamConfig, stream_loss, stream_sigmas, train_streaming
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset


def _cfg(out: str, **kw) -> StreamConfig:
    return StreamConfig(**{**tiny_cfg(out).model_dump(), "partitions": [(2, 1), (2, 2)], **kw})


def test_buffer_levels_are_staggered_and_the_previous_state_is_noisier() -> None:
    now, prev, length = stream_sigmas(_cfg("x"), 16, torch.Generator().manual_seed(0))
    assert length == 4 and now.shape == (16, 4)
    assert torch.all(now[:, :2] <= now[:, 2:])  # the oldest chunk is the cleanest
    assert torch.all(prev >= now) and torch.all(prev[:, :2] > now[:, :2])


def test_one_step_reduces_the_streaming_loss_and_consistency_counts() -> None:
    cfg = _cfg("x", cfg_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    batch = sample_batch(tiny_dataset(), cfg, step_generator(0, 0, 0)[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = stream_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    before.backward()
    opt.step()
    with torch.no_grad():
        after = stream_loss(model, batch, cfg, torch.Generator().manual_seed(1))
        no_cons = stream_loss(model, batch, cfg.model_copy(update={"consistency_weight": 0.0}),
                              torch.Generator().manual_seed(1))
    assert after.item() < before.item() and no_cons.item() < after.item()


@pytest.mark.slow
def test_streaming_run_resumes_exactly(tmp_path: Path) -> None:
    data = tiny_dataset()
    train_streaming(_cfg(str(tmp_path / "a"), steps=4), progress=False, dataset=data, vocabulary=VOCAB)
    train_streaming(_cfg(str(tmp_path / "b"), steps=2), progress=False, dataset=data, vocabulary=VOCAB)
    train_streaming(_cfg(str(tmp_path / "b"), steps=4), progress=False, dataset=data, vocabulary=VOCAB)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert la == lb and np.isfinite(la).all()
