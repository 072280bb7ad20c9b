"""The Train, Monitor and Runs tabs' handlers without a browser: plain values in, plain values out."""

import json
import time

import gradio as gr
import pandas as pd
import pytest
from PIL import Image

from tests.test_jobs import fake_worker, launched, wait_for
from trainer import config
from trainer.rundir import RunDir, create
from ui import monitor_tab, runs_tab, train_tab
from ui.jobs import JobManager
from ui.monitor import RunView, downsample, log_tail

UNCHANGED = {"__type__": "update"}


def step(n, total=6):
    return {"type": "step", "time": n, "step": n, "total_steps": total, "epoch": 1, "loss": 1.0 / n, "lr": 1e-4,
            "samples_per_s": 2.0, "eta_s": 1.0}


@pytest.fixture()
def jobs(tmp_path):
    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    jobs.tick = lambda: None  # keep the queue still: these runs are written by the test
    return jobs


def finished_run(jobs, name="r", steps=3):
    run = create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="done", name=name)
    run.samples.mkdir()
    run.output.mkdir()
    events = [step(n) for n in range(1, steps + 1)]
    for i, prompt in enumerate(("a", "b")):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(run.samples / f"step-000003-p{i}.png")
        events.append({"type": "sample", "time": 9, "step": 3, "prompt": prompt, "seed": 1, "index": i,
                       "path": f"samples/step-000003-p{i}.png"})
    (run.output / "lora.safetensors").write_bytes(b"x")
    events.append({"type": "done", "time": 10, "path": "output/lora.safetensors"})
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_every_view_sees_the_whole_history(jobs):
    run = finished_run(jobs)
    first = monitor_tab.refresh(jobs, "r", None)
    second = monitor_tab.refresh(jobs, "r", None)  # another tab, a reload, or the run reopened from Runs
    for title, progress, plot, gallery, files, log, best, _, _, view in (first, second):
        assert "done" in title and "Step 3 / 6" in progress
        assert isinstance(plot, pd.DataFrame) and sorted(plot[plot.curve == "raw"].step) == [1, 2, 3]
        assert [c for _, c in gallery["value"]] == ["step 3 · a", "step 3 · b"] and gallery["columns"] == 6
        assert files == [str(run.output / "lora.safetensors"), str(run.config)]
        assert view.run_id == "r"


def sample(step, index, prompt):
    return {"type": "sample", "time": step, "step": step, "prompt": prompt, "seed": 1, "index": index,
            "path": f"samples/step-{step:06d}-p{index}.png"}


def test_the_gallery_opens_on_the_newest_samples_in_small_tiles():
    view = RunView().add([sample(s, i, p) for s in (0, 200, 400) for i, p in enumerate("ab")])
    assert [c for _, c in view.sample_grid()] == ["step 400 · a", "step 400 · b", "step 200 · a", "step 200 · b",
                                                  "step 0 · a", "step 0 · b"]
    assert view.gallery_columns() == 6  # three steps a row, each column one prompt
    for prompts, columns in ((1, 6), (4, 8), (7, 7)):
        assert RunView().add([sample(0, i, str(i)) for i in range(prompts)]).gallery_columns() == columns
    with gr.Blocks():
        tab = monitor_tab.build()
    assert tab.samples.columns == 6 and tab.samples.fit_columns is False  # the first sample is not page-wide


def test_only_what_changed_is_sent_again(jobs):
    run = finished_run(jobs, steps=2)
    *_, view = monitor_tab.refresh(jobs, "r", None)
    again = monitor_tab.refresh(jobs, "r", view)
    assert again[:9] == [UNCHANGED] * 9  # nothing new: nothing sent
    with open(run.events, "a") as f:
        f.write(json.dumps(step(3)) + "\n")
    title, progress, plot, gallery, files, log, best, _, _, view = monitor_tab.refresh(jobs, "r", view)
    assert list(plot[plot.curve == "raw"].step) == [1, 2, 3] and "Step 3 / 6" in progress
    assert gallery == files == title == UNCHANGED
    assert monitor_tab.refresh(jobs, "r", view)[:9] == [UNCHANGED] * 9


