"""dlsr_search: supernet, MiLeNAS step, parameter loss, genotype derivation, a 30-step search end to end."""
from __future__ import annotations

import json

import pytest
import torch

from dlsr_infer import DLSR
from dlsr_infer.genotype import OP_NAMES, loads, mrb_param_count
from dlsr_search.config import ConfigError
from dlsr_search.data import to_float
from dlsr_search.genotypes import derive_genotype
from dlsr_search.losses import hfen, param_loss, sr_loss
from dlsr_search.search import SearchConfig, search, search_step
from dlsr_search.supernet import MixedOp, SuperNet
from dlsr_search.synthetic import write_images



def _tiny_supernet(**kw) -> SuperNet:
    torch.manual_seed(0)
    return SuperNet(scale=2, channels=8, num_cells=kw.pop("num_cells", 4), **kw).train()


def test_mixed_op_is_softmax_weighted_sum():
    torch.manual_seed(0)
    mixed = MixedOp(4)
    x = torch.randn(1, 4, 8, 8)
    w = torch.softmax(torch.randn(len(OP_NAMES)), -1)
    mixed.weights = w
    expected = sum(wi * op(x) for wi, op in zip(w, mixed.ops))
    assert torch.allclose(mixed(x), expected)


def test_arch_and_weight_parameters_are_disjoint_and_complete():
    net = _tiny_supernet(num_cells=5)
    arch, theta = net.arch_parameters(), net.weight_parameters()
    assert [tuple(p.shape) for p in arch] == [(3, 9), (2,), (3,), (4,)]  # betas for cells 3, 4, 5
    ids = {id(p) for p in arch}
    assert not ids & {id(p) for p in theta}
    assert len(arch) + len(theta) == len(list(net.parameters()))
    per_cell = _tiny_supernet(num_cells=3, per_cell_alphas=True)
    assert tuple(per_cell.alphas.shape) == (3, 3, 9)


def test_param_loss_gradient_reaches_alpha_and_favours_small_ops():
    net = _tiny_supernet()
    lp = param_loss(net.op_weights(), net.channels)
    lp.backward()
    g = net.alphas.grad
    assert g is not None and g.abs().sum() > 0
    # descending along -grad moves weight towards cheap ops: the biggest op gets the largest gradient
    counts = torch.tensor([mrb_param_count(op, net.channels) for op in OP_NAMES], dtype=torch.float)
    assert torch.equal(g.argmax(-1), torch.full((3,), int(counts.argmax())))
    assert torch.equal(g.argmin(-1), torch.full((3,), int(counts.argmin())))
    # per-cell alphas: averaged over cells, so the value matches shared alphas with the same rows
    shared = torch.softmax(torch.randn(3, 9), -1)
    assert torch.allclose(param_loss(shared.expand(4, 3, 9), 8), param_loss(shared, 8))


def test_hfen_is_zero_for_identical_and_positive_for_blurred():
    torch.manual_seed(0)
    hr = torch.rand(1, 3, 24, 24)
    assert hfen(hr, hr).item() == 0.0
    blurred = torch.nn.functional.avg_pool2d(hr, 3, stride=1, padding=1)
    assert hfen(blurred, hr).item() > 1.0
    assert sr_loss(blurred, hr, 0.2) > sr_loss(blurred, hr, 0.0)


