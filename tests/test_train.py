"""dlsr_search retrain: loss goes down, export round-trips, warm start, exact kill-and-resume, data stream."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dlsr_infer import DLSR
from dlsr_infer.genotype import builtin
from dlsr_search.checkpoint import load_checkpoint
from dlsr_search.cli import main as cli_main
from dlsr_search.config import ConfigError
from dlsr_search.data import PatchDataset, load_pairs, list_images, step_indices, split_by_image
from dlsr_search.ema import WeightEMA
from dlsr_search.losses import l1, l2, sr_loss
from dlsr_search.runtime import RunFolderLock
from dlsr_search.synthetic import write_images
from dlsr_search.train import TrainConfig, train
from dlsr_search.transfer import warm_start
from dlsr_search.validation import ValidationSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("train") / "imgs", n=6)


def _cfg(tmp_path: Path, data_dir: Path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), scale=2, data=[str(data_dir)], channels=8, batch=2, patch=32, steps=10,
                val_every=0, log_every=5, progress=False, threads=1, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_short_retrain_lowers_loss_and_exports_a_model_directory(tmp_path, data_dir):
    val = write_images(tmp_path / "val", n=2, size=48, seed=5)
    cfg = _cfg(tmp_path, data_dir, "run", steps=40, log_every=10, val=str(val), val_every=20,
               export=str(tmp_path / "export"))
    result = train(cfg)
    assert result.step == 40 and len(result.losses) == 4
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.8 * first, result.losses
    assert result.best_psnr is not None and np.isfinite(result.best_psnr)

    model = DLSR.from_pretrained(tmp_path / "export")  # round trip: the exported directory loads strictly
    best = DLSR.from_pretrained(tmp_path / "run" / "best")
    assert model.genotype.architecture_equals(best.genotype) and model.genotype.channels == 8
    for k, v in best.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 40, 40)

    # the checkpoint loads pickle-free and exports through the CLI to an identical network
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 40 and json.loads(ckpt["config"])["batch"] == 2
    assert cli_main(["export", str(tmp_path / "run" / "last.pt"), str(tmp_path / "from_ckpt")]) == 0
    exported = DLSR.from_pretrained(tmp_path / "from_ckpt")
    for k, v in ckpt["model"].items():
        assert torch.equal(exported.state_dict()[k], v)
    events = [r["event"] for r in _records(tmp_path / "run")]
    assert events[0] == "start" and "val" in events and "export" in events and events[-1] == "end"


def test_warm_start_x2_to_x4_loads_matching_tensors_and_reports_skipped(tmp_path, data_dir):
    torch.manual_seed(0)
    x2 = DLSR(builtin("dlsr_x2").replace(channels=8))
    x2.save_pretrained(tmp_path / "x2")
    x4 = DLSR(builtin("dlsr_x2").replace(channels=8, scale=4))
    report = warm_start(x4, tmp_path / "x2")
    skipped = {k for k, _ in report.skipped}
    assert skipped == {"upsampler.conv.weight", "upsampler.conv.bias"}
    assert all("shape" in why for _, why in report.skipped)
    assert len(report.loaded) == len(x2.state_dict()) - 2
    for k in report.loaded:
        assert torch.equal(x4.state_dict()[k], x2.state_dict()[k])
    assert "upsampler.conv.weight" in report.summary()

    # through the trainer: the warm start is logged, with the skipped tensors named
    cfg = _cfg(tmp_path, data_dir, "x4", scale=4, patch=64, steps=1, init_from=str(tmp_path / "x2"))
    train(cfg)
    rec = next(r for r in _records(tmp_path / "x4") if r["event"] == "warm_start")
    assert rec["loaded"] == len(report.loaded) and len(rec["skipped"]) == 2
    assert all(s.startswith("upsampler.conv.") for s in rec["skipped"])
    assert rec["sha256"] == report.sha256 == hashlib.sha256((tmp_path / "x2" / "model.safetensors").read_bytes()).hexdigest()


def test_a_warm_start_that_fits_nothing_is_refused_before_the_data_loads(tmp_path, data_dir, monkeypatch):
    """`--genotype dlsr_s_x2 --init-from x4` loaded 0 of 214 tensors, exited 0, and its card said 'warm
    start: x4': a network trained from scratch under another's name."""
    DLSR(builtin("dlsr_x2").replace(channels=12)).save_pretrained(tmp_path / "wide")
    before = DLSR(builtin("dlsr_x2").replace(channels=8)).state_dict()
    model = DLSR(builtin("dlsr_x2").replace(channels=8))
    model.load_state_dict(before)
    with pytest.raises(ConfigError, match=r"only \d+ of this network's \d+ tensors fit .* no warm start"):
        warm_start(model, tmp_path / "wide")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # left as it was

    from dlsr_search import train as train_mod

    monkeypatch.setattr(train_mod, "load_pairs_ranked", lambda *a, **k: pytest.fail("the data was loaded first"))
    with pytest.raises(ConfigError, match="no warm start"):
        train(_cfg(tmp_path, data_dir, "run", init_from=str(tmp_path / "wide")))
    assert not (tmp_path / "run").exists()


def test_a_warm_start_from_a_checkpoint_takes_its_averaged_weights(tmp_path, data_dir):
    """As its export, its validation and its best/ have them (the raw weights were taken before)."""
    train(_cfg(tmp_path, data_dir, "ema", steps=4, ema=0.5))
    ckpt = load_checkpoint(tmp_path / "ema" / "last.pt")
    model = DLSR(builtin("dlsr_x2").replace(channels=8))
    warm_start(model, tmp_path / "ema" / "last.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"]["model"].items())
    assert any(not torch.equal(ckpt["ema"]["model"][k], v) for k, v in ckpt["model"].items())


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    steps = 60
    common = ["--scale", "2", "--data", str(data_dir), "--channels", "8", "--batch", "2", "--patch", "32",
              "--steps", str(steps), "--val-every", "0", "--log-every", "10", "--ckpt-every", "4", "--threads", "1",
              "--lr", "1e-3", "--ema", "0.9", "--no-progress"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dlsr_search.cli", "train", "--out", str(out), "--resume", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:  # kill -9 right after the first checkpoint
        log = out / "log.jsonl"
        if log.is_file() and any(r["event"] == "checkpoint" for r in _records(out)):
            proc.send_signal(signal.SIGKILL)
            killed_after = max(r["step"] for r in _records(out))
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_after is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumes = [r for r in _records(out) if r["event"] == "resume"]
    assert len(resumes) == 1 and 0 < resumes[0]["step"] < steps

    reference = tmp_path / "uninterrupted"
    assert cli_main(["train", "--out", str(reference), *common]) == 0
    a = load_checkpoint(out / "last.pt", kind="train")
    b = load_checkpoint(reference / "last.pt", kind="train")
    assert a["step"] == b["step"] == steps
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["ema"]["updates"] == b["ema"]["updates"] == steps
    for k, v in b["ema"]["model"].items():  # the weight average resumes exactly too
        assert torch.equal(a["ema"]["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # and the RNG states it saves (the data loader draws from its own generator, not the restored global one)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["rng"]["numpy_keys"], b["rng"]["numpy_keys"]) and a["rng"]["numpy_pos"] == b["rng"]["numpy_pos"]


def test_weight_ema_follows_its_formula():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = WeightEMA(net, 0.5)
    expected = 0.0
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.5, (1 + ema.updates) / (10 + ema.updates))
        expected = d * expected + (1 - d) * value
        assert ema.model.weight.item() == pytest.approx(expected)
    assert not ema.model.weight.requires_grad and net.weight.item() == 4.0  # the trained net is untouched
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(net, 1.0)


def test_the_average_does_not_carry_a_copy_of_the_models_fused_form():
    from dlsr_infer.fast import _CACHE_ATTR

    from conftest import tiny_genotype

    model = DLSR(tiny_genotype()).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16))
    assert model.__dict__.get(_CACHE_ATTR)  # the fused form DLSR.forward built and cached
    ema = WeightEMA(model, 0.9)
    assert not ema.model.__dict__.get(_CACHE_ATTR)
    with torch.no_grad():
        x = torch.rand(1, 3, 16, 16)
        torch.testing.assert_close(ema.model(x), model(x))


def test_ema_run_validates_keeps_and_exports_the_averaged_weights(tmp_path, data_dir):
    val = write_images(tmp_path / "val", n=2, size=48, seed=5)
    with pytest.raises(ConfigError, match="--ema"):
        train(_cfg(tmp_path, data_dir, "bad", ema=1.0))
    cfg = _cfg(tmp_path, data_dir, "run", steps=20, ema=0.9, val=str(val), val_every=20,
               export=str(tmp_path / "export"))
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", kind="train")
    averaged, raw = ckpt["ema"]["model"], ckpt["model"]
    assert ckpt["ema"]["updates"] == 20 and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    # export (train's and the CLI's) and best/ hold the average, not the last step's weights
    assert cli_main(["export", str(tmp_path / "run" / "last.pt"), str(tmp_path / "from_ckpt")]) == 0
    for folder in ("export", "from_ckpt", "run/best"):
        state = DLSR.from_pretrained(tmp_path / folder).state_dict()
        for k, v in averaged.items():
            assert torch.equal(state[k], v.float()), (folder, k)
    # the validation score in the log is the averaged network's
    logged = [r["psnr_y"] for r in _records(tmp_path / "run") if r["event"] == "val"]
    rescored = ValidationSet.from_folder(str(val), 2).psnr(DLSR.from_pretrained(tmp_path / "export"),
                                                            torch.device("cpu"))
    assert logged == [pytest.approx(rescored, abs=1e-6)]


def test_validation_scores_what_dlsr_eval_scores(tmp_path):
    """The same images (a benchmark folder's HR/, not its LR_bicubic/ beside it), an image too small for
    the network's minimum input padded rather than dropped, fp32 even under the training's bf16 autocast:
    the figure that picks best/ is dlsr-eval's."""
    from PIL import Image

    from dlsr_infer.evaluate import evaluate
    from dlsr_search.data import DataError

    bench = tmp_path / "Set2"
    write_images(bench / "HR", n=2, size=48, seed=3)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (22, 26, 3), dtype=np.uint8)).save(bench / "HR" / "small.png")
    write_images(bench / "LR_bicubic" / "X2", n=2, size=24, seed=4)  # what a recursive listing also found
    torch.manual_seed(0)
    model = DLSR(builtin("dlsr_x2").replace(channels=8))
    valset = ValidationSet.from_folder(bench, 2)
    assert sorted(p.name for p in valset.pairs) == sorted(f.name for f in (bench / "HR").iterdir())
    ours = evaluate(model, [bench], dtype="fp32")[0]["psnr"]
    assert valset.psnr(model, torch.device("cpu")) == pytest.approx(ours, abs=1e-9)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training loop's autocast does not reach it
        assert valset.psnr(model, torch.device("cpu")) == pytest.approx(ours, abs=1e-9)
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(bench / "HR" / "dot.png")
    with pytest.raises(DataError, match="validation images smaller than the scale \\(2\\): dot.png"):
        ValidationSet.from_folder(bench, 2)
    with pytest.raises(DataError, match="--val: data folder not found"):
        ValidationSet.from_folder(tmp_path / "nope", 2)
    # a plain folder is searched recursively, and one image file is a set (as before; runs resume with them)
    nested = tmp_path / "nested"
    write_images(nested / "sub", n=2, size=48, seed=6)
    assert len(ValidationSet.from_folder(nested, 2)) == 2
    assert len(ValidationSet.from_folder(nested / "sub" / "img0.png", 2)) == 1