def scored_run(jobs, name="scored"):
    """A finished run with held-out losses: epoch 2's file is the best, the final one is not."""
    run = finished_run(jobs, name, steps=6)
    events = [{"type": "status", "time": 0, "phase": "held-out", "message": "Held-out loss on 1 of 6 pictures"}]
    for step, loss in ((0, 0.5), (2, 0.3), (4, 0.0812), (6, 0.2)):
        events.append({"type": "validation", "time": step, "step": step, "epoch": step // 2, "loss": loss,
                       "images": 1})
    for step, path in ((2, "output/lora-000001.safetensors"), (4, "output/lora-000002.safetensors"),
                       (6, "output/lora.safetensors")):
        (run.path / path).write_bytes(b"x")
        events.append({"type": "checkpoint", "time": step, "step": step, "epoch": step // 2, "path": path})
    with open(run.events, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_the_held_out_curve_and_the_best_file_show(jobs):
    run = scored_run(jobs)
    title, progress, plot, gallery, files, log, best, _, _, view = monitor_tab.refresh(jobs, "scored", None)
    held = plot[plot.curve == "held-out"]
    assert list(held.step) == [0, 2, 4, 6] and list(held.loss) == [0.5, 0.3, 0.0812, 0.2]
    line = "**Best:** lora-000002.safetensors — held-out loss 0.0812 at step 4, epoch 2"
    assert best == line
    assert files[0] == str(run.output / "lora-000002.safetensors") and len(files) == 4
    assert runs_tab.table(jobs)[0][0][3] == "0.0812 (epoch 2)"  # the runs table's best held-out column
    runs_files, runs_best = runs_tab.choose(jobs, "scored")
    assert runs_best == line and runs_files == files
    assert runs_tab.files_of(jobs, "scored") == files


def test_the_held_out_loss_is_said_before_its_curve_can_be_drawn():
    """QA: a curve of one point (the base's held-out loss) draws nothing, and no file is saved yet to be the best."""
    base = {"type": "validation", "time": 1, "step": 0, "epoch": 0, "loss": 0.51234, "images": 2}
    view = RunView().add([base])
    assert view.best_text() == ("Held-out loss 0.5123 at step 0 (the base, before training); the best file is "
                                "marked once one is saved")
    view.add([base | {"step": 5, "loss": 0.4}])
    assert view.best_text().startswith("Held-out loss 0.4000 at step 5; the best")


def test_a_long_failure_is_said_once_in_full_and_its_log_is_offered(jobs):
    """QA s28 F10: an eleven-line failure filled the heading and the progress line alike; worker.log was not offered."""
    run = finished_run(jobs, "f")
    long = "DatasetError: none of the 10 picture(s) could be read (" + "; ".join(
        f"ring-{i:02d}.png: cannot identify image file" for i in range(3)) + "; and 7 more)"
    run.write_status(state="failed", message=long)
    with open(run.events, "a") as f:
        f.write(json.dumps({"type": "error", "time": 99, "message": long}) + "\n")
    run.log.write_text("Traceback (most recent call last): …\n")
    title, progress, *_, files, _, _, _, _, _ = monitor_tab.refresh(jobs, "f", None)
    assert title.startswith("### f — failed · DatasetError: none of the 10 picture(s)") and title.endswith(" … (below)")
    assert len(title) < 150 and long in progress
    assert files[-1] == str(run.log)  # what "the full traceback is in worker.log" points to


def test_a_worker_that_starts_again_replaces_what_the_one_before_logged_after_its_step():
    """QA: after a crash past the last state the Monitor kept the old attempt's curve, progress line and samples."""
    def held(n):
        return {"type": "validation", "time": n, "step": n, "epoch": 1, "loss": 0.5 / (n + 1), "images": 1}

    def saved(n):
        return {"type": "checkpoint", "time": n, "step": n, "epoch": n // 3, "path": f"output/lora-{n:06d}.safetensors"}

    first = [{"type": "start", "time": 0, "step": 0}, sample(0, 0, "a"), held(0), *map(step, range(1, 8)), saved(3),
             held(3), sample(3, 0, "a"), saved(6), held(6), sample(6, 0, "a")]
    view = RunView().add(first)
    assert view.last_step["step"] == 7 and len(view.files) == 2
    view.add([{"type": "start", "time": 9, "step": 3}])  # killed at 7: its newest state is of step 3
    assert view.steps == [1, 2, 3] and view.last_step is None and view.files == ["output/lora-000003.safetensors"]
    assert [e["step"] for e in view.samples] == [0, 3] and sorted(view.held_out) == [0, 3]
    view.add([step(4) | {"loss": 9.0}])
    assert view.steps == [1, 2, 3, 4] and view.losses[-1] == 9.0 and view.last_step["step"] == 4  # the new attempt's
    view.add([{"type": "start", "time": 20, "step": 0}])  # no state at all: the base's pictures are drawn again
    assert view.steps == [] and view.samples == [] and view.held_out == {} and view.files == []


def test_a_run_that_ended_once_and_was_killed_after_a_resume_is_interrupted(tmp_path):
    from ui.jobs import final_state_from_events

    run = tmp_path / "r"
    events = [{"type": "start", "time": 0, "step": 0}, {"type": "cancelled", "time": 1, "step": 4},
              {"type": "start", "time": 2, "step": 4}, step(5)]
    fake = RunDir(run)
    run.mkdir()
    run.joinpath("events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert final_state_from_events(fake) == ("interrupted", "the worker stopped without finishing before any "
                                                            "resumable state was saved; Resume trains it again from "
                                                            "the start")
    (run / "state" / "step-00000004").mkdir(parents=True)
    (run / "state" / "step-00000004" / "progress.json").write_text("{}")
    (run / "state" / "step-00000006").mkdir()  # not complete: no progress.json
    assert final_state_from_events(fake)[1] == "the worker stopped without finishing; resumable from step 4"


def test_held_out_off_is_said_in_the_monitor(jobs):
    run = finished_run(jobs, "small")
    note = "Held-out loss off: 2 picture(s) are too few to hold 1 out and train on at least 2"
    with open(run.events, "a") as f:
        f.write(json.dumps({"type": "status", "time": 11, "phase": "held-out", "message": note}) + "\n")
    assert monitor_tab.refresh(jobs, "small", None)[6] == f"_{note}_"
    assert runs_tab.choose(jobs, "small")[1] == f"_{note}_"


def test_a_long_run_is_downsampled_for_the_plot():
    view = RunView().add([step(n, 5000) for n in range(1, 5001)])
    raw = [r for r in view.loss_rows() if r["curve"] == "raw"]
    assert len(raw) <= 600 and raw[0]["step"] == 1 and raw[-1]["step"] == 5000
    assert downsample(10) == list(range(10)) and len(downsample(10_000, 100)) == 100


def sampled_at_10(total=100):
    """Steps of 1 s each, then 30 s of sampling after step 10, then step 11."""
    events = [step(n, total) | {"eta_s": 1.0 * (total - n)} for n in range(1, 11)]
    events += [{"type": "status", "time": 10.1, "phase": "sampling", "message": "Sampling 2 prompt(s) at step 10"},
               {"type": "sample", "time": 25, "step": 10, "prompt": "a", "seed": 1, "path": "samples/a.png"},
               {"type": "sample", "time": 40, "step": 10, "prompt": "b", "seed": 1, "path": "samples/b.png"}]
    return events, step(11, total) | {"time": 41, "eta_s": 1.0 * (total - 11)}


def test_the_sampling_line_goes_when_training_goes_on_or_the_run_ends(jobs):
    events, after = sampled_at_10()
    view = RunView().add(events)
    assert view.progress_text().endswith("Sampling 2 prompt(s) at step 10")
    view.add([after])
    assert "Sampling" not in view.progress_text() and "Step 11 / 100" in view.progress_text()
    run = create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="failed", name="died")
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))  # killed while sampling: no last event
    progress = monitor_tab.refresh(jobs, "died", None)[1]
    assert "Step 10 / 100" in progress and "Sampling" not in progress and "ETA" not in progress


def test_with_no_run_shown_cancel_and_resume_cannot_be_clicked(jobs):
    with gr.Blocks():
        tab = monitor_tab.build()
    assert tab.cancel.interactive is False and tab.resume.interactive is False
    assert monitor_tab.refresh(jobs, "", None)[7:9] == [UNCHANGED] * 2  # and nothing makes them clickable
    create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="queued", name="q")
    cancel, resume = monitor_tab.refresh(jobs, "q", None)[7:9]  # a run shown: as its state allows
    assert (cancel["interactive"], resume["interactive"]) == (True, False)


