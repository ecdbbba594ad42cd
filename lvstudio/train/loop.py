"""The training loop every recipe shares: per-step RNGs, learning-rate schedule, optimizer step with gradient
clipping, EMA, progress bar, JSONL log and checkpoint cadence, plus the checkpoint format and resume helpers.

A recipe writes one function that runs a step (`step_fn(step) -> fields to log`) and hands it to `TrainLoop`:

    loop = TrainLoop.for_config(cfg, start=step, report=log.report, checkpoint=save, progress=..., description=...)
    final_step, last_fields = loop.run(step_fn)

The loop calls `step_fn(step)` for step = start .. cfg.steps - 1; after each it updates the progress bar, every
`ckpt_every` steps (and at the last) calls `checkpoint(done_steps)`, and every `log_every` steps (and at the last)
reports the fields (reduced over the window, with `sec_per_step`). Inside a step, recipes use `step_generator`
(data and noise that depend only on seed, step and rank, so a resumed run continues exactly), `lr_at` + `set_lr`,
`optimizer_step` and `EMA`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lvstudio.errors import Interrupted, LvError
from lvstudio.stop_signals import StopRequest, current_stop, exit_code_for, signal_name

if TYPE_CHECKING:
    from lvstudio.train.common import DistInfo, TrainConfigBase

Fields = dict[str, Any]  # what a step reports: numbers (or None), written to the log as they are
StepFn = Callable[[int], Fields]
Reduce = Callable[[list[Fields]], Fields]
CHECKPOINT = "checkpoint.safetensors"
CONSOLIDATED = "consolidated.safetensors"  # a sharded (FSDP) checkpoint gathered into one file


# ---------------------------------------------------------------------------------------------------------------
# One step: RNGs, learning rate, optimizer step, EMA
# ---------------------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """Data and noise RNGs for one step: deterministic, so a resumed run continues exactly."""
    rng = np.random.default_rng([seed, step, rank])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gen


def lr_at(step: int, base_lr: float, warmup: int, decay_start: int | None = None, total: int = 0,
          min_lr: float = 0.0) -> float:
    """Linear warm-up, constant, then (from decay_start) cosine decay to min_lr at `total`."""
    if decay_start is not None and step >= decay_start and total > decay_start:
        frac = min(1.0, (step - decay_start) / (total - decay_start))
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate; returns it."""
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def average_gradients(params: Iterable[nn.Parameter], dist: DistInfo) -> None:
    """All-reduce (mean) the gradients across ranks by hand (missing grads count as zero). For recipes that call
    their model many times per backward, which DDP's single-forward bookkeeping does not allow."""
    if not dist.enabled:
        return
    import torch.distributed as tdist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad)
        p.grad /= dist.world_size


