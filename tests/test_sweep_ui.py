"""Sweeps from the app (issue #16): the Train tab's Sweep section, the sweep manager and the Sweeps tab's handlers,
on the real sweep engine and the tiny SD1 model (a 2-trial sweep trains in seconds); cancel and resume with a fake
worker that waits for its SIGTERM."""

from __future__ import annotations

import re
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from tests.test_browser import CHROMIUM, browser, free_port  # noqa: F401
from tests.test_compare_ui import UNCHANGED, fake_python, lora
from tests.test_training import draw_dataset
from trainer import config, sweep
from trainer.config import ConfigError
from trainer.events import EventWriter
from trainer.rundir import RunDir
from ui import compare_tab, monitor_tab, runs_tab, sweep_tab, train_tab
from ui.compares import CompareManager, trial_names
from ui.jobs import JobManager, trial_run
from ui.sweeps import SweepManager, api_space, space_of

ROOT = Path(__file__).resolve().parent.parent
TINY = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1, "max_train_epochs": 1,
        "train_batch_size": 2, "network_dim": 4, "network_alpha": 2, "sample_every_n_epochs": 0,
        "save_every_n_epochs": 0, "validation_split": 0.34, "text_encoder_lr": 0, "validation_every_n_steps": 1}
N = len(train_tab.FIELDS)
FAKE_WORKER = f"""#!{sys.executable}
# Stands in for `python -m trainer sweep FOLDER`: waits while the runs folder holds "hold" (SIGTERM: exit 3, as
# the worker's cancel), says a last word and exits 1 when it holds "crash", else exits 0.
import signal, sys, time
from pathlib import Path
folder = Path(sys.argv[-1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with open(folder.parent / "launches", "a") as f:
    f.write(folder.name + "\\n")
while (folder.parent / "hold").is_file() and not stop:
    time.sleep(0.02)
if stop:
    sys.exit(3)
if (folder.parent / "crash").is_file():
    print("python -m trainer sweep: the base model could not be read")
    sys.exit(1)
"""


def form_values(base: str, **changes) -> list:
    values = train_tab.flat_preset("character", "sd15", base) | TINY | changes
    return [train_tab.display_value(n, values[n]) for n in train_tab.FIELDS]


def sweep_values(*rows, search="grid", trials=0, parallel=0, prune="none") -> list:
    rows = list(rows) + [("", "")] * (sweep_tab.ROWS - len(rows))
    return [x for row in rows for x in row] + [search, trials, parallel, prune]


def start(sweeps, base, pictures, *rows, form=None, **how) -> list:
    return sweep_tab.on_start_sweep(sweeps, base, "character", str(pictures), "zxq",
                                    *(form or form_values(base)), *sweep_values(*rows, **how))


