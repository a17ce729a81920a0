"""Reliability, faults (issue 7, item 4): atomic outputs and checkpoints, disk full, interrupts, SIGKILL.

Already covered elsewhere and not repeated: `test_imageio.py` (a failing/interrupted `atomic_write`
leaves nothing, no-clobber is atomic), `test_cli.py` (fsync failing with ENOSPC, Ctrl-C while writing,
SIGINT and SIGKILL of a real run while writing), `test_train.py` (one SIGKILL right after the first
checkpoint, then resume == uninterrupted). This file adds: the order of the durable-write steps, disk
full *in the middle of* writing (fault-injected, and for real on a tiny tmpfs when mounting is
allowed), cleanup of the temporary files a SIGKILL leaves behind, Ctrl-C outside the write and
SIGTERM, and a real training process interrupted four times at random moments (SIGKILL by step, SIGKILL
in the middle of writing a checkpoint, SIGKILL at a random time, SIGINT) that resumes to weights
identical to an uninterrupted run's. Set DLSR_FAULT_SEED to replay the random moments of a failure.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dlsr_infer.upscaling as upscaling
from conftest import (HAS_PROC, lively_model, start_stuck_cli_run, tiny_genotype, time_limit, write_image as image,
                      write_image_folder)
from dlsr_infer.cli import main as cli_main
from dlsr_infer.imageio import atomic_write, load_image, remove_stale_temps, save_image
from dlsr_infer.upscaling import upscale_file
from dlsr_search.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from dlsr_search.cli import main as search_main
from dlsr_search.synthetic import write_images

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT = 120
SEED = int(os.environ.get("DLSR_FAULT_SEED", time.time_ns() % 2**31))


@pytest.fixture(autouse=True)
def _no_hang():
    with time_limit(TIME_LIMIT):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny (8 channels, 2 cells) random-weight x2 model directory whose output is image-like."""
    return lively_model(tiny_genotype()).save_pretrained(tmp_path_factory.mktemp("model") / "tiny-x2")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "in")


def listing(d: Path) -> list[str]:
    """Every entry of a folder, hidden temporary files included."""
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


# --- the durable-write protocol ----------------------------------------------------------------------
def _trace_writes(monkeypatch) -> list[tuple[str, str]]:
    """Record fsync / replace / link calls, naming what they act on."""
    calls: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link")}

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def replace(src, dst, *a, **k):
        calls.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        return real["replace"](src, dst, *a, **k)

    def link(src, dst, *a, **k):
        calls.append(("link", f"{Path(src).name} -> {Path(dst).name}"))
        return real["link"](src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return calls


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to name the fsynced files")
def test_outputs_and_checkpoints_are_written_temp_fsync_rename_fsync_dir(tmp_path: Path, monkeypatch) -> None:
    calls = _trace_writes(monkeypatch)
    data = load_image(image(tmp_path / "src.png"))
    save_image(data, tmp_path / "out.png")
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "link", "fsync"], calls  # new file: hard link, which never clobbers
    assert calls[0][1].startswith(str(tmp_path / ".out.png.")) and calls[0][1].endswith(".partial")
    assert calls[1][1].endswith("-> out.png") and calls[2][1] == str(tmp_path)  # then the folder itself

    calls.clear()
    save_image(data, tmp_path / "out.png", overwrite=True)
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"], calls
    assert calls[1][1].startswith(".out.png.") and calls[1][1].endswith(".partial -> out.png")

    calls.clear()
    atomic_torch_save({"format": 1, "step": 3}, tmp_path / "run" / "last.pt")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"], calls
    assert calls[0][1].startswith(str(tmp_path / "run" / ".last.pt.")) and calls[0][1].endswith(".tmp")
    assert calls[1][1].endswith(".tmp -> last.pt") and calls[2][1] == str(tmp_path / "run")
    assert listing(tmp_path / "run") == ["last.pt"]


