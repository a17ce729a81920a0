"""The fused inference form (`dlsr_infer.fast`) against the layers it replaces.

Parity: max abs diff <= 1e-4 in fp32 on [0, 1] images, for every bundled genotype and for random
genotypes that together use all nine MRB ops (and multi-input links), on both backends. Then the
automatic use from `DLSR.forward` (when it applies, when it must not, cache invalidation), the bf16
path (parity on random weights; Set5 PSNR with the authors' trained weights) and torch.compile (slow).
"""
from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from dlsr_infer import fast
from dlsr_infer.genotype import BUILTIN, OP_NAMES, Genotype, builtin
from dlsr_infer.model import DLSR

ATOL = 1e-4
BACKENDS = ["aten"] + (["mkldnn"] if fast.mkldnn_fusion_available() else [])


def _randomize(model: DLSR, seed: int) -> DLSR:
    """Non-default weights: biases and all, at a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = (1.0 / fan_in) ** 0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _layers(model: DLSR, x: torch.Tensor) -> torch.Tensor:
    """The reference: the layers themselves (autograd on, so no fused form)."""
    with torch.enable_grad():
        return model(x).detach()


def _random_genotypes() -> list[Genotype]:
    """Three random genotypes, 2-4 cells, multi-input links, scales 2/3/4, using all nine ops between them."""
    rng = random.Random(1234)
    ops = list(OP_NAMES)
    rng.shuffle(ops)
    pool = ops + [rng.choice(OP_NAMES) for _ in range(9)]  # 18 op slots: every op at least once
    genotypes = []
    for g, (scale, n_cells, channels) in enumerate([(2, 2, 16), (3, 3, 24), (4, 1, 12)]):
        cells = []
        for j in range(1, n_cells + 1):
            n_in = rng.randint(1, j)
            inputs = sorted(rng.sample(range(j), n_in))
            cells.append({"ops": [pool.pop() for _ in range(3)], "inputs": inputs})
        genotypes.append(Genotype.from_dict({"format_version": 1, "scale": scale, "in_channels": 3, "out_channels": 3,
                                             "channels": channels, "cells": cells, "name": f"random{g}"}))
    return genotypes


RANDOM_GENOTYPES = _random_genotypes()


def test_random_genotypes_cover_every_op_and_links():
    used = {op for g in RANDOM_GENOTYPES for c in g.cells for op in c.ops}
    assert used == set(OP_NAMES)
    assert any(len(c.inputs) > 1 for g in RANDOM_GENOTYPES for c in g.cells)
    assert {g.scale for g in RANDOM_GENOTYPES} == {2, 3, 4}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BUILTIN)
def test_parity_builtin(name, backend):
    model = _randomize(DLSR(builtin(name)), seed=hash(name) % 1000)
    x = torch.rand(1, 3, 29, 38, generator=torch.Generator().manual_seed(0))
    ref = _layers(model, x)
    with torch.inference_mode():
        y = fast.build(model, backend=backend)(x)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert (y - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge_1x1", [False, True])
@pytest.mark.parametrize("index", range(len(RANDOM_GENOTYPES)))
def test_parity_random_genotypes(index, merge_1x1, backend):
    genotype = RANDOM_GENOTYPES[index]
    model = _randomize(DLSR(genotype), seed=index)
    x = torch.rand(2, 3, 23, 31, generator=torch.Generator().manual_seed(index))  # batch 2, odd sizes
    ref = _layers(model, x)
    with torch.no_grad():
        y = fast.build(model, backend=backend, merge_1x1=merge_1x1)(x)
    assert (y - ref).abs().max().item() <= ATOL


def test_parity_default_weights_and_min_size():
    model = DLSR(builtin("dlsr_x3"))  # PyTorch's default init
    x = torch.rand(1, 3, 15, 15)  # the smallest input the network accepts
    ref = _layers(model, x)
    with torch.inference_mode():
        assert (model(x) - ref).abs().max().item() <= ATOL


# --- automatic use from DLSR.forward -----------------------------------------------------------
def _small_model(seed: int = 0) -> DLSR:
    return _randomize(DLSR(builtin("dlsr_s_x2")), seed)


def _cached(model: DLSR, precision: str | None = None):
    """The model's cached fused form for `precision` (None: the one form built so far)."""
    builds = model.__dict__.get("_fast_cache") or {}
    if precision is None:
        assert len(builds) <= 1, sorted(builds)
        return next(iter(builds.values()))[1] if builds else None
    return builds[precision][1] if precision in builds else None


