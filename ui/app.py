"""The Gradio app: Dataset -> Train -> Monitor -> Runs. No training code runs here (DESIGN §1).

Handlers are thin: they turn form values into calls on the JobManager, `trainer.config` and `datasets_tools`,
and every component a test clicks has an elem_id "<tab>-<field>".
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from trainer import config
from ui import api, dataset_tab, resize_tool, train_tab
from ui.jobs import JobManager
from ui.monitor import RunView

CSS = """
.field-error input, .field-error textarea { border-color: #d33 !important; }
.field-error .info, .field-error span[data-testid="block-info"] + div { color: #d33; }
"""
INTRO = """# LoRA Studio
Train a Stable Diffusion LoRA (SD 1.x, SD 2.x, SDXL) from a handful of pictures: **Dataset** → **Train** →
**Monitor** → **Runs**. The built-in *demo* model trains in a minute on any CPU so you can see every part work;
for real LoRAs put a checkpoint in the models folder."""


def build_app(runs_dir: Path, models_dir: Path, jobs: JobManager | None = None) -> gr.Blocks:
    jobs = jobs or JobManager(runs_dir)
    jobs.start_background()
    drafts = Path(runs_dir) / ".datasets"
    field_names = train_tab.MAIN_FIELDS + train_tab.ADVANCED_FIELDS
    defaults = train_tab.flat_preset("character", "sd15", "demo")

    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown(INTRO, elem_id="intro")
        dataset_dir = gr.State("")
        current_run = gr.State("")
        view = gr.State(None)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                ds = dataset_tab.build(drafts, dataset_dir)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    base = gr.Dropdown(choices=train_tab.base_model_choices(Path(models_dir)), value="demo",
                                       allow_custom_value=True, label="Base model (or type a path / hub id)",
                                       elem_id="train-base", scale=3)
                    preset = gr.Radio(choices=config.list_presets(), value="character", label="Preset",
                                      elem_id="train-preset", scale=2)
                base_info = gr.Markdown(train_tab.explain_base("demo"), elem_id="train-base-info")
                preset_info = gr.Markdown(elem_id="train-preset-info")
                comps = {}
                with gr.Row():
                    for name in train_tab.MAIN_FIELDS[:4]:
                        comps[name] = train_tab.component_for(name, defaults[name])
                with gr.Row():
                    for name in train_tab.MAIN_FIELDS[4:]:
                        comps[name] = train_tab.component_for(name, defaults[name])
                with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                    for start in range(0, len(train_tab.ADVANCED_FIELDS), 4):
                        with gr.Row():
                            for name in train_tab.ADVANCED_FIELDS[start:start + 4]:
                                comps[name] = train_tab.component_for(name, defaults[name])
                start = gr.Button("Train", variant="primary", elem_id="train-start")
                train_status = gr.Markdown(elem_id="train-status")
            with gr.Tab("Monitor", id="monitor", elem_id="tab-monitor"):
                run_title = gr.Markdown("No run selected: start one on the Train tab or open one under Runs.",
                                        elem_id="monitor-title")
                progress = gr.Markdown(elem_id="monitor-progress")
                loss_plot = gr.LinePlot(None, x="step", y="loss",
                                        color="curve", title="Loss", height=280, elem_id="monitor-loss")
                samples = gr.Gallery(label="Samples (rows: steps, columns: prompts)", columns=2, height=360,
                                     elem_id="monitor-samples")
                with gr.Row():
                    cancel = gr.Button("Cancel", variant="stop", elem_id="monitor-cancel")
                    resume = gr.Button("Resume", elem_id="monitor-resume")
                files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="monitor-files")
                log = gr.Textbox(label="Worker log (tail)", lines=10, max_lines=10, autoscroll=True,
                                 elem_id="monitor-log")
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs_table_view = gr.Dataframe(headers=["run", "state", "message"], interactive=False,
                                          elem_id="runs-table")
                with gr.Row():
                    chosen = gr.Dropdown(label="Run", choices=[], elem_id="runs-choose", scale=3)
                    open_btn = gr.Button("Open in Monitor", elem_id="runs-open")
                    delete_btn = gr.Button("Delete", variant="stop", elem_id="runs-delete")
                runs_status = gr.Markdown(elem_id="runs-status")
                run_files = gr.File(label="Files of the chosen run", file_count="multiple", interactive=False,
                                    elem_id="runs-files")
                resize_tool.build(Path(runs_dir) / ".resized")
        timer = gr.Timer(1.0)

        ds.gallery.select(dataset_tab.selection, [dataset_dir, comps["resolution"], comps["min_bucket_reso"],
                                                  comps["max_bucket_reso"], comps["bucket_no_upscale"]],
                          [ds.selected, ds.caption, ds.crop])
        ds.check.click(dataset_tab.health_markdown, [dataset_dir, comps["resolution"], comps["min_bucket_reso"],
                                                      comps["max_bucket_reso"], comps["train_batch_size"]], ds.health)

        # --- Train ---
        def on_preset(preset_name, base_value):
            family = train_tab.family_or_default(base_value)
            values = train_tab.flat_preset(preset_name, family, base_value)
            info = config.preset_dict(preset_name, family).get("description", "")
            return [gr.update(value=train_tab.display_value(n, values[n])) for n in field_names] + [info]

        preset.change(on_preset, [preset, base], [comps[n] for n in field_names] + [preset_info])
        base.change(lambda b: train_tab.explain_base(b), base, base_info)
        base.change(on_preset, [preset, base], [comps[n] for n in field_names] + [preset_info])
        demo.load(on_preset, [preset, base], [comps[n] for n in field_names] + [preset_info])

        def on_train(base_value, preset_name, folder, trigger, *values):
            try:
                cfg = train_tab.build_config(base_value, preset_name, Path(folder) if folder else None,
                                             trigger, field_names, list(values))
                run = jobs.create(cfg, Path(folder) if folder else None)
            except config.ConfigError as e:
                return [*train_tab.field_errors(field_names, e), f"⚠ {e}", gr.update(), "", gr.update()]
            except (ValueError, OSError) as e:
                return [*train_tab.field_errors(field_names, None), f"⚠ {e}", gr.update(), "", gr.update()]
            return [*train_tab.field_errors(field_names, None), f"Queued **{run.run_id}**.",
                    gr.Tabs(selected="monitor"), run.run_id, None]

        start.click(on_train, [base, preset, dataset_dir, ds.trigger, *[comps[n] for n in field_names]],
                    [*[comps[n] for n in field_names], train_status, tabs, current_run, view])

        # --- Monitor ---
        def on_tick(run_id, state):
            if not run_id:
                return [gr.update()] * 6 + [state]
            state = state or RunView()
            state.add(jobs.new_events(run_id))
            info = jobs.info(run_id)
            title = f"### {run_id} — {info.state}" + (f": {info.message}" if info.message else "")
            # the plot starts empty (None): an empty frame would fix its colour scale to the wrong type
            rows = pd.DataFrame(state.loss_rows(), columns=["step", "loss", "curve"]) if state.steps else gr.update()
            gallery = [(str(info.path / p), caption) for p, caption in state.sample_grid()]
            files_now = [str(p) for p in jobs.files(run_id) if p.is_file()]
            files_update = gr.update() if files_now == state.shown_files else files_now  # no re-render
            state.shown_files = files_now
            return [title, state.progress_text(), rows, gr.update(value=gallery, columns=state.prompts_per_step()),
                    files_update, jobs.log_tail(run_id), state]

        timer.tick(on_tick, [current_run, view], [run_title, progress, loss_plot, samples, files, log, view])

        def on_cancel(run_id):
            return jobs.cancel(run_id).summary() if run_id else "No run selected."

        def on_resume(run_id):
            try:
                return jobs.resume(run_id).summary() if run_id else "No run selected."
            except ValueError as e:
                return f"⚠ {e}"

        cancel.click(on_cancel, current_run, train_status).then(lambda s: s, train_status, run_title)
        resume.click(on_resume, current_run, run_title)

        # --- Runs ---
        def runs_table():
            runs = jobs.runs()
            table = [[r.run_id, r.state, r.message] for r in runs]
            return table, gr.update(choices=[r.run_id for r in runs])

        timer.tick(runs_table, None, [runs_table_view, chosen])
        chosen.change(lambda r: [str(p) for p in jobs.files(r) if p.is_file()] if r else None, chosen, run_files)
        open_btn.click(lambda r: (r, None, gr.Tabs(selected="monitor")) if r else ("", None, gr.update()),
                       chosen, [current_run, view, tabs])

        def on_delete(run_id, current):
            try:
                jobs.delete(run_id)
            except (ValueError, FileNotFoundError) as e:
                return f"⚠ {e}", current
            return f"Deleted {run_id}.", ("" if current == run_id else current)

        delete_btn.click(on_delete, [chosen, current_run], [runs_status, current_run])
        api.register(jobs)
    demo.css = CSS
    return demo
