"""Model cards: every figure comes from the run's log and a dlsr-eval pass, and a warm-started model's
card lists the whole chain of runs that made it (steps, wall time, commands, logs)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dlsr_infer import DLSR
from dlsr_infer.evaluate import evaluate
from dlsr_search.data import list_images, load_pairs
from dlsr_search import modelcard
from dlsr_search.modelcard import images_used, make_card, parse_stage, read_log, run_config
from dlsr_search.synthetic import write_images
from dlsr_search.train import TrainConfig, train


def _cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), scale=2, data=[str(tmp_path / "imgs")], channels=8, batch=2, patch=32,
                val=str(tmp_path / "val"), val_every=2, log_every=2, progress=False, threads=1, lr=1e-3,
                export=str(tmp_path / name / "export"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """Run A (x2) trained 4 steps, handed off, then resumed to 6; run B (x4) warm-started from A@4."""
    tmp = tmp_path_factory.mktemp("card")
    write_images(tmp / "imgs", n=6)
    write_images(tmp / "val", n=2, size=64, seed=5)
    for name in ("Set5", "Set14", "B100"):
        write_images(tmp / "bench" / name / "HR", n=1, size=64, seed=len(name))
    train(_cfg(tmp, "A", steps=4))
    shutil.copytree(tmp / "A" / "export", tmp / "A-handoff")
    train(_cfg(tmp, "A", steps=6, threads=2, resume=True), explicit={"steps", "threads", "resume"})
    train(_cfg(tmp, "B", scale=4, patch=64, steps=3, val_every=3, init_from=str(tmp / "A-handoff")))
    return tmp


def test_parse_stage():
    assert parse_stage("runs/x2@5379") == (Path("runs/x2"), 5379)
    assert parse_stage("runs/x2") == (Path("runs/x2"), None)
    assert parse_stage("runs/a@b") == (Path("runs/a@b"), None)


def test_card_lists_the_warm_start_chain_and_reproducible_figures(chain):
    out = chain / "model"
    make_card(chain / "B", out, title="T x4", benchmarks=chain / "bench", model_dir=chain / "B" / "export",
              earlier=[(chain / "A", 4)])
    card = (out / "README.md").read_text()
    stage1 = [json.loads(x) for x in (out / "log-stage1.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in stage1) == 4 and [r["event"] for r in stage1].count("start") == 1
    assert not any(r["event"] == "resume" for r in stage1)  # the segment resumed at step 4 came after the hand-off
    assert f"1. `{chain / 'A'}`, x2: 4 steps" in card  # the hand-off step, not the 6 that A went on to
    assert f"2. `{chain / 'B'}`, x4: 3 steps" in card and "(this run)" in card
    assert f"--out {chain / 'A'}" in card and f"--init-from {chain / 'A-handoff'}" in card
    assert "--steps 4 --threads 1 --val" in card  # stage 1's command is the one that made step 4
    assert card.count("HR patch 32 (6 images large enough), L1 loss, lr 0.001") == 1
    assert "HR patch 64 (6 images large enough), L1 loss" in card
    assert "all stages, up to the bundled weights: 7 steps" in card and "(6 HR images)" in card
    # the warm start names its weights by hash, since a folder's weights may be replaced later
    sha = hashlib.sha256((chain / "A-handoff" / "model.safetensors").read_bytes()).hexdigest()
    assert f"--init-from {chain / 'A-handoff'}" in card and f"warm start: {chain / 'A-handoff'} (sha256 {sha[:12]})" in card
    # the table's figure is what dlsr-eval gives for the bundled weights
    ours = evaluate(DLSR.from_pretrained(out), [chain / "bench" / "Set5"])[0]
    row = next(line for line in card.splitlines() if line.startswith("| **T x4"))
    assert f"{ours['psnr']:.2f} / {ours['ssim']:.4f}" == row.split("|")[2].strip()
    for name in ("config.json", "model.safetensors", "log.jsonl", "curve.png"):
        assert (out / name).is_file()

    # each stage says where it trained, from its start records
    assert card.count("h on cpu; command:") == 2 and "CPU threads (cpu);" in card
    assert "; autocast: off;" in card  # the CPU default; the trainer logs what it resolved
    records = read_log(chain / "B")
    assert [r["autocast"] for r in records if r["event"] == "start"] == [None]
    old = [{k: v for k, v in r.items() if k != "autocast"} for r in records]  # a log from before the field
    start = next(r for r in old if r["event"] == "start")
    assert modelcard._autocast({"bf16": None}, [{**start, "device": "cuda:0"}]) == "bfloat16"
    assert modelcard._autocast({"bf16": None}, old) == "off" and modelcard._autocast({"bf16": True}, old) == "bfloat16"

    make_card(chain / "B", out, title="T x4", benchmarks=chain / "bench", model_dir=chain / "B" / "export")
    assert not list(out.glob("log-stage*.jsonl")) and "training stages" not in (out / "README.md").read_text()

    # a note for a data folder (one that was on another machine) stands wherever a stage trained on it
    imgs = str(chain / "imgs")
    assert modelcard.main(["--data-note", f"{imgs}=40 HR images elsewhere", "--earlier", f"{chain / 'A'}@4",
                           "--model", str(chain / "B" / "export"), "--benchmarks", str(chain / "bench"),
                           "--title", "T x4", str(chain / "B"), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "(40 HR images elsewhere);" in card and "(6 HR images)" not in card
    assert card.count("images large enough), data: 40 HR images elsewhere; L1 loss") == 2
    stages, notes = modelcard.card_stages(out)  # and goes on to the card of a run warm-started from this one
    assert [name for name, _ in stages] == [chain / "A", chain / "B"] and notes == ["40 HR images elsewhere"] * 2
    with pytest.raises(SystemExit):
        modelcard.main(["--data-note", "no equals sign", "--title", "T", str(chain / "B"), str(out)])

    # without --model the card bundles best/ and says which validation step it is
    make_card(chain / "A", chain / "from-best", title="A x2", benchmarks=chain / "bench")
    best = [r["step"] for r in read_log(chain / "A") if r["event"] == "val" and r.get("best")][-1]
    assert f"6 trained, weights from step {best:,} (its best validation PSNR-Y);" in (chain / "from-best" / "README.md").read_text()
    assert (chain / "from-best" / "model.safetensors").read_bytes() == (chain / "A" / "best" / "model.safetensors").read_bytes()
    # and so with best/ named by --model (the card once said the last step for it)
    make_card(chain / "A", chain / "named-best", title="A x2", benchmarks=chain / "bench", model_dir=chain / "A" / "best")
    assert f"weights from step {best:,} (its best validation PSNR-Y);" in (chain / "named-best" / "README.md").read_text()


def test_card_command_is_the_run_as_it_stopped_with_options_added_on_resume(chain):
    """A run asked for 10 steps, stopped at 3, resumed with --ema to 5: the card's command says 5 steps and
    --ema, and the card says where the average started."""
    shutil.copytree(chain / "A" / "export", chain / "c-model")  # C fine-tunes the model bundled in c-model
    train(_cfg(chain, "C", steps=3, init_from=str(chain / "c-model"), pixel_loss="l2"))
    train(_cfg(chain, "C", steps=5, ema=0.5, resume=True), explicit={"steps", "ema", "resume"})
    make_card(chain / "C", chain / "c-model", title="C x2", benchmarks=chain / "bench",
              model_dir=chain / "C" / "export")
    card = (chain / "c-model" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("- command:"))
    assert "--steps 5 " in command and "--ema 0.5 " in command and "--pixel-loss l2 " in command
    assert "HR patch 32 (6 images large enough); L2 loss; lr 0.001" in card
    assert "moving average (EMA) of the trained weights from step 3 (added on resume), decay 0.5" in card
    # the warm start names a folder the card has just overwritten: it says so
    assert f"warm start: {chain / 'c-model'} (sha256 " in card and "; the weights bundled there before this card" in card


def test_images_used_comes_from_the_log_or_the_image_headers(chain, tmp_path):
    records = read_log(chain / "A")
    data = [r for r in records if r["event"] == "data"]
    assert data and data[-1]["images"] == 6 and data[-1]["lr_patch"] == 16
    config = run_config(records)
    assert images_used(config, records) == 6
    assert images_used(config, [r for r in records if r["event"] != "data"]) == 6  # runs logged before the record
    # the trainer's rule: an image whose LR side is under the LR patch is skipped
    write_images(tmp_path / "mixed", n=2, size=64)
    write_images(tmp_path / "mixed" / "small", n=1, size=40, seed=9)
    mixed = {"scale": 2, "data": [str(tmp_path / "mixed")]}
    assert images_used({**mixed, "patch": 40}, []) == 3 and images_used({**mixed, "patch": 48}, []) == 2
    assert images_used({**mixed, "data": [str(tmp_path / "nowhere")], "patch": 40}, []) is None
    assert images_used({**mixed, "patch": None}, []) == 0  # no patch set: the paper's 128 at x2
    _, skipped = load_pairs(list_images([tmp_path / "mixed"]), 2, min_lr_size=24)
    assert len(skipped) == 1


def test_summary_table_orders_by_scale_and_shows_each_bicubic_row_once(chain):
    from dlsr_search.modelcard import summary_table

    weights = chain / "weights"
    make_card(chain / "B", weights / "b-x4", title="B x4", benchmarks=chain / "bench", model_dir=chain / "B" / "export")
    for name in ("a-x2", "a2-x2"):
        make_card(chain / "A", weights / name, title=f"{name} model", benchmarks=chain / "bench",
                  model_dir=chain / "A" / "export")
    rows = summary_table(weights).splitlines()[2:]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["a-x2 model (ours, bundled)", "bicubic x2", "a2-x2 model (ours, bundled)",
                     "B x4 (ours, bundled)", "bicubic x4"]


def test_a_card_continues_the_chain_of_the_model_it_was_warm_started_from(chain, capsys):
    """A fresh checkout has no run folders: the bundled model's own logs carry its chain to the next card,
    which may replace that model in place."""
    bundled = chain / "bx4"
    make_card(chain / "B", bundled, title="T x4", benchmarks=chain / "bench", model_dir=chain / "B" / "export",
              earlier=[(chain / "A", 4)])
    before = {f.name: f.read_bytes() for f in bundled.glob("log*.jsonl")}
    train(_cfg(chain, "D", scale=4, patch=64, steps=2, init_from=str(bundled)))
    assert modelcard.main(["--continues", str(bundled), "--model", str(chain / "D" / "export"), "--benchmarks",
                           str(chain / "bench"), "--title", "T next", str(chain / "D"), str(bundled)]) == 0
    card = (bundled / "README.md").read_text()
    assert f"1. `{chain / 'A'}`, x2: 4 steps" in card and f"2. `{chain / 'B'}`, x4: 3 steps" in card
    assert f"3. `{chain / 'D'}`, x4: 2 steps" in card and card.count("(this run)") == 1
    assert "all stages, up to the bundled weights: 9 steps" in card
    assert (bundled / "log-stage1.jsonl").read_bytes() == before["log-stage1.jsonl"]
    assert (bundled / "log-stage2.jsonl").read_bytes() == before["log.jsonl"]
    assert (bundled / "log.jsonl").read_bytes() == (chain / "D" / "log.jsonl").read_bytes()
    assert not (bundled / "log-stage3.jsonl").exists()
    written = {f.name: f.read_bytes() for f in bundled.iterdir()}
    # the same command twice would list D twice: refused, the card left as it was
    assert modelcard.main(["--continues", str(bundled), "--model", str(chain / "D" / "export"), "--benchmarks",
                           str(chain / "bench"), "--title", "T next", str(chain / "D"), str(bundled)]) == 2
    assert "is already stage 3" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in bundled.iterdir()} == written
    with pytest.raises(FileNotFoundError, match="no stages.json"):
        make_card(chain / "A", chain / "elsewhere", title="T", benchmarks=chain / "bench", continues=chain / "imgs")
    assert not (chain / "elsewhere").exists()  # refused before anything was written

    # a card that bundled a best validation step hands on that step, not the steps trained after it
    make_card(chain / "A", chain / "a-best", title="A x2", benchmarks=chain / "bench")
    best = [r["step"] for r in read_log(chain / "A") if r["event"] == "val" and r.get("best")][-1]
    readme = chain / "a-best" / "README.md"
    assert f"weights from step {best:,} (its best" in readme.read_text()
    stages = json.loads((chain / "a-best" / "stages.json").read_text())["stages"]
    assert stages == [{"run": str(chain / "A"), "log": "log.jsonl", "until": best, "data_note": None}]
    if best == 6:  # A's last step: make the card say what it says of a best step earlier in the run (A@4)
        stages[0]["until"] = best = 4
        (chain / "a-best" / "stages.json").write_text(json.dumps({"format_version": 1, "stages": stages}))
    readme.write_text("# reworded by hand\n")  # the chain is read from stages.json, not from the card's prose
    # B continues a card only if it was warm-started at all (not from scratch); from another file than the one
    # bundled there (A@4, which a-best does not hold) it is said with a warning - the same tensors saved apart
    # (an export of the checkpoint a bundle came from) hash differently; with A@4's weights in it, no warning
    train(_cfg(chain, "S", steps=2, val_every=2, val=str(chain / "val")))
    with pytest.raises(ValueError, match="was not warm-started \\(no --init-from\\): it does not continue"):
        make_card(chain / "S", chain / "b-next", title="S x2", benchmarks=chain / "bench", continues=chain / "a-best")
    assert not (chain / "b-next").exists()
    with pytest.warns(UserWarning, match=f"was warm-started from {chain / 'A-handoff'}, not from the file bundled"):
        make_card(chain / "B", chain / "b-next0", title="B x4", benchmarks=chain / "bench",
                  model_dir=chain / "B" / "export", continues=chain / "a-best")  # said, not refused: see below
    shutil.copyfile(chain / "A-handoff" / "model.safetensors", chain / "a-best" / "model.safetensors")
    make_card(chain / "B", chain / "b-next", title="B x4", benchmarks=chain / "bench",
              model_dir=chain / "B" / "export", continues=chain / "a-best")
    stage1 = [json.loads(x) for x in (chain / "b-next" / "log-stage1.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in stage1) == best and not any(r["event"] == "resume" for r in stage1)
    assert f"1. `{chain / 'A'}`, x2: {best:,} steps" in (chain / "b-next" / "README.md").read_text()


def test_a_best_validation_pick_counts_the_steps_up_to_it_not_the_steps_trained_after(chain):
    """A run set to 6 steps whose best validation is step 2: its stage line (steps, command) and the
    chain's total say 2, while the training line still says what was trained (6)."""
    train(_cfg(chain, "F", steps=6, init_from=str(chain / "A-handoff")))
    log = chain / "F" / "log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()]
    for r in records:  # make step 2 the best validation whatever the synthetic images gave
        if r["event"] == "val":
            r["best"] = r["step"] == 2
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = chain / "f-card"
    # best/ still holds the weights of the real pick: the card must not call them step 2's
    with pytest.raises(ValueError, match=r"holds the weights of step \d \(its metadata\), but .*best validation is step 2"):
        make_card(chain / "F", out, title="F x2", benchmarks=chain / "bench", earlier=[(chain / "A", 4)])
    assert not out.exists()
    DLSR.from_pretrained(chain / "F" / "best").save_pretrained(chain / "F" / "best", metadata={"dlsr_train_step": "2"})
    make_card(chain / "F", out, title="F x2", benchmarks=chain / "bench", earlier=[(chain / "A", 4)])
    card = (out / "README.md").read_text()
    assert "steps: 6 trained, weights from step 2 (its best validation PSNR-Y);" in card
    line = next(x for x in card.splitlines() if x.startswith(f"  2. `{chain / 'F'}`"))
    assert ", x2: 2 steps," in line and "--steps 2 " in line and line.endswith("(this run)")
    assert "all stages, up to the bundled weights: 6 steps" in card  # A's 4 and F's 2
    assert json.loads((out / "stages.json").read_text())["stages"][-1]["until"] == 2