def test_a_resumed_run_keeps_its_last_validation_and_a_torn_log_line(tmp_path, data_dir, capsys):
    """After a resume, before the next validation, the run still knows its latest score (its console
    lines and checkpoints name it; `export` puts it in the model's metadata); a log line a kill cut short
    is ended, not glued to the resume record, and a model card skips it."""
    from dlsr_search.modelcard import read_log

    val = write_images(tmp_path / "val", n=2, size=48, seed=9)
    train(_cfg(tmp_path, data_dir, "run", steps=10, val=str(val), val_every=10, ckpt_every=5))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", kind="train")
    first = ckpt["last_val_psnr"]
    assert first is not None and math.isfinite(first) and ckpt["last_val_step"] == ckpt["step"] == 10
    # export names a validation score only for the weights it scored: a checkpoint written after it does not
    from dlsr_search.checkpoint import atomic_torch_save
    from dlsr_search.export import export_checkpoint

    assert f"| val_psnr_y | {first} |" in (export_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "e1") / "README.md").read_text()
    atomic_torch_save({**ckpt, "last_val_step": 8}, tmp_path / "later.pt")
    assert "| val_psnr_y | None |" in (export_checkpoint(tmp_path / "later.pt", tmp_path / "e2") / "README.md").read_text()
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"event": "train", "step": 1')  # killed mid-record
    capsys.readouterr()
    train(_cfg(tmp_path, data_dir, "run", steps=14, val=str(val), val_every=10, log_every=2, resume=True))
    assert f"step       12 | loss" in (out := capsys.readouterr().out) and f"| val {first:.3f} dB" in out.split("step       12 |")[1].splitlines()[0]
    lines = log.read_text().splitlines()
    assert '{"event": "train", "step": 1' in lines and json.loads(lines[lines.index('{"event": "train", "step": 1') + 1])["event"] == "resume"
    with pytest.warns(UserWarning, match="a record cut short"):
        records = read_log(tmp_path / "run")
    assert [r["event"] for r in records].count("resume") == 1 and records[-1]["step"] == 14


