"""benchmarks/wan_speed.py reaches the rolling-window steady state and times a LongLive prompt switch (CPU smoke test
of the code path at tiny size: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_steady_state_and_longlive_switch_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("wan_speed", ROOT / "benchmarks" / "wan_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wan_speed", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    args = ["--allow-cpu", "--tiny", "--blocks", "7", "--window", "9", "--warmup", "0", "--no-vae", "--global",
            "--json", str(out)]
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    assert "re-cache s" in text and "fps steady" in text
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"global", "window9", "longlive window12+sink3"}
    sf, ll, glob = results["window9"], results["longlive window12+sink3"], results["global"]
    assert sf["steady_from_block"] == 2 and ll["steady_from_block"] == 3 and glob["steady_from_block"] is None
    assert ll["switch_block"] == 4 and ll["recache_s"] > 0 and math.isnan(sf["recache_s"])
    assert sf["masks_steady"] == 0 and ll["masks_steady"] == 0  # no attention mask once the window is full
    assert sf["fps_steady"] > 0 and ll["fps_steady"] > 0


def test_skyreels_mode_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    """--skyreels runs the DF sampler's async and sync modes (tiny sizes, 3 segments; nothing timed is asserted)."""
    spec = importlib.util.spec_from_file_location("wan_speed", ROOT / "benchmarks" / "wan_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wan_speed", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "sky.json"
    assert bench.main(["--allow-cpu", "--tiny", "--skyreels", "--no-vae", "--json", str(out)]) == 0
    assert "async / sync" in capsys.readouterr().out
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"skyreels-df async 5/5", "skyreels-df sync"}
    assert {r["pixel_frames"] for r in results.values()} == {77}
    assert results["skyreels-df async 5/5"]["calls"] > results["skyreels-df sync"]["calls"]
    assert all(r["fps_steady"] > 0 for r in results.values())