def test_forward_uses_fused_form_only_for_eval_without_grad():
    model = _small_model()
    x = torch.rand(1, 3, 20, 24)
    model(x)  # autograd on: layers
    assert _cached(model) is None
    model.train()
    with torch.no_grad():
        model(x)
    assert _cached(model) is None
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(_cached(model), fast.FastDLSR)
    assert (y - _layers(model, x)).abs().max().item() <= ATOL
    model.fast_inference = False
    fast.invalidate(model)
    with torch.inference_mode():
        model(x)
    assert _cached(model) is None


def test_fused_form_is_not_part_of_the_module():
    model = _small_model()
    keys = set(model.state_dict())
    n_modules = len(list(model.modules()))
    with torch.inference_mode():
        model(torch.rand(1, 3, 16, 16))
    assert _cached(model) is not None
    assert set(model.state_dict()) == keys
    assert len(list(model.modules())) == n_modules
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(clone(x), model(x), atol=ATOL)


@pytest.mark.parametrize("edit", ["inplace", "load_state_dict", "data", "replace", "optimizer", "data_sign",
                                  "data_permute", "data_tiny", "inference_tensor"])
def test_cache_follows_weight_changes(edit):
    model = _small_model(seed=1)
    x = torch.rand(1, 3, 18, 22)
    with torch.inference_mode():
        model(x)
    first = _cached(model)
    w = model.cells[0].mrb[1][1].weight
    if edit == "inplace":
        with torch.no_grad():
            w.mul_(1.5)
    elif edit == "load_state_dict":
        model.load_state_dict(_small_model(seed=2).state_dict())
    elif edit == "data":
        w.data.mul_(-0.5)  # bypasses the version counter
    elif edit == "replace":
        model.stem.weight = torch.nn.Parameter(model.stem.weight.detach() * 2)
    elif edit == "data_sign":  # keeps every norm: only the position-weighted sum sees it
        model.upsampler.conv.weight.data.neg_()
    elif edit == "data_permute":  # e.g. a stem flipped to take BGR input: norms kept too
        model.stem.weight.data.copy_(model.stem.weight.data.flip(1).clone())
    elif edit == "data_tiny":  # one weight nudged by 1e-7 of the largest: under float32 resolution of norms and sums
        big = max(model.parameters(), key=lambda t: t.numel())
        big.data.view(-1)[7] += 1e-7 * big.data.abs().max()
    elif edit == "inference_tensor":  # parameters made under inference_mode have no version counter
        with torch.inference_mode():
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
            model(x)
            first = _cached(model)
            model.upsampler.conv.bias.neg_()
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).mean().backward()
        opt.step()
        model.eval()
    with torch.inference_mode():
        y = model(x)
    assert _cached(model) is not first
    if edit == "inference_tensor":  # (no autograd reference for inference tensors: compare with a fresh build)
        assert (y - fast.build(model)(x)).abs().max().item() == 0
        return
    assert (y - _layers(model, x)).abs().max().item() <= ATOL
    with torch.inference_mode():  # unchanged weights: the cache is reused
        model(x)
    second = _cached(model)
    with torch.inference_mode():
        model(x)
    assert _cached(model) is second


def test_one_build_per_precision_and_exact_fp32_whatever_the_model_is_set_to():
    """Callers mixing fp32 and bf16 (two threads, the fp32 re-run of a bf16 tile) reuse one build each
    instead of rebuilding by turns; `exact_fp32()` runs fp32 for a model set to bf16 (dtype="fp32")."""
    model = _small_model()
    model.inference_precision = "bf16"
    x = torch.rand(1, 3, 18, 20)
    builds = []
    real_build = fast.build
    try:
        fast.build = lambda m, **k: builds.append(k.get("precision")) or real_build(m, **k)
        with torch.inference_mode():
            for _ in range(3):
                low = model(x)
                with fast.exact_fp32():
                    exact = model(x)
    finally:
        fast.build = real_build
    assert builds == ["bf16", "fp32"]
    assert _cached(model, "bf16").precision == "bf16" and _cached(model, "fp32").precision == "fp32"
    assert (exact - _layers(model, x)).abs().max().item() <= ATOL < (low - exact).abs().max().item()


