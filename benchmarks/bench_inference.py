"""DLSR inference benchmark: every path timed in one process, interleaved, median of N after warm-up.

    python benchmarks/bench_inference.py                      # full suite (about 10-20 min on 2 cores)
    python benchmarks/bench_inference.py --quick              # x4 only, fewer repeats, no photos/compile
    python benchmarks/bench_inference.py --json out.json --markdown out.md

What it measures
  * the machine's dense-GEMM rate (torch.mm, fp32 and bf16) as the yardstick for GMAC/s;
  * x2 / x3 / x4 at 720p output (LR 640x360, 427x240, 320x180), one image, each path:
      eager-ref   a plain eager DLSR written for this benchmark (benchmarks/reference_dlsr.py): the baseline
      layers      dlsr_infer's layers run eagerly (`model.fast_inference = False`)
      layers-cl   the same on channels_last tensors/weights (ablation)
      fold-aten   the fused form's folding + channels_last, plain aten convs (ablation)
      default     `model(x)` under inference_mode: the fused fp32 form with oneDNN post-op fusion
      merge-1x1   default + conv_1x1 MRB merged with its distillation conv (ablation)
      bf16        the fused form in bf16 (fp32 stem, fp32-based output) [CPUs with native bf16]
      bf16-plain  bf16 everywhere (ablation: what the fp32 stem/output cost and buy)
      compile     torch.compile of the fused form (aten backend; compile time reported)
      onnxruntime the `dlsr-export --onnx` graph under onnxruntime (when installed)
    with max |diff| to eager-ref (fp32 paths) or PSNR to eager-ref (bf16 paths);
  * images/s for a folder of synthetic 1080p photos through `dlsr_infer.upscale()` (tiled, PNG in/out);
  * peak RSS of one x4 720p forward per path, and of an 8K-output x4 `upscale()` (memory bounded by
    the tile), each in a fresh subprocess; tiling overhead (auto tile vs whole image);
  * Set5 x2 PSNR-Y of fp32 vs bf16 with the authors' trained weights when ../shared has them.

Weights are random (speed does not depend on them) except for the Set5 check. Timings on a busy
machine are noisy: ratios between paths are meaningful because the paths run interleaved; the
load average before/after is printed and stored.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from dlsr_infer import fast  # noqa: E402
from dlsr_infer.genotype import builtin  # noqa: E402
from dlsr_infer.model import DLSR  # noqa: E402
from reference_dlsr import ReferenceDLSR  # noqa: E402

LR_720P = {2: (360, 640), 3: (240, 427), 4: (180, 320)}
FP32_PATHS = ("eager-ref", "layers", "layers-cl", "fold-aten", "default", "merge-1x1", "compile", "onnxruntime")


# --- helpers --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "bf16_native": fast.bf16_native(),
            "mkldnn_fusion": fast.mkldnn_fusion_available(),
            "isa": torch.backends.cpu.get_cpu_capability()}


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def interleaved(cands: dict[str, Callable[[], Any]], repeats: int,
                warmup: int) -> dict[str, tuple[list[float], list[float]]]:
    """Run every candidate `warmup` times, then `repeats` rounds, rotating the order each round.

    Returns name -> (wall seconds, process CPU seconds) per round. With one thread, CPU time is what
    the run would take on an idle core (other processes' time slices are not counted)."""
    names = list(cands)
    for name in names:
        for _ in range(warmup):
            cands[name]()
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            cands[name]()
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    return times


def gemm_peak(n: int, repeats: int) -> dict[str, float]:
    """Dense GEMM GMAC/s: torch.mm (MKL for fp32; on AMD CPUs MKL takes a slower code path) and oneDNN
    (a 1x1 convolution, i.e. an (H*W) x K x N GEMM, which is what the network's convs run on)."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    k = 1024
    x32 = torch.randn(1, k, 64, 64).contiguous(memory_format=torch.channels_last)
    w32 = torch.randn(k, k, 1, 1)
    conv = torch.ops.mkldnn._convolution_pointwise
    cands = {"fp32 torch.mm": lambda: torch.mm(a32, b32),
             "fp32 oneDNN": lambda: conv(x32, w32, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")}
    macs = {"fp32 torch.mm": n ** 3, "fp32 oneDNN": 64 * 64 * k * k}
    if fast.bf16_native():
        a16, b16, x16, w16 = a32.bfloat16(), b32.bfloat16(), x32.bfloat16(), w32.bfloat16()
        cands["bf16 torch.mm"] = lambda: torch.mm(a16, b16)
        cands["bf16 oneDNN"] = lambda: conv(x16, w16, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        macs.update({"bf16 torch.mm": n ** 3, "bf16 oneDNN": 64 * 64 * k * k})
    times = interleaved(cands, max(repeats, 5), 1)
    # best of N: noise from other processes only ever adds time
    rates = {name: macs[name] / min(ts) / 1e9 for name, (ts, _) in times.items()}
    for dt in ("fp32", "bf16"):
        got = [v for name, v in rates.items() if name.startswith(dt)]
        if got:
            rates[dt] = max(got)
    return rates


def count_macs(model: DLSR, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward of the network's layers (every conv, as specified)."""
    total = 0

    def hook(m: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.fast_inference = False
            model(torch.rand(*shape))
    finally:
        model.fast_inference = True
        for h in handles:
            h.remove()
    return total


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-20))


