"""Shared test fixtures: where the read-only shared material lives, and the `slow` marker."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# CI replays the same property-test examples every run (a red CI names a reproducible case); developers
# get fresh random examples each run, which is how new edge cases are found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")


def _shared_dir() -> Path:
    return Path(os.environ.get("DLSR_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (benchmarks, training data, authors' checkpoints).

    Missing shared material is a skip on a developer machine but a failure under CI (CI=true),
    so CI can never go green by silently skipping the evidence tests.
    """
    path = _shared_dir()
    if not path.is_dir():
        msg = f"shared material not found at {path} (set DLSR_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def benchmarks_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "benchmarks"


@pytest.fixture(scope="session")
def authors_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "dlsr-authors"


@pytest.fixture(autouse=True, scope="session")
def _keep_default_malloc():
    """`dlsr-upscale` tunes glibc malloc for its own process; run in-process by the tests it would change
    the test process for the rest of the session (memory tests included), so the tests opt out."""
    saved = os.environ.get("DLSR_TUNE_MALLOC")
    os.environ["DLSR_TUNE_MALLOC"] = "0"
    yield
    if saved is None:
        os.environ.pop("DLSR_TUNE_MALLOC", None)
    else:
        os.environ["DLSR_TUNE_MALLOC"] = saved


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the test session: the networks under test are tiny, and on a 2-core CI
    machine (or one shared with a training job) OpenMP barriers make them several times slower with more."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def lively_model(genotype="dlsr_s_x2", *, seed: int = 0, out_gain: float = 0.3):
    """A random-weight DLSR whose signals propagate through every cell and whose output is image-like.

    PyTorch's default init gives a network that barely looks past a couple of pixels and outputs near
    zero, which makes tiling, clamping and seam tests pass trivially; He-style weights (x0.7), small
    random biases and an upsampler centred on 0.5 behave like trained weights in those respects.
    """
    import math

    import torch
    from torch import nn

    from dlsr_infer import DLSR
    from dlsr_infer.genotype import Genotype, builtin

    torch.manual_seed(seed)
    model = DLSR(genotype if isinstance(genotype, Genotype) else builtin(genotype))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, 0.7 * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, 0.1)
        model.upsampler.conv.weight.mul_(out_gain)
        model.upsampler.conv.bias.mul_(out_gain).add_(0.5)
    return model.eval()


def tiny_genotype(*, scale: int = 2, channels: int = 8, cells: int = 2):
    """The paper's cell at a toy size, for tests that need a real but cheap network."""
    from dlsr_infer.genotype import Genotype, builtin

    spec = builtin("dlsr_s_x2").to_dict()
    spec.update(name="tiny", channels=channels, cells=spec["cells"][:cells], scale=scale)
    return Genotype.from_dict(spec)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail the code inside that runs past `seconds` (SIGALRM; no plugin needed): a hang fails the test
    instead of stalling the run."""
    if not hasattr(signal, "SIGALRM"):  # pragma: no cover - not POSIX
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"test ran for more than {seconds} s: a hang?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_image(path: Path, h: int = 24, w: int = 30, seed: int = 0, **save) -> Path:
    """A random RGB image file (format from the extension; `save` goes to PIL's save)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, **save)
    return path


def write_image_folder(folder: Path) -> Path:
    """Three good images of two formats and two sizes (a.png, b.jpg, c.png): the CLI tests' input folder."""
    write_image(folder / "a.png", seed=1)
    write_image(folder / "b.jpg", seed=2)
    write_image(folder / "c.png", h=16, w=17, seed=3)
    return folder


#: /proc/self/fd lets a test's subprocess see which file a descriptor belongs to.
HAS_PROC = Path("/proc/self/fd").is_dir()

_STUCK_WRITER = """
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if name.endswith(".partial") and "/.b.jpg." in name:
        time.sleep(120)  # stuck half-way through writing b's output: data written, not yet renamed
    real_fsync(fd)
os.fsync = slow_fsync
from dlsr_infer.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def start_stuck_cli_run(folder: Path, out_dir: Path, model_dir: Path):
    """A real `dlsr-upscale` process on `write_image_folder`'s a, b, c, stuck while writing b's output
    (a is done, c not started): (the process, b's temporary file). For signal and kill tests."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(folder / "a.png"), str(folder / "b.jpg"),
                             str(folder / "c.png"), "-o", str(out_dir), "--model", str(model_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list(out_dir.glob(".b.jpg.*.partial")) if out_dir.exists() else []
        if partial and partial[0].stat().st_size > 0:
            return proc, partial[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never got to writing b.jpg: {proc.communicate()}")
