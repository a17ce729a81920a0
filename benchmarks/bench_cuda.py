"""DLSR inference on a CUDA GPU: every path timed in one process, interleaved, median of N after warm-up.

    python benchmarks/bench_cuda.py --json benchmarks/results/cuda.json
    python benchmarks/bench_cuda.py --scales 4 --repeats 5 --no-compile      # quick

What it measures (random weights, seeded: speed and memory do not depend on trained values)
  * x2 / x3 / x4 at 720p output (one image), each path, GPU time per image (CUDA-synchronised wall
    time) and PSNR of its output against the IEEE fp32 path (ieee-cl; on a CPU all fp32 paths agree):
      fp32        eager `DLSR` layers in float32, NCHW (on CUDA the fused CPU form does not apply), under
                  torch's default for cuDNN convolutions: TF32 on Ampere and later GPUs
      fp32-cl     the same with channels_last input and weights
      ieee-cl     fp32-cl with TF32 off (`fast.exact_fp32`): what `upscale(dtype="fp32")` and the small
                  passes of 'auto' run since TF32 was turned off for them
      bf16-cl     channels_last under `torch.autocast("cuda", torch.bfloat16)`
      fp16-cl     channels_last under fp16 autocast: what `upscale(device="cuda")` runs by default for
                  passes of 160k+ LR pixels (below, fp32-cl: `upscaling.CUDA_FP16_MIN_PIXELS`)
      compile     `torch.compile` of the fp16-cl path (x4 only by default; compile time reported)
  * x4 fp32 (TF32 and IEEE) against fp16 autocast from one 320x180 LR image to a batch of four 960x540 ones;
  * peak CUDA memory per LR pixel of one fp16 / fp32 forward at several sizes, next to the estimate
    `tiling.bytes_per_pixel` makes (it sizes the automatic tiles);
  * `upscale()` x4 with dtype 'auto' against 'fp16' at LR 320x180, 427x240, 640x360 (CUDA);
  * `upscale()` end to end on a 960x540 uint8 numpy image at x4 (4K output): the automatic tile
    choice, and a forced 256 px tile (tiling overhead).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from dlsr_infer import tiling  # noqa: E402
from dlsr_infer.fast import exact_fp32  # noqa: E402
from dlsr_infer.upscaling import upscale  # noqa: E402
from bench_inference import LR_720P, interleaved, make_model, psnr, synthetic_photo  # noqa: E402

CL = torch.channels_last
#: (batch, LR height, LR width) of the x4 precision sweep: 720p, 1440p, 4K and 8K outputs.
SIZES_X4 = ((1, 180, 320), (1, 360, 640), (1, 540, 960), (4, 540, 960), (1, 1080, 1920))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(cands: dict[str, Callable[[], Any]], repeats: int, warmup: int,
          device: torch.device) -> dict[str, list[float]]:
    """`bench_inference.interleaved` with every call synchronised with the GPU: name -> wall seconds per round."""
    def synced(f: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            f()
            sync(device)
        return run
    rounds = interleaved({n: synced(f) for n, f in cands.items()}, repeats, warmup)
    return {n: wall for n, (wall, _cpu) in rounds.items()}


def bench_scale(scale: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = make_model(f"dlsr_x{scale}").to(device)
    model_cl = make_model(f"dlsr_x{scale}").to(device).to(memory_format=CL)
    h, w = LR_720P[scale]
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(scale)).to(device)
    x_cl = x.contiguous(memory_format=CL)
    cuda = device.type == "cuda"

    def under(dtype: torch.dtype | None, m: torch.nn.Module, inp: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                return m(inp)
        return run

    def ieee(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def exact() -> torch.Tensor:
            with exact_fp32():
                return run()
        return exact

    paths: dict[str, Callable[[], torch.Tensor]] = {"fp32": under(None, model, x), "fp32-cl": under(None, model_cl, x_cl),
                                                    "ieee-cl": ieee(under(None, model_cl, x_cl))}
    extra: dict[str, Any] = {}
    if cuda:
        paths["bf16-cl"] = under(torch.bfloat16, model_cl, x_cl)
        paths["fp16-cl"] = under(torch.float16, model_cl, x_cl)
        if scale in args.compile_scales:
            t0 = time.perf_counter()
            compiled = torch.compile(model_cl, dynamic=False)
            under(torch.float16, compiled, x_cl)()
            sync(device)
            extra["compile_seconds"] = round(time.perf_counter() - t0, 1)
            paths["compile"] = under(torch.float16, compiled, x_cl)
    with torch.inference_mode():
        outputs = {n: f().float() for n, f in paths.items()}
        ref = outputs["ieee-cl"]  # IEEE float32: the reference for TF32 and the reduced precisions alike
    times = timed(paths, args.repeats, args.warmup, device)
    out_px = ref.shape[-1] * ref.shape[-2]
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_ms": round(med * 1e3, 3), "min_ms": round(min(ts) * 1e3, 3),
                      "out_mpx_per_s": round(out_px / med / 1e6, 1),
                      "psnr_vs_fp32": None if name == "ieee-cl" else round(psnr(outputs[name], ref), 1),
                      "max_abs_vs_fp32": round(float((outputs[name] - ref).abs().max()), 6)}
    del outputs
    return {"scale": scale, "lr": [h, w], "paths": rows, **extra}


def bench_sizes(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """x4, fp32 vs fp16 autocast (both channels_last) from one small image to big batches: where the
    GPU stops being launch-bound and reduced precision starts to pay (what `upscale()`'s CUDA default
    should follow)."""
    model = make_model("dlsr_x4").to(device).to(memory_format=CL)
    rows = []
    for n, h, w in SIZES_X4:
        x = torch.rand(n, 3, h, w, device=device).contiguous(memory_format=CL)

        def run(dtype: torch.dtype | None, inp: torch.Tensor = x) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                model(inp)
        def run_ieee() -> None:
            with exact_fp32():
                run(None)
        times = timed({"fp32": lambda: run(None), "ieee": run_ieee, "fp16": lambda: run(torch.float16)},
                      max(5, args.repeats // 2), args.warmup, device)
        fp32, ieee, fp16 = (statistics.median(times[k]) for k in ("fp32", "ieee", "fp16"))
        rows.append({"batch": n, "lr": [h, w], "fp32_ms": round(fp32 * 1e3, 2), "ieee_ms": round(ieee * 1e3, 2),
                     "fp16_ms": round(fp16 * 1e3, 2), "fp16_speedup": round(fp32 / fp16, 2),
                     "fp16_speedup_vs_ieee": round(ieee / fp16, 2)})
        del x
    return rows


def bench_memory(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Peak allocated bytes per LR pixel of one forward (above the weights and input already on the GPU)."""
    rows = []
    for scale in args.scales:
        model = make_model(f"dlsr_x{scale}").to(device).to(memory_format=CL)
        for dtype in (torch.float16, torch.float32):
            for h, w in ((180, 320), (360, 640), (540, 960)):
                x = torch.rand(1, 3, h, w, device=device).contiguous(memory_format=CL)
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    y = model(x)
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
                del y
                rows.append({"scale": scale, "dtype": str(dtype).replace("torch.", ""), "lr": [h, w],
                             "peak_mib": round(peak / 2**20, 1), "bytes_per_lr_px": round(peak / (h * w)),
                             "estimate_bytes_per_lr_px": tiling.bytes_per_pixel(model, dtype)})
        del model
    return rows


