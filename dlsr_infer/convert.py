"""Convert the DLSR authors' released checkpoints into our model directories (`dlsr-convert`).

Their checkpoints are PyTorch pickles of `{epoch, state_dict, optimizer}` for a network whose inputs and
outputs are in [0, 255]; ours work in [0, 1]. The network is not scale-equivariant (ESA's sigmoid), so
the conversion is explicit and exact: with every feature map 255x ours, all biases shrink by 255 except
the one in front of ESA's sigmoid, whose weight grows by 255 instead so the attention mask is unchanged.
Checkpoints are read with `torch.load(weights_only=True)`: no code from the file is ever executed.
"""
from __future__ import annotations

import argparse
import math
import numbers
import pickle
import re
import sys
from pathlib import Path
from typing import Mapping

import torch

from .genotype import BUILTIN, Genotype, GenotypeError, builtin, load as load_genotype
from .model import DLSR
from .pretrained import MODEL_FILES, ModelLoadError, check_finite, check_state_dict

_CELL_RENAMES = (
    (re.compile(r"^B(\d+)\.c([123])_d\.(.*)$"), lambda m: f"cells.{int(m[1]) - 1}.distill.{int(m[2]) - 1}.{m[3]}"),
    (re.compile(r"^B(\d+)\.c([123])_r\.op\.(.*)$"), lambda m: f"cells.{int(m[1]) - 1}.mrb.{int(m[2]) - 1}.{m[3]}"),
    (re.compile(r"^B(\d+)\.c4\.(.*)$"), lambda m: f"cells.{int(m[1]) - 1}.refine.{m[2]}"),
    (re.compile(r"^B(\d+)\.c5\.(.*)$"), lambda m: f"cells.{int(m[1]) - 1}.fuse.{m[2]}"),
    (re.compile(r"^B(\d+)\.esa\.(.*)$"), lambda m: f"cells.{int(m[1]) - 1}.esa.{m[2]}"),
    (re.compile(r"^c(\d+)\.0\.(.*)$"), lambda m: f"links.{int(m[1]) - 1}.conv.{m[2]}"),
    (re.compile(r"^cout\.0\.(.*)$"), lambda m: f"fuse.conv.{m[1]}"),
    (re.compile(r"^fea_conv\.(.*)$"), lambda m: f"stem.{m[1]}"),
    (re.compile(r"^LR_conv\.(.*)$"), lambda m: f"lr_conv.{m[1]}"),
    (re.compile(r"^upsampler\.0\.(.*)$"), lambda m: f"upsampler.conv.{m[1]}"),
)


def rename_key(key: str) -> str:
    """Our state-dict key for one of the authors' keys."""
    key = key.removeprefix("module.")  # saved from DataParallel
    for pattern, new in _CELL_RENAMES:
        m = pattern.match(key)
        if m:
            return new(m)
    raise ModelLoadError(f"authors' checkpoint has a tensor we do not know how to map: {key!r}")


def _check_input_range(value: object) -> float:
    """`value` as the top of the images' value range: a finite number > 0 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"input_range must be a finite number > 0, got {value!r}")
    return float(value)


def rescale_for_unit_range(state: Mapping[str, torch.Tensor], input_range: float) -> dict[str, torch.Tensor]:
    """Turn weights for images in [0, input_range] into weights for images in [0, 1] (exactly).

    Exact because the activations are (leaky) ReLUs, which commute with a positive factor only."""
    _check_input_range(input_range)
    if input_range == 1:
        return dict(state)
    out = {}
    for k, v in state.items():
        v = v.double()
        if k.endswith("esa.conv4.weight"):
            v = v * input_range
        elif k.endswith(".bias") and not k.endswith("esa.conv4.bias"):
            v = v / input_range
        out[k] = v.float()
    return out


def load_authors_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw `state_dict` of an authors' checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: objects other than tensors and containers
        raise ModelLoadError(f"{path}: refused: it holds objects that weights_only=True does not unpickle "
                             f"(only tensors, numbers, strings and containers are read): {e}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint (truncated, or not written by "
                             f"torch.save?): {e}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if (not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values())
            or not all(isinstance(k, str) for k in state)):
        raise ModelLoadError(f"{path}: expected a dict with a 'state_dict' of tensors by name")
    return state


def convert_authors_checkpoint(path: str | Path, genotype: Genotype, *, input_range: float = 255.0) -> DLSR:
    """Build our `DLSR` for `genotype` holding the weights of an authors' checkpoint."""
    state: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for k, v in load_authors_state_dict(path).items():
        ours = rename_key(k)
        if ours in state:  # e.g. both `X` and `module.X`: one would silently overwrite the other
            raise ModelLoadError(f"{path}: {source_of[ours]!r} and {k!r} are both the tensor {ours!r}")
        state[ours], source_of[ours] = v, k
    model = DLSR(genotype)
    check_state_dict(model.state_dict(), state, source=f"{path} (genotype {genotype.name or 'given'})")
    state = rescale_for_unit_range(state, input_range)
    # NaN in the file, or a value that x input_range pushes past float32: a model nothing could load
    check_finite(state, path, after=" after conversion")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _genotype_arg(value: str) -> Genotype:
    if value in BUILTIN:
        return builtin(value)
    try:
        return load_genotype(value)
    except (FileNotFoundError, GenotypeError) as e:
        raise argparse.ArgumentTypeError(f"{e} (or use a built-in name: {', '.join(BUILTIN)})") from None


def _input_range_arg(value: str) -> float:
    try:
        return _check_input_range(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dlsr-convert",
        description="Convert a DLSR authors' checkpoint ({epoch, state_dict, optimizer}, inputs in [0,255]) "
                    "into a dlsr model directory (config.json + model.safetensors).")
    parser.add_argument("checkpoint", help="the authors' .pt file")
    parser.add_argument("--genotype", required=True, type=_genotype_arg,
                        help=f"genotype JSON file or built-in name ({', '.join(BUILTIN)})")
    parser.add_argument("-o", "--output", required=True, help="model directory to write")
    parser.add_argument("--input-range", type=_input_range_arg, default=255.0,
                        help="pixel range the checkpoint was trained on (default 255)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files in an existing -o directory")
    args = parser.parse_args(argv)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"-o {args.output} is a file; give a model directory")
    held = [name for name in MODEL_FILES if (Path(args.output) / name).exists()]
    if held and not args.overwrite:
        parser.error(f"-o {args.output} holds a model already ({', '.join(held)}); pass --overwrite to replace it")
    try:
        model = convert_authors_checkpoint(args.checkpoint, args.genotype, input_range=args.input_range)
    except (ModelLoadError, FileNotFoundError) as e:
        print(f"dlsr-convert: error: {e}", file=sys.stderr)
        return 1
    card = (f"# Converted DLSR checkpoint\n\nConverted by `dlsr-convert` from `{Path(args.checkpoint).name}` "
            f"(input range [0, {args.input_range:g}] rescaled to [0, 1]). Parameters: {model.num_parameters:,}.\n")
    try:
        out = model.save_pretrained(args.output, model_card=card)
    except OSError as e:  # a file where a folder must be made, a full disk: the folder is all or none
        print(f"dlsr-convert: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({model.num_parameters:,} parameters)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
