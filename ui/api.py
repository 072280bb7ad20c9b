"""The same jobs for scripts, through the Gradio API (`gradio_client`): create, status, cancel, resume, files; and
compares: compare_start, compare_status, compare_cancel; sweeps: sweep_start, sweep_status, sweep_cancel."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from datasets_tools import dataset_folder
from trainer import compare_spec, config, sweep
from trainer.single_file import family_of
from ui.compares import CompareManager, spec_of, upload_label
from ui.jobs import JobManager
from ui.sweeps import SweepManager, api_space

# set by create_run's own arguments (preset, base, images, trigger) or by the preset: never through `settings`
RESERVED = ("preset", "family", "description", "pretrained_model_name_or_path", "train_data_dir", "trigger_word")


def checked_settings(settings) -> dict:
    """The `settings` a script may give: a dict of training settings by kohya name, flat or by section."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise gr.Error(f"settings: expected a dict of kohya names, got {type(settings).__name__}")
    keys = set(settings)
    for section in keys & set(config.SECTIONS):
        keys |= set(settings[section]) if isinstance(settings[section], dict) else set()
    if bad := sorted(keys & set(RESERVED)):
        raise gr.Error(f"settings: {', '.join(bad)} cannot be set here; use create_run's preset, base, images "
                       "and trigger arguments")
    return dict(settings)


def checked_preset(preset) -> str:
    if preset not in config.list_presets():
        raise gr.Error(f"unknown preset {preset!r}; choose one of: {', '.join(config.list_presets())}")
    return preset


def checked_compare_settings(settings) -> dict:
    """The `settings` of compare_start: the base and the compare settings (prompts, strengths, seeds, ...)."""
    if settings is None:
        return {}
    allowed = ("base", *compare_spec.SETTINGS)
    if not isinstance(settings, dict):
        raise gr.Error(f"settings: expected a dict of {', '.join(allowed)}, got {type(settings).__name__}")
    if bad := sorted(set(settings) - set(allowed)):
        raise gr.Error(f"settings: {', '.join(bad)} cannot be set; a compare takes {', '.join(allowed)}")
    return dict(settings)


def run_ids_of(run_id) -> list[str]:
    """compare_start's `run_id`: None, one run id or a list of them (each checked by run_of)."""
    if run_id in (None, "", []):
        return []
    ids = run_id if isinstance(run_id, list) else [run_id]
    if not all(isinstance(r, str) and r for r in ids):
        raise gr.Error(f"run_id: expected a run id or a list of run ids, got {run_id!r}")
    if len(set(ids)) < len(ids):
        raise gr.Error(f"run_id: a run is named twice in {ids!r}")
    return ids


def path_of(upload) -> Path:
    return Path(upload["path"] if isinstance(upload, dict) else upload.path)


def from_pictures(folder: Path, images, preset: str, base: str, settings, trigger: str) -> tuple:
    """(the run config, what was imported) for pictures put into `folder` with a preset, base and settings."""
    preset, settings = checked_preset(preset), checked_settings(settings)
    result = dataset_folder.add_files([path_of(f) for f in images or []], folder)
    if not result.added:
        raise gr.Error("no readable pictures: " + "; ".join(f"{n}: {r}" for n, r in result.skipped))
    if trigger:
        dataset_folder.apply_trigger(folder, trigger)
    try:
        layer = settings | {"pretrained_model_name_or_path": base, "trigger_word": trigger,
                            "train_data_dir": str(folder)}
        cfg = config.build(preset, family_of(base), layer)
    except config.ConfigError as e:
        raise gr.Error(str(e)) from None
    return cfg, {"added": len(result.added), "skipped": [list(s) for s in result.skipped],
                 "notes": [list(n) for n in result.notes]}