def test_a_data_note_stays_with_its_stage_when_a_later_stage_reuses_the_folder(chain):
    """Two GPU sessions both trained from /tmp/dlsr_data, holding different images: the note given for the
    newer stage must not rewrite what the card says of the older one."""
    first = chain / "noted"
    imgs = str(chain / "imgs")
    make_card(chain / "B", first, title="T x4", benchmarks=chain / "bench", model_dir=chain / "B" / "export",
              earlier=[(chain / "A", 4)], data_notes={imgs: "first session's images"})
    train(_cfg(chain, "E", scale=4, patch=64, steps=2, init_from=str(first)))
    make_card(chain / "E", first, title="T x4", benchmarks=chain / "bench", model_dir=chain / "E" / "export",
              continues=first, data_notes={imgs: "second session's images"})
    card = (first / "README.md").read_text()
    assert card.count("data: first session's images;") == 2 and card.count("data: second session's images;") == 1
    assert "(second session's images);" in card  # the run's own data line
    notes = [s["data_note"] for s in json.loads((first / "stages.json").read_text())["stages"]]
    assert notes == ["first session's images"] * 2 + ["second session's images"]


def test_a_resume_that_only_closes_a_run_is_not_where_it_trained():
    """A GPU run stopped by SIGTERM and closed here with `--resume --steps N` (no step trained on the CPU):
    the card says it trained on cuda:0 under bf16, not 'cuda:0, cpu' and 'off'."""
    gpu = json.dumps({"out": "/tmp/dlsr_runs/x4g", "ema": 0.999, "steps": 20000})
    here = json.dumps({"out": "runs/x4g2", "ema": 0.999, "steps": 100})
    records = [{"event": "start", "step": 0, "time": 0.0, "device": "cuda:0", "autocast": "bfloat16", "config": gpu},
               {"event": "train", "step": 100, "time": 10.0},
               {"event": "end", "step": 100, "time": 11.0},
               {"event": "start", "step": 100, "time": 50.0, "device": "cpu", "autocast": None, "config": here},
               {"event": "end", "step": 100, "time": 51.0}]
    assert modelcard._devices(records) == "cuda:0" and modelcard._autocast({}, records) == "bfloat16"
    # its command is the one that trained: --out where its checkpoints were written, not the closing one's
    assert modelcard.run_config(records)["out"] == "/tmp/dlsr_runs/x4g" and run_config(records)["steps"] == 100
    records[-1] = {"event": "train", "step": 120, "time": 60.0}  # a resume that trained: both count
    assert modelcard._devices(records) == "cuda:0, cpu" and modelcard._autocast({}, records) == "bfloat16, off"
    assert modelcard.run_config(records)["out"] == "runs/x4g2"
    # a stage line says the weights are a moving average (and since when, if --ema came on resume)
    records.insert(4, {"event": "ema_start", "step": 100, "time": 50.5})
    line = modelcard._stage_line(1, Path("runs/x4g2"), records, Path("weights/x"), None)
    assert "; weights: moving average (EMA) of the trained weights from step 100 (added on resume), decay 0.999;" in line


