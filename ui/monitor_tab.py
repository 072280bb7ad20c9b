"""Monitor tab: the chosen run's progress, loss plot, samples, files and log, refreshed every second.

The handlers are plain functions (values in, values out): `refresh` folds what the run appended since this view's
own cursor and sends only the components that changed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui.jobs import FINAL_STATES, REFUSED, RESUMABLE_STATES, JobManager, RunInfo
from ui.monitor import GALLERY_COLUMNS, RunView, log_tail
from ui.train_tab import in_form_words

NO_RUN = "No run selected: start one on the Train tab or open one under Runs."
# The log's box is a column-reverse flex box: a browser shows such a box scrolled to its end, so the newest line is in
# view from the first render on, with no script (Gradio 6.31's Textbox ignores its own autoscroll and stays at the top).
LOG_HTML = '<div class="head">Worker log (tail)</div><div class="tail"><pre>${value}</pre></div>'
LOG_CSS = """
.head { font-size: var(--block-label-text-size); color: var(--block-label-text-color); margin-bottom: 4px; }
.tail { display: flex; flex-direction: column-reverse; height: 16em; overflow-y: auto; resize: vertical;
        border: 1px solid var(--border-color-primary); border-radius: var(--radius-sm); }
pre { margin: 0; padding: 6px; white-space: pre-wrap; overflow-wrap: anywhere; font-size: var(--text-sm); }
"""


@dataclass
class MonitorTab:
    title: gr.Markdown
    progress: gr.Markdown
    loss_plot: gr.LinePlot
    samples: gr.Gallery
    cancel: gr.Button
    resume: gr.Button
    files: gr.File
    log: gr.HTML
    best: gr.Markdown

    def outputs(self) -> list:
        return [self.title, self.progress, self.loss_plot, self.samples, self.files, self.log, self.best, self.cancel,
                self.resume]


def build() -> MonitorTab:
    title = gr.Markdown(NO_RUN, elem_id="monitor-title")
    progress = gr.Markdown(elem_id="monitor-progress")
    loss_plot = gr.LinePlot(None, x="step", y="loss", color="curve", title="Loss", height=280, elem_id="monitor-loss")
    samples = gr.Gallery(label="Samples, the newest step first, its prompts in order", columns=GALLERY_COLUMNS,
                         height=420, fit_columns=False, object_fit="contain", elem_id="monitor-samples")
    with gr.Row():  # clickable once a run whose state allows it is shown (refresh)
        cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="monitor-cancel")
        resume = gr.Button("Resume", interactive=False, elem_id="monitor-resume")
    best = gr.Markdown(elem_id="monitor-best")
    files = gr.File(label="Files (the best first)", file_count="multiple", interactive=False, elem_id="monitor-files",
                    elem_classes=["downloads"])
    log = gr.HTML("", html_template=LOG_HTML, css_template=LOG_CSS, js_on_load=None, container=True, padding=True,
                  elem_id="monitor-log")
    return MonitorTab(title, progress, loss_plot, samples, cancel, resume, files, log, best)


def refresh(jobs: JobManager, run_id: str, view: RunView | None) -> list:
    """[title, progress, plot, gallery, files, log, best, cancel, resume, view]: gr.update() (nothing sent) where
    nothing changed. Cancel and Resume can be clicked only when the run's state allows them."""
    same = gr.update()
    if not run_id or not known_run(jobs, run_id):
        return cleared(view, run_id)
    if view is None or view.run_id != run_id:
        view = RunView.of(jobs.run_dir(run_id))  # a new view reads the whole history
    view.read()
    info = jobs.info(run_id)
    title = heading(info)
    if view.reader.skipped:
        title += f"\n\n⚠ {view.reader.skipped} line(s) of events.jsonl could not be read and were skipped"
    gallery = [(str(info.path / p), caption) for p, caption in view.sample_grid()]
    files = [str(p) for p in view.best_first(jobs.files(run_id), info.path) if p.is_file()]
    log = html.escape(log_tail(jobs.run_dir(run_id)))
    progress = view.progress_text(info.state in FINAL_STATES, waiting_text(jobs, info, view))
    return [title if view.changed("title", title) else same,
            progress if view.changed("progress", progress) else same,
            plot_rows(view) if view.changed("plot", (len(view.steps), len(view.held_out))) else same,
            gr.update(value=gallery, columns=view.gallery_columns()) if view.changed("gallery", gallery) else same,
            files if view.changed("files", files) else same,
            log if view.changed("log", log) else same,
            best if view.changed("best", best := view.best_text()) else same,
            *(buttons(info.state, info.refused) if view.changed("buttons", (info.state, info.refused))
              else [same, same]),
            view]


