"""Compare tab (issue #15): the saved files of one or more runs and/or dropped-in LoRA files × strengths × prompts
× seeds, drawn by one compare worker on one loaded base; the grid grows in the page as cells arrive.

The handlers are plain functions (values in, values out) over a CompareManager (ui/compares.py); `refresh` sends
only what changed since this page's last tick. The page's compare id is kept in the browser's storage, so a reload
shows the same compare again: a new view reads its events from the start.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer import config
from trainer.compare_spec import DEFAULTS, CompareError
from ui import train_tab
from ui.compares import (FINAL, CompareManager, CompareView, run_files, run_settings, spec_of, trial_names,
                         upload_label)
from ui.jobs import JobManager

SETTINGS = ["base", "prompts", "negative", "strengths", "seeds", "steps", "sampler", "cfg_scale", "width", "height"]
SUGGESTED = ["base", "prompts", "seeds", "steps", "sampler", "cfg_scale", "width", "height"]  # a run fills these in
NO_COMPARE = "Choose files and click Compare."
LABELS = {"cfg_scale": "Guidance (CFG)"}  # a setting whose form label is not its name
ENDED = {"done": "is done", "failed": "failed", "cancelled": "was cancelled already"}
CELL_PX = 192  # the largest a cell is shown in the page; grid.png has them at full size
# the file column stays in view as the grid scrolls sideways, wide enough not to wrap a label word by word
STICKY = ("position: sticky; left: 0; z-index: 1; min-width: 14em; background: var(--table-odd-background-fill, "
          "var(--background-fill-primary, white))")


@dataclass
class CompareTab:
    runs: gr.Dropdown  # several runs may be chosen; the settings are suggested by the first
    run_info: gr.Markdown
    files: gr.CheckboxGroup
    upload: gr.File
    fields: dict  # setting name -> its component
    start: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    progress: gr.Markdown
    problems: gr.Markdown
    grid: gr.HTML
    download: gr.File

    def form(self) -> list:
        return [self.fields[n] for n in SETTINGS]

    def outputs(self) -> list:
        return [self.progress, self.problems, self.grid, self.download, self.status, self.cancel]


def build(models_dir: Path) -> CompareTab:
    gr.Markdown("Draw the same prompts and seeds with each file at each strength, on one loaded base. "
                "Strength 0 is the base itself.")
    with gr.Row():
        runs = gr.Dropdown(label="Runs (the first suggests the settings)", choices=[], value=[], multiselect=True,
                           elem_id="compare-run", scale=2)
        upload = gr.File(label="…and/or drop LoRA / LyCORIS files", file_count="multiple",
                         file_types=[".safetensors"], type="filepath", elem_id="compare-upload", scale=2)
    run_info = gr.Markdown(elem_id="compare-run-info")
    files = gr.CheckboxGroup(label="The runs' saved files", choices=[], elem_id="compare-files")
    base = gr.Dropdown(choices=train_tab.base_model_choices(Path(models_dir)), value="demo", allow_custom_value=True,
                       label="Base model (the one the files were trained on)", elem_id="compare-base")
    with gr.Row():
        prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="compare-prompts", scale=3)
        negative = gr.Textbox(label="Negative prompt", lines=3, elem_id="compare-negative", scale=2)
    with gr.Row():
        strengths = gr.Textbox(value=as_text(DEFAULTS)["strengths"], label="Strengths",
                               elem_id="compare-strengths")
        seeds = gr.Textbox(value=as_text(DEFAULTS)["seeds"], label="Seeds", elem_id="compare-seeds")
        steps = gr.Number(value=DEFAULTS["steps"], precision=0, label="Steps", elem_id="compare-steps")
        sampler = gr.Dropdown(choices=list(config.field_help("sample_sampler")["choices"]), value=DEFAULTS["sampler"],
                              label="Sampler", elem_id="compare-sampler")
    with gr.Row():
        cfg_scale = gr.Number(value=DEFAULTS["cfg_scale"], label="Guidance (CFG)", elem_id="compare-cfg-scale")
        width = gr.Number(value=DEFAULTS["width"], precision=0, label="Width", elem_id="compare-width")
        height = gr.Number(value=DEFAULTS["height"], precision=0, label="Height", elem_id="compare-height")
    with gr.Row():
        start = gr.Button("Compare", variant="primary", elem_id="compare-start")
        cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="compare-cancel")
    status = gr.Markdown(elem_id="compare-status")
    progress = gr.Markdown(NO_COMPARE, elem_id="compare-progress")
    problems = gr.Markdown(elem_id="compare-problems")
    grid = gr.HTML(elem_id="compare-grid")
    download = gr.File(label="The whole grid", interactive=False, elem_id="compare-download")
    fields = dict(zip(SETTINGS, [base, prompts, negative, strengths, seeds, steps, sampler, cfg_scale, width, height]))
    return CompareTab(runs, run_info, files, upload, fields, start, cancel, status, progress, problems, grid, download)


# --- choosing the files ---

def run_choices(jobs: JobManager, chosen: str | list[str] = "") -> dict:
    """The runs to choose from, newest first, then the sweeps' trials with saved files ("<sweep>/<trial>"); only
    `chosen` (a run, or a list of runs and trials) selected, when given."""
    ids = [r.run_id for r in jobs.runs()] + trial_names(jobs.runs_dir)
    if not chosen:
        return gr.update(choices=ids)
    return gr.update(choices=ids, value=chosen if isinstance(chosen, list) else [chosen])


def choose_runs(jobs: JobManager, run_ids: list[str], suggested_by: str, memory: dict | None = None) -> list:
    """[files, note, suggested_by, base, prompts, seeds, steps, sampler, cfg, width, height, memory]: the saved
    files of every chosen run, each labelled with its run, and the settings the first run suggests.
    `memory` is the page's {"shown": paths listed now, "ticks": path -> ticked, for every file listed so far}
    (`remember_ticks` keeps it up to date as the user ticks): a file listed before keeps its tick, so adding or
    removing a run keeps what was unticked in the others; a new one is ticked (a sweep's trial: only its final
    file, as the trials are compared by what they ended with). `suggested_by` is the run the form's settings came
    from: they are filled in again only when the first run is another one (adding a run keeps what was edited).
    No run chosen clears the list and keeps the rest (Gradio's dropdown passes through [] when it is set anew)."""
    keep = [gr.update()] * len(SUGGESTED)
    ticks = dict((memory or {}).get("ticks", {}))
    if not run_ids:
        return [gr.update(choices=[], value=[]), "", gr.update(), *keep, {"shown": [], "ticks": ticks}]
    try:
        runs = [jobs.run_dir(r) for r in run_ids]
        files = {name: run_files(run) for name, run in zip(run_ids, runs)}
        suggested = [compares_settings(run) for run in runs]
    except (ValueError, OSError) as e:
        return [gr.update(choices=[], value=[]), f"⚠ {e}", suggested_by, *keep, {"shown": [], "ticks": ticks}]
    choices = [(file_text(f), f["path"]) for found in files.values() for f in found]
    fresh = {f["path"] for name, found in files.items() for f in (found[-1:] if "/" in name else found)}
    ticks |= {path: path in fresh for _, path in choices if path not in ticks}
    ticked = [path for _, path in choices if ticks[path]]
    of_runs = f" of {len(runs)} runs" if len(runs) > 1 else ""
    notes = [f"{len(choices)} saved file(s){of_runs}, " + ("all ticked." if len(ticked) == len(choices) else
                                                          f"{len(ticked)} ticked.")] if choices else []
    notes += [f"⚠ {run_id} has no saved files yet: drop files instead, or wait for its first save."
              for run_id, found in files.items() if not found]
    base = suggested[0]["base"]
    notes += [f"⚠ {run.id} was trained on {other['base']}, {runs[0].id} on {base}: every file is drawn on the "
              "base chosen below" for run, other in zip(runs[1:], suggested[1:]) if other["base"] != base]
    settings = keep if run_ids[0] == suggested_by else [suggested[0][n] for n in SUGGESTED]
    return [gr.update(choices=choices, value=ticked), "\n\n".join(notes), run_ids[0], *settings,
            {"shown": [path for _, path in choices], "ticks": ticks}]


def remember_ticks(ticked: list[str], memory: dict | None) -> dict:
    """The page's memory of ticks (see choose_runs) after the user ticked or unticked the files listed."""
    memory = memory or {"shown": [], "ticks": {}}
    return {"shown": memory["shown"], "ticks": memory["ticks"] | {p: p in ticked for p in memory["shown"]}}


def open_tab(compares: CompareManager, jobs: JobManager, compare_id: str, chosen: list[str], restored: bool) -> list:
    """The tab is opened: [runs, files, suggested_by, memory, status, *settings, restored]. The runs to choose
    from are listed again, the choice and the form kept; the first time after a reload, unless runs were chosen
    already (from the Runs or Sweeps tab), the form is put back as the page's compare (from the browser's storage)
    was asked for."""
    same = [gr.update()] * (4 + len(SETTINGS))
    if restored or chosen or not (form := restore_form(compares, jobs, compare_id)):
        return [run_choices(jobs), *same, True]
    return [*form, True]


def restore_form(compares: CompareManager, jobs: JobManager, compare_id: str) -> list:
    """[runs, files, suggested_by, memory, status, *settings] as the compare `compare_id` was asked for: its runs
    chosen, the files it drew ticked, its settings; [] for no known compare. Dropped files stay in its grid but
    not in the form (the browser no longer holds them)."""
    if not compare_id or not known_compare(compares, compare_id):
        return []
    try:
        info, view = compares.info(compare_id), compares.view(compare_id)
    except (ValueError, OSError):
        return []
    view.read()  # for the status line: the files the worker skipped
    spec = view.spec
    runs_dir = Path(jobs.runs_dir).resolve()
    run_ids, drawn = [], set()  # the runs in the order of their files; the files of runs among the compare's
    for path in map(Path, spec["files"]):
        parts = path.relative_to(runs_dir).parts if path.is_relative_to(runs_dir) else ()
        if "output" in parts[1:] and path.is_file():  # not a run or a sweep deleted since
            run_id = "/".join(parts[:parts.index("output")])
            run_ids += [] if run_id in run_ids else [run_id]
            drawn.add(str(path))
    listed = [f for r in run_ids for f in run_files(jobs.run_dir(r))]
    ticks = {f["path"]: f["path"] in drawn for f in listed}
    files = gr.update(choices=[(file_text(f), f["path"]) for f in listed], value=[p for p, on in ticks.items() if on])
    memory, shown = {"shown": list(ticks), "ticks": ticks}, as_text(spec)
    return [run_choices(jobs, run_ids or ""), files, run_ids[0] if run_ids else "", memory,
            status_line(info, view), *[shown[n] for n in SETTINGS]]


def compares_settings(run) -> dict:
    """The run's suggested settings as the form shows them (text for lists)."""
    return as_text(run_settings(run))


def as_text(settings: dict) -> dict:
    """Settings with their lists as the form's text boxes hold them (a prompt a line, numbers by commas)."""
    lists = {"prompts": "\n".join, "strengths": lambda v: ", ".join(f"{s:g}" for s in v),
             "seeds": lambda v: ", ".join(str(s) for s in v)}
    return settings | {name: text(settings[name]) for name, text in lists.items() if name in settings}


def summary(compare_id: str, state: str, spec: dict, skipped: int = 0) -> str:
    shape = " × ".join(counted(len(spec[f"{noun}s"]), noun) for noun in ("file", "strength", "prompt", "seed"))
    note = f" ({skipped} skipped, see below)" if skipped else ""
    return f"Compare **{compare_id}** {state}{note}: {shape}."


def counted(n: int, noun: str) -> str:
    """"1 seed", "2 seeds"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def status_line(info, view: CompareView) -> str:
    """The summary as the compare stands: ended by its events (the worker may not have exited yet), else by the
    manager; how many files the worker skipped (the problems line says which and why)."""
    skipped = len(view.spec["files"]) - len(view.usable())
    return summary(info.compare_id, view.ended or info.state, view.spec, skipped)


def file_text(f: dict) -> str:
    return f["label"] + (f" · held-out {f['held_out']:.4f}" if f["held_out"] is not None else "")


# --- starting, cancelling ---

def on_compare(compares: CompareManager, jobs: JobManager, run_ids: list[str], chosen: list[str],
               uploads: list[str], *values) -> list:
    """Queue a compare from the form: [status text, the page's compare id, its view]."""
    settings = dict(zip(SETTINGS, values))
    if not chosen and not uploads:
        return ["⚠ files: tick some of the runs' saved files or drop .safetensors files", gr.update(), gr.update()]
    try:
        runs = [jobs.run_dir(r) for r in run_ids or []] if chosen else []
        spec = spec_of(runs, list(chosen or []), settings)
        info = compares.start(spec, [(Path(u), upload_label(Path(u))) for u in uploads or []])
    except (CompareError, ValueError, OSError) as e:  # CompareError names the field and what it allows
        return [f"⚠ {as_labelled(str(e))}", gr.update(), gr.update()]
    return [summary(info.compare_id, info.state, compares.spec(info.compare_id)), info.compare_id, None]


def as_labelled(message: str) -> str:
    """A CompareError's message with the field named as the form labels it ("cfg_scale: …" -> "Guidance (CFG): …");
    the spec's own names stay for scripts and the command line."""
    name, sep, rest = message.partition(": ")
    return f"{LABELS[name]}{sep}{rest}" if sep and name in LABELS else message


def cancel(compares: CompareManager, compare_id: str) -> dict:
    """Cancel the page's compare and say what came of it in a toast; the status line is left as it is (the next
    tick shows the compare's new state)."""
    message = cancel_message(compares, compare_id)
    if message.startswith("⚠ "):
        gr.Warning(message.removeprefix("⚠ "))
    else:
        gr.Info(message)
    return gr.update()


def cancel_message(compares: CompareManager, compare_id: str) -> str:
    """What a click on Cancel did, in words; ⚠ first when there was nothing it could do."""
    if not compare_id:
        return "⚠ No compare to cancel."
    try:
        info, view = compares.info(compare_id), compares.view(compare_id)
        view.read()  # its events may say it ended before its worker has exited
        if (ended := view.ended or (info.state if info.state in FINAL else "")):
            return f"Nothing to cancel: the compare {ENDED[ended]}."
        info = compares.cancel(compare_id)
    except ValueError as e:
        return f"⚠ {e}"
    if info.state == "cancelled":
        return f"Compare {compare_id} cancelled before it started."
    return (f"Cancelling compare {compare_id}: it stops after the cell it is drawing (click Cancel again to stop it "
            "at once).")


# --- what the page shows ---

def refresh(compares: CompareManager, compare_id: str, view: CompareView | None) -> list:
    """[progress, problems, grid, download, status, Cancel, view]: gr.update() (nothing sent) where nothing changed.
    An id that names no compare here (it comes from the browser's storage: another runs folder, or tampered with)
    shows none. Cancel is clickable only while the compare is queued or drawing (its events may say it ended before
    its worker has exited)."""
    same = gr.update()
    if not compare_id:
        return [same] * 6 + [None]
    if not known_compare(compares, compare_id):
        return [NO_COMPARE, "", "", None, "", cancel_button(""), None]
    try:
        if view is None or view.compare_id != compare_id:
            view = compares.view(compare_id)  # a new view reads the whole history
        info = compares.info(compare_id)
    except ValueError as e:
        return [f"⚠ {e}", same, same, same, same, same, None]
    view.read()
    grid_file = view.folder / view.grid if view.grid else None
    download = str(grid_file) if grid_file and grid_file.is_file() else None
    drawn = (len(view.cells), len(view.files), view.ended)
    return [progress if view.changed("progress", progress := progress_line(info, view)) else same,
            problems if view.changed("problems", problems := view.problems_text()) else same,
            grid_html(view) if view.changed("grid", drawn) else same,
            download if view.changed("download", download) else same,
            status if view.changed("status", status := status_line(info, view)) else same,
            cancel_button(state) if view.changed("cancel", state := view.ended or info.state) else same,
            view]


def cancel_button(state: str) -> dict:
    return gr.update(interactive=state in ("queued", "running"))


def known_compare(compares: CompareManager, compare_id) -> bool:
    try:
        compares.folder(compare_id)
    except ValueError:
        return False
    return True


def progress_line(info, view: CompareView) -> str:
    """The view's own line, or what the manager knows when the worker said nothing (queued, crashed)."""
    if info.state == "queued":
        return f"Queued: {info.message}" if info.message else "Queued."
    if info.state in ("failed", "cancelled") and not view.ended:
        return f"{view.progress_text().split(' · ')[0]} · {info.state}: {info.message}"
    return view.progress_text()


def grid_html(view: CompareView) -> str:
    """The table, in a box of its own that scrolls sideways (the file column stays in view): a header row per
    prompt × seed and one of strengths; a row per file (its label and held-out loss), each cell the picture as a
    data URI, "…" until it is drawn, "not drawn" once the compare has ended without it."""
    spec = view.spec
    strengths, per_prompt = len(spec["strengths"]), len(spec["seeds"]) * len(spec["strengths"])
    width = min(int(spec["width"]), CELL_PX)
    heads = "".join(f'<th colspan="{strengths}">prompt {p + 1}: {esc(prompt)} · seed {seed}</th>'
                    for p, prompt in enumerate(spec["prompts"]) for seed in spec["seeds"])
    strength_heads = "".join(f"<th>strength {s:g}</th>" for _ in range(len(spec["prompts"]) * len(spec["seeds"]))
                             for s in spec["strengths"])
    rows = []
    for row, label in enumerate(spec["labels"]):
        loss = view.held_out(row)
        head = f'<th class="compare-label" style="{STICKY}">{esc(label)}' + (
            f"<br><small>held-out loss {loss:.4f}</small>" if loss is not None else "") + "</th>"
        if problem := view.problem(row):
            rows.append(f'<tr>{head}<td colspan="{len(spec["prompts"]) * per_prompt}">⚠ skipped: {esc(problem)}'
                        "</td></tr>")
            continue
        cells = "".join(cell_html(view, (row, s, p, k), width) for _, s, p, k in view.positions([row]))
        rows.append(f"<tr>{head}{cells}</tr>")
    return (f'<div class="compare-scroll" style="overflow-x: auto; max-width: 100%">'
            f'<table class="compare-table"><thead><tr><th rowspan="2" style="{STICKY}">file</th>{heads}</tr>'
            f"<tr>{strength_heads}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def cell_html(view: CompareView, position: tuple, width: int) -> str:
    path = view.cell(*position)
    if path is None and view.ended:
        return f'<td class="compare-not-drawn" style="width:{width}px">not drawn</td>'
    if path is None:
        return f'<td class="compare-pending" style="width:{width}px">…</td>'
    row, s, p, k = position
    spec = view.spec
    alt = f"{spec['labels'][row]} · strength {spec['strengths'][s]:g} · prompt {p + 1} · seed {spec['seeds'][k]}"
    return f'<td><img src="{picture(view, path)}" alt="{esc(alt)}" title="{esc(alt)}" style="width:{width}px"></td>'


def picture(view: CompareView, path: str) -> str:
    """The cell's PNG as a data URI, read once per view."""
    if path not in view.pictures:
        file = (view.folder / path).resolve()
        if not file.is_relative_to(view.folder.resolve()):  # an event is data: never read outside the compare
            return ""
        try:
            data = file.read_bytes()
        except OSError:
            return ""
        view.pictures[path] = "data:image/png;base64," + base64.b64encode(data).decode()
    return view.pictures[path]


def esc(text) -> str:
    return html.escape(str(text))
