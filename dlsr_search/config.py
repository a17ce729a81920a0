"""Run configs shared by the retrain trainer and the search, and the rules for changing them on resume.

A config is a flat dataclass of JSON-able values; checkpoints carry it (as JSON) so a run can be
resumed, audited, or exported without the command line that started it. On ``--resume`` the
checkpoint's config wins; only operational fields (how long, how often to log/validate/save, threads,
device...) may be changed, because changing e.g. the batch or the learning rate mid-run would make
the resumed run differ from the run that was asked for.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, TypeVar

C = TypeVar("C")

#: Fields a resumed run may change freely. Not --val-max-images (nor --val): best/ is the best score on one
#: validation set; a resume that scored on another would compare the two.
OPERATIONAL = frozenset({
    "out", "resume", "steps", "val_every", "log_every", "ckpt_every", "ckpt_every_minutes",
    "snapshot_every", "threads", "workers", "device", "bf16", "channels_last", "lr_cache", "export", "progress",
    "ema",  # the weight average is kept beside the trained weights: it never changes what they become
})


class ConfigError(ValueError):
    """An invalid option value or combination, or a resume that would change how the run trains."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite: the run stops without checkpointing them."""


def check_common(cfg: Any) -> None:
    """The options `train` and `search` share: values that would otherwise fail deep inside torch (Adam,
    StepLR, the DataLoader) or only after the data has loaded (a modulo by --log-every 0)."""
    if cfg.steps < 0 or cfg.halve_every < 1:
        raise ConfigError("--steps must be >= 0 and --halve-every >= 1")
    for name in ("lr", "arch_lr"):
        v = getattr(cfg, name, 1.0)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    for name in ("weight_decay", "arch_weight_decay", "grad_clip", "hfen"):
        v = getattr(cfg, name, 0.0)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if cfg.log_every < 1 or cfg.ckpt_every < 0 or not cfg.ckpt_every_minutes > 0:
        raise ConfigError("--log-every must be >= 1, --ckpt-every >= 0 and --ckpt-every-minutes > 0")
    if cfg.workers < 0 or (cfg.threads is not None and cfg.threads < 1):
        raise ConfigError("--workers must be >= 0 and --threads >= 1")


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def from_json(cls: type[C], text: str) -> C:
    data = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}  # tolerate fields added/removed between versions
    return cls(**{k: v for k, v in data.items() if k in names})


#: Folder options, compared as the folders they name: `data/` and `./data` are the run's `data`.
_FOLDERS = frozenset({"data", "val"})


def _comparable(name: str, value: Any) -> Any:
    if isinstance(value, tuple):  # the saved config went through JSON: (0.5,) from the Python API is its [0.5]
        value = list(value)
    if name not in _FOLDERS or not value:
        return value
    norm = lambda p: os.path.normpath(os.path.abspath(os.path.expanduser(p)))  # noqa: E731
    return [norm(p) for p in value] if isinstance(value, list) else norm(value)


def merge_for_resume(saved: C, requested: C, explicit: Iterable[str] | None) -> C:
    """The config a resumed run uses: ``saved``, with the operational fields the user set in ``requested``.

    ``explicit``: fields the user actually set (None: every field that differs from the default counts
    as set). An explicitly set, non-operational field that differs from the saved run is an error.
    """
    defaults = type(requested)(**{f.name: getattr(requested, f.name) for f in dataclasses.fields(requested)
                                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    if explicit is None:
        explicit = {f.name for f in dataclasses.fields(requested) if getattr(requested, f.name) != getattr(defaults, f.name)}
    explicit = set(explicit)
    conflicts = []
    updates = {}
    for f in dataclasses.fields(requested):
        new, old = getattr(requested, f.name), getattr(saved, f.name)
        if f.name in ("out", "resume") or (f.name in OPERATIONAL and f.name in explicit):
            updates[f.name] = new
        elif f.name in explicit and _comparable(f.name, new) != _comparable(f.name, old) and not f.name.endswith("_json"):
            conflicts.append(f"{f.name}: run has {old!r}, command line asks {new!r}")
    if conflicts:
        raise ConfigError("--resume cannot change how the run trains (start a new --out, or drop these options):\n  "
                          + "\n  ".join(conflicts))
    return dataclasses.replace(saved, **updates)


__all__ = ["ConfigError", "OPERATIONAL", "TrainingDiverged", "check_common", "from_json", "merge_for_resume", "to_json"]