def wait(sweeps: SweepManager, sweep_id: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while (state := sweeps.info(sweep_id).state) in ("queued", "running"):
        assert time.time() < deadline, sweeps.info(sweep_id)
        sweeps.tick()
        time.sleep(0.2)
    return state


def launched(runs: Path, names: list[str]) -> None:
    deadline = time.time() + 10
    while not ((runs / "launches").is_file() and (runs / "launches").read_text().split() == names):
        assert time.time() < deadline
        time.sleep(0.05)


def fake(tmp_path: Path) -> str:
    script = tmp_path / "fake-sweep-python"
    script.write_text(FAKE_WORKER)
    script.chmod(0o755)
    return str(script)


def hand_made_sweep(runs: Path, trials: list[str], name: str = "sweep-1") -> Path:
    """A sweep folder as the engine leaves it (sweep.json, a run directory a trial), no worker needed."""
    folder = runs / name
    folder.mkdir(parents=True)
    entries = [{"name": t, "round": 0, "params": {"unet_lr": 1e-4 * (i + 1)}, "state": "created", "value": None,
                "step": None, "group": "shared", "why_alone": "", "message": ""} for i, t in enumerate(trials)]
    sweep.write(folder, {"version": 1, "id": name, "search": "grid", "trials_wanted": len(trials),
                         "parallel": len(trials), "prune": "none", "trials": entries})
    for t in trials:
        (folder / t).mkdir()
        config.save(config.build("character", "sd15"), folder / t / "config.toml")
    return folder


def held_out(folder: Path, trial: str, steps) -> None:
    for step in steps:
        EventWriter(folder / trial).emit("validation", step=step, epoch=0, loss=1.0 / (step + 1))


def test_the_form_rows_become_the_engines_space():
    assert space_of([("unet_lr", "1e-4, 5e-4, 1e-3"), ("network_type", "lora, lokr"), ("", ""),
                     ("network_dim", "2:16:log")]) == {
        "unet_lr": {"values": [1e-4, 5e-4, 1e-3]}, "network_type": {"values": ["lora", "lokr"]},
        "network_dim": {"low": 2, "high": 16, "log": True}}
    for rows, message in (([("network_dimm", "4, 8")], "did you mean 'network_dim'"),
                          ([("resolution", "64, 128")], "data.resolution cannot vary in a sweep"),
                          ([("", "4, 8")], "choose the field"), ([("network_dim", "")], "network_dim: give its"),
                          ([("network_dim", "4"), ("network_dim", "8")], "given twice"),
                          ([("network_type", "lora:lokr")], "network_type is not a number: give it a list of values")):
        with pytest.raises(ConfigError, match=message):
            space_of(rows)
    assert api_space({"unet_lr": [1e-4, 1e-3], "network_dim": {"low": 2, "high": 8}, "network_alpha": "1, 2"}) == {
        "unet_lr": {"values": [1e-4, 1e-3]}, "network_dim": {"low": 2, "high": 8, "log": False},
        "network_alpha": {"values": [1.0, 2.0]}}
    for bad in (None, {}, {"unet_lr": None}):
        with pytest.raises(ConfigError):
            api_space(bad)


def test_bad_input_gets_the_engines_message_naming_the_field(tiny_models, tmp_path):
    base, pictures = str(tiny_models["sd1"][1]), draw_dataset(tmp_path / "pictures", 6)
    sweeps = SweepManager(tmp_path / "runs", python=fake(tmp_path))
    out = start(sweeps, base, pictures, ("unet_lr", "1e-4, 1e-3"), form=form_values(base, validation_split=0,
                                                                                validation_every_n_steps=0))
    assert out[N].startswith("⚠ Validation split: a sweep ranks") and "held-out loss" in out[N]  # the form's label
    marked = out[train_tab.FIELDS.index("validation_split")]
    assert marked["elem_classes"] == ["field-error"] and marked["info"] == out[N]
    for rows, how, message in ((["unet_lr", "1e-5:1e-3:log"], {}, "for a range, choose the random or tpe search"),
                               (["unet_lr", "1e-5:1e-3:log"], {"search": "tpe"},
                                "a tpe search needs a number of trials, 1 or more"),
                               (["unet_lr", "1e-3:1e-5"], {"search": "random", "trials": 2},
                                "unet_lr=1e-3:1e-5: a range needs low < high"),
                               (["unet_lr", "1:2:3"], {}, "'unet_lr=1:2:3': a range is key=low:high or key=low:high:log"),
                               (["", ""], {}, "the search space is empty: give a field its values"),
                               (["network_alpha", "1, -1"], {}, "Alpha = -1"),
                               (["clip_skip", "1, 2"], {}, "CLIP skip cannot vary"),
                               (["unet_lr", "1e-4, 1e-3"], {"prune": "sometimes"}, "prune = 'sometimes'"),
                               # one trial ranks nothing: what Train does, said beside the button (QA S7)
                               (["unet_lr", "1e-4"], {}, "one trial: use Train for a single run; a sweep ranks "
                                "several, so give a field two or more values (a, b)"),
                               (["unet_lr", "1e-5:1e-3:log"], {"search": "random", "trials": 1},
                                "one trial: use Train for a single run; a sweep ranks several, so set Trials"),
                               (["network_alpha", "-1"], {}, "Alpha = -1")):  # the value first
        out = start(sweeps, base, pictures, rows, **how)
        assert message in out[N] and "--" not in out[N], out[N]  # the form's controls, not the command line's flags
    out = start(sweeps, base, "", ("unet_lr", "1e-4, 1e-3"))
    assert "Add pictures on the Dataset tab first" in out[N]
    assert sweeps.sweeps() == [] and not any((tmp_path / "runs").glob("*/sweep.json"))  # nothing half-made


def test_a_sweep_from_the_train_tab_is_ranked_offered_and_compared(tiny_models, tmp_path):
    """The real engine: 2 trials (unet_lr 1e-4, 1e-3) on the tiny SD1 model, 2 steps each, held-out loss each step."""
    base, pictures = str(tiny_models["sd1"][1]), draw_dataset(tmp_path / "pictures", 6)
    runs = tmp_path / "runs"
    jobs = JobManager(runs, python=fake(tmp_path), devices=[])  # a full run is only queued here, never trained
    sweeps = SweepManager(runs)
    out = start(sweeps, base, pictures, ("unet_lr", "1e-4, 1e-3"))
    status, tab, sweep_id, chooser = out[N:]
    assert "2 trial(s), grid search" in status and tab.selected == "sweeps" and chooser["value"] == sweep_id
    folder = runs / sweep_id
    assert config.load(folder / "base.toml").data.train_data_dir == str((folder / "dataset").resolve())
    assert sorted(p.name for p in (folder / "dataset").glob("*.png")) == sorted(p.name for p in pictures.glob("*.png"))
    assert wait(sweeps, sweep_id) == "done", (folder / "worker.out").read_text()[-2000:]
    assert jobs.runs() == []  # a sweep is not a run the queue starts; its trials are listed under it
    trials = [f"{sweep_id}/trial-000", f"{sweep_id}/trial-001"]
    rows, ids = runs_tab.table(jobs)
    assert ids == trials and [r[:2] for r in rows] == [[t, "done"] for t in trials]
    files, best_line = runs_tab.choose(jobs, trials[0])
    assert files[0] == str(folder / "trial-000" / "output" / "lora.safetensors") and "held-out" in best_line
    title, *_ = monitor_tab.refresh(jobs, trials[1], None)
    assert title == f"### {trials[1]} — done"
    for act, doing in ((monitor_tab.cancel, "cancel"), (monitor_tab.resume, "resume")):
        refused = (f"{trials[0]} is a trial of sweep {sweep_id}, trained by the sweep's worker: {doing} the sweep "
                   "in the Sweeps tab")
        with pytest.warns(UserWarning, match=re.escape(refused)):  # a toast: the heading stays the run's
            assert act(jobs, trials[0]) == {"__type__": "update"}
    said, *_ = runs_tab.delete(jobs, trials[0], "")
    assert said.startswith("⚠") and "delete the sweep" in said and (folder / "trial-000" / "output").is_dir()

    state_line, table, plot, best, best_config, action, view = sweep_tab.refresh(sweeps, sweep_id, None)
    assert f"**{sweep_id}**: done" in state_line and "2 / 2 trial(s) ended" in state_line
    state = sweep.read(folder)
    assert [row[:4] for row in table] == [[r["rank"], r["name"], f"unet_lr={r['params']['unet_lr']:.4g}", "done"]
                                          for r in state["ranking"]]
    assert sorted(row[2] for row in table) == ["unet_lr=0.0001", "unet_lr=0.001"] and [r[0] for r in table] == [1, 2]
    # the held-out loss names the step it was measured at (QA S4): here the last step, 2
    assert [row[6] for row in table] == [f"{r['value']:.4g} @ {r['step']}" for r in state["ranking"]]
    assert all(r["step"] == 2 for r in state["ranking"])
    assert all(row[4] == "shared forward" and row[5] == 2 for row in table)
    curves = plot["value"]
    assert sorted(curves["trial"].unique()) == ["trial-000", "trial-001"] and sorted(set(curves["step"])) == [0, 1, 2]
    best_name = state["ranking"][0]["name"]
    assert f"Best: **{best_name}**" in best and best_config == (folder / best_name / "config.toml").read_text()
    assert sweep_tab.refresh(sweeps, sweep_id, view)[2]["colors_in_legend"] == ["trial-000", "trial-001"]
    assert sweep_tab.refresh(sweeps, sweep_id, view)[:6] == [UNCHANGED] * 6  # nothing new: nothing sent

    message, current_run, _ = sweep_tab.full_run(sweeps, jobs, sweep_id)
    assert message.startswith("Queued **") and best_name in message
    run = jobs.run_dir(current_run)
    trial_cfg, run_cfg = config.load(folder / best_name / "config.toml"), config.load(run.config)
    assert config.to_dict(run_cfg)["optimizer"] == config.to_dict(trial_cfg)["optimizer"]
    assert run_cfg.data.train_data_dir == str(run.dataset.resolve()) and any(run.dataset.glob("*.png"))

    assert sweep_tab.stored_choice(sweeps, sweep_id)["value"] == sweep_id  # a page load finds its sweep again,
    assert sweep_tab.stored_choice(sweeps, "gone-sweep")["value"] is None  # or none once it is gone (no error)
    chooser, tab, note = sweep_tab.compare_best(sweeps, jobs, sweep_id)
    names = [f"{sweep_id}/{r['name']}" for r in state["ranking"]]
    assert chooser["value"] == names and set(names) <= set(chooser["choices"]) and tab.selected == "compare"
    assert sorted(trial_names(runs)) == sorted(names)
    files, note, suggested_by, *_ = compare_tab.choose_runs(jobs, names, "")
    finals = [str((folder / r["name"] / "output" / "lora.safetensors").resolve()) for r in state["ranking"]]
    assert files["value"] == finals and suggested_by == names[0]
    labels = [label for label, _ in files["choices"]]
    assert all(label.startswith(f"{sweep_id}/trial-") for label in labels), labels  # two sweeps' trial-000 differ
    compares = CompareManager(runs / ".compares", python=fake_python(tmp_path))
    form = [compare_tab.compares_settings(trial_run(runs, names[0]))[n] if n in compare_tab.SUGGESTED else v
            for n, v in zip(compare_tab.SETTINGS, [None, None, "", "0, 1", None, None, None, None, None, None])]
    said, compare_id, _ = compare_tab.on_compare(compares, jobs, names, finals, [], *form)
    assert "Compare **" in said and compares.spec(compare_id)["files"] == finals

    # a trial is named by its sweep and its name, both plain, the trial one sweep.json lists
    (folder / "trial-999" / "output").mkdir(parents=True)
    for name, message in ((f"../{sweep_id}/trial-000", "must be a plain name"),
                          (f"{sweep_id}/../{sweep_id}", "must be a plain name"),
                          (f"{sweep_id}/trial-999", "not a trial of sweep"), ("nothing/trial-000", "no sweep trial")):
        with pytest.raises(ValueError, match=message):
            trial_run(runs, name)
    said, *_ = compare_tab.on_compare(compares, jobs, names[:1], ["/etc/passwd"], [], *form)
    assert said.startswith("⚠ files: passwd is not a saved file")


def test_cancel_signals_the_worker_and_resume_starts_it_again(tiny_models, tmp_path):
    base, pictures = str(tiny_models["sd1"][1]), draw_dataset(tmp_path / "pictures", 6)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "hold").write_text("")
    sweeps = SweepManager(runs, python=fake(tmp_path))
    first = start(sweeps, base, pictures, ("unet_lr", "1e-4, 1e-3"))[N + 2]
    second = start(sweeps, base, pictures, ("network_dim", "4, 8"))[N + 2]
    assert sweeps.info(first).state == "running" and sweeps.info(second).state == "queued"  # one at a time
    launched(runs, [first])  # its SIGTERM handler is set
    said = sweep_tab.cancel(sweeps, first)  # the worker may be gone before the reply is written
    assert said.startswith((f"{first}: running (cancelling: the trials save their state)", f"{first}: cancelled"))
    assert wait(sweeps, first, 10) == "cancelled"
    assert "Resume continues every unfinished trial" in sweeps.info(first).message
    deadline = time.time() + 10
    while sweeps.info(second).state != "running":  # the queued one starts once the first has ended
        assert time.time() < deadline
        sweeps.tick()
        time.sleep(0.1)
    launched(runs, [first, second])
    assert sweep_tab.cancel(sweeps, second).startswith(f"{second}: ")
    wait(sweeps, second, 10)
    (runs / "hold").unlink()
    assert sweep_tab.resume(sweeps, first).startswith(f"{first}: ")  # queued, and started at once
    assert wait(sweeps, first, 10) == "done"
    assert (runs / "launches").read_text().split() == [first, second, first]
    assert "only a cancelled, interrupted or failed sweep resumes" in sweep_tab.resume(sweeps, first)
    assert sweep_tab.cancel(sweeps, first) == "Nothing to cancel: the sweep is done."  # QA S3: not "…: done"
    (runs / "crash").write_text("")
    sweep_tab.resume(sweeps, second)
    assert wait(sweeps, second, 10) == "failed"
    assert "the base model could not be read (exit status 1" in sweeps.info(second).message
    assert sweep_tab.cancel(sweeps, second) == "Nothing to cancel: the sweep has failed."
    for bad in ("../runs", "nothing"):
        assert sweep_tab.cancel(sweeps, bad).startswith("⚠")
    assert sweep_tab.refresh(sweeps, "../runs", None)[0].startswith("⚠ sweep id")
    assert sweep_tab.refresh(sweeps, "nothing", None)[0] == sweep_tab.NOT_CHOSEN  # a stored id of a sweep now gone
    assert sweep_tab.full_run(sweeps, None, second)[0] == f"⚠ {second} has no finished trial yet"


