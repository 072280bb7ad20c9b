"""Sweeps (issue #16) in the page: the Train tab's "Sweep" section (which fields, which values, how to search) and
the Sweeps tab (a sweep's trials ranked, their held-out loss over steps, the best trial's config to start as a full
run, a Compare of the best 3, Cancel, Resume and Delete).

The handlers are plain functions (values in, values out) over a SweepManager (ui/sweeps.py) and the JobManager;
the sweep is made by the engine (trainer/sweep.py), whose ConfigError names the field. The page's sweep id is kept
in the browser's storage, so a reload shows the same sweep. Delete is asked twice (ui/confirm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from trainer import config, sweep, sweep_space
from ui import confirm, train_tab
from ui.jobs import JobManager
from ui.sweeps import NoSweep, SweepInfo, SweepManager, SweepView, final_file, params_text, space_of

ROWS = 3  # "field | values" rows of the form
HEADERS = ["rank", "trial", "params", "state", "group", "step", "held-out loss @ step"]
WIDTHS = ["60px", "100px", "22%", "28%", "20%", "60px", "130px"]  # so "rank" and "step" do not wrap inside the word
NO_SWEEP = "Choose a sweep, or start one from the Train tab's Sweep section."
NOT_CHOSEN = "No sweep chosen."
CHOOSE_FIRST = "Choose a sweep first."
DELETE = "Delete"
WHOLE_SWEEP = ("Cancel, Resume and Delete act on the whole sweep. To stop one trial, click its row, then *Stop "
               "trial*: it ends as a pruned one and the others go on.")
STOP = "Stop trial"
NOTHING_TO_CANCEL = {"done": "the sweep is done", "cancelled": "the sweep is cancelled",
                     "failed": "the sweep has failed", "interrupted": "the sweep was interrupted",
                     "created": "the sweep has not started"}
EXAMPLE = [("unet_lr", "1e-4, 5e-4, 1e-3"), ("", ""), ("", "")]  # e.g. network_type "lora, lokr", network_dim "4, 8"
def sweepable_fields() -> list[str]:
    """The config fields a sweep may vary: every field but those the trials must share (sweep_space.REFUSED)."""
    return sorted(f for f in config.SECTION_OF if f not in sweep_space.REFUSED)


@dataclass
class SweepForm:
    keys: list  # one field dropdown per row
    values: list  # one values textbox per row
    search: gr.Radio
    trials: gr.Number
    parallel: gr.Number
    prune: gr.Radio
    start: gr.Button
    status: gr.Markdown

    def form(self) -> list:
        return [c for pair in zip(self.keys, self.values) for c in pair] + [self.search, self.trials, self.parallel,
                                                                           self.prune]


def build_form() -> SweepForm:
    """The Train tab's Sweep section: the base config is the form above, exactly as Train would start it."""
    with gr.Accordion("Sweep: train several variations of these settings and rank them", open=False,
                      elem_id="sweep-section"):
        gr.Markdown("Each row is a field and its values: a list `1e-4, 5e-4, 1e-3` or `lora, lokr` (every "
                    "combination is a trial "
                    "with **grid**), or a range `1e-5:1e-3:log` for **random** / **tpe** with a trial count. The "
                    "trials train together on one loaded base and are ranked by their held-out loss, so set "
                    "*Validation split* under Advanced.")
        keys, values = [], []
        for i, (key, text) in enumerate(EXAMPLE):
            with gr.Row():
                keys.append(gr.Dropdown(choices=[""] + sweepable_fields(), value=key, allow_custom_value=True,
                                        label="Field", elem_id=f"sweep-field-{i}", scale=1))
                values.append(gr.Textbox(value=text, label="Values (a, b, c) or range (low:high[:log])",
                                         elem_id=f"sweep-values-{i}", scale=2))
        with gr.Row():
            search = gr.Radio(choices=list(sweep_space.SEARCHES), value="grid", label="Search",
                              elem_id="sweep-search")
            trials = gr.Number(value=0, precision=0, label="Trials (random / tpe)", elem_id="sweep-trials")
            parallel = gr.Number(value=0, precision=0, label="Trained together (0 = all)", elem_id="sweep-parallel")
            prune = gr.Radio(choices=list(sweep.PRUNERS), value="none", label="Stop trials clearly behind",
                             elem_id="sweep-prune")
        with gr.Row():
            start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start", scale=1)
            status = gr.Markdown(elem_id="sweep-status")
    return SweepForm(keys, values, search, trials, parallel, prune, start, status)


