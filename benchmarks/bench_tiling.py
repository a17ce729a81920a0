"""Benchmark: tiled vs whole-image `upscale()` on the CPU - wall time and peak memory (RSS).

    python benchmarks/bench_tiling.py                       # 1080p and 4K outputs, x4, default configs
    python benchmarks/bench_tiling.py --outputs 1080p --tiles 0 256 --threads 2 --repeat 2

Each configuration runs in its own subprocess so that its peak RSS (`ru_maxrss`) is its own: the
child builds the network, warms it up on a small image, records its RSS, then upscales one uint8
H x W x 3 image end to end (`upscale()` numpy in, numpy out) and reports the time and peak RSS.
"peak - base" is what the upscale itself added on top of the loaded model and the input/output arrays.

The network is the x4 genotype (48 channels) with random weights, seeded: compute and memory are
those of trained weights (same shapes and ops). Pass `--model DIR` to time a real model directory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"720p": (1280, 720), "1080p": (1920, 1080), "1440p": (2560, 1440), "4k": (3840, 2160)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _rss_mb()


def child(args: argparse.Namespace) -> None:
    """One configuration, in this process; prints one JSON line."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dlsr_infer import DLSR
    from dlsr_infer.genotype import builtin
    from dlsr_infer.upscaling import Upscaler

    torch.manual_seed(0)
    model = DLSR.from_pretrained(args.model) if args.model else DLSR(builtin(f"dlsr_x{args.scale}"))
    w, h = OUTPUTS[args.output]
    lr_w, lr_h = w // model.scale, h // model.scale
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (lr_h, lr_w, 3), dtype=np.uint8)
    tile = None if args.tile < 0 else args.tile
    up = Upscaler(model, tile=tile, tile_overlap=args.overlap, device="cpu", channels_last=args.channels_last)
    up(img[:64, :64])  # warm-up: oneDNN primitives, the fused inference form
    base = _current_rss_mb()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = up(img)
        times.append(time.perf_counter() - t0)
    assert out.shape == (lr_h * model.scale, lr_w * model.scale, 3)
    stats = up.last_stats
    print(json.dumps({
        "output": args.output, "lr": f"{lr_w}x{lr_h}", "tile": args.tile, "overlap": stats.overlap if stats else None,
        "tiles": stats.num_tiles if stats else None, "tile_size": f"{stats.tile_w}x{stats.tile_h}" if stats else None,
        "seconds": min(times), "peak_rss_mb": _rss_mb(), "base_rss_mb": base,
        "threads": torch.get_num_threads(), "channels_last": args.channels_last,
    }))


def run_config(output: str, tile: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--outputs", output, "--tiles", str(tile), "--repeat",
           str(args.repeat), "--threads", str(args.threads), "--scale", str(args.scale)]
    if args.overlap is not None:
        cmd += ["--overlap", str(args.overlap)]
    if args.model:
        cmd += ["--model", args.model]
    if args.channels_last:
        cmd += ["--channels-last"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"configuration {output} tile={tile} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", nargs="+", default=["1080p", "4k"], choices=sorted(OUTPUTS))
    ap.add_argument("--tiles", nargs="+", type=int, default=[0, 512, 256],
                    help="LR tile sizes; 0 = whole image, -1 = automatic (tile=None)")
    ap.add_argument("--overlap", type=int, help="tile overlap (default: the library's)")
    ap.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--model", help="a model directory instead of random weights")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest is reported)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = ap.parse_args()
    if args.child:
        args.output, args.tile = args.outputs[0], args.tiles[0]
        child(args)
        return
    rows = []
    print(f"| output | LR in | tile | tiles | time (s) | peak RSS (MB) | peak - base (MB) |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for output in args.outputs:
        for tile in args.tiles:
            r = run_config(output, tile, args)
            rows.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            name = "whole" if tile == 0 else "auto" if tile < 0 else f"{r['tile_size']}"
            print(f"| {output} ({int(r['lr'].split('x')[0]) * args.scale}x{int(r['lr'].split('x')[1]) * args.scale}) "
                  f"| {r['lr']} | {name} | {r['tiles']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                  f"| {r['peak_rss_mb'] - r['base_rss_mb']:.0f} |", flush=True)
    if rows:
        print(f"\nthreads: {rows[0]['threads']}, overlap: {rows[0]['overlap']}, channels_last: "
              f"{rows[0]['channels_last']}, cpu count: {os.cpu_count()}")


if __name__ == "__main__":
    main()