def test_a_search_step_gives_theta_grad_l_train_and_a_grad_l_train_plus_lambda_l_val_plus_gamma_l_p():
    """MiLeNAS (Eq. 5-6), exactly: theta on L_train; A on L_train + lambda * L_val + gamma * L_P, all at the same
    (theta, A). Any other mix (theta also on L_val, A on L_val alone, a missing L_P) fails here."""
    net = _tiny_supernet()
    with torch.no_grad():  # away from the near-uniform init, so every term has a sizeable gradient
        net.alphas.normal_()
        for b in net.betas:
            b.normal_()
    g = torch.Generator().manual_seed(1)
    train = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))
    val = (torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g))
    forward_loss = lambda x, y: sr_loss(net(x), y, 0.2)  # noqa: E731
    theta, arch = net.weight_parameters(), net.arch_parameters()
    l_train = forward_loss(*train)
    d_train_theta = torch.autograd.grad(l_train, theta, retain_graph=True)
    d_train_arch = torch.autograd.grad(l_train, arch)
    d_val_arch = torch.autograd.grad(forward_loss(*val), arch)
    d_param_arch = torch.autograd.grad(param_loss(net.op_weights(), net.channels), arch, allow_unused=True)
    assert d_param_arch[0].abs().sum() > 0  # L_P is a differentiable function of alpha

    class NoStep(torch.optim.SGD):  # the gradients stay at (theta, A): nothing moves
        def step(self, closure=None):
            return None

    lam, gamma = 0.7, 0.3
    search_step(net, NoStep(theta, lr=0.0), NoStep(arch, lr=0.0), forward_loss, train, val, lam=lam, gamma=gamma)
    for p, ref in zip(theta, d_train_theta, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
    for p, t, v, lp in zip(arch, d_train_arch, d_val_arch, d_param_arch, strict=True):
        torch.testing.assert_close(p.grad, t + lam * v + gamma * (0 if lp is None else lp), rtol=1e-5, atol=1e-7)


def test_one_search_step_moves_alpha_and_beta_and_derives_a_buildable_genotype():
    net = _tiny_supernet()
    w_opt = torch.optim.Adam(net.weight_parameters(), 3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-8)
    g = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g),  # noqa: E731
                     torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g))

    def forward_loss(lr_u8, hr_u8):
        return sr_loss(net(to_float(lr_u8, torch.device("cpu"))), to_float(hr_u8, torch.device("cpu")), 0.2)

    before = [p.detach().clone() for p in net.arch_parameters()]
    theta_before = [p.detach().clone() for p in net.weight_parameters()]
    loss_train, loss_val, loss_param = search_step(net, w_opt, a_opt, forward_loss, batch(), batch(), lam=1.0, gamma=0.2)
    assert loss_val is not None and loss_param is not None and torch.isfinite(loss_train)
    for p, old in zip(net.arch_parameters(), before):  # alpha and every beta: non-zero gradient, changed value
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert not torch.equal(p.detach(), old)
    assert any(not torch.equal(p.detach(), old) for p, old in zip(net.weight_parameters(), theta_before))

    # warm-up step: weights move, the architecture gets no gradient at all
    before = [p.detach().clone() for p in net.arch_parameters()]
    search_step(net, w_opt, a_opt, forward_loss, batch(), None, lam=1.0, gamma=0.2)
    assert all(p.grad is None for p in net.arch_parameters())
    assert all(torch.equal(p.detach(), old) for p, old in zip(net.arch_parameters(), before))

    genotype = net.genotype(seed=0, step=1)
    text = genotype.to_json()
    reloaded = loads(text)
    assert reloaded.architecture_equals(genotype)
    assert json.loads(text)["provenance"]["seed"] == 0
    assert len(reloaded.provenance["betas"]) == 2 and len(reloaded.provenance["alphas"]) == 3
    model = DLSR(reloaded)
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 32, 32)


def test_derive_genotype_rules():
    alphas = torch.zeros(3, 9)
    alphas[0, 6] = alphas[1, 5] = alphas[2, 0] = 1.0
    betas = [torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.1, 0.7]), torch.tensor([0.0, 3.0, 0.0, 2.0])]
    g = derive_genotype(alphas, betas, scale=3, channels=16, num_cells=5, provenance={"seed": 7})
    assert [c.inputs for c in g.cells] == [(0,), (1,), (1, 2), (1, 3), (2, 4)]  # top-2, ascending
    assert all(c.ops == ("sep_conv_7x7", "sep_conv_5x5", "conv_1x1") for c in g.cells)
    assert g.scale == 3 and g.channels == 16 and g.provenance["seed"] == 7
    # per-cell alphas pick per-cell ops
    per_cell = torch.zeros(5, 3, 9)
    per_cell[4, :, 8] = 5.0
    g = derive_genotype(per_cell, betas, scale=2, channels=8, num_cells=5)
    assert g.cells[4].ops == ("dil_conv_5x5",) * 3 and g.cells[0].ops == ("conv_1x1",) * 3
    with pytest.raises(ValueError):
        derive_genotype(alphas, betas[:2], scale=2, channels=8, num_cells=5)
    # ties in beta go to the earlier inputs, as ties in alpha go to the earlier op (argmax)
    tied = [torch.zeros(2), torch.zeros(3), torch.tensor([0.0, 1.0, 1.0, 1.0])]
    g = derive_genotype(torch.zeros(3, 9), tied, scale=2, channels=8, num_cells=5)
    assert [c.inputs for c in g.cells[2:]] == [(1, 2), (1, 2), (2, 3)] and g.cells[0].ops == ("conv_1x1",) * 3


