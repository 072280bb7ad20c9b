"""The Gradio app: Dataset -> Train -> Monitor -> Runs, and Compare. No training code runs here (DESIGN §1).

Handlers are thin: they turn form values into calls on the JobManager, `trainer.config` and `datasets_tools`,
and every component a test clicks has an elem_id "<tab>-<field>".
"""

from __future__ import annotations

import secrets
import threading
from functools import partial
from pathlib import Path

import gradio as gr

from ui import api, compare_tab, dataset_tab, monitor_tab, runs_tab, security, sweep_tab, train_tab
from ui.compares import CompareManager, free_gpu
from ui.jobs import JobManager
from ui.sweeps import SweepManager

NO_FOLDER = "(none)"  # the dataset a page remembers after Start over (the browser keeps no empty value)
# given to launch(): Gradio 6 takes a page's CSS there (launch resets Blocks.css)
CSS = """
.field-error input, .field-error textarea { border-color: #d33 !important; }
.field-error .info, .field-error span[data-testid="block-info"] + div { color: #d33; }
.downloads .label-clear-button { display: none; }  /* a list of files to download: nothing to remove */
"""
# run once as the page loads: a caption typed and not saved has the browser ask before the page is left or reloaded
# (Enter, Save caption, another picture and another tab save it; Apply to all and Start over rewrite the box)
KEEP_TYPED = """() => {
  let typed = false;
  const inside = (e, where) => e.target instanceof Element && e.target.closest(where) !== null;
  document.addEventListener("input", (e) => { if (inside(e, "#dataset-caption")) typed = true; }, true);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && inside(e, "#dataset-caption")) typed = false;
  }, true);
  document.addEventListener("click", (e) => {
    const saved = "#dataset-save-caption, #dataset-gallery, #dataset-apply-trigger, #dataset-clear, [role=tab]";
    if (inside(e, saved)) typed = false;
  }, true);
  window.addEventListener("beforeunload", (e) => { if (typed) { e.preventDefault(); e.returnValue = ""; } });
}"""
INTRO = """# LoRA Studio
Train a LoRA (SD 1.x, SD 2.x, SDXL, SD 3.5, FLUX.1) from a handful of pictures: **Dataset** → **Train** →
**Monitor** → **Runs**, then **Compare** the files; a **Sweep** (Train tab) trains variations together and ranks
them. The built-in *demo* model trains in a minute or two on any CPU so you can see every part work; for real LoRAs
put a checkpoint in the models folder."""


def build_app(runs_dir: Path, models_dir: Path, jobs: JobManager | None = None,
              compares: CompareManager | None = None, sweeps: SweepManager | None = None) -> gr.Blocks:
    jobs = jobs or JobManager(runs_dir)
    jobs.start_background()
    compares = compares or CompareManager(Path(runs_dir) / ".compares", free_device=free_gpu(jobs))
    compares.start_background()
    sweeps = sweeps or SweepManager(Path(runs_dir), free_device=free_gpu(jobs))
    sweeps.start_background()
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown(INTRO, elem_id="intro")
        dataset_dir = gr.State("")
        # the Monitor's run survives a reload of the page; each view keeps its own cursor into the events
        current_run = gr.BrowserState("", storage_key="lora-studio-run", secret=browser_secret(Path(runs_dir)))
        view = gr.State(None)
        pages = {}  # the tabs a reload opens again (Compare fills its form when clicked open, so it is not one)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset") as pages["dataset"]:
                ds = dataset_tab.build(Path(runs_dir) / ".datasets", dataset_dir)
            with gr.Tab("Train", id="train", elem_id="tab-train") as pages["train"]:
                train = train_tab.build(Path(models_dir))
                sweep_form = sweep_tab.build_form()
            with gr.Tab("Monitor", id="monitor", elem_id="tab-monitor") as pages["monitor"]:
                monitor = monitor_tab.build()
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as pages["runs"]:
                runs = runs_tab.build(Path(runs_dir) / ".resized")
            with gr.Tab("Sweeps", id="sweeps", elem_id="tab-sweeps") as pages["sweeps"]:
                sweeps_page = sweep_tab.build()
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_page:
                compare = compare_tab.build(Path(models_dir))
        ticks = []  # (handler, inputs, outputs) of everything redrawn each second: one request for them all
        opened = reopened_tab(demo, tabs, pages, compare_page, browser_secret(Path(runs_dir)))
        bind_dataset(ds, train, dataset_dir, [page for tab_id, page in pages.items() if tab_id != "dataset"]
                     + [compare_page])
        # the page's pictures survive a reload: the folder is remembered in the browser and checked when read back
        remembered = gr.BrowserState("", storage_key="lora-studio-dataset", secret=browser_secret(Path(runs_dir)))
        dataset_dir.change(lambda folder: folder or NO_FOLDER, dataset_dir, remembered)  # "" would not be stored
        demo.load(partial(dataset_tab.restore, Path(runs_dir) / ".datasets"), remembered,
                  [*ds.shown(dataset_dir), ds.trigger, ds.applied])
        bind_train(demo, jobs, train, ds, dataset_dir, tabs, current_run, view, browser_secret(Path(runs_dir)),
                   opened, pages["train"])
        ticks.append((partial(monitor_tab.refresh, jobs), [current_run, view], [*monitor.outputs(), view]))
        # both answer gr.update(), leaving the heading to the refresh; a toast says what came of the click
        monitor.cancel.click(partial(monitor_tab.cancel, jobs), current_run, monitor.title, show_progress="hidden")
        monitor.resume.click(partial(monitor_tab.resume, jobs), current_run, monitor.title, show_progress="hidden")
        bind_runs(jobs, runs, ticks, tabs, current_run, view)
        bind_compare(jobs, compares, compare, compare_page, runs, ticks, tabs, browser_secret(Path(runs_dir)))
        bind_sweeps(jobs, sweeps, train, sweep_form, sweeps_page, compare, ds, dataset_dir, ticks, tabs, current_run,
                    view, demo, browser_secret(Path(runs_dir)))
        every_second(gr.Timer(1.0), ticks)
        api.register(jobs, compares, sweeps)
    security.close_api(demo)  # a client reaches the documented routes; the page's own handlers stay private
    return demo