def register(jobs: JobManager, compares: CompareManager, sweeps: SweepManager) -> None:
    """Add the endpoints to the Blocks being built."""

    def create_run(images: list[FileData], preset: str = "character", base: str = "demo",
                   settings: dict | None = None, trigger: str = "") -> dict:
        """Make a run from pictures (with .txt captions alongside, optional), a preset, a base model and
        settings by kohya name ({"network_dim": 8, ...}); it is queued at once. Returns its status, with how many
        pictures were added and which files were skipped (name, reason) or cut (notes)."""
        with tempfile.TemporaryDirectory() as tmp:
            cfg, imported = from_pictures(Path(tmp), images, preset, base, settings, trigger)
            try:
                run = jobs.create(cfg, Path(tmp))
            except config.ConfigError as e:
                raise gr.Error(str(e)) from None
            return status(run.run_id) | imported

    def run_of(run_id) -> str:
        """`run_id` if it names a run in the runs folder; else the error a script sees."""
        try:
            if (jobs.run_dir(run_id).path / "config.toml").is_file():
                return run_id
        except ValueError as e:
            raise gr.Error(str(e)) from None
        raise gr.Error(f"no run {run_id!r}; /list_runs gives the run ids")

    def status(run_id: str) -> dict:
        """State (queued, running, done, failed, cancelled, interrupted), message and the last step's numbers."""
        info = jobs.info(run_of(run_id))
        from trainer.events import read_all

        steps = [e for e in read_all(info.path) if e["type"] == "step"]
        last = steps[-1] if steps else {}
        return {"run_id": run_id, "state": info.state, "message": info.message, "step": last.get("step", 0),
                "total_steps": last.get("total_steps"), "loss": last.get("loss")}

    def cancel(run_id: str) -> dict:
        """Stop a run: it saves a resumable state and exits."""
        jobs.cancel(run_of(run_id))
        return status(run_id)

    def resume(run_id: str) -> dict:
        """Queue a cancelled, interrupted or failed run again; it continues from its last state."""
        try:
            jobs.resume(run_of(run_id))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return status(run_id)

    def list_runs() -> dict:
        """{"runs": every run, newest first, then the sweeps' trials ("<sweep id>/<trial>")}."""
        return {"runs": [{"run_id": r.run_id, "state": r.state, "message": r.message} for r in jobs.listed()]}

    def files(run_id: str) -> list[FileData]:
        """The run's .safetensors files (one per saved epoch and the final) and its config.toml."""
        return [FileData(path=str(p)) for p in jobs.files(run_of(run_id)) if p.is_file()]

    for fn in (create_run, status, cancel, resume, list_runs, files):
        gr.api(fn, api_name=fn.__name__)
    register_compares(jobs, compares, run_of)
    register_sweeps(jobs, sweeps, run_of)


def register_compares(jobs: JobManager, compares: CompareManager, run_of) -> None:
    def compare_start(run_id: str | list[str] | None = None, files: list[FileData] | None = None,
                      settings: dict | None = None) -> dict:
        """Compare the saved files (all of them) of a run, or of several runs on the same base (a list of run
        ids), and/or uploaded .safetensors `files` × strengths × prompts × seeds on one loaded base. `settings`:
        base (default: the first run's), prompts (a list), strengths, seeds, steps, sampler, cfg_scale, width,
        height, negative, clip_skip, precision; the first run's sample settings fill in what is not given. It is
        queued at once; returns compare_status."""
        settings = checked_compare_settings(settings)
        runs = [jobs.run_dir(run_of(r)) for r in run_ids_of(run_id)]
        uploads = [(path_of(f), upload_label(path_of(f))) for f in files or []]
        try:
            info = compares.start(spec_of(runs, None, settings), uploads)
        except compare_spec.CompareError as e:
            raise gr.Error(str(e)) from None
        return compare_status(info.compare_id)

    def compare_of(compare_id):
        try:
            return compares.info(compare_id)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def compare_status(compare_id: str, pictures: bool = False) -> dict:
        """State (queued, running, done, failed, cancelled), message, progress; the cells drawn so far (file,
        label, strength, prompt, seed, picture: its name, or with pictures=True the PNG itself, downloaded), each
        file's label, held-out loss and problem; grid.png (downloaded) once done."""
        info = compare_of(compare_id)
        view = compares.view(compare_id)
        view.read()
        drawn = view.status()
        cells = [c | {"picture": FileData(path=str(view.folder / c["picture"]))} for c in drawn["cells"]] \
            if pictures else drawn["cells"]
        return {"compare_id": compare_id, "state": info.state, "message": info.message,
                "progress": view.progress_text()} | drawn | {
            "cells": cells, "grid": FileData(path=drawn["grid"]) if drawn["grid"] else None}

    def compare_cancel(compare_id: str) -> dict:
        """Stop a compare after its current cell (a second cancel kills it); the cells drawn are kept."""
        compare_of(compare_id)
        compares.cancel(compare_id)
        return compare_status(compare_id)

    for fn in (compare_start, compare_status, compare_cancel):
        gr.api(fn, api_name=fn.__name__)


