"""The bundled weights: every alias loads offline, pickle-free and strictly, and reproduces its card."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from dlsr_infer.pretrained import ALIASES, CONFIG_NAME, WEIGHTS_NAME, bundled_model_dir, canonical_safetensors

ALIAS_NAMES = sorted(ALIASES)


@pytest.mark.parametrize("alias", ALIAS_NAMES)
def test_alias_is_bundled_with_card_log_and_curve(alias):
    d = bundled_model_dir(alias)
    assert d is not None, f"no bundled weights for {alias!r} in weights/"
    # a trained model keeps its run's log; a model soup (`dlsr-search soup`) the logs of its fine-tunes
    logs = ("soup.json", "log-soup1.jsonl") if (d / "soup.json").exists() else ("log.jsonl",)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md", "curve.png", "stages.json", *logs):
        assert (d / name).is_file(), f"{d / name} missing"
    # the weights file is safetensors (8-byte little-endian header length, then a JSON header), not a pickle
    raw = (d / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + n])
    # written the way save_model writes it (header keys sorted): the same tensors give the same bytes
    assert raw == canonical_safetensors(raw), f"{d / WEIGHTS_NAME} is not in canonical form"


def _card_psnr(card: str, dataset: str) -> float:
    row = next(line for line in card.splitlines() if line.startswith("| **"))
    header = next(line for line in card.splitlines() if line.startswith("| method |"))
    col = [c.strip() for c in header.strip("|").split("|")].index(dataset)
    cell = [c.strip() for c in row.strip("|").split("|")][col]
    return float(re.match(r"([\d.]+)", cell)[1])


@pytest.mark.parametrize("alias", ALIAS_NAMES)
def test_alias_loads_offline_and_reproduces_its_card_on_set5(alias, benchmarks_dir, tmp_path):
    """In a fresh process with the Hub disabled and an empty cache: strict load, then dlsr-eval on Set5."""
    d = bundled_model_dir(alias)
    assert d is not None
    expected = _card_psnr((d / "README.md").read_text(), "Set5")
    code = (
        "import sys, json, socket\n"
        "def no_net(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = no_net\n"
        "import pickle, torch\n"
        "def no_pickle(*a, **k): raise RuntimeError('unpickling attempted')\n"
        "torch.load = pickle.load = pickle.loads = no_pickle\n"
        "from dlsr_infer import DLSR\n"
        "from dlsr_infer.evaluate import evaluate\n"
        f"m = DLSR.from_pretrained({alias!r})\n"
        f"r = evaluate(m, [{str(benchmarks_dir / 'Set5')!r}])[0]\n"
        "print(json.dumps({'psnr': r['psnr'], 'params': m.num_parameters}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(got["psnr"] - expected) <= 0.01, (alias, got, expected)
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())


@pytest.mark.parametrize("alias", ALIAS_NAMES)
def test_default_precision_keeps_the_card_figure_on_set5(alias, benchmarks_dir):
    """`upscale()`'s default dtype (bf16 on a CPU with native bf16) may cost at most 0.02 dB on Set5
    against fp32 (the card's protocol, evaluated here to 4 decimals: the card rounds to 2): the parity
    condition under which 'auto' picks bf16."""
    from dlsr_infer import DLSR
    from dlsr_infer.evaluate import evaluate
    from dlsr_infer.upscaling import auto_dtype

    d = bundled_model_dir(alias)
    assert d is not None
    m = DLSR.from_pretrained(alias).eval()
    from dlsr_infer import fast

    if not fast.bf16_native():
        pytest.skip("this CPU runs upscale() in fp32 (no native bf16): nothing to compare")
    # where bf16 is native, every bundled model must pass the bf16 parity probe (else 'auto' is fp32 for it)
    assert auto_dtype(m, torch.device("cpu")) == torch.bfloat16, alias
    fp32 = evaluate(m, [benchmarks_dir / "Set5"], dtype="fp32")[0]["psnr"]
    assert abs(fp32 - _card_psnr((d / "README.md").read_text(), "Set5")) <= 0.005  # the card's figure, rounded
    got = evaluate(m, [benchmarks_dir / "Set5"], dtype="auto")[0]["psnr"]
    assert abs(got - fp32) <= 0.02, (alias, got, fp32)  # measured: within 0.008 dB (README)


@pytest.mark.parametrize("alias", ALIAS_NAMES)
def test_card_chain_can_be_continued_from_the_repository(alias):
    """`modelcard --continues` reads a card's chain back from its stages.json and logs: the stage lines it
    would write are the card's own (up to the step a best-validation card bundled), with no run folder at
    hand."""
    from dlsr_search.modelcard import SoupStage, _chain_line, _stage_line, card_stages

    d = bundled_model_dir(alias)
    listed = re.findall(r"^  \d+\. .*$", (d / "README.md").read_text(), re.M)
    stages, notes = card_stages(d)
    if (d / "soup.json").is_file():  # a soup's card lists its fine-tunes apart; its chain is what came before
        soup = stages[-1]
        assert isinstance(soup, SoupStage) and len(soup.fine_tunes) >= 1
        fine_tune_lines = re.findall(r"^  - `.*$", (d / "README.md").read_text(), re.M)
        members = [m for m in soup.members if "run" in m]  # each fine-tune's line is what its log (kept beside
        for m, (run, records) in zip(members, soup.fine_tunes, strict=True):  # the card) and data note give
            line = _stage_line(None, run, records, d, m.get("data_note"))
            assert any(x.startswith(line + "; its pick: step ") for x in fine_tune_lines), run
        stages, notes = stages[:-1], notes[:-1]
    assert len(stages) == max(len(listed), 1)
    # each stage's first line (a soup stage goes on with a line per fine-tune)
    again = [_chain_line(i, stage, d, note).splitlines()[0] for i, (stage, note) in enumerate(zip(stages, notes), start=1)]
    best = re.search(r"weights from step ([\d,]+) \(its best", (d / "README.md").read_text())
    for i, (line, regenerated) in enumerate(zip(listed, again)):
        if i == len(listed) - 1:
            line = line.removesuffix(" (this run)")
            if best:  # the chain goes on from the bundled step, not from the end of that run
                assert f": {best[1]} steps," in regenerated
                continue
        assert regenerated == line


def test_readme_results_table_is_the_one_the_cards_give():
    """README's results table is what `python -m dlsr_search.modelcard summary weights` prints from the
    bundled cards: a model rebundled without redoing README fails here, not in a reader's hands."""
    from dlsr_search.modelcard import summary_table

    table = summary_table(REPO_ROOT / "weights")
    assert table.startswith("| model | params |") and table.count("(ours, bundled)") == len(ALIAS_NAMES)
    assert table in (REPO_ROOT / "README.md").read_text()


# --- the training data holds no benchmark image ------------------------------------------------------
def _gray(path) -> "np.ndarray":
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def _closest_benchmark_match(train_files, bench_files, *, slack: int = 4, stride: int = 4):
    """Smallest mean absolute grey difference between a benchmark image and an aligned crop (either
    orientation) of a training image at most `slack` pixels larger on each side: a benchmark image
    copied into the training data, mod-cropped or re-encoded as JPEG, scores a few grey levels at most.
    (Every `stride`-th pixel is compared: enough for whole images, 16x cheaper.)"""
    bench = [(p, _gray(p)) for p in bench_files]
    best = (float("inf"), None, None)
    for tp in train_files:
        t = _gray(tp)
        for tt in (t, t.T):
            for bp, b in bench:
                dh, dw = tt.shape[0] - b.shape[0], tt.shape[1] - b.shape[1]
                if not (0 <= dh <= slack and 0 <= dw <= slack):
                    continue
                ref = b[::stride, ::stride]
                for i in range(dh + 1):
                    for j in range(dw + 1):
                        d = float(abs(tt[i:i + b.shape[0]:stride, j:j + b.shape[1]:stride] - ref).mean())
                        if d < best[0]:
                            best = (d, tp, bp)
    return best


def test_the_training_data_holds_no_benchmark_image(shared_dir, benchmarks_dir, tmp_path):
    """The cards say no Set14/B100 image was used: check that ../shared/data/train holds none of Set5,
    Set14 or B100 (B100 is the BSDS300 test set, which BSDS500's "val" split holds and its "train" and
    "test" splits, which we train on, do not)."""
    from PIL import Image

    bench = sorted(benchmarks_dir.glob("*/HR/*.png"))
    assert {p.parent.parent.name for p in bench} >= {"Set5", "Set14", "B100"} and len(bench) >= 119
    from dlsr_search.data import list_images

    train = list_images([shared_dir / "data" / "train"])  # what `dlsr-search train --data` reads
    assert len(train) >= 571

    # the check finds a planted copy: a B100 image, one pixel larger (as BSDS stores it), transposed, JPEG
    b100 = next(p for p in bench if p.parent.parent.name == "B100")
    with Image.open(b100) as im:
        rgb = im.convert("RGB")
    planted = Image.new("RGB", (rgb.width + 1, rgb.height + 1))
    planted.paste(rgb, (1, 0))
    planted.transpose(Image.Transpose.TRANSPOSE).save(tmp_path / "copy.jpg", quality=90)
    d, tp, bp = _closest_benchmark_match([tmp_path / "copy.jpg"], bench)
    assert d < 3 and bp == b100, (d, bp)

    d, tp, bp = _closest_benchmark_match(train, bench)
    assert d > 8, f"{tp} looks like benchmark image {bp} (mean grey difference {d:.2f})"
