"""Run by torchrun in tests: FSDP against DDP on tiny configs, in one launch and one process group (the recipes use a
group that is already running and leave it running).

Diffusion forcing: DDP 4 steps, FSDP 4 steps, FSDP 2 steps then resumed to 4. Self-Forcing (DMD): 3 steps with
gradients averaged by hand, the same with --fsdp. Every rank writes what it saw to rank<N>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed

from lvstudio.train.diffusion_forcing import train_diffusion_forcing
from lvstudio.train.self_forcing import train_self_forcing
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset
from tests.test_self_forcing import tiny_latents, tiny_sf_cfg


def main() -> None:
    out, base = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    data = tiny_dataset()
    seen: dict[str, dict] = {}

    def df(name: str, **kw) -> None:
        seen[name] = train_diffusion_forcing(tiny_cfg(str(out / name), **kw), progress=False, dataset=data,
                                             vocabulary=VOCAB)

    df("ddp")
    df("fsdp", fsdp=True)
    df("resumed", fsdp=True, steps=2)
    df("resumed", fsdp=True)
    files = {"real_dit": str(base / "dit.safetensors"), "text": str(base / "text.safetensors")}
    for name, kw in (("sf_ddp", {}), ("sf_fsdp", {"fsdp": True})):
        seen[name] = train_self_forcing(tiny_sf_cfg(out / name, files, **kw), progress=False, dataset=tiny_latents())
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