def test_paper_genotype_links_are_in_the_search_space():
    """The shipped genotype (B3<-(B1,B2), B4<-(B2,B3), B5<-(B2,B4), B6<-(B4,B5)) is derivable."""
    from dlsr_infer.genotype import builtin

    paper = builtin("dlsr_x2")
    alphas = torch.zeros(3, 9)
    for k, op in enumerate(paper.cells[0].ops):
        alphas[k, OP_NAMES.index(op)] = 1.0
    betas = []
    for cell in paper.cells[2:]:
        b = torch.zeros(len(betas) + 2)
        for i in cell.inputs:
            b[i - 1] = 1.0
        betas.append(b)
    g = derive_genotype(alphas, betas, scale=2, channels=paper.channels, num_cells=paper.num_cells)
    assert g.architecture_equals(paper)


def test_30_step_search_end_to_end(tmp_path):
    data = write_images(tmp_path / "data", n=6)
    # 4 cells: cell 4 chooses 2 of 3 links (with 3 cells, top-2 keeps both and no link is really searched)
    cfg = SearchConfig(out=str(tmp_path / "run"), data=[str(data)], channels=8, cells=4, steps=30, warmup=10,
                       batch=2, patch=32, val_holdout=2, snapshot_every=10, log_every=10, progress=False, threads=1)
    result = search(cfg)
    assert result.step == 30
    out = tmp_path / "run"
    names = sorted(p.name for p in (out / "genotypes").iterdir())
    for due in (10, 20, 30):  # the scheduled snapshots
        assert f"step_{due:08d}.json" in names
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    geno_records = [r for r in records if r["event"] == "genotype"]
    assert {r["reason"] for r in geno_records} >= {"scheduled"}
    changes = [r for r in geno_records if r["reason"] == "changed"]
    # every write of a change is a genotype that differs from the one before it
    for prev, cur in zip(geno_records, geno_records[1:]):
        if cur["reason"] == "changed":
            assert cur["cells"] != prev["cells"]
    assert all(r["step"] > cfg.warmup for r in changes[1:])  # after warm-up only the architecture moves
    for name in names:
        g = loads((out / "genotypes" / name).read_text())
        assert {"alphas", "betas", "alphas_softmax", "betas_softmax", "seed", "data", "step"} <= set(g.provenance)
        assert g.provenance["step"] == int(name[5:13])
        DLSR(g)
    final = loads((out / "genotype.json").read_text())
    assert final.architecture_equals(result.genotype)
    phases = [r["phase"] for r in records if r["event"] == "search"]
    assert phases == ["warm-up", "search", "search"]
    # the architecture did not move in warm-up (the step-10 snapshot holds A's init: SuperNet's own, from the
    # seed) and really moved in the search phase (|alpha| > 1e-3 held at the init already)
    torch.manual_seed(cfg.seed)
    init = SuperNet(scale=2, channels=8, num_cells=4)
    at_10 = loads((out / "genotypes" / "step_00000010.json").read_text()).provenance
    assert torch.allclose(torch.tensor(at_10["alphas"]), init.alphas.detach(), atol=1e-6)
    final_state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert (final_state["alphas"] - init.alphas.detach()).abs().max() > 1e-4
    for i, b0 in enumerate(init.betas):
        assert torch.allclose(torch.tensor(at_10["betas"][i]), b0.detach(), atol=1e-6)
        assert (final_state[f"betas.{i}"] - b0.detach()).abs().max() > 1e-4


