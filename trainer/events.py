"""The event log of a run: `events.jsonl`, one JSON object a line, appended by the worker and tailed by the UI.

Both sides import this module; it needs only the standard library. Every event has `type` and `time`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
TYPES = {
    "start": ("step",),  # a worker begins (or resumes) training at this step; what was logged after it is redone
    "status": ("phase", "message"),  # phase: loading, caching, training, sampling, saving, cancelling, held-out
    "step": ("step", "total_steps", "epoch", "loss", "lr"),  # + samples_per_s, eta_s; keys_scaled, mean_norm, max_norm
    "sample": ("step", "prompt", "seed", "path"),
    "checkpoint": ("step", "epoch", "path"),  # path: a .safetensors in output/ or a state/ folder
    "done": ("path",),
    "error": ("message",),
    "cancelled": ("step",),
    "validation": ("step", "epoch", "loss"),  # the held-out loss (trainer/validation.py); + images
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
            if line := log_line(event):  # the worker's log tells the story too, not only the libraries' warnings
                logging.getLogger("trainer").info(line)
        return event

    def status(self, phase: str, message: str) -> dict:
        return self.emit("status", phase=phase, message=message)


def log_line(e: dict) -> str:
    """An event as a line of the worker's log ("" for those it would flood with: steps and samples)."""
    if e["type"] == "status":
        return e["message"]
    if e["type"] == "checkpoint":
        return f"saved {e['path']} (step {e['step']}, epoch {e['epoch']})"
    if e["type"] == "validation":
        return f"held-out loss {e['loss']:.4f} at step {e['step']}"
    if e["type"] == "done":
        return f"done: {e['path']}"
    return f"cancelled at step {e['step']}" if e["type"] == "cancelled" else ""


READ_CHUNK = 4 << 20  # bytes a read takes at most: a long history is caught up with over a few reads
MAX_LINE = 1 << 20  # a longer line is not an event we wrote


def is_event(value) -> bool:
    """An object of a known type that carries that type's fields."""
    if not (isinstance(value, dict) and value.get("type") in TYPES and "time" in value
            and all(k in value for k in TYPES[value["type"]])):
        return False
    numbers = {"step": ("step", "total_steps", "epoch", "loss"), "sample": ("step",), "start": ("step",),
               "validation": ("step", "epoch", "loss")}.get(value["type"], ())
    return all(isinstance(value[k], (int, float)) and not isinstance(value[k], bool) for k in numbers)


@dataclass
class EventReader:
    """Reads the events appended since the last call, from a byte offset: never the whole file again.
    A line that is not a whole, known event (a crash mid-write, a hand edit) is skipped and counted."""

    path: Path
    offset: int = 0
    skipped: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(READ_CHUNK)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        if len(self._partial) > MAX_LINE:
            self._partial, self.skipped = b"", self.skipped + 1
        events = []
        for line in filter(bytes.strip, lines):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if is_event(event):
                events.append(event)
            else:
                self.skipped += 1
        return events


def read_all(run_dir: Path) -> list[dict]:
    """Every event of a run, from the start."""
    reader, events = EventReader(Path(run_dir) / EVENTS_FILE), []
    while True:
        before = reader.offset
        events += reader.read_new()
        if reader.offset == before:
            return events
