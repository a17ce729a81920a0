"""Benchmark: the cost of one `upscale()` call on a small image against a reused `Upscaler`.

    python benchmarks/bench_calls.py                      # bundled x2, 32x32 and 96x96 images, 1 thread
    python benchmarks/bench_calls.py --model x2-s --sizes 64 --repeats 30 --json /tmp/calls.json

`upscale()` builds an `Upscaler` per call (model from the per-process cache, dtype resolved, fused form
looked up); a reused `Upscaler` pays that once. On a CPU with native bf16, dtype 'auto' also runs the bf16
parity probe, which `fast.fast_module` must remember per weights: this is the benchmark that shows whether
it does (before 2026-11-28 every call rebuilt the fused form twice and probed again). Both paths run
interleaved in one process on the same image; process CPU time is reported (what an idle core would take),
with wall time beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_inference import interleaved  # noqa: E402
from dlsr_infer import upscale  # noqa: E402
from dlsr_infer.upscaling import Upscaler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="x2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reused = Upscaler(args.model, device="cpu")
    rows = []
    for size in args.sizes:
        img = (np.random.default_rng(size).random((size, size, 3)) * 255).astype(np.uint8)
        rounds = interleaved({"upscale()": lambda: upscale(img, model=args.model, device="cpu"),
                              "Upscaler": lambda: reused(img)}, args.repeats, args.warmup)
        row = {"size": size, "dtype": str(reused.compute_dtype).replace("torch.", "")}
        for name, (wall, cpu) in rounds.items():
            row[name] = {"cpu_ms": round(statistics.median(cpu) * 1000, 2),
                         "wall_ms": round(statistics.median(wall) * 1000, 2)}
        row["ratio_cpu"] = round(row["upscale()"]["cpu_ms"] / row["Upscaler"]["cpu_ms"], 2)
        rows.append(row)
        print(f"{args.model} {size}x{size} ({row['dtype']}): upscale() {row['upscale()']['cpu_ms']} ms CPU "
              f"({row['upscale()']['wall_ms']} wall), reused Upscaler {row['Upscaler']['cpu_ms']} ms CPU "
              f"({row['Upscaler']['wall_ms']} wall): {row['ratio_cpu']}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=1)
                                   + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