def test_a_failed_card_leaves_the_model_directory_as_it_was(chain, tmp_path, capsys):
    out = tmp_path / "card"
    shutil.copytree(chain / "A" / "export", out)
    (out / "README.md").write_text("the old card")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    argv = [str(chain / "B"), str(out), "--title", "T", "--benchmarks", str(tmp_path / "no-bench")]
    assert modelcard.main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # evaluated before anything was copied


def test_a_card_is_not_written_into_a_run_folder(chain, tmp_path, capsys):
    """`modelcard RUN RUN` put model.safetensors into the run folder and replaced its config.json: the run
    could no longer be resumed ('is a model directory, not a run folder')."""
    run = tmp_path / "B"
    shutil.copytree(chain / "B", run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    with pytest.raises(SystemExit) as exit_:
        modelcard.main([str(run), str(run), "--title", "T", "--benchmarks", str(chain / "bench")])
    assert exit_.value.code == 2 and "is a run folder" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    # a run stopped before its first checkpoint is one too (its log is there, last.pt not yet)
    (run / "last.pt").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exit_:
        modelcard.main([str(run), str(run), "--title", "T", "--benchmarks", str(chain / "bench")])
    assert exit_.value.code == 2 and "is a run folder" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists()


def test_a_run_without_best_asks_for_a_model(chain, tmp_path, capsys):
    run = tmp_path / "noval"
    shutil.copytree(chain / "A", run, ignore=shutil.ignore_patterns("best", "export"))
    assert modelcard.main([str(run), str(tmp_path / "card"), "--title", "T",
                           "--benchmarks", str(chain / "bench")]) == 2
    assert f"no model directory {run / 'best'}" in capsys.readouterr().err
    assert not (tmp_path / "card").exists()


def test_a_run_chosen_on_set14_or_b100_is_refused_and_notes_describe_the_picked_weights(chain, capsys):
    """A card says no Set14/B100 image was used: a run validated on one is refused (so are its soups).
    The EMA note describes the weights bundled: an --ema added on resume after the best pick is not theirs."""
    train(_cfg(chain, "S14", steps=2, val=str(chain / "bench" / "Set14" / "HR")))
    with pytest.raises(ValueError, match=r"validated on .*Set14/HR: its card's Set14 and B100 figures must stay held out"):
        make_card(chain / "S14", chain / "s14-card", title="T", benchmarks=chain / "bench")
    assert not (chain / "s14-card").exists()

    train(_cfg(chain, "P", steps=4, val_every=2, export=None))  # best pick at step 2 or 4
    train(_cfg(chain, "P", steps=6, val_every=0, ema=0.9, resume=True, export=None),
          explicit={"steps", "val_every", "ema", "resume"})
    records = read_log(chain / "P")
    assert any(r["event"] == "ema_start" and r["step"] == 4 for r in records)
    make_card(chain / "P", chain / "p-card", title="T x2", benchmarks=chain / "bench")
    card = (chain / "p-card" / "README.md").read_text()
    assert "moving average" not in card and "steps: 6 trained, weights from step" in card

    # the README summary of a weights folder holding a model directory without a card's results table
    weights = chain / "summary-weights"
    shutil.copytree(chain / "p-card", weights / "ok")
    DLSR.from_pretrained(weights / "ok").save_pretrained(weights / "bare")
    assert modelcard.main(["summary", str(weights)]) == 2
    assert "bare/README.md has no results table" in capsys.readouterr().err


def test_an_export_of_last_pt_is_its_last_checkpoint_even_after_a_later_best_validation(chain):
    """A run killed after a best validation that came after its last checkpoint: the export of last.pt
    holds the checkpoint's step, and the card says so (it was refused as 'step 6' against metadata 4)."""
    from dlsr_search.export import export_checkpoint

    train(_cfg(chain, "K", steps=4, val_every=2, ckpt_every=2, export=None))
    log = chain / "K" / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"event": "val", "step": 6, "time": 0.0, "psnr_y": 99.0,
                                                 "best": True}) + "\n")
    export_checkpoint(chain / "K" / "last.pt", chain / "K-last")
    make_card(chain / "K", chain / "k-card", title="T x2", benchmarks=chain / "bench", model_dir=chain / "K-last")
    assert "weights from step 4;" in (chain / "k-card" / "README.md").read_text()


