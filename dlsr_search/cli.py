"""``dlsr-search``: search a DLSR architecture, retrain it, evaluate it, export it.

    dlsr-search search --scale 2 --out runs/search-x2            # differentiable search -> genotype JSON
    dlsr-search train  --scale 2 --out runs/x2 --val-holdout 10   # retrain a genotype (default: the paper's)
    dlsr-search train  --out runs/x2 --resume                     # continue exactly where it stopped
    dlsr-search export runs/x2/last.pt models/my-x2               # checkpoint -> model directory
    dlsr-search soup   models/x2-soup runs/x2a/best runs/x2b/best  # average fine-tunes of one network
    dlsr-search eval   models/my-x2 --data ../shared/data/benchmarks

Every command also runs under ``torchrun --nproc_per_node=N -m dlsr_search.cli ...`` (gloo on CPU,
NCCL on CUDA). Training data comes from ``--data`` or ``$DLSR_DATA`` (default: ``$DLSR_SHARED/data/train``,
else ../shared/data/train beside the source checkout or the current folder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from dlsr_infer.genotype import GenotypeError
from dlsr_infer.pretrained import ModelLoadError

from .checkpoint import CheckpointError
from .config import ConfigError, TrainingDiverged
from .losses import PIXEL_LOSSES
from .soup import SoupError
from .teacher import PredictionsStopped


def _bool_flag(ap: argparse.ArgumentParser, name: str, help: str) -> None:
    ap.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                    help=help)


def _common_run_args(ap: argparse.ArgumentParser, kind: str) -> None:
    """Options shared by `search` and `train`. Defaults are None here: the config dataclasses hold the real
    defaults, and None tells us which options the user actually set (what --resume may refuse to change)."""
    g = ap.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder: checkpoints, logs, outputs")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last.pt (starts fresh if there is none yet)")
    g.add_argument("--scale", type=int, help="upscale factor 2, 3 or 4 (default 2)")
    g.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    g.add_argument("--steps", type=int, help="total optimizer steps of the run (default: train 2,000,000, search 100,000)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice; "
                   "cores / processes under torchrun)")
    d = ap.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="DIR", help="folders of HR training images, searched recursively "
                   "(default $DLSR_DATA, else $DLSR_SHARED/data/train, else ../shared/data/train)")
    if kind == "train":
        d.add_argument("--data-scales", nargs="+", type=float, metavar="F", help="also train on a copy of each "
                       "image shrunk by each factor F (0 < F < 1, MATLAB-style bicubic), e.g. 0.5 0.75: finer detail "
                       "per pixel and less of the photos' noise and JPEG blocking; each copy is drawn as often as its source "
                       "(default: none)")
    d.add_argument("--batch", type=int, help="global batch size (split over torchrun processes)")
    d.add_argument("--patch", type=int, help="HR patch side in pixels (the LR patch is patch/scale)")
    d.add_argument("--workers", type=int, help="DataLoader worker processes (default 0: patches are cheap)")
    d.add_argument("--lr-cache", metavar="DIR", help="cache the bicubic LR images as PNG here (faster restarts)")
    o = ap.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, help="Adam learning rate of the network weights (default 3e-4)")
    o.add_argument("--halve-every", type=int, help="halve the weights' learning rate every N steps")
    o.add_argument("--weight-decay", type=float, help="Adam weight decay (default 1e-8)")
    o.add_argument("--hfen", type=float, help="mu: weight of the HFEN loss next to L1 "
                   + ("(default 0.2)" if kind == "search" else "(default 0: plain L1 as the paper's retrain)"))
    _bool_flag(o, "bf16", "bfloat16 autocast (default: on for CUDA, off for CPU)")
    _bool_flag(o, "channels-last", "channels_last memory format (default: on for CUDA)")
    lg = ap.add_argument_group("logging and checkpoints")
    lg.add_argument("--log-every", type=int, help="print/log a line every N steps")
    lg.add_argument("--ckpt-every", type=int, help="write last.pt every N steps (0: only by time)")
    lg.add_argument("--ckpt-every-minutes", type=float, help="...and at least every M minutes (default 10)")
    _bool_flag(lg, "progress", "tqdm progress bar on a terminal (default on)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dlsr-search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{search,train,eval,export,soup}")

    t = sub.add_parser("train", help="retrain a DLSR genotype from scratch or a warm start",
                       description="Retrain a DLSR network from a genotype (paper defaults: L1, Adam 3e-4 halved "
                       "every 4e5 steps, batch 32, HR patch 128/192/256 for x2/x3/x4). Writes OUT/last.pt "
                       "(resume point), OUT/best/ (best validation PSNR-Y, a model directory), OUT/log.jsonl.")
    _common_run_args(t, "train")
    t.add_argument("--genotype", help="shipped genotype name (dlsr_x2, dlsr_x3, dlsr_x4, dlsr_s_x2), a genotype JSON "
                   "file or a model directory (default: dlsr_x{scale})")
    t.add_argument("--channels", type=int, help="override the genotype's channel width")
    t.add_argument("--init-from", metavar="MODEL", help="warm start: load every shape-matching tensor from a model "
                   "directory, alias (x2) or .pt checkpoint, e.g. x2 weights for an x4 run")
    t.add_argument("--val", metavar="DIR", help="folder of HR images for validation PSNR-Y (keeps the best model)")
    t.add_argument("--val-holdout", type=int, metavar="N", help="instead of --val: hold N training images out "
                   "for validation (keeps benchmark images out of model selection)")
    t.add_argument("--val-every", type=int, help="validate every N steps (0: never)")
    t.add_argument("--val-max-images", type=int, help="validate on at most N images")
    t.add_argument("--pixel-loss", choices=sorted(PIXEL_LOSSES), help="pixel loss: l1 (default, the paper's) or l2, "
                   "the squared error PSNR measures (for a last fine-tuning stage)")
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm (default 0: off)")
    t.add_argument("--teacher", metavar="MODEL", help="distil: a trained model directory, alias or Hub id of this scale whose "
                   "predictions (from the same LR, made once, cached under --lr-cache) are a second target")
    t.add_argument("--teacher-weight", type=float, metavar="W", help="loss = (1-W)*loss(SR, HR) + W*loss(SR, teacher) "
                   "(default 0.5)")
    _bool_flag(t, "teacher-ensemble", "the teacher predicts with its x8 self-ensemble (8x its time, once; default off)")
    t.add_argument("--ema", type=float, metavar="DECAY", help="keep a moving average of the weights with this decay, "
                   "e.g. 0.999; validation, best/ and export use it (default 0: off)")
    t.add_argument("--export", metavar="DIR", help="at the end, write the best (else last) model directory here")

    s = sub.add_parser("search", help="differentiable architecture search (MiLeNAS) on a supernet",
                       description="Search operations (alpha) and cell links (beta) of a DLSR supernet with "
                       "MiLeNAS: weights on L_train, architecture on L_train + lambda*L_val + gamma*L_P, after a "
                       "weights-only warm-up. Writes OUT/genotypes/*.json snapshots and OUT/genotype.json.")
    _common_run_args(s, "search")
    s.add_argument("--channels", type=int, help="supernet channel width (default 48)")
    s.add_argument("--cells", type=int, help="number of cells (default 6)")
    _bool_flag(s, "per-cell-alphas", "one alpha table per cell instead of one shared by all cells (default off)")
    s.add_argument("--warmup", type=int, help="weights-only steps before the architecture is trained (default 2e4)")
    s.add_argument("--arch-lr", type=float, help="Adam learning rate of alpha and beta (default 3e-4)")
    s.add_argument("--lam", type=float, help="lambda: weight of L_val in the architecture loss (default 1)")
    s.add_argument("--gamma", type=float, help="gamma: weight of the parameter loss L_P (default 0.2)")
    s.add_argument("--val-holdout", type=float, metavar="N", help="images held out as the architecture's "
                   "validation stream: a count, or a fraction if < 1 (default 0.2)")
    s.add_argument("--snapshot-every", type=int, help="also write the derived genotype every N steps")

    # `eval` is handed to dlsr-eval before parsing (see main); listed here for --help
    sub.add_parser("eval", help="PSNR/SSIM of a model on benchmark sets (same as dlsr-eval; see eval --help)")

    x = sub.add_parser("export", help="checkpoint -> model directory (train) or genotype JSON (search)",
                       description="Turn a train checkpoint (last.pt) into a model directory that "
                       "DLSR.from_pretrained loads, or write a search checkpoint's derived genotype as JSON.")
    x.add_argument("checkpoint", help="a last.pt written by `train` or `search`")
    x.add_argument("dest", help="model directory to write (train) or genotype JSON file (search)")

    u = sub.add_parser("soup", help="average the weights of fine-tunes of one network (a model soup)",
                       description="Write a model directory whose weights are the uniform average of the given "
                       "models' (fine-tunes warm-started from one model: different seeds, or that model itself), "
                       "and soup.json naming them. Evaluate it with dlsr-eval before trusting it.")
    u.add_argument("dest", help="model directory to write (never one of the models)")
    u.add_argument("models", nargs="+", metavar="MODEL", help="model directories, aliases or Hub repo ids (two or more)")
    u.add_argument("--greedy-on", metavar="DIR", help="greedy soup: rank the models by PSNR-Y on these HR validation "
                   "images and keep each next one only if the average does not score lower (default: average all)")
    return ap


def _explicit(args: argparse.Namespace, exclude: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if v is not None and k not in exclude}


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    opts = _explicit(args, ("command",))
    cfg = TrainConfig(**opts)
    result = train(cfg, explicit=opts.keys())
    if result.exported is not None:
        print(f"model directory: {result.exported}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import SearchConfig, search

    opts = _explicit(args, ("command",))
    cfg = SearchConfig(**opts)
    result = search(cfg, explicit=opts.keys())
    if result.genotype_path is None:
        print(f"stopped at step {result.step}: no final genotype yet (resume with --resume)")
    else:
        print(f"genotype: {result.genotype_path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .export import export_checkpoint

    kind = load_checkpoint(args.checkpoint).get("kind")
    run, dest = Path(args.checkpoint).resolve().parent, Path(args.dest)
    if dest.resolve() in (run, run / "best", Path(args.checkpoint).resolve()):
        raise ConfigError(f"{args.dest} is the checkpoint, its run folder or that run's best/: export to a "
                          "path of its own")
    if kind == "search":
        from dlsr_infer.genotype import load as load_genotype
        from dlsr_infer.imageio import atomic_write_text

        from .search import genotype_from_checkpoint

        if dest.is_dir():
            dest = dest / "genotype.json"
        if dest.exists():  # an earlier export of a genotype may be replaced; any other file is not ours
            try:
                load_genotype(dest)
            except (GenotypeError, OSError, ValueError):
                raise ConfigError(f"{dest} exists and is not a genotype JSON; export to a new path") from None
        genotype = genotype_from_checkpoint(args.checkpoint)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, genotype.to_json())
        print(f"genotype: {dest}")
    else:
        print(f"model directory: {export_checkpoint(args.checkpoint, args.dest)}")
    return 0


def _cmd_soup(args: argparse.Namespace) -> int:
    from .soup import make_soup

    print(f"model directory: {make_soup(args.models, args.dest, greedy_on=args.greedy_on)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # every option (--help included) belongs to dlsr-eval
        from dlsr_infer import evaluate

        return evaluate.main(argv[1:], prog="dlsr-search eval")
    args = _parser().parse_args(argv)
    commands = {"train": _cmd_train, "search": _cmd_search, "export": _cmd_export, "soup": _cmd_soup}
    try:
        return commands[args.command](args)
    except (ConfigError, CheckpointError, GenotypeError, ModelLoadError, SoupError, FileNotFoundError) as e:
        print(f"dlsr-search {args.command}: error: {e}", file=sys.stderr)
        return 2
    except PredictionsStopped as e:  # a stop before the first step: nothing to checkpoint yet
        print(f"dlsr-search {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"dlsr-search {args.command}: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"dlsr-search {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: checkpoints are atomic, so the last one is intact
        try:
            saved = args.command in ("train", "search") and (Path(args.out) / "last.pt").is_file()
        except OSError:
            saved = False
        hint = " (the last checkpoint is intact; fix this and --resume)" if saved else ""
        print(f"dlsr-search {args.command}: error: {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