def on_start_sweep(sweeps: SweepManager, base: str, preset: str, folder: str, trigger: str, *values) -> list:
    """Make and queue a sweep from the Train form and the Sweep section: [form field updates…, status, tab switch,
    the page's sweep id, the sweeps' chooser]."""
    n = len(train_tab.FIELDS)
    form, (*rows, search, trials, parallel, prune) = list(values[:n]), values[n:]
    no_change = [gr.update(), gr.update(), gr.update()]
    try:
        cfg = train_tab.build_config(base, preset, Path(folder) if folder else None, trigger, train_tab.FIELDS,
                                     form)
        space = space_of(zip(rows[0::2], rows[1::2]))
        one_trial(cfg, space, search, int(trials or 0))
        info = sweeps.create(cfg, Path(folder), space, search, int(trials or 0), int(parallel or 0), prune)
    except config.ConfigError as e:  # the engine's message, naming the field
        return [*train_tab.field_errors(train_tab.FIELDS, e), f"⚠ {train_tab.in_form_words(e)}", *no_change]
    except (ValueError, OSError) as e:
        return [*train_tab.field_errors(train_tab.FIELDS, None), f"⚠ {e}", *no_change]
    state = sweep.read(info.path)
    return [*train_tab.field_errors(train_tab.FIELDS, None),
            f"Sweep **{info.sweep_id}** {info.state}: {state['trials_wanted']} trial(s), {state['search']} search.",
            gr.Tabs(selected="sweeps"), info.sweep_id,
            gr.update(choices=[s.sweep_id for s in sweeps.sweeps()], value=info.sweep_id)]


def one_trial(cfg, space: dict, search: str, trials: int) -> None:
    """A sweep of one trial ranks nothing and trains what Train would, inside a sweep: refused, saying what to do
    (after the engine's own checks, so a bad value is named first)."""
    if sweep_space.check(config.to_dict(cfg), space, search, trials) == 1:
        more = ("give a field two or more values (a, b)" if search == "grid" else
                "set Trials (random / tpe) to 2 or more")
        raise ValueError(f"one trial: use Train for a single run; a sweep ranks several, so {more}")


# --- the Sweeps tab ---

@dataclass
class SweepTab:
    chosen: gr.Dropdown
    state: gr.Markdown
    cancel: gr.Button
    resume: gr.Button
    delete: gr.Button
    table: gr.Dataframe
    plot: gr.LinePlot
    best: gr.Markdown
    best_config: gr.Code
    full_run: gr.Button
    compare: gr.Button
    action: gr.Markdown
    armed: gr.State  # the sweep a first click on Delete asked about
    stop: gr.Button  # stops the trial whose row was clicked
    trial: gr.State  # that trial's name

    def outputs(self) -> list:
        return [self.state, self.table, self.plot, self.best, self.best_config]


def build() -> SweepTab:
    with gr.Row():
        chosen = gr.Dropdown(label="Sweep", choices=[], elem_id="sweep-choose", scale=3)
        cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
        resume = gr.Button("Resume", elem_id="sweep-resume")
        delete = gr.Button(DELETE, variant="stop", elem_id="sweep-delete")
    gr.Markdown(WHOLE_SWEEP, elem_id="sweep-whole")
    state = gr.Markdown(NO_SWEEP, elem_id="sweep-state")
    table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, column_widths=WIDTHS, elem_id="sweep-table")
    stop = gr.Button(STOP, size="sm", interactive=False, elem_id="sweep-stop-trial")
    plot = gr.LinePlot(x="step", y="loss", color="trial", title="Held-out loss of each trial", x_title="step",
                       y_title="held-out loss", elem_id="sweep-plot")
    best = gr.Markdown(elem_id="sweep-best")
    best_config = gr.Code(label="The best trial's config.toml", interactive=False, elem_id="sweep-best-config")
    with gr.Row():
        full_run = gr.Button("Start as a full run", variant="primary", elem_id="sweep-full-run")
        compare = gr.Button("Compare the best 3", elem_id="sweep-compare-best")
    action = gr.Markdown(elem_id="sweep-action")
    return SweepTab(chosen, state, cancel, resume, delete, table, plot, best, best_config, full_run, compare, action,
                    gr.State(""), stop, gr.State(""))


def on_select_trial(evt: gr.SelectData) -> list:
    """[the trial, the Stop button] for a click on a row of the table."""
    trial = str(evt.row_value[1])
    return [trial, gr.update(value=f"{STOP} {trial}", interactive=True)]


