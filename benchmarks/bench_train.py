"""Step time of the retrain and of the search at the paper's batch/patch settings, scaled down for a CPU.

    PYTHONPATH=. python benchmarks/bench_train.py                      # batch / 4, 1 and 2 threads
    PYTHONPATH=. python benchmarks/bench_train.py --batch-div 1 --device cuda --bf16 --channels-last
    PYTHONPATH=. python benchmarks/bench_train.py --scales 2 --threads 1 --batch-div 8 --bf16 --channels-last \
        --skip-search --compile --warmup 2 --repeats 8    # eager vs torch.compile, side by side

Paper settings (full size): retrain batch 32 with HR patches 128/192/256 for x2/x3/x4 (64 px LR) on
the 48-channel DLSR; search batch 64 with 64 px HR patches on the 48-channel, 6-cell supernet. At
``--batch-div D`` both batches are divided by D and the per-step time is also extrapolated linearly to
the full batch (convolutions on CPU scale linearly in the batch). Timed on random data: the data
pipeline (crops from images in memory) costs next to nothing beside these steps.

The timed code is the trainer's: the same loss, Adam settings, and `dlsr_search.search.search_step`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from dlsr_infer.genotype import builtin
from dlsr_infer.model import DLSR
from dlsr_search.distributed import pick_device
from dlsr_search.losses import sr_loss
from dlsr_search.search import search_step
from dlsr_search.supernet import SuperNet
from dlsr_search.train import hr_patch_side


def timed(step: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):  # first calls create oneDNN/cuDNN kernels: not representative
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def batch_of(n: int, lr: int, scale: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(n, 3, lr, lr, device=device).contiguous(memory_format=fmt)
    y = torch.rand(n, 3, lr * scale, lr * scale, device=device).contiguous(memory_format=fmt)
    return x, y


def bench_retrain(scale: int, batch: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
                  warmup: int, repeats: int, compile: bool = False, patch: int | None = None) -> list[float]:
    torch.manual_seed(0)
    model = DLSR(builtin(f"dlsr_x{scale}")).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-8)
    x, y = batch_of(batch, hr_patch_side(scale, patch) // scale, scale, device, channels_last)
    forward = torch.compile(model) if compile else model  # the first (warm-up) steps pay the compile

    def step() -> None:  # the body of train.py's loop
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            sr = forward(x)
        loss = sr_loss(sr.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, warmup, repeats, device)


def bench_search(batch: int, arch: bool, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
                 warmup: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    net = SuperNet(scale=2, channels=48, num_cells=6).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-8)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-8)
    train_b = batch_of(batch, 32, 2, device, channels_last)
    val_b = batch_of(batch, 32, 2, device, channels_last) if arch else None

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            sr = net(x)
        return sr_loss(sr.float(), y, 0.2)

    return timed(lambda: search_step(net, w_opt, a_opt, forward_loss, train_b, val_b, lam=1.0, gamma=0.2),
                 warmup, repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-div", type=int, default=4, help="divide the paper's batches by this (default 4)")
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="retrain scales to time (default 2 4)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time each retrain case under torch.compile")
    ap.add_argument("--patch", type=int, help="HR patch of the retrain cases (default: the paper's per scale)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    rows = []
    print(f"device {device} | bf16 {args.bf16} | channels_last {args.channels_last} | batch / {args.batch_div}")
    print(f"{'what':<34} {'threads':>7} {'batch':>5} {'s/step (median)':>16} {'min':>7} {'s/step @ paper batch':>21}")
    for threads in (args.threads if device.type == "cpu" else [torch.get_num_threads()]):
        torch.set_num_threads(threads)
        cases: list[tuple[str, int, Callable[[int], list[float]]]] = []
        for s in args.scales:
            hr = hr_patch_side(s, args.patch)
            for comp in ([False, True] if args.compile else [False]):
                cases.append((f"retrain x{s} (HR {hr}){' compiled' if comp else ''}", 32,
                              lambda b, s=s, comp=comp: bench_retrain(s, b, device, dtype, args.channels_last,
                                                                      args.warmup, args.repeats, comp, hr)))
        if not args.skip_search:
            cases.append(("search warm-up step (HR 64)", 64,
                          lambda b: bench_search(b, False, device, dtype, args.channels_last, args.warmup, args.repeats)))
            cases.append(("search MiLeNAS step (HR 64)", 64,
                          lambda b: bench_search(b, True, device, dtype, args.channels_last, args.warmup, args.repeats)))
        for name, paper_batch, run in cases:
            b = max(1, paper_batch // args.batch_div)
            times = run(b)
            med = statistics.median(times)
            full = med * paper_batch / b
            rows.append({"case": name, "threads": threads, "batch": b, "paper_batch": paper_batch,
                         "median_s": med, "min_s": min(times), "times_s": times, "paper_batch_s_est": full})
            print(f"{name:<34} {threads:>7} {b:>5} {med:>16.3f} {min(times):>7.3f} {full:>21.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "bf16": args.bf16, "channels_last": args.channels_last,
                       "batch_div": args.batch_div, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
