"""Upscale a batch of tensors on the GPU (fp16 autocast for big batches), e.g. frames inside a PyTorch pipeline.

    python examples/upscale_tensor_batch_gpu.py --random-weights
    python examples/upscale_tensor_batch_gpu.py --model x4 --frames 16 --size 270x480

An N x 3 x H x W tensor in [0, 1] comes back as an N x 3 x sH x sW tensor of the same dtype on the same
device. Tiles run in batches; the output is assembled on the CPU and moved back, so GPU memory is
bounded by a batch of tiles. A pass of fewer than 160k LR pixels runs in fp32 (fp16 is slower there);
fp16 tiles that overflow are re-run in fp32 automatically. Without CUDA
this runs on the CPU (bf16 where the CPU has native bf16 and the model passes its parity probe, else fp32).
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import add_model_args, explain_model_error, model_from_args

from dlsr_infer import ModelLoadError
from dlsr_infer.upscaling import Upscaler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", default="270x480", metavar="HxW")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA: worth it for many batches)")
    add_model_args(ap)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w = (int(v) for v in args.size.lower().split("x"))
    frames = torch.rand(args.frames, 3, h, w, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    try:
        upscaler = Upscaler(model_from_args(args), scale=args.scale, device=device, dtype="auto", compile=args.compile)
    except ModelLoadError as e:
        explain_model_error(e)
    upscaler(frames[:1, :, :64, :64])  # warm-up (cuDNN autotuning, compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = upscaler(frames)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    s = upscaler.last_stats
    print(f"{tuple(frames.shape)} {frames.dtype} on {device} -> {tuple(out.shape)} {out.dtype} on {out.device} in "
          f"{seconds:.2f}s; {s.num_tiles} tile position(s) x {args.frames} frames, batch {s.batch_size}, "
          f"fp32 re-runs {s.fp32_fallbacks}"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda" else ""))


if __name__ == "__main__":
    main()
