"""Process-level plumbing shared by `train` and `search`: threads, precision flags, signals, data loading order."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

from dlsr_infer.imageio import blocking_file

from . import distributed as D
from .config import ConfigError
from .data import DataError, ImagePair, list_images, load_pairs
from .runlog import RunLog

R = TypeVar("R")


def set_threads(threads: int | None, info: D.DistInfo) -> int | None:
    """Apply ``--threads``; under torchrun on CPU default to cores / local processes (no oversubscription)."""
    if threads is None and info.enabled and info.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world)))
    if threads:
        torch.set_num_threads(threads)
    return threads


def precision_flags(bf16: bool | None, channels_last: bool | None,
                    device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last); both default on for CUDA and off for CPU."""
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if channels_last is None:
        channels_last = device.type == "cuda"
    return (torch.bfloat16 if bf16 else None), channels_last


def autotune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution kernels once per shape and keep the fastest.

    Training patches have one fixed shape, so the one-off timing pays back within a few steps.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def ranked(fn: Callable[[], R], info: D.DistInfo) -> R:
    """``fn()`` on every rank, rank 0 first: it fills an on-disk cache (LR images, teacher predictions) that
    the other ranks then read, so ranks never write one file at once."""
    result: list[R] = []
    for turn in ([0, 1] if info.enabled else [0]):
        if (turn == 0) == info.is_main:
            result.append(fn())
        D.barrier(info)
    return result[0]


def load_pairs_ranked(files: Sequence[Path], scale: int, info: D.DistInfo, **kw: Any) -> tuple[list[ImagePair], list[str]]:
    """`load_pairs` on every rank, rank 0 first (see `ranked`)."""
    return ranked(lambda: load_pairs(files, scale, **kw), info)


class StopRequest:
    """SIGTERM / SIGINT -> finish the current step, write a checkpoint, exit cleanly (a second Ctrl-C: now)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class RunFolderLock:
    """An exclusive lock on a run's ``--out`` folder for as long as the run lives, so that a second run
    started on the same folder (a repeated ``--resume``, two new runs given one ``--out``) is refused
    instead of interleaving its checkpoints and log with the first's.

    The lock is a ``flock`` on the folder itself (created if missing; removed again on the way out if
    the run left it empty), so a killed run never leaves a stale lock behind. Filesystems without
    ``flock`` run unlocked.
    """

    def __init__(self, out: str | os.PathLike, *, enabled: bool = True) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self._fd: int | None = None
        self._created: list[Path] = []  # folders made here, deepest first

    def __enter__(self) -> "RunFolderLock":
        if not self.enabled or fcntl is None:
            return self
        blocked = blocking_file(self.out)
        if blocked is not None:  # before: "[Errno 17] File exists ... (the last checkpoint is intact; ...)"
            raise ConfigError(f"--out {self.out}: {blocked} is a file, not a folder; give a folder for the run")
        self._created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # the folder is the holder's to clean up, not ours
            raise ConfigError(f"{self.out} is in use by another run (a dlsr-search process holds its lock); wait "
                              "for it to finish or stop it, or choose another --out") from None
        except OSError:  # pragma: no cover - no flock on this filesystem
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        for folder in self._created:  # a run that failed before writing anything leaves no empty folders
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                break
        os.close(self._fd)  # releases the lock
        self._fd = None


def device_to_run(cfg: Any, explicit: Iterable[str] | None) -> str:
    """The device a run is set up on: a resumed run's own (its checkpoint's config wins, as for every
    option) unless --device is given again; before, a run pinned to the CPU moved to a GPU on resume,
    and with it to bf16 and channels_last, which follow the device."""
    asked = set(explicit) if explicit is not None else ({"device"} if cfg.device != "auto" else set())
    path = Path(cfg.out) / "last.pt"
    if not getattr(cfg, "resume", False) or "device" in asked or not path.is_file():
        return cfg.device
    from .checkpoint import load_checkpoint  # checkpoint imports this module's neighbours: kept lazy

    try:
        return str(json.loads(load_checkpoint(path)["config"]).get("device") or cfg.device)
    except Exception:  # noqa: BLE001 - resume_or_start reads it again and says what is wrong with it
        return cfg.device


def run_in_process(body: Callable[[Any, D.DistInfo, StopRequest, Iterable[str] | None], R], cfg: Any,
                   explicit: Iterable[str] | None) -> R:
    """Run ``body`` inside the process group (torchrun or none) with SIGTERM/SIGINT turned into a clean stop,
    holding the ``--out`` folder's lock (on the main process) for the whole run."""
    device = device_to_run(cfg, explicit)
    try:
        info = D.setup(device)
    except ConfigError as e:
        if device == cfg.device:
            raise
        raise ConfigError(f"{e} (the device this run was started on, read from its checkpoint; give --device to "
                          "resume it on another)") from None
    try:
        with RunFolderLock(cfg.out, enabled=info.is_main), StopRequest() as stop:
            return body(cfg, info, stop, explicit)
    finally:
        D.teardown(info)


