"""The job manager: the queue of run directories, one worker process per run, one run per GPU, cancel and resume.

It imports neither gradio nor torch. Everything it knows is on disk (`trainer.rundir`), so the app can be stopped and
started again and find every run as it is: a worker runs in its own process session, outlives the app, and holds
its run's lock while it lives, so the app never starts a second worker on a run (nor on one the command line trains).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError
from trainer.events import read_all
from trainer import sweep
from trainer.sweep import SWEEP_FILE
from trainer.single_file import source_problem
from trainer.rundir import (FINAL_STATES, RESUMABLE_STATES, UNKNOWN, RunDir, create, describe, free_bytes,
                            state_step)
from ui.security import inside
from ui.worker_queue import signal_worker, tick_in_background

EXIT_DISK_FULL = 5  # trainer/__main__.py's exit code for a full disk


def free_mb(path: Path) -> float:
    return free_bytes(path) / 2**20

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "fix it and train again from the Train tab (or edit the run's config.toml, then resume)"
__all__ = ["FINAL_STATES", "JobManager", "RunInfo", "detect_gpus"]


@dataclass
class RunInfo:
    run_id: str
    path: Path
    state: str  # created | queued | running | done | failed | cancelled | interrupted | unknown
    created: float
    pid: int | None = None
    message: str = ""
    devices: list[str] = field(default_factory=list)
    started: float = 0.0  # when its worker last started (0: never, or not known)
    refused: bool = False  # it failed on its settings: resuming it would fail the same way

    def summary(self) -> str:
        return f"{self.run_id}: {self.state}" + (f" ({self.message})" if self.message else "")


def detect_gpus() -> list[str]:
    """The CUDA devices this machine offers (CUDA_VISIBLE_DEVICES when set), found without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def requested_gpus(run: RunDir) -> int:
    """training.num_gpus of the run's config (1 when it says nothing or cannot be read)."""
    try:
        data = tomllib.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return 1
    value = data.get("training", {}).get("num_gpus", data.get("num_gpus", 1))
    return value if isinstance(value, int) and value >= 1 else 1


def sweep_folder(runs_dir: Path, name) -> Path | None:
    """The sweep `<sweep id>/<trial>` points into (a plain name of the runs folder holding sweep.json), or None."""
    sweep_id, sep, _ = str(name).partition("/")
    try:
        folder = inside(runs_dir, sweep_id, "sweep id") if sep else None
    except ValueError:
        return None
    return folder if folder is not None and (folder / SWEEP_FILE).is_file() else None


def trial_run(runs_dir: Path, name) -> RunDir:
    """The run directory `<sweep id>/<trial>` names: each part a plain name (`inside`), the sweep a folder of the
    runs folder holding sweep.json, the trial one that sweep.json lists. ValueError otherwise."""
    sweep_id, sep, trial = str(name).partition("/")
    folder = inside(runs_dir, sweep_id, "sweep id")
    if not sep or not (folder / SWEEP_FILE).is_file():
        raise ValueError(f"no sweep trial {str(name)[:80]!r}")
    path = inside(folder, trial, "trial")
    if trial not in trials_of(folder):
        raise ValueError(f"{trial!r} is not a trial of sweep {folder.name}")
    return RunDir(path)