def test_records_until_keeps_a_resume_that_replays_the_steps_up_to_the_pick():
    """Killed after the pick at step 4 with last.pt at step 2: the resume from 2 replays up to the pick and
    is part of what made it (its wall time, its --threads); a resume at or after the pick is not."""
    from dlsr_search.modelcard import records_until

    log = [{"event": "start", "step": 0, "time": 0.0}, {"event": "val", "step": 4, "time": 4.0, "best": True},
           {"event": "resume", "step": 2, "time": 10.0}, {"event": "val", "step": 4, "time": 12.0, "best": True},
           {"event": "checkpoint", "step": 4, "time": 12.1}, {"event": "resume", "step": 4, "time": 20.0},
           {"event": "val", "step": 6, "time": 22.0}]
    kept = records_until(log, 4)
    assert [(r["event"], r["step"]) for r in kept] == [("start", 0), ("val", 4), ("resume", 2), ("val", 4),
                                                       ("checkpoint", 4)]
    assert modelcard.wall_time_s(kept) == pytest.approx(4.0 + 2.1)


def test_the_command_keeps_an_explicit_no_bf16_and_no_channels_last():
    from dlsr_search.modelcard import command_line

    base = {"out": "runs/g", "scale": 2, "steps": 10, "device": "cuda", "resume": False}
    off = command_line({**base, "bf16": False, "channels_last": False})
    assert "--no-bf16" in off and "--no-channels-last" in off  # left out, CUDA's default (on) would apply
    default = command_line({**base, "bf16": None, "channels_last": None})
    assert "bf16" not in default and "channels-last" not in default
    assert "--bf16 --channels-last" in command_line({**base, "bf16": True, "channels_last": True})