def every_second(timer: gr.Timer, ticks: list) -> None:
    """One request a second redraws every live part of the page (the Monitor, Runs, Compare, Sweeps): one tick event
    each kept the browser too busy to type in (~4 s a keystroke on a 2-core machine). Each handler answers its own
    outputs, gr.update() or gr.skip() where nothing changed, and no spinner shows."""
    inputs = [c for _, ins, _ in ticks for c in ins]
    outputs = [c for _, _, outs in ticks for c in outs]
    assert len(set(map(id, outputs))) == len(outputs), "a component redrawn by two handlers"

    def tick(*values):
        answers, at = [], 0
        for handler, ins, outs in ticks:
            answer = list(handler(*values[at:at + len(ins)]))
            if len(answer) != len(outs):  # it would shift every later handler's answers onto the wrong parts
                raise RuntimeError(f"{handler} answered {len(answer)} values for its {len(outs)} outputs")
            answers.extend(answer)
            at += len(ins)
        return answers

    timer.tick(tick, inputs, outputs, show_progress="hidden")


def reopened_tab(demo, tabs, pages: dict, compare_page, secret: str) -> gr.BrowserState:
    """A reload opens the tab that was open (QA: it always opened Dataset, also mid-run), but Compare, which fills its
    form when clicked open; answers the state that keeps its id, for the handlers that switch tabs themselves."""
    opened = gr.BrowserState("dataset", storage_key="lora-studio-tab", secret=secret)  # an app restart reads it
    for tab_id, page in [*pages.items(), ("compare", compare_page)]:
        page.select(lambda tab_id=tab_id: tab_id, None, opened, show_progress="hidden")
    # the page opens on Dataset by itself: sending it again could undo a tab clicked while the page loads
    demo.load(lambda tab_id: gr.Tabs(selected=tab_id) if tab_id in pages and tab_id != "dataset" else gr.update(),
              opened, tabs)
    return opened


def bind_dataset(ds, train, dataset_dir, other_tabs: list) -> None:
    """The Dataset tab's crop preview and health report use the Train tab's resolution and batch size; a caption
    typed and not saved is saved when another tab is clicked open."""
    for page in other_tabs:
        page.select(dataset_tab.on_leave, [dataset_dir, ds.selected, ds.caption], ds.shown(dataset_dir),
                    show_progress="hidden")
    f = train.fields
    buckets = [f["resolution"], f["min_bucket_reso"], f["max_bucket_reso"]]
    ds.gallery.select(dataset_tab.selection, [dataset_dir, ds.selected, ds.caption, *buckets, f["bucket_no_upscale"]],
                      [ds.selected, ds.caption, ds.crop, ds.report, ds.gallery])
    ds.check.click(dataset_tab.health_markdown, [dataset_dir, *buckets, f["train_batch_size"], f["max_token_length"]],
                   ds.health)