def forward_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a step's forward pass (and loss) runs: "bfloat16" under `torch.autocast` (matmuls and attention in
    bfloat16; the weights, their gradients, AdamW's states and the EMA stay float32: mixed precision), "float32" as
    it is. On a CPU with AVX-512 BF16 a v2 tiny-preset DF step is about 1.3x faster (`lvstudio bench train`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[nn.Parameter],
                   grad_clip: float, *, average_over: DistInfo | None = None) -> float:
    """zero_grad, backward, (all-reduce the gradients by hand if `average_over` is given), clip to `grad_clip`,
    step; returns the gradient norm before clipping.

    `params` is read after the backward pass: under FSDP a module holds its unsharded parameters between forward and
    backward, and the gradients land on the sharded ones the optimizer steps (pass `model.parameters()`)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(params)
    if average_over is not None:
        average_gradients(params, average_over)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # over every rank's shards under FSDP
    opt.step()
    return float(whole(norm))


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a DTensor: a collective, every rank must call it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def weights_digest(model: nn.Module) -> str:
    """sha256 of all parameters (used to check that DDP ranks end with identical weights; whole tensors under
    FSDP, so every rank must call it)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(whole(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def last_fields(window: list[Fields]) -> Fields:
    """Report the fields of the last step of the window (the default)."""
    return dict(window[-1])


class TrainLoop:
    """Runs `step_fn` from `start` to `total` with progress, periodic reports and checkpoints (module docstring)."""

    def __init__(self, *, total: int, start: int, log_every: int, ckpt_every: int,
                 report: Callable[[int, Fields], None] | None = None,
                 checkpoint: Callable[[int], None] | None = None, progress: bool = False,
                 description: str = "train", progress_keys: tuple[str, ...] = ("loss",),
                 reduce: Reduce = last_fields, stop: StopRequest | None = None) -> None:
        """report(step, fields): called every `log_every` steps with `reduce(window)` + sec_per_step.
        progress_keys: the progress bar shows the first of these fields that holds a number.
        stop: ends the run after a step when requested (default: the enclosing `graceful_stop` block's)."""
        if log_every < 1 or ckpt_every < 1:
            raise ValueError(f"log_every and ckpt_every must be >= 1 (got {log_every}, {ckpt_every})")
        self.total, self.start = total, start
        self.log_every, self.ckpt_every = log_every, ckpt_every
        self.report, self.checkpoint = report, checkpoint
        self.progress, self.description = progress, description
        self.progress_keys, self.reduce = progress_keys, reduce
        self.stop = stop
        self.steps_run = 0

    @classmethod
    def for_config(cls, cfg: TrainConfigBase, *, start: int, **kw: Any) -> TrainLoop:
        """A loop over `cfg.steps` with the config's log and checkpoint cadence."""
        return cls(total=cfg.steps, start=start, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, **kw)

    def _progress_value(self, fields: Fields) -> float:
        for key in self.progress_keys:
            value = fields.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                return float(value)
        return math.nan

    def run(self, step_fn: StepFn) -> tuple[int, Fields]:
        """Run the remaining steps; returns (steps done in all, the last reported fields; {} if none ran).

        A stop request (`self.stop`, else the one of the enclosing `graceful_stop` block: SIGINT, SIGTERM, SIGHUP)
        ends the run after the step in flight: a checkpoint of that step is written, then TrainingStopped is raised.
        Under torchrun the ranks agree on it after every step, so all of them stop at the same step."""
        stop = self.stop if self.stop is not None else current_stop()
        step, reported = self.start, {}
        window: list[Fields] = []
        t_last = time.perf_counter()
        with progress_bar(self.total, self.start, self.progress, self.description) as update:
            while step < self.total:
                window.append(step_fn(step))
                step += 1
                self.steps_run += 1
                update(step, self._progress_value(window[-1]))
                signum = _agree(stop.signum or 0 if stop.requested else 0) if stop is not None else 0
                stopping = signum > 0
                # A checkpoint first, so that a report that fails (or a stop requested from it) loses nothing.
                if self.checkpoint is not None and (step % self.ckpt_every == 0 or step == self.total or stopping):
                    self.checkpoint(step)
                if step % self.log_every == 0 or step == self.total or stopping:
                    now = time.perf_counter()
                    reported = {**self.reduce(window), "sec_per_step": (now - t_last) / len(window)}
                    if self.report is not None:
                        self.report(step, reported)
                    window, t_last = [], now
                if stopping and step < self.total:
                    raise TrainingStopped(step, self.total, signum, self.checkpoint is not None)
        return step, reported


class TrainingStopped(Interrupted):
    """A training run stopped by a signal after a step; its checkpoint is saved (exit code 128 + the signal)."""

    def __init__(self, step: int, total: int, signum: int | None, saved: bool) -> None:
        name = signal_name(signum or 2)
        kept = f"a checkpoint of step {step} is saved" if saved else "this run writes no checkpoint"
        super().__init__(f"{name}: training stopped after step {step} of {total}; {kept}",
                         exit_code=exit_code_for(signum or 2), hint="run the same command again to continue")
        self.step, self.total = step, total


def _agree(signum: int) -> int:
    """The stop signal any rank received (0: none), for all ranks: an all-reduce (max) under torch.distributed, so
    every rank stops after the same step; in one process, `signum` itself."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() < 2:
        return signum
    t = torch.tensor([signum], dtype=torch.int32)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def progress_bar(total: int, start: int, enabled: bool, description: str) -> Iterator[Callable[[int, float], None]]:
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


class TrainLog:
    """Appends one JSON line per logged step to out_dir/train_log.jsonl (rank 0 only)."""

    def __init__(self, out_dir: str | Path, enabled: bool) -> None:
        self.path = Path(out_dir) / "train_log.jsonl"
        self.enabled = enabled

    def write(self, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a+b") as fh:  # appends always go to the end, whatever was read
                size = fh.seek(0, 2)
                torn = False
                if size:
                    fh.seek(size - 1)
                    torn = fh.read(1) != b"\n"  # an earlier append was cut short: start a new line
                fh.write((("\n" if torn else "") + json.dumps(fields) + "\n").encode())

    def report(self, step: int, fields: Fields) -> None:
        """A `TrainLoop` report: the step, the fields, the wall-clock time."""
        self.write(step=step, **fields, time=time.time())

    def read(self) -> list[dict[str, Any]]:
        """The logged rows; a line cut short (a full disk, a kill during the append) is left out."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors files with model, EMA and optimizer tensors; JSON metadata for the rest
# ---------------------------------------------------------------------------------------------------------------


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], str]:
    """An optimizer's state as tensors `<prefix><param id>.<name>` and JSON (param groups, non-tensor state)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{prefix}{pid}.{name}"] = val.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str,
                        prefix: str = "optim.") -> None:
    """Restore what `flatten_optimizer` wrote (tensors under other prefixes are ignored)."""
    info = json.loads(meta)
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = val
    for pid, vals in info["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _optimizer_keys(name: str) -> tuple[str, str]:
    """(tensor prefix, metadata key) of an optimizer in a checkpoint: `optim.`/`optimizer` for a run's only
    optimizer (name ""), `optim_<name>.`/`optimizer_<name>` when a run has several."""
    return ("optim.", "optimizer") if not name else (f"optim_{name}.", f"optimizer_{name}")


def checkpoint_state(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None, step: int,
                     extra: dict[str, Any] | None = None, *, copy: bool = True,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint holds: tensors `model.*`, `ema.*`, `optim[_<name>].<param>.<state>`, `rng.torch`, and the
    string metadata (step, extra, optimizer param groups). copy=False keeps the live tensors themselves (sharded
    DTensors under FSDP), so a sharded load can fill them in place."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() if copy else v
               for k, v in model.state_dict().items()}
    meta = {"step": str(step), "extra": json.dumps(extra or {}), "format": "pt"}
    if ema is not None:
        tensors.update({f"ema.{k}": v.cpu().contiguous().clone() if copy else v for k, v in ema.shadow.items()})
    for name, opt in optimizers.items():
        prefix, key = _optimizer_keys(name)
        opt_tensors, meta[key] = flatten_optimizer(opt, prefix=prefix)
        tensors.update({k: v.cpu() for k, v in opt_tensors.items()} if copy else opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, meta


def restore_checkpoint_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                             model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None,
                             ) -> tuple[int, dict[str, Any]]:
    """Put what `checkpoint_state` described (read from the checkpoint at `path`) back into the model, optimizers, EMA
    and RNG; returns (step, extra). Tensors that do not fit the model or the EMA (another config's) are an LvError
    (`check_fit`) before anything is restored; so is anything else that does not fit (`fitting`)."""
    wanted = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        wanted.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    check_fit(path, wanted, tensors, ("model.", "ema.") if ema is not None else ("model.",))
    with fitting(path):
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            device = next(model.parameters()).device
            if device.type != "cpu":  # the EMA lives beside the model: a GPU run resumes on the GPU
                ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
        for name, opt in optimizers.items():
            prefix, key = _optimizer_keys(name)
            if key in meta:
                unflatten_optimizer(opt, tensors, meta[key], prefix=prefix)
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta.get("step", 0)), json.loads(meta.get("extra", "{}"))


# A checkpoint whose tensors do not fit the models a run built from its config (another LoRA rank or targets, another
# DiT size, ...): one home for the check and the message, which every recipe's resume and export use.
FIT_HINT = "use the config the run was started with, or point out_dir at a new folder"
CHECKPOINT_MISFIT = "the checkpoint does not fit this run's models"


def misfit(path: str | Path, detail: str, what: str = CHECKPOINT_MISFIT) -> LvError:
    """The LvError (exit 2) for the file at `path` whose tensors do not fit: `{path}: {what} ({detail}) — fix`."""
    return LvError(f"{path}: {what} ({detail})", hint=FIT_HINT)


def check_fit(path: str | Path, wanted: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
              prefixes: tuple[str, ...]) -> None:
    """LvError (`misfit`) unless the checkpoint's tensors under `prefixes` are `wanted` (the state they would be
    restored into), name for name and shape for shape; it names the first few missing, unexpected and mis-shaped
    tensors, before anything is restored."""
    def order(name: str) -> tuple[int, str]:  # by prefix first: the model's names before its EMA's
        return next((i for i, p in enumerate(prefixes) if name.startswith(p)), len(prefixes)), name

    saved = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefixes)}
    own = {k: tuple(v.shape) for k, v in wanted.items()}
    missing, unexpected = sorted(own.keys() - saved.keys(), key=order), sorted(saved.keys() - own.keys(), key=order)
    shapes = [f"{k} {list(saved[k])} (this run {list(own[k])})" for k in sorted(own.keys() & saved.keys(), key=order)
              if saved[k] != own[k]]
    problems = [f"{label}: {_first_few(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if items]
    if problems:
        raise misfit(path, "; ".join(problems))


@contextmanager
def fitting(path: str | Path, what: str = CHECKPOINT_MISFIT) -> Iterator[None]:
    """Restoring a checkpoint's state inside: what `load_state_dict` (of a module or an optimizer) and name look-ups
    raise on tensors that do not fit (RuntimeError, KeyError, ValueError) becomes the LvError of `misfit`."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as err:
        raise misfit(path, _first_line(err), what) from None