def make_model(name: str, seed: int = 0) -> DLSR:
    torch.manual_seed(seed)
    return DLSR(builtin(name)).eval()


# --- per-scale path timing ------------------------------------------------------------------------
def build_paths(model: DLSR, x: torch.Tensor, *, ablations: bool, compile_: bool,
                onnx_dir: Path | None) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    extra: dict[str, Any] = {}
    ref = ReferenceDLSR(model.genotype, model.state_dict())
    layers = make_model(f"dlsr_x{model.scale}")
    layers.load_state_dict(model.state_dict())
    layers.fast_inference = False
    paths: dict[str, Callable[[], Any]] = {"eager-ref": lambda: ref(x), "layers": lambda: layers(x)}
    if ablations:
        layers_cl = make_model(f"dlsr_x{model.scale}").to(memory_format=torch.channels_last)
        layers_cl.load_state_dict(model.state_dict())
        layers_cl.fast_inference = False
        x_cl = x.contiguous(memory_format=torch.channels_last)
        paths["layers-cl"] = lambda: layers_cl(x_cl)
        aten = fast.build(model, backend="aten")
        paths["fold-aten"] = lambda: aten(x)
    paths["default"] = lambda: model(x)
    if ablations:
        merged = fast.build(model, merge_1x1=True)
        paths["merge-1x1"] = lambda: merged(x)
    if fast.bf16_native():
        bf16 = fast.build(model, precision="bf16")
        paths["bf16"] = lambda: bf16(x)
        if ablations:
            plain = fast.build(model, precision="bf16", fp32_layers=(), base_output=False)
            paths["bf16-plain"] = lambda: plain(x)
    if compile_:
        t0 = time.perf_counter()
        compiled = torch.compile(fast.build(model, backend="aten"), dynamic=False)
        compiled(x)
        extra["compile_seconds"] = time.perf_counter() - t0
        paths["compile"] = lambda: compiled(x)
    if onnx_dir is not None:
        from dlsr_infer.export import OnnxUpscaler, export_onnx, onnxruntime_available

        if onnxruntime_available():
            path = export_onnx(model, onnx_dir / f"dlsr_x{model.scale}.onnx")
            runner = OnnxUpscaler(path)
            paths["onnxruntime"] = lambda: runner(x)
        else:
            extra["onnxruntime"] = "not installed"
    return paths, extra


