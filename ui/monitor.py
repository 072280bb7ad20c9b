"""What the Monitor tab shows, folded from a run's events: plain data, no gradio, testable without a browser."""

from __future__ import annotations

from dataclasses import dataclass, field


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's exponential moving average, debiased so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def eta_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


@dataclass
class RunView:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    last_step: dict | None = None
    phase: str = ""
    message: str = ""
    ended: str = ""  # "done" | "cancelled" | "failed" | ""
    shown_files: list[str] = field(default_factory=list)  # what the page shows now

    def add(self, events: list[dict]) -> "RunView":
        for e in events:
            kind = e["type"]
            if kind == "step":
                if e["step"] in self.steps:  # a resumed run repeats nothing, but keep the plot clean if it did
                    continue
                self.steps.append(e["step"])
                self.losses.append(e["loss"])
                self.last_step = e
                self.ended = ""
            elif kind == "status":
                self.phase, self.message = e["phase"], e["message"]
            elif kind == "sample":
                self.samples.append(e)
            elif kind == "checkpoint" and e["path"].endswith(".safetensors"):
                self.files.append(e["path"])
            elif kind == "done":
                self.ended, self.message = "done", "Finished"
            elif kind == "cancelled":
                self.ended, self.message = "cancelled", f"Cancelled at step {e['step']}: resumable"
            elif kind == "error":
                self.ended, self.message = "failed", e["message"]
        return self

    def loss_rows(self) -> list[dict]:
        """Rows for a line plot: the raw loss and its smoothed curve."""
        rows = [{"step": s, "loss": v, "curve": "raw"} for s, v in zip(self.steps, self.losses)]
        rows += [{"step": s, "loss": v, "curve": "smoothed"} for s, v in zip(self.steps, smooth(self.losses))]
        return rows

    def progress_text(self) -> str:
        if self.last_step is None:
            return f"**{self.phase or 'waiting'}** — {self.message}" if self.message else "Waiting for the worker…"
        e = self.last_step
        total = max(e["total_steps"], 1)
        pct = 100 * e["step"] / total
        head = f"Step {e['step']} / {e['total_steps']} · epoch {e['epoch']} · loss {e['loss']:.4f}"
        if not self.ended:
            head += f" · {e.get('samples_per_s', 0):.2f} img/s · ETA {eta_text(e.get('eta_s', 0))}"
        bar = f'<progress value="{pct:.1f}" max="100" style="width:100%"></progress>'
        tail = f"\n\n{self.message}" if self.message else ""
        return f"{bar}\n\n{head}{tail}"

    def sample_grid(self) -> list[tuple[str, str]]:
        """(relative path, caption) ordered by step then prompt: rows of steps, columns of prompts."""
        ordered = sorted(self.samples, key=lambda e: (e["step"], e.get("index", 0)))
        return [(e["path"], f"step {e['step']} · {e['prompt']}") for e in ordered]

    def prompts_per_step(self) -> int:
        return max((sum(1 for e in self.samples if e["step"] == s["step"]) for s in self.samples), default=1)