def test_a_queued_run_says_what_it_waits_for_and_an_ended_one_no_waiting(jobs):
    for name, state, created in (("training", "running", 1.0), ("first", "queued", 2.0), ("q", "queued", 3.0),
                                 ("later", "queued", 4.0)):
        run = create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state=state, name=name)
        run.write_status(created=created)
    progress = monitor_tab.refresh(jobs, "q", None)[1]
    assert progress == "Queued: waiting for training (training), first (queued before it)."
    assert monitor_tab.refresh(jobs, "first", None)[1] == "Queued: waiting for training (training)."
    monitor_tab.cancel(jobs, "q")
    assert monitor_tab.refresh(jobs, "q", None)[1] == "Ended before its first step."
    killed = jobs.run_dir("training")  # died while loading: its last status is stale
    killed.events.write_text(json.dumps({"type": "status", "time": 1, "phase": "loading", "message": "Loading"}) + "\n")
    assert monitor_tab.refresh(jobs, "training", None)[1] == "**loading** — Loading"
    killed.write_status(state="interrupted", message="the worker died")
    assert monitor_tab.refresh(jobs, "training", None)[1] == "Ended before its first step."
    resumed = jobs.run_dir("q")  # queued again to resume: no stale rate or ETA, and what it waits for
    resumed.events.write_text(json.dumps(step(3)) + "\n")
    resumed.write_status(state="queued", message="resuming")
    progress = monitor_tab.refresh(jobs, "q", None)[1]
    assert "Step 3 / 6" in progress and "ETA" not in progress
    assert progress.endswith("Queued (resuming): waiting for first (queued before it).")
    with open(resumed.events, "a") as f:  # QA 21: once it runs again, not "Cancelled at step 3" for seconds
        f.write(json.dumps({"type": "cancelled", "time": 2, "step": 3}) + "\n")
    resumed.write_status(state="running", message="", started=1.5)  # the worker that wrote it, still exiting
    assert "Resuming" not in monitor_tab.refresh(jobs, "q", None)[1]
    resumed.write_status(state="running", message="", started=2.5)  # a new worker
    view = monitor_tab.refresh(jobs, "q", None)[-1]
    assert monitor_tab.refresh(jobs, "q", view)[1] == UNCHANGED  # nothing new yet
    assert monitor_tab.refresh(jobs, "q", None)[1].endswith("Resuming: the worker is starting…")
    with open(resumed.events, "a") as f:  # loading again: not the rate and ETA from before the cancel
        f.write(json.dumps({"type": "status", "time": 3, "phase": "loading", "message": "Loading demo"}) + "\n")
    progress = monitor_tab.refresh(jobs, "q", view)[1]
    assert progress.endswith("Loading demo") and "ETA" not in progress and "Step 3 / 6" in progress
    with open(resumed.events, "a") as f:
        f.write(json.dumps({"type": "status", "time": 3, "phase": "training", "message": "Resuming from step 3"}) + "\n")
    assert monitor_tab.refresh(jobs, "q", view)[1].endswith("Resuming from step 3")


