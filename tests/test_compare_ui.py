"""The Compare tab's handlers and the compare job manager, with a fake worker: a small script that writes the
events of the contract (compare_file, compare_cell, done, cancelled, error), so none of this needs the real one."""

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from trainer import config
from trainer.rundir import RunDir, create
from ui import compare_tab
from ui.compares import CompareInfo, CompareManager, CompareView, free_gpu, run_files
from ui.jobs import JobManager

ROOT = Path(__file__).resolve().parent.parent
UNCHANGED = {"__type__": "update"}
FAKE_WORKER = f"""#!{sys.executable}
# Stands in for `python -m trainer compare FOLDER`. A file with "sdxl" in its name does not fit the base; "crash"
# makes it die without a word; "slow-start" sets up its SIGTERM handler only after 30 s (a SIGTERM before kills it).
# While the compares folder holds a file "hold" with a number N, it draws N cells and waits. SIGTERM: stop after the
# current cell.
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from PIL import Image
from trainer.rundir import RunDir

folder = Path(sys.argv[-1])
spec = json.loads((folder / "compare.json").read_text())
hold, stop = folder.parent / "hold", []
if any("slow-start" in f for f in spec["files"]):  # as the real one, importing torch: SIGTERM kills it
    time.sleep(30)
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
RunDir(folder).write_status(state="running", message="drawing", pid=os.getpid())

def emit(type, **fields):
    with open(folder / "events.jsonl", "a") as f:
        f.write(json.dumps({{"type": type, "time": time.time(), **fields}}) + "\\n")

def end(state, message, code):
    RunDir(folder).write_status(state=state, message=message, pid=None)
    sys.exit(code)

if any("crash" in f for f in spec["files"]):
    sys.exit(1)
emit("status", phase="compare", message="loading the base")
usable = []
for i, (path, label) in enumerate(zip(spec["files"], spec["labels"])):
    problem = "made for SDXL, the base is SD 1.5" if "sdxl" in Path(path).name else ""
    emit("compare_file", index=i, label=label, arch="sd1", method="lora", held_out=None, problem=problem)
    usable += [] if problem else [i]
if not usable:
    emit("error", message="no usable file: every file was skipped")
    end("failed", "no usable file", 2)
rows = [(None, s) for s in spec["strengths"] if s == 0] + [(f, s) for f in usable for s in spec["strengths"] if s]
(folder / "cells").mkdir(exist_ok=True)
drawn = 0
for file, strength in rows:
    for prompt in range(len(spec["prompts"])):
        for seed in spec["seeds"]:
            while not stop and hold.is_file() and drawn >= int(hold.read_text() or 0):
                time.sleep(0.02)
            if stop:
                emit("cancelled", step=drawn)
                end("cancelled", f"stopped after {{drawn}} cell(s)", 3)
            emit("status", phase="compare", message=f"file {{file}} at {{strength}}")
            path = f"cells/{{file}}-{{strength}}-{{prompt}}-{{seed}}.png"
            Image.new("RGB", (8, 8), (drawn * 40 % 256, 0, 0)).save(folder / path)
            emit("compare_cell", file=file, strength=strength, prompt=prompt, seed=seed, path=path, held_out=None)
            drawn += 1
Image.new("RGB", (16, 16)).save(folder / "grid.png")
emit("done", path="grid.png")
end("done", "", 0)
"""


def fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake-compare-python"
    script.write_text(FAKE_WORKER)
    script.chmod(0o755)
    return str(script)


def lora(path: Path, **meta) -> Path:
    """A small .safetensors file with this metadata (the fake worker never reads its tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.alpha": np.ones((), dtype=np.float32)}, str(path), metadata=meta)
    return path


def wait_for(check, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture()
def jobs(tmp_path):
    jobs = JobManager(tmp_path / "runs", devices=[])
    jobs.tick = lambda: None  # the runs here are written by the tests, never trained
    return jobs


@pytest.fixture()
def compares(tmp_path):
    manager = CompareManager(tmp_path / "compares", python=fake_python(tmp_path))
    yield manager
    (tmp_path / "compares" / "hold").unlink(missing_ok=True)  # let a held worker finish
    for proc in manager._procs.values():
        proc.wait(timeout=20)


def trained_run(jobs, name="r", **settings):
    """A finished run with two saved epochs and the final file; epoch 1 has a held-out loss in its events and its
    metadata, epoch 2 none, the final file one in its metadata only."""
    cfg = config.build("character", "sd15", {"trigger_word": "zxq", "resolution": 64, "sample_steps": 7} | settings)
    run = create(jobs.runs_dir, cfg, lambda d: d.mkdir(), state="done", name=name)
    lora(run.output / "lora-000001.safetensors", ss_epoch="1", ss_steps="4", ss_validation_loss="0.1234")
    lora(run.output / "lora-000002.safetensors", ss_epoch="2", ss_steps="8")
    lora(run.output / "lora.safetensors", ss_epoch="3", ss_steps="12", ss_validation_loss="0.25")
    events = [{"type": "checkpoint", "time": 1, "step": 4, "epoch": 1, "path": "output/lora-000001.safetensors"},
              {"type": "validation", "time": 1, "step": 4, "epoch": 1, "loss": 0.1234}]
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def form(**changes) -> list:
    """The Compare tab's settings, in the order of compare_tab.SETTINGS."""
    values = {"base": "demo", "prompts": "a red circle", "negative": "", "strengths": "0, 1", "seeds": "7",
              "steps": 4, "sampler": "euler_a", "cfg_scale": 7.0, "width": 64, "height": 64} | changes
    return [values[n] for n in compare_tab.SETTINGS]