def test_exact_fp32_turns_cudnn_tf32_off_while_any_thread_is_inside(monkeypatch):
    """torch runs float32 cuDNN convolutions in TF32 on Ampere and later GPUs unless told not to:
    dtype="fp32" and dlsr-eval on CUDA were neither exact nor equal to the CPU. The flag is process-wide,
    so it is counted: it stays off until the last block ends, then the process's own setting returns."""
    import threading

    conv = torch.backends.cudnn.conv
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(conv, "fp32_precision", "tf32")  # the default, restored after the test
    monkeypatch.setattr(torch.backends.cudnn.rnn, "fp32_precision", "tf32")
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with fast.exact_fp32():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with fast.exact_fp32():
        assert conv.fp32_precision != "tf32" and not torch.backends.cudnn.allow_tf32  # both forms agree
        t.start()
        assert inside.wait(10)
    assert conv.fp32_precision != "tf32"  # the other thread is still inside
    leave.set()
    t.join()
    assert conv.fp32_precision == "tf32" and torch.backends.cudnn.rnn.fp32_precision == "tf32"
    assert torch.backends.cudnn.allow_tf32
    # TF32 chosen with torch's newer, process-wide switch: the legacy one alone left convs inheriting it
    monkeypatch.setattr(torch.backends.cudnn, "fp32_precision", "tf32")
    with fast.exact_fp32():
        assert conv.fp32_precision == "ieee" and torch.backends.cudnn.rnn.fp32_precision == "ieee"
    assert conv.fp32_precision == "tf32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with fast.exact_fp32():  # no CUDA: the process-wide setting is left alone
        assert conv.fp32_precision == "tf32"


@pytest.mark.parametrize("channels", [(1, 3), (3, 1), (4, 4)])
def test_bf16_form_of_a_network_whose_input_and_output_channels_differ(channels):
    """The bf16 form adds an upscaled copy of the input to the output (only its difference is rounded):
    with other output channels than input ones it crashed ('Add Fusion's inputs should have same shape')."""
    cin, cout = channels
    model = _randomize(DLSR(builtin("dlsr_s_x2").replace(in_channels=cin, out_channels=cout)), 3)
    x = torch.rand(1, cin, 20, 18)
    with torch.inference_mode():
        y = fast.build(model, precision="bf16")(x)
    assert y.shape == (1, cout, 40, 36) and _psnr(y, _layers(model, x)) > 40.0


def test_hooks_and_foreign_inputs_fall_back_to_layers():
    model = _small_model()
    seen = []
    handle = model.cells[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        model(torch.rand(1, 3, 16, 16))
    assert seen and _cached(model) is None
    handle.remove()
    with torch.inference_mode():
        y = model(torch.rand(1, 3, 16, 16, dtype=torch.float64).float())
        model.double()
        z = model(torch.rand(1, 3, 16, 16, dtype=torch.float64))  # float64: layers
    assert y.dtype == torch.float32 and z.dtype == torch.float64


def test_precision_resolution(monkeypatch):
    assert fast.resolve_precision("fp32") == "fp32"
    assert fast.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError):
        fast.resolve_precision("fp16")
    fast.bf16_native.cache_clear()
    try:
        monkeypatch.setenv("DLSR_BF16", "0")
        assert fast.resolve_precision("auto") == "fp32"
        fast.bf16_native.cache_clear()
        monkeypatch.setenv("DLSR_BF16", "1")
        assert fast.resolve_precision("auto") == "bf16"
        assert fast.resolve_precision("auto", "meta") == "fp32"  # bf16 auto-selection is for CPUs only
    finally:
        fast.bf16_native.cache_clear()


