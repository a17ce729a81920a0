"""The fused inference form of a `DLSR` network: what eval-mode, no-grad `DLSR.forward` runs on CPU.

`FastDLSR` computes the same function as the layers (max abs diff <= 1e-4 in fp32 on [0, 1] images;
tests/test_fast.py checks every bundled genotype and random genotypes using all nine ops) with fewer
and fused kernels. `build(model)` makes one; `DLSR.forward` uses `dispatch()`, which keeps one cached
on the model (`fast_module`) and rebuilds it whenever a parameter changes (`param_key`).

What it does (each step measured, see benchmarks/README.md; folds are exact algebra in float64):

* a plain conv MRB (`conv_kxk`) plus its identity residual is one conv with weight W + I (identity on
  the centre tap), LeakyReLU fused in;
* bias, ReLU/LeakyReLU/sigmoid and residual adds run inside the convolutions (oneDNN post-ops via
  `torch.ops.mkldnn._convolution_pointwise`), the add writing into a buffer we own where possible;
* a 1x1 conv over a concatenation (cell links, the network's fuse) is a chain of per-input 1x1 convs
  accumulating in place: no concatenated tensor, and each cell output is folded in (and freed) as
  soon as it is made, which also lowers peak memory;
* ESA's `conv1` is folded into the cell's fuse conv (conv1 o fuse), the bilinear resize runs in fp32;
* channels_last throughout, no autograd, the refine conv padded to a 16-channel multiple (oneDNN's
  blocking), the pixel shuffle done as one gather into the contiguous NCHW float32 output.

Tried and dropped, because they measured slower: merging a `conv_1x1` MRB with its distillation conv
into one conv (`merge_1x1=True`; the channel slices it produces cost more than the saved read), one
fuse conv with sliced outputs for ESA, torch.compile (slower than this, and ~30-60 s to compile).

Backends: "mkldnn" (CPU, fused post-ops) and "aten" (plain `F.conv2d` + in-place activations; any
device; what ONNX export and torch.compile trace). Precisions: "fp32"; "bf16" (bfloat16 weights and
activations, float32 biases; the stem runs in fp32 so the image is not rounded, and the upsampler
predicts the output minus a nearest-neighbour upscale of the input, added back in fp32, so the output
is not rounded either: Set5 PSNR-Y drop 0.003 dB with the authors' x2 weights); "auto" (bf16 on a CPU
with native bf16 when a parity probe passes, else fp32).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import threading
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FastDLSR",
    "build",
    "dispatch",
    "exact_fp32",
    "ieee_cuda_convs",
    "fast_module",
    "invalidate",
    "tune_malloc",
    "preferred_dtype",
    "bf16_parity",
    "param_key",
    "bf16_native",
    "mkldnn_fusion_available",
    "resolve_precision",
    "PRECISIONS",
]

PRECISIONS = ("fp32", "bf16", "auto")
_LRELU_SLOPE = 0.05
_CL = torch.channels_last


# --- capability probes -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def mkldnn_fusion_available() -> bool:
    """True when oneDNN convolutions with fused post-ops can be called directly (CPU builds with MKLDNN)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.ones(1, 2, 3, 3).to(memory_format=_CL)
        w = torch.ones(2, 2, 1, 1)
        y = op(x, w, None, [0, 0], [1, 1], [1, 1], 1, "leaky_relu", [_LRELU_SLOPE], "")
        z = op.binary(x, y, w, None, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
        return bool(torch.equal(z, torch.full_like(z, 4.0)))
    except Exception:  # private op missing or changed: fall back to plain aten convs
        return False


def env_flag(name: str) -> bool | None:
    """An on/off switch from the environment: None when `name` is unset; '0', 'false', 'no', 'off' and
    the empty string are off, anything else is on."""
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@functools.lru_cache(maxsize=None)
def bf16_native() -> bool:
    """True when this CPU has native bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    oneDNN emulates bf16 on older AVX-512 CPUs, which is slower than fp32, so only native support
    counts. `DLSR_BF16=0/1` in the environment overrides the detection.
    """
    forced = env_flag("DLSR_BF16")
    if forced is not None:
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'fp32' or 'bf16' for a requested precision; 'auto' is bf16 only on a CPU with native bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cpu" and bf16_native() else "fp32"
    return precision


# --- one folded convolution --------------------------------------------------------------------
class FConv(nn.Module):
    """A convolution with its epilogue: optional residual `other` added, then an activation."""

    _UNARY = {"none": ("none", []), "relu": ("relu", []), "lrelu": ("leaky_relu", [_LRELU_SLOPE]),
              "sigmoid": ("sigmoid", [])}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, act: str = "none",
                 backend: str = "aten", dtype: torch.dtype = torch.float32, residual: bool = False) -> None:
        super().__init__()
        if act not in self._UNARY:
            raise ValueError(f"unknown activation {act!r}")
        self.register_buffer("weight", weight.detach().to(dtype).contiguous(), persistent=False)
        # oneDNN adds biases in its fp32 accumulator, so they stay float32 where the op allows it (not with
        # a fused residual add); aten needs matching dtypes
        bias_dtype = torch.float32 if backend == "mkldnn" and not residual else dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype).contiguous(),
                             persistent=False)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.act = act
        self.backend = backend

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (f"{i * self.groups}->{o}, k={kh}x{kw}, s={self.stride}, p={self.padding}, d={self.dilation}, "
                f"g={self.groups}, act={self.act}, backend={self.backend}")

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """conv(x) [+ other], activated. `inplace=True`: the result is written into `other` (which the
        caller owns and no longer needs)."""
        if self.backend == "mkldnn":
            return self._mkldnn(x, other, inplace)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        inplace = _inplace_ok()
        if other is not None:
            y = y.add_(other) if inplace else y + other
        if self.act == "lrelu":
            y = F.leaky_relu(y, _LRELU_SLOPE, inplace=inplace)
        elif self.act == "relu":
            y = F.relu(y, inplace=inplace)
        elif self.act == "sigmoid":
            y = y.sigmoid_() if inplace else y.sigmoid()
        return y

    def _mkldnn(self, x: torch.Tensor, other: torch.Tensor | None, inplace: bool) -> torch.Tensor:
        p, s, d = [self.padding] * 2, [self.stride] * 2, [self.dilation] * 2
        op = torch.ops.mkldnn._convolution_pointwise
        if other is None:
            attr, scalars = self._UNARY[self.act]
            return op(x, self.weight, self.bias, p, s, d, self.groups, attr, scalars, "")
        unary = "relu" if self.act == "relu" else None  # the only activation oneDNN fuses after an add here
        if inplace:  # accumulate into `other`: no new output buffer, one tensor fewer to stream through
            y = torch.ops.mkldnn._convolution_pointwise_.binary(other, x, self.weight, self.bias, p, s, d,
                                                                 self.groups, "add", None, unary, [], None)
        else:
            y = op.binary(x, other, self.weight, self.bias, p, s, d, self.groups, "add", None, unary, [], None)
        if self.act == "lrelu":
            y = F.leaky_relu_(y, _LRELU_SLOPE)
        elif self.act == "sigmoid":
            y = y.sigmoid_()
        return y