def test_a_sweep_waits_for_a_gpu_no_training_run_uses(tiny_models, tmp_path):
    base, pictures = str(tiny_models["sd1"][1]), draw_dataset(tmp_path / "pictures", 6)
    sweeps = SweepManager(tmp_path / "runs", python=fake(tmp_path), free_device=lambda: None)
    sweep_id = start(sweeps, base, pictures, ("unet_lr", "1e-4, 1e-3"))[N + 2]
    info = sweeps.info(sweep_id)
    assert info.state == "queued" and info.message == "waiting for a GPU that no training run is using"
    assert RunDir(info.path).status()["pid"] is None


def test_every_trials_curve_comes_into_the_plot_live(tmp_path):
    """The page's plot keeps the trials it had when it was last drawn whole and draws no curve for a new one (QA saw
    only trial-000 until a reload): the tick after a trial's first held-out loss names every trial in the legend,
    which has the plot drawn whole again; once, not on every tick."""
    folder = hand_made_sweep(tmp_path / "runs", ["trial-000", "trial-001"])
    sweeps = SweepManager(tmp_path / "runs")
    held_out(folder, "trial-000", [0, 1])
    view = None

    def tick():
        nonlocal view
        *shown, view = sweep_tab.refresh(sweeps, "sweep-1", view)
        return shown[2]

    first, second = tick(), tick()
    assert list(first["value"]["trial"].unique()) == ["trial-000"] and "colors_in_legend" not in first
    assert second == {"__type__": "update", "colors_in_legend": ["trial-000"]}
    held_out(folder, "trial-001", [0])  # trial-001's first rows come after the plot was drawn
    new_data, redrawn, then = tick(), tick(), tick()
    assert sorted(new_data["value"]["trial"].unique()) == ["trial-000", "trial-001"]
    assert redrawn == {"__type__": "update", "colors_in_legend": ["trial-000", "trial-001"]}
    assert then == UNCHANGED
    held_out(folder, "trial-001", [1])  # more rows of known trials: new data, no redraw
    assert "colors_in_legend" not in tick() and tick() == UNCHANGED