def bench_scale(scale: int, args: argparse.Namespace, peak: dict[str, float], onnx_dir: Path | None) -> dict[str, Any]:
    model = make_model(f"dlsr_x{scale}")
    h, w = LR_720P[scale]
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(scale))
    macs = count_macs(model, tuple(x.shape))
    with torch.inference_mode():
        paths, extra = build_paths(model, x, ablations=args.ablations or scale == 4,
                                   compile_=scale in args.compile_scales, onnx_dir=onnx_dir)
        outputs = {name: f() for name, f in paths.items()}
        times = interleaved(paths, args.repeats, args.warmup)
    ref_out = outputs["eager-ref"]
    base = statistics.median(times["eager-ref"][0])
    base_min = min(times["eager-ref"][0])
    base_cpu = statistics.median(times["eager-ref"][1])
    rows = []
    for name, (ts, cs) in times.items():
        med, best, cpu = statistics.median(ts), min(ts), statistics.median(cs)
        bf16 = name.startswith("bf16")
        kind = "bf16" if bf16 and "bf16" in peak else "fp32"
        row = {"path": name, "median_ms": med * 1e3, "min_ms": best * 1e3, "speedup": base / med,
               "speedup_min": base_min / best, "cpu_ms": cpu * 1e3, "cpu_speedup": base_cpu / cpu,
               "gmacs": macs / best / 1e9, "peak_fraction": macs / best / 1e9 / peak[kind],
               "mm_fraction": macs / best / 1e9 / peak[f"{kind} torch.mm"],
               "times_ms": [t * 1e3 for t in ts], "cpu_times_ms": [c * 1e3 for c in cs]}
        diff = (outputs[name].float() - ref_out).abs().max().item()
        row["max_abs_diff"] = diff
        row["psnr_vs_ref"] = psnr(outputs[name].float(), ref_out) if bf16 else None
        rows.append(row)
    return {"scale": scale, "lr": [h, w], "out": [h * scale, w * scale], "gmac": macs / 1e9, "rows": rows, **extra}