def hold(compares, cells: int) -> None:
    compares.compares_dir.mkdir(parents=True, exist_ok=True)
    (compares.compares_dir / "hold").write_text(str(cells))


def release(compares) -> None:
    (compares.compares_dir / "hold").unlink()


def refreshed(compares, compare_id, view, until: str, line: str = "progress"):
    """refresh() until the progress (or status) line matches `until`: (progress, problems, grid, download, status,
    view), each as last sent."""
    seen = {}
    names = ("progress", "problems", "grid", "download", "status")

    def check():
        *sent, new_view = compare_tab.refresh(compares, compare_id, seen.get("view", view))
        seen.update(view=new_view)
        seen.update({name: value for name, value in zip(names, sent) if value != UNCHANGED})
        return re.search(until, seen.get(line, "")) and seen

    found = wait_for(check)
    return (*(found.get(name) for name in names), found["view"])


def test_a_runs_files_are_offered_with_their_held_out_loss_and_settings(jobs):
    run = trained_run(jobs)
    assert [(f["name"], f["label"], f["held_out"]) for f in run_files(run)] == [
        ("lora-000001.safetensors", "r / lora-000001 (epoch 1, step 4)", 0.1234),
        ("lora-000002.safetensors", "r / lora-000002 (epoch 2, step 8)", None),
        ("lora.safetensors", "r / lora (epoch 3, step 12)", 0.25)]
    files, note, suggested_by, base, prompts, seeds, steps, sampler, cfg, width, height, memory = (
        compare_tab.choose_runs(jobs, ["r"], ""))
    assert [text for text, _ in files["choices"]] == [
        "r / lora-000001 (epoch 1, step 4) · held-out 0.1234", "r / lora-000002 (epoch 2, step 8)",
        "r / lora (epoch 3, step 12) · held-out 0.2500"]
    assert files["value"] == [str((run.output / n).resolve()) for n in
                              ("lora-000001.safetensors", "lora-000002.safetensors", "lora.safetensors")]
    assert note == "3 saved file(s), all ticked." and suggested_by == "r" and memory["shown"] == files["value"]
    assert compare_tab.run_choices(jobs) == {"__type__": "update", "choices": ["r"]}
    assert compare_tab.run_choices(jobs, "r") == {"__type__": "update", "choices": ["r"], "value": ["r"]}
    assert (base, steps, seeds, width, height) == ("demo", 7, "1234", 64, 64)
    assert prompts.splitlines() == ["zxq, portrait, looking at viewer", "zxq, full body, standing outdoors"]


def test_a_run_with_no_files_yet_says_so(jobs):
    create(jobs.runs_dir, config.build("character", "sd15"), lambda d: d.mkdir(), state="running", name="new")
    files, note, *_ = compare_tab.choose_runs(jobs, ["new"], "")
    assert files["choices"] == [] and note.startswith("⚠ new has no saved files yet")
    assert compare_tab.choose_runs(jobs, ["../new"], "")[1].startswith("⚠ run id")


