"""Run checkpoints: everything needed to continue a run exactly, loadable with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings and lists only (so ``torch.load(weights_only=True)``
reads it and no pickle code runs): model state (arch parameters included), optimizer and scheduler
states, RNG states as tensors, the step (which also fixes the data stream's position, see `data`),
the best validation score, and the run's config as a JSON string. Writes are atomic: a temp file in
the same folder, fsync, ``os.replace``, then fsync of the folder, so a kill at any moment leaves
either the old or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import numpy as np
import torch

from .config import ConfigError, TrainingDiverged, from_json, merge_for_resume

CHECKPOINT_FORMAT = 1
#: Suffix of the temporary files `atomic_torch_save` writes (`.<name>.<random>.tmp`).
TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or belongs to a different kind of run."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temp file `.<name>.<random>.tmp` beside `path`, fsync, rename, fsync the folder. A
    temp file left by a writer that was killed (SIGKILL) before its rename is removed by the next save."""
    from dlsr_infer.imageio import atomic_write, remove_stale_temps

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory first (checkpoints are a few MB): torch's zip writer turns a failing write
    # (ENOSPC) into an opaque RuntimeError ("unexpected pos"), a plain write keeps the OSError.
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()), overwrite=True, suffix=TEMP_SUFFIX)
    remove_stale_temps(path.parent, [path.name], suffix=TEMP_SUFFIX)


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a `train`/`search` run folder: it holds the run's last.pt or log.jsonl (the log
    comes first: a run stopped before its first checkpoint) and is not a model directory (no
    model.safetensors: a bundled model keeps its stages' logs beside its weights)."""
    path = Path(path)
    return (path.is_dir() and not (path / "model.safetensors").exists()
            and ((path / "last.pt").is_file() or (path / "log.jsonl").is_file()))


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; check its format and (optionally) its kind."""
    path = Path(path)
    if path.is_dir():  # a run folder (or its best/): the checkpoint is the last.pt inside a run folder
        hint = f"; give {path / 'last.pt'}" if (path / "last.pt").is_file() else " (a run folder holds last.pt)"
        raise CheckpointError(f"{path} is a folder, not a checkpoint{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint of ours"
        raise CheckpointError(f"{path}: not a readable dlsr_search checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dlsr_search checkpoint (format {CHECKPOINT_FORMAT})")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected a {kind!r} one")
    return ckpt


C = TypeVar("C")


def resume_or_start(cfg: C, *, kind: str, explicit: Iterable[str] | None,
                    announce: bool = True) -> tuple[C, dict[str, Any] | None]:
    """(config to run, checkpoint or None) for a run's `--out` and `--resume`.

    On resume the checkpoint's config wins over the command line, except for the operational options
    the user set (`merge_for_resume`); `--resume` on an empty `--out` starts afresh (announced when
    `announce`, i.e. on the main process); an occupied `--out` without `--resume` is refused, never
    overwritten.
    """
    noun = "search" if kind == "search" else "run"
    path = Path(cfg.out) / "last.pt"  # type: ignore[attr-defined]
    if (path.parent / "model.safetensors").exists():  # a run writes its own config.json there
        raise ConfigError(f"{path.parent} is a model directory (it holds model.safetensors), not a run folder; "
                          "choose another --out (a model to start from goes to --init-from, one to write to "
                          "--export)")
    if cfg.resume and path.is_file():  # type: ignore[attr-defined]
        ckpt = load_checkpoint(path, kind=kind)
        return merge_for_resume(from_json(type(cfg), ckpt["config"]), cfg, explicit), ckpt
    if cfg.resume:  # type: ignore[attr-defined]
        if announce:
            print(f"no checkpoint in {path.parent} yet; starting a new {noun}", flush=True)
    elif path.is_file():
        raise ConfigError(f"{path.parent} already holds a {noun} ({path.name}); pass --resume to continue it or "
                          "choose another --out")
    return cfg, None


class RunCheckpoints:
    """A run's last.pt, never written from a diverged state (NaN/inf would replace the last good one).
    `check` records "diverged" in the run's `log` and raises `TrainingDiverged`, naming the checkpoint
    left as it was; `save` checks, writes atomically and logs. `saved_step`: the step last.pt holds
    (None: none written yet); `hint`: what to change, in the options of the command that trains."""

    def __init__(self, path: Path, log: Any, saved_step: int | None, *,
                 hint: str = "Start a new run with a lower --lr or a --grad-clip") -> None:
        self.path, self.log, self.saved_step, self.hint = path, log, saved_step, hint

    def check(self, tensors: Iterable[torch.Tensor], step: int) -> None:
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            return
        self.log.record("diverged", step)
        kept = (f"{self.path} (step {self.saved_step}) is left as it was" if self.saved_step is not None
                else "no checkpoint was written")
        raise TrainingDiverged(f"the loss or the weights are no longer finite at step {step}; {kept}. {self.hint}")

    def save(self, state: Mapping[str, Any], *, finite: Iterable[torch.Tensor], step: int) -> None:
        self.check(finite, step)
        atomic_torch_save(dict(state), self.path)
        self.saved_step = step
        self.log.record("checkpoint", step, path=str(self.path))


def config_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(ckpt["config"])


# --- RNG states as tensors -----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, each as tensors so weights_only loading works."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor(list(py_internal), dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if np_name != "MT19937":  # pragma: no cover - numpy's legacy global state is always MT19937
        raise CheckpointError(f"unexpected numpy RNG {np_name}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_torch_save",
    "is_run_folder",
    "config_of",
    "RunCheckpoints",
    "load_checkpoint",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]
