"""Bundle a finished training run as a model directory with its model card, log and learning curve.

    python -m dlsr_search.modelcard runs/x2 weights/dlsr-x2 --title "DLSR x2"
    python -m dlsr_search.modelcard summary weights      # README's results table, from the cards
    python -m dlsr_search.modelcard runs/x2-soup weights/dlsr-x2 --title "DLSR x2" --continues weights/dlsr-x2

copies the run's best model (config.json + model.safetensors), evaluates it with `dlsr-eval`'s code on
Set5/Set14/B100 (and bicubic), and writes README.md (the card), log.jsonl and curve.png. Every figure
in the card comes from the run's own log or from that evaluation: rerun the command to reproduce it.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from dlsr_infer.evaluate import dataset_name, default_benchmarks_dir, evaluate, evaluate_bicubic
from dlsr_infer.genotype import loads as load_genotype
from dlsr_infer.model import DLSR
from dlsr_infer.pretrained import ModelLoadError, hash_file

from .checkpoint import is_run_folder
from .data import DataError, large_enough, list_images
from .export import replace_dir
from .train import hr_patch_side

#: The paper's Table 2 PSNR-Y (dB) for DLSR, for comparison in the card.
PAPER = {
    2: {"Set5": 38.04, "Set14": 33.67, "B100": 32.21},
    3: {"Set5": 34.49, "Set14": 30.39, "B100": 29.13},
    4: {"Set5": 32.33, "Set14": 28.68, "B100": 27.61},
}
SETS = ("Set5", "Set14", "B100")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line a killed run left half written is skipped with a warning
    (`RunLog` ends it on resume), anything else that is not JSON is an error naming the line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # cut short by a kill: the file's last line, or one a resume (start/resume record) follows
            after = _event_of(lines[n]) if n < len(lines) else "end of file"
            if not line.lstrip().startswith("{") or after not in ("end of file", "start", "resume"):
                raise ValueError(f"{path}, line {n}: not a JSON record ({e})") from None
            warnings.warn(f"{path}, line {n}: a record cut short (a killed run), skipped", stacklevel=2)
    return records


def _event_of(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except (json.JSONDecodeError, AttributeError):
        return None


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_log(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "log.jsonl")


def stage_records(run: Path, until: int | None = None) -> list[dict[str, Any]]:
    """A run's log up to step `until`: the part of a run that a later warm start actually came from
    (the run may have been resumed and gone on training after the hand-off)."""
    return records_until(read_log(run), until)


def records_until(records: list[dict[str, Any]], until: int | None) -> list[dict[str, Any]]:
    """A log's records up to step `until` (None: all), leaving out segments resumed after it."""
    if until is None:
        return records
    kept: list[dict[str, Any]] = []
    for r in records:
        if r["event"] in ("start", "resume") and r.get("step", 0) >= until:
            break  # resumed at or after the hand-off step: what follows came after it (a resume from an
            # earlier checkpoint, after a kill, replays the steps up to the pick: it is kept)
        if r.get("step", 0) <= until:
            kept.append(r)
    return kept


def parse_stage(text: str) -> tuple[Path, int | None]:
    """'RUN' or 'RUN@STEP' (the `--earlier` argument) -> (run folder, last step used or None)."""
    run, sep, step = text.rpartition("@")
    if not sep or not step.isdigit():
        return Path(text), None
    return Path(run), int(step)


#: Beside each card: its stages, oldest first, as `make_card` listed them (the chain read back by `--continues`).
STAGES_NAME = "stages.json"


@dataclass(frozen=True)
class SoupStage:
    """A model soup as a stage of a chain: `members` as soup.json lists them (each with "run" and "log"
    for a fine-tune, or "stage": the number of the stage whose weights went in themselves), and each
    fine-tune's run folder name and log up to its pick."""

    members: list[dict[str, Any]]
    fine_tunes: list[tuple[Path, list[dict[str, Any]]]]
    #: a greedy soup's selection as soup.json records it ("val", "candidates", "steps"), else None
    greedy: dict[str, Any] | None = None


def card_stages(card: Path) -> tuple[list[Any], list[str | None]]:
    """The training stages of a bundled model directory, oldest first (its log-stage<i>.jsonl, then its
    log.jsonl up to the step it bundled; a soup bundled there, or one earlier in its chain, as a
    `SoupStage`), named as its card lists them, and each stage's note on its data (None where the data was
    the folder named). A run warm-started from that model continues its chain, which so survives in the
    repository when the run folders do not. Notes belong to stages, not to folders: two GPU sessions both
    trained from /tmp/dlsr_data, holding different images."""
    index = card / STAGES_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{card}: no {STAGES_NAME}, so no training stages to continue (is it a model "
                                "directory written by this tool?)")
    data = json.loads(index.read_text())
    stages: list[Any] = []
    notes: list[str | None] = []
    for entry in data["stages"]:
        if "soup" in entry:
            stages.append(_soup_stage(card, entry["soup"], entry.get("greedy")))
        else:
            stages.append((Path(entry["run"]), records_until(_read_listed(card, entry["log"]), entry.get("until"))))
        notes.append(entry.get("data_note"))
    if "soup" in data:  # the card of a soup: the soup itself is the chain's last stage
        from .soup import SOUP_NAME, read_soup

        greedy = read_soup(card).get("greedy") if (card / SOUP_NAME).is_file() else None
        stages.append(_soup_stage(card, data["soup"], greedy))
        notes.append(None)
    return stages, notes


def _read_listed(card: Path, name: str) -> list[dict[str, Any]]:
    log = card / name
    if not log.is_file():
        raise FileNotFoundError(f"{card}: {STAGES_NAME} lists {name}, which is missing")
    return read_jsonl(log)


def _soup_stage(card: Path, members: list[dict[str, Any]], greedy: dict[str, Any] | None = None) -> SoupStage:
    return SoupStage(members, [(Path(m["run"]), _read_listed(card, m["log"])) for m in members if "run" in m], greedy)