def test_no_run_or_a_deleted_run(jobs):
    assert monitor_tab.refresh(jobs, "", None)[:9] == [UNCHANGED] * 9
    assert monitor_tab.refresh(jobs, "gone", None)[0] == monitor_tab.NO_RUN
    for planted in ("/etc", "../runs", ".datasets"):  # the run id comes from the browser's storage
        assert monitor_tab.refresh(jobs, planted, None)[0] == monitor_tab.NO_RUN
        with pytest.warns(UserWarning, match="There is no run"):
            assert monitor_tab.cancel(jobs, planted) == UNCHANGED


def test_runs_table_files_and_delete(jobs):
    finished_run(jobs, "old")
    finished_run(jobs, "new")
    views = {}
    rows, ids = runs_tab.table(jobs, views)
    assert ids == ["new", "old"] and rows[0][:5] == ["new", "done", "3 / 6", "", "demo"] and rows[0][6] == ""
    assert rows[0][5].startswith(time.strftime("%Y-%m-%d"))  # started
    with open(jobs.run_dir("new").events, "a") as f:
        f.write(json.dumps(step(4)) + "\n")
    assert runs_tab.table(jobs, views)[0][0][2] == "4 / 6"  # read on from where the last refresh stopped
    assert runs_tab.on_select(type("Select", (), {"row_value": rows[1]})())["value"] == "old"  # a click on a row
    assert runs_tab.files_of(jobs, "old")[0].endswith("old/output/lora.safetensors")
    said, current, files, best, armed, button, chooser = runs_tab.delete(jobs, "old", current="old")  # asked first
    assert said.startswith("Deleting **old** removes its folder (") and said.endswith(
        "MB): its 1 saved LoRA file(s), samples and its config. Click the button again to delete it for good.")  # no state
    assert (current, files, best, armed) == ("old", UNCHANGED, UNCHANGED, "old")
    assert button["value"] == "Click again to delete old for good"
    assert (jobs.runs_dir / "old").is_dir()  # nothing gone yet
    *_, armed, _, resizable, cancel, resume = runs_tab.on_choose(jobs, "new")  # another run: the button back
    assert (cancel["interactive"], resume["interactive"]) == (False, False)  # done: as the Monitor has them
    new_lora = str(jobs.runs_dir / "new" / "output" / "lora.safetensors")  # and offers its files to the Resize tool
    assert resizable["choices"] == [("lora.safetensors", new_lora)] and resizable["value"] == new_lora
    assert armed == "" and runs_tab.delete(jobs, "old", "old", armed)[4] == "old"  # so this asks again
    assert runs_tab.delete(jobs, "old", "old", "old") == ("Deleted old.", "", None, "", "", {
        "__type__": "update", "value": "Delete"}, {"__type__": "update", "value": None})  # the chooser cleared too
    assert not (jobs.runs_dir / "old").exists()
    assert runs_tab.on_choose(jobs, "")[2] == UNCHANGED  # the emptied chooser leaves "Deleted old." (QA s28 F12)
    assert runs_tab.delete(jobs, "old", current="new")[0].startswith("⚠")
    assert runs_tab.table(jobs)[1] == ["new"]


def failed_run(jobs, name="failed"):
    """A run that failed while loading its model, before its first step."""
    run = create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="failed", name=name)
    events = [{"type": "status", "time": 1, "phase": "loading", "message": "Loading the base model"},
              {"type": "error", "time": 2, "message": "CheckpointError: no such file"}]
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_a_run_without_steps_shows_an_empty_plot_not_the_run_before(jobs):
    finished_run(jobs, "finished", steps=800)
    failed_run(jobs)
    *_, view = monitor_tab.refresh(jobs, "finished", None)
    for last in (view, None):  # the same view switched over, or the run opened from Runs (a new one)
        title, progress, plot, gallery, files, log, best, *_ = monitor_tab.refresh(jobs, "failed", last)
        assert plot is None and "failed" in title and "CheckpointError" in progress
        assert gallery["value"] == [] and files == [str(jobs.run_dir("failed").config)]


