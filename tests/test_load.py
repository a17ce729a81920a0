"""Reliability, load (issue 7, item 5): `dlsr-upscale` over a folder of many images keeps memory flat.

Each test runs the real CLI over 60 small images in a child process (`benchmarks/bench_load.py`, which
samples VmRSS / VmHWM from /proc/self/status after every written image) and compares image 10 with
image 60. The full-size figures (50 and 500 images) come from running the benchmark itself; see
docs/reliability.md.

What is and is not flat: memory per image is released (same-size images: +0.4 MiB over 50 images,
measured). What does grow is oneDNN's cache of CPU convolution kernels, which holds the kernels built
for each distinct input shape (bounded: 1024 entries per cache by default, ~50-100 KB each). The CLI caps
oneDNN's primitive cache (ONEDNN_CACHE_CAPACITY); ideep's LRU_CACHE_CAPACITY is read when torch is
imported, so only the environment can set it. With both capped, differently sized images are flat too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import time_limit

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_load.py"
TIME_LIMIT = 120

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")


@pytest.fixture(autouse=True)
def _no_hang():
    with time_limit(TIME_LIMIT):
        yield


def bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    out = tmp_path / "report.json"
    environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                                   "LRU_CACHE_CAPACITY")}
    environ.update(env or {})
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--images", "60", "--report-at", "10", "60",
                           "--threads", "1", "--json", str(out), *args], env=environ, capture_output=True,
                          text=True, timeout=TIME_LIMIT - 10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [m["image"] for m in report["milestones"]] == [10, 60]
    return report


def test_same_size_images_keep_memory_flat(tmp_path: Path) -> None:
    """Nothing is kept per image: buffers, notes, progress bars, warnings are all released."""
    r = bench(tmp_path, "--min-size", "32", "--max-size", "32")
    series = r["rss_series_mib"]
    assert r["rss_growth_mib"] < 4.0, series
    assert r["peak_growth_mib"] < 4.0, series
    assert max(series[10:]) - series[9] < 4.0, series


def test_differently_sized_images_are_flat_once_the_kernel_caches_are_bounded(tmp_path: Path) -> None:
    """Every image a new shape (24..48 px): with both oneDNN kernel caches capped nothing else grows."""
    r = bench(tmp_path, "--min-size", "24", "--max-size", "48",
              env={"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"})
    assert r["rss_growth_mib"] < 6.0, r["rss_series_mib"]
    assert r["peak_growth_mib"] < 6.0, r["rss_series_mib"]


def test_the_cli_caps_onednn_kernel_cache_unless_told_otherwise(tmp_path: Path, monkeypatch) -> None:
    from dlsr_infer import cli

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert cli.main([str(tmp_path / "missing.png"), "--model", "no-such-model-dir/", "-q"]) == cli.EXIT_USAGE
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(cli.ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1000")
    cli.main([str(tmp_path / "missing.png"), "--model", "no-such-model-dir/", "-q"])
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1000"
