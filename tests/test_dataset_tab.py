"""The Dataset tab's handlers, called as plain functions (no browser), and captioning in its child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image, ImageDraw

from tests.test_datasets_captioners import tiny_tagger
from ui import dataset_tab as tab
from ui.captioning import CaptionJob

ROOT = Path(__file__).resolve().parent.parent
TAGGED = "^_^, 1girl, blue hair"  # what tiny_tagger says at the default thresholds (0.35 general, 0.85 character)


def pictures(folder: Path, n: int, captions: dict[int, str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"p{i}.png"
        image = Image.new("RGB", (96, 64) if i % 2 else (64, 64), "white")
        ImageDraw.Draw(image).rectangle((4 + 20 * i, 8, 24 + 20 * i, 40 + 5 * i), fill=(200, 40 * i, 30))
        image.save(path)
        if i in (captions or {}):
            path.with_suffix(".txt").write_text(captions[i])
        out.append(path)
    return out


def captions_of(folder: str | Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted(Path(folder).glob("*.txt"))}


@pytest.fixture()
def dataset(tmp_path) -> str:
    """A session's dataset folder of three captioned pictures, added through the upload handler."""
    files = pictures(tmp_path / "src", 3, {0: "a, red", 1: "b, red", 2: "c, blue"})
    files += [f.with_suffix(".txt") for f in files]
    folder, message, *_ = tab.on_upload(tmp_path / "drafts", [str(f) for f in files], "")
    assert "Added **3** picture(s)" in message
    return folder


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return tiny_tagger(tmp_path_factory.mktemp("captioners") / "wd14")


def test_upload_makes_a_draft_folder_and_shows_pictures_captions_and_tags(tmp_path):
    files = pictures(tmp_path / "src", 2, {0: "zxq, red circle"})
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.write(files[1], "inside.png")
    drafts = tmp_path / "drafts"
    folder, message, gallery, tags, box = tab.on_upload(drafts, [str(files[0]), str(files[0].with_suffix(".txt")),
                                                                  str(tmp_path / "more.zip")], "")
    assert Path(folder).parent == drafts and "Added **2** picture(s)" in message and box is None
    assert sorted(caption for _, caption in gallery) == ["(no caption)", "zxq, red circle"]
    assert all(Path(image).parent == Path(folder) for image, _ in gallery)
    assert tags == [["red circle", 1], ["zxq", 1]]
    again = tab.on_upload(drafts, [str(files[1])], folder)  # the same session adds to its folder
    assert again[0] == folder and len(again[2]) == 3
    assert tab.on_upload(drafts, None, folder) == (folder, "", again[2], tags, None)  # a cleared upload box