def test_l2_pixel_loss_is_the_squared_error_and_trains_the_run(tmp_path, data_dir):
    torch.manual_seed(0)
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.allclose(l2(sr, hr), ((sr - hr) * 255).square().mean())
    assert torch.equal(sr_loss(sr, hr, pixel="l2"), l2(sr, hr)) and torch.equal(sr_loss(sr, hr), l1(sr, hr))
    # the same first batch and init: the logged loss is the mean squared error, >= (mean abs error)^2
    a = train(_cfg(tmp_path, data_dir, "l1", steps=1, log_every=1))
    b = train(_cfg(tmp_path, data_dir, "l2", steps=1, log_every=1, pixel_loss="l2"))
    assert b.losses[0][1] > a.losses[0][1] ** 2
    wa, wb = load_checkpoint(a.out / "last.pt")["model"], load_checkpoint(b.out / "last.pt")["model"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads(load_checkpoint(b.out / "last.pt")["config"])["pixel_loss"] == "l2"
    with pytest.raises(ConfigError, match="pixel-loss"):
        train(_cfg(tmp_path, data_dir, "l3", pixel_loss="l3"))
    with pytest.raises(ConfigError, match="pixel_loss"):  # the loss defines the run: no change on resume
        train(_cfg(tmp_path, data_dir, "l2", steps=2, resume=True), explicit={"pixel_loss", "steps", "resume"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_retrain_on_cuda_under_bf16_and_channels_last_then_resumes_on_the_cpu(tmp_path, data_dir):
    val = write_images(tmp_path / "val", n=2, size=48, seed=5)
    cfg = _cfg(tmp_path, data_dir, "gpu", steps=20, log_every=10, ema=0.9, val=str(val), val_every=10, workers=1)
    result = train(cfg)  # device auto: CUDA, with bf16 autocast and channels_last on by default
    start = _records(result.out)[0]
    assert start["device"].startswith("cuda") and result.step == 20
    assert start["autocast"] == "bfloat16" and start["channels_last"] is True  # what "by default" promises
    assert all(np.isfinite(loss) for _, loss in result.losses) and result.best_psnr is not None
    assert json.loads(start["config"])["device"] == "auto"
    # the checkpoint (CUDA tensors, CUDA RNG state) loads onto the CPU and the run goes on there
    more = train(_cfg(tmp_path, data_dir, "gpu", steps=24, log_every=4, ema=0.9, val=str(val), val_every=10,
                      workers=1, device="cpu", resume=True))
    assert more.resumed_from == 20 and more.step == 24
    ckpt = load_checkpoint(result.out / "last.pt", kind="train")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values()) and ckpt["ema"]["updates"] == 24


def test_resume_keeps_the_run_definition(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "run", steps=2)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(tmp_path, data_dir, "run", steps=2))
    with pytest.raises(ConfigError, match="batch"):
        train(_cfg(tmp_path, data_dir, "run", steps=4, batch=4, resume=True), explicit={"batch", "steps", "resume"})
    spelt_otherwise = str(data_dir) + "/"  # the same folder: not a change
    train(_cfg(tmp_path, data_dir, "run", steps=2, data=[spelt_otherwise], resume=True),
          explicit={"data", "steps", "resume"})
    with pytest.raises(ConfigError, match="val_max_images"):  # best/ would compare scores on two sets
        train(_cfg(tmp_path, data_dir, "run", steps=4, val_max_images=1, resume=True),
              explicit={"val_max_images", "steps", "resume"})
    # operational options may change; unset options come from the checkpoint, not the defaults
    result = train(TrainConfig(out=str(tmp_path / "run"), steps=4, resume=True, progress=False, threads=1),
                   explicit={"out", "steps", "resume", "progress", "threads"})
    assert result.resumed_from == 2 and result.step == 4
    saved = json.loads(load_checkpoint(tmp_path / "run" / "last.pt")["config"])
    assert saved["batch"] == 2 and saved["channels"] == 8 and saved["steps"] == 4
    # a weight average may be added on resume (it never changes the trained weights): it starts there
    train(TrainConfig(out=str(tmp_path / "run"), steps=7, ema=0.5, resume=True, progress=False, threads=1),
          explicit={"out", "steps", "ema", "resume", "progress", "threads"})
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["ema"]["updates"] == 3 and json.loads(ckpt["config"])["ema"] == 0.5
    assert [r["step"] for r in _records(tmp_path / "run") if r["event"] == "ema_start"] == [4]
    plain = train(_cfg(tmp_path, data_dir, "plain", steps=7))
    reference = load_checkpoint(plain.out / "last.pt")["model"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in reference.items())


def test_a_resumed_run_is_set_up_on_its_own_device_unless_told_otherwise(tmp_path, data_dir, monkeypatch):
    """D.setup ran on the command line's --device (default 'auto') before the checkpoint's config was read:
    a run pinned to the CPU would resume on a GPU, and with it on bf16 and channels_last."""
    from dlsr_search import runtime

    train(_cfg(tmp_path, data_dir, "run", steps=2, device="cpu"))
    seen = []
    real = runtime.D.setup
    monkeypatch.setattr(runtime.D, "setup", lambda device: seen.append(device) or real("cpu"))
    common = {"out": str(tmp_path / "run"), "resume": True, "progress": False, "threads": 1}
    train(TrainConfig(steps=3, **common), explicit={"out", "steps", "resume", "progress", "threads"})
    train(TrainConfig(steps=4, device="auto", **common), explicit={"out", "steps", "resume", "progress", "threads",
                                                                   "device"})
    assert seen == ["cpu", "auto"]  # the run's own; then what --device asked for (an operational option)
    assert runtime.device_to_run(TrainConfig(out=str(tmp_path / "new"), resume=True), None) == "auto"
    monkeypatch.undo()
    if not torch.cuda.is_available():  # a run started on a GPU, resumed here: the error says where cuda came from
        ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        ckpt["config"] = json.dumps({**json.loads(ckpt["config"]), "device": "cuda"})
        torch.save(ckpt, tmp_path / "run" / "last.pt")
        with pytest.raises(ConfigError, match="the device this run was started on, read from its checkpoint; give "
                                              "--device"):
            train(TrainConfig(steps=5, **common), explicit={"out", "steps", "resume", "progress", "threads"})


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path, data_dir, capsys):
    """A second `--resume` of a live run, or two new runs given one `--out`, must not interleave checkpoints."""
    train(_cfg(tmp_path, data_dir, "run", steps=2))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(120)"), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--no-progress"]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"dlsr-search train: error: {tmp_path / 'run'} is in use by another run" in err, err
        assert (tmp_path / "run" / "last.pt").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    # the holder's death releases the lock (nothing stale is left to clean up): the resume now runs
    assert train(_cfg(tmp_path, data_dir, "run", steps=4, resume=True)).resumed_from == 2

    # a new folder: the first run's lock refuses the second, which leaves nothing behind
    with RunFolderLock(tmp_path / "new"):
        with pytest.raises(ConfigError, match="in use by another run"):
            train(_cfg(tmp_path, data_dir, "new", steps=2))
    assert not (tmp_path / "new").exists()  # the lock's folder was empty, so it went with the lock
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):  # a run that fails before writing anything
        train(_cfg(tmp_path, tmp_path / "empty", "new2/a/b", steps=2))
    assert not (tmp_path / "new2").exists()  # nor the folders it made above its own


