"""benchmarks/gpu_session.sh, dry-run on the CPU: runs start, are stopped at the deadline with their
checkpoints written, are packed into $OUT, and a second session resumes them (slow: ~1 min)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dlsr_search.checkpoint import load_checkpoint
from dlsr_search.synthetic import write_images

REPO = Path(__file__).resolve().parents[1]


def _session(tmp_path: Path, out: Path, extra: str, names: str = "x2sg x4g", end: int = 12) -> str:
    env = {**os.environ, "OUT": str(out), "DATA": str(tmp_path / "data"), "VAL": str(tmp_path / "val"),
           "RUNS": str(tmp_path / "runs"), "WORK_DATA": str(tmp_path / "decoded"), "END": str(end), "PACK_EVERY": "5", "PY": sys.executable,
           "NAMES": names, "CHECKS": "0", "OMP_NUM_THREADS": "1",
           "EXTRA": f"--batch 2 --patch 64 --log-every 2 --val-every 4 --ckpt-every 4 --workers 0 --threads 1 {extra}"}
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_gpu_session_packs_its_runs_and_a_later_session_resumes_them(tmp_path):
    write_images(tmp_path / "data" / "a", n=4, size=80)
    write_images(tmp_path / "val", n=1, size=48, seed=3)
    first = _session(tmp_path, tmp_path / "out1", "")
    assert "stopping the runs" in first
    with tarfile.open(tmp_path / "out1" / "g2.tar") as tar:
        names = tar.getnames()
    assert {"x2sg/last.pt", "x2sg/log.jsonl", "x2sg.log"} <= set(names)
    assert (tmp_path / "out1" / "g4.tar").is_file() and not (tmp_path / "out1" / "g3.tar").exists()
    step1 = load_checkpoint(tmp_path / "runs" / "x2sg" / "last.pt", kind="train")["step"]
    assert step1 > 0

    _session(tmp_path, tmp_path / "out2", "--resume")
    log = (tmp_path / "runs" / "x2sg.log").read_text()
    assert f"resumed {tmp_path / 'runs' / 'x2sg'} at step {step1}" in log  # the console log is appended to
    assert load_checkpoint(tmp_path / "runs" / "x2sg" / "last.pt", kind="train")["step"] > step1


@pytest.mark.slow
def test_checks_only_call_unpacks_a_data_part_while_the_checks_run_and_trains_nothing(tmp_path):
    """Device call 1 of a session: the CUDA tests and benchmarks (here, on a CPU, they skip or fail and the
    script goes on), the first data part unpacked meanwhile and waited for, no DATA/VAL needed, no run."""
    write_images(tmp_path / "shared" / "data" / "train" / "T91", n=2, size=72)
    write_images(tmp_path / "shared" / "data" / "benchmarks" / "Set5" / "HR", n=1, size=48, seed=5)
    packed = subprocess.run([sys.executable, "benchmarks/gpu_data.py", "pack", str(tmp_path / "gpu"), "--shared",
                             str(tmp_path / "shared"), "--budget-mib", "1", "--jobs", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CHECKS_ONLY": "1", "UNPACK": str(tmp_path / "gpu" / "part1"),
           "UNPACK_TO": str(tmp_path / "unpacked"), "RUNS": str(tmp_path / "runs"), "PY": sys.executable,
           "OMP_NUM_THREADS": "1"}
    env.pop("DATA", None)
    env.pop("VAL", None)
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CUDA tests" in done.stdout and "done (checks only)" in done.stdout
    assert "unpacked" in done.stdout and "(exit 0)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "unpacked" / "train" / "T91").iterdir()) == ["img0.png", "img1.png"]
    assert "training data" not in done.stdout and not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_a_session_that_trains_refuses_an_incomplete_unpack_and_drops_stale_images(tmp_path):
    """With UNPACK= and no CHECKS_ONLY, one part of two was unpacked and the runs trained on it; and images an
    earlier copy left in WORK_DATA were trained on too."""
    write_images(tmp_path / "shared" / "data" / "train" / "T91", n=4, size=96)
    write_images(tmp_path / "shared" / "data" / "benchmarks" / "Set5" / "HR", n=1, size=48, seed=5)
    packed = subprocess.run([sys.executable, "benchmarks/gpu_data.py", "pack", str(tmp_path / "gpu"), "--shared",
                             str(tmp_path / "shared"), "--budget-mib", "0.03", "--jobs", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0 and (tmp_path / "gpu" / "part2").is_dir(), packed.stdout + packed.stderr
    env = {**os.environ, "OUT": str(tmp_path / "out"), "UNPACK": str(tmp_path / "gpu" / "part1"), "CHECKS": "0",
           "UNPACK_TO": str(tmp_path / "unpacked"), "DATA": str(tmp_path / "unpacked" / "train"),
           "VAL": str(tmp_path / "unpacked" / "Set5" / "HR"), "RUNS": str(tmp_path / "runs"), "PY": sys.executable,
           "OMP_NUM_THREADS": "1", "NAMES": "x2sg", "END": "5"}
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "the training data is incomplete: no training" in done.stdout, done.stdout
    assert "started x2sg" not in done.stdout and not any((tmp_path / "runs").iterdir())

    (tmp_path / "decoded" / "old").mkdir(parents=True)  # an earlier session's copy, on a warm machine
    (tmp_path / "decoded" / "old" / "stale.png").write_bytes(b"not this pack's")
    write_images(tmp_path / "data" / "a", n=2, size=80)
    write_images(tmp_path / "val", n=1, size=48, seed=3)
    _session(tmp_path, tmp_path / "out2", "", names="x2sg", end=3)
    assert not (tmp_path / "decoded" / "old").exists() and (tmp_path / "decoded" / "a" / "img0.png").is_file()


@pytest.mark.slow
def test_the_distilled_recipes_predict_with_their_teachers_and_pack_apart(tmp_path):
    """x4t / x2st (the default x4 run since distillation gained on the CPU): each run loads its bundled
    teacher, predicts the training images with its self-ensemble, trains, and lands in its own pack."""
    write_images(tmp_path / "data" / "a", n=2, size=96)
    write_images(tmp_path / "val", n=1, size=48, seed=3)
    # time for both full-size teachers' x8 predictions on a busy CPU before the deadline's SIGTERM
    _session(tmp_path, tmp_path / "out", "", names="x4t x2st", end=60)
    for name, teacher, pack in (("x4t", "weights/dlsr-x4", "g4t"), ("x2st", "weights/dlsr-x2", "g2t")):
        log = (tmp_path / "runs" / f"{name}.log").read_text()
        assert f"teacher: {teacher} (x8 self-ensemble)" in log and "2 images predicted" in log, log[-2000:]
        assert load_checkpoint(tmp_path / "runs" / name / "last.pt", kind="train")["step"] > 0
        with tarfile.open(tmp_path / "out" / f"{pack}.tar") as tar:
            assert {f"{name}/last.pt", f"{name}.log"} <= set(tar.getnames())
