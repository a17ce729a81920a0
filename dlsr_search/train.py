"""Retrain a DLSR network from its genotype (the paper's final training stage), resumable and DDP-ready.

    python -m dlsr_search.cli train --scale 2 --out runs/x2 --val-holdout 10
    torchrun --nproc_per_node=2 -m dlsr_search.cli train ...      (same run, two processes)

Paper defaults: L1 loss, Adam(3e-4, betas 0.9/0.999), batch 32, HR patches 128/192/256 for x2/x3/x4
(64 px LR), learning rate halved every 4e5 steps. Files in ``--out``: ``last.pt`` (resume point, every
``--ckpt-every`` steps / ``--ckpt-every-minutes``), ``best/`` (model directory of the best validation
PSNR-Y so far), ``log.jsonl``, ``config.json``. The loop below is deliberately flat: read it top to bottom.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from dlsr_infer.genotype import loads as load_genotype_json
from dlsr_infer.imageio import atomic_write_text
from dlsr_infer.model import DLSR, MIN_INPUT_SIZE

from . import distributed as D
from .checkpoint import (CHECKPOINT_FORMAT, RunCheckpoints, is_run_folder, resume_or_start, rng_state, seed_everything,
                         set_rng_state)
from .config import ConfigError, check_common, to_json
from .data import (DataError, PatchDataset, check_downscales, default_data_roots, patch_loader, split_by_image,
                   to_float)
from .ema import WeightEMA
from .export import save_model
from .genotypes import resolve_genotype
from .losses import PIXEL_LOSSES, sr_loss
from .runtime import StopRequest, check_resumed_images, image_list, load_pairs_ranked, ranked, run_in_process, start_run
from .teacher import add_teacher_targets, load_teacher
from .transfer import warm_start
from .validation import ValidationSet

#: The paper's HR training patch per scale (64 px LR patches).
PATCH_BY_SCALE = {2: 128, 3: 192, 4: 256}


def hr_patch_side(scale: int, patch: int | None) -> int:
    """The HR patch side of a run: ``patch``, or the paper's for ``scale`` when it is None."""
    return patch if patch is not None else PATCH_BY_SCALE[scale]


@dataclass
class TrainConfig:
    out: str
    scale: int = 2
    data: list[str] = field(default_factory=lambda: [str(p) for p in default_data_roots()])
    data_scales: list[float] = field(default_factory=list)  # also train on copies shrunk by these (data.downscaled)
    val: str | None = None            # folder of HR images for validation PSNR-Y
    val_holdout: int = 0              # ...or hold out this many training images (by image) instead
    val_max_images: int | None = None
    genotype: str | None = None       # shipped name / JSON file / model dir; None: dlsr_x{scale}
    channels: int | None = None       # override the genotype's width (small test/benchmark nets)
    genotype_json: str = ""           # the resolved genotype the run trains (filled in at start)
    steps: int = 2_000_000
    batch: int = 32                   # global batch: split over torchrun ranks
    patch: int | None = None          # HR patch side; None: PATCH_BY_SCALE[scale]
    lr: float = 3e-4
    halve_every: int = 400_000
    weight_decay: float = 1e-8
    hfen: float = 0.0                 # mu of L1 + mu*HFEN; the paper retrains with plain L1
    pixel_loss: str = "l1"            # "l2": squared error instead of L1 (a final PSNR fine-tune; not the paper's)
    teacher: str | None = None        # distil: model dir / alias whose predictions are a second target (teacher.py)
    teacher_weight: float = 0.5       # w of (1-w)*loss(sr, hr) + w*loss(sr, teacher)
    teacher_ensemble: bool = False    # the teacher predicts with its x8 self-ensemble
    grad_clip: float = 0.0            # max grad norm; 0 = off
    ema: float = 0.0                  # decay of a moving average of the weights (0 = off); val/best/export use it
    seed: int = 0
    init_from: str | None = None      # warm start: model dir / alias / .pt (shape-matching tensors)
    val_every: int = 2000
    log_every: int = 100
    ckpt_every: int = 1000
    ckpt_every_minutes: float = 10.0
    threads: int | None = None
    workers: int = 0
    device: str = "auto"
    bf16: bool | None = None          # autocast to bfloat16; None: on for CUDA, off for CPU
    channels_last: bool | None = None  # None: on for CUDA
    lr_cache: str | None = None       # cache bicubic LR images as PNG here
    export: str | None = None         # at the end, write the best (else last) model directory here
    resume: bool = False
    progress: bool = True

    def hr_patch(self) -> int:
        return hr_patch_side(self.scale, self.patch)