def _tiny_argv(out: Path, data: Path, *extra: str) -> list[str]:
    """`dlsr-search train` of a tiny network for 2 steps: what the option and failure tests run."""
    return ["train", "--out", str(out), "--data", str(data), "--steps", "2", "--no-progress", "--channels", "8",
            "--batch", "2", "--patch", "32", *extra]


def test_training_data_defaults_to_dlsr_data(tmp_path, data_dir, monkeypatch):
    """README: data defaults to $DLSR_DATA (folders joined by the path separator), else ../shared/data/train."""
    other = _copy_images(data_dir, tmp_path / "other")
    monkeypatch.setenv("DLSR_DATA", os.pathsep.join([str(data_dir), str(other)]))
    argv = [a for a in _tiny_argv(tmp_path / "run", data_dir) if a not in ("--data", str(data_dir))]
    assert cli_main(argv) == 0
    start = next(r for r in _records(tmp_path / "run") if r["event"] == "start")
    assert json.loads(start["config"])["data"] == [str(data_dir), str(other)]
    assert next(r for r in _records(tmp_path / "run") if r["event"] == "data")["images"] == 12


def _copy_images(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in list_images([src]):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("option,value,message", [
    ("--scale", "5", "--scale must be 2, 3 or 4, got 5"),
    ("--log-every", "0", "--log-every must be >= 1"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0"),
    ("--workers", "-1", "--workers must be >= 0"),
    ("--threads", "0", "--threads >= 1"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number >= 0"),
    ("--val-every", "-1", "--val-every and --val-holdout must be >= 0"),
    ("--val-max-images", "0", "--val-max-images >= 1"),
])
def test_nonsense_options_are_refused_before_anything_runs(tmp_path, data_dir, capsys, option, value, message):
    # These used to fail inside torch (Adam, the DataLoader) or, for --log-every 0, after the data had loaded.
    assert cli_main(_tiny_argv(tmp_path / "run", data_dir, option, value)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_export_path_that_is_a_file_is_refused_before_training(tmp_path, data_dir, capsys):
    (tmp_path / "afile.txt").write_text("keep")
    assert cli_main(_tiny_argv(tmp_path / "run", data_dir, "--export", str(tmp_path / "afile.txt"))) == 2
    assert "--export" in capsys.readouterr().err and (tmp_path / "afile.txt").read_text() == "keep"
    assert not (tmp_path / "run").exists()


def test_an_export_over_another_models_files_is_refused(tmp_path, data_dir, capsys):
    """Exporting into a folder that holds more than a model directory (a soup's soup.json, a bundled card's
    stages.json) would leave those describing the new weights: refused up front; an earlier export is
    replaced."""
    assert cli_main(_tiny_argv(tmp_path / "run", data_dir)) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "last.pt")
    assert cli_main(["export", ckpt, str(tmp_path / "exp")]) == 0
    assert cli_main(["export", ckpt, str(tmp_path / "exp")]) == 0  # an earlier export: replaced
    (tmp_path / "exp" / "soup.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in (tmp_path / "exp").iterdir()}
    assert cli_main(["export", ckpt, str(tmp_path / "exp")]) == 2
    assert "holds soup.json, which would stay beside the new weights" in capsys.readouterr().err
    assert cli_main(_tiny_argv(tmp_path / "run2", data_dir, "--export", str(tmp_path / "exp"))) == 2
    assert "--export" in capsys.readouterr().err and not (tmp_path / "run2").exists()
    assert {f.name: f.read_bytes() for f in (tmp_path / "exp").iterdir()} == before
    (tmp_path / "exp" / ".model.safetensors.x1y2.partial").write_bytes(b"")  # a killed export's temp file
    (tmp_path / "exp" / "soup.json").unlink()
    assert cli_main(["export", ckpt, str(tmp_path / "exp")]) == 0
    # the run's own folder, or a folder inside it (its best/): the export would overwrite the run's
    # config.json or copy best/ onto itself, after the whole training
    for target in ("run3", "run3/best", "run3/best/x"):
        assert cli_main(_tiny_argv(tmp_path / "run3", data_dir, "--export", str(tmp_path / target))) == 2
        assert "is the run folder" in capsys.readouterr().err and not (tmp_path / "run3").exists()
    # the same through `export`: a run's checkpoint onto its own best/ or run folder
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for target in ("run/best", "run"):
        assert cli_main(["export", ckpt, str(tmp_path / target)]) == 2
        assert "its run folder or that run's best/" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_an_unreadable_validation_image_is_named_as_one(tmp_path, data_dir, capsys):
    """It was reported as 'every image in the data folders is used': the training data, not --val."""
    from dlsr_infer.imageio import encode_png16

    val = write_images(tmp_path / "val", n=1, size=48, seed=5)
    (val / "deep.png").write_bytes(encode_png16(np.zeros((48, 48, 3), dtype=np.uint16)))
    assert cli_main(_tiny_argv(tmp_path / "run", data_dir, "--val", str(val))) == 2
    err = capsys.readouterr().err
    assert "deep.png" in err and "every image in the validation set (--val, or the held-out images) is used" in err


def test_a_device_this_machine_cannot_run_is_a_usage_error(tmp_path, data_dir, capsys):
    devices = ["bogus", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert cli_main(_tiny_argv(tmp_path / "run", data_dir, "--device", device)) == 2
        err = capsys.readouterr().err
        assert "dlsr-search train: error: --device: " in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_where_a_model_goes_and_a_file_as_out_are_named(tmp_path, data_dir, capsys):
    """A run folder as --init-from/--teacher/--genotype failed as 'not a valid safetensors file' or 'unknown
    genotype format_version'; a file as --out as '[Errno 17] File exists (the last checkpoint is intact;
    fix this and --resume)', with no checkpoint anywhere."""
    assert cli_main(_tiny_argv(tmp_path / "run", data_dir)) == 0
    capsys.readouterr()
    for option in ("--init-from", "--teacher", "--genotype"):
        assert cli_main(_tiny_argv(tmp_path / "new", data_dir, option, str(tmp_path / "run"))) == 2
        err = capsys.readouterr().err
        assert f"{option} {tmp_path / 'run'} is a dlsr-search run folder, not a model: give" in err, err
    (tmp_path / "afile").write_text("keep")
    for out in ("afile", "afile/sub"):
        assert cli_main(_tiny_argv(tmp_path / out, data_dir)) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'afile'} is a file, not a folder" in err and "checkpoint is intact" not in err, err
    assert (tmp_path / "afile").read_text() == "keep" and not (tmp_path / "new").exists()


def test_search_checks_the_shared_options_too(tmp_path, data_dir, capsys):
    for option, value in (("--halve-every", "0"), ("--lr", "0"), ("--steps", "-5"), ("--arch-lr", "-1")):
        argv = ["search", "--out", str(tmp_path / "s"), "--data", str(data_dir), "--no-progress", option, value]
        assert cli_main(argv) == 2, option
        assert "dlsr-search search: error: --" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_unreadable_image_or_a_missing_init_model_is_a_clean_error(tmp_path, data_dir, capsys):
    bad = _copy_images(data_dir, tmp_path / "bad")
    (bad / "zz.png").write_bytes(b"x")
    assert cli_main(_tiny_argv(tmp_path / "run", bad)) == 2
    assert f"{bad / 'zz.png'}: cannot read the image" in capsys.readouterr().err
    assert cli_main(_tiny_argv(tmp_path / "run2", data_dir, "--init-from", str(tmp_path / "nothere"))) == 2
    assert "dlsr-search train: error: no model directory at" in capsys.readouterr().err


def test_a_start_that_fails_on_its_data_writes_no_history(tmp_path, data_dir, capsys):
    """A run that cannot load its data leaves neither a new folder nor config.json / start / resume records
    (a model card made from the folder would otherwise quote the failed command)."""
    bad = _copy_images(data_dir, tmp_path / "data")
    assert cli_main(_tiny_argv(tmp_path / "run", bad)) == 0
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("config.json", "log.jsonl", "last.pt")}
    (bad / "zz.png").write_bytes(b"x")
    assert cli_main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--ema", "0.9",
                     "--no-progress"]) == 2
    assert "zz.png: cannot read the image" in capsys.readouterr().err
    assert {f: (tmp_path / "run" / f).read_bytes() for f in before} == before
    assert cli_main(_tiny_argv(tmp_path / "new", bad)) == 2
    assert not (tmp_path / "new").exists()


def test_a_model_directory_is_never_taken_for_a_run_folder(tmp_path, data_dir, capsys):
    # `--out weights/dlsr-x2` (meaning --export or --init-from) used to overwrite the model's config.json.
    model_dir = DLSR(builtin("dlsr_s_x2")).save_pretrained(tmp_path / "model")
    before = {f.name: f.read_bytes() for f in model_dir.iterdir()}
    for resume in ([], ["--resume"]):
        assert cli_main(_tiny_argv(model_dir, data_dir, *resume)) == 2
        assert "is a model directory (it holds model.safetensors), not a run folder" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in model_dir.iterdir()} == before