# --- disk full ----------------------------------------------------------------------------------------
class _FillingDisk:
    """A file object that takes `room` more bytes and then fails like a full disk (ENOSPC)."""

    def __init__(self, f, room: int, log: list[int]) -> None:
        self.f, self.room, self.log = f, room, log

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        if len(b) > self.room:
            if self.room >= 0:  # the first failure: note what is on disk (later writes fail too)
                self.f.write(b[:self.room])
                self.f.flush()
                self.log.append(os.fstat(self.f.fileno()).st_size)
                self.room = -1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fill_disk_on(monkeypatch, suffix: str, room: int, which: set[int] | None = None) -> list[int]:
    """Make the temporary files (`suffix`) that os.fdopen opens fail after `room` bytes; only the n-th
    ones (1-based) in `which` when given. Returns the sizes on disk at each failure."""
    real = os.fdopen
    failed: list[int] = []
    seen = [0]

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        if HAS_PROC and not os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            return f
        seen[0] += 1
        return _FillingDisk(f, room, failed) if which is None or seen[0] in which else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return failed


def test_disk_full_midway_through_an_output_leaves_no_partial_file(tmp_path: Path, model_dir: Path,
                                                                   monkeypatch) -> None:
    src = image(tmp_path / "in.png", 40, 40)
    failed = _fill_disk_on(monkeypatch, ".partial", room=1000)
    with pytest.raises(OSError) as e:
        upscale_file(src, tmp_path / "out.png", model=str(model_dir))
    assert e.value.errno == errno.ENOSPC and failed == [1000]  # it failed half-way, 1000 bytes written
    assert listing(tmp_path) == ["in.png"]  # no output, no temporary file

    (tmp_path / "out.png").write_bytes(b"the previous output")
    with pytest.raises(OSError):
        upscale_file(src, tmp_path / "out.png", model=str(model_dir), overwrite=True)
    assert (tmp_path / "out.png").read_bytes() == b"the previous output"  # untouched
    assert listing(tmp_path) == ["in.png", "out.png"]


def test_disk_full_in_the_middle_of_a_batch(capsys, folder: Path, model_dir: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    """The second of three outputs hits a full disk half-way: it alone fails, the others are whole."""
    failed = _fill_disk_on(monkeypatch, ".partial", room=700, which={2})
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, folder / "a.png", folder / "b.jpg", folder / "c.png", "-o", out_dir,
                           "--model", model_dir)
    assert rc == 1 and failed == [700]
    assert f"FAILED {folder / 'b.jpg'}: OSError: [Errno 28] No space left on device" in err
    assert "2 of 3 image(s) upscaled" in out and "1 failed" in out
    assert listing(out_dir) == ["a.png", "c.png"]
    assert load_image(out_dir / "a.png").pixels.shape == (48, 60, 3)
    assert load_image(out_dir / "c.png").pixels.shape == (32, 34, 3)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"format": 1, "kind": "train", "step": 1, "w": torch.arange(10.0)}, path)
    failed = _fill_disk_on(monkeypatch, ".tmp", room=300)
    with pytest.raises(OSError) as e:
        atomic_torch_save({"format": 1, "kind": "train", "step": 2, "w": torch.zeros(100_000)}, path)
    assert e.value.errno == errno.ENOSPC and failed == [300]
    assert listing(tmp_path) == ["last.pt"]
    ckpt = load_checkpoint(path, kind="train")
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(10.0))


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 64 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_really_full_disk(capsys, tiny_disk: Path, model_dir: Path, tmp_path: Path) -> None:
    """small -> fits; big (~120 KB of PNG) -> ENOSPC part-way on a real filesystem; small2 -> still fits,
    which it would not if big's partial file had been left behind."""
    src = tmp_path / "src"
    image(src / "1_small.png", 16, 16, seed=1)
    image(src / "2_big.png", 150, 150, seed=2)  # its output is a ~300 KB PNG
    image(src / "3_small.png", 16, 16, seed=3)
    rc, out, err = run_cli(capsys, src, "-o", tiny_disk, "--model", model_dir)
    assert rc == 1, err
    assert "2_big.png: OSError: [Errno 28] No space left on device" in err
    assert listing(tiny_disk) == ["1_small.png", "3_small.png"]
    assert load_image(tiny_disk / "3_small.png").pixels.shape == (32, 32, 3)