def bind_train(demo, jobs, train, ds, dataset_dir, tabs, current_run, view, secret: str, opened, page) -> None:
    refill = [*train.form(), train.preset_info]
    # the form survives a reload: kept in the browser after each edit and each refill, put back when the page loads
    saved = gr.BrowserState({}, storage_key="lora-studio-train-form", secret=secret)
    whole = [train.base, train.preset, *train.form()]
    quiet = {"show_progress": "hidden", "trigger_mode": "always_last"}
    length = {"fn": train_tab.on_length, "inputs": [train.base, train.preset, dataset_dir, ds.trigger, *train.form()],
              "outputs": train.length, **quiet}
    refilled_for = gr.State("")  # the base family the form was last filled from its preset for
    demo.load(train_tab.on_page_load, [saved, train.preset, train.base],
              [train.base, train.preset, *refill, refilled_for]).then(**length)
    # a click on a preset refills the form (keeping the parts typed); the page's own restore sets it without one
    train.preset.input(train_tab.on_preset_click, [train.preset, train.base, *train.form()], refill).then(
        train_tab.remembered, whole, saved, **quiet).then(**length)
    train.preset.input(lambda: "", None, train.kohya_info)  # the refill replaces what was imported
    train.base.change(train_tab.on_base, [train.preset, train.base, refilled_for], [*refill, refilled_for]).then(
        train_tab.remembered, whole, saved, **quiet).then(**length)
    for event in (train.base.change, demo.load):  # a new base: its parts pre-filled from beside it
        event(train_tab.on_base_parts, train.base, [train.parts, train.parts_info, train.fields["clip_g"]])
    train.base.change(train_tab.explain_base, train.base, train.base_info)
    train.kohya.upload(train_tab.on_import, [train.kohya, train.base, train.preset, *train.form()],
                       [*train.form(), train.kohya_info]).then(train_tab.remembered, whole, saved, **quiet).then(
        **length)
    page.select(**length)  # the pictures may have changed on the Dataset tab
    for name in train_tab.PLAN_FIELDS:
        train.fields[name].input(**length)
    for name in train_tab.FIELDS:  # one request an edit: the field's mark and the refusal go, the form is kept
        field = train.fields[name]
        field.input(partial(train_tab.on_edit, name), [train.status, *whole], [field, saved, train.status], **quiet)
    train.start.click(partial(train_tab.on_train, jobs), [train.base, train.preset, dataset_dir, ds.trigger,
                                                          *train.form()],
                      [*train.form(), train.status, tabs, current_run, view]).then(
        lambda said: "monitor" if said.startswith("Queued") else gr.update(), train.status, opened)


def bind_runs(jobs, runs, ticks: list, tabs, current_run, view) -> None:
    views, reading = {}, threading.Lock()  # every page's table from one set of run views, read one tick at a time

    def refresh_table(sent):
        """Sent only when it changed: a table redrawn each second kept the page too busy to type in."""
        with reading:
            rows, ids = runs_tab.table(jobs, views)
        if (rows, ids) == sent:
            return gr.skip(), gr.skip(), sent
        return rows, gr.update(choices=ids), (rows, ids)

    sent = gr.State(None)  # what this page's table shows
    ticks.append((refresh_table, [sent], [runs.table, runs.chosen, sent]))
    runs.table.select(runs_tab.on_select, None, runs.chosen)
    runs.chosen.change(partial(runs_tab.on_choose, jobs), runs.chosen,
                       [runs.files, runs.best, runs.status, runs.armed, runs.delete, runs.resize_saved, runs.cancel,
                        runs.resume])
    runs.open.click(lambda r: (r, None, gr.Tabs(selected="monitor"), "") if r
                    else (gr.update(), gr.update(), gr.update(), runs_tab.CHOOSE_FIRST),
                    runs.chosen, [current_run, view, tabs, runs.status])
    for button, act in ((runs.cancel, runs_tab.cancel), (runs.resume, runs_tab.resume)):
        button.click(partial(act, jobs), runs.chosen, runs.status).then(
            partial(runs_tab.run_buttons, jobs), runs.chosen, [runs.cancel, runs.resume])
    runs.delete.click(partial(runs_tab.delete, jobs), [runs.chosen, current_run, runs.armed],
                      [runs.status, current_run, runs.files, runs.best, runs.armed, runs.delete, runs.chosen])