def test_the_grid_grows_cell_by_cell_and_ends_with_grid_png(jobs, compares):
    run = trained_run(jobs)
    chosen = [f["path"] for f in run_files(run)][:2]
    hold(compares, 1)
    status, compare_id, view = compare_tab.on_compare(compares, jobs, ["r"], chosen, [], *form())
    assert status == f"Compare **{compare_id}** running: 2 files × 2 strengths × 1 prompt × 1 seed." and view is None
    progress, problems, grid, download, status, view = refreshed(compares, compare_id, view, r"Cell 2 / 4")
    assert "file None at 0.0" in progress  # the worker's own status line
    # the base (strength 0) is drawn once and shown in both rows; strength 1 is still to come
    assert grid.count('<img src="data:image/png;base64,') == 2 and grid.count("…</td>") == 2
    assert "r / lora-000001 (epoch 1, step 4)<br><small>held-out loss 0.1234</small>" in grid
    assert "prompt 1: a red circle · seed 7" in grid and "strength 0</th><th>strength 1</th>" in grid
    assert problems == "" and download is None
    release(compares)
    progress, problems, grid, download, status, view = refreshed(compares, compare_id, view, r"done")
    assert progress == "Cell 4 / 4 · done" and grid.count("<img") == 4 and "…" not in grid
    assert download == str(compares.folder(compare_id) / "grid.png")
    assert compare_tab.refresh(compares, compare_id, view)[:5] == [UNCHANGED] * 5  # nothing new: nothing sent
    spec = compares.spec(compare_id)
    assert spec["labels"] == ["r / lora-000001 (epoch 1, step 4)", "r / lora-000002 (epoch 2, step 8)"]
    assert spec["strengths"] == [0.0, 1.0] and spec["seeds"] == [7] and spec["prompts"] == ["a red circle"]


def test_the_status_line_follows_the_compare_on_the_timer(jobs, compares):
    """The line under the buttons says what the compare is now, sent on each tick like the progress line (QA saw
    "running" beside "Cell 16 / 16 · done" until a reload); the cancelled and failed ends are checked below."""
    run = trained_run(jobs)
    hold(compares, 1)
    said, compare_id, view = compare_tab.on_compare(compares, jobs, ["r"], [run_files(run)[0]["path"]], [], *form())
    shape = "1 file × 2 strengths × 1 prompt × 1 seed."
    assert said == f"Compare **{compare_id}** running: {shape}"
    *_, status, view = refreshed(compares, compare_id, view, r"Cell 1 / 2")
    assert status == said
    assert compare_tab.refresh(compares, compare_id, None)[5] == {"__type__": "update", "interactive": True}
    release(compares)
    progress, *_, status, view = refreshed(compares, compare_id, view, "done")
    assert progress == "Cell 2 / 2 · done" and status == f"Compare **{compare_id}** done: {shape}"
    assert compare_tab.refresh(compares, compare_id, view)[4] == UNCHANGED  # sent once
    assert compare_tab.refresh(compares, compare_id, None)[5] == {"__type__": "update", "interactive": False}


def test_the_cell_total_is_an_upper_bound_until_every_file_is_checked(tmp_path):
    """The worker checks every file against the base before it draws; until it has said of each whether it is
    skipped, the total is "up to" (QA saw 20 turn into 16). Then the status line counts the skipped files and the
    problems line says which and why."""
    spec = {"files": ["a.safetensors", "an-sdxl.safetensors"], "labels": ["a", "an-sdxl"], "strengths": [0.0, 1.0],
            "prompts": ["p"], "seeds": [7]}
    view, info = CompareView("c", tmp_path, spec), CompareInfo("c", tmp_path, "running", "", 0.0)
    view.add({"type": "status", "message": "checking the files"})
    view.add({"type": "compare_file", "index": 0, "problem": ""})
    assert compare_tab.progress_line(info, view) == "Cell 0 / up to 4 · checking the files"
    view.add({"type": "compare_file", "index": 1, "problem": "made for SDXL, the base is SD 1.5"})
    assert compare_tab.progress_line(info, view) == "Cell 0 / 2 · checking the files"
    assert compare_tab.status_line(info, view) == ("Compare **c** running (1 skipped, see below): 2 files × "
                                                   "2 strengths × 1 prompt × 1 seed.")
    assert view.problems_text() == "⚠ an-sdxl: made for SDXL, the base is SD 1.5 (skipped)"


def test_another_page_sees_the_whole_grid(jobs, compares):
    trained_run(jobs)
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, ["r"], [f["path"] for f in run_files(RunDir(
        jobs.runs_dir / "r"))], [], *form())
    first = refreshed(compares, compare_id, None, "done")
    second = compare_tab.refresh(compares, compare_id, None)  # a new view reads the whole history
    assert second[:5] == list(first[:5])


