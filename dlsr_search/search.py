"""Differentiable architecture search of a DLSR network (the paper's cell- and network-level search).

    python -m dlsr_search.cli search --scale 2 --out runs/search-x2
    torchrun --nproc_per_node=2 -m dlsr_search.cli search ...

MiLeNAS (mixed-level) optimisation of the supernet (`supernet.SuperNet`):

- weights theta:       Adam(3e-4, betas 0.9/0.999, wd 1e-8) on L_train;
- architecture A:      Adam(3e-4, betas 0.5/0.999, wd 1e-8) on L_train + lambda*L_val + gamma*L_P,
  where A = (alpha, beta) and L_P is the differentiable parameter loss (`losses.param_loss`);
- the first ``--warmup`` steps (2e4) train theta only, so A is not judged by untrained weights;
- L = L1 + mu*HFEN with mu = 0.2, lambda = 1, gamma = 0.2 (the paper's values).

L_train comes from one set of images, L_val from images held out of it (split by image). Both
gradients are taken at the same point (theta_t, A_t), as MiLeNAS prescribes: one forward/backward on a
training batch gives theta's and A's L_train gradient, a second forward/backward on a validation batch
adds lambda*L_val + gamma*L_P to A only.

Files in ``--out``: ``last.pt`` (resume point), ``genotype.json`` (the current derived genotype),
``genotypes/step_XXXXXXXX.json`` (snapshots every ``--snapshot-every`` steps and whenever the derived
genotype changes, with alphas/betas in provenance), ``log.jsonl``, ``config.json``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dlsr_infer.genotype import MAX_CELLS, MAX_CHANNELS, Genotype, loads as load_genotype_json
from dlsr_infer.imageio import atomic_write_text

from . import distributed as D
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, RunCheckpoints, load_checkpoint, resume_or_start, rng_state, seed_everything,
                         set_rng_state)
from .config import ConfigError, check_common, from_json, to_json
from .data import DataError, PatchDataset, default_data_roots, patch_loader, split_by_image, step_indices, to_float
from .genotypes import derive_genotype
from .losses import param_loss, sr_loss
from .runtime import StopRequest, check_resumed_images, image_list, load_pairs_ranked, run_in_process, start_run
from .supernet import SuperNet


@dataclass
class SearchConfig:
    out: str
    scale: int = 2
    data: list[str] = field(default_factory=lambda: [str(p) for p in default_data_roots()])
    val_holdout: float = 0.2          # images held out for L_val: a fraction (< 1) or a count
    seed: int = 0
    channels: int = 48
    cells: int = 6
    per_cell_alphas: bool = False
    steps: int = 100_000
    warmup: int = 20_000              # theta-only steps before the architecture is trained
    batch: int = 64                   # global batch (per stream), split over torchrun ranks
    patch: int = 64                   # HR patch side (the authors' search: 64)
    lr: float = 3e-4
    halve_every: int = 400_000
    weight_decay: float = 1e-8
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-8
    hfen: float = 0.2                 # mu
    lam: float = 1.0                  # lambda
    gamma: float = 0.2
    snapshot_every: int = 1000
    log_every: int = 100
    ckpt_every: int = 1000
    ckpt_every_minutes: float = 10.0
    threads: int | None = None
    workers: int = 0
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool | None = None
    lr_cache: str | None = None
    resume: bool = False
    progress: bool = True


@dataclass
class SearchResult:
    out: Path
    step: int
    # None (and no genotype_path) when the search was stopped before its last step: its genotype.json, if any,
    # is the latest searched one (written once warm-up is over), not a final one
    genotype: Genotype | None
    genotype_path: Path | None
    snapshots: list[Path]
    resumed_from: int | None


def check_config(cfg: SearchConfig, world: int) -> None:
    if cfg.scale not in (2, 3, 4):
        raise ConfigError(f"--scale must be 2, 3 or 4, got {cfg.scale}")
    if cfg.patch % cfg.scale or cfg.patch // cfg.scale < 15:
        raise ConfigError(f"--patch {cfg.patch} must be a multiple of the scale and give an LR patch >= 15 px")
    if cfg.batch < 1 or cfg.batch % world:
        raise ConfigError(f"--batch {cfg.batch} must be a positive multiple of the number of processes ({world})")
    if cfg.channels < 4 or cfg.channels % 4 or cfg.channels > MAX_CHANNELS:
        raise ConfigError(f"--channels must be a multiple of 4 (ESA uses a quarter) from 4 to {MAX_CHANNELS}, got "
                          f"{cfg.channels}")
    if not 3 <= cfg.cells <= MAX_CELLS:  # links are searched from cell 3 on; a genotype holds at most MAX_CELLS
        raise ConfigError(f"--cells must be from 3 to {MAX_CELLS}, got {cfg.cells}")
    if not (math.isfinite(cfg.val_holdout) and cfg.val_holdout > 0):
        raise ConfigError("--val-holdout must be > 0: the architecture needs held-out images")
    if cfg.val_holdout >= 1 and cfg.val_holdout != int(cfg.val_holdout):
        raise ConfigError(f"--val-holdout {cfg.val_holdout:g}: a fraction below 1 or a whole number of images")
    if cfg.warmup < 0 or cfg.steps <= cfg.warmup:
        raise ConfigError(f"--steps {cfg.steps} must be more than --warmup {cfg.warmup} (>= 0): the architecture is "
                          "trained only after the warm-up, so the genotype would be the random initial one")
    for name in ("lam", "gamma"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"--{name} must be a finite number >= 0, got {v}")
    check_common(cfg)


def genotype_from_checkpoint(path: str | os.PathLike) -> Genotype:
    """The genotype a search checkpoint's alphas/betas derive (what `dlsr-search export` writes)."""
    ckpt = load_checkpoint(path, kind="search")
    cfg = from_json(SearchConfig, ckpt["config"])
    if int(ckpt["step"]) <= cfg.warmup:  # A has not moved yet: the 'genotype' would be its random init
        raise CheckpointError(f"{path} stopped at step {ckpt['step']}, within its {cfg.warmup}-step warm-up: its "
                              "architecture has not been searched yet (resume the search past the warm-up)")
    state = ckpt["model"]
    betas = [state[f"betas.{i}"] for i in range(cfg.cells - 2)]
    return derive_genotype(state["alphas"], betas, scale=cfg.scale, channels=cfg.channels, num_cells=cfg.cells,
                           provenance=_provenance(cfg, int(ckpt["step"])))