def _poison_adam(monkeypatch, at_call: int) -> None:
    """Adam's `at_call`-th step (counted from now) fills the first parameter with NaN."""
    real = torch.optim.Adam.step
    calls = [0]

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls[0] += 1
        if calls[0] == at_call:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)


def test_a_diverged_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    train(_cfg(tmp_path, data_dir, "run", steps=4, ckpt_every=2))
    good = load_checkpoint(tmp_path / "run" / "last.pt", kind="train")
    assert good["step"] == 4

    _poison_adam(monkeypatch, at_call=2)  # the weights blow up on the 2nd step after the resume
    argv = ["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "10", "--no-progress"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "the loss or the weights are no longer finite at step 6" in err, err
    assert f"{tmp_path / 'run' / 'last.pt'} (step 4) is left as it was" in err
    kept = load_checkpoint(tmp_path / "run" / "last.pt", kind="train")
    assert kept["step"] == 4 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert _records(tmp_path / "run")[-1]["event"] == "diverged"


def test_nan_weights_never_reach_best_and_a_nan_output_never_scores(tmp_path, data_dir, monkeypatch, capsys):
    """A NaN network gives a black image, which scores a finite PSNR-Y: best/ kept such weights when the
    weights diverged between log steps. Validation now checks the weights first (and a non-finite output
    scores NaN, never "best")."""
    val = write_images(tmp_path / "val", n=2, size=48, seed=5)
    _poison_adam(monkeypatch, at_call=3)  # the weights blow up at step 3, between log steps (every 100)
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(data_dir), "--val", str(val), "--val-every", "3",
            "--log-every", "100", "--channels", "8", "--batch", "2", "--patch", "32", "--steps", "10",
            "--threads", "1", "--no-progress"]
    assert cli_main(argv) == 1
    assert "no longer finite at step 3" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best").exists()
    assert [r["event"] for r in _records(tmp_path / "run")][-1] == "diverged"

    model = DLSR(builtin("dlsr_x2").replace(channels=8))
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    assert math.isnan(ValidationSet.from_folder(str(val), 2).psnr(model, torch.device("cpu")))


