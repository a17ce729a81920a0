"""Benchmark: `dlsr-upscale` over a folder of many small images - memory stays flat, and throughput.

    python benchmarks/bench_load.py                          # 500 images (48..96 px), report at 10, 50, 500
    python benchmarks/bench_load.py --images 60 --report-at 10 60 --json /tmp/load.json
    python benchmarks/bench_load.py --model x2 --threads 2   # a real model directory or alias

The parent writes the images (random sizes in --min-size..--max-size, RGB PNG, a few gray/RGBA/JPEG
among them) and a model directory into a temporary folder, then runs the real CLI (`dlsr_infer.cli.main`,
folder in, folder out, -q) in a child process, so the numbers are the CLI's own. The child wraps the
CLI's `save_image` to sample /proc/self/status after every image: VmRSS (resident now) and VmHWM (peak
resident so far). Reported per milestone: both, the throughput since the first image was written
(steady state: model loading and start-up excluded) and overall (start-up included).

The default model is the smallest shipped genotype (`dlsr_s_x2`, 18 channels) with seeded random
weights: compute and memory are those of trained weights. `--tiny` uses 8 channels and 2 cells (what
tests/test_load.py runs). Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def child(args: argparse.Namespace) -> None:
    """Run the CLI in this process, sampling memory after every written image; dump the samples as JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import dlsr_infer.cli as cli

    samples: list[dict[str, float]] = []
    real_save = cli.save_image
    t_start = time.perf_counter()

    def save_image(*a, **k):
        notes = real_save(*a, **k)
        samples.append({"t": time.perf_counter() - t_start, **_status()})
        return notes

    cli.save_image = save_image
    rc = cli.main([str(args.src), "-o", str(args.out), "--model", str(args.model_dir), "-q", "--device", "cpu"])
    Path(args.samples).write_text(json.dumps({"rc": rc, "wall": time.perf_counter() - t_start,
                                              "samples": samples}))


def make_images(folder: Path, n: int, lo: int, hi: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        f = rng.uniform(2, 9, 3)
        a = np.stack([np.sin(f[c] * (xx + yy * f[(c + 1) % 3]) * math.pi) for c in range(3)], -1) * 0.4 + 0.5
        a = np.clip(a + rng.normal(0, 0.04, a.shape), 0, 1)
        im = Image.fromarray((a * 255).astype(np.uint8))
        kind = i % 10
        if kind == 7:
            im.convert("L").save(folder / f"img{i:04d}.png")
        elif kind == 8:
            im.putalpha(200)
            im.save(folder / f"img{i:04d}.png")
        elif kind == 9:
            im.save(folder / f"img{i:04d}.jpg", quality=90)
        else:
            im.save(folder / f"img{i:04d}.png")


def make_model(path: Path, tiny: bool) -> Path:
    import torch
    from torch import nn

    from dlsr_infer import DLSR
    from dlsr_infer.genotype import Genotype, builtin

    spec = builtin("dlsr_s_x2").to_dict()
    if tiny:
        spec.update(name="tiny", channels=8, cells=spec["cells"][:2])
    torch.manual_seed(0)
    model = DLSR(Genotype.from_dict(spec))
    with torch.no_grad():  # weights whose output is image-like, not clamped flat
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, 0.7 * math.sqrt(2.0 / fan_in))
        model.upsampler.conv.weight.mul_(0.3)
        model.upsampler.conv.bias.fill_(0.5)
    return model.save_pretrained(path)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="dlsr-bench-load-") as tmp:
        tmp_path = Path(tmp)
        src, out = tmp_path / "in", tmp_path / "out"
        make_images(src, args.images, args.min_size, args.max_size)
        model_dir = args.model or make_model(tmp_path / "model", args.tiny)
        samples_file = tmp_path / "samples.json"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, __file__, "--child", "--src", str(src), "--out", str(out), "--model-dir",
               str(model_dir), "--samples", str(samples_file)] + (["--threads", str(args.threads)] if args.threads
                                                                  else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not samples_file.is_file():
            raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        data = json.loads(samples_file.read_text())
        written = sorted(p.name for p in out.iterdir())
    s = data["samples"]
    if data["rc"] != 0 or len(s) != args.images or len(written) != args.images:
        raise SystemExit(f"expected {args.images} outputs, got {len(written)} (rc {data['rc']})")
    report = {"images": args.images, "size": [args.min_size, args.max_size], "tiny": args.tiny,
              "model": str(args.model or ("tiny" if args.tiny else "dlsr_s_x2 random")), "threads": args.threads,
              "wall_s_process": wall, "milestones": []}
    for n in sorted(set(args.report_at)):
        if not 1 <= n <= len(s):
            continue
        row = s[n - 1]
        steady = (n - 1) / (row["t"] - s[0]["t"]) if n > 1 else float("nan")
        report["milestones"].append({"image": n, "rss_mib": row["VmRSS"] / 1024, "peak_rss_mib": row["VmHWM"] / 1024,
                                     "img_per_s_steady": steady, "img_per_s_overall": n / row["t"]})
    first = next((m for m in report["milestones"] if m["image"] == min(args.report_at)), None)
    last = report["milestones"][-1]
    if first is not None:
        report["rss_growth_mib"] = last["rss_mib"] - first["rss_mib"]
        report["peak_growth_mib"] = last["peak_rss_mib"] - first["peak_rss_mib"]
    report["rss_series_mib"] = [round(x["VmRSS"] / 1024, 2) for x in s]
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--min-size", type=int, default=48)
    p.add_argument("--max-size", type=int, default=96)
    p.add_argument("--report-at", type=int, nargs="+", default=[10, 50, 500])
    p.add_argument("--model", help="model directory or alias (default: a random-weight dlsr_s_x2 directory)")
    p.add_argument("--tiny", action="store_true", help="8 channels, 2 cells instead of dlsr_s_x2")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the child (0: torch's default)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="also write the report here")
    # child mode (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--samples", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    report = run(args)
    print(f"dlsr-upscale over {report['images']} images of {args.min_size}..{args.max_size} px, model "
          f"{report['model']}, {args.threads or 'default'} thread(s); process wall {report['wall_s_process']:.1f} s")
    print(f"{'image':>6} {'RSS MiB':>9} {'peak MiB':>9} {'img/s steady':>13} {'img/s overall':>14}")
    for m in report["milestones"]:
        print(f"{m['image']:>6} {m['rss_mib']:>9.1f} {m['peak_rss_mib']:>9.1f} {m['img_per_s_steady']:>13.1f} "
              f"{m['img_per_s_overall']:>14.1f}")
    if "rss_growth_mib" in report:
        print(f"growth from image {report['milestones'][0]['image']} to {report['milestones'][-1]['image']}: "
              f"RSS {report['rss_growth_mib']:+.1f} MiB, peak {report['peak_growth_mib']:+.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