# --- folding helpers (float64) -----------------------------------------------------------------
def _w(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().double()


def _b(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    return conv.bias.detach().double()


def _plus_identity(w: torch.Tensor) -> torch.Tensor:
    """W + I for a same-padded conv (identity on the centre tap)."""
    w = w.clone()
    k = w.shape[-1]
    idx = torch.arange(w.shape[0], device=w.device)
    w[idx, idx, k // 2, k // 2] += 1.0
    return w


def _mm1x1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv `a` applied after the 1x1 conv `b` (weights only)."""
    return (a[:, :, 0, 0] @ b[:, :, 0, 0])[:, :, None, None]


# --- the folded network ------------------------------------------------------------------------
class _MRB(nn.Module):
    """One Mixed Residual Block, folded: returns lrelu(op(x) + x)."""

    def __init__(self, name: str, op: nn.Sequential, mk: Any) -> None:
        super().__init__()
        self.name = name
        self.kind = name.split("_")[0]  # conv | sep | dil
        convs = [m for m in op if isinstance(m, nn.Conv2d)]
        if self.kind == "conv":
            (c,) = convs
            self.plain = mk(_plus_identity(_w(c)), None, c, act="lrelu")
        elif self.kind == "sep":
            dw1, pw1, dw2, pw2 = convs
            self.dw1 = mk(_w(dw1), None, dw1)
            self.pw1 = mk(_w(pw1), None, pw1, act="relu")
            self.dw2 = mk(_w(dw2), None, dw2)
            self.pw2 = mk(_w(pw2), None, pw2, act="lrelu", residual=True)
        elif self.kind == "dil":
            dw, pw = convs
            self.dw1 = mk(_w(dw), None, dw)
            self.pw2 = mk(_w(pw), None, pw, act="lrelu", residual=True)
        else:  # pragma: no cover - genotype validation prevents this
            raise ValueError(f"unknown op {name!r}")

    def forward(self, x: torch.Tensor, own: bool = False) -> torch.Tensor:
        """lrelu(op(x) + x); `own`: x is a temporary the caller no longer needs (the residual add then
        writes into it)."""
        if self.kind == "conv":
            return self.plain(x)
        t = self.dw1(torch.relu(x))
        if self.kind == "sep":
            t = self.dw2(self.pw1(t))
        return self.pw2(t, other=x, inplace=own)


class _Cell(nn.Module):
    def __init__(self, cell: nn.Module, mk: Any, channels: int, merge_1x1: bool, pad_channels: bool) -> None:
        super().__init__()
        c = channels
        self.c = c
        self.merged: list[bool] = []
        self.steps = nn.ModuleList()
        for distill, op in zip(cell.distill, cell.mrb):
            name = _op_name(op)
            if name == "conv_1x1" and merge_1x1:
                # distill (C -> C/2, bias, lrelu) and the 1x1 MRB (C -> C, W + I, lrelu) read the same x
                w = torch.cat([_plus_identity(_w(op[0])), _w(distill)], 0)
                b = torch.cat([torch.zeros(c, dtype=torch.float64, device=w.device), _b(distill)], 0)
                self.steps.append(mk(w, b, distill, act="lrelu"))
                self.merged.append(True)
            else:
                self.steps.append(nn.ModuleList([mk(_w(distill), _b(distill), distill, act="lrelu"),
                                                 _MRB(name, op, mk)]))
                self.merged.append(False)
        # oneDNN's AVX-512 kernels work on 16-channel blocks: a 3x3 conv to 24 channels runs slower than
        # one to 32, so the refine conv gets zero output channels (and the fuse convs zero input columns)
        half = cell.refine.out_channels
        self.pad = _padded(half) - half if pad_channels else 0
        w_r, b_r = _w(cell.refine), _b(cell.refine)
        if self.pad:
            w_r = torch.cat([w_r, w_r.new_zeros(self.pad, *w_r.shape[1:])], 0)
            b_r = torch.cat([b_r, b_r.new_zeros(self.pad)], 0)
        self.refine = mk(w_r, b_r, cell.refine, act="lrelu")
        esa = cell.esa
        # the fuse conv (2C -> C) and ESA's conv1 after it (C -> C/4, no activation between) both become
        # convs over the concatenated distilled features: conv1 o fuse = (W1 W5, W1 b5 + b1). Two convs
        # rather than one with a sliced output: PyTorch's elementwise kernels are slow on channel slices
        # of channels_last tensors (measured), and ESA adds conv_f(c1_) elementwise.
        w5, b5 = _w(cell.fuse), _b(cell.fuse)
        if self.pad:
            w5 = torch.cat([w5, w5.new_zeros(w5.shape[0], self.pad, 1, 1)], 1)
        self.fuse = mk(w5, b5, cell.fuse)
        self.fuse_c1 = mk(_mm1x1(_w(esa.conv1), w5), _w(esa.conv1)[:, :, 0, 0] @ b5 + _b(esa.conv1), cell.fuse)
        self.conv_f = mk(_w(esa.conv_f), _b(esa.conv_f), esa.conv_f)
        self.conv2 = mk(_w(esa.conv2), _b(esa.conv2), esa.conv2)
        self.conv_max = mk(_w(esa.conv_max), _b(esa.conv_max), esa.conv_max, act="relu")
        self.conv3 = mk(_w(esa.conv3), _b(esa.conv3), esa.conv3, act="relu")
        self.conv3_ = mk(_w(esa.conv3_), _b(esa.conv3_), esa.conv3_)
        self.conv4 = mk(_w(esa.conv4), _b(esa.conv4), esa.conv4, act="sigmoid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        parts = []
        own = False  # the cell input may be read elsewhere; the MRB outputs are ours
        for merged, step in zip(self.merged, self.steps):
            if merged:
                y = step(x)
                parts.append(y[:, c:])
                x = y[:, :c].contiguous(memory_format=_CL)
            else:
                distill, mrb = step
                parts.append(distill(x))
                x = mrb(x, own)
            own = True
        parts.append(self.refine(x))
        del x
        # (folding the parts into the two sums one by one instead of concatenating measured slower)
        cat = _cat(parts)
        del parts
        h, c1_ = self.fuse(cat), self.fuse_c1(cat)
        del cat
        # ESA: strided conv, max-pool, small convs, bilinear up, mask = sigmoid(conv4(up + conv_f(c1_)))
        v = F.max_pool2d(self.conv2(c1_), kernel_size=7, stride=3)
        c3 = self.conv3_(self.conv3(self.conv_max(v)))
        cf = self.conv_f(c1_)
        if not _inplace_ok():
            up = F.interpolate(c3, size=h.shape[-2:], mode="bilinear", align_corners=False)
            return h * self.conv4(up + cf)
        # (PyTorch's bilinear resize is about twice as fast in float32 as in bf16)
        up = F.interpolate(c3.float(), size=h.shape[-2:], mode="bilinear", align_corners=False).add_(cf)
        return h.mul_(self.conv4(up.to(h.dtype)))


def _inplace_ok() -> bool:
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """Channel concatenation; for channels_last tensors done as a last-dim cat of NHWC views, which
    PyTorch runs several times faster than a dim-1 cat when an input is a channel slice."""
    if not _inplace_ok() or not all(t.is_contiguous(memory_format=_CL) or t.stride(1) == 1 for t in ts):
        return torch.cat(ts, 1)
    return torch.cat([t.permute(0, 2, 3, 1) for t in ts], 3).permute(0, 3, 1, 2)


def _padded(n: int) -> int:
    """n rounded up to a multiple of 16 when that costs at most a third more, else n."""
    m = -(-n // 16) * 16
    return m if 3 * m <= 4 * n else n


def _shuffle(y: torch.Tensor, scale: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """pixel_shuffle(y) (+ nearest-neighbour upscale of `base`) as a contiguous NCHW float32 tensor."""
    if not _inplace_ok() or not y.is_contiguous(memory_format=_CL):
        out = F.pixel_shuffle(y.float(), scale)
        if base is not None:
            out = out + F.interpolate(base.float(), scale_factor=scale, mode="nearest")
        return out.contiguous()
    n, c2, h, w = y.shape
    c = c2 // (scale * scale)
    out = torch.empty(n, c, h * scale, w * scale, dtype=torch.float32, device=y.device)
    view = out.view(n, c, h, scale, w, scale)
    # channels_last y is physically n, h, w, c, i, j: cast in place order (dense, vectorised), then one
    # gather into n, c, h, i, w, j (fused with the base add)
    src = y.float().permute(0, 2, 3, 1).view(n, h, w, c, scale, scale).permute(0, 3, 1, 4, 2, 5)
    if base is None:
        view.copy_(src)
    else:
        torch.add(src, base[:, :, :, None, :, None], out=view)
    return out


def _op_name(op: nn.Sequential) -> str:
    convs = [m for m in op if isinstance(m, nn.Conv2d)]
    k = convs[0].kernel_size[0]
    if len(convs) == 1:
        return f"conv_{k}x{k}"
    if len(convs) == 4:
        return f"sep_conv_{k}x{k}"
    return f"dil_conv_{k}x{k}"


class _CatConv(nn.Module):
    """act(W [x_1; ...; x_k] + b), a 1x1 conv over a channel concatenation.

    `accumulate=True` skips the concatenation: sum_i W_i x_i, each conv adding the previous partial sum
    in its epilogue (inputs may then arrive one at a time, see `step`); False concatenates first.
    """

    def __init__(self, conv: nn.Conv2d, n_inputs: int, mk: Any, act: str, accumulate: bool) -> None:
        super().__init__()
        self.accumulate = accumulate and n_inputs > 1
        w, b = _w(conv), _b(conv)
        if not self.accumulate:
            self.convs = nn.ModuleList([mk(w, b, conv, act=act)])
            return
        c = w.shape[1] // n_inputs
        self.convs = nn.ModuleList(
            mk(w[:, i * c:(i + 1) * c], b if i == 0 else None, conv, act=act if i == n_inputs - 1 else "none",
               residual=i > 0)
            for i in range(n_inputs))

    def step(self, i: int, x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """Add input `i` (in order) to the partial sum `acc` (None for i == 0)."""
        return self.convs[i](x, other=acc, inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if not self.accumulate:
            return self.convs[0](_cat(xs))
        acc = None
        for i, x in enumerate(xs):
            acc = self.step(i, x, acc)
        return acc


class FastDLSR(nn.Module):
    """The fused inference form of a `DLSR` (see the module docstring). Build with `build(model)`.

    Holds folded copies of the weights (non-persistent buffers): it does not follow later changes to
    the source network; `DLSR` rebuilds its cached one when parameters change.

    Options (the defaults are the measured winners; the others exist for the benchmark's ablation):
    `merge_1x1` runs a conv_1x1 MRB and its distillation conv as one conv; `fp32_layers` keeps layers
    in float32 under bf16 ("stem": the first conv, so the image is not rounded to bf16; "tail": the
    LR conv and upsampler); `base_output` (bf16) makes the upsampler predict the output minus a
    nearest-neighbour upscale of the input, added back in float32, so the output is not rounded to bf16.
    """

    def __init__(self, model: nn.Module, *, precision: str = "fp32", backend: str = "auto",
                 merge_1x1: bool = False, accumulate: str = "all", fp32_layers: tuple[str, ...] = ("stem",),
                 base_output: bool = True) -> None:
        super().__init__()
        device = next(model.parameters()).device
        precision = resolve_precision(precision, device)
        if backend == "auto":
            backend = "mkldnn" if device.type == "cpu" and mkldnn_fusion_available() else "aten"
        if backend not in ("mkldnn", "aten"):
            raise ValueError(f"backend must be 'auto', 'mkldnn' or 'aten', got {backend!r}")
        if backend == "mkldnn" and device.type != "cpu":
            raise ValueError("the mkldnn backend runs on CPU only")
        if accumulate not in ("none", "fuse", "all"):
            raise ValueError(f"accumulate must be 'none', 'fuse' or 'all', got {accumulate!r}")
        unknown = set(fp32_layers) - {"stem", "tail"}
        if unknown:
            raise ValueError(f"fp32_layers may name 'stem' and 'tail', got {sorted(unknown)}")
        self.precision, self.backend = precision, backend
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        low = self.dtype != torch.float32
        self.fp32_layers = tuple(fp32_layers) if low else ()
        genotype = model.genotype
        # the output-minus-base trick adds an upscaled copy of the input: only where it has the output's channels
        self.base_output = (bool(base_output) and low and "tail" not in self.fp32_layers
                            and genotype.in_channels == genotype.out_channels)
        self.genotype = genotype
        self.scale = genotype.scale
        c = genotype.channels

        def mk(w: torch.Tensor, b: torch.Tensor | None, like: nn.Conv2d, act: str = "none",
               residual: bool = False, dtype: torch.dtype | None = None) -> FConv:
            return FConv(w.float(), None if b is None else b.float(), stride=like.stride[0],
                         padding=like.padding[0], dilation=like.dilation[0], groups=like.groups, act=act,
                         backend=backend, dtype=dtype or self.dtype, residual=residual)

        def dt(name: str) -> torch.dtype:
            return torch.float32 if name in self.fp32_layers else self.dtype

        with torch.no_grad():
            self.stem = mk(_w(model.stem), _b(model.stem), model.stem, dtype=dt("stem"))
            self.inputs = [tuple(spec.inputs) for spec in genotype.cells]
            self.links = nn.ModuleList(
                nn.Identity() if isinstance(link, nn.Identity)
                else _CatConv(link.conv, len(spec.inputs), mk, "lrelu", accumulate == "all")
                for link, spec in zip(model.links, genotype.cells))
            self.cells = nn.ModuleList(_Cell(cell, mk, c, merge_1x1, backend == "mkldnn")
                                       for cell in model.cells)
            self.fuse = _CatConv(model.fuse.conv, len(model.cells), mk, "lrelu", accumulate != "none")
            # after which cell each feature (0: stem, j: cell j) is last read by a link
            self.last_use = [max([j for j, ins in enumerate(self.inputs) if i in ins], default=-1)
                             for i in range(len(self.inputs) + 1)]
            self.lr_conv = mk(_w(model.lr_conv), _b(model.lr_conv), model.lr_conv, residual=True,
                              dtype=dt("tail"))
            up = model.upsampler.conv
            self.up = mk(_w(up), _b(up), up, dtype=dt("tail"), residual=self.base_output)
        self.eval()
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"precision={self.precision}, backend={self.backend}, scale={self.scale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.stem.weight.dtype, memory_format=_CL)
        skip = self.stem(x)
        s = skip.to(self.dtype)
        tail = self.lr_conv.weight.dtype
        if tail == self.dtype:
            skip = None  # the float32 stem output is not needed again: free it now
        feats: list[torch.Tensor | None] = [s]
        outs = []
        acc = None
        for j, (inputs, link, cell) in enumerate(zip(self.inputs, self.links, self.cells)):
            h = feats[inputs[0]] if len(inputs) == 1 else link([feats[i] for i in inputs])
            out = cell(h)
            del h
            feats.append(out)
            if self.fuse.accumulate:  # the network's 1x1 fuse, one cell output at a time
                acc = self.fuse.step(j, out, acc)
                for i in inputs:  # free what no later cell reads
                    if self.last_use[i] == j and i > 0:
                        feats[i] = None
                if self.last_use[j + 1] < 0:
                    feats[j + 1] = None
            else:
                outs.append(out)
            del out
        fused = acc if self.fuse.accumulate else self.fuse(outs)
        del feats, outs, acc
        skip = s if skip is None else skip.to(tail)
        del s
        body = self.lr_conv(fused.to(tail), other=skip, inplace=True)
        del skip, fused
        if not self.base_output:
            return _shuffle(self.up(body), self.scale)
        # bf16: the upsampler predicts output - base, base a nearest-neighbour upscale of the input (in
        # the upsampler's channel layout, output channel c * s^2 + k lands in image channel c), so only
        # the small difference is rounded to bf16; base is added back in float32
        xb = x.to(self.dtype)
        nbase = xb.neg().repeat_interleave(self.scale * self.scale, dim=1).contiguous(memory_format=_CL)
        return _shuffle(self.up(body, other=nbase, inplace=True), self.scale, xb)


def build(model: nn.Module, *, precision: str = "fp32", backend: str = "auto", **options: Any) -> FastDLSR:
    """The fused inference form of `model` (a `DLSR`), for `precision` 'fp32', 'bf16' or 'auto'."""
    return FastDLSR(model, precision=precision, backend=backend, **options)


def param_key(model: nn.Module) -> tuple[Any, ...]:
    """A fingerprint of a module's tensors that changes whenever a parameter is replaced or edited.

    Each tensor's storage pointer, dtype, device, shape and autograd version counter (bumped by every
    in-place write: optimizer steps, `load_state_dict`, `p.copy_()`, `p.add_()` ...), plus one float64
    position-weighted sum over all of them, which also catches writes through `p.data` and into inference
    tensors (they bypass version counters: `dist.broadcast(p.data)`, old-style EMA updates, an edit under
    `inference_mode`): a sign flip, a permutation, or a change of one weight by 1e-9 of the weights' scale.
    One sum, not a norm per tensor as before: the per-tensor norms cost more than the sum and saw less.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    key: list[Any] = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensor
            version = -1
        key.append((t.data_ptr(), version, t.dtype, t.device, tuple(t.shape)))
    floats = [t.detach().reshape(-1) for t in tensors if t.is_floating_point()]
    if floats:
        with torch.no_grad():
            same = len({t.dtype for t in floats}) == 1
            flat = torch.cat(floats).double() if same else torch.cat([t.double() for t in floats])
            mix = float(torch.dot(flat, _mixing_weights(flat.numel(), flat.device)))
        key.append(-1.0 if math.isnan(mix) else mix)  # NaN never equals itself: it would rebuild on every call
    return tuple(key)


@functools.lru_cache(maxsize=8)
def _mixing_weights(n: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random float64 weights in [1, 2) for `param_key`'s position-weighted sum (n per model)."""
    return (1 + torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)).to(device)


# --- the cache `DLSR.forward` uses -------------------------------------------------------------
_CACHE_ATTR = "_fast_cache"
_PARITY_ATTR = "_fast_bf16_parity"  # (param_key, whether the bf16 form passed its parity probe)


def fast_module(model: nn.Module, precision: str = "fp32") -> FastDLSR:
    """`model`'s fused form for `precision`, cached on the model and rebuilt when a parameter changes.

    The cache lives in the model's `__dict__` (not a submodule: it never shows up in `state_dict()`,
    `parameters()` or `.to()`); its key is `param_key(model)`, so an optimizer step, `load_state_dict`,
    `.to(...)` or any edit of a weight triggers a rebuild (tens of milliseconds). `invalidate(model)`
    drops it explicitly.

    'auto' is bf16 on a CPU with native bf16 *and* when the bf16 form passes a parity probe against the
    fp32 form with these weights (`bf16_parity`), else fp32.
    """
    device = next(model.parameters()).device
    requested = precision
    precision = resolve_precision(precision, device)
    weights = param_key(model)
    if requested == "auto" and precision == "bf16" and not _bf16_passes(model, weights):
        precision = "fp32"
    # keyed on what was resolved, not on what was asked: 'auto' resolved to bf16 and a later 'bf16' (the
    # tiles of `upscale(dtype="auto")` run under bf16 autocast) share one build; one build per precision,
    # so callers mixing fp32 and bf16 (two threads, a fp32 re-run of a bf16 tile) do not rebuild by turns
    builds = model.__dict__.setdefault(_CACHE_ATTR, {})
    cached = builds.get(precision)
    if cached is not None and cached[0] == weights:
        return cached[1]
    module = build(model, precision=precision)
    builds[precision] = (weights, module)
    return module


def _bf16_passes(model: nn.Module, weights: tuple[Any, ...]) -> bool:
    """The parity probe's verdict for these weights (`bf16_parity` >= BF16_MIN_PSNR), remembered per
    weights so that each 'auto' call does not probe again; a passing probe leaves its bf16 build cached."""
    verdict = model.__dict__.get(_PARITY_ATTR)
    if verdict is not None and verdict[0] == weights:
        return verdict[1]
    module = build(model, precision="bf16")
    db = bf16_parity(model, module)
    ok = db >= BF16_MIN_PSNR
    if not ok:
        warnings.warn(f"bf16 inference of this model is only {db:.1f} dB from fp32 (< {BF16_MIN_PSNR} dB); "
                      "using fp32", RuntimeWarning, stacklevel=3)
    else:
        model.__dict__.setdefault(_CACHE_ATTR, {})["bf16"] = (weights, module)
    model.__dict__[_PARITY_ATTR] = (weights, ok)
    return ok


#: Least PSNR (dB, [0, 1] range) between the bf16 and fp32 forms on the probe image for 'auto' to pick
#: bf16. Measured: ~66 dB with the authors' trained x2 weights (Set5 PSNR-Y drop 0.003 dB), ~63 dB with
#: random weights; 50 dB still keeps the error under a quarter of a uint8 step on average.
BF16_MIN_PSNR = 50.0


def _probe_image(channels: int, size: int = 48) -> torch.Tensor:
    """A deterministic photo-like probe: smooth gradients, a hard edge and fine texture in [0, 1]."""
    g = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 2 * c) * torch.cos(5 * yy - c) for c in range(channels)])
    base = base + 0.3 * (xx > 0.5).float() - 0.15 + 0.05 * torch.rand(channels, size, size, generator=g)
    return base.clamp(0, 1).unsqueeze(0)


