"""Training data: HR/LR image pairs held in memory, and random LR/HR patches as a pure function of an index.

Why a pure function: sample number ``k`` of a run (``k = step * global_batch + rank * batch + i``) fixes
which image it comes from (a fresh permutation of the images per pass, from ``seed``) and its crop and
dihedral augmentation (from ``(seed, k)``). No sampler or worker holds hidden state, so a resumed run,
a run with more DataLoader workers, and every DDP rank see exactly the data an uninterrupted run would.

LR images are MATLAB-bicubic ``imresize(modcrop(HR, s), 1/s)`` (``dlsr_infer.imresize``), computed
once per image, kept in memory and optionally cached on disk as PNG.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dlsr_infer.evaluate import (HR_DIGEST_KEY, IMAGE_EXTENSIONS, default_shared_dir, hr_digest, load_rgb, make_lr,
                                 read_cached_png, write_cached_png)
from dlsr_infer.imresize import imresize, modcrop, output_size
from dlsr_infer.model import MIN_INPUT_SIZE



class DataError(ValueError):
    """Training/validation data that cannot be used (missing folder, no images, images too small)."""


def default_data_roots() -> list[Path]:
    """``$DLSR_DATA`` (folders joined by the path separator), else ``<shared>/data/train``, the shared
    folder found as dlsr-eval finds it (``$DLSR_SHARED``, else ``../shared``: `default_shared_dir`)."""
    env = os.environ.get("DLSR_DATA")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [default_shared_dir() / "data" / "train"]


def list_images(roots: Sequence[str | os.PathLike]) -> list[Path]:
    """All image files under the given folders (recursively) or given as files, sorted per root."""
    if not roots:
        raise DataError("no data folders given")
    files: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            files.append(root)
            continue
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        files.extend(found)
    return files


def split_by_image(files: Sequence[Path], holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """Split whole images (never patches of one image) into (train, held-out), reproducibly from seed."""
    if not 0 < holdout < len(files):
        raise DataError(f"cannot hold out {holdout} of {len(files)} images")
    order = np.random.default_rng([seed, 0x5EA]).permutation(len(files))
    held = sorted(int(i) for i in order[:holdout])
    held_set = set(held)
    return [f for i, f in enumerate(files) if i not in held_set], [files[i] for i in held]


def _cache_path(cache_dir: Path | None, file: Path, hr: np.ndarray, scale: int) -> Path | None:
    if cache_dir is None:
        return None
    # Keyed on the (mod-cropped) HR pixels, what the LR is made from: an edited image never reuses a stale
    # LR, and the same image under another path or modification time (a re-provisioned copy of the
    # data) still finds its entry instead of adding one more.
    key = hr_digest(hr)[:16]
    return cache_dir / f"X{scale}" / f"{file.stem}_{key}.png"


@dataclass
class ImagePair:
    name: str
    hr: np.ndarray  # uint8 HxWx3, mod-cropped to the scale
    lr: np.ndarray  # uint8 (H/s)x(W/s)x3
    target: np.ndarray | None = None  # uint8 like hr: a teacher's prediction from lr (train --teacher)
    shrunk_by: float = 1.0  # < 1: a copy of the source image shrunk by this (load_pairs' downscales)


def large_enough(hr_short_side: int, scale: int, min_lr_size: int) -> bool:
    """Whether an HR image whose shorter side is ``hr_short_side`` gives LR patches of ``min_lr_size``."""
    return hr_short_side // scale >= min_lr_size


def check_downscales(factors: Sequence[float]) -> None:
    """Each factor of ``--data-scales`` must shrink the image: 0 < f < 1, each given once (as the copies
    are named: 0.5 and 0.5000001 would both be ``img@0.5``)."""
    for f in factors:
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f < 1.0):
            raise DataError(f"--data-scales: each factor must be a number between 0 and 1 (a smaller copy), got {f!r}")
    names = [f"{f:g}" for f in factors]
    if len(set(names)) != len(names):
        raise DataError(f"--data-scales: a factor is given twice ({', '.join(names)})")


def downscaled(hr: np.ndarray, factor: float, cache_dir: Path | None = None, stem: str = "") -> np.ndarray:
    """``imresize(hr, factor)``: a smaller copy of a training HR image, as its own HR (the multi-scale
    augmentation of VDSR's 291 images: finer detail per pixel, and less of the source's noise and JPEG
    blocking). Cached under ``cache_dir/down/`` (named from ``stem``), keyed on the source pixels."""
    if cache_dir is None:
        return imresize(hr, factor)
    digest = hr_digest(hr)
    path = cache_dir / "down" / f"{stem}_{digest[:16]}_{factor:g}.png"
    cached = read_cached_png(path, HR_DIGEST_KEY, digest, (*output_size(hr.shape[:2], factor), 3))
    if cached is not None:
        return cached
    small = imresize(hr, factor)
    write_cached_png(path, small, HR_DIGEST_KEY, digest)
    return small


def copy_name(name: str, factor: float) -> str:
    """The name of a downscaled copy: ``img.png`` -> ``img@0.5.png`` (logs, teacher cache)."""
    path = Path(name)
    return f"{path.stem}@{factor:g}{path.suffix}"


def load_pairs(files: Sequence[Path], scale: int, *, min_lr_size: int = MIN_INPUT_SIZE,
               cache_dir: str | os.PathLike | None = None, threads: int = 2,
               progress: bool = False, role: str = "the data folders",
               downscales: Sequence[float] = ()) -> tuple[list[ImagePair], list[str]]:
    """Load HR images and their bicubic LR, dropping images whose LR side is under ``min_lr_size``.

    ``downscales``: also a pair for each of these factors, made from a copy of the HR shrunk by it
    (`downscaled`), right after its source; a copy too small for ``min_lr_size`` is left out. Each copy is
    an image of its own: `PatchDataset` draws images uniformly, so a copy gives as many patches as its
    source (with 2 factors, two thirds of the patches come from copies).
    Returns ``(pairs, skipped_names)`` (the source images too small). numpy's resize loops release the
    GIL, so a few threads help. ``role`` names the images in the error about one that cannot be read
    ("the validation set", ...).
    """
    check_downscales(downscales)
    cache = Path(cache_dir) if cache_dir is not None else None

    def pair(name: str, hr: np.ndarray, factor: float = 1.0) -> ImagePair:
        hr = modcrop(hr, scale)
        return ImagePair(name, hr, make_lr(hr, scale, _cache_path(cache, Path(name), hr, scale)), shrunk_by=factor)

    def fits(shape: tuple[int, ...]) -> bool:
        return large_enough(min(shape[:2]), scale, min_lr_size)

    def one(f: Path) -> list[ImagePair] | None:
        try:
            hr = load_rgb(f)
        except ValueError as e:  # unreadable, 16-bit: found at start-up, before any training
            raise DataError(f"{e}; every image in {role} is used, so fix or remove it") from None
        if not fits(hr.shape):
            return None
        return [pair(f.name, hr)] + [pair(copy_name(f.name, factor), downscaled(hr, factor, cache, f.stem), factor)
                                     for factor in downscales if fits(output_size(hr.shape[:2], factor))]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(one, files)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(files), desc=f"loading x{scale} pairs", leave=False)
        loaded = list(results)
    pairs = [p for ps in loaded if ps is not None for p in ps]
    skipped = [f.name for f, p in zip(files, loaded) if p is None]
    if not pairs:
        raise DataError(f"none of the {len(files)} images is large enough (LR side >= {min_lr_size} at x{scale})")
    return pairs, skipped


def _dihedral(img: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations (code 0..7) of an HxWxC array."""
    if code & 1:
        img = img[:, ::-1]
    if code & 2:
        img = img[::-1, :]
    if code & 4:
        img = img.transpose(1, 0, 2)
    return img