def test_the_log_shows_what_the_worker_wrote(jobs):
    run = finished_run(jobs)
    run.log.write_text("")  # the logger had nothing to say: the worker's output is in worker.out
    run.stdout.write_text("".join(f"line {i}\n" for i in range(100)) + "runs/r/output/lora.safetensors\n")
    log = monitor_tab.refresh(jobs, "r", None)[5]
    assert log.splitlines()[-1] == "runs/r/output/lora.safetensors" and len(log.splitlines()) == 40
    run.stdout.unlink()  # trained from the command line: worker.log is all there is
    run.log.write_text("2024-05-01 12:00:00 INFO trainer: removed state/step-00000004.tmp\n")
    assert "removed state/step-00000004.tmp" in monitor_tab.refresh(jobs, "r", None)[5]


def test_the_log_tail_is_what_a_terminal_shows_and_opens_at_its_end(jobs):
    run = finished_run(jobs)
    bars = "".join(f"\r{p:3d}%|{'#' * (p // 10):10}| {p // 5}/20" for p in range(0, 101, 5))
    run.stdout.write_text(f"Loading weights:   0%|          | 0/36 [00:00<?, ?it/s]\x1b[A\r\x1b[32mdone\x1b[0m\r\n"
                          f"Held out 1 <of> 6 pictures\n{bars}\n\n")
    log = monitor_tab.refresh(jobs, "r", None)[5]
    assert log.splitlines() == ["done", "Held out 1 &lt;of&gt; 6 pictures", "100%|##########| 20/20"]
    run.stdout.write_text("a partial bar\r 35%|###")  # still being drawn: its newest drawing
    assert log_tail(run) == " 35%|###"
    with gr.Blocks():
        tab = monitor_tab.build()
    assert isinstance(tab.log, gr.HTML) and "column-reverse" in tab.log.css_template  # a box shown from its end


def test_cancel_and_resume_say_so_in_a_toast_and_leave_the_heading(jobs, capsys):
    finished_run(jobs)
    title, *_, view = monitor_tab.refresh(jobs, "r", None)
    with pytest.warns(UserWarning, match="r is done; only a cancelled, interrupted or failed run can resume"):
        assert monitor_tab.resume(jobs, "r") == UNCHANGED
    with pytest.warns(UserWarning, match="r is done: there is nothing to cancel"):
        assert monitor_tab.cancel(jobs, "r") == UNCHANGED
    assert title == "### r — done" and monitor_tab.refresh(jobs, "r", view)[0] == UNCHANGED
    create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="queued", name="q")
    assert monitor_tab.cancel(jobs, "q") == UNCHANGED and jobs.info("q").state == "cancelled"
    assert "q: cancelled (cancelled before it started)" in capsys.readouterr().out  # gr.Info, outside a page


def test_deleting_the_shown_run_empties_the_monitor_and_the_runs_tab(jobs):
    finished_run(jobs)
    *_, view = monitor_tab.refresh(jobs, "r", None)
    runs_tab.delete(jobs, "r", current="r")
    assert runs_tab.delete(jobs, "r", "r", "r")[:4] == ("Deleted r.", "", None, "")  # the Runs tab's files, best line
    off = {"__type__": "update", "interactive": False}
    empty = [monitor_tab.NO_RUN, "", None, [], None, "", "", off, off | {"value": "Resume"}, None]
    assert monitor_tab.refresh(jobs, "r", view) == empty  # a tick between the delete and the cleared id
    assert monitor_tab.refresh(jobs, "", view) == empty
    assert monitor_tab.refresh(jobs, "", None)[:9] == [UNCHANGED] * 9  # then nothing more is sent


def test_cancel_resume_and_delete_write_what_they_change(jobs, tmp_path):
    from ui.app import build_app

    demo = build_app(tmp_path / "runs", tmp_path / "models", jobs=jobs)
    by_elem = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    events = {(t[0], t[1]): fn for fn in demo.fns.values() for t in fn.targets}
    for button in ("monitor-cancel", "monitor-resume"):  # the heading is left alone (gr.update()), the Train tab too
        assert events[(by_elem[button]._id, "click")].outputs == [by_elem["monitor-title"]]
    delete = events[(by_elem["runs-delete"]._id, "click")]
    assert delete.outputs[2:4] == [by_elem["runs-files"], by_elem["runs-best"]] and delete.outputs[5] == by_elem[
        "runs-delete"]
    assert by_elem["sweep-action"] in events[(by_elem["sweep-delete"]._id, "click")].outputs


