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
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, ValidationInfo, field_validator

from lvstudio.errors import LvError

C = TypeVar("C", bound="TrainConfigBase")


class ConfigError(LvError):
    """A training config file is invalid (names the file, the key and the fix)."""


class ConfigProblem(ValueError):
    """A value that does not fit the others, raised by a config's model validator: `load_config` names `key` (not
    the whole config) and gives `fix` as the hint."""

    def __init__(self, key: str, message: str, fix: str) -> None:
        super().__init__(f"{key}: {message} — {fix}")
        self.key = key
        self.message = message
        self.fix = fix


# What each input file a config names must be (the fix of a missing or foreign one): by key.
INPUT_FILES: dict[str, str] = {
    "vae": "an existing VAE weight file (e.g. presets/tiny/vae.safetensors)",
    "init_from": "an existing VAE weight file (e.g. presets/tiny/vae.safetensors), or remove it",
    "dit": "an existing DiT weight file (e.g. presets/tiny/dit.safetensors)",
    "real_dit": "an existing DiT weight file (e.g. presets/tiny/dit.safetensors)",
    "init_dit": "an existing DiT weight file (e.g. presets/tiny/dit.safetensors), or remove it",
    "critic_dit": "an existing DiT weight file (e.g. presets/tiny/dit.safetensors), or remove it",
    "text": "an existing text-encoder weight file (e.g. presets/tiny/text.safetensors)",
    "init_text": "an existing text-encoder weight file (e.g. presets/tiny/text.safetensors), or remove it",
    "latents": "an existing latent dataset (a diffusion-forcing run's out_dir/latents.safetensors)",
}


class TrainConfigBase(BaseModel):
    """Fields every recipe shares. Paths are relative to the config file."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[tuple[str, ...]] = ("out_dir",)  # resolved relative to the config file
    example: ClassVar[str] = "presets/tiny/train_df.toml"  # the shipped config to start from (an empty one is refused)
    _source: str | None = PrivateAttr(default=None)  # the config file it was read from (`load_config`), for messages

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

    # Ranges, checked by name so that a recipe's own default (a subclass field) keeps them; the recipes' own fields
    # of the same meaning (clips, windows, probabilities, frame sizes) too, where a recipe has them.
    _AT_LEAST_1: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "log_every", "ckpt_every")
    _NOT_NEGATIVE: ClassVar[tuple[str, ...]] = ("weight_decay", "warmup_steps", "decay_start", "min_lr", "ema_start",
                                                 "threads")
    _POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "grad_clip")
    _RECIPE_AT_LEAST_1: ClassVar[tuple[str, ...]] = (
        "clip_latents", "latent_frames", "block_frames", "dataset_clips", "text_dim", "text_layers", "num_blocks",
        "eval_batches", "stats_batches", "teacher_steps", "num_pairs", "pair_batch", "dmd_batch_size")
    _RECIPE_NOT_NEGATIVE: ClassVar[tuple[str, ...]] = (
        "data_workers", "object_weight", "context_sigma_max", "latent_noise", "freeze_encoder_at", "sink_frames",
        "dmd_steps", "kl_weight", "l1_weight", "mse_weight", "edge_weight")
    _RECIPE_POSITIVE: ClassVar[tuple[str, ...]] = ("shift", "stream_shift", "lr_critic", "dmd_lr")
    _PROBABILITY: ClassVar[tuple[str, ...]] = (
        "switch_prob", "cfg_dropout", "first_window_prob", "ar_prob", "cut_prob", "restart_prob", "estimate_prob",
        "history_gen_prob")

    @field_validator(*_AT_LEAST_1, *_NOT_NEGATIVE, *_POSITIVE, "ema_decay")
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _check_range(cls, value, info.field_name)

    @field_validator(*_RECIPE_AT_LEAST_1, *_RECIPE_NOT_NEGATIVE, *_RECIPE_POSITIVE, *_PROBABILITY, "size",
                     check_fields=False)
    @classmethod
    def _recipe_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _check_range(cls, value, info.field_name)


def _check_range(cls: type[TrainConfigBase], value: float | None, name: str | None) -> float | None:
    """`value` of field `name` if it is in the range its name has (`TrainConfigBase._AT_LEAST_1`, ...)."""
    if value is None:
        return value
    if name in cls._AT_LEAST_1 + cls._RECIPE_AT_LEAST_1 and value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    if name in cls._NOT_NEGATIVE + cls._RECIPE_NOT_NEGATIVE and value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    if name in cls._POSITIVE + cls._RECIPE_POSITIVE and not value > 0:
        raise ValueError(f"must be more than 0, got {value}")
    if name == "ema_decay" and not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value}")
    if name in cls._PROBABILITY and not 0 <= value <= 1:
        raise ValueError(f"must be in [0, 1] (a share), got {value}")
    if name == "size" and (value % 8 or not 8 <= value <= 512):
        raise ConfigProblem("size", f"the frame size must be a multiple of 8 px in [8, 512], got {value}",
                            "set size to one, such as 64 or 128")
    return value


def load_config(path: str | Path, model: type[C]) -> C:
    """Read a TOML training config into `model`; every problem becomes a ConfigError naming file and key.

    A config that sets no key at all is refused (it would start a long run of defaults nobody chose); keys left out
    of a config that sets some take their defaults. Paths are made absolute (relative to the config's folder), and
    an out_dir that is a file (or lies below one) is refused here, before any work. The input files a run reads are
    checked when it starts (`check_inputs`), so that a run's export still works once they moved."""
    import tomli

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder, not a config file",
                          hint=f"pass the path of a training config TOML (e.g. {model.example})")
    try:
        data = tomli.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file — pass the path of a training config TOML") from None
    except (UnicodeDecodeError, tomli.TOMLDecodeError) as err:
        raise ConfigError(f"{p}: {err} — fix the TOML syntax") from None
    if not data:
        raise ConfigError(f"{p} sets nothing (a run of defaults only is refused)",
                          hint=f"start from a copy of {model.example} and set out_dir and the paths in it")
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise _config_error(p, model, err) from None
    update = {}
    for name in cfg.path_fields:
        value = getattr(cfg, name)
        if value is not None and not Path(value).is_absolute():
            update[name] = str((p.parent / value).resolve())
    cfg = cfg.model_copy(update=update)
    cfg._source = str(p)
    _check_out_dir(cfg)
    return cfg