def test_search_resume_continues_exactly_and_exports_its_genotype(tmp_path):
    from dlsr_search.checkpoint import load_checkpoint
    from dlsr_search.cli import main as cli_main
    from dlsr_search.config import ConfigError

    data = write_images(tmp_path / "data", n=6)
    common = dict(data=[str(data)], channels=8, cells=3, warmup=3, batch=2, patch=32, val_holdout=2,
                  snapshot_every=0, log_every=4, progress=False, threads=1)
    search(SearchConfig(out=str(tmp_path / "whole"), steps=8, **common))
    search(SearchConfig(out=str(tmp_path / "split"), steps=5, **common))
    with pytest.raises(ConfigError, match="already holds a search"):  # never overwritten without --resume
        search(SearchConfig(out=str(tmp_path / "split"), steps=8, **common))
    resumed = search(SearchConfig(out=str(tmp_path / "split"), steps=8, resume=True, **common))
    assert resumed.resumed_from == 5 and resumed.step == 8
    a = load_checkpoint(tmp_path / "whole" / "last.pt", kind="search")
    b = load_checkpoint(tmp_path / "split" / "last.pt", kind="search")
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert cli_main(["export", str(tmp_path / "split" / "last.pt"), str(tmp_path / "g.json")]) == 0
    exported = loads((tmp_path / "g.json").read_text())
    assert exported.architecture_equals(resumed.genotype) and exported.provenance["step"] == 8
    # an earlier genotype export is replaced; the checkpoint itself, or any other file, is not (export
    # onto last.pt made it a genotype JSON, and --resume then failed); a folder gets genotype.json
    assert cli_main(["export", str(tmp_path / "split" / "last.pt"), str(tmp_path / "g.json")]) == 0
    before = (tmp_path / "split" / "last.pt").read_bytes()
    assert cli_main(["export", str(tmp_path / "split" / "last.pt"), str(tmp_path / "split" / "last.pt")]) == 2
    assert (tmp_path / "split" / "last.pt").read_bytes() == before
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["export", str(tmp_path / "split" / "last.pt"), str(tmp_path / "notes.txt")]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "gdir").mkdir()
    assert cli_main(["export", str(tmp_path / "split" / "last.pt"), str(tmp_path / "gdir")]) == 0
    assert loads((tmp_path / "gdir" / "genotype.json").read_text()).architecture_equals(resumed.genotype)
    # a search checkpoint is no warm start for a retrained network (its mixed ops are not the network's),
    # and a mistyped .pt path is a missing checkpoint, not 'no model directory ... nor a Hub repo id'
    from dlsr_search.checkpoint import CheckpointError
    from dlsr_search.transfer import source_state_dict

    with pytest.raises(CheckpointError, match="is a 'search' checkpoint, expected a 'train' one"):
        source_state_dict(tmp_path / "whole" / "last.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope/last.pt"):
        source_state_dict(tmp_path / "nope" / "last.pt")

    # data it cannot use: refused before the run writes anything (a new folder) or records a start (a resume)
    with pytest.raises(ConfigError, match="cannot hold out 10 of 6"):
        search(SearchConfig(out=str(tmp_path / "new"), steps=8, **{**common, "val_holdout": 10}))
    assert not (tmp_path / "new").exists()
    for f in sorted(data.iterdir())[1:]:  # the data folder lost images since: the resume is refused as it is
        f.unlink()
    before = {f.name: f.read_bytes() for f in (tmp_path / "split").iterdir() if f.is_file()}
    with pytest.raises(ConfigError, match="cannot hold out 2 of 1"):
        search(SearchConfig(out=str(tmp_path / "split"), steps=12, resume=True, **common))
    assert {f.name: f.read_bytes() for f in (tmp_path / "split").iterdir() if f.is_file()} == before


def test_a_diverged_search_stops_before_writing_a_nan_genotype_or_checkpoint(tmp_path, monkeypatch):
    from dlsr_search.config import TrainingDiverged

    data = write_images(tmp_path / "data", n=6)
    cfg = dict(data=[str(data)], channels=8, cells=3, warmup=2, batch=2, patch=32, val_holdout=2, snapshot_every=0,
               log_every=1, ckpt_every=1, progress=False, threads=1, out=str(tmp_path / "s"))
    real = torch.optim.Adam.step

    def poisoned(self, *a, **k):  # the architecture optimizer's first step makes the alphas NaN
        out = real(self, *a, **k)
        if self.defaults["betas"][0] == 0.5:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"no longer finite at step 3; .*last.pt \(step 2\) is left as it was. "
                                               r"Start a new run with a lower --lr or --arch-lr$"):
        search(SearchConfig(steps=6, **cfg))
    records = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged"
    assert not list((tmp_path / "s").glob("genotypes/step_00000003.json"))
    for path in (tmp_path / "s").glob("genotypes/*.json"):
        assert "NaN" not in path.read_text()