def stop_trial(sweeps: SweepManager, sweep_id: str, trial: str) -> str:
    if not (sweep_id and trial):
        return "Click a trial's row in the table first."
    try:
        return sweeps.stop_trial(sweep_id, trial)
    except (ValueError, OSError) as e:
        return f"⚠ {e}"


def sweep_choices(sweeps: SweepManager, sent: list | None) -> tuple:
    """(the chooser's sweeps, what it lists now): sent only when they changed, not on every tick."""
    ids = [s.sweep_id for s in sweeps.sweeps()]
    return (gr.skip(), sent) if ids == sent else (gr.update(choices=ids), ids)


def stored_choice(sweeps: SweepManager, stored: str) -> dict:
    """The chooser on a page load: the sweep the browser had, if it is still there (deleted elsewhere: none)."""
    ids = [s.sweep_id for s in sweeps.sweeps()]
    return gr.update(choices=ids, value=stored if stored in ids else None)


def table_rows(rows: list[dict]) -> list[list]:
    def state_text(r):  # "pruned at step 2: …", not "pruned: pruned at …"
        return r["message"] if r["message"].startswith(r["state"]) else r["state"] + (
            f": {r['message']}" if r["message"] else "")

    return [[r["rank"] if r["rank"] is not None else "", r["name"], params_text(r["params"]), state_text(r),
             r["group"], r["step"] if r["step"] is not None else "",
             f"{r['held_out']:.4g} @ {r['held_at']}" if r["held_out"] is not None else ""] for r in rows]


def empty_plot() -> pd.DataFrame:
    """No curves: the page's plot takes an empty frame (None has it fail reading its element's width)."""
    return pd.DataFrame([], columns=["trial", "step", "loss"])


def refresh(sweeps: SweepManager, sweep_id: str, view: SweepView | None, action: str = "") -> list:
    """[state line, table, plot, best line, best config, action line, view]: gr.update() (nothing sent) where nothing
    changed. An id that names no sweep here (it comes from the browser's storage) shows none. The action line goes
    once it is stale: when another sweep is shown, or when it said this sweep's state and the state has changed."""
    same = gr.update()
    if not sweep_id:
        return [same] * 6 + [None]
    fresh, action = view is None or view.sweep_id != sweep_id, action or ""  # an empty Markdown gives None
    try:
        view = sweeps.view(sweep_id) if fresh else view
        info, state = sweeps.info(sweep_id), view.read()
    except (ValueError, OSError) as e:
        return [NOT_CHOSEN if isinstance(e, NoSweep) else f"⚠ {e}", [], empty_plot(), "", "", same, None]  # a tick
        # sent before a Delete landed leaves the action line ("Deleted …") alone
    stale = fresh or (action.startswith(f"{info.sweep_id}: ") and action != info.summary())
    rows = view.trials(state)
    done = sum(r["state"] in sweep.FINAL for r in rows)
    line = (f"**{info.sweep_id}**: {info.state}" + (f" ({info.message})" if info.message else "")
            + f" · {done} / {state['trials_wanted']} trial(s) ended · {state['search']} search, "
            f"{state['parallel']} trained together, prune {state['prune']}")
    best = (state.get("best") or "").split("/")[0]
    params = next((r["params"] for r in rows if r["name"] == best), {})
    best_line = f"Best: **{best}** ({params_text(params)})" if best else "No trial has finished yet."
    return [line if view.changed("state", line) else same,
            table_rows(rows) if view.changed("table", table_rows(rows)) else same,
            plot_update(view),
            best_line if view.changed("best", best_line) else same,
            text if view.changed("config", text := view.best_config(state)) else same,
            "" if stale and action else same,
            view]


def plot_update(view: SweepView) -> dict:
    """The curves when they changed; the trials in the legend one tick after they first come in the data. The
    page's plot only swaps in new data, keeping the trials (colours) it had when it was last drawn whole, so it
    draws no curve for a new trial; a new legend has it drawn whole again, with the data it holds by then."""
    curves = view.curves()
    update = {"value": pd.DataFrame(curves, columns=["trial", "step", "loss"])} if view.changed("plot", curves) else {}
    legend = view.shown.get("trials")  # the trials in the data the page held before this tick
    view.shown["trials"] = sorted({c["trial"] for c in curves})
    if legend is not None and view.changed("legend", legend):
        update["colors_in_legend"] = legend
    return gr.update(**update)