def _config_error(p: Path, model: type[TrainConfigBase], err: ValidationError) -> ConfigError:
    """The ConfigError of the first problem pydantic found: `file: key: message — fix`."""
    first = err.errors()[0]
    problem = (first.get("ctx") or {}).get("error")
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(problem, ConfigProblem):
        return ConfigError(f"{p}: {problem.key}: {problem.message}", hint=problem.fix)
    key = ".".join(str(x) for x in first["loc"]) or "<top>"
    if first["type"] == "extra_forbidden":
        hint = "valid keys are: " + ", ".join(sorted(model.model_fields))
    else:
        hint = f"fix the value of {key}"
    return ConfigError(f"{p}: {key}: {msg} — {hint}")


def world_size_problem(size: int) -> ConfigProblem | None:
    """The frame size of a recipe that trains on the procedural world's clips: the world draws multiples of 8 px in
    [32, 512] (None: `size` is one)."""
    if size % 8 or not 32 <= size <= 512:
        return ConfigProblem("size", f"the procedural world draws frames of a multiple of 8 px in [32, 512] (64..256 "
                             f"verified), not {size}", "set size to one, such as 64 or 128")
    return None


def _where(cfg: TrainConfigBase, key: str) -> str:
    """"train.toml: key" (the config file a value came from, when known)."""
    return f"{cfg._source}: {key}" if cfg._source else key


def _check_out_dir(cfg: TrainConfigBase) -> None:
    """ConfigError unless out_dir is a folder or can be made one (it, or a folder above it, is not a file)."""
    from lvstudio.io_errors import nearest_existing

    out = Path(cfg.out_dir)
    existing = nearest_existing(out)
    if not existing.is_dir():
        what = f"{out} is a file, not a folder" if existing == out else f"{existing}, above {out}, is a file"
        raise ConfigError(f"{_where(cfg, 'out_dir')}: {what}",
                          hint="set out_dir to a folder (a new one is made when the run starts)")


def check_inputs(cfg: TrainConfigBase, keys: tuple[str, ...], fixes: dict[str, str] | None = None) -> None:
    """Before a run makes its out_dir: each input file the config names under `keys` (unset ones are skipped) must
    be there and be a safetensors file; a ConfigError names the key and the fix (`fixes`, else what to set it to:
    `INPUT_FILES`)."""
    for key in keys:
        value = getattr(cfg, key)
        if value is None:
            continue
        path = Path(value)
        fix = (fixes or {}).get(key) or f"set {key} to {INPUT_FILES.get(key, 'an existing file')}"
        if path.is_dir():
            raise ConfigError(f"{_where(cfg, key)}: {path} is a folder, not a file", hint=fix)
        if not path.exists():
            raise ConfigError(f"{_where(cfg, key)}: no such file {path} (paths are relative to the config file's "
                              "folder)", hint=fix)
        if path.is_file() and not _looks_like_safetensors(path):
            raise ConfigError(f"{_where(cfg, key)}: {path} is not a safetensors weight file", hint=fix)
        if key in ("vae", "init_from"):
            _check_vae_file(cfg, key, path, fix)


def _check_vae_file(cfg: TrainConfigBase, key: str, path: Path, fix: str) -> None:
    """ConfigError when `path` (a safetensors file) is not a tiny VAE file, e.g. a DiT's (a damaged header is left
    to the reader, which names the damage)."""
    from lvstudio.checked_files import read_metadata
    from lvstudio.errors import DamagedFileError
    from lvstudio.models.tiny_vae import FORMAT

    try:
        kind = read_metadata(path).get("format")
    except DamagedFileError:
        return
    if kind != FORMAT:
        raise ConfigError(f"{_where(cfg, key)}: {path} is not a tiny VAE weight file (its format is {kind!r}, not "
                          f"{FORMAT!r})", hint=fix)


def _looks_like_safetensors(path: Path) -> bool:
    """Whether `path` starts like a safetensors file (an 8-byte header length under 100 MB, then a JSON object). A
    damaged one, even truncated, still does (its reader names the damage); a TOML, a video or a text file does not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return True  # the reader reports what the disk refused
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 10**8


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
