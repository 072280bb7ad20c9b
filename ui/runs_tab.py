"""Runs tab: every run in the runs folder, its files, open it in the Monitor or Compare, delete it; the resize
tool."""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer.events import read_all
from ui import confirm, resize_tool
from ui.jobs import JobManager, RunInfo
from ui.monitor import RunView
from ui.monitor_tab import buttons, cancel_unless_ended, outcome

HEADERS = ["run", "state", "steps", "best held-out", "base", "started", "message"]
DELETE = "Delete"
CHOOSE_FIRST = "Choose a run first."


@dataclass
class RunsTab:
    table: gr.Dataframe
    chosen: gr.Dropdown
    open: gr.Button
    delete: gr.Button
    compare: gr.Button
    status: gr.Markdown
    best: gr.Markdown
    files: gr.File
    cancel: gr.Button
    resume: gr.Button
    armed: gr.State  # the run a first click on Delete asked about
    resize_saved: gr.Dropdown  # the Resize section's chooser of this run's files


def build(resized_dir: Path) -> RunsTab:
    table = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="runs-table")
    with gr.Row():
        chosen = gr.Dropdown(label="Run", choices=[], elem_id="runs-choose", scale=3)
        open_btn = gr.Button("Open in Monitor", elem_id="runs-open")
        compare_btn = gr.Button("Compare this run's files", elem_id="runs-compare")
    with gr.Row():
        cancel_btn = gr.Button("Cancel", elem_id="runs-cancel")
        resume_btn = gr.Button("Resume", elem_id="runs-resume")
        delete_btn = gr.Button(DELETE, variant="stop", elem_id="runs-delete")
    status = gr.Markdown(elem_id="runs-status")
    best = gr.Markdown(elem_id="runs-best")
    files = gr.File(label="Files of the chosen run (the best first)", file_count="multiple", interactive=False,
                    elem_id="runs-files", elem_classes=["downloads"])
    saved = resize_tool.build(resized_dir)
    return RunsTab(table, chosen, open_btn, delete_btn, compare_btn, status, best, files, cancel_btn, resume_btn,
                   gr.State(""), saved)


def table(jobs: JobManager, views: dict | None = None) -> tuple[list[list[str]], list[str]]:
    """(rows of the table, run ids for the chooser): the runs newest first, then the sweeps' trials. `views` keeps
    each run's RunView between calls, so a refresh reads only the events appended since."""
    views = {} if views is None else views
    runs = jobs.listed()
    for gone in set(views) - {r.run_id for r in runs}:
        del views[gone]
    for r in runs:
        if r.run_id not in views:
            views[r.run_id] = RunView.of(jobs.run_dir(r.run_id)), base_name(r.path)
    return [row(r, *views[r.run_id]) for r in runs], [r.run_id for r in runs]


def row(info: RunInfo, view: RunView, base: str) -> list[str]:
    """One run's line: id, state, steps done of all, the best saved file's held-out loss, base, start, message."""
    view.read()
    last, best = view.last_step, view.best_file()
    return [info.run_id, info.state, f"{last['step']} / {last['total_steps']}" if last else "",
            f"{best['loss']:.4f} (epoch {best['epoch']})" if best else "", base,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)), info.message]


def base_name(run_path: Path) -> str:
    """The base model the run trains on, by its file or folder name (the demo: "demo")."""
    try:
        base = tomllib.loads((run_path / "config.toml").read_text(encoding="utf-8"))["model"][
            "pretrained_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return Path(str(base)).name or str(base)


def on_select(evt: gr.SelectData) -> dict:
    """A click on a row of the table chooses its run."""
    return gr.update(value=evt.row_value[0])


def files_of(jobs: JobManager, run_id: str) -> list[str] | None:
    return choose(jobs, run_id)[0]


def choose(jobs: JobManager, run_id: str) -> tuple[list[str] | None, str]:
    """(the chosen run's files, the one with the lowest held-out loss first; the line naming it, or the note)."""
    if not run_id:
        return None, ""
    run = jobs.run_dir(run_id)
    view = RunView(run_id=run_id).add(read_all(run.path))
    return [str(p) for p in view.best_first(jobs.files(run_id), run.path) if p.is_file()], view.best_text()


def on_choose(jobs: JobManager, run_id: str) -> list:
    """[files, best line, status line, armed run, Delete button, the Resize section's files, Cancel, Resume] for a
    newly chosen run: the last action's line goes (not when the chooser is emptied by a delete, whose line it is),
    a Delete asked about another run is put back, Cancel and Resume clickable as on the Monitor."""
    files, best = choose(jobs, run_id)
    return [files, best, "" if run_id else gr.update(), *confirm.disarmed(DELETE), resize_tool.run_files(files),
            *run_buttons(jobs, run_id)]


def run_buttons(jobs: JobManager, run_id: str) -> list:
    """[Cancel, Resume] for the chosen run, by the Monitor's rule."""
    try:
        info = jobs.info(run_id) if run_id else None
    except (OSError, ValueError):
        info = None
    return buttons(info.state, info.refused) if info else buttons("")


def cancel(jobs: JobManager, run_id: str) -> str:
    return outcome(jobs, cancel_unless_ended, run_id) if run_id else CHOOSE_FIRST


def resume(jobs: JobManager, run_id: str) -> str:
    return outcome(jobs, JobManager.resume, run_id) if run_id else CHOOSE_FIRST


def delete(jobs: JobManager, run_id: str, current: str, armed: str = "") -> tuple:
    """(message, the Monitor's run afterwards: cleared if it was the deleted one, the chosen run's files and best
    line: emptied once it is deleted, the armed run, the Delete button, the chooser: cleared once it is deleted).
    The first click says what would go and arms the button; a second click on the same run deletes it."""
    kept = gr.update(), gr.update()
    if not run_id:
        return CHOOSE_FIRST, current, *kept, *confirm.disarmed(DELETE), gr.update()
    try:
        run = jobs.check_deletable(run_id)
        go, armed, button = confirm.ask_twice(DELETE, armed, run_id)
        if not go:
            return what_goes(jobs, run_id, run.path), current, *kept, armed, button, gr.update()
        jobs.delete(run_id)
    except (ValueError, FileNotFoundError) as e:
        return f"⚠ {e}", current, *kept, *confirm.disarmed(DELETE), gr.update()
    return f"Deleted {run_id}.", ("" if current == run_id else current), None, "", armed, button, gr.update(value=None)


def what_goes(jobs: JobManager, run_id: str, path: Path) -> str:
    """What the folder holds, as far as it holds it (a run that failed early has no samples or state)."""
    saved = [p for p in jobs.files(run_id) if p.suffix == ".safetensors"]
    held = [f"its {len(saved)} saved LoRA file(s)" if saved else "no LoRA file"]
    held += [name for name, sub in (("samples", "samples"), ("pictures", "dataset"), ("resumable state", "state"))
             if any((path / sub).glob("*"))]
    return (f"Deleting **{run_id}** removes its folder ({confirm.folder_mb(path):.1f} MB): {', '.join(held)} and its "
            "config. Click the button again to delete it for good.")