def test_a_reload_shows_the_form_the_compare_was_asked_for(jobs, compares):
    run = trained_run(jobs)
    trained_run(jobs, "other")
    saved = [f["path"] for f in run_files(run)]
    asked = form(prompts="a red circle\na blue square", strengths="0, 0.5, 1", seeds="7, 8", steps=3)
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, ["r"], saved[1:], [], *asked)
    runs, files, suggested_by, memory, status, *settings, restored = compare_tab.open_tab(
        compares, jobs, compare_id, [], False)
    assert runs["value"] == ["r"] and sorted(files["value"]) == saved[1:] and suggested_by == "r"
    assert memory == {"shown": saved, "ticks": {saved[0]: False, saved[1]: True, saved[2]: True}}
    assert status.startswith(f"Compare **{compare_id}** ") and status.endswith(
        ": 2 files × 3 strengths × 2 prompts × 2 seeds.")
    assert settings == asked and restored is True
    # the runs chooser's change then lists the run's files with only the drawn ones ticked, the settings kept
    again = compare_tab.choose_runs(jobs, runs["value"], suggested_by, memory)
    assert again[0]["value"] == saved[1:] and again[3:-1] == [UNCHANGED] * len(compare_tab.SUGGESTED)
    # once only, and never over runs chosen already (the Runs tab's "Compare this run's files"); no compare, no form
    for args in ((compare_id, [], True), (compare_id, ["other"], False), ("", [], False), ("compare-999", [], False)):
        runs, *rest, restored = compare_tab.open_tab(compares, jobs, *args)
        assert runs == {"__type__": "update", "choices": ["other", "r"]} and restored is True
        assert rest == [UNCHANGED] * (4 + len(compare_tab.SETTINGS))


def test_files_of_several_runs_are_listed_by_run_and_drawn_in_one_grid(jobs, compares, tmp_path):
    trained_run(jobs, "a")
    trained_run(jobs, "b", sample_steps=9, pretrained_model_name_or_path="/models/other.safetensors")
    files, note, suggested_by, base, prompts, seeds, steps, *_ = compare_tab.choose_runs(jobs, ["a", "b"], "")
    texts = [text for text, _ in files["choices"]]
    assert texts[:2] == ["a / lora-000001 (epoch 1, step 4) · held-out 0.1234", "a / lora-000002 (epoch 2, step 8)"]
    assert texts[3:] == ["b / lora-000001 (epoch 1, step 4) · held-out 0.1234", "b / lora-000002 (epoch 2, step 8)",
                         "b / lora (epoch 3, step 12) · held-out 0.2500"]
    assert files["value"] == [path for _, path in files["choices"]] and len(set(files["value"])) == 6
    assert note == ("6 saved file(s) of 2 runs, all ticked.\n\n⚠ b was trained on /models/other.safetensors, a on "
                    "demo: every file is drawn on the base chosen below")
    assert (suggested_by, base, steps) == ("a", "demo", 7)  # the first run suggests the settings
    # adding or removing a run keeps what the form shows; another first run suggests its own
    assert compare_tab.choose_runs(jobs, ["a", "b"], "a")[2:-1] == ["a"] + [UNCHANGED] * len(compare_tab.SUGGESTED)
    assert compare_tab.choose_runs(jobs, ["b", "a"], "a")[2:5] == ["b", "/models/other.safetensors", prompts]
    assert compare_tab.choose_runs(jobs, [], "a")[1:3] == ["", UNCHANGED]

    # adding a run keeps the files unticked in the runs listed before; the new run's files come ticked
    a_files, *_, memory = compare_tab.choose_runs(jobs, ["a"], "")
    memory = compare_tab.remember_ticks(a_files["value"][:1], memory)  # the user unticks a's last two files
    files_ab, note_ab, *_, memory = compare_tab.choose_runs(jobs, ["a", "b"], "a", memory)
    assert files_ab["value"] == files["value"][:1] + files["value"][3:] and memory["shown"] == files["value"]
    assert note_ab.startswith("6 saved file(s) of 2 runs, 4 ticked.")
    # removing every run (Gradio's dropdown passes through [] when set anew) and choosing again keeps them too
    cleared = compare_tab.choose_runs(jobs, [], "a", memory)
    assert cleared[0]["value"] == [] and cleared[2] == UNCHANGED and cleared[-1]["ticks"] == memory["ticks"]
    again = compare_tab.choose_runs(jobs, ["a", "b"], "a", cleared[-1])
    assert again[0]["value"] == files_ab["value"] and again[3:-1] == [UNCHANGED] * len(compare_tab.SUGGESTED)

    chosen = [files["value"][0], files["value"][5]]  # a's first epoch, b's final file
    status, compare_id, _ = compare_tab.on_compare(compares, jobs, ["a", "b"], chosen, [], *form())
    assert status.endswith(": 2 files × 2 strengths × 1 prompt × 1 seed.")
    assert compares.spec(compare_id)["labels"] == ["a / lora-000001 (epoch 1, step 4)", "b / lora (epoch 3, step 12)"]
    progress, problems, grid, *_ = refreshed(compares, compare_id, None, "done")
    assert progress == "Cell 4 / 4 · done" and grid.count("<img") == 4
    assert "a / lora-000001 (epoch 1, step 4)<br><small>held-out loss 0.1234</small>" in grid
    assert "b / lora (epoch 3, step 12)<br><small>held-out loss 0.2500</small>" in grid
    elsewhere = str(lora(tmp_path / "elsewhere.safetensors"))
    status, *_ = compare_tab.on_compare(compares, jobs, ["a", "b"], [chosen[0], elsewhere], [], *form())
    assert status == "⚠ files: elsewhere.safetensors is not a saved file of a or b"
    status, *_ = compare_tab.on_compare(compares, jobs, ["a"], chosen, [], *form())  # b no longer chosen
    assert status == "⚠ files: lora.safetensors is not a saved file of a"


