"""The Compare tab in Debian's chromium, against the app on 127.0.0.1 and the real compare worker: a trained run's
saved epochs × 3 strengths × 2 prompts × 2 seeds, with a dropped file made for another base."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_browser import CHROMIUM, ROOT, SHOTS, App, browser, page  # noqa: F401  (fixtures)
from tests.test_training import draw_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")]
SETTINGS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "num_repeats": 1, "max_train_epochs": 2,
            "save_every_n_epochs": 1, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2,
            "sample_every_n_epochs": 2, "sample_steps": 4, "validation_split": 0.3, "trigger_word": "zxq"}


def trained_run(tiny_models, tmp_path: Path) -> Path:
    """A run trained by the command line (two saved epochs, held-out loss, the base's samples at step 0)."""
    images = draw_dataset(tmp_path / "pictures", 6)
    sets = [arg for k, v in SETTINGS.items() for arg in ("--set", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "trainer", "new", "--base", str(tiny_models["sd1"][1]), "--images",
                        str(images), "--preset", "character", "--runs-dir", str(tmp_path / "runs"), "--name", "ring",
                        *sets], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp_path / "runs" / "ring"


def pixels(data_uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"))


def progress_line(page) -> str:
    """The progress line; Gradio's overlay ("0.1s") may sit above it while a tick runs."""
    shown = page.locator("#compare-progress").inner_text()
    return next((line for line in shown.splitlines() if line.startswith("Cell ")), shown)


def progress_until_done(page, timeout_s: float = 120) -> set[str]:
    """The progress lines the page showed until it said done."""
    seen, deadline = set(), time.time() + timeout_s
    while time.time() < deadline:
        text = progress_line(page)
        seen.add(text)
        if "· done" in text or "· failed" in text:
            return seen
        page.wait_for_timeout(150)
    raise AssertionError(f"the compare did not end; the page showed {sorted(seen)}")


def test_compare_a_runs_epochs_in_the_browser(tiny_models, page, tmp_path):  # noqa: F811
    from tests.test_resize import lora_file
    from trainer.events import read_all

    run = trained_run(tiny_models, tmp_path)
    saved = sorted(p.stem for p in (run / "output").glob("*.safetensors"))
    base_samples = {e["prompt"]: run / e["path"] for e in read_all(run) if e["type"] == "sample" and e["step"] == 0}
    other = lora_file(tiny_models, "sdxl", tmp_path / "drop" / "tiny-sdxl.safetensors")
    models = tmp_path / "models"
    models.mkdir()
    app = App(run.parent, models).start()
    try:
        page.goto(app.url)
        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-choose input").click()
        page.get_by_role("option", name="ring").click()
        page.locator("#runs-compare").click()  # switches to the Compare tab with the run chosen
        files = page.locator("#compare-files")
        files.get_by_text(re.compile(r"ring / lora-000001 \(epoch 1, step \d+\) · held-out \d\.\d{4}")).wait_for(
            timeout=30000)
        page.locator("#compare-run-info").get_by_text(f"{len(saved)} saved file(s), all ticked.", exact=True).wait_for(
            timeout=10000)
        prompts = page.locator("#compare-prompts textarea")
        page.wait_for_function("() => document.querySelector('#compare-prompts textarea').value.includes('zxq')")
        assert prompts.input_value().splitlines() == list(base_samples)  # the run's own sample prompts
        for elem, value in (("strengths", "0, 0.5, 1"), ("seeds", "1234, 5")):
            box = page.locator(f"#compare-{elem} textarea, #compare-{elem} input").first
            box.fill(value)
            box.press("Tab")
        page.locator("#compare-upload input[type=file]").set_input_files(str(other))
        page.locator("#compare-upload").get_by_text("tiny-sdxl.safetensors").wait_for(timeout=30000)
        page.locator("#compare-start").click()
        total = len(saved) * 3 * 2 * 2
        page.wait_for_function("() => /seeds\\.|⚠/.test(document.querySelector('#compare-status').innerText)",
                               timeout=30000)  # queued, or refused
        assert page.locator("#compare-status").inner_text().endswith(
            f": {len(saved) + 1} files × 3 strengths × 2 prompts × 2 seeds.")
        seen = progress_until_done(page)
        assert f"Cell {total} / {total} · done" in seen
        assert any(re.match(rf"Cell ([1-9]\d*) / {total} · ", s) and not s.startswith(f"Cell {total}")
                   for s in seen), seen  # the grid grew while the worker drew it
        page.locator("#compare-problems").get_by_text(
            "⚠ tiny-sdxl: made for SDXL, the base is SD 1.x (skipped)").wait_for(timeout=10000)
        grid = page.locator("#compare-grid")
        page.wait_for_function(f"() => document.querySelectorAll('#compare-grid img').length === {total}")
        text = grid.locator("table").inner_text()  # not Gradio's "queue: …" overlay, shown while the tick runs
        for stem in saved:
            assert re.search(rf"ring / {stem} \(epoch \d+, step \d+\)\s+held-out loss \d\.\d{{4}}", text), (stem, text)
        assert "⚠ skipped: made for SDXL, the base is SD 1.x" in text
        for k, prompt in enumerate(base_samples):
            assert f"prompt {k + 1}: {prompt} · seed 1234" in text and f"prompt {k + 1}: {prompt} · seed 5" in text
            # strength 0 is the base: the same picture in every row, and the training run's own step-0 sample
            sources = {grid.locator(f'img[alt^="{label}"][alt$="· strength 0 · prompt {k + 1} · seed 1234"]')
                       .get_attribute("src") for label in labels(page)}
            assert len(sources) == 1
            assert np.array_equal(pixels(sources.pop()), np.asarray(Image.open(base_samples[prompt]).convert("RGB")))
        assert "strength 0.5" in text and "strength 1" in text
        # QA C7: the grid scrolls sideways in a box of its own (Gradio keeps its style), the file column held in view
        assert page.evaluate("""() => [getComputedStyle(document.querySelector('#compare-grid .compare-scroll'))
            .overflowX, getComputedStyle(document.querySelector('#compare-grid th.compare-label')).position]""") == [
            "auto", "sticky"]
        with page.expect_download() as download:
            page.locator('#compare-download a[download="grid.png"]').click()
        got = tmp_path / "grid.png"
        download.value.save_as(got)
        compare = next((run.parent / ".compares").iterdir())
        assert got.read_bytes() == (compare / "grid.png").read_bytes()
        assert Image.open(got).width > 3 * 2 * 2 * 64  # a label column and 12 cells a row
        drawn = labels(page)
        page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)
        page.reload()  # the compare id is in the browser's storage: the page comes back on the whole grid
        page.get_by_role("tab", name="Compare").click()
        page.wait_for_function(f"() => document.querySelectorAll('#compare-grid img').length === {total}",
                               timeout=30000)
        assert labels(page) == drawn and grid.locator("table").inner_text() == text
        # ...and on the form it was asked with: the run chosen, its files ticked, the settings typed
        page.wait_for_function("() => document.querySelector('#compare-strengths textarea, #compare-strengths input')"
                               ".value === '0, 0.5, 1'", timeout=30000)
        page.locator("#compare-run-info").get_by_text(f"{len(saved)} saved file(s), all ticked.", exact=True).wait_for(
            timeout=30000)
        assert page.locator("#compare-seeds textarea, #compare-seeds input").first.input_value() == "1234, 5"
        assert page.locator("#compare-files input:checked").count() == len(saved)
        assert page.locator("#compare-status").inner_text().endswith(
            f": {len(saved) + 1} files × 3 strengths × 2 prompts × 2 seeds.")
        assert progress_line(page) == f"Cell {total} / {total} · done"
        page.locator('#compare-download a[download="grid.png"]').wait_for(timeout=10000)
    finally:
        app.stop()


def labels(page) -> list[str]:
    """The grid's row labels of the files that were drawn."""
    rows = page.locator("#compare-grid tbody tr").all()
    return [r.locator("th").inner_text().split("\n")[0] for r in rows if r.locator("img").count()]