# --- photos, memory, tiling ------------------------------------------------------------------------
def synthetic_photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, soft blobs, some edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 0.5 + 0.3 * np.sin(xx / rng.uniform(80, 300) + rng.uniform(0, 6)) * \
            np.cos(yy / rng.uniform(80, 300) + rng.uniform(0, 6))
    for _ in range(40):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 200)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[mask] = img[mask] * 0.5 + rng.uniform(0, 1, 3) * 0.5
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def bench_photos(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from dlsr_infer import upscale

    scale = args.photo_scale
    model = make_model(f"dlsr_x{scale}")
    ref = ReferenceDLSR(model.genotype, model.state_dict())
    variants: dict[str, dict[str, Any]] = {"eager-ref": {"model": ref, "dtype": "fp32"},
                                           "default": {"model": model, "dtype": "fp32"}}
    if fast.bf16_native():
        variants["bf16"] = {"model": model, "dtype": "bf16"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = []
        for i in range(args.photos):
            p = folder / f"photo{i}.png"
            Image.fromarray(synthetic_photo(1080, 1920, i)).save(p)
            files.append(p)
        totals = {k: 0.0 for k in variants}
        for f in files:  # interleaved per photo
            for name, v in variants.items():
                t0 = time.perf_counter()
                out = upscale(str(f), model=v["model"], dtype=v["dtype"], device="cpu")
                out.save(folder / f"{f.stem}_{name}.png")
                totals[name] += time.perf_counter() - t0
    return {"scale": scale, "input": [1080, 1920], "photos": len(files),
            "images_per_s": {k: len(files) / t for k, t in totals.items()},
            "seconds_per_image": {k: t / len(files) for k, t in totals.items()}}


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent through
    fork + exec, so a child of a big benchmark process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_child(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__)), "--child", *argv], capture_output=True, text=True,
                         check=False,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2)
    ap.add_argument("--tile", type=int)
    a = ap.parse_args(argv)
    h, w = a.size
    model = make_model(f"dlsr_x{a.scale}")
    if a.what.startswith("alloc"):  # alloc-{fp32,bf16}[-mallopt]: one large tile through the fused form
        if a.what.endswith("mallopt"):
            assert fast.tune_malloc()
        net = fast.build(model, precision="bf16" if "bf16" in a.what else "fp32")
        x = torch.rand(1, 3, h, w)
        with torch.inference_mode():
            net(x[..., :32, :32])
            net(x)  # first large run: the heap grows
            before = rss_now_kb()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            net(x)
            seconds = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"peak_rss_mb": peak_rss_kb() / 1024, "before_mb": before / 1024, "seconds": seconds,
                          "sys_seconds": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}))
        return
    if a.what.startswith("upscale"):  # upscale[-bf16][-mallopt]: what dlsr-upscale does (it tunes malloc)
        from dlsr_infer import upscale

        if a.what.endswith("-mallopt"):
            assert fast.tune_malloc()
        img = synthetic_photo(h, w, 0)
        dtype = "bf16" if "bf16" in a.what else "fp32"
        small = synthetic_photo(64, 64, 1)
        upscale(small, model=model, dtype=dtype, device="cpu", tile=a.tile)  # warm-up (kernels, caches)
        before = rss_now_kb()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        out = upscale(img, model=model, dtype=dtype, device="cpu", tile=a.tile)
        seconds = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        assert out.shape == (h * a.scale, w * a.scale, 3)
        print(json.dumps({"peak_rss_mb": peak_rss_kb() / 1024, "before_mb": before / 1024, "seconds": seconds,
                          "cpu_seconds": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                          "sys_seconds": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}))
        return
    else:
        x = torch.rand(1, 3, h, w)
        with torch.inference_mode():
            if a.what == "eager-ref":
                net = ReferenceDLSR(model.genotype, model.state_dict())
            elif a.what == "layers":
                model.fast_inference = False
                net = model
            elif a.what == "default":
                net = model
            elif a.what == "bf16":
                net = fast.build(model, precision="bf16")
            else:
                raise SystemExit(f"unknown child mode {a.what}")
            net(x[..., :32, :32])  # warm-up on a small input
            before = rss_now_kb()
            t0 = time.perf_counter()
            net(x)
            seconds = time.perf_counter() - t0
    print(json.dumps({"peak_rss_mb": peak_rss_kb() / 1024, "before_mb": before / 1024, "seconds": seconds}))


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"forward_x4_720p": {}}
    modes = ["eager-ref", "layers", "default"] + (["bf16"] if fast.bf16_native() else [])
    for mode in modes:
        res["forward_x4_720p"][mode] = run_child([mode, "--scale", "4", "--size", "180", "320"])
    # a large tile (x2, 560x560 LR) through the fused form, with glibc's default allocator behaviour,
    # with fast.tune_malloc(), and with PyTorch's transparent-huge-page allocation
    res["large_tile_x2_560"] = {}
    for prec in ["fp32"] + (["bf16"] if fast.bf16_native() else []):
        for variant, env in (("", {}), ("-mallopt", {}), ("-thp", {"THP_MEM_ALLOC_ENABLE": "1"})):
            mode = f"alloc-{prec}" + ("-mallopt" if variant == "-mallopt" else "")
            res["large_tile_x2_560"][f"{prec}{variant}"] = run_child(
                [mode, "--scale", "2", "--size", "560", "560"], env)
    # 8K output: x4 of a 1920x1080 image through upscale() (auto tile), fp32 and bf16, each with glibc's
    # default allocator behaviour and with fast.tune_malloc() (what dlsr-upscale does for its process)
    res["upscale_8k_x4"] = {}
    for mode in ["upscale"] + (["upscale-bf16"] if fast.bf16_native() else []):
        for variant in ("", "-mallopt"):
            res["upscale_8k_x4"][mode + variant] = run_child([mode + variant, "--scale", "4", "--size", "1080", "1920"])
    return res