def test_a_card_refuses_another_networks_weights_or_weights_that_name_no_step(chain):
    other = DLSR.from_genotype_name("dlsr_s_x2").save_pretrained(chain / "other-net")
    with pytest.raises(ValueError, match="is another network .* than the one"):
        make_card(chain / "A", chain / "bad1", title="A x2", benchmarks=chain / "bench", model_dir=other)
    same_net = DLSR.from_pretrained(chain / "A" / "best").save_pretrained(chain / "no-step")  # no metadata
    with pytest.raises(ValueError, match="does not say which training step"):
        make_card(chain / "A", chain / "bad2", title="A x2", benchmarks=chain / "bench", model_dir=same_net)
    assert not (chain / "bad1").exists() and not (chain / "bad2").exists()


def test_an_export_of_last_pt_ends_the_chain_at_its_checkpoint_even_if_the_log_goes_on(chain):
    """A kill after more steps were logged than checkpointed: the card and stages.json stop at last.pt's step."""
    from dlsr_search.export import export_checkpoint

    shutil.copytree(chain / "A", chain / "Kill")
    last = max(r["step"] for r in read_log(chain / "Kill"))
    with open(chain / "Kill" / "log.jsonl", "a") as f:  # logged on past last.pt, then killed
        f.write(json.dumps({"event": "train", "step": last + 2, "time": 1e10, "loss": 1.0}) + "\n")
    export_checkpoint(chain / "Kill" / "last.pt", chain / "K-export")
    make_card(chain / "Kill", chain / "k-card", title="K x2", benchmarks=chain / "bench", model_dir=chain / "K-export")
    card = (chain / "k-card" / "README.md").read_text()
    assert f"- steps: {last + 2:,} trained, weights from step {last:,};" in card
    # what a later card reads back as this stage: up to last.pt's step (until was None: all {last + 2} steps)
    stages = json.loads((chain / "k-card" / "stages.json").read_text())["stages"]
    assert stages[-1]["until"] == last
    assert max(r["step"] for r in modelcard.card_stages(chain / "k-card")[0][-1][1]) == last