def test_a_reload_shows_the_stored_compare_again(jobs, compares):
    """The page keeps its compare id in the browser's storage; after a reload the view is new and reads the
    compare from its first event, while it is drawn and after it is done."""
    run = trained_run(jobs)
    hold(compares, 1)
    _, compare_id, view = compare_tab.on_compare(compares, jobs, ["r"], [run_files(run)[0]["path"]], [], *form())
    before = refreshed(compares, compare_id, view, r"Cell 1 / 2")
    reloaded = compare_tab.refresh(compares, compare_id, None)
    assert reloaded[:3] == list(before[:3]) and reloaded[2].count("<img") == 1
    assert reloaded[3] is None  # no grid.png yet: a fresh view empties the download (see the test below)
    release(compares)
    done = refreshed(compares, compare_id, before[5], "done")
    reloaded = compare_tab.refresh(compares, compare_id, None)
    progress, problems, grid, download, status, cancel, _ = reloaded
    assert cancel == {"__type__": "update", "interactive": False}  # a done compare has nothing to cancel
    assert (progress, grid, download, status) == (done[0], done[2], done[3], done[4]) and problems == ""
    assert status == f"Compare **{compare_id}** done: 1 file × 2 strengths × 1 prompt × 1 seed."
    assert grid.count("<img") == 2 and download.endswith("grid.png")
    assert "r / lora-000001 (epoch 1, step 4)<br><small>held-out loss 0.1234</small>" in grid
    # a stored id that is not a plain name, or names no compare (any more), is no compare: the page is cleared
    for stored in ("../r", "/etc", "compare-gone", 5):
        assert compare_tab.refresh(compares, stored, done[5]) == [compare_tab.NO_COMPARE, "", "", None, "",
                                                                  {"__type__": "update", "interactive": False}, None]


def test_the_page_stores_its_compare_in_the_browser(jobs, compares, tmp_path):
    import gradio as gr

    from ui.app import build_app

    demo = build_app(tmp_path / "runs", tmp_path / "models", jobs=jobs, compares=compares)
    stored = [b for b in demo.blocks.values() if isinstance(b, gr.BrowserState)
              and b.storage_key == "lora-studio-compare"]
    assert len(stored) == 1
    by_elem = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    events = {(t[0], t[1]): fn for fn in demo.fns.values() for t in fn.targets}
    start = events[(by_elem["compare-start"]._id, "click")]
    assert stored[0] in start.outputs  # Compare writes the id there ...
    ticks = [fn for fn in demo.fns.values() if by_elem["compare-grid"] in fn.outputs]
    assert len(ticks) == 1 and stored[0] in ticks[0].inputs  # ... and the grid is redrawn from it
    assert by_elem["compare-status"] in ticks[0].outputs  # with the status line, on the same tick


def test_bad_settings_name_the_field_and_start_nothing(jobs, compares, tmp_path):
    run = trained_run(jobs)
    chosen = [run_files(run)[0]["path"]]
    for changes, message in (({"strengths": "0, 3"}, "⚠ strengths: each must be in [-2, 2] (got 3.0)"),
                             ({"strengths": "half"}, "⚠ strengths: expected numbers separated by commas"),
                             ({"width": 100}, "⚠ width: must be a multiple of 8 (got 100)"),
                             ({"steps": 0}, "⚠ steps: must be a whole number in [1, 150] (got 0)"),
                             ({"prompts": "  \n "}, "⚠ prompts: give 1 to 8 (got 0)"),
                             ({"base": ""}, "⚠ base: choose the base model")):
        status, compare_id, view = compare_tab.on_compare(compares, jobs, ["r"], chosen, [], *form(**changes))
        assert status.startswith(message), status
        assert compare_id == view == UNCHANGED
    status, *_ = compare_tab.on_compare(compares, jobs, ["r"], [], [], *form())
    assert status == "⚠ files: tick some of the runs' saved files or drop .safetensors files"
    elsewhere = str(lora(tmp_path / "elsewhere.safetensors"))
    status, *_ = compare_tab.on_compare(compares, jobs, ["r"], [elsewhere], [], *form())
    assert status == "⚠ files: elsewhere.safetensors is not a saved file of r"
    assert compares.compares() == []


