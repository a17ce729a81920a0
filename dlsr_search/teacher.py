"""Distillation targets for `dlsr-search train --teacher`: a trained model's prediction of every training
image, made once from the very LR the student sees and kept beside each HR image.

The student then learns from ``(1 - w) * loss(sr, hr) + w * loss(sr, teacher)``. A teacher's prediction is
a function of the LR alone, so it holds none of the detail no network can infer from the LR, and a
self-ensemble teacher (``ensemble``: the mean over the 8 flips/transposes) is rotation-consistent in a way
one pass of a small network is not. Predictions are whole-image fp32 passes (the protocol's
``super_resolve_fp32``), optionally cached as PNG under ``cache_dir/teacher-<key>/X<scale>/``, keyed by
the teacher's weights, the ensemble flag and the HR pixels; an entry also records the digest of the LR
it was predicted from, so a changed LR is never paired with a stale prediction.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dlsr_infer.evaluate import hr_digest, read_cached_png, super_resolve_fp32, write_cached_png
from dlsr_infer.model import DLSR
from dlsr_infer.pretrained import WEIGHTS_NAME, ModelLoadError, hash_file, resolve

from .config import ConfigError
from .data import ImagePair

LR_DIGEST_KEY = "dlsr-lr-sha1"


class PredictionsStopped(Exception):
    """A stop request (SIGTERM / Ctrl-C) arrived between two of the teacher's predictions."""

    def __init__(self, done: int, total: int, kept: bool) -> None:
        if done == 0:
            message = f"stopped before the teacher's first prediction of the {total} training images"
        else:
            where = "kept in the --lr-cache, so the same command goes on from there" if kept else \
                "not kept (no --lr-cache): the same command starts them again"
            message = f"stopped while the teacher predicted the training images ({done} of {total} done, {where})"
        super().__init__(message)
        self.done, self.total = done, total


@dataclass(frozen=True)
class Teacher:
    model: Any        # a DLSR in eval mode, on the device it predicts on
    source: str       # the model directory it was loaded from
    sha256: str       # of its model.safetensors: what a resumed run checks
    ensemble: bool

    @property
    def key(self) -> str:
        """Names the cache folder: one per (weights, ensemble)."""
        return hashlib.sha256(f"{self.sha256}|ensemble={int(self.ensemble)}".encode()).hexdigest()[:16]


def load_teacher(source: str, scale: int, *, ensemble: bool, device: Any = "cpu") -> Teacher:
    """The model directory / alias / Hub id ``source`` as a teacher of an x``scale`` run."""
    try:
        directory = resolve(source)
        sha = hash_file(directory / WEIGHTS_NAME)
        model = DLSR.from_pretrained(directory)
        if hash_file(directory / WEIGHTS_NAME) != sha:  # rewritten while loading (a live run's best/, say)
            raise ModelLoadError("its weights changed while they were read; try again once it is written")
    except (ModelLoadError, TypeError, OSError) as e:
        raise ConfigError(f"--teacher {source}: {e}") from None
    if model.scale != scale:
        raise ConfigError(f"--teacher {source} is an x{model.scale} model; this run trains x{scale}")
    g = model.genotype
    if (g.in_channels, g.out_channels) != (3, 3):
        raise ConfigError(f"--teacher {source} maps {g.in_channels} to {g.out_channels} channels; training is RGB")
    return Teacher(model.to(device).eval(), str(directory), sha, ensemble)


def _cache_path(cache_dir: Path | None, teacher: Teacher, scale: int, pair: ImagePair) -> Path | None:
    if cache_dir is None:
        return None
    return cache_dir / f"teacher-{teacher.key}" / f"X{scale}" / f"{Path(pair.name).stem}_{hr_digest(pair.hr)[:16]}.png"


def add_teacher_targets(pairs: Sequence[ImagePair], teacher: Teacher, scale: int, *,
                        cache_dir: str | os.PathLike | None = None, progress: bool = False,
                        stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Set ``pair.target`` (uint8, the HR's shape) of every pair to the teacher's prediction from its LR.

    ``stop`` is asked before each prediction (an ensemble of a large image takes half a minute on a CPU,
    all of them an hour): when it says so, `PredictionsStopped` is raised, the predictions made so far
    already in the cache. Returns counts for the run log: ``{"images", "cached", "predicted", "seconds"}``.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    device = str(next(teacher.model.parameters()).device)
    t0, cached = time.perf_counter(), 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="teacher predictions", leave=False)
    try:
        for done, pair in enumerate(pairs):
            digest = hr_digest(pair.lr)  # the same digest of shape and pixels, taken of the LR it predicts from
            path = _cache_path(cache, teacher, scale, pair)
            target = read_cached_png(path, LR_DIGEST_KEY, digest, pair.hr.shape) if path is not None else None
            if target is not None:
                cached += 1
            else:
                if stop is not None and stop():
                    raise PredictionsStopped(done, len(pairs), kept=cache is not None)
                try:
                    target = super_resolve_fp32(teacher.model, pair.lr, scale=scale, device=device,
                                                ensemble=teacher.ensemble)
                except ValueError as e:  # NonFiniteOutput, a wrong output shape: say whose and of what
                    raise ConfigError(f"--teacher {teacher.source} on training image {pair.name}: {e}") from None
                if path is not None:
                    write_cached_png(path, target, LR_DIGEST_KEY, digest)
            pair.target = target
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return {"images": len(pairs), "cached": cached, "predicted": len(pairs) - cached,
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["PredictionsStopped", "Teacher", "add_teacher_targets", "load_teacher"]