def register_sweeps(jobs: JobManager, sweeps: SweepManager, run_of) -> None:
    def sweep_start(settings: dict | None = None, space: dict | None = None, search: str = "grid", trials: int = 0,
                    parallel: int = 0, prune: str = "none", run_id: str | None = None,
                    images: list[FileData] | None = None, preset: str = "character", base: str = "demo",
                    trigger: str = "") -> dict:
        """A sweep (issue #16) from a run, `run_id`'s config and pictures, or from `images` with a preset and base as
        create_run takes them; `settings` by kohya name on top, over `space` {field: [v1, v2] or
        "low:high[:log]"}; search grid | random | tpe (random and tpe take `trials`), `parallel` trials trained
        together (0 = all), prune none | halving | median. It is queued at once; returns sweep_status (with what
        was imported, from images). Errors name the field."""
        if bool(run_id) == bool(images):
            raise gr.Error("run_id / images: give the run whose config and pictures the sweep starts from "
                           "(/list_runs), or pictures with a preset and base, not both")
        if images:
            with tempfile.TemporaryDirectory() as tmp:
                cfg, imported = from_pictures(Path(tmp), images, preset, base, None, trigger)
                return queue_sweep(cfg, Path(tmp), settings, space, search, trials, parallel, prune) | imported
        run = jobs.run_dir(run_of(run_id))
        try:
            cfg = config.load(run.config)
        except (config.ConfigError, OSError) as e:
            raise gr.Error(str(e)) from None
        return queue_sweep(cfg, run.dataset, settings, space, search, trials, parallel, prune)

    def queue_sweep(cfg, pictures: Path, settings, space, search, trials, parallel, prune) -> dict:
        try:
            cfg = config.from_dict(config.deep_merge(config.to_dict(cfg), checked_settings(settings)))
            info = sweeps.create(cfg, pictures, api_space(space), search, trials, parallel, prune)
        except (config.ConfigError, ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        return sweep_status(info.sweep_id)

    def sweep_status(sweep_id: str) -> dict:
        """State (queued, running, done, failed, cancelled, interrupted), message; every trial (name, params,
        state, message, group, step, held_out, rank), the best trial and its config.toml, and the ranked table as
        text."""
        try:
            info, view = sweeps.info(sweep_id), sweeps.view(sweep_id)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        state = view.read()
        best = (state.get("best") or "").split("/")[0] or None
        return {"sweep_id": sweep_id, "state": info.state, "message": info.message,
                "trials_wanted": state["trials_wanted"], "trials": view.trials(state), "best": best,
                "best_config": view.best_config(state) or None, "table": sweep.table(state)}

    def sweep_cancel(sweep_id: str) -> dict:
        """Stop a sweep: every unfinished trial saves a resumable state (a second cancel kills it)."""
        try:
            sweeps.cancel(sweep_id)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return sweep_status(sweep_id)

    for fn in (sweep_start, sweep_status, sweep_cancel):
        gr.api(fn, api_name=fn.__name__)