STROKED_CURVES = """() => [...document.querySelectorAll('#sweep-plot svg path[aria-roledescription="line mark"]')]
    .filter(p => p.getAttribute('stroke')).length"""


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_every_trials_curve_is_drawn_live_in_the_browser(browser, tmp_path):  # noqa: F811
    """The Sweeps tab's plot and timer in chromium: a trial whose first held-out loss comes after the plot was
    drawn gets its own coloured curve and legend entry without a reload."""
    import gradio as gr

    folder = hand_made_sweep(tmp_path / "runs", ["trial-000", "trial-001"])
    sweeps = SweepManager(tmp_path / "runs")
    held_out(folder, "trial-000", [0, 1, 2])
    with gr.Blocks() as demo:
        page_parts = sweep_tab.build()
        sweep_id, view = gr.State("sweep-1"), gr.State(None)
        gr.Timer(0.5).tick(partial(sweep_tab.refresh, sweeps), [sweep_id, view, page_parts.action],
                           [*page_parts.outputs(), page_parts.action, view])
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}")
        page.wait_for_function(f"() => ({STROKED_CURVES})() === 1", timeout=30000)
        page.wait_for_timeout(1500)  # drawn whole and ticking, as when QA watched it
        held_out(folder, "trial-001", [0, 1, 2])
        try:
            page.wait_for_function(f"() => ({STROKED_CURVES})() === 2", timeout=10000)
        except Exception:
            raise AssertionError("trial-001's curve is not drawn: " + page.eval_on_selector(
                "#sweep-plot svg", "svg => svg.textContent")) from None
        legend = page.eval_on_selector("#sweep-plot svg", "svg => svg.textContent")
        assert "trial-000" in legend and "trial-001" in legend
    finally:
        demo.close()


