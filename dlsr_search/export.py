"""Checkpoint -> model directory (config.json + model.safetensors + README.md) that `DLSR.from_pretrained` loads."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from dlsr_infer.genotype import Genotype, loads
from dlsr_infer.imageio import TEMP_SUFFIX, _umask
from dlsr_infer.pretrained import MODEL_FILES  # what `save_model` writes
from dlsr_infer.model import DLSR

from .checkpoint import CheckpointError, config_of, load_checkpoint
from .config import ConfigError



def replace_dir(out: Path, write: Callable[[Path], None], *, keep: Callable[[Path], bool] = lambda f: False) -> Path:
    """Fill a hidden sibling of `out` with `write(folder)`, then put it in `out`'s place: all of a model
    directory's files or none (a full disk half way must not leave new weights beside an old card, or
    weights without the soup.json that says what they are). A previous `out` is set aside until the new
    one is in place; its entries for which `keep(entry)` is true are carried over. `out` a symbolic link:
    its target is written. A folder whose parent may not be written: in place (not all or none)."""
    import tempfile

    out = out.resolve() if out.is_symlink() else out
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_dir(out)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except PermissionError:
        if not out.is_dir():
            raise
        for f in out.iterdir():
            if f.is_file() and not keep(f):
                f.unlink()
        write(out)
        return out
    old = out.with_name(f".{out.name}.old-{tmp.name.split('.')[-2]}")
    try:
        if out.is_dir():
            for f in out.iterdir():
                if keep(f):
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write(tmp)
        tmp.chmod(0o777 & ~_umask())  # as a plain mkdir would (mkdtemp makes it 0700)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def _recover_dir(out: Path) -> None:
    """What a `replace_dir` killed part way left beside `out`: its old folder, set aside between the two
    renames, goes back in place if `out` is gone; set-aside and half-written folders are removed."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda d: d.stat().st_mtime)
    if olds and not out.exists():
        olds.pop().rename(out)
    for leftover in [*olds, *out.parent.glob(f".{out.name}.*.partial")]:
        shutil.rmtree(leftover, ignore_errors=True)


def check_export_dir(directory: str | os.PathLike, option: str = "the destination") -> None:
    """Refuse (ConfigError) a destination that is a file or a folder holding more than a model directory's
    files (`MODEL_FILES`): a soup's soup.json or a bundled card's stages.json and logs would stay beside the
    new weights and describe others. An earlier export (or an empty folder) may be replaced."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{option} {d} is a file; give a model directory")
    other = sorted(p.name for p in d.iterdir()  # (a killed export's hidden temp files are its own)
                   if p.name not in MODEL_FILES and not p.name.endswith(TEMP_SUFFIX)) if d.is_dir() else []
    if other:
        raise ConfigError(f"{option} {d} holds {', '.join(other[:4])}{' ...' if len(other) > 4 else ''}, which would "
                          "stay beside the new weights and describe others: export to a new folder")


def model_card(genotype: Genotype, info: Mapping[str, Any]) -> str:
    lines = [
        f"# {genotype.name or 'DLSR'} x{genotype.scale}",
        "",
        "A DLSR super-resolution network (Huang et al., *Lightweight Image Super-Resolution with Hierarchical",
        "and Differentiable Neural Architecture Search*), trained with `dlsr-search train`.",
        "",
        "```python",
        "from dlsr_infer import DLSR",
        "model = DLSR.from_pretrained('path/to/this/folder')",
        "```",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def save_model(model: DLSR, directory: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``model`` as a model directory; ``info`` (step, val PSNR, data...) goes to the card and metadata."""
    meta = {f"dlsr_train_{k}": str(v) for k, v in info.items()}
    return model.save_pretrained(directory, model_card=model_card(model.genotype, info), metadata=meta)


def export_checkpoint(checkpoint: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A retrain checkpoint (``last.pt``) -> model directory: the averaged weights if the run kept an EMA.
    (A search checkpoint has no trained network to export: use its derived genotype, ``dlsr-search
    export`` writes that instead.)"""
    check_export_dir(directory)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") != "train":
        raise CheckpointError(f"{checkpoint} is a {ckpt.get('kind')!r} checkpoint; only 'train' checkpoints hold a "
                         "network to export")
    config = config_of(ckpt)
    genotype = loads(config["genotype_json"])
    model = DLSR(genotype)
    # A run trained with --ema serves its averaged weights (what its validation scored), as train's export does.
    ema = ckpt.get("ema")
    state = ema["model"] if ema is not None else ckpt["model"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    # the last validation scored these weights only if it was made at this step (older checkpoints: as saved)
    scored_now = ckpt.get("last_val_step", ckpt["step"]) == ckpt["step"]
    info = {"step": int(ckpt["step"]), "val_psnr_y": ckpt.get("last_val_psnr") if scored_now else None,
            "data": ",".join(config["data"]),
            "seed": config["seed"], "source": Path(checkpoint).name,
            **({"ema_decay": ema["decay"]} if ema is not None else {})}
    return save_model(model, directory, info)


__all__ = ["MODEL_FILES", "check_export_dir", "export_checkpoint", "model_card", "replace_dir", "save_model"]