# --- bf16 ----------------------------------------------------------------------------------------
def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_fp32(backend):
    model = _randomize(DLSR(builtin("dlsr_x4")), seed=3)
    x = torch.rand(1, 3, 30, 34, generator=torch.Generator().manual_seed(3))
    ref = _layers(model, x)
    with torch.inference_mode():
        y = fast.build(model, precision="bf16", backend=backend)(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _psnr(y, ref) > 45.0  # random weights; the trained-weights check is below


def test_auto_precision_checks_bf16_parity(monkeypatch):
    monkeypatch.setenv("DLSR_BF16", "1")
    fast.bf16_native.cache_clear()
    try:
        model = _small_model()
        model.inference_precision = "auto"
        x = torch.rand(1, 3, 20, 20)
        with torch.inference_mode():
            model(x)
        assert _cached(model).precision == "bf16"  # random weights: ~60 dB from fp32
        assert fast.bf16_parity(model) > fast.BF16_MIN_PSNR
        monkeypatch.setattr(fast, "BF16_MIN_PSNR", 200.0)  # a model bf16 would hurt: fp32, with a warning
        fast.invalidate(model)
        with torch.inference_mode(), pytest.warns(RuntimeWarning, match="using fp32"):
            y = model(x)
        assert _cached(model).precision == "fp32"
        assert (y - _layers(model, x)).abs().max().item() <= ATOL
        assert fast.preferred_dtype(model) == torch.float32
        monkeypatch.setattr(fast, "BF16_MIN_PSNR", 50.0)
        fast.invalidate(model)  # the decision is cached with the form until the weights change
        assert fast.preferred_dtype(model) == torch.bfloat16
        assert fast.preferred_dtype(model, "meta") == torch.float32
        # 'auto' then the bf16 tiles of upscale(dtype="auto"), call after call: one probe and one build in
        # all (each call built the bf16 form twice and probed again, since 'auto' and 'bf16' had two keys)
        fast.invalidate(model)
        calls = []
        real_build, real_parity = fast.build, fast.bf16_parity
        monkeypatch.setattr(fast, "build", lambda m, **k: calls.append(("build", k.get("precision"))) or real_build(m, **k))
        monkeypatch.setattr(fast, "bf16_parity", lambda m, mod=None: calls.append(("parity",)) or real_parity(m, mod))
        for _ in range(3):
            assert fast.preferred_dtype(model) == torch.bfloat16
            assert fast.fast_module(model, "bf16") is fast.fast_module(model, "auto")
        assert calls == [("build", "bf16"), ("parity",), ("build", "fp32")]  # the probe's fp32 reference
    finally:
        fast.bf16_native.cache_clear()


def test_autocast_bf16_selects_the_bf16_form():
    model = _small_model()
    x = torch.rand(1, 3, 20, 20)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert _cached(model).precision == "bf16"
    assert y.dtype == torch.float32 and _psnr(y, _layers(model, x)) > 45.0
    model.inference_precision = "bf16"
    with torch.inference_mode():
        model(x)
    assert _cached(model).precision == "bf16"


def test_bf16_set5_psnr_with_trained_weights(benchmarks_dir, authors_dir):
    """The bf16 form with the authors' trained x2 weights loses <= 0.02 dB PSNR-Y on Set5 (MATLAB LR)."""
    from dlsr_infer.convert import convert_authors_checkpoint
    from dlsr_infer.evaluate import load_rgb, modcrop
    from dlsr_infer.metrics import psnr_y

    ckpt = authors_dir / "RFDN_beta21_ps128_20210128_1000.pt"
    set5 = benchmarks_dir / "Set5"
    assert ckpt.is_file() and (set5 / "LR_bicubic" / "X2").is_dir()  # the shared data (conftest: found or skipped)
    model = convert_authors_checkpoint(ckpt, builtin("dlsr_x2"))
    bf16 = fast.build(model, precision="bf16")
    drops = []
    for f in sorted((set5 / "HR").glob("*.png")):
        hr = modcrop(load_rgb(f), 2)
        lr = load_rgb(set5 / "LR_bicubic" / "X2" / f"{f.stem}x2.png")
        x = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)
        with torch.inference_mode():
            outs = [model(x), bf16(x)]
        sr = [o[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy() for o in outs]
        drops.append(psnr_y(sr[0], hr, crop=2) - psnr_y(sr[1], hr, crop=2))
    assert float(np.mean(drops)) <= 0.02, drops


@pytest.mark.slow
def test_torch_compile_parity():
    model = _randomize(DLSR(builtin("dlsr_s_x2")), seed=5)
    x = torch.rand(1, 3, 24, 24)
    compiled = torch.compile(fast.build(model, backend="aten"))
    with torch.inference_mode():
        y = compiled(x)
    assert (y - _layers(model, x)).abs().max().item() <= ATOL


def test_tune_malloc_in_a_subprocess():
    """Process-wide, so checked in a child: applies on Linux/glibc, and the fused form still matches."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        from dlsr_infer import fast
        from dlsr_infer.genotype import builtin
        from dlsr_infer.model import DLSR
        ok = fast.tune_malloc()
        torch.manual_seed(0)
        m = DLSR(builtin("dlsr_s_x2"))
        x = torch.rand(1, 3, 24, 24)
        ref = m(x).detach()
        with torch.inference_mode():
            d = (m(x) - ref).abs().max().item()
        print(ok, d)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    ok, diff = out.stdout.split()
    import platform

    assert ok == str(sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    assert float(diff) <= ATOL


def test_forward_mode_ad_and_vmap_under_no_grad_run_the_layers():
    """jvp/jacfwd and vmap work under no_grad, where the fused form ran: zero or missing tangents, crashes."""
    import torch.autograd.forward_ad as fwAD

    model = _small_model().eval()
    x, v = torch.rand(1, 3, 16, 18), torch.rand(1, 3, 16, 18)
    _, ref = torch.func.jvp(model, (x,), (v,))
    with torch.no_grad():
        _, tangent = torch.func.jvp(model, (x,), (v,))
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(model(fwAD.make_dual(x, v))).tangent
        batched = torch.func.vmap(model)(torch.rand(2, 1, 3, 16, 18))
    torch.testing.assert_close(tangent, ref, rtol=1e-4, atol=1e-5)
    assert dual is not None
    torch.testing.assert_close(dual, ref, rtol=1e-4, atol=1e-5)
    assert batched.shape == (2, 1, 3, 32, 36)
    with torch.inference_mode():  # plain inference still takes the fused form
        model(x)
    assert _cached(model) is not None


def test_exact_fp32_wins_over_an_enclosing_autocast():
    """`upscale(dtype="fp32")` inside a caller's bf16 autocast ran bf16 (6.8e-3 off the layers)."""
    from dlsr_infer.upscaling import upscale

    model = _small_model().eval()
    x = torch.rand(1, 3, 20, 22)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upscale(x, model=model, dtype="fp32", tile=0)
        with torch.inference_mode(), fast.exact_fp32():
            direct = model(x)
    ref = _layers(model, x).clamp(0, 1)
    assert (out - ref).abs().max().item() <= 1e-5 and (direct.clamp(0, 1) - ref).abs().max().item() <= 1e-5


def test_an_edited_network_runs_its_layers_not_the_fused_form_of_the_original():
    """The fused form hard-codes the genotype's modules: a swapped activation, a patched forward or a
    replaced ESA ran silently as the original network (or failed with an AttributeError)."""
    x = torch.rand(1, 3, 16, 18)
    edits = {
        "relu": lambda m: setattr(m.cells[1], "act", nn.ReLU()),
        "forward": lambda m: setattr(m.cells[0], "forward", lambda t: t),
        "esa": lambda m: setattr(m.cells[0], "esa", nn.Identity()),
        "parametrized": lambda m: torch.nn.utils.parametrize.register_parametrization(
            m.lr_conv, "weight", _Double()),
    }
    for name, edit in edits.items():
        model = _small_model().eval()
        with torch.inference_mode():
            model(x)  # a fused form built and checked before the edit
        edit(model)
        with torch.inference_mode():
            got = model(x)
        torch.testing.assert_close(got, _layers(model, x), rtol=0, atol=1e-6, msg=name)
    model = _small_model().eval()
    assert fast.layout_ok(model)
    # a module replaced by one of its own type with other settings, the old one freed first (its address
    # could be handed to the new one, which an id()-based check took for the old)
    with torch.inference_mode():
        model(x)
    model.cells[1].act = nn.Identity()
    model.cells[1].act = nn.LeakyReLU(0.9)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, _layers(model, x), rtol=0, atol=1e-6)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w
