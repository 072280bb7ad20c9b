"""Captioning in a child process, `python -m datasets_tools.caption`, so that the web process never loads a model
(DESIGN §1) and the captioner gets the GPU. `CaptionJob` starts it, reads its JSON-lines progress, cancels it
(SIGTERM, then a kill) and words the outcome. Standard library only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILL_AFTER_S = 10.0  # a cancelled captioner finishes its current picture; one that takes longer is killed
FINAL = ("done", "cancelled", "error")


class CaptionJob:
    def __init__(self, folder: Path, kind: str, source: str = "", replace: bool = False):
        self.kind = kind
        self.events: list[dict] = []
        self.cancelled = False
        command = [sys.executable, "-m", "datasets_tools.caption", str(folder), "--kind", kind]
        if source.strip():
            command += ["--source", source.strip()]
        if replace:
            command.append("--replace")
        self._log = tempfile.TemporaryFile()  # stderr: the traceback when it fails, read once it has exited
        self._proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name="caption-progress")
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a library printing to stdout

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def counts(self) -> tuple[int, int]:
        """(pictures captioned, pictures to caption) so far; (0, 0) before it has started."""
        last = next((e for e in reversed(self.events) if "total" in e), {})
        return last.get("done", 0), last.get("total", 0)

    def progress(self) -> str:
        """One line for the UI while it runs."""
        if not self.events:
            return f"Starting the {self.kind} captioner…"
        last = self.events[-1]
        if last["type"] == "status":
            return f"Captioner: {last['message']}…"
        done, total = self.counts()
        return f"Captioning with {self.kind}: {done}/{total}" + (f" ({last['image']})" if "image" in last else "")

    def result(self) -> str | None:
        """None while it runs; then what happened, as a message (errors start with ⚠)."""
        if self.running:
            return None
        self._reader.join()
        final = next((e for e in self.events if e["type"] in FINAL), None)
        done, total = self.counts()
        if final and final["type"] == "done":
            return final["message"]
        if final and final["type"] == "error":
            return f"⚠ {final['message']}"
        if final or self.cancelled:
            return f"Cancelled: captioned {done} of {total} pictures with {self.kind}; those captions are kept."
        return (f"⚠ The {self.kind} captioner stopped (exit status {self._proc.returncode}) after {done} of {total} "
                f"pictures: {self._last_log_line()}")

    def cancel(self, kill_after_s: float = KILL_AFTER_S) -> str:
        if self.running:
            self.cancelled = True
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(kill_after_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self.result()

    def _last_log_line(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no message"