DISARMED = ["", {"__type__": "update", "value": sweep_tab.DELETE}]


def test_a_sweep_that_has_ended_is_deleted_with_its_trials_and_a_running_one_is_not(tmp_path):
    """The Runs tab sends a trial's Delete here: the Sweeps tab's Delete removes the sweep's folder and with it
    its trials' run directories, asked twice; a queued or running sweep, or a trial a worker trains alone, is
    refused."""
    runs = tmp_path / "runs"
    folder, other = hand_made_sweep(runs, ["trial-000", "trial-001"]), hand_made_sweep(runs, ["trial-000"], "sweep-2")
    (runs / "hold").write_text("")
    sweeps, jobs = SweepManager(runs, python=fake(tmp_path)), JobManager(runs, devices=[])
    RunDir(folder).write_status(state="queued", message="waiting for its turn")
    refused = sweep_tab.delete(sweeps, "sweep-1")
    assert refused == ["⚠ sweep-1 is queued: cancel it first"] + [UNCHANGED] * 8 + DISARMED
    sweeps.tick()
    launched(runs, ["sweep-1"])
    assert sweep_tab.delete(sweeps, "sweep-1")[0] == "⚠ sweep-1 is running: cancel it first"
    sweep_tab.cancel(sweeps, "sweep-1")
    assert wait(sweeps, "sweep-1", 10) == "cancelled" and (folder / "trial-000").is_dir()
    with RunDir(folder / "trial-001").acquire():  # `python -m trainer sweep-1/trial-001` trains it alone
        said = sweep_tab.delete(sweeps, "sweep-1")[0]
    assert said == "⚠ sweep-1/trial-001 is being trained: cancel that worker first" and folder.is_dir()
    assert runs_tab.delete(jobs, "sweep-1/trial-000", "")[0].endswith("delete the sweep in the Sweeps tab")
    compares = CompareManager(runs / ".compares", python=fake_python(tmp_path))
    drawn = str(lora(folder / "trial-000" / "output" / "lora.safetensors").resolve())
    form = [compare_tab.compares_settings(trial_run(runs, "sweep-1/trial-000")).get(n, v) for n, v in
            zip(compare_tab.SETTINGS, [None, None, "", "0, 1", None, None, None, None, None, None])]
    compare_id = compare_tab.on_compare(compares, jobs, ["sweep-1/trial-000"], [drawn], [], *form)[1]

    # asked twice (QA S6): the first click says what goes and arms the button; choosing another sweep disarms it
    said, *kept, armed, button = sweep_tab.delete(sweeps, "sweep-1")
    assert said.startswith("Deleting **sweep-1** removes its folder (") and "the sweep and its 2 trial(s)" in said
    assert kept == [UNCHANGED] * 8 and armed == "sweep-1" and folder.is_dir()
    assert button == {"__type__": "update", "value": "Click again to delete sweep-1 for good"}
    assert sweep_tab.on_choose("sweep-2") == ["sweep-2", None, *DISARMED]
    said, *_, armed, button = sweep_tab.delete(sweeps, "sweep-2", "sweep-1")  # armed for sweep-1: asks about sweep-2
    assert "the sweep and its 1 trial(s)" in said and armed == "sweep-2" and other.is_dir() and folder.is_dir()
    said, chooser, *page = sweep_tab.delete(sweeps, "sweep-1", "sweep-1")
    assert said == "Deleted sweep-1 and its trials." and chooser == {"__type__": "update", "choices": ["sweep-2"],
                                                                       "value": None}
    plot = page.pop(2)
    assert list(plot.columns) == ["trial", "step", "loss"] and plot.empty  # not None: the page's plot fails on it
    assert page == [sweep_tab.NOT_CHOSEN, [], "", "", "", None, *DISARMED]  # the page's sweep id cleared, no view
    assert not folder.exists() and (other / "trial-000" / "config.toml").is_file()
    # a tick that still holds the deleted id (it was on its way) shows no sweep chosen, not "⚠ no sweep 'sweep-1'"
    state_line, table, plot, *_, action, view = sweep_tab.refresh(sweeps, "sweep-1", None, said)
    assert state_line == sweep_tab.NOT_CHOSEN and table == [] and plot.empty and view is None
    assert action == UNCHANGED  # "Deleted sweep-1 and its trials." stays under the buttons
    assert runs_tab.table(jobs)[1] == ["sweep-2/trial-000"]  # the Runs tab lists only the other sweep's trial
    chooser, files, *_ = compare_tab.open_tab(compares, jobs, compare_id, [], False)  # a reload of a compare of it
    assert chooser == {"__type__": "update", "choices": []} and files["choices"] == []  # it drew none left
    for sweep_id, message in (("sweep-1", "⚠ no sweep 'sweep-1'"), ("", "Choose a sweep first."),
                              ("../runs", "⚠ sweep id")):
        assert sweep_tab.delete(sweeps, sweep_id)[0].startswith(message)
    assert other.is_dir()