def test_lr_cache_is_keyed_on_the_pixels_not_the_path_or_time(tmp_path, data_dir, monkeypatch):
    """`--lr-cache` serves a copy of the data under another path and mtime (a re-provisioned data folder)
    without recomputing or adding entries, and an edited image gets a fresh LR."""
    import shutil

    import dlsr_infer.evaluate as ev
    from PIL import Image

    cache = tmp_path / "cache"
    first, _ = load_pairs(list_images([data_dir]), 2, min_lr_size=16, cache_dir=cache)
    entries = sorted((cache / "X2").iterdir())
    assert len(entries) == len(first) == 6

    copy = shutil.copytree(data_dir, tmp_path / "copy")
    for f in copy.iterdir():
        os.utime(f, (time.time() + 100, time.time() + 100))

    def no_resize(*a, **k):
        raise AssertionError("the LR was recomputed, not read from the cache")

    monkeypatch.setattr(ev, "imresize", no_resize)
    again, _ = load_pairs(list_images([copy]), 2, min_lr_size=16, cache_dir=cache)
    assert sorted((cache / "X2").iterdir()) == entries
    assert [p.name for p in again] == [p.name for p in first]
    assert all(np.array_equal(a.lr, b.lr) and np.array_equal(a.hr, b.hr) for a, b in zip(first, again))
    monkeypatch.undo()

    edited = np.array(Image.open(copy / "img0.png"))
    edited[:8, :8] = 255 - edited[:8, :8]
    Image.fromarray(edited).save(copy / "img0.png")
    third, _ = load_pairs(list_images([copy]), 2, min_lr_size=16, cache_dir=cache)
    assert len(list((cache / "X2").iterdir())) == 7
    assert not np.array_equal(third[0].lr, first[0].lr) and np.array_equal(third[1].lr, first[1].lr)


