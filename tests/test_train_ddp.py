"""`torchrun --nproc_per_node=2` (gloo, CPU) runs the retrain (equal to the single-process run) and the search."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dlsr_infer.genotype import loads
from dlsr_search import distributed
from dlsr_search.checkpoint import load_checkpoint
from dlsr_search.synthetic import write_images
from dlsr_search.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


# Each rank runs the CLI, then fails if gloo's threads outlived the process group: left running into
# interpreter shutdown they now and then aborted a finished run (SIGABRT, "terminate called without an
# active exception"), which made torchrun report a failure for a run that had written everything.
RANK_MAIN = """
import os, sys
from dlsr_search.cli import main
code = main(sys.argv[1:])
tasks = "/proc/self/task"
if os.path.isdir(tasks):
    names = []
    for t in os.listdir(tasks):
        try:
            names.append(open(os.path.join(tasks, t, "comm")).read().strip())
        except OSError:
            pass
    left = [n for n in names if "gloo" in n]
    if left:
        sys.exit(f"rank {os.environ['RANK']}: gloo threads still running after the run: {left}")
sys.exit(code)
"""


def torchrun(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_MAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes_train_like_one(tmp_path):
    data = write_images(tmp_path / "imgs")
    common = dict(data=[str(data)], channels=8, batch=4, patch=32, steps=4, log_every=2, val_every=0, threads=1)
    done = torchrun(["train", "--out", str(tmp_path / "ddp"), "--data", str(data), "--channels", "8", "--batch", "4",
                     "--patch", "32", "--steps", "4", "--log-every", "2", "--val-every", "0", "--threads", "1",
                     "--no-progress", "--export", str(tmp_path / "export")], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "cpu x2" in done.stdout + done.stderr
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt", kind="train")
    assert ddp["step"] == 4 and ddp["world"] == 2
    assert (tmp_path / "export" / "model.safetensors").is_file()

    # the two ranks' half-batches are exactly the single process's batch, and gradients are averaged:
    # the runs agree up to float summation order
    train(TrainConfig(out=str(tmp_path / "single"), progress=False, **common))
    single = load_checkpoint(tmp_path / "single" / "last.pt", kind="train")
    for k, v in single["model"].items():
        assert torch.allclose(ddp["model"][k], v, rtol=1e-4, atol=1e-5), k


def test_torchrun_two_processes_search(tmp_path):
    data = write_images(tmp_path / "imgs", n=8)
    out = tmp_path / "search"
    done = torchrun(["search", "--out", str(out), "--data", str(data), "--channels", "8", "--cells", "3",
                     "--batch", "4", "--patch", "32", "--steps", "6", "--warmup", "2", "--val-holdout", "2",
                     "--log-every", "2", "--snapshot-every", "3", "--threads", "1", "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt", kind="search")
    assert ckpt["step"] == 6 and ckpt["world"] == 2
    assert ckpt["model"]["alphas"].abs().max() > 1e-3  # the architecture was trained after the warm-up
    loads((out / "genotype.json").read_text())
    phases = [json.loads(line).get("phase") for line in (out / "log.jsonl").read_text().splitlines()]
    assert [p for p in phases if p] == ["warm-up", "search", "search"]
    # only rank 0 wrote: one start record
    assert sum('"event": "start"' in line for line in (out / "log.jsonl").read_text().splitlines()) == 1


def test_one_process_on_cuda_gets_device_index_0(monkeypatch):
    """The single-process CUDA branch of setup() names cuda:0 (the trainer moves its model there). It runs
    on no CPU-only machine unless pick_device is stubbed: a function-local `import torch._dynamo` in setup()
    once made `torch` a local name there, and the first CUDA training run died with UnboundLocalError."""
    monkeypatch.setattr(distributed, "pick_device", lambda name: torch.device("cuda"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.setup("auto")
    assert info.device == torch.device("cuda", 0) and not info.enabled