class RunStart(NamedTuple):
    """What a run takes from its machine before it builds a model: the images, precision, threads and its log."""
    files: list[Path]
    autocast_dtype: torch.dtype | None
    channels_last: bool
    threads: int | None
    log: RunLog


def start_run(cfg: Any, info: D.DistInfo, out: Path, ckpt: dict | None, *, desc: str) -> RunStart:
    """Find the data (before anything is written into ``out``), then set precision, threads and open the log."""
    try:
        files = list_images(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    autocast_dtype, channels_last = precision_flags(cfg.bf16, cfg.channels_last, info.device)
    autotune_convolutions(info.device)
    threads = set_threads(cfg.threads, info)
    log = RunLog(out if info.is_main else None, total_steps=cfg.steps, start_step=ckpt["step"] if ckpt else 0,
                 enabled=info.is_main, progress=cfg.progress, desc=desc)
    return RunStart(files, autocast_dtype, channels_last, threads, log)


def image_list(files: Sequence[Path], roots: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """What a checkpoint records of the images a run found (in order: a held-out split and the patches
    are drawn by index): their count and a digest of their paths relative to the data folder each was
    found in (`roots`, as `list_images` was given them), so that an image added, removed or renamed
    changes it and the folders' own location does not."""
    digest = hashlib.sha256()
    for f in files:
        f = Path(f)
        root = next((Path(r) for r in roots if f == Path(r) or f.is_relative_to(Path(r))), None)
        rel = f.name if root is None or f == root else f.relative_to(root).as_posix()
        digest.update(f"{rel}\n".encode())
    return {"count": len(files), "sha256": digest.hexdigest()}


def check_resumed_images(ckpt: dict | None, images: dict[str, Any], *, held_out: bool) -> str | None:
    """On resume: the images found now (`image_list`) against those the checkpoint was written with. With a held-out
    split, a changed list would move images between the weights' data and the validation (or the
    architecture's) data: refused. Without one, the run may go on: the returned note says what changed."""
    was = ckpt.get("images") if ckpt else None
    if not was or was == images:  # (checkpoints written before this record: not checked)
        return None
    counts = f"{was['count']} then, {images['count']} now" if was["count"] != images["count"] else \
        f"as many ({images['count']}), but not the same names"
    what = f"the training images changed since the checkpoint was written ({counts})"
    if held_out:
        raise ConfigError(f"{what}: its held-out split would move images between training and validation; restore "
                          "the data folder as it was, or start a new run")
    return f"{what}: the run goes on with them, so its patches from here are not an uninterrupted run's"


__all__ = ["RunFolderLock", "RunStart", "StopRequest", "autotune_convolutions", "check_resumed_images", "image_list",
           "load_pairs_ranked", "precision_flags", "run_in_process", "set_threads", "start_run"]
