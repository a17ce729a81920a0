"""Model soups: `dlsr-search soup` averages fine-tunes of one network, and their card lists every fine-tune."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from dlsr_infer import DLSR
from dlsr_infer.evaluate import evaluate
from dlsr_infer.genotype import builtin
from dlsr_search import cli, modelcard
from dlsr_search.soup import SoupError, average_state_dicts, make_soup, read_soup
from dlsr_search.synthetic import write_images
from dlsr_search.train import TrainConfig, train


def test_average_is_the_exact_mean_and_refuses_unlike_tensors():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.5])}
    c = {"w": torch.tensor([2.0, 1.0]), "b": torch.tensor([1.0])}
    avg = average_state_dicts([a, b, c])
    assert torch.equal(avg["w"], torch.tensor([2.0, 3.0])) and torch.equal(avg["b"], torch.tensor([1.0]))
    assert avg["w"].dtype == torch.float32
    with pytest.raises(SoupError, match="other tensors"):
        average_state_dicts([a, {"w": a["w"]}])
    with pytest.raises(SoupError, match="different shapes"):
        average_state_dicts([a, {"w": torch.zeros(3), "b": a["b"]}])


def _model(seed: int, genotype: str = "dlsr_x2", channels: int = 8) -> DLSR:
    """A small randomly initialised network (8 channels: a soup does not care how wide)."""
    torch.manual_seed(seed)
    return DLSR(builtin(genotype).replace(channels=channels))


def test_soup_round_trip_and_its_refusals(tmp_path, capsys):
    dirs = []
    for seed in (1, 2, 3):
        dirs.append(_model(seed).save_pretrained(tmp_path / f"m{seed}"))
    out = make_soup(dirs, tmp_path / "soup")
    soup = DLSR.from_pretrained(out)
    states = [DLSR.from_pretrained(d).state_dict() for d in dirs]
    for k, v in soup.state_dict().items():
        torch.testing.assert_close(v, (states[0][k] + states[1][k] + states[2][k]) / 3, rtol=0, atol=1e-6)
    assert [i["model"] for i in read_soup(out)["ingredients"]] == [str(d) for d in dirs]
    assert read_soup(out)["ingredients"][1]["sha256"] == hashlib.sha256((dirs[1] / "model.safetensors").read_bytes()).hexdigest()
    assert "greedy" not in read_soup(out)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(soup(x), DLSR.from_pretrained(dirs[0])(x))

    # refusals, each before anything is written
    other = _model(4, genotype="dlsr_x4").save_pretrained(tmp_path / "x4")
    cases = {
        "at least two models": [str(tmp_path / "new1"), str(dirs[0])],
        "same weights as": [str(tmp_path / "new2"), str(dirs[0]), str(dirs[1]), str(dirs[0])],
        "another network": [str(tmp_path / "new3"), str(dirs[0]), str(other)],
        "is one of the models": [str(dirs[1]), str(dirs[0]), str(dirs[1])],
    }
    DLSR.from_pretrained(dirs[2]).save_pretrained(tmp_path / "copy", metadata={"dlsr_train_step": "7"})
    cases["same weights as"] = [str(tmp_path / "new2"), str(dirs[0]), str(dirs[2]), str(tmp_path / "copy")]
    cases[f"{dirs[0]} holds the same weights as {dirs[0]}"] = [str(tmp_path / "new2"), str(dirs[0]), str(dirs[0])]
    cases["no images to validate on"] = [str(tmp_path / "new5"), str(dirs[0]), str(dirs[1]), "--greedy-on",
                                         str(tmp_path / "x4")]
    cases["not an empty directory"] = [str(tmp_path / "x4"), str(dirs[0]), str(dirs[1])]  # e.g. a bundled model
    before = (dirs[1] / "model.safetensors").read_bytes()
    for message, argv in cases.items():
        assert cli.main(["soup", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / f"new{i}").exists() for i in (1, 2, 3, 5))
    assert (dirs[1] / "model.safetensors").read_bytes() == before
    (tmp_path / "badval").mkdir()
    (tmp_path / "badval" / "a.png").write_text("not an image")
    assert cli.main(["soup", str(tmp_path / "new6"), str(dirs[0]), str(dirs[1]), "--greedy-on",
                     str(tmp_path / "badval")]) == 2
    assert f"--greedy-on {tmp_path / 'badval'}: " in capsys.readouterr().err and not (tmp_path / "new6").exists()
    (tmp_path / "here").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "here")
        assert cli.main(["soup", ".", str(dirs[0]), str(dirs[1])]) == 2
    assert "is the current directory" in capsys.readouterr().err and not any((tmp_path / "here").iterdir())
    (tmp_path / "link").symlink_to(tmp_path / "here")
    assert cli.main(["soup", str(tmp_path / "link"), str(dirs[0]), str(dirs[1])]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and not any((tmp_path / "here").iterdir())
    assert cli.main(["soup", str(tmp_path / "new4"), str(dirs[0]), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "new4").exists()


def test_a_soup_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure after the weights are written (here: soup.json) leaves no soup folder, no weights without
    their soup.json, and no hidden temporary folder; an empty folder given as the output stays."""
    import dlsr_search.soup as soup_mod

    dirs = [_model(seed).save_pretrained(tmp_path / f"m{seed}") for seed in (1, 2)]

    def full_disk(path, write, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(soup_mod, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        make_soup(dirs, tmp_path / "out" / "soup")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space"):
        make_soup(dirs, tmp_path / "empty")
    assert not (tmp_path / "out" / "soup").exists() and list((tmp_path / "out").iterdir()) == []
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []
    monkeypatch.undo()
    out = make_soup(dirs, tmp_path / "empty")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "soup.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m1", "m2", "out"]


def test_greedy_soup_leaves_out_what_lowers_the_validation_score(tmp_path, monkeypatch):
    """Scored by closeness to a target network (a stand-in for PSNR, so the outcome is certain): two noisy
    copies of it average closer to it and are kept; a far one would pull the average away and is left out."""
    import dlsr_infer.evaluate as ev

    target = _model(0).state_dict()
    def noisy(seed: int, size: float) -> DLSR:
        g = torch.Generator().manual_seed(seed)
        m = _model(0)
        m.load_state_dict({k: v + size * torch.randn(v.shape, generator=g) for k, v in target.items()})
        return m
    def closeness(model, dirs, **kw):
        d = sum(float((v - target[k]).pow(2).sum()) for k, v in model.state_dict().items())
        return [{"psnr": -d, "dataset": "val"}]
    monkeypatch.setattr(ev, "evaluate", closeness)
    write_images(tmp_path / "val", n=1, size=32)
    near1, near2, far = (noisy(1, 0.01).save_pretrained(tmp_path / "near1"),
                         noisy(2, 0.01).save_pretrained(tmp_path / "near2"),
                         noisy(3, 0.2).save_pretrained(tmp_path / "far"))
    out = make_soup([far, near1, near2], tmp_path / "soup", greedy_on=tmp_path / "val")
    record = read_soup(out)
    kept = [i["model"] for i in record["ingredients"]]
    assert sorted(kept) == sorted([str(near1), str(near2)])
    assert [st["kept"] for st in record["greedy"]["steps"]] == [True, True, False]
    assert record["greedy"]["steps"][2]["model"] == str(far) and record["greedy"]["val"] == str(tmp_path / "val")
    soup = DLSR.from_pretrained(out).state_dict()
    n1, n2 = DLSR.from_pretrained(near1).state_dict(), DLSR.from_pretrained(near2).state_dict()
    for k in soup:
        torch.testing.assert_close(soup[k], (n1[k] + n2[k]) / 2, rtol=0, atol=1e-6)
    # where no average beats the best model alone there is no soup, and nothing is written
    with pytest.raises(SoupError, match="no average scored as well"):
        make_soup([near1, far], tmp_path / "soup2", greedy_on=tmp_path / "val")
    assert not (tmp_path / "soup2").exists()


def _cfg(tmp: Path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp / name), scale=2, data=[str(tmp / "imgs")], channels=8, batch=2, patch=32,
                val=str(tmp / "val"), val_every=2, log_every=2, progress=False, threads=1, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_soup_card_lists_each_fine_tune_and_the_chain_before(tmp_path):
    write_images(tmp_path / "imgs", n=6)
    write_images(tmp_path / "val", n=2, size=64, seed=5)
    for name in ("Set5", "Set14", "B100"):
        write_images(tmp_path / "bench" / name / "HR", n=1, size=64, seed=len(name))
    bench = tmp_path / "bench"
    train(_cfg(tmp_path, "A", steps=4))
    bundled = tmp_path / "weights" / "m"
    modelcard.make_card(tmp_path / "A", bundled, title="T x2", benchmarks=bench)
    shutil.copytree(bundled, tmp_path / "parent-card")
    parent = DLSR.from_pretrained(bundled)
    for name, seed in (("C", 1), ("D", 2), ("G", 5)):  # fine-tunes of the bundled model, as the x2 soup's
        train(_cfg(tmp_path, name, steps=4 if name != "G" else 2, seed=seed, lr=1e-4, init_from=str(bundled)))
    # the bundled model goes in as its run's best/ (weights/m is about to be replaced by the soup)
    soup = make_soup([tmp_path / "A" / "best", tmp_path / "C" / "best", tmp_path / "D" / "best"], tmp_path / "soup")

    note = "12 images on a GPU machine"  # --data-note: fine-tunes trained on another machine's copy
    assert modelcard.main(["--title", "T x2", "--continues", str(bundled), "--benchmarks", str(bench),
                           "--data-note", f"{tmp_path / 'imgs'}={note}", str(soup), str(bundled)]) == 0
    card = (bundled / "README.md").read_text()
    assert f"- data: `{tmp_path / 'imgs'}` ({note});" in card
    assert card.count(f"data: {note}; L1 loss") == 2  # each fine-tune's line
    # the figure is dlsr-eval's on the soup's weights, now bundled
    assert (bundled / "model.safetensors").read_bytes() == (soup / "model.safetensors").read_bytes()
    ours = evaluate(DLSR.from_pretrained(bundled), [bench / "Set5"])[0]
    row = next(line for line in card.splitlines() if line.startswith("| **T x2 (this model)"))
    assert f"{ours['psnr']:.2f} / {ours['ssim']:.4f}" == row.split("|")[2].strip()
    assert "uniform average of the weights of 3 models\n  of one network (listed in `soup.json`), fine-tunes of stage 1's weights below and those weights" in card
    assert f"soup <this directory> {tmp_path / 'A' / 'best'} {tmp_path / 'C' / 'best'} {tmp_path / 'D' / 'best'}" in card
    assert "the weights of stage 1 below, the warm start of the others" in card
    for name in ("C", "D"):
        assert f"  - `{tmp_path / name}`, x2: " in card and f"--out {tmp_path / name} " in card
    assert f"  1. `{tmp_path / 'A'}`, x2: " in card and "all stages, up to the bundled weights: 12 steps" in card
    # each fine-tune's log up to its pick, the chain's logs, curves and soup.json beside the card
    for name in ("log-soup1.jsonl", "log-soup2.jsonl", "log-stage1.jsonl", "curve.png", "soup.json", "stages.json"):
        assert (bundled / name).is_file(), name
    assert not (bundled / "log.jsonl").exists()
    index = json.loads((bundled / "stages.json").read_text())
    assert [e.get("run") for e in index["soup"]] == [None, str(tmp_path / "C"), str(tmp_path / "D")]
    assert parent.num_parameters == DLSR.from_pretrained(bundled).num_parameters
    # the chain read back: stage A, then the soup itself (what a run warm-started from it continues)
    stages, _ = modelcard.card_stages(bundled)
    assert stages[0][0] == tmp_path / "A" and isinstance(stages[1], modelcard.SoupStage)
    assert [run for run, _ in stages[1].fine_tunes] == [tmp_path / "C", tmp_path / "D"]

    # a greedy soup's card says how it was chosen (scores made equal here: every model is kept)
    import dlsr_infer.evaluate as ev
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "evaluate", lambda model, dirs, **kw: [{"psnr": 30.0}])
        greedy = make_soup([tmp_path / "A" / "best", tmp_path / "C" / "best"], tmp_path / "greedy", greedy_on=bench / "Set5")
    text = modelcard.make_soup_card(greedy, tmp_path / "greedy-card", title="T x2", benchmarks=bench,
                                    continues=tmp_path / "parent-card").joinpath("README.md").read_text()
    assert f"--greedy-on {bench / 'Set5'}`" in text and f"greedy selection on `{bench / 'Set5'}`" in text
    assert f"`{tmp_path / 'A' / 'best'}` alone 30.0000 dB; `{tmp_path / 'C' / 'best'}` added 30.0000 dB" in text
    # ... and so does the chain of a run that continues it (stages.json keeps the selection: the stage line
    # said only "the uniform average of", without the candidates left out or the command)
    shutil.copytree(tmp_path / "greedy-card", tmp_path / "greedy-next")
    train(_cfg(tmp_path, "N", steps=2, seed=7, lr=1e-4, init_from=str(tmp_path / "greedy-next")))
    modelcard.make_card(tmp_path / "N", tmp_path / "greedy-next", title="T x2", benchmarks=bench,
                        continues=tmp_path / "greedy-next")
    text = (tmp_path / "greedy-next" / "README.md").read_text()
    assert (f"  2. model soup (`dlsr-search soup`): the uniform average of the weights of `{tmp_path / 'A' / 'best'}` "
            f"(stage 1's weights), `{tmp_path / 'C' / 'best'}`, chosen greedily on `{bench / 'Set5'}` (fp32 PSNR-Y: "
            f"`{tmp_path / 'A' / 'best'}` alone 30.0000 dB; `{tmp_path / 'C' / 'best'}` added 30.0000 dB; "
            f"`dlsr-search soup <dir> {tmp_path / 'A' / 'best'} {tmp_path / 'C' / 'best'} --greedy-on {bench / 'Set5'}`)") in text
    assert modelcard.card_stages(tmp_path / "greedy-next")[0][1].greedy["val"] == str(bench / "Set5")
    # a soup chosen on Set14 would make the card's held-out figures a selection score: refused
    record = json.loads((greedy / "soup.json").read_text())
    record["greedy"]["val"] = str(bench / "Set14" / "HR")
    (greedy / "soup.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="must stay held out"):
        modelcard.make_soup_card(greedy, tmp_path / "greedy-card2", title="T x2", benchmarks=bench,
                                 continues=tmp_path / "parent-card")
    assert not (tmp_path / "greedy-card2").exists()

    # a fine-tune that went on and picked another best since is not the soup's ingredient any more
    shutil.copyfile(tmp_path / "A" / "best" / "model.safetensors", tmp_path / "D" / "best" / "model.safetensors")
    with pytest.raises(ValueError, match="no longer holds the weights"):
        modelcard.make_soup_card(soup, tmp_path / "again", title="T", benchmarks=bench,
                                 continues=tmp_path / "parent-card")
    # an ingredient with no training log beside it cannot be described
    loose = make_soup([tmp_path / "A" / "best", tmp_path / "C" / "best"], tmp_path / "soup2")
    shutil.copytree(tmp_path / "C" / "best", tmp_path / "elsewhere")  # the same weights, no log beside them
    (loose / "soup.json").write_text((loose / "soup.json").read_text().replace(str(tmp_path / "C" / "best"),
                                                                               str(tmp_path / "elsewhere")))
    with pytest.raises(ValueError, match="neither a run's best/"):
        modelcard.make_soup_card(loose, tmp_path / "again", title="T", benchmarks=bench,
                                 continues=tmp_path / "parent-card")
    # a fine-tune of another model is not one of this chain's
    train(_cfg(tmp_path, "E", steps=2, seed=3, init_from=str(tmp_path / "C" / "best")))
    with pytest.raises(ValueError, match="was not warm-started from"):
        modelcard.make_soup_card(make_soup([tmp_path / "C" / "best", tmp_path / "E" / "best"], tmp_path / "soup3"),
                                 tmp_path / "again", title="T", benchmarks=bench, continues=tmp_path / "parent-card")
    assert not (tmp_path / "again").exists()
    # the soup card again over itself: refused, the bundle untouched
    card_before = (bundled / "README.md").read_text()
    with pytest.raises(ValueError, match="holds a soup now .* restore that card from git first"):
        modelcard.make_soup_card(soup, bundled, title="T x2", benchmarks=bench, continues=bundled)
    # nor is a soup's fine-tune, or a run started from the weights bundled before the soup, its next stage
    with pytest.raises(ValueError, match="is already a fine-tune in stage 2"):
        modelcard.make_card(tmp_path / "C", bundled, title="T x2", benchmarks=bench, continues=bundled)
    with pytest.raises(ValueError, match="when it held other weights"):
        modelcard.make_card(tmp_path / "G", bundled, title="T x2", benchmarks=bench, continues=bundled)
    assert (bundled / "README.md").read_text() == card_before

    shutil.copytree(bundled, tmp_path / "soup-card")
    # a run warm-started from the soup: its card continues the chain with the soup as one stage, and no
    # soup files are left behind
    train(_cfg(tmp_path, "F", steps=2, seed=4, lr=1e-4, init_from=str(bundled)))
    modelcard.make_card(tmp_path / "F", bundled, title="T x2", benchmarks=bench, continues=bundled)
    card = (bundled / "README.md").read_text()
    assert not (bundled / "soup.json").exists() and not list(bundled.glob("log-soup*.jsonl"))
    assert f"  1. `{tmp_path / 'A'}`, x2: 4 steps" in card
    assert (f"  2. model soup (`dlsr-search soup`): the uniform average of the weights of `{tmp_path / 'A' / 'best'}` "
            f"(stage 1's weights), `{tmp_path / 'C' / 'best'}`, `{tmp_path / 'D' / 'best'}`; 8 fine-tuning steps") in card
    assert f"\n      - `{tmp_path / 'C'}`, x2: 4 steps" in card and f"\n      - `{tmp_path / 'D'}`, x2: 4 steps" in card
    assert card.count(f"data: {note}; L1 loss") == 2  # the fine-tunes' data notes survive the chain
    assert f"  3. `{tmp_path / 'F'}`, x2: 2 steps" in card and "(this run)" in card
    assert "all stages, up to the bundled weights: 14 steps" in card
    for name in ("log-stage1.jsonl", "log-stage2-soup1.jsonl", "log-stage2-soup2.jsonl", "log.jsonl"):
        assert (bundled / name).is_file(), name
    stages, _ = modelcard.card_stages(bundled)  # and the chain reads back as written, ready to go on
    assert stages[0][0] == tmp_path / "A" and isinstance(stages[1], modelcard.SoupStage) and stages[2][0] == tmp_path / "F"
    listed = [line for line in card.splitlines() if line.startswith(("  1. ", "  2. ", "  3. "))]
    again = [modelcard._chain_line(i, st, bundled, None).splitlines()[0] for i, st in enumerate(stages, start=1)]
    assert listed == [*again[:2], again[2] + " (this run)"]

    # a soup of the soup and a fine-tune of it: the earlier soup is a stage of the new soup's chain
    soup_card = tmp_path / "soup-card"
    train(_cfg(tmp_path, "H", steps=2, seed=6, lr=1e-4, init_from=str(soup_card)))
    again = make_soup([soup_card, tmp_path / "H" / "best"], tmp_path / "soup4")
    modelcard.make_soup_card(again, soup_card, title="T x2", benchmarks=bench, continues=soup_card)
    card = (soup_card / "README.md").read_text()
    assert "fine-tunes of stage 2's weights below and those weights" in card
    assert f"  - `{soup_card}` (sha256 " in card and "the weights of stage 2 below, the warm start of the others" in card
    assert (f"  2. model soup (`dlsr-search soup`): the uniform average of the weights of `{tmp_path / 'A' / 'best'}` "
            f"(stage 1's weights), `{tmp_path / 'C' / 'best'}`, `{tmp_path / 'D' / 'best'}`; 8 fine-tuning steps") in card
    assert f"  - `{tmp_path / 'H'}`, x2: 2 steps" in card and "all stages, up to the bundled weights: 14 steps" in card
    for name in ("log-stage1.jsonl", "log-stage2-soup1.jsonl", "log-stage2-soup2.jsonl", "log-soup1.jsonl"):
        assert (soup_card / name).is_file(), name
    assert not (soup_card / "log-soup2.jsonl").exists()  # the earlier soup's own logs moved into the chain
    stages, _ = modelcard.card_stages(soup_card)
    assert stages[0][0] == tmp_path / "A" and all(isinstance(st, modelcard.SoupStage) for st in stages[1:])
    assert [[run for run, _ in st.fine_tunes] for st in stages[1:]] == [[tmp_path / "C", tmp_path / "D"], [tmp_path / "H"]]