def _stage_runs(stage: Any) -> list[tuple[Path, list[dict[str, Any]]]]:
    """The runs that trained a stage: its fine-tunes for a soup, else the stage's one run."""
    return stage.fine_tunes if isinstance(stage, SoupStage) else [stage]


def _stage_steps(stage: Any) -> int:
    return sum(max(r.get("step", 0) for r in rs) for _, rs in _stage_runs(stage))


def _stage_seconds(stage: Any) -> float:
    return sum(wall_time_s(rs) for _, rs in _stage_runs(stage))


def _chain_line(i: int, stage: Any, out: Path, note: str | None) -> str:
    """A stage's line in a card's list of stages: `_stage_line`, or for a soup a line naming what went
    in, then one indented line per fine-tune."""
    if not isinstance(stage, SoupStage):
        return _stage_line(i, stage[0], stage[1], out, note)
    parts = [f"`{m['model']}`" + (f" (stage {m['stage']}'s weights)" if "stage" in m else "") for m in stage.members]
    chosen = ""
    if stage.greedy:  # how the members were chosen, and the command: what a uniform soup's member list says
        g = stage.greedy
        chosen = (f", chosen greedily on `{g['val']}` (fp32 PSNR-Y: "
                  + "; ".join(f"`{st['model']}` {'alone' if k == 0 else 'added'} {st['psnr_y']:.4f} dB"
                              f"{'' if st['kept'] else ' (left out)'}" for k, st in enumerate(g["steps"]))
                  + f"; `dlsr-search soup <dir> {' '.join(g['candidates'])} --greedy-on {g['val']}`)")
    head = (f"  {i}. model soup (`dlsr-search soup`): the uniform average of the weights of {', '.join(parts)}"
            f"{chosen}; {_stage_steps(stage):,} fine-tuning steps, wall time {_stage_seconds(stage) / 3600:.2f} h "
            f"in all (of the models kept); logs `log-stage{i}-soup<k>.jsonl`; fine-tunes:")
    runs = [m for m in stage.members if "run" in m]
    subs = ["    " + _stage_line(None, run, recs, out, m.get("data_note")) for m, (run, recs) in zip(runs, stage.fine_tunes)]
    return "\n".join([head, *subs])


def _stage_files(stages: Sequence[Any], notes: Sequence[str | None]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The logs (file name -> records) and `stages.json` entries of a chain of stages, oldest first:
    log-stage<i>.jsonl for a run, log-stage<i>-soup<k>.jsonl for the fine-tunes of a soup."""
    logs: dict[str, list[dict[str, Any]]] = {}
    entries = []
    for i, (stage, note) in enumerate(zip(stages, notes, strict=True), start=1):
        if isinstance(stage, SoupStage):
            k = iter(range(1, len(stage.fine_tunes) + 1))
            members = [{**m, "log": f"log-stage{i}-soup{next(k)}.jsonl"} if "run" in m else dict(m) for m in stage.members]
            logs.update({m["log"]: recs for m, (_, recs) in zip([m for m in members if "run" in m], stage.fine_tunes)})
            entries.append({"run": "model soup", "soup": members, "data_note": note,
                            **({"greedy": stage.greedy} if stage.greedy else {})})
        else:
            logs[f"log-stage{i}.jsonl"] = stage[1]
            entries.append({"run": str(stage[0]), "log": f"log-stage{i}.jsonl", "data_note": note})
    return logs, entries


def _write_stages(out: Path, stages: Sequence[Any], run: Path, records: list[dict[str, Any]], until: int | None,
                  notes: Sequence[str | None]) -> None:
    """The earlier stages' logs (`_stage_files`; the run's own is log.jsonl, copied already) and
    `stages.json`, which `card_stages` reads back; `until` is the step this run's bundled weights are from
    when later steps are in its log.jsonl (a best-validation pick); `notes`: each stage's data note, the
    run's last."""
    logs, entries = _stage_files(stages, notes[:len(stages)])
    for name, recs in logs.items():
        write_jsonl(out / name, recs)
    entries.append({"run": str(run), "log": "log.jsonl", "until": until, "data_note": notes[len(stages)]})
    (out / STAGES_NAME).write_text(json.dumps({"format_version": 1, "stages": entries}, indent=1) + "\n")


def wall_time_s(records: list[dict[str, Any]]) -> float:
    """Training wall time: the sum of each segment (start/resume to its last record), plus the time a
    distilled run's teacher spent predicting the training images before each segment began (this run's
    time: predictions an earlier, stopped attempt or another run left in the cache cost it nothing)."""
    total, seg_start, last = 0.0, None, None
    for r in records:
        if r["event"] == "teacher":  # recorded after the start record, of work done before it
            total += float(r.get("seconds") or 0.0)
        if r["event"] in ("start", "resume"):
            if seg_start is not None and last is not None:
                total += last - seg_start
            seg_start = r["time"]
        last = r["time"]
    if seg_start is not None and last is not None:
        total += last - seg_start
    return total


def _ema_note(config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    decay = config.get("ema") or 0.0
    if not decay:
        return ""
    started = [r["step"] for r in records if r["event"] == "ema_start"]
    since = f" from step {started[-1]:,} (added on resume)" if started else ""
    return f"; weights: moving average (EMA) of the trained weights{since}, decay {decay}"


#: train's --x / --no-x options: None is their default (decided by the device), False an explicit --no-x.
_BOOL_FLAGS = frozenset({"bf16", "channels_last"})


def command_line(config: dict[str, Any]) -> str:
    """The `dlsr-search train` command that reproduces a run, rebuilt from its stored config."""
    skip = {"genotype_json", "resume", "progress", "export"}
    if not config.get("teacher"):  # without --teacher they are their defaults (train refuses any other value)
        skip |= {"teacher_weight", "teacher_ensemble"}
    parts = ["dlsr-search", "train"]
    for key, value in config.items():
        if key in skip or value is None or value == []:  # [] : an nargs="+" option left out (--data-scales)
            continue
        flag = "--" + key.replace("_", "-")
        if value is False:  # --no-bf16 is a choice: left out, the default (on for CUDA) would apply
            if key in _BOOL_FLAGS:
                parts.append("--no-" + key.replace("_", "-"))
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts + ["--resume"])


