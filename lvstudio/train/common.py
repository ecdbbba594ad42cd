"""Shared training machinery: TOML configs, distributed setup, EMA, atomic safetensors checkpoints, logging.

Every recipe (diffusion forcing, self forcing, error recycling, streaming) uses these so that a run started with
`lvstudio train RECIPE CONFIG.toml` behaves the same way: resumable from its out_dir, one process or `torchrun`
(DDP, gloo on CPU / nccl on GPU), rank 0 writes checkpoints and the JSONL log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

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
        known = ", ".join(sorted(model.model_fields))
        raise ConfigError(f"{p}: {key}: {first['msg']} — valid keys are: {known}") from None
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        from datetime import timedelta

        # Rank 0 may spend a long time building the latent dataset while the others wait at a barrier.
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=4))
    return DistInfo(dist.get_rank(), dist.get_world_size())


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's parameters (a plain copy of the weights, fp32)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file with model, EMA and optimizer tensors; JSON metadata for the rest.
# ---------------------------------------------------------------------------------------------------------------


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = val.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    info = json.loads(meta)
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = val
    for pid, vals in info["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema: EMA | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model (+ EMA, optimizer) tensors and metadata atomically: tmp file in the same folder, then rename."""
    from lvstudio.atomic import save_safetensors_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"step": str(step), "extra": json.dumps(extra or {}), "format": "pt"}
    if ema is not None:
        tensors.update({f"ema.{k}": v.contiguous().clone() for k, v in ema.shadow.items()})
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    tensors["rng.torch"] = torch.get_rng_state()
    save_safetensors_atomic(tensors, path, meta)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema: EMA | None = None
) -> tuple[int, dict[str, Any]]:
    """Restore what save_checkpoint wrote; returns (step, extra)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if optimizer is not None and "optimizer" in meta:
        _unflatten_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta.get("step", 0)), json.loads(meta.get("extra", "{}"))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    p = Path(out_dir) / "checkpoint.safetensors"
    return p if p.exists() else None


# ---------------------------------------------------------------------------------------------------------------
# Logging and progress
# ---------------------------------------------------------------------------------------------------------------


class TrainLog:
    """Appends one JSON line per logged step to out_dir/train_log.jsonl (rank 0 only)."""

    def __init__(self, out_dir: str | Path, enabled: bool) -> None:
        self.path = Path(out_dir) / "train_log.jsonl"
        self.enabled = enabled

    def write(self, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(fields) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@contextmanager
def progress_bar(total: int, start: int, enabled: bool, description: str) -> Iterator[Any]:
    """A rich progress bar showing loss and it/s; yields an `update(step, loss)` callable."""
    if not enabled:
        yield lambda step, loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} it/s"), TimeRemainingColumn(),
    ) as prog:
        task = prog.add_task(description, total=total, completed=start, loss=float("nan"), rate=0.0)
        t0, s0 = time.perf_counter(), start

        def update(step: int, loss: float) -> None:
            rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
            prog.update(task, completed=step, loss=loss, rate=rate)

        yield update


def lr_at(step: int, base_lr: float, warmup: int, decay_start: int | None = None, total: int = 0,
          min_lr: float = 0.0) -> float:
    """Linear warm-up, constant, then (from decay_start) cosine decay to min_lr at `total`."""
    import math

    if decay_start is not None and step >= decay_start and total > decay_start:
        frac = min(1.0, (step - decay_start) / (total - decay_start))
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return base_lr * min(1.0, (step + 1) / max(1, warmup))
