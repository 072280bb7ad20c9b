"""Compare jobs (issue #15): `python -m trainer compare FOLDER` in a child process, one at a time, and what their
folders say. Standard library only, like ui/jobs.py; the grid's HTML is ui/compare_tab.py's.

    <compares_dir>/<id>/compare.json   the spec (written here, read by the worker)
                        events.jsonl   status, compare_file, compare_cell, done, error, cancelled (trainer.events)
                        status.json    {state, message, pid}: written here before the worker starts, then by it
                        cells/*.png    one per cell; grid.png the whole grid
                        files/NN/<name>  the dropped-in files, under the names they were dropped with
                        worker.out     the worker's stdout and stderr

One compare runs at a time; later ones wait, queued. A compare needs the GPU a training may be using: on a machine
with GPUs it waits until one is free of training runs (a run queued after it may then share that GPU: the job
manager does not know about compares). On a CPU-only machine it runs beside a training run.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from trainer import config, prompts
from trainer.compare_spec import SPEC_FILE, CompareError, checked, metadata, number  # noqa: F401
from trainer.events import EventReader, read_all
from trainer.rundir import RunDir, new_id
from ui.jobs import trial_ids
from ui.security import inside
from ui.worker_queue import WorkerQueue, signal_worker

FINAL = ("done", "failed", "cancelled")
EXIT_CANCELLED = 3


# --- the files of a run ---

def run_files(run: RunDir) -> list[dict]:
    """The run's saved files, oldest first: {path, name, epoch, step, held_out, label}; the label names the run
    ("r / lora-000002 (epoch 2, step 8)"; a sweep's trial as "<sweep>/trial-000"), so files of several runs stay
    apart. Epoch, step and held-out loss from the run's checkpoint and validation events, else from the file's
    metadata."""
    events = read_all(run.path)
    name = f"{run.path.parent.name}/{run.id}" if (run.path.parent / "sweep.json").is_file() else run.id  # a trial
    saved = {e["path"]: e for e in events if e["type"] == "checkpoint"}
    held = {e["step"]: e["loss"] for e in events if e["type"] == "validation"}
    found = []
    for path in sorted(run.output.glob("*.safetensors")):
        meta, event = metadata(path), saved.get(f"output/{path.name}", {})
        step = event.get("step", number(meta.get("ss_steps"), int))
        epoch = event.get("epoch", number(meta.get("ss_epoch"), int))
        loss = held.get(step, number(meta.get("ss_validation_loss")))
        found.append({"path": str(path.resolve()), "name": path.name, "epoch": epoch, "step": step,
                      "held_out": loss, "label": f"{name} / {file_label(path.stem, epoch, step)}"})
    return sorted(found, key=lambda f: (f["step"] is None, f["step"] or 0, f["name"]))


def file_label(stem: str, epoch, step) -> str:
    said = ", ".join(f"{what} {n}" for what, n in (("epoch", epoch), ("step", step)) if n is not None)
    return f"{stem} ({said})" if said else stem


def upload_label(path: Path) -> str:
    meta = metadata(path)
    return file_label(path.stem, number(meta.get("ss_epoch"), int), number(meta.get("ss_steps"), int))


def run_settings(run: RunDir) -> dict:
    """The compare settings a run suggests: its base (with the separate files of an SD 3.5 / FLUX.1 split layout,
    and bf16 for those), sample prompts (trigger filled in, their shared negative prompt), sampler, steps, seed,
    guidance, size and clip skip."""
    cfg = config.load(run.config)
    s, size = cfg.sample, cfg.data.resolution
    trigger = cfg.data.trigger_word
    asked = [prompts.parse(p.replace("{trigger}", trigger), cfg.family) for p in s.sample_prompts]
    negatives = {p.negative for p in asked}  # a compare has one negative prompt: theirs when they share one
    parts = {f: getattr(cfg.model, f) for f in config.PART_FIELDS if getattr(cfg.model, f)}
    # SD 3.5 / FLUX.1 in bf16, as they train: in fp32 FLUX.1 dev's transformer alone takes 48 GB
    flow = {"precision": "bf16"} if cfg.family in config.FLOW_FAMILIES else {}
    return flow | {"base": cfg.model.pretrained_model_name_or_path, "parts": parts,
            "prompts": [p.text for p in asked] or [trigger or "a picture"],
            "negative": negatives.pop() if len(negatives) == 1 else "",
            "seeds": [s.sample_seed], "sampler": s.sample_sampler, "steps": s.sample_steps,
            "cfg_scale": s.sample_cfg_scale, "width": s.sample_width or size, "height": s.sample_height or size,
            "clip_skip": cfg.model.clip_skip}


def spec_of(runs: list[RunDir], chosen: list[str] | None, settings: dict) -> dict:
    """The spec a form or a script asks for: the first run's suggestions, then `settings` (None = not given); the
    saved files of the runs whose paths are in `chosen` (all of them when None), labelled, run by run. CompareError
    for a file that is not a saved file of one of the runs."""
    saved = [f for run in runs for f in run_files(run)]
    if chosen is not None:
        if unknown := sorted(set(chosen) - {f["path"] for f in saved}):
            named = " or ".join(run.id for run in runs) or "the chosen runs"
            raise CompareError(f"files: {Path(unknown[0]).name} is not a saved file of {named}")
        saved = [f for f in saved if f["path"] in chosen]
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(given.get("prompts"), str):
        given["prompts"] = given["prompts"].splitlines()
    suggested = run_settings(runs[0]) if runs else {}
    if "base" in given and given["base"] != suggested.get("base") and "parts" not in given:
        suggested.pop("parts", None)  # the run's split-layout files go with its own base only
    return suggested | given | {"files": [f["path"] for f in saved], "labels": [f["label"] for f in saved]}


# --- the trials of sweeps (issue #16): their files are compared like a run's ---

def trial_names(runs_dir: Path) -> list[str]:
    """"<sweep id>/<trial>" for every trial with a saved file, of every sweep in the runs folder, newest first."""
    return [t for t in trial_ids(runs_dir) if any((Path(runs_dir) / t / "output").glob("*.safetensors"))]


# --- one compare folder ---

@dataclass
class CompareInfo:
    compare_id: str
    path: Path
    state: str  # queued | running | done | failed | cancelled
    message: str
    created: float
    pid: int | None = None

    def summary(self) -> str:
        return f"{self.compare_id}: {self.state}" + (f" ({self.message})" if self.message else "")


def ended_by_events(folder: Path, exit_code: int | None, cancel_sent: bool = False) -> tuple[str, str]:
    """How a worker that is gone ended, by its own events: (state, message). Without a word from it, a worker this
    app sent a cancel to (`cancel_sent`) and that then died of a signal, or exited as cancelled, was cancelled: the
    signal can come before the worker has set up its handler (while it imports torch or loads the base)."""
    for event in reversed(read_all(folder)):
        if event["type"] == "done":
            return "done", ""
        if event["type"] == "cancelled":
            return "cancelled", stopped_after(event.get("step"), event.get("total"))
        if event["type"] == "error":
            return "failed", str(event["message"])
    by_signal = exit_code is None or exit_code < 0 or exit_code > 128  # -N: killed by signal N; 128+N: its own exit
    if exit_code == EXIT_CANCELLED or (cancel_sent and by_signal):
        return "cancelled", "stopped before its first cell"
    code = "" if exit_code is None else f" (exit status {exit_code})"
    return "failed", f"the compare worker stopped without finishing{code}; see {folder / 'worker.out'}"


def stopped_after(cells, total=None) -> str:
    """How far a cancelled compare got, in cells of its grid (as the page counts them)."""
    if not cells:
        return "stopped before its first cell"
    return f"stopped after {cells} of {total} cells" if total else f"stopped after {cells} cell(s)"


def worker_alive(pid, folder: Path) -> bool:
    """Is `pid` a live compare worker of `folder`? (a pid in a status file is data: check what it runs)."""
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        zombie = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return False
    return not zombie and "compare" in cmdline and folder.name in cmdline


@dataclass
class CompareManager(WorkerQueue):
    compares_dir: Path
    command: ClassVar[str] = "compare"

    def __post_init__(self):
        self.compares_dir = Path(self.compares_dir)

    def folder(self, compare_id) -> Path:
        """The compare's folder; ValueError unless `compare_id` is a plain name of a compare folder here."""
        path = inside(self.compares_dir, compare_id, "compare id")
        if not (path / SPEC_FILE).is_file():
            raise ValueError(f"no compare {compare_id!r}")
        return path

    def spec(self, compare_id: str) -> dict:
        return json.loads((self.folder(compare_id) / SPEC_FILE).read_text(encoding="utf-8"))

    def compares(self) -> list[CompareInfo]:
        if not self.compares_dir.is_dir():
            return []
        found = [self.info(p.name) for p in self.compares_dir.iterdir() if (p / SPEC_FILE).is_file()]
        return sorted(found, key=lambda c: c.created, reverse=True)

    listed = compares

    def info(self, compare_id: str) -> CompareInfo:
        path = self.folder(compare_id)
        status = RunDir(path).status()
        state, message = status.get("state", "failed"), str(status.get("message", ""))
        pid = status.get("pid") if isinstance(status.get("pid"), int) else None
        proc = self._procs.get(compare_id)
        if proc is not None and proc.poll() is None:
            state, pid = "running", proc.pid
        elif state == "running" and not worker_alive(pid, path):
            state, message = ended_by_events(path, proc.returncode if proc is not None else None,
                                             self._cancels.get(compare_id, 0) > 0)
            RunDir(path).write_status(state=state, message=message, pid=None)
            self._procs.pop(compare_id, None)
        elif state not in ("queued", "running", *FINAL):
            state, message = "failed", f"status.json names no known state ({state!r})"
        created = status.get("created") if isinstance(status.get("created"), (int, float)) else 0.0
        return CompareInfo(compare_id, path, state, message, created, pid)

    def start(self, spec: dict, uploads: list[tuple[Path, str]] = ()) -> CompareInfo:
        """A new compare of `spec` (checked) plus `uploads` (path, label), copied into its folder; it is queued
        and starts at once when nothing else is compared and a device is free. CompareError for a bad spec."""
        spec = dict(spec)
        spec["files"] = [str(Path(f).resolve()) for f in spec.get("files", [])]
        spec["labels"] = list(spec.get("labels") or [Path(f).stem for f in spec["files"]])
        checked(spec | {"files": spec["files"] + [str(p) for p, _ in uploads],
                        "labels": spec["labels"] + [label for _, label in uploads]})
        self.compares_dir.mkdir(parents=True, exist_ok=True)
        folder = self.compares_dir / new_id(self.compares_dir, "compare")
        (folder / "files").mkdir(parents=True)
        for path, label in uploads:  # each in a folder of its own: the copy keeps the name the user gave it
            copy = folder / "files" / f"{len(spec['files']):02d}" / Path(path).name
            copy.parent.mkdir()
            shutil.copyfile(path, copy)
            spec["files"].append(str(copy.resolve()))
            spec["labels"].append(label)
        (folder / SPEC_FILE).write_text(json.dumps(checked(spec), indent=1), encoding="utf-8")
        RunDir(folder).write_status(state="queued", message="waiting for its turn", pid=None)
        self.tick()
        return self.info(folder.name)

    def _launch(self, compare: CompareInfo, device: str) -> None:
        RunDir(compare.path).write_status(state="running", message="starting the worker", pid=None)
        self.spawn(compare.compare_id, compare.path, device)

    def cancel(self, compare_id: str) -> CompareInfo:
        """A queued compare ends at once; a running one gets SIGTERM (it stops after the current cell), then, on a
        second cancel, SIGKILL."""
        with self._lock:
            info = self.info(compare_id)
            if info.state == "queued":
                RunDir(info.path).write_status(state="cancelled", message="cancelled before it started")
            elif info.state == "running":
                count = self._cancels[compare_id] = self._cancels.get(compare_id, 0) + 1
                sig = signal.SIGTERM if count == 1 else signal.SIGKILL
                # one started before this app may not lead a group of its own: its process alone, if alive
                signal_worker(sig, self._procs.get(compare_id), None,
                              info.pid if worker_alive(info.pid, info.path) else None)
            return self.info(compare_id)

    def view(self, compare_id: str) -> "CompareView":
        return CompareView(compare_id, self.folder(compare_id), self.spec(compare_id))


def free_gpu(jobs) -> Callable[[], str | None]:
    """For CompareManager.free_device: the first GPU no running training uses, "" without GPUs, None to wait."""
    def free() -> str | None:
        if not jobs.devices:
            return ""
        running = [r for r in jobs.runs() if r.state == "running"]
        if any(not r.devices for r in running):  # started before its devices were known: it may be on any
            return None
        busy = {d for r in running for d in r.devices}
        return next((d for d in jobs.devices if d not in busy), None)

    return free


# --- what a compare has drawn so far ---

@dataclass
class CompareView:
    """A compare's events folded into its grid: cells by (row, strength, prompt, seed), the files' problems and
    held-out losses, errors, how it ended. Each page (and each API call) keeps its own cursor."""

    compare_id: str
    folder: Path
    spec: dict
    cells: dict = field(default_factory=dict)  # (file index | None for the base, strength i, prompt i, seed i) -> path
    files: dict = field(default_factory=dict)  # file index -> its compare_file event
    errors: list = field(default_factory=list)
    message: str = ""
    ended: str = ""  # done | failed | cancelled | ""
    grid: str = ""  # grid.png's path relative to the folder, once done
    shown: dict = field(default_factory=dict)  # per page component: what it shows now
    pictures: dict = field(default_factory=dict)  # the page's copies of the cells (data URIs), by path
    reader: EventReader | None = None
    _held: dict = field(default_factory=dict)

    def __post_init__(self):
        self.reader = self.reader or EventReader(self.folder / "events.jsonl")

    def changed(self, name: str, value) -> bool:
        """Is `value` new for page component `name` (and remember it)? Unchanged components are not sent again; a
        new view sends each once, None too (the page may still show another compare's grid.png)."""
        if name in self.shown and self.shown[name] == value:
            return False
        self.shown[name] = value
        return True

    def read(self) -> bool:
        events = self.reader.read_new()
        for e in events:
            self.add(e)
        return bool(events)

    def add(self, e: dict) -> None:
        kind = e["type"]
        if kind == "compare_cell":
            key = (e["file"], self.index(self.spec["strengths"], e["strength"]), e["prompt"],
                   self.index(self.spec["seeds"], e["seed"]))
            self.cells[key] = e["path"]
        elif kind == "compare_file":
            self.files[e["index"]] = e
        elif kind == "status":
            self.message = e["message"]
        elif kind == "error":
            self.errors.append(e["message"])
            self.ended = "failed"
        elif kind in ("done", "cancelled"):
            self.ended, self.grid = kind, e.get("path", "") if kind == "done" else self.grid

    @staticmethod
    def index(values: list, value) -> int | None:
        return next((i for i, v in enumerate(values) if isinstance(value, (int, float)) and abs(v - value) < 1e-9),
                    None)

    def problem(self, row: int) -> str:
        return str(self.files.get(row, {}).get("problem") or "")

    def held_out(self, row: int) -> float | None:
        """The file's held-out loss: its `ss_validation_loss`, else what the worker said."""
        if row not in self._held:
            self._held[row] = number(metadata(Path(self.spec["files"][row])).get("ss_validation_loss"))
        said = self.files.get(row, {}).get("held_out")
        return self._held[row] if self._held[row] is not None else number(said)

    def cell(self, row: int, strength: int, prompt: int, seed: int) -> str | None:
        """The cell's path relative to the folder; a strength-0 cell is the base's picture."""
        found = self.cells.get((row, strength, prompt, seed))
        if found is None and self.spec["strengths"][strength] == 0:
            found = self.cells.get((None, strength, prompt, seed))
        return found

    def positions(self, rows: list[int] | None = None):
        s, p, k = (range(len(self.spec[n])) for n in ("strengths", "prompts", "seeds"))
        rows = range(len(self.spec["files"])) if rows is None else rows
        return [(r, si, pi, ki) for r in rows for pi in p for ki in k for si in s]

    def usable(self) -> list[int]:
        """The rows of the files the worker has not skipped (so far)."""
        return [r for r in range(len(self.spec["files"])) if not self.problem(r)]

    def counts(self) -> tuple[int, int]:
        """(cells drawn, cells to draw) over the files without a problem."""
        positions = self.positions(self.usable())
        return sum(self.cell(*pos) is not None for pos in positions), len(positions)

    def checked(self) -> bool:
        """Has the worker said of every file whether it is drawn or skipped (so the cells to draw are known)?"""
        return len(self.files) >= len(self.spec["files"])

    def progress_text(self) -> str:
        done, total = self.counts()
        head = f"Cell {done} / {total}" if self.checked() else f"Cell {done} / up to {total}"
        if self.ended == "done":
            return f"{head} · done"
        if self.ended == "cancelled":
            return f"{head} · cancelled"
        if self.ended == "failed":
            return f"{head} · failed"
        return f"{head} · {self.message}" if self.message else f"{head} · waiting for the worker…"

    def problems_text(self) -> str:
        """The files skipped and the errors, one ⚠ line each ("" when all is well)."""
        lines = [f"⚠ {self.spec['labels'][r]}: {self.problem(r)} (skipped)"
                 for r in sorted(self.files) if isinstance(r, int) and 0 <= r < len(self.spec["labels"])
                 and self.problem(r)]
        return "\n\n".join(lines + [f"⚠ {m}" for m in self.errors])

    def status(self) -> dict:
        """What the API returns: the cells so far (their pictures relative to the folder) and the files' problems
        (state and message come from the manager)."""
        cells = [{"file": r, "label": self.spec["labels"][r], "strength": self.spec["strengths"][s],
                  "prompt": self.spec["prompts"][p], "seed": self.spec["seeds"][k],
                  "picture": path}
                 for r, s, p, k in self.positions(self.usable()) if (path := self.cell(r, s, p, k)) is not None]
        files = [{"index": r, "label": self.spec["labels"][r], "held_out": self.held_out(r),
                  "problem": self.problem(r)} for r in range(len(self.spec["files"]))]
        done, total = self.counts()
        grid = self.folder / self.grid if self.grid else None
        return {"done": done, "total": total, "cells": cells, "files": files, "errors": list(self.errors),
                "grid": str(grid) if grid and grid.is_file() else None}