class PatchDataset(Dataset):
    """Sample ``k`` -> (LR patch, HR patch) as uint8 CHW tensors; deterministic in (seed, k). When the pairs
    carry teacher predictions (``ImagePair.target``), a third tensor: the same crop and flip of the target."""

    def __init__(self, pairs: Sequence[ImagePair], scale: int, lr_patch: int, seed: int, *,
                 augment: bool = True, stream: int = 0) -> None:
        self.pairs = [p for p in pairs if min(p.lr.shape[:2]) >= lr_patch]
        if not self.pairs:
            raise DataError(f"no image is large enough for an LR patch of {lr_patch} px at x{scale}")
        self.dropped = len(pairs) - len(self.pairs)
        if len({p.target is None for p in self.pairs}) > 1:
            raise DataError("either every image has a teacher prediction (target) or none has")
        self.scale, self.lr_patch, self.seed, self.augment = scale, lr_patch, seed, augment
        # stream: a second, independent sample stream from the same seed (the search's validation patches)
        self._salt = [stream] if stream else []
        self._perm_pass, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:  # one pass over the images; the sampler itself is endless
        return len(self.pairs)

    def image_index(self, k: int) -> int:
        n = len(self.pairs)
        pass_no = k // n
        if pass_no != self._perm_pass:  # a fresh order of the images for every pass over them
            self._perm = np.random.default_rng([self.seed, 1, pass_no, *self._salt]).permutation(n)
            self._perm_pass = pass_no
        return int(self._perm[k % n])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Samples stacked into a uint8 batch, in this process (no DataLoader needed for a side stream)."""
        return tuple(torch.stack(parts) for parts in zip(*(self[k] for k in indices)))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        pair = self.pairs[self.image_index(k)]
        rng = np.random.default_rng([self.seed, 2, k, *self._salt])
        p, s = self.lr_patch, self.scale
        h, w = pair.lr.shape[:2]
        y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        crops = [pair.lr[y:y + p, x:x + p], pair.hr[y * s:(y + p) * s, x * s:(x + p) * s]]
        if pair.target is not None:
            crops.append(pair.target[y * s:(y + p) * s, x * s:(x + p) * s])
        if self.augment:
            code = int(rng.integers(0, 8))
            crops = [_dihedral(c, code) for c in crops]
        return tuple(torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1))) for c in crops)


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start_step .. end_step-1``, this rank's sample indices of that step.

    Step ``t`` on rank ``r`` takes samples ``t*B*W + r*B ... + B-1``: disjoint shards per rank (like
    DistributedSampler) and a position fully given by the step, so resuming needs only the step.
    """

    def __init__(self, batch: int, *, start_step: int, end_step: int, rank: int = 0, world: int = 1) -> None:
        self.batch, self.start_step, self.end_step, self.rank, self.world = batch, start_step, end_step, rank, world

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.start_step, self.end_step):
            yield step_indices(t, self.batch, self.rank, self.world)


