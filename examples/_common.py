"""Shared by the example scripts: pick the model from --model / --random-weights."""
from __future__ import annotations

import argparse
import sys

import torch


def add_model_args(ap: argparse.ArgumentParser, *, scale: int = 4) -> None:
    ap.add_argument("--scale", type=int, default=scale, choices=(2, 3, 4))
    ap.add_argument("--model", help="alias (x2, x3, x4, x2-s), model directory or Hub repo id (default: x<scale>)")
    ap.add_argument("--random-weights", action="store_true",
                    help="use an untrained network (a smoke run: right shapes and speed, meaningless pixels)")


def model_from_args(args: argparse.Namespace):
    """The `model=` argument for upscale(): a name, or a random-weight DLSR for --random-weights."""
    if args.random_weights:
        from dlsr_infer import DLSR

        torch.manual_seed(0)
        return DLSR.from_genotype_name(f"dlsr_x{args.scale}")
    return args.model or f"x{args.scale}"


def explain_model_error(error: Exception) -> None:
    print(f"error: {error}\n(no trained weights? pass --model DIR with a model directory, or --random-weights "
          "for a smoke run)", file=sys.stderr)
    raise SystemExit(2)
