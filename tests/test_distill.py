"""Distillation (`dlsr-search train --teacher`) and the x8 self-ensemble it and `dlsr-eval --self-ensemble` use."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlsr_infer import DLSR
from dlsr_infer.evaluate import main as eval_main
from dlsr_infer.evaluate import super_resolve_fp32
from dlsr_infer.genotype import builtin
from dlsr_search import teacher as teacher_mod
from dlsr_search.checkpoint import load_checkpoint
from dlsr_search.cli import main as cli_main
from dlsr_search.config import ConfigError
from dlsr_search.data import DataError, ImagePair, PatchDataset, list_images, load_pairs
from dlsr_search.synthetic import write_images
from dlsr_search.teacher import add_teacher_targets, load_teacher
from dlsr_search.train import TrainConfig, train


def _model(seed: int, scale: int = 2) -> DLSR:
    torch.manual_seed(seed)
    return DLSR(builtin("dlsr_x2").replace(channels=8, scale=scale)).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("distill") / "imgs", n=4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return _model(1).save_pretrained(tmp_path_factory.mktemp("teacher") / "t")


def _manual_ensemble(model: DLSR, lr: np.ndarray, scale: int = 2) -> np.ndarray:
    """The definition, in numpy: each of the 8 flips/transposes through the model (edge-padded on the
    bottom/right to 15 px where smaller, its output cropped back), mapped back, averaged, rounded once."""
    outs = []
    for transpose in (False, True):
        for k in range(4):
            a = np.rot90(lr, k)
            a = a.transpose(1, 0, 2) if transpose else a
            h, w = a.shape[:2]
            a = np.pad(a, ((0, max(0, 15 - h)), (0, max(0, 15 - w)), (0, 0)), mode="edge")
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div(255).unsqueeze(0)
            with torch.no_grad():
                y = model(x)[0].permute(1, 2, 0).double().numpy()[:h * scale, :w * scale]
            y = y.transpose(1, 0, 2) if transpose else y
            outs.append(np.rot90(y, -k))
    return np.clip(np.round(np.mean(outs, axis=0) * 255), 0, 255).astype(np.uint8)


def test_self_ensemble_is_the_mean_of_the_eight_mapped_back_outputs():
    model = _model(0)
    lr = np.random.default_rng(0).integers(0, 256, (21, 17, 3), dtype=np.uint8)  # not square: the transposes show
    ens = super_resolve_fp32(model, lr, scale=2, device="cpu", ensemble=True)
    single = super_resolve_fp32(model, lr, scale=2, device="cpu")
    want = _manual_ensemble(model, lr)
    assert ens.shape == single.shape == (42, 34, 3)
    diff = np.abs(ens.astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # float sums in another order: a rare rounding tie
    assert np.abs(ens.astype(int) - single.astype(int)).mean() > 0.5  # a random net is not flip-equivariant
    # under the network's 15 px minimum: each transformed input is padded and its output cropped back
    for small in (lr[:9, :12], lr[:20, :5]):
        ens = super_resolve_fp32(model, small, scale=2, device="cpu", ensemble=True)
        diff = np.abs(ens.astype(int) - _manual_ensemble(model, small).astype(int))
        assert ens.shape == (2 * small.shape[0], 2 * small.shape[1], 3) and diff.max() <= 1 and diff.mean() < 0.01


def test_dlsr_eval_self_ensemble_is_labelled_and_refused_in_low_precision(tmp_path, data_dir, teacher_dir, capsys):
    out = tmp_path / "r.json"
    assert eval_main([str(teacher_dir), "--data", str(data_dir), "--self-ensemble", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["results"][0]["method"].endswith("+") and "self-ensemble" in payload["protocol"]
    plain = tmp_path / "p.json"
    assert eval_main([str(teacher_dir), "--data", str(data_dir), "--json", str(plain)]) == 0
    assert json.loads(plain.read_text())["results"][0]["psnr"] != payload["results"][0]["psnr"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_main([str(teacher_dir), "--data", str(data_dir), "--self-ensemble", "--dtype", "bf16"])
    assert e.value.code == 2 and "--self-ensemble needs a MODEL and --dtype fp32" in capsys.readouterr().err


def test_patches_of_a_target_share_the_crop_and_flip_of_the_hr(data_dir):
    pairs, _ = load_pairs(list_images([data_dir]), 2, min_lr_size=16)
    for p in pairs:
        p.target = 255 - p.hr
    ds = PatchDataset(pairs, 2, 16, seed=3)
    for k in range(40):
        lr, hr, t = ds[k]
        assert t.shape == hr.shape == (3, 32, 32) and torch.equal(t, 255 - hr)
    lr, hr, t = ds.batch([0, 1, 2])
    assert t.shape == (3, 3, 32, 32)
    pairs[0].target = None
    with pytest.raises(DataError, match="every image has a teacher prediction"):
        PatchDataset(pairs, 2, 16, seed=3)
    assert len(PatchDataset([ImagePair(p.name, p.hr, p.lr) for p in pairs], 2, 16, seed=3)[0]) == 2


def test_teacher_predictions_are_cached_per_teacher_and_lr(tmp_path, data_dir, teacher_dir):
    pairs, _ = load_pairs(list_images([data_dir]), 2, min_lr_size=16)
    teacher = load_teacher(str(teacher_dir), 2, ensemble=False)
    first = add_teacher_targets(pairs, teacher, 2, cache_dir=tmp_path / "cache")
    assert first["predicted"] == len(pairs) and first["cached"] == 0
    for p in pairs:
        assert np.array_equal(p.target, super_resolve_fp32(teacher.model, p.lr, scale=2, device="cpu"))
    made = [p.target.copy() for p in pairs]
    again = add_teacher_targets(pairs, teacher, 2, cache_dir=tmp_path / "cache")
    assert again["cached"] == len(pairs) and all(np.array_equal(a, p.target) for a, p in zip(made, pairs))
    # the self-ensemble of the same weights is another teacher: its own folder
    ens = load_teacher(str(teacher_dir), 2, ensemble=True)
    assert ens.key != teacher.key
    assert add_teacher_targets(pairs, ens, 2, cache_dir=tmp_path / "cache")["predicted"] == len(pairs)
    # an LR that changed (say, a fixed bicubic) is predicted again, never paired with the stale prediction
    pairs[0].lr = pairs[0].lr.copy()
    pairs[0].lr[0, 0] ^= 1
    assert add_teacher_targets(pairs, teacher, 2, cache_dir=tmp_path / "cache")["predicted"] == 1
    # a damaged entry is predicted again
    entry = next((tmp_path / "cache" / f"teacher-{teacher.key}" / "X2").glob("*.png"))
    entry.write_bytes(b"not a png")
    assert add_teacher_targets(pairs, teacher, 2, cache_dir=tmp_path / "cache")["predicted"] == 1


def test_a_teacher_of_another_scale_or_no_model_is_refused(tmp_path, data_dir, teacher_dir, monkeypatch):
    x4 = _model(2, scale=4).save_pretrained(tmp_path / "x4")
    with pytest.raises(ConfigError, match="is an x4 model; this run trains x2"):
        load_teacher(str(x4), 2, ensemble=False)
    gray = DLSR(builtin("dlsr_x2").replace(channels=8, in_channels=1, out_channels=1)).save_pretrained(tmp_path / "g")
    with pytest.raises(ConfigError, match="maps 1 to 1 channels; training is RGB"):
        load_teacher(str(gray), 2, ensemble=False)
    with pytest.raises(ConfigError, match="--teacher needs a model directory"):  # was: trained with no teacher
        train(_cfg(tmp_path, data_dir, "empty", teacher="", teacher_weight=0.3))
    assert not (tmp_path / "empty").exists()
    # A teacher whose output is not finite (weights that load can still overflow): an error naming the
    # teacher and the image, before any step - not a traceback
    from dlsr_infer.evaluate import NonFiniteOutput

    def overflow(*a, **kw):
        raise NonFiniteOutput("the model's output is not finite")

    monkeypatch.setattr(teacher_mod, "super_resolve_fp32", overflow)
    with pytest.raises(ConfigError, match=r"--teacher .* on training image .*\.png: the model's output is not finite"):
        train(_cfg(tmp_path, data_dir, "nan-run", teacher=str(teacher_dir)))
    assert not (tmp_path / "nan-run" / "last.pt").exists()
    with pytest.raises(ConfigError, match="--teacher"):
        load_teacher(str(tmp_path / "missing"), 2, ensemble=False)


def _cfg(tmp_path: Path, data_dir: Path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), scale=2, data=[str(data_dir)], channels=8, batch=2, patch=32, steps=4,
                val_every=0, log_every=2, progress=False, threads=1, lr=1e-3, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_distillation_trains_on_the_weighted_sum_of_both_targets(tmp_path, data_dir, teacher_dir, monkeypatch):
    plain = train(_cfg(tmp_path, data_dir, "plain"))
    distilled = train(_cfg(tmp_path, data_dir, "distil", teacher=str(teacher_dir), teacher_weight=0.7))
    wp, wd = load_checkpoint(plain.out / "last.pt")["model"], load_checkpoint(distilled.out / "last.pt")["model"]
    assert any(not torch.equal(wp[k], wd[k]) for k in wp)
    ckpt = load_checkpoint(distilled.out / "last.pt")
    assert ckpt["teacher_sha256"] == load_teacher(str(teacher_dir), 2, ensemble=False).sha256
    records = [json.loads(line) for line in (distilled.out / "log.jsonl").read_text().splitlines()]
    (rec,) = [r for r in records if r["event"] == "teacher"]
    assert rec["weight"] == 0.7 and rec["ensemble"] is False and rec["predicted"] == rec["images"] > 0

    # The first step's logged loss is (1-w) L(SR, HR) + w L(SR, teacher): same init, same first batch.
    first = {w: train(_cfg(tmp_path, data_dir, f"w{w}", steps=1, log_every=1, teacher=str(teacher_dir),
                           teacher_weight=w)).losses[0][1] for w in (0.3, 1.0)}
    plain_first = train(_cfg(tmp_path, data_dir, "w0", steps=1, log_every=1)).losses[0][1]
    assert first[1.0] != pytest.approx(plain_first, rel=1e-3)  # the teacher is not the HR
    assert first[0.3] == pytest.approx(0.7 * plain_first + 0.3 * first[1.0], rel=1e-5)

    # A teacher that predicts the HR exactly: (1-w)*loss + w*loss is the plain loss, so the run is the plain run.
    def hr_as_target(pairs, teacher, scale, **kw):
        for p in pairs:
            p.target = p.hr.copy()
        return {"images": len(pairs), "cached": 0, "predicted": len(pairs), "seconds": 0.0}

    monkeypatch.setattr("dlsr_search.train.add_teacher_targets", hr_as_target)
    same = train(_cfg(tmp_path, data_dir, "same", teacher=str(teacher_dir), teacher_weight=0.7))
    ws = load_checkpoint(same.out / "last.pt")["model"]
    assert all(torch.allclose(wp[k], ws[k], rtol=1e-4, atol=1e-6) for k in wp)
    assert [round(l, 4) for _, l in same.losses] == [round(l, 4) for _, l in plain.losses]


def test_a_resume_refuses_a_teacher_whose_weights_changed(tmp_path, data_dir):
    tdir = _model(3).save_pretrained(tmp_path / "teacher")
    first = train(_cfg(tmp_path, data_dir, "run", teacher=str(tdir), steps=2))
    assert first.step == 2
    resumed = train(_cfg(tmp_path, data_dir, "run", steps=3, resume=True), explicit={"steps", "resume"})
    assert resumed.step == 3
    import shutil

    shutil.rmtree(tdir)
    _model(4).save_pretrained(tdir)
    with pytest.raises(ConfigError, match="its weights changed since this run started"):
        train(_cfg(tmp_path, data_dir, "run", steps=4, resume=True), explicit={"steps", "resume"})


@pytest.mark.parametrize("extra,message", [
    (("--teacher-weight", "0.3"), "--teacher-weight and --teacher-ensemble need --teacher MODEL"),
    (("--teacher-ensemble",), "--teacher-weight and --teacher-ensemble need --teacher MODEL"),
    (("--teacher", "x2", "--teacher-weight", "0"), "--teacher-weight must be in (0, 1]"),
    (("--teacher", "x2", "--teacher-weight", "nan"), "--teacher-weight must be in (0, 1]"),
])
def test_teacher_options_are_checked_before_anything_runs(tmp_path, data_dir, capsys, extra, message):
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(data_dir), "--channels", "8", "--batch", "2",
            "--patch", "32", "--steps", "2", "--no-progress", *extra]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_model_card_names_the_teacher_of_a_distilled_run():
    from dlsr_search.modelcard import _loss

    assert _loss({"pixel_loss": "l2"}) == "L2"
    text = _loss({"pixel_loss": "l2", "teacher": "weights/dlsr-x2", "teacher_weight": 0.5, "teacher_ensemble": True})
    assert text.startswith("L2 (distilled:") and "w 0.5" in text and "`weights/dlsr-x2`, its x8 self-ensemble" in text
    records = [{"event": "teacher", "sha256": "ab" * 32}, {"event": "train"}, {"event": "teacher", "sha256": "ab" * 32}]
    text = _loss({"pixel_loss": "l1", "teacher": "x2", "teacher_weight": 0.5}, records)
    assert "teacher `x2` (sha256 abababababab), predicting" in text


def test_a_card_command_parses_back_to_the_runs_teacher_options():
    import dataclasses
    import shlex

    from dlsr_search.cli import _parser
    from dlsr_search.modelcard import command_line

    for teacher in ({}, {"teacher": "weights/dlsr-x2", "teacher_weight": 0.3, "teacher_ensemble": True},
                    {"teacher": "x2"}):
        cfg = dataclasses.asdict(TrainConfig(out="runs/a", **teacher))
        args = vars(_parser().parse_args(shlex.split(command_line(cfg))[1:]))
        opts = {k: v for k, v in args.items() if v is not None and k != "command"}
        back = TrainConfig(**opts)
        assert (back.teacher, back.teacher_weight, back.teacher_ensemble) == \
            (cfg["teacher"], cfg["teacher_weight"], cfg["teacher_ensemble"])
        if not teacher:  # train refuses --teacher-weight / --teacher-ensemble without --teacher
            assert "--teacher" not in command_line(cfg)


def test_a_stop_during_the_teachers_predictions_keeps_them_and_leaves_no_run(tmp_path, data_dir, teacher_dir,
                                                                             monkeypatch, capsys):
    """SIGTERM while the teacher predicts (an hour for an ensemble on a CPU) stops before the next image;
    the predictions made are in the cache for the same command to go on from, and no run is left behind."""
    import os
    import signal

    real, calls, signalled = teacher_mod.super_resolve_fp32, [], []

    def predict_then_signal(*a, **kw):
        calls.append(1)
        if not signalled:
            signalled.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's StopRequest: a request, not an exit
        return real(*a, **kw)

    monkeypatch.setattr(teacher_mod, "super_resolve_fp32", predict_then_signal)
    cache = tmp_path / "cache"
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(data_dir), "--channels", "8", "--batch", "2",
            "--patch", "32", "--steps", "2", "--no-progress", "--threads", "1", "--teacher", str(teacher_dir),
            "--lr-cache", str(cache)]
    handler = signal.getsignal(signal.SIGTERM)
    assert cli_main(argv) == 130
    err = capsys.readouterr().err
    n = len(list_images([data_dir]))
    assert f"stopped while the teacher predicted the training images (1 of {n} done, kept in the --lr-cache" in err
    assert len(calls) == 1 and not (tmp_path / "run").exists()
    assert len(list(cache.glob("teacher-*/X2/*.png"))) == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
    calls.clear()
    assert cli_main(argv) == 0  # the same command goes on: one from the cache, the rest predicted
    assert len(calls) == n - 1
    (rec,) = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(l)["event"] == "teacher"]
    assert (rec["cached"], rec["predicted"]) == (1, n - 1)


def test_a_stop_without_a_cache_says_the_predictions_are_lost(tmp_path, data_dir, teacher_dir):
    pairs, _ = load_pairs(list_images([data_dir]), 2, min_lr_size=16)
    teacher = load_teacher(str(teacher_dir), 2, ensemble=False)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(teacher_mod.PredictionsStopped, match=rf"2 of {len(pairs)} done, not kept \(no --lr-cache\)"):
        add_teacher_targets(pairs, teacher, 2, stop=stop)
    assert len(asked) == 3
    with pytest.raises(teacher_mod.PredictionsStopped, match=rf"before the teacher's first prediction of the {len(pairs)}"):
        add_teacher_targets(pairs, teacher, 2, stop=lambda: True)


def test_a_cards_wall_time_counts_the_teachers_predictions():
    from dlsr_search.modelcard import wall_time_s

    plain = [{"event": "start", "step": 0, "time": 100.0}, {"event": "train", "step": 10, "time": 160.0}]
    teacher = {"event": "teacher", "step": 0, "time": 100.5, "seconds": 900.0, "predicted": 50, "cached": 0}
    assert wall_time_s(plain) == pytest.approx(60.0)
    assert wall_time_s([plain[0], teacher, plain[1]]) == pytest.approx(960.0)