def test_the_action_line_goes_once_the_state_it_spoke_of_has_changed(tmp_path):
    """QA S3: "…: running (cancelling…)" stayed under the buttons after the sweep was cancelled, and "…: running"
    after it had finished. The line says the sweep's state after Cancel / Resume; the tick clears it when that state
    has changed, or when another sweep is shown; any other line (Queued …, Comparing …) stays."""
    folder = hand_made_sweep(tmp_path / "runs", ["trial-000", "trial-001"])
    sweeps = SweepManager(tmp_path / "runs")
    RunDir(folder).write_status(state="queued", message="waiting for its turn")
    *_, action, view = sweep_tab.refresh(sweeps, "sweep-1", None, "sweep-2: cancelled")
    assert action == ""  # another sweep's line goes with the sweep
    said = sweeps.info("sweep-1").summary()
    assert said == "sweep-1: queued (waiting for its turn)"
    assert sweep_tab.refresh(sweeps, "sweep-1", view, said)[5] == UNCHANGED  # still so
    queued_run = "Queued **20261207-072152-character**: trial-000's config as a full run (open it in the Monitor)."
    RunDir(folder).write_status(state="cancelled", message="stopped; Resume continues every unfinished trial")
    assert sweep_tab.refresh(sweeps, "sweep-1", view, said)[5] == ""  # stale: it was queued
    assert sweep_tab.refresh(sweeps, "sweep-1", view, queued_run)[5] == UNCHANGED
    assert sweep_tab.refresh(sweeps, "sweep-1", view, "")[5] == UNCHANGED  # an empty line is not sent again
    assert sweep_tab.refresh(sweeps, "sweep-1", view, None)[5] == UNCHANGED  # (the page's empty Markdown)
    assert sweep_tab.cancel(sweeps, "sweep-1") == "Nothing to cancel: the sweep is cancelled."
    RunDir(folder).write_status(state="done", message="")
    assert sweep_tab.cancel(sweeps, "sweep-1") == "Nothing to cancel: the sweep is done."