def bench_upscale(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`upscale()` of a 960x540 uint8 photo at x4 (4K out), numpy in and out, automatic tile vs 256 px tiles."""
    model = make_model("dlsr_x4")
    photo = synthetic_photo(540, 960, seed=0)
    res: dict[str, Any] = {}
    for label, tile in (("auto", None), ("tile256", 256)):
        run = lambda: upscale(photo, model=model, device=device, tile=tile)  # noqa: E731
        run()
        ts = []
        for _ in range(args.upscale_repeats):
            sync(device)
            t0 = time.perf_counter()
            out = run()
            ts.append(time.perf_counter() - t0)
        res[label] = {"median_s": round(statistics.median(ts), 4), "images_per_s": round(1 / statistics.median(ts), 2),
                      "out_shape": list(out.shape)}
    if device.type == "cuda":
        plan = tiling.auto_tile(model, 540, 960, device=device, compute_dtype=torch.float16)
        res["auto_tile_batch"] = list(plan)
    return res


def bench_upscale_auto(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """`upscale()` (x4, numpy uint8 in and out) with dtype 'auto' against 'fp16', interleaved, on either
    side of `upscaling.CUDA_FP16_MIN_PIXELS`: what picking the dtype by the size of a pass gains."""
    from dlsr_infer.upscaling import Upscaler, cuda_auto_dtype

    model = make_model("dlsr_x4")
    rows = []
    for h, w in ((180, 320), (240, 427), (360, 640)):
        photo = synthetic_photo(h, w, seed=1)
        ups = {d: Upscaler(model, device=device, dtype=d) for d in ("auto", "fp16")}
        walls = timed({d: (lambda u=u: u(photo)) for d, u in ups.items()}, args.repeats, args.warmup, device)
        med = {d: statistics.median(t) * 1000 for d, t in walls.items()}
        stats = ups["auto"].last_stats
        picked = stats.compute_dtype
        if stats.num_tiles == 1:  # one pass of the whole image: what the size rule says for h * w pixels
            assert picked == cuda_auto_dtype(h * w), (picked, h, w)
        rows.append({"lr": [w, h], "auto_dtype": str(picked).replace("torch.", ""),
                     "auto_ms": round(med["auto"], 2), "fp16_ms": round(med["fp16"], 2),
                     "auto_speedup": round(med["fp16"] / med["auto"], 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scales", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-scales", type=int, nargs="*", default=[4])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--upscale-repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.no_compile:
        args.compile_scales = []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA device (pass --device cpu to try the script on a CPU)")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    result: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "repeats": args.repeats, "warmup": args.warmup,
    }
    result["scales"] = []
    for s in args.scales:
        r = bench_scale(s, args, device)
        result["scales"].append(r)
        print(f"x{s} LR {r['lr'][0]}x{r['lr'][1]}: " + ", ".join(
            f"{n} {p['median_ms']:.2f} ms" + (f" ({p['psnr_vs_fp32']} dB)" if p['psnr_vs_fp32'] else "")
            for n, p in r["paths"].items()) + (f"; compile {r['compile_seconds']} s" if "compile_seconds" in r else ""),
            flush=True)
    if device.type == "cuda":
        result["sizes_x4"] = bench_sizes(args, device)
        for r in result["sizes_x4"]:
            print(f"x4 {r['batch']} x LR {r['lr'][0]}x{r['lr'][1]}: fp32 {r['fp32_ms']} ms (TF32), "
                  f"{r['ieee_ms']} ms (IEEE), fp16 {r['fp16_ms']} ms ({r['fp16_speedup']}x, "
                  f"{r['fp16_speedup_vs_ieee']}x vs IEEE)", flush=True)
        result["memory"] = bench_memory(args, device)
        for m in result["memory"]:
            print(f"memory x{m['scale']} {m['dtype']} LR {m['lr'][0]}x{m['lr'][1]}: {m['peak_mib']} MiB, "
                  f"{m['bytes_per_lr_px']} B/px (estimate {m['estimate_bytes_per_lr_px']})", flush=True)
    if device.type == "cuda":
        result["upscale_auto_x4"] = bench_upscale_auto(args, device)
        for r in result["upscale_auto_x4"]:
            print(f"upscale() x4 LR {r['lr'][0]}x{r['lr'][1]}: auto ({r['auto_dtype']}) {r['auto_ms']} ms, "
                  f"fp16 {r['fp16_ms']} ms ({r['auto_speedup']}x)", flush=True)
    result["upscale_4k_x4"] = bench_upscale(args, device)
    print("upscale 960x540 -> 4K (x4):", result["upscale_4k_x4"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