def _provenance(cfg: SearchConfig, step: int) -> dict[str, Any]:
    return {"source": "dlsr-search search (MiLeNAS)", "step": step, "seed": cfg.seed, "data": cfg.data,
            "val_holdout": cfg.val_holdout, "lambda": cfg.lam, "gamma": cfg.gamma, "mu": cfg.hfen,
            "warmup": cfg.warmup, "batch": cfg.batch, "patch": cfg.patch}


def search_step(model: SuperNet, w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer,
                forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                train_batch: tuple[torch.Tensor, torch.Tensor], val_batch: tuple[torch.Tensor, torch.Tensor] | None,
                *, lam: float, gamma: float, info: D.DistInfo | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One MiLeNAS step; with ``val_batch=None`` a warm-up step (weights only). Returns the three losses.

    Gradients are left in ``.grad`` (zeroed at the start), so callers can inspect them.
    """
    theta, arch = model.weight_parameters(), model.arch_parameters()
    w_opt.zero_grad(set_to_none=True)
    a_opt.zero_grad(set_to_none=True)
    loss_train = forward_loss(*train_batch)
    if val_batch is None:  # warm-up: weights only, A gets no gradient at all
        loss_train.backward(inputs=theta)
        if info is not None:
            D.average_gradients(theta, info)
        w_opt.step()
        return loss_train, None, None
    # theta and A both get grad L_train from one backward (A keeps it for its own step) ...
    loss_train.backward()
    # ... then A alone gets lambda * L_val + gamma * L_P, at the same (theta, A): MiLeNAS.
    loss_val = forward_loss(*val_batch)
    loss_param = param_loss(model.op_weights(), model.channels)
    (lam * loss_val + gamma * loss_param).backward(inputs=arch)
    if info is not None:
        D.average_gradients(theta + arch, info)
    w_opt.step()
    a_opt.step()
    return loss_train, loss_val, loss_param


def search(cfg: SearchConfig, *, explicit: Iterable[str] | None = None) -> SearchResult:
    return run_in_process(_search, cfg, explicit)


def _search(cfg: SearchConfig, info: D.DistInfo, stop: StopRequest, explicit: Iterable[str] | None) -> SearchResult:
    out = Path(cfg.out)
    ckpt_path = out / "last.pt"

    # ---- resume or start: the checkpoint's config wins over the command line -------------------------------
    cfg, ckpt = resume_or_start(cfg, kind="search", explicit=explicit, announce=info.is_main)
    check_config(cfg, info.world)
    files, autocast_dtype, channels_last, threads, log = start_run(cfg, info, out, ckpt, desc=f"search x{cfg.scale}")
    device = info.device

    # ---- data: a training stream (loader) and a held-out validation stream, split by image. Loaded
    # before the run records its start (config.json, the start/resume records), as in train: a run that cannot
    # use its data leaves no history that claims it searched
    lr_patch = cfg.patch // cfg.scale
    per_rank = cfg.batch // info.world
    try:
        holdout = int(round(cfg.val_holdout * len(files))) if cfg.val_holdout < 1 else int(cfg.val_holdout)
        train_files, val_files = split_by_image(files, max(1, holdout), cfg.seed)
        kw = dict(min_lr_size=lr_patch, cache_dir=cfg.lr_cache, threads=threads or 2, progress=log.bar is not None)
        train_pairs, _ = load_pairs_ranked(train_files, cfg.scale, info, **kw)
        val_pairs, _ = load_pairs_ranked(val_files, cfg.scale, info, **kw)
        train_set = PatchDataset(train_pairs, cfg.scale, lr_patch, cfg.seed)
        val_set = PatchDataset(val_pairs, cfg.scale, lr_patch, cfg.seed, stream=1)
    except DataError as e:
        raise ConfigError(str(e)) from None
    images = image_list(files, cfg.data)
    check_resumed_images(ckpt, images, held_out=True)

    # ---- supernet, two optimizers: theta and A never share a step ---------------------------------------------
    seed_everything(cfg.seed)
    model = SuperNet(scale=cfg.scale, channels=cfg.channels, num_cells=cfg.cells,
                     per_cell_alphas=cfg.per_cell_alphas).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    theta, arch = model.weight_parameters(), model.arch_parameters()
    w_opt = torch.optim.Adam(theta, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(arch, lr=cfg.arch_lr, betas=(0.5, 0.999), weight_decay=cfg.arch_weight_decay)
    w_sched = torch.optim.lr_scheduler.StepLR(w_opt, step_size=cfg.halve_every, gamma=0.5)
    step, last_genotype, train_seconds = 0, None, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        w_opt.load_state_dict(ckpt["w_optimizer"])
        a_opt.load_state_dict(ckpt["a_optimizer"])
        w_sched.load_state_dict(ckpt["w_scheduler"])
        set_rng_state(ckpt["rng"])
        step, train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
        last_genotype = load_genotype_json(ckpt["genotype_json"]) if ckpt["genotype_json"] else None
        log.print(f"resumed {out} at step {step}")
        log.record("resume", step)
    D.broadcast_parameters(model, info)
    resumed_from = step if ckpt is not None else None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", to_json(cfg) + "\n")
        log.record("start", step, config=to_json(cfg), world=info.world, device=str(device))
        log.print(f"supernet x{cfg.scale} {cfg.channels}ch {cfg.cells} cells, {sum(p.numel() for p in theta):,} weights, "
                  f"{sum(p.numel() for p in arch)} arch params | {device} x{info.world} | batch {cfg.batch} "
                  f"patch {cfg.patch} | warm-up {cfg.warmup} | steps {step}->{cfg.steps}")

    log.print(f"data: {len(train_set.pairs)} images for the weights, {len(val_set.pairs)} held out for the architecture")
    loader = patch_loader(train_set, per_rank, start_step=step, end_step=cfg.steps, rank=info.rank,
                          world=info.world, workers=cfg.workers, pin_memory=device.type == "cuda")

    def forward_loss(lr_u8: torch.Tensor, hr_u8: torch.Tensor) -> torch.Tensor:
        x, y = to_float(lr_u8, device, channels_last), to_float(hr_u8, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            sr = model(x)
        return sr_loss(sr.float(), y, cfg.hfen)

    snapshots: list[Path] = []

    def snapshot(reason: str) -> Genotype:
        """Derive the genotype; write it if asked to or if it changed (rank 0)."""
        nonlocal last_genotype
        checkpoints.check(model.arch_parameters(), step)  # NaN alphas would derive a meaningless genotype
        genotype = model.genotype(**_provenance(cfg, step), reason=reason)
        changed = last_genotype is None or not genotype.architecture_equals(last_genotype)
        if info.is_main and (changed or reason != "changed"):
            path = out / "genotypes" / f"step_{step:08d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, genotype.to_json())  # whole or not at all: a second Ctrl-C may land here
            if step > cfg.warmup:  # in warm-up A has not moved: genotype.json is only ever a searched one
                atomic_write_text(out / "genotype.json", genotype.to_json())
            snapshots.append(path)
            log.record("genotype", step, reason="changed" if changed else reason, path=str(path),
                       cells=[{"ops": list(c.ops), "inputs": list(c.inputs)} for c in genotype.cells])
            if changed:
                log.print(f"step {step:>8d} | genotype: " + " ; ".join(
                    f"{'+'.join(map(str, c.inputs))}:{','.join(c.ops)}" for c in genotype.cells))
        last_genotype = genotype
        return genotype

    checkpoints = RunCheckpoints(ckpt_path, log, step if ckpt is not None else None,
                                 hint="Start a new run with a lower --lr or --arch-lr")

    def save_checkpoint() -> None:
        checkpoints.save({
            "format": CHECKPOINT_FORMAT, "kind": "search", "step": step, "config": to_json(cfg),
            "model": model.state_dict(), "w_optimizer": w_opt.state_dict(), "a_optimizer": a_opt.state_dict(),
            "w_scheduler": w_sched.state_dict(), "rng": rng_state(),
            "genotype_json": last_genotype.to_json() if last_genotype is not None else "",
            "samples_seen": step * cfg.batch, "world": info.world, "train_seconds": train_seconds,
            "images": images,
        }, finite=[*sums.values(), *model.parameters()], step=step)

    # ---- the loop ----------------------------------------------------------------------------------------------
    sums = {k: torch.zeros((), device=device) for k in ("train", "val", "param")}
    window_steps, arch_steps, window_t0 = 0, 0, time.perf_counter()
    last_ckpt_time = time.monotonic()
    stopping = False
    for lr_u8, hr_u8 in loader:
        t0 = time.perf_counter()
        search_arch = step >= cfg.warmup
        val_batch = val_set.batch(step_indices(step, per_rank, info.rank, info.world)) if search_arch else None
        loss_train, loss_val, loss_param = search_step(
            model, w_opt, a_opt, forward_loss, (lr_u8, hr_u8), val_batch, lam=cfg.lam, gamma=cfg.gamma, info=info)
        if search_arch:
            sums["val"] += loss_val.detach()
            sums["param"] += loss_param.detach()
            arch_steps += 1
        w_sched.step()
        step += 1
        train_seconds += time.perf_counter() - t0
        sums["train"] += loss_train.detach()
        window_steps += 1
        log.advance()

        scheduled = bool(cfg.snapshot_every) and step % cfg.snapshot_every == 0
        if search_arch or scheduled:  # the architecture moved (or a snapshot is due): derive, write if changed
            snapshot("scheduled" if scheduled else "changed")

        if step % cfg.log_every == 0 or step == cfg.steps:
            means = {k: D.mean_over_ranks(v.item() / max(1, window_steps if k == "train" else arch_steps), info)
                     for k, v in sums.items()}
            dt = time.perf_counter() - window_t0
            lr_now = w_sched.get_last_lr()[0]
            phase = "search" if search_arch else "warm-up"
            log.print(f"step {step:>8d} | {phase} | L_train {means['train']:8.4f}"
                      + (f" | L_val {means['val']:8.4f} | L_P {means['param']:.4f}" if arch_steps else "")
                      + f" | lr {lr_now:.2e} | {window_steps / dt:6.2f} it/s")
            log.record("search", step, phase=phase, loss_train=means["train"],
                       loss_val=means["val"] if arch_steps else None,
                       loss_param=means["param"] if arch_steps else None, lr=lr_now, it_per_s=window_steps / dt)
            for v in sums.values():
                v.zero_()
            window_steps, arch_steps, window_t0 = 0, 0, time.perf_counter()

        stopping = D.broadcast_flag(stop.requested, info)
        due = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or \
            (time.monotonic() - last_ckpt_time) / 60 >= cfg.ckpt_every_minutes
        if info.is_main and (due or stopping or step == cfg.steps):
            save_checkpoint()
            last_ckpt_time = time.monotonic()
        if stopping:
            log.print(f"stopped at step {step} (signal); resume with --resume")
            log.record("stop", step)
            break

    if stopping:  # no final genotype from a search cut short (in warm-up, its alphas are still the random init)
        log.close()
        D.barrier(info)
        return SearchResult(out, step, None, None, snapshots, resumed_from)
    # ---- finish: the final derived genotype --------------------------------------------------------------------
    genotype = snapshot("final")
    if info.is_main:
        if not ckpt_path.is_file():
            save_checkpoint()
        log.print(f"final genotype ({step} steps): {out / 'genotype.json'}")
        log.record("end", step, genotype=str(out / "genotype.json"))
    log.close()
    D.barrier(info)
    return SearchResult(out, step, genotype, out / "genotype.json", snapshots, resumed_from)


__all__ = ["SearchConfig", "SearchResult", "genotype_from_checkpoint", "search"]