@dataclass
class TrainResult:
    out: Path
    step: int
    best_psnr: float | None
    losses: list[tuple[int, float]]   # (step, mean training loss over the log window)
    exported: Path | None
    resumed_from: int | None


def refuse_run_folders(cfg: TrainConfig) -> None:
    """A run folder given where a model or genotype goes is a natural slip; it failed with messages about a
    corrupt safetensors file or an unknown genotype format_version (the run's own config.json)."""
    for option, value in (("--init-from", cfg.init_from), ("--teacher", cfg.teacher), ("--genotype", cfg.genotype)):
        folder = Path(value) if value else None
        if folder is not None and is_run_folder(folder):
            what = {"--init-from": f"{folder / 'best'} (its best validation) or {folder / 'last.pt'}",
                    "--teacher": f"{folder / 'best'} (its best validation) or an export of it",
                    "--genotype": f"{folder / 'best'} (a model directory: its genotype) or a genotype JSON"}[option]
            raise ConfigError(f"{option} {value} is a dlsr-search run folder, not a model: give {what}")


def check_config(cfg: TrainConfig, world: int) -> None:
    if cfg.scale not in PATCH_BY_SCALE:
        raise ConfigError(f"--scale must be one of {sorted(PATCH_BY_SCALE)}, got {cfg.scale}")
    p = cfg.hr_patch()
    if p % cfg.scale or p // cfg.scale < MIN_INPUT_SIZE:
        raise ConfigError(f"--patch {p} must be a multiple of the scale {cfg.scale} and give an LR patch of at "
                          f"least {MIN_INPUT_SIZE} px")
    if cfg.batch < 1 or cfg.batch % world:
        raise ConfigError(f"--batch {cfg.batch} must be a positive multiple of the number of processes ({world})")
    check_common(cfg)
    if cfg.pixel_loss not in PIXEL_LOSSES:
        raise ConfigError(f"--pixel-loss must be one of {sorted(PIXEL_LOSSES)}, got {cfg.pixel_loss!r}")
    if not 0.0 < cfg.teacher_weight <= 1.0:
        raise ConfigError(f"--teacher-weight must be in (0, 1], got {cfg.teacher_weight}")
    if cfg.teacher is not None and not cfg.teacher.strip():
        raise ConfigError("--teacher needs a model directory, alias or Hub id (got an empty name)")
    if cfg.teacher is None and (cfg.teacher_ensemble or cfg.teacher_weight != TrainConfig.teacher_weight):
        raise ConfigError("--teacher-weight and --teacher-ensemble need --teacher MODEL")
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"--ema must be in [0, 1) (0: off), got {cfg.ema}")
    if cfg.val and cfg.val_holdout:
        raise ConfigError("give either --val DIR or --val-holdout N, not both")
    try:
        check_downscales(cfg.data_scales)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if cfg.val_every < 0 or cfg.val_holdout < 0 or (cfg.val_max_images is not None and cfg.val_max_images < 1):
        raise ConfigError("--val-every and --val-holdout must be >= 0 and --val-max-images >= 1")
    if cfg.export:  # checked now, not after training
        from .export import check_export_dir

        exported, out = Path(cfg.export).resolve(), Path(cfg.out).resolve()
        if exported in (out, out / "best") or out / "best" in exported.parents:  # its config.json; best/ onto itself
            raise ConfigError(f"--export {cfg.export} is the run folder {cfg.out} or its best/: export to a folder "
                              "of its own")
        check_export_dir(cfg.export, "--export")


def train(cfg: TrainConfig, *, explicit: Iterable[str] | None = None) -> TrainResult:
    """Run (or resume) a retrain. ``explicit``: the options the user set (for resume checks)."""
    return run_in_process(_train, cfg, explicit)