HEADING_CHARS = 120  # of a failure's message in the heading


def heading(info: RunInfo) -> str:
    """"run — state · what it says", a refused setting by its form label and with what to do about it."""
    message = in_form_words(info.message)
    if info.state == "failed" and len(message) > HEADING_CHARS:  # the progress line below says it whole
        message = message[:HEADING_CHARS].rsplit(" ", 1)[0] + " … (below)"
    title = f"### {info.run_id} — {info.state}" + (f" · {message}" if message else "")
    return title + (f"\n\nResuming it would fail the same way: {REFUSED}." if info.refused else "")


def waiting_text(jobs: JobManager, info: RunInfo, view: RunView) -> str:
    """What the progress line says instead of the events' last word: what a queued run waits for, and for a run
    resumed after its end, that it is starting again (its events still end with how it ended, for a few seconds)."""
    if info.state == "queued":
        return queued_text(jobs, info)
    if info.state == "running" and view.ended and info.started > view.ended_at:  # not one that is just ending
        return "Resuming: the worker is starting…"
    return ""


def queued_text(jobs: JobManager, info: RunInfo) -> str:
    """What a queued run waits for: the runs training now, then those queued before it (the queue is first come,
    first served)."""
    others = [r for r in jobs.runs() if r.run_id != info.run_id]
    running = [f"{r.run_id} (training)" for r in others if r.state == "running"]
    ahead = [f"{r.run_id} (queued before it)" for r in sorted(others, key=lambda r: r.created)
             if r.state == "queued" and r.created < info.created]
    names = running + ahead
    waits = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ("Queued" + (f" ({info.message})" if info.message else "") +
            (f": waiting for {waits}." if names else ": starting…"))


def buttons(state: str, refused: bool = False) -> list:
    """[Cancel, Resume] for a run in `state`: each clickable only when it would do something. A run made by
    `python -m trainer new --no-train` has not begun: its Resume starts it."""
    return [gr.update(interactive=state in ("queued", "running")),
            gr.update(interactive=state in RESUMABLE_STATES and not refused,
                      value="Start" if state == "created" else "Resume")]


def cleared(view: RunView | None, run_id: str) -> list:
    """No run to show (none chosen, or it was deleted): empty what a run showed before, then send nothing."""
    if view is None and not run_id:
        return [gr.update()] * 9 + [None]
    return [NO_RUN, "", None, [], None, "", "", *buttons(""), None]


def known_run(jobs: JobManager, run_id: str) -> bool:
    """A run of this runs folder (the id comes from the browser's storage: never trusted as a path)."""
    try:
        return jobs.run_dir(run_id).config.is_file()
    except ValueError:
        return False


def plot_rows(view: RunView) -> pd.DataFrame | None:
    """The loss curves, or None (an empty plot) before the first step. An empty frame would fix the plot's colour
    scale to the wrong type."""
    return pd.DataFrame(view.loss_rows(), columns=["step", "loss", "curve"]) if view.steps else None


def cancel(jobs: JobManager, run_id: str) -> dict:
    return toast(outcome(jobs, cancel_unless_ended, run_id))


def resume(jobs: JobManager, run_id: str) -> dict:
    return toast(outcome(jobs, JobManager.resume, run_id))


ENDED_WORDS = {"failed": "has failed", "cancelled": "was cancelled", "interrupted": "was interrupted"}


def cancel_unless_ended(jobs: JobManager, run_id: str) -> RunInfo:
    ended = jobs.info(run_id).state in FINAL_STATES
    info = jobs.cancel(run_id)  # a sweep's trial is refused whatever its state
    if ended:
        raise ValueError(f"{run_id} {ENDED_WORDS.get(info.state, 'is ' + info.state)}: there is nothing to cancel")
    return info


def outcome(jobs: JobManager, act, run_id: str) -> str:
    """What came of `act(jobs, run_id)`, in words; ⚠ first when it was refused."""
    if not known_run(jobs, run_id):
        return f"⚠ There is no run {run_id[:80]!r} (deleted?)" if run_id else "⚠ No run selected."
    try:
        return act(jobs, run_id).summary()
    except ValueError as e:
        return f"⚠ {e}"


def toast(message: str) -> dict:
    """Say `message` in a toast (a warning when it starts with ⚠) and change nothing: the heading goes on showing the
    run, and the next refresh shows its new state."""
    if message.startswith("⚠ "):
        gr.Warning(message.removeprefix("⚠ "))
    else:
        gr.Info(message)
    return gr.update()
