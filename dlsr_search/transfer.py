"""Warm starts: copy every shape-matching tensor from a trained model into a new one (e.g. x2 -> x4).

Between scales only the upsampler's conv differs in shape (out_channels * scale^2 filters), so an
x4 run starting from x2 weights inherits every cell and only learns its upsampler from scratch; the
authors did the same. Tensors that do not fit are reported by name, never silently dropped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlsr_infer.pretrained import WEIGHTS_NAME, hash_file, read_state_dict, resolve

from .checkpoint import load_checkpoint
from .config import ConfigError


@dataclass
class WarmStartReport:
    source: str
    sha256: str = ""                  # of the file the tensors came from: names the weights, even if the folder changes later
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor name, why)

    def summary(self, *, most: int = 12) -> str:
        lines = [f"warm start from {self.source}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}"]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped[:most]]
        if len(self.skipped) > most:
            lines.append(f"  ... and {len(self.skipped) - most} more")
        return "\n".join(lines)


def source_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors of a model directory / alias / Hub id, or the model state of a training checkpoint (.pt):
    its averaged weights when the run kept an EMA, as its export and its validation have them; and the
    file they were read from."""
    path = Path(source)
    if path.suffix == ".pt":  # a checkpoint, never a model directory or Hub id: 'not found' if it is missing
        # a search checkpoint holds the supernet, whose mixed ops no retrained network has
        ckpt = load_checkpoint(path, kind="train")
        return dict((ckpt.get("ema") or ckpt)["model"]), path
    file = resolve(os.fspath(source)) / WEIGHTS_NAME
    return read_state_dict(file), file


#: A warm start must fill at least this share of the network's tensors: across scales all but the
#: upsampler's two fit; under it the source is another network (other channels or cells), and training
#: "from" it would be training from scratch under a card that names a warm start.
MIN_LOADED_SHARE = 0.5


def warm_start(model: nn.Module, source: str | os.PathLike) -> WarmStartReport:
    """Copy every tensor of ``source`` whose name and shape fit into ``model``; a ``ConfigError`` (and
    ``model`` left as it was) when under `MIN_LOADED_SHARE` of them fit."""
    state, file = source_state_dict(source)
    report = WarmStartReport(str(file.parent if file.name == WEIGHTS_NAME else file), hash_file(file))
    own = model.state_dict()
    merged = dict(own)
    for k, target in own.items():
        if k not in state:
            report.skipped.append((k, "not in the source"))
        elif state[k].shape != target.shape:
            report.skipped.append((k, f"shape {tuple(state[k].shape)} in the source, {tuple(target.shape)} here"))
        else:
            merged[k] = state[k].to(target.dtype)
            report.loaded.append(k)
    report.skipped += [(k, "not in this model") for k in state if k not in own]
    if len(report.loaded) < MIN_LOADED_SHARE * len(own):
        raise ConfigError(f"--init-from {source}: only {len(report.loaded)} of this network's {len(own)} tensors fit "
                          "(its channels or cells differ): that is no warm start. Give weights of this genotype "
                          "(any scale), or drop --init-from to train from scratch")
    model.load_state_dict(merged)
    return report


__all__ = ["MIN_LOADED_SHARE", "WarmStartReport", "source_state_dict", "warm_start"]
