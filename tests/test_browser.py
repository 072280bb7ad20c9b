"""The web app in Debian's chromium, driven by Playwright, against the app on 127.0.0.1: what a user clicks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training import draw_dataset

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")]
TINY_FORM = {"resolution": "64", "max-train-epochs": "2", "num-repeats": "1", "train-batch-size": "2",
             "network-dim": "4", "network-alpha": "2"}
TINY_ADVANCED = {"min-bucket-reso": "64", "max-bucket-reso": "128", "sample-every-n-epochs": "1",
                 "save-every-n-epochs": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, runs_dir: Path, models_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "app.py", "--port", str(self.port), "--runs-dir", str(runs_dir),
                     "--models-dir", str(models_dir)]
        self.log = runs_dir.parent / f"app-{self.port}.log"  # its tail is shown when the test fails (conftest)
        self.proc = None

    def start(self) -> "App":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=os.environ | {"PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the app did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture()
def app(models, tmp_path):
    """The app on 127.0.0.1 over a fresh runs folder, stopped after the test."""
    running = App(tmp_path / "runs", models).start()
    yield running
    running.stop()


@pytest.fixture()
def page(browser):
    return browser.new_page(viewport={"width": 1280, "height": 1000})


@pytest.fixture()
def models(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_models["sd1"][1], folder / "tiny-sd15.safetensors")
    return folder


def wait_text(page, selector: str, text, timeout: float = 30000, state: str = "visible") -> None:
    """Wait for `text` (a string or a compiled pattern) inside `selector`; a timeout says what it showed instead."""
    box = page.locator(selector)
    try:
        box.get_by_text(text).first.wait_for(state=state, timeout=timeout)
    except Exception:
        raise AssertionError(f"no {text!r} in {selector}; it says: {box.first.text_content()!r}") from None


def queued(page) -> None:
    wait_text(page, "#train-status", "Queued", state="attached")


def last_step_plotted(page) -> float:
    """The right end of the loss plot's step axis (its tick labels are text in the plot's SVG)."""
    labels = page.locator("#monitor-loss svg text").all_text_contents()
    ticks = labels[: labels.index("step")]
    return max(float(t) for t in ticks)


def first_step_plotted(page) -> float:
    labels = page.locator("#monitor-loss svg text").all_text_contents()
    return min(float(t) for t in labels[: labels.index("step")])


def shows_whole_history(page, run_dir: Path, done: bool) -> None:
    """The Monitor of this page shows the run from its first step: the plot, every sample, the files."""
    from trainer.events import read_all

    page.get_by_role("tab", name="Monitor").click()
    page.locator("#monitor-loss svg").get_by_text("smoothed").wait_for(timeout=30000)
    if done:
        page.get_by_text("— done").wait_for(timeout=30000)
        page.locator('#monitor-files a[download="lora.safetensors"]').wait_for(timeout=15000)
    page.wait_for_timeout(2500)  # a tick or two more
    events = read_all(run_dir)
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert first_step_plotted(page) <= 1 and last_step_plotted(page) >= (steps[-1] if done else 1)
    samples = [e for e in events if e["type"] == "sample"]
    assert page.locator("#monitor-samples img").count() == len(samples) > 0 or not done


def fill(page, elem: str, value: str, tab: str = "train-") -> None:
    box = page.locator(f"#{tab}{elem} input, #{tab}{elem} textarea").first
    box.fill(value)
    box.press("Tab")


def set_up_run(page, app: App, images: list[Path], trigger: str = "zxq") -> None:
    page.goto(app.url)
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images])
    page.get_by_text(f"Added {len([p for p in images if p.suffix == '.png'])} picture(s)").wait_for(timeout=30000)
    page.locator("#dataset-trigger textarea, #dataset-trigger input").first.fill(trigger)
    page.locator("#dataset-apply-trigger").click()
    page.get_by_text(f"“{trigger}” is first in").wait_for(timeout=15000)
    page.get_by_role("tab", name="Train").click()
    base = page.locator("#train-base input")
    base.click()
    page.get_by_role("option", name="tiny-sd15.safetensors").click()
    # choosing a base model refills the form from the preset: wait until that has happened, then edit
    page.locator("#train-preset-info").get_by_text("A person or character").wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelector('#train-network-alpha input').value === '16'")
    page.wait_for_timeout(2000)
    page.locator("#train-advanced").get_by_text("Advanced").click()
    fill_until_still(page, TINY_FORM | TINY_ADVANCED)


def fill_until_still(page, wanted: dict[str, str], tab: str = "train-") -> None:
    """Fill the Train tab's fields (elem_ids `tab` + name); a late refill from the preset, or a section drawn anew
    as it opens, may overwrite one, so fill until the form holds."""
    for _ in range(5):
        for elem, value in wanted.items():
            fill(page, elem, value, tab)
        page.wait_for_timeout(1500)
        if all(field_value(page, e, tab) == v for e, v in wanted.items()):
            return
    raise AssertionError({e: field_value(page, e, tab) for e in wanted})


def field_value(page, elem: str, tab: str = "train-") -> str:
    return page.locator(f"#{tab}{elem} input, #{tab}{elem} textarea").first.input_value()


def test_from_pictures_to_a_downloaded_lora(app, page, tmp_path):
    from safetensors import safe_open

    from trainer.events import read_all

    images = sorted(draw_dataset(tmp_path / "pictures", 10).glob("*.png"))
    set_up_run(page, app, images)
    fill(page, "validation-split", "0.2")  # 2 of 10 pictures held out, 8 trained on
    wait_text(page, "#train-length", re.compile(r"This run: 8 steps, 2 epochs of 4 steps \(8 pictures × 1 repeat, "
                                                r"2 held out, batch 2, 1 bucket\)"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
    page.get_by_role("tab", name="Dataset").click()
    page.locator("#dataset-check").click()
    health = page.locator("#dataset-health")
    health.get_by_text("10 pictures").wait_for(timeout=30000)
    assert "At 64 px, batch 2" in health.inner_text() and "64×64" in health.inner_text()
    page.screenshot(path=str(SHOTS / "dataset.png"), full_page=True)
    page.get_by_role("tab", name="Train").click()
    fill(page, "network-alpha", "-1")  # a bad value is refused beside its field, and no run is made
    page.locator("#train-start").click()
    beside = page.locator("#train-network-alpha")
    beside.get_by_text("must be > 0 and <= 1024").wait_for(timeout=15000)
    assert "⚠ Alpha = -1.0: must be" in beside.inner_text() and not any((tmp_path / "runs").glob("2*"))
    fill(page, "network-alpha", TINY_FORM["network-alpha"])
    page.locator("#train-start").click()
    queued(page)
    progress = page.locator("#monitor-progress")
    progress.get_by_text(re.compile(r"Step \d+ / 8")).wait_for(timeout=120000)
    page.locator("#monitor-loss svg").get_by_text("smoothed").wait_for(timeout=30000)  # the plot has data
    first_reach = last_step_plotted(page)
    run_dir = next((tmp_path / "runs").glob("2*"))
    page.reload()  # mid-run: the page comes back on the same run, with its history
    shows_whole_history(page, run_dir, done=False)
    page.locator("#monitor-samples img").first.wait_for(timeout=120000)
    page.get_by_text("— done").wait_for(timeout=180000)
    assert "Step 8 / 8" in progress.inner_text()
    page.wait_for_timeout(2500)  # one more tick of the plot
    assert last_step_plotted(page) == 8 >= first_reach
    held = {e["step"]: e["loss"] for e in read_all(run_dir) if e["type"] == "validation"}
    files = {e["step"]: Path(e["path"]).name for e in read_all(run_dir) if e["type"] == "checkpoint"
             and e["path"].endswith(".safetensors")}
    best = min(files, key=lambda s: (held[s], -s))
    page.locator("#monitor-loss svg").get_by_text("held-out").wait_for(timeout=30000)
    page.locator("#monitor-best").get_by_text(f"Best: {files[best]} — held-out loss {held[best]:.4f}").wait_for(
        timeout=15000)
    assert page.locator("#monitor-files a[download]").first.get_attribute("download") == files[best]
    page.reload()
    shows_whole_history(page, run_dir, done=True)
    others = [page.context.browser.new_page(viewport={"width": 1280, "height": 1000}) for _ in range(2)]
    for other in others:  # the finished run opened from Runs in two more tabs, side by side
        other.goto(app.url)
        other.get_by_role("tab", name="Runs").click()
        other.locator("#runs-choose input").click()
        other.get_by_role("option", name=run_dir.name).click()
        other.locator("#runs-open").click()
    for other in others:
        shows_whole_history(other, run_dir, done=True)
        other.close()
    with page.expect_download() as download:
        page.locator('#monitor-files a[download="lora.safetensors"]').click()
    path = tmp_path / "downloaded.safetensors"
    download.value.save_as(path)
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["modelspec.trigger_phrase"] == "zxq"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_num_train_images"] == "8"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    page.screenshot(path=str(SHOTS / "monitor.png"), full_page=True)
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-table").get_by_text("done").filter(visible=True).first.wait_for(timeout=10000)
    page.locator("#runs-table").get_by_text(run_dir.name).filter(visible=True).first.click()  # a row chooses its run
    page.wait_for_function(f"() => document.querySelector('#runs-choose input').value === '{run_dir.name}'",
                           timeout=10000)
    page.locator('#runs-files a[download="lora-000001.safetensors"]').wait_for(timeout=10000)  # an epoch file
    page.locator("#runs-best").get_by_text(f"Best: {files[best]}").wait_for(timeout=15000)
    assert page.locator("#runs-files a[download]").first.get_attribute("download") == files[best]
    assert not page.locator("#runs-files button[aria-label='Remove this file']").first.is_visible()  # downloads only
    page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)
    assert page.locator("#runs-resume").is_disabled()  # a done run has nothing to resume, as on the Monitor
    page.locator("#runs-delete").click()  # asked first: the run is still there
    page.locator("#runs-delete").get_by_text(f"Click again to delete {run_dir.name} for good").wait_for(timeout=10000)
    said = page.locator("#runs-status").text_content()
    assert f"its {len(set(files.values()))} saved LoRA file(s)" in said and run_dir.is_dir(), said
    page.locator("#runs-delete").click()
    page.locator("#runs-status").get_by_text(f"Deleted {run_dir.name}.").wait_for(timeout=10000)
    assert not run_dir.exists()


def start_training(page, app: App, tmp_path: Path, epochs: int) -> None:
    images = sorted(draw_dataset(tmp_path / "pictures", 8).glob("*.png"))
    set_up_run(page, app, images)
    fill(page, "max-train-epochs", str(epochs))
    fill(page, "sample-every-n-epochs", "0")
    page.locator("#train-start").click()
    queued(page)
    page.locator("#monitor-progress").get_by_text(re.compile(r"Step \d+ /")).wait_for(timeout=120000)


def test_the_app_restarts_finds_its_running_run_cancels_and_resumes_it(browser, models, tmp_path):
    from trainer.checkpoint import latest
    from trainer.events import read_all

    app = App(tmp_path / "runs", models).start()
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        start_training(page, app, tmp_path, epochs=100)  # ~400 steps: still training when the app is back
    finally:
        app.stop()
    run_dir = next((tmp_path / "runs").glob("2*"))
    before = len([e for e in read_all(run_dir) if e["type"] == "step"])
    app = App(tmp_path / "runs", models).start()
    try:
        page.goto(app.url)  # another port: another origin, whose storage holds nothing of the page before
        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-table").get_by_text(run_dir.name).filter(visible=True).first.wait_for(timeout=15000)
        page.locator("#runs-choose input").click()
        page.get_by_role("option", name=run_dir.name).click()
        page.locator("#runs-open").click()
        page.locator("#monitor-loss svg").get_by_text("smoothed").wait_for(timeout=30000)
        page.wait_for_function(f"""() => {{
            const m = document.querySelector('#monitor-progress').innerText.match(/Step (\\d+) \\//);
            return m && Number(m[1]) > {before + 2}; }}""", timeout=60000)  # live again, still counting
        assert len([e for e in read_all(run_dir) if e["type"] == "step"]) > before  # it trained while the app was down
        page.wait_for_timeout(2500)
        assert last_step_plotted(page) > before
        pid = json.loads((run_dir / "status.json").read_text())["pid"]
        page.locator("#monitor-cancel").click()  # the re-attached run is the app's own: it can stop it
        # "cancelled" is shown once the worker has saved its state and exited (seconds; more on a loaded machine)
        page.locator("#monitor-title").get_by_text("— cancelled").wait_for(timeout=120000)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
        cut = [e for e in read_all(run_dir) if e["type"] == "cancelled"][-1]["step"]
        assert latest(run_dir).name == f"step-{cut:08d}"  # resumable from where it stopped
        page.locator("#monitor-resume").click()
        page.wait_for_function(f"""() => {{
            const m = document.querySelector('#monitor-progress').innerText.match(/Step (\\d+) \\//);
            return m && Number(m[1]) > {cut + 1}; }}""", timeout=120000)  # a fresh worker: imports, loading
        page.locator("#monitor-cancel").click()
        page.locator("#monitor-title").get_by_text("— cancelled").wait_for(timeout=120000)
        steps = [e["step"] for e in read_all(run_dir) if e["type"] == "step"]
        assert steps == sorted(set(steps)) and steps[0] == 1  # continued, never restarted from 0
    finally:
        app.stop()


def test_captioning_in_the_browser(app, page, tmp_path):
    from tests.test_datasets_captioners import tiny_tagger

    # ~0.8 s a picture (~20 s for 24): the poll shows progress and the cancel lands well before the last picture
    slow = tiny_tagger(tmp_path / "slow-tagger", size=4096)
    tagger = tiny_tagger(tmp_path / "tagger")
    images = sorted(draw_dataset(tmp_path / "pictures", 24).glob("*.png"))
    page.goto(app.url)
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images])
    page.get_by_text("Added 24 picture(s)").wait_for(timeout=60000)
    page.locator("#dataset-captioner").get_by_text("Caption the pictures").click()
    source = page.locator("#dataset-captioner-source textarea, #dataset-captioner-source input").first
    status = page.locator("#dataset-caption-status")
    source.fill(str(slow))
    page.locator("#dataset-caption-run").click()
    status.get_by_text(re.compile(r"Captioning with wd14: \d+/24")).wait_for(timeout=60000)  # progress, polled
    page.locator("#dataset-caption-cancel").click()
    try:
        done = int(page.wait_for_function(  # read in the same look as it is found (a late poll may redraw the line)
            "() => (document.querySelector('#dataset-caption-status').innerText"
            ".match(/Cancelled: captioned (\\d+) of 24/) || [])[1]", timeout=60000).json_value())
    except Exception:
        raise AssertionError(f"not cancelled; the status says {status.text_content()!r}") from None
    assert done < 24
    source.fill(str(tagger))
    page.locator("#dataset-caption-run").click()  # the rest: pictures with a caption are kept
    page.get_by_text(f"Captioned {24 - done} pictures with wd14.").wait_for(timeout=60000)
    page.locator("#dataset-gallery").get_by_text("^_^, 1girl, blue hair").first.wait_for(
        state="attached", timeout=10000)  # the tagger's default thresholds: 0.35 general, 0.85 character
    assert page.locator("#dataset-gallery").get_by_text("(no caption)").count() == 0
    page.locator("#dataset-gallery img").first.click()  # a thumbnail
    page.locator("#dataset-crop-preview img").wait_for(timeout=15000)
    assert page.locator("#dataset-caption textarea").input_value() == "^_^, 1girl, blue hair"
    page.locator("#dataset-caption textarea").fill("zxq, my words")
    page.locator("#dataset-save-caption").click()
    page.get_by_text("Saved the caption of").wait_for(timeout=10000)
    page.locator("#dataset-caption textarea").fill("zxq, my own words")
    page.locator("#dataset-caption textarea").press("Enter")  # QA 25: Enter did nothing, the edit was lost
    page.locator("#dataset-gallery").get_by_text("zxq, my own words").first.wait_for(state="attached", timeout=10000)
    page.locator("#dataset-trigger textarea, #dataset-trigger input").first.fill("mytok")
    page.locator("#dataset-apply-trigger").click()  # QA 3: the box showed the old caption, and Save wrote it back
    page.wait_for_function("() => document.querySelector('#dataset-caption textarea').value === "
                           "'mytok, zxq, my own words'", timeout=15000)
    page.reload()  # QA 12: the pictures and their captions come back with the page
    page.locator("#dataset-report").get_by_text("Your pictures from before (24 pictures).").wait_for(timeout=30000)
    page.locator("#dataset-gallery").get_by_text("mytok, zxq, my own words").first.wait_for(state="attached",
                                                                                          timeout=10000)
    assert page.locator("#dataset-gallery img").count() == 24
    page.locator("#dataset-gallery img").first.click()
    page.locator("#dataset-crop-preview img").wait_for(timeout=15000)
    selected = page.locator("#dataset-selected textarea, #dataset-selected input").first
    first = selected.input_value()
    page.locator("#dataset-caption textarea").fill("mytok, typed and not saved")
    page.locator("#dataset-gallery img").nth(1).click()  # QA 25: clicking another picture dropped the edit
    page.locator("#dataset-report").get_by_text(f"Saved the caption of {first}.").wait_for(timeout=15000)
    page.locator("#dataset-gallery").get_by_text("mytok, typed and not saved").first.wait_for(state="attached",
                                                                                            timeout=10000)
    assert selected.input_value() not in ("", first)
    second = selected.input_value()
    page.locator("#dataset-caption textarea").fill("mytok, typed then Train clicked")
    page.get_by_role("tab", name="Train").click()  # leaving the tab saves it: Train reads the folder
    page.get_by_test_id("toast-text").get_by_text(f"Saved the caption of {second}.").wait_for(timeout=15000)
    page.get_by_role("tab", name="Dataset").click()
    page.locator("#dataset-gallery").get_by_text("mytok, typed then Train clicked").first.wait_for(state="attached",
                                                                                                 timeout=10000)
    page.locator("#dataset-clear").click()  # QA 18: Start over leaves no picture selected and no crop preview
    page.locator("#dataset-crop-preview img").wait_for(state="detached", timeout=15000)
    assert page.locator("#dataset-selected textarea, #dataset-selected input").first.input_value() == ""
    page.wait_for_timeout(1500)
    page.reload()  # re-walk N7: a reload after Start over brought the pictures back
    page.locator("#dataset-upload").wait_for(timeout=30000)
    page.wait_for_timeout(3000)
    assert page.locator("#dataset-gallery img").count() == 0
    assert "from before" not in page.locator("#dataset-report").inner_text()
    asked = []  # (the page's reloads above went without a question: nothing typed was left unsaved)
    page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.dismiss()))
    caption = page.locator("#dataset-caption textarea")
    caption.click()
    caption.fill("typed and not saved")
    page.evaluate("() => { location.reload(); }")  # the browser asks before a caption typed and not saved goes
    deadline = time.time() + 15
    while not asked and time.time() < deadline:
        page.wait_for_timeout(100)  # (Playwright hands the dialog over while it waits)
    assert asked == ["beforeunload"], asked


def drop(page, picture: Path) -> str:
    """Drop one picture on the Dataset tab; the report once the gallery shows it and the upload box is empty."""
    page.locator("#dataset-upload input[type=file]").set_input_files(str(picture))
    page.locator(f'#dataset-gallery img[src*="{picture.stem}"]').first.wait_for(state="attached", timeout=30000)
    page.locator("#dataset-upload .stem").first.wait_for(state="detached", timeout=10000)  # the box lists no file
    return page.locator("#dataset-report").inner_text()


def test_each_drop_adds_only_its_own_pictures_and_start_over_empties_the_dataset(app, page, tmp_path):
    good, ring5, ring6 = sorted(draw_dataset(tmp_path / "pictures", 3).glob("*.png"))
    gallery = page.locator("#dataset-gallery img")
    page.goto(app.url)
    assert "Added 1 picture(s)" in drop(page, good) and gallery.count() == 1
    assert "Added 1 picture(s)" in drop(page, ring5) and gallery.count() == 2
    page.locator("#dataset-clear").click()
    gallery.first.wait_for(state="detached", timeout=10000)
    assert "Added 1 picture(s)" in drop(page, ring6) and gallery.count() == 1
    page.locator("#dataset-earlier").get_by_text("Earlier datasets").click()  # the two pictures before Start over
    page.locator("#dataset-earlier-choice input").click()
    page.get_by_role("option", name=re.compile(r"· 2 pictures ·")).click()
    page.locator("#dataset-earlier-open").click()
    page.get_by_text("Opened an earlier dataset (2 pictures).").wait_for(timeout=15000)
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length === 2", timeout=15000)
    page.locator("#dataset-tags").get_by_text("Tags").first.click()  # re-walk: Gradio refused -1 with its own error
    fill(page, "keep", "-1", "dataset-")
    page.locator("#dataset-bulk-apply").click()
    page.get_by_text("⚠ Keep the first N tags: -1 is not allowed").wait_for(timeout=15000)

def test_a_bad_field_is_marked_red_and_a_base_that_is_not_there_is_refused(app, page, tmp_path):
    page.goto(app.url)
    page.locator("#dataset-demo").click()
    page.get_by_text("Added 10 picture(s)").wait_for(timeout=30000)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-preset-info").get_by_text("A person or character").wait_for(timeout=30000)
    fill_until_still(page, {"network-dim": "0"})  # a late refill from the preset would put the preset's back
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text("⚠ Dim = 0: must be >= 1").wait_for(timeout=30000)  # its label
    red = "() => getComputedStyle(document.querySelector('#train-network-dim input')).borderColor === 'rgb(221, 51, 51)'"
    page.wait_for_function(red, timeout=30000)  # the app's CSS reaches the page: #d33
    fill_until_still(page, {"network-dim": "4"})
    page.wait_for_function(f"() => !({red})()", timeout=30000)  # QA: the mark stayed until the next Train click
    assert "⚠" not in page.locator("#train-network-dim").inner_text()
    kohya = tmp_path / "kohya.toml"  # a kohya_ss user's settings, read into the form
    kohya.write_text('network_dim = 12\nnetwork_alpha = 6\noutput_dir = "/out"\nmax_timestep = 0\n')
    with page.expect_file_chooser() as chooser:
        page.locator("#train-import").click()
    chooser.value.set_files(str(kohya))
    page.wait_for_function("() => document.querySelector('#train-import-info').textContent.includes('Imported')",
                           timeout=30000)
    note = page.locator("#train-import-info").text_content()
    assert "Imported kohya.toml: 3 setting(s) into the form (network_type = 'lora', network_dim = 12, " in note
    assert "training.max_timestep = 0: must be >= 1 and <= 1000; left as it was" in note
    assert "output_dir: a kohya option with no effect here; ignored" in note
    assert (field_value(page, "network-dim"), field_value(page, "network-alpha")) == ("12", "6")
    page.locator("#train-preset").get_by_text("style").click()  # a preset clicked refills the form
    page.locator("#train-preset-info").get_by_text("An art style").wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelector('#train-network-dim input').value !== '12'", timeout=30000)
    fill_until_still(page, {"network-dim": "24", "max-train-epochs": "3"})
    page.reload()  # QA 12: a reload put the preset's values back in the form; s28 F20: and opened Dataset
    page.locator("#train-preset-info").get_by_text("An art style").wait_for(timeout=30000)  # visible: Train is open
    page.wait_for_function("() => document.querySelector('#train-network-dim input').value === '24'", timeout=30000)
    assert field_value(page, "max-train-epochs") == "3"
    assert page.locator("#train-preset input[value=style]").is_checked()
    base = page.locator("#train-base input")
    base.fill(str(tmp_path / "nowhere.safetensors"))
    base.press("Enter")
    page.locator("#train-base-info").get_by_text("no such file or folder").wait_for(timeout=30000)
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text("⚠ Base model: ").wait_for(timeout=30000)
    assert "no such file or folder" in page.locator("#train-status").text_content()
    runs = Path(app.args[app.args.index("--runs-dir") + 1])
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.is_dir() else True


def test_lora_methods_and_the_resize_tool_in_the_browser(app, page, tiny_models, tmp_path):
    from safetensors import safe_open

    from tests.test_resize import lora_file

    page.goto(app.url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-advanced").get_by_text("Advanced").click()
    page.locator("#train-network-type input").click()
    for method in ("dora", "vera", "adalora", "rslora", "lora_fa"):
        page.get_by_role("option", name=method, exact=True).wait_for(timeout=10000)
    page.keyboard.press("Escape")
    assert page.locator("#train-unet-quantization").is_visible() and page.locator("#train-prune-energy").is_visible()

    source = lora_file(tiny_models, "sd1", tmp_path / "mine.safetensors")
    page.get_by_role("tab", name="Runs").click()
    page.locator("#resize-section").get_by_text("Resize a LoRA file").click()
    page.locator("#resize-source input[type=file]").set_input_files(str(source))
    energy = page.locator("#resize-energy input")
    energy.fill("0.5")
    energy.press("Tab")
    page.locator("#resize-run").click()
    page.locator("#resize-report").get_by_text("dropped").wait_for(timeout=60000)
    report = page.locator("#resize-report").text_content()
    assert "129 in, 129 kept, 0 dropped" in report and "of Σσ² kept overall" in report, report
    result = app.args[app.args.index("--runs-dir") + 1]
    page.locator("#resize-result").get_by_text("mine-e0.5").first.wait_for(timeout=10000)  # the download link
    resized, = (Path(result) / ".resized").glob("*/mine-e0.5.safetensors")
    assert resized.stat().st_size < source.stat().st_size
    with safe_open(str(resized), "pt") as f:
        assert json.loads(f.metadata()["ss_resize"])["energy"] == 0.5
    page.screenshot(path=str(SHOTS / "resize.png"), full_page=True)