def _first_few(items: list[str], shown: int = 3) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None,
    ema: EMA | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model (+ EMA, optimizers) tensors and metadata atomically (tmp file in the same folder, then rename),
    with a checksum that `load_checkpoint` verifies (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = checkpoint_state(model, _optimizers(optimizer), ema, step, extra)
    save_checked(tensors, path, meta)


def load_checkpoint(
    path: str | Path, model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None, ema: EMA | None = None,
    expected: str | Collection[str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore what save_checkpoint wrote; returns (step, extra). A damaged file raises DamagedFileError (what is
    wrong and what to do), a checkpoint of another recipe than `expected` (`read_checkpoint`) or one that does not fit
    the models (`restore_checkpoint_state`) an LvError, before anything is restored."""
    tensors, meta = read_checkpoint(path, expected)
    return restore_checkpoint_state(path, tensors, meta, model, _optimizers(optimizer), ema)


CHECKPOINT_HINT = ("checkpoints are written atomically, so a crash does not do this (a disk or a copy did): restore it "
                   "from a backup, or move it away to start the run from step 0")
CONSOLIDATED_HINT = ("it is gathered from the run's sharded checkpoint: delete it, and `lvstudio train export` "
                     "gathers it again")
# The recipe that wrote a checkpoint: the "recipe" of its metadata (ERFT), of its "extra" (the recipes that save
# with `save_checkpoint` / `lvstudio.train.sharding`), or its "format" (the VAE recipe's CKPT_FORMAT).
_KIND_OF_FORMAT = {"lvstudio.vae_train_ckpt/1": "vae"}
_COMMAND_OF_KIND = {"causvid-dmd": "self-forcing", "mixed-history": "self-forcing",
                    "causal-distill-ode": "causal-distill"}  # else the kind is the command's name


def read_checkpoint(path: str | Path, expected: str | Collection[str] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of any recipe's checkpoint, verified against its checksum (`lvstudio.checked_files`;
    checkpoints of versions that wrote none are only parsed). A damaged one raises DamagedFileError naming the file
    and what to do: a training checkpoint cannot be rebuilt, so it is never replaced silently. With `expected` (the
    kinds the caller reads, `checkpoint_kind`), another recipe's checkpoint is an LvError (`check_checkpoint_kind`)."""
    from lvstudio.checked_files import load_checked

    hint = CONSOLIDATED_HINT if Path(path).name == CONSOLIDATED else CHECKPOINT_HINT
    tensors, meta = load_checked(path, require_digest=False, hint=hint)
    check_checkpoint_kind(path, meta, expected)
    return tensors, meta


def checkpoint_kind(meta: Mapping[str, str]) -> str | None:
    """The recipe that wrote a checkpoint, from its metadata ("diffusion-forcing", "streaming", "self-forcing",
    "causvid-dmd", "mixed-history", "causal-distill-ode", "erft", "vae"); None if it names none."""
    if meta.get("format") in _KIND_OF_FORMAT:
        return _KIND_OF_FORMAT[meta["format"]]
    if isinstance(meta.get("recipe"), str):
        return meta["recipe"]
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except ValueError:
        return None
    recipe = extra.get("recipe") if isinstance(extra, dict) else None
    return recipe if isinstance(recipe, str) else None


def check_checkpoint_kind(path: str | Path, meta: Mapping[str, str], expected: str | Collection[str] | None) -> None:
    """LvError (exit 2) when the checkpoint at `path` was written by another recipe than `expected` (one kind or
    several; None: any), e.g. a diffusion-forcing checkpoint in the out_dir of a VAE run."""
    if expected is None:
        return
    wanted = (expected,) if isinstance(expected, str) else tuple(expected)
    kind = checkpoint_kind(meta)
    if kind in wanted:
        return
    name = " or ".join(wanted)
    article = "an" if name[:1] in "aeiou" else "a"
    if kind is None:
        raise LvError(f"{path} is not a checkpoint of an lvstudio training recipe (its metadata names none), so not "
                      f"{article} {name} one", hint="point out_dir at a new folder, or move the file away")
    command = _COMMAND_OF_KIND.get(kind, kind)
    raise LvError(f"{path} is {'an' if kind[:1] in 'aeiou' else 'a'} {kind} checkpoint, not {article} {name} one",
                  hint=f"point out_dir at a new folder, or use the config of the {kind} run that wrote it "
                       f"(`lvstudio train {command}`)")


def _first_line(err: BaseException) -> str:
    """The first line that says something ("Error(s) in loading state_dict for X:" announces the next one)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _optimizers(optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None,
                ) -> dict[str, torch.optim.Optimizer]:
    if optimizer is None:
        return {}
    return optimizer if isinstance(optimizer, dict) else {"": optimizer}


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    p = Path(out_dir) / CHECKPOINT
    return p if p.exists() else None
