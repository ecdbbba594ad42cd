"""Run by torchrun in the fault suite: 2-process DDP diffusion forcing where only rank 1 gets a stop signal (SIGTERM
to itself during step `stop_at`, or none when it is -1). Every rank writes `rank<N>.txt`: "done <step> <weights
sha256>" or "stopped <step> <exit code>"."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lvstudio.stop_signals import graceful_stop
from lvstudio.train import diffusion_forcing
from lvstudio.train.loop import TrainingStopped
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset


def main() -> None:
    out, stop_at = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ["RANK"])
    calls = {"n": 0}
    real_loss = diffusion_forcing.df_loss

    def loss(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if rank == 1 and calls["n"] == stop_at:
            signal.raise_signal(signal.SIGTERM)  # only this rank is told to stop
        return real_loss(*args, **kw)

    diffusion_forcing.df_loss = loss
    cfg = tiny_cfg(str(out), steps=5, ckpt_every=5)
    with graceful_stop(quiet=True):
        try:
            result = diffusion_forcing.train_diffusion_forcing(cfg, progress=False, dataset=tiny_dataset(),
                                                               vocabulary=VOCAB)
            line = f"done {result['step']} {result['weights_sha256']}"
        except TrainingStopped as stopped:
            line = f"stopped {stopped.step} {stopped.exit_code}"
    (out / f"rank{rank}.txt").write_text(line + "\n")


if __name__ == "__main__":
    main()