def test_a_data_note_must_name_a_folder_a_stage_trained_on(chain):
    with pytest.raises(ValueError, match="--data-note /nowhere: no stage of this card trained on that folder"):
        make_card(chain / "A", chain / "n1", title="A x2", benchmarks=chain / "bench",
                  data_notes={"/nowhere": "a typo"})
    make_card(chain / "A", chain / "n2", title="A x2", benchmarks=chain / "bench",
              data_notes={str(chain / "imgs") + "/": "6 images on another machine"})  # a trailing slash matches
    assert "(6 images on another machine)" in (chain / "n2" / "README.md").read_text()


def test_summary_shows_each_paper_row_once(tmp_path):
    from dlsr_search.modelcard import summary_table

    rows = ("| **m{} (this model)** | 37.00 / 0.9500 | 33.00 / 0.9100 | 31.00 / 0.8900 |\n"
            "| DLSR, paper Table 2 (PSNR) | 38.04 | 33.67 | 32.21 |\n| bicubic | 33.67 / 0.9303 | 30.32 / 0.8699 | 29.56 / 0.8434 |")
    for k in (1, 2):
        card = f"# m{k}\n\n| method | Set5 | Set14 | B100 |\n|---|---|---|---|\n{rows.format(k)}\n\nmore\n"
        DLSR.from_genotype_name("dlsr_x2").save_pretrained(tmp_path / f"m{k}", model_card=card)
    names = [r.split("|")[1].strip() for r in summary_table(tmp_path).splitlines()[2:]]
    assert names == ["m1 (ours, bundled)", "DLSR, paper Table 2 (PSNR)", "bicubic x2", "m2 (ours, bundled)"]
    # a folder without model cards (a typo, run outside the repo) is an error, not an empty table
    for where, why in ((tmp_path / "nope", "is not a folder"), (tmp_path / "m1", "holds no model directory")):
        with pytest.raises(FileNotFoundError, match=why):
            summary_table(where)


