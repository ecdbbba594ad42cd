"""Run by torchrun in tests: 2-process DDP diffusion forcing on a tiny config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lvstudio.train.diffusion_forcing import train_diffusion_forcing
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    cfg = tiny_cfg(str(out), steps=3)
    result = train_diffusion_forcing(cfg, progress=False, dataset=tiny_dataset(), vocabulary=VOCAB)
    # every rank reports a hash of its weights: DDP must keep them identical
    (out / f"rank{rank}.txt").write_text(f"{result['step']} {result['weights_sha256']}\n")


if __name__ == "__main__":
    main()
