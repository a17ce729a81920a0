"""Model soup: one model whose weights are the mean of several fine-tunes of the same network.

Fine-tunes warm-started from one model (different seeds, or its own pick among them) stay in one basin of
the loss, and the average of their weights usually scores at least as well as the best of them while
costing nothing at inference (Wortsman et al., "Model soups", ICML 2022). The bundled x2 is one: the mean
of its previous weights and two fine-tunes of them gained 0.001-0.005 dB on every benchmark set, where further
fine-tunes on two CPU cores had not.

    dlsr-search soup weights/dlsr-x2-soup runs/x2zb/best runs/x2zd/best runs/x2ze/best
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from dlsr_infer.imageio import atomic_write
from dlsr_infer.model import DLSR
from dlsr_infer.pretrained import WEIGHTS_NAME, hash_file, resolve

from .export import replace_dir

#: Beside the soup's weights: which models went in (path and sha256 of their weights), in order.
SOUP_NAME = "soup.json"


class SoupError(ValueError):
    """Models that cannot be averaged into one (different networks, too few, the output among them)."""


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes, summed in float64 (six float32
    ingredients must not lose the low bits that tell them apart), returned as float32."""
    if not states:
        raise SoupError("nothing to average")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=2):
        if list(s) != keys:
            raise SoupError(f"model {i} has other tensors than model 1: {sorted(set(s) ^ set(keys))[:5]}")
    out = {}
    for k in keys:
        shapes = {tuple(s[k].shape) for s in states}
        if len(shapes) != 1:
            raise SoupError(f"tensor {k!r} has different shapes: {sorted(shapes)}")
        out[k] = (sum(s[k].double() for s in states) / len(states)).float()
    return out


def make_soup(models: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              greedy_on: str | os.PathLike | None = None) -> Path:
    """Write the model directory `out` whose weights are the uniform average of `models` (model
    directories, aliases or Hub repo ids, loaded strictly), and `out/soup.json` naming them. The genotype
    (config.json) is the first averaged model's; all must describe the same network. `out` must not be one of the
    models, nor an existing non-empty directory: the soup is written beside its ingredients, never over one.

    `greedy_on`: a folder of HR validation images. Then the soup is greedy (Wortsman et al.): the models
    ranked by their own PSNR-Y there (fp32, as dlsr-eval), each next one kept only if the average with it
    does not score lower than without; soup.json records every score and what was left out. A uniform
    average of all is the default: one weak fine-tune can pull it below the best of them."""
    if len(models) < 2:
        raise SoupError(f"a soup needs at least two models, got {len(models)}")
    out = Path(out)
    if greedy_on is not None:  # checked before the work: a typo must not cost the load of every model
        from dlsr_infer.evaluate import dataset_images

        try:
            dataset_images(greedy_on)
        except (ValueError, OSError) as e:
            raise SoupError(f"--greedy-on {greedy_on}: no images to validate on ({e})") from None
    dirs = [resolve(m) for m in models]
    for m, d in zip(models, dirs):
        if out.exists() and d.resolve() == out.resolve():
            raise SoupError(f"the output {out} is one of the models ({m}): write the soup to a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # e.g. a bundled model and its card
        raise SoupError(f"{out} exists and is not an empty directory: write the soup to a new one")
    if out.exists() and out.resolve() == Path.cwd().resolve():  # it is replaced by a renamed folder
        raise SoupError(f"{out} is the current directory: write the soup to a new directory")
    if out.is_symlink():
        raise SoupError(f"{out} is a symbolic link: write the soup to a new directory")
    loaded = [DLSR.from_pretrained(d) for d in dirs]
    for m, model in zip(models[1:], loaded[1:]):
        if not model.genotype.architecture_equals(loaded[0].genotype):
            raise SoupError(f"{m} is another network than {models[0]} (its genotype differs): only fine-tunes "
                            "of one network can be averaged")
    # copies: a state_dict shares its tensors with the model, and the soup is loaded into the first one
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in loaded]
    for i, j in itertools.combinations(range(len(states)), 2):  # the same weights twice would count double
        if all(torch.equal(states[i][k], states[j][k]) for k in states[i]):
            raise SoupError(f"{models[j]} holds the same weights as {models[i]}")
    record: dict = {"format_version": 1}
    kept = list(range(len(models)))
    if greedy_on is not None:
        kept, record["greedy"] = _greedy(loaded[0], states, [str(m) for m in models], Path(greedy_on))
        if len(kept) == 1:
            raise SoupError(f"greedy soup on {greedy_on}: no average scored as well as {models[kept[0]]} alone "
                            f"({record['greedy']['steps'][0]['psnr_y']:.4f} dB), so there is no soup to write")
    soup = loaded[kept[0]]  # its config.json (name included): the first model that went in
    soup.load_state_dict(average_state_dicts([states[i] for i in kept]), strict=True)
    record["ingredients"] = [{"model": str(models[i]), "sha256": hash_file(dirs[i] / WEIGHTS_NAME)} for i in kept]
    listing = "\n".join(f"- `{i['model']}` (sha256 {i['sha256'][:12]})" for i in record["ingredients"])
    card = (f"# {soup.genotype.name or 'DLSR'} x{soup.genotype.scale}: a model soup\n\nThe uniform average of the "
            f"weights of these models (`soup.json`), made by `dlsr-search soup`:\n\n{listing}\n")
    def write(d: Path) -> None:  # all or nothing (replace_dir): never weights without the soup.json
        soup.save_pretrained(d, model_card=card, metadata={"dlsr_soup_of": json.dumps(record["ingredients"])})
        atomic_write(d / SOUP_NAME, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))

    return replace_dir(out, write)  # (out is new or an empty folder: checked above)


def _greedy(model: DLSR, states: list[dict[str, torch.Tensor]], names: list[str],
            val: Path) -> tuple[list[int], dict]:
    """Greedy soup selection: returns the kept indices (best first) and the record of every score."""
    from dlsr_infer.evaluate import evaluate

    def score(idx: list[int]) -> float:
        model.load_state_dict(average_state_dicts([states[i] for i in idx]), strict=True)
        try:
            return float(evaluate(model, [val])[0]["psnr"])
        except (ValueError, OSError) as e:  # an unreadable image, one too small for the border crop, ...
            raise SoupError(f"--greedy-on {val}: {e}") from None

    alone = [score([i]) for i in range(len(states))]
    order = sorted(range(len(states)), key=lambda i: -alone[i])
    kept, best = [order[0]], alone[order[0]]
    steps = [{"model": names[order[0]], "psnr_y": best, "kept": True}]
    for i in order[1:]:
        trial = score([*kept, i])
        steps.append({"model": names[i], "psnr_y": trial, "kept": trial >= best})
        if trial >= best:
            kept, best = [*kept, i], trial
    return kept, {"val": str(val), "candidates": names, "alone": {names[i]: alone[i] for i in range(len(states))},
                  "steps": steps}


def read_soup(directory: str | os.PathLike) -> dict:
    """A soup directory's record (`make_soup`'s soup.json): "ingredients" in order, and for a greedy soup
    "greedy" (validation folder, the candidates as given, each one's own score, each step's score and
    whether it was kept)."""
    path = Path(directory) / SOUP_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {SOUP_NAME} (not a model written by `dlsr-search soup`)")
    return json.loads(path.read_text())


__all__ = ["SOUP_NAME", "SoupError", "average_state_dicts", "make_soup", "read_soup"]
