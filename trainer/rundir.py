"""The run directory, the whole record of one training (DESIGN §1): its layout, its id, its status and the lock its
worker holds for as long as it lives.

The web app, the worker and the command line all go through this module, so there is one run-id format, one way to
read and write `status.json`, and no second worker on a run. Standard library only: the web process imports it.

    runs/<id>/config.toml    the frozen config          events.jsonl   the event log (trainer.events)
              dataset/       images + .txt captions     status.json    state, pid, message (this module)
              samples/       PNGs                       output/        .safetensors files
              state/         resumable checkpoints      worker.log     the worker's log (worker.out: its stdout)
              worker.lock    held (flock) by the worker that trains the run; names its holder
              stop-requested a sweep's trial only: its worker stops that trial at its next step, the others go on
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer import config

STATES = ("created", "queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = {"done", "failed", "cancelled", "interrupted"}
RESUMABLE_STATES = {"created", "cancelled", "interrupted", "failed"}
# "created": made by `python -m trainer new`, whose own worker trains it; the app never starts it by itself.
# A folder with config.toml and no readable status.json is "unknown": not the app's to start either.
UNKNOWN = "unknown"
PROGRESS = "progress.json"  # the file a resumable state in state/step-N is written with last: the state is complete


class RunLocked(RuntimeError):
    """Another worker holds the run; the message names it."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def id(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.toml")
    dataset = property(lambda self: self.path / "dataset")
    events = property(lambda self: self.path / "events.jsonl")
    status_file = property(lambda self: self.path / "status.json")
    stop_file = property(lambda self: self.path / "stop-requested")  # a sweep's trial: stop it, let the others go on
    samples = property(lambda self: self.path / "samples")
    output = property(lambda self: self.path / "output")
    state = property(lambda self: self.path / "state")
    log = property(lambda self: self.path / "worker.log")
    stdout = property(lambda self: self.path / "worker.out")
    lock_file = property(lambda self: self.path / "worker.lock")

    # --- status ---
    def status(self) -> dict:
        """The status as written, or {} when there is none or it cannot be read."""
        try:
            status = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def state_name(self) -> str:
        state = self.status().get("state")
        return state if state in STATES else UNKNOWN

    def settings_refused(self, status: dict) -> bool:
        """It failed on a setting of its config.toml (or on its pictures) and the config is unchanged since:
        training it again fails the same way. `status`: its status.json as just read."""
        try:
            edited = self.config.stat().st_mtime > status.get("updated", 0)
        except (OSError, TypeError):
            edited = True
        return status.get("state") == "failed" and status.get("refused") is True and not edited

    def status_problem(self) -> str:
        """Why the state is unknown, in words ("" when it is known)."""
        try:
            text = self.status_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return "no status.json"
        except (OSError, UnicodeDecodeError) as e:
            return f"status.json cannot be read ({type(e).__name__})"
        try:
            status = json.loads(text)
        except ValueError:
            return "status.json is not valid JSON (cut short?)"
        if not isinstance(status, dict):
            return "status.json does not hold an object"
        return "" if status.get("state") in STATES else f"status.json names no known state ({status.get('state')!r})"

    def write_status(self, only_if_state: str | None = None, **fields) -> dict:
        """Merge `fields` into status.json, written whole (a reader never sees half of it). The read and the write
        hold a lock the app and the worker share, so neither loses the other's fields; with `only_if_state`, the
        fields are written only while the state is still that one (the worker may have just ended the run)."""
        fd = os.open(self.path / ".status.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            status = self.status()
            if only_if_state is not None and status.get("state") != only_if_state:
                return status
            status = {"created": time.time()} | status | fields | {"updated": time.time()}
            tmp = self.path / f".{self.status_file.name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(status), encoding="utf-8")
            os.replace(tmp, self.status_file)
            return status
        finally:
            os.close(fd)

    def state_folder(self, step: int) -> Path:
        """Where the resumable state of `step` is written (state/step-00000300)."""
        return self.state / f"step-{step:08d}"

    def latest_state(self) -> Path | None:
        """The newest complete resumable state (state/step-N with its progress.json, written last), or None."""
        done = sorted(p for p in self.state.glob("step-*") if (p / PROGRESS).is_file())
        return done[-1] if done else None

    def clean_leftovers(self) -> list[Path]:
        """Remove what a worker killed mid-save left: half-written files and state folders never completed.
        Only the holder of the lock calls this (no other writer can be mid-save)."""
        leftovers = [*self.output.glob(".*.tmp"), *self.path.glob(f".{self.status_file.name}.*.tmp"),
                     *(p for p in self.state.glob("step-*") if not (p / PROGRESS).is_file())]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return leftovers

    def files(self) -> list[Path]:
        """What a user downloads: the saved LoRAs (every epoch and the final), the config and the worker's log (what
        a failure points to)."""
        logged = self.log.is_file() and self.log.stat().st_size > 0
        return sorted(self.output.glob("*.safetensors")) + [p for p, there in ((self.config, self.config.is_file()),
                                                                              (self.log, logged)) if there]

    # --- the worker's lock ---
    def acquire(self) -> "WorkerLock":
        """Hold the run for this process's lifetime (the kernel lets go when it exits, even by kill -9)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{self.path} is being trained by {describe(self.holder())}; "
                            "cancel that worker first (one worker per run)") from None
        holder = {"pid": os.getpid(), "pgid": own_group(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        return WorkerLock(fd)

    def holder(self) -> dict | None:
        """Who holds the run now ({pid, pgid, host, since, command}), or None when no worker does."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    return {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def last_holder_pid(self) -> int | None:
        """The pid the lock file names, held now or not: a worker that let go of the lock may still be exiting."""
        try:
            pid = json.loads(self.lock_file.read_bytes() or b"{}").get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) else None