def plot_curve(points: list[tuple[int, float]], path: Path, title: str) -> None:
    """Validation PSNR-Y against step, drawn with PIL (no plotting dependency)."""
    plot_curves([("", points)], path, title)


#: Line colours of `plot_curves`, one per series (cycled).
_COLOURS = [(200, 30, 30), (30, 90, 200), (20, 150, 60), (200, 130, 0), (130, 50, 170), (0, 150, 160)]


def plot_curves(series: Sequence[tuple[str, list[tuple[int, float]]]], path: Path, title: str) -> None:
    """Several (label, points) validation curves on one set of axes, labelled where there is more than one."""
    w, h, m = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((m, 15), title, fill="black", font=font)
    everything = [pt for _, points in series for pt in points]
    if everything:
        xs, ys = zip(*everything)
        x0, x1 = 0, max(max(xs), 1)
        y0, y1 = min(ys) - 0.1, max(ys) + 0.1
        px = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)  # noqa: E731
        py = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)  # noqa: E731
        d.rectangle([m, m, w - m, h - m], outline="black")
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            d.text((5, py(yv) - 6), f"{yv:.2f}", fill="black", font=font)
            xv = x0 + (x1 - x0) * i / 4
            d.text((px(xv) - 10, h - m + 8), f"{int(xv)}", fill="black", font=font)
        for k, (label, points) in enumerate(series):
            colour = _COLOURS[k % len(_COLOURS)]
            if len(points) > 1:
                d.line([(px(x), py(y)) for x, y in points], fill=colour, width=2)
            for x, y in points:
                d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
            if len(series) > 1:
                d.text((w - m + 5 - 60, m + 5 + 12 * k), label, fill=colour, font=font)
    d.text((w // 2 - 20, h - 25), "step", fill="black", font=font)
    d.text((5, m - 20), "val PSNR-Y (dB)", fill="black", font=font)
    img.save(path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _noted_data(roots: list[str] | None, notes: Mapping[str, str] | None) -> str | None:
    """The caller's notes for the training folders (folders that were on another machine), if every
    folder has one (folders compared as normalised paths: 'imgs/' is 'imgs')."""
    norm = {os.path.normpath(k): v for k, v in (notes or {}).items()}
    if norm and roots and all(os.path.normpath(r) in norm for r in roots):
        return "; ".join(norm[os.path.normpath(r)] for r in roots)
    return None


def _check_notes_used(notes: Mapping[str, str] | None, runs: Sequence[list[dict[str, Any]]]) -> None:
    """Refuse a --data-note whose folder no new stage trained on (a typo would leave the card silent)."""
    used = {os.path.normpath(r) for recs in runs for r in (run_config(recs).get("data") or [])}
    unused = [k for k in (notes or {}) if os.path.normpath(k) not in used]
    if unused:
        raise ValueError(f"--data-note {unused[0]}: no stage of this card trained on that folder (they trained "
                         f"on {', '.join(sorted(used)) or 'nothing named'})")


def _data_note(roots: list[str] | None, noted: str | None) -> str:
    """What the training folders held: the stage's note (`_noted_data`), else how many HR images they
    hold now (the card is written beside the run)."""
    if noted is not None:
        return noted
    try:
        n = len(list_images(roots or []))
    except DataError:
        return "not found where the card was written"
    note = f"{n} HR images"
    return note + ": T91, BSDS500 train+test, Sun-Hays 80" if n == SHARED_TRAIN_IMAGES else note


#: Image count of ../shared/data/train (T91 + BSDS500 train/test + Sun-Hays 80).
SHARED_TRAIN_IMAGES = 571


def _hr_patch(config: dict[str, Any]) -> int:
    """The HR patch side a run's config trained with (None: the paper's for its scale, as in the trainer)."""
    return hr_patch_side(int(config.get("scale") or 2), config.get("patch"))


def images_used(config: dict[str, Any], records: list[dict[str, Any]]) -> int | None:
    """How many training images a run drew patches from (shrunk copies of `--data-scales` included): the
    trainer skips those whose LR side is under the LR patch. From the run's `data` record, else (runs
    logged before it existed) from the image headers as they are now."""
    logged = [r["images"] for r in records if r["event"] == "data"]
    if logged:
        return logged[-1]
    scale = int(config.get("scale") or 2)
    lr_patch = _hr_patch(config) // scale
    try:
        files = list_images(config.get("data") or [])
    except DataError:
        return None
    used = 0
    for f in files:
        with Image.open(f) as im:
            used += large_enough(min(im.size), scale, lr_patch)
    return used


def _patch_note(config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """'HR patch 128 (564 images large enough)', with '--data-scales' copies: '(1,099 images large enough:
    579 of them copies shrunk by 0.75, 0.5)'."""
    n = images_used(config, records)
    scales = ", ".join(f"{f:g}" for f in config.get("data_scales") or [])
    copies = [r["copies"] for r in records if r["event"] == "data" and "copies" in r]
    if n is None:
        return f"HR patch {_hr_patch(config)}"
    # runs logged before the data record counted the copies: 'with copies'
    shrunk = (f": {copies[-1]:,} of them copies shrunk by {scales}" if copies else
              f", with copies shrunk by {scales}") if scales else ""
    return f"HR patch {_hr_patch(config)} ({n:,} images large enough{shrunk})"


def run_config(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The config the weights were trained under: the last (re)start's that trained a step (a resume may
    change operational options, e.g. add --ema; one that only closed the run trained nothing), with `steps` set to the steps actually taken, so that the card's command
    reproduces the run as it stopped (the data stream and lr schedule do not depend on `steps`)."""
    config = json.loads(_trained_starts(records)[-1]["config"])  # not a closing --resume's (its --out, say)
    return {**config, "steps": max(r["step"] for r in records)}


def _warm_start(config: dict[str, Any], records: list[dict[str, Any]], out: Path) -> str:
    source = config.get("init_from")
    if not source:
        return "none"
    notes = [f"sha256 {r['sha256'][:12]}" for r in records if r["event"] == "warm_start" and r.get("sha256")]
    if Path(source).resolve() == out.resolve():  # a bundled model fine-tuned in place
        notes.append("the weights bundled there before this card: the previous stage's")
    return f"{source} ({'; '.join(notes)})" if notes else source


def _autocast(config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The autocast dtype a run trained under: from its start record, else (older logs) from --bf16,
    whose default (None) meant on for CUDA and off for the CPU."""
    starts = _trained_starts(records)
    if starts and "autocast" in starts[-1]:
        return ", ".join(dict.fromkeys(r.get("autocast") or "off" for r in starts))
    bf16 = config.get("bf16")
    if bf16 is None:
        bf16 = bool(starts) and str(starts[-1].get("device", "")).startswith("cuda")
    return "bfloat16" if bf16 else "off"


def _loss(config: dict[str, Any], records: Sequence[dict[str, Any]] = ()) -> str:
    """The pixel loss a run trained with (configs from before --pixel-loss existed trained with L1), and
    the teacher it distilled from, if any (by the sha256 of its weights: a folder or alias may later hold others)."""
    loss = str(config.get("pixel_loss") or "l1").upper()
    if not config.get("teacher"):
        return loss
    ensemble = ", its x8 self-ensemble" if config.get("teacher_ensemble") else ""
    shas = dict.fromkeys(r["sha256"][:12] for r in records if r["event"] == "teacher" and r.get("sha256"))
    weights = f" (sha256 {', '.join(shas)})" if shas else ""
    return (f"{loss} (distilled: (1-w) {loss}(SR, HR) + w {loss}(SR, teacher) with w {config.get('teacher_weight')}; "
            f"teacher `{config['teacher']}`{weights}{ensemble}, predicting from the training LR)")


def _trained_starts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The start records of the segments that trained a step: not a resume that only closed a run at its
    current step (`--resume --steps N`, perhaps on another machine than the one that trained it)."""
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    trained = [records[i] for i, j in zip(starts, [*starts[1:], len(records)])
               if max(r.get("step", 0) for r in records[i:j]) > records[i]["step"]]
    return trained or [records[i] for i in starts]


def _devices(records: list[dict[str, Any]]) -> str:
    """The devices a run trained on, from its start records ('cpu', 'cuda:0', ...), in order of first use."""
    seen = [r["device"] for r in _trained_starts(records) if r.get("device")]
    return ", ".join(dict.fromkeys(seen)) or "not logged"


def _stage_line(i: int | None, run: Path, records: list[dict[str, Any]], out: Path, note: str | None) -> str:
    """One stage of the chain as far as the weights it handed on: `records` cut at a best validation pick
    give the steps, wall time and command (`--steps` that step) up to it. `i` None: a bullet (a soup's
    fine-tune) instead of the stage's number."""
    config = run_config(records)
    steps = config["steps"]
    data = f"data: {note}; " if note is not None else ""
    return (f"  {'-' if i is None else f'{i}.'} `{run}`, x{config.get('scale')}: {steps:,} steps, batch {config.get('batch')}, "
            f"{_patch_note(config, records)}, {data}{_loss(config, records)} loss, lr {config.get('lr')} halved every "
            f"{config.get('halve_every')}; warm start: {_warm_start(config, records, out)}{_ema_note(config, records)}; wall time "
            f"{wall_time_s(records) / 3600:.2f} h on {_devices(records)}; command: `{command_line(config)}`")


def make_card(run: Path, out: Path, *, title: str, benchmarks: Path, model_dir: Path | None = None,
              hardware: str | None = None, earlier: Sequence[tuple[Path, int | None]] = (),
              continues: Path | None = None, data_notes: Mapping[str, str] | None = None) -> Path:
    """Write the model directory `out` for `run`. `earlier`: the runs this one was warm-started from,
    oldest first, each with the last step the next stage took from it (None: all of it); their logs
    are kept as log-stage<i>.jsonl and their steps and commands listed in the card. `data_notes`: data
    folder -> what it held, for folders not beside the card (a stage trained on another machine); it
    applies to this run and to `earlier`, never to the stages of `continues`, whose notes are kept.
    `continues`: a model directory whose card's stages come before `earlier` (read before `out` is written,
    so it may be `out` itself)."""
    stages, notes = card_stages(continues) if continues is not None else ([], [])
    stages += [(r, stage_records(r, until)) for r, until in earlier]
    records = read_log(run)
    for name, recs in [r for stage in stages for r in _stage_runs(stage)]:
        _check_held_out(name, recs)
    _check_held_out(run, records)
    notes += [_noted_data(run_config(recs).get("data"), data_notes) for _, recs in [*stages[len(notes):], (run, records)]]
    _check_notes_used(data_notes, [recs for _, recs in [*stages[len(stages) - len(earlier):], (run, records)]])
    for i, stage in enumerate(stages, start=1):  # e.g. a card rewritten in place by the same command twice
        for name, recs in _stage_runs(stage):
            if recs[:1] == records[:1]:
                raise ValueError(f"{run} is already {'a fine-tune in ' if isinstance(stage, SoupStage) else ''}"
                                 f"stage {i} ({name}) of the chain; restore {continues or out} from git before "
                                 "writing its card again")
    if continues is not None:  # the first new stage must have started from the weights bundled there now
        first, first_recs = stages[len(stages) - len(earlier)] if earlier else (run, records)
        parent = hash_file(continues / "model.safetensors")
        starts = [r for r in first_recs if r["event"] == "warm_start"]
        if not starts:
            raise ValueError(f"{first} was not warm-started (no --init-from): it does not continue {continues}")
        here = [r for r in starts if Path(r.get("source", "")).resolve() == continues.resolve()]
        shas = {r["sha256"] for r in starts if r.get("sha256")}
        if here and parent not in shas:  # started from `continues` when it held other weights (an older bundle)
            raise ValueError(f"{first} was warm-started from {continues} when it held other weights (sha256 "
                             f"{', '.join(h[:12] for h in shas)}, now {parent[:12]}): it is not the next stage of "
                             "the chain bundled there now")
        if not here and parent not in shas:  # another file: maybe the same tensors saved apart (an export of
            # the checkpoint the bundle came from), maybe another model: said, not refused
            warnings.warn(f"{first} was warm-started from {', '.join(str(r.get('source')) for r in starts)}, not "
                          f"from the file bundled in {continues} (sha256 {parent[:12]}): if it is another model, "
                          "pass the runs in between with --earlier", UserWarning, stacklevel=2)
    config = run_config(records)
    src = model_dir or run / "best"
    if not src.is_dir():  # a path, never a Hub repo id: RUN/best of a run trained without validation
        raise ValueError(f"no model directory {src}" + ("" if model_dir else " (the run was trained without "
                         "validation?): pass --model DIR, e.g. one written by `dlsr-search export RUN/last.pt DIR`"))
    model = DLSR.from_pretrained(src)
    steps = config["steps"]
    # the step the bundled weights come from: the last best validation for best/ (by default or named with
    # --model), else the last checkpoint
    # a best validation pick hands on its step: the chain (stages.json, the stage line, the totals) stops there
    until = _best_pick(records) if src.resolve() == (run / "best").resolve() else None
    if until is not None:
        model_step = until
    else:  # an export of last.pt (or a best/ of a run that never validated): its last checkpoint
        saved = [r["step"] for r in records if r["event"] == "checkpoint"]
        model_step = saved[-1] if saved else steps
    written = _saved_step(src)
    trained = config.get("genotype_json")
    if trained and not model.genotype.architecture_equals(load_genotype(trained)):
        raise ValueError(f"{src} is another network ({model.genotype.name or 'its config.json'}, x{model.scale}, "
                         f"{model.genotype.channels} channels) than the one {run} trained")
    if written is None and model_dir is not None:  # a soup, a hand-saved model: nothing says which step it is
        raise ValueError(f"{src} does not say which training step its weights are from (no dlsr_train_step "
                         f"metadata): bundle {run}'s own best/, an export of its last.pt, or a soup as a soup")
    if written is not None and written != model_step:
        raise ValueError(f"{src} holds the weights of step {written:,} (its metadata), but {run}'s "
                         f"{'best validation' if until is not None else 'last checkpoint'} is step {model_step:,}: "
                         "pass RUN/best for the best validation pick, or export RUN/last.pt again")
    # what the bundled weights were trained under: the log up to them (a resume after the pick may add --ema)
    pick_note = " (its best validation PSNR-Y)" if until is not None else ""
    if until is None and model_step < max(r["step"] for r in records):  # logged on past the checkpoint (a kill):
        until = model_step  # the chain (stage line, totals, stages.json) stops at the weights bundled
    picked = records_until(records, until)
    picked_config = run_config(picked)
    # Evaluated before anything is written: a failure must not leave `out` half replaced.
    rows = _results_rows(model, title, benchmarks)
    hours = wall_time_s(records) / 3600
    history = ""
    if stages:
        lines = [_chain_line(i, stage, out, note) for i, (stage, note) in enumerate(zip(stages, notes), start=1)]
        chain = [*stages, (run, records_until(records, until))]
        lines.append(_stage_line(len(chain), *chain[-1], out, notes[-1]) + " (this run)")
        total_steps = sum(_stage_steps(stage) for stage in chain)
        total_h = sum(_stage_seconds(stage) for stage in chain) / 3600
        history = ("\n- training stages, oldest first (each warm-started from the one before; logs "
                   "`log-stage<i>.jsonl`):\n" + "\n".join(lines)
                   + f"\n- all stages, up to the bundled weights: {total_steps:,} steps, {total_h:.2f} h wall time.")
    hw = hardware or f"{_cpu_name()}, {config.get('threads') or 'all'} CPU threads"
    card = f"""{_card_head(title, model, rows)}
## Training

- data: `{', '.join(config.get('data') or ['$DLSR_DATA'])}` ({_data_note(config.get('data'), notes[-1])});
  validation: `{config.get('val') or 'held-out training images'}`; no Set14/B100 image was used.
- steps: {steps:,} trained, weights from step {model_step:,}{pick_note}; batch {config.get('batch')}; {_patch_note(config, records)}; {_loss(config, records)} loss; lr {config.get('lr')} halved every
  {config.get('halve_every')} steps; autocast: {_autocast(picked_config, picked)}; warm start: {_warm_start(config, records, out)}{_ema_note(picked_config, picked)}.
- hardware: {hw} ({_devices(records)}); training wall time {hours:.2f} h.
- command: `{command_line(config)}`
- log: `log.jsonl` (JSON lines); learning curve: `curve.png`.{history}

![learning curve](curve.png)

{_genotype_section(model.genotype)}"""
    val = [(r["step"], r["psnr_y"]) for r in records if r["event"] == "val" and r.get("psnr_y") is not None]

    def write(d: Path) -> None:
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(src / name, d / name)
        shutil.copyfile(run / "log.jsonl", d / "log.jsonl")
        _write_stages(d, stages, run, records, until, notes)
        plot_curve(val, d / "curve.png", f"{title}: validation PSNR-Y ({Path(config.get('val') or 'holdout').parent.name})")
        (d / "README.md").write_text(card)

    return _write_model_dir(out, write)


#: What a card's model directory holds (written by `make_card` / `make_soup_card`); anything else found
#: in an existing directory (a user's file) is carried over untouched.
_CARD_FILES = ("config.json", "model.safetensors", "README.md", "curve.png", "log.jsonl", "log-stage*.jsonl",
               "log-soup*.jsonl", "soup.json", STAGES_NAME)


def _write_model_dir(out: Path, write: Any) -> Path:
    """`export.replace_dir` for a card's model directory: files of an existing one that are not a card's
    (a user's) are carried over."""
    return replace_dir(out, write, keep=lambda f: not _is_card_file(f))


def _is_card_file(f: Path) -> bool:
    import fnmatch

    return f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in _CARD_FILES)


def _check_held_out(run: Path, records: list[dict[str, Any]]) -> None:
    """Refuse a run that validated (so chose its weights) on Set14 or B100: a card says they were never used."""
    val = run_config(records).get("val")
    if val and _held_out(val):
        raise ValueError(f"{run} validated on {val}: its card's {' and '.join(SETS[1:])} figures must stay held out "
                         "(validate on Set5 or on held-out training images)")


def _held_out(folder: str) -> bool:
    """Whether `folder` is one of the sets a card reports as held out (Set14, B100)."""
    return dataset_name(folder) in SETS[1:]


def _saved_step(model_dir: Path) -> int | None:
    """The training step a model directory's weights come from, as `dlsr-search train`/`export` wrote it
    in the safetensors metadata (None: not written by them)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        step = (f.metadata() or {}).get("dlsr_train_step", "")
    return int(step) if step.isdigit() else None


def _best_pick(records: list[dict[str, Any]]) -> int | None:
    """The step of a run's last best validation: where its best/ model directory comes from."""
    picks = [r["step"] for r in records if r["event"] == "val" and r.get("best")]
    return picks[-1] if picks else None


def make_soup_card(soup: Path, out: Path, *, title: str, benchmarks: Path, continues: Path,
                   hardware: str | None = None, data_notes: Mapping[str, str] | None = None) -> Path:
    """Write the model directory `out` for `soup` (written by `dlsr-search soup`): its weights and
    soup.json, the card, each fine-tune's training log (`log-soup<k>.jsonl`), the chain of `continues`
    (`log-stage<i>.jsonl`, stages.json with a "soup" list) and the fine-tunes' learning curves.

    `continues` is the model directory (written by this tool) that every fine-tune was warm-started from;
    each ingredient must be its weights or a fine-tune's `RUN/best` that still holds the weights the soup
    averaged (listed with its command, up to that pick). `data_notes`: as `make_card`'s, for fine-tunes
    trained on another machine. `continues` may be a soup's card itself (a soup of fine-tunes of a soup):
    that soup is then a stage of the chain. Everything is read and evaluated before `out` is written, so
    `out` may be `continues` itself."""
    from .soup import SOUP_NAME, read_soup

    record = read_soup(soup)
    ingredients = record["ingredients"]
    greedy = record.get("greedy")
    if greedy and _held_out(greedy["val"]):
        raise ValueError(f"{soup} was chosen on {greedy['val']}: the card's {' and '.join(SETS[1:])} figures must "
                         "stay held out (choose a soup on Set5 or held-out training images)")
    stages, notes = card_stages(continues)
    parent = hash_file(continues / "model.safetensors")
    members: list[tuple[dict[str, str], Path | None, list[dict[str, Any]]]] = []
    for ing in ingredients:
        if ing["sha256"] == parent:
            members.append((ing, None, []))
            continue
        model = Path(ing["model"])
        if model.name != "best" or not (model.parent / "log.jsonl").is_file():
            raise ValueError(f"soup ingredient {model} is neither a run's best/ (RUN/best beside RUN/log.jsonl; "
                             f"paths are as `dlsr-search soup` was given them) nor the weights of {continues}: "
                             "the card cannot say how it was trained")
        now = model / "model.safetensors"
        if not now.is_file() or hash_file(now) != ing["sha256"]:
            raise ValueError(f"{model} no longer holds the weights the soup averaged (sha256 {ing['sha256'][:12]}): "
                             "the run went on and picked another best; make the soup again")
        records = read_log(model.parent)
        _check_held_out(model.parent, records)
        starts = {r.get("sha256") for r in records if r["event"] == "warm_start"}
        if starts != {parent}:
            again = ((f"; {continues} holds a soup now (its soup.json): if this soup's fine-tunes started from the "
                      "weights bundled before it, restore that card from git first")
                     if (continues / SOUP_NAME).is_file() else "")
            raise ValueError(f"{model.parent} was not warm-started from the weights of {continues} (sha256 "
                             f"{parent[:12]}): a soup's card lists fine-tunes of the model it continues{again}")
        members.append((ing, model.parent, records_until(records, _best_pick(records))))
    trained = [(run, recs) for _, run, recs in members if run is not None]
    ft_notes = {run: _noted_data(run_config(recs).get("data"), data_notes) for run, recs in trained}
    _check_notes_used(data_notes, [recs for _, recs in trained])
    if not trained:
        raise ValueError(f"{soup}: no ingredient is a fine-tune with a training log")
    model = DLSR.from_pretrained(soup)
    rows = _results_rows(model, title, benchmarks)

    # the card, logs, index and curves, all made before anything is written
    logs, entries = _stage_files(stages, notes)
    logs.update({f"log-soup{k}.jsonl": recs for k, (_, recs) in enumerate(trained, start=1)})
    index: dict[str, Any] = {"format_version": 1, "stages": entries}
    k = iter(range(1, len(trained) + 1))
    index["soup"] = [{"model": ing["model"], "sha256": ing["sha256"],
                      **({"run": str(run), "log": f"log-soup{next(k)}.jsonl", "data_note": ft_notes[run]} if run
                         else {"stage": len(stages)})}
                     for ing, run, _ in members]
    curves = [(run.name, [(r["step"], r["psnr_y"]) for r in recs if r["event"] == "val" and r.get("psnr_y") is not None])
              for run, recs in trained]
    # the level the fine-tunes started from: the warm start's own pick (a soup in the chain has no
    # validation record of its own: its fp32 greedy score is another measure, so no line is drawn)
    before = stages[-1][1] if stages and not isinstance(stages[-1], SoupStage) else []
    start = [r["psnr_y"] for r in before if r["event"] == "val" and r.get("best")]
    if start:
        end = max((x for _, pts in curves for x, _ in pts), default=1)
        curves.append(("warm start", [(0, start[-1]), (end, start[-1])]))

    config = run_config(trained[0][1])
    lines = []
    for ing, run, recs in members:
        if run is None:
            lines.append(f"  - `{ing['model']}` (sha256 {ing['sha256'][:12]}): the weights of stage {len(stages)} "
                         "below, the warm start of the others")
            continue
        pick = [r for r in recs if r["event"] == "val" and r.get("best")][-1]
        lines.append(_stage_line(None, run, recs, out, ft_notes[run])
                     + f"; its pick: step {pick['step']:,}, the best validation PSNR-Y ({pick['psnr_y']:.3f} dB)")
    sibling_s = sum(wall_time_s(recs) for _, recs in trained)
    chain = [_chain_line(i, stage, out, note) for i, (stage, note) in enumerate(zip(stages, notes), start=1)]
    history = ("\n- training stages up to the common warm start, oldest first (each warm-started from the one "
               "before; logs `log-stage<i>.jsonl`):\n" + "\n".join(chain)) if chain else ""
    total_steps = sum(_stage_steps(stage) for stage in [*stages, *trained])
    total_h = (sum(_stage_seconds(stage) for stage in stages) + sibling_s) / 3600
    hw = hardware or f"{_cpu_name()}, {config.get('threads') or 'all'} CPU threads"
    tried = greedy["candidates"] if greedy else [ing["model"] for ing, _, _ in members]
    how = f"dlsr-search soup <this directory> {' '.join(tried)}" + (f" --greedy-on {greedy['val']}" if greedy else "")
    selection = ""
    if greedy:
        selection = ("\n- greedy selection on `{}` (fp32 PSNR-Y): the models ranked by their own score, each next one "
                     "kept only if the average with it scored no lower: ".format(greedy["val"])
                     + "; ".join(f"`{st['model']}` {'alone' if i == 0 else 'added'} {st['psnr_y']:.4f} dB"
                                 f"{'' if st['kept'] else ' (left out)'}" for i, st in enumerate(greedy["steps"]))
                     + " (what was left out is not in the weights; its logs and wall time are not listed here)")
    # every fine-tune's data and validation folders (the same for all, as a rule)
    datas = dict.fromkeys(tuple(run_config(recs).get("data") or ["$DLSR_DATA"]) for _, recs in trained)
    data = "; ".join(f"`{', '.join(d)}` ({_data_note(list(d), _noted_data(list(d), data_notes))})" for d in datas)
    val = ", ".join(f"`{v}`" for v in dict.fromkeys(run_config(recs).get("val") or "held-out training images"
                                                  for _, recs in trained))
    card = f"""{_card_head(title, model, rows)}
## Training

- weights: a model soup (Wortsman et al., 2022): the uniform average of the weights of {len(members)} models
  of one network (listed in `soup.json`), fine-tunes of stage {len(stages)}'s weights below{" and those weights" if any(r is None for _, r, _ in members) else ""}, made by
  `{how}`:
{chr(10).join(lines)}{selection}
- data: {data};
  validation: {val}; no Set14/B100 image was used.
- hardware: {hw} ({', '.join(dict.fromkeys(_devices(recs) for _, recs in trained))}); the fine-tunes' wall
  times sum to {sibling_s / 3600:.2f} h.
- logs: `log-soup<k>.jsonl` (JSON lines, the fine-tunes in the order above); learning curves: `curve.png`.{history}
- all stages, up to the bundled weights: {total_steps:,} steps, {total_h:.2f} h wall time.

![learning curves](curve.png)

{_genotype_section(model.genotype)}"""

    def write(d: Path) -> None:
        for name in ("config.json", "model.safetensors", SOUP_NAME):
            shutil.copyfile(soup / name, d / name)
        for name, recs in logs.items():
            write_jsonl(d / name, recs)
        (d / STAGES_NAME).write_text(json.dumps(index, indent=1) + "\n")
        plot_curves(curves, d / "curve.png", f"{title}: validation PSNR-Y of the soup's fine-tunes")
        (d / "README.md").write_text(card)

    return _write_model_dir(out, write)


def _results_rows(model: DLSR, title: str, benchmarks: Path) -> list[str]:
    """The card's results table: `model` and bicubic evaluated by dlsr-eval's code, next to the paper."""
    dirs = [benchmarks / s for s in SETS]
    ours = {r["dataset"]: r for r in evaluate(model, dirs)}
    bic = {r["dataset"]: r for r in evaluate_bicubic(dirs, scale=model.scale)}
    paper = PAPER.get(model.scale, {}) if model.genotype.channels == 48 else {}
    rows = ["| method | " + " | ".join(SETS) + " |", "|---|" + "---|" * len(SETS)]
    rows.append(f"| **{title} (this model)** | " + " | ".join(f"{ours[s]['psnr']:.2f} / {ours[s]['ssim']:.4f}" for s in SETS) + " |")
    if paper:
        rows.append("| DLSR, paper Table 2 (PSNR) | " + " | ".join(f"{paper[s]:.2f}" for s in SETS) + " |")
    rows.append("| bicubic | " + " | ".join(f"{bic[s]['psnr']:.2f} / {bic[s]['ssim']:.4f}" for s in SETS) + " |")
    return rows


def _card_head(title: str, model: DLSR, rows: list[str]) -> str:
    genotype = model.genotype
    return f"""# {title}

DLSR x{genotype.scale}, {genotype.channels} channels, {model.num_parameters:,} parameters. Trained by this project
with its own `dlsr-search train` (not converted from the authors' release). Load it with
`DLSR.from_pretrained(...)` or use it through `dlsr_infer.upscale`.

## Results (PSNR / SSIM on Y, border = scale, LR by MATLAB-style bicubic)

{chr(10).join(rows)}

Produced by `dlsr-eval <this directory> --sets Set5 Set14 B100 --bicubic` (and by
`python -m dlsr_search.modelcard`, which wrote this card).
"""


def _genotype_section(genotype: Any) -> str:
    cells = "\n".join(f"| {j} | {', '.join(c.ops)} | {', '.join(map(str, c.inputs))} |"
                      for j, c in enumerate(genotype.cells, start=1))
    return f"""## Genotype

| cell | MRB ops | inputs (0 = stem) |
|---|---|---|
{cells}
"""


def summary_table(weights: Path) -> str:
    """README's results table, gathered from the bundled model cards (each made by `make_card`)."""
    lines = ["| model | params | Set5 | Set14 | B100 |", "|---|---|---|---|---|"]
    seen: set[str] = set()  # reference rows (paper, bicubic) shared by two cards of one scale appear once
    models = [(DLSR.from_pretrained(card.parent), card) for card in sorted(weights.glob("*/README.md"))]
    if not models:  # an empty table would read as "no models", not as a wrong folder
        what = "is not a folder" if not weights.is_dir() else "holds no model directory with a model card"
        raise FileNotFoundError(f"{weights} {what} (give the folder of model directories, e.g. weights)")
    for model, card in sorted(models, key=lambda mc: (mc[0].scale, -mc[0].num_parameters)):
        text = card.read_text()
        if "| method |" not in text:
            raise ValueError(f"{card} has no results table: is {card.parent} a model directory written by "
                             "`python -m dlsr_search.modelcard`? (a soup gets its card from it too)")
        table = text.split("| method |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # the results rows only
        for row in table:
            cells = [c.strip() for c in row.strip("|").split("|")]
            name = cells[0].replace("**", "").replace(" (this model)", " (ours, bundled)")
            params = f"{model.num_parameters:,}"
            if name.startswith("bicubic"):
                name, params = f"bicubic x{model.scale}", "-"
            row = f"| {name} | {params} | " + " | ".join(cells[1:]) + " |"
            if name.startswith(("bicubic", "DLSR, paper")):
                if row in seen:
                    continue
                seen.add(row)
            lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        if len(argv) > 2 or argv[1:2] in (["-h"], ["--help"]):
            print("usage: python -m dlsr_search.modelcard summary [WEIGHTS_DIR]  (README's results table from the "
                  "model cards in WEIGHTS_DIR, default weights)", file=sys.stderr if len(argv) > 2 else sys.stdout)
            return 2 if len(argv) > 2 else 0
        try:
            print(summary_table(Path(argv[1]) if len(argv) > 1 else Path("weights")))
        except (ValueError, FileNotFoundError, ModelLoadError) as exc:
            print(f"python -m dlsr_search.modelcard summary: error: {exc}", file=sys.stderr)
            return 2
        return 0
    p = argparse.ArgumentParser(prog="python -m dlsr_search.modelcard", description=__doc__.splitlines()[0],
                                epilog="python -m dlsr_search.modelcard summary [WEIGHTS_DIR]: README's results "
                                "table, from the model cards in WEIGHTS_DIR (default weights)")
    p.add_argument("run", type=Path, help="run folder of dlsr-search train (log.jsonl, best/), or a model soup "
                   "written by `dlsr-search soup` (its soup.json names the fine-tunes, each a RUN/best)")
    p.add_argument("out", type=Path, help="model directory to write (e.g. weights/dlsr-x2)")
    p.add_argument("--title", required=True)
    p.add_argument("--model", type=Path, default=None,
                   help="model directory to bundle (default RUN/best; use `dlsr-search export RUN/last.pt DIR` "
                        "for the last step, which involves no selection on validation images)")
    p.add_argument("--benchmarks", type=Path, default=None, help="benchmark root (default: shared data)")
    p.add_argument("--hardware", default=None, help="hardware description (default: this machine's CPU)")
    p.add_argument("--data-note", action="append", default=[], metavar="FOLDER=TEXT",
                   help="what a training folder held, for a stage trained on another machine (repeat; "
                        "default: the images counted in the folder here)")
    p.add_argument("--earlier", action="append", default=[], metavar="RUN[@STEP]",
                   help="a run this one was warm-started from, oldest first (repeat); @STEP: the last step "
                        "the next stage took from it, when that run went on training afterwards")
    p.add_argument("--continues", type=Path, default=None, metavar="MODEL_DIR",
                   help="a model directory written by this tool that the run (or the first --earlier) was "
                        "warm-started from: its card's stages and logs come first, without their run folders")
    a = p.parse_args(argv)
    notes = dict(n.split("=", 1) for n in a.data_note if "=" in n)
    if len(notes) != len(a.data_note):
        p.error("--data-note takes FOLDER=TEXT")
    if is_run_folder(a.out):  # its config.json would be replaced
        p.error(f"OUT {a.out} is a run folder (it holds last.pt or log.jsonl): the card's weights and config.json "
                "would replace the run's own, which could then not be resumed; write the card to a folder of its own")
    try:
        if (a.run / "soup.json").is_file():  # a model soup: its ingredients say which runs trained it
            if a.model or a.earlier or a.continues is None:
                p.error("a soup's card takes --continues (the model its fine-tunes started from) and no --model "
                        "or --earlier: its soup.json names its models")
            out = make_soup_card(a.run, a.out, title=a.title, benchmarks=a.benchmarks or default_benchmarks_dir(),
                                 continues=a.continues, hardware=a.hardware, data_notes=notes)
        else:
            out = make_card(a.run, a.out, title=a.title, benchmarks=a.benchmarks or default_benchmarks_dir(),
                        model_dir=a.model, hardware=a.hardware, earlier=[parse_stage(e) for e in a.earlier],
                        continues=a.continues, data_notes=notes)
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder we may not write: the card is all or none
        print(f"{p.prog}: error: {exc} ({a.out} was left as it was)", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
