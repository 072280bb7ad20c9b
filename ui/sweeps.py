"""Sweeps (issue #16) from the app: made with the engine's own functions (trainer/sweep.py, trainer/sweep_space.py),
trained by `python -m trainer sweep FOLDER` in a child process, one sweep at a time; and what their folders say.
Standard library only, like ui/compares.py; the page is ui/sweep_tab.py's.

    <runs_dir>/<sweep id>/   the engine's layout (sweep.json, base.toml, trial-NNN/ run directories, ...), plus
                             dataset/      the Train tab's pictures, copied (base.toml points here), as a run's are
                             status.json   {state, message, pid}: queued | running | done | failed | cancelled |
                                           interrupted, written here (the worker writes only sweep.json)
                             worker.out    the worker's stdout and stderr

A sweep needs the GPU a training may be using: on a machine with GPUs it waits until one is free of training runs
(ui/compares.py's free_gpu; a run queued after it may then share that GPU: the job manager does not know about
sweeps). On a CPU-only machine it runs beside a training run.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from trainer import config, sweep, sweep_space
from trainer.config import ConfigError
from trainer.events import EventReader, read_all
from trainer.rundir import RunDir, new_id
from ui.security import inside
from ui.worker_queue import WorkerQueue, signal_worker

EXIT_CANCELLED, EXIT_LOCKED = 3, 4  # trainer/sweep_run.py's exit codes
RESUMABLE = ("cancelled", "interrupted", "failed", "created")


class NoSweep(ValueError):
    """A plain name that names no sweep folder (any more): a page whose stored sweep is gone shows none chosen."""


# --- the search space, as a form or a script gives it ---

def space_of(rows) -> dict:
    """[(field, values text)] -> the engine's space: "a, b, c" a list, "lo:hi" or "lo:hi:log" a range; empty
    rows are skipped. ConfigError naming the field (the engine's own parsers check every name and value)."""
    space = {}
    for key, text in rows:
        key, text = str(key or "").strip(), str(text if text is not None else "").strip()
        if not key and not text:
            continue
        if not key:
            raise ConfigError("space", f"values {text!r}: choose the field they are for")
        if not text:
            raise ConfigError(key, f"{key}: give its values (a, b, c) or a range low:high[:log]")
        parse = sweep_space.parse_range if ":" in text and "," not in text else sweep_space.parse_grid
        name, spec = parse(f"{key}={text}")
        if name in space:
            raise ConfigError(name, f"{name} is given twice in the search space")
        space[name] = spec
    return space


def api_space(space) -> dict:
    """The API's space: {field: [v1, v2] | "v1, v2" | "lo:hi[:log]" | {"values": [...]} | {"low", "high", "log"}}."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("space", "space: expected a dict {field: [values] or \"low:high[:log]\"}")
    rows = []
    for key, spec in space.items():
        if isinstance(spec, dict) and "values" in spec:
            spec = spec["values"]
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec):
            spec = f"{spec['low']}:{spec['high']}" + (":log" if spec.get("log") else "")
        if isinstance(spec, list):
            spec = ",".join(str(v) for v in spec)
        if not isinstance(spec, (str, int, float)):
            raise ConfigError(str(key), f"{key}: expected a list of values or \"low:high[:log]\", got {spec!r}")
        rows.append((key, str(spec)))
    return space_of(rows)


# --- one sweep folder ---

@dataclass
class SweepInfo:
    sweep_id: str
    path: Path
    state: str  # created | queued | running | done | failed | cancelled | interrupted
    message: str
    created: float
    pid: int | None = None

    def summary(self) -> str:
        return f"{self.sweep_id}: {self.state}" + (f" ({self.message})" if self.message else "")


def complete(folder: Path) -> bool:
    """Has every trial the sweep wants ended (done, pruned or failed)?"""
    state = sweep.read(folder)
    return len(state["trials"]) >= state["trials_wanted"] and all(t["state"] in sweep.FINAL for t in state["trials"])


def ended_by_exit(folder: Path, exit_code: int | None, cancelled: bool = False) -> tuple[str, str]:
    """How a worker that is gone ended: (state, message), by its exit code (None: not ours), whether it was
    cancelled (a SIGTERM before the worker set its handler, or a SIGKILL, ends it by the signal) and sweep.json."""
    if exit_code == 0 or (exit_code is None and complete(folder)):
        return "done", ""
    if exit_code == EXIT_CANCELLED or (cancelled and exit_code is not None and exit_code < 0):
        return "cancelled", "stopped; Resume continues every unfinished trial where it stopped"
    if exit_code == EXIT_LOCKED:
        return "failed", "another worker trains this sweep"
    if exit_code is None:
        return "interrupted", "the worker stopped without finishing; Resume continues every unfinished trial"
    return "failed", f"{last_line(folder / 'worker.out')} (exit status {exit_code}; see {folder / 'worker.log'})"


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "the worker stopped"
    return lines[-1][-300:] if lines else "the worker stopped without a word"


@dataclass
class SweepManager(WorkerQueue):
    runs_dir: Path
    command: ClassVar[str] = "sweep"

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir)

    def folder(self, sweep_id) -> Path:
        """The sweep's folder; ValueError unless `sweep_id` is a plain name of a sweep folder in the runs folder."""
        path = inside(self.runs_dir, sweep_id, "sweep id")
        if not (path / sweep.SWEEP_FILE).is_file():
            raise NoSweep(f"no sweep {sweep_id!r}")
        return path

    def trial(self, sweep_id, name) -> RunDir:
        """A trial's run directory; ValueError unless `name` is a trial of that sweep (as sweep.json says)."""
        folder = self.folder(sweep_id)
        path = inside(folder, name, "trial")
        if name not in {t["name"] for t in sweep.read(folder)["trials"]}:
            raise ValueError(f"{name!r} is not a trial of sweep {sweep_id}")
        return RunDir(path)

    def sweeps(self) -> list[SweepInfo]:
        if not self.runs_dir.is_dir():
            return []
        found = [self.info(p.name) for p in self.runs_dir.iterdir() if (p / sweep.SWEEP_FILE).is_file()]
        return sorted(found, key=lambda s: s.created, reverse=True)

    listed = sweeps

    def info(self, sweep_id: str) -> SweepInfo:
        path = self.folder(sweep_id)
        status = RunDir(path).status()
        state, message = status.get("state", "created"), str(status.get("message", ""))
        pid = status.get("pid") if isinstance(status.get("pid"), int) else None
        proc = self._procs.get(sweep_id)
        if proc is not None and proc.poll() is None:
            state, pid = "running", proc.pid
        elif (holder := RunDir(path).holder()) is not None:  # a worker this app did not start (or started before)
            state, pid = "running", holder.get("pid")
        elif state == "running":
            state, message = ended_by_exit(path, proc.returncode if proc is not None else None,
                                           sweep_id in self._cancels)
            RunDir(path).write_status(state=state, message=message, pid=None)
            self._procs.pop(sweep_id, None)
        if state == "created" and complete(path):
            state = "done"
        created = status.get("created") if isinstance(status.get("created"), (int, float)) else path.stat().st_mtime
        return SweepInfo(sweep_id, path, state, message, created, pid)

    def create(self, cfg, dataset: Path, space: dict, search: str, trials: int = 0, parallel: int = 0,
               prune: str = "none", seed: int = 0) -> SweepInfo:
        """A new queued sweep of `cfg` (a run config) over `space`, its pictures copied from `dataset`; made by
        trainer.sweep.create, so every error is the engine's ConfigError naming the field."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            config.save(cfg, Path(tmp) / "base.toml")
            folder = sweep.create(self.runs_dir, Path(tmp) / "base.toml", space, search, int(trials or 0),
                                  int(parallel or 0), prune, seed, name=new_id(self.runs_dir, "sweep"))
        try:
            shutil.copytree(dataset, folder / "dataset", ignore=shutil.ignore_patterns(".*"))
            base = config.load(folder / "base.toml")
            config.save(config.from_dict(config.deep_merge(config.to_dict(base), {
                "train_data_dir": str((folder / "dataset").resolve())})), folder / "base.toml")
            RunDir(folder).write_status(state="queued", message="waiting for its turn", pid=None)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no half-made sweep is left behind
            raise
        self.tick()
        return self.info(folder.name)

    def _launch(self, info: SweepInfo, device: str) -> None:
        proc = self.spawn(info.sweep_id, info.path, device)
        RunDir(info.path).write_status(state="running", message="", pid=proc.pid, started=time.time())

    def cancel(self, sweep_id: str) -> SweepInfo:
        """A queued sweep ends at once; a running one gets SIGTERM (every unfinished trial saves a resumable
        state), then, on a second cancel, SIGKILL."""
        with self._lock:
            info = self.info(sweep_id)
            if info.state == "queued":
                RunDir(info.path).write_status(state="cancelled", message="cancelled before it started")
            elif info.state == "running":
                count = self._cancels[sweep_id] = self._cancels.get(sweep_id, 0) + 1
                sig = signal.SIGTERM if count == 1 else signal.SIGKILL
                holder = RunDir(info.path).holder() or {}
                signal_worker(sig, self._procs.get(sweep_id), holder.get("pgid"), holder.get("pid"))
                RunDir(info.path).write_status(message="cancelling: the trials save their state" if count == 1
                                               else "killed")
            return self.info(sweep_id)

    def resume(self, sweep_id: str) -> SweepInfo:
        """Queue a cancelled, interrupted or failed sweep again: every unfinished trial continues where it
        stopped (the engine's resume)."""
        with self._lock:
            info = self.info(sweep_id)
            if info.state not in RESUMABLE:
                raise ValueError(f"{sweep_id} is {info.state}; only a cancelled, interrupted or failed sweep resumes")
            self._cancels.pop(sweep_id, None)
            RunDir(info.path).write_status(state="queued", message="resuming")
        self.tick()
        return self.info(sweep_id)

    def stop_trial(self, sweep_id: str, trial: str) -> str:
        """Ask the sweep's worker to stop one trial at its next step: it ends as a pruned one (its file saved, ranked
        by its last held-out loss) and the others go on. ValueError unless that trial is training now."""
        info = self.info(sweep_id)
        if trial not in [t["name"] for t in sweep.read(info.path)["trials"]]:
            raise ValueError(f"{sweep_id} has no trial {trial!r}")
        run = RunDir(info.path / trial)
        if info.state != "running" or run.state_name() != "running":
            raise ValueError(f"{sweep_id}/{trial} is not training ({run.state_name()}): only a training trial stops")
        run.stop_file.touch()
        return f"{sweep_id}/{trial}: stopping at its next step; the other trials go on"

    def deletable(self, sweep_id: str) -> SweepInfo:
        """The sweep, if it may be deleted now; ValueError for a queued or running sweep, or while a worker trains
        one of its trials alone."""
        info = self.info(sweep_id)
        if info.state in ("queued", "running"):
            raise ValueError(f"{sweep_id} is {info.state}: cancel it first")
        for trial in (p for p in info.path.iterdir() if p.is_dir()):
            if RunDir(trial).holder() is not None:
                raise ValueError(f"{sweep_id}/{trial.name} is being trained: cancel that worker first")
        return info

    def delete(self, sweep_id: str) -> None:
        """Delete a sweep no worker trains, with its trials: they are run directories inside its folder (and
        trials only: a full run started from one is a run of its own). ValueError as `deletable`."""
        with self._lock:  # so the queue does not start it meanwhile
            info = self.deletable(sweep_id)
            shutil.rmtree(info.path)
            self._procs.pop(sweep_id, None)
            self._cancels.pop(sweep_id, None)

    def view(self, sweep_id: str) -> "SweepView":
        return SweepView(sweep_id, self.folder(sweep_id))


# --- what a sweep's trials have done so far ---

def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass
class SweepView:
    """A sweep's trials as they stand: sweep.json for the params, groups, ranking and end states, each trial's own
    events (read incrementally, one cursor per trial and per view) for its live step and held-out losses."""

    sweep_id: str
    folder: Path
    readers: dict = field(default_factory=dict)  # trial -> EventReader
    steps: dict = field(default_factory=dict)  # trial -> its last step event
    held_out: dict = field(default_factory=dict)  # trial -> [(step, loss)]
    live: dict = field(default_factory=dict)  # trial -> its last status event's (phase, message)
    shown: dict = field(default_factory=dict)

    def changed(self, name: str, value) -> bool:
        if self.shown.get(name) == value:
            return False
        self.shown[name] = value
        return True

    def read(self) -> dict:
        """sweep.json, with every trial's new events folded in."""
        state = sweep.read(self.folder)
        for t in state["trials"]:
            reader = self.readers.setdefault(t["name"], EventReader(self.folder / t["name"] / "events.jsonl"))
            for e in reader.read_new():
                if e["type"] == "step":
                    self.steps[t["name"]] = e
                elif e["type"] == "validation":
                    self.held_out.setdefault(t["name"], []).append((e["step"], e["loss"]))
                elif e["type"] == "status":
                    self.live[t["name"]] = (e.get("phase", ""), e.get("message", ""))
        return state

    def trials(self, state: dict) -> list[dict]:
        """One row per trial, ranked first: name, params, state (with the reason), group, step, held-out loss and
        the step it was measured at (held_at: the last held-out checkpoint, often before the trial's step), rank."""
        ranks = {r["name"]: r["rank"] for r in state.get("ranking", [])}
        rows = []
        for t in state["trials"]:
            run_state = RunDir(self.folder / t["name"]).status().get("state", "")
            trial_state = t["state"]
            if trial_state not in sweep.FINAL and run_state == "running":
                trial_state = "training"
            held = self.held_out.get(t["name"], [])
            step = self.steps.get(t["name"], {}).get("step", t["step"])
            group = ("shared forward" if t["group"] == "shared" else f"trained alone: {t['why_alone']}"
                     if t["group"] == "alone" else "")
            at, value = (t["step"], t["value"]) if t["value"] is not None else held[-1] if held else (None, None)
            rows.append({"rank": ranks.get(t["name"]), "name": t["name"], "params": t["params"],
                         "state": trial_state, "message": t["message"], "group": group, "step": step,
                         "held_out": value, "held_at": at})
        return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["name"]))

    def curves(self) -> list[dict]:
        """Every trial's held-out loss over steps: [{trial, step, loss}]."""
        return [{"trial": name, "step": step, "loss": loss} for name in sorted(self.held_out)
                for step, loss in self.held_out[name]]

    def best_config(self, state: dict) -> str:
        """The best finished trial's config.toml, as text ("" while none has finished)."""
        if not state.get("best"):
            return ""
        path = (self.folder / state["best"]).resolve()
        if not path.is_relative_to(self.folder.resolve()):  # sweep.json is data: never read outside the sweep
            return ""
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return ""

    def best_trials(self, state: dict, count: int = 3) -> list[str]:
        """The names of the best `count` finished trials (pruned ones after them), as ranked."""
        return [r["name"] for r in state.get("ranking", [])][:count]


def final_file(run: RunDir) -> Path | None:
    """A trial's last saved .safetensors (the final one), or None."""
    events = [e for e in read_all(run.path) if e["type"] == "checkpoint"]
    for e in reversed(events):
        path = (run.path / e["path"]).resolve()
        if path.is_file() and path.is_relative_to(run.output.resolve()):
            return path
    files = sorted(run.output.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1].resolve() if files else None