def test_a_card_is_written_all_or_none(chain, monkeypatch, capsys):
    """A full disk half way (here: at the learning curve) left new weights and logs beside the old card,
    and a traceback."""
    make_card(chain / "A", chain / "whole", title="A x2", benchmarks=chain / "bench")
    (chain / "whole" / "notes.txt").write_text("a user's file")
    before = {f.name: f.read_bytes() for f in (chain / "whole").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelcard, "plot_curve", disk_full)
    other = DLSR.from_pretrained(chain / "A" / "export")
    assert modelcard.main([str(chain / "A"), str(chain / "whole"), "--title", "again", "--model",
                           str(chain / "A" / "export"), "--benchmarks", str(chain / "bench")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (chain / "whole").iterdir()} == before
    assert [f.name for f in chain.iterdir() if f.name.startswith(".whole")] == []
    monkeypatch.undo()
    make_card(chain / "A", chain / "whole", title="again", benchmarks=chain / "bench", model_dir=chain / "A" / "export")
    assert (chain / "whole" / "notes.txt").read_text() == "a user's file"  # kept
    assert DLSR.from_pretrained(chain / "whole").state_dict()["stem.weight"].equal(other.state_dict()["stem.weight"])


def test_a_card_writer_killed_between_its_renames_is_recovered_and_a_link_is_followed(chain):
    make_card(chain / "A", chain / "real-card", title="A x2", benchmarks=chain / "bench")
    (chain / "real-card" / "notes.txt").write_text("a user's file")
    (chain / "linked").symlink_to(chain / "real-card")
    make_card(chain / "A", chain / "linked", title="linked", benchmarks=chain / "bench")
    assert (chain / "linked").is_symlink() and "# linked" in (chain / "real-card" / "README.md").read_text()
    # killed after setting the old folder aside, before the new one was renamed in: the next run puts it back
    (chain / "real-card").rename(chain / ".real-card.old-abc123")
    (chain / ".real-card.x1y2.partial").mkdir()
    make_card(chain / "A", chain / "real-card", title="again", benchmarks=chain / "bench")
    assert (chain / "real-card" / "notes.txt").read_text() == "a user's file"
    assert not [p.name for p in chain.iterdir() if p.name.startswith(".real-card")]


def test_a_cut_record_is_skipped_only_where_a_kill_leaves_one(tmp_path, capsys):
    from dlsr_search.modelcard import read_jsonl

    good = '{"event": "train", "step": 1}'
    cut = '{"event": "start", "step": 0, "config": "{\\"out\\": \\"x\\"}'  # cut right after a } in its config
    (tmp_path / "a.jsonl").write_text(f"{good}\n{cut}\n")  # the last line
    (tmp_path / "b.jsonl").write_text(f"{good}\n{cut}\n" + '{"event": "resume", "step": 0}\n')  # then resumed
    (tmp_path / "c.jsonl").write_text(f"{cut}\n{good}\n")  # in the middle of a run: corruption, not a kill
    for name in ("a", "b"):
        with pytest.warns(UserWarning, match="a record cut short"):
            assert read_jsonl(tmp_path / f"{name}.jsonl")[0] == {"event": "train", "step": 1}
    with pytest.raises(ValueError, match="line 1: not a JSON record"):
        read_jsonl(tmp_path / "c.jsonl")
    assert modelcard.main(["summary", "--help"]) == 0 and "usage: " in capsys.readouterr().out
    assert modelcard.main(["summary", "weights", "extra"]) == 2
