"""Runs tab: every run in the runs folder, its files, open it in the Monitor or Compare, delete it; the resize
tool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer.events import read_all
from ui import resize_tool
from ui.jobs import JobManager
from ui.monitor import RunView

HEADERS = ["run", "state", "message"]


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


def build(resized_dir: Path) -> RunsTab:
    table = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="runs-table")
    with gr.Row():
        chosen = gr.Dropdown(label="Run", choices=[], elem_id="runs-choose", scale=3)
        open_btn = gr.Button("Open in Monitor", elem_id="runs-open")
        compare_btn = gr.Button("Compare this run's files", elem_id="runs-compare")
        delete_btn = gr.Button("Delete", variant="stop", elem_id="runs-delete")
    status = gr.Markdown(elem_id="runs-status")
    best = gr.Markdown(elem_id="runs-best")
    files = gr.File(label="Files of the chosen run (the best first)", file_count="multiple", interactive=False,
                    elem_id="runs-files")
    resize_tool.build(resized_dir)
    return RunsTab(table, chosen, open_btn, delete_btn, compare_btn, status, best, files)


def table(jobs: JobManager) -> tuple[list[list[str]], list[str]]:
    """(rows of the table, run ids for the chooser): the runs newest first, then the sweeps' trials."""
    runs = jobs.listed()
    return [[r.run_id, r.state, r.message] for r in runs], [r.run_id for r in runs]


def files_of(jobs: JobManager, run_id: str) -> list[str] | None:
    return choose(jobs, run_id)[0]


def choose(jobs: JobManager, run_id: str) -> tuple[list[str] | None, str]:
    """(the chosen run's files, the one with the lowest held-out loss first; the line naming it, or the note)."""
    if not run_id:
        return None, ""
    run = jobs.run_dir(run_id)
    view = RunView(run_id=run_id).add(read_all(run.path))
    return [str(p) for p in view.best_first(jobs.files(run_id), run.path) if p.is_file()], view.best_text()


def delete(jobs: JobManager, run_id: str, current: str) -> tuple:
    """(message, the Monitor's run afterwards: cleared if it was the deleted one, the chosen run's files and best
    line: emptied once it is deleted)."""
    kept = gr.update(), gr.update()
    if not run_id:
        return "Choose a run first.", current, *kept
    try:
        jobs.delete(run_id)
    except (ValueError, FileNotFoundError) as e:
        return f"⚠ {e}", current, *kept
    return f"Deleted {run_id}.", ("" if current == run_id else current), None, ""