def bf16_parity(model: nn.Module, bf16_module: FastDLSR | None = None) -> float:
    """PSNR (dB) between `model`'s bf16 and fp32 fused forms on a fixed probe image."""
    bf16_module = bf16_module or build(model, precision="bf16")
    x = _probe_image(model.genotype.in_channels)
    with torch.inference_mode():
        ref = build(model, precision="fp32")(x)
        y = bf16_module(x)
    mse = float(((y.clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def preferred_dtype(model: nn.Module, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype an 'auto' caller (e.g. `upscale(dtype="auto")` on CPU) should use for `model`:
    bfloat16 on a CPU with native bf16 when the bf16 form passes the parity probe, else float32.
    Running the model under `torch.autocast("cpu", torch.bfloat16)` then uses the fused bf16 form."""
    from .model import DLSR

    # Only a DLSR that runs its fused form (the probe tests that form, not the layers under autocast);
    # another module (a wrapper, a user's network), or one whose layers will run, stays in fp32.
    if torch.device(device).type != "cpu" or not bf16_native() or not isinstance(model, DLSR):
        return torch.float32
    if not model.fast_inference or not fused_applies(model):
        return torch.float32
    return torch.bfloat16 if fast_module(model, "auto").precision == "bf16" else torch.float32


def tune_malloc(limit_bytes: int = 1 << 30) -> bool:
    """Opt-in, process-wide (glibc only): serve tensors up to `limit_bytes` from the malloc heap and keep
    freed memory for reuse, instead of glibc's default of a fresh `mmap` for every block over 32 MB.

    Every fresh mmap'd tensor is zeroed page by page by the kernel on first touch: at large tiles (e.g.
    x2 on 560x560) that page-faulting is about half the run time, and this halves it (measured, see
    benchmarks/README.md). The cost: freed memory stays with the process (RSS stays at its peak) and
    heap fragmentation raises that peak (~1.5x measured). Worth it for batch jobs and CLIs, not for a
    long-lived process that must give memory back. (`THP_MEM_ALLOC_ENABLE=1` in the environment before
    starting Python gets part of the gain without the memory cost.) Returns True when applied.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        limit = ctypes.c_int(min(int(limit_bytes), 2**31 - 1))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):  # not glibc
        return False


def invalidate(model: nn.Module) -> None:
    """Drop `model`'s cached fused form, parity verdict and layout check (the next eval-mode no-grad forward
    rebuilds them)."""
    model.__dict__.pop(_CACHE_ATTR, None)
    model.__dict__.pop(_PARITY_ATTR, None)
    model.__dict__.pop(_LAYOUT_ATTR, None)


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)


_EXACT = threading.local()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Within this block a DLSR runs in IEEE float32: its fused CPU form whatever its
    `inference_precision` says (in this thread), under no autocast (an enclosing one is suspended), and,
    where CUDA is available, cuDNN convolutions without TF32 (`ieee_cuda_convs`). What `dtype="fp32"`,
    the fp32 re-run of a non-finite tile and `dlsr-eval` promise."""
    before = getattr(_EXACT, "on", False)
    _EXACT.on = True
    try:
        # an enclosing autocast (a caller's bf16 block) would otherwise lower it again
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
                stack.enter_context(ieee_cuda_convs())
            yield
    finally:
        _EXACT.on = before


_IEEE_LOCK = threading.Lock()
_IEEE_USERS = 0
_IEEE_BEFORE: tuple[Any, ...] = ()


@contextlib.contextmanager
def ieee_cuda_convs() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 within this block, not in TF32 (torch's default for them on
    Ampere and later GPUs: a 10-bit mantissa, about 1e-3 relative error per convolution, so "fp32" on
    such a GPU would be neither exact nor equal to the CPU's result). torch's setting is process-wide:
    it holds while any thread is inside such a block (they are counted), and the last one out restores
    what the process had set."""
    global _IEEE_USERS, _IEEE_BEFORE
    cudnn = torch.backends.cudnn
    new_api = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    with _IEEE_LOCK:
        if _IEEE_USERS == 0:
            # Read both forms; set the legacy one first (it sets conv and rnn alike, as torch's own
            # `cudnn.flags(allow_tf32=False)` does: per-op setters alone leave the legacy flag behind, and
            # torch then refuses every legacy `allow_tf32` read while the two disagree), then the per-op ones.
            try:
                legacy = cudnn.allow_tf32
            except RuntimeError:  # a process that already mixed the two forms
                legacy = None
            _IEEE_BEFORE = (legacy, (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) if new_api else None)
            cudnn.allow_tf32 = False
            if new_api:  # the legacy switch leaves them "none" (inherit): a process-wide "tf32" would still win
                cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
        _IEEE_USERS += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _IEEE_USERS -= 1
            if _IEEE_USERS == 0:
                legacy, per_op = _IEEE_BEFORE
                if legacy is not None:
                    cudnn.allow_tf32 = legacy
                if per_op is not None:
                    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = per_op


def dispatch(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Run `x` through `model`'s cached fused form, or return None where it does not apply.

    Applies to float32 CPU inputs of a float32 CPU model, outside tracing/scripting/`torch.compile`,
    when no forward hooks are registered on the model's submodules (they would not fire). Precision:
    `model.inference_precision` (fp32 inside `exact_fp32()`), except that under
    `torch.autocast("cpu", torch.bfloat16)` the bf16 form runs (the reduced precision the caller asked
    for, at fused-kernel speed).
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or _transformed():
        return None
    p = next(model.parameters(), None)
    if p is None or x.device.type != "cpu" or p.device.type != "cpu":
        return None
    if x.dtype != torch.float32 or p.dtype != torch.float32:
        return None
    precision = "fp32" if getattr(_EXACT, "on", False) else getattr(model, "inference_precision", "fp32")
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        precision = "bf16"
    if not fused_applies(model):
        return None
    return fast_module(model, precision)(x)


def fused_applies(model: nn.Module) -> bool:
    """Whether `model`'s fused form stands for it: no forward hooks (they would not fire) and the modules
    `build` assumes (`layout_ok`). What `dispatch` runs by, and what `preferred_dtype` probes for."""
    return not _has_hooks(model) and layout_ok(model)


def _transformed() -> bool:
    """Inside a torch.func transform (vmap, jvp, grad) or a forward-mode AD level: they work under no_grad,
    and the fused kernels would drop their tangents or batch dimension (zero derivatives, crashes)."""
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
    except AttributeError:  # pragma: no cover - a torch without functorch's interpreter stack
        pass
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


_LAYOUT_ATTR = "_fast_layout"  # (identity key of the modules, whether they are the layout `build` knows)
_EXPECTED_LAYOUTS: dict[tuple[type, str], tuple[Any, ...]] = {}
_LAYOUT_LOCK = threading.Lock()


def _layout(model: nn.Module) -> tuple[Any, ...]:
    return tuple((name, type(m), m.extra_repr(), "forward" in m.__dict__) for name, m in model.named_modules())


def layout_ok(model: nn.Module) -> bool:
    """Whether `model`'s modules are those a fresh network of its genotype has, as `build` assumes (it
    hard-codes the activation, ESA and each op): an ablation (a ReLU swapped in, ESA replaced), a
    monkeypatched forward or a parametrization makes the fused form wrong, so such a model runs its layers.
    Checked in full when a module is replaced or retyped or its forward patched; an edit of an existing
    module's settings in place (a conv's padding, an activation's slope) is not seen: make it a new module."""
    # the modules themselves, not their id()s: a replaced module freed first can hand its address on
    cheap = tuple((m, type(m), m.__dict__.get("forward")) for m in model.modules())
    seen = model.__dict__.get(_LAYOUT_ATTR)
    if seen is not None and seen[0] == cheap:
        return seen[1]
    genotype = getattr(model, "genotype", None)
    ok = False
    if genotype is not None:
        key = (type(model), genotype.to_json())
        with _LAYOUT_LOCK:
            expected = _EXPECTED_LAYOUTS.get(key)
        if expected is None:
            try:
                with torch.device("meta"):  # no weights needed: the modules and their settings
                    expected = _layout(type(model)(genotype))
            except Exception:  # noqa: BLE001 - a subclass built otherwise: its layers run, as they are
                expected = ()
            with _LAYOUT_LOCK:
                if len(_EXPECTED_LAYOUTS) > 32:
                    _EXPECTED_LAYOUTS.clear()
                _EXPECTED_LAYOUTS[key] = expected
        ok = _layout(model) == expected
    model.__dict__[_LAYOUT_ATTR] = (cheap, ok)
    return ok

