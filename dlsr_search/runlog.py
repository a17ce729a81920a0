"""Run logging: a concise console line every N steps, a tqdm bar, and a JSON-lines file per run.

Only rank 0 logs (other ranks get a logger that does nothing). Every record carries the step and a
wall-clock timestamp; the JSON-lines file (``OUT/log.jsonl``) is appended to across resumes, so one
file tells the whole history of a run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class RunLog:
    def __init__(self, out_dir: Path | None, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True, desc: str = "train") -> None:
        self.enabled = enabled
        self.out_dir = out_dir if enabled else None
        self.file = None
        self.bar = None
        if not enabled:
            return
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=False)

    def record(self, event: str, step: int, **fields: Any) -> None:
        if not self.enabled or self.out_dir is None:
            return
        if self.file is None:  # opened at the first record: a run that fails before it leaves no log behind
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "log.jsonl"
            torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
            self.file = open(path, "a", buffering=1)  # line-buffered: survives a kill
            if torn:  # a kill mid-line: end that line, so this record is not glued onto it
                self.file.write("\n")
        rec = {"event": event, "step": step, "time": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in fields.items()})
        self.file.write(json.dumps(rec) + "\n")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


__all__ = ["RunLog"]