def test_patch_stream_is_a_pure_function_of_the_sample_index(data_dir):
    files = list_images([data_dir])
    pairs, skipped = load_pairs(files, 2, min_lr_size=16)
    assert not skipped
    a, b = PatchDataset(pairs, 2, 16, seed=3), PatchDataset(pairs, 2, 16, seed=3)
    for k in (0, 5, 17, 3, 1000):
        la, ha = a[k]
        lb, hb = b[k]
        assert torch.equal(la, lb) and torch.equal(ha, hb)
        assert la.shape == (3, 16, 16) and ha.shape == (3, 32, 32)
    assert not torch.equal(a[0][0], PatchDataset(pairs, 2, 16, seed=4)[0][0])
    assert not torch.equal(a[0][0], PatchDataset(pairs, 2, 16, seed=3, stream=1)[0][0])
    # every image appears once per pass over the images
    n = len(pairs)
    assert sorted(a.image_index(k) for k in range(n, 2 * n)) == list(range(n))
    # DataLoader workers change nothing: batch t is the same with 0 or 2 workers, from any start step
    from dlsr_search.data import patch_loader

    plain = list(patch_loader(a, 3, start_step=2, end_step=5))
    forked = list(patch_loader(a, 3, start_step=2, end_step=5, workers=2))
    late = list(patch_loader(a, 3, start_step=4, end_step=5))
    assert len(plain) == 3 and all(torch.equal(p[0], f[0]) and torch.equal(p[1], f[1]) for p, f in zip(plain, forked))
    assert torch.equal(late[0][0], plain[2][0])
    # two ranks' shards of a step are disjoint and together are the single-process step
    assert step_indices(7, 2, 0, 2) + step_indices(7, 2, 1, 2) == step_indices(7, 4)
    # splits are by whole image and reproducible
    tr, va = split_by_image(files, 2, seed=0)
    assert len(va) == 2 and not set(tr) & set(va) and split_by_image(files, 2, seed=0) == (tr, va)


def test_cli_help_for_every_subcommand(capsys):
    for sub in ("train", "search", "export", "eval"):
        with pytest.raises(SystemExit) as e:
            cli_main([sub, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--resume" in text and "--init-from" in text and "--warmup" in text
    assert "usage: dlsr-search eval " in text and "usage: dlsr-eval" not in text
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert cli_main(["train", "--out", "/nonexistent/x", "--data", "/nonexistent/data"]) == 2


def test_exporting_a_checkpoint_of_no_known_kind_is_a_clean_error(tmp_path, capsys):
    from dlsr_search.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save

    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "weird", "step": 1}, tmp_path / "odd.pt")
    assert cli_main(["export", str(tmp_path / "odd.pt"), str(tmp_path / "out")]) == 2  # was a traceback
    assert "is a 'weird' checkpoint; only 'train' checkpoints hold a network" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "run").mkdir()
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "weird", "step": 1}, tmp_path / "run" / "last.pt")
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2  # a run folder: was "not found"
    assert f"{tmp_path / 'run'} is a folder, not a checkpoint; give {tmp_path / 'run' / 'last.pt'}" in \
        capsys.readouterr().err


def test_a_resume_after_the_training_images_changed(tmp_path):
    """The held-out split and the patches are drawn by image index: images added to the data folder since
    the checkpoint would move images between the weights' data and the held-out validation. Refused with a
    split; without one the run goes on, and its log says why it is not an uninterrupted run's replay."""
    import shutil

    data = write_images(tmp_path / "data", n=6)
    train(_cfg(tmp_path, data, "plain", steps=2))
    train(_cfg(tmp_path, data, "held", steps=2, val_holdout=2, val_every=2))
    assert load_checkpoint(tmp_path / "plain" / "last.pt")["images"]["count"] == 6
    resumed = train(_cfg(tmp_path, data, "plain", steps=3, resume=True), explicit={"steps", "resume"})
    assert resumed.step == 3 and "data_changed" not in [r["event"] for r in _records(tmp_path / "plain")]
    write_images(tmp_path / "extra", n=1, seed=9)
    shutil.copy(tmp_path / "extra" / "img0.png", data / "img_zzz.png")
    before = (tmp_path / "held" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"the training images changed since the checkpoint was written \(6 then, 7 "
                                          r"now\): its held-out split would move images"):
        train(_cfg(tmp_path, data, "held", steps=4, val_holdout=2, val_every=2, resume=True))
    assert (tmp_path / "held" / "last.pt").read_bytes() == before
    resumed = train(_cfg(tmp_path, data, "plain", steps=4, resume=True), explicit={"steps", "resume"})
    assert resumed.step == 4
    (changed,) = [r for r in _records(tmp_path / "plain") if r["event"] == "data_changed"]
    assert changed["step"] == 3 and "(6 then, 7 now): the run goes on with them" in changed["note"]

    # the record is of paths within the data folders: a copy elsewhere is the same list, a rename is not
    from dlsr_search.runtime import check_resumed_images, image_list

    copy = shutil.copytree(data, tmp_path / "gpu" / "dlsr_data")
    assert image_list(list_images([data]), [data]) == image_list(list_images([copy]), [str(copy)])
    (copy / "img_zzz.png").rename(copy / "img_yyy.png")
    with pytest.raises(ConfigError, match=r"as many \(7\), but not the same names"):
        check_resumed_images({"images": image_list(list_images([data]), [data])},
                             image_list(list_images([copy]), [copy]), held_out=True)


