"""Export a DLSR network to ONNX (`dlsr-export --onnx`) and run the export with onnxruntime.

The exported graph is the fused inference form (`dlsr_infer.fast`, "aten" backend, float32): folded
convolutions, no autograd, dynamic batch, height and width. Inputs are N x 3 x H x W float32 RGB in
[0, 1] (H, W >= `MIN_INPUT_SIZE`), outputs N x 3 x sH x sW.

    dlsr-export x4 --onnx dlsr_x4.onnx             # bundled / Hub / directory model
    dlsr-export --genotype dlsr_x4 --onnx r.onnx   # random weights (for testing the toolchain)

`onnx` and `onnxruntime` are an optional extra (`pip install dlsr[onnx]`): torch's exporter needs
`onnx`; `--check` and `OnnxUpscaler` need onnxruntime too.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .fast import build
from .imageio import atomic_write
from .model import DLSR, MIN_INPUT_SIZE

__all__ = ["DEFAULT_OPSET", "OnnxUpscaler", "export_onnx", "main", "onnx_available", "onnxruntime_available"]

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "lr", "sr"


ONNX_MISSING = "ONNX export needs the onnx package: pip install 'dlsr[onnx]' (or pip install onnx)"


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: DLSR, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic: bool = True, example_size: tuple[int, int] = (64, 64)) -> Path:
    """Write `model`'s fused float32 form as an ONNX file (dynamic N/H/W unless `dynamic=False`).

    The export is built in memory and written through a uniquely named temp file renamed into place, so a
    failed export leaves no partial file and two exports to one path never share a temp file.
    """
    if not isinstance(model, DLSR):
        raise TypeError(f"export_onnx needs a DLSR, got {type(model).__name__}")
    if not onnx_available():
        raise ImportError(ONNX_MISSING)
    h, w = example_size
    if min(h, w) < MIN_INPUT_SIZE:
        raise ValueError(f"example_size must be at least {MIN_INPUT_SIZE} on each side, got {example_size}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the path of the .onnx file to write")
    p = next(model.parameters())
    src = model if (p.device.type == "cpu" and p.dtype == torch.float32) else copy.deepcopy(model).float().cpu()
    fused = build(src, precision="fp32", backend="aten")  # never changes `model` itself
    x = torch.rand(1, model.genotype.in_channels, h, w)
    dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                    OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"}} if dynamic else None
    buf = io.BytesIO()  # exported in memory, then written whole or not at all (a few MB at most)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated in favour of the dynamo one, which needs the
        # extra `onnxscript` package; it handles this graph (dynamic H/W included) exactly
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    path.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed export leaves no empty folders
    atomic_write(path, lambda f: f.write(buf.getbuffer()), overwrite=True)
    return path


class OnnxUpscaler:
    """An onnxruntime session for an exported DLSR: call it with an N x 3 x H x W float tensor/array."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("running ONNX exports needs onnxruntime: pip install 'dlsr[onnx]'") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        (y,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arr)})
        return torch.from_numpy(y)


def check_onnx(model: DLSR, path: str | os.PathLike, *, sizes: Sequence[tuple[int, int]] = ((48, 64), (37, 53)),
               atol: float = 1e-4) -> float:
    """Max abs difference between onnxruntime on `path` and `model` (layers, fp32) over random inputs;
    raises AssertionError above `atol`."""
    runner = OnnxUpscaler(path)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for h, w in sizes:
        x = torch.rand(1, model.genotype.in_channels, h, w, generator=gen)
        with torch.enable_grad():  # the reference: the layers themselves, not the fused form
            ref = model(x).detach()
        worst = max(worst, float((runner(x) - ref).abs().max()))
    if worst > atol:
        raise AssertionError(f"ONNX output differs from the network by {worst:.3g} (> {atol})")
    return worst


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dlsr-export",
        description="Export a DLSR network (its fused inference form) to ONNX with dynamic batch/height/width.")
    ap.add_argument("model", nargs="?", help="model alias (x2, x3, x4, x2-s), model directory or Hub repo id")
    ap.add_argument("--genotype", metavar="NAME_OR_JSON",
                    help="instead of MODEL: a built-in genotype name or genotype JSON, with random weights")
    ap.add_argument("--onnx", required=True, metavar="PATH", help="where to write the .onnx file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing file at --onnx")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    ap.add_argument("--static", nargs=2, type=int, metavar=("H", "W"),
                    help="export for this one input size (and a batch of 1) instead of dynamic batch/height/width")
    ap.add_argument("--check", action="store_true",
                    help="run the export with onnxruntime and compare it with the network (needs onnxruntime)")
    return ap


def _load(args: argparse.Namespace) -> DLSR:
    from .genotype import BUILTIN, builtin, load

    if args.genotype is not None:
        genotype = builtin(args.genotype) if args.genotype in BUILTIN else load(args.genotype)
        torch.manual_seed(0)
        return DLSR(genotype)
    return DLSR.from_pretrained(args.model)


def main(argv: Sequence[str] | None = None) -> int:
    """`dlsr-export` entry point; returns the exit status (0 ok, 2 bad input or failed check)."""
    ap = _parser()
    args = ap.parse_args(argv)
    if (args.model is None) == (args.genotype is None):
        ap.error("give exactly one of MODEL or --genotype")
    if not onnx_available():  # before loading (or downloading) a model it cannot export
        print(f"dlsr-export: error: {ONNX_MISSING}", file=sys.stderr)
        return 2
    if Path(args.onnx).expanduser().is_file() and not args.overwrite:
        print(f"dlsr-export: error: {args.onnx} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        model = _load(args)
    except Exception as e:  # noqa: BLE001 - any load failure is a user-facing error here
        print(f"dlsr-export: error: cannot load the model: {e}", file=sys.stderr)
        return 2
    size = tuple(args.static) if args.static else (64, 64)
    if args.check and not onnxruntime_available():  # before the export, not after it
        print("dlsr-export: error: --check needs onnxruntime (pip install 'dlsr[onnx]')", file=sys.stderr)
        return 2
    final = Path(args.onnx).expanduser()
    # --check: exported beside the destination and renamed into place only once it passed, so a failed
    # check leaves neither an unverified file under the name nor a replaced earlier export
    target = final.with_name(f".{final.name}.{os.getpid()}.unchecked") if args.check else final
    try:
        path = export_onnx(model, target, opset=args.opset, dynamic=args.static is None, example_size=size)
    except (ValueError, OSError) as e:
        print(f"dlsr-export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the exporter's own errors, e.g. an opset it cannot target
        print(f"dlsr-export: error: ONNX export failed (opset {args.opset}): {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    what = (f"{path.stat().st_size / 1e6:.2f} MB, opset {args.opset}, "
            f"{'static ' + 'x'.join(map(str, size)) if args.static else 'dynamic N/H/W'}, x{model.genotype.scale}")
    if args.check:
        sizes = [size] if args.static else [(48, 64), (37, 53)]
        try:
            diff = check_onnx(model, path, sizes=sizes)
            if final.exists() and not args.overwrite:  # made while the check ran
                raise FileExistsError(f"{final} appeared while the export was checked; it was left as it was")
            os.replace(path, final)
        except (AssertionError, OSError) as e:
            path.unlink(missing_ok=True)
            failed = "check failed" if isinstance(e, AssertionError) else "error"
            print(f"dlsr-export: {failed}: {e}; nothing written to {final}", file=sys.stderr)
            return 2
        print(f"wrote {final} ({what}); onnxruntime check: max abs diff {diff:.2e} vs the network")
        return 0
    print(f"wrote {path} ({what})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
