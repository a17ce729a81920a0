"""An exponential moving average (EMA) of a network's weights, for the retrain trainer.

Why: on 2 CPU cores we train with small batches (4-8), so the weights at any one step carry the noise
of the last few minibatches; validation PSNR then wobbles by a few hundredths of a dB from one
checkpoint to the next. Averaging the weights over the last ~1/(1-decay) steps (Polyak averaging)
removes most of that noise at no cost in steps. The average lives in its own copy of the network so
that validation, ``best/`` and export can use it as they would use the trained network.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from dlsr_infer.fast import invalidate


class WeightEMA:
    """``ema = d * ema + (1 - d) * weights`` after every optimizer step, with ``d = decay`` once the
    average has seen enough updates (``min(decay, (1 + n) / (10 + n))`` before, so that the first
    updates do not leave it stuck at the initial weights)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # a fused inference form cached on `model` (an eval forward before the average was made) was
        # copied with it: the copy's own weights key no longer matches it, so it is dead weight
        invalidate(self.model)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        averaged = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        current = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


__all__ = ["WeightEMA"]
