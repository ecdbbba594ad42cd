"""What every training run starts from: its TOML config (`TrainConfigBase`, `load_config`) and the process group.

Every recipe (diffusion forcing, self forcing, error recycling, streaming, causal distillation) uses these so that
a run started with `lvstudio train RECIPE CONFIG.toml` behaves the same way: resumable from its out_dir, one process
or `torchrun` (DDP, gloo on CPU / nccl on GPU), rank 0 writes checkpoints and the JSONL log. The loop itself
(schedule, optimizer step, EMA, checkpoints, log) is `lvstudio.train.loop`.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from lvstudio.errors import LvError

C = TypeVar("C", bound="TrainConfigBase")


class ConfigError(LvError):
    """A training config file is invalid (names the file, the key and the fix)."""


class TrainConfigBase(BaseModel):
    """Fields every recipe shares. Paths are relative to the config file."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[tuple[str, ...]] = ("out_dir",)  # resolved relative to the config file

    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    warmup_steps: int = 50
    decay_start: int | None = None  # from this step, cosine decay of the learning rate to min_lr at `steps`
    min_lr: float = 0.0
    ema_decay: float = 0.999
    ema_start: int = 100
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    threads: int = 0  # 0 = torch default
    fsdp: bool = False  # shard the models across torchrun's processes (`--fsdp`; lvstudio.train.sharding)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto" (CUDA when there is one, else CPU), "cpu" or "cuda"

    # Ranges, checked by name so that a recipe's own default (a subclass field) keeps them.
    _AT_LEAST_1: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "log_every", "ckpt_every")
    _NOT_NEGATIVE: ClassVar[tuple[str, ...]] = ("weight_decay", "warmup_steps", "decay_start", "min_lr", "ema_start",
                                                 "threads")
    _POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "grad_clip")

    @field_validator(*_AT_LEAST_1, *_NOT_NEGATIVE, *_POSITIVE, "ema_decay")
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = info.field_name
        if value is None:
            return value
        if name in cls._AT_LEAST_1 and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        if name in cls._NOT_NEGATIVE and value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        if name in cls._POSITIVE and not value > 0:
            raise ValueError(f"must be more than 0, got {value}")
        if name == "ema_decay" and not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value


def load_config(path: str | Path, model: type[C]) -> C:
    """Read a TOML training config into `model`; every problem becomes a ConfigError naming file and key."""
    import tomli

    p = Path(path)
    try:
        data = tomli.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file — pass the path of a training config TOML") from None
    except (UnicodeDecodeError, tomli.TOMLDecodeError) as err:
        raise ConfigError(f"{p}: {err} — fix the TOML syntax") from None
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(x) for x in first["loc"]) or "<top>"
        if first["type"] == "extra_forbidden":
            hint = "valid keys are: " + ", ".join(sorted(model.model_fields))
        else:
            hint = f"fix the value of {key}"
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{p}: {key}: {msg} — {hint}") from None
    update = {}
    for name in cfg.path_fields:
        value = getattr(cfg, name)
        if value is not None and not Path(value).is_absolute():
            update[name] = str((p.parent / value).resolve())
    return cfg.model_copy(update=update)


# ---------------------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # init_distributed created the process group (and shutdown_distributed ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); gloo for CPU tensors, nccl for CUDA
    ones. A group the caller already started is used as it is (and left running by `shutdown_distributed`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        from datetime import timedelta

        # Rank 0 may spend a long time building the latent dataset while the others wait at a barrier. The recipes
        # keep their tensors on the CPU: gloo for those, nccl for CUDA tensors when there is a GPU.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=4))
        atexit.register(_end_group_at_exit)
    return DistInfo(dist.get_rank(), dist.get_world_size(), owns)


def _end_group_at_exit() -> None:
    """However a rank leaves (finished, stopped by a signal, or an error every rank raised, such as a damaged
    checkpoint), end the group and free what still holds it (DDP reducers) while the interpreter is alive: a gloo
    group torn down during interpreter shutdown can abort the process ("terminate called without an active
    exception", exit -6) after it did everything right."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def train_device(name: str) -> torch.device:
    """The device a run trains on: `name` is "auto" (CUDA when available, else CPU), "cpu" or "cuda"; under
    torchrun each rank takes the GPU of its LOCAL_RANK. On CUDA, TF32 matrix products are allowed (the tiny
    models train in fp32)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device = {name!r} is not a device: use \"auto\", \"cpu\" or \"cuda\"")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = \"cuda\" but this machine has no CUDA GPU: use \"auto\" or \"cpu\"")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def require_cpu(cfg: TrainConfigBase, recipe: str) -> None:
    """The recipes that do not move their models to a GPU (Self-Forcing, causal distillation, ERFT) refuse
    device = "cuda" instead of ignoring it; "auto" trains them on the CPU."""
    if cfg.device == "cuda":
        raise ConfigError(f"device = \"cuda\": the {recipe} recipe trains on the CPU only — use \"auto\" or \"cpu\"")


def shutdown_distributed(info: DistInfo) -> None:
    """Wait for every rank, then end the process group if `init_distributed` started it."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
        if info.owns_group:
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in one process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
