"""`lvstudio eval drift`: how long videos drift, measured on the procedural world.

The same long storyboard (a seeded cycle of K world-grammar prompts, each held for S seconds, repeated to fill the
duration, so every prompt recurs late in the video) is rendered with the same seed through several *variants*
(`name=PRESET:BACKEND[:lora=off|on|PATH]`). Frames are never written to a video: each chunk is measured as it comes
and dropped, so memory stays flat. Per time window (e.g. every 10 s of video) the report records
  - oracle adherence to the active prompt: scene, colour, shape (fractions of frames, as `eval adherence`);
  - image statistics: mean luminance, luminance std (contrast), mean HSV saturation, mean chroma, sharpness
    (variance of the Laplacian), fraction of vivid pixels (chroma >= oracle.VIVID_CHROMA), the colour-histogram
    (Hellinger) distance to the first window's worth of frames of the same prompt, and frame-to-frame flicker
    (consecutive frames under the same prompt only).
Per storyboard shot it records the same metrics, to compare a prompt's early and late occurrences (image
statistics depend on the prompt: a night scene is dark, so windows are best compared across variants, and a prompt's
late showing against its early one). `plot_drift` draws a grid of panels (x = minutes, one line per variant) from
reports, which round-trip through JSON so a plot can be redrawn without re-rendering.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvstudio.errors import LvError
from lvstudio.eval.image_stats import colour_histograms, frame_flicker, histogram_distance, image_stats
from lvstudio.world.oracle import ADHERENCE_KEYS

STAT_KEYS = ("luminance", "contrast", "saturation", "chroma", "sharpness", "vivid", "blockiness", "checker")
# (key, label) of every per-window metric, in table / panel order.
METRICS: tuple[tuple[str, str], ...] = (
    ("scene", "scene adherence"),
    ("colour", "colour adherence"),
    ("shape", "shape adherence"),
    ("objects", "exactly the prompted objects"),
    ("luminance", "mean luminance"),
    ("contrast", "luminance std (contrast)"),
    ("saturation", "mean saturation"),
    ("chroma", "mean chroma"),
    ("sharpness", "sharpness (Laplacian var)"),
    ("vivid", "vivid pixel fraction"),
    ("blockiness", "blockiness (8-px grid steps / others)"),
    ("checker", "checkerboard energy"),
    ("hist_distance", "colour-hist distance to prompt start"),
    ("flicker", "flicker"),
)
PLOT_KEYS = ("scene", "colour", "shape", "objects", "contrast", "sharpness", "hist_distance", "blockiness", "checker")
RECURRENCE_KEYS = ("scene", "colour", "shape", "objects", "contrast", "chroma", "sharpness", "hist_distance",
                   "blockiness", "checker")
DEFAULT_VARIANTS = (
    "base=tiny:causal-kv",
    "crossclip=tiny:erft-crossclip:lora=off",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# -- configuration ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftConfig:
    """What to render and how to slice it: `minutes` of video, windows of `window_seconds`, a cycle of `prompts`
    prompts held `seconds_per_prompt` each, `seed` (storyboard and renders), torch `threads` (0 = torch default),
    `transition` between the prompts: "switch" (one long shot whose prompt changes: the history is carried through the
    whole video) or "cut" (every prompt starts a new shot: what can drift is only inside a shot)."""

    minutes: float = 5.0
    window_seconds: float = 10.0
    prompts: int = 8
    seconds_per_prompt: float = 15.0
    seed: int = 0
    threads: int = 1
    transition: str = "switch"

    def __post_init__(self) -> None:
        for name in ("minutes", "window_seconds", "seconds_per_prompt"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.prompts, int) or self.prompts < 1:
            raise ValueError(f"prompts must be a positive integer, got {self.prompts!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch default), got {self.threads!r}")
        if self.transition not in ("switch", "cut"):
            raise ValueError(f"transition must be 'switch' or 'cut', got {self.transition!r}")


@dataclass(frozen=True)
class Variant:
    """One way to render: a preset, a backend and (erft-crossclip only) the LoRA choice.

    lora: None = whatever the preset says, False = forced off, True = required on (the preset's LoRA), a string =
    path of a LoRA file to apply instead.
    """

    name: str
    preset: str
    backend: str
    lora: bool | str | None = None

    @property
    def text(self) -> str:
        """Back to the `name=PRESET:BACKEND[:lora=...]` form."""
        tail = {None: "", False: ":lora=off", True: ":lora=on"}.get(self.lora, f":lora={self.lora}")  # type: ignore[arg-type]
        return f"{self.name}={self.preset}:{self.backend}{tail}"


def parse_variant(text: str) -> Variant:
    """Parse `name=PRESET:BACKEND[:lora=off|on|PATH]` (the name may be left out: it defaults to PRESET-BACKEND)."""
    from lvstudio.backends.registry import BACKENDS

    hint = "write NAME=PRESET:BACKEND[:lora=off], e.g. base=tiny:causal-kv"
    raw = text.strip()
    name = None
    if "=" in raw.split(":", 1)[0]:
        name, raw = (s.strip() for s in raw.split("=", 1))
    parts = [p.strip() for p in raw.split(":")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise LvError(f"variant {text!r}: expected PRESET:BACKEND", hint=hint)
    preset, backend, options = parts[0], parts[1], parts[2:]
    if backend not in BACKENDS:
        raise LvError(f"variant {text!r}: unknown backend {backend!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
    lora: bool | str | None = None
    for opt in options:
        key, sep, value = opt.partition("=")
        if key.strip() != "lora" or not sep or not value.strip():
            raise LvError(f"variant {text!r}: unknown option {opt!r}", hint="the only option is lora=off|on|PATH")
        value = value.strip()
        lora = False if value.lower() == "off" else True if value.lower() == "on" else value
    if lora is not None and backend != "erft-crossclip":
        raise LvError(f"variant {text!r}: lora= applies only to the erft-crossclip backend", hint=hint)
    name = name if name is not None else f"{Path(preset).stem}-{backend}"
    if not _NAME.fullmatch(name):
        raise LvError(f"variant {text!r}: name {name!r} must be letters, digits, '_', '.', '+' or '-'", hint=hint)
    return Variant(name, preset, backend, lora)


def _preset_lora_path(preset: Any) -> Path | None:  # lvstudio.presets.Preset
    """The ERFT LoRA file the preset names (crossclip.lora is a role in [files]), or None."""
    role = preset.crossclip.lora
    if role is None or role not in preset.files or preset.is_hub_file(role):
        return None
    return preset.file_path(role)


def variant_problem(variant: Variant) -> str | None:
    """Why this variant cannot run here (unknown preset, missing weights or LoRA, lora= unsupported), or None."""
    from lvstudio.errors import PresetError
    from lvstudio.presets import load_preset

    try:
        preset = load_preset(variant.preset)
    except PresetError as err:
        return str(err)
    if not preset.is_hub:
        for role in ("dit", "text_encoder", "vae"):
            if role in preset.files and not preset.is_hub_file(role) and not preset.file_path(role).exists():
                return f"preset {preset.name!r}: {role} weights missing at {preset.file_path(role)}"
    if variant.backend != "erft-crossclip" or variant.lora is None:
        return None
    lora_file = _preset_lora_path(preset)
    if variant.lora is True:
        if lora_file is None:
            return f"preset {preset.name!r} names no ERFT LoRA (crossclip.lora)"
        if not lora_file.exists():
            return f"preset {preset.name!r}: ERFT LoRA missing at {lora_file}"
    if isinstance(variant.lora, str) and not Path(variant.lora).exists():
        return f"ERFT LoRA {variant.lora!r} not found"
    return None


def check_variant(variant: Variant) -> None:
    """Raise LvError if the variant cannot run (see `variant_problem`)."""
    problem = variant_problem(variant)
    if problem is not None:
        raise LvError(f"variant {variant.name!r} ({variant.text}): {problem}",
                      hint="`lvstudio presets list` shows the presets; lora=off renders without a LoRA")


def _make_variant_backend(variant: Variant, bundle: Any, buffer: Any, seed: int) -> Any:
    """The variant's backend; the LoRA choice (False = off) goes to the cross-clip backend's `lora=`."""
    from lvstudio.backends import make_backend

    p = bundle.preset
    lora = variant.lora if variant.backend == "erft-crossclip" else None
    return make_backend(variant.backend, bundle, buffer, seed=seed, width=p.width, height=p.height, lora=lora)


# -- storyboard -----------------------------------------------------------------------------------------------------
def drift_storyboard(cfg: DriftConfig) -> list[tuple[float, str, Any]]:
    """(start seconds, prompt, SceneSpec) shots: `cfg.prompts` distinct seeded prompts cycled, each held
    `cfg.seconds_per_prompt`, until `cfg.minutes` are filled."""
    from lvstudio.world import sample_spec

    rng = np.random.default_rng(cfg.seed)
    specs: dict[str, Any] = {}
    tries = 0
    while len(specs) < cfg.prompts:
        spec = sample_spec(rng)
        specs.setdefault(spec.caption(), spec)
        tries += 1
        if tries > 200 * cfg.prompts:
            raise ValueError(f"could not draw {cfg.prompts} distinct prompts from the world grammar")
    cycle = list(specs.items())
    total = cfg.minutes * 60.0
    shots = []
    i = 0
    while i * cfg.seconds_per_prompt < total - 1e-9:
        prompt, spec = cycle[i % len(cycle)]
        shots.append((i * cfg.seconds_per_prompt, prompt, spec))
        i += 1
    return shots


# -- accumulation ---------------------------------------------------------------------------------------------------
@dataclass
class _Acc:
    """Running sums over a set of frames (a window or a shot)."""

    frames: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    flicker_sum: float = 0.0
    flicker_pairs: int = 0
    hist: dict[int, np.ndarray] = field(default_factory=dict)  # prompt index -> counts [HIST_BINS**3]

    def add(self, n: int, values: dict[str, float], prompt: int, hist: np.ndarray, flick: np.ndarray) -> None:
        self.frames += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if prompt in self.hist:
            self.hist[prompt] = self.hist[prompt] + hist
        else:
            self.hist[prompt] = hist.copy()
        ok = np.isfinite(flick)
        self.flicker_sum += float(flick[ok].sum())
        self.flicker_pairs += int(ok.sum())

    def mean(self, key: str) -> float:
        return self.sums.get(key, float("nan")) / self.frames if self.frames else float("nan")

    def hist_distance(self, refs: dict[int, np.ndarray]) -> float:
        """Frame-weighted mean distance of each prompt's histogram here to that prompt's reference."""
        total, weight = 0.0, 0.0
        for prompt, counts in self.hist.items():
            d = histogram_distance(counts, refs.get(prompt, np.zeros(1)))
            w = float(counts.sum())
            if math.isfinite(d):
                total, weight = total + d * w, weight + w
        return total / weight if weight else float("nan")

    def row(self, refs: dict[int, np.ndarray]) -> dict[str, float]:
        out = {k: self.mean(k) for k in (*ADHERENCE_KEYS, *STAT_KEYS)}
        out["hist_distance"] = self.hist_distance(refs)
        out["flicker"] = self.flicker_sum / self.flicker_pairs if self.flicker_pairs else float("nan")
        return out


# -- the report -----------------------------------------------------------------------------------------------------
def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


@dataclass
class DriftReport:
    """The drift measurements of one variant. windows: one dict per window (index, start_s, end_s, minutes =
    window centre, frames, prompts, and every METRICS key); shots: one dict per storyboard shot (shot, prompt_index,
    occurrence, start_s, frames, and every METRICS key)."""

    variant: str  # name=PRESET:BACKEND[:lora=...]
    name: str
    preset: str
    backend: str
    config: DriftConfig
    fps: int
    width: int
    height: int
    prompts: list[str]
    windows: list[dict] = field(default_factory=list)
    shots: list[dict] = field(default_factory=list)
    frames_per_second: float = 0.0  # generation speed (frames / second spent in backend.step)
    wall_seconds: float = 0.0  # whole evaluation, oracle and statistics included
    device: str = "cpu"

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(_nan_to_none(data), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DriftReport:
        data = json.loads(text)
        if not isinstance(data, dict) or "variant" not in data or "windows" not in data:
            raise ValueError("not a drift report (expected a JSON object with 'variant' and 'windows')")
        data["config"] = DriftConfig(**data["config"])
        for rows in (data.get("windows", []), data.get("shots", [])):
            for row in rows:
                for k, v in row.items():
                    if v is None:
                        row[k] = float("nan")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(minutes [W], values [W]) of one metric over the windows."""
        x = np.array([w["minutes"] for w in self.windows], np.float64)
        y = np.array([w.get(key, float("nan")) for w in self.windows], np.float64)
        return x, y


def load_reports(path: str | Path) -> list[DriftReport]:
    """Reports from a JSON file: one report (per-variant file) or a list of reports (the file next to a plot)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LvError(f"cannot read drift report {path}: {err.strerror or err}",
                      hint="pass JSON files written by `lvstudio eval drift`") from None
    except ValueError as err:  # not JSON, or not text at all (a PNG given for its .json)
        raise LvError(f"{path} is not a drift report: {err}",
                      hint="pass JSON files written by `lvstudio eval drift` (the plot's data is its .json)") from None
    try:
        items = data if isinstance(data, list) else [data]
        return [DriftReport.from_json(json.dumps(item)) for item in items]
    except (TypeError, ValueError) as err:
        raise LvError(f"{path}: {err}", hint="pass JSON files written by `lvstudio eval drift`") from None


# -- evaluation -----------------------------------------------------------------------------------------------------
class _DriftMeter:
    """Measures the frames of a drift render as they come: windows of `per_window` frames, per-shot accumulators,
    and each prompt's reference histogram (its first window's worth of frames)."""

    def __init__(self, report: DriftReport, shots: list[tuple[float, str, Any]], per_window: int,
                 on_window: Callable[[dict], None] | None) -> None:
        self.report, self.shots, self.per_window, self.on_window = report, shots, per_window, on_window
        self.prompt_index = {prompt: i for i, prompt in enumerate(report.prompts)}
        self.refs: dict[int, np.ndarray] = {}  # prompt index -> histogram counts
        self.ref_count: dict[int, int] = {}
        self.shot_accs: dict[int, _Acc] = {}
        self.window, self.win_index = _Acc(), 0
        self.previous: tuple[int, np.ndarray] | None = None  # (shot, last frame) for flicker across chunks

    def measure(self, frames: np.ndarray, shot: int) -> None:
        """Frames [n, H, W, 3] uint8 of one chunk under storyboard shot `shot`, split where a window boundary falls."""
        from lvstudio.world.oracle import adherence

        spec, k = self.shots[shot][2], self.prompt_index[self.shots[shot][1]]
        stats = image_stats(frames)
        hists = colour_histograms(frames)  # [n, bins]
        prev = self.previous[1] if self.previous is not None and self.previous[0] == shot else None
        flick = frame_flicker(frames, prev)
        pos = 0
        while pos < len(frames):
            take = min(len(frames) - pos, self.per_window - self.window.frames)
            sl = slice(pos, pos + take)
            score = adherence(frames[sl], spec)
            values = {key: score[key] * take for key in ADHERENCE_KEYS}
            values.update({key: float(stats[key][sl].sum()) for key in STAT_KEYS})
            h = hists[sl].sum(axis=0)
            # The prompt's reference histogram fills from its first window's worth of frames.
            have = self.ref_count.get(k, 0)
            if have < self.per_window:
                extra = hists[sl][: self.per_window - have].sum(axis=0)
                self.refs[k] = self.refs.get(k, np.zeros_like(extra)) + extra
                self.ref_count[k] = have + min(take, self.per_window - have)
            self.window.add(take, values, k, h, flick[sl])
            self.shot_accs.setdefault(shot, _Acc()).add(take, values, k, h, flick[sl])
            pos += take
            if self.window.frames >= self.per_window:
                self.close_window()
        self.previous = (shot, frames[-1].copy())

    def close_window(self) -> None:
        w, fps = self.window, self.report.fps
        start = self.win_index * self.per_window
        row = {"index": self.win_index, "start_s": start / fps, "end_s": (start + w.frames) / fps,
               "minutes": (start + w.frames / 2) / fps / 60.0, "frames": w.frames, "prompts": sorted(w.hist),
               **w.row(self.refs)}
        self.report.windows.append(row)
        if self.on_window is not None:
            self.on_window(row)
        self.window, self.win_index = _Acc(), self.win_index + 1

    def finish(self) -> None:
        """Close the last window; per-shot rows (early vs late occurrences of the same prompt)."""
        if self.window.frames:
            self.close_window()
        n_prompts = len(self.report.prompts)
        for shot, acc in sorted(self.shot_accs.items()):
            self.report.shots.append({"shot": shot, "prompt_index": self.prompt_index[self.shots[shot][1]],
                                      "occurrence": shot // n_prompts, "start_s": self.shots[shot][0],
                                      "frames": acc.frames, **acc.row(self.refs)})


def evaluate_drift(
    variant: Variant | str,
    cfg: DriftConfig,
    on_window: Callable[[dict], None] | None = None,
    *,
    bundle: Any = None,  # a ModelBundle to use instead of loading the variant's preset (tests)
) -> DriftReport:
    """Render the drift storyboard with one variant, chunk by chunk (no video written), and measure every window."""
    import torch

    from lvstudio.prompt_stream import PromptStreamBuffer

    if isinstance(variant, str):
        variant = parse_variant(variant)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    if bundle is None:
        check_variant(variant)
        from lvstudio.presets.load import load_bundle

        bundle = load_bundle(variant.preset)
    p = bundle.preset
    # Step 1: the storyboard in a prompt stream, its prompts joined by switches (one long shot whose prompt changes:
    # what drifts is the history carried across the whole video) or by cuts; the backend renders it with the run seed.
    shots = drift_storyboard(cfg)
    prompts = list(dict.fromkeys(prompt for _, prompt, _ in shots))
    buffer = PromptStreamBuffer(bundle.text.encode, block_latents=p.attention.block_frames, fps=p.fps)
    for i, (at, prompt, _) in enumerate(shots):
        buffer.add_shot(at, prompt, transition=cfg.transition if i else "cut", shot=i)
    backend = _make_variant_backend(variant, bundle, buffer, cfg.seed)
    total = round(cfg.minutes * 60.0 * p.fps)
    report = DriftReport(variant.text, variant.name, p.name, variant.backend, cfg, p.fps, p.width, p.height, prompts,
                         device=str(bundle.device))
    meter = _DriftMeter(report, shots, max(1, round(cfg.window_seconds * p.fps)), on_window)
    done, gen_seconds = 0, 0.0
    with torch.no_grad():
        while done < total:
            # Step 2: one chunk from the backend (timed on its own: the generation speed), then its measurements.
            t0 = time.perf_counter()
            chunk = backend.step()
            gen_seconds += time.perf_counter() - t0
            frames = chunk.frames[: total - done]  # [n, H, W, 3] uint8
            meter.measure(frames, min(max(int(chunk.event_id), 0), len(shots) - 1))
            done += len(frames)
            del frames, chunk
    meter.finish()
    report.frames_per_second = done / max(gen_seconds, 1e-9)
    report.wall_seconds = time.perf_counter() - t_start
    return report


# -- summaries and plots --------------------------------------------------------------------------------------------
def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope dy/dx over finite points (NaN with fewer than two distinct x)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) <= 0:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def _span_mean(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    ok = (x >= lo) & (x <= hi) & np.isfinite(y)
    return float(y[ok].mean()) if ok.any() else float("nan")


def first_last(report: DriftReport, key: str) -> tuple[float, float, float]:
    """(first-minute mean, last-minute mean, slope per minute) of one metric (window centres decide membership)."""
    x, y = report.series(key)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    end = max(w["end_s"] for w in report.windows) / 60.0
    return _span_mean(x, y, 0.0, 1.0), _span_mean(x, y, end - 1.0, end), _slope(x, y)


def recurrence(report: DriftReport, key: str) -> tuple[float, float]:
    """Mean over prompts shown at least twice of (first occurrence, last occurrence) values of a shot metric."""
    by_prompt: dict[int, list[dict]] = {}
    for row in report.shots:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    nan = float("nan")
    pairs = [(rows[0].get(key, nan), rows[-1].get(key, nan)) for rows in by_prompt.values() if len(rows) >= 2]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return float("nan"), float("nan")
    return float(np.mean([a for a, _ in pairs])), float(np.mean([b for _, b in pairs]))


def _showings(report: DriftReport, key: str) -> dict[int, list[float]]:
    """A shot metric per prompt, one value per showing in order (NaN where a showing has none)."""
    by_prompt: dict[int, list[float]] = {}
    for row in report.shots:
        by_prompt.setdefault(row["prompt_index"], []).append(float(row.get(key, float("nan"))))
    return dict(sorted(by_prompt.items()))


def per_prompt_recurrence(report: DriftReport, key: str) -> list[tuple[int, float, float]]:
    """(prompt index, first showing, last showing) of a shot metric for every prompt shown at least twice."""
    return [(k, vals[0], vals[-1]) for k, vals in _showings(report, key).items() if len(vals) >= 2]


def per_prompt_halves(report: DriftReport, key: str) -> list[tuple[int, float, float, float, float]]:
    """(prompt index, sd of one showing, mean of the first half of its showings, of the second half, standard error of
    their difference) for every prompt shown at least 4 times. One showing is one sample of the prompt: where shots
    do not depend on what came before (cuts), first vs last differs by this noise alone, and a drift is a difference
    between the halves several standard errors wide."""
    out = []
    for k, vals in _showings(report, key).items():
        v = np.array([x for x in vals if math.isfinite(x)])
        if len(v) < 4:
            continue
        a, b = v[: len(v) // 2], v[len(v) // 2 :]
        sd = float(np.std(v, ddof=1))
        out.append((k, sd, float(a.mean()), float(b.mean()), sd * math.sqrt(1 / len(a) + 1 / len(b))))
    return out


def stability_lines(report: DriftReport, points: float = 0.05, grid_ratio: float = 1.2) -> list[str]:
    """The long-video stability check of one report: each prompt's colour and shape adherence at its last showing
    within `points` of its first showing, and blockiness / checkerboard energy in the last minute at most
    `grid_ratio` x the first minute's. Under each metric, the noise of one showing (sd over the prompt's showings)
    and the first half of the showings against the second ('!' where they differ by more than 2 standard errors)."""
    out = [f"  stability ({report.name}): last showing vs first, per prompt (target: within {100 * points:.0f} points);"
           f" grid artefacts last minute / minute 1 (target <= {grid_ratio:g})"]
    for key in ("colour", "shape", "objects"):
        rows = per_prompt_recurrence(report, key)
        cells = [f"p{k} {a:.2f}->{b:.2f}{'' if abs(b - a) <= points + 1e-9 else ' !'}" for k, a, b in rows
                 if math.isfinite(a) and math.isfinite(b)]
        out.append(f"    {key:<8} " + ("  ".join(cells) or "-"))
        halves = [f"p{k} {a:.2f}->{b:.2f} sd {sd:.2f}{' !' if abs(b - a) > 2 * se + 1e-9 else ''}"
                  for k, sd, a, b, se in per_prompt_halves(report, key)]
        if halves:
            out.append(f"      halves of the showings, one showing's sd: {'  '.join(halves)}")
    for key in ("blockiness", "checker"):
        first, last, _ = first_last(report, key)
        ratio = last / first if first > 0 else float("nan")
        mark = "" if math.isfinite(ratio) and ratio <= grid_ratio else " !"
        out.append(f"    {key:<10} minute 1 {first:.4f}  last minute {last:.4f}  ratio {ratio:.2f}{mark}")
    return out


def _fmt(v: float, key: str) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.1f}" if key == "sharpness" else f"{v:.3f}"


def summary_lines(reports: Sequence[DriftReport]) -> list[str]:
    """A table per variant: first-minute vs last-minute value, change and slope per minute of every metric, plus the
    early vs late occurrences of the same prompts."""
    if not reports:
        return ["drift: no reports"]
    c = reports[0].config
    out = [(f"drift: {c.minutes:g} min, windows of {c.window_seconds:g} s, {c.prompts} prompts x "
            f"{c.seconds_per_prompt:g} s cycled, each prompt a {c.transition}, seed {c.seed}"),
           f"  {'variant':<12} {'metric':<37} {'first min':>10} {'last min':>10} {'change':>9} {'slope/min':>10}"]
    for r in reports:
        out.append(f"  {r.name:<12} {r.variant}  ({r.preset}, {r.width}x{r.height}@{r.fps}, "
                   f"generation {r.frames_per_second:.1f} frames/s, {r.device})")
        for key, label in METRICS:
            first, last, slope = first_last(r, key)
            out.append(f"  {'':<12} {label:<37} {_fmt(first, key):>10} {_fmt(last, key):>10} "
                       f"{_fmt(last - first, key):>9} {_fmt(slope, key):>10}")
        rec = {key: recurrence(r, key) for key in RECURRENCE_KEYS}
        if math.isfinite(rec["scene"][0]):
            out.append(f"  {'':<12} same prompts, first vs last showing (mean over prompts shown twice or more):")
            for key, label in METRICS:
                if key in rec:
                    a, b = rec[key]
                    out.append(f"  {'':<12}   {label:<35} {_fmt(a, key):>10} {_fmt(b, key):>10} {_fmt(b - a, key):>9}")
            out.extend(stability_lines(r))
    return out


def _rolling(y: np.ndarray, k: int) -> np.ndarray:
    """Centred NaN-aware moving average over k points ([W] -> [W])."""
    k = min(k, len(y))
    if k <= 1:
        return y
    ok = np.isfinite(y)
    kernel = np.ones(k)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)


def plot_drift(reports: Sequence[DriftReport], out_png: str | Path, smooth: int = 3,
               title: str | None = None) -> Path:
    """A grid of panels (PLOT_KEYS), x = minutes, one line per variant (rolling mean over `smooth` windows, raw
    values faint). Also writes `<out_png stem>.json` next to the PNG with every report, for `--replot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reports:
        raise ValueError("plot_drift needs at least one report")
    labels = dict(METRICS)
    cols = 3
    rows = math.ceil(len(PLOT_KEYS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(PLOT_KEYS):
        ax = axes[i // cols][i % cols]
        for j, r in enumerate(reports):
            x, y = r.series(key)
            colour = colours[j % len(colours)]
            ax.plot(x, y, color=colour, alpha=0.25, lw=0.8)
            ax.plot(x, _rolling(y, smooth), color=colour, lw=1.6, label=r.name)
        ax.set_title(labels[key], fontsize=9)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
        if key in ADHERENCE_KEYS:
            ax.set_ylim(-0.02, 1.02)
    for i in range(len(PLOT_KEYS), rows * cols):
        axes[i // cols][i % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    c = reports[0].config
    fig.suptitle(title or f"drift over {c.minutes:g} min ({c.prompts} prompts x {c.seconds_per_prompt:g} s cycled, "
                          f"each a {c.transition}, windows {c.window_seconds:g} s, seed {c.seed})", fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    data = [json.loads(r.to_json()) for r in reports]
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return out