class WorkerLock:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "WorkerLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def free_bytes(where: Path) -> int:
    """Free space on the disk holding `where` (or its nearest existing parent); 0 when it cannot be asked."""
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def describe(holder: dict | None) -> str:
    if not holder:
        return "another worker"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


# --- making runs ---

def own_group() -> int | None:
    """This worker's process group when it leads one (the app starts each worker in a session of its own; a shell
    gives each job its own group), else None: a worker a script started shares the script's group, which a cancel
    must not reach, so it is signalled alone."""
    return os.getpgrp() if os.getpgrp() == os.getpid() else None


def state_step(folder: Path) -> int:
    """The step a state folder (RunDir.state_folder) holds."""
    return int(folder.name.removeprefix("step-"))


def run_label(cfg) -> str:
    """What a run id says after its time: the file's own name when one was given, else the preset (QA: a column of
    "…-character" runs told apart only by their time)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", cfg.training.output_name).strip("-")[:40]
    return name if name and name != "lora" else cfg.preset


def new_id(runs_dir: Path, preset: str) -> str:
    """`<date>-<time>-<preset>`, with a counter when two runs start in the same second."""
    stem = time.strftime("%Y%m%d-%H%M%S") + f"-{preset or 'custom'}"
    run_id, n = stem, 1
    while (Path(runs_dir) / run_id).exists():
        n += 1
        run_id = f"{stem}-{n}"
    return run_id


def create(runs_dir: Path, cfg, fill_dataset: Callable[[Path], None], state: str, name: str | None = None) -> RunDir:
    """A new run: its dataset/ filled by `fill_dataset(folder)`, its config pointing there, its status `state`
    ("queued" for the app's queue, "created" for a command-line run). The status is written last, so the app never
    sees a queued run that is not whole."""
    run = RunDir(Path(runs_dir) / (name or new_id(runs_dir, run_label(cfg))))
    if run.path.exists():
        raise FileExistsError(f"{run.path} already exists; choose another name")
    run.path.mkdir(parents=True)
    try:
        fill_dataset(run.dataset)
        cfg = config.from_dict(config.deep_merge(config.to_dict(cfg), {"train_data_dir": str(run.dataset.resolve())}))
        config.save(cfg, run.config)
        run.write_status(state=state, message="")
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)  # no half-made run is left behind
        raise
    return run