@pytest.mark.parametrize("change,message", [
    ({"cells": 2}, "--cells must be from 3 to 32, got 2"),
    ({"cells": 33}, "--cells must be from 3 to 32, got 33"),
    ({"channels": 516}, "--channels must be a multiple of 4 .* from 4 to 512, got 516"),
    ({"steps": 20, "warmup": 20}, "--steps 20 must be more than --warmup 20"),
    ({"warmup": -1}, "--warmup -1 \\(>= 0\\)"),
    ({"lam": float("nan")}, "--lam must be a finite number >= 0, got nan"),
    ({"gamma": -0.2}, "--gamma must be a finite number >= 0, got -0.2"),
    ({"val_holdout": 2.5}, "--val-holdout 2.5: a fraction below 1 or a whole number of images"),
])
def test_search_options_that_would_fail_late_are_refused_before_anything_is_written(tmp_path, change, message):
    """Each of these used to fail after the data had loaded (a traceback), at the first genotype snapshot,
    or never: --steps within the warm-up wrote the random initial alphas as 'the final genotype'."""
    from dlsr_search.config import ConfigError

    data = write_images(tmp_path / "data", n=4)
    cfg = dict(data=[str(data)], channels=8, cells=3, warmup=2, steps=4, batch=2, patch=32, val_holdout=2,
               progress=False, threads=1, out=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=message):
        search(SearchConfig(**{**cfg, **change}))
    assert not (tmp_path / "s").exists()



def test_a_search_stopped_by_a_signal_gives_no_final_genotype_and_resumes(tmp_path, monkeypatch, capsys):
    """Stopped in warm-up, a search's alphas are still their random init: it wrote that as its 'final'
    genotype.json and the CLI printed it as the result. Now: no genotype.json, a 'stopped' line, --resume."""
    import os
    import signal

    import dlsr_search.search as search_mod
    from dlsr_search.cli import main as cli_main

    data = write_images(tmp_path / "data", n=6)
    real_step, calls = search_mod.search_step, []

    def stop_at_second_step(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # StopRequest: finish this step, checkpoint, stop
        return real_step(*a, **kw)

    monkeypatch.setattr(search_mod, "search_step", stop_at_second_step)
    argv = ["search", "--out", str(tmp_path / "run"), "--data", str(data), "--channels", "8", "--cells", "3",
            "--steps", "8", "--warmup", "5", "--batch", "2", "--patch", "32", "--val-holdout", "2",
            "--threads", "1", "--no-progress"]
    assert cli_main(argv) == 0
    assert "stopped at step 2: no final genotype yet (resume with --resume)" in capsys.readouterr().out
    out = tmp_path / "run"
    assert not (out / "genotype.json").exists()
    assert [r["event"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())][-1] == "stop"
    assert cli_main(["export", str(out / "last.pt"), str(tmp_path / "g.json")]) == 2  # the random init: refused
    assert "stopped at step 2, within its 5-step warm-up" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()
    monkeypatch.setattr(search_mod, "search_step", real_step)
    # images added since the checkpoint: the held-out split would change under the run, so no resume
    write_images(tmp_path / "more", n=1, seed=3)
    (tmp_path / "more" / "img0.png").rename(data / "img9.png")
    with pytest.raises(ConfigError, match=r"the training images changed .*\(6 then, 7 now\)"):
        search(SearchConfig(out=str(out), steps=8, resume=True), explicit={"out", "steps", "resume"})
    (data / "img9.png").unlink()
    assert cli_main(["search", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert f"genotype: {out / 'genotype.json'}" in capsys.readouterr().out
    assert loads((out / "genotype.json").read_text()).provenance["step"] == 8
