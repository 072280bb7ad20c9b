"""Sweeps from the app (issue #16): the Train tab's Sweep section, the sweep manager and the Sweeps tab's handlers,
on the real sweep engine and the tiny SD1 model (a 2-trial sweep trains in seconds); cancel and resume with a fake
worker that waits for its SIGTERM."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.test_compare_ui import fake_python
from tests.test_training import draw_dataset
from trainer import config, sweep
from trainer.config import ConfigError
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


def test_the_form_rows_become_the_engines_space():
    assert space_of([("unet_lr", "1e-4, 5e-4, 1e-3"), ("network_type", "lora, lokr"), ("", ""),
                     ("network_dim", "2:16:log")]) == {
        "unet_lr": {"values": [1e-4, 5e-4, 1e-3]}, "network_type": {"values": ["lora", "lokr"]},
        "network_dim": {"low": 2, "high": 16, "log": True}}
    for rows, message in (([("network_dimm", "4, 8")], "did you mean 'network_dim'"),
                          ([("resolution", "64, 128")], "data.resolution cannot vary in a sweep"),
                          ([("", "4, 8")], "choose the field"), ([("network_dim", "")], "network_dim: give its"),
                          ([("network_dim", "4"), ("network_dim", "8")], "given twice"),
                          ([("network_type", "lora:lokr")], "network_type is not a number")):
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
    assert out[N].startswith("⚠ data.validation_split:") and "held-out loss" in out[N]
    marked = out[train_tab.FIELDS.index("validation_split")]
    assert marked["elem_classes"] == ["field-error"] and "validation_split" in marked["info"]
    for rows, how, message in ((["unet_lr", "1e-5:1e-3:log"], {}, "a grid takes lists"),
                               (["unet_lr", "1e-5:1e-3:log"], {"search": "tpe"}, "needs --trials N"),
                               (["network_alpha", "1, -1"], {}, "network.network_alpha = -1"),
                               (["clip_skip", "1, 2"], {}, "model.clip_skip cannot vary"),
                               (["unet_lr", "1e-4"], {"prune": "sometimes"}, "prune = 'sometimes'")):
        out = start(sweeps, base, pictures, rows, **how)
        assert message in out[N], out[N]
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
        assert act(jobs, trials[0]) == (f"⚠ {trials[0]} is a trial of sweep {sweep_id}, trained by the sweep's "
                                        f"worker: {doing} the sweep in the Sweeps tab")
    said, _ = runs_tab.delete(jobs, trials[0], "")
    assert said.startswith("⚠") and "delete the sweep" in said and (folder / "trial-000" / "output").is_dir()

    state_line, table, plot, best, best_config, view = sweep_tab.refresh(sweeps, sweep_id, None)
    assert f"**{sweep_id}**: done" in state_line and "2 / 2 trial(s) ended" in state_line
    state = sweep.read(folder)
    assert [row[:4] for row in table] == [[r["rank"], r["name"], f"unet_lr={r['params']['unet_lr']:.4g}", "done"]
                                          for r in state["ranking"]]
    assert sorted(row[2] for row in table) == ["unet_lr=0.0001", "unet_lr=0.001"] and [r[0] for r in table] == [1, 2]
    assert [float(row[6]) for row in table] == [pytest.approx(r["value"], abs=1e-6) for r in state["ranking"]]
    assert all(row[4] == "shared forward" and row[5] == 2 for row in table)
    assert sorted(plot["trial"].unique()) == ["trial-000", "trial-001"] and sorted(set(plot["step"])) == [0, 1, 2]
    best_name = state["ranking"][0]["name"]
    assert f"Best: **{best_name}**" in best and best_config == (folder / best_name / "config.toml").read_text()
    assert sweep_tab.refresh(sweeps, sweep_id, view)[:5] == [{"__type__": "update"}] * 5  # nothing new: nothing sent

    message, current_run, _ = sweep_tab.full_run(sweeps, jobs, sweep_id)
    assert message.startswith("Queued **") and best_name in message
    run = jobs.run_dir(current_run)
    trial_cfg, run_cfg = config.load(folder / best_name / "config.toml"), config.load(run.config)
    assert config.to_dict(run_cfg)["optimizer"] == config.to_dict(trial_cfg)["optimizer"]
    assert run_cfg.data.train_data_dir == str(run.dataset.resolve()) and any(run.dataset.glob("*.png"))

    chooser, tab, note = sweep_tab.compare_best(sweeps, jobs, sweep_id)
    names = [f"{sweep_id}/{r['name']}" for r in state["ranking"]]
    assert chooser["value"] == names and set(names) <= set(chooser["choices"]) and tab.selected == "compare"
    assert sorted(trial_names(runs)) == sorted(names)
    files, note, suggested_by, *_ = compare_tab.choose_runs(jobs, names, "")
    finals = [str((folder / r["name"] / "output" / "lora.safetensors").resolve()) for r in state["ranking"]]
    assert files["value"] == finals and suggested_by == names[0]
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
    (runs / "crash").write_text("")
    sweep_tab.resume(sweeps, second)
    assert wait(sweeps, second, 10) == "failed"
    assert "the base model could not be read (exit status 1" in sweeps.info(second).message
    for bad in ("../runs", "nothing"):
        assert sweep_tab.cancel(sweeps, bad).startswith("⚠")
        assert sweep_tab.refresh(sweeps, bad, None)[0].startswith("⚠")
    assert sweep_tab.full_run(sweeps, None, second)[0] == f"⚠ {second} has no finished trial yet"


def test_a_sweep_waits_for_a_gpu_no_training_run_uses(tiny_models, tmp_path):
    base, pictures = str(tiny_models["sd1"][1]), draw_dataset(tmp_path / "pictures", 6)
    sweeps = SweepManager(tmp_path / "runs", python=fake(tmp_path), free_device=lambda: None)
    sweep_id = start(sweeps, base, pictures, ("unet_lr", "1e-4, 1e-3"))[N + 2]
    info = sweeps.info(sweep_id)
    assert info.state == "queued" and info.message == "waiting for a GPU that no training run is using"
    assert RunDir(info.path).status()["pid"] is None
