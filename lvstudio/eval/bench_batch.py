"""`lvstudio bench render --batch N`: aggregate throughput of a batch render — seconds of video made per wall-clock
second — under 1 and 2 (or more) processes, side by side in one run.

The batch: N storyboards, the k-th `minutes * (N - k) / N` long (so the dearest-first queue has something to
balance), each with its own seed and two prompts from the world's grammar. Each process count renders the same batch
into its own folder with `lvstudio render DIR --out-dir` — one plain process for 1, `torchrun --standalone
--nproc_per_node=P` for more — one after the other, every process with the same number of torch threads. Two times
are reported: from launch to exit (process start, imports and model loading included: what a user waits for), and
the batch's own `wall_s` from its index (planning to index), with the CPU seconds all the run's processes used and
the machine's load average when each run started and ended: other work on the cores changes what several processes
can gain, and the CPU time tells the work apart from the wait.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lvstudio.errors import LvError

PROMPTS = ["a red ball bouncing over the sea", "a blue cube moving left on the grass",
           "a yellow star spinning in the night sky", "a pink triangle resting on the snow",
           "a green ball moving right in the desert", "an orange cube moving up in the sky"]


@dataclass
class BatchBenchResult:
    procs: int
    wall_s: float  # launch to exit
    batch_wall_s: float  # the index's wall_s
    video_s: float
    busy_s: list[float]  # per rank: seconds spent in jobs
    cpu_s: float  # CPU seconds (user + system) of every process of the run
    load: tuple[float, float]  # 1-minute load average of the machine when the run started and when it ended

    @property
    def throughput(self) -> float:
        return self.video_s / self.wall_s

    @property
    def batch_throughput(self) -> float:
        return self.video_s / self.batch_wall_s


def write_bench_storyboards(folder: Path, count: int, minutes: float, preset: str) -> float:
    """The batch's storyboards; returns their total length in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for k in range(count):
        seconds = round(minutes * 60 * (count - k) / count, 2)
        total += seconds
        first, second = PROMPTS[k % len(PROMPTS)], PROMPTS[(k + 1) % len(PROMPTS)]
        (folder / f"bench{k:02d}.toml").write_text(
            f'title = "bench {k}"\npreset = "{preset}"\nduration = {seconds}\nseed = {k}\n'
            f'[[shots]]\nat = 0\nprompt = "{first}"\n[[shots]]\nat = {seconds / 2}\nprompt = "{second}"\n'
            'transition = "cut"\n')
    return total


def run_batch_bench(preset: str = "tiny", storyboards: int = 4, minutes: float = 0.5,
                    procs: tuple[int, ...] = (1, 2), threads: int = 1) -> list[BatchBenchResult]:
    """Render the same batch once per process count (module docstring)."""
    from lvstudio.presets import load_preset

    name = load_preset(preset).name  # a preset path would not fit a storyboard's `preset =`; checked up front
    results = []
    with tempfile.TemporaryDirectory(prefix="lvstudio-bench-batch-") as tmp:
        stories = Path(tmp) / "storyboards"
        write_bench_storyboards(stories, storyboards, minutes, name)
        for p in procs:
            results.append(_run(stories, Path(tmp) / f"procs{p}", p, threads))
    return results


def _run(stories: Path, out: Path, procs: int, threads: int) -> BatchBenchResult:
    render = ["-m", "lvstudio", "render", str(stories), "--out-dir", str(out), "--no-progress",
              "--threads", str(threads)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS=str(max(threads, 1)))
    load = os.getloadavg()[0]
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *render], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0 or not (out / "batch.json").exists():
        raise LvError(f"the {procs}-process batch failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    index = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    return BatchBenchResult(procs, wall, index["wall_s"], index["video_s"], [r["busy_s"] for r in index["ranks"]],
                            cpu, (load, os.getloadavg()[0]))


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes (torchrun's workers included: it waits for them)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def batch_bench_lines(results: list[BatchBenchResult], storyboards: int, minutes: float, preset: str,
                      threads: int) -> list[str]:
    base = results[0]
    longest = minutes * 60
    out = [f"batch render bench: {storyboards} storyboards ({longest:g} s down to {longest / storyboards:g} s, "
           f"{base.video_s:g} s of video), preset {preset}, {threads} torch thread(s) per process, "
           f"{os.cpu_count()} CPU cores",
           f"  {'procs':>5s} {'launch-to-exit s':>16s} {'video-s/wall-s':>14s} {'in-batch s':>10s} "
           f"{'video-s/wall-s':>14s} {'CPU s':>7s} {'load start-end':>14s}  busy s per rank"]
    for r in results:
        out.append(f"  {r.procs:5d} {r.wall_s:16.1f} {r.throughput:14.3f} {r.batch_wall_s:10.1f} "
                   f"{r.batch_throughput:14.3f} {r.cpu_s:7.1f} {r.load[0]:6.2f} - {r.load[1]:5.2f}  "
                   + " / ".join(f"{b:.1f}" for b in r.busy_s))
    for r in results[1:]:
        out.append(f"  {r.procs} processes vs {base.procs}: x{r.throughput / base.throughput:.2f} launch to exit, "
                   f"x{r.batch_throughput / base.batch_throughput:.2f} inside the batch, "
                   f"x{r.cpu_s / base.cpu_s:.2f} the CPU time")
    return out