# --- stale temporary files after SIGKILL ------------------------------------------------------------------
def _age(path: Path, seconds: float = 3600) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_cli_removes_its_own_stale_temporary_files_and_nothing_else(capsys, folder: Path, model_dir: Path,
                                                                     tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in (".a.png.k3x_9qzt.partial", ".c.png.00000000.partial"):  # left by a killed run
        (out_dir / name).write_bytes(b"\x89PNG half an image")
        _age(out_dir / name)
    keep = {
        ".a.png.partial": 1,              # not our pattern (no random part)
        ".a.png.abc.partial": 1,          # random part of the wrong length
        ".other.png.abcdefgh.partial": 1,  # not an output of this run
        ".a.png.abcdefgh.partial.bak": 1,  # not our suffix
        "a.png.abcdefgh.partial": 1,       # not hidden
        ".c.png.youngone.partial": 0,      # too recent: could be another process that just started writing
    }
    for name, old in keep.items():
        (out_dir / name).write_bytes(b"x")
        if old:
            _age(out_dir / name)
    rc, out, err = run_cli(capsys, folder / "a.png", folder / "c.png", "-o", out_dir, "--model", model_dir)
    assert rc == 0, err
    assert f"removed 2 temporary file(s) left in {out_dir} by an interrupted run" in err
    assert listing(out_dir) == sorted(["a.png", "c.png", *keep])


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to spot the file being written")
def test_a_live_writers_temporary_file_is_never_taken_for_stale(tmp_path: Path) -> None:
    import fcntl

    target = tmp_path / "x.png"
    seen: list[Path] = []

    def write(f) -> None:
        tmp = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        _age(tmp)  # looks old, but its writer is alive and holds its lock
        assert remove_stale_temps(tmp_path, min_age=0) == [] and tmp.exists()
        seen.append(tmp)
        f.write(b"data")

    atomic_write(target, write)
    assert target.read_bytes() == b"data" and not seen[0].exists()
    # an unlocked leftover is removed; one locked by another open file description is not
    left = tmp_path / ".y.png.abcdefgh.partial"
    left.write_bytes(b"x")
    fd = os.open(left, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert remove_stale_temps(tmp_path, ["y.png"], min_age=0) == []
    os.close(fd)
    assert remove_stale_temps(tmp_path, ["y.png"], min_age=0) == [left] and not left.exists()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to spot the file being written")
def test_after_sigkill_the_next_run_removes_the_leftover_and_finishes(capsys, folder: Path, model_dir: Path,
                                                                      tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc, partial = start_stuck_cli_run(folder, out_dir, model_dir)
    assert remove_stale_temps(out_dir, min_age=0) == []  # the live (stuck) writer still holds it
    proc.send_signal(signal.SIGKILL)  # nothing runs after this: no cleanup handler can help
    proc.communicate(timeout=30)
    # b never got its final name; a is whole; only b's hidden temporary file is left beside it
    assert listing(out_dir) == sorted(["a.png", partial.name])
    assert load_image(out_dir / "a.png").pixels.shape == (48, 60, 3)
    rc, out, err = run_cli(capsys, folder, "-o", out_dir, "--model", model_dir, "--skip-existing")
    assert rc == 0, err
    assert "removed" not in err  # a leftover younger than STALE_TEMP_MIN_AGE is left alone...
    _age(partial)
    (out_dir / "b.jpg").unlink()
    rc, out, err = run_cli(capsys, folder, "-o", out_dir, "--model", model_dir, "--skip-existing")
    assert rc == 0 and "removed 1 temporary file(s)" in err  # ...and removed once it is clearly stale
    assert listing(out_dir) == ["a.png", "b.jpg", "c.png"]
    assert load_image(out_dir / "b.jpg").pixels.shape == (48, 60, 3)


# --- interrupts ----------------------------------------------------------------------------------------
def test_ctrl_c_during_inference_stops_cleanly(capsys, monkeypatch, folder: Path, model_dir: Path,
                                               tmp_path: Path) -> None:
    real = upscaling.Upscaler.image_data
    calls = []

    def image_data(self, data, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second image runs through the network
        return real(self, data, **kw)

    monkeypatch.setattr(upscaling.Upscaler, "image_data", image_data)
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, folder / "a.png", folder / "b.jpg", folder / "c.png", "-o", out_dir,
                           "--model", model_dir)
    assert rc == 130
    assert "1 of 3 image(s) upscaled" in err and f"interrupted while on {folder / 'b.jpg'}; 1 not started" in err
    assert listing(out_dir) == ["a.png"]


def test_ctrl_c_while_loading_the_model(capsys, monkeypatch, folder: Path, model_dir: Path, tmp_path: Path) -> None:
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(upscaling.Upscaler, "__init__", interrupted)
    rc, out, err = run_cli(capsys, folder / "a.png", "-o", tmp_path / "out", "--model", model_dir)
    assert rc == 130 and "interrupted while loading the model; nothing written" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to spot the file being written")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_or_sigterm_in_a_real_process_exits_128_plus_n_and_cleans_up(sig, code, folder: Path, model_dir: Path,
                                                                          tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc, partial = start_stuck_cli_run(folder, out_dir, model_dir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "1 of 3 image(s) upscaled" in err and "interrupted while on" in err and "1 not started" in err
    assert listing(out_dir) == ["a.png"]  # b's temporary file is gone


# --- a training run killed at random moments ------------------------------------------------------------
STEPS, CKPT_EVERY = 40, 4


def _train_args(data: Path) -> list[str]:
    return ["--scale", "2", "--data", str(data), "--channels", "8", "--batch", "2", "--patch", "32",
            "--steps", str(STEPS), "--val-every", "0", "--log-every", "1", "--ckpt-every", str(CKPT_EVERY),
            "--threads", "1", "--lr", "1e-3", "--no-progress"]


def _records(out: Path) -> list[dict]:
    log = out / "log.jsonl"
    if not log.is_file():
        return []
    recs = []
    for line in log.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # pragma: no cover - a record torn by the kill
            pass
    return recs


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("train") / "imgs", n=4, size=48)


@pytest.fixture(scope="module")
def uninterrupted(train_data: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert search_main(["train", "--out", str(out), *_train_args(train_data)]) == 0
    return load_checkpoint(out / "last.pt", kind="train")


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]


_TORN_CHECKPOINT = """
import os, sys, time
real_fdopen = os.fdopen
checkpoints = []

class Stalling:
    def __init__(self, f):
        self.f = f
    def write(self, b):
        b = memoryview(b).cast("B")
        self.f.write(b[: len(b) // 2])  # half of the second checkpoint is on disk...
        self.f.flush()
        os.fsync(self.f.fileno())
        open(os.environ["DLSR_TORN_FLAG"], "w").close()
        time.sleep(300)  # ...when the process is killed
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    name = os.readlink(f"/proc/self/fd/{fd}")
    if "/.last.pt." in name and name.endswith(".tmp"):
        checkpoints.append(name)
        if len(checkpoints) == 2:
            return Stalling(f)
    return f

os.fdopen = fdopen
from dlsr_search.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to spot the checkpoint being written")
def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_result(train_data: Path, tmp_path: Path,
                                                                               uninterrupted: dict) -> None:
    rng = random.Random(SEED)
    why = f"(DLSR_FAULT_SEED={SEED})"
    out = tmp_path / "run"
    module_cmd = [sys.executable, "-m", "dlsr_search.cli", "train", "--out", str(out), "--resume",
                  *_train_args(train_data)]
    torn_cmd = [sys.executable, "-c", _TORN_CHECKPOINT, "train", "--out", str(out), "--resume",
                *_train_args(train_data)]

    flag = tmp_path / "torn"

    def last_step() -> int:
        """The step of the latest training record (the log is appended to in order, across runs)."""
        return ([0] + [r["step"] for r in _records(out) if r["event"] == "train"])[-1]

    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, env={**_env(), "DLSR_TORN_FLAG": str(flag)}, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(proc: subprocess.Popen, done, what: str) -> None:
        deadline = time.monotonic() + 90
        while not done():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{what}: {proc.communicate()[1][-2000:]} {why}")
            time.sleep(0.01)

    def check_after_interrupt(label: str) -> int | None:
        """The checkpoint on disk is whole and at most one interval behind the last finished step."""
        for tmp in out.glob(".last.pt.*.tmp"):  # a kill mid-save leaves one; pretend it was a while ago
            _age(tmp)
        if not (out / "last.pt").exists():
            assert last_step() <= CKPT_EVERY, (label, why)  # killed between step CKPT_EVERY and its save
            return None
        try:
            ckpt = load_checkpoint(out / "last.pt", kind="train")
        except CheckpointError as e:  # pragma: no cover - what this test exists to catch
            raise AssertionError(f"{label}: torn checkpoint: {e} {why}") from None
        lost = last_step() - int(ckpt["step"])
        assert 0 <= lost <= CKPT_EVERY, (label, ckpt["step"], last_step(), why)
        return int(ckpt["step"])

    resumed_at: list[int | None] = []

    # 1. SIGKILL right after a random training step
    target = rng.randint(1, 16)
    proc = start(module_cmd)
    wait_for(proc, lambda: last_step() >= target, f"run 1 never reached step {target}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    resumed_at.append(check_after_interrupt(f"SIGKILL after step {target}"))

    # 2. SIGKILL in the middle of writing a checkpoint (half of it on disk under the temp name)
    earlier = set(out.glob(".last.pt.*.tmp"))
    proc = start(torn_cmd)
    wait_for(proc, flag.exists, "run 2 never got to its second checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    torn = set(out.glob(".last.pt.*.tmp")) - earlier
    assert len(torn) == 1, why
    with pytest.raises(Exception):  # it really is a torn checkpoint...
        torch.load(torn.pop(), weights_only=True)
    resumed_at.append(check_after_interrupt("SIGKILL while writing a checkpoint"))  # ...and last.pt is whole

    # 3. SIGKILL at a random time (start-up, data loading, a step or a checkpoint: wherever it lands)
    delay = rng.uniform(0.2, 5.0)
    proc = start(module_cmd)
    try:
        proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    resumed_at.append(check_after_interrupt(f"SIGKILL after {delay:.2f} s"))

    # 4. SIGINT (Ctrl-C) after a random step: a clean stop that checkpoints where it stopped
    if last_step() < STEPS - 4:
        target = rng.randint(last_step() + 1, STEPS - 4)
        proc = start(module_cmd)
        wait_for(proc, lambda: last_step() >= target, f"run 4 never reached step {target}")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (stderr[-2000:], why)
        stop = [r for r in _records(out) if r["event"] == "stop"][-1]
        assert f"stopped at step {stop['step']} (signal); resume with --resume" in stdout, why
        assert check_after_interrupt("SIGINT") == stop["step"] == last_step(), why  # nothing lost
        resumed_at.append(stop["step"])

    # 5. resume to the end
    done = subprocess.run(module_cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stderr[-2000:], why)
    # every run resumed from the checkpoint the interruption before it left (a run killed before it got
    # that far has no resume record), and the last from the last one
    resumes = [r["step"] for r in _records(out) if r["event"] == "resume"]
    assert set(resumes) <= set(resumed_at) and resumes == sorted(resumes), (resumes, resumed_at, why)
    assert resumed_at[-1] is None or resumes[-1] == resumed_at[-1], (resumes, resumed_at, why)
    assert listing(out) == ["config.json", "last.pt", "log.jsonl"], why  # the torn temp file was cleaned up
    _assert_same_run(load_checkpoint(out / "last.pt", kind="train"), uninterrupted)


def test_training_that_hits_a_full_disk_while_checkpointing_resumes_exactly(train_data: Path, tmp_path: Path,
                                                                            monkeypatch, capsys,
                                                                            uninterrupted: dict) -> None:
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--resume", *_train_args(train_data)]
    with monkeypatch.context() as m:
        failed = _fill_disk_on(m, ".tmp", room=2000, which={3})  # the third checkpoint (step 12) fails
        assert search_main(args) == 1  # reported in one line (checked below), not a traceback
    assert failed == [2000]
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the last checkpoint is intact" in err, err
    assert listing(out) == ["config.json", "last.pt", "log.jsonl"]
    assert load_checkpoint(out / "last.pt", kind="train")["step"] == 2 * CKPT_EVERY
    assert search_main(args) == 0
    _assert_same_run(load_checkpoint(out / "last.pt", kind="train"), uninterrupted)
