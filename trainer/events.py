"""The event log of a run: `events.jsonl`, one JSON object a line, appended by the worker and tailed by the UI.

Both sides import this module; it needs only the standard library. Every event has `type` and `time`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
TYPES = {
    "status": ("phase", "message"),  # phase: loading, caching, training, sampling, saving, cancelling
    "step": ("step", "total_steps", "epoch", "loss", "lr"),  # + samples_per_s, eta_s
    "sample": ("step", "prompt", "seed", "path"),
    "checkpoint": ("step", "epoch", "path"),  # path: a .safetensors in output/ or a state/ folder
    "done": ("path",),
    "error": ("message",),
    "cancelled": ("step",),
}


class EventWriter:
    """Appends events, one flushed line each: a reader sees whole lines (a crash can lose at most the last)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    def emit(self, type: str, **fields: Any) -> dict:
        missing = [k for k in TYPES[type] if k not in fields]
        if missing:
            raise ValueError(f"{type} event lacks {missing}")
        event = {"type": type, "time": time.time(), **fields}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        return event

    def status(self, phase: str, message: str) -> dict:
        return self.emit("status", phase=phase, message=message)


@dataclass
class EventReader:
    """Reads the events appended since the last call, from a byte offset: never the whole file again."""

    path: Path
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events


def read_all(run_dir: Path) -> list[dict]:
    return EventReader(Path(run_dir) / EVENTS_FILE).read_new()