def _train(cfg: TrainConfig, info: D.DistInfo, stop: StopRequest, explicit: Iterable[str] | None) -> TrainResult:
    out = Path(cfg.out)
    ckpt_path = out / "last.pt"

    # ---- resume or start: the checkpoint's config wins over the command line -------------------------------
    cfg, ckpt = resume_or_start(cfg, kind="train", explicit=explicit, announce=info.is_main)
    refuse_run_folders(cfg)
    if not cfg.genotype_json:
        genotype, notes = resolve_genotype(cfg.genotype, cfg.scale, cfg.channels)
        cfg.genotype_json = genotype.to_json()
    else:
        genotype, notes = load_genotype_json(cfg.genotype_json), []
    check_config(cfg, info.world)
    if cfg.init_from and ckpt is None:  # a source that does not fit is refused now, not after the data loads
        warm_start(DLSR(genotype), cfg.init_from)
    files, autocast_dtype, channels_last, threads, log = start_run(cfg, info, out, ckpt, desc=f"train x{cfg.scale}")
    device = info.device
    for note in notes:
        log.print(f"note: {note}")

    # ---- data: patches are a pure function of (seed, sample index), see data.py ------------------------------
    # Loaded before the run records its start (config.json, the start/resume records): a run that cannot
    # use its data leaves no history that claims it trained.
    lr_patch = cfg.hr_patch() // cfg.scale
    images = image_list(files, cfg.data)
    teacher = None
    if cfg.teacher:  # loaded (and a changed one refused) before minutes of data loading, not after
        teacher = load_teacher(cfg.teacher, cfg.scale, ensemble=cfg.teacher_ensemble, device=device)
        if ckpt is not None and ckpt.get("teacher_sha256") not in (None, teacher.sha256):
            raise ConfigError(f"--teacher {cfg.teacher}: its weights changed since this run started "
                              f"(sha256 {ckpt['teacher_sha256'][:12]}... then, {teacher.sha256[:12]}... now); "
                              "start a new run (--init-from this run's last.pt) to distil from the new ones")
    try:
        val_files = None
        if cfg.val_holdout:
            files, val_files = split_by_image(files, cfg.val_holdout, cfg.seed)
        pairs, skipped = load_pairs_ranked(files, cfg.scale, info, min_lr_size=lr_patch, cache_dir=cfg.lr_cache,
                                           downscales=cfg.data_scales,
                                           threads=threads or 2, progress=log.bar is not None)
        teacher_note = None
        if teacher is not None:  # predictions of the whole training images, before any crop (teacher.py)
            log.print(f"teacher: {teacher.source}: predicting {len(pairs)} training images"
                      + (" (x8 self-ensemble)" if teacher.ensemble else "")
                      + (f", or reading them from {cfg.lr_cache}" if cfg.lr_cache else " (no --lr-cache: not kept)"))
            # One process: a stop is honoured between predictions. Under torchrun the ranks predict in turn
            # and wait for each other at a barrier, so one rank leaving early would strand the others: they
            # finish and the first training step stops them all together.
            asked_to_stop = (lambda: stop.requested) if info.world == 1 else None
            counts = ranked(lambda: add_teacher_targets(pairs, teacher, cfg.scale, cache_dir=cfg.lr_cache,
                                                        progress=log.bar is not None,
                                                        stop=asked_to_stop), info)
            teacher_note = {"source": teacher.source, "sha256": teacher.sha256, "ensemble": teacher.ensemble,
                            "weight": cfg.teacher_weight, **counts}
            del teacher  # its predictions are all it is needed for
        dataset = PatchDataset(pairs, cfg.scale, lr_patch, cfg.seed)
        valset = None
        if info.is_main and (cfg.val or val_files):
            valset = (ValidationSet.from_folder(cfg.val, cfg.scale, max_images=cfg.val_max_images, cache_dir=cfg.lr_cache)
                      if cfg.val else ValidationSet.from_files(val_files, cfg.scale, max_images=cfg.val_max_images))
    except DataError as e:
        raise ConfigError(str(e)) from None
    images_note = check_resumed_images(ckpt, images, held_out=bool(cfg.val_holdout))

    # ---- model and optimizer: every rank builds the same init from the seed -------------------------------
    seed_everything(cfg.seed)
    model = DLSR(genotype).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    # Stepped once per iteration: halves the lr every `halve_every` steps (the paper's schedule).
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.halve_every, gamma=0.5)
    step, best_psnr, train_seconds = 0, -math.inf, 0.0
    ema: WeightEMA | None = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        step, best_psnr, train_seconds = int(ckpt["step"]), float(ckpt["best_psnr"]), float(ckpt["train_seconds"])
        log.print(f"resumed {out} at step {step}")
        log.record("resume", step)
        if images_note:
            log.print(f"note: {images_note}")
            log.record("data_changed", step, note=images_note)
    elif cfg.init_from:
        report = warm_start(model, cfg.init_from)
        log.print(report.summary())
        log.record("warm_start", step, source=report.source, sha256=report.sha256, loaded=len(report.loaded),
                   skipped=[f"{k}: {why}" for k, why in report.skipped])
    D.broadcast_parameters(model, info)
    if cfg.ema:  # made after the warm start / resume so that it starts from the weights the run starts from
        ema = WeightEMA(model, cfg.ema)
        if ckpt is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        elif ckpt is not None:  # --ema added on resume: the average starts here (it never changes the training)
            log.print(f"weight average (EMA, decay {cfg.ema}) starts at step {step}")
            log.record("ema_start", step, decay=cfg.ema)
    # What validation, best/ and export see: the averaged weights when there are some.
    served = ema.model if ema is not None else model
    resumed_from = step if ckpt is not None else None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", to_json(cfg) + "\n")
        log.record("start", step, config=to_json(cfg), world=info.world, device=str(device),
                   params=sum(p.numel() for p in params), channels_last=channels_last,
                   autocast=None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."))
        log.print(f"DLSR x{cfg.scale} {genotype.channels}ch {genotype.num_cells} cells, "
                  f"{sum(p.numel() for p in params):,} params | {device} x{info.world} | "
                  f"batch {cfg.batch} patch {cfg.hr_patch()} | steps {step}->{cfg.steps}")

    copies = sum(p.shrunk_by != 1.0 for p in dataset.pairs)
    small_copies = (len(dataset.pairs) - copies) * len(cfg.data_scales) - copies
    log.print(f"data: {len(dataset.pairs)} training images ({len(skipped)} too small for {lr_patch} px LR patches)"
              + (f", {copies} of them shrunk copies (--data-scales; {small_copies} copies too small)"
                 if cfg.data_scales else "")
              + (f", {len(valset)} validation images" if valset else ""))
    log.record("data", step, images=len(dataset.pairs), skipped=skipped, lr_patch=lr_patch,
               **({"copies": copies} if cfg.data_scales else {}))
    if teacher_note is not None:
        log.print(f"teacher: {teacher_note['source']}{' (x8 self-ensemble)' if cfg.teacher_ensemble else ''}, "
                  f"weight {cfg.teacher_weight}: {teacher_note['predicted']} images predicted, "
                  f"{teacher_note['cached']} from the cache, {teacher_note['seconds']} s")
        log.record("teacher", step, **teacher_note)
    loader = patch_loader(dataset, cfg.batch // info.world, start_step=step, end_step=cfg.steps, rank=info.rank,
                          world=info.world, workers=cfg.workers, pin_memory=device.type == "cuda")

    def validate() -> float | None:
        if valset is None:
            return None
        return valset.psnr(served, device)  # fp32: the figure that picks best/ is the one dlsr-eval reports

    checkpoints = RunCheckpoints(ckpt_path, log, step if ckpt is not None else None)

    def save_checkpoint(last_val: float | None) -> None:
        checkpoints.save({
            "format": CHECKPOINT_FORMAT, "kind": "train", "step": step, "config": to_json(cfg),
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {}),
            "rng": rng_state(), "best_psnr": best_psnr, "last_val_psnr": last_val, "last_val_step": last_val_step,
            "samples_seen": step * cfg.batch, "world": info.world, "train_seconds": train_seconds, "images": images,
            **({"teacher_sha256": teacher_note["sha256"]} if teacher_note is not None else {}),
        }, finite=[window_loss, *params], step=step)

    def run_info(val: float | None) -> dict[str, Any]:
        return {"step": step, "val_psnr_y": None if val is None else round(val, 4),
                "val": cfg.val or (f"{cfg.val_holdout} held-out training images" if cfg.val_holdout else "none"),
                "data": ",".join(cfg.data), "batch": cfg.batch, "hr_patch": cfg.hr_patch(), "seed": cfg.seed,
                **({"ema_decay": cfg.ema} if ema is not None else {})}

    # ---- the loop ----------------------------------------------------------------------------------------------
    # the latest validation so far (a resumed run's checkpoints and export go on naming it)
    last_val: float | None = ckpt.get("last_val_psnr") if ckpt is not None else None
    last_val_step: int | None = ckpt.get("last_val_step") if ckpt is not None else None
    losses: list[tuple[int, float]] = []
    window_loss = torch.zeros((), device=device)  # summed on device; .item() only when logging (no per-step sync)
    window_steps, window_t0 = 0, time.perf_counter()
    last_ckpt_time = time.monotonic()
    for lr_u8, hr_u8, *teacher_u8 in loader:
        t0 = time.perf_counter()
        x = to_float(lr_u8, device, channels_last)
        y = to_float(hr_u8, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            sr = model(x)
        loss = sr_loss(sr.float(), y, cfg.hfen, cfg.pixel_loss)  # loss in fp32 even under autocast
        if teacher_u8:  # distillation: the teacher's prediction as a second target
            t = to_float(teacher_u8[0], device, channels_last)
            w = cfg.teacher_weight
            loss = (1.0 - w) * loss + w * sr_loss(sr.float(), t, cfg.hfen, cfg.pixel_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        D.average_gradients(params, info)  # every rank steps with the same averaged gradient
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        step += 1
        train_seconds += time.perf_counter() - t0
        window_loss += loss.detach()
        window_steps += 1
        log.advance()

        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss = D.mean_over_ranks(window_loss.item() / window_steps, info)
            checkpoints.check([torch.tensor(mean_loss)], step)  # the mean over ranks: every rank stops at the same step
            dt = time.perf_counter() - window_t0
            losses.append((step, mean_loss))
            lr_now = sched.get_last_lr()[0]
            log.print(f"step {step:>8d} | loss {mean_loss:8.4f} | lr {lr_now:.2e} | {window_steps / dt:6.2f} it/s"
                      + (f" | val {last_val:.3f} dB" if last_val is not None else ""))
            log.record("train", step, loss=mean_loss, lr=lr_now, it_per_s=window_steps / dt,
                       samples_per_s=window_steps * cfg.batch / dt)
            window_loss.zero_()
            window_steps, window_t0 = 0, time.perf_counter()

        val_due = bool(cfg.val_every) and (step % cfg.val_every == 0 or step == cfg.steps)
        if val_due:  # every rank (they hold the same weights): NaN weights give a black image, which scores a
            checkpoints.check(list(served.parameters()), step)  # finite PSNR that best/ would otherwise keep
        if info.is_main and val_due and valset:
            last_val, last_val_step = validate(), step
            improved = math.isfinite(last_val) and last_val > best_psnr
            if improved:  # keep the best network as a ready-to-use model directory
                best_psnr = last_val
                save_model(served, out / "best", run_info(last_val))
            log.print(f"step {step:>8d} | val PSNR-Y {last_val:.3f} dB" + (" (best)" if improved else ""))
            log.record("val", step, psnr_y=last_val if math.isfinite(last_val) else None, best=improved)

        stopping = D.broadcast_flag(stop.requested, info)
        due = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or \
            (time.monotonic() - last_ckpt_time) / 60 >= cfg.ckpt_every_minutes
        if info.is_main and (due or stopping or step == cfg.steps):
            save_checkpoint(last_val)
            last_ckpt_time = time.monotonic()
        if stopping:
            log.print(f"stopped at step {step} (signal); resume with --resume")
            log.record("stop", step)
            break

    # ---- finish: a last checkpoint (if the loop did not just write one) and the export ------------------------
    exported = None
    if info.is_main:
        if not ckpt_path.is_file():
            save_checkpoint(last_val)
        if cfg.export and not stop.requested:
            exported = Path(cfg.export)
            if (out / "best" / "model.safetensors").is_file():
                shutil.copytree(out / "best", exported, dirs_exist_ok=True)
            else:
                save_model(served, exported, run_info(last_val))
            log.print(f"exported {'best' if (out / 'best').is_dir() else 'last'} model to {exported}")
            log.record("export", step, path=str(exported))
        log.record("end", step, best_psnr=best_psnr if math.isfinite(best_psnr) else None)
    log.close()
    D.barrier(info)
    return TrainResult(out, step, best_psnr if math.isfinite(best_psnr) else None, losses, exported, resumed_from)


__all__ = ["PATCH_BY_SCALE", "TrainConfig", "TrainResult", "hr_patch_side", "train"]