def test_cancel_and_resume_can_be_clicked_only_when_they_would_act(jobs):
    finished_run(jobs)
    *_, cancel, resume, view = monitor_tab.refresh(jobs, "r", None)
    assert (cancel["interactive"], resume["interactive"]) == (False, False)  # done: nothing to cancel or resume
    jobs.run_dir("r").write_status(state="cancelled", message="stopped; resumable")
    *_, cancel, resume, view = monitor_tab.refresh(jobs, "r", view)
    assert (cancel["interactive"], resume["interactive"]) == (False, True)
    assert monitor_tab.refresh(jobs, "r", view)[7:9] == [UNCHANGED] * 2  # sent again only when the state changes
    assert runs_tab.cancel(jobs, "r") == "⚠ r was cancelled: there is nothing to cancel"
    assert [u["interactive"] for u in runs_tab.run_buttons(jobs, "r")] == [False, True]
    assert runs_tab.resume(jobs, "r").startswith("r: queued") and runs_tab.resume(jobs, "") == runs_tab.CHOOSE_FIRST


def test_without_held_out_losses_the_final_file_comes_first(jobs):
    run = finished_run(jobs)
    events = [{"type": "checkpoint", "time": 5, "step": s, "epoch": s // 2, "path": p}
              for s, p in ((2, "output/lora-000001.safetensors"), (4, "output/lora-000002.safetensors"),
                           (6, "output/lora.safetensors"))]
    for e in events:
        (run.path / e["path"]).write_bytes(b"x")
    with open(run.events, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    want = [str(run.output / n) for n in ("lora.safetensors", "lora-000002.safetensors", "lora-000001.safetensors")]
    assert monitor_tab.refresh(jobs, "r", None)[4] == runs_tab.files_of(jobs, "r") == [*want, str(run.config)]


def test_train_handlers(tmp_path):
    from tests.test_training import draw_dataset

    jobs = JobManager(tmp_path / "runs", python=fake_worker(tmp_path), devices=[])
    values = train_tab.on_preset("style", "demo")
    form = {n: v["value"] for n, v in zip(train_tab.FIELDS, values)}
    assert values[-1].startswith("A") and form["resolution"] == 64  # the demo base trains at 64 px
    n = len(train_tab.FIELDS)
    out = train_tab.on_train(jobs, "demo", "style", "", "", *form.values())
    assert out[n].startswith("⚠ Add pictures")
    assert out[n + 1:] == [{"__type__": "update"}] * 3  # QA 28: a refusal wrote "" into the Monitor's run
    folder = str(draw_dataset(tmp_path / "pictures"))
    bad = train_tab.on_train(jobs, "demo", "style", folder, "zxq", *(form | {"network_alpha": -1}).values())
    alpha = train_tab.FIELDS.index("network_alpha")
    assert bad[alpha]["info"] == "⚠ Alpha = -1.0: must be > 0 and <= 1024"  # the form's label, not the config key
    assert bad[alpha]["elem_classes"] == ["field-error"] and bad[n] == bad[alpha]["info"]
    # QA 8: every bad field at once, not one a click; the others keep their help
    worse = form | {"network_dim": 0, "resolution": 100, "sample_prompts": "", "train_batch_size": None}
    bad = train_tab.on_train(jobs, "demo", "style", folder, "zxq", *worse.values())
    marked = {name for name, u in zip(train_tab.FIELDS, bad) if u["elem_classes"] == ["field-error"]}
    assert marked == {"network_dim", "resolution", "train_batch_size"}
    assert bad[n] == ("⚠ Batch size is empty: type a number (>= 1 and <= 256); marked in the form too: Dim, "
                      "Resolution")  # QA F15: where they are, not "marked below" (they are above)
    hidden = train_tab.on_train(jobs, "demo", "style", folder, "zxq", *(form | {"max_timestep": 200,
                                                                                "min_timestep": 800}).values())
    assert hidden[n] == "⚠ Min timestep = 800: must be below Max timestep (200) (under Advanced)"  # QA F15, F17
    assert train_tab.stale_status(bad[n]) == "" and train_tab.stale_status("Queued **r**.") == UNCHANGED
    mark, kept, status = train_tab.on_edit("network_dim", bad[n], "demo", "style", *form.values())
    assert mark == train_tab.unmarked("network_dim") and status == "" and kept["values"] == form
    assert not any((tmp_path / "runs").glob("2*"))
    good = train_tab.on_train(jobs, "demo", "style", folder, "zxq", *form.values())
    run_id = good[n + 2]
    assert good[n] == f"Queued **{run_id}**." and good[n + 1].selected == "monitor"
    wait_for(lambda: launched(jobs.run_dir(run_id)))
    cfg = config.load(jobs.run_dir(run_id).config)
    assert cfg.data.trigger_word == "zxq" and cfg.network.network_train_unet_only  # style: the UNet alone
    (jobs.run_dir(run_id).path / "finish").touch()
    jobs.tick()
    typed = train_tab.on_train(jobs, "demo", "style", folder, "zxq", *(form | {"text_encoder_lr": 5e-5}).values())
    cfg = config.load(jobs.run_dir(typed[n + 2]).config)  # a rate typed where the form says "0 = frozen" trains it
    assert cfg.optimizer.text_encoder_lr == 5e-5 and not cfg.network.network_train_unet_only
    (jobs.run_dir(typed[n + 2]).path / "finish").touch()


def test_an_error_names_the_settings_as_the_form_labels_them():
    e = config.ConfigError("training.zero_terminal_snr", 'training.zero_terminal_snr = true: it is for v-prediction '
                           'models; set it false, or model.prediction_type = "v_prediction", or data.nowhere = 1')
    assert train_tab.in_form_words(e) == ('Zero terminal SNR = true: it is for v-prediction models; set it false, '
                                          'or Prediction type = "v_prediction", or data.nowhere = 1')
    assert train_tab.unmarked("network_dim") == {"__type__": "update", "info": train_tab.hint_of("network_dim"),
                                                 "elem_classes": []}


def test_a_reload_puts_the_form_back_as_it_was_and_ignores_what_is_not_a_form():
    n = len(train_tab.FIELDS)
    fresh = train_tab.on_page_load({}, "character", "demo")
    assert fresh[:2] == [UNCHANGED, UNCHANGED] and fresh[2:] == train_tab.on_base("character", "demo", "")
    form = {v: u["value"] for v, u in zip(train_tab.FIELDS, train_tab.on_preset("style", "demo"))}
    saved = train_tab.remembered("demo", "style", *(form | {"network_dim": 24, "sample_prompts": "a\nb"}).values())
    base, preset, *fields, info, key = train_tab.on_page_load(saved, "character", "demo")
    values = dict(zip(train_tab.FIELDS, (u["value"] for u in fields)))
    assert (base, preset, key, len(fields)) == ("demo", "style", "demo", n) and info.startswith("An art style")
    assert values == form | {"network_dim": 24, "sample_prompts": "a\nb"}
    bad = saved | {"values": saved["values"] | {"network_dim": {"x": 1}, "resolution": [1]}}  # not a form's values
    values = dict(zip(train_tab.FIELDS, (u["value"] for u in train_tab.on_page_load(bad, "character", "demo")[2:-2])))
    assert (values["network_dim"], values["resolution"]) == (form["network_dim"], form["resolution"])
    for junk in (None, "x", {"preset": "nope", "base": "demo", "values": {"network_dim": 2}}, saved | {"base": 3}):
        assert train_tab.on_page_load(junk, "character", "demo") == fresh


def test_a_preset_clicked_says_which_values_it_changed():
    """QA s28 F21: a preset clicked after an edit put its own values back without a word."""
    form = {n: u["value"] for n, u in zip(train_tab.FIELDS, train_tab.on_preset("character", "demo"))}
    *fields, info = train_tab.on_preset_click("character", "demo", *(form | {"network_dim": 8}).values())
    assert fields[train_tab.FIELDS.index("network_dim")]["value"] == form["network_dim"]
    assert info.endswith(f"_The preset set Dim 8 → {form['network_dim']}._")
    *_, info = train_tab.on_preset_click("character", "demo", *form.values())
    assert "The preset set" not in info  # nothing it changed


def test_a_fields_hint_gives_the_range_it_accepts():
    assert train_tab.hint_of("network_alpha") == "scale = alpha / dim (above 0, up to 1024)"  # 0 is refused
    assert train_tab.hint_of("lokr_factor").endswith("; -1 = automatic (-1 to 64)")
    with pytest.raises(config.ConfigError, match="network_alpha = 0"):  # as the hint says
        config.build("character", "sd15", {"network_alpha": 0})


def test_a_kohya_toml_fills_the_form_and_says_what_it_left(tmp_path):
    form = {n: v["value"] for n, v in zip(train_tab.FIELDS, train_tab.on_preset("character", "demo"))}
    kohya = tmp_path / "my_lora.toml"
    kohya.write_text('pretrained_model_name_or_path = "/models/sd15.safetensors"\nnetwork_module = "lycoris.kohya"\n'
                     'network_args = ["algo=lokr", "factor=8"]\nnetwork_dim = 16\nlearning_rate = 3e-4\n'
                     'network_train_unet_only = true\noptimizer_type = "DAdaptation"\n'
                     'optimizer_args = ["betas=0.9,0.99"]\nmax_timestep = 800\noutput_dir = "/out"\n'
                     'sample_prompts = "prompts.txt"\n')
    (tmp_path / "prompts.txt").write_text("# mine\nzxq --n lowres\nzxq, smiling\n")
    out = train_tab.on_import(str(kohya), "demo", "character", *form.values())
    now = {n: u.get("value", form[n]) for n, u in zip(train_tab.FIELDS, out)}
    assert (now["network_type"], now["lokr_factor"], now["network_dim"], now["unet_lr"]) == ("lokr", 8, 16, 3e-4)
    assert now["text_encoder_lr"] == 0.0 and now["max_timestep"] == 800  # network_train_unet_only: frozen
    assert now["optimizer_args"] == "betas=0.9,0.99" and now["sample_prompts"] == "zxq --n lowres\nzxq, smiling"
    assert now["optimizer_type"] == form["optimizer_type"] == "AdamW"  # refused by the config: left as it was
    note = out[-1]
    assert note.startswith("Imported **my_lora.toml**: ")
    assert "optimizer.optimizer_type = 'DAdaptation': choose one of AdamW, " in note and "; left as it was" in note
    assert "output_dir: a kohya option with no effect here" in note
    assert "pretrained_model_name_or_path: the base above and the Dataset tab's pictures are used instead" in note
    cfg = config.build("character", "sd15", train_tab.form_layer(train_tab.FIELDS, list(now.values())))
    assert cfg.optimizer.optimizer_args == ["betas=0.9,0.99"] and cfg.network.lokr_factor == 8
    kohya.write_text("network_dim = [")
    assert train_tab.on_import(str(kohya), "demo", "character", *form.values())[-1].startswith(
        "⚠ my_lora.toml: not a TOML file")
    kohya.write_text('network_module = "networks.dylora"\n')
    assert "networks.dylora" in train_tab.on_import(str(kohya), "demo", "character", *form.values())[-1]


def test_a_cancelled_run_says_which_file_holds_what():
    """QA 32: a cancel saves a resumable state, not a LoRA: the steps since the newest file are in no download."""
    saved = {"type": "checkpoint", "step": 400, "epoch": 2, "path": "output/lora-000002.safetensors"}
    state = {"type": "checkpoint", "step": 600, "epoch": 3, "path": "state/step-00000600"}
    cancelled = {"type": "cancelled", "step": 600}
    assert RunView().add([saved, state, cancelled]).message == (
        "Cancelled at step 600: resumable (the newest file, lora-000002.safetensors, holds step 400; Resume trains on "
        "from step 600)")
    assert RunView().add([state, cancelled]).message == (
        "Cancelled at step 600: resumable (no LoRA file is saved yet; Resume trains on from step 600)")
    assert RunView().add([saved, {"type": "cancelled", "step": 400}]).message == "Cancelled at step 400: resumable"


def test_one_request_a_second_redraws_the_page_and_sends_only_what_changed(jobs, tmp_path):
    """Five tick events a second (Monitor, Runs table, Runs chooser, Compare, Sweeps) kept the browser too busy to
    type in: a field's edit took ~4 s. One tick now, and a second tick with nothing new sends nothing."""
    from ui.app import build_app

    finished_run(jobs)
    demo = build_app(tmp_path / "runs", tmp_path / "models", jobs=jobs)
    ticks = [fn for fn in demo.fns.values() if any(t[1] == "tick" and demo.blocks[t[0]].active for t in fn.targets)]
    assert len(ticks) == 1  # the captioner's poll ticks only while it runs
    tick = ticks[0]
    shown = {getattr(b, "elem_id", None) for b in tick.outputs}
    assert {"monitor-title", "monitor-loss", "runs-table", "runs-choose", "compare-grid", "sweep-table",
            "sweep-choose"} <= shown
    values = {id(c): getattr(c, "value", None) for c in tick.inputs}
    for round_ in range(2):
        answers = tick.fn(*[values[id(c)] for c in tick.inputs])
        assert len(answers) == len(tick.outputs)
        sent = [(b, a) for b, a in zip(tick.outputs, answers) if not isinstance(b, gr.State)]
        for b, a in zip(tick.outputs, answers):
            if isinstance(b, gr.State) and id(b) in values:
                values[id(b)] = a  # what the page holds for the next tick
        if round_ == 0:
            rows = next(a for b, a in sent if b.elem_id == "runs-table")
            assert [r[:3] for r in rows] == [["r", "done", "3 / 6"]]  # finished_run's last step event
    assert {b.elem_id: a for b, a in sent if a != UNCHANGED} == {}


def test_a_tick_handler_that_answers_the_wrong_count_is_named():
    """One handler answering too few values would shift every later part's answer onto the wrong component."""
    from ui.app import every_second

    with gr.Blocks() as demo:
        first, second, third = gr.Markdown(), gr.Markdown(), gr.Markdown()
        every_second(gr.Timer(1.0), [(lambda: ["a"], [], [first, second]), (lambda: ["c"], [], [third])])
    (tick,) = demo.fns.values()
    with pytest.raises(RuntimeError, match=r"answered 1 values for its 2 outputs"):
        tick.fn()