def trials_of(folder: Path) -> list[str]:
    """The trial names sweep.json lists, in order ([] when it cannot be read)."""
    try:
        return [str(t["name"]) for t in sweep.read(folder)["trials"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def trial_ids(runs_dir: Path) -> list[str]:
    """"<sweep id>/<trial>" for every trial of every sweep in the runs folder, newest sweep first."""
    return [f"{f.parent.name}/{t}" for f in sorted(Path(runs_dir).glob(f"*/{SWEEP_FILE}"), reverse=True)
            for t in trials_of(f.parent) if (f.parent / t / "config.toml").is_file()]


def worker_alive(run: RunDir, pid: int | None) -> bool:
    """Does a worker train `run` now? Its lock says so; a pid we started counts until it takes the lock."""
    if run.holder() is not None:
        return True
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        zombie = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    return not zombie and "trainer" in cmdline and run.id in cmdline


def final_state_from_events(run: RunDir) -> tuple[str, str]:
    """What the worker's own log says about how it ended: (state, message). Only its last worker's events count
    (an earlier one may have been cancelled); one that wrote no end was interrupted, resumable from its last state."""
    for event in reversed(read_all(run.path)):
        if event.get("type") == "done":
            return "done", ""
        if event.get("type") == "cancelled":
            return "cancelled", f"stopped at step {event.get('step')}; resumable"
        if event.get("type") == "error":
            return "failed", str(event.get("message", ""))
        if event.get("type") == "start":
            break
    return "interrupted", interrupted_text(run)


def interrupted_text(run: RunDir) -> str:
    """Where Resume trains on from: the newest resumable state, or the start when none was saved yet."""
    state = run.latest_state()
    if state is None:
        return "the worker stopped without finishing before any resumable state was saved; Resume trains it again " \
               "from the start"
    return f"the worker stopped without finishing; resumable from step {state_step(state)}"


@dataclass
class JobManager:
    runs_dir: Path
    python: str = sys.executable
    poll_s: float = 1.0
    devices: list[str] | None = None  # CUDA devices to hand out, one run each; None = detect; [] = CPU only
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _cancels: dict[str, int] = field(default_factory=dict)
    _exit_codes: dict[str, int] = field(default_factory=dict)
    _unsaved: dict[str, dict] = field(default_factory=dict)  # status the disk had no room for: shown, retried
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _thread: threading.Thread | None = None

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if self.devices is None:
            self.devices = detect_gpus()
        self.recover()

    # --- what is there ---
    def runs(self) -> list[RunInfo]:
        infos = [self.info(p.name) for p in self.runs_dir.iterdir() if (p / "config.toml").is_file()]
        return sorted(infos, key=lambda r: float(r.created), reverse=True)

    def listed(self) -> list[RunInfo]:
        """The runs, newest first, then the trials of every sweep (ids "<sweep id>/<trial>"): what the Runs tab and
        the API list. Trials are ordinary run directories their sweep's worker trains; the queue never starts them."""
        return self.runs() + [self.info(t) for t in trial_ids(self.runs_dir)]

    def run_dir(self, run_id: str) -> RunDir:
        """The run's folder; ValueError naming `run_id` unless it is a plain name right inside the runs folder, or
        a sweep's trial "<sweep id>/<trial>" that the sweep lists."""
        if sweep_folder(self.runs_dir, run_id) is not None:
            return trial_run(self.runs_dir, run_id)
        return RunDir(inside(self.runs_dir, run_id, "run id"))

    def _not_a_trial(self, run_id: str, doing: str) -> None:
        if (folder := sweep_folder(self.runs_dir, run_id)) is not None:
            raise ValueError(f"{run_id} is a trial of sweep {folder.name}, trained by the sweep's worker: {doing} "
                             "the sweep in the Sweeps tab")

    def info(self, run_id: str) -> RunInfo:
        run = self.run_dir(run_id)
        s = run.status()
        state = run.state_name()
        message = s.get("message", "") if state != UNKNOWN else (
            f"{run.status_problem()}: this app does not start it (train it with python -m trainer {run.path}, "
            "or delete it)")
        created = s.get("created") if isinstance(s.get("created"), (int, float)) else run.path.stat().st_mtime
        pid = s.get("pid") if isinstance(s.get("pid"), int) else None
        devices = [str(d) for d in s.get("devices")] if isinstance(s.get("devices"), list) else []
        if run_id in self._unsaved:
            state, message, pid = self._unsaved[run_id]["state"], self._unsaved[run_id]["message"], None
        proc = self._procs.get(run_id)
        exiting = run.last_holder_pid() if proc is None and state in FINAL_STATES else None
        if state in FINAL_STATES and (proc.poll() is None if proc is not None else worker_alive(run, exiting)):
            # it wrote its end and is not gone yet (a worker started by an earlier app: it holds the lock, or it let
            # go of it and its interpreter is still shutting down)
            state, message, pid = "running", "stopping: the worker is exiting", proc.pid if proc else exiting
        started = s.get("started") if isinstance(s.get("started"), (int, float)) else 0.0
        refused = state == "failed" and run.settings_refused(s)
        return RunInfo(run_id, run.path, state, created, pid, str(message), devices, started, refused)

    def recover(self) -> None:
        """At start-up: runs marked running whose worker is gone ended while the app was away."""
        for run in self.runs():
            if run.state == "running" and not worker_alive(self.run_dir(run.run_id), run.pid):
                self._record_end(run.run_id)

    # --- changes ---
    def create(self, cfg, dataset: Path) -> RunInfo:
        """A new queued run from a config and a dataset folder (copied, so later edits do not touch it). A base
        model that cannot be loaded is refused here, not by the worker once the run waits in the queue."""
        base = cfg.model.pretrained_model_name_or_path
        if problem := source_problem(base):
            raise ConfigError("model.pretrained_model_name_or_path", f"model.pretrained_model_name_or_path: {problem}")
        run = create(self.runs_dir, cfg, lambda target: shutil.copytree(dataset, target,
                                                                        ignore=shutil.ignore_patterns(".*")),
                     state="queued")
        self.tick()
        return self.info(run.id)

    def resume(self, run_id: str) -> RunInfo:
        self._not_a_trial(run_id, "resume")
        run = self.info(run_id)
        if run.state not in RESUMABLE_STATES:
            raise ValueError(f"{run_id} is {run.state}; only a cancelled, interrupted or failed run can resume")
        if run.refused:
            raise ValueError(f"{run_id} failed on its settings or its pictures, and resuming it would fail the same "
                             f"way: {REFUSED}")
        if (holder := self.run_dir(run_id).holder()) is not None:
            raise ValueError(f"{run_id} is being trained by {describe(holder)}")
        try:
            self.run_dir(run_id).write_status(state="queued", message="resuming")
        except OSError as e:
            raise ValueError(f"cannot queue {run_id}: {e.strerror or e} ({free_mb(self.runs_dir):.1f} MB free); "
                             "free some space first") from None
        self._unsaved.pop(run_id, None)
        self.tick()
        return self.info(run_id)

    def cancel(self, run_id: str) -> RunInfo:
        """First cancel: SIGTERM, the worker saves a resumable state and exits. A second one waits for that save
        (killing now would lose it); a third kills the worker."""
        self._not_a_trial(run_id, "cancel")
        with self._lock:
            run, rd = self.info(run_id), self.run_dir(run_id)
            if run.state == "queued":
                rd.write_status(state="cancelled", message="cancelled before it started")
            elif run.state == "running" and rd.status().get("state") != "running":
                pass  # the worker has written how its run ended and is exiting: nothing to add to that
            elif run.state == "running":
                count = self._cancels.get(run_id, 0) + 1
                self._cancels[run_id] = count
                if count == 2:
                    rd.write_status(only_if_state="running", message="cancelling: still saving its state (cancel "
                                                                      "once more to kill it and lose that save)")
                    return self.info(run_id)
                self._signal(rd, run, signal.SIGTERM if count == 1 else signal.SIGKILL)
                rd.write_status(only_if_state="running", message="cancelling: saving state" if count == 1 else "killed")
            return self.info(run_id)

    def _signal(self, rd: RunDir, run: RunInfo, sig: int) -> None:
        signal_worker(sig, self._procs.get(run.run_id), rd.status().get("pgid"), run.pid)

    def check_deletable(self, run_id: str) -> RunInfo:
        """The run, or ValueError saying why it cannot be deleted now (a sweep's trial, a running run)."""
        self._not_a_trial(run_id, "delete")
        run = self.info(run_id)
        if run.state == "running" or self.run_dir(run_id).holder() is not None:
            raise ValueError(f"{run_id} is running: cancel it first")
        return run

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.check_deletable(run_id).path)

    # --- the queue ---
    def tick(self) -> None:
        """Reap finished workers, then start queued runs, oldest first, while GPUs are free (one run at a time on
        a machine without one)."""
        with self._lock:
            for run in self.runs():
                proc = self._procs.get(run.run_id)
                if proc is not None and proc.poll() is not None:
                    self._exit_codes[run.run_id] = self._procs.pop(run.run_id).returncode
                if run.run_id in self._unsaved:
                    self._write(run.run_id, **self._unsaved[run.run_id])  # is there room again?
                elif run.state == "running" and not self._running(run):
                    self._record_end(run.run_id)
                if run.state != "running":
                    self._cancels.pop(run.run_id, None)
            for run in (r for r in self.runs() if r.state == "queued"):
                self._refuse_if_too_wide(run)
            running = [r for r in self.runs() if r.state == "running"]
            queued = sorted((r for r in self.runs() if r.state == "queued"), key=lambda r: r.created)
            for run in queued:
                devices = self._devices_for(requested_gpus(self.run_dir(run.run_id)), running)
                if devices is None:
                    break  # first come, first served: a later run does not overtake one waiting for GPUs
                self._start(run, devices)
                running.append(self.info(run.run_id))

    def _refuse_if_too_wide(self, run: RunInfo) -> None:
        wanted = requested_gpus(self.run_dir(run.run_id))
        if self.devices and wanted > len(self.devices):
            self.run_dir(run.run_id).write_status(
                state="failed", message=f"asks for {wanted} GPUs (training.num_gpus); this machine has "
                                        f"{len(self.devices)}")

    def _devices_for(self, wanted: int, running: list[RunInfo]) -> list[str] | None:
        """The GPUs to give a run that wants `wanted` now, [] on a CPU machine, or None when it must wait."""
        if not self.devices:
            return None if running else []
        busy = {d for r in running for d in r.devices}
        free = [d for d in self.devices if d not in busy]
        if any(not r.devices for r in running):
            return None  # a run started before we knew its devices (or outside the app) may be on any of them
        return free[:wanted] if len(free) >= wanted else None

    def _running(self, run: RunInfo) -> bool:
        proc = self._procs.get(run.run_id)
        if proc is not None:
            return proc.poll() is None
        return worker_alive(self.run_dir(run.run_id), run.pid)

    def _record_end(self, run_id: str) -> None:
        """The worker is gone while the status says running: it died, or could not write its end (a full disk)."""
        rd = self.run_dir(run_id)
        state, message = final_state_from_events(rd)
        if self._exit_codes.pop(run_id, None) == EXIT_DISK_FULL and state != "failed":
            state, message = "failed", (f"the disk is full ({free_mb(rd.path):.1f} MB free): the worker stopped "
                                        "before it could say more. Free some space, then resume.")
        self._write(run_id, state=state, message=message)

    def _write(self, run_id: str, state: str, message: str) -> None:
        """Write a run's end to its status; when the disk has no room, keep it here (shown, retried each tick)
        and say so once in the app's log, not once a second."""
        try:
            self.run_dir(run_id).write_status(state=state, message=message, pid=None)
            self._unsaved.pop(run_id, None)
        except OSError as e:
            if run_id not in self._unsaved:
                print(f"job manager: cannot write {run_id}/status.json ({e}); showing it as {state}", file=sys.stderr)
            note = "" if "status.json" in message else f" (status.json could not be written: {e.strerror or e})"
            self._unsaved[run_id] = {"state": state, "message": message + note}

    def worker_command(self, run: RunDir) -> list[str]:
        """`python -m trainer RUN`, or accelerate's launcher for a run that asks for several processes."""
        processes = requested_gpus(run)
        if processes == 1:
            return [self.python, "-m", "trainer", str(run.path)]
        return [self.python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "-m", "trainer", str(run.path)]

    def _start(self, run: RunInfo, devices: list[str]) -> None:
        rd = self.run_dir(run.run_id)
        if (holder := rd.holder()) is not None:  # trained by a worker we did not start: leave it to that one
            rd.write_status(state="running", message=f"trained by {describe(holder)}", pid=holder.get("pid"))
            return
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        with open(rd.stdout, "ab") as log:
            proc = subprocess.Popen(self.worker_command(rd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # its own session: it outlives the app, and cancel
        self._procs[run.run_id] = proc                          # reaches its whole process group
        rd.write_status(state="running", pid=proc.pid, pgid=proc.pid, devices=devices, message="",
                        started=time.time())

    def start_background(self) -> None:
        """Start queued runs and record ended ones every poll_s seconds, with or without a page open."""
        if self._thread is None:
            self._thread = tick_in_background(self.tick, self.poll_s, "job-manager")

    # --- reading a run ---
    def files(self, run_id: str) -> list[Path]:
        return self.run_dir(run_id).files()