def step_indices(step: int, batch: int, rank: int = 0, world: int = 1) -> list[int]:
    """Sample indices of ``step`` on ``rank`` (``batch`` per rank): the whole data-order contract."""
    base = (step * world + rank) * batch
    return list(range(base, base + batch))


def patch_loader(dataset: PatchDataset, batch: int, *, start_step: int, end_step: int, rank: int = 0,
                 world: int = 1, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over steps [start_step, end_step) of this rank's share of the sample stream."""
    sampler = StepBatchSampler(batch, start_step=start_step, end_step=end_step, rank=rank, world=world)
    extra = {}
    if workers > 0:
        # fork shares the in-memory images copy-on-write instead of pickling them to every worker.
        import multiprocessing as mp

        if "fork" in mp.get_all_start_methods():
            extra["multiprocessing_context"] = "fork"
        extra["persistent_workers"] = False
        extra["prefetch_factor"] = 4
    # its own generator: iter() draws the workers' base seed from it, not from the global torch RNG that
    # a checkpoint saves (a resumed run would otherwise restore the RNG and then draw one more than a straight one)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator(), **extra)


def to_float(batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW batch -> float32 in [0, 1] on ``device`` (uint8 crosses process/device boundaries: 4x less)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


__all__ = [
    "DataError",
    "ImagePair",
    "PatchDataset",
    "StepBatchSampler",
    "check_downscales",
    "copy_name",
    "default_data_roots",
    "downscaled",
    "large_enough",
    "list_images",
    "load_pairs",
    "patch_loader",
    "split_by_image",
    "step_indices",
    "to_float",
]