def bench_tiling(args: argparse.Namespace) -> dict[str, Any]:
    """Tiled vs whole-image upscale() of a 720p-output x4 image (fixed tiles; overlap: the default)."""
    from dlsr_infer import upscale
    from dlsr_infer.tiling import DEFAULT_OVERLAP

    model = make_model("dlsr_x4")
    img = synthetic_photo(180, 320, 3)
    cands = {"whole (tile=0)": lambda: upscale(img, model=model, device="cpu", tile=0)}
    for tile in (2 * DEFAULT_OVERLAP + 32, 2 * DEFAULT_OVERLAP + 96):
        cands[f"tile={tile}"] = lambda tile=tile: upscale(img, model=model, device="cpu", tile=tile)
    times = interleaved(cands, max(3, args.repeats // 2), 1)
    base = statistics.median(times["whole (tile=0)"][0])
    return {k: {"median_ms": statistics.median(v) * 1e3, "overhead": statistics.median(v) / base - 1}
            for k, (v, _) in times.items()}


def bench_set5(args: argparse.Namespace) -> dict[str, Any] | None:
    shared = Path(os.environ.get("DLSR_SHARED", ROOT.parent / "shared"))
    ckpt = shared / "reference" / "dlsr-authors" / "RFDN_beta21_ps128_20210128_1000.pt"
    set5 = shared / "data" / "benchmarks" / "Set5"
    if not ckpt.is_file() or not (set5 / "LR_bicubic" / "X2").is_dir() or not fast.bf16_native():
        return None
    from dlsr_infer.convert import convert_authors_checkpoint
    from dlsr_infer.evaluate import load_rgb, modcrop
    from dlsr_infer.metrics import psnr_y

    model = convert_authors_checkpoint(ckpt, builtin("dlsr_x2"))  # measurement only, never saved
    forms = {"fp32 layers": None, "fp32 default": fast.build(model),
             "bf16": fast.build(model, precision="bf16"),
             "bf16-plain": fast.build(model, precision="bf16", fp32_layers=(), base_output=False)}
    scores: dict[str, list[float]] = {k: [] for k in forms}
    for f in sorted((set5 / "HR").glob("*.png")):
        hr = modcrop(load_rgb(f), 2)
        lr = load_rgb(set5 / "LR_bicubic" / "X2" / f"{f.stem}x2.png")
        x = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)
        for name, form in forms.items():
            with torch.inference_mode():
                if form is None:
                    model.fast_inference = False
                    y = model(x)
                    model.fast_inference = True
                else:
                    y = form(x)
            sr = y[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            scores[name].append(psnr_y(sr, hr, crop=2))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    return {"psnr_y": mean, "drop_db": {k: mean["fp32 layers"] - v for k, v in mean.items()}}


# --- report ---------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
             f"ISA {m['isa']}, native bf16: {m['bf16_native']}; load average {result['load_before']:.2f} before, "
             f"{result['load_after']:.2f} after.",
             "",
             "Dense GEMM (torch.mm {0}^3; oneDNN 4096x1024x1024): ".format(result["gemm_n"]) + ", ".join(
                 f"{k} {v:.0f} GMAC/s" for k, v in result["gemm_gmacs"].items() if " " in k),
             ""]
    for s in result["scales"]:
        lines += [f"**x{s['scale']}**, {s['lr'][1]}x{s['lr'][0]} -> {s['out'][1]}x{s['out'][0]} "
                  f"({s['gmac']:.1f} GMAC), median of {len(s['rows'][0]['times_ms'])}"
                  + (f", compile {s['compile_seconds']:.0f} s" if "compile_seconds" in s else ""), "",
                  "| path | median ms | min ms | speed-up (median / min / CPU time) | GMAC/s (min) "
                  "| % of GEMM (oneDNN / torch.mm) | parity vs eager-ref |",
                  "|---|---:|---:|---|---:|---|---|"]
        for r in s["rows"]:
            par = f"PSNR {r['psnr_vs_ref']:.1f} dB" if r["psnr_vs_ref"] is not None else f"max diff {r['max_abs_diff']:.1e}"
            peak = "bf16" if r["path"].startswith("bf16") else "fp32"
            lines.append(f"| {r['path']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['speedup']:.2f}x / "
                         f"{r['speedup_min']:.2f}x / {r['cpu_speedup']:.2f}x | {r['gmacs']:.0f} | "
                         f"{100 * r['peak_fraction']:.0f}% / {100 * r['mm_fraction']:.0f}% {peak} | {par} |")
        lines.append("")
    if result.get("photos"):
        p = result["photos"]
        lines += [f"**Photos**: {p['photos']} synthetic 1920x1080 PNGs, x{p['scale']} through `upscale()` (PNG in/out): "
                  + ", ".join(f"{k} {v:.3f} img/s ({p['seconds_per_image'][k]:.1f} s/img)"
                              for k, v in p["images_per_s"].items()), ""]
    if result.get("memory"):
        mem = result["memory"]
        lines += ["**Peak RSS** (fresh process each; includes ~the interpreter + torch):", "",
                  "| run | peak RSS MB | RSS before run MB | seconds | CPU seconds | sys seconds | minor faults |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for group, runs in mem.items():
            for k, v in runs.items():
                if "error" in v:
                    lines.append(f"| {group} {k} | error: {v['error']} | | | | | |")
                else:
                    cpu = f"{v['cpu_seconds']:.1f}" if "cpu_seconds" in v else ""
                    lines.append(f"| {group} {k} | {v['peak_rss_mb']:.0f} | {v['before_mb']:.0f} | {v['seconds']:.1f} | "
                                 f"{cpu} | {v.get('sys_seconds', float('nan')):.2f} | {v.get('minor_faults', '')} |")
        lines.append("")
    if result.get("tiling"):
        lines += ["**Tiling** (x4, 320x180 -> 1280x720 via `upscale()`): " + ", ".join(
            f"{k} {v['median_ms']:.0f} ms ({100 * v['overhead']:+.0f}%)" for k, v in result["tiling"].items()), ""]
    if result.get("set5"):
        s5 = result["set5"]
        lines += ["**Set5 x2 PSNR-Y** (authors' weights, MATLAB LR): " + ", ".join(
            f"{k} {v:.4f} dB (drop {s5['drop_db'][k]:+.4f})" for k, v in s5["psnr_y"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="*", default=[2, 3, 4],
                    help="scales to time at 720p output (none: skip the per-path timing)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--gemm-n", type=int, default=4096)
    ap.add_argument("--ablations", action="store_true", help="ablation paths at every scale (always at x4)")
    ap.add_argument("--compile-scales", type=int, nargs="*", default=[4],
                    help="scales to torch.compile (slow: ~1 min each on 2 cores); none: --compile-scales")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--photos", type=int, default=2, help="synthetic 1080p photos (0: skip)")
    ap.add_argument("--photo-scale", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-set5", action="store_true")
    ap.add_argument("--no-tiling", action="store_true")
    ap.add_argument("--quick", action="store_true", help="x4 only, 3 repeats, no photos/compile/memory/tiling")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="apply dlsr_infer.fast.tune_malloc() to this process first (as dlsr-upscale does)")
    ap.add_argument("--json", default=str(HERE / "results" / "inference.json"))
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc and not fast.tune_malloc():
        raise SystemExit("--tune-malloc: not glibc, nothing to tune")
    if args.quick:
        args.scales, args.repeats, args.photos, args.compile_scales = [4], min(args.repeats, 3), 0, []
        args.no_memory = True
    result: dict[str, Any] = {"machine": machine_info(), "load_before": loadavg(), "command": " ".join(
        ["python", "benchmarks/bench_inference.py", *argv])}
    print(f"# {result['machine']}", flush=True)
    result["gemm_n"] = args.gemm_n
    result["gemm_gmacs"] = gemm_peak(args.gemm_n, 3)
    print(f"# GEMM {args.gemm_n}^3: {result['gemm_gmacs']}", flush=True)
    result["scales"] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = None if args.no_onnx else Path(tmp)
        for scale in args.scales:
            res = bench_scale(scale, args, result["gemm_gmacs"], onnx_dir)
            result["scales"].append(res)
            print(markdown({**result, "load_after": loadavg(), "scales": [res]}).split("\n\n", 2)[-1], flush=True)
    sections: list[tuple[str, Callable[[argparse.Namespace], Any]]] = []
    if not args.quick and not args.no_tiling:
        sections.append(("tiling", bench_tiling))
    if args.photos:
        sections.append(("photos", bench_photos))
    if not args.no_memory:
        sections.append(("memory", bench_memory))
    if not args.no_set5:
        sections.append(("set5", bench_set5))
    for name, fn in sections:  # one failing section must not lose the others
        try:
            result[name] = fn(args)
        except Exception as e:  # noqa: BLE001
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(f"# {name} failed: {result[f'{name}_error']}", flush=True)
    result["load_after"] = loadavg()
    text = markdown(result)
    print("\n" + text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