def test_data_scales_add_shrunk_copies_of_each_image_cached_and_refused_when_nonsense(tmp_path, data_dir,
                                                                                       monkeypatch, capsys):
    """`--data-scales 0.5`: each image also trains as a copy shrunk by MATLAB-style bicubic (its own HR, its
    LR made from it), right after its source; copies too small for the LR patch are left out; the copies
    are cached like the LR, and the card's command carries the option back."""
    import dataclasses
    import shlex

    import dlsr_search.data as data_mod
    from dlsr_infer.evaluate import load_rgb
    from dlsr_infer.imresize import imresize, modcrop
    from dlsr_search.cli import _parser
    from dlsr_search.modelcard import _patch_note, command_line

    files = list_images([data_dir])
    cache = tmp_path / "cache"
    plain, _ = load_pairs(files, 2, min_lr_size=16)
    pairs, skipped = load_pairs(files, 2, min_lr_size=16, cache_dir=cache, downscales=(0.5, 0.1))
    assert not skipped and len(pairs) == 2 * len(plain)  # every 0.5 copy fits a 16 px LR; no 0.1 copy does
    both, _ = load_pairs(files[:1], 2, min_lr_size=8, cache_dir=cache, downscales=(0.5, 0.4))
    assert [p.shrunk_by for p in both] == [1.0, 0.5, 0.4] and both[1].hr.shape != both[2].hr.shape
    assert np.array_equal(both[1].hr, pairs[1].hr) and len(list((cache / "down").iterdir())) == len(plain) + 1
    assert [p.name for p in pairs[:2]] == [plain[0].name, plain[0].name.replace(".png", "@0.5.png")]
    src, copy = pairs[0], pairs[1]
    assert np.array_equal(src.hr, plain[0].hr) and src.shrunk_by == 1.0 and copy.shrunk_by == 0.5
    expected = modcrop(imresize(load_rgb(files[0]), 0.5), 2)
    assert np.array_equal(copy.hr, expected) and np.array_equal(copy.lr, imresize(expected, 0.5))

    def no_resize(*a, **k):
        raise AssertionError("a copy or its LR was remade, not read from the cache")

    monkeypatch.setattr(data_mod, "imresize", no_resize)
    monkeypatch.setattr("dlsr_infer.evaluate.imresize", no_resize)
    again, _ = load_pairs(files, 2, min_lr_size=16, cache_dir=cache, downscales=(0.5, 0.1))
    assert all(np.array_equal(a.hr, b.hr) and np.array_equal(a.lr, b.lr) for a, b in zip(pairs, again))
    monkeypatch.undo()

    assert cli_main(_tiny_argv(tmp_path / "run", data_dir, "--data-scales", "0.5")) == 0
    records = _records(tmp_path / "run")
    data = next(r for r in records if r["event"] == "data")
    assert (data["images"], data["copies"]) == (12, 6)
    assert ("12 training images (0 too small for 16 px LR patches), 6 of them shrunk copies (--data-scales; "
            "0 copies too small)") in capsys.readouterr().out
    config = json.loads(next(r for r in records if r["event"] == "start")["config"])
    assert config["data_scales"] == [0.5]
    assert _patch_note(config, records) == "HR patch 32 (12 images large enough: 6 of them copies shrunk by 0.5)"
    older = [{k: v for k, v in r.items() if k != "copies"} for r in records]  # logged before copies were counted
    assert _patch_note(config, older) == "HR patch 32 (12 images large enough, with copies shrunk by 0.5)"
    for scales in ([0.5, 0.75], []):
        cfg = dataclasses.asdict(TrainConfig(out="runs/a", data_scales=scales))
        args = vars(_parser().parse_args(shlex.split(command_line(cfg))[1:]))
        assert (args["data_scales"] or []) == scales

    # a tuple from the Python API is the list the saved (JSON) config holds: a resume is not refused for it
    from dlsr_search.config import merge_for_resume

    saved = TrainConfig(out="r", data_scales=[0.5])
    assert merge_for_resume(saved, TrainConfig(out="r", data_scales=(0.5,)), {"data_scales"}).data_scales == [0.5]
    with pytest.raises(ConfigError, match="data_scales"):  # another factor still is
        merge_for_resume(saved, TrainConfig(out="r", data_scales=(0.75,)), {"data_scales"})

    for value, message in ((["1.5"], "between 0 and 1"), (["0"], "between 0 and 1"), (["nan"], "between 0 and 1"),
                           (["0.5", "0.5"], "given twice"), (["0.5", "0.5000001"], "given twice")):
        assert cli_main(_tiny_argv(tmp_path / "bad", data_dir, "--data-scales", *value)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
