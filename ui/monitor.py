"""What the Monitor tab shows, folded from a run's events: plain data, no gradio, testable without a browser.

Each view (a browser tab, a reload, a run reopened from Runs) owns its cursor into `events.jsonl`: a new view reads
the whole history, then only what was appended since its own last read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.events import EventReader
from trainer.rundir import RunDir

MAX_PLOT_POINTS = 600  # per curve: a long run is downsampled before it is sent to the browser
PAUSES = ("sampling", "saving")  # a status of these phases ends at the next step
GALLERY_COLUMNS = 6  # at least: a 64 px sample is not blown up to half the page's width
ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-_])")  # ANSI: CSI, OSC, ESC + 1 byte


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's exponential moving average, debiased so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def log_tail(run: RunDir, lines: int = 40) -> str:
    """The end of the worker's output: worker.out when the app started it (the logger writes there as well as to
    worker.log, and it holds what came outside the log: a crash at import, the final path), else worker.log (a run
    trained from the command line has only that one)."""
    for f in (run.stdout, run.log):
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 64000))
                text = fh.read().decode(errors="replace")
        except OSError:
            continue
        if shown := terminal_lines(text):
            return "\n".join(shown[-lines:])
    return ""


def terminal_lines(text: str) -> list[str]:
    """The lines as a terminal leaves them: a progress bar redrawn after each '\\r' keeps its last drawing alone,
    escape sequences (tqdm's cursor-up, colours) go, and so do blank lines."""
    lines = []
    for line in ESCAPES.sub("", text).split("\n"):
        if drawn := [part for part in line.split("\r") if part.strip()]:
            lines.append(drawn[-1].rstrip())
    return lines


def eta_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def downsample(n: int, limit: int = MAX_PLOT_POINTS) -> list[int]:
    """At most `limit` evenly spread indices of 0..n-1, always keeping the first and the last."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


@dataclass
class RunView:
    run_id: str = ""
    reader: EventReader | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    file_events: dict = field(default_factory=dict)  # path -> its checkpoint event (step, epoch)
    held_out: dict = field(default_factory=dict)  # step -> its validation event (epoch, loss)
    held_out_note: str = ""  # which pictures are held out, or why none are
    last_step: dict | None = None
    phase: str = ""
    message: str = ""
    ended: str = ""  # "done" | "cancelled" | "failed" | ""
    ended_at: float = 0.0  # the time of the event that ended it
    final: str = ""  # the final file's path (the done event's), relative to the run
    shown: dict = field(default_factory=dict)  # what the page shows now, per component: send only changes
    _plotted: set = field(default_factory=set)

    @classmethod
    def of(cls, run: RunDir) -> "RunView":
        return cls(run_id=run.id, reader=EventReader(run.events))

    def read(self) -> bool:
        """Fold in the events appended since this view last read; True if any came."""
        events = self.reader.read_new() if self.reader is not None else []
        self.add(events)
        return bool(events)

    def changed(self, name: str, value) -> bool:
        """Is `value` new for component `name` (and remember it)? Unchanged components are not sent again."""
        if self.shown.get(name) == value:
            return False
        self.shown[name] = value
        return True

    def add(self, events: list[dict]) -> "RunView":
        for e in events:
            kind = e["type"]
            if kind == "step":
                if e["step"] in self._plotted:  # a resumed run repeats nothing, but keep the plot clean if it did
                    continue
                self._plotted.add(e["step"])
                self.steps.append(e["step"])
                self.losses.append(e["loss"])
                self.last_step = e
                self.ended = ""
                if self.phase in PAUSES:  # the sampling (or saving) is over: training goes on
                    self.phase, self.message = "training", ""
            elif kind == "start":
                self.rewind(e["step"])
            elif kind == "status":
                self.phase, self.message = e["phase"], e["message"]
                self.ended = ""  # a resumed run's worker speaks again
                self.held_out_note = e["message"] if e["phase"] == "held-out" else self.held_out_note
            elif kind == "validation":
                self.held_out[e["step"]] = e
            elif kind == "sample":
                self.samples.append(e)
            elif kind == "checkpoint" and e["path"].endswith(".safetensors"):
                self.files.append(e["path"])
                self.file_events[e["path"]] = e
            elif kind == "done":
                self.ended, self.message, self.final = "done", "Finished", e.get("path", "")
            elif kind == "cancelled":
                self.ended, self.message = "cancelled", self.cancelled_text(e["step"])
            elif kind == "error":
                self.ended, self.message = "failed", e["message"]
            if kind in ("done", "cancelled", "error"):
                self.ended_at = e.get("time", 0.0)
        return self

    def rewind(self, step: int) -> None:
        """A worker starts at `step`: what an earlier one logged after it (before a crash, past its last resumable
        state) is trained again, so it goes from the curve, the samples, the held-out losses and the files. The
        base's samples and held-out loss are drawn again when it starts from 0."""
        kept = [i for i, s in enumerate(self.steps) if s <= step]
        self.steps, self.losses = [self.steps[i] for i in kept], [self.losses[i] for i in kept]
        self._plotted = set(self.steps)
        if self.last_step is not None and self.last_step["step"] > step:
            self.last_step = None

        def before(e: dict) -> bool:
            return e["step"] < step or (step > 0 and e["step"] == step)

        self.samples = [e for e in self.samples if before(e)]
        self.held_out = {s: e for s, e in self.held_out.items() if before(e)}
        self.file_events = {p: e for p, e in self.file_events.items() if before(e)}
        self.files = [p for p in self.files if p in self.file_events]

    def cancelled_text(self, step: int) -> str:
        """A cancel keeps a resumable state, not a LoRA file: say which file is the newest and what it holds."""
        newest = max(self.file_events.values(), key=lambda e: e["step"], default=None)
        if newest is None:
            held = "no LoRA file is saved yet"
        elif newest["step"] < step:
            held = f"the newest file, {Path(newest['path']).name}, holds step {newest['step']}"
        else:
            return f"Cancelled at step {step}: resumable"
        return f"Cancelled at step {step}: resumable ({held}; Resume trains on from step {step})"

    def loss_rows(self, limit: int = MAX_PLOT_POINTS) -> list[dict]:
        """Rows for a line plot: the raw loss and its smoothed curve (smoothed over every step), downsampled."""
        keep = downsample(len(self.steps), limit)
        smoothed = smooth(self.losses)
        rows = [{"step": self.steps[i], "loss": self.losses[i], "curve": "raw"} for i in keep]
        rows += [{"step": self.steps[i], "loss": smoothed[i], "curve": "smoothed"} for i in keep]
        held = sorted(self.held_out)
        rows += [{"step": held[i], "loss": self.held_out[held[i]]["loss"], "curve": "held-out"}
                 for i in downsample(len(held), limit)]
        return rows

    def best_file(self) -> dict | None:
        """{path, step, epoch, loss} of the saved file with the lowest held-out loss; None before there is one."""
        scored = [{"path": path, "step": e["step"], "epoch": e["epoch"], "loss": self.held_out[e["step"]]["loss"]}
                  for path, e in self.file_events.items() if e["step"] in self.held_out]
        return min(scored, key=lambda f: (f["loss"], -f["step"]), default=None)

    def best_text(self) -> str:
        if best := self.best_file():
            return (f"**Best:** {Path(best['path']).name} — held-out loss {best['loss']:.4f} at step {best['step']}, "
                    f"epoch {best['epoch']}")
        if self.held_out:  # no file saved yet; a curve of one point is not drawn, so its value is said here
            step = max(self.held_out)
            return (f"Held-out loss {self.held_out[step]['loss']:.4f} at step {step}"
                    f"{' (the base, before training)' if step == 0 else ''}; the best file is marked once one is saved")
        return f"_{self.held_out_note}_" if self.held_out_note else ""

    def best_first(self, paths: list[Path], run_path: Path) -> list[Path]:
        """The files to offer: the one with the lowest held-out loss first; without held-out losses, the final file
        first, then the epochs' files newest first (anything else, the config, keeps its place at the end)."""
        best = self.best_file()
        if best is None:
            return sorted(paths, key=lambda p: self.newest(p.relative_to(run_path).as_posix()), reverse=True)
        top = [p for p in paths if p == run_path / best["path"]]
        return top + [p for p in paths if p not in top]

    def newest(self, path: str) -> tuple[bool, int]:
        """Sort key of a run's file (reversed): the final one, then the saved ones by step, then the rest."""
        saved = self.file_events.get(path)
        return path == self.final, saved["step"] if saved else -1

    def progress_text(self, ended: bool = False, waiting: str = "") -> str:
        """The progress bar and line; `ended`: the run has ended by the manager's account (a worker that died
        writes no event), so no ETA and no sampling or saving under way; `waiting`: what a queued run waits for, said
        instead of what its events last said (a resumed run's last rate and ETA are not shown either)."""
        message = waiting or ("" if ended and not self.ended and self.phase in PAUSES else self.message)
        if self.last_step is None:
            return waiting or self.before_first_step(message, ended)
        e = self.last_step
        total = max(e["total_steps"], 1)
        pct = 100 * e["step"] / total
        head = f"Step {e['step']} / {e['total_steps']} · epoch {e['epoch']} · loss {e['loss']:.4f}"
        if "keys_scaled" in e:  # scale_weight_norms, as kohya's progress bar shows it
            head += f" · {e['keys_scaled']} module(s) scaled to the max norm, mean norm {e['mean_norm']:.3f}"
        starting = self.phase in ("loading", "caching")  # a resumed worker before its first step
        if not (self.ended or ended or waiting or starting):  # no rate or ETA of a run that is not training now
            head += f" · {e.get('samples_per_s', 0):.2f} img/s · ETA {eta_text(e.get('eta_s', 0))}"
        bar = f'<progress value="{pct:.1f}" max="100" style="width:100%"></progress>'
        tail = f"\n\n{message}" if message else ""
        return f"{bar}\n\n{head}{tail}"

    def before_first_step(self, message: str, ended: bool) -> str:
        """The progress line of a run without a step: the phase it is in, or that it ended (an error event's message
        stays; a phase that a dead or cancelled worker left behind does not)."""
        if message and (self.ended or not ended):
            return f"**{self.phase or 'waiting'}** — {message}"
        return "Ended before its first step." if ended or self.ended else "Waiting for the worker…"

    def sample_grid(self) -> list[tuple[str, str]]:
        """(relative path, caption), the newest step first and its prompts in order: the gallery opens on the
        newest samples, and each column holds one prompt (the columns are a multiple of the prompts)."""
        ordered = sorted(self.samples, key=lambda e: (-e["step"], e.get("index", 0)))
        return [(e["path"], f"step {e['step']} · {e['prompt']}") for e in ordered]

    def prompts_per_step(self) -> int:
        return max((sum(1 for e in self.samples if e["step"] == s["step"]) for s in self.samples), default=1)

    def gallery_columns(self) -> int:
        """The fewest whole steps per row that make at least GALLERY_COLUMNS thumbnails."""
        prompts = self.prompts_per_step()
        return prompts * math.ceil(GALLERY_COLUMNS / prompts)