def test_a_pruned_trial_says_at_which_step_and_the_loss_its_step(tmp_path):
    """QA S5: "pruned: pruned at rung 0: held-out 0.158806, …" reads "pruned at step 2: held-out 0.1588, not in
    the best 1 of 2"; QA S4: the held-out loss of a trial still training names the step it was measured at (the
    last validation, not the last step)."""
    halving = sweep.Halving({"min_step": None, "rungs": {}, "steps": {}, "judged": []})
    for step, losses in ((2, (0.1404, 0.158806)), (4, (0.12, 0.13))):
        for name, loss in zip(("trial-000", "trial-001"), losses):
            halving.report(name, step, loss)
    assert halving.losers(["trial-000", "trial-001"]) == [
        ("trial-001", "pruned at step 2: held-out 0.1588, not in the best 1 of 2")]
    old = sweep.Halving({"min_step": 4, "rungs": {"0": {"a": 0.1, "b": 0.2}}, "judged": []})  # made before "steps"
    assert old.losers(["a", "b"]) == [("b", "pruned at step 4: held-out 0.2, not in the best 1 of 2")]

    folder = hand_made_sweep(tmp_path / "runs", ["trial-000", "trial-001"])
    state = sweep.read(folder)
    state["trials"][1].update(state="pruned", value=0.158806, step=2,
                              message="pruned at step 2: held-out 0.1588, not in the best 1 of 2")
    sweep.write(folder, state)
    RunDir(folder / "trial-000").write_status(state="running", message="")
    held_out(folder, "trial-000", [0, 12])
    EventWriter(folder / "trial-000").emit("step", step=15, total_steps=16, epoch=0, loss=0.2, lr=1e-4)
    _, table, *_ = sweep_tab.refresh(SweepManager(tmp_path / "runs"), "sweep-1", None)
    assert table[0][3:] == ["pruned at step 2: held-out 0.1588, not in the best 1 of 2", "shared forward", 2,
                            "0.1588 @ 2"]
    assert table[1][3:] == ["training", "shared forward", 15, f"{1 / 13:.4g} @ 12"]  # at step 15, measured at 12