def cancel(sweeps: SweepManager, sweep_id: str) -> str:
    """The sweep's state after the cancel (the action line, cleared by `refresh` once that state has changed);
    for a sweep that is neither queued nor running, that there is nothing to cancel."""
    try:
        if not sweep_id:
            return CHOOSE_FIRST
        state = sweeps.info(sweep_id).state
        if state in NOTHING_TO_CANCEL:
            return f"Nothing to cancel: {NOTHING_TO_CANCEL[state]}."
        return sweeps.cancel(sweep_id).summary()
    except ValueError as e:
        return f"⚠ {e}"


def on_choose(sweep_id: str) -> list:
    """[the page's sweep id, its view (made anew by the next tick), the armed sweep, the Delete button] for a newly
    chosen sweep (or none): a Delete asked about another sweep is put back."""
    return [sweep_id or "", None, *confirm.disarmed(DELETE)]


def delete(sweeps: SweepManager, sweep_id: str, armed: str = "") -> list:
    """Delete the chosen sweep and its trials (not a queued or running one), asked twice: [message, the sweeps'
    chooser, the page's state line, table, plot, best line, best config, the page's sweep id, its view, the armed
    sweep, the Delete button]. The first click says what goes and arms the button; a second one deletes."""
    kept = [gr.update()] * 8
    if not sweep_id:
        return [CHOOSE_FIRST, *kept, *confirm.disarmed(DELETE)]
    try:
        info = sweeps.deletable(sweep_id)
        go, armed, button = confirm.ask_twice(DELETE, armed, sweep_id)
        if not go:
            return [what_goes(info), *kept, armed, button]
        sweeps.delete(sweep_id)
    except (ValueError, OSError) as e:
        return [f"⚠ {e}", *kept, *confirm.disarmed(DELETE)]
    return [f"Deleted {sweep_id} and its trials.", gr.update(choices=[s.sweep_id for s in sweeps.sweeps()],
                                                              value=None),
            NOT_CHOSEN, [], empty_plot(), "", "", "", None, armed, button]


def what_goes(info: SweepInfo) -> str:
    trials = len(sweep.read(info.path)["trials"])
    return (f"Deleting **{info.sweep_id}** removes its folder ({confirm.folder_mb(info.path):.1f} MB): the sweep and its {trials} trial(s), "
            "with their saved LoRA files, samples and resumable state (a full run started from a trial is a run "
            "of its own and stays). Click the button again to delete it for good.")


def resume(sweeps: SweepManager, sweep_id: str) -> str:
    try:
        return sweeps.resume(sweep_id).summary() if sweep_id else CHOOSE_FIRST
    except ValueError as e:
        return f"⚠ {e}"


def full_run(sweeps: SweepManager, jobs: JobManager, sweep_id: str) -> list:
    """Queue the best trial's config.toml as an ordinary run (its pictures copied like the Train tab's):
    [message, the Monitor's run, its view]."""
    try:
        if not sweep_id:
            raise ValueError(CHOOSE_FIRST)
        best = sweep.read(sweeps.folder(sweep_id)).get("best")
        if not best:
            raise ValueError(f"{sweep_id} has no finished trial yet")
        trial = sweeps.trial(sweep_id, best.split("/")[0])
        cfg = config.load(trial.config)
        run = jobs.create(cfg, Path(cfg.data.train_data_dir))
    except (config.ConfigError, ValueError, OSError) as e:
        return [f"⚠ {e}", gr.update(), gr.update()]
    return [f"Queued **{run.run_id}**: {trial.id}'s config as a full run (open it in the Monitor).", run.run_id,
            None]


def compare_best(sweeps: SweepManager, jobs: JobManager, sweep_id: str, count: int = 3) -> list:
    """The best `count` trials with a saved file chosen in the Compare tab (each trial's final file ticked there):
    [Compare's run chooser, tab switch, message]."""
    from ui import compare_tab

    try:
        if not sweep_id:
            raise ValueError(CHOOSE_FIRST)
        state = sweep.read(sweeps.folder(sweep_id))
        names = [f"{sweep_id}/{n}" for n in SweepView(sweep_id, sweeps.folder(sweep_id)).best_trials(state, 99)
                 if final_file(sweeps.trial(sweep_id, n)) is not None][:count]
        if not names:
            raise ValueError(f"{sweep_id}: no ranked trial has a saved file yet")
    except (ValueError, OSError) as e:
        return [gr.update(), gr.update(), f"⚠ {e}"]
    return [compare_tab.run_choices(jobs, names), gr.Tabs(selected="compare"),
            f"Comparing {', '.join(names)}."]