def bind_compare(jobs, compares, compare, compare_page, runs, ticks: list, tabs, secret: str) -> None:
    # the page's compare survives a reload like the Monitor's run; each view keeps its own cursor into the events
    compare_id = gr.BrowserState("", storage_key="lora-studio-compare", secret=secret)
    view, suggested_by = gr.State(None), gr.State("")  # suggested_by: the run the form's settings came from
    memory = gr.State(None)  # the files listed and every tick so far (compare_tab.choose_runs)
    restored = gr.State(False)  # the form is put back once after a reload, when the tab is first opened
    compare_page.select(partial(compare_tab.open_tab, compares, jobs), [compare_id, compare.runs, restored],
                        [compare.runs, compare.files, suggested_by, memory, compare.status, *compare.form(), restored])
    runs.compare.click(lambda r: (compare_tab.run_choices(jobs, r), gr.Tabs(selected="compare"), "") if r
                       else (gr.update(), gr.update(), runs_tab.CHOOSE_FIRST), runs.chosen,
                       [compare.runs, tabs, runs.status])
    compare.runs.change(partial(compare_tab.choose_runs, jobs), [compare.runs, suggested_by, memory],
                        [compare.files, compare.run_info, suggested_by,
                         *[compare.fields[n] for n in compare_tab.SUGGESTED], memory])
    compare.files.input(compare_tab.remember_ticks, [compare.files, memory], memory)
    compare.start.click(partial(compare_tab.on_compare, compares, jobs),
                        [compare.runs, compare.files, compare.upload, *compare.form()],
                        [compare.status, compare_id, view])
    compare.cancel.click(partial(compare_tab.cancel, compares), compare_id, compare.status)
    ticks.append((partial(compare_tab.refresh, compares), [compare_id, view], [*compare.outputs(), view]))


def bind_sweeps(jobs, sweeps, train, form, page, compare, ds, dataset_dir, ticks: list, tabs, current_run, view, demo,
                secret: str) -> None:
    # the page's sweep survives a reload like the Monitor's run; each view keeps its own cursors into the events
    sweep_id = gr.BrowserState("", storage_key="lora-studio-sweep", secret=secret)
    sweep_view = gr.State(None)
    form.start.click(partial(sweep_tab.on_start_sweep, sweeps),
                     [train.base, train.preset, dataset_dir, ds.trigger, *train.form(), *form.form()],
                     [*train.form(), form.status, tabs, sweep_id, page.chosen])
    demo.load(partial(sweep_tab.stored_choice, sweeps), sweep_id, page.chosen)
    page.chosen.change(sweep_tab.on_choose, page.chosen, [sweep_id, sweep_view, page.armed, page.delete])
    page.chosen.change(lambda: ("", gr.update(value=sweep_tab.STOP, interactive=False)), None, [page.trial, page.stop])
    page.table.select(sweep_tab.on_select_trial, None, [page.trial, page.stop])
    page.stop.click(partial(sweep_tab.stop_trial, sweeps), [sweep_id, page.trial], page.action)
    listed = gr.State(None)  # the sweeps this page's chooser lists
    ticks.append((partial(sweep_tab.sweep_choices, sweeps), [listed], [page.chosen, listed]))
    ticks.append((partial(sweep_tab.refresh, sweeps), [sweep_id, sweep_view, page.action],
                  [*page.outputs(), page.action, sweep_view]))
    page.cancel.click(partial(sweep_tab.cancel, sweeps), sweep_id, page.action)
    page.resume.click(partial(sweep_tab.resume, sweeps), sweep_id, page.action)
    page.delete.click(partial(sweep_tab.delete, sweeps), [sweep_id, page.armed],
                      [page.action, page.chosen, *page.outputs(), sweep_id, sweep_view, page.armed, page.delete])
    page.full_run.click(partial(sweep_tab.full_run, sweeps, jobs), sweep_id, [page.action, current_run, view])
    page.compare.click(partial(sweep_tab.compare_best, sweeps, jobs), sweep_id, [compare.runs, tabs, page.action])


def browser_secret(runs_dir: Path) -> str:
    """The key the browser's stored state is sealed with, kept in the runs folder so it outlives an app restart."""
    path = runs_dir / ".browser-secret"
    if not path.is_file():
        runs_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()
