"""Checkpoint -> model directory (config.json + model.safetensors + README.md) that `DLSR.from_pretrained` loads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from dlsr_infer.genotype import Genotype, loads
from dlsr_infer.imageio import TEMP_SUFFIX
from dlsr_infer.model import DLSR

from .checkpoint import CheckpointError, config_of, load_checkpoint
from .config import ConfigError

#: What `save_model` writes. Anything else in a destination would stay beside the new weights and describe
#: others: a soup's soup.json, a bundled card's stages.json and logs.
MODEL_FILES = frozenset({"config.json", "model.safetensors", "README.md"})


def check_export_dir(directory: str | os.PathLike, option: str = "the destination") -> None:
    """Refuse (ConfigError) a destination that is a file or a folder holding more than a model directory's
    files; an earlier export (or an empty folder) may be replaced."""
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


__all__ = ["MODEL_FILES", "check_export_dir", "export_checkpoint", "model_card", "save_model"]