def test_a_damaged_zip_is_named_as_a_zip_not_as_a_picture(tmp_path):
    good, inside = pictures(tmp_path / "src", 2)
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as z:
        z.write(inside, "inside.png")
    whole = (tmp_path / "whole.zip").read_bytes()
    directory = int.from_bytes(whole[-10:-6], "little")  # the central directory's size, from the end record
    scrambled = whole[:-directory - 22] + b"x" * directory + whole[-22:]  # its end record whole, its directory not
    cut, garbled = tmp_path / "upload-1" / "holiday.zip", tmp_path / "upload-2" / "scrambled.ZIP"
    for path, data in ((cut, whole[:len(whole) // 2]), (garbled, scrambled)):
        path.parent.mkdir()  # Gradio keeps each upload in a folder of its own
        path.write_bytes(data)
    _, message, *_ = tab.on_upload(tmp_path / "drafts", [str(good), str(cut), str(garbled)], "")
    assert "Added **1** picture(s)" in message and "Pillow" not in message and str(tmp_path) not in message
    for name in ("holiday.zip", "scrambled.ZIP"):
        assert f"- `{name}`: a damaged zip: not a readable zip archive (" in message, message


def test_each_drop_imports_only_its_own_files_and_start_over_empties_the_box(tmp_path):
    """The upload box adds each drop to the files it holds and hands them all to on_upload, as here."""
    good, ring5, ring6 = pictures(tmp_path / "src", 3)
    drafts, folder, box = tmp_path / "drafts", "", None
    for picture, total in ((good, 1), (ring5, 2)):
        folder, message, gallery, _, box = tab.on_upload(drafts, [*(box or []), str(picture)], folder)
        assert "Added **1** picture(s)" in message and len(gallery) == total and box is None
    assert tab.on_clear() == ("", tab.STARTED_OVER, [], [], None, "", "")  # no dataset, no files, no trigger (QA 4)
    _, message, gallery, _, _ = tab.on_upload(drafts, [str(ring6)], "")
    assert "Added **1** picture(s)" in message and len(gallery) == 1


def test_the_upload_box_is_emptied_by_its_upload_event_and_start_over(tmp_path):
    with gr.Blocks() as demo:
        tab.build(tmp_path / "drafts", gr.State(""))
    events = {(demo.blocks[i].elem_id, event): fn for fn in demo.fns.values() for i, event in fn.targets
              if i in demo.blocks}  # a .then() step has no block of its own
    box = demo.blocks[next(i for i, b in demo.blocks.items() if b.elem_id == "dataset-upload")]
    assert box in events["dataset-upload", "upload"].outputs and box in events["dataset-clear", "click"].outputs
    assert ("dataset-upload", "change") not in events  # emptying the box imports nothing


def test_add_folder_refuses_what_is_not_a_folder(tmp_path):
    pictures(tmp_path / "mine", 2)
    folder, message, gallery, _ = tab.on_folder(tmp_path / "drafts", str(tmp_path / "nope"), "")
    assert (folder, gallery) == ("", []) and message == f"⚠ “{tmp_path / 'nope'}” is not a folder on this machine"
    assert tab.on_folder(tmp_path / "drafts", "  ", "")[1] == "Type the path of a folder of pictures first."  # QA 2
    folder, message, gallery, _ = tab.on_folder(tmp_path / "drafts", str(tmp_path / "mine"), "")
    assert "Added **2** picture(s)" in message and len(gallery) == 2
    assert tab.on_clear()[:4] == ("", tab.STARTED_OVER, [], [])


@pytest.mark.skipif(not tab.DEMO_DATASET.is_dir(), reason="no demo dataset in this checkout")
def test_the_demo_dataset_comes_with_its_trigger_word(tmp_path):
    folder, message, gallery, tags, trigger, applied = tab.on_demo(tmp_path / "drafts")
    assert trigger == applied == "zxc" and len(gallery) == 10 and "Added **10** picture(s)" in message
    assert ["zxc", 10] in tags
    tab.on_trigger(folder, "zxq", applied)  # the demo's trigger replaced, not kept behind the new one
    assert all(c.startswith(("zxq, a ", "zxq, an ")) and "zxc" not in c for c in captions_of(folder).values())


def test_caption_edits_save_trigger_rename_and_bulk(dataset):
    assert tab.on_save(dataset, "", "x")[1] == "Select a picture first."
    _, message, gallery, _ = tab.on_save(dataset, "p1.png", "  b,   green ")
    assert message == "Saved the caption of p1.png." and gallery[1][1] == "b, green"
    assert tab.on_trigger(dataset, "zxq", "")[1] == "“zxq” is first in 3 captions."
    assert captions_of(dataset) == {"p0.txt": "zxq, a, red", "p1.txt": "zxq, b, green", "p2.txt": "zxq, c, blue"}
    _, message, _, tags = tab.on_tag(dataset, "red", "crimson")
    assert message == "“red” renamed to “crimson” in 1 caption." and ["crimson", 1] in tags
    assert tab.on_tag(dataset, "blue", "")[1] == "“blue” removed in 1 caption."
    assert tab.on_tag(dataset, "bleu", "x")[1] == "No caption has the tag “bleu” (the table lists every tag)."
    assert tab.on_tag(dataset, "", "x")[1] == "Name a tag first."
    _, message, _, _ = tab.on_bulk(dataset, "solo", "photo", "green", "lime", 0)
    assert message == "Changed 3 captions."
    assert captions_of(dataset) == {"p0.txt": "solo, zxq, a, crimson, photo", "p1.txt": "solo, zxq, b, lime, photo",
                                    "p2.txt": "solo, zxq, c, photo"}
    before = captions_of(dataset)
    for bad in (-1, 1.5):  # QA 6: -1 cut every caption's last tag (Python's slice)
        assert tab.on_bulk(dataset, "x", "", "", "", bad)[1] == (
            f"⚠ Keep the first N tags: {bad:g} is not allowed; 0 (keep all) or a whole number above it. No caption "
            "was changed.")
    assert captions_of(dataset) == before
    tab.on_bulk(dataset, "", "", "", "", 2)
    assert set(captions_of(dataset).values()) == {"solo, zxq"}
    for handler in (lambda: tab.on_trigger("", "zxq", ""), lambda: tab.on_bulk("", "a", "", "", "", 0)):
        assert handler()[:4] == ("", tab.NO_PICTURES, [], [])


def test_a_caption_typed_and_not_saved_is_kept_by_a_click_elsewhere(dataset):
    """QA 25: clicking another picture, or an edit of every caption, replaced the Caption box's unsaved text."""
    select = SimpleNamespace(index=2)
    shown = tab.selection(dataset, "p0.png", "a, red", 64, 0, 0, False, select)  # nothing typed: nothing written
    assert shown[:2] == ("p2.png", "c, blue") and shown[3:] == (gr.update(), gr.update())
    selected, caption, preview, message, gallery = tab.selection(dataset, "p0.png", "a, typed", 64, 0, 0, False,
                                                                 select)
    assert (selected, caption, message) == ("p2.png", "c, blue", "Saved the caption of p0.png.")
    assert preview is not None and gallery[0][1] == "a, typed" and captions_of(dataset)["p0.txt"] == "a, typed"
    _, message, _, _, applied = tab.keeping_edit(tab.on_trigger)(dataset, "p2.png", "c, mine", "zxq", "")
    assert message == "Saved the caption of p2.png. “zxq” is first in 3 captions." and applied == "zxq"
    assert captions_of(dataset)["p2.txt"] == "zxq, c, mine"
    _, message, _, _ = tab.keeping_edit(tab.on_bulk)(dataset, "p2.png", "zxq, c, mine", "", "", "mine", "ours", 0)
    assert message == "Changed 1 caption." and captions_of(dataset)["p2.txt"] == "zxq, c, ours"
    assert tab.keeping_edit(tab.on_tag)(dataset, "", "left over", "a", "b")[1] == "“a” renamed to “b” in 1 caption."
    assert tab.on_leave(dataset, "p2.png", "zxq, c, ours") == (gr.skip(),) * 4  # saved already: nothing redrawn
    folder, message, gallery, _ = tab.on_leave(dataset, "p2.png", "typed, then another tab")
    assert message == "Saved the caption of p2.png." and captions_of(dataset)["p2.txt"] == "typed, then another tab"


def test_a_new_trigger_word_replaces_the_one_applied_before(dataset):
    _, message, _, _, applied = tab.on_trigger(dataset, "my trigger", "")
    assert (message, applied) == ("“my trigger” is first in 3 captions.", "my trigger")
    _, message, _, _, applied = tab.on_trigger(dataset, " zxq ", applied)
    assert (message, applied) == ("“zxq” is first in 3 captions.", "zxq")
    assert captions_of(dataset) == {"p0.txt": "zxq, a, red", "p1.txt": "zxq, b, red", "p2.txt": "zxq, c, blue"}


def test_an_empty_trigger_or_one_with_a_comma_changes_nothing(dataset):
    before = captions_of(dataset)
    assert tab.on_trigger(dataset, "  ", "zxq")[1:] == (
        "Type a trigger word first: a made-up word such as zxq, not a real one.", *tab.refresh(dataset, "")[2:], "zxq")
    _, message, _, _, applied = tab.on_trigger(dataset, "my, trigger", "zxq")
    assert message.startswith("⚠ “my, trigger” holds a comma") and applied == "zxq"
    assert captions_of(dataset) == before


def test_the_selected_picture_shows_its_caption_and_crop(dataset):
    name, caption, preview, *_ = tab.selection(dataset, "", "", 64, 64, 128, True, SimpleNamespace(index=1))
    assert (name, caption) == ("p1.png", "b, red")
    assert isinstance(preview, Image.Image) and preview.size[0] >= 96  # the picture with its kept area outlined
    assert tab.picture_at(dataset, 3, 64, 64, 128, True) == ("", "", None)
    assert tab.picture_at("", 0, 64, 64, 128, True) == ("", "", None)


def test_the_health_report_at_the_train_tabs_settings(dataset):
    report = tab.health_markdown(dataset, 64, 64, 128, 4)
    assert report.startswith("At 64 px, batch 4:") and "**3 pictures**" in report and "3/3 captioned" in report
    assert report.endswith("| 64×64 | 3 |")  # 64² pixels, sides 64 to 128: the only bucket
    assert "bucket 64×64 holds 3 picture(s), fewer than the batch size 4" in report and "identical" not in report
    assert tab.health_markdown("", 64, 64, 128, 2) == tab.NO_PICTURES


def test_the_health_report_names_captions_longer_than_the_text_encoder_reads(dataset):
    """Tagger captions often run past CLIP's 75 tokens; the end is never read (sd-scripts and the trainer cut it).
    Counted with the CLIP tokenizer the app ships: 'red, ' is two tokens, so 50 of them are 100 tokens."""
    first, second = sorted(Path(dataset).glob("*.txt"))[:2]
    first.write_text("zxq, " + "red, " * 50)  # 3 + 100 tokens ("zxq" is two)
    second.write_text("blue, " * 120)  # 240 tokens
    report = tab.health_markdown(dataset, 64, 64, 128, 1, 75)
    assert (f"⚠ 2 caption(s) longer than 75 CLIP tokens (the longest 240): SD 1.x/2.x and SDXL never read their end "
            f"({second.with_suffix('.png').name}, {first.with_suffix('.png').name}); Max token length 225 (Train tab, "
            "Advanced) reads 225 of them") in report
    at_150 = tab.health_markdown(dataset, 64, 64, 128, 1, "150")  # the form's dropdown may send text
    assert "1 caption(s) longer than 150 CLIP tokens (the longest 240)" in at_150 and first.stem not in at_150
    second.write_text("blue")
    report = tab.health_markdown(dataset, 64, 64, 128, 1)  # 75 unless the form says otherwise
    assert (f"1 caption(s) longer than 75 CLIP tokens (the longest 103): SD 1.x/2.x and SDXL never read their end "
            f"({first.with_suffix('.png').name}); Max token length 150 (Train tab, Advanced) reads them whole"
            in report)
    first.write_text("zxq, red")
    assert "CLIP tokens" not in tab.health_markdown(dataset, 64, 64, 128, 1, 75)


def wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_captioning_through_the_tab_start_poll_and_the_captions(dataset, tagger):
    assert tab.on_caption_start(None, "", "wd14", "", False)[1] == tab.NO_PICTURES
    job, message, timer = tab.on_caption_start(None, dataset, "wd14", str(tagger), False)
    assert job is None and "Every picture has a caption" in message and timer.active is False
    job, message, timer = tab.on_caption_start(None, dataset, "wd14", str(tagger), True)
    assert isinstance(job, CaptionJob) and timer.active is True and "wd14" in message
    assert tab.on_caption_start(job, dataset, "wd14", str(tagger), True)[0] is job  # one at a time
    running = type("Job", (), {"running": True})()
    assert tab.cancel_button(running) == {"__type__": "update", "interactive": True}  # QA 26: only while one runs
    wait_for(lambda: not job.running)
    assert tab.cancel_button(job)["interactive"] is False and tab.cancel_button(None)["interactive"] is False
    job_after, message, timer, gallery, tags = tab.on_caption_poll(job, dataset)
    assert job_after is None and message == "Captioned 3 pictures with wd14." and timer.active is False
    assert [caption for _, caption in gallery] == [TAGGED] * 3 and ["1girl", 3] in tags
    assert set(captions_of(dataset).values()) == {TAGGED}
    assert [e["type"] for e in job.events] == ["status", "start", "caption", "caption", "caption", "done"]
    assert tab.on_caption_cancel(None, dataset)[1] == "Nothing is being captioned."


@pytest.fixture(scope="module")
def slow_tagger(tmp_path_factory) -> Path:
    """The tiny tagger at a 1024 px input: about 50 ms a picture, so a run of 40 is caught half-way."""
    return tiny_tagger(tmp_path_factory.mktemp("captioners") / "wd14-slow", size=1024)


def half_way(tmp_path, slow_tagger, n=40) -> tuple[Path, CaptionJob]:
    folder = tmp_path / "ds"
    pictures(folder, n)
    job = CaptionJob(folder, "wd14", str(slow_tagger))
    wait_for(lambda: job.counts()[0] >= 1)
    return folder, job


def first_captioned(done: int, n: int = 40) -> list[str]:
    """The captions the first `done` pictures get: the captioner goes by file name (p0, p1, p10, p11, …, p2, …)."""
    return sorted(f"p{i}.txt" for i in range(n))[:done]


def test_a_running_poll_reports_progress_and_leaves_the_gallery(tmp_path, slow_tagger):
    folder, job = half_way(tmp_path, slow_tagger)
    os.kill(job._proc.pid, signal.SIGSTOP)  # frozen half-way, so that what it has said holds still
    try:
        time.sleep(0.3)
        done, total = job.counts()
        same, message, timer, gallery, tags = tab.on_caption_poll(job, str(folder))
        last = sorted(f"p{i}.png" for i in range(40))[done - 1]  # in name order: p0, p1, p10, p11, ...
        assert same is job and message == f"Captioning with wd14: {done}/{total} ({last})" and total == 40
        assert timer == gallery == tags == gr.skip()  # the timer keeps ticking, the gallery stays
    finally:
        job.cancel(kill_after_s=1)


def test_cancel_stops_after_the_current_picture_and_keeps_the_done_captions(tmp_path, slow_tagger):
    folder, job = half_way(tmp_path, slow_tagger)
    kept, message, timer, gallery, _ = tab.on_caption_cancel(job, str(folder))
    done, total = job.counts()
    assert 1 <= done < total == 40 and kept is job and timer.active is True
    assert message == f"Cancelled: captioned {done} of 40 pictures with wd14; those captions are kept."
    # a poll that read the job as running just before the cancel answers after it: the next poll ends it for good
    stale = tab.on_caption_poll(job, str(folder))
    assert stale[0] is None and stale[1] == message and stale[2].active is False
    assert captions_of(folder) == {name: TAGGED for name in first_captioned(done)}  # the first ones, each whole
    assert [c for _, c in gallery].count(TAGGED) == done
    assert job.events[-1]["type"] == "cancelled" and job._proc.returncode == 0  # it stopped by itself


def test_cancel_kills_a_captioner_that_does_not_stop(tmp_path, slow_tagger):
    folder, job = half_way(tmp_path, slow_tagger)
    os.kill(job._proc.pid, signal.SIGSTOP)  # hung: it cannot even take the SIGTERM
    time.sleep(0.3)
    before, started = job.counts()[0], time.time()
    message = job.cancel(kill_after_s=1)
    done = job.counts()[0]  # a line it wrote just before it froze may be read only now (seen once under load)
    assert message == f"Cancelled: captioned {done} of 40 pictures with wd14; those captions are kept."
    assert before <= done < 40 and time.time() - started < 10
    assert not job.running and job._proc.returncode == -signal.SIGKILL
    assert set(captions_of(folder)) >= set(first_captioned(done))


def finished(job: CaptionJob) -> str:
    wait_for(lambda: not job.running)
    return job.result()


def test_errors_come_back_as_messages(tmp_path):
    folder = tmp_path / "ds"
    pictures(folder, 1)
    assert finished(CaptionJob(folder, "wd14")).startswith(
        "⚠ the wd14 captioner model is not here and the model hub is offline. Download it")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    assert finished(CaptionJob(folder, "wd14", str(broken))).startswith(
        f"⚠ the wd14 captioner in {broken} could not be loaded: ")
    (broken / "config.json").write_text("{ not json")
    assert finished(CaptionJob(folder, "blip", str(broken))).startswith(
        f"⚠ the blip captioner in {broken} could not be loaded: ")
    assert captions_of(folder) == {}


def test_a_captioner_that_crashes_says_so_with_its_last_words(tmp_path, tagger):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"not a picture")
    message = finished(CaptionJob(folder, "wd14", str(tagger)))
    assert message.startswith("⚠ The wd14 captioner stopped (exit status 1) after 0 of 1 pictures: ")
    assert "cannot identify image file" in message


BUILD_AND_CAPTION = """
import json, sys, time
from pathlib import Path
from ui.app import build_app
from ui import dataset_tab
build_app(Path(sys.argv[1]) / "runs", Path(sys.argv[1]) / "models")
job, _, _ = dataset_tab.on_caption_start(None, sys.argv[2], "wd14", sys.argv[3], True)
while job.running:
    time.sleep(0.05)
print(json.dumps({"result": job.result(), "loaded": sorted(m for m in sys.modules if m.split(".")[0] in
                  ("torch", "transformers", "diffusers", "onnxruntime", "accelerate"))}))
"""


def test_the_web_app_builds_and_captions_without_loading_a_model_library(dataset, tagger, tmp_path):
    done = subprocess.run([sys.executable, "-c", BUILD_AND_CAPTION, str(tmp_path), dataset, str(tagger)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"result": "Captioned 3 pictures with wd14.", "loaded": []}


def test_the_tab_lays_out_every_control_with_its_elem_id(tmp_path):
    with gr.Blocks() as demo:
        parts = tab.build(tmp_path / "drafts", gr.State(""))
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"dataset-upload", "dataset-folder", "dataset-add-folder", "dataset-demo", "dataset-clear",
            "dataset-report", "dataset-captioner", "dataset-captioner-kind", "dataset-captioner-source",
            "dataset-overwrite", "dataset-caption-run", "dataset-caption-cancel", "dataset-caption-status",
            "dataset-trigger", "dataset-apply-trigger", "dataset-gallery", "dataset-selected", "dataset-caption",
            "dataset-save-caption", "dataset-check", "dataset-health", "dataset-tag-table", "dataset-tag-from",
            "dataset-tag-to", "dataset-tag-apply", "dataset-bulk-apply", "dataset-crop-preview"} <= ids
    assert parts.gallery.elem_id == "dataset-gallery" and parts.crop.elem_id == "dataset-crop-preview"


def test_a_caption_is_saved_only_beside_a_picture_of_the_dataset(dataset, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in (str(victim / "x.png"), "../victim/x.png", "..", "p9.png", "sub/../../victim/x.png"):
        message = tab.on_save(dataset, name, "planted")[1]
        assert message.startswith("⚠"), (name, message)
    assert not list(victim.iterdir()) and not list(Path(dataset).parent.glob("*.txt"))
    kohya = Path(dataset) / "10_a b"
    kohya.mkdir()
    Image.new("RGB", (8, 8)).save(kohya / "k.png")
    assert tab.on_save(dataset, "10_a b/k.png", "k cap")[1] == "Saved the caption of 10_a b/k.png."
    assert (kohya / "k.txt").read_text().strip() == "k cap"


def test_an_edit_of_every_caption_shows_the_selected_pictures_new_caption(dataset):
    """QA 3: after Apply to all captions the Caption box kept the old text, and Save wrote it back (the trigger word
    gone). The page re-reads the selected picture's caption after each edit of every caption."""
    tab.on_trigger(dataset, "zxq", "")
    assert tab.caption_of(dataset, "p1.png") == "zxq, b, red"
    tab.on_tag(dataset, "red", "crimson")
    assert tab.caption_of(dataset, "p1.png") == "zxq, b, crimson"
    assert tab.caption_of(dataset, "") == tab.caption_of("", "p1.png") == tab.caption_of(dataset, "gone.png") == ""


def test_a_changed_dataset_marks_its_health_report_out_of_date_and_a_new_one_clears_the_page(dataset):
    """QA 1 and 18: the health report, the selection, caption and crop preview stayed after the pictures changed."""
    report = tab.health_markdown(dataset, 64, 64, 128, 1)
    stale = tab.stale_health(report)
    assert stale.startswith(tab.STALE_HEALTH) and stale.endswith(report) and tab.stale_health(stale) == stale
    assert tab.stale_health("") == ""  # no report shown: nothing to mark
    assert tab.no_selection() == ("", "", None, "")


def test_new_pictures_get_the_trigger_word_applied_before_them(dataset, tmp_path):
    """QA 15: the box says the trigger is kept first in every caption; pictures added after it was applied lacked
    it."""
    tab.on_trigger(dataset, "zxq", "")
    more = pictures(tmp_path / "more", 2, {0: "a cat, sitting"})
    folder, message, gallery, _, box = tab.on_upload(tmp_path / "drafts", [str(p) for p in more] + [
        str(more[0].with_suffix(".txt"))], dataset, "zxq")
    assert folder == dataset and message.endswith("“zxq” is first in their captions too.") and box is None
    assert len(gallery) == 5 and all(caption.startswith("zxq") for _, caption in gallery)
    assert "zxq, a cat, sitting" in [caption for _, caption in gallery]
    _, message, *_ = tab.on_upload(tmp_path / "drafts", [str(more[1])], dataset, "")  # none applied: none added
    assert "first in" not in message


def test_the_pictures_come_back_after_a_reload_and_only_a_draft_folder_does(dataset, tmp_path):
    """QA 12: a reload forgot the dataset. The page keeps its folder in the browser's storage; what comes back from
    there is only used when it is one of this app's draft folders."""
    drafts = Path(dataset).parent
    folder, message, gallery, tags, trigger, applied = tab.restore(drafts, dataset)
    assert folder == dataset and message == "Your pictures from before (3 pictures)." and len(gallery) == 3 and tags
    assert trigger == applied == ""  # its captions share no first tag
    tab.on_trigger(dataset, "zxq", "")  # re-walk N3: the trigger came back neither in its box nor as applied
    assert tab.restore(drafts, dataset)[4:] == ("zxq", "zxq")
    outside = pictures(tmp_path / "elsewhere" / "x", 1)[0].parent
    for stored in (str(outside), str(drafts / ".." / Path(dataset).name), "/etc", str(drafts / "gone"), "", None):
        assert tab.restore(drafts, stored) == ("", "", [], [], "", "")


def test_earlier_datasets_open_again_and_are_deleted_when_asked_twice(dataset, tmp_path):
    """QA 34: every Start over or demo left a draft folder behind that nothing listed. They are listed (not the one
    in use), open again, and go when Delete is clicked twice; only a draft folder of this app's is touched."""
    drafts = Path(dataset).parent
    other, *_ = tab.on_demo(drafts) if tab.DEMO_DATASET.is_dir() else tab.on_upload(
        drafts, [str(p) for p in pictures(tmp_path / "src2", 2)], "")[:1]
    listed = tab.drafts_list(drafts, other)["choices"]
    assert [path for _, path in listed] == [dataset] and "3 pictures" in listed[0][0]
    folder, message, gallery, _, applied, box = tab.on_open_draft(drafts, dataset, other, "zxc")
    assert (folder, message, len(gallery), applied, box) == (dataset, "Opened an earlier dataset (3 pictures).", 3,
                                                             "", "")  # no tag starts every caption
    assert "KB" in listed[0][0] and tab.size_text(Path(dataset)).endswith(" KB")  # re-walk N2: not "0.0 MB"
    for planted in ("/etc", str(tmp_path), str(drafts / "gone"), ""):
        assert tab.on_open_draft(drafts, planted, other, "zxc")[1].startswith("⚠ ")
    folder, message, *_, armed, button = tab.on_delete_draft(drafts, dataset, other, "")
    assert folder == other and "Click again to delete it" in message and armed == dataset and Path(dataset).is_dir()
    assert button["value"] == "Click again to delete this dataset for good"
    *_, armed, button = tab.on_delete_draft(drafts, dataset, other, armed)
    assert not Path(dataset).exists() and armed == "" and tab.drafts_list(drafts, other)["choices"] == []
    assert Path(other).is_dir()  # the one in use stays