def test_dropped_files_are_copied_and_one_for_another_base_is_skipped(jobs, compares, tmp_path):
    good = lora(tmp_path / "drop" / "mine.safetensors", ss_epoch="5", ss_validation_loss="0.5")
    other = lora(tmp_path / "drop" / "an-sdxl-file.safetensors")
    status, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(good), str(other)], *form())
    assert status.endswith(": 2 files × 2 strengths × 1 prompt × 1 seed.")
    progress, problems, grid, download, status, _ = refreshed(compares, compare_id, None, "done")
    assert problems == "⚠ an-sdxl-file: made for SDXL, the base is SD 1.5 (skipped)"
    assert status == (f"Compare **{compare_id}** done (1 skipped, see below): 2 files × 2 strengths × 1 prompt × "
                      "1 seed.")  # the problems line says which file and why
    assert progress == "Cell 2 / 2 · done"  # the skipped file's cells are not waited for
    assert "mine (epoch 5)<br><small>held-out loss 0.5000</small>" in grid
    assert "⚠ skipped: made for SDXL, the base is SD 1.5" in grid
    copies = sorted(p.name for p in (compares.folder(compare_id) / "files").iterdir())
    assert copies == ["00", "01"]  # a folder each: the copies keep the names they were dropped with, which the
    files = compares.spec(compare_id)["files"]  # worker's messages name (QA saw "02-notalora.safetensors")
    assert files == [str(compares.folder(compare_id) / "files" / "00" / "mine.safetensors"),
                     str(compares.folder(compare_id) / "files" / "01" / "an-sdxl-file.safetensors")]


def test_cancel_stops_after_the_current_cell_and_keeps_the_cells(jobs, compares):
    run = trained_run(jobs)
    hold(compares, 1)
    _, compare_id, view = compare_tab.on_compare(compares, jobs, ["r"], [run_files(run)[0]["path"]], [], *form())
    progress, *_, view = refreshed(compares, compare_id, view, r"Cell 1 / 2")
    pid = compares.info(compare_id).pid
    assert compare_tab.cancel_message(compares, compare_id).startswith(f"Cancelling compare {compare_id}: ")
    progress, problems, grid, download, status, view = refreshed(compares, compare_id, view, "cancelled")
    assert progress == "Cell 1 / 2 · cancelled" and grid.count("<img") == 1 and download is None
    assert status == f"Compare **{compare_id}** cancelled: 1 file × 2 strengths × 1 prompt × 1 seed."
    wait_for(lambda: compares.info(compare_id).state == "cancelled")  # the events say so before the worker exits
    assert compares.info(compare_id).summary() == f"{compare_id}: cancelled (stopped after 1 cell(s))"
    assert not Path(f"/proc/{pid}").exists()
    assert compare_tab.cancel_message(compares, "") == "⚠ No compare to cancel."


def test_a_worker_that_dies_is_shown_failed_with_its_log(jobs, compares, tmp_path):
    crash = lora(tmp_path / "crash.safetensors")
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(crash)], *form())
    progress, *_, status, _ = refreshed(compares, compare_id, None, "failed")
    assert progress.startswith("Cell 0 / up to 2 · failed: the compare worker stopped without finishing (exit "
                               "status 1)")  # it died before it checked the file: 2 cells, or none
    assert status == f"Compare **{compare_id}** failed: 1 file × 2 strengths × 1 prompt × 1 seed."
    assert "worker.out" in progress


def test_no_usable_file_is_an_error_line(jobs, compares, tmp_path):
    only = lora(tmp_path / "sdxl.safetensors")
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(only)], *form())
    progress, problems, *_ = refreshed(compares, compare_id, None, "failed")
    assert problems.endswith("⚠ no usable file: every file was skipped")
    wait_for(lambda: compares.info(compare_id).state == "failed")  # once the worker has exited


def test_one_compare_at_a_time_and_none_on_a_busy_gpu(jobs, compares, tmp_path):
    first_file, second_file = lora(tmp_path / "a.safetensors"), lora(tmp_path / "b.safetensors")
    hold(compares, 0)
    _, first, _ = compare_tab.on_compare(compares, jobs, [], [], [str(first_file)], *form())
    _, second, _ = compare_tab.on_compare(compares, jobs, [], [], [str(second_file)], *form())
    assert compares.info(first).state == "running" and compares.info(second).state == "queued"
    assert compare_tab.refresh(compares, second, None)[0] == "Queued: waiting for its turn"
    release(compares)
    wait_for(lambda: compares.info(first).state == "done")
    compares.free_device = lambda: None  # every GPU trains
    compares.tick()
    assert compares.info(second).state == "queued"
    assert compares.info(second).message == "waiting for a GPU that no training run is using"
    compares.free_device = lambda: ""
    compares.tick()
    wait_for(lambda: compares.info(second).state == "done")


