"""The benchmark scripts still run (they are run by hand, and `bench_cuda` / `bench_train` inside a lent
GPU session, where a broken script costs scarce minutes): each one on the CPU at its smallest setting.
No timing is checked here; timings are for the benchmarks' own reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


def run(*args: str | Path, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_train_one_retrain_step(tmp_path: Path) -> None:
    run(BENCH / "bench_train.py", "--batch-div", "32", "--scales", "2", "--threads", "1", "--repeats", "1",
        "--warmup", "1", "--skip-search", "--json", tmp_path / "t.json")
    (row,) = json.loads((tmp_path / "t.json").read_text())["results"]
    assert row["case"] == "retrain x2 (HR 128)" and row["batch"] == 1 and row["median_s"] > 0


def test_bench_tiling_whole_and_tiled(tmp_path: Path) -> None:
    out = run(BENCH / "bench_tiling.py", "--outputs", "720p", "--tiles", "0", "256", "--threads", "1", "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["tile"], r["tiles"]) for r in rows] == [(0, 1), (256, 2)]
    assert all(r["peak_rss_mb"] >= r["base_rss_mb"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_inference_quick(tmp_path: Path) -> None:
    run(BENCH / "bench_inference.py", "--quick", "--no-onnx", "--no-set5", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--json", tmp_path / "i.json")
    assert json.loads((tmp_path / "i.json").read_text())["scales"]


@pytest.mark.slow
def test_bench_cuda_runs_on_the_cpu(tmp_path: Path) -> None:
    """The GPU session's benchmark, with --device cpu: every code path but the CUDA-only ones."""
    run(BENCH / "bench_cuda.py", "--device", "cpu", "--scales", "2", "--repeats", "1", "--warmup", "0",
        "--no-compile", "--upscale-repeats", "1", "--json", tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["scales"] and set(result["upscale_4k_x4"]) == {"auto", "tile256"}


def test_bench_calls_one_round(tmp_path: Path) -> None:
    run(BENCH / "bench_calls.py", "--model", "x2-s", "--sizes", "16", "--repeats", "1", "--warmup", "0",
        "--json", tmp_path / "c.json")
    (row,) = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert row["size"] == 16 and row["upscale()"]["cpu_ms"] > 0 and row["Upscaler"]["cpu_ms"] > 0
