"""One kind of job done one at a time by `python -m trainer <command> FOLDER` child processes (compares, sweeps):
the queue, the GPU wait, the launch and the background tick they share. Standard library only, like ui/jobs.py.

A subclass says which folders it holds (`listed`: infos with compare/sweep id, path, state, message, created) and
what it writes when it starts one (`_launch`, which calls `spawn`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from trainer.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
WAITING_FOR_GPU = "waiting for a GPU that no training run is using"


@dataclass(kw_only=True)
class WorkerQueue:
    command: ClassVar[str]  # python -m trainer <command> FOLDER
    python: str = sys.executable
    free_device: Callable[[], str | None] = lambda: ""  # a GPU free of training, "" = CPU, None = wait
    poll_s: float = 1.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _cancels: dict[str, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _thread: threading.Thread | None = None

    def listed(self) -> list:
        raise NotImplementedError

    def _launch(self, info, device: str) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Start the oldest queued job when none runs and a device is free."""
        with self._lock:
            jobs = self.listed()
            if any(j.state == "running" for j in jobs):
                return
            queued = sorted((j for j in jobs if j.state == "queued"), key=lambda j: j.created)
            if queued and (device := self.free_device()) is not None:
                self._launch(queued[0], device)
            elif queued and queued[0].message != WAITING_FOR_GPU:
                RunDir(queued[0].path).write_status(message=WAITING_FOR_GPU)

    def spawn(self, job_id: str, folder: Path, device: str) -> subprocess.Popen:
        """The worker of `folder` in its own session (so a cancel reaches all of it), its output in worker.out."""
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"CUDA_VISIBLE_DEVICES": device} if device else {})
        with open(folder / "worker.out", "ab") as log:
            proc = subprocess.Popen([self.python, "-m", "trainer", self.command, str(folder)], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self._procs[job_id] = proc
        return proc

    def start_background(self) -> None:
        """Start queued jobs and record ended ones once a second, with or without a page open."""
        if self._thread is None:
            self._thread = tick_in_background(self.tick, self.poll_s, f"{self.command}-manager")


def signal_worker(sig: int, proc: subprocess.Popen | None, group=None, pid=None) -> None:
    """Send `sig` to a worker: to the session this app started it in (`proc`: the worker and all it started), else
    to the group it recorded as its own (trainer.rundir.own_group: only when it leads one), else to its process
    alone. Those numbers come from a status file, which is data: never our own group or process, nor 0 or 1."""
    try:
        if proc is not None:
            os.killpg(proc.pid, sig)
        elif isinstance(group, int) and group > 1 and group != os.getpgrp():
            os.killpg(group, sig)
        elif isinstance(pid, int) and pid > 1 and pid != os.getpid():
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tick_in_background(tick: Callable[[], None], poll_s: float, name: str) -> threading.Thread:
    """Call `tick` every `poll_s` seconds on a daemon thread for the app's life; an error in one tick is printed
    and the next tick comes anyway (whatever one folder holds, the queue must keep going)."""
    def loop():
        while True:
            try:
                tick()
            except Exception as e:
                print(f"{name}: {e}", file=sys.stderr)
            time.sleep(poll_s)

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    return thread