def test_a_compare_waits_for_a_gpu_no_training_uses(jobs):
    class Run:
        def __init__(self, state, devices):
            self.state, self.devices = state, devices

    class Jobs:
        devices, running = ["0", "1"], []

        def runs(self):
            return self.running

    gpus = Jobs()
    free = free_gpu(gpus)
    assert free() == "0"
    gpus.running = [Run("running", ["0"]), Run("done", ["1"])]
    assert free() == "1"
    gpus.running = [Run("running", ["0"]), Run("running", ["1"])]
    assert free() is None
    gpus.running = [Run("running", [])]  # started before its devices were known
    assert free() is None
    assert free_gpu(jobs)() == ""  # no GPU: compares run beside training


def test_compare_ids_are_plain_names_and_cells_stay_in_their_folder(jobs, compares, tmp_path):
    assert compare_tab.cancel_message(compares, "/etc").startswith("⚠ compare id")
    with pytest.raises(ValueError, match="no compare 'nothing'"):
        compares.info("nothing")
    good = lora(tmp_path / "a.safetensors")
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(good)], *form())
    *_, view = refreshed(compares, compare_id, None, "done")
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert compare_tab.picture(view, "../../secret.png") == ""  # an event is data, not a path to follow


def test_a_flux_runs_files_are_offered_with_its_sampler_guidance_and_split_layout(jobs, compares, tmp_path):
    """A FLUX.1 run trained on a split layout (transformer file + CLIP-L, T5, VAE files, issue #17): its files are
    offered, the form gets flow-matching Euler and FLUX.1's distilled guidance, and the compare it starts carries
    the run's separate files (`parts`), so the worker loads the base as the run did, in bf16 (FLUX.1 dev's
    transformer alone is 48 GB in fp32)."""
    from tests.tiny_models import flow_layouts

    lay = flow_layouts("flux", tmp_path / "models")
    parts = {"clip_l": str(lay["clip_l"]), "t5xxl": str(lay["t5"]), "vae": str(lay["vae"]),
             "t5_tokenizer": str(lay["t5_tokenizer"])}
    cfg = config.build("character", "flux", {"pretrained_model_name_or_path": str(lay["transformer"]),
                                             "trigger_word": "zxq", "resolution": 64} | parts)
    run = create(jobs.runs_dir, cfg, lambda d: d.mkdir(), state="done", name="f")
    lora(run.output / "flux-000001.safetensors", ss_epoch="1", ss_steps="4", ss_base_model_version="flux1",
         ss_validation_loss="0.5")
    files, note, suggested_by, base, prompts, seeds, steps, sampler, cfg_scale, width, height, _ = \
        compare_tab.choose_runs(jobs, ["f"], "")
    assert [text for text, _ in files["choices"]] == ["f / flux-000001 (epoch 1, step 4) · held-out 0.5000"]
    assert (base, sampler, cfg_scale, width, height) == (str(lay["transformer"]), "euler", 3.5, 64, 64)
    assert note == "1 saved file(s), all ticked." and prompts.startswith("zxq")
    values = dict(base=base, prompts=prompts, negative="", strengths="0, 1", seeds=seeds, steps=steps,
                  sampler=sampler, cfg_scale=cfg_scale, width=width, height=height)
    status, compare_id, _ = compare_tab.on_compare(compares, jobs, ["f"], files["value"], [],
                                                   *[values[n] for n in compare_tab.SETTINGS])
    assert status.endswith(": 1 file × 2 strengths × 2 prompts × 1 seed."), status
    spec = compares.spec(compare_id)
    assert (spec["sampler"], spec["cfg_scale"], spec["parts"], spec["precision"]) == ("euler", 3.5, parts, "bf16")
    refreshed(compares, compare_id, None, "done")
    # another base chosen in the form: the run's separate files do not go with it
    status, other, _ = compare_tab.on_compare(compares, jobs, ["f"], files["value"], [],
                                              *[(values | {"base": str(lay["folder"])})[n]
                                                for n in compare_tab.SETTINGS])
    assert compares.spec(other)["parts"] == {}