def test_one_training_trial_is_stopped_by_its_row_and_only_then(tmp_path, monkeypatch):
    """QA S2: a user who sees one trial go wrong stops just that one (the engine's side: tests/test_sweep.py)."""
    from ui.sweeps import SweepInfo

    folder = hand_made_sweep(tmp_path / "runs", ["trial-000", "trial-001"])
    sweeps = SweepManager(tmp_path / "runs")
    trial, button = sweep_tab.on_select_trial(type("Select", (), {"row_value": [1, "trial-001", "…"]})())
    assert trial == "trial-001" and button == {"__type__": "update", "value": "Stop trial trial-001",
                                               "interactive": True}
    assert sweep_tab.stop_trial(sweeps, "sweep-1", "") == "Click a trial's row in the table first."
    assert sweep_tab.stop_trial(sweeps, "sweep-1", "trial-001").startswith("⚠ sweep-1/trial-001 is not training")
    monkeypatch.setattr(SweepManager, "info", lambda self, s: SweepInfo(s, folder, "running", "", 0.0))
    RunDir(folder / "trial-001").write_status(state="running")
    assert sweep_tab.stop_trial(sweeps, "sweep-1", "trial-9") == "⚠ sweep-1 has no trial 'trial-9'"
    assert sweep_tab.stop_trial(sweeps, "sweep-1", "trial-001") == ("sweep-1/trial-001: stopping at its next step; "
                                                                     "the other trials go on")
    assert RunDir(folder / "trial-001").stop_file.is_file() and not RunDir(folder / "trial-000").stop_file.exists()
