"""The job manager: run directories, a queue, one worker process per run, cancel and resume.

It imports neither gradio nor torch. Everything it knows is on disk (DESIGN §1), so the app can be stopped and
started again and find every run as it is: a worker runs in its own process session and outlives the app.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.events import EVENTS_FILE, EventReader, read_all

ROOT = Path(__file__).resolve().parent.parent
STATUS_FILE = "status.json"
FINAL_STATES = {"done", "failed", "cancelled", "interrupted"}


@dataclass
class RunInfo:
    run_id: str
    path: Path
    state: str  # queued | running | done | failed | cancelled | interrupted
    created: float
    pid: int | None = None
    message: str = ""

    def summary(self) -> str:
        return f"{self.run_id}: {self.state}" + (f" ({self.message})" if self.message else "")


def _read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_status(run_dir: Path, **fields) -> dict:
    status = _read_status(run_dir) | fields | {"updated": time.time()}
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, run_dir / STATUS_FILE)
    return status


def _alive(pid: int | None, run_dir: Path) -> bool:
    """Is `pid` still our worker for `run_dir` (not a recycled pid)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
        return False  # a zombie: finished, not yet reaped
    return "trainer" in cmdline and str(run_dir.name) in cmdline


def final_state_from_events(run_dir: Path) -> tuple[str, str]:
    """What the worker's own log says about how it ended: (state, message)."""
    for event in reversed(read_all(run_dir)):
        if event["type"] == "done":
            return "done", ""
        if event["type"] == "cancelled":
            return "cancelled", f"stopped at step {event['step']}; resumable"
        if event["type"] == "error":
            return "failed", event["message"]
    return "interrupted", "the worker stopped without finishing; resumable from its last checkpoint"


@dataclass
class JobManager:
    runs_dir: Path
    python: str = sys.executable
    poll_s: float = 1.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _readers: dict[str, EventReader] = field(default_factory=dict)
    _cancels: dict[str, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _thread: threading.Thread | None = None

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.recover()

    # --- what is there ---
    def runs(self) -> list[RunInfo]:
        infos = [self.info(p.name) for p in self.runs_dir.iterdir() if (p / "config.toml").is_file()]
        return sorted(infos, key=lambda r: r.created, reverse=True)

    def info(self, run_id: str) -> RunInfo:
        path = self.runs_dir / run_id
        s = _read_status(path)
        return RunInfo(run_id, path, s.get("state", "queued"), s.get("created", path.stat().st_mtime), s.get("pid"),
                       s.get("message", ""))

    def recover(self) -> None:
        """At start-up: runs marked running whose worker is gone ended while the app was away."""
        for run in self.runs():
            if run.state == "running" and not _alive(run.pid, run.path):
                state, message = final_state_from_events(run.path)
                _write_status(run.path, state=state, message=message, pid=None)

    # --- changes ---
    def create(self, cfg, dataset: Path) -> RunInfo:
        """A new run directory from a config and a dataset folder (copied, so later edits do not touch it)."""
        from trainer import config

        run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.preset or 'custom'}"
        while (self.runs_dir / run_id).exists():
            run_id += "x"
        run_dir = self.runs_dir / run_id
        shutil.copytree(dataset, run_dir / "dataset", ignore=shutil.ignore_patterns(".*"))
        cfg = config.from_dict(config.deep_merge(config.to_dict(cfg),
                                                 {"train_data_dir": str((run_dir / "dataset").resolve())}))
        config.save(cfg, run_dir / "config.toml")
        return self.register(run_dir)

    def register(self, run_dir: Path) -> RunInfo:
        """Queue a run directory that holds config.toml and dataset/ (made by the caller)."""
        _write_status(run_dir, state="queued", created=time.time(), message="")
        self.tick()
        return self.info(run_dir.name)

    def resume(self, run_id: str) -> RunInfo:
        run = self.info(run_id)
        if run.state not in ("cancelled", "interrupted", "failed"):
            raise ValueError(f"{run_id} is {run.state}; only a cancelled, interrupted or failed run can resume")
        _write_status(run.path, state="queued", message="resuming")
        self.tick()
        return self.info(run_id)

    def cancel(self, run_id: str) -> RunInfo:
        """First cancel: SIGTERM, the worker saves a resumable state and exits. Second: SIGKILL."""
        with self._lock:
            run = self.info(run_id)
            if run.state == "queued":
                _write_status(run.path, state="cancelled", message="cancelled before it started")
            elif run.state == "running" and run.pid:
                count = self._cancels.get(run_id, 0) + 1
                self._cancels[run_id] = count
                try:
                    os.killpg(run.pid, signal.SIGTERM if count == 1 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _write_status(run.path, message="cancelling: saving state" if count == 1 else "killed")
            return self.info(run_id)

    def delete(self, run_id: str) -> None:
        run = self.info(run_id)
        if run.state == "running":
            raise ValueError(f"{run_id} is running: cancel it first")
        shutil.rmtree(run.path)
        self._readers.pop(run_id, None)

    # --- the queue ---
    def tick(self) -> None:
        """Reap finished workers and start the oldest queued run if nothing runs (one run at a time per GPU)."""
        with self._lock:
            runs = self.runs()
            for run in runs:
                if run.state == "running" and not self._running(run):
                    proc = self._procs.pop(run.run_id, None)
                    if proc is not None:
                        proc.wait()
                    state, message = final_state_from_events(run.path)
                    _write_status(run.path, state=state, message=message, pid=None)
                    self._cancels.pop(run.run_id, None)
            if any(self._running(r) for r in self.runs() if r.state == "running"):
                return
            queued = sorted((r for r in self.runs() if r.state == "queued"), key=lambda r: r.created)
            if queued:
                self._start(queued[0])

    def _running(self, run: RunInfo) -> bool:
        proc = self._procs.get(run.run_id)
        if proc is not None:
            return proc.poll() is None
        return _alive(run.pid, run.path)

    def _start(self, run: RunInfo) -> None:
        log = open(run.path / "worker.out", "ab")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([self.python, "-m", "trainer", str(run.path)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # its own session: it outlives the app, and cancel
        log.close()                                       # reaches its whole process group
        self._procs[run.run_id] = proc
        _write_status(run.path, state="running", pid=proc.pid, message="", started=time.time())

    def start_background(self) -> None:
        def loop():
            while True:
                try:
                    self.tick()
                except Exception as e:  # the queue must keep going whatever one run does
                    print(f"job manager: {e}", file=sys.stderr)
                time.sleep(self.poll_s)

        if self._thread is None:
            self._thread = threading.Thread(target=loop, daemon=True, name="job-manager")
            self._thread.start()

    # --- reading a run ---
    def new_events(self, run_id: str) -> list[dict]:
        """Events appended since the last call for this run (read from the last offset, never the whole file)."""
        reader = self._readers.setdefault(run_id, EventReader(self.runs_dir / run_id / EVENTS_FILE))
        return reader.read_new()

    def files(self, run_id: str) -> list[Path]:
        path = self.runs_dir / run_id
        return sorted((path / "output").glob("*.safetensors")) + [path / "config.toml"]

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        text = ""
        for name in ("worker.log", "worker.out"):
            f = self.runs_dir / run_id / name
            if f.is_file():
                with open(f, "rb") as fh:
                    fh.seek(max(0, f.stat().st_size - 20000))
                    text = fh.read().decode(errors="replace")
                break
        return "\n".join(text.splitlines()[-lines:])