def test_cancelling_a_compare_that_loads_the_base_is_cancelled_not_failed(jobs, compares, tmp_path):
    """QA C5: Cancel 1.5 s after Compare, while the worker still imports torch and loads the base, before it has set
    up its SIGTERM handler: the signal kills it. The app sent that signal, so the compare was cancelled: no exit
    status, no server path."""
    slow = lora(tmp_path / "slow-start.safetensors")
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(slow)], *form())
    wait_for(lambda: compares.info(compare_id).state == "running")
    compares.cancel(compare_id)
    progress, problems, grid, download, status, _ = refreshed(compares, compare_id, None, "cancelled")
    assert progress == "Cell 0 / up to 2 · cancelled: stopped before its first cell"
    assert status == f"Compare **{compare_id}** cancelled: 1 file × 2 strengths × 1 prompt × 1 seed."
    assert compares.info(compare_id).summary() == f"{compare_id}: cancelled (stopped before its first cell)"
    assert "exit status" not in progress and "worker.out" not in progress and problems == ""


def test_cancel_on_an_ended_compare_says_so_and_leaves_the_status_line(jobs, compares, tmp_path, capsys):
    """QA C3: Cancel on a finished compare replaced its status line with "…: done (10 cells)"."""
    _, compare_id, _ = compare_tab.on_compare(compares, jobs, [], [], [str(lora(tmp_path / "a.safetensors"))],
                                              *form())
    refreshed(compares, compare_id, None, "done")
    assert compare_tab.cancel_message(compares, compare_id) == "Nothing to cancel: the compare is done."
    assert compare_tab.cancel(compares, compare_id) == UNCHANGED  # the status line stays; the toast says why
    assert "Nothing to cancel: the compare is done." in capsys.readouterr().out  # gr.Info, outside a page
    wait_for(lambda: compares.info(compare_id).state == "done")  # the worker writes it after its last event
    with pytest.warns(UserWarning, match="No compare to cancel"):
        assert compare_tab.cancel(compares, "") == UNCHANGED


def test_a_new_compare_empties_the_previous_ones_download(jobs, compares, tmp_path):
    """QA C6: after a done compare, a new one (cancelled, so with no grid.png) still offered the first one's grid.png
    under "The whole grid": a new view sends every output once, None too."""
    _, first, view = compare_tab.on_compare(compares, jobs, [], [], [str(lora(tmp_path / "a.safetensors"))], *form())
    *_, download, _, view = refreshed(compares, first, view, "done")
    assert download == str(compares.folder(first) / "grid.png")
    hold(compares, 0)
    _, second, view = compare_tab.on_compare(compares, jobs, [], [], [str(lora(tmp_path / "b.safetensors"))],
                                             *form(strengths="1, 2"))
    assert view is None  # the page's next tick makes a new view of the new compare
    progress, problems, grid, download, status, cancel, view = compare_tab.refresh(compares, second, view)
    assert download is None and problems == "" and grid.count("<img") == 0
    assert UNCHANGED not in (progress, problems, grid, download, status, cancel)  # each sent once: none keeps the old


def test_the_setting_is_named_as_the_form_labels_it(jobs, compares, tmp_path):
    """QA C8: the field is labelled "Guidance (CFG)", the message said "cfg_scale"."""
    status, *_ = compare_tab.on_compare(compares, jobs, [], [], [str(lora(tmp_path / "a.safetensors"))],
                                        *form(cfg_scale=-5))
    assert status == "⚠ Guidance (CFG): must be in [1.0, 30.0] (got -5)"
    assert compares.compares() == []


def test_a_wide_grid_scrolls_in_its_own_box_and_a_cancelled_compares_cells_say_not_drawn(tmp_path):
    """QA C7: the table ran off the page and the file column wrapped word by word; cells a cancelled compare never
    drew kept showing "…" as if still coming."""
    spec = {"files": ["a.safetensors"], "labels": ["20261207-070731-character / lora-000001 (epoch 1, step 4)"],
            "strengths": [0.0, 1.0], "prompts": ["p"], "seeds": [7], "width": 64}
    view = CompareView("c", tmp_path, spec)
    view.add({"type": "compare_file", "index": 0, "problem": ""})
    html = compare_tab.grid_html(view)
    assert html.startswith('<div class="compare-scroll" style="overflow-x: auto; max-width: 100%"><table')
    assert html.endswith("</table></div>")
    assert html.count("position: sticky; left: 0") == 2  # the file column's head and each row's label
    assert "min-width: 14em" in html and html.count("…</td>") == 2 and "not drawn" not in html
    view.add({"type": "cancelled", "step": 0})
    html = compare_tab.grid_html(view)
    assert html.count(">not drawn</td>") == 2 and "…</td>" not in html
